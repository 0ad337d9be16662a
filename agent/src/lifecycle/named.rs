//! Connections an adapter names by an id of its own (`conn`): pools whose
//! library hides the socket (sqlx, bb8) or that have none (SQLite handles).
//! An id sent once beside a socket names that socket's connection from then
//! on; an id the agent cannot tie to a socket names a connection known only
//! by the adapter's word, kept apart from the kernel's (`alone`) with what
//! the adapter tells of it: checkouts, holder, use. When the id is later
//! tied to a socket, that socket's connection takes over its state. A child
//! of the tracker module, as `pools` is.

use super::Tracker;
use crate::lifecycle::{
    index::{Key, OpenSet},
    ConnId, ConnState, Connection, Endpoint, Output,
};

/// Ids one process may have alive across its pools; more are refused.
const MAX_NAMES_PER_PROCESS: usize = 4096;
/// Connections known only by an adapter's word, in all; when they are all
/// taken, the process with the most gives one up.
const MAX_ALONE: usize = 32_768;

/// What an adapter's id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Named {
    /// The kernel's connection on (pid, fd), of this generation.
    Socket(Key, u64),
    /// A connection known only by the adapter's word, in `alone`.
    Alone(Key),
}

/// Where a connection an event means is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Open(Key),
    Alone(Key),
}

impl Tracker {
    /// Connections known only by their adapters' word (no socket).
    pub fn adapter_only_connections(&self) -> impl Iterator<Item = &Connection> {
        self.alone.values()
    }

    pub(super) fn set_of(&mut self, place: Place) -> (&mut OpenSet, Key) {
        match place {
            Place::Open(key) => (&mut self.open, key),
            Place::Alone(key) => (&mut self.alone, key),
        }
    }

    pub(super) fn at(&self, place: Place) -> Option<&Connection> {
        match place {
            Place::Open(key) => self.open.get(&key),
            Place::Alone(key) => self.alone.get(&key),
        }
    }

    /// Where the connection `id` of `pool` is now: the socket it was tied
    /// to while that connection lives, or its adapter-only entry. A tie to
    /// a connection since closed is forgotten.
    pub(super) fn named(&mut self, pid: u32, pool: &str, id: u64) -> Option<Place> {
        let key = (pid, pool.to_string());
        let named = *self.pools.get(&key)?.named.get(&id)?;
        match named {
            Named::Socket(socket, generation) => {
                let alive = self
                    .open
                    .get(&socket)
                    .is_some_and(|c| c.id.generation == generation && c.is_open());
                if alive {
                    return Some(Place::Open(socket));
                }
                self.unname(pid, pool, id);
                None
            }
            Named::Alone(at) => Some(Place::Alone(at)),
        }
    }

    /// The place for an event naming its connection by `id` alone: where
    /// the id points, or a new adapter-only connection (none for a close:
    /// `closing`).
    pub(super) fn place_named(
        &mut self,
        pid: u32,
        ts_ns: u64,
        pool: &str,
        id: u64,
        closing: bool,
        out: &mut Vec<Output>,
    ) -> Option<Place> {
        if let Some(place) = self.named(pid, pool, id) {
            return Some(place);
        }
        if closing {
            return None;
        }
        match self.new_alone(pid, ts_ns, pool, id) {
            Ok(key) => Some(Place::Alone(key)),
            Err(reason) => {
                out.push(Output::AdapterRefused { reason });
                None
            }
        }
    }

    /// Ties `id` of `pool` to the kernel's connection at `socket`. An
    /// adapter-only connection of that id hands its checkout over.
    pub(super) fn name_socket(&mut self, pid: u32, pool: &str, id: u64, socket: Key) {
        let Some(generation) = self.open.get(&socket).map(|c| c.id.generation) else {
            return;
        };
        let key = (pid, pool.to_string());
        let Some(known) = self.pools.get(&key).map(|p| p.named.get(&id).copied()) else {
            return;
        };
        if known.is_none() && !self.room_for_a_name(pid) {
            // The socket still names the connection; only the id is lost.
            return;
        }
        if let Some(p) = self.pools.get_mut(&key) {
            p.named.insert(id, Named::Socket(socket, generation));
        }
        match known {
            None => *self.names_per_pid.entry(pid).or_default() += 1,
            Some(Named::Alone(at)) => {
                if let Some(alone) = self.drop_alone(at) {
                    self.open.update(&socket, |conn| take_over(conn, alone));
                }
            }
            Some(Named::Socket(..)) => {}
        }
        self.open
            .update(&socket, |conn| conn.adapter_conn = Some(id));
    }

    /// Forgets `id` of `pool` (its connection closed), and its
    /// adapter-only connection if it has one.
    pub(super) fn unname(&mut self, pid: u32, pool: &str, id: u64) {
        let removed = self
            .pools
            .get_mut(&(pid, pool.to_string()))
            .and_then(|p| p.named.remove(&id));
        let Some(named) = removed else { return };
        super::pools::uncount(&mut self.names_per_pid, pid, 1);
        if let Named::Alone(at) = named {
            self.drop_alone(at);
        }
    }

    fn names_of(&self, pid: u32) -> usize {
        self.names_per_pid.get(&pid).copied().unwrap_or(0)
    }

    /// Whether `pid` may have one more id: under its share, or once the
    /// ids of sockets that closed since (an adapter need not say
    /// `connection_closed`) are forgotten. Scans only at the bound.
    fn room_for_a_name(&mut self, pid: u32) -> bool {
        if self.names_of(pid) < MAX_NAMES_PER_PROCESS {
            return true;
        }
        let open = &self.open;
        let mut forgotten = 0;
        for pool in self.pools.values_mut().filter(|p| p.pid == pid) {
            pool.named.retain(|_, named| {
                let alive = match *named {
                    Named::Socket(key, generation) => open
                        .get(&key)
                        .is_some_and(|c| c.id.generation == generation && c.is_open()),
                    Named::Alone(_) => true,
                };
                forgotten += usize::from(!alive);
                alive
            });
        }
        super::pools::uncount(&mut self.names_per_pid, pid, forgotten);
        self.names_of(pid) < MAX_NAMES_PER_PROCESS
    }

    /// A connection of `pool` known only by the adapter's id, from now.
    fn new_alone(
        &mut self,
        pid: u32,
        ts_ns: u64,
        pool: &str,
        id: u64,
    ) -> Result<Key, &'static str> {
        let key = (pid, pool.to_string());
        let Some(info) = self
            .pools
            .get(&key)
            .map(|p| p.info.clone().unwrap_or_default())
        else {
            return Err("pool_limit");
        };
        if !self.room_for_a_name(pid) {
            return Err("named_connection_limit");
        }
        self.make_room_for_alone(pid)?;
        let fd = self.free_alone_fd(pid);
        let server = match (info.server_address, info.server_port) {
            (Some(address), Some(port)) => format!("{address}:{port}"),
            (Some(address), None) => address,
            (None, _) => String::new(),
        };
        let comm = self.comms.get(&pid).cloned().unwrap_or_default();
        let id_of = ConnId {
            pid,
            fd,
            generation: ts_ns,
        };
        let mut conn = Connection::new(id_of, comm, Endpoint::Declared(server), ts_ns);
        conn.state = ConnState::Established;
        conn.pool = Some(pool.into());
        conn.adapter_conn = Some(id);
        conn.declared_system = info.db_system;
        self.alone.insert(conn);
        *self.alone_per_pid.entry(pid).or_default() += 1;
        *self.names_per_pid.entry(pid).or_default() += 1;
        if let Some(p) = self.pools.get_mut(&key) {
            p.named.insert(id, Named::Alone((pid, fd)));
        }
        Ok((pid, fd))
    }

    /// A negative fd no adapter-only connection of `pid` has: the agent's
    /// own numbering, which never meets the kernel's (never negative).
    fn free_alone_fd(&mut self, pid: u32) -> i32 {
        let next = self.next_alone_fd.entry(pid).or_insert(-1);
        loop {
            let fd = *next;
            *next = if fd == i32::MIN { -1 } else { fd - 1 };
            if !self.alone.contains_key(&(pid, fd)) {
                return fd;
            }
        }
    }

    /// Room for one more adapter-only connection of `pid`: when all are
    /// taken, the process with the most gives up one (an idle one if it
    /// has any), so that one sender never pushes out another's.
    fn make_room_for_alone(&mut self, pid: u32) -> Result<(), &'static str> {
        if self.alone.len() < MAX_ALONE {
            return Ok(());
        }
        let mine = self.alone_per_pid.get(&pid).copied().unwrap_or(0);
        let Some((heaviest, _)) = super::pools::heaviest_above(&self.alone_per_pid, mine) else {
            return Err("named_connection_limit");
        };
        let keys: Vec<Key> = self.alone.of_process(heaviest).collect();
        let idle = |key: &&Key| {
            self.alone
                .get(key)
                .is_some_and(|c| c.checked_out_at_ns.is_none())
        };
        let victim = keys.iter().find(idle).or(keys.first()).copied();
        if let Some(key) = victim {
            let named = self
                .alone
                .get(&key)
                .and_then(|c| Some((c.pool.clone()?, c.adapter_conn?)));
            match named {
                Some((pool, id)) => self.unname(heaviest, &pool, id),
                None => {
                    self.drop_alone(key);
                }
            }
        }
        Ok(())
    }

    fn drop_alone(&mut self, key: Key) -> Option<Connection> {
        let conn = self.alone.remove(&key)?;
        super::pools::uncount(&mut self.alone_per_pid, key.0, 1);
        Some(conn)
    }

    /// Forgets the ids of a pool that goes, and its adapter-only
    /// connections.
    pub(super) fn forget_names(&mut self, pool: &super::pools::Pool) {
        super::pools::uncount(&mut self.names_per_pid, pool.pid, pool.named.len());
        for named in pool.named.values() {
            if let Named::Alone(at) = named {
                self.drop_alone(*at);
            }
        }
    }

    /// Forgets every adapter-only connection and id of `pid` (it exited).
    pub(super) fn forget_named_of(&mut self, pid: u32) {
        let keys: Vec<Key> = self.alone.of_process(pid).collect();
        for key in keys {
            self.alone.remove(&key);
        }
        self.alone_per_pid.remove(&pid);
        self.names_per_pid.remove(&pid);
        self.next_alone_fd.remove(&pid);
    }
}

/// A socket's connection takes over what the adapter told of it while the
/// agent knew it only by id: its pool, and its checkout unless the socket's
/// own is newer.
fn take_over(conn: &mut Connection, alone: Connection) {
    if conn.pool.is_none() {
        conn.pool = alone.pool;
    }
    if conn.checked_out_at_ns.is_none() && alone.checked_out_at_ns.is_some() {
        conn.checked_out_at_ns = alone.checked_out_at_ns;
        conn.holder_tid = alone.holder_tid;
    }
    conn.released_at_ns = conn.released_at_ns.max(alone.released_at_ns);
}
