use std::{
    collections::{HashMap, VecDeque},
    ops::Bound,
};

use agent_common::{tcp_state, EINPROGRESS};

use crate::protocol::{Chunk, Direction, Observation, SessionParser};

#[path = "binding.rs"]
mod binding;
#[path = "named.rs"]
mod named;
#[path = "pools.rs"]
mod pools;

pub use binding::BindingStats;
pub use pools::{implicit_pool_name, Pool, PoolActivity, PoolView};

use super::{
    fast_hash::NumberMap,
    index::{listing, ClosedList, OpenSet},
    CloseReason, ConnId, ConnState, ConnectOutcome, Connection, Endpoint, Event, EventKind, Output,
    SeededPhase,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerConfig {
    /// How long closed connections stay listed.
    pub closed_retention_ns: u64,
    /// At most this many closed connections are kept.
    pub max_closed: usize,
    /// How long a process exit is remembered, to place events that arrive
    /// after it (from another CPU) in the dead process rather than a live one.
    pub exit_memory_ns: u64,
    /// Keep query text as sent instead of sanitizing literals away.
    pub raw_queries: bool,
    /// Adapter pools of all processes together (each process at most 64).
    pub max_pools: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            closed_retention_ns: 300_000_000_000,
            max_closed: 4096,
            exit_memory_ns: 10_000_000_000,
            raw_queries: false,
            max_pools: 1024,
        }
    }
}

/// Processes and their connections.
#[derive(Default)]
pub struct Tracker {
    config: TrackerConfig,
    /// Open connections, indexed by (pid, fd), process, local address and
    /// pool use.
    open: OpenSet,
    /// Recently closed connections, oldest first, indexed by id.
    closed: ClosedList,
    comms: NumberMap<u32, String>,
    /// Container and pod of processes with connections, told by the pipeline.
    placements: NumberMap<u32, crate::procfs::Placement>,
    exited: NumberMap<u32, u64>,
    /// Protocol state of open connections that carried data.
    parsers: NumberMap<(u32, i32), SessionParser>,
    /// Pools that adapters reported, by (pid, pool name).
    pools: HashMap<(u32, String), Pool>,
    /// Adapter events waiting for the kernel to show their connection.
    unmatched: VecDeque<pools::Unmatched>,
    /// How many of `unmatched` each process has, so that a new connection
    /// of a process with none skips the queue.
    unmatched_per_pid: HashMap<u32, usize>,
    /// How many pools each process has (pools are bounded per process).
    pools_per_pid: HashMap<u32, usize>,
    /// Acquires waiting, per process and in all (bounded both ways).
    pub(super) pending_per_pid: HashMap<u32, usize>,
    pub(super) pending_total: usize,
    /// Connections known only by an adapter's id (no socket), with a
    /// negative fd of the agent's choosing; see `named`.
    alone: OpenSet,
    alone_per_pid: HashMap<u32, usize>,
    /// Adapter ids alive per process (bounded), and the next fd for its
    /// adapter-only connections.
    names_per_pid: HashMap<u32, usize>,
    next_alone_fd: HashMap<u32, i32>,
    /// Connections named by id alone that wait to be tied to their socket;
    /// see `binding`.
    claims: binding::Claims,
    /// The stacks of long checkouts, as their adapters sent them.
    pub(super) stacks: super::stacks::HolderStacks,
}

/// Whether `conn`'s checkout that began at `checkout_ns` goes on (the
/// connections known by id alone have negative fds).
fn still_held(open: &OpenSet, alone: &OpenSet, conn: ConnId, checkout_ns: u64) -> bool {
    let set = if conn.fd < 0 { alone } else { open };
    set.get(&(conn.pid, conn.fd))
        .is_some_and(|c| c.id == conn && c.checked_out_at_ns == Some(checkout_ns))
}

/// How an event's generation relates to the connection now on its (pid, fd).
enum Slot {
    Current,
    /// The open connection is older: it was replaced without a close we saw.
    Older,
    /// The open connection is newer: the event is about an earlier one.
    Newer,
    Empty,
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            config,
            ..Tracker::default()
        }
    }

    pub fn open_connections(&self) -> impl Iterator<Item = &Connection> {
        self.open.values()
    }

    pub fn closed_connections(&self) -> impl Iterator<Item = &Connection> {
        self.closed.iter()
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn closed_count(&self) -> usize {
        self.closed.len()
    }

    /// Open and closed connections in id order, from `start` on: the API
    /// lists them a page at a time from a cursor. An id appears once, open
    /// if it is open.
    pub fn connections_from(&self, start: Bound<ConnId>) -> impl Iterator<Item = &Connection> {
        listing(&self.open, &self.closed, start)
    }

    /// Whether the placement of `pid` is known (the pipeline asks /proc once).
    /// Processes the agent has read from /proc and not seen exit.
    pub fn known_processes(&self) -> impl Iterator<Item = u32> + '_ {
        self.placements.keys().copied()
    }

    pub fn knows_placement(&self, pid: u32) -> bool {
        self.placements.contains_key(&pid)
    }

    pub fn set_placement(&mut self, pid: u32, placement: crate::procfs::Placement) {
        self.placements.insert(pid, placement);
    }

    /// The process's own name (the kernel's events carry the calling
    /// thread's, which may be a worker's).
    pub fn set_process_name(&mut self, pid: u32, name: String) {
        if !name.is_empty() {
            self.comms.insert(pid, name);
        }
    }

    /// The container and pod of `pid`, when it runs in one.
    pub fn placement(&self, pid: u32) -> Option<&crate::procfs::Placement> {
        self.placements.get(&pid).filter(|p| !p.is_empty())
    }

    /// A connection by its identity, open or recently closed.
    pub fn connection(&self, id: ConnId) -> Option<&Connection> {
        let open = if id.fd < 0 { &self.alone } else { &self.open };
        match open.get(&(id.pid, id.fd)) {
            Some(c) if c.id == id => Some(c),
            _ => self.closed.get(&id),
        }
    }

    /// The stack of the code that checked `conn` out, when its adapter
    /// sent one for the checkout going on now.
    pub fn holder_stack(&self, conn: &Connection) -> Option<&crate::adapter::message::HolderStack> {
        self.stacks.of(conn.id, conn.checked_out_at_ns?)
    }

    /// Keeps a holder stack for `conn`'s checkout that began at
    /// `checkout_ns` (see [`super::stacks::HolderStacks::keep`]).
    pub(super) fn keep_stack(
        &mut self,
        conn: ConnId,
        checkout_ns: u64,
        stack: crate::adapter::message::HolderStack,
    ) -> Result<(), &'static str> {
        let (open, alone) = (&self.open, &self.alone);
        self.stacks.keep(conn, checkout_ns, stack, |c, since| {
            still_held(open, alone, c, since)
        })
    }

    pub fn process_name(&self, pid: u32) -> Option<&str> {
        self.comms.get(&pid).map(String::as_str)
    }

    pub fn apply(&mut self, event: Event) -> Vec<Output> {
        let mut out = Vec::new();
        let Event { ts_ns, conn, kind } = event;
        match kind {
            EventKind::Connect {
                tid,
                ret,
                remote,
                comm,
            } => self.on_connect(ts_ns, conn, tid, ret, remote, comm, &mut out),
            EventKind::SockState {
                old_state,
                new_state,
                local,
                remote,
                reset_received,
            } => {
                let change = StateChange {
                    old_state,
                    new_state,
                    local,
                    remote,
                    reset_received,
                };
                self.on_sock_state(ts_ns, conn, change, &mut out)
            }
            EventKind::Close => self.on_close(ts_ns, conn, &mut out),
            EventKind::Data {
                sent,
                enter_ns,
                total_len,
                head,
                tail,
                tls_plaintext,
            } => {
                let direction = if sent {
                    Direction::ToServer
                } else {
                    Direction::FromServer
                };
                // A request starts when its write begins; a response ends
                // when its read returns.
                let chunk = Chunk {
                    direction,
                    ts_ns: if sent { enter_ns } else { ts_ns },
                    head: &head,
                    tail: &tail,
                    total_len: total_len as usize,
                };
                self.on_data(conn, chunk, tls_plaintext, &mut out)
            }
            EventKind::ProcessExit { .. } => self.on_exit(ts_ns, conn.pid, &mut out),
            EventKind::Seeded {
                comm,
                local,
                remote,
                phase,
            } => self.on_seeded(ts_ns, conn, comm, local, remote, phase, &mut out),
        }
        out
    }

    /// Forgets closed connections and exits older than their retention.
    pub fn expire(&mut self, now_ns: u64) {
        let retention = self.config.closed_retention_ns;
        while let Some(front) = self.closed.front() {
            let closed_at = front.closed_at_ns.unwrap_or(0);
            if closed_at.saturating_add(retention) < now_ns
                || self.closed.len() > self.config.max_closed
            {
                self.closed.pop_front();
            } else {
                break;
            }
        }
        self.expire_unmatched(now_ns);
        let (open, alone) = (&self.open, &self.alone);
        self.stacks
            .forget_ended(&|conn, since| still_held(open, alone, conn, since));
        let memory = self.config.exit_memory_ns;
        self.exited
            .retain(|_, exit_ns| exit_ns.saturating_add(memory) >= now_ns);
    }

    fn slot(&self, conn: ConnId) -> Slot {
        match self.open.get(&(conn.pid, conn.fd)) {
            None => Slot::Empty,
            Some(c) if c.id.generation == conn.generation => Slot::Current,
            Some(c) if c.id.generation < conn.generation => Slot::Older,
            Some(_) => Slot::Newer,
        }
    }

    fn closed_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        self.closed.get_mut(&id)
    }

    /// When the process is known to have exited after this connection began,
    /// the connection died with it.
    fn exited_after(&self, conn: ConnId) -> Option<u64> {
        self.exited
            .get(&conn.pid)
            .copied()
            .filter(|&exit_ns| exit_ns >= conn.generation)
    }

    /// Moves a connection out of the open set and reports it.
    fn finish(
        &mut self,
        mut conn: Connection,
        at_ns: u64,
        state: ConnState,
        reason: CloseReason,
        out: &mut Vec<Output>,
    ) {
        // Taken out to be updated, then finished: its parser goes now.
        self.parsers.remove(&(conn.id.pid, conn.id.fd));
        conn.state = state;
        conn.closed_at_ns = Some(at_ns.max(conn.opened_at_ns));
        conn.close_reason = Some(reason);
        if state == ConnState::Closed {
            out.push(Output::Closed {
                id: conn.id,
                comm: conn.comm.clone(),
                remote: conn.remote.clone(),
                reason,
                lifetime_ns: conn.lifetime_ns(at_ns),
                seen_at_start: conn.seen_at_start,
            });
        }
        self.closed.push_back(conn);
        if self.closed.len() > self.config.max_closed {
            self.closed.pop_front();
        }
    }

    /// Takes a connection out for good (closed, replaced, its process
    /// gone): its parser goes with it.
    fn take_open(&mut self, pid: u32, fd: i32) -> Option<Connection> {
        self.parsers.remove(&(pid, fd));
        self.open.remove(&(pid, fd))
    }

    /// Takes a connection out to change it and put it back (or finish it):
    /// its parser stays, since its bytes may have come before the event
    /// that changes it (a peer's hang-up races the client's last request,
    /// whose TLS plaintext is reported when the library call returns).
    fn take_open_to_update(&mut self, pid: u32, fd: i32) -> Option<Connection> {
        self.open.remove(&(pid, fd))
    }

    fn on_data(&mut self, id: ConnId, chunk: Chunk, tls_plaintext: bool, out: &mut Vec<Output>) {
        if !matches!(self.slot(id), Slot::Current) {
            out.push(Output::Unmatched);
            return;
        }
        let key = (id.pid, id.fd);
        let Some(conn) = self.open.get_mut(&key) else {
            return;
        };
        if conn.plaintext && !tls_plaintext {
            // Ciphertext of a connection whose TLS library gives its
            // plaintext (the kernel stops copying it once it knows).
            return;
        }
        match chunk.direction {
            Direction::ToServer => {
                conn.bytes_sent += chunk.total_len as u64;
                conn.awaiting_response = true;
            }
            // An inferred pool counts a connection as used while a request
            // waits; any answer (a handshake step, a response) ends that.
            Direction::FromServer => {
                conn.bytes_received += chunk.total_len as u64;
                conn.awaiting_response = false;
            }
        }
        conn.last_activity_ns = Some(chunk.ts_ns);
        let raw = self.config.raw_queries;
        let parser = self.parsers.entry(key).or_insert_with(|| {
            let mut parser = SessionParser::new(conn.remote.port());
            parser.set_raw_queries(raw);
            parser
        });
        if tls_plaintext && !conn.plaintext {
            conn.plaintext = true;
            parser.plaintext_follows();
        }
        let mut observations = Vec::new();
        parser.feed(&chunk, &mut observations);
        if conn.db_system.is_none() {
            if let Some(system) = parser.system() {
                out.push(Output::Detected { id, system });
            }
        }
        conn.db_system = parser.system();
        let was_encrypted = std::mem::replace(&mut conn.encrypted, parser.is_encrypted());
        if conn.encrypted && !was_encrypted && !conn.plaintext {
            out.push(Output::Encrypted { id });
        }
        if parser.gave_up() {
            // The parser stays (it ignores what still comes): a new one
            // would start detecting again in the middle of the stream.
            out.push(Output::NotDatabase { id });
            return;
        }
        for observation in observations {
            match observation {
                Observation::RoundTrip(trip) => {
                    conn.round_trips += 1;
                    if trip.query.is_some() {
                        conn.last_query.clone_from(&trip.query);
                        conn.last_operation.clone_from(&trip.operation);
                    }
                    if trip.tx_state.is_some() {
                        conn.tx_state = trip.tx_state;
                    }
                    if trip.namespace.is_some() {
                        conn.namespace.clone_from(&trip.namespace);
                    }
                    if let Some(system) = conn.db_system {
                        out.push(Output::RoundTrip {
                            id,
                            comm: conn.comm.clone(),
                            remote: conn.remote.clone(),
                            system,
                            trip,
                        });
                    }
                }
                Observation::Startup { user, database } => {
                    conn.db_user = user;
                    if database.is_some() {
                        conn.namespace = database;
                    }
                }
                // Already told by `is_encrypted` above.
                Observation::Encrypted => {}
                Observation::Lost { reason } => {
                    conn.protocol_lost += 1;
                    out.push(Output::ProtocolLost { id, reason });
                }
                Observation::Resynced => {}
            }
        }
        // The parser knows the session better than its round trips tell:
        // the transaction status from the start (PostgreSQL's start-up
        // ReadyForQuery, MySQL's authentication OK, which are no round
        // trips), and whether a request waits for the end of its response,
        // not merely for its first bytes (rows may stream for long).
        if let Some(tx) = parser.tx_state() {
            conn.tx_state = Some(tx);
        }
        if conn.db_system.is_some() {
            conn.awaiting_response = parser.request_outstanding();
        }
    }

    /// Makes room for `conn` on its (pid, fd): an older connection there was
    /// replaced. Returns false when the slot holds a newer one (stale event).
    fn claim_slot(&mut self, at_ns: u64, conn: ConnId, out: &mut Vec<Output>) -> bool {
        match self.slot(conn) {
            Slot::Current | Slot::Empty => true,
            Slot::Newer => false,
            Slot::Older => {
                if let Some(old) = self.take_open(conn.pid, conn.fd) {
                    // A /proc snapshot taken after this connect began saw the
                    // same socket: it was never a separate connection.
                    let seen_twice = old.seen_at_start && old.opened_at_ns >= conn.generation;
                    if !seen_twice {
                        self.finish(old, at_ns, ConnState::Closed, CloseReason::Replaced, out);
                    }
                }
                true
            }
        }
    }

    fn new_connection(&self, id: ConnId, remote: Endpoint, opened_at_ns: u64) -> Connection {
        let comm = self.comms.get(&id.pid).cloned().unwrap_or_default();
        Connection::new(id, comm, remote, opened_at_ns)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_connect(
        &mut self,
        ts_ns: u64,
        id: ConnId,
        tid: u32,
        ret: i64,
        remote: Endpoint,
        comm: String,
        out: &mut Vec<Output>,
    ) {
        if !comm.is_empty() && self.exited_after(id).is_none() {
            self.comms.entry(id.pid).or_insert_with(|| comm.clone());
            // A connect newer than a remembered exit means the pid was reused.
            if self.exited.get(&id.pid).is_some_and(|&e| e < id.generation) {
                self.exited.remove(&id.pid);
            }
        }
        if !self.claim_slot(id.generation, id, out) {
            // An older connection's late connect: fill in what we can.
            if let Some(c) = self.closed_mut(id) {
                c.tid = Some(tid);
            }
            out.push(Output::Unmatched);
            return;
        }
        let mut conn = match self.take_open_to_update(id.pid, id.fd) {
            Some(conn) => conn,
            None => match self.closed_mut(id) {
                // Closed before its connect event got here: just complete it.
                Some(c) => {
                    c.tid = Some(tid);
                    c.comm.clone_from(&comm);
                    return;
                }
                None => self.new_connection(id, remote.clone(), id.generation),
            },
        };
        conn.tid = Some(tid);
        conn.remote = remote;
        if let Some(name) = self.comms.get(&id.pid) {
            conn.comm.clone_from(name);
        } else if !comm.is_empty() {
            conn.comm = comm;
        }
        if ret == 0 {
            if conn.state == ConnState::Connecting {
                conn.state = ConnState::Established;
            }
            self.resolve_outcome(&mut conn, ConnectOutcome::Ok, ts_ns, out);
        } else if ret != EINPROGRESS {
            let outcome = ConnectOutcome::from_errno(ret);
            self.resolve_outcome(&mut conn, outcome, ts_ns, out);
            self.finish(
                conn,
                ts_ns,
                ConnState::Failed,
                CloseReason::ConnectFailed,
                out,
            );
            return;
        }
        self.place(conn, out);
    }

    /// Records the connect's outcome once; later sources of the same fact
    /// (connect()'s return and the TCP state change both say it) are ignored.
    fn resolve_outcome(
        &self,
        conn: &mut Connection,
        outcome: ConnectOutcome,
        at_ns: u64,
        out: &mut Vec<Output>,
    ) {
        if conn.outcome.is_some() {
            return;
        }
        let latency = at_ns.saturating_sub(conn.id.generation);
        conn.outcome = Some(outcome);
        conn.connect_latency_ns = Some(latency);
        out.push(Output::ConnectFinished {
            id: conn.id,
            comm: conn.comm.clone(),
            remote: conn.remote.clone(),
            outcome,
            latency_ns: Some(latency),
        });
    }

    /// Puts a connection in the open set, unless its process already exited.
    fn place(&mut self, conn: Connection, out: &mut Vec<Output>) {
        match self.exited_after(conn.id) {
            Some(exit_ns) => self.finish(
                conn,
                exit_ns,
                ConnState::Closed,
                CloseReason::ProcessExit,
                out,
            ),
            None => {
                let pid = conn.id.pid;
                let now = conn.opened_at_ns;
                // A connection born after a remembered exit: the pid was reused.
                self.exited.remove(&pid);
                self.open.insert(conn);
                self.retry_unmatched(pid, now, out);
            }
        }
    }

    fn on_sock_state(
        &mut self,
        ts_ns: u64,
        id: ConnId,
        change: StateChange,
        out: &mut Vec<Output>,
    ) {
        if id.pid == 0 {
            return self.on_untracked_state(ts_ns, change, out);
        }
        if !self.claim_slot(id.generation, id, out) || self.closed_mut(id).is_some() {
            out.push(Output::Unmatched);
            return;
        }
        let mut conn = match self.take_open_to_update(id.pid, id.fd) {
            Some(conn) => conn,
            // The state change beat connect()'s return to us: start the
            // connection here, the connect event completes it.
            None => self.new_connection(id, Endpoint::Inet(change.remote), id.generation),
        };
        if change.local.port() != 0 {
            conn.local = Some(change.local);
        }
        match change.new_state {
            tcp_state::ESTABLISHED => {
                if conn.state == ConnState::Connecting {
                    conn.state = ConnState::Established;
                }
                self.resolve_outcome(&mut conn, ConnectOutcome::Ok, ts_ns, out);
            }
            tcp_state::CLOSE_WAIT => mark_peer_closed(&mut conn, ts_ns, out),
            tcp_state::CLOSE if change.old_state == tcp_state::SYN_SENT => {
                // No errno here: a reset means the server refused, silence
                // means the SYNs timed out (or an ICMP error, which we can't
                // tell apart here).
                let outcome = if change.reset_received {
                    ConnectOutcome::Refused
                } else {
                    ConnectOutcome::TimedOut
                };
                self.resolve_outcome(&mut conn, outcome, ts_ns, out);
                self.finish(
                    conn,
                    ts_ns,
                    ConnState::Failed,
                    CloseReason::ConnectFailed,
                    out,
                );
                return;
            }
            _ => {}
        }
        self.place(conn, out);
    }

    /// A peer hang-up on a socket we did not see connect: match it to a
    /// seeded connection by its addresses.
    fn on_untracked_state(&mut self, ts_ns: u64, change: StateChange, out: &mut Vec<Output>) {
        if change.new_state != tcp_state::CLOSE_WAIT {
            out.push(Output::Unmatched);
            return;
        }
        let found = self.open.by_addresses(change.local, change.remote);
        let marked = found.and_then(|key| {
            self.open
                .update(&key, |conn| mark_peer_closed(conn, ts_ns, out))
        });
        if marked.is_none() {
            out.push(Output::Unmatched);
        }
    }

    fn on_close(&mut self, ts_ns: u64, id: ConnId, out: &mut Vec<Output>) {
        match self.slot(id) {
            Slot::Current => {
                if let Some(conn) = self.take_open(id.pid, id.fd) {
                    self.finish(conn, ts_ns, ConnState::Closed, CloseReason::Closed, out);
                }
            }
            Slot::Older => {
                // We missed this connection's start; what was open there is gone.
                if let Some(old) = self.take_open(id.pid, id.fd) {
                    self.finish(
                        old,
                        id.generation,
                        ConnState::Closed,
                        CloseReason::Replaced,
                        out,
                    );
                }
                out.push(Output::Unmatched);
            }
            Slot::Newer | Slot::Empty => out.push(Output::Unmatched),
        }
    }

    fn on_exit(&mut self, ts_ns: u64, pid: u32, out: &mut Vec<Output>) {
        let fds: Vec<i32> = self
            .open
            .of_process(pid)
            .filter(|key| self.open.get(key).is_some_and(|c| c.id.generation <= ts_ns))
            .map(|(_, fd)| fd)
            .collect();
        for fd in fds {
            if let Some(conn) = self.take_open(pid, fd) {
                self.finish(
                    conn,
                    ts_ns,
                    ConnState::Closed,
                    CloseReason::ProcessExit,
                    out,
                );
            }
        }
        self.exited.insert(pid, ts_ns);
        self.comms.remove(&pid);
        self.placements.remove(&pid);
        self.forget_pools(pid);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_seeded(
        &mut self,
        ts_ns: u64,
        id: ConnId,
        comm: String,
        local: Option<std::net::SocketAddr>,
        remote: Endpoint,
        phase: SeededPhase,
        out: &mut Vec<Output>,
    ) {
        // The kernel's view wins over a /proc snapshot taken around the same time.
        if self.open.contains_key(&(id.pid, id.fd)) || self.exited.contains_key(&id.pid) {
            out.push(Output::Unmatched);
            return;
        }
        self.comms.entry(id.pid).or_insert_with(|| comm.clone());
        let mut conn = self.new_connection(id, remote, ts_ns);
        conn.comm = comm;
        conn.local = local;
        conn.seen_at_start = true;
        match phase {
            SeededPhase::Connecting => {}
            SeededPhase::Established => {
                conn.state = ConnState::Established;
                conn.outcome = Some(ConnectOutcome::Ok);
            }
            SeededPhase::PeerClosed => {
                conn.state = ConnState::PeerClosed;
                conn.outcome = Some(ConnectOutcome::Ok);
                conn.peer_closed_at_ns = Some(ts_ns);
            }
        }
        self.open.insert(conn);
    }
}

struct StateChange {
    old_state: i32,
    new_state: i32,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    reset_received: bool,
}

fn mark_peer_closed(conn: &mut Connection, ts_ns: u64, out: &mut Vec<Output>) {
    if conn.state == ConnState::PeerClosed {
        return;
    }
    conn.state = ConnState::PeerClosed;
    conn.peer_closed_at_ns = Some(ts_ns);
    out.push(Output::PeerClosed { id: conn.id });
}
