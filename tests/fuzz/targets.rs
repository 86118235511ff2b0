//! The fuzz targets: each decodes one input and checks what must hold of the result.
//!
//! A target is a `fn(&[u8]) -> String`: it never fails for a bad input (refusing it is the
//! decoder's job), it **panics** when a property is broken (so the driver and the replay
//! test catch broken properties and decoder panics alike), and returns the *kind* of outcome
//! (`err:saga_id:…`, `ok:reply`…) so the driver can keep inputs that reach a new kind.
//! Each also has a generator, `fn(&mut G) -> Vec<u8>`, that builds a well-aimed input of its
//! format from raw bytes (structure-aware generation).
//!
//! | target | input | checks |
//! | --- | --- | --- |
//! | `events` | an [`EventCase`]: partitions, subject, headers, payload | `sagaflow::events::decode` |
//! | `snapshot` | postcard bytes | `wire::decode_snapshot`, re-encoding round-trips |
//! | `control` | postcard bytes | `wire::decode_control`, re-encoding round-trips |
//! | `command` | protobuf `Command` bytes | `sagaflow_participant::command::check_command` |
//! | `machine` | choices ([`G`]): definition, saga, events | the state machine's bounds |
//! | `adopted` | choices ([`G`]): an arbitrary snapshot, events | the machine never panics on a snapshot a `Created` event carries |
//! | `definition` | TOML text (lossy UTF-8) | `definition::parse`: errors point inside the text |

use std::path::Path;
use std::sync::OnceLock;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::HeaderMap;
use prost::Message as _;
use sagaflow_actors::coordinator::Input;
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::ids;
use sagaflow_actors::machine::{Event, Limits, Millis, Saga};
use sagaflow_actors::wire;
use sagaflow_proto::v1;

use super::gen::G;

/// One fuzz target.
pub struct Target {
    /// Its name: the corpus folder and `--target`.
    pub name: &'static str,
    /// Decodes and checks one input; panics on a broken property; returns the outcome kind.
    pub run: fn(&[u8]) -> String,
    /// Builds an input from raw choices.
    pub generate: fn(&mut G) -> Vec<u8>,
    /// Tokens the byte-level mutator splices in.
    pub dictionary: &'static [&'static [u8]],
    /// Longest input the mutator makes.
    pub max_len: usize,
}

/// Every target, in the order the driver runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "events",
        run: events,
        generate: gen_events,
        dictionary: &[
            b"sagaflow.evt.",
            b".reply",
            b".start",
            b".cancel",
            b".intervene",
            b"partitions ",
            b"subject ",
            b"header Sagaflow-Saga-Id: ",
            b"\n\n",
            b"\\x00",
            b"\\x0a",
            b"order-1",
            b"/charge/1",
        ],
        max_len: 64 * 1024,
    },
    Target {
        name: "snapshot",
        run: snapshot,
        generate: gen_snapshot,
        dictionary: &[
            b"\x00",
            b"\xff\xff\xff\xff\x0f",
            b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
            b"order",
        ],
        max_len: 64 * 1024,
    },
    Target {
        name: "control",
        run: control,
        generate: gen_control,
        dictionary: &[
            b"\x00\x03",
            b"\x00\x02",
            b"\xff\xff\xff\xff\x0f",
            b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
        ],
        max_len: 64 * 1024,
    },
    Target {
        name: "command",
        run: command,
        generate: gen_command,
        dictionary: &[
            b"sagaflow.evt.",
            b".reply",
            b"\x62",
            b"\x1a",
            b"\x40",
            b"\xff\xff\xff\xff\x0f",
        ],
        max_len: 16 * 1024,
    },
    Target {
        name: "machine",
        run: machine,
        generate: raw,
        dictionary: &[b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"],
        max_len: 16 * 1024,
    },
    Target {
        name: "adopted",
        run: adopted,
        generate: raw,
        dictionary: &[b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"],
        max_len: 16 * 1024,
    },
    Target {
        name: "definition",
        run: definition,
        generate: gen_definition,
        dictionary: &[
            b"[[stage]]\n",
            b"[[stage.step]]\n",
            b"[after_compensation]\n",
            b"[defaults.retry]\n",
            b"name = \"x\"\n",
            b"action = \"a.b\"\n",
            b"compensation = \"a.c\"\n",
            b"pivot = true\n",
            b"timeout = \"0s\"\n",
            b"max_attempts = 100\n",
            b"multiplier = 1e308\n",
            b"= ",
            b"\"\"\"",
            b"'''",
            b"\r\n",
            b"{ }",
            b"[ ]",
        ],
        max_len: 16 * 1024,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

// ---------------------------------------------------------------------------------------------
// Shared fixtures.

/// `sagas/order.toml` and `sagas/trip.toml`, parsed once.
pub fn definitions() -> &'static [SagaDefinition; 2] {
    static DEFS: OnceLock<[SagaDefinition; 2]> = OnceLock::new();
    DEFS.get_or_init(|| {
        let parse = |text: &str, path: &str| {
            sagaflow_actors::definition::parse(text, Path::new(path))
                .unwrap_or_else(|e| panic!("{path} does not parse: {e:?}"))
        };
        [
            parse(include_str!("../../sagas/order.toml"), "sagas/order.toml"),
            parse(include_str!("../../sagas/trip.toml"), "sagas/trip.toml"),
        ]
    })
}

/// The first words of an outcome text before anything quoted, with numbers blanked: a stable
/// kind for "is this outcome new?" (quoted parts are the input's own text).
fn shape(text: &str, words: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '`' | '"' => break,
            '0'..='9' if !out.ends_with('#') => out.push('#'),
            '0'..='9' => {}
            c if c.is_ascii_alphabetic() || c == ' ' || c == '_' => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace()
        .take(words)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A refusal text fit for a header or a dead letter: short and printable.
fn assert_printable(what: &str, text: &str) {
    assert!(
        !text.chars().any(char::is_control),
        "{what} holds a control character: {text:?}"
    );
    assert!(
        text.len() < 600,
        "{what} is {} bytes long: {text:?}",
        text.len()
    );
}

// ---------------------------------------------------------------------------------------------
// events: `sagaflow::events::decode`.

/// An inbound event as the node sees it: `partitions`, subject, headers and payload.
///
/// Stored as text lines, then the payload: `partitions N`, `subject S`, any number of
/// `header NAME: VALUE`, an empty line, and the payload bytes to the end. In the subject and
/// headers, `\xHH` is a byte and `\\` a backslash (so any bytes fit on a line). Parsing is
/// lenient: unknown lines are skipped, a missing value takes its default (8 partitions, empty
/// subject, no headers, empty payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCase {
    /// The deployment's partition count.
    pub partitions: u32,
    /// The message's subject.
    pub subject: String,
    /// Its headers (names the NATS client would refuse are skipped when the map is built).
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl EventCase {
    /// Reads a case (never fails, see the type's doc).
    pub fn parse(data: &[u8]) -> EventCase {
        let mut case = EventCase {
            partitions: 8,
            subject: String::new(),
            headers: Vec::new(),
            payload: Vec::new(),
        };
        let mut rest = data;
        while !rest.is_empty() {
            let (line, after) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            rest = after;
            if line.is_empty() {
                case.payload = rest.to_vec();
                break;
            }
            let line = unescape(line);
            if let Some(n) = line.strip_prefix("partitions ") {
                case.partitions = n.trim().parse().unwrap_or(8);
            } else if let Some(s) = line.strip_prefix("subject ") {
                case.subject = s.to_string();
            } else if let Some(h) = line.strip_prefix("header ") {
                let (name, value) = h.split_once(": ").unwrap_or((h, ""));
                case.headers.push((name.to_string(), value.to_string()));
            }
        }
        case
    }

    /// The stored form ([`EventCase::parse`] reads it back).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "partitions {}\nsubject {}\n",
            self.partitions,
            escape(&self.subject)
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("header {}: {}\n", escape(name), escape(value)));
        }
        out.push('\n');
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// The headers as a NATS header map (`None` without headers).
    pub fn header_map(&self) -> Option<HeaderMap> {
        if self.headers.is_empty() {
            return None;
        }
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            // The NATS client refuses (panics on) names and values its protocol cannot carry,
            // so no message from the server holds one: such headers are left out.
            if let (Ok(name), Ok(value)) =
                (name.parse::<HeaderName>(), value.parse::<HeaderValue>())
            {
                map.append(name, value);
            }
        }
        Some(map)
    }
}

fn escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

fn unescape(line: &[u8]) -> String {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] == b'\\' && line.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else if line[i] == b'\\' && line.get(i + 1) == Some(&b'x') {
            let hex = line
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 4;
                }
                None => {
                    out.push(b'\\');
                    i += 1;
                }
            }
        } else {
            out.push(line[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `events::decode`: an accepted event names a valid saga of the subject's partition, with
/// fields within their bounds; a refusal's detail is short and printable.
pub fn events(data: &[u8]) -> String {
    let case = EventCase::parse(data);
    let headers = case.header_map();
    let decoded = sagaflow::events::decode(
        &case.subject,
        headers.as_ref(),
        &case.payload,
        case.partitions,
    );
    match decoded {
        Ok((id, input)) => {
            assert!(
                ids::valid_saga_id(&id),
                "accepted an invalid saga id {id:?}"
            );
            let tokens: Vec<&str> = case.subject.split('.').collect();
            let subject_partition: u32 =
                tokens
                    .get(2)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| {
                        panic!("accepted subject {:?} names no partition", case.subject)
                    });
            assert_eq!(
                partition_of(&id, case.partitions),
                subject_partition,
                "accepted saga {id:?} on subject {:?} of another partition",
                case.subject
            );
            let canonical = tokens
                .get(2)
                .is_some_and(|p| *p == subject_partition.to_string());
            let kind = match input {
                Input::Started => "started",
                Input::Created { saga, .. } => {
                    assert_eq!(
                        saga.id, id,
                        "a Created event carries another saga's snapshot"
                    );
                    "created"
                }
                Input::Reply {
                    step,
                    attempt,
                    outcome,
                    ..
                } => {
                    assert!(ids::valid_id(&step, ids::MAX_STEP_NAME), "step {step:?}");
                    assert!(attempt >= 1, "attempt 0 accepted");
                    if let Err(e) = outcome {
                        assert!(
                            !e.kind.is_empty() && ids::valid_text(&e.kind, ids::MAX_ERROR_KIND),
                            "error kind {:?}",
                            e.kind
                        );
                    }
                    "reply"
                }
                Input::Cancel { reason } => {
                    assert!(ids::valid_text(&reason, ids::MAX_TEXT), "reason {reason:?}");
                    "cancel"
                }
                Input::Intervene(i) => {
                    assert!(!i.id.is_empty() && ids::valid_text(&i.id, ids::MAX_TEXT));
                    assert!(ids::valid_text(&i.operator, ids::MAX_TEXT));
                    assert!(ids::valid_text(&i.reason, ids::MAX_TEXT));
                    "intervene"
                }
                Input::Signal { id, name, payload } => {
                    assert!(ids::valid_id(&id, ids::MAX_SAGA_ID), "signal id {id:?}");
                    assert!(
                        sagaflow_actors::definition::valid_signal_name(&name),
                        "signal name {name:?}"
                    );
                    assert!(payload.len() <= sagaflow::events::MAX_SIGNAL_PAYLOAD);
                    "signal"
                }
            };
            // A partition token such as `+3` or `03` decodes as 3 (the consumers' subject
            // filters never deliver one): a kind of its own, so the corpus keeps an example.
            let form = if canonical {
                ""
            } else {
                ":noncanonical_partition"
            };
            format!("ok:{kind}{form}:{}", tokens.len())
        }
        Err(r) => {
            assert_printable("refusal detail", &r.detail);
            assert!(
                [
                    "subject",
                    "undecodable",
                    "saga_id",
                    "partition",
                    "command_id",
                    "field"
                ]
                .contains(&r.label),
                "unknown refusal label {:?}",
                r.label
            );
            format!("err:{}:{}", r.label, shape(&r.detail, 4))
        }
    }
}

fn gen_events(g: &mut G) -> Vec<u8> {
    let partitions = match g.below(8) {
        0 => g.pick(&[0, 1, 2, 16, 32, 1024, u32::MAX]),
        1 => g.u32(),
        _ => 8,
    };
    let id = g.id();
    let kind = match g.below(12) {
        0..=5 => "reply",
        6 => "start",
        7 => "cancel",
        8 => "intervene",
        _ => g.pick(&["bogus", "", "REPLY", "reply ", "*", ">"]),
    };
    let home = partition_of(&id, partitions);
    let partition = match g.below(10) {
        0 => (home + 1) % partitions.max(1),
        1 => partitions,
        2 => u32::MAX,
        _ => home,
    };
    let p = match g.below(12) {
        0 => format!("+{partition}"),
        1 => format!("0{partition}"),
        2 => g
            .pick(&["-1", "", "x", "4294967296", " 1", "٣"])
            .to_string(),
        _ => partition.to_string(),
    };
    let subject = match g.below(12) {
        0 => format!(
            "sagaflow.evt.{p}.{}.{kind}",
            if g.chance(70) { id.clone() } else { g.id() }
        ),
        1 => g.any_string(40),
        2 => format!("sagaflow.evt.{p}"),
        3 => format!("sagaflow.evt.{p}.{kind}.x.y"),
        4 => format!("other.evt.{p}.{kind}"),
        _ => format!("sagaflow.evt.{p}.{kind}"),
    };
    let header_id = if g.chance(80) { id.clone() } else { g.id() };
    let headers = match g.below(8) {
        0 | 1 => Vec::new(),
        2 => vec![("sagaflow-saga-id".into(), header_id)],
        3 => vec![
            ("Nats-Msg-Id".into(), g.text()),
            ("Sagaflow-Saga-Id".into(), header_id),
            ("Sagaflow-Saga-Id".into(), g.id()),
        ],
        4 => vec![("Sagaflow-Saga-Id".into(), String::new())],
        5 => vec![(g.any_string(20), header_id)],
        _ => vec![("Sagaflow-Saga-Id".into(), header_id)],
    };
    let payload_id = if g.chance(85) { id.clone() } else { g.id() };
    let mut payload = match (kind, g.below(10)) {
        (_, 0) => g.bytes(200),
        ("reply", _) | (_, 1) => g.reply(&payload_id).encode_to_vec(),
        _ => {
            let snapshot = match g.below(3) {
                0 => None,
                1 => {
                    let def = &definitions()[g.below(2)];
                    let (saga, _) = Saga::start(def, payload_id.clone(), g.bytes(20), g.millis());
                    wire::encode_snapshot(&saga).ok()
                }
                _ => wire::encode_snapshot(&g.saga(payload_id.clone(), 5)).ok(),
            };
            wire::encode_control(&g.control(snapshot)).unwrap_or_default()
        }
    };
    if g.chance(10) {
        payload.truncate(g.below(payload.len() + 1));
    }
    EventCase {
        partitions,
        subject,
        headers,
        payload,
    }
    .to_bytes()
}

// ---------------------------------------------------------------------------------------------
// snapshot and control: `wire::decode_snapshot`, `wire::decode_control`.

/// `wire::decode_snapshot`: a snapshot that decodes re-encodes to bytes that decode to it.
pub fn snapshot(data: &[u8]) -> String {
    match wire::decode_snapshot(data) {
        Ok(saga) => {
            let bytes = wire::encode_snapshot(&saga)
                .unwrap_or_else(|e| panic!("a decoded snapshot does not encode: {e}"));
            let back = wire::decode_snapshot(&bytes)
                .unwrap_or_else(|e| panic!("a re-encoded snapshot does not decode: {e}"));
            assert_eq!(back, saga, "a snapshot changed through encode and decode");
            format!("ok:{}:{}", saga.phase.as_str(), saga.steps.len().min(9))
        }
        Err(e) => format!("err:{}", shape(&e.to_string(), 6)),
    }
}

fn gen_snapshot(g: &mut G) -> Vec<u8> {
    let saga = if g.chance(50) {
        let (mut saga, _) = {
            let def = &definitions()[g.below(2)];
            Saga::start(def, g.id(), g.bytes(40), g.millis())
        };
        if g.chance(50) {
            saga = g.saga(saga.id.clone(), saga.steps.len());
        }
        saga
    } else {
        let slots = g.below(8);
        let id = g.id();
        g.saga(id, slots)
    };
    let mut bytes = wire::encode_snapshot(&saga).unwrap_or_default();
    if g.chance(15) {
        bytes.truncate(g.below(bytes.len() + 1));
    }
    bytes
}

/// `wire::decode_control`: a control event that decodes re-encodes to bytes that decode to it.
pub fn control(data: &[u8]) -> String {
    match wire::decode_control(data) {
        Ok(c) => {
            let bytes = wire::encode_control(&c)
                .unwrap_or_else(|e| panic!("a decoded control event does not encode: {e}"));
            let back = wire::decode_control(&bytes)
                .unwrap_or_else(|e| panic!("a re-encoded control event does not decode: {e}"));
            assert_eq!(back, c, "a control event changed through encode and decode");
            let kind = match c {
                wire::Control::Started { .. } => "started",
                wire::Control::Cancel { .. } => "cancel",
                wire::Control::Intervene { .. } => "intervene",
                wire::Control::Signal { .. } => "signal",
                wire::Control::Created { snapshot, .. } => {
                    if wire::decode_snapshot(&snapshot).is_ok() {
                        "created:snapshot"
                    } else {
                        "created:garbage"
                    }
                }
            };
            format!("ok:{kind}")
        }
        Err(e) => format!("err:{}", shape(&e.to_string(), 6)),
    }
}

fn gen_control(g: &mut G) -> Vec<u8> {
    let snapshot = g.chance(50).then(|| gen_snapshot(g));
    let mut bytes = wire::encode_control(&g.control(snapshot)).unwrap_or_default();
    if g.chance(15) {
        bytes.truncate(g.below(bytes.len() + 1));
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// command: `sagaflow_participant::command::check_command`.

/// Whether `subject` is `service`'s reply subject, `sagaflow.evt.<digits>.reply.<service>`,
/// or one of the older forms that name no service: `sagaflow.evt.<digits>.reply`, and
/// `sagaflow.evt.<digits>.<saga id>.reply` (which named the saga too).
fn is_reply_subject(subject: &str, service: &str) -> bool {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match subject.split('.').collect::<Vec<_>>().as_slice() {
        ["sagaflow", "evt", p, "reply"] => digits(p),
        ["sagaflow", "evt", p, "reply", s] if *s == service => digits(p),
        ["sagaflow", "evt", p, id, "reply"] => digits(p) && ids::valid_saga_id(id),
        _ => false,
    }
}

/// `participant::check_command` after protobuf decoding: an accepted command replies on a
/// saga event subject ([`is_reply_subject`]) and names a valid saga; a refusal is short and printable.
pub fn command(data: &[u8]) -> String {
    let Ok(cmd) = v1::Command::decode(data) else {
        return "undecodable".into();
    };
    match sagaflow_participant::command::check_command(&cmd) {
        Ok(()) => {
            assert!(
                is_reply_subject(&cmd.reply_subject, &cmd.service),
                "accepted reply_subject {:?}, not sagaflow.evt.<digits>.reply[.{}]",
                cmd.reply_subject,
                cmd.service
            );
            assert!(
                ids::valid_saga_id(&cmd.saga_id),
                "accepted saga id {:?}",
                cmd.saga_id
            );
            assert!(
                ids::valid_id(&cmd.step, ids::MAX_STEP_NAME),
                "step {:?}",
                cmd.step
            );
            assert_eq!(
                cmd.command_id,
                sagaflow::bus::command_id(&cmd.saga_id, &cmd.step, cmd.compensation, cmd.attempt)
            );
            "ok".into()
        }
        Err(why) => {
            assert_printable("command refusal", &why);
            format!("err:{}", shape(&why, 3))
        }
    }
}

fn gen_command(g: &mut G) -> Vec<u8> {
    let mut bytes = if g.chance(30) {
        let def = &definitions()[g.below(2)];
        let (saga, t) = Saga::start(def, g.id(), g.bytes(20), g.millis());
        let spec = t.effects.iter().find_map(|e| match e {
            sagaflow_actors::machine::Effect::Send(spec) => Some(*spec),
            _ => None,
        });
        spec.and_then(|spec| sagaflow::bus::build_command(def, &saga, spec, g.pick(&[8, 1, 1024])))
            .map(|(_, cmd)| cmd.encode_to_vec())
            .unwrap_or_default()
    } else {
        let id = g.id();
        g.command(&id).encode_to_vec()
    };
    if g.chance(10) {
        bytes.truncate(g.below(bytes.len() + 1));
    }
    bytes
}

/// The input of the targets that read their choices themselves: the raw bytes.
fn raw(g: &mut G) -> Vec<u8> {
    g.rest()
}

// ---------------------------------------------------------------------------------------------
// machine and adopted: `Saga::apply_with_limits`.

/// Tiny limits: compaction and truncation happen after a few events.
const SMALL: Limits = Limits {
    max_output_bytes: 0,
    max_total_output_bytes: 0,
    max_error_kind_bytes: 0,
    max_error_bytes: 0,
    max_text_bytes: 0,
    max_history: 0,
    max_history_bytes: 0,
    history_head: 4,
};

/// Most events applied to one saga.
const MAX_EVENTS: usize = 400;

/// The next event for `saga`: mostly replies to what is in flight (so sagas get far), and
/// replies to anything, ticks at due times and elsewhere, cancels and interventions.
fn next_event(g: &mut G, def: &SagaDefinition, saga: &Saga, now: Millis) -> (Event, Millis) {
    let slots = def.step_slots();
    let mut at = match g.below(10) {
        0 => g.millis(),
        1 => now.saturating_sub(g.range(0, 100_000) as i64),
        _ => now.saturating_add(g.range(0, 2_000) as i64),
    };
    let event = match g.below(20) {
        0..=8 => {
            let flight = saga.in_flight();
            match (flight.is_empty(), g.below(10)) {
                (false, 0..=7) => {
                    let spec = flight[g.below(flight.len())];
                    Event::Reply {
                        step: spec.step,
                        attempt: spec.attempt,
                        compensation: spec.compensation,
                        outcome: g.outcome(),
                    }
                }
                _ => Event::Reply {
                    step: g.step_index(slots),
                    attempt: g.u32(),
                    compensation: g.chance(50),
                    outcome: g.outcome(),
                },
            }
        }
        9..=13 => {
            if let Some(due) = saga.next_wakeup().filter(|_| g.chance(80)) {
                at = due.saturating_add(g.range(0, 50) as i64);
            }
            Event::Tick
        }
        14 => Event::Cancel { reason: g.text() },
        _ => {
            let mut intervention = g.intervention(slots);
            // Prefer an action the saga accepts, as the API would send.
            for _ in 0..3 {
                if saga.check(def, &intervention.action).is_ok() {
                    break;
                }
                intervention.action = g.action(slots);
            }
            Event::Intervene(intervention)
        }
    };
    (event, at)
}

/// Drives `saga` with events from `g`; checks after each one what `bound` says of the
/// snapshot (its most bytes, when given) and that a finished saga stays as it is.
fn drive(
    g: &mut G,
    def: &SagaDefinition,
    saga: &mut Saga,
    limits: &Limits,
    bound: Option<usize>,
) -> String {
    let mut now = saga.updated_at;
    let mut applied = 0;
    let mut errors = 0;
    for _ in 0..MAX_EVENTS {
        if g.is_empty() {
            break;
        }
        // Queries the host makes of any snapshot.
        let _ = (
            saga.next_wakeup(),
            saga.in_flight(),
            saga.stuck_at(def, 3),
            saga.is_terminal(),
        );
        let (event, at) = next_event(g, def, saga, now);
        now = at;
        let before = saga.is_terminal().then(|| saga.clone());
        match saga.apply_with_limits(def, event, now, limits) {
            Ok(_) => applied += 1,
            Err(_) => errors += 1,
        }
        if let Some(before) = before {
            assert!(
                saga.is_terminal(),
                "a finished saga left its terminal phase: {:?}",
                saga.phase
            );
            assert_eq!(*saga, before, "a finished saga changed");
        }
        if let Some(bound) = bound {
            let bytes = wire::encode_snapshot(saga)
                .unwrap_or_else(|e| panic!("a snapshot does not encode: {e}"));
            assert!(
                bytes.len() <= bound,
                "snapshot of {} bytes over its bound {bound} ({} history entries)",
                bytes.len(),
                saga.history.len()
            );
            if g.chance(5) {
                let back = wire::decode_snapshot(&bytes)
                    .unwrap_or_else(|e| panic!("a snapshot does not decode: {e}"));
                assert_eq!(back, *saga, "a snapshot changed through encode and decode");
            }
        }
    }
    let compacted = saga
        .history
        .iter()
        .any(|h| matches!(h.what, sagaflow_actors::machine::Happening::Elided { .. }));
    format!(
        "{}:{}:{}{}",
        def.name,
        saga.phase.as_str(),
        if errors > 0 { "errors" } else { "no_errors" },
        if compacted {
            ":compacted"
        } else if applied > 100 {
            ":long"
        } else {
            ""
        }
    )
}

/// The machine under arbitrary events: never panics, keeps each snapshot under
/// [`Limits::snapshot_bound`], and a finished saga stays finished and unchanged.
pub fn machine(data: &[u8]) -> String {
    let mut g = G::new(data);
    let def = &definitions()[usize::from(g.chance(25))];
    let limits = match g.below(8) {
        0 => SMALL,
        1 => Limits {
            max_history: g.range(0, 300) as usize,
            history_head: g.range(0, 40) as usize,
            max_text_bytes: g.range(0, 2_000) as usize,
            ..Limits::default()
        },
        _ => Limits::default(),
    };
    let id = if g.chance(90) { g.valid_id() } else { g.id() };
    let input = if g.chance(5) {
        vec![b'i'; g.range(0, 300_000) as usize]
    } else {
        g.bytes(64)
    };
    let bound = limits.snapshot_bound(def, id.len(), input.len());
    let start = if g.chance(90) {
        1_700_000_000_000
    } else {
        g.millis()
    };
    let (mut saga, _) = Saga::start(def, id, input, start);
    drive(&mut g, def, &mut saga, &limits, Some(bound))
}

/// A snapshot such as a `Created` event may carry (anything that decodes: the coordinator
/// adopts it when its id matches) driven through the machine: no query or event panics.
pub fn adopted(data: &[u8]) -> String {
    let mut g = G::new(data);
    let def = &definitions()[usize::from(g.chance(30))];
    let slots = if g.chance(95) {
        def.step_slots()
    } else {
        g.below(8)
    };
    let id = g.valid_id();
    let mut saga = g.saga(id, slots);
    // Mostly counters within what a saga reaches and step slots that exist (so that deeper
    // paths are reached), sometimes anything: the coordinator runs a snapshot from elsewhere
    // only if `Saga::consistent_with` accepts it, so whatever that accepts must not panic
    // (findings F2 and F3 were snapshots it now refuses).
    if g.chance(80) {
        for s in &mut saga.steps {
            s.attempt %= 1_000;
            s.comp_attempt %= 1_000;
        }
        saga.stage %= def.stages.len() as u32 + 2;
        saga.comp_cursor %= 64;
        saga.status_seq %= 1 << 40;
        if let Some(plan) = saga.compensation_plan.as_mut() {
            for i in plan.iter_mut() {
                *i %= slots.max(1) as u32;
            }
        }
    }
    if saga.consistent_with(def).is_err() {
        return "adopted:refused".into();
    }
    let limits = if g.chance(20) {
        SMALL
    } else {
        Limits::default()
    };
    for action in [
        sagaflow_actors::machine::OperatorAction::Abandon,
        sagaflow_actors::machine::OperatorAction::Compensate,
        sagaflow_actors::machine::OperatorAction::Retry { step: None },
    ] {
        let _ = saga.check(def, &action);
    }
    format!("adopted:{}", drive(&mut g, def, &mut saga, &limits, None))
}

// ---------------------------------------------------------------------------------------------
// definition: `sagaflow_actors::definition::parse`.

/// The saga file parser: never panics; each error displays `file:line:column` inside the text;
/// a definition it accepts starts a saga.
pub fn definition(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let file = "fuzz/saga.toml";
    match sagaflow_actors::definition::parse(&text, Path::new(file)) {
        Ok(def) => {
            let (mut saga, _) = Saga::start(&def, "fuzz-1".into(), b"{}".to_vec(), 0);
            let deadline = saga.deadline_at;
            let _ = saga.apply(&def, Event::Tick, deadline);
            format!("ok:{}", def.step_slots().min(9))
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "parse failed with no error");
            let lines: Vec<&str> = text.split('\n').collect();
            for e in &errors {
                assert!(
                    (1..=lines.len()).contains(&e.line),
                    "error line {} outside the text's {} lines: {e}",
                    e.line,
                    lines.len()
                );
                let width = lines[e.line - 1].chars().count();
                assert!(
                    (1..=width + 1).contains(&e.column),
                    "error column {} outside line {} ({width} chars): {e}",
                    e.column,
                    e.line
                );
                let shown = e.to_string();
                let prefix = format!("{file}:{}:{}: ", e.line, e.column);
                assert!(
                    shown.starts_with(&prefix),
                    "error display {shown:?} lacks {prefix:?}"
                );
            }
            let first = &errors[0];
            format!(
                "err:{}:{}",
                first
                    .field
                    .as_deref()
                    .map(|f| shape(f, 1))
                    .unwrap_or_default(),
                shape(&first.message, 3)
            )
        }
    }
}

/// Lines a saga file is made of, valid and not, for [`gen_definition`].
const TOML_LINES: &[&str] = &[
    "version = 1",
    "version = 2",
    "name = \"order\"",
    "name = \"\"",
    "name = \"a b\"",
    "description = \"d\"",
    "deadline = \"5m\"",
    "deadline = \"31d\"",
    "deadline = \"0s\"",
    "deadline = \"1.5h\"",
    "deadline = \"-1s\"",
    "deadline = \"99999999999999999999d\"",
    "deadline = 5",
    "[statuses]",
    "initial = \"PENDING\"",
    "completed = \"DONE\"",
    "compensated = \"UNDONE\"",
    "failed = \"FAILED\"",
    "needs_attention = \"HELP\"",
    "[defaults]",
    "timeout = \"10s\"",
    "timeout = \"25h\"",
    "[defaults.retry]",
    "[defaults.compensation_retry]",
    "max_attempts = 5",
    "max_attempts = 0",
    "max_attempts = 101",
    "max_attempts = 9223372036854775807",
    "initial_backoff = \"100ms\"",
    "max_backoff = \"5s\"",
    "max_backoff = \"2h\"",
    "multiplier = 2.0",
    "multiplier = nan",
    "multiplier = inf",
    "multiplier = 0.5",
    "non_retryable = [\"declined\"]",
    "non_retryable = [1, 2]",
    "[[stage]]",
    "name = \"pay\"",
    "status = \"PAID\"",
    "[[stage.step]]",
    "name = \"charge\"",
    "name = \"reserve\"",
    "action = \"payment.charge\"",
    "action = \"payment\"",
    "action = \"a.b.c\"",
    "compensation = \"payment.refund\"",
    "pivot = true",
    "timeout = \"1s\"",
    "[stage.step.retry]",
    "[stage.step.compensation_retry]",
    "[after_compensation]",
    "name = \"notify_cancellation\"",
    "action = \"notification.send\"",
    "unknown = 1",
    "x.y.z = { a = [ { b = 1 } ] }",
    "stage = []",
    "step = [{ name = \"s\", action = \"a.b\" }]",
    "[[stage]]\nname = \"s\"\nstep = [{ name = \"x\", action = \"a.b\", compensation = \"a.c\" }]",
    "# comment",
    "",
    "\"quoted key\" = 1",
    "name = '''multi\nline'''",
    "name = \"\"\"multi\nline\"\"\"",
    "name = \"unterminated",
    "[[stage",
    "= 1",
    "é = \"ü\"",
];

fn gen_definition(g: &mut G) -> Vec<u8> {
    let mut text = String::new();
    if g.chance(30) {
        let which = g.below(2);
        let base = [
            include_str!("../../sagas/order.toml"),
            include_str!("../../sagas/trip.toml"),
        ][which];
        let lines: Vec<&str> = base.split('\n').collect();
        for line in lines {
            match g.below(30) {
                0 => {}
                1 => {
                    text.push_str(g.pick(TOML_LINES));
                    text.push('\n');
                    text.push_str(line);
                    text.push('\n');
                }
                2 => {
                    text.push_str(line);
                    text.push_str(line);
                    text.push('\n');
                }
                _ => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    } else {
        for _ in 0..g.below(60) {
            if g.chance(10) {
                text.push_str(&g.any_string(12));
            } else {
                text.push_str(g.pick(TOML_LINES));
            }
            text.push_str(g.pick(&["\n", "\n", "\n", "\r\n", " ", ""]));
        }
    }
    if g.chance(10) {
        text.pop();
    }
    text.into_bytes()
}
