//! The JVM pool adapter (`adapters/java`) against the real agent, the real
//! kernel and real servers: a HikariCP pool instrumented with
//! `Poolscope.instrument` runs in a Java child process
//! (`adapters/java/testapp`) whose pid the test knows, over the agent's
//! Unix *stream* socket. The application writes its own truth (which thread
//! took which connection, the connection's client address as the database
//! server sees it, HikariCP's own counters), and the leak reports and pool
//! the agent shows must agree with it.
//!
//! Needs root (BPF), PostgreSQL and MariaDB, a JDK and Debian's HikariCP,
//! pgjdbc, MariaDB Connector/J and SLF4J jars (`cargo xtask setup`
//! installs them); under `CI=true` a missing one fails the test. The jars
//! are built here from the current source (java-build, as xtask does).
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Instant,
};

use java_build::Built;
use poolscope_tests::{
    assert_golden_shapes, golden_shapes, json, require_kernel, Agent, DbSystem, HeldConnection,
    JsonLinesChild, LeakKind, LeakReport, MariaDb, PoolView, Postgres, ReportStatus, Seen,
    SystemName, TempDir, TxState, Value, EVENT_TIMEOUT, LOCALHOST_V4,
};

/// Short thresholds, so that the scenario takes seconds. Idle in
/// transaction is shorter than the leak threshold, as in adapter_python.rs.
const LEAK_S: f64 = 3.0;
const QUIET_S: f64 = 1.5;
const IDLE_IN_TX_S: f64 = 2.0;
const ABANDONED_S: f64 = 4.0;
const SLOW_ACQUIRE_S: f64 = 0.5;
/// HikariCP's connectionTimeout in the app: the waiter on the exhausted
/// pool gives up after it.
const CONNECTION_TIMEOUT_MS: u64 = 1000;

fn thresholds() -> String {
    [
        ("leak_threshold_seconds", LEAK_S),
        ("quiet_seconds", QUIET_S),
        ("idle_in_transaction_seconds", IDLE_IN_TX_S),
        ("abandoned_seconds", ABANDONED_S),
        ("slow_acquire_ms", SLOW_ACQUIRE_S * 1000.0),
    ]
    .iter()
    .map(|(k, v)| format!("{k} = {v:?}\n"))
    .collect()
}

/// The adapter's jars, built once per test process into target/java; None
/// (skip) when the JDK or Debian's jars are missing, a failure under CI.
fn java_adapter() -> Option<&'static Built> {
    static BUILT: OnceLock<Option<Built>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let missing = java_build::missing();
            if !missing.is_empty() {
                let text = format!(
                    "the JVM adapter tests need {}; run cargo xtask setup",
                    missing.join(", ")
                );
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{text}");
                }
                eprintln!("skipped: {text}");
                return None;
            }
            let out = target_dir().join("java");
            Some(
                java_build::build(&workspace_root(), &out)
                    .unwrap_or_else(|e| panic!("cannot build the JVM adapter: {e}")),
            )
        })
        .as_ref()
}

fn workspace_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().expect("tests/ has a parent").to_path_buf()
}

/// `<target>` of this test binary (`<target>/<profile>/deps/adapter_java-*`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .expect("the test binary lives in <target>/<profile>/deps")
}

/// An agent whose datagram and stream adapter sockets are in a temp dir.
struct Rig {
    agent: Agent,
    stream: PathBuf,
    _dir: TempDir,
}

impl Rig {
    fn start() -> Rig {
        let dir = TempDir::new("poolscope-java-adapter");
        let socket = dir.path().join("adapter.sock");
        let stream = dir.path().join("adapter-stream.sock");
        let config = format!(
            "[adapter]\nsocket = {:?}\nstream_socket = {:?}\n\n[leaks]\n{}",
            socket.to_string_lossy(),
            stream.to_string_lossy(),
            thresholds()
        );
        let agent = Agent::start_with_config(&config, &[]);
        assert!(
            stream.exists(),
            "the agent made no stream socket at {}\n{}",
            stream.display(),
            agent.log()
        );
        Rig {
            agent,
            stream,
            _dir: dir,
        }
    }
}

/// `adapters/java/testapp`: a HikariCP pool driven with one JSON request per
/// line.
struct JavaApp {
    app: JsonLinesChild,
    pid: u32,
    /// The app's main thread, which serves requests and takes the held
    /// connections.
    tid: u32,
}

/// What the app's pool connects to.
struct Db<'a> {
    kind: &'a str,
    jdbc_url: String,
    user: &'a str,
}

impl JavaApp {
    fn spawn(built: &Built, stream: &Path, db: &Db, pool: &str, max: u32) -> JavaApp {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(built.testapp_classpath())
            // HikariCP's own log (slf4j-simple, stderr): warnings only.
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg(java_build::TESTAPP_MAIN)
            .env("POOLSCOPE_ADAPTER_STREAM_SOCKET", stream)
            .env("DB", db.kind)
            .env("JDBC_URL", &db.jdbc_url)
            .env("DB_USER", db.user)
            .env("POOL_NAME", pool)
            .env("POOL_MAX", max.to_string())
            .env("CONNECTION_TIMEOUT_MS", CONNECTION_TIMEOUT_MS.to_string())
            // A capture at every checkout: the healthy workers check out
            // every ~20 ms, and one within the default 1 ms capture
            // interval before a leak's checkout would take its stack.
            .env("POOLSCOPE_ADAPTER_STACK_INTERVAL_US", "0");
        let (app, ready) = JsonLinesChild::start(&mut cmd, "java");
        assert_eq!(
            ready["total"].as_u64(),
            Some(u64::from(max)),
            "HikariCP opened the whole fixed pool: {ready}"
        );
        JavaApp {
            pid: app.pid,
            tid: tid_of(&ready),
            app,
        }
    }

    fn request(&mut self, request: Value) -> Value {
        self.app.request(request)
    }

    /// Step: the app takes a connection on its main thread and holds it as
    /// `id`: `leak` (quiet), `busy` (queries every 100 ms), `tx` (a
    /// transaction begun, then quiet).
    fn checkout(&mut self, id: &str, kind: &str) -> Held {
        let answer = self.request(json!({"op": "checkout", "id": id, "kind": kind}));
        assert_eq!(tid_of(&answer), self.tid, "{answer}");
        let local: SocketAddr = answer["local_address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the server told no client address: {answer}"));
        Held {
            local,
            at: Instant::now(),
        }
    }
}

fn tid_of(answer: &Value) -> u32 {
    answer["tid"]
        .as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| panic!("no thread id in {answer}"))
}

fn count(answer: &Value, key: &str) -> u64 {
    answer[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {answer}"))
}

/// A held connection: its client address as the database server saw it,
/// and when the test got it.
#[derive(Debug, Clone, Copy)]
struct Held {
    local: SocketAddr,
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

/// Step: the adapter registered `name` for `pid`, every connection of the
/// fixed pool idle, with `server` and `namespace`.
fn expect_registration(
    agent: &Agent,
    pid: u32,
    name: &str,
    max: u32,
    db_system: DbSystem,
    server: &str,
    namespace: &str,
) -> PoolView {
    let pool = agent.wait_for_pool(pid, name, "the registration and every connection", |p| {
        p.max.is_some() && p.idle == u64::from(max)
    });
    assert!(pool.from_adapter, "{pool:#?}");
    assert_eq!(pool.library.as_deref(), Some("HikariCP"), "{pool:#?}");
    assert_eq!(
        pool.db_system,
        Some(SystemName::Read(db_system)),
        "{pool:#?}"
    );
    assert_eq!(pool.server.as_deref(), Some(server), "{pool:#?}");
    assert_eq!(pool.namespace.as_deref(), Some(namespace), "{pool:#?}");
    assert_eq!(pool.max, Some(max), "maximumPoolSize: {pool:#?}");
    assert_eq!(pool.min_idle, Some(max), "minimumIdle: {pool:#?}");
    assert_eq!((pool.used, pool.pending), (0, 0), "{pool:#?}");
    pool
}

/// One report of `kind` as GET /api/v1/leaks serves it, pretty-printed.
fn api_report_json(agent: &Agent, id: u64) -> String {
    let body = agent.get("/api/v1/leaks").unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    let report = v["reports"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"].as_u64() == Some(id)))
        .cloned()
        .unwrap_or(Value::Null);
    serde_json::to_string_pretty(&report).unwrap_or_default()
}

/// The test app's method that takes a `leak` checkout's connection
/// (PoolApp.leakTheConnectionOnPurpose): the code a leak's holder stack
/// must name.
const LEAKING_METHOD: &str = "io.poolscope.testapp.PoolApp.leakTheConnectionOnPurpose(";

/// Step: the leak report carries the adapter's holder stack (the checkout
/// was held past stack_after, 1 s, well before the 3 s leak threshold),
/// which names the app's method that took the connection, with no frame
/// of HikariCP or of the adapter before it (innermost first).
fn expect_holder_stack(r: &LeakReport) {
    let stack = r
        .holder_stack
        .as_deref()
        .unwrap_or_else(|| panic!("no holder_stack in the leak report: {r:#?}"));
    let at = stack
        .iter()
        .position(|f| f.starts_with(LEAKING_METHOD))
        .unwrap_or_else(|| panic!("no frame of {LEAKING_METHOD}..) in {stack:#?}"));
    for frame in &stack[..at] {
        assert!(
            !frame.starts_with("com.zaxxer.hikari.") && !frame.starts_with("io.poolscope.adapter."),
            "a frame of the pool or the adapter above the application's: {stack:#?}"
        );
    }
    assert!(
        stack.len() <= 32
            && stack
                .iter()
                .all(|f| !f.is_empty() && f.chars().count() <= 256),
        "{stack:#?}"
    );
}

const POOL: &str = "java-orders";
const POOL_MAX: u32 = 8;

#[test]
fn hikari_leaks_busy_holder_idle_transaction_and_slow_acquire_are_told_apart() {
    if !require_kernel() {
        return;
    }
    let Some(built) = java_adapter() else {
        return;
    };
    let pg = Postgres::start();
    let rig = Rig::start();
    let agent = &rig.agent;
    let server = format!("{LOCALHOST_V4}:{}", pg.port);
    let db = Db {
        kind: "postgresql",
        jdbc_url: format!("jdbc:postgresql://{server}/postgres"),
        user: "postgres",
    };
    let mut app = JavaApp::spawn(built, &rig.stream, &db, POOL, POOL_MAX);
    let pid = app.pid;
    expect_registration(
        agent,
        pid,
        POOL,
        POOL_MAX,
        DbSystem::Postgresql,
        &server,
        "postgres",
    );

    // Two healthy workers borrow, query and return in a loop throughout.
    app.request(json!({"op": "workers", "n": 2}));
    let leaks = [app.checkout("leak1", "leak"), app.checkout("leak2", "leak")];
    let busy = app.checkout("busy", "busy");
    let tx = app.checkout("tx", "tx");
    let ports: BTreeSet<u16> = leaks
        .iter()
        .chain([&busy, &tx])
        .map(|h| h.local.port())
        .collect();
    assert_eq!(ports.len(), 4, "four distinct connections");

    let mut seen = Seen::new(agent, pid);
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

    // The pool as HikariCP counts it (HikariPoolMXBean, the workers paused
    // so that it holds still) and as the agent shows it.
    let mx = app.request(json!({"op": "mxbean"}));
    let (active, idle, total) = (
        count(&mx, "active"),
        count(&mx, "idle"),
        count(&mx, "total"),
    );
    assert_eq!((active, total), (4, u64::from(POOL_MAX)), "{mx}");
    let pool = agent.wait_for_pool(pid, POOL, "the agent's pool to match HikariCP's", |p| {
        p.used == active && p.idle == idle
    });
    assert_eq!(
        (pool.used, pool.idle, pool.max.map(u64::from)),
        (active, idle, Some(total)),
        "agent used/idle/max vs HikariPoolMXBean active/idle/total: {mx}\n{pool:#?}"
    );
    assert_eq!(pool.pending, 0, "{pool:#?}");
    app.request(json!({"op": "resume_workers"}));

    // A caller on the exhausted pool: the app takes every idle connection
    // (workers paused), then a waiter thread asks for one and times out
    // after connectionTimeout.
    let wait = app.request(json!({"op": "exhaust_and_wait"}));
    assert_eq!(wait["result"], "timeout", "{wait}");
    assert_eq!(
        count(&wait, "active_while_waiting"),
        u64::from(POOL_MAX),
        "{wait}"
    );
    let waiter_tid = tid_of(&wait);
    app.request(json!({"op": "resume_workers"}));
    seen.watch(EVENT_TIMEOUT, "the slow acquire", |s| {
        !s.of_kind(LeakKind::SlowAcquire).is_empty()
    });

    // Keep watching: the busy one must stay a slow holder and nothing else
    // (no healthy worker's or idle connection, no blocker) may show up.
    seen.keep_watching();
    let mut expected: BTreeSet<(LeakKind, Option<u16>)> = leaks
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
        assert_eq!(r.pool.as_deref(), Some(POOL), "{r:#?}");
        assert_eq!(r.process, "java", "{r:#?}");
        assert_eq!(
            r.db_system,
            Some(SystemName::Read(DbSystem::Postgresql)),
            "{r:#?}"
        );
        assert_eq!(r.server.as_deref(), Some(server.as_str()), "{r:#?}");
        assert_eq!(
            r.local_address.as_deref(),
            Some(h.local.to_string().as_str()),
            "the connection the server saw: {r:#?}"
        );
        assert_eq!(
            r.holder_tid,
            Some(app.tid),
            "the app's main thread took it: {r:#?}"
        );
        assert!(r.held_for_seconds.is_some_and(|s| s >= LEAK_S), "{r:#?}");
        expect_holder_stack(r);
    }
    let r = seen.on_time(LeakKind::SlowHolder, &busy, LEAK_S, "the busy holder");
    assert_eq!(r.status, ReportStatus::Open, "{r:#?}");
    assert_eq!(r.pool.as_deref(), Some(POOL), "{r:#?}");
    assert_eq!(r.holder_tid, Some(app.tid), "{r:#?}");
    // The busy connection was taken in the app's request handler.
    assert!(
        r.holder_stack
            .as_ref()
            .and_then(|s| s.first())
            .is_some_and(|f| f.starts_with("io.poolscope.testapp.PoolApp.handle(")),
        "{r:#?}"
    );
    let r = seen.on_time(
        LeakKind::IdleInTransaction,
        &tx,
        IDLE_IN_TX_S,
        "the idle transaction",
    );
    assert_eq!(r.status, ReportStatus::Open, "{r:#?}");
    assert_eq!(r.pool.as_deref(), Some(POOL), "{r:#?}");
    assert_eq!(r.tx_state, Some(TxState::InTransaction), "{r:#?}");

    let slow = seen.of_kind(LeakKind::SlowAcquire);
    assert_eq!(slow.len(), 1, "{}", seen.dump());
    let r = slow[0];
    assert_eq!(r.pool.as_deref(), Some(POOL), "{r:#?}");
    assert_eq!(r.resolution.as_deref(), Some("timed out"), "{r:#?}");
    assert_eq!(r.holder_tid, Some(waiter_tid), "the waiting thread: {r:#?}");
    assert!(
        r.wait_seconds.is_some_and(|w| (0.9..2.5).contains(&w)),
        "waited connectionTimeout: {r:#?}"
    );
    assert_eq!(
        (r.pool_used, r.pool_max),
        (Some(u64::from(POOL_MAX)), Some(POOL_MAX)),
        "the exhausted pool: {r:#?}"
    );
    assert!(r.pool_pending.is_some_and(|p| p >= 1), "{r:#?}");

    let leak1 = seen
        .find(LeakKind::Leaked, leaks[0].local.port())
        .unwrap()
        .0
        .id;
    eprintln!(
        "a HikariCP leak as GET /api/v1/leaks serves it:\n{}",
        api_report_json(agent, leak1)
    );

    // Returning a leaked connection resolves its report; stopping the busy
    // holder and giving it back resolves its.
    app.request(json!({"op": "release", "id": "leak1"}));
    let released = app.request(json!({"op": "release", "id": "busy"}));
    assert!(
        count(&released, "queries") as f64 >= LEAK_S / 0.1 / 2.0,
        "the holder kept querying: {released}"
    );
    let holder = seen
        .find(LeakKind::SlowHolder, busy.local.port())
        .unwrap()
        .0
        .id;
    seen.watch(
        EVENT_TIMEOUT,
        "the returned connections' reports to resolve",
        |s| {
            [leak1, holder].iter().all(|id| {
                s.latest[id].status == ReportStatus::Resolved
                    && s.latest[id].resolution.as_deref() == Some("returned to the pool")
            })
        },
    );
    let (r, _) = seen.find(LeakKind::Leaked, leaks[1].local.port()).unwrap();
    assert_eq!(r.status, ReportStatus::Open, "still leaked: {r:#?}");

    let end = app.request(json!({"op": "exit"}));
    assert!(count(&end, "worker_cycles") > 0, "{end}");
    assert_eq!(count(&end, "worker_errors"), 0, "{end}");
    assert_eq!(
        end["adapter"]["dropped"].as_u64(),
        Some(0),
        "the adapter dropped messages: {end}"
    );
}

#[test]
fn mariadb_connections_are_named_by_their_socket() {
    if !require_kernel() {
        return;
    }
    let Some(built) = java_adapter() else {
        return;
    };
    let maria = MariaDb::start();
    let rig = Rig::start();
    let agent = &rig.agent;
    let server = format!("{LOCALHOST_V4}:{}", maria.port);
    let db = Db {
        kind: "mariadb",
        jdbc_url: format!("jdbc:mariadb://{server}/{}", MariaDb::DATABASE),
        user: MariaDb::USER,
    };
    let pool = "java-maria";
    let mut app = JavaApp::spawn(built, &rig.stream, &db, pool, 2);
    let pid = app.pid;
    expect_registration(
        agent,
        pid,
        pool,
        2,
        DbSystem::Mysql,
        &server,
        MariaDb::DATABASE,
    );
    let leak = app.checkout("leak", "leak");
    let mut seen = Seen::new(agent, pid);
    seen.watch_for_first(LEAK_S, "the MariaDB connection leaked", |s| {
        s.find(LeakKind::Leaked, leak.local.port()).is_some()
    });
    let r = seen.on_time(LeakKind::Leaked, &leak, LEAK_S, "the MariaDB leak");
    assert_eq!(r.pool.as_deref(), Some(pool), "{r:#?}");
    assert_eq!(
        r.db_system,
        Some(SystemName::Read(DbSystem::Mysql)),
        "{r:#?}"
    );
    assert_eq!(
        r.local_address.as_deref(),
        Some(leak.local.to_string().as_str()),
        "the connection MariaDB saw: {r:#?}"
    );
    assert_eq!(r.holder_tid, Some(app.tid), "{r:#?}");
    expect_holder_stack(r);
    let id = r.id;
    app.request(json!({"op": "release", "id": "leak"}));
    seen.watch(EVENT_TIMEOUT, "the leak to resolve", |s| {
        s.latest[&id].status == ReportStatus::Resolved
    });
    agent.wait_for_pool(pid, pool, "every connection back", |p| {
        p.used == 0 && p.idle == 2
    });
    let end = app.request(json!({"op": "exit"}));
    assert_eq!(end["adapter"]["dropped"].as_u64(), Some(0), "{end}");
}

/// Issue 16: a TLS library the agent does not hook, Java's own (JSSE, which
/// pgjdbc encrypts with): the connection is `encrypted` without
/// `plaintext`, no statement is read, its request/response turns are still
/// counted, and the adapter's leak report names it as over plaintext.
#[test]
fn jsse_tls_connections_are_timed_by_turns_and_said_unread() {
    if !require_kernel() {
        return;
    }
    let Some(built) = java_adapter() else {
        return;
    };
    let pg = Postgres::start_tls();
    let rig = Rig::start();
    let agent = &rig.agent;
    let server = format!("{LOCALHOST_V4}:{}", pg.port);
    let db = Db {
        kind: "postgresql",
        // pgjdbc's sslmode=require: TLS, the certificate not verified.
        jdbc_url: format!("jdbc:postgresql://{server}/postgres?sslmode=require"),
        user: "postgres",
    };
    let pool = "java-tls";
    let mut app = JavaApp::spawn(built, &rig.stream, &db, pool, 2);
    let pid = app.pid;
    expect_registration(
        agent,
        pid,
        pool,
        2,
        DbSystem::Postgresql,
        &server,
        "postgres",
    );
    let leak = app.checkout("leak", "leak");
    let port = leak.local.port();
    let ssl = pg.psql_unix(&format!(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.client_port = {port}"
    ));
    assert_eq!(ssl, "t", "the server's session from port {port} is TLS");
    let c = agent.wait_for(pid, "the JSSE connection's turns", |cs| {
        cs.iter()
            .find(|c| c.local_port == Some(port) && c.round_trips > 0)
            .cloned()
    });
    assert!(c.encrypted && !c.plaintext, "JSSE is not hooked: {c:#?}");
    assert_eq!(c.last_query, None, "{c:#?}");
    assert_eq!(
        c.db_user, None,
        "the startup message went inside TLS: {c:#?}"
    );
    let mut seen = Seen::new(agent, pid);
    seen.watch_for_first(LEAK_S, "the TLS connection leaked", |s| {
        s.find(LeakKind::Leaked, port).is_some()
    });
    let r = seen.on_time(LeakKind::Leaked, &leak, LEAK_S, "the TLS leak");
    assert_eq!(r.pool.as_deref(), Some(pool), "{r:#?}");
    assert_eq!(r.last_query, None, "nothing read over JSSE: {r:#?}");
    app.request(json!({"op": "release", "id": "leak"}));
    let end = app.request(json!({"op": "exit"}));
    assert_eq!(end["adapter"]["dropped"].as_u64(), Some(0), "{end}");
}

/// The adapter's own unit tests (adapters/java/src/test/java): no agent,
/// database or kernel needed.
#[test]
fn java_adapter_unit_tests_pass() {
    let Some(built) = java_adapter() else {
        return;
    };
    let dir = TempDir::new("poolscope-java-golden");
    let sent = dir.path().join("sent.jsonl");
    let output = Command::new("java")
        .arg("-cp")
        .arg(built.unit_test_classpath())
        .arg(java_build::UNIT_TESTS_MAIN)
        .arg(&sent)
        .env_remove("POOLSCOPE_ADAPTER_STREAM_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run java");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.lines().any(|l| l.starts_with("ok ")),
        "{} failed ({}):\n{stdout}\n{}",
        java_build::UNIT_TESTS_MAIN,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // Every message the unit tests saw sent has its kind's golden shape,
    // and every kind was sent.
    let lines: Vec<String> = std::fs::read_to_string(&sent)
        .unwrap_or_else(|e| panic!("the unit tests wrote no {}: {e}", sent.display()))
        .lines()
        .map(str::to_string)
        .collect();
    let kinds = assert_golden_shapes(&lines);
    let all: std::collections::BTreeSet<String> = golden_shapes().into_keys().collect();
    assert_eq!(kinds, all, "kinds the Java adapter's tests sent");
}
