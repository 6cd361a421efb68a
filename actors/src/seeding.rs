//! Which blob requests a serving node answers with data and which it sends elsewhere:
//! the decision half of super-seeding (pure: time passed in, no IO).
//!
//! A node's uplink is what limits how fast a release leaves it. When several peers
//! fetch the same blob at once, each of them picks groups from what it knows, and what
//! it knows of the others lags by an announcement; left alone, the publisher ends up
//! sending the same groups to many peers (about five copies of a blob to a fleet of 16
//! on 20 Mbit/s links), and the fleet waits for its uplink. The server is the one place
//! that knows what it has already sent. So while two or more peers fetch a blob, a node
//! holding all of it answers a request for groups it already sent to another peer with
//! the runs it has sent least, and the requester takes the rest from the peers that got
//! them: every group goes out once before any goes twice (what BitTorrent calls
//! super-seeding). A send is forgotten after [`SENT_MEMORY`], so a group whose
//! recipient vanished is served again, and a peer asking again for what it was sent (it
//! lost it) is served.
//!
//! A node still downloading the blob is not asked to decide: it serves whatever it
//! holds to whoever asks. What it holds came to it because it was rare, and the fleet
//! needs each of those groups from it many times over; holding them back for a while
//! after one send (as this module once did at every holder) made each group spread by
//! doubling, one hop per round trip, and the fleet's uplinks sat idle behind it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_transport::ContentId;

/// How long a send holds a group back from other peers: long enough for the peer it
/// went to to receive it and tell the others (announcements go out every second,
/// direct have queries every half second) even on a thin, busy link; short enough that
/// a group whose recipient went away is not held back for long.
pub const SENT_MEMORY: Duration = Duration::from_secs(10);
/// Peers that fetched a blob within this long count as fetching it together.
pub const FETCHERS_WINDOW: Duration = Duration::from_secs(2);
/// Blobs whose sends are remembered; the least recently served is forgotten first.
/// Each costs 32 bytes a group, 2 MiB for a blob of the largest size (1 GiB), and a
/// node rarely serves more than a release or two at once.
pub const SEEDED_BLOBS_MAX: usize = 4;
/// Runs of unsent groups named in one redirect (bounds the response).
pub const FRESH_RUNS_MAX: usize = 64;
/// Groups looked at when collecting those runs, so a redirect stays cheap on a large
/// blob (4096 groups of 16 KiB are 64 MiB).
pub const FRESH_SCAN_GROUPS_MAX: u64 = 4096;
/// Peers remembered per blob as its recent fetchers (bounds the map).
pub const FETCHERS_MAX: usize = 256;

/// What to do with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send the groups.
    Serve,
    /// Most of the groups were just sent to other peers: these runs (`start..end`)
    /// were not, and are what this node would send now. May be empty.
    Elsewhere(Vec<(u64, u64)>),
}

#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    /// Times sent (saturating).
    count: u16,
    /// When it was last sent, and to which peer (a tag of its id).
    last: Option<(Instant, u64)>,
}

#[derive(Debug)]
struct Blob {
    sent: Vec<Sent>,
    /// The fewest times any group was sent, and how many groups were sent that often:
    /// a group sent more often than that waits until every other group caught up.
    min: u16,
    at_min: u64,
    /// When each recent fetcher last asked for groups.
    fetchers: HashMap<u64, Instant>,
    used: Instant,
}

impl Blob {
    fn new(groups: u64, now: Instant) -> Blob {
        Blob {
            sent: vec![Sent::default(); groups as usize],
            min: 0,
            at_min: groups,
            fetchers: HashMap::new(),
            used: now,
        }
    }

    fn mark(&mut self, g: u64, peer: u64, now: Instant) {
        let s = &mut self.sent[g as usize];
        if s.count == self.min {
            self.at_min -= 1;
        }
        s.count = s.count.saturating_add(1);
        s.last = Some((now, peer));
        if self.at_min == 0 {
            // Every group has now been sent more than `min` times; find the new floor.
            self.min = self.sent.iter().map(|s| s.count).min().unwrap_or(0);
            self.at_min = self.sent.iter().filter(|s| s.count == self.min).count() as u64;
        }
    }
}

/// The sends a node remembers, per blob.
#[derive(Debug, Default)]
pub struct Seeding {
    blobs: HashMap<ContentId, Blob>,
}

impl Seeding {
    pub fn new() -> Seeding {
        Seeding::default()
    }

    /// Decides on a request from the peer tagged `peer` for groups `start..end` of
    /// blob `id`, which this node holds whole and which has `groups` groups. A served
    /// request is remembered as sent.
    pub fn decide(
        &mut self,
        id: ContentId,
        groups: u64,
        peer: u64,
        start: u64,
        end: u64,
        now: Instant,
    ) -> Decision {
        let end = end.min(groups);
        if start >= end {
            // Not ours to judge: the encoder answers an empty or invalid range.
            return Decision::Serve;
        }
        if !self.blobs.contains_key(&id) && self.blobs.len() >= SEEDED_BLOBS_MAX {
            if let Some(oldest) = self
                .blobs
                .iter()
                .min_by_key(|(_, b)| b.used)
                .map(|(k, _)| *k)
            {
                self.blobs.remove(&oldest);
            }
        }
        let blob = self
            .blobs
            .entry(id)
            .or_insert_with(|| Blob::new(groups, now));
        if blob.sent.len() as u64 != groups {
            // The same id with another size is a confused or lying peer; start over
            // rather than index out of bounds.
            *blob = Blob::new(groups, now);
        }
        blob.used = now;
        blob.fetchers
            .retain(|_, t| now.duration_since(*t) < FETCHERS_WINDOW);
        if blob.fetchers.len() < FETCHERS_MAX || blob.fetchers.contains_key(&peer) {
            blob.fetchers.insert(peer, now);
        }
        let min = blob.min;
        // Due: a group that may go to anyone now. The requester may also have again what
        // it was sent itself (it asks because it lost it), but it is not pointed at it.
        let due = |s: &Sent| match s.last {
            None => true,
            Some((t, _)) => s.count <= min || now.duration_since(t) >= SENT_MEMORY,
        };
        let fresh = |s: &Sent| due(s) || s.last.is_some_and(|(_, p)| p == peer);
        let all_fresh = blob.sent[start as usize..end as usize].iter().all(fresh);
        // Alone, a fetcher is never redirected: there is nobody to take the groups from.
        // With others, only a request for groups that are all due is served; one that
        // repeats some is pointed at the due runs, which start at its first due group,
        // so it costs the requester one round trip and the uplink nothing.
        if blob.fetchers.len() < 2 || all_fresh {
            for g in start..end {
                blob.mark(g, peer, now);
            }
            return Decision::Serve;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let scan = FRESH_SCAN_GROUPS_MAX.min(groups);
        for i in 0..scan {
            // From the request on, wrapping, so each requester is pointed near where it
            // was looking and different requesters are pointed at different places.
            let g = (start + i) % groups;
            if !due(&blob.sent[g as usize]) {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.1 == g => last.1 = g + 1,
                _ => {
                    if runs.len() == FRESH_RUNS_MAX {
                        break;
                    }
                    runs.push((g, g + 1));
                }
            }
        }
        Decision::Elsewhere(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn id(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    #[test]
    fn a_lone_fetcher_is_always_served() {
        let t0 = Instant::now();
        let mut s = Seeding::new();
        for _ in 0..3 {
            assert_eq!(s.decide(id(1), 64, 7, 0, 64, t0), Decision::Serve);
        }
    }

    #[test]
    fn a_second_fetcher_is_pointed_at_what_the_first_was_not_sent() {
        let t0 = Instant::now();
        let mut s = Seeding::new();
        assert_eq!(s.decide(id(1), 64, 1, 0, 16, t0), Decision::Serve);
        // Peer 2 asks for groups peer 1 was just sent: redirected to the rest,
        // starting where it asked, wrapping.
        assert_eq!(
            s.decide(id(1), 64, 2, 0, 16, t0),
            Decision::Elsewhere(vec![(16, 64)])
        );
        // A request repeating even a few groups is pointed at the due ones, from its
        // first due group on; new groups are served.
        assert_eq!(
            s.decide(id(1), 64, 2, 10, 30, t0),
            Decision::Elsewhere(vec![(16, 64)])
        );
        assert_eq!(s.decide(id(1), 64, 2, 16, 30, t0), Decision::Serve);
        // Peer 1 asking again for what it was sent (it lost it) is served, but peer 1 is
        // not pointed at groups peer 2 got.
        assert_eq!(s.decide(id(1), 64, 1, 0, 16, t0), Decision::Serve);
        assert_eq!(
            s.decide(id(1), 64, 1, 0, 20, t0),
            Decision::Elsewhere(vec![(30, 64)])
        );
    }

    #[test]
    fn sends_are_forgotten_after_a_while() {
        let t0 = Instant::now();
        let mut s = Seeding::new();
        assert_eq!(s.decide(id(1), 16, 1, 0, 8, t0), Decision::Serve);
        assert_eq!(
            s.decide(id(1), 16, 2, 0, 8, t0),
            Decision::Elsewhere(vec![(8, 16)])
        );
        let later = t0 + SENT_MEMORY;
        assert_eq!(s.decide(id(1), 16, 2, 0, 8, later), Decision::Serve);
    }

    #[test]
    fn a_whole_copy_goes_out_before_any_group_goes_twice() {
        let seed = crate::restart::test_seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t0 = Instant::now();
        let mut s = Seeding::new();
        let groups = 256;
        // Four peers, each asking for up to 4 groups it lacks from a random place (or,
        // after a redirect, like a real requester, within a run it was offered).
        let mut held = vec![vec![false; groups as usize]; 4];
        let mut offered: Vec<Option<(u64, u64)>> = vec![None; 4];
        let mut sent = 0u64;
        for round in 0..10_000 {
            let p = round % 4;
            let h = &mut held[p as usize];
            let (from, limit) = offered[p as usize]
                .take()
                .unwrap_or((rng.gen_range(0..groups), groups));
            let Some(start) = (from..limit).chain(0..from).find(|g| !h[*g as usize]) else {
                continue;
            };
            let limit = if start < from { from } else { limit };
            let mut end = start + 1;
            while end < limit && end - start < 4 && !h[end as usize] {
                end += 1;
            }
            match s.decide(id(1), groups, p, start, end, t0) {
                Decision::Serve => {
                    sent += end - start;
                    for g in start..end {
                        h[g as usize] = true;
                    }
                }
                Decision::Elsewhere(runs) => {
                    // A complete holder always has some group to offer.
                    offered[p as usize] = Some(*runs.first().expect("fresh runs"));
                }
            }
            if s.blobs[&id(1)].min >= 1 {
                break;
            }
        }
        assert!(
            s.blobs[&id(1)].min >= 1,
            "seed {seed}: never sent a whole copy"
        );
        // Every group went out exactly once.
        assert!(
            sent == groups,
            "seed {seed}: sent {sent} groups for one copy of {groups}"
        );
    }

    #[test]
    fn fetchers_that_went_quiet_no_longer_count() {
        let t0 = Instant::now();
        let mut s = Seeding::new();
        assert_eq!(s.decide(id(1), 8, 1, 0, 4, t0), Decision::Serve);
        // Peer 1 stopped asking; peer 2 alone is served even what peer 1 got.
        let later = t0 + FETCHERS_WINDOW;
        assert_eq!(s.decide(id(1), 8, 2, 0, 4, later), Decision::Serve);
    }

    #[test]
    fn remembered_blobs_and_runs_are_bounded() {
        let t0 = Instant::now();
        let mut s = Seeding::new();
        for n in 0..(SEEDED_BLOBS_MAX as u8 + 4) {
            s.decide(id(n), 4, 1, 0, 1, t0 + Duration::from_millis(n.into()));
        }
        assert_eq!(s.blobs.len(), SEEDED_BLOBS_MAX);
        // The memory figure SEEDED_BLOBS_MAX is sized by.
        assert!(std::mem::size_of::<Sent>() <= 32);
        assert!(
            !s.blobs.contains_key(&id(0)),
            "the least recently used goes first"
        );
        // Every other group sent: the redirect names at most FRESH_RUNS_MAX runs.
        let groups = 1000;
        for g in (0..groups).step_by(2) {
            s.decide(id(200), groups, 1, g, g + 1, t0);
        }
        s.decide(id(200), groups, 3, 1, 2, t0);
        match s.decide(id(200), groups, 2, 0, 1, t0) {
            Decision::Elsewhere(runs) => {
                assert_eq!(runs.len(), FRESH_RUNS_MAX);
                assert!(runs.iter().all(|(a, b)| b - a == 1 && a % 2 == 1));
            }
            d => panic!("expected a redirect, got {d:?}"),
        }
    }

    #[test]
    fn a_size_mismatch_starts_over_instead_of_panicking() {
        let t0 = Instant::now();
        let mut s = Seeding::new();
        s.decide(id(1), 8, 1, 0, 8, t0);
        assert_eq!(s.decide(id(1), 4, 2, 0, 4, t0), Decision::Serve);
        assert_eq!(s.decide(id(1), 4, 2, 0, 100, t0), Decision::Serve);
    }
}
