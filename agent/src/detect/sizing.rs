//! Sizing advice: from a pool's measured use over a window (sampled:
//! connections in use, and the most in use at once between samples,
//! requests waiting, acquire timeouts; the acquire waits' P99), whether its
//! `max` should grow, shrink or stay, by how much and why. Pure: a pool's samples in, advice out (`/api/v1/sizing`,
//! `poolscope sizing`).
//!
//! The rules, in order (the first that applies decides):
//! 1. `unknown_max`: the adapter reports no `max`: nothing to size.
//! 2. `insufficient_data`: sampled for less than `min_observed_seconds`.
//! 3. `grow`: at max for at least [`GROW_AT_MAX_SHARE`] of the samples,
//!    with requests waiting (at a sample), acquire timeouts, or a P99 wait
//!    of at least [`GROW_P99_WAIT_S`]: to the peak demand seen (in use plus
//!    waiting), and at least a quarter more than now.
//! 4. `keep` (timeouts not from size): acquires timed out while the pool
//!    was never at max: the database or the network is slow to connect, a
//!    larger pool would not help.
//! 5. `shrink`: never at max, nobody waiting, no timeouts, sampled for at
//!    least half the window, and the peak in use at most
//!    [`SHRINK_PEAK_SHARE`] of max: to the peak with [`SHRINK_HEADROOM`]
//!    to spare, no lower than `min_idle` or [`SMALLEST_MAX`].
//! 6. `keep`: anything else.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::lifecycle::{PoolActivity, PoolView};

/// Share of samples at max from which a pool with waiters should grow.
pub const GROW_AT_MAX_SHARE: f64 = 0.05;
/// A P99 acquire wait from which a pool often at max should grow.
pub const GROW_P99_WAIT_S: f64 = 0.1;
/// Growth at least this factor of the current max.
pub const GROW_FACTOR: f64 = 1.25;
/// A pool whose peak use stays at or below this share of max may shrink.
pub const SHRINK_PEAK_SHARE: f64 = 0.5;
/// Room kept above the peak when shrinking.
pub const SHRINK_HEADROOM: f64 = 1.3;
/// Never advise a max below this.
pub const SMALLEST_MAX: u32 = 2;
/// Requests count as waiting at a sample once the oldest has waited this
/// long: an acquire the pool is serving at once is not a wait.
pub const WAITING_FROM_NS: u64 = 1_000_000;
/// The window is kept in this many buckets.
const BUCKETS: u64 = 60;

/// What one sample saw of a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageSample {
    /// In use at the sample.
    pub used: u64,
    /// The most in use at once since the previous sample (at least `used`).
    pub peak_used: u64,
    pub idle: u64,
    pub pending: u64,
    pub max: Option<u32>,
    /// The pool's acquire timeouts so far (a running count).
    pub timeouts_total: u64,
}

/// The samples of one bucket (a sixtieth of the window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    index: u64,
    samples: u64,
    at_max: u64,
    waiting: u64,
    peak_used: u64,
    peak_demand: u64,
    used_sum: u64,
    idle_sum: u64,
    timeouts: u64,
    first_ns: u64,
    last_ns: u64,
}

/// A pool's sampled use over the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageHistory {
    buckets: VecDeque<Bucket>,
    last_timeouts_total: Option<u64>,
}

/// A window's worth of samples, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSummary {
    pub samples: u64,
    /// From the first sample in the window to the last.
    pub observed_seconds: f64,
    pub peak_used: u64,
    /// In use plus waiting, at its highest.
    pub peak_demand: u64,
    pub mean_used: f64,
    /// Share of samples with every connection of max in use.
    pub at_max_share: f64,
    /// Share of samples with requests waiting.
    pub waiting_share: f64,
    /// Share of the pool's open connections that were idle, over the samples.
    pub idle_share: f64,
    /// Acquires that timed out within the window.
    pub timeouts: u64,
}

impl UsageHistory {
    /// Adds a sample taken at `now_ns`, for a window of `window_ns`.
    pub fn sample(&mut self, now_ns: u64, window_ns: u64, s: UsageSample) {
        let width = (window_ns / BUCKETS).max(1);
        let index = now_ns / width;
        while self
            .buckets
            .front()
            .is_some_and(|b| b.index + BUCKETS <= index)
        {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.index < index) {
            self.buckets.push_back(Bucket {
                index,
                first_ns: now_ns,
                ..Bucket::default()
            });
        }
        let Some(b) = self.buckets.back_mut() else {
            return;
        };
        // The count restarts when the pool registers again: no negative.
        let new_timeouts = match self.last_timeouts_total {
            Some(last) if s.timeouts_total >= last => s.timeouts_total - last,
            _ => 0,
        };
        self.last_timeouts_total = Some(s.timeouts_total);
        b.samples += 1;
        b.last_ns = now_ns;
        let at_max = s.max.is_some_and(|m| m > 0 && s.used >= u64::from(m));
        b.at_max += u64::from(at_max);
        b.waiting += u64::from(s.pending > 0);
        let peak = s.peak_used.max(s.used);
        b.peak_used = b.peak_used.max(peak);
        b.peak_demand = b.peak_demand.max(peak).max(s.used + s.pending);
        b.used_sum += s.used;
        b.idle_sum += s.idle;
        b.timeouts += new_timeouts;
    }

    /// The samples within `window_ns` of `now_ns`.
    pub fn summary(&self, now_ns: u64, window_ns: u64) -> UsageSummary {
        let width = (window_ns / BUCKETS).max(1);
        let index = now_ns / width;
        let mut sum = UsageSummary::default();
        let (mut used, mut idle, mut at_max, mut waiting) = (0u64, 0u64, 0u64, 0u64);
        let (mut first, mut last) = (None, 0u64);
        for b in self
            .buckets
            .iter()
            .filter(|b| b.index + BUCKETS > index && b.samples > 0)
        {
            sum.samples += b.samples;
            sum.peak_used = sum.peak_used.max(b.peak_used);
            sum.peak_demand = sum.peak_demand.max(b.peak_demand);
            sum.timeouts += b.timeouts;
            used += b.used_sum;
            idle += b.idle_sum;
            at_max += b.at_max;
            waiting += b.waiting;
            first.get_or_insert(b.first_ns);
            last = b.last_ns;
        }
        if sum.samples == 0 {
            return sum;
        }
        let n = sum.samples as f64;
        sum.observed_seconds = last.saturating_sub(first.unwrap_or(last)) as f64 / 1e9;
        sum.mean_used = used as f64 / n;
        sum.at_max_share = at_max as f64 / n;
        sum.waiting_share = waiting as f64 / n;
        sum.idle_share = if used + idle > 0 {
            idle as f64 / (used + idle) as f64
        } else {
            0.0
        };
        sum
    }
}

/// What to do with a pool's max.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Grow,
    Shrink,
    Keep,
    InsufficientData,
    UnknownMax,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Grow => "grow",
            Verdict::Shrink => "shrink",
            Verdict::Keep => "keep",
            Verdict::InsufficientData => "insufficient_data",
            Verdict::UnknownMax => "unknown_max",
        }
    }
}

/// The advice for one pool, with the numbers it rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advice {
    pub verdict: Verdict,
    pub max: Option<u32>,
    /// The max advised (none unless `grow` or `shrink`).
    pub recommended_max: Option<u32>,
    /// One line a person reads: "max 10 -> 14: at max for 12 % of the
    /// last 60 min, p99 wait 1.20 s".
    pub reason: String,
    pub usage: UsageSummary,
    /// The P99 acquire wait over the window, where known.
    pub p99_wait_seconds: Option<f64>,
}

/// How long a window and how much of it must be sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizingWindow {
    pub window_ns: u64,
    pub min_observed_ns: u64,
}

fn percent(share: f64) -> String {
    format!("{:.0} %", share * 100.0)
}

fn span(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s >= 60 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

fn wait_text(p99: Option<f64>) -> String {
    match p99 {
        Some(s) if s >= 1.0 => format!("p99 wait {s:.2} s"),
        Some(s) => format!("p99 wait {:.1} ms", s * 1e3),
        None => "no acquire measured".to_string(),
    }
}

/// The advice for a pool of `max` (and `min_idle`) from its use.
pub fn advise(
    max: Option<u32>,
    min_idle: Option<u32>,
    usage: UsageSummary,
    p99_wait_seconds: Option<f64>,
    window: SizingWindow,
) -> Advice {
    let advice = |verdict, recommended_max, reason: String| Advice {
        verdict,
        max,
        recommended_max,
        reason,
        usage,
        p99_wait_seconds,
    };
    let Some(max) = max.filter(|m| *m > 0) else {
        return advice(
            Verdict::UnknownMax,
            None,
            "the pool's adapter reports no max: nothing to size".into(),
        );
    };
    let last = span(window.window_ns);
    let observed_ns = (usage.observed_seconds * 1e9) as u64;
    if usage.samples == 0 || observed_ns < window.min_observed_ns {
        return advice(
            Verdict::InsufficientData,
            None,
            format!(
                "sampled for {} of the {} needed",
                span(observed_ns),
                span(window.min_observed_ns)
            ),
        );
    }
    let waits = usage.waiting_share > 0.0
        || usage.timeouts > 0
        || p99_wait_seconds.is_some_and(|w| w >= GROW_P99_WAIT_S);
    if usage.at_max_share >= GROW_AT_MAX_SHARE && waits {
        let by_factor = (f64::from(max) * GROW_FACTOR).ceil() as u64;
        let target = usage.peak_demand.max(by_factor).max(u64::from(max) + 1);
        let target = u32::try_from(target).unwrap_or(u32::MAX);
        let mut reason = format!(
            "max {max} -> {target}: at max for {} of the last {last}, {}",
            percent(usage.at_max_share),
            wait_text(p99_wait_seconds)
        );
        if usage.waiting_share > 0.0 {
            reason.push_str(&format!(
                ", requests waiting in {} of samples (peak demand {})",
                percent(usage.waiting_share),
                usage.peak_demand
            ));
        }
        if usage.timeouts > 0 {
            reason.push_str(&format!(", {} acquire timeouts", usage.timeouts));
        }
        return advice(Verdict::Grow, Some(target), reason);
    }
    if usage.timeouts > 0 && usage.at_max_share == 0.0 {
        return advice(
            Verdict::Keep,
            None,
            format!(
                "max {max}: {} acquire timeouts in the last {last} while never at max \
                 (peak {}): the database or network is slow to connect, a larger pool \
                 would not help",
                usage.timeouts, usage.peak_used
            ),
        );
    }
    let long_enough = observed_ns.saturating_mul(2) >= window.window_ns;
    let quiet = usage.at_max_share == 0.0 && usage.waiting_share == 0.0 && usage.timeouts == 0;
    if quiet && long_enough && (usage.peak_used as f64) <= f64::from(max) * SHRINK_PEAK_SHARE {
        let target = ((usage.peak_used as f64) * SHRINK_HEADROOM).ceil() as u32;
        let target = target.max(min_idle.unwrap_or(0)).max(SMALLEST_MAX);
        if target < max {
            return advice(
                Verdict::Shrink,
                Some(target),
                format!(
                    "max {max} -> {target}: peak {} in the last {last} ({} of max), \
                     idle {} of the time, never at max",
                    usage.peak_used,
                    percent(usage.peak_used as f64 / f64::from(max)),
                    percent(usage.idle_share)
                ),
            );
        }
    }
    advice(
        Verdict::Keep,
        None,
        format!(
            "max {max} fits: peak {} ({} of max) in the last {last}, at max {} of the time, {}",
            usage.peak_used,
            percent(usage.peak_used as f64 / f64::from(max)),
            percent(usage.at_max_share),
            wait_text(p99_wait_seconds)
        ),
    )
}

/// Every adapter pool's sampled use (inferred pools have no max to size).
#[derive(Debug, Default)]
pub struct PoolUsage {
    pools: HashMap<(u32, String), UsageHistory>,
}

/// One pool's advice, as `/api/v1/sizing` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolAdvice {
    pub pid: u32,
    pub process: String,
    pub pool: String,
    #[serde(flatten)]
    pub advice: Advice,
}

/// `/api/v1/sizing`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizingResponse {
    /// The span the advice looks back over.
    pub window_seconds: u64,
    pub pools: Vec<PoolAdvice>,
}

impl PoolUsage {
    /// Samples every adapter pool of `views` at `now_ns`, and forgets the
    /// pools no longer among them. `activity` says how long each pool's
    /// oldest request has waited: requests count as waiting once it is
    /// [`WAITING_FROM_NS`]; `peak_used` gives the most in use at once since
    /// the previous sample.
    pub fn sample(
        &mut self,
        now_ns: u64,
        window_ns: u64,
        views: &[PoolView],
        activity: &HashMap<(u32, String), PoolActivity>,
        mut peak_used: impl FnMut(&PoolView) -> u64,
    ) {
        let live: HashSet<(u32, &str)> = views
            .iter()
            .filter(|v| v.from_adapter)
            .map(|v| (v.pid, v.name.as_str()))
            .collect();
        self.pools
            .retain(|(pid, name), _| live.contains(&(*pid, name.as_str())));
        for v in views.iter().filter(|v| v.from_adapter) {
            let key = (v.pid, v.name.clone());
            let waited_long = activity
                .get(&key)
                .and_then(|a| a.longest_wait_ns)
                .is_some_and(|w| w >= WAITING_FROM_NS);
            let sample = UsageSample {
                used: v.used,
                peak_used: peak_used(v),
                idle: v.idle,
                pending: if waited_long { v.pending } else { 0 },
                max: v.max,
                timeouts_total: v.timeouts,
            };
            self.pools
                .entry(key)
                .or_default()
                .sample(now_ns, window_ns, sample);
        }
    }

    /// The advice for every adapter pool of `views`, `p99_wait` giving a
    /// pool's P99 acquire wait where known.
    pub fn advice(
        &self,
        views: &[PoolView],
        now_ns: u64,
        window: SizingWindow,
        p99_wait: impl Fn(&PoolView) -> Option<f64>,
    ) -> Vec<PoolAdvice> {
        views
            .iter()
            .filter(|v| v.from_adapter)
            .map(|v| {
                let usage = self
                    .pools
                    .get(&(v.pid, v.name.clone()))
                    .map(|h| h.summary(now_ns, window.window_ns))
                    .unwrap_or_default();
                PoolAdvice {
                    pid: v.pid,
                    process: v.process.clone(),
                    pool: v.name.clone(),
                    advice: advise(v.max, v.min_idle, usage, p99_wait(v), window),
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "sizing_tests.rs"]
mod tests;
