//! Scenarios for tying a connection an adapter names by id alone to its
//! socket from the kernel's connects (`binding`): each says which socket
//! the evidence leaves, and above all where it must leave none.

use super::{
    named_tests::{message, named},
    *,
};
use crate::{
    adapter::message::{AcquireResult, AdapterEvent, ConnRef, PoolInfo},
    detect::{self, LeakKind, Thresholds},
    procfs::Placement,
    protocol::{DbSystem, SystemName},
};
use agent_common::tcp_state;

const PID: u32 = 500;
const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const T0: u64 = 1_000 * S;
const POOL: &str = "hidden";

fn server() -> SocketAddr {
    "127.0.0.1:5432".parse().expect("addr")
}

fn tracker_for(pid: u32) -> Tracker {
    let mut t = Tracker::new(TrackerConfig::default());
    let placement = Placement {
        process_started_ns: Some(T0 - 500 * S),
        ..Placement::default()
    };
    t.set_placement(pid, placement);
    register(&mut t, pid, Some(5432));
    t
}

fn register(t: &mut Tracker, pid: u32, port: Option<u16>) {
    let info = PoolInfo {
        db_system: Some(SystemName::Read(DbSystem::Postgresql)),
        server_address: Some("127.0.0.1".into()),
        server_port: port,
        max: Some(8),
        ..PoolInfo::default()
    };
    t.apply_adapter(
        pid,
        T0 - 100 * S,
        message(POOL, AdapterEvent::Register(info)),
    );
}

/// Thread `tid` of `pid` connects `fd` at `ts` (from local port `port`).
fn connect(t: &mut Tracker, pid: u32, tid: u32, fd: i32, port: u16, ts: u64) -> ConnId {
    connect_to(t, pid, tid, fd, port, ts, server())
}

fn connect_to(
    t: &mut Tracker,
    pid: u32,
    tid: u32,
    fd: i32,
    port: u16,
    ts: u64,
    to: SocketAddr,
) -> ConnId {
    let id = ConnId {
        pid,
        fd,
        generation: ts,
    };
    t.apply(Event {
        ts_ns: ts,
        conn: id,
        kind: EventKind::Connect {
            tid,
            ret: agent_common::EINPROGRESS,
            remote: Endpoint::Inet(to),
            comm: "app".into(),
        },
    });
    t.apply(Event {
        ts_ns: ts + MS,
        conn: id,
        kind: EventKind::SockState {
            old_state: tcp_state::SYN_SENT,
            new_state: tcp_state::ESTABLISHED,
            local: SocketAddr::new("127.0.0.1".parse().expect("ip"), port),
            remote: to,
            reset_received: false,
        },
    });
    id
}

/// The adapter says `tid` connected the connection `id` of the pool.
fn created(t: &mut Tracker, pid: u32, id: u64, tid: u32, ts: u64) {
    t.apply_adapter(
        pid,
        ts,
        message(
            POOL,
            AdapterEvent::ConnectionCreated {
                conn: named(id),
                tid: Some(tid),
            },
        ),
    );
}

/// Which socket (fd) each adapter id of `pid` names now; adapter-only
/// ones are left out.
fn bound(t: &Tracker, pid: u32) -> Vec<(u64, i32)> {
    let mut pairs: Vec<(u64, i32)> = t
        .open_connections()
        .filter(|c| c.id.pid == pid)
        .filter_map(|c| Some((c.adapter_conn?, c.id.fd)))
        .collect();
    pairs.sort();
    pairs
}

#[test]
fn a_hidden_connection_is_tied_to_the_one_socket_its_thread_connected() {
    let mut t = tracker_for(PID);
    let socket = connect(&mut t, PID, 11, 7, 41_000, T0);
    created(&mut t, PID, 1, 11, T0 + 20 * MS);
    // Not before the kernel's events have surely been read.
    t.bind_hidden_sockets(T0 + 500 * MS, 0);
    assert!(bound(&t, PID).is_empty());
    assert_eq!(t.adapter_only_connections().count(), 1);

    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert_eq!(bound(&t, PID), [(1, 7)]);
    assert_eq!(t.adapter_only_connections().count(), 0);
    let stats = t.binding_stats();
    assert_eq!((stats.bound, stats.ambiguous, stats.refused), (1, 0, 0));
    let conn = t.connection(socket).expect("open");
    assert_eq!(conn.pool.as_deref(), Some(POOL));

    // From now on the id's checkouts land on the socket, and the kernel's
    // rules apply: held and quiet is a leak, not just "held too long".
    t.apply_adapter(
        PID,
        T0 + 3 * S,
        message(
            POOL,
            AdapterEvent::AcquireEnd {
                request: 1,
                result: AcquireResult::Ok,
                conn: named(1),
                tid: Some(11),
                wait_ns: Some(1_000),
            },
        ),
    );
    assert_eq!(
        t.connection(socket).and_then(|c| c.checked_out_at_ns),
        Some(T0 + 3 * S)
    );
    let found = detect::evaluate(t.open_connections(), T0 + 60 * S, &Thresholds::default());
    assert_eq!(
        found.iter().map(|f| f.kind).collect::<Vec<_>>(),
        [LeakKind::Leaked]
    );
}

#[test]
fn a_thread_that_opens_its_pool_one_connection_after_another_has_each_tied() {
    let mut t = tracker_for(PID);
    for (i, fd) in (1..=4u64).zip(7..) {
        let at = T0 + i * 100 * MS;
        connect(&mut t, PID, 11, fd, 41_000 + fd as u16, at);
        created(&mut t, PID, i, 11, at + 10 * MS);
    }
    t.bind_hidden_sockets(T0 + 3 * S, 0);
    assert_eq!(bound(&t, PID), [(1, 7), (2, 8), (3, 9), (4, 10)]);
}

#[test]
fn each_thread_has_its_own_socket_tied() {
    let mut t = tracker_for(PID);
    connect(&mut t, PID, 11, 7, 41_007, T0);
    connect(&mut t, PID, 12, 8, 41_008, T0 + MS);
    created(&mut t, PID, 2, 12, T0 + 5 * MS);
    created(&mut t, PID, 1, 11, T0 + 6 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert_eq!(bound(&t, PID), [(1, 7), (2, 8)]);
}

#[test]
fn a_second_socket_of_the_thread_leaves_the_connection_known_by_word() {
    let mut t = tracker_for(PID);
    // The thread also opened a connection of its own to the same server.
    connect(&mut t, PID, 11, 7, 41_007, T0);
    connect(&mut t, PID, 11, 8, 41_008, T0 + MS);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert!(bound(&t, PID).is_empty());
    assert_eq!(t.adapter_only_connections().count(), 1);
    assert_eq!(t.binding_stats().ambiguous, 1);
}

#[test]
fn connects_interleaved_on_one_thread_are_never_paired_by_order() {
    // One event-loop thread: A and B connect, A is ready, C connects, B
    // is ready, then C. Pairing each message with the sockets since the
    // last one would tie B to C's socket; the agent ties nothing.
    let mut t = tracker_for(PID);
    connect(&mut t, PID, 11, 7, 41_007, T0);
    connect(&mut t, PID, 11, 8, 41_008, T0 + MS);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    connect(&mut t, PID, 11, 9, 41_009, T0 + 6 * MS);
    created(&mut t, PID, 2, 11, T0 + 9 * MS);
    created(&mut t, PID, 3, 11, T0 + 12 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert!(bound(&t, PID).is_empty(), "{:?}", bound(&t, PID));
    assert_eq!(t.binding_stats().ambiguous, 3);
}

#[test]
fn a_socket_connected_after_the_message_is_not_its_socket() {
    let mut t = tracker_for(PID);
    connect(&mut t, PID, 11, 7, 41_007, T0);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    connect(&mut t, PID, 11, 8, 41_008, T0 + 10 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert_eq!(bound(&t, PID), [(1, 7)]);
}

#[test]
fn sockets_other_adapters_named_and_failed_connects_are_not_candidates() {
    let mut t = tracker_for(PID);
    // A socket-naming pool of the same process owns fd 8.
    connect(&mut t, PID, 11, 8, 41_008, T0);
    t.apply_adapter(
        PID,
        T0 + MS,
        message(
            "named-by-fd",
            AdapterEvent::ConnectionCreated {
                conn: ConnRef {
                    fd: Some(8),
                    ..ConnRef::default()
                },
                tid: None,
            },
        ),
    );
    // A refused connect of the same thread.
    let refused = ConnId {
        pid: PID,
        fd: 9,
        generation: T0 + 2 * MS,
    };
    t.apply(Event {
        ts_ns: T0 + 2 * MS,
        conn: refused,
        kind: EventKind::Connect {
            tid: 11,
            ret: -111,
            remote: Endpoint::Inet(server()),
            comm: "app".into(),
        },
    });
    connect(&mut t, PID, 11, 7, 41_007, T0 + 3 * MS);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert_eq!(bound(&t, PID), [(1, 7)]);
}

#[test]
fn dropped_kernel_events_in_the_window_forbid_a_binding() {
    let mut t = tracker_for(PID);
    t.bind_hidden_sockets(T0 - 200 * S, 3);
    connect(&mut t, PID, 11, 7, 41_007, T0);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    // The count grew since it was last told: a connect may be missing.
    t.bind_hidden_sockets(T0 + 2 * S, 4);
    assert!(bound(&t, PID).is_empty());

    // Long after, with no drop since, a new connection is tied.
    connect(&mut t, PID, 11, 8, 41_008, T0 + 100 * S);
    created(&mut t, PID, 2, 11, T0 + 100 * S + 5 * MS);
    t.bind_hidden_sockets(T0 + 102 * S, 4);
    assert_eq!(bound(&t, PID), [(2, 8)]);
}

#[test]
fn a_socket_found_at_start_up_within_the_window_forbids_a_binding() {
    let mut t = tracker_for(PID);
    // The agent started 10 s ago and found a socket of the process whose
    // connect it never saw (its thread and time unknown).
    t.apply(Event {
        ts_ns: T0 - 10 * S,
        conn: ConnId {
            pid: PID,
            fd: 3,
            generation: 0,
        },
        kind: EventKind::Seeded {
            comm: "app".into(),
            local: Some("127.0.0.1:40003".parse().expect("addr")),
            remote: Endpoint::Inet(server()),
            phase: SeededPhase::Established,
        },
    });
    connect(&mut t, PID, 11, 7, 41_007, T0);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert!(bound(&t, PID).is_empty());
}

#[test]
fn a_socket_the_declaration_contradicts_is_not_tied() {
    let mut t = tracker_for(PID);
    // The pool says it talks to port 6432 (a pgbouncer); the thread's one
    // socket goes to 5432.
    register(&mut t, PID, Some(6432));
    connect(&mut t, PID, 11, 7, 41_007, T0);
    created(&mut t, PID, 1, 11, T0 + 5 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert!(bound(&t, PID).is_empty());

    // One to 6432 made by the thread soon after: the first socket, still
    // the thread's and nobody's, fits too.
    let bouncer: SocketAddr = "127.0.0.1:6432".parse().expect("addr");
    connect_to(&mut t, PID, 11, 8, 41_008, T0 + 10 * S, bouncer);
    created(&mut t, PID, 2, 11, T0 + 10 * S + 5 * MS);
    t.bind_hidden_sockets(T0 + 12 * S, 0);
    assert!(bound(&t, PID).is_empty());
    // A minute later, only the new one: tied.
    connect_to(&mut t, PID, 11, 9, 41_009, T0 + 70 * S, bouncer);
    created(&mut t, PID, 3, 11, T0 + 70 * S + 5 * MS);
    t.bind_hidden_sockets(T0 + 72 * S, 0);
    assert_eq!(bound(&t, PID), [(3, 9)]);
}

#[test]
fn another_process_cannot_claim_a_socket() {
    let mut t = tracker_for(PID);
    t.set_placement(PID + 1, Placement::default());
    register(&mut t, PID + 1, Some(5432));
    connect(&mut t, PID, 11, 7, 41_007, T0);
    // The other process says "my thread 11 connected conn 1": its own
    // sockets are the only candidates, and it has none.
    created(&mut t, PID + 1, 1, 11, T0 + 5 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert!(bound(&t, PID).is_empty());
    assert!(bound(&t, PID + 1).is_empty());
}

#[test]
fn claims_are_bounded_per_process() {
    let mut t = tracker_for(PID);
    t.set_placement(PID + 1, Placement::default());
    register(&mut t, PID + 1, Some(5432));
    for id in 0..300 {
        created(&mut t, PID, id, 11, T0);
    }
    assert_eq!(t.binding_stats().refused, 300 - 256);
    // The other process still has room.
    connect(&mut t, PID + 1, 21, 7, 41_007, T0);
    created(&mut t, PID + 1, 1, 21, T0 + 5 * MS);
    t.bind_hidden_sockets(T0 + 2 * S, 0);
    assert_eq!(bound(&t, PID + 1), [(1, 7)]);
}
