//! `[leaks]`: the thresholds of the leak and slow-acquire rules.

use serde::{Deserialize, Serialize};

use crate::config_types::{Bounded, Duration, Seconds, MILLI, SECOND};

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

/// `[pool_health]`: the thresholds of `/api/v1/health` and `poolscope
/// health` (detect::pool_health).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [pool_health]")]
pub struct PoolHealthConfig {
    /// Percent of `max` in use from which a pool is a warning.
    pub warning_utilization_percent: Bounded<u8, 1, 100>,
    /// Percent of `max` in use from which a pool is critical.
    pub critical_utilization_percent: Bounded<u8, 1, 100>,
    /// A request waiting this long for a connection makes a warning.
    pub long_wait_ms: Threshold<MILLI>,
    /// How far back acquire timeouts (critical) and errors (a warning) count.
    pub recent_seconds: Seconds<SECOND, { 24 * 3600 * SECOND }>,
}

impl Default for PoolHealthConfig {
    fn default() -> Self {
        Self {
            warning_utilization_percent: Bounded::new(80),
            critical_utilization_percent: Bounded::new(90),
            long_wait_ms: Threshold::new(1000),
            recent_seconds: Seconds::new(300),
        }
    }
}

impl PoolHealthConfig {
    pub fn thresholds(&self) -> super::pool_health::HealthThresholds {
        super::pool_health::HealthThresholds {
            warning_utilization: f64::from(self.warning_utilization_percent.get()) / 100.0,
            critical_utilization: f64::from(self.critical_utilization_percent.get()) / 100.0,
            long_wait_ns: self.long_wait_ms.as_nanos(),
            recent_ns: self.recent_seconds.as_nanos(),
        }
    }
}

/// `[sizing]`: how far back `/api/v1/sizing` and `poolscope sizing` look,
/// and how often pools are sampled for it (detect::sizing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [sizing]")]
pub struct SizingConfig {
    /// The window advice rests on.
    pub window_seconds: Seconds<{ 10 * SECOND }, { 7 * 24 * 3600 * SECOND }>,
    /// No advice before a pool was sampled this long.
    pub min_observed_seconds: Seconds<SECOND, { 7 * 24 * 3600 * SECOND }>,
    /// How often each pool's use is sampled.
    pub sample_seconds: Seconds<SECOND, { 60 * SECOND }>,
}

impl Default for SizingConfig {
    fn default() -> Self {
        Self {
            window_seconds: Seconds::new(3600),
            min_observed_seconds: Seconds::new(600),
            sample_seconds: Seconds::new(5),
        }
    }
}

impl SizingConfig {
    pub fn window(&self) -> super::sizing::SizingWindow {
        super::sizing::SizingWindow {
            window_ns: self.window_seconds.as_nanos(),
            min_observed_ns: self.min_observed_seconds.as_nanos(),
        }
    }
}
