//! The cluster's clock: every node times sagas by the NATS server's clock, not its own.
//!
//! A saga's due times (step timeouts, retry times, its deadline) are absolute times in its
//! snapshot, written by whichever node applies a transition: the node that created the saga,
//! then its owner, then the next owner after a take-over. If those nodes' clocks disagree, a
//! step times out early (its deadline was set by a node behind the owner) or late. So each
//! node estimates how far its clock is from the server's and corrects by that.
//!
//! The estimate comes from the membership heartbeats: every heartbeat is a KV write, and its
//! entry carries the time the server stored it. The node notes its own clock just before the
//! write and just after its acknowledgement; the server's time lies in between, so the offset
//! is the server's time minus the midpoint, with an error of at most half the round trip. Of
//! the last [`SAMPLES`] estimates the one with the shortest round trip is used (queueing only
//! ever adds delay). Before the first estimate the offset is 0: the node's own clock.
//!
//! In a cluster of NATS servers each stream's leader stamps its messages: keep the servers'
//! clocks synchronized (NTP), as any replicated store needs. The nodes' own clocks then do not
//! matter beyond the round trip.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// Estimates kept; the one with the shortest round trip wins.
pub const SAMPLES: usize = 16;

/// Unix milliseconds now, by this machine's clock (see [`ClusterClock`] for the cluster's).
pub use sagaflow_participant::now_ms;

/// This node's view of the cluster's time (see the module doc).
#[derive(Debug, Default)]
pub struct ClusterClock {
    /// Milliseconds added to the wall clock by configuration (tests simulate a skewed node).
    configured: i64,
    /// The current estimate of server time minus this node's (configured) clock, ms.
    offset: AtomicI64,
    /// (round trip, offset) of the last estimates.
    samples: Mutex<VecDeque<(i64, i64)>>,
}

impl ClusterClock {
    /// A clock `configured_offset_ms` off this machine's wall clock until the first estimate.
    pub fn new(configured_offset_ms: i64) -> Self {
        ClusterClock {
            configured: configured_offset_ms,
            ..ClusterClock::default()
        }
    }

    /// This node's own clock (the wall clock plus the configured offset), unix ms.
    pub fn local_ms(&self) -> i64 {
        now_ms() + self.configured
    }

    /// The cluster's time: this node's clock corrected by the estimated offset, unix ms.
    pub fn now_ms(&self) -> i64 {
        self.local_ms() + self.offset.load(Ordering::Relaxed)
    }

    /// The estimated offset of the server's clock from this node's, ms.
    pub fn offset_ms(&self) -> i64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// A write sent at local time `sent` and acknowledged at `acked` was stamped `server` by
    /// the server (all unix ms).
    pub fn observe(&self, sent: i64, acked: i64, server: i64) {
        if acked < sent {
            return;
        }
        let round_trip = acked - sent;
        let offset = server - (sent + (acked - sent) / 2);
        let Ok(mut samples) = self.samples.lock() else {
            return;
        };
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back((round_trip, offset));
        if let Some((_, best)) = samples.iter().min_by_key(|(rtt, _)| *rtt) {
            self.offset.store(*best, Ordering::Relaxed);
        }
    }
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC); `-` for 0.
pub fn format_ms(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_string();
    }
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_servers_time_against_the_midpoint_of_the_fastest_round_trip() {
        let clock = ClusterClock::new(-30_000);
        assert_eq!(clock.offset_ms(), 0);
        // The server runs 30 s ahead of this (skewed) node.
        clock.observe(1_000, 1_010, 31_004);
        assert_eq!(clock.offset_ms(), 29_999);
        // A slow round trip does not displace a fast one...
        clock.observe(2_000, 2_400, 32_390);
        assert_eq!(clock.offset_ms(), 29_999);
        // ...a faster one does.
        clock.observe(3_000, 3_002, 33_001);
        assert_eq!(clock.offset_ms(), 30_000);
        let local = clock.local_ms();
        let cluster = clock.now_ms();
        assert!((cluster - local - 30_000).abs() <= 5, "{cluster} {local}");
        // An acknowledgement before the send (a clock step) is ignored.
        clock.observe(5_000, 4_000, 0);
        assert_eq!(clock.offset_ms(), 30_000);
    }

    #[test]
    fn old_estimates_age_out() {
        let clock = ClusterClock::new(0);
        clock.observe(0, 0, 500);
        for i in 1..=SAMPLES as i64 {
            clock.observe(i * 100, i * 100 + 4, i * 100 + 2 + 7);
        }
        assert_eq!(clock.offset_ms(), 7, "the 0 ms round trip has aged out");
    }
}
