//! The firmware actor: carries firmware releases into a node's A/B slots.
//!
//! The trust actor checks and records a firmware release and hands it here; this actor
//! decides what to fetch (only the patch when the release lists one from the confirmed
//! image, else the full image; see [`plan`]), fetches it through the mesh with
//! [`crate::fetch::download`], installs it into the inactive slot ([`SlotStore`]),
//! activates it, runs its health gate ([`HealthGate`]), and confirms it or switches
//! back and reports the failure on [`FIRMWARE_FAILURES_TOPIC`].
//!
//! Two kinds of target:
//!
//! - a device target (configured on the node): activation runs the target's hook
//!   command, which on a real device points the boot loader at the new slot and may
//!   reboot; the agent's start is the device's boot.
//! - the agent itself (`agent`, present when `mesh launcher` started the node):
//!   activation asks the node to exit with [`RESTART_EXIT_CODE`], and the launcher,
//!   which does the boot counting, starts the binary in the new slot.
//!
//! The slot stores live in [`FirmwareShared`], which outlives a restart of this actor, so
//! a restarted actor never opens a target that a task of its predecessor still writes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mesh_transport::libp2p::PeerId;
use mesh_transport::swarm::SwarmHandle;
use mesh_transport::{wire, ContentId};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::delta::Codec;
use crate::fetch::FetchCtx;
use crate::mailbox::{BoundedRef, Envelope, MailboxError};
use crate::manifest::{DeltaRef, Manifest, ReleaseKind, SignedManifest};
use crate::node::Addr;
use crate::slots::{
    GateDecision, HealthGate, Phase, Recovery, Rollback, SlotImage, SlotRecord, SlotStore, Source,
    BOOT_ATTEMPTS_DEFAULT, REASON_BYTES_MAX,
};
use crate::store::ContentStore;

pub use crate::slots::Slot;

/// The gossipsub topic on which nodes report firmware that failed its trial.
pub const FIRMWARE_FAILURES_TOPIC: &str = "mesh/firmware-failures/1";
/// A failure report is a name, two versions, a hash and a short reason.
pub const FIRMWARE_FAILURE_BYTES_MAX: usize = 4 * 1024;
/// Targets one node manages; each costs two slot images of disk.
pub const TARGETS_MAX: usize = 16;
/// The target name of the agent's own binary, managed under `mesh launcher`.
pub const AGENT_TARGET: &str = "agent";
/// The exit code by which the agent asks its launcher to start the active slot again.
/// 75 is `EX_TEMPFAIL`: "try again", which no other failure of the agent uses.
pub const RESTART_EXIT_CODE: i32 = 75;
/// Set by the launcher: the slot ("a" or "b") the agent was started from.
pub const LAUNCHER_SLOT_ENV: &str = "MESH_LAUNCHER_SLOT";
/// Set by the launcher: the agent's grace period on trial, in milliseconds.
pub const LAUNCHER_GRACE_MS_ENV: &str = "MESH_LAUNCHER_GRACE_MS";
/// Set by the launcher: the agent's health deadline on trial, in milliseconds.
pub const LAUNCHER_DEADLINE_MS_ENV: &str = "MESH_LAUNCHER_DEADLINE_MS";
/// Set by the launcher when there is one: the agent's health command (run by `sh -c`).
pub const LAUNCHER_HEALTH_ENV: &str = "MESH_LAUNCHER_HEALTH";
/// How long a new image must stay up before it can be confirmed, by default.
pub const GRACE_DEFAULT: Duration = Duration::from_secs(10);
/// How long a new image has to become healthy, by default, before the switch back.
pub const DEADLINE_DEFAULT: Duration = Duration::from_secs(120);
/// Wait between two runs of a failing health command.
pub const HEALTH_RETRY: Duration = Duration::from_secs(2);
/// A health command that runs longer than this has failed.
pub const HEALTH_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// An activation hook may flash and reboot; one that runs longer than this has failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// A failed fetch or install is tried again after this, doubling up to the max.
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Failed fetches or installs through a patch before the full image is fetched instead.
pub const PATCH_ATTEMPTS_MAX: u32 = 3;
/// Failed installs of one release before it is recorded failed and left alone.
pub const INSTALL_ATTEMPTS_MAX: u32 = 5;
/// Slot image files of a device target.
const DEVICE_SLOT_MODE: u32 = 0o644;
/// Slot image files of the agent target are executables.
pub const AGENT_SLOT_MODE: u32 = 0o755;
/// How often health gates and retries are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Messages queued for the firmware actor: releases, ticks and task results.
pub const FIRMWARE_MAILBOX_MAX: usize = 256;

/// What a target is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A device image; `activate` is the hook command (`sh -c`) that switches the device
    /// to a slot, if any.
    Device { activate: Option<String> },
    /// The agent's own binary, started by the launcher from slot `launched`.
    Agent { launched: Slot },
}

/// One firmware target of a node.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// The release name whose firmware goes into this target.
    pub name: String,
    pub kind: TargetKind,
    /// The image a new device target starts with in slot A (empty when none).
    pub initial_image: Option<PathBuf>,
    pub boot_attempts: u32,
    pub grace: Duration,
    pub deadline: Duration,
    /// A command (`sh -c`) that must succeed before a new image is confirmed.
    pub health: Option<String>,
}

impl TargetConfig {
    /// A device target with the default gate.
    pub fn device(name: &str) -> TargetConfig {
        TargetConfig {
            name: name.to_string(),
            kind: TargetKind::Device { activate: None },
            initial_image: None,
            boot_attempts: BOOT_ATTEMPTS_DEFAULT,
            grace: GRACE_DEFAULT,
            deadline: DEADLINE_DEFAULT,
            health: None,
        }
    }

    /// The agent target as the launcher describes it in the environment, when the agent
    /// runs under one.
    pub fn agent_from_env() -> Option<TargetConfig> {
        let launched: Slot = std::env::var(LAUNCHER_SLOT_ENV).ok()?.parse().ok()?;
        let ms = |var: &str, default: Duration| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
                .unwrap_or(default)
        };
        Some(TargetConfig {
            name: AGENT_TARGET.to_string(),
            kind: TargetKind::Agent { launched },
            initial_image: None,
            boot_attempts: BOOT_ATTEMPTS_DEFAULT,
            grace: ms(LAUNCHER_GRACE_MS_ENV, GRACE_DEFAULT),
            deadline: ms(LAUNCHER_DEADLINE_MS_ENV, DEADLINE_DEFAULT),
            health: std::env::var(LAUNCHER_HEALTH_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        })
    }

    fn mode(&self) -> u32 {
        match self.kind {
            TargetKind::Device { .. } => DEVICE_SLOT_MODE,
            TargetKind::Agent { .. } => AGENT_SLOT_MODE,
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            TargetKind::Device { .. } => "device",
            TargetKind::Agent { .. } => "agent",
        }
    }
}

/// The firmware targets of a node and where their slots live.
#[derive(Clone, Debug, Default)]
pub struct FirmwareConfig {
    /// `STATE/firmware`: each target's slots are in a directory of its name there.
    pub dir: PathBuf,
    pub targets: Vec<TargetConfig>,
}

/// What the node supervisor keeps to start (and restart) the firmware actor.
#[derive(Clone, Default)]
pub struct FirmwareSetup {
    pub config: FirmwareConfig,
    pub shared: FirmwareShared,
    /// See [`FirmwareArgs::restart`].
    pub restart: Option<tokio::sync::mpsc::Sender<String>>,
}

/// What to fetch for a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchPlan {
    /// The whole image.
    Full { id: ContentId, size: u64 },
    /// Only this patch, against the confirmed image.
    Patch(DeltaRef),
}

/// Chooses what to fetch: the patch from `base` (the confirmed image) when the release
/// lists one whose codec this node knows and whose size is within `bytes_max`, unless
/// `prefer_full` (the patch path already failed); else the full image.
pub fn plan(manifest: &Manifest, base: &SlotImage, prefer_full: bool, bytes_max: u64) -> FetchPlan {
    let patch = manifest.deltas.iter().find(|d| {
        d.base == base.content
            && d.patch_size > 0
            && d.patch_size <= bytes_max
            && d.codec.parse::<Codec>().is_ok()
    });
    match patch {
        Some(d) if !prefer_full => FetchPlan::Patch(d.clone()),
        _ => FetchPlan::Full {
            id: manifest.content,
            size: manifest.size,
        },
    }
}

/// A firmware image that failed its trial on a node, as gossiped on
/// [`FIRMWARE_FAILURES_TOPIC`]. Who reports it is the gossip message's (signed) author.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareFailure {
    pub target: String,
    pub version: u64,
    pub content: ContentId,
    pub reason: String,
    /// The confirmed version the node went back to.
    pub rolled_back_to: u64,
    pub unix_ms: u64,
}

/// Errors from decoding a firmware failure report received from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareFailureError {
    #[error("decoding firmware failure report: {0}")]
    Wire(#[from] wire::WireError),
    #[error("decoding firmware failure report: {0}")]
    Shape(#[from] crate::manifest::ShapeError),
    #[error("decoding firmware failure report: reason of {len} bytes is over {REASON_BYTES_MAX}")]
    Reason { len: usize },
}

impl FirmwareFailure {
    pub fn encode(&self) -> Vec<u8> {
        // Plain strings and numbers always encode; a failure would be a programming error.
        wire::encode(self).expect("firmware failure reports always encode")
    }

    /// Decodes untrusted bytes within [`FIRMWARE_FAILURE_BYTES_MAX`], checking the name.
    pub fn decode(bytes: &[u8]) -> Result<FirmwareFailure, FirmwareFailureError> {
        let r: FirmwareFailure = wire::decode(bytes, FIRMWARE_FAILURE_BYTES_MAX)?;
        crate::manifest::check_name(&r.target)?;
        if r.reason.len() > REASON_BYTES_MAX {
            return Err(FirmwareFailureError::Reason {
                len: r.reason.len(),
            });
        }
        Ok(r)
    }

    fn of(target: &str, rollback: &Rollback) -> FirmwareFailure {
        FirmwareFailure {
            target: target.to_string(),
            version: rollback.from.version,
            content: rollback.from.content,
            reason: rollback.reason.clone(),
            rolled_back_to: rollback.to.version,
            unix_ms: rollback.unix_ms,
        }
    }
}

/// One target as `mesh firmware` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetStatus {
    pub target: String,
    /// "device" or "agent".
    pub kind: String,
    /// The state record; `None` when the target could not be opened (see `error`).
    pub record: Option<SlotRecord>,
    /// What runs now (fetching, installing, activating, ...), if anything.
    pub busy: Option<String>,
    /// The newest release of this target that is not installed yet.
    pub wanted: Option<u64>,
    pub error: Option<String>,
}

#[derive(Default)]
struct Slotted {
    /// `None` while a task holds it (see `busy`) or when it could not be opened.
    store: Option<SlotStore>,
    /// The record as last seen, for status while a task holds the store.
    record: Option<SlotRecord>,
    /// Which slot this process booted on trial, and when (the start of its health
    /// gate). Only that slot's trial is judged here: an agent that activated the other
    /// slot and is about to exit must not confirm it.
    booted_at: Option<(Slot, Instant)>,
    /// Whether this process has run the target's boot (done once per process).
    booted: bool,
    busy: Option<String>,
    error: Option<String>,
}

/// Slot stores and per-process facts about them, shared by the firmware actor and its
/// tasks, and kept across restarts of the actor.
#[derive(Clone, Default)]
pub struct FirmwareShared(Arc<Mutex<BTreeMap<String, Slotted>>>);

impl FirmwareShared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slotted>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a target's store for a task, marking it busy; `None` when it is busy or not
    /// open.
    fn take(&self, target: &str, what: &str) -> Option<SlotStore> {
        let mut all = self.lock();
        let s = all.get_mut(target)?;
        if s.busy.is_some() {
            return None;
        }
        let store = s.store.take()?;
        s.busy = Some(what.to_string());
        Some(store)
    }

    fn set_busy(&self, target: &str, what: &str) {
        if let Some(s) = self.lock().get_mut(target) {
            s.busy = Some(what.to_string());
        }
    }

    /// Gives a store back after a task.
    fn put(&self, store: SlotStore) {
        let mut all = self.lock();
        let s = all.entry(store.record().target.clone()).or_default();
        s.record = Some(store.record().clone());
        s.store = Some(store);
        s.busy = None;
    }

    fn snapshot(&self, target: &str) -> Option<Snapshot> {
        let all = self.lock();
        let s = all.get(target)?;
        Some(Snapshot {
            record: s.record.clone(),
            busy: s.busy.is_some(),
            booted_at: s.booted_at,
        })
    }
}

/// What the actor reads of a target before it decides a step.
struct Snapshot {
    record: Option<SlotRecord>,
    busy: bool,
    booted_at: Option<(Slot, Instant)>,
}

/// Messages to the firmware actor.
pub enum FirmwareMsg {
    /// A firmware release the trust actor accepted and recorded, and who announced it.
    Release {
        signed: Box<SignedManifest>,
        from: Option<PeerId>,
    },
    Tick,
    /// A download for a target's wanted release ended.
    Fetched {
        target: String,
        version: u64,
        result: Result<(), String>,
    },
    /// A task on a target's slots ended.
    Done {
        target: String,
        op: Op,
        result: Result<(), String>,
    },
    /// The health command of a target on trial ended.
    HealthChecked {
        target: String,
        result: Result<(), String>,
    },
    /// Every target's status.
    Status(RpcReplyPort<Vec<TargetStatus>>),
}

/// Tasks on a target's slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    Install { version: u64, patch: bool },
    Activate,
    Confirm,
    Rollback,
    Reported,
}

/// What the firmware actor needs.
#[derive(Clone)]
pub struct FirmwareArgs {
    pub config: FirmwareConfig,
    pub store: Arc<ContentStore>,
    pub fetch: FetchCtx,
    pub swarm: SwarmHandle,
    /// The largest firmware image (and patch) this node accepts.
    pub bytes_max: u64,
    pub shared: FirmwareShared,
    /// Asks the agent process to exit with [`RESTART_EXIT_CODE`] (the launcher then
    /// starts the active slot); `None` when the node runs without a launcher.
    pub restart: Option<tokio::sync::mpsc::Sender<String>>,
    pub myself: Addr<FirmwareMsg>,
}

/// A release waiting to be installed on a target.
struct Wanted {
    signed: SignedManifest,
    hint: Option<PeerId>,
    /// Failed fetches and installs, for the retry delay.
    attempts: u32,
    /// Failed fetches or installs through the patch, for the switch to the full image.
    patch_failures: u32,
    /// Failed installs, for giving the release up.
    install_failures: u32,
    next_at: Instant,
    fetching: bool,
    /// Whether the fetch running is of a patch.
    fetching_patch: bool,
}

#[derive(Default)]
struct TargetState {
    wanted: Option<Wanted>,
    /// The health gate of the slot on trial, with the boot it judges.
    gate: Option<(Instant, HealthGate)>,
    /// The version whose refusal was last logged, so a refusal is logged once.
    refused_logged: Option<u64>,
}

pub struct FirmwareState {
    args: FirmwareArgs,
    targets: BTreeMap<String, TargetState>,
}

/// The node's firmware actor.
pub struct FirmwareActor;

impl Actor for FirmwareActor {
    type Msg = Envelope<FirmwareMsg>;
    type State = FirmwareState;
    type Arguments = FirmwareArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FirmwareArgs,
    ) -> Result<FirmwareState, ActorProcessingErr> {
        args.myself
            .set(Some(BoundedRef::new(myself, FIRMWARE_MAILBOX_MAX)));
        let mut targets = BTreeMap::new();
        for t in args.config.targets.iter().take(TARGETS_MAX) {
            targets.insert(t.name.clone(), TargetState::default());
            let fresh = {
                let mut all = args.shared.lock();
                let s = all.entry(t.name.clone()).or_default();
                s.store.is_none() && s.busy.is_none()
            };
            if fresh {
                args.shared.set_busy(&t.name, "opening");
                tokio::spawn(open_target(args.clone(), t.clone()));
            }
        }
        if args.config.targets.len() > TARGETS_MAX {
            tracing::warn!(
                "{} firmware targets configured, only the first {TARGETS_MAX} are managed",
                args.config.targets.len()
            );
        }
        // The releases already recorded are wanted until installed (after a restart in
        // the middle of an update, this resumes it).
        let store = args.store.clone();
        let recorded = tokio::task::spawn_blocking(move || store.current_releases()).await??;
        let mut state = FirmwareState { args, targets };
        for signed in recorded {
            if signed.manifest.kind == ReleaseKind::Firmware {
                state.want(signed, None);
            }
        }
        let ticker = state.args.myself.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                match ticker.try_send(FirmwareMsg::Tick) {
                    Ok(()) | Err(MailboxError::Full { .. }) => {}
                    Err(_) => break,
                }
            }
        });
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        envelope: Self::Msg,
        state: &mut FirmwareState,
    ) -> Result<(), ActorProcessingErr> {
        match envelope.msg {
            FirmwareMsg::Release { signed, from } => {
                let name = signed.manifest.name.clone();
                state.want(*signed, from);
                state.step(&name).await;
            }
            FirmwareMsg::Tick => {
                let names: Vec<String> = state.targets.keys().cloned().collect();
                for name in names {
                    state.step(&name).await;
                }
            }
            FirmwareMsg::Fetched {
                target,
                version,
                result,
            } => {
                state.fetched(&target, version, result);
                state.step(&target).await;
            }
            FirmwareMsg::Done { target, op, result } => {
                state.done(&target, op, result).await;
                state.step(&target).await;
            }
            FirmwareMsg::HealthChecked { target, result } => {
                if let Some((_, gate)) =
                    state.targets.get_mut(&target).and_then(|t| t.gate.as_mut())
                {
                    if let Err(e) = &result {
                        tracing::warn!(%target, "health check failed: {e}");
                    }
                    gate.on_check(Instant::now(), result);
                }
                state.step(&target).await;
            }
            FirmwareMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }
}

/// Opens (or creates) a target's slots, runs its boot for a device target (once per
/// process), and hands the store to the shared map.
async fn open_target(args: FirmwareArgs, t: TargetConfig) {
    let dir = args.config.dir.join(&t.name);
    let (name, cfg) = (t.name.clone(), t.clone());
    let booted_before = args
        .shared
        .lock()
        .get(&name)
        .map(|s| s.booted)
        .unwrap_or(false);
    let opened = tokio::task::spawn_blocking(move || {
        let (mut store, recovery) = match &cfg.kind {
            TargetKind::Device { .. } => SlotStore::open_or_create(
                &dir,
                &cfg.name,
                cfg.initial_image.as_deref(),
                cfg.boot_attempts,
                cfg.mode(),
            ),
            // The launcher creates the agent's slots before it starts the agent.
            TargetKind::Agent { .. } => SlotStore::open(&dir, cfg.mode()),
        }
        .map_err(|e| e.to_string())?;
        match recovery {
            Recovery::Clean | Recovery::Created => {}
            _ => tracing::warn!(target = %cfg.name, ?recovery, "firmware slots recovered"),
        }
        // A device target boots when the agent starts, which is when the device booted
        // (or the activation hook returned); the launcher boots the agent target.
        let mut trial_started = None;
        match &cfg.kind {
            TargetKind::Device { .. } if !booted_before => {
                let b = store.boot(crate::unix_ms()).map_err(|e| e.to_string())?;
                if b.trial {
                    trial_started = Some((b.slot, Instant::now()));
                }
                if let Some(rb) = &b.rolled_back {
                    tracing::error!(target = %cfg.name, from = rb.from.version, to = rb.to.version, "switched back at boot: {}", rb.reason);
                }
            }
            TargetKind::Agent { launched } => {
                if let Phase::Trial { slot, .. } = store.record().phase {
                    if slot == *launched {
                        trial_started = Some((slot, Instant::now()));
                    } else {
                        tracing::warn!(target = %cfg.name, %slot, %launched, "the slot on trial is not the one this agent was started from");
                    }
                }
            }
            TargetKind::Device { .. } => {}
        }
        store.check().map_err(|e| format!("checking the slots: {e}"))?;
        Ok((store, trial_started))
    })
    .await;
    let result = match opened {
        Ok(r) => r,
        Err(e) => Err(format!("opening the slots: {e}")),
    };
    {
        let mut all = args.shared.lock();
        let s = all.entry(name.clone()).or_default();
        s.busy = None;
        s.booted = true;
        match result {
            Ok((store, trial_started)) => {
                if trial_started.is_some() {
                    s.booted_at = trial_started;
                }
                s.record = Some(store.record().clone());
                s.store = Some(store);
                s.error = None;
            }
            Err(e) => {
                tracing::error!(target = %name, "firmware target unusable: {e}");
                s.error = Some(e);
            }
        }
    }
    let _ = args.myself.try_send(FirmwareMsg::Done {
        target: name,
        op: Op::Open,
        result: Ok(()),
    });
}

impl FirmwareState {
    fn config(&self, target: &str) -> Option<&TargetConfig> {
        self.args.config.targets.iter().find(|t| t.name == target)
    }

    fn want(&mut self, signed: SignedManifest, from: Option<PeerId>) {
        let name = signed.manifest.name.clone();
        let Some(t) = self.targets.get_mut(&name) else {
            tracing::debug!(release = %name, "no firmware target of that name here; not installing it");
            return;
        };
        if t.wanted
            .as_ref()
            .is_some_and(|w| w.signed.manifest.version >= signed.manifest.version)
        {
            return;
        }
        t.wanted = Some(Wanted {
            signed,
            hint: from,
            attempts: 0,
            patch_failures: 0,
            install_failures: 0,
            next_at: Instant::now(),
            fetching: false,
            fetching_patch: false,
        });
    }

    fn status(&self) -> Vec<TargetStatus> {
        let all = self.args.shared.lock();
        self.args
            .config
            .targets
            .iter()
            .take(TARGETS_MAX)
            .map(|t| {
                let s = all.get(&t.name);
                let wanted = self
                    .targets
                    .get(&t.name)
                    .and_then(|x| x.wanted.as_ref())
                    .map(|w| w.signed.manifest.version);
                TargetStatus {
                    target: t.name.clone(),
                    kind: t.kind_name().to_string(),
                    record: s.and_then(|s| s.record.clone()),
                    busy: s.and_then(|s| s.busy.clone()).or_else(|| {
                        self.targets
                            .get(&t.name)
                            .and_then(|x| x.wanted.as_ref())
                            .filter(|w| w.fetching)
                            .map(|_| "fetching".to_string())
                    }),
                    wanted,
                    error: s.and_then(|s| s.error.clone()),
                }
            })
            .collect()
    }

    fn fetched(&mut self, target: &str, version: u64, result: Result<(), String>) {
        let Some(w) = self
            .targets
            .get_mut(target)
            .and_then(|t| t.wanted.as_mut())
            .filter(|w| w.signed.manifest.version == version)
        else {
            return;
        };
        w.fetching = false;
        if let Err(e) = result {
            tracing::warn!(%target, version, "fetching firmware: {e}");
            w.attempts += 1;
            if w.fetching_patch {
                w.patch_failures += 1;
            }
            w.next_at = Instant::now() + retry_delay(w.attempts);
        }
    }

    async fn done(&mut self, target: &str, op: Op, result: Result<(), String>) {
        let Some(cfg) = self.config(target).cloned() else {
            return;
        };
        match (&op, &result) {
            (Op::Install { version, patch }, Err(e)) => {
                tracing::error!(%target, version, patch, "installing firmware: {e}");
                let give_up = self
                    .targets
                    .get_mut(target)
                    .and_then(|t| t.wanted.as_mut())
                    .filter(|w| w.signed.manifest.version == *version)
                    .map(|w| {
                        w.attempts += 1;
                        w.install_failures += 1;
                        if *patch {
                            w.patch_failures += 1;
                        }
                        w.next_at = Instant::now() + retry_delay(w.attempts);
                        w.install_failures >= INSTALL_ATTEMPTS_MAX
                    })
                    .unwrap_or(false);
                if give_up {
                    let reason = format!("installing failed {INSTALL_ATTEMPTS_MAX} times: {e}");
                    self.record_failure(target, *version, &reason).await;
                    if let Some(t) = self.targets.get_mut(target) {
                        t.wanted = None;
                    }
                }
            }
            (Op::Install { version, patch }, Ok(())) => {
                tracing::info!(%target, version, patch, "firmware installed and verified, pending activation");
            }
            (Op::Activate, Ok(())) => {
                if let TargetKind::Agent { .. } = cfg.kind {
                    self.request_restart(target, "activating a new agent binary")
                        .await;
                }
            }
            (Op::Rollback, Ok(())) => {
                if let Some(t) = self.targets.get_mut(target) {
                    t.gate = None;
                }
                if let TargetKind::Agent { .. } = cfg.kind {
                    self.request_restart(target, "switching back to the confirmed agent binary")
                        .await;
                }
            }
            (Op::Confirm, Ok(())) => {
                if let Some(t) = self.targets.get_mut(target) {
                    t.gate = None;
                }
            }
            (_, Err(e)) => tracing::error!(%target, ?op, "firmware: {e}"),
            _ => {}
        }
    }

    async fn request_restart(&self, target: &str, why: &str) {
        match &self.args.restart {
            Some(tx) => {
                tracing::warn!(%target, "{why}: asking the launcher to restart the agent");
                let _ = tx.send(why.to_string()).await;
            }
            None => tracing::error!(%target, "{why}: no launcher to restart the agent"),
        }
    }

    async fn record_failure(&self, target: &str, version: u64, reason: &str) {
        let store = self.args.store.clone();
        let (t, r) = (target.to_string(), reason.to_string());
        let recorded = tokio::task::spawn_blocking(move || {
            store.record_failure(ReleaseKind::Firmware, &t, version, &r)
        })
        .await;
        if !matches!(recorded, Ok(Ok(()))) {
            tracing::error!(%target, version, "recording a failed firmware release: {recorded:?}");
        }
    }

    /// Whether `version` of `target` failed here before (recorded in the store or in the
    /// slot record), so it is not installed again.
    async fn failed_before(&self, target: &str, wanted: &Manifest, record: &SlotRecord) -> bool {
        if record
            .last_rollback
            .as_ref()
            .is_some_and(|rb| rb.from.content == wanted.content)
        {
            return true;
        }
        let store = self.args.store.clone();
        let t = target.to_string();
        let failed =
            tokio::task::spawn_blocking(move || store.failed_version(ReleaseKind::Firmware, &t))
                .await;
        matches!(failed, Ok(Ok(Some(v))) if v >= wanted.version)
    }

    /// Moves one target forward: a reopen after a lost task, the health gate of a slot
    /// on trial, an unreported rollback, the activation of a pending image, or the fetch
    /// and install of a wanted release.
    async fn step(&mut self, target: &str) {
        let Some(cfg) = self.config(target).cloned() else {
            return;
        };
        let Some(Snapshot {
            record,
            busy,
            booted_at,
        }) = self.args.shared.snapshot(target)
        else {
            return;
        };
        if busy {
            return;
        }
        let Some(record) = record else {
            return;
        };
        if self
            .args
            .shared
            .lock()
            .get(target)
            .is_some_and(|s| s.store.is_none())
        {
            // A task lost the store (it panicked): open it again from disk.
            self.args.shared.set_busy(target, "opening");
            tokio::spawn(open_target(self.args.clone(), cfg));
            return;
        }
        if let Some(rb) = record.last_rollback.as_ref().filter(|rb| !rb.reported) {
            self.report(target, rb.clone()).await;
        }
        match &record.phase {
            Phase::Trial { slot, .. } => {
                let Some((_, booted_at)) = booted_at.filter(|(booted, _)| booted == slot) else {
                    return;
                };
                let t = self.targets.entry(target.to_string()).or_default();
                if t.gate.as_ref().is_none_or(|(at, _)| *at != booted_at) {
                    let gate = HealthGate::new(
                        booted_at,
                        cfg.grace,
                        cfg.deadline,
                        cfg.health.is_some(),
                        HEALTH_RETRY,
                    );
                    t.gate = Some((booted_at, gate));
                }
                let Some((_, gate)) = t.gate.as_mut() else {
                    return;
                };
                match gate.poll(Instant::now()) {
                    GateDecision::Wait => {}
                    GateDecision::Check => {
                        if let Some(cmd) = cfg.health.clone() {
                            let myself = self.args.myself.clone();
                            let name = target.to_string();
                            tokio::spawn(async move {
                                let result = run_command(&cmd, &[], HEALTH_COMMAND_TIMEOUT).await;
                                let _ = myself.try_send(FirmwareMsg::HealthChecked {
                                    target: name,
                                    result,
                                });
                            });
                        }
                    }
                    GateDecision::Confirm => self.spawn_op(&cfg, Op::Confirm, None),
                    GateDecision::Fail(reason) => self.spawn_op(&cfg, Op::Rollback, Some(reason)),
                }
            }
            Phase::Pending { slot } => {
                let pending = record.image(*slot).map(|i| i.version).unwrap_or(0);
                let newer = self
                    .targets
                    .get(target)
                    .and_then(|t| t.wanted.as_ref())
                    .is_some_and(|w| w.signed.manifest.version > pending);
                if newer {
                    self.install_step(&cfg, &record).await;
                } else {
                    self.spawn_op(&cfg, Op::Activate, None);
                }
            }
            Phase::Idle => self.install_step(&cfg, &record).await,
            // Opening a store finishes or abandons an interrupted write.
            Phase::Writing { .. } => {}
        }
    }

    async fn install_step(&mut self, cfg: &TargetConfig, record: &SlotRecord) {
        let target = cfg.name.as_str();
        let Some(base) = record.confirmed_image().cloned() else {
            return;
        };
        let Some(w) = self.targets.get(target).and_then(|t| t.wanted.as_ref()) else {
            return;
        };
        let m = w.signed.manifest.clone();
        if m.version <= base.version {
            self.targets.entry(target.to_string()).or_default().wanted = None;
            return;
        }
        if w.fetching || Instant::now() < w.next_at {
            return;
        }
        let (hint, patch_failures) = (w.hint, w.patch_failures);
        if self.failed_before(target, &m, record).await {
            let t = self.targets.entry(target.to_string()).or_default();
            if t.refused_logged != Some(m.version) {
                tracing::warn!(%target, version = m.version, "not installing firmware that failed here before");
                t.refused_logged = Some(m.version);
            }
            t.wanted = None;
            return;
        }
        let image = SlotImage {
            content: m.content,
            size: m.size,
            version: m.version,
        };
        let store = &self.args.store;
        let chosen = plan(
            &m,
            &base,
            patch_failures >= PATCH_ATTEMPTS_MAX,
            self.args.bytes_max,
        );
        let (fetch_id, fetch_size) = if store.has(&m.content) {
            self.spawn_install(cfg, image, None);
            return;
        } else {
            match &chosen {
                FetchPlan::Patch(d) if store.has(&d.patch) => {
                    self.spawn_install(cfg, image, Some(d.clone()));
                    return;
                }
                FetchPlan::Patch(d) => (d.patch, d.patch_size),
                FetchPlan::Full { id, size } => (*id, *size),
            }
        };
        let what = match &chosen {
            FetchPlan::Patch(d) => format!("{} patch", d.codec),
            FetchPlan::Full { .. } => "full image".to_string(),
        };
        tracing::info!(%target, version = m.version, bytes = fetch_size, "fetching firmware: {what}");
        if let Some(w) = self.targets.get_mut(target).and_then(|t| t.wanted.as_mut()) {
            w.fetching = true;
            w.fetching_patch = matches!(chosen, FetchPlan::Patch(_));
        }
        let args = self.args.clone();
        let name = target.to_string();
        tokio::spawn(async move {
            let label = format!("firmware {name} v{} ({what})", m.version);
            let hint: Vec<PeerId> = hint.into_iter().collect();
            let result = crate::fetch::download(&args.fetch, fetch_id, fetch_size, &label, &hint)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = args.myself.try_send(FirmwareMsg::Fetched {
                target: name,
                version: m.version,
                result,
            });
        });
    }

    fn spawn_install(&mut self, cfg: &TargetConfig, image: SlotImage, patch: Option<DeltaRef>) {
        let op = Op::Install {
            version: image.version,
            patch: patch.is_some(),
        };
        let Some(mut slots) = self.args.shared.take(&cfg.name, "installing") else {
            return;
        };
        let args = self.args.clone();
        let target = cfg.name.clone();
        tokio::spawn(async move {
            let store = args.store.clone();
            let ran = tokio::task::spawn_blocking(move || {
                let blob = patch.as_ref().map(|d| d.patch).unwrap_or(image.content);
                let result = match &patch {
                    Some(d) => slots.install(
                        image,
                        Source::Patch {
                            patch: &store.blob_path(&d.patch),
                            codec: &d.codec,
                        },
                    ),
                    None => {
                        let path = store.blob_path(&image.content);
                        slots.install(image, Source::Full(&path))
                    }
                };
                let result = result.map(|_| ()).map_err(|e| {
                    // A blob damaged on disk since it was fetched fails the install; the
                    // store quarantines it when it re-hashes it, so the next attempt
                    // fetches it again instead of installing the same bad bytes.
                    match store.verify(&blob) {
                        Err(crate::store::ReadError::Corrupt { .. }) => format!(
                            "{e} (the stored {} was damaged on disk: quarantined, to be fetched again)",
                            blob.short()
                        ),
                        _ => e.to_string(),
                    }
                });
                (slots, result)
            })
            .await;
            finish_task(&args, &target, op, ran);
        });
    }

    /// Runs activation, confirmation or a rollback on a target's slots, with the
    /// device's hook where there is one.
    fn spawn_op(&mut self, cfg: &TargetConfig, op: Op, reason: Option<String>) {
        let what = match op {
            Op::Activate => "activating",
            Op::Confirm => "confirming",
            Op::Rollback => "rolling back",
            _ => "working",
        };
        let Some(slots) = self.args.shared.take(&cfg.name, what) else {
            return;
        };
        let args = self.args.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let ran = run_op(&args, &cfg, slots, op.clone(), reason).await;
            finish_task(&args, &cfg.name, op, ran);
        });
    }

    /// Records a rollback as a failed release, gossips it, and marks it reported once
    /// the gossip went out (a node with no peer yet tries again on the next tick).
    async fn report(&mut self, target: &str, rollback: Rollback) {
        let failure = FirmwareFailure::of(target, &rollback);
        let t = self.targets.entry(target.to_string()).or_default();
        if t.refused_logged != Some(rollback.from.version) {
            tracing::error!(%target, from = rollback.from.version, to = rollback.to.version, "firmware rolled back: {}", rollback.reason);
            t.refused_logged = Some(rollback.from.version);
            self.record_failure(target, rollback.from.version, &rollback.reason)
                .await;
        }
        if let Err(e) = self
            .args
            .swarm
            .publish(FIRMWARE_FAILURES_TOPIC, failure.encode())
            .await
        {
            tracing::debug!(%target, "firmware failure report not sent yet: {e}");
            return;
        }
        let Some(mut slots) = self.args.shared.take(target, "recording the report") else {
            return;
        };
        let args = self.args.clone();
        let name = target.to_string();
        tokio::spawn(async move {
            let ran = tokio::task::spawn_blocking(move || {
                let r = slots.mark_reported().map_err(|e| e.to_string());
                (slots, r)
            })
            .await;
            finish_task(&args, &name, Op::Reported, ran);
        });
    }
}

/// Hands a store back after a task and tells the actor; a task that panicked lost the
/// store, and the next step opens it again from disk.
fn finish_task(
    args: &FirmwareArgs,
    target: &str,
    op: Op,
    ran: Result<(SlotStore, Result<(), String>), tokio::task::JoinError>,
) {
    let result = match ran {
        Ok((slots, result)) => {
            args.shared.put(slots);
            result
        }
        Err(e) => {
            if let Some(s) = args.shared.lock().get_mut(target) {
                s.busy = None;
            }
            Err(format!("the task stopped: {e}"))
        }
    };
    if let Err(e) = args.myself.try_send(FirmwareMsg::Done {
        target: target.to_string(),
        op,
        result,
    }) {
        tracing::warn!(%target, "reporting a finished firmware task: {e}");
    }
}

/// Runs `f` on a blocking thread with the store, and gives both back.
async fn blocking<T: Send + 'static>(
    mut slots: SlotStore,
    f: impl FnOnce(&mut SlotStore) -> T + Send + 'static,
) -> Result<(SlotStore, T), tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        let t = f(&mut slots);
        (slots, t)
    })
    .await
}

async fn run_op(
    args: &FirmwareArgs,
    cfg: &TargetConfig,
    slots: SlotStore,
    op: Op,
    reason: Option<String>,
) -> Result<(SlotStore, Result<(), String>), tokio::task::JoinError> {
    match op {
        Op::Activate => {
            let (slots, activated) = blocking(slots, |s| s.activate()).await?;
            let slot = match activated {
                Ok(slot) => slot,
                Err(e) => return Ok((slots, Err(e.to_string()))),
            };
            tracing::warn!(target = %cfg.name, %slot, version = slots.record().active_image().map(|i| i.version), "firmware activated, on trial");
            let TargetKind::Device { activate } = &cfg.kind else {
                // The agent's boot is the launcher's: the actor asks for the restart.
                return Ok((slots, Ok(())));
            };
            if let Some(hook) = activate {
                let env = hook_env(&slots, slot, "activate");
                if let Err(e) = run_command(hook, &env, HOOK_TIMEOUT).await {
                    // The device did not switch: back to the confirmed slot, which it
                    // still runs, with no second hook.
                    let reason = format!("the activation hook failed: {e}");
                    let (slots, r) =
                        blocking(slots, move |s| s.rollback(reason, crate::unix_ms())).await?;
                    return Ok((slots, r.map(|_| ()).map_err(|e| e.to_string())));
                }
            }
            // The hook returned, so the device runs the new slot without a reboot (a
            // hook that reboots never gets here; the agent's next start is the boot).
            let (slots, booted) = blocking(slots, |s| s.boot(crate::unix_ms())).await?;
            match booted {
                Ok(b) if b.trial => {
                    if let Some(s) = args.shared.lock().get_mut(&cfg.name) {
                        s.booted_at = Some((b.slot, Instant::now()));
                    }
                    Ok((slots, Ok(())))
                }
                Ok(_) => Ok((
                    slots,
                    Err("the new slot was switched away from at its first boot".into()),
                )),
                Err(e) => Ok((slots, Err(e.to_string()))),
            }
        }
        Op::Confirm => {
            let (slots, r) = blocking(slots, |s| s.confirm()).await?;
            if r.is_ok() {
                tracing::info!(target = %cfg.name, version = slots.record().confirmed_image().map(|i| i.version), "firmware confirmed healthy: the new base");
            }
            Ok((slots, r.map(|_| ()).map_err(|e| e.to_string())))
        }
        Op::Rollback => {
            let reason = reason.unwrap_or_else(|| "rolled back".into());
            let (slots, r) = blocking(slots, move |s| s.rollback(reason, crate::unix_ms())).await?;
            if let Err(e) = r {
                return Ok((slots, Err(e.to_string())));
            }
            if let TargetKind::Device {
                activate: Some(hook),
            } = &cfg.kind
            {
                let slot = slots.record().active;
                let env = hook_env(&slots, slot, "rollback");
                if let Err(e) = run_command(hook, &env, HOOK_TIMEOUT).await {
                    tracing::error!(target = %cfg.name, "the hook switching back failed: {e}");
                }
            }
            Ok((slots, Ok(())))
        }
        Op::Open | Op::Install { .. } | Op::Reported => Ok((slots, Ok(()))),
    }
}

/// The environment a device's hook runs with.
fn hook_env(slots: &SlotStore, slot: Slot, action: &str) -> Vec<(String, String)> {
    let r = slots.record();
    vec![
        ("MESH_FIRMWARE_TARGET".into(), r.target.clone()),
        ("MESH_FIRMWARE_ACTION".into(), action.into()),
        ("MESH_FIRMWARE_SLOT".into(), slot.name().into()),
        (
            "MESH_FIRMWARE_IMAGE".into(),
            slots.slot_path(slot).display().to_string(),
        ),
        (
            "MESH_FIRMWARE_VERSION".into(),
            r.image(slot).map(|i| i.version).unwrap_or(0).to_string(),
        ),
    ]
}

/// Runs `command` with `sh -c`, killed after `timeout`; fails with its status and the
/// end of its output.
pub async fn run_command(
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => Err(format!(
            "{command:?} ran longer than {} s",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("starting {command:?}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let text = if text.trim().is_empty() {
                String::from_utf8_lossy(&out.stdout)
            } else {
                text
            };
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(200)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(format!("{command:?} exited with {}: {tail}", out.status))
        }
    }
}

fn retry_delay(attempts: u32) -> Duration {
    RETRY_INITIAL
        .saturating_mul(1u32 << attempts.min(16))
        .min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(deltas: Vec<DeltaRef>) -> Manifest {
        Manifest {
            kind: ReleaseKind::Firmware,
            name: "gw".into(),
            version: 2,
            content: ContentId::of(b"v2"),
            size: 1000,
            created_unix: 0,
            expires_unix: None,
            quotas: Default::default(),
            deltas,
        }
    }

    fn base(bytes: &[u8]) -> SlotImage {
        SlotImage {
            content: ContentId::of(bytes),
            size: bytes.len() as u64,
            version: 1,
        }
    }

    fn delta(from: &[u8], codec: &str, size: u64) -> DeltaRef {
        DeltaRef {
            base: ContentId::of(from),
            patch: ContentId::of(&[from, b"patch"].concat()),
            patch_size: size,
            codec: codec.into(),
        }
    }

    #[test]
    fn plan_takes_the_patch_from_the_confirmed_image_only() {
        let full = FetchPlan::Full {
            id: ContentId::of(b"v2"),
            size: 1000,
        };
        let m = manifest(vec![delta(b"v0", "zstd", 10), delta(b"v1", "bsdiff", 20)]);
        assert_eq!(
            plan(&m, &base(b"v1"), false, 1 << 20),
            FetchPlan::Patch(delta(b"v1", "bsdiff", 20))
        );
        assert_eq!(
            plan(&m, &base(b"other"), false, 1 << 20),
            full,
            "unlisted base"
        );
        assert_eq!(
            plan(&m, &base(b"v1"), true, 1 << 20),
            full,
            "patch path failed"
        );
        assert_eq!(
            plan(&m, &base(b"v1"), false, 19),
            full,
            "patch over the limit"
        );
        let unknown = manifest(vec![delta(b"v1", "xdelta", 20)]);
        assert_eq!(
            plan(&unknown, &base(b"v1"), false, 1 << 20),
            full,
            "unknown codec"
        );
    }

    #[test]
    fn failure_reports_decode_within_limits() {
        let r = FirmwareFailure {
            target: "gw".into(),
            version: 2,
            content: ContentId::of(b"v2"),
            reason: "not healthy".into(),
            rolled_back_to: 1,
            unix_ms: 5,
        };
        assert_eq!(FirmwareFailure::decode(&r.encode()).unwrap(), r);
        let long = FirmwareFailure {
            reason: "x".repeat(REASON_BYTES_MAX + 1),
            ..r.clone()
        };
        assert!(FirmwareFailure::decode(&long.encode()).is_err());
        let bad_name = FirmwareFailure {
            target: "Bad Name".into(),
            ..r
        };
        assert!(FirmwareFailure::decode(&bad_name.encode()).is_err());
        assert!(FirmwareFailure::decode(&[0xff; 64]).is_err());
    }
}
