//! The agent's state has one owner and one rule.
//!
//! Everything the pipeline learns (connections and pools, slow queries, leak
//! reports, the kernel's counters) lives in one [`State`] behind one lock,
//! reached only through [`Shared::with`]. The rule: a thread that panicked
//! while holding the lock may have left the state half-updated, so the first
//! caller to find it so records the failure in [`Health`] (`/healthz` then
//! fails, with the reason) and every caller gets [`Broken`]. The event
//! reader stops on `Broken`, and the agent exits non-zero so that its
//! supervisor restarts it with a fresh state: a failure is loud, never a
//! silently skipped update.
//!
//! The agent's other locks guard caches (server attributes, command names)
//! and plumbing (the OTLP queue's sender, the HTTP server's reserved
//! slots), whose contents stay valid whatever panicked while holding them:
//! those recover the lock (`PoisonError::into_inner`) and carry on.

use std::sync::{Arc, Mutex};

use crate::{
    detect::sizing::PoolUsage,
    health::Health,
    lifecycle::Tracker,
    reports::{LeakReports, PublishBudget, Reports},
};

/// Kernel-side counters, refreshed by the reader from the per-CPU STATS map.
#[derive(Debug, Default, Clone)]
pub struct KernelCounters {
    pub dropped_events: u64,
    pub ringbuf_pending_bytes: u64,
    pub ringbuf_size_bytes: u64,
    pub pending_insert_failed: u64,
    /// Connections the kernel could not track because its maps were full.
    pub conns_full: u64,
    /// Socket I/O of tracking processes that the socket data path could not
    /// attribute to an fd (io_uring, sendfile, sendmmsg...).
    pub unattributed_socket_io: u64,
    pub unattributed_connects: u64,
    /// TLS library calls whose connection could not be told (or that
    /// could not be remembered): their plaintext is not read.
    pub unattributed_tls_calls: u64,
    /// Per kernel program: (name, total run time ns, runs), where the kernel
    /// keeps BPF run-time statistics (enabled by the loader).
    pub probes: Vec<(String, u64, u64)>,
}

/// What the agent knows.
pub struct State {
    pub tracker: Tracker,
    pub reports: Reports,
    pub leaks: LeakReports,
    /// The kernel side's counters at the last housekeeping tick.
    pub kernel: KernelCounters,
    /// Report lines (log, OTLP events) each process may still cause.
    pub publish: PublishBudget,
    /// Each adapter pool's sampled use, for sizing advice.
    pub pool_usage: PoolUsage,
    /// Each adapter pool's last minutes, for the live page's charts.
    pub trends: crate::trends::Trends,
    /// The TLS libraries of the observed processes at the last
    /// housekeeping tick (`/api/v1/tls/libraries`).
    pub tls_libraries: Vec<crate::tls_libraries::LibraryStatus>,
}

impl State {
    pub fn new(tracker: Tracker, reports: Reports, leaks: LeakReports) -> State {
        State {
            tracker,
            reports,
            leaks,
            kernel: KernelCounters::default(),
            publish: PublishBudget::default(),
            pool_usage: PoolUsage::default(),
            trends: crate::trends::Trends::default(),
            tls_libraries: Vec::new(),
        }
    }
}

#[cfg(test)]
impl State {
    /// A shared state around `tracker`, for the unit tests of its readers.
    pub fn shared_for_tests(tracker: Tracker) -> Arc<Shared<State>> {
        Arc::new(Shared::new(
            State::new(tracker, Reports::new(1, 1), LeakReports::new(10)),
            "state",
            Arc::default(),
        ))
    }
}

/// The state can no longer be trusted; the reason is on `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the agent's state was left broken by a panic (see /healthz and the log)")
    }
}

impl std::error::Error for Broken {}

/// A value shared by the agent's tasks under the rule above.
pub struct Shared<T> {
    value: Mutex<T>,
    /// Names the value in the failure reason.
    name: &'static str,
    health: Arc<Health>,
}

impl<T> Shared<T> {
    pub fn new(value: T, name: &'static str, health: Arc<Health>) -> Shared<T> {
        Shared {
            value: Mutex::new(value),
            name,
            health,
        }
    }

    /// Runs `f` with the value, or says it is broken.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, Broken> {
        match self.value.lock() {
            Ok(mut guard) => Ok(f(&mut guard)),
            Err(_) => {
                self.health.fail(format!(
                    "a task panicked while updating the {}; its contents cannot be trusted",
                    self.name
                ));
                Err(Broken)
            }
        }
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_breaks_the_value_for_every_caller_and_fails_health() {
        let health = Arc::new(Health::default());
        let shared = Arc::new(Shared::new(1u32, "counter", Arc::clone(&health)));
        assert_eq!(shared.with(|v| *v + 1), Ok(2));
        let s = Arc::clone(&shared);
        let panicked = std::thread::spawn(move || {
            let _ = s.with(|v| {
                *v = 7;
                panic!("half-way through an update");
            });
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(shared.with(|v| *v), Err(Broken));
        assert_eq!(shared.with(|v| *v), Err(Broken));
        let reason = health.failure().expect("failure recorded");
        assert!(reason.contains("counter"), "{reason}");
        assert!(!health.liveness(0).ok());
    }
}
