//! Pool-adapter messages as the agent uses them. The wire format, its
//! limits and checks are the `poolscope-adapter-protocol` crate's
//! (adapter-protocol/, docs/adapter-protocol.md); this maps what it decodes
//! into the tracker's types.

use std::net::SocketAddr;

use poolscope_adapter_protocol as wire;

use crate::protocol::{DbSystem, SystemName};

pub use wire::MAX_MESSAGE_BYTES;

/// Which connection an adapter means: its local address (TCP), its fd in
/// the sending process, the adapter's own id for it, or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnRef {
    pub local: Option<SocketAddr>,
    pub fd: Option<i32>,
    pub conn: Option<u64>,
}

impl ConnRef {
    /// Whether it names a socket (fd or local address), not only an id.
    pub fn names_socket(&self) -> bool {
        self.local.is_some() || self.fd.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireResult {
    Ok,
    Timeout,
    Error,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolInfo {
    pub db_system: Option<SystemName>,
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

/// Short checkouts of one connection, folded: for each, its wait and its
/// use; all were released by the message's time, the last one by thread
/// `tid`.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    pub conn: ConnRef,
    pub tid: Option<u32>,
    pub waits_ns: Vec<u64>,
    pub uses_ns: Vec<u64>,
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
        /// The wait, from an adapter that sent no acquire_start for it.
        wait_ns: Option<u64>,
    },
    Release {
        conn: ConnRef,
    },
    /// A whole short checkout: the acquire_end (`use_ns` before the
    /// message's time) and the release it stands for.
    Checkout {
        request: u64,
        conn: ConnRef,
        tid: Option<u32>,
        wait_ns: Option<u64>,
        use_ns: u64,
    },
    /// Short checkouts of one connection, folded.
    Checkouts(Folded),
    ConnectionCreated {
        conn: ConnRef,
        /// The thread that connected its socket, when the adapter is sure.
        tid: Option<u32>,
    },
    ConnectionClosed {
        conn: ConnRef,
    },
    /// The pool's current checkouts (or some of them), re-sent so that an
    /// agent that restarted learns checkouts that began before it.
    CheckoutState {
        checkouts: Vec<Checkout>,
    },
    /// The code that checked the connection out, for the checkout that
    /// began at `since_ns` (the adapter's clock).
    HolderStack {
        conn: ConnRef,
        since_ns: u64,
        stack: HolderStack,
    },
}

/// A holder's stack, innermost frame first; shared by the tracker and the
/// reports that show it.
pub type HolderStack = std::sync::Arc<[String]>;

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

/// Why a datagram was dropped: the protocol's own refusals, and the
/// socket's (who sent it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// Refused by the protocol (too large, not JSON, version, kind, fields).
    Refused(wire::Error),
    /// The kernel attached no credentials to the datagram.
    NoCredentials,
    /// The kernel named the sender with pid 0: it lives in a pid namespace
    /// the agent cannot see into, so its pools could not be told apart from
    /// those of every other such sender.
    UnknownSender,
    /// The sender's uid and gid are on neither allow-list.
    NotAllowed { uid: u32, gid: u32 },
    /// The process the kernel named had exited by the time the agent
    /// accepted its stream.
    SenderExited,
    /// A stream sent no complete line within its first-line time: the
    /// adapters send their registration as soon as they connect, so a
    /// silent stream only holds a slot that another sender may need.
    SilentStream,
}

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageError::Refused(e) => e.fmt(f),
            MessageError::NoCredentials => write!(f, "invalid message: no sender credentials"),
            MessageError::UnknownSender => write!(
                f,
                "the sender's pid is not visible in the agent's pid namespace (run the agent with the host's pid namespace)"
            ),
            MessageError::NotAllowed { uid, gid } => write!(
                f,
                "uid {uid} / gid {gid} is not in [adapter] allowed_uids or allowed_gids"
            ),
            MessageError::SenderExited => {
                write!(f, "the sender exited before the agent accepted its stream")
            }
            MessageError::SilentStream => write!(
                f,
                "the stream sent no complete line in time after it was accepted (an adapter sends its registration at once); closed"
            ),
        }
    }
}

impl std::error::Error for MessageError {}

impl MessageError {
    /// Short label for the rejection counter.
    pub fn reason(&self) -> &'static str {
        match self {
            MessageError::Refused(e) => e.reason(),
            MessageError::NoCredentials => "invalid",
            MessageError::UnknownSender => "unknown_sender",
            MessageError::NotAllowed { .. } => "sender_not_allowed",
            MessageError::SenderExited => "sender_exited",
            MessageError::SilentStream => "silent_stream",
        }
    }
}

impl From<wire::ConnRef> for ConnRef {
    fn from(c: wire::ConnRef) -> ConnRef {
        ConnRef {
            local: c.local_address,
            fd: c.fd,
            conn: c.conn,
        }
    }
}

impl From<wire::DbSystem> for SystemName {
    fn from(d: wire::DbSystem) -> SystemName {
        match d {
            wire::DbSystem::Postgresql => SystemName::Read(DbSystem::Postgresql),
            wire::DbSystem::Mysql | wire::DbSystem::Mariadb => SystemName::Read(DbSystem::Mysql),
            wire::DbSystem::Redis => SystemName::Read(DbSystem::Redis),
            wire::DbSystem::Other(name) => SystemName::Named(name),
        }
    }
}

impl From<wire::Body> for AdapterEvent {
    fn from(body: wire::Body) -> AdapterEvent {
        match body {
            wire::Body::Pool(info) => AdapterEvent::Register(PoolInfo {
                db_system: info.db_system.map(SystemName::from),
                server_address: info.server_address,
                server_port: info.server_port,
                namespace: info.namespace,
                max: info.max,
                min_idle: info.min_idle,
                idle_max: info.idle_max,
                library: info.library,
            }),
            wire::Body::AcquireStart { request, tid } => {
                AdapterEvent::AcquireStart { request, tid }
            }
            wire::Body::AcquireEnd {
                request,
                result,
                tid,
                wait_ns,
            } => {
                let (result, conn) = match result {
                    wire::AcquireResult::Ok(conn) => (AcquireResult::Ok, conn.into()),
                    wire::AcquireResult::Timeout => (AcquireResult::Timeout, ConnRef::default()),
                    wire::AcquireResult::Error => (AcquireResult::Error, ConnRef::default()),
                };
                AdapterEvent::AcquireEnd {
                    request,
                    result,
                    conn,
                    tid,
                    wait_ns,
                }
            }
            wire::Body::Release(conn) => AdapterEvent::Release { conn: conn.into() },
            wire::Body::Checkout {
                request,
                conn,
                tid,
                wait_ns,
                use_ns,
            } => AdapterEvent::Checkout {
                request,
                conn: conn.into(),
                tid,
                wait_ns,
                use_ns,
            },
            wire::Body::Checkouts {
                conn,
                tid,
                waits_ns,
                uses_ns,
            } => AdapterEvent::Checkouts(Folded {
                conn: conn.into(),
                tid,
                waits_ns,
                uses_ns,
            }),
            wire::Body::ConnectionCreated { conn, tid } => AdapterEvent::ConnectionCreated {
                conn: conn.into(),
                tid,
            },
            wire::Body::ConnectionClosed(conn) => {
                AdapterEvent::ConnectionClosed { conn: conn.into() }
            }
            wire::Body::CheckoutState { checkouts } => AdapterEvent::CheckoutState {
                checkouts: checkouts
                    .into_iter()
                    .map(|c| Checkout {
                        conn: c.conn.into(),
                        since_ns: c.mono_ns,
                        tid: c.tid,
                    })
                    .collect(),
            },
            wire::Body::HolderStack {
                conn,
                since_ns,
                stack,
            } => AdapterEvent::HolderStack {
                conn: conn.into(),
                since_ns,
                stack: stack.into(),
            },
        }
    }
}

/// Reads one datagram (see [`wire::decode`] for what is refused, and why).
pub fn decode(bytes: &[u8]) -> Result<AdapterMessage, MessageError> {
    let message = wire::decode(bytes).map_err(MessageError::Refused)?;
    Ok(AdapterMessage {
        pool: message.pool,
        event: message.body.into(),
        mono_ns: message.mono_ns,
        claimed_pid: message.pid,
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

    fn event_kind(event: &AdapterEvent) -> &'static str {
        match event {
            AdapterEvent::Register(_) => "pool",
            AdapterEvent::AcquireStart { .. } => "acquire_start",
            AdapterEvent::AcquireEnd { .. } => "acquire_end",
            AdapterEvent::Release { .. } => "release",
            AdapterEvent::Checkout { .. } => "checkout",
            AdapterEvent::Checkouts(_) => "checkouts",
            AdapterEvent::ConnectionCreated { .. } => "connection_created",
            AdapterEvent::ConnectionClosed { .. } => "connection_closed",
            AdapterEvent::CheckoutState { .. } => "checkout_state",
            AdapterEvent::HolderStack { .. } => "holder_stack",
        }
    }

    /// Every valid golden message (adapters/protocol/golden/) becomes the
    /// event of its kind; reading them is the protocol crate's business.
    #[test]
    fn decodes_every_kind() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../adapters/protocol/golden");
        for entry in std::fs::read_dir(&dir).expect("golden/") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let file: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
            for sent in file["valid"].as_array().expect("valid") {
                let m = ok(&sent.to_string());
                assert_eq!(event_kind(&m.event), sent["kind"], "{sent}");
                assert_eq!(m.mono_ns, sent["mono_ns"].as_u64(), "{sent}");
            }
        }
    }

    #[test]
    fn maps_into_the_trackers_types() {
        let m = ok(r#"{"v":1,"kind":"pool","pool":"orders","db_system":"postgresql","max":15}"#);
        assert_eq!(m.pool, "orders");
        assert_eq!(
            m.event,
            AdapterEvent::Register(PoolInfo {
                db_system: Some(SystemName::Read(DbSystem::Postgresql)),
                max: Some(15),
                ..PoolInfo::default()
            })
        );
        assert!(matches!(
            ok(r#"{"v":1,"kind":"pool","pool":"p","db_system":"mariadb"}"#).event,
            AdapterEvent::Register(PoolInfo {
                db_system: Some(SystemName::Read(DbSystem::Mysql)),
                ..
            })
        ));
        // A system the agent reads no protocol of is carried by its name.
        assert_eq!(
            ok(r#"{"v":1,"kind":"pool","pool":"p","db_system":"sqlite"}"#).event,
            AdapterEvent::Register(PoolInfo {
                db_system: Some(SystemName::Named("sqlite".into())),
                ..PoolInfo::default()
            })
        );
        assert_eq!(
            ok(r#"{"v":1,"kind":"release","pool":"p","conn":9}"#).event,
            AdapterEvent::Release {
                conn: ConnRef {
                    conn: Some(9),
                    ..ConnRef::default()
                }
            }
        );
        let m = ok(
            r#"{"v":1,"kind":"acquire_end","pool":"p","request":3,"result":"ok","local_address":"[::1]:4000","fd":5,"tid":6,"wait_ns":800,"pid":77}"#,
        );
        assert_eq!(m.claimed_pid, Some(77));
        assert_eq!(
            m.event,
            AdapterEvent::AcquireEnd {
                request: 3,
                result: AcquireResult::Ok,
                conn: ConnRef {
                    local: Some("[::1]:4000".parse().expect("addr")),
                    fd: Some(5),
                    conn: None,
                },
                tid: Some(6),
                wait_ns: Some(800),
            }
        );
        for (result, want) in [
            ("timeout", AcquireResult::Timeout),
            ("error", AcquireResult::Error),
        ] {
            let text = format!(
                r#"{{"v":1,"kind":"acquire_end","pool":"p","request":4,"result":"{result}"}}"#
            );
            assert_eq!(
                ok(&text).event,
                AdapterEvent::AcquireEnd {
                    request: 4,
                    result: want,
                    conn: ConnRef::default(),
                    tid: None,
                    wait_ns: None,
                }
            );
        }
        assert_eq!(
            ok(r#"{"v":1,"kind":"connection_closed","pool":"p","fd":2}"#).event,
            AdapterEvent::ConnectionClosed {
                conn: ConnRef {
                    fd: Some(2),
                    ..ConnRef::default()
                }
            }
        );
    }

    /// The entries' `mono_ns` is when each was handed out (`since_ns`);
    /// decoding the list itself is the protocol crate's (its tests).
    #[test]
    fn decodes_checkout_state() {
        let m = ok(
            r#"{"v":1,"kind":"checkout_state","pool":"orders","mono_ns":900,"checkouts":[{"local_address":"10.0.0.7:51234","fd":12,"mono_ns":500,"tid":81233},{"fd":13,"mono_ns":600}]}"#,
        );
        assert_eq!(m.mono_ns, Some(900));
        let AdapterEvent::CheckoutState { checkouts } = m.event else {
            panic!("not a checkout_state: {m:?}");
        };
        let local = "10.0.0.7:51234".parse().expect("addr");
        assert_eq!(
            checkouts,
            [
                (Some(local), Some(12), 500, Some(81233)),
                (None, Some(13), 600, None)
            ]
            .map(|(local, fd, since_ns, tid)| Checkout {
                conn: ConnRef {
                    local,
                    fd,
                    conn: None
                },
                since_ns,
                tid
            })
        );
    }

    /// The refusals themselves are the protocol crate's (its tests and
    /// golden files); what the agent adds is their labels in the metrics,
    /// which must stay as they were.
    #[test]
    fn refusals_keep_their_metric_labels() {
        let big = format!(
            r#"{{"v":1,"kind":"release","pool":"{}","fd":1}}"#,
            "x".repeat(5000)
        );
        for (text, reason) in [
            ("not json", "malformed"),
            (
                r#"{"v":2,"kind":"release","pool":"p","fd":1}"#,
                "unknown_version",
            ),
            (r#"{"v":1,"kind":"explode","pool":"p"}"#, "unknown_kind"),
            (r#"{"v":1,"kind":"release","pool":"p"}"#, "invalid"),
            (big.as_str(), "too_large"),
        ] {
            assert_eq!(err(text).reason(), reason, "{text}");
        }
        assert_eq!(MessageError::NoCredentials.reason(), "invalid");
        assert_eq!(MessageError::UnknownSender.reason(), "unknown_sender");
        assert_eq!(
            MessageError::NotAllowed { uid: 1, gid: 1 }.reason(),
            "sender_not_allowed"
        );
        assert_eq!(
            MessageError::NoCredentials.to_string(),
            "invalid message: no sender credentials"
        );
    }
}
