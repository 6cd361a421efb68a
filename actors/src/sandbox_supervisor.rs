//! The sandbox supervisor: one actor per module, restarted under a [`RestartBudget`].
//!
//! [`SandboxSupervisor`] owns a [`ModuleActor`] per module name, linked as its child.
//! A module actor instantiates the module and calls its `init` export while starting,
//! then calls `on_tick` every `tick_interval`; a trap, a missed deadline or a memory
//! limit makes it fail, and the supervisor (one-for-one: only that module is touched)
//! asks the module's budget whether to restart it after a backoff or give up on it.
//! The decision lives in [`RestartBudget`]; this file only carries it out.
//!
//! See `docs/runtime-semantics.md` for the same rules from the operator's side.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_transport::ContentId;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::mailbox::{BoundedRef, Envelope, MailboxError};
use crate::restart::{RestartBudget, RestartDecision, RestartPolicy};
use crate::sandbox::{
    CallError, CompiledModule, InstantiateError, LogLine, Sandbox, SandboxEngine, SandboxLimits,
};

/// Messages the supervisor may hold at once. Deploys and status queries are rare (an
/// operator or a rollout); restart timers add at most one message per module. A few
/// hundred is far above normal load and still a trivial amount of memory.
pub const SANDBOX_MAILBOX_MESSAGES_MAX: usize = 256;
/// Default time between two `on_tick` calls: once a second suits sensor sampling and
/// keeps an idle module's cost negligible.
pub const DEFAULT_TICK_MS: u64 = 1000;
/// A restart timer that finds the supervisor's mailbox full tries again this much later,
/// rather than losing the restart.
pub const RESTART_RETRY_MS: u64 = 50;

/// How the supervisor runs modules.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub limits: SandboxLimits,
    pub restart: RestartPolicy,
    pub tick_interval: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            limits: SandboxLimits::default(),
            restart: RestartPolicy::default(),
            tick_interval: Duration::from_millis(DEFAULT_TICK_MS),
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
    /// Log lines dropped because the node's log channel was full, across restarts.
    pub logs_dropped: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ModuleState {
    Starting,
    Running,
    Backoff { restart_in_ms: u64 },
    Failed { reason: String },
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
    Failed {
        name: String,
        version: u64,
        reason: String,
    },
    Rejected {
        name: String,
        version: u64,
        reason: String,
    },
}

#[derive(Clone)]
pub struct SandboxSupervisorArgs {
    pub engine: SandboxEngine,
    pub config: SandboxConfig,
    pub logs: mpsc::Sender<LogLine>,
    pub events: mpsc::Sender<SandboxEvent>,
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
    name: String,
    version: u64,
    limits: SandboxLimits,
    logs: mpsc::Sender<LogLine>,
    logs_dropped: Arc<AtomicU64>,
    tick_interval: Duration,
}

#[derive(Debug)]
pub enum ModuleMsg {
    Tick,
}

pub struct ModuleActorState {
    /// `None` only while a call is running on a blocking thread (it is moved there).
    sandbox: Option<Sandbox>,
    tick_interval: Duration,
    /// Set while a tick is waiting in the mailbox, so the ticker never queues a second.
    tick_queued: Arc<AtomicBool>,
    ticker: Option<AbortOnDrop>,
}

/// Stops the ticker task when the actor's state goes away, however the actor ended.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
        // Instantiating compiles nothing but may run the start function, and `init` is
        // guest code: both can take up to call_ms_max, so neither runs on the runtime.
        let sandbox = tokio::task::spawn_blocking(move || {
            let mut sandbox = Sandbox::instantiate_counting(
                &args.engine,
                &args.module,
                &args.name,
                args.version,
                args.limits,
                args.logs,
                args.logs_dropped,
            )?;
            sandbox.call("init").map_err(|source| ModuleFailure::Call {
                export: "init",
                source,
            })?;
            Ok::<_, ModuleFailure>(sandbox)
        })
        .await
        .map_err(|_| ModuleFailure::Panicked { export: "init" })??;
        Ok(ModuleActorState {
            sandbox: Some(sandbox),
            tick_interval,
            tick_queued: Arc::new(AtomicBool::new(false)),
            ticker: None,
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
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: ModuleMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ModuleMsg::Tick => {
                state.tick_queued.store(false, Ordering::Release);
                let Some(mut sandbox) = state.sandbox.take() else {
                    // Unreachable: the sandbox is only out while a call runs, and calls
                    // do not overlap. Failing is still better than panicking.
                    return Err("module state lost its sandbox".into());
                };
                let (sandbox, result) = tokio::task::spawn_blocking(move || {
                    let result = sandbox.call("on_tick");
                    (sandbox, result)
                })
                .await
                .map_err(|_| ModuleFailure::Panicked { export: "on_tick" })?;
                // A failed sandbox is not put back: the actor fails and is discarded.
                result.map_err(|source| ModuleFailure::Call {
                    export: "on_tick",
                    source,
                })?;
                state.sandbox = Some(sandbox);
                Ok(())
            }
        }
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
    engine: SandboxEngine,
    config: SandboxConfig,
    logs: mpsc::Sender<LogLine>,
    events: mpsc::Sender<SandboxEvent>,
    modules: BTreeMap<String, ModuleEntry>,
    /// Which module (and which start of it) each live child actor runs.
    children: HashMap<ActorId, Child>,
    next_generation: u64,
}

struct ModuleEntry {
    version: u64,
    content: ContentId,
    module: CompiledModule,
    state: ModuleState,
    since_unix_ms: u64,
    restarts: u32,
    budget: RestartBudget,
    /// Bumped on every start attempt and every failure; timers and children carry the
    /// generation they were made for, and anything older is ignored.
    generation: u64,
    actor: Option<ActorRef<ModuleMsg>>,
    logs_dropped: Arc<AtomicU64>,
}

struct Child {
    name: String,
    generation: u64,
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
        let SandboxSupervisorArgs {
            engine,
            config,
            logs,
            events,
        } = init.args;
        Ok(SupervisorState {
            myself: BoundedRef::with_counter(myself, init.in_flight, SANDBOX_MAILBOX_MESSAGES_MAX),
            engine,
            config,
            logs,
            events,
            modules: BTreeMap::new(),
            children: HashMap::new(),
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
            SandboxMsg::Deploy(deployment) => state.deploy(myself.get_cell(), deployment).await,
            SandboxMsg::List(reply) => {
                // The asker may have timed out; nothing to do about it here.
                let _ = reply.send(state.list());
            }
            SandboxMsg::RestartDue { name, generation } => {
                state.restart_due(myself.get_cell(), name, generation).await
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
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

impl SupervisorState {
    async fn deploy(&mut self, myself: ActorCell, d: Deployment) {
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
        let engine = self.engine.clone();
        let bytes = d.bytes.clone();
        // Compiling can take a while for a large module; keep it off the runtime threads.
        let compiled = match tokio::task::spawn_blocking(move || engine.compile(&bytes)).await {
            Ok(Ok(module)) => module,
            Ok(Err(e)) => return self.reject(&d, e.to_string()),
            Err(_) => return self.reject(&d, "compiling module: the compiler panicked".into()),
        };
        if let Some((module, name)) = compiled.unsupported_import() {
            // Such a module can never start: refuse it now instead of crash-looping it.
            return self.reject(
                &d,
                InstantiateError::UnknownImport { module, name }.to_string(),
            );
        }

        let old_running = self
            .modules
            .get(&d.name)
            .is_some_and(|entry| entry.actor.is_some());
        let generation = self.next_generation();
        match self
            .start_module(
                myself.clone(),
                &d.name,
                d.version,
                &compiled,
                generation,
                Arc::default(),
            )
            .await
        {
            Ok((actor, logs_dropped)) => {
                let mut budget = RestartBudget::new(self.config.restart.clone());
                budget.on_start(Instant::now());
                let entry = ModuleEntry {
                    version: d.version,
                    content: d.content,
                    module: compiled,
                    state: ModuleState::Running,
                    since_unix_ms: crate::unix_ms(),
                    restarts: 0,
                    budget,
                    generation,
                    actor: Some(actor),
                    logs_dropped,
                };
                // Only now that the new version runs is the old one stopped; it is
                // forgotten first so that its exit is not mistaken for a crash.
                if let Some(old) = self.modules.insert(d.name.clone(), entry) {
                    if let Some(old_actor) = old.actor {
                        self.children.remove(&old_actor.get_id());
                        old_actor.stop(Some(format!("replaced by version {}", d.version)));
                    }
                    tracing::info!(module = %d.name, old = old.version, new = d.version, "module replaced");
                }
                tracing::info!(module = %d.name, version = d.version, content = %d.content.short(), "module started");
                self.emit(SandboxEvent::Started {
                    name: d.name,
                    version: d.version,
                });
            }
            Err(reason) if old_running => {
                // The running version keeps running; the new one never took over.
                self.reject(&d, reason);
            }
            Err(reason) => {
                // Nothing is running under this name: the new version takes the slot and
                // its failed start counts against its own restart budget.
                let entry = ModuleEntry {
                    version: d.version,
                    content: d.content,
                    module: compiled,
                    state: ModuleState::Starting,
                    since_unix_ms: crate::unix_ms(),
                    restarts: 0,
                    budget: RestartBudget::new(self.config.restart.clone()),
                    generation,
                    actor: None,
                    logs_dropped: Arc::default(),
                };
                self.modules.insert(d.name.clone(), entry);
                self.module_failed(&d.name, reason);
            }
        }
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
        let logs_dropped = entry.logs_dropped.clone();
        let generation = self.next_generation();
        if let Some(entry) = self.modules.get_mut(&name) {
            entry.generation = generation;
            entry.restarts = entry.restarts.saturating_add(1);
            entry.set_state(ModuleState::Starting);
        }
        let started = self
            .start_module(myself, &name, version, &module, generation, logs_dropped)
            .await;
        match started {
            Ok((actor, _)) => {
                if let Some(entry) = self.modules.get_mut(&name) {
                    entry.actor = Some(actor);
                    entry.budget.on_start(Instant::now());
                    entry.set_state(ModuleState::Running);
                }
                tracing::info!(module = %name, version, "module restarted");
                self.emit(SandboxEvent::Started { name, version });
            }
            Err(reason) => self.module_failed(&name, reason),
        }
    }

    /// Spawns a module actor, which instantiates the module and runs `init` before this
    /// returns. On success the child is on record under `generation`.
    async fn start_module(
        &mut self,
        myself: ActorCell,
        name: &str,
        version: u64,
        module: &CompiledModule,
        generation: u64,
        logs_dropped: Arc<AtomicU64>,
    ) -> Result<(ActorRef<ModuleMsg>, Arc<AtomicU64>), String> {
        let args = ModuleArgs {
            engine: self.engine.clone(),
            module: module.clone(),
            name: name.to_string(),
            version,
            limits: self.config.limits.clone(),
            logs: self.logs.clone(),
            logs_dropped: logs_dropped.clone(),
            tick_interval: self.config.tick_interval,
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
                Ok((actor, logs_dropped))
            }
            Err(ractor::SpawnErr::StartupFailed(e)) => Err(e.to_string()),
            Err(e) => Err(format!("starting module actor: {e}")),
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
        entry.generation = generation;
        let version = entry.version;
        match entry.budget.on_failure(Instant::now()) {
            RestartDecision::Restart { delay, attempt } => {
                let restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                entry.set_state(ModuleState::Backoff { restart_in_ms });
                tracing::warn!(module = %name, version, %reason, attempt, restart_in_ms, "module crashed; restarting after backoff");
                schedule_restart(self.myself.clone(), name.to_string(), generation, delay);
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
                tracing::error!(module = %name, version, %reason, "module failed; not restarting");
                self.emit(SandboxEvent::Failed {
                    name: name.to_string(),
                    version,
                    reason,
                });
            }
        }
    }

    fn reject(&mut self, d: &Deployment, reason: String) {
        tracing::warn!(module = %d.name, version = d.version, %reason, "deploy rejected");
        self.emit(SandboxEvent::Rejected {
            name: d.name.clone(),
            version: d.version,
            reason,
        });
    }

    fn list(&self) -> Vec<ModuleStatus> {
        self.modules
            .iter()
            .map(|(name, e)| ModuleStatus {
                name: name.clone(),
                version: e.version,
                content: e.content,
                state: e.state.clone(),
                restarts: e.restarts,
                since_unix_ms: e.since_unix_ms,
                logs_dropped: e.logs_dropped.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn emit(&self, event: SandboxEvent) {
        // Never wait on the listener: a stalled consumer must not stall supervision.
        if let Err(e) = self.events.try_send(event) {
            tracing::debug!(event = ?e.into_inner(), "sandbox event dropped: channel full or closed");
        }
    }

    fn next_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

/// After `delay`, tells the supervisor to restart `name` if `generation` is still current.
fn schedule_restart(
    supervisor: BoundedRef<SandboxMsg>,
    name: String,
    generation: u64,
    delay: Duration,
) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        loop {
            let msg = SandboxMsg::RestartDue {
                name: name.clone(),
                generation,
            };
            match supervisor.try_send(msg) {
                Err(MailboxError::Full { .. }) => {
                    tracing::debug!(module = %name, "supervisor mailbox full; retrying restart");
                    tokio::time::sleep(Duration::from_millis(RESTART_RETRY_MS)).await;
                }
                // Sent, or the supervisor is gone and nothing is left to restart.
                _ => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT_WAIT: Duration = Duration::from_secs(10);

    struct Harness {
        sup: BoundedRef<SandboxMsg>,
        logs: mpsc::Receiver<LogLine>,
        events: mpsc::Receiver<SandboxEvent>,
        handle: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        async fn start(config: SandboxConfig) -> Harness {
            let (logs_tx, logs) = mpsc::channel(1024);
            let (events_tx, events) = mpsc::channel(1024);
            let (sup, handle) = spawn_sandbox_supervisor(
                SandboxSupervisorArgs {
                    engine: SandboxEngine::new().unwrap(),
                    config,
                    logs: logs_tx,
                    events: events_tx,
                },
                None,
            )
            .await
            .unwrap();
            Harness {
                sup,
                logs,
                events,
                handle,
            }
        }

        fn deploy(&self, name: &str, version: u64, source: &str) {
            let bytes: Arc<[u8]> = source.as_bytes().into();
            self.sup
                .try_send(SandboxMsg::Deploy(Deployment {
                    name: name.to_string(),
                    version,
                    content: ContentId::of(&bytes),
                    bytes,
                }))
                .unwrap();
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
        SandboxConfig {
            limits: SandboxLimits {
                memory_bytes_max: 4 << 20,
                call_ms_max: 50,
                log_line_bytes_max: 1024,
            },
            restart: RestartPolicy {
                intensity: 2,
                period: Duration::from_secs(10),
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_millis(50),
            },
            tick_interval: Duration::from_millis(20),
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
        h.deploy("wasi", 1, &module_source("needs_wasi.wat"));
        match h.event().await {
            SandboxEvent::Rejected { reason, .. } => {
                assert!(
                    reason.contains("wasi_snapshot_preview1::fd_write"),
                    "{reason}"
                );
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert!(h.list().await.is_empty());
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
