//! Bad input is refused with a clear message, and nothing is stored.

mod common;

use common::*;
use mesh::cli::client::Session;
use mesh::cli::publish::{sign_release, upload};
use mesh_actors::manifest::ReleaseKind;
use mesh_transport::SecretKey;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn blobs_and_releases(node: &TestNode, key: &std::path::Path) -> (u64, u64) {
    let s = node.json(key, &["status"]);
    (
        s["blobs"].as_u64().unwrap(),
        s["releases"].as_u64().unwrap(),
    )
}

#[test]
fn bad_releases_and_bad_operators_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    let key = keys.operator.as_path();
    let config = dir.path().join("mesh.toml");
    // A small module limit so the size check can be hit with a small file.
    std::fs::write(&config, "module_bytes_max = 4096\n").unwrap();
    let node = TestNode::start(
        dir.path(),
        "node0",
        &keys,
        &["--config".into(), config.display().to_string()],
    );
    let wat = hello_wat();
    let wat = wat.to_str().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let operator = SecretKey::load(key).unwrap();
    let hello = std::fs::read(hello_wat()).unwrap();

    // A release signed by a key the node does not trust.
    let (stranger_path, stranger) = keys.extra("stranger");
    let out = node.cli(
        key,
        &[
            "publish",
            "module",
            wat,
            "--name",
            "hello",
            "--version",
            "1",
            "--release-key",
            stranger_path.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("publishing hello v1"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("signer"), "{}", stderr(&out));
    assert_eq!(blobs_and_releases(&node, key), (0, 0));

    // An operator key the node does not know cannot attach at all.
    let out = node.cli(&stranger_path, &["status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refused this operator key"),
        "{}",
        stderr(&out)
    );

    // A pinned node key that does not match is refused by the CLI.
    let out = std::process::Command::new(MESH)
        .args([
            "--node",
            &node.info.admin,
            "--node-key",
            &stranger.public().to_string(),
            "--key",
        ])
        .arg(key)
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("presented key"), "{}", stderr(&out));

    rt.block_on(async {
        let s = Session::attach_with(&node.info.admin, &operator, Some(node.info.node))
            .await
            .unwrap();

        // A signature that does not match the manifest (the version was changed after signing).
        let mut forged = sign_release(
            ReleaseKind::Module,
            "hello",
            1,
            &hello,
            std::slice::from_ref(&operator),
            None,
        )
        .unwrap();
        forged.manifest.version = 5;
        let err = upload(&s, &forged, &hello).await.unwrap_err().to_string();
        assert!(err.contains("signature"), "{err}");

        // Content that does not hash to the manifest's id.
        let signed = sign_release(
            ReleaseKind::Module,
            "hello",
            1,
            &hello,
            std::slice::from_ref(&operator),
            None,
        )
        .unwrap();
        let mut wrong = hello.clone();
        wrong[0] ^= 1;
        let err = upload(&s, &signed, &wrong).await.unwrap_err().to_string();
        assert!(err.contains("hash") || err.contains("match"), "{err}");

        // Content larger than the node's module limit is refused before it is read.
        let big = vec![b' '; 5000];
        let signed = sign_release(
            ReleaseKind::Module,
            "big",
            1,
            &big,
            std::slice::from_ref(&operator),
            None,
        )
        .unwrap();
        let err = upload(&s, &signed, &big).await.unwrap_err().to_string();
        assert!(err.contains("4096"), "{err}");

        // A module that does not compile.
        let junk = b"this is not a wasm module".to_vec();
        let signed = sign_release(
            ReleaseKind::Module,
            "junk",
            1,
            &junk,
            std::slice::from_ref(&operator),
            None,
        )
        .unwrap();
        let err = upload(&s, &signed, &junk).await.unwrap_err().to_string();
        assert!(err.contains("does not compile"), "{err}");

        // An admin frame over the request limit.
        let err = s
            .request(&mesh::proto::Request::Publish {
                manifest: vec![0; mesh::proto::REQUEST_BYTES_MAX + 1],
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("over the limit"), "{err}");

        // A manifest that is not a manifest.
        let err = s
            .request(&mesh::proto::Request::Publish {
                manifest: vec![1, 2, 3],
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("decoding the release manifest"), "{err}");
        s.close().await;
    });
    assert_eq!(
        blobs_and_releases(&node, key),
        (0, 0),
        "a refused release left something behind"
    );

    // A good release, then the same and an older version.
    let ok = node.cli(
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
    assert!(ok.status.success(), "{}", stderr(&ok));
    for v in ["2", "1"] {
        let out = node.cli(
            key,
            &["publish", "module", wat, "--name", "hello", "--version", v],
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains("not newer"), "{}", stderr(&out));
    }
    assert_eq!(blobs_and_releases(&node, key), (1, 1));
    wait_until("hello v2 running", || runs(&node, key, "hello", 2));
}

#[test]
fn an_unreachable_node_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new(dir.path());
    // Bind and drop a UDP socket to get a port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(MESH)
        .args(["--node", &format!("127.0.0.1:{port}"), "--key"])
        .arg(&keys.operator)
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("attaching to node"), "{err}");
}
