//! Pool-adapter messages: one JSON object per datagram, versioned by `v`.
//! Pure decoding; see docs/adapter-protocol.md for the format.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::protocol::DbSystem;

/// The protocol version this agent speaks.
pub const VERSION: u32 = 1;
/// Larger datagrams are refused unread.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Pool names longer than this are refused (they become label values).
pub const MAX_POOL_NAME: usize = 128;
/// Entries in one `checkout_state` message; more is refused. A datagram of
/// 4096 bytes holds about 40 real ones, so this only stops `{}` floods.
pub const MAX_CHECKOUTS_PER_MESSAGE: usize = 64;

/// Which connection an adapter means: its local address (TCP), its fd in
/// the sending process, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnRef {
    pub local: Option<SocketAddr>,
    pub fd: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireResult {
    Ok,
    Timeout,
    Error,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolInfo {
    pub db_system: Option<DbSystem>,
    pub server_address: Option<String>,
    pub server_port: Option<u16>,
    pub namespace: Option<String>,
    pub max: Option<u32>,
    pub min_idle: Option<u32>,
    pub idle_max: Option<u32>,
    pub library: Option<String>,
}

/// One connection a `checkout_state` message says is checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkout {
    pub conn: ConnRef,
    /// When the pool handed it out (the adapter's CLOCK_MONOTONIC); the
    /// tracker clamps it, a sender's word being no proof.
    pub since_ns: u64,
    pub tid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AdapterEvent {
    Register(PoolInfo),
    AcquireStart {
        request: u64,
        tid: Option<u32>,
    },
    AcquireEnd {
        request: u64,
        result: AcquireResult,
        conn: ConnRef,
        tid: Option<u32>,
    },
    Release {
        conn: ConnRef,
    },
    ConnectionCreated {
        conn: ConnRef,
    },
    ConnectionClosed {
        conn: ConnRef,
    },
    /// The pool's current checkouts (or some of them), re-sent so that an
    /// agent that restarted learns checkouts that began before it.
    CheckoutState {
        checkouts: Vec<Checkout>,
    },
}

/// A decoded message: which pool, what happened, and when (monotonic ns)
/// if the adapter said.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMessage {
    pub pool: String,
    pub event: AdapterEvent,
    pub mono_ns: Option<u64>,
    /// The pid the message claims, if any: checked against the kernel's.
    pub claimed_pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    TooLarge(usize),
    NotJson(String),
    UnknownVersion(u32),
    UnknownKind(String),
    Invalid(String),
    /// The kernel named the sender with pid 0: it lives in a pid namespace
    /// the agent cannot see into, so its pools could not be told apart from
    /// those of every other such sender.
    UnknownSender,
    /// The sender's uid and gid are on neither allow-list.
    NotAllowed {
        uid: u32,
        gid: u32,
    },
}

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageError::TooLarge(n) => {
                write!(f, "message of {n} bytes exceeds {MAX_MESSAGE_BYTES}")
            }
            MessageError::NotJson(e) => write!(f, "message is not valid JSON: {e}"),
            MessageError::UnknownVersion(v) => {
                write!(
                    f,
                    "unknown protocol version {v} (this agent speaks {VERSION})"
                )
            }
            MessageError::UnknownKind(k) => write!(f, "unknown message kind {k:?}"),
            MessageError::Invalid(e) => write!(f, "invalid message: {e}"),
            MessageError::UnknownSender => write!(
                f,
                "the sender's pid is not visible in the agent's pid namespace (run the agent with the host's pid namespace)"
            ),
            MessageError::NotAllowed { uid, gid } => write!(
                f,
                "uid {uid} / gid {gid} is not in [adapter] allowed_uids or allowed_gids"
            ),
        }
    }
}

impl std::error::Error for MessageError {}

impl MessageError {
    /// Short label for the rejection counter.
    pub fn reason(&self) -> &'static str {
        match self {
            MessageError::TooLarge(_) => "too_large",
            MessageError::NotJson(_) => "malformed",
            MessageError::UnknownVersion(_) => "unknown_version",
            MessageError::UnknownKind(_) => "unknown_kind",
            MessageError::Invalid(_) => "invalid",
            MessageError::UnknownSender => "unknown_sender",
            MessageError::NotAllowed { .. } => "sender_not_allowed",
        }
    }
}

/// The wire shape; every field but `v`, `kind` and `pool` is optional so that
/// one struct reads every kind, and unknown fields are ignored so that newer
/// adapters can add some.
#[derive(Deserialize)]
struct Wire {
    kind: String,
    pool: String,
    pid: Option<u32>,
    mono_ns: Option<u64>,
    request: Option<u64>,
    tid: Option<u32>,
    result: Option<String>,
    local_address: Option<String>,
    fd: Option<i32>,
    db_system: Option<String>,
    server_address: Option<String>,
    server_port: Option<u16>,
    namespace: Option<String>,
    max: Option<u32>,
    min_idle: Option<u32>,
    idle_max: Option<u32>,
    library: Option<String>,
    checkouts: Option<Vec<WireCheckout>>,
}

/// One entry of `checkouts`.
#[derive(Deserialize)]
struct WireCheckout {
    local_address: Option<String>,
    fd: Option<i32>,
    mono_ns: Option<u64>,
    tid: Option<u32>,
}

fn invalid(what: &str) -> MessageError {
    MessageError::Invalid(what.to_string())
}

fn conn_ref(wire: &Wire) -> Result<ConnRef, MessageError> {
    named_conn(&wire.local_address, wire.fd)
}

fn named_conn(local_address: &Option<String>, fd: Option<i32>) -> Result<ConnRef, MessageError> {
    let local = match local_address {
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .map_err(|_| invalid("local_address is not ip:port"))?,
        ),
        None => None,
    };
    if local.is_none() && fd.is_none() {
        return Err(invalid("needs local_address or fd to name the connection"));
    }
    if fd.is_some_and(|fd| fd < 0) {
        return Err(invalid("fd is negative"));
    }
    Ok(ConnRef { local, fd })
}

fn checkout_state(wire: &Wire) -> Result<AdapterEvent, MessageError> {
    let entries = wire
        .checkouts
        .as_deref()
        .ok_or_else(|| invalid("checkout_state needs checkouts"))?;
    if entries.len() > MAX_CHECKOUTS_PER_MESSAGE {
        return Err(invalid("checkout_state has more than 64 checkouts"));
    }
    let checkouts = entries
        .iter()
        .map(|e| {
            Ok(Checkout {
                conn: named_conn(&e.local_address, e.fd)?,
                since_ns: e
                    .mono_ns
                    .ok_or_else(|| invalid("each checkout needs mono_ns"))?,
                tid: e.tid,
            })
        })
        .collect::<Result<Vec<_>, MessageError>>()?;
    Ok(AdapterEvent::CheckoutState { checkouts })
}

fn short_text(value: &Option<String>, field: &str) -> Result<Option<String>, MessageError> {
    match value {
        Some(text) if text.chars().count() > MAX_POOL_NAME => {
            Err(MessageError::Invalid(format!("{field} is too long")))
        }
        other => Ok(other.clone()),
    }
}

pub fn decode(bytes: &[u8]) -> Result<AdapterMessage, MessageError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    // Syntax first, then the version, then the shape: each failure gets its
    // own reason (a v2 message may have fields v1 lacks).
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| MessageError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(MessageError::NotJson("not a JSON object".into()));
    }
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(MessageError::UnknownVersion(
                u32::try_from(v).unwrap_or(u32::MAX),
            ))
        }
        None => return Err(invalid("needs a numeric version `v`")),
    }
    let wire: Wire =
        serde_json::from_value(value).map_err(|e| MessageError::Invalid(e.to_string()))?;
    if wire.pool.is_empty() || wire.pool.chars().count() > MAX_POOL_NAME {
        return Err(invalid("pool name must have 1 to 128 characters"));
    }
    let event = match wire.kind.as_str() {
        "pool" => AdapterEvent::Register(PoolInfo {
            db_system: match wire.db_system.as_deref() {
                None => None,
                Some("postgresql") => Some(DbSystem::Postgresql),
                Some("mysql") | Some("mariadb") => Some(DbSystem::Mysql),
                Some("redis") => Some(DbSystem::Redis),
                Some(_) => return Err(invalid("db_system is not postgresql, mysql or redis")),
            },
            server_address: short_text(&wire.server_address, "server_address")?,
            server_port: wire.server_port,
            namespace: short_text(&wire.namespace, "namespace")?,
            max: wire.max,
            min_idle: wire.min_idle,
            idle_max: wire.idle_max,
            library: short_text(&wire.library, "library")?,
        }),
        "acquire_start" => AdapterEvent::AcquireStart {
            request: wire
                .request
                .ok_or_else(|| invalid("acquire_start needs request"))?,
            tid: wire.tid,
        },
        "acquire_end" => {
            let result = match wire.result.as_deref() {
                Some("ok") => AcquireResult::Ok,
                Some("timeout") => AcquireResult::Timeout,
                Some("error") => AcquireResult::Error,
                _ => return Err(invalid("acquire_end needs result ok, timeout or error")),
            };
            let conn = if result == AcquireResult::Ok {
                conn_ref(&wire)?
            } else {
                ConnRef::default()
            };
            AdapterEvent::AcquireEnd {
                request: wire
                    .request
                    .ok_or_else(|| invalid("acquire_end needs request"))?,
                result,
                conn,
                tid: wire.tid,
            }
        }
        "release" => AdapterEvent::Release {
            conn: conn_ref(&wire)?,
        },
        "connection_created" => AdapterEvent::ConnectionCreated {
            conn: conn_ref(&wire)?,
        },
        "connection_closed" => AdapterEvent::ConnectionClosed {
            conn: conn_ref(&wire)?,
        },
        "checkout_state" => checkout_state(&wire)?,
        other => return Err(MessageError::UnknownKind(other.chars().take(32).collect())),
    };
    Ok(AdapterMessage {
        pool: wire.pool,
        event,
        mono_ns: wire.mono_ns,
        claimed_pid: wire.pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> AdapterMessage {
        decode(text.as_bytes()).expect("decodes")
    }

    fn err(text: &str) -> MessageError {
        decode(text.as_bytes()).expect_err("rejected")
    }

    #[test]
    fn decodes_every_kind() {
        let m = ok(
            r#"{"v":1,"kind":"pool","pool":"orders","db_system":"postgresql","server_address":"127.0.0.1","server_port":5432,"namespace":"shop","max":15,"min_idle":5,"library":"sqlalchemy"}"#,
        );
        assert_eq!(m.pool, "orders");
        assert!(matches!(
            m.event,
            AdapterEvent::Register(PoolInfo {
                max: Some(15),
                db_system: Some(DbSystem::Postgresql),
                ..
            })
        ));
        let m =
            ok(r#"{"v":1,"kind":"acquire_start","pool":"p","request":7,"tid":99,"mono_ns":123}"#);
        assert_eq!(
            m.event,
            AdapterEvent::AcquireStart {
                request: 7,
                tid: Some(99)
            }
        );
        assert_eq!(m.mono_ns, Some(123));
        let m = ok(
            r#"{"v":1,"kind":"acquire_end","pool":"p","request":7,"result":"ok","local_address":"127.0.0.1:40000","fd":9}"#,
        );
        assert_eq!(
            m.event,
            AdapterEvent::AcquireEnd {
                request: 7,
                result: AcquireResult::Ok,
                conn: ConnRef {
                    local: Some("127.0.0.1:40000".parse().expect("addr")),
                    fd: Some(9)
                },
                tid: None,
            }
        );
        let m = ok(r#"{"v":1,"kind":"acquire_end","pool":"p","request":8,"result":"timeout"}"#);
        assert!(matches!(
            m.event,
            AdapterEvent::AcquireEnd {
                result: AcquireResult::Timeout,
                ..
            }
        ));
        assert!(matches!(
            ok(r#"{"v":1,"kind":"release","pool":"p","fd":3}"#).event,
            AdapterEvent::Release { .. }
        ));
        assert!(matches!(
            ok(r#"{"v":1,"kind":"connection_created","pool":"p","fd":3}"#).event,
            AdapterEvent::ConnectionCreated { .. }
        ));
        assert!(matches!(
            ok(r#"{"v":1,"kind":"connection_closed","pool":"p","local_address":"[::1]:5000"}"#)
                .event,
            AdapterEvent::ConnectionClosed { .. }
        ));
    }

    #[test]
    fn decodes_checkout_state() {
        let m = ok(
            r#"{"v":1,"kind":"checkout_state","pool":"orders","mono_ns":900,"checkouts":[{"local_address":"10.0.0.7:51234","fd":12,"mono_ns":500,"tid":81233},{"fd":13,"mono_ns":600},{"local_address":"[::1]:5000","mono_ns":700,"later":true}]}"#,
        );
        assert_eq!(m.mono_ns, Some(900));
        let AdapterEvent::CheckoutState { checkouts } = m.event else {
            panic!("not a checkout_state: {m:?}");
        };
        assert_eq!(
            checkouts,
            vec![
                Checkout {
                    conn: ConnRef {
                        local: Some("10.0.0.7:51234".parse().expect("addr")),
                        fd: Some(12)
                    },
                    since_ns: 500,
                    tid: Some(81233)
                },
                Checkout {
                    conn: ConnRef {
                        local: None,
                        fd: Some(13)
                    },
                    since_ns: 600,
                    tid: None
                },
                Checkout {
                    conn: ConnRef {
                        local: Some("[::1]:5000".parse().expect("addr")),
                        fd: None
                    },
                    since_ns: 700,
                    tid: None
                },
            ]
        );
        // An empty list is a pool with nothing out.
        assert_eq!(
            ok(r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[]}"#).event,
            AdapterEvent::CheckoutState { checkouts: vec![] }
        );
    }

    #[test]
    fn rejects_bad_checkout_state() {
        for bad in [
            r#"{"v":1,"kind":"checkout_state","pool":"p"}"#,
            r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":{}}"#,
            r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"fd":1}]}"#,
            r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"mono_ns":1}]}"#,
            r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"fd":-1,"mono_ns":1}]}"#,
            r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{"fd":1,"mono_ns":-1}]}"#,
            r#"{"v":1,"kind":"checkout_state","pool":"p","checkouts":[7]}"#,
        ] {
            assert_eq!(err(bad).reason(), "invalid", "{bad}");
        }
        let entry = r#"{"fd":1,"mono_ns":1}"#;
        let list = |n: usize| vec![entry; n].join(",");
        let at_most = format!(
            r#"{{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{}]}}"#,
            list(MAX_CHECKOUTS_PER_MESSAGE)
        );
        assert!(
            matches!(ok(&at_most).event, AdapterEvent::CheckoutState { checkouts } if checkouts.len() == MAX_CHECKOUTS_PER_MESSAGE)
        );
        let too_many = format!(
            r#"{{"v":1,"kind":"checkout_state","pool":"p","checkouts":[{}]}}"#,
            list(MAX_CHECKOUTS_PER_MESSAGE + 1)
        );
        assert_eq!(err(&too_many).reason(), "invalid");
    }

    #[test]
    fn ignores_unknown_fields_for_forward_compatibility() {
        let m = ok(r#"{"v":1,"kind":"release","pool":"p","fd":3,"future":{"x":1}}"#);
        assert!(matches!(m.event, AdapterEvent::Release { .. }));
    }

    #[test]
    fn rejects_bad_messages_with_a_reason() {
        assert_eq!(err("not json").reason(), "malformed");
        assert_eq!(
            err(r#"{"v":2,"kind":"release","pool":"p","fd":1}"#).reason(),
            "unknown_version"
        );
        assert_eq!(
            err(r#"{"v":1,"kind":"explode","pool":"p"}"#).reason(),
            "unknown_kind"
        );
        assert_eq!(
            err(r#"{"v":1,"kind":"release","pool":"p"}"#).reason(),
            "invalid"
        );
        assert_eq!(
            err(r#"{"v":1,"kind":"release","pool":"","fd":1}"#).reason(),
            "invalid"
        );
        assert_eq!(
            err(r#"{"v":1,"kind":"release","pool":"p","fd":-1}"#).reason(),
            "invalid"
        );
        assert_eq!(
            err(r#"{"v":1,"kind":"release","pool":"p","local_address":"nope"}"#).reason(),
            "invalid"
        );
        assert_eq!(
            err(r#"{"v":1,"kind":"acquire_end","pool":"p","request":1,"result":"maybe"}"#).reason(),
            "invalid"
        );
        let big = format!(
            r#"{{"v":1,"kind":"release","pool":"{}","fd":1}}"#,
            "x".repeat(5000)
        );
        assert_eq!(err(&big).reason(), "too_large");
        assert_eq!(
            decode(&[0xff, 0xfe, 0x00]).expect_err("binary").reason(),
            "malformed"
        );
    }
}
