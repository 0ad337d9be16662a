//! The adapter stream socket (issue 12, item 1): the same messages as the
//! datagram socket, one per line, the sender named by the kernel at accept.
//! A good stream is applied as its sender's; bad input (malformed lines,
//! a 1 MiB line, 10,000 idle streams, a flood from a sender that never
//! reads) costs the sender at most its own stream and never another
//! process its messages, nor the agent its health.
//!
//! The attackers run as `poolscope-fuzz`, an unprivileged user; the
//! legitimate sender is the test itself (root).
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use poolscope_tests::{
    adapter_config, json, metric_sample, require_kernel, stream_socket_beside, wait_until, Agent,
    Script, TempDir, Value,
};

/// Streams the idle-stream attacker opens.
const IDLE_STREAMS: usize = 10_000;

const ATTACKER: &str = r#"
import json, os, resource, socket, sys, time

path, mode = sys.argv[1], sys.argv[2]

if mode == "idle":
    n = int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    streams, failed = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            streams.append(s)
        except OSError:
            failed += 1
            s.close()
    print(json.dumps({"pid": os.getpid(), "opened": len(streams), "failed": failed}), flush=True)
    sys.stdin.readline()
elif mode == "huge":
    # One line of 1 MiB: the agent drops the stream.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    sent = 0
    try:
        s.sendall(b'{"v":1,"kind":"pool","pool":"' + b"x" * (1 << 20) + b'"}\n')
        sent = 1
    except OSError:
        pass
    print(json.dumps({"pid": os.getpid(), "sent": sent}), flush=True)
    sys.stdin.readline()
elif mode == "inherit":
    # The parent connects and registers a pool, forks, and exits; its child,
    # which inherited the stream, then tries to speak on it.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall((json.dumps({"v": 1, "kind": "pool", "pool": "parent", "max": 3}) + "\n").encode())
    time.sleep(0.5)
    r, w = os.pipe()
    parent = os.getpid()
    if os.fork() == 0:
        os.close(w)
        os.read(r, 1)  # the parent has exited when its end closes
        time.sleep(0.5)
        wrote = 0
        for _ in range(20):
            try:
                s.sendall((json.dumps({"v": 1, "kind": "pool", "pool": "inherited", "max": 7}) + "\n").encode())
                wrote += 1
            except OSError:
                break
            time.sleep(0.05)
        print(json.dumps({"parent": parent, "child": os.getpid(), "wrote": wrote}), flush=True)
        sys.stdin.readline()
        os._exit(0)
    os._exit(0)
else:
    # Writes lines as fast as it can and never reads.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    line = (json.dumps({"v": 1, "kind": "acquire_start", "pool": "flood", "request": 1}) + "\n").encode()
    deadline, sent = time.monotonic() + float(sys.argv[3]), 0
    while time.monotonic() < deadline:
        s.sendall(line * 64)
        sent += 64
    print(json.dumps({"pid": os.getpid(), "sent": sent}), flush=True)
    sys.stdin.readline()
"#;

fn rejected(agent: &Agent, reason: &str) -> f64 {
    metric_sample(
        &agent.metrics(),
        &format!(r#"poolscope_adapter_messages_total{{reason="{reason}",result="rejected"}}"#),
    )
    .unwrap_or(0.0)
}

fn wait_for_rejected(agent: &Agent, reason: &str, at_least: f64) -> f64 {
    wait_until(Duration::from_secs(30), || {
        let n = rejected(agent, reason);
        (n >= at_least).then_some(n)
    })
    .unwrap_or_else(|| {
        panic!(
            "{reason}: {} rejections counted, expected at least {at_least}\n--- agent log ---\n{}",
            rejected(agent, reason),
            agent.log()
        )
    })
}

/// A stream from this process, sending one JSON message per line.
struct Sender(UnixStream);

impl Sender {
    fn connect(path: &Path) -> Sender {
        Sender(UnixStream::connect(path).unwrap())
    }

    fn send(&mut self, message: Value) {
        self.0.write_all(format!("{message}\n").as_bytes()).unwrap();
    }
}

/// The agent with both adapter sockets in a directory other users may
/// reach, and short stream limits so that the bounds are reached quickly.
fn agent_and_stream_socket(dir: &TempDir) -> (Agent, std::path::PathBuf) {
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("adapter.sock");
    let config = format!(
        "{}\n[log]\nlevel = \"info\"\n",
        adapter_config(&socket, &[]).replacen(
            "[adapter]\n",
            "[adapter]\nmax_streams = 256\nmax_streams_per_uid = 32\n",
            1
        )
    );
    let agent = Agent::start_with_config(&config, &[]);
    (agent, stream_socket_beside(&socket))
}

fn wait_for_pool_max(agent: &Agent, pid: u32, pool: &str, max: u32) {
    let seen = wait_until(Duration::from_secs(10), || {
        agent
            .pool(pid, pool)
            .filter(|p| p.max == Some(max))
            .map(|_| ())
    });
    assert!(
        seen.is_some(),
        "pool {pool} of pid {pid} with max {max} not in /api/v1/pools: {:?}",
        agent.pools()
    );
}

#[test]
fn stream_lines_are_applied_as_the_senders_and_bad_lines_cost_only_themselves() {
    if !require_kernel() {
        return;
    }
    let dir = TempDir::new("poolscope-adapter-stream");
    let (agent, path) = agent_and_stream_socket(&dir);
    let me = std::process::id();
    let mut sender = Sender::connect(&path);
    sender.send(json!({"v": 1, "kind": "pool", "pool": "orders", "max": 7}));
    wait_for_pool_max(&agent, me, "orders", 7);

    // A malformed line, a line of another protocol version and one that
    // claims another pid: each is dropped alone, and the stream goes on.
    sender.0.write_all(b"{not json\n").unwrap();
    sender.send(json!({"v": 99, "kind": "pool", "pool": "orders"}));
    sender.send(json!({"v": 1, "kind": "pool", "pool": "spoof", "max": 3, "pid": 1}));
    sender.send(json!({"v": 1, "kind": "pool", "pool": "orders", "max": 9}));
    wait_for_pool_max(&agent, me, "orders", 9);
    assert!(rejected(&agent, "malformed") >= 1.0);
    assert!(rejected(&agent, "unknown_version") >= 1.0);
    assert!(rejected(&agent, "spoofed_pid") >= 1.0);
    assert!(
        agent.pool(me, "spoof").is_none() && agent.pool(1, "spoof").is_none(),
        "a line claiming another pid speaks for no one"
    );

    // Lines split across writes, and several in one write, are all applied.
    sender
        .0
        .write_all(br#"{"v":1,"kind":"pool","pool":"#)
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    sender
        .0
        .write_all(
            b"\"split\",\"max\":2}\n{\"v\":1,\"kind\":\"pool\",\"pool\":\"second\",\"max\":4}\n",
        )
        .unwrap();
    wait_for_pool_max(&agent, me, "split", 2);
    wait_for_pool_max(&agent, me, "second", 4);

    // A line longer than a datagram may be drops that stream only.
    let too_large_before = rejected(&agent, "too_large");
    sender.0.write_all(&vec![b'x'; 8192]).unwrap();
    wait_for_rejected(&agent, "too_large", too_large_before + 1.0);
    sender
        .0
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let closed = sender.0.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "the agent closes a stream with an oversized line: {closed:?}"
    );
    let mut again = Sender::connect(&path);
    again.send(json!({"v": 1, "kind": "pool", "pool": "orders", "max": 11}));
    wait_for_pool_max(&agent, me, "orders", 11);
}

#[test]
fn idle_streams_huge_lines_and_floods_of_one_user_cost_no_one_else() {
    if !require_kernel() {
        return;
    }
    let dir = TempDir::new("poolscope-adapter-stream-hostile");
    let (agent, path) = agent_and_stream_socket(&dir);
    let me = std::process::id();
    let path_arg = path.display().to_string();

    let fds = || {
        fs::read_dir(format!("/proc/{}/fd", agent.pid()))
            .unwrap()
            .count()
    };
    let fds_before = fds();
    // 10,000 idle streams from one user: it gets its 32, the rest are
    // closed at accept and counted.
    let mut idle = Script::unprivileged(
        ATTACKER,
        &[path_arg.clone(), "idle".into(), IDLE_STREAMS.to_string()],
    );
    let said = idle.line();
    assert_eq!(
        said["opened"].as_u64().unwrap() + said["failed"].as_u64().unwrap(),
        IDLE_STREAMS as u64,
        "{said}"
    );
    let refused = wait_for_rejected(&agent, "stream_limit", 1.0);
    let agent_fds = fds();
    // Its 32 streams and their processes' pidfds, plus a few in flight: a
    // stream accepted and about to be refused, the API connection that read
    // the counter.
    assert!(
        agent_fds <= fds_before + 2 * 32 + 8,
        "the agent holds {agent_fds} fds ({fds_before} before) with {IDLE_STREAMS} idle streams knocking (refused {refused})"
    );
    // Silent, they are closed by the agent after its first-line time
    // (10 s) and counted: no one can hold slots with streams that say
    // nothing.
    wait_for_rejected(&agent, "silent_stream", 32.0);
    // Their slots are given back when they close.
    drop(idle);
    let freed = wait_until(Duration::from_secs(10), || {
        (fds() <= fds_before + 8).then_some(())
    });
    assert!(
        freed.is_some(),
        "the idle streams' fds were not closed: {}",
        fds()
    );

    // A 1 MiB line from the same user: its stream is dropped. First every
    // idle stream of that user must be gone from the agent (its fds back
    // to where they were, give or take the API connection), or the huge
    // stream may meet the user's stream limit instead.
    let settled = wait_until(Duration::from_secs(10), || {
        (fds() <= fds_before + 2).then_some(())
    });
    assert!(
        settled.is_some(),
        "the idle streams' fds were not all closed: {} ({fds_before} before)",
        fds()
    );
    let too_large_before = rejected(&agent, "too_large");
    let limit_before = rejected(&agent, "stream_limit");
    let mut huge = Script::unprivileged(ATTACKER, &[path_arg.clone(), "huge".into()]);
    let _ = huge.line();
    if wait_until(Duration::from_secs(30), || {
        (rejected(&agent, "too_large") >= too_large_before + 1.0).then_some(())
    })
    .is_none()
    {
        panic!(
            "too_large: no rejection counted for the 1 MiB line (stream_limit rejections {} before, {} now)\n--- agent log ---\n{}",
            limit_before,
            rejected(&agent, "stream_limit"),
            agent.log()
        );
    }

    // A flood from a sender that never reads, while the legitimate process
    // reports its pool on a stream of its own and /healthz is asked.
    let mut flood = Script::unprivileged(ATTACKER, &[path_arg, "flood".into(), "5".into()]);
    let mut legit = Sender::connect(&path);
    let started = Instant::now();
    let mut slowest_health = Duration::ZERO;
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(4) {
        round += 1;
        legit.send(json!({"v": 1, "kind": "pool", "pool": "orders", "max": round}));
        let asked = Instant::now();
        let health = agent.get("/healthz").unwrap();
        slowest_health = slowest_health.max(asked.elapsed());
        assert_eq!(health.trim(), "ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_pool_max(&agent, me, "orders", round);
    let flooded = flood.line();
    assert!(flooded["sent"].as_u64().unwrap() > 0, "{flooded}");
    assert!(
        slowest_health < Duration::from_secs(1),
        "/healthz took {slowest_health:?} during the flood"
    );
    drop(huge);
    drop(flood);
    let mut after = Sender::connect(&path);
    after.send(json!({"v": 1, "kind": "pool", "pool": "after", "max": 5}));
    wait_for_pool_max(&agent, me, "after", 5);
}

/// A stream is its opener's only while the opener lives: after it exits,
/// a child that inherited the stream is cut off, so it can speak neither
/// as its parent nor as a later process that reuses the parent's pid.
#[test]
fn a_child_that_inherits_a_stream_cannot_speak_after_its_parent_exits() {
    if !require_kernel() {
        return;
    }
    let dir = TempDir::new("poolscope-adapter-stream-fork");
    let (agent, path) = agent_and_stream_socket(&dir);
    let mut script =
        Script::unprivileged(ATTACKER, &[path.display().to_string(), "inherit".into()]);
    let said = script.line();
    let child = said["child"].as_u64().unwrap();
    // The agent closed the stream when the parent exited: the child's
    // first write finds no reader (without that, the agent would read its
    // lines and only drop them as the dead parent's).
    assert_eq!(
        said["wrote"].as_u64(),
        Some(0),
        "the child (pid {child}) could still write on its exited parent's stream: {said}"
    );
    // The parent's own line, sent while it lived, was accepted.
    let accepted = metric_sample(
        &agent.metrics(),
        r#"poolscope_adapter_messages_total{result="accepted"}"#,
    );
    assert!(accepted.is_some_and(|n| n >= 1.0), "{accepted:?}");
    assert!(
        agent.pools().iter().all(|p| p.name != "inherited"),
        "{:?}",
        agent.pools()
    );
}
