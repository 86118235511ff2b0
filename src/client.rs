//! What the command line and the bench share as clients of a node: its address, `--json`,
//! gRPC status names, and waiting for Ctrl-C. Below both, so neither imports the other.

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// A normalised node address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// As the user wrote it (for messages).
    pub given: String,
    /// `http://host:port`, for the gRPC channel.
    pub url: String,
}

/// `--json`: print one JSON object instead of text.
#[derive(Debug, Clone, Copy, Args)]
pub struct JsonArg {
    /// Print exactly one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Normalises a node address: `host:port` becomes `http://host:port`; `http://` and
/// `https://` (TLS) URLs are kept (without a trailing `/`).
pub fn parse_server(s: &str) -> Result<Server, String> {
    let given = s.trim();
    if given.is_empty() {
        return Err(
            "empty node address: expected host:port or an http:// or https:// URL".to_string(),
        );
    }
    let (scheme, rest) = match given.strip_prefix("https://") {
        Some(rest) => ("https", rest),
        None => ("http", given.strip_prefix("http://").unwrap_or(given)),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains("://") || rest.contains('/') {
        return Err(format!(
            "{given}: expected host:port or an http:// or https:// URL"
        ));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{given}: expected host:port (no port given)"))?;
    let host_ok =
        !host.is_empty() && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok {
        return Err(format!(
            "{given}: expected host:port (write IPv6 hosts as [::1]:50051)"
        ));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{given}: {port:?} is not a port number"))?;
    Ok(Server {
        given: given.to_string(),
        url: format!("{scheme}://{host}:{port}"),
    })
}

/// A connection to a node that sends a bearer token (if any) with every call.
pub type Conn = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `secret` (`None`: nothing); fails if it cannot be a header value.
    pub fn new(secret: Option<&str>) -> Result<Bearer, String> {
        match secret {
            None => Ok(Bearer(None)),
            Some(s) => format!("Bearer {s}")
                .parse::<MetadataValue<Ascii>>()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| "the token has characters a header cannot carry".to_string()),
        }
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The canonical gRPC name of a status code (`not_found`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt());
    let mut terminate = signal(SignalKind::terminate());
    let (interrupt, terminate) = match (&mut interrupt, &mut terminate) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            // Without signal handlers the process cannot shut down gracefully; keep running
            // until killed rather than stopping at once.
            tracing::error!(error = %e, "cannot install signal handlers");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(signal = name, "shutdown requested");
}
