//! Fidelity: the agent's view of every client connection of a PostgreSQL
//! server agrees with the server's own `pg_stat_activity`, row by row, keyed
//! by the client's port.
//!
//! The test starts its own PostgreSQL (so that every client backend on it is
//! one of the test's clients) and its own agent, opens connections in every
//! state a session can rest in with real clients (psycopg 3 through
//! `tests/scripts/db_client.py`, and psql reading from a pipe), and compares:
//!
//! | pg_stat_activity                | the agent                                   |
//! |---------------------------------|---------------------------------------------|
//! | idle                            | tx_state idle, no request outstanding       |
//! | idle in transaction             | tx_state in_transaction                     |
//! | idle in transaction (aborted)   | tx_state failed                             |
//! | active                          | tx_state known, a request outstanding       |
//!
//! `/api/v1/connections` has no per-connection "request outstanding" field.
//! The agent's implicit pool of a process (`/api/v1/pools`, one per process
//! and server) counts a connection as used while a request waits for its
//! response or a transaction is open. Every client here is a process of its
//! own with one connection, so for a connection whose tx_state is idle, its
//! pool's `used` is exactly "a request is outstanding". Inside a transaction
//! `used` says nothing more, so "active inside a transaction" cannot be told
//! from "idle in transaction" through the API; no row here is in that state.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, fmt::Write as _, process::Command, time::Duration};

use poolscope_tests::{
    require_kernel, wait_until, Agent, ConnState, DbClient, Postgres, SqlShell, TxState,
};

const LOCALHOST: &str = "127.0.0.1";

/// How long the agent gets to catch up with the server.
const CATCH_UP: Duration = Duration::from_secs(15);

/// A psql client reading SQL from a pipe kept open by the test, connected
/// over TCP with `application_name` set so that the server names its row.
fn psql(pg: &Postgres, application_name: &str) -> SqlShell {
    let conninfo = format!(
        "host={LOCALHOST} port={} user=postgres dbname=postgres \
         sslmode=disable gssencmode=disable application_name={application_name}",
        pg.port
    );
    let mut cmd = Command::new(pg.psql_bin());
    cmd.args(["-X", "-q", "-At", &conninfo]);
    SqlShell::spawn(cmd)
}

/// The server's client port and state of the backend whose
/// `application_name` is `name`, once `state` matches (if given).
fn psql_backend(pg: &Postgres, name: &str, state: Option<&str>) -> u16 {
    let sql = format!(
        "SELECT client_port, state FROM pg_stat_activity WHERE application_name = '{name}'"
    );
    let mut last = String::new();
    let found = wait_until(Duration::from_secs(20), || {
        last = pg.psql_unix(&sql);
        let (port, seen) = last.split_once('|')?;
        if state.is_some_and(|s| s != seen) {
            return None;
        }
        port.parse().ok()
    });
    found.unwrap_or_else(|| {
        panic!("backend {name:?} never showed up in state {state:?}: last saw {last:?}")
    })
}

/// `pg_stat_activity`: client port → state, for every client backend over
/// TCP except the one asking (which comes over the Unix socket anyway).
fn server_rows(pg: &Postgres) -> BTreeMap<u16, String> {
    let out = pg.psql_unix(
        "SELECT client_port, coalesce(state, '') FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
         AND client_port > 0 ORDER BY client_port",
    );
    out.lines()
        .filter_map(|line| {
            let (port, state) = line.split_once('|')?;
            Some((port.parse().ok()?, state.to_string()))
        })
        .collect()
}

/// What the agent shows of one client connection.
#[derive(Debug, Clone)]
struct AgentRow {
    pid: u32,
    tx_state: Option<TxState>,
    /// The process's implicit pool: (used, idle) connections.
    pool: Option<(u64, u64)>,
    round_trips: u64,
    seen_at_start: bool,
}

impl AgentRow {
    /// The agent's row in `pg_stat_activity`'s words.
    fn state(&self) -> String {
        let Some(tx) = self.tx_state else {
            return "unknown (tx_state null)".to_string();
        };
        match tx {
            TxState::InTransaction => "idle in transaction".to_string(),
            TxState::Failed => "idle in transaction (aborted)".to_string(),
            TxState::Idle => match self.pool {
                Some((1, 0)) => "active".to_string(),
                Some((0, 1)) => "idle".to_string(),
                other => format!("unknown (pool used/idle {other:?})"),
            },
        }
    }
}

/// `/api/v1/connections` and `/api/v1/pools`: client port → row, for every
/// open connection to the server's TCP port.
fn agent_rows(agent: &Agent, pg_port: u16) -> BTreeMap<u16, AgentRow> {
    let server = format!("{LOCALHOST}:{pg_port}");
    let pools = agent.pools();
    agent
        .connections()
        .into_iter()
        .filter(|c| {
            c.remote_address == LOCALHOST
                && c.remote_port == Some(pg_port)
                && matches!(c.state, ConnState::Established | ConnState::PeerClosed)
        })
        .filter_map(|c| {
            let mine: Vec<_> = pools
                .iter()
                .filter(|p| {
                    p.pid == c.pid && !p.from_adapter && p.server.as_deref() == Some(&server)
                })
                .collect();
            let pool = (!mine.is_empty()).then(|| {
                (
                    mine.iter().map(|p| p.used).sum(),
                    mine.iter().map(|p| p.idle).sum(),
                )
            });
            Some((
                c.local_port?,
                AgentRow {
                    pid: c.pid,
                    tx_state: c.tx_state,
                    pool,
                    round_trips: c.round_trips,
                    seen_at_start: c.seen_at_start,
                },
            ))
        })
        .collect()
}

struct Comparison {
    table: String,
    disagreements: usize,
    rows: usize,
}

fn compare(
    cases: &BTreeMap<u16, &str>,
    server: &BTreeMap<u16, String>,
    agent: &BTreeMap<u16, AgentRow>,
) -> Comparison {
    let mut ports: Vec<u16> = server.keys().chain(agent.keys()).copied().collect();
    ports.sort_unstable();
    ports.dedup();
    let mut table = format!(
        "{:<6} {:<34} {:<30} {:<30} {:<7} {:<13} {:<6} {:<5} {}\n",
        "port", "case", "pg_stat_activity", "agent", "pid", "tx_state", "used", "rts", "agree"
    );
    let mut disagreements = 0;
    for port in &ports {
        let case = cases.get(port).copied().unwrap_or("(not the test's)");
        let theirs = server.get(port).map(String::as_str).unwrap_or("(no row)");
        let (ours, pid, tx, used, rts) = match agent.get(port) {
            Some(a) => (
                a.state(),
                a.pid.to_string(),
                a.tx_state
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_else(|| "null".into()),
                a.pool
                    .map(|(u, i)| format!("{u}/{}", u + i))
                    .unwrap_or_else(|| "-".into()),
                format!(
                    "{}{}",
                    a.round_trips,
                    if a.seen_at_start { "*" } else { "" }
                ),
            ),
            None => (
                "(no row)".to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        let agrees = theirs == ours;
        if !agrees {
            disagreements += 1;
        }
        let _ = writeln!(
            table,
            "{port:<6} {case:<34} {theirs:<30} {ours:<30} {pid:<7} {tx:<13} {used:<6} {rts:<5} {}",
            if agrees { "yes" } else { "NO" }
        );
    }
    table.push_str(
        "(used: the process's implicit pool, used/total; rts: round trips, * seeded from /proc)\n",
    );
    Comparison {
        table,
        disagreements,
        rows: ports.len(),
    }
}

#[test]
fn every_client_connection_agrees_with_pg_stat_activity() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let mut cases: BTreeMap<u16, &str> = BTreeMap::new();

    // (f) and (g): connected before the agent starts (seeded from /proc),
    // used only after.
    let mut seeded_query = DbClient::spawn();
    let (_, port) = seeded_query.connect("postgresql", pg.port);
    cases.insert(port, "f seeded, then a query");
    let mut seeded_begin = DbClient::spawn();
    let (_, port) = seeded_begin.connect("postgresql", pg.port);
    cases.insert(port, "g seeded, then BEGIN; SELECT");

    let agent = Agent::start();
    let seeded_pids = [seeded_query.pid, seeded_begin.pid];
    for pid in seeded_pids {
        agent.wait_for(pid, "the seeded connection", |conns| {
            conns.iter().find(|c| c.seen_at_start).cloned()
        });
    }

    // (a) start-up only: psycopg, and psql waiting on its pipe.
    let mut connected = DbClient::spawn();
    let (_, port) = connected.connect("postgresql", pg.port);
    cases.insert(port, "a psycopg: start-up only");
    let _connected_psql = psql(&pg, "case_a_psql");
    let port = psql_backend(&pg, "case_a_psql", Some("idle"));
    cases.insert(port, "a psql: start-up only");

    // (b) a query, then idle: psycopg and psql.
    let mut queried = DbClient::spawn();
    let (_, port) = queried.connect("postgresql", pg.port);
    queried.sql("SELECT 1");
    cases.insert(port, "b psycopg: a query, idle");
    let mut queried_psql = psql(&pg, "case_b_psql");
    queried_psql.send("SELECT 'b' || 'done';");
    let done = wait_until(Duration::from_secs(20), || {
        queried_psql.stdout().contains("bdone").then_some(())
    });
    assert!(
        done.is_some(),
        "psql never answered: {}",
        queried_psql.stderr()
    );
    let port = psql_backend(&pg, "case_b_psql", Some("idle"));
    cases.insert(port, "b psql: a query, idle");

    // (c) BEGIN and a query: idle in transaction.
    let mut in_tx = DbClient::spawn();
    let (_, port) = in_tx.connect("postgresql", pg.port);
    in_tx.sql("BEGIN");
    in_tx.sql("SELECT 1");
    cases.insert(port, "c BEGIN; SELECT");

    // (d) a transaction that hit an error: idle in transaction (aborted).
    let mut aborted = DbClient::spawn();
    let (_, port) = aborted.connect("postgresql", pg.port);
    aborted.sql("BEGIN");
    let error = aborted
        .try_sql("SELECT 1/0")
        .error
        .expect("division by zero");
    assert_eq!(error.code, "22012", "{error:?}");
    cases.insert(port, "d BEGIN; error");

    // (e) a long query running: active.
    let mut sleeping = psql(&pg, "case_e_psql");
    sleeping.send("SELECT pg_sleep(120);");
    let port = psql_backend(&pg, "case_e_psql", Some("active"));
    cases.insert(port, "e psql: SELECT pg_sleep(120)");

    // (e) again, while the rows stream back: each row is longer than the
    // server's send buffer, so it goes out as soon as it is made, and the
    // client reads part of the response long before its end.
    let mut streaming = psql(&pg, "case_e_streaming");
    streaming.send("SELECT g, repeat('x', 20000), pg_sleep(0.5) FROM generate_series(1, 300) g;");
    let port = psql_backend(&pg, "case_e_streaming", Some("active"));
    cases.insert(port, "e psql: rows streaming slowly");
    let streamed = wait_until(Duration::from_secs(20), || {
        agent
            .connections_of(streaming.pid)
            .iter()
            .any(|c| c.bytes_received > 100_000)
            .then_some(())
    });
    assert!(
        streamed.is_some(),
        "the agent saw no rows stream to psql: {:?}",
        agent.connections_of(streaming.pid)
    );

    seeded_query.sql("SELECT 1");
    seeded_begin.sql("BEGIN");
    seeded_begin.sql("SELECT 1");

    // The server's view is settled now; give the agent time to catch up.
    let mut last = None;
    let agreed = wait_until(CATCH_UP, || {
        let server = server_rows(&pg);
        let ours = agent_rows(&agent, pg.port);
        let comparison = compare(&cases, &server, &ours);
        let ok = comparison.disagreements == 0;
        last = Some((server, comparison));
        ok.then_some(())
    });
    let (server, comparison) = last.expect("compared at least once");
    if agreed.is_some() {
        // Shown with --nocapture; a failure shows it in its message.
        eprintln!(
            "pg_stat_activity vs the agent ({} rows agree):\n{}",
            comparison.rows, comparison.table
        );
    }

    // The test covers what it says it covers: every case has its row, in
    // the state the scenario put it in.
    let expected = [
        ("a ", "idle"),
        ("b ", "idle"),
        ("c ", "idle in transaction"),
        ("d ", "idle in transaction (aborted)"),
        ("e ", "active"),
        ("f ", "idle"),
        ("g ", "idle in transaction"),
    ];
    for (port, case) in &cases {
        let want = expected
            .iter()
            .find(|(prefix, _)| case.starts_with(prefix))
            .map(|(_, state)| *state);
        assert_eq!(
            server.get(port).map(String::as_str),
            want,
            "the server's row for case {case:?} (port {port})\n{}",
            comparison.table
        );
    }
    assert_eq!(
        server.len(),
        cases.len(),
        "every client backend is one of the test's\n{}",
        comparison.table
    );

    assert!(
        agreed.is_some(),
        "{} of {} rows disagree after {CATCH_UP:?}:\n{}\n--- agent log ---\n{}",
        comparison.disagreements,
        comparison.rows,
        comparison.table,
        agent.log()
    );
}
