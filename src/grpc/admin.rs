//! `AdminService`: the cluster as the answering node sees it.
//!
//! Membership and leases come from the node's [`SharedView`] (refreshed every reconciliation
//! round, so at most one `cluster.heartbeat_interval` old); consumer figures are read from
//! JetStream on each call. Any node answers.
//!
//! Dead letters (`SAGA_DLQ`) are read, replayed and discarded straight in JetStream: see
//! [`Admin::list_dead_letters`] and friends, and `docs/operations.md`.

use crate::auth::Identity;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use sagaflow_proto::v1::admin_service_server::AdminService;
use sagaflow_proto::v1::{
    ClusterNode, ClusterStatusRequest, ClusterStatusResponse, ConsumerStatus, DeadLetter,
    DeadLetterEntry, DeadLetterJournalRecord, DiscardDeadLetterRequest, DiscardDeadLetterResponse,
    GetDeadLetterRequest, ListDeadLettersRequest, ListDeadLettersResponse, PartitionStatus,
    ReplayDeadLetterRequest, ReplayDeadLetterResponse,
};
use tonic::{Request, Response, Status};

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DeleteMessageErrorKind, RawMessageErrorKind};
use async_nats::HeaderMap;

use crate::cluster::SharedView;
use crate::dlq::{self, JournalRecord, JOURNAL_SUBJECT};
use crate::events::consumer_name;
use crate::topology::{COMMANDS_STREAM, DLQ_STREAM, EVENTS_STREAM, STATUS_STREAM};

/// Most entries one `ListDeadLetters` page returns.
pub const MAX_DEAD_LETTER_PAGE: u32 = 1000;

/// Entries per `ListDeadLetters` page when the request says 0.
pub const DEFAULT_DEAD_LETTER_PAGE: u32 = 100;

/// Bound on one dead-letter operation against JetStream.
const DLQ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest `operator` / `reason` accepted (they go into the journal).
const MAX_TEXT: usize = 1024;

/// Consumers listed per stream at most (the event stream has one per partition, ≤ 1024).
pub const MAX_CONSUMERS_PER_STREAM: usize = 4096;

/// Bound on listing the consumers of one stream.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// `AdminService` implementation.
#[derive(Clone)]
pub struct Admin {
    js: jetstream::Context,
    view: SharedView,
    node_id: String,
    partitions: u32,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("node_id", &self.node_id)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Status {
    tracing::warn!(error = %e, "{what}");
    Status::unavailable(format!("{what}: {e}"))
}

impl Admin {
    /// The service over the node's JetStream context and cluster view; `partitions` is the
    /// configured partition count (every partition is listed, leased or not).
    pub fn new(
        js: jetstream::Context,
        view: SharedView,
        node_id: impl Into<String>,
        partitions: u32,
    ) -> Self {
        Admin {
            js,
            view,
            node_id: node_id.into(),
            partitions,
        }
    }

    /// Every consumer of `stream` (at most [`MAX_CONSUMERS_PER_STREAM`]), `evt-p2` before `evt-p10`.
    async fn consumers_of(&self, stream: &str) -> Result<Vec<ConsumerStatus>, Status> {
        let what = format!("cannot list the consumers of {stream}");
        let list = async {
            let s = match self.js.get_stream(stream).await {
                Ok(s) => s,
                // SAGA_STATUS is not created when status events are not stored.
                Err(e)
                    if stream == STATUS_STREAM
                        && matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(unavailable(&what, e)),
            };
            let mut infos = s.consumers().take(MAX_CONSUMERS_PER_STREAM);
            let mut out = Vec::new();
            while let Some(info) = infos.next().await {
                let info = info.map_err(|e| unavailable(&what, e))?;
                out.push(ConsumerStatus {
                    name: info.name,
                    stream: stream.to_string(),
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                });
            }
            Ok::<_, Status>(out)
        };
        let mut out = tokio::time::timeout(LIST_TIMEOUT, list)
            .await
            .map_err(|_| unavailable(&what, format!("no answer within {LIST_TIMEOUT:?}")))??;
        out.sort_by(|a, b| natural_key(&a.name).cmp(&natural_key(&b.name)));
        Ok(out)
    }

    /// The status this node reports.
    pub async fn status(&self) -> Result<ClusterStatusResponse, Status> {
        let view = self.view.read().await.clone();
        let mut consumers = Vec::new();
        for stream in [EVENTS_STREAM, COMMANDS_STREAM, STATUS_STREAM] {
            consumers.extend(self.consumers_of(stream).await?);
        }
        let event_backlog: HashMap<&str, u64> = consumers
            .iter()
            .filter(|c| c.stream == EVENTS_STREAM)
            .map(|c| (c.name.as_str(), c.pending.saturating_add(c.ack_pending)))
            .collect();
        let mut owned: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        let mut partitions = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions {
            let (owner, epoch) = view
                .leases
                .get(&p)
                .map_or((None, 0), |l| (l.owner.as_deref(), l.epoch));
            if let Some(o) = owner {
                owned.entry(o).or_default().push(p);
            }
            partitions.push(PartitionStatus {
                partition: p,
                owner: owner.unwrap_or_default().to_string(),
                epoch,
                pending_events: event_backlog
                    .get(consumer_name(p).as_str())
                    .copied()
                    .unwrap_or(0),
            });
        }
        let nodes = view
            .nodes
            .values()
            .map(|n| ClusterNode {
                node_id: n.node_id.clone(),
                grpc_addr: n.grpc_addr.clone(),
                started_at_unix_ms: n.started_at,
                last_heartbeat_unix_ms: n.heartbeat_at,
                partitions: owned.get(n.node_id.as_str()).cloned().unwrap_or_default(),
            })
            .collect();
        Ok(ClusterStatusResponse {
            answered_by: self.node_id.clone(),
            nodes,
            partitions,
            consumers,
        })
    }
}

/// The listed form of a dead letter (or journal record) read from `SAGA_DLQ`.
pub fn entry_of(message: &StreamMessage) -> DeadLetterEntry {
    let h = &message.headers;
    if message.subject.as_str() == JOURNAL_SUBJECT {
        let record = serde_json::from_slice::<JournalRecord>(&message.payload).ok();
        let journal = record.map(|r| DeadLetterJournalRecord {
            dead_letter_seq: r.seq,
            action: r.action,
            operator: r.operator,
            reason: r.reason,
            at_unix_ms: r.at,
        });
        return DeadLetterEntry {
            seq: message.sequence,
            source: "journal".to_string(),
            subject: message.subject.to_string(),
            origin: String::new(),
            reason: journal
                .as_ref()
                .map(|j| j.reason.clone())
                .unwrap_or_default(),
            at_unix_ms: journal.as_ref().map_or(0, |j| j.at_unix_ms),
            payload_size: message.payload.len() as u64,
            discarded: journal
                .as_ref()
                .is_some_and(|j| j.action == dlq::ACTION_DISCARD),
            journal,
        };
    }
    let source = match dlq::header_text(h, dlq::SOURCE) {
        s if s.is_empty() => message
            .subject
            .as_str()
            .strip_prefix("sagaflow.dlq.")
            .unwrap_or_default()
            .to_string(),
        s => s,
    };
    DeadLetterEntry {
        seq: message.sequence,
        source,
        subject: dlq::header_text(h, dlq::SUBJECT),
        origin: dlq::header_text(h, dlq::ORIGIN),
        reason: dlq::header_text(h, dlq::REASON),
        at_unix_ms: dlq::header_text(h, dlq::AT).parse().unwrap_or(0),
        payload_size: message.payload.len() as u64,
        discarded: false,
        journal: None,
    }
}

/// Every header by name, repeated values joined with `, `.
fn header_map(headers: &HeaderMap) -> std::collections::HashMap<String, String> {
    headers
        .iter()
        .map(|(name, values)| {
            let joined: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
            (name.to_string(), joined.join(", "))
        })
        .collect()
}

/// A required text field: trimmed, non-empty, bounded; the error names the field.
/// Who acts on a dead letter: the token's name when the node authenticates, else the
/// `operator` the caller gives.
fn operator(identity: Option<Identity>, typed: &str) -> Result<String, Status> {
    match identity {
        Some(id) => Ok(id.name),
        None => required("operator", typed),
    }
}

fn required(field: &str, value: &str) -> Result<String, Status> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: required")));
    }
    if v.len() > MAX_TEXT {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {MAX_TEXT} bytes"
        )));
    }
    Ok(v.to_string())
}

/// Whether a replay may be published to `subject`: a subject of a stream Sagaflow consumes.
fn replayable_subject(subject: &str) -> bool {
    ["sagaflow.evt.", "sagaflow.cmd.", "sagaflow.status."]
        .iter()
        .any(|p| subject.starts_with(p) && subject.len() > p.len())
}

fn not_found(seq: u64) -> Status {
    Status::not_found(format!(
        "no dead letter with sequence {seq} in {DLQ_STREAM} (already replayed or discarded?)"
    ))
}

impl Admin {
    async fn dlq_stream(&self) -> Result<jetstream::stream::Stream, Status> {
        bounded("cannot open the dead-letter stream", async {
            self.js
                .get_stream(DLQ_STREAM)
                .await
                .map_err(|e| unavailable("cannot open the dead-letter stream", e))
        })
        .await
    }

    /// The dead letter at `seq` (journal records and gaps are NOT_FOUND).
    async fn dead_letter_at(
        &self,
        stream: &jetstream::stream::Stream,
        seq: u64,
    ) -> Result<StreamMessage, Status> {
        if seq == 0 {
            return Err(Status::invalid_argument("seq: must be > 0"));
        }
        let got = bounded("cannot read the dead letter", async {
            Ok(stream.get_raw_message(seq).await)
        })
        .await?;
        match got {
            Ok(m) if m.subject.as_str() == JOURNAL_SUBJECT => Err(Status::not_found(format!(
                "sequence {seq} is a journal record, not a dead letter"
            ))),
            Ok(m) => Ok(m),
            Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => {
                Err(not_found(seq))
            }
            Err(e) => Err(unavailable("cannot read the dead letter", e)),
        }
    }

    /// Appends `record` to the journal; returns its sequence. Idempotent per dead letter and
    /// action (`Nats-Msg-Id`), so a retried operation is journaled once.
    async fn journal(&self, record: &JournalRecord) -> Result<u64, Status> {
        let what = "cannot write the dead-letter journal";
        bounded(what, async {
            dlq::journal(&self.js, record)
                .await
                .map_err(|e| unavailable(what, crate::telemetry::error_chain(&e)))
        })
        .await
    }

    /// Deletes the dead letter at `seq` once its journal record is stored.
    async fn delete_dead_letter(
        &self,
        stream: &jetstream::stream::Stream,
        seq: u64,
    ) -> Result<(), Status> {
        let what = "cannot delete the dead letter";
        let deleted = bounded(what, async { Ok(stream.delete_message(seq).await) }).await?;
        match deleted {
            Ok(_) => Ok(()),
            // Deleted concurrently (another operator, or a retried call): the outcome holds.
            Err(e) if matches!(e.kind(), DeleteMessageErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) => {
                Err(not_found(seq))
            }
            Err(e) => Err(unavailable(what, e)),
        }
    }

    /// One page of dead letters (see `ListDeadLetters` in `admin.proto`).
    pub async fn list_dead_letters(
        &self,
        req: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, Status> {
        if req.limit > MAX_DEAD_LETTER_PAGE {
            return Err(Status::invalid_argument(format!(
                "limit: at most {MAX_DEAD_LETTER_PAGE}, got {}",
                req.limit
            )));
        }
        let source = req.source.trim();
        if source.contains(['.', '*', '>', ' ']) {
            return Err(Status::invalid_argument(format!(
                "source: {source:?} is not a source name"
            )));
        }
        let limit = if req.limit == 0 {
            DEFAULT_DEAD_LETTER_PAGE
        } else {
            req.limit
        } as usize;
        let mut stream = self.dlq_stream().await?;
        let what = "cannot read the dead-letter stream";
        let state = bounded(what, async {
            stream
                .info()
                .await
                .map(|i| i.state.clone())
                .map_err(|e| unavailable(what, e))
        })
        .await?;
        let (first, last) = (state.first_sequence, state.last_sequence);
        let filter = if source.is_empty() {
            "sagaflow.dlq.>".to_string()
        } else if source == dlq::SOURCE_PARKED {
            // One subject per parked saga.
            crate::topology::parked_dlq_subject("*")
        } else {
            crate::topology::dlq_subject(source)
        };
        let mut entries = Vec::new();
        let mut seq = req.start_seq.max(first).max(1);
        let mut next_seq = 0;
        while state.messages > 0 && seq <= last {
            if entries.len() >= limit {
                next_seq = seq;
                break;
            }
            // The next message at or after `seq` on the filter: the server skips deleted ones.
            let got = bounded(what, async {
                Ok(stream.get_first_raw_message_by_subject(&filter, seq).await)
            })
            .await?;
            let message = match got {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => break,
                Err(e) => return Err(unavailable(what, e)),
            };
            if message.sequence > last {
                break;
            }
            seq = message.sequence.saturating_add(1);
            if message.subject.as_str() == JOURNAL_SUBJECT && !req.include_journal {
                continue;
            }
            entries.push(entry_of(&message));
        }
        Ok(ListDeadLettersResponse {
            entries,
            next_seq,
            first_seq: first,
            last_seq: last,
        })
    }

    /// One dead letter with payload and headers.
    pub async fn get_dead_letter(&self, seq: u64) -> Result<DeadLetter, Status> {
        let stream = self.dlq_stream().await?;
        let m = self.dead_letter_at(&stream, seq).await?;
        Ok(DeadLetter {
            entry: Some(entry_of(&m)),
            headers: header_map(&m.headers),
            payload: m.payload.to_vec(),
        })
    }

    /// Replays a dead letter: publish, journal, delete (see `ReplayDeadLetter`).
    pub async fn replay_dead_letter(
        &self,
        req: ReplayDeadLetterRequest,
        identity: Option<Identity>,
    ) -> Result<ReplayDeadLetterResponse, Status> {
        let operator = operator(identity, &req.operator)?;
        let stream = self.dlq_stream().await?;
        let m = self.dead_letter_at(&stream, req.seq).await?;
        let entry = entry_of(&m);
        if !replayable_subject(&entry.subject) {
            return Err(Status::failed_precondition(format!(
                "dead letter {} has original subject {:?}, not a subject of a Sagaflow stream; \
                 discard it instead",
                req.seq, entry.subject
            )));
        }
        let headers = dlq::replay_headers(&m.headers, req.seq);
        let payload = if entry.source == dlq::SOURCE_PARKED {
            // The resume request of a parked saga: credit the operator who replays it.
            resume_payload(&m.payload, &operator, req.seq)
        } else {
            m.payload.clone()
        };
        let what = "cannot republish the dead letter";
        let ack = bounded(what, async {
            self.js
                .publish_with_headers(entry.subject.clone(), headers, payload)
                .await
                .map_err(|e| unavailable(what, e))?
                .await
                .map_err(|e| unavailable(what, e))
        })
        .await?;
        let journal_seq = self
            .journal(&JournalRecord {
                seq: req.seq,
                action: dlq::ACTION_REPLAY.to_string(),
                operator: operator.clone(),
                reason: String::new(),
                at: crate::clock::now_ms(),
                source: entry.source.clone(),
                subject: entry.subject.clone(),
            })
            .await?;
        self.delete_dead_letter(&stream, req.seq).await?;
        tracing::info!(seq = req.seq, subject = %entry.subject, operator = %operator, stream = %ack.stream, stream_seq = ack.sequence, "dead letter replayed");
        Ok(ReplayDeadLetterResponse {
            stream: ack.stream,
            stream_seq: ack.sequence,
            subject: entry.subject,
            journal_seq,
        })
    }

    /// Discards a dead letter: journal, delete (see `DiscardDeadLetter`).
    pub async fn discard_dead_letter(
        &self,
        req: DiscardDeadLetterRequest,
        identity: Option<Identity>,
    ) -> Result<DiscardDeadLetterResponse, Status> {
        let operator = operator(identity, &req.operator)?;
        let reason = required("reason", &req.reason)?;
        let stream = self.dlq_stream().await?;
        let m = self.dead_letter_at(&stream, req.seq).await?;
        let entry = entry_of(&m);
        let journal_seq = self
            .journal(&JournalRecord {
                seq: req.seq,
                action: dlq::ACTION_DISCARD.to_string(),
                operator: operator.clone(),
                reason: reason.clone(),
                at: crate::clock::now_ms(),
                source: entry.source,
                subject: entry.subject,
            })
            .await?;
        self.delete_dead_letter(&stream, req.seq).await?;
        tracing::info!(seq = req.seq, operator = %operator, reason = %reason, "dead letter discarded");
        Ok(DiscardDeadLetterResponse { journal_seq })
    }
}

/// The payload of a parked saga's dead letter with `operator` as the one who resumes it (the
/// payload as is when it is not a resume request).
fn resume_payload(payload: &bytes::Bytes, operator: &str, seq: u64) -> bytes::Bytes {
    use sagaflow_actors::wire::{self, Control};
    match wire::decode_control(payload) {
        Ok(Control::Intervene {
            mut intervention,
            at,
        }) => {
            intervention.operator = operator.to_string();
            intervention.reason = format!("replay of dead letter {DLQ_STREAM}:{seq}");
            match wire::encode_control(&Control::Intervene { intervention, at }) {
                Ok(bytes) => bytes.into(),
                Err(_) => payload.clone(),
            }
        }
        _ => payload.clone(),
    }
}

/// Runs `fut` within [`DLQ_TIMEOUT`]; UNAVAILABLE naming `what` when it takes longer.
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(DLQ_TIMEOUT, fut)
        .await
        .map_err(|_| unavailable(what, format!("no answer within {DLQ_TIMEOUT:?}")))?
}

/// Sorts `evt-p2` before `evt-p10`: the name without its trailing digits, then their value.
fn natural_key(name: &str) -> (&str, u64, &str) {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let number = name[stem.len()..].parse().unwrap_or(0);
    (stem, number, name)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.status().await.map(Response::new)
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        self.list_dead_letters(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_dead_letter(
        &self,
        request: Request<GetDeadLetterRequest>,
    ) -> Result<Response<DeadLetter>, Status> {
        self.get_dead_letter(request.into_inner().seq)
            .await
            .map(Response::new)
    }

    async fn replay_dead_letter(
        &self,
        request: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        let identity = request.extensions().get::<Identity>().cloned();
        self.replay_dead_letter(request.into_inner(), identity)
            .await
            .map(Response::new)
    }

    async fn discard_dead_letter(
        &self,
        request: Request<DiscardDeadLetterRequest>,
    ) -> Result<Response<DiscardDeadLetterResponse>, Status> {
        let identity = request.extensions().get::<Identity>().cloned();
        self.discard_dead_letter(request.into_inner(), identity)
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{natural_key, replayable_subject, required};

    #[test]
    fn consumers_sort_naturally() {
        let mut names = vec!["evt-p10", "evt-p2", "analytics", "evt-p1", "svc-x"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["analytics", "evt-p1", "evt-p2", "evt-p10", "svc-x"]);
    }

    #[test]
    fn dead_letter_inputs_are_checked() {
        assert!(replayable_subject("sagaflow.evt.1.x.reply"));
        assert!(replayable_subject("sagaflow.cmd.payment.charge"));
        assert!(!replayable_subject("sagaflow.dlq.events"));
        assert!(!replayable_subject("sagaflow.evt."));
        assert!(!replayable_subject(""));
        let e = required("reason", "  ").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("reason"), "{}", e.message());
        assert!(required("operator", &"x".repeat(2000)).is_err());
    }
}
