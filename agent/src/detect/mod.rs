//! Leak rules over the tracker's connections. Pure: connections and `now`
//! in, findings out; the reports store turns findings into open and resolved
//! reports.

pub mod config;
pub mod pool_health;
pub mod sizing;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{
    lifecycle::{ConnId, ConnState, Connection, Endpoint},
    protocol::TxState,
};

/// Thresholds of the rules, nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Checked out longer than this: a leak (quiet) or a slow holder (busy).
    pub leak_ns: u64,
    /// No traffic for this long counts as quiet.
    pub quiet_ns: u64,
    /// Open transaction with no traffic for this long.
    pub idle_in_transaction_ns: u64,
    /// Server hung up this long ago and the fd is still open.
    pub close_wait_ns: u64,
    /// Quiet this long while its process opened newer connections to the
    /// same server.
    pub abandoned_ns: u64,
    /// Acquires that waited longer than this.
    pub slow_acquire_ns: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            leak_ns: 30_000_000_000,
            quiet_ns: 5_000_000_000,
            idle_in_transaction_ns: 30_000_000_000,
            close_wait_ns: 10_000_000_000,
            abandoned_ns: 300_000_000_000,
            slow_acquire_ns: 1_000_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakKind {
    /// Checked out too long and quiet: nobody is using it.
    Leaked,
    /// Checked out too long but busy: a long job, not a leak.
    SlowHolder,
    /// A transaction left open with no traffic.
    IdleInTransaction,
    /// The server hung up and the process never closed the fd.
    CloseWait,
    /// Quiet for long while the process keeps opening new connections to
    /// the same server: a pool would have reused it.
    Abandoned,
    /// An acquire waited too long (an event, resolved at once).
    SlowAcquire,
    /// Checked out too long, on a connection the agent knows only by its
    /// adapter's word: no socket, so quiet (a leak) and busy (a long job)
    /// cannot be told apart.
    HeldTooLong,
}

impl LeakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakKind::Leaked => "leaked",
            LeakKind::SlowHolder => "slow_holder",
            LeakKind::IdleInTransaction => "idle_in_transaction",
            LeakKind::CloseWait => "close_wait",
            LeakKind::Abandoned => "abandoned",
            LeakKind::SlowAcquire => "slow_acquire",
            LeakKind::HeldTooLong => "held_too_long",
        }
    }

    /// Whether this kind is a leak (slow holders and slow acquires are not).
    pub fn is_leak(self) -> bool {
        !matches!(self, LeakKind::SlowHolder | LeakKind::SlowAcquire)
    }
}

/// One rule matching one connection now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: LeakKind,
    pub conn: ConnId,
    /// Why, in words a person can check.
    pub evidence: String,
}

fn secs(ns: u64) -> String {
    format!("{:.1}s", ns as f64 / 1e9)
}

/// Time since the last traffic, or since `fallback` when there was none.
fn quiet_for(conn: &Connection, fallback: u64, now: u64) -> u64 {
    now.saturating_sub(conn.last_activity_ns.unwrap_or(fallback).max(fallback))
}

/// Applies every rule to the open connections. At most one finding per
/// connection: the most specific rule wins (an open transaction says more
/// than "checked out and quiet").
pub fn evaluate<'a>(
    connections: impl Iterator<Item = &'a Connection>,
    now: u64,
    t: &Thresholds,
) -> Vec<Finding> {
    let open: Vec<&Connection> = connections.filter(|c| c.is_open()).collect();
    // Newest connect per (process, server), for the abandoned rule.
    let mut newest: HashMap<(u32, &Endpoint), u64> = HashMap::new();
    for c in open.iter().filter(|c| c.has_socket()) {
        let entry = newest.entry((c.id.pid, &c.remote)).or_insert(0);
        *entry = (*entry).max(c.opened_at_ns);
    }
    let mut findings = Vec::new();
    for c in open {
        if let Some(f) = evaluate_one(c, now, t, newest.get(&(c.id.pid, &c.remote)).copied()) {
            findings.push(f);
        }
    }
    findings.sort_by_key(|f| (f.conn, f.kind));
    findings
}

fn evaluate_one(c: &Connection, now: u64, t: &Thresholds, newest: Option<u64>) -> Option<Finding> {
    let finding = |kind, evidence: String| {
        Some(Finding {
            kind,
            conn: c.id,
            evidence,
        })
    };
    if !c.has_socket() {
        // Only the adapter's word: how long it is out, not what it does.
        let held = now.saturating_sub(c.checked_out_at_ns?);
        if held < t.leak_ns {
            return None;
        }
        return finding(
            LeakKind::HeldTooLong,
            format!(
                "checked out {} ago and not returned; the adapter names this connection without a socket, so there is no kernel evidence to tell a quiet leak from a busy holder",
                secs(held)
            ),
        );
    }
    if c.state == ConnState::PeerClosed {
        let since = c.peer_closed_at_ns.unwrap_or(now);
        if now.saturating_sub(since) >= t.close_wait_ns {
            return finding(
                LeakKind::CloseWait,
                format!(
                    "the server closed the connection {} ago and the process still holds fd {}",
                    secs(now.saturating_sub(since)),
                    c.id.fd
                ),
            );
        }
        return None;
    }
    let quiet = quiet_for(c, c.opened_at_ns, now);
    if matches!(c.tx_state, Some(TxState::InTransaction | TxState::Failed))
        && quiet >= t.idle_in_transaction_ns
    {
        let status = if c.tx_state == Some(TxState::Failed) {
            "a failed transaction"
        } else {
            "a transaction"
        };
        return finding(
            LeakKind::IdleInTransaction,
            format!(
                "{status} is open and the connection has been quiet for {}",
                secs(quiet)
            ),
        );
    }
    if let Some(out_since) = c.checked_out_at_ns {
        let held = now.saturating_sub(out_since);
        if held >= t.leak_ns {
            let quiet_since_checkout = quiet_for(c, out_since, now);
            return if quiet_since_checkout >= t.quiet_ns {
                finding(
                    LeakKind::Leaked,
                    format!(
                        "checked out {} ago, never returned, no traffic for {}",
                        secs(held),
                        secs(quiet_since_checkout)
                    ),
                )
            } else {
                finding(
                    LeakKind::SlowHolder,
                    format!(
                        "checked out {} ago and still busy (last traffic {} ago, {} round trips so far)",
                        secs(held),
                        secs(quiet_since_checkout),
                        c.round_trips
                    ),
                )
            };
        }
        return None;
    }
    // Without an adapter: a quiet connection while the process opened a
    // newer one to the same server after this one went quiet.
    if c.pool.is_none() && c.db_system.is_some() && quiet >= t.abandoned_ns {
        let last = c.last_activity_ns.unwrap_or(c.opened_at_ns);
        if newest.is_some_and(|n| n > last && n != c.opened_at_ns) {
            return finding(
                LeakKind::Abandoned,
                format!(
                    "quiet for {} while the process opened newer connections to {}",
                    secs(quiet),
                    c.remote
                ),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests;
