//! Scenarios for holder stacks (`holder_stack`): a stack is kept with the
//! one checkout it was captured at, never pinned on a later holder, and
//! bounded per process and in all.

use super::*;
use crate::adapter::message::{
    AcquireResult, AdapterEvent, AdapterMessage, ConnRef, HolderStack, PoolInfo,
};

const PID: u32 = 400;
const S: u64 = 1_000_000_000;
const POOL: &str = "orders";

fn message(event: AdapterEvent, at: u64) -> AdapterMessage {
    AdapterMessage {
        pool: POOL.into(),
        event,
        mono_ns: Some(at),
        claimed_pid: None,
    }
}

fn send(t: &mut Tracker, at: u64, event: AdapterEvent) -> Vec<Output> {
    t.apply_adapter(PID, at, message(event, at))
}

fn socket(fd: i32) -> ConnRef {
    ConnRef {
        local: None,
        fd: Some(fd),
        conn: None,
    }
}

fn named(id: u64) -> ConnRef {
    ConnRef {
        local: None,
        fd: None,
        conn: Some(id),
    }
}

fn stack(function: &str) -> HolderStack {
    vec![
        format!("{function} (app.py:7)"),
        "main (app.py:20)".to_string(),
    ]
    .into()
}

/// A tracker with pool `orders` and an established connection on fd 7.
fn rig() -> Tracker {
    let mut t = Tracker::new(TrackerConfig::default());
    let id = ConnId {
        pid: PID,
        fd: 7,
        generation: S,
    };
    t.apply(Event {
        ts_ns: S,
        conn: id,
        kind: EventKind::Connect {
            tid: PID,
            ret: 0,
            remote: Endpoint::Inet("127.0.0.1:5432".parse().expect("addr")),
            comm: "app".into(),
        },
    });
    t.apply(Event {
        ts_ns: S + 1,
        conn: id,
        kind: EventKind::SockState {
            old_state: agent_common::tcp_state::SYN_SENT,
            new_state: agent_common::tcp_state::ESTABLISHED,
            local: "127.0.0.1:40000".parse().expect("addr"),
            remote: "127.0.0.1:5432".parse().expect("addr"),
            reset_received: false,
        },
    });
    send(&mut t, S, AdapterEvent::Register(PoolInfo::default()));
    t
}

fn checkout(t: &mut Tracker, at: u64, conn: ConnRef) {
    send(
        t,
        at,
        AdapterEvent::AcquireEnd {
            request: at,
            result: AcquireResult::Ok,
            conn,
            tid: Some(PID + 1),
            wait_ns: Some(0),
        },
    );
}

fn release(t: &mut Tracker, at: u64, conn: ConnRef) {
    send(t, at, AdapterEvent::Release { conn });
}

fn send_stack(
    t: &mut Tracker,
    at: u64,
    conn: ConnRef,
    since_ns: u64,
    function: &str,
) -> Vec<Output> {
    send(
        t,
        at,
        AdapterEvent::HolderStack {
            conn,
            since_ns,
            stack: stack(function),
        },
    )
}

fn stack_of_fd(t: &Tracker, fd: i32) -> Option<String> {
    let conn = t
        .open_connections()
        .find(|c| c.id.pid == PID && c.id.fd == fd)
        .expect("open connection");
    t.holder_stack(conn).map(|s| s[0].clone())
}

fn unmatched(out: &[Output]) -> bool {
    out.iter().any(|o| matches!(o, Output::Unmatched))
}

#[test]
fn the_stack_stays_with_its_checkout() {
    let mut t = rig();
    checkout(&mut t, 10 * S, socket(7));
    let out = send_stack(&mut t, 11 * S, socket(7), 10 * S, "leaky_report");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        stack_of_fd(&t, 7).as_deref(),
        Some("leaky_report (app.py:7)")
    );
    // Returned and handed out again: the old stack is not the new holder's.
    release(&mut t, 12 * S, socket(7));
    assert_eq!(stack_of_fd(&t, 7), None);
    checkout(&mut t, 13 * S, socket(7));
    assert_eq!(stack_of_fd(&t, 7), None);
    // Housekeeping forgets the stack of the ended checkout.
    t.expire(14 * S);
    assert_eq!(t.stacks.len(), 0);
}

#[test]
fn a_late_stack_of_an_earlier_checkout_is_dropped() {
    let mut t = rig();
    checkout(&mut t, 10 * S, socket(7));
    release(&mut t, 11 * S, socket(7));
    checkout(&mut t, 12 * S, socket(7));
    // The adapter sent the first checkout's stack as it ended: it arrives
    // while the connection is out again, with the other holder.
    let out = send_stack(&mut t, 12 * S + 1, socket(7), 10 * S, "first_holder");
    assert!(unmatched(&out), "{out:?}");
    assert_eq!(stack_of_fd(&t, 7), None);
    let out = send_stack(&mut t, 13 * S, socket(7), 12 * S, "second_holder");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        stack_of_fd(&t, 7).as_deref(),
        Some("second_holder (app.py:7)")
    );
}

#[test]
fn a_stack_for_a_connection_not_checked_out_or_unknown_is_dropped() {
    let mut t = rig();
    let out = send_stack(&mut t, 11 * S, socket(7), 10 * S, "nobody");
    assert!(unmatched(&out), "idle connection: {out:?}");
    let out = send_stack(&mut t, 11 * S, socket(9), 10 * S, "nobody");
    assert!(unmatched(&out), "unknown fd: {out:?}");
    let out = send_stack(&mut t, 11 * S, named(5), 10 * S, "nobody");
    assert!(unmatched(&out), "unknown id: {out:?}");
    assert!(t.stacks.is_empty());
}

#[test]
fn connections_named_by_id_carry_stacks_and_the_bound_holds() {
    let mut t = rig();
    let per_process = super::stacks::MAX_STACKS_PER_PROCESS as u64;
    for id in 1..=per_process + 1 {
        checkout(&mut t, 10 * S + id, named(id));
    }
    for id in 1..=per_process {
        let out = send_stack(&mut t, 11 * S, named(id), 10 * S + id, "hold");
        assert!(out.is_empty(), "{id}: {out:?}");
    }
    let held = |id| {
        let conn = t
            .adapter_only_connections()
            .find(|c| c.adapter_conn == Some(id))
            .expect("named connection");
        t.holder_stack(conn).is_some()
    };
    assert!(held(1) && held(per_process));
    // The process's share is taken by checkouts still held: refused.
    let out = send_stack(
        &mut t,
        11 * S,
        named(per_process + 1),
        10 * S + per_process + 1,
        "hold",
    );
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::AdapterRefused {
                reason: "stack_limit"
            }
        )),
        "{out:?}"
    );
    // One returned: its stack makes room.
    release(&mut t, 12 * S, named(1));
    let out = send_stack(
        &mut t,
        12 * S,
        named(per_process + 1),
        10 * S + per_process + 1,
        "hold",
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.stacks.len(), per_process as usize);
}
