//! The node's plain HTTP endpoint (on `http_addr`): `GET /metrics` (OpenMetrics text),
//! `GET /healthz` (200 while the NATS connection is up, else 503), `GET /readyz` (200 once
//! the node serves and while NATS is connected; 503 before, during shutdown and while
//! disconnected), and the web console under `/ui` ([`crate::console`]; `/` leads there).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Readiness};

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    client: async_nats::Client,
}

/// The router of the HTTP endpoint, with `console` (the web console's routes, all under
/// `/ui`) mounted beside the probes.
pub fn router(
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    client: async_nats::Client,
    console: Router,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(|| async { axum::response::Redirect::to("/ui/") }))
        .with_state(AppState {
            metrics,
            readiness,
            client,
        })
        .merge(console)
}

/// Serves `router` on `listener` until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, cancel: CancellationToken) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.set_readiness(&s.readiness);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

fn connected(s: &AppState) -> bool {
    s.client.connection_state() == async_nats::connection::State::Connected
        && s.readiness.connected()
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if connected(&s) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "nats disconnected\n")
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if !connected(&s) {
        (StatusCode::SERVICE_UNAVAILABLE, "nats disconnected\n")
    } else if s.readiness.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
    }
}
