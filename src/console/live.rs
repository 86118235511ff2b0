//! Live parts of pages, as server-sent events: `html` events carry the part rendered again
//! (only when it changed), `end` says nothing more will change. Streams are bounded in number
//! ([`super::MAX_LIVE_STREAMS`]) and in time ([`super::LIVE_FOR`]: the browser reconnects,
//! through the session check again), and end with the node.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Ctx, LIVE_FOR};

/// A place among the live streams, or `None` when all are taken.
pub(crate) fn permit(ctx: &Ctx) -> Option<OwnedSemaphorePermit> {
    ctx.console.inner.streams.clone().try_acquire_owned().ok()
}

/// The answer when every live stream is taken: the browser tries again later.
pub(crate) fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "too many live views on this node; retrying\n",
    )
        .into_response()
}

/// An `html` event (carriage returns kept as character references: an event's lines are
/// split on them).
pub(crate) fn html_event(html: &str) -> Event {
    Event::default()
        .event("html")
        .data(html.replace('\r', "&#13;"))
}

/// The `end` event.
pub(crate) fn end_event() -> Event {
    Event::default().event("end").data("end")
}

/// Serves `stream` as server-sent events with keep-alives.
pub(crate) fn respond(
    stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct Poll<F> {
    render: F,
    last: Option<String>,
    first: bool,
    cancel: CancellationToken,
    deadline: tokio::time::Instant,
    every: Duration,
    _permit: OwnedSemaphorePermit,
}

/// A live part rendered by `render` every `every`, sent when it changed (`None`: nothing to
/// send this time, e.g. a failed read; the page keeps what it shows).
pub(crate) fn poll<F, Fut>(ctx: &Ctx, every: Duration, render: F) -> Response
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Option<String>> + Send,
{
    let Some(permit) = permit(ctx) else {
        return busy();
    };
    let state = Poll {
        render,
        last: None,
        first: true,
        cancel: ctx.console.inner.cancel.clone(),
        deadline: tokio::time::Instant::now() + LIVE_FOR,
        every,
        _permit: permit,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if !s.first {
                tokio::select! {
                    _ = s.cancel.cancelled() => return None,
                    _ = tokio::time::sleep(s.every) => {}
                }
            }
            s.first = false;
            if tokio::time::Instant::now() >= s.deadline {
                return None;
            }
            let Some(html) = (s.render)().await else {
                continue;
            };
            if s.last.as_deref() != Some(html.as_str()) {
                let event = html_event(&html);
                s.last = Some(html);
                return Some((Ok::<_, Infallible>(event), s));
            }
        }
    });
    respond(stream)
}
