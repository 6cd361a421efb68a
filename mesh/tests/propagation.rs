//! A release published at one node reaches every node, runs there, and reaches a node
//! that was killed while it was published once that node restarts. A node killed and
//! started again at once is heard again, though its peers still hold its dead
//! connection.

mod common;

use common::*;

#[test]
fn publish_propagates_runs_everywhere_and_a_killed_node_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();

    // A chain: node1 knows node0, node2 knows only node1 and must discover node0.
    let n0 = TestNode::start(dir.path(), "node0", &keys, &[]);
    let n1 = TestNode::start(
        dir.path(),
        "node1",
        &keys,
        &["--bootstrap".into(), n0.addr()],
    );
    let mut n2 = TestNode::start(
        dir.path(),
        "node2",
        &keys,
        &["--bootstrap".into(), n1.addr()],
    );
    let nodes = [&n0, &n1];
    wait_until("a full mesh of three", || {
        peers_alive(&n0, key) == 2 && peers_alive(&n1, key) == 2 && peers_alive(&n2, key) == 2
    });

    let wat = hello_wat();
    let wat = wat.to_str().unwrap();
    let out = n0.cli(
        key,
        &[
            "publish",
            "module",
            wat,
            "--name",
            "hello",
            "--version",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("hello v1 running on every node", || {
        nodes.iter().all(|n| runs(n, key, "hello", 1)) && runs(&n2, key, "hello", 1)
    });
    // The module's own log lines come back through the admin endpoint of a far node.
    let logs = n2.json(key, &["logs", "hello"]);
    assert!(
        logs.as_array()
            .unwrap()
            .iter()
            .any(|l| l["text"].as_str().unwrap().contains("hello")),
        "no module log lines on node2: {logs}"
    );
    // Gossiped reports let any node show the whole mesh's modules.
    wait_until(
        "modules --all on node0 shows three nodes running hello",
        || {
            let v = n0.json(key, &["modules", "--all"]);
            let remote = v["mesh"].as_array().unwrap();
            remote.len() == 2
                && remote.iter().all(|n| {
                    n["modules"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|m| m["name"] == "hello")
                })
        },
    );

    // Kill -9 node2: the others notice through ping and connection events.
    let node2_id = n2.info.node.to_string();
    n2.kill9();
    wait_until("node0 and node1 see node2 down", || {
        nodes.iter().all(|n| {
            let peers = n.json(key, &["peers"]);
            peers
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["node"] == node2_id.as_str() && p["state"] == "down")
        })
    });

    // Publish v2 while node2 is down, then bring node2 back on its old address.
    let out = n1.cli(
        key,
        &[
            "publish",
            "module",
            wat,
            "--name",
            "hello",
            "--version",
            "2",
        ],
    );
    assert!(
        out.status.success(),
        "publish v2 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("hello v2 on node0 and node1", || {
        nodes.iter().all(|n| runs(n, key, "hello", 2))
    });
    n2.restart();
    wait_until("restarted node2 rejoins and runs hello v2", || {
        peers_alive(&n2, key) == 2 && runs(&n2, key, "hello", 2)
    });
    // It kept its identity across the restart.
    assert_eq!(n2.info.node.to_string(), node2_id);
}

/// The admin address node0 last heard from node1's gossiped report.
fn reported_admin(n0: &TestNode, key: &std::path::Path, node1: &str) -> Option<String> {
    let peers = n0.json(key, &["peers"]);
    peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node1)
        .and_then(|p| p["admin"].as_str().map(str::to_string))
}

/// node1 is killed and started again at once, with the same identity and address, so
/// its first connection back joins the dead process's connection that node0 still
/// holds. Gossipsub sends its subscriptions only on a peer's first connection, so
/// unless node0 starts the connection over, node1 never learns them and its reports
/// (which carry its new admin port) never reach node0.
#[test]
fn a_node_restarted_at_once_is_heard_again() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let (n0, mut n1) = connected_pair(dir.path(), &keys, &[]);
    let node1 = n1.info.node.to_string();
    wait_until("node0 has node1's report", || {
        reported_admin(&n0, key, &node1).as_deref() == Some(n1.info.admin.as_str())
    });
    for round in 0..2 {
        let before = n1.info.admin.clone();
        n1.restart();
        assert_ne!(n1.info.admin, before, "the admin port is chosen afresh");
        wait_until(
            &format!("node0 hears the restarted node1's report (round {round})"),
            || reported_admin(&n0, key, &node1).as_deref() == Some(n1.info.admin.as_str()),
        );
    }
    assert!(
        n0.log_text()
            .contains("peer restarted while its old connection lingered"),
        "node0 never saw a restart over a lingering connection:\n{}",
        n0.log_text()
    );
}

#[test]
fn demo_check_passes() {
    let out = std::process::Command::new(MESH)
        .args(["demo", "--check", "--timeout", "90"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mesh demo --check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for node in ["node0", "node1", "node2"] {
        assert!(
            stdout.contains(&format!("[{node}] hello v1")),
            "no module line from {node}:\n{stdout}"
        );
    }
}
