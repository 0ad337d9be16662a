//! Scenarios for re-sent checkout state (`checkout_state`): an agent that
//! restarted learns the checkouts that began before it, idempotently, with
//! the sender's times clamped and its entries bounded.

use super::*;
use crate::{
    adapter::message::{AcquireResult, AdapterEvent, AdapterMessage, Checkout, ConnRef, PoolInfo},
    detect::{self, LeakKind, Thresholds},
    procfs::Placement,
};

const PID: u32 = 300;
const S: u64 = 1_000_000_000;
/// When the (new) agent started and seeded what /proc showed.
const AGENT_START: u64 = 1_000 * S;
/// When the application started, long before.
const PROCESS_START: u64 = 100 * S;

fn server() -> SocketAddr {
    "127.0.0.1:5432".parse().expect("addr")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new("127.0.0.1".parse().expect("ip"), port)
}

fn message(pool: &str, event: AdapterEvent) -> AdapterMessage {
    AdapterMessage {
        pool: pool.into(),
        event,
        mono_ns: None,
        claimed_pid: None,
    }
}

fn register(t: &mut Tracker, pid: u32, pool: &str, max: Option<u32>) {
    t.apply_adapter(
        pid,
        AGENT_START,
        message(
            pool,
            AdapterEvent::Register(PoolInfo {
                max,
                ..PoolInfo::default()
            }),
        ),
    );
}

/// A connection of `pid` found in /proc when the agent started, on fd
/// `fd` and local port `port`.
fn seed(t: &mut Tracker, pid: u32, fd: i32, port: u16) {
    t.apply(Event {
        ts_ns: AGENT_START,
        conn: ConnId {
            pid,
            fd,
            generation: 0,
        },
        kind: EventKind::Seeded {
            comm: "app".into(),
            local: Some(local(port)),
            remote: Endpoint::Inet(server()),
            phase: SeededPhase::Established,
        },
    });
}

/// A connection the kernel saw connect at `ts`.
fn connect(t: &mut Tracker, pid: u32, fd: i32, port: u16, ts: u64) {
    let id = ConnId {
        pid,
        fd,
        generation: ts,
    };
    t.apply(Event {
        ts_ns: ts,
        conn: id,
        kind: EventKind::Connect {
            tid: pid,
            ret: 0,
            remote: Endpoint::Inet(server()),
            comm: "app".into(),
        },
    });
    t.apply(Event {
        ts_ns: ts + 1,
        conn: id,
        kind: EventKind::SockState {
            old_state: agent_common::tcp_state::SYN_SENT,
            new_state: agent_common::tcp_state::ESTABLISHED,
            local: local(port),
            remote: server(),
            reset_received: false,
        },
    });
}

fn entry(fd: i32, port: u16, since_ns: u64, tid: u32) -> Checkout {
    Checkout {
        conn: ConnRef {
            local: Some(local(port)),
            fd: Some(fd),
            conn: None,
        },
        since_ns,
        tid: Some(tid),
    }
}

fn send_state(
    t: &mut Tracker,
    pid: u32,
    pool: &str,
    at: u64,
    checkouts: Vec<Checkout>,
) -> Vec<Output> {
    t.apply_adapter(
        pid,
        at,
        message(pool, AdapterEvent::CheckoutState { checkouts }),
    )
}

fn conn(t: &Tracker, pid: u32, fd: i32) -> &Connection {
    t.open_connections()
        .find(|c| c.id.pid == pid && c.id.fd == fd)
        .expect("an open connection")
}

fn view(t: &Tracker, pid: u32, pool: &str) -> PoolView {
    t.pool_views()
        .into_iter()
        .find(|v| v.pid == pid && v.name == pool)
        .expect("the pool")
}

fn unmatched(out: &[Output]) -> usize {
    out.iter()
        .filter(|o| matches!(o, Output::Unmatched))
        .count()
}

fn process_started_at(t: &mut Tracker, pid: u32, ns: u64) {
    t.set_placement(
        pid,
        Placement {
            process_started_ns: Some(ns),
            ..Placement::default()
        },
    );
}

#[test]
fn a_leak_older_than_the_agent_is_recovered_and_reported_at_once() {
    let t = tracker_with_seeded_leak();
    let c = conn(&t, PID, 7);
    // Older than the agent, as the adapter said: the process is older still.
    assert_eq!(c.checked_out_at_ns, Some(500 * S));
    assert_eq!(c.holder_tid, Some(77));
    assert_eq!(c.pool.as_deref(), Some("orders"));
    let v = view(&t, PID, "orders");
    assert_eq!((v.used, v.idle, v.acquires), (1, 0, 0), "{v:?}");

    // Checked out 500 s before the agent started: a leak on the first
    // evaluation after the restart, not one leak threshold later.
    let findings = detect::evaluate(
        t.open_connections(),
        AGENT_START + 2 * S,
        &Thresholds::default(),
    );
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].kind, LeakKind::Leaked);
    assert_eq!(findings[0].conn.fd, 7);
}

fn tracker_with_seeded_leak() -> Tracker {
    let mut t = Tracker::new(TrackerConfig::default());
    seed(&mut t, PID, 7, 41_000);
    seed(&mut t, PID, 8, 41_001);
    process_started_at(&mut t, PID, PROCESS_START);
    register(&mut t, PID, "orders", Some(5));
    let out = send_state(
        &mut t,
        PID,
        "orders",
        AGENT_START + S,
        vec![entry(7, 41_000, 500 * S, 77)],
    );
    assert_eq!(unmatched(&out), 0, "{out:?}");
    t
}

#[test]
fn state_sent_again_changes_nothing() {
    let mut t = tracker_with_seeded_leak();
    let before = conn(&t, PID, 7).clone();
    for i in 2..5 {
        // The same checkout, re-sent; even a later claimed start or
        // another tid does not reset what is known.
        send_state(
            &mut t,
            PID,
            "orders",
            AGENT_START + i * S,
            vec![entry(7, 41_000, 500 * S + i, 78)],
        );
    }
    assert_eq!(conn(&t, PID, 7), &before);
    let v = view(&t, PID, "orders");
    assert_eq!((v.used, v.acquires, v.releases), (1, 0, 0), "{v:?}");
}

#[test]
fn a_checkout_the_agent_saw_keeps_its_start_and_counts() {
    let mut t = Tracker::new(TrackerConfig::default());
    connect(&mut t, PID, 9, 42_000, AGENT_START + S);
    register(&mut t, PID, "orders", Some(5));
    let at = AGENT_START + 2 * S;
    t.apply_adapter(
        PID,
        at,
        message(
            "orders",
            AdapterEvent::AcquireEnd {
                request: 1,
                result: AcquireResult::Ok,
                conn: ConnRef {
                    local: Some(local(42_000)),
                    fd: Some(9),
                    conn: None,
                },
                tid: Some(5),
                wait_ns: None,
            },
        ),
    );
    // The adapter's record of the same checkout, a little off either way.
    send_state(
        &mut t,
        PID,
        "orders",
        at + S,
        vec![entry(9, 42_000, at - 10, 5)],
    );
    send_state(
        &mut t,
        PID,
        "orders",
        at + S,
        vec![entry(9, 42_000, at + 10, 5)],
    );
    let c = conn(&t, PID, 9);
    assert_eq!(c.checked_out_at_ns, Some(at));
    assert_eq!(c.holder_tid, Some(5));
    let v = view(&t, PID, "orders");
    assert_eq!((v.used, v.acquires), (1, 1), "{v:?}");
}

#[test]
fn claimed_starts_are_clamped_to_the_connection_or_process_birth() {
    let mut t = Tracker::new(TrackerConfig::default());
    // Seen connecting by this agent: the kernel knows its birth.
    let born = AGENT_START + 10 * S;
    connect(&mut t, PID, 9, 42_000, born);
    // Found in /proc, process start known: the process's start is the floor.
    seed(&mut t, PID, 7, 41_000);
    process_started_at(&mut t, PID, PROCESS_START);
    // Found in /proc, process start unknown: the agent's start is.
    let other = PID + 1;
    seed(&mut t, other, 7, 43_000);
    let at = AGENT_START + 20 * S;
    send_state(
        &mut t,
        PID,
        "p",
        at,
        vec![entry(9, 42_000, 1, 1), entry(7, 41_000, 1, 1)],
    );
    send_state(&mut t, other, "p", at, vec![entry(7, 43_000, 1, 1)]);
    assert_eq!(conn(&t, PID, 9).checked_out_at_ns, Some(born));
    assert_eq!(conn(&t, PID, 7).checked_out_at_ns, Some(PROCESS_START));
    assert_eq!(conn(&t, other, 7).checked_out_at_ns, Some(AGENT_START));

    // A start in the future of the message is the message's time.
    let mut t = Tracker::new(TrackerConfig::default());
    seed(&mut t, PID, 7, 41_000);
    send_state(&mut t, PID, "p", at, vec![entry(7, 41_000, u64::MAX, 1)]);
    assert_eq!(conn(&t, PID, 7).checked_out_at_ns, Some(at));
}

#[test]
fn entries_are_bounded_by_the_pool_max_and_the_sender_own_connections() {
    let mut t = Tracker::new(TrackerConfig::default());
    for fd in 10..13 {
        seed(&mut t, PID, fd, 40_000 + fd as u16);
    }
    // Another process's connection cannot be named.
    seed(&mut t, PID + 1, 20, 45_000);
    register(&mut t, PID, "small", Some(2));
    let entries: Vec<Checkout> = (10..13)
        .map(|fd| entry(fd, 40_000 + fd as u16, 500 * S, 1))
        .chain([entry(20, 45_000, 500 * S, 1)])
        .collect();
    let out = send_state(&mut t, PID, "small", AGENT_START + S, entries);
    assert_eq!(unmatched(&out), 2, "{out:?}");
    assert_eq!(view(&t, PID, "small").used, 2);
    assert!(conn(&t, PID + 1, 20).checked_out_at_ns.is_none());
    assert!(conn(&t, PID + 1, 20).pool.is_none());
}

#[test]
fn entries_without_a_registered_max_stop_at_the_hard_cap() {
    let mut t = Tracker::new(TrackerConfig::default());
    let n = MAX_STATE_CHECKOUTS_FOR_TESTS + 6;
    for fd in 0..n {
        seed(&mut t, PID, fd as i32, 0);
    }
    let mut refused = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let entries = chunk
            .iter()
            .map(|&fd| Checkout {
                conn: ConnRef {
                    local: None,
                    fd: Some(fd as i32),
                    conn: None,
                },
                since_ns: 500 * S,
                tid: None,
            })
            .collect();
        refused += unmatched(&send_state(&mut t, PID, "big", AGENT_START + S, entries));
    }
    assert_eq!(refused, 6);
    assert_eq!(view(&t, PID, "big").used, MAX_STATE_CHECKOUTS_FOR_TESTS);
}

/// `pools::MAX_STATE_CHECKOUTS`, which is private to the tracker.
const MAX_STATE_CHECKOUTS_FOR_TESTS: u64 = 1024;

#[test]
fn a_snapshot_taken_before_a_release_that_arrived_first_is_stale() {
    let mut t = tracker_with_seeded_leak();
    let released = AGENT_START + 3 * S;
    t.apply_adapter(
        PID,
        released,
        message(
            "orders",
            AdapterEvent::Release {
                conn: ConnRef {
                    local: Some(local(41_000)),
                    fd: Some(7),
                    conn: None,
                },
            },
        ),
    );
    assert!(conn(&t, PID, 7).checked_out_at_ns.is_none());
    // Built before the release, sent after it.
    let out = send_state(
        &mut t,
        PID,
        "orders",
        released + 1,
        vec![entry(7, 41_000, 500 * S, 77)],
    );
    assert_eq!(unmatched(&out), 1);
    assert!(conn(&t, PID, 7).checked_out_at_ns.is_none());
    // A checkout after the release is a new one.
    send_state(
        &mut t,
        PID,
        "orders",
        released + 2 * S,
        vec![entry(7, 41_000, released + S, 77)],
    );
    assert_eq!(conn(&t, PID, 7).checked_out_at_ns, Some(released + S));
    let v = view(&t, PID, "orders");
    assert_eq!((v.used, v.acquires, v.releases), (1, 0, 1), "{v:?}");
}

#[test]
fn unknown_connections_are_dropped_not_queued() {
    let mut t = Tracker::new(TrackerConfig::default());
    let out = send_state(&mut t, PID, "p", S, vec![entry(7, 41_000, 1, 1)]);
    assert_eq!(unmatched(&out), 1);
    // The connection appearing later does not pick the entry up: the
    // adapter's next periodic state does.
    connect(&mut t, PID, 7, 41_000, 2 * S);
    assert!(conn(&t, PID, 7).checked_out_at_ns.is_none());
}

/// Sizing samples the pools now and then; checkouts between two samples
/// still count toward the peak in use.
#[test]
fn the_peak_in_use_between_samples_is_kept_until_taken() {
    let mut t = Tracker::new(TrackerConfig::default());
    connect(&mut t, PID, 9, 42_000, AGENT_START + S);
    connect(&mut t, PID, 10, 42_001, AGENT_START + S);
    register(&mut t, PID, "orders", Some(5));
    let named = |fd: i32, port: u16| ConnRef {
        local: Some(local(port)),
        fd: Some(fd),
        conn: None,
    };
    let at = AGENT_START + 2 * S;
    for (request, fd, port) in [(1, 9, 42_000), (2, 10, 42_001)] {
        let end = AdapterEvent::AcquireEnd {
            request,
            result: AcquireResult::Ok,
            conn: named(fd, port),
            tid: Some(5),
            wait_ns: None,
        };
        t.apply_adapter(PID, at, message("orders", end));
    }
    let release = |t: &mut Tracker, fd: i32, port: u16| {
        let event = AdapterEvent::Release {
            conn: named(fd, port),
        };
        t.apply_adapter(PID, at + S, message("orders", event));
    };
    release(&mut t, 10, 42_001);
    assert_eq!(t.take_peak_used(PID, "orders"), 2, "both were out at once");
    assert_eq!(t.take_peak_used(PID, "orders"), 1, "one still out");
    release(&mut t, 9, 42_000);
    assert_eq!(t.take_peak_used(PID, "orders"), 1, "out since the last");
    assert_eq!(t.take_peak_used(PID, "orders"), 0);
    assert_eq!(t.take_peak_used(PID, "nobody"), 0);
}
