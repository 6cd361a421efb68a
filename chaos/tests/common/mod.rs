//! Helpers shared by the harness's own tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The `mesh` binary cargo built into the same target directory as this test (the test
/// runs from target/debug/deps/). `cargo test --workspace` builds it; a missing binary
/// is a failure with the command that fixes it, never a silent skip.
pub fn mesh_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let bin = dir.join("mesh");
    assert!(
        bin.exists(),
        "the mesh binary is not at {}: build it with `cargo build -p mesh` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"))
}

/// Pids of processes whose command line mentions `needle` (a run's directory).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && mesh_chaos::registry::pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Network namespaces whose names carry `pid` after the lab prefix.
pub fn namespaces_of(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let prefix = format!("{}{pid}", mesh_chaos::netns::PREFIX);
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Mount points under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = dir.to_string_lossy().to_string();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&want))
        .map(String::from)
        .collect()
}

/// Asserts a finished or interrupted run left no agent, namespace or mount behind.
pub fn assert_clean(out: &Path, harness_pid: u32) {
    let procs = processes_mentioning(&out.to_string_lossy());
    assert!(procs.is_empty(), "agents left running: {procs:?}");
    let ns = namespaces_of(harness_pid);
    assert!(ns.is_empty(), "namespaces left: {ns:?}");
    let mounts = mounts_under(out);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}
