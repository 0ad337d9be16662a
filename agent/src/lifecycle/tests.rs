//! Scenarios for the tracker: each is a sequence of events as the kernel may
//! deliver them, and what the tracker must conclude.

use super::*;
use crate::adapter::message::{AcquireResult, AdapterEvent, AdapterMessage, ConnRef, Folded};
use agent_common::{tcp_state, EINPROGRESS};
use std::{collections::HashMap, ops::Bound};

const PID: u32 = 100;
const FD: i32 = 5;

fn server() -> SocketAddr {
    "127.0.0.1:5432".parse().expect("addr")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new("127.0.0.1".parse().expect("ip"), port)
}

fn id(pid: u32, fd: i32, generation: u64) -> ConnId {
    ConnId {
        pid,
        fd,
        generation,
    }
}

fn connect(ts: u64, conn: ConnId, ret: i64) -> Event {
    Event {
        ts_ns: ts,
        conn,
        kind: EventKind::Connect {
            tid: conn.pid + 1,
            ret,
            remote: Endpoint::Inet(server()),
            comm: "app".into(),
        },
    }
}

fn state(ts: u64, conn: ConnId, old: i32, new: i32, port: u16) -> Event {
    Event {
        ts_ns: ts,
        conn,
        kind: EventKind::SockState {
            old_state: old,
            new_state: new,
            local: local(port),
            remote: server(),
            reset_received: false,
        },
    }
}

/// The handshake done: SYN_SENT -> ESTABLISHED, from local `port`.
fn established(ts: u64, conn: ConnId, port: u16) -> Event {
    state(ts, conn, tcp_state::SYN_SENT, tcp_state::ESTABLISHED, port)
}

/// The peer hung up: ESTABLISHED -> CLOSE_WAIT.
fn peer_closed(ts: u64, conn: ConnId, port: u16) -> Event {
    state(
        ts,
        conn,
        tcp_state::ESTABLISHED,
        tcp_state::CLOSE_WAIT,
        port,
    )
}

/// The handshake given up: SYN_SENT -> CLOSE.
fn syn_closed(ts: u64, conn: ConnId, port: u16) -> Event {
    state(ts, conn, tcp_state::SYN_SENT, tcp_state::CLOSE, port)
}

fn close(ts: u64, conn: ConnId) -> Event {
    Event {
        ts_ns: ts,
        conn,
        kind: EventKind::Close,
    }
}

fn exit(ts: u64, pid: u32) -> Event {
    Event {
        ts_ns: ts,
        conn: id(pid, -1, 0),
        kind: EventKind::ProcessExit { comm: "app".into() },
    }
}

fn tracker() -> Tracker {
    Tracker::new(TrackerConfig::default())
}

fn open_ids(t: &Tracker) -> Vec<ConnId> {
    let mut ids: Vec<ConnId> = t.open_connections().map(|c| c.id).collect();
    ids.sort();
    ids
}

fn outcomes(outputs: &[Output]) -> Vec<ConnectOutcome> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::ConnectFinished { outcome, .. } => Some(*outcome),
            _ => None,
        })
        .collect()
}

/// A tracker in which `FD` of `PID` was connected, closed and connected
/// again: the tracker and the fd's first and second connections.
fn fd_closed_and_reused() -> (Tracker, ConnId, ConnId) {
    let mut t = tracker();
    let first = id(PID, FD, 1_000);
    let second = id(PID, FD, 5_000);
    t.apply(connect(1_100, first, 0));
    t.apply(close(2_000, first));
    t.apply(connect(5_100, second, 0));
    (t, first, second)
}

#[test]
fn blocking_connect_then_close() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    assert!(t.apply(established(1_400, c, 40_000)).len() == 1);
    // connect() returns after the handshake: the outcome is counted once.
    assert!(outcomes(&t.apply(connect(1_500, c, 0))).is_empty());
    let conn = t.open_connections().next().expect("open");
    assert_eq!(conn.state, ConnState::Established);
    assert_eq!(conn.connect_latency_ns, Some(400));
    assert_eq!(conn.local, Some(local(40_000)));
    assert_eq!(conn.comm, "app");
    assert_eq!(conn.tid, Some(PID + 1));

    let out = t.apply(close(9_000, c));
    assert!(matches!(
        out[..],
        [Output::Closed {
            lifetime_ns: 8_000,
            reason: CloseReason::Closed,
            ..
        }]
    ));
    assert!(open_ids(&t).is_empty());
    assert_eq!(t.closed_connections().count(), 1);
}

#[test]
fn nonblocking_connect_established_later() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    assert!(t.apply(connect(1_100, c, EINPROGRESS)).is_empty());
    assert_eq!(
        t.open_connections().next().map(|c| c.state),
        Some(ConnState::Connecting)
    );
    let out = t.apply(established(3_000, c, 40_001));
    assert_eq!(outcomes(&out), vec![ConnectOutcome::Ok]);
    let conn = t.open_connections().next().expect("open");
    assert_eq!(conn.connect_latency_ns, Some(2_000));
}

#[test]
fn refused_blocking_and_nonblocking() {
    let mut t = tracker();
    let blocking = id(PID, FD, 1_000);
    let out = t.apply(connect(1_200, blocking, -111));
    assert_eq!(outcomes(&out), vec![ConnectOutcome::Refused]);
    // The state change for the same failure arrives afterwards: not counted twice.
    let mut late = syn_closed(1_100, blocking, 40_002);
    if let EventKind::SockState { reset_received, .. } = &mut late.kind {
        *reset_received = true;
    }
    assert!(outcomes(&t.apply(late.clone())).is_empty());

    let nonblocking = id(PID, FD + 1, 2_000);
    t.apply(connect(2_100, nonblocking, EINPROGRESS));
    late.conn = nonblocking;
    assert_eq!(outcomes(&t.apply(late)), vec![ConnectOutcome::Refused]);
    assert!(open_ids(&t).is_empty());
    assert!(t.closed_connections().all(|c| c.state == ConnState::Failed));
}

#[test]
fn syn_timeout_without_reset_is_timed_out() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_100, c, EINPROGRESS));
    let out = t.apply(syn_closed(9_000, c, 40_003));
    assert_eq!(outcomes(&out), vec![ConnectOutcome::TimedOut]);
}

#[test]
fn peer_close_is_reported_once_and_kept_open() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_100, c, 0));
    let out = t.apply(peer_closed(5_000, c, 40_004));
    assert_eq!(out, vec![Output::PeerClosed { id: c }]);
    assert!(t.apply(peer_closed(5_001, c, 40_004)).is_empty());
    let conn = t
        .open_connections()
        .next()
        .expect("still open: the fd was never closed");
    assert_eq!(conn.state, ConnState::PeerClosed);
    assert_eq!(conn.peer_closed_at_ns, Some(5_000));
}

#[test]
fn reused_fd_is_a_new_connection() {
    let (t, first, second) = fd_closed_and_reused();
    assert_eq!(open_ids(&t), vec![second]);
    let closed: Vec<ConnId> = t.closed_connections().map(|c| c.id).collect();
    assert_eq!(closed, vec![first]);
}

#[test]
fn reused_fd_without_a_seen_close_replaces_the_old_connection() {
    let mut t = tracker();
    let first = id(PID, FD, 1_000);
    let second = id(PID, FD, 5_000);
    t.apply(connect(1_100, first, 0));
    // dup2() over the fd: no close event.
    let out = t.apply(connect(5_100, second, 0));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Closed { id, reason: CloseReason::Replaced, .. } if *id == first
    )));
    assert_eq!(open_ids(&t), vec![second]);
}

#[test]
fn late_events_of_a_replaced_connection_do_not_touch_the_new_one() {
    let (mut t, first, second) = fd_closed_and_reused();
    // A state change of the first socket, delivered late from another CPU.
    let out = t.apply(peer_closed(1_900, first, 1));
    assert_eq!(out, vec![Output::Unmatched]);
    assert_eq!(t.apply(close(2_000, first)), vec![Output::Unmatched]);
    let conn = t.open_connections().next().expect("open");
    assert_eq!((conn.id, conn.state), (second, ConnState::Established));
}

#[test]
fn state_change_before_connect_event() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(established(1_050, c, 40_005));
    t.apply(connect(1_060, c, EINPROGRESS));
    let conn = t.open_connections().next().expect("open");
    assert_eq!(conn.state, ConnState::Established);
    assert_eq!(conn.comm, "app");
    assert_eq!(conn.connect_latency_ns, Some(50));
}

#[test]
fn close_before_connect_event_does_not_resurrect() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(established(1_050, c, 40_006));
    t.apply(close(1_070, c));
    t.apply(connect(1_060, c, 0));
    assert!(open_ids(&t).is_empty());
    let closed = t.closed_connections().next().expect("closed");
    assert_eq!(closed.comm, "app");
}

#[test]
fn exit_closes_all_of_the_process_connections() {
    let mut t = tracker();
    for fd in 3..6 {
        t.apply(connect(
            1_000 + fd as u64,
            id(PID, fd, 1_000 + fd as u64),
            0,
        ));
    }
    t.apply(connect(1_000, id(PID + 1, 3, 999), 0));
    let out = t.apply(exit(9_000, PID));
    let reasons: Vec<CloseReason> = out
        .iter()
        .filter_map(|o| match o {
            Output::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec![CloseReason::ProcessExit; 3]);
    assert_eq!(open_ids(&t), vec![id(PID + 1, 3, 999)]);
    assert_eq!(t.process_name(PID), None);
}

#[test]
fn events_after_the_exit_event_land_in_the_dead_process() {
    let mut t = tracker();
    // The exit was read before a connect that the process made just before it.
    t.apply(exit(9_000, PID));
    t.apply(connect(8_500, id(PID, FD, 8_000), 0));
    assert!(open_ids(&t).is_empty());
    let closed = t.closed_connections().next().expect("closed");
    assert_eq!(closed.close_reason, Some(CloseReason::ProcessExit));
}

#[test]
fn reused_pid_is_a_new_process() {
    let mut t = tracker();
    t.apply(connect(1_100, id(PID, FD, 1_000), 0));
    t.apply(exit(2_000, PID));
    // A new process gets the same pid and the same fd number.
    let mut reborn = connect(5_100, id(PID, FD, 5_000), 0);
    if let EventKind::Connect { comm, .. } = &mut reborn.kind {
        *comm = "other".into();
    }
    t.apply(reborn);
    assert_eq!(open_ids(&t), vec![id(PID, FD, 5_000)]);
    assert_eq!(t.process_name(PID), Some("other"));
    assert_eq!(
        t.open_connections().next().map(|c| c.comm.as_str()),
        Some("other")
    );
    // And the old exit no longer applies to it.
    t.apply(close(6_000, id(PID, FD, 5_000)));
    assert!(open_ids(&t).is_empty());
}

#[test]
fn seeded_connections_close_and_match_peer_close_by_address() {
    let mut t = tracker();
    let seeded = id(PID, FD, 0);
    t.apply(Event {
        ts_ns: 500,
        conn: seeded,
        kind: EventKind::Seeded {
            comm: "psql".into(),
            local: Some(local(41_000)),
            remote: Endpoint::Inet(server()),
            phase: SeededPhase::Established,
        },
    });
    let conn = t.open_connections().next().expect("seeded");
    assert!(conn.seen_at_start);
    // Untracked peer close: pid 0, matched by the address pair.
    let out = t.apply(peer_closed(700, id(0, 0, 0), 41_000));
    assert_eq!(out, vec![Output::PeerClosed { id: seeded }]);
    // The kernel reports the close with generation 0, as the loader seeded it.
    let out = t.apply(close(900, seeded));
    assert!(matches!(
        out[..],
        [Output::Closed {
            seen_at_start: true,
            ..
        }]
    ));
}

#[test]
fn seeding_never_overrides_the_kernel() {
    let mut t = tracker();
    let live = id(PID, FD, 1_000);
    t.apply(connect(1_100, live, 0));
    let out = t.apply(Event {
        ts_ns: 1_200,
        conn: id(PID, FD, 0),
        kind: EventKind::Seeded {
            comm: "x".into(),
            local: None,
            remote: Endpoint::Inet(server()),
            phase: SeededPhase::Established,
        },
    });
    assert_eq!(out, vec![Output::Unmatched]);
    assert_eq!(open_ids(&t), vec![live]);
}

#[test]
fn unix_connect_is_established_at_once() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    let out = t.apply(Event {
        ts_ns: 1_020,
        conn: c,
        kind: EventKind::Connect {
            tid: 7,
            ret: 0,
            remote: Endpoint::Unix("/run/postgresql/.s.PGSQL.5432".into()),
            comm: "psql".into(),
        },
    });
    assert_eq!(outcomes(&out), vec![ConnectOutcome::Ok]);
    let conn = t.open_connections().next().expect("open");
    assert_eq!(conn.state, ConnState::Established);
    assert_eq!(conn.remote.port(), None);
}

#[test]
fn expire_drops_old_closed_connections_and_bounds_them() {
    let mut t = Tracker::new(TrackerConfig {
        closed_retention_ns: 1_000,
        max_closed: 2,
        exit_memory_ns: 1_000,
        ..TrackerConfig::default()
    });
    for fd in 0..5 {
        let c = id(PID, fd, 10);
        t.apply(connect(20, c, 0));
        t.apply(close(100 + fd as u64, c));
    }
    assert_eq!(t.closed_connections().count(), 2);
    t.expire(2_000);
    assert_eq!(t.closed_connections().count(), 0);
}

#[test]
fn seeding_that_raced_a_new_connect_is_not_a_second_connection() {
    let mut t = tracker();
    // The /proc scan (at 2_000) saw a socket whose connect (at 1_000) was
    // still in the ring buffer.
    t.apply(Event {
        ts_ns: 2_000,
        conn: id(PID, FD, 0),
        kind: EventKind::Seeded {
            comm: "app".into(),
            local: None,
            remote: Endpoint::Inet(server()),
            phase: SeededPhase::Established,
        },
    });
    let out = t.apply(connect(1_100, id(PID, FD, 1_000), 0));
    assert!(!out.iter().any(|o| matches!(o, Output::Closed { .. })));
    assert_eq!(open_ids(&t), vec![id(PID, FD, 1_000)]);
    assert_eq!(t.closed_connections().count(), 0);
}

// Pools and indexes: adapter messages, host-wide state changes and the
// listing find their connection by index, and the indexes follow every
// way a connection can leave.

fn adapter(pool: &str, event: AdapterEvent) -> AdapterMessage {
    AdapterMessage {
        pool: pool.into(),
        event,
        mono_ns: None,
        claimed_pid: None,
    }
}

fn by_local(addr: SocketAddr) -> ConnRef {
    ConnRef {
        local: Some(addr),
        fd: None,
        conn: None,
    }
}

/// Acquire `request` ended with `result` on `conn`, the sender's thread not
/// named.
fn acquire_end(request: u64, result: AcquireResult, conn: ConnRef) -> AdapterEvent {
    AdapterEvent::AcquireEnd {
        request,
        result,
        conn,
        tid: None,
        wait_ns: None,
    }
}

/// A distinct local address for each of many connections.
fn nth_local(i: u32) -> SocketAddr {
    let ip = std::net::Ipv4Addr::new(127, 1, (i / 50_000) as u8, 1);
    SocketAddr::new(ip.into(), 10_000 + (i % 50_000) as u16)
}

/// Opens `n` established connections spread over `processes` pids (pid
/// 1000 + i % processes, fd 10 + i / processes), local address `nth_local(i)`.
fn open_many(t: &mut Tracker, n: u32, processes: u32) -> Vec<ConnId> {
    (0..n)
        .map(|i| {
            let c = id(1_000 + i % processes, 10 + (i / processes) as i32, 1_000);
            let mut change = established(1_100, c, 0);
            if let EventKind::SockState { local, .. } = &mut change.kind {
                *local = nth_local(i);
            }
            t.apply(change);
            t.apply(connect(1_200, c, 0));
            c
        })
        .collect()
}

/// CPU time of this thread: what the work costs, whatever else the
/// machine is doing.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Asserts a CPU budget as the agent is built (release, how `cargo xtask
/// test` runs the suite). An unoptimized build gets five times the budget:
/// still far below what a scan per event would cost.
fn assert_cpu_under(what: &str, spent_ns: u64, budget_ns: u64) {
    println!("{what}: {:.3} s of CPU", spent_ns as f64 / 1e9);
    let budget_ns = if cfg!(debug_assertions) {
        println!("(debug build: budget x5; the real one holds with --release)");
        budget_ns * 5
    } else {
        budget_ns
    };
    assert!(
        spent_ns < budget_ns,
        "{what} took {spent_ns} ns of CPU, budget {budget_ns} ns"
    );
}

const MANY: u32 = 100_000;

#[test]
fn adapter_messages_with_100k_open_connections_are_index_lookups() {
    let mut t = tracker();
    let processes = 10;
    let conns = open_many(&mut t, MANY, processes);
    assert_eq!(t.open_count(), MANY as usize);
    let pool = "main";

    let started = thread_cpu_ns();
    let mut messages = 0u32;
    let mut acquired = 0u64;
    let mut released = 0u64;
    let mut last_used_before = HashMap::new();
    // Half of the messages check connections out (start and end, named by
    // local address only, the form that used to scan), half return them.
    let checked_out = (MANY / 4) as usize;
    for (i, c) in conns.iter().take(checked_out).enumerate() {
        let i = i as u32;
        let ts = 10_000 + u64::from(i);
        t.apply_adapter(
            c.pid,
            ts,
            adapter(
                pool,
                AdapterEvent::AcquireStart {
                    request: u64::from(i),
                    tid: None,
                },
            ),
        );
        for o in t.apply_adapter(
            c.pid,
            ts + 1,
            adapter(
                pool,
                acquire_end(u64::from(i), AcquireResult::Ok, by_local(nth_local(i))),
            ),
        ) {
            if let Output::AcquireFinished {
                pid, used_before, ..
            } = o
            {
                acquired += 1;
                last_used_before.insert(pid, used_before);
            }
        }
        messages += 2;
    }
    for (i, c) in conns.iter().take(checked_out).enumerate() {
        let i = i as u32;
        let ts = 200_000 + u64::from(i);
        let out = t.apply_adapter(
            c.pid,
            ts,
            adapter(
                pool,
                AdapterEvent::Release {
                    conn: by_local(nth_local(i)),
                },
            ),
        );
        released += out
            .iter()
            .filter(|o| matches!(o, Output::Released { .. }))
            .count() as u64;
        // And by fd and address together, the adapters' other form.
        t.apply_adapter(
            c.pid,
            ts + 1,
            adapter(
                pool,
                AdapterEvent::ConnectionCreated {
                    conn: ConnRef {
                        local: Some(nth_local(i)),
                        fd: Some(c.fd),
                        conn: None,
                    },
                    tid: None,
                },
            ),
        );
        messages += 2;
    }
    let spent = thread_cpu_ns() - started;

    assert_eq!(messages, MANY);
    assert_eq!(acquired, checked_out as u64);
    assert_eq!(released, checked_out as u64);
    // Each process's last acquire saw all its earlier ones still out.
    let per_process = checked_out as u64 / u64::from(processes);
    assert!(
        last_used_before.values().all(|&u| u == per_process - 1),
        "{last_used_before:?}"
    );
    let views = t.pool_views();
    assert_eq!(views.len(), processes as usize);
    assert!(views.iter().all(|v| v.used == 0 && v.from_adapter));
    assert_cpu_under(
        "100k adapter messages, 100k open connections",
        spent,
        1_000_000_000,
    );
}

#[test]
fn host_wide_close_wait_with_100k_open_connections_is_an_index_lookup() {
    let mut t = tracker();
    let conns = open_many(&mut t, MANY, 100);
    let started = thread_cpu_ns();
    let mut peer_closed = 0;
    for i in 0..MANY {
        // The kernel did not see these sockets connect: pid 0, matched by
        // the address pair.
        let mut change = state(
            5_000,
            id(0, 0, 0),
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            0,
        );
        if let EventKind::SockState { local, .. } = &mut change.kind {
            *local = nth_local(i);
        }
        let out = t.apply(change);
        assert_eq!(
            out,
            vec![Output::PeerClosed {
                id: conns[i as usize]
            }]
        );
        peer_closed += 1;
    }
    let spent = thread_cpu_ns() - started;
    assert_eq!(peer_closed, MANY);
    assert!(t
        .open_connections()
        .all(|c| c.state == ConnState::PeerClosed));
    assert_cpu_under(
        "100k host-wide CLOSE_WAIT, 100k open connections",
        spent,
        1_000_000_000,
    );
}

#[test]
fn state_changes_with_a_long_closed_list_are_index_lookups() {
    let mut t = Tracker::new(TrackerConfig {
        max_closed: MANY as usize,
        ..TrackerConfig::default()
    });
    for c in open_many(&mut t, MANY, 100) {
        t.apply(close(2_000, c));
    }
    assert_eq!(t.closed_count(), MANY as usize);
    // New connections on the same fds: every state change asks whether its
    // connection already closed.
    let started = thread_cpu_ns();
    for i in 0..MANY {
        let c = id(1_000 + i % 100, 10 + (i / 100) as i32, 3_000);
        let out = t.apply(established(3_100, c, 40_000));
        assert_eq!(outcomes(&out), vec![ConnectOutcome::Ok]);
    }
    let spent = thread_cpu_ns() - started;
    assert_eq!(t.open_count(), MANY as usize);
    assert_cpu_under(
        "100k state changes, 100k closed connections",
        spent,
        1_000_000_000,
    );
}

#[test]
fn pool_use_follows_connections_that_leave_while_checked_out() {
    let mut t = tracker();
    let a = id(PID, 5, 1_000);
    let b = id(PID, 6, 1_000);
    for (c, port) in [(a, 41_001), (b, 41_002)] {
        t.apply(established(1_100, c, port));
    }
    let acquire = |t: &mut Tracker, request: u64, ts: u64, conn: ConnRef| -> u64 {
        t.apply_adapter(
            PID,
            ts,
            adapter("p", AdapterEvent::AcquireStart { request, tid: None }),
        );
        t.apply_adapter(
            PID,
            ts + 1,
            adapter("p", acquire_end(request, AcquireResult::Ok, conn)),
        )
        .iter()
        .find_map(|o| match o {
            Output::AcquireFinished { used_before, .. } => Some(*used_before),
            _ => None,
        })
        .expect("acquire finished")
    };
    assert_eq!(acquire(&mut t, 1, 2_000, by_local(local(41_001))), 0);
    assert_eq!(acquire(&mut t, 2, 2_010, by_local(local(41_002))), 1);
    // Closed while checked out: no longer in use.
    t.apply(close(2_100, a));
    let view = t.pool_views().into_iter().next().expect("pool");
    assert_eq!((view.used, view.idle), (1, 0));
    // A state change re-places the other; it stays checked out.
    t.apply(peer_closed(2_200, b, 41_002));
    let c = id(PID, 7, 2_300);
    t.apply(established(2_350, c, 41_003));
    assert_eq!(acquire(&mut t, 3, 2_400, by_local(local(41_003))), 1);
    // The old socket's address names nothing now.
    t.apply_adapter(
        PID,
        2_500,
        adapter(
            "p",
            AdapterEvent::Release {
                conn: by_local(local(41_001)),
            },
        ),
    );
    assert_eq!(t.pool_views()[0].used, 2);
    // Exit takes them all.
    t.apply(exit(3_000, PID));
    assert!(t.pool_views().is_empty());
    t.apply(established(3_100, id(PID, 5, 3_050), 41_004));
    assert_eq!(acquire(&mut t, 4, 3_200, by_local(local(41_004))), 0);
}

#[test]
fn adapter_event_before_its_connection_waits_for_it() {
    let mut t = tracker();
    t.apply_adapter(
        PID,
        1_000,
        adapter(
            "p",
            acquire_end(1, AcquireResult::Ok, by_local(local(42_000))),
        ),
    );
    // Another process's connection does not retry it.
    t.apply(established(1_010, id(PID + 1, 3, 900), 42_000));
    assert_eq!(t.pool_views().iter().filter(|v| v.used > 0).count(), 0);
    t.apply(established(1_020, id(PID, 3, 900), 42_000));
    let used: Vec<(u32, u64)> = t.pool_views().iter().map(|v| (v.pid, v.used)).collect();
    assert_eq!(used, vec![(PID, 1)]);
}

fn acquired(t: &mut Tracker, ts: u64, request: u64, port: u16) {
    t.apply_adapter(
        PID,
        ts,
        adapter("p", AdapterEvent::AcquireStart { request, tid: None }),
    );
    t.apply_adapter(
        PID,
        ts + 1,
        adapter(
            "p",
            acquire_end(request, AcquireResult::Ok, by_local(local(port))),
        ),
    );
}

fn released(t: &mut Tracker, ts: u64, port: u16) {
    t.apply_adapter(
        PID,
        ts,
        adapter(
            "p",
            AdapterEvent::Release {
                conn: by_local(local(port)),
            },
        ),
    );
}

fn waiter_starts(t: &mut Tracker, ts: u64) {
    t.apply_adapter(
        PID,
        ts,
        adapter(
            "p",
            AdapterEvent::AcquireStart {
                request: 99,
                tid: None,
            },
        ),
    );
}

/// The waiter times out: what it was told the pool had in use.
fn waiter_gives_up(t: &mut Tracker, ts: u64) -> Vec<u64> {
    t.apply_adapter(
        PID,
        ts,
        adapter(
            "p",
            acquire_end(99, AcquireResult::Timeout, ConnRef::default()),
        ),
    )
    .into_iter()
    .filter_map(|o| match o {
        Output::AcquireFinished { used_before, .. } => Some(used_before),
        _ => None,
    })
    .collect()
}

/// A checkout whose new connection the kernel has not shown yet is in use
/// all the same: a waiter that starts meanwhile sees the pool as full
/// (it used to see one fewer, and report a slow acquire on a pool that
/// was not full).
#[test]
fn a_waiter_counts_checkouts_that_wait_for_their_connection() {
    let mut t = tracker();
    t.apply(established(1_000, id(PID, 3, 903), 42_000));
    acquired(&mut t, 1_010, 1, 42_000);
    // The kernel has not shown this one yet.
    acquired(&mut t, 1_020, 2, 42_001);
    waiter_starts(&mut t, 1_030);
    // Now it has, and the first one comes back before the waiter gives up.
    t.apply(established(1_040, id(PID, 4, 904), 42_001));
    released(&mut t, 1_050, 42_000);
    assert_eq!(
        waiter_gives_up(&mut t, 5_000),
        vec![2],
        "both were out when the waiter came"
    );

    // A return that waits likewise takes its checkout back off the count.
    let mut t = tracker();
    acquired(&mut t, 1_000, 1, 42_000);
    acquired(&mut t, 1_010, 2, 42_001);
    released(&mut t, 1_020, 42_000);
    waiter_starts(&mut t, 1_030);
    assert_eq!(waiter_gives_up(&mut t, 5_000), vec![1]);
}

#[test]
fn listing_is_in_id_order_from_a_cursor_each_id_once() {
    let mut t = tracker();
    let ids = [
        id(PID + 1, 3, 1_000),
        id(PID, 7, 1_000),
        id(PID, 4, 2_000),
        id(PID, 4, 500),
        id(PID + 2, 1, 1_000),
    ];
    t.apply(connect(600, ids[3], 0));
    t.apply(close(700, ids[3]));
    for c in [ids[0], ids[1], ids[2], ids[4]] {
        t.apply(connect(c.generation + 100, c, 0));
    }
    t.apply(close(3_000, ids[4]));
    let all: Vec<ConnId> = t.connections_from(Bound::Unbounded).map(|c| c.id).collect();
    let mut sorted = ids.to_vec();
    sorted.sort();
    assert_eq!(all, sorted);
    // A page boundary between two connections of one fd.
    let after: Vec<ConnId> = t
        .connections_from(Bound::Excluded(id(PID, 4, 500)))
        .map(|c| c.id)
        .collect();
    assert_eq!(after, sorted[1..].to_vec());
    // One process.
    let of_pid: Vec<ConnId> = t
        .connections_from(Bound::Included(id(PID + 1, i32::MIN, 0)))
        .take_while(|c| c.id.pid == PID + 1)
        .map(|c| c.id)
        .collect();
    assert_eq!(of_pid, vec![ids[0]]);
    assert_eq!(
        t.connections_from(Bound::Unbounded).count(),
        t.open_count() + t.closed_count()
    );
}

#[test]
fn closed_index_survives_the_bound_on_closed_connections() {
    let mut t = Tracker::new(TrackerConfig {
        max_closed: 3,
        ..TrackerConfig::default()
    });
    let ids: Vec<ConnId> = (0..10).map(|fd| id(PID, fd, 1_000)).collect();
    for &c in &ids {
        t.apply(connect(1_100, c, 0));
        t.apply(close(2_000, c));
    }
    for (n, &c) in ids.iter().enumerate() {
        assert_eq!(t.connection(c).is_some(), n >= 7, "{c:?}");
    }
    let listed: Vec<ConnId> = t.connections_from(Bound::Unbounded).map(|c| c.id).collect();
    assert_eq!(listed, ids[7..].to_vec());
    // A late connect of a kept one completes it in place.
    let mut late = connect(1_050, ids[8], 0);
    if let EventKind::Connect { tid, .. } = &mut late.kind {
        *tid = 77;
    }
    t.apply(late);
    assert_eq!(t.connection(ids[8]).map(|c| c.tid), Some(Some(77)));
    assert_eq!(t.closed_count(), 3);
}

fn data(ts: u64, conn: ConnId, sent: bool, bytes: &[u8]) -> Event {
    Event {
        ts_ns: ts,
        conn,
        kind: EventKind::Data {
            sent,
            enter_ns: ts,
            total_len: bytes.len() as u32,
            head: bytes.to_vec(),
            tail: Vec::new(),
            tls_plaintext: false,
        },
    }
}

fn pg_msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend(((body.len() + 4) as u32).to_be_bytes());
    v.extend(body);
    v
}

/// Issue 9: pg_stat_activity says `idle` for a connection that only did its
/// start-up, and `active` while rows of a long query stream back.
#[test]
fn postgres_transaction_status_from_start_up_and_request_until_its_end() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_000, c, 0));
    let mut startup = Vec::new();
    let params = b"\x00\x03\x00\x00user\x00app\x00\x00";
    startup.extend(((params.len() + 4) as u32).to_be_bytes());
    startup.extend(params);
    t.apply(data(2_000, c, true, &startup));
    let mut ok = pg_msg(b'R', &[0, 0, 0, 0]);
    ok.extend(pg_msg(b'Z', b"I"));
    t.apply(data(3_000, c, false, &ok));
    let conn = t.connection(c).expect("open");
    assert_eq!(conn.tx_state, Some(TxState::Idle), "{conn:?}");
    assert!(!conn.awaiting_response, "{conn:?}");
    assert_eq!(conn.round_trips, 0, "start-up is no round trip");

    t.apply(data(4_000, c, true, &pg_msg(b'Q', b"SELECT 1\x00")));
    assert!(t.connection(c).expect("open").awaiting_response);
    let mut rows = pg_msg(b'T', &[0, 0]);
    rows.extend(pg_msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']));
    t.apply(data(5_000, c, false, &rows));
    let conn = t.connection(c).expect("open");
    assert!(conn.awaiting_response, "rows still come: {conn:?}");
    let mut end = pg_msg(b'C', b"SELECT 1\x00");
    end.extend(pg_msg(b'Z', b"T"));
    t.apply(data(6_000, c, false, &end));
    let conn = t.connection(c).expect("open");
    assert!(!conn.awaiting_response, "{conn:?}");
    assert_eq!(conn.tx_state, Some(TxState::InTransaction));
    assert_eq!(conn.round_trips, 1);
}

// Fair shares: any local process may send adapter messages, so each bound
// is per sender and global, and one sender's flood never pushes out another.

fn refused(out: &[Output]) -> Option<&'static str> {
    out.iter().find_map(|o| match o {
        Output::AdapterRefused { reason } => Some(*reason),
        _ => None,
    })
}

fn pool_names_of(t: &Tracker, pid: u32) -> Vec<String> {
    let mut names: Vec<String> = t
        .pools()
        .filter(|p| p.pid == pid)
        .map(|p| p.name.clone())
        .collect();
    names.sort();
    names
}

#[test]
fn a_pool_flood_never_leaves_a_legitimate_process_without_its_pool() {
    let mut t = Tracker::new(TrackerConfig {
        max_pools: 256,
        ..TrackerConfig::default()
    });
    let register = |name: &str| adapter(name, AdapterEvent::Register(Default::default()));
    // 200 processes try 64 pools each: each gets its own 64 at most, and
    // together they stop at the global bound.
    for pid in 10_000..10_200 {
        for n in 0..70 {
            let out = t.apply_adapter(pid, 1, register(&format!("p{n}")));
            if n >= 64 {
                assert_eq!(refused(&out), Some("pool_limit"));
            }
        }
    }
    assert_eq!(t.pools().count(), 256);
    // Shares even out: nobody keeps more than two more than another.
    let mut per: HashMap<u32, usize> = HashMap::new();
    for p in t.pools() {
        *per.entry(p.pid).or_default() += 1;
    }
    let (min, max) = (
        per.values().min().copied().unwrap_or(0),
        per.values().max().copied().unwrap_or(0),
    );
    assert!(max <= 2, "shares {min}..{max}");
    // A legitimate process still registers its pool, taken from the
    // heaviest holder, and keeps it whatever comes after.
    let out = t.apply_adapter(42, 2, register("orders"));
    assert_eq!(refused(&out), None);
    assert_eq!(pool_names_of(&t, 42), vec!["orders".to_string()]);
    for pid in 20_000..20_500 {
        t.apply_adapter(pid, 3, register("more"));
    }
    assert_eq!(pool_names_of(&t, 42), vec!["orders".to_string()]);
    assert_eq!(t.pools().count(), 256);
}

#[test]
fn waiting_acquires_are_bounded_per_process_and_shared_fairly() {
    let mut t = Tracker::new(TrackerConfig::default());
    let start = |request| AdapterEvent::AcquireStart { request, tid: None };
    let mut refusals = 0;
    for request in 0..10_050 {
        if refused(&t.apply_adapter(7, 1, adapter("p", start(request)))).is_some() {
            refusals += 1;
        }
    }
    assert_eq!(refusals, 50, "10,000 waiting per process");
    // Ten more flooders fill the global bound of 100,000...
    for pid in 100..110 {
        for request in 0..10_000 {
            t.apply_adapter(pid, 2, adapter("p", start(request)));
        }
    }
    assert_eq!(t.pending_total, 100_000);
    // ...each ending with an even share, taken from the heaviest.
    let shares: Vec<usize> = t.pending_per_pid.values().copied().collect();
    assert!(
        shares.iter().all(|n| (9_090..=9_092).contains(n)),
        "{shares:?}"
    );
    // A quiet process's acquire still waits, at a flooder's expense.
    let out = t.apply_adapter(42, 3, adapter("orders", start(1)));
    assert_eq!(refused(&out), None);
    assert_eq!(t.pending_total, 100_000);
    let out = t.apply_adapter(
        42,
        5_000_000_003,
        adapter(
            "orders",
            acquire_end(1, AcquireResult::Timeout, ConnRef::default()),
        ),
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Output::AcquireFinished {
            pid: 42,
            wait_ns: 5_000_000_000,
            ..
        }
    )));
    // A process that exits gives its share back.
    let share = t.pending_per_pid[&7];
    t.apply(Event {
        ts_ns: 10,
        conn: ConnId {
            pid: 7,
            fd: -1,
            generation: 0,
        },
        kind: EventKind::ProcessExit { comm: "x".into() },
    });
    assert_eq!(t.pending_total, 100_000 - 1 - share);
    let counted: usize = t.pools().map(|p| p.pending_count()).sum();
    assert_eq!(counted, t.pending_total);
    assert!(!t.pending_per_pid.contains_key(&7));
}

#[test]
fn a_checkout_message_is_its_acquire_end_and_its_release() {
    let mut t = Tracker::new(TrackerConfig::default());
    let conns = open_many(&mut t, 1, 1);
    let c = conns[0];
    let conn = by_local(nth_local(0));
    let out = t.apply_adapter(
        c.pid,
        50_000,
        adapter(
            "p",
            AdapterEvent::Checkout {
                request: 1,
                conn,
                tid: Some(7),
                wait_ns: Some(300),
                use_ns: 20_000,
            },
        ),
    );
    let finished: Vec<(u64, Option<u32>)> = out
        .iter()
        .filter_map(|o| match o {
            Output::AcquireFinished { wait_ns, tid, .. } => Some((*wait_ns, *tid)),
            _ => None,
        })
        .collect();
    assert_eq!(finished, vec![(300, Some(7))]);
    let used: Vec<u64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Released { use_ns, .. } => Some(*use_ns),
            _ => None,
        })
        .collect();
    assert_eq!(used, vec![20_000], "held from 30,000 to 50,000");
    let pool = t.pools().find(|p| p.name == "p").expect("pool");
    assert_eq!((pool.acquires, pool.releases), (1, 1));
    let tracked = t.connection(c).expect("connection");
    assert_eq!(tracked.pool.as_deref(), Some("p"));
    assert_eq!(tracked.checked_out_at_ns, None, "back in the pool");
    // A use longer than the agent trusts an adapter's times for is cut.
    let out = t.apply_adapter(
        c.pid,
        900_000_000_000,
        adapter(
            "p",
            AdapterEvent::Checkout {
                request: 2,
                conn,
                tid: None,
                wait_ns: None,
                use_ns: u64::MAX,
            },
        ),
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Released {
            use_ns: 600_000_000_000,
            ..
        }
    )));
}

#[test]
fn folded_checkouts_are_each_counted_and_timed_and_leave_the_connection_idle() {
    let mut t = Tracker::new(TrackerConfig::default());
    let conns = open_many(&mut t, 2, 1);
    let (c, other) = (conns[0], conns[1]);
    let conn = by_local(nth_local(0));
    // The other connection is out: the folded acquires saw one in use.
    t.apply_adapter(
        other.pid,
        10_000,
        adapter(
            "p",
            acquire_end(9, AcquireResult::Ok, by_local(nth_local(1))),
        ),
    );
    let out = t.apply_adapter(
        c.pid,
        50_000,
        adapter(
            "p",
            AdapterEvent::Checkouts(Folded {
                conn,
                tid: Some(7),
                waits_ns: vec![300, 0, u64::MAX],
                uses_ns: vec![20_000, 5, 1_000],
            }),
        ),
    );
    let folded: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::CheckoutsFolded {
                waits_ns,
                uses_ns,
                used_before,
                pending_before,
                tid,
                ..
            } => Some((
                waits_ns.clone(),
                uses_ns.clone(),
                *used_before,
                *pending_before,
                *tid,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        folded,
        vec![(
            vec![300, 0, 600_000_000_000],
            vec![20_000, 5, 1_000],
            1,
            0,
            Some(7)
        )],
        "each wait and use (a claim past what is trusted cut), the pool as it is, in one output"
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::AcquireFinished { .. } | Output::Released { .. })),
        "nothing per checkout"
    );
    let pool = t.pools().find(|p| p.name == "p").expect("pool");
    assert_eq!((pool.acquires, pool.releases), (4, 3));
    let tracked = t.connection(c).expect("connection");
    assert_eq!(tracked.pool.as_deref(), Some("p"));
    assert_eq!(tracked.checked_out_at_ns, None, "back in the pool");
    assert_eq!(tracked.released_at_ns, Some(50_000));
    let other = t.connection(other).expect("the other connection");
    assert!(other.checked_out_at_ns.is_some(), "still out");
}

#[test]
fn an_acquire_end_without_its_start_carries_its_own_wait() {
    let mut t = Tracker::new(TrackerConfig::default());
    let end = |request, wait_ns| AdapterEvent::AcquireEnd {
        request,
        result: AcquireResult::Timeout,
        conn: ConnRef::default(),
        tid: Some(9),
        wait_ns,
    };
    let finished = |out: &[Output]| -> Vec<(u64, Option<u32>)> {
        out.iter()
            .filter_map(|o| match o {
                Output::AcquireFinished { wait_ns, tid, .. } => Some((*wait_ns, *tid)),
                _ => None,
            })
            .collect()
    };
    // Folded: the wait is the adapter's.
    let out = t.apply_adapter(7, 1_000, adapter("p", end(1, Some(5_200))));
    assert_eq!(finished(&out), vec![(5_200, Some(9))]);
    // A claim longer than the agent trusts an adapter's times for is cut.
    let out = t.apply_adapter(7, 2_000, adapter("p", end(2, Some(u64::MAX))));
    assert_eq!(finished(&out), vec![(600_000_000_000, Some(9))]);
    // With its start kept, the agent's own measure wins over the claim.
    t.apply_adapter(
        7,
        3_000,
        adapter(
            "p",
            AdapterEvent::AcquireStart {
                request: 3,
                tid: None,
            },
        ),
    );
    let out = t.apply_adapter(7, 10_000, adapter("p", end(3, Some(1))));
    assert_eq!(finished(&out), vec![(7_000, Some(9))]);
    // Neither: counted, but no wait to observe.
    let out = t.apply_adapter(7, 11_000, adapter("p", end(4, None)));
    assert_eq!(finished(&out), vec![]);
    let pool = t.pools().find(|p| p.name == "p").expect("pool");
    assert_eq!(pool.timeouts, 4);
}

#[test]
fn early_events_are_shared_per_process() {
    let mut t = Tracker::new(TrackerConfig::default());
    let release = |fd| AdapterEvent::Release {
        conn: ConnRef {
            local: None,
            fd: Some(fd),
            conn: None,
        },
    };
    // A flooder names connections that do not exist: its share is 128.
    let refusals = (0..1_000)
        .filter(|fd| refused(&t.apply_adapter(666, 1, adapter("p", release(*fd)))).is_some())
        .count();
    assert_eq!(refusals, 1_000 - 128);
    // A legitimate process's early release waits for its connection and is
    // applied when the kernel shows it.
    t.apply_adapter(
        PID,
        1_050,
        adapter(
            "p",
            acquire_end(
                1,
                AcquireResult::Ok,
                ConnRef {
                    local: None,
                    fd: Some(FD),
                    conn: None,
                },
            ),
        ),
    );
    t.apply(connect(1_000, id(PID, FD, 1_000), 0));
    let conn = t
        .open_connections()
        .find(|c| c.id.pid == PID)
        .expect("conn");
    assert_eq!(conn.pool.as_deref(), Some("p"));
    assert_eq!(conn.checked_out_at_ns, Some(1_050));
}

#[test]
fn adapter_times_are_never_before_the_sender_started_nor_far_back() {
    const S: u64 = 1_000_000_000;
    let mut t = Tracker::new(TrackerConfig::default());
    let now = 10_000 * S;
    t.set_placement(
        7,
        crate::procfs::Placement {
            process_started_ns: Some(now - 100 * S),
            ..Default::default()
        },
    );
    // Plausible claims are believed.
    assert_eq!(t.adapter_time(7, Some(now - 5 * S), now), now - 5 * S);
    // Older than the sender itself: its start.
    assert_eq!(t.adapter_time(7, Some(now - 500 * S), now), now - 100 * S);
    // Far back or in the future: the time of receipt.
    assert_eq!(t.adapter_time(7, Some(now - 700 * S), now), now);
    assert_eq!(t.adapter_time(7, Some(now + 5 * S), now), now);
    assert_eq!(t.adapter_time(7, None, now), now);
    // A sender whose start is unknown is bounded by the 10 minutes only.
    assert_eq!(t.adapter_time(8, Some(now - 500 * S), now), now - 500 * S);
}

#[test]
fn datagrams_read_after_their_sender_exited_leave_nothing_behind() {
    const S: u64 = 1_000_000_000;
    let mut t = Tracker::new(TrackerConfig::default());
    let register = |name: &str| adapter(name, AdapterEvent::Register(Default::default()));
    let placed = |started: Option<u64>| crate::procfs::Placement {
        process_started_ns: started,
        ..Default::default()
    };
    t.set_placement(7, placed(Some(S)));
    assert_eq!(
        refused(&t.apply_adapter(7, 2 * S, register("orders"))),
        None
    );
    t.apply(exit(3 * S, 7));
    assert_eq!(t.pools().count(), 0);
    // Still queued in the socket when the process exited: the pipeline asks
    // /proc again and finds nothing.
    t.set_placement(7, placed(None));
    let out = t.apply_adapter(7, 4 * S, register("orders"));
    assert_eq!(refused(&out), Some("sender_exited"));
    assert_eq!(t.pools().count(), 0);
    assert!(!t.knows_placement(7), "a dead sender's placement stays");
    // A new process that took the pid is believed.
    t.set_placement(7, placed(Some(5 * S)));
    assert_eq!(
        refused(&t.apply_adapter(7, 6 * S, register("orders"))),
        None
    );
    assert_eq!(pool_names_of(&t, 7), vec!["orders".to_string()]);
}

// ---- Issue 16: TLS connections whose library gives the plaintext ----

fn tls_data(ts: u64, conn: ConnId, sent: bool, bytes: &[u8]) -> Event {
    let mut event = data(ts, conn, sent, bytes);
    if let EventKind::Data { tls_plaintext, .. } = &mut event.kind {
        *tls_plaintext = true;
    }
    event
}

/// A TLS record of `kind` (22 handshake, 23 application data).
fn tls_record(kind: u8) -> Vec<u8> {
    vec![kind, 3, 3, 0, 4, 1, 2, 3, 4]
}

fn round_trip_queries(outputs: &[Output]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::RoundTrip { trip, .. } => trip.query.as_ref().map(|q| q.text()),
            _ => None,
        })
        .collect()
}

fn encrypted_outputs(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .filter(|o| matches!(o, Output::Encrypted { .. }))
        .count()
}

#[test]
fn postgres_over_tls_is_parsed_from_the_librarys_plaintext() {
    use crate::protocol::testutil::*;
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    let mut out = t.apply(connect(1_000, c, 0));
    out.extend(t.apply(data(2_000, c, true, &pg_ssl_request())));
    out.extend(t.apply(data(3_000, c, false, b"S")));
    out.extend(t.apply(data(4_000, c, true, &tls_record(22))));
    out.extend(t.apply(data(5_000, c, false, &tls_record(22))));
    assert_eq!(
        encrypted_outputs(&out),
        1,
        "the handshake: encrypted, nothing read"
    );
    let conn = t.connection(c).expect("open");
    assert!(conn.encrypted && !conn.plaintext);
    // The library's first plaintext is the startup message.
    out.extend(t.apply(tls_data(6_000, c, true, &pg_startup("app", Some("shop")))));
    out.extend(t.apply(tls_data(7_000, c, false, &pg_startup_ok())));
    // Ciphertext that still comes (a record the kernel copied before it
    // knew) is not parsed.
    out.extend(t.apply(data(7_500, c, true, &tls_record(23))));
    out.extend(t.apply(tls_data(8_000, c, true, &pg_query("BEGIN"))));
    let mut reply = pg_complete("BEGIN");
    reply.extend(pg_ready(b'T'));
    out.extend(t.apply(tls_data(9_000, c, false, &reply)));
    out.extend(t.apply(tls_data(
        10_000,
        c,
        true,
        &pg_query("SELECT * FROM t WHERE secret = 'x'"),
    )));
    let mut reply = pg_complete("SELECT 1");
    reply.extend(pg_ready(b'T'));
    out.extend(t.apply(tls_data(11_000, c, false, &reply)));
    let conn = t.connection(c).expect("open");
    assert!(conn.encrypted && conn.plaintext);
    assert_eq!(conn.namespace.as_deref(), Some("shop"));
    assert_eq!(conn.db_user.as_deref(), Some("app"));
    assert_eq!(conn.tx_state, Some(TxState::InTransaction));
    assert_eq!(
        round_trip_queries(&out),
        vec!["BEGIN", "SELECT * FROM t WHERE secret = ?"],
        "sanitized as on plaintext"
    );
    assert_eq!(encrypted_outputs(&out), 1);
}

#[test]
fn a_library_hooked_mid_session_gives_the_statements_from_then_on() {
    use crate::protocol::testutil::*;
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_000, c, 0));
    t.apply(data(2_000, c, true, &pg_ssl_request()));
    t.apply(data(3_000, c, false, b"S"));
    for ts in [4_000, 6_000] {
        t.apply(data(ts, c, true, &tls_record(23)));
        t.apply(data(ts + 1_000, c, false, &tls_record(23)));
    }
    // The startup went by encrypted; the first plaintext is a query.
    let mut out = t.apply(tls_data(8_000, c, true, &pg_query("SELECT 1")));
    let mut reply = pg_complete("SELECT 1");
    reply.extend(pg_ready(b'I'));
    out.extend(t.apply(tls_data(9_000, c, false, &reply)));
    assert_eq!(round_trip_queries(&out), vec!["SELECT ?"]);
    let conn = t.connection(c).expect("open");
    assert!(conn.encrypted && conn.plaintext);
    assert_eq!(conn.db_system, Some(DbSystem::Postgresql));
}

#[test]
fn mysql_over_tls_goes_on_with_the_handshake_response() {
    use crate::protocol::testutil::*;
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_000, c, 0));
    t.apply(data(2_000, c, false, &my_greeting()));
    t.apply(data(3_000, c, true, &my_ssl_request(MY_CAPS)));
    t.apply(data(4_000, c, true, &tls_record(22)));
    t.apply(data(5_000, c, false, &tls_record(22)));
    let mut response = my_handshake_response(MY_CAPS | 0x0800, "app", Some("shop"));
    response[3] = 2; // the packet after the SSLRequest
    let mut out = t.apply(tls_data(6_000, c, true, &response));
    out.extend(t.apply(tls_data(7_000, c, false, &my_ok(3, 0, 0))));
    out.extend(t.apply(tls_data(
        8_000,
        c,
        true,
        &my_packet(0, &my_query("SELECT 42")),
    )));
    out.extend(t.apply(tls_data(9_000, c, false, &my_result_set(&["42"], true, 0))));
    let conn = t.connection(c).expect("open");
    assert!(conn.encrypted && conn.plaintext);
    assert_eq!(conn.db_user.as_deref(), Some("app"));
    assert_eq!(conn.namespace.as_deref(), Some("shop"));
    assert_eq!(round_trip_queries(&out), vec!["SELECT ?"]);
}

#[test]
fn redis_direct_tls_is_detected_again_from_the_plaintext() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_000, c, 0));
    t.apply(data(2_000, c, true, &tls_record(22)));
    t.apply(data(3_000, c, false, &tls_record(22)));
    let mut out = t.apply(tls_data(4_000, c, true, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
    out.extend(t.apply(tls_data(5_000, c, false, b"$1\r\nv\r\n")));
    let conn = t.connection(c).expect("open");
    assert_eq!(conn.db_system, Some(DbSystem::Redis));
    assert!(conn.encrypted && conn.plaintext);
    let trips = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                Output::RoundTrip {
                    system: DbSystem::Redis,
                    ..
                }
            )
        })
        .count();
    assert_eq!(trips, 1);
}

/// A peer's hang-up can reach the agent before the last bytes the client
/// moved (a TLS library's plaintext is reported when its call returns,
/// after the server may have answered and closed): the connection keeps
/// its parser, so the request in flight still completes, and a TLS
/// connection stays encrypted.
#[test]
fn a_hang_up_before_the_last_bytes_keeps_the_parser() {
    use crate::protocol::testutil::*;
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_000, c, 0));
    t.apply(data(2_000, c, true, &pg_ssl_request()));
    t.apply(data(3_000, c, false, b"S"));
    t.apply(tls_data(4_000, c, true, &pg_startup("app", Some("shop"))));
    t.apply(tls_data(5_000, c, false, &pg_startup_ok()));
    let mut out = t.apply(tls_data(6_000, c, true, &pg_query("SELECT 1")));
    out.extend(t.apply(state(
        6_500,
        c,
        tcp_state::ESTABLISHED,
        tcp_state::CLOSE_WAIT,
        40_000,
    )));
    let mut reply = pg_complete("SELECT 1");
    reply.extend(pg_ready(b'I'));
    out.extend(t.apply(tls_data(7_000, c, false, &reply)));
    out.extend(t.apply(tls_data(8_000, c, true, &pg_msg(b'X', &[]))));
    assert_eq!(round_trip_queries(&out), vec!["SELECT ?"]);
    let conn = t.connection(c).expect("still listed");
    assert!(conn.encrypted && conn.plaintext, "{conn:?}");
    assert_eq!(conn.namespace.as_deref(), Some("shop"));
}
