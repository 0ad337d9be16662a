//! Pools: what adapters report, joined to the kernel's connections by
//! (pid, fd) or (pid, local address). A child of the tracker module so that
//! it shares the tracker's state without widening its interface.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{named::Place, Tracker};
use crate::lifecycle::index::Key;
use crate::{
    adapter::message::{
        AcquireResult, AdapterEvent, AdapterMessage, Checkout, ConnRef, Folded, HolderStack,
        PoolInfo,
    },
    lifecycle::{Connection, Endpoint, Output},
    protocol::{SystemName, TxState},
};

/// Acquires waiting that we remember per process, and in all; more means a
/// broken (or hostile) adapter.
const MAX_PENDING_PER_PROCESS: usize = 10_000;
const MAX_PENDING: usize = 100_000;
/// Adapter messages about connections the kernel has not shown us yet, per
/// process and in all.
const MAX_UNMATCHED_PER_PROCESS: usize = 128;
const MAX_UNMATCHED: usize = 1024;
/// How long such a message waits for its connection.
const UNMATCHED_TTL_NS: u64 = 5_000_000_000;
/// How far back an adapter's own timestamps are believed.
const ADAPTER_TIME_TRUSTED_NS: u64 = 600_000_000_000;
/// Longest an acquire is taken to be waiting without its end.
const PENDING_TTL_NS: u64 = 300_000_000_000;
/// Pools per process; more are ignored (pool names become label values).
const MAX_POOLS_PER_PROCESS: usize = 64;
/// Most connections of one pool that re-sent checkout state may mark as
/// checked out, whatever `max` the pool registered.
const MAX_STATE_CHECKOUTS: u64 = 1024;
/// Failed acquires remembered per pool and kind, for pool health's "in
/// the last minutes": a storm of them costs no more than this many.
const RECENT_FAILURES_KEPT: usize = 32;

/// An acquire_end's fields, unpacked from [`AdapterEvent::AcquireEnd`].
struct AcquireEnd {
    request: u64,
    result: AcquireResult,
    conn: ConnRef,
    tid: Option<u32>,
    wait_ns: Option<u64>,
}

/// A pool an adapter registered.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    pub pid: u32,
    pub name: String,
    pub info: Option<PoolInfo>,
    /// Acquires waiting, by request id.
    pending: HashMap<u64, Waiting>,
    /// The connections the adapter names by its own ids (`conn`).
    pub(super) named: HashMap<u64, super::named::Named>,
    pub acquires: u64,
    pub releases: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// When the latest acquires timed out, and failed otherwise.
    recent_timeouts: VecDeque<u64>,
    recent_errors: VecDeque<u64>,
    /// The most connections in use at once since sizing last sampled the
    /// pool ([`Tracker::take_peak_used`]): checkouts shorter than the
    /// sampling interval count too.
    peak_used: u64,
}

/// What the tracker knows of an adapter pool beyond its view, for pool
/// health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolActivity {
    /// How long the oldest waiting request has waited.
    pub longest_wait_ns: Option<u64>,
    /// Acquires that timed out within the window asked for.
    pub recent_timeouts: u64,
    /// Acquires that failed otherwise within the window.
    pub recent_errors: u64,
    /// The counts are floors: more failed within the window than the pool
    /// remembers ([`RECENT_FAILURES_KEPT`] of each kind).
    pub saturated: bool,
}

/// Keeps `ts` among the latest failures of one kind.
fn remember_failure(list: &mut VecDeque<u64>, ts_ns: u64) {
    if list.len() >= RECENT_FAILURES_KEPT {
        list.pop_front();
    }
    list.push_back(ts_ns);
}

/// Failures in `list` at or after `since_ns`, and whether that is a floor.
fn failures_since(list: &VecDeque<u64>, since_ns: u64) -> (u64, bool) {
    let n = list.iter().filter(|ts| **ts >= since_ns).count();
    (n as u64, n >= RECENT_FAILURES_KEPT)
}

/// An acquire in progress.
#[derive(Debug, Clone, Copy, Default)]
struct Waiting {
    start_ns: u64,
    tid: Option<u32>,
    /// Connections in use when the wait began: a waiter on a full pool gets
    /// its connection only after another is returned, so the use at the end
    /// understates what the waiter saw.
    used_at_start: u64,
}

impl Pool {
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Longest current wait, for the pools view.
    pub fn oldest_pending_ns(&self) -> Option<u64> {
        self.pending.values().map(|w| w.start_ns).min()
    }

    /// Its waits and failures at `now_ns`, failures counted from
    /// `recent_ns` before it.
    pub fn activity(&self, now_ns: u64, recent_ns: u64) -> PoolActivity {
        let since = now_ns.saturating_sub(recent_ns);
        let (recent_timeouts, full_t) = failures_since(&self.recent_timeouts, since);
        let (recent_errors, full_e) = failures_since(&self.recent_errors, since);
        PoolActivity {
            longest_wait_ns: self.oldest_pending_ns().map(|s| now_ns.saturating_sub(s)),
            recent_timeouts,
            recent_errors,
            saturated: full_t || full_e,
        }
    }
}

/// A pool as the API and the gauges show it: adapter pools and, for
/// processes without an adapter, implicit ones (one per process and server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub pid: u32,
    pub process: String,
    pub name: String,
    /// false for implicit pools inferred from traffic.
    pub from_adapter: bool,
    pub db_system: Option<SystemName>,
    pub server: Option<String>,
    pub namespace: Option<String>,
    pub library: Option<String>,
    pub used: u64,
    pub idle: u64,
    pub max: Option<u32>,
    pub min_idle: Option<u32>,
    pub idle_max: Option<u32>,
    pub pending: u64,
    pub acquires: u64,
    pub releases: u64,
    pub timeouts: u64,
}

/// An adapter event waiting for the kernel to show its connection.
#[derive(Debug, Clone)]
pub(super) struct Unmatched {
    pid: u32,
    ts_ns: u64,
    pool: String,
    event: AdapterEvent,
}

/// The fallback pool name of the semantic conventions.
pub fn implicit_pool_name(remote: &Endpoint, namespace: Option<&str>) -> String {
    let base = match remote {
        Endpoint::Inet(sa) => format!("{}:{}", sa.ip(), sa.port()),
        Endpoint::Unix(path) | Endpoint::Declared(path) => path.clone(),
    };
    match namespace {
        Some(ns) => format!("{base}/{ns}"),
        None => base,
    }
}

/// A connection counts as in use without an adapter when a transaction is
/// open or a request waits for its response.
fn implicitly_used(conn: &Connection) -> bool {
    matches!(
        conn.tx_state,
        Some(TxState::InTransaction | TxState::Failed)
    ) || conn.awaiting_response
}

impl Tracker {
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    /// Adapter pools and implicit ones, with their connection counts.
    /// Every adapter pool's waits and failures (see [`Pool::activity`]),
    /// by (pid, pool name).
    pub fn pool_activity(
        &self,
        now_ns: u64,
        recent_ns: u64,
    ) -> HashMap<(u32, String), PoolActivity> {
        self.pools
            .iter()
            .map(|(key, pool)| (key.clone(), pool.activity(now_ns, recent_ns)))
            .collect()
    }

    /// The most connections of the pool in use at once since the last
    /// call, at least those in use now; starts over from now.
    pub fn take_peak_used(&mut self, pid: u32, pool: &str) -> u64 {
        let used = self.used_connections(pid, pool);
        match self.pools.get_mut(&(pid, pool.to_string())) {
            Some(p) => std::mem::replace(&mut p.peak_used, used).max(used),
            None => used,
        }
    }

    pub fn pool_views(&self) -> Vec<PoolView> {
        let mut views: HashMap<(u32, String), PoolView> = HashMap::new();
        for pool in self.pools.values() {
            let info = pool.info.clone().unwrap_or_default();
            views.insert(
                (pool.pid, pool.name.clone()),
                PoolView {
                    pid: pool.pid,
                    process: self.comms.get(&pool.pid).cloned().unwrap_or_default(),
                    name: pool.name.clone(),
                    from_adapter: true,
                    db_system: info.db_system,
                    server: info.server_address.map(|a| match info.server_port {
                        Some(p) => format!("{a}:{p}"),
                        None => a,
                    }),
                    namespace: info.namespace,
                    library: info.library,
                    used: 0,
                    idle: 0,
                    max: info.max,
                    min_idle: info.min_idle,
                    idle_max: info.idle_max,
                    pending: pool.pending.len() as u64,
                    acquires: pool.acquires,
                    releases: pool.releases,
                    timeouts: pool.timeouts,
                },
            );
        }
        for conn in self.open.values().chain(self.alone.values()) {
            if !conn.is_open() {
                continue;
            }
            let (name, from_adapter) = match &conn.pool {
                Some(name) => (name.to_string(), true),
                // Only database connections form implicit pools.
                None if conn.db_system.is_some() => (
                    implicit_pool_name(&conn.remote, conn.namespace.as_deref()),
                    false,
                ),
                None => continue,
            };
            let used = if from_adapter {
                conn.checked_out_at_ns.is_some()
            } else {
                implicitly_used(conn)
            };
            let view = views
                .entry((conn.id.pid, name.clone()))
                .or_insert_with(|| PoolView {
                    pid: conn.id.pid,
                    process: conn.comm.clone(),
                    name,
                    from_adapter,
                    db_system: conn.system(),
                    server: Some(conn.remote.to_string()),
                    namespace: conn.namespace.clone(),
                    library: None,
                    used: 0,
                    idle: 0,
                    max: None,
                    min_idle: None,
                    idle_max: None,
                    pending: 0,
                    acquires: 0,
                    releases: 0,
                    timeouts: 0,
                });
            if view.db_system.is_none() {
                view.db_system = conn.system();
            }
            if used {
                view.used += 1;
            } else {
                view.idle += 1;
            }
        }
        let mut views: Vec<PoolView> = views.into_values().collect();
        views.sort_by(|a, b| (a.pid, &a.name).cmp(&(b.pid, &b.name)));
        views
    }

    /// Connections of a pool handed out now.
    /// Connections of the pool handed out now: those checked out on known
    /// connections, and those whose `acquire_end` waits for the kernel to
    /// show its (new) connection, which the pool has handed out all the
    /// same (less returns that wait likewise). The wait list holds at most
    /// a few early events per process, and is looked at only for a process
    /// that has some.
    fn used_connections(&self, pid: u32, pool: &str) -> u64 {
        let known = self.open.used(pid, pool) + self.alone.used(pid, pool);
        if !self.unmatched_per_pid.contains_key(&pid) {
            return known;
        }
        let waiting: i64 = self
            .unmatched
            .iter()
            .filter(|u| u.pid == pid && u.pool == pool)
            .map(|u| match u.event {
                AdapterEvent::AcquireEnd {
                    result: AcquireResult::Ok,
                    ..
                } => 1,
                AdapterEvent::Release { .. } => -1,
                _ => 0,
            })
            .sum();
        known.saturating_add_signed(waiting.max(0))
    }

    /// When an adapter message from `pid` happened, from the time it claims
    /// (`mono_ns`, the kernel's CLOCK_MONOTONIC) and `now`. The claim is
    /// trusted when plausible, so that waits are measured where they
    /// happen even for messages an adapter held back briefly; the future,
    /// anything over 10 minutes old, and anything before the sender's own
    /// process started are not: a sender cannot date what it reports
    /// before itself.
    pub fn adapter_time(&self, pid: u32, claimed_ns: Option<u64>, now_ns: u64) -> u64 {
        let Some(claimed) = claimed_ns.filter(|&t| {
            t <= now_ns.saturating_add(1_000_000_000)
                && now_ns.saturating_sub(t) < ADAPTER_TIME_TRUSTED_NS
        }) else {
            return now_ns;
        };
        let claimed = claimed.min(now_ns);
        match self.placements.get(&pid).and_then(|p| p.process_started_ns) {
            Some(started) => claimed.max(started.min(now_ns)),
            None => claimed,
        }
    }

    /// A datagram can be read after its sender exited (it waited in the
    /// socket's queue): what it says would recreate pools and a placement
    /// that no exit event will ever forget, so it is refused. A pid that a
    /// new process took since is believed (its start time is after the
    /// exit).
    fn sender_is_alive(&mut self, pid: u32) -> Result<(), &'static str> {
        let Some(&exit_ns) = self.exited.get(&pid) else {
            return Ok(());
        };
        let restarted = self
            .placements
            .get(&pid)
            .and_then(|p| p.process_started_ns)
            .is_some_and(|started| started > exit_ns);
        if restarted {
            self.exited.remove(&pid);
            return Ok(());
        }
        self.placements.remove(&pid);
        self.comms.remove(&pid);
        Err("sender_exited")
    }

    /// Folds one adapter message (its sender's pid vouched for by the
    /// kernel) into the pools and their connections.
    pub fn apply_adapter(&mut self, pid: u32, ts_ns: u64, message: AdapterMessage) -> Vec<Output> {
        let mut out = Vec::new();
        if let Err(reason) = self.sender_is_alive(pid) {
            out.push(Output::AdapterRefused { reason });
            return out;
        }
        let AdapterMessage { pool, event, .. } = message;
        let key = (pid, pool.clone());
        if !self.pools.contains_key(&key) {
            if let Err(reason) = self.make_room_for_pool(pid) {
                out.push(Output::AdapterRefused { reason });
                return out;
            }
            *self.pools_per_pid.entry(pid).or_default() += 1;
            self.pools.insert(
                key.clone(),
                Pool {
                    pid,
                    name: pool.clone(),
                    ..Pool::default()
                },
            );
        }
        match event {
            AdapterEvent::Register(info) => {
                if let Some(p) = self.pools.get_mut(&key) {
                    p.info = Some(info);
                }
            }
            AdapterEvent::AcquireStart { request, tid } => {
                let known = self
                    .pools
                    .get(&key)
                    .is_some_and(|p| p.pending.contains_key(&request));
                if !known {
                    if let Err(reason) = self.make_room_for_pending(pid) {
                        out.push(Output::AdapterRefused { reason });
                        return out;
                    }
                }
                let used_at_start = self.used_connections(pid, &pool);
                if let Some(p) = self.pools.get_mut(&key) {
                    let waiting = Waiting {
                        start_ns: ts_ns,
                        tid,
                        used_at_start,
                    };
                    if p.pending.insert(request, waiting).is_none() {
                        count(&mut self.pending_per_pid, pid, 1);
                        self.pending_total += 1;
                    }
                }
            }
            AdapterEvent::AcquireEnd {
                request,
                result,
                conn,
                tid,
                wait_ns,
            } => {
                let end = AcquireEnd {
                    request,
                    result,
                    conn,
                    tid,
                    wait_ns,
                };
                self.on_acquire_end(pid, ts_ns, &pool, end, &mut out)
            }
            AdapterEvent::CheckoutState { checkouts } => {
                self.on_checkout_state(pid, ts_ns, &pool, checkouts, &mut out)
            }
            AdapterEvent::Checkout {
                request,
                conn,
                tid,
                wait_ns,
                use_ns,
            } => {
                // The acquire_end it stands for, when the connection was
                // handed out (a sender's word: no longer ago than the agent
                // trusts its times for), then the release.
                let acquired_ns = ts_ns.saturating_sub(use_ns.min(ADAPTER_TIME_TRUSTED_NS));
                let end = AcquireEnd {
                    request,
                    result: AcquireResult::Ok,
                    conn,
                    tid,
                    wait_ns,
                };
                self.on_acquire_end(pid, acquired_ns, &pool, end, &mut out);
                self.on_release(&key, ts_ns, conn, &mut out)
            }
            AdapterEvent::Checkouts(folded) => {
                self.on_checkouts(pid, ts_ns, &key, folded, &mut out)
            }
            AdapterEvent::Release { conn } => self.on_release(&key, ts_ns, conn, &mut out),
            AdapterEvent::HolderStack {
                conn,
                since_ns,
                stack,
            } => self.on_holder_stack(pid, ts_ns, &pool, conn, since_ns, stack, &mut out),
            event @ (AdapterEvent::ConnectionCreated { .. }
            | AdapterEvent::ConnectionClosed { .. }) => {
                self.on_connection_event(pid, ts_ns, &pool, event, &mut out)
            }
        }
        out
    }

    /// Short checkouts of one connection, folded by the adapter (all ended
    /// by `ts_ns`): each is counted and timed as a `checkout` would be,
    /// seeing the pool as it is now, and the connection ends up released.
    /// Their request ids were never sent: no one waited on them.
    fn on_checkouts(
        &mut self,
        pid: u32,
        ts_ns: u64,
        key: &(u32, String),
        folded: Folded,
        out: &mut Vec<Output>,
    ) {
        let pool_name = key.1.as_str();
        let used_now = self.used_connections(pid, pool_name);
        let Some(pool) = self.pools.get_mut(key) else {
            return;
        };
        let Folded {
            conn,
            tid,
            mut waits_ns,
            mut uses_ns,
        } = folded;
        let n = waits_ns.len() as u64;
        pool.acquires += n;
        pool.releases += n;
        // The folded connection was in use beside those in use now.
        if n > 0 {
            pool.peak_used = pool.peak_used.max(used_now + 1);
        }
        // A sender's word: no longer than the agent trusts its times for.
        for t in waits_ns.iter_mut().chain(uses_ns.iter_mut()) {
            *t = (*t).min(ADAPTER_TIME_TRUSTED_NS);
        }
        out.push(Output::CheckoutsFolded {
            pid,
            pool: pool_name.to_string(),
            waits_ns,
            uses_ns,
            used_before: used_now,
            pending_before: pool.pending.len() as u64,
            max: pool.info.as_ref().and_then(|i| i.max),
            tid,
        });
        // The connection is the pool's and idle: released at the last one.
        let release = AdapterEvent::Release { conn };
        self.on_connection_event(pid, ts_ns, pool_name, release, out);
    }

    /// The caller gave `conn` back: counted here, once, whether or not the
    /// connection is known yet (acquires are counted the same way).
    fn on_release(
        &mut self,
        key: &(u32, String),
        ts_ns: u64,
        conn: ConnRef,
        out: &mut Vec<Output>,
    ) {
        if let Some(p) = self.pools.get_mut(key) {
            p.releases += 1;
        }
        let (pid, pool_name) = key;
        self.on_connection_event(*pid, ts_ns, pool_name, AdapterEvent::Release { conn }, out)
    }

    fn on_acquire_end(
        &mut self,
        pid: u32,
        ts_ns: u64,
        pool_name: &str,
        end: AcquireEnd,
        out: &mut Vec<Output>,
    ) {
        let AcquireEnd {
            request,
            result,
            conn,
            tid,
            wait_ns,
        } = end;
        // The pool's state as the waiter saw it: the busier of its start
        // and now, before this acquire ends.
        let used_now = self.used_connections(pid, pool_name);
        let key = (pid, pool_name.to_string());
        let Some(pool) = self.pools.get_mut(&key) else {
            return;
        };
        let pending_before = pool.pending.len() as u64;
        let started = pool.pending.remove(&request);
        if started.is_some() {
            uncount(&mut self.pending_per_pid, pid, 1);
            self.pending_total = self.pending_total.saturating_sub(1);
        }
        match result {
            AcquireResult::Ok => {
                pool.acquires += 1;
                pool.peak_used = pool.peak_used.max(used_now + 1);
            }
            AcquireResult::Timeout => {
                pool.timeouts += 1;
                remember_failure(&mut pool.recent_timeouts, ts_ns);
            }
            AcquireResult::Error => {
                pool.errors += 1;
                remember_failure(&mut pool.recent_errors, ts_ns);
            }
        }
        let max = pool.info.as_ref().and_then(|i| i.max);
        // The wait: from the acquire_start the agent kept, else the one the
        // adapter folded into this message (a sender's word: no longer than
        // the oldest time the agent trusts it for).
        let waited = match started {
            Some(waiting) => Some((
                ts_ns.saturating_sub(waiting.start_ns),
                used_now.max(waiting.used_at_start),
                waiting.tid,
            )),
            None => wait_ns.map(|w| (w.min(ADAPTER_TIME_TRUSTED_NS), used_now, None)),
        };
        if let Some((wait_ns, used_before, start_tid)) = waited {
            out.push(Output::AcquireFinished {
                pid,
                pool: pool_name.to_string(),
                wait_ns,
                result,
                used_before,
                pending_before,
                max,
                tid: tid.or(start_tid),
            });
        }
        if result == AcquireResult::Ok {
            let event = AdapterEvent::AcquireEnd {
                request,
                result,
                conn,
                tid: tid.or(started.and_then(|w| w.tid)),
                wait_ns: None,
            };
            self.on_connection_event(pid, ts_ns, pool_name, event, out);
        }
    }

    /// Re-sent checkouts (after an agent restart, or periodically): marks
    /// the connections named as checked out, idempotently. A checkout the
    /// tracker already knows keeps its start and holder, and acquires are
    /// not counted, so the same state may arrive any number of times.
    /// Entries naming no connection the kernel showed us are dropped, not
    /// queued: adapters re-send the state periodically.
    fn on_checkout_state(
        &mut self,
        pid: u32,
        ts_ns: u64,
        pool_name: &str,
        checkouts: Vec<Checkout>,
        out: &mut Vec<Output>,
    ) {
        let limit = self
            .pools
            .get(&(pid, pool_name.to_string()))
            .and_then(|p| p.info.as_ref())
            .and_then(|i| i.max)
            .map_or(MAX_STATE_CHECKOUTS, |max| {
                u64::from(max).min(MAX_STATE_CHECKOUTS)
            });
        let process_started = self.placements.get(&pid).and_then(|p| p.process_started_ns);
        for entry in checkouts {
            let place = match entry.conn.conn {
                Some(id) if !entry.conn.names_socket() => {
                    self.place_named(pid, ts_ns, pool_name, id, false, out)
                }
                _ => self.find_connection(pid, entry.conn, ts_ns).map(|key| {
                    if let Some(id) = entry.conn.conn {
                        self.name_socket(pid, pool_name, id, key);
                    }
                    Place::Open(key)
                }),
            };
            let Some((place, conn)) = place.and_then(|p| self.at(p).map(|c| (p, c))) else {
                out.push(Output::Unmatched);
                continue;
            };
            if conn.checked_out_at_ns.is_some() {
                continue;
            }
            // A snapshot taken before a release that reached us first
            // (another thread returned the connection meanwhile) is stale.
            if conn
                .released_at_ns
                .is_some_and(|released| entry.since_ns < released)
            {
                out.push(Output::Unmatched);
                continue;
            }
            if self.used_connections(pid, pool_name) >= limit {
                out.push(Output::Unmatched);
                continue;
            }
            let since = clamp_checkout_start(conn, process_started, entry.since_ns, ts_ns);
            let (set, key) = self.set_of(place);
            set.update(&key, |conn| {
                if conn.pool.as_deref() != Some(pool_name) {
                    conn.pool = Some(pool_name.into());
                }
                conn.checked_out_at_ns = Some(since);
                conn.holder_tid = entry.tid;
            });
        }
    }

    /// Keeps the stack of the code that checked a connection out, with the
    /// checkout going on now, if it is the one the adapter means: the
    /// stack of a checkout that has ended (the adapter sent it as the
    /// connection went back) must not be pinned on the next holder.
    /// Dropped (unmatched) when the connection is unknown or not checked
    /// out: stacks come a second or more after their checkout, so they are
    /// never kept for a connection the kernel has yet to show.
    #[allow(clippy::too_many_arguments)]
    fn on_holder_stack(
        &mut self,
        pid: u32,
        ts_ns: u64,
        pool_name: &str,
        conn: ConnRef,
        since_ns: u64,
        stack: HolderStack,
        out: &mut Vec<Output>,
    ) {
        let place = match conn.conn {
            Some(id) if !conn.names_socket() => self.named(pid, pool_name, id),
            _ => self.find_connection(pid, conn, ts_ns).map(Place::Open),
        };
        let current = place.and_then(|p| self.at(p)).and_then(|c| {
            let since = c.checked_out_at_ns?;
            // The checkout going on began when its acquire_end said (the
            // agent's record of the adapter's time, clamped only when
            // implausible); an earlier checkout's stack began before it.
            let same_checkout = c.pool.as_deref() == Some(pool_name) && since_ns >= since;
            same_checkout.then_some((c.id, since))
        });
        let Some((id, checkout_ns)) = current else {
            out.push(Output::Unmatched);
            return;
        };
        if let Err(reason) = self.keep_stack(id, checkout_ns, stack) {
            out.push(Output::AdapterRefused { reason });
        }
    }

    /// The open connection an adapter event names, if it existed when the
    /// event happened. When the event gives both fd and local address they
    /// must agree, so that a late event about a closed connection never
    /// lands on a newer one that reused its fd.
    fn find_connection(&self, pid: u32, conn: ConnRef, ts_ns: u64) -> Option<Key> {
        let matches = |c: &Connection| {
            c.id.pid == pid
                && c.id.generation <= ts_ns
                && conn.fd.is_none_or(|fd| c.id.fd == fd)
                && match (conn.local, c.local) {
                    (Some(wanted), Some(actual)) => wanted == actual,
                    // The kernel may not have told us the local address yet.
                    (Some(_), None) => conn.fd.is_some(),
                    (None, _) => true,
                }
        };
        let matching = |key: &Key| self.open.get(key).is_some_and(matches);
        match (conn.fd, conn.local) {
            (Some(fd), _) => Some((pid, fd)).filter(matching),
            // Sockets are named by their local address: the index holds the
            // few (usually one) connections bound to it.
            (None, Some(local)) => self.open.with_local(local).find(matching),
            // Names nothing in particular: any connection of the process.
            (None, None) => self.open.of_process(pid).find(matching),
        }
    }

    /// Applies an event that names a connection, or keeps it until the
    /// kernel shows that connection (adapters can be faster than the ring
    /// buffer).
    fn on_connection_event(
        &mut self,
        pid: u32,
        ts_ns: u64,
        pool: &str,
        event: AdapterEvent,
        out: &mut Vec<Output>,
    ) {
        let conn_ref = match &event {
            AdapterEvent::AcquireEnd { conn, .. }
            | AdapterEvent::Release { conn }
            | AdapterEvent::ConnectionCreated { conn, .. }
            | AdapterEvent::ConnectionClosed { conn } => *conn,
            _ => return,
        };
        let closing = matches!(event, AdapterEvent::ConnectionClosed { .. });
        if !conn_ref.names_socket() {
            // Named by the adapter's id alone (conn_ref names something:
            // the protocol refuses a message that names nothing).
            let Some(id) = conn_ref.conn else { return };
            let Some(place) = self.place_named(pid, ts_ns, pool, id, closing, out) else {
                return;
            };
            // The adapter says which thread connected it: the kernel saw
            // that connect, so its socket may be found (see `binding`).
            if let (Place::Alone(_), AdapterEvent::ConnectionCreated { tid: Some(tid), .. }) =
                (place, &event)
            {
                self.claim_socket(pid, pool, id, *tid, ts_ns);
            }
            let (set, key) = self.set_of(place);
            set.update(&key, |conn| {
                apply_to_connection(conn, pid, ts_ns, pool, event, out)
            });
            if closing {
                self.unname(pid, pool, id);
            }
            return;
        }
        let Some(key) = self.find_connection(pid, conn_ref, ts_ns) else {
            if let Err(reason) = self.make_room_for_unmatched(pid) {
                out.push(Output::AdapterRefused { reason });
                return;
            }
            self.push_unmatched(Unmatched {
                pid,
                ts_ns,
                pool: pool.to_string(),
                event,
            });
            return;
        };
        if let Some(id) = conn_ref.conn {
            self.name_socket(pid, pool, id, key);
        }
        self.open.update(&key, |conn| {
            apply_to_connection(conn, pid, ts_ns, pool, event, out)
        });
        if let Some(id) = conn_ref.conn.filter(|_| closing) {
            self.unname(pid, pool, id);
        }
    }

    fn push_unmatched(&mut self, u: Unmatched) {
        *self.unmatched_per_pid.entry(u.pid).or_default() += 1;
        self.unmatched.push_back(u);
    }

    /// Room for one more early event of `pid`: each process keeps at most
    /// its share, and when all are taken the process holding the most
    /// gives up its oldest, so one sender's flood never pushes out
    /// another's events.
    fn make_room_for_unmatched(&mut self, pid: u32) -> Result<(), &'static str> {
        let mine = self.unmatched_per_pid.get(&pid).copied().unwrap_or(0);
        if mine >= MAX_UNMATCHED_PER_PROCESS {
            return Err("early_event_limit");
        }
        if self.unmatched.len() < MAX_UNMATCHED {
            return Ok(());
        }
        let Some((heaviest, _)) = heaviest_above(&self.unmatched_per_pid, mine) else {
            return Err("early_event_limit");
        };
        if let Some(at) = self.unmatched.iter().position(|u| u.pid == heaviest) {
            self.unmatched.remove(at);
            self.forget_unmatched(heaviest, 1);
        }
        Ok(())
    }

    /// Room for one more pool of `pid`: at most 64 per process, and when
    /// the agent's total is reached, the process with the most pools gives
    /// one up (the least used) if it has more than `pid` would have.
    fn make_room_for_pool(&mut self, pid: u32) -> Result<(), &'static str> {
        let mine = self.pools_per_pid.get(&pid).copied().unwrap_or(0);
        if mine >= MAX_POOLS_PER_PROCESS {
            return Err("pool_limit");
        }
        if self.pools.len() < self.config.max_pools {
            return Ok(());
        }
        let Some((heaviest, _)) = heaviest_above(&self.pools_per_pid, mine) else {
            return Err("pool_limit");
        };
        let victim = self
            .pools
            .iter()
            .filter(|((p, _), _)| *p == heaviest)
            .min_by(|(_, a), (_, b)| {
                let use_of = |p: &Pool| p.acquires + p.releases + p.timeouts + p.errors;
                (use_of(a), &a.name).cmp(&(use_of(b), &b.name))
            })
            .map(|(key, _)| key.clone());
        if let Some(key) = victim {
            if let Some(pool) = self.pools.remove(&key) {
                self.forget_pending(pool.pid, pool.pending.len());
                self.forget_names(&pool);
                uncount(&mut self.pools_per_pid, pool.pid, 1);
            }
        }
        Ok(())
    }

    /// Room for one more waiting acquire of `pid`, shared the same way.
    fn make_room_for_pending(&mut self, pid: u32) -> Result<(), &'static str> {
        let mine = self.pending_per_pid.get(&pid).copied().unwrap_or(0);
        if mine >= MAX_PENDING_PER_PROCESS {
            return Err("pending_limit");
        }
        if self.pending_total < MAX_PENDING {
            return Ok(());
        }
        let Some((heaviest, _)) = heaviest_above(&self.pending_per_pid, mine) else {
            return Err("pending_limit");
        };
        // Any of its waits: finding the oldest would cost a scan of up to
        // 10,000 per message while the flood lasts.
        let victim = self
            .pools
            .values()
            .filter(|pool| pool.pid == heaviest)
            .find_map(|pool| {
                pool.pending
                    .keys()
                    .next()
                    .map(|request| (pool.name.clone(), *request))
            });
        if let Some((name, request)) = victim {
            if let Some(pool) = self.pools.get_mut(&(heaviest, name)) {
                if pool.pending.remove(&request).is_some() {
                    self.forget_pending(heaviest, 1);
                }
            }
        }
        Ok(())
    }

    fn forget_pending(&mut self, pid: u32, n: usize) {
        uncount(&mut self.pending_per_pid, pid, n);
        self.pending_total = self.pending_total.saturating_sub(n);
    }

    fn forget_unmatched(&mut self, pid: u32, count: usize) {
        if let Some(n) = self.unmatched_per_pid.get_mut(&pid) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.unmatched_per_pid.remove(&pid);
            }
        }
    }

    /// Retries adapter events of `pid` that named a connection we had not
    /// seen yet; called when the kernel shows a new connection of `pid`.
    pub(super) fn retry_unmatched(&mut self, pid: u32, now_ns: u64, out: &mut Vec<Output>) {
        if !self.unmatched_per_pid.contains_key(&pid) {
            return;
        }
        let waiting: VecDeque<Unmatched> = std::mem::take(&mut self.unmatched);
        self.unmatched_per_pid.remove(&pid);
        for u in waiting {
            if u.pid != pid {
                self.unmatched.push_back(u);
                continue;
            }
            if now_ns.saturating_sub(u.ts_ns) > UNMATCHED_TTL_NS {
                continue;
            }
            // Still unmatched ones come back through push_unmatched.
            self.on_connection_event(u.pid, u.ts_ns, &u.pool, u.event, out);
        }
    }

    /// Drops adapter state of a process that exited.
    pub(super) fn forget_pools(&mut self, pid: u32) {
        if self.pools_per_pid.remove(&pid).is_some() {
            self.pools.retain(|(p, _), _| *p != pid);
        }
        if let Some(n) = self.pending_per_pid.remove(&pid) {
            self.pending_total = self.pending_total.saturating_sub(n);
        }
        if self.unmatched_per_pid.remove(&pid).is_some() {
            self.unmatched.retain(|u| u.pid != pid);
        }
        self.forget_named_of(pid);
        self.forget_claims_of(pid);
    }

    /// Drops unmatched adapter events too old to ever match.
    pub(super) fn expire_unmatched(&mut self, now_ns: u64) {
        // Oldest first in arrival order; timestamps may be out of order, so
        // every entry is checked (the queue is bounded).
        let waiting: VecDeque<Unmatched> = std::mem::take(&mut self.unmatched);
        self.unmatched_per_pid.clear();
        for u in waiting {
            if now_ns.saturating_sub(u.ts_ns) <= UNMATCHED_TTL_NS {
                self.push_unmatched(u);
            }
        }
        // An acquire whose end never arrived (a lost message, a crashed
        // caller) must not count as waiting forever.
        let mut expired = Vec::new();
        for pool in self.pools.values_mut() {
            let before = pool.pending.len();
            pool.pending
                .retain(|_, w| now_ns.saturating_sub(w.start_ns) <= PENDING_TTL_NS);
            if pool.pending.len() < before {
                expired.push((pool.pid, before - pool.pending.len()));
            }
        }
        for (pid, n) in expired {
            self.forget_pending(pid, n);
        }
    }
}

fn count(counts: &mut HashMap<u32, usize>, pid: u32, n: usize) {
    *counts.entry(pid).or_default() += n;
}

pub(super) fn uncount(counts: &mut HashMap<u32, usize>, pid: u32, n: usize) {
    if let Some(have) = counts.get_mut(&pid) {
        *have = have.saturating_sub(n);
        if *have == 0 {
            counts.remove(&pid);
        }
    }
}

/// The process holding the most, if it holds more than one past `mine`
/// (giving one up then still leaves it at least as much as the asker).
/// Scans every process: only called when a bound is reached.
pub(super) fn heaviest_above(counts: &HashMap<u32, usize>, mine: usize) -> Option<(u32, usize)> {
    counts
        .iter()
        .map(|(pid, n)| (*pid, *n))
        .max_by_key(|(pid, n)| (*n, std::cmp::Reverse(*pid)))
        .filter(|(_, n)| *n > mine + 1)
}

/// What an adapter event tells about its connection.
fn apply_to_connection(
    conn: &mut Connection,
    pid: u32,
    ts_ns: u64,
    pool: &str,
    event: AdapterEvent,
    out: &mut Vec<Output>,
) {
    if conn.pool.as_deref() != Some(pool) {
        conn.pool = Some(pool.into());
    }
    match event {
        AdapterEvent::AcquireEnd { tid, .. } => {
            conn.checked_out_at_ns = Some(ts_ns);
            conn.holder_tid = tid;
        }
        AdapterEvent::Release { .. } => {
            conn.released_at_ns = Some(ts_ns);
            if let Some(since) = conn.checked_out_at_ns.take() {
                out.push(Output::Released {
                    pid,
                    pool: pool.to_string(),
                    use_ns: ts_ns.saturating_sub(since),
                });
            }
            conn.holder_tid = None;
        }
        // From connect() to a connection the pool can hand out.
        AdapterEvent::ConnectionCreated { .. } if conn.id.generation != 0 && conn.has_socket() => {
            out.push(Output::PoolConnectionCreated {
                pid,
                pool: pool.to_string(),
                create_ns: ts_ns.saturating_sub(conn.id.generation),
            });
        }
        AdapterEvent::ConnectionClosed { .. } => {
            conn.released_at_ns = Some(ts_ns);
            conn.checked_out_at_ns = None;
            conn.holder_tid = None;
        }
        _ => {}
    }
}

/// When a re-sent checkout began, as far as the agent believes it: never
/// after the message itself, and never before the connection's birth as
/// the kernel saw it. A connection found in /proc at start has no known
/// birth (its `opened_at_ns` is the agent's start), so there the floor is
/// its process's start: a checkout can be older than the agent but not
/// older than the process that claims it.
fn clamp_checkout_start(
    conn: &Connection,
    process_started_ns: Option<u64>,
    claimed_ns: u64,
    message_ns: u64,
) -> u64 {
    let floor = match process_started_ns {
        // Known only by the adapter's word: the agent met it just now.
        Some(started) if conn.seen_at_start || !conn.has_socket() => started.min(conn.opened_at_ns),
        _ => conn.opened_at_ns,
    };
    claimed_ns.clamp(floor, message_ns.max(floor))
}
