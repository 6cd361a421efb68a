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
        "{:<14} {:<20} {:>7} {:<10} {:>8} {:<14}",
        "NODE", "MODULE", "VERSION", "STATE", "RESTARTS", "CONTENT"
    );
    print_node(&info.local);
    for n in &info.mesh {
        print_node(n);
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
        let state = match &m.state {
            mesh_actors::sandbox_supervisor::ModuleState::Failed { reason } => {
                format!("failed: {reason}")
            }
            other => format!("{other:?}").to_lowercase(),
        };
        println!(
            "{:<14} {:<20} {:>7} {:<10} {:>8} {:<14}",
            node,
            m.name,
            m.version,
            state,
            m.restarts,
            m.content.short()
        );
    }
}
