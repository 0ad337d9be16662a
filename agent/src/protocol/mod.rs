//! Database wire protocols, parsed from what the kernel copies of each
//! read/write on a tracked socket. Pure: bytes and timestamps in, round trips
//! out. Never panics on any input (each parser has a fuzz target).
//!
//! The kernel copies a bounded head of every buffer, plus its last bytes
//! (the tail) when the buffer was longer than the head, and always the full
//! length. Parsers frame messages in the head, skip what they know the length
//! of, and use the tail to find end-of-response markers (PostgreSQL's
//! ReadyForQuery, MySQL's final OK/EOF) that lie past the head.
//!
//! A round trip runs from the chunk holding the first byte of a request to the
//! chunk that completes its response (ReadyForQuery, the last OK/ERR/EOF, the
//! whole RESP reply), not to the first response byte: it is what the
//! application waited for.
//!
//! Layout: [`frame`] turns chunks into messages for the length-prefixed
//! protocols, [`session`] detects the protocol and keeps per-connection
//! bookkeeping shared by all three, [`sql`] sanitizes query text, and
//! [`postgres`], [`mysql`] and [`redis`] hold what is particular to each.
//!
//! `Observation::Lost` means framing was lost in one direction and what
//! follows may be misattributed until `Observation::Resynced`. A response
//! longer than one read whose message boundaries fall in the unseen middle
//! produces such a pair; it is expected, not an error.

mod book;
pub mod config;
mod frame;
mod mysql;
mod postgres;
mod redis;
mod session;
mod sql;
#[cfg(test)]
pub(crate) mod testutil;

pub use session::SessionParser;
pub use sql::{query_summary, sanitize, QuerySummary};

/// Bytes of each buffer the kernel copies from its start, by default.
pub const DEFAULT_HEAD_MAX: usize = 256;
/// Bytes of each buffer the kernel copies from its end when the head did not
/// hold everything.
pub const TAIL_MAX: usize = 64;
/// Cap on sanitized or raw query text, in characters.
pub const QUERY_MAX_CHARS: usize = 1024;
/// Cap on error messages, in characters.
pub const ERROR_MESSAGE_MAX_CHARS: usize = 200;

/// `db.system.name` values of the OpenTelemetry semantic conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbSystem {
    Postgresql,
    Mysql,
    Redis,
}

impl DbSystem {
    /// The semantic-convention string.
    pub fn as_str(self) -> &'static str {
        match self {
            DbSystem::Postgresql => "postgresql",
            DbSystem::Mysql => "mysql",
            DbSystem::Redis => "redis",
        }
    }

    /// The system usually served on `port`; a hint only.
    pub fn from_port(port: u16) -> Option<DbSystem> {
        // 6432: pgbouncer; 6380: Redis over TLS (Azure's, and the usual
        // `rediss` port), where the port is the only hint a direct TLS
        // start gives.
        match port {
            5432 | 6432 => Some(DbSystem::Postgresql),
            3306 => Some(DbSystem::Mysql),
            6379 | 6380 => Some(DbSystem::Redis),
            _ => None,
        }
    }
}

/// `db.system.name` of a pool, a report or a connection: a system whose
/// wire protocol the agent reads, or one that only an adapter names
/// (`sqlite`, `duckdb`, ...: 1 to 32 characters of `a-z`, `0-9`, `.` and
/// `_`, checked by the adapter protocol). Written as the name alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SystemName {
    Read(DbSystem),
    Named(String),
}

impl SystemName {
    pub fn as_str(&self) -> &str {
        match self {
            SystemName::Read(system) => system.as_str(),
            SystemName::Named(name) => name,
        }
    }
}

impl From<DbSystem> for SystemName {
    fn from(system: DbSystem) -> SystemName {
        SystemName::Read(system)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToServer,
    FromServer,
}

/// One read or write syscall's data as the kernel copied it.
///
/// Bytes between `head` and `tail` are unknown. Inconsistent values are
/// tolerated: the length is taken as at least `head.len() + tail.len()`.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub direction: Direction,
    /// Monotonic ns at syscall exit.
    pub ts_ns: u64,
    /// First `min(total_len, head_max)` bytes.
    pub head: &'a [u8],
    /// Last `min(total_len - head.len(), TAIL_MAX)` bytes; empty when the head
    /// holds everything.
    pub tail: &'a [u8],
    /// Bytes the syscall actually transferred.
    pub total_len: usize,
}

impl<'a> Chunk<'a> {
    /// A chunk the kernel copied whole.
    pub fn whole(direction: Direction, ts_ns: u64, data: &'a [u8]) -> Self {
        Chunk {
            direction,
            ts_ns,
            head: data,
            tail: &[],
            total_len: data.len(),
        }
    }

    /// The chunk the kernel would copy of `data` with a head of `head_max`
    /// bytes and a tail of [`TAIL_MAX`]: for tests and replay tools.
    pub fn cut(direction: Direction, ts_ns: u64, data: &'a [u8], head_max: usize) -> Self {
        let head_len = data.len().min(head_max);
        let tail_len = (data.len() - head_len).min(TAIL_MAX);
        Chunk {
            direction,
            ts_ns,
            head: data.get(..head_len).unwrap_or_default(),
            tail: data.get(data.len() - tail_len..).unwrap_or_default(),
            total_len: data.len(),
        }
    }
}

/// Transaction status after a response, when the protocol says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxState {
    Idle,
    InTransaction,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DbError {
    /// SQLSTATE ("42601"), MySQL error number ("1064"), Redis error prefix
    /// ("ERR", "WRONGTYPE").
    pub code: String,
    /// At most [`ERROR_MESSAGE_MAX_CHARS`] characters.
    pub message: String,
}

/// Statement text as it is kept: SQL is sanitized only when shown (API,
/// reports, spans), because most round trips are never shown and
/// sanitizing each one was a tenth of the agent's CPU. Every way out goes
/// through [`QueryText::text`], so no output can carry the unsanitized form.
#[derive(Debug, PartialEq, Eq)]
pub struct QueryText {
    text: String,
    /// Some: SQL as sent, sanitized with this dialect when shown.
    /// None: final as it is (raw text on request, Redis's `GET ?`).
    sanitize: Option<sql::Dialect>,
}

impl QueryText {
    /// Text to show as it is.
    pub fn shown_as_is(text: String) -> QueryText {
        QueryText {
            text,
            sanitize: None,
        }
    }

    pub(crate) fn sql(text: String, dialect: sql::Dialect) -> QueryText {
        QueryText {
            text,
            sanitize: Some(dialect),
        }
    }

    /// The text to show: sanitized unless raw text was asked for (empty
    /// when nothing but comments and space was sent).
    pub fn text(&self) -> String {
        match self.sanitize {
            Some(dialect) => sql::sanitize_dialect(&self.text, dialect),
            None => self.text.clone(),
        }
    }
}

/// Serialized as it is shown: sanitized.
impl serde::Serialize for QueryText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text())
    }
}

impl Clone for QueryText {
    fn clone(&self) -> QueryText {
        QueryText {
            text: self.text.clone(),
            sanitize: self.sanitize,
        }
    }

    /// Reuses the buffer: a connection's last query is replaced on every
    /// round trip.
    fn clone_from(&mut self, source: &QueryText) {
        self.text.clone_from(&source.text);
        self.sanitize = source.sanitize;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundTrip {
    /// Timestamp of the chunk holding the first byte of the request.
    pub start_ns: u64,
    /// Timestamp of the chunk that completed the response.
    pub end_ns: u64,
    /// `db.operation.name`: first SQL keyword or Redis command, uppercased.
    pub operation: Option<String>,
    /// The statement (sanitized when shown, unless raw text was asked for);
    /// Redis: command and a `?` per argument.
    pub query: Option<QueryText>,
    /// Database name (PostgreSQL, MySQL) or index (Redis `SELECT`).
    pub namespace: Option<String>,
    pub error: Option<DbError>,
    /// Rows returned or affected, when the protocol says.
    pub rows: Option<u64>,
    /// Transaction status after the response, when the protocol says.
    pub tx_state: Option<TxState>,
    /// Extended protocol (PostgreSQL Parse/Bind/Execute) or MySQL COM_STMT_*.
    pub prepared: bool,
}

impl RoundTrip {
    /// The query text to show (sanitized unless raw text was asked for).
    pub fn query_text(&self) -> Option<String> {
        self.query
            .as_ref()
            .map(QueryText::text)
            .filter(|t| !t.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    RoundTrip(RoundTrip),
    /// The client's startup or handshake response.
    Startup {
        user: Option<String>,
        database: Option<String>,
    },
    /// The session switched to TLS (or GSSAPI): round trips from now on are
    /// timed by request/response alternation only.
    Encrypted,
    /// Framing was lost in one direction; emitted once until `Resynced`.
    Lost {
        reason: &'static str,
    },
    /// Framing found again after `Lost`.
    Resynced,
}

/// Whether a Unix socket's path is where a database server usually listens:
/// PostgreSQL and pgbouncer (`.s.PGSQL.<port>`), MySQL/MariaDB (`mysqld.sock`,
/// `mysql.sock`, `mariadb.sock`) and Redis (`redis*.sock`). Only such
/// connections make the agent attach the costly syscall data path; a host
/// always has other Unix connections (D-Bus, journald) that may stay quiet
/// for ever and would otherwise keep it attached.
pub fn unix_path_may_be_database(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    name.starts_with(".s.pgsql.")
        || ((name.contains("mysql") || name.contains("mariadb") || name.contains("redis"))
            && name.ends_with(".sock"))
}

#[cfg(test)]
mod unix_path_tests {
    use super::unix_path_may_be_database;

    #[test]
    fn database_socket_paths_are_recognised() {
        for path in [
            "/var/run/postgresql/.s.PGSQL.5432",
            "/tmp/.s.PGSQL.6432",
            "/run/mysqld/mysqld.sock",
            "/var/lib/mysql/mysql.sock",
            "/tmp/poolscope-mariadb-1/mariadb.sock",
            "/run/redis/redis-server.sock",
        ] {
            assert!(unix_path_may_be_database(path), "{path}");
        }
    }

    #[test]
    fn other_unix_sockets_are_not() {
        for path in [
            "/run/dbus/system_bus_socket",
            "/run/systemd/journal/stdout",
            "/var/run/docker.sock",
            "/run/mysqld",
            "",
        ] {
            assert!(!unix_path_may_be_database(path), "{path}");
        }
    }
}
