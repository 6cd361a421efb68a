//! A token bucket for byte rates (pure: time passed in).
//!
//! Taking more than is available puts the bucket in debt and returns how long to wait
//! before the bytes may go, so a caller sends a large piece at once and then pauses,
//! and the long-run rate is exact.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` in bytes per second; `burst` is how much may go at once after a quiet spell.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` bytes; returns how long to wait before sending them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert_eq!(b.take(100, t0), Duration::ZERO);
        // 500 more bytes at 1000 B/s: half a second of debt.
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // After waiting it out the bucket is even again.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(0, t1), Duration::ZERO);
        // Sending 10 kB in 1 kB pieces, sleeping as told, takes 10 s.
        let mut now = t1;
        for _ in 0..10 {
            now += b.take(1000, now);
        }
        let elapsed = now.duration_since(t1).as_secs_f64();
        assert!((elapsed - 10.0).abs() < 0.01, "{elapsed}");
    }

    #[test]
    fn burst_is_capped_after_idle() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(100, later), Duration::ZERO);
        assert_eq!(b.take(100, later), Duration::from_millis(100));
    }
}
