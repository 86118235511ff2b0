//! The hand-made seeds of the corpus: valid messages as the node produces them and the hostile
//! cases of each format. `cargo run --example fuzz -- --write-seeds` writes them under
//! `tests/fuzz/corpus/<target>/seed-*`; they are code so that a format change regenerates them.

use prost::Message as _;
use sagaflow::bus::command_id;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::machine::{
    Effect, Event, Intervention, Limits, OperatorAction, Saga, StepError,
};
use sagaflow_actors::wire::{self, Control};
use sagaflow_proto::v1;

use super::gen::HOSTILE_IDS;
use super::targets::{definitions, EventCase};

/// One seed: target, file name (without the `seed-` prefix), bytes.
pub type Seed = (&'static str, String, Vec<u8>);

const P: u32 = 8;

fn reply(saga_id: &str, step: &str, attempt: u32, outcome: v1::reply::Outcome) -> v1::Reply {
    v1::Reply {
        command_id: command_id(saga_id, step, false, attempt),
        saga_id: saga_id.into(),
        step: step.into(),
        attempt,
        compensation: false,
        outcome: Some(outcome),
    }
}

fn success(output: &[u8]) -> v1::reply::Outcome {
    v1::reply::Outcome::Success(v1::Success {
        output: output.to_vec(),
    })
}

fn failure(kind: &str, message: &str) -> v1::reply::Outcome {
    v1::reply::Outcome::Failure(v1::Failure {
        kind: kind.into(),
        message: message.into(),
    })
}

fn event(subject: String, header: Option<&str>, payload: Vec<u8>) -> Vec<u8> {
    EventCase {
        partitions: P,
        subject,
        headers: header
            .map(|id| vec![("Sagaflow-Saga-Id".to_string(), id.to_string())])
            .unwrap_or_default(),
        payload,
    }
    .to_bytes()
}

fn subject(saga_id: &str, kind: &str) -> String {
    format!("sagaflow.evt.{}.{kind}", partition_of(saga_id, P))
}

/// A saga of `sagas/order.toml` after `events` (each at the next second).
fn order_saga(events: Vec<Event>, limits: &Limits) -> Saga {
    let def = &definitions()[0];
    let (mut saga, _) = Saga::start(
        def,
        "order-1".into(),
        br#"{"amount_cents":1200}"#.to_vec(),
        1_000,
    );
    for (i, e) in events.into_iter().enumerate() {
        let _ = saga.apply_with_limits(def, e, 2_000 + 1_000 * i as i64, limits);
    }
    saga
}

fn answer(
    step: usize,
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

fn declined() -> Result<Vec<u8>, StepError> {
    Err(StepError {
        kind: "declined".into(),
        message: "card refused".into(),
    })
}

/// Snapshots of the order saga in its main states.
fn snapshots() -> Vec<(&'static str, Saga)> {
    let d = Limits::default();
    let ok = || Ok(br#"{"ok":true}"#.to_vec());
    let failing = || {
        Err(StepError {
            kind: "unavailable".into(),
            message: "down".into(),
        })
    };
    // Compensation of `charge` failing until it parks the saga (20 attempts), then retried.
    let mut parking = vec![answer(0, 1, false, ok()), answer(1, 1, false, declined())];
    parking.extend((1..=3).map(|a| answer(2, a, false, ok())));
    parking.push(answer(3, 1, false, ok()));
    let mut parked_events = parking.clone();
    for attempt in 1..=20 {
        parked_events.push(answer(0, attempt, true, failing()));
        parked_events.push(Event::Tick);
    }
    let mut long = parked_events.clone();
    for i in 0..120 {
        long.push(Event::Intervene(Intervention {
            id: format!("req-{i}"),
            action: OperatorAction::Retry { step: None },
            operator: "op".into(),
            reason: "again".into(),
        }));
        long.push(answer(0, 1, true, failing()));
    }
    vec![
        ("started", order_saga(vec![], &d)),
        ("paid", order_saga(vec![answer(0, 1, false, ok())], &d)),
        (
            "completed",
            order_saga(
                vec![
                    answer(0, 1, false, ok()),
                    answer(1, 1, false, ok()),
                    answer(2, 1, false, ok()),
                    answer(3, 1, false, ok()),
                ],
                &d,
            ),
        ),
        (
            "compensating",
            order_saga(vec![answer(0, 1, false, declined())], &d),
        ),
        ("compensating2", order_saga(parking, &d)),
        ("parked", order_saga(parked_events, &d)),
        ("compacted", order_saga(long, &d)),
        (
            "cancelled",
            order_saga(
                vec![Event::Cancel {
                    reason: "customer".into(),
                }],
                &d,
            ),
        ),
    ]
}

/// Every seed.
pub fn seeds() -> Vec<Seed> {
    let mut out: Vec<Seed> = Vec::new();
    let def = &definitions()[0];
    let snapshots = snapshots();

    // events: replies as participants send them, controls as the node sends them.
    let ok = reply("order-1", "charge", 1, success(br#"{"charge_id":"c-1"}"#));
    out.push((
        "events",
        "reply-success".into(),
        event(subject("order-1", "reply"), None, ok.encode_to_vec()),
    ));
    out.push((
        "events",
        "reply-failure".into(),
        event(
            subject("order-1", "reply"),
            None,
            reply("order-1", "charge", 2, failure("declined", "no")).encode_to_vec(),
        ),
    ));
    let mut comp = reply("order-1", "charge", 1, success(b""));
    comp.compensation = true;
    comp.command_id = command_id("order-1", "charge", true, 1);
    out.push((
        "events",
        "reply-compensation".into(),
        event(subject("order-1", "reply"), None, comp.encode_to_vec()),
    ));
    out.push((
        "events",
        "reply-old-subject".into(),
        event(
            format!("sagaflow.evt.{}.order-1.reply", partition_of("order-1", P)),
            None,
            ok.encode_to_vec(),
        ),
    ));
    out.push((
        "events",
        "reply-wrong-partition".into(),
        event(
            format!(
                "sagaflow.evt.{}.reply",
                (partition_of("order-1", P) + 1) % P
            ),
            None,
            ok.encode_to_vec(),
        ),
    ));
    out.push((
        "events",
        "reply-partition-beyond".into(),
        event(format!("sagaflow.evt.{P}.reply"), None, ok.encode_to_vec()),
    ));
    out.push((
        "events",
        "reply-plus-partition".into(),
        event(
            format!("sagaflow.evt.+{}.reply", partition_of("order-1", P)),
            None,
            ok.encode_to_vec(),
        ),
    ));
    let mut forged = ok.clone();
    forged.command_id = command_id("order-2", "charge", false, 1);
    out.push((
        "events",
        "reply-forged-command-id".into(),
        event(subject("order-1", "reply"), None, forged.encode_to_vec()),
    ));
    let encoded = ok.encode_to_vec();
    out.push((
        "events",
        "reply-truncated".into(),
        event(
            subject("order-1", "reply"),
            None,
            encoded[..encoded.len() / 2].to_vec(),
        ),
    ));
    out.push((
        "events",
        "reply-garbage".into(),
        event(subject("order-1", "reply"), None, b"\xff\xff\xff".to_vec()),
    ));
    out.push((
        "events",
        "reply-no-outcome".into(),
        event(
            subject("order-1", "reply"),
            None,
            v1::Reply {
                outcome: None,
                ..ok.clone()
            }
            .encode_to_vec(),
        ),
    ));
    for (i, id) in HOSTILE_IDS
        .iter()
        .copied()
        .chain([&*"Z".repeat(5_000)])
        .enumerate()
    {
        let bad = reply(id, "charge", 1, success(b""));
        out.push((
            "events",
            format!("reply-hostile-id-{i:02}"),
            event("sagaflow.evt.0.reply".into(), None, bad.encode_to_vec()),
        ));
        let cancel = wire::encode_control(&Control::Cancel {
            reason: "r".into(),
            at: 1,
        })
        .unwrap_or_default();
        out.push((
            "events",
            format!("cancel-hostile-id-{i:02}"),
            event("sagaflow.evt.0.cancel".into(), Some(id), cancel),
        ));
    }
    let (started, _) = Saga::start(def, "order-1".into(), b"{}".to_vec(), 7);
    let controls = [
        ("start", "start", Control::Started { at: 7 }),
        (
            "created",
            "start",
            Control::Created {
                at: 7,
                revision: 4,
                snapshot: wire::encode_snapshot(&started).unwrap_or_default(),
                commands_sent: true,
            },
        ),
        (
            "created-garbage",
            "start",
            Control::Created {
                at: 7,
                revision: 4,
                snapshot: vec![9, 9],
                commands_sent: false,
            },
        ),
        (
            "cancel",
            "cancel",
            Control::Cancel {
                reason: "customer".into(),
                at: 8,
            },
        ),
        (
            "cancel-long-reason",
            "cancel",
            Control::Cancel {
                reason: "r".repeat(1_025),
                at: 8,
            },
        ),
        (
            "intervene",
            "intervene",
            Control::Intervene {
                intervention: Intervention {
                    id: "req-1".into(),
                    action: OperatorAction::Skip {
                        step: 9,
                        output: b"{}".to_vec(),
                    },
                    operator: "ops".into(),
                    reason: "manual".into(),
                },
                at: 9,
            },
        ),
    ];
    for (name, kind, c) in controls {
        let bytes = wire::encode_control(&c).unwrap_or_default();
        out.push((
            "events",
            name.to_string(),
            event(subject("order-1", kind), Some("order-1"), bytes.clone()),
        ));
        out.push(("control", name.to_string(), bytes));
    }
    out.push((
        "events",
        "cancel-no-header".into(),
        event(subject("order-1", "cancel"), None, vec![0, 1, 1, b'x', 10]),
    ));
    out.push((
        "events",
        "cancel-two-ids".into(),
        event(
            format!("sagaflow.evt.{}.order-2.cancel", partition_of("order-2", P)),
            Some("order-1"),
            vec![0, 1, 1, b'x', 10],
        ),
    ));
    out.push((
        "events",
        "subject-garbage".into(),
        event("other.evt.3.reply".into(), None, Vec::new()),
    ));
    out.push((
        "events",
        "subject-short".into(),
        event("sagaflow.evt.3".into(), None, Vec::new()),
    ));
    out.push((
        "events",
        "subject-newline".into(),
        event("sagaflow.evt.3.re\nply".into(), None, Vec::new()),
    ));
    out.push((
        "events",
        "unknown-kind".into(),
        event(subject("order-1", "bogus"), Some("order-1"), Vec::new()),
    ));
    out.push(("events", "empty".into(), Vec::new()));

    // snapshot and control.
    for (name, saga) in &snapshots {
        let bytes = wire::encode_snapshot(saga).unwrap_or_default();
        out.push(("snapshot", name.to_string(), bytes.clone()));
        out.push((
            "snapshot",
            format!("{name}-truncated"),
            bytes[..bytes.len() * 2 / 3].to_vec(),
        ));
        out.push((
            "control",
            format!("created-{name}"),
            wire::encode_control(&Control::Created {
                at: 1,
                revision: 2,
                snapshot: bytes,
                commands_sent: false,
            })
            .unwrap_or_default(),
        ));
    }
    for (name, bytes) in [
        ("garbage", b"\xff\xff\xff".to_vec()),
        ("empty", Vec::new()),
        ("unknown-version", vec![1, 0, 2]),
        ("huge-length", vec![0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        (
            "overlong-varint",
            vec![
                0, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ],
        ),
    ] {
        out.push(("snapshot", name.into(), bytes.clone()));
        out.push(("control", name.into(), bytes));
    }

    // command: commands as the node builds them, and hostile ones.
    let (saga, t) = Saga::start(
        def,
        "order-1".into(),
        br#"{"amount_cents":1200}"#.to_vec(),
        1_000,
    );
    for effect in &t.effects {
        if let Effect::Send(spec) = effect {
            if let Some((_, cmd)) = sagaflow::bus::build_command(def, &saga, *spec, P) {
                out.push(("command", "node-built".into(), cmd.encode_to_vec()));
                for (i, subject) in [
                    "sagaflow.evt.+5.reply",
                    "sagaflow.evt.007.reply",
                    "sagaflow.evt.4294967296.reply",
                    "sagaflow.evt.1.reply.x",
                    "$JS.API.STREAM.DELETE.SAGA_EVENTS",
                    "sagaflow.cmd.payment.charge",
                    "",
                ]
                .iter()
                .enumerate()
                {
                    let bad = v1::Command {
                        reply_subject: (*subject).into(),
                        ..cmd.clone()
                    };
                    out.push(("command", format!("reply-subject-{i}"), bad.encode_to_vec()));
                }
                for (i, id) in HOSTILE_IDS
                    .iter()
                    .copied()
                    .chain([&*"Z".repeat(5_000)])
                    .enumerate()
                {
                    let bad = v1::Command {
                        saga_id: id.into(),
                        command_id: command_id(id, &cmd.step, false, 1),
                        ..cmd.clone()
                    };
                    out.push(("command", format!("hostile-id-{i:02}"), bad.encode_to_vec()));
                }
                let encoded = cmd.encode_to_vec();
                out.push((
                    "command",
                    "truncated".into(),
                    encoded[..encoded.len() / 2].to_vec(),
                ));
            }
        }
    }
    out.push(("command", "garbage".into(), b"\xff\xff\xff".to_vec()));

    // definition: the shipped files and broken variants.
    let order = include_str!("../../sagas/order.toml");
    let trip = include_str!("../../sagas/trip.toml");
    let broken: Vec<(&str, String)> = vec![
        ("order", order.to_string()),
        ("trip", trip.to_string()),
        ("empty", String::new()),
        ("crlf", order.replace('\n', "\r\n")),
        ("bom", format!("\u{feff}{order}")),
        ("no-trailing-newline", order.trim_end().to_string()),
        (
            "unterminated-string",
            order.replace("name = \"order\"", "name = \"order"),
        ),
        (
            "duplicate-key",
            order.replace("deadline = \"5m\"", "deadline = \"5m\"\ndeadline = \"6m\""),
        ),
        ("bad-duration", order.replace("\"5m\"", "\"5 fortnights\"")),
        (
            "no-compensation",
            order.replace("compensation = \"payment.refund\"\n", ""),
        ),
        (
            "duplicate-step",
            order.replace("name = \"reserve\"", "name = \"charge\""),
        ),
        ("unknown-key", format!("{order}\nsurprise = 1\n")),
        ("stage-only", "[[stage]]".into()),
        (
            "error-on-last-line",
            format!("{}\nname = ", order.trim_end()),
        ),
        (
            "tabs-and-unicode",
            order.replace("name = \"order\"", "\tname\t=\t\"ördér 💥\""),
        ),
        (
            "huge-integer",
            order.replace("max_attempts = 5", "max_attempts = 99999999999999999999"),
        ),
        ("deep-inline", format!("{order}\nx = {}\n", "[".repeat(200))),
    ];
    for (name, text) in broken {
        out.push(("definition", name.into(), text.into_bytes()));
    }
    out
}
