//! Which addresses to dial, and when: a pure decision struct (time passed in, no IO).
//!
//! Bootstrap addresses are kept forever and redialed with exponential backoff whenever
//! no connection to them is up, so a node that restarts, or whose bootstrap peer restarts,
//! rejoins on its own. Addresses learned from peers (identify) are redialed the same way
//! but forgotten after a while without a connection, so a fleet that shrinks stops being
//! dialed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// Enough addresses for every member of a mid-sized site to be redialed directly; beyond
/// that kad and gossip find the rest, so learned addresses are dropped first.
pub const DIAL_TARGETS_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct RedialPolicy {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A learned (non-bootstrap) address is forgotten after this long without a connection.
    pub forget_after: Duration,
}

impl Default for RedialPolicy {
    fn default() -> Self {
        RedialPolicy {
            // Short first retry so a restarted peer is rejoined within a couple of seconds.
            backoff_initial: Duration::from_millis(500),
            // Capped so a peer that was down for an hour is found again within half a minute.
            backoff_max: Duration::from_secs(30),
            forget_after: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug)]
struct Target {
    peer: Option<PeerId>,
    bootstrap: bool,
    connected: bool,
    backoff: Duration,
    next_at: Instant,
    last_connected: Instant,
}

/// Dial schedule for bootstrap and learned addresses.
#[derive(Debug)]
pub struct Redial {
    policy: RedialPolicy,
    targets: HashMap<Multiaddr, Target>,
    connected_peers: HashSet<PeerId>,
}

impl Redial {
    pub fn new(policy: RedialPolicy) -> Redial {
        Redial {
            policy,
            targets: HashMap::new(),
            connected_peers: HashSet::new(),
        }
    }

    /// Adds a bootstrap address, due at once.
    pub fn add_bootstrap(&mut self, addr: Multiaddr, now: Instant) {
        let peer = peer_of(&addr);
        let backoff = self.policy.backoff_initial;
        self.targets.insert(
            addr,
            Target {
                peer,
                bootstrap: true,
                connected: false,
                backoff,
                next_at: now,
                last_connected: now,
            },
        );
    }

    /// Remembers addresses a connected peer says it listens on.
    pub fn learn(&mut self, peer: PeerId, addrs: &[Multiaddr], now: Instant) {
        let connected = self.connected_peers.contains(&peer);
        for addr in addrs {
            if let Some(t) = self.targets.get_mut(addr) {
                t.peer = Some(peer);
                t.connected = connected;
                continue;
            }
            if self.targets.len() >= DIAL_TARGETS_MAX && !self.evict_one() {
                return;
            }
            self.targets.insert(
                addr.clone(),
                Target {
                    peer: Some(peer),
                    bootstrap: false,
                    connected,
                    backoff: self.policy.backoff_initial,
                    next_at: now + self.policy.backoff_initial,
                    last_connected: now,
                },
            );
        }
    }

    pub fn on_connected(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) {
        self.connected_peers.insert(peer);
        let initial = self.policy.backoff_initial;
        for (a, t) in self.targets.iter_mut() {
            if a == addr || strip_p2p(a) == strip_p2p(addr) {
                t.peer = Some(peer);
            }
            if t.peer == Some(peer) {
                t.connected = true;
                t.backoff = initial;
                t.last_connected = now;
            }
        }
    }

    /// `remaining` is how many connections to the peer are still open.
    pub fn on_disconnected(&mut self, peer: PeerId, remaining: u32, now: Instant) {
        if remaining > 0 {
            return;
        }
        self.connected_peers.remove(&peer);
        let initial = self.policy.backoff_initial;
        for t in self.targets.values_mut() {
            if t.peer == Some(peer) {
                t.connected = false;
                t.backoff = initial;
                t.next_at = now + initial;
                t.last_connected = now;
            }
        }
    }

    /// Addresses to dial now. Each returned address is rescheduled with its backoff
    /// doubled, so a failed dial needs no separate report.
    pub fn poll_due(&mut self, now: Instant) -> Vec<Multiaddr> {
        let forget_after = self.policy.forget_after;
        self.targets.retain(|_, t| {
            t.bootstrap || t.connected || now.duration_since(t.last_connected) < forget_after
        });
        let max = self.policy.backoff_max;
        let mut due = Vec::new();
        for (addr, t) in self.targets.iter_mut() {
            let peer_up = t
                .peer
                .map(|p| self.connected_peers.contains(&p))
                .unwrap_or(false);
            if t.connected || peer_up || t.next_at > now {
                continue;
            }
            due.push(addr.clone());
            t.next_at = now + t.backoff;
            t.backoff = (t.backoff * 2).min(max);
        }
        due.sort();
        due
    }

    /// The earliest time something becomes due, for the driver's timer.
    pub fn next_due(&self) -> Option<Instant> {
        self.targets
            .values()
            .filter(|t| !t.connected)
            .map(|t| t.next_at)
            .min()
    }

    fn evict_one(&mut self) -> bool {
        let victim = self
            .targets
            .iter()
            .filter(|(_, t)| !t.bootstrap && !t.connected)
            .min_by_key(|(_, t)| t.last_connected)
            .map(|(a, _)| a.clone());
        match victim {
            Some(a) => {
                self.targets.remove(&a);
                true
            }
            None => false,
        }
    }
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .unwrap()
    }

    #[test]
    fn bootstrap_backs_off_and_stops_when_connected() {
        let t0 = Instant::now();
        let mut r = Redial::new(RedialPolicy::default());
        r.add_bootstrap(addr(1), t0);
        assert_eq!(r.poll_due(t0), vec![addr(1)]);
        assert!(r.poll_due(t0).is_empty());
        assert_eq!(r.poll_due(t0 + Duration::from_millis(500)), vec![addr(1)]);
        // Backoff doubled to 1 s.
        assert!(r.poll_due(t0 + Duration::from_millis(1200)).is_empty());
        assert_eq!(r.poll_due(t0 + Duration::from_millis(1500)), vec![addr(1)]);
        let peer = PeerId::random();
        r.on_connected(peer, &addr(1), t0 + Duration::from_secs(2));
        assert!(r.poll_due(t0 + Duration::from_secs(100)).is_empty());
        r.on_disconnected(peer, 0, t0 + Duration::from_secs(100));
        assert!(r.poll_due(t0 + Duration::from_secs(100)).is_empty());
        assert_eq!(
            r.poll_due(t0 + Duration::from_millis(100_500)),
            vec![addr(1)]
        );
    }

    #[test]
    fn backoff_is_capped() {
        let t0 = Instant::now();
        let mut r = Redial::new(RedialPolicy::default());
        r.add_bootstrap(addr(1), t0);
        let mut now = t0;
        let mut last_gap = Duration::ZERO;
        for _ in 0..20 {
            let next = r.next_due().unwrap();
            last_gap = next.duration_since(now);
            now = next;
            assert_eq!(r.poll_due(now).len(), 1);
        }
        assert!(last_gap <= Duration::from_secs(30));
    }

    #[test]
    fn learned_addresses_are_forgotten_but_bootstrap_is_not() {
        let t0 = Instant::now();
        let mut r = Redial::new(RedialPolicy::default());
        r.add_bootstrap(addr(1), t0);
        let peer = PeerId::random();
        r.on_connected(peer, &addr(2), t0);
        r.learn(peer, &[addr(2)], t0);
        r.on_disconnected(peer, 0, t0);
        let later = t0 + Duration::from_secs(601);
        let due = r.poll_due(later);
        assert_eq!(due, vec![addr(1)]);
    }

    #[test]
    fn a_second_connection_closing_keeps_the_peer_up() {
        let t0 = Instant::now();
        let mut r = Redial::new(RedialPolicy::default());
        let peer = PeerId::random();
        r.learn(peer, &[addr(3)], t0);
        r.on_connected(peer, &addr(3), t0);
        r.on_disconnected(peer, 1, t0);
        assert!(r.poll_due(t0 + Duration::from_secs(5)).is_empty());
    }
}
