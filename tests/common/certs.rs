//! Test certificates from the script users run, `scripts/gen-certs.sh` (openssl, installed
//! by `.ci/run`): a CA, a node certificate for 127.0.0.1 and a client certificate.

use std::path::Path;

/// Runs `scripts/gen-certs.sh DIR`: `ca.crt`/`ca.key`, `node.crt`/`node.key` (127.0.0.1,
/// localhost) and `client.crt`/`client.key` (CN `client`) in `dir`, each set its own CA.
pub fn gen_certs(dir: &Path) {
    let out = std::process::Command::new("bash")
        .arg(super::repo_dir().join("scripts/gen-certs.sh"))
        .arg(dir)
        .output()
        .expect("bash and openssl (installed by .ci/run)");
    assert!(out.status.success(), "gen-certs.sh: {out:?}");
}
