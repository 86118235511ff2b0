//! Tests of wait steps (`wait_for`) and signals: before, during and after the wait,
//! duplicates, timeouts, and what a wait step refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::*;
use crate::definition::SagaDefinition;

const T0: Millis = 1_700_000_000_000;
const SHIP: StepIndex = 0;
const DELIVERED: StepIndex = 1;
const NOTIFY: StepIndex = 2;

/// The shipped example (`sagas/delivery.toml`): ship, wait for `delivery.confirmed`, notify.
fn delivery() -> SagaDefinition {
    crate::definition::parse(
        include_str!("../../../sagas/delivery.toml"),
        Path::new("sagas/delivery.toml"),
    )
    .expect("a valid saga")
}

fn signal(id: &str, payload: &str) -> Event {
    Event::Signal {
        id: id.into(),
        name: "delivery.confirmed".into(),
        payload: payload.as_bytes().to_vec(),
    }
}

fn shipped(def: &SagaDefinition) -> (Saga, Transition) {
    let (mut saga, _) = Saga::start(def, "d-1".into(), b"{}".to_vec(), T0);
    let t = saga
        .apply(
            def,
            Event::Reply {
                step: SHIP,
                attempt: 1,
                compensation: false,
                outcome: Ok(Vec::new()),
            },
            T0 + 1,
        )
        .unwrap();
    (saga, t)
}

fn sends(t: &Transition) -> Vec<CommandSpec> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(spec) => Some(*spec),
            _ => None,
        })
        .collect()
}

#[test]
fn a_wait_sends_nothing_and_its_signal_ends_it() {
    let def = delivery();
    let (mut saga, t) = shipped(&def);
    assert!(sends(&t).is_empty(), "a wait step sends no command: {t:?}");
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Waiting);
    assert_eq!(saga.status, "IN_TRANSIT", "the shipment stage's status");
    assert!(
        saga.in_flight().is_empty(),
        "nothing to publish again after a crash"
    );
    let wait = i64::try_from(def.steps[DELIVERED].timeout.as_millis()).unwrap();
    assert_eq!(
        saga.next_wakeup(),
        Some(T0 + 1 + wait),
        "its timeout is due"
    );
    assert!(saga
        .history
        .iter()
        .any(|h| h.what.to_string() == "waiting for signal `delivery.confirmed`"));

    let t = saga
        .apply(&def, signal("s-1", r#"{"by":"ann"}"#), T0 + 50)
        .unwrap();
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Succeeded);
    assert_eq!(
        saga.steps[DELIVERED].output.as_deref(),
        Some(&br#"{"by":"ann"}"#[..])
    );
    assert_eq!(saga.status, "IN_TRANSIT");
    assert_eq!(
        sends(&t),
        [CommandSpec {
            step: NOTIFY,
            compensation: false,
            attempt: 1
        }]
    );
    // The same signal again changes nothing.
    let again = saga.apply(&def, signal("s-1", "{}"), T0 + 60).unwrap();
    assert!(!again.changed && again.effects.is_empty());
}

#[test]
fn a_signal_before_the_wait_is_kept_for_it() {
    let def = delivery();
    let (mut saga, _) = Saga::start(&def, "d-2".into(), b"{}".to_vec(), T0);
    let t = saga.apply(&def, signal("early", "1"), T0 + 5).unwrap();
    assert!(t.changed && sends(&t).is_empty());
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Pending);
    assert!(saga.history.iter().any(|h| matches!(
        &h.what,
        Happening::SignalReceived { kept: true, id, .. } if id == "early"
    )));
    // Once the shipment is done the wait ends at once and the saga goes on.
    let t = saga
        .apply(
            &def,
            Event::Reply {
                step: SHIP,
                attempt: 1,
                compensation: false,
                outcome: Ok(Vec::new()),
            },
            T0 + 10,
        )
        .unwrap();
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Succeeded);
    assert_eq!(saga.steps[DELIVERED].output.as_deref(), Some(&b"1"[..]));
    assert_eq!(sends(&t).len(), 1, "{t:?}");
    assert_eq!(sends(&t)[0].step, NOTIFY);
    // A second, different signal of the same name has no step left to go to.
    saga.apply(&def, signal("late", "2"), T0 + 20).unwrap();
    assert!(saga.history.iter().any(|h| matches!(
        &h.what,
        Happening::SignalIgnored { id, .. } if id == "late"
    )));
    assert_eq!(saga.steps[DELIVERED].output.as_deref(), Some(&b"1"[..]));
}

#[test]
fn no_signal_in_time_fails_the_step_and_compensates() {
    let def = delivery();
    let (mut saga, _) = shipped(&def);
    let due = saga.next_wakeup().unwrap();
    let t = saga.apply(&def, Event::Tick, due - 1).unwrap();
    assert!(!t.changed, "not due yet");
    let t = saga.apply(&def, Event::Tick, due).unwrap();
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Failed);
    assert_eq!(saga.phase, Phase::Compensating);
    assert!(
        saga.reason
            .as_deref()
            .unwrap()
            .contains("no signal `delivery.confirmed` within"),
        "{:?}",
        saga.reason
    );
    assert_eq!(
        sends(&t),
        [CommandSpec {
            step: SHIP,
            compensation: true,
            attempt: 1
        }],
        "the shipment is undone"
    );
    // A signal now finds no wait: ignored, recorded.
    saga.apply(&def, signal("too-late", "{}"), due + 5).unwrap();
    assert!(matches!(
        saga.history.last().unwrap().what,
        Happening::SignalIgnored { .. }
    ));
}

#[test]
fn a_cancel_ends_the_wait_and_a_finished_saga_ignores_signals() {
    let def = delivery();
    let (mut saga, _) = shipped(&def);
    saga.apply(
        &def,
        Event::Cancel {
            reason: "customer".into(),
        },
        T0 + 20,
    )
    .unwrap();
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Failed);
    assert_eq!(
        saga.steps[DELIVERED].due_at, None,
        "the wait's timeout is no longer due"
    );
    saga.apply(
        &def,
        Event::Reply {
            step: SHIP,
            attempt: 1,
            compensation: true,
            outcome: Ok(Vec::new()),
        },
        T0 + 30,
    )
    .unwrap();
    assert_eq!(saga.phase, Phase::Compensated);
    assert_eq!(saga.status, "RETURNED");
    let t = saga.apply(&def, signal("s-9", "{}"), T0 + 40).unwrap();
    assert!(!t.changed);
}

#[test]
fn a_reply_naming_a_wait_step_is_refused_and_an_operator_can_settle_the_wait() {
    let def = delivery();
    let (mut saga, _) = shipped(&def);
    let forged = saga.reply_fit(&def, DELIVERED, 1, false, &Ok(Vec::new()), &Limits::DEFAULT);
    assert!(
        matches!(&forged, ReplyFit::Unsent(why) if why.contains("waits for signal")),
        "{forged:?}"
    );
    // Retry waits again with a fresh timeout; skip settles it with the operator's result.
    let retry = OperatorAction::Retry {
        step: Some(DELIVERED),
    };
    assert_eq!(saga.check(&def, &retry), Ok(vec![DELIVERED]));
    let skip = OperatorAction::Skip {
        step: DELIVERED,
        output: br#"{"by":"ops"}"#.to_vec(),
    };
    assert_eq!(saga.check(&def, &skip), Ok(vec![DELIVERED]));
    saga.apply(
        &def,
        Event::Intervene(Intervention {
            id: "op-1".into(),
            action: skip,
            operator: "ops".into(),
            reason: "confirmed by phone".into(),
        }),
        T0 + 100,
    )
    .unwrap();
    assert_eq!(saga.steps[DELIVERED].phase, StepPhase::Succeeded);
    assert_eq!(saga.steps[NOTIFY].phase, StepPhase::Running);
}
