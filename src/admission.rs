//! Admission control: refuse new sagas while the node is overloaded.
//!
//! Offered more sagas than it can complete, an orchestrator without admission control does
//! not hold its maximum throughput: the backlog makes step attempts slower than their
//! timeouts, every attempt is retried (one more command each time) and charges that timed out
//! are compensated, so the extra work slows everything further. We measured it: offered
//! 2,000 orders/s, a node that completes 750/s at best completed 69/s (`docs/benchmarks.md`).
//!
//! The measure of overload is the one that predicts that collapse: **how much of their
//! timeout step attempts use**. Every attempt that ends on this node (answered or timed out)
//! reports the share of its step timeout that had passed since it was sent, as seen when its
//! saga actor handles it, so the waits in JetStream, in the participant and in the actor's
//! mailbox all count. [`Admission`] averages these shares per window of one second; while
//! the last window's average is above `admission.max_timeout_share` (0.25), `PlaceOrder` and
//! `StartSaga` answer `RESOURCE_EXHAUSTED` with a retry delay (`google.rpc.RetryInfo`) and
//! write nothing. The sagas already admitted drain, attempts get fast again, and new sagas
//! are admitted: throughput stays at what the node can complete, with step latencies held
//! below a quarter of their timeouts. A window in which no attempt ended halves the
//! pressure, so an idle node never stays closed.
//!
//! Each node measures what its own saga actors see, and puts it in its membership heartbeat
//! (`pressure_permille`). A node refuses a new saga when its own pressure, or the one last
//! reported by the node owning the saga's partition, is above the limit: the saga would be
//! driven there. The owner's figure is up to a heartbeat old.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::SagaLabels;

/// The averaging window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The retry delay a refusal suggests: one window, after which the pressure is measured anew.
pub const RETRY_AFTER: Duration = WINDOW;

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

#[derive(Debug)]
struct State {
    /// Start of the current window.
    started: Instant,
    /// Sum and count of the shares reported in it.
    sum: f64,
    count: u64,
    /// The average of the last window that ended.
    pressure: f64,
}

impl State {
    /// Closes the windows that ended before `now`.
    fn roll(&mut self, now: Instant, window: Duration) {
        let elapsed = now.saturating_duration_since(self.started);
        let ended = (elapsed.as_nanos() / window.as_nanos().max(1)) as u64;
        if ended == 0 {
            return;
        }
        self.pressure = if self.count > 0 {
            self.sum / self.count as f64
        } else {
            self.pressure / 2.0
        };
        // Windows after it in which nothing ended at all.
        let empty = ended - 1;
        self.pressure /= 2f64.powi(i32::try_from(empty.min(64)).unwrap_or(64));
        self.sum = 0.0;
        self.count = 0;
        self.started += window * u32::try_from(ended).unwrap_or(u32::MAX);
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
            "the node is overloaded: step attempts take {:.0} % of their timeout on average \
             (admission.max_timeout_share is {:.0} %); the saga was not started, retry later",
            self.pressure * 100.0,
            self.limit * 100.0
        )
    }
}

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
                sum: 0.0,
                count: 0,
                pressure: 0.0,
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

    /// An attempt ended after `share` of its timeout.
    pub fn record(&self, share: f64) {
        self.record_at(Instant::now(), share);
    }

    fn record_at(&self, now: Instant, share: f64) {
        let mut s = self.state();
        s.roll(now, self.window);
        s.sum += share.clamp(0.0, 1.0);
        s.count += 1;
    }

    /// The last window's average share (0 when nothing ended lately).
    pub fn pressure(&self) -> f64 {
        self.pressure_at(Instant::now())
    }

    fn pressure_at(&self, now: Instant) -> f64 {
        let mut s = self.state();
        s.roll(now, self.window);
        self.gauge.set(s.pressure);
        s.pressure
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

    #[test]
    fn admission_averages_each_window_and_decays_when_idle() {
        let a = Admission::new(WINDOW);
        let t0 = a.state().started;
        // Fast attempts: nothing to refuse.
        for _ in 0..100 {
            a.record_at(t0 + 10 * MS, 0.001);
        }
        assert_eq!(
            a.pressure_at(t0 + 500 * MS),
            0.0,
            "the window is not over yet"
        );
        assert!((a.pressure_at(t0 + 1001 * MS) - 0.001).abs() < 1e-9);
        // Slow ones in the second window: 0.2, 0.4, 0.6 → 0.4 once it ends.
        for share in [0.2, 0.4, 0.6] {
            a.record_at(t0 + 1500 * MS, share);
        }
        assert!((a.pressure_at(t0 + 1999 * MS) - 0.001).abs() < 1e-9);
        assert!((a.pressure_at(t0 + 2000 * MS) - 0.4).abs() < 1e-9);
        // A timed-out attempt counts as 1, and a share is never above it.
        a.record_at(t0 + 2100 * MS, 3.0);
        assert!((a.pressure_at(t0 + 3000 * MS) - 1.0).abs() < 1e-9);
        // Nothing ends any more: the pressure halves per empty window.
        assert!((a.pressure_at(t0 + 4000 * MS) - 0.5).abs() < 1e-9);
        assert!((a.pressure_at(t0 + 6500 * MS) - 0.125).abs() < 1e-9);
        // A long idle spell leaves nothing.
        assert!(a.pressure_at(t0 + Duration::from_secs(3600)) < 1e-9);
    }

    #[test]
    fn admission_refuses_above_the_limit_and_counts_it() {
        let a = Admission::new(WINDOW);
        let t0 = a.state().started;
        assert!(
            a.admit_at(t0, "order", 0.25, 0.0).is_ok(),
            "an idle node admits"
        );
        a.record_at(t0, 0.5);
        a.record_at(t0 + 10 * MS, 0.3);
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
        // A window in which no attempt ended halves the pressure: 0.2, admitted again…
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
