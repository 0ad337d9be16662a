//! The batch's logic: what leaves when, and in which order.

use super::*;

const MS: u64 = 1_000_000;
const WINDOW: u64 = 50 * MS;

fn conn(id: u64) -> ConnId {
    ConnId {
        conn: Some(id),
        ..ConnId::default()
    }
}

fn kinds(out: &[Out]) -> Vec<&'static str> {
    out.iter().map(|(body, _)| body.kind()).collect()
}

#[test]
fn a_short_checkout_waits_for_the_batch_and_leaves_folded() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    b.start(1, 1_000 * MS, Some(8));
    b.finish(
        1,
        AcquireResult::Ok(conn(3)),
        Some(8),
        1_000 * MS + 200,
        None,
        &mut out,
    );
    b.release(conn(3), 1_002 * MS, &mut out);
    b.start(2, 1_003 * MS, Some(7));
    b.finish(
        2,
        AcquireResult::Ok(conn(3)),
        Some(7),
        1_003 * MS,
        None,
        &mut out,
    );
    b.release(conn(3), 1_004 * MS, &mut out);
    assert!(out.is_empty(), "nothing before the batch: {out:?}");
    let more = b.flush(1_010 * MS, WINDOW, &mut out);
    assert!(!more, "nothing left");
    assert_eq!(out.len(), 1, "{out:?}");
    let (
        Body::Checkouts {
            conn: c,
            tid,
            waits_ns,
            uses_ns,
        },
        at,
    ) = &out[0]
    else {
        panic!("{out:?}");
    };
    assert_eq!((*c, *tid, *at), (conn(3), Some(7), 1_004 * MS));
    assert_eq!(waits_ns, &[200, 0]);
    assert_eq!(uses_ns, &[1_002 * MS - (1_000 * MS + 200), MS]);
}

#[test]
fn a_waiter_goes_out_as_a_start_after_every_held_end() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    b.start(1, 1_000 * MS, Some(1));
    b.finish(
        1,
        AcquireResult::Ok(conn(1)),
        Some(1),
        1_000 * MS,
        None,
        &mut out,
    );
    b.start(2, 1_001 * MS, Some(2)); // waits: the pool is full
    let more = b.flush(1_060 * MS, WINDOW, &mut out);
    assert!(!more, "both sent: the batch keeps nothing");
    assert_eq!(kinds(&out), ["acquire_end", "acquire_start"], "{out:?}");
    assert!(matches!(
        out[0].0,
        Body::AcquireEnd {
            wait_ns: Some(0),
            ..
        }
    ));
    assert_eq!(out[1].1, 1_001 * MS, "the start keeps its own time");
    out.clear();
    // Its end: no wait_ns (its start was sent), and the holder's return is
    // a plain release (its end was sent).
    b.release(conn(1), 1_070 * MS, &mut out);
    b.finish(
        2,
        AcquireResult::Ok(conn(1)),
        Some(2),
        1_070 * MS,
        None,
        &mut out,
    );
    assert_eq!(kinds(&out), ["release", "acquire_end"], "{out:?}");
    assert!(matches!(out[1].0, Body::AcquireEnd { wait_ns: None, .. }));
}

#[test]
fn a_checkout_out_past_a_window_is_sent_then_released_plainly() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    b.start(1, 1_000 * MS, None);
    b.finish(
        1,
        AcquireResult::Ok(conn(1)),
        None,
        1_000 * MS,
        None,
        &mut out,
    );
    assert!(b.flush(1_020 * MS, WINDOW, &mut out), "young: kept");
    assert!(out.is_empty());
    assert!(!b.flush(1_060 * MS, WINDOW, &mut out), "sent: nothing left");
    assert_eq!(kinds(&out), ["acquire_end"]);
    assert_eq!(out[0].1, 1_000 * MS, "with the time it was handed out");
    out.clear();
    b.release(conn(1), 1_100 * MS, &mut out);
    assert_eq!(kinds(&out), ["release"]);
}

/// `n` short checkouts of connection 1, one after another.
fn short_checkouts(b: &mut Batch, n: u64, out: &mut Vec<Out>) {
    for i in 0..n {
        b.start(i, i * 10, None);
        b.finish(i, AcquireResult::Ok(conn(1)), None, i * 10 + 1, None, out);
        b.release(conn(1), i * 10 + 2, out);
    }
}

#[test]
fn full_lines_of_64_wait_for_the_batch_and_go_before_anything_sent_at_once() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    short_checkouts(&mut b, 130, &mut out);
    assert!(out.is_empty(), "two full lines kept for the batch: {out:?}");
    // Something about the connection sent at once: the full lines first.
    b.closed(conn(1), 2_000, &mut out);
    assert_eq!(
        kinds(&out),
        ["checkouts", "checkouts", "checkouts", "connection_closed"],
        "{out:?}"
    );
    let folded: Vec<usize> = out
        .iter()
        .filter_map(|(body, _)| match body {
            Body::Checkouts { waits_ns, .. } => Some(waits_ns.len()),
            _ => None,
        })
        .collect();
    assert_eq!(folded, [64, 64, 2]);
}

#[test]
fn full_lines_leave_with_the_batch() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    short_checkouts(&mut b, 64, &mut out);
    assert!(out.is_empty());
    assert!(!b.flush(1_000 * MS, WINDOW, &mut out));
    assert_eq!(kinds(&out), ["checkouts"]);
}

#[test]
fn a_close_sends_what_waits_about_the_connection_first() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    b.start(1, 10, None);
    b.finish(1, AcquireResult::Ok(conn(1)), None, 11, None, &mut out);
    b.release(conn(1), 12, &mut out);
    b.start(2, 13, None);
    b.finish(2, AcquireResult::Ok(conn(1)), None, 14, None, &mut out);
    b.closed(conn(1), 15, &mut out);
    assert_eq!(
        kinds(&out),
        ["checkouts", "acquire_end", "connection_closed"],
        "{out:?}"
    );
    assert!(!b.flush(1_000 * MS, WINDOW, &mut out));
}

#[test]
fn a_failed_acquire_within_the_window_is_one_message_with_its_wait() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    b.start(1, 10 * MS, Some(4));
    b.finish(1, AcquireResult::Timeout, Some(4), 40 * MS, None, &mut out);
    assert_eq!(kinds(&out), ["acquire_end"]);
    assert!(matches!(
        out[0].0,
        Body::AcquireEnd {
            result: AcquireResult::Timeout,
            wait_ns: Some(w),
            ..
        } if w == 30 * MS
    ));
}

#[test]
fn a_plain_end_on_a_connection_sends_its_folded_checkouts_first() {
    let mut b = Batch::default();
    let mut out = Vec::new();
    b.start(1, 10, None);
    b.finish(1, AcquireResult::Ok(conn(1)), None, 11, None, &mut out);
    b.release(conn(1), 12, &mut out);
    b.start(2, 13, None);
    assert!(!b.flush(13 + WINDOW + 1, WINDOW, &mut out));
    assert_eq!(kinds(&out), ["checkouts", "acquire_start"]);
    out.clear();
    b.start(3, 20, None);
    b.finish(3, AcquireResult::Ok(conn(1)), None, 21, None, &mut out);
    b.release(conn(1), 22, &mut out);
    b.finish(2, AcquireResult::Ok(conn(1)), None, 23, None, &mut out);
    assert_eq!(kinds(&out), ["checkouts", "acquire_end"], "{out:?}");
}
