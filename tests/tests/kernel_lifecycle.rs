//! Connection lifecycles seen from the real kernel: each test starts its own
//! PostgreSQL and agent, drives a child process whose pid it knows, and checks
//! what `/api/v1/connections` and `/metrics` say about that pid.
//!
//! Tests run in parallel and every agent sees every process on the host, so
//! assertions always select the child's pid (and fd / ports), never totals.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use poolscope_tests::{
    metric_sample, process_alive, require_kernel, server_and_agent, wait_exit, Agent, CloseReason,
    ConnClient, ConnState, ConnectOutcome, ConnectionView, Postgres, Script,
};

const LOCALHOST: &str = "127.0.0.1";

fn open_selector(pid: u32, server: &str) -> String {
    format!("poolscope_connection_open{{process_pid=\"{pid}\",server_address=\"{server}\"}}")
}

fn close_wait_selector(pid: u32, server: &str) -> String {
    format!("poolscope_connection_close_wait{{process_pid=\"{pid}\",server_address=\"{server}\"}}")
}

const REFUSED: &str = "poolscope_connects_total{network_transport=\"tcp\",result=\"refused\"}";

fn find(conns: &[ConnectionView], fd: i32, local_port: u16) -> Option<&ConnectionView> {
    conns
        .iter()
        .find(|c| c.fd == fd && c.local_port == Some(local_port))
}

/// Step: where the kernel lets an agent run, a fresh PostgreSQL, then an
/// agent started by `agent` and a scripted client whose TCP connections the
/// test drives; `None` elsewhere, and the test ends there.
fn postgres_agent_client(agent: impl FnOnce() -> Agent) -> Option<(Postgres, Agent, ConnClient)> {
    let (pg, agent) = server_and_agent(Postgres::start, agent)?;
    Some((pg, agent, ConnClient::spawn()))
}

/// Step: the connection on `fd` from `local_port` of `pid`, once the agent
/// shows it in `state`.
fn wait_in_state(
    agent: &Agent,
    pid: u32,
    (fd, local_port): (i32, u16),
    state: ConnState,
    what: &str,
) -> ConnectionView {
    agent.wait_for(pid, what, |conns| {
        find(conns, fd, local_port)
            .filter(|c| c.state == state)
            .cloned()
    })
}

/// Step: every connection of `opened` (fd, local port) of `pid`, in that
/// order, once the agent shows all of them in `state`.
fn wait_all_in_state(
    agent: &Agent,
    pid: u32,
    opened: &[(i32, u16)],
    state: ConnState,
    what: &str,
) -> Vec<ConnectionView> {
    agent.wait_for(pid, what, |conns| {
        opened
            .iter()
            .map(|(fd, port)| {
                find(conns, *fd, *port)
                    .filter(|c| c.state == state)
                    .cloned()
            })
            .collect::<Option<Vec<_>>>()
    })
}

/// Step: the connect of `pid` that `is_it` picks out, once the agent shows
/// it failed; it was refused.
fn wait_refused(
    agent: &Agent,
    pid: u32,
    what: &str,
    is_it: impl Fn(&ConnectionView) -> bool,
) -> ConnectionView {
    let c = agent.wait_for(pid, what, |conns| {
        conns
            .iter()
            .find(|c| is_it(c))
            .filter(|c| c.state == ConnState::Failed)
            .cloned()
    });
    assert_eq!(c.connect_result, Some(ConnectOutcome::Refused), "{c:?}");
    c
}

/// Opens a TCP connection to `port` on localhost and waits until the agent
/// shows it established: (fd, local port).
fn open_established(agent: &Agent, client: &mut ConnClient, port: u16) -> (i32, u16) {
    let opened = client.open(LOCALHOST, port);
    let what = "the established connection";
    wait_in_state(agent, client.pid, opened, ConnState::Established, what);
    opened
}

/// The one connection on `fd` of this process, once it is in `state`.
fn in_state(conns: &[ConnectionView], fd: i32, state: ConnState) -> Option<ConnectionView> {
    conns
        .iter()
        .find(|c| c.fd == fd && c.state == state)
        .cloned()
}

#[test]
fn tcp_connections_are_tracked_from_connect_to_close() {
    let Some((pg, agent, mut client)) = postgres_agent_client(Agent::start) else {
        return;
    };
    let pid = client.pid;

    let opened: Vec<(i32, u16)> = (0..5).map(|_| client.open(LOCALHOST, pg.port)).collect();
    let mut fds: Vec<i32> = opened.iter().map(|(fd, _)| *fd).collect();
    fds.sort_unstable();
    fds.dedup();
    assert_eq!(fds.len(), 5, "five distinct fds: {opened:?}");

    let established = wait_all_in_state(
        &agent,
        pid,
        &opened,
        ConnState::Established,
        "5 established connections",
    );
    for c in &established {
        assert_eq!(c.pid, pid);
        assert_eq!(c.process, "python3", "{c:?}");
        assert_eq!(c.transport, "tcp", "{c:?}");
        assert_eq!(c.local_address.as_deref(), Some(LOCALHOST), "{c:?}");
        assert_eq!(c.remote_address, LOCALHOST, "{c:?}");
        assert_eq!(c.remote_port, Some(pg.port), "{c:?}");
        assert_eq!(c.connect_result, Some(ConnectOutcome::Ok), "{c:?}");
        assert!(!c.seen_at_start, "opened after the agent started: {c:?}");
        assert!(c.closed_at.is_none() && c.close_reason.is_none(), "{c:?}");
        assert_ne!(c.generation, 0, "a connect seen by the kernel: {c:?}");
    }
    let all = agent.connections_of(pid);
    assert_eq!(
        all.len(),
        5,
        "the child made exactly five connections: {all:#?}"
    );

    let open = open_selector(pid, LOCALHOST);
    agent.wait_for_metric(&open, |v| v == 5.0);
    let text = agent.metrics();
    let labelled = format!(
        "poolscope_connection_open{{process_executable_name=\"python3\",process_pid=\"{pid}\",\
         server_address=\"{LOCALHOST}\",server_port=\"{}\"}}",
        pg.port
    );
    assert_eq!(metric_sample(&text, &labelled), Some(5.0), "{text}");
    assert!(
        metric_sample(&text, "poolscope_kernel_events_dropped_total").is_some(),
        "dropped-events counter is exported:\n{text}"
    );

    for (fd, _) in &opened {
        client.close(*fd);
    }
    let what = "5 closed connections";
    let closed = wait_all_in_state(&agent, pid, &opened, ConnState::Closed, what);
    for (c, before) in closed.iter().zip(&established) {
        assert_eq!(c.close_reason, Some(CloseReason::Closed), "{c:?}");
        assert!(c.closed_at.is_some(), "{c:?}");
        assert_eq!(c.generation, before.generation, "same connection: {c:?}");
    }
    agent.wait_for_metric(&open, |v| v == 0.0);
    let lifetimes = agent
        .metric_value("poolscope_connection_lifetime_seconds_count{network_transport=\"tcp\"}");
    assert!(
        lifetimes >= 5.0,
        "closed lifetimes are recorded: {lifetimes}"
    );
}

#[test]
fn unix_socket_connection_is_tracked() {
    let unix_sockets = || Agent::start_with_config("[kernel]\nunix_sockets = true\n", &[]);
    let Some((pg, agent, mut client)) = postgres_agent_client(unix_sockets) else {
        return;
    };
    let pid = client.pid;
    let path = pg.socket_path();
    let path_text = path.to_str().unwrap().to_string();

    let fd = client.open_unix(&path);
    let c = agent.wait_for(pid, "an established unix connection", |conns| {
        in_state(conns, fd, ConnState::Established)
    });
    assert_eq!(c.transport, "unix", "{c:?}");
    assert_eq!(c.remote_address, path_text, "{c:?}");
    assert_eq!(c.remote_port, None, "{c:?}");
    assert_eq!(c.process, "python3", "{c:?}");
    assert_eq!(c.connect_result, Some(ConnectOutcome::Ok), "{c:?}");
    agent.wait_for_metric(&open_selector(pid, &path_text), |v| v == 1.0);

    client.close(fd);
    let c = agent.wait_for(pid, "the unix connection closed", |conns| {
        in_state(conns, fd, ConnState::Closed)
    });
    assert_eq!(c.close_reason, Some(CloseReason::Closed), "{c:?}");
    assert_eq!(c.remote_address, path_text, "{c:?}");
}

#[test]
fn without_unix_sockets_only_tcp_is_tracked() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let mut client = ConnClient::spawn();
    let pid = client.pid;
    let before_start = client.open_unix(&pg.socket_path());
    let agent = Agent::start_with_config("[kernel]\nunix_sockets = false\n", &[]);
    let log = agent.log();
    assert!(
        log.contains("database Unix sockets are open and not watched")
            && log.contains("kernel.unix_sockets = true"),
        "the log says what is not watched and how to watch it:\n{log}"
    );
    let unix_fd = client.open_unix(&pg.socket_path());
    // Connected after the Unix socket: once the agent shows it, it has read
    // every event from before.
    let (fd, _) = open_established(&agent, &mut client, pg.port);
    let all = agent.connections_of(pid);
    assert!(
        all.iter()
            .all(|c| c.fd != unix_fd && c.fd != before_start && c.transport == "tcp"),
        "no Unix-socket connection is watched: {all:#?}"
    );
    client.close(fd);
    let c = agent.wait_for(pid, "the TCP connection closed", |conns| {
        in_state(conns, fd, ConnState::Closed)
    });
    assert_eq!(c.close_reason, Some(CloseReason::Closed), "{c:?}");
}

#[test]
fn a_connection_shut_down_ends_when_its_socket_closes() {
    let Some((pg, agent, mut client)) = postgres_agent_client(Agent::start) else {
        return;
    };
    let pid = client.pid;
    let (fd, local_port) = open_established(&agent, &mut client, pg.port);
    // The server answers the half-close by closing its side: the socket
    // leaves TCP (TIME_WAIT) while the client still holds the fd.
    client.shutdown(fd);
    let what = "the shut-down connection closed";
    let c = wait_in_state(&agent, pid, (fd, local_port), ConnState::Closed, what);
    assert!(c.closed_at.is_some(), "{c:?}");
    client.close(fd);
    // The fd's close after the socket ended adds nothing.
    let (fd_again, _) = client.open(LOCALHOST, pg.port);
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == 1.0);
    client.close(fd_again);
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == 0.0);
    let on_fd: Vec<_> = agent
        .connections_of(pid)
        .into_iter()
        .filter(|c| c.local_port == Some(local_port))
        .collect();
    assert_eq!(
        on_fd.len(),
        1,
        "one entry for the first connection: {on_fd:#?}"
    );
}

#[test]
fn refused_connects_fail_with_refused() {
    if !require_kernel() {
        return;
    }
    let agent = Agent::start();

    // Blocking connect (Python): connect() itself returns ECONNREFUSED.
    let mut client = ConnClient::spawn();
    let port = poolscope_tests::free_port();
    let before = agent.metric_value(REFUSED);
    let err = client
        .try_open(LOCALHOST, port)
        .expect_err("nothing listens on the port");
    assert_eq!(err.errno, "ECONNREFUSED");
    let c = wait_refused(&agent, client.pid, "a failed, refused connect", |c| {
        c.fd == err.fd && c.remote_port == Some(port)
    });
    assert_eq!(c.remote_address, LOCALHOST, "{c:?}");
    assert_eq!(c.process, "python3", "{c:?}");
    agent.wait_for_metric(REFUSED, |v| v >= before + 1.0);

    // Non-blocking connect (libpq): EINPROGRESS, then a reset in SYN_SENT.
    let port = poolscope_tests::free_port();
    let before = agent.metric_value(REFUSED);
    let psql_bin = poolscope_tests::postgres_bin_dir().join("psql");
    let mut psql = Command::new(&psql_bin)
        .args([
            "-X",
            "-h",
            LOCALHOST,
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-c", "select 1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let psql_pid = psql.id();
    let status = wait_exit(&mut psql, Duration::from_secs(30)).expect("psql exits");
    assert!(!status.success(), "psql cannot connect to a closed port");
    let c = wait_refused(&agent, psql_pid, "psql's failed, refused connect", |c| {
        c.remote_port == Some(port)
    });
    assert_eq!(c.process, "psql", "{c:?}");
    assert_eq!(c.transport, "tcp", "{c:?}");
    agent.wait_for_metric(REFUSED, |v| v >= before + 1.0);
}

#[test]
fn peer_close_shows_close_wait_while_the_client_lives() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start();
    let conninfo = format!(
        "host={LOCALHOST} port={} user=postgres dbname=postgres application_name=victim",
        pg.port
    );
    // psql reading a script from a pipe that we keep open: it connects and waits.
    let mut victim = Command::new(pg.psql_bin())
        .args(["-X", "-q", &conninfo])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = victim.id();
    let before = agent.wait_for(pid, "the victim's established connection", |conns| {
        conns
            .iter()
            .find(|c| c.remote_port == Some(pg.port) && c.state == ConnState::Established)
            .cloned()
    });
    assert_eq!(before.process, "psql", "{before:?}");
    let visible = poolscope_tests::wait_until(Duration::from_secs(10), || {
        (pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'victim'") == "1")
            .then_some(())
    });
    assert!(visible.is_some(), "the victim's backend never showed up");

    let killed = pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'victim'",
    );
    assert_eq!(killed, "t", "the victim's backend was terminated");

    let c = agent.wait_for(pid, "the victim's connection in CLOSE_WAIT", |conns| {
        in_state(conns, before.fd, ConnState::PeerClosed)
    });
    assert_eq!(c.generation, before.generation, "same connection: {c:?}");
    assert!(c.peer_closed_at.is_some(), "{c:?}");
    assert!(c.closed_at.is_none(), "the fd is still open: {c:?}");
    agent.wait_for_metric(&close_wait_selector(pid, LOCALHOST), |v| v == 1.0);
    assert_eq!(agent.metric_value(&open_selector(pid, LOCALHOST)), 1.0);
    assert!(process_alive(pid), "psql still runs, holding the fd");

    // EOF on stdin: psql exits and the connection leaves the open set.
    drop(victim.stdin.take());
    wait_exit(&mut victim, Duration::from_secs(10)).expect("psql exits on EOF");
    let c = agent.wait_for(pid, "the victim's connection closed", |conns| {
        in_state(conns, before.fd, ConnState::Closed)
    });
    assert!(c.close_reason.is_some(), "{c:?}");
    agent.wait_for_metric(&close_wait_selector(pid, LOCALHOST), |v| v == 0.0);
}

#[test]
fn connections_open_before_start_are_seeded() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let mut client = ConnClient::spawn();
    let pid = client.pid;
    let (fd, local_port) = client.open(LOCALHOST, pg.port);

    let agent = Agent::start();
    let c = agent.wait_for(pid, "the seeded connection", |conns| {
        find(conns, fd, local_port).cloned()
    });
    assert!(c.seen_at_start, "{c:?}");
    assert_eq!(c.state, ConnState::Established, "{c:?}");
    assert_eq!(c.process, "python3", "{c:?}");
    assert_eq!(c.transport, "tcp", "{c:?}");
    assert_eq!(c.local_address.as_deref(), Some(LOCALHOST), "{c:?}");
    assert_eq!(c.remote_address, LOCALHOST, "{c:?}");
    assert_eq!(c.remote_port, Some(pg.port), "{c:?}");
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == 1.0);

    client.close(fd);
    let what = "the seeded connection closed";
    let c = wait_in_state(&agent, pid, (fd, local_port), ConnState::Closed, what);
    assert_eq!(c.close_reason, Some(CloseReason::Closed), "{c:?}");
    assert!(c.seen_at_start, "{c:?}");
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == 0.0);
}

/// Accepts connections and keeps the first `argv[1]` (closing the rest at
/// once); prints its port.
const KEEPING_LISTENER: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
keep = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4096)
print(srv.getsockname()[1], flush=True)
kept = []
while True:
    c, _ = srv.accept()
    if len(kept) < keep:
        kept.append(c)
    else:
        c.close()
"#;

/// Holds `argv[2]` connections to port `argv[1]`, then opens and closes
/// connections in a loop until a line arrives on stdin; prints how many.
const HOLD_AND_CHURN: &str = r#"
import resource, socket, sys, threading
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, hold = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(hold)]
print("held", flush=True)
stop = threading.Event()
count = [0]
def churn():
    while not stop.is_set():
        socket.create_connection(("127.0.0.1", port)).close()
        count[0] += 1
t = threading.Thread(target=churn)
t.start()
sys.stdin.readline()
stop.set()
t.join()
print(count[0], flush=True)
sys.stdin.readline()
"#;

#[test]
fn connections_that_come_and_go_while_the_agent_seeds_are_not_left_open() {
    if !require_kernel() {
        return;
    }
    const HELD: usize = 2_000;
    let mut listener = Script::python(KEEPING_LISTENER, &[HELD.to_string()]);
    let port = listener.raw_line();
    // The held connections make the /proc scan take a while; the churn goes
    // on during it, so connections open when the scan saw them are closed
    // before the agent applies what it found.
    let mut client = Script::python(HOLD_AND_CHURN, &[port.clone(), HELD.to_string()]);
    assert_eq!(client.raw_line(), "held");
    let pid = client.pid();
    let agent = Agent::start_with_config("[kernel]\nring_buffer_bytes = 1048576\n", &[]);
    std::thread::sleep(Duration::from_millis(500));
    client.tell("stop");
    let churned: u64 = client.raw_line().parse().unwrap();
    assert!(churned > 100, "the churn ran: {churned}");
    // Only the held connections stay open: every churned one, whether the
    // scan saw it or not, is closed.
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == HELD as f64);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        metric_sample(&agent.metrics(), &open_selector(pid, LOCALHOST)),
        Some(HELD as f64)
    );
    assert_eq!(
        agent.metric_value("poolscope_kernel_events_dropped_total"),
        0.0,
        "events held in memory while seeding, none dropped"
    );
    drop(listener);
}

#[test]
fn reused_fd_is_a_new_generation() {
    let Some((pg, agent, mut client)) = postgres_agent_client(Agent::start) else {
        return;
    };
    let pid = client.pid;

    // Back to back, without waiting in between: the agent must keep the
    // two lives of the fd apart even when their events arrive together.
    let (fd, first_port) = client.open(LOCALHOST, pg.port);
    client.close(fd);
    let (fd_again, second_port) = client.open(LOCALHOST, pg.port);
    assert_eq!(fd_again, fd, "the kernel hands out the lowest free fd");
    assert_ne!(first_port, second_port);

    let (first, second) = agent.wait_for(pid, "two generations of the fd", |conns| {
        let first = find(conns, fd, first_port).filter(|c| c.state == ConnState::Closed)?;
        let second = find(conns, fd, second_port).filter(|c| c.state == ConnState::Established)?;
        Some((first.clone(), second.clone()))
    });
    let on_fd: Vec<_> = agent
        .connections_of(pid)
        .into_iter()
        .filter(|c| c.fd == fd)
        .collect();
    assert_eq!(
        on_fd.len(),
        2,
        "exactly two entries for fd {fd}: {on_fd:#?}"
    );
    assert_ne!(first.generation, second.generation);
    assert!(
        first.generation < second.generation,
        "generations follow connect order: {first:?} {second:?}"
    );
    assert_eq!(first.close_reason, Some(CloseReason::Closed), "{first:?}");
    assert!(second.closed_at.is_none(), "{second:?}");
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == 1.0);
}

#[test]
fn process_exit_closes_its_connections() {
    let Some((pg, agent, mut client)) = postgres_agent_client(Agent::start) else {
        return;
    };
    let pid = client.pid;
    let (fd, local_port) = open_established(&agent, &mut client, pg.port);

    let status = client.exit_without_closing();
    assert!(status.success(), "os._exit(0): {status}");
    let what = "the connection closed by the exit";
    let c = wait_in_state(&agent, pid, (fd, local_port), ConnState::Closed, what);
    assert_eq!(c.close_reason, Some(CloseReason::ProcessExit), "{c:?}");
    assert!(c.closed_at.is_some(), "{c:?}");
    agent.wait_for_metric(&open_selector(pid, LOCALHOST), |v| v == 0.0);
}
