//! A byzantine peer: a real libp2p node built from the transport crate, in the harness's
//! process, that joins the mesh and lies in every way it can without a release key.
//!
//! - It claims to hold every blob it hears of (have-announcements, have-answers) and
//!   serves random bytes as chunk groups.
//! - It replays the oldest manifests it heard, over gossip and in its answers to the
//!   release-list request every node sends on connection.
//! - It forges manifests: newer versions of real releases signed with its own untrusted
//!   key, and real manifests with their version and content changed but the trusted
//!   signatures kept (which then do not verify).
//! - It floods the release and report topics with garbage.
//!
//! Everything it sent is recorded, so the invariants can check that none of it was
//! accepted anywhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh::proto::{PeerRequest, PeerResponse};
use mesh_actors::fetch::{HaveAnnouncement, HAVE_TOPIC};
use mesh_actors::manifest::{Manifest, ReleaseKind, SignedManifest};
use mesh_actors::releases::RELEASES_TOPIC;
use mesh_transport::libp2p::{Multiaddr, PeerId};
use mesh_transport::swarm::{self, BlobRequest, BlobResponse, NetEvent, SwarmConfig};
use mesh_transport::{wire, ContentId, SecretKey};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

/// How often the peer sends its next round of lies.
const ROUND: Duration = Duration::from_secs(1);
/// Garbage messages per round, split between the release and report topics.
const FLOOD_PER_ROUND: u32 = 40;
/// Garbage messages over the peer's whole life, so a long soak stays bounded.
const FLOOD_TOTAL_MAX: u64 = 20_000;
/// A forged version is this far above the newest real one, so it would win if accepted.
const FORGED_VERSION_BUMP: u64 = 1000;
/// Size of the garbage content forged manifests name.
const FORGED_CONTENT_BYTES: usize = 64 * 1024;
/// Garbage flood messages are at most this long.
const FLOOD_MESSAGE_BYTES_MAX: usize = 2048;
/// Manifests remembered per release name (the oldest and newest matter).
const HEARD_PER_NAME_MAX: usize = 64;
/// Forged manifests recorded for the invariants; past this only counts grow.
const FORGED_RECORDS_MAX: usize = 10_000;

/// What the peer did, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ByzantineStats {
    pub releases_heard: u64,
    pub have_lies: u64,
    pub bad_groups_served: u64,
    pub replays_sent: u64,
    pub forged_sent: u64,
    pub flood_sent: u64,
    pub rpc_lies: u64,
}

/// One forged manifest: if any node ever lists it, the mesh accepted a lie.
#[derive(Clone, Debug, Serialize)]
pub struct Forged {
    pub name: String,
    pub version: u64,
    pub content: ContentId,
    pub how: &'static str,
}

#[derive(Default)]
struct Shared {
    stats: ByzantineStats,
    forged: Vec<Forged>,
    /// Real manifests heard, per name, oldest first.
    heard: BTreeMap<String, Vec<SignedManifest>>,
    /// Sizes of blobs heard of, to answer have-queries convincingly.
    sizes: BTreeMap<ContentId, u64>,
    /// Peers connected now, asked for their releases every round.
    connected: std::collections::BTreeSet<PeerId>,
    /// Real blobs the peer fetched (verified) from honest nodes, so the groups it serves
    /// carry real proofs with one byte flipped: a lie only the hash check catches.
    copies: BTreeMap<ContentId, Copy>,
    /// Blobs it tried to copy (once each).
    tried: std::collections::BTreeSet<ContentId>,
    /// Content ids of its own forgeries, which no honest node holds.
    forged_ids: std::collections::BTreeSet<ContentId>,
}

/// A verified copy of a real blob: its data file, outboard file and size.
#[derive(Clone)]
struct Copy {
    data: std::path::PathBuf,
    outboard: std::path::PathBuf,
    size: u64,
}

/// Blobs larger than this are not copied (the lie is then random bytes).
const COPY_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// How long copying one blob may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(20);

/// Remembers a real manifest heard (not one of our own forgeries), to replay later.
fn remember(sh: &mut Shared, key: &SecretKey, signed: SignedManifest) {
    if signed
        .signatures
        .iter()
        .any(|sig| sig.signer == key.public())
    {
        return;
    }
    sh.sizes
        .insert(signed.manifest.content, signed.manifest.size);
    let list = sh.heard.entry(signed.manifest.name.clone()).or_default();
    if !list.iter().any(|m| m.manifest == signed.manifest) {
        sh.stats.releases_heard += 1;
        list.push(signed);
        list.sort_by_key(|m| m.manifest.version);
        if list.len() > HEARD_PER_NAME_MAX {
            list.remove(1);
        }
    }
}

/// Peers asked for their release lists per round.
const ASKED_PER_ROUND_MAX: usize = 8;
/// How long one release-list request may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Byzantine {
    pub peer_id: PeerId,
    pub addr: Multiaddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
    /// Holds the copies; removed when the peer is dropped.
    _dir: tempfile::TempDir,
}

impl Byzantine {
    /// Starts the peer listening on `listen` and dialing `bootstrap`.
    pub async fn start(
        listen: Multiaddr,
        bootstrap: Vec<Multiaddr>,
        seed: u64,
    ) -> anyhow::Result<Byzantine> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut key_seed = [0u8; 32];
        rng.fill_bytes(&mut key_seed);
        let key = SecretKey::from_seed(key_seed);
        let cfg = SwarmConfig {
            listen: vec![listen],
            bootstrap,
            topics: vec![
                RELEASES_TOPIC.into(),
                HAVE_TOPIC.into(),
                mesh::node::REPORTS_TOPIC.into(),
            ],
            ..SwarmConfig::default()
        };
        let (handle, mut events) = swarm::spawn(&key, cfg)
            .await
            .map_err(|e| anyhow::anyhow!("starting the byzantine peer: {e}"))?;
        let addr = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Some(NetEvent::Listening { addr }) => return Some(addr),
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("starting the byzantine peer: it never listened"))?;
        let peer_id = handle.local_peer();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let s = shared.clone();
        let dir = tempfile::Builder::new()
            .prefix("mesh-byzantine-")
            .tempdir()?;
        let copies_dir = dir.path().to_path_buf();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ROUND);
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => on_event(&s, &key, &mut rng, ev),
                        None => break,
                    },
                    _ = tick.tick() => {
                        round(&handle, &s, &key, &mut rng).await;
                        copy_one(&handle, &s, &copies_dir).await;
                    }
                }
            }
        });
        Ok(Byzantine {
            peer_id,
            addr,
            shared,
            task,
            _dir: dir,
        })
    }

    pub fn stats(&self) -> ByzantineStats {
        lock(&self.shared).stats.clone()
    }

    pub fn forged(&self) -> Vec<Forged> {
        lock(&self.shared).forged.clone()
    }

    /// Stops the peer; its swarm ends with the task that owns the handle.
    pub fn stop(self) -> (ByzantineStats, Vec<Forged>) {
        self.task.abort();
        let s = lock(&self.shared);
        (s.stats.clone(), s.forged.clone())
    }
}

impl Drop for Byzantine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn garbage(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    rng.fill_bytes(&mut b);
    b
}

fn on_event(s: &Mutex<Shared>, key: &SecretKey, rng: &mut StdRng, ev: NetEvent) {
    match ev {
        NetEvent::Gossip { topic, data, .. } if topic == RELEASES_TOPIC => {
            if let Ok(signed) = SignedManifest::decode(&data) {
                remember(&mut lock(s), key, signed);
            }
        }
        NetEvent::Gossip { topic, data, .. } if topic == HAVE_TOPIC => {
            if let Ok(have) = HaveAnnouncement::decode(&data) {
                lock(s).sizes.insert(have.id, have.size);
            }
        }
        NetEvent::PeerConnected { peer, .. } => {
            lock(s).connected.insert(peer);
        }
        NetEvent::PeerDisconnected { peer } => {
            lock(s).connected.remove(&peer);
        }
        NetEvent::BlobRequested { request, reply, .. } => match request {
            BlobRequest::Have { id } => {
                let mut sh = lock(s);
                match sh.sizes.get(&id).copied() {
                    Some(size) => {
                        sh.stats.have_lies += 1;
                        reply.send(BlobResponse::Have {
                            size,
                            ranges: vec![(0, mesh_actors::verified::groups_of(size))],
                        });
                    }
                    None => reply.send(BlobResponse::NotFound),
                }
            }
            BlobRequest::Groups { id, start, end } => {
                let copy = lock(s).copies.get(&id).cloned();
                // A real encoding with one byte flipped, when we hold a copy; random
                // bytes otherwise.
                let lie = copy
                    .and_then(|c| {
                        let data = std::fs::File::open(&c.data).ok()?;
                        let ob = std::fs::File::open(&c.outboard).ok()?;
                        mesh_actors::verified::encode_complete(&id, &data, c.size, &ob, start, end)
                            .ok()
                    })
                    .map(|mut enc| {
                        let n = enc.len();
                        enc[n / 2] ^= 0x5a;
                        enc
                    })
                    .unwrap_or_else(|| {
                        let groups = end.saturating_sub(start).clamp(1, 4);
                        garbage(
                            rng,
                            (groups * mesh_actors::verified::GROUP_BYTES) as usize + 512,
                        )
                    });
                lock(s).stats.bad_groups_served += end.saturating_sub(start).max(1);
                reply.send(BlobResponse::Encoded(lie));
            }
        },
        NetEvent::RpcRequested { request, reply, .. } => {
            if let Ok(PeerRequest::Releases) =
                wire::decode::<PeerRequest>(&request, swarm::RPC_BYTES_MAX)
            {
                let mut sh = lock(s);
                let mut list: Vec<Vec<u8>> = sh
                    .heard
                    .values()
                    .filter_map(|v| v.first())
                    .map(|m| m.encode())
                    .collect();
                let forged = forge_all(&mut sh, key, rng);
                list.extend(forged.iter().map(|m| m.encode()));
                sh.stats.rpc_lies += 1;
                reply.send(wire::encode(&PeerResponse::Releases(list)).unwrap_or_default());
            }
        }
        _ => {}
    }
}

/// Forges one untrusted and one tampered manifest per release name heard (or one of a
/// made-up name when none was heard yet), and records them.
fn forge_all(sh: &mut Shared, key: &SecretKey, rng: &mut StdRng) -> Vec<SignedManifest> {
    let content = garbage(rng, FORGED_CONTENT_BYTES);
    let id = ContentId::of(&content);
    let newest: Vec<SignedManifest> = sh
        .heard
        .values()
        .filter_map(|v| v.last())
        .cloned()
        .collect();
    let bases: Vec<SignedManifest> = if newest.is_empty() {
        let m = Manifest {
            kind: ReleaseKind::Data,
            name: "chaos-forged".into(),
            version: 1,
            content: id,
            size: content.len() as u64,
            created_unix: mesh_actors::unix_ms() / 1000,
            expires_unix: None,
            quotas: Default::default(),
            deltas: Vec::new(),
        };
        vec![SignedManifest::sign(m, &[key])]
    } else {
        newest
    };
    let mut out = Vec::new();
    for base in bases {
        let mut m = base.manifest.clone();
        m.version = base.manifest.version + FORGED_VERSION_BUMP + rng.gen_range(0..100);
        m.content = id;
        m.size = content.len() as u64;
        // Signed by a key no node trusts.
        let untrusted = SignedManifest::sign(m.clone(), &[key]);
        // The real (trusted) signatures kept over a changed manifest: they no longer
        // verify.
        let mut tampered_m = m;
        tampered_m.version += 1;
        let tampered = SignedManifest {
            manifest: tampered_m,
            signatures: base.signatures.clone(),
        };
        for (signed, how) in [(untrusted, "untrusted signer"), (tampered, "tampered")] {
            if sh.forged.len() < FORGED_RECORDS_MAX {
                sh.forged.push(Forged {
                    name: signed.manifest.name.clone(),
                    version: signed.manifest.version,
                    content: signed.manifest.content,
                    how,
                });
            }
            sh.sizes.insert(id, content.len() as u64);
            sh.forged_ids.insert(id);
            out.push(signed);
        }
    }
    out
}

/// One round of lies over gossip: a replay, forgeries, false have-announcements and a
/// flood of garbage.
async fn round(handle: &swarm::SwarmHandle, s: &Mutex<Shared>, key: &SecretKey, rng: &mut StdRng) {
    // Learn every release the peers hold now, as any node does on connection, so there
    // are old versions to replay once newer ones appear.
    let peers: Vec<PeerId> = lock(s)
        .connected
        .iter()
        .take(ASKED_PER_ROUND_MAX)
        .copied()
        .collect();
    for peer in peers {
        let Ok(request) = wire::encode(&PeerRequest::Releases) else {
            break;
        };
        let Ok(Ok(bytes)) = tokio::time::timeout(ASK_TIMEOUT, handle.rpc(peer, request)).await
        else {
            continue;
        };
        if let Ok(PeerResponse::Releases(list)) =
            wire::decode::<PeerResponse>(&bytes, swarm::RPC_BYTES_MAX)
        {
            let mut sh = lock(s);
            for raw in list {
                if let Ok(signed) = SignedManifest::decode(&raw) {
                    remember(&mut sh, key, signed);
                }
            }
        }
    }
    let (replays, forged, haves, flood_left) = {
        let mut sh = lock(s);
        let replays: Vec<Vec<u8>> = sh
            .heard
            .values()
            .filter(|v| v.len() > 1)
            .filter_map(|v| v.first())
            .map(|m| m.encode())
            .collect();
        let forged: Vec<Vec<u8>> = forge_all(&mut sh, key, rng)
            .iter()
            .map(|m| m.encode())
            .collect();
        let haves: Vec<Vec<u8>> = sh
            .sizes
            .iter()
            .map(|(id, size)| HaveAnnouncement::complete(*id, *size).encode())
            .collect();
        let left = FLOOD_TOTAL_MAX.saturating_sub(sh.stats.flood_sent);
        (replays, forged, haves, left)
    };
    let mut sent = ByzantineStats::default();
    for r in replays {
        if handle.publish(RELEASES_TOPIC, r).await.is_ok() {
            sent.replays_sent += 1;
        }
    }
    for f in forged {
        if handle.publish(RELEASES_TOPIC, f).await.is_ok() {
            sent.forged_sent += 1;
        }
    }
    for h in haves {
        let _ = handle.publish(HAVE_TOPIC, h).await;
    }
    for i in 0..(FLOOD_PER_ROUND as u64).min(flood_left) {
        let len = rng.gen_range(1..FLOOD_MESSAGE_BYTES_MAX);
        let topic = if i % 2 == 0 {
            RELEASES_TOPIC
        } else {
            mesh::node::REPORTS_TOPIC
        };
        if handle.publish(topic, garbage(rng, len)).await.is_ok() {
            sent.flood_sent += 1;
        }
    }
    let mut sh = lock(s);
    sh.stats.replays_sent += sent.replays_sent;
    sh.stats.forged_sent += sent.forged_sent;
    sh.stats.flood_sent += sent.flood_sent;
}

/// Copies one real blob it heard of from an honest peer, verifying every group, so
/// later lies about it carry real proofs.
async fn copy_one(handle: &swarm::SwarmHandle, s: &Mutex<Shared>, dir: &std::path::Path) {
    let (target, peers) = {
        let mut sh = lock(s);
        let target = sh
            .sizes
            .iter()
            .find(|(id, size)| {
                **size <= COPY_BYTES_MAX && !sh.tried.contains(*id) && !sh.forged_ids.contains(*id)
            })
            .map(|(id, size)| (*id, *size));
        if let Some((id, _)) = target {
            sh.tried.insert(id);
        }
        (target, sh.connected.iter().copied().collect::<Vec<_>>())
    };
    let Some((id, size)) = target else { return };
    for peer in peers {
        let copied =
            tokio::time::timeout(COPY_TIMEOUT, copy_from(handle, peer, id, size, dir)).await;
        if let Ok(Some(copy)) = copied {
            lock(s).copies.insert(id, copy);
            return;
        }
    }
}

async fn copy_from(
    handle: &swarm::SwarmHandle,
    peer: PeerId,
    id: ContentId,
    size: u64,
    dir: &std::path::Path,
) -> Option<Copy> {
    use mesh_actors::verified::{groups_of, PartialBlob, GROUPS_PER_REQUEST_MAX};
    let mut partial = PartialBlob::open(dir, id, size).ok()?;
    let groups = groups_of(size);
    let mut start = 0;
    while start < groups {
        let end = (start + GROUPS_PER_REQUEST_MAX).min(groups);
        match handle
            .request_blob(peer, BlobRequest::Groups { id, start, end })
            .await
        {
            Ok(BlobResponse::Encoded(enc)) => {
                if partial.receive(start, end, &enc).bad.is_some() {
                    return None;
                }
            }
            _ => return None,
        }
        start = end;
    }
    let (data, outboard) = partial.finish().ok()?;
    let ob_path = dir.join(format!("{id}.copy.obao"));
    std::fs::write(&ob_path, outboard).ok()?;
    Some(Copy {
        data,
        outboard: ob_path,
        size,
    })
}
