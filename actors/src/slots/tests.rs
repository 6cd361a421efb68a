use super::*;
use crate::restart::test_seed;
use rand::{Rng, RngCore, SeedableRng};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

fn image(bytes: &[u8], version: u64) -> SlotImage {
    SlotImage {
        content: ContentId::of(bytes),
        size: bytes.len() as u64,
        version,
    }
}

fn record() -> SlotRecord {
    SlotRecord::new("gw", image(b"factory", 0), 3)
}

#[test]
fn install_activate_boot_confirm() {
    let mut r = record();
    let v1 = image(b"one", 1);
    let slot = r.begin_install(v1.clone()).unwrap();
    assert_eq!(
        slot,
        Slot::B,
        "an install goes into the slot that is not confirmed"
    );
    assert_eq!(r.pending_slot(), Some(Slot::B));
    assert_eq!(
        r.image(Slot::B),
        None,
        "a slot being written names no image"
    );
    r.check().unwrap();
    r.finish_install(Ok(InstallSource::Full), 5).unwrap();
    assert_eq!(r.phase, Phase::Pending { slot: Slot::B });
    assert_eq!(r.image(Slot::B), Some(&v1));
    assert!(r.is_confirmed(), "a pending slot is not active yet");
    r.activate().unwrap();
    assert_eq!(r.active, Slot::B);
    assert!(!r.is_confirmed());
    assert_eq!(r.attempts_left(), Some(3));
    let boot = r.boot(6);
    assert_eq!(
        boot,
        Boot {
            slot: Slot::B,
            trial: true,
            rolled_back: None
        }
    );
    assert_eq!(r.attempts_left(), Some(2));
    assert_eq!(r.confirm().unwrap(), Slot::B);
    assert_eq!(r.confirmed, Slot::B);
    assert_eq!(r.phase, Phase::Idle);
    r.check().unwrap();
    // The next install goes into A, the old base, never into the new one.
    assert_eq!(r.begin_install(image(b"two", 2)).unwrap(), Slot::A);
}

#[test]
fn refusals() {
    let mut r = record();
    assert!(matches!(
        r.begin_install(image(b"zero", 0)),
        Err(TransitionError::NotNewer { .. })
    ));
    assert!(r.activate().is_err(), "nothing is pending");
    assert!(r.confirm().is_err(), "nothing is on trial");
    assert!(r.rollback("x".into(), 0).is_err());
    r.begin_install(image(b"one", 1)).unwrap();
    assert!(
        r.begin_install(image(b"two", 2)).is_err(),
        "an install in progress must end first"
    );
    r.finish_install(Ok(InstallSource::Full), 0).unwrap();
    // A newer image may replace a pending one.
    assert_eq!(r.begin_install(image(b"two", 2)).unwrap(), Slot::B);
    r.finish_install(Ok(InstallSource::Full), 0).unwrap();
    r.activate().unwrap();
    assert!(
        r.begin_install(image(b"three", 3)).is_err(),
        "no install while a slot is on trial"
    );
}

#[test]
fn failed_install_leaves_the_confirmed_slot_active() {
    let mut r = record();
    r.begin_install(image(b"one", 1)).unwrap();
    r.finish_install(Err("hash mismatch".into()), 0).unwrap();
    assert_eq!(r.phase, Phase::Idle);
    assert_eq!(r.image(Slot::B), None);
    assert!(r.last_error.as_deref().unwrap().contains("hash mismatch"));
    assert!(r.activate().is_err(), "a failed install is never activated");
    r.check().unwrap();
}

#[test]
fn used_up_boot_attempts_switch_back() {
    let mut r = record();
    r.begin_install(image(b"one", 1)).unwrap();
    r.finish_install(Ok(InstallSource::Full), 0).unwrap();
    r.activate().unwrap();
    for left in (0..3).rev() {
        let b = r.boot(0);
        assert!(b.trial);
        assert_eq!(r.attempts_left(), Some(left));
        r.note_trial_failure("exited with status 1".into()).unwrap();
    }
    let b = r.boot(42);
    assert_eq!(b.slot, Slot::A);
    assert!(!b.trial);
    let rb = b.rolled_back.expect("the fourth boot switches back");
    assert_eq!(rb.from.version, 1);
    assert_eq!(rb.to.version, 0);
    assert_eq!(rb.unix_ms, 42);
    assert!(rb.reason.contains("booted 3 time(s)"), "{}", rb.reason);
    assert!(rb.reason.contains("exited with status 1"), "{}", rb.reason);
    assert!(!rb.reported);
    assert_eq!(r.active, Slot::A);
    assert_eq!(r.confirmed, Slot::A);
    assert_eq!(r.phase, Phase::Idle);
    r.mark_reported();
    assert!(r.last_rollback.as_ref().unwrap().reported);
    r.check().unwrap();
}

#[test]
fn check_finds_inconsistent_records() {
    let mut r = record();
    r.active = Slot::B;
    assert!(r.check().is_err(), "idle with the unconfirmed slot active");
    let mut r = record();
    r.phase = Phase::Writing {
        slot: Slot::A,
        image: image(b"x", 1),
    };
    assert!(r.check().is_err(), "writing the confirmed slot");
    let mut r = record();
    r.phase = Phase::Trial {
        slot: Slot::B,
        attempts_left: 1,
        last_failure: None,
    };
    r.active = Slot::B;
    assert!(r.check().is_err(), "a trial slot without an image");
    let mut r = record();
    r.slots = [None, None];
    assert!(r.check().is_err(), "no confirmed image");
}

/// Random sequences of transitions, valid or not: every record stays consistent, the
/// confirmed image only ever changes by a confirm, the slot being written is never the
/// confirmed one, and a trial never boots more often than its attempts allow.
#[test]
fn random_transitions_keep_the_invariants() {
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..200 {
        let mut r = SlotRecord::new("gw", image(b"v0", 0), rng.gen_range(1..5));
        let mut version = 0u64;
        let mut trial_boots = 0u32;
        for step in 0..60 {
            let before = r.clone();
            let confirmed_before = r.confirmed_image().cloned();
            match rng.gen_range(0..8) {
                0 => {
                    version += 1;
                    if let Ok(slot) = r.begin_install(image(&version.to_le_bytes(), version)) {
                        assert_ne!(slot, before.confirmed, "seed {seed} step {step}");
                    }
                }
                1 => {
                    let ok = rng.gen_bool(0.8);
                    let _ = r.finish_install(
                        if ok {
                            Ok(InstallSource::Full)
                        } else {
                            Err("bad".into())
                        },
                        step,
                    );
                }
                2 => {
                    if r.activate().is_ok() {
                        trial_boots = 0;
                    }
                }
                3 | 4 => {
                    let b = r.boot(step);
                    if b.trial {
                        trial_boots += 1;
                        assert!(trial_boots <= r.boot_attempts, "seed {seed} step {step}");
                    }
                    assert_eq!(b.slot, r.active, "seed {seed} step {step}");
                }
                5 => {
                    let _ = r.confirm();
                }
                6 => {
                    let _ = r.rollback("unhealthy".into(), step);
                }
                _ => {
                    let _ = r.note_trial_failure("crash".into());
                }
            }
            r.check()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}\n{before:?}\n{r:?}"));
            if r.confirmed_image() != confirmed_before.as_ref() {
                assert!(
                    matches!(before.phase, Phase::Trial { .. }) && r.phase == Phase::Idle,
                    "seed {seed} step {step}: the base changed without a confirm"
                );
                assert_eq!(r.confirmed, before.active, "seed {seed} step {step}");
            }
        }
    }
}

#[test]
fn health_gate() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    // No command: healthy once the grace period has passed.
    let mut g = HealthGate::new(t0, s(10), s(60), false, s(5));
    assert_eq!(g.poll(t0 + s(9)), GateDecision::Wait);
    assert_eq!(g.poll(t0 + s(10)), GateDecision::Confirm);
    // A command: checked after the grace period, retried, confirmed when it passes.
    let mut g = HealthGate::new(t0, s(10), s(60), true, s(5));
    assert_eq!(g.poll(t0 + s(1)), GateDecision::Wait);
    assert_eq!(g.poll(t0 + s(10)), GateDecision::Check);
    assert_eq!(
        g.poll(t0 + s(11)),
        GateDecision::Wait,
        "one check at a time"
    );
    g.on_check(t0 + s(11), Err("exit status 1".into()));
    assert_eq!(
        g.poll(t0 + s(12)),
        GateDecision::Wait,
        "waits before retrying"
    );
    assert_eq!(g.poll(t0 + s(16)), GateDecision::Check);
    g.on_check(t0 + s(17), Ok(()));
    assert_eq!(g.poll(t0 + s(17)), GateDecision::Confirm);
    // A command that keeps failing: the deadline switches back, with the reason.
    let mut g = HealthGate::new(t0, s(1), s(20), true, s(5));
    assert_eq!(g.poll(t0 + s(2)), GateDecision::Check);
    g.on_check(t0 + s(2), Err("exit status 3".into()));
    match g.poll(t0 + s(20)) {
        GateDecision::Fail(why) => {
            assert!(why.contains("within 20 s"), "{why}");
            assert!(why.contains("exit status 3"), "{why}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn random_image(rng: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// A new version of `old`: a few regions changed and a block inserted.
fn next_image(rng: &mut impl RngCore, old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    for _ in 0..8 {
        let at = rng.next_u32() as usize % new.len();
        new[at] ^= 0x5a;
    }
    let at = rng.next_u32() as usize % new.len();
    let block = random_image(rng, 4096);
    new.splice(at..at, block);
    new
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    v0: Vec<u8>,
    v1: Vec<u8>,
    v1_path: PathBuf,
    patch_path: PathBuf,
    codec: Codec,
}

use crate::delta::Codec;

/// A target whose slot A holds `v0`, plus a `v1` image file and a patch from v0 to v1.
fn fixture(seed: u64, n: usize) -> Fixture {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let v0 = random_image(&mut rng, n);
    let v1 = next_image(&mut rng, &v0);
    let v0_path = tmp.path().join("v0.img");
    let v1_path = tmp.path().join("v1.img");
    std::fs::write(&v0_path, &v0).unwrap();
    std::fs::write(&v1_path, &v1).unwrap();
    let (codec, patch) = crate::delta::create_best(&v0, &v1).unwrap();
    let patch_path = tmp.path().join("v1.patch");
    std::fs::write(&patch_path, &patch).unwrap();
    let dir = tmp.path().join("firmware/gw");
    SlotStore::open_or_create(&dir, "gw", Some(&v0_path), 3, 0o644).unwrap();
    Fixture {
        dir,
        _tmp: tmp,
        v0,
        v1,
        v1_path,
        patch_path,
        codec,
    }
}

#[test]
fn store_installs_full_and_patch_and_survives_reopen() {
    let seed = test_seed();
    for use_patch in [false, true] {
        let f = fixture(seed, 300_000);
        let (mut store, recovery) = SlotStore::open(&f.dir, 0o644).unwrap();
        assert_eq!(recovery, Recovery::Clean);
        let source = if use_patch {
            Source::Patch {
                patch: &f.patch_path,
                codec: f.codec.name(),
            }
        } else {
            Source::Full(&f.v1_path)
        };
        let slot = store.install(image(&f.v1, 1), source).unwrap();
        assert_eq!(slot, Slot::B);
        assert_eq!(std::fs::read(store.slot_path(Slot::B)).unwrap(), f.v1);
        let note = store.record().last_install.clone().unwrap();
        assert_eq!(
            matches!(note.source, InstallSource::Patch { .. }),
            use_patch,
            "seed {seed}"
        );
        store.activate().unwrap();
        // A restart in the middle: the record on disk is what the next process sees.
        let (mut store, _) = SlotStore::open(&f.dir, 0o644).unwrap();
        let boot = store.boot(1).unwrap();
        assert!(boot.trial);
        store.confirm().unwrap();
        store.check().unwrap();
        let r = SlotStore::load(&f.dir).unwrap();
        assert_eq!(r.confirmed, Slot::B);
        assert_eq!(r.confirmed_image().unwrap().version, 1);
        assert_eq!(std::fs::read(store.slot_path(Slot::A)).unwrap(), f.v0);
    }
}

/// An image whose hash does not match its release is never activated, whether it came
/// whole, from a patch that builds something else, or was damaged after its install.
#[test]
fn a_mismatching_image_is_never_activated() {
    let seed = test_seed();
    let f = fixture(seed, 100_000);
    let (mut store, _) = SlotStore::open(&f.dir, 0o644).unwrap();
    // The bytes are v1's but the release names other content.
    let mut claimed = image(&f.v1, 1);
    claimed.content = ContentId::of(b"something else");
    let err = store
        .install(claimed, Source::Full(&f.v1_path))
        .unwrap_err();
    assert!(matches!(err, InstallError::Failed { .. }), "{err}");
    assert_eq!(store.record().phase, Phase::Idle);
    assert_eq!(store.record().image(Slot::B), None);
    assert!(store.activate().is_err());
    store.check().unwrap();

    // A patch whose header names the right target but whose body builds other bytes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
    let other = next_image(&mut rng, &f.v0);
    let mut patch = crate::delta::create(Codec::Zstd, &f.v0, &other).unwrap();
    let mut header = crate::delta::read_header(&patch).unwrap();
    header.target = ContentId::of(&f.v1);
    header.target_bytes = f.v1.len() as u64;
    patch[..crate::delta::HEADER_BYTES].copy_from_slice(&header.to_bytes());
    let forged = f.dir.join("forged.patch");
    std::fs::write(&forged, &patch).unwrap();
    let err = store
        .install(
            image(&f.v1, 1),
            Source::Patch {
                patch: &forged,
                codec: "zstd",
            },
        )
        .unwrap_err();
    assert!(matches!(err, InstallError::Failed { .. }), "{err}");
    assert_eq!(store.record().phase, Phase::Idle);
    assert!(store.activate().is_err());
    store.check().unwrap();

    // A good install, then the slot is damaged before activation: it is dropped.
    store
        .install(image(&f.v1, 1), Source::Full(&f.v1_path))
        .unwrap();
    let mut bytes = std::fs::read(store.slot_path(Slot::B)).unwrap();
    bytes[10] ^= 1;
    std::fs::write(store.slot_path(Slot::B), &bytes).unwrap();
    assert!(store.activate().is_err());
    assert_eq!(store.record().phase, Phase::Idle);
    assert_eq!(store.record().active, Slot::A);
    assert!(store.record().last_error.is_some());
    store.check().unwrap();
}

#[test]
fn a_damaged_trial_slot_is_switched_away_from_at_boot() {
    let seed = test_seed();
    let f = fixture(seed, 50_000);
    let (mut store, _) = SlotStore::open(&f.dir, 0o644).unwrap();
    store
        .install(image(&f.v1, 1), Source::Full(&f.v1_path))
        .unwrap();
    store.activate().unwrap();
    std::fs::write(store.slot_path(Slot::B), b"garbage").unwrap();
    let boot = store.boot(7).unwrap();
    assert_eq!(boot.slot, Slot::A);
    assert!(boot.rolled_back.is_some());
    store.check().unwrap();
    // A damaged confirmed slot is refused rather than booted.
    std::fs::write(store.slot_path(Slot::A), b"garbage").unwrap();
    assert!(matches!(store.boot(8), Err(SlotError::Damaged { .. })));
}

#[test]
fn a_damaged_record_is_refused() {
    let f = fixture(1, 1000);
    let path = SlotStore::state_path(&f.dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        SlotStore::open(&f.dir, 0o644),
        Err(OpenError::Corrupt { .. })
    ));
    std::fs::write(&path, b"short").unwrap();
    assert!(matches!(
        SlotStore::load(&f.dir),
        Err(OpenError::Corrupt { .. })
    ));
}

// ---- Power cuts: a child process runs the update and aborts at a fault point. ----

const CHILD_DIR_ENV: &str = "MESH_SLOTS_TEST_DIR";
const CHILD_IMAGE_ENV: &str = "MESH_SLOTS_TEST_IMAGE";
const CHILD_PATCH_ENV: &str = "MESH_SLOTS_TEST_PATCH";

/// The child process of the power-cut tests: a device's update loop, as the firmware
/// actor and a boot loader run it, carried as far as it goes. Started by
/// [`run_child`] with the target directory and the new image in its environment.
#[test]
#[ignore = "the child process of the power-cut tests; they run it"]
fn power_cut_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let image_path = PathBuf::from(std::env::var_os(CHILD_IMAGE_ENV).unwrap());
    let patch = std::env::var_os(CHILD_PATCH_ENV).map(PathBuf::from);
    let bytes = std::fs::read(&image_path).unwrap();
    let wanted = image(&bytes, 1);
    let (mut store, recovery) = SlotStore::open(&dir, 0o644).unwrap();
    println!("recovery: {recovery:?}");
    store.check().unwrap();
    loop {
        let r = store.record().clone();
        match r.phase {
            Phase::Idle => {
                let failed = r
                    .last_rollback
                    .as_ref()
                    .is_some_and(|rb| rb.from.content == wanted.content);
                if r.confirmed_image().unwrap().version >= wanted.version || failed {
                    break;
                }
                let source = match &patch {
                    Some(p) => Source::Patch {
                        patch: p,
                        codec: "test",
                    },
                    None => Source::Full(&image_path),
                };
                store.install(wanted.clone(), source).unwrap();
            }
            Phase::Writing { .. } => unreachable!("open recovers an interrupted write"),
            Phase::Pending { .. } => {
                store.activate().unwrap();
            }
            Phase::Trial { .. } => {
                let boot = store.boot(crate::unix_ms()).unwrap();
                if !boot.trial {
                    break;
                }
                // The new image came up and passed its health gate.
                store.confirm().unwrap();
            }
        }
    }
    // The device runs on: a normal boot of whatever is active now.
    store.boot(crate::unix_ms()).unwrap();
    store.check().unwrap();
}

/// Runs the child with `fault` (a comma-separated list of steps, or none).
fn run_child(
    dir: &Path,
    image: &Path,
    patch: Option<&Path>,
    fault: Option<&str>,
) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "slots::tests::power_cut_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_DIR_ENV, dir)
    .env(CHILD_IMAGE_ENV, image)
    .env_remove(FAULT_POINT_ENV)
    .env_remove(FAULT_ONCE_ENV);
    if let Some(p) = patch {
        cmd.env(CHILD_PATCH_ENV, p);
    }
    if let Some(f) = fault {
        cmd.env(FAULT_POINT_ENV, f);
    }
    cmd.output().expect("starting the child process")
}

fn describe(r: &SlotRecord) -> String {
    let left = r
        .attempts_left()
        .map(|n| format!(" ({n} boots left)"))
        .unwrap_or_default();
    format!(
        "phase {}{left}, active {}, confirmed {} (v{}), slot b {}",
        r.phase.name(),
        r.active,
        r.confirmed,
        r.confirmed_image().map(|i| i.version).unwrap_or(0),
        r.image(Slot::B)
            .map(|i| format!("v{}", i.version))
            .unwrap_or_else(|| "empty".into()),
    )
}

/// For every step of install, activation, boot and confirmation, and for both the full
/// and the patch path: a power cut at that step (abort) leaves, after a restart, a
/// consistent record whose active and confirmed slots hold the images it names, and the
/// next run finishes the update.
#[test]
fn a_power_cut_at_every_step_is_recovered() {
    let seed = test_seed();
    // Larger than the write buffer, so a cut mid-write leaves a partial slot.
    let size = 3 * COPY_BUFFER_BYTES + 1234;
    for use_patch in [false, true] {
        for step in Step::ALL {
            let f = fixture(seed, size);
            let patch = use_patch.then_some(f.patch_path.as_path());
            let out = run_child(&f.dir, &f.v1_path, patch, Some(step.name()));
            assert_eq!(
                out.status.signal(),
                Some(6),
                "step {} (patch: {use_patch}) did not abort: {}\n{}",
                step.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let on_disk = SlotStore::load(&f.dir).unwrap();
            // The restart: open (which recovers an interrupted write) and check.
            let (store, recovery) = SlotStore::open(&f.dir, 0o644).unwrap();
            store
                .check()
                .unwrap_or_else(|e| panic!("step {} (patch: {use_patch}): {e}", step.name()));
            println!(
                "cut at {:<16} patch {use_patch:<5}: on disk {}; after restart {recovery:?}, {}",
                step.name(),
                describe(&on_disk),
                describe(store.record())
            );
            match step {
                Step::InstallWriting => assert!(
                    matches!(recovery, Recovery::InstallAbandoned { .. }),
                    "{recovery:?}"
                ),
                Step::InstallVerified => assert!(
                    matches!(recovery, Recovery::InstallResumed { .. }),
                    "{recovery:?}"
                ),
                _ => assert_eq!(recovery, Recovery::Clean),
            }
            // The confirmed base is untouched until the new image is confirmed.
            assert_eq!(store.record().confirmed, Slot::A);
            assert_eq!(std::fs::read(store.slot_path(Slot::A)).unwrap(), f.v0);
            drop(store);
            let out = run_child(&f.dir, &f.v1_path, patch, None);
            assert!(
                out.status.success(),
                "after a cut at {}: {}",
                step.name(),
                String::from_utf8_lossy(&out.stderr)
            );
            let (store, _) = SlotStore::open(&f.dir, 0o644).unwrap();
            store.check().unwrap();
            let r = store.record();
            assert_eq!(r.phase, Phase::Idle);
            assert_eq!(
                r.confirmed,
                Slot::B,
                "step {}: {}",
                step.name(),
                describe(r)
            );
            assert_eq!(r.confirmed_image().unwrap().version, 1);
            assert_eq!(std::fs::read(store.slot_path(Slot::B)).unwrap(), f.v1);
        }
    }
}

/// Power cuts at every boot that writes the record, over and over (rauc#683): the trial
/// uses up its attempts, the record switches back, and the confirmed slot, never written,
/// still boots.
#[test]
fn repeated_cuts_at_boot_never_exhaust_both_slots() {
    let seed = test_seed();
    let f = fixture(seed, 200_000);
    // Install and activate v1 with a cut right after activation.
    let out = run_child(&f.dir, &f.v1_path, None, Some("activate"));
    assert_eq!(out.status.signal(), Some(6));
    let attempts = SlotStore::load(&f.dir).unwrap().boot_attempts;
    // One cut per attempt, and one more at the boot that switches back.
    for run in 0..=attempts {
        let out = run_child(&f.dir, &f.v1_path, None, Some("boot"));
        assert_eq!(
            out.status.signal(),
            Some(6),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (store, _) = SlotStore::open(&f.dir, 0o644).unwrap();
        store
            .check()
            .unwrap_or_else(|e| panic!("after cut {run} at boot: {e}"));
        let r = store.record();
        println!("cut {run} at boot: {}", describe(r));
        assert_eq!(r.confirmed, Slot::A, "the base never moves");
        assert_eq!(std::fs::read(store.slot_path(Slot::A)).unwrap(), f.v0);
        if run < attempts {
            assert_eq!(r.attempts_left(), Some(attempts - run - 1));
        } else {
            assert_eq!(r.phase, Phase::Idle, "run {run}: switched back");
            assert_eq!(r.active, Slot::A);
        }
    }
    // A boot of the confirmed slot writes nothing, so there is nothing left to cut: it
    // runs, and the failed image is not retried.
    for fault in [Some("boot"), None] {
        let out = run_child(&f.dir, &f.v1_path, None, fault);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r = SlotStore::load(&f.dir).unwrap();
    assert_eq!(r.active, Slot::A);
    let rb = r.last_rollback.expect("a rollback was recorded");
    assert_eq!(rb.from.version, 1);
    assert!(
        rb.reason.contains("without being confirmed"),
        "{}",
        rb.reason
    );
}
