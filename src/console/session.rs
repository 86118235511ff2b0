//! Who is looking, and whether a request may do what it asks: the console's sessions, sign-in
//! with a token, CSRF tokens, and the gate every console request passes.
//!
//! - Every browser gets a session (a random id in an `HttpOnly`, `SameSite=Strict` cookie,
//!   `Secure` behind an HTTPS proxy), created on its first page; it holds a CSRF token that
//!   every form carries and the gate checks on every POST before any handler runs. GET never
//!   acts.
//! - With a tokens file, a session signs in with a token (the login form). The token is kept in
//!   the session (in memory only) and checked against the tokens file on every request, so a
//!   token removed from the file ends its sessions at their next request, and a role changed
//!   there applies at once. Each page needs `reader`; each action the role its gRPC method
//!   needs ([`crate::auth::required_role`]), checked by [`Auth::check`] itself.
//! - Without a tokens file, everyone may do everything (as over gRPC), and the gate only
//!   checks CSRF tokens, and that a loopback console is asked for by a loopback host name (a
//!   page from elsewhere cannot rebind a name of its own to 127.0.0.1 to read the console).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::html;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::layout::{self, Nav};
use super::{method, Console, Ctx, Exposure};
use crate::auth::{Access, Identity, Role};

/// A session unused this long ends.
pub(crate) const IDLE: Duration = Duration::from_secs(2 * 3600);
/// A session ends this long after it started, used or not.
pub(crate) const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; the least recently used go first.
const MAX_SESSIONS: usize = 10_000;
/// Largest form a POST may carry (a skip's result is at most 256 KiB of JSON, URL-encoded).
const MAX_FORM: usize = 1024 * 1024;

/// A token, never printed.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    secret: Option<Secret>,
    /// The operator name last typed in a form (consoles without authentication).
    operator: String,
    created: Instant,
    seen: Instant,
}

/// The console's sessions, in memory (a node restart signs everyone out).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes as hex.
fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session (signed in with `secret`, if given); returns its id.
    fn create(&self, secret: Option<Secret>) -> String {
        let id = random_hex();
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| alive(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.seen)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Session {
                csrf: random_hex(),
                secret,
                operator: String::new(),
                created: now,
                seen: now,
            },
        );
        id
    }

    /// The live session `id`, marked used.
    fn touch(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.lock();
        let session = map.get_mut(id)?;
        if !alive(session, now) {
            map.remove(id);
            return None;
        }
        session.seen = now;
        Some(session.clone())
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn sign_out(&self, id: &str) {
        if let Some(s) = self.lock().get_mut(id) {
            s.secret = None;
        }
    }

    /// Remembers the operator name a form named.
    pub(crate) fn remember_operator(&self, id: &str, operator: &str) {
        if let Some(s) = self.lock().get_mut(id) {
            s.operator = operator.chars().take(200).collect();
        }
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.seen) < IDLE && now.duration_since(s.created) < LIFETIME
}

/// Who makes a console request: set by [`gate`] on every request.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// The session id.
    pub(crate) session: String,
    /// The session's CSRF token, for forms.
    pub(crate) csrf: String,
    /// Whether the node authenticates (a tokens file or certificate roles).
    pub(crate) auth: bool,
    /// The signed-in identity (with authentication).
    pub(crate) identity: Option<Identity>,
    /// The operator name last typed (without authentication).
    pub(crate) operator: String,
    secret: Option<Secret>,
}

impl Viewer {
    /// Whether the viewer's role allows the gRPC method `path` (always, without authentication).
    pub(crate) fn may(&self, path: &str) -> bool {
        if !self.auth {
            return true;
        }
        match crate::auth::required_role(path, true) {
            Access::Open => true,
            Access::Role(needed) => self.identity.as_ref().is_some_and(|i| i.role >= needed),
        }
    }

    /// The role `path` needs.
    pub(crate) fn needs(path: &str) -> Role {
        match crate::auth::required_role(path, true) {
            Access::Open => Role::Reader,
            Access::Role(r) => r,
        }
    }

    /// Checks that the viewer may call `path`, as the gRPC auth layer would: the identity to
    /// hand the service, or the status it would answer (`permission_denied` naming the role).
    pub(crate) fn authorize(
        &self,
        console: &Console,
        path: &str,
    ) -> Result<Option<Identity>, tonic::Status> {
        let Some(auth) = &console.inner.auth else {
            return Ok(None);
        };
        let mut headers = http::HeaderMap::new();
        if let Some(secret) = &self.secret {
            let value = HeaderValue::from_str(&format!("Bearer {}", secret.0))
                .map_err(|_| tonic::Status::unauthenticated("unknown token"))?;
            headers.insert(header::AUTHORIZATION, value);
        }
        auth.check(path, &headers, None)
    }
}

/// The name of the session cookie of a console on `port` (consoles of several nodes on one
/// host keep apart: browsers share cookies across ports).
fn cookie_name(port: u16) -> String {
    format!("sagaflow_console_{port}")
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the request reached us over HTTPS (through a proxy that says so).
fn https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value of session `id` (empty id: clear it).
fn set_cookie(port: u16, id: &str, secure: bool) -> String {
    let max_age = if id.is_empty() { 0 } else { LIFETIME.as_secs() };
    format!(
        "{}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        cookie_name(port),
        if secure { "; Secure" } else { "" }
    )
}

/// Whether `host` (a `Host` header) names this loopback listener: `localhost`, a loopback
/// address, with any port.
pub(crate) fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a POST comes from one of our own pages: a browser's `Sec-Fetch-Site` says so when
/// sent, and an `Origin`, when sent, names the host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

/// The value of field `name` in a URL-encoded form.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Whether `given` is the session's CSRF token (compared in constant time).
pub(crate) fn csrf_ok(expected: &str, given: &str) -> bool {
    !expected.is_empty()
        && expected.len() == given.len()
        && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

fn plain(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// What every console response carries: no framing, no sniffing, scripts and styles from
/// this console only, nothing cached.
fn harden(response: &mut Response, cache: bool) {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !cache {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// The gate every console request passes: exposure, host, session, sign-in, CSRF.
pub(crate) async fn gate(State(ctx): State<Ctx>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let assets = path.starts_with("/ui/assets/");
    match &ctx.exposure {
        Exposure::Off(why) => return plain(StatusCode::FORBIDDEN, format!("{why}\n")),
        Exposure::Loopback => {
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !loopback_host(host) {
                return plain(
                    StatusCode::FORBIDDEN,
                    format!(
                        "this console listens on {} and answers only to a loopback host name \
                         (localhost, 127.0.0.1, [::1]), not {host:?}\n",
                        ctx.addr
                    ),
                );
            }
        }
        Exposure::Proxied => {}
    }
    if assets {
        let mut response = next.run(request).await;
        harden(&mut response, true);
        return response;
    }
    let console = &ctx.console;
    let port = ctx.addr.port();
    let secure = https(request.headers());
    let mut new_cookie = None;
    let found = cookie_value(request.headers(), &cookie_name(port))
        .and_then(|id| console.inner.sessions.touch(&id).map(|s| (id, s)));
    let (id, session) = match found {
        Some(found) => found,
        None => {
            // A link followed from another site carries no SameSite=Strict cookie: load the
            // page again from here (which does) rather than start a session over the one the
            // browser has.
            let cross_site = request
                .headers()
                .get("sec-fetch-site")
                .is_some_and(|v| v.as_bytes() == b"cross-site");
            if cross_site && request.method() == Method::GET {
                let mut response = layout::reload_page().into_response();
                harden(&mut response, false);
                return response;
            }
            let id = console.inner.sessions.create(None);
            new_cookie = Some(set_cookie(port, &id, secure));
            let session = console.inner.sessions.touch(&id);
            match session {
                Some(s) => (id, s),
                None => {
                    return plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no session could be made\n".into(),
                    )
                }
            }
        }
    };
    let auth = console.inner.auth.is_some();
    let mut viewer = Viewer {
        session: id.clone(),
        csrf: session.csrf.clone(),
        auth,
        identity: None,
        operator: session.operator.clone(),
        secret: session.secret.clone(),
    };
    if auth && viewer.secret.is_some() {
        match viewer.authorize(console, method::READ) {
            Ok(identity) => viewer.identity = identity,
            Err(status) => {
                // The token was removed from the file (or lost its role): signed out.
                tracing::info!(reason = %status.message(), "console session signed out");
                console.inner.sessions.sign_out(&id);
                viewer.secret = None;
            }
        }
    }
    let signing_in = path == "/ui/login";
    if auth && viewer.identity.is_none() && !signing_in && path != "/ui/logout" {
        let mut response = if request.method() == Method::GET && !path.starts_with("/ui/live/") {
            let target = request
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/ui/".into());
            Redirect::to(&format!(
                "/ui/login?next={}",
                form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
            ))
            .into_response()
        } else {
            plain(
                StatusCode::UNAUTHORIZED,
                "unauthenticated: sign in at /ui/login\n".into(),
            )
        };
        if let Some(c) = &new_cookie {
            if let Ok(v) = HeaderValue::from_str(c) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        harden(&mut response, false);
        return response;
    }
    // Every POST: from one of our pages, carrying this session's CSRF token. Checked here, so
    // no handler can forget it.
    let request = if request.method() == Method::POST {
        let (parts, body) = request.into_parts();
        let refused = |why: &str| {
            let mut r = layout::refusal(
                StatusCode::FORBIDDEN,
                "Refused",
                &format!("{why} Load the page again and repeat the action."),
            )
            .into_response();
            harden(&mut r, false);
            r
        };
        if !same_origin(&parts.headers) {
            return refused(
                "This form was not sent from this console (its Origin is another site).",
            );
        }
        let bytes = match axum::body::to_bytes(body, MAX_FORM).await {
            Ok(b) => b,
            Err(_) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a form of at most {MAX_FORM} bytes\n"),
                )
            }
        };
        let given = form_field(&bytes, "csrf").unwrap_or_default();
        if !csrf_ok(&viewer.csrf, &given) {
            return refused(
                "This form carries no valid CSRF token for your session (it expired, or the form did not come from this console).",
            );
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        request
    };
    let mut request = request;
    request.extensions_mut().insert(viewer);
    let mut response = next.run(request).await;
    if let Some(c) = new_cookie {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    harden(&mut response, false);
    response
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct LoginQuery {
    #[serde(default)]
    next: String,
}

/// Where to go after signing in: a console path, nothing else (no open redirect).
fn next_path(next: &str) -> String {
    if next.starts_with("/ui") && !next.starts_with("//") && !next.contains('\\') {
        next.to_string()
    } else {
        "/ui/".to_string()
    }
}

/// `GET /ui/login`.
pub(crate) async fn login_form(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<LoginQuery>,
) -> Response {
    login_page(&ctx, &viewer, &next_path(&q.next), None, StatusCode::OK)
}

fn login_page(
    ctx: &Ctx,
    viewer: &Viewer,
    next: &str,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let console = &ctx.console;
    let tokens = console
        .inner
        .auth
        .as_ref()
        .is_some_and(|a| a.path().is_some());
    let body = html! {
        h1 { "Sign in" }
        @if !viewer.auth {
            p { "This node runs without authentication: everyone may look and act (as over gRPC). "
                a href="/ui/" { "Go to the console" } }
        } @else {
            @if let Some(e) = &error { (layout::error_box(e)) }
            @if !tokens {
                p.warn { "This node authenticates with client certificates only; the console signs in with tokens. Add a tokens file (--auth-tokens) to use it." }
            }
            form.card.narrow method="post" action="/ui/login" {
                input type="hidden" name="csrf" value=(viewer.csrf);
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                p.hint { "The secret of an entry of the node's tokens file (" code { "sagaflow security gen-token" } "). Readers may look; operators may also act." }
                button type="submit" { "Sign in" }
            }
        }
    };
    let mut response =
        layout::page(console, viewer, Nav::None, "Sign in", None, body).into_response();
    *response.status_mut() = status;
    response
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /ui/login`: a token from the tokens file starts a signed-in session (a new id).
pub(crate) async fn login(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let console = &ctx.console;
    let next = next_path(&form.next);
    let Some(auth) = &console.inner.auth else {
        return Redirect::to(&next).into_response();
    };
    let mut bearer = http::HeaderMap::new();
    let checked = HeaderValue::from_str(&format!("Bearer {}", form.token.trim()))
        .map_err(|_| tonic::Status::unauthenticated("unknown token"))
        .and_then(|v| {
            bearer.insert(header::AUTHORIZATION, v);
            auth.check(method::READ, &bearer, None)
        });
    match checked {
        Ok(Some(identity)) => {
            tracing::info!(name = %identity.name, role = %identity.role, "console sign-in");
            console.inner.sessions.remove(&viewer.session);
            let id = console
                .inner
                .sessions
                .create(Some(Secret(form.token.trim().to_string())));
            let mut response = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&set_cookie(ctx.addr.port(), &id, https(&headers)))
            {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
            response
        }
        Ok(None) => Redirect::to(&next).into_response(),
        Err(status) => {
            tracing::info!(reason = %status.message(), "console sign-in refused");
            login_page(
                &ctx,
                &viewer,
                &next,
                Some(layout::status_text(&status)),
                StatusCode::UNAUTHORIZED,
            )
        }
    }
}

/// `POST /ui/logout`.
pub(crate) async fn logout(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    headers: HeaderMap,
) -> Response {
    ctx.console.inner.sessions.remove(&viewer.session);
    let mut response = Redirect::to(if viewer.auth { "/ui/login" } else { "/ui/" }).into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(ctx.addr.port(), "", https(&headers))) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_host_names_reach_a_loopback_console() {
        for ok in [
            "localhost",
            "localhost:9464",
            "127.0.0.1:9464",
            "127.1.2.3",
            "[::1]:9464",
            "[::1]",
            "LOCALHOST:80",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:9464",
            "10.0.0.1:9464",
            "localhost.evil.example",
            "127.0.0.1.nip.io:9464",
            "[2001:db8::1]:9464",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let t = random_hex();
        assert!(csrf_ok(&t, &t));
        assert!(!csrf_ok(&t, ""));
        assert!(
            !csrf_ok("", ""),
            "a session without a token accepts nothing"
        );
        assert!(!csrf_ok(&t, &t[..63]));
        assert!(!csrf_ok(&t, &random_hex()));
        let body = format!("action=cancel&csrf={t}&reason=a+b");
        assert_eq!(
            form_field(body.as_bytes(), "csrf").as_deref(),
            Some(t.as_str())
        );
        assert_eq!(form_field(b"action=cancel", "csrf"), None);
    }

    #[test]
    fn posts_from_other_sites_are_told_apart() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[("host", "127.0.0.1:9464")])));
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:9464"),
            ("origin", "http://127.0.0.1:9464"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:9464"),
            ("origin", "http://evil.example"),
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:9464"),
            ("sec-fetch-site", "cross-site"),
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:9464"),
            ("origin", "null"),
        ])));
    }

    #[test]
    fn sessions_expire_and_cookies_are_strict() {
        let sessions = Sessions::default();
        let id = sessions.create(None);
        assert!(sessions.touch(&id).is_some());
        sessions.lock().get_mut(&id).unwrap().seen = Instant::now() - IDLE;
        assert!(sessions.touch(&id).is_none(), "idle too long");
        assert!(sessions.touch(&id).is_none(), "and gone");
        let c = set_cookie(9464, "abc", false);
        assert_eq!(
            c,
            "sagaflow_console_9464=abc; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=43200"
        );
        assert!(set_cookie(9464, "abc", true).ends_with("; Secure"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sagaflow_console_9464=xyz; b=2"),
        );
        assert_eq!(
            cookie_value(&h, "sagaflow_console_9464").as_deref(),
            Some("xyz")
        );
        assert_eq!(cookie_value(&h, "sagaflow_console_9465"), None);
        assert_eq!(format!("{:?}", Secret("s3cret".into())), "***");
    }

    #[test]
    fn sign_in_returns_only_to_console_paths() {
        assert_eq!(
            next_path("/ui/sagas?status=SHIPPED"),
            "/ui/sagas?status=SHIPPED"
        );
        for bad in [
            "https://evil.example/",
            "//evil.example/ui",
            "/metrics",
            "",
            "/ui\\..\\x",
        ] {
            assert_eq!(next_path(bad), "/ui/", "{bad}");
        }
    }
}
