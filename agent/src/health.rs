//! What `/healthz` says, and why: the agent's tasks report here, and the
//! verdict is computed from those reports and the time, so it is tested
//! without running anything.
//!
//! - Liveness: no task has failed, and the ring-buffer reader and the
//!   housekeeping tick both made progress within [`STALL_AFTER_NS`]. A
//!   reader stuck behind a lock, or a task that died, fails it; the
//!   supervisor (kubelet, systemd) restarts the agent.
//! - Readiness: live, the kernel probes attached, the reader started, and
//!   the adapter socket bound (when adapters are enabled).

use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed},
    OnceLock,
};

/// A task that has not reported progress for this long is stalled. The
/// reader wakes at least every drain interval (tens of ms) and housekeeping
/// every second, so ten seconds is far past any honest pause.
pub const STALL_AFTER_NS: u64 = 10_000_000_000;

/// The adapter socket's state, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdapterState {
    /// Not yet bound.
    Pending = 0,
    Bound = 1,
    /// `[adapter] enabled = false`: not needed for readiness.
    Disabled = 2,
    /// Binding failed (logged); the agent runs without adapters.
    Unavailable = 3,
}

impl AdapterState {
    fn from_u8(v: u8) -> AdapterState {
        match v {
            1 => AdapterState::Bound,
            2 => AdapterState::Disabled,
            3 => AdapterState::Unavailable,
            _ => AdapterState::Pending,
        }
    }
}

/// Reports from the agent's tasks. Lock-free, so that reporting never waits
/// on the state a stalled task may hold.
#[derive(Debug, Default)]
pub struct Health {
    /// The first fatal failure; later ones are consequences of it.
    failure: OnceLock<String>,
    probes_attached: AtomicBool,
    reader_started: AtomicBool,
    adapter: AtomicU8,
    /// CLOCK_MONOTONIC ns of the last progress of each task (0: never).
    reader_beat_ns: AtomicU64,
    housekeeping_beat_ns: AtomicU64,
}

/// The verdict at one moment: empty `problems` means healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Health {
    /// Records a failure the agent cannot continue after. The first one is
    /// kept: it is the cause, later ones are its consequences.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.failure.set(reason.clone()).is_ok() {
            log::error!("agent failing: {reason}");
        }
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    pub fn probes_attached(&self) {
        self.probes_attached.store(true, Relaxed);
    }

    pub fn reader_started(&self, now_ns: u64) {
        self.reader_started.store(true, Relaxed);
        self.reader_beat(now_ns);
    }

    pub fn reader_beat(&self, now_ns: u64) {
        self.reader_beat_ns.store(now_ns.max(1), Relaxed);
    }

    pub fn housekeeping_beat(&self, now_ns: u64) {
        self.housekeeping_beat_ns.store(now_ns.max(1), Relaxed);
    }

    pub fn adapter(&self, state: AdapterState) {
        self.adapter.store(state as u8, Relaxed);
    }

    /// Liveness at `now_ns`.
    pub fn liveness(&self, now_ns: u64) -> Verdict {
        let mut problems = Vec::new();
        if let Some(reason) = self.failure() {
            problems.push(format!("failed: {reason}"));
        }
        for (task, beat) in [
            ("ring-buffer reader", &self.reader_beat_ns),
            ("housekeeping", &self.housekeeping_beat_ns),
        ] {
            let beat = beat.load(Relaxed);
            // Before a task's first beat it is starting, which readiness covers.
            if beat != 0 && now_ns.saturating_sub(beat) > STALL_AFTER_NS {
                problems.push(format!(
                    "{task} made no progress for {} s",
                    now_ns.saturating_sub(beat) / 1_000_000_000
                ));
            }
        }
        Verdict { problems }
    }

    /// Readiness at `now_ns`: live, and every part started.
    pub fn readiness(&self, now_ns: u64) -> Verdict {
        let mut verdict = self.liveness(now_ns);
        if !self.probes_attached.load(Relaxed) {
            verdict.problems.push("kernel probes not attached".into());
        }
        if !self.reader_started.load(Relaxed) {
            verdict
                .problems
                .push("ring-buffer reader not started (seeding from /proc)".into());
        }
        match AdapterState::from_u8(self.adapter.load(Relaxed)) {
            AdapterState::Bound | AdapterState::Disabled => {}
            AdapterState::Pending => verdict.problems.push("adapter socket not bound yet".into()),
            AdapterState::Unavailable => verdict
                .problems
                .push("adapter socket could not be bound (see the log)".into()),
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn started() -> Health {
        let h = Health::default();
        h.probes_attached();
        h.reader_started(100 * S);
        h.housekeeping_beat(100 * S);
        h.adapter(AdapterState::Bound);
        h
    }

    #[test]
    fn a_started_agent_is_live_and_ready() {
        let h = started();
        assert!(h.liveness(101 * S).ok());
        assert!(h.readiness(101 * S).ok(), "{:?}", h.readiness(101 * S));
    }

    #[test]
    fn not_ready_until_every_part_started_but_live_meanwhile() {
        let h = Health::default();
        assert!(h.liveness(5 * S).ok());
        let problems = h.readiness(5 * S).problems;
        assert_eq!(problems.len(), 3, "{problems:?}");
        h.probes_attached();
        h.reader_started(5 * S);
        h.adapter(AdapterState::Disabled);
        assert!(h.readiness(5 * S).ok());
        h.adapter(AdapterState::Unavailable);
        assert!(!h.readiness(5 * S).ok());
        assert!(h.liveness(5 * S).ok());
    }

    #[test]
    fn a_stalled_reader_or_housekeeping_fails_liveness() {
        let h = started();
        assert!(h.liveness(100 * S + STALL_AFTER_NS).ok());
        let v = h.liveness(111 * S);
        assert_eq!(v.problems.len(), 2, "{v:?}");
        assert!(v.problems[0].contains("reader made no progress for 11 s"));
        h.reader_beat(110 * S);
        h.housekeeping_beat(110 * S);
        assert!(h.liveness(111 * S).ok());
    }

    #[test]
    fn the_first_failure_is_kept_and_fails_both() {
        let h = started();
        h.fail("state lock poisoned");
        h.fail("event reader stopped");
        assert_eq!(h.failure(), Some("state lock poisoned"));
        assert_eq!(
            h.liveness(101 * S).problems,
            vec!["failed: state lock poisoned".to_string()]
        );
        assert!(!h.readiness(101 * S).ok());
    }
}
