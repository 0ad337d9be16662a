//! `[otlp]`: OTLP push, beside the standard OTEL_* variables.

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use super::{OtlpSettings, Protocol};
use crate::config_types::{Bounded, Seconds, SECOND};

/// An export's interval or timeout: from a tenth of a second to a day.
pub type ExportPeriod = Seconds<{ SECOND / 10 }, { 86_400 * SECOND }>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [otlp]")]
pub struct OtlpConfig {
    /// Collector address, e.g. `http://otel-collector:4317` (gRPC) or
    /// `http://otel-collector:4318` (HTTP). Empty: OTEL_EXPORTER_OTLP_ENDPOINT,
    /// and without it no OTLP export.
    pub endpoint: String,
    /// `grpc` or `http/protobuf`. Empty: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc.
    pub protocol: ProtocolKey,
    /// Metric export interval.
    pub interval_seconds: ExportPeriod,
    /// Per-request timeout (the exporter retries with backoff within it).
    pub timeout_seconds: ExportPeriod,
    /// Events (log records) waiting for export, at most; more are dropped
    /// and counted in poolscope.export.dropped.
    pub max_queued_events: Bounded<usize, 1>,
    /// Send each query round trip as a client span.
    pub query_spans: bool,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: ProtocolKey(None),
            interval_seconds: ExportPeriod::new(10),
            timeout_seconds: ExportPeriod::new(10),
            max_queued_events: Bounded::new(10_000),
            query_spans: false,
        }
    }
}

/// `[otlp] protocol`: a [`Protocol`], or empty (`None`) to leave it to
/// OTEL_EXPORTER_OTLP_PROTOCOL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProtocolKey(pub Option<Protocol>);

impl TryFrom<String> for ProtocolKey {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(ProtocolKey(None));
        }
        Protocol::parse(&text)
            .map(|p| ProtocolKey(Some(p)))
            .ok_or_else(|| format!("{text:?} is not grpc or http/protobuf"))
    }
}

impl From<ProtocolKey> for String {
    fn from(key: ProtocolKey) -> String {
        key.0.map_or("", Protocol::name).to_owned()
    }
}

impl OtlpConfig {
    /// The settings in force, from this section and the standard OTEL_*
    /// variables; `None` when no endpoint is configured anywhere.
    pub fn settings(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<OtlpSettings>> {
        let endpoint = if self.endpoint.is_empty() {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
        } else {
            self.endpoint.clone()
        };
        if endpoint.is_empty() {
            return Ok(None);
        }
        let protocol = match self.protocol.0 {
            Some(protocol) => protocol,
            None => {
                let text = env("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "grpc".into());
                Protocol::parse(&text).ok_or_else(|| {
                    anyhow!("OTLP protocol {text:?} is not supported: use grpc or http/protobuf")
                })?
            }
        };
        Ok(Some(OtlpSettings {
            endpoint,
            protocol,
            interval: self.interval_seconds.get(),
            timeout: self.timeout_seconds.get(),
            max_queued_events: self.max_queued_events.get(),
            query_spans: self.query_spans,
        }))
    }
}
