//! Backoff of supervised restarts: a crashed saga actor or coordinator child is restarted
//! after `50ms × 2^(consecutive failures - 1)`, capped at 5 s. (The pools of participant
//! instances live in the `sagaflow-participant` crate, with the same policy; this crate stays
//! free of NATS.)

use std::time::Duration;

const BASE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Backoff before respawning an actor that failed `failures` times in a row.
pub fn restart_backoff(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(16))
        .unwrap_or(u32::MAX);
    BASE_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(restart_backoff(1), Duration::from_millis(50));
        assert_eq!(restart_backoff(2), Duration::from_millis(100));
        assert_eq!(restart_backoff(4), Duration::from_millis(400));
        assert_eq!(restart_backoff(30), MAX_BACKOFF);
    }
}
