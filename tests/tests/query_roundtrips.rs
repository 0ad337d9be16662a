//! Query round trips seen from the real kernel: each test starts its own
//! database server (so that its TCP port carries only the test client's
//! traffic) and its own agent, drives a real client whose pid it knows
//! (`tests/scripts/db_client.py`: one connection through psycopg 3,
//! mysql-connector-python or a plain socket speaking RESP; or the `mariadb`
//! CLI reading from a pipe) and checks what `/metrics`,
//! `/api/v1/connections` and `/api/v1/queries/slow` say.
//!
//! The operation histogram cannot be filtered by pid, so exact counts are
//! taken per server port; fixtures run their own setup SQL over the Unix
//! socket, which has no port. The test waits for the client's last round
//! trip (a sentinel): round trips of one connection are counted in order,
//! so the counts are then final and compared whole.
#![allow(clippy::unwrap_used)]

use poolscope_tests::{
    json, metric_series, operations, require_kernel, Agent, ConnState, ConnectionView, DbClient,
    DbSystem, MariaDb, OperationCounts, Postgres, Redis, SlowQuery, SqlShell, TxState, Value,
};

const LOCALHOST: &str = "127.0.0.1";

/// The client's connection (by fd and local port) once the agent has seen
/// `round_trips` round trips on it.
fn after_round_trips(
    conns: &[ConnectionView],
    fd: i32,
    local_port: u16,
    round_trips: u64,
) -> Option<ConnectionView> {
    conns
        .iter()
        .find(|c| c.fd == fd && c.local_port == Some(local_port) && c.round_trips >= round_trips)
        .cloned()
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The one `db_client_operation_duration_seconds_count` series of a port and
/// operation, with all its labels, so that label names and values are
/// checked as exported.
fn operation_series(metrics: &str, port: u16, operation: &str) -> Vec<Vec<(String, String)>> {
    let port = port.to_string();
    metric_series(metrics, "db_client_operation_duration_seconds_count")
        .into_iter()
        .map(|(labels, _)| labels)
        .filter(|labels| {
            labels.contains(&("server_port".to_string(), port.clone()))
                && labels.contains(&("db_operation_name".to_string(), operation.to_string()))
        })
        .collect()
}

fn has_label(labels: &[(String, String)], key: &str, value: &str) -> bool {
    labels.iter().any(|(k, v)| k == key && v == value)
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

#[test]
fn postgres_simple_queries_are_counted_per_operation() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    pg.psql_unix("CREATE TABLE items (id int PRIMARY KEY, name text, qty int)");
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("postgresql", pg.port);

    // 3 INSERT, 7 SELECT, 2 UPDATE, 1 BEGIN, 1 COMMIT, then the sentinel.
    for (id, name) in [(1, "one"), (2, "two"), (3, "three")] {
        client.sql(&format!(
            "INSERT INTO items VALUES ({id}, '{name}', {})",
            id * 10
        ));
    }
    for id in 1..=3 {
        let rows = client.sql(&format!("SELECT name FROM items WHERE id = {id}"));
        assert_eq!(rows.map(|r| r.len()), Some(1));
    }
    client.sql("BEGIN");
    client.sql("UPDATE items SET qty = qty + 1 WHERE id = 1");
    client.sql("SELECT qty FROM items WHERE id = 1 FOR UPDATE");
    client.sql("UPDATE items SET qty = qty - 1 WHERE id IN (2, 3)");
    client.sql("COMMIT");
    client.sql("SELECT count(*) FROM items");
    client.sql("SELECT * FROM items ORDER BY id");
    let rows = client.sql("SELECT sum(qty) FROM items").unwrap();
    assert_eq!(rows, vec![vec![json!(59)]]);
    client.sql("SHOW server_version");

    let counts = agent.wait_for_operation(pg.port, "SHOW", "", 1);
    assert_eq!(
        counts,
        operations(&[
            ("INSERT", "", 3),
            ("SELECT", "", 7),
            ("UPDATE", "", 2),
            ("BEGIN", "", 1),
            ("COMMIT", "", 1),
            ("SHOW", "", 1),
        ]),
        "round trips to port {} by operation",
        pg.port
    );

    let metrics = agent.metrics();
    let series = operation_series(&metrics, pg.port, "SELECT");
    assert_eq!(series.len(), 1, "one SELECT series: {series:?}");
    let labels = &series[0];
    assert!(
        has_label(labels, "db_system_name", "postgresql"),
        "{labels:?}"
    );
    assert!(has_label(labels, "server_address", LOCALHOST), "{labels:?}");
    assert!(
        !labels.iter().any(|(k, _)| k == "error_type"),
        "no error type on successful round trips: {labels:?}"
    );

    let c = agent.wait_for(pid, "the connection's 15 round trips", |conns| {
        after_round_trips(conns, fd, local_port, 15)
    });
    assert_eq!(c.round_trips, 15, "{c:#?}");
    assert_eq!(c.state, ConnState::Established, "{c:#?}");
    assert_eq!(c.db_system, Some(DbSystem::Postgresql), "{c:#?}");
    assert!(!c.encrypted, "{c:#?}");
    assert_eq!(c.namespace.as_deref(), Some("postgres"), "{c:#?}");
    assert_eq!(c.db_user.as_deref(), Some("postgres"), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("SHOW"), "{c:#?}");
    assert_eq!(
        c.last_query.as_deref(),
        Some("SHOW server_version"),
        "{c:#?}"
    );
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");
    assert!(c.bytes_sent > 0 && c.bytes_received > 0, "{c:#?}");
    assert!(c.last_activity.is_some(), "{c:#?}");
}

/// With `kernel.unix_sockets = true`, psql's statements over PostgreSQL's
/// own socket are parsed from the socket tracepoints (which fire for Unix
/// sockets too), and no syscall data path is attached for them.
#[test]
fn postgres_over_a_unix_socket_is_parsed_too() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start_with_config("[kernel]\nunix_sockets = true\n", &[]);
    let port = pg.port.to_string();
    let mut cmd = std::process::Command::new(pg.psql_bin());
    cmd.args(["-X", "-q", "-p", &port, "-U", "postgres", "-h"])
        .arg(pg.socket_dir())
        .args(["-v", "ON_ERROR_STOP=0"]);
    let mut shell = SqlShell::spawn(cmd);
    let pid = shell.pid;
    let socket = pg.socket_path().display().to_string();
    // Bytes sent before the agent marked the process for lookups by fd
    // (milliseconds after it saw the connect) are not seen: wait for that.
    shell.send("SELECT 1;");
    agent.wait_for(pid, "psql's Unix-socket connection", |conns| {
        conns.iter().find(|c| c.remote_address == socket).cloned()
    });
    shell.send("BEGIN;");
    shell.send("SELECT relname FROM pg_class WHERE relname = 'pg_proc';");
    let found = poolscope_tests::wait_until(std::time::Duration::from_secs(10), || {
        agent.connections_of(pid).into_iter().find(|c| {
            c.remote_address == socket
                && c.last_query.as_deref()
                    == Some("SELECT relname FROM pg_class WHERE relname = ?;")
        })
    });
    let Some(c) = found else {
        panic!(
            "psql's Unix-socket statements were not seen: {:#?}\n--- agent log ---\n{}",
            agent.connections_of(pid),
            agent.log()
        );
    };
    assert_eq!(c.db_system, Some(DbSystem::Postgresql), "{c:#?}");
    assert_eq!(c.tx_state, Some(TxState::InTransaction), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("SELECT"), "{c:#?}");
    assert!(c.round_trips >= 2, "{c:#?}");
    shell.send("COMMIT;");
    let out = shell.finish();
    assert!(out.status.success(), "psql: {out:?}");
    let c = agent.wait_for(pid, "psql's Unix-socket connection closed", |conns| {
        conns
            .iter()
            .find(|c| c.remote_address == socket && c.state == ConnState::Closed)
            .cloned()
    });
    assert!(c.close_reason.is_some(), "{c:#?}");
    assert!(
        !agent.log().contains("syscall path"),
        "no syscall data path for Unix sockets: {}",
        agent.log()
    );
}

#[test]
fn postgres_syntax_error_is_counted_with_its_sqlstate() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("postgresql", pg.port);

    client.sql("SELECT 1");
    let bad = "SELECT name FROM WHERE id = 42 AND name = 'secret'";
    let outcome = client.try_sql(bad);
    let error = outcome.error.expect("a syntax error");
    assert_eq!(error.code, "42601", "{error:?}");

    let counts = agent.wait_for_operation(pg.port, "SELECT", "42601", 1);
    assert_eq!(
        counts,
        operations(&[("SELECT", "", 1), ("SELECT", "42601", 1)]),
        "round trips to port {} by operation and error type",
        pg.port
    );
    let metrics = agent.metrics();
    let failed: Vec<_> = operation_series(&metrics, pg.port, "SELECT")
        .into_iter()
        .filter(|labels| has_label(labels, "error_type", "42601"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        has_label(&failed[0], "db_system_name", "postgresql"),
        "{failed:?}"
    );

    let c = agent.wait_for(pid, "the failed round trip", |conns| {
        after_round_trips(conns, fd, local_port, 2)
    });
    assert_eq!(c.round_trips, 2, "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("SELECT"), "{c:#?}");
    assert_eq!(
        c.last_query.as_deref(),
        Some("SELECT name FROM WHERE id = ? AND name = ?"),
        "literals are sanitized: {c:#?}"
    );
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");
}

#[test]
fn postgres_prepared_statements_show_their_text() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    pg.psql_unix(
        "CREATE TABLE items (id int PRIMARY KEY, name text); \
         INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 10) i",
    );
    let agent = Agent::start_with_config("[queries]\nslow_threshold_ms = 10\n", &[]);
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("postgresql", pg.port);

    // psycopg prepares in a round trip of its own (Parse, Sync), then runs
    // Bind/Describe/Execute/Sync once per execution: 1 + 5 round trips, all
    // of them carrying or naming the SELECT.
    let sql = "SELECT name, pg_sleep(0.02) FROM items WHERE id = %s";
    let params: Vec<Vec<Value>> = (1..=5).map(|id| vec![json!(id)]).collect();
    let rows = client.prepared(sql, &params).unwrap();
    assert_eq!(rows, vec![vec![json!("item 5"), json!("")]]);

    let counts = agent.wait_for_operation(pg.port, "SELECT", "", 6);
    assert_eq!(
        counts,
        operations(&[("SELECT", "", 6)]),
        "one prepare and five executions to port {}",
        pg.port
    );

    let text = "SELECT name, pg_sleep(?) FROM items WHERE id = $1";
    let c = agent.wait_for(pid, "six round trips", |conns| {
        after_round_trips(conns, fd, local_port, 6)
    });
    assert_eq!(c.round_trips, 6, "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("SELECT"), "{c:#?}");
    assert_eq!(
        c.last_query.as_deref(),
        Some(text),
        "executions of a named statement show its text: {c:#?}"
    );
    assert_eq!(c.protocol_lost, 0, "{c:#?}");

    // Each execution sleeps 20 ms, above the 10 ms threshold; the prepare
    // round trip executes nothing.
    let executions = agent.wait_for_slow(pid, "five slow executions", |slow| {
        let executions: Vec<SlowQuery> = slow
            .iter()
            .filter(|q| q.duration_seconds >= 0.02)
            .cloned()
            .collect();
        (executions.len() >= 5).then_some(executions)
    });
    assert_eq!(executions.len(), 5, "{executions:#?}");
    let server = format!("{LOCALHOST}:{}", pg.port);
    for q in &executions {
        assert_eq!(q.fd, fd, "{q:#?}");
        assert_eq!(q.generation, c.generation, "{q:#?}");
        assert_eq!(q.process, "python3", "{q:#?}");
        assert_eq!(q.db_system, "postgresql", "{q:#?}");
        assert_eq!(q.server, server, "{q:#?}");
        assert_eq!(q.namespace.as_deref(), Some("postgres"), "{q:#?}");
        assert_eq!(q.operation.as_deref(), Some("SELECT"), "{q:#?}");
        assert_eq!(q.query.as_deref(), Some(text), "{q:#?}");
        assert_eq!(q.rows, Some(1), "{q:#?}");
        assert!(q.error.is_none(), "{q:#?}");
        assert_eq!(q.tx_state, Some(TxState::Idle), "{q:#?}");
        assert!(q.duration_seconds < 1.0, "{q:#?}");
    }
}

#[test]
fn postgres_transaction_state_follows_ready_for_query() {
    if !require_kernel() {
        return;
    }
    transaction_state_follows_ready_for_query(&[]);
}

/// The syscall data path (the fallback where the socket path cannot load)
/// sees the same round trips, statements and transaction states.
#[test]
fn postgres_transaction_state_on_the_syscall_data_path() {
    if !require_kernel() {
        return;
    }
    transaction_state_follows_ready_for_query(&["--data-path", "syscalls"]);
}

fn transaction_state_follows_ready_for_query(agent_args: &[&str]) {
    let pg = Postgres::start();
    let agent = Agent::start_with(agent_args);
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("postgresql", pg.port);
    let state_after = |n: u64, what: &str| {
        let c = agent.wait_for(pid, what, |conns| {
            after_round_trips(conns, fd, local_port, n)
        });
        assert_eq!(c.round_trips, n, "{what}: {c:#?}");
        c
    };

    client.sql("BEGIN");
    client.sql("SELECT 1");
    let c = state_after(2, "BEGIN; SELECT 1");
    assert_eq!(c.tx_state, Some(TxState::InTransaction), "{c:#?}");
    assert_eq!(c.last_query.as_deref(), Some("SELECT ?"), "{c:#?}");

    client.sql("COMMIT");
    let c = state_after(3, "COMMIT");
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("COMMIT"), "{c:#?}");

    client.sql("BEGIN");
    let outcome = client.try_sql("SELECT 1/0");
    assert_eq!(outcome.error.map(|e| e.code).as_deref(), Some("22012"));
    let c = state_after(5, "BEGIN; SELECT 1/0");
    assert_eq!(c.tx_state, Some(TxState::Failed), "{c:#?}");

    client.sql("ROLLBACK");
    let c = state_after(6, "ROLLBACK");
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");

    let counts = agent.operations(pg.port);
    assert_eq!(
        counts,
        operations(&[
            ("BEGIN", "", 2),
            ("SELECT", "", 1),
            ("SELECT", "22012", 1),
            ("COMMIT", "", 1),
            ("ROLLBACK", "", 1),
        ]),
        "round trips to port {}",
        pg.port
    );
}

#[test]
fn slow_query_is_reported_with_sanitized_text() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, _) = client.connect("postgresql", pg.port);

    client.sql("SELECT 1");
    client.sql("SELECT pg_sleep(0.6)");
    let slow = agent.wait_for_slow(pid, "the slow pg_sleep", |slow| {
        (!slow.is_empty()).then(|| slow.to_vec())
    });
    let response = agent.slow_queries();
    assert_eq!(response.threshold_seconds, 0.5, "the default threshold");
    assert_eq!(slow.len(), 1, "only the sleep was slow: {slow:#?}");
    let q = &slow[0];
    assert_eq!(q.pid, pid, "{q:#?}");
    assert_eq!(q.fd, fd, "{q:#?}");
    assert_eq!(q.process, "python3", "{q:#?}");
    assert_eq!(q.db_system, "postgresql", "{q:#?}");
    assert_eq!(q.server, format!("{LOCALHOST}:{}", pg.port), "{q:#?}");
    assert_eq!(q.namespace.as_deref(), Some("postgres"), "{q:#?}");
    assert_eq!(q.operation.as_deref(), Some("SELECT"), "{q:#?}");
    assert_eq!(q.query.as_deref(), Some("SELECT pg_sleep(?)"), "{q:#?}");
    assert!(
        q.duration_seconds >= 0.6 && q.duration_seconds < 1.5,
        "{q:#?}"
    );
    assert!(q.error.is_none(), "{q:#?}");
    assert_eq!(q.rows, Some(1), "{q:#?}");
    assert_eq!(q.tx_state, Some(TxState::Idle), "{q:#?}");
    assert!(!q.at.is_empty(), "{q:#?}");

    let counts = agent.wait_for_operation(pg.port, "SELECT", "", 2);
    assert_eq!(counts, operations(&[("SELECT", "", 2)]));
    let metrics = agent.metrics();
    let port = pg.port.to_string();
    let sums: Vec<f64> = metric_series(&metrics, "db_client_operation_duration_seconds_sum")
        .into_iter()
        .filter(|(labels, _)| has_label(labels, "server_port", &port))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(sums.len(), 1, "{sums:?}");
    assert!(
        sums[0] >= 0.6 && sums[0] < 1.6,
        "the histogram's sum holds the sleep: {sums:?}"
    );
    let le_half: Vec<f64> = metric_series(&metrics, "db_client_operation_duration_seconds_bucket")
        .into_iter()
        .filter(|(labels, _)| {
            has_label(labels, "server_port", &port) && has_label(labels, "le", "0.5")
        })
        .map(|(_, v)| v)
        .collect();
    assert_eq!(le_half, vec![1.0], "only SELECT 1 took under 0.5 s");
}

// ---------------------------------------------------------------------------
// MariaDB
// ---------------------------------------------------------------------------

/// The `mariadb` CLI's connection to `port`, once the agent has seen
/// `round_trips` round trips on it.
fn cli_connection(conns: &[ConnectionView], port: u16, round_trips: u64) -> Option<ConnectionView> {
    conns
        .iter()
        .find(|c| c.remote_port == Some(port) && c.round_trips >= round_trips)
        .cloned()
}

#[test]
fn mariadb_queries_are_counted_with_error_numbers() {
    if !require_kernel() {
        return;
    }
    let db = MariaDb::start();
    db.sql("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20), qty INT)");
    let agent = Agent::start();
    // libmariadb, COM_QUERY: 4 INSERT, 5 SELECT, 2 UPDATE, 1 DELETE, then a
    // syntax error; the session stays open (--force, stdin open).
    let mut shell = SqlShell::spawn(db.cli());
    let pid = shell.pid;
    for id in 1..=4 {
        shell.send(&format!(
            "INSERT INTO items VALUES ({id}, 'item {id}', {});",
            id * 10
        ));
    }
    for id in 1..=3 {
        shell.send(&format!("SELECT name FROM items WHERE id = {id};"));
    }
    shell.send("UPDATE items SET qty = qty + 1 WHERE id = 1;");
    shell.send("UPDATE items SET qty = 0 WHERE id > 2;");
    shell.send("DELETE FROM items WHERE id = 4;");
    shell.send("SELECT count(*) FROM items;");
    shell.send("SELECT sum(qty) FROM items;");
    shell.send("SELECT name FROM WHERE id = 42 AND name = 'secret';");

    let counts = agent.wait_for_operation(db.port, "SELECT", "1064", 1);
    assert_eq!(
        counts,
        operations(&[
            ("INSERT", "", 4),
            ("SELECT", "", 5),
            ("UPDATE", "", 2),
            ("DELETE", "", 1),
            ("SELECT", "1064", 1),
        ]),
        "round trips to port {} by operation and error number",
        db.port
    );
    let metrics = agent.metrics();
    let series = operation_series(&metrics, db.port, "INSERT");
    assert_eq!(series.len(), 1, "{series:?}");
    assert!(
        has_label(&series[0], "db_system_name", "mysql"),
        "{series:?}"
    );
    assert!(
        has_label(&series[0], "server_address", LOCALHOST),
        "{series:?}"
    );

    let c = agent.wait_for(pid, "13 round trips", |conns| {
        cli_connection(conns, db.port, 13)
    });
    assert_eq!(c.round_trips, 13, "{c:#?}");
    assert_eq!(c.process, "mariadb", "{c:#?}");
    assert_eq!(c.state, ConnState::Established, "{c:#?}");
    assert_eq!(c.db_system, Some(DbSystem::Mysql), "{c:#?}");
    assert!(!c.encrypted, "{c:#?}");
    assert_eq!(c.namespace.as_deref(), Some(MariaDb::DATABASE), "{c:#?}");
    assert_eq!(c.db_user.as_deref(), Some(MariaDb::USER), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("SELECT"), "{c:#?}");
    assert_eq!(
        c.last_query.as_deref(),
        Some("SELECT name FROM WHERE id = ? AND name = ?"),
        "literals are sanitized: {c:#?}"
    );
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");

    let out = shell.finish();
    assert!(out.stderr.contains("ERROR 1064"), "{out:?}");
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["item 1", "item 2", "item 3", "3", "31"],
        "{out:?}"
    );
    // COM_QUIT has no response: no round trip more.
    let c = agent.wait_for(pid, "the closed connection", |conns| {
        conns
            .iter()
            .find(|c| c.remote_port == Some(db.port) && c.state == ConnState::Closed)
            .cloned()
    });
    assert_eq!(c.round_trips, 13, "{c:#?}");
}

#[test]
fn mariadb_transaction_state_follows_server_status() {
    if !require_kernel() {
        return;
    }
    let db = MariaDb::start();
    db.sql(
        "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20)); \
         INSERT INTO items VALUES (1, 'one')",
    );
    let agent = Agent::start();
    let mut shell = SqlShell::spawn(db.cli());
    let pid = shell.pid;
    let state_after = |n: u64, what: &str| {
        let c = agent.wait_for(pid, what, |conns| cli_connection(conns, db.port, n));
        assert_eq!(c.round_trips, n, "{what}: {c:#?}");
        c
    };

    shell.send("START TRANSACTION;");
    shell.send("UPDATE items SET name = 'uno' WHERE id = 1;");
    let c = state_after(2, "START TRANSACTION; UPDATE");
    assert_eq!(c.tx_state, Some(TxState::InTransaction), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("UPDATE"), "{c:#?}");
    assert_eq!(
        c.last_query.as_deref(),
        Some("UPDATE items SET name = ? WHERE id = ?"),
        "{c:#?}"
    );

    shell.send("COMMIT;");
    let c = state_after(3, "COMMIT");
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("COMMIT"), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");
    assert_eq!(db.sql("SELECT name FROM items WHERE id = 1"), "uno");

    assert_eq!(
        agent.operations(db.port),
        operations(&[("START", "", 1), ("UPDATE", "", 1), ("COMMIT", "", 1)]),
        "round trips to port {}",
        db.port
    );
    let out = shell.finish();
    assert!(out.status.success(), "{out:?}");
}

/// mysql-connector-python's own statements after the handshake (character
/// set, autocommit: two `SET`s in the version this was written with): they
/// are taken out of the counts and counted apart.
fn without_session_setup(mut counts: OperationCounts) -> (OperationCounts, u64) {
    let setup = counts
        .remove(&("SET".to_string(), String::new()))
        .unwrap_or(0);
    (counts, setup)
}

#[test]
fn mariadb_prepared_statements_show_their_text() {
    if !require_kernel() {
        return;
    }
    let db = MariaDb::start();
    db.sql(
        "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20)); \
         INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three')",
    );
    // Every round trip is a "slow query", so that each one's rows show.
    let agent = Agent::start_with_config(
        "[queries]\nslow_threshold_ms = 0\nmax_slow_kept = 1000000\n",
        &[],
    );
    // mysql-connector-python (pure Python) reads every packet in two recv
    // calls, its 4-byte header and then its payload, the server's greeting
    // included: the agent must follow packets across reads.
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("mysql", db.port);

    // cursor() pings (COM_PING); then COM_STMT_PREPARE once and, per
    // execution, COM_STMT_RESET (the connector's habit; it carries no text,
    // so its round trips have no operation name) and COM_STMT_EXECUTE.
    let sql = "SELECT name FROM items WHERE id = %s";
    let params: Vec<Vec<Value>> = (1..=3).map(|id| vec![json!(id)]).collect();
    let rows = client.prepared(sql, &params).unwrap();
    assert_eq!(rows, vec![vec![json!("three")]]);
    let counts = agent.wait_for_operation(db.port, "SELECT", "", 4);
    let (counts, setup) = without_session_setup(counts);
    assert!(setup > 0, "the connector's SET statements are counted");
    assert_eq!(
        counts,
        operations(&[("PING", "", 1), ("SELECT", "", 4), ("", "", 3)]),
        "a ping, one prepare, three resets and three executions to port {}",
        db.port
    );
    let seen = 8 + setup;
    let c = agent.wait_for(pid, "the prepared round trips", |conns| {
        after_round_trips(conns, fd, local_port, seen)
    });
    assert_eq!(c.round_trips, seen, "{c:#?}");
    assert_eq!(c.db_system, Some(DbSystem::Mysql), "{c:#?}");
    assert_eq!(c.namespace.as_deref(), Some(MariaDb::DATABASE), "{c:#?}");
    assert_eq!(c.db_user.as_deref(), Some(MariaDb::USER), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("SELECT"), "{c:#?}");
    assert_eq!(
        c.last_query.as_deref(),
        Some("SELECT name FROM items WHERE id = ?"),
        "executions show the prepared text: {c:#?}"
    );
    assert_eq!(c.tx_state, Some(TxState::Idle), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");

    // The prepare's round trip (its OK, parameter and column definitions)
    // has no rows; each execution returns one row.
    let trips = agent.wait_for_slow(pid, "every round trip reported", |slow| {
        (slow.len() as u64 >= seen).then(|| slow.to_vec())
    });
    let selects: Vec<(Option<u64>, Option<&str>)> = trips
        .iter()
        .filter(|q| q.operation.as_deref() == Some("SELECT"))
        .map(|q| (q.rows, q.namespace.as_deref()))
        .collect();
    let db_name = Some(MariaDb::DATABASE);
    assert_eq!(
        selects,
        [
            (None, db_name),
            (Some(1), db_name),
            (Some(1), db_name),
            (Some(1), db_name)
        ],
        "{trips:#?}"
    );
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

#[test]
fn redis_pipeline_in_one_write_is_counted_per_command() {
    if !require_kernel() {
        return;
    }
    let redis = Redis::start();
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("redis", redis.port);

    let mut commands = Vec::new();
    for i in 0..50 {
        commands.push(strings(&[
            "SET",
            &format!("key:{i}"),
            &format!("value {i}"),
        ]));
    }
    for i in 0..50 {
        commands.push(strings(&["GET", &format!("key:{i}")]));
    }
    let (replies, sent) = client.redis(&commands);
    assert_eq!(replies.len(), 100);
    assert!(replies[..50].iter().all(|r| r == "OK"), "{replies:?}");
    assert_eq!(replies[99], json!("value 49"));
    // The point of the test: the write is much longer than what the kernel
    // copies of it (256 bytes of head, 64 of tail).
    assert!(sent > 2000, "{sent} bytes in one write");
    client.redis(&[strings(&["PING"])]);

    let counts = agent.wait_for_operation(redis.port, "PING", "", 1);
    let c = agent.wait_for(pid, "the connection", |conns| {
        after_round_trips(conns, fd, local_port, 0)
    });
    assert_eq!(
        counts,
        operations(&[("SET", "", 50), ("GET", "", 50), ("PING", "", 1)]),
        "round trips to port {}; the connection: {c:#?}",
        redis.port
    );
    assert_eq!(c.round_trips, 101, "{c:#?}");
    assert_eq!(c.db_system, Some(DbSystem::Redis), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("PING"), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");
}

#[test]
fn redis_commands_and_error_replies_are_counted() {
    if !require_kernel() {
        return;
    }
    let redis = Redis::start();
    let agent = Agent::start();
    let mut client = DbClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.connect("redis", redis.port);

    // A pipeline the kernel copies whole (under 256 bytes), then commands
    // one by one, one of them failing.
    let pipeline = vec![
        strings(&["SET", "a", "1"]),
        strings(&["SET", "b", "x"]),
        strings(&["INCR", "a"]),
        strings(&["GET", "a"]),
        strings(&["GET", "b"]),
    ];
    let (replies, sent) = client.redis(&pipeline);
    assert!(sent < 256, "{sent} bytes");
    assert_eq!(
        replies,
        vec![json!("OK"), json!("OK"), json!(2), json!("2"), json!("x")]
    );
    let (replies, _) = client.redis(&[strings(&["INCR", "b"])]);
    let error = replies[0]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.starts_with("ERR "), "{replies:?}");
    client.redis(&[strings(&["DEL", "a", "b"])]);
    client.redis(&[strings(&["PING"])]);

    let counts = agent.wait_for_operation(redis.port, "PING", "", 1);
    assert_eq!(
        counts,
        operations(&[
            ("SET", "", 2),
            ("INCR", "", 1),
            ("INCR", "ERR", 1),
            ("GET", "", 2),
            ("DEL", "", 1),
            ("PING", "", 1),
        ]),
        "round trips to port {}",
        redis.port
    );
    let metrics = agent.metrics();
    let failed: Vec<_> = operation_series(&metrics, redis.port, "INCR")
        .into_iter()
        .filter(|labels| has_label(labels, "error_type", "ERR"))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        has_label(&failed[0], "db_system_name", "redis"),
        "{failed:?}"
    );

    let c = agent.wait_for(pid, "8 round trips", |conns| {
        after_round_trips(conns, fd, local_port, 8)
    });
    assert_eq!(c.round_trips, 8, "{c:#?}");
    assert_eq!(c.db_system, Some(DbSystem::Redis), "{c:#?}");
    assert_eq!(c.last_operation.as_deref(), Some("PING"), "{c:#?}");
    assert_eq!(c.last_query.as_deref(), Some("PING"), "{c:#?}");
    assert_eq!(c.protocol_lost, 0, "{c:#?}");
    assert!(!c.encrypted, "{c:#?}");
}
