//! `[tracking]`: how long connections are kept, and what is shown of the
//! processes that hold them.

use serde::{Deserialize, Serialize};

use crate::config_types::{Bounded, Seconds};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [tracking]")]
pub struct TrackingConfig {
    /// How long closed connections stay visible in the API.
    pub closed_retention_seconds: Seconds,
    /// At most this many closed connections are kept.
    pub max_closed: usize,
    /// Cardinality bound for per-process/server metric series; zero would
    /// silently drop every per-process metric.
    pub max_series: Bounded<usize, 1>,
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
    /// Observed processes whose telemetry goes out under a resource of its
    /// own (`service.name`...); the rest share `service.name=_other`.
    pub max_applications: Bounded<usize, 1>,
    /// Put each process's arguments (`process.command_args`, redacted
    /// unless `full_command_lines`) on its resource. Off by default: long
    /// and rarely needed to tell applications apart.
    pub resource_command_args: bool,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        Self {
            closed_retention_seconds: Seconds::new(300),
            max_closed: 4096,
            max_series: Bounded::new(2000),
            seed_from_proc: true,
            full_command_lines: false,
            pod_logs_dir: "/var/log/pods".into(),
            max_applications: Bounded::new(256),
            resource_command_args: false,
        }
    }
}
