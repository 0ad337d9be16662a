//! An agent restart under a leaking application: the adapter re-sends its
//! pool's checkouts (`checkout_state`, docs/adapter-protocol.md), so the new
//! agent reports the leak that began before it, dated from before the
//! restart, with its pool and holder thread, within the leak threshold and
//! a few seconds of starting.
//!
//! The application holds its connection and then stays idle: nothing it
//! does would tell the adapter the agent went away, so it is the periodic
//! re-send (1 s here, 30 s by default) that reaches the new agent, with
//! the holder's stack after it.
#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime},
};

use poolscope_tests::{
    adapter_config, json, local_port, require_kernel, wait_until, Agent, LeakKind, LeakReport,
    PoolApp, Postgres, ReportStatus, TempDir, EVENT_TIMEOUT,
};

const LEAK_S: f64 = 3.0;
const QUIET_S: f64 = 1.0;
/// How often the adapter re-sends its state in this test.
const STATE_INTERVAL_S: f64 = 1.0;
/// How long the host runs without an agent.
const AGENT_DOWN: Duration = Duration::from_secs(2);
/// The agent evaluates leaks once a second; the test polls every 100 ms or
/// so; the adapter's state arrives within its interval.
const REPORT_SLACK: Duration = Duration::from_secs(3);

fn thresholds() -> Vec<(&'static str, f64)> {
    vec![
        ("leak_threshold_seconds", LEAK_S),
        ("quiet_seconds", QUIET_S),
        // Far away, so that only the leak rule can fire.
        ("idle_in_transaction_seconds", 600.0),
        ("abandoned_seconds", 600.0),
    ]
}

fn wall(rfc3339: Option<&str>, what: &str, report: &LeakReport) -> SystemTime {
    let text = rfc3339.unwrap_or_else(|| panic!("no {what} in {report:#?}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{what} {text:?}: {e}"))
}

/// Polls `agent` until it reports a leak on local port `port` of `pid`.
fn wait_for_leak(agent: &Agent, pid: u32, port: u16, timeout: Duration) -> LeakReport {
    let mut last = Vec::new();
    let found = wait_until(timeout, || {
        last = agent.leaks_cli();
        last.iter()
            .find(|r| r.pid == pid && r.kind == LeakKind::Leaked && local_port(r) == Some(port))
            .cloned()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no leak on port {port} of pid {pid} within {timeout:?}\n--- reports ---\n{}\n\
             --- connections of pid {pid} ---\n{}\n--- pools ---\n{}\n--- agent log ---\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            serde_json::to_string_pretty(&agent.connections_of(pid)).unwrap_or_default(),
            serde_json::to_string_pretty(&agent.pools()).unwrap_or_default(),
            agent.log()
        )
    })
}

fn start_agent(socket: &Path) -> Agent {
    let agent = Agent::start_with_config(&adapter_config(socket, &thresholds()), &[]);
    assert!(socket.exists(), "no adapter socket\n{}", agent.log());
    agent
}

#[test]
fn python_leak_from_before_an_agent_restart_is_reported_by_the_new_agent() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let dir = TempDir::new("poolscope-restart");
    let socket = dir.path().join("adapter.sock");
    let mut first = start_agent(&socket);

    let mut app = PoolApp::spawn(Some(&socket));
    let pid = app.pid;
    let answer = app.request(
        json!({"op": "sqlalchemy", "engine": "main", "port": pg.port,
                                    "pool_size": 2, "max_overflow": 1, "adapter": true,
                                    "pool_name": "orders", "state_interval": STATE_INTERVAL_S}),
    );
    assert_eq!(answer["pool_name"], "orders");
    // A checkout and return first: the pool's connection exists, idle.
    app.request(json!({"op": "pool_checkouts", "engine": "main", "n": 2}));

    let before_checkout = SystemTime::now();
    let held = app.checkout("main", "leak");
    let (fd, port, checked_out) = (held.fd, held.port, held.at);
    first.wait_for_pool(pid, "orders", "the first agent to see the checkout", |p| {
        p.used == 1
    });

    // SIGTERM, a clean exit, and a while with no agent at all.
    let (status, _) = first.terminate();
    assert!(
        status.success(),
        "the first agent exits 0 on SIGTERM, got {status}\n{}",
        first.log()
    );
    drop(first);
    let stopped = SystemTime::now();
    thread::sleep(AGENT_DOWN);

    let second = start_agent(&socket);
    let started = Instant::now();
    let report = wait_for_leak(
        &second,
        pid,
        port,
        Duration::from_secs_f64(LEAK_S) + REPORT_SLACK + EVENT_TIMEOUT,
    );
    let after_start = started.elapsed();
    assert!(
        after_start <= Duration::from_secs_f64(LEAK_S) + REPORT_SLACK,
        "the leak was reported {after_start:?} after the new agent started\n{report:#?}"
    );
    assert_eq!(report.status, ReportStatus::Open, "{report:#?}");
    assert_eq!(report.pool.as_deref(), Some("orders"), "{report:#?}");
    assert_eq!(report.holder_tid, Some(app.tid), "{report:#?}");
    assert_eq!(report.fd, Some(fd), "{report:#?}");

    // Dated when the application checked it out, before the restart: not
    // when the new agent learned of it.
    let since = wall(report.checked_out_at.as_deref(), "checked_out_at", &report);
    let slack = Duration::from_millis(500);
    assert!(
        since + slack >= before_checkout && since <= stopped,
        "checked out at {since:?}; the app checked it out after {before_checkout:?} and the \
         first agent stopped at {stopped:?}\n{report:#?}"
    );
    let opened = wall(
        report.connection_opened_at.as_deref(),
        "connection_opened_at",
        &report,
    );
    assert!(
        since < opened,
        "the new agent found the connection in /proc at its start ({opened:?}); the checkout \
         is older ({since:?})\n{report:#?}"
    );
    let held_for = report.held_for_seconds.unwrap();
    let lower = (checked_out.elapsed() - after_start).as_secs_f64();
    assert!(
        held_for >= lower.min(LEAK_S + AGENT_DOWN.as_secs_f64()) - 0.5,
        "held for {held_for} s, though checked out {:?} ago\n{report:#?}",
        checked_out.elapsed()
    );

    // The re-sent state, arriving every second, changes nothing: still one
    // connection out, no acquire counted by the new agent, one report.
    thread::sleep(Duration::from_secs_f64(STATE_INTERVAL_S * 2.5));
    let pool = second.pool(pid, "orders").unwrap();
    assert_eq!((pool.used, pool.acquires), (1, 0), "{pool:#?}");
    assert_eq!(pool.max, Some(3), "re-registered: {pool:#?}");
    let reports: Vec<LeakReport> = second
        .leaks_cli()
        .into_iter()
        .filter(|r| r.pid == pid)
        .collect();
    assert_eq!(reports.len(), 1, "{reports:#?}");
    // The holder's stack came back too: re-sent after each checkout_state.
    let stack = reports[0].holder_stack.clone().unwrap_or_default();
    assert!(
        stack
            .iter()
            .any(|f| f.starts_with("take_and_keep_for_later (")),
        "the leak's stack, from before the restart: {:#?}",
        reports[0]
    );
    assert_eq!(
        wall(
            reports[0].checked_out_at.as_deref(),
            "checked_out_at",
            &reports[0]
        ),
        since,
        "the start did not move"
    );

    // Returning it resolves the report, as for any leak.
    app.request(json!({"op": "release", "id": "leak"}));
    let resolved = wait_until(EVENT_TIMEOUT, || {
        second
            .leaks_cli()
            .into_iter()
            .find(|r| r.id == report.id && r.status == ReportStatus::Resolved)
    });
    assert!(resolved.is_some(), "{}", second.log());
}
