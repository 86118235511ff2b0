//! Structure-aware generation: [`G`] reads choices from raw bytes (an
//! [`arbitrary::Unstructured`]) and builds the values the targets feed to the decoders: ids
//! and texts (valid, hostile, arbitrary, huge), protobuf `Reply`s and `Command`s, control
//! events, whole saga snapshots.
//!
//! Every method is infallible: once the bytes run out, choices fall back to the first option
//! (so a short input gives a small, simple value), which keeps every generator total.

use arbitrary::Unstructured;
use sagaflow_actors::machine::{
    Happening, HistoryEntry, Intervention, OperatorAction, Phase, Saga, StepError, StepPhase,
    StepState,
};
use sagaflow_actors::wire::Control;
use sagaflow_proto::v1;

/// The ids of the hostile-publisher report, and more of their kind: each must be refused
/// wherever an id comes from outside.
pub const HOSTILE_IDS: &[&str] = &[
    "x y",
    "a*",
    "été",
    "a>",
    "",
    "a\nb",
    "a.b",
    "a\r\nPUB x 1",
    "\0",
    "a\u{7f}",
    "\u{202e}evil",
    "💥",
    "a/b",
    "-",
    "_",
    "a\tb",
    ">",
    "*",
    ".",
    "..",
    "\u{85}",
    "\u{feff}id",
];

/// Step names, valid and not.
const STEPS: &[&str] = &[
    "charge",
    "reserve",
    "prepare_shipment",
    "notify",
    "notify_cancellation",
    "book_flight",
    "charge.x",
    "",
    "x y",
    "c1",
    "a",
];

/// Error kinds, valid and not.
const KINDS: &[&str] = &[
    "declined",
    "timeout",
    "unavailable",
    "out_of_stock",
    "invalid",
    "",
    "k\n",
    "\u{1b}[31m",
];

/// Reads choices from raw bytes; never fails (see the module doc).
pub struct G<'a> {
    u: Unstructured<'a>,
}

impl<'a> G<'a> {
    /// Choices read from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        G {
            u: Unstructured::new(data),
        }
    }

    /// Whether the bytes are used up (later choices all take their first option).
    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    /// One byte (0 once exhausted).
    pub fn byte(&mut self) -> u8 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// A number in `0..n` (0 when `n` is 0 or the bytes are used up).
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        self.u.int_in_range(0..=n - 1).unwrap_or(0)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if lo >= hi {
            return lo;
        }
        self.u.int_in_range(lo..=hi).unwrap_or(lo)
    }

    /// True `percent` % of the time (false once exhausted).
    pub fn chance(&mut self, percent: u8) -> bool {
        !self.is_empty() && self.below(100) < usize::from(percent)
    }

    /// One of `items` (the first once exhausted).
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// The bytes not read yet, as they are.
    pub fn rest(&mut self) -> Vec<u8> {
        let n = self.u.len();
        self.u.bytes(n).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// A raw `u64` from the bytes.
    pub fn raw_u64(&mut self) -> u64 {
        self.u.arbitrary().unwrap_or(0)
    }

    /// A `u32` with the interesting values often.
    pub fn u32(&mut self) -> u32 {
        match self.below(6) {
            0 => self.range(0, 4) as u32,
            1 => self.pick(&[
                0,
                1,
                2,
                3,
                5,
                20,
                21,
                100,
                101,
                u32::MAX,
                u32::MAX - 1,
                1 << 31,
            ]),
            2 => self.range(0, 300) as u32,
            _ => self.u.arbitrary().unwrap_or(0),
        }
    }

    /// A `u64` with the interesting values often.
    pub fn u64(&mut self) -> u64 {
        match self.below(4) {
            0 => self.range(0, 1_000),
            1 => self.pick(&[0, 1, u64::MAX, u64::MAX / 2, 1 << 32, 1 << 63]),
            _ => self.raw_u64(),
        }
    }

    /// A time in milliseconds: near a fixed epoch mostly, the extremes sometimes.
    pub fn millis(&mut self) -> i64 {
        match self.below(8) {
            0 => self.pick(&[i64::MIN, i64::MAX, 0, -1, i64::MAX - 1, i64::MIN + 1]),
            1 => self.raw_u64() as i64,
            _ => 1_700_000_000_000 + self.range(0, 10_000_000) as i64,
        }
    }

    /// Up to `max` bytes of the input, as they are.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let want = self.below(max.saturating_add(1));
        let take = want.min(self.u.len());
        self.u.bytes(take).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// Arbitrary UTF-8 from the input (any characters), at most `max` bytes.
    pub fn any_string(&mut self, max: usize) -> String {
        let raw = self.bytes(max);
        match std::str::from_utf8(&raw) {
            Ok(s) => s.to_string(),
            // Keep the valid prefix and add one arbitrary char, so non-ASCII text is common.
            Err(e) => {
                let mut s = String::from_utf8_lossy(&raw[..e.valid_up_to()]).into_owned();
                let c = char::from_u32(self.range(0, 0x10_ffff) as u32).unwrap_or('\u{fffd}');
                s.push(c);
                s
            }
        }
    }

    /// `len` characters of `[A-Za-z0-9_-]`.
    pub fn id_chars(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
        (0..len)
            .map(|_| char::from(ALPHABET[self.below(ALPHABET.len())]))
            .collect()
    }

    /// A valid saga id: 1 to 128 characters of `[A-Za-z0-9_-]`, short ones often.
    pub fn valid_id(&mut self) -> String {
        let len = match self.below(4) {
            0 => 128,
            1 => self.range(1, 128) as usize,
            _ => self.range(1, 12) as usize,
        };
        if self.chance(30) {
            return format!("order-{}", self.range(0, 99_999));
        }
        self.id_chars(len)
    }

    /// An id from outside: valid, hostile, arbitrary, or huge.
    pub fn id(&mut self) -> String {
        match self.below(10) {
            0..=4 => self.valid_id(),
            5 | 6 => self.pick(HOSTILE_IDS).to_string(),
            7 => self.any_string(40),
            8 => self.huge_text(),
            _ => {
                // A valid id with one bad character spliced in.
                let mut id = self.valid_id();
                let bad = self.pick(&[' ', '.', '*', '>', '\n', '\0', 'é', '/', '\u{7f}']);
                let at = self.below(id.len() + 1);
                id.insert(at, bad);
                id
            }
        }
    }

    /// A huge text: one character (or a short chunk) repeated, up to 100,000 bytes.
    pub fn huge_text(&mut self) -> String {
        let chunk = self.pick(&["Z", "a", "é", "\n", "💥", "\u{1b}", "ab", " ", "\0"]);
        let n = match self.below(4) {
            0 => 5_000,
            1 => self.range(129, 2_100) as usize,
            2 => self.range(60, 70) as usize,
            _ => self.range(1_000, 100_000) as usize,
        };
        chunk.repeat(n / chunk.len().max(1))
    }

    /// A free text (a reason, an operator, a message): short, arbitrary, or huge.
    pub fn text(&mut self) -> String {
        match self.below(8) {
            0 => String::new(),
            1 | 2 => self
                .pick(&["r", "no", "operator", "cancelled by customer", "dlq-replay"])
                .into(),
            3 => self.huge_text(),
            4 => self.pick(HOSTILE_IDS).into(),
            5 => "x".repeat(self.pick(&[1023, 1024, 1025, 2048, 2049, 64, 65])),
            _ => self.any_string(80),
        }
    }

    /// Bytes of a step's output: empty, JSON, arbitrary, or large.
    pub fn output(&mut self) -> Vec<u8> {
        match self.below(8) {
            0 => Vec::new(),
            1 => br#"{"ok":true}"#.to_vec(),
            2 => vec![self.byte(); self.pick(&[65_536, 65_537, 128, 200_000, 300_000])],
            3 => vec![b'o'; self.range(0, 70_000) as usize],
            _ => self.bytes(64),
        }
    }

    /// A step name: one of the definitions', or a valid or invalid one.
    pub fn step_name(&mut self) -> String {
        match self.below(6) {
            0..=2 => self.pick(STEPS).to_string(),
            3 => {
                let n = self.pick(&[1, 63, 64, 65]);
                self.id_chars(n)
            }
            4 => self.id(),
            _ => self.any_string(16),
        }
    }

    /// An error kind, valid or not.
    pub fn error_kind(&mut self) -> String {
        match self.below(5) {
            0..=2 => self.pick(KINDS).to_string(),
            3 => "k".repeat(self.pick(&[64, 65, 1_000])),
            _ => self.any_string(20),
        }
    }

    /// A participant's error.
    pub fn step_error(&mut self) -> StepError {
        StepError {
            kind: self.error_kind(),
            message: self.text(),
        }
    }

    /// A reply's outcome as the machine sees it.
    pub fn outcome(&mut self) -> Result<Vec<u8>, StepError> {
        if self.chance(50) {
            Ok(self.output())
        } else {
            Err(self.step_error())
        }
    }

    /// An operator's action, on any step slot (in range or not).
    pub fn action(&mut self, slots: usize) -> OperatorAction {
        match self.below(5) {
            0 => OperatorAction::Retry {
                step: if self.chance(40) {
                    None
                } else {
                    Some(self.step_index(slots))
                },
            },
            1 => OperatorAction::Skip {
                step: self.step_index(slots),
                output: self.output(),
            },
            2 => OperatorAction::Compensate,
            3 => OperatorAction::Cancel,
            _ => OperatorAction::Abandon,
        }
    }

    /// A step slot: in range mostly, just past it, or anywhere.
    pub fn step_index(&mut self, slots: usize) -> usize {
        match self.below(8) {
            0 => slots,
            1 => slots + 1,
            2 => self.pick(&[usize::MAX, usize::MAX - 1, u32::MAX as usize, 1 << 40]),
            _ => self.below(slots.max(1)),
        }
    }

    /// An operator's intervention.
    pub fn intervention(&mut self, slots: usize) -> Intervention {
        let id = if self.chance(70) {
            format!("req-{}", self.range(0, 20))
        } else {
            self.text()
        };
        Intervention {
            id,
            action: self.action(slots),
            operator: self.text(),
            reason: self.text(),
        }
    }

    /// A control event; a `Created` one carries `snapshot` when given, else arbitrary bytes.
    pub fn control(&mut self, snapshot: Option<Vec<u8>>) -> Control {
        let at = self.millis();
        match self.below(4) {
            0 => Control::Started { at },
            1 => Control::Cancel {
                reason: self.text(),
                at,
            },
            2 => Control::Intervene {
                intervention: self.intervention(6),
                at,
            },
            _ => Control::Created {
                at,
                revision: self.u64(),
                snapshot: snapshot.unwrap_or_else(|| self.bytes(200)),
                commands_sent: self.chance(50),
            },
        }
    }

    /// A protobuf `Reply` about `saga_id`: its `command_id` right most of the time, every
    /// other field valid or not.
    pub fn reply(&mut self, saga_id: &str) -> v1::Reply {
        let step = self.step_name();
        let attempt = self.u32();
        let compensation = self.chance(30);
        let command_id = match self.below(6) {
            0 => self.any_string(40),
            1 => sagaflow::bus::command_id(saga_id, &step, !compensation, attempt),
            2 => sagaflow::bus::command_id(saga_id, &step, compensation, attempt.wrapping_add(1)),
            _ => sagaflow::bus::command_id(saga_id, &step, compensation, attempt),
        };
        let outcome = match self.below(5) {
            0 => None,
            1 | 2 => Some(v1::reply::Outcome::Success(v1::Success {
                output: self.output(),
            })),
            _ => Some(v1::reply::Outcome::Failure(v1::Failure {
                kind: self.error_kind(),
                message: self.text(),
            })),
        };
        v1::Reply {
            command_id,
            saga_id: saga_id.to_string(),
            step,
            attempt,
            compensation,
            outcome,
        }
    }

    /// A protobuf `Command` about `saga_id`, every field valid or not.
    pub fn command(&mut self, saga_id: &str) -> v1::Command {
        let step = self.step_name();
        let attempt = self.u32();
        let compensation = self.chance(30);
        let command_id = match self.below(5) {
            0 => self.any_string(40),
            1 => sagaflow::bus::command_id(saga_id, &step, !compensation, attempt),
            _ => sagaflow::bus::command_id(saga_id, &step, compensation, attempt),
        };
        let partition = self.pick(&[
            "0",
            "7",
            "31",
            "1023",
            "4294967295",
            "4294967296",
            "-1",
            "+5",
            "007",
            "",
            " 1",
            "1 ",
            "x",
            "٣",
        ]);
        let reply_subject = match self.below(8) {
            0 => self.any_string(40),
            1 => format!("sagaflow.evt.{partition}.reply.x"),
            2 => format!("sagaflow.evt.{partition}"),
            3 => format!("sagaflow.evt.{partition}.start"),
            4 => format!("sagaflow.evt.{partition}.{saga_id}.reply"),
            _ => format!("sagaflow.evt.{partition}.reply"),
        };
        v1::Command {
            command_id,
            idempotency_key: sagaflow::bus::idempotency_key(saga_id, &step, compensation),
            saga_id: saga_id.to_string(),
            saga_name: self.pick(&["order", "trip", ""]).into(),
            step,
            service: self.pick(&["payment", "inventory", ""]).into(),
            action: self.pick(&["charge", "refund", ""]).into(),
            attempt,
            compensation,
            compensates_key: self.text(),
            input: self.bytes(40),
            reply_subject,
            deadline_unix_ms: self.millis(),
        }
    }

    /// An arbitrary saga snapshot: every field anything its type allows (so also states the
    /// machine never produces: a stage past the last one, a plan naming missing slots…).
    pub fn saga(&mut self, id: String, slots: usize) -> Saga {
        let steps = (0..slots).map(|_| self.step_state()).collect();
        let history = (0..self.below(12))
            .map(|_| self.history_entry(slots))
            .collect();
        Saga {
            id,
            definition: self.pick(&["order", "trip", "", "nope"]).into(),
            fingerprint: self.raw_u64(),
            input: self.bytes(32),
            status: self.pick(&["PENDING", "PAID", "SHIPPED", ""]).into(),
            phase: self.phase(),
            reason: self.chance(40).then(|| self.text()),
            stage: self.u32(),
            steps,
            compensation_plan: self
                .chance(50)
                .then(|| (0..self.below(8)).map(|_| self.slot32(slots)).collect()),
            comp_cursor: self.u32(),
            started_at: self.millis(),
            updated_at: self.millis(),
            deadline_at: self.millis(),
            history,
            status_seq: self.u64(),
        }
    }

    fn slot32(&mut self, slots: usize) -> u32 {
        if self.chance(80) {
            self.below(slots + 1) as u32
        } else {
            self.u32()
        }
    }

    /// Any phase.
    pub fn phase(&mut self) -> Phase {
        self.pick(&[
            Phase::Running,
            Phase::Compensating,
            Phase::Completed,
            Phase::Compensated,
            Phase::Failed,
            Phase::NeedsAttention,
        ])
    }

    fn step_state(&mut self) -> StepState {
        StepState {
            phase: self.pick(&[
                StepPhase::Pending,
                StepPhase::Running,
                StepPhase::RetryWait,
                StepPhase::Succeeded,
                StepPhase::Failed,
                StepPhase::Compensating,
                StepPhase::CompensationRetryWait,
                StepPhase::Compensated,
                StepPhase::CompensationFailed,
                StepPhase::Skipped,
            ]),
            attempt: self.u32(),
            comp_attempt: self.u32(),
            due_at: self.chance(50).then(|| self.millis()),
            maybe_applied: self.chance(30),
            last_error: self.chance(30).then(|| self.step_error()),
            started_at: self.chance(50).then(|| self.millis()),
            finished_at: self.chance(30).then(|| self.millis()),
            output: self.chance(30).then(|| self.bytes(16)),
        }
    }

    fn history_entry(&mut self, slots: usize) -> HistoryEntry {
        let what = match self.below(18) {
            0 => Happening::Started,
            1 => Happening::Sent {
                attempt: self.u32(),
            },
            2 => Happening::Succeeded {
                attempt: self.u32(),
            },
            3 => Happening::AttemptFailed {
                attempt: self.u32(),
                kind: self.error_kind(),
                message: self.text(),
            },
            4 => Happening::RetryScheduled {
                attempt: self.u32(),
                at: self.millis(),
            },
            5 => Happening::StepFailed,
            6 => Happening::Status {
                status: self.pick(&["PENDING", "PAID", ""]).into(),
            },
            7 => Happening::CompensationStarted {
                reason: self.text(),
            },
            8 => Happening::CompensationSent {
                attempt: self.u32(),
            },
            9 => Happening::Compensated,
            10 => Happening::CompensationAttemptFailed {
                attempt: self.u32(),
                kind: self.error_kind(),
                message: self.text(),
            },
            11 => Happening::Skipped,
            12 => Happening::Finished {
                phase: self.phase(),
            },
            13 => Happening::Parked {
                reason: self.text(),
            },
            14 => Happening::Intervened {
                id: self.text(),
                action: self
                    .pick(&["retry", "skip", "compensate", "cancel", "abandon", "x"])
                    .into(),
                operator: self.text(),
                reason: self.text(),
                refused: if self.chance(50) {
                    String::new()
                } else {
                    self.text()
                },
            },
            15 => Happening::CompensationRetryScheduled {
                attempt: self.u32(),
                at: self.millis(),
            },
            16 => Happening::Unparked,
            _ => Happening::Elided {
                entries: self.u64(),
                parkings: self.u32(),
                since: self.millis(),
            },
        };
        HistoryEntry {
            at: self.millis(),
            step: self.chance(60).then(|| self.slot32(slots)),
            what,
        }
    }
}
