//! `[http]`: the listener of the API, `/metrics` and the web view.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{de, Deserialize, Deserializer, Serialize};

use crate::config_types::{Bounded, Seconds, SECOND};

/// A request's deadlines: from a tenth of a second to an hour.
pub type HttpTimeout = Seconds<{ SECOND / 10 }, { 3600 * SECOND }>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [http]")]
pub struct HttpConfig {
    /// Address of the HTTP API, `/metrics` and the web view.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Concurrent HTTP connections served; beyond it only `/healthz` and
    /// `/metrics` are answered (on a few reserved slots), the rest get 503.
    /// Fds are the limit that matters; the unit raises them to 65536.
    pub max_connections: Bounded<usize, 1, 1_000_000>,
    /// A request's line and headers must arrive within this; it is also how
    /// long a kept-alive connection may wait for its next request.
    pub header_read_timeout_seconds: HttpTimeout,
    /// A connection on which nothing is read or written for this long is
    /// closed (a client that stops reading its response).
    pub idle_timeout_seconds: HttpTimeout,
    /// Token that `/api/*` requests must send as `Authorization: Bearer`.
    /// `/`, `/healthz` and `/metrics` stay open. Prefer `bearer_token_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<Secret>,
    /// File holding the token (surrounding whitespace ignored), read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<std::path::PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
            max_connections: Bounded::new(256),
            header_read_timeout_seconds: HttpTimeout::new(5),
            idle_timeout_seconds: HttpTimeout::new(30),
            bearer_token: None,
            bearer_token_file: None,
        }
    }
}

fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        de::Error::custom(format!(
            "{text:?} is not an IP address with a port, such as \"127.0.0.1:9464\" \
             or \"[::1]:9464\""
        ))
    })
}

/// A configured token: surrounding whitespace trimmed, checked when read,
/// compared and used, never printed by `{:?}`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Secret {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let token = text.trim();
        if token.is_empty() {
            return Err("the token is empty".to_owned());
        }
        // What an Authorization header can carry as one word, compared as is.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".to_owned());
        }
        Ok(Secret(token.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl HttpConfig {
    /// The `/api/*` token, from `bearer_token` or `bearer_token_file`, or
    /// `None` when the API is open. The error names the key at fault.
    pub fn bearer_token(&self) -> Result<Option<String>, (&'static str, String)> {
        match (&self.bearer_token, &self.bearer_token_file) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err((
                "bearer_token",
                "set either bearer_token or bearer_token_file, not both".to_owned(),
            )),
            (Some(token), None) => Ok(Some(token.expose().to_owned())),
            (None, Some(path)) => {
                let key = "bearer_token_file";
                let text = std::fs::read_to_string(path)
                    .map_err(|e| (key, format!("cannot read {}: {e}", path.display())))?;
                let token = Secret::try_from(text).map_err(|reason| (key, reason))?;
                Ok(Some(token.expose().to_owned()))
            }
        }
    }
}
