//! Firmware in a chaos run: the images of each firmware release (from files, or drawn
//! from the seed), the `[[firmware]]` target every node gets for it, the patches a
//! publish carries, and what each node's slots say on disk.
//!
//! A node only fetches firmware for a target it is configured with, so the harness
//! configures one device target per firmware release, named after it and starting from
//! version 0 (the first image). A version listed as `crashing` fails the device's
//! activation hook, so the node must switch back and record why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use mesh_actors::slots::{self, SlotRecord, SlotStore, Step};
use mesh_transport::ContentId;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::report::PublishRecord;
use crate::scenario::{Kind, Scenario};

/// The largest generated firmware image: each node holds it twice in its slots and once
/// in its store, and a whole fleet shares one machine's disk.
pub const IMAGE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Earlier versions a firmware publish carries patches from (version 0 included): enough
/// for a node that missed a release or two, few enough that publishing stays quick.
pub const DELTA_BASES_MAX: u64 = 3;
/// How long a new image stays up before a node confirms it: short, so a run converges
/// quickly, and long enough that a power cut can land while the image is on trial.
pub const GRACE_MS: u64 = 1500;
/// Bytes changed in place from one generated version to the next.
const CHANGED_BYTES: usize = 32;
/// Bytes inserted from one generated version to the next, so patches must handle a
/// shift and not only overwrites.
const INSERTED_BYTES: usize = 4096;
/// The firmware steps a power cut is drawn from, in the order an update passes them.
pub const CUT_STEPS: [Step; 6] = Step::ALL;

/// One firmware release series of a run and the target every node has for it.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    /// Image files by version: index 0 is the image every node starts with.
    pub images: Vec<PathBuf>,
    pub crashing: Vec<u64>,
    pub deltas: bool,
}

impl Target {
    /// The content of the initial image (version 0).
    pub fn initial(&self) -> anyhow::Result<ContentId> {
        let (id, _) = slots::hash_file(&self.images[0])
            .with_context(|| format!("hashing {}", self.images[0].display()))?;
        Ok(id)
    }

    /// The earlier images a publish of `version` carries patches from.
    pub fn bases(&self, version: u64) -> Vec<PathBuf> {
        if !self.deltas {
            return Vec::new();
        }
        let from = version.saturating_sub(DELTA_BASES_MAX) as usize;
        self.images[from..version as usize].to_vec()
    }
}

/// Writes every firmware release's images under `dir` (generated ones from the seed,
/// listed files copied in after an empty version 0) and returns the targets.
pub fn prepare(seed: u64, scenario: &Scenario, dir: &Path) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for r in scenario
        .releases
        .iter()
        .filter(|r| r.kind == Kind::Firmware)
    {
        let dir = dir.join("firmware-images");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let contents: Vec<Vec<u8>> = if r.generated_firmware() {
            generate(seed, &r.name, r.bytes.unwrap_or(1), r.version_count())
        } else {
            let mut v = vec![Vec::new()];
            for f in &r.files {
                let path = scenario.module_file(f);
                v.push(
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                );
            }
            v
        };
        let mut images = Vec::new();
        for (k, bytes) in contents.iter().enumerate() {
            let path = dir.join(format!("{}-v{k}.img", r.name));
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            images.push(path);
        }
        out.push(Target {
            name: r.name.clone(),
            images,
            crashing: r.crashing.clone(),
            deltas: r.deltas,
        });
    }
    Ok(out)
}

/// Versions 0..=`versions` of a generated image: version 0 drawn from the seed and the
/// name, each later one a few changed bytes and one inserted block away from the one
/// before.
pub fn generate(seed: u64, name: &str, size: u64, versions: u64) -> Vec<Vec<u8>> {
    let mut h = blake3::Hasher::new();
    h.update(b"firmware");
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    let mut rng = StdRng::from_seed(*h.finalize().as_bytes());
    let mut cur = vec![0u8; size as usize];
    rng.fill_bytes(&mut cur);
    let mut out = vec![cur.clone()];
    for _ in 0..versions {
        let mut next = cur.clone();
        for _ in 0..CHANGED_BYTES {
            let at = rng.gen_range(0..next.len());
            next[at] = next[at].wrapping_add(1);
        }
        let mut block = vec![0u8; INSERTED_BYTES];
        rng.fill_bytes(&mut block);
        let at = rng.gen_range(0..=next.len());
        next.splice(at..at, block);
        out.push(next.clone());
        cur = next;
    }
    out
}

/// The `[[firmware]]` tables every node's config gets, one per target.
pub fn config_text(targets: &[Target]) -> String {
    let mut out = String::new();
    for t in targets {
        out.push_str(&format!(
            "\n[[firmware]]\nname = {:?}\ninitial_image = {:?}\ngrace_ms = {GRACE_MS}\n",
            t.name,
            t.images[0].display().to_string()
        ));
        if !t.crashing.is_empty() {
            // The device refuses to switch to a crashing version; switching back (to a
            // good one) works.
            let versions: Vec<String> = t.crashing.iter().map(u64::to_string).collect();
            out.push_str(&format!(
                "activate = 'if [ \"$MESH_FIRMWARE_ACTION\" = activate ]; then case \"$MESH_FIRMWARE_VERSION\" in {}) echo \"v$MESH_FIRMWARE_VERSION does not boot\" >&2; exit 1;; esac; fi'\n",
                versions.join("|")
            ));
        }
    }
    out
}

/// What one node's target should end on: the newest acknowledged version that is not
/// known to crash, or the initial image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub version: u64,
    pub content: ContentId,
    /// The newest acknowledged version, when it crashes (the node must have switched
    /// back from it, or never installed it).
    pub newest_crashing: Option<u64>,
}

pub fn expectations(
    targets: &[Target],
    publishes: &[PublishRecord],
) -> anyhow::Result<BTreeMap<String, Expect>> {
    let mut out = BTreeMap::new();
    for t in targets {
        let mut acked: Vec<(u64, ContentId)> = publishes
            .iter()
            .filter(|p| p.ok && p.name == t.name)
            .filter_map(|p| Some((p.version, p.content.parse().ok()?)))
            .collect();
        acked.sort_unstable_by_key(|(v, _)| *v);
        let newest_crashing = acked
            .last()
            .map(|(v, _)| *v)
            .filter(|v| t.crashing.contains(v));
        let (version, content) = match acked.iter().rev().find(|(v, _)| !t.crashing.contains(v)) {
            Some(x) => *x,
            None => (0, t.initial()?),
        };
        out.insert(
            t.name.clone(),
            Expect {
                version,
                content,
                newest_crashing,
            },
        );
    }
    Ok(out)
}

/// What a node's slots of one target say: the record, checked against the slot files
/// (the confirmed and the active slot hold exactly the images it names), or why not.
pub type SlotView = Result<SlotRecord, String>;

/// Reads and checks one target of a node from its state directory.
pub fn read_slots(state: &Path, target: &str) -> SlotView {
    SlotStore::load_checked(&slots::target_dir(state, target))
}

/// Reads a target while its node may be writing it: a check that failed while the
/// record changed under it is read again, up to a few times, so only a record that
/// stays wrong counts. `None` when there is nothing to check now: the node has not
/// created the target yet, or the record changed on every read.
pub fn read_slots_live(state: &Path, target: &str) -> Option<SlotView> {
    /// Reads of a record that keeps changing before this round gives up on it.
    const READS_MAX: u32 = 3;
    let dir = slots::target_dir(state, target);
    for _ in 0..READS_MAX {
        let before = match SlotStore::load(&dir) {
            Ok(r) => r,
            Err(slots::OpenError::Missing { .. }) => return None,
            Err(e) => return Some(Err(e.to_string())),
        };
        let view = SlotStore::load_checked(&dir);
        if view.is_ok() || SlotStore::load(&dir).ok().as_ref() == Some(&before) {
            return Some(view);
        }
    }
    None
}

/// Where every firmware target of a node stands, read from its disk ("gw: writing v3"),
/// to say what a kill interrupted; empty when the node has none.
pub fn phases(state: &Path) -> String {
    let Ok(dirs) = std::fs::read_dir(state.join("firmware")) else {
        return String::new();
    };
    let mut out = Vec::new();
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().to_string();
        let what = match SlotStore::load(&d.path()) {
            Ok(r) => {
                let version = |s: Option<slots::Slot>| {
                    s.and_then(|s| r.image(s))
                        .map(|i| format!(" v{}", i.version))
                        .unwrap_or_default()
                };
                match &r.phase {
                    slots::Phase::Writing { image, .. } => format!("writing v{}", image.version),
                    slots::Phase::Idle => format!("idle on{}", version(Some(r.confirmed))),
                    p => format!("{}{}", p.name(), version(r.pending_slot())),
                }
            }
            Err(e) => format!("unreadable ({e})"),
        };
        out.push(format!("{name}: {what}"));
    }
    out.sort();
    out.join(", ")
}

/// Whether a target's record shows it settled on `e`: idle on a confirmed image of the
/// expected version and content.
pub fn settled(view: &SlotView, e: &Expect) -> Result<(), String> {
    let r = view.as_ref().map_err(|e| e.clone())?;
    let Some(img) = r.confirmed_image() else {
        return Err("the confirmed slot names no image".into());
    };
    if r.phase != slots::Phase::Idle || r.active != r.confirmed {
        return Err(format!(
            "not settled: {} with slot {} active and {} confirmed (v{})",
            r.phase.name(),
            r.active,
            r.confirmed,
            img.version
        ));
    }
    if img.version != e.version || img.content != e.content {
        return Err(format!(
            "confirmed on v{} ({}) instead of v{} ({})",
            img.version,
            img.content.short(),
            e.version,
            e.content.short()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_images_replay_from_the_seed_and_change_a_little() {
        let a = generate(7, "gw", 64 * 1024, 3);
        assert_eq!(a, generate(7, "gw", 64 * 1024, 3));
        assert_ne!(a, generate(8, "gw", 64 * 1024, 3));
        assert_eq!(a.len(), 4);
        for k in 1..a.len() {
            assert_eq!(a[k].len(), a[k - 1].len() + INSERTED_BYTES);
            assert_ne!(a[k], a[k - 1]);
        }
    }

    #[test]
    fn a_damaged_confirmed_slot_is_found_and_a_missing_target_is_not_checked() {
        let state = tempfile::tempdir().unwrap();
        assert!(read_slots_live(state.path(), "gw").is_none());
        assert!(read_slots(state.path(), "gw").is_err());
        let image = state.path().join("v0.img");
        std::fs::write(&image, generate(1, "gw", 4096, 0).remove(0)).unwrap();
        let dir = slots::target_dir(state.path(), "gw");
        SlotStore::open_or_create(&dir, "gw", Some(&image), 3, 0o644).unwrap();
        let r = read_slots(state.path(), "gw").unwrap();
        let e = Expect {
            version: 0,
            content: r.confirmed_image().unwrap().content,
            newest_crashing: None,
        };
        settled(&Ok(r), &e).unwrap();
        let later = Expect { version: 1, ..e };
        assert!(settled(&read_slots(state.path(), "gw"), &later).is_err());
        // Bit rot in the slot the device boots.
        let slot = dir.join("slot-a");
        let mut bytes = std::fs::read(&slot).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&slot, bytes).unwrap();
        let why = read_slots(state.path(), "gw").unwrap_err();
        assert!(why.contains("slot a"), "{why}");
        assert!(matches!(read_slots_live(state.path(), "gw"), Some(Err(_))));
    }

    #[test]
    fn bases_are_the_previous_versions_when_deltas_are_on() {
        let t = Target {
            name: "gw".into(),
            images: (0..6).map(|k| PathBuf::from(format!("v{k}"))).collect(),
            crashing: vec![],
            deltas: true,
        };
        assert_eq!(t.bases(1), vec![PathBuf::from("v0")]);
        assert_eq!(t.bases(5), ["v2", "v3", "v4"].map(PathBuf::from).to_vec());
        let t = Target { deltas: false, ..t };
        assert!(t.bases(5).is_empty());
    }
}
