//! The harness leaves the machine clean: after Ctrl-C (it undoes its faults and stops
//! its nodes itself), and after kill -9 (the next run, or `mesh-chaos clean`, removes
//! what it left: agents, tmpfs mounts, network namespaces with their nftables rules).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A long scenario with faults of every kind that changes the machine: processes
/// (kill, pause), mounts (disk full, as root) and namespaces with nftables rules
/// (partition, as root).
const SCENARIO: &str = r#"
name = "interrupt-me"
nodes = 3
duration_s = 120
[[release]]
kind = "data"
name = "blob"
bytes = 65536
versions = 2
window_s = [0.5, 1]
[[fault]]
kind = "partition"
start_s = [1, 1.5]
length_s = [100, 110]
[[fault]]
kind = "pause"
start_s = [1, 1.5]
length_s = [100, 110]
[[fault]]
kind = "disk_full"
start_s = [1, 1.5]
length_s = [100, 110]
"#;

/// One harness at a time: each is a fleet on a small machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts the harness on the scenario above and waits until its faults are applied.
fn start(dir: &Path) -> Child {
    let scenario = dir.join("interrupt-me.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-chaos"))
        .args(["run", scenario.to_str().unwrap(), "--seed", "1", "--out"])
        .arg(dir.join("out"))
        .arg("--mesh")
        .arg(mesh_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("harness: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut faults = 0;
    while faults < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the harness did not apply its faults in time");
        if line.contains("fault #") && !line.contains("failed") {
            faults += 1;
        }
    }
    // Let the last fault settle (a remount, a filter) before interrupting.
    std::thread::sleep(Duration::from_secs(1));
    child
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the harness did not exit in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn ctrl_c_undoes_every_fault_and_stops_every_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut child = start(dir.path());
    let pid = child.id();
    assert!(
        !processes_mentioning(&out.to_string_lossy()).is_empty(),
        "no agents were running"
    );
    signal(pid, "INT");
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(!status.success(), "an interrupted run must not exit 0");
    // The agents were sent SIGKILL as the harness stopped; give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&out.to_string_lossy()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_clean(&out, pid);
}

#[test]
fn a_run_killed_with_sigkill_is_cleaned_by_the_next() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut child = start(dir.path());
    let pid = child.id();
    signal(pid, "KILL");
    wait_exit(&mut child, Duration::from_secs(10));
    // Nothing could clean up: the agents are orphans, one of them stopped.
    let left = processes_mentioning(&out.to_string_lossy());
    assert!(!left.is_empty(), "expected orphaned agents after kill -9");
    if mesh_chaos::netns::nft_available().is_ok() {
        // As root the run also left its lab namespaces and the tmpfs of the full disk.
        assert!(
            !namespaces_of(pid).is_empty(),
            "expected leftover namespaces"
        );
        assert!(!mounts_under(&out).is_empty(), "expected a leftover tmpfs");
    } else {
        println!("not root: only processes are left behind and swept");
    }
    let clean = Command::new(env!("CARGO_BIN_EXE_mesh-chaos"))
        .arg("clean")
        .output()
        .unwrap();
    assert!(
        clean.status.success(),
        "mesh-chaos clean: {}",
        String::from_utf8_lossy(&clean.stderr)
    );
    println!("{}", String::from_utf8_lossy(&clean.stdout));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&out.to_string_lossy()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_clean(&out, pid);
}
