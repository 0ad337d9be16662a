//! The Node.js pool adapter (`adapters/node`) against a real PostgreSQL and
//! the agent: a node-postgres `pg.Pool`, instrumented with
//! `poolscope-adapter`, runs in a child process whose pid the test knows.
//! What the agent shows for that pid (`/api/v1/pools`, `/api/v1/leaks`) must
//! agree with what the application itself counted.
//!
//! The adapter is pure JavaScript and sends on the agent's Unix stream
//! socket. Needs root (BPF), PostgreSQL, node, and `npm ci` in
//! adapters/node (which `cargo xtask setup` runs); under `CI=true` a missing
//! one fails the test.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use poolscope::{
    detect::LeakKind,
    lifecycle::PoolView,
    reports::{LeakReport, LeaksResponse, ReportStatus},
};
use poolscope_tests::*;

/// The pool's name in the application (test/fixtures/pool_app.js).
const POOL: &str = "node-orders";
const POOL_MAX: u32 = 4;
const CYCLES: u64 = 200;
const WORKERS: u64 = 8;
const LEAK_THRESHOLD_SECONDS: f64 = 3.0;
const QUIET_SECONDS: f64 = 1.5;
/// A leak must be reported this long after the threshold at the latest.
const LEAK_REPORT_SLACK: Duration = Duration::from_secs(2);
/// The function of the app that takes the leaked client (op `leak`): the
/// leak report's holder stack names it.
const LEAKING_FUNCTION: &str = "leakAConnectionOnPurpose";

/// `adapters/node/test/fixtures/pool_app.js` with its pool on `pg`, its
/// adapter sending to the stream socket `stream`.
fn spawn_app(pg: &Postgres, stream: &Path) -> NodeApp {
    NodeApp::spawn(
        "test/fixtures/pool_app.js",
        stream,
        &[
            ("PGHOST", LOCALHOST_V4.to_string()),
            ("PGPORT", pg.port.to_string()),
            ("PGUSER", "postgres".to_string()),
            ("PGDATABASE", "postgres".to_string()),
            ("POOL_NAME", POOL.to_string()),
            ("POOL_MAX", POOL_MAX.to_string()),
            // A stack for every checkout: the leak may follow another
            // checkout within the default millisecond.
            ("POOLSCOPE_ADAPTER_STACK_INTERVAL_US", "0".to_string()),
        ],
    )
}

fn count(answer: &Value, key: &str) -> u64 {
    answer[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in the app's answer: {answer}"))
}

fn pools_of(agent: &Agent, pid: u32) -> Vec<PoolView> {
    agent.pools().into_iter().filter(|p| p.pid == pid).collect()
}

fn leaks_of(agent: &Agent, pid: u32) -> Vec<LeakReport> {
    let body = agent
        .get("/api/v1/leaks")
        .unwrap_or_else(|e| panic!("GET /api/v1/leaks: {e:#}"));
    let response: LeaksResponse = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/api/v1/leaks is not valid JSON ({e}): {body}"));
    response
        .reports
        .into_iter()
        .filter(|r| r.pid == pid)
        .collect()
}

/// Polls the app's adapter pool in the agent until `ok` accepts it.
fn wait_for_pool(
    agent: &Agent,
    app: &mut NodeApp,
    within: Duration,
    what: &str,
    ok: impl Fn(&PoolView) -> bool,
) -> PoolView {
    let mut last = Vec::new();
    let found = wait_until(within, || {
        last = pools_of(agent, app.pid);
        last.iter().find(|p| p.name == POOL && ok(p)).cloned()
    });
    found.unwrap_or_else(|| {
        let state = app.request(json!({"op": "state"}));
        panic!(
            "timed out after {within:?} waiting for {what} (pid {})\n\
             --- the app's own state ---\n{state}\n\
             --- pools of pid {} ---\n{}\n--- agent log ---\n{}",
            app.pid,
            app.pid,
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            agent.log()
        )
    })
}

#[test]
fn node_pg_pool_counts_match_the_app_and_a_quiet_leak_is_reported() {
    if !require_kernel() || !require_node_adapter() {
        return;
    }
    let pg = Postgres::start();
    let dir = TempDir::new("poolscope-node-adapter");
    let socket = dir.path().join("run").join("adapter.sock");
    let config = adapter_config(
        &socket,
        &[
            ("leak_threshold_seconds", LEAK_THRESHOLD_SECONDS),
            ("quiet_seconds", QUIET_SECONDS),
        ],
    );
    let agent = Agent::start_with_config(&config, &[]);
    let stream = stream_socket_beside(&socket);
    assert!(
        stream.exists(),
        "the agent did not bind its stream socket {}\n{}",
        stream.display(),
        agent.log()
    );
    let mut app = spawn_app(&pg, &stream);

    // 1. Many short checkouts from concurrent workers.
    let run = app.request(json!({"op": "run", "cycles": CYCLES, "workers": WORKERS}));
    let acquires = count(&run, "acquires");
    let releases = count(&run, "releases");
    assert_eq!(
        (acquires, releases),
        (CYCLES, CYCLES),
        "the app's own counts: {run}"
    );
    let pool = wait_for_pool(
        &agent,
        &mut app,
        EVENT_TIMEOUT,
        &format!("pool {POOL} with {acquires} acquires, {releases} releases and none in use"),
        |p| p.acquires == acquires && p.releases == releases && p.used == 0,
    );
    assert!(pool.from_adapter, "{pool:?}");
    assert_eq!(pool.max, Some(POOL_MAX), "{pool:?}");
    assert_eq!(
        pool.db_system,
        Some(SystemName::Read(DbSystem::Postgresql)),
        "{pool:?}"
    );
    assert_eq!(pool.library.as_deref(), Some("node-postgres"), "{pool:?}");
    assert_eq!(
        pool.server,
        Some(format!("{LOCALHOST_V4}:{}", pg.port)),
        "{pool:?}"
    );
    assert_eq!(pool.namespace.as_deref(), Some("postgres"), "{pool:?}");
    assert_eq!((pool.pending, pool.timeouts), (0, 0), "{pool:?}");
    let open = count(&run, "total");
    assert!(
        (1..=u64::from(POOL_MAX)).contains(&open),
        "the app holds {open} connections: {run}"
    );
    assert_eq!(
        pool.idle, open,
        "every connection the app holds is an idle pool connection: {pool:?}"
    );
    assert!(
        pools_of(&agent, app.pid).iter().all(|p| p.from_adapter),
        "no implicit pool besides the adapter's: {:#?}",
        pools_of(&agent, app.pid)
    );

    // 2. One client taken and never used again: leaked once the threshold
    // has passed (and it has been quiet), within the slack.
    let leak = app.request(json!({"op": "leak"}));
    let taken = Instant::now();
    let leak_fd = count(&leak, "fd");
    let leak_local = leak["local_address"]
        .as_str()
        .unwrap_or_else(|| panic!("no local_address in {leak}"))
        .to_string();
    let deadline = Duration::from_secs_f64(LEAK_THRESHOLD_SECONDS) + LEAK_REPORT_SLACK;
    let mut last = Vec::new();
    let report = wait_until(deadline.saturating_sub(taken.elapsed()), || {
        last = leaks_of(&agent, app.pid);
        last.iter()
            .find(|r| r.kind == LeakKind::Leaked && r.status == ReportStatus::Open)
            .cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "no open `leaked` report for pid {} within {deadline:?} of the checkout\n\
             --- leak reports of pid {} ---\n{}\n--- pools ---\n{}\n--- agent log ---\n{}",
            app.pid,
            app.pid,
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            serde_json::to_string_pretty(&pools_of(&agent, app.pid)).unwrap_or_default(),
            agent.log()
        )
    });
    assert_eq!(report.pool.as_deref(), Some(POOL), "{report:#?}");
    assert_eq!(
        report.fd.map(i64::from),
        Some(leak_fd as i64),
        "{report:#?}"
    );
    assert_eq!(
        report.local_address.as_deref(),
        Some(leak_local.as_str()),
        "{report:#?}"
    );
    assert_eq!(
        report.db_system,
        Some(SystemName::Read(DbSystem::Postgresql)),
        "{report:#?}"
    );
    let held = report.held_for_seconds.unwrap_or_default();
    assert!(
        held >= LEAK_THRESHOLD_SECONDS,
        "reported before the threshold: {report:#?}"
    );
    // The adapter sent the stack of the code that took the client
    // (`holder_stack`, 1 s after the checkout, well before the threshold):
    // innermost first, from the app's function, without the frames of
    // pg-pool, pg or the adapter itself.
    let stack = report
        .holder_stack
        .as_deref()
        .unwrap_or_else(|| panic!("no holder_stack in the leak report: {report:#?}"));
    eprintln!("the leak's holder stack: {stack:#?}");
    assert!(
        stack
            .first()
            .is_some_and(|frame| frame.contains(LEAKING_FUNCTION) && frame.contains("pool_app.js")),
        "the innermost frame is the app's {LEAKING_FUNCTION}: {stack:#?}"
    );
    let adapter_lib = node_adapter_dir().join("lib");
    assert!(
        stack.iter().all(|frame| !frame.contains("node_modules")
            && !frame.contains(&*adapter_lib.to_string_lossy())
            && !frame.contains("node:internal")),
        "no frame of pg-pool, pg, the adapter or Node's internals: {stack:#?}"
    );
    assert!(
        leaks_of(&agent, app.pid)
            .iter()
            .all(|r| r.kind == LeakKind::Leaked && r.fd == report.fd),
        "only the leaked connection is reported: {:#?}",
        leaks_of(&agent, app.pid)
    );
    let pool = wait_for_pool(
        &agent,
        &mut app,
        EVENT_TIMEOUT,
        "the leaked connection in use",
        |p| p.used == 1 && p.acquires == acquires + 1,
    );
    assert_eq!(pool.releases, releases, "{pool:?}");

    // 3. Giving it back resolves the report.
    let back = app.request(json!({"op": "release_leaked"}));
    assert_eq!(
        (count(&back, "acquires"), count(&back, "releases")),
        (acquires + 1, releases + 1),
        "{back}"
    );
    wait_for_pool(
        &agent,
        &mut app,
        EVENT_TIMEOUT,
        "every connection back in the pool",
        |p| p.used == 0 && p.acquires == acquires + 1 && p.releases == releases + 1,
    );
    let resolved = wait_until(EVENT_TIMEOUT, || {
        leaks_of(&agent, app.pid)
            .into_iter()
            .find(|r| r.id == report.id && r.status == ReportStatus::Resolved)
    })
    .unwrap_or_else(|| {
        panic!(
            "the leak report was not resolved after the release: {:#?}",
            leaks_of(&agent, app.pid)
        )
    });
    assert_eq!(
        resolved.resolution.as_deref(),
        Some("returned to the pool"),
        "{resolved:#?}"
    );

    let end = app.request(json!({"op": "exit"}));
    let adapter = &end["adapter"];
    eprintln!("the adapter's own counts: {adapter}");
    assert_eq!(
        adapter["dropped"].as_u64(),
        Some(0),
        "the adapter dropped messages: {end}"
    );
    assert_eq!(
        adapter["connects"].as_u64(),
        Some(1),
        "one stream for the whole run: {end}"
    );
}

/// The adapter's own unit tests (`node --test`, as `npm test` runs them):
/// run here so that `cargo test` covers them. They need no kernel and no
/// database: a listening Unix stream socket, fake pg clients and fake
/// mysql2/mysql pools.
#[test]
fn node_adapter_unit_tests_pass() {
    if !require_node_adapter() {
        return;
    }
    let dir = node_adapter_dir();
    let mut files: Vec<String> = std::fs::read_dir(dir.join("test"))
        .expect("adapters/node/test exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.js"))
        .map(|name| format!("test/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.js in {}/test", dir.display());
    let output = Command::new("node")
        .arg("--test")
        .args(&files)
        .current_dir(&dir)
        .env_remove("POOLSCOPE_ADAPTER_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run node --test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node --test {files:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("# fail 0")),
        "node --test ran but did not report `# fail 0`:\n{stdout}"
    );
}

/// The README's example pool of SQLite handles
/// (`examples/sqlite-pool/handle_pool.js`, better-sqlite3), driven by
/// `test/fixtures/sqlite_app.js`: no socket at all, so the agent knows the
/// handles only by the ids the generic reporter gives them. One handle
/// leaks, the pool of 2 runs out, a waiter times out and another waits for
/// a return; healthy checkouts around them.
#[test]
fn the_example_sqlite_handle_pool_reports_its_leak_waits_and_state() {
    if !require_kernel() || !require_node_sqlite_example() {
        return;
    }
    const POOL: &str = "node-handles";
    // The holder stays out while both waiters wait (about 2.5 s): a leak
    // threshold past that leaves the leak the only one held too long.
    const HELD_S: f64 = 5.0;
    let dir = TempDir::new("poolscope-node-sqlite");
    let socket = dir.path().join("adapter.sock");
    let agent = Agent::start_with_config(
        &adapter_config(
            &socket,
            &[
                ("leak_threshold_seconds", HELD_S),
                ("slow_acquire_ms", 500.0),
            ],
        ),
        &[],
    );
    let db = dir.path().join("app.db");
    let mut app = NodeApp::spawn(
        "test/fixtures/sqlite_app.js",
        &stream_socket_beside(&socket),
        &[
            ("SQLITE_PATH", db.display().to_string()),
            ("POOL_NAME", POOL.to_string()),
            ("POOL_MAX", "2".to_string()),
            ("POOL_TIMEOUT_MS", "1500".to_string()),
        ],
    );
    let pid = app.pid;
    let tid = app.ready["tid"].as_u64();
    assert_eq!(
        tid,
        Some(u64::from(pid)),
        "the event loop's thread: {}",
        app.ready
    );

    // Healthy checkouts, then a leak and a holder that fill the pool.
    app.request(json!({"op": "checkouts", "n": 20}));
    let pool = agent.wait_for_pool(pid, POOL, "the registration", |p| p.max == Some(2));
    assert!(pool.from_adapter, "{pool:#?}");
    assert_eq!(
        pool.db_system,
        Some(SystemName::Named("sqlite".into())),
        "{pool:#?}"
    );
    assert_eq!(pool.server, Some(db.display().to_string()), "{pool:#?}");
    assert_eq!(pool.library.as_deref(), Some("handle_pool"), "{pool:#?}");
    app.request(json!({"op": "checkout", "id": "leak"}));
    app.request(json!({"op": "checkout", "id": "holder"}));
    let state = app.request(json!({"op": "pool_state"}));
    let pool = agent.wait_for_pool(pid, POOL, "the pool full", |p| p.used == 2);
    assert_eq!(
        (pool.used, pool.idle, pool.max),
        (
            count(&state, "used"),
            count(&state, "idle"),
            u32::try_from(count(&state, "max")).ok()
        ),
        "the agent's pool is the app's own: {state} {pool:#?}"
    );

    // A waiter times out on the full pool (1.5 s); a second gets the
    // holder's handle when it comes back 0.7 s later (both slow acquires:
    // past 0.5 s), and returns it.
    app.request(json!({"op": "waiter", "id": "w1"}));
    let w1 = app.request(json!({"op": "waiter_result", "id": "w1"}));
    assert_eq!(w1["result"], "timeout", "{w1}");
    app.request(json!({"op": "waiter", "id": "w2"}));
    agent.wait_for_pool(pid, POOL, "the second waiter", |p| p.pending == 1);
    expect_exhausted_pool_health(&agent, pid, POOL);
    app.request(json!({"op": "release", "id": "holder", "after_ms": 700}));
    let w2 = app.request(json!({"op": "waiter_result", "id": "w2"}));
    assert_eq!(w2["result"], "ok", "{w2}");
    app.request(json!({"op": "release", "id": "w2"}));

    // Every acquire's wait is counted: 20 healthy, the leak, the holder,
    // the waiter that timed out and the one that got a handle.
    let tids = HandlePoolTids {
        holder: tid,
        timed_out_waiter: tid,
    };
    expect_handle_pool_reports(&agent, pid, POOL, tids, HELD_S, 24.0);
    let state = app.request(json!({"op": "pool_state"}));
    let pool = agent.wait_for_pool(pid, POOL, "the leak alone out", |p| p.used == 1);
    assert_eq!(
        (pool.used, pool.idle, pool.pending),
        (count(&state, "used"), count(&state, "idle"), 0),
        "{state} {pool:#?}"
    );
    assert_eq!(pool.timeouts, 1, "{pool:#?}");
}
