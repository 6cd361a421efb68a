//! The scenario file: what fleet to start, what to publish over time, and which faults
//! to draw from the seed. A scenario says *what kinds* of things happen and within which
//! windows; the seed decides exactly when, to whom and how (see `schedule.rs`).
//!
//! ```toml
//! name = "partition-during-rollout"
//! description = "A new version is published while the fleet is split in two."
//! nodes = 4
//! duration_s = 20     # the workload and fault phase
//! converge_s = 60     # how long the fleet may take to converge once every fault healed
//!
//! [[release]]
//! kind = "data"
//! name = "model"
//! bytes = 262144
//! versions = 3
//! window_s = [1, 15]
//!
//! [[fault]]
//! kind = "partition"
//! count = 1
//! start_s = [3, 6]
//! length_s = [5, 8]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Scenario files are a few kilobytes; refuse anything absurd before parsing.
pub const SCENARIO_BYTES_MAX: u64 = 256 * 1024;
/// Nodes one run may start: each is a real process, and this machine has to host them.
pub const RUN_NODES_MAX: usize = 32;
/// The longest workload phase a scenario may ask for (a day-long soak).
pub const DURATION_S_MAX: u64 = 24 * 3600;
/// The longest convergence wait, so a broken fleet cannot hold a run forever.
pub const CONVERGE_S_MAX: u64 = 3600;
/// Versions one release series may publish.
pub const VERSIONS_MAX: u64 = 1000;
/// Occurrences one fault entry may draw.
pub const FAULT_COUNT_MAX: u32 = 1000;
/// The largest data release the harness generates, held in memory while publishing.
pub const RELEASE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// What a node suffers. Network faults need root, network namespaces and nftables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// kill -9, then a restart with the same state directory and addresses.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Pause,
    /// The fleet split into groups that cannot reach each other (nftables), then healed.
    Partition,
    /// Random packet loss to and from chosen nodes (nftables numgen).
    Loss,
    /// A node's uplink capped far below the lab rate (tbf).
    Slow,
    /// The node's disk fills: a tmpfs shrunk to what it holds (root), or a store cap
    /// at what it holds (a restart with --store-bytes-max).
    DiskFull,
    /// Bytes flipped in a blob file on a node's disk.
    CorruptBlob,
    /// The node's wall clock jumps (libfaketime).
    ClockSkew,
    /// An in-process peer that lies: corrupted chunks, replayed and forged manifests,
    /// gossip floods.
    Byzantine,
    /// A power cut during a firmware install: the node is restarted armed to abort at a
    /// firmware step drawn from the seed (`MESH_FAULT_POINT`, once), the next time an
    /// install gets there; the harness restarts it after the cut. Healed by a restart
    /// without the fault point when the install never got there.
    PowerCut,
}

impl FaultKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Loss => "loss",
            FaultKind::Slow => "slow",
            FaultKind::DiskFull => "disk_full",
            FaultKind::CorruptBlob => "corrupt_blob",
            FaultKind::ClockSkew => "clock_skew",
            FaultKind::Byzantine => "byzantine",
            FaultKind::PowerCut => "power_cut",
        }
    }

    /// Whether the fault needs root, network namespaces and nftables.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            FaultKind::Partition | FaultKind::Loss | FaultKind::Slow
        )
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the nodes live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Network namespaces when the plan has network faults and this process may make
    /// them, loopback otherwise.
    #[default]
    Auto,
    Loopback,
    Netns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Data,
    Module,
    /// A firmware image per version, from `files` or generated from the seed (`bytes`,
    /// `versions`: each version a small change of the one before, so patches pay),
    /// published as a firmware release. Every node gets a `[[firmware]]` target of the
    /// release's name, starting from version 0 (see `firmware.rs`).
    Firmware,
}

/// A series of versions of one release, published over time.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSpec {
    pub kind: Kind,
    pub name: String,
    /// Data and generated firmware releases: bytes of each version (content drawn from
    /// the seed).
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Data and generated firmware releases: how many versions.
    #[serde(default)]
    pub versions: Option<u64>,
    /// Module and firmware releases: the file of each version, in order (version i is
    /// files[i-1]); relative to the scenario file, or to examples/modules of this
    /// repository.
    #[serde(default)]
    pub files: Vec<String>,
    /// Versions (1-based) known to crash-loop: the fleet must roll them back. For
    /// firmware, the device's activation hook fails for these versions.
    #[serde(default)]
    pub crashing: Vec<u64>,
    /// Firmware releases: publish patches from earlier versions too (the previous
    /// `firmware::DELTA_BASES_MAX`, version 0 included), as `mesh publish firmware
    /// --delta-from` does.
    #[serde(default)]
    pub deltas: bool,
    /// Seconds after the start between which the versions are published.
    pub window_s: [f64; 2],
}

impl ReleaseSpec {
    pub fn version_count(&self) -> u64 {
        match self.kind {
            Kind::Module => self.files.len() as u64,
            Kind::Firmware if !self.files.is_empty() => self.files.len() as u64,
            Kind::Data | Kind::Firmware => self.versions.unwrap_or(1),
        }
    }

    /// A firmware release whose images the harness draws from the seed.
    pub fn generated_firmware(&self) -> bool {
        self.kind == Kind::Firmware && self.files.is_empty()
    }
}

/// A kind of fault and how often, when and how hard the seed may apply it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// Occurrences to draw.
    #[serde(default = "one")]
    pub count: u32,
    /// Seconds after the start (or after a publish, with `after_publish`) between which
    /// each occurrence starts.
    pub start_s: [f64; 2],
    /// Seconds each occurrence lasts before it heals.
    pub length_s: [f64; 2],
    /// Nodes each occurrence hits (for a byzantine peer: nodes it dials).
    #[serde(default = "one_usize")]
    pub nodes: usize,
    /// Start relative to a publish of a data or firmware release drawn from the plan,
    /// so the fault lands while a transfer (or an install) is running: with `kill`,
    /// a power cut during an install.
    #[serde(default)]
    pub after_publish: bool,
    /// Partition: how many groups.
    #[serde(default = "two")]
    pub groups: usize,
    /// Loss: percent of packets dropped each way.
    #[serde(default = "twenty")]
    pub loss_percent: u8,
    /// Slow: the capped uplink rate, kbit/s.
    #[serde(default = "thousand")]
    pub rate_kbit: u32,
    /// Clock skew: the libfaketime offset, e.g. "+2h" or "-90m".
    #[serde(default = "two_hours")]
    pub skew: String,
}

fn one() -> u32 {
    1
}
fn one_usize() -> usize {
    1
}
fn two() -> usize {
    2
}
fn twenty() -> u8 {
    20
}
fn thousand() -> u32 {
    1000
}
fn two_hours() -> String {
    "+2h".into()
}
fn default_converge() -> u64 {
    60
}
fn default_rate() -> u32 {
    100
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub nodes: usize,
    /// Length of the workload and fault phase; every fault is healed by its end.
    pub duration_s: u64,
    /// Bound on convergence once every fault healed (an invariant fails past it).
    #[serde(default = "default_converge")]
    pub converge_s: u64,
    #[serde(default)]
    pub network: Network,
    /// Lab uplink rate per node when in network namespaces, Mbit/s.
    #[serde(default = "default_rate")]
    pub rate_mbit: u32,
    /// Extra `mesh agent` flags for every node.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// Text of a `mesh agent --config` file given to every node (restart policy, ticks).
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default, rename = "release")]
    pub releases: Vec<ReleaseSpec>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
    /// Where the file was read from, to resolve module files relative to it.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.len() > SCENARIO_BYTES_MAX {
            bail!(
                "reading scenario {}: over {SCENARIO_BYTES_MAX} bytes",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        let mut s = Scenario::parse(&text)
            .with_context(|| format!("parsing scenario {}", path.display()))?;
        s.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(s)
    }

    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.check()?;
        Ok(s)
    }

    /// Refuses scenarios the harness cannot run as written.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.nodes == 0 || self.nodes > RUN_NODES_MAX {
            bail!("nodes: between 1 and {RUN_NODES_MAX}");
        }
        if self.duration_s == 0 || self.duration_s > DURATION_S_MAX {
            bail!("duration_s: between 1 and {DURATION_S_MAX}");
        }
        if self.converge_s == 0 || self.converge_s > CONVERGE_S_MAX {
            bail!("converge_s: between 1 and {CONVERGE_S_MAX}");
        }
        let window = |w: [f64; 2], what: &str| -> anyhow::Result<()> {
            if !(w[0] >= 0.0 && w[1] >= w[0] && w[1] <= self.duration_s as f64) {
                bail!(
                    "{what}: [from, to] with 0 <= from <= to <= duration_s ({})",
                    self.duration_s
                );
            }
            Ok(())
        };
        let mut names = std::collections::BTreeSet::new();
        for r in &self.releases {
            mesh_actors::manifest::check_name(&r.name)
                .map_err(|e| anyhow::anyhow!("release {:?}: {e}", r.name))?;
            if !names.insert(r.name.clone()) {
                bail!("release {:?} is listed twice", r.name);
            }
            window(r.window_s, &format!("release {} window_s", r.name))?;
            let n = r.version_count();
            if n == 0 || n > VERSIONS_MAX {
                bail!("release {}: between 1 and {VERSIONS_MAX} versions", r.name);
            }
            match r.kind {
                Kind::Data => {
                    let b = r.bytes.unwrap_or(0);
                    if b == 0 || b > RELEASE_BYTES_MAX {
                        bail!(
                            "release {}: bytes between 1 and {RELEASE_BYTES_MAX}",
                            r.name
                        );
                    }
                }
                Kind::Module if r.files.is_empty() => {
                    bail!("release {}: a module release lists its files", r.name)
                }
                Kind::Firmware if r.files.is_empty() => {
                    let b = r.bytes.unwrap_or(0);
                    if b == 0 || b > crate::firmware::IMAGE_BYTES_MAX {
                        bail!(
                            "release {}: a firmware release lists its files, or gives bytes between 1 and {}",
                            r.name,
                            crate::firmware::IMAGE_BYTES_MAX
                        );
                    }
                }
                _ => {}
            }
            if r.deltas && r.kind != Kind::Firmware {
                bail!("release {}: only firmware carries patches", r.name);
            }
            if let Some(v) = r.crashing.iter().find(|v| **v == 0 || **v > n) {
                bail!("release {}: crashing version {v} is not published", r.name);
            }
        }
        for f in &self.faults {
            if f.count > FAULT_COUNT_MAX {
                bail!("fault {}: count at most {FAULT_COUNT_MAX}", f.kind);
            }
            if !f.after_publish {
                window(f.start_s, &format!("fault {} start_s", f.kind))?;
            }
            if !(f.length_s[0] > 0.0 && f.length_s[1] >= f.length_s[0]) {
                bail!("fault {} length_s: [min, max] with 0 < min <= max", f.kind);
            }
            if f.nodes == 0 || f.nodes > self.nodes {
                bail!("fault {} nodes: between 1 and the fleet size", f.kind);
            }
            if f.kind == FaultKind::Partition && (f.groups < 2 || f.groups > self.nodes) {
                bail!("fault partition groups: between 2 and the fleet size");
            }
            if f.loss_percent > 100 {
                bail!("fault loss loss_percent: at most 100");
            }
            if f.kind == FaultKind::PowerCut
                && !self.releases.iter().any(|r| r.kind == Kind::Firmware)
            {
                bail!("fault power_cut: needs a firmware release to cut an install of");
            }
            if f.after_publish && !self.releases.iter().any(|r| r.kind != Kind::Module) {
                bail!(
                    "fault {}: after_publish needs a data or firmware release to follow",
                    f.kind
                );
            }
        }
        Ok(())
    }

    /// Resolves a module file: beside the scenario, else in this repository's
    /// examples/modules.
    pub fn module_file(&self, file: &str) -> PathBuf {
        let near = self.dir.join(file);
        if near.exists() {
            return near;
        }
        examples_dir().join(file)
    }
}

/// examples/modules of the repository this harness was built from.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/modules")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
                for r in s.releases.iter().filter(|r| r.kind != Kind::Data) {
                    for f in &r.files {
                        assert!(s.module_file(f).exists(), "{}: no file {f}", s.name);
                    }
                }
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} scenarios shipped");
    }

    #[test]
    fn bad_scenarios_are_refused_with_a_reason() {
        let base = "name = \"x\"\nnodes = 3\nduration_s = 10\n";
        assert!(Scenario::parse(base).is_ok());
        let err = Scenario::parse(&format!("{base}bogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Scenario::parse(&format!(
            "{base}[[fault]]\nkind = \"kill\"\nstart_s = [5, 20]\nlength_s = [1, 2]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("start_s"), "{err}");
        let err = Scenario::parse(&format!(
            "{base}[[release]]\nkind = \"data\"\nname = \"Bad Name\"\nbytes = 10\nwindow_s = [0, 1]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("Bad Name"), "{err}");
    }
}
