//! W3C trace context in NATS headers, and the ids of a saga's trace.
//!
//! Every command carries a `traceparent` header whose trace is the saga's: one trace per saga,
//! its id derived from the saga id ([`saga_trace_id`]), the same on every node, in every
//! version and in every language. The runner handles each command in a `participant.handle`
//! span that continues it, and returns the context in the reply's headers.

use std::fmt;

use async_nats::HeaderMap;
use sagaflow_proto::hash::fnv1a_parts;

/// Header carrying the W3C trace context (`00-<trace id>-<parent id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying vendor trace state; passed through unchanged when present.
pub const TRACESTATE: &str = "tracestate";

/// A parsed W3C `traceparent` header (version `00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// 128-bit trace id, never zero.
    pub trace_id: u128,
    /// 64-bit id of the span that sent the message (the receiver's parent), never zero.
    pub parent_id: u64,
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

/// Why a `traceparent` value was refused (the W3C rules: the receiver then starts afresh).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Too short, or version `00` with extra characters.
    #[error("traceparent has {0} characters, expected 55")]
    Length(usize),
    /// Version `ff`, or not two lowercase hex digits.
    #[error("traceparent version is invalid")]
    Version,
    /// A field is not followed by `-`.
    #[error("traceparent fields must be separated by `-`")]
    Separator,
    /// Not 32 lowercase hex digits, or all zero.
    #[error("traceparent trace id is invalid")]
    TraceId,
    /// Not 16 lowercase hex digits, or all zero.
    #[error("traceparent parent id is invalid")]
    ParentId,
    /// Not two lowercase hex digits.
    #[error("traceparent flags are invalid")]
    Flags,
}

/// Lowercase hex digits only, as the spec requires of senders and receivers.
fn hex(bytes: &[u8]) -> Option<u128> {
    if bytes.is_empty() || bytes.len() > 32 {
        return None;
    }
    bytes.iter().try_fold(0u128, |acc, b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u128::from(digit))
    })
}

impl TraceParent {
    /// The "sampled" flag.
    pub const SAMPLED: u8 = 0x01;

    /// Parses a header value. Versions above `00` are read as `00` (their extra fields are
    /// ignored), as the spec asks; `ff` is invalid.
    pub fn parse(value: &str) -> Result<TraceParent, ParseError> {
        let b = value.trim_matches([' ', '\t']).as_bytes();
        if b.len() < 55 {
            return Err(ParseError::Length(b.len()));
        }
        let version = hex(&b[0..2]).ok_or(ParseError::Version)?;
        if version == 0xff {
            return Err(ParseError::Version);
        }
        if version == 0 && b.len() != 55 {
            return Err(ParseError::Length(b.len()));
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || (b.len() > 55 && b[55] != b'-') {
            return Err(ParseError::Separator);
        }
        let trace_id = hex(&b[3..35])
            .filter(|t| *t != 0)
            .ok_or(ParseError::TraceId)?;
        let parent_id = hex(&b[36..52])
            .and_then(|p| u64::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or(ParseError::ParentId)?;
        let flags = hex(&b[53..55])
            .and_then(|f| u8::try_from(f).ok())
            .ok_or(ParseError::Flags)?;
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The valid `traceparent` of `headers`, if any (an invalid one is ignored, as the spec
    /// says). The name is matched exactly first, then case-insensitively.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Option<TraceParent> {
        header(headers, TRACEPARENT).and_then(|v| TraceParent::parse(v).ok())
    }

    /// Whether the sender sampled this trace.
    pub fn sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The same trace, with a fresh random span id as the parent.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: random_span_id(),
            ..*self
        }
    }
}

impl fmt::Display for TraceParent {
    /// Always version `00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl std::str::FromStr for TraceParent {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s)
    }
}

/// The value of header `name` (exact match first, then ASCII case-insensitive).
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    let headers = headers?;
    if let Some(v) = headers.get(name) {
        return Some(v.as_str());
    }
    headers
        .iter()
        .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str())
}

/// Sets `traceparent` (and `tracestate` when given and non-empty) on `headers`.
pub fn inject(headers: &mut HeaderMap, context: &TraceParent, tracestate: Option<&str>) {
    headers.insert(TRACEPARENT, context.to_string().as_str());
    if let Some(state) = tracestate.map(str::trim).filter(|s| !s.is_empty()) {
        // A value with a line break cannot be a header value; drop it rather than panic.
        if !state.contains(['\r', '\n']) {
            headers.insert(TRACESTATE, state);
        }
    }
}

/// The splitmix64 finalizer: FNV-1a mixes its low bits poorly, trace ids should look random.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn keyed(tag: &str, saga_id: &str) -> u64 {
    mix(fnv1a_parts(&[tag.as_bytes(), b":", saga_id.as_bytes()]))
}

/// The trace id of a saga: `mix(fnv1a("sagaflow.trace.hi:" + id))` in the high 64 bits,
/// `mix(fnv1a("sagaflow.trace.lo:" + id))` in the low 64 bits (mix = the splitmix64
/// finalizer); never zero. The same on every node and in every version.
pub fn saga_trace_id(saga_id: &str) -> u128 {
    let id = (u128::from(keyed("sagaflow.trace.hi", saga_id)) << 64)
        | u128::from(keyed("sagaflow.trace.lo", saga_id));
    id.max(1)
}

/// The span id of a saga's root span: `mix(fnv1a("sagaflow.span.root:" + id))`, never zero.
pub fn saga_root_span_id(saga_id: &str) -> u64 {
    keyed("sagaflow.span.root", saga_id).max(1)
}

/// The saga's root span as a parent context (sampled).
pub fn saga_root(saga_id: &str) -> TraceParent {
    TraceParent {
        trace_id: saga_trace_id(saga_id),
        parent_id: saga_root_span_id(saga_id),
        flags: TraceParent::SAMPLED,
    }
}

/// A random, non-zero span id.
pub fn random_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(tp.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(tp.flags, 1);
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), EXAMPLE);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
            .parse()
            .unwrap();
        assert!(!unsampled.sampled());
        // Surrounding optional whitespace is allowed.
        assert_eq!(TraceParent::parse(&format!(" {EXAMPLE}\t")), Ok(tp));
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::Length(0)),
            (&EXAMPLE[..54], ParseError::Length(54)),
            (&format!("{EXAMPLE}-"), ParseError::Length(56)),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParseError::Version,
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParseError::Version,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ParseError::TraceId,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                ParseError::TraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ParseError::ParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
                ParseError::ParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                ParseError::Flags,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParseError::Separator,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                ParseError::Separator,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                ParseError::Separator,
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(
                TraceParent::parse(value).as_ref(),
                Err(expected),
                "{value:?}"
            );
        }
        // Non-ASCII input is refused, never a panic on a char boundary.
        assert!(TraceParent::parse(&"é".repeat(30)).is_err());
    }

    #[test]
    fn future_versions_are_read_as_version_00() {
        let tp = TraceParent::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        )
        .unwrap();
        assert_eq!(tp.to_string(), EXAMPLE);
        assert_eq!(TraceParent::parse(&EXAMPLE.replacen("00", "01", 1)), Ok(tp));
    }

    #[test]
    fn saga_ids_are_deterministic_distinct_and_valid() {
        let a = saga_root("order-A-100");
        assert_eq!(a, saga_root("order-A-100"));
        assert_eq!(a.trace_id, saga_trace_id("order-A-100"));
        assert_eq!(a.parent_id, saga_root_span_id("order-A-100"));
        assert!(a.sampled());
        // Pinned (computed independently from the documented formula): every node, version
        // and language must derive the same ids.
        assert_eq!(a.trace_id_hex(), "f00ece52fb9e0efe9b6ca02c56195480");
        assert_eq!(format!("{:016x}", a.parent_id), "0cdf29891ffe2151");
        let b = saga_root("order-A-101");
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.parent_id, b.parent_id);
        // Neighbouring ids differ in both halves (the mixer spreads small differences).
        assert_ne!(a.trace_id >> 64, b.trace_id >> 64);
        assert_ne!(a.trace_id as u64, b.trace_id as u64);
        assert_eq!(TraceParent::parse(&a.to_string()), Ok(a));
        let child = a.child();
        assert_eq!(child.trace_id, a.trace_id);
        assert_ne!(child.parent_id, 0);
    }

    #[test]
    fn headers_round_trip() {
        let tp = saga_root("s-1").child();
        let mut headers = HeaderMap::new();
        inject(&mut headers, &tp, Some("vendor=1"));
        assert_eq!(TraceParent::from_headers(Some(&headers)), Some(tp));
        assert_eq!(header(Some(&headers), TRACESTATE), Some("vendor=1"));
        let mut other = HeaderMap::new();
        other.insert("Traceparent", tp.to_string().as_str());
        assert_eq!(TraceParent::from_headers(Some(&other)), Some(tp));
        let mut bad = HeaderMap::new();
        bad.insert(TRACEPARENT, "00-garbage");
        inject(&mut bad, &tp, Some("a\nb"));
        assert_eq!(header(Some(&bad), TRACESTATE), None);
        assert_eq!(TraceParent::from_headers(None), None);
    }
}
