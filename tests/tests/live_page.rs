//! The live page at `/`, rendered by a real headless Chromium while a known
//! leak runs: it must show the leak, the pool's used/max and the process
//! name. A screenshot is kept in tests/artifacts/live-page.png.
#![allow(clippy::unwrap_used)]

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use poolscope_tests::{python3, require_kernel, wait_until, Agent, Postgres, TempDir};

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
        "--window-size=1400,900",
        // Let the page's first refresh (a fetch of five API paths) finish.
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

/// A process that registers a pool of at most 3, checks one connection out
/// and keeps it quiet (a leak), through the adapter socket.
const LEAKER: &str = r#"
import json, os, socket, sys, time, psycopg
path, dsn = sys.argv[1], sys.argv[2]
out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def send(**m):
    m.update(v=1, pool="checkout-service", mono_ns=time.monotonic_ns())
    out.sendto(json.dumps(m).encode(), path)
send(kind="pool", db_system="postgresql", max=3, min_idle=1, library="test")
conn = psycopg.connect(dsn, autocommit=True)
send(kind="connection_created", fd=conn.fileno())
send(kind="acquire_start", request=1)
send(kind="acquire_end", request=1, result="ok", fd=conn.fileno())
conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'orders'")
print("ready", flush=True)
sys.stdin.read()
"#;

#[test]
fn live_page_shows_the_leak_the_pool_and_the_process() {
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
            "[adapter]\nsocket = {:?}\n[leaks]\nleak_threshold_seconds = 1.0\nquiet_seconds = 0.5\n",
            socket.display().to_string()
        ),
        &[],
    );
    let script = dir.path().join("leaker.py");
    std::fs::write(&script, LEAKER).unwrap();
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut leaker = Command::new(python3())
        .arg(&script)
        .arg(&socket)
        .arg(&dsn)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = leaker.id();
    // Wait for the report, so that the page has something to show.
    let found = wait_until(Duration::from_secs(20), || {
        let body = agent.get("/api/v1/leaks").ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["reports"]
            .as_array()?
            .iter()
            .find(|r| r["pid"] == pid && r["kind"] == "leaked" && r["status"] == "open")?;
        Some(())
    });
    assert!(
        found.is_some(),
        "no leak report for pid {pid}:\n{}",
        agent.log()
    );

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
        "1 / 3",
        "checked out",
        // Sizing: the pool was sampled for less than the 10 minutes needed.
        "insufficient data",
        // The query-latency table's row of the leaker's SELECT.
        "<td>SELECT</td>",
    ] {
        assert!(
            dom.contains(expected),
            "the page lacks {expected:?}:\n{dom}"
        );
    }

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

    drop(leaker.stdin.take());
    let _ = leaker.wait();
}
