use super::*;

const S: u64 = 1_000_000_000;

fn conn(fd: i32, opened_at: u64) -> Connection {
    let mut c = Connection::new(
        ConnId {
            pid: 10,
            fd,
            generation: opened_at,
        },
        "app".into(),
        Endpoint::Inet("127.0.0.1:5432".parse().expect("addr")),
        opened_at,
    );
    c.state = ConnState::Established;
    c.db_system = Some(crate::protocol::DbSystem::Postgresql);
    c
}

fn thresholds() -> Thresholds {
    Thresholds {
        leak_ns: 10 * S,
        quiet_ns: 3 * S,
        idle_in_transaction_ns: 5 * S,
        close_wait_ns: 5 * S,
        abandoned_ns: 60 * S,
        slow_acquire_ns: S,
    }
}

fn kinds(conns: &[Connection], now: u64) -> Vec<(i32, LeakKind)> {
    evaluate(conns.iter(), now, &thresholds())
        .into_iter()
        .map(|f| (f.conn.fd, f.kind))
        .collect()
}

#[test]
fn checked_out_and_quiet_is_leaked_and_busy_is_a_slow_holder() {
    let mut quiet = conn(3, S);
    quiet.checked_out_at_ns = Some(2 * S);
    quiet.last_activity_ns = Some(3 * S);
    let mut busy = conn(4, S);
    busy.checked_out_at_ns = Some(2 * S);
    busy.last_activity_ns = Some(19 * S);
    let mut young = conn(5, S);
    young.checked_out_at_ns = Some(15 * S);
    let returned = conn(6, S);
    assert_eq!(
        kinds(&[quiet, busy, young, returned], 20 * S),
        vec![(3, LeakKind::Leaked), (4, LeakKind::SlowHolder)]
    );
}

#[test]
fn activity_before_checkout_does_not_make_it_busy() {
    let mut c = conn(3, S);
    c.last_activity_ns = Some(2 * S);
    c.checked_out_at_ns = Some(5 * S);
    assert_eq!(kinds(&[c], 20 * S), vec![(3, LeakKind::Leaked)]);
}

#[test]
fn idle_in_transaction_wins_over_leaked() {
    let mut c = conn(3, S);
    c.checked_out_at_ns = Some(2 * S);
    c.last_activity_ns = Some(3 * S);
    c.tx_state = Some(TxState::InTransaction);
    let findings = evaluate([c].iter(), 20 * S, &thresholds());
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].kind, LeakKind::IdleInTransaction);
    assert!(
        findings[0].evidence.contains("quiet for 17.0s"),
        "{}",
        findings[0].evidence
    );
}

#[test]
fn an_active_transaction_is_not_idle() {
    let mut c = conn(3, S);
    c.tx_state = Some(TxState::InTransaction);
    c.last_activity_ns = Some(19 * S);
    assert!(kinds(&[c], 20 * S).is_empty());
}

#[test]
fn close_wait_after_its_threshold() {
    let mut c = conn(3, S);
    c.state = ConnState::PeerClosed;
    c.peer_closed_at_ns = Some(10 * S);
    assert!(kinds(std::slice::from_ref(&c), 12 * S).is_empty());
    assert_eq!(kinds(&[c], 16 * S), vec![(3, LeakKind::CloseWait)]);
}

#[test]
fn abandoned_needs_a_newer_connection_to_the_same_server() {
    let mut old = conn(3, S);
    old.last_activity_ns = Some(2 * S);
    assert!(
        kinds(std::slice::from_ref(&old), 100 * S).is_empty(),
        "alone, it may just be idle"
    );
    let mut newer = conn(4, 50 * S);
    newer.last_activity_ns = Some(99 * S);
    assert_eq!(
        kinds(&[old.clone(), newer], 100 * S),
        vec![(3, LeakKind::Abandoned)]
    );
    // A newer connection to another server says nothing about this one.
    let mut elsewhere = conn(5, 50 * S);
    elsewhere.remote = Endpoint::Inet("127.0.0.1:3306".parse().expect("addr"));
    assert!(kinds(&[old, elsewhere], 100 * S).is_empty());
}

#[test]
fn closed_connections_are_never_findings() {
    let mut c = conn(3, S);
    c.checked_out_at_ns = Some(2 * S);
    c.state = ConnState::Closed;
    assert!(kinds(&[c], 100 * S).is_empty());
}
