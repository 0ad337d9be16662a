//! Each process's series go with it when it exits (its application's meter
//! provider is dropped), and a live pool keeps counting, against the real
//! agent and kernel.
//!
//! Any local user may send adapter datagrams, and every pool name becomes
//! a label value of `db.client.connection.wait_time`. Short-lived sender
//! processes (each its own pid, as the kernel tells the agent) name many
//! pools and exit; a long-lived sender's pool records before and after. The
//! senders are small Python processes sending raw protocol-v1 JSON.
#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use poolscope_tests::{
    adapter_config, json, otlp_receiver::OtlpReceiver, require_kernel, wait_until, Agent, Script,
    TempDir,
};

/// Short-lived senders and the pools each names.
const SENDERS: usize = 40;
const POOLS_EACH: usize = 16;

/// Housekeeping lets go of exited processes' applications every second;
/// their series stay on /metrics for the agent's `EXITED_SERIES_GRACE`
/// (60 s) so that the last scrape sees a short-lived process's end.
const FORGET_TIMEOUT: Duration = Duration::from_secs(75);

/// Sends, for each of its pools, an acquire that timed out; says `ready`;
/// then does it again for every line it reads, until its stdin closes.
const SENDER: &str = r#"
import json, socket, sys
path, prefix, pools = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.settimeout(10)
request = 0
def burst():
    global request
    for i in range(pools):
        pool = f"{prefix}{i}"
        request += 1
        for m in ({"kind": "acquire_start"}, {"kind": "acquire_end", "result": "timeout"}):
            m.update(v=1, pool=pool, request=request)
            s.sendto(json.dumps(m).encode(), path)
burst()
print("ready", flush=True)
for _ in sys.stdin:
    burst()
    print("ready", flush=True)
"#;

/// A sender process (its own pid), driven through its stdin.
struct Sender(Script);

impl Sender {
    fn spawn(socket: &Path, prefix: &str, pools: usize) -> Sender {
        Sender(Script::python(
            SENDER,
            &[
                socket.display().to_string(),
                prefix.to_string(),
                pools.to_string(),
            ],
        ))
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    fn wait_ready(&mut self) {
        let line = self.0.raw_line();
        assert_eq!(line.trim(), "ready", "sender {} said {line:?}", self.pid());
    }

    fn again(&mut self) {
        self.0.tell("");
        self.wait_ready();
    }

    /// Closes its stdin: it exits.
    fn finish(&mut self) {
        self.0.close_stdin();
    }
}

/// Sample lines (not comments) of an exposition.
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// The value of the wait-time `_count` line of (pid, pool), if any.
fn wait_count(text: &str, pid: u32, pool: &str) -> Option<f64> {
    let pool = format!("db_client_connection_pool_name=\"{pool}\"");
    let pid = format!("process_pid=\"{pid}\"");
    text.lines()
        .filter(|l| l.starts_with("db_client_connection_wait_time_seconds_count{"))
        .find(|l| l.contains(&pool) && l.contains(&pid))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn series_of_exited_processes_go_with_them_and_a_live_pool_keeps_counting() {
    if !require_kernel() {
        return;
    }
    scenario(None);
}

/// The same over OTLP too: each application goes out under its own resource
/// (the blocking HTTP client, on the applications' export thread), and the
/// pushed wait times forget the gone processes as /metrics does.
#[test]
fn pushed_series_forget_exited_processes_too() {
    if !require_kernel() {
        return;
    }
    let receiver = OtlpReceiver::start();
    scenario(Some(&receiver));
}

const WAIT_TIME: &str = "db.client.connection.wait_time";

fn scenario(receiver: Option<&OtlpReceiver>) {
    let dir = TempDir::new("poolscope-pool-series");
    let socket = dir.path().join("adapter.sock");
    let mut config = adapter_config(&socket, &[]);
    if let Some(receiver) = receiver {
        config.push_str(&format!(
            "\n[otlp]\nendpoint = {:?}\nprotocol = \"http/protobuf\"\ninterval_seconds = 1.0\ntimeout_seconds = 2.0\n",
            receiver.http_endpoint()
        ));
    }
    let agent = Agent::start_with_config(&config, &[]);
    let baseline = series(&agent.metrics());

    let mut legit = Sender::spawn(&socket, "legit", 1);
    legit.wait_ready();
    let mut flood: Vec<Sender> = (0..SENDERS)
        .map(|_| Sender::spawn(&socket, "flood", POOLS_EACH))
        .collect();
    for sender in &mut flood {
        sender.wait_ready();
    }
    let flood_pids: Vec<u32> = flood.iter().map(Sender::pid).collect();

    // Every pool has its line while its process lives.
    let text = wait_until(Duration::from_secs(10), || {
        let text = agent.metrics();
        let all = flood_pids.iter().all(|pid| {
            (0..POOLS_EACH).all(|i| wait_count(&text, *pid, &format!("flood{i}")).is_some())
        });
        (all && wait_count(&text, legit.pid(), "legit0") == Some(1.0)).then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "not every pool was exported:\n{}\n--- agent log ---\n{}",
            agent.metrics(),
            agent.log()
        )
    });
    let flooded = series(&text);
    assert!(
        flooded >= baseline + SENDERS * POOLS_EACH * 12,
        "the flood shows: {baseline} series before, {flooded} with it"
    );
    // Other processes on the host (other tests') may be applications too.
    let applications_flooded = gauge(&text, "poolscope_telemetry_applications");
    assert!(
        applications_flooded >= (SENDERS + 1) as f64,
        "{applications_flooded} applications with {SENDERS} senders and the live one"
    );
    assert!(!text.contains("otel_metric_overflow"));

    // The flood's processes exit, all at once.
    for sender in &mut flood {
        sender.finish();
    }
    for sender in &mut flood {
        assert!(
            sender.0.wait_exit(Duration::from_secs(10)).is_some(),
            "sender {} did not exit",
            sender.pid()
        );
    }
    let exited = Instant::now();
    let text = wait_until(FORGET_TIMEOUT, || {
        let text = agent.metrics();
        let gone = flood_pids
            .iter()
            .all(|pid| !text.contains(&format!("process_pid=\"{pid}\"")));
        gone.then_some(text)
    })
    .unwrap_or_else(|| {
        let text = agent.metrics();
        let left = flood_pids
            .iter()
            .filter(|pid| text.contains(&format!("process_pid=\"{pid}\"")))
            .count();
        panic!(
            "{left} of {SENDERS} exited senders still have series {:?} after their exit\n--- agent log ---\n{}",
            exited.elapsed(),
            agent.log()
        )
    });
    let applications = gauge(&text, "poolscope_telemetry_applications");
    // (Half: other tests' processes may have come meanwhile.)
    assert!(
        applications <= applications_flooded - (SENDERS / 2) as f64,
        "the senders' applications went with them: {applications_flooded} with the flood, \
         {applications} after"
    );

    // The live pool records again: nothing reset it, and it has its own
    // line (not the overflow series).
    legit.again();
    legit.again();
    let text = wait_until(Duration::from_secs(10), || {
        let text = agent.metrics();
        (wait_count(&text, legit.pid(), "legit0") == Some(3.0)).then_some(text)
    })
    .unwrap_or_else(|| panic!("the live pool's wait count is not 3:\n{}", agent.metrics()));
    assert!(!text.contains("otel_metric_overflow"));
    if let Some(receiver) = receiver {
        let legit_pid = i64::from(legit.pid());
        let pushed = wait_until(Duration::from_secs(10), || {
            let snapshot = receiver.latest_with(WAIT_TIME)?;
            let legit = snapshot.value(
                WAIT_TIME,
                &[
                    ("process.pid", json!(legit_pid)),
                    ("db.client.connection.pool.name", json!("legit0")),
                ],
            );
            // Requests sent after the exits were seen: none is a flood
            // sender's (their applications went with them).
            let settled = exited + Duration::from_secs(3);
            let later: Vec<_> = receiver
                .metric_snapshots()
                .into_iter()
                .filter(|s| s.received_at > settled)
                .collect();
            let flood_left = later
                .iter()
                .flat_map(|s| &s.points)
                .filter(|p| {
                    p.resource
                        .get("process.pid")
                        .and_then(|v| v.as_i64())
                        .is_some_and(|pid| flood_pids.iter().any(|f| i64::from(*f) == pid))
                })
                .count();
            let legit_pushed_later = later.iter().any(|s| {
                s.points
                    .iter()
                    .any(|p| p.resource.get("process.pid") == Some(&json!(legit_pid)))
            });
            (legit == Some(3.0) && flood_left == 0 && legit_pushed_later).then_some(())
        });
        assert!(
            pushed.is_some(),
            "the pushed wait times still hold gone pools or miss the live one: {:?}\n--- agent log ---\n{}",
            receiver.latest_with(WAIT_TIME).map(|s| s.points.len()),
            agent.log()
        );
    }
    let after = series(&text);
    assert!(
        after <= baseline + 200,
        "series back near the baseline: {baseline} before, {flooded} flooded, {after} after"
    );
    eprintln!(
        "pool series{}: {baseline} at start, {flooded} with {} pools of {SENDERS} processes, {after} after they exited ({:.1} s after the exits)",
        if receiver.is_some() { " (with OTLP)" } else { "" },
        SENDERS * POOLS_EACH,
        exited.elapsed().as_secs_f64()
    );
    legit.finish();
}
