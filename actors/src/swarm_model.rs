//! A virtual-time model of a whole fleet fetching one blob, built from the real
//! decision structs: every node runs a [`Schedule`] the way [`crate::fetch`] drives
//! it, every node holding the whole blob answers with [`Seeding`] the way the store
//! actor does, and every node answers busy when its [`Backlog`] says its uplink has
//! enough queued. What is modelled instead of run: uplinks (each node's is shared among
//! the peers it sends to, and a stream's response arrives whole), latency, and the
//! queue a busy uplink puts in front of everything else a node sends.
//!
//! It answers what the propagation benchmark cannot on a two-core machine: how long the
//! policy itself takes a fleet of N to spread a blob when CPU is not the limit, in
//! blob-times (the physical bound), and how that grows with N.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use mesh_transport::libp2p::PeerId;
use mesh_transport::ContentId;
use rand::{Rng, SeedableRng};

use crate::backlog::Backlog;
use crate::fetch::{ANNOUNCE_INTERVAL, HAVE_INTERVAL, HAVE_QUERIES_MAX};
use crate::schedule::{Failure, Schedule};
use crate::seeding::{Decision, Seeding};
use crate::verified::{runs, GROUP_BYTES};

/// The model's parameters.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub nodes: usize,
    pub groups: u64,
    /// Every node's uplink, bytes per second (downlinks are not the limit, as in the
    /// shaped benchmark).
    pub uplink: f64,
    /// What an idle uplink sends at once, bytes (tbf's burst).
    pub burst: f64,
    /// One-way latency of an idle link.
    pub latency: Duration,
    /// What a message waits behind a busy uplink's queue (tbf holds up to 200 ms).
    pub queue_delay: Duration,
    pub seed: u64,
}

/// What one run of the model measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Time from the release until each node held the blob, in blob-times (the blob's
    /// size over one uplink), node 1 first; the publisher (node 0) is left out.
    pub done: Vec<f64>,
    /// Bytes all uplinks sent over bytes the fleet needed (one copy per node).
    pub sent_ratio: f64,
    /// Requests sent, over all nodes.
    pub requests: u64,
    pub redirects: u64,
    pub unavailable: u64,
    pub busy: u64,
    /// Groups asked for, over all requests.
    pub requested_groups: u64,
    /// Per second: the share of all uplinks' capacity in use.
    pub utilization: Vec<f64>,
    /// Per second: nodes holding the whole blob.
    pub complete: Vec<usize>,
}

impl Outcome {
    pub fn fleet(&self) -> f64 {
        self.done.iter().cloned().fold(0.0, f64::max)
    }
}

enum Event {
    Start(usize),
    Request {
        from: usize,
        to: usize,
        start: u64,
        end: u64,
    },
    HaveQuery {
        from: usize,
        to: usize,
    },
    Groups {
        at: usize,
        from: usize,
        start: u64,
        answer: Answer,
    },
    Have {
        at: usize,
        from: usize,
        ranges: Option<Vec<(u64, u64)>>,
    },
    Announce {
        at: usize,
        from: usize,
        ranges: Vec<(u64, u64)>,
    },
}

enum Answer {
    Data(u64),
    Elsewhere(Vec<(u64, u64)>),
    Unavailable,
    Busy,
}

struct Tx {
    to: usize,
    start: u64,
    end: u64,
    left: f64,
}

struct Download {
    schedule: Schedule,
    asked: HashMap<usize, Instant>,
    round_started: Instant,
    queried: usize,
    last_announce: Instant,
    announced_have: u64,
    /// Announcements received: peer -> (runs, number); fed like `Transfers`.
    providers: HashMap<usize, (Vec<(u64, u64)>, u64)>,
    announced: u64,
    providers_seen: u64,
    next_tick: Instant,
}

struct Node {
    have: Vec<bool>,
    have_count: u64,
    download: Option<Download>,
    done_at: Option<Instant>,
    seeding: Seeding,
    sending: Vec<Tx>,
    /// What the node has queued on its uplink, as the real server measures it.
    backlog: Backlog,
    /// The uplink's bucket, bytes.
    tokens: f64,
}

fn peer_id(i: usize) -> PeerId {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    mesh_transport::SecretKey::from_seed(seed)
        .public()
        .peer_id()
        .expect("an ed25519 key is a peer id")
}

/// Runs the model until every node holds the blob (or a generous virtual limit).
pub fn run(f: &Fleet) -> Outcome {
    assert!(f.nodes >= 2 && f.groups > 0 && f.uplink > 0.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(f.seed);
    let ids: Vec<PeerId> = (0..f.nodes).map(peer_id).collect();
    let index: HashMap<PeerId, usize> = ids.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let blob = ContentId::of(b"swarm model");
    let t0 = Instant::now();
    let blob_time = f.groups as f64 * GROUP_BYTES as f64 / f.uplink;
    let limit = t0 + Duration::from_secs_f64(blob_time * 40.0 + 60.0);
    let step = Duration::from_millis(1);

    let mut nodes: Vec<Node> = (0..f.nodes)
        .map(|i| Node {
            have: vec![i == 0; f.groups as usize],
            have_count: if i == 0 { f.groups } else { 0 },
            download: None,
            done_at: (i == 0).then_some(t0),
            seeding: Seeding::new(),
            sending: Vec::new(),
            backlog: Backlog::new(t0),
            tokens: 0.0,
        })
        .collect();
    // Events by time, then by the order they were made in.
    let mut events: BTreeMap<(Instant, u64), Event> = BTreeMap::new();
    let mut seq = 0u64;
    let mut push = |events: &mut BTreeMap<(Instant, u64), Event>, at: Instant, e: Event| {
        seq += 1;
        events.insert((at, seq), e);
    };
    // The release announcement reaches every node within a gossip round or two.
    for i in 1..f.nodes {
        let at = t0 + f.latency * rng.gen_range(1..4u32);
        push(&mut events, at, Event::Start(i));
    }
    let (mut requests, mut redirects, mut unavailable) = (0u64, 0u64, 0u64);
    let mut requested_groups = 0u64;
    let mut sent_bytes = 0f64;
    // Per-second series, cut to the run's length at the end.
    let seconds = limit.duration_since(t0).as_secs() as usize + 2;
    let mut utilization: Vec<f64> = vec![0.0; seconds];
    let mut complete_at: Vec<usize> = vec![0; seconds];
    let mut now = t0;
    // SWARM_TRACE=1 prints each node's state every virtual second (exploration).
    let trace = std::env::var("SWARM_TRACE").is_ok();
    let mut busy = 0u64;
    // What a message from `from` waits before it leaves: its uplink's queue if busy.
    let delay = |nodes: &Vec<Node>, from: usize| {
        if nodes[from].sending.is_empty() {
            f.latency
        } else {
            f.latency + f.queue_delay
        }
    };

    while nodes.iter().any(|n| n.done_at.is_none()) && now < limit {
        now += step;
        // Uplinks: shared equally among the peers sent to (one QUIC connection each).
        for i in 0..f.nodes {
            let tokens = nodes[i].tokens + f.uplink * step.as_secs_f64();
            nodes[i].tokens = tokens.min(f.burst.max(f.uplink * step.as_secs_f64()));
            if nodes[i].sending.is_empty() {
                continue;
            }
            // Responses to one peer go out one after another (send_fairness off), so
            // only the oldest to each peer is on the wire.
            let mut first: Vec<usize> = Vec::new();
            let mut seen: Vec<usize> = Vec::new();
            for (k, t) in nodes[i].sending.iter().enumerate() {
                if !seen.contains(&t.to) {
                    seen.push(t.to);
                    first.push(k);
                }
            }
            // A shaper's bucket: an idle uplink saves up to a burst, which the next
            // responses get at once (a small response beats the rate).
            let n = first.len() as f64;
            let mut spent = 0.0;
            let tokens = nodes[i].tokens;
            for k in first {
                let t = &mut nodes[i].sending[k];
                let share = (tokens / n).min(t.left);
                t.left -= share;
                spent += share;
                sent_bytes += share;
                let sec = now.duration_since(t0).as_secs() as usize;
                utilization[sec] += share / (f.uplink * f.nodes as f64);
            }
            nodes[i].tokens -= spent;
            let (done, left): (Vec<Tx>, Vec<Tx>) =
                nodes[i].sending.drain(..).partition(|t| t.left <= 1e-6);
            nodes[i].sending = left;
            for t in done {
                // The server hears of the delivery when the peer's acknowledgement
                // arrives; the model counts it when the last byte leaves.
                let bytes = (t.end - t.start) * GROUP_BYTES;
                nodes[i].backlog.on_done(bytes, true, now);
                let at = now + f.latency;
                let e = Event::Groups {
                    at: t.to,
                    from: i,
                    start: t.start,
                    answer: Answer::Data(t.end),
                };
                push(&mut events, at, e);
            }
        }
        let mut woken: Vec<usize> = Vec::new();
        while let Some(due) = events.first_entry().filter(|e| e.key().0 <= now) {
            match due.remove() {
                Event::Start(i) => {
                    let origin = rng.gen();
                    let mut schedule = Schedule::new(f.groups, |_| false, origin);
                    // The announcer of the release is the hint.
                    schedule.set_peer(ids[0], None, now);
                    nodes[i].download = Some(Download {
                        schedule,
                        asked: HashMap::new(),
                        round_started: now,
                        queried: 0,
                        last_announce: now - ANNOUNCE_INTERVAL,
                        announced_have: u64::MAX,
                        providers: HashMap::new(),
                        announced: 0,
                        providers_seen: 0,
                        next_tick: now,
                    });
                    woken.push(i);
                }
                Event::Request {
                    from,
                    to,
                    start,
                    end,
                } => {
                    let node = &mut nodes[to];
                    let answer = if !node.backlog.admits(now) {
                        Some(Answer::Busy)
                    } else if node.done_at.is_some() {
                        match node
                            .seeding
                            .decide(blob, f.groups, from as u64, start, end, now)
                        {
                            Decision::Serve => None,
                            Decision::Elsewhere(runs) => Some(Answer::Elsewhere(runs)),
                        }
                    } else if (start..end).all(|g| node.have[g as usize]) {
                        None
                    } else {
                        Some(Answer::Unavailable)
                    };
                    match answer {
                        None => {
                            let bytes = (end - start) * GROUP_BYTES;
                            node.backlog.on_queued(bytes, now);
                            node.sending.push(Tx {
                                to: from,
                                start,
                                end,
                                left: bytes as f64,
                            });
                        }
                        Some(a) => {
                            let at = now + delay(&nodes, to);
                            let e = Event::Groups {
                                at: from,
                                from: to,
                                start,
                                answer: a,
                            };
                            push(&mut events, at, e);
                        }
                    }
                }
                Event::HaveQuery { from, to } => {
                    let node = &nodes[to];
                    let ranges = if node.done_at.is_some() {
                        None
                    } else {
                        Some(runs(f.groups, |g| node.have[g as usize]))
                    };
                    let at = now + delay(&nodes, to);
                    let e = Event::Have {
                        at: from,
                        from: to,
                        ranges,
                    };
                    push(&mut events, at, e);
                }
                Event::Groups {
                    at,
                    from,
                    start,
                    answer,
                } => {
                    let node = &mut nodes[at];
                    let Some(d) = node.download.as_mut() else {
                        continue;
                    };
                    match answer {
                        Answer::Data(end) => {
                            let verified: Vec<u64> = (start..end).collect();
                            for &g in &verified {
                                if !node.have[g as usize] {
                                    node.have[g as usize] = true;
                                    node.have_count += 1;
                                }
                            }
                            d.schedule
                                .on_response(ids[from], start, &verified, false, now);
                        }
                        Answer::Elsewhere(runs) => {
                            redirects += 1;
                            d.schedule.on_redirect(ids[from], start, runs, now);
                        }
                        Answer::Unavailable => {
                            unavailable += 1;
                            d.schedule
                                .on_failure(ids[from], start, Failure::Unavailable, now);
                        }
                        Answer::Busy => {
                            busy += 1;
                            d.schedule.on_failure(ids[from], start, Failure::Busy, now);
                        }
                    }
                    woken.push(at);
                }
                Event::Have { at, from, ranges } => {
                    if let Some(d) = nodes[at].download.as_mut() {
                        d.schedule.set_peer(ids[from], ranges, now);
                        woken.push(at);
                    }
                }
                Event::Announce { at, from, ranges } => {
                    if let Some(d) = nodes[at].download.as_mut() {
                        d.announced += 1;
                        d.providers.insert(from, (ranges, d.announced));
                    }
                }
            }
        }
        // Each download's loop runs on an outcome and on its 100 ms tick.
        for i in 0..f.nodes {
            let Some(d) = nodes[i].download.as_mut() else {
                continue;
            };
            if d.next_tick <= now {
                d.next_tick = now + Duration::from_millis(100);
                woken.push(i);
            }
        }
        if trace && now.duration_since(t0).as_millis() % 1000 == 0 {
            let sec = now.duration_since(t0).as_secs();
            let mut line = format!("t={sec:>3}");
            for n in nodes.iter() {
                let send = n.sending.len();
                match &n.download {
                    None => line += &format!(" [done s{send}]"),
                    Some(d) => {
                        let (fl, act, rest, asg) = d.schedule.state(now);
                        line +=
                            &format!(" [h{} f{fl} a{act} r{rest} g{asg} s{send}]", n.have_count);
                    }
                }
            }
            println!("{line}");
        }
        woken.sort_unstable();
        woken.dedup();
        for i in woken {
            let groups = f.groups;
            let mut out: Vec<(Instant, Event)> = Vec::new();
            let wait = delay(&nodes, i);
            let Some(d) = nodes[i].download.as_mut() else {
                continue;
            };
            // Announcements, fresh ones each turn and all of them once a round.
            if now.duration_since(d.round_started) >= HAVE_INTERVAL {
                d.round_started = now;
                d.queried = 0;
                d.providers_seen = 0;
            }
            for (p, (runs, number)) in &d.providers {
                if *number > d.providers_seen && !d.schedule.is_banned(&ids[*p]) {
                    let complete = runs[..] == [(0, groups)];
                    let r = if complete { None } else { Some(runs.clone()) };
                    d.schedule.add_peer_ranges(ids[*p], r, now);
                }
            }
            d.providers_seen = d.announced;
            // Have-queries: every other node is connected; those asked longest ago first.
            let mut due: Vec<usize> = (0..f.nodes)
                .filter(|p| *p != i)
                .filter(|p| {
                    d.asked
                        .get(p)
                        .is_none_or(|t| now.duration_since(*t) >= HAVE_INTERVAL)
                })
                .filter(|p| !d.schedule.holds_all(&ids[*p]))
                .collect();
            due.sort_by_key(|p| (*p != 0, d.asked.get(p).copied()));
            due.truncate(HAVE_QUERIES_MAX.saturating_sub(d.queried));
            for p in due {
                d.asked.insert(p, now);
                d.queried += 1;
                out.push((now + wait, Event::HaveQuery { from: i, to: p }));
            }
            for r in d.schedule.poll(now) {
                requests += 1;
                requested_groups += r.end - r.start;
                let e = Event::Request {
                    from: i,
                    to: index[&r.peer],
                    start: r.start,
                    end: r.end,
                };
                out.push((now + wait, e));
            }
            let complete = d.schedule.is_complete();
            let have_count = d.schedule.have_count();
            let announce = complete
                || (now.duration_since(d.last_announce) >= ANNOUNCE_INTERVAL
                    && have_count > 0
                    && have_count != d.announced_have);
            if announce {
                d.last_announce = now;
                d.announced_have = have_count;
            }
            if complete {
                complete_at[now.duration_since(t0).as_secs() as usize] += 1;
                nodes[i].download = None;
                nodes[i].done_at = Some(now);
            }
            if announce {
                let runs = runs(f.groups, |g| nodes[i].have[g as usize]);
                for p in (0..f.nodes).filter(|p| *p != i) {
                    // Gossip reaches the fleet within a couple of hops.
                    let at = now + wait + f.latency;
                    let e = Event::Announce {
                        at: p,
                        from: i,
                        ranges: runs.clone(),
                    };
                    out.push((at, e));
                }
            }
            for (at, e) in out {
                push(&mut events, at, e);
            }
        }
    }
    let ran = now.duration_since(t0).as_secs() as usize + 1;
    utilization.truncate(ran);
    complete_at.truncate(ran);
    let needed = ((f.nodes - 1) as u64 * f.groups * GROUP_BYTES) as f64;
    Outcome {
        done: nodes[1..]
            .iter()
            .map(|n| {
                n.done_at.map_or(f64::INFINITY, |t| {
                    t.duration_since(t0).as_secs_f64() / blob_time
                })
            })
            .collect(),
        sent_ratio: sent_bytes / needed,
        requests,
        redirects,
        unavailable,
        busy,
        requested_groups,
        utilization,
        complete: complete_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 MiB over uplinks of `mbit` Mbit/s, as the shaped benchmark runs it.
    fn fleet(nodes: usize, seed: u64, mbit: f64) -> Fleet {
        Fleet {
            nodes,
            groups: 1024,
            uplink: mbit * 1e6 / 8.0,
            burst: 16384.0,
            latency: Duration::from_millis(2),
            queue_delay: Duration::from_millis(100),
            seed,
        }
    }

    /// The uplink rate `explore` models, `SWARM_MBIT` or 5 Mbit/s.
    fn mbit() -> f64 {
        std::env::var("SWARM_MBIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5.0)
    }

    /// The policy, on uplinks that are the only limit, keeps a fleet near the physical
    /// bound: on 5 Mbit/s uplinks within 1.5 blob-times at 16 nodes, growing slower than
    /// log N when the fleet doubles; on 20 Mbit/s ones within looser bounds. Every node
    /// ends with the blob and the uplinks carry little more than one copy per node.
    #[test]
    fn a_fleet_spreads_a_blob_near_the_bound_and_grows_slower_than_log_n() {
        let seed = crate::restart::test_seed();
        // The shaped benchmark's thin and thick uplinks: on the thick one, round trips
        // and queues weigh more against a blob-time of under seven seconds.
        for mbit in [5.0, 20.0] {
            let small = run(&fleet(16, seed, mbit));
            let large = run(&fleet(32, seed, mbit));
            for (o, n) in [(&small, 16), (&large, 32)] {
                println!(
                    "seed {seed}: {mbit} Mbit/s, {n} nodes: fleet {:.2} blob-times, uplinks sent {:.3} copies",
                    o.fleet(),
                    o.sent_ratio
                );
                assert!(
                    o.done.iter().all(|d| d.is_finite()),
                    "seed {seed}: {mbit} Mbit/s: {n} nodes never finished"
                );
                assert!(
                    o.sent_ratio < 1.25,
                    "seed {seed}: {mbit} Mbit/s: {n} nodes: {:.3} copies",
                    o.sent_ratio
                );
            }
            if mbit < 10.0 {
                assert!(
                    small.fleet() <= 1.5,
                    "seed {seed}: {mbit} Mbit/s: 16 nodes took {:.2}",
                    small.fleet()
                );
                // log2(32) / log2(16)
                let log_growth = 5.0 / 4.0;
                assert!(
                    large.fleet() <= small.fleet() * log_growth,
                    "seed {seed}: {mbit} Mbit/s: 16 nodes {:.2}, 32 nodes {:.2}",
                    small.fleet(),
                    large.fleet()
                );
            } else {
                // Over 24 seeds the thick uplinks gave 1.29 to 1.48 at 16 nodes and 1.42
                // to 1.72 at 32, too close to the goals above to assert them without
                // failing a seed in twenty; these bounds leave that margin, and a server
                // that queued without limit broke them (up to 2.0 at 32 nodes).
                assert!(
                    small.fleet() <= 1.6 && large.fleet() <= 1.85,
                    "seed {seed}: {mbit} Mbit/s: 16 nodes {:.2}, 32 nodes {:.2}",
                    small.fleet(),
                    large.fleet()
                );
            }
        }
    }

    #[test]
    #[ignore = "exploration: prints the model's figures for fleets of 8 to 64"]
    fn explore() {
        let seed = crate::restart::test_seed();
        let sizes: Vec<usize> = std::env::var("SWARM_NODES")
            .map(|v| v.split(',').map(|x| x.parse().unwrap()).collect())
            .unwrap_or(vec![8, 16, 32, 64]);
        for n in sizes {
            let o = run(&fleet(n, seed, mbit()));
            let mut d = o.done.clone();
            d.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "nodes={n} fleet={:.2} first={:.2} median={:.2} sent_ratio={:.3} requests={} redirects={} unavailable={} busy={} groups_per_request={:.2}",
                o.fleet(),
                d[0],
                d[d.len() / 2],
                o.sent_ratio,
                o.requests,
                o.redirects,
                o.unavailable,
                o.busy,
                o.requested_groups as f64 / o.requests as f64
            );
            let u: Vec<String> = o
                .utilization
                .iter()
                .map(|u| format!("{:.0}", u * 100.0))
                .collect();
            println!("  util% {}", u.join(" "));
            let c: Vec<String> = o.complete.iter().map(|c| c.to_string()).collect();
            println!("  done  {}", c.join(" "));
        }
    }
}
