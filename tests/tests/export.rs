//! Export to real consumers: a real Prometheus scraping `/metrics`,
//! `promtool check metrics` on the exposition, and an OTLP receiver
//! (`poolscope_tests::otlp_receiver`, gRPC and HTTP/protobuf) taking the
//! agent's pushed metrics and event log records, including while it is down.
//!
//! Each test starts its own PostgreSQL (so that its TCP port carries only
//! the test's clients) and its own agent. Agents of tests that run at the
//! same time see each other's clients too, so values that cannot be filtered
//! by port or pid (`poolscope_leak_reports_total{kind}`) are compared
//! between consumers at the same moment rather than with a fixed number.
//! Everything is polled with deadlines; nothing sleeps to let time pass
//! except the resilience test's two-minute outage, which is the point.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use poolscope_tests::{
    free_port, json, metric_samples, metric_series, operation_counts,
    otlp_receiver::{LogRecordView, MetricKind, MetricPoint, OtlpReceiver, Signal, Transport},
    postgres_bin_dir, process_alive, python3, require_kernel, script_path, vm_rss_kib, wait_until,
    Agent, DbClient, LeakReport, LeaksResponse, MariaDb, PoolApp, PoolView, Postgres, ReportStatus,
    TempDir, Value,
};

/// SELECTs the workload client sends over its one connection.
const SELECTS: u64 = 25;

/// How long pushed or scraped data gets to agree with the agent.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(30);

const IDLE_IN_TX_SECONDS: f64 = 2.0;

// ---------------------------------------------------------------------------
// Workload: one client doing SELECTs, one holding a transaction open
// ---------------------------------------------------------------------------

/// Client A ran [`SELECTS`] SELECTs on one connection and stays connected;
/// client B ran `BEGIN; SELECT 1` and stays quiet in its transaction.
struct Workload {
    selects: DbClient,
    idle_in_tx: DbClient,
}

impl Workload {
    fn run(pg: &Postgres) -> Workload {
        let mut selects = DbClient::spawn();
        selects.connect("postgresql", pg.port);
        for i in 0..SELECTS {
            let rows = selects.sql(&format!("SELECT {i}"));
            assert_eq!(rows, Some(vec![vec![json!(i)]]));
        }
        let mut idle_in_tx = DbClient::spawn();
        idle_in_tx.connect("postgresql", pg.port);
        idle_in_tx.sql("BEGIN");
        idle_in_tx.sql("SELECT 1");
        Workload {
            selects,
            idle_in_tx,
        }
    }

    /// SELECT round trips to the port: A's and B's one.
    fn select_count() -> u64 {
        SELECTS + 1
    }

    /// Every round trip to the port: the SELECTs and B's BEGIN.
    fn round_trips() -> u64 {
        SELECTS + 2
    }
}

fn leak_config(extra: &str) -> String {
    format!("[leaks]\nidle_in_transaction_seconds = {IDLE_IN_TX_SECONDS:?}\n\n{extra}")
}

/// The agent under test with `toml` and its own adapter socket (in `dir`),
/// so that it takes nobody else's default `/run/poolscope/adapter.sock`.
fn start_agent(toml: &str, dir: &TempDir) -> Agent {
    let socket = adapter_socket(dir);
    Agent::start_with_config(
        &format!(
            "[adapter]\nsocket = {:?}\n\n{toml}",
            socket.display().to_string()
        ),
        &[],
    )
}

fn adapter_socket(dir: &TempDir) -> PathBuf {
    dir.path().join("adapter.sock")
}

fn leaks(agent: &Agent) -> Vec<LeakReport> {
    let body = agent
        .get("/api/v1/leaks")
        .unwrap_or_else(|e| panic!("GET /api/v1/leaks: {e:#}"));
    let response: LeaksResponse = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/api/v1/leaks is not valid JSON ({e}): {body}"));
    response.reports
}

/// The open idle-in-transaction report of `pid`, once the agent shows it.
fn wait_for_idle_in_tx_report(agent: &Agent, pid: u32) -> LeakReport {
    let found = wait_until(EXPORT_TIMEOUT, || {
        leaks(agent).into_iter().find(|r| {
            r.pid == pid
                && r.kind.as_str() == "idle_in_transaction"
                && r.status == ReportStatus::Open
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "no open idle_in_transaction report for pid {pid}: {:#?}\n--- agent log ---\n{}",
            leaks(agent),
            agent.log()
        )
    })
}

/// Sum of the operation histogram's counts for `port` in Prometheus text.
fn exposition_round_trips(metrics: &str, port: u16) -> u64 {
    operation_counts(metrics, port).values().sum()
}

fn exposition_selects(metrics: &str, port: u16) -> u64 {
    operation_counts(metrics, port)
        .iter()
        .filter(|((op, error), _)| op == "SELECT" && error.is_empty())
        .map(|(_, n)| n)
        .sum()
}

/// `tests/scripts/adapter_pool_events.py`: a process that reports one
/// adapter pool over the agent's adapter socket (a slow acquire of 1.5 s, a
/// release, a timed-out acquire) and keeps it alive until dropped.
struct AdapterPool {
    pid: u32,
    child: Child,
}

const ADAPTER_POOL: &str = "export-test";

impl AdapterPool {
    fn start(socket: &std::path::Path, port: u16) -> AdapterPool {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/adapter_pool_events.py");
        let mut child = Command::new(python3())
            .arg("-u")
            .arg(&script)
            .arg(socket)
            .arg(port.to_string())
            .arg(ADAPTER_POOL)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the script's answer");
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{} answered {line:?}: {e}", script.display()));
        assert_eq!(answer["pid"], json!(child.id()), "{answer}");
        assert_eq!(answer["messages"], json!(7), "{answer}");
        AdapterPool {
            pid: child.id(),
            child,
        }
    }
}

impl Drop for AdapterPool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn require_tool(path: &str) -> bool {
    if std::path::Path::new(path).is_file() {
        return true;
    }
    let text = format!("{path} is missing: run cargo xtask setup (Debian package prometheus)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{text}");
    }
    eprintln!("skipped: {text}");
    false
}

/// A real Prometheus server on a free loopback port, scraping one target
/// every second, with its TSDB in a temp dir. Killed on drop.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

/// One series of an instant query: its labels and value.
type PromSample = (BTreeMap<String, String>, f64);

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("poolscope-prometheus");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: poolscope\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("cannot write prometheus.yml");
        let log_path = dir.path().join("prometheus.log");
        // Another process may take the port between free_port() and
        // Prometheus's bind; try a few.
        for _ in 0..3 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let log = File::create(&log_path).expect("cannot create the Prometheus log");
            let mut child = Command::new(PROMETHEUS)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
            let ready = wait_until(Duration::from_secs(60), || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false);
                }
                poolscope::cli::AgentClient::without_token(addr)
                    .get("/-/ready")
                    .ok()
                    .map(|_| true)
            });
            if ready == Some(true) {
                return Prometheus { addr, child, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "Prometheus did not become ready:\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API (`/api/v1/query`).
    fn query(&self, promql: &str) -> Vec<PromSample> {
        let path = format!(
            "/api/v1/query?query={}",
            poolscope::cli::percent_encode(promql)
        );
        let body = poolscope::cli::AgentClient::without_token(self.addr)
            .get(&path)
            .unwrap_or_else(|e| panic!("Prometheus query {promql:?}: {e:#}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("Prometheus answered no JSON ({e}): {body}"));
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        assert_eq!(answer["data"]["resultType"], "vector", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("{promql}: bad sample {series}"));
                (labels, value)
            })
            .collect()
    }

    /// The single value of a query that yields at most one series.
    fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql);
        assert!(result.len() <= 1, "{promql}: {result:?}");
        result.first().map(|(_, v)| *v)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until `check` returns Ok, for at most [`EXPORT_TIMEOUT`]; panics
/// with its last complaint.
#[track_caller]
fn agree(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    let ok = wait_until(EXPORT_TIMEOUT, || match check() {
        Ok(()) => Some(()),
        Err(e) => {
            last = e;
            None
        }
    });
    assert!(
        ok.is_some(),
        "{what}: no agreement within {EXPORT_TIMEOUT:?}; last: {last}"
    );
}

fn pools_of(agent: &Agent, pid: u32) -> Vec<PoolView> {
    agent.pools().into_iter().filter(|p| p.pid == pid).collect()
}

/// (pool name, state) -> connections, from labelled samples.
fn pool_counts<'a>(
    samples: impl IntoIterator<Item = &'a (BTreeMap<String, String>, f64)>,
) -> BTreeMap<(String, String), f64> {
    samples
        .into_iter()
        .map(|(labels, v)| {
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            (
                (
                    label("db_client_connection_pool_name"),
                    label("db_client_connection_state"),
                ),
                *v,
            )
        })
        .collect()
}

fn api_pool_counts(pools: &[PoolView]) -> BTreeMap<(String, String), f64> {
    pools
        .iter()
        .flat_map(|p| {
            [
                ((p.name.clone(), "used".to_string()), p.used as f64),
                ((p.name.clone(), "idle".to_string()), p.idle as f64),
            ]
        })
        .collect()
}

fn exposition_samples(metrics: &str, name: &str) -> Vec<PromSample> {
    metric_series(metrics, name)
        .into_iter()
        .map(|(labels, v)| (labels.into_iter().collect(), v))
        .collect()
}

#[test]
fn prometheus_scrapes_the_values_the_api_reports() {
    if !require_kernel() || !require_tool(PROMETHEUS) {
        return;
    }
    let pg = Postgres::start();
    let adapter_dir = TempDir::new("poolscope-export-adapter");
    let agent = start_agent(&leak_config(""), &adapter_dir);
    let prometheus = Prometheus::start(agent.addr);
    let up = wait_until(EXPORT_TIMEOUT, || {
        (prometheus.scalar("up{job=\"poolscope\"}") == Some(1.0)).then_some(())
    });
    assert!(
        up.is_some(),
        "Prometheus never scraped the agent at {}:\n{}",
        agent.addr,
        prometheus.log()
    );

    let mut work = Workload::run(&pg);
    let (a, b) = (work.selects.pid, work.idle_in_tx.pid);
    let report = wait_for_idle_in_tx_report(&agent, b);

    // (a) the operation histogram's count for the test's port.
    let port = pg.port;
    let promql =
        format!("sum(db_client_operation_duration_seconds_count{{server_port=\"{port}\"}})");
    agree("round trips to the port", || {
        let metrics = agent.metrics();
        let exposed = exposition_round_trips(&metrics, port);
        let scraped = prometheus.scalar(&promql);
        if exposed == Workload::round_trips() && scraped == Some(exposed as f64) {
            Ok(())
        } else {
            Err(format!(
                "/metrics {exposed}, Prometheus {scraped:?}, sent {}",
                Workload::round_trips()
            ))
        }
    });
    let selects = prometheus.scalar(&format!(
        "sum(db_client_operation_duration_seconds_count{{server_port=\"{port}\",db_operation_name=\"SELECT\"}})"
    ));
    assert_eq!(selects, Some(Workload::select_count() as f64));

    // (b) the inferred pools of both clients: A idle, B used (a transaction
    // is open).
    let check_pools = |expect_b_used: u64| {
        let pools_a = pools_of(&agent, a);
        let pools_b = pools_of(&agent, b);
        let name = format!("127.0.0.1:{port}/postgres");
        let shapes = |pools: &[PoolView]| -> Vec<(String, bool, u64, u64)> {
            pools
                .iter()
                .map(|p| (p.name.clone(), p.from_adapter, p.used, p.idle))
                .collect()
        };
        let want_a = vec![(name.clone(), false, 0, 1)];
        let want_b = vec![(name.clone(), false, expect_b_used, 1 - expect_b_used)];
        if shapes(&pools_a) != want_a || shapes(&pools_b) != want_b {
            return Err(format!(
                "API pools: A {:?} (want {want_a:?}), B {:?} (want {want_b:?})",
                shapes(&pools_a),
                shapes(&pools_b)
            ));
        }
        let metrics = agent.metrics();
        for (pid, pools) in [(a, &pools_a), (b, &pools_b)] {
            let api = api_pool_counts(pools);
            let scraped = pool_counts(&prometheus.query(&format!(
                "db_client_connection_count{{process_pid=\"{pid}\"}}"
            )));
            let exposed = pool_counts(
                exposition_samples(&metrics, "db_client_connection_count")
                    .iter()
                    .filter(|(l, _)| l.get("process_pid") == Some(&pid.to_string())),
            );
            if scraped != api || exposed != api {
                return Err(format!(
                    "pid {pid}: API {api:?}, Prometheus {scraped:?}, /metrics {exposed:?}"
                ));
            }
        }
        Ok(())
    };
    agree("pool connection counts", || check_pools(1));

    // (c) leak reports: open ones of B by kind, and the counter of opened
    // reports, which the API's list (open and resolved) must match.
    let check_leaks = |b_open: f64| {
        let api = leaks(&agent);
        let metrics = agent.metrics();
        let api_open_b = api
            .iter()
            .filter(|r| r.pid == b && r.status == ReportStatus::Open)
            .count() as f64;
        let scraped_open_b: f64 = prometheus
            .query(&format!("poolscope_leak_open{{process_pid=\"{b}\"}}"))
            .iter()
            .map(|(_, v)| v)
            .sum();
        let exposed_open_b: f64 = metric_samples(
            &metrics,
            &format!("poolscope_leak_open{{process_pid=\"{b}\"}}"),
        )
        .iter()
        .sum();
        let api_total = api
            .iter()
            .filter(|r| r.kind.as_str() == "idle_in_transaction")
            .count() as f64;
        let scraped_total =
            prometheus.scalar("sum(poolscope_leak_reports_total{kind=\"idle_in_transaction\"})");
        let exposed_total: f64 = metric_samples(
            &metrics,
            "poolscope_leak_reports_total{kind=\"idle_in_transaction\"}",
        )
        .iter()
        .sum();
        let agreed = api_open_b == b_open
            && scraped_open_b == b_open
            && exposed_open_b == b_open
            && api_total >= 1.0
            && scraped_total == Some(api_total)
            && exposed_total == api_total;
        if agreed {
            Ok(())
        } else {
            Err(format!(
                "open reports of pid {b}: API {api_open_b}, Prometheus {scraped_open_b}, \
                 /metrics {exposed_open_b} (want {b_open}); idle_in_transaction reports \
                 opened: API {api_total}, Prometheus {scraped_total:?}, /metrics {exposed_total}"
            ))
        }
    };
    agree("leak reports", || check_leaks(1.0));
    let kinds = prometheus.query(&format!("poolscope_leak_open{{process_pid=\"{b}\"}}"));
    assert_eq!(kinds.len(), 1, "{kinds:?}");
    assert_eq!(
        kinds[0].0.get("kind").map(String::as_str),
        Some("idle_in_transaction"),
        "{kinds:?}"
    );
    assert_eq!(report.pid, b);

    // B commits: its report resolves, its pool's connection becomes idle,
    // and the open-report series goes away in Prometheus too.
    work.idle_in_tx.sql("COMMIT");
    agree("pool connection counts after COMMIT", || check_pools(0));
    agree("leak reports after COMMIT", || check_leaks(0.0));
    let resolved = leaks(&agent)
        .into_iter()
        .find(|r| r.id == report.id)
        .expect("the report is kept once resolved");
    assert_eq!(resolved.status, ReportStatus::Resolved, "{resolved:#?}");
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

#[test]
fn promtool_accepts_the_exposition_with_one_remark_at_most() {
    if !require_kernel() || !require_tool(PROMTOOL) {
        return;
    }
    let pg = Postgres::start();
    let adapter_dir = TempDir::new("poolscope-export-adapter");
    let agent = start_agent(&leak_config(""), &adapter_dir);
    let mut work = Workload::run(&pg);
    // An error, a closed connection and a leak report, so that every kind
    // of series (error labels, lifetimes, leak gauges) is in the text.
    let outcome = work.selects.try_sql("SELECT FROM WHERE");
    assert_eq!(outcome.error.map(|e| e.code).as_deref(), Some("42601"));
    work.selects.request(json!({"op": "close"}));
    wait_for_idle_in_tx_report(&agent, work.idle_in_tx.pid);
    let metrics =
        agent.wait_for_metric("poolscope_connection_lifetime_seconds_count", |v| v >= 1.0);
    assert!(metrics >= 1.0);
    let text = agent.metrics();
    for family in [
        "db_client_operation_duration_seconds_bucket",
        "db_client_connection_count",
        "poolscope_leak_open",
        "poolscope_leak_reports_total",
        "poolscope_connects_total",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }

    let dir = TempDir::new("poolscope-promtool");
    let path = dir.path().join("metrics.txt");
    fs::write(&path, &text).expect("cannot write the exposition");
    let output = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(File::open(&path).expect("reopen"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PROMTOOL}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The one remark allowed: the conventions' `db.client.connection.count`
    // keeps the name every OTLP -> Prometheus path gives it (docs/metrics.md,
    // "One naming on both paths"); promtool's linter would rather a gauge
    // did not end in `_count`.
    const ALLOWED: &str = "db_client_connection_count non-histogram and non-summary metrics \
                           should not have \"_count\" suffix";
    let remarks: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .filter(|line| !line.is_empty() && *line != ALLOWED)
        .collect();
    let only_the_allowed_lint = output.status.code() == Some(3) && stderr.contains(ALLOWED);
    assert!(
        (output.status.success() || only_the_allowed_lint) && remarks.is_empty(),
        "promtool check metrics: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
}

// ---------------------------------------------------------------------------
// OTLP
// ---------------------------------------------------------------------------

/// One row of docs/metrics.md's table.
#[derive(Debug, Clone)]
struct DocMetric {
    otel: String,
    prometheus: String,
    kind: String,
    unit: String,
    attributes: BTreeSet<String>,
}

/// Words between backticks.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn documented_metrics() -> Vec<DocMetric> {
    let doc = include_str!("../../docs/metrics.md");
    let metrics: Vec<DocMetric> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // "", otel, prometheus, type, unit, resource, attributes, meaning, ""
            if cells.len() < 9 {
                return None;
            }
            let otel = backticked(cells[1]).into_iter().next()?;
            let prometheus = backticked(cells[2]).into_iter().next()?;
            let unit = match backticked(cells[4]).into_iter().next() {
                Some(unit) => unit,
                None => cells[4].to_string(),
            };
            Some(DocMetric {
                otel,
                prometheus,
                kind: cells[3].to_string(),
                unit,
                attributes: backticked(cells[6]).into_iter().collect(),
            })
        })
        .collect();
    assert!(
        metrics.len() >= 20,
        "docs/metrics.md's table has {} rows: {metrics:#?}",
        metrics.len()
    );
    metrics
}

/// Prometheus families with at least one sample in the exposition.
fn exposed_families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| metrics.contains(&format!("# TYPE {base} histogram")))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

/// Metrics the workload always produces, in both exports.
const EXPECTED_METRICS: &[&str] = &[
    "db.client.operation.duration",
    "db.client.connection.count",
    "poolscope.connects",
    "poolscope.connect.duration",
    "poolscope.connection.open",
    "poolscope.leak.reports",
    "poolscope.leak.open",
    "poolscope.kernel.events",
    "poolscope.kernel.ringbuf.size",
    "poolscope.export.batches",
    "poolscope.export.dropped",
    "poolscope.export.queued",
];

/// The requests of one OTLP export (the agent's two meter providers push
/// side by side, once per 1 s interval).
const EXPORT_WINDOW: Duration = Duration::from_millis(900);

/// What the adapter pool and the hung-up connection add.
const POOL_METRICS: &[&str] = &[
    "poolscope.adapter.messages",
    "poolscope.connection.close_wait",
    "db.client.connection.max",
    "db.client.connection.idle.max",
    "db.client.connection.idle.min",
    "db.client.connection.pending_requests",
    "db.client.connection.timeouts",
    "db.client.connection.wait_time",
    "db.client.connection.use_time",
    "db.client.connection.create_time",
];

/// Names, types, units and attribute keys of what the receiver got, checked
/// against docs/metrics.md, and the set of names against the exposition's.
fn check_metric_catalogue(receiver: &OtlpReceiver, agent: &Agent, expected: &[&str]) {
    let docs = documented_metrics();
    let by_otel: BTreeMap<&str, &DocMetric> = docs.iter().map(|d| (d.otel.as_str(), d)).collect();
    agree(
        "OTLP metric names against /metrics and docs/metrics.md",
        || {
            let Some(snapshot) = receiver.latest_export(EXPORT_WINDOW) else {
                return Err(format!("no metrics yet; {}", receiver.summary()));
            };
            let exposed = exposed_families(&agent.metrics());
            let pushed: BTreeSet<&str> = snapshot.points.iter().map(|p| p.name.as_str()).collect();
            let undocumented: Vec<&&str> = pushed
                .iter()
                .filter(|n| !by_otel.contains_key(**n))
                .collect();
            let missing: Vec<&&str> = expected.iter().filter(|n| !pushed.contains(**n)).collect();
            let differ: Vec<String> = docs
                .iter()
                .filter(|d| pushed.contains(d.otel.as_str()) != exposed.contains(&d.prometheus))
                .map(|d| {
                    format!(
                        "{} (OTLP {}, /metrics {} {})",
                        d.otel,
                        pushed.contains(d.otel.as_str()),
                        d.prometheus,
                        exposed.contains(&d.prometheus)
                    )
                })
                .collect();
            if undocumented.is_empty() && missing.is_empty() && differ.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "undocumented {undocumented:?}, expected but missing {missing:?}, \
                 present in one export only {differ:?}"
                ))
            }
        },
    );

    let snapshot = receiver.latest_export(EXPORT_WINDOW).expect("metrics");
    for point in &snapshot.points {
        let doc = by_otel[point.name.as_str()];
        assert_eq!(point.unit, doc.unit, "unit of {}: {point:?}", point.name);
        let kind_ok = match doc.kind.as_str() {
            "counter" => point.kind == MetricKind::Sum { monotonic: true },
            "histogram" => point.kind == MetricKind::Histogram,
            "gauge" => matches!(
                point.kind,
                MetricKind::Gauge | MetricKind::Sum { monotonic: false }
            ),
            other => panic!("unknown type {other:?} in docs/metrics.md for {}", doc.otel),
        };
        assert!(
            kind_ok,
            "{} is a {} in the docs: {point:?}",
            doc.otel, doc.kind
        );
        if matches!(point.kind, MetricKind::Sum { .. } | MetricKind::Histogram) {
            assert_eq!(point.temporality, 2, "cumulative: {point:?}");
        }
        let undocumented: Vec<&String> = point
            .attributes
            .keys()
            .filter(|k| !doc.attributes.contains(*k))
            .collect();
        assert!(
            undocumented.is_empty(),
            "{}: attributes {undocumented:?} are not in docs/metrics.md ({:?}): {point:?}",
            doc.otel,
            doc.attributes
        );
    }
}

fn check_resource(resource: &BTreeMap<String, Value>, what: &str) {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    assert_eq!(
        resource.get("service.name"),
        Some(&json!("poolscope")),
        "{what}: {resource:?}"
    );
    assert_eq!(
        resource.get("host.name"),
        Some(&json!(host)),
        "{what}: {resource:?}"
    );
    assert!(
        resource
            .get("service.version")
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty()),
        "{what}: {resource:?}"
    );
}

/// The fields that name a report, in the API and in its log record.
const REPORT_FIELDS: [&str; 5] = ["id", "kind", "status", "pid", "process"];

/// A log record attribute as the receiver shows it (JSON).
fn any_value_json(value: &opentelemetry::logs::AnyValue) -> Value {
    use opentelemetry::logs::AnyValue;
    match value {
        AnyValue::Int(i) => json!(i),
        AnyValue::Double(f) => json!(f),
        AnyValue::Boolean(b) => json!(b),
        AnyValue::String(s) => json!(s.as_str()),
        other => panic!("no report field becomes {other:?}"),
    }
}

/// Step: the log record carries `REPORT_FIELDS` and `fields` of the API's
/// report `report`, each under the keys the agent names it by (the
/// semantic conventions' names, `poolscope.<field>` otherwise), with the
/// API's values.
fn expect_record_as_api(record: &LogRecordView, report: &impl serde::Serialize, fields: &[&str]) {
    let expected: BTreeMap<String, Value> =
        poolscope::telemetry::records::record_attributes(report)
            .iter()
            .map(|(key, value)| (key.clone(), any_value_json(value)))
            .collect();
    for field in REPORT_FIELDS.iter().chain(fields) {
        for key in telemetry_catalogue::record_keys(field) {
            let port = telemetry_catalogue::port_key(&key);
            for key in std::iter::once(key.as_ref()).chain(port) {
                assert_eq!(
                    record.attributes.get(key),
                    expected.get(key),
                    "attribute {key} (the API's {field}) of {record:#?}\nexpected: {expected:#?}"
                );
            }
        }
    }
    assert!(
        !record.attributes.contains_key("pid") && !record.attributes.contains_key("db_system"),
        "API field names in a record: {record:#?}"
    );
}

/// The `poolscope.leak.opened` record of `report`, checked field by field
/// against the API's report.
fn check_leak_record(receiver: &OtlpReceiver, report: &LeakReport) -> LogRecordView {
    let record = receiver.wait_for(EXPORT_TIMEOUT, "the leak.opened log record", |r| {
        r.events("poolscope.leak.opened").into_iter().find(|e| {
            e.attributes.get("poolscope.id") == Some(&json!(report.id))
                && e.attributes.get("process.pid") == Some(&json!(report.pid))
        })
    });
    // Fields fixed when the report opened; held_for_seconds and the like
    // may move on in the API.
    let fields = [
        "cmdline",
        "db_system",
        "server",
        "local_address",
        "fd",
        "generation",
        "last_query",
        "tx_state",
        "evidence",
        "reported_at",
        "connection_opened_at",
    ];
    expect_record_as_api(&record, report, &fields);
    assert_eq!(
        record.attributes.get("poolscope.kind"),
        Some(&json!("idle_in_transaction"))
    );
    assert_eq!(
        record.attributes.get("poolscope.status"),
        Some(&json!("open"))
    );
    assert_eq!(record.body, json!(report.evidence), "{record:#?}");
    assert!(!report.evidence.is_empty(), "{report:#?}");
    assert_eq!(record.severity_text, "WARN", "{record:#?}");
    assert_eq!(
        record.severity_number, 13,
        "SEVERITY_NUMBER_WARN: {record:#?}"
    );
    assert!(record.time_unix_nano > 0, "{record:#?}");
    // A report's record goes out under its application's resource.
    check_application_resource(&record.resource, report.pid, &report.process);
    record
}

/// An application's resource: its pid and executable from the kernel, a
/// service named after the executable (the test clients set no
/// OTEL_SERVICE_NAME), this host.
fn check_application_resource(resource: &BTreeMap<String, Value>, pid: u32, executable: &str) {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    for (key, want) in [
        ("process.pid", json!(pid)),
        ("process.executable.name", json!(executable)),
        ("service.name", json!(executable)),
        ("service.instance.id", json!(format!("{host}:{pid}"))),
        ("host.name", json!(host)),
    ] {
        assert_eq!(resource.get(key), Some(&want), "{key}: {resource:?}");
    }
}

/// The per-application metrics of `pid` come under its own resource, with
/// no process attributes on their data points; the agent's own under the
/// agent's.
fn check_application_metrics(receiver: &OtlpReceiver, pid: u32) {
    let snapshot = receiver
        .latest_export(Duration::from_secs(5))
        .expect("metrics");
    let mine: Vec<&MetricPoint> = snapshot
        .points
        .iter()
        .filter(|p| p.resource.get("process.pid") == Some(&json!(pid)))
        .collect();
    assert!(
        !mine.is_empty(),
        "no metrics under process {pid}'s resource"
    );
    for p in &mine {
        let declared = telemetry_catalogue::INSTRUMENTS
            .iter()
            .find(|i| i.name == p.name)
            .unwrap_or_else(|| panic!("undeclared {}", p.name));
        assert!(
            declared.per_application,
            "{} under an application: {p:?}",
            p.name
        );
        assert!(!p.attributes.contains_key("process.pid"), "{p:?}");
    }
    let agents: Vec<&MetricPoint> = snapshot
        .points
        .iter()
        .filter(|p| p.name == "poolscope.kernel.events")
        .collect();
    assert!(!agents.is_empty());
    for p in agents {
        assert_eq!(
            p.resource.get("service.name"),
            Some(&json!("poolscope")),
            "{p:?}"
        );
        assert!(!p.resource.contains_key("process.pid"), "{p:?}");
    }
}

/// Waits until the receiver's latest SELECT count for `port` equals the
/// exposition's and the number sent.
fn check_select_counts(receiver: &OtlpReceiver, agent: &Agent, port: u16) {
    let filter = [
        ("server.port", json!(port)),
        ("db.operation.name", json!("SELECT")),
    ];
    agree("SELECT count over OTLP and /metrics", || {
        let exposed = exposition_selects(&agent.metrics(), port);
        let pushed = receiver.metric_value("db.client.operation.duration", &filter);
        if exposed == Workload::select_count() && pushed == Some(exposed as f64) {
            Ok(())
        } else {
            Err(format!(
                "/metrics {exposed}, OTLP {pushed:?}, sent {}; {}",
                Workload::select_count(),
                receiver.summary()
            ))
        }
    });
    let snapshot = receiver
        .latest_with("db.client.operation.duration")
        .expect("histogram");
    let points: Vec<&MetricPoint> = snapshot.points("db.client.operation.duration", &filter);
    // One SELECT series per client process, each under its own resource.
    let pids: BTreeSet<Option<i64>> = points
        .iter()
        .map(|p| p.resource.get("process.pid").and_then(Value::as_i64))
        .collect();
    assert!(
        pids.len() == points.len() && !pids.contains(&None),
        "one SELECT series per process: {points:#?}"
    );
    for p in &points {
        for (key, want) in [
            ("db.system.name", json!("postgresql")),
            ("server.address", json!("127.0.0.1")),
            ("db.namespace", json!("postgres")),
        ] {
            assert_eq!(p.attributes.get(key), Some(&want), "{key}: {p:?}");
        }
        assert!(!p.attributes.contains_key("error.type"), "{p:?}");
        assert_eq!(
            p.bounds,
            vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0],
            "{p:?}"
        );
    }
    assert_eq!(
        points
            .iter()
            .map(|p| p.bucket_counts.iter().sum::<u64>())
            .sum::<u64>(),
        Workload::select_count(),
        "{points:?}"
    );
    let connects = receiver
        .metric_value(
            "poolscope.connects",
            &[("result", json!("ok")), ("network.transport", json!("tcp"))],
        )
        .unwrap_or(0.0);
    assert!(connects >= 2.0, "the two clients' connects: {connects}");
}

/// One series of the adapter pool: the OTel metric and extra attribute,
/// the Prometheus family and extra label, and its value.
struct PoolSeries {
    otel: &'static str,
    extra: Option<(&'static str, &'static str)>,
    prom: &'static str,
    label: &'static str,
    want: f64,
}

/// The adapter pool as the API shows it, and its series in both exports.
fn check_adapter_pool(receiver: &OtlpReceiver, agent: &Agent, pid: u32) {
    let shape = |p: &PoolView| {
        (
            p.from_adapter,
            p.used,
            p.idle,
            p.max,
            p.min_idle,
            p.idle_max,
            p.pending,
            p.timeouts,
        )
    };
    let want = (true, 0, 1, Some(5), Some(1), Some(5), 0, 1);
    let view = wait_until(EXPORT_TIMEOUT, || {
        agent.pool(pid, ADAPTER_POOL).filter(|p| shape(p) == want)
    });
    assert!(
        view.is_some(),
        "pool {ADAPTER_POOL} of pid {pid} never looked like {want:?}: {:#?}\n--- agent log ---\n{}",
        agent.pools(),
        agent.log()
    );
    let series = [
        PoolSeries {
            otel: "db.client.connection.count",
            extra: Some(("db.client.connection.state", "used")),
            prom: "db_client_connection_count",
            label: ",db_client_connection_state=\"used\"",
            want: 0.0,
        },
        PoolSeries {
            otel: "db.client.connection.count",
            extra: Some(("db.client.connection.state", "idle")),
            prom: "db_client_connection_count",
            label: ",db_client_connection_state=\"idle\"",
            want: 1.0,
        },
        PoolSeries {
            otel: "db.client.connection.max",
            extra: None,
            prom: "db_client_connection_max",
            label: "",
            want: 5.0,
        },
        PoolSeries {
            otel: "db.client.connection.idle.max",
            extra: None,
            prom: "db_client_connection_idle_max",
            label: "",
            want: 5.0,
        },
        PoolSeries {
            otel: "db.client.connection.idle.min",
            extra: None,
            prom: "db_client_connection_idle_min",
            label: "",
            want: 1.0,
        },
        PoolSeries {
            otel: "db.client.connection.pending_requests",
            extra: None,
            prom: "db_client_connection_pending_requests",
            label: "",
            want: 0.0,
        },
        PoolSeries {
            otel: "db.client.connection.timeouts",
            extra: None,
            prom: "db_client_connection_timeouts_total",
            label: "",
            want: 1.0,
        },
        PoolSeries {
            otel: "db.client.connection.wait_time",
            extra: None,
            prom: "db_client_connection_wait_time_seconds_count",
            label: "",
            want: 2.0,
        },
        PoolSeries {
            otel: "db.client.connection.wait_time",
            extra: Some(("error.type", "timeout")),
            prom: "db_client_connection_wait_time_seconds_count",
            label: ",error_type=\"timeout\"",
            want: 1.0,
        },
        PoolSeries {
            otel: "db.client.connection.use_time",
            extra: None,
            prom: "db_client_connection_use_time_seconds_count",
            label: "",
            want: 1.0,
        },
        PoolSeries {
            otel: "db.client.connection.create_time",
            extra: None,
            prom: "db_client_connection_create_time_seconds_count",
            label: "",
            want: 1.0,
        },
    ];
    agree("the adapter pool over OTLP and /metrics", || {
        let metrics = agent.metrics();
        let mut wrong = Vec::new();
        for PoolSeries {
            otel,
            extra,
            prom,
            label,
            want,
        } in &series
        {
            let mut filter = vec![
                ("db.client.connection.pool.name", json!(ADAPTER_POOL)),
                ("process.pid", json!(pid)),
            ];
            if let Some((k, v)) = extra {
                filter.push((k, json!(v)));
            }
            let pushed = receiver.metric_value(otel, &filter);
            let selector = format!(
                "{prom}{{db_client_connection_pool_name=\"{ADAPTER_POOL}\",process_pid=\"{pid}\"{label}}}"
            );
            let exposed = metric_samples(&metrics, &selector);
            let exposed_sum: f64 = exposed.iter().sum();
            if pushed != Some(*want) || exposed.is_empty() || exposed_sum != *want {
                wrong.push(format!(
                    "{otel} {extra:?}: OTLP {pushed:?}, {selector} {exposed:?}, want {want}"
                ));
            }
        }
        wrong.is_empty().then_some(()).ok_or(wrong.join("; "))
    });
}

/// The slow acquire (1.5 s) as a `poolscope.acquire.slow` record that says
/// what the API's report says.
fn check_slow_acquire_record(receiver: &OtlpReceiver, agent: &Agent, pid: u32) {
    let record = receiver.wait_for(EXPORT_TIMEOUT, "the poolscope.acquire.slow record", |r| {
        r.events("poolscope.acquire.slow")
            .into_iter()
            .find(|e| e.attributes.get("process.pid") == Some(&json!(pid)))
    });
    let records = receiver
        .events("poolscope.acquire.slow")
        .into_iter()
        .filter(|e| e.attributes.get("process.pid") == Some(&json!(pid)))
        .count();
    assert_eq!(records, 1, "one slow acquire (the other took 0.2 s)");
    let report = leaks(agent)
        .into_iter()
        .find(|r| r.pid == pid && r.kind.as_str() == "slow_acquire")
        .unwrap_or_else(|| panic!("no slow_acquire report for pid {pid}: {:#?}", leaks(agent)));
    let fields = [
        "pool",
        "evidence",
        "reported_at",
        "resolved_at",
        "resolution",
        "wait_seconds",
        "pool_used",
        "pool_max",
        "pool_pending",
    ];
    expect_record_as_api(&record, &report, &fields);
    assert_eq!(
        record.attributes.get("db.client.connection.pool.name"),
        Some(&json!(ADAPTER_POOL))
    );
    assert_eq!(
        record.attributes.get("poolscope.resolution"),
        Some(&json!("got a connection"))
    );
    assert_eq!(record.attributes.get("poolscope.pool_max"), Some(&json!(5)));
    let waited = report.wait_seconds.unwrap_or_default();
    assert!(
        (1.5..3.0).contains(&waited),
        "waited {waited} s: {report:#?}"
    );
    assert_eq!(record.body, json!(report.evidence), "{record:#?}");
    assert_eq!(record.severity_text, "WARN", "{record:#?}");
}

fn otlp_config(endpoint: &str, protocol: &str, extra: &str) -> String {
    leak_config(&format!(
        "[otlp]\nendpoint = {endpoint:?}\nprotocol = {protocol:?}\ninterval_seconds = 1.0\n\
         timeout_seconds = 2.0\n\n{extra}"
    ))
}

/// Step: where the kernel lets an agent run, a PostgreSQL, an OTLP receiver,
/// and an agent (its adapter socket in the returned dir) exporting to the
/// receiver over `transport`, with `extra` at the end of its configuration
/// (whole tables, after `[otlp]`); `None` elsewhere, and the test ends
/// there.
fn otlp_agent(
    transport: Transport,
    extra: &str,
) -> Option<(Postgres, OtlpReceiver, TempDir, Agent)> {
    if !require_kernel() {
        return None;
    }
    let pg = Postgres::start();
    let receiver = OtlpReceiver::start();
    let adapter_dir = TempDir::new("poolscope-export-adapter");
    let config = match transport {
        Transport::Grpc => otlp_config(&receiver.grpc_endpoint(), "grpc", extra),
        Transport::Http => otlp_config(&receiver.http_endpoint(), "http/protobuf", extra),
    };
    let agent = start_agent(&config, &adapter_dir);
    Some((pg, receiver, adapter_dir, agent))
}

/// A JSON attribute value as Prometheus writes it in a label.
fn label_value(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The /metrics series an OTLP point becomes by the documented translation
/// (telemetry_catalogue::prometheus_metric_name and prometheus_label_name),
/// with the resource attributes the catalogue labels promoted: its name and
/// labels.
fn translated(point: &MetricPoint) -> (String, BTreeMap<String, String>) {
    let declared = telemetry_catalogue::INSTRUMENTS
        .iter()
        .find(|i| i.name == point.name)
        .unwrap_or_else(|| panic!("undeclared {}", point.name));
    let mut name =
        telemetry_catalogue::prometheus_metric_name(&point.name, &point.unit, declared.kind);
    if declared.kind == telemetry_catalogue::Kind::Histogram {
        name.push_str("_count");
    }
    let promoted = telemetry_catalogue::RESOURCE_ATTRIBUTES
        .iter()
        .filter(|r| r.label)
        .filter_map(|r| Some((r.attribute.key, point.resource.get(r.attribute.key)?)));
    let labels = point
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .chain(promoted)
        .map(|(k, v)| {
            (
                telemetry_catalogue::prometheus_label_name(k),
                label_value(v),
            )
        })
        .collect();
    (name, labels)
}

/// SQLSTATE of `SELECT 1/0` on PostgreSQL.
const PG_DIVISION_BY_ZERO: &str = "22012";
/// MySQL/MariaDB error number of a statement on a table that does not exist
/// (ER_NO_SUCH_TABLE).
const MYSQL_NO_SUCH_TABLE: &str = "1146";

/// Step: the one failed SELECT of `pid` (a `system` server answered with
/// error `code`) is one `db.client.operation.duration` point over OTLP
/// whose `db.response.status_code` is the code and whose `error.type` is
/// the same code (the conventions: the status code when the system has
/// one), and one series on /metrics with both labels.
fn check_server_error(receiver: &OtlpReceiver, agent: &Agent, pid: u32, system: &str, code: &str) {
    let filter = [
        ("process.pid", json!(pid)),
        ("db.response.status_code", json!(code)),
    ];
    agree(
        &format!("the {system} error {code} over OTLP and /metrics"),
        || {
            let pushed = receiver.metric_value("db.client.operation.duration", &filter);
            let exposed: f64 = metric_series(
                &agent.metrics(),
                "db_client_operation_duration_seconds_count",
            )
            .into_iter()
            .filter(|(labels, _)| {
                let has = |k: &str, v: &str| labels.contains(&(k.to_string(), v.to_string()));
                has("process_pid", &pid.to_string())
                    && has("db_response_status_code", code)
                    && has("error_type", code)
                    && has("db_operation_name", "SELECT")
                    && has("db_system_name", system)
            })
            .map(|(_, v)| v)
            .sum();
            (pushed == Some(1.0) && exposed == 1.0)
                .then_some(())
                .ok_or(format!(
                    "OTLP {pushed:?}, /metrics {exposed}; {}",
                    receiver.summary()
                ))
        },
    );
    let snapshot = receiver
        .latest_with("db.client.operation.duration")
        .expect("histogram");
    let points = snapshot.points("db.client.operation.duration", &filter);
    assert_eq!(points.len(), 1, "{points:#?}");
    for (key, want) in [
        ("error.type", json!(code)),
        ("db.system.name", json!(system)),
        ("db.operation.name", json!("SELECT")),
        ("server.address", json!("127.0.0.1")),
    ] {
        assert_eq!(
            points[0].attributes.get(key),
            Some(&want),
            "{key}: {:?}",
            points[0]
        );
    }
    // Every other round trip of the process succeeded: no error attributes.
    let ok: Vec<&MetricPoint> = snapshot
        .points(
            "db.client.operation.duration",
            &[("process.pid", json!(pid))],
        )
        .into_iter()
        .filter(|p| !p.attributes.contains_key("db.response.status_code"))
        .collect();
    assert!(!ok.is_empty(), "no successful round trip of {pid}");
    for p in ok {
        assert!(!p.attributes.contains_key("error.type"), "{p:?}");
    }
}

/// Issue 15, items 1 and 3: a process that names itself (OTEL_SERVICE_NAME,
/// OTEL_RESOURCE_ATTRIBUTES) is that service, one that does not is its
/// executable, and neither can claim another's pid; and every series of
/// theirs has on /metrics exactly the name and labels the documented OTLP
/// -> Prometheus translation gives the pushed point, with the labelled
/// resource attributes promoted (what Prometheus's
/// `promote_resource_attributes` does), so dashboards work on both paths.
///
/// Issue 15, the kernel-level half of two unit-tested rules: without
/// `[tracking] resource_command_args` an application's resource has no
/// `process.command_args`; and a real server error (PostgreSQL's SQLSTATE
/// 22012, MariaDB's error 1146) puts `db.response.status_code` and
/// `error.type` (the same code, as the conventions advise for systems that
/// have one) on the `db.client.operation.duration` point, on both paths.
#[test]
fn each_application_is_its_own_service_and_one_series_on_both_paths() {
    if !require_kernel() {
        return;
    }
    // MariaDB's bootstrap takes seconds: beside PostgreSQL's, not after.
    let mariadb = thread::spawn(MariaDb::start);
    let pg = Postgres::start();
    let mariadb = mariadb.join().expect("MariaDB started");
    let receiver = OtlpReceiver::start();
    let adapter_dir = TempDir::new("poolscope-export-adapter");
    let config = otlp_config(&receiver.grpc_endpoint(), "grpc", "query_spans = true\n");
    let agent = start_agent(&config, &adapter_dir);
    let mut named = DbClient::spawn_with_env(&[
        ("OTEL_SERVICE_NAME", "orders-api"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.version=1.4.2,k8s.deployment.name=orders,process.pid=1",
        ),
    ]);
    let mut plain = DbClient::spawn();
    for client in [&mut named, &mut plain] {
        client.connect("postgresql", pg.port);
        for _ in 0..3 {
            client.sql("SELECT 1");
        }
    }
    // Server errors: a division by zero on PostgreSQL, a missing table on
    // MariaDB.
    let outcome = plain.try_sql("SELECT 1/0");
    assert_eq!(
        outcome.error.map(|e| e.code).as_deref(),
        Some(PG_DIVISION_BY_ZERO)
    );
    let mut mysql = DbClient::spawn();
    mysql.connect("mysql", mariadb.port);
    mysql.sql("SELECT 1");
    let outcome = mysql.try_sql("SELECT * FROM no_such_table");
    assert_eq!(
        outcome.error.map(|e| e.code).as_deref(),
        Some(MYSQL_NO_SUCH_TABLE)
    );
    let resource_of = |pid: u32| {
        wait_until(EXPORT_TIMEOUT, || {
            receiver
                .metric_resources()
                .into_iter()
                .find(|r| r.get("process.pid") == Some(&json!(pid)))
        })
        .unwrap_or_else(|| panic!("no resource of process {pid}: {}", receiver.summary()))
    };
    let mine = resource_of(named.pid);
    for (key, want) in [
        ("service.name", json!("orders-api")),
        ("service.version", json!("1.4.2")),
        ("k8s.deployment.name", json!("orders")),
        ("process.pid", json!(named.pid)),
        ("process.executable.name", json!("python3")),
    ] {
        assert_eq!(mine.get(key), Some(&want), "{key}: {mine:?}");
    }
    let theirs = resource_of(plain.pid);
    assert_eq!(
        theirs.get("service.name"),
        Some(&json!("python3")),
        "{theirs:?}"
    );
    assert!(!theirs.contains_key("service.version"), "{theirs:?}");
    // resource_command_args is off: no arguments (they may hold secrets).
    for resource in [&mine, &theirs] {
        assert!(
            !resource.contains_key("process.command_args"),
            "{resource:?}"
        );
    }

    // Both paths hold the three SELECTs of each; then every pushed series
    // of the two is a /metrics series by the translation rules.
    let selects = |pid: u32| {
        receiver.metric_value(
            "db.client.operation.duration",
            &[
                ("process.pid", json!(pid)),
                ("db.operation.name", json!("SELECT")),
            ],
        )
    };
    agree("both clients' SELECTs over OTLP", || {
        match (selects(named.pid), selects(plain.pid)) {
            (Some(a), Some(b)) if a >= 3.0 && b >= 3.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    check_server_error(
        &receiver,
        &agent,
        plain.pid,
        "postgresql",
        PG_DIVISION_BY_ZERO,
    );
    check_server_error(&receiver, &agent, mysql.pid, "mysql", MYSQL_NO_SUCH_TABLE);
    let snapshot = receiver
        .latest_export(Duration::from_secs(5))
        .expect("metrics");
    let exposition = agent.metrics();
    let mut checked = 0;
    for point in snapshot.points.iter().filter(|p| {
        [named.pid, plain.pid, mysql.pid]
            .iter()
            .any(|pid| p.resource.get("process.pid") == Some(&json!(pid)))
    }) {
        let (name, labels) = translated(point);
        let series: Vec<BTreeMap<String, String>> = metric_series(&exposition, &name)
            .into_iter()
            .map(|(labels, _)| labels.into_iter().collect())
            .collect();
        assert!(
            series.contains(&labels),
            "{} {labels:?} is not on /metrics as {name}; there: {series:#?}",
            point.name
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} series compared");
    let line = metric_series(&exposition, "db_client_operation_duration_seconds_count")
        .into_iter()
        .find(|(labels, _)| labels.contains(&("process_pid".into(), named.pid.to_string())))
        .expect("the named client's SELECTs");
    assert!(
        line.0
            .contains(&("service_name".into(), "orders-api".into())),
        "{line:?}"
    );
    // The round trips' spans come under their application's resource too.
    let span = wait_until(EXPORT_TIMEOUT, || {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.attributes.get("process.pid") == Some(&json!(named.pid)))
    })
    .unwrap_or_else(|| panic!("no span of the named client: {}", receiver.summary()));
    assert_eq!(
        span.resource.get("service.name"),
        Some(&json!("orders-api")),
        "{span:?}"
    );
    assert_eq!(
        span.resource.get("process.pid"),
        Some(&json!(named.pid)),
        "{span:?}"
    );
}

/// Issue 14, item 1: a leak's holder stack reaches the collector as the
/// semantic conventions' `code.stacktrace` (one string, a frame per line,
/// innermost first) in its `poolscope.leak.opened` record: a real
/// psycopg_pool pool through the Python adapter leaks a connection.
#[test]
fn otlp_leak_records_carry_the_holders_stack_as_code_stacktrace() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let receiver = OtlpReceiver::start();
    let adapter_dir = TempDir::new("poolscope-export-adapter");
    let config = format!(
        "[leaks]\nleak_threshold_seconds = 3.0\nquiet_seconds = 1.0\n\n\
         [otlp]\nendpoint = {:?}\nprotocol = \"grpc\"\ninterval_seconds = 1.0\ntimeout_seconds = 2.0\n",
        receiver.grpc_endpoint()
    );
    let agent = start_agent(&config, &adapter_dir);
    let mut app = PoolApp::spawn(Some(&adapter_socket(&adapter_dir)));
    app.request(
        json!({"op": "psycopg_pool", "engine": "pp", "port": pg.port,
                       "min_size": 1, "max_size": 2, "adapter": true,
                       "pool_name": "export-stacks"}),
    );
    let held = app.checkout("pp", "leak");
    let report = wait_until(EXPORT_TIMEOUT, || {
        leaks(&agent).into_iter().find(|r| {
            r.pid == app.pid
                && r.kind.as_str() == "leaked"
                && r.fd == Some(held.fd)
                && r.holder_stack.is_some()
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "no leaked report with a stack for pid {}: {:#?}\n--- agent log ---\n{}",
            app.pid,
            leaks(&agent),
            agent.log()
        )
    });
    let stack = report.holder_stack.clone().unwrap_or_default();
    assert!(
        stack
            .iter()
            .any(|f| f.starts_with("take_and_keep_for_later (")),
        "{stack:#?}"
    );
    let record = receiver.wait_for(EXPORT_TIMEOUT, "the leak's log record", |r| {
        r.events("poolscope.leak.opened")
            .into_iter()
            .find(|e| e.attributes.get("poolscope.id") == Some(&json!(report.id)))
    });
    assert_eq!(
        record.attributes.get("code.stacktrace"),
        Some(&json!(stack.join("\n"))),
        "{record:#?}"
    );
    assert!(
        !record.attributes.contains_key("holder_stack"),
        "the stack goes once, by its convention name: {record:#?}"
    );
}

#[test]
fn otlp_grpc_receives_documented_metrics_events_and_equal_values() {
    let Some((pg, receiver, adapter_dir, agent)) = otlp_agent(Transport::Grpc, "") else {
        return;
    };
    let work = Workload::run(&pg);
    let b = work.idle_in_tx.pid;
    // An adapter pool (a slow acquire, a release, a timed-out acquire) and
    // a connection the server hangs up on, so that the pool and close-wait
    // metrics exist too. Neither sends a statement.
    let pool = AdapterPool::start(&adapter_socket(&adapter_dir), pg.port);
    let mut hung_up = DbClient::spawn();
    let (_, hung_up_port) = hung_up.connect("postgresql", pg.port);
    let terminated = pg.psql_unix(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE client_port = {hung_up_port}"
    ));
    assert_eq!(terminated, "t", "the server ends the session");

    // (b) the leak report as a log record.
    let report = wait_for_idle_in_tx_report(&agent, b);
    let record = check_leak_record(&receiver, &report);
    assert_eq!(record.transport, Transport::Grpc);
    assert_eq!(record.scope, "poolscope", "{record:#?}");
    check_slow_acquire_record(&receiver, &agent, pool.pid);

    // (c) equal values, and the open report as a gauge in both exports.
    check_select_counts(&receiver, &agent, pg.port);
    check_application_metrics(&receiver, b);
    agree("open leak reports of B over OTLP and /metrics", || {
        let pushed = receiver.metric_value(
            "poolscope.leak.open",
            &[
                ("process.pid", json!(b)),
                ("kind", json!("idle_in_transaction")),
            ],
        );
        let exposed = agent.metric_value(&format!(
            "poolscope_leak_open{{kind=\"idle_in_transaction\",process_pid=\"{b}\"}}"
        ));
        (pushed == Some(1.0) && exposed == 1.0)
            .then_some(())
            .ok_or(format!("OTLP {pushed:?}, /metrics {exposed}"))
    });

    check_adapter_pool(&receiver, &agent, pool.pid);
    agree(
        "the hung-up connection in close_wait over OTLP and /metrics",
        || {
            let pushed = receiver.metric_value(
                "poolscope.connection.close_wait",
                &[("process.pid", json!(hung_up.pid))],
            );
            let exposed = agent.metric_value(&format!(
                "poolscope_connection_close_wait{{process_pid=\"{}\"}}",
                hung_up.pid
            ));
            (pushed == Some(1.0) && exposed == 1.0)
                .then_some(())
                .ok_or(format!("OTLP {pushed:?}, /metrics {exposed}"))
        },
    );

    // (a) the documented catalogue and the resource.
    check_metric_catalogue(
        &receiver,
        &agent,
        &[EXPECTED_METRICS, POOL_METRICS].concat(),
    );
    check_resource(
        &receiver
            .agent_metrics_resource()
            .expect("the agent's metrics resource"),
        "metrics resource",
    );

    // Exports succeed and are counted; all of it went over gRPC.
    agree("export batches counted", || {
        let ok_metrics = receiver
            .metric_value(
                "poolscope.export.batches",
                &[("signal", json!("metrics")), ("result", json!("ok"))],
            )
            .unwrap_or(0.0);
        let ok_logs =
            agent.metric_value("poolscope_export_batches_total{signal=\"logs\",result=\"ok\"}");
        (ok_metrics >= 1.0 && ok_logs >= 1.0)
            .then_some(())
            .ok_or(format!(
                "metric batches ok over OTLP {ok_metrics}, log batches ok in /metrics {ok_logs}"
            ))
    });
    assert_eq!(
        agent.metric_value("poolscope_export_dropped_total{signal=\"logs\"}"),
        0.0
    );
    assert_eq!(receiver.requests(Signal::Metrics, Some(Transport::Http)), 0);
    assert_eq!(receiver.requests(Signal::Logs, Some(Transport::Http)), 0);
    assert_eq!(receiver.spans_total(), 0, "query_spans is off");
    assert!(receiver.rejected().is_empty(), "{:?}", receiver.rejected());
}

/// Also issue 15: with `[tracking] resource_command_args = true` an
/// application's resource carries `process.command_args`, its real
/// arguments with the secrets among them redacted (without the switch the
/// attribute is absent: checked by
/// `each_application_is_its_own_service_and_one_series_on_both_paths`).
#[test]
fn otlp_http_protobuf_receives_metrics_and_events() {
    // The adapter dir lives as long as the agent.
    let Some((pg, receiver, _adapter_dir, agent)) = otlp_agent(
        Transport::Http,
        "[tracking]\nresource_command_args = true\n",
    ) else {
        return;
    };
    // A client whose command line holds a password three ways: in a URL,
    // as key=value, and as the argument after a password flag. It only
    // connects (no round trip to count among the workload's).
    let dsn =
        |password: &str| format!("postgresql://app:{password}@127.0.0.1:{}/postgres", pg.port);
    let password_pair = format!("password={SECRET_ARGUMENT}");
    let mut secretive = DbClient::spawn_with(
        &[
            "--dsn",
            &dsn(SECRET_ARGUMENT),
            &password_pair,
            "--db-password",
            SECRET_ARGUMENT,
            "--label",
            "orders",
        ],
        &[],
    );
    secretive.connect("postgresql", pg.port);
    let work = Workload::run(&pg);
    let report = wait_for_idle_in_tx_report(&agent, work.idle_in_tx.pid);
    let record = check_leak_record(&receiver, &report);
    assert_eq!(record.transport, Transport::Http);
    check_select_counts(&receiver, &agent, pg.port);
    check_resource(
        &receiver
            .agent_metrics_resource()
            .expect("the agent's metrics resource"),
        "metrics resource",
    );
    // The leak's metrics come with the export after the report opened.
    agree("the expected metrics over HTTP", || {
        let names = receiver.metric_names();
        let missing: Vec<&&str> = EXPECTED_METRICS
            .iter()
            .filter(|n| !names.contains(**n))
            .collect();
        missing
            .is_empty()
            .then_some(())
            .ok_or(format!("missing {missing:?}, received {names:?}"))
    });
    // The client's resource: its arguments as /proc/PID/cmdline has them,
    // secrets redacted, and the secret nowhere in the resource.
    let resource = wait_until(EXPORT_TIMEOUT, || {
        receiver
            .metric_resources()
            .into_iter()
            .find(|r| r.get("process.pid") == Some(&json!(secretive.pid)))
    })
    .unwrap_or_else(|| {
        panic!(
            "no resource of process {}: {}",
            secretive.pid,
            receiver.summary()
        )
    });
    check_application_resource(&resource, secretive.pid, "python3");
    let script = script_path("db_client.py");
    let want = json!([
        python3().display().to_string(),
        "-u",
        script.display().to_string(),
        "--dsn",
        dsn("***"),
        "password=***",
        "--db-password",
        "***",
        "--label",
        "orders",
    ]);
    assert_eq!(
        resource.get("process.command_args"),
        Some(&want),
        "{resource:?}"
    );
    let shown = Value::Object(resource.clone().into_iter().collect()).to_string();
    assert!(!shown.contains(SECRET_ARGUMENT), "{shown}");
    // The workload's clients, without secrets, have theirs too.
    let idle_in_tx = receiver
        .metric_resources()
        .into_iter()
        .find(|r| r.get("process.pid") == Some(&json!(work.idle_in_tx.pid)))
        .expect("the workload client's resource");
    assert_eq!(
        idle_in_tx.get("process.command_args"),
        Some(&json!([
            python3().display().to_string(),
            "-u",
            script.display().to_string()
        ])),
        "{idle_in_tx:?}"
    );
    assert_eq!(receiver.requests(Signal::Metrics, Some(Transport::Grpc)), 0);
    assert_eq!(receiver.requests(Signal::Logs, Some(Transport::Grpc)), 0);
    assert!(receiver.rejected().is_empty(), "{:?}", receiver.rejected());
}

/// A password on a client's command line (never to be seen in any output).
const SECRET_ARGUMENT: &str = "hunter2-cmdline-secret";

// ---------------------------------------------------------------------------
// Resilience: the receiver goes away for two minutes under load
// ---------------------------------------------------------------------------

const OUTAGE: Duration = Duration::from_secs(120);
const MAX_QUEUED_EVENTS: usize = 200;
const RSS_HEADROOM_KIB: u64 = 64 * 1024;

/// `pgbench` running `SELECT 1` at a fixed rate over one connection until
/// killed (on drop).
struct Pgbench {
    child: Child,
    _dir: TempDir,
}

impl Pgbench {
    fn start(pg: &Postgres, rate: u32) -> Pgbench {
        let dir = TempDir::new("poolscope-pgbench");
        let script = dir.path().join("select1.sql");
        fs::write(&script, "SELECT 1;\n").expect("cannot write the pgbench script");
        let log = File::create(dir.path().join("pgbench.log")).expect("pgbench log");
        let child = Command::new(postgres_bin_dir().join("pgbench"))
            .args(["-n", "-c", "1", "-T", "900", "-R", &rate.to_string()])
            .arg("-f")
            .arg(&script)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "postgres",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("cannot start pgbench");
        Pgbench { child, _dir: dir }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn healthy(agent: &Agent) -> bool {
    agent.get("/healthz").is_ok_and(|b| b.trim() == "ok")
}

fn rss_kib(agent: &Agent) -> u64 {
    vm_rss_kib(agent.pid()).unwrap_or_else(|| panic!("no VmRSS for the agent {}", agent.pid()))
}

#[test]
fn otlp_outage_under_load_is_bounded_and_recovers() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let mut receiver = OtlpReceiver::start_keeping(20_000);
    let config = format!(
        "[otlp]\nendpoint = {:?}\nprotocol = \"grpc\"\ninterval_seconds = 1.0\n\
         timeout_seconds = 2.0\nmax_queued_events = {MAX_QUEUED_EVENTS}\n\n\
         [queries]\nslow_threshold_ms = 0\n",
        receiver.grpc_endpoint()
    );
    let adapter_dir = TempDir::new("poolscope-export-adapter");
    let agent = start_agent(&config, &adapter_dir);
    // Every round trip is a slow query, so a log record: a few hundred per
    // second.
    let mut load = Pgbench::start(&pg, 300);

    // Warm-up with the receiver up: events and metrics flow, none dropped.
    receiver.wait_for(EXPORT_TIMEOUT, "slow-query log records", |r| {
        (r.log_records_total() >= 2_000).then_some(())
    });
    // Other processes on the host have slow queries too: pick pgbench's.
    let pgbench_pid = load.child.id();
    let slow: Vec<LogRecordView> = receiver
        .events("poolscope.query.slow")
        .into_iter()
        .filter(|r| r.attributes.get("process.pid") == Some(&json!(pgbench_pid)))
        .collect();
    assert!(
        slow.len() >= 100,
        "{} slow-query records of pgbench",
        slow.len()
    );
    let last = slow.last().expect("a slow-query record");
    assert_eq!(last.severity_text, "INFO", "{last:#?}");
    // pgbench sends the script line as written, semicolon included.
    assert_eq!(last.body, json!("SELECT ?;"), "{last:#?}");
    for (key, want) in [
        ("db.query.text", json!("SELECT ?;")),
        ("process.executable.name", json!("pgbench")),
        ("db.system.name", json!("postgresql")),
        ("server.address", json!("127.0.0.1")),
        ("server.port", json!(pg.port)),
    ] {
        assert_eq!(last.attributes.get(key), Some(&want), "{key}: {last:#?}");
    }
    drop(slow);
    let dropped_before = agent.metric_value("poolscope_export_dropped_total{signal=\"logs\"}");
    let failed_before =
        agent.metric_value("poolscope_export_batches_total{signal=\"metrics\",result=\"failed\"}");
    let rss_start = rss_kib(&agent);
    eprintln!(
        "resilience: receiving {} log records so far; dropped {dropped_before}; agent RSS {rss_start} KiB",
        receiver.log_records_total()
    );

    // The outage.
    receiver.stop();
    let outage_start = Instant::now();
    let mut rss_max = rss_start;
    let mut queued_max = 0.0f64;
    let mut samples = 0u32;
    while outage_start.elapsed() < OUTAGE {
        thread::sleep(Duration::from_secs(1));
        assert!(
            process_alive(agent.pid()),
            "the agent died:\n{}",
            agent.log()
        );
        assert!(
            healthy(&agent),
            "/healthz failed during the outage:\n{}",
            agent.log()
        );
        assert!(load.running(), "pgbench stopped");
        let rss = rss_kib(&agent);
        rss_max = rss_max.max(rss);
        assert!(
            rss <= rss_start + RSS_HEADROOM_KIB,
            "agent RSS {rss} KiB after {:?} of outage, started at {rss_start} KiB",
            outage_start.elapsed()
        );
        let queued = agent.metric_value("poolscope_export_queued{signal=\"logs\"}");
        queued_max = queued_max.max(queued);
        samples += 1;
    }
    let dropped_during = agent.metric_value("poolscope_export_dropped_total{signal=\"logs\"}");
    let failed_during =
        agent.metric_value("poolscope_export_batches_total{signal=\"metrics\",result=\"failed\"}");
    let metric_requests_during = receiver.requests(Signal::Metrics, None);
    eprintln!(
        "resilience: outage of {:?}, {samples} samples: agent RSS start {rss_start} KiB, max {rss_max} KiB \
         (+{} KiB, bound +{RSS_HEADROOM_KIB} KiB); queued max {queued_max}; dropped {dropped_before} -> \
         {dropped_during}; failed metric batches {failed_before} -> {failed_during}",
        outage_start.elapsed(),
        rss_max - rss_start
    );
    assert!(
        dropped_during > dropped_before,
        "events were dropped while the receiver was down: {dropped_before} -> {dropped_during}"
    );
    assert!(
        failed_during > failed_before,
        "metric exports failed while the receiver was down: {failed_before} -> {failed_during}"
    );

    // Back up on the same port: metric exports resume and carry the drops.
    receiver.start_again();
    let records_before = receiver.log_records_total();
    let resumed = Instant::now();
    receiver.wait_for(EXPORT_TIMEOUT, "metric exports to resume", |r| {
        (r.requests(Signal::Metrics, None) >= metric_requests_during + 2).then_some(())
    });
    let dropped_pushed =
        receiver.wait_for(EXPORT_TIMEOUT, "poolscope.export.dropped over OTLP", |r| {
            r.metric_value("poolscope.export.dropped", &[("signal", json!("logs"))])
                .filter(|v| *v >= dropped_during)
        });
    receiver.wait_for(EXPORT_TIMEOUT, "log records to resume", |r| {
        (r.log_records_total() > records_before).then_some(())
    });
    let failed_pushed = receiver
        .metric_value(
            "poolscope.export.batches",
            &[("signal", json!("metrics")), ("result", json!("failed"))],
        )
        .unwrap_or(0.0);
    eprintln!(
        "resilience: exports resumed within {:?}; dropped over OTLP {dropped_pushed}, failed metric batches {failed_pushed}",
        resumed.elapsed()
    );
    assert!(dropped_pushed > 0.0);
    assert!(
        failed_pushed >= failed_during,
        "{failed_pushed} < {failed_during}"
    );
    let rss_end = rss_kib(&agent);
    eprintln!("resilience: agent RSS after recovery {rss_end} KiB");

    // SIGTERM under load: the agent exits within 10 s (bounded flush).
    let pid = agent.pid();
    let sent = Instant::now();
    // SAFETY: kill(2) on the agent we started; Agent's Drop reaps it.
    let rc = unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM)");
    let exited = wait_until(Duration::from_secs(10), || {
        (!process_alive(pid)).then_some(())
    });
    let took = sent.elapsed();
    eprintln!("resilience: the agent exited {took:?} after SIGTERM");
    assert!(
        exited.is_some(),
        "the agent still runs {took:?} after SIGTERM:\n{}",
        agent.log()
    );
    drop(load);

    // Checked last, so that a failure still shows everything above: the
    // gauge of events waiting never passed `max_queued_events`.
    assert!(
        queued_max <= MAX_QUEUED_EVENTS as f64,
        "poolscope_export_queued reached {queued_max} with max_queued_events = {MAX_QUEUED_EVENTS}"
    );
}
