//! `mesh transfers [--watch]`: downloads in progress on the attached node.

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::client::Session;
use super::{human_ms, Cli};
use crate::proto::{Request, Response};

#[derive(Args, Debug)]
pub struct TransfersArgs {
    /// Keep showing until there is nothing left in progress.
    #[arg(long)]
    watch: bool,
}

/// How often `--watch` asks the node.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

pub async fn run(cli: &Cli, args: &TransfersArgs) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    loop {
        let Response::Transfers(list) = session.request(&Request::Transfers).await? else {
            bail!("listing transfers: unexpected response");
        };
        if cli.json {
            super::print_json(&list)?;
        } else if list.is_empty() {
            println!("no transfers in progress");
        } else {
            println!(
                "{:<28} {:>12} {:>12} {:>10} {:>6} {:>8}",
                "TRANSFER", "HAVE", "SIZE", "MiB/s", "PEERS", "ETA"
            );
            for t in &list {
                println!(
                    "{:<28} {:>12} {:>12} {:>10.2} {:>6} {:>8}",
                    t.label,
                    t.have_bytes,
                    t.size,
                    t.bytes_per_s / (1024.0 * 1024.0),
                    t.peers,
                    t.eta_ms.map(human_ms).unwrap_or_else(|| "-".into())
                );
            }
        }
        if !args.watch || list.is_empty() {
            break;
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
    session.close().await;
    Ok(())
}
