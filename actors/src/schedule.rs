//! Which chunk groups to ask which peer for, and when: the decision half of a
//! multi-peer download (pure: time passed in, no IO).
//!
//! Each peer gets runs of groups it holds that nobody else is fetching, sized to about
//! half a second of its measured rate, with a few requests in flight at once. Faster
//! peers therefore get more of the blob. A rate starts low and at most doubles per
//! response (a slow start), and a pipelined response is timed from the one before it.
//! A download works with a few peers at once; when an idle peer ranks clearly above the
//! slowest of them (an untried peer, or one idle long enough that its old rate no
//! longer says much), the slowest is given nothing more, so downloads move off swamped
//! peers onto idle ones. A request that takes far longer than its peer's rate predicts
//! is given up and its groups go to someone else, but it counts against its peer until
//! answered; near the end, groups still in flight at a slow peer are also asked of an
//! idle faster one, so one slow peer cannot hold the download hostage. A peer whose
//! data fails verification is dropped from this download.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use mesh_transport::libp2p::PeerId;

use crate::verified::GROUPS_PER_REQUEST_MAX;

/// Requests in flight to one peer; enough to keep a fast link busy across round trips.
pub const PEER_IN_FLIGHT_MAX: usize = 4;
/// Requests in flight for one download over all peers.
pub const DOWNLOAD_IN_FLIGHT_MAX: usize = 32;
/// Peers one download takes groups from at once. Each request costs both ends about
/// the same whatever its size, and a server's uplink is split between the peers it
/// serves; drawing from every peer of a large fleet at once makes each exchange small
/// and the fleet's CPU grow with its size squared. The fastest peers are kept (they are
/// tried first), and an untried peer is rated optimistically, so the set still moves
/// to better peers as they appear.
pub const PEERS_ACTIVE_MAX: usize = 6;
/// Each request aims to take this long at the peer's measured rate. Every request costs
/// both ends a stream, a frame and a wake-up whatever its size; on thin links shared by
/// many fetchers a quarter second made requests of two or three groups, and a fleet
/// spent its CPU on requests rather than bytes.
pub const REQUEST_TARGET: Duration = Duration::from_millis(500);
/// Rate assumed for a peer before its first response (bytes per second). Low on
/// purpose (a slow start): a popular source on a thin uplink would otherwise be asked
/// for megabytes by every peer at once, most of it overlapping, and requests would
/// time out in its queue; the rate grows with each measured response.
pub const INITIAL_RATE: f64 = 32.0 * 1024.0;
/// A peer's rate grows at most this many times per response (a slow start).
pub const RATE_GROWTH_MAX: f64 = 2.0;
/// A peer's rate never falls below a group a second, so repeated losses or an empty
/// response cannot leave it at nothing, from which doubling never climbs.
pub const RATE_MIN: f64 = crate::verified::GROUP_BYTES as f64;
/// How fast an untried peer is taken to be when choosing whom to ask: optimistic, so a
/// download tries peers it has not measured before settling for slow ones.
pub const UNTRIED_RANK: f64 = 256.0 * 1024.0;
/// A request is given up when it takes this many times its expected duration ...
pub const TIMEOUT_FACTOR: u32 = 4;
/// ... but never sooner than this (round trips, queues at a shaped uplink). A vanished
/// peer fails its requests at once when its connection closes, so this only bounds how
/// long a slow but alive peer holds groups.
pub const TIMEOUT_MIN: Duration = Duration::from_secs(8);
/// A peer that answered "busy", failed, or timed out rests this long before it is
/// asked again; it doubles per consecutive failure up to the max.
pub const REST_INITIAL: Duration = Duration::from_millis(200);
pub const REST_MAX: Duration = Duration::from_secs(10);
/// A busy peer is asked again after this long; busy is the normal state of a popular
/// source (a server answers busy once a second of its uplink is queued), so it
/// does not grow. In the fleet model, doubling it per busy answer up to 400 ms slowed
/// 32 nodes on 20 Mbit/s from 1.4 to 1.5 blob-times and saved no busy answers.
pub const BUSY_REST: Duration = Duration::from_millis(50);
/// How long a peer that redirected a request is asked only for the runs it named.
/// Its holdings are learnt again afterwards, and what it sent others is by then
/// announced by them.
pub const REDIRECT_VIEW: Duration = Duration::from_secs(1);
/// An idle peer whose rank is this many times the slowest working peer's takes its
/// place: the slowest is given nothing more and finishes what it has. Without this a
/// download kept the first peers it found for good, and on a fleet the popular ones
/// queued dozens of requests while most uplinks idled.
pub const SWAP_RATIO: f64 = 1.5;
/// How fast an idle peer's measured rate recovers toward the untried rate (the time
/// constant).
pub const RATE_RECOVERY: Duration = Duration::from_secs(2);
/// The rarest-first search looks this far past the cursor before settling for any
/// group the peer holds, so a poll stays cheap on large blobs.
pub const RAREST_SCAN_MAX: u64 = 512;

/// One request to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub peer: PeerId,
    pub start: u64,
    pub end: u64,
}

/// How a request ended without data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer is at its serving limit: normal under load, ask again shortly.
    Busy,
    /// The peer does not have it (yet): ask again later, less often each time.
    Unavailable,
    /// The request failed in transport or timed out.
    Lost,
    /// The peer sent data that failed verification: never ask it again.
    Lied,
}

#[derive(Debug)]
struct PeerState {
    /// Groups the peer holds, as sorted runs; `None` means all of them.
    ranges: Option<Vec<(u64, u64)>>,
    /// Requests sent and not answered, including those given up on (see
    /// [`InFlight::given_up`]).
    in_flight: usize,
    /// Of those, the ones given up on.
    given_up: usize,
    rate: f64,
    rest_until: Instant,
    rest: Duration,
    banned: bool,
    delivered: u64,
    /// Until then, `ranges` is what the peer said it would send now (it redirected a
    /// request), not all it holds; what it holds is not learnt again meanwhile.
    redirected_until: Instant,
    /// When the peer's last response arrived: a pipelined request is served only after
    /// the ones before it, so its time is counted from then, not from when it was sent.
    last_response: Instant,
    /// Given nothing more until its requests in flight are answered: a clearly faster
    /// idle peer took its place among the peers this download works with.
    draining: bool,
    /// Whether `rate` was measured (a response arrived) rather than assumed.
    measured: bool,
}

impl PeerState {
    fn holds(&self, g: u64) -> bool {
        match &self.ranges {
            None => true,
            // The runs are sorted and disjoint; this runs for every group a poll looks
            // at, for every peer, so it must not walk a long list of runs.
            Some(r) => {
                let i = r.partition_point(|(_, e)| *e <= g);
                r.get(i).is_some_and(|(s, _)| *s <= g)
            }
        }
    }

    /// How fast the peer is taken to be when choosing peers. An idle peer's measured
    /// rate says how it did while busy with others, maybe long ago; it recovers toward
    /// the untried rate, so a peer that was swamped is tried again once it may not be.
    fn rank(&self, now: Instant) -> f64 {
        // A peer still holding requests this download gave up on is still working
        // through them: it is as slow as it was, however long ago it last answered.
        if self.working() || self.given_up > 0 || self.rate >= UNTRIED_RANK {
            return self.rate;
        }
        if !self.measured {
            return UNTRIED_RANK;
        }
        let idle = now
            .saturating_duration_since(self.last_response)
            .as_secs_f64();
        let w = 1.0 - (-idle / RATE_RECOVERY.as_secs_f64()).exp();
        self.rate + (UNTRIED_RANK - self.rate) * w
    }

    /// Whether the peer has requests in flight that this download still waits for.
    fn working(&self) -> bool {
        self.in_flight > self.given_up
    }

    fn batch(&self) -> u64 {
        let groups = self.rate * REQUEST_TARGET.as_secs_f64() / crate::verified::GROUP_BYTES as f64;
        (groups as u64).clamp(1, GROUPS_PER_REQUEST_MAX)
    }
}

#[derive(Debug)]
struct InFlight {
    end: u64,
    deadline: Instant,
    expected: Duration,
    sent: Instant,
    /// Past its deadline: its groups went back to be asked of others, but it still
    /// counts against its peer until the answer (or the transport's own timeout)
    /// comes. The peer is still working through it, and a peer whose late requests
    /// were forgotten was sent more and more until its queue held many seconds.
    given_up: bool,
}

/// The schedule of one download.
#[derive(Debug)]
pub struct Schedule {
    groups: u64,
    have: Vec<bool>,
    have_count: u64,
    /// Requests in flight by start group. The same group may be in flight twice near
    /// the end (see the module docs).
    in_flight: BTreeMap<(u64, PeerId), InFlight>,
    /// How many requests in flight cover each group.
    assigned: Vec<u8>,
    /// How many usable peers hold each group (rarest first: the source is asked for
    /// what nobody else holds, peers for what they hold).
    avail: Vec<u16>,
    /// Every group below this one is held.
    first_wanted: u64,
    /// Where the next search for an unassigned group starts. Each download begins at
    /// its own offset (see [`Schedule::new`]), so nodes fetching the same blob ask the
    /// source for different parts and then trade them, instead of all asking for
    /// the same groups in the same order.
    cursor: u64,
    peers: HashMap<PeerId, PeerState>,
    requests_sent: u64,
    /// Orders peers of equal rank (see [`Schedule::tie`]).
    salt: u64,
}

impl Schedule {
    /// A schedule for `groups` groups, of which `have` are already verified (resume).
    /// `origin` picks where this download starts; derive it from the node's id so
    /// different nodes start at different places.
    pub fn new(groups: u64, have: impl Fn(u64) -> bool, origin: u64) -> Schedule {
        let have: Vec<bool> = (0..groups).map(have).collect();
        let have_count = have.iter().filter(|h| **h).count() as u64;
        let mut s = Schedule {
            groups,
            have,
            have_count,
            in_flight: BTreeMap::new(),
            assigned: vec![0; groups as usize],
            avail: vec![0; groups as usize],
            first_wanted: 0,
            cursor: if groups == 0 { 0 } else { origin % groups },
            salt: origin,
            peers: HashMap::new(),
            requests_sent: 0,
        };
        s.advance();
        s
    }

    pub fn is_complete(&self) -> bool {
        self.have_count == self.groups
    }

    pub fn have_count(&self) -> u64 {
        self.have_count
    }

    pub fn requests_sent(&self) -> u64 {
        self.requests_sent
    }

    /// Peers that delivered at least one group, with how many.
    pub fn contributors(&self) -> Vec<(PeerId, u64)> {
        let mut v: Vec<(PeerId, u64)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.delivered > 0)
            .map(|(id, p)| (*id, p.delivered))
            .collect();
        v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        v
    }

    /// Peers usable now (not banned), for progress displays.
    pub fn active_peers(&self) -> usize {
        self.peers.values().filter(|p| !p.banned).count()
    }

    /// Whether the peer is known to hold the whole blob (asking what it holds again
    /// would tell nothing new).
    pub fn holds_all(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.ranges.is_none())
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.banned)
    }

    /// Records what a peer holds: `None` for the whole blob, else runs of groups.
    pub fn set_peer(&mut self, peer: PeerId, ranges: Option<Vec<(u64, u64)>>, now: Instant) {
        // A peer that redirected a request is asked only for what it named, whatever
        // it says it holds, until its view runs out.
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.redirected_until > now)
        {
            return;
        }
        self.replace_ranges(peer, ranges, now);
    }

    /// Adds to what a peer is known to hold: runs it announced over gossip, which may be
    /// older than what it told this download directly. A peer's holdings only grow
    /// while it fetches, so the runs are merged in, never put in place of fresher ones.
    pub fn add_peer_ranges(&mut self, peer: PeerId, ranges: Option<Vec<(u64, u64)>>, now: Instant) {
        let merged = match (self.peers.get(&peer), ranges) {
            (Some(p), _) if p.redirected_until > now => return,
            (Some(p), Some(new)) => match &p.ranges {
                None => return,
                Some(old) => {
                    let mut all = old.clone();
                    all.extend(new);
                    Some(all)
                }
            },
            (_, r) => r,
        };
        self.replace_ranges(peer, merged, now);
    }

    /// Sets what a peer offers (merged runs, or `None` for everything) and keeps the
    /// availability counts in step.
    fn replace_ranges(&mut self, peer: PeerId, ranges: Option<Vec<(u64, u64)>>, now: Instant) {
        let ranges = ranges.map(|mut r| {
            r.retain(|(s, e)| s < e);
            r.sort_unstable();
            // A peer's runs may overlap or touch; merged, they are disjoint and sorted by
            // both ends, which is what the lookup in `holds` relies on.
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
            for (s, e) in r {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            merged
        });
        if let Some(p) = self.peers.get(&peer) {
            if p.ranges == ranges {
                return;
            }
            if !p.banned {
                let old = p.ranges.clone();
                self.count(&old, false);
            }
        }
        let p = self.peers.entry(peer).or_insert(PeerState {
            ranges: Some(Vec::new()),
            in_flight: 0,
            given_up: 0,
            rate: INITIAL_RATE,
            rest_until: now,
            rest: REST_INITIAL,
            banned: false,
            delivered: 0,
            redirected_until: now,
            last_response: now,
            draining: false,
            measured: false,
        });
        p.ranges = ranges.clone();
        if !p.banned {
            self.count(&ranges, true);
        }
    }

    /// Adds (or removes) one peer's holdings to the per-group availability counts.
    fn count(&mut self, ranges: &Option<Vec<(u64, u64)>>, add: bool) {
        let all = [(0, self.groups)];
        let runs: &[(u64, u64)] = match ranges {
            None => &all,
            Some(r) => r,
        };
        for &(s, e) in runs {
            for g in s.min(self.groups)..e.min(self.groups) {
                let a = &mut self.avail[g as usize];
                *a = if add {
                    a.saturating_add(1)
                } else {
                    a.saturating_sub(1)
                };
            }
        }
    }

    /// Forgets a peer that went away; its requests are given up at once.
    pub fn remove_peer(&mut self, peer: &PeerId) {
        if let Some(p) = self.peers.remove(peer) {
            if !p.banned {
                self.count(&p.ranges, false);
            }
        }
        self.drop_requests_of(peer);
    }

    fn drop_requests_of(&mut self, peer: &PeerId) {
        let keys: Vec<(u64, PeerId)> = self
            .in_flight
            .keys()
            .filter(|(_, q)| q == peer)
            .copied()
            .collect();
        for (start, q) in keys {
            self.finish(q, start);
        }
    }

    fn is_wanted(&self, g: u64) -> bool {
        !self.have[g as usize]
    }

    fn in_flight_at(&self, g: u64) -> bool {
        self.assigned[g as usize] > 0
    }

    /// The first group from the cursor on (wrapping) that is wanted, not in flight and
    /// held by `peer`.
    fn next_free(&self, peer: &PeerId) -> Option<u64> {
        let p = &self.peers[peer];
        // A group whose request to this peer was given up on is free for others, not
        // for this peer: that request is still in its queue.
        let free = |g: &u64| {
            self.is_wanted(*g)
                && !self.in_flight_at(*g)
                && (p.given_up == 0 || !self.in_flight.contains_key(&(*g, *peer)))
        };
        let start = self.cursor.max(self.first_wanted);
        // Only the groups the peer holds are walked: a partial holder's runs, not the
        // whole blob, since this runs for every peer on every poll.
        let held = |from: u64, to: u64| -> Vec<(u64, u64)> {
            match &p.ranges {
                None => vec![(from, to)],
                Some(r) => r
                    .iter()
                    .map(|&(s, e)| (s.max(from), e.min(to)))
                    .filter(|(s, e)| s < e)
                    .collect(),
            }
        };
        let mut runs = held(start, self.groups);
        runs.extend(held(self.first_wanted, start));
        let scan = |pred: &dyn Fn(&u64) -> bool, limit: u64| {
            runs.iter()
                .flat_map(|&(s, e)| s..e)
                .take(limit as usize)
                .find(|g| pred(g))
        };
        // Rarest first: groups only this peer is known to hold (within a bounded look
        // ahead), then any it holds.
        scan(
            &|g: &u64| free(g) && self.avail[*g as usize] <= 1,
            RAREST_SCAN_MAX,
        )
        .or_else(|| scan(&free, self.groups))
    }

    fn advance(&mut self) {
        while self.first_wanted < self.groups && self.have[self.first_wanted as usize] {
            self.first_wanted += 1;
        }
    }

    /// Requests to send now. Also gives up requests past their deadline.
    pub fn poll(&mut self, now: Instant) -> Vec<Request> {
        self.expire(now);
        let mut out = Vec::new();
        let mut order: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.banned && p.rest_until <= now && p.in_flight < PEER_IN_FLIGHT_MAX)
            .map(|(id, _)| *id)
            .collect();
        // Fastest first, so they take the earliest groups; ties by `tie`.
        order.sort_by(|a, b| {
            let (ra, rb) = (self.peers[a].rank(now), self.peers[b].rank(now));
            rb.partial_cmp(&ra)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| self.tie(a).cmp(&self.tie(b)))
        });
        // Near the end every wanted group is in flight; then no peer can be given a new
        // run, and looking for one per peer would walk the blob for each.
        let unassigned =
            (self.first_wanted..self.groups).any(|g| self.is_wanted(g) && !self.in_flight_at(g));
        // Peers already working for this download; new ones join only while there are
        // fewer than PEERS_ACTIVE_MAX.
        let mut active = self
            .peers
            .values()
            .filter(|p| p.working() && !p.draining)
            .count();
        if unassigned && active >= PEERS_ACTIVE_MAX {
            active -= usize::from(self.swap_slowest(&order, now));
        }
        // Requests given up on do not count: their groups are being asked of others.
        let mut live = self.in_flight.values().filter(|f| !f.given_up).count();
        let mut progressed = unassigned;
        while progressed {
            progressed = false;
            for peer in &order {
                if live >= DOWNLOAD_IN_FLIGHT_MAX {
                    return out;
                }
                let p = &self.peers[peer];
                if p.in_flight >= PEER_IN_FLIGHT_MAX
                    || p.draining
                    || (!p.working() && active >= PEERS_ACTIVE_MAX)
                {
                    continue;
                }
                let joining = !p.working();
                let batch = p.batch();
                let Some(start) = self.next_free(peer) else {
                    continue;
                };
                let mut end = start + 1;
                while end < self.groups
                    && end - start < batch
                    && self.is_wanted(end)
                    && !self.in_flight_at(end)
                    && self.peers[peer].holds(end)
                {
                    end += 1;
                }
                out.push(self.send(*peer, start, end, now));
                live += 1;
                self.cursor = if end >= self.groups { 0 } else { end };
                active += usize::from(joining);
                progressed = true;
            }
        }
        self.endgame(now, &mut out);
        out
    }

    /// A peer's place among peers of equal rank: its id hashed with this download's
    /// salt. Every download of a fleet rates the untried peers alike; ordered by id,
    /// they all picked the same ones first, and those peers' queues held seconds
    /// while others idled.
    fn tie(&self, peer: &PeerId) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&self.salt, &mut h);
        std::hash::Hash::hash(peer, &mut h);
        std::hash::Hasher::finish(&h)
    }

    /// With every working slot taken, stops giving the slowest working peer new runs if
    /// an idle peer in `order` (usable now, fastest first) ranks clearly above it and
    /// holds something to fetch. Returns whether a slot was freed.
    fn swap_slowest(&mut self, order: &[PeerId], now: Instant) -> bool {
        // A peer not yet measured has had no chance to show its rate; its assumed one
        // is low on purpose (a slow start), and swapping it out would churn newcomers.
        let Some((slowest, slow_rate)) = self
            .peers
            .iter()
            .filter(|(_, p)| p.working() && p.measured && !p.draining && !p.banned)
            .map(|(id, p)| (*id, p.rank(now)))
            // Equal ranks by `tie`, not by the map's order, so a seed replays.
            .min_by(|a, b| {
                a.1.partial_cmp(&b.1)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then_with(|| self.tie(&a.0).cmp(&self.tie(&b.0)))
            })
        else {
            return false;
        };
        let better = order.iter().any(|id| {
            let p = &self.peers[id];
            !p.working()
                && !p.draining
                && p.in_flight < PEER_IN_FLIGHT_MAX
                && p.rank(now) > slow_rate * SWAP_RATIO
                && self.next_free(id).is_some()
        });
        if !better {
            return false;
        }
        if let Some(p) = self.peers.get_mut(&slowest) {
            p.draining = true;
        }
        true
    }

    /// Near the end nothing is left unassigned; a request running long at one peer is
    /// also given to an idle peer that is clearly faster.
    fn endgame(&mut self, now: Instant, out: &mut Vec<Request>) {
        let unassigned =
            (self.first_wanted..self.groups).any(|g| self.is_wanted(g) && !self.in_flight_at(g));
        if unassigned {
            return;
        }
        let late: Vec<(u64, u64, PeerId)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| !f.given_up && now.duration_since(f.sent) > f.expected * 2)
            .map(|((s, p), f)| (*s, f.end, *p))
            .collect();
        for (start, end, slow) in late {
            let slow_rate = self.peers.get(&slow).map(|p| p.rate).unwrap_or(0.0);
            let duplicated = self
                .in_flight
                .iter()
                .filter(|((s, _), f)| *s == start && !f.given_up)
                .count()
                > 1;
            if duplicated {
                continue;
            }
            let helper = self
                .peers
                .iter()
                .filter(|(id, p)| {
                    **id != slow
                        && !p.banned
                        && !p.working()
                        && p.in_flight < PEER_IN_FLIGHT_MAX
                        && p.rest_until <= now
                        && p.rate > slow_rate * 2.0
                        && (start..end).all(|g| p.holds(g))
                })
                .map(|(id, _)| *id)
                .min();
            if let Some(h) = helper.filter(|h| !self.in_flight.contains_key(&(start, *h))) {
                out.push(self.send(h, start, end, now));
            }
        }
    }

    fn send(&mut self, peer: PeerId, start: u64, end: u64, now: Instant) -> Request {
        let p = self.peers.get_mut(&peer).expect("scheduling a known peer");
        p.in_flight += 1;
        let bytes = (end - start) as f64 * crate::verified::GROUP_BYTES as f64;
        let expected = Duration::from_secs_f64(bytes / p.rate.max(1.0));
        let deadline = now + (expected * TIMEOUT_FACTOR).max(TIMEOUT_MIN);
        for g in start..end {
            self.assigned[g as usize] = self.assigned[g as usize].saturating_add(1);
        }
        self.in_flight.insert(
            (start, peer),
            InFlight {
                end,
                deadline,
                expected,
                sent: now,
                given_up: false,
            },
        );
        self.requests_sent += 1;
        Request { peer, start, end }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<(u64, PeerId)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| !f.given_up && f.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for (start, peer) in expired {
            let Some(f) = self.in_flight.get_mut(&(start, peer)) else {
                continue;
            };
            f.given_up = true;
            let end = f.end;
            self.release(start, end);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.given_up += 1;
                if !p.working() {
                    p.draining = false;
                }
            }
            self.penalize(peer, Failure::Lost, now);
        }
    }

    /// Groups `start..end` are no longer asked of the peer a request went to.
    fn release(&mut self, start: u64, end: u64) {
        for g in start..end {
            self.assigned[g as usize] = self.assigned[g as usize].saturating_sub(1);
        }
    }

    fn finish(&mut self, peer: PeerId, start: u64) -> Option<InFlight> {
        let f = self.in_flight.remove(&(start, peer))?;
        if !f.given_up {
            self.release(start, f.end);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
            if f.given_up {
                p.given_up = p.given_up.saturating_sub(1);
            }
            if !p.working() {
                p.draining = false;
            }
        }
        Some(f)
    }

    fn penalize(&mut self, peer: PeerId, failure: Failure, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match failure {
            Failure::Lied => {
                p.banned = true;
                let held = p.ranges.clone();
                self.count(&held, false);
                self.drop_requests_of(&peer);
            }
            Failure::Lost => {
                p.rate = (p.rate / 2.0).max(RATE_MIN);
                p.rest_until = now + p.rest;
                p.rest = (p.rest * 2).min(REST_MAX);
            }
            Failure::Busy => {
                p.rest_until = now + BUSY_REST;
            }
            Failure::Unavailable => {
                p.rest_until = now + p.rest;
                p.rest = (p.rest * 2).min(REST_MAX);
            }
        }
    }

    /// A response to the request `start..` from `peer` arrived; `verified` are the
    /// groups that passed verification, `bad` says whether the rest failed it.
    pub fn on_response(
        &mut self,
        peer: PeerId,
        start: u64,
        verified: &[u64],
        bad: bool,
        now: Instant,
    ) {
        // A response to a request given up on still delivers verified groups, but says
        // nothing new of the peer's rate (its lateness was already counted).
        let f = self.finish(peer, start).filter(|f| !f.given_up);
        let mut fresh = 0u64;
        for &g in verified {
            if g < self.groups && !self.have[g as usize] {
                self.have[g as usize] = true;
                self.have_count += 1;
                fresh += 1;
            }
        }
        self.advance();
        if bad {
            self.penalize(peer, Failure::Lied, now);
            return;
        }
        let Some(f) = f else {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.delivered += fresh;
            }
            return;
        };
        if let Some(p) = self.peers.get_mut(&peer) {
            let since = f.sent.max(p.last_response);
            let elapsed = now.duration_since(since).as_secs_f64().max(0.001);
            p.last_response = now;
            let bytes = verified.len() as f64 * crate::verified::GROUP_BYTES as f64;
            // An exponential moving average keeps one lucky or unlucky response from
            // swinging the split; the first measurement replaces the assumed rate. The
            // rate at most doubles per response: a small response fits in a shaper's
            // burst or a queue's gap and arrives at many times the link's rate, and
            // every fetcher believing that at once buried its peers in requests.
            let measured = bytes / elapsed;
            let smoothed = if p.measured {
                0.6 * p.rate + 0.4 * measured
            } else {
                measured
            };
            p.rate = smoothed.min(p.rate.max(RATE_MIN) * RATE_GROWTH_MAX);
            p.measured = true;
            p.rest = REST_INITIAL;
            p.delivered += fresh;
        }
    }

    /// The peer sent the request `start..` elsewhere: it sent those groups to others
    /// moments ago. For [`REDIRECT_VIEW`] it is asked only for the runs it named
    /// (`fresh`), and the groups it would not send are taken from the peers that got
    /// them. Not a failure: the peer is asked again at once.
    pub fn on_redirect(
        &mut self,
        peer: PeerId,
        start: u64,
        mut fresh: Vec<(u64, u64)>,
        now: Instant,
    ) {
        self.finish(peer, start);
        if self.peers.get(&peer).is_none_or(|p| p.banned) {
            return;
        }
        fresh.truncate(crate::seeding::FRESH_RUNS_MAX);
        self.replace_ranges(peer, Some(fresh), now);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.redirected_until = now + REDIRECT_VIEW;
        }
    }

    /// The peer connected again. Requests lost while it was away (and the rest and the
    /// lower rate they earned) say nothing of the new connection, so it is asked again
    /// at once; a peer that lied stays banned.
    pub fn on_reconnected(&mut self, peer: PeerId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer).filter(|p| !p.banned) {
            p.rest = REST_INITIAL;
            p.rest_until = p.rest_until.min(now);
            p.rate = p.rate.max(INITIAL_RATE);
        }
    }

    pub fn on_failure(&mut self, peer: PeerId, start: u64, failure: Failure, now: Instant) {
        // A request given up on was penalised when it was.
        if self.finish(peer, start).is_some_and(|f| !f.given_up) {
            self.penalize(peer, failure, now);
        }
    }

    /// The earliest deadline of a request in flight, for the driver's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .filter(|f| !f.given_up)
            .map(|f| f.deadline)
            .min()
    }

    /// For the swarm model: requests in flight, peers working, peers resting, and
    /// wanted groups that a known peer holds and nobody is fetching.
    #[cfg(test)]
    pub(crate) fn state(&self, now: Instant) -> (usize, usize, usize, u64) {
        let resting = self
            .peers
            .values()
            .filter(|p| !p.banned && p.rest_until > now)
            .count();
        let assignable = (self.first_wanted..self.groups)
            .filter(|g| self.is_wanted(*g) && !self.in_flight_at(*g))
            .filter(|g| self.peers.values().any(|p| !p.banned && p.holds(*g)))
            .count() as u64;
        (
            self.in_flight.len(),
            self.peers.values().filter(|p| p.in_flight > 0).count(),
            resting,
            assignable,
        )
    }

    /// Whether any usable peer holds a group still wanted.
    pub fn has_source(&self) -> bool {
        (self.first_wanted..self.groups)
            .filter(|g| self.is_wanted(*g))
            .any(|g| self.peers.values().any(|p| !p.banned && p.holds(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const GROUP_BYTES_F: f64 = crate::verified::GROUP_BYTES as f64;

    fn peer(n: u8) -> PeerId {
        mesh_transport::SecretKey::from_seed([n; 32])
            .public()
            .peer_id()
            .unwrap()
    }

    #[test]
    fn splits_between_peers_and_completes() {
        let t0 = Instant::now();
        let mut s = Schedule::new(100, |_| false, 0);
        s.set_peer(peer(1), None, t0);
        s.set_peer(peer(2), None, t0);
        let reqs = s.poll(t0);
        assert!(reqs.iter().any(|r| r.peer == peer(1)) && reqs.iter().any(|r| r.peer == peer(2)));
        // No group is asked of two peers while others are unassigned.
        let mut seen = [0u8; 100];
        for r in &reqs {
            for g in r.start..r.end {
                seen[g as usize] += 1;
            }
        }
        assert!(seen.iter().all(|c| *c <= 1));
    }

    #[test]
    fn a_liar_is_dropped_and_its_groups_go_elsewhere() {
        let t0 = Instant::now();
        let mut s = Schedule::new(8, |_| false, 0);
        s.set_peer(peer(1), None, t0);
        let r = s.poll(t0);
        let r = &r[0];
        s.on_response(r.peer, r.start, &[r.start], true, t0);
        assert!(s.is_banned(&peer(1)));
        assert!(s.poll(t0).is_empty(), "asked a liar again");
        // What the liar was asked for and did not deliver comes from the honest peer.
        s.set_peer(peer(2), None, t0);
        let mut from_honest = Vec::new();
        while !s.is_complete() {
            let again = s.poll(t0);
            assert!(!again.is_empty(), "stuck with an honest peer left");
            for q in again {
                assert_eq!(q.peer, peer(2));
                let groups: Vec<u64> = (q.start..q.end).collect();
                from_honest.extend(groups.iter().copied());
                s.on_response(q.peer, q.start, &groups, false, t0);
            }
        }
        from_honest.sort_unstable();
        let rest: Vec<u64> = (0..8).filter(|g| *g != r.start).collect();
        assert_eq!(from_honest, rest);
    }

    #[test]
    fn a_redirect_narrows_a_peer_for_a_while_without_resting_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(64, |_| false, 0);
        s.set_peer(peer(1), None, t0);
        let first = s.poll(t0);
        let r = first
            .iter()
            .find(|r| r.start == 0)
            .expect("a request from the cursor");
        s.on_redirect(peer(1), r.start, vec![(40, 48)], t0);
        // Asked at once, and only for what it named, even though it says again that it
        // holds everything.
        s.set_peer(peer(1), None, t0);
        let again = s.poll(t0);
        assert!(!again.is_empty(), "a redirect is not a rest");
        for q in &again {
            assert!(q.start >= 40 && q.end <= 48, "{q:?}");
        }
        // Another peer takes the groups the first would not send.
        s.set_peer(peer(2), Some(vec![(0, 8)]), t0);
        let elsewhere = s.poll(t0);
        assert!(elsewhere.iter().any(|q| q.peer == peer(2) && q.start == 0));
        // Afterwards its holdings count again.
        let later = t0 + REDIRECT_VIEW;
        s.set_peer(peer(1), None, later);
        assert!(s.peers[&peer(1)].ranges.is_none());
    }

    #[test]
    fn a_reconnected_peer_is_asked_again_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(64, |_| false, 0);
        s.set_peer(peer(1), None, t0);
        // Its connection is gone: every request fails, and each failure rests it longer.
        let mut now = t0;
        for _ in 0..5 {
            let reqs = s.poll(now);
            assert!(!reqs.is_empty());
            for r in reqs {
                s.on_failure(r.peer, r.start, Failure::Lost, now);
            }
            now = s.peers[&peer(1)].rest_until;
        }
        let back = now - Duration::from_millis(1);
        assert!(s.poll(back).is_empty(), "still resting");
        s.on_reconnected(peer(1), back);
        let again = s.poll(back);
        assert!(!again.is_empty(), "asked again as soon as it is back");
        assert!(again.iter().all(|r| r.peer == peer(1)));
        assert_eq!(s.peers[&peer(1)].rest, REST_INITIAL);
        assert!(s.peers[&peer(1)].rate >= INITIAL_RATE);
    }

    #[test]
    fn an_older_announcement_adds_to_what_a_peer_said_and_hides_nothing() {
        let t0 = Instant::now();
        // The first four groups are held, so whatever the peer is asked for lies past
        // its old announcement.
        let mut s = Schedule::new(64, |g| g < 4, 0);
        // The peer's gossiped announcement is older than its direct answer; the download
        // reads announcements on every turn of its loop.
        s.set_peer(peer(1), Some(vec![(0, 4)]), t0);
        s.set_peer(peer(1), Some(vec![(0, 32)]), t0);
        s.add_peer_ranges(peer(1), Some(vec![(0, 4), (40, 48)]), t0);
        let offered: Vec<u64> = (0..64).filter(|g| s.peers[&peer(1)].holds(*g)).collect();
        let expected: Vec<u64> = (0..32).chain(40..48).collect();
        assert_eq!(offered, expected);
        assert_eq!(s.avail[20], 1);
        assert_eq!(s.avail[40], 1);
        assert_eq!(s.avail[35], 0);
        let asked = s.poll(t0);
        assert!(
            !asked.is_empty(),
            "the peer is asked for more than its old announcement"
        );
        // An announcement of the whole blob is taken as it is.
        s.add_peer_ranges(peer(2), None, t0);
        s.add_peer_ranges(peer(1), None, t0);
        assert!(s.holds_all(&peer(1)) && s.holds_all(&peer(2)));
        // And nothing narrows a peer known to hold all of it.
        s.add_peer_ranges(peer(1), Some(vec![(0, 1)]), t0);
        assert!(s.holds_all(&peer(1)));
    }

    #[test]
    fn partial_holders_are_asked_only_for_what_they_hold() {
        let t0 = Instant::now();
        let mut s = Schedule::new(50, |_| false, 0);
        s.set_peer(peer(1), Some(vec![(10, 20)]), t0);
        for r in s.poll(t0) {
            assert!(r.start >= 10 && r.end <= 20, "{r:?}");
        }
    }

    #[test]
    fn overlapping_and_unsorted_runs_from_a_peer_are_merged() {
        let t0 = Instant::now();
        let mut s = Schedule::new(50, |_| false, 0);
        s.set_peer(
            peer(1),
            // Overlapping, touching, empty, and one run nested in another, so that
            // sorted by start the ends are not in order.
            Some(vec![
                (30, 32),
                (12, 16),
                (10, 14),
                (16, 18),
                (40, 40),
                (20, 26),
                (21, 23),
                (34, 45),
                (35, 37),
                (42, 43),
            ]),
            t0,
        );
        let held = |g: u64| {
            (10..18).contains(&g)
                || (20..26).contains(&g)
                || (30..32).contains(&g)
                || (34..45).contains(&g)
        };
        for g in 0..50 {
            assert_eq!(s.peers[&peer(1)].holds(g), held(g), "group {g}");
        }
        let mut asked = Vec::new();
        for _ in 0..20 {
            let now = t0;
            for r in s.poll(now) {
                for g in r.start..r.end {
                    assert!(held(g), "asked for group {g} the peer does not hold: {r:?}");
                    asked.push(g);
                }
                let got: Vec<u64> = (r.start..r.end).collect();
                s.on_response(r.peer, r.start, &got, false, now);
            }
        }
        asked.sort_unstable();
        assert_eq!(
            asked,
            (10..18)
                .chain(20..26)
                .chain(30..32)
                .chain(34..45)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn resume_skips_what_is_held() {
        let t0 = Instant::now();
        let mut s = Schedule::new(10, |g| g < 7, 0);
        s.set_peer(peer(1), None, t0);
        let mut asked: Vec<u64> = s
            .poll(t0)
            .iter()
            .inspect(|r| assert_eq!(r.peer, peer(1)))
            .flat_map(|r| r.start..r.end)
            .collect();
        asked.sort_unstable();
        assert_eq!(asked, vec![7, 8, 9]);
    }

    #[test]
    fn a_slow_working_peer_gives_way_to_a_clearly_faster_idle_one() {
        let t0 = Instant::now();
        let mut s = Schedule::new(4096, |_| false, 0);
        let working: Vec<PeerId> = (1..=PEERS_ACTIVE_MAX as u8).map(peer).collect();
        for p in &working {
            s.set_peer(*p, None, t0);
        }
        let first = s.poll(t0);
        assert!(working.iter().all(|p| first.iter().any(|r| r.peer == *p)));
        // Every working peer answered, one of them slowly.
        let slow = working[0];
        let t1 = t0 + Duration::from_millis(100);
        for r in &first {
            let groups: Vec<u64> = (r.start..r.end).collect();
            s.on_response(r.peer, r.start, &groups, false, t1);
        }
        s.peers.get_mut(&slow).unwrap().rate = UNTRIED_RANK / (SWAP_RATIO * 4.0);
        for p in &working[1..] {
            s.peers.get_mut(p).unwrap().rate = UNTRIED_RANK * 4.0;
        }
        let _ = s.poll(t1);
        // An idle peer only a little faster than the slow one takes nobody's place.
        let similar = peer(50);
        s.set_peer(similar, None, t1);
        {
            let p = s.peers.get_mut(&similar).unwrap();
            p.measured = true;
            p.rate = UNTRIED_RANK / (SWAP_RATIO * 4.0) * 1.2;
            p.last_response = t1;
        }
        let next = s.poll(t1);
        assert!(next.iter().all(|r| r.peer != similar), "{next:?}");
        assert!(!s.peers[&slow].draining);
        // An untried peer appears; it ranks well above the slow one, which is given
        // nothing more while it finishes what it has.
        let newcomer = peer(100);
        s.set_peer(newcomer, None, t1);
        let next = s.poll(t1);
        assert!(next.iter().any(|r| r.peer == newcomer), "{next:?}");
        assert!(s.peers[&slow].draining);
        // The newcomer, working but not yet measured, is not pushed out by the next
        // untried peer: nobody measured is slow enough to give way.
        let another = peer(101);
        s.set_peer(another, None, t1);
        let next = s.poll(t1);
        assert!(next.iter().all(|r| r.peer != another), "{next:?}");
        assert!(!s.peers[&newcomer].draining);
        let t2 = t1 + Duration::from_millis(50);
        let pending: Vec<(u64, u64)> = s
            .in_flight
            .iter()
            .filter(|((_, p), _)| *p == slow)
            .map(|((start, _), f)| (*start, f.end))
            .collect();
        assert!(!pending.is_empty());
        for r in s.poll(t2) {
            assert_ne!(r.peer, slow, "a draining peer was given more");
        }
        for (start, end) in pending {
            let groups: Vec<u64> = (start..end).collect();
            s.on_response(slow, start, &groups, false, t2);
        }
        assert!(!s.peers[&slow].draining, "drained, it may be chosen again");
    }

    #[test]
    fn a_request_given_up_on_still_counts_against_its_peer() {
        let t0 = Instant::now();
        let mut s = Schedule::new(64, |_| false, 0);
        s.set_peer(peer(1), None, t0);
        let first = s.poll(t0);
        assert_eq!(first.len(), PEER_IN_FLIGHT_MAX);
        // Past every deadline: the groups go back to be asked elsewhere...
        let late = t0 + TIMEOUT_MIN * 2;
        assert!(s.poll(late).is_empty(), "the late peer rests");
        assert_eq!(s.next_deadline(), None, "nothing is waited for any more");
        assert!(first
            .iter()
            .flat_map(|r| r.start..r.end)
            .all(|g| !s.in_flight_at(g)));
        s.set_peer(peer(2), None, late);
        let elsewhere = s.poll(late);
        assert!(!elsewhere.is_empty() && elsewhere.iter().all(|r| r.peer == peer(2)));
        // ... but the late peer, rested, is not sent more while they are unanswered.
        let rested = late + REST_MAX;
        assert!(s.poll(rested).iter().all(|r| r.peer != peer(1)));
        // One late answer frees one slot, delivers its groups and blames nobody twice.
        let r = &first[0];
        s.on_response(peer(1), r.start, &[r.start], false, rested);
        assert!(s.have[r.start as usize]);
        let again = s.poll(rested);
        assert_eq!(again.iter().filter(|q| q.peer == peer(1)).count(), 1);
        let rest_until = s.peers[&peer(1)].rest_until;
        let q = &first[1];
        s.on_failure(peer(1), q.start, Failure::Lost, rested);
        assert_eq!(s.peers[&peer(1)].rest_until, rest_until);
    }

    #[test]
    fn a_rate_at_most_doubles_per_response_and_pipelined_ones_are_timed_from_the_last() {
        let t0 = Instant::now();
        let mut s = Schedule::new(64, |_| false, 0);
        s.set_peer(peer(1), None, t0);
        let first = s.poll(t0);
        assert!(first.len() >= 2);
        // The first answer takes a second: its rate replaces the assumed one.
        let t1 = t0 + Duration::from_secs(1);
        let a = &first[0];
        s.on_response(peer(1), a.start, &[a.start], false, t1);
        assert_eq!(s.peers[&peer(1)].rate, GROUP_BYTES_F);
        // The next was queued behind it and came 100 ms later: timed from the first
        // answer, not from when it was sent, it is ten times as fast, and the rate
        // doubles (it would otherwise have more than quadrupled).
        let b = &first[1];
        s.on_response(
            peer(1),
            b.start,
            &[b.start],
            false,
            t1 + Duration::from_millis(100),
        );
        assert_eq!(s.peers[&peer(1)].rate, GROUP_BYTES_F * RATE_GROWTH_MAX);
        // A burst, a group at once, still only doubles it.
        let c = &first[2];
        s.on_response(
            peer(1),
            c.start,
            &[c.start],
            false,
            t1 + Duration::from_millis(101),
        );
        assert_eq!(
            s.peers[&peer(1)].rate,
            GROUP_BYTES_F * RATE_GROWTH_MAX * 2.0
        );
    }

    #[test]
    fn downloads_order_equally_ranked_peers_differently() {
        let t0 = Instant::now();
        let peers: Vec<PeerId> = (1..=16).map(peer).collect();
        let firsts: std::collections::HashSet<PeerId> = (0..8u64)
            .map(|origin| {
                let mut s = Schedule::new(4096, |_| false, origin * 7919);
                for p in &peers {
                    s.set_peer(*p, None, t0);
                }
                s.poll(t0)[0].peer
            })
            .collect();
        assert!(
            firsts.len() > 2,
            "every download picked the same peers first"
        );
    }

    /// Virtual peers with different rates; one vanishes halfway, one lies once. The
    /// download must finish from whoever remains, with every group verified once.
    #[test]
    fn simulated_swarm_completes_despite_loss_and_lies() {
        let seed: u64 = std::env::var("MESH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("simulated_swarm seed={seed} (replay with MESH_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..20 {
            let groups = rng.gen_range(1..400u64);
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Schedule::new(groups, |_| false, rng.gen());
            let n = rng.gen_range(2..6u8);
            let rates: HashMap<PeerId, f64> = (0..n)
                .map(|i| (peer(i + 1), rng.gen_range(0.2..20.0) * 1024.0 * 1024.0))
                .collect();
            for p in rates.keys() {
                s.set_peer(*p, None, now);
            }
            let vanish = peer(1);
            let liar = peer(2);
            let mut lied = false;
            // (finish time, request) of responses in flight.
            let mut pending: Vec<(Instant, Request)> = Vec::new();
            let mut steps = 0;
            while !s.is_complete() {
                steps += 1;
                assert!(steps < 100_000, "seed {seed} round {round}: no progress");
                for r in s.poll(now) {
                    let rate = rates[&r.peer];
                    let bytes = (r.end - r.start) as f64 * 16384.0;
                    let dt = Duration::from_secs_f64(bytes / rate + rng.gen_range(0.0..0.01));
                    pending.push((now + dt, r));
                }
                pending.sort_by_key(|(t, _)| *t);
                let next = pending.first().map(|(t, _)| *t);
                let deadline = s.next_deadline();
                now = match (next, deadline) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(a), None) => a,
                    (None, Some(b)) => b,
                    (None, None) => now + Duration::from_millis(100),
                };
                if now.duration_since(t0) > Duration::from_millis(300) {
                    s.remove_peer(&vanish);
                }
                while pending.first().is_some_and(|(t, _)| *t <= now) {
                    let (_, r) = pending.remove(0);
                    if r.peer == vanish && now.duration_since(t0) > Duration::from_millis(300) {
                        continue; // it vanished: the response never comes
                    }
                    if r.peer == liar && !lied {
                        lied = true;
                        s.on_response(r.peer, r.start, &[], true, now);
                        continue;
                    }
                    let verified: Vec<u64> = (r.start..r.end).collect();
                    s.on_response(r.peer, r.start, &verified, false, now);
                }
                if !s.is_complete() && !s.has_source() && pending.is_empty() {
                    // Only possible when every peer vanished or lied.
                    assert_eq!(n, 2, "seed {seed} round {round}: stuck with sources left");
                    break;
                }
            }
        }
    }
}
