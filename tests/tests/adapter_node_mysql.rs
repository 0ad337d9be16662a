//! The Node.js adapter's mysql2 support (`adapters/node`, issue 12) against
//! the real kernel, a real MariaDB and the agent. A mysql2 promise pool of 8
//! in a Node child (`test/fixtures/mysql_app.js`) writes its own truth:
//! 2 quiet leaks, 1 busy holder, 1 transaction left open, 2 healthy workers
//! (borrow/query/release loops) and, once the pool is exhausted, a caller
//! that waits. The agent must report each case as what it is, nothing on the
//! healthy or idle connections, and show the pool as mysql2 itself counts it
//! (`_allConnections`, `_freeConnections`, `_connectionQueue`).
//!
//! The adapter sends on the agent's stream socket. Needs root (BPF),
//! MariaDB, node and `npm ci` in adapters/node (`cargo xtask setup`); under
//! `CI=true` a missing one fails the test.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    thread,
    time::{Duration, Instant},
};

use poolscope_tests::*;

const POOL: &str = "node-mysql";
const POOL_MAX: u32 = 8;
/// Thresholds short enough for seconds-long scenarios. The fillers that
/// exhaust the pool are held for about 2 s, well under the leak threshold.
const LEAK_S: f64 = 4.0;
const QUIET_S: f64 = 1.5;
const IDLE_IN_TX_S: f64 = 2.0;
const SLOW_ACQUIRE_S: f64 = 0.5;
/// How late a report may come after its threshold (the agent evaluates
/// once a second, the test polls), and how early (the test's clock starts
/// when the app answered).
const LATE: Duration = Duration::from_secs(3);
const EARLY: Duration = Duration::from_millis(300);

/// A connection the app holds, as it named it, and since when.
#[derive(Debug, Clone)]
struct Conn {
    fd: i32,
    port: u16,
    local_address: String,
    at: Instant,
}

fn conn_of(answer: &Value) -> Conn {
    Conn {
        fd: answer["fd"]
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .unwrap(),
        port: answer["local_port"]
            .as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .unwrap(),
        local_address: answer["local_address"].as_str().unwrap().to_string(),
        at: Instant::now(),
    }
}

/// mysql2's own pool state in an app's answer: (used, idle, max, pending).
fn app_pool(answer: &Value) -> (u64, u64, u64, u64) {
    let p = &answer["pool"];
    let n = |k: &str| {
        p[k].as_u64()
            .unwrap_or_else(|| panic!("no pool.{k} in {answer}"))
    };
    (n("used"), n("free"), n("max"), n("queue"))
}

/// Step: the agent shows the pool as mysql2 counted it in `answer`.
fn expect_pool_as_app(agent: &Agent, pid: u32, answer: &Value, what: &str) -> PoolView {
    let (used, idle, max, pending) = app_pool(answer);
    let pool = agent.wait_for_pool(pid, POOL, what, |p| {
        (p.used, p.idle, p.max.map(u64::from), p.pending) == (used, idle, Some(max), pending)
    });
    eprintln!(
        "{what}: mysql2 used/idle/max/pending = {used}/{idle}/{max}/{pending}, agent the same: {:?}",
        (pool.used, pool.idle, pool.max, pool.pending)
    );
    pool
}

/// Every report of one pid seen while polling (latest version by id, and
/// when the test first saw it).
struct Reports<'a> {
    agent: &'a Agent,
    pid: u32,
    first: BTreeMap<u64, Instant>,
    latest: BTreeMap<u64, LeakReport>,
}

impl Reports<'_> {
    fn poll(&mut self) {
        let now = Instant::now();
        for r in self
            .agent
            .leaks_cli()
            .into_iter()
            .filter(|r| r.pid == self.pid)
        {
            self.first.entry(r.id).or_insert(now);
            self.latest.insert(r.id, r);
        }
    }

    fn on(&self, kind: LeakKind, c: &Conn) -> Option<&LeakReport> {
        self.latest
            .values()
            .find(|r| r.kind == kind && local_port(r) == Some(c.port))
    }

    fn of(&self, kind: LeakKind) -> Vec<&LeakReport> {
        self.latest.values().filter(|r| r.kind == kind).collect()
    }

    fn dump(&self) -> String {
        serde_json::to_string_pretty(&self.latest.values().collect::<Vec<_>>()).unwrap_or_default()
    }

    /// Step: polls until `done` accepts what was seen; panics with it
    /// after `timeout`.
    fn watch(&mut self, timeout: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} (pid {})\n{}\n--- pools ---\n{}\n--- agent log ---\n{}",
                self.pid,
                self.dump(),
                serde_json::to_string_pretty(&self.agent.pools()).unwrap_or_default(),
                self.agent.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The report of `kind` on `c`, first seen `threshold` after `c` began.
    fn on_time(&self, kind: LeakKind, c: &Conn, threshold: f64) -> &LeakReport {
        let r = self
            .on(kind, c)
            .unwrap_or_else(|| panic!("no {kind:?} on {c:?}\n{}", self.dump()));
        let after = self.first[&r.id].saturating_duration_since(c.at);
        let threshold = Duration::from_secs_f64(threshold);
        assert!(
            after + EARLY >= threshold && after <= threshold + LATE,
            "{kind:?} on {c:?} first seen {after:?} after it began, threshold {threshold:?}\n{r:#?}"
        );
        r
    }
}

#[test]
fn mysql2_leaks_busy_holder_open_transaction_and_exhausted_pool_are_told_apart() {
    if !require_kernel() || !require_node_adapter() {
        return;
    }
    let db = MariaDb::start();
    let dir = TempDir::new("poolscope-node-mysql");
    let socket = dir.path().join("adapter.sock");
    let agent = Agent::start_with_config(
        &adapter_config(
            &socket,
            &[
                ("leak_threshold_seconds", LEAK_S),
                ("quiet_seconds", QUIET_S),
                ("idle_in_transaction_seconds", IDLE_IN_TX_S),
                ("slow_acquire_ms", SLOW_ACQUIRE_S * 1000.0),
            ],
        ),
        &[],
    );
    let stream = stream_socket_beside(&socket);
    assert!(
        stream.exists(),
        "no stream socket {}\n{}",
        stream.display(),
        agent.log()
    );
    let mut app = NodeApp::spawn(
        "test/fixtures/mysql_app.js",
        &stream,
        &[
            ("MYSQL_HOST", LOCALHOST_V4.to_string()),
            ("MYSQL_PORT", db.port.to_string()),
            ("MYSQL_USER", MariaDb::USER.to_string()),
            ("MYSQL_DATABASE", MariaDb::DATABASE.to_string()),
            ("POOL_NAME", POOL.to_string()),
            ("POOL_MAX", POOL_MAX.to_string()),
        ],
    );
    let pid = app.pid;
    // Node runs a pool's callbacks on the event loop's thread: the adapter
    // sends its OS tid (the pid, on the main thread) as the holder's tid.
    let tid = app.ready["tid"]
        .as_u64()
        .and_then(|t| u32::try_from(t).ok());
    assert_eq!(tid, Some(pid), "{}", app.ready);
    let server = format!("{LOCALHOST_V4}:{}", db.port);

    let pool = agent.wait_for_pool(pid, POOL, "the registration", |p| p.max.is_some());
    assert!(pool.from_adapter, "{pool:#?}");
    assert_eq!(pool.max, Some(POOL_MAX), "connectionLimit: {pool:#?}");
    assert_eq!(
        pool.db_system,
        Some(SystemName::Read(DbSystem::Mysql)),
        "{pool:#?}"
    );
    assert_eq!(pool.library.as_deref(), Some("mysql2"), "{pool:#?}");
    assert_eq!(pool.server.as_deref(), Some(server.as_str()), "{pool:#?}");
    assert_eq!(
        pool.namespace.as_deref(),
        Some(MariaDb::DATABASE),
        "{pool:#?}"
    );

    // Two healthy workers, then the cases, each on its own connection.
    app.request(json!({"op": "workers_start", "n": 2, "pause_ms": 20}));
    let leaks: Vec<Conn> = ["leak1", "leak2"]
        .iter()
        .map(|id| conn_of(&app.request(json!({"op": "hold", "id": id}))))
        .collect();
    let busy = conn_of(&app.request(json!({"op": "hold", "id": "busy"})));
    app.request(json!({"op": "busy", "id": "busy", "interval_ms": 100}));
    let tx = conn_of(&app.request(json!({"op": "hold", "id": "tx"})));
    app.request(json!({"op": "begin", "id": "tx"}));
    let ports: BTreeSet<u16> = leaks.iter().chain([&busy, &tx]).map(|c| c.port).collect();
    assert_eq!(ports.len(), 4, "four distinct connections");

    let mut seen = Reports {
        agent: &agent,
        pid,
        first: BTreeMap::new(),
        latest: BTreeMap::new(),
    };
    seen.watch(
        Duration::from_secs_f64(LEAK_S) + LATE + Duration::from_secs(5),
        "2 leaked, 1 slow holder, 1 idle in transaction",
        |s| {
            leaks.iter().all(|c| s.on(LeakKind::Leaked, c).is_some())
                && s.on(LeakKind::SlowHolder, &busy).is_some()
                && s.on(LeakKind::IdleInTransaction, &tx).is_some()
        },
    );
    for (i, c) in leaks.iter().enumerate() {
        let r = seen.on_time(LeakKind::Leaked, c, LEAK_S);
        assert_eq!(r.status, ReportStatus::Open, "{r:#?}");
        assert_eq!(r.pool.as_deref(), Some(POOL), "{r:#?}");
        assert_eq!(
            r.db_system,
            Some(SystemName::Read(DbSystem::Mysql)),
            "{r:#?}"
        );
        assert_eq!(r.server.as_deref(), Some(server.as_str()), "{r:#?}");
        assert_eq!(r.fd, Some(c.fd), "{r:#?}");
        assert_eq!(
            r.local_address.as_deref(),
            Some(c.local_address.as_str()),
            "{r:#?}"
        );
        assert_eq!(r.holder_tid, tid, "the event loop's thread took it: {r:#?}");
        assert!(r.held_for_seconds.is_some_and(|s| s >= LEAK_S), "{r:#?}");
        if i == 0 {
            eprintln!(
                "a mysql2 leak as the agent reports it:\n{}",
                serde_json::to_string_pretty(r).unwrap_or_default()
            );
        }
    }
    let r = seen.on_time(LeakKind::SlowHolder, &busy, LEAK_S);
    assert_eq!(
        (r.pool.as_deref(), r.fd),
        (Some(POOL), Some(busy.fd)),
        "{r:#?}"
    );
    let r = seen.on_time(LeakKind::IdleInTransaction, &tx, IDLE_IN_TX_S);
    assert_eq!(
        (r.pool.as_deref(), r.fd),
        (Some(POOL), Some(tx.fd)),
        "{r:#?}"
    );
    assert_eq!(r.tx_state, Some(TxState::InTransaction), "{r:#?}");

    // The pool at rest (workers paused between cycles): as mysql2 counts it.
    let paused = app.request(json!({"op": "workers_pause"}));
    assert!(
        paused["cycles"].as_u64().unwrap() > 10,
        "the workers worked: {paused}"
    );
    let at_rest = expect_pool_as_app(&agent, pid, &paused, "the pool at rest");
    assert_eq!(at_rest.used, 4, "{at_rest:#?}");

    // Exhausted: every connection out, then a caller that waits.
    let fill = app.request(json!({"op": "fill", "prefix": "fill"}));
    let fillers: Vec<String> = fill["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        app_pool(&fill),
        (u64::from(POOL_MAX), 0, u64::from(POOL_MAX), 0),
        "{fill}"
    );
    // The caller comes at once: the agent counts the pool as full even
    // while some of the new connections' acquire_ends wait for the kernel
    // to show their sockets.
    let waiter = app.request(json!({"op": "waiter", "id": "waiter"}));
    let queued_at = Instant::now();
    assert_eq!(
        app_pool(&waiter).3,
        1,
        "the caller waits in mysql2's queue: {waiter}"
    );
    expect_pool_as_app(&agent, pid, &waiter, "the exhausted pool and its waiter");
    thread::sleep(Duration::from_secs(1).saturating_sub(queued_at.elapsed()));
    app.request(json!({"op": "release", "id": fillers[0]}));
    let got = app.request(json!({"op": "waiter_result", "id": "waiter"}));
    assert_eq!(got["result"], "ok", "{got}");
    for id in fillers
        .iter()
        .skip(1)
        .chain(std::iter::once(&"waiter".to_string()))
    {
        app.request(json!({"op": "release", "id": id}));
    }
    seen.watch(LATE + Duration::from_secs(5), "the slow acquire", |s| {
        !s.of(LeakKind::SlowAcquire).is_empty()
    });
    let slow = seen.of(LeakKind::SlowAcquire);
    assert_eq!(slow.len(), 1, "{}", seen.dump());
    let r = slow[0];
    assert_eq!(r.pool.as_deref(), Some(POOL), "{r:#?}");
    assert_eq!(r.resolution.as_deref(), Some("got a connection"), "{r:#?}");
    assert!(
        r.wait_seconds.is_some_and(|w| (0.9..3.0).contains(&w)),
        "{r:#?}"
    );
    assert_eq!(
        (r.pool_used, r.pool_max, r.pool_pending),
        (Some(u64::from(POOL_MAX)), Some(POOL_MAX), Some(1)),
        "the pool as the waiter saw it: {r:#?}"
    );
    assert_eq!(r.holder_tid, tid, "the waiting thread: {r:#?}");

    // Back at rest, the workers again at work: still nothing else.
    let rest = app.request(json!({"op": "state"}));
    expect_pool_as_app(&agent, pid, &rest, "the pool after the waiter");
    app.request(json!({"op": "workers_resume"}));
    let until = Instant::now() + Duration::from_secs(2);
    seen.watch(Duration::from_secs(5), "2 s more", |_| {
        Instant::now() >= until
    });
    let mut expected: BTreeSet<(LeakKind, Option<u16>)> = leaks
        .iter()
        .map(|c| (LeakKind::Leaked, Some(c.port)))
        .collect();
    expected.insert((LeakKind::SlowHolder, Some(busy.port)));
    expected.insert((LeakKind::IdleInTransaction, Some(tx.port)));
    let connection_reports: BTreeSet<(LeakKind, Option<u16>)> = seen
        .latest
        .values()
        .filter(|r| r.kind != LeakKind::SlowAcquire)
        .map(|r| (r.kind, local_port(r)))
        .collect();
    assert_eq!(
        connection_reports,
        expected,
        "every connection report ever seen: none on the busy one as leaked, none on healthy or idle ones\n{}",
        seen.dump()
    );

    let queries = app.request(json!({"op": "busy_stop", "id": "busy"}))["queries"]
        .as_u64()
        .unwrap();
    assert!(
        queries as f64 >= LEAK_S / 0.1 / 2.0,
        "the holder kept querying: {queries}"
    );
    let end = app.request(json!({"op": "exit"}));
    let adapter = &end["adapter"];
    eprintln!("the adapter's own counts: {adapter}");
    assert_eq!(adapter["dropped"].as_u64(), Some(0), "{end}");
    assert_eq!(adapter["connects"].as_u64(), Some(1), "one stream: {end}");
}
