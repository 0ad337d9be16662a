//! The agent's configuration: a TOML file, overridden by command-line flags.
//!
//! Every section has defaults, so an empty file (or no file) is a valid
//! configuration. Errors name the offending key and its line so that an
//! operator can fix the file without reading the source.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Log levels accepted in `[log] level` and `--log-level`.
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

// Field lists per section, used to say what was expected after an unknown key.
// Kept next to the structs; a test checks they match what serde accepts.
const TOP_KEYS: &[&str] = &[
    "http", "kernel", "tracking", "queries", "adapter", "leaks", "otlp", "log",
];
const HTTP_KEYS: &[&str] = &[
    "listen",
    "max_connections",
    "header_read_timeout_seconds",
    "idle_timeout_seconds",
    "bearer_token",
    "bearer_token_file",
];
const KERNEL_KEYS: &[&str] = &[
    "ring_buffer_bytes",
    "mount_tracefs",
    "data_path",
    "probe_stats",
    "unix_sockets",
];
const TRACKING_KEYS: &[&str] = &[
    "closed_retention_seconds",
    "max_closed",
    "max_series",
    "seed_from_proc",
    "pod_logs_dir",
    "full_command_lines",
];
const QUERIES_KEYS: &[&str] = &[
    "capture_bytes",
    "redis_capture_bytes",
    "slow_threshold_ms",
    "raw_text",
    "max_slow_kept",
];
const ADAPTER_KEYS: &[&str] = &[
    "enabled",
    "socket",
    "socket_mode",
    "min_queue_datagrams",
    "allowed_uids",
    "allowed_gids",
    "stream_socket",
    "max_streams",
    "max_streams_per_uid",
];
const LEAKS_KEYS: &[&str] = &[
    "leak_threshold_seconds",
    "quiet_seconds",
    "idle_in_transaction_seconds",
    "close_wait_seconds",
    "abandoned_seconds",
    "slow_acquire_ms",
    "max_resolved_kept",
];
const OTLP_KEYS: &[&str] = &[
    "endpoint",
    "protocol",
    "interval_seconds",
    "timeout_seconds",
    "max_queued_events",
    "query_spans",
];
const LOG_KEYS: &[&str] = &["level"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub kernel: KernelConfig,
    pub tracking: TrackingConfig,
    pub queries: QueriesConfig,
    pub adapter: AdapterConfig,
    pub leaks: LeaksConfig,
    pub otlp: OtlpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP API, `/metrics` and the web view.
    pub listen: SocketAddr,
    /// Concurrent HTTP connections served; beyond it only `/healthz` and
    /// `/metrics` are answered (on a few reserved slots), the rest get 503.
    pub max_connections: usize,
    /// A request's line and headers must arrive within this; it is also how
    /// long a kept-alive connection may wait for its next request.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub header_read_timeout_seconds: f64,
    /// A connection on which nothing is read or written for this long is
    /// closed (a client that stops reading its response).
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub idle_timeout_seconds: f64,
    /// Token that `/api/*` requests must send as `Authorization: Bearer`.
    /// `/`, `/healthz` and `/metrics` stay open. Prefer `bearer_token_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<Secret>,
    /// File holding the token (surrounding whitespace ignored), read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<std::path::PathBuf>,
}

/// A configured secret: compared and used, never printed by `{:?}`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl HttpConfig {
    /// The `/api/*` token, from `bearer_token` or `bearer_token_file`, or
    /// `None` when the API is open. The error names the key at fault.
    pub fn bearer_token(&self) -> std::result::Result<Option<String>, (&'static str, String)> {
        let (key, text) = match (&self.bearer_token, &self.bearer_token_file) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err((
                    "bearer_token",
                    "set either bearer_token or bearer_token_file, not both".to_owned(),
                ))
            }
            (Some(token), None) => ("bearer_token", token.0.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    (
                        "bearer_token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                ("bearer_token_file", text)
            }
        };
        let token = text.trim();
        if token.is_empty() {
            return Err((key, "the token is empty".to_owned()));
        }
        // What an Authorization header can carry as one word, compared as is.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                key,
                "the token must be printable ASCII without spaces".to_owned(),
            ));
        }
        Ok(Some(token.to_owned()))
    }

    fn validate(&self) -> std::result::Result<(), Invalid> {
        let invalid = |key, reason| Invalid {
            section: "http",
            key,
            reason,
        };
        // Fds are the limit that matters; the unit raises them to 65536.
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(invalid(
                "max_connections",
                format!("{} is not between 1 and 1000000", self.max_connections),
            ));
        }
        for (key, value) in [
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
        ] {
            if !(0.1..=3600.0).contains(&value) {
                return Err(invalid(
                    key,
                    format!("{value} is not between 0.1 and 3600 seconds"),
                ));
            }
        }
        self.bearer_token()
            .map(|_| ())
            .map_err(|(key, reason)| invalid(key, reason))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// Size of each BPF ring buffer; the kernel requires a power of two that
    /// is a multiple of the page size (4096).
    pub ring_buffer_bytes: u32,
    /// Mount tracefs at /sys/kernel/tracing if it is not mounted yet.
    pub mount_tracefs: bool,
    /// Which hooks copy socket data: `auto` (the socket path, else the
    /// syscall path), `socket` or `syscalls` (see docs/data-path.md).
    pub data_path: DataPath,
    /// Keep BPF run-time statistics (poolscope.probe.*). They cost a little
    /// on every run of every program, so they are for measuring.
    pub probe_stats: bool,
    /// Watch database connections over Unix sockets. Off by default: their
    /// connects and closes can only be seen by syscall tracepoints, and
    /// while any syscall tracepoint is attached every syscall of every
    /// process on the host takes the kernel's slow path (+44 ns per call
    /// here, BENCHMARKS.md); TCP connections need none.
    pub unix_sockets: bool,
}

/// The kernel hooks that copy socket data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// The socket path where the kernel loads it, else the syscall path.
    #[default]
    Auto,
    /// Raw tracepoints on socket sends and receives only; fail if refused.
    Socket,
    /// Tracepoints on every read/write/send/recv syscall (costly; fallback).
    Syscalls,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// How long closed connections stay visible in the API.
    #[serde(deserialize_with = "duration::seconds_u64")]
    pub closed_retention_seconds: u64,
    /// At most this many closed connections are kept.
    pub max_closed: usize,
    /// Cardinality bound for per-process/server metric series.
    pub max_series: usize,
    /// Seed connections that already exist at start from /proc.
    pub seed_from_proc: bool,
    /// The kubelet's pod log directory (`<namespace>_<pod>_<uid>` entries),
    /// used to name the pods that processes run in; mount it read-only in a
    /// DaemonSet. Ignored when it does not exist.
    pub pod_logs_dir: std::path::PathBuf,
    /// Show processes' command lines as they are. Off by default: passwords
    /// in connection URLs, `--password=`, `PGPASSWORD=`, `-pSECRET` and
    /// token flags are replaced by `***` in reports, the API, logs and OTLP.
    pub full_command_lines: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueriesConfig {
    /// Bytes copied from the start of each read/write on a PostgreSQL or
    /// MySQL socket (16 to 4096); longer statements are cut there, and the
    /// end of a longer response is found from its last 64 bytes.
    pub capture_bytes: u32,
    /// The same for Redis, where a pipeline's commands must all be seen to
    /// be counted: a write of many commands is cut after this many bytes.
    pub redis_capture_bytes: u32,
    /// Round trips slower than this are reported as slow queries.
    #[serde(deserialize_with = "duration::millis_u64")]
    pub slow_threshold_ms: u64,
    /// Keep query text as sent. Off by default: literals become `?`, since
    /// they may hold personal data.
    pub raw_text: bool,
    /// Slow-query reports kept in memory.
    pub max_slow_kept: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    /// Listen for pool adapters.
    pub enabled: bool,
    /// The Unix datagram socket adapters send to.
    pub socket: std::path::PathBuf,
    /// Its permissions, octal. Any local process may report its own pools:
    /// the kernel names the sender, so none can speak for another.
    pub socket_mode: String,
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
    pub max_streams: usize,
    pub max_streams_per_uid: usize,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: "/run/poolscope/adapter.sock".into(),
            socket_mode: "0666".into(),
            min_queue_datagrams: 1024,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            stream_socket: "/run/poolscope/adapter-stream.sock".into(),
            max_streams: 1024,
            max_streams_per_uid: 64,
        }
    }
}

impl AdapterConfig {
    /// Who may send, from the allow-lists.
    pub fn senders(&self) -> crate::adapter::server::Senders {
        crate::adapter::server::Senders {
            uids: self.allowed_uids.clone(),
            gids: self.allowed_gids.clone(),
        }
    }

    pub fn stream_limits(&self) -> crate::adapter::stream::StreamLimits {
        crate::adapter::stream::StreamLimits {
            max_streams: self.max_streams,
            max_streams_per_uid: self.max_streams_per_uid,
        }
    }

    /// `socket_mode` as a number; validated at load.
    pub fn mode(&self) -> u32 {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o666)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaksConfig {
    /// Checked out longer than this: leaked if quiet, a slow holder if busy.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub leak_threshold_seconds: f64,
    /// No traffic for this long counts as quiet.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub quiet_seconds: f64,
    /// An open transaction quiet for this long.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub idle_in_transaction_seconds: f64,
    /// The server hung up this long ago and the fd is still open.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub close_wait_seconds: f64,
    /// Quiet this long while the process opens newer connections to the same server.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub abandoned_seconds: f64,
    /// Pool acquires that wait longer than this are reported.
    #[serde(deserialize_with = "duration::millis_f64")]
    pub slow_acquire_ms: f64,
    /// Resolved reports kept in memory.
    pub max_resolved_kept: usize,
}

impl Default for LeaksConfig {
    fn default() -> Self {
        Self {
            leak_threshold_seconds: 30.0,
            quiet_seconds: 5.0,
            idle_in_transaction_seconds: 30.0,
            close_wait_seconds: 10.0,
            abandoned_seconds: 300.0,
            slow_acquire_ms: 1000.0,
            max_resolved_kept: 1000,
        }
    }
}

impl LeaksConfig {
    pub fn thresholds(&self) -> crate::detect::Thresholds {
        let ns = |seconds: f64| (seconds * 1e9) as u64;
        crate::detect::Thresholds {
            leak_ns: ns(self.leak_threshold_seconds),
            quiet_ns: ns(self.quiet_seconds),
            idle_in_transaction_ns: ns(self.idle_in_transaction_seconds),
            close_wait_ns: ns(self.close_wait_seconds),
            abandoned_ns: ns(self.abandoned_seconds),
            slow_acquire_ns: ns(self.slow_acquire_ms / 1e3),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Collector address, e.g. `http://otel-collector:4317` (gRPC) or
    /// `http://otel-collector:4318` (HTTP). Empty: OTEL_EXPORTER_OTLP_ENDPOINT,
    /// and without it no OTLP export.
    pub endpoint: String,
    /// `grpc` or `http/protobuf`. Empty: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc.
    pub protocol: String,
    /// Metric export interval.
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub interval_seconds: f64,
    /// Per-request timeout (the exporter retries with backoff within it).
    #[serde(deserialize_with = "duration::seconds_f64")]
    pub timeout_seconds: f64,
    /// Events (log records) waiting for export, at most; more are dropped
    /// and counted in poolscope.export.dropped.
    pub max_queued_events: usize,
    /// Send each query round trip as a client span.
    pub query_spans: bool,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: String::new(),
            interval_seconds: 10.0,
            timeout_seconds: 10.0,
            max_queued_events: 10_000,
            query_spans: false,
        }
    }
}

impl OtlpConfig {
    /// The settings in force, from this section and the standard OTEL_*
    /// variables; `None` when no endpoint is configured anywhere.
    pub fn settings(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<crate::telemetry::otlp::OtlpSettings>> {
        use crate::telemetry::otlp::{OtlpSettings, Protocol};
        let endpoint = if self.endpoint.is_empty() {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
        } else {
            self.endpoint.clone()
        };
        if endpoint.is_empty() {
            return Ok(None);
        }
        let protocol_text = if self.protocol.is_empty() {
            env("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "grpc".into())
        } else {
            self.protocol.clone()
        };
        let protocol = Protocol::parse(&protocol_text).ok_or_else(|| {
            anyhow!("OTLP protocol {protocol_text:?} is not supported: use grpc or http/protobuf")
        })?;
        Ok(Some(OtlpSettings {
            endpoint,
            protocol,
            interval: std::time::Duration::from_secs_f64(self.interval_seconds),
            timeout: std::time::Duration::from_secs_f64(self.timeout_seconds),
            max_queued_events: self.max_queued_events,
            query_spans: self.query_spans,
        }))
    }
}

impl Default for QueriesConfig {
    fn default() -> Self {
        Self {
            capture_bytes: 256,
            redis_capture_bytes: 4096,
            slow_threshold_ms: 500,
            raw_text: false,
            max_slow_kept: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One of [`LOG_LEVELS`].
    pub level: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
            max_connections: 256,
            header_read_timeout_seconds: 5.0,
            idle_timeout_seconds: 30.0,
            bearer_token: None,
            bearer_token_file: None,
        }
    }
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: 1 << 22,
            mount_tracefs: true,
            data_path: DataPath::Auto,
            probe_stats: false,
            unix_sockets: false,
        }
    }
}

impl Default for TrackingConfig {
    fn default() -> Self {
        Self {
            closed_retention_seconds: 300,
            max_closed: 4096,
            max_series: 2000,
            seed_from_proc: true,
            full_command_lines: false,
            pod_logs_dir: "/var/log/pods".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
        }
    }
}

/// Values given on the command line; each one that is set replaces the file's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub ring_buffer_bytes: Option<u32>,
    pub log_level: Option<String>,
    pub probe_stats: bool,
    pub data_path: Option<DataPath>,
}

/// A validation failure: which key (`section.key`) and why.
#[derive(Debug)]
struct Invalid {
    section: &'static str,
    key: &'static str,
    reason: String,
}

impl Config {
    /// Parses and validates a configuration file's text. `origin` names the
    /// file in error messages.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| describe_toml_error(text, origin, &e))?;
        config.log.level = config.log.level.to_ascii_lowercase();
        config.validate().map_err(|invalid| {
            // Point at the key's line; locating cannot fail on text that
            // just deserialized, but degrade to no line rather than panic.
            let line = key_sites(text)
                .into_iter()
                .find(|site| site.path == [invalid.section, invalid.key])
                .map(|site| line_of(text, site.span.start));
            anyhow!(
                "{}bad value for `{}` in [{}]: {}",
                location(origin, line),
                invalid.key,
                invalid.section,
                invalid.reason
            )
        })?;
        Ok(config)
    }

    /// Loads the file at `path`, or the defaults when there is none.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        // One sentence with the path and the OS reason, whatever `{}`/`{:#}`
        // the caller uses to print it.
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read config file {}: {e}", path.display()))?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Applies command-line overrides (they win over the file) and validates
    /// the result again. On error `self` is left unchanged.
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        let mut next = self.clone();
        if let Some(listen) = o.listen {
            next.http.listen = listen;
        }
        if let Some(bytes) = o.ring_buffer_bytes {
            next.kernel.ring_buffer_bytes = bytes;
        }
        if let Some(level) = &o.log_level {
            next.log.level = level.to_ascii_lowercase();
        }
        if o.probe_stats {
            next.kernel.probe_stats = true;
        }
        if let Some(path) = o.data_path {
            next.kernel.data_path = path;
        }
        next.validate().map_err(|invalid| {
            anyhow!(
                "bad value for `{}` in [{}] (after command-line overrides): {}",
                invalid.key,
                invalid.section,
                invalid.reason
            )
        })?;
        *self = next;
        Ok(())
    }

    fn validate(&self) -> std::result::Result<(), Invalid> {
        self.http.validate()?;
        let bytes = self.kernel.ring_buffer_bytes;
        // A power of two is a multiple of 4096 exactly when it is >= 4096.
        if !bytes.is_power_of_two() || bytes < 4096 {
            return Err(Invalid {
                section: "kernel",
                key: "ring_buffer_bytes",
                reason: format!(
                    "{bytes} is not a power of two that is a multiple of 4096 \
                     (e.g. 262144, 1048576)"
                ),
            });
        }
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(Invalid {
                section: "log",
                key: "level",
                reason: format!(
                    "{:?} is not one of {}",
                    self.log.level,
                    LOG_LEVELS.join("|")
                ),
            });
        }
        // The tracker works in nanoseconds; refuse what would overflow there.
        let retention = self.tracking.closed_retention_seconds;
        if retention.checked_mul(1_000_000_000).is_none() {
            return Err(Invalid {
                section: "tracking",
                key: "closed_retention_seconds",
                reason: format!(
                    "{retention} is too large (at most {})",
                    u64::MAX / 1_000_000_000
                ),
            });
        }
        let slow_ms = self.queries.slow_threshold_ms;
        if slow_ms.checked_mul(1_000_000).is_none() {
            return Err(Invalid {
                section: "queries",
                key: "slow_threshold_ms",
                reason: format!("{slow_ms} is too large (at most {})", u64::MAX / 1_000_000),
            });
        }
        for (key, capture) in [
            ("capture_bytes", self.queries.capture_bytes),
            ("redis_capture_bytes", self.queries.redis_capture_bytes),
        ] {
            if !(16..=agent_common::HEAD_MAX as u32).contains(&capture) {
                return Err(Invalid {
                    section: "queries",
                    key,
                    reason: format!(
                        "{capture} is out of range (16 to {})",
                        agent_common::HEAD_MAX
                    ),
                });
            }
        }
        if u32::from_str_radix(self.adapter.socket_mode.trim_start_matches("0o"), 8)
            .map_or(true, |m| m > 0o777)
        {
            return Err(Invalid {
                section: "adapter",
                key: "socket_mode",
                reason: format!(
                    "{:?} is not an octal mode like \"0666\"",
                    self.adapter.socket_mode
                ),
            });
        }
        let l = &self.leaks;
        for (key, value) in [
            ("leak_threshold_seconds", l.leak_threshold_seconds),
            ("quiet_seconds", l.quiet_seconds),
            ("idle_in_transaction_seconds", l.idle_in_transaction_seconds),
            ("close_wait_seconds", l.close_wait_seconds),
            ("abandoned_seconds", l.abandoned_seconds),
            ("slow_acquire_ms", l.slow_acquire_ms),
        ] {
            // Up to a year: enough for any threshold, and safe in nanoseconds.
            if !(0.0..=31_536_000_000.0).contains(&value) || value.is_nan() {
                return Err(Invalid {
                    section: "leaks",
                    key,
                    reason: format!("{value} is not a duration between 0 and a year"),
                });
            }
        }
        if !self.otlp.protocol.is_empty()
            && crate::telemetry::otlp::Protocol::parse(&self.otlp.protocol).is_none()
        {
            return Err(Invalid {
                section: "otlp",
                key: "protocol",
                reason: format!("{:?} is not grpc or http/protobuf", self.otlp.protocol),
            });
        }
        for (key, value) in [
            ("interval_seconds", self.otlp.interval_seconds),
            ("timeout_seconds", self.otlp.timeout_seconds),
        ] {
            if !(0.1..=86_400.0).contains(&value) {
                return Err(Invalid {
                    section: "otlp",
                    key,
                    reason: format!("{value} is not between 0.1 and 86400 seconds"),
                });
            }
        }
        if self.otlp.max_queued_events == 0 {
            return Err(Invalid {
                section: "otlp",
                key: "max_queued_events",
                reason: "must be at least 1".to_owned(),
            });
        }
        // Zero series would silently drop every per-process metric.
        if self.tracking.max_series == 0 {
            return Err(Invalid {
                section: "tracking",
                key: "max_series",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }
}

/// Durations in the file: a number in the key's own unit
/// (`quiet_seconds = 1.5`, `slow_threshold_ms = 200`) or a string that
/// names its unit (`quiet_seconds = "1500ms"`, `"2m"`, `"1h 30m"`), the
/// same for every duration key. A bad string is an error at its value's
/// line, like any other bad value.
mod duration {
    use serde::de::{Deserializer, Error, Visitor};

    /// Reads a number (in the key's unit) or a duration string, giving the
    /// duration in units of `unit_ns`.
    struct InUnit {
        unit_ns: f64,
    }

    impl Visitor<'_> for InUnit {
        type Value = f64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number, or a duration such as \"500ms\", \"30s\" or \"2m\"")
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<f64, E> {
            Ok(n as f64)
        }

        fn visit_i64<E: Error>(self, n: i64) -> Result<f64, E> {
            Ok(n as f64)
        }

        fn visit_f64<E: Error>(self, n: f64) -> Result<f64, E> {
            Ok(n)
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<f64, E> {
            humantime::parse_duration(text.trim())
                .map(|d| d.as_nanos() as f64 / self.unit_ns)
                .map_err(|e| {
                    E::custom(format!(
                        "{text:?} is not a duration ({e}); write a number, or a string \
                         such as \"500ms\", \"30s\" or \"2m\""
                    ))
                })
        }
    }

    fn read<'de, D: Deserializer<'de>>(d: D, unit_ns: f64) -> Result<f64, D::Error> {
        d.deserialize_any(InUnit { unit_ns })
    }

    fn whole<E: Error>(value: f64, unit: &str) -> Result<u64, E> {
        if value >= 0.0 && value.fract() == 0.0 && value < u64::MAX as f64 {
            Ok(value as u64)
        } else {
            Err(E::custom(format!(
                "{value} is not a whole number of {unit} at least 0"
            )))
        }
    }

    pub fn seconds_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        read(d, 1e9)
    }

    pub fn millis_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        read(d, 1e6)
    }

    pub fn seconds_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        whole(read(d, 1e9)?, "seconds")
    }

    pub fn millis_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        whole(read(d, 1e6)?, "milliseconds")
    }
}

/// `config PATH line N: ` (or without the line when unknown).
fn location(origin: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("config {origin} line {line}: "),
        None => format!("config {origin}: "),
    }
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Keys expected in the table at `section` (empty path: the top level).
fn expected_keys(section: &[String]) -> Option<&'static [&'static str]> {
    match section {
        [] => Some(TOP_KEYS),
        [s] => match s.as_str() {
            "http" => Some(HTTP_KEYS),
            "kernel" => Some(KERNEL_KEYS),
            "tracking" => Some(TRACKING_KEYS),
            "queries" => Some(QUERIES_KEYS),
            "adapter" => Some(ADAPTER_KEYS),
            "leaks" => Some(LEAKS_KEYS),
            "otlp" => Some(OTLP_KEYS),
            "log" => Some(LOG_KEYS),
            _ => None,
        },
        _ => None,
    }
}

fn table_name(section: &[String]) -> String {
    if section.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in [{}]", section.join("."))
    }
}

/// Rewrites a toml/serde error into `config ORIGIN line N: ...` naming the key.
fn describe_toml_error(text: &str, origin: &str, err: &toml::de::Error) -> anyhow::Error {
    // Multi-line parser messages ("invalid string\nexpected ...") read better
    // on one line in logs.
    let message = err.message().trim().replace('\n', "; ");
    let Some(span) = err.span() else {
        return anyhow!("{}{message}", location(origin, None));
    };
    let line = Some(line_of(text, span.start));
    let at = location(origin, line);
    // The error span covers the key (unknown field) or the value (wrong
    // type). Syntax errors leave no sites, and the message stands alone.
    let sites = key_sites(text);
    let on_key = sites.iter().find(|s| s.span.contains(&span.start));
    // Otherwise the span is a value, which follows its own key: the last key
    // that starts before it.
    let site = on_key.or_else(|| sites.iter().rev().find(|s| s.span.start <= span.start));
    let Some(site) = site else {
        return anyhow!("{at}{message}");
    };
    let (key, section) = match site.path.split_last() {
        Some((key, section)) => (key, section),
        None => return anyhow!("{at}{message}"),
    };
    if message.starts_with("unknown field") && on_key.is_some() {
        return match expected_keys(section) {
            Some(expected) => anyhow!(
                "{at}unknown key `{key}` {} (expected one of: {})",
                table_name(section),
                expected.join(", ")
            ),
            None => anyhow!("{at}unknown key `{key}` {}", table_name(section)),
        };
    }
    if section.is_empty() && message.starts_with("invalid type") {
        // serde would say "expected struct HttpConfig"; say what to write.
        return anyhow!("{at}`{key}` must be a table ([{key}])");
    }
    anyhow!(
        "{at}bad value for `{key}` {}: {message}",
        table_name(section)
    )
}

/// Where a key sits in the text, with its full path (`["kernel",
/// "ring_buffer_bytes"]`).
#[derive(Debug)]
struct KeySite {
    path: Vec<String>,
    span: Range<usize>,
}

/// Lists every key of the document with its span, in text order, so that
/// errors (whose spans toml gives without the key path) can be mapped back
/// to a key. Returns nothing if the text is not valid TOML.
fn key_sites(text: &str) -> Vec<KeySite> {
    let mut sites = Vec::new();
    if let Ok(Probe::Table(entries)) = toml::from_str::<Probe>(text) {
        flatten(&mut Vec::new(), entries, &mut sites);
    }
    sites.sort_by_key(|s| s.span.start);
    sites
}

fn flatten(
    prefix: &mut Vec<String>,
    entries: Vec<(Spanned<String>, Probe)>,
    out: &mut Vec<KeySite>,
) {
    for (key, value) in entries {
        let span = key.span();
        prefix.push(key.into_inner());
        out.push(KeySite {
            path: prefix.clone(),
            span,
        });
        if let Probe::Table(inner) = value {
            flatten(prefix, inner, out);
        }
        prefix.pop();
    }
}

/// A TOML document reduced to its keys with their spans. Only keys are
/// spanned: toml gives no span for dotted tables (`a.b = 1`), and a value
/// always follows its own key, which is enough to attribute value errors.
enum Probe {
    Leaf,
    Table(Vec<(Spanned<String>, Probe)>),
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ProbeVisitor)
    }
}

struct ProbeVisitor;

impl<'de> Visitor<'de> for ProbeVisitor {
    type Value = Probe;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Probe, E> {
        Ok(Probe::Leaf)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Probe, E> {
        Ok(Probe::Leaf)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Probe, E> {
        Ok(Probe::Leaf)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Probe, E> {
        Ok(Probe::Leaf)
    }

    fn visit_str<E>(self, _: &str) -> Result<Probe, E> {
        Ok(Probe::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Probe, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Probe::Leaf)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
        let mut entries = Vec::new();
        loop {
            // A datetime also arrives as a map, but its key carries no span;
            // treat it as a leaf instead of failing the whole probe.
            let key = match map.next_key::<Spanned<String>>() {
                Ok(Some(key)) => key,
                Ok(None) => break,
                Err(_) => return Ok(Probe::Leaf),
            };
            let value = map.next_value::<Probe>()?;
            entries.push((key, value));
        }
        Ok(Probe::Table(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[http]
listen = "0.0.0.0:9000"
max_connections = 10
header_read_timeout_seconds = 2.5
idle_timeout_seconds = 7.0
bearer_token = "s3cret-token"

[kernel]
ring_buffer_bytes = 262144
mount_tracefs = false
data_path = "syscalls"
probe_stats = true
unix_sockets = true

[tracking]
closed_retention_seconds = 60
max_closed = 10
max_series = 50
seed_from_proc = false
pod_logs_dir = "/tmp/pods"
full_command_lines = true

[queries]
capture_bytes = 128
redis_capture_bytes = 1024
slow_threshold_ms = 250
raw_text = true
max_slow_kept = 10

[adapter]
enabled = false
socket = "/tmp/a.sock"
socket_mode = "0660"
min_queue_datagrams = 0
allowed_uids = [1000, 1001]
allowed_gids = [50]
stream_socket = "/tmp/a-stream.sock"
max_streams = 10
max_streams_per_uid = 2

[leaks]
leak_threshold_seconds = 3.0
quiet_seconds = 1.5
idle_in_transaction_seconds = 4.0
close_wait_seconds = 2.0
abandoned_seconds = 60.0
slow_acquire_ms = 250.0
max_resolved_kept = 20

[otlp]
endpoint = "http://127.0.0.1:4318"
protocol = "http/protobuf"
interval_seconds = 2.0
timeout_seconds = 3.0
max_queued_events = 100
query_spans = true

[log]
level = "debug"
"#;

    fn full() -> Config {
        Config {
            http: HttpConfig {
                listen: "0.0.0.0:9000".parse().expect("addr"),
                max_connections: 10,
                header_read_timeout_seconds: 2.5,
                idle_timeout_seconds: 7.0,
                bearer_token: Some(Secret("s3cret-token".into())),
                bearer_token_file: None,
            },
            kernel: KernelConfig {
                ring_buffer_bytes: 262144,
                mount_tracefs: false,
                data_path: DataPath::Syscalls,
                probe_stats: true,
                unix_sockets: true,
            },
            tracking: TrackingConfig {
                closed_retention_seconds: 60,
                max_closed: 10,
                max_series: 50,
                seed_from_proc: false,
                pod_logs_dir: "/tmp/pods".into(),
                full_command_lines: true,
            },
            queries: QueriesConfig {
                capture_bytes: 128,
                redis_capture_bytes: 1024,
                slow_threshold_ms: 250,
                raw_text: true,
                max_slow_kept: 10,
            },
            adapter: AdapterConfig {
                enabled: false,
                socket: "/tmp/a.sock".into(),
                socket_mode: "0660".into(),
                min_queue_datagrams: 0,
                allowed_uids: vec![1000, 1001],
                allowed_gids: vec![50],
                stream_socket: "/tmp/a-stream.sock".into(),
                max_streams: 10,
                max_streams_per_uid: 2,
            },
            leaks: LeaksConfig {
                leak_threshold_seconds: 3.0,
                quiet_seconds: 1.5,
                idle_in_transaction_seconds: 4.0,
                close_wait_seconds: 2.0,
                abandoned_seconds: 60.0,
                slow_acquire_ms: 250.0,
                max_resolved_kept: 20,
            },
            otlp: OtlpConfig {
                endpoint: "http://127.0.0.1:4318".into(),
                protocol: "http/protobuf".into(),
                interval_seconds: 2.0,
                timeout_seconds: 3.0,
                max_queued_events: 100,
                query_spans: true,
            },
            log: LogConfig {
                level: "debug".to_owned(),
            },
        }
    }

    fn err(text: &str) -> String {
        match Config::from_toml_str(text, "/etc/poolscope.toml") {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.http.listen, "127.0.0.1:9464".parse().expect("addr"));
        assert_eq!(c.kernel.ring_buffer_bytes, 4 * 1024 * 1024);
        assert!(c.kernel.mount_tracefs);
        assert_eq!(c.tracking.closed_retention_seconds, 300);
        assert_eq!(c.tracking.max_closed, 4096);
        assert_eq!(c.tracking.max_series, 2000);
        assert!(c.tracking.seed_from_proc);
        assert_eq!(c.log.level, "info");
        assert_eq!(Config::from_toml_str("", "x").expect("empty"), c);
        assert_eq!(Config::load(None).expect("none"), c);
        // A partial section keeps the other defaults of that section.
        let c = Config::from_toml_str("[kernel]\nmount_tracefs = false\n", "x").expect("partial");
        assert_eq!(c.kernel.ring_buffer_bytes, 4 * 1024 * 1024);
        assert!(!c.kernel.mount_tracefs);
    }

    #[test]
    fn durations_take_a_number_in_the_keys_unit_or_a_string_with_its_own() {
        let c = Config::from_toml_str(
            "[leaks]\nquiet_seconds = \"1500ms\"\nleak_threshold_seconds = 90\n\
             slow_acquire_ms = \"2s\"\nabandoned_seconds = 2.5\n\
             [tracking]\nclosed_retention_seconds = \"5m\"\n\
             [queries]\nslow_threshold_ms = \"1s 500ms\"\n\
             [http]\nidle_timeout_seconds = \"1m\"\n\
             [otlp]\ninterval_seconds = \"250ms\"\n",
            "x",
        )
        .expect("durations");
        assert_eq!(c.leaks.quiet_seconds, 1.5);
        assert_eq!(c.leaks.leak_threshold_seconds, 90.0);
        assert_eq!(c.leaks.slow_acquire_ms, 2000.0);
        assert_eq!(c.leaks.abandoned_seconds, 2.5);
        assert_eq!(c.tracking.closed_retention_seconds, 300);
        assert_eq!(c.queries.slow_threshold_ms, 1500);
        assert_eq!(c.http.idle_timeout_seconds, 60.0);
        assert_eq!(c.otlp.interval_seconds, 0.25);
    }

    #[test]
    fn bad_durations_name_the_key_and_the_line() {
        for (text, wanted) in [
            (
                "[leaks]\nquiet_seconds = \"5 parsecs\"\n",
                "config x line 2: bad value for `quiet_seconds` in [leaks]: \"5 parsecs\" is not a duration",
            ),
            (
                "[tracking]\n\nclosed_retention_seconds = \"1500ms\"\n",
                "config x line 3: bad value for `closed_retention_seconds` in [tracking]: 1.5 is not a whole number of seconds",
            ),
            (
                "[queries]\nslow_threshold_ms = -5\n",
                "config x line 2: bad value for `slow_threshold_ms` in [queries]: -5 is not a whole number of milliseconds",
            ),
            (
                "[leaks]\nquiet_seconds = true\n",
                "config x line 2: bad value for `quiet_seconds` in [leaks]: invalid type: boolean `true`, expected a number, or a duration",
            ),
        ] {
            let err = Config::from_toml_str(text, "x").expect_err(text).to_string();
            assert!(err.starts_with(wanted), "{text:?}:\n{err}");
        }
    }

    #[test]
    fn full_file_round_trip() {
        assert_eq!(Config::from_toml_str(FULL, "x").expect("full"), full());
        let text = toml::to_string(&full()).expect("serialize");
        assert_eq!(Config::from_toml_str(&text, "x").expect("again"), full());
        let text = toml::to_string(&Config::default()).expect("serialize");
        assert_eq!(
            Config::from_toml_str(&text, "x").expect("defaults"),
            Config::default()
        );
    }

    #[test]
    fn key_lists_match_the_structs() {
        // Every listed key is accepted where it is listed (optional keys
        // appear only when set; both token keys are set here).
        let mut all = full();
        all.http.bearer_token_file = Some("/tmp/token".into());
        let text = toml::to_string(&all).expect("serialize");
        let value: toml::Table = text.parse().expect("parse");
        let mut top: Vec<_> = value.keys().cloned().collect();
        top.sort();
        let mut want: Vec<_> = TOP_KEYS.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(top, want);
        for section in TOP_KEYS {
            let table = value[*section].as_table().expect("table");
            let mut got: Vec<_> = table.keys().cloned().collect();
            got.sort();
            let mut want: Vec<_> = expected_keys(&[section.to_string()])
                .expect("known")
                .iter()
                .map(|s| s.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "[{section}]");
        }
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        assert_eq!(
            err("# poolscope\n[http]\nlistn = \"127.0.0.1:1\"\n"),
            "config /etc/poolscope.toml line 3: unknown key `listn` in [http] \
             (expected one of: listen, max_connections, header_read_timeout_seconds, \
             idle_timeout_seconds, bearer_token, bearer_token_file)"
        );
        assert_eq!(
            err("[kernel]\nring_buffer_bytes = 4096\n\n[htp]\n"),
            "config /etc/poolscope.toml line 4: unknown key `htp` at the top level \
             (expected one of: http, kernel, tracking, queries, adapter, leaks, otlp, log)"
        );
        // Inline tables and dotted keys are located just as well.
        assert_eq!(
            err("log = { level = \"info\", colour = true }\n"),
            "config /etc/poolscope.toml line 1: unknown key `colour` in [log] \
             (expected one of: level)"
        );
        assert_eq!(
            err("\n\ntracking.max_clsed = 3\n"),
            "config /etc/poolscope.toml line 3: unknown key `max_clsed` in [tracking] \
             (expected one of: closed_retention_seconds, max_closed, max_series, \
             seed_from_proc, pod_logs_dir, full_command_lines)"
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = err("[kernel]\n\nring_buffer_bytes = \"big\"\n");
        assert!(
            e.starts_with(
                "config /etc/poolscope.toml line 3: bad value for `ring_buffer_bytes` \
                 in [kernel]: invalid type: string \"big\""
            ),
            "{e}"
        );
        let e = err("[http]\nlisten = \"localhost\"\n");
        assert!(
            e.starts_with("config /etc/poolscope.toml line 2: bad value for `listen` in [http]"),
            "{e}"
        );
        let e = err("[tracking]\nmax_closed = -1\n");
        assert!(
            e.starts_with("config /etc/poolscope.toml line 2: bad value for `max_closed`"),
            "{e}"
        );
        // Dotted keys and inline tables are located just as well.
        assert_eq!(
            err("kernel.mount_tracefs = 1"),
            "config /etc/poolscope.toml line 1: bad value for `mount_tracefs` in [kernel]: \
             invalid type: integer `1`, expected a boolean"
        );
        let e = err("\nkernel = { ring_buffer_bytes = -1 }");
        assert!(
            e.starts_with(
                "config /etc/poolscope.toml line 2: bad value for `ring_buffer_bytes` in [kernel]"
            ),
            "{e}"
        );
        // A datetime where a number belongs still names the key.
        let e = err("[tracking]\nmax_closed = 1979-05-27T07:32:00Z\n");
        assert!(
            e.starts_with("config /etc/poolscope.toml line 2: bad value for `max_closed`"),
            "{e}"
        );
        assert_eq!(
            err("\nhttp = 5\n"),
            "config /etc/poolscope.toml line 2: `http` must be a table ([http])"
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = err("[http]\nlisten = \n");
        assert!(e.starts_with("config /etc/poolscope.toml line 2: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("[kernel]\nmount_tracefs = true\nmount_tracefs = false\n");
        assert!(e.starts_with("config /etc/poolscope.toml line 3: "), "{e}");
        assert!(e.contains("mount_tracefs"), "{e}");
    }

    #[test]
    fn invalid_ring_buffer_size() {
        assert_eq!(
            err("[log]\nlevel = \"info\"\n[kernel]\nring_buffer_bytes = 100000\n"),
            "config /etc/poolscope.toml line 4: bad value for `ring_buffer_bytes` in \
             [kernel]: 100000 is not a power of two that is a multiple of 4096 \
             (e.g. 262144, 1048576)"
        );
        // Powers of two below a page are rejected too, and zero.
        assert!(err("kernel.ring_buffer_bytes = 2048").contains("line 1"));
        assert!(err("kernel.ring_buffer_bytes = 0").contains("ring_buffer_bytes"));
        assert!(Config::from_toml_str("kernel.ring_buffer_bytes = 4096", "x").is_ok());
    }

    #[test]
    fn invalid_log_level_and_series() {
        assert_eq!(
            err("[log]\n\nlevel = \"loud\"\n"),
            "config /etc/poolscope.toml line 3: bad value for `level` in [log]: \
             \"loud\" is not one of error|warn|info|debug|trace"
        );
        let c = Config::from_toml_str("[log]\nlevel = \"WARN\"\n", "x").expect("upper");
        assert_eq!(c.log.level, "warn");
        assert!(err("[tracking]\nmax_series = 0\n").contains("line 2"));
        assert!(
            err("[tracking]\n\nclosed_retention_seconds = 18446744074\n").starts_with(
                "config /etc/poolscope.toml line 3: bad value for `closed_retention_seconds`"
            )
        );
    }

    #[test]
    fn overrides_win() {
        let mut c = Config::from_toml_str(FULL, "x").expect("full");
        c.apply(&Overrides::default()).expect("no overrides");
        assert_eq!(c, full());
        c.apply(&Overrides {
            listen: Some("[::1]:8080".parse().expect("addr")),
            ring_buffer_bytes: Some(1 << 22),
            log_level: Some("Trace".to_owned()),
            probe_stats: true,
            data_path: Some(DataPath::Socket),
        })
        .expect("overrides");
        assert_eq!(c.http.listen, "[::1]:8080".parse().expect("addr"));
        assert_eq!(c.kernel.ring_buffer_bytes, 1 << 22);
        assert_eq!(c.log.level, "trace");
        assert!(c.kernel.probe_stats);
        assert_eq!(c.kernel.data_path, DataPath::Socket);
        assert_eq!(c.tracking, full().tracking);

        let e = c
            .apply(&Overrides {
                ring_buffer_bytes: Some(5000),
                ..Overrides::default()
            })
            .expect_err("bad override");
        assert!(e.to_string().contains("ring_buffer_bytes"), "{e}");
        let e = c
            .apply(&Overrides {
                log_level: Some("chatty".to_owned()),
                ..Overrides::default()
            })
            .expect_err("bad level");
        assert!(e.to_string().contains("chatty"), "{e}");
        // Failed overrides leave the configuration as it was.
        assert_eq!(c.kernel.ring_buffer_bytes, 1 << 22);
        assert_eq!(c.log.level, "trace");
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let path = std::env::temp_dir().join(format!(
            "poolscope-config-missing-{}.toml",
            std::process::id()
        ));
        let e = Config::load(Some(&path)).expect_err("missing");
        let text = e.to_string();
        assert!(text.starts_with("cannot read config file "), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");

        let path =
            std::env::temp_dir().join(format!("poolscope-config-ok-{}.toml", std::process::id()));
        std::fs::write(&path, "[http]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").expect("write");
        let e = Config::load(Some(&path)).expect_err("bogus");
        let _ = std::fs::remove_file(&path);
        assert!(
            e.to_string().starts_with(&format!(
                "config {} line 3: unknown key `bogus`",
                path.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_slow_threshold_that_overflows_nanoseconds_is_refused() {
        let e = Config::from_toml_str("[queries]\nslow_threshold_ms = 18446744073710\n", "x")
            .expect_err("overflow");
        assert!(e.to_string().contains("slow_threshold_ms"), "{e}");
        assert!(e.to_string().contains("too large"), "{e}");
    }
    #[test]
    fn bearer_token_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("poolscope-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("token");
        std::fs::write(&good, "  abc-123\n").expect("write");
        let blank = dir.join("blank");
        std::fs::write(&blank, "\n").expect("write");
        let missing = dir.join("missing");
        let parse = |text: &str| Config::from_toml_str(text, "x");

        let c = parse(&format!(
            "[http]\nbearer_token_file = {:?}\n",
            good.display().to_string()
        ))
        .expect("file");
        assert_eq!(c.http.bearer_token(), Ok(Some("abc-123".to_owned())));
        let c = parse("[http]\nbearer_token = \"t0k\"\n").expect("inline");
        assert_eq!(c.http.bearer_token(), Ok(Some("t0k".to_owned())));
        assert!(!format!("{c:?}").contains("t0k"), "Debug shows the token");
        assert_eq!(Config::default().http.bearer_token(), Ok(None));

        let both = format!(
            "[http]\nbearer_token = \"a\"\nbearer_token_file = {:?}\n",
            good.display().to_string()
        );
        for (text, key, why) in [
            (both, "bearer_token", "not both"),
            (
                "[http]\nbearer_token = \"\"\n".to_owned(),
                "bearer_token",
                "empty",
            ),
            (
                "[http]\nbearer_token = \"a b\"\n".to_owned(),
                "bearer_token",
                "printable",
            ),
            (
                format!(
                    "[http]\nbearer_token_file = {:?}\n",
                    blank.display().to_string()
                ),
                "bearer_token_file",
                "empty",
            ),
            (
                format!(
                    "[http]\nbearer_token_file = {:?}\n",
                    missing.display().to_string()
                ),
                "bearer_token_file",
                "cannot read",
            ),
            (
                "[http]\nmax_connections = 0\n".to_owned(),
                "max_connections",
                "between",
            ),
            (
                "[http]\nheader_read_timeout_seconds = 0.0\n".to_owned(),
                "header_read_timeout_seconds",
                "between",
            ),
        ] {
            let e = format!("{:#}", parse(&text).expect_err(&text));
            assert!(e.contains(&format!("`{key}` in [http]")), "{e}");
            assert!(e.contains(why), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
