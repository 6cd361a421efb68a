//! Content distribution between real nodes: several providers at once, a provider that
//! vanishes, a restart in the middle of a download, a lying peer, a full store and the
//! download rate cap.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mesh_transport::swarm::{self, BlobRequest, BlobResponse, NetEvent, SwarmConfig};
use mesh_transport::{ContentId, SecretKey};
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1024 * 1024;

fn blob(seed: u64, size: u64) -> Vec<u8> {
    println!("blob seed={seed} size={size}");
    let mut b = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut b);
    b
}

fn publish_data(
    node: &TestNode,
    key: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    bytes: &[u8],
) -> ContentId {
    let path = dir.join(format!("{name}.bin"));
    std::fs::write(&path, bytes).unwrap();
    let out = node.cli(
        key,
        &[
            "publish",
            "data",
            path.to_str().unwrap(),
            "--name",
            name,
            "--version",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ContentId::of(bytes)
}

fn has_blob(node: &TestNode, key: &std::path::Path, id: &ContentId) -> bool {
    let v = node.json(key, &["blob", &id.to_string()]);
    v["complete"].as_bool().unwrap_or(false)
}

fn log_lines_with(node: &TestNode, needle: &str) -> Vec<String> {
    node.log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

#[test]
fn download_uses_several_providers_and_survives_one_vanishing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let n0 = TestNode::start(dir.path(), "node0", &keys, &[]);
    let mut n1 = TestNode::start(
        dir.path(),
        "node1",
        &keys,
        &["--bootstrap".into(), n0.addr()],
    );
    let n2 = TestNode::start(
        dir.path(),
        "node2",
        &keys,
        &["--bootstrap".into(), n0.addr()],
    );
    wait_until("three connected", || {
        peers_alive(&n0, key) == 2 && peers_alive(&n2, key) == 2
    });
    let bytes = blob(7, 24 * MIB);
    let id = publish_data(&n0, key, dir.path(), "model", &bytes);
    wait_until("node1 and node2 hold the blob", || {
        has_blob(&n1, key, &id) && has_blob(&n2, key, &id)
    });

    // A late joiner with a capped download rate, so the transfer is still running
    // when one of its providers is killed.
    let n3 = TestNode::start(
        dir.path(),
        "node3",
        &keys,
        &[
            "--bootstrap".into(),
            n0.addr(),
            "--download-bytes-per-s".into(),
            (6 * MIB).to_string(),
        ],
    );
    wait_until("node3 starts downloading", || {
        let t = n3.json(key, &["transfers"]);
        t.as_array().is_some_and(|a| !a.is_empty()) || has_blob(&n3, key, &id)
    });
    std::thread::sleep(Duration::from_secs(1));
    n1.kill9();
    wait_until("node3 completes from the remaining providers", || {
        has_blob(&n3, key, &id)
    });
    let done = log_lines_with(&n3, "download complete");
    assert!(!done.is_empty(), "no completion line:\n{}", n3.log_text());
    // The completion line lists contributors as short-key:groups; more than one peer
    // delivered.
    let from = done[0].split("from=").nth(1).unwrap_or_default();
    assert!(
        from.split(',').count() >= 2,
        "only one provider contributed: {}",
        done[0]
    );
}

#[test]
fn a_download_resumes_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let (n0, mut n1) = connected_pair(
        dir.path(),
        &keys,
        &["--download-bytes-per-s".into(), (3 * MIB).to_string()],
    );
    let bytes = blob(11, 16 * MIB);
    let id = publish_data(&n0, key, dir.path(), "big", &bytes);
    // Wait until some of it arrived (and was checkpointed), then cut the power.
    wait_until("part of the blob arrived", || {
        let t = n1.json(key, &["transfers"]);
        t.as_array()
            .and_then(|a| a.first())
            .is_some_and(|t| t["have_bytes"].as_u64().unwrap_or(0) >= 4 * MIB)
    });
    std::thread::sleep(Duration::from_millis(1500));
    n1.kill9();
    assert!(
        !has_blob_file(&n1, &id),
        "a partial download counted as a blob"
    );
    n1.restart();
    wait_until("the restarted node completes the blob", || {
        has_blob(&n1, key, &id)
    });
    let resumed = log_lines_with(&n1, "resuming download");
    assert!(
        !resumed.is_empty(),
        "the download started over:\n{}",
        n1.log_text()
    );
    // The completed blob is the published one, byte for byte.
    let path = blob_file(&n1, &id);
    assert_eq!(ContentId::of(&std::fs::read(path).unwrap()), id);
}

/// Bit rot in a stored blob: the node's scrub finds it, quarantines the file, and
/// fetches the blob again from its peer, keeping the groups that still verify.
#[test]
fn a_blob_damaged_on_disk_is_quarantined_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let (n0, n1) = connected_pair(dir.path(), &keys, &[]);
    let bytes = blob(12, 3 * MIB);
    let id = publish_data(&n0, key, dir.path(), "rot", &bytes);
    wait_until("node1 holds the blob", || has_blob(&n1, key, &id));
    let path = blob_file(&n1, &id);
    let mut damaged = std::fs::read(&path).unwrap();
    damaged[(MIB + 12345) as usize] ^= 0x10;
    std::fs::write(&path, &damaged).unwrap();
    wait_until("node1 quarantined the damaged file", || {
        n1.state
            .join("store/quarantine")
            .join(id.to_string())
            .exists()
    });
    wait_until("node1 holds the verified blob again", || {
        has_blob(&n1, key, &id) && std::fs::read(&path).is_ok_and(|b| ContentId::of(&b) == id)
    });
    let quarantined =
        std::fs::read(n1.state.join("store/quarantine").join(id.to_string())).unwrap();
    assert_eq!(
        quarantined, damaged,
        "the quarantined file is the damaged one"
    );
    assert!(
        !log_lines_with(&n1, "resuming download").is_empty(),
        "the repair fetched the whole blob instead of the damaged groups:\n{}",
        n1.log_text()
    );
}

/// Where a node keeps a complete blob.
fn blob_file(node: &TestNode, id: &ContentId) -> std::path::PathBuf {
    node.state
        .join("store/blobs")
        .join(&id.to_string()[..2])
        .join(id.to_string())
}

fn has_blob_file(node: &TestNode, id: &ContentId) -> bool {
    blob_file(node, id).exists()
}

#[test]
fn a_peer_sending_bad_chunks_is_banned_and_the_download_completes_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    // The honest node uploads slowly, so the download cannot finish from it alone
    // before the (fast) liar is asked for groups.
    let honest = TestNode::start(
        dir.path(),
        "honest",
        &keys,
        &["--upload-bytes-per-s".into(), (4 * MIB).to_string()],
    );
    let bytes = blob(3, 12 * MIB);
    let id = ContentId::of(&bytes);
    let size = bytes.len() as u64;

    // The liar: a real libp2p node built from the transport crate, holding the real
    // outboard (so its proofs look right) but flipping a byte in every group it sends.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data_path = dir.path().join("liar.bin");
    std::fs::write(&data_path, &bytes).unwrap();
    let ob = mesh_actors::verified::outboard_of_file(&id, &data_path, size).unwrap();
    let ob_path = dir.path().join("liar.obao");
    std::fs::write(&ob_path, &ob).unwrap();
    let liar_key = SecretKey::generate();
    let liar_peer = liar_key.public().peer_id().unwrap();
    let liar_addr = rt.block_on(async {
        let cfg = SwarmConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            bootstrap: vec![honest.addr().parse().unwrap()],
            topics: vec![
                "mesh/have/1".into(),
                "mesh/releases/1".into(),
                "mesh/reports/1".into(),
            ],
            ..SwarmConfig::default()
        };
        let (handle, mut events) = swarm::spawn(&liar_key, cfg).await.unwrap();
        let addr = loop {
            if let Some(NetEvent::Listening { addr }) = events.recv().await {
                break addr;
            }
        };
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(async move {
            let _handle = handle;
            let data = std::fs::File::open(&data_path).unwrap();
            let ob = std::fs::File::open(&ob_path).unwrap();
            while let Some(ev) = events.recv().await {
                if let NetEvent::BlobRequested { request, reply, .. } = ev {
                    match request {
                        BlobRequest::Have { .. } => reply.send(BlobResponse::Have {
                            size,
                            ranges: vec![(0, mesh_actors::verified::groups_of(size))],
                        }),
                        BlobRequest::Groups {
                            id: rid,
                            start,
                            end,
                        } => {
                            let mut enc = mesh_actors::verified::encode_complete(
                                &rid, &data, size, &ob, start, end,
                            )
                            .unwrap();
                            let n = enc.len();
                            enc[n / 2] ^= 0x5a;
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            reply.send(BlobResponse::Encoded(enc));
                        }
                    }
                }
            }
        });
        addr.to_string()
    });

    // The victim knows only the liar; it finds the honest node through it.
    let victim = TestNode::start(
        dir.path(),
        "victim",
        &keys,
        &["--bootstrap".into(), liar_addr],
    );
    wait_until("victim sees the honest node", || {
        peers_alive(&victim, key) >= 2
    });
    let id2 = publish_data(&honest, key, dir.path(), "blob", &bytes);
    assert_eq!(id, id2);
    wait_until("victim holds the verified blob", || {
        has_blob(&victim, key, &id)
    });
    let lies = log_lines_with(&victim, "failed verification");
    assert!(
        !lies.is_empty(),
        "the liar was never caught:\n{}",
        victim.log_text()
    );
    assert!(
        !log_lines_with(&victim, "penalizing peer").is_empty(),
        "the liar was not penalized:\n{}",
        victim.log_text()
    );
    // The victim's copy is the real one.
    let path = victim
        .state
        .join("store/blobs")
        .join(&id.to_string()[..2])
        .join(id.to_string());
    assert_eq!(std::fs::read(path).unwrap(), bytes);
    // And the liar is no longer among its live peers.
    let peers = victim.json(key, &["peers"]);
    let liar_alive = peers.as_array().unwrap().iter().any(|p| {
        p["peer_id"].as_str() == Some(liar_peer.to_string().as_str()) && p["state"] == "alive"
    });
    assert!(!liar_alive, "the liar is still connected");
    drop(rt);
}

#[test]
fn a_full_store_refuses_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let node = TestNode::start(
        dir.path(),
        "node0",
        &keys,
        &["--store-bytes-max".into(), MIB.to_string()],
    );
    let path = dir.path().join("big.bin");
    std::fs::write(&path, blob(5, 2 * MIB)).unwrap();
    let out = node.cli(
        key,
        &[
            "publish",
            "data",
            path.to_str().unwrap(),
            "--name",
            "big",
            "--version",
            "1",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store is full"), "{err}");
    let status = node.json(key, &["status"]);
    assert_eq!(status["blobs"], 0);
}

/// A benchmark-style check with a generous bound: at a 2 MiB/s download cap, 8 MiB
/// cannot arrive in much less than 4 s.
#[test]
fn the_download_rate_cap_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let (n0, n1) = connected_pair(
        dir.path(),
        &keys,
        &["--download-bytes-per-s".into(), (2 * MIB).to_string()],
    );
    let bytes = blob(9, 8 * MIB);
    let t0 = Instant::now();
    let id = publish_data(&n0, key, dir.path(), "capped", &bytes);
    wait_until("node1 holds the blob", || has_blob(&n1, key, &id));
    let elapsed = t0.elapsed();
    println!("8 MiB at a 2 MiB/s cap took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_secs(3),
        "the cap was not honoured: {elapsed:?}"
    );
}
