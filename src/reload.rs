//! Reading files again without a restart: on `SIGHUP`, and when one of them changes on disk
//! (its modification time or length, polled). Tokens and certificates use it, so they can be
//! rotated on a running node.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// How often the files are checked for changes.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

type Fingerprint = Vec<Option<(SystemTime, u64)>>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Calls `reload` on every `SIGHUP` and whenever one of `paths` changes (checked every
/// `every`), until `stop`. `reload` logs its own outcome.
pub fn watch(
    what: &'static str,
    paths: Vec<PathBuf>,
    every: Duration,
    stop: CancellationToken,
    reload: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, what, "no SIGHUP reload: cannot listen for the signal");
                None
            }
        };
        let mut seen = fingerprint(&paths);
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hangup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<()>();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = signalled => {
                    tracing::info!(what, "SIGHUP: reloading");
                    seen = fingerprint(&paths);
                    reload();
                }
                _ = tokio::time::sleep(every) => {
                    let now = fingerprint(&paths);
                    if now != seen {
                        seen = now;
                        tracing::info!(what, "changed on disk: reloading");
                        reload();
                    }
                }
            }
        }
    })
}
