//! Sagaflow under load: orders placed with `PlaceOrder` over gRPC, their end seen on the
//! lifecycle stream.
//!
//! # How the end of an order is detected
//! The node publishes a [`StatusEvent`] on
//! `sagaflow.status.order.<saga_id>` for every status change, right after the snapshot that
//! makes the change is stored (compare-and-set), with `terminal` set on the last one. The bench
//! holds **one core NATS subscription** to `sagaflow.status.order.*` and timestamps the terminal
//! events as they arrive. We chose it over the alternatives because it costs the system under
//! test the least:
//! - polling `GetOrder` per order adds a gRPC call and a KV read per poll per order, and its
//!   interval quantises the latency;
//! - `WatchOrder` per order holds a stream and a KV watcher per order in the node;
//! - an ephemeral JetStream consumer on `SAGA_STATUS` adds consumer state, flow control and
//!   acks in the server, which already takes most of the CPU.
//!
//! A core subscription is one subject match per status event in the server. Its risk is that
//! core NATS drops messages for a subscriber that falls behind (the client's buffer is sized
//! at a million messages, far above what a run has in flight): as a safety net, orders not seen
//! to end after [`STRAGGLER_AFTER`] are checked with `GetOrder` (a few per second), and any end
//! found that way is counted in the report (`detected_by_poll`) with its latency an upper
//! bound. Events of other runs and of other clients' orders are ignored by their id.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use sagaflow::client::Conn;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{GetOrderRequest, OrderItem, PlaceOrderRequest, StatusEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::load::{Done, Kind, StartError, StartFuture, Target, Tracker};

/// Subjects of the order saga's lifecycle events.
pub const STATUS_SUBJECTS: &str = "sagaflow.status.order.*";

/// An order not seen to end after this long is checked with `GetOrder`.
pub const STRAGGLER_AFTER: Duration = Duration::from_secs(10);

/// Orders checked per second at most by the straggler poll.
const STRAGGLER_CHECKS_PER_SECOND: usize = 50;

/// Bound on one `GetOrder` of the straggler poll.
const GET_TIMEOUT: Duration = Duration::from_secs(2);

/// The order saga's id for an order id (as the node derives it).
fn saga_id_to_order_id(saga_id: &str) -> Option<&str> {
    saga_id.strip_prefix("order-")
}

/// The run whose orders the observers report to (one at a time).
#[derive(Debug, Default, Clone)]
pub struct Current(Arc<RwLock<Option<Arc<Tracker>>>>);

impl Current {
    /// Reports to `tracker` from now on (`None`: to nobody).
    pub fn set(&self, tracker: Option<Arc<Tracker>>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tracker;
    }

    /// The current run's tracker.
    pub fn get(&self) -> Option<Arc<Tracker>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Places orders over a few gRPC connections.
#[derive(Debug, Clone)]
pub struct Orders {
    clients: Vec<OrderServiceClient<Conn>>,
}

impl Orders {
    /// Orders spread round-robin over `channels` (one HTTP/2 connection each).
    pub fn new(channels: Vec<Conn>) -> Self {
        Orders {
            clients: channels.into_iter().map(OrderServiceClient::new).collect(),
        }
    }

    /// The request for order `index` of `kind`: one unit of one of the nine stocked SKUs, an
    /// amount under the payment limit (1,000.00); declined orders are above it, out-of-stock
    /// orders ask for `SKU-OUT`.
    pub fn request(order_id: String, index: u64, kind: Kind) -> PlaceOrderRequest {
        let (amount_cents, sku) = match kind {
            Kind::Ok => (
                1_999 + (index % 50) as i64 * 100,
                format!("SKU-{}", 1 + index % 9),
            ),
            Kind::Declined => (250_000, format!("SKU-{}", 1 + index % 9)),
            Kind::OutOfStock => (4_200, "SKU-OUT".to_string()),
        };
        PlaceOrderRequest {
            order_id,
            customer: "bench".to_string(),
            amount_cents,
            items: vec![OrderItem { sku, quantity: 1 }],
        }
    }
}

impl Target for Orders {
    fn start(&self, id: String, index: u64, kind: Kind) -> StartFuture {
        let n = self.clients.len().max(1);
        let Some(client) = self.clients.get((index as usize) % n) else {
            return Box::pin(async { Err(StartError::Failed("no grpc connection".to_string())) });
        };
        let mut client = client.clone();
        Box::pin(async move {
            client
                .place_order(Orders::request(id, index, kind))
                .await
                .map(|_| ())
                .map_err(|s| {
                    let e = format!(
                        "PlaceOrder: {}: {}",
                        sagaflow::client::code_name(s.code()),
                        s.message()
                    );
                    if s.code() == tonic::Code::ResourceExhausted {
                        StartError::Refused(e)
                    } else {
                        StartError::Failed(e)
                    }
                })
        })
    }
}

/// Follows the order status events of the current run until `cancel`: every terminal event
/// of one of its orders completes that order.
pub async fn follow_status(
    mut sub: async_nats::Subscriber,
    current: Current,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let at = Instant::now();
        let Some(tracker) = current.get() else {
            continue;
        };
        let saga_id = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
        let Some(index) = saga_id_to_order_id(saga_id).and_then(|o| tracker.index(o)) else {
            continue;
        };
        match StatusEvent::decode(msg.payload.as_ref()) {
            Ok(ev) if ev.terminal => tracker.complete(
                index,
                Done {
                    at,
                    status: ev.status,
                    by_poll: false,
                },
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "undecodable status event")
            }
        }
    }
}

/// Checks the current run's stragglers with `GetOrder` until `cancel` (see the module docs).
pub async fn poll_stragglers(
    client: OrderServiceClient<Conn>,
    current: Current,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(tracker) = current.get() else {
            continue;
        };
        for index in tracker.overdue(STRAGGLER_AFTER, STRAGGLER_CHECKS_PER_SECOND) {
            let mut client = client.clone();
            let request = GetOrderRequest {
                order_id: tracker.id(index),
            };
            let answer = tokio::select! {
                _ = cancel.cancelled() => return,
                a = tokio::time::timeout(GET_TIMEOUT, client.get_order(request)) => a,
            };
            if let Ok(Ok(order)) = answer {
                let order = order.into_inner();
                if order.terminal {
                    tracker.complete(
                        index,
                        Done {
                            at: Instant::now(),
                            status: order.status,
                            by_poll: true,
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_requests_follow_the_kind() {
        let ok = Orders::request("o-1".into(), 10, Kind::Ok);
        assert!(ok.amount_cents <= 100_000);
        assert_eq!(ok.items[0].sku, "SKU-2");
        let declined = Orders::request("o-2".into(), 0, Kind::Declined);
        assert!(declined.amount_cents > 100_000);
        let out = Orders::request("o-3".into(), 0, Kind::OutOfStock);
        assert_eq!(out.items[0].sku, "SKU-OUT");
        assert_eq!(
            saga_id_to_order_id("order-bench-1-m0-3"),
            Some("bench-1-m0-3")
        );
    }
}
