//! The web console through its HTTP layer, without a browser (docs/console.md): sign-in with a
//! token, read-only pages for a reader and actions refused with the gRPC API's words, CSRF
//! tokens checked on every POST (missing, wrong, or from another origin: refused; a GET never
//! acts), security headers, the host check, text from participants escaped, the first load's
//! weight, and a console that is not served beyond loopback unless the node is `--insecure`.
//! The browser test is `tests/console.rs`.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::participant::{failure, success, Handling, RawParticipant};
use common::*;
use sagaflow::auth::sha256_hex;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{self, GetSagaRequest, OrderItem, PlaceOrderRequest, StartSagaRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// An HTTP response as the test reads it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The CSRF token of the first form of the page.
    fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let at = self
            .body
            .find(marker)
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body));
        self.body[at + marker.len()..at + marker.len() + 64].to_string()
    }
}

/// A browser-like HTTP/1.1 client with one session cookie.
struct Web {
    addr: SocketAddr,
    cookie: Option<String>,
    host: String,
}

fn decode_chunked(mut raw: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = raw.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        raw = &rest[n + 2..];
    }
}

impl Web {
    fn new(addr: SocketAddr) -> Web {
        Web {
            addr,
            cookie: None,
            host: addr.to_string(),
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.host
        );
        if let Some(c) = &self.cookie {
            request.push_str(&format!("Cookie: {c}\r\n"));
        }
        for (k, v) in extra {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "POST" {
            request.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let raw = within(TIMEOUT, &format!("{method} {path}"), async {
            let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.unwrap();
            raw
        })
        .await
        .unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        let body = if chunked {
            decode_chunked(body)
        } else {
            body.to_string()
        };
        for (k, v) in &headers {
            if k.eq_ignore_ascii_case("set-cookie") && v.starts_with("sagaflow_console_") {
                let pair = v.split(';').next().unwrap().to_string();
                self.cookie = if pair.ends_with('=') {
                    None
                } else {
                    Some(pair)
                };
            }
        }
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.send("GET", path, &[], "").await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.post_with(path, form, &[]).await
    }

    async fn post_with(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Answer {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send("POST", path, extra, &body).await
    }

    /// Signs in with `secret` (from the login page's form).
    async fn sign_in(&mut self, secret: &str) -> Answer {
        let page = self.get("/ui/login").await;
        assert_eq!(page.status, 200, "{page:?}");
        let csrf = page.csrf();
        self.post(
            "/ui/login",
            &[("csrf", &csrf), ("token", secret), ("next", "/ui/")],
        )
        .await
    }
}

const READER: &str = "secret-of-rita";
const OPERATOR: &str = "secret-of-olga";

fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    let text = format!(
        "[[token]]\nname = \"rita\"\nrole = \"reader\"\nsha256 = \"{}\"\n\n[[token]]\nname = \"olga\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
        sha256_hex(READER),
        sha256_hex(OPERATOR)
    );
    let path = dir.join("tokens.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn bearer<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {OPERATOR}").parse().unwrap(),
    );
    r
}

async fn saga(sagas: &mut SagaServiceClient<Channel>, id: &str) -> v1::Saga {
    sagas
        .get_saga(bearer(GetSagaRequest { saga_id: id.into() }))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_roles_and_csrf_guard_every_action() {
    let nats = start_nats().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let node = TestNode::on(&nats)
        .id("console-auth")
        .http()
        .partitions(2)
        .env("SAGAFLOW_AUTH__TOKENS", tokens.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let addr = node.http_addr;
    let channel = channel(&node.grpc_addr.to_string()).await.unwrap();
    let mut sagas = SagaServiceClient::new(channel);
    // A saga that waits (for the carrier's signal, up to 72 h): running while we look.
    sagas
        .start_saga(bearer(StartSagaRequest {
            saga_name: "delivery".into(),
            saga_id: "D-1".into(),
            input_json: r#"{"order_id":"A-1","customer":"ann","amount_cents":1999,"items":[{"sku":"SKU-1","quantity":1}]}"#.into(),
        }))
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "D-1 waits for its signal", || {
        let mut sagas = sagas.clone();
        async move {
            saga(&mut sagas, "D-1")
                .await
                .progress
                .contains("waiting for signal")
        }
    })
    .await
    .unwrap();

    // Nobody signed in: pages lead to the sign-in, live streams and posts are refused.
    let mut anon = Web::new(addr);
    let root = anon.get("/").await;
    assert_eq!((root.status, root.header("location")), (303, Some("/ui/")));
    let list = anon.get("/ui/sagas?status=PREPARING").await;
    assert_eq!(list.status, 303, "{list:?}");
    assert_eq!(
        list.header("location"),
        Some("/ui/login?next=%2Fui%2Fsagas%3Fstatus%3DPREPARING")
    );
    let cookie = list.header("set-cookie").unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert_eq!(anon.get("/ui/live/sagas").await.status, 401);
    let css = anon.get("/ui/assets/app.css").await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").unwrap().starts_with("text/css"));
    // A wrong token, and a sign-in without the form's CSRF token.
    let login = anon.get("/ui/login").await;
    let csrf = login.csrf();
    let wrong = anon
        .post("/ui/login", &[("csrf", &csrf), ("token", "not-a-token")])
        .await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.body.contains("unauthenticated: unknown token"),
        "{}",
        wrong.body
    );
    let forged = anon.post("/ui/login", &[("token", READER)]).await;
    assert_eq!(forged.status, 403);
    assert!(forged.body.contains("CSRF"), "{}", forged.body);
    // Another host name for a loopback console (DNS rebinding) is refused.
    let mut rebound = Web::new(addr);
    rebound.host = "evil.example:9464".into();
    assert_eq!(rebound.get("/ui/").await.status, 403);
    assert_eq!(
        rebound.get("/metrics").await.status,
        200,
        "the probes are not the console's"
    );

    // A reader looks and cannot act.
    let mut rita = Web::new(addr);
    let signed = rita.sign_in(READER).await;
    assert_eq!(
        (signed.status, signed.header("location")),
        (303, Some("/ui/"))
    );
    let page = rita.get("/ui/sagas/D-1").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("rita · reader"), "{}", page.body);
    assert!(page
        .body
        .contains("Read-only: your role is reader; actions need role operator"));
    assert!(!page.body.contains("data-action=\"cancel\""));
    for (name, value) in [
        ("content-security-policy", "script-src 'self'"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        assert!(
            page.header(name).is_some_and(|v| v.contains(value)),
            "{name}: {:?}",
            page.headers
        );
    }
    let confirm = rita.get("/ui/sagas/D-1/act?action=cancel").await;
    let denied = "permission_denied: `rita` has role reader; sagaflow.v1.SagaService/InterveneSaga needs role operator";
    assert!(confirm.body.contains(denied), "{}", confirm.body);
    assert!(
        !confirm.body.contains("action=\"/ui/sagas/D-1/act\""),
        "no form for a reader"
    );
    let csrf = rita.get("/ui/sagas").await.csrf();
    let refused = rita
        .post(
            "/ui/sagas/D-1/act",
            &[("csrf", &csrf), ("action", "cancel"), ("reason", "try")],
        )
        .await;
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains(denied), "{}", refused.body);
    let refused = rita
        .post("/ui/dlq/1/discard", &[("csrf", &csrf), ("reason", "try")])
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");

    // An operator: the CSRF token guards every action; a GET never acts.
    let mut olga = Web::new(addr);
    assert_eq!(olga.sign_in(OPERATOR).await.status, 303);
    let page = olga.get("/ui/sagas/D-1").await;
    assert!(
        page.body.contains("data-action=\"cancel\""),
        "{}",
        page.body
    );
    let csrf = page.csrf();
    let act = |csrf: &str| {
        vec![
            ("csrf".to_string(), csrf.to_string()),
            ("action".to_string(), "cancel".to_string()),
            ("reason".to_string(), "customer called".to_string()),
            ("request_id".to_string(), "console-test-1".to_string()),
        ]
    };
    for (what, form, extra) in [
        ("no token", act("")[1..].to_vec(), vec![]),
        (
            "another session's token",
            act(&rita.get("/ui/").await.csrf()),
            vec![],
        ),
        ("a made-up token", act(&"0".repeat(64)), vec![]),
        (
            "another origin",
            act(&csrf),
            vec![("Origin", "http://evil.example")],
        ),
        (
            "a cross-site request",
            act(&csrf),
            vec![("Sec-Fetch-Site", "cross-site")],
        ),
    ] {
        let refs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = olga.post_with("/ui/sagas/D-1/act", &refs, &extra).await;
        assert_eq!(r.status, 403, "{what}: {r:?}");
    }
    let get = olga
        .get(&format!(
            "/ui/sagas/D-1/act?action=cancel&reason=by+get&csrf={csrf}&request_id=console-get"
        ))
        .await;
    assert_eq!(get.status, 200, "a GET shows the confirmation only");
    assert!(get.body.contains("Cancel saga D-1?"), "{}", get.body);
    let s = saga(&mut sagas, "D-1").await;
    assert_eq!(s.phase, "RUNNING", "nothing acted: {s:?}");
    assert!(
        !s.history.iter().any(|h| h.what.contains("operator")),
        "{:?}",
        s.history
    );
    let no_reason = olga
        .post(
            "/ui/sagas/D-1/act",
            &[("csrf", &csrf), ("action", "cancel"), ("reason", " ")],
        )
        .await;
    assert_eq!(no_reason.status, 400);
    assert!(
        no_reason
            .body
            .contains("invalid_argument: reason: required"),
        "{}",
        no_reason.body
    );
    let form = act(&csrf);
    let refs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let done = olga.post("/ui/sagas/D-1/act", &refs).await;
    assert_eq!(done.status, 303, "{done:?}");
    assert_eq!(
        done.header("location"),
        Some("/ui/sagas/D-1?request=console-test-1")
    );
    let shown = olga.get("/ui/sagas/D-1?request=console-test-1").await;
    assert!(
        shown
            .body
            .contains("cancel applied to saga D-1 (request console-test-1) by olga"),
        "{}",
        shown.body
    );
    wait_until(Duration::from_secs(20), "D-1 compensated", || {
        let mut sagas = sagas.clone();
        async move { saga(&mut sagas, "D-1").await.phase == "COMPENSATED" }
    })
    .await
    .unwrap();
    let s = saga(&mut sagas, "D-1").await;
    assert!(
        s.history
            .iter()
            .any(|h| h.what == "operator `olga`: cancel (customer called)"),
        "{:?}",
        s.history
    );
    // The same request again answers with what became of the first; a signal to a finished
    // saga is refused as the CLI says it.
    let again = olga.post("/ui/sagas/D-1/act", &refs).await;
    assert_eq!(again.status, 303);
    let csrf = olga.get("/ui/sagas/D-1/signal").await.csrf();
    let late = olga
        .post(
            "/ui/sagas/D-1/signal",
            &[
                ("csrf", &csrf),
                ("name", "delivery.confirmed"),
                ("signal_id", "sig-late"),
            ],
        )
        .await;
    assert_eq!(late.status, 409, "{late:?}");
    assert!(
        late.body
            .contains("failed_precondition: saga `D-1` has finished (COMPENSATED, RETURNED)"),
        "{}",
        late.body
    );

    // A token taken out of the file ends its sessions (the file is read again on change).
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"olga\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha256_hex(OPERATOR)
        ),
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "rita's session ends", || {
        let mut rita = Web {
            addr,
            cookie: rita.cookie.clone(),
            host: addr.to_string(),
        };
        async move { rita.get("/ui/sagas").await.status == 303 }
    })
    .await
    .unwrap();
    assert_eq!(
        olga.get("/ui/sagas").await.status,
        200,
        "olga's token stays"
    );

    // Signing out ends the session.
    let out = olga.post("/ui/logout", &[("csrf", &csrf)]).await;
    assert_eq!(
        (out.status, out.header("location")),
        (303, Some("/ui/login"))
    );
    assert_eq!(olga.get("/ui/").await.status, 303);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_pages_escape_what_participants_say_and_stay_light() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("console-open")
        .without_demo()
        .http()
        .partitions(2)
        .start()
        .await
        .unwrap();
    let hostile = "<script>window.__xss=1</script><img src=x onerror=\"alert(2)\"> & \"quoted\"";
    let _participant = RawParticipant::start(
        &nats.url(),
        ["payment", "inventory", "shipping", "notification"],
        Handling::Concurrent,
        |_| {},
        move |cmd| async move {
            if cmd.action == "charge" {
                failure("declined", hostile)
            } else {
                success(serde_json::json!({}))
            }
        },
    )
    .await;
    let mut orders = OrderServiceClient::new(channel(&node.grpc_addr.to_string()).await.unwrap());
    orders
        .place_order(PlaceOrderRequest {
            order_id: "X-1".into(),
            customer: "<b>mallory</b>".into(),
            amount_cents: 100,
            items: vec![OrderItem {
                sku: "SKU-1".into(),
                quantity: 1,
            }],
        })
        .await
        .unwrap();
    let sagas = SagaServiceClient::new(channel(&node.grpc_addr.to_string()).await.unwrap());
    wait_until(Duration::from_secs(20), "order X-1 cancelled", || {
        let mut sagas = sagas.clone();
        async move {
            sagas
                .get_saga(GetSagaRequest {
                    saga_id: "order-X-1".into(),
                })
                .await
                .is_ok_and(|s| s.into_inner().terminal)
        }
    })
    .await
    .unwrap();

    let mut web = Web::new(node.http_addr);
    let page = web.get("/ui/sagas/order-X-1").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("no authentication"), "{}", page.body);
    // The participant's words and the input, as text: never markup.
    assert!(
        page.body
            .contains("&lt;script&gt;window.__xss=1&lt;/script&gt;"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("&lt;b&gt;mallory&lt;/b&gt;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>window"), "{}", page.body);
    assert!(!page.body.contains("<img"), "{}", page.body);
    assert!(!page.body.contains("<b>mallory"), "{}", page.body);
    assert_eq!(
        page.body.matches("<script").count(),
        1,
        "only the console's own script"
    );
    let search = web
        .get("/ui/sagas?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
        .await;
    assert!(!search.body.contains("<script>alert"), "{}", search.body);
    assert!(
        search.body.contains("&lt;script&gt;alert(1)"),
        "{}",
        search.body
    );

    // Errors read as the CLI's.
    let missing = web.get("/ui/sagas/nope").await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.body.contains("not_found: no saga with id `nope`"),
        "{}",
        missing.body
    );
    let bad = web.get("/ui/sagas/a%20b").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("invalid_argument: saga_id"),
        "{}",
        bad.body
    );
    // Without authentication an action names its operator, as `--operator` does.
    let csrf = web.get("/ui/sagas/order-X-1/act?action=retry").await.csrf();
    let anonymous = web
        .post(
            "/ui/sagas/order-X-1/act",
            &[("csrf", &csrf), ("action", "retry"), ("reason", "why not")],
        )
        .await;
    assert_eq!(anonymous.status, 400, "{anonymous:?}");
    assert!(
        anonymous
            .body
            .contains("invalid_argument: operator: required"),
        "{}",
        anonymous.body
    );
    let finished = web
        .post(
            "/ui/sagas/order-X-1/act",
            &[
                ("csrf", &csrf),
                ("action", "cancel"),
                ("reason", "late"),
                ("operator", "ann"),
            ],
        )
        .await;
    assert_eq!(finished.status, 409, "{finished:?}");
    assert!(
        finished.body.contains("failed_precondition: cancel:"),
        "{}",
        finished.body
    );

    // Filters read the list index; pages go through it, 50 at a time.
    for (query, shown) in [
        ("?q=x-1", true),
        (
            "?since=1h&phase=COMPENSATED&status=cancelled&definition=order",
            true,
        ),
        ("?phase=finished", true),
        ("?to=2000-01-01T00:00", false),
        ("?status=SHIPPED", false),
        ("?definition=delivery", false),
        ("?phase=unfinished", false),
    ] {
        let r = web.get(&format!("/ui/sagas{query}")).await;
        assert_eq!(r.status, 200, "{query}");
        assert_eq!(
            r.body.contains("data-saga=\"order-X-1\""),
            shown,
            "{query}: {}",
            r.body
        );
    }
    let bad = web.get("/ui/sagas?phase=SLEEPING&from=soon").await;
    assert!(
        bad.body.contains("invalid_argument: phase: no phase"),
        "{}",
        bad.body
    );
    assert!(bad.body.contains("invalid_argument: from:"), "{}", bad.body);
    let more: Vec<String> = (0..55).map(|i| format!("P-{i:02}")).collect();
    futures::future::join_all(more.iter().map(|id| {
        let mut orders = orders.clone();
        async move {
            orders
                .place_order(PlaceOrderRequest {
                    order_id: id.clone(),
                    customer: "ann".into(),
                    amount_cents: 100,
                    items: vec![OrderItem {
                        sku: "SKU-1".into(),
                        quantity: 1,
                    }],
                })
                .await
                .unwrap()
        }
    }))
    .await;
    let first = web.get("/ui/sagas").await;
    assert_eq!(
        first.body.matches("data-saga=").count(),
        50,
        "{}",
        first.body
    );
    assert!(
        first.body.contains("all <strong>56</strong>"),
        "{}",
        first.body
    );
    let next = first
        .body
        .split("rel=\"next\"")
        .next()
        .and_then(|b| b.rsplit("href=\"").next())
        .map(|h| h.split('"').next().unwrap().replace("&amp;", "&"))
        .unwrap();
    let second = web.get(&next).await;
    assert_eq!(
        second.body.matches("data-saga=").count(),
        6,
        "{next}: {}",
        second.body
    );
    assert!(
        second.body.contains("data-saga=\"order-X-1\""),
        "the oldest is last"
    );
    assert!(!second.body.contains("rel=\"next\""));

    // A dead letter is discarded with a reason, and journaled.
    let js = async_nats::jetstream::new(nats_client(&nats.url()).await.unwrap());
    js.publish("sagaflow.evt.0.order-y.reply", b"\x00junk".to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let seq = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    wait_until(Duration::from_secs(20), "a dead letter", || {
        let seq = seq.clone();
        let mut web = Web::new(node.http_addr);
        async move {
            let page = web.get("/ui/dlq").await;
            let found = page
                .body
                .split("<tr data-seq=\"")
                .nth(1)
                .map(|r| r.split('"').next().unwrap().to_string());
            let ok = found.is_some();
            *seq.lock().unwrap() = found.unwrap_or_default();
            ok
        }
    })
    .await
    .unwrap();
    let seq = seq.lock().unwrap().clone();
    let shown = web.get(&format!("/ui/dlq/{seq}")).await;
    assert!(
        shown.body.contains("00000000  00 6a 75 6e 6b"),
        "{}",
        shown.body
    );
    let form = web.get(&format!("/ui/dlq/{seq}/discard")).await;
    let csrf = form.csrf();
    let no_reason = web
        .post(
            &format!("/ui/dlq/{seq}/discard"),
            &[("csrf", &csrf), ("operator", "ann")],
        )
        .await;
    assert_eq!(no_reason.status, 400);
    assert!(
        no_reason
            .body
            .contains("invalid_argument: reason: required"),
        "{}",
        no_reason.body
    );
    let gone = web
        .post(
            &format!("/ui/dlq/{seq}/discard"),
            &[
                ("csrf", &csrf),
                ("operator", "ann"),
                ("reason", "test junk"),
            ],
        )
        .await;
    assert_eq!(gone.status, 303, "{gone:?}");
    let listed = web.get(gone.header("location").unwrap()).await;
    assert!(
        listed
            .body
            .contains(&format!("discarded dead letter {seq}")),
        "{}",
        listed.body
    );
    let journal = web.get("/ui/dlq?journal=1").await;
    assert!(
        journal
            .body
            .contains(&format!("discard of {seq} by ann: test junk")),
        "{}",
        journal.body
    );

    // The first load: page, stylesheet and script, well under 200 KB.
    let list = web.get("/ui/sagas").await;
    let css = web.get(&asset(&list.body, "stylesheet")).await;
    let js = web.get(&asset(&list.body, "script")).await;
    assert_eq!((css.status, js.status), (200, 200));
    let weight = list.body.len() + css.body.len() + js.body.len();
    eprintln!(
        "console first load: page {} + css {} + js {} = {weight} bytes",
        list.body.len(),
        css.body.len(),
        js.body.len()
    );
    assert!(weight < 200_000, "{weight} bytes");
    let saga_page =
        web.get("/ui/sagas/order-X-1").await.body.len() + css.body.len() + js.body.len();
    eprintln!("console first load of a saga's page: {saga_page} bytes");
    assert!(saga_page < 200_000, "{saga_page} bytes");
    // The overview, definitions, cluster and dead letters answer.
    for path in [
        "/ui/",
        "/ui/definitions",
        "/ui/definitions/order",
        "/ui/cluster",
        "/ui/dlq",
    ] {
        let r = web.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    node.shutdown().await.unwrap();

    // Beyond loopback, a node not run --insecure serves no console (its probes still answer).
    let exposed = TestNode::on(&nats)
        .id("console-exposed")
        .without_demo()
        .env("SAGAFLOW_HTTP_ADDR", "0.0.0.0:0")
        .partitions(2)
        .start()
        .await
        .unwrap();
    let port = exposed.http_addr.port();
    let mut web = Web::new(SocketAddr::from(([127, 0, 0, 1], port)));
    let off = web.get("/ui/").await;
    assert_eq!(off.status, 403);
    assert!(off.body.contains("--insecure"), "{}", off.body);
    assert_eq!(web.get("/metrics").await.status, 200);
    exposed.shutdown().await.unwrap();
}

/// The URL of the page's stylesheet or script.
fn asset(page: &str, kind: &str) -> String {
    let marker = if kind == "stylesheet" {
        "rel=\"stylesheet\" href=\""
    } else {
        "<script src=\""
    };
    let at = page.find(marker).unwrap() + marker.len();
    page[at..].split('"').next().unwrap().to_string()
}
