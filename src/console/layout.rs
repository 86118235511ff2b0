//! The page around every console page (header, navigation, who is signed in) and the small
//! pieces pages share: times, durations, badges, errors.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use maud::{html, Markup, DOCTYPE};

use super::session::Viewer;
use super::{assets, Console, Ctx};

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Sagas,
    Definitions,
    Cluster,
    DeadLetters,
    None,
}

const ENTRIES: &[(Nav, &str, &str)] = &[
    (Nav::Overview, "/ui/", "Overview"),
    (Nav::Sagas, "/ui/sagas", "Sagas"),
    (Nav::Definitions, "/ui/definitions", "Definitions"),
    (Nav::Cluster, "/ui/cluster", "Cluster"),
    (Nav::DeadLetters, "/ui/dlq", "Dead letters"),
];

/// A whole page: `title`, the navigation with `nav` current, and `body` in `<main>`. With
/// `live`, the page's live part (the element with `data-live`) is followed and the header says
/// whether it is.
pub(crate) fn page(
    console: &Console,
    viewer: &Viewer,
    nav: Nav,
    title: &str,
    live: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Sagaflow" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href=(assets::css_url());
                script src=(assets::js_url()) defer {}
            }
            body {
                a.skip-link href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "Sagaflow" }
                    nav aria-label="Console" {
                        ul {
                            @for (entry, href, label) in ENTRIES {
                                li {
                                    @if *entry == nav {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        @if live.is_some() {
                            span #live-status.live role="status" { "connecting…" }
                        }
                        span.node title="The node serving this console" { "node " (console.inner.node_id) }
                        @if let Some(id) = &viewer.identity {
                            span.user { (id.name) " · " (id.role) }
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(viewer.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        } @else if !viewer.auth {
                            span.user title="No tokens file: everyone may look and act, as over gRPC" { "no authentication" }
                        }
                    }
                }
                main #main tabindex="-1" { (body) }
                div #announce.visually-hidden aria-live="polite" {}
            }
        }
    }
}

/// A page with just a heading and a message, for refusals outside any handler.
pub(crate) fn refusal(status: StatusCode, title: &str, message: &str) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Sagaflow" }
                link rel="stylesheet" href=(assets::css_url());
            }
            body {
                main #main {
                    h1 { (title) }
                    (error_box(message))
                    p { a href="/ui/" { "Back to the console" } }
                }
            }
        }
    };
    (status, body).into_response()
}

/// A page that loads itself again at once (from this site, so the session cookie goes with it).
pub(crate) fn reload_page() -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="0";
                title { "Sagaflow" }
            }
            body { p { "Loading… " a href="" { "continue" } } }
        }
    }
}

/// `GET /ui/<anything else>`.
pub(crate) async fn not_found(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let body = html! {
        h1 { "Not found" }
        p { "No console page here. " a href="/ui/" { "Overview" } }
    };
    (
        StatusCode::NOT_FOUND,
        page(&ctx.console, &viewer, Nav::None, "Not found", None, body),
    )
        .into_response()
}

/// An error as the CLI says it: `code: message`.
pub(crate) fn status_text(status: &tonic::Status) -> String {
    format!(
        "{}: {}",
        crate::client::code_name(status.code()),
        status.message()
    )
}

/// The HTTP status a console page answers a gRPC error with.
pub(crate) fn http_status(status: &tonic::Status) -> StatusCode {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A page that only says what went wrong (a saga that does not exist, NATS down).
pub(crate) fn error_page(
    console: &Console,
    viewer: &Viewer,
    nav: Nav,
    title: &str,
    status: &tonic::Status,
) -> Response {
    let body = html! {
        h1 { (title) }
        (error_box(&status_text(status)))
    };
    (
        http_status(status),
        page(console, viewer, nav, title, None, body),
    )
        .into_response()
}

/// An error message box (announced by screen readers).
pub(crate) fn error_box(text: &str) -> Markup {
    html! { div.error role="alert" { (text) } }
}

/// A notice box.
pub(crate) fn notice_box(text: &str) -> Markup {
    html! { div.notice role="status" { (text) } }
}

/// `2025-11-26 20:00:00.123` (UTC), as a `<time>`.
pub(crate) fn time(ms: i64) -> Markup {
    if ms <= 0 {
        return html! { span.muted { "—" } };
    }
    let iso = crate::clock::format_ms(ms);
    let shown = iso.trim_end_matches('Z').replacen('T', " ", 1);
    html! { time datetime=(iso) title=(format!("{iso} (UTC)")) { (shown) } }
}

/// A duration in milliseconds, in words (`340 ms`, `2.5 s`, `3 m 12 s`, `2 h 5 m`, `3 d 4 h`).
pub(crate) fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 10_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 60_000 {
        format!("{} s", ms / 1000)
    } else if ms < 3_600_000 {
        format!("{} m {} s", ms / 60_000, (ms / 1000) % 60)
    } else if ms < 86_400_000 {
        format!("{} h {} m", ms / 3_600_000, (ms / 60_000) % 60)
    } else {
        format!("{} d {} h", ms / 86_400_000, (ms / 3_600_000) % 24)
    }
}

/// A [`std::time::Duration`] as a definition file writes it (`100ms`, `10s`, `5m`, `72h`).
pub(crate) fn span(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// How long ago `ms` was at `now` (`12 s ago`).
pub(crate) fn ago(now: i64, ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    format!("{} ago", duration(now - ms))
}

/// The CSS class of a saga phase (its colour).
pub(crate) fn phase_class(phase: &str) -> &'static str {
    match phase {
        "COMPLETED" => "ok",
        "RUNNING" => "run",
        "COMPENSATING" => "comp",
        "COMPENSATED" => "undone",
        "NEEDS_ATTENTION" => "attn",
        "FAILED" => "bad",
        _ => "muted",
    }
}

/// A saga's status label, coloured by its phase.
pub(crate) fn status_badge(status: &str, phase: &str) -> Markup {
    html! { span class=(format!("badge {}", phase_class(phase))) title=(format!("phase {phase}")) { (status) } }
}

/// A step's state, coloured.
pub(crate) fn step_badge(state: &str) -> Markup {
    let class = match state {
        "SUCCEEDED" => "ok",
        "RUNNING" | "WAITING" | "RETRY_WAIT" => "run",
        "COMPENSATING" | "COMPENSATION_RETRY_WAIT" => "comp",
        "COMPENSATED" => "undone",
        "FAILED" | "COMPENSATION_FAILED" => "bad",
        _ => "muted",
    };
    html! { span class=(format!("badge {class}")) { (state) } }
}

/// A JSON text pretty-printed when it parses, else as it is.
pub(crate) fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_string())
}

/// `s` cut to `max` characters, with `…` when cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(340), "340 ms");
        assert_eq!(duration(2500), "2.5 s");
        assert_eq!(duration(42_000), "42 s");
        assert_eq!(duration(192_000), "3 m 12 s");
        assert_eq!(duration(7_500_000), "2 h 5 m");
        assert_eq!(duration(3 * 86_400_000 + 4 * 3_600_000), "3 d 4 h");
        assert_eq!(span(std::time::Duration::from_millis(100)), "100ms");
        assert_eq!(span(std::time::Duration::from_secs(72 * 3600)), "72h");
        assert_eq!(span(std::time::Duration::from_secs(90)), "90s");
        assert_eq!(cut("abcdef", 3), "abc…");
        assert_eq!(cut("abc", 3), "abc");
    }

    #[test]
    fn text_is_escaped_everywhere_it_is_spliced() {
        let evil = "<script>alert(1)</script>\"'&";
        let markup = html! {
            (error_box(evil))
            (status_badge(evil, evil))
            a title=(evil) href=(evil) { (evil) }
        }
        .into_string();
        assert!(!markup.contains("<script>"), "{markup}");
        assert!(
            markup.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{markup}"
        );
        assert!(!markup.contains("\"'&\""), "{markup}");
    }
}
