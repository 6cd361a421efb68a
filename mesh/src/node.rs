//! The node assembly: identity, store, swarm, supervision tree, admin endpoint, and the
//! small pumps that connect them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_actors::bucket::TokenBucket;
use mesh_actors::fetch::{FetchCtx, HaveAnnouncement, Transfers, HAVE_TOPIC, LIAR_BAN};
use mesh_actors::firmware::{
    FirmwareConfig, FirmwareFailure, FirmwareMsg, FirmwareSetup, TargetConfig,
    FIRMWARE_FAILURES_TOPIC,
};
use mesh_actors::host::{HostServices, Published, APP_TOPIC};
use mesh_actors::kv::KvStore;
use mesh_actors::mailbox::MailboxError;
use mesh_actors::manifest::{ReleaseKind, SignedManifest};
use mesh_actors::node::{NodeAddrs, NodeArgs, NodeSupervisor, StoreMsg};
use mesh_actors::peers::{short_peer, NodeReport, PeerState, PeersMsg};
use mesh_actors::releases::{ReleaseMsg, RELEASES_TOPIC};
use mesh_actors::sandbox::{LogLine, SandboxEngine};
use mesh_actors::sandbox_supervisor::{
    FailureReport, ModuleState, Router, SandboxEvent, SandboxMsg, SandboxSupervisorArgs,
    FAILURES_TOPIC,
};
use mesh_actors::store::ContentStore;
use mesh_actors::trust::TrustPolicy;
use mesh_transport::admin::{AdminConnection, AdminServer};
use mesh_transport::libp2p::PeerId;
use mesh_transport::swarm::{self, BlobRequest, BlobResponse, NetEvent, SwarmConfig, SwarmHandle};
use mesh_transport::{wire, ContentId, PublicKey, SecretKey};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::config::NodeConfig;
use crate::proto::{
    BlobState, FailureInfo, FirmwareFailureInfo, FirmwareInfo, ModulesInfo, NodeFirmware,
    NodeModules, PeerRequest, PeerResponse, PublishInfo, ReleaseInfo, Request, Response,
    StatusInfo, LOG_LINES_MAX, PEER_RELEASES_MAX, REQUEST_BYTES_MAX,
};

/// The gossipsub topic for node reports (health, labels, modules).
pub const REPORTS_TOPIC: &str = "mesh/reports/1";
/// Module log lines queued between sandboxes and the node's log pump.
pub const LOG_QUEUE_MAX: usize = 4096;
/// Sandbox events queued for the node (crashes, failures, rejections).
pub const SANDBOX_EVENTS_MAX: usize = 1024;
/// Messages modules published, waiting to be gossiped and delivered locally; when full,
/// `publish` tells the module `E_FULL`.
pub const OUTBOX_MAX: usize = 1024;
/// Failure reports (this node's and those heard from peers) kept for `mesh modules`; the
/// same number as the store keeps on disk, so a restart shows what was shown before.
pub const FAILURES_KEPT_MAX: usize = mesh_actors::store::FAILURE_REPORTS_KEPT_MAX;
/// Admin requests served at once per connection; more wait for the QUIC stream limit.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;
/// The smallest burst a rate cap allows, so one chunk-group response always fits.
const RATE_BURST_MIN: u64 = 256 * 1024;
/// How long an actor query from the admin endpoint may take.
const QUERY: Duration = Duration::from_secs(5);
/// How often a node asks one connected peer (in turn) for its releases, besides on
/// connect: gossip is best effort (a node that just restarted is not in the gossip mesh
/// for a heartbeat or two), so a release it missed is caught up within this. A list is
/// a few kilobytes of manifests, cheap at this rate.
const RELEASE_SYNC_INTERVAL: Duration = Duration::from_secs(15);

/// What a running node writes to `STATE/run.json`, so the demo, tests and scripts can
/// find its real addresses when it listens on port 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub node: PublicKey,
    pub peer_id: String,
    pub pid: u32,
    pub listen: Vec<String>,
    pub admin: String,
}

impl RunInfo {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("run.json")
    }

    pub fn read(state_dir: &Path) -> anyhow::Result<RunInfo> {
        let path = Self::path(state_dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Waits for an agent process just started with `--state state` to write its run.json,
/// failing if it exits first or does not come up by `deadline`. Used wherever agents
/// are started as child processes (the demo, the chaos harness).
pub async fn wait_for_agent(
    name: &str,
    child: &mut tokio::process::Child,
    state: &Path,
    log: &Path,
    deadline: Instant,
) -> anyhow::Result<RunInfo> {
    let pid = child.id().unwrap_or(0);
    loop {
        if let Ok(info) = RunInfo::read(state) {
            if info.pid == pid {
                return Ok(info);
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "starting {name}: the agent exited with {status}; see {}",
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "starting {name}: it did not come up in time; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// State shared by the admin handlers and pumps.
struct Ctx {
    key: PublicKey,
    started: Instant,
    started_unix_ms: u64,
    config: NodeConfig,
    swarm: SwarmHandle,
    store: Arc<ContentStore>,
    engine: SandboxEngine,
    addrs: NodeAddrs,
    /// Delivers published messages straight into subscribed modules' inboxes.
    router: Router,
    transfers: Transfers,
    policy: TrustPolicy,
    admin_addr: String,
    listen: Mutex<Vec<String>>,
    logs: Mutex<VecDeque<LogLine>>,
    /// Releases reported failed, newest last.
    failures: Mutex<VecDeque<FailureInfo>>,
    /// Firmware failures peers reported, newest last.
    firmware_failures: Mutex<VecDeque<FirmwareFailureInfo>>,
    /// Failure-report writes to the store waiting or running.
    failure_writes: Arc<tokio::sync::Semaphore>,
}

/// How a node's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to shut down.
    Shutdown,
    /// The firmware actor asked for a restart into the active slot of the agent's own
    /// target (activation or rollback); the agent exits for its launcher to start it.
    Restart(String),
}

/// Loads the node key, creating it on first start.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<SecretKey> {
    if path.exists() {
        return SecretKey::load(path).with_context(|| "loading the node key");
    }
    let key = SecretKey::generate();
    key.save(path).with_context(|| "creating the node key")?;
    tracing::info!(path = %path.display(), node = %key.public(), "created a new node identity");
    Ok(key)
}

/// Runs a node until `shutdown` completes, the firmware actor asks for a restart, or its
/// supervision tree gives up.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Exit> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
    let key = load_or_create_key(&config.key_path)?;
    let store_dir = config.state_dir.join("store");
    let store = Arc::new(
        ContentStore::open(&store_dir)
            .with_context(|| format!("opening the content store in {}", store_dir.display()))?,
    );
    if let Some(max) = config.store_bytes_max {
        store.set_bytes_max(max);
    }
    let engine = SandboxEngine::with_config(config.sandbox.engine.clone())
        .context("starting the wasm engine")?;
    let kv_path = config.state_dir.join("kv.redb");
    let kv = Arc::new(
        KvStore::open(&kv_path)
            .with_context(|| format!("opening module state in {}", kv_path.display()))?,
    );
    let (outbox_tx, outbox_rx) = tokio::sync::mpsc::channel(OUTBOX_MAX);
    let now = Instant::now();
    let bucket = |rate: Option<u64>| {
        rate.map(|r| {
            Arc::new(Mutex::new(TokenBucket::new(
                r,
                (r / 4).max(RATE_BURST_MIN),
                now,
            )))
        })
    };
    let transfers = Transfers::default();

    let swarm_config = SwarmConfig {
        listen: config.listen.clone(),
        bootstrap: config.bootstrap.clone(),
        blob_port: config.blob_port,
        topics: vec![
            RELEASES_TOPIC.to_string(),
            REPORTS_TOPIC.to_string(),
            HAVE_TOPIC.to_string(),
            APP_TOPIC.to_string(),
            FAILURES_TOPIC.to_string(),
            FIRMWARE_FAILURES_TOPIC.to_string(),
        ],
        ..SwarmConfig::default()
    };
    let (swarm, mut net_events) = swarm::spawn(&key, swarm_config)
        .await
        .context("starting the mesh transport")?;
    let mut listen = Vec::new();
    while let Ok(NetEvent::Listening { addr }) = net_events.try_recv() {
        listen.push(addr.to_string());
    }

    let admin = AdminServer::bind(config.admin, &key, config.operators.clone())
        .with_context(|| format!("binding the admin endpoint on {}", config.admin))?;
    let admin_addr = admin.local_addr().to_string();

    let (logs_tx, mut logs_rx) = tokio::sync::mpsc::channel(LOG_QUEUE_MAX);
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(SANDBOX_EVENTS_MAX);
    let addrs = NodeAddrs::default();
    // The agent's own target exists only under a launcher, which says so in the
    // environment; device targets come from the config file.
    let mut targets: Vec<TargetConfig> = config.firmware.clone();
    let launched = TargetConfig::agent_from_env();
    targets.extend(launched.clone());
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::channel::<String>(1);
    let router = Router::default();
    let node_args = NodeArgs {
        store: store.clone(),
        swarm: swarm.clone(),
        transfers: transfers.clone(),
        upload_limit: bucket(config.upload_bytes_per_s),
        download_limit: bucket(config.download_bytes_per_s),
        policy: config.policy.clone(),
        sandbox: SandboxSupervisorArgs {
            engine: engine.clone(),
            config: config.sandbox.clone(),
            logs: logs_tx,
            events: events_tx,
            services: HostServices {
                kv: Some(kv),
                sensors: Arc::new(config.sensors.clone()),
                outbox: Some(outbox_tx),
            },
            store: Some(store.clone()),
            router: router.clone(),
        },
        restart: config.sandbox.restart.clone(),
        addrs: addrs.clone(),
        firmware: FirmwareSetup {
            config: FirmwareConfig {
                dir: config.state_dir.join("firmware"),
                targets,
            },
            shared: Default::default(),
            restart: launched.is_some().then_some(restart_tx),
        },
    };
    let (supervisor, mut supervisor_done) = NodeSupervisor::start(node_args)
        .await
        .map_err(|e| anyhow::anyhow!("starting the node's supervision tree: {e}"))?;

    let failures = stored_failures(&store);
    let ctx = Arc::new(Ctx {
        key: key.public(),
        started: Instant::now(),
        started_unix_ms: mesh_actors::unix_ms(),
        policy: config.policy.clone(),
        config: config.clone(),
        swarm: swarm.clone(),
        store,
        engine,
        addrs,
        router,
        transfers,
        admin_addr: admin_addr.clone(),
        listen: Mutex::new(listen.clone()),
        logs: Mutex::new(VecDeque::new()),
        failures: Mutex::new(failures),
        firmware_failures: Mutex::new(VecDeque::new()),
        failure_writes: Arc::new(tokio::sync::Semaphore::new(FAILURE_WRITES_PENDING_MAX)),
    });

    let run_info = RunInfo {
        node: key.public(),
        peer_id: swarm.local_peer().to_string(),
        pid: std::process::id(),
        listen: listen.clone(),
        admin: admin_addr.clone(),
    };
    mesh_transport::fsutil::write_atomic(
        &RunInfo::path(&config.state_dir),
        serde_json::to_string_pretty(&run_info)?.as_bytes(),
        0o644,
    )
    .context("writing run.json")?;
    tracing::info!(node = %key.public(), listen = ?listen, admin = %admin_addr, labels = ?config.labels, "node started");

    // Module log lines: to the node's log and to a bounded ring for `mesh logs`.
    let c = ctx.clone();
    tokio::spawn(async move {
        while let Some(line) = logs_rx.recv().await {
            tracing::info!(target: "module", "{} v{}: {}", line.module, line.version, line.text);
            let mut ring = c.logs.lock().unwrap_or_else(|e| e.into_inner());
            if ring.len() >= LOG_LINES_MAX {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    });
    tokio::spawn(sandbox_events(ctx.clone(), events_rx));
    tokio::spawn(outbox_pump(ctx.clone(), outbox_rx));
    tokio::spawn(net_pump(ctx.clone(), net_events));
    tokio::spawn(report_loop(ctx.clone()));
    tokio::spawn(release_sync_loop(ctx.clone()));
    tokio::spawn(admin_loop(ctx.clone(), admin));

    let exit = tokio::select! {
        _ = shutdown => Exit::Shutdown,
        Some(why) = restart_rx.recv() => Exit::Restart(why),
        _ = &mut supervisor_done => bail!("the node's supervision tree stopped: a node actor exceeded its restart intensity"),
    };
    tracing::info!(?exit, "shutting down");
    supervisor.stop(Some("shutdown".into()));
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut supervisor_done).await;
    // Closing the connections tells peers at once; otherwise they keep the dead
    // connections until their idle timeout, and a restart would find them there.
    ctx.swarm.close().await;
    Ok(exit)
}

/// Logs what happens to modules and gossips the releases that failed here.
async fn sandbox_events(ctx: Arc<Ctx>, mut events: tokio::sync::mpsc::Receiver<SandboxEvent>) {
    while let Some(ev) = events.recv().await {
        match &ev {
            SandboxEvent::Started { name, version } => {
                tracing::info!(module = %name, version, "module running")
            }
            SandboxEvent::Crashed {
                name,
                version,
                reason,
                restart_in,
            } => {
                tracing::warn!(module = %name, version, ?restart_in, "module crashed: {reason}")
            }
            SandboxEvent::Failed {
                name,
                version,
                reason,
                ..
            } => {
                tracing::error!(module = %name, version, "module failed, not restarting: {reason}")
            }
            SandboxEvent::RolledBack {
                name,
                from,
                to,
                reason,
                ..
            } => {
                tracing::error!(module = %name, from, to, "module rolled back: {reason}")
            }
            SandboxEvent::Rejected {
                name,
                version,
                reason,
            } => {
                tracing::error!(module = %name, version, "module rejected: {reason}")
            }
        }
        if let Some(report) = ev.failure_report() {
            remember_failure(&ctx, ctx.key.short(), report.clone());
            // No subscribed peer yet is normal for a lone node; the report stays in this
            // node's list and its modules' status either way.
            if let Err(e) = ctx.swarm.publish(FAILURES_TOPIC, report.encode()).await {
                tracing::info!(module = %report.name, "failure report not sent now: {e}");
            }
        }
    }
}

/// Failure-report writes to the store waiting or running at once. Reports are rare; a
/// peer flooding them must not queue unbounded blocking work and one disk sync per
/// message. Past this, a report is kept in memory only (and said so in the log).
const FAILURE_WRITES_PENDING_MAX: usize = 16;

/// Keeps a failure report in memory for `mesh modules` and in the store, so that it is
/// still known after a restart.
fn remember_failure(ctx: &Ctx, reporter: String, report: FailureReport) {
    match ctx.failure_writes.clone().try_acquire_owned() {
        Ok(permit) => {
            let store = ctx.store.clone();
            let (who, bytes) = (reporter.clone(), report.encode());
            // A database write waits for the disk; reports are rare, but not on the
            // runtime. The permit goes with the write, so it is returned however it ends.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                if let Err(e) = store.record_failure_report(&who, &bytes) {
                    tracing::warn!("storing a failure report from {who}: {e}");
                }
            });
        }
        Err(_) => tracing::warn!(
            "not storing a failure report from {reporter}: {FAILURE_WRITES_PENDING_MAX} writes are already pending; it is kept in memory only"
        ),
    }
    let mut list = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    if list.len() >= FAILURES_KEPT_MAX {
        list.pop_front();
    }
    list.push_back(FailureInfo { reporter, report });
}

/// The failure reports the store kept from earlier runs, oldest first. One that does not
/// decode is skipped: the node runs on without it.
fn stored_failures(store: &ContentStore) -> VecDeque<FailureInfo> {
    let rows = match store.failure_reports() {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!("reading the failure reports kept from earlier runs: {e}");
            return VecDeque::new();
        }
    };
    // The store keeps at most FAILURE_REPORTS_KEPT_MAX (= FAILURES_KEPT_MAX) of them.
    let mut out = VecDeque::with_capacity(rows.len());
    for (reporter, bytes) in rows {
        match FailureReport::decode(&bytes) {
            Ok(report) => out.push_back(FailureInfo { reporter, report }),
            Err(e) => tracing::warn!("skipping a stored failure report from {reporter}: {e}"),
        }
    }
    out
}

/// Carries messages modules published: to every other node over gossip, and to this
/// node's own subscribers (gossipsub does not deliver a node's messages to itself).
async fn outbox_pump(ctx: Arc<Ctx>, mut outbox: tokio::sync::mpsc::Receiver<Published>) {
    while let Some(m) = outbox.recv().await {
        // A subscriber whose inbox is full or that is not running loses the message;
        // its usage counts it.
        ctx.router.deliver(&m.topic, Arc::from(&m.data[..]));
        if let Err(e) = ctx.swarm.publish(APP_TOPIC, m.encode()).await {
            tracing::debug!(module = %m.module, "gossiping a published message: {e}");
        }
    }
}

/// Routes swarm events to the actors that own them.
async fn net_pump(ctx: Arc<Ctx>, mut events: tokio::sync::mpsc::Receiver<NetEvent>) {
    let a = &ctx.addrs;
    while let Some(ev) = events.recv().await {
        let sent = match ev {
            NetEvent::Listening { addr } => {
                ctx.listen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(addr.to_string());
                Ok(())
            }
            NetEvent::PeerConnected { peer, addr } => {
                // Catch up: ask every newly connected peer what it has.
                tokio::spawn(sync_releases(ctx.clone(), peer));
                a.peers.try_send(PeersMsg::Connected { peer, addr })
            }
            NetEvent::PeerDisconnected { peer } => {
                ctx.transfers.forget_peer(&peer);
                a.peers.try_send(PeersMsg::Disconnected { peer })
            }
            NetEvent::PeerRtt { peer, rtt } => a.peers.try_send(PeersMsg::Rtt { peer, rtt }),
            NetEvent::PeerIdentified {
                peer,
                agent,
                listen_addrs,
            } => a.peers.try_send(PeersMsg::Identified {
                peer,
                agent,
                addrs: listen_addrs,
            }),
            NetEvent::Gossip {
                author,
                topic,
                data,
                via,
            } => on_gossip(&ctx, author, via, &topic, &data),
            NetEvent::GossipRefused { via, topic, reason } => {
                // Every node checks an envelope before relaying it, so whoever handed us
                // one that does not check out forged it or relays unchecked.
                tracing::warn!(via = %short_peer(&via), %topic, "a peer relayed a gossip message that does not check out: {reason}");
                ctx.transfers.forget_peer(&via);
                // Awaited here, not spawned, so a flood of refusals before the ban
                // lands costs a bounded queue rather than a task each. The driver never
                // waits on this pump (it drops events when the queue is full).
                ctx.swarm
                    .penalize(
                        via,
                        LIAR_BAN,
                        format!("relayed a forged message on {topic}"),
                    )
                    .await;
                Ok(())
            }
            NetEvent::BlobRequested {
                peer,
                request,
                reply,
            } => {
                // A full store mailbox drops the responder, which answers Busy.
                a.store.try_send(StoreMsg::Serve {
                    peer,
                    request,
                    reply,
                })
            }
            NetEvent::RpcRequested {
                peer,
                request,
                reply,
            } => {
                let c = ctx.clone();
                tokio::spawn(async move {
                    let answer = answer_peer(&c, &request).await;
                    tracing::debug!(peer = %short_peer(&peer), "answered a peer request");
                    reply.send(answer);
                });
                Ok(())
            }
        };
        if let Err(e) = sent {
            tracing::debug!("routing a swarm event: {e}");
        }
    }
}

fn on_gossip(
    ctx: &Ctx,
    author: PeerId,
    via: PeerId,
    topic: &str,
    data: &[u8],
) -> Result<(), MailboxError> {
    match topic {
        // The announcer (the message's signed author) holds the content; the relaying
        // peer may not.
        RELEASES_TOPIC => match SignedManifest::decode(data) {
            Ok(signed) => ctx.addrs.releases.try_send(ReleaseMsg::Offer {
                signed,
                from: Some(author),
            }),
            Err(e) => {
                tracing::warn!(via = %short_peer(&via), "dropped a malformed release announcement: {e}");
                Ok(())
            }
        },
        REPORTS_TOPIC => {
            let Ok(report) = NodeReport::decode(data) else {
                tracing::debug!(via = %short_peer(&via), "dropped a malformed node report");
                return Ok(());
            };
            ctx.addrs
                .peers
                .try_send(PeersMsg::Report { author, report })
        }
        HAVE_TOPIC => {
            match HaveAnnouncement::decode(data) {
                Ok(have) => ctx.transfers.on_have(author, have, Instant::now()),
                Err(_) => {
                    tracing::debug!(via = %short_peer(&via), "dropped a malformed have-announcement")
                }
            }
            Ok(())
        }
        APP_TOPIC => match Published::decode(data) {
            Ok(m) => {
                ctx.router.deliver(&m.topic, m.data.into());
                Ok(())
            }
            Err(e) => {
                tracing::debug!(via = %short_peer(&via), "dropped a published message: {e}");
                Ok(())
            }
        },
        FAILURES_TOPIC => {
            match FailureReport::decode(data) {
                Ok(report) => {
                    tracing::warn!(node = %short_peer(&author), module = %report.name, version = report.version, "a peer reports a failed release: {}", report.reason);
                    remember_failure(ctx, short_peer(&author), report);
                }
                Err(_) => {
                    tracing::debug!(via = %short_peer(&via), "dropped a malformed failure report")
                }
            }
            Ok(())
        }
        FIRMWARE_FAILURES_TOPIC => {
            match FirmwareFailure::decode(data) {
                Ok(report) => {
                    tracing::warn!(node = %short_peer(&author), target = %report.target, version = report.version, "a peer reports firmware that failed its trial: {}", report.reason);
                    let mut list = ctx
                        .firmware_failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if list.len() >= FAILURES_KEPT_MAX {
                        list.pop_front();
                    }
                    list.push_back(FirmwareFailureInfo {
                        reporter: short_peer(&author),
                        report,
                    });
                }
                Err(_) => {
                    tracing::debug!(via = %short_peer(&via), "dropped a malformed firmware failure report")
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Anti-entropy: every [`RELEASE_SYNC_INTERVAL`], the release list of the next connected
/// peer in turn, so a release whose gossip this node missed still arrives.
async fn release_sync_loop(ctx: Arc<Ctx>) {
    let mut interval = tokio::time::interval(RELEASE_SYNC_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once; connecting already asked every peer.
    interval.tick().await;
    let mut turn = 0usize;
    loop {
        interval.tick().await;
        let Some(info) = ctx.swarm.info().await else {
            return;
        };
        let mut connected: Vec<PeerId> = info
            .connected
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        if connected.is_empty() {
            continue;
        }
        connected.sort();
        let peer = connected[turn % connected.len()];
        turn = turn.wrapping_add(1);
        sync_releases(ctx.clone(), peer).await;
    }
}

async fn sync_releases(ctx: Arc<Ctx>, peer: PeerId) {
    let request = wire::encode(&PeerRequest::Releases).expect("encoding a static request");
    let bytes = match ctx.swarm.rpc(peer, request).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(peer = %short_peer(&peer), "asking a peer for its releases: {e}");
            return;
        }
    };
    let Ok(PeerResponse::Releases(list)) =
        wire::decode::<PeerResponse>(&bytes, swarm::RPC_BYTES_MAX)
    else {
        tracing::debug!(peer = %short_peer(&peer), "peer sent no usable release list");
        return;
    };
    for raw in list.into_iter().take(PEER_RELEASES_MAX) {
        match SignedManifest::decode(&raw) {
            Ok(signed) => {
                let _ = ctx.addrs.releases.try_send(ReleaseMsg::Offer {
                    signed,
                    from: Some(peer),
                });
            }
            Err(e) => {
                tracing::warn!(peer = %short_peer(&peer), "peer listed a malformed release: {e}")
            }
        }
    }
}

async fn answer_peer(ctx: &Ctx, request: &[u8]) -> Vec<u8> {
    match wire::decode::<PeerRequest>(request, swarm::RPC_BYTES_MAX) {
        Ok(PeerRequest::Releases) => {
            let store = ctx.store.clone();
            let list = tokio::task::spawn_blocking(move || store.current_releases())
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            let encoded = list
                .iter()
                .take(PEER_RELEASES_MAX)
                .map(|s| s.encode())
                .collect();
            wire::encode(&PeerResponse::Releases(encoded)).unwrap_or_default()
        }
        Ok(PeerRequest::Firmware) => {
            let targets = ctx
                .addrs
                .firmware
                .call(FirmwareMsg::Status, QUERY)
                .await
                .unwrap_or_default();
            wire::encode(&PeerResponse::Firmware(targets)).unwrap_or_default()
        }
        Err(_) => Vec::new(),
    }
}

/// Reports stretch their interval by one `report_interval` per this many connected
/// peers. Every node checks the signature of every copy of every report it receives,
/// so at a fixed interval the fleet's cost of reports grows with its size squared (at
/// 32 nodes on two cores, ed25519 checks took a tenth of the CPU); stretched, each node
/// hears about the same number of reports a second however large the fleet.
pub const REPORT_PEERS_PER_INTERVAL: usize = 8;

async fn report_loop(ctx: Arc<Ctx>) {
    let mut seq = 0u64;
    loop {
        if seq > 0 {
            let peers = ctx.swarm.info().await.map_or(0, |i| i.connected.len());
            let stretch = (peers / REPORT_PEERS_PER_INTERVAL).max(1) as u32;
            tokio::time::sleep(ctx.config.report_interval * stretch).await;
        }
        seq += 1;
        let modules = ctx
            .addrs
            .sandbox
            .call(SandboxMsg::List, QUERY)
            .await
            .unwrap_or_default();
        let report = NodeReport {
            node: ctx.key,
            seq,
            started_unix_ms: ctx.started_unix_ms,
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: ctx.config.labels.clone(),
            admin: Some(ctx.admin_addr.clone()),
            modules,
        };
        // No subscribed peer yet is the normal state of a lone node.
        let _ = ctx.swarm.publish(REPORTS_TOPIC, report.encode()).await;
    }
}

async fn admin_loop(ctx: Arc<Ctx>, admin: AdminServer) {
    let limit = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    while let Some(conn) = admin.accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(remote = %conn.remote_addr(), "too many admin connections, closing one");
            conn.close("too many admin connections");
            continue;
        };
        tracing::info!(operator = %conn.operator().short(), remote = %conn.remote_addr(), "operator attached");
        let c = ctx.clone();
        tokio::spawn(async move {
            serve_admin(c, conn).await;
            drop(permit);
        });
    }
}

async fn serve_admin(ctx: Arc<Ctx>, conn: AdminConnection) {
    while let Some((mut send, mut recv)) = conn.accept_stream().await {
        let c = ctx.clone();
        let operator = conn.operator();
        tokio::spawn(async move {
            let response = match wire::read_frame::<_, Request>(&mut recv, REQUEST_BYTES_MAX).await
            {
                Ok(req) => handle_request(&c, operator, req, &mut recv).await,
                Err(e) => Response::Error(format!("reading the request: {e}")),
            };
            if let Err(e) = wire::write_frame(&mut send, &response).await {
                tracing::debug!("writing an admin response: {e}");
            }
            let _ = send.finish();
        });
    }
}

async fn handle_request(
    ctx: &Ctx,
    operator: PublicKey,
    req: Request,
    recv: &mut mesh_transport::quinn::RecvStream,
) -> Response {
    let a = &ctx.addrs;
    match req {
        Request::Status => {
            let peers = a
                .peers
                .call(PeersMsg::List, QUERY)
                .await
                .unwrap_or_default();
            let modules = a
                .sandbox
                .call(SandboxMsg::List, QUERY)
                .await
                .unwrap_or_default();
            Response::Status(StatusInfo {
                node: ctx.key,
                peer_id: ctx.swarm.local_peer().to_string(),
                listen: ctx.listen.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                admin: ctx.admin_addr.clone(),
                labels: ctx.config.labels.clone(),
                uptime_ms: ctx.started.elapsed().as_millis() as u64,
                version: env!("CARGO_PKG_VERSION").to_string(),
                peers_alive: peers.iter().filter(|p| p.state == PeerState::Alive).count(),
                peers_known: peers.len(),
                modules_running: modules
                    .iter()
                    .filter(|m| m.state == ModuleState::Running)
                    .count(),
                releases: ctx.store.current_releases().map(|r| r.len()).unwrap_or(0),
                blobs: ctx.store.blob_count(),
                blob_bytes: ctx.store.bytes_stored(),
            })
        }
        Request::Peers => match a.peers.call(PeersMsg::List, QUERY).await {
            Ok(p) => Response::Peers(p),
            Err(e) => Response::Error(format!("listing peers: {e}")),
        },
        Request::Modules { all } => {
            let local = match a.sandbox.call(SandboxMsg::List, QUERY).await {
                Ok(m) => m,
                Err(e) => return Response::Error(format!("listing modules: {e}")),
            };
            let mesh = if all {
                a.peers
                    .call(PeersMsg::List, QUERY)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| NodeModules {
                        node: p.node,
                        labels: p.labels,
                        alive: p.state == PeerState::Alive,
                        modules: p.modules,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Response::Modules(ModulesInfo {
                local: NodeModules {
                    node: Some(ctx.key),
                    labels: ctx.config.labels.clone(),
                    alive: true,
                    modules: local,
                },
                mesh,
                failures: ctx
                    .failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect(),
            })
        }
        Request::Releases => match a.releases.call(ReleaseMsg::List, QUERY).await {
            Ok(list) => Response::Releases(list.iter().map(ReleaseInfo::from).collect()),
            Err(e) => Response::Error(format!("listing releases: {e}")),
        },
        Request::Logs { module, limit } => {
            let limit = (limit as usize).min(LOG_LINES_MAX);
            let ring = ctx.logs.lock().unwrap_or_else(|e| e.into_inner());
            let mut lines: Vec<LogLine> = ring
                .iter()
                .rev()
                .filter(|l| module.as_ref().is_none_or(|m| &l.module == m))
                .take(limit)
                .cloned()
                .collect();
            lines.reverse();
            Response::Logs(lines)
        }
        Request::Transfers => Response::Transfers(ctx.transfers.list(Instant::now())),
        Request::Blob { id } => {
            let size = ctx.store.size_of(&id);
            let partial = ctx
                .transfers
                .list(Instant::now())
                .into_iter()
                .find(|t| t.id == id);
            Response::Blob(BlobState {
                id,
                complete: size.is_some(),
                size: size.or(partial.as_ref().map(|t| t.size)),
                have_bytes: size.or(partial.map(|t| t.have_bytes)).unwrap_or(0),
            })
        }
        Request::Fetch { id } => match fetch_by_hash(ctx, id).await {
            Ok((size, complete)) => Response::Fetching { id, size, complete },
            Err(e) => Response::Error(format!("{e:#}")),
        },
        Request::PutBlob { id, size } => match put_blob(ctx, id, size, recv).await {
            Ok(()) => {
                tracing::info!(operator = %operator.short(), content = %id.short(), size, "operator stored a blob");
                Response::Stored { id, size }
            }
            Err(e) => Response::Error(format!("{e:#}")),
        },
        Request::Firmware { all } => Response::Firmware(firmware_info(ctx, all).await),
        Request::Publish { manifest } => match publish(ctx, operator, &manifest, recv).await {
            Ok(info) => Response::Published(info),
            Err(e) => {
                tracing::warn!(operator = %operator.short(), "publish refused: {e:#}");
                Response::Error(format!("{e:#}"))
            }
        },
    }
}

/// Accepts a release from the operator: trust check before any byte is read, content
/// streamed into the store and verified against the manifest's hash, module compiled
/// before it is recorded. A refused publish leaves nothing behind.
async fn publish(
    ctx: &Ctx,
    operator: PublicKey,
    raw: &[u8],
    recv: &mut mesh_transport::quinn::RecvStream,
) -> anyhow::Result<PublishInfo> {
    let signed = SignedManifest::decode(raw).context("decoding the release manifest")?;
    let m = signed.manifest.clone();
    let current = ctx
        .store
        .current_release(m.kind, &m.name)
        .context("reading the installed release")?
        .map(|s| s.manifest.version);
    ctx.policy
        .check(&signed, mesh_actors::unix_ms() / 1000, current)
        .context("checking the release")?;
    let already = ctx.store.has(&m.content);
    if !already {
        receive_content(ctx, m.content, m.size, recv).await?;
    } else {
        // The content is already here (an earlier publish of the same bytes); the
        // operator's copy is read and discarded so the stream ends cleanly.
        drain(recv, m.size).await?;
    }
    let cleanup = |ctx: &Ctx| {
        if !already {
            let _ = ctx.store.remove(&m.content);
        }
    };
    if m.kind == ReleaseKind::Module {
        let store = ctx.store.clone();
        let engine = ctx.engine.clone();
        let id = m.content;
        let compiled = tokio::task::spawn_blocking(move || {
            let bytes = store.read(&id).map_err(|e| e.to_string())?;
            engine
                .compile(&bytes)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await?;
        if let Err(e) = compiled {
            cleanup(ctx);
            bail!("module {} v{} does not compile: {e}", m.name, m.version);
        }
    }
    let verdict = ctx
        .addrs
        .releases
        .call(|reply| ReleaseMsg::Publish { signed, reply }, QUERY)
        .await
        .context("handing the release to the trust actor")?;
    if let Err(rejection) = verdict {
        cleanup(ctx);
        bail!("checking the release: {rejection}");
    }
    let peers = ctx
        .swarm
        .info()
        .await
        .map(|i| i.connected.len())
        .unwrap_or(0);
    tracing::info!(operator = %operator.short(), release = %m.name, version = m.version, "operator published a release");
    Ok(PublishInfo {
        name: m.name,
        version: m.version,
        content: m.content,
        size: m.size,
        peers,
    })
}

/// Starts a download of a blob named only by its hash. Its size comes from the peers
/// that hold it; a peer lying about the size cannot make a wrong blob verify, because
/// the BLAKE3 tree of a blob commits to its length.
async fn fetch_by_hash(ctx: &Ctx, id: ContentId) -> anyhow::Result<(u64, bool)> {
    if let Some(size) = ctx.store.size_of(&id) {
        return Ok((size, true));
    }
    let mut size = ctx
        .transfers
        .providers(&id)
        .into_iter()
        .find_map(|(p, _)| ctx.transfers.announced_size(&id, &p));
    let mut hint = Vec::new();
    if size.is_none() {
        let peers: Vec<PeerId> = ctx
            .swarm
            .info()
            .await
            .map(|i| i.connected.iter().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default();
        for peer in peers.into_iter().take(FETCH_QUERY_PEERS_MAX) {
            if let Ok(BlobResponse::Have { size: s, .. }) =
                ctx.swarm.request_blob(peer, BlobRequest::Have { id }).await
            {
                size = Some(s);
                hint.push(peer);
                break;
            }
        }
    }
    let size = size.with_context(|| format!("fetching {id}: no connected peer has it"))?;
    if size
        > ctx
            .policy
            .firmware_bytes_max
            .max(ctx.policy.module_bytes_max)
    {
        bail!("fetching {id}: peers say it has {size} bytes, over this node's blob limit");
    }
    let fetch = FetchCtx {
        swarm: ctx.swarm.clone(),
        store: ctx.store.clone(),
        transfers: ctx.transfers.clone(),
        download_limit: None,
    };
    tokio::spawn(async move {
        match mesh_actors::fetch::download(&fetch, id, size, &format!("blob {}", id.short()), &hint)
            .await
        {
            Ok(r) => {
                tracing::info!(content = %id.short(), bytes = r.bytes, ms = r.elapsed.as_millis() as u64, "fetch complete")
            }
            Err(e) => tracing::warn!("{e}"),
        }
    });
    Ok((size, false))
}

/// Peers asked for a blob's size when nobody has announced it.
const FETCH_QUERY_PEERS_MAX: usize = 16;

/// Content bytes are read in pieces of this size from the operator's stream.
const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;

/// Stores a blob the operator uploads: a firmware patch that a release will name. It is
/// verified against its hash like any content; only firmware releases name such blobs,
/// so the firmware size limit applies.
async fn put_blob(
    ctx: &Ctx,
    id: ContentId,
    size: u64,
    recv: &mut mesh_transport::quinn::RecvStream,
) -> anyhow::Result<()> {
    if size == 0 || size > ctx.policy.firmware_bytes_max {
        bail!(
            "storing blob {id}: {size} bytes is outside 1..={}",
            ctx.policy.firmware_bytes_max
        );
    }
    if ctx.store.has(&id) {
        return drain(recv, size).await;
    }
    receive_content(ctx, id, size, recv)
        .await
        .with_context(|| format!("storing blob {id}"))
}

/// This node's firmware targets, from its firmware actor, and with `all` each connected
/// peer's, asked over rpc.
async fn firmware_info(ctx: &Ctx, all: bool) -> FirmwareInfo {
    let local = NodeFirmware {
        node: Some(ctx.key),
        labels: ctx.config.labels.clone(),
        targets: ctx
            .addrs
            .firmware
            .call(FirmwareMsg::Status, QUERY)
            .await
            .ok(),
    };
    let mut mesh = Vec::new();
    if all {
        let peers = ctx
            .addrs
            .peers
            .call(PeersMsg::List, QUERY)
            .await
            .unwrap_or_default();
        let asks = peers
            .into_iter()
            .filter(|p| p.state == PeerState::Alive)
            .filter_map(|p| Some((p.peer_id.parse::<PeerId>().ok()?, p)))
            .map(|(id, p)| async move {
                let request = wire::encode(&PeerRequest::Firmware).expect("a static request");
                let answer = tokio::time::timeout(QUERY, ctx.swarm.rpc(id, request)).await;
                let targets = match answer {
                    Ok(Ok(bytes)) => {
                        match wire::decode::<PeerResponse>(&bytes, swarm::RPC_BYTES_MAX) {
                            Ok(PeerResponse::Firmware(t)) => Some(t),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                NodeFirmware {
                    node: p.node,
                    labels: p.labels,
                    targets,
                }
            });
        mesh = futures::future::join_all(asks).await;
    }
    FirmwareInfo {
        local,
        mesh,
        failures: ctx
            .firmware_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect(),
    }
}

async fn receive_content(
    ctx: &Ctx,
    id: ContentId,
    size: u64,
    recv: &mut mesh_transport::quinn::RecvStream,
) -> anyhow::Result<()> {
    let mut writer = ctx
        .store
        .writer(id, size)
        .context("preparing to store the content")?;
    let mut buf = vec![0u8; UPLOAD_CHUNK_BYTES];
    let mut received = 0u64;
    while received < size {
        let want = ((size - received) as usize).min(buf.len());
        let n = recv
            .read(&mut buf[..want])
            .await
            .context("receiving the content")?
            .unwrap_or(0);
        if n == 0 {
            bail!("receiving the content: the stream ended after {received} of {size} bytes");
        }
        writer.write(&buf[..n]).context("storing the content")?;
        received += n as u64;
    }
    let mut extra = [0u8; 1];
    if recv
        .read(&mut extra)
        .await
        .context("receiving the content")?
        .unwrap_or(0)
        != 0
    {
        bail!("receiving the content: more bytes than the declared size of {size}");
    }
    tokio::task::spawn_blocking(move || writer.finish())
        .await?
        .context("verifying the content against the manifest")?;
    Ok(())
}

async fn drain(recv: &mut mesh_transport::quinn::RecvStream, size: u64) -> anyhow::Result<()> {
    let mut limited = recv.take(size + 1);
    let n = tokio::io::copy(&mut limited, &mut tokio::io::sink())
        .await
        .context("receiving the content")?;
    if n != size {
        bail!("receiving the content: got {n} bytes, the manifest says {size}");
    }
    Ok(())
}
