//! Latency percentiles (P50, P95, P99) over a sliding window: acquire
//! waits and use times per pool, round trips per server and operation.
//!
//! Each window is a ring of HdrHistograms, one per step of [`STEP_NS`];
//! asking for percentiles merges the steps still inside [`WINDOW_NS`]. A
//! step's histogram is reused when it falls out of the window, so recording
//! allocates only when a histogram grows to a larger value than it held.
//!
//! Accuracy: a percentile is the value at its rank among the samples of the
//! window (nearest rank, no interpolation), quantized by HdrHistogram with
//! two significant digits: at or below the exact value, and below it by
//! less than 1 % or [`RESOLUTION_NS`] (whichever is larger). The window covers
//! the last [`WINDOW_NS`] less the part of the current step not yet
//! elapsed, and at most one step more.

use std::collections::{HashMap, VecDeque};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{
    lifecycle::{fast_hash::NumberMap, Endpoint},
    protocol::DbSystem,
};

/// The span the percentiles cover.
pub const WINDOW_NS: u64 = 300 * 1_000_000_000;

/// The window slides by this much at a time.
pub const STEP_NS: u64 = 30 * 1_000_000_000;

/// Steps in a window.
const STEPS: u64 = WINDOW_NS / STEP_NS;

/// Values below this are not told apart (HdrHistogram's lowest
/// discernible value, rounded down to a power of two).
pub const RESOLUTION_NS: u64 = 512;

/// The lowest discernible value HdrHistogram is given: its unit is the
/// largest power of two at or below it ([`RESOLUTION_NS`]).
const LOWEST_DISCERNIBLE_NS: u64 = 1_000;

/// Two significant digits: a value is kept to within 1 %.
const SIGNIFICANT_DIGITS: u8 = 2;

/// Histograms start as narrow as they can and grow to the largest value
/// recorded.
const INITIAL_HIGHEST_NS: u64 = 2 * LOWEST_DISCERNIBLE_NS;

/// What every histogram may hold together. A histogram grows by 512 bytes
/// for each doubling of its largest value, to 14 KiB for an hour; any local
/// user can make pools and claim waits, so past this budget a histogram no
/// longer grows: a larger value counts as the largest it keeps.
pub const MAX_HISTOGRAM_BYTES: usize = 32 << 20;

/// A histogram's own size beside its counts.
const HISTOGRAM_OVERHEAD_BYTES: usize = std::mem::size_of::<Histogram<u32>>();

fn bytes_of(histogram: &Histogram<u32>) -> usize {
    HISTOGRAM_OVERHEAD_BYTES + histogram.distinct_values() * std::mem::size_of::<u32>()
}

/// Anything longer is recorded as this (an hour): an adapter may claim any
/// wait, and a histogram must not grow for it.
pub const LONGEST_NS: u64 = 3_600 * 1_000_000_000;

/// Pools with percentiles at most (the tracker keeps at most 1,024 adapter
/// pools; inferred pools have none).
pub const MAX_POOLS: usize = 1_024;

/// Server and operation pairs with percentiles at most.
pub const MAX_QUERY_SERIES: usize = 2_048;

/// P50, P95 and P99 (and the largest value) of a window, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples in the window.
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

fn new_histogram() -> Option<Histogram<u32>> {
    let mut histogram = Histogram::new_with_bounds(
        LOWEST_DISCERNIBLE_NS,
        INITIAL_HIGHEST_NS,
        SIGNIFICANT_DIGITS,
    )
    .ok()?;
    histogram.auto(true);
    Some(histogram)
}

/// One series' samples over the sliding window.
#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    /// (step number, the samples of that step), oldest first; at most
    /// [`STEPS`] + 1 of them.
    steps: VecDeque<(u64, Histogram<u32>)>,
}

impl LatencyWindow {
    /// Records `value_ns` at `now_ns`; `bytes` is what all histograms hold
    /// (see [`MAX_HISTOGRAM_BYTES`]), kept up to date. False if the sample
    /// was not recorded: it needed a new histogram past the budget.
    pub fn record(&mut self, value_ns: u64, now_ns: u64, bytes: &mut usize) -> bool {
        let Some(histogram) = self.current(now_ns, bytes) else {
            return false;
        };
        let value = value_ns.min(LONGEST_NS);
        if value > histogram.high() && *bytes >= MAX_HISTOGRAM_BYTES {
            histogram.saturating_record(value);
            return true;
        }
        let before = bytes_of(histogram);
        // `record` grows the histogram to the value; were growing to fail,
        // the value counts as the largest kept.
        if histogram.record(value).is_err() {
            histogram.saturating_record(value);
        }
        *bytes = (*bytes + bytes_of(histogram)).saturating_sub(before);
        true
    }

    /// What its histograms hold.
    fn bytes(&self) -> usize {
        self.steps.iter().map(|(_, h)| bytes_of(h)).sum()
    }

    /// The histogram of `now_ns`'s step. A sample dated before the newest
    /// step (timestamps of different CPUs, or a batch read late) goes into
    /// the newest step: it is at most a step off.
    fn current(&mut self, now_ns: u64, bytes: &mut usize) -> Option<&mut Histogram<u32>> {
        // Within the newest step (the usual case): no division.
        let newest = self.steps.back().map(|(s, _)| *s);
        if newest.is_none_or(|n| now_ns >= (n + 1).saturating_mul(STEP_NS)) {
            let step = now_ns / STEP_NS;
            let mut reused = None;
            while self.steps.front().is_some_and(|(s, _)| s + STEPS <= step) {
                reused = self.steps.pop_front().map(|(_, h)| h);
            }
            let histogram = match reused {
                Some(mut h) => {
                    h.reset();
                    h
                }
                None if *bytes < MAX_HISTOGRAM_BYTES => {
                    let h = new_histogram()?;
                    *bytes += bytes_of(&h);
                    h
                }
                None => return None,
            };
            self.steps.push_back((step, histogram));
        }
        self.steps.back_mut().map(|(_, h)| h)
    }

    /// Whether no sample of it is inside the window at `now_ns`.
    pub fn is_stale(&self, now_ns: u64) -> bool {
        let step = now_ns / STEP_NS;
        self.steps.back().is_none_or(|(s, _)| s + STEPS <= step)
    }

    /// The percentiles of the samples inside the window at `now_ns`, or
    /// None if there are none.
    pub fn percentiles(&self, now_ns: u64) -> Option<Percentiles> {
        self.percentiles_of_last(STEPS, now_ns)
    }

    /// The percentiles of the samples of the newest `steps` steps at
    /// `now_ns` (the current one, partly over, and those before it).
    pub fn percentiles_of_last(&self, steps: u64, now_ns: u64) -> Option<Percentiles> {
        let step = now_ns / STEP_NS;
        let steps = steps.min(STEPS);
        let mut merged = new_histogram()?;
        for (s, histogram) in &self.steps {
            if s + steps > step {
                merged.add(histogram).ok()?;
            }
        }
        if merged.is_empty() {
            return None;
        }
        // The lowest value of the sample's bucket, so that zero is zero.
        let seconds = |ns: u64| merged.lowest_equivalent(ns) as f64 / 1e9;
        Some(Percentiles {
            count: merged.len(),
            p50: seconds(merged.value_at_quantile(0.50)),
            p95: seconds(merged.value_at_quantile(0.95)),
            p99: seconds(merged.value_at_quantile(0.99)),
            max: seconds(merged.max()),
        })
    }
}

/// A pool's acquire waits (every acquire, whatever its result: a caller
/// that timed out waited that long) and use times.
#[derive(Debug, Clone, Default)]
pub struct PoolLatency {
    pub wait: LatencyWindow,
    pub use_time: LatencyWindow,
}

/// One pool's percentiles, as the API shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolPercentiles {
    pub wait_seconds: Option<Percentiles>,
    pub use_seconds: Option<Percentiles>,
}

/// Round-trip percentiles of one server and operation, as the API shows
/// them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryPercentiles {
    pub db_system: String,
    pub server: String,
    /// The operation (`SELECT`, `GET`, ...), or none where the parser
    /// named none.
    pub operation: Option<String>,
    pub duration_seconds: Percentiles,
}

/// The windows of every pool and every server and operation, bounded.
#[derive(Debug, Default)]
pub struct Latencies {
    pools: HashMap<u32, HashMap<String, PoolLatency>>,
    pool_count: usize,
    /// Operation windows by server; "" is a round trip of no operation.
    /// The cheap hash: servers are the kernel's remote addresses, operation
    /// names a bounded vocabulary, and both maps are bounded; this runs for
    /// every round trip.
    queries: NumberMap<Endpoint, (DbSystem, NumberMap<String, LatencyWindow>)>,
    query_count: usize,
    /// When stale windows are next dropped (the start of the next step).
    next_sweep_ns: u64,
    /// What the histograms hold (recounted at every sweep).
    bytes: usize,
    /// Samples not recorded because their series would pass a bound, or
    /// their histogram the memory budget.
    pub refused: u64,
}

impl Latencies {
    /// Records a pool's acquire waits and use times at `now_ns`; its
    /// windows are made on its first sample unless that passes
    /// [`MAX_POOLS`].
    pub fn record_pool(
        &mut self,
        pid: u32,
        pool: &str,
        now_ns: u64,
        waits_ns: &[u64],
        uses_ns: &[u64],
    ) {
        self.sweep(now_ns);
        let pools = self.pools.entry(pid).or_default();
        if !pools.contains_key(pool) {
            if self.pool_count >= MAX_POOLS {
                self.refused += 1;
                return;
            }
            pools.insert(pool.to_string(), PoolLatency::default());
            self.pool_count += 1;
        }
        let Some(p) = pools.get_mut(pool) else {
            return;
        };
        let mut missed = 0;
        for wait in waits_ns {
            missed += u64::from(!p.wait.record(*wait, now_ns, &mut self.bytes));
        }
        for used in uses_ns {
            missed += u64::from(!p.use_time.record(*used, now_ns, &mut self.bytes));
        }
        self.refused += missed;
    }

    /// Records a round trip of `duration_ns` ended at `end_ns`.
    pub fn record_query(
        &mut self,
        system: DbSystem,
        server: &Endpoint,
        operation: Option<&str>,
        duration_ns: u64,
        end_ns: u64,
    ) {
        self.sweep(end_ns);
        let operation = operation.unwrap_or("");
        // The usual case, a series seen before: one lookup in each map.
        let known = self
            .queries
            .get_mut(server)
            .and_then(|(_, ops)| ops.get_mut(operation));
        let window = match known {
            Some(window) => window,
            None if self.query_count >= MAX_QUERY_SERIES => {
                self.refused += 1;
                return;
            }
            None => {
                self.query_count += 1;
                self.queries
                    .entry(server.clone())
                    .or_insert_with(|| (system, NumberMap::default()))
                    .1
                    .entry(operation.to_string())
                    .or_default()
            }
        };
        if !window.record(duration_ns, end_ns, &mut self.bytes) {
            self.refused += 1;
        }
    }

    /// Drops the windows with nothing inside the window, once a step.
    fn sweep(&mut self, now_ns: u64) {
        if now_ns < self.next_sweep_ns {
            return;
        }
        self.next_sweep_ns = (now_ns / STEP_NS + 1).saturating_mul(STEP_NS);
        for pools in self.pools.values_mut() {
            pools.retain(|_, p| !(p.wait.is_stale(now_ns) && p.use_time.is_stale(now_ns)));
        }
        self.pools.retain(|_, pools| !pools.is_empty());
        self.pool_count = self.pools.values().map(HashMap::len).sum();
        for (_, ops) in self.queries.values_mut() {
            ops.retain(|_, w| !w.is_stale(now_ns));
        }
        self.queries.retain(|_, (_, ops)| !ops.is_empty());
        self.query_count = self.queries.values().map(|(_, ops)| ops.len()).sum();
        let pool_bytes: usize = self
            .pools
            .values()
            .flat_map(HashMap::values)
            .map(|p| p.wait.bytes() + p.use_time.bytes())
            .sum();
        let query_bytes: usize = self
            .queries
            .values()
            .flat_map(|(_, ops)| ops.values())
            .map(LatencyWindow::bytes)
            .sum();
        self.bytes = pool_bytes + query_bytes;
    }

    /// What the histograms hold now.
    pub fn histogram_bytes(&self) -> usize {
        self.bytes
    }

    /// The pool's percentiles at `now_ns` (none if it had no sample within
    /// the window).
    pub fn pool_percentiles(&self, pid: u32, pool: &str, now_ns: u64) -> PoolPercentiles {
        match self.pools.get(&pid).and_then(|p| p.get(pool)) {
            Some(p) => PoolPercentiles {
                wait_seconds: p.wait.percentiles(now_ns),
                use_seconds: p.use_time.percentiles(now_ns),
            },
            None => PoolPercentiles::default(),
        }
    }

    /// The P99 of the pool's acquire waits in the current step and the one
    /// before (30 to 60 s), seconds: the live page's trend.
    pub fn pool_recent_wait_p99(&self, pid: u32, pool: &str, now_ns: u64) -> Option<f64> {
        let pool = self.pools.get(&pid)?.get(pool)?;
        Some(pool.wait.percentiles_of_last(2, now_ns)?.p99)
    }

    /// Every server and operation with round trips within the window,
    /// slowest P99 first.
    pub fn query_percentiles(&self, now_ns: u64) -> Vec<QueryPercentiles> {
        let mut out: Vec<QueryPercentiles> = self
            .queries
            .iter()
            .flat_map(|(server, (system, ops))| {
                ops.iter().filter_map(move |(operation, window)| {
                    Some(QueryPercentiles {
                        db_system: system.as_str().to_string(),
                        server: server.to_string(),
                        operation: (!operation.is_empty()).then(|| operation.clone()),
                        duration_seconds: window.percentiles(now_ns)?,
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.duration_seconds
                .p99
                .total_cmp(&a.duration_seconds.p99)
                .then_with(|| (&a.server, &a.operation).cmp(&(&b.server, &b.operation)))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// A deterministic spread of latencies from 1 µs to 10 s, evenly on a
    /// log scale (a 64-bit LCG, so that the test needs no crate).
    fn samples(n: usize) -> Vec<u64> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
                (1e3 * 1e7f64.powf(unit)) as u64
            })
            .collect()
    }

    /// The nearest-rank percentile of sorted values.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    fn assert_close(estimate_s: f64, exact_ns: u64, what: &str) {
        let estimate = (estimate_s * 1e9).round() as u64;
        let allowed = (exact_ns / 100).max(RESOLUTION_NS);
        assert!(
            estimate <= exact_ns && exact_ns - estimate < allowed,
            "{what}: {estimate} ns for an exact {exact_ns} ns (allowed - {allowed})"
        );
    }

    #[test]
    fn percentiles_are_within_the_stated_accuracy_of_the_exact_ones() {
        for n in [1, 7, 100, 100_000] {
            let values = samples(n);
            let mut window = LatencyWindow::default();
            let mut bytes = 0;
            // Spread over the window's steps, all still inside it at `now`.
            let now = 10 * WINDOW_NS;
            for (i, v) in values.iter().enumerate() {
                let at = now - WINDOW_NS + STEP_NS + (i as u64 * (WINDOW_NS - STEP_NS) / n as u64);
                window.record(*v, at, &mut bytes);
            }
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let p = window.percentiles(now).expect("samples");
            assert_eq!(p.count, n as u64);
            assert_close(p.p50, exact(&sorted, 0.50), &format!("p50 of {n}"));
            assert_close(p.p95, exact(&sorted, 0.95), &format!("p95 of {n}"));
            assert_close(p.p99, exact(&sorted, 0.99), &format!("p99 of {n}"));
            assert_close(
                p.max,
                *sorted.last().expect("n > 0"),
                &format!("max of {n}"),
            );
        }
    }

    #[test]
    fn short_values_are_kept_to_the_resolution_and_zero_is_zero() {
        let mut window = LatencyWindow::default();
        let mut bytes = 0;
        for _ in 0..99 {
            window.record(0, S, &mut bytes);
        }
        window.record(40_000, S, &mut bytes);
        let p = window.percentiles(S).expect("samples");
        assert_eq!((p.p50, p.p95), (0.0, 0.0), "{p:?}");
        assert_close(p.p99, 0, "p99");
        assert_close(p.max, 40_000, "max");
    }

    #[test]
    fn samples_leave_the_window_a_step_at_a_time() {
        let mut window = LatencyWindow::default();
        let mut bytes = 0;
        let start = 100 * STEP_NS;
        window.record(5_000_000, start, &mut bytes); // 5 ms, in the first step
        window.record(1_000_000, start + 2 * STEP_NS, &mut bytes); // 1 ms, two steps on
        let both = window.percentiles(start + 3 * STEP_NS).expect("both");
        assert_eq!(both.count, 2);
        // The first step ends WINDOW_NS after it began: its sample is out.
        let later = window
            .percentiles(start + WINDOW_NS)
            .expect("the second sample");
        assert_eq!(later.count, 1);
        assert_close(later.max, 1_000_000, "the 1 ms left");
        assert!(window
            .percentiles(start + 2 * STEP_NS + WINDOW_NS)
            .is_none());
        assert!(window.is_stale(start + 2 * STEP_NS + WINDOW_NS));
        // A step reused after falling out holds only its new samples.
        window.record(2_000_000, start + 20 * STEP_NS, &mut bytes);
        let reused = window.percentiles(start + 20 * STEP_NS).expect("new");
        assert_eq!(reused.count, 1);
        assert_close(reused.p50, 2_000_000, "the new sample");
        assert!(window.steps.len() <= STEPS as usize + 1);
    }

    #[test]
    fn the_last_steps_alone_give_the_recent_percentiles() {
        let mut l = Latencies::default();
        let start = 100 * STEP_NS;
        // 1 s waits four steps back, 10 ms ones in the last two steps.
        l.record_pool(1, "p", start, &[1_000_000_000; 20], &[]);
        l.record_pool(1, "p", start + 3 * STEP_NS, &[10_000_000; 5], &[]);
        l.record_pool(1, "p", start + 4 * STEP_NS, &[10_000_000; 5], &[]);
        let now = start + 4 * STEP_NS + 1;
        let recent = l.pool_recent_wait_p99(1, "p", now).expect("recent waits");
        assert_close(recent, 10_000_000, "the last minute's p99");
        let window = l
            .pool_percentiles(1, "p", now)
            .wait_seconds
            .expect("window");
        assert_close(window.p99, 1_000_000_000, "the window's p99");
        assert_eq!(l.pool_recent_wait_p99(1, "q", now), None);
        // A minute with no acquire has no recent p99.
        assert_eq!(l.pool_recent_wait_p99(1, "p", start + 6 * STEP_NS), None);
    }

    #[test]
    fn a_late_sample_counts_in_the_newest_step_and_a_huge_one_is_capped() {
        let mut window = LatencyWindow::default();
        let mut bytes = 0;
        window.record(1_000, 50 * STEP_NS, &mut bytes);
        window.record(u64::MAX, 49 * STEP_NS, &mut bytes);
        let p = window.percentiles(50 * STEP_NS).expect("samples");
        assert_eq!(p.count, 2);
        assert_close(p.max, LONGEST_NS, "capped");
        assert_eq!(window.steps.len(), 1);
        assert_eq!(bytes, window.bytes(), "kept up to date");
    }

    #[test]
    fn histograms_stop_growing_at_the_memory_budget() {
        let mut l = Latencies::default();
        let now = 40 * STEP_NS;
        l.record_pool(0, "early", now, &[1_000], &[]);
        let server = Endpoint::Inet("127.0.0.1:6379".parse().expect("address"));
        // Every series claims an hour: each histogram grows to ~14 KiB
        // until the budget is spent.
        for i in 0..MAX_QUERY_SERIES {
            let op = format!("OP{i}");
            l.record_query(DbSystem::Redis, &server, Some(&op), LONGEST_NS, now);
        }
        for pid in 2..MAX_POOLS as u32 {
            l.record_pool(pid, "p", now, &[LONGEST_NS], &[LONGEST_NS]);
        }
        let held = l.histogram_bytes();
        assert!(held >= MAX_HISTOGRAM_BYTES, "{held}");
        assert!(
            held < MAX_HISTOGRAM_BYTES + 16 * 1024,
            "at most one growth past it: {held}"
        );
        assert!(l.refused > 0);
        // Past it no histogram is made, nor grows: a pool first seen now
        // gets none; one that has one counts a larger value as its largest.
        let refused = l.refused;
        l.record_pool(1, "late", now, &[1_000], &[]);
        assert_eq!(l.refused, refused + 1);
        assert_eq!(
            l.pool_percentiles(1, "late", now),
            PoolPercentiles::default()
        );
        l.record_pool(0, "early", now, &[LONGEST_NS], &[]);
        let wait = l
            .pool_percentiles(0, "early", now)
            .wait_seconds
            .expect("two");
        assert_eq!(wait.count, 2);
        assert!(wait.max < 0.01, "{wait:?}");
        assert_eq!(l.histogram_bytes(), held);
        // The next sweep recounts the same.
        l.record_pool(0, "early", now + STEP_NS, &[1_000], &[]);
        assert_eq!(l.histogram_bytes(), held);
    }

    #[test]
    fn pools_and_queries_are_bounded_and_stale_series_are_dropped() {
        let mut l = Latencies::default();
        let now = 40 * STEP_NS;
        for pid in 0..MAX_POOLS as u32 + 5 {
            l.record_pool(pid, "main", now, &[1_000], &[]);
        }
        assert_eq!(l.pool_count, MAX_POOLS);
        assert_eq!(l.refused, 5);
        let server: Endpoint = Endpoint::Unix("/run/postgresql/.s.PGSQL.5432".into());
        for i in 0..MAX_QUERY_SERIES + 3 {
            let op = format!("OP{i}");
            l.record_query(DbSystem::Postgresql, &server, Some(&op), 2_000, now);
        }
        assert_eq!(l.query_count, MAX_QUERY_SERIES);
        assert_eq!(l.refused, 8);
        assert!(l.pool_percentiles(3, "main", now).wait_seconds.is_some());
        // A window later everything is stale and dropped: room again.
        let later = now + WINDOW_NS + STEP_NS;
        l.record_query(DbSystem::Postgresql, &server, None, 3_000, later);
        assert_eq!((l.pool_count, l.query_count), (0, 1));
        let queries = l.query_percentiles(later);
        assert_eq!(queries.len(), 1);
        assert_eq!(queries[0].operation, None);
        assert_eq!(queries[0].db_system, "postgresql");
        assert_eq!(queries[0].duration_seconds.count, 1);
        assert_eq!(
            l.pool_percentiles(3, "main", later),
            PoolPercentiles::default()
        );
    }

    #[test]
    fn queries_are_listed_slowest_first() {
        let mut l = Latencies::default();
        let server = Endpoint::Inet("127.0.0.1:5432".parse().expect("address"));
        for (op, ns) in [
            ("SELECT", 100_000),
            ("UPDATE", 9_000_000),
            ("INSERT", 400_000),
        ] {
            l.record_query(DbSystem::Postgresql, &server, Some(op), ns, S);
        }
        let ops: Vec<_> = l
            .query_percentiles(S)
            .into_iter()
            .map(|q| q.operation.unwrap_or_default())
            .collect();
        assert_eq!(ops, ["UPDATE", "INSERT", "SELECT"]);
    }
}
