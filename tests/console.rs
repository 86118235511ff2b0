//! The web console in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`; `CHROMIUM_BIN` and `CHROMEDRIVER_BIN` name others). One
//! browser session walks through what an operator does, against a node with a tokens file and
//! a participant the test scripts:
//!
//! - signs in with a token, keyboard first (the skip link, then the main content);
//! - the list shows an order placed after the page loaded, PAID and then SHIPPED, with no
//!   reload;
//! - its page draws the timeline;
//! - a saga whose reservation is held is cancelled from its page (reason, confirmation) and is
//!   seen compensating to CANCELLED, live;
//! - a participant's error containing `<script>` shows as text, and nothing of it runs;
//! - a dead letter is replayed from its page, and the journal names the operator;
//! - pages fit a 390 px wide screen.
//!
//! Screenshots go to `target/console-screenshots/` (the README shows one, copied to `docs/`).
//! The test fails, never skips, when the browser or its driver is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::participant::{failure, success, Handling, RawParticipant};
use common::*;
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder, Locator};
use sagaflow::auth::sha256_hex;
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{
    GetDeadLetterRequest, ListDeadLettersRequest, OrderItem, PlaceOrderRequest,
};
use tokio::sync::watch;
use tonic::transport::Channel;

const OPERATOR: &str = "secret-of-olga";
/// Bound on every wait for the page.
const WAIT: Duration = Duration::from_secs(20);
/// What the participant answers a charge of an order whose id starts `XSS`.
const HOSTILE: &str =
    "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\"> card refused";

/// A binary the test needs, named by `env` or at `default`; the test fails without it.
fn binary(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{} not found: the console's browser test needs Debian's chromium and chromium-driver \
         (`bash scripts/install-browser.sh`, as .ci/run and the README's test command do), or {env} naming the binary",
        path.display()
    );
    path
}

/// A `chromedriver` child process, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where screenshots go: `target/console-screenshots/`.
fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start_browser() -> (Client, Driver) {
    let chromium = binary("CHROMIUM_BIN", "/usr/bin/chromium");
    let chromedriver = binary("CHROMEDRIVER_BIN", "/usr/bin/chromedriver");
    let port = free_port();
    let driver = Driver(
        Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                shots().join("chromedriver.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromedriver.display())),
    );
    wait_until(WAIT, "chromedriver listens", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
    .unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--force-device-scale-factor=1", "--lang=en-US",
                "--hide-scrollbars",
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = within(
        Duration::from_secs(60),
        "start a Chromium session",
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}")),
    )
    .await
    .unwrap()
    .unwrap();
    (client, driver)
}

/// The text of the first element matching `css`, if there is one.
async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Waits until the first element matching `css` has `wanted` in its text.
async fn until_text(c: &Client, css: &str, wanted: &str) {
    let shown = std::sync::Arc::new(std::sync::Mutex::new(None));
    let result = wait_until(WAIT, &format!("{css} shows {wanted:?}"), || {
        let shown = shown.clone();
        async move {
            let t = text(c, css).await;
            let ok = t.as_deref().is_some_and(|t| t.contains(wanted));
            *shown.lock().unwrap() = t;
            ok
        }
    })
    .await;
    if let Err(e) = result {
        panic!("{e}; it shows {:?}", shown.lock().unwrap());
    }
}

async fn js(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Clicks the first element matching `css` (found again if a live update replaced it).
async fn click(c: &Client, css: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = c.wait().at_most(WAIT).for_element(Locator::Css(css)).await;
        let clicked = match found {
            Ok(e) => e.click().await,
            Err(e) => panic!("{css}: {e}"),
        };
        match clicked {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("click {css}: {e}; again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("click {css}: {e}"),
        }
    }
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(name), png).unwrap();
}

async fn key(c: &Client, k: char) {
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: k })
        .then(KeyAction::Up { value: k });
    c.perform_actions(keys).await.unwrap();
}

fn order(id: &str) -> tonic::Request<PlaceOrderRequest> {
    let mut r = tonic::Request::new(PlaceOrderRequest {
        order_id: id.into(),
        customer: "ann".into(),
        amount_cents: 1999,
        items: vec![OrderItem {
            sku: "SKU-1".into(),
            quantity: 2,
        }],
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {OPERATOR}").parse().unwrap(),
    );
    r
}

fn authorized<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {OPERATOR}").parse().unwrap(),
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_and_acts_in_a_real_browser() {
    let (c, _driver) = start_browser().await;
    let nats = start_nats().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"olga\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha256_hex(OPERATOR)
        ),
    )
    .unwrap();
    let node = TestNode::on(&nats)
        .id("console-browser")
        .without_demo()
        .http()
        .partitions(2)
        .env("SAGAFLOW_AUTH__TOKENS", tokens.to_str().unwrap())
        .start()
        .await
        .unwrap();
    // The participant: `T-` orders wait to ship until `ship` opens; `HOLD-` orders wait to be
    // reserved until `reserve` opens; `XSS-` orders are refused with hostile text.
    let (ship, ship_rx) = watch::channel(false);
    let (reserve, reserve_rx) = watch::channel(false);
    let _participant = RawParticipant::start(
        &nats.url(),
        ["payment", "inventory", "shipping", "notification"],
        Handling::Concurrent,
        |_| {},
        move |cmd| {
            let mut ship = ship_rx.clone();
            let mut reserve = reserve_rx.clone();
            async move {
                let id = cmd.saga_id.as_str();
                if cmd.compensation {
                    return success(serde_json::json!({}));
                }
                match cmd.action.as_str() {
                    "charge" if id.starts_with("order-XSS") => failure("declined", HOSTILE),
                    "prepare" if id.starts_with("order-T-") => {
                        let _ = ship.wait_for(|open| *open).await;
                        success(serde_json::json!({"tracking": "TRK-1"}))
                    }
                    "reserve" if id.starts_with("order-HOLD") => {
                        let _ = reserve.wait_for(|open| *open).await;
                        success(serde_json::json!({}))
                    }
                    _ => success(serde_json::json!({})),
                }
            }
        },
    )
    .await;
    let grpc = channel(&node.grpc_addr.to_string()).await.unwrap();
    let mut orders = OrderServiceClient::<Channel>::new(grpc.clone());
    let mut admin = AdminServiceClient::<Channel>::new(grpc);
    let base = format!("http://{}", node.http_addr);

    // Sign in; the keyboard reaches the skip link first, and it leads to the content.
    c.goto(&format!("{base}/ui/sagas")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(OPERATOR)
        .await
        .unwrap();
    click(&c, "form.narrow button[type=submit]").await;
    until_text(&c, "header .user", "olga · operator").await;
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/sagas");
    js(
        &c,
        "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);",
    )
    .await;
    key(&c, '\u{E004}').await; // Tab
    assert_eq!(
        js(&c, "return document.activeElement.className").await,
        "skip-link"
    );
    key(&c, '\u{E007}').await; // Enter
    assert_eq!(js(&c, "return document.activeElement.id").await, "main");

    // The list shows a new order, PAID while it waits to ship, then SHIPPED: no reload.
    js(&c, "window.__sameDocument = 42;").await;
    orders.place_order(order("T-1")).await.unwrap();
    until_text(&c, "tr[data-saga=\"order-T-1\"] td.status", "PAID").await;
    ship.send(true).unwrap();
    until_text(&c, "tr[data-saga=\"order-T-1\"] td.status", "SHIPPED").await;
    until_text(&c, ".counts", "SHIPPED 1").await;
    assert_eq!(
        js(&c, "return window.__sameDocument").await,
        42,
        "the page was reloaded"
    );
    shot(&c, "sagas.png").await;

    // Its page draws the timeline: a bar per step, the fulfilment's three side by side.
    click(&c, "tr[data-saga=\"order-T-1\"] td.id a").await;
    until_text(&c, ".saga-head", "SHIPPED").await;
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/sagas/order-T-1");
    for step in ["charge", "reserve", "prepare_shipment", "notify"] {
        let bars = c
            .find_all(Locator::Css(&format!(
                ".timeline .tl-row[data-step=\"{step}\"] rect.bar"
            )))
            .await
            .unwrap();
        assert!(!bars.is_empty(), "no bar for {step}");
    }
    until_text(&c, ".attempts", "prepare_shipment").await;
    shot(&c, "saga.png").await;

    // Cancel a saga whose reservation is held: reason, confirmation, then it compensates.
    orders.place_order(order("HOLD-1")).await.unwrap();
    c.goto(&format!("{base}/ui/sagas/order-HOLD-1"))
        .await
        .unwrap();
    until_text(&c, ".progress", "waiting for `reserve`").await;
    click(&c, "a[data-action=\"cancel\"]").await;
    until_text(&c, "h1", "Cancel saga order-HOLD-1?").await;
    c.find(Locator::Css("#a-reason"))
        .await
        .unwrap()
        .send_keys("customer called")
        .await
        .unwrap();
    shot(&c, "cancel.png").await;
    click(&c, "form.card button[type=submit]").await;
    until_text(&c, ".notice", "cancel applied to saga order-HOLD-1").await;
    js(&c, "window.__sameDocument = 43;").await;
    reserve.send(true).unwrap();
    until_text(&c, ".saga-head", "CANCELLED").await;
    until_text(&c, ".history", "operator `olga`: cancel (customer called)").await;
    let undone = c
        .find_all(Locator::Css(".timeline .comp-lane"))
        .await
        .unwrap();
    assert!(undone.len() >= 2, "compensation lanes: {}", undone.len());
    assert_eq!(
        js(&c, "return window.__sameDocument").await,
        43,
        "the page was reloaded"
    );
    // Its shareable URL, as the README shows it.
    c.goto(&format!("{base}/ui/sagas/order-HOLD-1"))
        .await
        .unwrap();
    until_text(&c, ".saga-head", "CANCELLED").await;
    shot(&c, "cancelled.png").await;

    // A participant's error with markup in it is text on the page, and nothing of it runs.
    orders.place_order(order("XSS-1")).await.unwrap();
    c.goto(&format!("{base}/ui/sagas/order-XSS-1"))
        .await
        .unwrap();
    until_text(&c, ".saga-head", "CANCELLED").await;
    until_text(
        &c,
        ".attempts td.error-text",
        "<script>window.__xss=1</script>",
    )
    .await;
    until_text(&c, ".reason", "<img src=x onerror=").await;
    assert_eq!(js(&c, "return window.__xss === undefined").await, true);
    assert_eq!(
        js(
            &c,
            "return document.querySelectorAll('main img, main script').length"
        )
        .await,
        0
    );

    // A dead letter is replayed from its page; the journal says by whom.
    let js_nats = async_nats::jetstream::new(nats_client(&nats.url()).await.unwrap());
    js_nats
        .publish(
            "sagaflow.evt.1.order-x.reply",
            b"\xff\xfe not protobuf".to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    c.goto(&format!("{base}/ui/dlq")).await.unwrap();
    wait_until(WAIT, "the dead letter is listed", || {
        let c = c.clone();
        async move {
            if text(&c, "table.dlq")
                .await
                .is_some_and(|t| t.contains("undecodable reply"))
            {
                return true;
            }
            let _ = c.refresh().await;
            false
        }
    })
    .await
    .unwrap();
    let seq: u64 = text(&c, "table.dlq tbody tr td a")
        .await
        .unwrap()
        .parse()
        .unwrap();
    click(&c, "table.dlq tbody tr td a").await;
    until_text(&c, "pre.hex", "ff fe 20 6e 6f 74").await;
    shot(&c, "dead-letter.png").await;
    click(&c, "a[href$=\"/replay\"]").await;
    until_text(&c, "h1", &format!("Replay dead letter {seq}?")).await;
    click(&c, "form.card button[type=submit]").await;
    until_text(
        &c,
        ".notice",
        &format!("replayed dead letter {seq} to sagaflow.evt.1.order-x.reply"),
    )
    .await;
    let gone = admin
        .get_dead_letter(authorized(GetDeadLetterRequest { seq }))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let journal = admin
        .list_dead_letters(authorized(ListDeadLettersRequest {
            include_journal: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        journal.iter().any(|e| e.journal.as_ref().is_some_and(|j| {
            j.action == "replay" && j.dead_letter_seq == seq && j.operator == "olga"
        })),
        "{journal:?}"
    );

    // The other pages, for the record.
    for (path, name, wanted) in [
        ("/ui/definitions/order", "definition.png", "fulfilment"),
        ("/ui/cluster", "cluster.png", "epoch"),
        ("/ui/", "overview.png", "COMPLETED"),
    ] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        until_text(&c, "main", wanted).await;
        shot(&c, name).await;
    }

    // A phone's width: nothing wider than the screen (tables scroll inside their box).
    c.set_window_size(390, 844).await.unwrap();
    for path in [
        "/ui/sagas/order-HOLD-1",
        "/ui/sagas",
        "/ui/definitions/order",
        "/ui/cluster",
    ] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        until_text(&c, "main", "").await;
        let fits = js(
            &c,
            "return [document.documentElement.scrollWidth, window.innerWidth]",
        )
        .await;
        let (wide, screen) = (fits[0].as_u64().unwrap(), fits[1].as_u64().unwrap());
        assert!(screen <= 400, "the window is {screen} px wide");
        assert!(
            wide <= screen,
            "{path} is {wide} px wide on a {screen} px screen"
        );
    }
    c.goto(&format!("{base}/ui/sagas/order-HOLD-1"))
        .await
        .unwrap();
    until_text(&c, ".saga-head", "CANCELLED").await;
    shot(&c, "saga-390px.png").await;

    c.close().await.unwrap();
    node.shutdown().await.unwrap();
}
