//! Each observed pod's workload (Deployment, StatefulSet, DaemonSet, Job,
//! CronJob) from the Kubernetes API server, for the applications'
//! resources (`crate::identity`).
//!
//! The pod's namespace and name come from the kubelet's directories
//! (`crate::procfs::Placement`); its owner only the API knows. One `get` of
//! the pod per pod seen, on a thread of its own, so that the event path
//! never waits: a process learned before its pod's answer starts with the
//! resource known then, and housekeeping makes it anew when the answer
//! arrives (`Workloads::take_answered`).
//!
//! - `pod`: the pod object -> its workload (pure);
//! - `directory`: cache, queue and backoff (pure, time passed in);
//! - `client`: the in-cluster account, the HTTP requests, the worker.

pub mod client;
pub mod config;
pub mod directory;
pub mod pod;

use std::{
    collections::HashSet,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
};

pub use client::{in_cluster, ApiServer};
pub use config::{ApiLookups, KubernetesConfig};
pub use directory::{Counts, PodKey};
pub use pod::Workload;

use directory::{Directory, Known, Limits};

/// The lookups' bookkeeping, shared by the agent's threads and the worker.
struct Shared {
    state: Mutex<SharedState>,
    /// Wakes the worker: a lookup was queued, or the handle dropped.
    wake: Condvar,
}

struct SharedState {
    directory: Directory,
    /// The handle is gone: the worker ends.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // The directory stays consistent whatever panicked holding it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The agent's side of the lookups. Dropping it ends the worker.
pub struct Workloads {
    shared: Arc<Shared>,
}

impl Workloads {
    /// Starts the worker that asks `server`.
    pub fn start(server: ApiServer) -> anyhow::Result<Workloads> {
        Self::start_with(server, Limits::default())
    }

    fn start_with(server: ApiServer, limits: Limits) -> anyhow::Result<Workloads> {
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                directory: Directory::new(limits),
                closed: false,
            }),
            wake: Condvar::new(),
        });
        client::spawn_worker(server, Arc::clone(&shared))?;
        Ok(Workloads { shared })
    }

    /// The workload of pod `name` in `namespace` if the API server has
    /// answered already; else asks for it (at most once per pod) and
    /// returns at once.
    pub fn lookup(&self, namespace: &str, name: &str) -> Option<Workload> {
        // Names from directories on the node: only object names go into a
        // request path.
        if !pod::is_object_name(namespace) || !pod::is_object_name(name) {
            return None;
        }
        let key = PodKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let mut state = self.shared.lock();
        if state.closed {
            // The worker could not start: nothing would answer.
            return None;
        }
        let queued_before = state.directory.queued();
        match state.directory.lookup(&key) {
            Known::Answered(workload) => workload,
            Known::NotYet => {
                if state.directory.queued() > queued_before {
                    self.shared.wake.notify_one();
                }
                None
            }
        }
    }

    /// The pods whose workload arrived since the last call.
    pub fn take_answered(&self) -> Vec<PodKey> {
        self.shared.lock().directory.take_answered()
    }

    /// Forgets the pods not in `seen`.
    pub fn retain_seen(&self, seen: &HashSet<PodKey>) {
        self.shared
            .lock()
            .directory
            .retain(|pod| seen.contains(pod));
    }

    pub fn counts(&self) -> Counts {
        self.shared.lock().directory.counts
    }
}

impl Drop for Workloads {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}
