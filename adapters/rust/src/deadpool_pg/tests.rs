//! The instrumented pool against a minimal PostgreSQL stand-in (startup,
//! simple queries, a way to hang up), with a fake agent socket receiving
//! what the pool reports.

use std::os::fd::BorrowedFd;

use serde_json::Value;

use super::*;
use crate::{
    pg_connect::fake_postgres::{named, serve, FakePostgres},
    tests::{check_envelope, FakeAgent},
};

const POOL_NAME: &str = "orders";

fn pool(agent: &FakeAgent, config: PgConfig, max: usize) -> InstrumentedPool {
    InstrumentedPool::builder(POOL_NAME, config, tokio_postgres::NoTls)
        .reporter(agent.reporter())
        .batch_window(Duration::ZERO)
        .max_size(max)
        .build()
        .expect("build the pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_life_is_reported_with_its_socket() {
    let agent = FakeAgent::new();
    let server = FakePostgres::start().await;
    let pool = pool(&agent, server.config(), 2);

    let registered = agent.recv();
    check_envelope(&registered, "pool", POOL_NAME);
    assert_eq!(registered["db_system"], "postgresql");
    assert_eq!(registered["server_address"], "127.0.0.1");
    assert_eq!(registered["server_port"], server.addr.port());
    assert_eq!(registered["namespace"], "shop");
    assert_eq!(registered["max"], 2);
    assert_eq!(registered["library"], "deadpool-postgres");

    let client = pool.get().await.expect("get");
    client.simple_query("SELECT 1").await.expect("query");
    let id = client.conn_id();
    let local = server.peer(0);
    assert_eq!(id.local_address, Some(local), "named by its local address");
    let fd = id.fd.expect("and by its fd");
    // SAFETY: the connection (and so its socket) is alive while `client` is.
    let by_fd = crate::conn_of_socket(&unsafe { BorrowedFd::borrow_raw(fd) });
    assert_eq!(by_fd.local_address, Some(local), "the fd is that socket");
    let want = (Some(local.to_string()), Some(i64::from(fd)));

    let start = agent.recv();
    check_envelope(&start, "acquire_start", POOL_NAME);
    assert_eq!(agent.recv()["kind"], "pool", "registered again on connect");
    let created = agent.recv();
    check_envelope(&created, "connection_created", POOL_NAME);
    assert_eq!(named(&created), want);
    let end = agent.recv();
    check_envelope(&end, "acquire_end", POOL_NAME);
    assert_eq!(end["result"], "ok");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(named(&end), want);

    drop(client);
    let release = agent.recv();
    check_envelope(&release, "release", POOL_NAME);
    assert_eq!(named(&release), want);

    // The idle connection is handed out again: no new connection.
    let again = pool.get().await.expect("get again");
    assert_eq!(again.conn_id(), id);
    let start = agent.recv();
    assert_eq!(start["kind"], "acquire_start");
    let end = agent.recv();
    assert_eq!(end["kind"], "acquire_end");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(named(&end), want);
    drop(again);
    assert_eq!(agent.recv()["kind"], "release");

    // Closing the pool closes its idle connections.
    pool.close();
    let closed = agent.recv();
    check_envelope(&closed, "connection_closed", POOL_NAME);
    assert_eq!(named(&closed), want);
    assert!(!agent.pending(), "closed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_acquires_end_as_timeout_or_error() {
    let agent = FakeAgent::new();
    let server = FakePostgres::start().await;
    let pool = pool(&agent, server.config(), 1);
    assert_eq!(agent.recv()["kind"], "pool");
    let held = pool.get().await.expect("get");
    for _ in 0..4 {
        agent.recv(); // acquire_start, pool, connection_created, acquire_end
    }

    // The pool's own timeout.
    let timeouts = Timeouts {
        wait: Some(Duration::from_millis(50)),
        ..pool.timeouts()
    };
    let err = pool
        .timeout_get(&timeouts)
        .await
        .expect_err("pool exhausted");
    assert!(matches!(
        err,
        managed::PoolError::Timeout(TimeoutType::Wait)
    ));
    let start = agent.recv();
    assert_eq!(start["kind"], "acquire_start");
    let end = agent.recv();
    assert_eq!(end["kind"], "acquire_end");
    assert_eq!(end["request"], start["request"]);
    assert_eq!(end["result"], "timeout");
    assert!(end.get("fd").is_none());

    // The caller gives up waiting (its future is dropped).
    let gave_up = tokio::time::timeout(Duration::from_millis(50), pool.get()).await;
    assert!(gave_up.is_err(), "still waiting when dropped");
    let start = agent.recv();
    let end = agent.recv();
    assert_eq!(end["request"], start["request"]);
    assert_eq!(end["result"], "error");
    drop(held);
    assert_eq!(agent.recv()["kind"], "release");

    // No server: the create fails, the acquire is an error, no connection.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut config = PgConfig::new();
    config.host("127.0.0.1").port(closed_port).user("app");
    let agent = FakeAgent::new();
    let nowhere = self::pool(&agent, config, 1);
    assert_eq!(agent.recv()["kind"], "pool");
    let err = nowhere.get().await.expect_err("nothing listens");
    assert!(
        matches!(&err, managed::PoolError::Backend(Error::Io(_))),
        "{err:?}"
    );
    assert_eq!(agent.recv()["kind"], "acquire_start");
    let end = agent.recv();
    assert_eq!(end["kind"], "acquire_end");
    assert_eq!(end["result"], "error");
    assert!(!agent.pending());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_drops_is_reported_closed_once() {
    let agent = FakeAgent::new();
    let server = FakePostgres::start().await;
    let pool = pool(&agent, server.config(), 1);
    let client = pool.get().await.expect("get");
    let first = client.conn_id();
    let kinds: Vec<Value> = (0..5).map(|_| agent.recv()["kind"].clone()).collect();
    assert_eq!(
        kinds,
        [
            "pool",
            "acquire_start",
            "pool",
            "connection_created",
            "acquire_end"
        ]
    );

    // The server hangs up while the connection is checked out.
    assert!(client.simple_query("bye").await.is_err());
    let closed = agent.recv();
    assert_eq!(closed["kind"], "connection_closed");
    assert_eq!(closed["fd"], first.fd.map(i64::from).unwrap_or(-1));
    drop(client);
    assert_eq!(agent.recv()["kind"], "release");

    // The next acquire finds it closed, discards it (already reported) and
    // opens another.
    let client = pool.get().await.expect("get after the hang-up");
    assert_ne!(client.conn_id().local_address, first.local_address);
    let kinds: Vec<Value> = (0..4).map(|_| agent.recv()["kind"].clone()).collect();
    assert_eq!(
        kinds,
        ["acquire_start", "pool", "connection_created", "acquire_end"]
    );
    drop(client);
    assert_eq!(agent.recv()["kind"], "release");
    assert!(!agent.pending(), "the first connection was closed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_connections_are_named_by_fd() {
    let dir = std::env::temp_dir().join(format!("poolscope-fakepg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(".s.PGSQL.5432");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    let agent = FakeAgent::new();
    let mut config = PgConfig::new();
    config.host_path(&dir).port(5432).user("app");
    let pool = pool(&agent, config, 1);
    let registered = agent.recv();
    assert_eq!(
        registered["server_address"],
        path.display().to_string(),
        "{registered}"
    );
    assert!(registered.get("server_port").is_none());
    assert_eq!(
        registered["namespace"], "app",
        "the database defaults to the user"
    );
    let client = pool.get().await.expect("get");
    client.simple_query("SELECT 1").await.expect("query");
    let id = client.conn_id();
    assert!(id.fd.is_some() && id.local_address.is_none(), "{id:?}");
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn configurations_without_a_server_are_refused() {
    let agent = FakeAgent::new();
    let pool = pool(&agent, PgConfig::new(), 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = runtime.block_on(pool.get()).expect_err("no host");
    assert!(
        matches!(&err, managed::PoolError::Backend(Error::Config(_))),
        "{err:?}"
    );
}
