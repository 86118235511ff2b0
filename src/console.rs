//! The web console, served by every node on its HTTP address under `/ui` (see
//! `docs/console.md`): live sagas with filters and counts, one saga's timeline, history and
//! operator actions, the definitions drawn as diagrams with their versions, the cluster's
//! nodes, partitions and consumer lag, dead letters, and small charts of this node's metrics.
//!
//! Pages are rendered on the server ([`maud`]: every spliced value is escaped) with one
//! stylesheet and one small script embedded in the binary ([`assets`]): nothing is fetched from
//! elsewhere, so it works offline. Live parts of a page are refreshed over server-sent events:
//! the server renders the part again and sends its HTML when it changed; the script swaps it in.
//!
//! The console is an API edge like the gRPC services, and it goes through them: reads and
//! actions call the same service implementations in-process (`Sagas`, `Admin`, `Definitions`)
//! with the caller's [`Identity`], so an action is checked, journaled and refused exactly as
//! over gRPC, and its error reads as the CLI's (`failed_precondition: cancel: …`).
//!
//! Who may do what is [`crate::auth`]'s table: with a tokens file, a browser signs in with a
//! token ([`session`]) and each page or action needs the role its gRPC method needs (`reader`
//! to look, `operator` to act); without one, everyone may do everything, as over gRPC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::SagaApi;
use crate::auth::{Auth, Identity};
use crate::definitions::DefinitionStore;
use crate::grpc::admin::Admin;
use crate::grpc::definitions::Definitions;
use crate::grpc::sagas::Sagas;
use crate::metrics::Metrics;

mod assets;
mod cluster;
mod definitions;
mod layout;
mod live;
mod overview;
mod sagas;
mod session;
mod timeline;

/// Most live streams (server-sent events) one node serves at once; more are answered 503 and
/// the browser tries again.
pub const MAX_LIVE_STREAMS: usize = 64;

/// What the console needs from the node.
pub struct Parts {
    /// The API core.
    pub api: SagaApi,
    /// The versioned definitions.
    pub definitions: DefinitionStore,
    /// The admin service (cluster status, dead letters).
    pub admin: Admin,
    /// The node's authenticator (`None`: no authentication).
    pub auth: Option<Arc<Auth>>,
    /// The node's metrics (sampled for the overview's charts).
    pub metrics: Arc<Metrics>,
    /// This node's id.
    pub node_id: String,
    /// The node runs `--insecure`: something in front of it secures its ports.
    pub insecure: bool,
    /// Ends the live streams (the node's shutdown).
    pub cancel: CancellationToken,
}

/// Where the console may be served from, decided by the HTTP listener's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exposure {
    /// A loopback address: served; requests must name a loopback host (no DNS rebinding).
    Loopback,
    /// Beyond loopback on a node run `--insecure` (behind a proxy or mesh that secures it).
    Proxied,
    /// Beyond loopback otherwise: not served, for this reason.
    Off(String),
}

impl Exposure {
    /// The exposure of a console on `addr`.
    pub(crate) fn of(addr: SocketAddr, insecure: bool) -> Exposure {
        if addr.ip().is_loopback() {
            Exposure::Loopback
        } else if insecure {
            Exposure::Proxied
        } else {
            Exposure::Off(format!(
                "the web console is not served on {addr}: this HTTP port has no TLS, so tokens and \
                 session cookies would cross the network in clear. Listen on 127.0.0.1 and reach it \
                 through an SSH tunnel, or put a TLS-terminating proxy in front and pass --insecure \
                 (docs/console.md)"
            ))
        }
    }
}

/// The web console of one node.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    api: SagaApi,
    sagas: Sagas,
    admin: Admin,
    definitions: Definitions,
    store: DefinitionStore,
    auth: Option<Arc<Auth>>,
    metrics: Arc<Metrics>,
    samples: overview::Samples,
    attention: overview::Attention,
    sessions: session::Sessions,
    node_id: String,
    insecure: bool,
    cancel: CancellationToken,
    streams: Arc<Semaphore>,
}

/// The state every handler gets: the console and where it listens.
#[derive(Clone)]
pub(crate) struct Ctx {
    console: Console,
    exposure: Exposure,
    /// The listener's address (its port names the session cookie).
    addr: SocketAddr,
}

impl Console {
    /// A console over the node's parts.
    pub fn new(parts: Parts) -> Console {
        let sagas = Sagas::new(parts.api.clone());
        let definitions = Definitions::new(parts.definitions.clone(), parts.api.clone());
        Console {
            inner: Arc::new(Inner {
                sagas,
                definitions,
                api: parts.api,
                admin: parts.admin,
                store: parts.definitions,
                auth: parts.auth,
                metrics: parts.metrics,
                samples: overview::Samples::default(),
                attention: overview::Attention::default(),
                sessions: session::Sessions::default(),
                node_id: parts.node_id,
                insecure: parts.insecure,
                cancel: parts.cancel,
                streams: Arc::new(Semaphore::new(MAX_LIVE_STREAMS)),
            }),
        }
    }

    /// Samples this node's metrics for the overview's charts every
    /// [`overview::SAMPLE_EVERY`] until `cancel`.
    pub async fn sample_metrics(self, cancel: CancellationToken) {
        overview::sample(self, cancel).await
    }

    /// The console's routes (everything under `/ui`) for a listener on `addr`.
    pub fn router(&self, addr: SocketAddr) -> Router {
        let exposure = Exposure::of(addr, self.inner.insecure);
        match &exposure {
            Exposure::Off(why) => tracing::warn!("{why}"),
            Exposure::Proxied if self.inner.auth.is_none() => tracing::warn!(
                %addr,
                "web console served beyond loopback without authentication (--insecure, no tokens): anyone who reaches it may act on sagas"
            ),
            _ => tracing::info!(url = %format!("http://{addr}/ui/"), "web console"),
        }
        let ctx = Ctx {
            console: self.clone(),
            exposure,
            addr,
        };
        Router::new()
            .route(
                "/ui",
                get(|| async { axum::response::Redirect::to("/ui/") }),
            )
            .route("/ui/", get(overview::page))
            .route("/ui/live/overview", get(overview::live))
            .route("/ui/sagas", get(sagas::list))
            .route("/ui/live/sagas", get(sagas::list_live))
            .route("/ui/sagas/{id}", get(sagas::show))
            .route("/ui/live/sagas/{id}", get(sagas::show_live))
            .route("/ui/sagas/{id}/act", get(sagas::confirm).post(sagas::act))
            .route(
                "/ui/sagas/{id}/signal",
                get(sagas::signal_form).post(sagas::signal),
            )
            .route("/ui/definitions", get(definitions::index))
            .route("/ui/definitions/{name}", get(definitions::show))
            .route("/ui/cluster", get(cluster::page))
            .route("/ui/live/cluster", get(cluster::live))
            .route("/ui/dlq", get(cluster::dead_letters))
            .route("/ui/dlq/{seq}", get(cluster::dead_letter))
            .route(
                "/ui/dlq/{seq}/replay",
                get(cluster::replay_form).post(cluster::replay),
            )
            .route(
                "/ui/dlq/{seq}/discard",
                get(cluster::discard_form).post(cluster::discard),
            )
            .route("/ui/login", get(session::login_form).post(session::login))
            .route("/ui/logout", post(session::logout))
            .route("/ui/assets/{file}", get(assets::serve))
            .route("/ui/{*rest}", get(layout::not_found))
            .layer(axum::middleware::from_fn_with_state(
                ctx.clone(),
                session::gate,
            ))
            .with_state(ctx)
    }
}

/// The gRPC method whose role a console page or action needs (see [`crate::auth::required_role`]).
pub(crate) mod method {
    /// Looking at sagas (every page is at least this).
    pub(crate) const READ: &str = "/sagaflow.v1.SagaService/GetSaga";
    /// Operator actions on a saga.
    pub(crate) const INTERVENE: &str = "/sagaflow.v1.SagaService/InterveneSaga";
    /// Sending a signal.
    pub(crate) const SIGNAL: &str = "/sagaflow.v1.SagaService/SignalSaga";
    /// Replaying a dead letter.
    pub(crate) const REPLAY: &str = "/sagaflow.v1.AdminService/ReplayDeadLetter";
    /// Discarding a dead letter.
    pub(crate) const DISCARD: &str = "/sagaflow.v1.AdminService/DiscardDeadLetter";
}

/// A gRPC request carrying the caller's identity, as the auth layer would hand it to a service.
fn request<T>(message: T, identity: Option<Identity>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(identity) = identity {
        request.extensions_mut().insert(identity);
    }
    request
}

/// How long one live stream lasts before the browser reconnects (and passes the session check
/// again, so a revoked token stops its streams within this bound).
const LIVE_FOR: Duration = Duration::from_secs(300);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_served_on_loopback_or_behind_a_declared_proxy_only() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            Exposure::of(at("127.0.0.1:9464"), false),
            Exposure::Loopback
        );
        assert_eq!(Exposure::of(at("[::1]:9464"), false), Exposure::Loopback);
        assert_eq!(Exposure::of(at("0.0.0.0:9464"), true), Exposure::Proxied);
        let Exposure::Off(why) = Exposure::of(at("0.0.0.0:9464"), false) else {
            panic!("a console beyond loopback without --insecure")
        };
        assert!(
            why.contains("--insecure") && why.contains("0.0.0.0:9464"),
            "{why}"
        );
    }
}
