//! The saga state machine: pure, deterministic, no I/O.
//!
//! ```text
//!            Start                        every step of the last stage succeeded
//!   (none) ────────▶ RUNNING ─────────────────────────────────────────────▶ COMPLETED
//!                      │  a step failed for good, the deadline passed, or Cancel
//!                      ▼
//!                 COMPENSATING ── wait for in-flight forward steps to settle,
//!                      │          then compensate what may have been done, one at a time,
//!                      │          newest first; then the after-compensation step
//!                      ├───────────────────────────────────────────────────▶ COMPENSATED
//!                      │  a compensation exhausted its retries (or a pivot had succeeded)
//!                      ▼
//!               NEEDS_ATTENTION  parked: no timer runs, nothing is dropped; an operator
//!                      │         retries, skips (with a result) or force-compensates
//!                      ├──────────▶ back to COMPENSATING
//!                      │  abandon
//!                      ▼
//!                    FAILED
//! ```
//!
//! Operators act through [`Event::Intervene`]: retry the current step now, skip a step with a
//! supplied result, force compensation, cancel, or abandon a parked saga. Each action is
//! journaled in the history, applied or refused; [`Saga::check`] tells beforehand whether an
//! action applies (the API answers with it) and the machine re-checks when the action arrives.
//!
//! [`Saga::start`] and [`Saga::apply`] take the current time as an argument and return the
//! [`Effect`]s the host must carry out **after** persisting the new snapshot: commands to send
//! and status changes to announce. Timers are not effects: the snapshot records every due time
//! (step timeouts, retry times, the deadline), [`Saga::next_wakeup`] tells the host when to send
//! [`Event::Tick`], and a restarted host re-arms from the snapshot alone. Likewise
//! [`Saga::in_flight`] lists the commands a recovering host must publish again (they carry the
//! same ids, so the server and the participants de-duplicate them).
//!
//! Replies are matched on (step, attempt, forward/compensation) ([`Saga::reply_fit`]): only the
//! answer to an attempt in flight is applied, and a duplicate of an answer applied changes
//! nothing. Nothing else is dropped silently: a reply to an attempt never sent, one that
//! contradicts the answer applied, or a late one is recorded in the history
//! ([`Happening::ReplyRefused`], one entry per step and attempt, counting them), the first two
//! also dead-lettered by the host ([`Effect::DeadLetterReply`]); and the timeout of an attempt
//! says how many replies were refused while it waited.
//!
//! Snapshots stay bounded whatever participants answer and operators do: after every change,
//! [`Saga::apply_with_limits`] truncates outputs, error texts and reasons past their [`Limits`]
//! (with a visible marker) and compacts the history, dropping entries between the oldest and
//! the newest ones into one [`Happening::Elided`] marker while keeping every entry the machine
//! still derives facts from (see [`Saga::bound`]). [`Saga::apply`] uses the default limits.

use serde::{Deserialize, Serialize};

use crate::definition::{RetryPolicy, SagaDefinition, Step, StepIndex};

mod bounds;

pub use bounds::Limits;

/// Unix time in milliseconds.
pub type Millis = i64;

/// Saga lifecycle phase (independent of the definition's status labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Forward steps are running.
    Running,
    /// Undoing completed steps.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every completed step was undone.
    Compensated,
    /// Abandoned by an operator after being parked (or parked by a version before
    /// `NeedsAttention` existed).
    Failed,
    /// Parked: a compensation exhausted its retries, or a pivot cannot be undone. No timer
    /// runs; an operator decides ([`Intervention`]). Not terminal.
    NeedsAttention,
}

impl Phase {
    /// No event changes a saga in this phase.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Compensated | Phase::Failed)
    }

    /// Upper-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "RUNNING",
            Phase::Compensating => "COMPENSATING",
            Phase::Completed => "COMPLETED",
            Phase::Compensated => "COMPENSATED",
            Phase::Failed => "FAILED",
            Phase::NeedsAttention => "NEEDS_ATTENTION",
        }
    }

    /// The phase named `name` (as [`Phase::as_str`] spells it).
    pub fn from_name(name: &str) -> Option<Phase> {
        [
            Phase::Running,
            Phase::Compensating,
            Phase::Completed,
            Phase::Compensated,
            Phase::Failed,
            Phase::NeedsAttention,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepPhase {
    /// Not started.
    Pending,
    /// An attempt was sent; waiting for its reply or its timeout (`due_at`).
    Running,
    /// An attempt failed transiently; the next one is sent at `due_at`.
    RetryWait,
    /// Done.
    Succeeded,
    /// Failed for good (or abandoned because the saga compensates).
    Failed,
    /// The compensation was sent; waiting for its reply or its timeout.
    Compensating,
    /// A compensation attempt failed; the next one is sent at `due_at`.
    CompensationRetryWait,
    /// Undone.
    Compensated,
    /// The compensation exhausted its retries.
    CompensationFailed,
    /// Never started because the saga took another path.
    Skipped,
    /// A step that waits for a signal (`wait_for`): no command was sent; the signal or its
    /// timeout (`due_at`) ends it. (Appended: snapshots without it keep their bytes.)
    Waiting,
}

impl StepPhase {
    /// Upper-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            StepPhase::Pending => "PENDING",
            StepPhase::Running => "RUNNING",
            StepPhase::RetryWait => "RETRY_WAIT",
            StepPhase::Succeeded => "SUCCEEDED",
            StepPhase::Failed => "FAILED",
            StepPhase::Compensating => "COMPENSATING",
            StepPhase::CompensationRetryWait => "COMPENSATION_RETRY_WAIT",
            StepPhase::Compensated => "COMPENSATED",
            StepPhase::CompensationFailed => "COMPENSATION_FAILED",
            StepPhase::Skipped => "SKIPPED",
            StepPhase::Waiting => "WAITING",
        }
    }
}

/// An error a participant reported, or a timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// Machine-readable kind (`declined`, `timeout`…).
    pub kind: String,
    /// Detail.
    pub message: String,
}

/// State of one step slot of a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// Where it is.
    pub phase: StepPhase,
    /// Forward attempts sent so far (the current one included).
    pub attempt: u32,
    /// Compensation attempts sent so far.
    pub comp_attempt: u32,
    /// Timeout of the in-flight attempt, or time of the next attempt while waiting to retry.
    pub due_at: Option<Millis>,
    /// Whether an attempt may have taken effect without us knowing (it timed out): such a step
    /// is compensated even though it never reported success.
    pub maybe_applied: bool,
    /// The latest error.
    pub last_error: Option<StepError>,
    /// First attempt sent.
    pub started_at: Option<Millis>,
    /// Reached Succeeded / Failed / Compensated / CompensationFailed.
    pub finished_at: Option<Millis>,
    /// Result reported by the participant (JSON), or a short text marker,
    /// `[output truncated: N bytes, …]`, if it was too large to keep ([`Limits`]).
    pub output: Option<Vec<u8>>,
}

impl StepState {
    fn new() -> Self {
        StepState {
            phase: StepPhase::Pending,
            attempt: 0,
            comp_attempt: 0,
            due_at: None,
            maybe_applied: false,
            last_error: None,
            started_at: None,
            finished_at: None,
            output: None,
        }
    }

    fn in_flight(&self) -> bool {
        matches!(self.phase, StepPhase::Running | StepPhase::Compensating)
    }

    /// Ends the step in `phase` (a settled phase) at `now`: nothing is due for it any more.
    fn settle(&mut self, phase: StepPhase, now: Millis) {
        self.phase = phase;
        self.due_at = None;
        self.finished_at = Some(now);
    }
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at: Millis,
    /// Which step slot, if a step is concerned.
    pub step: Option<u32>,
    /// What happened.
    pub what: Happening,
}

/// What a history entry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Happening {
    /// The saga started.
    Started,
    /// A forward attempt was sent.
    Sent {
        /// Attempt number.
        attempt: u32,
    },
    /// The step succeeded.
    Succeeded {
        /// Attempt number.
        attempt: u32,
    },
    /// An attempt failed.
    AttemptFailed {
        /// Attempt number.
        attempt: u32,
        /// Error kind.
        kind: String,
        /// Detail.
        message: String,
    },
    /// The next attempt is scheduled.
    RetryScheduled {
        /// Attempt that will be sent.
        attempt: u32,
        /// When.
        at: Millis,
    },
    /// The step failed for good.
    StepFailed,
    /// The status label changed.
    Status {
        /// New label.
        status: String,
    },
    /// Compensation began.
    CompensationStarted {
        /// Why.
        reason: String,
    },
    /// A compensation attempt was sent.
    CompensationSent {
        /// Attempt number.
        attempt: u32,
    },
    /// The step was undone.
    Compensated,
    /// A compensation attempt failed.
    CompensationAttemptFailed {
        /// Attempt number.
        attempt: u32,
        /// Error kind.
        kind: String,
        /// Detail.
        message: String,
    },
    /// A step that never ran was skipped.
    Skipped,
    /// The saga ended.
    Finished {
        /// Final phase.
        phase: Phase,
    },
    /// The saga was parked `NEEDS_ATTENTION`.
    Parked {
        /// Why.
        reason: String,
    },
    /// An operator acted on the saga.
    Intervened {
        /// The request's id.
        id: String,
        /// `retry`, `skip`, `compensate`, `cancel` or `abandon`.
        action: String,
        /// Who.
        operator: String,
        /// Why (as given).
        reason: String,
        /// Empty when applied, else why it was refused.
        refused: String,
    },
    /// The next compensation attempt is scheduled.
    CompensationRetryScheduled {
        /// Attempt that will be sent.
        attempt: u32,
        /// When.
        at: Millis,
    },
    /// An operator's action took the saga out of `NEEDS_ATTENTION`.
    Unparked,
    /// Older entries were dropped to keep the snapshot bounded ([`Limits`]). There is at most
    /// one such marker, placed where the dropped entries were: after the oldest entries and the
    /// ones the machine still needs, before the newest ones. Successive compactions merge into
    /// it. (Appended: snapshots without it keep their bytes.)
    Elided {
        /// How many entries were dropped in all.
        entries: u64,
        /// How many of them recorded a parking ([`Happening::Parked`]): see
        /// [`Saga::parkings`].
        parkings: u32,
        /// When the oldest dropped entry happened (the marker's own time is the newest's).
        since: Millis,
    },
    /// A participant's reply was not applied ([`Saga::reply_fit`]): it answers an attempt of
    /// the step that was never sent, contradicts the answer already applied to its attempt,
    /// came from another service than the command's, or came after its attempt was over
    /// (timed out, or replaced by a later one). A reply repeating the answer applied is not
    /// recorded. One entry per attempt of a step: the replies refused while the same attempt
    /// is the step's latest add to its `count` (so a flood of bad replies cannot grow the
    /// history), and the timeout of that attempt says how many there were. `step` is `None`
    /// for a reply naming a step the saga does not have (consecutive ones share an entry).
    /// (Appended: snapshots without it keep their bytes.)
    ReplyRefused {
        /// The step's latest attempt when the reply came (none yet: 0).
        attempt: u32,
        /// Whether that attempt is a compensation attempt.
        compensation: bool,
        /// Why the first of these replies was refused, naming the step, the attempt and the
        /// outcome the reply claimed.
        reason: String,
        /// How many replies were refused while that attempt was the latest.
        count: u32,
    },
    /// A wait step started waiting for its signal. (Appended.)
    Waiting {
        /// The signal.
        signal: String,
    },
    /// A signal arrived ([`Event::Signal`]): it ended its step's wait, or is kept for a step
    /// that has not started waiting yet. (Appended.)
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Its id (a duplicate with the same id is ignored).
        id: String,
        /// Whether a step still to wait for it keeps it (it arrived early).
        kept: bool,
    },
    /// A signal arrived that no step waits for any more (its wait ended, or the saga
    /// compensates): nothing changed but this entry. (Appended.)
    SignalIgnored {
        /// The signal's name.
        name: String,
        /// Its id.
        id: String,
    },
}

impl std::fmt::Display for Happening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Happening::Started => write!(f, "saga started"),
            Happening::Sent { attempt } => write!(f, "attempt {attempt} sent"),
            Happening::Succeeded { attempt } => write!(f, "succeeded on attempt {attempt}"),
            Happening::AttemptFailed {
                attempt,
                kind,
                message,
            } => write!(f, "attempt {attempt} failed: {kind}: {message}"),
            Happening::RetryScheduled { attempt, at } => {
                write!(f, "attempt {attempt} scheduled at {at}")
            }
            Happening::StepFailed => write!(f, "step failed for good"),
            Happening::Status { status } => write!(f, "status {status}"),
            Happening::CompensationStarted { reason } => {
                write!(f, "compensation started: {reason}")
            }
            Happening::CompensationSent { attempt } => {
                write!(f, "compensation attempt {attempt} sent")
            }
            Happening::Compensated => write!(f, "compensated"),
            Happening::CompensationAttemptFailed {
                attempt,
                kind,
                message,
            } => {
                write!(
                    f,
                    "compensation attempt {attempt} failed: {kind}: {message}"
                )
            }
            Happening::Skipped => write!(f, "skipped"),
            Happening::Finished { phase } => write!(f, "saga finished: {}", phase.as_str()),
            Happening::Parked { reason } => write!(f, "parked NEEDS_ATTENTION: {reason}"),
            Happening::CompensationRetryScheduled { attempt, at } => {
                write!(f, "compensation attempt {attempt} scheduled at {at}")
            }
            Happening::Unparked => write!(f, "resumed by an operator"),
            Happening::Elided {
                entries,
                parkings,
                since,
            } => {
                write!(
                    f,
                    "{entries} older entries elided to bound the snapshot (since {since}"
                )?;
                if *parkings > 0 {
                    write!(f, "; {parkings} parking(s) among them")?;
                }
                write!(f, ")")
            }
            Happening::ReplyRefused {
                attempt,
                compensation,
                reason,
                count,
            } => {
                if *count <= 1 {
                    return write!(f, "reply refused: {reason}");
                }
                write!(f, "{count} replies refused")?;
                if *attempt > 0 {
                    let what = if *compensation {
                        "compensation attempt"
                    } else {
                        "attempt"
                    };
                    write!(f, " while {what} {attempt} was the latest")?;
                }
                write!(f, "; the first: {reason}")
            }
            Happening::Intervened {
                action,
                operator,
                reason,
                refused,
                ..
            } => {
                write!(f, "operator `{operator}`: {action}")?;
                if !reason.is_empty() {
                    write!(f, " ({reason})")?;
                }
                if !refused.is_empty() {
                    write!(f, " refused: {refused}")?;
                }
                Ok(())
            }
            Happening::Waiting { signal } => write!(f, "waiting for signal `{signal}`"),
            Happening::SignalReceived { name, id, kept } => {
                write!(f, "signal `{name}` received (id {id})")?;
                if *kept {
                    write!(f, ", kept until its step waits")?;
                }
                Ok(())
            }
            Happening::SignalIgnored { name, id } => {
                write!(
                    f,
                    "signal `{name}` (id {id}) ignored: no step waits for it any more"
                )
            }
        }
    }
}

/// A saga: the snapshot persisted after every transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    /// Saga id (`[A-Za-z0-9_-]`).
    pub id: String,
    /// Definition name.
    pub definition: String,
    /// Fingerprint of the definition the saga started under.
    pub fingerprint: u64,
    /// Input, JSON.
    pub input: Vec<u8>,
    /// Status label (from the definition).
    pub status: String,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Why the saga compensated or failed.
    pub reason: Option<String>,
    /// Current forward stage.
    pub stage: u32,
    /// One slot per forward step, plus one for the after-compensation step if defined.
    pub steps: Vec<StepState>,
    /// Steps to compensate, in the order they run (filled when compensation can start).
    pub compensation_plan: Option<Vec<u32>>,
    /// Position in `compensation_plan`.
    pub comp_cursor: u32,
    /// Start time.
    pub started_at: Millis,
    /// Last change.
    pub updated_at: Millis,
    /// Overall deadline.
    pub deadline_at: Millis,
    /// Every transition, oldest first; past the [`Limits`], entries between the oldest and
    /// the newest are dropped into one [`Happening::Elided`] marker (so count with
    /// [`Saga::logged`], [`Saga::logged_since`] and [`Saga::parkings`], not its length).
    pub history: Vec<HistoryEntry>,
    /// Number of status changes so far (sequence of lifecycle events).
    pub status_seq: u64,
}

/// Something that happens to a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A participant answered.
    Reply {
        /// Step slot.
        step: StepIndex,
        /// Attempt the reply answers.
        attempt: u32,
        /// Whether it answers a compensation.
        compensation: bool,
        /// Success (with output) or failure.
        outcome: Result<Vec<u8>, StepError>,
    },
    /// Time passed: handle every due timeout, retry and the deadline.
    Tick,
    /// Stop going forward and compensate.
    Cancel {
        /// Why.
        reason: String,
    },
    /// An operator acts on the saga.
    Intervene(Intervention),
    /// A signal for the saga's wait steps (`wait_for`): it ends the wait of the first step
    /// waiting for `name`, or is kept for the first one that will; a repeat of an `id` already
    /// received is ignored.
    Signal {
        /// The signal's id (duplicates share it).
        id: String,
        /// Its name (`delivery.confirmed`).
        name: String,
        /// Its payload, JSON (may be empty): the step's output.
        payload: Vec<u8>,
    },
    /// The host refused a reply before it could be matched (it names a step the saga does
    /// not have, `step` is then `None`, or came from another service than the command's):
    /// recorded in the history like the replies the machine refuses, and dead-lettered
    /// ([`Effect::DeadLetterReply`]).
    ReplyRefused {
        /// The step slot the reply names, if the saga has it.
        step: Option<StepIndex>,
        /// Why, in words.
        reason: String,
    },
}

/// How a participant's reply relates to what the saga sent and heard: [`Saga::reply_fit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyFit {
    /// It answers the attempt in flight: applied.
    Expected,
    /// Nothing to apply and nothing to record: the answer already applied to that attempt,
    /// again (a redelivery), or a failure reported for an attempt that was over (a failure
    /// says nothing was done, and a newer attempt or the compensation took over).
    Duplicate,
    /// An answer to an attempt that was over without it: it had timed out, or a later attempt
    /// replaced it (then only a success is worth noting). Recorded in the history
    /// ([`Happening::ReplyRefused`]), not dead-lettered: a late reply is no participant's
    /// mistake.
    Late(String),
    /// A reply to an attempt that was never sent (or a compensation attempt of a step that
    /// was never compensated, or a step slot the saga does not have): it cannot be right.
    /// Recorded in the history and dead-lettered with this reason
    /// ([`Effect::DeadLetterReply`]).
    Unsent(String),
    /// A second answer to an attempt that contradicts the one applied (or an operator's skip):
    /// recorded in the history and dead-lettered with this reason.
    Contradicts(String),
}

impl ReplyFit {
    /// Why the reply is not applied, if it is recorded ([`ReplyFit::Late`], refused).
    pub fn reason(&self) -> Option<&str> {
        match self {
            ReplyFit::Expected | ReplyFit::Duplicate => None,
            ReplyFit::Late(why) | ReplyFit::Unsent(why) | ReplyFit::Contradicts(why) => Some(why),
        }
    }

    /// Whether the host dead-letters the reply: it is refused, not merely late.
    pub fn is_refused(&self) -> bool {
        matches!(self, ReplyFit::Unsent(_) | ReplyFit::Contradicts(_))
    }
}

/// An operator's action on a saga, journaled in its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intervention {
    /// Unique id of the request: an intervention redelivered after a crash is applied once
    /// (while its journal entry is kept, among the newest ones: see [`Limits`]).
    pub id: String,
    /// What to do.
    pub action: OperatorAction,
    /// Who (free text: a user name, `dlq-replay`…).
    pub operator: String,
    /// Why.
    pub reason: String,
}

/// What an operator can do to a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAction {
    /// Send the next attempt of the current step (or of `step`) now, with a fresh retry
    /// budget: a step waiting to retry, an attempt still waiting for its reply, or the
    /// compensation that parked the saga.
    Retry {
        /// A step slot; `None` = every step the action applies to.
        step: Option<StepIndex>,
    },
    /// Settle `step` as if its participant had answered: a forward step of the current stage
    /// succeeds with `output`; a compensation (running, waiting, or the one that parked the
    /// saga) counts as done; a pivot that parked the saga counts as dealt with. Only the
    /// first records `output`: with the others a non-empty one is refused, never dropped.
    Skip {
        /// Step slot.
        step: StepIndex,
        /// The result to record (JSON; may be empty).
        output: Vec<u8>,
    },
    /// Compensate now: a running saga stops going forward; a saga parked on a pivot
    /// compensates everything that has a compensation, the pivot included.
    Compensate,
    /// Cancel a running saga (it compensates).
    Cancel,
    /// Give up on a parked saga: it ends `FAILED` as it stands.
    Abandon,
    /// The pivot that parked the saga really succeeded (it timed out, but the participant did
    /// the work): record it as succeeded with `output` and go forward to completion. Only
    /// while nothing else failed or was compensated. (Added last: older snapshots and control
    /// messages decode unchanged.)
    Settle {
        /// The pivot's slot.
        step: StepIndex,
        /// Its result (JSON; may be empty).
        output: Vec<u8>,
    },
}

impl OperatorAction {
    /// The action's name in the history and the API.
    pub fn name(&self) -> &'static str {
        match self {
            OperatorAction::Retry { .. } => "retry",
            OperatorAction::Skip { .. } => "skip",
            OperatorAction::Compensate => "compensate",
            OperatorAction::Cancel => "cancel",
            OperatorAction::Abandon => "abandon",
            OperatorAction::Settle { .. } => "settle",
        }
    }
}

/// A command the host must publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CommandSpec {
    /// Step slot.
    pub step: StepIndex,
    /// Compensation or forward.
    pub compensation: bool,
    /// Attempt number (1-based).
    pub attempt: u32,
}

/// What the host must do after persisting the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish this command.
    Send(CommandSpec),
    /// Announce a status change.
    StatusChanged {
        /// Previous label.
        from: String,
        /// New label.
        to: String,
    },
    /// The saga was parked `NEEDS_ATTENTION`: dead-letter a resume request for operators.
    Parked {
        /// Why.
        reason: String,
        /// How many times this saga was parked so far (1 the first time): makes the dead
        /// letter's id unique per parking and stable across redelivery.
        count: u32,
    },
    /// An operator took the saga out of `NEEDS_ATTENTION`: its dead letters are settled.
    Unparked {
        /// Who.
        operator: String,
        /// The action.
        action: String,
        /// The intervention's request id (a replayed dead letter's starts with
        /// [`REPLAY_REQUEST_PREFIX`]: that dead letter is settled by the replay itself).
        request: String,
    },
    /// The reply this transition answers was refused ([`ReplyFit::Unsent`], [`ReplyFit::Contradicts`],
    /// [`Event::ReplyRefused`]) and recorded: dead-letter it, with this reason, instead of
    /// acking it.
    DeadLetterReply {
        /// Why, in words.
        reason: String,
    },
}

/// Result of applying an event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Whether the snapshot changed (if not, nothing needs persisting).
    pub changed: bool,
    /// Effects, in order.
    pub effects: Vec<Effect>,
}

/// Why an event could not be applied at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The snapshot's step count does not match the definition.
    #[error("saga `{saga}` has {found} step slots but definition `{definition}` has {expected}")]
    DefinitionMismatch {
        /// Saga id.
        saga: String,
        /// Definition name.
        definition: String,
        /// Slots in the definition.
        expected: usize,
        /// Slots in the snapshot.
        found: usize,
    },
}

impl Saga {
    /// Creates a saga and starts its first stage.
    pub fn start(
        def: &SagaDefinition,
        id: String,
        input: Vec<u8>,
        now: Millis,
    ) -> (Saga, Transition) {
        let deadline = i64::try_from(def.deadline.as_millis()).unwrap_or(i64::MAX);
        let mut saga = Saga {
            id,
            definition: def.name.clone(),
            fingerprint: def.fingerprint,
            input,
            status: def.statuses.initial.clone(),
            phase: Phase::Running,
            reason: None,
            stage: 0,
            steps: (0..def.step_slots()).map(|_| StepState::new()).collect(),
            compensation_plan: None,
            comp_cursor: 0,
            started_at: now,
            updated_at: now,
            deadline_at: now.saturating_add(deadline),
            history: Vec::new(),
            status_seq: 1,
        };
        saga.log(now, None, Happening::Started);
        let mut t = Transition {
            changed: true,
            effects: Vec::new(),
        };
        t.effects.push(Effect::StatusChanged {
            from: String::new(),
            to: saga.status.clone(),
        });
        saga.start_stage(def, now, &mut t);
        (saga, t)
    }

    /// Applies one event at time `now`, keeping the snapshot within [`Limits::default`]: same
    /// as [`Saga::apply_with_limits`] with the default limits.
    pub fn apply(
        &mut self,
        def: &SagaDefinition,
        event: Event,
        now: Millis,
    ) -> Result<Transition, Error> {
        self.apply_with_limits(def, event, now, &Limits::DEFAULT)
    }

    /// Applies one event at time `now`, then keeps the snapshot within `limits`
    /// ([`Saga::bound`]): outputs, error texts and reasons too large are truncated with a
    /// visible marker, and the history is compacted past its bounds. An intervention's id,
    /// operator and reason are truncated before it is applied (so a redelivered one is still
    /// recognised), and the effects' texts are bounded like the snapshot's. Decisions see the
    /// event as it came: an error kind is matched against the retry policy before it is
    /// truncated. A transition that changes nothing leaves the snapshot untouched, however
    /// large.
    pub fn apply_with_limits(
        &mut self,
        def: &SagaDefinition,
        event: Event,
        now: Millis,
        limits: &Limits,
    ) -> Result<Transition, Error> {
        if self.steps.len() != def.step_slots() {
            return Err(Error::DefinitionMismatch {
                saga: self.id.clone(),
                definition: def.name.clone(),
                expected: def.step_slots(),
                found: self.steps.len(),
            });
        }
        let mut t = Transition::default();
        if self.phase.is_terminal() {
            return Ok(t);
        }
        match event {
            Event::Reply {
                step,
                attempt,
                compensation,
                outcome,
            } => match self.reply_fit(def, step, attempt, compensation, &outcome, limits) {
                ReplyFit::Expected => {
                    self.on_reply(def, step, attempt, compensation, outcome, now, &mut t)
                }
                ReplyFit::Duplicate => {}
                ReplyFit::Late(why) => self.refuse_reply(Some(step), why, false, now, &mut t),
                ReplyFit::Unsent(why) | ReplyFit::Contradicts(why) => {
                    self.refuse_reply(Some(step), why, true, now, &mut t)
                }
            },
            Event::ReplyRefused { step, reason } => {
                self.refuse_reply(step, reason, true, now, &mut t)
            }
            Event::Tick => self.on_tick(def, now, &mut t),
            Event::Signal { id, name, payload } => {
                self.on_signal(def, id, name, payload, now, &mut t)
            }
            Event::Cancel { reason } => {
                if self.phase == Phase::Running {
                    self.begin_compensation(def, format!("cancelled: {reason}"), now, &mut t);
                }
            }
            Event::Intervene(intervention) => {
                let intervention = limits.bound_intervention(intervention);
                self.intervene(def, intervention, now, &mut t);
            }
        }
        if t.changed {
            self.updated_at = now;
            self.bound(limits);
            limits.bound_effects(&mut t.effects);
        }
        Ok(t)
    }

    /// When the host must deliver the next [`Event::Tick`], if ever.
    pub fn next_wakeup(&self) -> Option<Millis> {
        if self.phase.is_terminal() {
            return None;
        }
        let steps = self.steps.iter().filter_map(|s| s.due_at).min();
        let deadline = (self.phase == Phase::Running).then_some(self.deadline_at);
        match (steps, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the saga counts as stuck if nothing changes by then: `multiple` times the longest
    /// timeout of its active steps after its next due time (or its last change). A live host
    /// changes a saga at every due time, so passing this means the saga is not being driven
    /// (no owner, failing store, a bug). `None` for a finished or parked saga.
    pub fn stuck_at(&self, def: &SagaDefinition, multiple: u32) -> Option<Millis> {
        if self.phase.is_terminal() || self.phase == Phase::NeedsAttention {
            return None;
        }
        let longest = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.due_at.is_some())
            .filter_map(|(i, _)| def.step(i).map(|st| millis(st.timeout)))
            .max()
            .or_else(|| def.steps.iter().map(|st| millis(st.timeout)).max())
            .unwrap_or(0);
        let base = self
            .next_wakeup()
            .unwrap_or(self.updated_at)
            .max(self.updated_at);
        Some(base.saturating_add(longest.saturating_mul(i64::from(multiple.max(1)))))
    }

    /// Commands sent and not yet answered: what a recovering host publishes again.
    pub fn in_flight(&self) -> Vec<CommandSpec> {
        self.steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.phase {
                StepPhase::Running => Some(CommandSpec {
                    step: i,
                    compensation: false,
                    attempt: s.attempt,
                }),
                StepPhase::Compensating => Some(CommandSpec {
                    step: i,
                    compensation: true,
                    attempt: s.comp_attempt,
                }),
                _ => None,
            })
            .collect()
    }

    /// Whether this snapshot is one the machine can run under `def`: one step state per step
    /// slot, a stage and a compensation plan that name stages and slots of the definition, a
    /// plan cursor within the plan, and counters far from overflowing. Snapshots the machine
    /// wrote always pass; one that comes from elsewhere (an event's embedded snapshot, a
    /// bucket written by hand) must pass before it is used, or indexing into it could panic.
    pub fn consistent_with(&self, def: &SagaDefinition) -> Result<(), String> {
        const FAR: u32 = u32::MAX / 2;
        let slots = def.step_slots();
        if self.steps.len() != slots {
            return Err(format!(
                "snapshot has {} step states; definition `{}` has {slots} step slots",
                self.steps.len(),
                def.name
            ));
        }
        if self.stage as usize > def.stages.len() {
            return Err(format!(
                "snapshot is at stage {}; definition `{}` has {}",
                self.stage,
                def.name,
                def.stages.len()
            ));
        }
        if let Some(plan) = &self.compensation_plan {
            if let Some(bad) = plan.iter().find(|i| **i as usize >= slots) {
                return Err(format!(
                    "compensation plan names step slot {bad} of {slots}"
                ));
            }
            if self.comp_cursor as usize > plan.len() {
                return Err(format!(
                    "compensation cursor {} is past the plan's {} entries",
                    self.comp_cursor,
                    plan.len()
                ));
            }
        }
        let counters = self
            .steps
            .iter()
            .flat_map(|s| [s.attempt, s.comp_attempt])
            .chain([self.stage, self.comp_cursor]);
        if counters.into_iter().any(|n| n > FAR) || self.status_seq > u64::from(FAR) {
            return Err("snapshot has a counter near overflow".to_string());
        }
        if self
            .history
            .iter()
            .any(|h| h.step.is_some_and(|i| i as usize >= slots))
        {
            return Err(format!("history names a step slot beyond the {slots}"));
        }
        Ok(())
    }

    /// How a reply to attempt `attempt` of step slot `i` (a compensation attempt if
    /// `compensation`) reporting `outcome` relates to what the saga sent and heard: whether
    /// it is applied, ignored, recorded as late, or refused ([`ReplyFit`]). The same whether
    /// the saga has finished or not (a finished saga records nothing, but the host still
    /// dead-letters what is refused). Error kinds are compared as stored under `limits`.
    ///
    /// Decided from the step's state and the entries history compaction always keeps, so a
    /// compacted snapshot decides like a whole one. The outcome of the step's latest attempt
    /// is known (its state, or its last forward answer in the history); an older attempt
    /// failed, timed out or was retried past: a failure reported for it is ignored, a
    /// success is recorded as late.
    pub fn reply_fit(
        &self,
        def: &SagaDefinition,
        i: StepIndex,
        attempt: u32,
        compensation: bool,
        outcome: &Result<Vec<u8>, StepError>,
        limits: &Limits,
    ) -> ReplyFit {
        let (Some(s), Some(step)) = (self.steps.get(i), def.step(i)) else {
            return ReplyFit::Unsent(format!(
                "reply names step slot {i}; saga `{}` has {}",
                def.name,
                def.step_slots()
            ));
        };
        let name = step.name.as_str();
        if let Some(signal) = step.wait_for() {
            return ReplyFit::Unsent(format!(
                "reply to step `{name}`, which waits for signal `{signal}` and sends no command"
            ));
        }
        let (sent, in_flight, what) = if compensation {
            let sent = if step.compensation.is_some() {
                s.comp_attempt
            } else {
                0
            };
            (
                sent,
                s.phase == StepPhase::Compensating,
                "compensation attempt",
            )
        } else {
            (s.attempt, s.phase == StepPhase::Running, "attempt")
        };
        let says = match outcome {
            Ok(_) => "succeeded".to_string(),
            Err(e) => format!("failed with `{}`", e.kind),
        };
        if attempt == 0 || attempt > sent {
            let latest = if sent == 0 {
                "none was sent".to_string()
            } else {
                format!("the latest sent is {sent}")
            };
            return ReplyFit::Unsent(format!(
                "reply to {what} {attempt} of step `{name}`, which was never sent ({latest})"
            ));
        }
        if attempt < sent {
            // Over: it failed (a success ends the step or its compensation), timed out, or an
            // operator retried past it.
            return match outcome {
                Err(_) => ReplyFit::Duplicate,
                Ok(_) => ReplyFit::Late(format!(
                    "late reply to {what} {attempt} of step `{name}`, which was over ({what} {sent} is the latest): it says succeeded"
                )),
            };
        }
        if in_flight {
            return ReplyFit::Expected;
        }
        let Some(answer) = self.latest_answer(i, compensation) else {
            return ReplyFit::Duplicate;
        };
        let had = match (answer, outcome) {
            (Answer::Succeeded, Ok(_)) => return ReplyFit::Duplicate,
            (Answer::Failed(kind), Err(e)) if *limits.stored_kind(&e.kind) == *kind => {
                return ReplyFit::Duplicate
            }
            (Answer::TimedOut, _) => {
                return ReplyFit::Late(format!(
                    "late reply to {what} {attempt} of step `{name}`, which had timed out: it says {says}"
                ))
            }
            (Answer::Succeeded, Err(_)) => "succeeded".to_string(),
            (Answer::Failed(kind), _) => format!("failed with `{kind}`"),
        };
        ReplyFit::Contradicts(format!(
            "second reply to {what} {attempt} of step `{name}` contradicts the answer applied: it says {says}, the attempt had {had}"
        ))
    }

    /// How the latest attempt of step slot `i` (forward, or compensation) ended, if it did
    /// and it is known: its own answer (the step's last answer of that direction in the
    /// history, which compaction keeps), else, if the step is past it, succeeded (answered so,
    /// or skipped by an operator while it ran).
    fn latest_answer(&self, i: StepIndex, compensation: bool) -> Option<Answer> {
        let s = self.steps.get(i)?;
        let slot = u32::try_from(i).ok();
        // The newest numbered answer of that direction.
        let last = self
            .history
            .iter()
            .rev()
            .filter(|h| h.step == slot)
            .find_map(|h| match (&h.what, compensation) {
                (Happening::Succeeded { attempt }, false) => Some((*attempt, Answer::Succeeded)),
                (Happening::AttemptFailed { attempt, kind, .. }, false)
                | (Happening::CompensationAttemptFailed { attempt, kind, .. }, true) => {
                    let answer = if kind == TIMEOUT_KIND {
                        Answer::TimedOut
                    } else {
                        Answer::Failed(kind.clone())
                    };
                    Some((*attempt, answer))
                }
                _ => None,
            });
        let (latest, past) = if compensation {
            (s.comp_attempt, s.phase == StepPhase::Compensated)
        } else {
            let past = matches!(
                s.phase,
                StepPhase::Succeeded
                    | StepPhase::Compensating
                    | StepPhase::CompensationRetryWait
                    | StepPhase::Compensated
                    | StepPhase::CompensationFailed
            );
            (s.attempt, past)
        };
        match last {
            Some((attempt, answer)) if attempt == latest => Some(answer),
            _ if past => Some(Answer::Succeeded),
            _ => None,
        }
    }

    /// The step's latest attempt: whether it is a compensation attempt, and its number (0 if
    /// none was sent).
    fn latest_attempt(&self, i: StepIndex) -> (bool, u32) {
        match self.steps.get(i) {
            Some(s) if s.comp_attempt > 0 => (true, s.comp_attempt),
            Some(s) => (false, s.attempt),
            None => (false, 0),
        }
    }

    /// Where the history counts the replies refused for step slot `i` since its latest
    /// attempt was sent, if any was refused.
    fn refusals_of_latest(&self, i: StepIndex) -> Option<usize> {
        let slot = u32::try_from(i).ok();
        let (latest_comp, latest) = self.latest_attempt(i);
        let k = self
            .history
            .iter()
            .rposition(|h| h.step == slot && matches!(h.what, Happening::ReplyRefused { .. }))?;
        match self.history[k].what {
            Happening::ReplyRefused {
                attempt,
                compensation,
                ..
            } if attempt == latest && compensation == latest_comp => Some(k),
            _ => None,
        }
    }

    /// Records a reply that was not applied (step slot `step`, if the saga has it) because of
    /// `why`: in the entry of the step's latest attempt if it has one, else in a new one; with
    /// `dead_letter`, the host dead-letters the reply.
    fn refuse_reply(
        &mut self,
        step: Option<StepIndex>,
        why: String,
        dead_letter: bool,
        now: Millis,
        t: &mut Transition,
    ) {
        t.changed = true;
        let step = step.filter(|&i| i < self.steps.len());
        let existing = match step {
            Some(i) => self.refusals_of_latest(i),
            // Replies naming no step of the saga share an entry while nothing else happens.
            None => self.history.len().checked_sub(1).filter(|&k| {
                let h = &self.history[k];
                h.step.is_none() && matches!(h.what, Happening::ReplyRefused { .. })
            }),
        };
        match existing.map(|k| &mut self.history[k].what) {
            Some(Happening::ReplyRefused { count, .. }) => *count = count.saturating_add(1),
            _ => {
                let (compensation, attempt) = step.map_or((false, 0), |i| self.latest_attempt(i));
                self.log(
                    now,
                    step,
                    Happening::ReplyRefused {
                        attempt,
                        compensation,
                        reason: why.clone(),
                        count: 1,
                    },
                );
            }
        }
        if dead_letter {
            t.effects.push(Effect::DeadLetterReply { reason: why });
        }
    }

    /// Whether the saga has finished.
    pub fn is_terminal(&self) -> bool {
        self.phase.is_terminal()
    }

    /// Whether `action` applies to the saga as it stands, and to which step slots; the error
    /// says why not, in words an operator can act on.
    pub fn check(
        &self,
        def: &SagaDefinition,
        action: &OperatorAction,
    ) -> Result<Vec<StepIndex>, String> {
        if self.steps.len() != def.step_slots() {
            return Err(format!(
                "saga has {} step slots but definition `{}` has {}",
                self.steps.len(),
                def.name,
                def.step_slots()
            ));
        }
        if self.phase.is_terminal() {
            return Err(format!("the saga has finished ({})", self.phase.as_str()));
        }
        let after = def.steps.len();
        let name = |i: StepIndex| {
            def.step(i)
                .map_or_else(|| format!("#{i}"), |s| s.name.clone())
        };
        let stage = self.stage_steps(def);
        let step_ok = |i: StepIndex| -> Result<(), String> {
            if i < self.steps.len() {
                Ok(())
            } else {
                Err(format!("no step #{i} in saga `{}`", def.name))
            }
        };
        match (action, self.phase) {
            (OperatorAction::Retry { step }, phase) => {
                let eligible: Vec<StepIndex> = (0..self.steps.len())
                    .filter(|&i| {
                        let p = self.steps[i].phase;
                        match phase {
                            Phase::Running => {
                                stage.contains(&i)
                                    && matches!(
                                        p,
                                        StepPhase::Running
                                            | StepPhase::RetryWait
                                            | StepPhase::Waiting
                                    )
                            }
                            Phase::Compensating => {
                                matches!(
                                    p,
                                    StepPhase::Compensating | StepPhase::CompensationRetryWait
                                ) || (i == after
                                    && matches!(p, StepPhase::Running | StepPhase::RetryWait))
                            }
                            Phase::NeedsAttention => p == StepPhase::CompensationFailed,
                            _ => false,
                        }
                    })
                    .collect();
                match step {
                    Some(i) => {
                        step_ok(*i)?;
                        if eligible.contains(i) {
                            Ok(vec![*i])
                        } else {
                            Err(format!(
                                "step `{}` is {}: only a step that is running or waiting to retry, or the compensation that parked the saga, can be retried",
                                name(*i),
                                self.steps[*i].phase.as_str()
                            ))
                        }
                    }
                    None if eligible.is_empty() => Err(match phase {
                        Phase::NeedsAttention => "the saga is parked on a pivot that cannot be compensated: nothing to retry; skip the pivot or force compensation".to_string(),
                        _ => "no step is running or waiting to retry".to_string(),
                    }),
                    None => Ok(eligible),
                }
            }
            (OperatorAction::Skip { step, output }, phase) => {
                let i = *step;
                step_ok(i)?;
                let p = self.steps[i].phase;
                // A parked pivot that is skipped counts as dealt with and compensation goes on:
                // a result would be dropped, so it is refused, pointing to `settle`.
                let parked_pivot = phase == Phase::NeedsAttention
                    && p != StepPhase::CompensationFailed
                    && def.steps.get(i).is_some_and(|s| s.pivot);
                if !output.is_empty() && parked_pivot {
                    return Err(format!(
                        "a skipped pivot is not recorded as succeeded (compensation goes on), so `{}` takes no result: skip it without one, or settle it to record it as succeeded with this result and go forward",
                        name(i)
                    ));
                }
                let ok = match phase {
                    Phase::Running => {
                        stage.contains(&i)
                            && matches!(
                                p,
                                StepPhase::Running | StepPhase::RetryWait | StepPhase::Waiting
                            )
                    }
                    Phase::Compensating => {
                        matches!(p, StepPhase::Compensating | StepPhase::CompensationRetryWait)
                            || (i == after
                                && matches!(p, StepPhase::Running | StepPhase::RetryWait))
                    }
                    Phase::NeedsAttention => {
                        p == StepPhase::CompensationFailed
                            || (self.compensation_plan.is_none()
                                && def.steps.get(i).is_some_and(|s| s.pivot)
                                && needs_compensation(&self.steps[i]))
                    }
                    _ => false,
                };
                // Only a forward step settled by hand records a result: a compensation (or a
                // compensation that parked the saga) counts as done and keeps none.
                let records_result = matches!(
                    p,
                    StepPhase::Running | StepPhase::RetryWait | StepPhase::Waiting
                );
                if ok && !output.is_empty() && !records_result {
                    return Err(format!(
                        "skipping step `{}` ({}) counts its compensation as done and records no result, so it takes none: skip it without a result",
                        name(i),
                        p.as_str()
                    ));
                }
                if ok {
                    Ok(vec![i])
                } else {
                    Err(format!(
                        "step `{}` is {} while the saga is {}: only a step of the current stage that is running or waiting to retry, a running compensation, or what parked the saga can be skipped",
                        name(i),
                        p.as_str(),
                        phase.as_str()
                    ))
                }
            }
            (OperatorAction::Compensate, Phase::Running) => Ok(Vec::new()),
            (OperatorAction::Compensate, Phase::NeedsAttention) if self.compensation_plan.is_none() => {
                Ok(Vec::new())
            }
            (OperatorAction::Compensate, phase) => Err(format!(
                "the saga is {}: compensation is already under way; retry or skip the compensation instead",
                phase.as_str()
            )),
            (OperatorAction::Cancel, Phase::Running) => Ok(Vec::new()),
            (OperatorAction::Cancel, phase) => Err(format!(
                "the saga is {}: only a running saga can be cancelled",
                phase.as_str()
            )),
            (OperatorAction::Settle { step, .. }, Phase::NeedsAttention) => {
                let i = *step;
                step_ok(i)?;
                let parked_pivot = self.compensation_plan.is_none()
                    && def.steps.get(i).is_some_and(|s| s.pivot)
                    && needs_compensation(&self.steps[i]);
                if !parked_pivot {
                    return Err(format!(
                        "step `{}` is not the pivot that parked the saga: only that pivot can be settled",
                        name(i)
                    ));
                }
                if self.steps[i].phase == StepPhase::Succeeded {
                    return Err(format!(
                        "pivot `{}` already succeeded: the saga compensates because a later step failed; skip the pivot to let compensation go on, or abandon",
                        name(i)
                    ));
                }
                // Forward again only if everything else started is still done.
                let stage_of_pivot = def.stages.iter().position(|s| s.steps.contains(&i));
                let blocking = (0..def.steps.len()).find(|&j| {
                    let started = def
                        .stages
                        .iter()
                        .position(|s| s.steps.contains(&j))
                        .zip(stage_of_pivot)
                        .is_some_and(|(sj, sp)| sj <= sp);
                    j != i && started && self.steps[j].phase != StepPhase::Succeeded
                });
                match blocking {
                    Some(j) => Err(format!(
                        "step `{}` is {}: the saga cannot go forward even with the pivot settled; skip the pivot to let compensation go on, or abandon",
                        name(j),
                        self.steps[j].phase.as_str()
                    )),
                    None => Ok(vec![i]),
                }
            }
            (OperatorAction::Settle { .. }, phase) => Err(format!(
                "the saga is {}: only a saga parked on a pivot can have it settled",
                phase.as_str()
            )),
            (OperatorAction::Abandon, Phase::NeedsAttention) => Ok(Vec::new()),
            (OperatorAction::Abandon, phase) => Err(format!(
                "the saga is {}: only a saga parked NEEDS_ATTENTION can be abandoned",
                phase.as_str()
            )),
        }
    }

    fn intervene(
        &mut self,
        def: &SagaDefinition,
        intervention: Intervention,
        now: Millis,
        t: &mut Transition,
    ) {
        let Intervention {
            id,
            action,
            operator,
            reason,
        } = intervention;
        if !id.is_empty()
            && self
                .history
                .iter()
                .any(|h| matches!(&h.what, Happening::Intervened { id: seen, .. } if *seen == id))
        {
            return; // redelivered: already applied (or refused)
        }
        t.changed = true;
        let checked = self.check(def, &action);
        let journal = |refused: String| Happening::Intervened {
            id: id.clone(),
            action: action.name().to_string(),
            operator: operator.clone(),
            reason: reason.clone(),
            refused,
        };
        let steps = match checked {
            Ok(steps) => steps,
            Err(why) => {
                // Journaled all the same: the operator sees what became of the request.
                let entry = journal(why);
                self.log(now, None, entry);
                return;
            }
        };
        let who = if reason.is_empty() {
            format!("operator `{operator}`")
        } else {
            format!("operator `{operator}`: {reason}")
        };
        if self.phase == Phase::NeedsAttention {
            self.unpark(def, &action, &operator, &id, now, t);
        }
        match &action {
            OperatorAction::Retry { .. } => {
                for i in steps {
                    let entry = journal(String::new());
                    self.log(now, Some(i), entry);
                    match self.steps[i].phase {
                        // A wait step waits again, with a fresh timeout.
                        StepPhase::Running | StepPhase::RetryWait | StepPhase::Waiting => {
                            self.send_forward(def, i, now, t)
                        }
                        _ => {
                            self.phase = Phase::Compensating;
                            self.send_compensation(def, i, now, t);
                        }
                    }
                }
            }
            OperatorAction::Skip { output, .. } => {
                let Some(&i) = steps.first() else { return };
                let entry = journal(String::new());
                self.log(now, Some(i), entry);
                let s = &mut self.steps[i];
                match s.phase {
                    // A wait settled by hand: the result stands for the signal's payload.
                    StepPhase::Running | StepPhase::RetryWait | StepPhase::Waiting => {
                        s.settle(StepPhase::Succeeded, now);
                        s.output = (!output.is_empty()).then(|| output.clone());
                        if self.is_after_compensation(def, i) {
                            self.finish(def, Phase::Compensated, now, t);
                        } else {
                            self.after_forward_settled(def, now, t);
                        }
                    }
                    _ => {
                        // A compensation (or a parked pivot) the operator settled by hand.
                        s.settle(StepPhase::Compensated, now);
                        self.log(now, Some(i), Happening::Compensated);
                        self.phase = Phase::Compensating;
                        self.advance_compensation(def, now, t);
                    }
                }
            }
            OperatorAction::Compensate => {
                let entry = journal(String::new());
                self.log(now, None, entry);
                if self.phase == Phase::Running {
                    self.begin_compensation(def, format!("compensation forced by {who}"), now, t);
                } else {
                    self.phase = Phase::Compensating;
                    self.plan_compensation(def, true, now, t);
                }
            }
            OperatorAction::Cancel => {
                let entry = journal(String::new());
                self.log(now, None, entry);
                self.begin_compensation(def, format!("cancelled by {who}"), now, t);
            }
            OperatorAction::Settle { output, .. } => {
                let Some(&i) = steps.first() else { return };
                let entry = journal(String::new());
                self.log(now, Some(i), entry);
                // Forward again, as if the pivot's reply had arrived in time.
                self.phase = Phase::Running;
                self.reason = None;
                let s = &mut self.steps[i];
                s.settle(StepPhase::Succeeded, now);
                s.output = (!output.is_empty()).then(|| output.clone());
                self.after_forward_settled(def, now, t);
            }
            OperatorAction::Abandon => {
                let entry = journal(String::new());
                self.log(now, None, entry);
                let base = self.reason.clone().unwrap_or_default();
                self.reason = Some(format!("{base}; abandoned by {who}"));
                self.finish(def, Phase::Failed, now, t);
            }
        }
    }

    fn log(&mut self, at: Millis, step: Option<StepIndex>, what: Happening) {
        let step = step.and_then(|s| u32::try_from(s).ok());
        self.history.push(HistoryEntry { at, step, what });
    }

    fn set_status(&mut self, status: &str, now: Millis, t: &mut Transition) {
        if self.status != status {
            let from = std::mem::replace(&mut self.status, status.to_string());
            self.status_seq += 1;
            self.log(
                now,
                None,
                Happening::Status {
                    status: status.to_string(),
                },
            );
            t.effects.push(Effect::StatusChanged {
                from,
                to: status.to_string(),
            });
        }
    }

    fn stage_steps<'d>(&self, def: &'d SagaDefinition) -> &'d [StepIndex] {
        def.stages
            .get(self.stage as usize)
            .map_or(&[], |s| s.steps.as_slice())
    }

    fn start_stage(&mut self, def: &SagaDefinition, now: Millis, t: &mut Transition) {
        for &i in self.stage_steps(def) {
            self.send_forward(def, i, now, t);
        }
        // Signals that arrived before their steps waited end those waits now (after every
        // step of the stage started, so the stage advances once).
        let early: Vec<StepIndex> = self
            .stage_steps(def)
            .iter()
            .copied()
            .filter(|&i| {
                self.steps[i].phase == StepPhase::Waiting && self.steps[i].output.is_some()
            })
            .collect();
        if !early.is_empty() {
            for i in early {
                let attempt = self.steps[i].attempt;
                self.steps[i].settle(StepPhase::Succeeded, now);
                self.log(now, Some(i), Happening::Succeeded { attempt });
            }
            self.after_forward_settled(def, now, t);
        }
    }

    /// A signal for this saga (see [`Event::Signal`]).
    fn on_signal(
        &mut self,
        def: &SagaDefinition,
        id: String,
        name: String,
        payload: Vec<u8>,
        now: Millis,
        t: &mut Transition,
    ) {
        let seen = self.history.iter().any(|h| {
            matches!(&h.what, Happening::SignalReceived { id: seen, .. } | Happening::SignalIgnored { id: seen, .. } if *seen == id)
        });
        if seen {
            return; // a duplicate (a retried request, a redelivery)
        }
        t.changed = true;
        // A kept signal is a step output that is set: an empty payload is JSON `null`.
        let payload = if payload.is_empty() {
            b"null".to_vec()
        } else {
            payload
        };
        // The first step waiting for it, else the first that will: a forward step not started
        // yet, with no signal kept, while the saga still goes forward.
        let waiting = (0..def.steps.len()).find(|&i| {
            def.steps[i].wait_for() == Some(name.as_str())
                && self.steps[i].phase == StepPhase::Waiting
        });
        let later = || {
            (0..def.steps.len()).find(|&i| {
                def.steps[i].wait_for() == Some(name.as_str())
                    && self.steps[i].phase == StepPhase::Pending
                    && self.steps[i].output.is_none()
            })
        };
        match waiting {
            Some(i) => {
                self.log(
                    now,
                    Some(i),
                    Happening::SignalReceived {
                        name,
                        id,
                        kept: false,
                    },
                );
                let attempt = self.steps[i].attempt;
                self.steps[i].settle(StepPhase::Succeeded, now);
                self.steps[i].output = Some(payload);
                self.log(now, Some(i), Happening::Succeeded { attempt });
                self.after_forward_settled(def, now, t);
            }
            None => match later().filter(|_| self.phase == Phase::Running) {
                Some(i) => {
                    self.steps[i].output = Some(payload);
                    self.log(
                        now,
                        Some(i),
                        Happening::SignalReceived {
                            name,
                            id,
                            kept: true,
                        },
                    );
                }
                None => self.log(now, None, Happening::SignalIgnored { name, id }),
            },
        }
    }

    fn send_forward(
        &mut self,
        def: &SagaDefinition,
        i: StepIndex,
        now: Millis,
        t: &mut Transition,
    ) {
        let Some(step) = def.step(i) else { return };
        let timeout = millis(step.timeout);
        let s = &mut self.steps[i];
        s.attempt += 1;
        s.due_at = Some(now.saturating_add(timeout));
        s.started_at.get_or_insert(now);
        if let Some(signal) = step.wait_for() {
            // No command: the signal (Event::Signal) or the timeout ends the wait. A signal
            // that came early is taken by `start_stage`.
            s.phase = StepPhase::Waiting;
            t.changed = true;
            self.log(
                now,
                Some(i),
                Happening::Waiting {
                    signal: signal.to_string(),
                },
            );
            return;
        }
        s.phase = StepPhase::Running;
        let attempt = s.attempt;
        self.log(now, Some(i), Happening::Sent { attempt });
        t.changed = true;
        t.effects.push(Effect::Send(CommandSpec {
            step: i,
            compensation: false,
            attempt,
        }));
    }

    fn send_compensation(
        &mut self,
        def: &SagaDefinition,
        i: StepIndex,
        now: Millis,
        t: &mut Transition,
    ) {
        let Some(step) = def.step(i) else { return };
        let timeout = millis(step.timeout);
        let s = &mut self.steps[i];
        s.comp_attempt += 1;
        s.phase = StepPhase::Compensating;
        s.due_at = Some(now.saturating_add(timeout));
        let attempt = s.comp_attempt;
        self.log(now, Some(i), Happening::CompensationSent { attempt });
        t.changed = true;
        t.effects.push(Effect::Send(CommandSpec {
            step: i,
            compensation: true,
            attempt,
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_reply(
        &mut self,
        def: &SagaDefinition,
        i: StepIndex,
        attempt: u32,
        compensation: bool,
        outcome: Result<Vec<u8>, StepError>,
        now: Millis,
        t: &mut Transition,
    ) {
        let Some(s) = self.steps.get(i) else { return };
        let expected = if compensation {
            s.phase == StepPhase::Compensating && s.comp_attempt == attempt
        } else {
            s.phase == StepPhase::Running && s.attempt == attempt
        };
        if !expected {
            // A duplicate, a late answer to an older attempt, or an answer to nothing we sent.
            return;
        }
        if compensation {
            self.on_compensation_result(def, i, outcome, now, t);
        } else {
            self.on_forward_result(def, i, outcome, now, t);
        }
    }

    fn on_forward_result(
        &mut self,
        def: &SagaDefinition,
        i: StepIndex,
        outcome: Result<Vec<u8>, StepError>,
        now: Millis,
        t: &mut Transition,
    ) {
        let Some(step) = def.step(i) else { return };
        t.changed = true;
        let attempt = self.steps[i].attempt;
        match outcome {
            Ok(output) => {
                self.steps[i].settle(StepPhase::Succeeded, now);
                self.steps[i].output = (!output.is_empty()).then_some(output);
                self.log(now, Some(i), Happening::Succeeded { attempt });
                self.after_forward_settled(def, now, t);
            }
            Err(err) => {
                let timed_out = err.kind == TIMEOUT_KIND;
                let s = &mut self.steps[i];
                // A timeout leaves the outcome unknown; a reported failure means nothing was done
                // (participants answer duplicates with their first answer).
                s.maybe_applied |= timed_out;
                s.last_error = Some(err.clone());
                self.log(
                    now,
                    Some(i),
                    Happening::AttemptFailed {
                        attempt,
                        kind: err.kind.clone(),
                        message: err.message.clone(),
                    },
                );
                let may_retry = step.retry.is_retryable(&err.kind)
                    && self.attempts_in_budget(i, false) < step.retry.max_attempts
                    && (self.phase == Phase::Running || self.is_after_compensation(def, i))
                    && (now < self.deadline_at || self.is_after_compensation(def, i));
                if may_retry {
                    let at = now.saturating_add(backoff(&step.retry, &self.id, i, attempt, false));
                    let s = &mut self.steps[i];
                    s.phase = StepPhase::RetryWait;
                    s.due_at = Some(at);
                    self.log(
                        now,
                        Some(i),
                        Happening::RetryScheduled {
                            attempt: attempt + 1,
                            at,
                        },
                    );
                } else {
                    self.steps[i].settle(StepPhase::Failed, now);
                    self.log(now, Some(i), Happening::StepFailed);
                    if self.is_after_compensation(def, i) {
                        self.finish(def, Phase::Compensated, now, t);
                    } else if self.phase == Phase::Running {
                        let reason = format!(
                            "step `{}` ({}) failed: {}: {}",
                            step.name, step.action, err.kind, err.message
                        );
                        self.begin_compensation(def, reason, now, t);
                    } else {
                        self.after_forward_settled(def, now, t);
                    }
                }
            }
        }
    }

    fn is_after_compensation(&self, def: &SagaDefinition, i: StepIndex) -> bool {
        def.after_compensation.is_some() && i == def.steps.len()
    }

    /// Called when a forward step settled: advance the stage, or continue compensating.
    fn after_forward_settled(&mut self, def: &SagaDefinition, now: Millis, t: &mut Transition) {
        match self.phase {
            Phase::Running => {
                let all_done = self
                    .stage_steps(def)
                    .iter()
                    .all(|&i| self.steps[i].phase == StepPhase::Succeeded);
                if !all_done {
                    return;
                }
                if let Some(status) = def
                    .stages
                    .get(self.stage as usize)
                    .and_then(|s| s.status.clone())
                {
                    self.set_status(&status, now, t);
                }
                self.stage += 1;
                if self.stage as usize >= def.stages.len() {
                    self.finish(def, Phase::Completed, now, t);
                } else if now >= self.deadline_at {
                    // The reply beat the deadline's Tick: past the deadline no forward step starts.
                    self.begin_compensation(def, "saga deadline exceeded".to_string(), now, t);
                } else {
                    self.start_stage(def, now, t);
                }
            }
            Phase::Compensating => self.advance_compensation(def, now, t),
            _ => {}
        }
    }

    fn begin_compensation(
        &mut self,
        def: &SagaDefinition,
        reason: String,
        now: Millis,
        t: &mut Transition,
    ) {
        t.changed = true;
        self.phase = Phase::Compensating;
        self.reason = Some(reason.clone());
        self.log(now, None, Happening::CompensationStarted { reason });
        // Forward steps waiting to retry are abandoned now: no forward step starts after
        // compensation began. Steps never started are skipped.
        for i in 0..def.steps.len() {
            let s = &mut self.steps[i];
            match s.phase {
                // A wait ends too: nothing was done, nothing to undo.
                StepPhase::RetryWait | StepPhase::Waiting => {
                    s.settle(StepPhase::Failed, now);
                    self.log(now, Some(i), Happening::StepFailed);
                }
                StepPhase::Pending => {
                    s.phase = StepPhase::Skipped;
                    self.log(now, Some(i), Happening::Skipped);
                }
                _ => {}
            }
        }
        self.advance_compensation(def, now, t);
    }

    /// Runs the next compensation once no forward step is in flight.
    fn advance_compensation(&mut self, def: &SagaDefinition, now: Millis, t: &mut Transition) {
        if self
            .steps
            .iter()
            .take(def.steps.len())
            .any(StepState::in_flight)
            && self.compensation_plan.is_none()
        {
            return; // wait for in-flight forward attempts to settle (reply or timeout)
        }
        if self.compensation_plan.is_none() {
            self.plan_compensation(def, false, now, t);
        } else {
            self.next_compensation(def, now, t);
        }
    }

    /// Decides what to compensate (once no forward step is in flight) and starts; unless
    /// `through_pivot`, a pivot that succeeded — or may have: it timed out — parks the saga,
    /// because it cannot be undone and a human must decide rather than a compensation that
    /// pretends nothing happened.
    fn plan_compensation(
        &mut self,
        def: &SagaDefinition,
        through_pivot: bool,
        now: Millis,
        t: &mut Transition,
    ) {
        // (No forward step waits to retry here: begin_compensation abandoned those, and a
        // step failing while we drain is not retried.)
        if !through_pivot {
            if let Some((i, p)) = def
                .steps
                .iter()
                .enumerate()
                .find(|(i, st)| st.pivot && needs_compensation(&self.steps[*i]))
            {
                let how = if self.steps[i].phase == StepPhase::Succeeded {
                    "had already succeeded"
                } else {
                    "may have succeeded (it timed out)"
                };
                let why = format!("pivot step `{}` {how} and cannot be compensated", p.name);
                self.park(def, why, now, t);
                return;
            }
        }
        // Newest first: later stages before earlier ones, and within a stage the reverse of
        // the definition order.
        let plan: Vec<u32> = (0..def.steps.len())
            .rev()
            .filter(|&i| needs_compensation(&self.steps[i]) && def.steps[i].compensation.is_some())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        self.compensation_plan = Some(plan);
        self.comp_cursor = 0;
        t.changed = true;
        self.next_compensation(def, now, t);
    }

    /// Sends the next compensation of the plan, or finishes once every one is done.
    fn next_compensation(&mut self, def: &SagaDefinition, now: Millis, t: &mut Transition) {
        let plan = self.compensation_plan.clone().unwrap_or_default();
        while let Some(&next) = plan.get(self.comp_cursor as usize) {
            let i = next as usize;
            match self.steps[i].phase {
                StepPhase::Compensated => self.comp_cursor += 1,
                StepPhase::Compensating | StepPhase::CompensationRetryWait => return,
                _ => {
                    self.send_compensation(def, i, now, t);
                    return;
                }
            }
        }
        // Every compensation done: run the after-compensation step, then finish.
        let after = def.steps.len();
        if def.after_compensation.is_some() {
            match self.steps[after].phase {
                StepPhase::Pending => {
                    self.send_forward(def, after, now, t);
                    return;
                }
                StepPhase::Running | StepPhase::RetryWait => return,
                _ => {}
            }
        }
        self.finish(def, Phase::Compensated, now, t);
    }

    fn on_compensation_result(
        &mut self,
        def: &SagaDefinition,
        i: StepIndex,
        outcome: Result<Vec<u8>, StepError>,
        now: Millis,
        t: &mut Transition,
    ) {
        let Some(step) = def.step(i) else { return };
        t.changed = true;
        let attempt = self.steps[i].comp_attempt;
        match outcome {
            Ok(_) => {
                self.steps[i].settle(StepPhase::Compensated, now);
                self.log(now, Some(i), Happening::Compensated);
                self.comp_cursor += 1;
                self.advance_compensation(def, now, t);
            }
            Err(err) => {
                self.steps[i].last_error = Some(err.clone());
                self.log(
                    now,
                    Some(i),
                    Happening::CompensationAttemptFailed {
                        attempt,
                        kind: err.kind.clone(),
                        message: err.message.clone(),
                    },
                );
                let policy = &step.compensation_retry;
                if policy.is_retryable(&err.kind)
                    && self.attempts_in_budget(i, true) < policy.max_attempts
                {
                    let at = now.saturating_add(backoff(policy, &self.id, i, attempt, true));
                    let s = &mut self.steps[i];
                    s.phase = StepPhase::CompensationRetryWait;
                    s.due_at = Some(at);
                    self.log(
                        now,
                        Some(i),
                        Happening::CompensationRetryScheduled {
                            attempt: attempt + 1,
                            at,
                        },
                    );
                } else {
                    self.steps[i].settle(StepPhase::CompensationFailed, now);
                    let comp = step
                        .compensation
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    let why = format!(
                        "compensation `{comp}` of step `{}` failed after {} attempt(s): {}: {}",
                        step.name,
                        self.attempts_in_budget(i, true),
                        err.kind,
                        err.message
                    );
                    self.park(def, why, now, t);
                }
            }
        }
    }

    fn on_tick(&mut self, def: &SagaDefinition, now: Millis, t: &mut Transition) {
        // Deadline first: past it, no forward step starts any more.
        if self.phase == Phase::Running && now >= self.deadline_at {
            self.begin_compensation(def, "saga deadline exceeded".to_string(), now, t);
        }
        for i in 0..self.steps.len() {
            if self.phase.is_terminal() {
                return;
            }
            let s = &self.steps[i];
            let Some(due) = s.due_at else { continue };
            if due > now {
                continue;
            }
            match s.phase {
                StepPhase::Running => {
                    let timeout = self.timeout_error(def, i);
                    let attempt = self.steps[i].attempt;
                    self.on_reply(def, i, attempt, false, Err(timeout), now, t);
                }
                StepPhase::Waiting => {
                    // No signal in time: the step fails for good (a wait is not retried).
                    let timeout = self.timeout_error(def, i);
                    self.on_forward_result(def, i, Err(timeout), now, t);
                }
                StepPhase::Compensating => {
                    let timeout = self.timeout_error(def, i);
                    let attempt = self.steps[i].comp_attempt;
                    self.on_reply(def, i, attempt, true, Err(timeout), now, t);
                }
                StepPhase::RetryWait
                    if self.phase == Phase::Running || self.is_after_compensation(def, i) =>
                {
                    self.send_forward(def, i, now, t);
                }
                StepPhase::CompensationRetryWait => self.send_compensation(def, i, now, t),
                _ => {}
            }
        }
    }

    /// The error recorded for the latest attempt of step `i` that did not answer in time:
    /// `no reply after 5s`, or, if replies were refused while it waited, `no accepted reply
    /// after 5s (2 replies refused; the first: …)`.
    fn timeout_error(&self, def: &SagaDefinition, i: StepIndex) -> StepError {
        if let Some((signal, timeout)) = def
            .step(i)
            .and_then(|s| s.wait_for().map(|w| (w, s.timeout)))
        {
            return StepError {
                kind: TIMEOUT_KIND.to_string(),
                message: format!("no signal `{signal}` within {timeout:?}"),
            };
        }
        let after = def
            .step(i)
            .map_or_else(String::new, |s: &Step| format!(" after {:?}", s.timeout));
        let refused = self
            .refusals_of_latest(i)
            .and_then(|k| match &self.history[k].what {
                Happening::ReplyRefused { count, reason, .. } => Some((*count, reason.as_str())),
                _ => None,
            });
        let message = match refused {
            None => format!("no reply{after}"),
            Some((1, reason)) => format!("no accepted reply{after} (1 reply refused: {reason})"),
            Some((n, reason)) => {
                format!("no accepted reply{after} ({n} replies refused; the first: {reason})")
            }
        };
        StepError {
            kind: TIMEOUT_KIND.to_string(),
            message,
        }
    }

    /// Takes a parked saga out of `NEEDS_ATTENTION` for an operator's `action`: the reason
    /// goes back to why it compensated, the status to what it was before parking (unless the
    /// saga is abandoned: it gets its final status at once), and the host settles its dead
    /// letters.
    fn unpark(
        &mut self,
        def: &SagaDefinition,
        action: &OperatorAction,
        operator: &str,
        request: &str,
        now: Millis,
        t: &mut Transition,
    ) {
        let parked_at = self
            .history
            .iter()
            .rposition(|h| matches!(h.what, Happening::Parked { .. }))
            .unwrap_or(self.history.len());
        let before = self.history[..parked_at]
            .iter()
            .rev()
            .find_map(|h| match &h.what {
                Happening::Status { status } => Some(status.clone()),
                _ => None,
            })
            .unwrap_or_else(|| def.statuses.initial.clone());
        let base = self.compensation_reason();
        self.reason = (!base.is_empty()).then_some(base);
        self.phase = Phase::Compensating;
        self.log(now, None, Happening::Unparked);
        t.effects.push(Effect::Unparked {
            operator: operator.to_string(),
            action: action.name().to_string(),
            request: request.to_string(),
        });
        if *action != OperatorAction::Abandon {
            self.set_status(&before, now, t);
        }
    }

    /// Why the saga began compensating (empty if it did not).
    fn compensation_reason(&self) -> String {
        self.history
            .iter()
            .rev()
            .find_map(|h| match &h.what {
                Happening::CompensationStarted { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Parks the saga `NEEDS_ATTENTION` because of `why`: no timer runs until an operator acts.
    fn park(&mut self, def: &SagaDefinition, why: String, now: Millis, t: &mut Transition) {
        t.changed = true;
        self.phase = Phase::NeedsAttention;
        for s in &mut self.steps {
            s.due_at = None;
        }
        // Why the saga compensated in the first place, then why it is parked (repeated parks
        // do not nest).
        let base = self.compensation_reason();
        self.reason = Some(if base.is_empty() {
            why.clone()
        } else {
            format!("{base}; {why}")
        });
        self.log(now, None, Happening::Parked { reason: why });
        t.effects.push(Effect::Parked {
            reason: self.reason.clone().unwrap_or_default(),
            count: self.parkings(),
        });
        let status = def.statuses.needs_attention.clone();
        self.set_status(&status, now, t);
    }

    /// Attempts (forward or compensation) of step `i` sent since the last operator retry of
    /// that step: an operator's retry grants a fresh budget of the step's policy.
    ///
    /// Attempts are numbered without gaps, so this is the step's attempt count minus the number
    /// of the first attempt sent after that retry: history compaction keeps both entries (the
    /// last applied retry of each step and the first attempt after it), never the attempts
    /// in between.
    pub fn attempts_in_budget(&self, i: StepIndex, compensation: bool) -> u32 {
        let Some(state) = self.steps.get(i) else {
            return 0;
        };
        let total = if compensation {
            state.comp_attempt
        } else {
            state.attempt
        };
        let slot = u32::try_from(i).ok();
        // The earliest attempt after the latest retry seen so far, walking back in time.
        let mut first = None;
        for h in self.history.iter().rev().filter(|h| h.step == slot) {
            match &h.what {
                Happening::Sent { attempt } if !compensation => first = Some(*attempt),
                Happening::CompensationSent { attempt } if compensation => first = Some(*attempt),
                what if bounds::is_applied_retry(what) => {
                    return first.map_or(0, |a| total.saturating_sub(a).saturating_add(1));
                }
                _ => {}
            }
        }
        total
    }

    fn finish(&mut self, def: &SagaDefinition, phase: Phase, now: Millis, t: &mut Transition) {
        t.changed = true;
        self.phase = phase;
        for s in &mut self.steps {
            s.due_at = None;
        }
        let status = match phase {
            Phase::Completed => def.statuses.completed.clone(),
            Phase::Compensated => def.statuses.compensated.clone(),
            _ => def.statuses.failed.clone(),
        };
        self.log(now, None, Happening::Finished { phase });
        self.set_status(&status, now, t);
    }
}

/// How an attempt ended, as far as a reply to it is concerned ([`Saga::reply_fit`]).
enum Answer {
    /// It succeeded (or an operator skipped it).
    Succeeded,
    /// Its participant reported a failure of this kind (as stored).
    Failed(String),
    /// It timed out.
    TimedOut,
}

/// Whether a step must be compensated: it succeeded, or may have (it timed out).
fn needs_compensation(s: &StepState) -> bool {
    s.phase == StepPhase::Succeeded || (s.phase == StepPhase::Failed && s.maybe_applied)
}

/// Prefix of the request id of the intervention a parked saga's dead letter carries.
pub const REPLAY_REQUEST_PREFIX: &str = "dlq-replay/";

/// Error kind the machine uses for an attempt that did not answer in time.
pub const TIMEOUT_KIND: &str = "timeout";

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Full-jitter backoff after `attempt` failed: uniform in `[0, ceiling]`, drawn from a hash of
/// (saga, step, attempt, forward/compensation) so the machine stays deterministic while sagas
/// spread out.
fn backoff(
    policy: &RetryPolicy,
    saga: &str,
    step: StepIndex,
    attempt: u32,
    compensation: bool,
) -> i64 {
    let ceiling = millis(policy.backoff_ceiling(attempt)).max(1);
    // Compensation attempts draw from other keys than forward ones (the offset only salts the
    // hash: the ceiling above uses the real attempt number).
    let salted = if compensation {
        attempt.wrapping_add(1000)
    } else {
        attempt
    };
    let mut key = Vec::with_capacity(saga.len() + 16);
    key.extend_from_slice(saga.as_bytes());
    key.extend_from_slice(&(step as u64).to_le_bytes());
    key.extend_from_slice(&salted.to_le_bytes());
    let draw = crate::hash::fnv1a(&key);
    // ceiling is ≥ 1 and fits in i64, so the modulo does too.
    (draw % (ceiling as u64 + 1)) as i64
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod waits;
