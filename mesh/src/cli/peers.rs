//! `mesh peers`: the mesh as the attached node sees it.

use anyhow::bail;

use super::client::Session;
use super::{human_ms, Cli};
use crate::proto::{Request, Response};

pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let Response::Peers(peers) = session.request(&Request::Peers).await? else {
        bail!("listing peers: unexpected response");
    };
    session.close().await;
    if cli.json {
        return super::print_json(&peers);
    }
    println!(
        "{:<14} {:<6} {:>8} {:>10} {:>8} {:<24} ADDRESS",
        "NODE", "STATE", "RTT", "LAST SEEN", "MODULES", "LABELS"
    );
    for p in peers {
        let node = p
            .node
            .map(|k| k.short())
            .unwrap_or_else(|| p.peer_id.clone());
        let rtt = p
            .rtt_ms
            .map(|r| format!("{r:.1}ms"))
            .unwrap_or_else(|| "-".into());
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<14} {:<6} {:>8} {:>10} {:>8} {:<24} {}",
            node,
            format!("{:?}", p.state).to_lowercase(),
            rtt,
            human_ms(p.last_seen_ms),
            p.modules.len(),
            labels.join(","),
            p.addrs.first().cloned().unwrap_or_default()
        );
    }
    Ok(())
}
