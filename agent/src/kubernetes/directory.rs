//! Which pods' workloads are known, asked for, or waiting: the lookups'
//! bookkeeping (cache, queue, backoff), with no I/O and with time passed
//! in, so that every bound and every failure is a plain test. The worker
//! in `client` asks it what to fetch next and tells it what came back.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::pod::Workload;

/// A pod, by namespace and name (what the kubelet's log directory names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

/// The bounds of the bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Pods remembered at most (known, asked for or waiting). A node runs
    /// at most a few hundred pods; past this, new pods are not looked up
    /// until unseen ones are forgotten.
    pub max_pods: usize,
    /// Lookups waiting at most; more are dropped (and counted) and asked
    /// again by the next process of that pod.
    pub max_queued: usize,
    /// The first wait after a failed lookup, doubled at each failure in a
    /// row up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// The wait after the API server refused the agent's account (401/403):
    /// RBAC is not fixed in seconds.
    pub refused_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pods: 4096,
            max_queued: 1024,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            refused_backoff: Duration::from_secs(600),
        }
    }
}

/// What is known of a pod's workload now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// The API server answered: its controller, if any kind we name.
    Answered(Option<Workload>),
    /// Not yet (asked for, waiting, dropped, or given up on).
    NotYet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// In the queue, or being fetched.
    Wanted,
    Answered(Option<Workload>),
    /// The answer could not be read (malformed, too large): not asked
    /// again while the pod is seen, since the same object would come back.
    Unreadable,
}

/// How one lookup ended, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 and a pod object read.
    Found(Option<Workload>),
    /// 404: the pod is gone (or never was: a name from a stale directory).
    NotFound,
    /// 401 or 403: the account has no `get pods` (RBAC), or its token was
    /// refused.
    Refused { status: u16 },
    /// 200 with a body that is no pod object we can read.
    Unreadable(String),
    /// The server could not be reached, timed out, or answered another
    /// status (429, 5xx...): worth trying again later.
    Failed(String),
}

/// What the worker should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Fetch(PodKey),
    /// Backing off: nothing before this long.
    Wait(Duration),
    /// Nothing queued.
    Idle,
}

/// A line worth logging, said once per state change rather than per lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The first refusal since the last success.
    Refused {
        status: u16,
        retry_in: Duration,
    },
    /// The first failure since the last success.
    Failing {
        error: String,
        retry_in: Duration,
    },
    /// Lookups work again after refusals or failures.
    Recovered,
    Unreadable {
        pod: PodKey,
        error: String,
    },
}

/// Counts for the agent's own metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub found: u64,
    pub not_found: u64,
    pub refused: u64,
    pub failed: u64,
    pub unreadable: u64,
    /// Lookups not queued: the queue or the cache was full.
    pub dropped: u64,
}

#[derive(Debug)]
pub struct Directory {
    limits: Limits,
    entries: HashMap<PodKey, Entry>,
    queue: VecDeque<PodKey>,
    /// No request before this.
    backoff_until: Option<Instant>,
    /// Failures in a row, for the doubling.
    failures_in_a_row: u32,
    /// Whether the last lookup failed or was refused (for [`Notice`]s).
    troubled: bool,
    /// Pods whose workload arrived since the last [`Directory::take_answered`].
    answered: Vec<PodKey>,
    pub counts: Counts,
}

impl Directory {
    pub fn new(limits: Limits) -> Directory {
        Directory {
            limits,
            entries: HashMap::new(),
            queue: VecDeque::new(),
            backoff_until: None,
            failures_in_a_row: 0,
            troubled: false,
            answered: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// What is known of `pod`, asking for it when nothing is. Never waits.
    pub fn lookup(&mut self, pod: &PodKey) -> Known {
        match self.entries.get(pod) {
            Some(Entry::Answered(workload)) => return Known::Answered(workload.clone()),
            Some(Entry::Wanted | Entry::Unreadable) => return Known::NotYet,
            None => {}
        }
        if self.entries.len() >= self.limits.max_pods || self.queue.len() >= self.limits.max_queued
        {
            // Not remembered, so the next process of this pod asks again.
            self.counts.dropped += 1;
            return Known::NotYet;
        }
        self.entries.insert(pod.clone(), Entry::Wanted);
        self.queue.push_back(pod.clone());
        Known::NotYet
    }

    /// The next lookup to make at `now`, taken off the queue.
    pub fn next(&mut self, now: Instant) -> Next {
        if let Some(until) = self.backoff_until {
            if until > now {
                return if self.queue.is_empty() {
                    Next::Idle
                } else {
                    Next::Wait(until - now)
                };
            }
            self.backoff_until = None;
        }
        match self.queue.pop_front() {
            Some(pod) => Next::Fetch(pod),
            None => Next::Idle,
        }
    }

    /// Takes in how the lookup of `pod` ended at `now`.
    pub fn complete(&mut self, pod: PodKey, outcome: Outcome, now: Instant) -> Option<Notice> {
        let recovered = match &outcome {
            Outcome::Found(_) | Outcome::NotFound | Outcome::Unreadable(_) => {
                let was = self.troubled;
                self.troubled = false;
                self.failures_in_a_row = 0;
                was
            }
            Outcome::Refused { .. } | Outcome::Failed(_) => false,
        };
        // A pod forgotten meanwhile (no longer seen) stays forgotten.
        let still_wanted = self.entries.contains_key(&pod);
        let notice = match outcome {
            Outcome::Found(workload) => {
                self.counts.found += 1;
                if still_wanted {
                    if workload.is_some() {
                        self.answered.push(pod.clone());
                    }
                    self.entries.insert(pod, Entry::Answered(workload));
                }
                None
            }
            Outcome::NotFound => {
                self.counts.not_found += 1;
                if still_wanted {
                    self.entries.insert(pod, Entry::Answered(None));
                }
                None
            }
            Outcome::Unreadable(error) => {
                self.counts.unreadable += 1;
                if still_wanted {
                    self.entries.insert(pod.clone(), Entry::Unreadable);
                }
                Some(Notice::Unreadable { pod, error })
            }
            Outcome::Refused { status } => {
                self.counts.refused += 1;
                let retry_in = self.limits.refused_backoff;
                self.back_off(pod, still_wanted, retry_in, now);
                let first = !std::mem::replace(&mut self.troubled, true);
                first.then_some(Notice::Refused { status, retry_in })
            }
            Outcome::Failed(error) => {
                self.counts.failed += 1;
                let doublings = self.failures_in_a_row.min(16);
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                let retry_in = self
                    .limits
                    .first_backoff
                    .saturating_mul(1 << doublings)
                    .min(self.limits.max_backoff);
                self.back_off(pod, still_wanted, retry_in, now);
                let first = !std::mem::replace(&mut self.troubled, true);
                first.then_some(Notice::Failing { error, retry_in })
            }
        };
        if recovered {
            Some(notice.unwrap_or(Notice::Recovered))
        } else {
            notice
        }
    }

    /// Waits `retry_in` before any request, and asks for `pod` again first.
    fn back_off(&mut self, pod: PodKey, still_wanted: bool, retry_in: Duration, now: Instant) {
        self.backoff_until = Some(now + retry_in);
        if still_wanted {
            // Its slot in the queue is the one it was taken from.
            self.queue.push_front(pod);
        }
    }

    /// The pods whose workload arrived since the last call: their
    /// processes' resources can be made anew.
    pub fn take_answered(&mut self) -> Vec<PodKey> {
        std::mem::take(&mut self.answered)
    }

    /// Forgets the pods no longer `seen` (their lookups too, queued or not).
    pub fn retain(&mut self, seen: impl Fn(&PodKey) -> bool) {
        self.entries.retain(|pod, _| seen(pod));
        self.queue.retain(|pod| seen(pod));
        self.answered.retain(|pod| seen(pod));
    }

    pub fn remembered(&self) -> usize {
        self.entries.len()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn deployment(name: &str) -> Workload {
        Workload::Deployment {
            name: name.into(),
            replicaset: format!("{name}-7d9c5b6f4"),
        }
    }

    fn small() -> Limits {
        Limits {
            max_pods: 4,
            max_queued: 2,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            refused_backoff: Duration::from_secs(600),
        }
    }

    #[test]
    fn each_pod_is_asked_for_once_and_then_known() {
        let mut d = Directory::new(small());
        let now = Instant::now();
        assert_eq!(d.lookup(&pod("a")), Known::NotYet);
        assert_eq!(d.lookup(&pod("a")), Known::NotYet);
        assert_eq!(d.queued(), 1, "asked for once");
        assert_eq!(d.next(now), Next::Fetch(pod("a")));
        assert_eq!(d.next(now), Next::Idle);
        // Still not known while it is fetched, and not queued again.
        assert_eq!(d.lookup(&pod("a")), Known::NotYet);
        assert_eq!(d.queued(), 0);
        assert_eq!(
            d.complete(pod("a"), Outcome::Found(Some(deployment("web"))), now),
            None
        );
        assert_eq!(
            d.lookup(&pod("a")),
            Known::Answered(Some(deployment("web")))
        );
        assert_eq!(d.take_answered(), vec![pod("a")]);
        assert_eq!(d.take_answered(), Vec::<PodKey>::new());
        assert_eq!(d.next(now), Next::Idle, "not asked for again");
        // A bare pod and a vanished one are answers too, with no workload
        // (and nothing for the resources to change).
        d.lookup(&pod("bare"));
        d.lookup(&pod("gone"));
        assert_eq!(d.next(now), Next::Fetch(pod("bare")));
        d.complete(pod("bare"), Outcome::Found(None), now);
        assert_eq!(d.next(now), Next::Fetch(pod("gone")));
        d.complete(pod("gone"), Outcome::NotFound, now);
        assert_eq!(d.lookup(&pod("bare")), Known::Answered(None));
        assert_eq!(d.lookup(&pod("gone")), Known::Answered(None));
        assert!(d.take_answered().is_empty());
        assert_eq!(
            d.counts,
            Counts {
                found: 2,
                not_found: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn a_full_queue_or_cache_drops_lookups_and_counts_them() {
        let mut d = Directory::new(small());
        let now = Instant::now();
        d.lookup(&pod("a"));
        d.lookup(&pod("b"));
        assert_eq!(d.lookup(&pod("c")), Known::NotYet);
        assert_eq!(d.counts.dropped, 1);
        assert_eq!(d.queued(), 2);
        // Dropped means not remembered: the next process of "c" asks again,
        // once there is room.
        assert_eq!(d.next(now), Next::Fetch(pod("a")));
        d.lookup(&pod("c"));
        assert_eq!(d.queued(), 2);
        assert_eq!(d.counts.dropped, 1);
        // The cache: four pods at most, whatever their state.
        d.complete(pod("a"), Outcome::Found(None), now);
        assert_eq!(d.next(now), Next::Fetch(pod("b")));
        d.lookup(&pod("d"));
        assert_eq!(d.remembered(), 4);
        assert_eq!(d.lookup(&pod("e")), Known::NotYet);
        assert_eq!(d.counts.dropped, 2);
        assert_eq!(d.remembered(), 4);
        // Forgetting unseen pods makes room.
        d.retain(|p| p.name != "a");
        assert_eq!(d.remembered(), 3);
        d.next(now);
        d.lookup(&pod("e"));
        assert_eq!(d.remembered(), 4);
    }

    #[test]
    fn failures_back_off_doubling_and_retry_the_same_pod_first() {
        let mut d = Directory::new(small());
        let start = Instant::now();
        d.lookup(&pod("a"));
        d.lookup(&pod("b"));
        assert_eq!(d.next(start), Next::Fetch(pod("a")));
        let notice = d.complete(pod("a"), Outcome::Failed("timed out".into()), start);
        assert_eq!(
            notice,
            Some(Notice::Failing {
                error: "timed out".into(),
                retry_in: Duration::from_secs(1)
            })
        );
        assert_eq!(d.next(start), Next::Wait(Duration::from_secs(1)));
        let mut now = start + Duration::from_secs(1);
        // 1, 2, 4, 8, then 8 s (the cap) between tries; logged once.
        for expected in [2, 4, 8, 8, 8] {
            assert_eq!(d.next(now), Next::Fetch(pod("a")));
            assert_eq!(
                d.complete(pod("a"), Outcome::Failed("503".into()), now),
                None
            );
            assert_eq!(d.next(now), Next::Wait(Duration::from_secs(expected)));
            now += Duration::from_secs(expected);
        }
        assert_eq!(d.next(now), Next::Fetch(pod("a")));
        assert_eq!(
            d.complete(pod("a"), Outcome::Found(Some(deployment("web"))), now),
            Some(Notice::Recovered)
        );
        // The backoff starts over after a success.
        assert_eq!(d.next(now), Next::Fetch(pod("b")));
        d.complete(pod("b"), Outcome::Failed("reset".into()), now);
        assert_eq!(d.next(now), Next::Wait(Duration::from_secs(1)));
        assert_eq!(d.counts.failed, 7);
    }

    #[test]
    fn a_refusal_is_said_once_and_waits_long() {
        let mut d = Directory::new(small());
        let start = Instant::now();
        d.lookup(&pod("a"));
        d.lookup(&pod("b"));
        assert_eq!(d.next(start), Next::Fetch(pod("a")));
        assert_eq!(
            d.complete(pod("a"), Outcome::Refused { status: 403 }, start),
            Some(Notice::Refused {
                status: 403,
                retry_in: Duration::from_secs(600)
            })
        );
        assert_eq!(d.next(start), Next::Wait(Duration::from_secs(600)));
        assert_eq!(
            d.next(start + Duration::from_secs(599)),
            Next::Wait(Duration::from_secs(1))
        );
        let later = start + Duration::from_secs(600);
        assert_eq!(d.next(later), Next::Fetch(pod("a")));
        assert_eq!(
            d.complete(pod("a"), Outcome::Refused { status: 403 }, later),
            None,
            "not said again"
        );
        // Nothing queued: idle, whatever the backoff (a new lookup wakes it).
        d.retain(|_| false);
        assert_eq!(d.next(later), Next::Idle);
        assert_eq!(d.counts.refused, 2);
    }

    #[test]
    fn an_unreadable_answer_is_not_asked_again_while_the_pod_is_seen() {
        let mut d = Directory::new(small());
        let now = Instant::now();
        d.lookup(&pod("a"));
        d.next(now);
        assert_eq!(
            d.complete(pod("a"), Outcome::Unreadable("not a pod".into()), now),
            Some(Notice::Unreadable {
                pod: pod("a"),
                error: "not a pod".into()
            })
        );
        assert_eq!(d.lookup(&pod("a")), Known::NotYet);
        assert_eq!(d.next(now), Next::Idle);
        d.retain(|_| false);
        d.lookup(&pod("a"));
        assert_eq!(
            d.next(now),
            Next::Fetch(pod("a")),
            "asked again once forgotten"
        );
    }

    #[test]
    fn a_pod_forgotten_while_fetched_stays_forgotten() {
        let mut d = Directory::new(small());
        let now = Instant::now();
        d.lookup(&pod("a"));
        d.next(now);
        d.retain(|_| false);
        d.complete(pod("a"), Outcome::Found(Some(deployment("web"))), now);
        assert_eq!(d.remembered(), 0);
        assert!(d.take_answered().is_empty());
        // Not queued again after a failure either.
        d.lookup(&pod("b"));
        d.next(now);
        d.retain(|_| false);
        d.complete(pod("b"), Outcome::Failed("reset".into()), now);
        assert_eq!(d.queued(), 0);
    }
}
