//! The connection-lifecycle state machine: pure and synchronous.
//!
//! `Tracker::apply(event)` folds one kernel (or seeding) event into the state
//! of processes and their connections and returns what happened, for the
//! telemetry layer to count. It never touches the kernel, sockets or /proc,
//! so every ordering problem is a plain scenario test below.
//!
//! A connection is named by [`ConnId`]: (pid, fd) plus a generation, the
//! kernel time at which its connect() began. The generation is what lets the
//! tracker tell a reused fd or pid from the connection it replaced, and order
//! events that arrive out of order from different CPUs.

pub mod config;
pub(crate) mod fast_hash;
mod index;
pub mod stacks;
mod tracker;

pub use tracker::{
    implicit_pool_name, BindingStats, Pool, PoolActivity, PoolView, Tracker, TrackerConfig,
};

use serde::{Deserialize, Serialize};

use crate::{
    adapter::message::AcquireResult,
    protocol::{DbSystem, RoundTrip, TxState},
};
use std::net::SocketAddr;

/// Identity of one connection. `generation == 0` means seeded from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConnId {
    pub pid: u32,
    pub fd: i32,
    pub generation: u64,
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Inet(SocketAddr),
    Unix(String),
    /// No socket the agent knows: the server as the connection's pool
    /// declared it (`host:port`, a file for SQLite), possibly empty.
    Declared(String),
}

impl Endpoint {
    /// `server.address` as OpenTelemetry names it.
    pub fn address(&self) -> String {
        match self {
            Endpoint::Inet(sa) => sa.ip().to_string(),
            Endpoint::Unix(path) | Endpoint::Declared(path) => path.clone(),
        }
    }

    /// `server.port`; Unix sockets have none.
    pub fn port(&self) -> Option<u16> {
        match self {
            Endpoint::Inet(sa) => Some(sa.port()),
            Endpoint::Unix(_) | Endpoint::Declared(_) => None,
        }
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Endpoint::Inet(_) => "tcp",
            Endpoint::Unix(_) => "unix",
            Endpoint::Declared(_) => "none",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Inet(sa) => write!(f, "{sa}"),
            Endpoint::Unix(path) => write!(f, "unix:{path}"),
            Endpoint::Declared(server) => write!(f, "{server}"),
        }
    }
}

/// One input to the tracker. `ts_ns` is CLOCK_MONOTONIC, as the kernel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub conn: ConnId,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// connect() returned `ret` (0, -EINPROGRESS or -errno).
    Connect {
        tid: u32,
        ret: i64,
        remote: Endpoint,
        comm: String,
    },
    /// A TCP state change of a socket. `conn.pid == 0` when the kernel did not
    /// see the socket connect; the tracker then matches it by address.
    SockState {
        old_state: i32,
        new_state: i32,
        local: SocketAddr,
        remote: SocketAddr,
        reset_received: bool,
    },
    /// The fd was closed.
    Close,
    /// The process's last thread exited; `conn.fd` is meaningless.
    ProcessExit { comm: String },
    /// Bytes the process sent (`sent`) or received on the connection:
    /// the head and, for long buffers, the tail of what moved.
    Data {
        sent: bool,
        enter_ns: u64,
        total_len: u32,
        head: Vec<u8>,
        tail: Vec<u8>,
        /// The plaintext of a hooked TLS library's call, not the socket's
        /// bytes.
        tls_plaintext: bool,
    },
    /// A connection that existed before the agent started, found in /proc.
    Seeded {
        comm: String,
        local: Option<SocketAddr>,
        remote: Endpoint,
        phase: SeededPhase,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeededPhase {
    Connecting,
    Established,
    PeerClosed,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// connect() was called and the handshake has not finished.
    Connecting,
    Established,
    /// The server hung up (TCP CLOSE_WAIT) and the client still holds the fd.
    PeerClosed,
    /// connect() failed.
    Failed,
    Closed,
}

/// How a connect() ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectOutcome {
    Ok,
    Refused,
    TimedOut,
    Unreachable,
    Error,
}

impl ConnectOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectOutcome::Ok => "ok",
            ConnectOutcome::Refused => "refused",
            ConnectOutcome::TimedOut => "timed_out",
            ConnectOutcome::Unreachable => "unreachable",
            ConnectOutcome::Error => "error",
        }
    }

    /// Maps a failed connect()'s -errno.
    pub fn from_errno(ret: i64) -> ConnectOutcome {
        match -ret {
            0 => ConnectOutcome::Ok,
            111 => ConnectOutcome::Refused,  // ECONNREFUSED
            110 => ConnectOutcome::TimedOut, // ETIMEDOUT
            101 | 113 | 99 => ConnectOutcome::Unreachable, // ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL
            2 => ConnectOutcome::Refused,                  // ENOENT: no Unix socket at that path
            _ => ConnectOutcome::Error,
        }
    }
}

/// Why a connection left the open set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// close() on the fd.
    Closed,
    /// The process exited holding it.
    ProcessExit,
    /// The fd number was reused by a newer connection without a close that we
    /// saw (dup2 over it, close_range, exec with close-on-exec).
    Replaced,
    /// connect() failed; the fd may live on but is no connection.
    ConnectFailed,
}

/// A connection as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Connection {
    pub id: ConnId,
    pub comm: String,
    /// Thread that called connect(), when known.
    pub tid: Option<u32>,
    #[serde(skip)]
    pub remote: Endpoint,
    pub local: Option<SocketAddr>,
    pub state: ConnState,
    pub outcome: Option<ConnectOutcome>,
    /// Monotonic time of connect() start (or of the agent's start for seeded ones).
    pub opened_at_ns: u64,
    pub connect_latency_ns: Option<u64>,
    pub peer_closed_at_ns: Option<u64>,
    pub closed_at_ns: Option<u64>,
    pub close_reason: Option<CloseReason>,
    pub seen_at_start: bool,
    /// What the connection speaks, once its first bytes told.
    pub db_system: Option<DbSystem>,
    /// TLS or GSSAPI: timed by request/response turns, no statements seen,
    /// unless `plaintext`.
    pub encrypted: bool,
    /// An encrypted connection whose plaintext a hooked TLS library gives:
    /// parsed as if it were not encrypted.
    pub plaintext: bool,
    pub namespace: Option<String>,
    pub db_user: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Last read or write, monotonic ns.
    pub last_activity_ns: Option<u64>,
    pub round_trips: u64,
    /// The last statement, sanitized when shown (raw only when configured;
    /// see [`crate::protocol::QueryText`]).
    pub last_query: Option<crate::protocol::QueryText>,
    pub last_operation: Option<String>,
    /// Transaction status after the last response, when the protocol says.
    pub tx_state: Option<TxState>,
    /// Times the protocol parser lost its framing.
    pub protocol_lost: u64,
    /// The adapter pool this connection belongs to (shared: every
    /// checkout and release counts it in the pool's index).
    pub pool: Option<std::sync::Arc<str>>,
    /// When the pool handed it out, while it is out.
    pub checked_out_at_ns: Option<u64>,
    /// The thread that acquired it, when the adapter said.
    pub holder_tid: Option<u32>,
    /// When the adapter last said it went back to the pool (or closed it):
    /// re-sent checkout state older than this is stale.
    #[serde(skip)]
    pub released_at_ns: Option<u64>,
    /// A request went out and its response has not completed.
    pub awaiting_response: bool,
    /// The id its adapter names it by (`conn`), when it does.
    pub adapter_conn: Option<u64>,
    /// The system its pool declared, for a connection known only by the
    /// adapter's word (no bytes tell the agent what it speaks).
    #[serde(skip)]
    pub declared_system: Option<crate::protocol::SystemName>,
}

impl Connection {
    /// A connection whose connect() began at `opened_at_ns`; nothing else
    /// is known of it yet.
    pub fn new(id: ConnId, comm: String, remote: Endpoint, opened_at_ns: u64) -> Connection {
        Connection {
            id,
            comm,
            tid: None,
            remote,
            local: None,
            state: ConnState::Connecting,
            outcome: None,
            opened_at_ns,
            connect_latency_ns: None,
            peer_closed_at_ns: None,
            closed_at_ns: None,
            close_reason: None,
            seen_at_start: false,
            db_system: None,
            encrypted: false,
            plaintext: false,
            namespace: None,
            db_user: None,
            bytes_sent: 0,
            bytes_received: 0,
            last_activity_ns: None,
            round_trips: 0,
            last_query: None,
            last_operation: None,
            tx_state: None,
            protocol_lost: 0,
            pool: None,
            checked_out_at_ns: None,
            holder_tid: None,
            released_at_ns: None,
            awaiting_response: false,
            adapter_conn: None,
            declared_system: None,
        }
    }

    /// Whether the kernel showed this connection's socket; those known only
    /// by an adapter's word have none (and a negative fd of the agent's
    /// choosing, never a real one).
    pub fn has_socket(&self) -> bool {
        self.id.fd >= 0
    }

    /// What it speaks: as read from its bytes, else as its pool declared.
    pub fn system(&self) -> Option<crate::protocol::SystemName> {
        self.db_system
            .map(crate::protocol::SystemName::from)
            .or_else(|| self.declared_system.clone())
    }

    pub fn lifetime_ns(&self, now_ns: u64) -> u64 {
        self.closed_at_ns
            .unwrap_or(now_ns)
            .saturating_sub(self.opened_at_ns)
    }

    /// The last statement as it may be shown (sanitized unless raw text
    /// was asked for).
    pub fn last_query_text(&self) -> Option<String> {
        self.last_query
            .as_ref()
            .map(crate::protocol::QueryText::text)
            .filter(|t| !t.is_empty())
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, ConnState::Closed | ConnState::Failed)
    }
}

/// What happened, for the telemetry layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A connect() reached its final outcome.
    ConnectFinished {
        id: ConnId,
        comm: String,
        remote: Endpoint,
        outcome: ConnectOutcome,
        latency_ns: Option<u64>,
    },
    PeerClosed {
        id: ConnId,
    },
    Closed {
        id: ConnId,
        comm: String,
        remote: Endpoint,
        reason: CloseReason,
        lifetime_ns: u64,
        seen_at_start: bool,
    },
    /// One request and its complete response on a database connection.
    RoundTrip {
        id: ConnId,
        comm: String,
        remote: Endpoint,
        system: DbSystem,
        trip: RoundTrip,
    },
    /// The protocol parser lost its framing on this connection.
    ProtocolLost {
        id: ConnId,
        reason: &'static str,
    },
    /// The connection speaks no database protocol: stop copying its data.
    NotDatabase {
        id: ConnId,
    },
    /// The connection's protocol became known.
    Detected {
        id: ConnId,
        system: DbSystem,
    },
    /// The connection switched to TLS (or GSSAPI) and its plaintext is not
    /// read: its process may have loaded a TLS library since it was looked
    /// at.
    Encrypted {
        id: ConnId,
    },
    /// A pool acquire ended; `used_before`/`pending_before` are the pool's
    /// state as the waiter saw it.
    AcquireFinished {
        pid: u32,
        pool: String,
        wait_ns: u64,
        result: AcquireResult,
        used_before: u64,
        pending_before: u64,
        max: Option<u32>,
        tid: Option<u32>,
    },
    /// Short checkouts an adapter folded into one message (all ended):
    /// each one's wait and use, every acquire seeing the pool in the state
    /// `used_before`/`pending_before`. One output for all of them, so that
    /// a busy pool costs the agent a lookup per message, not per checkout.
    CheckoutsFolded {
        pid: u32,
        pool: String,
        waits_ns: Vec<u64>,
        uses_ns: Vec<u64>,
        used_before: u64,
        pending_before: u64,
        max: Option<u32>,
        tid: Option<u32>,
    },
    /// A connection went back to its pool after `use_ns`.
    Released {
        pid: u32,
        pool: String,
        use_ns: u64,
    },
    /// A pool's new connection became usable `create_ns` after connect().
    PoolConnectionCreated {
        pid: u32,
        pool: String,
        create_ns: u64,
    },
    /// An event that matched nothing and was dropped (counted, not an error).
    Unmatched,
    /// An adapter message refused by a bound (its sender's share or the
    /// agent's total), with the reason it is counted under.
    AdapterRefused {
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod checkout_state_tests;

#[cfg(test)]
mod named_tests;

#[cfg(test)]
mod binding_tests;

#[cfg(test)]
mod holder_stack_tests;
