//! Versioned envelopes for everything Sagaflow stores or sends in postcard.
//!
//! postcard is not self-describing: a field added to a struct changes the bytes of every value.
//! So every stored or sent payload is wrapped in an enum whose variants are append-only (`V1`,
//! later `V2`…); a decoder keeps reading every old variant. The golden-bytes tests below pin the
//! encoding of each version: if one fails, you changed a stored format — add a new variant and
//! keep the old type frozen instead.

use serde::{Deserialize, Serialize};

use crate::machine::{Intervention, Millis, Saga};

/// A saga snapshot as stored in the `sagaflow_sagas` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotEnvelope {
    /// Format 1.
    V1(Saga),
}

/// A control event on a saga's event subject (participant replies are protobuf instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlEnvelope {
    /// Format 1.
    V1(Control),
}

/// Control events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// The saga's snapshot was created: its owner must publish the first commands.
    Started {
        /// When it was created.
        at: Millis,
    },
    /// Stop going forward and compensate.
    Cancel {
        /// Why.
        reason: String,
        /// When it was asked.
        at: Millis,
    },
    /// An operator's action (also the payload of a parked saga's dead letter: replaying it
    /// retries the compensation that parked the saga).
    Intervene {
        /// The action.
        intervention: Intervention,
        /// When it was asked.
        at: Millis,
    },
    /// [`Control::Started`] carrying the snapshot as created, so the owner need not read it.
    Created {
        /// When it was created.
        at: Millis,
        /// Its revision in the bucket.
        revision: u64,
        /// The snapshot, as [`encode_snapshot`] wrote it.
        snapshot: Vec<u8>,
        /// Whether the creator published the first commands itself.
        commands_sent: bool,
    },
    /// A signal for the saga's wait steps (`Event::Signal`). (Appended: older events keep
    /// their bytes.)
    Signal {
        /// Its id (duplicates share it).
        id: String,
        /// Its name.
        name: String,
        /// Its payload, JSON.
        payload: Vec<u8>,
        /// When it was accepted.
        at: Millis,
    },
}

/// A payload that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {source}")]
pub struct Error {
    /// What was being decoded.
    pub what: &'static str,
    /// Cause.
    #[source]
    pub source: postcard::Error,
}

/// Encodes a snapshot.
pub fn encode_snapshot(saga: &Saga) -> Result<Vec<u8>, Error> {
    postcard::to_stdvec(&SnapshotEnvelopeRef::V1(saga)).map_err(|source| Error {
        what: "snapshot",
        source,
    })
}

/// Decodes a snapshot of any known version.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Saga, Error> {
    match postcard::from_bytes(bytes).map_err(|source| Error {
        what: "snapshot",
        source,
    })? {
        SnapshotEnvelope::V1(saga) => Ok(saga),
    }
}

/// Encodes a control event.
pub fn encode_control(control: &Control) -> Result<Vec<u8>, Error> {
    postcard::to_stdvec(&ControlEnvelopeRef::V1(control)).map_err(|source| Error {
        what: "control event",
        source,
    })
}

/// Decodes a control event of any known version.
pub fn decode_control(bytes: &[u8]) -> Result<Control, Error> {
    match postcard::from_bytes(bytes).map_err(|source| Error {
        what: "control event",
        source,
    })? {
        ControlEnvelope::V1(c) => Ok(c),
    }
}

// Borrowing twins of the envelopes, so encoding does not clone the saga. Serde encodes an enum
// by variant index, so these produce exactly the owned envelopes' bytes (the tests check it).
#[derive(Serialize)]
enum SnapshotEnvelopeRef<'a> {
    V1(&'a Saga),
}

#[derive(Serialize)]
enum ControlEnvelopeRef<'a> {
    V1(&'a Control),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::machine::{Happening, HistoryEntry, Phase, StepError, StepPhase, StepState};

    fn sample() -> Saga {
        Saga {
            id: "order-1".into(),
            definition: "order".into(),
            fingerprint: 0x0102_0304_0506_0708,
            input: br#"{"a":1}"#.to_vec(),
            status: "PAID".into(),
            phase: Phase::Compensating,
            reason: Some("r".into()),
            stage: 1,
            steps: vec![StepState {
                phase: StepPhase::Compensating,
                attempt: 2,
                comp_attempt: 1,
                due_at: Some(1_000),
                maybe_applied: true,
                last_error: Some(StepError {
                    kind: "timeout".into(),
                    message: "m".into(),
                }),
                started_at: Some(10),
                finished_at: None,
                output: Some(vec![7]),
            }],
            compensation_plan: Some(vec![0]),
            comp_cursor: 0,
            started_at: 10,
            updated_at: 20,
            deadline_at: 30,
            history: vec![HistoryEntry {
                at: 10,
                step: Some(0),
                what: Happening::Sent { attempt: 1 },
            }],
            status_seq: 3,
        }
    }

    /// Bytes of `sample()` in snapshot format V1. Never change them: add a V2 instead.
    const SNAPSHOT_V1: &str = "00076f726465722d31056f72646572888e98a8c0e0808101077b2261223a317d045041494401010172010105020101d00f01010774696d656f7574016d0114000101070101000014283c01140100010103";

    #[test]
    fn snapshot_v1_golden_bytes() {
        let bytes = encode_snapshot(&sample()).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex, SNAPSHOT_V1,
            "the V1 snapshot encoding changed: stored sagas would not decode"
        );
        let owned = postcard::to_stdvec(&SnapshotEnvelope::V1(sample())).unwrap();
        assert_eq!(owned, bytes);
        assert_eq!(decode_snapshot(&bytes).unwrap(), sample());
    }

    #[test]
    fn control_v1_golden_bytes() {
        let c = Control::Cancel {
            reason: "x".into(),
            at: 5,
        };
        let bytes = encode_control(&c).unwrap();
        assert_eq!(bytes, vec![0, 1, 1, b'x', 10]);
        assert_eq!(decode_control(&bytes).unwrap(), c);
        assert_eq!(
            encode_control(&Control::Started { at: 1 }).unwrap(),
            vec![0, 0, 2]
        );
    }

    #[test]
    fn created_golden_bytes_carry_a_decodable_snapshot() {
        let snapshot = encode_snapshot(&sample()).unwrap();
        let c = Control::Created {
            at: 1,
            revision: 3,
            snapshot: snapshot.clone(),
            commands_sent: true,
        };
        let bytes = encode_control(&c).unwrap();
        // Appended variant 3: the earlier variants keep their bytes (tests above).
        assert_eq!(bytes[..4], [0, 3, 2, 3]);
        assert_eq!(bytes.last(), Some(&1), "commands_sent comes last");
        let Control::Created { snapshot: back, .. } = decode_control(&bytes).unwrap() else {
            panic!("not a Created control");
        };
        assert_eq!(back, snapshot);
        assert_eq!(decode_snapshot(&back).unwrap(), sample());
    }

    #[test]
    fn intervene_golden_bytes_and_appended_variants_keep_old_bytes() {
        use crate::machine::{Intervention, OperatorAction};
        let c = Control::Intervene {
            intervention: Intervention {
                id: "i".into(),
                action: OperatorAction::Retry { step: Some(2) },
                operator: "o".into(),
                reason: String::new(),
            },
            at: 1,
        };
        let bytes = encode_control(&c).unwrap();
        assert_eq!(bytes, vec![0, 2, 1, b'i', 0, 1, 2, 1, b'o', 0, 2]);
        assert_eq!(decode_control(&bytes).unwrap(), c);
        // Snapshots of a parked saga and its journal entries round-trip; the phases and
        // happenings added for parking were appended, so older snapshots keep their bytes
        // (snapshot_v1_golden_bytes above).
        let mut parked = sample();
        parked.phase = Phase::NeedsAttention;
        parked.history.push(HistoryEntry {
            at: 11,
            step: None,
            what: Happening::Intervened {
                id: "i".into(),
                action: "retry".into(),
                operator: "o".into(),
                reason: "r".into(),
                refused: String::new(),
            },
        });
        let bytes = encode_snapshot(&parked).unwrap();
        assert_eq!(decode_snapshot(&bytes).unwrap(), parked);
    }

    #[test]
    fn elided_golden_bytes_and_the_appended_variant_keeps_old_bytes() {
        // History compaction's marker was appended to `Happening` (variant 17): snapshots
        // without it keep their bytes (snapshot_v1_golden_bytes above).
        let marker = HistoryEntry {
            at: 12,
            step: None,
            what: Happening::Elided {
                entries: 300,
                parkings: 2,
                since: 11,
            },
        };
        assert_eq!(
            postcard::to_stdvec(&marker).unwrap(),
            vec![24, 0, 17, 0xac, 0x02, 2, 22],
            "the Elided encoding changed: stored sagas would not decode"
        );
        let mut compacted = sample();
        compacted.history.insert(0, marker);
        let bytes = encode_snapshot(&compacted).unwrap();
        assert_eq!(decode_snapshot(&bytes).unwrap(), compacted);
    }

    #[test]
    fn reply_refused_golden_bytes_and_the_appended_variant_keeps_old_bytes() {
        // Refused replies were appended to `Happening` (variant 18): snapshots without them
        // keep their bytes (snapshot_v1_golden_bytes above).
        let entry = HistoryEntry {
            at: 12,
            step: Some(0),
            what: Happening::ReplyRefused {
                attempt: 2,
                compensation: true,
                reason: "r".into(),
                count: 3,
            },
        };
        assert_eq!(
            postcard::to_stdvec(&entry).unwrap(),
            vec![24, 1, 0, 18, 2, 1, 1, b'r', 3],
            "the ReplyRefused encoding changed: stored sagas would not decode"
        );
        let mut refused = sample();
        refused.history.push(entry);
        let bytes = encode_snapshot(&refused).unwrap();
        assert_eq!(decode_snapshot(&bytes).unwrap(), refused);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_snapshot(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_control(&[]).is_err());
        assert!(decode_control(&[9, 9]).is_err());
    }
}
