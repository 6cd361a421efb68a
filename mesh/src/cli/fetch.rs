//! `mesh fetch HASH [--watch]`: have the attached node fetch a blob by its hash.

use anyhow::bail;
use clap::Args;
use mesh_transport::ContentId;

use super::client::Session;
use super::progress::Progress;
use super::transfers::WATCH_INTERVAL;
use super::Cli;
use crate::proto::{Request, Response};

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// The blob's BLAKE3 hash (as b3sum prints it).
    hash: ContentId,
    /// Show progress until the blob is complete.
    #[arg(long)]
    watch: bool,
}

pub async fn run(cli: &Cli, args: &FetchArgs) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let id = args.hash;
    let Response::Fetching { size, complete, .. } = session.request(&Request::Fetch { id }).await?
    else {
        bail!("fetching {id}: unexpected response");
    };
    if !args.watch || complete {
        if cli.json {
            super::print_json(&serde_json::json!({"id": id, "size": size, "complete": complete}))?;
        } else if complete {
            println!("{id} is already on {} ({size} bytes)", cli.node);
        } else {
            println!("fetching {id} ({size} bytes) on {}", cli.node);
        }
        session.close().await;
        return Ok(());
    }
    let mut progress = Progress::new(&format!("blob {}", id.short()), size);
    loop {
        let Response::Blob(state) = session.request(&Request::Blob { id }).await? else {
            bail!("watching {id}: unexpected response");
        };
        let transfer = match session.request(&Request::Transfers).await? {
            Response::Transfers(list) => list.into_iter().find(|t| t.id == id),
            _ => None,
        };
        progress.update(
            state.have_bytes,
            size,
            transfer.as_ref().map(|t| t.peers),
            transfer.as_ref().map(|t| t.bytes_per_s),
        );
        if state.complete {
            break;
        }
        if transfer.is_none() && !state.complete {
            bail!(
                "fetching {id}: the download stopped before it was complete (see the node's log)"
            );
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
    progress.finish();
    println!("{id} complete on {}", cli.node);
    session.close().await;
    Ok(())
}
