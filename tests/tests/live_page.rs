//! The live page at `/`, rendered by a real headless Chromium while a real
//! pool is exhausted: it must show the leak with its holder's stack, the
//! pool's used/max, its 15-minute charts and the process name, pushed by
//! the agent's event stream. A screenshot is kept in
//! tests/artifacts/live-page.png.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use poolscope_tests::{
    python3, python_adapter_dir, require_kernel, wait_until, Agent, Postgres, TempDir, Value,
};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium flags for a sandbox-less root run on a machine without network
/// (see the machine notes: background networking must be off).
fn chromium(profile: &TempDir) -> Command {
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1300",
        // Let the page's first refresh (a fetch of five API paths) finish.
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

/// A real pool that runs out: psycopg_pool with at most 2 connections,
/// instrumented by the Python adapter. One connection is taken by
/// `keep_one_for_the_report` and never given back (a leak whose report
/// must carry that stack); another is held by a thread that keeps
/// querying; three more threads keep asking for a connection and time out
/// after 1.5 s, so the pool is at its max with requests waiting the whole
/// time.
const EXHAUSTED: &str = r#"
import sys, threading, time
import psycopg_pool
from poolscope_adapter import instrument_psycopg_pool
dsn = sys.argv[1]
pool = psycopg_pool.ConnectionPool(dsn, min_size=2, max_size=2, timeout=1.5, open=False)
instrument_psycopg_pool(pool, pool_name="checkout-service")
pool.open(wait=True, timeout=30)
with pool.connection() as conn:
    conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'orders'")

def keep_one_for_the_report():
    return pool.getconn()

leaked = keep_one_for_the_report()
busy = pool.getconn()

def keep_busy():
    while True:
        busy.execute("SELECT pg_sleep(0.05)")

def keep_asking():
    while True:
        try:
            pool.putconn(pool.getconn())
        except psycopg_pool.PoolTimeout:
            pass

for target in [keep_busy] + [keep_asking] * 3:
    threading.Thread(target=target, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"#;

/// Reads `path` as Server-Sent Events over a plain HTTP/1.1 request until
/// `frames` snapshot events came (their JSON), or `limit` passed.
fn read_events(agent: &Agent, path: &str, frames: usize, limit: Duration) -> Vec<Value> {
    let mut stream = TcpStream::connect(agent.addr).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: poolscope\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let started = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    let mut events = Vec::new();
    while events.len() < frames && started.elapsed() < limit {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        events = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .collect();
    }
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("text/event-stream"),
        "not an event stream: {}",
        text.chars().take(300).collect::<String>()
    );
    events
}

#[test]
fn live_page_pushes_the_exhausted_pool_its_trends_and_the_leak_with_its_stack() {
    if !require_kernel() {
        return;
    }
    assert!(
        std::path::Path::new(CHROMIUM).exists() || std::env::var("CI").as_deref() != Ok("true"),
        "{CHROMIUM} is missing: run cargo xtask setup"
    );
    if !std::path::Path::new(CHROMIUM).exists() {
        eprintln!("skipping: {CHROMIUM} is missing (cargo xtask setup installs it)");
        return;
    }
    let pg = Postgres::start();
    let dir = TempDir::new("poolscope-live");
    let socket = dir.path().join("adapter.sock");
    let agent = Agent::start_with_config(
        &format!(
            "[adapter]\nsocket = {:?}\n[leaks]\nleak_threshold_seconds = 3.0\nquiet_seconds = 2.0\n",
            socket.display().to_string()
        ),
        &[],
    );
    let script = dir.path().join("exhausted.py");
    std::fs::write(&script, EXHAUSTED).unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
        pg.port
    );
    let mut app = Command::new(python3())
        .arg(&script)
        .arg(&dsn)
        .env("PYTHONPATH", python_adapter_dir())
        .env("POOLSCOPE_ADAPTER_SOCKET", &socket)
        // The leak follows another checkout within the default millisecond.
        .env("POOLSCOPE_ADAPTER_STACK_INTERVAL_US", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = app.id();

    // Wait until the trends hold half a minute of the exhausted pool and
    // the leak is reported with its stack.
    let snapshot = wait_until(Duration::from_secs(90), || {
        let body = agent.get("/api/v1/live").ok()?;
        let snap: Value = serde_json::from_str(&body).ok()?;
        let trend = snap["trends"]["pools"]
            .as_array()?
            .iter()
            .find(|t| t["pid"] == pid && t["pool"] == "checkout-service")?;
        let exhausted = trend["points"]
            .as_array()?
            .iter()
            .filter(|p| p[1] == 2 && p[2].as_u64().is_some_and(|w| w >= 1))
            .count();
        let leak = snap["leaks"]
            .as_array()?
            .iter()
            .find(|r| r["pid"] == pid && r["kind"] == "leaked")?;
        leak["holder_stack"].as_array()?;
        (exhausted >= 6).then_some(snap)
    })
    .unwrap_or_else(|| {
        panic!(
            "no exhausted pool with its trends and leak for pid {pid}:\n{}\n{}",
            agent.get("/api/v1/live").unwrap_or_default(),
            agent.log()
        )
    });
    let trend = snapshot["trends"]["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["pid"] == pid)
        .unwrap();
    assert_eq!(trend["max"], 2, "{trend}");
    assert_eq!(snapshot["trends"]["step_seconds"], 5);
    let waits: Vec<f64> = trend["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[3].as_f64())
        .collect();
    assert!(
        waits.iter().any(|w| *w >= 1.0),
        "waiters time out after 1.5 s: the p99 wait shows it: {trend}"
    );
    let leak = snapshot["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == pid && r["kind"] == "leaked")
        .unwrap();
    let stack: Vec<&str> = leak["holder_stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        stack[0].starts_with("keep_one_for_the_report (") && stack[0].contains("exhausted.py:"),
        "{stack:?}"
    );

    // Pushed, not polled: one stream brings a snapshot every 2 s.
    let events = read_events(&agent, "/api/v1/live/events", 2, Duration::from_secs(15));
    assert_eq!(events.len(), 2, "two snapshots within 15 s");
    assert_ne!(events[0]["at"], events[1]["at"], "a new snapshot each time");
    assert!(events[1]["pools"]["pools"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == pid && p["used"] == 2));

    let url = format!("http://{}/", agent.addr);
    let profile = TempDir::new("poolscope-chromium");
    let dom = chromium(&profile)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    for expected in [
        "leaked",
        "checkout-service",
        &format!("python3 ({pid})"),
        "2 / 2",
        "checked out",
        "at keep_one_for_the_report (",
        // The charts: one card per pool, lines drawn.
        &format!("python3 ({pid}) · checkout-service"),
        "<polyline",
        "p99 wait",
        // Sizing: the pool was sampled for less than the 10 minutes needed.
        "insufficient data",
        // The query-latency table's row of the busy thread's SELECT.
        "<td>SELECT</td>",
        // The page followed the stream.
        "(live)",
    ] {
        assert!(
            dom.contains(expected),
            "the page lacks {expected:?}:\n{dom}"
        );
    }
    assert!(
        !dom.contains("cdn") && !dom.contains("<script src"),
        "the page loads nothing from elsewhere"
    );

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("live-page.png");
    let _ = std::fs::remove_file(&shot);
    let profile = TempDir::new("poolscope-chromium");
    let status = chromium(&profile)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "chromium screenshot failed");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is not a real PNG"
    );

    // Streams are bounded: past 16, the 17th is refused (and points to
    // the snapshot), while the rest of the API answers.
    let held: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(agent.addr).unwrap();
            write!(
                s,
                "GET /api/v1/live/events HTTP/1.1\r\nHost: poolscope\r\n\r\n"
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 200");
            s
        })
        .collect();
    let mut refused = TcpStream::connect(agent.addr).unwrap();
    write!(
        refused,
        "GET /api/v1/live/events HTTP/1.1\r\nHost: poolscope\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    refused.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        agent.get("/api/v1/live").is_ok(),
        "the snapshot still answers"
    );
    drop(held);

    drop(app.stdin.take());
    let _ = app.kill();
    let _ = app.wait();
}
