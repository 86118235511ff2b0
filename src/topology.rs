//! The JetStream topology: stream and bucket names, subjects, and their idempotent creation.
//!
//! | name | kind | subjects / keys |
//! | --- | --- | --- |
//! | `SAGA_EVENTS` | stream | `sagaflow.evt.<partition>.<start\|cancel\|intervene>`, and replies on `sagaflow.evt.<partition>.reply.<service>` (the saga id is in a reply's payload, and in the `Sagaflow-Saga-Id` header of the others) |
//! | `SAGA_COMMANDS` | stream | `sagaflow.cmd.<service>.<action>` |
//! | `SAGA_STATUS` | stream | `sagaflow.status.<saga_name>.<saga_id>` (lifecycle events) |
//! | `SAGA_DLQ` | stream | `sagaflow.dlq.<source>` (original bytes + reason headers) |
//! | `sagaflow_sagas` | KV | `<partition>.<saga_id>` → snapshot (history `streams.kv_history`; finished ones expire after `retention.finished_sagas`) |

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::{StatusEvents, StreamsConfig};

// The names participants share with the node (the wire contract, `sagaflow-proto`):
// `reply_subject` names the service, so NATS permissions can let each service publish only its
// own replies (`sagaflow.evt.*.reply.<service>`), and the orchestrator refuses a reply whose
// service is not the one the command went to.
pub use sagaflow_proto::subjects::{
    command_subject, dlq_subject, reply_subject, COMMANDS_STREAM, DLQ_STREAM, EVENTS_STREAM,
};

/// Stream of lifecycle (status) events.
pub const STATUS_STREAM: &str = "SAGA_STATUS";
/// Saga snapshots.
pub const SAGAS_BUCKET: &str = "sagaflow_sagas";

/// Subject of a saga event of `kind` (`start`, `reply`, `cancel`, `intervene`) in `partition`.
///
/// The saga id is not in the subject: with one subject per saga, each partition's consumer
/// had the server step over every other partition's messages (its subject index cannot help
/// with a million subjects), and the server kept state for every saga's subject.
pub fn event_subject(partition: u32, kind: &str) -> String {
    format!("sagaflow.evt.{partition}.{kind}")
}

/// Header naming the saga of a control event (`start`, `cancel`, `intervene`); a reply names
/// its saga in its payload.
pub const SAGA_ID_HEADER: &str = "Sagaflow-Saga-Id";

/// Subject filter of one partition's events.
pub fn partition_filter(partition: u32) -> String {
    format!("sagaflow.evt.{partition}.>")
}

/// Subject of a lifecycle event.
pub fn status_subject(saga_name: &str, saga_id: &str) -> String {
    format!("sagaflow.status.{saga_name}.{saga_id}")
}

/// Subject of the dead letter of a parked saga (one subject per saga, so resuming the saga
/// can settle its dead letters).
pub fn parked_dlq_subject(saga_id: &str) -> String {
    format!("sagaflow.dlq.saga.{saga_id}")
}

/// Key of a saga's snapshot.
pub fn saga_key(partition: u32, saga_id: &str) -> String {
    format!("{partition}.{saga_id}")
}

/// Why the topology could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create {what} `{name}`: {message}")]
pub struct Error {
    /// `stream` or `bucket`.
    pub what: &'static str,
    /// Its name.
    pub name: String,
    /// Cause.
    pub message: String,
}

/// Creates (or updates to the configured settings) every stream and bucket; safe to call from
/// every node at every start. `SAGA_STATUS` only when status events are stored
/// (`streams.status_events = "stream"`); one that exists is left alone.
pub async fn ensure(js: &jetstream::Context, cfg: &StreamsConfig) -> Result<kv::Store, Error> {
    let streams = [
        (
            EVENTS_STREAM,
            "sagaflow.evt.>",
            cfg.max_age,
            "saga events: starts, participant replies, cancels",
        ),
        (
            COMMANDS_STREAM,
            "sagaflow.cmd.>",
            cfg.max_age,
            "commands to participant services",
        ),
        (
            STATUS_STREAM,
            "sagaflow.status.>",
            cfg.max_age,
            "saga lifecycle events for other systems",
        ),
        (
            DLQ_STREAM,
            "sagaflow.dlq.>",
            cfg.dlq_max_age,
            "dead letters: original bytes and the reason",
        ),
    ];
    for (name, subject, max_age, description) in streams {
        if name == STATUS_STREAM && cfg.status_events != StatusEvents::Stream {
            continue;
        }
        let config = stream::Config {
            name: name.to_string(),
            description: Some(description.to_string()),
            subjects: vec![subject.to_string()],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            max_age,
            max_bytes: cfg.max_bytes,
            duplicate_window: cfg.duplicate_window,
            // Each command carries `Nats-TTL` (its step's timeout, see `crate::bus`): the
            // server drops a command nobody took in time, by its own clock.
            allow_message_ttl: name == COMMANDS_STREAM,
            ..Default::default()
        };
        ensure_stream(js, config).await?;
    }
    ensure_sagas_bucket(js, cfg).await
}

/// Opens the snapshot bucket, creating it if needed, and brings its stream to the configured
/// settings: `max_messages_per_subject` = `streams.kv_history`, and `allow_msg_ttl` on (finished
/// snapshots carry a per-message TTL, see [`crate::store`]). A bucket created by an older
/// version (history 1, no TTL) is upgraded in place; its keys are kept. Per-message TTL can be
/// turned on but never off again (NATS ≥ 2.11). Delete markers (`subject_delete_marker_ttl`)
/// are left as they are (off when created here): an expired snapshot leaves no message.
pub async fn ensure_sagas_bucket(
    js: &jetstream::Context,
    cfg: &StreamsConfig,
) -> Result<kv::Store, Error> {
    let store = ensure_bucket(
        js,
        kv::Config {
            bucket: SAGAS_BUCKET.to_string(),
            description: "latest saga snapshot per saga".to_string(),
            history: cfg.kv_history,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            ..Default::default()
        },
    )
    .await?;
    let err = |e: &dyn std::fmt::Display| Error {
        what: "bucket",
        name: SAGAS_BUCKET.to_string(),
        message: e.to_string(),
    };
    let mut stream = js
        .get_stream(&store.stream_name)
        .await
        .map_err(|e| err(&e))?;
    let current = stream.info().await.map_err(|e| err(&e))?.config.clone();
    if current.max_messages_per_subject == cfg.kv_history && current.allow_message_ttl {
        return Ok(store);
    }
    tracing::info!(
        bucket = SAGAS_BUCKET,
        history = current.max_messages_per_subject,
        allow_msg_ttl = current.allow_message_ttl,
        new_history = cfg.kv_history,
        "updating the snapshot bucket's settings"
    );
    let mut desired = current;
    desired.max_messages_per_subject = cfg.kv_history;
    desired.allow_message_ttl = true;
    let updated = js.update_stream(desired).await.map_err(|e| err(&e))?;
    if !updated.config.allow_message_ttl {
        // A server before 2.11 ignores the field: finished sagas would never be removed.
        return Err(err(
            &"the server did not enable per-message TTL (allow_msg_ttl): NATS ≥ 2.11 is required",
        ));
    }
    // Reopen, so the handle's cached stream settings are the new ones.
    js.get_key_value(SAGAS_BUCKET).await.map_err(|e| err(&e))
}

/// Creates a stream, or updates it when it exists with other settings.
pub async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> Result<(), Error> {
    let name = config.name.clone();
    let err = |e: &dyn std::fmt::Display| Error {
        what: "stream",
        name: name.clone(),
        message: e.to_string(),
    };
    match js.get_stream(&name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| err(&e))?;
            if stream_differs(&info.config, &config) {
                tracing::info!(stream = %name, "updating the stream's settings");
                let mut config = config;
                // The server refuses to turn per-message TTL off again.
                config.allow_message_ttl |= info.config.allow_message_ttl;
                js.update_stream(config).await.map_err(|e| err(&e))?;
            }
            Ok(())
        }
        Err(_) => match js.create_stream(config.clone()).await {
            Ok(_) => Ok(()),
            // Another node created it meanwhile.
            Err(e) if js.get_stream(&name).await.is_ok() => {
                tracing::debug!(stream = %name, error = %e, "stream created concurrently");
                Ok(())
            }
            Err(e) => Err(err(&e)),
        },
    }
}

/// Whether a stream's `current` settings differ from the `desired` ones in what Sagaflow
/// configures. Values the server fills in (a limit of 0 stored as -1, a duplicate window of 0
/// stored as the server's default) are not differences; per-message TTL, once on, cannot be
/// turned off, so only a stream lacking it differs.
pub fn stream_differs(current: &stream::Config, desired: &stream::Config) -> bool {
    let limit = |v: i64| if v <= 0 { -1 } else { v };
    current.subjects != desired.subjects
        || current.max_age != desired.max_age
        || limit(current.max_bytes) != limit(desired.max_bytes)
        || limit(current.max_messages_per_subject) != limit(desired.max_messages_per_subject)
        || (!desired.duplicate_window.is_zero()
            && current.duplicate_window != desired.duplicate_window)
        || current.num_replicas != desired.num_replicas.max(1)
        || (desired.allow_message_ttl && !current.allow_message_ttl)
}

/// Opens a bucket, creating it if needed.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, Error> {
    let name = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(e) => js.get_key_value(&name).await.map_err(|_| Error {
            what: "bucket",
            name: name.clone(),
            message: e.to_string(),
        }),
    }
}

/// How long to wait for JetStream API answers before treating the server as unavailable.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a failed KV `create` lost to an existing key, or an `update` to a newer revision:
/// the participant SDK's tests, which know NATS ≥ 2.12's clustered error code too.
pub use sagaflow_participant::ledger::{create_conflict, update_conflict};
