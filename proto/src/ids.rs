//! The rules every identifier that comes from outside must pass before anything uses it.
//!
//! A saga id ends up in a KV key, in NATS subjects (status events, parked sagas' dead letters)
//! and in headers. NATS subjects cannot hold spaces, `.`, `*`, `>` or control characters, and a
//! protocol line longer than the server's `max_control_line` (4 KiB) makes the server close the
//! connection: one unchecked id from a message could knock a node off NATS. So the gRPC API,
//! the event decoder and the participant host all check ids with these functions, and nothing
//! is done with an id that fails them.

/// Longest saga id, in bytes.
pub const MAX_SAGA_ID: usize = 128;

/// Longest step name accepted from a message, in bytes (definitions allow 62).
pub const MAX_STEP_NAME: usize = 64;

/// Longest error kind accepted from a participant, in bytes.
pub const MAX_ERROR_KIND: usize = 64;

/// Longest free text (a reason, an operator, an intervention id) accepted in a control event,
/// in bytes; the gRPC API refuses longer ones too.
pub const MAX_TEXT: usize = 1024;

/// Whether `id` is 1 to `max` bytes of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str, max: usize) -> bool {
    !id.is_empty()
        && id.len() <= max
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `id` is a valid saga id: 1 to [`MAX_SAGA_ID`] bytes of `[A-Za-z0-9_-]`.
pub fn valid_saga_id(id: &str) -> bool {
    valid_id(id, MAX_SAGA_ID)
}

/// Why a saga id is refused, for messages (`None` when it is valid). Quotes at most the first
/// 64 characters of the id, with control characters escaped, so the reason itself stays short
/// and printable.
pub fn saga_id_problem(id: &str) -> Option<String> {
    if valid_saga_id(id) {
        return None;
    }
    let why = if id.is_empty() {
        "is empty".to_string()
    } else if id.len() > MAX_SAGA_ID {
        format!("is {} bytes long (at most {MAX_SAGA_ID})", id.len())
    } else {
        "may only hold A-Z, a-z, 0-9, `_` and `-`".to_string()
    };
    Some(format!("saga id {} {why}", quote(id)))
}

/// `text` quoted for a log line or a dead letter's reason: at most 64 characters inside the
/// quotes, control characters escaped (`\n`), `…` when cut.
pub fn quote(text: &str) -> String {
    let mut out = String::from("`");
    let mut shown = 0;
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        let width = piece.chars().count();
        if shown + width > 64 {
            out.push('…');
            break;
        }
        shown += width;
        out.push_str(&piece);
    }
    out.push('`');
    out
}

/// Whether `text` is at most `max` bytes with no control character.
pub fn valid_text(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_ids_are_refused_with_a_short_printable_reason() {
        for bad in ["", "x y", "a*", "a>", "a.b", "été", "a\nb", "a\r\nPUB x 1"] {
            assert!(!valid_saga_id(bad), "{bad:?} was accepted");
            let why = saga_id_problem(bad).unwrap_or_default();
            assert!(why.starts_with("saga id `"), "{why}");
            assert!(!why.chars().any(char::is_control), "{why:?}");
        }
        let long = "Z".repeat(5_000);
        assert!(!valid_saga_id(&long));
        let why = saga_id_problem(&long).unwrap_or_default();
        assert!(why.contains("5000 bytes long"), "{why}");
        assert!(why.len() < 200, "{why}");
        for good in ["order-A-100", "x", &"a".repeat(MAX_SAGA_ID)] {
            assert!(valid_saga_id(good));
            assert_eq!(saga_id_problem(good), None);
        }
        assert!(!valid_saga_id(&"a".repeat(MAX_SAGA_ID + 1)));
    }

    proptest! {
        /// Whatever the input, a valid id is a safe NATS subject token and KV key part.
        #[test]
        fn a_valid_id_is_a_safe_subject_token(id in ".{0,200}") {
            if valid_saga_id(&id) {
                prop_assert!(!id.is_empty() && id.len() <= MAX_SAGA_ID);
                prop_assert!(!id.contains(['.', '*', '>', ' ', '\t', '\r', '\n']));
            } else {
                prop_assert!(saga_id_problem(&id).is_some());
            }
            prop_assert!(quote(&id).chars().count() <= 67);
        }
    }
}
