//! `mesh status`: the attached node.

use anyhow::bail;

use super::client::Session;
use super::{human_ms, Cli};
use crate::proto::{Request, Response};

pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let Response::Status(s) = session.request(&Request::Status).await? else {
        bail!("asking for the node's status: unexpected response");
    };
    session.close().await;
    if cli.json {
        return super::print_json(&s);
    }
    println!("node      {}", s.node);
    println!("peer id   {}", s.peer_id);
    println!("version   {}", s.version);
    println!("uptime    {}", human_ms(s.uptime_ms));
    println!("listen    {}", s.listen.join(", "));
    println!("admin     {}", s.admin);
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("labels    {}", labels.join(" "));
    println!(
        "peers     {} alive of {} known",
        s.peers_alive, s.peers_known
    );
    println!("modules   {} running", s.modules_running);
    println!(
        "releases  {} ({} blobs, {} bytes)",
        s.releases, s.blobs, s.blob_bytes
    );
    Ok(())
}
