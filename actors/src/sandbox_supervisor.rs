//! The sandbox supervisor: one actor per module, restarted under a [`RestartBudget`],
//! admitted against the node's budget, swapped without losing messages, and rolled back
//! to its previous version when a new one keeps failing.
//!
//! [`SandboxSupervisor`] owns a [`ModuleActor`] per module name, linked as its child, and
//! a [`QuotaActor`] that decides admission. A module actor instantiates the module and
//! calls its `init` export while starting, then calls `on_tick` every `tick_interval` and
//! `on_message` for every message on a topic it subscribed to; a trap, a missed deadline
//! or a memory limit makes it fail, and the supervisor (one-for-one: only that module is
//! touched) asks the module's budget whether to restart it after a backoff or give up on
//! it. Giving up on a version that replaced an older one escalates: the older version
//! (still in the content store) runs again and the failure is reported to the mesh.
//!
//! See `docs/runtime-semantics.md` for the same rules from the operator's side.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use mesh_transport::wire::{self, WireError};
use mesh_transport::ContentId;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::host::HostServices;
use crate::mailbox::{BoundedRef, Envelope, MailboxError};
use crate::manifest::{Quotas, ReleaseKind};
use crate::quota::{
    AdmissionError, CpuMeter, ModuleQuotas, QuotaActor, QuotaMsg, QuotaPolicy, Usage, UsageFigures,
};
use crate::restart::{RestartBudget, RestartDecision, RestartPolicy};
use crate::sandbox::{
    CallError, CompiledModule, EngineConfig, InstanceSetup, InstantiateError, LogLine, Sandbox,
    SandboxEngine, DEFAULT_LOG_LINE_BYTES_MAX,
};
use crate::store::ContentStore;

/// Messages the supervisor may hold at once. Deploys and status queries are rare and
/// restart timers add at most one message per module (published messages do not pass
/// through here, see [`Router`]); a thousand absorbs any burst of those (a redeploy of
/// every module at once) at a trivial cost in memory.
pub const SANDBOX_MAILBOX_MESSAGES_MAX: usize = 1024;
/// Messages waiting for one module; more are dropped (and counted) so a slow subscriber
/// cannot hold the node's memory. Published messages go straight into inboxes, so this is
/// also what absorbs a burst (and the messages that arrive during a hot swap): at most
/// 2 MiB of payloads per module (`PUBLISH_BYTES_MAX` each), shared between subscribers.
pub const MODULE_MESSAGES_QUEUED_MAX: usize = 256;
/// One hand-off of a module's messages to a blocking thread goes on taking the messages
/// that arrive while it runs for at most this long, so a burst pays for one hand-off,
/// while a tick or a hot swap's snapshot request waits at most this long (plus one call).
pub const DRAIN_SLICE_MS: u64 = 5;
/// A drain that has emptied the inbox waits this long for more messages before it hands
/// the module back: the messages of a stream that arrive within this of each other are
/// taken by the blocking call already running instead of costing a new hand-off each
/// (a `Drain` to the actor, a blocking thread woken, the actor woken again). The wait
/// holds a blocking thread, not a core, and stays within [`DRAIN_SLICE_MS`].
pub const DRAIN_LINGER_US: u64 = 1000;
/// Default time between two `on_tick` calls: once a second suits sensor sampling and
/// keeps an idle module's cost negligible.
pub const DEFAULT_TICK_MS: u64 = 1000;
/// A restart timer that finds the supervisor's mailbox full tries again this much later,
/// rather than losing the restart.
pub const RESTART_RETRY_MS: u64 = 50;
/// Extra time the supervisor gives a module actor to answer a snapshot request beyond
/// the module's own call deadline (the request may wait behind one message).
pub const SWAP_SLACK_MS: u64 = 2_000;
/// The old version's last drain before its snapshot stops after this long, well inside
/// [`SWAP_SLACK_MS`], so a steady stream of messages cannot outlast the swap's wait.
pub const SNAPSHOT_DRAIN_MS_MAX: u64 = SWAP_SLACK_MS / 2;
/// Names whose deploy was refused while nothing ran under them, kept for `List`; a
/// node runs a few dozen modules, so more refused names than this are only logged.
pub const REFUSED_NAMES_MAX: usize = 64;
/// The gossipsub topic on which nodes report releases that failed on them.
pub const FAILURES_TOPIC: &str = "mesh/failures/1";
/// A failure report is a name, two versions and a reason; anything larger is hostile.
pub const FAILURE_REPORT_BYTES_MAX: usize = 4 * 1024;
/// The reason in a failure report is cut to this many bytes.
pub const FAILURE_REASON_BYTES_MAX: usize = 1024;

/// How the supervisor runs modules.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// Defaults, caps and the node's budget for module quotas.
    pub quotas: QuotaPolicy,
    /// Longer log lines are cut at a character boundary and marked truncated.
    pub log_line_bytes_max: usize,
    pub restart: RestartPolicy,
    pub tick_interval: Duration,
    /// How the node's engine is built (the node creates it from this).
    pub engine: EngineConfig,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            quotas: QuotaPolicy::default(),
            log_line_bytes_max: DEFAULT_LOG_LINE_BYTES_MAX,
            restart: RestartPolicy::default(),
            tick_interval: Duration::from_millis(DEFAULT_TICK_MS),
            engine: EngineConfig::default(),
        }
    }
}

/// A module version to run, with its bytes already fetched and verified by the caller.
#[derive(Clone)]
pub struct Deployment {
    pub name: String,
    pub version: u64,
    pub content: ContentId,
    pub bytes: Arc<[u8]>,
    /// What the release's manifest asks for; the node's policy fills gaps and caps.
    pub quotas: Quotas,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("content", &self.content)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// What the sandbox supervisor is asked to do.
#[derive(Debug)]
pub enum SandboxMsg {
    /// Run this version if it is newer than the one the supervisor has.
    Deploy(Deployment),
    /// Report every module the supervisor knows, sorted by name.
    List(RpcReplyPort<Vec<ModuleStatus>>),
    /// Internal: a backoff has elapsed. Only acted on if `generation` is still the
    /// module's current one, so a timer that outlived a redeploy does nothing.
    RestartDue { name: String, generation: u64 },
    /// Internal: a version exhausted its restart budget; run the previous one if the
    /// store still has it. Same generation rule as `RestartDue`.
    RollBack { name: String, generation: u64 },
}

/// One module as [`SandboxMsg::List`] reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub name: String,
    pub version: u64,
    pub content: ContentId,
    pub state: ModuleState,
    /// Restarts of this version since it was deployed (not only those in the window).
    pub restarts: u32,
    /// When the module entered `state`.
    pub since_unix_ms: u64,
    /// Log lines dropped (over the log rate, or the node's log channel was full).
    pub logs_dropped: u64,
    /// The quotas the module runs under, after the node's defaults and caps.
    pub quotas: ModuleQuotas,
    /// What the module has used (across restarts and versions of this name).
    pub usage: UsageFigures,
    pub subscriptions: Vec<String>,
    /// Set when this version runs because a newer one failed.
    pub rolled_back_from: Option<RolledBackFrom>,
    /// The last deploy of this name that was refused, if any, while this one ran on.
    pub last_refusal: Option<Refusal>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolledBackFrom {
    pub version: u64,
    pub reason: String,
    pub unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub version: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ModuleState {
    Starting,
    Running,
    Backoff {
        restart_in_ms: u64,
    },
    Failed {
        reason: String,
    },
    /// Never started on this node: compile, link or admission refused it.
    Refused {
        reason: String,
    },
}

/// What happened to a module, for the node to log and report to the mesh.
#[derive(Clone, Debug)]
pub enum SandboxEvent {
    Started {
        name: String,
        version: u64,
    },
    Crashed {
        name: String,
        version: u64,
        reason: String,
        restart_in: Duration,
    },
    /// The version exhausted its budget and nothing older could take over.
    Failed {
        name: String,
        version: u64,
        content: ContentId,
        reason: String,
    },
    /// The version exhausted its budget and the previous version runs instead.
    RolledBack {
        name: String,
        from: u64,
        content: ContentId,
        to: u64,
        reason: String,
    },
    Rejected {
        name: String,
        version: u64,
        reason: String,
    },
}

impl SandboxEvent {
    /// The failure report this event makes for the mesh, if it is a final failure.
    pub fn failure_report(&self) -> Option<FailureReport> {
        let (name, version, content, reason, rolled_back_to) = match self {
            SandboxEvent::Failed {
                name,
                version,
                content,
                reason,
            } => (name, *version, *content, reason, None),
            SandboxEvent::RolledBack {
                name,
                from,
                content,
                to,
                reason,
            } => (name, *from, *content, reason, Some(*to)),
            _ => return None,
        };
        let (reason, _) = crate::host::truncate_at_char(reason, FAILURE_REASON_BYTES_MAX);
        Some(FailureReport {
            name: name.clone(),
            version,
            content,
            reason: reason.to_string(),
            rolled_back_to,
            unix_ms: crate::unix_ms(),
        })
    }
}

/// A release that failed on a node, as gossiped on [`FAILURES_TOPIC`]. Who reports it is
/// the gossip message's (signed) author.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    pub name: String,
    pub version: u64,
    pub content: ContentId,
    pub reason: String,
    /// The version that runs instead, if the node rolled back.
    pub rolled_back_to: Option<u64>,
    pub unix_ms: u64,
}

/// Errors from decoding a failure report received from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FailureReportError {
    #[error("decoding failure report: {0}")]
    Wire(#[from] WireError),
    #[error("decoding failure report: {0}")]
    Shape(#[from] crate::manifest::ShapeError),
    #[error("decoding failure report: reason of {len} bytes is over {FAILURE_REASON_BYTES_MAX}")]
    Reason { len: usize },
}

impl FailureReport {
    pub fn encode(&self) -> Vec<u8> {
        // Plain strings and numbers always encode; a failure would be a programming error.
        wire::encode(self).expect("failure reports always encode")
    }

    /// Decodes untrusted bytes within [`FAILURE_REPORT_BYTES_MAX`], checking the name.
    pub fn decode(bytes: &[u8]) -> Result<FailureReport, FailureReportError> {
        let r: FailureReport = wire::decode(bytes, FAILURE_REPORT_BYTES_MAX)?;
        crate::manifest::check_name(&r.name)?;
        if r.reason.len() > FAILURE_REASON_BYTES_MAX {
            return Err(FailureReportError::Reason {
                len: r.reason.len(),
            });
        }
        Ok(r)
    }
}

#[derive(Clone)]
pub struct SandboxSupervisorArgs {
    pub engine: SandboxEngine,
    pub config: SandboxConfig,
    pub logs: mpsc::Sender<LogLine>,
    pub events: mpsc::Sender<SandboxEvent>,
    /// Key-value state, sensors and the outbox for published messages.
    pub services: HostServices,
    /// Where previous versions are found for a rollback, and failures are recorded so a
    /// failed release is not run again after a restart. `None`: no rollback.
    pub store: Option<Arc<ContentStore>>,
    /// Where published messages are delivered; the supervisor keeps it current.
    pub router: Router,
}

/// Errors from starting the sandbox supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("spawning sandbox supervisor: {0}")]
    Actor(#[from] ractor::SpawnErr),
}

/// Starts the sandbox supervisor, linked to `parent` when given.
pub async fn spawn_sandbox_supervisor(
    args: SandboxSupervisorArgs,
    parent: Option<ActorCell>,
) -> Result<(BoundedRef<SandboxMsg>, tokio::task::JoinHandle<()>), SpawnError> {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let init = SupervisorInit {
        args,
        in_flight: in_flight.clone(),
    };
    let (actor, handle) = match parent {
        Some(parent) => Actor::spawn_linked(None, SandboxSupervisor, init, parent).await?,
        None => Actor::spawn(None, SandboxSupervisor, init).await?,
    };
    Ok((
        BoundedRef::with_counter(actor, in_flight, SANDBOX_MAILBOX_MESSAGES_MAX),
        handle,
    ))
}

/// Why a module actor stopped working.
#[derive(Debug, thiserror::Error)]
pub enum ModuleFailure {
    #[error("{0}")]
    Instantiate(#[from] InstantiateError),
    #[error("calling {export}: {source}")]
    Call {
        export: &'static str,
        source: CallError,
    },
    #[error("calling {export}: the host task running the call panicked")]
    Panicked { export: &'static str },
}

/// The actor that owns one module's sandbox. Spawned only by [`SandboxSupervisor`].
pub struct ModuleActor;

pub struct ModuleArgs {
    engine: SandboxEngine,
    module: CompiledModule,
    setup: InstanceSetup,
    tick_interval: Duration,
    /// Where the module's subscriptions are published once `init` has run.
    subscriptions: Subscriptions,
    /// Messages routed to this module and not yet handled (shared with the supervisor).
    inbox: Arc<Inbox>,
    kv_used: Option<Arc<crate::kv::KvStore>>,
}

/// A message queued for a module: topic and payload, shared with every other module the
/// message was routed to.
type Queued = (Arc<str>, Arc<[u8]>);

/// The topics a module version subscribed to in `init`.
type Subscriptions = Arc<Mutex<BTreeSet<String>>>;

/// Messages waiting for one module, filled by whoever delivers published messages (see
/// [`Router`]) and emptied by the module actor in batches: one blocking call handles
/// everything that queued up meanwhile, so the cost of reaching the module's thread is
/// paid once per batch, not per message.
#[derive(Debug, Default)]
pub struct Inbox {
    queue: Mutex<InboxQueue>,
    /// Signalled when a message arrives while a drain lingers.
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct InboxQueue {
    messages: VecDeque<Queued>,
    /// A drain is waiting on `arrived` for more messages (see [`DRAIN_LINGER_US`]).
    lingering: bool,
    /// Set while a `Drain` is on its way to the actor or the actor is draining, so no
    /// `Drain` is sent for messages the running drain will take anyway.
    drain_queued: bool,
    /// The topics of the version messages are queued for; checked under this lock, so a
    /// message is queued only for a version that subscribed to its topic.
    subscriptions: Subscriptions,
    /// Who takes the messages.
    drainer: Drainer,
}

/// Who takes the messages of an inbox, as the supervisor last set it.
#[derive(Debug, Default)]
enum Drainer {
    /// No actor runs the module (starting for the first time, backing off, failed):
    /// messages are dropped and counted.
    #[default]
    Stopped,
    /// A hot swap is handing state over: messages wait (bounded) for the next version,
    /// and no `Drain` is sent.
    Held,
    /// This actor runs the module and is sent a `Drain` when messages wait.
    Running(ActorRef<ModuleMsg>),
}

/// What became of a message offered to an inbox.
#[derive(Debug)]
enum Pushed {
    /// The module did not subscribe to the topic.
    NotSubscribed,
    /// Queued, and a drain running or on its way (or the next version) will take it.
    Queued,
    /// Queued, and this actor must be sent a `Drain` for it.
    NeedsDrain(ActorRef<ModuleMsg>),
    /// No actor runs the module, or the inbox is full ([`MODULE_MESSAGES_QUEUED_MAX`]):
    /// dropped.
    Dropped,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message for the module if it subscribed to the topic, waking a lingering
    /// drain or asking for a `Drain` as needed.
    fn push(&self, message: Queued) -> Pushed {
        let (pushed, wake) = {
            let mut q = self.lock();
            let subscribed = q
                .subscriptions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&*message.0);
            if !subscribed {
                return Pushed::NotSubscribed;
            }
            if matches!(q.drainer, Drainer::Stopped)
                || q.messages.len() >= MODULE_MESSAGES_QUEUED_MAX
            {
                return Pushed::Dropped;
            }
            q.messages.push_back(message);
            // A lingering drain waits for the queue to stop being empty: only the push
            // that ends the emptiness needs to wake it. Waking it again for every
            // message of a burst costs a system call each, on the sender's side.
            let wake = q.lingering && q.messages.len() == 1;
            let q = &mut *q;
            let pushed = match &q.drainer {
                Drainer::Running(actor) if !wake && !q.drain_queued => {
                    q.drain_queued = true;
                    Pushed::NeedsDrain(actor.clone())
                }
                _ => Pushed::Queued,
            };
            (pushed, wake)
        };
        if wake {
            self.arrived.notify_one();
        }
        pushed
    }

    /// Hands the inbox to `actor` with the topics its version subscribed to, and sends
    /// it a `Drain` if messages wait. Whatever the flag said before is void: a `Drain`
    /// sent to an earlier actor is lost with it or ignored by its frozen version.
    fn attach(&self, actor: ActorRef<ModuleMsg>, subscriptions: Subscriptions) {
        let kick = {
            let mut q = self.lock();
            q.subscriptions = subscriptions;
            q.drainer = Drainer::Running(actor.clone());
            q.drain_queued = !q.messages.is_empty();
            q.drain_queued
        };
        if kick && actor.cast(ModuleMsg::Drain).is_err() {
            self.drain_lost();
        }
    }

    /// Holds messages for the next version (with its topics) while a swap hands state
    /// over.
    fn hold(&self, subscriptions: Subscriptions) {
        let mut q = self.lock();
        q.subscriptions = subscriptions;
        q.drainer = Drainer::Held;
    }

    /// No actor runs the module any more: messages are dropped until one is attached.
    /// What is queued stays for the next actor.
    fn detach(&self, subscriptions: Subscriptions) {
        let mut q = self.lock();
        q.subscriptions = subscriptions;
        q.drainer = Drainer::Stopped;
        q.drain_queued = false;
    }

    /// A `Drain` could not reach its actor (it just stopped): the next push or the next
    /// attached actor asks afresh.
    fn drain_lost(&self) {
        self.lock().drain_queued = false;
    }

    /// Returns the messages of a batch cut short to the front of the queue, in order,
    /// so the next drain (of this version or, after a swap, the next) delivers them
    /// first. They were in the queue a moment ago, so this can exceed the queue's bound
    /// by at most one batch.
    fn put_back(&self, batch: &mut VecDeque<Queued>) {
        let mut q = self.lock();
        while let Some(m) = batch.pop_back() {
            q.messages.push_front(m);
        }
    }

    /// Moves everything waiting into `batch`, which must be empty (the two buffers swap,
    /// so neither is allocated again), first waiting up to `linger` for a message if
    /// none is there. When nothing comes it clears `drain_queued` while holding the
    /// queue's lock, so a message pushed after that finds the flag clear and sends a new
    /// `Drain`. Returns whether it took anything.
    fn take_into(&self, batch: &mut VecDeque<Queued>, linger: Duration) -> bool {
        debug_assert!(batch.is_empty());
        let mut q = self.lock();
        if q.messages.is_empty() && !linger.is_zero() {
            q.lingering = true;
            q = match self
                .arrived
                .wait_timeout_while(q, linger, |q| q.messages.is_empty())
            {
                Ok((q, _)) => q,
                Err(poisoned) => poisoned.into_inner().0,
            };
            q.lingering = false;
        }
        if q.messages.is_empty() {
            q.drain_queued = false;
            return false;
        }
        std::mem::swap(&mut q.messages, batch);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().messages.len()
    }
}

/// Where published messages go: every module's inbox by name, kept current by the
/// sandbox supervisor and shared with whoever delivers messages (the node's gossip and
/// outbox pumps). A message goes straight into the inboxes of the subscribed modules and
/// wakes their drains, instead of first queueing in the supervisor's mailbox and being
/// routed from there: that hop cost a task wake-up and a mailbox round per burst, on a
/// path every published message takes.
#[derive(Clone, Debug, Default)]
pub struct Router {
    routes: Arc<RwLock<BTreeMap<String, Route>>>,
}

#[derive(Clone, Debug)]
struct Route {
    inbox: Arc<Inbox>,
    usage: Arc<Usage>,
}

impl Router {
    /// Hands a published message to every module subscribed to its topic. A module
    /// that is not running, or whose inbox is full, loses the message, and it is counted
    /// in its usage. Returns how many modules queued it.
    pub fn deliver(&self, topic: &str, data: Arc<[u8]>) -> usize {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        // Made once, on the first module, and shared by every queue it goes into.
        let mut shared_topic: Option<Arc<str>> = None;
        let mut queued = 0;
        for (name, route) in routes.iter() {
            let topic = shared_topic.get_or_insert_with(|| topic.into());
            match route.inbox.push((topic.clone(), data.clone())) {
                Pushed::NotSubscribed => {}
                Pushed::Dropped => Usage::add(&route.usage.messages_dropped, 1),
                Pushed::Queued => queued += 1,
                Pushed::NeedsDrain(actor) => {
                    queued += 1;
                    if actor.cast(ModuleMsg::Drain).is_err() {
                        // The actor just stopped; its successor drains the inbox when
                        // the supervisor attaches it.
                        route.inbox.drain_lost();
                        tracing::debug!(module = %name, "message for a module that just stopped");
                    }
                }
            }
        }
        queued
    }

    fn set(&self, name: &str, inbox: Arc<Inbox>, usage: Arc<Usage>) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), Route { inbox, usage });
    }

    fn clear(&self) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[derive(Debug)]
pub enum ModuleMsg {
    Tick,
    /// Messages are waiting in the inbox.
    Drain,
    /// Take the module's state for its next version and stop running ticks (the
    /// supervisor holds the inbox before asking this, so no further `Drain` is sent here).
    Snapshot(RpcReplyPort<Option<Vec<u8>>>),
    /// Hand the previous version's snapshot to `restore`; answers whether it was taken.
    Restore(Vec<u8>, RpcReplyPort<Result<bool, String>>),
    /// The swap was called off: run ticks again.
    Thaw,
}

pub struct ModuleActorState {
    /// `None` only while a call is running on a blocking thread (it is moved there).
    sandbox: Option<Sandbox>,
    tick_interval: Duration,
    /// Set while a tick is waiting in the mailbox, so the ticker never queues a second.
    tick_queued: Arc<AtomicBool>,
    ticker: Option<AbortOnDrop>,
    cpu: CpuMeter,
    usage: Arc<Usage>,
    inbox: Arc<Inbox>,
    /// The buffer the inbox's messages are swapped into, kept for the next batch.
    batch: VecDeque<Queued>,
    /// Set after a snapshot: the module is being replaced and runs nothing more.
    frozen: bool,
}

/// Delivers `batch`, then whatever else the inbox holds or receives within
/// [`DRAIN_LINGER_US`], until the inbox stays empty (`Ok(false)`) or [`DRAIN_SLICE_MS`]
/// has passed (`Ok(true)`: messages may be left, back in the inbox). Runs on a blocking
/// thread. Each message is checked against the CPU meter and runs under its own deadline;
/// the meter is charged with the call's own start and end times, so the clock is read
/// twice per message and once per batch, not more.
fn run_batches(
    sandbox: &mut Sandbox,
    cpu: &mut CpuMeter,
    usage: &Usage,
    inbox: &Inbox,
    batch: &mut VecDeque<Queued>,
) -> Result<bool, CallError> {
    let started = Instant::now();
    let slice = Duration::from_millis(DRAIN_SLICE_MS);
    let mut now = started;
    loop {
        while let Some((topic, data)) = batch.pop_front() {
            if !cpu.may_run(now) {
                Usage::add(&usage.throttled, 1);
                Usage::add(&usage.messages_dropped, 1);
                continue;
            }
            Usage::add(&usage.delivered, 1);
            match sandbox.deliver_shared(topic, data) {
                Ok(true) => {
                    if let Some((took, ended)) = sandbox.last_call() {
                        cpu.charge(took, ended);
                        now = ended;
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    batch.clear();
                    return Err(e);
                }
            }
            // The slice holds within one message: what is left of the batch goes back
            // to the inbox, so a tick or a swap waiting behind this call is not kept
            // waiting for up to a whole batch.
            if !batch.is_empty() && now.saturating_duration_since(started) >= slice {
                inbox.put_back(batch);
                return Ok(true);
            }
        }
        now = Instant::now();
        let left = slice.saturating_sub(now.saturating_duration_since(started));
        if left.is_zero() {
            return Ok(true);
        }
        if !inbox.take_into(batch, left.min(Duration::from_micros(DRAIN_LINGER_US))) {
            return Ok(false);
        }
        // The wait may have been long; the meter is asked with the time the batch starts.
        now = Instant::now();
    }
}

/// Stops the ticker task when the actor's state goes away, however the actor ended.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ModuleActorState {
    /// Runs `f` on the sandbox on a blocking thread, charging the time to the CPU meter.
    async fn with_sandbox<R: Send + 'static>(
        &mut self,
        export: &'static str,
        f: impl FnOnce(&mut Sandbox) -> Result<R, CallError> + Send + 'static,
    ) -> Result<R, ModuleFailure> {
        let Some(mut sandbox) = self.sandbox.take() else {
            // Unreachable: the sandbox is only out while a call runs, and calls do not
            // overlap. Failing is still better than panicking.
            return Err(ModuleFailure::Panicked { export });
        };
        let started = Instant::now();
        let (sandbox, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut sandbox);
            (sandbox, result)
        })
        .await
        .map_err(|_| ModuleFailure::Panicked { export })?;
        self.cpu.charge(started.elapsed(), Instant::now());
        // A failed sandbox is not put back: the actor fails and is discarded.
        let value = result.map_err(|source| ModuleFailure::Call { export, source })?;
        self.sandbox = Some(sandbox);
        Ok(value)
    }

    /// Hands the messages in the inbox to `on_message` in one blocking call, which also
    /// takes the messages that arrive while it runs (for up to [`DRAIN_SLICE_MS`]). A
    /// message that finds the module over its CPU share is dropped (and counted), like a
    /// tick. Returns whether messages may be left for another drain.
    async fn drain(&mut self) -> Result<bool, ModuleFailure> {
        let mut batch = std::mem::take(&mut self.batch);
        if !self.inbox.take_into(&mut batch, Duration::ZERO) {
            self.batch = batch;
            return Ok(false);
        }
        let Some(mut sandbox) = self.sandbox.take() else {
            return Err(ModuleFailure::Panicked {
                export: "on_message",
            });
        };
        let mut cpu = self.cpu.clone();
        let usage = self.usage.clone();
        let inbox = self.inbox.clone();
        let (sandbox, cpu, batch, result) = tokio::task::spawn_blocking(move || {
            let result = run_batches(&mut sandbox, &mut cpu, &usage, &inbox, &mut batch);
            (sandbox, cpu, batch, result)
        })
        .await
        .map_err(|_| ModuleFailure::Panicked {
            export: "on_message",
        })?;
        self.cpu = cpu;
        self.batch = batch;
        // A failed sandbox is not put back: the actor fails and is discarded (with the
        // rest of its batch).
        let more = result.map_err(|source| ModuleFailure::Call {
            export: "on_message",
            source,
        })?;
        self.sandbox = Some(sandbox);
        Ok(more)
    }

    /// Whether the module may run now; counts a refusal as throttled.
    fn may_run(&mut self) -> bool {
        if self.cpu.may_run(Instant::now()) {
            return true;
        }
        Usage::add(&self.usage.throttled, 1);
        false
    }
}

impl Actor for ModuleActor {
    type Msg = ModuleMsg;
    type State = ModuleActorState;
    type Arguments = ModuleArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ModuleArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let tick_interval = args.tick_interval;
        let usage = args.setup.usage.clone();
        let quotas = args.setup.quotas.clone();
        // Instantiating compiles nothing but may run the start function, and `init` is
        // guest code: both can take up to call_ms_max, so neither runs on the runtime.
        let sandbox = tokio::task::spawn_blocking(move || {
            if let Some(kv) = &args.kv_used {
                if let Ok(used) = kv.used(&args.setup.name) {
                    args.setup.usage.state_bytes.store(used, Ordering::Relaxed);
                }
            }
            let mut sandbox = Sandbox::start(&args.engine, &args.module, args.setup)?;
            sandbox.call("init").map_err(|source| ModuleFailure::Call {
                export: "init",
                source,
            })?;
            *args.subscriptions.lock().unwrap_or_else(|e| e.into_inner()) = sandbox.subscriptions();
            Ok::<_, ModuleFailure>(sandbox)
        })
        .await
        .map_err(|_| ModuleFailure::Panicked { export: "init" })??;
        Ok(ModuleActorState {
            sandbox: Some(sandbox),
            tick_interval,
            tick_queued: Arc::new(AtomicBool::new(false)),
            ticker: None,
            cpu: CpuMeter::new(quotas.cpu_share_permille, quotas.call_ms, Instant::now()),
            usage,
            inbox: args.inbox,
            batch: VecDeque::new(),
            frozen: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let queued = state.tick_queued.clone();
        let period = state.tick_interval;
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // The first tick of a tokio interval is immediate; `init` just ran, so the
            // first `on_tick` waits a whole interval.
            interval.tick().await;
            loop {
                interval.tick().await;
                if queued.swap(true, Ordering::AcqRel) {
                    // The last tick has not been handled yet: skip this one rather than
                    // let a slow module build up a queue.
                    continue;
                }
                if myself.cast(ModuleMsg::Tick).is_err() {
                    return;
                }
            }
        });
        state.ticker = Some(AbortOnDrop(ticker));
        // Messages waiting in the inbox (from before a restart, or from a swap) are
        // drained once the supervisor attaches the inbox to this actor.
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ModuleMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ModuleMsg::Tick => {
                state.tick_queued.store(false, Ordering::Release);
                if state.frozen || !state.may_run() {
                    return Ok(());
                }
                state.with_sandbox("on_tick", |s| s.call("on_tick")).await?;
            }
            ModuleMsg::Drain => {
                // A frozen version has handed its state over: the messages are the next
                // version's, which is sent its own `Drain` when the inbox is attached.
                if state.frozen {
                    return Ok(());
                }
                // The drain stopped at the end of its slice: what is left waits behind
                // whatever else is in the mailbox (a tick, a snapshot request). The flag
                // is still set, so nobody else sends this `Drain`.
                if state.drain().await? && myself.cast(ModuleMsg::Drain).is_err() {
                    state.inbox.drain_lost();
                }
            }
            ModuleMsg::Snapshot(reply) => {
                // Everything in the inbox now is handled by this version, and so is in
                // the state it hands over; what arrives after its last drain waits for
                // the next version. A steady stream would keep the drain going past the
                // supervisor's wait and the state would be lost, so it stops after
                // SNAPSHOT_DRAIN_MS_MAX and what is left goes to the next version.
                let draining = Instant::now();
                while state.drain().await?
                    && draining.elapsed() < Duration::from_millis(SNAPSHOT_DRAIN_MS_MAX)
                {
                }
                state.frozen = true;
                // A snapshot that traps leaves the next version to start without state;
                // the old version is being stopped either way.
                let snapshot = match state.with_sandbox("snapshot", |s| s.snapshot()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("taking a snapshot for the next version: {e}");
                        None
                    }
                };
                let _ = reply.send(snapshot);
            }
            ModuleMsg::Restore(bytes, reply) => {
                let result = state
                    .with_sandbox("restore", move |s| s.restore(&bytes))
                    .await
                    .map_err(|e| e.to_string());
                let failed = result.is_err();
                let _ = reply.send(result);
                if failed {
                    // The sandbox was not put back; this version cannot run.
                    return Err("restore failed".into());
                }
            }
            ModuleMsg::Thaw => state.frozen = false,
        }
        Ok(())
    }
}

/// The sandbox supervisor actor. Start it with [`spawn_sandbox_supervisor`].
pub struct SandboxSupervisor;

pub struct SupervisorInit {
    args: SandboxSupervisorArgs,
    in_flight: Arc<AtomicUsize>,
}

pub struct SupervisorState {
    /// This actor, bounded like everyone else's view of it (restart timers use it).
    myself: BoundedRef<SandboxMsg>,
    args: SandboxSupervisorArgs,
    quota: ActorRef<QuotaMsg>,
    modules: BTreeMap<String, ModuleEntry>,
    /// Which module (and which start of it) each live child actor runs.
    children: HashMap<ActorId, Child>,
    /// Per name, the newest version that failed here: it and anything older is never run
    /// again by this supervisor (except the previous version, by a rollback).
    failed_versions: HashMap<String, u64>,
    /// Names whose only deploy so far was refused, with why.
    refused: BTreeMap<String, RefusedEntry>,
    next_generation: u64,
}

struct ModuleEntry {
    version: u64,
    content: ContentId,
    module: CompiledModule,
    quotas: ModuleQuotas,
    state: ModuleState,
    since_unix_ms: u64,
    restarts: u32,
    budget: RestartBudget,
    /// Bumped on every start attempt and every failure; timers and children carry the
    /// generation they were made for, and anything older is ignored.
    generation: u64,
    actor: Option<ActorRef<ModuleMsg>>,
    usage: Arc<Usage>,
    subscriptions: Subscriptions,
    inbox: Arc<Inbox>,
    rolled_back_from: Option<RolledBackFrom>,
    last_refusal: Option<Refusal>,
    /// The reason of the failure that exhausted the budget, kept for the rollback.
    last_failure: Option<String>,
}

struct Child {
    name: String,
    generation: u64,
}

/// A deploy that was refused while nothing ran under its name.
struct RefusedEntry {
    version: u64,
    content: ContentId,
    quotas: ModuleQuotas,
    reason: String,
    since_unix_ms: u64,
}

impl ModuleEntry {
    fn set_state(&mut self, state: ModuleState) {
        self.state = state;
        self.since_unix_ms = crate::unix_ms();
    }
}

impl Actor for SandboxSupervisor {
    type Msg = Envelope<SandboxMsg>;
    type State = SupervisorState;
    type Arguments = SupervisorInit;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        init: SupervisorInit,
    ) -> Result<Self::State, ActorProcessingErr> {
        let budget = init.args.config.quotas.budget.clone();
        // The modules of a supervisor that ran before this one are gone with it.
        init.args.router.clear();
        let (quota, _) = Actor::spawn_linked(None, QuotaActor, budget, myself.get_cell()).await?;
        Ok(SupervisorState {
            myself: BoundedRef::with_counter(myself, init.in_flight, SANDBOX_MAILBOX_MESSAGES_MAX),
            args: init.args,
            quota,
            modules: BTreeMap::new(),
            children: HashMap::new(),
            failed_versions: HashMap::new(),
            refused: BTreeMap::new(),
            next_generation: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The ticket is held until the message is fully handled, so a message being
        // worked on still counts against the mailbox bound.
        let Envelope {
            msg,
            ticket: _ticket,
        } = envelope;
        match msg {
            SandboxMsg::Deploy(deployment) => {
                state.deploy(myself.get_cell(), deployment, None).await
            }
            SandboxMsg::List(reply) => {
                // The asker may have timed out; nothing to do about it here.
                let _ = reply.send(state.list());
            }
            SandboxMsg::RestartDue { name, generation } => {
                state.restart_due(myself.get_cell(), name, generation).await
            }
            SandboxMsg::RollBack { name, generation } => {
                state.roll_back(myself.get_cell(), name, generation).await
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // No module runs any more: published messages are not queued for them.
        state.args.router.clear();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let quota_id = state.quota.get_id();
        match event {
            SupervisionEvent::ActorFailed(cell, err) if cell.get_id() == quota_id => {
                // Admission state is gone: fail, so the node supervisor restarts this
                // supervisor (and with it the quota actor) and redeploys every module.
                return Err(format!("quota actor failed: {err}").into());
            }
            SupervisionEvent::ActorTerminated(cell, ..) if cell.get_id() == quota_id => {
                return Err("quota actor stopped".into());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                state.child_exited(cell.get_id(), err.to_string());
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // The supervisor forgets a child before stopping it on purpose, so a
                // child still on record stopped by itself (or was killed from outside).
                let reason = match reason {
                    Some(r) => format!("module actor stopped unexpectedly: {r}"),
                    None => "module actor stopped unexpectedly".to_string(),
                };
                state.child_exited(cell.get_id(), reason);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Why a start of a module version did not happen.
enum StartError {
    /// The node's budget has no room for it.
    Admission(AdmissionError),
    /// Instantiation, `init` or `restore` failed.
    Start(String),
}

impl SupervisorState {
    /// Deploys `d`: compile, admit, start (init), hand over state from the running
    /// version, then stop that one. `rollback` is set when `d` is the previous version
    /// taking over from a failed one.
    async fn deploy(&mut self, myself: ActorCell, d: Deployment, rollback: Option<RolledBackFrom>) {
        if let Some(&bad) = self.failed_versions.get(&d.name) {
            if d.version <= bad && rollback.is_none() {
                tracing::info!(module = %d.name, version = d.version, failed = bad, "ignoring deploy: this version (or a newer one) failed here");
                return;
            }
        }
        if rollback.is_none() {
            if let Some(current) = self.modules.get(&d.name) {
                if d.version <= current.version {
                    tracing::debug!(
                        module = %d.name,
                        version = d.version,
                        current = current.version,
                        "ignoring deploy: not newer than the version we have"
                    );
                    return;
                }
            }
        }
        let engine = self.args.engine.clone();
        let bytes = d.bytes.clone();
        // Compiling can take a while for a large module; keep it off the runtime threads.
        let compiled = match tokio::task::spawn_blocking(move || engine.compile(&bytes)).await {
            Ok(Ok(module)) => module,
            Ok(Err(e)) => return self.reject(&d, e.to_string()),
            Err(_) => return self.reject(&d, "compiling module: the compiler panicked".into()),
        };
        let quotas = ModuleQuotas::resolve(&d.quotas, &self.args.config.quotas);

        let old = self.modules.get(&d.name);
        let old_running = old.and_then(|e| e.actor.clone());
        let usage = old.map(|e| e.usage.clone()).unwrap_or_default();
        let inbox = old.map(|e| e.inbox.clone()).unwrap_or_default();
        let generation = self.next_generation();
        let subscriptions = Arc::new(Mutex::new(BTreeSet::new()));
        let started = self
            .start_version(
                myself.clone(),
                &d.name,
                d.version,
                &compiled,
                &quotas,
                generation,
                usage.clone(),
                subscriptions.clone(),
                inbox.clone(),
            )
            .await;
        let new_actor = match started {
            Ok(actor) => actor,
            Err(StartError::Admission(e)) => return self.reject(&d, e.to_string()),
            Err(StartError::Start(reason)) if old_running.is_some() => {
                // The running version keeps running; the new one never took over.
                return self.reject(&d, reason);
            }
            Err(StartError::Start(reason)) => {
                // Nothing is running under this name: the new version takes the slot and
                // its failed start counts against its own restart budget.
                inbox.detach(subscriptions.clone());
                self.args.router.set(&d.name, inbox.clone(), usage.clone());
                let entry = self.new_entry(
                    &d,
                    compiled,
                    quotas,
                    generation,
                    None,
                    usage,
                    subscriptions,
                    inbox,
                );
                let entry = ModuleEntry {
                    rolled_back_from: rollback,
                    ..entry
                };
                self.modules.insert(d.name.clone(), entry);
                self.refused.remove(&d.name);
                self.module_failed(&d.name, reason);
                return;
            }
        };

        // Hand over state: the old version finishes what is in its inbox, snapshots
        // and freezes; the new one restores. Messages for this module that arrive
        // meanwhile wait in its (bounded) inbox and go to the new version.
        if let Some(old_actor) = &old_running {
            inbox.hold(subscriptions.clone());
            let wait = Duration::from_millis(quotas.call_ms.saturating_mul(2) + SWAP_SLACK_MS);
            let snapshot = ractor::call_t!(old_actor, ModuleMsg::Snapshot, wait.as_millis() as u64)
                .ok()
                .flatten();
            if let Some(bytes) = snapshot {
                let restored = ractor::call_t!(
                    new_actor,
                    |r| ModuleMsg::Restore(bytes, r),
                    wait.as_millis() as u64
                );
                let failure = match restored {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e),
                    Err(e) => Some(format!("restoring state: {e}")),
                };
                if let Some(reason) = failure {
                    // The new version cannot take the old one's state: call the swap off.
                    self.children.remove(&new_actor.get_id());
                    new_actor.stop(Some("swap called off".into()));
                    // Thawed before it is sent a `Drain`, which a frozen version ignores.
                    let _ = old_actor.cast(ModuleMsg::Thaw);
                    if let Some(old) = self.modules.get(&d.name) {
                        inbox.attach(old_actor.clone(), old.subscriptions.clone());
                    }
                    if let Some((v, q)) = self
                        .modules
                        .get(&d.name)
                        .map(|o| (o.version, o.quotas.clone()))
                    {
                        self.admit_again(&d.name, v, &q).await;
                    }
                    return self.reject(&d, reason);
                }
            }
        }

        let mut budget = RestartBudget::new(self.args.config.restart.clone());
        budget.on_start(Instant::now());
        inbox.attach(new_actor.clone(), subscriptions.clone());
        self.args.router.set(&d.name, inbox.clone(), usage.clone());
        let mut entry = self.new_entry(
            &d,
            compiled,
            quotas,
            generation,
            Some(new_actor),
            usage,
            subscriptions,
            inbox,
        );
        entry.budget = budget;
        entry.state = ModuleState::Running;
        entry.rolled_back_from = rollback;
        // Only now that the new version runs is the old one stopped; it is forgotten
        // first so that its exit is not mistaken for a crash.
        if let Some(old) = self.modules.insert(d.name.clone(), entry) {
            if let Some(old_actor) = old.actor {
                self.children.remove(&old_actor.get_id());
                old_actor.stop(Some(format!("replaced by version {}", d.version)));
            }
            tracing::info!(module = %d.name, old = old.version, new = d.version, "module replaced");
        }
        self.refused.remove(&d.name);
        tracing::info!(module = %d.name, version = d.version, content = %d.content.short(), "module started");
        self.emit(SandboxEvent::Started {
            name: d.name,
            version: d.version,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn new_entry(
        &self,
        d: &Deployment,
        module: CompiledModule,
        quotas: ModuleQuotas,
        generation: u64,
        actor: Option<ActorRef<ModuleMsg>>,
        usage: Arc<Usage>,
        subscriptions: Subscriptions,
        inbox: Arc<Inbox>,
    ) -> ModuleEntry {
        ModuleEntry {
            version: d.version,
            content: d.content,
            module,
            quotas,
            state: ModuleState::Starting,
            since_unix_ms: crate::unix_ms(),
            restarts: 0,
            budget: RestartBudget::new(self.args.config.restart.clone()),
            generation,
            actor,
            usage,
            subscriptions,
            inbox,
            rolled_back_from: None,
            last_refusal: None,
            last_failure: None,
        }
    }

    /// Admits `version` of `name` and starts a module actor for it (instantiate and
    /// `init` happen before this returns). On success the child is on record under
    /// `generation`.
    #[allow(clippy::too_many_arguments)]
    async fn start_version(
        &mut self,
        myself: ActorCell,
        name: &str,
        version: u64,
        module: &CompiledModule,
        quotas: &ModuleQuotas,
        generation: u64,
        usage: Arc<Usage>,
        subscriptions: Subscriptions,
        inbox: Arc<Inbox>,
    ) -> Result<ActorRef<ModuleMsg>, StartError> {
        let reservation = quotas.reservation();
        let admitted = ractor::call!(self.quota, |reply| QuotaMsg::Admit {
            name: name.to_string(),
            version,
            reservation,
            reply,
        });
        match admitted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Admission(e)),
            Err(e) => return Err(StartError::Start(format!("asking the quota actor: {e}"))),
        }
        let args = ModuleArgs {
            engine: self.args.engine.clone(),
            module: module.clone(),
            setup: InstanceSetup {
                name: name.to_string(),
                version,
                quotas: quotas.clone(),
                log_line_bytes_max: self.args.config.log_line_bytes_max,
                logs: self.args.logs.clone(),
                usage,
                services: self.args.services.clone(),
            },
            tick_interval: self.args.config.tick_interval,
            subscriptions,
            inbox,
            kv_used: self.args.services.kv.clone(),
        };
        match Actor::spawn_linked(None, ModuleActor, args, myself).await {
            Ok((actor, _join)) => {
                // A child that fails right away reports through this actor's own mailbox,
                // which is only read after this handler returns: the record is in place.
                self.children.insert(
                    actor.get_id(),
                    Child {
                        name: name.to_string(),
                        generation,
                    },
                );
                Ok(actor)
            }
            Err(e) => {
                // The reservation stays with whoever held the name before (a running
                // version re-admits itself below), or is released if nobody runs.
                let reason = match e {
                    ractor::SpawnErr::StartupFailed(e) => e.to_string(),
                    e => format!("starting module actor: {e}"),
                };
                match self.modules.get(name) {
                    Some(old) if old.actor.is_some() => {
                        let (v, q) = (old.version, old.quotas.clone());
                        self.admit_again(name, v, &q).await;
                    }
                    _ => {}
                }
                Err(StartError::Start(reason))
            }
        }
    }

    /// Gives the reservation of `name` back to `version` after a newer version that had
    /// taken it over did not start.
    async fn admit_again(&mut self, name: &str, version: u64, quotas: &ModuleQuotas) {
        let reservation = quotas.reservation();
        // This reservation fitted before, beside the same others, so it fits again.
        let _ = ractor::call!(self.quota, |reply| QuotaMsg::Admit {
            name: name.to_string(),
            version,
            reservation,
            reply,
        });
    }

    async fn restart_due(&mut self, myself: ActorCell, name: String, generation: u64) {
        let Some(entry) = self.modules.get(&name) else {
            return;
        };
        if entry.generation != generation || !matches!(entry.state, ModuleState::Backoff { .. }) {
            tracing::debug!(module = %name, generation, "ignoring stale restart timer");
            return;
        }
        let version = entry.version;
        let module = entry.module.clone();
        let quotas = entry.quotas.clone();
        let usage = entry.usage.clone();
        let subscriptions = entry.subscriptions.clone();
        let inbox = entry.inbox.clone();
        let generation = self.next_generation();
        if let Some(entry) = self.modules.get_mut(&name) {
            entry.generation = generation;
            entry.restarts = entry.restarts.saturating_add(1);
            entry.set_state(ModuleState::Starting);
        }
        let started = self
            .start_version(
                myself,
                &name,
                version,
                &module,
                &quotas,
                generation,
                usage,
                subscriptions,
                inbox,
            )
            .await;
        match started {
            Ok(actor) => {
                if let Some(entry) = self.modules.get_mut(&name) {
                    entry
                        .inbox
                        .attach(actor.clone(), entry.subscriptions.clone());
                    entry.actor = Some(actor);
                    entry.budget.on_start(Instant::now());
                    entry.set_state(ModuleState::Running);
                }
                tracing::info!(module = %name, version, "module restarted");
                self.emit(SandboxEvent::Started { name, version });
            }
            Err(StartError::Admission(e)) => self.module_failed(&name, e.to_string()),
            Err(StartError::Start(reason)) => self.module_failed(&name, reason),
        }
    }

    /// A child actor exited; if it is a module's current actor, that module failed.
    fn child_exited(&mut self, id: ActorId, reason: String) {
        let Some(child) = self.children.remove(&id) else {
            return;
        };
        let current = self.modules.get(&child.name).is_some_and(|entry| {
            entry.generation == child.generation
                && entry.actor.as_ref().is_some_and(|a| a.get_id() == id)
        });
        if current {
            self.module_failed(&child.name, reason);
        }
    }

    /// Carries out the module's restart budget's decision about a failure.
    fn module_failed(&mut self, name: &str, reason: String) {
        let generation = self.next_generation();
        let Some(entry) = self.modules.get_mut(name) else {
            return;
        };
        entry.actor = None;
        // Messages are dropped (and counted) until a new actor runs; a `Drain` sent to
        // the actor that failed is lost with it, so its successor is sent one afresh.
        entry.inbox.detach(entry.subscriptions.clone());
        entry.generation = generation;
        let version = entry.version;
        match entry.budget.on_failure(Instant::now()) {
            RestartDecision::Restart { delay, attempt } => {
                let restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                entry.set_state(ModuleState::Backoff { restart_in_ms });
                tracing::warn!(module = %name, version, %reason, attempt, restart_in_ms, "module crashed; restarting after backoff");
                let n = name.to_string();
                schedule(
                    self.myself.clone(),
                    move || SandboxMsg::RestartDue {
                        name: n.clone(),
                        generation,
                    },
                    delay,
                );
                self.emit(SandboxEvent::Crashed {
                    name: name.to_string(),
                    version,
                    reason,
                    restart_in: delay,
                });
            }
            RestartDecision::GiveUp { restarts, period } => {
                let reason = format!(
                    "{reason} (gave up: {restarts} restarts within {} ms already)",
                    period.as_millis()
                );
                entry.set_state(ModuleState::Failed {
                    reason: reason.clone(),
                });
                entry.last_failure = Some(reason.clone());
                tracing::error!(module = %name, version, %reason, "module failed; not restarting");
                // Escalate: look for the previous version in the store (on a blocking
                // thread, in a handler of its own).
                if self.args.store.is_some() && entry.rolled_back_from.is_none() {
                    let n = name.to_string();
                    schedule(
                        self.myself.clone(),
                        move || SandboxMsg::RollBack {
                            name: n.clone(),
                            generation,
                        },
                        Duration::ZERO,
                    );
                } else {
                    self.give_up(name);
                }
            }
        }
    }

    /// The module failed for good and nothing takes over: report it and release its
    /// reservation.
    fn give_up(&mut self, name: &str) {
        let Some(entry) = self.modules.get(name) else {
            return;
        };
        let (version, content) = (entry.version, entry.content);
        let reason = entry.last_failure.clone().unwrap_or_default();
        let _ = self.quota.cast(QuotaMsg::Release {
            name: name.to_string(),
            version,
        });
        self.failed_versions.insert(name.to_string(), version);
        self.record_failure(name, version, &reason);
        self.emit(SandboxEvent::Failed {
            name: name.to_string(),
            version,
            content,
            reason,
        });
    }

    /// Records in the store that `version` failed here, so that it is not deployed again
    /// after a restart of the node (it stays the "current" release, so gossip about it is
    /// "already installed" and does not bring it back either).
    fn record_failure(&self, name: &str, version: u64, reason: &str) {
        if let Some(store) = &self.args.store {
            if let Err(e) = store.record_failure(ReleaseKind::Module, name, version, reason) {
                tracing::warn!(module = %name, version, "recording a failed release: {e}");
            }
        }
    }

    /// Runs the previous version of `name` in place of the current one, which failed for
    /// good, if the store still has it (and it is older and did not fail itself).
    async fn roll_back(&mut self, myself: ActorCell, name: String, generation: u64) {
        let Some(entry) = self.modules.get(&name) else {
            return;
        };
        if entry.generation != generation || !matches!(entry.state, ModuleState::Failed { .. }) {
            return;
        }
        let (failed, content) = (entry.version, entry.content);
        let reason = entry.last_failure.clone().unwrap_or_default();
        let Some(store) = self.args.store.clone() else {
            return self.give_up(&name);
        };
        self.failed_versions.insert(name.clone(), failed);
        self.record_failure(&name, failed, &reason);
        let lookup = name.clone();
        let previous = tokio::task::spawn_blocking(move || {
            let Some(prev) = store.previous_release(ReleaseKind::Module, &lookup)? else {
                return Ok(None);
            };
            if store.failed_version(ReleaseKind::Module, &lookup)? == Some(prev.manifest.version) {
                return Ok(None);
            }
            let bytes = store.read(&prev.manifest.content)?;
            Ok::<_, crate::store::ReadError>(Some((prev, bytes)))
        })
        .await;
        let (prev, bytes) = match previous {
            Ok(Ok(Some((prev, bytes)))) if prev.manifest.version < failed => (prev, bytes),
            Ok(Ok(_)) => {
                tracing::warn!(module = %name, version = failed, "no previous version to roll back to");
                return self.give_up(&name);
            }
            Ok(Err(e)) => {
                tracing::warn!(module = %name, version = failed, "reading the previous version: {e}");
                return self.give_up(&name);
            }
            Err(e) => {
                tracing::warn!(module = %name, "reading the previous version: {e}");
                return self.give_up(&name);
            }
        };
        let m = prev.manifest;
        let from = RolledBackFrom {
            version: failed,
            reason: reason.clone(),
            unix_ms: crate::unix_ms(),
        };
        tracing::warn!(module = %name, from = failed, to = m.version, "rolling back to the previous version");
        self.deploy(
            myself,
            Deployment {
                name: name.clone(),
                version: m.version,
                content: m.content,
                bytes: Arc::from(bytes),
                quotas: m.quotas,
            },
            Some(from),
        )
        .await;
        // The previous version took the slot (running, or in backoff after a failed
        // start that its own budget now handles), or the deploy refused it.
        let rolled = self
            .modules
            .get(&name)
            .is_some_and(|e| e.version == m.version);
        if rolled {
            self.emit(SandboxEvent::RolledBack {
                name,
                from: failed,
                content,
                to: m.version,
                reason,
            });
        } else {
            self.give_up(&name);
        }
    }

    fn reject(&mut self, d: &Deployment, reason: String) {
        tracing::warn!(module = %d.name, version = d.version, %reason, "deploy rejected");
        if let Some(entry) = self.modules.get_mut(&d.name) {
            entry.last_refusal = Some(Refusal {
                version: d.version,
                reason: reason.clone(),
            });
        } else if self.refused.len() < REFUSED_NAMES_MAX || self.refused.contains_key(&d.name) {
            // Nothing else under this name: list the refusal itself, so the operator (and
            // the mesh, through node reports) sees why the module is not running.
            self.refused.insert(
                d.name.clone(),
                RefusedEntry {
                    version: d.version,
                    content: d.content,
                    quotas: ModuleQuotas::resolve(&d.quotas, &self.args.config.quotas),
                    reason: reason.clone(),
                    since_unix_ms: crate::unix_ms(),
                },
            );
        }
        self.emit(SandboxEvent::Rejected {
            name: d.name.clone(),
            version: d.version,
            reason,
        });
    }

    fn list(&self) -> Vec<ModuleStatus> {
        let mut out: Vec<ModuleStatus> = self
            .modules
            .iter()
            .map(|(name, e)| ModuleStatus {
                name: name.clone(),
                version: e.version,
                content: e.content,
                state: e.state.clone(),
                restarts: e.restarts,
                since_unix_ms: e.since_unix_ms,
                logs_dropped: e.usage.log_lines_dropped.load(Ordering::Relaxed),
                quotas: e.quotas.clone(),
                usage: e.usage.figures(),
                subscriptions: e
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect(),
                rolled_back_from: e.rolled_back_from.clone(),
                last_refusal: e.last_refusal.clone(),
            })
            .collect();
        out.extend(self.refused.iter().map(|(name, r)| ModuleStatus {
            name: name.clone(),
            version: r.version,
            content: r.content,
            state: ModuleState::Refused {
                reason: r.reason.clone(),
            },
            restarts: 0,
            since_unix_ms: r.since_unix_ms,
            logs_dropped: 0,
            quotas: r.quotas.clone(),
            usage: UsageFigures::default(),
            subscriptions: Vec::new(),
            rolled_back_from: None,
            last_refusal: None,
        }));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn emit(&self, event: SandboxEvent) {
        // Never wait on the listener: a stalled consumer must not stall supervision.
        if let Err(e) = self.args.events.try_send(event) {
            tracing::debug!(event = ?e.into_inner(), "sandbox event dropped: channel full or closed");
        }
    }

    fn next_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

/// After `delay`, sends the message `make` builds to the supervisor, retrying while its
/// mailbox is full so that a restart or rollback is delayed, never lost.
fn schedule(
    supervisor: BoundedRef<SandboxMsg>,
    make: impl Fn() -> SandboxMsg + Send + 'static,
    delay: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        loop {
            match supervisor.try_send(make()) {
                Err(MailboxError::Full { .. }) => {
                    tracing::debug!("supervisor mailbox full; retrying a scheduled message");
                    tokio::time::sleep(Duration::from_millis(RESTART_RETRY_MS)).await;
                }
                // Sent, or the supervisor is gone and nothing is left to do.
                _ => return,
            }
        }
    });
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Published;
    use crate::kv::KvStore;
    use crate::manifest::{Manifest, SignedManifest};
    use crate::sandbox::DEFAULT_CALL_MS_MAX;

    /// Long enough for a loaded 2-core machine running the whole workspace's tests.
    const EVENT_WAIT: Duration = Duration::from_secs(30);

    fn queued(n: u8) -> Queued {
        ("t".into(), vec![n].into())
    }

    /// Stands in for a module actor where only the inbox is under test: it takes its
    /// `Drain`s and does nothing with them.
    struct Idle;

    impl Actor for Idle {
        type Msg = ModuleMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<ModuleMsg>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    /// An inbox attached to an idle actor, subscribed to topic "t".
    async fn attached_inbox() -> (Arc<Inbox>, ActorRef<ModuleMsg>) {
        let (actor, _) = Actor::spawn(None, Idle, ()).await.unwrap();
        let inbox = Arc::new(Inbox::default());
        let subscriptions = Arc::new(Mutex::new(BTreeSet::from(["t".to_string()])));
        inbox.attach(actor.clone(), subscriptions);
        (inbox, actor)
    }

    #[tokio::test]
    async fn inbox_asks_for_one_drain_per_batch_and_refuses_beyond_its_bound() {
        let (inbox, actor) = attached_inbox().await;
        assert!(
            matches!(inbox.push(queued(0)), Pushed::NeedsDrain(a) if a.get_id() == actor.get_id())
        );
        assert!(matches!(inbox.push(queued(1)), Pushed::Queued));
        let mut batch = VecDeque::new();
        assert!(inbox.take_into(&mut batch, Duration::ZERO));
        assert_eq!(batch.len(), 2);
        batch.clear();
        // Still draining: messages arriving now are taken by the same drain.
        assert!(matches!(inbox.push(queued(2)), Pushed::Queued));
        assert!(inbox.take_into(&mut batch, Duration::ZERO));
        batch.clear();
        // The drain found nothing more and ended: the next message needs a new one.
        assert!(!inbox.take_into(&mut batch, Duration::ZERO));
        assert!(matches!(inbox.push(queued(3)), Pushed::NeedsDrain(_)));
        for i in 1..MODULE_MESSAGES_QUEUED_MAX {
            assert!(matches!(inbox.push(queued(i as u8)), Pushed::Queued));
        }
        assert!(matches!(inbox.push(queued(0)), Pushed::Dropped));
        assert_eq!(inbox.len(), MODULE_MESSAGES_QUEUED_MAX);
        let other: Queued = ("other".into(), vec![0].into());
        assert!(matches!(inbox.push(other), Pushed::NotSubscribed));
        actor.stop(None);
    }

    #[tokio::test]
    async fn inbox_holds_during_a_swap_and_drops_while_stopped() {
        let (inbox, actor) = attached_inbox().await;
        let subscriptions = Arc::new(Mutex::new(BTreeSet::from(["t".to_string()])));
        // A swap: messages wait, and nobody is asked to drain them yet.
        inbox.hold(subscriptions.clone());
        assert!(matches!(inbox.push(queued(1)), Pushed::Queued));
        assert!(matches!(inbox.push(queued(2)), Pushed::Queued));
        // The next version is attached and asked at once for what waits.
        inbox.attach(actor.clone(), subscriptions.clone());
        assert!(inbox.lock().drain_queued);
        assert!(matches!(inbox.push(queued(3)), Pushed::Queued));
        // The actor failed: nothing more is queued, what waits stays for its successor.
        inbox.detach(subscriptions.clone());
        assert!(matches!(inbox.push(queued(4)), Pushed::Dropped));
        assert_eq!(inbox.len(), 3);
        assert!(!inbox.lock().drain_queued);
        actor.stop(None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_lingering_drain_takes_the_next_message_without_a_new_drain() {
        let (inbox, actor) = attached_inbox().await;
        // A drain is running (it took the first message) and lingers for the next.
        assert!(matches!(inbox.push(queued(0)), Pushed::NeedsDrain(_)));
        let mut first = VecDeque::new();
        assert!(inbox.take_into(&mut first, Duration::ZERO));
        let taker = std::thread::spawn({
            let inbox = inbox.clone();
            move || {
                let mut batch = VecDeque::new();
                let took = inbox.take_into(&mut batch, EVENT_WAIT);
                (took, batch)
            }
        });
        while !inbox.lock().lingering {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Without the lingering drain this message would ask for a `Drain`.
        assert!(matches!(inbox.push(queued(7)), Pushed::Queued));
        let (took, batch) = taker.join().unwrap();
        assert!(took);
        assert_eq!(&*batch[0].1, &[7]);
        actor.stop(None);
    }

    struct Harness {
        sup: BoundedRef<SandboxMsg>,
        router: Router,
        logs: mpsc::Receiver<LogLine>,
        events: mpsc::Receiver<SandboxEvent>,
        handle: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
        store: Arc<ContentStore>,
        kv: Arc<KvStore>,
    }

    impl Harness {
        async fn start(config: SandboxConfig) -> Harness {
            Harness::start_with(config, Default::default()).await
        }

        async fn start_with(
            config: SandboxConfig,
            sensors: BTreeSet<std::path::PathBuf>,
        ) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(ContentStore::open(&dir.path().join("store")).unwrap());
            let kv = Arc::new(KvStore::open(&dir.path().join("kv.redb")).unwrap());
            let (logs_tx, logs) = mpsc::channel(4096);
            let (events_tx, events) = mpsc::channel(1024);
            let (outbox, mut published) = mpsc::channel::<Published>(1024);
            let router = Router::default();
            let (sup, handle) = spawn_sandbox_supervisor(
                SandboxSupervisorArgs {
                    engine: SandboxEngine::new().unwrap(),
                    config,
                    logs: logs_tx,
                    events: events_tx,
                    services: HostServices {
                        kv: Some(kv.clone()),
                        sensors: Arc::new(sensors),
                        outbox: Some(outbox),
                    },
                    store: Some(store.clone()),
                    router: router.clone(),
                },
                None,
            )
            .await
            .unwrap();
            // What the node does with published messages locally: hand them to the
            // subscribers.
            let local = router.clone();
            tokio::spawn(async move {
                while let Some(m) = published.recv().await {
                    local.deliver(&m.topic, m.data.into());
                }
            });
            Harness {
                sup,
                router,
                logs,
                events,
                handle,
                _dir: dir,
                store,
                kv,
            }
        }

        fn deploy_bytes(&self, name: &str, version: u64, bytes: Vec<u8>, quotas: Quotas) {
            let bytes: Arc<[u8]> = bytes.into();
            self.sup
                .try_send(SandboxMsg::Deploy(Deployment {
                    name: name.to_string(),
                    version,
                    content: ContentId::of(&bytes),
                    bytes,
                    quotas,
                }))
                .unwrap();
        }

        fn deploy(&self, name: &str, version: u64, source: &str) {
            self.deploy_with(name, version, source, Quotas::default());
        }

        fn deploy_with(&self, name: &str, version: u64, source: &str, quotas: Quotas) {
            let bytes: Arc<[u8]> = source.as_bytes().into();
            self.sup
                .try_send(SandboxMsg::Deploy(Deployment {
                    name: name.to_string(),
                    version,
                    content: ContentId::of(&bytes),
                    bytes,
                    quotas,
                }))
                .unwrap();
        }

        /// Records `source` as release `version` of module `name` in the store (content
        /// and manifest), as the trust actor would, and deploys it.
        fn install(&self, name: &str, version: u64, source: &str) {
            let bytes = source.as_bytes();
            let content = ContentId::of(bytes);
            self.store.put(&content, bytes).unwrap();
            let key = mesh_transport::SecretKey::from_seed([7; 32]);
            let signed = SignedManifest::sign(
                Manifest {
                    kind: ReleaseKind::Module,
                    name: name.into(),
                    version,
                    content,
                    size: bytes.len() as u64,
                    created_unix: 0,
                    expires_unix: None,
                    quotas: Quotas::default(),
                    deltas: Vec::new(),
                },
                &[&key],
            );
            self.store.record_release(&signed).unwrap();
            self.deploy(name, version, source);
        }

        fn send(&self, topic: &str, data: &[u8]) {
            self.router.deliver(topic, data.into());
        }

        /// Polls `List` until `pred` holds for module `name`.
        async fn status_where(
            &self,
            name: &str,
            pred: impl Fn(&ModuleStatus) -> bool,
        ) -> ModuleStatus {
            let deadline = tokio::time::Instant::now() + EVENT_WAIT;
            loop {
                if let Some(s) = self.list().await.into_iter().find(|s| s.name == name) {
                    if pred(&s) {
                        return s;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "module {name} never reached the expected status: {s:?}"
                    );
                } else {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "module {name} not listed"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn event(&mut self) -> SandboxEvent {
            tokio::time::timeout(EVENT_WAIT, self.events.recv())
                .await
                .expect("no sandbox event within the wait")
                .expect("event channel closed")
        }

        /// Waits for a log line matching `pred`, skipping others.
        async fn log_where(&mut self, pred: impl Fn(&LogLine) -> bool) -> LogLine {
            let deadline = tokio::time::Instant::now() + EVENT_WAIT;
            loop {
                let line = tokio::time::timeout_at(deadline, self.logs.recv())
                    .await
                    .expect("no matching log line within the wait")
                    .expect("log channel closed");
                if pred(&line) {
                    return line;
                }
            }
        }

        /// Every log line that arrives within `d`.
        async fn logs_for(&mut self, d: Duration) -> Vec<LogLine> {
            let deadline = tokio::time::Instant::now() + d;
            let mut lines = Vec::new();
            while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.logs.recv()).await {
                lines.push(line);
            }
            lines
        }

        async fn list(&self) -> Vec<ModuleStatus> {
            self.sup
                .call(SandboxMsg::List, Duration::from_secs(10))
                .await
                .unwrap()
        }

        async fn stop(self) {
            self.sup.actor().stop(None);
            self.handle.await.unwrap();
        }
    }

    fn module_source(file: &str) -> String {
        let path = format!("{}/../examples/modules/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(path).unwrap()
    }

    /// The small policy the brief asks for, with fast ticks.
    fn fast_config() -> SandboxConfig {
        let mut quotas = QuotaPolicy::default();
        quotas.defaults.memory_bytes = 4 << 20;
        quotas.defaults.call_ms = 50;
        SandboxConfig {
            quotas,
            log_line_bytes_max: 1024,
            engine: EngineConfig::default(),
            restart: RestartPolicy {
                intensity: 2,
                period: Duration::from_secs(10),
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_millis(50),
            },
            tick_interval: Duration::from_millis(20),
        }
    }

    /// The floods (log and publish) are tested against their rate quotas, not their CPU
    /// deadline: a thousand host calls per tick can take more than the tests' 50 ms per
    /// call on a loaded machine, and a deadline restart is not what those tests check.
    fn flood_quotas(kind: &str) -> Quotas {
        match kind {
            "logspam" | "publishflood" | "flood" => Quotas {
                call_ms: Some(1000),
                ..Quotas::default()
            },
            _ => Quotas::default(),
        }
    }

    fn expect_started(event: SandboxEvent, module: &str, v: u64) {
        match event {
            SandboxEvent::Started { name, version } if name == module && version == v => {}
            other => panic!("expected {module} v{v} to start, got {other:?}"),
        }
    }

    /// Runs `file` under `fast_config` and returns the reason of its first crash.
    async fn first_crash_reason(file: &str) -> String {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("m", 1, &module_source(file));
        expect_started(h.event().await, "m", 1);
        let reason = match h.event().await {
            SandboxEvent::Crashed { reason, .. } => reason,
            other => panic!("expected a crash, got {other:?}"),
        };
        h.stop().await;
        reason
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn hello_logs_arrive_from_init_and_ticks() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("hello", 4, &module_source("hello.wat"));
        expect_started(h.event().await, "hello", 4);
        let greeting = h.log_where(|_| true).await;
        assert_eq!(greeting.text, "hello from a mesh module");
        assert_eq!((greeting.module.as_str(), greeting.version), ("hello", 4));
        assert_eq!(h.log_where(|_| true).await.text, "tick 1");
        assert_eq!(h.log_where(|_| true).await.text, "tick 2");
        let list = h.list().await;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].state, ModuleState::Running);
        assert_eq!((list[0].version, list[0].restarts), (4, 0));
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn trapping_module_is_restarted_with_backoff_then_failed() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("trap", 1, &module_source("trap.wat"));
        expect_started(h.event().await, "trap", 1);
        for expected_delay in [10, 20] {
            match h.event().await {
                SandboxEvent::Crashed {
                    reason, restart_in, ..
                } => {
                    assert!(reason.contains("calling on_tick"), "{reason}");
                    assert!(reason.contains("unreachable"), "{reason}");
                    assert_eq!(restart_in, Duration::from_millis(expected_delay));
                }
                other => panic!("expected a crash, got {other:?}"),
            }
            expect_started(h.event().await, "trap", 1);
        }
        match h.event().await {
            SandboxEvent::Failed { reason, .. } => {
                assert!(reason.contains("unreachable"), "{reason}");
                assert!(reason.contains("gave up"), "{reason}");
            }
            other => panic!("expected the module to be given up on, got {other:?}"),
        }
        let list = h.list().await;
        assert_eq!(list[0].restarts, 2);
        assert!(
            matches!(&list[0].state, ModuleState::Failed { reason } if reason.contains("unreachable")),
            "{:?}",
            list[0].state
        );
        // Each of the three starts logged from init, and nothing restarts it any more.
        let starts = h
            .logs_for(Duration::from_millis(200))
            .await
            .into_iter()
            .filter(|l| l.text.starts_with("starting"))
            .count();
        assert_eq!(starts, 3);
        assert!(h.events.try_recv().is_err());
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn infinite_loop_is_stopped_by_the_deadline() {
        let reason = first_crash_reason("spin.wat").await;
        assert!(reason.contains("deadline of 50 ms"), "{reason}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn memory_bomb_fails_cleanly() {
        let reason = first_crash_reason("membomb.wat").await;
        assert!(reason.contains("memory limit of 4194304 bytes"), "{reason}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn invalid_log_pointer_is_a_trap() {
        let reason = first_crash_reason("badlog.wat").await;
        assert!(reason.contains("log: 100 bytes at 4294967280"), "{reason}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn newer_version_replaces_the_older() {
        let mut h = Harness::start(fast_config()).await;
        let hello = module_source("hello.wat");
        h.deploy("hello", 1, &hello);
        expect_started(h.event().await, "hello", 1);
        h.log_where(|l| l.version == 1 && l.text.starts_with("tick"))
            .await;

        h.deploy("hello", 2, &hello);
        expect_started(h.event().await, "hello", 2);
        let list = h.list().await;
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].version, &list[0].state),
            (2, &ModuleState::Running)
        );

        // Lines v1 logged before it was stopped may still be in the channel; after that,
        // only v2 speaks.
        h.logs_for(Duration::from_millis(100)).await;
        let lines = h.logs_for(Duration::from_millis(300)).await;
        assert!(lines.iter().all(|l| l.version == 2), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.text.starts_with("tick")),
            "{lines:?}"
        );

        // An older or equal version is ignored.
        h.deploy("hello", 1, &hello);
        h.deploy("hello", 2, &hello);
        assert_eq!(h.list().await[0].version, 2);
        assert!(h.events.try_recv().is_err());
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn compile_failure_is_rejected_and_the_running_version_keeps_running() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("hello", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "hello", 1);

        h.deploy("hello", 2, "(module (func");
        match h.event().await {
            SandboxEvent::Rejected {
                name,
                version,
                reason,
            } => {
                assert_eq!((name.as_str(), version), ("hello", 2));
                assert!(reason.starts_with("compiling module"), "{reason}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        let list = h.list().await;
        assert_eq!(
            (list[0].version, &list[0].state),
            (1, &ModuleState::Running)
        );
        h.logs_for(Duration::from_millis(50)).await;
        h.log_where(|l| l.version == 1 && l.text.starts_with("tick"))
            .await;
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn new_version_whose_init_traps_leaves_the_old_one_running() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("hello", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "hello", 1);

        h.deploy("hello", 2, r#"(module (func (export "init") unreachable))"#);
        match h.event().await {
            SandboxEvent::Rejected {
                version, reason, ..
            } => {
                assert_eq!(version, 2);
                assert!(reason.contains("calling init"), "{reason}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        let list = h.list().await;
        assert_eq!(
            (list[0].version, &list[0].state),
            (1, &ModuleState::Running)
        );
        h.logs_for(Duration::from_millis(50)).await;
        h.log_where(|l| l.version == 1 && l.text.starts_with("tick"))
            .await;
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unknown_import_is_refused() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("sys", 1, &module_source("unknown_import.wat"));
        match h.event().await {
            SandboxEvent::Rejected { reason, .. } => {
                assert!(reason.contains("env::system"), "{reason}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        let list = h.list().await;
        assert!(
            matches!(&list[0].state, ModuleState::Refused { reason } if reason.contains("env::system")),
            "{list:?}"
        );
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wasi_guest_logs_through_stdout() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("wasi", 1, &module_source("needs_wasi.wat"));
        expect_started(h.event().await, "wasi", 1);
        let line = h.log_where(|l| l.module == "wasi").await;
        assert_eq!(line.text, "wasi says hi");
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn third_party_module_runs_as_a_module() {
        // xxhash-wasm from npm: no imports, no mesh exports; it starts and stays running.
        let mut h = Harness::start(fast_config()).await;
        let path = format!(
            "{}/../examples/modules/third_party/xxhash.wasm",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes: Arc<[u8]> = std::fs::read(path).unwrap().into();
        h.sup
            .try_send(SandboxMsg::Deploy(Deployment {
                name: "xxhash".into(),
                version: 1,
                content: ContentId::of(&bytes),
                bytes,
                quotas: Quotas::default(),
            }))
            .unwrap();
        expect_started(h.event().await, "xxhash", 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = h.status_where("xxhash", |_| true).await;
        assert_eq!((s.state, s.restarts), (ModuleState::Running, 0));
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn admission_refuses_what_the_budget_cannot_hold() {
        let mut config = fast_config();
        config.quotas.budget.memory_bytes = 10 << 20;
        let mut h = Harness::start(config).await;
        h.deploy("a", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "a", 1);
        h.deploy("b", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "b", 1);
        // Two modules of 4 MiB fit in 10 MiB; a third does not.
        h.deploy("c", 1, &module_source("hello.wat"));
        match h.event().await {
            SandboxEvent::Rejected { name, reason, .. } => {
                assert_eq!(name, "c");
                assert!(
                    reason.starts_with("admitting module c v1: it reserves 4194304 of memory bytes but only 2097152"),
                    "{reason}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let c = h.status_where("c", |_| true).await;
        assert!(matches!(c.state, ModuleState::Refused { .. }), "{c:?}");
        // A release asking for less fits, and takes the slot.
        h.deploy_with(
            "c",
            2,
            &module_source("hello.wat"),
            Quotas {
                memory_bytes: Some(1 << 20),
                ..Quotas::default()
            },
        );
        expect_started(h.event().await, "c", 2);
        let c = h.status_where("c", |_| true).await;
        assert_eq!(
            (c.state, c.quotas.memory_bytes),
            (ModuleState::Running, 1 << 20)
        );
        // A new version of a running module that asks for too much leaves the old one
        // running, with the refusal on record.
        h.deploy_with(
            "a",
            2,
            &module_source("hello.wat"),
            Quotas {
                memory_bytes: Some(9 << 20),
                ..Quotas::default()
            },
        );
        assert!(matches!(h.event().await, SandboxEvent::Rejected { .. }));
        let a = h.status_where("a", |_| true).await;
        assert_eq!((a.version, &a.state), (1, &ModuleState::Running));
        assert!(a
            .last_refusal
            .unwrap()
            .reason
            .contains("admitting module a v2"));
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failing_new_version_is_rolled_back_to_the_previous_one() {
        let mut h = Harness::start(fast_config()).await;
        h.install("app", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "app", 1);
        h.install("app", 2, &module_source("trap.wat"));
        expect_started(h.event().await, "app", 2);
        let mut crashes = 0;
        loop {
            match h.event().await {
                SandboxEvent::Crashed { version: 2, .. } => crashes += 1,
                SandboxEvent::Started { version: 2, .. } => {}
                SandboxEvent::Started { version: 1, .. } => {}
                SandboxEvent::RolledBack {
                    name,
                    from,
                    to,
                    reason,
                    content,
                } => {
                    assert_eq!((name.as_str(), from, to), ("app", 2, 1));
                    assert!(reason.contains("unreachable"), "{reason}");
                    assert_eq!(content, ContentId::of(module_source("trap.wat").as_bytes()));
                    break;
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert_eq!(crashes, 2, "the budget allows two restarts");
        let s = h
            .status_where("app", |s| s.state == ModuleState::Running)
            .await;
        assert_eq!(s.version, 1);
        assert_eq!(s.rolled_back_from.as_ref().map(|r| r.version), Some(2));
        h.log_where(|l| l.version == 1 && l.text.starts_with("tick"))
            .await;
        // The failure is on record in the store, and the bad version is not run again.
        assert_eq!(
            h.store.failed_version(ReleaseKind::Module, "app").unwrap(),
            Some(2)
        );
        h.deploy("app", 2, &module_source("trap.wat"));
        let s = h.status_where("app", |_| true).await;
        assert_eq!(s.version, 1);
        // A newer version is still welcome.
        h.install("app", 3, &module_source("hello.wat"));
        loop {
            if let SandboxEvent::Started { version: 3, .. } = h.event().await {
                break;
            }
        }
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn failing_first_version_is_failed_and_reported() {
        let mut h = Harness::start(fast_config()).await;
        h.install("app", 1, &module_source("trap.wat"));
        loop {
            match h.event().await {
                SandboxEvent::Failed {
                    name,
                    version,
                    reason,
                    ..
                } => {
                    assert_eq!((name.as_str(), version), ("app", 1));
                    assert!(reason.contains("gave up"), "{reason}");
                    break;
                }
                SandboxEvent::RolledBack { .. } => panic!("nothing to roll back to"),
                _ => {}
            }
        }
        let ev = SandboxEvent::Failed {
            name: "app".into(),
            version: 1,
            content: ContentId::of(b"x"),
            reason: "r".repeat(5000),
        };
        let report = ev.failure_report().unwrap();
        assert_eq!(report.reason.len(), FAILURE_REASON_BYTES_MAX);
        assert_eq!(FailureReport::decode(&report.encode()).unwrap(), report);
        assert!(FailureReport::decode(&[0xff; 10]).is_err());
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn hot_swap_loses_no_message_and_hands_over_state() {
        let mut h = Harness::start(fast_config()).await;
        let counter = module_source("counter.wat");
        h.deploy("counter", 1, &counter);
        expect_started(h.event().await, "counter", 1);
        for _ in 0..50 {
            h.send("count", b"x");
        }
        h.log_where(|l| l.text == "count 50").await;
        // Messages 51..100 are queued for version 1 when the deploy starts; more keep
        // arriving, one a millisecond, while version 2 compiles and starts (version 1
        // handles them), while the state is handed over (they wait in the inbox) and
        // after version 2 took over, and then a last burst of 50.
        for _ in 0..50 {
            h.send("count", b"x");
        }
        h.deploy("counter", 2, &counter);
        let mut sent = 100;
        loop {
            h.send("count", b"x");
            sent += 1;
            match tokio::time::timeout(Duration::from_millis(1), h.events.recv()).await {
                Ok(Some(event)) => {
                    expect_started(event, "counter", 2);
                    break;
                }
                Ok(None) => panic!("event channel closed"),
                Err(_) => assert!(sent < 100_000, "version 2 never started"),
            }
        }
        for _ in 0..50 {
            h.send("count", b"x");
        }
        sent += 50;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + EVENT_WAIT;
        while seen.last().map(|(n, _)| *n) != Some(sent) {
            let line = tokio::time::timeout_at(deadline, h.logs.recv())
                .await
                .expect("not all messages were counted")
                .unwrap();
            let n: u32 = line.text.strip_prefix("count ").unwrap().parse().unwrap();
            seen.push((n, line.version));
        }
        let numbers: Vec<u32> = seen.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            numbers,
            (51..=sent).collect::<Vec<_>>(),
            "a message was lost or repeated"
        );
        // Version 2 took over with the count of version 1.
        assert_eq!(seen.last().unwrap().1, 2);
        assert!(seen.iter().any(|(_, v)| *v == 1));
        let s = h.status_where("counter", |_| true).await;
        assert_eq!((s.version, s.usage.messages_dropped), (2, 0));
        assert_eq!(s.subscriptions, vec!["count".to_string()]);
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn published_messages_reach_subscribers_and_state_persists() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("agg", 1, &module_source("aggregator.wat"));
        expect_started(h.event().await, "agg", 1);
        h.deploy("sensor", 1, &module_source("sensor.wat"));
        expect_started(h.event().await, "sensor", 1);
        // Eight readings (one per tick) make the aggregator log its count.
        let line = h.log_where(|l| l.module == "agg").await;
        assert_eq!(line.text, "readings 0008");
        let s = h.status_where("agg", |s| s.usage.state_bytes > 0).await;
        assert_eq!(s.usage.state_bytes, 12, "key of 8 bytes, value of 4");
        let sensor = h.status_where("sensor", |_| true).await;
        assert!(sensor.usage.published >= 8, "{:?}", sensor.usage);
        h.stop().await;
    }

    /// Builds the C guests with `examples/modules/c/build.sh`; `None` (and a message)
    /// when clang for wasm32-wasi is not installed.
    fn c_guests() -> Option<std::path::PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/modules/c");
        let out = std::process::Command::new("bash")
            .arg(dir.join("build.sh"))
            .output()
            .expect("running build.sh");
        assert!(
            out.status.success(),
            "build.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let built = dir.join("out");
        if !built.join("sensor.wasm").exists() {
            println!(
                "skipping: C guests not built: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(built)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn c_guests_run_and_hostile_c_guests_are_contained() {
        let Some(built) = c_guests() else { return };
        let c = |name: &str| std::fs::read(built.join(format!("{name}.wasm"))).unwrap();
        let sensor_dir = tempfile::tempdir().unwrap();
        let sensor = sensor_dir.path().join("temp");
        std::fs::write(&sensor, "21.5\n").unwrap();
        let mut config = fast_config();
        // wasi-libc's printf and malloc want more than the 4 MiB of the WAT tests' quota.
        config.quotas.defaults.memory_bytes = 16 << 20;
        // Room in the node's CPU budget for the aggregator's whole core beside the others.
        config.quotas.budget.cpu_permille = 4000;
        let mut h = Harness::start_with(config, [sensor.clone()].into()).await;
        let path = sensor.to_str().unwrap().as_bytes();
        h.kv.set("sensor", b"path", path, 1 << 20).unwrap();
        // The aggregator writes its count durably on every reading; on a loaded machine a
        // commit can take a good part of a tick, so it gets a whole core of CPU share (the
        // meter charges wall time) and is never throttled into dropping readings. The
        // well-behaved pair also gets the longest deadline the policy allows: a deadline
        // is wall time, and a thread descheduled for 50 ms on a starved machine (the
        // tests' default) is not what this test is about; the hostile guests keep theirs.
        let whole_core = Quotas {
            cpu_share_permille: Some(1000),
            call_ms: Some(DEFAULT_CALL_MS_MAX),
            ..Quotas::default()
        };
        h.deploy_bytes("aggregator", 1, c("aggregator"), whole_core);
        expect_started(h.event().await, "aggregator", 1);
        let patient = Quotas {
            call_ms: Some(DEFAULT_CALL_MS_MAX),
            ..Quotas::default()
        };
        h.deploy_bytes("sensor", 1, c("sensor"), patient);
        expect_started(h.event().await, "sensor", 1);
        let line = h.log_where(|l| l.module == "sensor").await;
        assert_eq!(line.text, format!("sensor reading {}", sensor.display()));
        let line = h.log_where(|l| l.module == "aggregator").await;
        assert_eq!(line.text, "readings 8 mean 21.50 min 21.50 max 21.50");

        for kind in ["spin", "membomb", "recursion", "logspam", "flood"] {
            h.deploy_bytes(
                &format!("hostile-{kind}"),
                1,
                c(&format!("hostile_{kind}")),
                flood_quotas(kind),
            );
        }
        let spam = h
            .status_where("hostile-logspam", |s| s.usage.log_lines_dropped > 0)
            .await;
        assert_eq!(spam.restarts, 0);
        let flood = h
            .status_where("hostile-flood", |s| s.usage.publish_refused > 0)
            .await;
        assert_eq!(flood.restarts, 0);
        for crasher in ["spin", "membomb", "recursion"] {
            h.status_where(&format!("hostile-{crasher}"), |s| {
                s.restarts >= 1 || matches!(s.state, ModuleState::Failed { .. })
            })
            .await;
        }
        // The sensor pipeline kept running through all of it. The log channel is shared
        // with the log spammer and drops lines when full (as it should), so any summary
        // at 16 readings or more will do, not exactly the 16th.
        h.log_where(|l| {
            l.module == "aggregator"
                && l.text
                    .strip_prefix("readings ")
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n >= 16)
        })
        .await;
        for name in ["sensor", "aggregator"] {
            let s = h.status_where(name, |_| true).await;
            assert_eq!((s.state, s.restarts), (ModuleState::Running, 0), "{name}");
        }
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn cpu_hog_is_throttled_not_restarted() {
        let mut config = fast_config();
        config.tick_interval = Duration::from_millis(10);
        // Far above the 40 ms each tick takes, so a descheduled thread on a loaded
        // machine never turns throttling into a deadline.
        config.quotas.defaults.call_ms = 10 * DEFAULT_CALL_MS_MAX;
        let mut h = Harness::start(config).await;
        h.deploy("burn", 1, &module_source("burn.wat"));
        expect_started(h.event().await, "burn", 1);
        let s = h.status_where("burn", |s| s.usage.throttled >= 5).await;
        assert_eq!((s.state, s.restarts), (ModuleState::Running, 0));
        // 10% of a core: far less CPU than ticks every 10 ms of 40 ms each would take.
        assert!(s.usage.calls >= 1);
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn hostile_modules_are_contained_and_neighbours_keep_running() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("hello", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "hello", 1);
        for hostile in [
            "spin",
            "membomb",
            "recursion",
            "logspam",
            "publishflood",
            "trap",
        ] {
            h.deploy_with(
                hostile,
                1,
                &module_source(&format!("{hostile}.wat")),
                flood_quotas(hostile),
            );
        }
        // The well-behaved module keeps ticking while the others trip their quotas. Log
        // lines are dropped when the shared channel is full (the spammer sees to that),
        // so any tick at least 20 later will do.
        let tick_of = |l: &LogLine| -> Option<u32> {
            (l.module == "hello")
                .then(|| l.text.strip_prefix("tick ")?.parse().ok())
                .flatten()
        };
        let first = h.log_where(|l| tick_of(l).is_some()).await;
        let n = tick_of(&first).unwrap_or(0);
        h.log_where(|l| tick_of(l).is_some_and(|t| t >= n + 20))
            .await;
        let spam = h
            .status_where("logspam", |s| s.usage.log_lines_dropped > 0)
            .await;
        assert_eq!(spam.restarts, 0, "a log flood is dropped, not a crash");
        let flood = h
            .status_where("publishflood", |s| s.usage.publish_refused > 0)
            .await;
        assert_eq!(flood.restarts, 0);
        for crasher in ["spin", "membomb", "recursion", "trap"] {
            h.status_where(crasher, |s| {
                s.restarts >= 1 || matches!(s.state, ModuleState::Failed { .. })
            })
            .await;
        }
        let hello = h.status_where("hello", |_| true).await;
        assert_eq!((hello.state, hello.restarts), (ModuleState::Running, 0));
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_module_that_cannot_start_uses_its_budget() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("bad", 1, r#"(module (func (export "init") unreachable))"#);
        for _ in 0..2 {
            assert!(matches!(h.event().await, SandboxEvent::Crashed { .. }));
        }
        match h.event().await {
            SandboxEvent::Failed { reason, .. } => {
                assert!(reason.contains("calling init"), "{reason}")
            }
            other => panic!("expected the module to be given up on, got {other:?}"),
        }
        // A newer version takes over a failed module.
        h.deploy("bad", 2, &module_source("hello.wat"));
        expect_started(h.event().await, "bad", 2);
        let list = h.list().await;
        assert_eq!(
            (list[0].version, &list[0].state),
            (2, &ModuleState::Running)
        );
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stopping_the_parent_stops_the_modules() {
        let mut h = Harness::start(fast_config()).await;
        h.deploy("hello", 1, &module_source("hello.wat"));
        expect_started(h.event().await, "hello", 1);
        h.log_where(|l| l.text.starts_with("tick")).await;
        let Harness {
            sup,
            mut logs,
            handle,
            ..
        } = h;
        sup.actor().stop(None);
        handle.await.unwrap();
        // Allow an in-flight tick to finish, then expect silence.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while logs.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            logs.try_recv().is_err(),
            "a module kept running after its supervisor stopped"
        );
        assert_eq!(
            sup.try_send(SandboxMsg::RestartDue {
                name: "x".into(),
                generation: 0
            }),
            Err(MailboxError::Gone)
        );
    }
}
