//! Module message traffic in a chaos run: the publish and delivery counters of every
//! node's modules (`mesh modules` usage figures), sampled during the run, turned into
//! rates around each fault and into the `messages_flow` invariant.
//!
//! The counters live in a node's memory and start again at zero when it restarts, so
//! what a node did between two samples is the increase, or, after a drop, the new value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mesh::proto::ModulesInfo;
use serde::Serialize;

use crate::invariants::not_checked;
use crate::report::{FaultRecord, InvariantResult, Status};

/// Samples kept per run; past this the oldest half is thinned, so a soak stays bounded.
pub const SAMPLES_MAX: usize = 20_000;

/// One node's module counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub node: usize,
    /// Messages its modules published, in all.
    pub published: u64,
    /// Messages delivered to its modules, in all.
    pub delivered: u64,
    /// Whether any of its modules subscribes to a topic.
    pub subscribed: bool,
}

impl Sample {
    pub fn of(t_ms: u64, node: usize, m: &ModulesInfo) -> Sample {
        let mods = &m.local.modules;
        Sample {
            t_ms,
            node,
            published: mods.iter().map(|s| s.usage.published).sum(),
            delivered: mods.iter().map(|s| s.usage.delivered).sum(),
            subscribed: mods.iter().any(|s| !s.subscriptions.is_empty()),
        }
    }
}

/// Keeps at most [`SAMPLES_MAX`] samples: when full, every other one of the older half
/// goes.
pub fn push(samples: &mut Vec<Sample>, s: Sample) {
    if samples.len() >= SAMPLES_MAX {
        let half = samples.len() / 2;
        let mut k = 0;
        samples.retain(|_| {
            k += 1;
            k > half || k % 2 == 0
        });
    }
    samples.push(s);
}

/// What a node's counters rose by between `from_ms` and `to_ms` (published,
/// delivered), counting a restart's reset as a rise from zero.
pub fn increase(samples: &[Sample], node: usize, from_ms: u64, to_ms: u64) -> (u64, u64) {
    let mut prev: Option<&Sample> = None;
    let (mut p, mut d) = (0, 0);
    for s in samples.iter().filter(|s| s.node == node) {
        if s.t_ms > to_ms {
            break;
        }
        if let Some(q) = prev.filter(|_| s.t_ms > from_ms) {
            p += rise(q.published, s.published);
            d += rise(q.delivered, s.delivered);
        }
        prev = Some(s);
    }
    (p, d)
}

fn rise(before: u64, after: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

/// Fleet-wide deliveries per second within `from_ms..to_ms`.
pub fn delivered_per_s(samples: &[Sample], nodes: usize, from_ms: u64, to_ms: u64) -> f64 {
    let d: u64 = (0..nodes)
        .map(|n| increase(samples, n, from_ms, to_ms).1)
        .sum();
    d as f64 * 1000.0 / to_ms.saturating_sub(from_ms).max(1) as f64
}

/// Notes on each fault how many messages the fleet delivered per second before, during
/// and after it (each over the fault's own length).
pub fn annotate(faults: &mut [FaultRecord], samples: &[Sample], nodes: usize) {
    if samples.iter().all(|s| s.published == 0 && s.delivered == 0) {
        return;
    }
    for f in faults.iter_mut() {
        let (Some(start), Some(heal)) = (f.start_ms, f.heal_ms) else {
            continue;
        };
        let len = heal.saturating_sub(start).max(1);
        let rate = |a: u64, b: u64| delivered_per_s(samples, nodes, a, b);
        f.traffic = Some(format!(
            "module messages delivered {:.1}/s before, {:.1}/s during, {:.1}/s after",
            rate(start.saturating_sub(len), start),
            rate(start, heal),
            rate(heal, heal + len)
        ));
    }
}

/// Messages flow between nodes once every fault healed: over the final window, every
/// node whose modules subscribe received more messages than its own modules published
/// (so some came from other nodes), whenever other nodes published.
pub fn messages_flow(
    samples: &[Sample],
    nodes: usize,
    window: (u64, u64),
    logs: &[PathBuf],
) -> InvariantResult {
    if samples.iter().all(|s| s.published == 0) {
        return not_checked("messages_flow", "no module published messages in this run");
    }
    let (from, to) = window;
    let rises: BTreeMap<usize, (u64, u64)> = (0..nodes)
        .map(|n| (n, increase(samples, n, from, to)))
        .collect();
    let total_published: u64 = rises.values().map(|(p, _)| p).sum();
    // An empty window (the fleet never settled) or one in which nothing was published
    // shows nothing about flow; it must not pass as if it did.
    if to <= from || total_published == 0 {
        return crate::invariants::result(
            "messages_flow",
            "module messages flow between nodes after every fault healed".to_string(),
            vec![(
                None,
                format!(
                    "no module published in the final window ({:.1} s): either the fleet never settled or the publishers stopped",
                    to.saturating_sub(from) as f64 / 1000.0
                ),
            )],
            logs,
        );
    }
    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for (n, (p, d)) in &rises {
        let subscribed = samples
            .iter()
            .rev()
            .find(|s| s.node == *n)
            .is_some_and(|s| s.subscribed);
        lines.push(format!("node{n}: published {p}, delivered {d}"));
        if subscribed && total_published > *p && d <= p {
            failures.push((
                Some(*n),
                format!(
                    "received {d} messages while the others published {}: none came from them",
                    total_published - p
                ),
            ));
        }
    }
    let totals: (u64, u64) = (0..nodes)
        .map(|n| increase(samples, n, 0, u64::MAX))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let mut r = crate::invariants::result(
        "messages_flow",
        format!(
            "module messages flow between nodes after every fault healed: each subscribing node receives messages published elsewhere ({} published, {} delivered in the run)",
            totals.0, totals.1
        ),
        failures,
        logs,
    );
    if r.status == Status::Held {
        r.details.push(format!(
            "over the last {:.1} s: {}",
            (to - from) as f64 / 1000.0,
            lines.join("; ")
        ));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_ms: u64, node: usize, published: u64, delivered: u64) -> Sample {
        Sample {
            t_ms,
            node,
            published,
            delivered,
            subscribed: true,
        }
    }

    #[test]
    fn increases_count_a_restart_as_a_rise_from_zero() {
        let v = vec![
            s(0, 0, 0, 0),
            s(1000, 0, 5, 12),
            s(2000, 0, 2, 3),
            s(3000, 0, 4, 9),
        ];
        assert_eq!(increase(&v, 0, 0, 3000), (5 + 2 + 2, 12 + 3 + 6));
        assert_eq!(increase(&v, 0, 1500, 3000), (2 + 2, 3 + 6));
        assert_eq!(increase(&v, 1, 0, 3000), (0, 0));
    }

    #[test]
    fn a_node_hearing_only_itself_fails_the_flow() {
        let ok = vec![
            s(0, 0, 0, 0),
            s(0, 1, 0, 0),
            s(3000, 0, 10, 20),
            s(3000, 1, 10, 20),
        ];
        assert_eq!(messages_flow(&ok, 2, (0, 3000), &[]).status, Status::Held);
        let cut = vec![
            s(0, 0, 0, 0),
            s(0, 1, 0, 0),
            s(3000, 0, 10, 10),
            s(3000, 1, 10, 20),
        ];
        let r = messages_flow(&cut, 2, (0, 3000), &[]);
        assert_eq!(r.status, Status::Failed);
        assert!(r.details[0].starts_with("node0"), "{:?}", r.details);
        // A window in which nothing was published, or an empty one, proves nothing.
        assert_eq!(
            messages_flow(&ok, 2, (3000, 3000), &[]).status,
            Status::Failed
        );
        assert_eq!(
            messages_flow(&ok, 2, (3000, 6000), &[]).status,
            Status::Failed
        );
        let quiet = vec![s(0, 0, 0, 0), s(3000, 0, 0, 0)];
        assert_eq!(
            messages_flow(&quiet, 1, (0, 3000), &[]).status,
            Status::NotChecked
        );
    }
}
