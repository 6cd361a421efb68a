//! A fleet of real `mesh agent` processes on this machine, each with its own state
//! directory and loopback address, driven through the admin endpoint.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh::cli::client::Session;
use mesh::node::RunInfo;
use mesh::proto::{Request, Response};
use mesh_actors::manifest::ReleaseKind;
use mesh_transport::{ContentId, SecretKey};
use tokio::process::{Child, Command};

/// Nodes one fleet may start on one machine.
pub const FLEET_NODES_MAX: usize = 64;

/// How nodes find each other.
#[derive(Clone, Copy, Debug)]
pub enum Topology {
    /// Every node is told node0's address.
    Star,
    /// Node i is told node i-1's address; the rest is discovery.
    Chain,
}

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub nodes: usize,
    pub mesh_bin: PathBuf,
    pub topology: Topology,
    /// Extra `mesh agent` flags for every node.
    pub agent_args: Vec<String>,
    /// Where state and logs go; a temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Run each node in its own shaped network namespace instead of on loopback.
    pub lab: Option<std::sync::Arc<crate::netns::NetLab>>,
}

pub struct FleetNode {
    pub name: String,
    pub state: PathBuf,
    pub log: PathBuf,
    pub info: RunInfo,
    pub session: Session,
    /// None while the node is down (killed and not yet restarted).
    child: Option<Child>,
    /// The program and arguments that start it (a netns prefix included), without the
    /// per-start extras.
    argv: Vec<String>,
    options: NodeOptions,
}

/// What one node gets beyond the fleet's common flags.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Extra `mesh agent` flags for this node.
    pub args: Vec<String>,
    /// Environment variables for this node's process (libfaketime's, for instance).
    pub env: Vec<(String, String)>,
}

/// Options of a fleet that the benchmarks do not need.
#[derive(Clone, Debug, Default)]
pub struct FleetExtras {
    /// Per node, by index; nodes beyond the list get none.
    pub per_node: Vec<NodeOptions>,
    /// Where started agents are recorded, so an interrupted run's are found and killed.
    pub registry: Option<std::sync::Arc<crate::registry::Registry>>,
}

pub struct Fleet {
    pub nodes: Vec<FleetNode>,
    pub operator: SecretKey,
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// Kept until the fleet is gone: the lab network outlives the nodes in it.
    _lab: Option<std::sync::Arc<crate::netns::NetLab>>,
    registry: Option<std::sync::Arc<crate::registry::Registry>>,
}

/// How long a (re)started node may take to write its run.json.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds the `mesh` binary: `MESH_BIN`, else beside this executable (cargo puts both
/// in the same target directory).
pub fn find_mesh_bin(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("MESH_BIN").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let sibling = exe.with_file_name("mesh");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!(
        "finding the mesh binary: none beside {} (build it with cargo build --release -p mesh, or pass --mesh PATH)",
        exe.display()
    )
}

impl Fleet {
    pub async fn start(cfg: &FleetConfig) -> anyhow::Result<Fleet> {
        Self::start_with(cfg, &FleetExtras::default()).await
    }

    pub async fn start_with(cfg: &FleetConfig, extras: &FleetExtras) -> anyhow::Result<Fleet> {
        if cfg.nodes == 0 || cfg.nodes > FLEET_NODES_MAX {
            bail!("starting a fleet: between 1 and {FLEET_NODES_MAX} nodes");
        }
        let (dir, temp) = match &cfg.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("mesh-fleet-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let operator = SecretKey::generate();
        let mut nodes: Vec<FleetNode> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..cfg.nodes {
            let bootstrap = match cfg.topology {
                Topology::Star => nodes.first(),
                Topology::Chain => nodes.last(),
            }
            .map(|n| n.info.listen[0].clone());
            let options = extras.per_node.get(i).cloned().unwrap_or_default();
            let node = start_node(
                cfg,
                &dir,
                i,
                bootstrap,
                &operator,
                deadline,
                options,
                extras.registry.as_deref(),
            )
            .await?;
            nodes.push(node);
        }
        Ok(Fleet {
            nodes,
            operator,
            dir,
            _temp: temp,
            _lab: cfg.lab.clone(),
            registry: extras.registry.clone(),
        })
    }

    /// Whether node `i`'s process is up (started and not killed or exited).
    pub fn is_up(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// If node `i` exited on its own (the harness did not kill it), how.
    pub fn exit_status(&mut self, i: usize) -> Option<String> {
        let c = self.nodes[i].child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// kill -9 node `i` and reap it; its state directory stays.
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts node `i` again (killing it first if it runs) with the same state
    /// directory, mesh address and admin address, its options replaced by `options`
    /// when given, and every other node's address to rejoin through.
    pub async fn restart(&mut self, i: usize, options: Option<NodeOptions>) -> anyhow::Result<()> {
        self.kill9(i).await;
        if let Some(o) = options {
            self.nodes[i].options = o;
        }
        let others: Vec<String> = (0..self.nodes.len())
            .filter(|j| *j != i)
            .filter_map(|j| self.nodes[j].info.listen.first().cloned())
            .collect();
        let node = &mut self.nodes[i];
        let mut argv = node.argv.clone();
        // Keep the addresses the node had: a restarted device keeps its address.
        for (flag, value) in [
            ("--listen", node.info.listen.first().cloned()),
            ("--admin", Some(node.info.admin.clone())),
        ] {
            if let (Some(pos), Some(v)) = (argv.iter().position(|a| a == flag), value) {
                argv[pos + 1] = v;
            }
        }
        for o in others {
            argv.extend(["--bootstrap".to_string(), o]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut child = spawn(&argv, &node.options, log)
            .with_context(|| format!("restarting {}", node.name))?;
        if let (Some(reg), Some(pid)) = (&self.registry, child.id()) {
            reg.add_agent(pid)?;
        }
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        let info =
            mesh::node::wait_for_agent(&node.name, &mut child, &node.state, &node.log, deadline)
                .await?;
        node.child = Some(child);
        node.session = Session::attach_with(&info.admin, &self.operator, Some(info.node))
            .await
            .with_context(|| format!("attaching to {} after its restart", node.name))?;
        node.info = info;
        Ok(())
    }

    /// Sends node `i` a signal by name (STOP, CONT, KILL).
    pub fn signal(&self, i: usize, signal: &str) -> anyhow::Result<()> {
        let out = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.nodes[i].info.pid.to_string())
            .output()
            .context("running kill")?;
        if !out.status.success() {
            bail!(
                "sending SIG{signal} to {}: {}",
                self.nodes[i].name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Waits until every node sees at least `peers` live peers.
    pub async fn wait_connected(&self, peers: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut short = Vec::new();
            for n in &self.nodes {
                if let Response::Status(s) = n.session.request(&Request::Status).await? {
                    if s.peers_alive < peers {
                        short.push(format!("{}:{}", n.name, s.peers_alive));
                    }
                }
            }
            if short.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "waiting for the fleet to connect ({peers} peers each): {}",
                    short.join(" ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Publishes `bytes` as a data release through node `i`; returns its id once the
    /// node has stored it.
    pub async fn publish_data(
        &self,
        i: usize,
        name: &str,
        version: u64,
        bytes: &[u8],
    ) -> anyhow::Result<ContentId> {
        let signed = mesh::cli::publish::sign_release(
            ReleaseKind::Data,
            name,
            version,
            bytes,
            std::slice::from_ref(&self.operator),
            None,
        )?;
        let info = mesh::cli::publish::upload(&self.nodes[i].session, &signed, bytes).await?;
        Ok(info.content)
    }

    /// Whether node `i` holds blob `id` completely.
    pub async fn has(&self, i: usize, id: ContentId) -> anyhow::Result<bool> {
        match self.nodes[i].session.request(&Request::Blob { id }).await? {
            Response::Blob(b) => Ok(b.complete),
            _ => bail!(
                "asking {} for blob {id}: unexpected response",
                self.nodes[i].name
            ),
        }
    }

    /// CPU seconds (user + system) the node processes have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.nodes
            .iter()
            .filter_map(|n| proc_cpu_seconds(n.info.pid))
            .sum()
    }

    /// Resident memory of node `i`, in KiB.
    pub fn rss_kib(&self, i: usize) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.nodes[i].info.pid)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub async fn stop(mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                let _ = c.start_kill();
            }
        }
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                let _ = c.wait().await;
            }
        }
        // The lab network (if any) is removed when the last reference drops, after
        // every process in it has exited.
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_node(
    cfg: &FleetConfig,
    dir: &Path,
    i: usize,
    bootstrap: Option<String>,
    operator: &SecretKey,
    deadline: Instant,
    options: NodeOptions,
    registry: Option<&crate::registry::Registry>,
) -> anyhow::Result<FleetNode> {
    let name = format!("node{i}");
    let state = dir.join(&name);
    std::fs::create_dir_all(&state)?;
    let log = dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log)?;
    let op = operator.public().to_string();
    let (mut argv, listen, admin): (Vec<String>, String, String) = match &cfg.lab {
        None => (
            vec![cfg.mesh_bin.display().to_string()],
            "/ip4/127.0.0.1/udp/0/quic-v1".to_string(),
            "127.0.0.1:0".to_string(),
        ),
        Some(lab) => {
            // `ip netns exec` execs the program, so the child's pid is the agent's.
            let mut argv = lab.exec_prefix(i);
            argv.push(cfg.mesh_bin.display().to_string());
            let addr = lab.addr(i);
            (
                argv,
                format!("/ip4/{addr}/udp/7400/quic-v1"),
                format!("{addr}:7401"),
            )
        }
    };
    argv.extend(
        [
            "agent",
            "--state",
            &state.display().to_string(),
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--release-key",
            &op,
            "--operator",
            &op,
            "--label",
            &format!("name={name}"),
        ]
        .map(String::from),
    );
    argv.extend(cfg.agent_args.iter().cloned());
    let mut first = argv.clone();
    if let Some(b) = bootstrap {
        first.extend(["--bootstrap".to_string(), b]);
    }
    let mut child = spawn(&first, &options, log_file)
        .with_context(|| format!("starting {name} from {}", cfg.mesh_bin.display()))?;
    if let (Some(reg), Some(pid)) = (registry, child.id()) {
        reg.add_agent(pid)?;
    }
    let info = mesh::node::wait_for_agent(&name, &mut child, &state, &log, deadline).await?;
    let session = Session::attach_with(&info.admin, operator, Some(info.node))
        .await
        .with_context(|| format!("attaching to {name}"))?;
    Ok(FleetNode {
        name,
        state,
        log,
        info,
        session,
        child: Some(child),
        argv,
        options,
    })
}

/// Spawns `argv` plus the node's own flags and environment, output to `log`.
fn spawn(argv: &[String], options: &NodeOptions, log: std::fs::File) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .args(&options.args)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    Ok(cmd.spawn()?)
}

/// User plus system CPU seconds of a process, from /proc.
/// Whether process `pid` runs: it exists and is not a zombie waiting to be reaped (what
/// a child that died on its own is until the harness looks at it). Reads `/proc` only,
/// so it can be asked while the node's session is in use.
pub fn proc_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field past the command name, which may contain spaces.
    match stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3)) {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // The kernel reports clock ticks; USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_cpu_time_is_readable() {
        let t = super::proc_cpu_seconds(std::process::id()).unwrap();
        assert!(t >= 0.0);
    }

    #[test]
    fn a_dead_unreaped_child_does_not_count_as_running() {
        assert!(super::proc_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while super::proc_running(pid) {
            assert!(std::time::Instant::now() < deadline, "`true` still runs");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Still a zombie until reaped here.
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
    }
}
