//! The Rust pool adapter (adapters/rust, crate `poolscope-adapter`) against
//! the real agent, kernel and PostgreSQL: a deadpool-postgres workload
//! (`poolscope-adapter-testapp`, a workspace binary) reports its pool over
//! the adapter socket, and the agent's `/api/v1/pools` must agree with the
//! counts the application kept itself; a connection it then holds without
//! using it must show up in `/api/v1/leaks` as `leaked`. A bb8 pool and a
//! sqlx pool (`bb8_scenario`, `sqlx_scenario`, the same package) leak,
//! hold, idle in a transaction and wait, and each case must be told apart.
//! Each leak report carries the adapter's holder stack, which names the
//! app's function that took the connection.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use poolscope::{
    detect::LeakKind,
    lifecycle::PoolView,
    reports::{LeakReport, LeaksResponse, ReportStatus},
};
use poolscope_tests::{
    json, require_kernel, wait_until, Agent, DbSystem, HeldConnection, JsonLinesChild, MariaDb,
    Postgres, Seen, SystemName, TempDir, TxState, Value, EVENT_TIMEOUT,
};

const POOL: &str = "rust-workload";
const TASKS: u64 = 8;
const CYCLES: u64 = 200;
const MAX: u32 = 4;
const LEAK_THRESHOLD_SECONDS: f64 = 3.0;
const QUIET_SECONDS: f64 = 1.5;

const TESTAPP: &str = "poolscope-adapter-testapp";

/// The test app: `$POOLSCOPE_ADAPTER_TESTAPP`, else built now with cargo in
/// the profile and target dir of this test binary (a no-op when it is up to
/// date), so that a plain `cargo test -p poolscope-tests` runs the current
/// source.
fn testapp_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("POOLSCOPE_ADAPTER_TESTAPP") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "POOLSCOPE_ADAPTER_TESTAPP={} does not exist",
            bin.display()
        );
        return bin;
    }
    // This test runs as <target>/<profile>/deps/adapter_rust-<hash>.
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("<target>/<profile>");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(name) => name.to_string(),
        None => panic!("unexpected test binary path {}", exe.display()),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(option_env!("CARGO").unwrap_or("cargo")));
    let output = Command::new(&cargo)
        .args(["build", "--quiet", "-p", TESTAPP, "--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.display()));
    assert!(
        output.status.success(),
        "cargo build -p {TESTAPP} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let bin = profile_dir.join(TESTAPP);
    assert!(bin.is_file(), "cargo built no {}", bin.display());
    bin
}

/// The workload child: one JSON line per answer on stdout.
struct TestApp {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl TestApp {
    fn spawn(socket: &Path, pg_port: u16) -> TestApp {
        let bin = testapp_bin();
        let mut child = Command::new(&bin)
            .args(["--port", &pg_port.to_string()])
            .args(["--tasks", &TASKS.to_string()])
            .args(["--cycles", &CYCLES.to_string()])
            .args(["--max", &MAX.to_string()])
            .args(["--pool", POOL])
            .env("POOLSCOPE_ADAPTER_SOCKET", socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TestApp {
            child,
            stdin,
            lines,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next answer; panics if none comes within `timeout`.
    fn answer(&mut self, timeout: Duration) -> Value {
        let line = match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(e) => panic!(
                "no answer from the test app within {timeout:?} ({e}); exit status: {:?}",
                self.child.try_wait()
            ),
        };
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the test app printed non-JSON ({e}): {line}"));
        assert!(value.get("error").is_none(), "the test app failed: {value}");
        value
    }

    fn command(&mut self, command: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {command:?} to the test app: {e}"));
        self.answer(Duration::from_secs(30))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Step: the leak report carries the adapter's holder stack (sent 1 s
/// after the checkout, well before the leak threshold): innermost first,
/// the place that called the pool's `get()` / `acquire()` (a file of the
/// test app), then the app's functions from the first one on, among them
/// `function` (the app's function that took the connection, named by the
/// symbol table of the release build), none of the adapter's, the pool's
/// or its driver's before it.
fn expect_holder_stack(r: &LeakReport, function: &str) {
    let stack = r
        .holder_stack
        .as_deref()
        .unwrap_or_else(|| panic!("no holder_stack in the leak report: {r:#?}"));
    eprintln!("holder stack of report {}: {stack:#?}", r.id);
    assert!(
        stack
            .first()
            .is_some_and(|f| f.starts_with("adapters/rust/testapp/src/")),
        "the first frame is the place in the app that called the pool: {stack:#?}"
    );
    let at = stack
        .iter()
        .position(|f| f.contains(function))
        .unwrap_or_else(|| panic!("no frame names {function}: {stack:#?}"));
    for frame in &stack[..at] {
        assert!(
            ![
                "poolscope_adapter::",
                "<poolscope_adapter::",
                "bb8::",
                "deadpool",
                "sqlx",
                "tokio_postgres::",
                "backtrace::"
            ]
            .iter()
            .any(|lib| frame.starts_with(lib)),
            "a frame of the adapter or the pool before the app's: {stack:#?}"
        );
    }
    assert!(
        stack.len() <= 32
            && stack.iter().all(|f| !f.is_empty()
                && f.chars().count() <= 256
                && !f.chars().any(char::is_control)),
        "{stack:#?}"
    );
}

fn count(answer: &Value, key: &str) -> u64 {
    answer[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {answer}"))
}

fn leaks(agent: &Agent) -> Vec<LeakReport> {
    let body = agent
        .get("/api/v1/leaks")
        .unwrap_or_else(|e| panic!("GET /api/v1/leaks: {e:#}"));
    serde_json::from_str::<LeaksResponse>(&body)
        .unwrap_or_else(|e| panic!("/api/v1/leaks is not valid JSON ({e}): {body}"))
        .reports
}

/// Polls the app's adapter pool until `ok` accepts it, for at most
/// [`EVENT_TIMEOUT`]; panics with what the agent last showed and its log.
fn wait_for_pool(agent: &Agent, pid: u32, what: &str, ok: impl Fn(&PoolView) -> bool) -> PoolView {
    let mut last = Vec::new();
    let found = wait_until(EVENT_TIMEOUT, || {
        last = agent.pools().into_iter().filter(|p| p.pid == pid).collect();
        last.iter().find(|p| p.name == POOL && ok(p)).cloned()
    });
    found.unwrap_or_else(|| {
        panic!(
            "timed out after {EVENT_TIMEOUT:?} waiting for {what} (pid {pid})\n\
             --- pools of pid {pid} ---\n{}\n--- connections ---\n{}\n--- agent log ---\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            serde_json::to_string_pretty(&agent.connections_of(pid)).unwrap_or_default(),
            agent.log()
        )
    })
}

#[test]
fn deadpool_pool_counts_match_and_a_held_connection_is_a_leak() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let dir = TempDir::new("poolscope-adapter-rust");
    let socket = dir.path().join("adapter.sock");
    let agent = Agent::start_with_config(
        &format!(
            "[adapter]\nsocket = \"{}\"\n\n[leaks]\nleak_threshold_seconds = {LEAK_THRESHOLD_SECONDS:.1}\n\
             quiet_seconds = {QUIET_SECONDS:.1}\n",
            socket.display()
        ),
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(10), || socket.exists().then_some(())).is_some(),
        "the agent never made its adapter socket {}\n{}",
        socket.display(),
        agent.log()
    );

    // The workload: 8 tasks x 200 get/query/drop cycles on a pool of 4.
    let mut app = TestApp::spawn(&socket, pg.port);
    let done = app.answer(Duration::from_secs(120));
    eprintln!("the test app after its workload: {done}");
    let pid = app.pid();
    assert_eq!(count(&done, "pid"), u64::from(pid), "{done}");
    let acquires = count(&done, "acquires");
    let releases = count(&done, "releases");
    assert_eq!(acquires, TASKS * CYCLES, "{done}");
    assert_eq!(releases, TASKS * CYCLES, "{done}");
    assert_eq!(count(&done, "dropped"), 0, "no message was lost: {done}");
    assert_eq!(count(&done, "backlogged"), 0, "{done}");
    assert!(count(&done, "pool_size") <= u64::from(MAX), "{done}");

    let pool = wait_for_pool(&agent, pid, "the app's counts", |p| {
        p.acquires == acquires && p.releases == releases && p.used == 0
    });
    assert!(pool.from_adapter, "{pool:?}");
    assert_eq!(pool.max, Some(MAX), "{pool:?}");
    assert_eq!(pool.used, 0, "{pool:?}");
    assert!(
        pool.idle >= 1 && pool.idle <= u64::from(MAX),
        "the pool's open connections are idle: {pool:?}"
    );
    assert_eq!(pool.pending, 0, "{pool:?}");
    assert_eq!(pool.timeouts, 0, "{pool:?}");
    assert_eq!(
        pool.db_system,
        Some(SystemName::Read(DbSystem::Postgresql)),
        "{pool:?}"
    );
    assert_eq!(
        pool.server.as_deref(),
        Some(format!("127.0.0.1:{}", pg.port).as_str()),
        "{pool:?}"
    );
    assert_eq!(pool.namespace.as_deref(), Some("postgres"), "{pool:?}");
    assert_eq!(
        pool.library.as_deref(),
        Some("deadpool-postgres"),
        "{pool:?}"
    );
    // Every connection the pool opened is the kernel's connection of the
    // app to the server, joined to the pool.
    let conns: Vec<_> = agent
        .connections_of(pid)
        .into_iter()
        .filter(|c| c.remote_port == Some(pg.port) && c.closed_at.is_none())
        .collect();
    assert_eq!(
        conns.len() as u64,
        pool.idle,
        "the pool's connections are the app's open connections to the server: {}",
        serde_json::to_string_pretty(&conns).unwrap_or_default()
    );

    // A connection checked out and never used: leaked, within the threshold
    // plus two seconds.
    let held = app.command("leak");
    let held_at = Instant::now();
    let held_local = held["local_address"]
        .as_str()
        .unwrap_or_else(|| panic!("the held connection has a local address: {held}"))
        .to_string();
    let held_fd = held["fd"].as_i64().expect("the held connection's fd");
    let deadline = Duration::from_secs_f64(LEAK_THRESHOLD_SECONDS + 2.0);
    let mut last = Vec::new();
    let leak = wait_until(deadline, || {
        last = leaks(&agent).into_iter().filter(|r| r.pid == pid).collect();
        last.iter()
            .find(|r| {
                r.kind == LeakKind::Leaked
                    && r.status == ReportStatus::Open
                    && r.holder_stack.is_some()
            })
            .cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "no open `leaked` report for pid {pid} within {deadline:?} of checking out \
             {held_local} (fd {held_fd})\n--- reports of pid {pid} ---\n{}\n--- pools ---\n{}\n\
             --- agent log ---\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            serde_json::to_string_pretty(&agent.pools()).unwrap_or_default(),
            agent.log()
        )
    });
    let found_after = held_at.elapsed();
    assert!(found_after <= deadline, "found after {found_after:?}");
    assert_eq!(leak.pool.as_deref(), Some(POOL), "{leak:?}");
    assert_eq!(
        leak.local_address.as_deref(),
        Some(held_local.as_str()),
        "{leak:?}"
    );
    assert_eq!(leak.fd.map(i64::from), Some(held_fd), "{leak:?}");
    assert_eq!(
        leak.db_system,
        Some(SystemName::Read(DbSystem::Postgresql)),
        "{leak:?}"
    );
    let held_for = leak.held_for_seconds.unwrap_or_default();
    assert!(
        held_for >= LEAK_THRESHOLD_SECONDS,
        "reported only past the threshold: {leak:?}"
    );
    expect_holder_stack(
        &leak,
        "poolscope_adapter_testapp::leak_a_connection_on_purpose",
    );
    let tid = leak.holder_tid.expect("the leak names the holding thread");
    assert!(
        Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
        "the holder tid {tid} is a thread of the app (pid {pid})"
    );
    // The pool shows the held connection as used.
    wait_for_pool(&agent, pid, "one connection in use", |p| {
        p.used == 1 && p.acquires == acquires + 1
    });

    // Returning it resolves the report.
    let back = app.command("release");
    assert_eq!(count(&back, "releases"), releases + 1, "{back}");
    let resolved = wait_until(EVENT_TIMEOUT, || {
        leaks(&agent)
            .into_iter()
            .find(|r| r.id == leak.id && r.status == ReportStatus::Resolved)
    });
    assert!(
        resolved.is_some(),
        "the leak report was not resolved once the connection came back:\n{}",
        serde_json::to_string_pretty(&leaks(&agent)).unwrap_or_default()
    );
    wait_for_pool(&agent, pid, "all connections back", |p| {
        p.used == 0 && p.releases == releases + 1
    });
}

// ---------------------------------------------------------------------------
// bb8 and sqlx: leaks, a busy holder, an idle transaction and a waiter told
// apart (testapp/src/scenario.rs, one binary per pool)
// ---------------------------------------------------------------------------

/// Connections in the scenario apps' pools (all opened at the start).
const SCENARIO_MAX: u32 = 8;
const LEAK_S: f64 = 3.0;
const IDLE_IN_TX_S: f64 = 2.0;
const SLOW_ACQUIRE_S: f64 = 0.5;
/// The pools' acquire timeout in the apps: the waiter on the exhausted
/// pool gives up after this long.
const SCENARIO_TIMEOUT_MS: u64 = 1000;

/// Which pool a scenario app drives.
struct Scenario {
    /// The testapp binary.
    bin: &'static str,
    /// The pool's name, and the library it registers as.
    pool: &'static str,
    library: &'static str,
    /// Against MariaDB (`--system mysql`) rather than PostgreSQL.
    mysql: bool,
}

/// A connection the scenario app holds: its client address as the server
/// saw it, and when the test got it.
#[derive(Debug, Clone, Copy)]
struct Held {
    local: std::net::SocketAddr,
    at: Instant,
}

impl HeldConnection for Held {
    fn local_port(&self) -> u16 {
        self.local.port()
    }

    fn since(&self) -> Instant {
        self.at
    }
}

fn tid_of(answer: &Value) -> u32 {
    answer["tid"]
        .as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| panic!("no thread id in {answer}"))
}

#[test]
fn bb8_leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart() {
    leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart(Scenario {
        bin: "bb8_scenario",
        pool: "rust-bb8",
        library: "bb8",
        mysql: false,
    });
}

/// sqlx hides its sockets: the adapter names each connection by an id and
/// the address the server saw (see `sqlx_pool`), and the outcomes must be
/// those of the pools that name their sockets.
#[test]
fn sqlx_leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart() {
    leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart(Scenario {
        bin: "sqlx_scenario",
        pool: "rust-sqlx",
        library: "sqlx",
        mysql: false,
    });
}

/// The same with sqlx's MySQL pool, against MariaDB.
#[test]
fn sqlx_mysql_leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart() {
    leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart(Scenario {
        bin: "sqlx_scenario",
        pool: "rust-sqlx-mysql",
        library: "sqlx",
        mysql: true,
    });
}

fn leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart(scenario: Scenario) {
    if !require_kernel() {
        return;
    }
    let Scenario {
        bin,
        pool: name,
        library,
        mysql,
    } = scenario;
    // The server lives as long as the test (dropped at its end).
    let (port, system, _server): (u16, DbSystem, Box<dyn std::any::Any>) = if mysql {
        let db = MariaDb::start();
        (db.port, DbSystem::Mysql, Box::new(db))
    } else {
        let pg = Postgres::start();
        (pg.port, DbSystem::Postgresql, Box::new(pg))
    };
    let dir = TempDir::new("poolscope-adapter-scenario");
    let socket = dir.path().join("adapter.sock");
    let agent = Agent::start_with_config(
        &format!(
            "[adapter]\nsocket = \"{}\"\n\n[leaks]\nleak_threshold_seconds = {LEAK_S:.1}\n\
             quiet_seconds = {QUIET_SECONDS:.1}\nidle_in_transaction_seconds = {IDLE_IN_TX_S:.1}\n\
             slow_acquire_ms = {:.0}\n",
            socket.display(),
            SLOW_ACQUIRE_S * 1000.0
        ),
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(10), || socket.exists().then_some(())).is_some(),
        "the agent never made its adapter socket\n{}",
        agent.log()
    );
    let mut cmd = Command::new(testapp_bin().with_file_name(bin));
    cmd.args(["--port", &port.to_string()])
        .args(["--system", if mysql { "mysql" } else { "postgresql" }])
        .args(["--max", &SCENARIO_MAX.to_string(), "--pool", name])
        .args(["--timeout-ms", &SCENARIO_TIMEOUT_MS.to_string()])
        .env("POOLSCOPE_ADAPTER_SOCKET", &socket)
        // The leaks, the busy holder and the transaction are taken one
        // request after the other, maybe within the adapter's 1 ms
        // between captures: each must have its stack.
        .env("POOLSCOPE_ADAPTER_STACK_INTERVAL_US", "0");
    let (mut app, ready) = JsonLinesChild::start(&mut cmd, bin);
    let (pid, app_tid) = (app.pid, tid_of(&ready));
    assert_eq!(
        count(&ready, "connections"),
        u64::from(SCENARIO_MAX),
        "the pool opened its minimum (all) first: {ready}"
    );

    let pool = agent.wait_for_pool(pid, name, "the registration and the idle pool", |p| {
        p.max.is_some() && p.idle == u64::from(SCENARIO_MAX)
    });
    assert!(pool.from_adapter, "{pool:#?}");
    assert_eq!(pool.library.as_deref(), Some(library), "{pool:#?}");
    assert_eq!(pool.db_system, Some(SystemName::Read(system)), "{pool:#?}");
    assert_eq!(pool.min_idle, Some(SCENARIO_MAX), "{pool:#?}");

    let mut checkout = |id: &str, kind: &str| {
        let answer = app.request(json!({"op": "checkout", "id": id, "kind": kind}));
        assert_eq!(tid_of(&answer), app_tid, "{answer}");
        Held {
            local: answer["local_address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("the server told no client address: {answer}")),
            at: Instant::now(),
        }
    };
    let leaks = [checkout("leak1", "leak"), checkout("leak2", "leak")];
    let busy = checkout("busy", "busy");
    let tx = checkout("tx", "tx");
    // Healthy workers share what is left (nothing, until a release) and
    // must never be reported.
    app.request(json!({"op": "workers", "n": 2}));

    let mut seen = Seen::new(&agent, pid);
    seen.watch_for_first(
        LEAK_S,
        "2 leaked, 1 slow holder, 1 idle in transaction",
        |s| {
            leaks
                .iter()
                .all(|h| s.find(LeakKind::Leaked, h.local.port()).is_some())
                && s.find(LeakKind::SlowHolder, busy.local.port()).is_some()
                && s.find(LeakKind::IdleInTransaction, tx.local.port())
                    .is_some()
        },
    );

    // The pool as the app counts it (the workers paused) and as the agent
    // shows it.
    let state = app.request(json!({"op": "state"}));
    let (connections, idle) = (count(&state, "connections"), count(&state, "idle"));
    let pool = agent.wait_for_pool(pid, name, "the agent's pool to match the app's", |p| {
        p.used == connections - idle && p.idle == idle
    });
    assert_eq!(
        (pool.used, pool.idle, pool.max),
        (connections - idle, idle, Some(SCENARIO_MAX)),
        "agent used/idle/max vs the app's: {state}\n{pool:#?}"
    );
    app.request(json!({"op": "resume_workers"}));

    // A caller on the exhausted pool waits its acquire timeout and gives up.
    let wait = app.request(json!({"op": "exhaust_and_wait"}));
    assert_eq!(wait["result"], "timeout", "{wait}");
    assert_eq!(
        count(&wait, "active_while_waiting"),
        u64::from(SCENARIO_MAX),
        "{wait}"
    );
    app.request(json!({"op": "resume_workers"}));
    seen.watch(EVENT_TIMEOUT, "the slow acquire", |s| {
        !s.of_kind(LeakKind::SlowAcquire).is_empty()
    });

    seen.keep_watching();
    let mut expected: std::collections::BTreeSet<(LeakKind, Option<u16>)> = leaks
        .iter()
        .map(|h| (LeakKind::Leaked, Some(h.local.port())))
        .collect();
    expected.insert((LeakKind::SlowHolder, Some(busy.local.port())));
    expected.insert((LeakKind::IdleInTransaction, Some(tx.local.port())));
    expected.insert((LeakKind::SlowAcquire, None));
    seen.expect_kinds(expected);

    for (i, h) in leaks.iter().enumerate() {
        let r = seen.on_time(LeakKind::Leaked, h, LEAK_S, &format!("leak{}", i + 1));
        assert_eq!(r.status, ReportStatus::Open, "{r:#?}");
        assert_eq!(r.pool.as_deref(), Some(name), "{r:#?}");
        assert_eq!(
            r.local_address.as_deref(),
            Some(h.local.to_string().as_str()),
            "the connection the server saw: {r:#?}"
        );
        assert_eq!(r.holder_tid, Some(app_tid), "{r:#?}");
        expect_holder_stack(r, &format!("{bin}::scenario::take_a_connection_to_leak"));
    }
    let r = seen.on_time(LeakKind::SlowHolder, &busy, LEAK_S, "the busy holder");
    assert_eq!(r.pool.as_deref(), Some(name), "{r:#?}");
    // Its stack too: taken in the app (not by the leaks' function).
    let stack = r.holder_stack.as_deref().unwrap_or_default();
    assert!(
        stack
            .first()
            .is_some_and(|f| f.starts_with("adapters/rust/testapp/src/"))
            && !stack
                .iter()
                .any(|f| f.contains("take_a_connection_to_leak")),
        "{r:#?}"
    );
    let r = seen.on_time(
        LeakKind::IdleInTransaction,
        &tx,
        IDLE_IN_TX_S,
        "the idle transaction",
    );
    assert_eq!(r.tx_state, Some(TxState::InTransaction), "{r:#?}");
    let slow = seen.of_kind(LeakKind::SlowAcquire);
    assert_eq!(slow.len(), 1, "{}", seen.dump());
    let r = slow[0];
    assert_eq!(r.pool.as_deref(), Some(name), "{r:#?}");
    assert_eq!(r.resolution.as_deref(), Some("timed out"), "{r:#?}");
    assert_eq!(
        r.holder_tid,
        Some(tid_of(&wait)),
        "the waiting thread: {r:#?}"
    );
    assert_eq!(
        (r.pool_used, r.pool_max),
        (Some(u64::from(SCENARIO_MAX)), Some(SCENARIO_MAX)),
        "the exhausted pool: {r:#?}"
    );
    assert!(r.pool_pending.is_some_and(|p| p >= 1), "{r:#?}");

    // Returning a leak and the busy one resolves their reports.
    app.request(json!({"op": "release", "id": "leak1"}));
    let released = app.request(json!({"op": "release", "id": "busy"}));
    assert!(
        count(&released, "queries") > 0,
        "the holder kept querying: {released}"
    );
    let ids: Vec<u64> = [
        seen.find(LeakKind::Leaked, leaks[0].local.port()),
        seen.find(LeakKind::SlowHolder, busy.local.port()),
    ]
    .into_iter()
    .map(|found| found.unwrap().0.id)
    .collect();
    seen.watch(
        EVENT_TIMEOUT,
        "the returned connections' reports to resolve",
        |s| {
            ids.iter().all(|id| {
                s.latest[id].status == ReportStatus::Resolved
                    && s.latest[id].resolution.as_deref() == Some("returned to the pool")
            })
        },
    );
    let end = app.request(json!({"op": "exit"}));
    assert!(count(&end, "worker_cycles") > 0, "{end}");
    assert_eq!(count(&end, "worker_errors"), 0, "{end}");
    assert_eq!(end["adapter"]["dropped"].as_u64(), Some(0), "{end}");
}
