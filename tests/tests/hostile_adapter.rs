//! The adapter socket against a hostile local user (issue 10, items 2 and
//! 6): any process may send pool events about itself, so one user's flood
//! must never cost another process its pool, its metric series or its
//! reports, nor fill the log, and fake old timestamps must not produce
//! reports older than their sender.
//!
//! The attackers run as `poolscope-fuzz`, an unprivileged system user the
//! test creates when it is missing; the legitimate process is the test
//! itself (root), sending datagrams from its own pid.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::PathBuf,
    time::Duration,
};

use poolscope::clock::monotonic_ns;
use poolscope_tests::{
    adapter_config, json, metric_sample, require_kernel, wait_until, Agent, Script, TempDir, Value,
};

/// Processes of the pool flood, and pools each tries to register (the
/// issue's figures).
const FLOOD_PROCESSES: usize = 200;
const FLOOD_POOLS: usize = 64;
/// Fake-dated acquires of the old-timestamp attack.
const OLD_ACQUIRES: usize = 5_000;

const ATTACKER: &str = r#"
import json, os, socket, sys, time

path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def sender():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    return lambda msg: s.sendto(json.dumps(msg).encode(), path)

if mode == "pools":
    # n processes, each registering as many pools as it may, each pool
    # recording one (timed-out) wait; they live until told to exit.
    pools = int(sys.argv[4])
    r, w = os.pipe()
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            send = sender()
            for i in range(pools):
                pool = f"flood-{i}"
                send({"v": 1, "kind": "acquire_start", "pool": pool, "request": 1})
                send({"v": 1, "kind": "acquire_end", "pool": pool, "request": 1, "result": "timeout"})
            os.read(r, 1)
            os._exit(0)
        children.append(pid)
    os.close(r)
    print(json.dumps({"pids": children}), flush=True)
    sys.stdin.readline()
    os.close(w)
    for pid in children:
        os.waitpid(pid, 0)
    print(json.dumps({"exited": len(children)}), flush=True)
    sys.stdin.readline()
else:
    # n acquires each claiming to have started 500 s ago, then timing out,
    # from a process half a second old (so that its waits, as the agent
    # bounds them, are still slow ones).
    time.sleep(0.5)
    send = sender()
    for i in range(n):
        send({"v": 1, "kind": "acquire_start", "pool": "fake", "request": i,
              "mono_ns": time.monotonic_ns() - 500_000_000_000})
        send({"v": 1, "kind": "acquire_end", "pool": "fake", "request": i, "result": "timeout"})
    print(json.dumps({"pid": os.getpid(), "sent": 2 * n}), flush=True)
    sys.stdin.readline()
"#;

/// The legitimate process: this test, reporting its own pools.
struct Legitimate {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Legitimate {
    fn send(&self, message: Value) {
        self.socket
            .send_to(message.to_string().as_bytes(), &self.path)
            .unwrap();
    }

    /// A wait of `waited` that timed out, reported now.
    fn slow_timeout(&self, pool: &str, request: u64, waited: Duration) {
        // Dated on CLOCK_MONOTONIC, as adapters date their messages.
        let start = monotonic_ns() - waited.as_nanos() as u64;
        self.send(json!({"v": 1, "kind": "acquire_start", "pool": pool, "request": request, "mono_ns": start}));
        self.send(json!({"v": 1, "kind": "acquire_end", "pool": pool, "request": request, "result": "timeout"}));
    }
}

/// All adapter messages the agent has judged so far.
fn messages_judged(agent: &Agent) -> f64 {
    let metrics = agent.metrics();
    metrics
        .lines()
        .filter(|l| l.starts_with("poolscope_adapter_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_for_messages(agent: &Agent, at_least: f64) {
    let judged = wait_until(Duration::from_secs(60), || {
        let n = messages_judged(agent);
        (n >= at_least).then_some(n)
    });
    assert!(
        judged.is_some(),
        "the agent judged {} of {at_least} adapter messages within 60 s\n{}",
        messages_judged(agent),
        agent.log()
    );
}

fn pools_of(agent: &Agent) -> Vec<(u32, String)> {
    let pools: Value = serde_json::from_str(&agent.get("/api/v1/pools").unwrap()).unwrap();
    pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["from_adapter"] == json!(true))
        .map(|p| {
            (
                p["pid"].as_u64().unwrap() as u32,
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn wait_time_series(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("db_client_connection_wait_time_seconds_count{"))
        .collect()
}

#[test]
fn one_users_adapter_floods_cost_no_other_process_its_pools_series_or_reports() {
    if !require_kernel() {
        return;
    }
    let dir = TempDir::new("poolscope-hostile-adapter");
    // The attackers must reach the socket: the agent makes it 0666.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("adapter.sock");
    let config = format!(
        "{}\n[log]\nlevel = \"info\"\n",
        adapter_config(&socket, &[("slow_acquire_ms", 100.0)])
    );
    let agent = Agent::start_with_config(&config, &[]);
    let me = std::process::id();
    let legit = Legitimate {
        socket: UnixDatagram::unbound().unwrap(),
        path: socket.clone(),
    };

    // The legitimate pool: registered, one slow (timed-out) acquire.
    legit.send(json!({"v": 1, "kind": "pool", "pool": "orders", "max": 5}));
    legit.slow_timeout("orders", 1, Duration::from_millis(1_500));
    wait_for_messages(&agent, 3.0);

    // 200 processes x 64 pools, each with a recorded wait.
    let mut flood = Script::unprivileged(
        ATTACKER,
        &[
            socket.display().to_string(),
            "pools".into(),
            FLOOD_PROCESSES.to_string(),
            FLOOD_POOLS.to_string(),
        ],
    );
    let flood_pids: Vec<u32> = flood.line()["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    wait_for_messages(&agent, 3.0 + (FLOOD_PROCESSES * FLOOD_POOLS * 2) as f64);

    let pools = pools_of(&agent);
    assert!(
        pools.contains(&(me, "orders".into())),
        "the legitimate pool survived the flood: {} pools listed",
        pools.len()
    );
    let flood_pools = pools.iter().filter(|(p, _)| flood_pids.contains(p)).count();
    assert!(
        flood_pools < 1024,
        "the flood holds {flood_pools} pools, under the global bound"
    );
    let metrics = agent.metrics();
    let mine = format!("process_pid=\"{me}\"");
    let orders_max =
        format!("db_client_connection_max{{db_client_connection_pool_name=\"orders\",{mine}}}");
    assert_eq!(
        metric_sample(&metrics, &orders_max),
        Some(5.0),
        "the legitimate pool keeps its gauges through the flood"
    );
    assert!(
        !metrics.contains("otel_metric_overflow"),
        "nothing folded into the SDK's overflow series:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("otel_metric_overflow"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let refused = metric_sample(
        &metrics,
        r#"poolscope_adapter_messages_total{reason="pool_limit",result="rejected"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused > 0.0, "refusals are counted");
    // A pool registered after the flood still gets in, at the flood's expense.
    legit.send(json!({"v": 1, "kind": "pool", "pool": "late", "max": 5}));
    let late = wait_until(Duration::from_secs(10), || {
        pools_of(&agent)
            .contains(&(me, "late".to_string()))
            .then_some(())
    });
    assert!(
        late.is_some(),
        "a new legitimate pool is admitted when all are taken"
    );

    // 5,000 acquires dated 500 s back, from a process a moment old.
    let judged = messages_judged(&agent);
    let mut old = Script::unprivileged(
        ATTACKER,
        &[
            socket.display().to_string(),
            "old".into(),
            OLD_ACQUIRES.to_string(),
        ],
    );
    let said = old.line();
    let old_pid = said["pid"].as_u64().unwrap() as u32;
    wait_for_messages(&agent, judged + (2 * OLD_ACQUIRES) as f64);
    let age = old.started.elapsed().as_secs_f64();
    let leaks: Value = serde_json::from_str(&agent.get("/api/v1/leaks").unwrap()).unwrap();
    let reports = leaks["reports"].as_array().unwrap();
    let of = |pid: u32| -> Vec<&Value> {
        reports
            .iter()
            .filter(|r| r["pid"] == json!(pid) && r["kind"] == json!("slow_acquire"))
            .collect()
    };
    let fakes = of(old_pid);
    assert!(
        !fakes.is_empty(),
        "the fake waits are reported as what they are"
    );
    for report in &fakes {
        let wait = report["wait_seconds"].as_f64().unwrap();
        assert!(
            wait <= age + 1.0,
            "a report no older than its sender ({age:.1} s): {report}"
        );
    }
    assert_eq!(
        of(me).len(),
        1,
        "the legitimate slow acquire stays in the report history"
    );
    // The log carries at most the per-process budget of the flood's lines.
    let log = agent.log();
    let needle = format!("\"pid\":{old_pid},");
    let lines = log
        .lines()
        .filter(|l| l.contains("poolscope::leak") && l.contains(&needle))
        .count();
    assert!(
        (1..=30).contains(&lines),
        "{lines} report lines about the flooding process in the log"
    );
    let held_back = metric_sample(
        &agent.metrics(),
        r#"poolscope_reports_unpublished_total{reason="process_budget"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        held_back >= (OLD_ACQUIRES - 30) as f64,
        "held-back lines are counted: {held_back}"
    );
    old.tell("");

    // The flood exits: its pools and their series are forgotten, the
    // legitimate ones stay.
    flood.tell("");
    assert_eq!(flood.line()["exited"], json!(FLOOD_PROCESSES));
    // Their series stay on /metrics for the agent's EXITED_SERIES_GRACE (60 s).
    let forgotten = wait_until(Duration::from_secs(75), || {
        let pools = pools_of(&agent);
        let metrics = agent.metrics();
        let series = wait_time_series(&metrics);
        let flood_series = series
            .iter()
            .filter(|l| {
                flood_pids
                    .iter()
                    .any(|p| l.contains(&format!("process_pid=\"{p}\"")))
            })
            .count();
        (!pools.iter().any(|(p, _)| flood_pids.contains(p)) && flood_series == 0).then_some((
            pools,
            series.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ))
    });
    let (pools, series) = forgotten.unwrap_or_else(|| {
        panic!(
            "the flood's pools or series outlived it\n--- pools ---\n{:?}\n--- agent log ---\n{}",
            pools_of(&agent).len(),
            agent.log()
        )
    });
    assert!(pools.contains(&(me, "orders".into())));
    assert_eq!(metric_sample(&agent.metrics(), &orders_max), Some(5.0));
    assert!(
        series.len() <= 2,
        "only the live pools' series are left: {series:?}"
    );
    // Forgetting restarts the live pools' histograms (a counter reset, see
    // docs/metrics.md): the legitimate pool's next wait is there at once.
    legit.slow_timeout("orders", 2, Duration::from_millis(200));
    let back = wait_until(Duration::from_secs(10), || {
        let metrics = agent.metrics();
        wait_time_series(&metrics)
            .iter()
            .any(|l| l.contains("db_client_connection_pool_name=\"orders\"") && l.contains(&mine))
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the legitimate pool's series after the reset"
    );
}
