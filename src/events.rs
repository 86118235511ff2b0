//! Saga events in: the durable pull consumer of each partition of `SAGA_EVENTS` and the
//! decoding of its messages into coordinator inputs. The partitions a node consumes are
//! decided by [`crate::cluster`].
//!
//! A message that cannot be decoded (bad subject, bad protobuf, bad postcard) goes to the DLQ
//! with the reason and is acked: it never crashes the node and is never dropped silently.
//! Decoded events are acked by the saga actor once their effects are durable.

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use prost::Message as _;
use sagaflow_actors::coordinator::Input;
use sagaflow_actors::machine::StepError;
use sagaflow_actors::wire::{self, Control};
use sagaflow_proto::v1;

use sagaflow_actors::hash::partition_of;
use sagaflow_actors::ids;

use crate::bus::command_id;
use crate::config::ConsumerConfig;
use crate::topology::{partition_filter, EVENTS_STREAM, SAGA_ID_HEADER};

/// Name of the durable consumer of one partition.
pub fn consumer_name(partition: u32) -> String {
    format!("evt-p{partition}")
}

/// Why an inbound event was refused: a stable label (the `reason` of the
/// `sagaflow_events_refused_total` metric) and the precise reason the dead letter carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Metric label: `subject`, `undecodable`, `saga_id`, `partition`, `command_id` or
    /// `field`.
    pub label: &'static str,
    /// What exactly is wrong (short, printable: ids are quoted with [`ids::quote`]).
    pub detail: String,
}

impl Refusal {
    fn new(label: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            label,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Control events: the kinds that name their saga in a header.
pub use sagaflow_proto::subjects::CONTROL_KINDS;

/// Largest signal payload accepted (the API refuses larger ones first).
pub const MAX_SIGNAL_PAYLOAD: usize = 64 * 1024;

/// Decodes and checks a saga event from its subject, headers and payload, for a deployment of
/// `partitions` partitions.
///
/// Subjects are `sagaflow.evt.<partition>.<kind>`: a reply names its saga in its payload, a
/// control event in the [`SAGA_ID_HEADER`] header. Events published by older versions named the
/// saga in the subject too (`sagaflow.evt.<partition>.<saga_id>.<kind>`) and still decode.
///
/// Nothing of an event is used before it passed every check: the saga id by the API's rule
/// ([`ids::valid_saga_id`]), the partition in the subject equal to the saga's, a reply's
/// `command_id` equal to the id of the attempt it claims to answer, its step name, attempt and
/// error kind well-formed, a control event's texts bounded. Whether the attempt was really sent
/// is the saga actor's check (it needs the snapshot).
pub fn decode(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    partitions: u32,
) -> Result<(String, Input), Refusal> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let mut service = None;
    let (partition, in_subject, kind) = match tokens.as_slice() {
        ["sagaflow", "evt", p, kind] => (*p, None, *kind),
        // A reply naming its service (`sagaflow.evt.<p>.reply.<service>`).
        ["sagaflow", "evt", p, "reply", s] if !CONTROL_KINDS.contains(s) && *s != "reply" => {
            if !ids::valid_id(s, ids::MAX_STEP_NAME) {
                return Err(Refusal::new(
                    "subject",
                    format!(
                        "reply subject {} names no valid service",
                        ids::quote(subject)
                    ),
                ));
            }
            service = Some(s.to_string());
            (*p, None, "reply")
        }
        ["sagaflow", "evt", p, saga_id, kind] => (*p, Some(*saga_id), *kind),
        _ => {
            return Err(Refusal::new(
                "subject",
                format!("unexpected event subject {}", ids::quote(subject)),
            ))
        }
    };
    let partition = Some(partition)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| *p < partitions.max(1))
        .ok_or_else(|| {
            Refusal::new(
                "subject",
                format!(
                    "event subject {} names no partition of 0..{partitions}",
                    ids::quote(subject)
                ),
            )
        })?;
    let in_header = crate::telemetry::header(headers, SAGA_ID_HEADER);
    let named = |id: Option<&str>| -> Result<String, Refusal> {
        let id = match (id.filter(|i| !i.is_empty()), in_subject) {
            (Some(id), Some(s)) if id != s => {
                return Err(Refusal::new(
                    "saga_id",
                    format!(
                        "event for saga {} published on the subject of saga {}",
                        ids::quote(id),
                        ids::quote(s)
                    ),
                ))
            }
            (Some(id), _) | (None, Some(id)) => id,
            (None, None) if kind == "reply" => {
                return Err(Refusal::new(
                    "saga_id",
                    "reply names no saga (field `saga_id` of the Reply is empty)",
                ))
            }
            (None, None) => {
                return Err(Refusal::new(
                    "saga_id",
                    format!("`{kind}` event names no saga (header `{SAGA_ID_HEADER}`)"),
                ))
            }
        };
        if let Some(problem) = ids::saga_id_problem(id) {
            return Err(Refusal::new("saga_id", problem));
        }
        let owner = partition_of(id, partitions);
        if owner != partition {
            return Err(Refusal::new(
                "partition",
                format!(
                    "event for saga `{id}` published on partition {partition}; the saga belongs to partition {owner}"
                ),
            ));
        }
        Ok(id.to_string())
    };
    let input = match kind {
        "reply" => {
            let reply = v1::Reply::decode(payload)
                .map_err(|e| Refusal::new("undecodable", format!("undecodable reply: {e}")))?;
            let saga_id = named(Some(&reply.saga_id))?;
            check_reply(&saga_id, &reply)?;
            let outcome = match reply.outcome {
                Some(v1::reply::Outcome::Success(s)) => Ok(s.output),
                Some(v1::reply::Outcome::Failure(f)) => Err(StepError {
                    kind: f.kind,
                    message: f.message,
                }),
                None => return Err(Refusal::new("field", "reply has no outcome")),
            };
            (
                saga_id,
                Input::Reply {
                    service,
                    step: reply.step,
                    attempt: reply.attempt,
                    compensation: reply.compensation,
                    outcome,
                },
            )
        }
        "start" | "cancel" | "intervene" | "signal" => {
            let saga_id = named(in_header)?;
            let control = wire::decode_control(payload)
                .map_err(|e| Refusal::new("undecodable", e.to_string()))?;
            let input = match control {
                Control::Started { .. } => Input::Started,
                // The embedded snapshot only spares the owner a read: if it does not decode,
                // the owner reads the stored one instead (nothing is lost).
                Control::Created {
                    revision,
                    snapshot,
                    commands_sent,
                    ..
                } => match wire::decode_snapshot(&snapshot) {
                    Ok(saga) if saga.id == saga_id => Input::Created {
                        saga: Box::new(saga),
                        revision,
                        commands_sent,
                    },
                    _ => Input::Started,
                },
                Control::Cancel { reason, .. } => {
                    text("cancel reason", &reason, false)?;
                    Input::Cancel { reason }
                }
                Control::Intervene { intervention, .. } => {
                    text("intervention id", &intervention.id, true)?;
                    text("intervention operator", &intervention.operator, false)?;
                    text("intervention reason", &intervention.reason, false)?;
                    Input::Intervene(intervention)
                }
                Control::Signal {
                    id, name, payload, ..
                } => {
                    if !ids::valid_id(&id, ids::MAX_SAGA_ID) {
                        return Err(Refusal::new(
                            "field",
                            format!("signal id {} is not an id", ids::quote(&id)),
                        ));
                    }
                    if !sagaflow_actors::definition::valid_signal_name(&name) {
                        return Err(Refusal::new(
                            "field",
                            format!("signal name {} is not a signal name", ids::quote(&name)),
                        ));
                    }
                    if payload.len() > MAX_SIGNAL_PAYLOAD {
                        return Err(Refusal::new(
                            "field",
                            format!(
                                "signal payload of {} bytes is over {MAX_SIGNAL_PAYLOAD}",
                                payload.len()
                            ),
                        ));
                    }
                    Input::Signal { id, name, payload }
                }
            };
            (saga_id, input)
        }
        other => {
            return Err(Refusal::new(
                "subject",
                format!("unknown event kind {}", ids::quote(other)),
            ))
        }
    };
    Ok(input)
}

/// A reply's own fields: a step name, an attempt from 1, an error kind, and a `command_id` that
/// is the id of the attempt it claims to answer.
fn check_reply(saga_id: &str, reply: &v1::Reply) -> Result<(), Refusal> {
    if !ids::valid_id(&reply.step, ids::MAX_STEP_NAME) {
        return Err(Refusal::new(
            "field",
            format!(
                "reply's step {} is not a step name (1 to {} characters of A-Z, a-z, 0-9, `_`, `-`)",
                ids::quote(&reply.step),
                ids::MAX_STEP_NAME
            ),
        ));
    }
    if reply.attempt == 0 {
        return Err(Refusal::new(
            "field",
            "reply's attempt is 0 (attempts count from 1)",
        ));
    }
    if let Some(v1::reply::Outcome::Failure(f)) = &reply.outcome {
        if f.kind.is_empty() || !ids::valid_text(&f.kind, ids::MAX_ERROR_KIND) {
            return Err(Refusal::new(
                "field",
                format!(
                    "reply's failure kind {} must be 1 to {} printable bytes",
                    ids::quote(&f.kind),
                    ids::MAX_ERROR_KIND
                ),
            ));
        }
    }
    let expected = command_id(saga_id, &reply.step, reply.compensation, reply.attempt);
    if reply.command_id != expected {
        return Err(Refusal::new(
            "command_id",
            format!(
                "reply's command_id {} is not the command it claims to answer (`{expected}`)",
                ids::quote(&reply.command_id)
            ),
        ));
    }
    Ok(())
}

/// A control event's free text: at most [`ids::MAX_TEXT`] bytes, no control characters, and
/// not empty when `required`.
fn text(field: &str, value: &str, required: bool) -> Result<(), Refusal> {
    if (required && value.is_empty()) || !ids::valid_text(value, ids::MAX_TEXT) {
        let what = if required { "1" } else { "0" };
        return Err(Refusal::new(
            "field",
            format!(
                "{field} must be {what} to {} bytes without control characters (got {} bytes)",
                ids::MAX_TEXT,
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Creates (or updates) the durable consumer of `partition`.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    partition: u32,
    cfg: &ConsumerConfig,
) -> Result<consumer::PullConsumer, crate::consume::OpenError> {
    crate::consume::open_durable(
        js,
        EVENTS_STREAM,
        consumer::pull::Config {
            durable_name: Some(consumer_name(partition)),
            description: Some(format!("saga events of partition {partition}")),
            filter_subject: partition_filter(partition),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.event_ack_wait,
            // JetStream never gives up on a saga event; the node does, after
            // `consumers.event_max_deliver` deliveries that failed for a transient reason
            // (dead-lettered with the last error, see the coordinator's `retry_later`).
            max_deliver: -1,
            max_ack_pending: cfg.max_ack_pending,
            ..Default::default()
        },
    )
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const P: u32 = 8;

    /// The subject of `saga_id`'s `kind` events (today's form, or the old one with the id).
    fn subject(saga_id: &str, kind: &str) -> String {
        crate::topology::event_subject(partition_of(saga_id, P), kind)
    }

    fn old_subject(saga_id: &str, kind: &str) -> String {
        format!("sagaflow.evt.{}.{saga_id}.{kind}", partition_of(saga_id, P))
    }

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

    fn success() -> v1::reply::Outcome {
        v1::reply::Outcome::Success(v1::Success { output: Vec::new() })
    }

    fn refusal(subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> Refusal {
        decode(subject, headers, payload, P).unwrap_err()
    }

    #[test]
    fn a_reply_subject_names_its_service() {
        let home = partition_of("order-1", P);
        let ok = v1::Reply {
            command_id: crate::bus::command_id("order-1", "charge", false, 1),
            saga_id: "order-1".into(),
            step: "charge".into(),
            attempt: 1,
            compensation: false,
            outcome: Some(v1::reply::Outcome::Success(v1::Success { output: vec![] })),
        }
        .encode_to_vec();
        let subject = crate::topology::reply_subject(home, "payment");
        assert_eq!(subject, format!("sagaflow.evt.{home}.reply.payment"));
        let (_, input) = decode(&subject, None, &ok, P).unwrap();
        assert!(
            matches!(&input, Input::Reply { service: Some(s), .. } if s == "payment"),
            "{input:?}"
        );
        // The older subject names no service.
        let (_, input) =
            decode(&crate::topology::event_subject(home, "reply"), None, &ok, P).unwrap();
        assert!(matches!(input, Input::Reply { service: None, .. }));
        // A service token that is not a name is refused.
        let bad = format!("sagaflow.evt.{home}.reply.pay$ment");
        assert_eq!(refusal(&bad, None, &ok).label, "subject");
    }

    #[test]
    fn decodes_replies_and_controls() {
        let declined = reply(
            "order-1",
            "charge",
            2,
            v1::reply::Outcome::Failure(v1::Failure {
                kind: "declined".into(),
                message: "no".into(),
            }),
        );
        let (id, input) = decode(
            &old_subject("order-1", "reply"),
            None,
            &declined.encode_to_vec(),
            P,
        )
        .unwrap();
        assert_eq!(id, "order-1");
        assert_eq!(
            input,
            Input::Reply {
                service: None,
                step: "charge".into(),
                attempt: 2,
                compensation: false,
                outcome: Err(StepError {
                    kind: "declined".into(),
                    message: "no".into()
                })
            }
        );
        let start = wire::encode_control(&Control::Started { at: 1 }).unwrap();
        assert_eq!(
            decode(&old_subject("order-1", "start"), None, &start, P)
                .unwrap()
                .1,
            Input::Started
        );
    }

    #[test]
    fn a_created_event_carries_its_snapshot_or_falls_back_to_a_read() {
        let def = sagaflow_actors::definition::parse(
            include_str!("../sagas/order.toml"),
            std::path::Path::new("sagas/order.toml"),
        )
        .unwrap();
        let (saga, _) =
            sagaflow_actors::machine::Saga::start(&def, "order-1".into(), b"{}".to_vec(), 7);
        let created = |snapshot: Vec<u8>| {
            wire::encode_control(&Control::Created {
                at: 7,
                revision: 4,
                snapshot,
                commands_sent: true,
            })
            .unwrap()
        };
        let good = created(wire::encode_snapshot(&saga).unwrap());
        assert_eq!(
            decode(&old_subject("order-1", "start"), None, &good, P)
                .unwrap()
                .1,
            Input::Created {
                saga: Box::new(saga.clone()),
                revision: 4,
                commands_sent: true,
            }
        );
        // Another saga's snapshot, or bytes that are no snapshot: the owner reads the store.
        assert_eq!(
            decode(&old_subject("order-2", "start"), None, &good, P)
                .unwrap()
                .1,
            Input::Started
        );
        assert_eq!(
            decode(
                &old_subject("order-1", "start"),
                None,
                &created(vec![9, 9]),
                P
            )
            .unwrap()
            .1,
            Input::Started
        );
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        let r = refusal(&old_subject("order-1", "reply"), None, b"\xff\xff\xff");
        assert_eq!(r.label, "undecodable");
        assert!(r.detail.contains("undecodable reply"), "{r}");
        assert_eq!(refusal("sagaflow.evt.3", None, b"").label, "subject");
        assert_eq!(
            refusal("sagaflow.evt.3.order-1.reply.x", None, b"").label,
            "subject"
        );
        assert_eq!(refusal("other.evt.3.reply", None, b"").label, "subject");
        // A partition is digits only: `+3` parses as a u32 but no consumer reads its subject.
        assert_eq!(refusal("sagaflow.evt.+3.reply", None, b"").label, "subject");
        let r = refusal(&old_subject("order-1", "bogus"), None, b"");
        assert!(r.detail.contains("unknown event kind"), "{r}");
        let other = reply("order-2", "charge", 1, success());
        let r = refusal(
            &old_subject("order-1", "reply"),
            None,
            &other.encode_to_vec(),
        );
        assert!(r.detail.contains("order-2"), "{r}");
        assert!(decode(&old_subject("order-1", "start"), None, b"\x07", P).is_err());
    }

    /// Today's subjects carry no saga id: a reply names its saga in its payload, a control
    /// event in a header; an event that names no saga, or two different ones, is refused.
    #[test]
    fn events_name_their_saga_in_the_payload_or_a_header() {
        let ok = reply("order-1", "charge", 1, success());
        let (id, input) =
            decode(&subject("order-1", "reply"), None, &ok.encode_to_vec(), P).unwrap();
        assert_eq!(id, "order-1");
        assert!(matches!(input, Input::Reply { attempt: 1, .. }));
        let anonymous = v1::Reply {
            saga_id: String::new(),
            ..ok.clone()
        };
        let r = refusal(
            &subject("order-1", "reply"),
            None,
            &anonymous.encode_to_vec(),
        );
        assert!(r.detail.contains("field `saga_id` of the Reply"), "{r}");

        let cancel = wire::encode_control(&Control::Cancel {
            reason: "r".into(),
            at: 1,
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(SAGA_ID_HEADER, "order-1");
        let (id, input) =
            decode(&subject("order-1", "cancel"), Some(&headers), &cancel, P).unwrap();
        assert_eq!(id, "order-1");
        assert_eq!(input, Input::Cancel { reason: "r".into() });
        assert!(refusal(&subject("order-1", "cancel"), None, &cancel)
            .detail
            .contains(SAGA_ID_HEADER));
        // An old-style subject and a header that disagree.
        assert!(
            refusal(&old_subject("order-2", "cancel"), Some(&headers), &cancel)
                .detail
                .contains("order-2")
        );
        assert_eq!(
            crate::topology::event_subject(3, "reply"),
            "sagaflow.evt.3.reply"
        );
    }

    /// The ids of the hostile-publisher report: every one is refused before it reaches a KV
    /// key or a subject, with a reason short enough for a header.
    #[test]
    fn hostile_saga_ids_are_refused_at_the_edge() {
        let long = "Z".repeat(5_000);
        for id in ["x y", "a*", "été", "a>", long.as_str(), "", "a\nb"] {
            let bad = reply(id, "charge", 1, success());
            let r = refusal("sagaflow.evt.0.reply", None, &bad.encode_to_vec());
            assert_eq!(r.label, "saga_id", "{id:?}: {r}");
            assert!(
                r.detail.len() < 300 && !r.detail.chars().any(char::is_control),
                "{r:?}"
            );
        }
    }

    /// A reply is bound to the command it answers: its partition and its command id.
    #[test]
    fn replies_on_another_partition_or_with_a_forged_command_id_are_refused() {
        let ok = reply("order-1", "charge", 3, success());
        let home = partition_of("order-1", P);
        let elsewhere = crate::topology::event_subject((home + 1) % P, "reply");
        let r = refusal(&elsewhere, None, &ok.encode_to_vec());
        assert_eq!(r.label, "partition", "{r}");
        assert!(
            r.detail.contains(&format!("belongs to partition {home}")),
            "{r}"
        );
        let r = refusal(
            &format!("sagaflow.evt.{P}.reply"),
            None,
            &ok.encode_to_vec(),
        );
        assert_eq!(r.label, "subject", "a partition beyond the count: {r}");

        for forged in [
            String::new(),
            "x".into(),
            command_id("order-1", "charge", false, 2),
            command_id("order-1", "charge", true, 3),
            command_id("order-2", "charge", false, 3),
        ] {
            let bad = v1::Reply {
                command_id: forged.clone(),
                ..ok.clone()
            };
            let r = refusal(&subject("order-1", "reply"), None, &bad.encode_to_vec());
            assert_eq!(r.label, "command_id", "{forged}: {r}");
        }
        let zero = reply("order-1", "charge", 0, success());
        assert_eq!(
            refusal(&subject("order-1", "reply"), None, &zero.encode_to_vec()).label,
            "field"
        );
        let bad_step = reply("order-1", "charge.x", 1, success());
        assert_eq!(
            refusal(
                &subject("order-1", "reply"),
                None,
                &bad_step.encode_to_vec()
            )
            .label,
            "field"
        );
        let bad_kind = reply(
            "order-1",
            "charge",
            1,
            v1::reply::Outcome::Failure(v1::Failure {
                kind: "k".repeat(65),
                message: String::new(),
            }),
        );
        assert_eq!(
            refusal(
                &subject("order-1", "reply"),
                None,
                &bad_kind.encode_to_vec()
            )
            .label,
            "field"
        );
        let no_outcome = v1::Reply {
            outcome: None,
            ..ok.clone()
        };
        assert_eq!(
            refusal(
                &subject("order-1", "reply"),
                None,
                &no_outcome.encode_to_vec()
            )
            .label,
            "field"
        );
    }

    #[test]
    fn control_texts_are_bounded() {
        let mut headers = HeaderMap::new();
        headers.insert(SAGA_ID_HEADER, "order-1");
        let cancel = wire::encode_control(&Control::Cancel {
            reason: "r".repeat(ids::MAX_TEXT + 1),
            at: 1,
        })
        .unwrap();
        let r = refusal(&subject("order-1", "cancel"), Some(&headers), &cancel);
        assert_eq!(r.label, "field");
        assert!(r.detail.contains("cancel reason"), "{r}");
    }
}
