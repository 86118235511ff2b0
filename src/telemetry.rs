//! Tracing: logs as text or JSON, one trace per saga with W3C trace context carried in NATS
//! message headers, and (cargo feature `otel`) OpenTelemetry export over OTLP/gRPC.
//!
//! ```text
//!  saga `order-A-100`                      trace id = saga_trace_id("order-A-100"), stored nowhere
//!  └─ saga (root, id = saga_root_span_id)  exported once, when the saga reaches a terminal status
//!     ├─ step.attempt  (producer)          bus.rs: one per published command (forward or undo)
//!     │  │   command headers: traceparent = 00-<trace id>-<step.attempt span id>-01
//!     │  └─ participant.handle (consumer)  participant.rs: the handling of that command
//!     │        reply headers: traceparent = 00-<trace id>-<participant.handle span id>-01
//!     └─ step.attempt …
//! ```
//!
//! **One trace per saga, without storing anything.** The trace id is a hash of the saga id
//! ([`saga_trace_id`]), so every node, every restart, every takeover and every participant
//! lands in the same trace. The saga's root span has a span id derived the same way
//! ([`saga_root_span_id`]); step attempts are its children before it is even exported (it is
//! exported when the saga finishes, with the saga's start and end times).
//!
//! **Propagation works in every build.** [`TraceParent`] formats and parses the W3C
//! `traceparent` header itself, so commands carry trace context whether or not the `otel`
//! feature is compiled in, and a participant written in another language can continue the
//! trace with its own OpenTelemetry SDK. Without the feature, span ids are random and only
//! appear in headers and in log fields; with it (and an endpoint), they are the exported ids.
//!
//! **Initialisation.** [`init`] installs the global `tracing` subscriber once per process and
//! returns a [`Guard`]; [`Guard::shutdown`] flushes pending spans with a bounded timeout.

use std::time::Duration;

use sagaflow_actors::machine::Saga;
// The W3C trace context and the saga's derived ids are the participant SDK's: participants
// continue the same traces.
pub use sagaflow_participant::error_chain;
pub use sagaflow_participant::trace::{
    header, inject, random_span_id, saga_root, saga_root_span_id, saga_trace_id, ParseError,
    TraceParent, TRACEPARENT, TRACESTATE,
};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name the config file uses (`text`, `json`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// How long [`Guard::shutdown`] and [`Guard::flush`] wait for the exporter.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes `span` (not yet entered) a child of the remote span `parent` and returns the context
/// to put in the messages it sends: the exported span's own ids when OpenTelemetry export is
/// on, else `parent`'s trace with a fresh random span id.
pub fn continue_trace(span: &tracing::Span, parent: &TraceParent) -> TraceParent {
    #[cfg(feature = "otel")]
    if let Some(own) = otel::continue_trace(span, parent) {
        return own;
    }
    let _ = span;
    parent.child()
}

/// Exports the root span of a saga that just finished (a no-op without OpenTelemetry export).
/// Call once, with the lifecycle event of its last status change.
pub fn saga_finished(saga: &Saga) {
    #[cfg(feature = "otel")]
    otel::export_root(saga);
    #[cfg(not(feature = "otel"))]
    let _ = saga;
}

/// Checks an OTLP endpoint: a plaintext gRPC URL, `http://host:port`.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = if let Some(rest) = endpoint.strip_prefix("http://") {
        rest
    } else if endpoint.starts_with("https://") {
        return Err(format!(
            "otlp endpoint {endpoint:?}: tls is not supported, use http://host:port"
        ));
    } else {
        return Err(format!(
            "otlp endpoint {endpoint:?}: expected http://host:port"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("otlp endpoint {endpoint:?}: no host"));
    }
    Ok(())
}

/// What [`init`] sets up.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Log lines as text or JSON, on stderr.
    pub log_format: LogFormat,
    /// Log filter (`RUST_LOG` syntax); `None`: `RUST_LOG`, else `info`.
    pub log_filter: Option<String>,
    /// OTLP/gRPC collector (`http://host:4317`); `None`: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.instance.id` of exported spans (the node id).
    pub service_instance: Option<String>,
}

/// Keeps the exporter of [`init`]; [`Guard::shutdown`] flushes it. Dropping it without
/// shutting down may lose the last spans (up to the batch delay, 5 s by default).
#[must_use = "shut the guard down to flush the last spans"]
#[derive(Debug, Default)]
pub struct Guard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otel")]
        return self.provider.is_some();
        #[cfg(not(feature = "otel"))]
        false
    }

    /// Exports the spans ended so far (bounded by [`FLUSH_TIMEOUT`]).
    pub async fn flush(&self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.clone() {
            otel::blocking("flush", move || provider.force_flush()).await;
        }
    }

    /// Flushes and stops the exporter (bounded by [`FLUSH_TIMEOUT`]).
    pub async fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider {
            otel::blocking("shutdown", move || {
                provider.shutdown_with_timeout(FLUSH_TIMEOUT)
            })
            .await;
        }
    }
}

/// Spans opened for every command sent or handled: exported as traces, never recorded by the
/// log layer.
pub const HOT_SPANS: [&str; 2] = ["step.attempt", "participant.handle"];

/// Installs the global `tracing` subscriber: log lines on stderr (text or JSON, filtered by
/// `RUST_LOG`, default `info`) and, with feature `otel` and an endpoint, an OpenTelemetry
/// layer exporting spans over OTLP/gRPC. Must run inside a Tokio runtime when exporting (the
/// gRPC channel lives there). A second call keeps the first subscriber (and exports nothing).
pub fn init(settings: &Settings) -> Guard {
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};

    let filter = settings
        .log_filter
        .as_deref()
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only for a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        // One object per line; the fields of the current span (saga.id, trace_id…) included.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter.and(tracing_subscriber::filter::filter_fn(|meta| {
        // The per-message spans are for traces, not for log lines: formatting their dozen
        // fields for the log layer at every command cost a large share of a node's CPU under
        // load (docs/benchmarks.md). Events inside them are still logged, with their own fields.
        !(meta.is_span() && HOT_SPANS.contains(&meta.name()))
    })));
    let registry = tracing_subscriber::registry().with(logs);

    #[cfg(feature = "otel")]
    {
        let (layer, provider, error) = match settings.otlp_endpoint.as_deref() {
            Some(endpoint) => {
                match otel::pipeline(endpoint, settings.service_instance.as_deref()) {
                    Ok((layer, provider)) => (Some(layer), Some(provider), None),
                    Err(e) => (None, None, Some(e)),
                }
            }
            None => (None, None, None),
        };
        if registry.with(layer).try_init().is_err() {
            // Already initialised (tests): keep the existing subscriber, export nothing.
            if let Some(p) = provider {
                let _ = p.shutdown_with_timeout(Duration::from_millis(100));
            }
            return Guard::default();
        }
        if let Some(e) = error {
            tracing::warn!(error = %e, "cannot set up opentelemetry export, spans are not exported");
        }
        if let (Some(p), Some(endpoint)) = (&provider, settings.otlp_endpoint.as_deref()) {
            otel::set_root_tracer(p);
            tracing::info!(endpoint, "exporting spans over otlp/grpc");
        }
        Guard { provider }
    }
    #[cfg(not(feature = "otel"))]
    {
        // Already initialised (tests): keep the existing subscriber.
        if registry.try_init().is_ok() {
            if let Some(endpoint) = settings.otlp_endpoint.as_deref() {
                tracing::warn!(
                    endpoint,
                    "an otlp endpoint is set but this build has no opentelemetry export \
                     (build with `--features otel`); spans are not exported"
                );
            }
        }
        Guard::default()
    }
}

/// OpenTelemetry export (feature `otel`).
#[cfg(feature = "otel")]
mod otel {
    use std::cell::Cell;
    use std::sync::OnceLock;
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::trace::{
        Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    };
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
    use opentelemetry_sdk::Resource;
    use sagaflow_actors::machine::Saga;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::Layer;

    use super::{TraceParent, FLUSH_TIMEOUT};

    /// The tracer that exports saga root spans (set by `init`).
    static ROOT_TRACER: OnceLock<SdkTracer> = OnceLock::new();

    thread_local! {
        /// Ids the next span built on this thread must take (the saga root span's).
        static FORCED: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
    }

    /// Random ids, except while [`export_root`] builds a root span with the saga's ids: the
    /// SDK takes no ids from a `SpanBuilder`, only from its id generator.
    #[derive(Debug, Default)]
    struct SagaIds(RandomIdGenerator);

    impl IdGenerator for SagaIds {
        fn new_trace_id(&self) -> TraceId {
            match FORCED.with(Cell::get) {
                Some((trace, _)) => TraceId::from(trace),
                None => self.0.new_trace_id(),
            }
        }

        fn new_span_id(&self) -> SpanId {
            match FORCED.with(Cell::get) {
                Some((_, span)) => SpanId::from(span),
                None => self.0.new_span_id(),
            }
        }
    }

    /// The OpenTelemetry layer and its provider, exporting to `endpoint` in batches.
    pub(super) fn pipeline<S>(
        endpoint: &str,
        instance: Option<&str>,
    ) -> Result<(impl Layer<S>, SdkTracerProvider), String>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        super::check_endpoint(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let mut resource = Resource::builder()
            .with_service_name("sagaflow")
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(instance) = instance {
            resource =
                resource.with_attribute(KeyValue::new("service.instance.id", instance.to_string()));
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(SagaIds::default())
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("sagaflow");
        // Our spans (and the events inside them) at info, whatever RUST_LOG says about logs:
        // a quieter log must not break the traces.
        let filter = Targets::new()
            .with_target("sagaflow", LevelFilter::INFO)
            .with_target("sagaflow_actors", LevelFilter::INFO);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_threads(false)
            .with_filter(filter);
        Ok((layer, provider))
    }

    pub(super) fn set_root_tracer(provider: &SdkTracerProvider) {
        let _ = ROOT_TRACER.set(provider.tracer("sagaflow"));
    }

    fn remote(parent: &TraceParent) -> SpanContext {
        SpanContext::new(
            TraceId::from(parent.trace_id),
            SpanId::from(parent.parent_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::NONE,
        )
    }

    /// Parents `span` on `parent` and returns its exported ids, if the layer records it.
    pub(super) fn continue_trace(
        span: &tracing::Span,
        parent: &TraceParent,
    ) -> Option<TraceParent> {
        let cx = opentelemetry::Context::new().with_remote_span_context(remote(parent));
        span.set_parent(cx).ok()?;
        let cx = span.context();
        let own = cx.span().span_context().clone();
        if !own.is_valid() {
            return None;
        }
        Some(TraceParent {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            parent_id: u64::from_be_bytes(own.span_id().to_bytes()),
            flags: own.trace_flags().to_u8(),
        })
    }

    /// Exports the saga's root span, with its deterministic ids, start and end.
    pub(super) fn export_root(saga: &Saga) {
        let Some(tracer) = ROOT_TRACER.get() else {
            return;
        };
        let at = |ms: i64| UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        let root = super::saga_root(&saga.id);
        let mut attributes = vec![
            KeyValue::new("saga.id", saga.id.clone()),
            KeyValue::new("saga.name", saga.definition.clone()),
            KeyValue::new("saga.status", saga.status.clone()),
            KeyValue::new("saga.phase", saga.phase.as_str()),
        ];
        if let Some(reason) = &saga.reason {
            attributes.push(KeyValue::new("saga.reason", reason.clone()));
        }
        let builder = SpanBuilder::from_name("saga")
            .with_kind(SpanKind::Internal)
            .with_start_time(at(saga.started_at))
            .with_attributes(attributes);
        FORCED.with(|f| f.set(Some((root.trace_id, root.parent_id))));
        let mut span = tracer.build_with_context(builder, &opentelemetry::Context::new());
        FORCED.with(|f| f.set(None));
        span.end_with_timestamp(at(saga.updated_at.max(saga.started_at)));
    }

    /// Runs a blocking exporter call off the async threads, waiting at most a little longer
    /// than [`FLUSH_TIMEOUT`].
    pub(super) async fn blocking(
        what: &'static str,
        f: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
    ) {
        let task = tokio::task::spawn_blocking(f);
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, what, "otlp export"),
            Ok(Err(e)) => tracing::warn!(error = %e, what, "otlp export task failed"),
            Err(_) => tracing::warn!(what, "otlp export did not finish in time"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("http://collector:4317/").is_ok());
        assert!(check_endpoint("https://collector:4317").is_err());
        assert!(check_endpoint("collector:4317").is_err());
        assert!(check_endpoint("http://").is_err());
    }

    #[test]
    fn without_export_spans_get_random_children_of_the_parent() {
        let parent = saga_root("s-2");
        let span = tracing::info_span!("step.attempt");
        let own = continue_trace(&span, &parent);
        assert_eq!(own.trace_id, parent.trace_id);
        assert_ne!(own.parent_id, parent.parent_id);
    }
}
