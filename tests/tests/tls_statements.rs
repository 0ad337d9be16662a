//! Statements on encrypted connections (issue 16): the agent hooks OpenSSL's
//! libssl (uprobes on SSL_write/SSL_read and their `_ex` forms) in the files
//! the observed processes map, and parses the plaintext a hooked library
//! hands over exactly as it parses a plaintext connection. These tests run
//! real clients over real TLS against real servers on loopback, with the
//! real agent and kernel, and check that nothing is lost to the encryption:
//!
//! - pgbench (libpq, the system libssl) with `sslmode=require`: its SELECTs
//!   counted within 1 % of its transactions, as without TLS
//!   (pgbench_accuracy.rs), each connection `encrypted` and `plaintext`, its
//!   statement sanitized in `last_query`;
//! - a SQLAlchemy pool (psycopg's binary wheel, which bundles its own
//!   renamed libssl) with the Python adapter: a leak and an idle
//!   transaction over TLS are reported as over plaintext, the leak's last
//!   query sanitized (the secret literal nowhere);
//! - MariaDB from mysql-connector-python (pure Python: Python's ssl module,
//!   the system libssl): the statement sanitized, user and database known
//!   (the MySQL handshake response goes inside TLS), round trips counted;
//! - with `[kernel] tls_libraries = false` psql's TLS connection is
//!   `encrypted` without `plaintext`: no statement, still timed by
//!   request/response turns;
//! - node-postgres over TLS (Node's own OpenSSL, memory BIOs);
//! - psql in a mount namespace of its own (as in a container) with a copy
//!   of libssl that only its namespace has: hooked through `/proc/PID/root`;
//! - psycopg2 (its wheel bundles OpenSSL 1.1.1): OpenSSL 1.1 read as 3;
//! - a libssl first shown by clients that exit at once is hooked for the
//!   next client that maps it.
//!
//! Every test checks from the server's side that the connection it looks at
//! really is TLS (PostgreSQL: `pg_stat_ssl` by client port; MariaDB: the
//! session's `Ssl_cipher`), so that a client silently falling back to
//! plaintext cannot pass. Each test has its own servers and agent and looks
//! only at its own clients' pids and ports, so the tests run in parallel
//! with each other and with the rest of the suite.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use poolscope::{
    api::TlsLibrariesResponse,
    tls_libraries::{HookScope, LibraryStatus},
};
use poolscope_tests::{
    adapter_config, json, metric_sample, node_adapter_dir, pgbench_number, postgres_bin_dir,
    require_kernel, require_node_adapter, script_path, wait_until, Agent, ConnectionView, DbClient,
    DbSystem, JsonLinesChild, LeakKind, MariaDb, PoolApp, Postgres, ReportStatus, Seen, SqlShell,
    TempDir, TxState, EVENT_TIMEOUT, LOCALHOST_V4,
};

/// Short leak thresholds (as adapter_python.rs): idle in transaction fires
/// before the leak rule would.
const LEAK_S: f64 = 3.0;
const QUIET_S: f64 = 1.5;
const IDLE_IN_TX_S: f64 = 2.0;

/// The client ports of the server's TLS sessions and of its plaintext ones
/// (`pg_stat_ssl` joined to `pg_stat_activity`), asked over the Unix socket.
fn server_sessions(pg: &Postgres) -> BTreeMap<u16, bool> {
    pg.psql_unix(
        "SELECT a.client_port, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.client_port > 0",
    )
    .lines()
    .filter_map(|line| {
        let (port, ssl) = line.split_once('|')?;
        Some((port.parse().ok()?, ssl == "t"))
    })
    .collect()
}

/// The agent's view of the TLS library whose path ends with `suffix`
/// (`/api/v1/tls/libraries`), if it lists one.
fn tls_library(agent: &Agent, suffix: &str) -> Option<LibraryStatus> {
    let body = agent.get("/api/v1/tls/libraries").ok()?;
    let response: TlsLibrariesResponse = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/api/v1/tls/libraries is not its JSON ({e}): {body}"));
    response
        .libraries
        .into_iter()
        .find(|lib| lib.path.ends_with(suffix))
}

/// Step: the server holds a TLS session for each of `ports`.
fn expect_server_tls(pg: &Postgres, ports: &[u16]) {
    let sessions = server_sessions(pg);
    for port in ports {
        assert_eq!(
            sessions.get(port),
            Some(&true),
            "the server's session from client port {port} is not TLS: {sessions:?}"
        );
    }
}

/// The agent's "hooked TLS library" log lines, for failure messages.
fn hook_lines(agent: &Agent) -> String {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("TLS library"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Step: wait until the agent has hooked a TLS library whose path holds
/// `path_part`; its log line. The agent hooks a library when it reads the
/// process's mappings after a connect, so this comes tens of milliseconds
/// after a process's first connection: what the process sent over TLS
/// before that is not read (see the tests that warm up).
fn wait_for_hook(agent: &Agent, path_part: &str) -> String {
    let found = wait_until(EVENT_TIMEOUT, || {
        agent
            .log()
            .lines()
            .find(|l| l.contains("hooked TLS library ") && l.contains(path_part))
            .map(str::to_string)
    });
    found.unwrap_or_else(|| {
        panic!(
            "the agent hooked no TLS library like {path_part:?} within {EVENT_TIMEOUT:?}\n\
             --- agent log ---\n{}",
            agent.log()
        )
    })
}

/// Step: `send` a statement (on a TLS connection of `pid`) until the agent
/// reads one of `pid`'s connections' plaintext. A process gets its
/// breakpoints only once the agent has seen its first connect (with
/// breakpoints per process; and the first process that maps a file
/// waits for its hook in any scope), so what it sends right after its
/// first connect may not be read.
fn warm_up_until_read(agent: &Agent, pid: u32, mut send: impl FnMut()) {
    let read = wait_until(EVENT_TIMEOUT, || {
        send();
        std::thread::sleep(Duration::from_millis(100));
        agent
            .connections_of(pid)
            .iter()
            .any(|c| c.plaintext)
            .then_some(())
    });
    assert!(
        read.is_some(),
        "no plaintext read from pid {pid} within {EVENT_TIMEOUT:?}: {:#?}\n--- hooks ---\n{}",
        agent.connections_of(pid),
        hook_lines(agent)
    );
}

/// Step: `c` is encrypted and read (`plaintext`), its last query exactly
/// `query`, with no digit and nothing of `secret` left in it.
fn expect_read_tls(agent: &Agent, c: &ConnectionView, query: &str, secret: &str) {
    assert!(
        c.encrypted && c.plaintext,
        "want encrypted and plaintext: {c:#?}\n--- hooks ---\n{}",
        hook_lines(agent)
    );
    let last = c.last_query.as_deref();
    assert_eq!(last, Some(query), "{c:#?}");
    assert!(
        !query.contains(secret) && !query.chars().any(|ch| ch.is_ascii_digit()),
        "sanitized: {query:?}"
    );
    assert!(
        !serde_json::to_string(c).unwrap().contains(secret),
        "the secret {secret:?} in {c:#?}"
    );
}

// ---------------------------------------------------------------------------
// pgbench over TLS
// ---------------------------------------------------------------------------

/// pgbench -S's statement (`\set aid random(...)` then this), sanitized.
const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ?;";
const PGBENCH_CLIENTS: usize = 4;

/// With `tls_hook_scope = "auto"` the system's libssl (Debian 12's
/// OpenSSL 3.0, whose probes sit at instructions the kernel emulates),
/// which the server maps, is hooked for every process once the agent's
/// start-up is over, before pgbench's first call: every connection of
/// pgbench is read from its startup message on, and every SELECT counted.
#[test]
fn pgbench_over_tls_is_counted_and_parsed_like_plaintext() {
    pgbench_over_tls(HookScopeUnderTest::Auto);
}

/// With the default `tls_hook_scope = "process"` pgbench gets its
/// breakpoints only once the agent has seen its first connect: what it
/// sends before that (its first connections' startup, a few of the first
/// SELECTs) is not read, the rest is, and the count stays within 1 % of
/// its transactions.
#[test]
fn pgbench_over_tls_with_breakpoints_in_pgbench_only() {
    pgbench_over_tls(HookScopeUnderTest::Process);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HookScopeUnderTest {
    Auto,
    Process,
}

fn pgbench_over_tls(scope: HookScopeUnderTest) {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start_tls();
    let pgbench = postgres_bin_dir().join("pgbench");
    let port = pg.port.to_string();
    // Over the Unix socket, so that only the measured run uses the port.
    pg.pgbench_init(2);

    let agent = match scope {
        HookScopeUnderTest::Auto => {
            let agent = Agent::start_with_config("[kernel]\ntls_hook_scope = \"auto\"\n", &[]);
            let hooked = wait_for_hook(&agent, "/libssl.so.3");
            assert!(
                hooked.contains("breakpoints in every process that maps it"),
                "{hooked}"
            );
            agent
        }
        HookScopeUnderTest::Process => Agent::start(),
    };
    let run = Command::new(&pgbench)
        .args(["-h", LOCALHOST_V4, "-p", &port, "-U", "postgres"])
        .args([
            "-S",
            "-c",
            &PGBENCH_CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            "6",
        ])
        .arg("postgres")
        .env("PGSSLMODE", "require")
        .env("PGGSSENCMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench -S");
    let pid = run.id();
    // While it runs, the server's view of its sessions (TLS or not, by
    // port), and the agent's view of the libssl they use.
    let mut sessions = BTreeMap::new();
    let mut libssl_while_running = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        sessions.extend(server_sessions(&pg));
        if let Some(lib) = tls_library(&agent, "/libssl.so.3").filter(|l| l.processes_hooked > 0) {
            libssl_while_running = Some(lib);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = run.wait_with_output().expect("wait for pgbench");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgbench failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transactions = pgbench_number(&text, "number of transactions actually processed:");

    let count_selector = format!(
        "db_client_operation_duration_seconds_count{{db_operation_name=\"SELECT\",server_port=\"{port}\"}}"
    );
    // Wait until the agent has drained everything pgbench sent (summed over
    // the series, in case a statement came without its database's name).
    let enough = match scope {
        HookScopeUnderTest::Auto => transactions,
        HookScopeUnderTest::Process => transactions * 0.99,
    };
    let counted = wait_until(EVENT_TIMEOUT, || {
        let n = agent.metric_sum(&count_selector);
        (n >= enough).then_some(n)
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent counted {} SELECTs for {transactions} pgbench transactions over TLS\n\
             --- metrics ---\n{}\n--- hooks ---\n{}",
            agent.metric_sum(&count_selector),
            agent.metrics(),
            hook_lines(&agent)
        )
    });
    // /api/v1/tls/libraries: the system's libssl hooked, in the scope under
    // test; with "process", observed processes (pgbench, and those of the
    // tests running alongside) had the breakpoints.
    let lib = libssl_while_running.unwrap_or_else(|| {
        panic!(
            "/api/v1/tls/libraries never showed libssl with breakpoints: {}",
            agent.get("/api/v1/tls/libraries").unwrap_or_default()
        )
    });
    assert!(lib.hooked && lib.refused.is_none(), "{lib:?}");
    match scope {
        HookScopeUnderTest::Auto => assert_eq!(lib.scope, Some(HookScope::File), "{lib:?}"),
        HookScopeUnderTest::Process => {
            assert_eq!(lib.scope, Some(HookScope::Process), "{lib:?}");
            assert!(
                (1..=lib.processes).contains(&lib.processes_hooked),
                "breakpoints in observed processes only: {lib:?}"
            );
        }
    }
    let ratio = counted / transactions;
    // pgbench runs a few SELECTs of its own at start (table sizes); with
    // breakpoints per process, the first few may go before them.
    let within = match scope {
        HookScopeUnderTest::Auto => 1.0..=1.01,
        HookScopeUnderTest::Process => 0.99..=1.01,
    };
    assert!(
        within.contains(&ratio),
        "agent counted {counted} SELECTs for {transactions} pgbench transactions over TLS \
         ({scope:?} scope)"
    );

    // pgbench's connections (closed now, kept a while by the agent), each
    // TLS on the server's side: every one encrypted; the clients' ones, each
    // of which ran thousands of SELECTs, read, the statement sanitized.
    let conns: Vec<ConnectionView> = agent
        .connections_of(pid)
        .into_iter()
        .filter(|c| c.remote_port == Some(pg.port))
        .collect();
    let summary: Vec<_> = conns
        .iter()
        .map(|c| {
            let port = c.local_port.unwrap_or(0);
            (
                port,
                sessions.get(&port).copied(),
                c.encrypted,
                c.plaintext,
                c.round_trips,
            )
        })
        .collect();
    eprintln!(
        "pgbench's connections (local port, server says TLS, encrypted, plaintext, round \
         trips): {summary:?}"
    );
    assert!(
        sessions.values().all(|tls| *tls),
        "a session of the server was not TLS: {sessions:?}"
    );
    // Encrypted, every one: the server says so of each.
    assert!(
        conns.iter().all(|c| c.encrypted),
        "every connection of pgbench encrypted (local port, server says TLS, encrypted, \
         plaintext, round trips): {summary:?}"
    );
    // The clients: the connections that ran thousands of SELECTs.
    let clients: Vec<&ConnectionView> = conns.iter().filter(|c| c.round_trips >= 100).collect();
    assert_eq!(
        clients.len(),
        PGBENCH_CLIENTS,
        "pgbench's clients (local port, server says TLS, encrypted, plaintext, round \
         trips): {summary:?}"
    );
    if scope == HookScopeUnderTest::Auto {
        // libssl was hooked before pgbench started: every connection of
        // pgbench, its first included, is read from its startup message on.
        assert!(
            conns
                .iter()
                .all(|c| c.plaintext && c.db_user.as_deref() == Some("postgres")),
            "every connection read from its start (local port, server says TLS, encrypted, \
             plaintext, round trips): {summary:?}\n{conns:#?}"
        );
    }
    for c in &clients {
        if scope == HookScopeUnderTest::Auto {
            assert_eq!(c.namespace.as_deref(), Some("postgres"), "{c:#?}");
        }
        expect_read_tls(&agent, c, PGBENCH_SELECT, "aid = 1");
        let port = c.local_port.unwrap();
        assert_eq!(
            sessions.get(&port),
            Some(&true),
            "the server's session from pgbench's port {port} was TLS: {sessions:?}"
        );
    }
    let round_trips: u64 = conns.iter().map(|c| c.round_trips).sum();
    let with_user = clients.iter().filter(|c| c.db_user.is_some()).count();
    eprintln!(
        "pgbench over TLS ({scope:?} scope): {transactions} transactions; agent: {counted} \
         SELECTs (ratio {ratio:.4}), {round_trips} round trips on {} connections, user known on \
         {with_user} of {PGBENCH_CLIENTS} clients; unattributed TLS calls {}",
        conns.len(),
        metric_sample(
            &agent.metrics(),
            "poolscope_kernel_tls_calls_unattributed_total"
        )
        .unwrap_or(0.0)
    );
    assert!(
        agent.log().contains("hooked TLS library"),
        "the agent logged no hooked library:\n{}",
        agent.log()
    );
}

// ---------------------------------------------------------------------------
// A SQLAlchemy pool over TLS, with the Python adapter
// ---------------------------------------------------------------------------

#[test]
fn python_pool_over_tls_reports_leak_and_idle_transaction_with_sanitized_statements() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start_tls();
    let dir = TempDir::new("poolscope-adapter");
    let socket = dir.path().join("adapter.sock");
    let thresholds = [
        ("leak_threshold_seconds", LEAK_S),
        ("quiet_seconds", QUIET_S),
        ("idle_in_transaction_seconds", IDLE_IN_TX_S),
    ];
    let agent = Agent::start_with_config(&adapter_config(&socket, &thresholds), &[]);
    let mut app = PoolApp::spawn(Some(&socket));
    let pid = app.pid;
    let answer = app.request(json!({
        "op": "sqlalchemy", "engine": "main", "port": pg.port, "pool_size": 5,
        "max_overflow": 0, "adapter": true, "pool_name": "tls-orders", "sslmode": "require",
    }));
    assert_eq!(answer["pool_name"], "tls-orders");
    // The first checkout opens the pool's first (TLS) connection, on which
    // the agent looks at the process's libraries and hooks the libssl that
    // psycopg's wheel bundles. Its statements go before the hook; the
    // connection stays in the pool, and the leak below reuses it: its
    // plaintext is read from the middle of the session on.
    app.request(json!({"op": "pool_checkouts", "engine": "main", "n": 1}));
    wait_for_hook(&agent, "psycopg_binary.libs/libssl");

    // A checkout that runs one statement with a secret in it (alone: in
    // autocommit, so that it is the connection's last query) and is kept.
    let leak = app.checkout("main", "leak");
    let rows = app.request(json!({
        "op": "query", "id": "leak", "sql": "SELECT 'tls-secret-123' AS x", "autocommit": true,
    }));
    assert_eq!(rows["ok"], true, "{rows}");
    // Another left idle in a transaction (BEGIN, SELECT 1).
    let tx = app.checkout("main", "tx");
    app.request(json!({"op": "idle_in_transaction", "id": "tx"}));
    expect_server_tls(&pg, &[leak.port, tx.port]);

    let mut seen = Seen::new(&agent, pid);
    seen.watch_for_first(LEAK_S, "a leak and an idle transaction", |s| {
        s.find(LeakKind::Leaked, leak.port).is_some()
            && s.find(LeakKind::IdleInTransaction, tx.port).is_some()
    });
    seen.keep_watching();
    seen.expect_kinds(BTreeSet::from([
        (LeakKind::Leaked, Some(leak.port)),
        (LeakKind::IdleInTransaction, Some(tx.port)),
    ]));
    let r = seen.on_time(LeakKind::Leaked, &leak, LEAK_S, "the leak over TLS");
    assert_eq!(r.status, ReportStatus::Open, "{r:#?}");
    assert_eq!(r.pool.as_deref(), Some("tls-orders"), "{r:#?}");
    assert_eq!(r.fd, Some(leak.fd), "{r:#?}");
    assert_eq!(r.last_query.as_deref(), Some("SELECT ? AS x"), "{r:#?}");
    assert!(r.holder_stack.is_some(), "{r:#?}");
    let r = seen.on_time(
        LeakKind::IdleInTransaction,
        &tx,
        IDLE_IN_TX_S,
        "the idle transaction over TLS",
    );
    assert_eq!(r.status, ReportStatus::Open, "{r:#?}");
    assert_eq!(r.pool.as_deref(), Some("tls-orders"), "{r:#?}");
    assert_eq!(r.tx_state, Some(TxState::InTransaction), "{r:#?}");
    assert_eq!(r.last_query.as_deref(), Some("SELECT ?"), "{r:#?}");
    assert!(
        !seen.dump().contains("tls-secret"),
        "a report holds the secret:\n{}",
        seen.dump()
    );

    let conns = agent.connections_of(pid);
    let by_port = |port: u16| {
        conns
            .iter()
            .find(|c| c.local_port == Some(port))
            .unwrap_or_else(|| panic!("no connection from port {port}: {conns:#?}"))
    };
    let c = by_port(leak.port);
    expect_read_tls(&agent, c, "SELECT ? AS x", "tls-secret-123");
    assert_eq!(c.pool.as_deref(), Some("tls-orders"), "{c:#?}");
    assert!(c.checked_out, "{c:#?}");
    let c = by_port(tx.port);
    expect_read_tls(&agent, c, "SELECT ?", "tls-secret-123");
    assert_eq!(c.tx_state, Some(TxState::InTransaction), "{c:#?}");
}

// ---------------------------------------------------------------------------
// MariaDB over TLS from mysql-connector-python
// ---------------------------------------------------------------------------

#[test]
fn mariadb_over_tls_from_python_is_parsed_like_plaintext() {
    if !require_kernel() {
        return;
    }
    let db = MariaDb::start_tls();
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    // A first TLS connection, on which the agent hooks the system libssl
    // that Python's ssl module maps and sets this process's breakpoints
    // (the user and database go inside TLS right after the handshake,
    // maybe before); the measured one after. The file may have been hooked
    // for another process already (the host's other tests), so the sign
    // that this one has its breakpoints is its plaintext read.
    client.connect_tls("mysql", db.port);
    let pid = client.pid;
    warm_up_until_read(&agent, pid, || {
        client.sql("SELECT 1").unwrap();
    });
    client.request(json!({"op": "close"}));
    let (fd, local) = client.connect_tls("mysql", db.port);
    // The server's word that this session is TLS.
    let cipher = client.sql("SHOW SESSION STATUS LIKE 'Ssl_cipher'").unwrap();
    assert!(
        cipher.len() == 1 && cipher[0][1].as_str().is_some_and(|c| !c.is_empty()),
        "the session is not TLS: Ssl_cipher {cipher:?}"
    );
    let before = agent.operations(db.port);
    let selects_before = before
        .get(&("SELECT".to_string(), String::new()))
        .copied()
        .unwrap_or(0);
    const N: u64 = 3;
    for i in 0..N {
        let rows = client
            .sql(&format!("SELECT 'maria-secret-{i}' AS x"))
            .unwrap();
        assert_eq!(rows, vec![vec![json!(format!("maria-secret-{i}"))]]);
    }
    let ops = agent.wait_for_operation(db.port, "SELECT", "", selects_before + N);
    // Nothing more than what was sent.
    std::thread::sleep(Duration::from_millis(500));
    let after = agent.operations(db.port);
    assert_eq!(
        after.get(&("SELECT".to_string(), String::new())).copied(),
        Some(selects_before + N),
        "SELECT round trips to port {}: before {before:?}, after {after:?}",
        db.port
    );

    let c = agent.wait_for(client.pid, "the TLS connection's statement", |cs| {
        cs.iter()
            .find(|c| c.local_port == Some(local) && c.last_query.is_some())
            .cloned()
    });
    expect_read_tls(&agent, &c, "SELECT ? AS x", "maria-secret");
    assert_eq!(c.fd, fd, "{c:#?}");
    assert_eq!(c.db_system, Some(DbSystem::Mysql), "{c:#?}");
    assert_eq!(c.db_user.as_deref(), Some(MariaDb::USER), "{c:#?}");
    assert_eq!(c.namespace.as_deref(), Some(MariaDb::DATABASE), "{c:#?}");
    assert!(c.round_trips > N, "{c:#?}");
    eprintln!(
        "MariaDB over TLS ({}): operations {ops:?}, {} round trips on the connection",
        cipher[0][1], c.round_trips
    );
}

// ---------------------------------------------------------------------------
// TLS libraries not hooked
// ---------------------------------------------------------------------------

#[test]
fn without_tls_hooks_a_tls_connection_is_timed_by_turns_without_statements() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start_tls();
    let agent = Agent::start_with_config("[kernel]\ntls_libraries = false\n", &[]);
    let conninfo = format!(
        "host={LOCALHOST_V4} port={} user=postgres dbname=postgres sslmode=require \
         gssencmode=disable application_name=tls-unhooked",
        pg.port
    );
    let mut cmd = Command::new(pg.psql_bin());
    cmd.args(["-X", "-q", "-At", &conninfo]);
    let mut psql = SqlShell::spawn(cmd);
    // One statement at a time, each answered before the next: turns.
    const N: usize = 4;
    for i in 0..N {
        psql.send(&format!("SELECT 'unhooked-secret-{i}' AS x;"));
        let answered = wait_until(EVENT_TIMEOUT, || {
            psql.stdout()
                .contains(&format!("unhooked-secret-{i}"))
                .then_some(())
        });
        assert!(
            answered.is_some(),
            "psql did not answer: {}\n{}",
            psql.stdout(),
            psql.stderr()
        );
    }
    let port = pg.psql_unix(
        "SELECT a.client_port FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.application_name = 'tls-unhooked'",
    );
    let port: u16 = port
        .parse()
        .unwrap_or_else(|_| panic!("psql's session is not TLS: {port:?}"));

    // A turn is counted when the next one starts: the startup turn and the
    // first N - 1 statements at least.
    let c = agent.wait_for(psql.pid, "the TLS connection's turns", |cs| {
        cs.iter()
            .find(|c| c.local_port == Some(port) && c.round_trips >= N as u64)
            .cloned()
    });
    assert!(c.encrypted, "{c:#?}");
    assert!(!c.plaintext, "nothing hooked, nothing read: {c:#?}");
    assert_eq!(c.last_query, None, "{c:#?}");
    assert_eq!(c.db_user, None, "the startup message is inside TLS: {c:#?}");
    assert!(
        !serde_json::to_string(&c)
            .unwrap()
            .contains("unhooked-secret"),
        "{c:#?}"
    );
    let ops = agent.operations(pg.port);
    let timed: u64 = ops.values().sum();
    assert!(
        timed >= N as u64,
        "round trips timed on /metrics for port {}: {ops:?}",
        pg.port
    );
    assert!(
        !agent.log().contains("hooked TLS library"),
        "tls_libraries = false, yet:\n{}",
        hook_lines(&agent)
    );
    eprintln!(
        "not hooked: {} round trips on the connection, operations {ops:?}",
        c.round_trips
    );
}

// ---------------------------------------------------------------------------
// node-postgres over TLS
// ---------------------------------------------------------------------------

#[test]
fn node_pg_over_tls_is_parsed_like_plaintext() {
    if !require_kernel() || !require_node_adapter() {
        return;
    }
    let pg = Postgres::start_tls();
    let agent = Agent::start();
    let mut cmd = Command::new("node");
    cmd.arg(script_path("node_pg_client.js"))
        .env("NODE_PATH", node_adapter_dir().join("node_modules"));
    let (mut node, _) = JsonLinesChild::start(&mut cmd, "node node_pg_client.js");
    // A first connection, on which the agent looks at what node maps; a
    // second after it has had time to hook a library (if node maps one:
    // its OpenSSL may be built into the binary), with the statements.
    node.request(json!({"op": "connect", "port": pg.port, "tls": true}));
    node.request(json!({"op": "close"}));
    std::thread::sleep(Duration::from_secs(1));
    let answer = node.request(json!({"op": "connect", "port": pg.port, "tls": true}));
    assert_eq!(answer["encrypted"], true, "{answer}");
    let local = answer["local_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("no local port in {answer}"));
    for i in 0..3 {
        let rows =
            node.request(json!({"op": "sql", "sql": format!("SELECT 'node-secret-{i}' AS x")}));
        assert_eq!(
            rows["rows"],
            json!([[format!("node-secret-{i}")]]),
            "{rows}"
        );
    }
    expect_server_tls(&pg, &[local]);

    let mut last = None;
    let found = wait_until(EVENT_TIMEOUT, || {
        last = agent
            .connections_of(node.pid)
            .into_iter()
            .find(|c| c.local_port == Some(local));
        last.clone().filter(|c| c.last_query.is_some())
    });
    let c = found.unwrap_or_else(|| {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", node.pid)).unwrap_or_default();
        let ssl: BTreeSet<&str> = maps
            .lines()
            .filter(|l| l.contains("ssl"))
            .filter_map(|l| l.split_whitespace().nth(5))
            .collect();
        panic!(
            "no statement on node's TLS connection within {EVENT_TIMEOUT:?}: {last:#?}\n\
             --- what node maps of *ssl* ---\n{ssl:?}\n\
             --- the agent's TLS library lines ---\n{}",
            hook_lines(&agent)
        )
    });
    expect_read_tls(&agent, &c, "SELECT ? AS x", "node-secret");
    assert_eq!(c.db_user.as_deref(), Some("postgres"), "{c:#?}");
}

// ---------------------------------------------------------------------------
// A libssl only a container's mount namespace has
// ---------------------------------------------------------------------------

/// The libssl file `binary` links, from `ldd`.
fn linked_libssl(binary: &std::path::Path) -> std::path::PathBuf {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .filter(|l| l.trim_start().starts_with("libssl"))
        .find_map(|l| l.split("=>").nth(1)?.split_whitespace().next())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("{} links no libssl:\n{text}", binary.display()))
}

/// A process in a mount namespace of its own (as in a container) maps a
/// libssl from a directory that only its namespace has (a tmpfs mounted
/// there, over a directory that is empty on the host): the agent can only
/// reach that file through `/proc/PID/root`, hooks it, and reads the
/// process's statements.
#[test]
fn a_libssl_only_a_mount_namespace_has_is_hooked_through_proc_root() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start_tls();
    let agent = Agent::start();
    let dir = TempDir::new("poolscope-tls-namespace");
    let libssl = linked_libssl(&pg.psql_bin());
    let name = libssl.file_name().unwrap().to_string_lossy().to_string();
    let private = dir.path().display().to_string();
    let conninfo = format!(
        "host={LOCALHOST_V4} port={} user=postgres dbname=postgres sslmode=require \
         gssencmode=disable application_name=tls-namespace",
        pg.port
    );
    // A copy (another inode than the host's libssl, which is hooked
    // already), in a tmpfs only this namespace sees.
    let script = format!(
        "mount -t tmpfs poolscope-test {private} && cp {lib} {private}/{name} && \
         LD_LIBRARY_PATH={private} exec {psql} -X -q -At '{conninfo}'",
        lib = libssl.display(),
        psql = pg.psql_bin().display(),
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut psql = SqlShell::spawn(cmd);
    psql.send("SELECT 1;");
    let in_namespace = format!("{private}/{name}");
    let hooked = wait_for_hook(&agent, &in_namespace);
    assert!(
        !std::path::Path::new(&in_namespace).exists(),
        "{in_namespace} must not exist outside the namespace"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", psql.pid)).unwrap_or_default();
    assert!(
        maps.contains(&in_namespace),
        "psql maps its libssl from the namespace's tmpfs: {hooked}"
    );
    // The hook came after the connection's start; what psql sends now is
    // read (the parser picks the session up from the first plaintext).
    psql.send("SELECT 'namespace-secret' AS x;");
    let answered = wait_until(EVENT_TIMEOUT, || {
        psql.stdout().contains("namespace-secret").then_some(())
    });
    assert!(
        answered.is_some(),
        "psql: {}\n{}",
        psql.stdout(),
        psql.stderr()
    );
    let port: u16 = pg
        .psql_unix(
            "SELECT a.client_port FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.application_name = 'tls-namespace'",
        )
        .parse()
        .expect("psql's session is TLS");
    let c = agent.wait_for(
        psql.pid,
        "the statement on the namespace's TLS connection",
        |cs| {
            cs.iter()
                .find(|c| c.local_port == Some(port) && c.last_query.is_some())
                .cloned()
        },
    );
    expect_read_tls(&agent, &c, "SELECT ? AS x;", "namespace-secret");
    eprintln!("hooked through /proc/PID/root: {hooked}");
}

// ---------------------------------------------------------------------------
// A library first shown by processes that exit at once
// ---------------------------------------------------------------------------

/// Short-lived clients (`psql -c`, each over TLS with a libssl copy that no
/// other process maps) connect and exit, at times before the agent has
/// opened the library they showed it (CI saw it once: the library was then
/// refused for good, with a warning). A process's exit says nothing of the
/// file: it is not refused, no warning is logged, and a later process that
/// maps it gets it hooked and its statements read. Whether the race was hit
/// is printed (the agent logs it at debug level); the unit tests of
/// `tls_libraries` cover the bookkeeping either way.
#[test]
fn a_library_shown_by_processes_that_exit_at_once_is_hooked_for_the_next() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start_tls();
    let agent = Agent::start_with(&["--log-level", "debug"]);
    let dir = TempDir::new("poolscope-tls-short-lived");
    let libssl = linked_libssl(&pg.psql_bin());
    let copy = dir.path().join(libssl.file_name().unwrap());
    std::fs::copy(&libssl, &copy).unwrap();
    let conninfo = |name: &str| {
        format!(
            "host={LOCALHOST_V4} port={} user=postgres dbname=postgres sslmode=require \
             gssencmode=disable application_name={name}",
            pg.port
        )
    };
    for _ in 0..20 {
        let out = Command::new(pg.psql_bin())
            .env("LD_LIBRARY_PATH", dir.path())
            .args(["-X", "-q", "-At", &conninfo("tls-short"), "-c", "SELECT 1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let mut cmd = Command::new(pg.psql_bin());
    cmd.env("LD_LIBRARY_PATH", dir.path())
        .args(["-X", "-q", "-At", &conninfo("tls-long")]);
    let mut psql = SqlShell::spawn(cmd);
    let hooked = wait_for_hook(&agent, &copy.display().to_string());
    // Its breakpoints are set once the agent has seen its connect: what it
    // sends before is not read.
    let pid = psql.pid;
    warm_up_until_read(&agent, pid, || psql.send("SELECT 1;"));
    psql.send("SELECT 'short-lived-secret' AS x;");
    let port: u16 = wait_until(EVENT_TIMEOUT, || {
        pg.psql_unix(
            "SELECT a.client_port FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.application_name = 'tls-long'",
        )
        .parse()
        .ok()
    })
    .expect("the long-lived psql's session is TLS");
    let c = agent.wait_for(psql.pid, "the long-lived psql's statement", |cs| {
        cs.iter()
            .find(|c| {
                c.local_port == Some(port) && c.last_query.as_deref() == Some("SELECT ? AS x;")
            })
            .cloned()
    });
    expect_read_tls(&agent, &c, "SELECT ? AS x;", "short-lived-secret");
    let log = agent.log();
    assert!(
        !log.contains("cannot hook TLS library"),
        "a process's exit is not the library's fault:\n{}",
        hook_lines(&agent)
    );
    let gone = log.lines().filter(|l| l.contains("not opened (")).count();
    eprintln!("{hooked}\nlibraries whose process left before they were opened: {gone}");
}

// ---------------------------------------------------------------------------
// psycopg2 and OpenSSL 1.1
// ---------------------------------------------------------------------------

/// psycopg2's binary wheel (2.9.5, as `cargo xtask setup` pins it) bundles
/// libpq and OpenSSL 1.1.1 (`psycopg2_binary.libs/libssl-<hash>.so.1.1`), a
/// file no other process maps: the agent hooks it after the first connect,
/// and the next connection is read from its startup message on, as with
/// OpenSSL 3.
#[test]
fn psycopg2_with_openssl_1_1_is_parsed_like_plaintext() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start_tls();
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    let connect = json!({
        "op": "connect", "system": "postgresql", "port": pg.port, "tls": true,
        "driver": "psycopg2",
    });
    client.request(connect.clone());
    let hooked = wait_for_hook(&agent, ".so.1.1");
    assert!(
        hooked.contains("psycopg2_binary.libs/libssl-"),
        "the wheel's own OpenSSL 1.1: {hooked}"
    );
    client.request(json!({"op": "close"}));
    let answer = client.request(connect);
    let local = answer["local_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("no local port in {answer}"));
    let version = client.sql("SHOW ssl").unwrap();
    assert_eq!(version, vec![vec![json!("on")]]);
    let rows = client.sql("SELECT 'psycopg2-secret' AS x").unwrap();
    assert_eq!(rows, vec![vec![json!("psycopg2-secret")]]);
    expect_server_tls(&pg, &[local]);
    let c = agent.wait_for(client.pid, "the OpenSSL 1.1 connection's statement", |cs| {
        cs.iter()
            .find(|c| {
                c.local_port == Some(local) && c.last_query.as_deref() == Some("SELECT ? AS x")
            })
            .cloned()
    });
    expect_read_tls(&agent, &c, "SELECT ? AS x", "psycopg2-secret");
    assert_eq!(c.db_user.as_deref(), Some("postgres"), "{c:#?}");
    assert_eq!(c.namespace.as_deref(), Some("postgres"), "{c:#?}");
    eprintln!("OpenSSL 1.1: {hooked}");
}
