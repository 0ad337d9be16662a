//! Ties a connection an adapter names by its id alone (a library that hides
//! its socket) to the kernel's socket, from evidence the agent already has:
//! the adapter says which thread connected it (`connection_created` with a
//! `tid`), and the kernel saw every connect() with its thread. A binding is
//! made only when that evidence leaves exactly one socket; otherwise the
//! connection stays known by the adapter's word alone. A child of the
//! tracker module, as `named` is.
//!
//! Why one candidate is enough. The adapter sends the `tid` only when that
//! thread's connect() opened the socket, and it reports after the connect,
//! so the socket is among those of the same process, connected by that
//! thread, in the window before the message. Whatever else is there makes
//! the choice ambiguous, never wrong, except what the agent cannot see; so
//! it refuses when it may have missed something: kernel events were dropped
//! in the window, a socket of unknown thread (one found at start-up) might
//! fall in it, or the one candidate is not (or no longer) established.
//! Sockets already named by an adapter (by fd, address, or an earlier
//! binding) are someone else's and are left out.

use std::collections::{HashMap, VecDeque};

use super::{named::Named, Tracker};
use crate::{
    lifecycle::{index::Key, ConnState, ConnectOutcome, Connection, Endpoint},
    protocol::SystemName,
};

/// How long after a `connection_created` the agent waits before judging
/// it: the kernel's events of that connect are read by then (the ring is
/// drained within milliseconds).
const SETTLE_NS: u64 = 1_000_000_000;
/// How long before a `connection_created` its socket may have been
/// connected (a connect, TLS handshake and authentication together).
/// Longer only makes more bindings ambiguous, never a wrong one.
const CONNECT_WINDOW_NS: u64 = 60_000_000_000;
/// Claims waiting to be judged, in all and per process; past them a claim
/// is not made (the connection stays adapter-only), and one process never
/// takes another's room: when all are taken, the one with the most gives
/// up its oldest.
const MAX_CLAIMS: usize = 4096;
const MAX_CLAIMS_PER_PROCESS: usize = 256;
/// Claims judged in one pass (each looks at the process's connections).
const MAX_JUDGED_PER_PASS: usize = 512;

/// A connection named by id alone whose adapter said which thread
/// connected it.
#[derive(Debug, Clone)]
struct Claim {
    pid: u32,
    pool: String,
    id: u64,
    tid: u32,
    ts_ns: u64,
}

/// Claims waiting for their evidence to settle, and what came of them.
#[derive(Debug, Default)]
pub(super) struct Claims {
    queue: VecDeque<Claim>,
    per_pid: HashMap<u32, usize>,
    /// The kernel's dropped-event count as last told, and when it last grew.
    drops_seen: u64,
    last_drop_ns: Option<u64>,
    stats: BindingStats,
}

/// What came of the claims so far (the agent's own metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BindingStats {
    /// Connections tied to their socket.
    pub bound: u64,
    /// Claims whose evidence left more than one socket, or none, or could
    /// not be trusted: those connections stay adapter-only.
    pub ambiguous: u64,
    /// Claims not kept, for want of room.
    pub refused: u64,
}

impl Tracker {
    pub fn binding_stats(&self) -> BindingStats {
        self.claims.stats
    }

    /// Remembers that `tid` connected the connection `id` of `pool`, known
    /// by that id alone, to be judged once the kernel's events are in.
    pub(super) fn claim_socket(&mut self, pid: u32, pool: &str, id: u64, tid: u32, ts_ns: u64) {
        let claims = &mut self.claims;
        if claims.per_pid.get(&pid).copied().unwrap_or(0) >= MAX_CLAIMS_PER_PROCESS {
            claims.stats.refused += 1;
            return;
        }
        if claims.queue.len() >= MAX_CLAIMS && !claims.give_up_heaviest(pid) {
            claims.stats.refused += 1;
            return;
        }
        claims.queue.push_back(Claim {
            pid,
            pool: pool.to_string(),
            id,
            tid,
            ts_ns,
        });
        *claims.per_pid.entry(pid).or_default() += 1;
    }

    /// Judges the claims whose evidence has settled by `now_ns`, tying each
    /// connection to its socket where exactly one fits. `kernel_drops` is
    /// the kernel's dropped-event count now: a claim whose window saw it
    /// grow is not trusted.
    pub fn bind_hidden_sockets(&mut self, now_ns: u64, kernel_drops: u64) {
        if kernel_drops > self.claims.drops_seen {
            self.claims.drops_seen = kernel_drops;
            self.claims.last_drop_ns = Some(now_ns);
        }
        for _ in 0..MAX_JUDGED_PER_PASS {
            let settled = self
                .claims
                .queue
                .front()
                .is_some_and(|c| c.ts_ns.saturating_add(SETTLE_NS) <= now_ns);
            if !settled {
                break;
            }
            let Some(claim) = self.claims.queue.pop_front() else {
                break;
            };
            super::pools::uncount(&mut self.claims.per_pid, claim.pid, 1);
            match self.only_socket_for(&claim) {
                Some(socket) => {
                    self.name_socket(claim.pid, &claim.pool, claim.id, socket);
                    self.claims.stats.bound += 1;
                }
                None => self.claims.stats.ambiguous += 1,
            }
        }
    }

    /// Forgets the claims of `pid` (it exited).
    pub(super) fn forget_claims_of(&mut self, pid: u32) {
        if self.claims.per_pid.remove(&pid).is_some() {
            self.claims.queue.retain(|c| c.pid != pid);
        }
    }

    /// The one socket the claim's evidence leaves, if exactly one.
    fn only_socket_for(&self, claim: &Claim) -> Option<Key> {
        let pool = self.pools.get(&(claim.pid, claim.pool.clone()))?;
        // Still known by the id alone (the adapter may have named the
        // socket since, or closed the connection).
        if !matches!(pool.named.get(&claim.id), Some(Named::Alone(_))) {
            return None;
        }
        let from_ns = claim.ts_ns.saturating_sub(CONNECT_WINDOW_NS);
        // Dropped kernel events may have been that connect; the count is
        // read once a second, so a drop is as old as the tick before.
        let slack = SETTLE_NS;
        if self
            .claims
            .last_drop_ns
            .is_some_and(|at| at.saturating_add(slack) >= from_ns)
        {
            return None;
        }
        let open = self
            .open
            .of_process(claim.pid)
            .filter_map(|key| self.open.get(&key));
        let closed = self.closed.iter().filter(|c| c.id.pid == claim.pid);
        let mut only: Option<&Connection> = None;
        for conn in open.chain(closed) {
            match fits(conn, claim, from_ns) {
                Fit::No => {}
                Fit::Maybe => return None,
                Fit::Yes if only.is_some() => return None,
                Fit::Yes => only = Some(conn),
            }
        }
        let conn = only?;
        let declared = pool.info.as_ref();
        let agrees = conn.state == ConnState::Established
            && declared.is_none_or(|info| {
                server_agrees(
                    &conn.remote,
                    info.server_address.as_deref(),
                    info.server_port,
                ) && system_agrees(conn, info.db_system.as_ref())
            });
        let key = (conn.id.pid, conn.id.fd);
        // Open now, and the same connection the evidence was about.
        let current = self
            .open
            .get(&key)
            .is_some_and(|c| c.id.generation == conn.id.generation);
        (agrees && current).then_some(key)
    }
}

impl Claims {
    /// Room for one claim of `pid` when all are taken: the process with
    /// the most (more than `pid`) gives up its oldest.
    fn give_up_heaviest(&mut self, pid: u32) -> bool {
        let mine = self.per_pid.get(&pid).copied().unwrap_or(0);
        let Some((heaviest, _)) = super::pools::heaviest_above(&self.per_pid, mine) else {
            return false;
        };
        let Some(at) = self.queue.iter().position(|c| c.pid == heaviest) else {
            return false;
        };
        self.queue.remove(at);
        super::pools::uncount(&mut self.per_pid, heaviest, 1);
        self.stats.refused += 1;
        true
    }
}

/// How a connection of the claim's process stands to the claim.
enum Fit {
    /// Cannot be the claimed socket.
    No,
    /// Could be, and is the claimed thread's.
    Yes,
    /// Could be, and the agent cannot tell whose thread it was: the claim
    /// cannot be judged.
    Maybe,
}

fn fits(conn: &Connection, claim: &Claim, from_ns: u64) -> Fit {
    // Someone's already: named by an adapter (by its socket, or bound).
    if conn.adapter_conn.is_some() || conn.pool.is_some() {
        return Fit::No;
    }
    // A failed connect is no pool's connection.
    if conn.outcome.is_some_and(|o| o != ConnectOutcome::Ok) {
        return Fit::No;
    }
    // Found at start-up: its connect's time and thread are unknown; it may
    // fall in the window if the agent started within it.
    if conn.seen_at_start {
        return if conn.opened_at_ns > from_ns {
            Fit::Maybe
        } else {
            Fit::No
        };
    }
    // The socket was connected before the adapter said so.
    if conn.opened_at_ns <= from_ns || conn.opened_at_ns > claim.ts_ns {
        return Fit::No;
    }
    match conn.tid {
        Some(tid) if tid == claim.tid => Fit::Yes,
        Some(_) => Fit::No,
        None => Fit::Maybe,
    }
}

/// Whether the socket's peer can be the server the pool declared: the
/// same port, and the same address when the declaration is an IP address
/// (a host name the agent does not resolve).
fn server_agrees(remote: &Endpoint, address: Option<&str>, port: Option<u16>) -> bool {
    let Endpoint::Inet(peer) = remote else {
        // A Unix socket: the declaration names a host, a path or nothing.
        return port.is_none();
    };
    let port_agrees = port.is_none_or(|p| p == peer.port());
    let address_agrees = address
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
        .is_none_or(|ip| ip == peer.ip() || ip.to_canonical() == peer.ip().to_canonical());
    port_agrees && address_agrees
}

/// Whether what the socket's bytes said it speaks (if they said yet)
/// is what the pool declared.
fn system_agrees(conn: &Connection, declared: Option<&SystemName>) -> bool {
    match (conn.db_system, declared) {
        (Some(read), Some(SystemName::Read(said))) => read == *said,
        (Some(_), Some(SystemName::Named(_))) => false,
        _ => true,
    }
}
