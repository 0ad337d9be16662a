//! Each sizing rule on a pool made to match it, and just short of it.

use super::*;

const S: u64 = 1_000_000_000;
const HOUR: SizingWindow = SizingWindow {
    window_ns: 3600 * S,
    min_observed_ns: 600 * S,
};

/// A pool of `max` sampled every 5 s for `minutes`, `sample(i)` giving the
/// i-th sample's (used, idle, pending, timeouts so far).
fn history(
    max: u32,
    minutes: u64,
    sample: impl Fn(u64) -> (u64, u64, u64, u64),
) -> (UsageHistory, u64) {
    let mut h = UsageHistory::default();
    // On a bucket's edge, so that every sample of the hour is inside it.
    let start = 100 * 3600 * S;
    let n = minutes * 12;
    for i in 0..n {
        let (used, idle, pending, timeouts_total) = sample(i);
        h.sample(
            start + i * 5 * S,
            HOUR.window_ns,
            UsageSample {
                used,
                peak_used: used,
                idle,
                pending,
                max: Some(max),
                timeouts_total,
            },
        );
    }
    (h, start + n.saturating_sub(1) * 5 * S)
}

fn advice_for(max: u32, h: &UsageHistory, now: u64, p99: Option<f64>) -> Advice {
    advise(Some(max), None, h.summary(now, HOUR.window_ns), p99, HOUR)
}

#[test]
fn a_pool_often_at_max_with_waiters_grows_to_its_peak_demand() {
    // At max (10) one sample in eight, with 4 waiting then: demand 14.
    let (h, now) = history(10, 60, |i| {
        if i % 8 == 0 {
            (10, 0, 4, 0)
        } else {
            (6, 4, 0, 0)
        }
    });
    let a = advice_for(10, &h, now, Some(1.2));
    assert_eq!(a.verdict, Verdict::Grow, "{a:?}");
    assert_eq!(a.recommended_max, Some(14));
    assert!(
        a.reason
            .starts_with("max 10 -> 14: at max for 12 % of the last 1 h, p99 wait 1.20 s"),
        "{}",
        a.reason
    );
    assert!((a.usage.at_max_share - 0.125).abs() < 1e-9);
    assert_eq!(a.usage.peak_demand, 14);
}

#[test]
fn growth_is_at_least_a_quarter_and_needs_waits() {
    // At max a fifth of the time, nobody ever waits, no timeouts, short
    // waits: the pool is well used, not too small.
    let (h, now) = history(8, 30, |i| {
        if i % 5 == 0 {
            (8, 0, 0, 0)
        } else {
            (5, 3, 0, 0)
        }
    });
    assert_eq!(advice_for(8, &h, now, Some(0.002)).verdict, Verdict::Keep);
    // The same with a P99 wait of 100 ms: grow, by a quarter (demand is 8).
    let a = advice_for(8, &h, now, Some(0.1));
    assert_eq!(
        (a.verdict, a.recommended_max),
        (Verdict::Grow, Some(10)),
        "{a:?}"
    );
    // At max just under 5 % of the samples, with timeouts: not grown.
    let (h, now) = history(8, 60, |i| {
        if i % 21 == 0 {
            (8, 0, 1, i / 21)
        } else {
            (5, 3, 0, i / 21)
        }
    });
    let a = advice_for(8, &h, now, Some(0.3));
    assert!(a.usage.at_max_share < GROW_AT_MAX_SHARE, "{a:?}");
    assert_ne!(a.verdict, Verdict::Grow, "{a:?}");
}

#[test]
fn timeouts_without_the_pool_at_max_are_not_a_size_problem() {
    let (h, now) = history(10, 20, |i| (3, 2, 0, i / 40));
    let a = advice_for(10, &h, now, Some(2.0));
    assert_eq!((a.verdict, a.recommended_max), (Verdict::Keep, None));
    assert_eq!(a.usage.timeouts, 5);
    assert!(a.reason.contains("slow to connect"), "{}", a.reason);
}

#[test]
fn a_pool_that_never_uses_half_shrinks_to_its_peak_with_headroom() {
    // Max 40, peak 9: 9 x 1.3 = 11.7 -> 12.
    let (h, now) = history(40, 60, |i| (if i == 100 { 9 } else { 3 }, 20, 0, 0));
    let a = advice_for(40, &h, now, Some(0.0));
    assert_eq!(
        (a.verdict, a.recommended_max),
        (Verdict::Shrink, Some(12)),
        "{a:?}"
    );
    assert!(
        a.reason.starts_with("max 40 -> 12: peak 9 in the last 1 h"),
        "{}",
        a.reason
    );
    // Never below min_idle, nor below 2.
    let s = h.summary(now, HOUR.window_ns);
    let a = advise(Some(40), Some(15), s, None, HOUR);
    assert_eq!(a.recommended_max, Some(15));
    let (idle_pool, now) = history(40, 60, |_| (0, 1, 0, 0));
    let a = advice_for(40, &idle_pool, now, None);
    assert_eq!(a.recommended_max, Some(SMALLEST_MAX));
}

#[test]
fn no_shrink_above_half_of_max_with_waiters_or_on_little_data() {
    // Peak 21 of 40: above half.
    let (h, now) = history(40, 60, |i| (if i == 7 { 21 } else { 3 }, 20, 0, 0));
    assert_eq!(advice_for(40, &h, now, None).verdict, Verdict::Keep);
    // Exactly half may shrink.
    let (h, now) = history(40, 60, |i| (if i == 7 { 20 } else { 3 }, 20, 0, 0));
    assert_eq!(advice_for(40, &h, now, None).verdict, Verdict::Shrink);
    // One sample with a waiter: keep.
    let (h, now) = history(40, 60, |i| (3, 20, u64::from(i == 9), 0));
    assert_eq!(advice_for(40, &h, now, None).verdict, Verdict::Keep);
    // Sampled for 20 minutes of the hour: more than the 10 needed to
    // advise, less than the half needed to shrink.
    let (h, now) = history(40, 20, |_| (3, 20, 0, 0));
    let a = advice_for(40, &h, now, None);
    assert_eq!(a.verdict, Verdict::Keep, "{a:?}");
    assert!(
        a.reason.starts_with("max 40 fits: peak 3 (8 % of max)"),
        "{}",
        a.reason
    );
}

#[test]
fn too_few_samples_or_no_max_give_no_advice() {
    let (h, now) = history(10, 5, |_| (10, 0, 3, 0));
    let a = advice_for(10, &h, now, Some(3.0));
    assert_eq!(a.verdict, Verdict::InsufficientData, "{a:?}");
    assert_eq!(a.reason, "sampled for 4 min of the 10 min needed");
    let a = advise(None, None, h.summary(now, HOUR.window_ns), None, HOUR);
    assert_eq!(a.verdict, Verdict::UnknownMax);
    let a = advise(Some(5), None, UsageSummary::default(), None, HOUR);
    assert_eq!(a.verdict, Verdict::InsufficientData);
}

#[test]
fn samples_older_than_the_window_are_forgotten() {
    // Exhausted for the first hour, then quiet for an hour.
    let (mut h, mut now) = history(10, 60, |_| (10, 0, 5, 0));
    for i in 1..=720 {
        now += 5 * S;
        let s = UsageSample {
            used: 2,
            peak_used: 2,
            idle: 8,
            pending: 0,
            max: Some(10),
            timeouts_total: 0,
        };
        h.sample(now, HOUR.window_ns, s);
        if i == 360 {
            let half = h.summary(now, HOUR.window_ns);
            assert!(
                half.at_max_share > 0.4 && half.at_max_share < 0.6,
                "{half:?}"
            );
        }
    }
    let s = h.summary(now, HOUR.window_ns);
    assert_eq!((s.peak_used, s.at_max_share), (2, 0.0), "{s:?}");
    assert!(h.buckets.len() <= BUCKETS as usize);
    assert!((s.idle_share - 0.8).abs() < 1e-9);
    assert_eq!(advice_for(10, &h, now, None).verdict, Verdict::Shrink);
}

#[test]
fn a_restarted_timeout_count_adds_nothing() {
    let mut h = UsageHistory::default();
    for (i, total) in [5u64, 7, 1, 2].into_iter().enumerate() {
        let s = UsageSample {
            used: 1,
            peak_used: 1,
            idle: 1,
            pending: 0,
            max: Some(4),
            timeouts_total: total,
        };
        h.sample(i as u64 * S, HOUR.window_ns, s);
    }
    // 5 -> 7 is 2; 7 -> 1 is a restart; 1 -> 2 is 1.
    assert_eq!(h.summary(3 * S, HOUR.window_ns).timeouts, 3);
}

#[test]
fn the_peak_between_samples_counts_toward_peak_and_demand_not_time_at_max() {
    let mut h = UsageHistory::default();
    let s = UsageSample {
        used: 0,
        peak_used: 3,
        idle: 4,
        pending: 0,
        max: Some(4),
        timeouts_total: 0,
    };
    h.sample(S, HOUR.window_ns, s);
    let sum = h.summary(S, HOUR.window_ns);
    assert_eq!((sum.peak_used, sum.peak_demand), (3, 3));
    assert_eq!((sum.mean_used, sum.at_max_share), (0.0, 0.0));
}
