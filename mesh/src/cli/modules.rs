//! `mesh modules`: what runs on the attached node, or across the mesh.

use anyhow::bail;
use clap::Args;

use super::client::Session;
use super::Cli;
use crate::proto::{NodeModules, Request, Response};

#[derive(Args, Debug)]
pub struct ModulesArgs {
    /// Include every node's modules as reported over gossip.
    #[arg(long)]
    all: bool,
}

pub async fn run(cli: &Cli, args: &ModulesArgs) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let Response::Modules(info) = session.request(&Request::Modules { all: args.all }).await?
    else {
        bail!("listing modules: unexpected response");
    };
    session.close().await;
    if cli.json {
        return super::print_json(&info);
    }
    println!(
        "{:<14} {:<20} {:>7} {:<10} {:>8} {:<14} {:>9} {:>8} {:>9} {:>9} {:>8}",
        "NODE",
        "MODULE",
        "VERSION",
        "STATE",
        "RESTARTS",
        "CONTENT",
        "CPU_MS",
        "MEM_KIB",
        "LOG_DROP",
        "PUBLISHED",
        "STATE_B"
    );
    print_node(&info.local);
    for n in &info.mesh {
        print_node(n);
    }
    if !info.failures.is_empty() {
        println!();
        println!("FAILED RELEASES (reported by nodes over gossip)");
        for f in &info.failures {
            let r = &f.report;
            let outcome = match r.rolled_back_to {
                Some(v) => format!("rolled back to v{v}"),
                None => "failed".to_string(),
            };
            println!(
                "{:<14} {:<20} v{:<6} {:<20} {}",
                f.reporter, r.name, r.version, outcome, r.reason
            );
        }
    }
    Ok(())
}

fn print_node(n: &NodeModules) {
    let node = n.node.map(|k| k.short()).unwrap_or_else(|| "?".into());
    let node = if n.alive {
        node
    } else {
        format!("{node} (down)")
    };
    if n.modules.is_empty() {
        println!("{node:<14} (none)");
    }
    for m in &n.modules {
        use mesh_actors::sandbox_supervisor::ModuleState;
        let state = match &m.state {
            ModuleState::Failed { reason } => format!("failed: {reason}"),
            ModuleState::Refused { reason } => format!("refused: {reason}"),
            ModuleState::Backoff { restart_in_ms } => format!("backoff {restart_in_ms}ms"),
            other => format!("{other:?}").to_lowercase(),
        };
        let u = &m.usage;
        println!(
            "{:<14} {:<20} {:>7} {:<10} {:>8} {:<14} {:>9} {:>8} {:>9} {:>9} {:>8}",
            node,
            m.name,
            m.version,
            state,
            m.restarts,
            m.content.short(),
            u.cpu_us / 1000,
            u.memory_bytes / 1024,
            u.log_lines_dropped,
            u.published,
            u.state_bytes
        );
        if let Some(r) = &m.rolled_back_from {
            println!("{:<14}   rolled back from v{}: {}", "", r.version, r.reason);
        }
        if let Some(r) = &m.last_refusal {
            println!("{:<14}   refused v{}: {}", "", r.version, r.reason);
        }
        if u.throttled > 0 || u.publish_refused > 0 || u.messages_dropped > 0 {
            println!(
                "{:<14}   throttled {} publish refused {} messages dropped {}",
                "", u.throttled, u.publish_refused, u.messages_dropped
            );
        }
    }
}
