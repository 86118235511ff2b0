//! Where messages go and the ids derived from a saga's step: the naming half of the wire
//! contract, shared by the node and by participants.

/// The stream of saga events: starts, participant replies, cancels (`sagaflow.evt.>`).
pub const EVENTS_STREAM: &str = "SAGA_EVENTS";
/// The stream of commands to participant services (`sagaflow.cmd.>`).
pub const COMMANDS_STREAM: &str = "SAGA_COMMANDS";
/// The stream of dead letters (`sagaflow.dlq.>`).
pub const DLQ_STREAM: &str = "SAGA_DLQ";

/// Control events: the kinds that name their saga in a header, never a service (a reply
/// subject `sagaflow.evt.<p>.reply.<service>` cannot end in one of these).
pub const CONTROL_KINDS: [&str; 4] = ["start", "cancel", "intervene", "signal"];

/// The durable consumer (consumer group) of a participant service: `svc-<service>`.
pub fn service_consumer(service: &str) -> String {
    format!("svc-{service}")
}

/// The subjects of a service's commands: `sagaflow.cmd.<service>.>`.
pub fn service_commands(service: &str) -> String {
    format!("sagaflow.cmd.{service}.>")
}

/// The subject of one command: `sagaflow.cmd.<service>.<action>`.
pub fn command_subject(service: &str, action: &str) -> String {
    format!("sagaflow.cmd.{service}.{action}")
}

/// Where `service` replies for a saga of `partition`: `sagaflow.evt.<partition>.reply.<service>`.
pub fn reply_subject(partition: u32, service: &str) -> String {
    format!("sagaflow.evt.{partition}.reply.{service}")
}

/// The dead-letter subject of messages from `source`: `sagaflow.dlq.<source>`.
pub fn dlq_subject(source: &str) -> String {
    format!("sagaflow.dlq.{source}")
}

/// Command id: unique per attempt (`<saga>/<step>/<attempt>`, `c<attempt>` for
/// compensations), so JetStream de-duplicates a republished command.
pub fn command_id(saga_id: &str, step: &str, compensation: bool, attempt: u32) -> String {
    if compensation {
        format!("{saga_id}/{step}/c{attempt}")
    } else {
        format!("{saga_id}/{step}/{attempt}")
    }
}

/// The idempotency key participants record effects under: the same for every attempt of a
/// step (`<saga>/<step>`, `<saga>/<step>/compensate` for its compensation).
pub fn idempotency_key(saga_id: &str, step: &str, compensation: bool) -> String {
    if compensation {
        format!("{saga_id}/{step}/compensate")
    } else {
        format!("{saga_id}/{step}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_shapes() {
        assert_eq!(service_consumer("hotel"), "svc-hotel");
        assert_eq!(service_commands("hotel"), "sagaflow.cmd.hotel.>");
        assert_eq!(command_subject("hotel", "book"), "sagaflow.cmd.hotel.book");
        assert_eq!(reply_subject(7, "hotel"), "sagaflow.evt.7.reply.hotel");
        assert_eq!(
            command_id("t-1", "book_hotel", false, 2),
            "t-1/book_hotel/2"
        );
        assert_eq!(
            command_id("t-1", "book_hotel", true, 1),
            "t-1/book_hotel/c1"
        );
        assert_eq!(
            idempotency_key("t-1", "book_hotel", false),
            "t-1/book_hotel"
        );
        assert_eq!(
            idempotency_key("t-1", "book_hotel", true),
            "t-1/book_hotel/compensate"
        );
    }
}
