//! `[queries]`: what is copied of each request and response, what is kept
//! of query text, and which round trips are reported as slow.

use serde::{Deserialize, Serialize};

use crate::config_types::{Bounded, Millis};

/// Bytes copied from the start of each read/write: 16 to the kernel's most.
pub type CaptureBytes = Bounded<u32, 16, { agent_common::HEAD_MAX as u64 }>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [queries]")]
pub struct QueriesConfig {
    /// Bytes copied from the start of each read/write on a PostgreSQL or
    /// MySQL socket; longer statements are cut there, and the end of a
    /// longer response is found from its last 64 bytes.
    pub capture_bytes: CaptureBytes,
    /// The same for Redis, where a pipeline's commands must all be seen to
    /// be counted: a write of many commands is cut after this many bytes.
    pub redis_capture_bytes: CaptureBytes,
    /// Round trips slower than this are reported as slow queries.
    pub slow_threshold_ms: Millis,
    /// Keep query text as sent. Off by default: literals become `?`, since
    /// they may hold personal data.
    pub raw_text: bool,
    /// Slow-query reports kept in memory.
    pub max_slow_kept: usize,
}

impl Default for QueriesConfig {
    fn default() -> Self {
        Self {
            capture_bytes: CaptureBytes::new(256),
            redis_capture_bytes: CaptureBytes::new(4096),
            slow_threshold_ms: Millis::new(500),
            raw_text: false,
            max_slow_kept: 1000,
        }
    }
}
