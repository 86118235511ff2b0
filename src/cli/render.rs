//! Output of the client commands: aligned text tables for people, one JSON object for scripts.
//!
//! The JSON is built by hand from the proto messages (no serde derives on generated types), so
//! its shape is ours to keep stable: field names follow the proto, timestamps stay Unix
//! milliseconds (`*_unix_ms`), and JSON inputs and outputs are embedded as JSON, not strings.

use serde_json::{json, Value};

use sagaflow_proto::v1::{
    ClusterStatusResponse, CompensationRecord, DeadLetter, DeadLetterEntry, Definition,
    HistoryEntry, Order, OrderItem, Saga, SalesReport, StepStatus,
};

/// An embedded JSON document: parsed when it is valid JSON, else kept as a string, `null` when empty.
fn embedded(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// `{"sku", "quantity"}`.
pub fn item_json(item: &OrderItem) -> Value {
    json!({ "sku": item.sku, "quantity": item.quantity })
}

/// One step of a saga.
pub fn step_json(s: &StepStatus) -> Value {
    json!({
        "name": s.name,
        "stage": s.stage,
        "action": s.action,
        "compensation": s.compensation,
        "state": s.state,
        "attempts": s.attempts,
        "compensation_attempts": s.compensation_attempts,
        "last_error_kind": s.last_error_kind,
        "last_error": s.last_error,
        "started_at_unix_ms": s.started_at_unix_ms,
        "finished_at_unix_ms": s.finished_at_unix_ms,
        "next_attempt_at_unix_ms": s.next_attempt_at_unix_ms,
        "output": embedded(&s.output_json),
    })
}

/// One entry of the compensation trail.
pub fn compensation_json(c: &CompensationRecord) -> Value {
    json!({
        "step": c.step,
        "action": c.action,
        "state": c.state,
        "attempts": c.attempts,
        "finished_at_unix_ms": c.finished_at_unix_ms,
    })
}

/// One history entry.
pub fn history_json(h: &HistoryEntry) -> Value {
    json!({ "at_unix_ms": h.at_unix_ms, "step": h.step, "what": h.what })
}

/// A saga, as `saga get --json` prints it.
pub fn saga_json(s: &Saga) -> Value {
    json!({
        "saga_id": s.saga_id,
        "saga_name": s.saga_name,
        "definition_version": s.definition_version,
        "status": s.status,
        "phase": s.phase,
        "terminal": s.terminal,
        "reason": s.reason,
        "input": embedded(&s.input_json),
        "started_at_unix_ms": s.started_at_unix_ms,
        "updated_at_unix_ms": s.updated_at_unix_ms,
        "deadline_unix_ms": s.deadline_unix_ms,
        "revision": s.revision,
        "progress": s.progress,
        "stuck": s.stuck,
        "stuck_at_unix_ms": s.stuck_at_unix_ms,
        "steps": s.steps.iter().map(step_json).collect::<Vec<_>>(),
        "compensations": s.compensations.iter().map(compensation_json).collect::<Vec<_>>(),
        "history": s.history.iter().map(history_json).collect::<Vec<_>>(),
    })
}

/// An order, as `order get --json` prints it: the order fields plus its saga's steps,
/// compensations and history at the top level.
pub fn order_json(o: &Order) -> Value {
    let saga = o.saga.clone().unwrap_or_default();
    json!({
        "order_id": o.order_id,
        "customer": o.customer,
        "amount_cents": o.amount_cents,
        "items": o.items.iter().map(item_json).collect::<Vec<_>>(),
        "status": o.status,
        "reason": o.reason,
        "terminal": o.terminal,
        "saga_id": saga.saga_id,
        "saga_name": saga.saga_name,
        "definition_version": saga.definition_version,
        "phase": saga.phase,
        "started_at_unix_ms": saga.started_at_unix_ms,
        "updated_at_unix_ms": saga.updated_at_unix_ms,
        "revision": saga.revision,
        "progress": saga.progress,
        "stuck": saga.stuck,
        "steps": saga.steps.iter().map(step_json).collect::<Vec<_>>(),
        "compensations": saga.compensations.iter().map(compensation_json).collect::<Vec<_>>(),
        "history": saga.history.iter().map(history_json).collect::<Vec<_>>(),
    })
}

/// A loaded saga definition.
pub fn definition_json(d: &Definition) -> Value {
    json!({
        "name": d.name,
        "description": d.description,
        "source": d.source,
        "stages": d.stages.iter().map(|s| json!({ "name": s.name, "steps": s.steps, "status": s.status })).collect::<Vec<_>>(),
        "after_compensation": d.after_compensation,
        "fingerprint": d.fingerprint,
        "services": d.services.iter().map(|s| json!({ "name": s.name, "actions": s.actions, "consumer": s.consumer })).collect::<Vec<_>>(),
    })
}

/// The sales report.
pub fn sales_json(r: &SalesReport) -> Value {
    json!({
        "completed_orders": r.completed_orders,
        "revenue_cents": r.revenue_cents,
        "events_processed": r.events_processed,
        "skus": r.skus.iter().map(|s| json!({ "sku": s.sku, "units": s.units, "revenue_cents": s.revenue_cents })).collect::<Vec<_>>(),
    })
}

/// Left-aligned columns separated by two spaces; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `-` for empty text.
fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC); `-` for 0.
pub use crate::clock::format_ms as time;

/// `SKU-1 x2, SKU-2 x1`.
pub fn items_text(items: &[OrderItem]) -> String {
    if items.is_empty() {
        return "-".to_string();
    }
    items
        .iter()
        .map(|i| format!("{} x{}", i.sku, i.quantity))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `last_error_kind: last_error`, or `-`.
fn last_error(s: &StepStatus) -> String {
    match (s.last_error_kind.is_empty(), s.last_error.is_empty()) {
        (true, true) => "-".to_string(),
        (false, true) => s.last_error_kind.clone(),
        (true, false) => s.last_error.clone(),
        (false, false) => format!("{}: {}", s.last_error_kind, s.last_error),
    }
}

/// The body shared by `order get` and `saga get`: steps, compensation trail, history.
fn saga_body(s: &Saga) -> String {
    let mut out = String::from("steps:\n");
    if s.steps.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut rows = vec![[
            "STEP",
            "STAGE",
            "STATE",
            "ATTEMPTS",
            "LAST ERROR",
            "STARTED",
            "FINISHED",
            "NEXT ATTEMPT",
        ]
        .map(String::from)
        .to_vec()];
        for step in &s.steps {
            let attempts = if step.compensation_attempts > 0 {
                format!("{} (+{} comp)", step.attempts, step.compensation_attempts)
            } else {
                step.attempts.to_string()
            };
            rows.push(vec![
                step.name.clone(),
                or_dash(&step.stage),
                or_dash(&step.state),
                attempts,
                last_error(step),
                time(step.started_at_unix_ms),
                time(step.finished_at_unix_ms),
                time(step.next_attempt_at_unix_ms),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out.push_str("compensations:\n");
    if s.compensations.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut rows = vec![["STEP", "ACTION", "STATE", "ATTEMPTS", "FINISHED"]
            .map(String::from)
            .to_vec()];
        for c in &s.compensations {
            rows.push(vec![
                c.step.clone(),
                or_dash(&c.action),
                or_dash(&c.state),
                c.attempts.to_string(),
                time(c.finished_at_unix_ms),
            ]);
        }
        out.push_str(&indent(&table(&rows)));
    }
    out.push_str("history:\n");
    if s.history.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .history
            .iter()
            .map(|h| vec![time(h.at_unix_ms), or_dash(&h.step), h.what.clone()])
            .collect();
        out.push_str(&indent(&table(&rows)));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn status_line(status: &str, terminal: bool, phase: &str) -> String {
    let mut notes = Vec::new();
    if terminal {
        notes.push("terminal".to_string());
    }
    if !phase.is_empty() {
        notes.push(format!("phase {phase}"));
    }
    if notes.is_empty() {
        or_dash(status)
    } else {
        format!("{} ({})", or_dash(status), notes.join(", "))
    }
}

/// `order get`, for people.
pub fn order_text(o: &Order) -> String {
    let saga = o.saga.clone().unwrap_or_default();
    let header = vec![
        vec!["order".to_string(), o.order_id.clone()],
        vec![
            "status".to_string(),
            status_line(&o.status, o.terminal, &saga.phase),
        ],
        vec!["reason".to_string(), or_dash(&o.reason)],
        vec!["progress".to_string(), or_dash(&saga.progress)],
        vec!["customer".to_string(), or_dash(&o.customer)],
        vec!["amount".to_string(), format!("{} cents", o.amount_cents)],
        vec!["items".to_string(), items_text(&o.items)],
        vec![
            "saga".to_string(),
            format!(
                "{} ({} version {})",
                or_dash(&saga.saga_id),
                or_dash(&saga.saga_name),
                or_dash(&saga.definition_version)
            ),
        ],
        vec!["started".to_string(), time(saga.started_at_unix_ms)],
        vec!["updated".to_string(), time(saga.updated_at_unix_ms)],
    ];
    format!("{}{}", table(&header), saga_body(&saga))
}

/// `saga get`, for people.
pub fn saga_text(s: &Saga) -> String {
    let header = vec![
        vec![
            "saga".to_string(),
            format!(
                "{} ({} version {})",
                s.saga_id,
                or_dash(&s.saga_name),
                or_dash(&s.definition_version)
            ),
        ],
        vec![
            "status".to_string(),
            status_line(&s.status, s.terminal, &s.phase),
        ],
        vec!["reason".to_string(), or_dash(&s.reason)],
        vec!["progress".to_string(), or_dash(&s.progress)],
        vec!["input".to_string(), or_dash(&s.input_json)],
        vec!["started".to_string(), time(s.started_at_unix_ms)],
        vec!["updated".to_string(), time(s.updated_at_unix_ms)],
        vec!["deadline".to_string(), time(s.deadline_unix_ms)],
        vec!["revision".to_string(), s.revision.to_string()],
    ];
    format!("{}{}", table(&header), saga_body(s))
}

/// `order list`, for people.
pub fn orders_text(orders: &[Order]) -> String {
    if orders.is_empty() {
        return "no orders\n".to_string();
    }
    let mut rows = vec![[
        "ORDER",
        "STATUS",
        "TERMINAL",
        "CUSTOMER",
        "AMOUNT (cents)",
        "ITEMS",
        "REASON",
    ]
    .map(String::from)
    .to_vec()];
    for o in orders {
        rows.push(vec![
            o.order_id.clone(),
            or_dash(&o.status),
            if o.terminal { "yes" } else { "no" }.to_string(),
            or_dash(&o.customer),
            o.amount_cents.to_string(),
            items_text(&o.items),
            or_dash(&o.reason),
        ]);
    }
    table(&rows)
}

/// One line of `order watch`: time, order, status, each step's state.
pub fn watch_line(o: &Order) -> String {
    let saga = o.saga.clone().unwrap_or_default();
    let mut line = format!(
        "{} {} {}",
        time(saga.updated_at_unix_ms),
        o.order_id,
        or_dash(&o.status)
    );
    for step in &saga.steps {
        line.push_str(&format!(" {}={}", step.name, or_dash(&step.state)));
    }
    if !o.reason.is_empty() {
        line.push_str(&format!(" reason={:?}", o.reason));
    }
    if o.terminal {
        line.push_str(" (terminal)");
    }
    line
}

/// `saga list`, for people.
pub fn definitions_text(defs: &[Definition]) -> String {
    if defs.is_empty() {
        return "no saga definitions loaded\n".to_string();
    }
    let mut rows = vec![["NAME", "STAGES", "DESCRIPTION"].map(String::from).to_vec()];
    for d in defs {
        let mut stages = d
            .stages
            .iter()
            .map(|s| s.steps.join("+"))
            .collect::<Vec<_>>()
            .join(" -> ");
        if !d.after_compensation.is_empty() {
            stages.push_str(&format!(" (after compensation: {})", d.after_compensation));
        }
        rows.push(vec![d.name.clone(), stages, or_dash(&d.description)]);
    }
    let mut out = table(&rows);
    for d in defs.iter().filter(|d| !d.services.is_empty()) {
        out.push_str(&format!("\n{} calls:\n", d.name));
        let mut rows = vec![["  SERVICE", "ACTIONS", "CONSUMER"]
            .map(String::from)
            .to_vec()];
        for s in &d.services {
            rows.push(vec![
                format!("  {}", s.name),
                s.actions.join(", "),
                if s.consumer {
                    format!("svc-{}", s.name)
                } else {
                    "none: nobody serves it yet".to_string()
                },
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

/// `analytics sales`, for people.
pub fn sales_text(r: &SalesReport) -> String {
    let header = vec![
        vec![
            "completed orders".to_string(),
            r.completed_orders.to_string(),
        ],
        vec!["revenue".to_string(), format!("{} cents", r.revenue_cents)],
        vec![
            "events processed".to_string(),
            r.events_processed.to_string(),
        ],
    ];
    let mut out = table(&header);
    if !r.skus.is_empty() {
        let mut rows = vec![["SKU", "UNITS", "REVENUE (cents)"]
            .map(String::from)
            .to_vec()];
        rows.extend(r.skus.iter().map(|s| {
            vec![
                s.sku.clone(),
                s.units.to_string(),
                s.revenue_cents.to_string(),
            ]
        }));
        out.push_str(&table(&rows));
    }
    out
}

/// `cluster status --json`: `answered_by`, `nodes`, `partitions`, `consumers`.
pub fn cluster_json(c: &ClusterStatusResponse) -> Value {
    json!({
        "answered_by": c.answered_by,
        "nodes": c.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "grpc_addr": n.grpc_addr,
            "started_at_unix_ms": n.started_at_unix_ms,
            "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms,
            "partitions": n.partitions,
        })).collect::<Vec<_>>(),
        "partitions": c.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "owner": p.owner,
            "epoch": p.epoch,
            "pending_events": p.pending_events,
        })).collect::<Vec<_>>(),
        "consumers": c.consumers.iter().map(|k| json!({
            "name": k.name,
            "stream": k.stream,
            "pending": k.pending,
            "ack_pending": k.ack_pending,
            "redelivered": k.redelivered,
        })).collect::<Vec<_>>(),
    })
}

/// Ascending partition numbers as ranges: `0-3,5,7-8`; `-` when empty.
pub fn ranges(parts: &[u32]) -> String {
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "-".to_string()
    } else {
        out.join(",")
    }
}

/// `cluster status`, for people: nodes, partitions, consumers.
pub fn cluster_text(c: &ClusterStatusResponse) -> String {
    let mut out = format!(
        "answered by {}: {} node(s), {} of {} partition(s) owned\n\n",
        c.answered_by,
        c.nodes.len(),
        c.partitions.iter().filter(|p| !p.owner.is_empty()).count(),
        c.partitions.len()
    );
    let mut rows = vec![[
        "NODE",
        "GRPC",
        "STARTED",
        "LAST HEARTBEAT",
        "#",
        "PARTITIONS",
    ]
    .map(String::from)
    .to_vec()];
    rows.extend(c.nodes.iter().map(|n| {
        vec![
            n.node_id.clone(),
            n.grpc_addr.clone(),
            time(n.started_at_unix_ms),
            time(n.last_heartbeat_unix_ms),
            n.partitions.len().to_string(),
            ranges(&n.partitions),
        ]
    }));
    out.push_str(&table(&rows));
    out.push('\n');
    let mut rows = vec![["PARTITION", "OWNER", "EPOCH", "PENDING EVENTS"]
        .map(String::from)
        .to_vec()];
    rows.extend(c.partitions.iter().map(|p| {
        vec![
            p.partition.to_string(),
            if p.owner.is_empty() {
                "(free)".to_string()
            } else {
                p.owner.clone()
            },
            p.epoch.to_string(),
            p.pending_events.to_string(),
        ]
    }));
    out.push_str(&table(&rows));
    out.push('\n');
    let mut rows = vec![[
        "STREAM",
        "CONSUMER",
        "PENDING",
        "ACK PENDING",
        "LAG",
        "REDELIVERED",
    ]
    .map(String::from)
    .to_vec()];
    rows.extend(c.consumers.iter().map(|k| {
        vec![
            k.stream.clone(),
            k.name.clone(),
            k.pending.to_string(),
            k.ack_pending.to_string(),
            k.pending.saturating_add(k.ack_pending).to_string(),
            k.redelivered.to_string(),
        ]
    }));
    out.push_str(&table(&rows));
    out
}

/// A dead letter (or journal record) as listed: proto field names, `journal` null unless set.
pub fn dead_letter_entry_json(e: &DeadLetterEntry) -> Value {
    json!({
        "seq": e.seq,
        "source": e.source,
        "subject": e.subject,
        "origin": e.origin,
        "reason": e.reason,
        "at_unix_ms": e.at_unix_ms,
        "payload_size": e.payload_size,
        "discarded": e.discarded,
        "journal": e.journal.as_ref().map(|j| json!({
            "dead_letter_seq": j.dead_letter_seq,
            "action": j.action,
            "operator": j.operator,
            "reason": j.reason,
            "at_unix_ms": j.at_unix_ms,
        })),
    })
}

/// `{"dead_letters": [...]}`.
pub fn dead_letters_json(entries: &[DeadLetterEntry]) -> Value {
    json!({ "dead_letters": entries.iter().map(dead_letter_entry_json).collect::<Vec<_>>() })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The payload as text for people: UTF-8 (invalid bytes as U+FFFD), control characters but
/// newlines and tabs as `.`.
pub fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '.'
            } else {
                c
            }
        })
        .collect()
}

/// One dead letter with `payload_hex`, `payload_utf8` (lossy) and its headers.
pub fn dead_letter_json(d: &DeadLetter) -> Value {
    let mut v = d
        .entry
        .as_ref()
        .map(dead_letter_entry_json)
        .unwrap_or_else(|| json!({}));
    let headers: std::collections::BTreeMap<&String, &String> = d.headers.iter().collect();
    if let Value::Object(map) = &mut v {
        map.insert("payload_hex".into(), Value::String(hex(&d.payload)));
        map.insert(
            "payload_utf8".into(),
            Value::String(String::from_utf8_lossy(&d.payload).into_owned()),
        );
        map.insert("headers".into(), json!(headers));
    }
    v
}

/// The dead-letter table (`dlq list`).
pub fn dead_letters_text(entries: &[DeadLetterEntry]) -> String {
    if entries.is_empty() {
        return "no dead letters\n".to_string();
    }
    let mut rows = vec![["SEQ", "SOURCE", "AT", "SUBJECT", "BYTES", "REASON"]
        .map(String::from)
        .to_vec()];
    rows.extend(entries.iter().map(|e| match &e.journal {
        Some(j) => vec![
            e.seq.to_string(),
            "journal".to_string(),
            time(j.at_unix_ms),
            format!("{} of #{} by {}", j.action, j.dead_letter_seq, j.operator),
            e.payload_size.to_string(),
            or_dash(&j.reason),
        ],
        None => vec![
            e.seq.to_string(),
            or_dash(&e.source),
            time(e.at_unix_ms),
            or_dash(&e.subject),
            e.payload_size.to_string(),
            or_dash(&e.reason),
        ],
    }));
    table(&rows)
}

/// One dead letter for people (`dlq show`): fields, headers, hex dump and a UTF-8 preview.
pub fn dead_letter_text(d: &DeadLetter) -> String {
    let e = d.entry.clone().unwrap_or_default();
    let mut rows: Vec<Vec<String>> = vec![
        vec!["seq:".into(), e.seq.to_string()],
        vec!["source:".into(), or_dash(&e.source)],
        vec!["subject:".into(), or_dash(&e.subject)],
        vec!["origin:".into(), or_dash(&e.origin)],
        vec!["at:".into(), time(e.at_unix_ms)],
        vec!["reason:".into(), or_dash(&e.reason)],
        vec!["payload:".into(), format!("{} bytes", d.payload.len())],
    ];
    let headers: std::collections::BTreeMap<&String, &String> = d.headers.iter().collect();
    let mut out = String::new();
    rows.push(vec!["headers:".into(), String::new()]);
    out.push_str(&table(&rows));
    for (k, v) in headers {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    out.push_str("payload (hex):\n");
    for chunk in d.payload.chunks(32) {
        out.push_str(&format!("  {}\n", hex(chunk)));
    }
    out.push_str("payload (utf-8, lossy):\n");
    out.push_str(&indent(&preview(&d.payload)));
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// `saga attention`, for people: one line per saga needing an operator.
pub fn attention_text(sagas: &[Saga]) -> String {
    if sagas.is_empty() {
        return "no saga needs attention\n".to_string();
    }
    let mut rows = vec![vec![
        "SAGA".to_string(),
        "NAME".to_string(),
        "STATUS".to_string(),
        "UPDATED".to_string(),
        "WHY".to_string(),
    ]];
    for s in sagas {
        rows.push(vec![
            s.saga_id.clone(),
            s.saga_name.clone(),
            if s.stuck {
                format!("{} (stuck)", s.status)
            } else {
                s.status.clone()
            },
            time(s.updated_at_unix_ms),
            or_dash(&s.progress),
        ]);
    }
    table(&rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cli_dead_letters_render() {
        let d = DeadLetter {
            entry: Some(DeadLetterEntry {
                seq: 3,
                source: "events".into(),
                subject: "sagaflow.evt.1.x.reply".into(),
                reason: "undecodable reply".into(),
                payload_size: 3,
                ..Default::default()
            }),
            payload: vec![0xff, b'a', b'\n'],
            headers: [("Sagaflow-Dlq-Source".to_string(), "events".to_string())].into(),
        };
        assert_eq!(hex(&d.payload), "ff610a");
        let j = dead_letter_json(&d);
        assert_eq!(j["payload_hex"], "ff610a");
        assert_eq!(j["payload_utf8"], "\u{fffd}a\n");
        assert_eq!(j["seq"], 3);
        assert_eq!(j["headers"]["Sagaflow-Dlq-Source"], "events");
        let t = dead_letter_text(&d);
        assert!(
            t.contains("ff610a") && t.contains("undecodable reply"),
            "{t}"
        );
        let list = dead_letters_text(std::slice::from_ref(d.entry.as_ref().unwrap()));
        assert!(list.starts_with("SEQ"), "{list}");
        assert_eq!(dead_letters_text(&[]), "no dead letters\n");
    }

    #[test]
    fn cli_partition_ranges_are_compact() {
        assert_eq!(ranges(&[]), "-");
        assert_eq!(ranges(&[4]), "4");
        assert_eq!(ranges(&[3, 0, 1, 2, 5, 7, 8]), "0-3,5,7-8");
    }

    #[test]
    fn cli_cluster_status_renders() {
        use sagaflow_proto::v1::{ClusterNode, ConsumerStatus, PartitionStatus};
        let c = ClusterStatusResponse {
            answered_by: "n1".into(),
            nodes: vec![ClusterNode {
                node_id: "n1".into(),
                grpc_addr: "127.0.0.1:1".into(),
                started_at_unix_ms: 1,
                last_heartbeat_unix_ms: 2,
                partitions: vec![0],
            }],
            partitions: vec![
                PartitionStatus {
                    partition: 0,
                    owner: "n1".into(),
                    epoch: 3,
                    pending_events: 4,
                },
                PartitionStatus {
                    partition: 1,
                    owner: String::new(),
                    epoch: 0,
                    pending_events: 0,
                },
            ],
            consumers: vec![ConsumerStatus {
                name: "evt-p0".into(),
                stream: "SAGA_EVENTS".into(),
                pending: 3,
                ack_pending: 1,
                redelivered: 0,
            }],
        };
        let v = cluster_json(&c);
        assert_eq!(v["answered_by"], "n1");
        assert_eq!(v["nodes"][0]["partitions"], json!([0]));
        assert_eq!(v["partitions"][1]["owner"], "");
        assert_eq!(v["consumers"][0]["ack_pending"], 1);
        let text = cluster_text(&c);
        assert!(
            text.starts_with("answered by n1: 1 node(s), 1 of 2 partition(s) owned"),
            "{text}"
        );
        assert!(text.contains("(free)"), "{text}");
        assert!(text.contains("evt-p0"), "{text}");
    }

    fn order() -> Order {
        Order {
            order_id: "o-1".into(),
            customer: "alice".into(),
            amount_cents: 1200,
            items: vec![OrderItem {
                sku: "SKU-1".into(),
                quantity: 2,
            }],
            status: "CANCELLED".into(),
            reason: "payment declined".into(),
            terminal: true,
            saga: Some(Saga {
                saga_id: "order-o-1".into(),
                phase: "COMPENSATED".into(),
                input_json: r#"{"order_id":"o-1"}"#.into(),
                steps: vec![StepStatus {
                    name: "charge".into(),
                    state: "FAILED".into(),
                    attempts: 1,
                    last_error_kind: "declined".into(),
                    last_error: "over limit".into(),
                    started_at_unix_ms: 1_700_000_000_123,
                    ..Default::default()
                }],
                compensations: vec![CompensationRecord {
                    step: "reserve".into(),
                    attempts: 2,
                    ..Default::default()
                }],
                history: vec![HistoryEntry {
                    at_unix_ms: 1,
                    step: "charge".into(),
                    what: "failed".into(),
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn cli_order_json_has_the_documented_fields() {
        let v = order_json(&order());
        assert_eq!(v["order_id"], "o-1");
        assert_eq!(v["status"], "CANCELLED");
        assert_eq!(v["terminal"], true);
        assert_eq!(v["amount_cents"], 1200);
        assert_eq!(v["items"][0]["quantity"], 2);
        assert_eq!(v["steps"][0]["name"], "charge");
        assert_eq!(v["steps"][0]["state"], "FAILED");
        assert_eq!(v["steps"][0]["attempts"], 1);
        assert_eq!(v["steps"][0]["last_error"], "over limit");
        assert_eq!(v["compensations"][0]["step"], "reserve");
        assert_eq!(v["history"][0]["what"], "failed");
        assert_eq!(v["reason"], "payment declined");
        assert_eq!(
            saga_json(order().saga.as_ref().unwrap())["input"]["order_id"],
            "o-1"
        );
    }

    #[test]
    fn cli_order_text_shows_steps_and_trail() {
        let text = order_text(&order());
        assert!(
            text.contains("CANCELLED (terminal, phase COMPENSATED)"),
            "{text}"
        );
        assert!(text.contains("declined: over limit"), "{text}");
        assert!(text.contains("2023-11-14T22:13:20.123Z"), "{text}");
        assert!(text.contains("compensations:\n  STEP"), "{text}");
        let line = watch_line(&order());
        assert!(line.contains("o-1 CANCELLED charge=FAILED"), "{line}");
    }

    #[test]
    fn cli_times_are_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01T00:00:00.001Z");
        assert_eq!(time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn cli_tables_align() {
        let t = table(&[
            vec!["A".into(), "BB".into()],
            vec!["ccc".into(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
