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
//!                    FAILED  (needs a human; nothing is dropped)
//! ```
//!
//! [`Saga::start`] and [`Saga::apply`] take the current time as an argument and return the
//! [`Effect`]s the host must carry out **after** persisting the new snapshot: commands to send
//! and status changes to announce. Timers are not effects: the snapshot records every due time
//! (step timeouts, retry times, the deadline), [`Saga::next_wakeup`] tells the host when to send
//! [`Event::Tick`], and a restarted host re-arms from the snapshot alone. Likewise
//! [`Saga::in_flight`] lists the commands a recovering host must publish again (they carry the
//! same ids, so the server and the participants de-duplicate them).
//!
//! Replies are matched on (step, attempt, forward/compensation): a duplicate, a late reply of an
//! older attempt or a reply to something never sent changes nothing.

use serde::{Deserialize, Serialize};

use crate::definition::{RetryPolicy, SagaDefinition, Step, StepIndex};

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
    /// Compensation could not complete: needs attention.
    Failed,
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
        }
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
    /// Result reported by the participant (JSON).
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
    /// Every transition, oldest first.
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

    /// Applies one event at time `now`.
    pub fn apply(
        &mut self,
        def: &SagaDefinition,
        event: Event,
        now: Millis,
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
            } => self.on_reply(def, step, attempt, compensation, outcome, now, &mut t),
            Event::Tick => self.on_tick(def, now, &mut t),
            Event::Cancel { reason } => {
                if self.phase == Phase::Running {
                    self.begin_compensation(def, format!("cancelled: {reason}"), now, &mut t);
                }
            }
        }
        if t.changed {
            self.updated_at = now;
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

    /// Whether the saga has finished.
    pub fn is_terminal(&self) -> bool {
        self.phase.is_terminal()
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
        s.phase = StepPhase::Running;
        s.due_at = Some(now.saturating_add(timeout));
        s.started_at.get_or_insert(now);
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
                    && attempt < step.retry.max_attempts
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
                StepPhase::RetryWait => {
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
            // (No forward step waits to retry here: begin_compensation abandoned those, and a
            // step failing while we drain is not retried.)
            let needs = |s: &StepState| {
                s.phase == StepPhase::Succeeded || (s.phase == StepPhase::Failed && s.maybe_applied)
            };
            // A pivot that succeeded — or may have: it timed out — cannot be undone: the saga
            // needs a human rather than a compensation that pretends nothing happened.
            if let Some((i, p)) = def
                .steps
                .iter()
                .enumerate()
                .find(|(i, st)| st.pivot && needs(&self.steps[*i]))
            {
                let how = if self.steps[i].phase == StepPhase::Succeeded {
                    "had already succeeded"
                } else {
                    "may have succeeded (it timed out)"
                };
                let reason = format!(
                    "{}; pivot step `{}` {how} and cannot be compensated",
                    self.reason.clone().unwrap_or_default(),
                    p.name
                );
                self.reason = Some(reason);
                self.finish(def, Phase::Failed, now, t);
                return;
            }
            // Newest first: later stages before earlier ones, and within a stage the reverse of
            // the definition order.
            let plan: Vec<u32> = (0..def.steps.len())
                .rev()
                .filter(|&i| needs(&self.steps[i]) && def.steps[i].compensation.is_some())
                .filter_map(|i| u32::try_from(i).ok())
                .collect();
            self.compensation_plan = Some(plan);
            self.comp_cursor = 0;
            t.changed = true;
        }
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
                if policy.is_retryable(&err.kind) && attempt < policy.max_attempts {
                    let at = now.saturating_add(backoff(policy, &self.id, i, attempt, true));
                    let s = &mut self.steps[i];
                    s.phase = StepPhase::CompensationRetryWait;
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
                    self.steps[i].settle(StepPhase::CompensationFailed, now);
                    let comp = step
                        .compensation
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    let reason = format!(
                        "{}; compensation `{comp}` of step `{}` failed after {attempt} attempt(s): {}: {}",
                        self.reason.clone().unwrap_or_default(),
                        step.name,
                        err.kind,
                        err.message
                    );
                    self.reason = Some(reason);
                    self.finish(def, Phase::Failed, now, t);
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
                    let timeout = timeout_error(def, i);
                    let attempt = s.attempt;
                    self.on_reply(def, i, attempt, false, Err(timeout), now, t);
                }
                StepPhase::Compensating => {
                    let timeout = timeout_error(def, i);
                    let attempt = s.comp_attempt;
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

/// Error kind the machine uses for an attempt that did not answer in time.
pub const TIMEOUT_KIND: &str = "timeout";

/// The error recorded for an attempt of step `i` that did not answer in time.
fn timeout_error(def: &SagaDefinition, i: StepIndex) -> StepError {
    let what = def
        .step(i)
        .map_or_else(String::new, |s: &Step| format!(" after {:?}", s.timeout));
    StepError {
        kind: TIMEOUT_KIND.to_string(),
        message: format!("no reply{what}"),
    }
}

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
