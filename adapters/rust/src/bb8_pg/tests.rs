//! The instrumented bb8 pool against the PostgreSQL stand-in, with a fake
//! agent socket receiving what the pool reports.

use serde_json::Value;

use super::*;
use crate::{
    pg_connect::fake_postgres::{named, FakePostgres},
    tests::{check_envelope, FakeAgent},
};

const POOL_NAME: &str = "orders";

async fn pool(agent: &FakeAgent, config: PgConfig, max: u32) -> InstrumentedPool {
    InstrumentedPool::builder(POOL_NAME, config, tokio_postgres::NoTls)
        .reporter(agent.reporter())
        .batch_window(Duration::ZERO)
        .max_size(max)
        .connection_timeout(Duration::from_millis(300))
        .build_unchecked()
}

/// The next message of `kind`, skipping re-registrations (bb8 connects on
/// its own tasks, so a `pool` message may come between any two).
fn next(agent: &FakeAgent, kind: &str) -> Value {
    loop {
        let m = agent.recv();
        if m["kind"] == "pool" && kind != "pool" {
            continue;
        }
        check_envelope(&m, kind, POOL_NAME);
        return m;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_life_is_reported_with_its_socket() {
    let agent = FakeAgent::new();
    let server = FakePostgres::start().await;
    let pool = pool(&agent, server.config(), 2).await;

    let registered = agent.recv();
    check_envelope(&registered, "pool", POOL_NAME);
    assert_eq!(registered["db_system"], "postgresql");
    assert_eq!(registered["server_port"], server.addr.port());
    assert_eq!(registered["namespace"], "shop");
    assert_eq!(registered["max"], 2);
    assert_eq!(registered["library"], "bb8");

    let client = pool.get().await.expect("get");
    client.simple_query("SELECT 1").await.expect("query");
    let id = client.conn_id();
    let local = server.peer(0);
    assert_eq!(id.local_address, Some(local), "named by its local address");
    let want = (Some(local.to_string()), id.fd.map(i64::from));
    assert!(want.1.is_some(), "and by its fd");

    let start = next(&agent, "acquire_start");
    let created = next(&agent, "connection_created");
    assert_eq!(named(&created), want);
    let end = next(&agent, "acquire_end");
    assert_eq!(end["result"], "ok");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(named(&end), want);

    drop(client);
    assert_eq!(named(&next(&agent, "release")), want);

    // The idle connection is handed out again (after bb8's check).
    let again = pool.get_owned().await.expect("get again");
    assert_eq!(again.conn_id(), id);
    let start = next(&agent, "acquire_start");
    let end = next(&agent, "acquire_end");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(named(&end), want);

    // The server hangs up on a holder: closed once, released after.
    let _ = again.simple_query("bye").await;
    let closed = next(&agent, "connection_closed");
    assert_eq!(named(&closed), want);
    drop(again);
    assert_eq!(named(&next(&agent, "release")), want);
    assert!(!agent.pending(), "closed once");
    assert_eq!(pool.state().connections, 0, "bb8 dropped the broken one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_acquires_end_as_timeout_or_error() {
    let agent = FakeAgent::new();
    let server = FakePostgres::start().await;
    let pool = pool(&agent, server.config(), 1).await;
    let held = pool.get().await.expect("get");
    next(&agent, "acquire_start");
    next(&agent, "connection_created");
    next(&agent, "acquire_end");

    // bb8's connection_timeout on the exhausted pool.
    let err = pool.get().await.expect_err("pool exhausted");
    assert!(matches!(err, RunError::TimedOut), "{err:?}");
    let start = next(&agent, "acquire_start");
    let end = next(&agent, "acquire_end");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(end["result"], "timeout");
    assert!(end.get("fd").is_none());

    // The caller gives up waiting (its future is dropped).
    let gave_up = tokio::time::timeout(Duration::from_millis(50), pool.get()).await;
    assert!(gave_up.is_err(), "still waiting when dropped");
    let start = next(&agent, "acquire_start");
    let end = next(&agent, "acquire_end");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(end["result"], "error");
    drop(held);
    next(&agent, "release");
}
