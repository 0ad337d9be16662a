//! `[leaks]`: the thresholds of the leak and slow-acquire rules.

use serde::{Deserialize, Serialize};

use crate::config_types::{Duration, MILLI, SECOND};

/// A century, the longest threshold: a rule is "turned off" with a huge
/// one (say `1e9` seconds), and the detectors add thresholds to clock
/// readings, which a century cannot overflow.
const CENTURY: u64 = 100 * 365 * 24 * 3600 * SECOND;

/// A rule's threshold, from zero to a century.
pub type Threshold<const UNIT: u64> = Duration<UNIT, 0, CENTURY>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [leaks]")]
pub struct LeaksConfig {
    /// Checked out longer than this: leaked if quiet, a slow holder if busy.
    pub leak_threshold_seconds: Threshold<SECOND>,
    /// No traffic for this long counts as quiet.
    pub quiet_seconds: Threshold<SECOND>,
    /// An open transaction quiet for this long.
    pub idle_in_transaction_seconds: Threshold<SECOND>,
    /// The server hung up this long ago and the fd is still open.
    pub close_wait_seconds: Threshold<SECOND>,
    /// Quiet this long while the process opens newer connections to the same server.
    pub abandoned_seconds: Threshold<SECOND>,
    /// Pool acquires that wait longer than this are reported.
    pub slow_acquire_ms: Threshold<MILLI>,
    /// Resolved reports kept in memory.
    pub max_resolved_kept: usize,
}

impl Default for LeaksConfig {
    fn default() -> Self {
        Self {
            leak_threshold_seconds: Threshold::new(30),
            quiet_seconds: Threshold::new(5),
            idle_in_transaction_seconds: Threshold::new(30),
            close_wait_seconds: Threshold::new(10),
            abandoned_seconds: Threshold::new(300),
            slow_acquire_ms: Threshold::new(1000),
            max_resolved_kept: 1000,
        }
    }
}

impl LeaksConfig {
    pub fn thresholds(&self) -> super::Thresholds {
        super::Thresholds {
            leak_ns: self.leak_threshold_seconds.as_nanos(),
            quiet_ns: self.quiet_seconds.as_nanos(),
            idle_in_transaction_ns: self.idle_in_transaction_seconds.as_nanos(),
            close_wait_ns: self.close_wait_seconds.as_nanos(),
            abandoned_ns: self.abandoned_seconds.as_nanos(),
            slow_acquire_ns: self.slow_acquire_ms.as_nanos(),
        }
    }
}
