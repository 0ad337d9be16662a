//! Named steps of the query scenarios: a client's connection to a server
//! that the agent watches, the round trips the agent must have seen on it,
//! the operation counts of the server's port, and what the agent shows for
//! the connection and its slow queries. A test reads as a list of these
//! steps; each step asserts what it names and says so when it fails.

use std::fmt::Debug;

use crate::{
    metric_series, operations, require_kernel, Agent, ConnState, ConnectionView, DbClient,
    DbSystem, SlowQuery, TxState,
};

/// Step: where the kernel lets an agent run ([`require_kernel`]), a fresh
/// server (`server`, with whatever setup it runs) and then an agent
/// (`agent`) that watches it; `None` elsewhere, and the test ends there.
pub fn server_and_agent<S>(
    server: impl FnOnce() -> S,
    agent: impl FnOnce() -> Agent,
) -> Option<(S, Agent)> {
    if !require_kernel() {
        return None;
    }
    let server = server();
    Some((server, agent()))
}

/// One connection of a scripted client (`DbClient`, its pid known) to a
/// server on 127.0.0.1, with the agent that watches it.
pub struct ClientConn<'a> {
    pub agent: &'a Agent,
    pub client: DbClient,
    pub pid: u32,
    pub fd: i32,
    pub local_port: u16,
}

impl<'a> ClientConn<'a> {
    /// Step: start a client and connect it to `system` ("postgresql",
    /// "mysql", "redis") on `port`.
    pub fn open(agent: &'a Agent, system: &str, port: u16) -> ClientConn<'a> {
        let mut client = DbClient::spawn();
        let pid = client.pid;
        let (fd, local_port) = client.connect(system, port);
        ClientConn {
            agent,
            client,
            pid,
            fd,
            local_port,
        }
    }

    /// Step: the connection once the agent has seen `n` round trips on it;
    /// exactly `n`, as the client sent no more.
    pub fn after_round_trips(&self, n: u64, what: &str) -> ConnectionView {
        let (fd, local_port) = (self.fd, self.local_port);
        let c = self.agent.wait_for(self.pid, what, |conns| {
            conns
                .iter()
                .find(|c| c.fd == fd && c.local_port == Some(local_port) && c.round_trips >= n)
                .cloned()
        });
        assert_eq!(c.round_trips, n, "{what}: {c:#?}");
        c
    }
}

/// Step: wait until the agent has counted the last entry of `expected`
/// (operation, error type, count) on `port`, the client's last round trip,
/// and check that the counts by operation and error type are then exactly
/// `expected`.
pub fn expect_operations(agent: &Agent, port: u16, expected: &[(&str, &str, u64)]) {
    let Some(&(operation, error_type, n)) = expected.last() else {
        panic!("no operations expected on port {port}");
    };
    let counts = agent.wait_for_operation(port, operation, error_type, n);
    assert_eq!(
        counts,
        operations(expected),
        "round trips to port {port} by operation and error type"
    );
}

/// Step: the one `db_client_operation_duration_seconds_count` series of
/// `port` and `operation` that has the labels `with` (none: the only one),
/// and that it carries `labels` too; returns all its labels as exported.
pub fn expect_operation_series(
    agent: &Agent,
    port: u16,
    operation: &str,
    with: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> Vec<(String, String)> {
    let metrics = agent.metrics();
    let has = |series: &[(String, String)], (key, value): &(&str, &str)| {
        series.iter().any(|(k, v)| k == key && v == value)
    };
    let mut found: Vec<Vec<(String, String)>> =
        metric_series(&metrics, "db_client_operation_duration_seconds_count")
            .into_iter()
            .map(|(series, _)| series)
            .filter(|series| {
                has(series, &("server_port", &port.to_string()))
                    && has(series, &("db_operation_name", operation))
                    && with.iter().all(|w| has(series, w))
            })
            .collect();
    assert_eq!(found.len(), 1, "one {operation} series {with:?}: {found:?}");
    let series = found.remove(0);
    for label in labels {
        assert!(has(&series, label), "{label:?} in {series:?}");
    }
    series
}

/// What a connection must show; `None` is not checked.
#[derive(Debug, Default)]
pub struct ConnExpect<'a> {
    pub process: Option<&'a str>,
    pub state: Option<ConnState>,
    pub db_system: Option<DbSystem>,
    pub encrypted: Option<bool>,
    pub namespace: Option<&'a str>,
    pub db_user: Option<&'a str>,
    pub last_operation: Option<&'a str>,
    pub last_query: Option<&'a str>,
    pub tx_state: Option<TxState>,
    pub protocol_lost: Option<u64>,
}

/// Checks that `got` is `want`, unless `want` is `None` (not checked);
/// on failure names the field and shows `whole`.
fn check<T: PartialEq + Debug, W: Debug>(field: &str, got: T, want: Option<T>, whole: &W) {
    if let Some(want) = want {
        assert_eq!(got, want, "{field}: {whole:#?}");
    }
}

/// [`check`] for a field that may be absent: a `want` requires it present
/// and equal.
fn check_some<T: PartialEq + Debug, W: Debug>(
    field: &str,
    got: Option<T>,
    want: Option<T>,
    whole: &W,
) {
    check(field, got, want.map(Some), whole);
}

/// Step: the connection shows what `e` names.
pub fn expect_connection(c: &ConnectionView, e: &ConnExpect) {
    check_some("process", Some(c.process.as_str()), e.process, c);
    check("state", c.state, e.state, c);
    check_some("db_system", c.db_system, e.db_system, c);
    check("encrypted", c.encrypted, e.encrypted, c);
    check_some("namespace", c.namespace.as_deref(), e.namespace, c);
    check_some("db_user", c.db_user.as_deref(), e.db_user, c);
    check_some(
        "last_operation",
        c.last_operation.as_deref(),
        e.last_operation,
        c,
    );
    check_some("last_query", c.last_query.as_deref(), e.last_query, c);
    check_some("tx_state", c.tx_state, e.tx_state, c);
    check("protocol_lost", c.protocol_lost, e.protocol_lost, c);
}

/// What a slow query's report must show; `None` is not checked.
#[derive(Debug, Default)]
pub struct SlowExpect<'a> {
    pub pid: Option<u32>,
    pub fd: Option<i32>,
    pub generation: Option<u64>,
    pub process: Option<&'a str>,
    pub db_system: Option<&'a str>,
    pub server: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub operation: Option<&'a str>,
    pub query: Option<&'a str>,
    pub rows: Option<u64>,
    pub tx_state: Option<TxState>,
    /// The round trip took at least this long and less than the second.
    pub duration_seconds: Option<(f64, f64)>,
}

/// Step: the slow query's report shows what `e` names, and no error.
pub fn expect_slow_query(q: &SlowQuery, e: &SlowExpect) {
    check("pid", q.pid, e.pid, q);
    check("fd", q.fd, e.fd, q);
    check("generation", q.generation, e.generation, q);
    check("process", q.process.as_str(), e.process, q);
    check("db_system", q.db_system.as_str(), e.db_system, q);
    check("server", q.server.as_str(), e.server, q);
    check_some("namespace", q.namespace.as_deref(), e.namespace, q);
    check_some("operation", q.operation.as_deref(), e.operation, q);
    check_some("query", q.query.as_deref(), e.query, q);
    check_some("rows", q.rows, e.rows, q);
    check_some("tx_state", q.tx_state, e.tx_state, q);
    if let Some((min, max)) = e.duration_seconds {
        assert!(
            q.duration_seconds >= min && q.duration_seconds < max,
            "duration in [{min}, {max}): {q:#?}"
        );
    }
    assert!(q.error.is_none(), "{q:#?}");
}
