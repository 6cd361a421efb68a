//! Firmware slots: each firmware target (a device image, or the agent's own binary) has
//! two slots, A and B, and a small state record that says which slot is confirmed,
//! which one boots next, and how far an update has got.
//!
//! [`SlotRecord`] is the state machine, pure: transitions take `now` as an argument and
//! return what happened, so every step is tested without IO. [`SlotStore`] carries it
//! out on disk: the record in `DIR/state`, the images in `DIR/slot-a` and `DIR/slot-b`.
//! Every transition is written with [`write_atomic`] (temp file, fsync, rename, fsync of
//! the directory) before the step it allows is taken, so after a power cut the record
//! on disk is either the one before the step or the one after it.
//!
//! The two rules that make repeated power cuts harmless:
//!
//! - The confirmed slot is never written. An install always goes into the other slot,
//!   and the record says "writing" (the slot's content unknown) before the first byte is
//!   written, so a cut mid-write can never leave a half-written image marked good.
//! - The confirmed slot has no boot counter to use up. Only a slot on trial counts its
//!   boots; when they are used up the record switches back to the confirmed slot, which
//!   always boots. So no sequence of cuts exhausts both slots (the rauc#683 failure).
//!
//! See `docs/runtime-semantics.md` ("Firmware") for every transition and what a crash at
//! each step leaves.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use mesh_transport::fsutil::write_atomic;
use mesh_transport::{wire, ContentId};
use serde::{Deserialize, Serialize};

use crate::delta;

/// A state record is a few hundred bytes; anything larger on disk is not ours.
pub const STATE_BYTES_MAX: usize = 64 * 1024;
/// Boots a new image gets before the record switches back to the confirmed slot: enough
/// that one power cut during the first boot does not roll back a good image (the
/// meta-balena#2301 failure), few enough that a broken image is given up quickly.
pub const BOOT_ATTEMPTS_DEFAULT: u32 = 3;
/// More boot attempts than this only delays the rollback of a broken image.
pub const BOOT_ATTEMPTS_MAX: u32 = 32;
/// Reasons (rollbacks, install failures) are kept short: they travel in status replies
/// and gossip.
pub const REASON_BYTES_MAX: usize = 1024;
/// Bytes copied or hashed at a time when writing or verifying a slot.
const COPY_BUFFER_BYTES: usize = 256 * 1024;
/// The first bytes of a state file: what it is and its format version.
const STATE_MAGIC: &[u8; 8] = b"meshslt1";
/// The permission bits of the state record.
const STATE_FILE_MODE: u32 = 0o644;

/// The environment variable naming the fault points that abort the process (test only;
/// see [`fault_point`]).
pub const FAULT_POINT_ENV: &str = "MESH_FAULT_POINT";
/// The environment variable naming a directory that makes each fault point fire once.
pub const FAULT_ONCE_ENV: &str = "MESH_FAULT_ONCE";

/// One of the two slots of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    /// "a" or "b", as in the slot's file name and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Slot, String> {
        match s {
            "a" | "A" => Ok(Slot::A),
            "b" | "B" => Ok(Slot::B),
            other => Err(format!("parsing a slot: expected a or b, got {other:?}")),
        }
    }
}

/// What a slot holds: an image named by its BLAKE3 hash, and the release version it
/// came from (0 for the image a target started with).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImage {
    pub content: ContentId,
    pub size: u64,
    pub version: u64,
}

/// How far an update has got. Only one update runs per target at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Nothing in progress: the active slot is the confirmed one.
    Idle,
    /// `slot` (never the confirmed one) is being written with `image`; its content is
    /// unknown until it is verified.
    Writing { slot: Slot, image: SlotImage },
    /// `slot` holds a verified image, waiting to be activated.
    Pending { slot: Slot },
    /// `slot` is active and on trial: it boots at most `attempts_left` more times before
    /// the record switches back, unless it is confirmed healthy first.
    Trial {
        slot: Slot,
        attempts_left: u32,
        /// Why the last boot of the trial failed, for the rollback's reason.
        last_failure: Option<String>,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Writing { .. } => "writing",
            Phase::Pending { .. } => "pending",
            Phase::Trial { .. } => "trial",
        }
    }
}

/// A switch back to the confirmed slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The image that failed.
    pub from: SlotImage,
    /// The confirmed image the target went back to.
    pub to: SlotImage,
    pub reason: String,
    pub unix_ms: u64,
    /// Whether the failure was recorded in the store and reported to the mesh (done by
    /// the agent, which may not be the process that rolled back: the launcher cannot).
    pub reported: bool,
}

/// How the last successful install got its image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstallSource {
    /// The whole image.
    Full,
    /// A patch against the confirmed image.
    Patch { codec: String, patch_bytes: u64 },
}

impl fmt::Display for InstallSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallSource::Full => f.write_str("full image"),
            InstallSource::Patch { codec, patch_bytes } => {
                write!(f, "{codec} patch of {patch_bytes} bytes")
            }
        }
    }
}

/// The last install that verified: which version, from what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallNote {
    pub version: u64,
    pub slot: Slot,
    pub source: InstallSource,
    pub unix_ms: u64,
}

/// The state record of one firmware target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub target: String,
    /// What each slot holds, when known and verified at install; `None` while a slot is
    /// being written or after a failed write.
    pub slots: [Option<SlotImage>; 2],
    /// The base: the last slot confirmed healthy. Never written while it is the base.
    pub confirmed: Slot,
    /// The slot that boots: the confirmed one, or the one on trial.
    pub active: Slot,
    pub phase: Phase,
    /// Boots a new image gets on trial.
    pub boot_attempts: u32,
    pub last_install: Option<InstallNote>,
    pub last_rollback: Option<Rollback>,
    /// Why the last install or activation failed, if it did.
    pub last_error: Option<String>,
}

/// A transition that the record's phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("{action} firmware target {target}: not possible while it is {phase}")]
    Phase {
        action: &'static str,
        target: String,
        phase: &'static str,
    },
    #[error("installing v{version} on firmware target {target}: not newer than the confirmed v{confirmed}")]
    NotNewer {
        target: String,
        version: u64,
        confirmed: u64,
    },
}

/// What a boot does: which slot runs, whether it is on trial, and whether this boot
/// switched back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    pub slot: Slot,
    pub trial: bool,
    pub rolled_back: Option<Rollback>,
}

fn truncate_reason(mut s: String) -> String {
    if s.len() > REASON_BYTES_MAX {
        let mut cut = REASON_BYTES_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl SlotRecord {
    /// A new target whose slot A holds `initial` (the image it already runs), confirmed.
    pub fn new(target: &str, initial: SlotImage, boot_attempts: u32) -> SlotRecord {
        SlotRecord {
            target: target.to_string(),
            slots: [Some(initial), None],
            confirmed: Slot::A,
            active: Slot::A,
            phase: Phase::Idle,
            boot_attempts: boot_attempts.clamp(1, BOOT_ATTEMPTS_MAX),
            last_install: None,
            last_rollback: None,
            last_error: None,
        }
    }

    pub fn image(&self, slot: Slot) -> Option<&SlotImage> {
        self.slots[slot.index()].as_ref()
    }

    /// The confirmed image (always present in a consistent record).
    pub fn confirmed_image(&self) -> Option<&SlotImage> {
        self.image(self.confirmed)
    }

    pub fn active_image(&self) -> Option<&SlotImage> {
        self.image(self.active)
    }

    /// Whether the active slot is the confirmed one.
    pub fn is_confirmed(&self) -> bool {
        self.active == self.confirmed
    }

    /// The slot being written, waiting or on trial, if an update is under way.
    pub fn pending_slot(&self) -> Option<Slot> {
        match &self.phase {
            Phase::Idle => None,
            Phase::Writing { slot, .. } | Phase::Pending { slot } | Phase::Trial { slot, .. } => {
                Some(*slot)
            }
        }
    }

    /// Boots left to the slot on trial.
    pub fn attempts_left(&self) -> Option<u32> {
        match &self.phase {
            Phase::Trial { attempts_left, .. } => Some(*attempts_left),
            _ => None,
        }
    }

    fn refuse(&self, action: &'static str) -> TransitionError {
        TransitionError::Phase {
            action,
            target: self.target.clone(),
            phase: self.phase.name(),
        }
    }

    /// Starts writing `image` into the slot that is not confirmed, and returns it. A
    /// pending (not yet activated) image may be replaced by a newer one; an install in
    /// progress or a trial must finish first.
    pub fn begin_install(&mut self, image: SlotImage) -> Result<Slot, TransitionError> {
        if matches!(self.phase, Phase::Writing { .. } | Phase::Trial { .. }) {
            return Err(self.refuse("installing on"));
        }
        let confirmed = self.confirmed_image().map(|i| i.version).unwrap_or(0);
        if image.version <= confirmed {
            return Err(TransitionError::NotNewer {
                target: self.target.clone(),
                version: image.version,
                confirmed,
            });
        }
        let slot = self.confirmed.other();
        self.slots[slot.index()] = None;
        self.phase = Phase::Writing { slot, image };
        self.last_error = None;
        Ok(slot)
    }

    /// Ends the write started by [`SlotRecord::begin_install`]: a verified image becomes
    /// pending; a failed one leaves the slot empty and the target idle on its confirmed
    /// slot.
    pub fn finish_install(
        &mut self,
        verified: Result<InstallSource, String>,
        now_unix_ms: u64,
    ) -> Result<Slot, TransitionError> {
        let Phase::Writing { slot, image } = self.phase.clone() else {
            return Err(self.refuse("finishing an install on"));
        };
        match verified {
            Ok(source) => {
                self.last_install = Some(InstallNote {
                    version: image.version,
                    slot,
                    source,
                    unix_ms: now_unix_ms,
                });
                self.slots[slot.index()] = Some(image);
                self.phase = Phase::Pending { slot };
            }
            Err(reason) => {
                self.slots[slot.index()] = None;
                self.phase = Phase::Idle;
                self.last_error = Some(truncate_reason(format!(
                    "installing v{}: {reason}",
                    image.version
                )));
            }
        }
        Ok(slot)
    }

    /// Makes the pending slot active, on trial with a full set of boot attempts.
    pub fn activate(&mut self) -> Result<Slot, TransitionError> {
        let Phase::Pending { slot } = self.phase else {
            return Err(self.refuse("activating"));
        };
        self.active = slot;
        self.phase = Phase::Trial {
            slot,
            attempts_left: self.boot_attempts,
            last_failure: None,
        };
        Ok(slot)
    }

    /// Gives up a pending image before it was activated (it failed its check again).
    pub fn drop_pending(&mut self, reason: String) -> Result<(), TransitionError> {
        let Phase::Pending { slot } = self.phase else {
            return Err(self.refuse("dropping the pending image of"));
        };
        self.slots[slot.index()] = None;
        self.phase = Phase::Idle;
        self.last_error = Some(truncate_reason(reason));
        Ok(())
    }

    /// A boot: the slot on trial uses one attempt, or, when it has none left, the record
    /// switches back to the confirmed slot. Any other phase boots the confirmed slot.
    pub fn boot(&mut self, now_unix_ms: u64) -> Boot {
        match &mut self.phase {
            Phase::Trial {
                slot,
                attempts_left,
                last_failure,
            } => {
                if *attempts_left == 0 {
                    let last = last_failure
                        .as_ref()
                        .map(|f| format!("; the last one: {f}"))
                        .unwrap_or_default();
                    let reason = format!(
                        "it booted {} time(s) without being confirmed healthy{last}",
                        self.boot_attempts
                    );
                    let rolled_back = self.switch_back(reason, now_unix_ms);
                    return Boot {
                        slot: self.active,
                        trial: false,
                        rolled_back,
                    };
                }
                *attempts_left -= 1;
                Boot {
                    slot: *slot,
                    trial: true,
                    rolled_back: None,
                }
            }
            _ => Boot {
                slot: self.active,
                trial: false,
                rolled_back: None,
            },
        }
    }

    /// Notes why a boot of the slot on trial failed (it crashed or exited before it was
    /// confirmed), for the reason of a later rollback.
    pub fn note_trial_failure(&mut self, failure: String) -> Result<(), TransitionError> {
        let Phase::Trial { last_failure, .. } = &mut self.phase else {
            return Err(self.refuse("noting a failed boot of"));
        };
        *last_failure = Some(truncate_reason(failure));
        Ok(())
    }

    /// The slot on trial is healthy: it becomes the confirmed slot, the new base.
    pub fn confirm(&mut self) -> Result<Slot, TransitionError> {
        let Phase::Trial { slot, .. } = self.phase else {
            return Err(self.refuse("confirming"));
        };
        self.confirmed = slot;
        self.active = slot;
        self.phase = Phase::Idle;
        Ok(slot)
    }

    /// The slot on trial failed its health check (or its deadline passed): switch back.
    pub fn rollback(
        &mut self,
        reason: String,
        now_unix_ms: u64,
    ) -> Result<Rollback, TransitionError> {
        if !matches!(self.phase, Phase::Trial { .. }) {
            return Err(self.refuse("rolling back"));
        }
        self.switch_back(reason, now_unix_ms)
            .ok_or_else(|| self.refuse("rolling back"))
    }

    fn switch_back(&mut self, reason: String, now_unix_ms: u64) -> Option<Rollback> {
        let Phase::Trial { slot, .. } = self.phase else {
            return None;
        };
        let rollback = match (self.image(slot), self.confirmed_image()) {
            (Some(from), Some(to)) => Some(Rollback {
                from: from.clone(),
                to: to.clone(),
                reason: truncate_reason(reason),
                unix_ms: now_unix_ms,
                reported: false,
            }),
            _ => None,
        };
        self.active = self.confirmed;
        self.phase = Phase::Idle;
        if rollback.is_some() {
            self.last_rollback = rollback.clone();
        }
        rollback
    }

    /// Records that the last rollback was reported to the store and the mesh.
    pub fn mark_reported(&mut self) {
        if let Some(r) = &mut self.last_rollback {
            r.reported = true;
        }
    }

    /// The rules every record on disk satisfies, whatever step a crash interrupted.
    pub fn check(&self) -> Result<(), String> {
        let target = &self.target;
        if self.confirmed_image().is_none() {
            return Err(format!(
                "{target}: the confirmed slot {} names no image",
                self.confirmed
            ));
        }
        if !(1..=BOOT_ATTEMPTS_MAX).contains(&self.boot_attempts) {
            return Err(format!(
                "{target}: {} boot attempts is out of range",
                self.boot_attempts
            ));
        }
        match &self.phase {
            Phase::Idle => {
                if self.active != self.confirmed {
                    return Err(format!(
                        "{target}: idle, yet slot {} is active and {} confirmed",
                        self.active, self.confirmed
                    ));
                }
            }
            Phase::Writing { slot, .. } | Phase::Pending { slot } => {
                if *slot == self.confirmed {
                    return Err(format!(
                        "{target}: {} the confirmed slot {slot}",
                        self.phase.name()
                    ));
                }
                if self.active != self.confirmed {
                    return Err(format!(
                        "{target}: {}, yet slot {} is active instead of the confirmed {}",
                        self.phase.name(),
                        self.active,
                        self.confirmed
                    ));
                }
                if matches!(self.phase, Phase::Writing { .. }) && self.image(*slot).is_some() {
                    return Err(format!(
                        "{target}: slot {slot} is being written yet names an image"
                    ));
                }
                if matches!(self.phase, Phase::Pending { .. }) && self.image(*slot).is_none() {
                    return Err(format!("{target}: pending slot {slot} names no image"));
                }
            }
            Phase::Trial {
                slot,
                attempts_left,
                ..
            } => {
                if *slot == self.confirmed || self.active != *slot {
                    return Err(format!(
                        "{target}: slot {slot} on trial, active {}, confirmed {}",
                        self.active, self.confirmed
                    ));
                }
                if *attempts_left > self.boot_attempts {
                    return Err(format!(
                        "{target}: {attempts_left} boot attempts left of {}",
                        self.boot_attempts
                    ));
                }
                if self.image(*slot).is_none() {
                    return Err(format!("{target}: slot {slot} on trial names no image"));
                }
            }
        }
        Ok(())
    }
}

/// The health gate of a slot on trial, pure: the image must stay up for `grace` and,
/// when there is a health command, pass it, all before `deadline` (both counted from
/// the boot).
#[derive(Clone, Debug)]
pub struct HealthGate {
    booted: Instant,
    grace: Duration,
    deadline: Duration,
    has_command: bool,
    /// Wait between two runs of the health command.
    retry: Duration,
    checking: bool,
    passed: bool,
    next_check: Instant,
    last_failure: Option<String>,
}

/// What to do about a slot on trial now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateDecision {
    /// Not yet: the grace period runs, or a check is running or due later.
    Wait,
    /// Run the health command and report with [`HealthGate::on_check`].
    Check,
    /// Healthy: confirm the slot.
    Confirm,
    /// The deadline passed: switch back, for this reason.
    Fail(String),
}

impl HealthGate {
    pub fn new(
        booted: Instant,
        grace: Duration,
        deadline: Duration,
        has_command: bool,
        retry: Duration,
    ) -> HealthGate {
        HealthGate {
            booted,
            grace,
            deadline: deadline.max(grace),
            has_command,
            retry,
            checking: false,
            passed: false,
            next_check: booted + grace,
            last_failure: None,
        }
    }

    pub fn poll(&mut self, now: Instant) -> GateDecision {
        let up = now.saturating_duration_since(self.booted);
        if up >= self.grace && (self.passed || !self.has_command) {
            return GateDecision::Confirm;
        }
        if up >= self.deadline {
            let why = match &self.last_failure {
                Some(f) => format!("the health check failed: {f}"),
                None if self.has_command => "the health check did not pass in time".to_string(),
                None => "it did not stay up for the grace period".to_string(),
            };
            return GateDecision::Fail(format!(
                "not healthy within {} s of booting: {why}",
                self.deadline.as_secs()
            ));
        }
        if up < self.grace || self.checking || now < self.next_check {
            return GateDecision::Wait;
        }
        self.checking = true;
        GateDecision::Check
    }

    /// The result of the health command started after [`GateDecision::Check`].
    pub fn on_check(&mut self, now: Instant, result: Result<(), String>) {
        self.checking = false;
        match result {
            Ok(()) => self.passed = true,
            Err(e) => {
                self.last_failure = Some(truncate_reason(e));
                self.next_check = now + self.retry;
            }
        }
    }
}

/// The steps at which a test can make the process abort, as a power cut would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Mid-write: the first piece of the new image is in the inactive slot.
    InstallWriting,
    /// The written slot verified, its record not yet updated.
    InstallVerified,
    /// The record marks the slot pending.
    PendingMarked,
    /// The record marks the slot active (on trial), its hook not yet run.
    Activate,
    /// A boot wrote the record (a boot on trial used an attempt, or the record switched
    /// back), the image not yet started. A boot of the confirmed slot writes nothing.
    Boot,
    /// The slot passed its health gate, the record not yet updated.
    Confirm,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::InstallWriting,
        Step::InstallVerified,
        Step::PendingMarked,
        Step::Activate,
        Step::Boot,
        Step::Confirm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::InstallWriting => "install-writing",
            Step::InstallVerified => "install-verified",
            Step::PendingMarked => "pending-marked",
            Step::Activate => "activate",
            Step::Boot => "boot",
            Step::Confirm => "confirm",
        }
    }
}

/// A test-only power cut: when `MESH_FAULT_POINT` (a comma-separated list of step names)
/// names `step`, the process aborts here. When `MESH_FAULT_ONCE` names a directory, each
/// step aborts only the first time: its marker file there is created before the abort,
/// and a later pass finds it and goes on. Nothing else reads these variables, and only
/// the slot code path calls this.
pub fn fault_point(step: Step) {
    let Ok(points) = std::env::var(FAULT_POINT_ENV) else {
        return;
    };
    if !points.split(',').any(|p| p.trim() == step.name()) {
        return;
    }
    if let Some(dir) = std::env::var_os(FAULT_ONCE_ENV) {
        let marker = Path::new(&dir).join(step.name());
        let first = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .and_then(|f| f.sync_all());
        if first.is_err() {
            return;
        }
    }
    tracing::error!(step = step.name(), "fault point reached: aborting");
    eprintln!("fault point {}: aborting", step.name());
    std::process::abort();
}

/// Errors from opening, creating or reading a target's slot record.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening firmware slots in {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("opening firmware slots in {dir}: no state record")]
    Missing { dir: PathBuf },
    #[error("reading the slot record {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("creating firmware slots in {dir}: the initial image {path}: {source}")]
    Initial {
        dir: PathBuf,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Errors from a transition of a stored record (activate, boot, confirm, rollback).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{0}")]
    Transition(#[from] TransitionError),
    #[error("{action} firmware target {target}: {source}")]
    Io {
        action: &'static str,
        target: String,
        source: std::io::Error,
    },
    #[error("booting firmware target {target}: the confirmed slot {slot} does not hold {expected} any more ({actual}); refusing to boot it")]
    Damaged {
        target: String,
        slot: Slot,
        expected: ContentId,
        actual: String,
    },
}

/// Errors from installing an image into a slot.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Transition(#[from] TransitionError),
    #[error("installing v{version} on firmware target {target}: {detail}")]
    Failed {
        target: String,
        version: u64,
        detail: String,
    },
    #[error("installing on firmware target {target}: writing the state record: {source}")]
    Record {
        target: String,
        source: std::io::Error,
    },
}

/// Where an install's bytes come from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// The whole image, from a file.
    Full(&'a Path),
    /// A patch file against the confirmed slot's image.
    Patch { patch: &'a Path, codec: &'a str },
}

/// What opening a record found and repaired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The record was consistent as it was.
    Clean,
    /// A write was interrupted after the slot was complete: it verified and is now
    /// pending.
    InstallResumed { slot: Slot, version: u64 },
    /// A write was interrupted: the slot is marked empty and the update starts over.
    InstallAbandoned { slot: Slot, version: u64 },
    /// The record was created with the initial image.
    Created,
}

/// BLAKE3 and length of a file, read in pieces.
pub fn hash_file(path: &Path) -> std::io::Result<(ContentId, u64)> {
    crate::delta::hash_reader(File::open(path)?)
}

/// The directory of a target's slots under a node's state directory.
pub fn target_dir(state_dir: &Path, target: &str) -> PathBuf {
    state_dir.join("firmware").join(target)
}

/// A target's record and slot files on disk. One process at a time owns a target's
/// store (the launcher while the agent is down, the agent while it runs).
#[derive(Debug)]
pub struct SlotStore {
    dir: PathBuf,
    record: SlotRecord,
    /// Permission bits of slot files (0o755 for the agent's binary).
    mode: u32,
}

fn encode_record(record: &SlotRecord) -> Vec<u8> {
    // A record is plain data; bincode cannot fail on it.
    let body = wire::encode(record).expect("slot records always encode");
    let mut out = Vec::with_capacity(STATE_MAGIC.len() + 32 + body.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_record(bytes: &[u8]) -> Result<SlotRecord, String> {
    let header = STATE_MAGIC.len() + 32;
    if bytes.len() < header || &bytes[..STATE_MAGIC.len()] != STATE_MAGIC {
        return Err("not a slot record (bad magic or too short)".into());
    }
    let (sum, body) = bytes[STATE_MAGIC.len()..].split_at(32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("its checksum does not match: the file is damaged".into());
    }
    let record: SlotRecord = wire::decode(body, STATE_BYTES_MAX).map_err(|e| e.to_string())?;
    record.check()?;
    Ok(record)
}

/// A file that fires the install-writing fault point once its first bytes are written.
struct SlotFile {
    file: File,
    written: u64,
    max: u64,
}

impl Write for SlotFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.max {
            return Err(std::io::Error::other(format!(
                "the image grows past the {} bytes its release gives",
                self.max
            )));
        }
        let n = self.file.write(buf)?;
        if self.written == 0 && n > 0 {
            self.file.sync_data()?;
            fault_point(Step::InstallWriting);
        }
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl SlotStore {
    /// The record file of a target directory.
    pub fn state_path(dir: &Path) -> PathBuf {
        dir.join("state")
    }

    /// Reads a record without repairing anything (for a process that only watches).
    pub fn load(dir: &Path) -> Result<SlotRecord, OpenError> {
        let path = Self::state_path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(OpenError::Missing {
                    dir: dir.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(OpenError::Io {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        };
        if bytes.len() > STATE_BYTES_MAX {
            return Err(OpenError::Corrupt {
                path,
                detail: format!(
                    "{} bytes is over the limit of {STATE_BYTES_MAX}",
                    bytes.len()
                ),
            });
        }
        decode_record(&bytes).map_err(|detail| OpenError::Corrupt { path, detail })
    }

    /// Reads a record and checks it against the slot files, as [`SlotStore::check`]
    /// does, without repairing anything: for a process that only watches (the chaos
    /// harness checks every node's slots this way while the node runs).
    pub fn load_checked(dir: &Path) -> Result<SlotRecord, String> {
        let record = Self::load(dir).map_err(|e| e.to_string())?;
        let store = SlotStore {
            dir: dir.to_path_buf(),
            record,
            mode: STATE_FILE_MODE,
        };
        store.check()?;
        Ok(store.record)
    }

    /// Opens a target's record and finishes or abandons an install that a crash
    /// interrupted (see [`Recovery`]).
    pub fn open(dir: &Path, mode: u32) -> Result<(SlotStore, Recovery), OpenError> {
        let record = Self::load(dir)?;
        let mut store = SlotStore {
            dir: dir.to_path_buf(),
            record,
            mode,
        };
        let recovery = store.recover()?;
        Ok((store, recovery))
    }

    /// Opens a target, creating it when it has no record yet: slot A gets a copy of
    /// `initial` (or an empty image when there is none), confirmed, version 0.
    pub fn open_or_create(
        dir: &Path,
        target: &str,
        initial: Option<&Path>,
        boot_attempts: u32,
        mode: u32,
    ) -> Result<(SlotStore, Recovery), OpenError> {
        match Self::open(dir, mode) {
            Err(OpenError::Missing { .. }) => {}
            other => return other,
        }
        let io = |source| OpenError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let slot_a = dir.join("slot-a");
        let initial_err = |path: &Path, source| OpenError::Initial {
            dir: dir.to_path_buf(),
            path: path.to_path_buf(),
            source,
        };
        match initial {
            Some(path) => {
                // Copy to a temp file and rename, so that a crash here leaves no
                // half-copied slot A behind a record that does not exist yet.
                let tmp = mesh_transport::fsutil::temp_path(&slot_a);
                std::fs::copy(path, &tmp).map_err(|e| initial_err(path, e))?;
                File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                    .map_err(io)?;
                std::fs::rename(&tmp, &slot_a).map_err(io)?;
            }
            None => write_atomic(&slot_a, &[], mode).map_err(io)?,
        }
        mesh_transport::fsutil::sync_dir(dir).map_err(io)?;
        let (content, size) = hash_file(&slot_a).map_err(io)?;
        let record = SlotRecord::new(
            target,
            SlotImage {
                content,
                size,
                version: 0,
            },
            boot_attempts,
        );
        write_atomic(
            &Self::state_path(dir),
            &encode_record(&record),
            STATE_FILE_MODE,
        )
        .map_err(io)?;
        tracing::info!(target, content = %content.short(), size, "created firmware slots");
        Ok((
            SlotStore {
                dir: dir.to_path_buf(),
                record,
                mode,
            },
            Recovery::Created,
        ))
    }

    fn recover(&mut self) -> Result<Recovery, OpenError> {
        let Phase::Writing { slot, image } = self.record.phase.clone() else {
            return Ok(Recovery::Clean);
        };
        let complete = match hash_file(&self.slot_path(slot)) {
            Ok((content, size)) => content == image.content && size == image.size,
            Err(_) => false,
        };
        let mut next = self.record.clone();
        let now = crate::unix_ms();
        let recovery = if complete {
            // How the bytes got there is not known any more; the hash is what counts.
            let source = InstallSource::Full;
            next.finish_install(Ok(source), now)
                .map_err(|e| self.corrupt(e.to_string()))?;
            Recovery::InstallResumed {
                slot,
                version: image.version,
            }
        } else {
            next.finish_install(
                Err("interrupted before the slot was complete; starting over".into()),
                now,
            )
            .map_err(|e| self.corrupt(e.to_string()))?;
            Recovery::InstallAbandoned {
                slot,
                version: image.version,
            }
        };
        self.persist(next).map_err(|source| OpenError::Io {
            dir: self.dir.clone(),
            source,
        })?;
        tracing::warn!(target = %self.record.target, ?recovery, "recovered an interrupted install");
        Ok(recovery)
    }

    fn corrupt(&self, detail: String) -> OpenError {
        OpenError::Corrupt {
            path: Self::state_path(&self.dir),
            detail,
        }
    }

    pub fn record(&self) -> &SlotRecord {
        &self.record
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn slot_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(format!("slot-{}", slot.name()))
    }

    /// Writes `next` durably, then makes it the record in memory, so memory never runs
    /// ahead of the disk.
    fn persist(&mut self, next: SlotRecord) -> std::io::Result<()> {
        debug_assert!(next.check().is_ok(), "{:?}", next.check());
        write_atomic(
            &Self::state_path(&self.dir),
            &encode_record(&next),
            STATE_FILE_MODE,
        )?;
        self.record = next;
        Ok(())
    }

    fn persist_for(&mut self, action: &'static str, next: SlotRecord) -> Result<(), SlotError> {
        let target = next.target.clone();
        self.persist(next).map_err(|source| SlotError::Io {
            action,
            target,
            source,
        })
    }

    /// Whether `slot`'s file holds the image its record names (false when it names none).
    pub fn verify(&self, slot: Slot) -> std::io::Result<bool> {
        let Some(image) = self.record.image(slot) else {
            return Ok(false);
        };
        match hash_file(&self.slot_path(slot)) {
            Ok((content, size)) => Ok(content == image.content && size == image.size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `image` into the inactive slot from `source`, verifies the slot's BLAKE3
    /// against the image (read back from disk), and marks it pending. Any failure leaves
    /// the target idle on its confirmed slot with the inactive slot marked empty.
    pub fn install(&mut self, image: SlotImage, source: Source<'_>) -> Result<Slot, InstallError> {
        let target = self.record.target.clone();
        let version = image.version;
        let mut next = self.record.clone();
        let slot = next.begin_install(image.clone())?;
        let record_err = |source| InstallError::Record {
            target: target.clone(),
            source,
        };
        // The slot is marked unknown before its first byte changes.
        self.persist(next).map_err(record_err)?;
        let written = self.write_slot(slot, &image, source);
        let verified = written.and_then(|installed| {
            let (content, size) = hash_file(&self.slot_path(slot))
                .map_err(|e| format!("reading the written slot back: {e}"))?;
            if content != image.content || size != image.size {
                return Err(format!(
                    "the written slot is {content} ({size} bytes), the release names {} ({} bytes)",
                    image.content, image.size
                ));
            }
            Ok(installed)
        });
        if verified.is_ok() {
            fault_point(Step::InstallVerified);
        }
        let mut next = self.record.clone();
        next.finish_install(verified.clone(), crate::unix_ms())?;
        self.persist(next).map_err(record_err)?;
        match verified {
            Ok(_) => {
                fault_point(Step::PendingMarked);
                Ok(slot)
            }
            Err(detail) => Err(InstallError::Failed {
                target,
                version,
                detail,
            }),
        }
    }

    fn write_slot(
        &self,
        slot: Slot,
        image: &SlotImage,
        source: Source<'_>,
    ) -> Result<InstallSource, String> {
        let path = self.slot_path(slot);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("opening slot {slot}: {e}"))?;
        file.set_permissions(std::fs::Permissions::from_mode(self.mode))
            .map_err(|e| format!("setting the mode of slot {slot}: {e}"))?;
        let slot_file = SlotFile {
            file,
            written: 0,
            max: image.size,
        };
        let mut out = std::io::BufWriter::with_capacity(COPY_BUFFER_BYTES, slot_file);
        let installed = match source {
            Source::Full(from) => {
                let mut input = File::open(from)
                    .map_err(|e| format!("opening the image {}: {e}", from.display()))?;
                std::io::copy(&mut input, &mut out)
                    .map_err(|e| format!("copying the image into slot {slot}: {e}"))?;
                InstallSource::Full
            }
            Source::Patch { patch, codec } => {
                let base = self.slot_path(self.record.confirmed);
                let input = File::open(patch)
                    .map_err(|e| format!("opening the patch {}: {e}", patch.display()))?;
                let patch_bytes = input.metadata().map(|m| m.len()).unwrap_or(0);
                let reader = std::io::BufReader::with_capacity(COPY_BUFFER_BYTES, input);
                delta::apply_file(&base, reader, &mut out, image.content)
                    .map_err(|e| e.to_string())?;
                InstallSource::Patch {
                    codec: codec.to_string(),
                    patch_bytes,
                }
            }
        };
        let slot_file = out
            .into_inner()
            .map_err(|e| format!("writing slot {slot}: {}", e.error()))?;
        slot_file
            .file
            .sync_all()
            .map_err(|e| format!("syncing slot {slot}: {e}"))?;
        Ok(installed)
    }

    /// Activates the pending slot after checking once more that it holds its image (a
    /// slot damaged since its install is dropped, never activated).
    pub fn activate(&mut self) -> Result<Slot, SlotError> {
        let Phase::Pending { slot } = self.record.phase else {
            return Err(self.record.refuse("activating").into());
        };
        let intact = self.verify(slot).map_err(|source| SlotError::Io {
            action: "activating",
            target: self.record.target.clone(),
            source,
        })?;
        let mut next = self.record.clone();
        if !intact {
            next.drop_pending(format!(
                "slot {slot} no longer holds the image it was verified with; not activating it"
            ))?;
            self.persist_for("activating", next)?;
            return Err(SlotError::Transition(TransitionError::Phase {
                action: "activating",
                target: self.record.target.clone(),
                phase: "damaged",
            }));
        }
        next.activate()?;
        self.persist_for("activating", next)?;
        fault_point(Step::Activate);
        Ok(slot)
    }

    /// A boot (see [`SlotRecord::boot`]), with the slot about to run checked against its
    /// record first: a damaged slot on trial is switched away from, and a damaged
    /// confirmed slot is refused.
    pub fn boot(&mut self, now_unix_ms: u64) -> Result<Boot, SlotError> {
        let mut next = self.record.clone();
        let mut boot = next.boot(now_unix_ms);
        let target = self.record.target.clone();
        let io = |source| SlotError::Io {
            action: "booting",
            target: target.clone(),
            source,
        };
        if boot.trial && !self.verify(boot.slot).map_err(io)? {
            let rolled_back = next.rollback(
                format!(
                    "slot {} no longer holds the image it was verified with",
                    boot.slot
                ),
                now_unix_ms,
            )?;
            boot = Boot {
                slot: next.active,
                trial: false,
                rolled_back: Some(rolled_back),
            };
        }
        if !boot.trial {
            let slot = next.confirmed;
            if !self.verify(slot).map_err(io)? {
                let expected = next.confirmed_image().map(|i| i.content);
                let actual = match hash_file(&self.slot_path(slot)) {
                    Ok((c, n)) => format!("it holds {c}, {n} bytes"),
                    Err(e) => e.to_string(),
                };
                return Err(SlotError::Damaged {
                    target,
                    slot,
                    expected: expected.unwrap_or(ContentId([0; 32])),
                    actual,
                });
            }
        }
        if next != self.record {
            self.persist_for("booting", next)?;
            fault_point(Step::Boot);
        }
        Ok(boot)
    }

    /// Notes why a boot on trial failed (see [`SlotRecord::note_trial_failure`]).
    pub fn note_trial_failure(&mut self, failure: String) -> Result<(), SlotError> {
        let mut next = self.record.clone();
        next.note_trial_failure(failure)?;
        self.persist_for("noting a failed boot of", next)
    }

    /// The slot on trial passed its health gate: it becomes the confirmed base.
    pub fn confirm(&mut self) -> Result<Slot, SlotError> {
        let mut next = self.record.clone();
        let slot = next.confirm()?;
        fault_point(Step::Confirm);
        self.persist_for("confirming", next)?;
        Ok(slot)
    }

    /// Switches back from the slot on trial.
    pub fn rollback(&mut self, reason: String, now_unix_ms: u64) -> Result<Rollback, SlotError> {
        let mut next = self.record.clone();
        let rollback = next.rollback(reason, now_unix_ms)?;
        self.persist_for("rolling back", next)?;
        Ok(rollback)
    }

    /// Records that the last rollback was reported.
    pub fn mark_reported(&mut self) -> Result<(), SlotError> {
        let mut next = self.record.clone();
        next.mark_reported();
        if next == self.record {
            return Ok(());
        }
        self.persist_for("recording a reported rollback of", next)
    }

    /// The invariants after any crash: the record is consistent, and the active and the
    /// confirmed slots hold exactly the images it names.
    pub fn check(&self) -> Result<(), String> {
        self.record.check()?;
        for slot in [self.record.active, self.record.confirmed] {
            match self.verify(slot) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!(
                        "{}: slot {slot} does not hold the image its record names",
                        self.record.target
                    ))
                }
                Err(e) => return Err(format!("{}: reading slot {slot}: {e}", self.record.target)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
