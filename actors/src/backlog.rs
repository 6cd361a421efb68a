//! How much a node has promised to send and its uplink has not yet delivered, in time.
//!
//! A node answers range requests with responses that then wait in its transport's send
//! buffers until its uplink carries them. Accepting every request let a node that held
//! something many peers wanted queue nearly two seconds of responses, while the uplinks of
//! other nodes, which held other groups those peers also needed, sat idle: the peers'
//! request slots were taken by requests waiting in the queue. [`Backlog`] measures what
//! is queued against the rate the uplink actually delivers and tells the server to
//! answer `Busy` once more than [`BACKLOG_MAX`] of it is waiting, so downloaders turn to
//! other peers for other groups (BitTorrent's choking, sized by time instead of by a
//! count of peers). In the fleet model (`swarm_model`), 32 nodes on 20 Mbit/s uplinks
//! went from 1.6 to 2.0 blob-times to 1.4 to 1.7.
//!
//! It is a plain struct: the caller passes `now` and the sizes and fates of responses.

use std::time::{Duration, Instant};

/// The longest a new response should wait behind those already queued: long enough that
/// an uplink never idles between a response and the requests that follow it (a round
/// trip through shaped queues of up to 200 ms each way, plus a peer's reaction), short
/// enough that a request refused here is soon placed elsewhere. In the fleet model a
/// second and half a second did about equally well at 20 Mbit/s (1.5 and 1.4
/// blob-times for 32 nodes, 1.6 to 2.0 without), and a second refused a third as many
/// requests; in the benchmark the two could not be told apart.
pub const BACKLOG_MAX: Duration = Duration::from_millis(1000);
/// How long deliveries are summed into one measurement of the uplink's rate: several
/// responses at any useful rate, and a few measurements within one `BACKLOG_MAX`.
pub const RATE_WINDOW: Duration = Duration::from_millis(250);
/// The first measurement is taken as soon as this much was delivered, however short the
/// busy time: a transfer over a fast link would otherwise run its course unmeasured and
/// be held to the limit below (a 16 MiB loopback transfer took three to four times as
/// long). A few first responses (downloaders start at one group and double).
pub const FIRST_SAMPLE_BYTES: u64 = 64 * 1024;
/// What may be queued before any rate was measured: a first response to each of a few
/// dozen peers (downloaders start with requests of one group), under a second of a
/// 5 Mbit/s uplink. Much more would let a thin uplink queue far more than `BACKLOG_MAX`
/// before it is measured, and then refuse everyone until that queue drains.
pub const UNMEASURED_BYTES_MAX: u64 = 512 * 1024;

/// Responses queued on a node's uplink and the rate it delivers them at.
#[derive(Debug)]
pub struct Backlog {
    /// Bytes of responses handed to the transport and not yet delivered or failed.
    queued: u64,
    /// Bytes per second the uplink delivered while it had something queued; `None`
    /// until a first measurement.
    rate: Option<f64>,
    /// When the queue was last looked at.
    last: Instant,
    /// Time with something queued in the current window, and the bytes delivered in
    /// it. Time with nothing queued is left out: an idle uplink says nothing of its
    /// rate, and counted, it made a lone fast transfer look slow and held it back.
    window_busy: Duration,
    window_delivered: u64,
}

impl Backlog {
    pub fn new(now: Instant) -> Backlog {
        Backlog {
            queued: 0,
            rate: None,
            last: now,
            window_busy: Duration::ZERO,
            window_delivered: 0,
        }
    }

    /// Whether a new request should be served now. An empty queue always admits, so a
    /// node that measured its rate too low still serves and measures again.
    pub fn admits(&mut self, now: Instant) -> bool {
        self.count_busy(now);
        self.close_window();
        if self.queued == 0 {
            return true;
        }
        match self.rate {
            None => self.queued <= UNMEASURED_BYTES_MAX,
            Some(rate) => self.queued as f64 <= rate * BACKLOG_MAX.as_secs_f64(),
        }
    }

    /// A response of `bytes` was handed to the transport.
    pub fn on_queued(&mut self, bytes: u64, now: Instant) {
        self.count_busy(now);
        self.queued = self.queued.saturating_add(bytes);
    }

    /// A response of `bytes` left the queue: `delivered` when the peer acknowledged all of
    /// it, otherwise it failed or its fate is unknown, and it says nothing of the rate.
    pub fn on_done(&mut self, bytes: u64, delivered: bool, now: Instant) {
        debug_assert!(
            bytes <= self.queued,
            "a response left that was never queued"
        );
        // The time up to now was spent on these bytes too: count it before they leave.
        self.count_busy(now);
        self.queued = self.queued.saturating_sub(bytes);
        if delivered {
            self.window_delivered = self.window_delivered.saturating_add(bytes);
        }
        self.close_window();
    }

    /// Bytes queued now.
    pub fn queued(&self) -> u64 {
        self.queued
    }

    /// The measured rate of the uplink, bytes per second.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Counts the time since the last look as busy if something was queued.
    fn count_busy(&mut self, now: Instant) {
        if self.queued > 0 {
            self.window_busy += now.saturating_duration_since(self.last);
        }
        self.last = self.last.max(now);
    }

    /// Closes the window once it holds `RATE_WINDOW` of busy time (or, before a first
    /// measurement, `FIRST_SAMPLE_BYTES` of deliveries) and something was delivered:
    /// its deliveries over its busy time are averaged into the rate. A window with no
    /// deliveries yet stays open, so a response slow to be acknowledged is measured over
    /// all the time it took rather than over what was left of a fresh window.
    fn close_window(&mut self) {
        if self.window_delivered == 0 || self.window_busy.is_zero() {
            return;
        }
        let first = self.rate.is_none() && self.window_delivered >= FIRST_SAMPLE_BYTES;
        if self.window_busy < RATE_WINDOW && !first {
            return;
        }
        let sample = self.window_delivered as f64 / self.window_busy.as_secs_f64();
        self.rate = Some(self.rate.map_or(sample, |rate| (rate + sample) / 2.0));
        self.window_busy = Duration::ZERO;
        self.window_delivered = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// An uplink that sends queued responses in order at a rate given per run.
    #[derive(Default)]
    struct Link {
        queue: std::collections::VecDeque<u64>,
        carried: u64,
    }

    impl Link {
        /// Runs for `secs` at `rate` bytes a second, queueing `response`-byte responses
        /// whenever `b` admits one (peers that always want more); returns the time reached.
        fn run(
            &mut self,
            b: &mut Backlog,
            t0: Instant,
            rate: u64,
            response: u64,
            secs: u64,
        ) -> Instant {
            let mut t = t0;
            let end = t0 + Duration::from_secs(secs);
            while t < end {
                while b.admits(t) {
                    b.on_queued(response, t);
                    self.queue.push_back(response);
                }
                t += MS;
                self.carried += rate / 1000;
                while self.queue.front().is_some_and(|r| *r <= self.carried) {
                    let r = self.queue.pop_front().unwrap();
                    self.carried -= r;
                    b.on_done(r, true, t);
                }
            }
            t
        }
    }

    #[test]
    fn an_empty_queue_always_admits() {
        let t0 = Instant::now();
        let mut b = Backlog::new(t0);
        assert!(b.admits(t0));
        b.on_queued(UNMEASURED_BYTES_MAX + 1, t0);
        assert!(!b.admits(t0), "more than the unmeasured limit is too much");
        b.on_done(UNMEASURED_BYTES_MAX + 1, false, t0 + MS);
        assert!(b.admits(t0 + MS));
        assert_eq!(b.rate(), None, "a failed response measures nothing");
    }

    #[test]
    fn a_saturated_uplink_is_measured_and_its_queue_held_near_the_limit() {
        let t0 = Instant::now();
        for rate in [625_000u64, 2_500_000, 50_000_000] {
            let mut b = Backlog::new(t0);
            Link::default().run(&mut b, t0, rate, 48 * 1024, 5);
            let measured = b.rate().unwrap();
            assert!(
                (measured / rate as f64 - 1.0).abs() < 0.2,
                "{rate} B/s measured as {measured}"
            );
            // The queue holds about BACKLOG_MAX of the uplink's time, never much more.
            let queued = b.queued() as f64 / rate as f64 / BACKLOG_MAX.as_secs_f64();
            assert!(queued <= 1.2, "{rate} B/s: {queued} of the limit queued");
            assert!(
                queued >= 0.6,
                "{rate} B/s: only {queued} of the limit queued"
            );
        }
    }

    #[test]
    fn a_fast_link_is_measured_within_milliseconds() {
        // A lone downloader on loopback: a megabyte delivered every 3 ms, one at a time
        // while unmeasured. After the first the rate is known and its pipeline of four
        // megabyte requests is admitted.
        let t0 = Instant::now();
        let mut b = Backlog::new(t0);
        let mut t = t0;
        while b.rate().is_none() {
            assert!(t < t0 + 10 * MS, "still unmeasured at {:?}", t - t0);
            assert!(b.admits(t));
            b.on_queued(1 << 20, t);
            t += 3 * MS;
            b.on_done(1 << 20, true, t);
        }
        for _ in 0..4 {
            assert!(b.admits(t));
            b.on_queued(1 << 20, t);
        }
    }

    #[test]
    fn a_response_slow_to_be_acknowledged_is_measured_over_all_its_time() {
        // The first response takes 400 ms to be acknowledged (a thin link, or queues on
        // the way back): its rate is its bytes over those 400 ms, not over a fraction.
        let t0 = Instant::now();
        let mut b = Backlog::new(t0);
        b.on_queued(100_000, t0);
        for ms in [100, 200, 300] {
            assert!(b.admits(t0 + ms * MS));
        }
        b.on_done(100_000, true, t0 + 400 * MS);
        assert!(b.admits(t0 + 500 * MS));
        let rate = b.rate().unwrap();
        assert!((rate - 250_000.0).abs() < 1_000.0, "{rate}");
    }

    #[test]
    fn a_slower_uplink_lowers_the_estimate_and_a_faster_one_raises_it() {
        let t0 = Instant::now();
        let mut b = Backlog::new(t0);
        let mut link = Link::default();
        let t = link.run(&mut b, t0, 2_500_000, 48 * 1024, 3);
        let t = link.run(&mut b, t, 625_000, 48 * 1024, 4);
        let slow = b.rate().unwrap();
        assert!(
            slow < 700_000.0,
            "the estimate followed the rate down: {slow}"
        );
        link.run(&mut b, t, 5_000_000, 48 * 1024, 3);
        let fast = b.rate().unwrap();
        assert!(
            fast > 4_000_000.0,
            "the estimate followed the rate up: {fast}"
        );
    }

    #[test]
    fn idle_time_does_not_lower_the_estimate() {
        let t0 = Instant::now();
        let mut b = Backlog::new(t0);
        let mut link = Link::default();
        let t = link.run(&mut b, t0, 2_500_000, 48 * 1024, 2);
        let measured = b.rate().unwrap();
        // What is queued fails (its peers went away); then nothing for ten seconds, then
        // one response delivered at the uplink's rate. Counted as busy, the ten idle
        // seconds would have closed a window with a rate near zero.
        b.on_done(b.queued(), false, t);
        let t = t + Duration::from_secs(10);
        assert!(b.admits(t));
        b.on_queued(48 * 1024, t);
        let t = t + Duration::from_millis(20);
        b.on_done(48 * 1024, true, t);
        let after = b.rate().unwrap();
        assert!(after >= measured * 0.9, "{measured} fell to {after}");
    }
}
