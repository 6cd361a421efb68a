//! Quotas: what one module may use, whether a node can afford it, and the meters that
//! hold a module to its rates.
//!
//! A release declares its wishes in [`Quotas`] (every figure optional); the node fills
//! the gaps with its defaults and caps each figure by its own policy
//! ([`ModuleQuotas::resolve`]). Memory, CPU share and persistent state are *reserved*:
//! [`Admission`] refuses a module whose reservation does not fit what the node has left.
//! Rates (log bytes, published messages and bytes, CPU over time) are enforced by
//! [`TokenBucket`] and [`CpuMeter`].
//!
//! Like every decision in this crate these are plain structs that take `now` as an
//! argument; [`QuotaActor`] is the thin actor that owns the node's [`Admission`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::manifest::Quotas;

/// Default share of one core a module may use over time: a tenth leaves room for a few
/// dozen idle-most-of-the-time modules on a small board.
pub const DEFAULT_CPU_SHARE_PERMILLE: u32 = 100;
/// Default messages a module may publish per second: enough for sensor sampling, far
/// below what would flood the mesh's gossip.
pub const DEFAULT_MESSAGES_PER_S: u32 = 20;
/// Default log bytes per second: a few lines a second of 1 KiB each.
pub const DEFAULT_LOG_BYTES_PER_S: u64 = 4 * 1024;
/// Default published bytes per second: readings and aggregates are small.
pub const DEFAULT_PUBLISH_BYTES_PER_S: u64 = 16 * 1024;
/// Default persistent key-value state per module: counters and calibration data.
pub const DEFAULT_STATE_BYTES: u64 = 1 << 20;
/// Default memory a node sets aside for all its modules together.
pub const DEFAULT_NODE_MEMORY_BYTES: u64 = 1 << 30;
/// Default CPU a node sets aside for all its modules together, in thousandths of a
/// core: one whole core of a two-core board, the other stays with the node itself.
pub const DEFAULT_NODE_CPU_PERMILLE: u32 = 1000;
/// Default persistent state a node sets aside for all its modules together.
pub const DEFAULT_NODE_STATE_BYTES: u64 = 256 << 20;
/// A rate's bucket holds this many seconds of its rate, so a module may burst (a log
/// line of a full kilobyte, a batch of readings) after being quiet.
pub const BURST_S: u64 = 2;
/// A module's CPU debt never grows past this many seconds of its share, so one
/// pathological call cannot keep it throttled for longer than that.
pub const CPU_DEBT_S_MAX: u64 = 10;

/// A module's resources, resolved: every figure concrete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleQuotas {
    /// Linear memory of one instance.
    pub memory_bytes: u64,
    /// Wall-clock time one call may take.
    pub call_ms: u64,
    /// Share of one core over time, in thousandths.
    pub cpu_share_permille: u32,
    /// Messages published per second.
    pub messages_per_s: u32,
    /// Log bytes per second.
    pub log_bytes_per_s: u64,
    /// Published bytes per second.
    pub publish_bytes_per_s: u64,
    /// Persistent key-value state.
    pub state_bytes: u64,
}

impl Default for ModuleQuotas {
    fn default() -> Self {
        ModuleQuotas {
            memory_bytes: crate::sandbox::DEFAULT_MEMORY_BYTES_MAX,
            call_ms: crate::sandbox::DEFAULT_CALL_MS_MAX,
            cpu_share_permille: DEFAULT_CPU_SHARE_PERMILLE,
            messages_per_s: DEFAULT_MESSAGES_PER_S,
            log_bytes_per_s: DEFAULT_LOG_BYTES_PER_S,
            publish_bytes_per_s: DEFAULT_PUBLISH_BYTES_PER_S,
            state_bytes: DEFAULT_STATE_BYTES,
        }
    }
}

/// What the node gives all its modules together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBudget {
    pub memory_bytes: u64,
    pub cpu_permille: u32,
    pub state_bytes: u64,
}

impl Default for NodeBudget {
    fn default() -> Self {
        NodeBudget {
            memory_bytes: DEFAULT_NODE_MEMORY_BYTES,
            cpu_permille: DEFAULT_NODE_CPU_PERMILLE,
            state_bytes: DEFAULT_NODE_STATE_BYTES,
        }
    }
}

/// The node's quota policy: what a module gets when its release says nothing, the most
/// it gets whatever its release says, and the budget all modules share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaPolicy {
    pub defaults: ModuleQuotas,
    pub caps: ModuleQuotas,
    pub budget: NodeBudget,
}

impl Default for QuotaPolicy {
    fn default() -> Self {
        QuotaPolicy {
            defaults: ModuleQuotas::default(),
            // By default a release may ask for up to four times the defaults (and a whole
            // core of CPU), never more than the node's own budget.
            caps: ModuleQuotas {
                memory_bytes: 4 * crate::sandbox::DEFAULT_MEMORY_BYTES_MAX,
                call_ms: 10 * crate::sandbox::DEFAULT_CALL_MS_MAX,
                cpu_share_permille: 1000,
                messages_per_s: 4 * DEFAULT_MESSAGES_PER_S,
                log_bytes_per_s: 4 * DEFAULT_LOG_BYTES_PER_S,
                publish_bytes_per_s: 4 * DEFAULT_PUBLISH_BYTES_PER_S,
                state_bytes: 16 * DEFAULT_STATE_BYTES,
            },
            budget: NodeBudget::default(),
        }
    }
}

impl ModuleQuotas {
    /// What a module declaring `declared` gets on a node with `policy`: the node's
    /// default for every figure the release leaves out, and never more than the cap.
    pub fn resolve(declared: &Quotas, policy: &QuotaPolicy) -> ModuleQuotas {
        let (d, c) = (&policy.defaults, &policy.caps);
        ModuleQuotas {
            memory_bytes: declared
                .memory_bytes
                .unwrap_or(d.memory_bytes)
                .min(c.memory_bytes),
            call_ms: declared.call_ms.unwrap_or(d.call_ms).min(c.call_ms).max(1),
            cpu_share_permille: declared
                .cpu_share_permille
                .unwrap_or(d.cpu_share_permille)
                .min(c.cpu_share_permille),
            messages_per_s: declared
                .messages_per_s
                .unwrap_or(d.messages_per_s)
                .min(c.messages_per_s),
            log_bytes_per_s: declared
                .log_bytes_per_s
                .unwrap_or(d.log_bytes_per_s)
                .min(c.log_bytes_per_s),
            publish_bytes_per_s: declared
                .publish_bytes_per_s
                .unwrap_or(d.publish_bytes_per_s)
                .min(c.publish_bytes_per_s),
            state_bytes: declared
                .state_bytes
                .unwrap_or(d.state_bytes)
                .min(c.state_bytes),
        }
    }

    /// The part of these quotas a node sets aside for the module while it runs.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            memory_bytes: self.memory_bytes,
            cpu_permille: self.cpu_share_permille,
            state_bytes: self.state_bytes,
        }
    }
}

/// Resources set aside for one module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub memory_bytes: u64,
    pub cpu_permille: u32,
    pub state_bytes: u64,
}

/// Why a module was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error(
    "admitting module {name} v{version}: it reserves {asked} of {resource} but only {free} \
     of the node's {budget} are free"
)]
pub struct AdmissionError {
    pub name: String,
    pub version: u64,
    pub resource: String,
    pub asked: u64,
    pub free: u64,
    pub budget: u64,
}

/// The node's reservations against its budget. One reservation per module name: a new
/// version of a module takes over the reservation of the old one, so a hot swap does not
/// need room for both.
#[derive(Clone, Debug)]
pub struct Admission {
    budget: NodeBudget,
    reserved: BTreeMap<String, (u64, Reservation)>,
}

impl Admission {
    pub fn new(budget: NodeBudget) -> Self {
        Admission {
            budget,
            reserved: BTreeMap::new(),
        }
    }

    /// Reserves `r` for `name` at `version` if it fits beside every other module's
    /// reservation; a reservation `name` already held is replaced, not added to.
    pub fn admit(
        &mut self,
        name: &str,
        version: u64,
        r: Reservation,
    ) -> Result<(), AdmissionError> {
        let others = self.total_except(name);
        let refuse = |resource: &str, asked: u64, used: u64, budget: u64| AdmissionError {
            name: name.to_string(),
            version,
            resource: resource.to_string(),
            asked,
            free: budget.saturating_sub(used),
            budget,
        };
        let b = &self.budget;
        if others.memory_bytes.saturating_add(r.memory_bytes) > b.memory_bytes {
            return Err(refuse(
                "memory bytes",
                r.memory_bytes,
                others.memory_bytes,
                b.memory_bytes,
            ));
        }
        if u64::from(others.cpu_permille) + u64::from(r.cpu_permille) > u64::from(b.cpu_permille) {
            return Err(refuse(
                "cpu permille",
                r.cpu_permille.into(),
                others.cpu_permille.into(),
                b.cpu_permille.into(),
            ));
        }
        if others.state_bytes.saturating_add(r.state_bytes) > b.state_bytes {
            return Err(refuse(
                "state bytes",
                r.state_bytes,
                others.state_bytes,
                b.state_bytes,
            ));
        }
        self.reserved.insert(name.to_string(), (version, r));
        Ok(())
    }

    /// Gives back `name`'s reservation if it is still the one made for `version` (a
    /// newer version may have taken it over meanwhile).
    pub fn release(&mut self, name: &str, version: u64) {
        if self.reserved.get(name).is_some_and(|(v, _)| *v == version) {
            self.reserved.remove(name);
        }
    }

    /// Everything reserved, all modules together.
    pub fn total(&self) -> Reservation {
        self.total_except("")
    }

    fn total_except(&self, name: &str) -> Reservation {
        let mut t = Reservation::default();
        for (n, (_, r)) in &self.reserved {
            if n != name {
                t.memory_bytes = t.memory_bytes.saturating_add(r.memory_bytes);
                t.cpu_permille = t.cpu_permille.saturating_add(r.cpu_permille);
                t.state_bytes = t.state_bytes.saturating_add(r.state_bytes);
            }
        }
        t
    }

    pub fn budget(&self) -> &NodeBudget {
        &self.budget
    }
}

/// A token bucket: `rate_per_s` tokens a second, at most `burst` saved up.
///
/// Tokens are kept in thousandths so that slow rates still refill smoothly.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_s: u64,
    burst: u64,
    milli_tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64, now: Instant) -> Self {
        TokenBucket {
            rate_per_s,
            burst,
            milli_tokens: burst.saturating_mul(1000),
            last: now,
        }
    }

    /// A bucket for a rate, holding [`BURST_S`] seconds of it.
    pub fn for_rate(rate_per_s: u64, now: Instant) -> Self {
        TokenBucket::new(rate_per_s, rate_per_s.saturating_mul(BURST_S), now)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        // rate tokens/s * 1000 milli-tokens/token * elapsed s = rate * elapsed_ns / 1e6.
        let add = u128::from(self.rate_per_s) * elapsed.as_nanos() / 1_000_000;
        let cap = u128::from(self.burst) * 1000;
        self.milli_tokens = (u128::from(self.milli_tokens) + add).min(cap) as u64;
        self.last = now;
    }

    /// Takes `n` tokens if there are that many; otherwise takes none.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let need = n.saturating_mul(1000);
        if self.milli_tokens >= need {
            self.milli_tokens -= need;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.milli_tokens / 1000
    }
}

/// CPU time over time: a module may run while its balance is positive; each call is
/// charged afterwards for the time it took, so a long call leaves a debt that keeps the
/// module from running until its share has paid it back.
#[derive(Clone, Debug)]
pub struct CpuMeter {
    rate_us_per_s: i64,
    burst_us: i64,
    balance_us: i64,
    last: Instant,
}

impl CpuMeter {
    /// A meter for `share_permille` of a core. It starts full, holding one second of the
    /// share or one whole call of `call_ms`, whichever is more, so a well-behaved module
    /// is never throttled for the length of a single call.
    pub fn new(share_permille: u32, call_ms: u64, now: Instant) -> Self {
        let rate = i64::from(share_permille) * 1000;
        let call_us = i64::try_from(call_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        let burst = rate.max(call_us);
        CpuMeter {
            rate_us_per_s: rate,
            burst_us: burst,
            balance_us: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = i128::from(self.rate_us_per_s) * elapsed.as_micros() as i128 / 1_000_000;
        self.balance_us = (i128::from(self.balance_us) + add).min(i128::from(self.burst_us)) as i64;
        self.last = now;
    }

    /// Whether the module may start a call at `now`.
    pub fn may_run(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.balance_us > 0
    }

    /// Charges a call that took `used`, ending at `now`.
    pub fn charge(&mut self, used: Duration, now: Instant) {
        self.refill(now);
        let used_us = i64::try_from(used.as_micros()).unwrap_or(i64::MAX);
        let floor = -self
            .rate_us_per_s
            .saturating_mul(CPU_DEBT_S_MAX as i64)
            .max(self.burst_us);
        self.balance_us = self.balance_us.saturating_sub(used_us).max(floor);
    }

    /// The balance in microseconds (negative while in debt).
    pub fn balance_us(&self) -> i64 {
        self.balance_us
    }
}

/// What a module has used, counted as it happens (shared between the module's instance,
/// its actor and the supervisor, and kept across restarts of the same version).
#[derive(Debug, Default)]
pub struct Usage {
    pub calls: AtomicU64,
    pub cpu_us: AtomicU64,
    /// Ticks and messages skipped because the module had used up its CPU share.
    pub throttled: AtomicU64,
    pub log_bytes: AtomicU64,
    /// Log lines dropped: over the log rate, or the node's log channel was full.
    pub log_lines_dropped: AtomicU64,
    pub log_lines_truncated: AtomicU64,
    pub published: AtomicU64,
    pub published_bytes: AtomicU64,
    /// Publishes refused: over a rate, too large, or the outbox was full.
    pub publish_refused: AtomicU64,
    pub delivered: AtomicU64,
    /// Messages for the module dropped because its queue was full or it was throttled.
    pub messages_dropped: AtomicU64,
    pub state_bytes: AtomicU64,
    /// Writes refused because they would take the state over its quota.
    pub state_refused: AtomicU64,
    /// Linear memory of the running instance.
    pub memory_bytes: AtomicU64,
}

impl Usage {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A copy of the counters, for reports.
    pub fn figures(&self) -> UsageFigures {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UsageFigures {
            calls: g(&self.calls),
            cpu_us: g(&self.cpu_us),
            throttled: g(&self.throttled),
            log_bytes: g(&self.log_bytes),
            log_lines_dropped: g(&self.log_lines_dropped),
            log_lines_truncated: g(&self.log_lines_truncated),
            published: g(&self.published),
            published_bytes: g(&self.published_bytes),
            publish_refused: g(&self.publish_refused),
            delivered: g(&self.delivered),
            messages_dropped: g(&self.messages_dropped),
            state_bytes: g(&self.state_bytes),
            state_refused: g(&self.state_refused),
            memory_bytes: g(&self.memory_bytes),
        }
    }
}

/// [`Usage`] as plain numbers, for `mesh modules` and node reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFigures {
    pub calls: u64,
    pub cpu_us: u64,
    pub throttled: u64,
    pub log_bytes: u64,
    pub log_lines_dropped: u64,
    pub log_lines_truncated: u64,
    pub published: u64,
    pub published_bytes: u64,
    pub publish_refused: u64,
    pub delivered: u64,
    pub messages_dropped: u64,
    pub state_bytes: u64,
    pub state_refused: u64,
    pub memory_bytes: u64,
}

/// Messages to the quota actor.
#[derive(Debug)]
pub enum QuotaMsg {
    /// Reserve resources for a module version, or say why not.
    Admit {
        name: String,
        version: u64,
        reservation: Reservation,
        reply: RpcReplyPort<Result<(), AdmissionError>>,
    },
    /// A module version stopped for good; give its reservation back.
    Release { name: String, version: u64 },
    /// The node's budget and everything reserved against it.
    Totals(RpcReplyPort<(NodeBudget, Reservation)>),
}

/// The quota actor: owns the node's [`Admission`]. The sandbox supervisor spawns it as a
/// linked child and is its only sender, one message at a time, so its mailbox is bounded
/// by the supervisor's.
pub struct QuotaActor;

impl Actor for QuotaActor {
    type Msg = QuotaMsg;
    type State = Admission;
    type Arguments = NodeBudget;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        budget: NodeBudget,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Admission::new(budget))
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: QuotaMsg,
        admission: &mut Admission,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            QuotaMsg::Admit {
                name,
                version,
                reservation,
                reply,
            } => {
                let verdict = admission.admit(&name, version, reservation);
                if let Err(e) = &verdict {
                    tracing::warn!(module = %name, version, "{e}");
                }
                // The supervisor may have given up waiting; nothing to do about it here.
                let _ = reply.send(verdict);
            }
            QuotaMsg::Release { name, version } => admission.release(&name, version),
            QuotaMsg::Totals(reply) => {
                let _ = reply.send((admission.budget().clone(), admission.total()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restart::test_seed;
    use rand::{Rng, SeedableRng};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn resolve_takes_defaults_and_caps() {
        let policy = QuotaPolicy::default();
        let q = ModuleQuotas::resolve(&Quotas::default(), &policy);
        assert_eq!(q, policy.defaults);
        let greedy = Quotas {
            memory_bytes: Some(u64::MAX),
            call_ms: Some(0),
            cpu_share_permille: Some(5000),
            messages_per_s: Some(1),
            log_bytes_per_s: None,
            publish_bytes_per_s: Some(u64::MAX),
            state_bytes: Some(10),
        };
        let q = ModuleQuotas::resolve(&greedy, &policy);
        assert_eq!(q.memory_bytes, policy.caps.memory_bytes);
        assert_eq!(q.call_ms, 1, "a zero call time would make every call fail");
        assert_eq!(q.cpu_share_permille, 1000);
        assert_eq!(q.messages_per_s, 1);
        assert_eq!(q.log_bytes_per_s, policy.defaults.log_bytes_per_s);
        assert_eq!(q.publish_bytes_per_s, policy.caps.publish_bytes_per_s);
        assert_eq!(q.state_bytes, 10);
    }

    #[test]
    fn admission_refuses_what_does_not_fit_and_says_why() {
        let mut a = Admission::new(NodeBudget {
            memory_bytes: 100,
            cpu_permille: 500,
            state_bytes: 1000,
        });
        let r = |m, c, s| Reservation {
            memory_bytes: m,
            cpu_permille: c,
            state_bytes: s,
        };
        a.admit("a", 1, r(60, 100, 10)).unwrap();
        let err = a.admit("b", 1, r(50, 100, 10)).unwrap_err();
        assert_eq!(
            (err.resource.as_str(), err.asked, err.free, err.budget),
            ("memory bytes", 50, 40, 100)
        );
        assert!(
            err.to_string().starts_with("admitting module b v1:"),
            "{err}"
        );
        let err = a.admit("b", 1, r(10, 450, 10)).unwrap_err();
        assert_eq!(err.resource, "cpu permille");
        a.admit("b", 1, r(40, 400, 990)).unwrap();
        // A new version of "a" replaces a's reservation rather than adding to it.
        a.admit("a", 2, r(60, 100, 10)).unwrap();
        assert_eq!(a.total(), r(100, 500, 1000));
        // Releasing the old version does not release the new one's reservation.
        a.release("a", 1);
        assert_eq!(a.total(), r(100, 500, 1000));
        a.release("a", 2);
        assert_eq!(a.total(), r(40, 400, 990));
    }

    #[test]
    fn admission_never_exceeds_the_budget() {
        let seed = test_seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let budget = NodeBudget {
            memory_bytes: 1000,
            cpu_permille: 1000,
            state_bytes: 1000,
        };
        let mut a = Admission::new(budget.clone());
        for step in 0..5000 {
            let name = format!("m{}", rng.gen_range(0..8));
            let version = rng.gen_range(1..4);
            if rng.gen_bool(0.3) {
                a.release(&name, version);
            } else {
                let r = Reservation {
                    memory_bytes: rng.gen_range(0..400),
                    cpu_permille: rng.gen_range(0..400),
                    state_bytes: rng.gen_range(0..400),
                };
                let _ = a.admit(&name, version, r);
            }
            let t = a.total();
            assert!(
                t.memory_bytes <= budget.memory_bytes
                    && t.cpu_permille <= budget.cpu_permille
                    && t.state_bytes <= budget.state_bytes,
                "seed {seed} step {step}: {t:?} over {budget:?}"
            );
        }
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::for_rate(10, t0);
        assert_eq!(b.available(t0), 20);
        assert!(b.try_take(20, t0));
        assert!(!b.try_take(1, t0));
        // 100 ms at 10/s is one token.
        assert!(!b.try_take(1, t0 + ms(99)));
        assert!(b.try_take(1, t0 + ms(100)));
        // Never more than the burst saved up, however long it waits.
        assert_eq!(b.available(t0 + Duration::from_secs(3600)), 20);
        // A take larger than the burst can never succeed.
        assert!(!b.try_take(21, t0 + Duration::from_secs(7200)));
    }

    #[test]
    fn bucket_rate_holds_over_random_schedules() {
        let seed = test_seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..100 {
            let rate = rng.gen_range(1..1000u64);
            let t0 = Instant::now();
            let mut b = TokenBucket::for_rate(rate, t0);
            let mut now = t0;
            let mut taken = 0u64;
            for _ in 0..1000 {
                now += Duration::from_micros(rng.gen_range(0..20_000));
                let n = rng.gen_range(1..=rate);
                if b.try_take(n, now) {
                    taken += n;
                }
            }
            let elapsed = now.duration_since(t0).as_secs_f64();
            let allowed = rate as f64 * (BURST_S as f64 + elapsed);
            assert!(
                taken as f64 <= allowed + 1e-6,
                "seed {seed} round {round}: took {taken} at {rate}/s over {elapsed} s"
            );
        }
    }

    #[test]
    fn cpu_meter_throttles_a_spinner_and_pays_back() {
        let t0 = Instant::now();
        // 10% of a core, calls of up to 100 ms: starts with 100 ms of credit.
        let mut m = CpuMeter::new(100, 100, t0);
        assert!(m.may_run(t0));
        m.charge(ms(100), t0 + ms(100));
        // The whole credit is used; 100 ms later, 10 ms are earned back.
        assert!(!m.may_run(t0 + ms(100)));
        assert!(m.may_run(t0 + ms(200)));
        m.charge(ms(100), t0 + ms(300));
        // 20 ms of credit minus 100 ms: a debt of 80 ms, paid back at 10% in 800 ms.
        assert!(!m.may_run(t0 + ms(300)));
        assert!(!m.may_run(t0 + ms(1100)));
        assert!(m.may_run(t0 + ms(1200)));
        // A module using a fraction of its share is never throttled.
        let mut m = CpuMeter::new(100, 100, t0);
        let mut now = t0;
        for _ in 0..1000 {
            now += ms(100);
            assert!(m.may_run(now));
            m.charge(ms(5), now);
        }
    }

    #[test]
    fn cpu_debt_is_bounded() {
        let t0 = Instant::now();
        let mut m = CpuMeter::new(100, 100, t0);
        m.charge(Duration::from_secs(3600), t0);
        assert_eq!(m.balance_us(), -1_000_000);
        assert!(m.may_run(t0 + Duration::from_secs(11)));
    }

    #[tokio::test]
    async fn quota_actor_admits_and_releases() {
        let (actor, handle) = Actor::spawn(
            None,
            QuotaActor,
            NodeBudget {
                memory_bytes: 10,
                cpu_permille: 10,
                state_bytes: 10,
            },
        )
        .await
        .unwrap();
        let r = Reservation {
            memory_bytes: 8,
            cpu_permille: 1,
            state_bytes: 1,
        };
        let admit = |name: &str| {
            let name = name.to_string();
            move |reply| QuotaMsg::Admit {
                name,
                version: 1,
                reservation: r,
                reply,
            }
        };
        let verdict = ractor::call!(actor, admit("a")).unwrap();
        assert!(verdict.is_ok());
        let verdict = ractor::call!(actor, admit("b")).unwrap();
        assert!(verdict.is_err());
        actor
            .cast(QuotaMsg::Release {
                name: "a".into(),
                version: 1,
            })
            .unwrap();
        let verdict = ractor::call!(actor, admit("b")).unwrap();
        assert!(verdict.is_ok());
        let (_, total) = ractor::call!(actor, QuotaMsg::Totals).unwrap();
        assert_eq!(total, r);
        actor.stop(None);
        handle.await.unwrap();
    }
}
