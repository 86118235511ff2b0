//! `OrderService`: the order saga behind a domain-shaped API.

use futures::StreamExt;
use sagaflow_proto::v1::order_service_server::OrderService;
use sagaflow_proto::v1::{
    self, GetOrderRequest, ListOrdersRequest, ListOrdersResponse, PlaceOrderRequest,
    PlaceOrderResponse,
};
use tonic::{Request, Response, Status};

use super::render::{self, order_saga_id, OrderInput, OrderItem};
use super::{invalid, valid_id, ApiError, BoxStream, SagaApi};
use crate::index::{Cursor, Listed};
use sagaflow_actors::machine::Saga;

/// Name of the saga definition orders run.
pub const ORDER_SAGA: &str = "order";
const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: u32 = 100_000;
const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// `OrderService` implementation.
#[derive(Debug, Clone)]
pub struct Orders {
    api: SagaApi,
}

impl Orders {
    /// Orders over `api`.
    pub fn new(api: SagaApi) -> Self {
        Orders { api }
    }
}

fn valid_sku(sku: &str) -> bool {
    let mut chars = sku.chars();
    sku.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Validates a `PlaceOrder` request into the saga input, naming the first bad field.
pub fn validate(req: &PlaceOrderRequest) -> Result<OrderInput, Status> {
    if !valid_id(&req.order_id, 100) {
        return Err(invalid(
            "order_id",
            "must be 1 to 100 characters of A-Z, a-z, 0-9, `_` or `-`",
        ));
    }
    let customer = req.customer.trim();
    if customer.is_empty()
        || customer.chars().count() > 200
        || customer.chars().any(char::is_control)
    {
        return Err(invalid("customer", "must be 1 to 200 printable characters"));
    }
    if req.amount_cents <= 0 {
        return Err(invalid(
            "amount_cents",
            format!("must be positive, got {}", req.amount_cents),
        ));
    }
    if req.amount_cents > MAX_AMOUNT {
        return Err(invalid(
            "amount_cents",
            format!("must be at most {MAX_AMOUNT}"),
        ));
    }
    if req.items.is_empty() {
        return Err(invalid("items", "an order needs at least one item"));
    }
    if req.items.len() > MAX_ITEMS {
        return Err(invalid(
            "items",
            format!("at most {MAX_ITEMS} items, got {}", req.items.len()),
        ));
    }
    let mut items = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.iter().enumerate() {
        if !valid_sku(&item.sku) {
            return Err(invalid(
                &format!("items[{i}].sku"),
                format!(
                    "{:?} is not a SKU (A-Z, 0-9, `_`, `-`, at most 64)",
                    truncate(&item.sku)
                ),
            ));
        }
        if item.quantity == 0 || item.quantity > MAX_QUANTITY {
            return Err(invalid(
                &format!("items[{i}].quantity"),
                format!("must be 1 to {MAX_QUANTITY}, got {}", item.quantity),
            ));
        }
        items.push(OrderItem {
            sku: item.sku.clone(),
            quantity: item.quantity,
        });
    }
    Ok(OrderInput {
        order_id: req.order_id.clone(),
        customer: customer.to_string(),
        amount_cents: req.amount_cents,
        items,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(70).collect()
}

fn validate_order_id(id: &str) -> Result<String, Status> {
    if !valid_id(id, 100) {
        return Err(invalid(
            "order_id",
            "must be 1 to 100 characters of A-Z, a-z, 0-9, `_` or `-`",
        ));
    }
    Ok(order_saga_id(id))
}

#[tonic::async_trait]
impl OrderService for Orders {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let req = request.into_inner();
        let input = validate(&req)?;
        let def = self.api.definition(ORDER_SAGA).ok_or_else(|| {
            Status::failed_precondition("the `order` saga is not defined on this node")
        })?;
        let saga_id = order_saga_id(&input.order_id);
        let bytes = serde_json::to_vec(&input).map_err(|e| Status::internal(e.to_string()))?;
        let (created, saga) = self
            .api
            .start(&def, &saga_id, bytes)
            .await
            .map_err(|e| order_error(e, &input.order_id))?;
        Ok(Response::new(PlaceOrderResponse {
            order_id: input.order_id,
            saga_id,
            created,
            status: saga.status,
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<v1::Order>, Status> {
        let id = validate_order_id(&request.into_inner().order_id)?;
        let (saga, rev) = self
            .api
            .get(&id)
            .await
            .map_err(|e| order_error(e, order_id_of(&id)))?;
        let def = self.api.definition_of(&saga);
        Ok(Response::new(render::order(&saga, rev, def.as_deref())))
    }

    type WatchOrderStream = BoxStream<v1::Order>;

    async fn watch_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let id = validate_order_id(&request.into_inner().order_id)?;
        let api = self.api.clone();
        let stream = self
            .api
            .watch(&id)
            .await
            .map_err(|e| order_error(e, order_id_of(&id)))?;
        let stream = stream.map(move |item| {
            item.map_err(Status::from).map(|(saga, rev)| {
                let def = api.definition_of(&saga);
                render::order(&saga, rev, def.as_deref())
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 100,
            n if n > 1000 => return Err(invalid("page_size", "at most 1000")),
            n => n as usize,
        };
        let after = parse_token(&req.page_token)?;
        let status = req.status.trim().to_ascii_uppercase();
        if !status.is_empty() {
            if let Some(def) = self.api.definition(ORDER_SAGA) {
                let labels = def.status_labels();
                if !labels.contains(&status.as_str()) {
                    return Err(invalid(
                        "status",
                        format!(
                            "no order status {:?}; one of {}",
                            req.status.chars().take(64).collect::<String>(),
                            labels.join(", ")
                        ),
                    ));
                }
            }
        }
        let prefix = render::order_saga_id("");
        let keep = |l: &Listed| {
            l.id.starts_with(&prefix)
                && (status.is_empty() || l.headers.as_ref().is_none_or(|h| h.status == status))
        };
        let accept = |s: &Saga| status.is_empty() || s.status == status;
        let (sagas, next) = self
            .api
            .list_page(after.as_ref(), page_size, page_size, keep, accept)
            .await?;
        let orders = sagas
            .iter()
            .map(|s| {
                let def = self.api.definition_of(s);
                let mut o = render::order(s, 0, def.as_deref());
                // Lists stay small: the history is in GetOrder.
                if let Some(saga) = o.saga.as_mut() {
                    saga.history.clear();
                }
                o
            })
            .collect();
        Ok(Response::new(ListOrdersResponse {
            orders,
            next_page_token: next.map(|c| c.token()).unwrap_or_default(),
        }))
    }
}

/// A page token from a previous response, or `INVALID_ARGUMENT`.
pub fn parse_token(token: &str) -> Result<Option<Cursor>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    Cursor::parse(token)
        .map(Some)
        .ok_or_else(|| invalid("page_token", "not a token from a previous response"))
}

/// The order id of an order's saga id (`order-A-1` → `A-1`).
fn order_id_of(saga_id: &str) -> &str {
    saga_id.trim_start_matches("order-")
}

/// An error about an order's saga, said in the order's terms.
fn order_error(e: ApiError, order_id: &str) -> Status {
    match e {
        ApiError::NotFound(_) => Status::not_found(format!("no order with id `{order_id}`")),
        e @ ApiError::DifferentInput { .. } => Status::already_exists(e.to_string().replacen(
            &format!("`{}`", order_saga_id(order_id)),
            &format!("order `{order_id}`"),
            1,
        )),
        e => e.into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ok_request() -> PlaceOrderRequest {
        PlaceOrderRequest {
            order_id: "A-1".into(),
            customer: "ann".into(),
            amount_cents: 1200,
            items: vec![v1::OrderItem {
                sku: "SKU-1".into(),
                quantity: 2,
            }],
        }
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutation = Box<dyn Fn(&mut PlaceOrderRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.order_id.clear()), "order_id"),
            (Box::new(|r| r.order_id = "a b".into()), "order_id"),
            (Box::new(|r| r.order_id = "x".repeat(101)), "order_id"),
            (Box::new(|r| r.customer = " ".into()), "customer"),
            (Box::new(|r| r.amount_cents = 0), "amount_cents"),
            (Box::new(|r| r.amount_cents = -5), "amount_cents"),
            (Box::new(|r| r.items.clear()), "items"),
            (
                Box::new(|r| r.items[0].sku = "sku-1".into()),
                "items[0].sku",
            ),
            (
                Box::new(|r| r.items[0].sku = "S".repeat(65)),
                "items[0].sku",
            ),
            (Box::new(|r| r.items[0].quantity = 0), "items[0].quantity"),
            (
                Box::new(|r| {
                    r.items = vec![
                        v1::OrderItem {
                            sku: "A".into(),
                            quantity: 1
                        };
                        101
                    ]
                }),
                "items",
            ),
        ];
        for (mutate, field) in cases {
            let mut r = ok_request();
            mutate(&mut r);
            let err = validate(&r).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().starts_with(&format!("{field}:")),
                "{field}: {}",
                err.message()
            );
        }
        assert_eq!(validate(&ok_request()).unwrap().items[0].quantity, 2);
    }
}
