//! Short checkouts, folded (as the JVM and Node adapters do). One datagram
//! per event costs the application several microseconds each (the send,
//! the agent's wake-up, the kernel's credentials), three per checkout; most
//! checkouts last less than a batch. So a pool keeps, until its next batch
//! ([`BATCH_WINDOW`] by default):
//!
//! - the starts of acquires: one that ends first is sent as its
//!   `acquire_end` alone, carrying its wait (`wait_ns`); one still waiting
//!   at the batch is sent as `acquire_start`, with its own time;
//! - the `acquire_end` of a checkout: if the connection comes back first,
//!   the checkout is folded into the connection's `checkouts` line (its
//!   wait and its use), sent with the batch or at 64; one still out at the
//!   batch after the one it began in is sent, with its own time, and its
//!   return is then a plain `release`.
//!
//! A batch that sends a waiting acquire's start sends every held
//! `acquire_end` first, so that the agent sees the pool as the waiter saw
//! it. A connection's folded checkouts always go before anything else
//! about it. This module is the logic (what to send, in which order); the
//! pool sends what it returns while holding the batch's lock, so that two
//! threads never send one connection's messages out of order.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, Weak,
    },
    thread,
    time::Duration,
};

use crate::{
    locked,
    protocol::{Body, Checkout},
    stack::HeldStack,
    AcquireResult, ConnId,
};

/// The adapter's maps, keyed by its own ids, fds and addresses (nothing an
/// outsider chooses): hashed with foldhash, a few times cheaper per lookup
/// than std's SipHash on the checkout path, where every pair does several.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How long short checkouts wait to be folded.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Checkouts folded into one `checkouts` line (the protocol's bound).
const MAX_FOLDED: usize = crate::protocol::MAX_CHECKOUTS_PER_MESSAGE;
/// Full `checkouts` lines kept for the batch, at most; past this they are
/// sent at once. Sent with the batch, a pool's lines reach the agent
/// together and cost it one wake-up, not one each.
const MAX_READY_LINES: usize = 256;

/// What names a connection in a pool's maps: its id, else its fd, else its
/// local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnKey {
    Id(u64),
    Fd(RawFd),
    Addr(Option<SocketAddr>),
}

/// Hashed as one word: every checkout looks its connection up twice, and
/// hashing the whole key field by field was a tenth of its cost.
impl std::hash::Hash for ConnKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let word = match *self {
            ConnKey::Id(id) => id,
            ConnKey::Fd(fd) => u64::from(fd as u32) | 1 << 62,
            ConnKey::Addr(None) => 3 << 62,
            ConnKey::Addr(Some(SocketAddr::V4(a))) => {
                u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()) | 2 << 62
            }
            ConnKey::Addr(Some(SocketAddr::V6(a))) => {
                let bits = a.ip().to_bits();
                (bits as u64) ^ ((bits >> 64) as u64) ^ u64::from(a.port())
            }
        };
        state.write_u64(word);
    }
}

pub(crate) fn conn_key(conn: ConnId) -> ConnKey {
    match (conn.conn, conn.fd) {
        (Some(id), _) => ConnKey::Id(id),
        (None, Some(fd)) => ConnKey::Fd(fd),
        (None, None) => ConnKey::Addr(conn.local_address),
    }
}

/// A message to send, and when it happened.
pub(crate) type Out = (Body, u64);

/// A checkout whose `acquire_end` waits for the batch.
#[derive(Debug, Clone, Copy)]
struct Held {
    request: u64,
    since_ns: u64,
    tid: Option<u32>,
    wait_ns: u64,
}

/// What the pool knows of one connection between batches: what waits for
/// the batch about it, and its checkout while it is out (re-sent as
/// `checkout_state`). One entry for both, so that a checkout looks its
/// connection up once when handed out and once when back.
#[derive(Debug)]
struct Pending {
    conn: ConnId,
    /// The checkout out now, as named when handed out.
    out: Option<Checkout>,
    /// Its holder's stack, until sent (or the checkout ends).
    stack: Option<HeldStack>,
    /// The frames sent as its holder's stack, re-sent with every
    /// `checkout_state` while it stays out (dropped when it ends).
    sent: Option<Arc<[String]>>,
    held: Option<Held>,
    waits: Vec<u64>,
    uses: Vec<u64>,
    /// The last folded checkout's holder and end.
    fold_tid: Option<u32>,
    fold_ns: u64,
}

impl Pending {
    fn new(conn: ConnId) -> Pending {
        Pending {
            conn,
            out: None,
            stack: None,
            sent: None,
            held: None,
            waits: Vec::new(),
            uses: Vec::new(),
            fold_tid: None,
            fold_ns: 0,
        }
    }

    /// The folded checkouts as one line, forgotten.
    fn take_folded(&mut self, out: &mut Vec<Out>) {
        if self.waits.is_empty() {
            return;
        }
        let body = Body::Checkouts {
            conn: self.conn,
            tid: self.fold_tid,
            waits_ns: std::mem::take(&mut self.waits),
            uses_ns: std::mem::take(&mut self.uses),
        };
        out.push((body, self.fold_ns));
    }

    /// The held checkout's `acquire_end`, no longer held.
    fn take_held(&mut self, out: &mut Vec<Out>) {
        if let Some(h) = self.held.take() {
            out.push(held_end(self.conn, h));
        }
    }

    /// The checkout is over: no longer out, its stack forgotten.
    fn end_checkout(&mut self) -> bool {
        self.stack = None;
        self.sent = None;
        self.out.take().is_some()
    }

    /// Nothing about it waits and it is not out: the entry may go.
    fn idle(&self) -> bool {
        self.out.is_none() && self.held.is_none() && self.waits.is_empty()
    }
}

fn held_end(conn: ConnId, h: Held) -> Out {
    let body = Body::AcquireEnd {
        request: h.request,
        result: AcquireResult::Ok(conn),
        tid: h.tid,
        wait_ns: Some(h.wait_ns),
    };
    (body, h.since_ns)
}

/// One pool's messages waiting for its batch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Acquires whose `acquire_start` waits: (request, start, tid). A few:
    /// the batch sends those older than a window.
    starting: Vec<(u64, u64, Option<u32>)>,
    /// The connections with something waiting or checked out.
    conns: FastMap<ConnKey, Pending>,
    /// Full `checkouts` lines waiting for the batch, in the order they
    /// filled.
    ready: Vec<Out>,
    /// Whether the batcher will flush this pool.
    pub(crate) scheduled: bool,
    /// Whether the batcher knows the pool (for `flush_all`).
    pub(crate) tracked: bool,
}

impl Batch {
    /// An acquire began; its start waits for the batch.
    pub(crate) fn start(&mut self, request: u64, start_ns: u64, tid: Option<u32>) {
        self.starting.push((request, start_ns, tid));
    }

    /// The acquire `request` ended at `at` with `result`, for thread `tid`.
    /// Returns whether a connection is now out.
    pub(crate) fn finish(
        &mut self,
        request: u64,
        result: AcquireResult,
        tid: Option<u32>,
        at: u64,
        stack: Option<HeldStack>,
        out: &mut Vec<Out>,
    ) -> bool {
        let started = self
            .starting
            .iter()
            .position(|(r, _, _)| *r == request)
            .map(|at| {
                let (_, start, tid) = self.starting.swap_remove(at);
                (start, tid)
            });
        match (result, started) {
            (AcquireResult::Ok(conn), Some((start, _))) if !conn.is_empty() => {
                let p = self.handed_out(conn, at, tid, stack);
                // A checkout of it never reported returned: its end goes as is.
                p.take_held(out);
                p.held = Some(Held {
                    request,
                    since_ns: at,
                    tid,
                    wait_ns: at.saturating_sub(start),
                });
            }
            (result, Some((start, _))) => {
                let body = Body::AcquireEnd {
                    request,
                    result,
                    tid,
                    wait_ns: Some(at.saturating_sub(start)),
                };
                out.push((body, at));
            }
            (result, None) => {
                if let AcquireResult::Ok(conn) = result {
                    if !conn.is_empty() {
                        // What waits about it goes before its end.
                        let p = self.handed_out(conn, at, tid, stack);
                        p.take_folded(out);
                        p.take_held(out);
                    }
                }
                let body = Body::AcquireEnd {
                    request,
                    result,
                    tid,
                    wait_ns: None,
                };
                out.push((body, at));
            }
        }
        self.ready_first(out);
        matches!(result, AcquireResult::Ok(conn) if !conn.is_empty())
    }

    /// `conn` handed out at `at` to `tid`: its entry, with the checkout
    /// and its holder's stack.
    fn handed_out(
        &mut self,
        conn: ConnId,
        at: u64,
        tid: Option<u32>,
        stack: Option<HeldStack>,
    ) -> &mut Pending {
        let p = self
            .conns
            .entry(conn_key(conn))
            .or_insert_with(|| Pending::new(conn));
        p.out = Some(Checkout {
            conn,
            mono_ns: at,
            tid,
        });
        p.stack = stack;
        p.sent = None;
        p
    }

    /// The acquire ended with `result` at `at`, its `acquire_end` sent at
    /// once (no batch): only the checkout is kept. Returns whether a
    /// connection is now out.
    pub(crate) fn finish_unbatched(
        &mut self,
        result: AcquireResult,
        tid: Option<u32>,
        at: u64,
        stack: Option<HeldStack>,
    ) -> bool {
        match result {
            AcquireResult::Ok(conn) if !conn.is_empty() => {
                self.handed_out(conn, at, tid, stack);
                true
            }
            _ => false,
        }
    }

    /// `conn` is back, with no batch: no longer out, and forgotten.
    pub(crate) fn returned_unbatched(&mut self, conn: ConnId) {
        let key = conn_key(conn);
        if let Some(p) = self.conns.get_mut(&key) {
            if p.end_checkout() {
                if p.idle() {
                    self.conns.remove(&key);
                }
                return;
            }
        }
        self.returned_by_address(conn);
    }

    /// The pool closed `conn`, with no batch: forgotten.
    pub(crate) fn closed_unbatched(&mut self, conn: ConnId) {
        if self.conns.remove(&conn_key(conn)).is_none() {
            self.returned_by_address(conn);
        }
    }

    /// `conn` came back named differently than when it was handed out
    /// (its fd unknown then, say): the checkout of its address is over.
    fn returned_by_address(&mut self, conn: ConnId) {
        let Some(local) = conn.local_address else {
            return;
        };
        for p in self.conns.values_mut() {
            if p.out.is_some_and(|c| c.conn.local_address == Some(local)) {
                p.end_checkout();
            }
        }
    }

    /// The checkouts out now, oldest first.
    pub(crate) fn checkouts(&self) -> Vec<Checkout> {
        let mut list: Vec<Checkout> = self.conns.values().filter_map(|p| p.out).collect();
        list.sort_by_key(|c| c.mono_ns);
        list
    }

    /// The checkouts out now whose holder's stack was sent, with its
    /// frames, oldest first (re-sent after their `checkout_state`).
    pub(crate) fn sent_stacks(&self) -> Vec<(Checkout, Arc<[String]>)> {
        let mut list: Vec<(Checkout, Arc<[String]>)> = self
            .conns
            .values()
            .filter_map(|p| Some((p.out?, p.sent.clone()?)))
            .collect();
        list.sort_by_key(|(c, _)| c.mono_ns);
        list
    }

    /// The stack of `checkout` (still out: see [`Batch::still_out`]) was
    /// sent with `frames`: kept to re-send with the state.
    pub(crate) fn stack_sent(&mut self, checkout: &Checkout, frames: Arc<[String]>) {
        if let Some(p) = self.conns.get_mut(&conn_key(checkout.conn)) {
            if p.out.is_some_and(|c| c.mono_ns == checkout.mono_ns) {
                p.sent = Some(frames);
            }
        }
    }

    /// Whether any connection is out.
    pub(crate) fn any_out(&self) -> bool {
        self.conns.values().any(|p| p.out.is_some())
    }

    /// Takes the stacks due by `now` (the checkout, its connection as named
    /// then, and its capture) into `due`; returns when the next one is due.
    pub(crate) fn due_stacks(
        &mut self,
        now: u64,
        due: &mut Vec<(Checkout, HeldStack)>,
    ) -> Option<u64> {
        let mut next: Option<u64> = None;
        for p in self.conns.values_mut() {
            let (Some(checkout), Some(stack)) = (p.out, &p.stack) else {
                continue;
            };
            if stack.due_ns <= now {
                if let Some(stack) = p.stack.take() {
                    due.push((checkout, stack));
                }
            } else {
                next = Some(next.map_or(stack.due_ns, |n| n.min(stack.due_ns)));
            }
        }
        next
    }

    /// Whether `checkout` is still out (the stack taken for it is still
    /// its holder's). If so, what waits about its connection (its folded
    /// checkouts, its own `acquire_end`) goes to `out` first, so that the
    /// stack leaves after its `acquire_end`.
    pub(crate) fn still_out(&mut self, checkout: &Checkout, out: &mut Vec<Out>) -> bool {
        let Some(p) = self.conns.get_mut(&conn_key(checkout.conn)) else {
            return false;
        };
        if p.out.is_none_or(|c| c.mono_ns != checkout.mono_ns) {
            return false;
        }
        if p.held.is_some() {
            p.take_folded(out);
            p.take_held(out);
            self.ready_first(out);
        }
        true
    }

    /// The full lines kept for the batch go before anything sent at once,
    /// so that no connection's messages cross.
    fn ready_first(&mut self, out: &mut Vec<Out>) {
        if !out.is_empty() && !self.ready.is_empty() {
            out.splice(0..0, self.ready.drain(..));
        }
    }

    /// `conn` came back to the pool at `at`.
    pub(crate) fn release(&mut self, conn: ConnId, at: u64, out: &mut Vec<Out>) {
        let mut was_out = false;
        if let Some(p) = self.conns.get_mut(&conn_key(conn)) {
            was_out = p.end_checkout();
            if let Some(h) = p.held.take() {
                if p.waits.is_empty() {
                    // A line's room at once, not grown five times.
                    p.waits.reserve_exact(MAX_FOLDED);
                    p.uses.reserve_exact(MAX_FOLDED);
                }
                p.waits.push(h.wait_ns);
                p.uses.push(at.saturating_sub(h.since_ns));
                p.fold_tid = h.tid;
                p.fold_ns = at;
                if p.waits.len() >= MAX_FOLDED {
                    let sink = if self.ready.len() < MAX_READY_LINES {
                        &mut self.ready
                    } else {
                        &mut *out
                    };
                    p.take_folded(sink);
                }
                self.ready_first(out);
                return;
            }
            p.take_folded(out);
        }
        if !was_out {
            self.returned_by_address(conn);
        }
        out.push((Body::Release(conn), at));
        self.ready_first(out);
    }

    /// The pool closed `conn` at `at`.
    pub(crate) fn closed(&mut self, conn: ConnId, at: u64, out: &mut Vec<Out>) {
        match self.conns.remove(&conn_key(conn)) {
            Some(mut p) => {
                p.take_folded(out);
                p.take_held(out);
            }
            None => self.returned_by_address(conn),
        }
        out.push((Body::ConnectionClosed(conn), at));
        self.ready_first(out);
    }

    /// The batch at `now`: every folded line; the starts of acquires that
    /// began more than `young_ns` ago, after every held end; held ends
    /// older than that. Returns whether anything is left for the next one.
    pub(crate) fn flush(&mut self, now: u64, young_ns: u64, out: &mut Vec<Out>) -> bool {
        out.append(&mut self.ready);
        let cutoff = now.saturating_sub(young_ns);
        let mut events: Vec<Out> = Vec::new();
        let before = events.len();
        self.starting.retain(|&(request, start, tid)| {
            let old = start <= cutoff;
            if old {
                events.push((Body::AcquireStart { request, tid }, start));
            }
            !old
        });
        let someone_waits = events.len() > before;
        for p in self.conns.values_mut() {
            p.take_folded(out);
            if p.held
                .is_some_and(|h| someone_waits || h.since_ns <= cutoff)
            {
                p.take_held(&mut events);
            }
        }
        self.conns.retain(|_, p| !p.idle());
        events.sort_by_key(|(_, at)| *at);
        out.extend(events);
        !self.starting.is_empty() || self.conns.values().any(|p| p.held.is_some())
    }
}

/// A pool the batcher flushes.
pub(crate) trait Flush: Send + Sync {
    /// Sends the pool's batch; returns whether more waits for the next.
    fn flush(&self, force: bool) -> bool;
}

/// One thread per process flushes the pools' batches, a window after the
/// first thing of a batch waits.
pub(crate) struct Batcher {
    due: Mutex<Vec<Weak<dyn Flush>>>,
    /// Every pool that ever had a batch, for [`Batcher::flush_all`].
    all: Mutex<Vec<Weak<dyn Flush>>>,
    wake: Condvar,
    started: AtomicBool,
    spawn_failed: AtomicBool,
}

pub(crate) static BATCHER: Batcher = Batcher {
    due: Mutex::new(Vec::new()),
    all: Mutex::new(Vec::new()),
    wake: Condvar::new(),
    started: AtomicBool::new(false),
    spawn_failed: AtomicBool::new(false),
};

impl Batcher {
    /// Flushes `pool` a window from now; false when no thread can (the
    /// caller then sends at once).
    pub(crate) fn schedule(&'static self, pool: Weak<dyn Flush>) -> bool {
        if self.spawn_failed.load(Ordering::Relaxed) {
            return false;
        }
        if !self.started.swap(true, Ordering::AcqRel) {
            let spawned = thread::Builder::new()
                .name("poolscope-adapter-batch".into())
                .spawn(move || self.run());
            if spawned.is_err() {
                self.spawn_failed.store(true, Ordering::Relaxed);
                return false;
            }
        }
        let mut due = locked(&self.due);
        let first = due.is_empty();
        due.push(pool);
        drop(due);
        if first {
            self.wake.notify_one();
        }
        true
    }

    /// Remembers `pool` for [`Batcher::flush_all`] (once per pool).
    pub(crate) fn track(&self, pool: Weak<dyn Flush>) {
        let mut all = locked(&self.all);
        all.retain(|w| w.strong_count() > 0);
        all.push(pool);
    }

    /// Sends every pool's batch now (before an exit).
    pub(crate) fn flush_all(&self) {
        let pools: Vec<_> = locked(&self.all).iter().filter_map(Weak::upgrade).collect();
        for pool in pools {
            pool.flush(true);
        }
    }

    fn run(&'static self) {
        loop {
            {
                let mut due = locked(&self.due);
                while due.is_empty() {
                    due = match self.wake.wait(due) {
                        Ok(guard) => guard,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                }
            }
            thread::sleep(BATCH_WINDOW);
            let due: Vec<_> = std::mem::take(&mut *locked(&self.due));
            for pool in due.iter().filter_map(Weak::upgrade) {
                if pool.flush(false) {
                    locked(&self.due).push(Arc::downgrade(&pool));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
