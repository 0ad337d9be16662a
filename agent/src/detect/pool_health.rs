//! Pool health: `ok`, `warning` or `critical` per pool, with the reasons,
//! from what the tracker and the leak reports know now. Pure: the pools'
//! views and activity in, verdicts out (`/api/v1/health`, `poolscope
//! health`).
//!
//! The rules (thresholds in `[pool_health]`):
//! - `utilization`: used / max at or above `critical_utilization_percent`
//!   (90) is critical, at or above `warning_utilization_percent` (80) a
//!   warning (pools whose max is known);
//! - `exhausted`: every connection in use and requests waiting: critical;
//! - `long_wait`: a request has waited `long_wait_ms` (1000) or more: a
//!   warning;
//! - `no_idle`: nothing idle while connections are in use, in a pool that
//!   keeps idle ones (`min_idle` above 0) or has requests waiting: the next
//!   acquire waits or opens a connection: a warning;
//! - `acquire_timeouts`: acquires that timed out within `recent_seconds`
//!   (300): critical;
//! - `acquire_errors`: acquires that failed (the pool could not connect,
//!   mostly) within `recent_seconds`: a warning;
//! - `open_leaks`: open leak reports on the pool's connections (leaked,
//!   held too long, idle in a transaction, close-wait, abandoned): a
//!   warning.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::LeakKind;
pub use crate::lifecycle::PoolActivity;
use crate::lifecycle::PoolView;

/// A pool's verdict; ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }
}

/// The thresholds of the rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthThresholds {
    /// Used / max from which a pool is a warning (0..=1).
    pub warning_utilization: f64,
    /// Used / max from which a pool is critical (0..=1).
    pub critical_utilization: f64,
    /// A request waiting this long makes a warning.
    pub long_wait_ns: u64,
    /// How far back acquire timeouts and errors count.
    pub recent_ns: u64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        HealthThresholds {
            warning_utilization: 0.8,
            critical_utilization: 0.9,
            long_wait_ns: 1_000_000_000,
            recent_ns: 300_000_000_000,
        }
    }
}

/// One reason a pool is not `ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// `utilization`, `exhausted`, `long_wait`, `no_idle`,
    /// `acquire_timeouts`, `acquire_errors` or `open_leaks`.
    pub rule: String,
    pub status: Status,
    /// In words, with the numbers.
    pub detail: String,
}

/// One pool's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolHealth {
    pub pid: u32,
    pub process: String,
    pub pool: String,
    /// false for pools inferred from traffic (no adapter).
    pub from_adapter: bool,
    pub status: Status,
    pub reasons: Vec<Reason>,
    pub used: u64,
    pub idle: u64,
    pub max: Option<u32>,
    pub pending: u64,
    /// used / max, when max is known.
    pub utilization: Option<f64>,
}

/// Every pool's verdict and the worst of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// The worst pool's status; `ok` when there is no pool.
    pub status: Status,
    pub pools: Vec<PoolHealth>,
}

impl HealthResponse {
    pub fn new(pools: Vec<PoolHealth>) -> HealthResponse {
        let status = pools.iter().map(|p| p.status).max().unwrap_or(Status::Ok);
        HealthResponse { status, pools }
    }
}

fn secs(ns: u64) -> String {
    format!("{:.1} s", ns as f64 / 1e9)
}

fn window(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// Open leak reports per pool, keyed as the views are: adapter pools by
/// (pid, pool name); a report on a connection without a pool by (pid,
/// server), which is what names the pool inferred from its traffic.
#[derive(Debug, Default)]
pub struct OpenLeaks {
    by_pool: HashMap<(u32, String), u64>,
    by_server: HashMap<(u32, String), u64>,
}

/// What pool health needs of one open leak report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLeak<'a> {
    pub pid: u32,
    pub kind: LeakKind,
    pub pool: Option<&'a str>,
    pub server: Option<&'a str>,
}

impl OpenLeaks {
    pub fn count<'a>(reports: impl Iterator<Item = OpenLeak<'a>>) -> OpenLeaks {
        let mut open = OpenLeaks::default();
        for r in reports.filter(|r| r.kind.is_leak()) {
            let key = match (r.pool, r.server) {
                (Some(pool), _) => (&mut open.by_pool, pool),
                (None, Some(server)) => (&mut open.by_server, server),
                (None, None) => continue,
            };
            *key.0.entry((r.pid, key.1.to_string())).or_default() += 1;
        }
        open
    }

    fn of(&self, view: &PoolView) -> u64 {
        if view.from_adapter {
            return self
                .by_pool
                .get(&(view.pid, view.name.clone()))
                .copied()
                .unwrap_or(0);
        }
        view.server
            .as_ref()
            .and_then(|s| self.by_server.get(&(view.pid, s.clone())))
            .copied()
            .unwrap_or(0)
    }
}

/// The verdict of one pool.
pub fn assess(
    view: &PoolView,
    activity: &PoolActivity,
    open_leaks: u64,
    t: &HealthThresholds,
) -> PoolHealth {
    let mut reasons = Vec::new();
    let mut add = |rule: &str, status: Status, detail: String| {
        reasons.push(Reason {
            rule: rule.to_string(),
            status,
            detail,
        })
    };
    let max = view.max.filter(|m| *m > 0);
    let utilization = max.map(|m| view.used as f64 / f64::from(m));
    if let (Some(u), Some(m)) = (utilization, max) {
        let (status, limit) = if u >= t.critical_utilization {
            (Some(Status::Critical), t.critical_utilization)
        } else if u >= t.warning_utilization {
            (Some(Status::Warning), t.warning_utilization)
        } else {
            (None, 0.0)
        };
        if let Some(status) = status {
            add(
                "utilization",
                status,
                format!(
                    "{} of {m} connections in use ({:.0} %, at or above {:.0} %)",
                    view.used,
                    u * 100.0,
                    limit * 100.0
                ),
            );
        }
        if view.used >= u64::from(m) && view.pending > 0 {
            add(
                "exhausted",
                Status::Critical,
                format!(
                    "all {m} connections in use and {} request{} waiting",
                    view.pending,
                    if view.pending == 1 { "" } else { "s" }
                ),
            );
        }
    }
    if let Some(waited) = activity.longest_wait_ns.filter(|w| *w >= t.long_wait_ns) {
        add(
            "long_wait",
            Status::Warning,
            format!(
                "a request has waited {} for a connection ({} waiting; threshold {})",
                secs(waited),
                view.pending,
                secs(t.long_wait_ns)
            ),
        );
    }
    let keeps_idle = view.min_idle.is_some_and(|m| m > 0);
    if view.idle == 0 && view.used > 0 && (keeps_idle || view.pending > 0) {
        add(
            "no_idle",
            Status::Warning,
            format!(
                "no idle connection ({} in use{}): the next acquire waits or opens one",
                view.used,
                match view.min_idle {
                    Some(m) if m > 0 => format!(", min idle {m}"),
                    _ => String::new(),
                }
            ),
        );
    }
    let floor = if activity.saturated { "at least " } else { "" };
    if activity.recent_timeouts > 0 {
        add(
            "acquire_timeouts",
            Status::Critical,
            format!(
                "{floor}{} acquire{} timed out in the last {}",
                activity.recent_timeouts,
                if activity.recent_timeouts == 1 {
                    ""
                } else {
                    "s"
                },
                window(t.recent_ns)
            ),
        );
    }
    if activity.recent_errors > 0 {
        add(
            "acquire_errors",
            Status::Warning,
            format!(
                "{floor}{} acquire{} failed (no connection could be made) in the last {}",
                activity.recent_errors,
                if activity.recent_errors == 1 { "" } else { "s" },
                window(t.recent_ns)
            ),
        );
    }
    if open_leaks > 0 {
        add(
            "open_leaks",
            Status::Warning,
            format!(
                "{open_leaks} open leak report{} on its connections (poolscope leaks)",
                if open_leaks == 1 { "" } else { "s" }
            ),
        );
    }
    // Worst first, so that the first reason says why the status is what it is.
    reasons.sort_by_key(|r| std::cmp::Reverse(r.status));
    PoolHealth {
        pid: view.pid,
        process: view.process.clone(),
        pool: view.name.clone(),
        from_adapter: view.from_adapter,
        status: reasons.first().map_or(Status::Ok, |r| r.status),
        reasons,
        used: view.used,
        idle: view.idle,
        max: view.max,
        pending: view.pending,
        utilization,
    }
}

/// Every pool's verdict. `activity` is keyed by (pid, pool name); pools
/// without an entry (inferred ones) have no waits or failures to tell.
pub fn assess_all(
    views: &[PoolView],
    activity: &HashMap<(u32, String), PoolActivity>,
    open_leaks: &OpenLeaks,
    t: &HealthThresholds,
) -> HealthResponse {
    let none = PoolActivity::default();
    let pools = views
        .iter()
        .map(|v| {
            let act = activity.get(&(v.pid, v.name.clone())).unwrap_or(&none);
            assess(v, act, open_leaks.of(v), t)
        })
        .collect();
    HealthResponse::new(pools)
}

#[cfg(test)]
#[path = "pool_health_tests.rs"]
mod tests;
