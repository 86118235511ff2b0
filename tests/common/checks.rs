//! Order helpers shared by the integration tests: placing a mix of orders, waiting for them,
//! and checking the participants' ledgers against the guarantees.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{self, GetOrderRequest, OrderItem, PlaceOrderRequest};
use tonic::transport::Channel;

use super::{nats_client, within, NatsServer, TIMEOUT};

/// `GetOrder`, bounded (panics if the server does not answer in time).
#[allow(clippy::unwrap_used)]
pub async fn get_order(
    client: &mut OrderServiceClient<Channel>,
    id: &str,
) -> Result<v1::Order, tonic::Status> {
    within(
        TIMEOUT,
        "GetOrder",
        client.get_order(GetOrderRequest {
            order_id: id.into(),
        }),
    )
    .await
    .unwrap()
    .map(tonic::Response::into_inner)
}

/// A place-order request.
pub fn order(id: &str, amount: i64, items: &[(&str, u32)]) -> PlaceOrderRequest {
    PlaceOrderRequest {
        order_id: id.into(),
        customer: "ann".into(),
        amount_cents: amount,
        items: items
            .iter()
            .map(|(s, q)| OrderItem {
                sku: s.to_string(),
                quantity: *q,
            })
            .collect(),
    }
}

/// What the participants' ledgers say happened to one saga.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    pub charged: u32,
    pub refunded: u32,
    pub reserved: u32,
    pub released: u32,
    pub shipped: u32,
    pub shipment_cancelled: u32,
    pub notified: u32,
    pub notification_withdrawn: u32,
    pub notified_cancellation: u32,
}

pub async fn ledgers(nats: &NatsServer) -> HashMap<String, Effects> {
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let entries = within(
        Duration::from_secs(60),
        "read ledger",
        sagaflow::demo::ledger(&js),
    )
    .await
    .unwrap()
    .unwrap();
    let summary = sagaflow::demo::LedgerSummary::from_entries(&entries);
    summary
        .per_saga()
        .iter()
        .map(|(id, c)| {
            (
                id.clone(),
                Effects {
                    charged: c.charged,
                    refunded: c.refunded,
                    reserved: c.reserved,
                    released: c.released,
                    shipped: c.shipped,
                    shipment_cancelled: c.shipment_cancelled,
                    notified: c.notified,
                    notification_withdrawn: c.notification_withdrawn,
                    notified_cancellation: c.notified_cancellation,
                },
            )
        })
        .collect()
}

/// Checks the guarantees for a set of finished orders: one charge per shipped order and no
/// undo; for the cancelled ones, every effect that happened undone once (refund, release,
/// shipment cancelled, confirmation withdrawn) and one cancellation notice.
pub fn check_ledgers(orders: &[v1::Order], ledgers: &HashMap<String, Effects>) {
    for o in orders {
        let saga_id = format!("order-{}", o.order_id);
        let e = ledgers.get(&saga_id).cloned().unwrap_or_default();
        match o.status.as_str() {
            "SHIPPED" => assert_eq!(
                e,
                Effects {
                    charged: 1,
                    reserved: 1,
                    shipped: 1,
                    notified: 1,
                    ..Default::default()
                },
                "shipped order {} effects",
                o.order_id
            ),
            "CANCELLED" => {
                assert!(
                    e.charged <= 1 && e.refunded == e.charged,
                    "cancelled order {}: charges must be refunded once: {e:?}",
                    o.order_id
                );
                assert_eq!(
                    e.released, e.reserved,
                    "cancelled order {}: {e:?}",
                    o.order_id
                );
                assert_eq!(
                    e.shipment_cancelled, e.shipped,
                    "cancelled order {}: {e:?}",
                    o.order_id
                );
                assert!(
                    e.notified <= 1 && e.notification_withdrawn == e.notified,
                    "cancelled order {}: a confirmation sent must be withdrawn: {e:?}",
                    o.order_id
                );
                assert_eq!(
                    e.notified_cancellation, 1,
                    "cancelled order {}: {e:?}",
                    o.order_id
                );
            }
            other => panic!("order {} ended {other}: {}", o.order_id, o.reason),
        }
    }
}

/// `PlaceOrder`, retried after the delay the node asks for while it refuses the order as
/// overloaded (`RESOURCE_EXHAUSTED`, admission control), as a client should: a burst of orders
/// on a loaded test machine can trip it. Bounded: 60 s of refusals, then the refusal is
/// returned.
pub async fn place_retrying(
    client: &mut OrderServiceClient<Channel>,
    req: PlaceOrderRequest,
) -> Result<Result<tonic::Response<v1::PlaceOrderResponse>, tonic::Status>, anyhow::Error> {
    use tonic_types::StatusExt;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match within(TIMEOUT, "PlaceOrder", client.place_order(req.clone())).await {
            Ok(Err(s))
                if s.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline =>
            {
                let delay = s
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// Places `n` orders concurrently: every tenth above the payment limit, every 15th out of stock.
pub async fn place_mix(
    client: &OrderServiceClient<Channel>,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let results: Vec<_> = futures::stream::iter(ids.clone().into_iter().enumerate())
        .map(|(i, id)| {
            let mut c = client.clone();
            async move {
                let req = if i % 10 == 3 {
                    order(&id, 150_000, &[("SKU-4", 1)])
                } else if i % 15 == 7 {
                    order(&id, 3_000, &[("SKU-2", 1), ("SKU-OUT", 2)])
                } else {
                    order(
                        &id,
                        1_000 + i as i64,
                        &[("SKU-1", 1 + (i % 3) as u32), ("SKU-5", 1)],
                    )
                };
                place_retrying(&mut c, req).await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r.unwrap().unwrap();
    }
    ids
}

pub async fn wait_all_terminal(
    client: &OrderServiceClient<Channel>,
    ids: &[String],
    timeout: Duration,
) -> Vec<v1::Order> {
    let deadline = Instant::now() + timeout;
    let mut done: BTreeMap<String, v1::Order> = BTreeMap::new();
    while done.len() < ids.len() {
        let pending: Vec<String> = ids
            .iter()
            .filter(|id| !done.contains_key(*id))
            .cloned()
            .collect();
        let orders: Vec<_> = futures::stream::iter(pending)
            .map(|id| {
                let mut c = client.clone();
                async move {
                    within(
                        TIMEOUT,
                        "GetOrder",
                        c.get_order(GetOrderRequest { order_id: id }),
                    )
                    .await
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut waiting = Vec::new();
        for o in orders.into_iter().flatten().flatten() {
            let o = o.into_inner();
            if o.terminal {
                done.insert(o.order_id.clone(), o);
            } else {
                waiting.push(o);
            }
        }
        if Instant::now() >= deadline {
            // Say where each straggler is, so a failure can be diagnosed from the log alone.
            let detail: Vec<String> = waiting
                .iter()
                .take(5)
                .map(|o| {
                    let saga = o.saga.clone().unwrap_or_default();
                    let tail: Vec<String> = saga
                        .history
                        .iter()
                        .rev()
                        .take(12)
                        .rev()
                        .map(|h| format!("  {} {} {}", h.at_unix_ms, h.step, h.what))
                        .collect();
                    format!(
                        "order {} status {} phase {} progress {:?}\n{}",
                        o.order_id,
                        o.status,
                        saga.phase,
                        saga.progress,
                        tail.join("\n")
                    )
                })
                .collect();
            panic!(
                "{} of {} orders still not terminal after {timeout:?}:\n{}",
                ids.len() - done.len(),
                ids.len(),
                detail.join("\n")
            );
        }
        if done.len() < ids.len() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    done.into_values().collect()
}
