//! The invariants checked at the end of a run, from what the nodes answered over the
//! admin protocol and what is on their disks. Each returns an `InvariantResult` saying
//! what it asserts, whether it held, and for a failure which node and why, with an
//! excerpt of that node's log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mesh::proto::{ModulesInfo, ReleaseInfo};
use mesh_actors::peers::{PeerState, PeerView};
use mesh_actors::sandbox_supervisor::ModuleState;
use mesh_transport::ContentId;

use crate::byzantine::Forged;
use crate::faults::{blob_files, Damaged};
use crate::firmware::{self, SlotView};
use crate::report::{Excerpt, Incident, InvariantResult, PublishRecord, Status};

/// Log lines quoted for an offending node.
const EXCERPT_LINES: usize = 12;
/// Detail lines kept per invariant; the rest are counted.
const DETAILS_MAX: usize = 20;

/// What every node answered at the end.
#[derive(Default)]
pub struct Final {
    pub releases: Vec<Option<Vec<ReleaseInfo>>>,
    pub modules: Vec<Option<ModulesInfo>>,
    pub peers: Vec<Option<Vec<PeerView>>>,
    /// Per node: whether it holds each acknowledged newest content completely.
    pub holds: Vec<BTreeMap<ContentId, bool>>,
    /// Per node and firmware target: its slot record, checked against the slot files.
    pub firmware: Vec<BTreeMap<String, SlotView>>,
}

/// What the module invariant expects of one module name.
#[derive(Clone, Debug)]
pub struct ModuleExpect {
    pub newest: u64,
    pub crashing: bool,
    /// The version before the newest, which a node that held it rolls back to.
    pub previous: Option<u64>,
}

/// The last lines of a node's log that say something went wrong, or its last lines.
pub fn excerpt(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let bad: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .copied()
        .collect();
    let pick = if bad.is_empty() { &lines } else { &bad };
    pick[pick.len().saturating_sub(EXCERPT_LINES)..].join("\n")
}

pub(crate) fn result(
    name: &str,
    statement: String,
    mut failures: Vec<(Option<usize>, String)>,
    logs: &[PathBuf],
) -> InvariantResult {
    let status = if failures.is_empty() {
        Status::Held
    } else {
        Status::Failed
    };
    let extra = failures.len().saturating_sub(DETAILS_MAX);
    failures.truncate(DETAILS_MAX);
    let offenders: BTreeSet<usize> = failures.iter().filter_map(|(n, _)| *n).collect();
    let mut details: Vec<String> = failures
        .into_iter()
        .map(|(n, d)| match n {
            Some(n) => format!("node{n}: {d}"),
            None => d,
        })
        .collect();
    if extra > 0 {
        details.push(format!("... and {extra} more"));
    }
    let excerpts = offenders
        .into_iter()
        .take(3)
        .filter_map(|n| logs.get(n).map(|l| (n, l)))
        .map(|(node, l)| Excerpt {
            node,
            text: excerpt(l),
        })
        .collect();
    InvariantResult {
        name: name.into(),
        statement,
        status,
        details,
        excerpts,
    }
}

/// The newest acknowledged version and content of every release name.
pub fn newest_acked(publishes: &[PublishRecord]) -> BTreeMap<String, (u64, ContentId)> {
    let mut out: BTreeMap<String, (u64, ContentId)> = BTreeMap::new();
    for p in publishes.iter().filter(|p| p.ok) {
        let Ok(id) = p.content.parse::<ContentId>() else {
            continue;
        };
        let e = out.entry(p.name.clone()).or_insert((p.version, id));
        if p.version >= e.0 {
            *e = (p.version, id);
        }
    }
    out
}

pub fn convergence(
    convergence_ms: Option<u64>,
    bound_s: u64,
    fin: &Final,
    acked: &BTreeMap<String, (u64, ContentId)>,
    logs: &[PathBuf],
) -> InvariantResult {
    let mut failures = Vec::new();
    if convergence_ms.is_none() {
        for (n, rel) in fin.releases.iter().enumerate() {
            let Some(rel) = rel else {
                failures.push((Some(n), "did not answer".to_string()));
                continue;
            };
            for (name, (v, _)) in acked {
                let have = rel.iter().find(|r| &r.name == name).map(|r| r.version);
                if have.is_none_or(|h| h < *v) {
                    failures.push((
                        Some(n),
                        format!(
                            "{name}: holds {} instead of v{v}",
                            have.map(|h| format!("v{h}")).unwrap_or("nothing".into())
                        ),
                    ));
                }
            }
        }
        if failures.is_empty() {
            failures.push((None, "membership or modules did not settle".into()));
        }
    }
    let took = convergence_ms
        .map(|c| format!(" (took {:.1} s)", c as f64 / 1000.0))
        .unwrap_or_default();
    result(
        "convergence",
        format!("every live node holds the newest acknowledged release of each name, runs what it should and sees every other node, within {bound_s} s of the last heal{took}"),
        failures,
        logs,
    )
}

pub fn acknowledged_not_lost(
    fin: &Final,
    publishes: &[PublishRecord],
    fw_expect: &BTreeMap<String, firmware::Expect>,
    logs: &[PathBuf],
) -> InvariantResult {
    let acked = newest_acked(publishes);
    let mut failures = Vec::new();
    for (n, rel) in fin.releases.iter().enumerate() {
        let Some(rel) = rel else {
            failures.push((Some(n), "did not answer".to_string()));
            continue;
        };
        for p in publishes.iter().filter(|p| p.ok) {
            let have = rel.iter().find(|r| r.name == p.name).map(|r| r.version);
            if have.is_none_or(|h| h < p.version) {
                failures.push((
                    Some(n),
                    format!(
                        "{} v{} (acknowledged at {:.1} s) is missing",
                        p.name,
                        p.version,
                        p.t_ms as f64 / 1000.0
                    ),
                ));
            }
        }
        for (name, (v, id)) in &acked {
            if let Some(e) = fw_expect.get(name) {
                // Firmware is kept in the slots (a node that patched never held the
                // whole image). A crashing newest version is left to `firmware`.
                if e.newest_crashing.is_none() {
                    let confirmed = fin
                        .firmware
                        .get(n)
                        .and_then(|t| t.get(name))
                        .and_then(|v| v.as_ref().ok())
                        .and_then(|r| r.confirmed_image().map(|i| i.content));
                    if confirmed != Some(*id) {
                        failures.push((
                            Some(n),
                            format!(
                                "{name} v{v}: image {} is not in a confirmed slot",
                                id.short()
                            ),
                        ));
                    }
                }
                continue;
            }
            if fin.holds.get(n).and_then(|h| h.get(id)) != Some(&true) {
                failures.push((
                    Some(n),
                    format!("{name} v{v}: blob {} is not held completely", id.short()),
                ));
            }
        }
    }
    let count = publishes.iter().filter(|p| p.ok).count();
    result(
        "acknowledged_not_lost",
        format!("every release whose publish was acknowledged ({count}) is installed on every node, and the newest of each name is held completely (firmware: in a confirmed slot)"),
        failures,
        logs,
    )
}

/// Re-hashes every blob file on every node against its name. Files the harness
/// damaged itself are left to `damaged_not_served`.
pub fn verified_storage(
    states: &[PathBuf],
    damaged: &[Damaged],
    logs: &[PathBuf],
) -> InvariantResult {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (n, state) in states.iter().enumerate() {
        for (path, name) in blob_files(state) {
            if damaged
                .iter()
                .any(|d| d.node == n && d.id.to_string() == name)
            {
                continue;
            }
            checked += 1;
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let actual = ContentId::of(&bytes).to_string();
                    if actual != name {
                        failures.push((Some(n), format!("{} hashes to {actual}", path.display())));
                    }
                }
                Err(e) => failures.push((Some(n), format!("reading {}: {e}", path.display()))),
            }
        }
    }
    result(
        "verified_storage",
        format!("every blob file on every node ({checked} checked) hashes to its name"),
        failures,
        logs,
    )
}

pub fn damaged_not_served(damaged: &[Damaged], logs: &[PathBuf]) -> InvariantResult {
    if damaged.is_empty() {
        return not_checked("damaged_not_served", "no blob was damaged in this run");
    }
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    for d in damaged {
        match d.bad_groups_served {
            Some(0) => notes.push(d.probe_note.clone()),
            Some(_) => failures.push((Some(d.node), d.probe_note.clone())),
            None => notes.push(format!("not probed: {}", d.probe_note)),
        }
    }
    let mut r = result(
        "damaged_not_served",
        "a node never serves groups of a blob damaged on its disk that fail verification".into(),
        failures,
        logs,
    );
    r.details.extend(notes);
    r
}

/// Whether the node a blob was damaged on holds it verified again; `None` when no
/// other node holds it either, so there was nothing to repair it from.
pub fn repaired(d: &Damaged, states: &[PathBuf]) -> Option<bool> {
    let fixed = std::fs::read(&d.path).is_ok_and(|b| ContentId::of(&b) == d.id);
    let elsewhere = states
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != d.node)
        .any(|(_, s)| {
            blob_files(s)
                .iter()
                .any(|(_, name)| *name == d.id.to_string())
        });
    (fixed || elsewhere).then_some(fixed)
}

/// Every blob the harness damaged was quarantined and fetched again: the node holds the
/// verified blob once more (unless no other node held it to fetch from).
pub fn damaged_repaired(
    damaged: &[Damaged],
    states: &[PathBuf],
    logs: &[PathBuf],
) -> InvariantResult {
    if damaged.is_empty() {
        return not_checked("damaged_repaired", "no blob was damaged in this run");
    }
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    for d in damaged {
        match repaired(d, states) {
            Some(true) => {}
            Some(false) => failures.push((
                Some(d.node),
                format!("blob {} is still damaged or missing", d.id.short()),
            )),
            None => notes.push(format!(
                "node{}: blob {} was held by no other node, so it could not be fetched again",
                d.node,
                d.id.short()
            )),
        }
        let quarantined = states
            .get(d.node)
            .is_some_and(|s| s.join("store/quarantine").join(d.id.to_string()).exists());
        if quarantined {
            notes.push(format!(
                "node{}: the damaged file of {} is in quarantine",
                d.node,
                d.id.short()
            ));
        }
    }
    let mut r = result(
        "damaged_repaired",
        format!(
            "every blob damaged on a node's disk ({}) is quarantined and fetched again: the node holds the verified blob once more",
            damaged.len()
        ),
        failures,
        logs,
    );
    r.details.extend(notes);
    r
}

pub fn byzantine_rejected(
    ran: bool,
    forged: &[Forged],
    seen: &[Vec<ReleaseInfo>],
    states: &[PathBuf],
    logs: &[PathBuf],
) -> InvariantResult {
    if !ran {
        return not_checked("byzantine_rejected", "no byzantine peer ran");
    }
    let bad_versions: BTreeSet<(String, u64)> =
        forged.iter().map(|f| (f.name.clone(), f.version)).collect();
    let bad_content: BTreeSet<String> = forged.iter().map(|f| f.content.to_string()).collect();
    let mut failures = Vec::new();
    for (n, list) in seen.iter().enumerate() {
        for r in list {
            if bad_versions.contains(&(r.name.clone(), r.version))
                || bad_content.contains(&r.content.to_string())
            {
                failures.push((
                    Some(n),
                    format!("accepted forged {} v{}", r.name, r.version),
                ));
            }
        }
    }
    for (n, state) in states.iter().enumerate() {
        for (_, name) in blob_files(state) {
            if bad_content.contains(&name) {
                failures.push((Some(n), format!("stores the forged content {name}")));
            }
        }
    }
    let penalized: usize = logs
        .iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter(|x| x.contains("penalizing peer"))
                .count()
        })
        .sum();
    let mut r = result(
        "byzantine_rejected",
        format!("no forged or replayed manifest from the byzantine peer ({} forged) was ever listed by a node, and none of its content was stored", forged.len()),
        failures,
        logs,
    );
    r.details.push(format!(
        "nodes logged {penalized} penalties against peers that sent bad data"
    ));
    r
}

/// The module each node should run: the newest acknowledged version, or when that one
/// crash-loops, the previous one on nodes that held it (rolled back, with a reason).
pub fn modules(
    fin: &Final,
    expect: &BTreeMap<String, ModuleExpect>,
    held_before: &[BTreeMap<String, BTreeSet<u64>>],
    logs: &[PathBuf],
) -> InvariantResult {
    if expect.is_empty() {
        return not_checked("modules", "no module was published");
    }
    let mut failures = Vec::new();
    for (n, m) in fin.modules.iter().enumerate() {
        let Some(m) = m else {
            failures.push((Some(n), "did not answer".to_string()));
            continue;
        };
        for (name, e) in expect {
            let running: Vec<_> = m
                .local
                .modules
                .iter()
                .filter(|s| &s.name == name && s.state == ModuleState::Running)
                .collect();
            if !e.crashing {
                if !running.iter().any(|s| s.version == e.newest) {
                    failures.push((Some(n), format!("{name} v{} is not running", e.newest)));
                }
                continue;
            }
            if running.iter().any(|s| s.version == e.newest) {
                failures.push((
                    Some(n),
                    format!(
                        "{name} v{} crash-loops but is still listed running",
                        e.newest
                    ),
                ));
            }
            let held_prev = e.previous.is_some_and(|p| {
                held_before
                    .get(n)
                    .and_then(|h| h.get(name))
                    .is_some_and(|v| v.contains(&p))
            });
            if held_prev {
                let prev = e.previous.unwrap_or(0);
                let rolled = running.iter().find(|s| s.version == prev);
                match rolled.and_then(|s| s.rolled_back_from.as_ref()) {
                    Some(r) if r.version == e.newest && !r.reason.trim().is_empty() => {}
                    Some(r) => failures.push((
                        Some(n),
                        format!(
                            "{name}: rolled back from v{} with reason {:?}",
                            r.version, r.reason
                        ),
                    )),
                    None => failures.push((
                        Some(n),
                        format!("{name}: not rolled back to v{prev}, which it held"),
                    )),
                }
            }
        }
    }
    result(
        "modules",
        "every node runs the newest module version, except that a crash-looping version is stopped and rolled back to the previous one wherever the previous one was installed".into(),
        failures,
        logs,
    )
}

pub fn rollbacks_recorded(fin: &Final, logs: &[PathBuf]) -> InvariantResult {
    let mut failures = Vec::new();
    let mut seen = 0;
    for (n, m) in fin.modules.iter().enumerate() {
        let Some(m) = m else { continue };
        for s in &m.local.modules {
            if let Some(r) = &s.rolled_back_from {
                seen += 1;
                if r.reason.trim().is_empty() {
                    failures.push((
                        Some(n),
                        format!(
                            "{} rolled back from v{} without a reason",
                            s.name, r.version
                        ),
                    ));
                }
            }
        }
        for f in &m.failures {
            if f.report.reason.trim().is_empty() {
                failures.push((
                    Some(n),
                    format!(
                        "failure report of {} v{} has no reason",
                        f.report.name, f.report.version
                    ),
                ));
            }
        }
    }
    for (n, targets) in fin.firmware.iter().enumerate() {
        for (name, view) in targets {
            let Some(rb) = view.as_ref().ok().and_then(|r| r.last_rollback.as_ref()) else {
                continue;
            };
            seen += 1;
            if rb.reason.trim().is_empty() {
                failures.push((
                    Some(n),
                    format!(
                        "firmware {name} switched back from v{} without a reason",
                        rb.from.version
                    ),
                ));
            }
        }
    }
    result(
        "rollbacks_recorded",
        format!("every rollback ({seen} seen, modules and firmware) and every failure report records a reason"),
        failures,
        logs,
    )
}

pub fn membership(fin: &Final, peer_ids: &[String], logs: &[PathBuf]) -> InvariantResult {
    let mut failures = Vec::new();
    for (n, peers) in fin.peers.iter().enumerate() {
        let Some(peers) = peers else {
            failures.push((Some(n), "did not answer".to_string()));
            continue;
        };
        for (m, id) in peer_ids.iter().enumerate() {
            if m == n {
                continue;
            }
            let alive = peers
                .iter()
                .any(|p| &p.peer_id == id && p.state == PeerState::Alive);
            if !alive {
                failures.push((Some(n), format!("does not see node{m} alive")));
            }
        }
    }
    result(
        "membership",
        "every node sees every other node alive".into(),
        failures,
        logs,
    )
}

pub fn nodes_stay_up(incidents: &[Incident], logs: &[PathBuf]) -> InvariantResult {
    let failures = incidents
        .iter()
        .filter(|i| i.what.starts_with("exited"))
        .map(|i| {
            (
                i.node,
                format!("{} at {:.1} s", i.what, i.t_ms as f64 / 1000.0),
            )
        })
        .collect();
    result(
        "nodes_stay_up",
        "no node process exits unless the harness kills it".into(),
        failures,
        logs,
    )
}

/// Every node's every firmware target has a record that is consistent, with the
/// confirmed and the active slots holding exactly the images it names, at the end and
/// at every check during the workload.
pub fn bootable_slot(
    fin: &Final,
    targets: &[firmware::Target],
    during: &[(u64, usize, String)],
    logs: &[PathBuf],
) -> InvariantResult {
    if targets.is_empty() {
        return not_checked("bootable_slot", "no firmware target in this run");
    }
    let mut failures: Vec<(Option<usize>, String)> = during
        .iter()
        .map(|(t, n, what)| (Some(*n), format!("at {:.1} s: {what}", *t as f64 / 1000.0)))
        .collect();
    for (n, views) in fin.firmware.iter().enumerate() {
        for t in targets {
            match views.get(&t.name) {
                Some(Ok(_)) => {}
                Some(Err(why)) => failures.push((Some(n), format!("{}: {why}", t.name))),
                None => failures.push((Some(n), format!("{}: not read", t.name))),
            }
        }
    }
    result(
        "bootable_slot",
        format!(
            "every node keeps a verified bootable slot for each firmware target ({}): its record is consistent and the confirmed and active slots hash to the images it names, at the end and during the run",
            targets.len()
        ),
        failures,
        logs,
    )
}

/// Every node's firmware targets settle, confirmed, on the newest acknowledged version
/// that does not crash; a node that switched back from a crashing one says why.
pub fn firmware(
    fin: &Final,
    expect: &BTreeMap<String, firmware::Expect>,
    logs: &[PathBuf],
) -> InvariantResult {
    if expect.is_empty() {
        return not_checked("firmware", "no firmware target in this run");
    }
    let mut failures = Vec::new();
    let mut rolled = 0;
    for (n, views) in fin.firmware.iter().enumerate() {
        for (name, e) in expect {
            let Some(view) = views.get(name) else {
                failures.push((Some(n), format!("{name}: not read")));
                continue;
            };
            if let Err(why) = firmware::settled(view, e) {
                failures.push((Some(n), format!("{name}: {why}")));
            }
            let rb = view.as_ref().ok().and_then(|r| r.last_rollback.as_ref());
            if let (Some(bad), Some(rb)) = (e.newest_crashing, rb) {
                if rb.from.version == bad {
                    rolled += 1;
                }
            }
        }
    }
    let wanted: Vec<String> = expect
        .iter()
        .map(|(name, e)| match e.newest_crashing {
            Some(bad) => format!("{name} v{} (v{bad} crashes)", e.version),
            None => format!("{name} v{}", e.version),
        })
        .collect();
    let mut r = result(
        "firmware",
        format!(
            "every node settles confirmed on the newest acknowledged firmware that does not crash: {}",
            wanted.join(", ")
        ),
        failures,
        logs,
    );
    if expect.values().any(|e| e.newest_crashing.is_some()) {
        r.details.push(format!(
            "{rolled} node target(s) switched back from the crashing newest version"
        ));
    }
    r
}

pub fn not_checked(name: &str, why: &str) -> InvariantResult {
    InvariantResult {
        name: name.into(),
        statement: why.into(),
        status: Status::NotChecked,
        details: Vec::new(),
        excerpts: Vec::new(),
    }
}
