//! The load: which orders are placed when, how their end is detected, what is recorded.
//!
//! ```text
//!            closed loop: C workers, each places an order and waits for its end, then the next
//!            open loop:   one scheduler places order i at t0 + i/R, whatever is in flight
//!   driver ──start(i)──▶ Target (Sagaflow: PlaceOrder over gRPC; baseline: first command)
//!      ▲                         │ …the saga runs…
//!      └──── Tracker::complete(i) ◀── terminal status seen (status subscription / orchestrator)
//! ```
//!
//! Latency is measured from the moment the order was *due*: in the closed loop that is when
//! the worker sends it; in the open loop it is its scheduled time, so time spent queueing
//! behind a slow system (or a slow client) is counted rather than hidden (no coordinated
//! omission). Every wait is bounded: an order not terminal `order_timeout` after it was due is
//! counted as unfinished, and nothing is started or waited for past the run's deadline.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Bound on one start call (`PlaceOrder`, or the baseline's first publish).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of order to place: the mix of outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// In stock, under the payment limit: ends `SHIPPED`.
    Ok,
    /// Above the payment limit: the charge is declined, the order ends `CANCELLED`.
    Declined,
    /// `SKU-OUT` is never in stock: the charge is refunded, the order ends `CANCELLED`.
    OutOfStock,
}

impl Kind {
    /// The terminal order status the reference order saga gives this kind.
    pub fn expected_status(self) -> &'static str {
        match self {
            Kind::Ok => "SHIPPED",
            Kind::Declined | Kind::OutOfStock => "CANCELLED",
        }
    }
}

/// Shares of declined and out-of-stock orders (the rest ship).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Mix {
    /// Share of orders above the payment limit.
    pub declined: f64,
    /// Share of orders of an out-of-stock SKU.
    pub out_of_stock: f64,
}

impl Mix {
    /// The kind of order `i`: spread evenly and deterministically (golden-ratio sequence), so
    /// any stretch of orders has about the configured shares and two runs place the same mix.
    pub fn kind(&self, i: u64) -> Kind {
        const PHI: f64 = 0.618_033_988_749_894_9;
        let x = (i as f64 * PHI).fract();
        if x < self.declined {
            Kind::Declined
        } else if x < self.declined + self.out_of_stock {
            Kind::OutOfStock
        } else {
            Kind::Ok
        }
    }
}

/// How a saga ended, as its observer saw it.
#[derive(Debug, Clone)]
pub struct Done {
    /// When the end was seen.
    pub at: Instant,
    /// Terminal status (`SHIPPED`, `CANCELLED`…; `DONE` for the baseline).
    pub status: String,
    /// Found by the straggler poll rather than the status subscription: `at` is an upper
    /// bound.
    pub by_poll: bool,
}

/// The sagas of one run that have been started and not yet seen to end, by index. Ids are
/// `<prefix>-<index>`, so an observer that sees every saga of the system (the status
/// subscription) keeps only this run's.
#[derive(Debug)]
pub struct Tracker {
    prefix: String,
    waiting: Mutex<HashMap<u64, Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    since: Instant,
    tx: oneshot::Sender<Done>,
}

impl Tracker {
    /// A tracker for ids `<prefix>-<index>`.
    pub fn new(prefix: impl Into<String>) -> Arc<Self> {
        Arc::new(Tracker {
            prefix: prefix.into(),
            waiting: Mutex::new(HashMap::new()),
        })
    }

    /// The id of saga `index`.
    pub fn id(&self, index: u64) -> String {
        format!("{}-{index}", self.prefix)
    }

    /// The index of `id`, if it is one of this run's.
    pub fn index(&self, id: &str) -> Option<u64> {
        id.strip_prefix(self.prefix.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts waiting for saga `index` (before it is started, so an end seen before the start
    /// call returns is not missed).
    pub fn register(&self, index: u64) -> oneshot::Receiver<Done> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            index,
            Waiter {
                since: Instant::now(),
                tx,
            },
        );
        rx
    }

    /// Saga `index` ended. A second end, or the end of a saga nobody waits for, is ignored.
    pub fn complete(&self, index: u64, done: Done) {
        if let Some(w) = self.lock().remove(&index) {
            let _ = w.tx.send(done);
        }
    }

    /// Stops waiting for saga `index` (it failed to start, or timed out).
    pub fn forget(&self, index: u64) {
        self.lock().remove(&index);
    }

    /// Up to `max` sagas waited for longer than `age`, oldest first.
    pub fn overdue(&self, age: Duration, max: usize) -> Vec<u64> {
        let now = Instant::now();
        let mut old: Vec<(Instant, u64)> = self
            .lock()
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.since) >= age)
            .map(|(i, w)| (w.since, *i))
            .collect();
        old.sort_unstable();
        old.into_iter().take(max).map(|(_, i)| i).collect()
    }
}

/// A future starting one saga.
pub type StartFuture = Pin<Box<dyn Future<Output = Result<(), StartError>> + Send>>;

/// Why a saga did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The system refused it because it is overloaded (`RESOURCE_EXHAUSTED`): admission
    /// control at work, counted apart from failures.
    Refused(String),
    /// Anything else.
    Failed(String),
}

impl From<String> for StartError {
    fn from(e: String) -> Self {
        StartError::Failed(e)
    }
}

/// The system under load.
pub trait Target: Send + Sync + 'static {
    /// Starts saga `id` (order `index` of the run) of `kind`; resolves once the system has
    /// accepted it (stored the start), with an error message if it refused or failed.
    fn start(&self, id: String, index: u64, kind: Kind) -> StartFuture;

    /// The terminal status a saga of `kind` should end in.
    fn expected_status(&self, kind: Kind) -> &'static str {
        kind.expected_status()
    }
}

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// `concurrency` sagas in flight at all times.
    Closed {
        /// Workers.
        concurrency: usize,
    },
    /// Sagas started at `rate` per second on a fixed schedule.
    Open {
        /// Per second.
        rate: f64,
    },
}

/// How much load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// This many sagas.
    Orders(u64),
    /// Closed loop: start sagas for this long. (The open loop turns a duration into a count.)
    For(Duration),
}

/// One run's load.
#[derive(Debug, Clone)]
pub struct Load {
    /// Closed or open loop.
    pub shape: Shape,
    /// How many, or how long.
    pub amount: Amount,
    /// Outcomes.
    pub mix: Mix,
    /// A saga not ended this long after it was due is unfinished.
    pub order_timeout: Duration,
    /// Nothing is started or waited for after this.
    pub deadline: Instant,
}

/// What happened to one saga.
#[derive(Debug, Clone)]
enum Sample {
    Done {
        latency: Duration,
        start_call: Duration,
        lag: Duration,
        status: String,
        expected: &'static str,
        by_poll: bool,
        at: Instant,
    },
    StartFailed(String),
    Refused,
    Unfinished,
}

/// Everything recorded in one run.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Sagas the driver tried to start.
    pub attempted: u64,
    /// End-to-end latencies of the sagas that ended, microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Durations of the start call of those sagas, microseconds, sorted.
    pub start_us: Vec<u64>,
    /// How late the start call was sent after the saga was due (the client's own scheduling
    /// delay, part of the latency in the open loop), microseconds, sorted.
    pub lag_us: Vec<u64>,
    /// Terminal statuses and how many sagas ended in each.
    pub outcomes: BTreeMap<String, u64>,
    /// Sagas whose terminal status was not the one their kind leads to.
    pub unexpected: u64,
    /// Sagas whose end was found by polling.
    pub by_poll: u64,
    /// Sagas whose start failed.
    pub start_errors: u64,
    /// Sagas the system refused because it was overloaded (not counted in `start_errors`).
    pub refused: u64,
    /// The first start error.
    pub first_error: Option<String>,
    /// Sagas not seen to end in time.
    pub unfinished: u64,
    /// The first saga was due.
    pub first_due: Option<Instant>,
    /// The last saga ended.
    pub last_done: Option<Instant>,
    /// The run was cut by its deadline.
    pub cut: bool,
    /// When each saga that ended ended, and its latency in microseconds, in no order: the
    /// run's timeline is made from them.
    pub ends: Vec<(Instant, u64)>,
}

impl Samples {
    fn add(&mut self, s: Sample) {
        self.attempted += 1;
        match s {
            Sample::Done {
                latency,
                start_call,
                lag,
                status,
                expected,
                by_poll,
                at,
            } => {
                self.latencies_us.push(micros(latency));
                self.ends.push((at, micros(latency)));
                self.start_us.push(micros(start_call));
                self.lag_us.push(micros(lag));
                if status != expected {
                    self.unexpected += 1;
                }
                *self.outcomes.entry(status).or_default() += 1;
                self.by_poll += u64::from(by_poll);
                self.last_done = Some(self.last_done.map_or(at, |l| l.max(at)));
            }
            Sample::StartFailed(e) => {
                self.start_errors += 1;
                self.first_error.get_or_insert(e);
            }
            Sample::Refused => self.refused += 1,
            Sample::Unfinished => self.unfinished += 1,
        }
    }

    fn merge(&mut self, other: Samples) {
        self.attempted += other.attempted;
        self.latencies_us.extend(other.latencies_us);
        self.ends.extend(other.ends);
        self.start_us.extend(other.start_us);
        self.lag_us.extend(other.lag_us);
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        self.unexpected += other.unexpected;
        self.by_poll += other.by_poll;
        self.start_errors += other.start_errors;
        self.refused += other.refused;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.unfinished += other.unfinished;
        self.first_due = match (self.first_due, other.first_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.cut |= other.cut;
    }

    /// Sagas that ended.
    pub fn completed(&self) -> u64 {
        self.latencies_us.len() as u64
    }

    /// Seconds from the first saga due to the last one ended.
    pub fn elapsed(&self) -> Duration {
        match (self.first_due, self.last_done) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The `q` quantile (0..=1) of sorted values, nearest rank; 0 for no values.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Starts one saga and waits for its end.
async fn one(
    target: Arc<dyn Target>,
    tracker: Arc<Tracker>,
    index: u64,
    kind: Kind,
    due: Instant,
    load: Arc<Load>,
) -> Sample {
    let id = tracker.id(index);
    let ended = tracker.register(index);
    let sent = Instant::now();
    let started = tokio::time::timeout_at(
        load.deadline.min(sent + START_TIMEOUT),
        target.start(id, index, kind),
    )
    .await;
    let start_call = sent.elapsed();
    match started {
        Ok(Ok(())) => {}
        Ok(Err(StartError::Failed(e))) => {
            tracker.forget(index);
            return Sample::StartFailed(e);
        }
        Ok(Err(StartError::Refused(_))) => {
            tracker.forget(index);
            return Sample::Refused;
        }
        Err(_) => {
            tracker.forget(index);
            // Cut by the run's deadline rather than refused: it counts as unfinished.
            if Instant::now() >= load.deadline {
                return Sample::Unfinished;
            }
            return Sample::StartFailed(format!("no answer within {START_TIMEOUT:?}"));
        }
    }
    let until = load.deadline.min(due + load.order_timeout);
    match tokio::time::timeout_at(until, ended).await {
        Ok(Ok(done)) => Sample::Done {
            latency: done.at.saturating_duration_since(due),
            start_call,
            lag: sent.saturating_duration_since(due),
            status: done.status,
            expected: target.expected_status(kind),
            by_poll: done.by_poll,
            at: done.at,
        },
        _ => {
            tracker.forget(index);
            Sample::Unfinished
        }
    }
}

/// Runs `load` against `target`, sagas identified through `tracker`; `progress` counts the
/// sagas that ended (or failed).
pub async fn drive(
    target: Arc<dyn Target>,
    tracker: Arc<Tracker>,
    load: Load,
    progress: ProgressBar,
) -> Samples {
    let load = Arc::new(load);
    match load.shape {
        Shape::Closed { concurrency } => closed(target, tracker, load, concurrency, progress).await,
        Shape::Open { rate } => open(target, tracker, load, rate, progress).await,
    }
}

async fn closed(
    target: Arc<dyn Target>,
    tracker: Arc<Tracker>,
    load: Arc<Load>,
    concurrency: usize,
    progress: ProgressBar,
) -> Samples {
    let t0 = Instant::now();
    let (limit, stop_at) = match load.amount {
        Amount::Orders(n) => (n, load.deadline),
        Amount::For(d) => (u64::MAX, load.deadline.min(t0 + d)),
    };
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, tracker, load, next, progress) = (
            target.clone(),
            tracker.clone(),
            load.clone(),
            next.clone(),
            progress.clone(),
        );
        workers.spawn(async move {
            let mut samples = Samples::default();
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    samples.cut |= now >= load.deadline;
                    break;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                samples.first_due = Some(samples.first_due.map_or(now, |f| f.min(now)));
                let kind = load.mix.kind(i);
                let s = one(target.clone(), tracker.clone(), i, kind, now, load.clone()).await;
                samples.add(s);
                progress.inc(1);
            }
            samples
        });
    }
    let mut all = Samples::default();
    while let Some(r) = workers.join_next().await {
        match r {
            Ok(s) => all.merge(s),
            Err(e) => tracing::warn!(error = %e, "bench worker failed"),
        }
    }
    finish(all)
}

async fn open(
    target: Arc<dyn Target>,
    tracker: Arc<Tracker>,
    load: Arc<Load>,
    rate: f64,
    progress: ProgressBar,
) -> Samples {
    let rate = rate.max(0.001);
    let count = match load.amount {
        Amount::Orders(n) => n,
        Amount::For(d) => (d.as_secs_f64() * rate).ceil() as u64,
    };
    // The schedule is kept by a thread of its own: the runtime's timer has millisecond
    // granularity (a saga would be sent up to 1 ms after it is due, and that lateness counted
    // as latency), a thread sleeps to within tens of microseconds, for no CPU.
    let t0 = std::time::Instant::now();
    let deadline = load.deadline.into_std();
    let (tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, std::time::Instant)>();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let schedule = {
        let cut = cut.clone();
        std::thread::Builder::new()
            .name("bench-schedule".to_string())
            .spawn(move || {
                for i in 0..count {
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                    if due >= deadline {
                        cut.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                    // The receiver is gone: the run was abandoned.
                    if tx.send((i, due)).is_err() {
                        return;
                    }
                }
            })
    };
    let mut all = Samples::default();
    if let Err(e) = schedule {
        tracing::warn!(error = %e, "cannot start the bench's schedule thread");
        all.cut = true;
        return all;
    }
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((i, due)) = due_rx.recv().await {
        let kind = load.mix.kind(i);
        tasks.spawn(one(
            target.clone(),
            tracker.clone(),
            i,
            kind,
            Instant::from_std(due),
            load.clone(),
        ));
        // Collect what has finished meanwhile, so the set does not grow with the run.
        while let Some(r) = tasks.try_join_next() {
            collect(&mut all, r, &progress);
        }
    }
    all.cut |= cut.load(std::sync::atomic::Ordering::Relaxed);
    all.first_due = (count > 0).then_some(Instant::from_std(t0));
    while let Some(r) = tasks.join_next().await {
        collect(&mut all, r, &progress);
    }
    finish(all)
}

fn collect(all: &mut Samples, r: Result<Sample, tokio::task::JoinError>, progress: &ProgressBar) {
    match r {
        Ok(s) => all.add(s),
        Err(e) => tracing::warn!(error = %e, "bench order task failed"),
    }
    progress.inc(1);
}

fn finish(mut s: Samples) -> Samples {
    s.latencies_us.sort_unstable();
    s.start_us.sort_unstable();
    s.lag_us.sort_unstable();
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn load_mix_spreads_kinds_evenly() {
        let mix = Mix {
            declined: 0.1,
            out_of_stock: 0.2,
        };
        let kinds: Vec<Kind> = (0..1000).map(|i| mix.kind(i)).collect();
        let count = |k| kinds.iter().filter(|x| **x == k).count();
        assert!(
            (95..=105).contains(&count(Kind::Declined)),
            "{}",
            count(Kind::Declined)
        );
        assert!((195..=205).contains(&count(Kind::OutOfStock)));
        // Any stretch of 100 orders is close to the shares too.
        let first: Vec<Kind> = (500..600).map(|i| mix.kind(i)).collect();
        let d = first.iter().filter(|k| **k == Kind::Declined).count();
        assert!((7..=13).contains(&d), "{d}");
        assert!((0..100).all(|i| Mix::default().kind(i) == Kind::Ok));
        assert_eq!(Kind::Declined.expected_status(), "CANCELLED");
    }

    #[test]
    fn load_quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&v, 0.0), 1);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.99), 7);
    }

    #[test]
    fn load_tracker_matches_only_its_ids() {
        let t = Tracker::new("bench-ab12-m0");
        assert_eq!(t.id(7), "bench-ab12-m0-7");
        assert_eq!(t.index("bench-ab12-m0-7"), Some(7));
        assert_eq!(t.index("bench-ab12-m1-7"), None);
        assert_eq!(t.index("bench-ab12-m0-x"), None);
        assert_eq!(t.index("bench-ab12-m0"), None);
    }

    struct Instant0;
    impl Target for Instant0 {
        fn start(&self, _id: String, _index: u64, _kind: Kind) -> StartFuture {
            Box::pin(async { Ok(()) })
        }
    }

    /// A target whose sagas end `delay` after they start, which fails to start index 3 and
    /// refuses index 5 as overloaded.
    struct Delayed {
        tracker: Arc<Tracker>,
        delay: Duration,
    }
    impl Target for Delayed {
        fn start(&self, _id: String, index: u64, kind: Kind) -> StartFuture {
            let tracker = self.tracker.clone();
            let delay = self.delay;
            Box::pin(async move {
                if index == 3 {
                    return Err(StartError::Failed("broken".to_string()));
                }
                if index == 5 {
                    return Err(StartError::Refused("overloaded".to_string()));
                }
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    tracker.complete(
                        index,
                        Done {
                            at: Instant::now(),
                            status: kind.expected_status().to_string(),
                            by_poll: false,
                        },
                    );
                });
                Ok(())
            })
        }
    }

    fn load(shape: Shape, amount: Amount) -> Load {
        Load {
            shape,
            amount,
            mix: Mix {
                declined: 0.5,
                out_of_stock: 0.0,
            },
            order_timeout: Duration::from_secs(2),
            deadline: Instant::now() + Duration::from_secs(20),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn load_closed_loop_counts_every_order() {
        let tracker = Tracker::new("t");
        let target = Arc::new(Delayed {
            tracker: tracker.clone(),
            delay: Duration::from_millis(10),
        });
        let s = drive(
            target,
            tracker,
            load(Shape::Closed { concurrency: 4 }, Amount::Orders(20)),
            ProgressBar::hidden(),
        )
        .await;
        assert_eq!(s.attempted, 20);
        assert_eq!(s.completed(), 18);
        assert_eq!(s.start_errors, 1);
        assert_eq!(s.refused, 1);
        assert_eq!(s.first_error.as_deref(), Some("broken"));
        assert_eq!(s.unexpected, 0);
        assert_eq!(s.outcomes.values().sum::<u64>(), 18);
        assert!(s.latencies_us.iter().all(|l| *l >= 10_000));
        // 20 orders, 4 at a time, 10 ms each: about 50 ms.
        assert!(
            s.elapsed() >= Duration::from_millis(40),
            "{:?}",
            s.elapsed()
        );
    }

    // Real time: the open loop's schedule is kept by a thread, outside tokio's clock.
    #[tokio::test]
    async fn load_open_loop_measures_from_the_schedule_and_times_out() {
        let tracker = Tracker::new("t");
        let mut l = load(
            Shape::Open { rate: 100.0 },
            Amount::For(Duration::from_millis(100)),
        );
        l.order_timeout = Duration::from_millis(200);
        let s = drive(Arc::new(Instant0), tracker, l, ProgressBar::hidden()).await;
        // Nobody ever completes these: all 10 are unfinished after the order timeout.
        assert_eq!(s.attempted, 10);
        assert_eq!(s.unfinished, 10);
        assert_eq!(s.completed(), 0);

        let tracker = Tracker::new("u");
        let target = Arc::new(Delayed {
            tracker: tracker.clone(),
            delay: Duration::from_millis(5),
        });
        let s = drive(
            target,
            tracker,
            load(Shape::Open { rate: 1000.0 }, Amount::Orders(50)),
            ProgressBar::hidden(),
        )
        .await;
        assert_eq!(s.completed(), 48, "one failed to start, one was refused");
        assert_eq!((s.start_errors, s.refused), (1, 1));
        assert!(quantile(&s.latencies_us, 0.5) >= 5_000);
        // 50 orders at 1000/s: the last is due at 49 ms and ends 5 ms later.
        let e = s.elapsed();
        assert!(
            e >= Duration::from_millis(53) && e < Duration::from_secs(2),
            "{e:?}"
        );
        // The schedule stops at the deadline.
        let tracker = Tracker::new("v");
        let mut l = load(
            Shape::Open { rate: 100.0 },
            Amount::For(Duration::from_secs(10)),
        );
        l.deadline = Instant::now() + Duration::from_millis(200);
        let s = drive(Arc::new(Instant0), tracker, l, ProgressBar::hidden()).await;
        assert!(s.cut);
        assert!((15..=21).contains(&s.attempted), "{}", s.attempted);
    }

    #[tokio::test(start_paused = true)]
    async fn load_stops_at_the_deadline() {
        let tracker = Tracker::new("t");
        let mut l = load(
            Shape::Closed { concurrency: 2 },
            Amount::For(Duration::from_secs(3600)),
        );
        l.deadline = Instant::now() + Duration::from_secs(1);
        let s = drive(Arc::new(Instant0), tracker, l, ProgressBar::hidden()).await;
        assert!(s.cut);
        assert_eq!(s.unfinished, s.attempted);
    }
}
