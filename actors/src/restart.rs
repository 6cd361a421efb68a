//! Restart intensity and backoff: the decision a supervisor consults when a child fails.
//!
//! This is a plain struct with no clock of its own and no async: the caller passes `now`
//! and gets back what to do. Keeping the decision here, away from the actors, lets the
//! tests drive it with virtual time and check its invariant over random schedules.
//!
//! The semantics are Erlang's: a supervisor allows at most `intensity` restarts within any
//! sliding window of length `period`; the failure that would make it `intensity + 1`
//! means the child is broken rather than unlucky, and the supervisor gives up on it.
//! Unlike Erlang we also wait between restarts, with an exponential backoff, so that a
//! module that crashes on a missing resource does not spin through its whole budget in a
//! few milliseconds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How many restarts a module gets, over what window, and how long to wait before each.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// At most this many restarts within any window of length `period`.
    pub intensity: u32,
    /// The length of the sliding window `intensity` counts restarts in.
    pub period: Duration,
    /// The wait before the first restart after a quiet spell.
    pub backoff_initial: Duration,
    /// The wait between restarts doubles after each failure up to this cap.
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            // Three restarts absorb a transient fault (a sensor that is briefly absent, a
            // peer that is restarting) without hiding a module that is simply broken: a
            // fourth crash within the period is a pattern, not bad luck.
            intensity: 3,
            // Thirty seconds is long enough that three quick crashes land in one window
            // even with the backoff below (0.2 + 0.4 + 0.8 s of waiting), and short enough
            // that a module which crashes once every few minutes is never given up on.
            period: Duration::from_secs(30),
            // A fifth of a second lets whatever the module tripped over settle without
            // making a one-off crash visible to anyone watching the logs.
            backoff_initial: Duration::from_millis(200),
            // Five seconds caps the wait so that a module that recovers is back quickly,
            // and keeps a crash loop on a small device to at most one start every 5 s.
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What the supervisor should do about a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// Start the module again after `delay`; this is restart number `attempt` within the
    /// current window (1-based).
    Restart { delay: Duration, attempt: u32 },
    /// The module already used its `restarts` within `period`: stop restarting it.
    GiveUp { restarts: u32, period: Duration },
}

/// The restart history of one module, judged against a [`RestartPolicy`].
#[derive(Clone, Debug)]
pub struct RestartBudget {
    policy: RestartPolicy,
    /// When each restart granted within the current window was decided, oldest first.
    restarts: VecDeque<Instant>,
    /// How many times the backoff has doubled since it was last reset.
    backoff_step: u32,
    /// When the module last started successfully, if it is (or was last) running.
    started_at: Option<Instant>,
}

impl RestartBudget {
    pub fn new(policy: RestartPolicy) -> Self {
        RestartBudget {
            policy,
            restarts: VecDeque::new(),
            backoff_step: 0,
            started_at: None,
        }
    }

    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Records that the module started successfully at `now`.
    pub fn on_start(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// Records a failure at `now` and decides whether to restart.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        // A module that stayed up for a whole period has shown that its last crash was not
        // part of a loop, so the next restart is quick again.
        if let Some(started) = self.started_at.take() {
            if now.saturating_duration_since(started) >= self.policy.period {
                self.backoff_step = 0;
            }
        }
        self.forget_old(now);

        let used = self.restarts_len();
        if used >= self.policy.intensity {
            return RestartDecision::GiveUp {
                restarts: used,
                period: self.policy.period,
            };
        }
        self.restarts.push_back(now);
        let delay = self.backoff_delay();
        self.backoff_step = self.backoff_step.saturating_add(1);
        RestartDecision::Restart {
            delay,
            attempt: used + 1,
        }
    }

    /// How many restarts were granted within the window that ends at `now`.
    pub fn restarts_in_window(&self, now: Instant) -> u32 {
        let count = self
            .restarts
            .iter()
            .filter(|&&t| !self.expired(t, now))
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// A restart decided at `t` no longer counts at `now` once a full period has passed.
    fn expired(&self, t: Instant, now: Instant) -> bool {
        now.saturating_duration_since(t) >= self.policy.period
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(&oldest) = self.restarts.front() {
            if self.expired(oldest, now) {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
    }

    fn restarts_len(&self) -> u32 {
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }

    /// `backoff_initial * 2^backoff_step`, capped at `backoff_max` (and never below the
    /// initial delay, even if the policy's cap is smaller than its start).
    fn backoff_delay(&self) -> Duration {
        let initial = self.policy.backoff_initial;
        let max = self.policy.backoff_max.max(initial);
        // 2^31 times any non-zero delay already exceeds any sensible cap; clamping the
        // exponent keeps the multiplication from overflowing.
        let factor = 1u32 << self.backoff_step.min(31);
        initial.saturating_mul(factor).min(max)
    }
}

/// The seed for a randomized test: `MESH_TEST_SEED` when set (to replay a failure), else
/// a fresh one. Printed either way so that a failing run can be replayed.
#[cfg(test)]
pub(crate) fn test_seed() -> u64 {
    let seed = match std::env::var("MESH_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MESH_TEST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    println!("seed {seed} (replay with MESH_TEST_SEED={seed})");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn policy(intensity: u32, period_ms: u64, initial_ms: u64, max_ms: u64) -> RestartPolicy {
        RestartPolicy {
            intensity,
            period: Duration::from_millis(period_ms),
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_millis(max_ms),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn gives_up_on_the_failure_after_intensity_restarts() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(policy(3, 10_000, 100, 10_000));
        b.on_start(t0);
        for (i, at) in [1_000u64, 2_000, 3_000].into_iter().enumerate() {
            match b.on_failure(t0 + ms(at)) {
                RestartDecision::Restart { attempt, .. } => assert_eq!(attempt as usize, i + 1),
                other => panic!("failure {i} should restart, got {other:?}"),
            }
            b.on_start(t0 + ms(at + 100));
        }
        assert_eq!(b.restarts_in_window(t0 + ms(3_500)), 3);
        assert_eq!(
            b.on_failure(t0 + ms(4_000)),
            RestartDecision::GiveUp {
                restarts: 3,
                period: ms(10_000)
            }
        );
    }

    #[test]
    fn zero_intensity_never_restarts() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(policy(0, 1_000, 10, 100));
        assert!(matches!(
            b.on_failure(t0),
            RestartDecision::GiveUp { restarts: 0, .. }
        ));
    }

    #[test]
    fn restarts_leave_the_window_after_a_period() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(policy(2, 10_000, 100, 1_000));
        assert!(matches!(b.on_failure(t0), RestartDecision::Restart { .. }));
        assert!(matches!(
            b.on_failure(t0 + ms(5_000)),
            RestartDecision::Restart { .. }
        ));
        // The first restart is exactly one period old here: it no longer counts.
        assert_eq!(b.restarts_in_window(t0 + ms(10_000)), 1);
        assert!(matches!(
            b.on_failure(t0 + ms(10_000)),
            RestartDecision::Restart { attempt: 2, .. }
        ));
        // Now t0+5s and t0+10s are both inside the window: a third failure gives up.
        assert!(matches!(
            b.on_failure(t0 + ms(14_000)),
            RestartDecision::GiveUp { restarts: 2, .. }
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(policy(100, 60_000, 200, 1_000));
        let delays: Vec<Duration> = (0..6)
            .map(|i| match b.on_failure(t0 + ms(i * 10)) {
                RestartDecision::Restart { delay, .. } => delay,
                other => panic!("expected a restart, got {other:?}"),
            })
            .collect();
        assert_eq!(
            delays,
            vec![ms(200), ms(400), ms(800), ms(1_000), ms(1_000), ms(1_000)]
        );
    }

    #[test]
    fn backoff_resets_after_a_whole_period_up() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(policy(100, 1_000, 10, 1_000));
        b.on_failure(t0);
        b.on_failure(t0 + ms(1));
        // Up for less than a period: the backoff keeps growing.
        b.on_start(t0 + ms(100));
        assert_eq!(
            b.on_failure(t0 + ms(500)),
            RestartDecision::Restart {
                delay: ms(40),
                attempt: 3
            }
        );
        // Up for a whole period: back to the initial delay, and the old restarts have
        // left the window too.
        b.on_start(t0 + ms(600));
        assert_eq!(
            b.on_failure(t0 + ms(1_600)),
            RestartDecision::Restart {
                delay: ms(10),
                attempt: 1
            }
        );
    }

    #[test]
    fn a_failure_without_a_start_does_not_reset_the_backoff() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(policy(100, 1_000, 10, 1_000));
        b.on_start(t0);
        b.on_failure(t0 + ms(5_000));
        // The restart failed during startup (no on_start), long after the last start:
        // this must keep doubling rather than treat the old start as a fresh one.
        assert_eq!(
            b.on_failure(t0 + ms(5_100)),
            RestartDecision::Restart {
                delay: ms(20),
                attempt: 2
            }
        );
    }

    #[test]
    fn huge_step_counts_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(RestartPolicy {
            intensity: u32::MAX,
            period: Duration::from_secs(3600),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::MAX,
        });
        let mut last = Duration::ZERO;
        for i in 0..100 {
            match b.on_failure(t0 + ms(i)) {
                RestartDecision::Restart { delay, .. } => {
                    assert!(delay >= last);
                    last = delay;
                }
                other => panic!("expected a restart, got {other:?}"),
            }
        }
    }

    #[test]
    fn never_more_than_intensity_restarts_in_any_window() {
        let seed = test_seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..200 {
            let p = policy(
                rng.gen_range(0..6),
                rng.gen_range(1..5_000),
                rng.gen_range(0..200),
                rng.gen_range(0..2_000),
            );
            let mut b = RestartBudget::new(p.clone());
            let t0 = Instant::now();
            let mut now = t0;
            let mut granted: Vec<Instant> = Vec::new();
            for _ in 0..300 {
                now += ms(rng.gen_range(0..p.period.as_millis() as u64 * 2 / 3 + 1));
                if rng.gen_bool(0.4) {
                    b.on_start(now);
                    continue;
                }
                match b.on_failure(now) {
                    RestartDecision::Restart { delay, attempt } => {
                        assert!(
                            delay >= p.backoff_initial
                                && delay <= p.backoff_max.max(p.backoff_initial),
                            "seed {seed} round {round}: delay {delay:?} outside {p:?}"
                        );
                        assert!(
                            attempt >= 1 && attempt <= p.intensity,
                            "seed {seed} round {round}: attempt {attempt} with {p:?}"
                        );
                        granted.push(now);
                    }
                    RestartDecision::GiveUp { restarts, period } => {
                        assert_eq!(restarts, p.intensity, "seed {seed} round {round}");
                        assert_eq!(period, p.period);
                    }
                }
                assert!(b.restarts_in_window(now) <= p.intensity);
            }
            // Every window of length `period` that holds any restart can be slid to start at
            // one, so checking the windows that start at each restart covers them all.
            for (i, &start) in granted.iter().enumerate() {
                let inside = granted[i..]
                    .iter()
                    .take_while(|&&t| t.duration_since(start) < p.period)
                    .count();
                assert!(
                    inside as u32 <= p.intensity,
                    "seed {seed} round {round}: {inside} restarts within {:?} with {p:?}",
                    p.period
                );
            }
        }
    }
}
