//! The messages as the agent receives them: a datagram socket bound in a
//! temp dir stands in for the agent.

use std::{
    net::{TcpListener, TcpStream},
    os::unix::net::UnixStream,
    sync::atomic::AtomicU32,
    time::Instant,
};

use serde_json::Value;

use super::*;

/// A bound datagram socket in its own temp dir, removed on drop.
pub(crate) struct FakeAgent {
    dir: PathBuf,
    path: PathBuf,
    socket: UnixDatagram,
}

impl FakeAgent {
    pub(crate) fn new() -> FakeAgent {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "poolscope-adapter-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("adapter.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the fake agent");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        FakeAgent { dir, path, socket }
    }

    pub(crate) fn reporter(&self) -> Reporter {
        Reporter::with_socket(&self.path)
    }

    pub(crate) fn recv(&self) -> Value {
        let mut buf = vec![0u8; 65536];
        let n = self.socket.recv(&mut buf).expect("a datagram within 5 s");
        assert!(n <= MAX_MESSAGE_BYTES, "datagram of {n} bytes");
        serde_json::from_slice(&buf[..n]).expect("the datagram is JSON")
    }

    /// Whether a datagram arrives within 100 ms (consuming it).
    pub(crate) fn pending(&self) -> bool {
        self.socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let mut buf = vec![0u8; 65536];
        let got = self.socket.recv(&mut buf).is_ok();
        self.socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        got
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks the envelope every message has, and that it claims no pid.
pub(crate) fn check_envelope(msg: &Value, kind: &str, pool: &str) {
    assert_eq!(msg["v"], 1, "{msg}");
    assert_eq!(msg["kind"], kind, "{msg}");
    assert_eq!(msg["pool"], pool, "{msg}");
    assert!(msg.get("pid").is_none(), "never sends a pid: {msg}");
    let mono = msg["mono_ns"].as_u64().expect("mono_ns is an integer");
    let now = monotonic_ns();
    assert!(
        mono <= now && now - mono < 5_000_000_000,
        "mono_ns {mono} is CLOCK_MONOTONIC (now {now})"
    );
}

#[test]
fn pool_registration_carries_what_is_known() {
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    reporter.pool(
        "orders",
        &PoolInfo {
            db_system: Some(DbSystem::Postgresql),
            server_address: Some("10.0.0.5".into()),
            server_port: Some(5432),
            namespace: Some("shop".into()),
            max: Some(15),
            min_idle: Some(5),
            idle_max: None,
            library: Some("deadpool-postgres".into()),
        },
    );
    let msg = agent.recv();
    check_envelope(&msg, "pool", "orders");
    assert_eq!(msg["db_system"], "postgresql");
    assert_eq!(msg["server_address"], "10.0.0.5");
    assert_eq!(msg["server_port"], 5432);
    assert_eq!(msg["namespace"], "shop");
    assert_eq!(msg["max"], 15);
    assert_eq!(msg["min_idle"], 5);
    assert!(msg.get("idle_max").is_none(), "absent fields are left out");
    assert_eq!(msg["library"], "deadpool-postgres");
    assert_eq!(
        reporter.stats(),
        ReporterStats {
            sent: 1,
            ..ReporterStats::default()
        }
    );
}

#[test]
fn an_acquire_names_its_request_thread_and_connection() {
    let agent = FakeAgent::new();
    let pool = PoolReporter::new(agent.reporter(), "p").with_batch_window(Duration::ZERO);
    let conn = ConnId {
        local_address: Some("127.0.0.1:51234".parse().expect("addr")),
        fd: Some(12),
        conn: None,
    };
    let pending = pool.acquire_start();
    let request = pending.request();
    pending.finish(AcquireResult::Ok(conn));
    pool.release(conn);
    let tid = current_tid().expect("Linux has thread ids");

    let start = agent.recv();
    check_envelope(&start, "acquire_start", "p");
    assert_eq!(start["request"], request);
    assert_eq!(start["tid"], tid);

    let end = agent.recv();
    check_envelope(&end, "acquire_end", "p");
    assert_eq!(end["request"], request);
    assert_eq!(end["result"], "ok");
    assert_eq!(end["local_address"], "127.0.0.1:51234");
    assert_eq!(end["fd"], 12);
    assert_eq!(end["tid"], tid);
    assert!(
        end["mono_ns"].as_u64() >= start["mono_ns"].as_u64(),
        "the clock only goes forward"
    );

    let release = agent.recv();
    check_envelope(&release, "release", "p");
    assert_eq!(release["local_address"], "127.0.0.1:51234");
    assert_eq!(release["fd"], 12);
    assert!(release.get("request").is_none());

    // Request ids are unique among a pool's acquires.
    let a = pool.acquire_start();
    let b = pool.acquire_start();
    assert_ne!(a.request(), b.request());
    assert_ne!(a.request(), request);
    a.finish(AcquireResult::Timeout);
    b.finish(AcquireResult::Error);
    let _ = (agent.recv(), agent.recv());
    let timeout = agent.recv();
    assert_eq!(timeout["result"], "timeout");
    assert!(timeout.get("fd").is_none() && timeout.get("local_address").is_none());
    assert_eq!(agent.recv()["result"], "error");
}

#[test]
fn an_abandoned_acquire_ends_as_an_error() {
    let agent = FakeAgent::new();
    let pool = PoolReporter::new(agent.reporter(), "p").with_batch_window(Duration::ZERO);
    let pending = pool.acquire_start();
    let request = pending.request();
    drop(pending);
    assert_eq!(agent.recv()["kind"], "acquire_start");
    let end = agent.recv();
    assert_eq!(end["kind"], "acquire_end");
    assert_eq!(end["request"], request);
    assert_eq!(end["result"], "error");
}

#[test]
fn connection_events_by_fd_only_for_unix_sockets() {
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    let (a, _b) = UnixStream::pair().expect("pair");
    let unix = conn_of_socket(&a);
    assert_eq!(unix.fd, Some(a.as_raw_fd()));
    assert_eq!(unix.local_address, None);
    reporter.connection_created("p", unix);
    reporter.connection_closed("p", unix);
    let created = agent.recv();
    check_envelope(&created, "connection_created", "p");
    assert_eq!(created["fd"], a.as_raw_fd());
    assert!(created.get("local_address").is_none());
    let closed = agent.recv();
    check_envelope(&closed, "connection_closed", "p");
    assert_eq!(closed["fd"], a.as_raw_fd());

    // Nothing names the connection: the agent would refuse it, so it is
    // not sent.
    reporter.release("p", ConnId::default());
    assert!(!agent.pending());
    assert_eq!(reporter.stats().dropped, 1);
}

#[test]
fn tcp_connections_are_named_by_local_address_and_fd() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let id = conn_of_socket(&stream);
    assert_eq!(id.local_address, Some(stream.local_addr().expect("local")));
    assert_eq!(id.fd, Some(stream.as_raw_fd()));

    let v6 = TcpListener::bind("[::1]:0").ok();
    if let Some(listener) = v6 {
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let id = conn_of_socket(&stream);
        assert_eq!(id.local_address, Some(stream.local_addr().expect("local")));
    }
}

#[test]
fn without_an_agent_messages_are_dropped_quietly() {
    let dir = std::env::temp_dir().join(format!("poolscope-no-agent-{}", std::process::id()));
    let reporter = Reporter::with_socket(dir.join("missing.sock"));
    let pool = PoolReporter::new(reporter.clone(), "p").with_batch_window(Duration::ZERO);
    let started = Instant::now();
    for _ in 0..100 {
        pool.acquire_start().finish(AcquireResult::Ok(ConnId {
            local_address: None,
            fd: Some(3),
            conn: None,
        }));
    }
    assert!(started.elapsed() < Duration::from_secs(1), "never blocks");
    assert_eq!(
        reporter.stats(),
        ReporterStats {
            dropped: 200,
            ..ReporterStats::default()
        }
    );
    // A disabled reporter does nothing at all.
    let disabled = Reporter::disabled();
    disabled.release("p", ConnId::default());
    assert_eq!(disabled.stats(), ReporterStats::default());
    assert_eq!(disabled.socket_path(), None);
}

#[test]
fn a_full_agent_queue_keeps_messages_in_order() {
    // Linux queues net.unix.max_dgram_qlen datagrams (10 by default) at
    // a socket nobody reads; the rest must wait, in order, not be lost.
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    let pool = PoolReporter::new(reporter.clone(), "burst").with_batch_window(Duration::ZERO);
    let qlen: u64 = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(10);
    let n = 500 + qlen;
    let started = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..n {
        let pending = pool.acquire_start();
        requests.push(pending.request());
        pending.finish(AcquireResult::Timeout);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "sending to a full queue does not block: {:?}",
        started.elapsed()
    );
    let stats = reporter.stats();
    assert!(
        stats.backlogged > 0,
        "a queue nobody reads fills up: {stats:?}"
    );
    for request in requests {
        let start = agent.recv();
        assert_eq!(start["kind"], "acquire_start");
        assert_eq!(start["request"], request);
        let end = agent.recv();
        assert_eq!(end["kind"], "acquire_end");
        assert_eq!(end["request"], request);
    }
    assert!(reporter.flush(Duration::from_secs(5)));
    let stats = reporter.stats();
    assert_eq!((stats.sent, stats.dropped, stats.backlogged), (2 * n, 0, 0));
    assert!(stats.deferred >= 2 * n - qlen - 1, "{stats:?}");
}

#[test]
fn concurrent_senders_keep_each_threads_order() {
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    let threads = 4u64;
    let per_thread = 200u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let reporter = reporter.clone();
            s.spawn(move || {
                for i in 0..per_thread {
                    reporter.acquire_start("p", t * 1_000_000 + i);
                }
            });
        }
        let mut last = vec![None::<u64>; threads as usize];
        for _ in 0..threads * per_thread {
            let msg = agent.recv();
            let request = msg["request"].as_u64().expect("request");
            let (t, i) = ((request / 1_000_000) as usize, request % 1_000_000);
            if let Some(prev) = last[t] {
                assert!(i > prev, "thread {t}: {i} after {prev}");
            }
            last[t] = Some(i);
        }
    });
    assert!(reporter.flush(Duration::from_secs(5)));
    assert_eq!(reporter.stats().sent, threads * per_thread);
    assert_eq!(reporter.stats().dropped, 0);
}

#[test]
fn text_is_cut_to_what_the_agent_accepts() {
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    let long = "é".repeat(300);
    reporter.pool(
        &long,
        &PoolInfo {
            namespace: Some(long.clone()),
            ..PoolInfo::default()
        },
    );
    let msg = agent.recv();
    assert_eq!(msg["pool"].as_str().map(|s| s.chars().count()), Some(128));
    assert_eq!(
        msg["namespace"].as_str().map(|s| s.chars().count()),
        Some(128)
    );

    // An empty pool name and an oversized message are never sent.
    reporter.release(
        "",
        ConnId {
            local_address: None,
            fd: Some(3),
            conn: None,
        },
    );
    let entry = protocol::Checkout {
        conn: ConnId {
            local_address: Some(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                    .parse()
                    .expect("addr"),
            ),
            fd: Some(i32::MAX),
            conn: None,
        },
        mono_ns: u64::MAX,
        tid: Some(u32::MAX),
    };
    let checkouts = vec![entry; protocol::MAX_CHECKOUTS_PER_MESSAGE];
    reporter.send("p", Body::CheckoutState { checkouts });
    assert!(!agent.pending());
    assert_eq!(reporter.stats().dropped, 2);
}

#[test]
fn the_socket_path_comes_from_the_environment() {
    assert_eq!(
        socket_path_from(Some("/tmp/x.sock".into())),
        PathBuf::from("/tmp/x.sock")
    );
    assert_eq!(
        socket_path_from(Some("".into())),
        PathBuf::from(DEFAULT_SOCKET)
    );
    assert_eq!(socket_path_from(None), PathBuf::from(DEFAULT_SOCKET));
}

#[test]
fn monotonic_clock_moves_forward() {
    let a = monotonic_ns();
    std::thread::sleep(Duration::from_millis(2));
    let b = monotonic_ns();
    assert!(a > 0 && b >= a + 2_000_000, "{a} then {b}");
}

// Re-sending the checkouts after an agent restart (`checkout_state`).

fn conn(i: i32) -> ConnId {
    ConnId {
        local_address: Some(SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16))),
        fd: Some(100 + i),
        conn: None,
    }
}

/// Every message until none arrives for 100 ms.
fn all(agent: &FakeAgent) -> Vec<Value> {
    agent
        .socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = agent.socket.recv(&mut buf) {
        assert!(n <= MAX_MESSAGE_BYTES, "datagram of {n} bytes");
        got.push(serde_json::from_slice(&buf[..n]).expect("JSON"));
    }
    agent
        .socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    got
}

fn kinds(msgs: &[Value]) -> Vec<&str> {
    msgs.iter().filter_map(|m| m["kind"].as_str()).collect()
}

fn entries(msgs: &[Value]) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m["kind"] == "checkout_state")
        .flat_map(|m| m["checkouts"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn info() -> PoolInfo {
    PoolInfo {
        max: Some(200),
        ..PoolInfo::default()
    }
}

#[test]
fn state_lists_what_is_out_since_its_acquire_and_by_whom() {
    let agent = FakeAgent::new();
    let pool = PoolReporter::new(agent.reporter(), "orders").with_state_interval(Duration::ZERO);
    pool.register(&info());
    for i in 0..3 {
        pool.acquire_start().finish(AcquireResult::Ok(conn(i)));
    }
    pool.release(conn(0));
    pool.connection_closed(ConnId {
        fd: Some(102),
        local_address: None,
        conn: None,
    });
    let acquired: Vec<Value> = all(&agent)
        .into_iter()
        .filter(|m| m["kind"] == "acquire_end" && m["fd"] == 101)
        .collect();
    pool.send_state();
    let msgs = all(&agent);
    assert_eq!(kinds(&msgs), ["pool", "checkout_state"]);
    check_envelope(&msgs[1], "checkout_state", "orders");
    assert_eq!(
        entries(&msgs),
        vec![serde_json::json!({
            "fd": 101,
            "local_address": "127.0.0.1:40001",
            "mono_ns": acquired[0]["mono_ns"],
            "tid": current_tid(),
        })]
    );
}

#[test]
fn a_checkout_returned_under_another_name_of_its_socket_leaves_the_state() {
    for window in [BATCH_WINDOW, Duration::ZERO] {
        let agent = FakeAgent::new();
        let pool = PoolReporter::new(agent.reporter(), "orders")
            .with_state_interval(Duration::ZERO)
            .with_batch_window(window);
        pool.register(&info());
        let by_address = ConnId {
            fd: None,
            ..conn(1)
        };
        pool.acquire_start().finish(AcquireResult::Ok(by_address));
        pool.acquire_start().finish(AcquireResult::Ok(conn(2)));
        // Its fd known by now: the same socket, by its address.
        pool.release(conn(1));
        pool.send_state();
        let out: Vec<Value> = entries(&all(&agent));
        assert_eq!(out.len(), 1, "{window:?}: {out:?}");
        assert_eq!(out[0]["fd"], 102, "{window:?}");
        pool.release(conn(2));
        pool.send_state();
        assert!(entries(&all(&agent)).is_empty(), "{window:?}");
    }
}

#[test]
fn a_large_pool_splits_its_state_to_fit_the_datagram_limit() {
    let agent = FakeAgent::new();
    let name = "p".repeat(200);
    let pool = PoolReporter::new(agent.reporter(), &name).with_state_interval(Duration::ZERO);
    for i in 0..150 {
        let c = ConnId {
            local_address: Some("[2001:db8::1234:5678]:40000".parse().expect("addr")),
            fd: Some(1000 + i),
            conn: None,
        };
        pool.acquire_start().finish(AcquireResult::Ok(c));
    }
    all(&agent);
    pool.send_state();
    let msgs = all(&agent);
    let states: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["kind"] == "checkout_state")
        .collect();
    assert_eq!(states.len(), 5);
    assert!(states
        .iter()
        .all(|m| m["checkouts"].as_array().is_some_and(|a| a.len() <= 32)));
    let mut fds: Vec<i64> = entries(&msgs)
        .iter()
        .filter_map(|e| e["fd"].as_i64())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, (1000..1150).collect::<Vec<i64>>());
    assert_eq!(agent.reporter().stats().dropped, 0);
}

#[test]
fn an_agent_that_comes_back_gets_the_registration_and_the_state() {
    let agent = FakeAgent::new();
    let path = agent.path.clone();
    let reporter = agent.reporter();
    let pool = PoolReporter::new(reporter.clone(), "orders").with_state_interval(Duration::ZERO);
    pool.register(&info());
    pool.acquire_start().finish(AcquireResult::Ok(conn(0)));
    pool.acquire_start().finish(AcquireResult::Ok(conn(1)));
    all(&agent);
    // The agent exits: its socket is closed but the file stays
    // (ECONNREFUSED), then it is removed (ENOENT).
    let mut agent = agent;
    agent.socket = UnixDatagram::unbound().expect("a socket");
    pool.release(conn(1));
    std::fs::remove_file(&path).expect("unlink");
    pool.acquire_start().finish(AcquireResult::Timeout);
    assert_eq!(reporter.comebacks(), 0);
    agent.socket = UnixDatagram::bind(&path).expect("bind again");
    pool.connection_created(conn(7));
    let msgs = all(&agent);
    assert_eq!(
        kinds(&msgs),
        ["connection_created", "pool", "checkout_state"]
    );
    assert_eq!(msgs[1]["max"], 200);
    let fds: Vec<i64> = entries(&msgs)
        .iter()
        .filter_map(|e| e["fd"].as_i64())
        .collect();
    assert_eq!(fds, [100]);
    assert_eq!(reporter.comebacks(), 1);
    // Once per comeback.
    pool.connection_created(conn(8));
    assert_eq!(kinds(&all(&agent)), ["connection_created"]);
}

#[test]
fn state_is_resent_periodically_only_while_connections_are_out() {
    let agent = FakeAgent::new();
    let pool = PoolReporter::new(agent.reporter(), "orders")
        .with_state_interval(Duration::from_millis(200));
    pool.register(&info());
    thread::sleep(Duration::from_millis(500));
    assert_eq!(kinds(&all(&agent)), ["pool"]);
    pool.acquire_start().finish(AcquireResult::Ok(conn(0)));
    thread::sleep(Duration::from_millis(900));
    let msgs = all(&agent);
    let states = kinds(&msgs)
        .iter()
        .filter(|k| **k == "checkout_state")
        .count();
    assert!((3..=6).contains(&states), "{msgs:?}");
    pool.release(conn(0));
    thread::sleep(Duration::from_millis(300));
    all(&agent);
    thread::sleep(Duration::from_millis(600));
    assert!(!kinds(&all(&agent)).contains(&"checkout_state"));
}

/// The default: short checkouts leave folded with the pool's batch, a
/// checkout still out a window later leaves as its own acquire_end, and
/// `Reporter::flush` sends what waits at once.
#[test]
fn short_checkouts_leave_folded_with_the_batch() {
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    let pool = PoolReporter::new(reporter.clone(), "batched").with_state_interval(Duration::ZERO);
    let handle = ConnId {
        conn: Some(7),
        ..ConnId::default()
    };
    for _ in 0..10 {
        let wait = pool.acquire_start();
        wait.finish(AcquireResult::Ok(handle));
        pool.release(handle);
    }
    // Held for the batch, not sent at once: the ten leave as one line.
    // (When is the shared batcher's next tick, which other tests' pools
    // also set: any time within a window, so it is not asserted.)
    let folded = agent.recv();
    check_envelope(&folded, "checkouts", "batched");
    assert_eq!(folded["conn"], 7, "{folded}");
    assert_eq!(
        folded["waits_ns"].as_array().map(Vec::len),
        Some(10),
        "{folded}"
    );
    assert!(!agent.pending(), "one line for ten checkouts");

    // Held past a window: its acquire_end alone, then a plain release.
    let wait = pool.acquire_start();
    wait.finish(AcquireResult::Ok(handle));
    let end = agent.recv();
    check_envelope(&end, "acquire_end", "batched");
    assert!(
        end["wait_ns"].is_u64(),
        "its start was folded into it: {end}"
    );
    pool.release(handle);
    check_envelope(&agent.recv(), "release", "batched");

    // flush sends a short checkout without waiting for the window.
    let wait = pool.acquire_start();
    wait.finish(AcquireResult::Ok(handle));
    pool.release(handle);
    let flushed_at = Instant::now();
    assert!(reporter.flush(Duration::from_secs(1)));
    check_envelope(&agent.recv(), "checkouts", "batched");
    assert!(flushed_at.elapsed() < BATCH_WINDOW, "at once");
}

// Holder stacks.

/// The application's function that takes a connection and keeps it.
#[inline(never)]
fn take_and_keep_the_connection(pool: &PoolReporter, handle: ConnId) {
    let pending = pool.acquire_start();
    std::hint::black_box(&pending);
    pending.finish(AcquireResult::Ok(handle));
}

/// A pool whose every checkout captures (no `stack_interval`: the tests
/// run in parallel, and the last capture's time is the process's).
fn stacked_pool(agent: &FakeAgent, window: Duration, after: Duration) -> PoolReporter {
    PoolReporter::new(agent.reporter(), "stacks")
        .with_state_interval(Duration::ZERO)
        .with_batch_window(window)
        .with_holder_stacks(true)
        .with_stack_after(after)
        .with_stack_interval(Duration::ZERO)
}

/// Every message until none arrives for `quiet`.
fn all_within(agent: &FakeAgent, quiet: Duration) -> Vec<Value> {
    agent
        .socket
        .set_read_timeout(Some(quiet))
        .expect("read timeout");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = agent.socket.recv(&mut buf) {
        got.push(serde_json::from_slice(&buf[..n]).expect("JSON"));
    }
    got
}

#[test]
fn a_checkout_held_past_stack_after_sends_its_holders_stack_once() {
    for window in [BATCH_WINDOW, Duration::ZERO] {
        let agent = FakeAgent::new();
        let after = Duration::from_millis(300);
        let pool = stacked_pool(&agent, window, after);
        let handle = ConnId {
            local_address: Some("127.0.0.1:41000".parse().expect("addr")),
            fd: Some(41),
            conn: None,
        };
        let taken_at = Instant::now();
        take_and_keep_the_connection(&pool, handle);
        let msgs = all_within(&agent, Duration::from_millis(900));
        let sent_after = taken_at.elapsed();
        // (Without a batch window, its acquire_start goes first.)
        let msgs: Vec<Value> = msgs
            .into_iter()
            .filter(|m| m["kind"] != "acquire_start")
            .collect();
        assert_eq!(
            kinds(&msgs),
            ["acquire_end", "holder_stack"],
            "{window:?}: {msgs:#?}"
        );
        let (end, stack) = (&msgs[0], &msgs[1]);
        check_envelope(stack, "holder_stack", "stacks");
        assert_eq!(stack["since_ns"], end["mono_ns"], "{window:?}: {stack}");
        assert_eq!(stack["local_address"], "127.0.0.1:41000");
        assert_eq!(stack["fd"], 41);
        let since = stack["since_ns"].as_u64().expect("since_ns");
        let at = stack["mono_ns"].as_u64().expect("mono_ns");
        assert!(
            at >= since + 300_000_000 && at < since + 800_000_000,
            "sent stack_after later, within half a second: {}",
            at - since
        );
        assert!(sent_after >= after);
        let frames: Vec<&str> = stack["stack"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| f.as_str().expect("text"))
            .collect();
        // The place that took it, then the function, innermost first.
        assert!(
            frames[0].starts_with("adapters/rust/src/tests.rs:"),
            "{frames:#?}"
        );
        assert!(
            frames[1].starts_with("poolscope_adapter::tests::take_and_keep_the_connection"),
            "{frames:#?}"
        );
        assert!(frames.len() <= 32, "{frames:#?}");
        // Once: nothing more while it stays out, and its return is plain.
        assert!(all_within(&agent, Duration::from_millis(500)).is_empty());
        pool.release(handle);
        assert_eq!(kinds(&all(&agent)), ["release"]);
    }
}

#[test]
fn a_short_checkout_sends_no_stack_and_off_sends_none() {
    let agent = FakeAgent::new();
    let after = Duration::from_millis(100);
    let pool = stacked_pool(&agent, BATCH_WINDOW, after);
    let off = PoolReporter::new(agent.reporter(), "off")
        .with_state_interval(Duration::ZERO)
        .with_holder_stacks(false)
        .with_stack_after(after);
    for i in 0..20 {
        take_and_keep_the_connection(&pool, conn(i));
        take_and_keep_the_connection(&off, conn(50 + i));
        pool.release(conn(i));
    }
    let msgs = all_within(&agent, Duration::from_millis(600));
    assert!(!kinds(&msgs).contains(&"holder_stack"), "{msgs:#?}");
    assert_eq!(
        kinds(&msgs).iter().filter(|k| **k == "acquire_end").count(),
        20,
        "the off pool's checkouts, still out: {msgs:#?}"
    );
}

/// A batch window longer than `stack_after` holds the `acquire_end` back:
/// the stack takes it along, after it.
#[test]
fn a_stack_never_leaves_before_its_acquire_end() {
    let agent = FakeAgent::new();
    let pool = stacked_pool(&agent, Duration::from_secs(3), Duration::from_millis(100));
    take_and_keep_the_connection(&pool, conn(1));
    let msgs = all_within(&agent, Duration::from_millis(500));
    assert_eq!(kinds(&msgs), ["acquire_end", "holder_stack"], "{msgs:#?}");
    assert_eq!(msgs[1]["since_ns"], msgs[0]["mono_ns"]);
    pool.release(conn(1));
    assert_eq!(kinds(&all(&agent)), ["release"]);
}

/// After an agent restart the state is re-sent, and with it the stacks
/// already sent of the checkouts still out (the agent kept them in memory
/// only); a checkout whose stack is not due yet sends it when due, once.
#[test]
fn the_state_resends_the_stacks_sent_of_checkouts_still_out() {
    for window in [BATCH_WINDOW, Duration::ZERO] {
        let agent = FakeAgent::new();
        let pool = stacked_pool(&agent, window, Duration::from_millis(600));
        take_and_keep_the_connection(&pool, conn(1));
        let first: Vec<Value> = all_within(&agent, Duration::from_millis(1000))
            .into_iter()
            .filter(|m| m["kind"] == "holder_stack")
            .collect();
        assert_eq!(first.len(), 1, "{window:?}: {first:#?}");
        // Out, its stack not due yet.
        take_and_keep_the_connection(&pool, conn(2));
        all(&agent);
        pool.send_state();
        let msgs = all(&agent);
        assert_eq!(
            kinds(&msgs),
            ["checkout_state", "holder_stack"],
            "{window:?}: {msgs:#?}"
        );
        assert_eq!(entries(&msgs).len(), 2, "{window:?}");
        let again = &msgs[1];
        check_envelope(again, "holder_stack", "stacks");
        for field in ["since_ns", "stack", "fd", "local_address"] {
            assert_eq!(again[field], first[0][field], "{window:?}: {field}");
        }
        // The second's own stack, when due, once.
        let later = all_within(&agent, Duration::from_millis(900));
        assert_eq!(stacked_fds(&later), [102], "{window:?}: {later:#?}");
        // Both re-sent now; once released, neither.
        pool.send_state();
        let msgs = all(&agent);
        assert_eq!(
            kinds(&msgs),
            ["checkout_state", "holder_stack", "holder_stack"],
            "{window:?}: {msgs:#?}"
        );
        assert_eq!(stacked_fds(&msgs), [101, 102], "{window:?}");
        pool.release(conn(1));
        pool.send_state();
        let msgs = all(&agent);
        assert_eq!(stacked_fds(&msgs), [102], "{window:?}: {msgs:#?}");
        pool.release(conn(2));
        pool.send_state();
        let msgs = all(&agent);
        assert!(
            !kinds(&msgs).contains(&"holder_stack") && entries(&msgs).is_empty(),
            "{window:?}: {msgs:#?}"
        );
    }
}

/// The `fd`s of the connections whose stack was sent.
fn stacked_fds(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m["kind"] == "holder_stack")
        .map(|m| m["fd"].as_u64().expect("fd"))
        .collect()
}

#[test]
fn checkouts_capture_only_a_stack_interval_after_the_last_capture() {
    // The pool's own clock of the last capture: other tests capture too.
    static LAST_CAPTURE: AtomicU64 = AtomicU64::new(0);
    let agent = FakeAgent::new();
    let interval = Duration::from_millis(200);
    let pool = stacked_pool(&agent, BATCH_WINDOW, Duration::from_millis(100))
        .with_stack_interval(interval)
        .with_capture_clock(&LAST_CAPTURE);
    // 100 checkouts at once, all held: only the first captured.
    let started = Instant::now();
    for i in 0..100 {
        take_and_keep_the_connection(&pool, conn(i));
    }
    assert!(started.elapsed() < interval, "{:?}", started.elapsed());
    let msgs = all_within(&agent, Duration::from_millis(600));
    assert_eq!(stacked_fds(&msgs), [100], "{:?}", kinds(&msgs));
    // An interval later, the next captures, and the one right after not.
    std::thread::sleep((interval + Duration::from_millis(20)).saturating_sub(started.elapsed()));
    take_and_keep_the_connection(&pool, conn(100));
    take_and_keep_the_connection(&pool, conn(101));
    let msgs = all_within(&agent, Duration::from_millis(600));
    assert_eq!(stacked_fds(&msgs), [200], "{:?}", kinds(&msgs));
    for i in 0..102 {
        pool.release(conn(i));
    }
}

#[test]
fn with_no_stack_interval_every_checkout_captures() {
    static LAST_CAPTURE: AtomicU64 = AtomicU64::new(0);
    let agent = FakeAgent::new();
    let pool = stacked_pool(&agent, BATCH_WINDOW, Duration::from_millis(100))
        .with_capture_clock(&LAST_CAPTURE);
    for i in 0..20 {
        take_and_keep_the_connection(&pool, conn(i));
    }
    let msgs = all_within(&agent, Duration::from_millis(600));
    let mut fds = stacked_fds(&msgs);
    fds.sort_unstable();
    assert_eq!(fds, (100..120).collect::<Vec<u64>>(), "{:?}", kinds(&msgs));
    assert_ne!(LAST_CAPTURE.load(Ordering::Relaxed), 0);
}

#[test]
fn a_stack_is_cut_to_what_the_agent_accepts() {
    let agent = FakeAgent::new();
    let reporter = agent.reporter();
    let handle = ConnId {
        conn: Some(3),
        ..ConnId::default()
    };
    // 40 short frames: the innermost 32.
    let frames: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    reporter.holder_stack("p", handle, 7, frames);
    let msg = agent.recv();
    check_envelope(&msg, "holder_stack", "p");
    let got = msg["stack"].as_array().expect("frames");
    assert_eq!(got.len(), 32);
    assert_eq!(got[0], "f0");
    assert_eq!(got[31], "f31");
    // Long frames with control characters: cut to 256 characters, cleaned,
    // and the outermost left out until the datagram fits.
    let frames: Vec<String> = (0..40)
        .map(|i| format!("g{i}\n{}", "x".repeat(400)))
        .collect();
    reporter.holder_stack("p", handle, 7, frames);
    let msg = agent.recv();
    let got: Vec<&str> = msg["stack"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f.as_str().expect("text"))
        .collect();
    assert!((10..32).contains(&got.len()), "{}", got.len());
    assert!(got[0].starts_with("g0?xxx"));
    assert!(got
        .iter()
        .all(|f| f.chars().count() == 256 && !f.chars().any(char::is_control)));
    // Nothing to say: nothing sent.
    reporter.holder_stack("p", handle, 7, vec![String::new()]);
    assert!(!agent.pending());
    assert_eq!(reporter.stats().dropped, 0);
}

/// An application's async fn that takes a connection and keeps it: its
/// frame is the poll of its future.
async fn an_async_fn_that_keeps_the_connection(pool: &PoolReporter, handle: ConnId) {
    let pending = pool.acquire_start();
    tokio::task::yield_now().await;
    pending.finish(AcquireResult::Ok(handle));
}

async fn the_request(pool: &PoolReporter, handle: ConnId) {
    // Without debug info, only functions that were not inlined have a
    // name: awaited through a `dyn Future`, its poll is not.
    let keep: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> =
        Box::pin(an_async_fn_that_keeps_the_connection(pool, handle));
    keep.await;
    tokio::task::yield_now().await;
}

#[test]
fn an_async_holder_is_named_by_its_async_fn() {
    let agent = FakeAgent::new();
    let pool = stacked_pool(&agent, BATCH_WINDOW, Duration::from_millis(100));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(the_request(&pool, conn(5)));
    let msgs = all_within(&agent, Duration::from_millis(500));
    assert_eq!(kinds(&msgs), ["acquire_end", "holder_stack"], "{msgs:#?}");
    let frames: Vec<&str> = msgs[1]["stack"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f.as_str().expect("text"))
        .collect();
    assert!(
        frames[0].starts_with("adapters/rust/src/tests.rs:"),
        "{frames:#?}"
    );
    assert!(
        frames[1].starts_with(
            "poolscope_adapter::tests::an_async_fn_that_keeps_the_connection::{{closure}}"
        ),
        "{frames:#?}"
    );
}

#[inline(never)]
async fn bench_request_handler(pool: &PoolReporter, handle: ConnId) {
    let pending = pool.acquire_start();
    tokio::task::yield_now().await;
    pending.finish(AcquireResult::Ok(handle));
    pool.release(handle);
}

#[inline(never)]
async fn bench_route(pool: &PoolReporter, handle: ConnId, n: u32) {
    for _ in 0..n {
        Box::pin(bench_request_handler(pool, handle)).await;
    }
}

/// What stacks add to an acquire+release pair (the adapter's side only,
/// nothing sent: a disabled reporter), in a tokio task a few async fns
/// deep: `cargo test --release -p poolscope-adapter --all-features --
/// --ignored --nocapture pair_cost`.
#[test]
#[ignore = "a measurement, not a test"]
fn pair_cost_with_and_without_stacks() {
    const N: u32 = 100_000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let handle = ConnId {
        conn: Some(1),
        ..ConnId::default()
    };
    for round in 0..3 {
        for (stacks, interval) in [
            (false, DEFAULT_STACK_INTERVAL),
            (true, DEFAULT_STACK_INTERVAL),
            (true, Duration::ZERO),
        ] {
            let pool = PoolReporter::new(Reporter::disabled(), "bench")
                .with_holder_stacks(stacks)
                .with_stack_interval(interval);
            let cost = runtime.block_on(async {
                tokio::spawn(async move {
                    bench_route(&pool, handle, N / 10).await;
                    let cpu = cpu_now();
                    bench_route(&pool, handle, N).await;
                    (cpu_now() - cpu) / f64::from(N)
                })
                .await
                .expect("the task")
            });
            eprintln!(
                "round {round}, stacks {stacks}, interval {interval:?}: {cost:.0} ns CPU per pair"
            );
        }
    }
}

fn cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}
