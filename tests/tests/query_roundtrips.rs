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
    expect_connection, expect_operation_series, expect_operations, expect_slow_query, json,
    metric_series, operations, server_and_agent, Agent, ClientConn, ConnExpect, ConnState,
    ConnectionView, DbSystem, MariaDb, OperationCounts, Postgres, Redis, SlowExpect, SlowQuery,
    SqlShell, TxState, Value,
};

const LOCALHOST: &str = "127.0.0.1";

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn has_label(labels: &[(String, String)], key: &str, value: &str) -> bool {
    labels.iter().any(|(k, v)| k == key && v == value)
}

/// A fresh PostgreSQL that has run `setup` over its Unix socket (no port:
/// none of it is counted).
fn postgres_with(setup: &str) -> Postgres {
    let pg = Postgres::start();
    pg.psql_unix(setup);
    pg
}

/// A fresh MariaDB that has run `setup` over its Unix socket.
fn mariadb_with(setup: &str) -> MariaDb {
    let db = MariaDb::start();
    db.sql(setup);
    db
}

/// What a slow SELECT of the Python client's connection `conn` to the
/// PostgreSQL at `server` shows in its report: one row, outside a
/// transaction, its text `query`.
fn slow_python_select<'a>(conn: &ClientConn, server: &'a str, query: &'a str) -> SlowExpect<'a> {
    SlowExpect {
        fd: Some(conn.fd),
        process: Some("python3"),
        db_system: Some("postgresql"),
        server: Some(server),
        namespace: Some("postgres"),
        operation: Some("SELECT"),
        query: Some(query),
        rows: Some(1),
        tx_state: Some(TxState::Idle),
        ..SlowExpect::default()
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

#[test]
fn postgres_simple_queries_are_counted_per_operation() {
    let items = || postgres_with("CREATE TABLE items (id int PRIMARY KEY, name text, qty int)");
    let Some((pg, agent)) = server_and_agent(items, Agent::start) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "postgresql", pg.port);
    let client = &mut conn.client;

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

    expect_operations(
        &agent,
        pg.port,
        &[
            ("INSERT", "", 3),
            ("SELECT", "", 7),
            ("UPDATE", "", 2),
            ("BEGIN", "", 1),
            ("COMMIT", "", 1),
            ("SHOW", "", 1),
        ],
    );
    let labels = expect_operation_series(
        &agent,
        pg.port,
        "SELECT",
        &[],
        &[
            ("db_system_name", "postgresql"),
            ("server_address", LOCALHOST),
        ],
    );
    assert!(
        !labels.iter().any(|(k, _)| k == "error_type"),
        "no error type on successful round trips: {labels:?}"
    );

    let c = conn.after_round_trips(15, "the connection's 15 round trips");
    expect_connection(
        &c,
        &ConnExpect {
            state: Some(ConnState::Established),
            db_system: Some(DbSystem::Postgresql),
            encrypted: Some(false),
            namespace: Some("postgres"),
            db_user: Some("postgres"),
            last_operation: Some("SHOW"),
            last_query: Some("SHOW server_version"),
            tx_state: Some(TxState::Idle),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );
    assert!(c.bytes_sent > 0 && c.bytes_received > 0, "{c:#?}");
    assert!(c.last_activity.is_some(), "{c:#?}");
}

/// With `kernel.unix_sockets = true`, psql's statements over PostgreSQL's
/// own socket are parsed from the socket tracepoints (which fire for Unix
/// sockets too), and no syscall data path is attached for them.
#[test]
fn postgres_over_a_unix_socket_is_parsed_too() {
    let unix_sockets = || Agent::start_with_config("[kernel]\nunix_sockets = true\n", &[]);
    let Some((pg, agent)) = server_and_agent(Postgres::start, unix_sockets) else {
        return;
    };
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
    let Some((pg, agent)) = server_and_agent(Postgres::start, Agent::start) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "postgresql", pg.port);

    conn.client.sql("SELECT 1");
    let bad = "SELECT name FROM WHERE id = 42 AND name = 'secret'";
    let outcome = conn.client.try_sql(bad);
    let error = outcome.error.expect("a syntax error");
    assert_eq!(error.code, "42601", "{error:?}");

    expect_operations(
        &agent,
        pg.port,
        &[("SELECT", "", 1), ("SELECT", "42601", 1)],
    );
    expect_operation_series(
        &agent,
        pg.port,
        "SELECT",
        &[("error_type", "42601")],
        &[("db_system_name", "postgresql")],
    );

    let c = conn.after_round_trips(2, "the failed round trip");
    expect_connection(
        &c,
        &ConnExpect {
            last_operation: Some("SELECT"),
            // Literals are sanitized.
            last_query: Some("SELECT name FROM WHERE id = ? AND name = ?"),
            tx_state: Some(TxState::Idle),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );
}

#[test]
fn postgres_prepared_statements_show_their_text() {
    let items = || {
        postgres_with(
            "CREATE TABLE items (id int PRIMARY KEY, name text); \
             INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 10) i",
        )
    };
    let threshold = || Agent::start_with_config("[queries]\nslow_threshold_ms = 10\n", &[]);
    let Some((pg, agent)) = server_and_agent(items, threshold) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "postgresql", pg.port);

    // psycopg prepares in a round trip of its own (Parse, Sync), then runs
    // Bind/Describe/Execute/Sync once per execution: 1 + 5 round trips, all
    // of them carrying or naming the SELECT.
    let sql = "SELECT name, pg_sleep(0.02) FROM items WHERE id = %s";
    let params: Vec<Vec<Value>> = (1..=5).map(|id| vec![json!(id)]).collect();
    let rows = conn.client.prepared(sql, &params).unwrap();
    assert_eq!(rows, vec![vec![json!("item 5"), json!("")]]);

    // One prepare and five executions.
    expect_operations(&agent, pg.port, &[("SELECT", "", 6)]);

    let text = "SELECT name, pg_sleep(?) FROM items WHERE id = $1";
    let c = conn.after_round_trips(6, "six round trips");
    expect_connection(
        &c,
        &ConnExpect {
            last_operation: Some("SELECT"),
            // Executions of a named statement show its text.
            last_query: Some(text),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );

    // Each execution sleeps 20 ms, above the 10 ms threshold; the prepare
    // round trip executes nothing.
    let executions = agent.wait_for_slow(conn.pid, "five slow executions", |slow| {
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
        expect_slow_query(
            q,
            &SlowExpect {
                generation: Some(c.generation),
                duration_seconds: Some((0.02, 1.0)),
                ..slow_python_select(&conn, &server, text)
            },
        );
    }
}

#[test]
fn postgres_transaction_state_follows_ready_for_query() {
    transaction_state_follows_ready_for_query(&[]);
}

/// The syscall data path (the fallback where the socket path cannot load)
/// sees the same round trips, statements and transaction states.
#[test]
fn postgres_transaction_state_on_the_syscall_data_path() {
    transaction_state_follows_ready_for_query(&["--data-path", "syscalls"]);
}

fn transaction_state_follows_ready_for_query(agent_args: &[&str]) {
    let agent_with_args = || Agent::start_with(agent_args);
    let Some((pg, agent)) = server_and_agent(Postgres::start, agent_with_args) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "postgresql", pg.port);

    conn.client.sql("BEGIN");
    conn.client.sql("SELECT 1");
    let c = conn.after_round_trips(2, "BEGIN; SELECT 1");
    expect_connection(
        &c,
        &ConnExpect {
            tx_state: Some(TxState::InTransaction),
            last_query: Some("SELECT ?"),
            ..ConnExpect::default()
        },
    );

    conn.client.sql("COMMIT");
    let c = conn.after_round_trips(3, "COMMIT");
    expect_connection(
        &c,
        &ConnExpect {
            tx_state: Some(TxState::Idle),
            last_operation: Some("COMMIT"),
            ..ConnExpect::default()
        },
    );

    conn.client.sql("BEGIN");
    let outcome = conn.client.try_sql("SELECT 1/0");
    assert_eq!(outcome.error.map(|e| e.code).as_deref(), Some("22012"));
    let c = conn.after_round_trips(5, "BEGIN; SELECT 1/0");
    assert_eq!(c.tx_state, Some(TxState::Failed), "{c:#?}");

    conn.client.sql("ROLLBACK");
    let c = conn.after_round_trips(6, "ROLLBACK");
    expect_connection(
        &c,
        &ConnExpect {
            tx_state: Some(TxState::Idle),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );

    expect_operations(
        &agent,
        pg.port,
        &[
            ("BEGIN", "", 2),
            ("SELECT", "", 1),
            ("SELECT", "22012", 1),
            ("COMMIT", "", 1),
            ("ROLLBACK", "", 1),
        ],
    );
}

#[test]
fn slow_query_is_reported_with_sanitized_text() {
    let Some((pg, agent)) = server_and_agent(Postgres::start, Agent::start) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "postgresql", pg.port);

    conn.client.sql("SELECT 1");
    conn.client.sql("SELECT pg_sleep(0.6)");
    let slow = agent.wait_for_slow(conn.pid, "the slow pg_sleep", |slow| {
        (!slow.is_empty()).then(|| slow.to_vec())
    });
    let response = agent.slow_queries();
    assert_eq!(response.threshold_seconds, 0.5, "the default threshold");
    assert_eq!(slow.len(), 1, "only the sleep was slow: {slow:#?}");
    let q = &slow[0];
    let server = format!("{LOCALHOST}:{}", pg.port);
    expect_slow_query(
        q,
        &SlowExpect {
            pid: Some(conn.pid),
            duration_seconds: Some((0.6, 1.5)),
            ..slow_python_select(&conn, &server, "SELECT pg_sleep(?)")
        },
    );
    assert!(!q.at.is_empty(), "{q:#?}");

    expect_operations(&agent, pg.port, &[("SELECT", "", 2)]);
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
    // The slow-query counter counts what was reported slow, and only that.
    let slow_counted: Vec<f64> = metric_series(&metrics, "poolscope_queries_slow_total")
        .into_iter()
        .filter(|(labels, _)| {
            has_label(labels, "server_port", &port)
                && has_label(labels, "db_operation_name", "SELECT")
        })
        .map(|(_, v)| v)
        .collect();
    assert_eq!(slow_counted, vec![1.0], "{metrics}");
}

// ---------------------------------------------------------------------------
// MariaDB
// ---------------------------------------------------------------------------

/// Step: the `mariadb` CLI's connection to `port` once the agent has seen
/// `n` round trips on it; exactly `n`, as the CLI sent no more.
fn cli_after_round_trips(agent: &Agent, pid: u32, port: u16, n: u64, what: &str) -> ConnectionView {
    let c = agent.wait_for(pid, what, |conns| {
        conns
            .iter()
            .find(|c| c.remote_port == Some(port) && c.round_trips >= n)
            .cloned()
    });
    assert_eq!(c.round_trips, n, "{what}: {c:#?}");
    c
}

#[test]
fn mariadb_queries_are_counted_with_error_numbers() {
    let items =
        || mariadb_with("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20), qty INT)");
    let Some((db, agent)) = server_and_agent(items, Agent::start) else {
        return;
    };
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

    // By operation and error number.
    expect_operations(
        &agent,
        db.port,
        &[
            ("INSERT", "", 4),
            ("SELECT", "", 5),
            ("UPDATE", "", 2),
            ("DELETE", "", 1),
            ("SELECT", "1064", 1),
        ],
    );
    expect_operation_series(
        &agent,
        db.port,
        "INSERT",
        &[],
        &[("db_system_name", "mysql"), ("server_address", LOCALHOST)],
    );

    let c = cli_after_round_trips(&agent, pid, db.port, 13, "13 round trips");
    expect_connection(
        &c,
        &ConnExpect {
            process: Some("mariadb"),
            state: Some(ConnState::Established),
            db_system: Some(DbSystem::Mysql),
            encrypted: Some(false),
            namespace: Some(MariaDb::DATABASE),
            db_user: Some(MariaDb::USER),
            last_operation: Some("SELECT"),
            // Literals are sanitized.
            last_query: Some("SELECT name FROM WHERE id = ? AND name = ?"),
            tx_state: Some(TxState::Idle),
            protocol_lost: Some(0),
        },
    );

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
    let items = || {
        mariadb_with(
            "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20)); \
             INSERT INTO items VALUES (1, 'one')",
        )
    };
    let Some((db, agent)) = server_and_agent(items, Agent::start) else {
        return;
    };
    let mut shell = SqlShell::spawn(db.cli());
    let pid = shell.pid;

    shell.send("START TRANSACTION;");
    shell.send("UPDATE items SET name = 'uno' WHERE id = 1;");
    let c = cli_after_round_trips(&agent, pid, db.port, 2, "START TRANSACTION; UPDATE");
    expect_connection(
        &c,
        &ConnExpect {
            tx_state: Some(TxState::InTransaction),
            last_operation: Some("UPDATE"),
            last_query: Some("UPDATE items SET name = ? WHERE id = ?"),
            ..ConnExpect::default()
        },
    );

    shell.send("COMMIT;");
    let c = cli_after_round_trips(&agent, pid, db.port, 3, "COMMIT");
    expect_connection(
        &c,
        &ConnExpect {
            tx_state: Some(TxState::Idle),
            last_operation: Some("COMMIT"),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );
    assert_eq!(db.sql("SELECT name FROM items WHERE id = 1"), "uno");

    expect_operations(
        &agent,
        db.port,
        &[("START", "", 1), ("UPDATE", "", 1), ("COMMIT", "", 1)],
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
    let items = || {
        mariadb_with(
            "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(20)); \
             INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three')",
        )
    };
    // Every round trip is a "slow query", so that each one's rows show.
    let every_trip_slow = || {
        Agent::start_with_config(
            "[queries]\nslow_threshold_ms = 0\nmax_slow_kept = 1000000\n",
            &[],
        )
    };
    let Some((db, agent)) = server_and_agent(items, every_trip_slow) else {
        return;
    };
    // mysql-connector-python (pure Python) reads every packet in two recv
    // calls, its 4-byte header and then its payload, the server's greeting
    // included: the agent must follow packets across reads.
    let mut conn = ClientConn::open(&agent, "mysql", db.port);

    // cursor() pings (COM_PING); then COM_STMT_PREPARE once and, per
    // execution, COM_STMT_RESET (the connector's habit; it carries no text,
    // so its round trips have no operation name) and COM_STMT_EXECUTE.
    let sql = "SELECT name FROM items WHERE id = %s";
    let params: Vec<Vec<Value>> = (1..=3).map(|id| vec![json!(id)]).collect();
    let rows = conn.client.prepared(sql, &params).unwrap();
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
    let c = conn.after_round_trips(seen, "the prepared round trips");
    expect_connection(
        &c,
        &ConnExpect {
            db_system: Some(DbSystem::Mysql),
            namespace: Some(MariaDb::DATABASE),
            db_user: Some(MariaDb::USER),
            last_operation: Some("SELECT"),
            // Executions show the prepared text.
            last_query: Some("SELECT name FROM items WHERE id = ?"),
            tx_state: Some(TxState::Idle),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );

    // The prepare's round trip (its OK, parameter and column definitions)
    // has no rows; each execution returns one row.
    let trips = agent.wait_for_slow(conn.pid, "every round trip reported", |slow| {
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
    let Some((redis, agent)) = server_and_agent(Redis::start, Agent::start) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "redis", redis.port);

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
    let (replies, sent) = conn.client.redis(&commands);
    assert_eq!(replies.len(), 100);
    assert!(replies[..50].iter().all(|r| r == "OK"), "{replies:?}");
    assert_eq!(replies[99], json!("value 49"));
    // The point of the test: the write is much longer than what the kernel
    // copies of it (256 bytes of head, 64 of tail).
    assert!(sent > 2000, "{sent} bytes in one write");
    conn.client.redis(&[strings(&["PING"])]);

    expect_operations(
        &agent,
        redis.port,
        &[("SET", "", 50), ("GET", "", 50), ("PING", "", 1)],
    );
    let c = conn.after_round_trips(101, "the connection's 101 round trips");
    expect_connection(
        &c,
        &ConnExpect {
            db_system: Some(DbSystem::Redis),
            last_operation: Some("PING"),
            protocol_lost: Some(0),
            ..ConnExpect::default()
        },
    );
}

#[test]
fn redis_commands_and_error_replies_are_counted() {
    let Some((redis, agent)) = server_and_agent(Redis::start, Agent::start) else {
        return;
    };
    let mut conn = ClientConn::open(&agent, "redis", redis.port);
    let client = &mut conn.client;

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

    expect_operations(
        &agent,
        redis.port,
        &[
            ("SET", "", 2),
            ("INCR", "", 1),
            ("INCR", "ERR", 1),
            ("GET", "", 2),
            ("DEL", "", 1),
            ("PING", "", 1),
        ],
    );
    expect_operation_series(
        &agent,
        redis.port,
        "INCR",
        &[("error_type", "ERR")],
        &[("db_system_name", "redis")],
    );

    let c = conn.after_round_trips(8, "8 round trips");
    expect_connection(
        &c,
        &ConnExpect {
            db_system: Some(DbSystem::Redis),
            last_operation: Some("PING"),
            last_query: Some("PING"),
            protocol_lost: Some(0),
            encrypted: Some(false),
            ..ConnExpect::default()
        },
    );
}
