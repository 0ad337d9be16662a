//! Scenarios for the tracker: each is a sequence of events as the kernel may
//! deliver them, and what the tracker must conclude.

use super::*;
use agent_common::{tcp_state, EINPROGRESS};

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

#[test]
fn blocking_connect_then_close() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    assert!(
        t.apply(state(
            1_400,
            c,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            40_000
        ))
        .len()
            == 1
    );
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
    let out = t.apply(state(
        3_000,
        c,
        tcp_state::SYN_SENT,
        tcp_state::ESTABLISHED,
        40_001,
    ));
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
    let mut late = state(
        1_100,
        blocking,
        tcp_state::SYN_SENT,
        tcp_state::CLOSE,
        40_002,
    );
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
    let out = t.apply(state(
        9_000,
        c,
        tcp_state::SYN_SENT,
        tcp_state::CLOSE,
        40_003,
    ));
    assert_eq!(outcomes(&out), vec![ConnectOutcome::TimedOut]);
}

#[test]
fn peer_close_is_reported_once_and_kept_open() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(connect(1_100, c, 0));
    let out = t.apply(state(
        5_000,
        c,
        tcp_state::ESTABLISHED,
        tcp_state::CLOSE_WAIT,
        40_004,
    ));
    assert_eq!(out, vec![Output::PeerClosed { id: c }]);
    assert!(t
        .apply(state(
            5_001,
            c,
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            40_004
        ))
        .is_empty());
    let conn = t
        .open_connections()
        .next()
        .expect("still open: the fd was never closed");
    assert_eq!(conn.state, ConnState::PeerClosed);
    assert_eq!(conn.peer_closed_at_ns, Some(5_000));
}

#[test]
fn reused_fd_is_a_new_connection() {
    let mut t = tracker();
    let first = id(PID, FD, 1_000);
    let second = id(PID, FD, 5_000);
    t.apply(connect(1_100, first, 0));
    t.apply(close(2_000, first));
    t.apply(connect(5_100, second, 0));
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
    let mut t = tracker();
    let first = id(PID, FD, 1_000);
    let second = id(PID, FD, 5_000);
    t.apply(connect(1_100, first, 0));
    t.apply(close(2_000, first));
    t.apply(connect(5_100, second, 0));
    // A state change of the first socket, delivered late from another CPU.
    let out = t.apply(state(
        1_900,
        first,
        tcp_state::ESTABLISHED,
        tcp_state::CLOSE_WAIT,
        1,
    ));
    assert_eq!(out, vec![Output::Unmatched]);
    assert_eq!(t.apply(close(2_000, first)), vec![Output::Unmatched]);
    let conn = t.open_connections().next().expect("open");
    assert_eq!((conn.id, conn.state), (second, ConnState::Established));
}

#[test]
fn state_change_before_connect_event() {
    let mut t = tracker();
    let c = id(PID, FD, 1_000);
    t.apply(state(
        1_050,
        c,
        tcp_state::SYN_SENT,
        tcp_state::ESTABLISHED,
        40_005,
    ));
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
    t.apply(state(
        1_050,
        c,
        tcp_state::SYN_SENT,
        tcp_state::ESTABLISHED,
        40_006,
    ));
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
    let out = t.apply(state(
        700,
        id(0, 0, 0),
        tcp_state::ESTABLISHED,
        tcp_state::CLOSE_WAIT,
        41_000,
    ));
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
        raw_queries: false,
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
