//! `mesh firmware`: the firmware slots of the attached node (or, with --all, of every
//! connected node): what each slot holds, which is active and confirmed, an update in
//! progress, the last install and the last rollback with its reason.

use anyhow::bail;
use clap::Args;
use mesh_actors::firmware::TargetStatus;
use mesh_actors::slots::{Phase, Slot, SlotRecord};

use super::client::Session;
use super::Cli;
use crate::proto::{NodeFirmware, Request, Response};

#[derive(Args, Debug)]
pub struct FirmwareArgs {
    /// Ask every connected node too.
    #[arg(long)]
    all: bool,
}

pub async fn run(cli: &Cli, args: &FirmwareArgs) -> anyhow::Result<()> {
    let session = Session::attach(cli).await?;
    let Response::Firmware(info) = session
        .request(&Request::Firmware { all: args.all })
        .await?
    else {
        bail!("listing firmware: unexpected response");
    };
    session.close().await;
    if cli.json {
        return super::print_json(&info);
    }
    println!(
        "{:<14} {:<16} {:<7} {:<12} {:>8} {:<14} {:<14} {:<14}",
        "NODE", "TARGET", "ACTIVE", "STATE", "VERSION", "CONTENT", "SLOT A", "SLOT B"
    );
    print_node(&info.local);
    for n in &info.mesh {
        print_node(n);
    }
    if !info.failures.is_empty() {
        println!();
        println!("FIRMWARE ROLLED BACK (reported by nodes over gossip)");
        for f in &info.failures {
            let r = &f.report;
            println!(
                "{:<14} {:<16} v{:<6} back to v{:<6} {}",
                f.reporter, r.target, r.version, r.rolled_back_to, r.reason
            );
        }
    }
    Ok(())
}

fn node_name(n: &NodeFirmware) -> String {
    n.labels
        .get("name")
        .cloned()
        .or_else(|| n.node.map(|k| k.short()))
        .unwrap_or_else(|| "?".into())
}

fn print_node(n: &NodeFirmware) {
    let name = node_name(n);
    let Some(targets) = &n.targets else {
        println!("{name:<14} (no answer)");
        return;
    };
    if targets.is_empty() {
        println!("{name:<14} (no firmware targets)");
    }
    for t in targets {
        print_target(&name, t);
    }
}

/// "confirmed", "trial (2 boots left)", "pending b", "writing b", plus what runs now.
fn state_of(r: &SlotRecord, t: &TargetStatus) -> String {
    let s = match &r.phase {
        Phase::Idle => "confirmed".to_string(),
        Phase::Writing { slot, .. } => format!("writing {slot}"),
        Phase::Pending { slot } => format!("pending {slot}"),
        Phase::Trial { attempts_left, .. } => format!("trial ({attempts_left} left)"),
    };
    match &t.busy {
        Some(b) => format!("{s}, {b}"),
        None => s,
    }
}

fn slot_text(r: &SlotRecord, slot: Slot) -> String {
    match r.image(slot) {
        Some(i) => format!("v{} {}", i.version, &i.content.short()[..8]),
        None => "empty".into(),
    }
}

fn print_target(node: &str, t: &TargetStatus) {
    let Some(r) = &t.record else {
        println!(
            "{node:<14} {:<16} unusable: {}",
            t.target,
            t.error.as_deref().unwrap_or("not open yet")
        );
        return;
    };
    let active = r.active_image();
    println!(
        "{node:<14} {:<16} {:<7} {:<12} {:>8} {:<14} {:<14} {:<14}",
        t.target,
        r.active.name(),
        state_of(r, t),
        active
            .map(|i| format!("v{}", i.version))
            .unwrap_or_default(),
        active.map(|i| i.content.short()).unwrap_or_default(),
        slot_text(r, Slot::A),
        slot_text(r, Slot::B),
    );
    if let Some(w) = t.wanted {
        println!("{:<14}   release v{w} waiting to be installed", "");
    }
    if let Some(i) = &r.last_install {
        println!(
            "{:<14}   last install: v{} into slot {} from a {}",
            "", i.version, i.slot, i.source
        );
    }
    if let Some(rb) = &r.last_rollback {
        println!(
            "{:<14}   last rollback: v{} -> v{} ({}): {}",
            "",
            rb.from.version,
            rb.to.version,
            super::human_ms(mesh_actors::unix_ms().saturating_sub(rb.unix_ms)) + " ago",
            rb.reason
        );
    }
    if let Some(e) = r.last_error.as_ref().or(t.error.as_ref()) {
        println!("{:<14}   last error: {e}", "");
    }
}
