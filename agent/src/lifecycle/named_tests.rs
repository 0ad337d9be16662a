//! Scenarios for connections an adapter names by its own id (`conn`):
//! pools without sockets (SQLite handles), ids tied to sockets, an id known
//! only by the adapter's word handing its checkout to its socket, bounds.

use super::*;
use crate::{
    adapter::message::{AcquireResult, AdapterEvent, AdapterMessage, Checkout, ConnRef, PoolInfo},
    detect::{self, LeakKind, Thresholds},
    procfs::Placement,
    protocol::SystemName,
};
use agent_common::tcp_state;

const PID: u32 = 400;
const S: u64 = 1_000_000_000;
const T0: u64 = 1_000 * S;

pub(super) fn message(pool: &str, event: AdapterEvent) -> AdapterMessage {
    AdapterMessage {
        pool: pool.into(),
        event,
        mono_ns: None,
        claimed_pid: None,
    }
}

pub(super) fn named(id: u64) -> ConnRef {
    ConnRef {
        conn: Some(id),
        ..ConnRef::default()
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new("127.0.0.1".parse().expect("ip"), port)
}

fn register_sqlite(t: &mut Tracker, pid: u32, max: u32) {
    let info = PoolInfo {
        db_system: Some(SystemName::Named("sqlite".into())),
        server_address: Some("/var/lib/app/app.db".into()),
        max: Some(max),
        ..PoolInfo::default()
    };
    t.apply_adapter(pid, T0, message("handles", AdapterEvent::Register(info)));
}

fn send(t: &mut Tracker, pid: u32, ts: u64, event: AdapterEvent) -> Vec<Output> {
    t.apply_adapter(pid, ts, message("handles", event))
}

fn acquired(conn: ConnRef, tid: u32) -> AdapterEvent {
    AdapterEvent::AcquireEnd {
        request: 1,
        result: AcquireResult::Ok,
        conn,
        tid: Some(tid),
        wait_ns: Some(1_000),
    }
}

/// (used, idle, max, db_system) of the pool "handles" of `pid`.
fn pool_state(t: &Tracker, pid: u32) -> (u64, u64, Option<u32>, Option<String>) {
    let view = t
        .pool_views()
        .into_iter()
        .find(|v| v.pid == pid && v.name == "handles")
        .expect("the pool is shown");
    let system = view.db_system.as_ref().map(|s| s.as_str().to_string());
    (view.used, view.idle, view.max, system)
}

fn findings(t: &Tracker, now: u64) -> Vec<(Option<u64>, LeakKind, String)> {
    let all = t.open_connections().chain(t.adapter_only_connections());
    detect::evaluate(all, now, &Thresholds::default())
        .into_iter()
        .map(|f| {
            let conn = t.connection(f.conn).and_then(|c| c.adapter_conn);
            (conn, f.kind, f.evidence)
        })
        .collect()
}

#[test]
fn a_pool_without_sockets_is_seen_through_its_ids() {
    let mut t = tracker_for(PID);
    register_sqlite(&mut t, PID, 3);
    for id in [1, 2, 3] {
        send(
            &mut t,
            PID,
            T0,
            AdapterEvent::ConnectionCreated {
                conn: named(id),
                tid: None,
            },
        );
    }
    assert_eq!(pool_state(&t, PID), (0, 3, Some(3), Some("sqlite".into())));

    // Handle 1 leaks; handle 2 is taken and returned after 2 s.
    send(&mut t, PID, T0 + S, acquired(named(1), 71));
    send(&mut t, PID, T0 + S, acquired(named(2), 72));
    assert_eq!(pool_state(&t, PID).0, 2);
    let out = send(
        &mut t,
        PID,
        T0 + 3 * S,
        AdapterEvent::Release { conn: named(2) },
    );
    let uses: Vec<u64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Released { use_ns, .. } => Some(*use_ns),
            _ => None,
        })
        .collect();
    assert_eq!(uses, [2 * S], "the use is timed as on a socket");
    assert_eq!(pool_state(&t, PID), (1, 2, Some(3), Some("sqlite".into())));

    // Past the leak threshold: held too long, said plainly without evidence.
    assert!(findings(&t, T0 + 30 * S).is_empty(), "not yet");
    let found = findings(&t, T0 + 32 * S);
    assert_eq!(found.len(), 1, "{found:?}");
    let (conn, kind, evidence) = &found[0];
    assert_eq!((*conn, *kind), (Some(1), LeakKind::HeldTooLong));
    assert!(evidence.contains("no kernel evidence"), "{evidence}");
    let holder = t
        .adapter_only_connections()
        .find(|c| c.adapter_conn == Some(1))
        .and_then(|c| c.holder_tid);
    assert_eq!(holder, Some(71));
    assert!(
        t.open_connections().next().is_none(),
        "nothing is made up on the kernel's side"
    );

    // A closed handle leaves the pool.
    send(
        &mut t,
        PID,
        T0 + 40 * S,
        AdapterEvent::ConnectionClosed { conn: named(3) },
    );
    assert_eq!(pool_state(&t, PID), (1, 1, Some(3), Some("sqlite".into())));
}

#[test]
fn an_id_sent_with_its_socket_names_that_socket_later() {
    let mut t = tracker_for(PID);
    let conn = established(&mut t, PID, 7, 41_000);
    let both = ConnRef {
        local: Some(local(41_000)),
        conn: Some(5),
        ..ConnRef::default()
    };
    send(
        &mut t,
        PID,
        T0 + S,
        AdapterEvent::ConnectionCreated {
            conn: both,
            tid: None,
        },
    );
    send(&mut t, PID, T0 + 2 * S, acquired(named(5), 9));
    let on_socket = t.connection(conn).expect("open");
    assert_eq!(on_socket.checked_out_at_ns, Some(T0 + 2 * S));
    assert_eq!(on_socket.adapter_conn, Some(5));
    assert_eq!(t.adapter_only_connections().count(), 0);
    // With the socket, the kernel's rules apply: quiet, so leaked.
    let found = findings(&t, T0 + 40 * S);
    assert_eq!(
        found.iter().map(|f| f.1).collect::<Vec<_>>(),
        [LeakKind::Leaked]
    );

    // The socket closes: the id no longer names it, and names a new
    // connection (known by word) if the adapter uses it again.
    t.apply(Event {
        ts_ns: T0 + 50 * S,
        conn,
        kind: EventKind::Close,
    });
    send(&mut t, PID, T0 + 51 * S, acquired(named(5), 9));
    assert_eq!(t.adapter_only_connections().count(), 1);
}

#[test]
fn an_id_known_by_word_hands_its_checkout_to_its_socket() {
    let mut t = tracker_for(PID);
    let conn = established(&mut t, PID, 8, 42_000);
    // The adapter names the checkout before it says which socket it is.
    send(&mut t, PID, T0 + S, acquired(named(3), 11));
    assert_eq!(t.adapter_only_connections().count(), 1);
    let both = ConnRef {
        fd: Some(8),
        conn: Some(3),
        ..ConnRef::default()
    };
    send(
        &mut t,
        PID,
        T0 + 2 * S,
        AdapterEvent::ConnectionCreated {
            conn: both,
            tid: None,
        },
    );
    assert_eq!(t.adapter_only_connections().count(), 0);
    let on_socket = t.connection(conn).expect("open");
    assert_eq!(on_socket.checked_out_at_ns, Some(T0 + S));
    assert_eq!(on_socket.holder_tid, Some(11));
    assert_eq!(pool_state(&t, PID).0, 1, "counted once");
    send(
        &mut t,
        PID,
        T0 + 3 * S,
        AdapterEvent::Release { conn: named(3) },
    );
    assert_eq!(pool_state(&t, PID).0, 0);
}

#[test]
fn restated_checkouts_of_ids_mark_them_out_from_when_they_began() {
    let mut t = tracker_for(PID);
    register_sqlite(&mut t, PID, 4);
    let since = T0 - 100 * S;
    let entry = Checkout {
        conn: named(2),
        since_ns: since,
        tid: Some(5),
    };
    let state = AdapterEvent::CheckoutState {
        checkouts: vec![entry],
    };
    send(&mut t, PID, T0, state.clone());
    send(&mut t, PID, T0 + S, state);
    assert_eq!(pool_state(&t, PID).0, 1, "idempotent");
    let out = t
        .adapter_only_connections()
        .map(|c| c.checked_out_at_ns)
        .collect::<Vec<_>>();
    assert_eq!(out, [Some(since)], "from its start, not the agent's");
}

#[test]
fn ids_are_bounded_per_process_and_in_all_and_go_with_their_process() {
    let mut t = tracker();
    let per_process = 4096;
    for pid in 1..=8 {
        t.set_placement(pid, Placement::default());
        register_sqlite(&mut t, pid, 10);
        for id in 0..per_process {
            let out = send(
                &mut t,
                pid,
                T0,
                AdapterEvent::ConnectionCreated {
                    conn: named(id),
                    tid: None,
                },
            );
            assert!(out.is_empty(), "{pid}/{id}: {out:?}");
        }
    }
    // Past its share, a process is refused...
    let out = send(
        &mut t,
        1,
        T0,
        AdapterEvent::ConnectionCreated {
            conn: named(per_process),
            tid: None,
        },
    );
    assert!(
        matches!(
            out[..],
            [Output::AdapterRefused {
                reason: "named_connection_limit"
            }]
        ),
        "{out:?}"
    );
    // ...and when all are taken, a newcomer still gets room from the
    // heaviest.
    register_sqlite(&mut t, 9, 10);
    let out = send(
        &mut t,
        9,
        T0,
        AdapterEvent::ConnectionCreated {
            conn: named(1),
            tid: None,
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(pool_state(&t, 9).1, 1);
    assert_eq!(t.adapter_only_connections().count(), 8 * 4096);

    t.apply(Event {
        ts_ns: T0 + S,
        conn: ConnId {
            pid: 2,
            fd: -1,
            generation: 0,
        },
        kind: EventKind::ProcessExit { comm: "app".into() },
    });
    assert_eq!(t.adapter_only_connections().count(), 7 * 4096);
    assert!(t.adapter_only_connections().all(|c| c.id.pid != 2));
}

/// A tracker that knows `pid` started long before T0.
fn tracker_for(pid: u32) -> Tracker {
    let mut t = tracker();
    let placement = Placement {
        process_started_ns: Some(T0 - 500 * S),
        ..Placement::default()
    };
    t.set_placement(pid, placement);
    t
}

fn tracker() -> Tracker {
    Tracker::new(TrackerConfig::default())
}

/// A TCP connection of `pid` on `fd`, from local `port`, established at T0.
fn established(t: &mut Tracker, pid: u32, fd: i32, port: u16) -> ConnId {
    let id = ConnId {
        pid,
        fd,
        generation: T0 - S,
    };
    let server: SocketAddr = "127.0.0.1:5432".parse().expect("addr");
    t.apply(Event {
        ts_ns: T0 - S,
        conn: id,
        kind: EventKind::Connect {
            tid: pid,
            ret: 0,
            remote: Endpoint::Inet(server),
            comm: "app".into(),
        },
    });
    t.apply(Event {
        ts_ns: T0 - S,
        conn: id,
        kind: EventKind::SockState {
            old_state: tcp_state::SYN_SENT,
            new_state: tcp_state::ESTABLISHED,
            local: local(port),
            remote: server,
            reset_received: false,
        },
    });
    id
}

#[test]
fn ids_of_sockets_that_closed_make_room_for_new_ones() {
    let mut t = tracker_for(PID);
    register_sqlite(&mut t, PID, 10);
    // 4096 connections named by id beside their socket, each closed by the
    // kernel without a connection_closed from the adapter.
    for i in 0..4096u16 {
        let fd = i32::from(i) + 10;
        let conn = established(&mut t, PID, fd, 20_000 + i);
        let both = ConnRef {
            fd: Some(fd),
            conn: Some(u64::from(i)),
            ..ConnRef::default()
        };
        send(
            &mut t,
            PID,
            T0,
            AdapterEvent::ConnectionCreated {
                conn: both,
                tid: None,
            },
        );
        t.apply(Event {
            ts_ns: T0 + 1,
            conn,
            kind: EventKind::Close,
        });
    }
    let out = send(
        &mut t,
        PID,
        T0 + S,
        AdapterEvent::ConnectionCreated {
            conn: named(9_999),
            tid: None,
        },
    );
    assert!(
        out.is_empty(),
        "room once the dead ids are forgotten: {out:?}"
    );
    assert_eq!(t.adapter_only_connections().count(), 1);
}

#[test]
fn pool_activity_tells_the_longest_wait_and_the_recent_failures() {
    let mut t = tracker_for(PID);
    register_sqlite(&mut t, PID, 1);
    let end = |request, result| AdapterEvent::AcquireEnd {
        request,
        result,
        conn: ConnRef::default(),
        tid: None,
        wait_ns: None,
    };
    // Two timeouts and an error long ago, one timeout recently; a request
    // waiting since T0 + 100 s.
    send(&mut t, PID, T0, end(1, AcquireResult::Timeout));
    send(&mut t, PID, T0 + S, end(2, AcquireResult::Timeout));
    send(&mut t, PID, T0 + S, end(3, AcquireResult::Error));
    send(&mut t, PID, T0 + 90 * S, end(4, AcquireResult::Timeout));
    send(
        &mut t,
        PID,
        T0 + 100 * S,
        AdapterEvent::AcquireStart {
            request: 5,
            tid: None,
        },
    );
    let at = |t: &Tracker, now, recent| t.pool_activity(now, recent)[&(PID, "handles".to_string())];
    let a = at(&t, T0 + 102 * S, 300 * S);
    assert_eq!(a.longest_wait_ns, Some(2 * S));
    assert_eq!(
        (a.recent_timeouts, a.recent_errors, a.saturated),
        (3, 1, false)
    );
    // Only the last one is within a minute.
    let a = at(&t, T0 + 102 * S, 60 * S);
    assert_eq!((a.recent_timeouts, a.recent_errors), (1, 0));

    // A storm: only the latest are kept, and the count says it is a floor.
    for request in 10..110 {
        send(
            &mut t,
            PID,
            T0 + 200 * S,
            end(request, AcquireResult::Timeout),
        );
    }
    let a = at(&t, T0 + 201 * S, 300 * S);
    assert_eq!(a.recent_timeouts, 32);
    assert!(a.saturated);
}
