//! Bounded snapshots: [`Limits`], truncation of outputs and texts, history compaction
//! ([`Saga::bound`]). Every truncation is idempotent (a truncated text fits its cap), so
//! bounding a bounded snapshot changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Effect, Happening, HistoryEntry, Intervention, Millis, Saga};
use crate::definition::SagaDefinition;

/// What one history entry costs besides its texts, in the bytes compaction counts: more than
/// its encoding takes (time, step, variant, numbers and length prefixes).
const ENTRY_OVERHEAD: usize = 64;

/// Entries kept whatever their age, besides the per-step ones (see [`Limits`]).
const PINNED_PER_SAGA: usize = 4;

/// Entries kept whatever their age, per step slot, besides its last answers and refusal
/// (three more, counted at their own largest size in [`Limits::snapshot_bound`]).
const PINNED_PER_SLOT: usize = 4;

/// Longest output marker (its two numbers at their widest).
const OUTPUT_MARKER_MAX: usize = 96;

/// Size limits that keep a saga's snapshot bounded: it is stored whole in one KV value, so it
/// must stay under the server's max payload whatever participants answer and operators do.
///
/// The machine gets them per call: [`Saga::apply_with_limits`] (the host passes its
/// configuration), or [`Saga::apply`] with [`Limits::default`]. After every change
/// ([`Saga::bound`]) it:
///
/// - replaces an output larger than [`Limits::max_output_bytes`] by a short UTF-8 marker,
///   `[output truncated: N bytes, cap C]`, and the largest outputs by such markers while all
///   of them together exceed [`Limits::max_total_output_bytes`] (outputs are only displayed:
///   commands carry the saga's input, never an earlier step's output);
/// - cuts error kinds and messages, reasons and operators' texts too long in the middle, at
///   char boundaries, around a marker ` … [truncated, N bytes] … ` (both ends stay readable:
///   a reason ends with its latest part);
/// - compacts the history past [`Limits::max_history`] entries or
///   [`Limits::max_history_bytes`]: it keeps the first [`Limits::history_head`] entries, the
///   entries facts are derived from (below), and as many of the newest as fit (at least
///   [`Limits::MIN_TAIL`]); the others are counted in one [`Happening::Elided`] marker placed
///   just before the newest entries.
///
/// Entries kept whatever their age, at most `4 + 7 × step slots` of them:
///
/// - the last `Parked` entry and the last `Status` before it (the status an operator's action
///   restores), and the last `Status` (so that it is there when the saga parks next);
/// - the last `CompensationStarted` (why the saga compensates);
/// - per step, the last applied operator `retry` and the first forward and compensation
///   attempt sent after it ([`Saga::attempts_in_budget`]), and its first compensation attempt
///   ever (the host measures compensations from it);
/// - per step, its last forward answer (`Succeeded` or `AttemptFailed`) and its last
///   `CompensationAttemptFailed` (what a second reply is compared with, [`Saga::reply_fit`]),
///   and its last `ReplyRefused` (where the replies refused for its latest attempt are
///   counted).
///
/// Parkings elided are counted in the marker ([`Saga::parkings`]). A redelivered intervention
/// is recognised by its id only while its entry is kept: among the newest entries.
///
/// A value below its minimum (the `MIN_*` constants) counts as the minimum. Deserializes from
/// a table with any of the fields (the others keep their defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest output of one step stored whole, in bytes (default 64 KiB, at least
    /// [`Limits::MIN_OUTPUT_BYTES`]); a larger one is replaced by
    /// `[output truncated: N bytes, cap C]`.
    pub max_output_bytes: usize,
    /// Most bytes of all a saga's outputs together (default 256 KiB): beyond it, the largest
    /// are replaced by markers.
    pub max_total_output_bytes: usize,
    /// Longest error kind stored (default 64 bytes, at least [`Limits::MIN_TEXT_BYTES`]).
    pub max_error_kind_bytes: usize,
    /// Longest error message stored (default 2 KiB, at least [`Limits::MIN_TEXT_BYTES`]).
    pub max_error_bytes: usize,
    /// Longest reason (the saga's, a compensation's, a parking's), operator's name or text,
    /// intervention request id or refusal stored (default 1 KiB, at least
    /// [`Limits::MIN_TEXT_BYTES`]). Keep it at least as long as the longest request id the API
    /// accepts: a longer id is stored truncated ([`Limits::stored_text`]).
    pub max_text_bytes: usize,
    /// Most history entries kept, besides the [`Happening::Elided`] marker (default 200, at
    /// least [`Limits::MIN_HISTORY`]); a definition with many steps may keep a few more (see
    /// [`Limits::snapshot_bound`]).
    pub max_history: usize,
    /// Most bytes of history kept, counted generously (default 256 KiB, at least
    /// [`Limits::MIN_HISTORY_BYTES`]).
    pub max_history_bytes: usize,
    /// Oldest history entries always kept (default 20, at most half of `max_history`).
    pub history_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Limits {
    /// Smallest cap of any text: room for the truncation marker and some text.
    pub const MIN_TEXT_BYTES: usize = 64;

    /// Smallest output cap: room for the output truncation marker.
    pub const MIN_OUTPUT_BYTES: usize = 128;

    /// Smallest [`Limits::max_history`].
    pub const MIN_HISTORY: usize = 32;

    /// Smallest [`Limits::max_history_bytes`].
    pub const MIN_HISTORY_BYTES: usize = 8 * 1024;

    /// Newest history entries compaction always keeps, whatever the budgets: more than one
    /// transition logs for a saga of a few steps, so [`Saga::logged_since`] sees them all.
    pub const MIN_TAIL: usize = 16;

    /// The default limits: a snapshot of a saga of ten steps with a 256 KiB input stays under
    /// NATS's default max payload of 1 MiB ([`Limits::snapshot_bound`]).
    pub const DEFAULT: Limits = Limits {
        max_output_bytes: 64 * 1024,
        max_total_output_bytes: 256 * 1024,
        max_error_kind_bytes: 64,
        max_error_bytes: 2 * 1024,
        max_text_bytes: 1024,
        max_history: 200,
        max_history_bytes: 256 * 1024,
        history_head: 20,
    };

    /// The limits in force: every value raised to its minimum, the head at most half the
    /// history.
    fn effective(&self) -> Limits {
        let max_history = self.max_history.max(Limits::MIN_HISTORY);
        Limits {
            max_output_bytes: self.max_output_bytes.max(Limits::MIN_OUTPUT_BYTES),
            max_total_output_bytes: self.max_total_output_bytes.max(Limits::MIN_OUTPUT_BYTES),
            max_error_kind_bytes: self.max_error_kind_bytes.max(Limits::MIN_TEXT_BYTES),
            max_error_bytes: self.max_error_bytes.max(Limits::MIN_TEXT_BYTES),
            max_text_bytes: self.max_text_bytes.max(Limits::MIN_TEXT_BYTES),
            max_history,
            max_history_bytes: self.max_history_bytes.max(Limits::MIN_HISTORY_BYTES),
            history_head: self.history_head.min(max_history / 2),
        }
    }

    /// `text` as the machine stores a reason, an operator's name or text, or a request id:
    /// unchanged if it fits [`Limits::max_text_bytes`], else cut in the middle around a marker.
    /// Compare a request id with the stored ones through this.
    pub fn stored_text(&self, text: &str) -> String {
        fit(text, self.effective().max_text_bytes).unwrap_or_else(|| text.to_string())
    }

    /// `kind` as the machine stores an error kind (cut like [`Limits::stored_text`] past
    /// [`Limits::max_error_kind_bytes`]): compare a reported kind with a stored one through
    /// this.
    pub fn stored_kind<'a>(&self, kind: &'a str) -> std::borrow::Cow<'a, str> {
        fit(kind, self.effective().max_error_kind_bytes)
            .map_or(std::borrow::Cow::Borrowed(kind), std::borrow::Cow::Owned)
    }

    /// Most bytes a snapshot of a saga of `def`, with an id of `id_bytes` and an input of
    /// `input_bytes`, encodes to ([`crate::wire::encode_snapshot`]) under these limits: compare
    /// it with the store's max payload when loading definitions. Generous, not tight.
    pub fn snapshot_bound(
        &self,
        def: &SagaDefinition,
        id_bytes: usize,
        input_bytes: usize,
    ) -> usize {
        let l = self.effective();
        let slots = def.step_slots();
        let label = std::iter::once(&def.statuses.initial)
            .chain([
                &def.statuses.completed,
                &def.statuses.compensated,
                &def.statuses.failed,
                &def.statuses.needs_attention,
            ])
            .chain(def.stages.iter().filter_map(|s| s.status.as_ref()))
            .map(String::len)
            .max()
            .unwrap_or(0);
        // Envelope, numbers and length prefixes; the status; the reason; the plan.
        let saga = 192 + id_bytes + def.name.len() + input_bytes + label + l.max_text_bytes;
        let per_slot = 128 + l.max_error_kind_bytes + l.max_error_bytes;
        let outputs = l
            .max_total_output_bytes
            .max(slots * OUTPUT_MARKER_MAX)
            .min(slots * l.max_output_bytes);
        // The largest entry: an intervention (id, action, operator, reason, refusal), a failed
        // attempt, a status, a reason.
        let entry = ENTRY_OVERHEAD
            + (4 * l.max_text_bytes + 16)
                .max(l.max_error_kind_bytes + l.max_error_bytes)
                .max(label);
        let pinned = PINNED_PER_SAGA + PINNED_PER_SLOT * slots;
        // Per slot besides: its last forward and compensation answers and its last refusal.
        let answers = 2 * (ENTRY_OVERHEAD + l.max_error_kind_bytes + l.max_error_bytes)
            + ENTRY_OVERHEAD
            + l.max_text_bytes;
        let history = l.max_history_bytes.max(
            (l.history_head + pinned + Limits::MIN_TAIL) * entry + slots * answers + ENTRY_OVERHEAD,
        );
        saga + slots * per_slot + outputs + history
    }

    /// `intervention` with its texts bounded (the output of a skip is bounded once stored).
    pub(super) fn bound_intervention(&self, intervention: Intervention) -> Intervention {
        let cap = self.effective().max_text_bytes;
        let mut i = intervention;
        fit_in_place(&mut i.id, cap);
        fit_in_place(&mut i.operator, cap);
        fit_in_place(&mut i.reason, cap);
        i
    }

    /// Bounds the texts effects carry like the snapshot's.
    pub(super) fn bound_effects(&self, effects: &mut [Effect]) {
        let cap = self.effective().max_text_bytes;
        for e in effects {
            match e {
                Effect::Parked { reason, .. } => fit_in_place(reason, cap),
                Effect::Unparked {
                    operator, request, ..
                } => {
                    fit_in_place(operator, cap);
                    fit_in_place(request, cap);
                }
                Effect::DeadLetterReply { reason } => fit_in_place(reason, cap),
                Effect::Send(_) | Effect::StatusChanged { .. } => {}
            }
        }
    }
}

/// Whether `what` is an operator's retry that was applied (it grants a fresh retry budget).
pub(super) fn is_applied_retry(what: &Happening) -> bool {
    matches!(
        what,
        Happening::Intervened { action, refused, .. } if action == "retry" && refused.is_empty()
    )
}

fn is_elided(h: &HistoryEntry) -> bool {
    matches!(h.what, Happening::Elided { .. })
}

fn is_status(h: &HistoryEntry) -> bool {
    matches!(h.what, Happening::Status { .. })
}

/// `text` cut in the middle to fit `cap` bytes, or `None` if it fits. The result fits `cap`
/// (given `cap` ≥ [`Limits::MIN_TEXT_BYTES`]), so fitting it again changes nothing.
fn fit(text: &str, cap: usize) -> Option<String> {
    if text.len() <= cap {
        return None;
    }
    let marker = format!(" … [truncated, {} bytes] … ", text.len());
    let room = cap.saturating_sub(marker.len());
    // Two thirds of the room for the beginning, the rest for the end.
    let head = floor_boundary(text, room * 2 / 3);
    let tail = ceil_boundary(text, text.len() - (room - head));
    let mut out = String::with_capacity(cap);
    out.push_str(text.get(..head).unwrap_or_default());
    out.push_str(&marker);
    out.push_str(text.get(tail..).unwrap_or_default());
    Some(out)
}

fn fit_in_place(text: &mut String, cap: usize) {
    if let Some(short) = fit(text, cap) {
        *text = short;
    }
}

/// The largest char boundary of `s` at or before `i`.
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The smallest char boundary of `s` at or after `i`.
fn ceil_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Bytes compaction counts for one entry: its texts plus a generous overhead.
fn weight(h: &HistoryEntry) -> usize {
    ENTRY_OVERHEAD
        + match &h.what {
            Happening::AttemptFailed { kind, message, .. }
            | Happening::CompensationAttemptFailed { kind, message, .. } => {
                kind.len() + message.len()
            }
            Happening::Status { status } => status.len(),
            Happening::CompensationStarted { reason }
            | Happening::Parked { reason }
            | Happening::ReplyRefused { reason, .. } => reason.len(),
            Happening::Waiting { signal } => signal.len(),
            Happening::SignalReceived { name, id, .. } | Happening::SignalIgnored { name, id } => {
                name.len() + id.len()
            }
            Happening::Intervened {
                id,
                action,
                operator,
                reason,
                refused,
            } => id.len() + action.len() + operator.len() + reason.len() + refused.len(),
            Happening::Started
            | Happening::Sent { .. }
            | Happening::Succeeded { .. }
            | Happening::RetryScheduled { .. }
            | Happening::StepFailed
            | Happening::CompensationSent { .. }
            | Happening::Compensated
            | Happening::Skipped
            | Happening::Finished { .. }
            | Happening::CompensationRetryScheduled { .. }
            | Happening::Unparked
            | Happening::Elided { .. } => 0,
        }
}

/// Which of `entries` (the history without its marker, oldest first) the machine or its host
/// still derives facts from: compaction keeps them (see [`Limits`]).
fn pinned(entries: &[&HistoryEntry]) -> Vec<bool> {
    #[derive(Default)]
    struct Slot {
        retry: Option<usize>,
        sent_after: Option<usize>,
        comp_sent_after: Option<usize>,
        first_comp_sent: Option<usize>,
        last_answer: Option<usize>,
        last_comp_failure: Option<usize>,
        last_refused: Option<usize>,
    }
    let mut pin = vec![false; entries.len()];
    let mut mark = |k: Option<usize>| {
        if let Some(k) = k {
            pin[k] = true;
        }
    };
    let last = |f: fn(&HistoryEntry) -> bool, before: usize| {
        entries
            .get(..before)
            .and_then(|e| e.iter().rposition(|h| f(h)))
    };
    let parked = last(
        |h| matches!(h.what, Happening::Parked { .. }),
        entries.len(),
    );
    mark(parked);
    mark(parked.and_then(|p| last(is_status, p)));
    mark(last(is_status, entries.len()));
    mark(last(
        |h| matches!(h.what, Happening::CompensationStarted { .. }),
        entries.len(),
    ));
    let mut slots: BTreeMap<u32, Slot> = BTreeMap::new();
    for (k, h) in entries.iter().enumerate() {
        let Some(step) = h.step else { continue };
        let s = slots.entry(step).or_default();
        match &h.what {
            what if is_applied_retry(what) => {
                *s = Slot {
                    retry: Some(k),
                    first_comp_sent: s.first_comp_sent,
                    last_answer: s.last_answer,
                    last_comp_failure: s.last_comp_failure,
                    last_refused: s.last_refused,
                    ..Slot::default()
                };
            }
            Happening::Sent { .. } if s.retry.is_some() => {
                s.sent_after.get_or_insert(k);
            }
            Happening::CompensationSent { .. } => {
                s.first_comp_sent.get_or_insert(k);
                if s.retry.is_some() {
                    s.comp_sent_after.get_or_insert(k);
                }
            }
            Happening::Succeeded { .. } | Happening::AttemptFailed { .. } => {
                s.last_answer = Some(k);
            }
            Happening::CompensationAttemptFailed { .. } => s.last_comp_failure = Some(k),
            Happening::ReplyRefused { .. } => s.last_refused = Some(k),
            _ => {}
        }
    }
    for s in slots.values() {
        mark(s.retry);
        mark(s.sent_after);
        mark(s.comp_sent_after);
        mark(s.first_comp_sent);
        mark(s.last_answer);
        mark(s.last_comp_failure);
        mark(s.last_refused);
    }
    pin
}

/// The [`Happening::Elided`] marker being built: what it says of the entries dropped so far.
#[derive(Default)]
struct Tally {
    entries: u64,
    parkings: u32,
    since: Option<Millis>,
    at: Option<Millis>,
}

impl Tally {
    fn add(&mut self, h: &HistoryEntry) {
        match h.what {
            Happening::Elided {
                entries,
                parkings,
                since,
            } => {
                self.entries = self.entries.saturating_add(entries);
                self.parkings = self.parkings.saturating_add(parkings);
                self.since = Some(self.since.map_or(since, |s| s.min(since)));
            }
            Happening::Parked { .. } => {
                self.entries = self.entries.saturating_add(1);
                self.parkings = self.parkings.saturating_add(1);
                self.since = Some(self.since.map_or(h.at, |s| s.min(h.at)));
            }
            _ => {
                self.entries = self.entries.saturating_add(1);
                self.since = Some(self.since.map_or(h.at, |s| s.min(h.at)));
            }
        }
        self.at = Some(self.at.map_or(h.at, |a| a.max(h.at)));
    }

    fn entry(&self) -> HistoryEntry {
        HistoryEntry {
            at: self.at.unwrap_or_default(),
            step: None,
            what: Happening::Elided {
                entries: self.entries,
                parkings: self.parkings,
                since: self.since.unwrap_or_default(),
            },
        }
    }
}

impl Saga {
    /// Brings the snapshot within `limits`: outputs, error texts and reasons too large are
    /// truncated with a visible marker, and the history is compacted past its bounds (see the
    /// [`Limits`] fields). Idempotent. [`Saga::apply_with_limits`] calls it after every change;
    /// a host may call it on a snapshot it loads.
    pub fn bound(&mut self, limits: &Limits) {
        let l = limits.effective();
        self.bound_steps(&l);
        if let Some(reason) = &mut self.reason {
            fit_in_place(reason, l.max_text_bytes);
        }
        for h in &mut self.history {
            match &mut h.what {
                Happening::AttemptFailed { kind, message, .. }
                | Happening::CompensationAttemptFailed { kind, message, .. } => {
                    fit_in_place(kind, l.max_error_kind_bytes);
                    fit_in_place(message, l.max_error_bytes);
                }
                Happening::CompensationStarted { reason }
                | Happening::Parked { reason }
                | Happening::ReplyRefused { reason, .. } => {
                    fit_in_place(reason, l.max_text_bytes);
                }
                Happening::Intervened {
                    id,
                    action,
                    operator,
                    reason,
                    refused,
                } => {
                    for text in [id, action, operator, reason, refused] {
                        fit_in_place(text, l.max_text_bytes);
                    }
                }
                _ => {}
            }
        }
        self.compact(&l);
    }

    /// Truncates the steps' errors and outputs.
    fn bound_steps(&mut self, l: &Limits) {
        for s in &mut self.steps {
            if let Some(e) = &mut s.last_error {
                fit_in_place(&mut e.kind, l.max_error_kind_bytes);
                fit_in_place(&mut e.message, l.max_error_bytes);
            }
            if let Some(out) = &mut s.output {
                if out.len() > l.max_output_bytes {
                    let cap = l.max_output_bytes;
                    *out =
                        format!("[output truncated: {} bytes, cap {cap}]", out.len()).into_bytes();
                }
            }
        }
        let total = |steps: &[super::StepState]| -> usize {
            steps
                .iter()
                .filter_map(|s| s.output.as_ref())
                .map(Vec::len)
                .sum()
        };
        while total(&self.steps) > l.max_total_output_bytes {
            let Some(largest) = self
                .steps
                .iter_mut()
                .filter_map(|s| s.output.as_mut())
                .filter(|o| o.len() > OUTPUT_MARKER_MAX)
                .max_by_key(|o| o.len())
            else {
                break;
            };
            *largest = format!(
                "[output truncated: {} bytes, the saga's outputs cap {}]",
                largest.len(),
                l.max_total_output_bytes
            )
            .into_bytes();
        }
    }

    /// Compacts the history past `l.max_history` entries or `l.max_history_bytes` (see
    /// [`Limits`]). Leaves it untouched when there is nothing to drop.
    fn compact(&mut self, l: &Limits) {
        let (count, bytes) = self.history.iter().fold((0, 0), |(n, b), h| {
            (n + usize::from(!is_elided(h)), b + weight(h))
        });
        if count <= l.max_history && bytes <= l.max_history_bytes {
            return;
        }
        // Positions (in `history`) of the entries other than markers, oldest first.
        let at: Vec<usize> = (0..self.history.len())
            .filter(|&k| !is_elided(&self.history[k]))
            .collect();
        let entries: Vec<&HistoryEntry> = at.iter().map(|&k| &self.history[k]).collect();
        let n = entries.len();
        let head = l.history_head.min(n);
        let pins = pinned(&entries);
        let w: Vec<usize> = entries.iter().map(|h| weight(h)).collect();
        // The newest entries must stay contiguous: the tail starts after the last marker.
        let after_marker = self
            .history
            .iter()
            .rposition(is_elided)
            .map_or(0, |m| at.partition_point(|&k| k < m));
        let first = head.max(after_marker);
        let last = n.saturating_sub(Limits::MIN_TAIL).max(first);
        // Entries [head, j) are dropped unless pinned, [j, n) kept: the smallest j within the
        // bounds (both sums only shrink as j grows).
        let head_w: usize = w[..head].iter().sum();
        let (mut pin_n, mut pin_w) = (0, 0);
        for k in head..first {
            if pins[k] {
                pin_n += 1;
                pin_w += w[k];
            }
        }
        let mut tail_w: usize = w[first..].iter().sum();
        let mut j = first;
        while j < last
            && (head + pin_n + (n - j) > l.max_history
                || head_w + pin_w + tail_w + ENTRY_OVERHEAD > l.max_history_bytes)
        {
            tail_w -= w[j];
            if pins[j] {
                pin_n += 1;
                pin_w += w[j];
            }
            j += 1;
        }
        let dropped: Vec<usize> = (head..j).filter(|&k| !pins[k]).collect();
        if dropped.is_empty() {
            return;
        }
        let mut elided = Tally::default();
        for h in self.history.iter().filter(|h| is_elided(h)) {
            elided.add(h);
        }
        for &k in &dropped {
            elided.add(entries[k]);
        }
        let mut keep = vec![true; self.history.len()];
        for (k, h) in self.history.iter().enumerate() {
            keep[k] = !is_elided(h);
        }
        for &k in &dropped {
            keep[at[k]] = false;
        }
        let marker_at = at.get(j).copied().unwrap_or(self.history.len());
        let mut marker = Some(elided.entry());
        let old = std::mem::take(&mut self.history);
        let mut history = Vec::with_capacity(old.len() - dropped.len() + 1);
        for (k, h) in old.into_iter().enumerate() {
            if k == marker_at {
                history.extend(marker.take());
            }
            if keep[k] {
                history.push(h);
            }
        }
        history.extend(marker);
        self.history = history;
    }

    /// How many times the saga was parked `NEEDS_ATTENTION`: its `Parked` entries, kept or
    /// elided. The dead letter of a parking is keyed by (saga, this count).
    pub fn parkings(&self) -> u32 {
        self.history.iter().fold(0u32, |n, h| match h.what {
            Happening::Parked { .. } => n.saturating_add(1),
            Happening::Elided { parkings, .. } => n.saturating_add(parkings),
            _ => n,
        })
    }

    /// How many entries were ever logged in the history: the ones kept plus the ones elided
    /// (the [`Happening::Elided`] marker itself is not one of them).
    pub fn logged(&self) -> u64 {
        self.history.iter().fold(0u64, |n, h| match h.what {
            Happening::Elided { entries, .. } => n.saturating_add(entries),
            _ => n.saturating_add(1),
        })
    }

    /// The entries logged after the first `logged` ones (a former [`Saga::logged`]), oldest
    /// first: what changed since a snapshot with that count. Use it instead of slicing the
    /// history at a former length, which compaction invalidates. Entries elided since (more
    /// than the newest [`Limits::MIN_TAIL`] were logged) are missing.
    pub fn logged_since(&self, logged: u64) -> &[HistoryEntry] {
        let new = usize::try_from(self.logged().saturating_sub(logged)).unwrap_or(usize::MAX);
        let contiguous = self
            .history
            .iter()
            .rposition(is_elided)
            .map_or(0, |m| m + 1);
        let start = self.history.len().saturating_sub(new).max(contiguous);
        self.history.get(start..).unwrap_or_default()
    }
}
