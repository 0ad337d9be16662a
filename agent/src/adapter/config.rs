//! `[adapter]`: the socket that pool adapters send to.

use serde::{Deserialize, Serialize};

use crate::config_types::Bounded;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [adapter]")]
pub struct AdapterConfig {
    /// Listen for pool adapters.
    pub enabled: bool,
    /// The Unix datagram socket adapters send to.
    pub socket: std::path::PathBuf,
    /// Its permissions. Any local process may report its own pools: the
    /// kernel names the sender, so none can speak for another.
    pub socket_mode: SocketMode,
    /// Raise `net.unix.max_dgram_qlen` to at least this before binding, so
    /// that a pool's burst of messages is queued rather than refused
    /// (0: leave the system setting alone).
    pub min_queue_datagrams: u32,
    /// When either list is set, only root and these uids or primary gids
    /// may send (others are rejected and counted); empty: everyone.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// The Unix stream socket for adapters that cannot send credentialed
    /// datagrams (JVM, Node without native code): the same messages, one
    /// per line, with the same mode and allow-lists. Empty: none.
    pub stream_socket: std::path::PathBuf,
    /// Streams open at once, in all and per uid; more are closed at accept.
    pub max_streams: Bounded<usize, 1, 1_000_000>,
    pub max_streams_per_uid: Bounded<usize, 1, 1_000_000>,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: "/run/poolscope/adapter.sock".into(),
            socket_mode: SocketMode(0o666),
            min_queue_datagrams: 1024,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            stream_socket: "/run/poolscope/adapter-stream.sock".into(),
            max_streams: Bounded::new(1024),
            max_streams_per_uid: Bounded::new(64),
        }
    }
}

impl AdapterConfig {
    /// Who may send, from the allow-lists.
    pub fn senders(&self) -> super::server::Senders {
        super::server::Senders {
            uids: self.allowed_uids.clone(),
            gids: self.allowed_gids.clone(),
        }
    }

    pub fn stream_limits(&self) -> super::stream::StreamLimits {
        super::stream::StreamLimits {
            max_streams: self.max_streams.get(),
            max_streams_per_uid: self.max_streams_per_uid.get(),
            ..Default::default()
        }
    }

    /// `socket_mode` as a number.
    pub fn mode(&self) -> u32 {
        self.socket_mode.0
    }
}

/// File permissions written in octal as a string: `"0666"`, `"660"` or
/// `"0o600"`, at most `0777`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SocketMode(u32);

impl TryFrom<String> for SocketMode {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => Ok(SocketMode(mode)),
            _ => Err(format!(
                "{text:?} is not an octal mode like \"0666\" (at most \"0777\")"
            )),
        }
    }
}

impl From<SocketMode> for String {
    fn from(mode: SocketMode) -> String {
        format!("{:04o}", mode.0)
    }
}
