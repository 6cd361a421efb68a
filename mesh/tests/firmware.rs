//! Firmware through the mesh into A/B slots, with real agents (and real launchers):
//! the patch path and the full path, a health gate that times out, a fleet that updates
//! its own agent binary through a delta and rolls a broken one back, and power cuts at
//! every step of an agent's self-update.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh_actors::slots::{SlotStore, Step, FAULT_ONCE_ENV, FAULT_POINT_ENV};
use mesh_transport::ContentId;
use rand::{RngCore, SeedableRng};
use serde_json::Value;

fn test_seed() -> u64 {
    let seed = match std::env::var("MESH_TEST_SEED") {
        Ok(s) => s.trim().parse().expect("MESH_TEST_SEED is a u64"),
        Err(_) => rand::random(),
    };
    println!("seed {seed} (replay with MESH_TEST_SEED={seed})");
    seed
}

fn random_bytes(rng: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// A new version of `old`: some bytes changed and a block inserted.
fn next_version(rng: &mut impl RngCore, old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    for _ in 0..16 {
        let at = rng.next_u32() as usize % new.len();
        new[at] = new[at].wrapping_add(1);
    }
    let at = rng.next_u32() as usize % new.len();
    new.splice(at..at, random_bytes(rng, 2048));
    new
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The firmware target `name` in a `mesh firmware --json` node entry.
fn target<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    node["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == name)
}

/// The version of the confirmed image of a record, when idle on it.
fn confirmed_version(t: &Value) -> Option<u64> {
    let r = &t["record"];
    if r["phase"] != "Idle" || r["active"] != r["confirmed"] {
        return None;
    }
    let i = if r["confirmed"] == "a" { 0 } else { 1 };
    r["slots"][i]["version"].as_u64()
}

/// `mesh publish firmware` through the node whose admin endpoint is `admin`.
fn publish_firmware(
    admin: &str,
    key: &Path,
    image: &Path,
    name: &str,
    version: u64,
    bases: &[&Path],
) {
    let version = version.to_string();
    let mut args = vec![
        "publish",
        "firmware",
        image.to_str().unwrap(),
        "--name",
        name,
        "--version",
        &version,
    ];
    for b in bases {
        args.extend(["--delta-from", b.to_str().unwrap()]);
    }
    let out = Command::new(MESH)
        .args(["--node", admin, "--key"])
        .arg(key)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish firmware failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hook_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A config file with one device target `gw` whose hook appends its action, slot and
/// version to `hook_log`.
fn device_config(dir: &Path, node: &str, initial: &Path, extra: &str) -> (Vec<String>, PathBuf) {
    let hook_log = dir.join(format!("{node}-hook.log"));
    let config = dir.join(format!("{node}.toml"));
    std::fs::write(
        &config,
        format!(
            "[[firmware]]\nname = \"gw\"\ninitial_image = {:?}\ngrace_ms = 300\n\
             activate = 'echo $MESH_FIRMWARE_ACTION $MESH_FIRMWARE_SLOT $MESH_FIRMWARE_VERSION >> {}'\n{extra}",
            initial.display().to_string(),
            hook_log.display()
        ),
    )
    .unwrap();
    (
        vec!["--config".to_string(), config.display().to_string()],
        hook_log,
    )
}

/// Two nodes run a listed base and one does not: the first two fetch only the patch
/// (the publisher already holds the whole image), the third the whole image, and all
/// three end up confirmed on the same verified bytes.
#[test]
fn devices_fetch_only_the_patch_when_they_run_a_listed_base() {
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let v0 = random_bytes(&mut rng, 400 * 1024);
    let v1 = next_version(&mut rng, &v0);
    let other = random_bytes(&mut rng, 300 * 1024);
    let v0_path = write(dir.path(), "v0.img", &v0);
    let v1_path = write(dir.path(), "v1.img", &v1);
    let other_path = write(dir.path(), "other.img", &other);

    let (c0, h0) = device_config(dir.path(), "node0", &v0_path, "");
    let n0 = TestNode::start(dir.path(), "node0", &keys, &c0);
    let boot = |extra: Vec<String>| {
        let mut a = extra;
        a.extend(["--bootstrap".to_string(), n0.addr()]);
        a
    };
    let (c1, h1) = device_config(dir.path(), "node1", &v0_path, "");
    let n1 = TestNode::start(dir.path(), "node1", &keys, &boot(c1));
    let (c2, h2) = device_config(dir.path(), "node2", &other_path, "");
    let n2 = TestNode::start(dir.path(), "node2", &keys, &boot(c2));
    wait_until("three connected nodes", || {
        [&n0, &n1, &n2].iter().all(|n| peers_alive(n, key) == 2)
    });

    publish_firmware(&n0.info.admin, key, &v1_path, "gw", 1, &[&v0_path]);
    wait_until("gw v1 confirmed on all three nodes", || {
        [&n0, &n1, &n2].iter().all(|n| {
            let v = n.json(key, &["firmware"]);
            target(&v["local"], "gw").and_then(confirmed_version) == Some(1)
        })
    });
    let source = |n: &TestNode| {
        let v = n.json(key, &["firmware"]);
        target(&v["local"], "gw").unwrap()["record"]["last_install"]["source"].clone()
    };
    assert_eq!(source(&n0), "Full", "the publisher holds the whole image");
    assert!(
        source(&n1)["Patch"]["patch_bytes"].as_u64().unwrap() < v1.len() as u64 / 10,
        "node1 runs the listed base: {}",
        source(&n1)
    );
    assert_eq!(source(&n2), "Full", "node2 runs an unlisted base");
    // node1 never fetched the whole image; node2 did.
    let v1_id = ContentId::of(&v1).to_string();
    let holds = |n: &TestNode| {
        n.json(key, &["blob", &v1_id])["have_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(holds(&n1), 0, "node1 fetched the whole image");
    assert_eq!(holds(&n2), v1.len() as u64);
    for (n, hook) in [(&n0, &h0), (&n1, &h1), (&n2, &h2)] {
        let slot = n.state.join("firmware/gw/slot-b");
        assert_eq!(std::fs::read(&slot).unwrap(), v1, "{}: slot b", n.name);
        assert_eq!(hook_lines(hook), vec!["activate b 1"], "{}", n.name);
        let (store, _) = SlotStore::open(&n.state.join("firmware/gw"), 0o644).unwrap();
        store.check().unwrap();
    }
    // `--all` shows the other two nodes' slots, asked over the mesh.
    let all = n0.json(key, &["firmware", "--all"]);
    let mesh = all["mesh"].as_array().unwrap();
    assert_eq!(mesh.len(), 2, "{all}");
    for n in mesh {
        assert_eq!(target(n, "gw").and_then(confirmed_version), Some(1), "{n}");
    }
}

/// A new image whose health command keeps failing is switched away from at its
/// deadline: the hook runs again for the confirmed slot, the failure is recorded (the
/// release is not tried again) and reported to the other nodes over gossip.
#[test]
fn a_health_gate_that_times_out_rolls_back_and_is_reported() {
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let v0 = random_bytes(&mut rng, 64 * 1024);
    let v1 = next_version(&mut rng, &v0);
    let v0_path = write(dir.path(), "v0.img", &v0);
    let v1_path = write(dir.path(), "v1.img", &v1);
    let (c0, hook) = device_config(
        dir.path(),
        "node0",
        &v0_path,
        "health = 'echo the new image is unwell >&2; exit 3'\ndeadline_ms = 3000\n",
    );
    let n0 = TestNode::start(dir.path(), "node0", &keys, &c0);
    let n1 = TestNode::start(
        dir.path(),
        "node1",
        &keys,
        &["--bootstrap".to_string(), n0.addr()],
    );
    wait_until("two connected nodes", || {
        peers_alive(&n0, key) == 1 && peers_alive(&n1, key) == 1
    });
    publish_firmware(&n0.info.admin, key, &v1_path, "gw", 1, &[&v0_path]);
    wait_until("gw v1 rolled back on node0", || {
        let v = n0.json(key, &["firmware"]);
        let t = target(&v["local"], "gw").unwrap();
        t["record"]["last_rollback"]["from"]["version"] == 1 && confirmed_version(t) == Some(0)
    });
    let v = n0.json(key, &["firmware"]);
    let reason = target(&v["local"], "gw").unwrap()["record"]["last_rollback"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("health check failed"), "{reason}");
    assert!(
        reason.contains("exit status: 3") || reason.contains("exit status 3"),
        "{reason}"
    );
    assert!(reason.contains("unwell"), "{reason}");
    assert_eq!(hook_lines(&hook), vec!["activate b 1", "rollback a 0"]);
    wait_until("node0's report on node1", || {
        let v = n1.json(key, &["firmware"]);
        v["failures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["report"]["target"] == "gw" && f["report"]["version"] == 1)
    });
    // The failed release is not installed again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hook_lines(&hook).len(), 2, "{:?}", hook_lines(&hook));
    let v = n0.json(key, &["firmware"]);
    let t = target(&v["local"], "gw").unwrap();
    assert_eq!(confirmed_version(t), Some(0), "{t}");
    assert!(t["wanted"].is_null(), "{t}");
}

// ---- The agent's own binary, under `mesh launcher`. ----

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A launcher and the agents it starts, in a process group of their own.
struct Launched {
    name: String,
    state: PathBuf,
    admin: String,
    listen: String,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Launched {
    fn start(
        dir: &Path,
        name: &str,
        keys: &Keys,
        image: &Path,
        launcher_flags: &[&str],
        bootstrap: Option<&str>,
        env: &[(&str, String)],
    ) -> Launched {
        let state = dir.join(name);
        let admin = format!("127.0.0.1:{}", free_port());
        let listen = format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_port());
        let mut args: Vec<String> = vec![
            "launcher".into(),
            "--state".into(),
            state.display().to_string(),
            "--agent-image".into(),
            image.display().to_string(),
            "--grace-ms".into(),
            "1000".into(),
            "--deadline-ms".into(),
            "30000".into(),
        ];
        args.extend(launcher_flags.iter().map(|s| s.to_string()));
        args.extend([
            "--".into(),
            "--listen".into(),
            listen.clone(),
            "--admin".into(),
            admin.clone(),
            "--release-key".into(),
            keys.operator_pub.clone(),
            "--operator".into(),
            keys.operator_pub.clone(),
            "--label".into(),
            format!("name={name}"),
        ]);
        if let Some(b) = bootstrap {
            args.extend(["--bootstrap".into(), b.to_string()]);
        }
        let mut l = Launched {
            name: name.into(),
            state,
            admin,
            listen,
            log: dir.join(format!("{name}.log")),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            child: None,
        };
        l.spawn();
        l
    }

    fn spawn(&mut self) {
        let child = mesh_command(&self.args, &self.log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .spawn()
            .expect("starting mesh launcher");
        self.child = Some(child);
    }

    /// The launcher's exit, if it has exited (it does at a fault point of its own).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Kills the launcher and its agent at once, as a power cut would.
    fn kill_all(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The group is gone already when the launcher died at a fault point.
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{}", c.id())])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_json(&self, key: &Path, args: &[&str]) -> Option<Value> {
        let out = Command::new(MESH)
            .args(["--node", &self.admin, "--key"])
            .arg(key)
            .arg("--json")
            .args(args)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn agent(&self, key: &Path) -> Option<Value> {
        let v = self.try_json(key, &["firmware"])?;
        target(&v["local"], "agent").cloned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn slots(&self) -> PathBuf {
        self.state.join("firmware/agent")
    }
}

/// Like `wait_until`, with every node's slot record and log in the failure message.
fn wait_fleet(what: &str, nodes: &[&Launched], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        if Instant::now() > deadline {
            let mut report = String::new();
            for n in nodes {
                report.push_str(&format!(
                    "\n--- {}: {:?}\n{}",
                    n.name,
                    SlotStore::load(&n.slots()),
                    n.log_text()
                ));
            }
            panic!("timed out waiting for {what}:{report}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// An agent "binary": a script that runs the real agent, padded past the slot writer's
/// buffer so that a cut mid-write leaves a partial slot. (A debug `mesh` binary is half
/// a gigabyte; the slots, the launcher and the delta path are the same for any size.)
fn agent_image(dir: &Path, tag: &str) -> PathBuf {
    let mut text = format!("#!/bin/sh\n# agent {tag}\nexec {MESH} \"$@\"\n");
    let mut i = 0;
    while text.len() < 320 * 1024 {
        text.push_str(&format!("# padding line {i} of agent image {tag}\n"));
        i += 1;
    }
    write(dir, &format!("agent-{tag}.sh"), text.as_bytes())
}

/// Three nodes under launchers update their own agent binary through a delta, then
/// reject a broken one (a script that exits 1): each launcher counts its failed starts
/// and switches back, and each node reports the failure.
#[test]
fn a_fleet_updates_its_agent_through_a_delta_and_rolls_back_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let v0 = agent_image(dir.path(), "v0");
    let v1 = agent_image(dir.path(), "v1");
    let broken = write(
        dir.path(),
        "broken.sh",
        b"#!/bin/sh\necho this agent is broken >&2\nexit 1\n",
    );
    let n0 = Launched::start(dir.path(), "node0", &keys, &v0, &[], None, &[]);
    let n1 = Launched::start(dir.path(), "node1", &keys, &v0, &[], Some(&n0.listen), &[]);
    let n2 = Launched::start(dir.path(), "node2", &keys, &v0, &[], Some(&n0.listen), &[]);
    let nodes = [&n0, &n1, &n2];
    // node1 and node2 know only node0 (they may not find each other for a while, and
    // need not: everything reaches them through node0).
    wait_fleet("three agents on v0, connected to node0", &nodes, || {
        nodes
            .iter()
            .all(|n| n.agent(key).and_then(|t| confirmed_version(&t)) == Some(0))
            && n0
                .try_json(key, &["status"])
                .is_some_and(|s| s["peers_alive"] == 2)
    });
    publish_firmware(&n0.admin, key, &v1, "agent", 1, &[&v0]);
    wait_fleet("every agent confirmed on v1", &nodes, || {
        nodes
            .iter()
            .all(|n| n.agent(key).and_then(|t| confirmed_version(&t)) == Some(1))
    });
    for n in [&n1, &n2] {
        let t = n.agent(key).unwrap();
        let source = &t["record"]["last_install"]["source"];
        assert!(source["Patch"].is_object(), "{}: {source}", n.name);
        let slot = n
            .slots()
            .join(format!("slot-{}", t["record"]["active"].as_str().unwrap()));
        assert_eq!(std::fs::read(slot).unwrap(), std::fs::read(&v1).unwrap());
    }

    publish_firmware(&n0.admin, key, &broken, "agent", 2, &[&v1]);
    wait_fleet("every agent back on v1 after the broken v2", &nodes, || {
        for n in nodes {
            if let Ok(r) = SlotStore::load(&n.slots()) {
                let confirmed = r.confirmed_image().map(|i| i.version);
                assert_ne!(
                    confirmed,
                    Some(2),
                    "{}: the broken binary was confirmed",
                    n.name
                );
            }
        }
        nodes.iter().all(|n| {
            n.agent(key).is_some_and(|t| {
                confirmed_version(&t) == Some(1)
                    && t["record"]["last_rollback"]["from"]["version"] == 2
            })
        })
    });
    for n in nodes {
        let t = n.agent(key).unwrap();
        let reason = t["record"]["last_rollback"]["reason"].as_str().unwrap();
        assert!(reason.contains("booted 3 time(s)"), "{}: {reason}", n.name);
        assert!(reason.contains("exit status: 1"), "{}: {reason}", n.name);
        assert_eq!(
            n.log_text()
                .matches("the new agent exited before it was confirmed")
                .count(),
            3,
            "{}: three failed starts",
            n.name
        );
        let (store, _) = SlotStore::open(&n.slots(), 0o755).unwrap();
        store.check().unwrap();
    }
    // Each node sent its failure report (its record says so once the gossip went out;
    // the device test checks that a report arrives), and `--all` on node0 shows the
    // whole fleet back on v1, asked over the mesh.
    wait_fleet(
        "every failure reported and the fleet on v1 in --all",
        &nodes,
        || {
            let reported = nodes.iter().all(|n| {
                n.agent(key)
                    .is_some_and(|t| t["record"]["last_rollback"]["reported"] == true)
            });
            let Some(v) = n0.try_json(key, &["firmware", "--all"]) else {
                return false;
            };
            let on_v1 = v["mesh"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| target(n, "agent").and_then(confirmed_version) == Some(1))
                .count();
            reported && on_v1 == 2
        },
    );
}

/// An agent's self-update with a power cut (abort) at every step, each once: install
/// mid-write, pending, activation and confirmation during the first update; install
/// verified, activation and the launcher's boot during the second. After every cut the
/// slots are consistent and the active slot holds the image its record names; each
/// update ends confirmed.
#[test]
fn an_agent_update_survives_a_power_cut_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let v0 = agent_image(dir.path(), "v0");
    let v1 = agent_image(dir.path(), "v1");
    let v2 = agent_image(dir.path(), "v2");
    let once = dir.path().join("faults");
    std::fs::create_dir(&once).unwrap();
    let all: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
    let first = ["install-writing", "pending-marked", "confirm"];
    let second = ["install-verified", "activate", "boot"];
    // A marker disarms its step; the second group waits for the second update.
    for step in second {
        std::fs::write(once.join(step), b"").unwrap();
    }
    let env = [
        (FAULT_POINT_ENV, all.join(",")),
        (FAULT_ONCE_ENV, once.display().to_string()),
    ];
    let mut n0 = Launched::start(
        dir.path(),
        "node0",
        &keys,
        &v0,
        &["--boot-attempts", "5"],
        None,
        &env,
    );
    let mut relaunches = 0;
    // Waits for `done`, checking the slots all along and starting the launcher again
    // whenever a cut took it down.
    let mut run_until = |n0: &mut Launched, what: &str, done: &dyn Fn(&Launched) -> bool| {
        let deadline = Instant::now() + WAIT;
        while !done(n0) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                n0.log_text()
            );
            check_slots_live(&n0.slots());
            if let Some(status) = n0.exited() {
                n0.kill_all();
                let (store, recovery) = SlotStore::open(&n0.slots(), 0o755).unwrap();
                store
                    .check()
                    .unwrap_or_else(|e| panic!("after the launcher died ({status}): {e}"));
                println!(
                    "launcher died ({status}); after restart: {recovery:?}, {:?}",
                    store.record().phase
                );
                drop(store);
                relaunches += 1;
                n0.spawn();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    run_until(&mut n0, "the agent on v0", &|n| {
        n.agent(key).and_then(|t| confirmed_version(&t)) == Some(0)
    });
    let admin = n0.admin.clone();
    publish_firmware(&admin, key, &v1, "agent", 1, &[&v0]);
    run_until(&mut n0, "v1 confirmed", &|n| {
        n.agent(key).and_then(|t| confirmed_version(&t)) == Some(1)
    });
    for step in first {
        assert!(once.join(step).exists(), "the cut at {step} did not happen");
    }
    for step in second {
        std::fs::remove_file(once.join(step)).unwrap();
    }
    publish_firmware(&admin, key, &v2, "agent", 2, &[&v1]);
    run_until(&mut n0, "v2 confirmed", &|n| {
        n.agent(key).and_then(|t| confirmed_version(&t)) == Some(2)
    });
    for step in all {
        assert!(once.join(step).exists(), "the cut at {step} did not happen");
    }
    let log = n0.log_text();
    let aborts: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("fault point "))
        .collect();
    assert_eq!(aborts.len(), 6, "one abort per step: {aborts:?}");
    assert!(relaunches >= 1, "the cut at boot takes the launcher down");
    let (store, _) = SlotStore::open(&n0.slots(), 0o755).unwrap();
    store.check().unwrap();
    assert!(
        store.record().last_rollback.is_none(),
        "no cut caused a rollback"
    );
}

/// Checks, while the agent and launcher run, that the record on disk is consistent and
/// that the active and confirmed slots hold the images it names. The record may change
/// while the files are read, so a mismatch counts only if the record did not.
fn check_slots_live(dir: &Path) {
    let Ok(before) = SlotStore::load(dir) else {
        return;
    };
    before.check().unwrap();
    for slot in [before.active, before.confirmed] {
        let image = before.image(slot).unwrap();
        let path = dir.join(format!("slot-{}", slot.name()));
        let (content, size) = mesh_actors::slots::hash_file(&path).unwrap();
        let unchanged = SlotStore::load(dir).is_ok_and(|after| after == before);
        if unchanged {
            assert_eq!(
                (content, size),
                (image.content, image.size),
                "slot {slot} does not hold what the record says: {before:?}"
            );
        }
    }
}
