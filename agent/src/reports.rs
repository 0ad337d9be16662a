//! Bounded store of notable events (slow queries today), kept in memory for
//! the API and the CLI. Pure: the pipeline pushes, the API reads.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{
    clock::Clock,
    lifecycle::{Endpoint, Output},
    protocol::{DbError, TxState},
};

/// A round trip that took longer than the slow-query threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowQuery {
    pub at: String,
    pub pid: u32,
    pub process: String,
    pub fd: i32,
    pub generation: u64,
    pub db_system: String,
    pub server: String,
    pub namespace: Option<String>,
    pub operation: Option<String>,
    /// Sanitized unless raw queries were enabled.
    pub query: Option<String>,
    pub duration_seconds: f64,
    pub error: Option<DbError>,
    pub rows: Option<u64>,
    pub tx_state: Option<TxState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlowQueriesResponse {
    pub threshold_seconds: f64,
    pub slow_queries: Vec<SlowQuery>,
}

#[derive(Debug)]
pub struct Reports {
    slow_threshold_ns: u64,
    max_kept: usize,
    slow_queries: VecDeque<SlowQuery>,
}

impl Reports {
    pub fn new(slow_threshold_ns: u64, max_kept: usize) -> Reports {
        Reports {
            slow_threshold_ns,
            max_kept,
            slow_queries: VecDeque::new(),
        }
    }

    pub fn slow_threshold_ns(&self) -> u64 {
        self.slow_threshold_ns
    }

    /// Keeps what deserves a report; returns the new reports.
    pub fn observe(&mut self, outputs: &[Output], clock: &Clock) -> Vec<SlowQuery> {
        let mut new = Vec::new();
        for output in outputs {
            let Output::RoundTrip {
                id,
                comm,
                remote,
                system,
                trip,
            } = output
            else {
                continue;
            };
            let duration = trip.end_ns.saturating_sub(trip.start_ns);
            if duration < self.slow_threshold_ns {
                continue;
            }
            let report = SlowQuery {
                at: clock.rfc3339(trip.end_ns),
                pid: id.pid,
                process: comm.clone(),
                fd: id.fd,
                generation: id.generation,
                db_system: system.as_str().to_string(),
                server: match remote {
                    Endpoint::Inet(sa) => sa.to_string(),
                    Endpoint::Unix(path) => path.clone(),
                },
                namespace: trip.namespace.clone(),
                operation: trip.operation.clone(),
                query: trip.query.clone(),
                duration_seconds: duration as f64 / 1e9,
                error: trip.error.clone(),
                rows: trip.rows,
                tx_state: trip.tx_state,
            };
            if self.slow_queries.len() >= self.max_kept {
                self.slow_queries.pop_front();
            }
            self.slow_queries.push_back(report.clone());
            new.push(report);
        }
        new
    }

    /// Newest first.
    pub fn slow_queries(&self) -> Vec<SlowQuery> {
        self.slow_queries.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lifecycle::ConnId,
        protocol::{DbSystem, RoundTrip},
    };

    fn trip(ms: u64) -> Output {
        Output::RoundTrip {
            id: ConnId {
                pid: 1,
                fd: 3,
                generation: 9,
            },
            comm: "app".into(),
            remote: Endpoint::Inet("127.0.0.1:5432".parse().expect("addr")),
            system: DbSystem::Postgresql,
            trip: RoundTrip {
                start_ns: 1_000,
                end_ns: 1_000 + ms * 1_000_000,
                operation: Some("SELECT".into()),
                query: Some("SELECT pg_sleep(?)".into()),
                namespace: Some("db".into()),
                error: None,
                rows: Some(1),
                tx_state: Some(TxState::Idle),
                prepared: false,
            },
        }
    }

    #[test]
    fn keeps_only_slow_round_trips_and_bounds_them() {
        let mut reports = Reports::new(500_000_000, 2);
        let clock = Clock::new();
        assert!(reports.observe(&[trip(10)], &clock).is_empty());
        let new = reports.observe(&[trip(600), trip(700), trip(800)], &clock);
        assert_eq!(new.len(), 3);
        let kept = reports.slow_queries();
        assert_eq!(kept.len(), 2);
        assert!(
            (kept[0].duration_seconds - 0.8).abs() < 1e-9,
            "newest first"
        );
        assert_eq!(kept[0].query.as_deref(), Some("SELECT pg_sleep(?)"));
        assert_eq!(kept[0].server, "127.0.0.1:5432");
    }
}
