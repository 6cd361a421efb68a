//! The short chaos suite: every shipped scenario once, with a fixed seed, against real
//! `mesh` processes. Root-only faults (partitions, loss, slow links) run when this runs
//! as root with nftables (CI does) and are reported as skipped otherwise; everything
//! else always runs. Replay any of these with
//! `mesh-chaos run chaos/scenarios/NAME.toml --seed SEED`.

mod common;

use std::sync::Mutex;

use common::*;
use mesh_chaos::report::{Report, Status};
use mesh_chaos::run::{run_scenario, Args};

/// Scenarios run one at a time: each is a fleet of processes on a small machine, and
/// the lab network's names are per process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(name: &str, seed: u64) -> Report {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::Builder::new()
        .prefix(&format!("chaos-{name}-"))
        .tempdir()
        .unwrap();
    let args = Args {
        scenario: scenario(name),
        seed: Some(seed),
        nodes: None,
        out: Some(out.path().to_path_buf()),
        mesh: Some(mesh_bin()),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt
        .block_on(run_scenario(&args))
        .unwrap_or_else(|e| panic!("{name} seed {seed} did not run: {e:#}"));
    drop(rt);
    assert!(
        report.passed,
        "{name} seed {seed} failed:\n{}",
        report.text()
    );
    assert_clean(out.path(), std::process::id());
    for file in ["report.txt", "report.json", "timeline.svg"] {
        assert!(out.path().join(file).exists(), "{file} not written");
    }
    report
}

/// Every fault of `kind` ran (or, for root-only faults without root, says why not).
fn faults_ran(r: &Report, kind: &str) {
    let of_kind: Vec<_> = r.faults.iter().filter(|f| f.kind == kind).collect();
    assert!(!of_kind.is_empty(), "no {kind} fault planned");
    for f in of_kind {
        if let Some(why) = &f.skipped {
            println!("{}: {kind} fault #{} SKIPPED: {why}", r.scenario, f.id);
            assert!(
                mesh_chaos::netns::nft_available().is_err()
                    || (kind == "clock_skew"
                        && !std::path::Path::new(mesh_chaos::faults::FAKETIME_LIB).exists()),
                "{kind} skipped although this machine can run it: {why}"
            );
            continue;
        }
        assert!(f.error.is_none(), "{kind} #{}: {:?}", f.id, f.error);
        assert!(f.start_ms.is_some() && f.heal_ms.is_some(), "{f:?}");
    }
}

/// At least one rollback happened (and `rollbacks_recorded` held for it).
fn some_rollback(r: &Report) {
    held(r, "rollbacks_recorded");
    let rollbacks = r
        .invariants
        .iter()
        .find(|i| i.name == "rollbacks_recorded")
        .unwrap();
    assert!(
        !rollbacks.statement.contains("(0 seen"),
        "no rollback happened: {}",
        rollbacks.statement
    );
}

fn held(r: &Report, name: &str) {
    let inv = r.invariants.iter().find(|i| i.name == name).unwrap();
    assert_eq!(inv.status, Status::Held, "{name}: {inv:?}");
}

#[test]
fn partition_during_rollout() {
    let r = run("partition-during-rollout", 7);
    faults_ran(&r, "partition");
    held(&r, "modules");
}

#[test]
fn kill_during_transfer() {
    let r = run("kill-during-transfer", 3);
    faults_ran(&r, "kill");
}

#[test]
fn pause_and_resume() {
    let r = run("pause-and-resume", 1);
    faults_ran(&r, "pause");
}

#[test]
fn lossy_links() {
    let r = run("lossy-links", 5);
    faults_ran(&r, "loss");
    faults_ran(&r, "slow");
}

#[test]
fn byzantine_peer() {
    let r = run("byzantine-peer", 11);
    faults_ran(&r, "byzantine");
    held(&r, "byzantine_rejected");
    let b = &r.byzantine[0];
    assert!(b.forged_sent > 0 && b.flood_sent > 0, "{b:?}");
}

/// A node's disk fills during a download: the write error must stop its download
/// without blaming (and banning) the honest peers, so it catches up once space is back.
#[test]
fn disk_full() {
    let r = run("disk-full", 2);
    faults_ran(&r, "disk_full");
}

#[test]
fn clock_skew() {
    let r = run("clock-skew", 4);
    faults_ran(&r, "clock_skew");
}

#[test]
fn crash_looping_module() {
    let r = run("crash-looping-module", 1);
    held(&r, "modules");
    held(&r, "damaged_not_served");
    held(&r, "damaged_repaired");
    some_rollback(&r);
}

#[test]
fn power_cut_during_install() {
    let r = run("power-cut-during-install", 1);
    faults_ran(&r, "power_cut");
    faults_ran(&r, "kill");
    held(&r, "bootable_slot");
    held(&r, "firmware");
    held(&r, "acknowledged_not_lost");
    let cuts = r
        .faults
        .iter()
        .filter(|f| f.detail.contains("lost power at firmware step"))
        .count();
    assert!(cuts > 0, "no armed power cut fired: {:?}", r.faults);
    assert!(
        r.publishes.iter().any(|p| p.patches > 0),
        "no firmware publish carried a patch"
    );
    some_rollback(&r);
}

#[test]
fn module_traffic() {
    let r = run("module-traffic", 1);
    faults_ran(&r, "partition");
    faults_ran(&r, "pause");
    faults_ran(&r, "kill");
    held(&r, "messages_flow");
    held(&r, "modules");
    assert!(
        r.faults
            .iter()
            .all(|f| f.skipped.is_some() || f.traffic.is_some()),
        "a fault has no traffic figure: {:?}",
        r.faults
    );
}
