//! The small traits through which the actors reach the outside world.
//!
//! The `sagaflow` crate implements them over NATS JetStream; tests can implement them in memory.
//! Every method is cancel-safe in the sense that matters here: if the caller is dropped, nothing
//! half-done is left that a retry of the same call would not repair.

use std::time::Duration;

use async_trait::async_trait;

use crate::definition::SagaDefinition;
use crate::machine::{CommandSpec, Phase, Saga};

/// Why a port call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A compare-and-set lost: someone else wrote the snapshot since we read it.
    #[error(
        "snapshot of saga `{saga}` was changed by someone else (expected revision {expected:?})"
    )]
    Conflict {
        /// Saga id.
        saga: String,
        /// Revision we expected.
        expected: Option<u64>,
    },
    /// The stored bytes could not be decoded.
    #[error("stored snapshot of saga `{saga}` is unreadable: {message}")]
    Corrupt {
        /// Saga id.
        saga: String,
        /// Why.
        message: String,
    },
    /// The transport failed (NATS unavailable, timeout…): retrying later may succeed.
    #[error("{operation} failed: {message}")]
    Transport {
        /// What we tried.
        operation: &'static str,
        /// Cause.
        message: String,
    },
}

/// Where saga snapshots live (compare-and-set on a revision).
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The latest snapshot and its revision, if the saga exists.
    async fn load(&self, saga_id: &str) -> Result<Option<(Saga, u64)>, Error>;
    /// Writes `saga` if the stored revision is still `expected` (`None`: must not exist yet);
    /// returns the new revision, or [`Error::Conflict`].
    async fn save(&self, saga: &Saga, expected: Option<u64>) -> Result<u64, Error>;
}

/// How commands reach participants and status changes reach everyone else.
#[async_trait]
pub trait CommandBus: Send + Sync + 'static {
    /// Publishes the commands (de-duplicated by command id), and returns once the server has
    /// stored every one of them.
    async fn send(
        &self,
        def: &SagaDefinition,
        saga: &Saga,
        commands: &[CommandSpec],
    ) -> Result<(), Error>;
    /// Publishes a lifecycle event for a status change (`from` empty for the first status);
    /// `sequence` numbers the saga's status changes (1 for the first) for de-duplication.
    async fn announce(&self, saga: &Saga, from: &str, to: &str, sequence: u64)
        -> Result<(), Error>;
}

/// Where a saga parked `NEEDS_ATTENTION` is reported for operators (the dead-letter stream).
#[async_trait]
pub trait Parker: Send + Sync + 'static {
    /// Records that `saga` was parked for the `count`-th time because of `reason`, with a
    /// payload that resumes it when replayed; idempotent on (saga, count).
    async fn park(&self, saga: &Saga, reason: &str, count: u32) -> Result<(), Error>;
    /// An operator (`operator`, by `action`) took `saga` out of `NEEDS_ATTENTION` by other
    /// means than replaying its dead letter: settle its dead letters (journaled), so none is
    /// left to replay. Idempotent.
    async fn unpark(&self, _saga: &Saga, _operator: &str, _action: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// A [`Parker`] that records nothing (tests that do not look at the dead-letter stream).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopParker;

#[async_trait]
impl Parker for NoopParker {
    async fn park(&self, _saga: &Saga, _reason: &str, _count: u32) -> Result<(), Error> {
        Ok(())
    }
}

/// The acknowledgement of one delivered message: ack once its effects are durable.
#[async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// Done: do not deliver again.
    async fn ack(self: Box<Self>);
    /// Not done: deliver again after `delay`.
    async fn nak(self: Box<Self>, delay: Duration);
    /// Still working: push the redelivery deadline back.
    async fn in_progress(&self) {}
    /// How many times the message has been delivered, this delivery included (1 the first
    /// time).
    fn delivered(&self) -> u32 {
        1
    }
    /// The message can never be processed: store it in the dead-letter stream with `reason`
    /// (with its original bytes), then ack it.
    async fn dead_letter(self: Box<Self>, reason: String);
}

/// Hears what the saga actors did, after each change is persisted (for metrics).
///
/// Every method has a no-op default; calls must be cheap and must not block (they run inside
/// the saga actor). Events are derived from the persisted snapshots, so a redelivered event
/// that changes nothing is not reported twice.
pub trait Observer: Send + Sync + 'static {
    /// A saga reached a terminal phase (`Completed`, `Compensated` or `Failed`).
    fn saga_finished(&self, _saga: &str, _phase: Phase) {}
    /// A step settled: forward (`Succeeded`/`Failed`) or compensation
    /// (`Compensated`/`CompensationFailed`); `outcome_kind` is the error kind of a failure.
    fn step_settled(
        &self,
        _saga: &str,
        _step: &str,
        _compensation: bool,
        _latency: Duration,
        _outcome_kind: Option<&str>,
    ) {
    }
    /// An attempt (forward or compensation) of a step handled by `service` ended: answered
    /// (success or failure) or timed out.
    fn step_attempt(&self, _saga: &str, _step: &str, _service: &str, _compensation: bool) {}
    /// An attempt (forward or compensation) of `step` ended, answered or timed out, after
    /// `share` of its timeout had passed since it was sent (0.0: at once; 1.0: it timed out).
    /// How much of their timeouts attempts use is the node's measure of overload (admission
    /// control).
    fn attempt_share(&self, _saga: &str, _step: &str, _share: f64) {}
    /// An attempt (forward or compensation) of `step`, whose timeout is `timeout`, was sent
    /// (or, for a saga's first commands, handed to this node as sent by the API): with
    /// [`Observer::attempt_share`], how fast a step's backlog grows.
    fn attempt_sent(&self, _saga: &str, _step: &str, _timeout: Duration) {}
    /// An attempt of a step sent to `service` failed with `kind` (`timeout` included).
    fn step_error(&self, _saga: &str, _step: &str, _service: &str, _kind: &str) {}
    /// The number of live saga actors on this node changed to `live`.
    fn live_sagas(&self, _live: usize) {}
    /// A saga was parked `NEEDS_ATTENTION` (a compensation exhausted its retries, or a pivot
    /// cannot be undone).
    fn saga_parked(&self, _saga: &str) {}
    /// Periodic census of this node's live sagas by definition: how many are parked
    /// `NEEDS_ATTENTION` and how many are stuck (no progress for longer than the stuck
    /// multiple of their step timeout). Every loaded definition is listed, zeros included.
    fn attention(&self, _census: &[AttentionCount]) {}
    /// An inbound event was refused and dead-lettered; `reason` is a short stable label
    /// (`saga_id`, `partition`, `command_id`, `unknown_step`, `wrong_service`,
    /// `unsent_attempt`, `contradicting_reply`, `retries_exhausted`…).
    fn event_refused(&self, _reason: &str) {}
    /// An inbound event was acked without being applied; `reason` is a short stable label
    /// (`duplicate`, or `stale_attempt`: a late reply, recorded in the saga's history).
    fn event_ignored(&self, _reason: &str) {}
    /// An unfinished saga that nothing drove (no actor, no event coming: its creator died
    /// between writing it and publishing its start) was taken up by the orphan sweep.
    fn orphan_adopted(&self, _saga_id: &str) {}
}

/// One line of [`Observer::attention`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttentionCount {
    /// Saga definition name.
    pub saga: String,
    /// Sagas parked `NEEDS_ATTENTION`.
    pub needs_attention: usize,
    /// Sagas flagged stuck.
    pub stuck: usize,
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// A [`DefinitionSource`] that knows nothing beyond the catalog (tests, single-version setups).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDefinitionSource;

#[async_trait]
impl DefinitionSource for NoDefinitionSource {
    async fn load(
        &self,
        _name: &str,
        _fingerprint: u64,
    ) -> Result<Option<std::sync::Arc<SagaDefinition>>, Error> {
        Ok(None)
    }
}

/// Where a node finds a definition version it does not know (one applied elsewhere, which
/// sagas it adopts still run on).
#[async_trait]
pub trait DefinitionSource: Send + Sync + 'static {
    /// Version `fingerprint` of saga `name`; `None` when it was never applied anywhere.
    async fn load(
        &self,
        name: &str,
        fingerprint: u64,
    ) -> Result<Option<std::sync::Arc<SagaDefinition>>, Error>;
}
