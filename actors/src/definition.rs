//! Saga definitions: the validated, immutable model of a saga loaded from `sagas/*.toml`.
//!
//! A [`SagaDefinition`] can only be built by [`parse`] (or [`load_dir`]), which refuses anything
//! the engine could not run safely: unknown keys, duplicate or dangling names, a mutating step
//! with neither a compensation nor `pivot = true`, unbounded retries, missing timeouts. Errors
//! name `file:line:column` and the field, so a user can fix a file without reading our code.
//!
//! The raw serde types live in `raw`; this module holds the domain types the state machine
//! reads. See `docs/saga-config.md` for the file format.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod plan;
mod raw;

pub use raw::{load_dir, parse, parse_files};

/// A validated saga definition. Cheap to share behind an `Arc`.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaDefinition {
    /// Unique name of the saga (`order`); the key `StartSaga` and snapshots refer to it by.
    pub name: String,
    /// Human description, shown by `ListDefinitions`.
    pub description: String,
    /// The status labels each outcome sets.
    pub statuses: Statuses,
    /// Overall deadline measured from the saga's start: past it, forward progress stops and
    /// the saga compensates.
    pub deadline: Duration,
    /// Stages run one after another; the steps of one stage run in parallel.
    pub stages: Vec<Stage>,
    /// Every forward step, in stage order; a step's position here is its [`StepIndex`].
    pub steps: Vec<Step>,
    /// A step run once compensation has finished (e.g. tell the customer), never compensated.
    pub after_compensation: Option<Step>,
    /// Stable hash of the definition's content: a snapshot records it so a node can tell when
    /// a saga in flight was started under a different definition.
    pub fingerprint: u64,
    /// Where the definition was loaded from, for messages.
    pub source: PathBuf,
}

/// Index of a step in [`SagaDefinition::steps`]; `steps.len()` denotes the after-compensation step.
pub type StepIndex = usize;

/// Status labels set by a saga's outcomes (order statuses for the order saga).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statuses {
    /// Status of a saga that has started and not yet reached a stage with its own status.
    pub initial: String,
    /// Status when every stage succeeded.
    pub completed: String,
    /// Status when a step failed for good and every completed step was compensated.
    pub compensated: String,
    /// Status of a saga an operator abandoned after it was parked.
    pub failed: String,
    /// Status of a saga parked because a compensation exhausted its retries or a pivot cannot
    /// be undone (`NEEDS_ATTENTION` unless the file says otherwise).
    pub needs_attention: String,
}

/// The `statuses.needs_attention` label when a file does not set one.
pub const DEFAULT_NEEDS_ATTENTION: &str = "NEEDS_ATTENTION";

/// A group of steps that run in parallel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Name, unique within the saga.
    pub name: String,
    /// Indices into [`SagaDefinition::steps`].
    pub steps: Vec<StepIndex>,
    /// Status set when every step of the stage succeeded, if any.
    pub status: Option<String>,
}

/// One step: a command to a participant service, with its compensation and policies.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Name, unique within the saga (compensations and history refer to it).
    pub name: String,
    /// The stage this step belongs to (`usize::MAX` for the after-compensation step).
    pub stage: usize,
    /// The command sent to do the work.
    pub action: Action,
    /// The command that undoes it, if the step can be undone.
    pub compensation: Option<Action>,
    /// The step cannot be undone and the saga's outcome is decided once it succeeds
    /// (a mutating step must have a compensation or be a pivot).
    pub pivot: bool,
    /// How the forward action is retried.
    pub retry: RetryPolicy,
    /// How the compensation is retried; exhausting it parks the saga as failed.
    pub compensation_retry: RetryPolicy,
    /// How long one attempt may take before it counts as a transient failure.
    pub timeout: Duration,
}

/// `service.action`, as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Action {
    /// Participant service (`payment`): the consumer group that handles the command.
    pub service: String,
    /// Action within the service (`charge`).
    pub name: String,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.service.is_empty() {
            write!(f, "wait for signal `{}`", self.name)
        } else {
            write!(f, "{}.{}", self.service, self.name)
        }
    }
}

/// Longest signal name, in bytes.
pub const MAX_SIGNAL_NAME: usize = 64;

/// Whether `name` is a valid signal name: dot-separated parts, each a lowercase letter followed
/// by lowercase letters, digits or `_`; at most [`MAX_SIGNAL_NAME`] bytes (`delivery.confirmed`).
pub fn valid_signal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SIGNAL_NAME
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

impl Step {
    /// The signal this step waits for, if it waits instead of calling a service (`wait_for`
    /// in the file; its action then names no service).
    pub fn wait_for(&self) -> Option<&str> {
        self.action
            .service
            .is_empty()
            .then_some(self.action.name.as_str())
    }
}

/// Retry policy: exponential backoff with full jitter, bounded attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (≥ 1, bounded).
    pub max_attempts: u32,
    /// Backoff ceiling before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any backoff.
    pub max_backoff: Duration,
    /// Growth factor of the backoff ceiling per attempt (≥ 1).
    pub multiplier: f64,
    /// Error kinds that fail the step at once (a business refusal such as `declined`).
    pub non_retryable: Vec<String>,
}

impl RetryPolicy {
    /// Backoff ceiling after `attempt` (1-based) failed: `min(max, initial * multiplier^(attempt-1))`.
    /// The caller draws the actual delay uniformly in `[0, ceiling]` (full jitter).
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let max = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }

    /// Whether an error of `kind` may be retried under this policy.
    pub fn is_retryable(&self, kind: &str) -> bool {
        !self.non_retryable.iter().any(|k| k == kind)
    }
}

impl SagaDefinition {
    /// Every signal a step of this saga waits for, in step order (each once).
    pub fn signals(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for signal in self.steps.iter().filter_map(Step::wait_for) {
            if !out.contains(&signal) {
                out.push(signal);
            }
        }
        out
    }

    /// The step at `index`, the after-compensation step being `steps.len()`.
    pub fn step(&self, index: StepIndex) -> Option<&Step> {
        if index == self.steps.len() {
            self.after_compensation.as_ref()
        } else {
            self.steps.get(index)
        }
    }

    /// Every status label a saga of this definition can have, in the order a saga meets them:
    /// the initial one, each stage's, then the outcomes (each once).
    pub fn status_labels(&self) -> Vec<&str> {
        let mut labels: Vec<&str> = Vec::new();
        let all = std::iter::once(self.statuses.initial.as_str())
            .chain(self.stages.iter().filter_map(|s| s.status.as_deref()))
            .chain([
                self.statuses.completed.as_str(),
                self.statuses.compensated.as_str(),
                self.statuses.failed.as_str(),
                self.statuses.needs_attention.as_str(),
            ]);
        for label in all {
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
        labels
    }

    /// Number of step slots a saga of this definition tracks (forward steps + after-compensation).
    pub fn step_slots(&self) -> usize {
        self.steps.len() + usize::from(self.after_compensation.is_some())
    }

    /// Every service the saga sends commands to (forward, compensation, after-compensation).
    pub fn services(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let all = self.steps.iter().chain(self.after_compensation.iter());
        for step in all {
            for action in std::iter::once(&step.action).chain(step.compensation.iter()) {
                if !action.service.is_empty() && !out.contains(&action.service) {
                    out.push(action.service.clone());
                }
            }
        }
        out
    }
}

/// Why a definition file was refused: where, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {}{message}", file.display(), field.as_deref().map(|f| format!("`{f}`: ")).unwrap_or_default())]
pub struct Error {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path of the offending field (`stage[1].step[0].compensation`), when one is to blame.
    pub field: Option<String>,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl Error {
    /// An error at a byte offset of `source`.
    pub fn at(
        file: &Path,
        source: &str,
        offset: usize,
        field: Option<String>,
        message: String,
    ) -> Self {
        let (line, column) = line_col(source, offset);
        Error {
            file: file.to_path_buf(),
            line,
            column,
            field,
            message,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
