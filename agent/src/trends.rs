//! The last minutes of each pool, for the live page's charts: in use, its
//! max, requests waiting and the P99 acquire wait, sampled every
//! [`STEP_NS`] for [`SPAN_NS`]. Pure: the pipeline samples, the API reads.
//! Bounded by the pools the tracker keeps (1,024) times [`POINTS`].

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// How often pools are sampled.
pub const STEP_NS: u64 = 5 * 1_000_000_000;
/// How far back the charts go.
pub const SPAN_NS: u64 = 15 * 60 * 1_000_000_000;
/// Points per pool.
pub const POINTS: usize = (SPAN_NS / STEP_NS) as usize;

/// A pool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub used: u64,
    pub max: Option<u32>,
    pub pending: u64,
    /// P99 of the acquire waits of about the last minute, seconds.
    pub wait_p99_seconds: Option<f64>,
}

/// One pool's series as the API shows it: `points` are `[unix seconds,
/// used, waiting, p99 wait seconds or null]`, oldest first (compact: 180
/// of them per pool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolTrend {
    pub pid: u32,
    pub pool: String,
    /// The pool's max at the newest point, if it declared one.
    pub max: Option<u32>,
    pub points: Vec<(u64, u64, u64, Option<f64>)>,
}

#[derive(Debug, Default)]
struct Series {
    /// (unix seconds, sample), oldest first.
    points: VecDeque<(u64, Sample)>,
}

#[derive(Debug, Default)]
pub struct Trends {
    pools: HashMap<(u32, String), Series>,
}

impl Trends {
    /// Adds a point at `unix_seconds` to each pool in `samples`; pools not
    /// in them (gone) are forgotten, and points older than the span go.
    pub fn sample(&mut self, unix_seconds: u64, samples: Vec<((u32, String), Sample)>) {
        let mut next: HashMap<(u32, String), Series> = HashMap::with_capacity(samples.len());
        for (key, sample) in samples {
            let mut series = self.pools.remove(&key).unwrap_or_default();
            if series.points.len() >= POINTS {
                series.points.pop_front();
            }
            series.points.push_back((unix_seconds, sample));
            next.insert(key, series);
        }
        self.pools = next;
    }

    /// Every pool's series, by process and name.
    pub fn series(&self) -> Vec<PoolTrend> {
        let mut out: Vec<PoolTrend> = self
            .pools
            .iter()
            .map(|((pid, pool), series)| PoolTrend {
                pid: *pid,
                pool: pool.clone(),
                max: series.points.back().and_then(|(_, s)| s.max),
                points: series
                    .points
                    .iter()
                    .map(|(t, s)| (*t, s.used, s.pending, s.wait_p99_seconds))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (a.pid, &a.pool).cmp(&(b.pid, &b.pool)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, pool: &str) -> (u32, String) {
        (pid, pool.to_string())
    }

    fn at(used: u64) -> Sample {
        Sample {
            used,
            max: Some(4),
            pending: used.saturating_sub(4),
            wait_p99_seconds: Some(0.5),
        }
    }

    #[test]
    fn keeps_the_last_fifteen_minutes_of_the_pools_still_there() {
        let mut trends = Trends::default();
        for i in 0..(POINTS as u64 + 10) {
            trends.sample(
                1_000 + 5 * i,
                vec![(key(1, "a"), at(i)), (key(2, "b"), at(1))],
            );
        }
        let series = trends.series();
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].pool, "a");
        assert_eq!(series[0].points.len(), POINTS);
        // The oldest ten went.
        assert_eq!(series[0].points[0].0, 1_000 + 50);
        assert_eq!(series[0].points[0].1, 10);
        let newest = series[0].points[POINTS - 1];
        assert_eq!((newest.1, newest.2), (POINTS as u64 + 9, POINTS as u64 + 5));
        assert_eq!(series[0].max, Some(4));
        // Pool b is gone: forgotten.
        trends.sample(99_999, vec![(key(1, "a"), at(1))]);
        assert_eq!(trends.series().len(), 1);
    }
}
