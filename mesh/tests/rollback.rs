//! A new module version that keeps failing is rolled back to the previous one on every
//! node, and each node's failure report reaches the others over gossip and is still known
//! after a restart.

mod common;

use common::*;

#[test]
fn failing_release_rolls_back_and_the_failure_report_reaches_other_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    // Fast ticks and a budget of one restart, so the bad version gives up in a second.
    let config = dir.path().join("mesh.toml");
    std::fs::write(
        &config,
        "[sandbox]\ntick_ms = 50\n[restart]\nintensity = 1\nperiod_ms = 60000\n\
         backoff_initial_ms = 50\nbackoff_max_ms = 100\n",
    )
    .unwrap();
    let with_config = |extra: &[String]| {
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        args.extend(extra.iter().cloned());
        args
    };
    let mut n0 = TestNode::start(dir.path(), "node0", &keys, &with_config(&[]));
    let mut n1 = TestNode::start(
        dir.path(),
        "node1",
        &keys,
        &with_config(&["--bootstrap".into(), n0.addr()]),
    );
    wait_until("two connected nodes", || {
        peers_alive(&n0, key) == 1 && peers_alive(&n1, key) == 1
    });

    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/modules");
    let publish = |file: &str, version: &str| {
        let path = examples.join(file);
        let out = n0.cli(
            key,
            &[
                "publish",
                "module",
                path.to_str().unwrap(),
                "--name",
                "app",
                "--version",
                version,
            ],
        );
        assert!(
            out.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    publish("hello.wat", "1");
    wait_until("app v1 running on both nodes", || {
        runs(&n0, key, "app", 1) && runs(&n1, key, "app", 1)
    });
    // Version 2 starts (its init works) and traps on every tick.
    publish("trap.wat", "2");
    wait_until("app rolled back to v1 on both nodes", || {
        [&n0, &n1].iter().all(|n| {
            let v = n.json(key, &["modules"]);
            v["local"]["modules"].as_array().unwrap().iter().any(|m| {
                m["name"] == "app"
                    && m["version"] == 1
                    && m["state"] == "Running"
                    && m["rolled_back_from"]["version"] == 2
            })
        })
    });
    // node1 shows node0's failure report, received over gossip.
    let n0_key = n0.json(key, &["status"])["node"]
        .as_str()
        .unwrap()
        .to_string();
    let has_n0_report = |n: &TestNode| {
        let v = n.json(key, &["modules", "--all"]);
        v["failures"].as_array().unwrap().iter().any(|f| {
            let reporter = f["reporter"].as_str().unwrap();
            n0_key.starts_with(reporter)
                && f["report"]["name"] == "app"
                && f["report"]["version"] == 2
                && f["report"]["rolled_back_to"] == 1
                && f["report"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("unreachable")
        })
    };
    wait_until("node0's failure report on node1", || has_n0_report(&n1));
    // The table view says it too.
    let out = n1.cli(key, &["modules", "--all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAILED RELEASES"), "{text}");
    assert!(text.contains("rolled back to v1"), "{text}");

    // node1 restarts alone (node0 is gone, so nothing can gossip the report again) and
    // still knows about node0's failed release: it was kept in its database.
    n0.kill9();
    n1.restart();
    wait_until("node0's failure report on node1 after its restart", || {
        has_n0_report(&n1)
    });
}
