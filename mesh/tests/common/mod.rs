//! Real `mesh agent` processes on loopback, driven through the real `mesh` CLI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh::node::RunInfo;
use mesh_transport::SecretKey;

pub const MESH: &str = env!("CARGO_BIN_EXE_mesh");

/// Generous: debug builds on a loaded 2-core machine are slow, and a test that waits
/// longer only costs time when it is already failing.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Keys {
    pub dir: PathBuf,
    pub operator: PathBuf,
    pub operator_pub: String,
}

impl Keys {
    pub fn new(dir: &Path) -> Keys {
        let operator = dir.join("operator.key");
        let key = SecretKey::generate();
        key.save(&operator).unwrap();
        Keys {
            dir: dir.to_path_buf(),
            operator,
            operator_pub: key.public().to_string(),
        }
    }

    pub fn extra(&self, name: &str) -> (PathBuf, SecretKey) {
        let path = self.dir.join(format!("{name}.key"));
        let key = SecretKey::generate();
        key.save(&path).unwrap();
        (path, key)
    }
}

pub struct TestNode {
    pub name: String,
    pub state: PathBuf,
    pub log: PathBuf,
    pub info: RunInfo,
    args: Vec<String>,
    child: Option<Child>,
}

impl TestNode {
    /// Starts a node trusting the operator key for both releases and attaching.
    pub fn start(dir: &Path, name: &str, keys: &Keys, extra: &[String]) -> TestNode {
        let state = dir.join(name);
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--state".into(),
            state.display().to_string(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--release-key".into(),
            keys.operator_pub.clone(),
            "--operator".into(),
            keys.operator_pub.clone(),
            "--label".into(),
            format!("name={name}"),
        ];
        if !extra.iter().any(|a| a == "--listen") {
            args.extend(["--listen".into(), "/ip4/127.0.0.1/udp/0/quic-v1".into()]);
        }
        args.extend(extra.iter().cloned());
        let log = dir.join(format!("{name}.log"));
        let mut node = TestNode {
            name: name.into(),
            state,
            log,
            info: RunInfo {
                node: SecretKey::from_seed([0; 32]).public(),
                peer_id: String::new(),
                pid: 0,
                listen: vec![],
                admin: String::new(),
            },
            args,
            child: None,
        };
        node.spawn();
        // Restarts keep the mesh address, as a device's would.
        let listen = node.info.listen[0].clone();
        if let Some(i) = node.args.iter().position(|a| a == "--listen") {
            node.args[i + 1] = listen;
        }
        node
    }

    fn spawn(&mut self) {
        let child = mesh_command(&self.args, &self.log)
            .spawn()
            .expect("starting mesh agent");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(info) = RunInfo::read(&self.state) {
                if info.pid == pid {
                    self.info = info;
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited with {status}:\n{}", self.name, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> String {
        self.info.listen[0].clone()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, key: &Path, args: &[&str]) -> Output {
        Command::new(MESH)
            .args(["--node", &self.info.admin, "--key"])
            .arg(key)
            .args(args)
            .output()
            .expect("running the mesh cli")
    }

    /// Runs the CLI with `--json` and parses its output; panics with stderr on failure.
    pub fn json(&self, key: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(key, &all);
        assert!(
            out.status.success(),
            "mesh {args:?} on {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("cli printed json")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns true or `WAIT` passes.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The modules a node runs, as (name, version, state) from `mesh modules --json`.
pub fn modules(node: &TestNode, key: &Path) -> Vec<(String, u64, String)> {
    let v = node.json(key, &["modules"]);
    v["local"]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let state = match &m["state"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (
                m["name"].as_str().unwrap().to_string(),
                m["version"].as_u64().unwrap(),
                state,
            )
        })
        .collect()
}

pub fn runs(node: &TestNode, key: &Path, name: &str, version: u64) -> bool {
    modules(node, key)
        .iter()
        .any(|(n, v, s)| n == name && *v == version && s == "Running")
}

pub fn peers_alive(node: &TestNode, key: &Path) -> usize {
    node.json(key, &["status"])["peers_alive"].as_u64().unwrap() as usize
}

/// The `mesh` binary with `args`, no stdin, and its output appended to `log`.
pub fn mesh_command(args: &[String], log: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(MESH);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    command
}

/// Starts node0, then node1 bootstrapped to it with `extra` arguments, and waits until
/// node1 sees node0.
pub fn connected_pair(dir: &Path, keys: &Keys, extra: &[String]) -> (TestNode, TestNode) {
    let n0 = TestNode::start(dir, "node0", keys, &[]);
    let mut args = vec!["--bootstrap".to_string(), n0.addr()];
    args.extend_from_slice(extra);
    let n1 = TestNode::start(dir, "node1", keys, &args);
    wait_until("connected", || {
        peers_alive(&n1, keys.operator.as_path()) == 1
    });
    (n0, n1)
}

pub fn hello_wat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/modules/hello.wat")
}
