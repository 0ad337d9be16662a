//! `/healthz` tells the truth, and SIGTERM ends the agent in time whatever
//! its collector does. Real agent, real kernel.

use std::{
    net::TcpListener,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use poolscope_tests::{adapter_config, require_kernel, wait_until, Agent, TempDir};

#[test]
fn live_and_ready_each_answer_ok_on_a_whole_agent() {
    if !require_kernel() {
        return;
    }
    let adapter_dir = TempDir::new("poolscope-health-adapter");
    let config = adapter_config(&adapter_dir.path().join("adapter.sock"), &[]);
    let agent = Agent::start_with_config(&config, &[]);
    for path in ["/healthz", "/healthz/live", "/healthz/ready"] {
        let (status, body) = agent.get_with_status(path).expect(path);
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{path}");
    }
}

#[test]
fn an_unbound_adapter_socket_makes_the_agent_live_but_not_ready() {
    if !require_kernel() {
        return;
    }
    // A path under /proc can never be bound.
    let config = adapter_config(Path::new("/proc/poolscope-nowhere/adapter.sock"), &[]);
    let agent = Agent::start_with_config_until(&config, &[], "/healthz/live");
    // Live answers before the agent has tried the socket (it seeds from
    // /proc first), so readiness may still say "not bound yet": wait for the
    // attempt, and the agent must never call itself ready meanwhile.
    let mut last = String::new();
    let failed = wait_until(Duration::from_secs(30), || {
        let (status, body) = agent.get_with_status("/healthz/ready").expect("ready");
        assert_eq!(status, 503, "{body}\n{}", agent.log());
        let failed = body.contains("adapter socket could not be bound");
        last = body;
        failed.then_some(())
    });
    assert!(failed.is_some(), "the reason is given: {last:?}");
    let (status, body) = agent.get_with_status("/healthz").expect("healthz");
    assert_eq!(status, 503, "{body}");
    let (status, _) = agent.get_with_status("/healthz/live").expect("live");
    assert_eq!(status, 200, "the agent itself is well: no restart wanted");
}

/// A collector that accepts connections and never answers.
struct HungCollector {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl HungCollector {
    fn start() -> HungCollector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let accepted = Arc::new(AtomicUsize::new(0));
        let counting = Arc::clone(&accepted);
        thread::spawn(move || {
            let mut held = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        held.push(stream);
                        counting.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HungCollector {
            port,
            stop,
            accepted,
        }
    }
}

impl Drop for HungCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn sigterm_exits_within_five_seconds_while_the_collector_hangs() {
    if !require_kernel() {
        return;
    }
    for protocol in ["grpc", "http/protobuf"] {
        let collector = HungCollector::start();
        let adapter_dir = TempDir::new("poolscope-health-adapter");
        // Exports time out after 30 s, far past the shutdown deadline: only
        // the deadline can end the agent in time.
        let config = format!(
            "[otlp]\nendpoint = \"http://127.0.0.1:{}\"\nprotocol = {protocol:?}\n\
             interval_seconds = 1.0\ntimeout_seconds = 30.0\n\n{}",
            collector.port,
            adapter_config(&adapter_dir.path().join("adapter.sock"), &[])
        );
        let mut agent = Agent::start_with_config(&config, &[]);
        // A periodic export has begun and hangs on the collector.
        let connected = wait_until(Duration::from_secs(10), || {
            (collector.accepted.load(Ordering::Relaxed) >= 1).then_some(())
        });
        assert!(
            connected.is_some(),
            "{protocol}: the agent never connected to the collector\n--- agent log ---\n{}",
            agent.log()
        );
        let (status, took) = agent.terminate();
        let log = agent.log();
        assert!(
            took < Duration::from_secs(5),
            "{protocol}: SIGTERM took {took:?}\n--- agent log ---\n{log}"
        );
        assert!(
            status.success(),
            "{protocol}: a requested stop exits 0, got {status}\n{log}"
        );
        println!("{protocol}: exited {status} {took:?} after SIGTERM with a hung collector");
    }
}
