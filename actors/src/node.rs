//! The node supervisor and the children it restarts: store, peers, trust (releases), the
//! sandbox supervisor and the firmware actor.
//!
//! Other parts of the node hold an [`Addr`] for each child rather than an actor ref, so
//! that a restarted child is reached through the same handle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mesh_transport::libp2p::PeerId;
use mesh_transport::swarm::{BlobRequest, BlobResponse, Responder, SwarmHandle};
use mesh_transport::ContentId;

use crate::backlog::Backlog;
use crate::bucket::TokenBucket;
use crate::fetch::{FetchCtx, Transfers};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::firmware::{FirmwareActor, FirmwareArgs, FirmwareMsg, FirmwareSetup};
use crate::mailbox::{BoundedRef, Envelope, MailboxError};
use crate::peers::{PeersActor, PeersMsg};
use crate::releases::{ReleaseActor, ReleaseArgs, ReleaseMsg};
use crate::restart::{RestartBudget, RestartDecision, RestartPolicy};
use crate::sandbox_supervisor::{spawn_sandbox_supervisor, SandboxMsg, SandboxSupervisorArgs};
use crate::seeding::{Decision, Seeding};
use crate::store::ContentStore;
use crate::trust::TrustPolicy;

/// Swarm events for one peer arrive in bursts (connect, identify, ping, report); a few
/// thousand queued means the node is far behind and new ones should be dropped.
pub const PEERS_MAILBOX_MAX: usize = 4096;
/// Offers come from gossip and release lists; each is small and checked quickly.
pub const RELEASES_MAILBOX_MAX: usize = 1024;
/// Range requests waiting for the disk; beyond this peers are told `Busy`.
pub const STORE_MAILBOX_MAX: usize = 256;
/// How fast the background scrub re-hashes stored blobs: a 1 GiB store is checked
/// about every four minutes, at a few percent of one core, leaving the disk to serving.
pub const SCRUB_BYTES_PER_S: u64 = 4 * 1024 * 1024;
/// How often the store actor scrubs a little and starts the repairs of damaged blobs.
pub const SCRUB_TICK: Duration = Duration::from_secs(1);
/// Repairs (downloads of quarantined blobs) running at once; the rest wait a tick.
pub const REPAIRS_CONCURRENT_MAX: usize = 2;
/// Attempts to fetch a damaged blob again before it is left to the releases that name
/// it (no peer may hold it any more).
pub const REPAIR_ATTEMPTS_MAX: u32 = 5;
/// Wait between two attempts to fetch a damaged blob again.
pub const REPAIR_RETRY: Duration = Duration::from_secs(10);

/// A handle to a child actor that survives the child's restarts.
pub struct Addr<M>(Arc<RwLock<Option<BoundedRef<M>>>>);

impl<M> Clone for Addr<M> {
    fn clone(&self) -> Self {
        Addr(self.0.clone())
    }
}

impl<M> Default for Addr<M> {
    fn default() -> Self {
        Addr(Arc::new(RwLock::new(None)))
    }
}

impl<M: Send + 'static> Addr<M> {
    pub fn set(&self, r: Option<BoundedRef<M>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = r;
    }

    fn get(&self) -> Result<BoundedRef<M>, MailboxError> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(MailboxError::Gone)
    }

    pub fn try_send(&self, msg: M) -> Result<(), MailboxError> {
        self.get()?.try_send(msg)
    }

    pub async fn call<R: Send + 'static>(
        &self,
        make: impl FnOnce(RpcReplyPort<R>) -> M,
        timeout: Duration,
    ) -> Result<R, MailboxError> {
        self.get()?.call(make, timeout).await
    }
}

/// Blob requests served at once (each reads from disk and hashes what it sends).
pub const SERVES_CONCURRENT_MAX: usize = 8;
/// Blob requests served at once to one peer, so one greedy peer cannot take them all;
/// twice what a well-behaved downloader keeps in flight, for slack.
pub const SERVES_PER_PEER_MAX: usize = 2 * crate::schedule::PEER_IN_FLIGHT_MAX;
/// The longest a served response counts as queued on the uplink while its
/// acknowledgement is awaited. Downloaders size requests to half a second of the peer's
/// rate and a server queues at most `backlog::BACKLOG_MAX` (a second), so a response
/// not acknowledged after four is held up by a peer that stopped reading or vanished,
/// not by the uplink, and must not keep the node answering busy.
pub const DELIVERY_WAIT_MS_MAX: u64 = 4_000;

/// Messages to the store actor.
pub enum StoreMsg {
    Serve {
        peer: PeerId,
        request: BlobRequest,
        reply: Responder<BlobResponse>,
    },
    /// A serve task finished (frees the peer's slot).
    Served { peer: PeerId },
    /// Scrub a little, and start repairs of quarantined blobs (every [`SCRUB_TICK`]).
    Tick,
    /// The scrub finished checking a blob.
    Scrubbed,
    /// A repair download ended.
    Repaired {
        id: ContentId,
        size: u64,
        result: Result<(), String>,
    },
}

/// What the store actor needs.
#[derive(Clone)]
pub struct StoreArgs {
    pub store: Arc<ContentStore>,
    pub transfers: Transfers,
    /// The node's upload cap; `None` is unlimited.
    pub upload_limit: Option<Arc<Mutex<TokenBucket>>>,
    pub myself: Addr<StoreMsg>,
    /// For fetching damaged blobs again.
    pub fetch: FetchCtx,
}

pub struct StoreState {
    args: StoreArgs,
    serving: Arc<tokio::sync::Semaphore>,
    per_peer: HashMap<PeerId, usize>,
    /// What this node sent lately, per blob, shared with the serve tasks.
    seeding: Arc<Mutex<Seeding>>,
    /// Responses queued on this node's uplink and its measured rate, shared with the
    /// serve tasks that queue them and hear of their delivery.
    backlog: Arc<Mutex<Backlog>>,
    /// The scrub's place in its walk over the store, and its byte allowance.
    scrub: ScrubState,
    /// Damaged blobs to fetch again: (id, size, attempts so far, not before).
    repairs: Vec<(ContentId, u64, u32, Instant)>,
    /// Repairs whose download runs, and scrub checks that run (0 or 1). Counted by
    /// [`Running`] guards held by the tasks, so a completion message lost to a full
    /// mailbox, or a task that panicked, cannot leave them stuck.
    repairing: Arc<AtomicUsize>,
    scrubbing: Arc<AtomicUsize>,
}

/// The backlog, even if a task panicked while holding the lock: its methods change
/// nothing before their only assertion, so what the lock guards stays consistent.
fn lock_backlog(b: &Mutex<Backlog>) -> std::sync::MutexGuard<'_, Backlog> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds one unit of a running count for as long as a background task lives.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn start(count: &Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::SeqCst);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The background scrub, pure: each tick earns [`SCRUB_BYTES_PER_S`] worth of
/// allowance, and the next blob is checked once the allowance covers it.
#[derive(Debug, Default)]
pub struct ScrubState {
    cursor: Option<ContentId>,
    credit: u64,
    busy: bool,
}

impl ScrubState {
    /// Earns `elapsed`'s allowance; returns whether a blob of `next_size` may be checked
    /// now (and spends it). The allowance is capped at what the next blob needs, so an
    /// idle scrub does not save up for a burst.
    pub fn earn_and_spend(&mut self, elapsed: Duration, next_size: u64) -> bool {
        if self.busy {
            return false;
        }
        let earned = (SCRUB_BYTES_PER_S as f64 * elapsed.as_secs_f64()) as u64;
        self.credit = self.credit.saturating_add(earned).min(next_size.max(1));
        if self.credit >= next_size {
            self.credit -= next_size;
            self.busy = true;
            return true;
        }
        false
    }
}

/// Serves blob groups (from complete blobs and from downloads in progress) and
/// have-queries to peers, within the upload cap and the serving limits.
pub struct StoreActor;

impl Actor for StoreActor {
    type Msg = Envelope<StoreMsg>;
    type State = StoreState;
    type Arguments = StoreArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StoreArgs,
    ) -> Result<StoreState, ActorProcessingErr> {
        let me = BoundedRef::new(myself, STORE_MAILBOX_MAX);
        args.myself.set(Some(me.clone()));
        // The tick task holds this actor's own handle, so it ends with the actor (a
        // restarted store actor starts its own).
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(SCRUB_TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if me.try_send(StoreMsg::Tick) == Err(MailboxError::Gone) {
                    return;
                }
            }
        });
        Ok(StoreState {
            args,
            serving: Arc::new(tokio::sync::Semaphore::new(SERVES_CONCURRENT_MAX)),
            per_peer: HashMap::new(),
            seeding: Arc::new(Mutex::new(Seeding::new())),
            backlog: Arc::new(Mutex::new(Backlog::new(Instant::now()))),
            scrub: ScrubState::default(),
            repairs: Vec::new(),
            repairing: Arc::new(AtomicUsize::new(0)),
            scrubbing: Arc::new(AtomicUsize::new(0)),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        state: &mut StoreState,
    ) -> Result<(), ActorProcessingErr> {
        match envelope.msg {
            StoreMsg::Tick => state.tick(),
            StoreMsg::Scrubbed => state.scrub.busy = false,
            StoreMsg::Repaired { id, size, result } => {
                match result {
                    Ok(()) => {
                        tracing::info!(blob = %id.short(), size, "damaged blob repaired from peers")
                    }
                    Err(e) => {
                        let attempts = state
                            .repairs
                            .iter()
                            .find(|r| r.0 == id)
                            .map(|r| r.2)
                            .unwrap_or(REPAIR_ATTEMPTS_MAX);
                        if attempts < REPAIR_ATTEMPTS_MAX {
                            tracing::warn!(blob = %id.short(), attempts, "fetching a damaged blob again: {e}; trying later");
                        } else {
                            tracing::error!(blob = %id.short(), attempts, "giving up fetching a damaged blob again: {e}");
                        }
                    }
                }
                let done = state.args.store.has(&id);
                state
                    .repairs
                    .retain(|r| r.0 != id || (!done && r.2 < REPAIR_ATTEMPTS_MAX));
            }
            StoreMsg::Served { peer } => {
                if let Some(n) = state.per_peer.get_mut(&peer) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        state.per_peer.remove(&peer);
                    }
                }
            }
            StoreMsg::Serve {
                peer,
                request,
                reply,
            } => {
                let busy = state.per_peer.get(&peer).copied().unwrap_or(0) >= SERVES_PER_PEER_MAX;
                // Ranges wait for the uplink once served; what a peer holds is answered
                // whatever is queued, as it is small and tells the peer where else to go.
                let queue_full = matches!(request, BlobRequest::Groups { .. })
                    && !lock_backlog(&state.backlog).admits(Instant::now());
                let Ok(permit) = state.serving.clone().try_acquire_owned() else {
                    reply.send(BlobResponse::Busy);
                    return Ok(());
                };
                if busy || queue_full {
                    reply.send(BlobResponse::Busy);
                    return Ok(());
                }
                *state.per_peer.entry(peer).or_insert(0) += 1;
                let args = state.args.clone();
                let seeding = state.seeding.clone();
                let backlog = state.backlog.clone();
                tokio::spawn(async move {
                    let (a, r) = (args.clone(), request.clone());
                    let response = tokio::task::spawn_blocking(move || {
                        let from = Server {
                            seeding: &seeding,
                            peer: &peer,
                            now: Instant::now(),
                        };
                        serve(&a.store, &a.transfers, &from, &r)
                    })
                    .await
                    .unwrap_or_else(|e| BlobResponse::Invalid(e.to_string()));
                    let queued = match &response {
                        BlobResponse::Encoded(bytes) => bytes.len() as u64,
                        _ => 0,
                    };
                    if queued > 0 {
                        lock_backlog(&backlog).on_queued(queued, Instant::now());
                    }
                    if let (Some(limit), BlobResponse::Encoded(bytes)) =
                        (&args.upload_limit, &response)
                    {
                        let wait = limit
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take(bytes.len() as u64, Instant::now());
                        tokio::time::sleep(wait).await;
                    }
                    // The slot is freed before the peer sees the reply, so its next
                    // request (sent on receipt) never finds its own old request
                    // still counted. A full mailbox only delays freeing it.
                    let _ = args.myself.try_send(StoreMsg::Served { peer });
                    drop(permit);
                    if queued == 0 {
                        reply.send(response);
                        return;
                    }
                    // The bytes stay counted until the peer acknowledged them (or the
                    // transport gave up on them), which is when the uplink carried them.
                    let fate = reply.send_tracked(response);
                    let wait = Duration::from_millis(DELIVERY_WAIT_MS_MAX);
                    let delivered = matches!(tokio::time::timeout(wait, fate).await, Ok(Ok(true)));
                    lock_backlog(&backlog).on_done(queued, delivered, Instant::now());
                });
            }
        }
        Ok(())
    }
}

impl StoreState {
    /// One scrub step within its allowance, and the repairs that are due.
    fn tick(&mut self) {
        let store = self.args.store.clone();
        let now = Instant::now();
        for (id, size) in store.take_damaged() {
            if !self.repairs.iter().any(|r| r.0 == id) {
                self.repairs.push((id, size, 0, now));
            }
        }
        // Held again (repaired, or fetched for another reason): nothing left to do.
        self.repairs.retain(|r| !store.has(&r.0));
        if self.scrubbing.load(Ordering::SeqCst) == 0 {
            self.scrub.busy = false;
        }
        for r in self.repairs.iter_mut() {
            if self.repairing.load(Ordering::SeqCst) >= REPAIRS_CONCURRENT_MAX {
                break;
            }
            if r.3 > now || r.2 >= REPAIR_ATTEMPTS_MAX || store.has(&r.0) {
                continue;
            }
            r.2 += 1;
            r.3 = now + REPAIR_RETRY;
            let running = Running::start(&self.repairing);
            let (id, size) = (r.0, r.1);
            let fetch = self.args.fetch.clone();
            let myself = self.args.myself.clone();
            tokio::spawn(async move {
                let _running = running;
                let label = format!("repair of damaged blob {}", id.short());
                let result = crate::fetch::download(&fetch, id, size, &label, &[])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = myself.try_send(StoreMsg::Repaired { id, size, result });
            });
        }
        let Some((id, size)) = store.next_blob(self.scrub.cursor.as_ref()) else {
            return;
        };
        if !self.scrub.earn_and_spend(SCRUB_TICK, size) {
            return;
        }
        self.scrub.cursor = Some(id);
        let myself = self.args.myself.clone();
        let running = Running::start(&self.scrubbing);
        tokio::spawn(async move {
            let _running = running;
            // A damaged blob is quarantined and queued for repair by `verify` itself.
            let _ = tokio::task::spawn_blocking(move || store.verify(&id)).await;
            let _ = myself.try_send(StoreMsg::Scrubbed);
        });
    }
}

/// Who is asking, and what this node sent lately (see [`crate::seeding`]).
pub struct Server<'a> {
    pub seeding: &'a Mutex<Seeding>,
    pub peer: &'a PeerId,
    pub now: Instant,
}

impl Server<'_> {
    /// Decides on a request for groups of a blob this node holds whole.
    fn decide(&self, id: ContentId, size: u64, start: u64, end: u64) -> Decision {
        if !crate::verified::is_valid_range(size, start, end) {
            // Not a valid request: the encoder refuses it, and it must not count as sent
            // (a peer could otherwise hold back every group from the others).
            return Decision::Serve;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(self.peer, &mut h);
        let tag = std::hash::Hasher::finish(&h);
        self.seeding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .decide(
                id,
                crate::verified::groups_of(size),
                tag,
                start,
                end,
                self.now,
            )
    }
}

/// Answers one blob request from the store or a download in progress.
pub fn serve(
    store: &ContentStore,
    transfers: &Transfers,
    from: &Server<'_>,
    request: &BlobRequest,
) -> BlobResponse {
    match request {
        BlobRequest::Have { id } => {
            if let Some(size) = store.size_of(id) {
                return BlobResponse::Have {
                    size,
                    ranges: vec![(0, crate::verified::groups_of(size))],
                };
            }
            match transfers.partial(id) {
                Some(p) => {
                    let p = p.lock().unwrap_or_else(|e| e.into_inner());
                    BlobResponse::Have {
                        size: p.size(),
                        ranges: p
                            .ranges()
                            .into_iter()
                            .take(mesh_transport::swarm::HAVE_RUNS_MAX)
                            .collect(),
                    }
                }
                None => BlobResponse::NotFound,
            }
        }
        BlobRequest::Groups { id, start, end } => {
            if let Some(size) = store.size_of(id) {
                if let Decision::Elsewhere(fresh) = from.decide(*id, size, *start, *end) {
                    return BlobResponse::Elsewhere { fresh };
                }
                return serve_complete(store, id, size, *start, *end);
            }
            match transfers.partial(id) {
                Some(p) => {
                    // A node still fetching serves what it holds to whoever asks (see
                    // `crate::seeding` for why it does not super-seed).
                    let p = p.lock().unwrap_or_else(|e| e.into_inner());
                    match p.encode(*start, *end) {
                        Ok(bytes) => BlobResponse::Encoded(bytes),
                        Err(_) => BlobResponse::NotFound,
                    }
                }
                None => BlobResponse::NotFound,
            }
        }
    }
}

fn serve_complete(
    store: &ContentStore,
    id: &mesh_transport::ContentId,
    size: u64,
    start: u64,
    end: u64,
) -> BlobResponse {
    let opened = store.outboard_path(id).and_then(|ob| {
        let io = |source| crate::store::ReadError::Io {
            action: format!("opening blob {id} to serve it"),
            source,
        };
        let data = std::fs::File::open(store.blob_path(id)).map_err(io)?;
        let ob = std::fs::File::open(ob).map_err(io)?;
        Ok((data, ob))
    });
    let (data, ob) = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(content = %id.short(), "serving a blob: {e}");
            return BlobResponse::NotFound;
        }
    };
    match crate::verified::encode_complete(id, &data, size, &ob, start, end) {
        Ok(bytes) => BlobResponse::Encoded(bytes),
        Err(crate::verified::VerifiedError::OutOfRange { .. }) => {
            BlobResponse::Invalid(format!("groups {start}..{end} are not a valid request"))
        }
        Err(e) => {
            // Validated encoding found the blob or its outboard damaged on disk: say
            // nothing rather than send bad data. Re-hashing the whole blob tells which:
            // a damaged blob is quarantined and fetched again, a damaged outboard is
            // dropped and computed again on the next request.
            tracing::error!(content = %id.short(), "refusing to serve a damaged blob: {e}");
            if store.verify(id).is_ok() {
                store.drop_outboard(id);
            }
            BlobResponse::NotFound
        }
    }
}

/// The handles through which the rest of the node reaches the tree.
#[derive(Clone, Default)]
pub struct NodeAddrs {
    pub store: Addr<StoreMsg>,
    pub peers: Addr<PeersMsg>,
    pub releases: Addr<ReleaseMsg>,
    pub sandbox: Addr<SandboxMsg>,
    pub firmware: Addr<FirmwareMsg>,
}

/// Everything the node supervisor needs to start (and restart) its children.
pub struct NodeArgs {
    pub store: Arc<ContentStore>,
    pub swarm: SwarmHandle,
    pub transfers: Transfers,
    pub upload_limit: Option<Arc<Mutex<TokenBucket>>>,
    pub download_limit: Option<Arc<Mutex<TokenBucket>>>,
    pub policy: TrustPolicy,
    pub sandbox: SandboxSupervisorArgs,
    pub restart: RestartPolicy,
    pub addrs: NodeAddrs,
    /// Firmware targets, and what outlives a restart of the firmware actor.
    pub firmware: FirmwareSetup,
}

impl NodeArgs {
    fn fetch_ctx(&self) -> FetchCtx {
        FetchCtx {
            swarm: self.swarm.clone(),
            store: self.store.clone(),
            transfers: self.transfers.clone(),
            download_limit: self.download_limit.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Child {
    Store,
    Peers,
    Releases,
    Sandbox,
    Firmware,
}

/// The trust actor starts last, so that the modules and firmware it hands on find their
/// receivers running.
const CHILDREN: [Child; 5] = [
    Child::Store,
    Child::Peers,
    Child::Sandbox,
    Child::Firmware,
    Child::Releases,
];

pub struct NodeState {
    args: NodeArgs,
    running: Vec<(Child, ActorCell, RestartBudget)>,
}

/// The root of the node's tree. One-for-one: a failed child is restarted alone, within
/// its restart budget; a child that exhausts its budget stops the node supervisor, which
/// the agent treats as fatal (the process exits non-zero and its launcher restarts it).
pub struct NodeSupervisor;

pub enum NodeMsg {
    /// A child whose restart delay has passed.
    Restart(usize),
}

impl NodeSupervisor {
    /// Starts the tree; the returned handle completes when the supervisor stops.
    pub async fn start(
        args: NodeArgs,
    ) -> Result<(ActorRef<NodeMsg>, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        Actor::spawn(None, NodeSupervisor, args).await
    }
}

async fn spawn_child(
    child: Child,
    args: &NodeArgs,
    me: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    let a = &args.addrs;
    let cell = match child {
        Child::Store => {
            let store_args = StoreArgs {
                store: args.store.clone(),
                transfers: args.transfers.clone(),
                upload_limit: args.upload_limit.clone(),
                myself: a.store.clone(),
                fetch: args.fetch_ctx(),
            };
            let (r, _) = Actor::spawn_linked(None, StoreActor, store_args, me).await?;
            r.get_cell()
        }
        Child::Peers => {
            let (r, _) = Actor::spawn_linked(None, PeersActor, (), me).await?;
            a.peers
                .set(Some(BoundedRef::new(r.clone(), PEERS_MAILBOX_MAX)));
            r.get_cell()
        }
        Child::Sandbox => {
            let (r, _) = spawn_sandbox_supervisor(args.sandbox.clone(), Some(me)).await?;
            let cell = r.actor().get_cell();
            a.sandbox.set(Some(r));
            cell
        }
        Child::Releases => {
            let release_args = ReleaseArgs {
                policy: args.policy.clone(),
                store: args.store.clone(),
                swarm: args.swarm.clone(),
                fetch: args.fetch_ctx(),
                sandbox: a.sandbox.clone(),
                peers: a.peers.clone(),
                firmware: a.firmware.clone(),
                myself: a.releases.clone(),
            };
            // The actor sets its own address in pre_start, before it starts the tick
            // task that sends to it.
            let (r, _) = Actor::spawn_linked(None, ReleaseActor, release_args, me).await?;
            r.get_cell()
        }
        Child::Firmware => {
            let firmware_args = FirmwareArgs {
                config: args.firmware.config.clone(),
                store: args.store.clone(),
                fetch: args.fetch_ctx(),
                swarm: args.swarm.clone(),
                bytes_max: args.policy.firmware_bytes_max,
                shared: args.firmware.shared.clone(),
                restart: args.firmware.restart.clone(),
                myself: a.firmware.clone(),
            };
            // Like the trust actor, it sets its own address in pre_start.
            let (r, _) = Actor::spawn_linked(None, FirmwareActor, firmware_args, me).await?;
            r.get_cell()
        }
    };
    Ok(cell)
}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        args: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let mut running = Vec::new();
        let now = Instant::now();
        for child in CHILDREN {
            let cell = spawn_child(child, &args, myself.get_cell()).await?;
            let mut budget = RestartBudget::new(args.restart.clone());
            budget.on_start(now);
            running.push((child, cell, budget));
        }
        tracing::debug!("node supervision tree started");
        Ok(NodeState { args, running })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Restart(i) => {
                let child = state.running[i].0;
                let cell = spawn_child(child, &state.args, myself.get_cell()).await?;
                state.running[i].1 = cell;
                state.running[i].2.on_start(Instant::now());
                tracing::warn!(?child, "restarted node actor");
                if child == Child::Sandbox {
                    // A new sandbox supervisor starts empty; the installed modules are
                    // the trust actor's to hand over again.
                    if let Err(e) = state.args.addrs.releases.try_send(ReleaseMsg::Redeploy) {
                        tracing::error!("redeploying modules after a sandbox restart: {e}");
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<NodeMsg>,
        event: SupervisionEvent,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let (who, reason) = match &event {
            SupervisionEvent::ActorFailed(who, err) => (who.get_id(), err.to_string()),
            SupervisionEvent::ActorTerminated(who, _, reason) => (
                who.get_id(),
                reason.clone().unwrap_or_else(|| "stopped".into()),
            ),
            _ => return Ok(()),
        };
        let Some(i) = state.running.iter().position(|(_, c, _)| c.get_id() == who) else {
            return Ok(());
        };
        let child = state.running[i].0;
        match state.running[i].2.on_failure(Instant::now()) {
            RestartDecision::Restart { delay, attempt } => {
                tracing::error!(?child, %reason, attempt, ?delay, "node actor failed, restarting");
                self.clear_addr(child, &state.args.addrs);
                let me = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = me.cast(NodeMsg::Restart(i));
                });
            }
            RestartDecision::GiveUp { restarts, period } => {
                tracing::error!(?child, %reason, restarts, ?period, "node actor exceeded its restart intensity, stopping the node");
                myself.stop(Some(format!(
                    "{child:?} failed {restarts} times within {period:?}: {reason}"
                )));
            }
        }
        Ok(())
    }
}

impl NodeSupervisor {
    fn clear_addr(&self, child: Child, a: &NodeAddrs) {
        match child {
            Child::Store => a.store.set(None),
            Child::Peers => a.peers.set(None),
            Child::Releases => a.releases.set(None),
            Child::Sandbox => a.sandbox.set(None),
            Child::Firmware => a.firmware.set(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_holders_redirect_repeats_partial_holders_serve_them_and_invalid_ranges_hold_nothing(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let blob: Vec<u8> = (0..64 * crate::verified::GROUP_BYTES)
            .map(|i| (i % 251) as u8)
            .collect();
        let id = ContentId::of(&blob);
        store.put(&id, &blob).unwrap();
        let transfers = Transfers::default();
        let seeding = Mutex::new(Seeding::new());
        let peer = |n: u8| {
            mesh_transport::SecretKey::from_seed([n; 32])
                .public()
                .peer_id()
                .unwrap()
        };
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let ask = |who: &PeerId, start: u64, end: u64| {
            let from = Server {
                seeding: &seeding,
                peer: who,
                now: Instant::now(),
            };
            serve(
                &store,
                &transfers,
                &from,
                &BlobRequest::Groups { id, start, end },
            )
        };
        assert!(matches!(ask(&a, 0, 16), BlobResponse::Encoded(_)));
        // A range no valid request has is refused and holds nothing back.
        assert!(matches!(ask(&c, 0, u64::MAX), BlobResponse::Invalid(_)));
        assert!(matches!(ask(&b, 16, 32), BlobResponse::Encoded(_)));
        // What went to A is not sent to B again while both fetch: B is pointed at the
        // groups nobody was sent.
        match ask(&b, 0, 16) {
            BlobResponse::Elsewhere { fresh } => assert_eq!(fresh, vec![(32, 64)]),
            r => panic!("expected a redirect, got {r:?}"),
        }

        // A node still fetching the blob serves what it holds to every peer that asks,
        // the same groups too: they are what the fleet needs most from it.
        let BlobResponse::Encoded(head) = ask(&a, 0, 16) else {
            panic!("the complete holder serves what it sent the same peer");
        };
        let dir2 = tempfile::tempdir().unwrap();
        let fetching = ContentStore::open(dir2.path()).unwrap();
        let mut partial =
            crate::verified::PartialBlob::open(fetching.downloads_dir(), id, blob.len() as u64)
                .unwrap();
        partial.receive(0, 16, &head);
        assert_eq!(partial.have_groups(), 16);
        let transfers = Transfers::default();
        transfers.insert_partial(std::sync::Arc::new(Mutex::new(partial)));
        for who in [&a, &b, &c, &a] {
            let from = Server {
                seeding: &seeding,
                peer: who,
                now: Instant::now(),
            };
            let r = serve(
                &fetching,
                &transfers,
                &from,
                &BlobRequest::Groups {
                    id,
                    start: 0,
                    end: 16,
                },
            );
            assert!(matches!(r, BlobResponse::Encoded(_)), "got {r:?}");
        }
    }

    #[test]
    fn the_scrub_checks_a_blob_once_its_allowance_covers_it_and_saves_no_more() {
        let mut s = ScrubState::default();
        let big = 3 * SCRUB_BYTES_PER_S;
        assert!(!s.earn_and_spend(SCRUB_TICK, big));
        assert!(!s.earn_and_spend(SCRUB_TICK, big));
        assert!(s.earn_and_spend(SCRUB_TICK, big));
        // One at a time: nothing while a check runs.
        assert!(!s.earn_and_spend(Duration::from_secs(100), 1));
        s.busy = false;
        // A long idle spell earns only what the next blob needs.
        assert!(s.earn_and_spend(Duration::from_secs(1000), 10));
        s.busy = false;
        assert!(!s.earn_and_spend(Duration::ZERO, 10));
    }
}
