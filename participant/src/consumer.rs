//! The durable consumer of a participant service: its consumer group.
//!
//! Every instance of a service, on every machine, binds to the same durable pull consumer
//! `svc-<service>` on `SAGA_COMMANDS`, so JetStream hands each command to one of them. The
//! settings are the protocol's (the table in `docs/participants.md`): whoever creates the
//! consumer first (a node for its demo services, or your service) must create the same one.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use sagaflow_proto::subjects::{service_commands, service_consumer, COMMANDS_STREAM};

use crate::consume::OpenError;

/// How a service's consumer is set up (defaults: the node's `consumers.*` defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// An instance that dies holding a command gives it back after this (30 s).
    pub ack_wait: Duration,
    /// A command is delivered at most this many times, then dead-lettered by the orchestrator
    /// from JetStream's advisory (20). Without it JetStream redelivers forever.
    pub max_deliver: i64,
    /// Commands delivered but not yet acked, across every instance (20,000).
    pub max_ack_pending: i64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            max_ack_pending: 20_000,
        }
    }
}

impl ConsumerSettings {
    /// The JetStream consumer configuration of `service`: durable `svc-<service>`, filter
    /// `sagaflow.cmd.<service>.>`, explicit ack, these limits, deliver all (safe for a late
    /// consumer: every command expires from the stream at its step's timeout, `Nats-TTL`).
    pub fn config(&self, service: &str) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(service_consumer(service)),
            description: Some(format!(
                "consumer group of the `{service}` participant service"
            )),
            filter_subject: service_commands(service),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }
}

/// Creates (or updates to `settings`) the durable consumer shared by every instance of
/// `service`.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    service: &str,
    settings: &ConsumerSettings,
) -> Result<consumer::PullConsumer, OpenError> {
    crate::consume::open_durable(js, COMMANDS_STREAM, settings.config(service)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_the_documented_one() {
        let c = ConsumerSettings::default().config("hotel");
        assert_eq!(c.durable_name.as_deref(), Some("svc-hotel"));
        assert_eq!(c.filter_subject, "sagaflow.cmd.hotel.>");
        assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(c.deliver_policy, consumer::DeliverPolicy::All);
        assert_eq!(c.ack_wait, Duration::from_secs(30));
        assert_eq!(c.max_deliver, 20);
        assert_eq!(c.max_ack_pending, 20_000);
    }
}
