//! The plan of a run, drawn from a seed: every publish and every fault with its time,
//! its nodes and its parameters. `Plan::draw` is pure (no clock, no IO), so the same
//! seed, scenario and fleet size always give the same plan, and a run replays.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::scenario::{FaultKind, Kind, Scenario};

/// Events one plan may hold, so a mistyped count cannot plan a run that never ends.
pub const PLAN_EVENTS_MAX: usize = 20_000;
/// Draws tried to place one fault where its nodes are free before it is left out.
const PLACE_ATTEMPTS_MAX: u32 = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds after the workload started.
    pub at_ms: u64,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Publish version `version` of release series `release` (an index into the
    /// scenario's releases) through node `via` (or the next running node).
    Publish {
        release: usize,
        name: String,
        version: u64,
        via: usize,
    },
    /// Fault `id` starts.
    Start(Fault),
    /// Fault `id` heals.
    Heal { id: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub id: u32,
    pub kind: FaultKind,
    /// The nodes it hits (for a partition, every node; for a byzantine peer, the nodes
    /// it dials).
    pub nodes: Vec<usize>,
    /// Partition only: the groups, each a sorted list of nodes.
    pub groups: Vec<Vec<usize>>,
    pub loss_percent: u8,
    pub rate_kbit: u32,
    pub skew: String,
    /// A seed for what the fault draws while it runs (which blob to damage, what the
    /// byzantine peer forges).
    pub seed: u64,
    pub start_ms: u64,
    pub heal_ms: u64,
}

/// Which faults may not overlap on one node: a node is killed or paused or out of disk
/// at a time, and its network is partitioned or lossy or slow at a time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Process,
    Network,
    Outsider,
}

fn class(kind: FaultKind) -> Class {
    match kind {
        FaultKind::Partition | FaultKind::Loss | FaultKind::Slow => Class::Network,
        FaultKind::Byzantine => Class::Outsider,
        _ => Class::Process,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub seed: u64,
    pub nodes: usize,
    /// In time order; a heal never precedes its start.
    pub events: Vec<Event>,
    /// Faults that found no free slot, with the reason, so a report says so.
    pub unplaced: Vec<String>,
}

impl Plan {
    pub fn draw(seed: u64, scenario: &Scenario, nodes: usize) -> anyhow::Result<Plan> {
        let mut rng = StdRng::seed_from_u64(seed);
        let end_ms = scenario.duration_s * 1000;
        let mut events: Vec<Event> = Vec::new();

        // Publishes: each series' versions at sorted uniform times in its window.
        let mut data_publishes: Vec<u64> = Vec::new();
        for (ri, r) in scenario.releases.iter().enumerate() {
            let n = r.version_count();
            let mut times: Vec<u64> = (0..n)
                .map(|_| ms(rng.gen_range(r.window_s[0]..=r.window_s[1])))
                .collect();
            times.sort_unstable();
            for (k, at) in times.into_iter().enumerate() {
                let via = rng.gen_range(0..nodes);
                // Faults that follow a publish land in transfers and installs, which
                // modules (a few KiB, installed at once) hardly have.
                if r.kind != Kind::Module {
                    data_publishes.push(at);
                }
                events.push(Event {
                    at_ms: at,
                    action: Action::Publish {
                        release: ri,
                        name: r.name.clone(),
                        version: k as u64 + 1,
                        via,
                    },
                });
            }
        }

        // Faults, placed where their nodes are free of faults of the same class.
        let mut busy: BTreeMap<(Class, usize), Vec<(u64, u64)>> = BTreeMap::new();
        let mut unplaced = Vec::new();
        let mut next_id = 0u32;
        for spec in &scenario.faults {
            for occurrence in 0..spec.count {
                let mut placed = None;
                for _ in 0..PLACE_ATTEMPTS_MAX {
                    let base = if spec.after_publish && !data_publishes.is_empty() {
                        data_publishes[rng.gen_range(0..data_publishes.len())]
                    } else {
                        0
                    };
                    let start = base + ms(rng.gen_range(spec.start_s[0]..=spec.start_s[1]));
                    let length = ms(rng.gen_range(spec.length_s[0]..=spec.length_s[1])).max(1);
                    // Every fault heals within the workload phase, so convergence is
                    // measured from one known point.
                    let heal = (start + length).min(end_ms);
                    if heal <= start {
                        continue;
                    }
                    let mut all: Vec<usize> = (0..nodes).collect();
                    all.shuffle(&mut rng);
                    let (hit, groups) = match spec.kind {
                        FaultKind::Partition => {
                            let groups = split(&all, spec.groups.min(nodes));
                            let mut hit = all.clone();
                            hit.sort_unstable();
                            (hit, groups)
                        }
                        _ => {
                            let mut hit: Vec<usize> = all[..spec.nodes.min(nodes)].to_vec();
                            hit.sort_unstable();
                            (hit, Vec::new())
                        }
                    };
                    let c = class(spec.kind);
                    // The byzantine peer is one outsider: one at a time, whichever nodes.
                    let keys: Vec<(Class, usize)> = if c == Class::Outsider {
                        vec![(c, 0)]
                    } else {
                        hit.iter().map(|n| (c, *n)).collect()
                    };
                    let free = keys.iter().all(|k| {
                        busy.get(k).is_none_or(|spans| {
                            spans.iter().all(|(s, e)| heal <= *s || start >= *e)
                        })
                    });
                    if !free {
                        continue;
                    }
                    for k in keys {
                        busy.entry(k).or_default().push((start, heal));
                    }
                    placed = Some(Fault {
                        id: next_id,
                        kind: spec.kind,
                        nodes: hit,
                        groups,
                        loss_percent: spec.loss_percent,
                        rate_kbit: spec.rate_kbit,
                        skew: spec.skew.clone(),
                        seed: rng.gen(),
                        start_ms: start,
                        heal_ms: heal,
                    });
                    break;
                }
                match placed {
                    Some(f) => {
                        next_id += 1;
                        events.push(Event {
                            at_ms: f.heal_ms,
                            action: Action::Heal { id: f.id },
                        });
                        events.push(Event {
                            at_ms: f.start_ms,
                            action: Action::Start(f),
                        });
                    }
                    None => unplaced.push(format!(
                        "{} #{}: no time slot with its nodes free after {PLACE_ATTEMPTS_MAX} draws",
                        spec.kind,
                        occurrence + 1
                    )),
                }
                if events.len() > PLAN_EVENTS_MAX {
                    anyhow::bail!("drawing the plan: more than {PLAN_EVENTS_MAX} events");
                }
            }
        }
        // Time order; at one instant heals come first (a slot freed and taken at the
        // same millisecond), then starts, then publishes; ties keep insertion order.
        events.sort_by_key(|e| {
            let rank = match e.action {
                Action::Heal { .. } => 0,
                Action::Start(_) => 1,
                Action::Publish { .. } => 2,
            };
            (e.at_ms, rank)
        });
        Ok(Plan {
            seed,
            nodes,
            events,
            unplaced,
        })
    }

    pub fn faults(&self) -> impl Iterator<Item = &Fault> {
        self.events.iter().filter_map(|e| match &e.action {
            Action::Start(f) => Some(f),
            _ => None,
        })
    }

    pub fn has(&self, kind: FaultKind) -> bool {
        self.faults().any(|f| f.kind == kind)
    }
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

/// Splits shuffled nodes into `k` non-empty groups of near-equal size.
fn split(shuffled: &[usize], k: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, n) in shuffled.iter().enumerate() {
        groups[i % k].push(*n);
    }
    for g in &mut groups {
        g.sort_unstable();
    }
    groups.sort();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario::parse(
            r#"
name = "mixed"
nodes = 5
duration_s = 60
[[release]]
kind = "data"
name = "model"
bytes = 1000
versions = 4
window_s = [1, 40]
[[fault]]
kind = "kill"
count = 4
start_s = [2, 50]
length_s = [1, 5]
[[fault]]
kind = "partition"
count = 2
start_s = [2, 50]
length_s = [3, 8]
groups = 2
[[fault]]
kind = "pause"
count = 2
start_s = [0, 3]
length_s = [1, 2]
after_publish = true
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let s = scenario();
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(
                Plan::draw(seed, &s, 5).unwrap(),
                Plan::draw(seed, &s, 5).unwrap()
            );
        }
    }

    #[test]
    fn different_seeds_give_different_plans() {
        let s = scenario();
        let plans: Vec<Plan> = (0..8)
            .map(|seed| Plan::draw(seed, &s, 5).unwrap())
            .collect();
        for i in 0..plans.len() {
            for j in i + 1..plans.len() {
                assert_ne!(plans[i].events, plans[j].events, "seeds {i} and {j}");
            }
        }
    }

    #[test]
    fn plans_are_ordered_bounded_and_never_overlap_on_a_node() {
        let s = scenario();
        for seed in 0..200 {
            let plan = Plan::draw(seed, &s, 5).unwrap();
            let mut last = 0;
            let mut started = std::collections::BTreeSet::new();
            for e in &plan.events {
                assert!(e.at_ms >= last, "seed {seed}: out of order");
                last = e.at_ms;
                match &e.action {
                    Action::Start(f) => {
                        assert!(f.heal_ms <= s.duration_s * 1000);
                        assert!(f.nodes.iter().all(|n| *n < 5));
                        if f.kind == FaultKind::Partition {
                            assert_eq!(f.groups.len(), 2);
                            assert!(f.groups.iter().all(|g| !g.is_empty()));
                        }
                        started.insert(f.id);
                    }
                    Action::Heal { id } => assert!(started.contains(id), "seed {seed}"),
                    Action::Publish { via, .. } => assert!(*via < 5),
                }
            }
            let faults: Vec<&Fault> = plan.faults().collect();
            for a in &faults {
                for b in &faults {
                    if a.id < b.id
                        && class(a.kind) == class(b.kind)
                        && a.nodes.iter().any(|n| b.nodes.contains(n))
                    {
                        assert!(
                            a.heal_ms <= b.start_ms || b.heal_ms <= a.start_ms,
                            "seed {seed}: {a:?} overlaps {b:?}"
                        );
                    }
                }
            }
            // Versions of a series are published in order.
            let versions: Vec<u64> = plan
                .events
                .iter()
                .filter_map(|e| match &e.action {
                    Action::Publish { version, .. } => Some(*version),
                    _ => None,
                })
                .collect();
            assert_eq!(versions, vec![1, 2, 3, 4]);
        }
    }
}
