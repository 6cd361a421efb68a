//! Which peers are banned, and until when. One list, shared by the swarm driver (which
//! bans, lifts bans and refuses connections) and the blob data endpoint (which refuses
//! the banned peers' connections and requests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use libp2p::PeerId;

/// Peers banned at once; the oldest ban is lifted early when more are added.
pub const BANNED_PEERS_MAX: usize = 1024;

/// The banned peers and when each ban ends, at most [`BANNED_PEERS_MAX`] of them.
#[derive(Debug, Default)]
pub struct Bans {
    until: HashMap<PeerId, Instant>,
}

/// The list as the driver and the data endpoint hold it.
pub type SharedBans = Arc<Mutex<Bans>>;

impl Bans {
    /// Bans `peer` until `until`. When the list is full, the ban that ends first is
    /// lifted to make room, and that peer is returned.
    pub fn insert(&mut self, peer: PeerId, until: Instant) -> Option<PeerId> {
        let mut lifted = None;
        if !self.until.contains_key(&peer) && self.until.len() >= BANNED_PEERS_MAX {
            lifted = self.until.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p);
            if let Some(p) = &lifted {
                self.until.remove(p);
            }
        }
        self.until.insert(peer, until);
        lifted
    }

    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.until.get(peer).is_some_and(|t| now < *t)
    }

    /// Lifts the bans that ended by `now` and returns those peers.
    pub fn lift_expired(&mut self, now: Instant) -> Vec<PeerId> {
        let expired: Vec<PeerId> = self
            .until
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &expired {
            self.until.remove(p);
        }
        expired
    }
}

/// Locks the list; a panic elsewhere while it was held leaves it usable.
pub fn lock(bans: &SharedBans) -> MutexGuard<'_, Bans> {
    bans.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_list_lifts_the_ban_that_ends_first() {
        let t0 = Instant::now();
        let mut bans = Bans::default();
        let first = PeerId::random();
        assert_eq!(bans.insert(first, t0 + Duration::from_secs(1)), None);
        for i in 1..BANNED_PEERS_MAX {
            let until = t0 + Duration::from_secs(10 + i as u64);
            assert_eq!(bans.insert(PeerId::random(), until), None);
        }
        let newcomer = PeerId::random();
        assert_eq!(
            bans.insert(newcomer, t0 + Duration::from_secs(5)),
            Some(first)
        );
        assert!(!bans.is_banned(&first, t0));
        assert!(bans.is_banned(&newcomer, t0));
        assert!(!bans.is_banned(&newcomer, t0 + Duration::from_secs(5)));
        assert_eq!(
            bans.lift_expired(t0 + Duration::from_secs(5)),
            vec![newcomer]
        );
    }
}
