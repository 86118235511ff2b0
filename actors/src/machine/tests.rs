//! Tests of the saga state machine: scripted runs of the engine's test saga (the order saga with
//! notify as its pivot, `actors/tests/fixtures/order_with_pivot.toml`), then
//! property tests that drive random saga shapes through hostile environments (failures,
//! duplicates, stale and reordered replies, lost messages, timeouts, cancels, crashes) and check
//! the machine's invariants after every single event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::definition::{Action, RetryPolicy, SagaDefinition, Stage, Statuses, Step};

/// A start time far from zero, so that an accidental `0` in a due time stands out.
const T0: Millis = 1_700_000_000_000;

// Step slots of the order saga.
const CHARGE: StepIndex = 0;
const RESERVE: StepIndex = 1;
const PREPARE: StepIndex = 2;
const NOTIFY: StepIndex = 3;
const AFTER: StepIndex = 4;

/// The order saga with notify as its pivot (as an earlier version shipped it), parsed from
/// `actors/tests/fixtures/order_with_pivot.toml`.
fn order() -> SagaDefinition {
    let def = crate::definition::parse(
        include_str!("../../tests/fixtures/order_with_pivot.toml"),
        Path::new("actors/tests/fixtures/order_with_pivot.toml"),
    )
    .expect("order_with_pivot.toml is valid");
    let names: Vec<&str> = def.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["charge", "reserve", "prepare_shipment", "notify"],
        "the tests assume this step order"
    );
    assert!(def.steps[NOTIFY].pivot);
    assert_eq!(
        def.after_compensation.as_ref().map(|s| s.name.as_str()),
        Some("notify_cancellation")
    );
    assert_eq!(def.step_slots(), AFTER + 1);
    def
}

/// The order saga with a shorter deadline (the shipped one is 5 minutes).
fn order_with_deadline(deadline: Duration) -> SagaDefinition {
    let mut def = order();
    def.deadline = deadline;
    def
}

fn start(def: &SagaDefinition) -> (Saga, Transition) {
    Saga::start(def, "order-1".to_string(), br#"{"order":1}"#.to_vec(), T0)
}

fn reply(
    step: StepIndex,
    attempt: u32,
    compensation: bool,
    outcome: Result<Vec<u8>, StepError>,
) -> Event {
    Event::Reply {
        step,
        attempt,
        compensation,
        outcome,
    }
}

fn ok(step: StepIndex, attempt: u32) -> Event {
    reply(step, attempt, false, Ok(Vec::new()))
}

fn error(kind: &str) -> StepError {
    StepError {
        kind: kind.to_string(),
        message: format!("{kind} (test)"),
    }
}

fn err(step: StepIndex, attempt: u32, kind: &str) -> Event {
    reply(step, attempt, false, Err(error(kind)))
}

fn comp_ok(step: StepIndex, attempt: u32) -> Event {
    reply(step, attempt, true, Ok(Vec::new()))
}

fn comp_err(step: StepIndex, attempt: u32, kind: &str) -> Event {
    reply(step, attempt, true, Err(error(kind)))
}

fn spec(step: StepIndex, compensation: bool, attempt: u32) -> CommandSpec {
    CommandSpec {
        step,
        compensation,
        attempt,
    }
}

fn fwd(step: StepIndex, attempt: u32) -> Effect {
    Effect::Send(spec(step, false, attempt))
}

fn comp(step: StepIndex, attempt: u32) -> Effect {
    Effect::Send(spec(step, true, attempt))
}

fn status(from: &str, to: &str) -> Effect {
    Effect::StatusChanged {
        from: from.to_string(),
        to: to.to_string(),
    }
}

fn ms(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap()
}

/// The largest delay the policy allows after `attempt` failed (the machine draws in `[0, c]`,
/// with `c` at least 1 ms).
fn ceiling(policy: &RetryPolicy, attempt: u32) -> Millis {
    ms(policy.backoff_ceiling(attempt)).max(1)
}

/// Applies an event that must change the saga.
fn apply(saga: &mut Saga, def: &SagaDefinition, event: Event, now: Millis) -> Vec<Effect> {
    let t = saga.apply(def, event.clone(), now).unwrap();
    assert!(t.changed, "{event:?} at {now} should change the saga");
    t.effects
}

/// Applies an event that must change nothing at all.
#[track_caller]
fn assert_ignored(saga: &mut Saga, def: &SagaDefinition, event: Event, now: Millis) {
    let before = saga.clone();
    let t = saga.apply(def, event.clone(), now).unwrap();
    assert_eq!(t, Transition::default(), "{event:?} should be ignored");
    assert_eq!(
        *saga, before,
        "{event:?} should leave the snapshot untouched"
    );
}

/// Applies a reply that must not be applied but recorded in the history (and nothing else):
/// returns the text of the entry that holds it, and whether the host must dead-letter it.
#[track_caller]
fn assert_recorded(
    saga: &mut Saga,
    def: &SagaDefinition,
    event: Event,
    now: Millis,
) -> (String, bool) {
    let before = saga.clone();
    let t = saga.apply(def, event.clone(), now).unwrap();
    assert!(t.changed, "{event:?} should be recorded");
    let unchanged = Saga {
        history: before.history.clone(),
        updated_at: before.updated_at,
        ..saga.clone()
    };
    assert_eq!(unchanged, before, "{event:?} changed more than the history");
    let dead_letter = match t.effects.as_slice() {
        [] => false,
        [Effect::DeadLetterReply { reason }] => {
            assert!(!reason.is_empty());
            true
        }
        other => panic!("{event:?}: {other:?}"),
    };
    let slot = match event {
        Event::Reply { step, .. }
        | Event::ReplyRefused {
            step: Some(step), ..
        } => u32::try_from(step)
            .ok()
            .filter(|&i| (i as usize) < def.step_slots()),
        _ => None,
    };
    let entry = saga
        .history
        .iter()
        .rev()
        .find(|h| h.step == slot && matches!(h.what, Happening::ReplyRefused { .. }))
        .expect("a ReplyRefused entry");
    (entry.what.to_string(), dead_letter)
}

fn phases(saga: &Saga) -> Vec<StepPhase> {
    saga.steps.iter().map(|s| s.phase).collect()
}

// ---------------------------------------------------------------------------------------------
// The order saga, scripted.
// ---------------------------------------------------------------------------------------------

#[test]
fn happy_path_runs_every_stage_and_ships() {
    let def = order();
    let (mut saga, t) = start(&def);
    assert!(t.changed);
    assert_eq!(t.effects, vec![status("", "PENDING"), fwd(CHARGE, 1)]);
    assert_eq!(
        (saga.phase, saga.status.as_str(), saga.status_seq),
        (Phase::Running, "PENDING", 1)
    );
    assert_eq!(saga.in_flight(), vec![spec(CHARGE, false, 1)]);
    assert_eq!(saga.deadline_at, T0 + ms(def.deadline));

    let charged = reply(CHARGE, 1, false, Ok(br#"{"charge":"ch_1"}"#.to_vec()));
    let effects = apply(&mut saga, &def, charged, T0 + 10);
    assert_eq!(
        effects,
        vec![status("PENDING", "PAID"), fwd(RESERVE, 1), fwd(PREPARE, 1)]
    );
    assert_eq!(
        saga.steps[CHARGE].output.as_deref(),
        Some(br#"{"charge":"ch_1"}"#.as_slice())
    );
    assert_eq!(saga.steps[CHARGE].finished_at, Some(T0 + 10));

    // The parallel stage completes only when both steps succeeded, in whatever order.
    assert_eq!(apply(&mut saga, &def, ok(PREPARE, 1), T0 + 20), vec![]);
    assert_eq!(saga.stage, 1);
    assert_eq!(
        apply(&mut saga, &def, ok(RESERVE, 1), T0 + 30),
        vec![fwd(NOTIFY, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, ok(NOTIFY, 1), T0 + 40),
        vec![status("PAID", "SHIPPED")]
    );

    assert_eq!(saga.phase, Phase::Completed);
    assert_eq!(saga.status, "SHIPPED");
    assert_eq!(saga.status_seq, 3);
    assert_eq!(saga.reason, None);
    assert_eq!(saga.compensation_plan, None);
    assert_eq!(
        phases(&saga),
        [
            StepPhase::Succeeded,
            StepPhase::Succeeded,
            StepPhase::Succeeded,
            StepPhase::Succeeded,
            StepPhase::Pending
        ]
    );
    assert!(saga
        .steps
        .iter()
        .all(|s| s.comp_attempt == 0 && s.due_at.is_none()));
    assert_eq!(saga.next_wakeup(), None);
    assert!(saga.in_flight().is_empty());
    assert_eq!(saga.updated_at, T0 + 40);
    assert!(saga.history.iter().any(|h| h.what
        == Happening::Finished {
            phase: Phase::Completed
        }));
}

#[test]
fn declined_charge_is_not_compensated_and_the_order_is_cancelled() {
    let def = order();
    let (mut saga, _) = start(&def);
    let effects = apply(&mut saga, &def, err(CHARGE, 1, "declined"), T0 + 5);
    // The charge never succeeded: nothing to undo, straight to the after-compensation step.
    assert_eq!(effects, vec![fwd(AFTER, 1)]);
    assert_eq!(saga.phase, Phase::Compensating);
    assert_eq!(
        saga.steps[CHARGE].attempt, 1,
        "a business refusal is not retried"
    );
    assert_eq!(saga.compensation_plan, Some(vec![]));
    assert_eq!(
        phases(&saga),
        [
            StepPhase::Failed,
            StepPhase::Skipped,
            StepPhase::Skipped,
            StepPhase::Skipped,
            StepPhase::Running
        ]
    );
    let reason = saga.reason.clone().unwrap();
    assert!(
        reason.contains("charge") && reason.contains("declined"),
        "{reason}"
    );

    assert_eq!(
        apply(&mut saga, &def, ok(AFTER, 1), T0 + 6),
        vec![status("PENDING", "CANCELLED")]
    );
    assert_eq!(saga.phase, Phase::Compensated);
    assert_eq!(saga.status, "CANCELLED");
    assert!(saga.steps.iter().all(|s| s.comp_attempt == 0));
}

#[test]
fn out_of_stock_waits_for_the_parallel_step_then_compensates_newest_first() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 10);

    // prepare_shipment is still in flight: nothing may be compensated before it settles.
    assert_eq!(
        apply(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), T0 + 20),
        vec![]
    );
    assert_eq!(saga.phase, Phase::Compensating);
    assert_eq!(saga.compensation_plan, None);
    assert_eq!(saga.in_flight(), vec![spec(PREPARE, false, 1)]);
    assert_eq!(saga.steps[NOTIFY].phase, StepPhase::Skipped);

    // It succeeded: undo it first (shipping.cancel), then the charge (payment.refund).
    assert_eq!(
        apply(&mut saga, &def, ok(PREPARE, 1), T0 + 30),
        vec![comp(PREPARE, 1)]
    );
    assert_eq!(
        saga.compensation_plan,
        Some(vec![PREPARE as u32, CHARGE as u32])
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(PREPARE, 1), T0 + 40),
        vec![comp(CHARGE, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(CHARGE, 1), T0 + 50),
        vec![fwd(AFTER, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, ok(AFTER, 1), T0 + 60),
        vec![status("PAID", "CANCELLED")]
    );

    assert_eq!(saga.phase, Phase::Compensated);
    assert_eq!(
        phases(&saga),
        [
            StepPhase::Compensated,
            StepPhase::Failed,
            StepPhase::Compensated,
            StepPhase::Skipped,
            StepPhase::Succeeded
        ]
    );
    assert_eq!(
        saga.steps[RESERVE].comp_attempt, 0,
        "the refused reservation is not released"
    );
    let reason = saga.reason.clone().unwrap();
    assert!(
        reason.contains("reserve") && reason.contains("out_of_stock"),
        "{reason}"
    );
}

#[test]
fn a_parallel_step_that_fails_while_draining_is_not_compensated() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 10);
    apply(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), T0 + 20);
    // A transient failure while compensating is not retried, and a reported failure means the
    // participant did nothing: only the charge is refunded.
    assert_eq!(
        apply(&mut saga, &def, err(PREPARE, 1, "unavailable"), T0 + 30),
        vec![comp(CHARGE, 1)]
    );
    assert_eq!(saga.steps[PREPARE].phase, StepPhase::Failed);
    assert_eq!(saga.steps[PREPARE].attempt, 1);
}

#[test]
fn a_parallel_step_that_times_out_while_draining_is_compensated() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 10);
    apply(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), T0 + 20);
    let due = saga.steps[PREPARE].due_at.unwrap();
    assert_eq!(due, T0 + 10 + ms(def.steps[PREPARE].timeout));
    assert_eq!(saga.next_wakeup(), Some(due));
    assert_ignored(&mut saga, &def, Event::Tick, due - 1);
    // Its outcome is unknown, so it is undone to be safe.
    assert_eq!(
        apply(&mut saga, &def, Event::Tick, due),
        vec![comp(PREPARE, 1)]
    );
    let s = &saga.steps[PREPARE];
    assert_eq!((s.phase, s.maybe_applied), (StepPhase::Compensating, true));
    assert_eq!(
        s.last_error.as_ref().map(|e| e.kind.as_str()),
        Some(TIMEOUT_KIND)
    );
    // The late reply of the timed-out attempt changes nothing any more: it is only recorded.
    assert_eq!(
        assert_recorded(&mut saga, &def, ok(PREPARE, 1), due + 1),
        (
            "reply refused: late reply to attempt 1 of step `prepare_shipment`, which had timed out: it says succeeded".to_string(),
            false
        )
    );
    assert_eq!(saga.steps[PREPARE].phase, StepPhase::Compensating);
}

#[test]
fn transient_failures_are_retried_within_the_policy_then_compensated() {
    let def = order();
    let policy = def.steps[CHARGE].retry.clone();
    assert!(policy.max_attempts >= 2);
    let timeout = ms(def.steps[CHARGE].timeout);
    let (mut saga, _) = start(&def);
    let mut now = T0;
    for attempt in 1..policy.max_attempts {
        now += 3;
        assert_eq!(
            apply(&mut saga, &def, err(CHARGE, attempt, "unavailable"), now),
            vec![]
        );
        let s = &saga.steps[CHARGE];
        assert_eq!(
            (s.phase, s.attempt, s.maybe_applied),
            (StepPhase::RetryWait, attempt, false)
        );
        let due = s.due_at.unwrap();
        assert!(
            due >= now && due - now <= ceiling(&policy, attempt),
            "attempt {attempt}: due in {}ms",
            due - now
        );
        assert!(saga.in_flight().is_empty());
        assert_eq!(saga.next_wakeup(), Some(due));
        assert!(saga.history.iter().any(|h| h.what
            == Happening::RetryScheduled {
                attempt: attempt + 1,
                at: due
            }
            && h.step == Some(0)));
        if due > now {
            assert_ignored(&mut saga, &def, Event::Tick, due - 1);
        }
        now = due;
        assert_eq!(
            apply(&mut saga, &def, Event::Tick, now),
            vec![fwd(CHARGE, attempt + 1)]
        );
        assert_eq!(saga.steps[CHARGE].due_at, Some(now + timeout));
        assert_eq!(
            saga.steps[CHARGE].started_at,
            Some(T0),
            "started_at is the first attempt"
        );
        // Answers to the previous attempt are stale: a failure changes nothing, a success is
        // recorded (it cannot be applied any more).
        assert_ignored(&mut saga, &def, err(CHARGE, attempt, "unavailable"), now);
        let (text, dead_letter) = assert_recorded(&mut saga, &def, ok(CHARGE, attempt), now);
        assert_eq!(
            text,
            format!(
                "reply refused: late reply to attempt {attempt} of step `charge`, which was over (attempt {} is the latest): it says succeeded",
                attempt + 1
            )
        );
        assert!(!dead_letter);
        assert_ignored(&mut saga, &def, err(CHARGE, attempt, "unavailable"), now);
    }
    now += 3;
    let last = policy.max_attempts;
    assert_eq!(
        apply(&mut saga, &def, err(CHARGE, last, "unavailable"), now),
        vec![fwd(AFTER, 1)]
    );
    assert_eq!(
        (saga.steps[CHARGE].phase, saga.steps[CHARGE].attempt),
        (StepPhase::Failed, last)
    );
    assert!(saga.reason.clone().unwrap().contains("unavailable"));
}

#[test]
fn a_step_that_keeps_timing_out_is_compensated_as_maybe_applied() {
    let def = order();
    let policy = def.steps[RESERVE].retry.clone();
    let timeout = ms(def.steps[RESERVE].timeout);
    let (mut saga, _) = start(&def);
    let mut now = T0 + 10;
    apply(&mut saga, &def, ok(CHARGE, 1), now);
    apply(&mut saga, &def, ok(PREPARE, 1), now + 1);
    for attempt in 1..=policy.max_attempts {
        let due = saga.steps[RESERVE].due_at.unwrap();
        assert_eq!(due, now + timeout);
        assert_ignored(&mut saga, &def, Event::Tick, due - 1);
        now = due;
        let effects = apply(&mut saga, &def, Event::Tick, now);
        let s = &saga.steps[RESERVE];
        assert!(s.maybe_applied);
        assert_eq!(
            s.last_error.as_ref().map(|e| e.kind.as_str()),
            Some(TIMEOUT_KIND)
        );
        if attempt < policy.max_attempts {
            assert_eq!(effects, vec![]);
            assert_eq!(s.phase, StepPhase::RetryWait);
            let retry_at = s.due_at.unwrap();
            assert!(retry_at - now <= ceiling(&policy, attempt));
            now = retry_at;
            assert_eq!(
                apply(&mut saga, &def, Event::Tick, now),
                vec![fwd(RESERVE, attempt + 1)]
            );
        } else {
            // Failed for good; every step that may have been applied is undone, newest first.
            assert_eq!(effects, vec![comp(PREPARE, 1)]);
            assert_eq!(s.phase, StepPhase::Failed);
        }
    }
    assert_eq!(
        saga.compensation_plan,
        Some(vec![PREPARE as u32, RESERVE as u32, CHARGE as u32])
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(PREPARE, 1), now + 1),
        vec![comp(RESERVE, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(RESERVE, 1), now + 2),
        vec![comp(CHARGE, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(CHARGE, 1), now + 3),
        vec![fwd(AFTER, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, ok(AFTER, 1), now + 4),
        vec![status("PAID", "CANCELLED")]
    );
    assert_eq!(saga.phase, Phase::Compensated);
}

#[test]
fn a_compensation_that_keeps_failing_parks_the_saga_until_an_operator_retries() {
    let def = order();
    let policy = def.steps[PREPARE].compensation_retry.clone();
    let timeout = ms(def.steps[PREPARE].timeout);
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(&mut saga, &def, ok(PREPARE, 1), T0 + 2);
    let mut now = T0 + 3;
    assert_eq!(
        apply(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), now),
        vec![comp(PREPARE, 1)]
    );
    for attempt in 1..=policy.max_attempts {
        // Odd attempts time out, even ones report an error: both are retried alike.
        let effects = if attempt % 2 == 1 {
            now = saga.steps[PREPARE].due_at.unwrap();
            assert_eq!(now, saga.history.last().unwrap().at + timeout);
            apply(&mut saga, &def, Event::Tick, now)
        } else {
            now += 1;
            apply(
                &mut saga,
                &def,
                comp_err(PREPARE, attempt, "unavailable"),
                now,
            )
        };
        if attempt == policy.max_attempts {
            let Some(Effect::Parked { reason, count: 1 }) = effects.first() else {
                panic!("{effects:?}");
            };
            assert!(reason.contains("shipping.cancel"), "{reason}");
            assert_eq!(effects[1..], [status("PAID", "NEEDS_ATTENTION")]);
            break;
        }
        assert_eq!(effects, vec![]);
        let s = &saga.steps[PREPARE];
        assert_eq!(
            (s.phase, s.comp_attempt),
            (StepPhase::CompensationRetryWait, attempt)
        );
        let due = s.due_at.unwrap();
        assert!(
            due >= now && due - now <= ceiling(&policy, attempt),
            "compensation attempt {attempt}: retry in {}ms, ceiling {}ms",
            due - now,
            ceiling(&policy, attempt)
        );
        // A success reported for the attempt that failed: late if it timed out, a
        // contradiction (dead-lettered) if it had answered.
        let (text, dead_letter) = assert_recorded(&mut saga, &def, comp_ok(PREPARE, attempt), now);
        assert_eq!(dead_letter, attempt % 2 == 0, "{text}");
        now = due;
        assert_eq!(
            apply(&mut saga, &def, Event::Tick, now),
            vec![comp(PREPARE, attempt + 1)]
        );
    }
    assert_eq!(saga.phase, Phase::NeedsAttention);
    assert!(!saga.is_terminal(), "parked, not finished");
    assert_eq!(saga.status, "NEEDS_ATTENTION");
    assert_eq!(saga.steps[PREPARE].phase, StepPhase::CompensationFailed);
    assert_eq!(saga.steps[PREPARE].comp_attempt, policy.max_attempts);
    assert_eq!(
        saga.steps[CHARGE].comp_attempt, 0,
        "compensation stops at the failed one"
    );
    assert_eq!(
        saga.steps[AFTER].attempt, 0,
        "the customer is not told the order was cancelled"
    );
    let reason = saga.reason.clone().unwrap();
    for part in [
        "out_of_stock",
        "shipping.cancel",
        "prepare_shipment",
        &policy.max_attempts.to_string(),
    ] {
        assert!(reason.contains(part), "{reason:?} should mention {part:?}");
    }
    assert_eq!(saga.next_wakeup(), None, "parked: no timer runs");
    assert!(saga.in_flight().is_empty());
    // Parked: time changes nothing; a reply contradicting the last answer is only recorded.
    assert_ignored(&mut saga, &def, Event::Tick, now + 3_600_000);
    assert_ignored(
        &mut saga,
        &def,
        comp_err(PREPARE, policy.max_attempts, "unavailable"),
        now + 1,
    );
    let (_, dead_letter) = assert_recorded(
        &mut saga,
        &def,
        comp_ok(PREPARE, policy.max_attempts),
        now + 1,
    );
    assert!(dead_letter);
    assert_eq!(saga.phase, Phase::NeedsAttention);

    // The operator fixed the shipping service and retries: a fresh budget, and the
    // compensation goes on where it stopped.
    let fixed = now + 60_000;
    let retry = intervention(OperatorAction::Retry { step: None });
    assert_eq!(saga.check(&def, &retry.action), Ok(vec![PREPARE]));
    assert_eq!(
        apply(&mut saga, &def, Event::Intervene(retry), fixed),
        vec![
            unparked("retry"),
            status("NEEDS_ATTENTION", "PAID"),
            comp(PREPARE, policy.max_attempts + 1)
        ]
    );
    assert_eq!(saga.phase, Phase::Compensating);
    assert_eq!(
        saga.reason.as_deref(),
        Some("step `reserve` (inventory.reserve) failed: out_of_stock: out_of_stock (test)"),
        "back to why it compensates"
    );
    assert_eq!(saga.attempts_in_budget(PREPARE, true), 1);
    assert!(saga
        .history
        .iter()
        .any(|h| h.step == Some(PREPARE as u32)
            && h.what.to_string() == "operator `ops`: retry (fixed)"));
    assert_eq!(
        apply(
            &mut saga,
            &def,
            comp_ok(PREPARE, policy.max_attempts + 1),
            fixed + 1
        ),
        vec![comp(CHARGE, 1)]
    );
    apply(&mut saga, &def, comp_ok(CHARGE, 1), fixed + 2);
    apply(&mut saga, &def, ok(AFTER, 1), fixed + 3);
    assert_eq!(saga.phase, Phase::Compensated);
    assert_eq!(saga.status, "CANCELLED");
}

fn unparked(action: &str) -> Effect {
    Effect::Unparked {
        operator: "ops".to_string(),
        action: action.to_string(),
        request: String::new(),
    }
}

fn intervention(action: OperatorAction) -> Intervention {
    Intervention {
        id: String::new(),
        action,
        operator: "ops".to_string(),
        reason: "fixed".to_string(),
    }
}

#[test]
fn a_non_retryable_compensation_error_parks_the_saga_at_once() {
    let mut def = order();
    def.steps[CHARGE].compensation_retry.non_retryable = vec!["closed_account".to_string()];
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(
        &mut saga,
        &def,
        Event::Cancel {
            reason: "changed my mind".into(),
        },
        T0 + 2,
    );
    apply(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), T0 + 3);
    assert_eq!(
        apply(&mut saga, &def, err(PREPARE, 1, "invalid"), T0 + 4),
        vec![comp(CHARGE, 1)]
    );
    let effects = apply(
        &mut saga,
        &def,
        comp_err(CHARGE, 1, "closed_account"),
        T0 + 5,
    );
    assert_eq!(effects[1..], [status("PAID", "NEEDS_ATTENTION")]);
    assert_eq!(saga.steps[CHARGE].phase, StepPhase::CompensationFailed);
    assert!(saga.reason.clone().unwrap().contains("payment.refund"));
    // The refund was made by hand: the operator skips it and the saga finishes.
    let refused = saga.check(
        &def,
        &OperatorAction::Skip {
            step: NOTIFY,
            output: Vec::new(),
        },
    );
    assert!(refused.unwrap_err().contains("`notify` is SKIPPED"));
    // A compensation skipped counts as done and keeps no result: one given is refused, not
    // dropped (journaled as refused, nothing else changes).
    let with_result = OperatorAction::Skip {
        step: CHARGE,
        output: br#"{"refund":"manual"}"#.to_vec(),
    };
    let why = saga.check(&def, &with_result).unwrap_err();
    assert_eq!(
        why,
        "skipping step `charge` (COMPENSATION_FAILED) counts its compensation as done and records no result, so it takes none: skip it without a result"
    );
    assert_eq!(
        apply(
            &mut saga,
            &def,
            Event::Intervene(intervention(with_result)),
            T0 + 6
        ),
        vec![]
    );
    assert_eq!(saga.phase, Phase::NeedsAttention);
    assert!(matches!(
        &saga.history.last().unwrap().what,
        Happening::Intervened { refused, .. } if *refused == why
    ));
    let skip = intervention(OperatorAction::Skip {
        step: CHARGE,
        output: Vec::new(),
    });
    assert_eq!(
        apply(&mut saga, &def, Event::Intervene(skip), T0 + 6),
        vec![
            unparked("skip"),
            status("NEEDS_ATTENTION", "PAID"),
            fwd(AFTER, 1)
        ]
    );
    assert_eq!(saga.steps[CHARGE].phase, StepPhase::Compensated);
    apply(&mut saga, &def, ok(AFTER, 1), T0 + 7);
    assert_eq!(saga.phase, Phase::Compensated);
}

#[test]
fn duplicates_change_nothing_and_other_stray_replies_are_recorded() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 10);
    let now = T0 + 20;
    // The same answer again (a redelivery) changes nothing, nor does a finished saga's.
    assert_ignored(&mut saga, &def, ok(CHARGE, 1), now);
    // Every other reply that cannot be applied is recorded against the step it names, one
    // entry per step and latest attempt (counting them), and dead-lettered.
    let cases = [
        (
            err(CHARGE, 1, "declined"),
            "reply refused: second reply to attempt 1 of step `charge` contradicts the answer applied: it says failed with `declined`, the attempt had succeeded",
        ),
        (
            ok(CHARGE, 2),
            "2 replies refused while attempt 1 was the latest; the first: second reply to attempt 1 of step `charge` contradicts the answer applied: it says failed with `declined`, the attempt had succeeded",
        ),
        (
            ok(RESERVE, 2),
            "reply refused: reply to attempt 2 of step `reserve`, which was never sent (the latest sent is 1)",
        ),
        (
            ok(RESERVE, 0),
            "2 replies refused while attempt 1 was the latest; the first: reply to attempt 2 of step `reserve`, which was never sent (the latest sent is 1)",
        ),
        (
            comp_ok(CHARGE, 1),
            "3 replies refused while attempt 1 was the latest; the first: second reply to attempt 1 of step `charge` contradicts the answer applied: it says failed with `declined`, the attempt had succeeded",
        ),
        (
            ok(NOTIFY, 1),
            "reply refused: reply to attempt 1 of step `notify`, which was never sent (none was sent)",
        ),
        (
            ok(AFTER, 1),
            "reply refused: reply to attempt 1 of step `notify_cancellation`, which was never sent (none was sent)",
        ),
        (
            ok(AFTER + 1, 1),
            "reply refused: reply names step slot 5; saga `order` has 5",
        ),
        (
            ok(usize::MAX, 1),
            "2 replies refused; the first: reply names step slot 5; saga `order` has 5",
        ),
    ];
    for (event, text) in cases {
        assert_eq!(
            assert_recorded(&mut saga, &def, event.clone(), now),
            (text.to_string(), true),
            "{event:?}"
        );
    }
    // A reply the host refused (unknown step, wrong service) is recorded alike.
    let host = Event::ReplyRefused {
        step: Some(RESERVE),
        reason: "reply for step `reserve` came from service `x`".to_string(),
    };
    let (text, dead_letter) = assert_recorded(&mut saga, &def, host, now);
    assert!(
        text.starts_with("3 replies refused while attempt 1"),
        "{text}"
    );
    assert!(dead_letter);

    // While compensating: the forward answer is compared with the one applied.
    apply(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), now);
    apply(&mut saga, &def, ok(PREPARE, 1), now + 1);
    assert_eq!(saga.in_flight(), vec![spec(PREPARE, true, 1)]);
    assert_ignored(&mut saga, &def, ok(PREPARE, 1), now + 2);
    assert_ignored(&mut saga, &def, err(RESERVE, 1, "out_of_stock"), now + 2);
    let (text, dead_letter) = assert_recorded(&mut saga, &def, err(PREPARE, 1, "boom"), now + 2);
    assert_eq!(
        text,
        "reply refused: second reply to attempt 1 of step `prepare_shipment` contradicts the answer applied: it says failed with `boom`, the attempt had succeeded"
    );
    assert!(dead_letter);
    // (The entry is that of the step's latest attempt, its first compensation attempt.)
    assert!(matches!(
        saga.history.last().unwrap().what,
        Happening::ReplyRefused {
            attempt: 1,
            compensation: true,
            count: 1,
            ..
        }
    ));
    let (text, _) = assert_recorded(&mut saga, &def, comp_ok(PREPARE, 2), now + 2);
    assert!(
        text.starts_with("2 replies refused while compensation attempt 1 was the latest"),
        "{text}"
    );
    apply(&mut saga, &def, comp_ok(PREPARE, 1), now + 3);
    assert_ignored(&mut saga, &def, comp_ok(PREPARE, 1), now + 4);
    let (text, dead_letter) = assert_recorded(
        &mut saga,
        &def,
        comp_err(PREPARE, 1, "unavailable"),
        now + 4,
    );
    assert!(
        text.starts_with("3 replies refused while compensation attempt 1"),
        "{text}"
    );
    assert!(dead_letter);
    assert_eq!(saga.in_flight(), vec![spec(CHARGE, true, 1)]);

    // A finished saga records nothing, though the reply is still refused (the host
    // dead-letters it).
    apply(&mut saga, &def, comp_ok(CHARGE, 1), now + 5);
    apply(&mut saga, &def, ok(AFTER, 1), now + 6);
    assert!(saga.is_terminal());
    let stray = err(CHARGE, 1, "declined");
    assert!(matches!(
        saga.reply_fit(
            &def,
            CHARGE,
            1,
            false,
            &Err(error("declined")),
            &Limits::default()
        ),
        ReplyFit::Contradicts(_)
    ));
    assert_ignored(&mut saga, &def, stray, now + 7);
}

#[test]
fn a_timeout_says_how_many_replies_were_refused_while_it_waited() {
    let def = order();
    let (mut saga, _) = start(&def);
    let due = saga.steps[CHARGE].due_at.unwrap();
    let timeout = format!("{:?}", def.steps[CHARGE].timeout);
    // No refusal: the timeout says so as before.
    apply(&mut saga, &def, Event::Tick, due);
    let last_error = |saga: &Saga| saga.steps[CHARGE].last_error.clone().unwrap();
    assert_eq!(
        last_error(&saga).message,
        format!("no reply after {timeout}")
    );
    let retry = saga.steps[CHARGE].due_at.unwrap();
    apply(&mut saga, &def, Event::Tick, retry);
    assert_eq!(saga.in_flight(), vec![spec(CHARGE, false, 2)]);
    // Attempt 2 waits; two replies naming it wrongly arrive (a future attempt, and a
    // compensation never sent), and the late success of attempt 1.
    for event in [
        ok(CHARGE, 3),
        comp_err(CHARGE, 2, "declined"),
        ok(CHARGE, 1),
    ] {
        assert_recorded(&mut saga, &def, event, retry + 1);
    }
    let due = saga.steps[CHARGE].due_at.unwrap();
    apply(&mut saga, &def, Event::Tick, due);
    let e = last_error(&saga);
    assert_eq!(e.kind, TIMEOUT_KIND);
    assert_eq!(
        e.message,
        format!("no accepted reply after {timeout} (3 replies refused; the first: reply to attempt 3 of step `charge`, which was never sent (the latest sent is 2))")
    );
    assert!(saga.history.iter().any(|h| h.step == Some(CHARGE as u32)
        && h.what.to_string()
            == format!("attempt 2 failed: timeout: no accepted reply after {timeout} (3 replies refused; the first: reply to attempt 3 of step `charge`, which was never sent (the latest sent is 2))")));
    // Attempt 3 has its own count: one refusal.
    let retry = saga.steps[CHARGE].due_at.unwrap();
    apply(&mut saga, &def, Event::Tick, retry);
    assert_recorded(&mut saga, &def, ok(CHARGE, 9), retry);
    let due = saga.steps[CHARGE].due_at.unwrap();
    apply(&mut saga, &def, Event::Tick, due);
    assert_eq!(
        last_error(&saga).message,
        format!("no accepted reply after {timeout} (1 reply refused: reply to attempt 9 of step `charge`, which was never sent (the latest sent is 3))")
    );
}

#[test]
fn a_flood_of_refused_replies_keeps_one_entry_per_attempt() {
    let def = order();
    let (mut saga, _) = start(&def);
    let logged = saga.logged();
    for k in 0..10_000u32 {
        let event = if k % 2 == 0 {
            ok(CHARGE, 2 + k)
        } else {
            comp_err(CHARGE, k, "x")
        };
        saga.apply(&def, event, T0 + 1).unwrap();
    }
    assert_eq!(saga.logged(), logged + 1, "one entry for all of them");
    assert!(matches!(
        saga.history.last().unwrap().what,
        Happening::ReplyRefused {
            count: 10_000,
            attempt: 1,
            compensation: false,
            ..
        }
    ));
    // Replies naming no step of the saga share an entry while nothing else happens.
    for _ in 0..100 {
        saga.apply(
            &def,
            Event::ReplyRefused {
                step: None,
                reason: "reply names unknown step `teleport`".to_string(),
            },
            T0 + 2,
        )
        .unwrap();
    }
    assert_eq!(saga.logged(), logged + 2);
    assert_eq!(
        saga.history.last().unwrap().what.to_string(),
        "100 replies refused; the first: reply names unknown step `teleport`"
    );
}

#[test]
fn cancel_while_running_waits_for_in_flight_steps_then_compensates() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 10);
    let effects = apply(
        &mut saga,
        &def,
        Event::Cancel {
            reason: "customer asked".into(),
        },
        T0 + 20,
    );
    assert_eq!(effects, vec![]);
    assert_eq!(saga.phase, Phase::Compensating);
    assert_eq!(saga.reason.as_deref(), Some("cancelled: customer asked"));
    assert_eq!(saga.steps[NOTIFY].phase, StepPhase::Skipped);
    // A second cancel is a no-op.
    assert_ignored(
        &mut saga,
        &def,
        Event::Cancel {
            reason: "again".into(),
        },
        T0 + 21,
    );

    // The answers of the steps in flight still count; a success after the cancel is undone.
    assert_eq!(apply(&mut saga, &def, ok(RESERVE, 1), T0 + 30), vec![]);
    assert_eq!(
        apply(&mut saga, &def, ok(PREPARE, 1), T0 + 40),
        vec![comp(PREPARE, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(PREPARE, 1), T0 + 50),
        vec![comp(RESERVE, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(RESERVE, 1), T0 + 60),
        vec![comp(CHARGE, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, comp_ok(CHARGE, 1), T0 + 70),
        vec![fwd(AFTER, 1)]
    );
    assert_eq!(
        apply(&mut saga, &def, ok(AFTER, 1), T0 + 80),
        vec![status("PAID", "CANCELLED")]
    );
    assert_eq!(saga.phase, Phase::Compensated);
}

#[test]
fn cancel_right_after_start_abandons_a_pending_retry() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, err(CHARGE, 1, "unavailable"), T0 + 1);
    assert_eq!(saga.steps[CHARGE].phase, StepPhase::RetryWait);
    let effects = apply(
        &mut saga,
        &def,
        Event::Cancel {
            reason: "no".into(),
        },
        T0 + 2,
    );
    assert_eq!(
        effects,
        vec![fwd(AFTER, 1)],
        "the retry is abandoned: nothing to undo"
    );
    assert_eq!(saga.steps[CHARGE].phase, StepPhase::Failed);
    assert_eq!(saga.steps[CHARGE].due_at, None);
}

#[test]
fn an_after_compensation_step_is_retried_and_its_failure_still_compensates() {
    let def = order();
    let policy = def.after_compensation.as_ref().unwrap().retry.clone();
    // Far past the deadline: the after-compensation step is not bound by it.
    let mut now = T0 + ms(def.deadline) * 2;
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, err(CHARGE, 1, "declined"), T0 + 1);
    for attempt in 1..policy.max_attempts {
        assert_eq!(
            apply(&mut saga, &def, err(AFTER, attempt, "unavailable"), now),
            vec![]
        );
        let due = saga.steps[AFTER].due_at.unwrap();
        assert!(due - now <= ceiling(&policy, attempt));
        now = due;
        assert_eq!(
            apply(&mut saga, &def, Event::Tick, now),
            vec![fwd(AFTER, attempt + 1)]
        );
    }
    let effects = apply(
        &mut saga,
        &def,
        err(AFTER, policy.max_attempts, "unavailable"),
        now + 1,
    );
    assert_eq!(effects, vec![status("PENDING", "CANCELLED")]);
    assert_eq!(saga.phase, Phase::Compensated);
    assert_eq!(saga.steps[AFTER].phase, StepPhase::Failed);
}

#[test]
fn the_deadline_passed_at_a_tick_compensates_and_stops_retries() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(&mut saga, &def, ok(RESERVE, 1), T0 + 2);
    apply(&mut saga, &def, err(PREPARE, 1, "unavailable"), T0 + 3);
    assert_eq!(saga.steps[PREPARE].phase, StepPhase::RetryWait);
    assert_eq!(saga.deadline_at, T0 + ms(def.deadline));
    // The host was away for the retry and comes back after the deadline: no retry is sent.
    let deadline = saga.deadline_at;
    let effects = apply(&mut saga, &def, Event::Tick, deadline);
    assert_eq!(effects, vec![comp(RESERVE, 1)]);
    assert_eq!(saga.phase, Phase::Compensating);
    assert!(saga.reason.clone().unwrap().contains("deadline"));
    assert_eq!(
        (saga.steps[PREPARE].phase, saga.steps[PREPARE].attempt),
        (StepPhase::Failed, 1)
    );
}

#[test]
fn the_deadline_waits_for_steps_in_flight() {
    let def = order_with_deadline(Duration::from_secs(5));
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    let deadline = saga.deadline_at;
    assert_eq!(deadline, T0 + 5_000);
    // The deadline comes before the steps' timeouts.
    assert_eq!(saga.next_wakeup(), Some(deadline));
    assert_ignored(&mut saga, &def, Event::Tick, deadline - 1);
    assert_eq!(apply(&mut saga, &def, Event::Tick, deadline), vec![]);
    assert_eq!(saga.phase, Phase::Compensating);
    assert_eq!(saga.in_flight().len(), 2);
    // Compensating: only the steps' timeouts wake the saga now.
    let timeouts = saga.steps.iter().filter_map(|s| s.due_at).min();
    assert_eq!(saga.next_wakeup(), timeouts);
    assert_eq!(apply(&mut saga, &def, ok(RESERVE, 1), deadline + 1), vec![]);
    assert_eq!(
        apply(&mut saga, &def, ok(PREPARE, 1), deadline + 2),
        vec![comp(PREPARE, 1)]
    );
}

#[test]
fn a_success_after_the_deadline_starts_no_new_stage() {
    // The reply can beat the deadline's Tick to the saga (a busy or recovering host): the next
    // stage must not start anyway ("once it passes, no forward step starts").
    let def = order_with_deadline(Duration::from_secs(5));
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(&mut saga, &def, ok(RESERVE, 1), T0 + 2);
    let late = saga.deadline_at + 1;
    let effects = apply(&mut saga, &def, ok(PREPARE, 1), late);
    assert!(
        !effects.contains(&fwd(NOTIFY, 1)),
        "the pivot was sent after the deadline: {effects:?}"
    );
    assert_eq!(effects, vec![comp(PREPARE, 1)]);
    assert_eq!(saga.phase, Phase::Compensating);
    assert!(saga.reason.clone().unwrap().contains("deadline"));
    assert_eq!(saga.steps[NOTIFY].phase, StepPhase::Skipped);
}

#[test]
fn a_failure_after_the_pivot_needs_a_human() {
    // stage 0: a (compensable); stage 1: the pivot; stage 2: b (compensable).
    let def = build(&Shape {
        stages: vec![
            vec![step_shape(Kind::Compensable)],
            vec![step_shape(Kind::Pivot)],
            vec![step_shape(Kind::Compensable)],
        ],
        stage_status: vec![false, true, false],
        after: Some(step_shape(Kind::ReadOnly)),
        deadline_ms: 60_000,
    });
    let (mut saga, _) = Saga::start(&def, "s".into(), Vec::new(), T0);
    apply(&mut saga, &def, ok(0, 1), T0 + 1);
    assert_eq!(
        apply(&mut saga, &def, ok(1, 1), T0 + 2),
        vec![status("INITIAL", "S1"), fwd(2, 1)]
    );
    let effects = apply(&mut saga, &def, err(2, 1, "fatal"), T0 + 3);
    assert!(matches!(effects[0], Effect::Parked { count: 1, .. }));
    assert_eq!(effects[1..], [status("S1", "PARKED")]);
    assert_eq!(saga.phase, Phase::NeedsAttention);
    assert!(
        saga.reason.clone().unwrap().contains("pivot step `s1_0`"),
        "{:?}",
        saga.reason
    );
    assert!(
        saga.steps.iter().all(|s| s.comp_attempt == 0),
        "nothing is undone"
    );
    assert_eq!(
        saga.steps[3].attempt, 0,
        "the after-compensation step does not run"
    );
    // Nothing to retry on a pivot; forcing compensation undoes what can be undone (the pivot
    // has no compensation), then runs the after-compensation step.
    let retry = saga.check(&def, &OperatorAction::Retry { step: None });
    assert!(retry.unwrap_err().contains("pivot"));
    assert_eq!(
        apply(
            &mut saga,
            &def,
            Event::Intervene(intervention(OperatorAction::Compensate)),
            T0 + 4
        ),
        vec![unparked("compensate"), status("PARKED", "S1"), comp(0, 1)]
    );
    apply(&mut saga, &def, comp_ok(0, 1), T0 + 5);
    apply(&mut saga, &def, ok(3, 1), T0 + 6);
    assert_eq!(saga.phase, Phase::Compensated);
}

#[test]
fn skipping_one_of_two_pivots_parks_again_on_the_other() {
    // stage 0: pivot p0; stage 1: pivot p1; stage 2: b (compensable). Both pivots succeed, b
    // fails: the saga parks on a pivot. The operator settles that one by hand (skip); the
    // other still cannot be undone, so the same transition parks the saga again, for it. A
    // property run found this (an unpark followed by a new park in one transition).
    let def = build(&Shape {
        stages: vec![
            vec![step_shape(Kind::Pivot)],
            vec![step_shape(Kind::Pivot)],
            vec![step_shape(Kind::Compensable)],
        ],
        stage_status: vec![false, false, false],
        after: None,
        deadline_ms: 60_000,
    });
    let (mut saga, _) = Saga::start(&def, "s".into(), Vec::new(), T0);
    apply(&mut saga, &def, ok(0, 1), T0 + 1);
    apply(&mut saga, &def, ok(1, 1), T0 + 2);
    let effects = apply(&mut saga, &def, err(2, 1, "fatal"), T0 + 3);
    assert!(matches!(effects[0], Effect::Parked { count: 1, .. }));
    assert!(saga.reason.clone().unwrap().contains("pivot step `s0_0`"));

    let skip = |step| {
        Event::Intervene(intervention(OperatorAction::Skip {
            step,
            output: Vec::new(),
        }))
    };
    let effects = apply(&mut saga, &def, skip(0), T0 + 4);
    assert_eq!(effects[0], unparked("skip"));
    assert!(
        matches!(effects[effects.len() - 2], Effect::Parked { count: 2, .. }),
        "{effects:?}"
    );
    assert_eq!(saga.phase, Phase::NeedsAttention);
    assert_eq!(saga.steps[0].phase, StepPhase::Compensated);
    assert!(
        saga.reason.clone().unwrap().contains("pivot step `s1_0`"),
        "{:?}",
        saga.reason
    );
    // Settling the second by hand too lets compensation run: b is the only compensable step,
    // and it failed, so there is nothing to undo and the saga ends compensated.
    let effects = apply(&mut saga, &def, skip(1), T0 + 5);
    assert_eq!(effects[0], unparked("skip"));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Parked { .. })));
    assert_eq!(saga.phase, Phase::Compensated);
}

#[test]
fn a_pivot_that_times_out_for_good_needs_a_human() {
    // The notification may have gone out although it never answered: undoing the charge and
    // telling the customer "cancelled" could contradict it, so the saga stops for a human.
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(&mut saga, &def, ok(RESERVE, 1), T0 + 2);
    apply(&mut saga, &def, ok(PREPARE, 1), T0 + 3);
    let attempts = def.steps[NOTIFY].retry.max_attempts;
    for _ in 0..attempts * 2 + 2 {
        let Some(due) = saga.next_wakeup() else { break };
        apply(&mut saga, &def, Event::Tick, due);
        if saga.is_terminal() {
            break;
        }
    }
    assert_eq!(saga.phase, Phase::NeedsAttention);
    assert_eq!(saga.status, "NEEDS_ATTENTION");
    assert_eq!(saga.steps[NOTIFY].attempt, attempts);
    assert!(saga.steps[NOTIFY].maybe_applied);
    assert!(
        saga.reason.clone().unwrap().contains("may have succeeded"),
        "{:?}",
        saga.reason
    );
    assert!(
        saga.steps.iter().all(|s| s.comp_attempt == 0),
        "nothing is undone"
    );
    // The operator checked: the notification never went out. Abandoning ends it FAILED as it
    // stands; here the operator gives up.
    apply(
        &mut saga,
        &def,
        Event::Intervene(intervention(OperatorAction::Abandon)),
        T0 + 10_000_000,
    );
    assert_eq!(saga.phase, Phase::Failed);
    assert_eq!(saga.status, "FAILED");
    assert!(saga
        .reason
        .clone()
        .unwrap()
        .ends_with("abandoned by operator `ops`: fixed"));
}

#[test]
fn a_pivot_that_timed_out_but_succeeded_is_settled_and_the_saga_completes() {
    // As above, but the operator finds the notification did go out: settling the pivot as
    // succeeded records its result and the saga goes forward to the end.
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(&mut saga, &def, ok(RESERVE, 1), T0 + 2);
    apply(&mut saga, &def, ok(PREPARE, 1), T0 + 3);
    for _ in 0..def.steps[NOTIFY].retry.max_attempts * 2 + 2 {
        let Some(due) = saga.next_wakeup() else { break };
        apply(&mut saga, &def, Event::Tick, due);
    }
    assert_eq!(saga.phase, Phase::NeedsAttention);
    // Only the pivot can be settled, and only while parked.
    let other = OperatorAction::Settle {
        step: CHARGE,
        output: Vec::new(),
    };
    assert!(saga
        .check(&def, &other)
        .unwrap_err()
        .contains("not the pivot"));
    // Skipping the pivot with a result would drop the result: refused, pointing to settle.
    let skip_with_result = OperatorAction::Skip {
        step: NOTIFY,
        output: br#"{"sent":true}"#.to_vec(),
    };
    assert!(saga
        .check(&def, &skip_with_result)
        .unwrap_err()
        .contains("settle it"));
    let settle = OperatorAction::Settle {
        step: NOTIFY,
        output: br#"{"sent":true}"#.to_vec(),
    };
    assert_eq!(saga.check(&def, &settle), Ok(vec![NOTIFY]));
    let effects = apply(
        &mut saga,
        &def,
        Event::Intervene(intervention(settle.clone())),
        T0 + 10_000_000,
    );
    assert_eq!(effects[0], unparked("settle"));
    assert_eq!(saga.phase, Phase::Completed, "{:?}", saga.reason);
    assert_eq!(saga.status, def.statuses.completed);
    assert_eq!(
        saga.steps[NOTIFY].output.as_deref(),
        Some(&br#"{"sent":true}"#[..])
    );
    assert!(
        saga.steps.iter().all(|s| s.comp_attempt == 0),
        "nothing was undone"
    );
    assert!(saga.reason.is_none());
    // A running saga has no pivot to settle.
    let (running, _) = start(&def);
    assert!(running
        .check(&def, &settle)
        .unwrap_err()
        .contains("only a saga parked"));
}

#[test]
fn a_pivot_that_succeeded_before_a_later_failure_cannot_be_settled() {
    // stage 0: a (compensable); stage 1: the pivot; stage 2: b (compensable); b fails.
    let def = build(&Shape {
        stages: vec![
            vec![step_shape(Kind::Compensable)],
            vec![step_shape(Kind::Pivot)],
            vec![step_shape(Kind::Compensable)],
        ],
        stage_status: vec![false, true, false],
        after: Some(step_shape(Kind::ReadOnly)),
        deadline_ms: 60_000,
    });
    let (mut saga, _) = Saga::start(&def, "s".into(), Vec::new(), T0);
    apply(&mut saga, &def, ok(0, 1), T0 + 1);
    apply(&mut saga, &def, ok(1, 1), T0 + 2);
    apply(&mut saga, &def, err(2, 1, "fatal"), T0 + 3);
    assert_eq!(saga.phase, Phase::NeedsAttention);
    let settle = OperatorAction::Settle {
        step: 1,
        output: Vec::new(),
    };
    assert!(saga
        .check(&def, &settle)
        .unwrap_err()
        .contains("already succeeded"));
}

#[test]
fn terminal_sagas_ignore_everything() {
    let def = order();
    let completed = {
        let (mut s, _) = start(&def);
        for (step, at) in [(CHARGE, 1), (RESERVE, 2), (PREPARE, 3), (NOTIFY, 4)] {
            apply(&mut s, &def, ok(step, 1), T0 + at);
        }
        s
    };
    let compensated = {
        let (mut s, _) = start(&def);
        apply(&mut s, &def, err(CHARGE, 1, "declined"), T0 + 1);
        apply(&mut s, &def, ok(AFTER, 1), T0 + 2);
        s
    };
    let failed = {
        let mut def = def.clone();
        def.steps[CHARGE].compensation_retry.max_attempts = 1;
        let (mut s, _) = start(&def);
        apply(&mut s, &def, ok(CHARGE, 1), T0 + 1);
        apply(&mut s, &def, Event::Cancel { reason: "x".into() }, T0 + 2);
        apply(&mut s, &def, ok(RESERVE, 1), T0 + 3);
        apply(&mut s, &def, err(PREPARE, 1, "invalid"), T0 + 4);
        apply(&mut s, &def, comp_err(RESERVE, 1, "unavailable"), T0 + 5);
        assert_eq!(
            s.phase,
            Phase::Compensating,
            "the release gets its default 20 attempts"
        );
        let retry = s.steps[RESERVE].due_at.unwrap();
        apply(&mut s, &def, Event::Tick, retry);
        apply(&mut s, &def, comp_ok(RESERVE, 2), T0 + 100_000);
        apply(
            &mut s,
            &def,
            comp_err(CHARGE, 1, "unavailable"),
            T0 + 100_001,
        );
        assert_eq!(s.phase, Phase::NeedsAttention);
        apply(
            &mut s,
            &def,
            Event::Intervene(intervention(OperatorAction::Abandon)),
            T0 + 100_002,
        );
        s
    };
    assert_eq!(
        [completed.phase, compensated.phase, failed.phase],
        [Phase::Completed, Phase::Compensated, Phase::Failed]
    );
    let far = T0 + ms(def.deadline) * 10;
    for mut saga in [completed, compensated, failed] {
        assert_eq!(saga.next_wakeup(), None);
        assert!(saga.in_flight().is_empty());
        for event in [
            Event::Tick,
            Event::Cancel {
                reason: "late".into(),
            },
            ok(CHARGE, 1),
            ok(CHARGE, 2),
            err(RESERVE, 1, "out_of_stock"),
            comp_ok(CHARGE, 1),
            comp_ok(PREPARE, 1),
            ok(AFTER, 1),
            ok(AFTER, 2),
        ] {
            assert_ignored(&mut saga, &def, event.clone(), T0 + 5);
            assert_ignored(&mut saga, &def, event, far);
        }
    }
}

#[test]
fn next_wakeup_is_the_earliest_due_time() {
    let def = order();
    let (mut saga, _) = start(&def);
    let timeout = ms(def.steps[CHARGE].timeout);
    assert_eq!(saga.next_wakeup(), Some(T0 + timeout));
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 100);
    assert_eq!(saga.next_wakeup(), Some(T0 + 100 + timeout));
    apply(&mut saga, &def, err(PREPARE, 1, "unavailable"), T0 + 200);
    let retry = saga.steps[PREPARE].due_at.unwrap();
    assert!(retry < T0 + 100 + timeout);
    assert_eq!(saga.next_wakeup(), Some(retry));
    apply(&mut saga, &def, Event::Tick, retry);
    assert_eq!(
        saga.next_wakeup(),
        Some(T0 + 100 + timeout),
        "the reservation times out first now"
    );

    // A deadline shorter than the first timeout wakes the saga first.
    let short = order_with_deadline(Duration::from_millis(700));
    let (saga, _) = start(&short);
    assert_eq!(saga.next_wakeup(), Some(T0 + 700));
}

#[test]
fn a_snapshot_of_another_definition_is_refused() {
    let def = order();
    let (mut saga, _) = start(&def);
    let mut other = def.clone();
    other.after_compensation = None;
    let before = saga.clone();
    let e = saga.apply(&other, Event::Tick, T0 + 1).unwrap_err();
    assert_eq!(
        e,
        Error::DefinitionMismatch {
            saga: "order-1".into(),
            definition: "order".into(),
            expected: 4,
            found: 5
        }
    );
    assert_eq!(saga, before);
}

#[test]
fn a_decoded_snapshot_continues_like_the_original() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    apply(&mut saga, &def, err(RESERVE, 1, "unavailable"), T0 + 2);
    let mut copy =
        crate::wire::decode_snapshot(&crate::wire::encode_snapshot(&saga).unwrap()).unwrap();
    assert_eq!(copy, saga);
    let at = saga.next_wakeup().unwrap();
    assert_eq!(
        copy.apply(&def, Event::Tick, at).unwrap(),
        saga.apply(&def, Event::Tick, at).unwrap()
    );
    assert_eq!(copy, saga);
}

// ---------------------------------------------------------------------------------------------
// Random saga shapes.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Has a compensation.
    Compensable,
    /// Cannot be undone (alone in its stage).
    Pivot,
    /// Changes nothing: neither compensation nor pivot.
    ReadOnly,
}

#[derive(Debug, Clone)]
struct RetryShape {
    max_attempts: u32,
    initial_ms: u64,
    max_ms: u64,
    multiplier: f64,
}

#[derive(Debug, Clone)]
struct StepShape {
    kind: Kind,
    retry: RetryShape,
    comp_retry: RetryShape,
    timeout_ms: u64,
}

#[derive(Debug, Clone)]
struct Shape {
    stages: Vec<Vec<StepShape>>,
    stage_status: Vec<bool>,
    after: Option<StepShape>,
    deadline_ms: u64,
}

/// Error kind every random policy treats as final.
const FATAL: &str = "fatal";

fn step_shape(kind: Kind) -> StepShape {
    let retry = RetryShape {
        max_attempts: 2,
        initial_ms: 10,
        max_ms: 100,
        multiplier: 2.0,
    };
    StepShape {
        kind,
        retry: retry.clone(),
        comp_retry: retry,
        timeout_ms: 500,
    }
}

fn policy(r: &RetryShape) -> RetryPolicy {
    RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff: Duration::from_millis(r.initial_ms),
        max_backoff: Duration::from_millis(r.max_ms),
        multiplier: r.multiplier,
        non_retryable: vec![FATAL.to_string()],
    }
}

fn build_step(name: String, stage: usize, s: &StepShape) -> Step {
    let service = format!("svc_{name}");
    Step {
        action: Action {
            service: service.clone(),
            name: "do".to_string(),
        },
        compensation: (s.kind == Kind::Compensable).then(|| Action {
            service,
            name: "undo".to_string(),
        }),
        pivot: s.kind == Kind::Pivot,
        retry: policy(&s.retry),
        compensation_retry: policy(&s.comp_retry),
        timeout: Duration::from_millis(s.timeout_ms),
        name,
        stage,
    }
}

/// Builds a definition that `definition::parse` would accept for the same shape: a pivot is
/// alone in its stage, the after-compensation step has no compensation.
fn build(shape: &Shape) -> SagaDefinition {
    let mut steps = Vec::new();
    let mut stages = Vec::new();
    for (si, stage) in shape.stages.iter().enumerate() {
        assert!(stage.len() == 1 || stage.iter().all(|s| s.kind != Kind::Pivot));
        let mut indices = Vec::new();
        for (k, s) in stage.iter().enumerate() {
            indices.push(steps.len());
            steps.push(build_step(format!("s{si}_{k}"), si, s));
        }
        let status = shape
            .stage_status
            .get(si)
            .copied()
            .unwrap_or(false)
            .then(|| format!("S{si}"));
        stages.push(Stage {
            name: format!("stage{si}"),
            steps: indices,
            status,
        });
    }
    let after = shape.after.as_ref().map(|s| {
        let mut step = build_step("after".to_string(), usize::MAX, s);
        step.compensation = None;
        step.pivot = false;
        step
    });
    SagaDefinition {
        name: "random".to_string(),
        description: String::new(),
        statuses: Statuses {
            initial: "INITIAL".to_string(),
            completed: "DONE".to_string(),
            compensated: "UNDONE".to_string(),
            failed: "FAILED".to_string(),
            needs_attention: "PARKED".to_string(),
        },
        deadline: Duration::from_millis(shape.deadline_ms),
        stages,
        steps,
        after_compensation: after,
        fingerprint: 42,
        source: "random.toml".into(),
    }
}

fn retry_strategy() -> impl Strategy<Value = RetryShape> {
    (
        1u32..=4,
        0u64..=300,
        0u64..=2_000,
        prop::sample::select(vec![1.0, 1.5, 2.0, 3.0]),
    )
        .prop_map(|(max_attempts, initial_ms, extra, multiplier)| RetryShape {
            max_attempts,
            initial_ms,
            max_ms: initial_ms + extra,
            multiplier,
        })
}

fn step_strategy(alone: bool) -> impl Strategy<Value = StepShape> {
    let kind = if alone {
        prop_oneof![4 => Just(Kind::Compensable), 1 => Just(Kind::Pivot), 1 => Just(Kind::ReadOnly)]
            .boxed()
    } else {
        prop_oneof![4 => Just(Kind::Compensable), 1 => Just(Kind::ReadOnly)].boxed()
    };
    (kind, retry_strategy(), retry_strategy(), 200u64..=2_000).prop_map(
        |(kind, retry, comp_retry, timeout_ms)| StepShape {
            kind,
            retry,
            comp_retry,
            timeout_ms,
        },
    )
}

fn shape_strategy() -> impl Strategy<Value = Shape> {
    let stages = prop::collection::vec(1usize..=3, 1..=4).prop_flat_map(|sizes| {
        sizes
            .into_iter()
            .map(|n| prop::collection::vec(step_strategy(n == 1), n))
            .collect::<Vec<_>>()
    });
    (
        stages,
        prop::collection::vec(any::<bool>(), 4),
        prop::option::weighted(0.7, step_strategy(false)),
        prop_oneof![1 => 1_000u64..=5_000, 3 => 5_000u64..=120_000],
    )
        .prop_map(|(stages, stage_status, after, deadline_ms)| Shape {
            stages,
            stage_status,
            after,
            deadline_ms,
        })
}

// ---------------------------------------------------------------------------------------------
// Random environments.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Retryable,
    Fatal,
}

impl Outcome {
    fn result(self) -> Result<Vec<u8>, StepError> {
        match self {
            Outcome::Success => Ok(b"{}".to_vec()),
            Outcome::Retryable => Err(error("unavailable")),
            Outcome::Fatal => Err(error(FATAL)),
        }
    }
}

/// One move of the environment.
#[derive(Debug, Clone)]
enum Move {
    /// A participant answers one outstanding command (any of them: replies are reordered);
    /// with `again`, the command stays outstanding and will be answered a second time.
    Answer {
        pick: usize,
        outcome: Outcome,
        again: bool,
    },
    /// A reply to something already sent, possibly mutated (other attempt, other flag, no such
    /// slot): it must change nothing unless it happens to match a command in flight.
    Stale { pick: usize, mutation: u8 },
    /// A command or its reply is lost (only a timeout can notice).
    Lose { pick: usize },
    /// Time passes, then a Tick.
    Advance { ms: u64 },
    /// The host's timer fires at `next_wakeup`.
    Wakeup,
    /// The host dies; a new one decodes the stored snapshot and republishes `in_flight()`.
    Crash,
    /// An operator acts: `kind` picks the action, `pick` the step.
    Operator { kind: u8, pick: usize },
}

fn outcome_strategy() -> impl Strategy<Value = Outcome> {
    prop_oneof![8 => Just(Outcome::Success), 3 => Just(Outcome::Retryable), 1 => Just(Outcome::Fatal)]
}

fn move_strategy() -> impl Strategy<Value = Move> {
    prop_oneof![
        10 => (any::<usize>(), outcome_strategy(), prop::bool::weighted(0.15))
            .prop_map(|(pick, outcome, again)| Move::Answer { pick, outcome, again }),
        2 => (any::<usize>(), 0u8..5).prop_map(|(pick, mutation)| Move::Stale { pick, mutation }),
        1 => any::<usize>().prop_map(|pick| Move::Lose { pick }),
        2 => (0u64..=1_500).prop_map(|ms| Move::Advance { ms }),
        3 => Just(Move::Wakeup),
        1 => Just(Move::Crash),
        1 => (0u8..8, any::<usize>()).prop_map(|(kind, pick)| Move::Operator { kind, pick }),
    ]
}

#[derive(Debug, Clone)]
struct Environment {
    moves: Vec<Move>,
    /// Index of the move before which a Cancel is sent, if any.
    cancel_at: Option<usize>,
}

fn environment_strategy() -> impl Strategy<Value = Environment> {
    environment_of(move_strategy(), 150)
}

/// Environments of up to `moves` moves drawn from `strategy`.
fn environment_of(
    strategy: impl Strategy<Value = Move>,
    moves: usize,
) -> impl Strategy<Value = Environment> {
    prop::collection::vec(strategy, 0..=moves).prop_flat_map(|moves| {
        let n = moves.len();
        (Just(moves), prop::option::weighted(0.25, 0..=n))
            .prop_map(|(moves, cancel_at)| Environment { moves, cancel_at })
    })
}

/// Moves that keep a saga alive for long: participants mostly fail transiently and operators
/// mostly retry, so sagas retry, park and resume again and again (long histories).
fn stubborn_move_strategy() -> impl Strategy<Value = Move> {
    let outcome = prop_oneof![1 => Just(Outcome::Success), 6 => Just(Outcome::Retryable), 1 => Just(Outcome::Fatal)];
    prop_oneof![
        10 => (any::<usize>(), outcome, prop::bool::weighted(0.1))
            .prop_map(|(pick, outcome, again)| Move::Answer { pick, outcome, again }),
        1 => (any::<usize>(), 0u8..5).prop_map(|(pick, mutation)| Move::Stale { pick, mutation }),
        1 => (0u64..=1_500).prop_map(|ms| Move::Advance { ms }),
        5 => Just(Move::Wakeup),
        1 => Just(Move::Crash),
        4 => (0u8..2, any::<usize>()).prop_map(|(kind, pick)| Move::Operator { kind, pick }),
        1 => (2u8..7, any::<usize>()).prop_map(|(kind, pick)| Move::Operator { kind, pick }),
    ]
}

/// Hosts a saga like the coordinator does, minus the I/O, and checks the invariants after
/// every event.
struct Driver<'d> {
    def: &'d SagaDefinition,
    saga: Saga,
    now: Millis,
    /// Published commands the participants have not answered (yet).
    outstanding: Vec<CommandSpec>,
    /// A participant answers a duplicate with its first answer.
    answers: HashMap<CommandSpec, Result<Vec<u8>, StepError>>,
    /// Every command sent, in order.
    sent: Vec<CommandSpec>,
    /// Every status change announced, in order.
    statuses: Vec<(String, String)>,
    /// Steps that reported success at some point.
    succeeded: HashSet<StepIndex>,
    /// Parkings announced so far.
    parkings: u32,
    /// Limits the saga is driven under.
    limits: Limits,
    /// With small limits: the same saga driven with a history never compacted. Every
    /// transition must be the same, and the compacted history must add up to the whole one.
    whole: Option<Saga>,
    /// How each command that was in flight stopped being so.
    ended: HashMap<CommandSpec, End>,
    /// Replies refused per step and its latest attempt then (compensation or not, number).
    refused_for: HashMap<(StepIndex, bool, u32), u32>,
}

/// How an attempt stopped being in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Its reply was applied: success, or a failure of this kind.
    Answered(Result<(), String>),
    /// It timed out.
    TimedOut,
    /// An operator skipped it.
    Skipped,
    /// An operator retried it: a newer attempt replaced it.
    Replaced,
}

/// What a reply must do, by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// It answers a command in flight.
    Applied,
    /// Nothing: a duplicate, a failure of an attempt that is over, a finished saga.
    Nothing,
    /// Recorded as late, not dead-lettered.
    Late,
    /// Recorded and dead-lettered.
    Refused,
}

impl<'d> Driver<'d> {
    fn start(def: &'d SagaDefinition) -> Self {
        Driver::start_with(def, Limits::default(), false)
    }

    /// A driver under `limits`; with `lockstep`, also drives a copy of the saga whose history
    /// is never compacted and checks that compaction changes nothing else.
    fn start_with(def: &'d SagaDefinition, limits: Limits, lockstep: bool) -> Self {
        let (saga, t) = Saga::start(def, "saga-7".to_string(), b"{}".to_vec(), T0);
        assert!(t.changed);
        assert_eq!(t.effects.first(), Some(&status("", &def.statuses.initial)));
        let mut d = Driver {
            def,
            saga,
            now: T0,
            outstanding: Vec::new(),
            answers: HashMap::new(),
            sent: Vec::new(),
            statuses: Vec::new(),
            succeeded: HashSet::new(),
            parkings: 0,
            limits,
            whole: None,
            ended: HashMap::new(),
            refused_for: HashMap::new(),
        };
        d.whole = lockstep.then(|| d.saga.clone());
        let expected: Vec<Effect> = def.stages[0].steps.iter().map(|&i| fwd(i, 1)).collect();
        assert_eq!(t.effects[1..], expected[..]);
        let blank = Saga {
            steps: Vec::new(),
            history: Vec::new(),
            ..d.saga.clone()
        };
        d.record(&blank, &t, false);
        d.check_state();
        d
    }

    fn after(&self) -> Option<StepIndex> {
        self.def
            .after_compensation
            .as_ref()
            .map(|_| self.def.steps.len())
    }

    /// What the reply to `c` reporting `outcome` must do, by what the model saw happen to
    /// the commands sent.
    fn expect_reply(&self, c: CommandSpec, outcome: &Result<Vec<u8>, StepError>) -> Expect {
        if self.saga.is_terminal() {
            return Expect::Nothing;
        }
        if self.saga.in_flight().contains(&c) {
            return Expect::Applied;
        }
        if !self.sent.contains(&c) {
            return Expect::Refused;
        }
        let latest = self
            .sent
            .iter()
            .filter(|s| s.step == c.step && s.compensation == c.compensation)
            .map(|s| s.attempt)
            .max()
            .unwrap();
        if c.attempt < latest {
            return if outcome.is_ok() {
                Expect::Late
            } else {
                Expect::Nothing
            };
        }
        match self
            .ended
            .get(&c)
            .expect("a command sent and not in flight has ended")
        {
            End::TimedOut => Expect::Late,
            End::Answered(Ok(())) | End::Skipped => {
                if outcome.is_ok() {
                    Expect::Nothing
                } else {
                    Expect::Refused
                }
            }
            End::Answered(Err(kind)) => match outcome {
                Err(e) if e.kind == *kind => Expect::Nothing,
                _ => Expect::Refused,
            },
            End::Replaced => panic!("{c:?} is the latest attempt but was replaced"),
        }
    }

    /// The latest attempt sent for step `i`, by the model: (compensation, number).
    fn latest_sent(&self, i: StepIndex) -> (bool, u32) {
        let max = |comp: bool| {
            self.sent
                .iter()
                .filter(|s| s.step == i && s.compensation == comp)
                .map(|s| s.attempt)
                .max()
                .unwrap_or(0)
        };
        match max(true) {
            0 => (false, max(false)),
            n => (true, n),
        }
    }

    /// Checks a reply that was not applied but recorded (`expect` Late or Refused).
    fn check_refusal(&mut self, before: &Saga, step: StepIndex, expect: Expect, t: &Transition) {
        assert!(t.changed, "a {expect:?} reply is recorded");
        let unchanged = Saga {
            history: before.history.clone(),
            updated_at: before.updated_at,
            ..self.saga.clone()
        };
        assert_eq!(
            &unchanged, before,
            "a refused reply changed more than the history"
        );
        match expect {
            Expect::Refused => assert!(
                matches!(t.effects.as_slice(), [Effect::DeadLetterReply { .. }]),
                "{:?}",
                t.effects
            ),
            _ => assert!(t.effects.is_empty(), "{:?}", t.effects),
        }
        let last = |s: &Saga, slot: Option<u32>| {
            s.history
                .iter()
                .rev()
                .find(|h| h.step == slot && matches!(h.what, Happening::ReplyRefused { .. }))
                .cloned()
        };
        if step >= self.def.step_slots() {
            let entry = self.saga.history.last().unwrap();
            assert!(
                entry.step.is_none() && matches!(entry.what, Happening::ReplyRefused { .. }),
                "{entry:?}"
            );
            return;
        }
        let (comp, n) = self.latest_sent(step);
        let count = self.refused_for.entry((step, comp, n)).or_insert(0);
        *count += 1;
        let entry = last(&self.saga, Some(step as u32)).expect("a ReplyRefused entry");
        match entry.what {
            Happening::ReplyRefused {
                attempt,
                compensation,
                count: recorded,
                ref reason,
            } => {
                assert_eq!((compensation, attempt), (comp, n), "{reason}");
                assert_eq!(recorded, *count, "{reason}");
                // (A later one only adds to the first one's count.)
                if *count == 1 {
                    assert_eq!(
                        reason.starts_with("late reply"),
                        expect == Expect::Late,
                        "{reason}"
                    );
                }
            }
            _ => unreachable!(),
        }
    }

    /// Records how the commands in flight before `event` and not after it ended.
    fn record_ended(&mut self, before: &Saga, event: &Event, applied: bool) {
        let now_in_flight = self.saga.in_flight();
        for c in before.in_flight() {
            if now_in_flight.contains(&c) {
                continue;
            }
            let end = match event {
                Event::Reply {
                    step,
                    attempt,
                    compensation,
                    outcome,
                } if applied && spec(*step, *compensation, *attempt) == c => {
                    End::Answered(outcome.as_ref().map(|_| ()).map_err(|e| e.kind.clone()))
                }
                Event::Tick => End::TimedOut,
                Event::Intervene(_) => {
                    let s = &self.saga.steps[c.step];
                    let latest = if c.compensation {
                        s.comp_attempt
                    } else {
                        s.attempt
                    };
                    if latest == c.attempt {
                        End::Skipped
                    } else {
                        End::Replaced
                    }
                }
                other => panic!("{other:?} ended {c:?}"),
            };
            self.ended.insert(c, end);
        }
    }

    fn apply(&mut self, event: Event) -> Transition {
        let expect = match &event {
            Event::Reply {
                step,
                attempt,
                compensation,
                outcome,
            } => Some((
                *step,
                self.expect_reply(spec(*step, *compensation, *attempt), outcome),
            )),
            _ => None,
        };
        let before = self.saga.clone();
        let t = self
            .saga
            .apply_with_limits(self.def, event.clone(), self.now, &self.limits)
            .unwrap();
        if let Some(whole) = &mut self.whole {
            let never_compacted = Limits {
                max_history: usize::MAX,
                max_history_bytes: usize::MAX,
                ..self.limits.clone()
            };
            let whole_before = whole.history.len();
            let tw = whole
                .apply_with_limits(self.def, event.clone(), self.now, &never_compacted)
                .unwrap();
            assert_eq!(t, tw, "compaction changed the transition of {event:?}");
            assert_eq!(
                self.saga.logged_since(before.logged()),
                &whole.history[whole_before..],
                "logged_since misses what {event:?} logged"
            );
            check_compaction(self.def, &self.limits, &self.saga, whole);
        }
        // (c) terminal phases are absorbing; and "unchanged" must really mean unchanged, since
        // the host then skips persisting.
        if before.is_terminal() {
            assert_eq!(
                t,
                Transition::default(),
                "terminal saga reacted to {event:?}"
            );
        }
        if !t.changed {
            assert!(t.effects.is_empty(), "effects without a change: {t:?}");
            assert_eq!(
                self.saga, before,
                "{event:?} changed the snapshot but said it did not"
            );
        } else {
            assert_eq!(self.saga.updated_at, self.now);
        }
        match expect {
            Some((_, Expect::Applied)) => assert!(t.changed, "{event:?} was not applied"),
            Some((_, Expect::Nothing)) => assert!(!t.changed, "{event:?} changed the saga"),
            Some((step, e)) => self.check_refusal(&before, step, e, &t),
            None => {}
        }
        self.record_ended(
            &before,
            &event,
            expect.is_some_and(|(_, e)| e == Expect::Applied),
        );
        self.check_timeouts(&before);
        // Settling a parked pivot is the one way back to going forward.
        let resumed = matches!(&event, Event::Intervene(i) if matches!(i.action, OperatorAction::Settle { .. }))
            && before.phase == Phase::NeedsAttention
            && self.saga.phase != Phase::NeedsAttention;
        self.record(&before, &t, resumed);
        self.check_backoffs(&before);
        self.check_state();
        t
    }

    /// Checks and records the effects of one transition.
    fn record(&mut self, before: &Saga, t: &Transition, resumed: bool) {
        for (k, effect) in t.effects.iter().enumerate() {
            match effect {
                Effect::Send(c) => {
                    let step = self.def.step(c.step).expect("a command for a real step");
                    let is_after = Some(c.step) == self.after();
                    let previous = self
                        .sent
                        .iter()
                        .filter(|s| s.step == c.step && s.compensation == c.compensation)
                        .count();
                    assert_eq!(
                        c.attempt as usize,
                        previous + 1,
                        "attempts are numbered 1, 2, 3… without gaps: {c:?}"
                    );
                    if c.compensation {
                        // (b)
                        assert!(
                            self.saga.attempts_in_budget(c.step, true)
                                <= step.compensation_retry.max_attempts,
                            "{c:?} beyond {:?}",
                            step.compensation_retry
                        );
                        assert!(
                            step.compensation.is_some(),
                            "compensation sent for a step without one: {c:?}"
                        );
                        assert!(
                            self.sent.contains(&spec(c.step, false, 1)),
                            "compensation of a step never attempted"
                        );
                        assert_ne!(self.saga.phase, Phase::Running);
                        assert!(self
                            .saga
                            .in_flight()
                            .iter()
                            .all(|f| !f.compensation || f == c));
                        // (e) newest first, one step at a time.
                        if let Some(last) = self.sent.iter().rev().find(|s| s.compensation) {
                            assert!(
                                c.step <= last.step,
                                "compensation of step {} after step {}",
                                c.step,
                                last.step
                            );
                        }
                    } else {
                        assert!(
                            self.saga.attempts_in_budget(c.step, false) <= step.retry.max_attempts,
                            "{c:?} beyond {:?}",
                            step.retry
                        );
                        if is_after {
                            assert_eq!(self.saga.phase, Phase::Compensating);
                            let plan = self
                                .saga
                                .compensation_plan
                                .clone()
                                .expect("a plan before the after step");
                            assert!(plan
                                .iter()
                                .all(|&i| self.saga.steps[i as usize].phase
                                    == StepPhase::Compensated));
                        } else {
                            // (a) no forward step starts once the saga left Running, nor past the
                            // deadline.
                            assert!(
                                before.phase == Phase::Running || resumed,
                                "forward {c:?} sent while {:?}",
                                before.phase
                            );
                            assert!(
                                self.now < self.saga.deadline_at,
                                "forward {c:?} sent past the deadline"
                            );
                        }
                    }
                    self.sent.push(*c);
                    self.outstanding.push(*c);
                }
                Effect::Parked { reason, count } => {
                    assert_eq!(self.saga.phase, Phase::NeedsAttention);
                    assert_eq!(self.saga.reason.as_ref(), Some(reason));
                    self.parkings += 1;
                    assert_eq!(*count, self.parkings, "one dead letter per parking");
                    assert_eq!(self.saga.parkings(), self.parkings);
                    assert!(
                        self.saga.in_flight().is_empty(),
                        "parked with work in flight"
                    );
                }
                Effect::Unparked {
                    operator, action, ..
                } => {
                    assert_eq!(before.phase, Phase::NeedsAttention);
                    let parked_again = t.effects[k + 1..]
                        .iter()
                        .any(|e| matches!(e, Effect::Parked { .. }));
                    if parked_again {
                        // Only settling a pivot by hand can meet another pivot that cannot be
                        // undone in the same transition.
                        assert_eq!(action, "skip", "{action} by {operator} parked again");
                        let reason = self.saga.reason.clone().unwrap_or_default();
                        assert!(reason.contains("cannot be compensated"), "{reason}");
                    } else {
                        assert_ne!(
                            self.saga.phase,
                            Phase::NeedsAttention,
                            "{action} by {operator}"
                        );
                        // Back to why it compensated: the parking reason is history now.
                        let reason = self.saga.reason.clone().unwrap_or_default();
                        assert!(!reason.contains("failed after"), "{reason}");
                    }
                }
                Effect::DeadLetterReply { reason } => {
                    assert!(!reason.is_empty());
                    assert_eq!(t.effects.len(), 1, "a refused reply changes nothing else");
                }
                Effect::StatusChanged { from, to } => {
                    let last = self.statuses.last().map_or("", |(_, to)| to.as_str());
                    assert_eq!(from, last, "status changes chain");
                    assert_ne!(from, to);
                    self.statuses.push((from.clone(), to.clone()));
                }
            }
        }
        for h in self.saga.logged_since(before.logged()) {
            if let (Some(i), Happening::Succeeded { .. }) = (h.step, &h.what) {
                self.succeeded.insert(i as usize);
            }
        }
        // (f) never both completed and compensated.
        let labels = &self.def.statuses;
        let seen = |label: &str| self.statuses.iter().any(|(_, to)| to == label);
        assert!(
            !(seen(&labels.completed) && seen(&labels.compensated)),
            "statuses {:?}",
            self.statuses
        );
        assert!(
            [&labels.completed, &labels.compensated, &labels.failed]
                .iter()
                .filter(|l| seen(l))
                .count()
                <= 1,
            "more than one final status: {:?}",
            self.statuses
        );
        let parked = |s: &Saga| s.phase == Phase::NeedsAttention;
        if (self.saga.is_terminal() && !before.is_terminal())
            || (parked(&self.saga) && !parked(before))
        {
            self.check_final();
        }
    }

    /// A timeout logged in the last transition says how many replies were refused for the
    /// attempt.
    fn check_timeouts(&self, before: &Saga) {
        for h in self.saga.logged_since(before.logged()) {
            let (
                Some(step),
                Happening::AttemptFailed {
                    attempt,
                    kind,
                    message,
                }
                | Happening::CompensationAttemptFailed {
                    attempt,
                    kind,
                    message,
                },
            ) = (h.step, &h.what)
            else {
                continue;
            };
            if kind != TIMEOUT_KIND {
                continue;
            }
            let comp = matches!(h.what, Happening::CompensationAttemptFailed { .. });
            match self.refused_for.get(&(step as usize, comp, *attempt)) {
                None => assert!(message.starts_with("no reply"), "{message}"),
                Some(n) => {
                    assert!(message.starts_with("no accepted reply"), "{message}");
                    if !message.contains("[truncated") {
                        let (count, noun) = if *n == 1 {
                            (1, "reply")
                        } else {
                            (*n, "replies")
                        };
                        assert!(
                            message.contains(&format!("({count} {noun} refused")),
                            "{message}"
                        );
                    }
                }
            }
        }
    }

    /// Every retry scheduled in the last transition waits at most the policy's ceiling.
    fn check_backoffs(&self, before: &Saga) {
        let new = self.saga.logged_since(before.logged());
        for pair in new.windows(2) {
            let (failed, scheduled) = (&pair[0], &pair[1]);
            let (Happening::RetryScheduled { attempt, at }
            | Happening::CompensationRetryScheduled { attempt, at }) = scheduled.what
            else {
                continue;
            };
            assert_eq!(failed.step, scheduled.step);
            let step = self.def.step(scheduled.step.unwrap() as usize).unwrap();
            let policy = match failed.what {
                Happening::AttemptFailed { .. } => {
                    assert!(matches!(scheduled.what, Happening::RetryScheduled { .. }));
                    &step.retry
                }
                Happening::CompensationAttemptFailed { .. } => {
                    assert!(matches!(
                        scheduled.what,
                        Happening::CompensationRetryScheduled { .. }
                    ));
                    &step.compensation_retry
                }
                ref other => panic!("retry scheduled after {other:?}"),
            };
            assert!(
                at >= self.now && at - self.now <= ceiling(policy, attempt - 1),
                "retry {attempt} of step {:?} in {}ms, ceiling {}ms",
                scheduled.step,
                at - self.now,
                ceiling(policy, attempt - 1)
            );
        }
    }

    /// Invariants of the snapshot alone.
    fn check_state(&self) {
        let saga = &self.saga;
        assert_eq!(saga.status, self.statuses.last().unwrap().1);
        assert_eq!(saga.status_seq, self.statuses.len() as u64);
        let in_flight = saga.in_flight();
        for c in &in_flight {
            assert!(
                self.sent.contains(c),
                "{c:?} is in flight but was never sent"
            );
        }
        assert!(
            in_flight.iter().filter(|c| c.compensation).count() <= 1,
            "one compensation at a time"
        );
        if saga.compensation_plan.is_some() {
            assert!(
                in_flight
                    .iter()
                    .all(|c| c.compensation || Some(c.step) == self.after()),
                "{in_flight:?}"
            );
        }
        // next_wakeup is the earliest due time (the deadline counts only while running)…
        let mut due: Vec<Millis> = saga.steps.iter().filter_map(|s| s.due_at).collect();
        if saga.phase == Phase::Running {
            due.push(saga.deadline_at);
        }
        let expected = if saga.is_terminal() {
            None
        } else {
            due.into_iter().min()
        };
        assert_eq!(saga.next_wakeup(), expected);
        // …and a live saga always has something that will wake it: it cannot get stuck — unless
        // it is parked for an operator, with nothing in flight.
        if saga.phase == Phase::NeedsAttention {
            assert!(in_flight.is_empty());
            assert_eq!(saga.next_wakeup(), None);
            assert_eq!(saga.status, self.def.statuses.needs_attention);
        } else if !saga.is_terminal() {
            assert!(
                saga.steps.iter().any(|s| s.due_at.is_some()),
                "live saga with nothing due: {saga:#?}"
            );
        } else {
            assert!(in_flight.is_empty());
        }
        for s in &saga.steps {
            let waiting = matches!(
                s.phase,
                StepPhase::Running
                    | StepPhase::RetryWait
                    | StepPhase::Compensating
                    | StepPhase::CompensationRetryWait
            );
            assert_eq!(s.due_at.is_some(), waiting && !saga.is_terminal(), "{s:?}");
        }
    }

    /// (d), (e) and the rest, once the saga finished.
    fn check_final(&self) {
        let saga = &self.saga;
        let def = self.def;
        let comps: Vec<&CommandSpec> = self.sent.iter().filter(|c| c.compensation).collect();
        let after_sent = self
            .after()
            .is_some_and(|a| self.sent.iter().any(|c| c.step == a));
        let last_status = &self.statuses.last().unwrap().1;
        match saga.phase {
            Phase::Completed => {
                assert!(saga.steps[..def.steps.len()]
                    .iter()
                    .all(|s| s.phase == StepPhase::Succeeded));
                assert!(comps.is_empty(), "a completed saga compensated: {comps:?}");
                assert!(!after_sent);
                assert_eq!(last_status, &def.statuses.completed);
            }
            Phase::Compensated => {
                for (i, step) in def.steps.iter().enumerate() {
                    let s = &saga.steps[i];
                    if step.compensation.is_some() {
                        if self.succeeded.contains(&i) || s.maybe_applied {
                            assert_eq!(
                                s.phase,
                                StepPhase::Compensated,
                                "step {i} may have been applied: {s:?}"
                            );
                        }
                        assert_ne!(s.phase, StepPhase::Succeeded, "step {i} left applied");
                    }
                }
                assert_eq!(after_sent, def.after_compensation.is_some());
                assert_eq!(last_status, &def.statuses.compensated);
                assert!(saga.reason.is_some());
            }
            Phase::Failed => {
                // Only an operator abandons a saga, and only a parked one.
                let reason = saga.reason.clone().unwrap();
                assert!(reason.contains("abandoned by operator"), "{reason}");
                assert!(saga.history.iter().any(|h| matches!(
                    &h.what,
                    Happening::Intervened { action, refused, .. } if action == "abandon" && refused.is_empty()
                )));
                assert_eq!(last_status, &def.statuses.failed);
            }
            Phase::NeedsAttention => {
                let reason = saga.reason.clone().unwrap();
                let why = saga
                    .history
                    .iter()
                    .rev()
                    .find_map(|h| match &h.what {
                        Happening::Parked { reason } => Some(reason),
                        _ => None,
                    })
                    .expect("a Parked entry");
                assert!(reason.ends_with(why.as_str()), "{reason} / {why}");
                if why.starts_with("pivot") {
                    // A pivot that succeeded or timed out (it may have taken effect): the saga
                    // stops for a human before compensating anything.
                    assert!(def.steps.iter().enumerate().any(|(i, s)| {
                        let st = &saga.steps[i];
                        s.pivot
                            && (st.phase == StepPhase::Succeeded
                                || (st.phase == StepPhase::Failed && st.maybe_applied))
                    }));
                    assert!(saga.compensation_plan.is_none());
                } else {
                    assert!(why.starts_with("compensation"), "{why}");
                    assert_eq!(
                        saga.steps
                            .iter()
                            .filter(|s| s.phase == StepPhase::CompensationFailed)
                            .count(),
                        1
                    );
                }
                assert!(!after_sent);
                assert_eq!(last_status, &def.statuses.needs_attention);
            }
            Phase::Running | Phase::Compensating => unreachable!(),
        }
    }

    fn answer(&mut self, c: CommandSpec, outcome: Result<Vec<u8>, StepError>) {
        let outcome = self.answers.entry(c).or_insert(outcome).clone();
        let t = self.apply(Event::Reply {
            step: c.step,
            attempt: c.attempt,
            compensation: c.compensation,
            outcome,
        });
        // A participant that answers every duplicate with its first answer is never refused
        // (it can only be late), unless an operator skipped what it answers.
        if t.effects
            .iter()
            .any(|e| matches!(e, Effect::DeadLetterReply { .. }))
        {
            assert_eq!(
                self.ended.get(&c),
                Some(&End::Skipped),
                "{c:?} refused: {t:?}"
            );
        }
    }

    fn play(&mut self, m: &Move) {
        match *m {
            Move::Answer {
                pick,
                outcome,
                again,
            } => {
                if self.outstanding.is_empty() {
                    return;
                }
                let k = pick % self.outstanding.len();
                let c = if again {
                    self.outstanding[k]
                } else {
                    self.outstanding.remove(k)
                };
                self.answer(c, outcome.result());
            }
            Move::Stale { pick, mutation } => {
                if self.sent.is_empty() {
                    return;
                }
                let mut c = self.sent[pick % self.sent.len()];
                match mutation {
                    0 => {}
                    1 => c.attempt += 1,
                    2 => c.attempt -= 1,
                    3 => c.compensation = !c.compensation,
                    _ => c.step += self.def.step_slots(),
                }
                if self.saga.in_flight().contains(&c) {
                    return; // a genuine reply, not a stale one
                }
                let outcome = if mutation % 2 == 0 {
                    Ok(Vec::new())
                } else {
                    Err(error(FATAL))
                };
                // Checked against the model in `apply`.
                self.apply(Event::Reply {
                    step: c.step,
                    attempt: c.attempt,
                    compensation: c.compensation,
                    outcome,
                });
            }
            Move::Lose { pick } => {
                if !self.outstanding.is_empty() {
                    let k = pick % self.outstanding.len();
                    self.outstanding.remove(k);
                }
            }
            Move::Advance { ms } => {
                self.now += ms as Millis;
                let wake = self.saga.next_wakeup();
                let t = self.apply(Event::Tick);
                if wake.is_none_or(|w| self.now < w) {
                    assert!(!t.changed, "a tick before anything is due changed the saga");
                }
            }
            Move::Wakeup => {
                let wake = self.saga.next_wakeup();
                if let Some(w) = wake {
                    self.now = self.now.max(w);
                }
                let t = self.apply(Event::Tick);
                if wake.is_some() {
                    assert!(t.changed, "a tick at next_wakeup made no progress");
                }
            }
            Move::Operator { kind, pick } => {
                let step = pick % self.def.step_slots();
                let action = match kind {
                    0 => OperatorAction::Retry { step: None },
                    1 => OperatorAction::Retry { step: Some(step) },
                    2 => OperatorAction::Skip {
                        step,
                        output: b"{\"by\":\"hand\"}".to_vec(),
                    },
                    3 => OperatorAction::Compensate,
                    4 => OperatorAction::Cancel,
                    5 => OperatorAction::Abandon,
                    6 => OperatorAction::Settle {
                        step,
                        output: b"{\"settled\":true}".to_vec(),
                    },
                    _ => OperatorAction::Skip {
                        step: pick,
                        output: Vec::new(),
                    },
                };
                self.intervene(action);
            }
            Move::Crash => {
                let bytes = crate::wire::encode_snapshot(&self.saga).unwrap();
                let decoded = crate::wire::decode_snapshot(&bytes).unwrap();
                assert_eq!(decoded, self.saga);
                self.saga = decoded;
                // The recovering host republishes what is in flight, with the same attempts.
                let again = self.saga.in_flight();
                self.outstanding.extend(again);
            }
        }
    }

    /// Applies an operator's action and checks it did what [`Saga::check`] announced.
    fn intervene(&mut self, action: OperatorAction) -> Transition {
        let checked = self.saga.check(self.def, &action);
        let before = self.saga.clone();
        let t = self.apply(Event::Intervene(Intervention {
            id: String::new(),
            action: action.clone(),
            operator: "ops".to_string(),
            reason: "test".to_string(),
        }));
        if before.is_terminal() {
            // Terminal is absorbing (checked by apply); the API refuses with `check`'s reason.
            assert!(checked.is_err());
            return t;
        }
        assert!(t.changed, "every intervention on a live saga is journaled");
        let journaled = self
            .saga
            .logged_since(before.logged())
            .iter()
            .find_map(|h| match &h.what {
                Happening::Intervened {
                    action: a, refused, ..
                } => Some((a.clone(), refused.clone())),
                _ => None,
            })
            .expect("an Intervened entry");
        assert_eq!(journaled.0, action.name());
        match checked {
            Err(why) => {
                assert_eq!(journaled.1, why);
                // A refused action changes nothing but the history.
                let unchanged = Saga {
                    history: before.history.clone(),
                    updated_at: before.updated_at,
                    ..self.saga.clone()
                };
                assert_eq!(unchanged, before, "refused {action:?} changed the saga");
                assert!(t.effects.is_empty());
            }
            Ok(steps) => {
                assert!(journaled.1.is_empty());
                match action {
                    OperatorAction::Retry { .. } => {
                        for i in steps {
                            assert!(
                                t.effects
                                    .iter()
                                    .any(|e| matches!(e, Effect::Send(c) if c.step == i)),
                                "retry of step {i} sent nothing"
                            );
                        }
                    }
                    OperatorAction::Cancel | OperatorAction::Compensate => {
                        assert_ne!(self.saga.phase, Phase::Running);
                    }
                    OperatorAction::Abandon => assert_eq!(self.saga.phase, Phase::Failed),
                    OperatorAction::Skip { step, .. } => {
                        assert!(matches!(
                            self.saga.steps[step].phase,
                            StepPhase::Succeeded | StepPhase::Compensated
                        ));
                    }
                    OperatorAction::Settle { step, .. } => {
                        assert_eq!(self.saga.steps[step].phase, StepPhase::Succeeded);
                        assert!(
                            self.saga.steps.iter().all(|s| s.comp_attempt == 0),
                            "settling a pivot undoes nothing"
                        );
                    }
                }
            }
        }
        t
    }

    fn cancel(&mut self) {
        let running = self.saga.phase == Phase::Running;
        let t = self.apply(Event::Cancel {
            reason: "test".to_string(),
        });
        assert_eq!(t.changed, running, "cancel changes a running saga only");
        if running {
            // (A pivot that already succeeded appends why the saga cannot be compensated.)
            let reason = self.saga.reason.clone().unwrap();
            assert!(reason.starts_with("cancelled: test"), "{reason}");
        }
    }

    /// (g) every command answered (successfully), time advancing: the saga must finish, and
    /// within a bound derived from the definition's retry budgets.
    fn finish_fairly(&mut self) -> usize {
        let def = self.def;
        let budget: u32 = def
            .steps
            .iter()
            .map(|s| s.retry.max_attempts + s.compensation_retry.max_attempts)
            .chain(def.after_compensation.iter().map(|s| s.retry.max_attempts))
            .sum();
        let limit = 3 * budget as usize + 3;
        for n in 0..limit {
            if self.saga.is_terminal() {
                return n;
            }
            if self.saga.phase == Phase::NeedsAttention {
                // The operator fixed the participant and retries; a parked pivot is
                // compensated through.
                let retry = OperatorAction::Retry { step: None };
                if self.saga.check(self.def, &retry).is_ok() {
                    self.intervene(retry);
                } else {
                    self.intervene(OperatorAction::Compensate);
                }
            } else if let Some(&c) = self.saga.in_flight().first() {
                self.outstanding.retain(|o| *o != c);
                self.answer(c, Ok(Vec::new()));
            } else {
                let w = self.saga.next_wakeup().expect("a live saga has a wakeup");
                self.now = self.now.max(w);
                let t = self.apply(Event::Tick);
                assert!(t.changed);
            }
        }
        assert!(
            self.saga.is_terminal(),
            "not finished after {limit} fair steps: {:#?}",
            self.saga
        );
        limit
    }
}

fn run(shape: &Shape, env: &Environment) -> Phase {
    run_with(shape, env, Limits::default(), false)
}

/// [`run`] under `limits`; with `lockstep`, checks every transition against a saga whose
/// history is never compacted.
fn run_with(shape: &Shape, env: &Environment, limits: Limits, lockstep: bool) -> Phase {
    let def = build(shape);
    let mut d = Driver::start_with(&def, limits, lockstep);
    for (k, m) in env.moves.iter().enumerate() {
        if env.cancel_at == Some(k) {
            d.cancel();
        }
        d.play(m);
    }
    if env.cancel_at == Some(env.moves.len()) {
        d.cancel();
    }
    d.finish_fairly();
    // Terminal is absorbing even for a crash and replay of everything ever sent.
    d.play(&Move::Crash);
    for c in d.sent.clone() {
        d.answer(c, Ok(Vec::new()));
    }
    d.play(&Move::Wakeup);
    d.cancel();
    d.saga.phase
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_sagas_in_hostile_environments_keep_their_invariants(shape in shape_strategy(), env in environment_strategy()) {
        let phase = run(&shape, &env);
        prop_assert!(phase.is_terminal());
    }

    #[test]
    fn random_sagas_with_cooperative_participants_complete(shape in shape_strategy()) {
        // Prompt, successful answers and no cancel: every saga completes, whatever its shape.
        let mut shape = shape;
        shape.deadline_ms = 3_600_000;
        let def = build(&shape);
        let mut d = Driver::start(&def);
        d.finish_fairly();
        prop_assert_eq!(d.saga.phase, Phase::Completed);
        let forward = d.sent.iter().filter(|c| !c.compensation).count();
        prop_assert_eq!(forward, def.steps.len(), "one command per step");
    }
}

/// The random environments reach every outcome often enough to be meaningful.
#[test]
fn random_environments_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(Config::default().rng_algorithm),
    );
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    for _ in 0..200 {
        let shape = shape_strategy().new_tree(&mut runner).unwrap().current();
        let env = environment_strategy()
            .new_tree(&mut runner)
            .unwrap()
            .current();
        *seen.entry(run(&shape, &env).as_str()).or_default() += 1;
    }
    for phase in ["COMPLETED", "COMPENSATED", "FAILED"] {
        assert!(
            seen.get(phase).copied().unwrap_or(0) >= 5,
            "too few {phase} outcomes: {seen:?}"
        );
    }
}

#[test]
fn operators_retry_now_skip_with_a_result_and_cancel() {
    let def = order();
    let (mut saga, _) = start(&def);
    // The charge failed transiently and waits to retry: "retry now" sends attempt 2 at once.
    apply(&mut saga, &def, err(CHARGE, 1, "unavailable"), T0 + 1);
    assert_eq!(saga.steps[CHARGE].phase, StepPhase::RetryWait);
    assert_eq!(
        apply(
            &mut saga,
            &def,
            Event::Intervene(intervention(OperatorAction::Retry { step: Some(CHARGE) })),
            T0 + 2
        ),
        vec![fwd(CHARGE, 2)]
    );
    apply(&mut saga, &def, ok(CHARGE, 2), T0 + 3);
    // The shipping service hangs: the operator prepared the shipment by hand.
    let skip = OperatorAction::Skip {
        step: PREPARE,
        output: br#"{"tracking":"BY-HAND-1"}"#.to_vec(),
    };
    apply(
        &mut saga,
        &def,
        Event::Intervene(intervention(skip)),
        T0 + 4,
    );
    assert_eq!(saga.steps[PREPARE].phase, StepPhase::Succeeded);
    assert_eq!(
        saga.steps[PREPARE].output.as_deref(),
        Some(&br#"{"tracking":"BY-HAND-1"}"#[..])
    );
    // The late reply of the skipped attempt changes nothing.
    assert_ignored(&mut saga, &def, ok(PREPARE, 1), T0 + 5);
    // A step of another stage cannot be skipped, and a refused action is journaled.
    let refused = OperatorAction::Skip {
        step: NOTIFY,
        output: Vec::new(),
    };
    assert!(saga.check(&def, &refused).is_err());
    assert_eq!(
        apply(
            &mut saga,
            &def,
            Event::Intervene(intervention(refused)),
            T0 + 6
        ),
        vec![]
    );
    let last = saga.history.last().unwrap().what.to_string();
    assert!(last.contains("skip") && last.contains("refused"), "{last}");
    // Cancel compensates what was done, newest first.
    assert_eq!(
        apply(
            &mut saga,
            &def,
            Event::Intervene(intervention(OperatorAction::Cancel)),
            T0 + 7
        ),
        vec![]
    );
    assert_eq!(saga.phase, Phase::Compensating);
    assert!(saga
        .reason
        .clone()
        .unwrap()
        .starts_with("cancelled by operator `ops`"));
    // (the reserve is still in flight: compensation waits for it)
    assert_eq!(
        apply(&mut saga, &def, ok(RESERVE, 1), T0 + 8),
        vec![comp(PREPARE, 1)]
    );
}

#[test]
fn stuck_at_is_a_multiple_of_the_step_timeout_after_the_next_due_time() {
    let def = order();
    let timeout = ms(def.steps[CHARGE].timeout);
    let (mut saga, _) = start(&def);
    // Waiting for the charge: due at T0 + timeout; stuck 3 timeouts after that.
    assert_eq!(saga.stuck_at(&def, 3), Some(T0 + timeout + 3 * timeout));
    apply(&mut saga, &def, err(CHARGE, 1, "unavailable"), T0 + 5);
    let retry_at = saga.steps[CHARGE].due_at.unwrap();
    assert_eq!(
        saga.stuck_at(&def, 3),
        Some(retry_at.max(T0 + 5) + 3 * timeout)
    );
    // Finished or parked sagas are never "stuck": they are done or already flagged.
    let (mut declined, _) = start(&def);
    apply(&mut declined, &def, err(CHARGE, 1, "declined"), T0 + 1);
    apply(&mut declined, &def, ok(AFTER, 1), T0 + 2);
    assert!(declined.is_terminal());
    assert_eq!(declined.stuck_at(&def, 3), None);
}

// ---------------------------------------------------------------------------------------------
// Bounded snapshots.
// ---------------------------------------------------------------------------------------------

/// Applies an event under `limits` that must change the saga.
fn apply_limited(
    saga: &mut Saga,
    def: &SagaDefinition,
    event: Event,
    now: Millis,
    limits: &Limits,
) -> Vec<Effect> {
    let t = saga
        .apply_with_limits(def, event.clone(), now, limits)
        .unwrap();
    assert!(t.changed, "{event:?} at {now} should change the saga");
    t.effects
}

/// Limits that compact the history early.
fn small_history() -> Limits {
    Limits {
        max_history: Limits::MIN_HISTORY,
        history_head: 4,
        ..Limits::default()
    }
}

fn encoded_len(saga: &Saga) -> usize {
    crate::wire::encode_snapshot(saga).unwrap().len()
}

fn marker(saga: &Saga) -> Option<(u64, u32)> {
    saga.history.iter().find_map(|h| match h.what {
        Happening::Elided {
            entries, parkings, ..
        } => Some((entries, parkings)),
        _ => None,
    })
}

/// Most entries a history compacted under `limits` keeps (its marker included).
fn history_len_bound(def: &SagaDefinition, limits: &Limits) -> usize {
    let max = limits.max_history.max(Limits::MIN_HISTORY);
    let head = limits.history_head.min(max / 2);
    let pinned = 4 + 7 * def.step_slots();
    max.max(head + pinned + Limits::MIN_TAIL) + 1
}

/// A compacted saga (`saga`) against the same one never compacted (`whole`): everything but
/// the history is equal, the kept entries are the whole history's in order, the counts add up,
/// the facts derived from the history agree, and the bounds hold.
fn check_compaction(def: &SagaDefinition, limits: &Limits, saga: &Saga, whole: &Saga) {
    let strip = |s: &Saga| Saga {
        history: Vec::new(),
        ..s.clone()
    };
    assert_eq!(
        strip(saga),
        strip(whole),
        "compaction changed more than the history"
    );
    let markers: Vec<usize> = (0..saga.history.len())
        .filter(|&k| matches!(saga.history[k].what, Happening::Elided { .. }))
        .collect();
    assert!(markers.len() <= 1, "one marker at most: {markers:?}");
    let parked = |h: &HistoryEntry| matches!(h.what, Happening::Parked { .. });
    let kept: Vec<&HistoryEntry> = saga
        .history
        .iter()
        .filter(|h| !matches!(h.what, Happening::Elided { .. }))
        .collect();
    let mut rest = whole.history.iter();
    for h in &kept {
        assert!(
            rest.any(|w| w == *h),
            "{h:?} is not in the whole history, or out of order"
        );
    }
    assert_eq!(
        saga.logged(),
        whole.history.len() as u64,
        "kept + elided = logged"
    );
    let (elided, elided_parkings) = marker(saga).unwrap_or((0, 0));
    assert_eq!(kept.len() as u64 + elided, whole.history.len() as u64);
    let whole_parkings = whole.history.iter().filter(|h| parked(h)).count();
    assert_eq!(
        kept.iter().filter(|h| parked(h)).count() + elided_parkings as usize,
        whole_parkings
    );
    assert_eq!(saga.parkings() as usize, whole_parkings);
    if let Some(&m) = markers.first() {
        // The newest entries are all there, after the marker.
        let tail = &saga.history[m + 1..];
        assert_eq!(tail, &whole.history[whole.history.len() - tail.len()..]);
    }
    for i in 0..def.step_slots() {
        for compensation in [false, true] {
            assert_eq!(
                saga.attempts_in_budget(i, compensation),
                whole.attempts_in_budget(i, compensation),
                "budget of step {i} (compensation: {compensation})"
            );
        }
    }
    assert!(saga.history.len() <= history_len_bound(def, limits));
    assert!(encoded_len(saga) <= limits.snapshot_bound(def, saga.id.len(), saga.input.len()));
}

#[test]
fn a_two_mib_output_is_stored_as_a_visible_marker() {
    let def = order();
    let (mut saga, _) = start(&def);
    let huge = vec![b'x'; 2 * 1024 * 1024];
    assert_eq!(
        apply(&mut saga, &def, reply(CHARGE, 1, false, Ok(huge)), T0 + 1),
        vec![status("PENDING", "PAID"), fwd(RESERVE, 1), fwd(PREPARE, 1)],
        "the saga goes on"
    );
    assert_eq!(
        saga.steps[CHARGE].output.as_deref(),
        Some(&b"[output truncated: 2097152 bytes, cap 65536]"[..])
    );
    assert!(encoded_len(&saga) < 256 * 1024, "{}", encoded_len(&saga));
    // Within the cap, an output is kept whole; all of them together have a cap too, beyond
    // which the largest becomes a marker.
    let limits = Limits {
        max_total_output_bytes: 100_000,
        ..Limits::default()
    };
    let output = |b: u8| vec![b; 60_000];
    apply_limited(
        &mut saga,
        &def,
        reply(RESERVE, 1, false, Ok(output(b'r'))),
        T0 + 2,
        &limits,
    );
    assert_eq!(saga.steps[RESERVE].output, Some(output(b'r')));
    apply_limited(
        &mut saga,
        &def,
        reply(PREPARE, 1, false, Ok(output(b'p'))),
        T0 + 3,
        &limits,
    );
    let outputs: Vec<&[u8]> = saga
        .steps
        .iter()
        .filter_map(|s| s.output.as_deref())
        .collect();
    assert!(outputs.iter().map(|o| o.len()).sum::<usize>() <= 100_000);
    assert!(outputs
        .iter()
        .any(|o| o.starts_with(b"[output truncated: 60000 bytes")));
    assert!(outputs
        .iter()
        .any(|o| *o == output(b'r') || *o == output(b'p')));
}

#[test]
fn long_texts_are_cut_in_the_middle_at_char_boundaries_after_the_machine_decided() {
    let mut def = order();
    let kind = format!("refused_{}", "é".repeat(60));
    // The policy names the whole kind: the machine decides on it before it is truncated.
    def.steps[CHARGE].retry.non_retryable = vec![kind.clone()];
    let (mut saga, _) = start(&def);
    let message = format!("BEGIN{}END", "€".repeat(2_000));
    let failure = StepError {
        kind: kind.clone(),
        message: message.clone(),
    };
    apply(
        &mut saga,
        &def,
        reply(CHARGE, 1, false, Err(failure)),
        T0 + 1,
    );
    assert_eq!(
        saga.steps[CHARGE].phase,
        StepPhase::Failed,
        "not retried: the whole kind is non-retryable"
    );
    let stored = saga.steps[CHARGE].last_error.clone().unwrap();
    assert!(stored.kind.len() <= 64, "{}", stored.kind);
    assert!(stored.kind.starts_with("refused_é"), "{}", stored.kind);
    assert!(stored
        .kind
        .contains(&format!("[truncated, {} bytes]", kind.len())));
    assert!(stored.message.len() <= 2048);
    assert!(stored.message.starts_with("BEGIN€"));
    assert!(stored.message.ends_with("€END"), "the end stays readable");
    assert!(stored
        .message
        .contains(&format!(" … [truncated, {} bytes] … ", message.len())));
    // The journal holds the same texts; the reasons are cut to their own cap.
    assert!(saga.history.iter().any(|h| matches!(
        &h.what,
        Happening::AttemptFailed { kind, message, .. }
            if *kind == stored.kind && *message == stored.message
    )));
    let reason = saga.reason.clone().unwrap();
    assert!(reason.len() <= 1024, "{}", reason.len());
    assert!(reason.starts_with("step `charge` (payment.charge) failed: refused_"));
    assert!(reason.ends_with("€END"));
    // Bounding again changes nothing.
    let again = {
        let mut s = saga.clone();
        s.bound(&Limits::default());
        s
    };
    assert_eq!(again, saga);
}

/// The order saga parked on the prepare compensation (its policy allows `attempts`), at the
/// returned time.
fn parked_order(def: &SagaDefinition, limits: &Limits) -> (Saga, Millis) {
    let (mut saga, _) = start(def);
    apply_limited(&mut saga, def, ok(CHARGE, 1), T0 + 1, limits);
    apply_limited(&mut saga, def, ok(PREPARE, 1), T0 + 2, limits);
    apply_limited(
        &mut saga,
        def,
        err(RESERVE, 1, "out_of_stock"),
        T0 + 3,
        limits,
    );
    let mut now = T0 + 4;
    loop {
        let attempt = saga.steps[PREPARE].comp_attempt;
        let effects = apply_limited(
            &mut saga,
            def,
            comp_err(PREPARE, attempt, "unavailable"),
            now,
            limits,
        );
        if saga.phase == Phase::NeedsAttention {
            assert!(matches!(effects.first(), Some(Effect::Parked { .. })));
            return (saga, now);
        }
        now = saga.steps[PREPARE].due_at.unwrap();
        apply_limited(&mut saga, def, Event::Tick, now, limits);
    }
}

#[test]
fn five_hundred_interventions_keep_the_snapshot_bounded() {
    let def = order();
    let limits = Limits::default();
    let (mut saga, mut now) = parked_order(&def, &limits);
    let logged = saga.logged();
    let refused = |k: usize, text: &str| Intervention {
        id: format!("req-{k:03}-{text}"),
        // A parked saga cannot be cancelled: refused, journaled all the same.
        action: OperatorAction::Cancel,
        operator: format!("operator-{k}-{text}"),
        reason: format!("why-{k}-{text}"),
    };
    // Short texts: the entry count binds.
    for k in 0..250 {
        now += 1;
        apply(&mut saga, &def, Event::Intervene(refused(k, "")), now);
        assert!(saga.history.len() <= limits.max_history + 1);
    }
    assert_eq!(saga.history.len(), limits.max_history + 1);
    // Long texts (about 1 KiB each, just within the API's limit): the byte budget binds.
    let long = "é".repeat(495);
    for k in 250..500 {
        now += 1;
        apply(&mut saga, &def, Event::Intervene(refused(k, &long)), now);
        assert!(saga.history.len() <= limits.max_history + 1);
    }
    let size = encoded_len(&saga);
    assert!(size < 300 * 1024, "{size} bytes");
    assert!(size <= limits.snapshot_bound(&def, saga.id.len(), saga.input.len()));
    assert_eq!(saga.logged(), logged + 500);
    let (elided, parkings) = marker(&saga).expect("an Elided marker");
    assert_eq!(
        elided + (saga.history.len() as u64 - 1),
        saga.logged(),
        "kept + elided = logged"
    );
    assert_eq!(parkings, 0, "the parking is kept");
    assert_eq!(saga.parkings(), 1);
    assert!(saga.history.iter().any(|h| h
        .what
        .to_string()
        .starts_with(&format!("{elided} older entries elided"))));
    // The newest requests are still recognised when redelivered.
    assert_ignored(
        &mut saga,
        &def,
        Event::Intervene(refused(499, &long)),
        now + 1,
    );
    // The operator's retry still restores the status from before the parking, and the reason
    // from before it.
    let attempt = saga.steps[PREPARE].comp_attempt;
    assert_eq!(
        apply(
            &mut saga,
            &def,
            Event::Intervene(intervention(OperatorAction::Retry { step: None })),
            now + 2
        ),
        vec![
            unparked("retry"),
            status("NEEDS_ATTENTION", "PAID"),
            comp(PREPARE, attempt + 1)
        ]
    );
    assert_eq!(
        saga.reason.as_deref(),
        Some("step `reserve` (inventory.reserve) failed: out_of_stock: out_of_stock (test)")
    );
    assert_eq!(saga.attempts_in_budget(PREPARE, true), 1);
}

#[test]
fn parkings_and_retry_budgets_survive_compaction() {
    let mut def = order();
    def.steps[PREPARE].compensation_retry.max_attempts = 3;
    let limits = small_history();
    let (mut saga, mut now) = parked_order(&def, &limits);
    assert_eq!(saga.parkings(), 1);
    for parking in 2..=40u32 {
        // The operator retries: a fresh budget of three attempts, then parked again.
        let attempt = saga.steps[PREPARE].comp_attempt;
        now += 1_000;
        assert_eq!(
            apply_limited(
                &mut saga,
                &def,
                Event::Intervene(intervention(OperatorAction::Retry { step: None })),
                now,
                &limits,
            ),
            vec![
                unparked("retry"),
                status("NEEDS_ATTENTION", "PAID"),
                comp(PREPARE, attempt + 1)
            ],
            "parking {parking}"
        );
        for k in 1..=3 {
            assert_eq!(saga.attempts_in_budget(PREPARE, true), k);
            let attempt = saga.steps[PREPARE].comp_attempt;
            now += 1;
            let effects = apply_limited(
                &mut saga,
                &def,
                comp_err(PREPARE, attempt, "unavailable"),
                now,
                &limits,
            );
            if k < 3 {
                assert_eq!(effects, vec![]);
                now = saga.steps[PREPARE].due_at.unwrap();
                apply_limited(&mut saga, &def, Event::Tick, now, &limits);
            } else {
                let Some(Effect::Parked { count, .. }) = effects.first() else {
                    panic!("{effects:?}");
                };
                assert_eq!(*count, parking, "one dead letter per parking");
            }
        }
        assert_eq!(saga.parkings(), parking);
        assert!(saga.history.len() <= history_len_bound(&def, &limits));
    }
    let (elided, parkings) = marker(&saga).expect("compacted");
    assert!(elided > 300 && parkings > 30, "{elided} {parkings}");
    assert_eq!(saga.steps[PREPARE].comp_attempt, 40 * 3);
}

#[test]
fn logged_since_sees_what_a_transition_logged_across_compaction() {
    let def = order();
    let limits = small_history();
    let (mut saga, now) = parked_order(&def, &limits);
    for k in 0..100 {
        let before = saga.logged();
        apply_limited(
            &mut saga,
            &def,
            Event::Intervene(Intervention {
                id: format!("r{k}"),
                ..intervention(OperatorAction::Cancel)
            }),
            now + k,
            &limits,
        );
        let new = saga.logged_since(before);
        assert_eq!(new.len(), 1);
        assert!(matches!(&new[0].what, Happening::Intervened { id, .. } if *id == format!("r{k}")));
    }
    assert!(marker(&saga).is_some());
    assert!(saga.logged_since(saga.logged()).is_empty());
}

#[test]
fn small_snapshots_are_left_alone_and_bounding_is_idempotent() {
    let def = order();
    let (mut saga, _) = start(&def);
    apply(&mut saga, &def, ok(CHARGE, 1), T0 + 1);
    let before = saga.clone();
    saga.bound(&Limits::default());
    assert_eq!(saga, before);
    let (mut parked, _) = parked_order(&def, &small_history());
    let compacted = parked.clone();
    parked.bound(&small_history());
    assert_eq!(parked, compacted);
}

#[test]
fn the_default_limits_fit_a_nats_payload() {
    // Ten steps, each in its own stage, plus an after-compensation step; the API's largest
    // input (256 KiB) and saga id (128 bytes).
    let shape = Shape {
        stages: (0..10)
            .map(|_| vec![step_shape(Kind::Compensable)])
            .collect(),
        stage_status: vec![true; 4],
        after: Some(step_shape(Kind::ReadOnly)),
        deadline_ms: 60_000,
    };
    let bound = Limits::default().snapshot_bound(&build(&shape), 128, 256 * 1024);
    assert!(bound < 1024 * 1024, "{bound} bytes");
}

#[test]
fn the_elided_marker_reads_well() {
    let what = Happening::Elided {
        entries: 300,
        parkings: 2,
        since: 5,
    };
    assert_eq!(
        what.to_string(),
        "300 older entries elided to bound the snapshot (since 5; 2 parking(s) among them)"
    );
}

/// One event of a participant or an operator carrying texts of any size.
#[derive(Debug, Clone)]
enum Payload {
    Answer {
        pick: usize,
        success: bool,
        size: usize,
        kind_size: usize,
    },
    Advance {
        ms: u64,
    },
    Operator {
        kind: u8,
        pick: usize,
        size: usize,
    },
    Cancel {
        size: usize,
    },
}

/// A text of about `size` bytes of characters 1 to 4 bytes wide.
fn text_of(size: usize) -> String {
    "aé€😀".repeat(size / 10 + 1)
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0usize..200, 1 => 0usize..100_000]
}

fn payload_strategy() -> impl Strategy<Value = Payload> {
    prop_oneof![
        8 => (any::<usize>(), prop::bool::weighted(0.6), size_strategy(), size_strategy())
            .prop_map(|(pick, success, size, kind_size)| Payload::Answer { pick, success, size, kind_size }),
        3 => (0u64..=3_000).prop_map(|ms| Payload::Advance { ms }),
        3 => (0u8..6, any::<usize>(), size_strategy())
            .prop_map(|(kind, pick, size)| Payload::Operator { kind, pick, size }),
        1 => size_strategy().prop_map(|size| Payload::Cancel { size }),
    ]
}

fn limits_strategy() -> impl Strategy<Value = Limits> {
    (
        (
            0usize..=20_000,
            0usize..=60_000,
            0usize..=100,
            0usize..=3_000,
        ),
        (0usize..=2_000, 0usize..=100, 0usize..=40_000, 0usize..=40),
    )
        .prop_map(
            |(
                (max_output_bytes, max_total_output_bytes, max_error_kind_bytes, max_error_bytes),
                (max_text_bytes, max_history, max_history_bytes, history_head),
            )| Limits {
                max_output_bytes,
                max_total_output_bytes,
                max_error_kind_bytes,
                max_error_bytes,
                max_text_bytes,
                max_history,
                max_history_bytes,
                history_head,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn compacted_histories_drive_random_sagas_like_whole_ones(
        shape in shape_strategy(),
        env in environment_of(stubborn_move_strategy(), 400),
        max_history in 0usize..=48,
        history_head in 0usize..=10,
    ) {
        let limits = Limits { max_history, history_head, ..Limits::default() };
        let phase = run_with(&shape, &env, limits, true);
        prop_assert!(phase.is_terminal());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn snapshots_stay_under_their_bound_whatever_the_payloads(
        shape in shape_strategy(),
        payloads in prop::collection::vec(payload_strategy(), 0..=250),
        limits in limits_strategy(),
    ) {
        let def = build(&shape);
        let (mut saga, _) = Saga::start(&def, "saga-9".to_string(), text_of(1_000).into_bytes(), T0);
        let bound = limits.snapshot_bound(&def, saga.id.len(), saga.input.len());
        let text_cap = limits.max_text_bytes.max(Limits::MIN_TEXT_BYTES);
        let mut now = T0;
        for (n, p) in payloads.into_iter().enumerate() {
            let event = match p {
                Payload::Answer { pick, success, size, kind_size } => {
                    let in_flight = saga.in_flight();
                    if in_flight.is_empty() {
                        continue;
                    }
                    let c = in_flight[pick % in_flight.len()];
                    let outcome = if success {
                        Ok(text_of(size).into_bytes())
                    } else {
                        Err(StepError { kind: text_of(kind_size), message: text_of(size) })
                    };
                    reply(c.step, c.attempt, c.compensation, outcome)
                }
                Payload::Advance { ms } => {
                    now += ms as Millis;
                    Event::Tick
                }
                Payload::Operator { kind, pick, size } => {
                    let step = pick % def.step_slots();
                    let action = match kind {
                        0 => OperatorAction::Retry { step: None },
                        1 => OperatorAction::Retry { step: Some(step) },
                        2 => OperatorAction::Skip { step, output: text_of(size).into_bytes() },
                        3 => OperatorAction::Compensate,
                        4 => OperatorAction::Cancel,
                        _ => OperatorAction::Abandon,
                    };
                    Event::Intervene(Intervention {
                        id: format!("{n}-{}", text_of(size / 2)),
                        action,
                        operator: text_of(size),
                        reason: text_of(size),
                    })
                }
                Payload::Cancel { size } => Event::Cancel { reason: text_of(size) },
            };
            let logged = saga.logged();
            let t = saga.apply_with_limits(&def, event, now, &limits).unwrap();
            let size = encoded_len(&saga);
            prop_assert!(size <= bound, "{} bytes, bound {}", size, bound);
            prop_assert!(saga.history.len() <= history_len_bound(&def, &limits));
            prop_assert_eq!(
                saga.logged() - logged,
                saga.logged_since(logged).len() as u64,
                "every entry logged is counted and kept among the newest"
            );
            if !t.changed {
                prop_assert_eq!(saga.logged(), logged);
            }
            for e in &t.effects {
                if let Effect::Parked { reason, .. } | Effect::Unparked { request: reason, .. } = e {
                    prop_assert!(reason.len() <= text_cap);
                }
            }
        }
    }
}

/// A snapshot from elsewhere (an event's embedded copy, a hand-written bucket) is checked
/// before the machine runs it: out-of-range slots, stages, cursors and counters near overflow
/// are refused, so indexing into it cannot panic (fuzzing findings F2 and F3).
#[test]
fn snapshots_from_elsewhere_are_checked_against_their_definition() {
    let def = order();
    let (saga, _) = Saga::start(&def, "s-1".into(), b"{}".to_vec(), 0);
    assert_eq!(saga.consistent_with(&def), Ok(()));
    let broken: Vec<(Saga, &str)> = vec![
        (
            Saga {
                compensation_plan: Some(vec![0, 99]),
                ..saga.clone()
            },
            "compensation plan names step slot 99",
        ),
        (
            Saga {
                compensation_plan: Some(vec![0]),
                comp_cursor: 2,
                ..saga.clone()
            },
            "compensation cursor 2",
        ),
        (
            Saga {
                steps: saga.steps[..1].to_vec(),
                ..saga.clone()
            },
            "step states",
        ),
        (
            Saga {
                stage: 40,
                ..saga.clone()
            },
            "stage 40",
        ),
        (
            Saga {
                status_seq: u64::MAX,
                ..saga.clone()
            },
            "near overflow",
        ),
    ];
    for (s, why) in broken {
        let err = s.consistent_with(&def).expect_err(why);
        assert!(err.contains(why), "{err} does not say {why}");
    }
    let mut at_max = saga.clone();
    at_max.steps[0].attempt = u32::MAX;
    assert!(at_max.consistent_with(&def).is_err());
}
