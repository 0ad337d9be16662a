//! Sizing advice and percentiles on real pools: a Python process runs two
//! psycopg_pool pools against a real PostgreSQL through the pool adapter,
//! one really too small (max 2, six threads that each hold a connection
//! for a 50 ms query, so that four wait all the time) and one far too large
//! (max 20, one thread with a quick query every 100 ms). `/api/v1/sizing`
//! must advise growing the first to its demand and shrinking the second;
//! `/api/v1/pools` must show the first's waits, and
//! `/api/v1/queries/latency` the 50 ms query. The CLI's table is kept in
//! tests/artifacts/sizing.txt.
#![allow(clippy::unwrap_used)]

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use poolscope_tests::{
    adapter_config, python3, python_adapter_dir, require_kernel, wait_until, Agent, Postgres,
    TempDir, Value,
};

/// A window short enough for a test: advice after 5 s, shrinking after
/// half the window (10 s).
const SIZING: &str =
    "\n[sizing]\nwindow_seconds = 20\nmin_observed_seconds = 5\nsample_seconds = 1\n";

const APP: &str = r#"
import sys, threading, time
from psycopg_pool import ConnectionPool
from poolscope_adapter import instrument_psycopg_pool
dsn = sys.argv[1]
small = ConnectionPool(dsn, min_size=2, max_size=2, timeout=30, open=True, kwargs={"autocommit": True})
large = ConnectionPool(dsn, min_size=2, max_size=20, timeout=30, open=True, kwargs={"autocommit": True})
instrument_psycopg_pool(small, pool_name="too-small")
instrument_psycopg_pool(large, pool_name="too-large")
stop = threading.Event()
def busy():
    while not stop.is_set():
        with small.connection() as c:
            c.execute("SELECT pg_sleep(0.05)")
def light():
    while not stop.is_set():
        with large.connection() as c:
            c.execute("SELECT 1")
        time.sleep(0.1)
threads = [threading.Thread(target=busy) for _ in range(6)] + [threading.Thread(target=light)]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
"#;

fn pool<'a>(sizing: &'a Value, name: &str) -> Option<&'a Value> {
    sizing["pools"]
        .as_array()?
        .iter()
        .find(|p| p["pool"] == name)
}

#[test]
fn a_pool_too_small_is_told_to_grow_and_one_too_large_to_shrink() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let dir = TempDir::new("poolscope-sizing");
    let socket = dir.path().join("adapter.sock");
    let agent = Agent::start_with_config(&(adapter_config(&socket, &[]) + SIZING), &[]);
    let script = dir.path().join("sizing_app.py");
    std::fs::write(&script, APP).unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut app = Command::new(python3())
        .arg(&script)
        .arg(&dsn)
        .env("PYTHONPATH", python_adapter_dir())
        .env("POOLSCOPE_ADAPTER_SOCKET", &socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // Shrinking needs half the window sampled: 10 s, and then some.
    let advised = wait_until(Duration::from_secs(40), || {
        let sizing: Value = serde_json::from_str(&agent.get("/api/v1/sizing").ok()?).ok()?;
        let small = pool(&sizing, "too-small")?;
        let large = pool(&sizing, "too-large")?;
        (small["verdict"] == "grow" && large["verdict"] == "shrink").then(|| sizing.clone())
    });
    let sizing = advised.unwrap_or_else(|| {
        panic!(
            "no grow and shrink advice within 40 s: {}\n{}",
            agent.get("/api/v1/sizing").unwrap_or_default(),
            agent.log()
        )
    });
    assert_eq!(sizing["window_seconds"], 20);

    // Six callers on two connections: at max nearly always, four waiting;
    // the advice is the demand seen (in use plus waiting), at least 3.
    let small = pool(&sizing, "too-small").unwrap();
    assert_eq!(small["max"], 2);
    let advised = small["recommended_max"].as_u64().unwrap();
    let demand = small["usage"]["peak_demand"].as_u64().unwrap();
    assert!((3..=6).contains(&advised), "{small}");
    assert_eq!(advised, demand.max(3), "{small}");
    assert!(
        small["usage"]["at_max_share"].as_f64().unwrap() >= 0.5,
        "{small}"
    );
    let reason = small["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("max 2 -> {advised}: at max for")),
        "{reason}"
    );
    // Each waiter waits for a 50 ms query to end, often two.
    let p99_wait = small["p99_wait_seconds"].as_f64().unwrap();
    assert!((0.02..5.0).contains(&p99_wait), "{small}");

    // One connection in use at a time out of 20: down to min_size (2).
    let large = pool(&sizing, "too-large").unwrap();
    assert_eq!(
        (large["max"].as_u64(), large["recommended_max"].as_u64()),
        (Some(20), Some(2)),
        "{large}"
    );
    assert_eq!(large["usage"]["peak_used"], 1, "{large}");
    assert_eq!(large["usage"]["at_max_share"], 0.0, "{large}");

    // The waits and uses behind it, as percentiles.
    let pools: Value = serde_json::from_str(&agent.get("/api/v1/pools").unwrap()).unwrap();
    let small_view = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "too-small")
        .unwrap();
    let wait = &small_view["wait_seconds"];
    let used = &small_view["use_seconds"];
    assert!(wait["count"].as_u64().unwrap() >= 50, "{small_view}");
    assert!(wait["p50"].as_f64().unwrap() >= 0.01, "{small_view}");
    // A checkout holds its connection for the 50 ms query.
    let use_p50 = used["p50"].as_f64().unwrap();
    assert!((0.05..0.5).contains(&use_p50), "{small_view}");

    let queries: Value =
        serde_json::from_str(&agent.get("/api/v1/queries/latency").unwrap()).unwrap();
    let server = format!("127.0.0.1:{}", pg.port);
    let selects = queries["queries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["server"] == server.as_str() && q["operation"] == "SELECT")
        .unwrap_or_else(|| panic!("no SELECT on {server}: {queries}"));
    let d = &selects["duration_seconds"];
    // pg_sleep(0.05) most of the time, SELECT 1 a tenth as often.
    assert!(d["count"].as_u64().unwrap() >= 100, "{selects}");
    let (p50, p99, max) = (
        d["p50"].as_f64().unwrap(),
        d["p99"].as_f64().unwrap(),
        d["max"].as_f64().unwrap(),
    );
    assert!((0.05..0.2).contains(&p50), "{selects}");
    assert!(p50 <= p99 && p99 <= max, "{selects}");

    // The CLI says the same.
    let (code, table) = agent.cli("sizing", &[]);
    assert_eq!(code, 0, "{table}");
    for expected in ["too-small", "grow", "too-large", "shrink", "max 20 -> 2"] {
        assert!(table.contains(expected), "lacks {expected:?}:\n{table}");
    }
    let (code, pools_table) = agent.cli("pools", &[]);
    assert_eq!(code, 0, "{pools_table}");
    assert!(pools_table.contains("WAIT99"), "{pools_table}");
    let (code, queries_table) = agent.cli("queries", &[]);
    assert_eq!(code, 0, "{queries_table}");
    assert!(
        queries_table.contains("query latency over the last 300 s"),
        "{queries_table}"
    );
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(
        artifacts.join("sizing.txt"),
        format!(
            "$ curl -s http://127.0.0.1:9464/api/v1/sizing\n{sizing}\n\n\
             $ poolscope sizing\n{table}\n$ poolscope pools\n{pools_table}\n\
             $ poolscope queries\n{queries_table}"
        ),
    )
    .unwrap();

    drop(app.stdin.take());
    let _ = app.wait();
}
