//! `mesh blob HASH`: whether the attached node holds a blob, completely or in part.

use anyhow::bail;
use clap::Args;
use mesh_transport::ContentId;

use super::client::Session;
use super::Cli;
use crate::proto::{Request, Response};

#[derive(Args, Debug)]
pub struct BlobArgs {
    /// The blob's BLAKE3 hash.
    hash: ContentId,
}

pub async fn run(cli: &Cli, args: &BlobArgs) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let Response::Blob(state) = session.request(&Request::Blob { id: args.hash }).await? else {
        bail!("asking for blob {}: unexpected response", args.hash);
    };
    session.close().await;
    if cli.json {
        return super::print_json(&state);
    }
    match (state.complete, state.size) {
        (true, Some(size)) => println!("{} complete, {size} bytes", state.id),
        (false, Some(size)) => println!(
            "{} downloading, {} of {size} bytes",
            state.id, state.have_bytes
        ),
        _ => println!("{} not on this node", state.id),
    }
    Ok(())
}
