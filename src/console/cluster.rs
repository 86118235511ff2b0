//! The cluster (nodes, partitions with their owner and epoch, consumer lag; live) and the dead
//! letters (list, show with headers and payload as text and hex, replay, discard), through the
//! node's `AdminService` in-process.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};
use sagaflow_proto::v1::{
    ClusterStatusResponse, DiscardDeadLetterRequest, ListDeadLettersRequest,
    ReplayDeadLetterRequest,
};
use serde::Deserialize;

use super::layout::{self, Nav};
use super::session::Viewer;
use super::{live, method, Console, Ctx};

/// How often the live cluster view is read again.
const CLUSTER_EVERY: Duration = Duration::from_secs(2);
/// Dead letters per page.
const DLQ_PAGE: u32 = 50;
/// The most payload bytes shown as text.
const SHOW_TEXT: usize = 64 * 1024;
/// The most payload bytes shown in hex.
const SHOW_HEX: usize = 16 * 1024;

fn owner_class(nodes: &[String], owner: &str) -> String {
    match nodes.iter().position(|n| n == owner) {
        Some(i) => format!("part owner-{}", i % 8),
        None => "part free".to_string(),
    }
}

/// The cluster as the answering node sees it.
pub(crate) fn cluster_fragment(status: &ClusterStatusResponse, now: i64) -> Markup {
    let nodes: Vec<String> = status.nodes.iter().map(|n| n.node_id.clone()).collect();
    let free = status
        .partitions
        .iter()
        .filter(|p| p.owner.is_empty())
        .count();
    let lagging = status
        .consumers
        .iter()
        .filter(|c| c.pending + c.ack_pending > 0)
        .count();
    html! {
        p.summary data-announce=(format!("{} nodes, {} partitions free", nodes.len(), free)) {
            strong { (status.nodes.len()) } " node" @if status.nodes.len() != 1 { "s" } " · "
            strong { (status.partitions.len()) } " partitions"
            @if free > 0 { " · " span.badge.bad { (free) " without owner" } }
            " · " (lagging) " consumer" @if lagging != 1 { "s" } " with lag · as seen by node " code { (status.answered_by) }
        }
        section aria-labelledby="nodes-h" {
            h2 #nodes-h { "Nodes" }
            div.scroll {
                table.nodes {
                    thead { tr { th scope="col" { "Node" } th scope="col" { "gRPC" } th scope="col" { "Started" } th scope="col" { "Last heartbeat" } th scope="col" { "Partitions" } } }
                    tbody {
                        @for n in &status.nodes {
                            tr data-node=(n.node_id) {
                                th scope="row" { span class=(owner_class(&nodes, &n.node_id)) {} " " (n.node_id) }
                                td { code { (n.grpc_addr) } }
                                td { (layout::time(n.started_at_unix_ms)) }
                                td { (layout::ago(now, n.last_heartbeat_unix_ms)) }
                                td { (n.partitions.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")) }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="partitions-h" {
            h2 #partitions-h { "Partitions" }
            ol.partitions {
                @for p in &status.partitions {
                    li class=(owner_class(&nodes, &p.owner)) data-partition=(p.partition) {
                        span.pn { "p" (p.partition) }
                        span.po { @if p.owner.is_empty() { "no owner" } @else { (p.owner) } }
                        span.pe { "epoch " (p.epoch) }
                        span class=(if p.pending_events > 0 { "pp lag" } else { "pp" }) { (p.pending_events) " pending" }
                    }
                }
            }
        }
        section aria-labelledby="consumers-h" {
            h2 #consumers-h { "Consumers" }
            div.scroll {
                table.consumers {
                    thead { tr { th scope="col" { "Stream" } th scope="col" { "Consumer" } th.num scope="col" { "Pending" } th.num scope="col" { "Ack pending" } th.num scope="col" { "Redelivered" } } }
                    tbody {
                        @for c in &status.consumers {
                            tr class=(if c.pending + c.ack_pending > 0 { "lag" } else { "" }) {
                                td { (c.stream) }
                                th scope="row" { code { (c.name) } }
                                td.num { (c.pending) }
                                td.num { (c.ack_pending) }
                                td.num { (c.redelivered) }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn cluster_html(console: &Console) -> Markup {
    let now = console.inner.api.now_ms();
    match console.inner.admin.status().await {
        Ok(status) => cluster_fragment(&status, now),
        Err(status) => layout::error_box(&layout::status_text(&status)),
    }
}

/// `GET /ui/cluster`.
pub(crate) async fn page(State(ctx): State<Ctx>, Extension(viewer): Extension<Viewer>) -> Response {
    let console = &ctx.console;
    let body = html! {
        h1 { "Cluster" }
        div #cluster-live data-live="/ui/live/cluster" { (cluster_html(console).await) }
    };
    layout::page(
        console,
        &viewer,
        Nav::Cluster,
        "Cluster",
        Some("cluster"),
        body,
    )
    .into_response()
}

/// `GET /ui/live/cluster`.
pub(crate) async fn live(State(ctx): State<Ctx>) -> Response {
    let console = ctx.console.clone();
    live::poll(&ctx, CLUSTER_EVERY, move || {
        let console = console.clone();
        async move { Some(cluster_html(&console).await.into_string()) }
    })
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct DlqQuery {
    #[serde(default)]
    source: String,
    #[serde(default)]
    start: u64,
    #[serde(default)]
    journal: String,
    #[serde(default)]
    replayed: String,
    #[serde(default)]
    discarded: String,
    #[serde(default)]
    into: String,
    #[serde(default)]
    record: String,
}

fn dlq_url(source: &str, start: u64, journal: bool) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    if !source.is_empty() {
        s.append_pair("source", source);
    }
    if start > 0 {
        s.append_pair("start", &start.to_string());
    }
    if journal {
        s.append_pair("journal", "1");
    }
    let q = s.finish();
    if q.is_empty() {
        "/ui/dlq".into()
    } else {
        format!("/ui/dlq?{q}")
    }
}

/// `GET /ui/dlq`.
pub(crate) async fn dead_letters(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<DlqQuery>,
) -> Response {
    let console = &ctx.console;
    let journal = !q.journal.is_empty();
    let listed = console
        .inner
        .admin
        .list_dead_letters(ListDeadLettersRequest {
            source: q.source.trim().to_string(),
            start_seq: q.start,
            limit: DLQ_PAGE,
            include_journal: journal,
        })
        .await;
    let body = html! {
        h1 { "Dead letters" }
        @if !q.replayed.is_empty() {
            (layout::notice_box(&format!("replayed dead letter {} to {} (journal record {})", q.replayed, q.into, q.record)))
        }
        @if !q.discarded.is_empty() {
            (layout::notice_box(&format!("discarded dead letter {} (journal record {})", q.discarded, q.record)))
        }
        p.hint { "What could not be processed, with why; each replay and discard is journaled. " code { "sagaflow dlq" } " does the same from a terminal." }
        form.filters method="get" action="/ui/dlq" {
            div.field {
                label for="d-source" { "Source" }
                input #d-source type="text" name="source" value=(q.source) list="d-sources" placeholder="any";
                datalist #d-sources { option value="events" {} option value="commands" {} option value="saga" {} }
            }
            div.field.check {
                input #d-journal type="checkbox" name="journal" value="1" checked[journal];
                label for="d-journal" { "with the journal" }
            }
            div.field.buttons { button type="submit" { "Show" } }
        }
        @match &listed {
            Err(status) => { (layout::error_box(&layout::status_text(status))) }
            Ok(page) => {
                @if page.entries.is_empty() {
                    p.empty { "No dead letter." }
                } @else {
                    div.scroll {
                        table.dlq {
                            thead { tr { th scope="col" { "Seq" } th scope="col" { "Source" } th scope="col" { "Subject" } th.wide scope="col" { "Reason" } th scope="col" { "At" } th.num scope="col" { "Bytes" } } }
                            tbody {
                                @for e in &page.entries {
                                    tr data-seq=(e.seq) {
                                        @if let Some(j) = &e.journal {
                                            td { (e.seq) }
                                            td { "journal" }
                                            td colspan="2" { (j.action) " of " (j.dead_letter_seq) " by " (j.operator) @if !j.reason.is_empty() { ": " (j.reason) } }
                                            td { (layout::time(j.at_unix_ms)) }
                                            td.num { (e.payload_size) }
                                        } @else {
                                            td { a href=(format!("/ui/dlq/{}", e.seq)) { (e.seq) } }
                                            td { (e.source) }
                                            td { code { (e.subject) } }
                                            td.wide.error-text { (e.reason) }
                                            td { (layout::time(e.at_unix_ms)) }
                                            td.num { (e.payload_size) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                nav.pager aria-label="Pages" {
                    @if q.start > 0 { a href=(dlq_url(&q.source, 0, journal)) { "← First" } }
                    @if page.next_seq > 0 { a href=(dlq_url(&q.source, page.next_seq, journal)) rel="next" { "Next →" } }
                }
            }
        }
    };
    layout::page(
        console,
        &viewer,
        Nav::DeadLetters,
        "Dead letters",
        None,
        body,
    )
    .into_response()
}

/// Rows of 16 bytes: offset, hex, printable ASCII.
pub(crate) fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:08x}  {:<47}  {ascii}\n", i * 16, hex.join(" ")));
    }
    out
}

/// `GET /ui/dlq/{seq}`.
pub(crate) async fn dead_letter(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(seq): Path<u64>,
) -> Response {
    let console = &ctx.console;
    let letter = match console.inner.admin.get_dead_letter(seq).await {
        Ok(d) => d,
        Err(status) => {
            return layout::error_page(console, &viewer, Nav::DeadLetters, "Dead letter", &status)
        }
    };
    let entry = letter.entry.clone().unwrap_or_default();
    let mut headers: Vec<(&String, &String)> = letter.headers.iter().collect();
    headers.sort();
    let text = String::from_utf8_lossy(&letter.payload[..letter.payload.len().min(SHOW_TEXT)]);
    let title = format!("Dead letter {seq}");
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/dlq" { "Dead letters" } " / " (seq) }
        h1 { (title) }
        dl.facts {
            div { dt { "Source" } dd { (entry.source) } }
            div { dt { "Subject" } dd { code { (entry.subject) } } }
            div { dt { "Origin" } dd { code { (entry.origin) } } }
            div { dt { "At" } dd { (layout::time(entry.at_unix_ms)) } }
            div { dt { "Size" } dd { (entry.payload_size) " bytes" } }
        }
        p.reason { strong { "Why: " } span.error-text { (entry.reason) } }
        @if viewer.may(method::REPLAY) {
            ul.buttons {
                li { a.button href=(format!("/ui/dlq/{seq}/replay")) { "Replay…" } }
                li { a.button.secondary href=(format!("/ui/dlq/{seq}/discard")) { "Discard…" } }
            }
        } @else {
            p.muted { "Read-only: replaying and discarding need role " (Viewer::needs(method::REPLAY)) "." }
        }
        section aria-labelledby="headers-h" {
            h2 #headers-h { "Headers" }
            div.scroll {
                table.headers {
                    tbody { @for (k, v) in &headers { tr { th scope="row" { code { (k) } } td { code { (v) } } } } }
                }
            }
        }
        section aria-labelledby="text-h" {
            h2 #text-h { "Payload as text" }
            @if letter.payload.len() > SHOW_TEXT { p.hint { "The first " (SHOW_TEXT) " of " (letter.payload.len()) " bytes." } }
            pre.payload { (text) }
        }
        section aria-labelledby="hex-h" {
            h2 #hex-h { "Payload in hex" }
            @if letter.payload.len() > SHOW_HEX { p.hint { "The first " (SHOW_HEX) " of " (letter.payload.len()) " bytes." } }
            pre.hex { (hex_dump(&letter.payload[..letter.payload.len().min(SHOW_HEX)])) }
        }
    };
    layout::page(console, &viewer, Nav::DeadLetters, &title, None, body).into_response()
}

/// A replay or discard as its form sends it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct DlqForm {
    #[serde(default)]
    operator: String,
    #[serde(default)]
    reason: String,
}

#[allow(clippy::too_many_arguments)]
fn dlq_action_page(
    console: &Console,
    viewer: &Viewer,
    seq: u64,
    replay: bool,
    form: &DlqForm,
    error: Option<String>,
    status: StatusCode,
    subject: &str,
) -> Response {
    let path = if replay {
        method::REPLAY
    } else {
        method::DISCARD
    };
    let denied = viewer.authorize(console, path).err();
    let (verb, title) = if replay {
        ("replay", format!("Replay dead letter {seq}"))
    } else {
        ("discard", format!("Discard dead letter {seq}"))
    };
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/dlq" { "Dead letters" } " / " a href=(format!("/ui/dlq/{seq}")) { (seq) } " / " (verb) }
        h1 { (title) "?" }
        @if let Some(e) = &error { (layout::error_box(e)) }
        @if replay {
            p.explain { "Publishes its payload and headers again to its original subject " code { (subject) } ", where its consumer takes it as if new; then journals the replay and deletes the dead letter. If it still cannot be processed, it comes back as a new dead letter." }
        } @else {
            p.explain { "Journals the discard with your reason and deletes the dead letter. Nothing is sent anywhere." }
        }
        @if let Some(status) = &denied {
            (layout::error_box(&layout::status_text(status)))
        } @else {
            form.card method="post" action=(format!("/ui/dlq/{seq}/{verb}")) {
                input type="hidden" name="csrf" value=(viewer.csrf);
                @if !replay {
                    label for="q-reason" { "Reason" }
                    textarea #q-reason name="reason" rows="2" required maxlength="1024" placeholder="test data" { (form.reason) }
                }
                @if !viewer.auth {
                    label for="q-operator" { "Operator" }
                    input #q-operator type="text" name="operator" required maxlength="200" autocomplete="username" value=(if form.operator.is_empty() { viewer.operator.as_str() } else { form.operator.as_str() });
                    p.hint { "This node runs without authentication: say who you are, as with the CLI's --operator." }
                }
                div.buttons {
                    button.danger type="submit" { (if replay { "Replay" } else { "Discard" }) " dead letter " (seq) }
                    a href=(format!("/ui/dlq/{seq}")) { "Back" }
                }
            }
        }
    };
    let mut response =
        layout::page(console, viewer, Nav::DeadLetters, &title, None, body).into_response();
    *response.status_mut() = status;
    response
}

async fn subject_of(console: &Console, seq: u64) -> Result<String, tonic::Status> {
    let letter = console.inner.admin.get_dead_letter(seq).await?;
    Ok(letter.entry.map(|e| e.subject).unwrap_or_default())
}

async fn dlq_form(ctx: Ctx, viewer: Viewer, seq: u64, replay: bool) -> Response {
    let console = &ctx.console;
    match subject_of(console, seq).await {
        Ok(subject) => dlq_action_page(
            console,
            &viewer,
            seq,
            replay,
            &DlqForm::default(),
            None,
            StatusCode::OK,
            &subject,
        ),
        Err(status) => {
            layout::error_page(console, &viewer, Nav::DeadLetters, "Dead letter", &status)
        }
    }
}

/// `GET /ui/dlq/{seq}/replay`: the confirmation.
pub(crate) async fn replay_form(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(seq): Path<u64>,
) -> Response {
    dlq_form(ctx, viewer, seq, true).await
}

/// `GET /ui/dlq/{seq}/discard`: the confirmation.
pub(crate) async fn discard_form(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(seq): Path<u64>,
) -> Response {
    dlq_form(ctx, viewer, seq, false).await
}

async fn dlq_act(ctx: Ctx, viewer: Viewer, seq: u64, replay: bool, form: DlqForm) -> Response {
    let console = &ctx.console;
    let subject = subject_of(console, seq).await.unwrap_or_default();
    let refuse = |status: tonic::Status| {
        dlq_action_page(
            console,
            &viewer,
            seq,
            replay,
            &form,
            Some(layout::status_text(&status)),
            layout::http_status(&status),
            &subject,
        )
    };
    let path = if replay {
        method::REPLAY
    } else {
        method::DISCARD
    };
    let identity = match viewer.authorize(console, path) {
        Ok(i) => i,
        Err(status) => return refuse(status),
    };
    if !viewer.auth && !form.operator.trim().is_empty() {
        console
            .inner
            .sessions
            .remember_operator(&viewer.session, form.operator.trim());
    }
    let admin = &console.inner.admin;
    let outcome = if replay {
        admin
            .replay_dead_letter(
                ReplayDeadLetterRequest {
                    seq,
                    operator: form.operator.trim().to_string(),
                },
                identity,
            )
            .await
            .map(|r| {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("replayed", &seq.to_string())
                    .append_pair(
                        "into",
                        &format!("{} {}:{}", r.subject, r.stream, r.stream_seq),
                    )
                    .append_pair("record", &r.journal_seq.to_string());
                q.finish()
            })
    } else {
        admin
            .discard_dead_letter(
                DiscardDeadLetterRequest {
                    seq,
                    operator: form.operator.trim().to_string(),
                    reason: form.reason.trim().to_string(),
                },
                identity,
            )
            .await
            .map(|r| {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("discarded", &seq.to_string())
                    .append_pair("record", &r.journal_seq.to_string());
                q.finish()
            })
    };
    match outcome {
        Ok(q) => Redirect::to(&format!("/ui/dlq?{q}")).into_response(),
        Err(status) => refuse(status),
    }
}

/// `POST /ui/dlq/{seq}/replay`.
pub(crate) async fn replay(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(seq): Path<u64>,
    Form(form): Form<DlqForm>,
) -> Response {
    dlq_act(ctx, viewer, seq, true, form).await
}

/// `POST /ui/dlq/{seq}/discard`.
pub(crate) async fn discard(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(seq): Path<u64>,
    Form(form): Form<DlqForm>,
) -> Response {
    dlq_act(ctx, viewer, seq, false, form).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagaflow_proto::v1::{ClusterNode, ConsumerStatus, PartitionStatus};

    #[test]
    fn hex_dumps_show_offsets_bytes_and_printable_text() {
        let dump = hex_dump(b"\xff\xfe not protobuf <script>");
        let lines: Vec<&str> = dump.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("00000000  ff fe 20 6e 6f 74"),
            "{dump}"
        );
        assert!(lines[0].ends_with(".. not protobuf "), "{dump}");
        assert!(lines[1].starts_with("00000010  3c 73"), "{dump}");
    }

    #[test]
    fn partitions_show_their_owner_and_epoch() {
        let status = ClusterStatusResponse {
            answered_by: "a".into(),
            nodes: vec![ClusterNode {
                node_id: "a".into(),
                grpc_addr: "127.0.0.1:1".into(),
                started_at_unix_ms: 1,
                last_heartbeat_unix_ms: 2,
                partitions: vec![0],
            }],
            partitions: vec![
                PartitionStatus {
                    partition: 0,
                    owner: "a".into(),
                    epoch: 3,
                    pending_events: 0,
                },
                PartitionStatus {
                    partition: 1,
                    owner: String::new(),
                    epoch: 0,
                    pending_events: 7,
                },
            ],
            consumers: vec![ConsumerStatus {
                name: "evt-p1".into(),
                stream: "SAGA_EVENTS".into(),
                pending: 7,
                ack_pending: 0,
                redelivered: 0,
            }],
        };
        let html = cluster_fragment(&status, 10).into_string();
        assert!(html.contains("epoch 3"), "{html}");
        assert!(
            html.contains("no owner") && html.contains("1 without owner"),
            "{html}"
        );
        assert!(html.contains("7 pending"), "{html}");
        assert!(html.contains("evt-p1"), "{html}");
    }
}
