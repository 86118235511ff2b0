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

use crate::config::ConsumerConfig;
use crate::topology::{partition_filter, EVENTS_STREAM, SAGA_ID_HEADER};

/// Name of the durable consumer of one partition.
pub fn consumer_name(partition: u32) -> String {
    format!("evt-p{partition}")
}

/// Decodes a saga event from its subject, headers and payload.
///
/// Subjects are `sagaflow.evt.<partition>.<kind>`: a reply names its saga in its payload, a
/// control event in the [`SAGA_ID_HEADER`] header. Events published before 2026-11-27 named the
/// saga in the subject too (`sagaflow.evt.<partition>.<saga_id>.<kind>`) and still decode.
pub fn decode(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<(String, Input), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let (in_subject, kind) = match tokens.as_slice() {
        [_, _, _, kind] => (None, *kind),
        [_, _, _, saga_id, kind] => (Some(*saga_id), *kind),
        _ => return Err(format!("unexpected event subject `{subject}`")),
    };
    let in_header = crate::telemetry::header(headers, SAGA_ID_HEADER);
    let named = |id: Option<&str>| -> Result<String, String> {
        match (id.filter(|i| !i.is_empty()), in_subject) {
            (Some(id), Some(s)) if id != s => Err(format!(
                "event for saga `{id}` published on the subject of saga `{s}`"
            )),
            (Some(id), _) | (None, Some(id)) => Ok(id.to_string()),
            (None, None) => Err(format!(
                "`{kind}` event names no saga (header `{SAGA_ID_HEADER}`)"
            )),
        }
    };
    let input = match kind {
        "reply" => {
            let reply =
                v1::Reply::decode(payload).map_err(|e| format!("undecodable reply: {e}"))?;
            let saga_id = named(Some(&reply.saga_id))?;
            let outcome = match reply.outcome {
                Some(v1::reply::Outcome::Success(s)) => Ok(s.output),
                Some(v1::reply::Outcome::Failure(f)) => Err(StepError {
                    kind: f.kind,
                    message: f.message,
                }),
                None => return Err("reply has no outcome".to_string()),
            };
            (
                saga_id,
                Input::Reply {
                    step: reply.step,
                    attempt: reply.attempt,
                    compensation: reply.compensation,
                    outcome,
                },
            )
        }
        "start" | "cancel" | "intervene" => {
            let saga_id = named(in_header)?;
            let input = match wire::decode_control(payload).map_err(|e| e.to_string())? {
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
                Control::Cancel { reason, .. } => Input::Cancel { reason },
                Control::Intervene { intervention, .. } => Input::Intervene(intervention),
            };
            (saga_id, input)
        }
        other => return Err(format!("unknown event kind `{other}`")),
    };
    Ok(input)
}

/// Creates (or updates) the durable consumer of `partition`.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    partition: u32,
    cfg: &ConsumerConfig,
) -> Result<consumer::PullConsumer, String> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(consumer_name(partition)),
            description: Some(format!("saga events of partition {partition}")),
            filter_subject: partition_filter(partition),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.event_ack_wait,
            // Saga events are never given up on: a saga must reach a terminal status.
            max_deliver: -1,
            max_ack_pending: cfg.max_ack_pending,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decodes_replies_and_controls() {
        let reply = v1::Reply {
            command_id: "c".into(),
            saga_id: "order-1".into(),
            step: "charge".into(),
            attempt: 2,
            compensation: false,
            outcome: Some(v1::reply::Outcome::Failure(v1::Failure {
                kind: "declined".into(),
                message: "no".into(),
            })),
        };
        let (id, input) =
            decode("sagaflow.evt.3.order-1.reply", None, &reply.encode_to_vec()).unwrap();
        assert_eq!(id, "order-1");
        assert_eq!(
            input,
            Input::Reply {
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
            decode("sagaflow.evt.3.order-1.start", None, &start)
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
            decode("sagaflow.evt.3.order-1.start", None, &good)
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
            decode("sagaflow.evt.3.order-2.start", None, &good)
                .unwrap()
                .1,
            Input::Started
        );
        assert_eq!(
            decode("sagaflow.evt.3.order-1.start", None, &created(vec![9, 9]))
                .unwrap()
                .1,
            Input::Started
        );
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(
            decode("sagaflow.evt.3.order-1.reply", None, b"\xff\xff\xff")
                .unwrap_err()
                .contains("undecodable reply")
        );
        assert!(decode("sagaflow.evt.3", None, b"")
            .unwrap_err()
            .contains("unexpected event subject"));
        assert!(decode("sagaflow.evt.3.order-1.reply.x", None, b"")
            .unwrap_err()
            .contains("unexpected event subject"));
        assert!(decode("sagaflow.evt.3.order-1.bogus", None, b"")
            .unwrap_err()
            .contains("unknown event kind"));
        let other = v1::Reply {
            saga_id: "order-2".into(),
            ..Default::default()
        };
        assert!(
            decode("sagaflow.evt.3.order-1.reply", None, &other.encode_to_vec())
                .unwrap_err()
                .contains("order-2")
        );
        assert!(decode("sagaflow.evt.3.order-1.start", None, b"\x07").is_err());
    }

    /// Today's subjects carry no saga id: a reply names its saga in its payload, a control
    /// event in a header; an event that names no saga, or two different ones, is refused.
    #[test]
    fn events_name_their_saga_in_the_payload_or_a_header() {
        let reply = v1::Reply {
            command_id: "c".into(),
            saga_id: "order-1".into(),
            step: "charge".into(),
            attempt: 1,
            compensation: false,
            outcome: Some(v1::reply::Outcome::Success(v1::Success {
                output: Vec::new(),
            })),
        };
        let (id, input) = decode("sagaflow.evt.3.reply", None, &reply.encode_to_vec()).unwrap();
        assert_eq!(id, "order-1");
        assert!(matches!(input, Input::Reply { attempt: 1, .. }));
        let anonymous = v1::Reply {
            saga_id: String::new(),
            ..reply.clone()
        };
        assert!(
            decode("sagaflow.evt.3.reply", None, &anonymous.encode_to_vec())
                .unwrap_err()
                .contains("names no saga")
        );

        let cancel = wire::encode_control(&Control::Cancel {
            reason: "r".into(),
            at: 1,
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(SAGA_ID_HEADER, "order-1");
        let (id, input) = decode("sagaflow.evt.3.cancel", Some(&headers), &cancel).unwrap();
        assert_eq!(id, "order-1");
        assert_eq!(input, Input::Cancel { reason: "r".into() });
        assert!(decode("sagaflow.evt.3.cancel", None, &cancel)
            .unwrap_err()
            .contains(SAGA_ID_HEADER));
        // An old-style subject and a header that disagree.
        assert!(
            decode("sagaflow.evt.3.order-2.cancel", Some(&headers), &cancel)
                .unwrap_err()
                .contains("order-2")
        );
        assert_eq!(
            crate::topology::event_subject(3, "reply"),
            "sagaflow.evt.3.reply"
        );
    }
}
