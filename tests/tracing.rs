//! OpenTelemetry export end to end (feature `otel`): an in-process OTLP/gRPC collector, a node
//! with the demo services exporting to it, one order that ships. The saga's trace must hold
//! its root span, a `step.attempt` span for every step and a `participant.handle` span under
//! each, all with the trace id derived from the saga id; the command and reply headers must
//! name those spans.
#![cfg(feature = "otel")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::checks::order;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use sagaflow::telemetry::{self, TraceParent, TRACEPARENT};
use sagaflow::topology::{command_subject, reply_subject, COMMANDS_STREAM, EVENTS_STREAM};
use sagaflow_proto::v1::GetOrderRequest;

const SERVICES: [&str; 4] = ["payment", "inventory", "shipping", "notification"];

/// An OTLP trace collector that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A span attribute as text (strings, integers and booleans).
fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn describe(spans: &[&Span]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} service={:?} step={:?} parent={}",
                s.name,
                attr(s, "service"),
                attr(s, "step"),
                hex(&s.parent_span_id)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The saga's root span, and per service a step attempt with a participant span under it.
fn complete(spans: &[Span], saga_id: &str) -> bool {
    let trace = telemetry::saga_trace_id(saga_id).to_be_bytes();
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    ours.iter().any(|s| s.name == "saga")
        && SERVICES.iter().all(|svc| {
            let steps: Vec<&[u8]> = ours
                .iter()
                .filter(|s| s.name == "step.attempt" && attr(s, "service").as_deref() == Some(svc))
                .map(|s| s.span_id.as_slice())
                .collect();
            ours.iter().any(|s| {
                s.name == "participant.handle"
                    && attr(s, "service").as_deref() == Some(svc)
                    && steps.contains(&s.parent_span_id.as_slice())
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_saga_holds_every_step_and_participant_span() {
    // The collector, on a free port.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (stop_collector, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    // This test process's one global subscriber, exporting to the collector.
    let guard = telemetry::init(&telemetry::Settings {
        log_filter: Some("warn".into()),
        otlp_endpoint: Some(format!("http://{collector_addr}")),
        service_instance: Some("trace-node".into()),
        ..Default::default()
    });
    assert!(guard.exporting(), "the otlp layer is installed");

    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("trace-node")
        .partitions(4)
        .start()
        .await
        .unwrap();
    let mut client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();
    let placed = within(
        TIMEOUT,
        "PlaceOrder",
        client.place_order(order("traced-1", 1999, &[("SKU-1", 2)])),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let saga_id = placed.saga_id;
    wait_until(Duration::from_secs(30), "order shipped", || {
        let mut client = client.clone();
        async move {
            client
                .get_order(GetOrderRequest {
                    order_id: "traced-1".into(),
                })
                .await
                .is_ok_and(|o| o.into_inner().status == "SHIPPED")
        }
    })
    .await
    .unwrap();

    // Spans are exported in batches: flush until the whole trace is in.
    let waited = wait_until(Duration::from_secs(30), "the saga's whole trace", || {
        let (guard, collector, saga_id) = (&guard, collector.clone(), saga_id.clone());
        async move {
            guard.flush().await;
            complete(&collector.spans(), &saga_id)
        }
    })
    .await;
    let spans = collector.spans();
    let trace = telemetry::saga_trace_id(&saga_id).to_be_bytes();
    let root_id = telemetry::saga_root_span_id(&saga_id).to_be_bytes();
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    assert!(
        waited.is_ok(),
        "{waited:?}; spans of trace {}:\n{}",
        hex(&trace),
        describe(&ours)
    );

    // Every span about this saga is in its trace.
    for s in &spans {
        if attr(s, "saga.id").as_deref() == Some(saga_id.as_str()) {
            assert_eq!(s.trace_id, trace, "{} is outside the saga's trace", s.name);
        }
    }
    // The root: the saga's whole life, with the derived span id.
    let roots: Vec<&&Span> = ours.iter().filter(|s| s.name == "saga").collect();
    assert_eq!(roots.len(), 1, "one root span");
    let root = roots[0];
    assert_eq!(root.span_id, root_id);
    assert!(root.parent_span_id.is_empty(), "the root has no parent");
    assert_eq!(attr(root, "saga.id").as_deref(), Some(saga_id.as_str()));
    assert_eq!(attr(root, "saga.status").as_deref(), Some("SHIPPED"));
    assert!(root.end_time_unix_nano >= root.start_time_unix_nano);

    for svc in SERVICES {
        let steps: Vec<&&Span> = ours
            .iter()
            .filter(|s| s.name == "step.attempt" && attr(s, "service").as_deref() == Some(svc))
            .collect();
        assert!(!steps.is_empty(), "a step attempt span for {svc}");
        for s in &steps {
            assert_eq!(s.kind, SpanKind::Producer as i32, "{svc}: producer");
            assert_eq!(
                s.parent_span_id, root_id,
                "{svc}: a child of the saga's root"
            );
            assert_eq!(attr(s, "saga.name").as_deref(), Some("order"));
            assert_eq!(attr(s, "compensation").as_deref(), Some("false"));
            assert!(attr(s, "step").is_some() && attr(s, "attempt").is_some());
            assert!(attr(s, "action").is_some());
            assert!(
                attr(s, "duplicate").is_some(),
                "{svc}: the publish ack is recorded"
            );
        }
        let handled: Vec<&&Span> = ours
            .iter()
            .filter(|s| {
                s.name == "participant.handle" && attr(s, "service").as_deref() == Some(svc)
            })
            .collect();
        assert!(!handled.is_empty(), "a participant span for {svc}");
        for h in &handled {
            assert_eq!(h.kind, SpanKind::Consumer as i32, "{svc}: consumer");
            assert!(
                steps.iter().any(|s| s.span_id == h.parent_span_id),
                "{svc}: the participant span is a child of a step attempt span"
            );
            assert_eq!(attr(h, "outcome").as_deref(), Some("success"));
        }
    }

    // The headers that carried the context name those spans.
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let commands = js.get_stream(COMMANDS_STREAM).await.unwrap();
    let charge = commands
        .get_last_raw_message_by_subject(&command_subject("payment", "charge"))
        .await
        .unwrap();
    let sent = TraceParent::from_headers(Some(&charge.headers)).expect("command traceparent");
    assert_eq!(sent.trace_id.to_be_bytes(), trace);
    assert!(ours.iter().any(|s| s.name == "step.attempt"
        && s.span_id == sent.parent_id.to_be_bytes()
        && attr(s, "service").as_deref() == Some("payment")));
    let events = js.get_stream(EVENTS_STREAM).await.unwrap();
    let partition = sagaflow_actors::hash::partition_of(&saga_id, 4);
    let reply = events
        .get_last_raw_message_by_subject(&reply_subject(partition, "payment"))
        .await
        .unwrap();
    // The only saga of this test: payment's last reply on the partition is its charge.
    assert_eq!(
        <sagaflow_proto::v1::Reply as prost::Message>::decode(reply.payload.as_ref())
            .unwrap()
            .saga_id,
        saga_id
    );
    let replied = TraceParent::from_headers(Some(&reply.headers)).expect("reply traceparent");
    assert!(
        reply.headers.get(TRACEPARENT).is_some(),
        "replies carry the participant span"
    );
    assert!(ours
        .iter()
        .any(|s| s.name == "participant.handle" && s.span_id == replied.parent_id.to_be_bytes()));

    within(TIMEOUT, "node shutdown", node.shutdown())
        .await
        .unwrap()
        .unwrap();
    within(TIMEOUT, "telemetry shutdown", guard.shutdown())
        .await
        .unwrap();
    let _ = stop_collector.send(());
    let _ = within(TIMEOUT, "collector stop", server).await;
}
