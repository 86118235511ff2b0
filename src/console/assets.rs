//! The console's stylesheet and script, embedded in the binary (nothing is fetched from
//! elsewhere: the console works offline). Their URLs carry a hash of their content, so a
//! browser may keep them for a day and still never runs an old script with a new page.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The stylesheet.
pub(crate) const CSS: &str = include_str!("assets/app.css");
/// The script: live parts of pages over server-sent events, nothing else.
pub(crate) const JS: &str = include_str!("assets/app.js");

/// FNV-1a, for cache-busting URLs (not security).
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

static CSS_URL: LazyLock<String> =
    LazyLock::new(|| format!("/ui/assets/app.css?v={:012x}", fnv(CSS) >> 16));
static JS_URL: LazyLock<String> =
    LazyLock::new(|| format!("/ui/assets/app.js?v={:012x}", fnv(JS) >> 16));

/// The stylesheet's URL.
pub(crate) fn css_url() -> &'static str {
    &CSS_URL
}

/// The script's URL.
pub(crate) fn js_url() -> &'static str {
    &JS_URL
}

/// `GET /ui/assets/{file}`.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.css" => (CSS, "text/css; charset=utf-8"),
        "app.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}
