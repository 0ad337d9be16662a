//! Each rule of pool health on a pool made to match it, and just short of it.

use super::*;
use crate::reports::LeakReport;

const S: u64 = 1_000_000_000;

fn pool(used: u64, idle: u64, max: Option<u32>, pending: u64) -> PoolView {
    PoolView {
        pid: 42,
        process: "api".into(),
        name: "orders".into(),
        from_adapter: true,
        db_system: None,
        server: Some("127.0.0.1:5432".into()),
        namespace: None,
        library: None,
        used,
        idle,
        max,
        min_idle: None,
        idle_max: None,
        pending,
        acquires: 0,
        releases: 0,
        timeouts: 0,
    }
}

fn verdict(view: &PoolView, activity: PoolActivity, leaks: u64) -> PoolHealth {
    assess(view, &activity, leaks, &HealthThresholds::default())
}

fn rules(h: &PoolHealth) -> Vec<(&str, Status)> {
    h.reasons
        .iter()
        .map(|r| (r.rule.as_str(), r.status))
        .collect()
}

#[test]
fn a_pool_with_room_and_nothing_wrong_is_ok() {
    let h = verdict(&pool(3, 5, Some(10), 0), PoolActivity::default(), 0);
    assert_eq!(h.status, Status::Ok);
    assert!(h.reasons.is_empty(), "{h:?}");
    assert_eq!(h.utilization, Some(0.3));
}

#[test]
fn utilization_is_a_warning_from_80_and_critical_from_90_percent() {
    for (used, want) in [
        (7, None),
        (8, Some(Status::Warning)),
        (9, Some(Status::Critical)),
        (10, Some(Status::Critical)),
    ] {
        let h = verdict(
            &pool(used, 10 - used, Some(10), 0),
            PoolActivity::default(),
            0,
        );
        let got = h
            .reasons
            .iter()
            .find(|r| r.rule == "utilization")
            .map(|r| r.status);
        assert_eq!(got, want, "used {used}: {h:?}");
    }
    let h = verdict(&pool(9, 1, Some(10), 0), PoolActivity::default(), 0);
    assert_eq!(
        h.reasons[0].detail,
        "9 of 10 connections in use (90 %, at or above 90 %)"
    );
}

#[test]
fn a_pool_without_a_known_max_has_no_utilization() {
    let h = verdict(&pool(50, 1, None, 0), PoolActivity::default(), 0);
    assert_eq!(h.utilization, None);
    assert_eq!(h.status, Status::Ok, "{h:?}");
    let h = verdict(&pool(50, 1, Some(0), 0), PoolActivity::default(), 0);
    assert_eq!(h.status, Status::Ok, "max 0 means no limit: {h:?}");
}

#[test]
fn all_in_use_with_waiters_is_exhausted_and_says_so_first() {
    let h = verdict(&pool(4, 0, Some(4), 3), PoolActivity::default(), 0);
    assert_eq!(h.status, Status::Critical);
    assert_eq!(
        rules(&h),
        [
            ("utilization", Status::Critical),
            ("exhausted", Status::Critical),
            ("no_idle", Status::Warning),
        ]
    );
    assert_eq!(
        h.reasons[1].detail,
        "all 4 connections in use and 3 requests waiting"
    );
    // Full but nobody waiting: not exhausted.
    let h = verdict(&pool(4, 0, Some(4), 0), PoolActivity::default(), 0);
    assert!(!rules(&h).iter().any(|(r, _)| *r == "exhausted"), "{h:?}");
}

#[test]
fn a_request_waiting_past_the_threshold_is_a_warning() {
    let waited = |ns| PoolActivity {
        longest_wait_ns: Some(ns),
        ..PoolActivity::default()
    };
    let h = verdict(&pool(2, 1, Some(10), 1), waited(S - 1), 0);
    assert_eq!(h.status, Status::Ok, "{h:?}");
    let h = verdict(&pool(2, 1, Some(10), 1), waited(2_300_000_000), 0);
    assert_eq!(rules(&h), [("long_wait", Status::Warning)]);
    assert_eq!(
        h.reasons[0].detail,
        "a request has waited 2.3 s for a connection (1 waiting; threshold 1.0 s)"
    );
}

#[test]
fn no_idle_counts_only_where_the_pool_keeps_idle_ones_or_someone_waits() {
    // A pool that closes idle connections, one in use, nobody waiting: fine.
    let h = verdict(&pool(1, 0, Some(10), 0), PoolActivity::default(), 0);
    assert_eq!(h.status, Status::Ok, "{h:?}");
    let mut keeps = pool(3, 0, Some(10), 0);
    keeps.min_idle = Some(2);
    let h = verdict(&keeps, PoolActivity::default(), 0);
    assert_eq!(rules(&h), [("no_idle", Status::Warning)]);
    assert_eq!(
        h.reasons[0].detail,
        "no idle connection (3 in use, min idle 2): the next acquire waits or opens one"
    );
    let h = verdict(&pool(3, 0, Some(10), 1), PoolActivity::default(), 0);
    assert_eq!(rules(&h), [("no_idle", Status::Warning)]);
    // Nothing in use at all: an empty pool is not short of anything.
    let h = verdict(&keeps_empty(), PoolActivity::default(), 0);
    assert_eq!(h.status, Status::Ok, "{h:?}");
}

fn keeps_empty() -> PoolView {
    let mut p = pool(0, 0, Some(10), 0);
    p.min_idle = Some(2);
    p
}

#[test]
fn recent_timeouts_are_critical_and_errors_a_warning() {
    let h = verdict(
        &pool(1, 1, Some(10), 0),
        PoolActivity {
            recent_timeouts: 2,
            recent_errors: 1,
            ..PoolActivity::default()
        },
        0,
    );
    assert_eq!(h.status, Status::Critical);
    assert_eq!(
        rules(&h),
        [
            ("acquire_timeouts", Status::Critical),
            ("acquire_errors", Status::Warning),
        ]
    );
    assert_eq!(
        h.reasons[0].detail,
        "2 acquires timed out in the last 5 min"
    );
    assert_eq!(
        h.reasons[1].detail,
        "1 acquire failed (no connection could be made) in the last 5 min"
    );
    let h = verdict(
        &pool(1, 1, Some(10), 0),
        PoolActivity {
            recent_timeouts: 32,
            saturated: true,
            ..PoolActivity::default()
        },
        0,
    );
    assert_eq!(
        h.reasons[0].detail,
        "at least 32 acquires timed out in the last 5 min"
    );
}

#[test]
fn open_leak_reports_are_a_warning() {
    let h = verdict(&pool(1, 1, Some(10), 0), PoolActivity::default(), 2);
    assert_eq!(rules(&h), [("open_leaks", Status::Warning)]);
    assert_eq!(
        h.reasons[0].detail,
        "2 open leak reports on its connections (poolscope leaks)"
    );
}

#[test]
fn thresholds_are_the_configured_ones() {
    let t = HealthThresholds {
        warning_utilization: 0.5,
        critical_utilization: 0.6,
        long_wait_ns: 100_000_000,
        recent_ns: 60 * S,
    };
    let activity = PoolActivity {
        longest_wait_ns: Some(150_000_000),
        recent_errors: 1,
        ..PoolActivity::default()
    };
    let h = assess(&pool(6, 4, Some(10), 1), &activity, 0, &t);
    assert_eq!(
        rules(&h),
        [
            ("utilization", Status::Critical),
            ("long_wait", Status::Warning),
            ("acquire_errors", Status::Warning),
        ]
    );
    assert!(h.reasons[2].detail.ends_with("in the last 1 min"), "{h:?}");
}

fn report(json: serde_json::Value) -> LeakReport {
    let mut base = serde_json::json!({
        "id": 1, "kind": "leaked", "status": "open", "pid": 42, "process": "api",
        "evidence": "", "reported_at": "",
    });
    if let (Some(b), Some(extra)) = (base.as_object_mut(), json.as_object()) {
        b.extend(extra.clone());
    }
    serde_json::from_value(base).expect("a leak report")
}

#[test]
fn open_leaks_are_counted_per_pool_and_for_inferred_pools_per_server() {
    let reports = [
        report(serde_json::json!({"pool": "orders"})),
        report(serde_json::json!({"pool": "orders", "kind": "idle_in_transaction"})),
        // Not leaks: a busy holder, another process, another pool.
        report(serde_json::json!({"pool": "orders", "kind": "slow_holder"})),
        report(serde_json::json!({"pool": "orders", "pid": 7})),
        report(serde_json::json!({"pool": "billing"})),
        report(serde_json::json!({"server": "10.0.0.9:3306", "kind": "abandoned"})),
    ];
    let open = OpenLeaks::count(reports.iter().map(LeakReport::open_leak));
    let orders = pool(1, 1, Some(10), 0);
    assert_eq!(open.of(&orders), 2);
    let mut inferred = pool(1, 0, None, 0);
    inferred.from_adapter = false;
    inferred.name = "10.0.0.9:3306".into();
    inferred.server = Some("10.0.0.9:3306".into());
    assert_eq!(open.of(&inferred), 1);
    inferred.server = Some("10.0.0.9:3307".into());
    assert_eq!(open.of(&inferred), 0);
}

#[test]
fn the_response_status_is_the_worst_pool_and_ok_without_pools() {
    assert_eq!(HealthResponse::new(Vec::new()).status, Status::Ok);
    let views = [pool(1, 1, Some(10), 0), {
        let mut p = pool(9, 1, Some(10), 0);
        p.name = "billing".into();
        p
    }];
    let activity = HashMap::from([(
        (42, "orders".to_string()),
        PoolActivity {
            recent_errors: 1,
            ..PoolActivity::default()
        },
    )]);
    let r = assess_all(
        &views,
        &activity,
        &OpenLeaks::default(),
        &HealthThresholds::default(),
    );
    assert_eq!(r.status, Status::Critical);
    assert_eq!(
        r.pools.iter().map(|p| p.status).collect::<Vec<_>>(),
        [Status::Warning, Status::Critical]
    );
}
