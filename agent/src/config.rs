//! The agent's configuration: a TOML file, overridden by command-line flags.
//!
//! Every section has defaults, so an empty file (or no file) is a valid
//! configuration. Each section is a struct beside the module that owns it
//! (re-exported below), and each key's type checks its value while the file
//! is read (`config_types` for durations and bounded numbers, the sections'
//! own types for the rest), so that the TOML parser's own error names the
//! line and column of a bad value or an unknown key, and shows it. This
//! file composes the sections, reads the file, applies the command-line
//! overrides and checks what involves more than one key.

use std::path::Path;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

pub use crate::{
    adapter::config::{AdapterConfig, SocketMode},
    api::config::{HttpConfig, Secret},
    detect::config::{LeaksConfig, PoolHealthConfig, SizingConfig},
    ebpf::config::{DataPath, KernelConfig, RingBufferBytes},
    kubernetes::config::{ApiLookups, KubernetesConfig},
    lifecycle::config::TrackingConfig,
    protocol::config::QueriesConfig,
    telemetry::{attributes::MetricsConfig, otlp::config::OtlpConfig},
};

/// Log levels accepted in `[log] level` and `--log-level`.
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub kernel: KernelConfig,
    pub tracking: TrackingConfig,
    pub queries: QueriesConfig,
    pub adapter: AdapterConfig,
    pub leaks: LeaksConfig,
    pub pool_health: PoolHealthConfig,
    pub sizing: SizingConfig,
    pub otlp: OtlpConfig,
    pub metrics: MetricsConfig,
    pub kubernetes: KubernetesConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [log]")]
pub struct LogConfig {
    pub level: LogLevel,
}

/// One of [`LOG_LEVELS`], written in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct LogLevel(&'static str);

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        LogLevel::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel("info")
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        LOG_LEVELS
            .iter()
            .find(|level| **level == lower)
            .map(|level| LogLevel(level))
            .ok_or_else(|| format!("{text:?} is not one of {}", LOG_LEVELS.join("|")))
    }
}

impl From<LogLevel> for String {
    fn from(level: LogLevel) -> String {
        level.0.to_owned()
    }
}

/// Values given on the command line; each one that is set replaces the file's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    pub ring_buffer_bytes: Option<u32>,
    pub log_level: Option<String>,
    pub probe_stats: bool,
    pub data_path: Option<DataPath>,
}

impl Config {
    /// Parses and checks a configuration file's text. `origin` names the
    /// file in error messages.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                // toml's own message: the line and column, the line itself
                // with a caret under the fault, and what is wrong (for an
                // unknown key, the keys expected there). The path names the
                // key even where the line does not show it (an array over
                // several lines); "." is the whole file (a syntax error).
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let message = message.trim_end();
                if path == "." {
                    anyhow!("config {origin}: {message}")
                } else {
                    anyhow!("config {origin}: key `{path}`: {message}")
                }
            })?;
        config
            .check_across_keys()
            .map_err(|e| anyhow!("config {origin}: {e}"))?;
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

    /// Applies command-line overrides (they win over the file), checked as
    /// the file's values are. On error `self` is left unchanged.
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        let mut next = self.clone();
        if let Some(listen) = o.listen {
            next.http.listen = listen;
        }
        if let Some(bytes) = o.ring_buffer_bytes {
            next.kernel.ring_buffer_bytes = RingBufferBytes::try_from(bytes).map_err(|e| {
                anyhow!("bad value for --ring-buffer-bytes (key `kernel.ring_buffer_bytes`): {e}")
            })?;
        }
        if let Some(level) = &o.log_level {
            next.log.level = LogLevel::try_from(level.clone())
                .map_err(|e| anyhow!("bad value for --log-level (key `log.level`): {e}"))?;
        }
        if o.probe_stats {
            next.kernel.probe_stats = true;
        }
        if let Some(path) = o.data_path {
            next.kernel.data_path = path;
        }
        *self = next;
        Ok(())
    }

    /// What no single key's type can check, naming the keys at fault.
    fn check_across_keys(&self) -> Result<()> {
        self.metrics.check()?;
        self.http
            .bearer_token()
            .map(|_| ())
            .map_err(|(key, reason)| anyhow!("key `http.{key}`: {reason}"))?;
        let (warning, critical) = (
            self.pool_health.warning_utilization_percent.get(),
            self.pool_health.critical_utilization_percent.get(),
        );
        if warning > critical {
            return Err(anyhow!(
                "key `pool_health.warning_utilization_percent`: {warning} is above \
                 `pool_health.critical_utilization_percent` ({critical}); a pool is a warning \
                 before it is critical"
            ));
        }
        if self.sizing.min_observed_seconds.as_nanos() > self.sizing.window_seconds.as_nanos() {
            return Err(anyhow!(
                "key `sizing.min_observed_seconds`: {:?} is longer than `sizing.window_seconds` \
                 ({:?}); no pool could ever be observed that long within the window",
                self.sizing.min_observed_seconds.get(),
                self.sizing.window_seconds.get()
            ));
        }
        // Binding one would remove the other's socket file.
        if self.adapter.stream_socket == self.adapter.socket {
            return Err(anyhow!(
                "key `adapter.stream_socket`: {} is also `adapter.socket`; the datagram and the \
                 stream socket need paths of their own",
                self.adapter.socket.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config_types::Bounded;

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
tls_libraries = false
tls_hook_scope = "file"

[tracking]
closed_retention_seconds = 60
max_closed = 10
max_series = 50
seed_from_proc = false
pod_logs_dir = "/tmp/pods"
full_command_lines = true
max_applications = 7
resource_command_args = true

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

[pool_health]
warning_utilization_percent = 70
critical_utilization_percent = 95
long_wait_ms = 500
recent_seconds = "1m"

[sizing]
window_seconds = "30m"
min_observed_seconds = 120
sample_seconds = 2

[otlp]
endpoint = "http://127.0.0.1:4318"
protocol = "http/protobuf"
interval_seconds = 2.0
timeout_seconds = 3.0
max_queued_events = 100
query_spans = true

[metrics.attributes."db.client.operation.duration"]
add = ["db.query.summary"]
drop = ["server.port"]

[kubernetes]
api = "off"

[log]
level = "debug"
"#;

    /// A checked value of any key type, for building expected configs.
    fn checked<T: TryFrom<U, Error = String>, U>(value: U) -> T {
        T::try_from(value).expect("a valid value")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn full() -> Config {
        Config {
            http: HttpConfig {
                listen: "0.0.0.0:9000".parse().expect("addr"),
                max_connections: checked(10u64),
                header_read_timeout_seconds: checked(ms(2500)),
                idle_timeout_seconds: checked(ms(7000)),
                bearer_token: Some(checked("s3cret-token".to_owned())),
                bearer_token_file: None,
            },
            kernel: KernelConfig {
                ring_buffer_bytes: checked(262144u32),
                mount_tracefs: false,
                data_path: DataPath::Syscalls,
                probe_stats: true,
                unix_sockets: true,
                tls_libraries: false,
                tls_hook_scope: crate::tls_libraries::HookScope::File,
            },
            tracking: TrackingConfig {
                closed_retention_seconds: checked(ms(60_000)),
                max_closed: 10,
                max_series: checked(50u64),
                seed_from_proc: false,
                pod_logs_dir: "/tmp/pods".into(),
                full_command_lines: true,
                max_applications: checked(7u64),
                resource_command_args: true,
            },
            queries: QueriesConfig {
                capture_bytes: checked(128u64),
                redis_capture_bytes: checked(1024u64),
                slow_threshold_ms: checked(ms(250)),
                raw_text: true,
                max_slow_kept: 10,
            },
            adapter: AdapterConfig {
                enabled: false,
                socket: "/tmp/a.sock".into(),
                socket_mode: checked("0660".to_owned()),
                min_queue_datagrams: 0,
                allowed_uids: vec![1000, 1001],
                allowed_gids: vec![50],
                stream_socket: "/tmp/a-stream.sock".into(),
                max_streams: Bounded::new(10),
                max_streams_per_uid: Bounded::new(2),
            },
            leaks: LeaksConfig {
                leak_threshold_seconds: checked(ms(3000)),
                quiet_seconds: checked(ms(1500)),
                idle_in_transaction_seconds: checked(ms(4000)),
                close_wait_seconds: checked(ms(2000)),
                abandoned_seconds: checked(ms(60_000)),
                slow_acquire_ms: checked(ms(250)),
                max_resolved_kept: 20,
            },
            pool_health: PoolHealthConfig {
                warning_utilization_percent: Bounded::new(70),
                critical_utilization_percent: Bounded::new(95),
                long_wait_ms: checked(ms(500)),
                recent_seconds: checked(ms(60_000)),
            },
            sizing: SizingConfig {
                window_seconds: checked(ms(1_800_000)),
                min_observed_seconds: checked(ms(120_000)),
                sample_seconds: checked(ms(2_000)),
            },
            otlp: OtlpConfig {
                endpoint: "http://127.0.0.1:4318".into(),
                protocol: checked("http/protobuf".to_owned()),
                interval_seconds: checked(ms(2000)),
                timeout_seconds: checked(ms(3000)),
                max_queued_events: checked(100u64),
                query_spans: true,
                ..OtlpConfig::default()
            },
            metrics: MetricsConfig {
                attributes: [(
                    "db.client.operation.duration".to_string(),
                    crate::telemetry::attributes::AttributeChoice {
                        add: vec!["db.query.summary".into()],
                        drop: vec!["server.port".into()],
                    },
                )]
                .into(),
            },
            kubernetes: KubernetesConfig {
                api: ApiLookups::Off,
            },
            log: LogConfig {
                level: checked("debug".to_owned()),
            },
        }
    }

    const ORIGIN: &str = "/etc/poolscope.toml";

    fn err(text: &str) -> String {
        match Config::from_toml_str(text, ORIGIN) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Asserts that `e` names the file, the key's path and its line (in
    /// toml's words, with the line itself shown and a caret under the
    /// fault), and says `what` was wrong.
    #[track_caller]
    fn assert_located(e: &str, key: &str, line: usize, what: &str) {
        assert!(
            e.starts_with(&format!(
                "config {ORIGIN}: key `{key}`: TOML parse error at line {line}, column "
            )),
            "{e}"
        );
        assert!(e.contains(&format!("\n{line} | ")), "shows the line: {e}");
        assert!(e.contains('^'), "a caret under the fault: {e}");
        assert!(e.lines().last().is_some_and(|l| l.contains(what)), "{e}");
        assert!(e.lines().count() <= 6, "one short screen: {e}");
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.http.listen, "127.0.0.1:9464".parse().expect("addr"));
        assert_eq!(c.http.max_connections.get(), 256);
        assert_eq!(c.http.header_read_timeout_seconds.get(), ms(5000));
        assert_eq!(c.http.idle_timeout_seconds.get(), ms(30_000));
        assert_eq!(c.kernel.ring_buffer_bytes.get(), 4 * 1024 * 1024);
        assert!(c.kernel.mount_tracefs);
        assert_eq!(c.tracking.closed_retention_seconds.get(), ms(300_000));
        assert_eq!(c.tracking.max_closed, 4096);
        assert_eq!(c.tracking.max_series.get(), 2000);
        assert!(c.tracking.seed_from_proc);
        assert_eq!(c.queries.capture_bytes.get(), 256);
        assert_eq!(c.queries.redis_capture_bytes.get(), 4096);
        assert_eq!(c.queries.slow_threshold_ms.get(), ms(500));
        assert_eq!(c.adapter.mode(), 0o666);
        // The file's defaults are the detector's own (30 s, 5 s, ... 1 s).
        assert_eq!(c.leaks.thresholds(), crate::detect::Thresholds::default());
        assert_eq!(c.otlp.interval_seconds.get(), ms(10_000));
        assert_eq!(c.otlp.timeout_seconds.get(), ms(10_000));
        assert_eq!(c.otlp.max_queued_events.get(), 10_000);
        assert_eq!(c.otlp.protocol.0, None);
        assert_eq!(c.log.level.as_str(), "info");
        assert_eq!(Config::from_toml_str("", "x").expect("empty"), c);
        assert_eq!(Config::load(None).expect("none"), c);
        // A partial section keeps the other defaults of that section.
        let c = Config::from_toml_str("[kernel]\nmount_tracefs = false\n", "x").expect("partial");
        assert_eq!(c.kernel.ring_buffer_bytes.get(), 4 * 1024 * 1024);
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
        assert_eq!(c.leaks.quiet_seconds.get(), ms(1500));
        assert_eq!(c.leaks.leak_threshold_seconds.get(), ms(90_000));
        assert_eq!(c.leaks.slow_acquire_ms.get(), ms(2000));
        assert_eq!(c.leaks.abandoned_seconds.get(), ms(2500));
        assert_eq!(c.tracking.closed_retention_seconds.get(), ms(300_000));
        assert_eq!(c.queries.slow_threshold_ms.get(), ms(1500));
        assert_eq!(c.http.idle_timeout_seconds.get(), ms(60_000));
        assert_eq!(c.otlp.interval_seconds.get(), ms(250));
        // Every duration key takes fractions alike, whole-number keys too.
        let c = Config::from_toml_str(
            "tracking.closed_retention_seconds = \"1500ms\"\nqueries.slow_threshold_ms = 0.5\n",
            "x",
        )
        .expect("fractions");
        assert_eq!(c.tracking.closed_retention_seconds.get(), ms(1500));
        assert_eq!(
            c.queries.slow_threshold_ms.get(),
            Duration::from_micros(500)
        );
    }

    #[test]
    fn bad_durations_name_the_key_and_the_line() {
        for (text, key, line, what) in [
            (
                "[leaks]\nquiet_seconds = \"5 parsecs\"\n",
                "leaks.quiet_seconds",
                2,
                "\"5 parsecs\" is not a duration (unknown time unit \"parsecs\"",
            ),
            (
                "[tracking]\n\nclosed_retention_seconds = \"a while\"\n",
                "tracking.closed_retention_seconds",
                3,
                "\"a while\" is not a duration",
            ),
            (
                "[queries]\nslow_threshold_ms = -5\n",
                "queries.slow_threshold_ms",
                2,
                "-5 is below zero",
            ),
            (
                "[leaks]\nquiet_seconds = true\n",
                "leaks.quiet_seconds",
                2,
                "invalid type: boolean `true`, expected a number of seconds, or a duration",
            ),
            (
                "[leaks]\nslow_acquire_ms = \"200y\"\n",
                "leaks.slow_acquire_ms",
                2,
                "\"200y\" is not between 0 and 3153600000000 milliseconds",
            ),
            (
                "[http]\nidle_timeout_seconds = 0.05\n",
                "http.idle_timeout_seconds",
                2,
                "0.05 is not between 0.1 and 3600 seconds",
            ),
            (
                "[otlp]\n\n\ntimeout_seconds = \"2d\"\n",
                "otlp.timeout_seconds",
                4,
                "\"2d\" is not between 0.1 and 86400 seconds",
            ),
        ] {
            assert_located(&err(text), key, line, what);
        }
    }

    #[test]
    fn full_file_round_trip() {
        assert_eq!(Config::from_toml_str(FULL, "x").expect("full"), full());
        let text = toml::to_string(&full()).expect("serialize");
        assert_eq!(Config::from_toml_str(&text, "x").expect("again"), full());
        // Every default passes its own key's checks when read back.
        let text = toml::to_string(&Config::default()).expect("serialize");
        assert_eq!(
            Config::from_toml_str(&text, "x").expect("defaults"),
            Config::default()
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err("# poolscope\n[http]\nlistn = \"127.0.0.1:1\"\n");
        assert_located(
            &e,
            "http.listn",
            3,
            "unknown field `listn`, expected one of `listen`, `max_connections`, \
             `header_read_timeout_seconds`, `idle_timeout_seconds`, `bearer_token`, \
             `bearer_token_file`",
        );
        let e = err("[kernel]\nring_buffer_bytes = 4096\n\n[htp]\n");
        assert_located(
            &e,
            "htp",
            4,
            "unknown field `htp`, expected one of `http`, `kernel`, `tracking`, `queries`, \
             `adapter`, `leaks`, `pool_health`, `sizing`, `otlp`, `metrics`, `kubernetes`, `log`",
        );
        // Inline tables and dotted keys are located just as well.
        let e = err("log = { level = \"info\", colour = true }\n");
        assert_located(
            &e,
            "log.colour",
            1,
            "unknown field `colour`, expected `level`",
        );
        let e = err("\n\ntracking.max_clsed = 3\n");
        assert_located(
            &e,
            "tracking.max_clsed",
            3,
            "unknown field `max_clsed`, expected one of `closed_retention_seconds`, \
             `max_closed`, `max_series`, `seed_from_proc`, `pod_logs_dir`, `full_command_lines`",
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        assert_located(
            &err("[kernel]\n\nring_buffer_bytes = \"big\"\n"),
            "kernel.ring_buffer_bytes",
            3,
            "invalid type: string \"big\", expected u32",
        );
        assert_located(
            &err("[http]\nlisten = \"localhost\"\n"),
            "http.listen",
            2,
            "\"localhost\" is not an IP address with a port, such as \"127.0.0.1:9464\"",
        );
        assert_located(
            &err("[tracking]\nmax_closed = -1\n"),
            "tracking.max_closed",
            2,
            "invalid value: integer `-1`, expected usize",
        );
        // Dotted keys and inline tables are located just as well.
        assert_located(
            &err("kernel.mount_tracefs = 1"),
            "kernel.mount_tracefs",
            1,
            "invalid type: integer `1`, expected a boolean",
        );
        assert_located(
            &err("\nkernel = { ring_buffer_bytes = -1 }"),
            "kernel.ring_buffer_bytes",
            2,
            "invalid value: integer `-1`, expected u32",
        );
        // A datetime where a number belongs still names the key.
        assert_located(
            &err("[tracking]\nmax_closed = 1979-05-27T07:32:00Z\n"),
            "tracking.max_closed",
            2,
            "invalid type: map, expected usize",
        );
        assert_located(
            &err("\nhttp = 5\n"),
            "http",
            2,
            "invalid type: integer `5`, expected a table, [http]",
        );
        // An element of an array written over several lines: the path
        // names the key, which the line shown does not.
        assert_located(
            &err("[adapter]\nallowed_uids = [\n  1000,\n  -2,\n]\n"),
            "adapter.allowed_uids[1]",
            4,
            "invalid value: integer `-2`, expected u32",
        );
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = err("[http]\nlisten = \n");
        assert!(
            e.starts_with(&format!(
                "config {ORIGIN}: TOML parse error at line 2, column 10\n"
            )),
            "{e}"
        );
        assert!(e.contains("2 | listen = "), "{e}");
        assert!(e.contains("invalid string"), "{e}");
        assert!(e.lines().count() <= 6, "{e}");
        let e = err("[kernel]\nmount_tracefs = true\nmount_tracefs = false\n");
        assert!(
            e.starts_with(&format!("config {ORIGIN}: TOML parse error at line 3, ")),
            "{e}"
        );
        assert!(
            e.ends_with("duplicate key `mount_tracefs` in table `kernel`"),
            "{e}"
        );
    }

    #[test]
    fn invalid_ring_buffer_size() {
        assert_located(
            &err("[log]\nlevel = \"info\"\n[kernel]\nring_buffer_bytes = 100000\n"),
            "kernel.ring_buffer_bytes",
            4,
            "100000 is not a power of two that is a multiple of 4096 (e.g. 262144, 1048576)",
        );
        // Powers of two below a page are rejected too, and zero.
        assert_located(
            &err("kernel.ring_buffer_bytes = 2048"),
            "kernel.ring_buffer_bytes",
            1,
            "2048 is not a power of two that is a multiple of 4096",
        );
        assert_located(
            &err("kernel.ring_buffer_bytes = 0"),
            "kernel.ring_buffer_bytes",
            1,
            "0 is not a power of two",
        );
        assert!(Config::from_toml_str("kernel.ring_buffer_bytes = 4096", "x").is_ok());
    }

    #[test]
    fn invalid_log_level_and_series() {
        assert_located(
            &err("[log]\n\nlevel = \"loud\"\n"),
            "log.level",
            3,
            "\"loud\" is not one of error|warn|info|debug|trace",
        );
        let c = Config::from_toml_str("[log]\nlevel = \"WARN\"\n", "x").expect("upper");
        assert_eq!(c.log.level.as_str(), "warn");
        assert_located(
            &err("[tracking]\nmax_series = 0\n"),
            "tracking.max_series",
            2,
            "0 is less than 1",
        );
        assert_located(
            &err("[tracking]\n\nclosed_retention_seconds = 18446744074\n"),
            "tracking.closed_retention_seconds",
            3,
            "18446744074 is too large (at most 18446744073.70955",
        );
    }

    #[test]
    fn other_bad_values_name_the_key_and_the_line() {
        for (text, key, line, what) in [
            (
                "[adapter]\nsocket_mode = \"0999\"\n",
                "adapter.socket_mode",
                2,
                "\"0999\" is not an octal mode like \"0666\" (at most \"0777\")",
            ),
            (
                "[adapter]\nsocket_mode = \"01777\"\n",
                "adapter.socket_mode",
                2,
                "\"01777\" is not an octal mode",
            ),
            (
                "[adapter]\nsocket_mode = 666\n",
                "adapter.socket_mode",
                2,
                "invalid type: integer `666`, expected a string",
            ),
            (
                "[queries]\ncapture_bytes = 8\n",
                "queries.capture_bytes",
                2,
                "8 is not between 16 and 4096",
            ),
            (
                "[queries]\nredis_capture_bytes = 8192\n",
                "queries.redis_capture_bytes",
                2,
                "8192 is not between 16 and 4096",
            ),
            (
                "[kubernetes]\napi = \"on\"\n",
                "kubernetes.api",
                2,
                "unknown variant `on`, expected `auto` or `off`",
            ),
            (
                "[otlp]\nprotocol = \"udp\"\n",
                "otlp.protocol",
                2,
                "\"udp\" is not grpc or http/protobuf",
            ),
            (
                "[otlp]\nmax_queued_events = 0\n",
                "otlp.max_queued_events",
                2,
                "0 is less than 1",
            ),
            (
                "[http]\nmax_connections = 1000001\n",
                "http.max_connections",
                2,
                "1000001 is not between 1 and 1000000",
            ),
            (
                "[kernel]\ndata_path = \"fast\"\n",
                "kernel.data_path",
                2,
                "unknown variant `fast`, expected one of `auto`, `socket`, `syscalls`",
            ),
        ] {
            assert_located(&err(text), key, line, what);
        }
        let c = Config::from_toml_str(
            "adapter.socket_mode = \"0o640\"\notlp.protocol = \"http\"\n",
            "x",
        )
        .expect("other spellings");
        assert_eq!(c.adapter.mode(), 0o640);
        assert_eq!(
            c.otlp.protocol.0,
            Some(crate::telemetry::otlp::Protocol::HttpProtobuf)
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
        assert_eq!(c.kernel.ring_buffer_bytes.get(), 1 << 22);
        assert_eq!(c.log.level.as_str(), "trace");
        assert!(c.kernel.probe_stats);
        assert_eq!(c.kernel.data_path, DataPath::Socket);
        assert_eq!(c.tracking, full().tracking);

        let e = c
            .apply(&Overrides {
                ring_buffer_bytes: Some(5000),
                ..Overrides::default()
            })
            .expect_err("bad override");
        assert_eq!(
            e.to_string(),
            "bad value for --ring-buffer-bytes (key `kernel.ring_buffer_bytes`): 5000 is not \
             a power of two that is a multiple of 4096 (e.g. 262144, 1048576)"
        );
        let e = c
            .apply(&Overrides {
                log_level: Some("chatty".to_owned()),
                ..Overrides::default()
            })
            .expect_err("bad level");
        assert_eq!(
            e.to_string(),
            "bad value for --log-level (key `log.level`): \"chatty\" is not one of \
             error|warn|info|debug|trace"
        );
        // Failed overrides leave the configuration as it was.
        assert_eq!(c.kernel.ring_buffer_bytes.get(), 1 << 22);
        assert_eq!(c.log.level.as_str(), "trace");
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
                "config {}: key `http.bogus`: TOML parse error at line 3, column 1\n",
                path.display()
            )),
            "{e}"
        );
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn a_slow_threshold_that_overflows_nanoseconds_is_refused() {
        assert_located(
            &err("[queries]\nslow_threshold_ms = 18446744073710\n"),
            "queries.slow_threshold_ms",
            2,
            "18446744073710 is too large (at most 18446744073709.55",
        );
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
        let c = parse("[http]\nbearer_token = \" t0k\"\n").expect("inline");
        assert_eq!(c.http.bearer_token(), Ok(Some("t0k".to_owned())));
        assert!(!format!("{c:?}").contains("t0k"), "Debug shows the token");
        assert_eq!(Config::default().http.bearer_token(), Ok(None));

        let both = format!(
            "[http]\nbearer_token = \"a\"\nbearer_token_file = {:?}\n",
            good.display().to_string()
        );
        // Keys checked against each other or a file: the key, no line.
        for (text, key, why) in [
            (both, "bearer_token", "not both"),
            (
                format!(
                    "[http]\nbearer_token_file = {:?}\n",
                    blank.display().to_string()
                ),
                "bearer_token_file",
                "the token is empty",
            ),
            (
                format!(
                    "[http]\nbearer_token_file = {:?}\n",
                    missing.display().to_string()
                ),
                "bearer_token_file",
                "cannot read",
            ),
        ] {
            let e = format!("{:#}", parse(&text).expect_err(&text));
            assert!(
                e.starts_with(&format!("config x: key `http.{key}`: ")),
                "{e}"
            );
            assert!(e.contains(why), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        // One key's own value: the key and its line.
        for (text, key, why) in [
            (
                "[http]\nbearer_token = \"\"\n",
                "http.bearer_token",
                "the token is empty",
            ),
            (
                "[http]\nbearer_token = \"a b\"\n",
                "http.bearer_token",
                "the token must be printable ASCII without spaces",
            ),
            (
                "[http]\nmax_connections = 0\n",
                "http.max_connections",
                "0 is not between 1 and 1000000",
            ),
            (
                "[http]\nheader_read_timeout_seconds = 0.0\n",
                "http.header_read_timeout_seconds",
                "0 is not between 0.1 and 3600 seconds",
            ),
        ] {
            assert_located(&err(text), key, 2, why);
        }
    }

    #[test]
    fn the_two_adapter_sockets_need_paths_of_their_own() {
        let parse = |text: &str| Config::from_toml_str(text, "x");
        let e = format!(
            "{:#}",
            parse("[adapter]\nsocket = \"/tmp/a.sock\"\nstream_socket = \"/tmp/a.sock\"\n")
                .expect_err("same path")
        );
        assert!(
            e.starts_with("config x: key `adapter.stream_socket`: /tmp/a.sock is also"),
            "{e}"
        );
        assert!(parse("[adapter]\nsocket = \"/tmp/a.sock\"\n").is_ok());
    }

    #[test]
    fn sizing_needs_a_window_it_can_observe() {
        let parse = |text: &str| Config::from_toml_str(text, "x");
        let e = format!(
            "{:#}",
            parse("[sizing]\nwindow_seconds = 60\nmin_observed_seconds = 120\n")
                .expect_err("120 s within 60 s")
        );
        assert!(
            e.starts_with(
                "config x: key `sizing.min_observed_seconds`: 120s is longer than \
                 `sizing.window_seconds` (60s)"
            ),
            "{e}"
        );
        assert!(parse("[sizing]\nwindow_seconds = 60\nmin_observed_seconds = 60\n").is_ok());
        let e = err("[sizing]\nsample_seconds = 0.5\n");
        assert_located(&e, "sizing.sample_seconds", 2, "0.5");
    }

    #[test]
    fn pool_health_warns_before_it_is_critical() {
        let parse = |text: &str| Config::from_toml_str(text, "x");
        let e = format!(
            "{:#}",
            parse("[pool_health]\nwarning_utilization_percent = 95\n").expect_err("95 > 90")
        );
        assert!(
            e.starts_with(
                "config x: key `pool_health.warning_utilization_percent`: 95 is above \
                 `pool_health.critical_utilization_percent` (90)"
            ),
            "{e}"
        );
        assert!(parse("[pool_health]\nwarning_utilization_percent = 90\n").is_ok());
        let e = err("[pool_health]\ncritical_utilization_percent = 101\n");
        assert_located(
            &e,
            "pool_health.critical_utilization_percent",
            2,
            "101 is not between 1 and 100",
        );
    }
}
