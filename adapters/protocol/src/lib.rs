//! The pool-adapter protocol, version 1: what applications' pool adapters
//! send to the poolscope agent, one JSON object per message (one Unix
//! datagram each). docs/adapter-protocol.md explains it; this crate and the
//! golden files in `golden/` (one per kind, checked by this crate's tests
//! and by every adapter's) are its definition.
//!
//! - [`Message`] is a message: its pool, when, and a [`Body`], whose
//!   variants are the kinds (the `kind` field is the serde tag).
//! - [`decode`] reads one message, refusing with an [`Error`] whose
//!   [`Error::reason`] is the label the agent counts it under.
//! - [`Message::encode`] writes one, refusing what [`decode`] would refuse.
//!
//! Adding a kind is adding a [`Body`] variant (with its checks in
//! [`Message::validate`] if it has any) and a golden file; the compiler
//! and the tests point at the rest (its name in [`Body::kind`], the
//! agent's mapping).

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version: the `v` field of every message.
pub const VERSION: u32 = 1;
/// Larger messages are refused unread.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Pool names and the other text fields have at most this many characters
/// (they become label values); pool names at least one.
pub const MAX_TEXT_CHARS: usize = 128;
/// Entries in one `checkout_state` message, and checkouts folded into one
/// `checkouts` message; more is refused. 4096 bytes hold about 40 real
/// `checkout_state` entries, so this only stops floods of tiny entries; it
/// also bounds the work one `checkouts` line asks of the agent.
pub const MAX_CHECKOUTS_PER_MESSAGE: usize = 64;
/// Frames in one `holder_stack`, and characters in one frame: enough for
/// the application's side of a checkout (adapters drop the pool library's
/// own frames first), small enough that the agent can keep thousands.
pub const MAX_STACK_FRAMES: usize = 32;
pub const MAX_FRAME_CHARS: usize = 256;

/// The `v` field: always [`VERSION`], so that a message of this crate
/// cannot claim another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version;

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(VERSION)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u64::deserialize(d)? {
            v if v == u64::from(VERSION) => Ok(Version),
            v => Err(serde::de::Error::custom(format!(
                "unknown protocol version {v}"
            ))),
        }
    }
}

/// One message: which pool, what happened ([`Body`]), and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub v: Version,
    /// 1 to [`MAX_TEXT_CHARS`] characters, unique within the sending process.
    pub pool: String,
    #[serde(flatten)]
    pub body: Body,
    /// When it happened: `CLOCK_MONOTONIC` nanoseconds of the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mono_ns: Option<u64>,
    /// The pid the sender claims; the agent refuses a message whose claim
    /// is not the kernel's word. Adapters leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// What happened, by `kind`. Fields an adapter may leave out are `Option`s
/// and are left out when `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// Registers (or updates) the pool.
    Pool(PoolInfo),
    /// The pool opened a connection, ready to use.
    ConnectionCreated {
        #[serde(flatten)]
        conn: ConnRef,
        /// The thread whose `connect()` opened the connection's socket,
        /// sent only when the adapter is sure of it (a driver that connects
        /// on the calling thread, reported from that thread). For a
        /// connection named by `conn` alone, the agent may then tie it to
        /// the socket that thread connected (docs/adapter-protocol.md,
        /// "Connections named by the adapter").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<u32>,
    },
    /// A caller asks the pool for a connection.
    AcquireStart {
        /// Unique among the pool's waiting requests.
        request: u64,
        /// The waiting thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<u32>,
    },
    /// The caller got a connection, or gave up.
    AcquireEnd {
        request: u64,
        #[serde(flatten)]
        result: AcquireResult,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<u32>,
        /// How long the caller waited, from an adapter that sent no
        /// `acquire_start` for this request: one that folds a start and an
        /// end leaving together (most acquires find an idle connection at
        /// once) into this one message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ns: Option<u64>,
    },
    /// The caller returned the connection to the pool.
    Release(ConnRef),
    /// A whole short checkout in one message, from an adapter that batches:
    /// an acquire that got this connection and released it `use_ns` later
    /// (the message's `mono_ns` is the release), both within one batch.
    /// The agent takes it as the `acquire_end` and the `release` it stands
    /// for.
    Checkout {
        request: u64,
        #[serde(flatten)]
        conn: ConnRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<u32>,
        /// As in `acquire_end`: the wait, when no `acquire_start` was sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ns: Option<u64>,
        /// From the acquire's end to the release.
        use_ns: u64,
    },
    /// Short checkouts of one connection folded into one message, from an
    /// adapter that batches: each acquire found this connection at once
    /// (no `acquire_start` was sent for it), waited `waits_ns[i]` and gave
    /// the connection back `uses_ns[i]` later, all within one batch, the
    /// last release at the message's `mono_ns`. The agent takes it as that
    /// many `checkout` messages, without their request ids (no one waits
    /// on them) and with the last holder's `tid`.
    Checkouts {
        #[serde(flatten)]
        conn: ConnRef,
        /// The last holder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tid: Option<u32>,
        /// One wait per checkout, in the order they happened.
        waits_ns: Vec<u64>,
        /// One use per checkout, in the same order.
        uses_ns: Vec<u64>,
    },
    /// The pool closed or discarded the connection.
    ConnectionClosed(ConnRef),
    /// The pool's connections checked out now (or some of them), re-sent so
    /// that an agent that restarted learns checkouts that began before it.
    CheckoutState { checkouts: Vec<Checkout> },
    /// The code that checked the connection out, sent by an adapter for a
    /// checkout still held a while after it began (capturing is cheap,
    /// formatting is not, so short checkouts never send one). The agent
    /// keeps it with that checkout and puts it in the checkout's leak or
    /// slow-holder report.
    HolderStack {
        #[serde(flatten)]
        conn: ConnRef,
        /// When the checkout began: the `mono_ns` of its `acquire_end`. A
        /// stack of a checkout that has since been returned is dropped.
        since_ns: u64,
        /// The frames, innermost first, each `function (file:line)` or as
        /// the language writes them: 1 to [`MAX_STACK_FRAMES`] frames of 1
        /// to [`MAX_FRAME_CHARS`] characters, no control characters.
        stack: Vec<String>,
    },
}

impl Body {
    /// The `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Pool(_) => "pool",
            Body::ConnectionCreated { .. } => "connection_created",
            Body::AcquireStart { .. } => "acquire_start",
            Body::AcquireEnd { .. } => "acquire_end",
            Body::Release(_) => "release",
            Body::Checkout { .. } => "checkout",
            Body::Checkouts { .. } => "checkouts",
            Body::ConnectionClosed(_) => "connection_closed",
            Body::CheckoutState { .. } => "checkout_state",
            Body::HolderStack { .. } => "holder_stack",
        }
    }
}

/// Which connection a message means: the client side's `ip:port` for TCP
/// (as `getsockname()` gives it), the socket's fd in the sending process,
/// a number the adapter chose for it (`conn`), or several of these. At
/// least one, and the fd not negative.
///
/// `conn` is for pools that hide their sockets or have none (SQLite): unique
/// within its pool while the connection lives. Sent with a socket once, it
/// names that socket's connection in later messages that carry only `conn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ConnRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_address: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn: Option<u64>,
}

impl ConnRef {
    pub fn is_empty(&self) -> bool {
        self.local_address.is_none() && self.fd.is_none() && self.conn.is_none()
    }

    fn validate(&self) -> Result<(), Error> {
        if self.is_empty() {
            return Err(invalid(
                "needs local_address, fd or conn to name the connection",
            ));
        }
        if self.fd.is_some_and(|fd| fd < 0) {
            return Err(invalid("fd is negative"));
        }
        Ok(())
    }
}

/// How an acquire ended: the `result` field, and for `ok` the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AcquireResult {
    /// The caller got this connection.
    Ok(ConnRef),
    /// The pool gave up waiting.
    Timeout,
    /// The pool failed (could not connect, was closed...), or the caller
    /// stopped waiting.
    Error,
}

/// The database a pool talks to, as `db.system.name` of the semantic
/// conventions names it. The agent reads the wire protocols of the first
/// four; any other system (`sqlite`, `duckdb`, ...) is carried by name, 1 to
/// [`MAX_SYSTEM_CHARS`] characters of `a-z`, `0-9`, `.` and `_`.
/// `mariadb` is read as its own value (so that it is written back as
/// sent); the agent treats it as `mysql`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DbSystem {
    Postgresql,
    Mysql,
    Mariadb,
    Redis,
    /// Any other system, by its name (checked when read).
    Other(String),
}

/// Longest `db_system` name.
pub const MAX_SYSTEM_CHARS: usize = 32;

impl DbSystem {
    pub fn as_str(&self) -> &str {
        match self {
            DbSystem::Postgresql => "postgresql",
            DbSystem::Mysql => "mysql",
            DbSystem::Mariadb => "mariadb",
            DbSystem::Redis => "redis",
            DbSystem::Other(name) => name,
        }
    }

    /// The system named `name`, if it is a well-formed name.
    pub fn named(name: &str) -> Result<DbSystem, Error> {
        let well_formed = !name.is_empty()
            && name.len() <= MAX_SYSTEM_CHARS
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_'));
        if !well_formed {
            return Err(invalid(
                "db_system must be 1 to 32 characters of a-z, 0-9, '.' and '_'",
            ));
        }
        Ok(match name {
            "postgresql" => DbSystem::Postgresql,
            "mysql" => DbSystem::Mysql,
            "mariadb" => DbSystem::Mariadb,
            "redis" => DbSystem::Redis,
            other => DbSystem::Other(other.to_string()),
        })
    }
}

impl Serialize for DbSystem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DbSystem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        DbSystem::named(&name).map_err(serde::de::Error::custom)
    }
}

/// What a pool is, for the `pool` message. Every field is optional; texts
/// have at most [`MAX_TEXT_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PoolInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_system: Option<DbSystem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_port: Option<u16>,
    /// The database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Most connections the pool opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_idle: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_max: Option<u32>,
    /// The pool library, e.g. `sqlalchemy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
}

/// One connection a `checkout_state` message says is checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    #[serde(flatten)]
    pub conn: ConnRef,
    /// When the pool handed it out (the `mono_ns` of its `acquire_end`).
    pub mono_ns: u64,
    /// The holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
}

/// Why a message is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// More than [`MAX_MESSAGE_BYTES`] bytes.
    TooLarge(usize),
    /// Not a JSON object.
    Malformed(String),
    /// A `v` other than [`VERSION`].
    UnknownVersion(u32),
    /// A `kind` this version does not know (at most 32 characters of it).
    UnknownKind(String),
    /// A field missing, of the wrong type, or out of bounds.
    Invalid(String),
}

impl Error {
    /// The label the agent counts refusals under
    /// (`poolscope_adapter_messages_total{result="rejected",reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::TooLarge(_) => "too_large",
            Error::Malformed(_) => "malformed",
            Error::UnknownVersion(_) => "unknown_version",
            Error::UnknownKind(_) => "unknown_kind",
            Error::Invalid(_) => "invalid",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::TooLarge(n) => write!(f, "message of {n} bytes exceeds {MAX_MESSAGE_BYTES}"),
            Error::Malformed(e) => write!(f, "message is not valid JSON: {e}"),
            Error::UnknownVersion(v) => write!(
                f,
                "unknown protocol version {v} (this agent speaks {VERSION})"
            ),
            Error::UnknownKind(k) => write!(f, "unknown message kind {k:?}"),
            Error::Invalid(e) => write!(f, "invalid message: {e}"),
        }
    }
}

impl std::error::Error for Error {}

fn invalid(what: &str) -> Error {
    Error::Invalid(what.to_string())
}

fn short_text(value: &Option<String>, field: &str) -> Result<(), Error> {
    match value {
        Some(text) if text.chars().count() > MAX_TEXT_CHARS => {
            Err(Error::Invalid(format!("{field} is too long")))
        }
        _ => Ok(()),
    }
}

fn check_stack(stack: &[String]) -> Result<(), Error> {
    if stack.is_empty() || stack.len() > MAX_STACK_FRAMES {
        return Err(invalid("stack has 1 to 32 frames"));
    }
    for frame in stack {
        let chars = frame.chars().count();
        if chars == 0 || chars > MAX_FRAME_CHARS {
            return Err(invalid("each stack frame has 1 to 256 characters"));
        }
        // Frames go into log lines and tables as they are.
        if frame.chars().any(char::is_control) {
            return Err(invalid("stack frames have no control characters"));
        }
    }
    Ok(())
}

fn check_pool_name(pool: &str) -> Result<(), Error> {
    if pool.is_empty() || pool.chars().count() > MAX_TEXT_CHARS {
        return Err(invalid("pool name must have 1 to 128 characters"));
    }
    Ok(())
}

impl Message {
    /// A message of this version, without `mono_ns` or `pid`.
    pub fn new(pool: impl Into<String>, body: Body) -> Message {
        Message {
            v: Version,
            pool: pool.into(),
            body,
            mono_ns: None,
            pid: None,
        }
    }

    pub fn at(mut self, mono_ns: u64) -> Message {
        self.mono_ns = Some(mono_ns);
        self
    }

    /// The rules that types alone do not say: lengths, counts, a
    /// connection named.
    pub fn validate(&self) -> Result<(), Error> {
        check_pool_name(&self.pool)?;
        match &self.body {
            Body::Pool(info) => {
                short_text(&info.server_address, "server_address")?;
                short_text(&info.namespace, "namespace")?;
                short_text(&info.library, "library")?;
            }
            Body::AcquireStart { .. } => {}
            Body::AcquireEnd { result, .. } => match result {
                AcquireResult::Ok(conn) => conn.validate()?,
                AcquireResult::Timeout | AcquireResult::Error => {}
            },
            Body::ConnectionCreated { conn, .. }
            | Body::Release(conn)
            | Body::ConnectionClosed(conn)
            | Body::Checkout { conn, .. } => conn.validate()?,
            Body::Checkouts {
                conn,
                waits_ns,
                uses_ns,
                ..
            } => {
                conn.validate()?;
                if waits_ns.is_empty() || waits_ns.len() > MAX_CHECKOUTS_PER_MESSAGE {
                    return Err(invalid("checkouts folds 1 to 64 checkouts"));
                }
                if uses_ns.len() != waits_ns.len() {
                    return Err(invalid("checkouts needs one use per wait"));
                }
            }
            Body::CheckoutState { checkouts } => {
                if checkouts.len() > MAX_CHECKOUTS_PER_MESSAGE {
                    return Err(invalid("checkout_state has more than 64 checkouts"));
                }
                for checkout in checkouts {
                    checkout.conn.validate()?;
                }
            }
            Body::HolderStack { conn, stack, .. } => {
                conn.validate()?;
                check_stack(stack)?;
            }
        }
        Ok(())
    }

    /// The message as sent: compact JSON, refused as [`decode`] would
    /// refuse it (invalid, or larger than [`MAX_MESSAGE_BYTES`]).
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        self.validate()?;
        let bytes = serde_json::to_vec(self).map_err(|e| Error::Invalid(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Error::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }
}

/// The envelope every kind has, read first so that a message with a bad
/// pool name is `invalid` whatever its kind.
#[derive(Deserialize)]
struct Head {
    #[allow(dead_code)]
    kind: String,
    pool: String,
    #[allow(dead_code)]
    mono_ns: Option<u64>,
    #[allow(dead_code)]
    pid: Option<u32>,
}

/// Whether `kind` names a [`Body`] variant: serde says "unknown variant"
/// for the tag of a body that has nothing else, and only for its tag.
fn is_known_kind(kind: &str) -> bool {
    let lone = serde_json::json!({ "kind": kind });
    match Body::deserialize(&lone) {
        Ok(_) => true,
        Err(e) => !e.to_string().starts_with("unknown variant"),
    }
}

/// Reads one message. Unknown fields are ignored, so that newer adapters
/// may send more. Each refusal has its own reason, checked in this order:
/// size, JSON syntax, version (a v2 message may have fields v1 lacks),
/// envelope (`kind` and `pool` strings, pool name length), kind, fields.
pub fn decode(bytes: &[u8]) -> Result<Message, Error> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(Error::TooLarge(bytes.len()));
    }
    if let Some(message) = frequent::decode(bytes) {
        return Ok(message);
    }
    decode_fully(bytes)
}

/// [`decode`] through a JSON tree: every kind, and the exact refusal.
fn decode_fully(bytes: &[u8]) -> Result<Message, Error> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
    if !value.is_object() {
        return Err(Error::Malformed("not a JSON object".into()));
    }
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => return Err(Error::UnknownVersion(u32::try_from(v).unwrap_or(u32::MAX))),
        None => return Err(invalid("needs a numeric version `v`")),
    }
    let head = Head::deserialize(&value).map_err(|e| Error::Invalid(e.to_string()))?;
    check_pool_name(&head.pool)?;
    let message = Message::deserialize(&value).map_err(|e| {
        if is_known_kind(&head.kind) {
            Error::Invalid(e.to_string())
        } else {
            Error::UnknownKind(head.kind.chars().take(32).collect())
        }
    })?;
    message.validate()?;
    Ok(message)
}

mod frequent;

#[cfg(test)]
mod tests;
