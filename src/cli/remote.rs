//! The client commands: each connects to a node over gRPC (bounded by [`CONNECT_TIMEOUT`]),
//! makes its calls (each unary call bounded by [`CALL_TIMEOUT`]) and prints the answer.

use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::analytics_service_client::AnalyticsServiceClient;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{
    ClusterStatusRequest, DiscardDeadLetterRequest, GetDeadLetterRequest, GetOrderRequest,
    GetSagaRequest, GetSalesRequest, InterveneSagaRequest, ListDeadLettersRequest,
    ListDefinitionsRequest, ListOrdersRequest, ListSagasNeedingAttentionRequest, OrderItem,
    PlaceOrderRequest, ReplayDeadLetterRequest, StartSagaRequest,
};

use super::{
    emit, render, AnalyticsCommand, ClusterCommand, Command, DlqCommand, OrderCommand, SagaCommand,
    Server, ServerArg,
};

/// Bound on connecting to a node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on one unary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Entries asked for per list page (`ListOrders`, `ListSagasNeedingAttention`).
const PAGE_SIZE: u32 = 1000;

pub use crate::client::{Bearer, Conn};

/// The token to send: the first line of `--token-file`, else `SAGAFLOW_TOKEN`, else none.
fn token(arg: &ServerArg) -> anyhow::Result<Bearer> {
    let (secret, from) = match &arg.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the token file {} (--token-file): {e}",
                    path.display()
                )
            })?;
            let secret = text.lines().next().unwrap_or("").trim().to_string();
            if secret.is_empty() {
                bail!("the token file {} (--token-file) is empty", path.display());
            }
            (secret, "--token-file")
        }
        None => match std::env::var("SAGAFLOW_TOKEN") {
            Ok(v) if !v.trim().is_empty() => (v.trim().to_string(), "SAGAFLOW_TOKEN"),
            _ => return Ok(Bearer::default()),
        },
    };
    Bearer::new(Some(&secret)).map_err(|why| anyhow::anyhow!("{why} (from {from})"))
}

/// Opens a connection to a node that sends the caller's token, or fails with `cannot reach
/// sagaflow node at ADDR: ...`.
pub async fn connect(arg: &ServerArg) -> anyhow::Result<Conn> {
    let bearer = token(arg)?;
    let tls = client_tls(arg)?;
    let channel = connect_channel(&arg.server, tls).await?;
    Ok(InterceptedService::new(channel, bearer))
}

/// The TLS settings of an `https://` node (`--ca`, `--cert`/`--key`); `None` for `http://`.
fn client_tls(arg: &ServerArg) -> anyhow::Result<Option<ClientTlsConfig>> {
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {} ({flag}): {e}", path.display()))
    };
    if !arg.server.url.starts_with("https://") {
        if arg.ca.is_some() || arg.cert.is_some() {
            bail!(
                "--ca and --cert are for TLS: write the node's address as https://{}",
                arg.server.url.trim_start_matches("http://")
            );
        }
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    tls = match &arg.ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "--ca")?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&arg.cert, &arg.key) {
        tls = tls.identity(Identity::from_pem(
            read(cert, "--cert")?,
            read(key, "--key")?,
        ));
    }
    Ok(Some(tls))
}

/// Opens a channel to a node, or fails with `cannot reach sagaflow node at ADDR: ...`.
async fn connect_channel(server: &Server, tls: Option<ClientTlsConfig>) -> anyhow::Result<Channel> {
    let unreachable = |why: String| {
        let hint = if server.url.starts_with("https://") && why.contains("certificate") {
            " (is --ca the CA that signed the node's certificate, and does the certificate name this host?)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "cannot reach sagaflow node at {}: {why}{hint}",
            server.given
        )
    };
    let mut endpoint = Endpoint::from_shared(server.url.clone())
        .map_err(|e| unreachable(error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| unreachable(error_chain(&e)))?;
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(unreachable(error_chain(&e))),
        Err(_) => Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// `a: b: c` from an error and its sources (tonic's transport errors hide the cause in the chain).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

pub use crate::client::code_name;

/// `<code>: <message>`, how the CLI shows a gRPC error.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

/// Awaits one unary call within [`CALL_TIMEOUT`], mapping its status.
pub(crate) async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status_error(status)),
        Err(_) => bail!("deadline_exceeded: no answer from the node within {CALL_TIMEOUT:?}"),
    }
}

pub(crate) fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    emit(&format!("{value}\n"))
}

/// Runs a client command (everything but `node`, `dev` and `saga validate`).
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Order(c) => order(c).await,
        Command::Saga(c) => saga(c).await,
        Command::Analytics(AnalyticsCommand::Sales { server, json }) => {
            let mut client = AnalyticsServiceClient::new(connect(&server).await?);
            let report = call(client.get_sales(GetSalesRequest {})).await?;
            if json.json {
                print_json(&render::sales_json(&report))?;
            } else {
                emit(&render::sales_text(&report))?;
            }
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status { server, json }) => {
            let mut client = AdminServiceClient::new(connect(&server).await?);
            let status = call(client.cluster_status(ClusterStatusRequest {})).await?;
            if json.json {
                print_json(&render::cluster_json(&status))?;
            } else {
                emit(&render::cluster_text(&status))?;
            }
            Ok(())
        }
        Command::Dlq(c) => dlq(c).await,
        Command::Node(_) | Command::Dev(_) | Command::Security(_) | Command::Bench { .. } => {
            bail!("not a client command")
        }
    }
}

/// Dead letters asked for per `ListDeadLetters` page.
const DLQ_PAGE_SIZE: u32 = 1000;

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            server,
            source,
            journal,
            json,
        } => {
            let mut client = AdminServiceClient::new(connect(&server).await?);
            let mut entries = Vec::new();
            let mut start_seq = 0;
            loop {
                let page = call(client.list_dead_letters(ListDeadLettersRequest {
                    source: source.clone().unwrap_or_default(),
                    start_seq,
                    limit: DLQ_PAGE_SIZE,
                    include_journal: journal,
                }))
                .await?;
                entries.extend(page.entries);
                if page.next_seq == 0 {
                    break;
                }
                if page.next_seq <= start_seq {
                    bail!(
                        "the node returned a page that does not advance (next_seq {})",
                        page.next_seq
                    );
                }
                start_seq = page.next_seq;
            }
            if json.json {
                print_json(&render::dead_letters_json(&entries))?;
            } else {
                emit(&render::dead_letters_text(&entries))?;
            }
            Ok(())
        }
        DlqCommand::Show { server, seq, json } => {
            let mut client = AdminServiceClient::new(connect(&server).await?);
            let d = call(client.get_dead_letter(GetDeadLetterRequest { seq })).await?;
            if json.json {
                print_json(&render::dead_letter_json(&d))?;
            } else {
                emit(&render::dead_letter_text(&d))?;
            }
            Ok(())
        }
        DlqCommand::Replay {
            server,
            seq,
            operator,
        } => {
            let mut client = AdminServiceClient::new(connect(&server).await?);
            let r =
                call(client.replay_dead_letter(ReplayDeadLetterRequest { seq, operator })).await?;
            emit(&format!(
                "replayed dead letter {seq} to {} ({} sequence {}), journal record {}\n",
                r.subject, r.stream, r.stream_seq, r.journal_seq
            ))
        }
        DlqCommand::Discard {
            server,
            seq,
            operator,
            reason,
        } => {
            let mut client = AdminServiceClient::new(connect(&server).await?);
            let r = call(client.discard_dead_letter(DiscardDeadLetterRequest {
                seq,
                operator,
                reason,
            }))
            .await?;
            emit(&format!(
                "discarded dead letter {seq}, journal record {}\n",
                r.journal_seq
            ))
        }
    }
}

async fn order(command: OrderCommand) -> anyhow::Result<()> {
    match command {
        OrderCommand::Place {
            server,
            order_id,
            customer,
            amount,
            items,
        } => {
            let mut client = OrderServiceClient::new(connect(&server).await?);
            let request = PlaceOrderRequest {
                order_id,
                customer,
                amount_cents: amount,
                items: items
                    .into_iter()
                    .map(|i| OrderItem {
                        sku: i.sku,
                        quantity: i.quantity,
                    })
                    .collect(),
            };
            let r = call(client.place_order(request)).await?;
            let verb = if r.created {
                "placed"
            } else {
                "already placed"
            };
            emit(&format!(
                "{verb} order {} (saga {}, status {})\n",
                r.order_id, r.saga_id, r.status
            ))?;
            Ok(())
        }
        OrderCommand::Get {
            server,
            order_id,
            json,
        } => {
            let mut client = OrderServiceClient::new(connect(&server).await?);
            let o = call(client.get_order(GetOrderRequest { order_id })).await?;
            if json.json {
                print_json(&render::order_json(&o))?;
            } else {
                emit(&render::order_text(&o))?;
            }
            Ok(())
        }
        OrderCommand::List {
            server,
            status,
            limit,
            json,
        } => {
            let mut client = OrderServiceClient::new(connect(&server).await?);
            let mut orders = Vec::new();
            let mut page_token = String::new();
            let mut more = false;
            loop {
                let want = if limit == 0 {
                    PAGE_SIZE
                } else {
                    u32::try_from(limit - orders.len()).map_or(PAGE_SIZE, |n| n.min(PAGE_SIZE))
                };
                let request = ListOrdersRequest {
                    status: status.clone().unwrap_or_default(),
                    page_size: want,
                    page_token,
                };
                let request_token = request.page_token.clone();
                let page = call(client.list_orders(request)).await?;
                orders.extend(page.orders);
                if page.next_page_token.is_empty() {
                    break;
                }
                if page.next_page_token == request_token {
                    bail!("the node returned the same page token twice ({request_token:?})");
                }
                if limit != 0 && orders.len() >= limit {
                    more = true;
                    break;
                }
                page_token = page.next_page_token;
            }
            if more {
                eprintln!(
                    "(the newest {} orders; more match: --limit N for more, --limit 0 for all)",
                    orders.len()
                );
            }
            if json.json {
                let list: Vec<_> = orders.iter().map(render::order_json).collect();
                print_json(&serde_json::json!({ "orders": list }))?;
            } else {
                emit(&render::orders_text(&orders))?;
            }
            Ok(())
        }
        OrderCommand::Watch { server, order_id } => {
            let mut client = OrderServiceClient::new(connect(&server).await?);
            let mut stream = call(client.watch_order(GetOrderRequest {
                order_id: order_id.clone(),
            }))
            .await?;
            while let Some(update) = stream.next().await {
                let o = update.map_err(status_error)?;
                emit(&format!("{}\n", render::watch_line(&o)))?;
                if o.terminal {
                    return Ok(());
                }
            }
            bail!("the node ended the watch of order {order_id} before it was terminal")
        }
    }
}

async fn saga(command: SagaCommand) -> anyhow::Result<()> {
    match command {
        SagaCommand::Validate { .. } => bail!("`saga validate` runs locally"),
        SagaCommand::Signal {
            server,
            saga_id,
            name,
            payload,
            signal_id,
            json,
        } => {
            let mut client = SagaServiceClient::new(connect(&server).await?);
            let r = call(client.signal_saga(sagaflow_proto::v1::SignalSagaRequest {
                saga_id,
                name: name.clone(),
                payload_json: payload.unwrap_or_default(),
                signal_id: signal_id.unwrap_or_default(),
            }))
            .await?;
            if json.json {
                print_json(&serde_json::json!({
                    "saga_id": r.saga_id,
                    "signal_id": r.signal_id,
                    "duplicate": r.duplicate,
                }))?;
            } else if r.duplicate {
                emit(&format!(
                    "saga {} had already received signal `{name}` (id {}): nothing sent\n",
                    r.saga_id, r.signal_id
                ))?;
            } else {
                emit(&format!(
                    "signal `{name}` delivered to saga {} (id {})\n",
                    r.saga_id, r.signal_id
                ))?;
            }
            Ok(())
        }
        SagaCommand::Plan { .. }
        | SagaCommand::Apply { .. }
        | SagaCommand::Versions { .. }
        | SagaCommand::Show { .. }
        | SagaCommand::Rollback { .. } => {
            bail!("definition commands run through `cli::definitions`")
        }
        SagaCommand::List { server, json } => {
            let mut client = SagaServiceClient::new(connect(&server).await?);
            let defs = call(client.list_definitions(ListDefinitionsRequest {}))
                .await?
                .definitions;
            if json.json {
                let list: Vec<_> = defs.iter().map(render::definition_json).collect();
                print_json(&serde_json::json!({ "definitions": list }))?;
            } else {
                emit(&render::definitions_text(&defs))?;
            }
            Ok(())
        }
        SagaCommand::Start {
            server,
            name,
            input,
            saga_id,
        } => {
            let mut client = SagaServiceClient::new(connect(&server).await?);
            let request = StartSagaRequest {
                saga_name: name.clone(),
                saga_id: saga_id.unwrap_or_default(),
                input_json: input,
            };
            let r = call(client.start_saga(request)).await?;
            let verb = if r.created {
                "started"
            } else {
                "already started"
            };
            emit(&format!("{verb} saga {} ({name})\n", r.saga_id))?;
            Ok(())
        }
        SagaCommand::Get {
            server,
            saga_id,
            json,
        } => {
            let mut client = SagaServiceClient::new(connect(&server).await?);
            let s = call(client.get_saga(GetSagaRequest { saga_id })).await?;
            if json.json {
                print_json(&render::saga_json(&s))?;
            } else {
                emit(&render::saga_text(&s))?;
            }
            Ok(())
        }
        SagaCommand::Attention {
            server,
            saga_name,
            json,
        } => {
            let mut client = SagaServiceClient::new(connect(&server).await?);
            let mut sagas = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = ListSagasNeedingAttentionRequest {
                    saga_name: saga_name.clone().unwrap_or_default(),
                    limit: PAGE_SIZE,
                    page_token,
                };
                let request_token = request.page_token.clone();
                let page = call(client.list_sagas_needing_attention(request)).await?;
                sagas.extend(page.sagas);
                if page.next_page_token.is_empty() {
                    break;
                }
                if page.next_page_token == request_token {
                    bail!("the node returned the same page token twice ({request_token:?})");
                }
                page_token = page.next_page_token;
            }
            if json.json {
                let list: Vec<_> = sagas.iter().map(render::saga_json).collect();
                print_json(&serde_json::json!({ "sagas": list }))?;
            } else {
                emit(&render::attention_text(&sagas))?;
            }
            Ok(())
        }
        SagaCommand::Retry { target, step } => {
            intervene(target, "retry", step.unwrap_or_default(), String::new()).await
        }
        SagaCommand::Skip {
            target,
            step,
            result,
        } => intervene(target, "skip", step, result.unwrap_or_default()).await,
        SagaCommand::Settle {
            target,
            step,
            result,
        } => intervene(target, "settle", step, result.unwrap_or_default()).await,
        SagaCommand::Compensate { target } => {
            intervene(target, "compensate", String::new(), String::new()).await
        }
        SagaCommand::Cancel { target } => {
            intervene(target, "cancel", String::new(), String::new()).await
        }
        SagaCommand::Abandon { target } => {
            intervene(target, "abandon", String::new(), String::new()).await
        }
    }
}

/// Sends an operator's action and reports what became of it.
async fn intervene(
    target: crate::cli::Intervene,
    action: &str,
    step: String,
    output_json: String,
) -> anyhow::Result<()> {
    let mut client = SagaServiceClient::new(connect(&target.server).await?);
    let request = InterveneSagaRequest {
        saga_id: target.saga_id,
        action: action.to_string(),
        step,
        output_json,
        operator: target.operator,
        reason: target.reason,
        request_id: target.request_id.unwrap_or_default(),
    };
    let r = call(client.intervene_saga(request)).await?;
    if target.json.json {
        print_json(&serde_json::json!({
            "saga_id": r.saga_id,
            "request_id": r.request_id,
            "applied": r.applied,
            "refused": r.refused,
            "saga": r.saga.as_ref().map(render::saga_json),
        }))?;
    } else if !r.refused.is_empty() {
        bail!("{action} refused by the saga's owner: {}", r.refused);
    } else if r.applied {
        let s = r.saga.unwrap_or_default();
        emit(&format!(
            "{action} applied to saga {} (request {}): now {} ({})\n",
            r.saga_id, r.request_id, s.status, s.phase
        ))?;
    } else {
        emit(&format!(
            "{action} queued for saga {} (request {}); its owner has not applied it yet\n",
            r.saga_id, r.request_id
        ))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cli_unreachable_node_is_reported() {
        // A port nobody listens on: bind, read it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = super::super::parse_server(&format!("127.0.0.1:{port}")).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), connect_channel(&server, None))
            .await
            .unwrap()
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with(&format!("cannot reach sagaflow node at 127.0.0.1:{port}: ")),
            "{text}"
        );
    }

    #[test]
    fn cli_status_errors_read_code_then_message() {
        let e = status_error(tonic::Status::not_found("no order o-1"));
        assert_eq!(e.to_string(), "not_found: no order o-1");
    }
}
