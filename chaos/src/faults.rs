//! Applying and healing faults on a running fleet. Each fault undoes itself at heal
//! time; `Env::heal_all` undoes whatever is still active (at the end of the workload,
//! or when a run is interrupted), and what a killed harness leaves behind is found by
//! `registry::remove_stale`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use mesh::proto::{Request, Response};
use mesh_transport::libp2p::{Multiaddr, PeerId};
use mesh_transport::swarm::{self, BlobRequest, BlobResponse, SwarmConfig};
use mesh_transport::{ContentId, SecretKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::byzantine::{Byzantine, ByzantineStats, Forged};
use crate::fleet::{Fleet, NodeOptions};
use crate::netns::NetLab;
use crate::registry::Registry;
use crate::scenario::FaultKind;
use crate::schedule::Fault;
use mesh_actors::slots::{Step, FAULT_ONCE_ENV, FAULT_POINT_ENV};

/// Where Debian's libfaketime lives.
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// A tmpfs under a node's state directory starts this large (it holds only what is
/// written), and a disk-full fault shrinks it to what is used plus `DISK_FULL_MARGIN_BYTES`.
pub const TMPFS_BYTES: u64 = 1 << 30;
/// Room left on a "full" disk: enough for small database writes, not for a release.
pub const DISK_FULL_MARGIN_BYTES: u64 = 64 * 1024;
/// Bytes flipped in a damaged blob file, spread over the file.
const CORRUPT_FLIPS: usize = 8;
/// How long one admin request may take before the node counts as unresponsive.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the probe of a damaged blob may take in all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What this machine lets the harness do, with the reason when it cannot.
#[derive(Clone, Debug)]
pub struct Caps {
    pub root: Result<(), String>,
    pub network: Result<(), String>,
    pub faketime: Result<(), String>,
}

impl Caps {
    pub fn detect() -> Caps {
        let root = crate::netns::available().map(|_| ());
        let network = crate::netns::nft_available();
        let faketime = if Path::new(FAKETIME_LIB).exists() {
            Ok(())
        } else {
            Err(format!(
                "libfaketime is not installed ({FAKETIME_LIB} missing; Debian package libfaketime)"
            ))
        };
        Caps {
            root,
            network,
            faketime,
        }
    }
}

/// What a node is doing as far as the harness knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NodeState {
    Up,
    Killed,
    Paused,
}

/// A blob file the harness damaged, and what probing the node for it showed.
#[derive(Clone, Debug, Serialize)]
pub struct Damaged {
    pub node: usize,
    pub id: ContentId,
    pub path: PathBuf,
    /// Groups the node served that failed verification: any is a violation.
    pub bad_groups_served: Option<u64>,
    /// Groups the node served that verified (undamaged parts may be served).
    pub good_groups_served: Option<u64>,
    /// Requests the node refused (what it should do for damaged groups).
    pub refused: Option<u64>,
    pub probe_note: String,
}

/// Everything faults act on.
pub struct Env {
    pub fleet: Fleet,
    pub lab: Option<Arc<NetLab>>,
    pub registry: Arc<Registry>,
    pub caps: Caps,
    pub states: Vec<NodeState>,
    /// Each node's options as started (restored when a fault that changed them heals).
    pub base: Vec<NodeOptions>,
    /// Per node, the libfaketime timestamp file when the node runs under libfaketime.
    pub faketime_files: Vec<Option<PathBuf>>,
    /// Per node, the tmpfs mounted on its state directory, if any.
    pub tmpfs: Vec<Option<PathBuf>>,
    /// Per node, the nodes it cannot reach (partition) and the loss it suffers.
    blocked: Vec<BTreeSet<usize>>,
    lossy: Vec<Option<u8>>,
    pub byzantine: Option<Byzantine>,
    pub byzantine_stats: Vec<ByzantineStats>,
    pub forged: Vec<Forged>,
    pub damaged: Vec<Damaged>,
    /// Faults started and not yet healed.
    pub active: BTreeMap<u32, Fault>,
    /// Per node, the power cut it is armed with and has not reached yet.
    pub armed: BTreeMap<usize, Armed>,
}

/// A node restarted to abort at a firmware step (a power cut), once.
#[derive(Clone, Debug)]
pub struct Armed {
    pub fault: u32,
    pub step: Step,
    /// `MESH_FAULT_ONCE`: the node leaves a marker here when it cuts.
    pub marker_dir: PathBuf,
}

impl Armed {
    fn fired(&self) -> bool {
        self.marker_dir.join(self.step.name()).exists()
    }
}

impl Env {
    pub fn new(
        fleet: Fleet,
        lab: Option<Arc<NetLab>>,
        registry: Arc<Registry>,
        caps: Caps,
        base: Vec<NodeOptions>,
        faketime_files: Vec<Option<PathBuf>>,
        tmpfs: Vec<Option<PathBuf>>,
    ) -> Env {
        let n = fleet.nodes.len();
        Env {
            fleet,
            lab,
            registry,
            caps,
            states: vec![NodeState::Up; n],
            base,
            faketime_files,
            tmpfs,
            blocked: vec![BTreeSet::new(); n],
            lossy: vec![None; n],
            byzantine: None,
            byzantine_stats: Vec::new(),
            forged: Vec::new(),
            damaged: Vec::new(),
            active: BTreeMap::new(),
            armed: BTreeMap::new(),
        }
    }

    /// Why this fault cannot run here, if it cannot.
    pub fn unsupported(&self, kind: FaultKind) -> Option<String> {
        if kind.is_network() {
            if let Err(why) = &self.caps.network {
                return Some(format!("network faults skipped: {why}"));
            }
            if self.lab.is_none() {
                return Some("network faults skipped: the fleet runs on loopback".into());
            }
        }
        if kind == FaultKind::ClockSkew {
            if let Err(why) = &self.caps.faketime {
                return Some(format!("clock skew skipped: {why}"));
            }
        }
        None
    }

    /// Starts a fault; returns what was done.
    pub async fn apply(&mut self, f: &Fault) -> anyhow::Result<String> {
        let mut rng = StdRng::seed_from_u64(f.seed);
        let detail = match f.kind {
            FaultKind::Kill => {
                let mut done = Vec::new();
                for n in &f.nodes {
                    // What the node was downloading when it died, to show the kill
                    // landed mid-transfer (or did not).
                    let transfers = match tokio::time::timeout(
                        REQUEST_TIMEOUT,
                        self.fleet.nodes[*n].session.request(&Request::Transfers),
                    )
                    .await
                    {
                        Ok(Ok(Response::Transfers(t))) if !t.is_empty() => {
                            let parts: Vec<String> = t
                                .iter()
                                .map(|x| {
                                    format!(
                                        "{} {}/{} KiB",
                                        x.id.short(),
                                        x.have_bytes / 1024,
                                        x.size / 1024
                                    )
                                })
                                .collect();
                            format!(" mid-download ({})", parts.join(", "))
                        }
                        _ => " (no download in progress)".to_string(),
                    };
                    self.fleet.kill9(*n).await;
                    self.states[*n] = NodeState::Killed;
                    // And where its firmware stood, read from its disk after the kill.
                    let fw = crate::firmware::phases(&self.fleet.nodes[*n].state);
                    let fw = if fw.is_empty() {
                        fw
                    } else {
                        format!(", firmware {fw}")
                    };
                    done.push(format!("kill -9 {}{transfers}{fw}", node_name(*n)));
                }
                done.join("; ")
            }
            FaultKind::Pause => {
                for n in &f.nodes {
                    self.fleet.signal(*n, "STOP")?;
                    self.states[*n] = NodeState::Paused;
                }
                format!("SIGSTOP {}", names(&f.nodes))
            }
            FaultKind::Partition => {
                for g in &f.groups {
                    for n in g {
                        self.blocked[*n] =
                            (0..self.states.len()).filter(|m| !g.contains(m)).collect();
                    }
                }
                for n in 0..self.states.len() {
                    self.refilter(n)?;
                }
                let groups: Vec<String> = f
                    .groups
                    .iter()
                    .map(|g| format!("{{{}}}", names(g)))
                    .collect();
                format!("partition into {}", groups.join(" | "))
            }
            FaultKind::Loss => {
                for n in &f.nodes {
                    self.lossy[*n] = Some(f.loss_percent);
                    self.refilter(*n)?;
                }
                format!(
                    "{}% packet loss to and from {}",
                    f.loss_percent,
                    names(&f.nodes)
                )
            }
            FaultKind::Slow => {
                let lab = self
                    .lab
                    .clone()
                    .context("slow links need the lab network")?;
                for n in &f.nodes {
                    lab.set_rate_kbit(*n, f.rate_kbit)?;
                }
                format!(
                    "uplink of {} capped at {} kbit/s",
                    names(&f.nodes),
                    f.rate_kbit
                )
            }
            FaultKind::DiskFull => {
                let mut done = Vec::new();
                for n in &f.nodes {
                    done.push(self.fill_disk(*n).await?);
                }
                done.join("; ")
            }
            FaultKind::CorruptBlob => {
                let mut done = Vec::new();
                for n in &f.nodes {
                    done.push(self.corrupt(*n, &mut rng)?);
                }
                done.join("; ")
            }
            FaultKind::ClockSkew => {
                for n in &f.nodes {
                    let file = self.faketime_files[*n]
                        .clone()
                        .context("the node was not started under libfaketime")?;
                    std::fs::write(&file, format!("{}\n", f.skew))?;
                }
                format!("wall clock of {} moved {}", names(&f.nodes), f.skew)
            }
            FaultKind::Byzantine => {
                let (listen, dial): (Multiaddr, Vec<Multiaddr>) = {
                    let host = match &self.lab {
                        Some(lab) => lab.host_addr().to_string(),
                        None => "127.0.0.1".into(),
                    };
                    let dial = f
                        .nodes
                        .iter()
                        .filter_map(|n| self.fleet.nodes[*n].info.listen.first())
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    (format!("/ip4/{host}/udp/0/quic-v1").parse()?, dial)
                };
                let byz = Byzantine::start(listen, dial, rng.gen()).await?;
                let detail = format!(
                    "byzantine peer {} joined through {}",
                    short(&byz.peer_id.to_string()),
                    names(&f.nodes)
                );
                self.byzantine = Some(byz);
                detail
            }
            FaultKind::PowerCut => {
                let mut done = Vec::new();
                for n in &f.nodes {
                    let step = crate::firmware::CUT_STEPS
                        [rng.gen_range(0..crate::firmware::CUT_STEPS.len())];
                    let marker_dir = self.fleet.dir.join(format!("power-cut-{}-node{n}", f.id));
                    std::fs::create_dir_all(&marker_dir)
                        .with_context(|| format!("creating {}", marker_dir.display()))?;
                    let mut options = self.base[*n].clone();
                    options.env.extend([
                        (FAULT_POINT_ENV.to_string(), step.name().to_string()),
                        (FAULT_ONCE_ENV.to_string(), marker_dir.display().to_string()),
                    ]);
                    let armed = Armed {
                        fault: f.id,
                        step,
                        marker_dir,
                    };
                    // Armed before the restart: a node whose image is on trial boots it
                    // as it starts, and may lose power right there.
                    self.armed.insert(*n, armed.clone());
                    // The restart is itself a cut at whatever moment this is.
                    if let Err(e) = self.fleet.restart(*n, Some(options)).await {
                        self.armed.remove(n);
                        if !armed.fired() {
                            return Err(e);
                        }
                        let base = self.base[*n].clone();
                        self.fleet.restart(*n, Some(base)).await?;
                        done.push(format!(
                            "{} lost power at firmware step {} as it started, and restarted",
                            node_name(*n),
                            step.name()
                        ));
                        continue;
                    }
                    done.push(format!(
                        "{} restarted to lose power at firmware step {}",
                        node_name(*n),
                        step.name()
                    ));
                }
                done.join("; ")
            }
        };
        self.active.insert(f.id, f.clone());
        Ok(detail)
    }

    /// Heals a fault; returns what was done.
    pub async fn heal(&mut self, id: u32) -> anyhow::Result<String> {
        let Some(f) = self.active.remove(&id) else {
            return Ok(String::new());
        };
        Ok(match f.kind {
            FaultKind::Kill => {
                for n in &f.nodes {
                    self.fleet.restart(*n, None).await?;
                    self.states[*n] = NodeState::Up;
                }
                format!("restarted {}", names(&f.nodes))
            }
            FaultKind::Pause => {
                for n in &f.nodes {
                    self.fleet.signal(*n, "CONT")?;
                    self.states[*n] = NodeState::Up;
                }
                format!("SIGCONT {}", names(&f.nodes))
            }
            FaultKind::Partition => {
                for n in 0..self.states.len() {
                    self.blocked[n].clear();
                    self.refilter(n)?;
                }
                "partition healed".into()
            }
            FaultKind::Loss => {
                for n in &f.nodes {
                    self.lossy[*n] = None;
                    self.refilter(*n)?;
                }
                format!("loss removed from {}", names(&f.nodes))
            }
            FaultKind::Slow => {
                let lab = self
                    .lab
                    .clone()
                    .context("slow links need the lab network")?;
                for n in &f.nodes {
                    lab.restore_rate(*n)?;
                }
                format!("uplink of {} restored", names(&f.nodes))
            }
            FaultKind::DiskFull => {
                for n in &f.nodes {
                    match &self.tmpfs[*n] {
                        Some(mount) => remount(mount, TMPFS_BYTES)?,
                        None => {
                            let base = self.base[*n].clone();
                            self.fleet.restart(*n, Some(base)).await?;
                        }
                    }
                    self.states[*n] = NodeState::Up;
                }
                format!("disk of {} freed", names(&f.nodes))
            }
            FaultKind::CorruptBlob => {
                let mut notes = Vec::new();
                for i in 0..self.damaged.len() {
                    if f.nodes.contains(&self.damaged[i].node)
                        && self.damaged[i].bad_groups_served.is_none()
                    {
                        self.probe(i).await;
                        notes.push(self.damaged[i].probe_note.clone());
                    }
                }
                if notes.is_empty() {
                    "nothing was damaged".into()
                } else {
                    notes.join("; ")
                }
            }
            FaultKind::ClockSkew => {
                for n in &f.nodes {
                    if let Some(file) = &self.faketime_files[*n] {
                        std::fs::write(file, "+0\n")?;
                    }
                }
                format!("wall clock of {} restored", names(&f.nodes))
            }
            FaultKind::Byzantine => {
                if let Some(b) = self.byzantine.take() {
                    let (stats, forged) = b.stop();
                    let detail = format!(
                        "byzantine peer left: {} bad groups served, {} replays, {} forged manifests, {} flood messages, {} lying release lists",
                        stats.bad_groups_served,
                        stats.replays_sent,
                        stats.forged_sent,
                        stats.flood_sent,
                        stats.rpc_lies
                    );
                    self.byzantine_stats.push(stats);
                    self.forged.extend(forged);
                    detail
                } else {
                    String::new()
                }
            }
            FaultKind::PowerCut => {
                let mut done = Vec::new();
                for n in &f.nodes {
                    let Some(a) = self.armed.remove(n).filter(|a| a.fault == f.id) else {
                        done.push(format!("{} had lost power already", node_name(*n)));
                        continue;
                    };
                    let fired = a.fired();
                    let base = self.base[*n].clone();
                    self.fleet.restart(*n, Some(base)).await?;
                    self.states[*n] = NodeState::Up;
                    done.push(if fired {
                        format!(
                            "{} lost power at firmware step {} and restarted",
                            node_name(*n),
                            a.step.name()
                        )
                    } else {
                        format!(
                            "{} never reached firmware step {}: restarted without the cut",
                            node_name(*n),
                            a.step.name()
                        )
                    });
                }
                done.join("; ")
            }
        })
    }

    /// When node `n` exited because its armed power cut fired: disarms it, restarts it
    /// with its usual options, and returns the fault and what happened. A node that
    /// exited for any other reason is left to the caller.
    pub async fn power_cut_fired(&mut self, n: usize) -> Option<(u32, String)> {
        let a = self.armed.get(&n).filter(|a| a.fired())?.clone();
        self.armed.remove(&n);
        let base = self.base[n].clone();
        let restarted = match self.fleet.restart(n, Some(base)).await {
            Ok(()) => "restarted".to_string(),
            Err(e) => format!("restarting it failed: {e:#}"),
        };
        Some((
            a.fault,
            format!(
                "{} lost power at firmware step {}; {restarted}",
                node_name(n),
                a.step.name()
            ),
        ))
    }

    /// Heals every active fault, newest first; errors are collected, not fatal.
    pub async fn heal_all(&mut self) -> Vec<String> {
        let ids: Vec<u32> = self.active.keys().rev().copied().collect();
        let mut errors = Vec::new();
        for id in ids {
            if let Err(e) = self.heal(id).await {
                errors.push(format!("healing fault #{id}: {e:#}"));
            }
        }
        errors
    }

    fn refilter(&self, n: usize) -> anyhow::Result<()> {
        let lab = self
            .lab
            .as_ref()
            .context("network faults need the lab network")?;
        let blocked: Vec<usize> = self.blocked[n].iter().copied().collect();
        let lossy: Vec<(usize, u8)> = match self.lossy[n] {
            Some(p) => (0..self.states.len())
                .filter(|m| *m != n)
                .map(|m| (m, p))
                .collect(),
            None => Vec::new(),
        };
        lab.set_filter(n, &blocked, &lossy)
    }

    async fn fill_disk(&mut self, n: usize) -> anyhow::Result<String> {
        if let Some(mount) = self.tmpfs[n].clone() {
            let used = used_bytes(&mount)?;
            let size = used + DISK_FULL_MARGIN_BYTES;
            remount(&mount, size)?;
            return Ok(format!(
                "tmpfs of {} shrunk to {} KiB ({} KiB used)",
                node_name(n),
                size / 1024,
                used / 1024
            ));
        }
        let stored = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.fleet.nodes[n].session.request(&Request::Status),
        )
        .await
        {
            Ok(Ok(Response::Status(s))) => s.blob_bytes,
            _ => bail!("asking {} how much it stores", node_name(n)),
        };
        let cap = stored + DISK_FULL_MARGIN_BYTES;
        let mut options = self.base[n].clone();
        options
            .args
            .extend(["--store-bytes-max".to_string(), cap.to_string()]);
        self.fleet.restart(n, Some(options)).await?;
        Ok(format!(
            "{} restarted with its store capped at {} KiB (it held {} KiB)",
            node_name(n),
            cap / 1024,
            stored / 1024
        ))
    }

    fn corrupt(&mut self, n: usize, rng: &mut StdRng) -> anyhow::Result<String> {
        let files = blob_files(&self.fleet.nodes[n].state);
        let candidates: Vec<&(PathBuf, String)> = files
            .iter()
            .filter(|(_, name)| !self.damaged.iter().any(|d| d.id.to_string() == *name))
            .collect();
        if candidates.is_empty() {
            return Ok(format!("{} holds no blob to damage yet", node_name(n)));
        }
        let (path, name) = candidates[rng.gen_range(0..candidates.len())].clone();
        let mut bytes =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.is_empty() {
            return Ok(format!("{} holds only an empty blob", node_name(n)));
        }
        for _ in 0..CORRUPT_FLIPS {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] ^= 0xff;
        }
        // Written in place, as bit rot or a bad sector would leave it.
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        let id: ContentId = name
            .parse()
            .map_err(|e| anyhow::anyhow!("parsing blob name {name}: {e:?}"))?;
        self.damaged.push(Damaged {
            node: n,
            id,
            path: path.clone(),
            bad_groups_served: None,
            good_groups_served: None,
            refused: None,
            probe_note: String::new(),
        });
        Ok(format!(
            "flipped {CORRUPT_FLIPS} bytes of blob {} on {}",
            id.short(),
            node_name(n)
        ))
    }

    /// Asks the damaged node for every group of the damaged blob through a fresh honest
    /// peer, and verifies what comes back.
    async fn probe(&mut self, i: usize) {
        let d = self.damaged[i].clone();
        let addr = self.fleet.nodes[d.node].info.listen.first().cloned();
        let peer: Option<PeerId> = self.fleet.nodes[d.node].info.peer_id.parse().ok();
        let host = match &self.lab {
            Some(lab) => lab.host_addr().to_string(),
            None => "127.0.0.1".into(),
        };
        let result = match (addr.and_then(|a| a.parse::<Multiaddr>().ok()), peer) {
            (Some(addr), Some(peer)) => {
                tokio::time::timeout(PROBE_TIMEOUT, probe_blob(&host, addr, peer, d.id))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the probe timed out")))
            }
            _ => Err(anyhow::anyhow!("the node's address is unknown")),
        };
        let e = &mut self.damaged[i];
        match result {
            Ok((good, bad, refused)) => {
                e.good_groups_served = Some(good);
                e.bad_groups_served = Some(bad);
                e.refused = Some(refused);
                e.probe_note = format!(
                    "probe of damaged blob {} on {}: {good} groups served and verified, {bad} served damaged, {refused} requests refused",
                    d.id.short(),
                    node_name(d.node)
                );
            }
            Err(err) => {
                e.probe_note = format!(
                    "probe of {} on {}: {err:#}",
                    d.id.short(),
                    node_name(d.node)
                )
            }
        }
    }
}

/// Requests every group of `id` from `peer`, one group at a time, verifying each answer.
/// Returns (groups that verified, groups that did not, requests refused).
async fn probe_blob(
    host: &str,
    addr: Multiaddr,
    peer: PeerId,
    id: ContentId,
) -> anyhow::Result<(u64, u64, u64)> {
    let key = SecretKey::generate();
    let cfg = SwarmConfig {
        listen: vec![format!("/ip4/{host}/udp/0/quic-v1").parse()?],
        bootstrap: vec![addr],
        ..SwarmConfig::default()
    };
    let (handle, mut events) = swarm::spawn(&key, cfg)
        .await
        .map_err(|e| anyhow::anyhow!("starting the probe: {e}"))?;
    // Events must be drained or the swarm's queue fills; nothing in them matters here.
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
    let size = loop {
        match handle.request_blob(peer, BlobRequest::Have { id }).await {
            Ok(BlobResponse::Have { size, .. }) => break Some(size),
            Ok(BlobResponse::NotFound) | Ok(BlobResponse::Invalid(_)) => break None,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let Some(size) = size else {
        drain.abort();
        return Ok((0, 0, 1));
    };
    let dir = tempfile::tempdir()?;
    let mut partial = mesh_actors::verified::PartialBlob::open(dir.path(), id, size)?;
    let (mut good, mut bad, mut refused) = (0, 0, 0);
    for g in 0..mesh_actors::verified::groups_of(size) {
        match handle
            .request_blob(
                peer,
                BlobRequest::Groups {
                    id,
                    start: g,
                    end: g + 1,
                },
            )
            .await
        {
            Ok(BlobResponse::Encoded(enc)) => {
                let r = partial.receive(g, g + 1, &enc);
                if r.bad.is_some() {
                    bad += 1;
                } else {
                    good += 1;
                }
            }
            _ => refused += 1,
        }
    }
    drain.abort();
    Ok((good, bad, refused))
}

/// Blob files under a node's store: (path, file name).
pub fn blob_files(state: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(state.join("store/blobs")) else {
        return out;
    };
    for d in dirs.flatten() {
        if let Ok(files) = std::fs::read_dir(d.path()) {
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                if f.path().is_file() {
                    out.push((f.path(), name));
                }
            }
        }
    }
    out.sort();
    out
}

pub fn node_name(n: usize) -> String {
    format!("node{n}")
}

pub fn names(nodes: &[usize]) -> String {
    nodes
        .iter()
        .map(|n| node_name(*n))
        .collect::<Vec<_>>()
        .join(", ")
}

fn short(s: &str) -> String {
    s.chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// Mounts a tmpfs of `bytes` on `path` (root only).
pub fn mount_tmpfs(path: &Path, bytes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    let p = path.display().to_string();
    crate::netns::run_output(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        &format!("size={bytes}"),
        "tmpfs",
        &p,
    ])?;
    Ok(())
}

fn remount(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let p = path.display().to_string();
    crate::netns::run_output(&["mount", "-o", &format!("remount,size={bytes}"), &p])?;
    Ok(())
}

pub fn unmount(path: &Path) -> anyhow::Result<()> {
    crate::netns::run_output(&["umount", "-l", &path.display().to_string()])?;
    Ok(())
}

fn used_bytes(path: &Path) -> anyhow::Result<u64> {
    let out =
        crate::netns::run_output(&["df", "-B1", "--output=used", &path.display().to_string()])?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("reading df's output")
}
