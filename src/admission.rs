//! Admission control: refuse new sagas while the node is overloaded.
//!
//! Offered more sagas than it can complete, an orchestrator without admission control does
//! not hold its maximum throughput: the backlog makes step attempts slower than their
//! timeouts, every attempt is retried (one more command each time) and charges that timed out
//! are compensated, so the extra work slows everything further. We measured it: offered
//! 2,000 orders/s, a node that completes 750/s at best completed 69/s (`docs/benchmarks.md`).
//!
//! The measure of overload is the one that predicts that collapse: **how much of their
//! timeout step attempts spend waiting**, per step (saga definition and step name), from two
//! estimates over windows of one second:
//!
//! - *ended*: every attempt that ends on this node (answered or timed out) reports the share
//!   of its step timeout that had passed since it was sent, as seen when its saga actor
//!   handles it, so the waits in JetStream, in the participant and in the actor's mailbox all
//!   count. Their average per step, over steps with at least [`MIN_ATTEMPTS`] in the window.
//! - *backlog*: attempts sent minus attempts ended over the last ten seconds is the step's
//!   backlog; divided by the rate at which its attempts end, it is how long a new attempt would
//!   wait behind it (Little's law). This one leads: a queue that grows shows at once, where the
//!   first estimate sees it only when the attempts that waited in it end.
//!
//! The *pressure* is the highest of these over all steps: one saturated participant is enough
//! to time sagas out, and averaging it with the fast steps would hide it. While the pressure
//! is above `admission.max_timeout_share` (0.25), `PlaceOrder` and `StartSaga` answer
//! `RESOURCE_EXHAUSTED` with a retry delay (`google.rpc.RetryInfo`) and write nothing. The
//! admitted sagas drain, the backlog shrinks, and new sagas are admitted: the node completes
//! as many as it can, each step waiting about a quarter of its timeout at most. A window
//! without evidence halves the first estimate, and an idle node has no backlog, so it never
//! stays closed. Measured (`docs/benchmarks.md`): offered 2,000 orders/s, the node completes
//! about 700/s with every order shipped, against 69/s without admission control.
//!
//! Steps whose participants normally take a large part of their timeout (a human approval
//! answered after hours, with a one-day timeout) keep the pressure high: give such steps a
//! timeout well above their usual latency, or raise the limit.
//!
//! Each node measures what its own saga actors see, and puts it in its membership heartbeat
//! (`pressure_permille`). A node refuses a new saga when its own pressure, or the one last
//! reported by the node owning the saga's partition, is above the limit: the saga would be
//! driven there. The owner's figure is up to a heartbeat old.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use prometheus_client::encoding::EncodeLabelSet;

/// Labels of per-saga counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaLabels {
    /// Saga definition name.
    pub saga: String,
}

/// The averaging window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The retry delay a refusal suggests: one window, after which the pressure is measured anew.
pub const RETRY_AFTER: Duration = WINDOW;

/// Attempts of one step a window needs before its average counts: a lone slow attempt on a
/// quiet node is not overload.
pub const MIN_ATTEMPTS: u64 = 10;

/// Share of step timeouts used by the attempts that ended on this node, per window.
#[derive(Debug)]
pub struct Admission {
    window: Duration,
    state: Mutex<State>,
    /// The last window's pressure, as a gauge (`sagaflow_admission_pressure`).
    gauge: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Sagas refused, by definition (`sagaflow_sagas_refused_total`).
    refused: Family<SagaLabels, Counter>,
}

/// Closed windows whose backlog growth is summed into a step's backlog estimate.
const HORIZON: usize = 10;

/// What one step did in the current window and the last ones.
#[derive(Debug, Default)]
struct Step {
    /// The step's timeout, seconds (from its sends).
    timeout_s: f64,
    /// This window: sum of the shares of the attempts that ended, their number, attempts sent.
    share_sum: f64,
    ended: u64,
    sent: u64,
    /// Attempts sent minus attempts ended, per closed window, newest last (at most
    /// [`HORIZON`]).
    growth: std::collections::VecDeque<i64>,
    /// Attempts that ended per second in the last closed window.
    rate: f64,
}

impl Step {
    /// Closes the current window (`secs` long), followed by `empty` windows with nothing.
    fn close(&mut self, secs: f64, empty: u64) {
        let grew = i64::try_from(self.sent).unwrap_or(i64::MAX)
            - i64::try_from(self.ended).unwrap_or(i64::MAX);
        self.growth.push_back(grew);
        for _ in 0..empty.min(HORIZON as u64) {
            self.growth.push_back(0);
        }
        while self.growth.len() > HORIZON {
            self.growth.pop_front();
        }
        self.rate = if empty == 0 {
            self.ended as f64 / secs
        } else {
            0.0
        };
        (self.share_sum, self.ended, self.sent) = (0.0, 0, 0);
    }

    /// The average share of the attempts that ended in the current window, with enough of
    /// them.
    fn ended_share(&self) -> Option<f64> {
        (self.ended >= MIN_ATTEMPTS).then(|| self.share_sum / self.ended as f64)
    }

    /// The share of its timeout a new attempt would wait behind the backlog: attempts sent and
    /// not ended over the horizon (the current window included), divided by the rate at which
    /// attempts end. `None` when too few end to tell.
    fn backlog_share(&self) -> Option<f64> {
        if self.rate < MIN_ATTEMPTS as f64 || self.timeout_s <= 0.0 {
            return None;
        }
        let current = i64::try_from(self.sent).unwrap_or(i64::MAX)
            - i64::try_from(self.ended).unwrap_or(i64::MAX);
        let backlog = (self.growth.iter().sum::<i64>() + current).max(0);
        Some((backlog as f64 / self.rate / self.timeout_s).min(1.0))
    }
}

#[derive(Debug)]
struct State {
    /// Start of the current window.
    started: Instant,
    /// Per saga definition, per step.
    steps: HashMap<String, HashMap<String, Step>>,
    /// The highest average share of ended attempts, of the last window with evidence (halved
    /// per window without).
    ended: f64,
}

impl State {
    /// Closes the windows that ended before `now`.
    fn roll(&mut self, now: Instant, window: Duration) {
        let elapsed = now.saturating_duration_since(self.started);
        let ended = (elapsed.as_nanos() / window.as_nanos().max(1)) as u64;
        if ended == 0 {
            return;
        }
        let highest = self
            .steps
            .values()
            .flat_map(HashMap::values)
            .filter_map(Step::ended_share)
            .max_by(f64::total_cmp);
        self.ended = highest.unwrap_or(self.ended / 2.0);
        // Windows after it, in which nothing ended at all.
        let empty = ended - 1;
        self.ended /= 2f64.powi(i32::try_from(empty.min(64)).unwrap_or(64));
        for step in self.steps.values_mut().flat_map(HashMap::values_mut) {
            step.close(window.as_secs_f64(), empty);
        }
        self.started += window * u32::try_from(ended).unwrap_or(u32::MAX);
    }

    /// The step's entry; allocates its keys only the first time the step is seen (this runs
    /// for every attempt).
    fn step(&mut self, saga: &str, step: &str) -> Option<&mut Step> {
        if !self.steps.contains_key(saga) {
            self.steps.insert(saga.to_owned(), HashMap::new());
        }
        let steps = self.steps.get_mut(saga)?;
        if !steps.contains_key(step) {
            steps.insert(step.to_owned(), Step::default());
        }
        steps.get_mut(step)
    }

    /// The pressure: the highest of the ended attempts' share and of every step's backlog.
    fn pressure(&self) -> f64 {
        self.steps
            .values()
            .flat_map(HashMap::values)
            .filter_map(Step::backlog_share)
            .fold(self.ended, f64::max)
    }
}

/// Why a saga was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overloaded {
    /// The pressure that refused it.
    pub pressure: f64,
    /// The limit it is above.
    pub limit: f64,
}

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node is overloaded: a step's attempts wait about {:.0} % of their timeout \
             (admission.max_timeout_share is {:.0} %); the saga was not started, retry later",
            self.pressure * 100.0,
            self.limit * 100.0
        )
    }
}

impl std::error::Error for Overloaded {}

impl Default for Admission {
    fn default() -> Self {
        Self::new(WINDOW)
    }
}

impl Admission {
    /// An estimator averaging over `window`.
    pub fn new(window: Duration) -> Self {
        Admission {
            window,
            state: Mutex::new(State {
                started: Instant::now(),
                steps: HashMap::new(),
                ended: 0.0,
            }),
            gauge: Gauge::default(),
            refused: Family::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An attempt of `step` of saga definition `saga` ended after `share` of its timeout.
    pub fn record(&self, saga: &str, step: &str, share: f64) {
        self.record_at(Instant::now(), saga, step, share);
    }

    fn record_at(&self, now: Instant, saga: &str, step: &str, share: f64) {
        let mut s = self.state();
        s.roll(now, self.window);
        if let Some(step) = s.step(saga, step) {
            step.share_sum += share.clamp(0.0, 1.0);
            step.ended += 1;
        }
    }

    /// An attempt of `step` (timing out after `timeout`) of saga definition `saga` was sent.
    pub fn sent(&self, saga: &str, step: &str, timeout: Duration) {
        self.sent_at(Instant::now(), saga, step, timeout);
    }

    fn sent_at(&self, now: Instant, saga: &str, step: &str, timeout: Duration) {
        let mut s = self.state();
        s.roll(now, self.window);
        if let Some(step) = s.step(saga, step) {
            step.timeout_s = timeout.as_secs_f64();
            step.sent += 1;
        }
    }

    /// The pressure now (0 when nothing happened lately).
    pub fn pressure(&self) -> f64 {
        self.pressure_at(Instant::now())
    }

    fn pressure_at(&self, now: Instant) -> f64 {
        let mut s = self.state();
        s.roll(now, self.window);
        let p = s.pressure();
        self.gauge.set(p);
        p
    }

    /// Whether a new saga of `saga` may start under `limit` (`admission.max_timeout_share`,
    /// 0: always), given the pressure `owner` last reported by the node owning the saga's
    /// partition; a refusal is counted.
    pub fn admit(&self, saga: &str, limit: f64, owner: f64) -> Result<(), Overloaded> {
        self.admit_at(Instant::now(), saga, limit, owner)
    }

    fn admit_at(&self, now: Instant, saga: &str, limit: f64, owner: f64) -> Result<(), Overloaded> {
        if limit <= 0.0 {
            return Ok(());
        }
        let pressure = self.pressure_at(now).max(owner);
        if pressure <= limit {
            return Ok(());
        }
        self.refused
            .get_or_create(&SagaLabels {
                saga: saga.to_string(),
            })
            .inc();
        Err(Overloaded { pressure, limit })
    }

    /// The pressure gauge, for the registry.
    pub fn gauge(&self) -> Gauge<f64, std::sync::atomic::AtomicU64> {
        self.gauge.clone()
    }

    /// The refusal counters, for the registry.
    pub fn refused(&self) -> Family<SagaLabels, Counter> {
        self.refused.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `n` attempts of `step` ending at `at` after `share` of their timeout.
    fn attempts(a: &Admission, at: Instant, step: &str, n: u64, share: f64) {
        for _ in 0..n {
            a.record_at(at, "order", step, share);
        }
    }

    #[test]
    fn admission_takes_the_slowest_step_of_each_window_and_decays_when_idle() {
        let a = Admission::new(WINDOW);
        let t0 = a.state().started;
        // Fast attempts: nothing to refuse.
        attempts(&a, t0 + 10 * MS, "charge", 100, 0.001);
        assert_eq!(
            a.pressure_at(t0 + 500 * MS),
            0.0,
            "the window is not over yet"
        );
        assert!((a.pressure_at(t0 + 1001 * MS) - 0.001).abs() < 1e-9);
        // One slow step among fast ones: its own average counts, not the mix (0.4, not 0.1).
        attempts(&a, t0 + 1500 * MS, "charge", 10, 0.2);
        attempts(&a, t0 + 1500 * MS, "charge", 10, 0.6);
        attempts(&a, t0 + 1500 * MS, "notify", 60, 0.0);
        assert!((a.pressure_at(t0 + 1999 * MS) - 0.001).abs() < 1e-9);
        assert!((a.pressure_at(t0 + 2000 * MS) - 0.4).abs() < 1e-9);
        // Timed-out attempts count as 1, and a share is never above it.
        attempts(&a, t0 + 2100 * MS, "reserve", 10, 3.0);
        assert!((a.pressure_at(t0 + 3000 * MS) - 1.0).abs() < 1e-9);
        // Fewer than MIN_ATTEMPTS of a step are no evidence: the window counts as empty.
        attempts(&a, t0 + 3100 * MS, "reserve", MIN_ATTEMPTS - 1, 1.0);
        assert!((a.pressure_at(t0 + 4000 * MS) - 0.5).abs() < 1e-9);
        // Nothing ends any more: the pressure halves per window.
        assert!((a.pressure_at(t0 + 6500 * MS) - 0.125).abs() < 1e-9);
        // A long idle spell leaves nothing.
        assert!(a.pressure_at(t0 + Duration::from_secs(3600)) < 1e-9);
    }

    #[test]
    fn admission_sees_a_backlog_grow_before_its_attempts_end() {
        let a = Admission::new(WINDOW);
        let t0 = a.state().started;
        let timeout = Duration::from_secs(10);
        let sent = |at: Instant, n: u64| {
            for _ in 0..n {
                a.sent_at(at, "order", "charge", timeout);
            }
        };
        // Steady: 100 sent and 100 answered at once per second; nothing waits.
        for w in 0..3u32 {
            sent(t0 + w * WINDOW, 100);
            attempts(&a, t0 + w * WINDOW, "charge", 100, 0.0);
        }
        assert_eq!(a.pressure_at(t0 + 3 * WINDOW), 0.0);
        // Now 300 a second are sent and still 100 end, answered fast so far: the backlog grows
        // by 200 a second, and a new attempt would wait 2 s, then 4 s, behind it.
        sent(t0 + 3 * WINDOW, 300);
        attempts(&a, t0 + 3 * WINDOW, "charge", 100, 0.01);
        assert!((a.pressure_at(t0 + 4 * WINDOW) - 0.2).abs() < 1e-9);
        sent(t0 + 4 * WINDOW, 300);
        attempts(&a, t0 + 4 * WINDOW, "charge", 100, 0.01);
        // Mid-window: the current window's sends count at once (+150 − 50 → 500 waiting).
        let mid = t0 + 5 * WINDOW;
        sent(mid, 150);
        attempts(&a, mid, "charge", 50, 0.01);
        assert!((a.pressure_at(mid + 500 * MS) - 0.5).abs() < 1e-9);
        assert!(a.admit_at(mid + 500 * MS, "order", 0.25, 0.0).is_err());
        // Refusing drains it: nothing sent, 200 end per second.
        attempts(&a, mid + 600 * MS, "charge", 150, 0.4);
        attempts(&a, t0 + 6 * WINDOW, "charge", 200, 0.4);
        let p = a.pressure_at(t0 + 7 * WINDOW);
        assert!((p - 0.4).abs() < 1e-9, "the ended attempts' share now: {p}");
        // A step too quiet to tell (fewer than MIN_ATTEMPTS a second) predicts nothing.
        let b = Admission::new(WINDOW);
        let t0 = b.state().started;
        for _ in 0..50 {
            b.sent_at(t0, "approval", "approve", Duration::from_secs(60));
        }
        assert_eq!(b.pressure_at(t0 + 2 * WINDOW), 0.0);
    }

    #[test]
    fn admission_refuses_above_the_limit_and_counts_it() {
        let a = Admission::new(WINDOW);
        let t0 = a.state().started;
        assert!(
            a.admit_at(t0, "order", 0.25, 0.0).is_ok(),
            "an idle node admits"
        );
        attempts(&a, t0, "charge", 10, 0.5);
        attempts(&a, t0 + 10 * MS, "charge", 10, 0.3);
        assert!(
            a.admit_at(t0 + 20 * MS, "order", 0.25, 0.0).is_ok(),
            "decided on the last window that ended, not on the one being measured"
        );
        let e = a
            .admit_at(t0 + 1000 * MS, "order", 0.25, 0.0)
            .expect_err("average 0.4 > 0.25");
        assert!((e.pressure - 0.4).abs() < 1e-9);
        assert_eq!(e.limit, 0.25);
        assert!(e.to_string().contains("overloaded"), "{e}");
        assert!(
            a.admit_at(t0 + 1001 * MS, "payment", 0.5, 0.0).is_ok(),
            "0.4 ≤ 0.5"
        );
        assert_eq!(a.refused().get_or_create(&label("order")).get(), 1);
        assert_eq!(a.refused().get_or_create(&label("payment")).get(), 0);
        assert!((a.gauge().get() - 0.4).abs() < 1e-9);
        // 0 turns it off.
        assert!(a.admit_at(t0 + 1002 * MS, "order", 0.0, 0.9).is_ok());
        // A window without evidence halves the pressure: 0.2, admitted again…
        assert!(a.admit_at(t0 + 2000 * MS, "order", 0.25, 0.0).is_ok());
        // … unless the node owning the saga's partition reported more.
        let e = a
            .admit_at(t0 + 2001 * MS, "order", 0.25, 0.3)
            .expect_err("the owner is overloaded");
        assert!((e.pressure - 0.3).abs() < 1e-9);
    }

    fn label(saga: &str) -> SagaLabels {
        SagaLabels {
            saga: saga.to_string(),
        }
    }
}
