//! Watching an application's leak reports as `poolscope leaks --json`
//! prints them: every report of one pid seen while polling, when each was
//! first seen, and the steps the adapter scenarios assert with (on time,
//! exactly these kinds on these connections).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use crate::{local_port, wait_until, Agent, Held, LeakKind, LeakReport};

/// How late a report may appear after its threshold was crossed: the agent
/// evaluates once a second, the test polls every 100 ms or so.
pub const REPORT_SLACK: Duration = Duration::from_secs(2);
/// How early: the test's clock for a checkout starts when the app answered,
/// a little after the adapter's timestamp.
pub const EARLY_SLACK: Duration = Duration::from_millis(300);

/// A connection an application holds: its local port and since when (the
/// test's clock).
pub trait HeldConnection {
    fn local_port(&self) -> u16;
    fn since(&self) -> Instant;
}

impl HeldConnection for Held {
    fn local_port(&self) -> u16 {
        self.port
    }

    fn since(&self) -> Instant {
        self.at
    }
}

/// Every report of one pid seen while polling: the latest version of each
/// (by id) and when the test first saw it.
pub struct Seen<'a> {
    agent: &'a Agent,
    pub pid: u32,
    pub first: BTreeMap<u64, Instant>,
    pub latest: BTreeMap<u64, LeakReport>,
}

impl<'a> Seen<'a> {
    pub fn new(agent: &'a Agent, pid: u32) -> Seen<'a> {
        Seen {
            agent,
            pid,
            first: BTreeMap::new(),
            latest: BTreeMap::new(),
        }
    }

    pub fn poll(&mut self) {
        let now = Instant::now();
        let pid = self.pid;
        for r in self.agent.leaks_cli().into_iter().filter(|r| r.pid == pid) {
            self.first.entry(r.id).or_insert(now);
            self.latest.insert(r.id, r);
        }
    }

    /// The one report of `kind` on local port `port`, with when it was
    /// first seen.
    pub fn find(&self, kind: LeakKind, port: u16) -> Option<(&LeakReport, Instant)> {
        self.latest
            .values()
            .find(|r| r.kind == kind && local_port(r) == Some(port))
            .map(|r| (r, self.first[&r.id]))
    }

    pub fn kinds_by_port(&self) -> BTreeSet<(LeakKind, Option<u16>)> {
        self.latest
            .values()
            .map(|r| (r.kind, local_port(r)))
            .collect()
    }

    pub fn dump(&self) -> String {
        serde_json::to_string_pretty(&self.latest.values().collect::<Vec<_>>()).unwrap_or_default()
    }

    /// The reports of `kind`.
    pub fn of_kind(&self, kind: LeakKind) -> Vec<&LeakReport> {
        self.latest.values().filter(|r| r.kind == kind).collect()
    }

    /// Step: poll the CLI's reports until `done` accepts them or `timeout`
    /// passes; panics with what it saw and the agent's log.
    pub fn watch(&mut self, timeout: Duration, what: &str, done: impl Fn(&Seen) -> bool) {
        let ok = wait_until(timeout, || {
            self.poll();
            done(self).then_some(())
        });
        if ok.is_none() {
            let (agent, pid) = (self.agent, self.pid);
            panic!(
                "timed out after {timeout:?} waiting for {what} (pid {pid})\n\
                 --- reports of pid {pid} ---\n{}\n--- connections of pid {pid} ---\n{}\n\
                 --- pools ---\n{}\n--- agent log ---\n{}",
                self.dump(),
                serde_json::to_string_pretty(&agent.connections_of(pid)).unwrap_or_default(),
                serde_json::to_string_pretty(&agent.pools()).unwrap_or_default(),
                agent.log()
            );
        }
    }

    /// Step: the first report of each case must be there by `timeout`.
    pub fn watch_for_first(&mut self, threshold: f64, what: &str, done: impl Fn(&Seen) -> bool) {
        let timeout = Duration::from_secs_f64(threshold) + REPORT_SLACK + Duration::from_secs(5);
        self.watch(timeout, what, done);
    }

    /// Step: keep polling for 2 s more, so that a report that should not
    /// come has its chance to.
    pub fn keep_watching(&mut self) {
        let until = Instant::now() + Duration::from_secs(2);
        self.watch(Duration::from_secs(5), "2 s more", |_| {
            Instant::now() >= until
        });
    }

    /// Step: every report ever seen, by kind and local port, is `expected`.
    pub fn expect_kinds(&self, expected: BTreeSet<(LeakKind, Option<u16>)>) {
        assert_eq!(
            self.kinds_by_port(),
            expected,
            "every report of pid {} ever seen, by kind and local port\n{}",
            self.pid,
            self.dump()
        );
    }

    /// Step: the report of `kind` on `held`'s connection, first seen on
    /// time: `threshold` seconds after `held` started.
    pub fn on_time(
        &self,
        kind: LeakKind,
        held: &impl HeldConnection,
        threshold: f64,
        what: &str,
    ) -> &LeakReport {
        let (r, first) = self
            .find(kind, held.local_port())
            .unwrap_or_else(|| panic!("no {kind:?} report for {what}\n{}", self.dump()));
        assert_on_time(what, first, held.since(), threshold);
        r
    }
}

/// Asserts that a report appeared within [threshold - early slack,
/// threshold + REPORT_SLACK] of `since`.
pub fn assert_on_time(what: &str, first_seen: Instant, since: Instant, threshold: f64) {
    let after = first_seen.saturating_duration_since(since);
    let threshold = Duration::from_secs_f64(threshold);
    assert!(
        after + EARLY_SLACK >= threshold && after <= threshold + REPORT_SLACK,
        "{what} appeared {after:?} after it started; expected between {threshold:?} and {:?}",
        threshold + REPORT_SLACK
    );
}

/// The thread ids of a handle-pool scenario (a pool of 2 SQLite handles
/// with no socket: one leaked, one held while a waiter times out and
/// another is served, then returned; adapter_python's and adapter_node's).
pub struct HandlePoolTids {
    /// The thread that leaked a handle.
    pub holder: Option<u64>,
    /// The thread of the waiter that timed out.
    pub timed_out_waiter: Option<u64>,
}

/// What the agent must report for a handle-pool scenario of `pool` in
/// `pid`: a slow acquire that timed out on the full pool (used 2 of 2,
/// someone pending), the leaked handle alone held too long (`held_s`) with
/// no socket and "no kernel evidence", nothing else; then `acquires` waits
/// in the pool's wait histogram.
pub fn expect_handle_pool_reports(
    agent: &Agent,
    pid: u32,
    pool: &str,
    tids: HandlePoolTids,
    held_s: f64,
    acquires: f64,
) {
    let mut seen = Seen::new(agent, pid);
    seen.watch(crate::EVENT_TIMEOUT, "the slow acquires", |s| {
        s.of_kind(LeakKind::SlowAcquire).len() >= 2
    });
    let slow = seen.of_kind(LeakKind::SlowAcquire);
    let timed_out = slow
        .iter()
        .find(|r| r.resolution.as_deref() == Some("timed out"))
        .unwrap_or_else(|| panic!("{}", seen.dump()));
    assert_eq!(
        (timed_out.pool_used, timed_out.pool_max),
        (Some(2), Some(2)),
        "{timed_out:#?}"
    );
    assert!(
        timed_out.pool_pending.is_some_and(|p| p >= 1),
        "{timed_out:#?}"
    );
    assert_eq!(
        timed_out.holder_tid.map(u64::from),
        tids.timed_out_waiter,
        "{timed_out:#?}"
    );

    // The leak: held too long, with no kernel evidence either way.
    seen.watch(
        crate::EVENT_TIMEOUT + Duration::from_secs_f64(held_s),
        "the leak",
        |s| !s.of_kind(LeakKind::HeldTooLong).is_empty(),
    );
    let held = seen.of_kind(LeakKind::HeldTooLong);
    assert_eq!(held.len(), 1, "only the leak: {}", seen.dump());
    let r = held[0];
    assert_eq!(r.status, crate::ReportStatus::Open, "{r:#?}");
    assert_eq!(r.pool.as_deref(), Some(pool), "{r:#?}");
    assert_eq!(r.holder_tid.map(u64::from), tids.holder, "{r:#?}");
    assert_eq!(
        r.db_system,
        Some(crate::SystemName::Named("sqlite".into())),
        "{r:#?}"
    );
    assert_eq!((r.fd, r.local_address.as_deref()), (None, None), "{r:#?}");
    assert!(r.evidence.contains("no kernel evidence"), "{r:#?}");
    assert!(
        seen.latest
            .values()
            .all(|r| matches!(r.kind, LeakKind::SlowAcquire | LeakKind::HeldTooLong)),
        "nothing else: {}",
        seen.dump()
    );

    expect_pool_health_after_a_timeout_and_a_leak(agent, pid, pool);

    let waits = format!(
        "db_client_connection_wait_time_seconds_count{{db_client_connection_pool_name=\"{pool}\",process_pid=\"{pid}\"}}"
    );
    let counted = wait_until(crate::EVENT_TIMEOUT, || {
        let v = agent.metric_sum(&waits);
        (v >= acquires).then_some(v)
    });
    assert_eq!(counted, Some(acquires), "{}", agent.metrics());
}

/// Pool health of `pool` in `pid` after one of its acquires timed out and
/// a leak report opened on it: critical for the timeout, a warning for the
/// leak, as `/api/v1/health` (503, for probes) and `poolscope health`
/// (exit 2, the Nagios code) say; asked about another process, 404 and
/// "knows no pool".
pub fn expect_pool_health_after_a_timeout_and_a_leak(agent: &Agent, pid: u32, pool: &str) {
    use poolscope::detect::pool_health::{HealthResponse, Status};
    let path = format!("/api/v1/health?pid={pid}&pool={pool}");
    let (code, body) = agent.get_with_status(&path).expect("GET /api/v1/health");
    assert_eq!(code, 503, "{body}");
    let health: HealthResponse = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(health.status, Status::Critical, "{health:#?}");
    assert_eq!(health.pools.len(), 1, "{health:#?}");
    let reasons: Vec<(&str, Status, &str)> = health.pools[0]
        .reasons
        .iter()
        .map(|r| (r.rule.as_str(), r.status, r.detail.as_str()))
        .collect();
    assert!(
        reasons.contains(&(
            "acquire_timeouts",
            Status::Critical,
            "1 acquire timed out in the last 5 min"
        )),
        "{health:#?}"
    );
    assert!(
        reasons.contains(&(
            "open_leaks",
            Status::Warning,
            "1 open leak report on its connections (poolscope leaks)"
        )),
        "{health:#?}"
    );

    let (exit, printed) = agent.health_cli(&["--pid", &pid.to_string(), "--pool", pool]);
    assert_eq!(exit, 2, "{printed}");
    assert!(printed.contains("critical acquire_timeouts"), "{printed}");
    assert!(printed.contains("warning  open_leaks"), "{printed}");
    assert!(printed.ends_with("overall: critical\n"), "{printed}");
    // Kept for a person to read (the README's sample comes from one).
    let artifacts = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    if std::fs::create_dir_all(&artifacts).is_ok() {
        let _ = std::fs::write(artifacts.join(format!("pool-health-{pool}.txt")), &printed);
    }

    let (exit, printed) = agent.health_cli(&["--pid", &(pid + 1_000_000).to_string()]);
    assert_eq!(exit, 3, "{printed}");
    assert!(printed.contains("knows no pool"), "{printed}");
}

/// Pool health of `pool` in `pid` while both its connections are out and
/// a request waits: critical, exhausted first among the reasons.
pub fn expect_exhausted_pool_health(agent: &Agent, pid: u32, pool: &str) {
    use poolscope::detect::pool_health::{HealthResponse, Status};
    let (code, body) = agent
        .get_with_status(&format!("/api/v1/health?pid={pid}"))
        .expect("GET /api/v1/health");
    assert_eq!(code, 503, "{body}");
    let health: HealthResponse = serde_json::from_str(&body).expect("health JSON");
    let p = health
        .pools
        .iter()
        .find(|p| p.pool == pool)
        .unwrap_or_else(|| panic!("{health:#?}"));
    assert_eq!(p.status, Status::Critical, "{p:#?}");
    assert_eq!((p.used, p.max, p.pending), (2, Some(2), 1), "{p:#?}");
    let rules: Vec<&str> = p.reasons.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(&rules[..2], ["utilization", "exhausted"], "{p:#?}");
    assert_eq!(
        p.reasons[1].detail,
        "all 2 connections in use and 1 request waiting"
    );
}
