//! What a run has put on this machine outside its own process: agent processes and
//! tmpfs mounts, recorded in a small file named by the harness's pid. When a run is
//! killed before it can clean up (kill -9, a crash), the next run, or
//! `mesh-chaos clean`, finds the file of a harness that is gone and removes what it
//! lists. Network namespaces and the nftables tables inside them carry the harness's pid
//! in their names and are swept by `netns::remove_stale`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A record lists a few dozen processes and mounts; refuse anything larger as damaged.
const RECORD_BYTES_MAX: u64 = 1024 * 1024;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    harness: Proc,
    agents: Vec<Proc>,
    mounts: Vec<PathBuf>,
}

/// A process named by its pid and its start time (clock ticks since boot), so a pid
/// reused by an unrelated process is never killed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Proc {
    pid: u32,
    start: u64,
}

impl Proc {
    fn of(pid: u32) -> Option<Proc> {
        Some(Proc {
            pid,
            start: start_time(pid)?,
        })
    }

    fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// The start time of a process (field 22 of /proc/PID/stat), or None when it is gone
/// or a zombie (it has exited and released everything but its pid).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Runs this process has opened, so two in one process (tests) get their own records.
static OPENED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The directory of run records: `MESH_CHAOS_RUNS`, else `mesh-chaos-runs` in the
/// system's temporary directory.
pub fn runs_dir() -> PathBuf {
    std::env::var_os("MESH_CHAOS_RUNS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("mesh-chaos-runs"))
}

/// This process's record, kept up to date as agents start and mounts appear.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    record: Mutex<Record>,
}

impl Registry {
    /// Creates this process's record after sweeping what dead runs left behind.
    pub fn open() -> anyhow::Result<Registry> {
        remove_stale();
        let me = std::process::id();
        let reg = Registry {
            path: runs_dir().join(format!(
                "{me}-{}.json",
                OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            record: Mutex::new(Record {
                harness: Proc::of(me).unwrap_or(Proc { pid: me, start: 0 }),
                ..Record::default()
            }),
        };
        reg.save()?;
        Ok(reg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self) -> anyhow::Result<()> {
        let bytes = {
            let r = self.record.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec_pretty(&*r)?
        };
        mesh_transport::fsutil::write_atomic(&self.path, &bytes, 0o644)
            .map_err(|e| anyhow::anyhow!("writing run record {}: {e}", self.path.display()))
    }

    pub fn add_agent(&self, pid: u32) -> anyhow::Result<()> {
        if let Some(p) = Proc::of(pid) {
            let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
            r.agents.retain(|a| a.alive());
            r.agents.push(p);
        }
        self.save()
    }

    pub fn add_mount(&self, path: &Path) -> anyhow::Result<()> {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mounts
            .push(path.to_path_buf());
        self.save()
    }

    pub fn remove_mount(&self, path: &Path) -> anyhow::Result<()> {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mounts
            .retain(|m| m != path);
        self.save()
    }
}

impl Drop for Registry {
    /// The run cleaned up after itself (agents killed, mounts gone): the record goes.
    fn drop(&mut self) {
        let r = self
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        sweep(&r);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub records: usize,
    pub agents: usize,
    pub mounts: usize,
}

/// Removes what runs whose harness is gone left behind: their agents, their mounts,
/// their network namespaces and bridges, and their record files.
pub fn remove_stale() -> Swept {
    let mut swept = Swept::default();
    if let Ok(entries) = std::fs::read_dir(runs_dir()) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.len() <= RECORD_BYTES_MAX)
                .and_then(|_| std::fs::read(&path).ok())
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            let Some(record) = record else {
                tracing::warn!(path = %path.display(), "removing an unreadable run record");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            if record.harness.alive() {
                continue;
            }
            let (agents, mounts) = sweep(&record);
            swept.agents += agents;
            swept.mounts += mounts;
            swept.records += 1;
            let _ = std::fs::remove_file(&path);
        }
    }
    crate::netns::remove_stale();
    swept
}

/// Kills a record's live agents and unmounts its mounts; returns how many of each.
fn sweep(r: &Record) -> (usize, usize) {
    let mut agents = 0;
    for a in r.agents.iter().filter(|a| a.alive()) {
        // SIGKILL ends a stopped (paused) process too.
        let _ = Command::new("kill")
            .args(["-KILL", &a.pid.to_string()])
            .output();
        agents += 1;
    }
    // The mounts hold the agents' state directories: wait for the agents to be gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while r.agents.iter().any(|a| a.alive()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut mounts = 0;
    for m in &r.mounts {
        if is_mounted(m) {
            let _ = Command::new("umount").arg("-l").arg(m).output();
            mounts += 1;
        }
    }
    (agents, mounts)
}

/// Whether `path` is a mount point, from /proc/self/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| m == want)
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    start_time(pid).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_known_and_stable() {
        let me = Proc::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = Proc {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(
            !other.alive(),
            "a reused pid must not count as the same process"
        );
    }

    #[test]
    fn a_dead_runs_agents_are_killed_by_the_sweep() {
        // A stand-in for an orphaned agent, and a "harness" that has exited.
        let mut agent = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        let mut harness = std::process::Command::new("true").spawn().unwrap();
        let harness_pid = harness.id();
        let harness_proc = Proc::of(harness_pid);
        harness.wait().unwrap();
        let record = Record {
            harness: harness_proc.unwrap_or(Proc {
                pid: harness_pid,
                start: 1,
            }),
            agents: vec![Proc::of(agent.id()).unwrap()],
            mounts: vec![],
        };
        assert!(!record.harness.alive());
        let (agents, _) = sweep(&record);
        assert_eq!(agents, 1);
        let status = agent.wait().unwrap();
        assert!(!status.success(), "the agent was not killed");
    }
}
