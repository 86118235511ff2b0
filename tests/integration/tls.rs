//! gRPC over TLS: the CLI reaches a node over `https://` with `--ca`, fails clearly without it
//! or over plain HTTP, follows a certificate replaced on disk without a restart, and presents a
//! client certificate to a node that requires one. Certificates come from `openssl`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::certs::gen_certs;
use common::*;
use sagaflow::auth::sha256_hex;

/// `sagaflow cluster status ARGS` with the reader's token; (success, stdout + stderr).
async fn status(args: Vec<String>) -> (bool, String) {
    sagaflow(["cluster", "status"], args, Some("secret-of-rita")).await
}

/// `sagaflow COMMAND ARGS` with `token` in SAGAFLOW_TOKEN; (success, stdout + stderr).
async fn sagaflow<const N: usize>(
    command: [&'static str; N],
    args: Vec<String>,
    token: Option<&'static str>,
) -> (bool, String) {
    let out: Output = within(
        Duration::from_secs(60),
        "sagaflow cluster status",
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
            cmd.args(command).args(&args).env_remove("SAGAFLOW_TOKEN");
            if let Some(t) = token {
                cmd.env("SAGAFLOW_TOKEN", t);
            }
            cmd.output().unwrap()
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn args(server: &str, extra: &[&Path]) -> Vec<String> {
    let mut v = vec!["--server".to_string(), server.to_string()];
    let mut flags = ["--ca", "--cert", "--key"].iter();
    for path in extra {
        v.push(flags.next().unwrap().to_string());
        v.push(path.display().to_string());
    }
    v
}

fn p(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_a_tls_node_and_follows_a_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The first set from the script users run (scripts/gen-certs.sh): ca, node, client.
    gen_certs(d);
    std::fs::write(
        p(d, "tokens.toml"),
        format!(
            "[[token]]\nname = \"rita\"\nrole = \"reader\"\nsha256 = \"{}\"\n",
            sha256_hex("secret-of-rita")
        ),
    )
    .unwrap();
    // The node reads its certificate from these two files, replaced below.
    std::fs::copy(p(d, "node.crt"), p(d, "serving.crt")).unwrap();
    std::fs::copy(p(d, "node.key"), p(d, "serving.key")).unwrap();

    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("tls-1")
        .partitions(2)
        .env("SAGAFLOW_TLS__CERT", p(d, "serving.crt").to_str().unwrap())
        .env("SAGAFLOW_TLS__KEY", p(d, "serving.key").to_str().unwrap())
        .env(
            "SAGAFLOW_AUTH__TOKENS",
            p(d, "tokens.toml").to_str().unwrap(),
        )
        .start()
        .await
        .unwrap();
    let https = format!("https://{}", node.grpc_addr);
    let plain = node.grpc_addr.to_string();

    let (ok, text) = status(args(&https, &[&p(d, "ca.crt")])).await;
    assert!(ok, "{text}");
    assert!(text.contains("tls-1"), "{text}");
    // Without the CA the system roots do not know it; plain HTTP is not spoken.
    let (ok, text) = status(args(&https, &[])).await;
    assert!(!ok && text.contains("cannot reach sagaflow node"), "{text}");
    assert!(text.contains("--ca"), "{text}");
    let (ok, text) = status(args(&plain, &[])).await;
    assert!(!ok, "{text}");
    // --ca with a plain address is a mistake worth saying.
    let (ok, text) = status(args(&plain, &[&p(d, "ca.crt")])).await;
    assert!(!ok && text.contains("https://"), "{text}");

    // A new certificate from another CA, written over the old one: picked up without a
    // restart.
    let second = d.join("second");
    gen_certs(&second);
    std::fs::copy(p(&second, "node.key"), p(d, "serving.key.new")).unwrap();
    std::fs::copy(p(&second, "node.crt"), p(d, "serving.crt.new")).unwrap();
    std::fs::rename(p(d, "serving.key.new"), p(d, "serving.key")).unwrap();
    std::fs::rename(p(d, "serving.crt.new"), p(d, "serving.crt")).unwrap();
    let ca2 = p(&second, "ca.crt");
    let https2 = https.clone();
    wait_until(
        Duration::from_secs(30),
        "the new certificate served",
        || {
            let (https, ca2) = (https2.clone(), ca2.clone());
            async move { status(args(&https, &[&ca2])).await.0 }
        },
    )
    .await
    .unwrap();
    let (ok, text) = status(args(&https, &[&p(d, "ca.crt")])).await;
    assert!(!ok, "the first CA no longer verifies the node: {text}");
    node.shutdown().await.unwrap();

    // Mutual TLS: a node that requires client certificates signed by the first CA.
    let node = TestNode::on(&nats)
        .id("tls-2")
        .partitions(2)
        .env("SAGAFLOW_TLS__CERT", p(d, "node.crt").to_str().unwrap())
        .env("SAGAFLOW_TLS__KEY", p(d, "node.key").to_str().unwrap())
        .env("SAGAFLOW_TLS__CLIENT_CA", p(d, "ca.crt").to_str().unwrap())
        .env(
            "SAGAFLOW_AUTH__TOKENS",
            p(d, "tokens.toml").to_str().unwrap(),
        )
        // The certificate `client` reads without a token.
        .env(
            "SAGAFLOW_AUTH__CERTIFICATE",
            r#"[{ common_name = "client", role = "reader", name = "ci-bot" }]"#,
        )
        .start()
        .await
        .unwrap();
    let https = format!("https://{}", node.grpc_addr);
    let (ok, text) = status(args(&https, &[&p(d, "ca.crt")])).await;
    assert!(!ok, "no client certificate: {text}");
    let (ok, text) = status(args(
        &https,
        &[&p(d, "ca.crt"), &p(d, "client.crt"), &p(d, "client.key")],
    ))
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("tls-2"), "{text}");
    // The certificate alone gives its role: reading works, placing an order does not.
    let with_cert = args(
        &https,
        &[&p(d, "ca.crt"), &p(d, "client.crt"), &p(d, "client.key")],
    );
    let (ok, text) = sagaflow(["cluster", "status"], with_cert.clone(), None).await;
    assert!(ok, "{text}");
    let mut place = with_cert;
    place.extend(
        [
            "--order-id",
            "c-1",
            "--customer",
            "c",
            "--amount",
            "100",
            "--item",
            "SKU-1:1",
        ]
        .map(String::from),
    );
    let (ok, text) = sagaflow(["order", "place"], place, None).await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("`ci-bot` has role reader") && text.contains("needs role client"),
        "{text}"
    );
    node.shutdown().await.unwrap();
}
