//! The tracker's two big collections with the indexes that keep every
//! per-event lookup off a scan: each index changes only where its
//! collection does, so they cannot drift apart.

use std::{
    collections::{btree_map, BTreeMap, BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    ops::Bound,
    sync::Arc,
};

use super::{fast_hash::NumberMap, ConnId, Connection, Endpoint};

/// A connection's place in the open set: (pid, fd).
pub(super) type Key = (u32, i32);

/// Open connections by (pid, fd), with:
/// - `order`: the same keys sorted, for a process's connections (exit) and
///   for listing in a stable order a page at a time;
/// - `by_local`: local address -> connections bound to it, for adapter
///   messages and host-wide TCP state changes that name only addresses;
/// - `used`: connections checked out per (pid, pool), for acquire events.
#[derive(Default)]
pub(super) struct OpenSet {
    // Boxed: a hash table keeps spare slots and, while it grows, two copies
    // of itself; at 100k connections of ~370 bytes that was tens of MB.
    conns: NumberMap<Key, Box<Connection>>,
    order: BTreeSet<Key>,
    // A set of tuples rather than a map of vectors: no allocation per entry,
    // and the rare shared socket (inherited over fork) still has one entry
    // per holder.
    by_local: BTreeSet<(SocketAddr, u32, i32)>,
    used: HashMap<u32, HashMap<Arc<str>, u64>>,
}

/// The (pid, pool) a connection counts as "used" in, if it is checked out.
fn used_key(conn: &Connection) -> Option<(u32, &Arc<str>)> {
    match (&conn.pool, conn.checked_out_at_ns) {
        (Some(pool), Some(_)) => Some((conn.id.pid, pool)),
        _ => None,
    }
}

impl OpenSet {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn get(&self, key: &Key) -> Option<&Connection> {
        self.conns.get(key).map(|c| &**c)
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.conns.contains_key(key)
    }

    /// For changes that leave the indexed fields alone (id, local, pool,
    /// checked_out_at_ns): data counters and protocol state. Anything else
    /// goes through [`OpenSet::update`] or remove-then-insert.
    pub fn get_mut(&mut self, key: &Key) -> Option<&mut Connection> {
        self.conns.get_mut(key).map(|c| &mut **c)
    }

    pub fn values(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values().map(|c| &**c)
    }

    pub fn insert(&mut self, conn: Connection) {
        let key = (conn.id.pid, conn.id.fd);
        // Never two entries for one key: the indexes would keep a ghost.
        self.remove(&key);
        self.index(&conn);
        self.order.insert(key);
        self.conns.insert(key, Box::new(conn));
    }

    pub fn remove(&mut self, key: &Key) -> Option<Connection> {
        let conn = self.conns.remove(key)?;
        self.order.remove(key);
        self.unindex(&conn);
        Some(*conn)
    }

    /// Changes a connection in place, keeping the pool counts in step.
    /// `f` must not change the id or the local address.
    pub fn update<R>(&mut self, key: &Key, f: impl FnOnce(&mut Connection) -> R) -> Option<R> {
        let conn = self.conns.get_mut(key)?;
        // A shared name: taking it costs a count, not a copy (this runs on
        // every checkout and release).
        let before = used_key(conn).map(|(pid, pool)| (pid, Arc::clone(pool)));
        let local = conn.local;
        let result = f(conn);
        debug_assert_eq!(local, conn.local, "update must not move a connection");
        let after = used_key(conn);
        if before.as_ref().map(|(p, n)| (*p, n)) != after {
            let after = after.map(|(pid, pool)| (pid, Arc::clone(pool)));
            if let Some((pid, pool)) = before {
                decrement(&mut self.used, pid, &pool);
            }
            if let Some((pid, pool)) = after {
                *self.used.entry(pid).or_default().entry(pool).or_default() += 1;
            }
        }
        Some(result)
    }

    fn index(&mut self, conn: &Connection) {
        if let Some(local) = conn.local {
            self.by_local.insert((local, conn.id.pid, conn.id.fd));
        }
        if let Some((pid, pool)) = used_key(conn) {
            *self
                .used
                .entry(pid)
                .or_default()
                .entry(Arc::clone(pool))
                .or_default() += 1;
        }
    }

    fn unindex(&mut self, conn: &Connection) {
        if let Some(local) = conn.local {
            self.by_local.remove(&(local, conn.id.pid, conn.id.fd));
        }
        if let Some((pid, pool)) = used_key(conn) {
            decrement(&mut self.used, pid, pool);
        }
    }

    /// Connections of `pid` checked out from `pool` now.
    pub fn used(&self, pid: u32, pool: &str) -> u64 {
        self.used
            .get(&pid)
            .and_then(|pools| pools.get(pool))
            .copied()
            .unwrap_or(0)
    }

    /// Keys of the open connections bound to `local`, in (pid, fd) order.
    pub fn with_local(&self, local: SocketAddr) -> impl Iterator<Item = Key> + '_ {
        self.by_local
            .range((local, u32::MIN, i32::MIN)..=(local, u32::MAX, i32::MAX))
            .map(|&(_, pid, fd)| (pid, fd))
    }

    /// Keys of the open connections of `pid`, in fd order.
    pub fn of_process(&self, pid: u32) -> impl Iterator<Item = Key> + '_ {
        self.order.range((pid, i32::MIN)..=(pid, i32::MAX)).copied()
    }

    /// The open connection on the TCP socket with these two ends.
    pub fn by_addresses(&self, local: SocketAddr, remote: SocketAddr) -> Option<Key> {
        let remote = Endpoint::Inet(remote);
        self.with_local(local)
            .find(|key| self.conns.get(key).is_some_and(|c| c.remote == remote))
    }

    /// Open connections from `start` on, in id order.
    fn from(&self, start: Bound<ConnId>) -> impl Iterator<Item = &Connection> + '_ {
        // One connection per (pid, fd), so (pid, fd) order is id order; the
        // generation only decides at the starting key itself.
        let first = match start {
            Bound::Included(id) | Bound::Excluded(id) => Bound::Included((id.pid, id.fd)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.order
            .range((first, Bound::Unbounded))
            .filter_map(|key| self.get(key))
            .filter(move |c| after_start(c.id, start))
    }
}

fn after_start(id: ConnId, start: Bound<ConnId>) -> bool {
    match start {
        Bound::Included(s) => id >= s,
        Bound::Excluded(s) => id > s,
        Bound::Unbounded => true,
    }
}

fn decrement(map: &mut HashMap<u32, HashMap<Arc<str>, u64>>, pid: u32, pool: &str) {
    let Some(pools) = map.get_mut(&pid) else {
        return;
    };
    if let Some(count) = pools.get_mut(pool) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            pools.remove(pool);
        }
    }
    if pools.is_empty() {
        map.remove(&pid);
    }
}

/// Closed connections, oldest first, with an index by id. Positions are
/// sequence numbers, so dropping the oldest never renumbers the index.
#[derive(Default)]
pub(super) struct ClosedList {
    list: VecDeque<Connection>,
    /// Sequence number of `list[0]`.
    first_seq: u64,
    /// Latest entry of each id (a later duplicate shadows an earlier one,
    /// as a search from the newest end would find it).
    index: BTreeMap<ConnId, u64>,
}

impl ClosedList {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> std::collections::vec_deque::Iter<'_, Connection> {
        self.list.iter()
    }

    pub fn front(&self) -> Option<&Connection> {
        self.list.front()
    }

    pub fn push_back(&mut self, conn: Connection) {
        let seq = self.first_seq + self.list.len() as u64;
        self.index.insert(conn.id, seq);
        self.list.push_back(conn);
    }

    pub fn pop_front(&mut self) -> Option<Connection> {
        let conn = self.list.pop_front()?;
        if let btree_map::Entry::Occupied(e) = self.index.entry(conn.id) {
            // Only if no later entry with the same id took the index over.
            if *e.get() == self.first_seq {
                e.remove();
            }
        }
        self.first_seq += 1;
        Some(conn)
    }

    fn position(&self, id: &ConnId) -> Option<usize> {
        let seq = self.index.get(id)?;
        usize::try_from(seq.checked_sub(self.first_seq)?).ok()
    }

    /// The newest closed connection with this id.
    pub fn get(&self, id: &ConnId) -> Option<&Connection> {
        self.list.get(self.position(id)?)
    }

    /// As [`ClosedList::get`]; the id must not change.
    pub fn get_mut(&mut self, id: &ConnId) -> Option<&mut Connection> {
        let at = self.position(id)?;
        self.list.get_mut(at)
    }

    /// Closed connections from `start` on, in id order (the newest of
    /// each id).
    fn from(&self, start: Bound<ConnId>) -> impl Iterator<Item = &Connection> + '_ {
        self.index
            .range((start, Bound::Unbounded))
            .filter_map(|(_, &seq)| {
                let at = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
                self.list.get(at)
            })
    }
}

/// Open and closed connections from `start` on, in id order, each id once
/// (an open connection wins over a closed one with the same id).
pub(super) fn listing<'a>(
    open: &'a OpenSet,
    closed: &'a ClosedList,
    start: Bound<ConnId>,
) -> impl Iterator<Item = &'a Connection> + 'a {
    let mut open = open.from(start).peekable();
    let mut closed = closed.from(start).peekable();
    std::iter::from_fn(move || {
        let next = match (open.peek(), closed.peek()) {
            (Some(o), Some(c)) if c.id < o.id => closed.next(),
            (Some(o), Some(c)) if c.id == o.id => {
                closed.next();
                open.next()
            }
            (Some(_), _) => open.next(),
            (None, _) => closed.next(),
        };
        next
    })
}
