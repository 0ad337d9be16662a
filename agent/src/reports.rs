//! Bounded stores of notable events, kept in memory for the API, the CLI
//! and the log: slow queries, and leak reports that open when a rule starts
//! to match a connection and resolve when it stops. Pure: the pipeline
//! pushes findings and outputs, the API reads.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    adapter::message::{AcquireResult, HolderStack},
    clock::Clock,
    detect::{pool_health::OpenLeak, Finding, LeakKind},
    lifecycle::{ConnId, ConnState, Connection, Endpoint, Output},
    protocol::{DbError, SystemName, TxState},
};

/// A round trip that took longer than the slow-query threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowQuery {
    pub at: String,
    pub pid: u32,
    pub process: String,
    pub fd: i32,
    pub generation: u64,
    pub db_system: String,
    pub server: String,
    pub namespace: Option<String>,
    pub operation: Option<String>,
    /// Sanitized unless raw queries were enabled.
    pub query: Option<String>,
    pub duration_seconds: f64,
    pub error: Option<DbError>,
    pub rows: Option<u64>,
    pub tx_state: Option<TxState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlowQueriesResponse {
    pub threshold_seconds: f64,
    pub slow_queries: Vec<SlowQuery>,
}

#[derive(Debug)]
pub struct Reports {
    slow_threshold_ns: u64,
    max_kept: usize,
    slow_queries: VecDeque<SlowQuery>,
}

impl Reports {
    pub fn new(slow_threshold_ns: u64, max_kept: usize) -> Reports {
        Reports {
            slow_threshold_ns,
            max_kept,
            slow_queries: VecDeque::new(),
        }
    }

    pub fn slow_threshold_ns(&self) -> u64 {
        self.slow_threshold_ns
    }

    /// Keeps what deserves a report; returns the new reports.
    pub fn observe(&mut self, outputs: &[Output], clock: &Clock) -> Vec<SlowQuery> {
        let mut new = Vec::new();
        for output in outputs {
            let Output::RoundTrip {
                id,
                comm,
                remote,
                system,
                trip,
            } = output
            else {
                continue;
            };
            let duration = trip.end_ns.saturating_sub(trip.start_ns);
            if duration < self.slow_threshold_ns {
                continue;
            }
            let report = SlowQuery {
                at: clock.rfc3339(trip.end_ns),
                pid: id.pid,
                process: comm.clone(),
                fd: id.fd,
                generation: id.generation,
                db_system: system.as_str().to_string(),
                server: endpoint_text(remote),
                namespace: trip.namespace.clone(),
                operation: trip.operation.clone(),
                query: trip.query_text(),
                duration_seconds: duration as f64 / 1e9,
                error: trip.error.clone(),
                rows: trip.rows,
                tx_state: trip.tx_state,
            };
            if self.slow_queries.len() >= self.max_kept {
                self.slow_queries.pop_front();
            }
            self.slow_queries.push_back(report.clone());
            new.push(report);
        }
        new
    }

    /// Newest first.
    pub fn slow_queries(&self) -> Vec<SlowQuery> {
        self.slow_queries.iter().rev().cloned().collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    Open,
    Resolved,
}

/// One leak (or slow-holder, or slow-acquire) report, as the API, the CLI
/// and the log show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeakReport {
    pub id: u64,
    pub kind: LeakKind,
    pub status: ReportStatus,
    pub pid: u32,
    pub process: String,
    pub cmdline: Option<String>,
    pub container_id: Option<String>,
    pub pool: Option<String>,
    pub db_system: Option<SystemName>,
    pub server: Option<String>,
    pub local_address: Option<String>,
    pub fd: Option<i32>,
    pub generation: Option<u64>,
    pub holder_tid: Option<u32>,
    pub holder_thread: Option<String>,
    /// The code that checked the connection out, innermost frame first,
    /// when its adapter sent it (docs/adapter-protocol.md, Holder stacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_stack: Option<Vec<String>>,
    pub connection_opened_at: Option<String>,
    pub checked_out_at: Option<String>,
    pub held_for_seconds: Option<f64>,
    pub last_activity: Option<String>,
    pub last_query: Option<String>,
    pub tx_state: Option<TxState>,
    pub evidence: String,
    pub reported_at: String,
    pub resolved_at: Option<String>,
    pub resolution: Option<String>,
    /// Slow acquires: how long the waiter waited and the pool's state then.
    pub wait_seconds: Option<f64>,
    pub pool_used: Option<u64>,
    pub pool_max: Option<u32>,
    pub pool_pending: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaksResponse {
    pub reports: Vec<LeakReport>,
}

/// What only /proc knows about a process: filled in by the pipeline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessDetails {
    pub cmdline: Option<String>,
    pub container_id: Option<String>,
    pub thread_name: Option<String>,
}

/// A change of the leak reports, for the log and the counters.
#[derive(Debug, Clone, PartialEq)]
pub enum LeakChange {
    Opened(LeakReport),
    Resolved(LeakReport),
}

impl LeakChange {
    /// The process the report is about.
    pub fn pid(&self) -> u32 {
        match self {
            LeakChange::Opened(r) | LeakChange::Resolved(r) => r.pid,
        }
    }
}

/// Open reports by (connection, kind), and the recently resolved ones.
#[derive(Debug)]
pub struct LeakReports {
    next_id: u64,
    open: HashMap<(ConnId, LeakKind), LeakReport>,
    resolved: VecDeque<LeakReport>,
    /// Resolved reports kept per process, for fair eviction.
    resolved_per_pid: HashMap<u32, usize>,
    max_resolved: usize,
}

fn endpoint_text(remote: &Endpoint) -> String {
    match remote {
        Endpoint::Inet(sa) => sa.to_string(),
        Endpoint::Unix(path) | Endpoint::Declared(path) => path.clone(),
    }
}

/// Why a report stopped matching, from what the connection does now.
fn resolution(kind: LeakKind, now: Option<&Connection>) -> String {
    let Some(conn) = now.filter(|c| c.is_open()) else {
        return "the connection was closed".into();
    };
    match kind {
        LeakKind::Leaked | LeakKind::SlowHolder | LeakKind::HeldTooLong
            if conn.checked_out_at_ns.is_none() =>
        {
            "returned to the pool".into()
        }
        LeakKind::IdleInTransaction
            if !matches!(
                conn.tx_state,
                Some(TxState::InTransaction | TxState::Failed)
            ) =>
        {
            "the transaction ended".into()
        }
        LeakKind::CloseWait if conn.state != ConnState::PeerClosed => "the fd was closed".into(),
        _ => "traffic resumed".into(),
    }
}

impl LeakReport {
    /// What pool health counts of it.
    pub fn open_leak(&self) -> OpenLeak<'_> {
        OpenLeak {
            pid: self.pid,
            kind: self.kind,
            pool: self.pool.as_deref(),
            server: self.server.as_deref(),
        }
    }
}

impl LeakReports {
    pub fn new(max_resolved: usize) -> LeakReports {
        LeakReports {
            next_id: 1,
            open: HashMap::new(),
            resolved: VecDeque::new(),
            resolved_per_pid: HashMap::new(),
            max_resolved,
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Keeps a resolved report in the bounded history. When it is full, the
    /// oldest report of the process that holds the most goes: one process's
    /// flood of reports (any local user can make its own pool report slow
    /// acquires) replaces its own history, never another's.
    fn keep_resolved(&mut self, report: LeakReport) {
        if self.max_resolved == 0 {
            return;
        }
        if self.resolved.len() >= self.max_resolved {
            let heaviest = self
                .resolved_per_pid
                .iter()
                .max_by_key(|(pid, n)| (**n, std::cmp::Reverse(**pid)))
                .map(|(pid, _)| *pid);
            let at = heaviest
                .and_then(|pid| self.resolved.iter().position(|r| r.pid == pid))
                .unwrap_or(0);
            if let Some(evicted) = self.resolved.remove(at) {
                self.count_resolved(evicted.pid, false);
            }
        }
        self.count_resolved(report.pid, true);
        self.resolved.push_back(report);
    }

    fn count_resolved(&mut self, pid: u32, added: bool) {
        let n = self.resolved_per_pid.entry(pid).or_default();
        if added {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.resolved_per_pid.remove(&pid);
            }
        }
    }

    /// Opens reports for new findings, refreshes the open ones, and
    /// resolves those whose rule no longer matches. `lookup` finds a
    /// connection (open or recently closed); `details` asks /proc.
    pub fn update<'a>(
        &mut self,
        findings: &[Finding],
        lookup: &dyn Fn(ConnId) -> Option<&'a Connection>,
        holder_stack: &dyn Fn(&Connection) -> Option<HolderStack>,
        details: &mut dyn FnMut(u32, Option<u32>) -> ProcessDetails,
        now: u64,
        clock: &Clock,
    ) -> Vec<LeakChange> {
        let mut changes = Vec::new();
        let current: HashMap<(ConnId, LeakKind), &Finding> =
            findings.iter().map(|f| ((f.conn, f.kind), f)).collect();
        let ended: Vec<(ConnId, LeakKind)> = self
            .open
            .keys()
            .filter(|key| !current.contains_key(key))
            .copied()
            .collect();
        for key in ended {
            if let Some(mut report) = self.open.remove(&key) {
                report.status = ReportStatus::Resolved;
                report.resolved_at = Some(clock.rfc3339(now));
                report.resolution = Some(resolution(key.1, lookup(key.0)));
                changes.push(LeakChange::Resolved(report.clone()));
                self.keep_resolved(report);
            }
        }
        for (key, finding) in current {
            let Some(conn) = lookup(key.0) else { continue };
            if let Some(report) = self.open.get_mut(&key) {
                refresh(report, conn, finding, holder_stack, now, clock);
                continue;
            }
            let more = details(conn.id.pid, conn.holder_tid);
            let mut report = LeakReport {
                id: self.take_id(),
                kind: finding.kind,
                status: ReportStatus::Open,
                pid: conn.id.pid,
                process: conn.comm.clone(),
                cmdline: more.cmdline,
                container_id: more.container_id,
                pool: conn.pool.as_deref().map(str::to_string),
                db_system: conn.system(),
                server: Some(endpoint_text(&conn.remote)).filter(|s| !s.is_empty()),
                local_address: conn.local.map(|sa| sa.to_string()),
                // Adapter-only connections have no fd, and the agent's
                // number for them is of no use to anyone.
                fd: Some(conn.id.fd).filter(|_| conn.has_socket()),
                generation: Some(conn.id.generation).filter(|_| conn.has_socket()),
                holder_tid: conn.holder_tid,
                holder_thread: more.thread_name,
                holder_stack: None,
                connection_opened_at: Some(clock.rfc3339(conn.opened_at_ns)),
                checked_out_at: None,
                held_for_seconds: None,
                last_activity: None,
                last_query: None,
                tx_state: None,
                evidence: String::new(),
                reported_at: clock.rfc3339(now),
                resolved_at: None,
                resolution: None,
                wait_seconds: None,
                pool_used: None,
                pool_max: None,
                pool_pending: None,
            };
            refresh(&mut report, conn, finding, holder_stack, now, clock);
            changes.push(LeakChange::Opened(report.clone()));
            self.open.insert(key, report);
        }
        changes
    }

    /// Records slow acquires from the pipeline's outputs; they are events,
    /// reported and resolved at once.
    pub fn observe_acquires(
        &mut self,
        outputs: &[Output],
        threshold_ns: u64,
        details: &mut dyn FnMut(u32, Option<u32>) -> ProcessDetails,
        process_name: &dyn Fn(u32) -> String,
        now: u64,
        clock: &Clock,
    ) -> Vec<LeakChange> {
        let mut changes = Vec::new();
        // The folded checkouts that waited long, as the acquires they were.
        let folded_slow: Vec<Output> = outputs
            .iter()
            .flat_map(|output| match output {
                Output::CheckoutsFolded {
                    pid,
                    pool,
                    waits_ns,
                    used_before,
                    pending_before,
                    max,
                    tid,
                    ..
                } => waits_ns
                    .iter()
                    .filter(|wait_ns| **wait_ns >= threshold_ns)
                    .map(|wait_ns| Output::AcquireFinished {
                        pid: *pid,
                        pool: pool.clone(),
                        wait_ns: *wait_ns,
                        result: AcquireResult::Ok,
                        used_before: *used_before,
                        pending_before: *pending_before,
                        max: *max,
                        tid: *tid,
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        for output in outputs.iter().chain(&folded_slow) {
            let Output::AcquireFinished {
                pid,
                pool,
                wait_ns,
                result,
                used_before,
                pending_before,
                max,
                tid,
            } = output
            else {
                continue;
            };
            if *wait_ns < threshold_ns {
                continue;
            }
            let more = details(*pid, *tid);
            let outcome = match result {
                AcquireResult::Ok => "got a connection",
                AcquireResult::Timeout => "timed out",
                AcquireResult::Error => "failed",
            };
            let max_text = max.map(|m| m.to_string()).unwrap_or_else(|| "?".into());
            let report = LeakReport {
                id: self.take_id(),
                kind: LeakKind::SlowAcquire,
                status: ReportStatus::Resolved,
                pid: *pid,
                process: process_name(*pid),
                cmdline: more.cmdline,
                container_id: more.container_id,
                pool: Some(pool.clone()),
                db_system: None,
                server: None,
                local_address: None,
                fd: None,
                generation: None,
                holder_tid: *tid,
                holder_thread: more.thread_name,
                holder_stack: None,
                connection_opened_at: None,
                checked_out_at: None,
                held_for_seconds: None,
                last_activity: None,
                last_query: None,
                tx_state: None,
                evidence: format!(
                    "waited {:.3}s for a connection with {used_before}/{max_text} in use and {pending_before} waiting",
                    *wait_ns as f64 / 1e9
                ),
                reported_at: clock.rfc3339(now),
                resolved_at: Some(clock.rfc3339(now)),
                resolution: Some(outcome.into()),
                wait_seconds: Some(*wait_ns as f64 / 1e9),
                pool_used: Some(*used_before),
                pool_max: *max,
                pool_pending: Some(*pending_before),
            };
            changes.push(LeakChange::Opened(report.clone()));
            self.keep_resolved(report);
        }
        changes
    }

    /// Open reports first (oldest first), then resolved ones (newest first).
    pub fn reports(&self) -> Vec<LeakReport> {
        let mut open: Vec<LeakReport> = self.open.values().cloned().collect();
        open.sort_by_key(|r| r.id);
        open.extend(self.resolved.iter().rev().cloned());
        open
    }

    pub fn open_reports(&self) -> impl Iterator<Item = &LeakReport> {
        self.open.values()
    }
}

/// Updates what changes while a report stays open.
fn refresh(
    report: &mut LeakReport,
    conn: &Connection,
    finding: &Finding,
    holder_stack: &dyn Fn(&Connection) -> Option<HolderStack>,
    now: u64,
    clock: &Clock,
) {
    if report.holder_stack.is_none() {
        // At the opening, or when the stack came after it (once: a
        // checkout's stack does not change).
        report.holder_stack = holder_stack(conn).map(|s| s.to_vec());
    }
    report.checked_out_at = conn.checked_out_at_ns.map(|ns| clock.rfc3339(ns));
    report.held_for_seconds = conn
        .checked_out_at_ns
        .map(|ns| now.saturating_sub(ns) as f64 / 1e9);
    report.last_activity = conn.last_activity_ns.map(|ns| clock.rfc3339(ns));
    report.last_query = conn.last_query_text();
    report.tx_state = conn.tx_state;
    report.local_address = conn.local.map(|sa| sa.to_string());
    report.pool = conn.pool.as_deref().map(str::to_string);
    report.db_system = conn.system();
    report.evidence.clone_from(&finding.evidence);
}

/// How many report log lines one process may cause per window, and all
/// processes together.
pub const PUBLISH_PER_PROCESS: u32 = 30;
pub const PUBLISH_IN_ALL: u32 = 600;
pub const PUBLISH_WINDOW_NS: u64 = 60_000_000_000;

/// Why a report was kept but not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpublished {
    ProcessBudget,
    GlobalBudget,
}

impl Unpublished {
    pub fn as_str(self) -> &'static str {
        match self {
            Unpublished::ProcessBudget => "process_budget",
            Unpublished::GlobalBudget => "global_budget",
        }
    }
}

/// Rate limits report log lines per process and in all, per window: any
/// local process can make its own pool report thousands of slow acquires,
/// and its flood must neither fill the log nor crowd out others' lines. The
/// reports themselves stay in the API and in OTLP events.
#[derive(Debug, Default)]
pub struct PublishBudget {
    window_start_ns: u64,
    in_all: u32,
    per_process: HashMap<u32, u32>,
    /// Lines held back this window, per process, for one summary line.
    held_back: HashMap<u32, u64>,
}

impl PublishBudget {
    /// Whether a line about process `pid` may go out at `now`. At each new
    /// window, returns (through `summary`) how many were held back in the
    /// last one, per process, so that the log says so once.
    pub fn admit(
        &mut self,
        pid: u32,
        now: u64,
        summary: &mut Vec<(u32, u64)>,
    ) -> Result<(), Unpublished> {
        if now.saturating_sub(self.window_start_ns) >= PUBLISH_WINDOW_NS {
            summary.extend(self.held_back.drain());
            self.window_start_ns = now;
            self.in_all = 0;
            self.per_process.clear();
        }
        let mine = self.per_process.entry(pid).or_default();
        let verdict = if *mine >= PUBLISH_PER_PROCESS {
            Err(Unpublished::ProcessBudget)
        } else if self.in_all >= PUBLISH_IN_ALL {
            Err(Unpublished::GlobalBudget)
        } else {
            *mine += 1;
            self.in_all += 1;
            Ok(())
        };
        if verdict.is_err() {
            *self.held_back.entry(pid).or_default() += 1;
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lifecycle::ConnId,
        protocol::{DbSystem, RoundTrip},
    };

    fn trip(ms: u64) -> Output {
        Output::RoundTrip {
            id: ConnId {
                pid: 1,
                fd: 3,
                generation: 9,
            },
            comm: "app".into(),
            remote: Endpoint::Inet("127.0.0.1:5432".parse().expect("addr")),
            system: DbSystem::Postgresql,
            trip: RoundTrip {
                start_ns: 1_000,
                end_ns: 1_000 + ms * 1_000_000,
                operation: Some("SELECT".into()),
                query: Some(crate::protocol::QueryText::shown_as_is(
                    "SELECT pg_sleep(?)".into(),
                )),
                namespace: Some("db".into()),
                error: None,
                rows: Some(1),
                tx_state: Some(TxState::Idle),
                prepared: false,
            },
        }
    }

    #[test]
    fn keeps_only_slow_round_trips_and_bounds_them() {
        let mut reports = Reports::new(500_000_000, 2);
        let clock = Clock::new();
        assert!(reports.observe(&[trip(10)], &clock).is_empty());
        let new = reports.observe(&[trip(600), trip(700), trip(800)], &clock);
        assert_eq!(new.len(), 3);
        let kept = reports.slow_queries();
        assert_eq!(kept.len(), 2);
        assert!(
            (kept[0].duration_seconds - 0.8).abs() < 1e-9,
            "newest first"
        );
        assert_eq!(kept[0].query.as_deref(), Some("SELECT pg_sleep(?)"));
        assert_eq!(kept[0].server, "127.0.0.1:5432");
    }

    fn leaked_conn(fd: i32, checked_out: bool) -> Connection {
        let mut c = Connection::new(
            ConnId {
                pid: 5,
                fd,
                generation: 1,
            },
            "app".into(),
            Endpoint::Inet("127.0.0.1:5432".parse().expect("addr")),
            1,
        );
        c.state = ConnState::Established;
        c.pool = Some("orders".into());
        c.checked_out_at_ns = checked_out.then_some(2);
        c.holder_tid = Some(77);
        c
    }

    fn finding(c: &Connection, kind: LeakKind) -> Finding {
        Finding {
            kind,
            conn: c.id,
            evidence: "because".into(),
        }
    }

    fn no_stack(_: &Connection) -> Option<HolderStack> {
        None
    }

    #[test]
    fn reports_open_once_refresh_and_resolve_with_the_reason() {
        let clock = Clock::new();
        let mut store = LeakReports::new(10);
        let out = leaked_conn(3, true);
        let asked = std::cell::Cell::new(0);
        let mut details = |_pid: u32, tid: Option<u32>| {
            asked.set(asked.get() + 1);
            ProcessDetails {
                cmdline: Some("python app.py".into()),
                container_id: None,
                thread_name: tid.map(|t| format!("worker-{t}")),
            }
        };
        let findings = vec![finding(&out, LeakKind::Leaked)];
        let changes = store.update(
            &findings,
            &|_| Some(&out),
            &no_stack,
            &mut details,
            10,
            &clock,
        );
        assert!(
            matches!(&changes[..], [LeakChange::Opened(r)] if r.kind == LeakKind::Leaked && r.holder_thread.as_deref() == Some("worker-77") && r.pool.as_deref() == Some("orders") && r.holder_stack.is_none())
        );
        // Still matching: no new report, no new /proc lookup; a holder
        // stack that came after the report opened is added to it.
        let stack: HolderStack = vec!["leaky (app.py:3)".to_string()].into();
        let with_stack = |_: &Connection| Some(stack.clone());
        assert!(store
            .update(
                &findings,
                &|_| Some(&out),
                &with_stack,
                &mut details,
                11,
                &clock
            )
            .is_empty());
        assert_eq!(asked.get(), 1);
        assert_eq!(store.reports().len(), 1);
        assert_eq!(
            store.reports()[0].holder_stack.as_deref(),
            Some(&["leaky (app.py:3)".to_string()][..])
        );
        // Returned to the pool: resolved, saying so, with its stack.
        let back = leaked_conn(3, false);
        let changes = store.update(&[], &|_| Some(&back), &no_stack, &mut details, 12, &clock);
        assert!(
            matches!(&changes[..], [LeakChange::Resolved(r)] if r.resolution.as_deref() == Some("returned to the pool") && r.holder_stack.is_some())
        );
        assert_eq!(store.open_reports().count(), 0);
        assert_eq!(store.reports()[0].status, ReportStatus::Resolved);
    }

    #[test]
    fn closing_resolves_and_resolved_reports_are_bounded() {
        let clock = Clock::new();
        let mut store = LeakReports::new(2);
        let mut details = |_: u32, _: Option<u32>| ProcessDetails::default();
        for fd in 0..4 {
            let c = leaked_conn(fd, true);
            store.update(
                &[finding(&c, LeakKind::Leaked)],
                &|_| Some(&c),
                &no_stack,
                &mut details,
                10,
                &clock,
            );
            let changes = store.update(&[], &|_| None, &no_stack, &mut details, 11, &clock);
            assert!(
                matches!(&changes[..], [LeakChange::Resolved(r)] if r.resolution.as_deref() == Some("the connection was closed"))
            );
        }
        assert_eq!(store.reports().len(), 2);
    }

    #[test]
    fn slow_acquires_carry_the_pool_state() {
        let clock = Clock::new();
        let mut store = LeakReports::new(10);
        let mut details = |_: u32, _: Option<u32>| ProcessDetails::default();
        let outputs = vec![
            Output::AcquireFinished {
                pid: 5,
                pool: "orders".into(),
                wait_ns: 2_000_000_000,
                result: AcquireResult::Ok,
                used_before: 15,
                pending_before: 2,
                max: Some(15),
                tid: Some(9),
            },
            Output::AcquireFinished {
                pid: 5,
                pool: "orders".into(),
                wait_ns: 10,
                result: AcquireResult::Ok,
                used_before: 1,
                pending_before: 1,
                max: Some(15),
                tid: None,
            },
        ];
        let changes = store.observe_acquires(
            &outputs,
            1_000_000_000,
            &mut details,
            &|_| "app".into(),
            5,
            &clock,
        );
        assert_eq!(changes.len(), 1);
        let r = &store.reports()[0];
        assert_eq!(
            (r.kind, r.pool_used, r.pool_max, r.pool_pending),
            (LeakKind::SlowAcquire, Some(15), Some(15), Some(2))
        );
        assert!(
            r.evidence.contains("15/15 in use and 2 waiting"),
            "{}",
            r.evidence
        );
    }

    #[test]
    fn a_folded_checkout_that_waited_long_is_a_slow_acquire() {
        let clock = Clock::new();
        let mut store = LeakReports::new(10);
        let mut details = |_: u32, _: Option<u32>| ProcessDetails::default();
        let outputs = vec![Output::CheckoutsFolded {
            pid: 5,
            pool: "orders".into(),
            waits_ns: vec![10, 3_000_000_000, 20],
            uses_ns: vec![1, 2, 3],
            used_before: 3,
            pending_before: 0,
            max: Some(4),
            tid: Some(9),
        }];
        let changes = store.observe_acquires(
            &outputs,
            1_000_000_000,
            &mut details,
            &|_| "app".into(),
            5,
            &clock,
        );
        assert_eq!(changes.len(), 1, "only the one past the threshold");
        let r = &store.reports()[0];
        assert_eq!(
            (
                r.kind,
                r.wait_seconds,
                r.pool_used,
                r.pool_max,
                r.holder_tid
            ),
            (LeakKind::SlowAcquire, Some(3.0), Some(3), Some(4), Some(9))
        );
        assert_eq!(r.resolution.as_deref(), Some("got a connection"));
    }

    #[test]
    fn a_flood_of_one_process_replaces_its_own_history_only() {
        let clock = Clock::new();
        let mut store = LeakReports::new(100);
        let mut details = |_: u32, _: Option<u32>| ProcessDetails::default();
        let slow = |pid: u32| Output::AcquireFinished {
            pid,
            pool: "p".into(),
            wait_ns: 2_000_000_000,
            result: AcquireResult::Timeout,
            used_before: 1,
            pending_before: 0,
            max: Some(1),
            tid: None,
        };
        let mut observe = |store: &mut LeakReports, outputs: &[Output]| {
            store.observe_acquires(outputs, 1, &mut details, &|_| "app".into(), 5, &clock)
        };
        // Two honest processes, three reports each, then 5,000 from one.
        for pid in [10, 20] {
            observe(&mut store, &[slow(pid), slow(pid), slow(pid)]);
        }
        let flood: Vec<Output> = (0..5_000).map(|_| slow(666)).collect();
        observe(&mut store, &flood);
        let reports = store.reports();
        assert_eq!(reports.len(), 100);
        let of = |pid| reports.iter().filter(|r| r.pid == pid).count();
        assert_eq!((of(10), of(20), of(666)), (3, 3, 94));
        // The honest ones keep their place as the newest flood arrives.
        observe(&mut store, &[slow(666)]);
        assert_eq!(store.reports().iter().filter(|r| r.pid == 10).count(), 3);
    }

    #[test]
    fn publication_is_bounded_per_process_and_in_all_per_window() {
        const S: u64 = 1_000_000_000;
        let mut budget = PublishBudget::default();
        let mut summary = Vec::new();
        let start = 100 * S;
        let admitted = (0..5_000)
            .filter(|_| budget.admit(666, start, &mut summary).is_ok())
            .count();
        assert_eq!(admitted, PUBLISH_PER_PROCESS as usize);
        // Another process still gets its lines out.
        assert_eq!(budget.admit(10, start + S, &mut summary), Ok(()));
        // Many processes together stop at the global bound.
        let admitted = (1_000..2_000)
            .filter(|pid| budget.admit(*pid, start + 2 * S, &mut summary).is_ok())
            .count();
        assert_eq!(
            admitted,
            (PUBLISH_IN_ALL - PUBLISH_PER_PROCESS - 1) as usize
        );
        assert_eq!(
            budget.admit(10, start + 3 * S, &mut summary),
            Err(Unpublished::GlobalBudget)
        );
        assert!(summary.is_empty());
        // A new window: budgets refill, and what was held back is told once.
        assert_eq!(budget.admit(666, start + 61 * S, &mut summary), Ok(()));
        summary.sort_unstable();
        assert_eq!(summary.first(), Some(&(10, 1)));
        assert!(summary.contains(&(666, 5_000 - u64::from(PUBLISH_PER_PROCESS))));
    }
}
