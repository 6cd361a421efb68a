//! When kad looks for nodes again: a pure decision struct (time passed in, no IO).
//!
//! A node asks kad for the rest of the mesh on its first connection, when its bootstrap
//! peer may know only a few of the nodes that are starting with it. Asking again finds
//! those that joined later, but every ask is a handful of lookups answered by every peer
//! it reaches, so a fleet that asks on a fixed short period pays for it with each node's
//! peers, forever. So the period starts short whenever a peer connects (the mesh is
//! changing) and doubles after each ask up to a cap, the way a settled fleet is left
//! alone.

use std::time::{Duration, Instant};

/// The first interval after a connection: short enough that nodes started together
/// behind one bootstrap peer meet within a minute.
pub const REDISCOVER_INTERVAL_MIN: Duration = Duration::from_secs(15);
/// The interval a settled mesh asks at; kad's own default period.
pub const REDISCOVER_INTERVAL_MAX: Duration = Duration::from_secs(300);

/// The schedule of kad's periodic lookups.
#[derive(Debug)]
pub struct Rediscover {
    min: Duration,
    max: Duration,
    interval: Duration,
    /// No lookup is due before the first connection: nobody could answer it.
    next: Option<Instant>,
}

impl Rediscover {
    pub fn new(min: Duration, max: Duration) -> Rediscover {
        assert!(
            min > Duration::ZERO,
            "a zero interval would ask on every tick"
        );
        assert!(min <= max, "the interval cannot start above its cap");
        Rediscover {
            min,
            max,
            interval: min,
            next: None,
        }
    }

    /// A peer connected that was not connected before: the mesh changed, so the next
    /// lookup comes within the shortest interval (sooner if one was due sooner).
    pub fn on_connected(&mut self, now: Instant) {
        self.interval = self.min;
        let soon = now + self.min;
        self.next = Some(match self.next {
            Some(next) if next < soon => next,
            _ => soon,
        });
    }

    /// Whether a lookup is due now; if so, the next one is scheduled twice as far off
    /// (up to the cap).
    pub fn poll_due(&mut self, now: Instant) -> bool {
        match self.next {
            Some(next) if now >= next => {
                self.interval = (self.interval * 2).min(self.max);
                self.next = Some(now + self.interval);
                true
            }
            _ => false,
        }
    }

    /// When the next lookup is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.next
    }
}

impl Default for Rediscover {
    fn default() -> Self {
        Rediscover::new(REDISCOVER_INTERVAL_MIN, REDISCOVER_INTERVAL_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(15);
    const MAX: Duration = Duration::from_secs(300);

    /// Steps virtual time one second at a time and returns the offsets of due lookups.
    fn run(r: &mut Rediscover, start: Instant, from_s: u64, to_s: u64) -> Vec<u64> {
        (from_s..to_s)
            .filter(|s| r.poll_due(start + Duration::from_secs(*s)))
            .collect()
    }

    #[test]
    fn nothing_is_due_before_a_peer_connects() {
        let t0 = Instant::now();
        let mut r = Rediscover::new(MIN, MAX);
        assert!(run(&mut r, t0, 0, 3600).is_empty());
        assert_eq!(r.next_due(), None);
    }

    #[test]
    fn a_settled_mesh_asks_ever_less_often_up_to_the_cap() {
        let t0 = Instant::now();
        let mut r = Rediscover::new(MIN, MAX);
        r.on_connected(t0);
        let due = run(&mut r, t0, 0, 1000);
        assert_eq!(due, vec![15, 45, 105, 225, 465, 765]);
        let gaps: Vec<u64> = due.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, vec![30, 60, 120, 240, 300]);
        // An hour of a settled mesh costs a dozen lookups, not the 240 a fixed 15 s would.
        let more = run(&mut r, t0, 1000, 4600).len();
        assert_eq!(more, 12);
    }

    #[test]
    fn a_connection_brings_the_next_lookup_near_but_never_delays_one() {
        let t0 = Instant::now();
        let mut r = Rediscover::new(MIN, MAX);
        r.on_connected(t0);
        assert_eq!(run(&mut r, t0, 0, 500), vec![15, 45, 105, 225, 465]);
        // Settled at a long interval; a newcomer connects at 500 s.
        r.on_connected(t0 + Duration::from_secs(500));
        assert_eq!(run(&mut r, t0, 500, 600), vec![515, 545]);
        // Peers connecting one after another keep the next lookup at most MIN away
        // from the first of them: it is not pushed back by each.
        let mut r = Rediscover::new(MIN, MAX);
        for s in 0..10 {
            r.on_connected(t0 + Duration::from_secs(s));
        }
        assert_eq!(r.next_due(), Some(t0 + MIN));
    }

    #[test]
    #[should_panic(expected = "a zero interval")]
    fn a_zero_interval_is_refused() {
        let _ = Rediscover::new(Duration::ZERO, MAX);
    }
}
