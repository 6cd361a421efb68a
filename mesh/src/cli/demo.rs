//! `mesh demo`: a local mesh of real `mesh agent` processes on loopback, an example
//! module published through the CLI path, and its log lines read back from every node.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use mesh_actors::manifest::ReleaseKind;
use mesh_actors::sandbox_supervisor::ModuleState;
use mesh_transport::{PublicKey, SecretKey};
use tokio::process::{Child, Command};

use super::client::Session;
use super::Cli;
use crate::node::RunInfo;
use crate::proto::{Request, Response};

/// The module the demo publishes unless `--module` names another.
const HELLO_WAT: &str = include_str!("../../../examples/modules/hello.wat");
/// More nodes than this on one machine is a benchmark, not a demo.
const DEMO_NODES_MAX: usize = 16;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Check that the module runs on every node, then exit (0 on success).
    #[arg(long)]
    check: bool,
    /// How many nodes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The module to publish (WAT or wasm); default: examples/modules/hello.wat.
    #[arg(long)]
    module: Option<PathBuf>,
    /// Keep the nodes' state here instead of in a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds to wait for the mesh to form and the module to run everywhere.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

struct DemoNode {
    name: String,
    log: PathBuf,
    child: Child,
    info: RunInfo,
}

pub async fn run(_cli: &Cli, args: &DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > DEMO_NODES_MAX {
        bail!("starting the demo: --nodes must be between 1 and {DEMO_NODES_MAX}");
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("mesh-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let (module_name, module_bytes) = match &args.module {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("module");
            (stem.to_lowercase(), bytes)
        }
        None => ("hello".to_string(), HELLO_WAT.as_bytes().to_vec()),
    };

    let operator_path = dir.join("operator.key");
    let operator = SecretKey::generate();
    operator
        .save(&operator_path)
        .context("writing the demo operator key")?;
    println!("demo directory {}", dir.display());
    println!(
        "operator and release key {} ({})",
        operator_path.display(),
        operator.public().short()
    );

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut nodes: Vec<DemoNode> = Vec::new();
    let result = async {
        for i in 0..args.nodes {
            // Each node joins through the one started before it, so the last node knows
            // only one address and must discover the rest of the mesh itself.
            let bootstrap = nodes.last().map(|n: &DemoNode| n.info.listen[0].clone());
            let node = start_node(&dir, i, bootstrap, operator.public(), deadline).await?;
            println!(
                "started {} pid {} mesh {} admin {}",
                node.name, node.info.pid, node.info.listen[0], node.info.admin
            );
            nodes.push(node);
        }
        let sessions = attach_all(&nodes, &operator).await?;
        wait_for_mesh(&nodes, &sessions, deadline).await?;
        println!("mesh formed: every node sees {} alive peer(s)", args.nodes - 1);

        let signed = super::publish::sign_release(
            ReleaseKind::Module,
            &module_name,
            1,
            &module_bytes,
            std::slice::from_ref(&operator),
            None,
        )?;
        let info = super::publish::upload(&sessions[0], &signed, &module_bytes)
            .await
            .with_context(|| format!("publishing {module_name} to {}", nodes[0].name))?;
        println!(
            "published {} v{} (blake3 {}) to {}",
            info.name,
            info.version,
            info.content.short(),
            nodes[0].name
        );
        let mut last_printed = wait_for_module(&nodes, &sessions, &module_name, deadline).await?;
        println!(
            "ok: {module_name} v1 runs on all {} nodes (every node fetched, verified and started it)",
            nodes.len()
        );
        if !args.check {
            println!(
                "\ntry: mesh --node {} --key {} peers   (Ctrl-C stops the demo)\n",
                nodes[0].info.admin,
                operator_path.display()
            );
            follow_logs(&nodes, &sessions, &mut last_printed).await;
        }
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        for n in &nodes {
            print_log_tail(n);
        }
    }
    for n in &mut nodes {
        let _ = n.child.start_kill();
        let _ = n.child.wait().await;
    }
    result
}

async fn start_node(
    dir: &Path,
    i: usize,
    bootstrap: Option<String>,
    operator: PublicKey,
    deadline: Instant,
) -> anyhow::Result<DemoNode> {
    let name = format!("node{i}");
    let state = dir.join(&name);
    std::fs::create_dir_all(&state)?;
    let log = dir.join(format!("{name}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the mesh binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("--state")
        .arg(&state)
        .args([
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--release-key",
            &operator.to_string(),
            "--operator",
            &operator.to_string(),
        ])
        .args(["--label", &format!("name={name}"), "--label", "site=demo"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true);
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", &b]);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let info = crate::node::wait_for_agent(&name, &mut child, &state, &log, deadline).await?;
    Ok(DemoNode {
        name,
        log,
        child,
        info,
    })
}

async fn attach_all(nodes: &[DemoNode], operator: &SecretKey) -> anyhow::Result<Vec<Session>> {
    let mut sessions = Vec::new();
    for n in nodes {
        // The node's key from run.json pins the session to that exact node.
        let s = Session::attach_with(&n.info.admin, operator, Some(n.info.node))
            .await
            .with_context(|| format!("attaching to {}", n.name))?;
        sessions.push(s);
    }
    Ok(sessions)
}

async fn wait_for_mesh(
    nodes: &[DemoNode],
    sessions: &[Session],
    deadline: Instant,
) -> anyhow::Result<()> {
    let want = nodes.len() - 1;
    loop {
        let mut missing = Vec::new();
        for (n, s) in nodes.iter().zip(sessions) {
            if let Response::Status(st) = s.request(&Request::Status).await? {
                if st.peers_alive < want {
                    missing.push(format!("{} sees {} of {want}", n.name, st.peers_alive));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("forming the mesh: {}", missing.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the module runs and has logged on every node, printing its lines as they
/// come; returns the time of the last line printed per node.
async fn wait_for_module(
    nodes: &[DemoNode],
    sessions: &[Session],
    module: &str,
    deadline: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut last = vec![0u64; nodes.len()];
    loop {
        let mut missing = Vec::new();
        for (i, (n, s)) in nodes.iter().zip(sessions).enumerate() {
            let running =
                match s.request(&Request::Modules { all: false }).await? {
                    Response::Modules(m) => m.local.modules.iter().any(|m| {
                        m.name == module && m.version == 1 && m.state == ModuleState::Running
                    }),
                    _ => false,
                };
            print_new_logs(n, s, &mut last[i]).await?;
            if !running || last[i] == 0 {
                missing.push(n.name.clone());
            }
        }
        if missing.is_empty() {
            return Ok(last);
        }
        if Instant::now() > deadline {
            bail!(
                "waiting for {module} to run and log on every node: not yet on {}",
                missing.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Prints log lines newer than `last_ms`; returns how many were printed.
async fn print_new_logs(n: &DemoNode, s: &Session, last_ms: &mut u64) -> anyhow::Result<usize> {
    let Response::Logs(lines) = s
        .request(&Request::Logs {
            module: None,
            limit: 100,
        })
        .await?
    else {
        return Ok(0);
    };
    let mut printed = 0;
    for l in lines.iter().filter(|l| l.unix_ms > *last_ms) {
        println!("[{}] {} v{}: {}", n.name, l.module, l.version, l.text);
        printed += 1;
    }
    if let Some(l) = lines.last() {
        *last_ms = (*last_ms).max(l.unix_ms);
    }
    Ok(printed)
}

async fn follow_logs(nodes: &[DemoNode], sessions: &[Session], last: &mut [u64]) {
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!("stopping the demo");
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, (n, s)) in nodes.iter().zip(sessions).enumerate() {
                    if let Err(e) = print_new_logs(n, s, &mut last[i]).await {
                        println!("[{}] {e:#}", n.name);
                    }
                }
            }
        }
    }
}

fn print_log_tail(n: &DemoNode) {
    let text = std::fs::read_to_string(&n.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(30);
    eprintln!("--- last lines of {} ({}) ---", n.name, n.log.display());
    for l in &lines[start..] {
        eprintln!("{l}");
    }
}
