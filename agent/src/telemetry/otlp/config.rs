//! `[otlp]`: OTLP push, from this section and the standard OTEL_* variables
//! of the OTLP exporter specification, the variables winning over the file
//! (docs/otlp.md lists every key and variable).
//!
//! Everything is resolved here, once, into explicit [`OtlpSettings`] that
//! the builders pass on whole, so that the exporter library's own reading of
//! the environment cannot disagree with what the agent logs and checks.

use std::{collections::BTreeMap, fmt, path::Path, time::Duration};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::{ClientIdentity, Compression, OtlpSettings, Protocol, Signal, SignalSettings, Tls};
use crate::{
    config_types::{Bounded, Seconds, SECOND},
    otel_env::BadEntry,
};

/// An export's interval or timeout: from a tenth of a second to a day.
pub type ExportPeriod = Seconds<{ SECOND / 10 }, { 86_400 * SECOND }>;

/// The bounds of [`ExportPeriod`], for the variables given in milliseconds.
const PERIOD_MS: std::ops::RangeInclusive<u64> = 100..=86_400_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [otlp]")]
pub struct OtlpConfig {
    /// Collector base address, e.g. `http://otel-collector:4317` (gRPC) or
    /// `http://otel-collector:4318` (HTTP, `/v1/<signal>` appended).
    /// OTLP export is on when an endpoint is set here or in a variable.
    pub endpoint: String,
    /// One signal's full address (HTTP: used as written, no path appended).
    pub metrics_endpoint: String,
    pub logs_endpoint: String,
    pub traces_endpoint: String,
    /// `grpc` or `http/protobuf`; empty: grpc.
    pub protocol: ProtocolKey,
    /// Sent with every export request (gRPC metadata or HTTP headers).
    pub headers: Headers,
    /// `gzip` or `none`; empty: none.
    pub compression: CompressionKey,
    /// PEM file of the CA that signs the collector's certificate (https
    /// endpoints); empty: the system's trust store.
    pub certificate: String,
    /// PEM files of the agent's client certificate and key, for collectors
    /// that ask for one (mutual TLS); both or neither.
    pub client_certificate: String,
    pub client_key: String,
    /// gRPC endpoints written without a scheme: plain `http://` when true,
    /// else `https://`.
    pub insecure: bool,
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
            metrics_endpoint: String::new(),
            logs_endpoint: String::new(),
            traces_endpoint: String::new(),
            protocol: OrUnset(None),
            headers: Headers::default(),
            compression: OrUnset(None),
            certificate: String::new(),
            client_certificate: String::new(),
            client_key: String::new(),
            insecure: false,
            interval_seconds: ExportPeriod::new(10),
            timeout_seconds: ExportPeriod::new(10),
            max_queued_events: Bounded::new(10_000),
            query_spans: false,
        }
    }
}

/// A value that a key spells by name, or leaves empty.
pub trait Spelled: Copy {
    /// What the key takes, for errors.
    const EXPECTED: &'static str;
    fn parse(text: &str) -> Option<Self>;
    fn name(self) -> &'static str;
}

impl Spelled for Protocol {
    const EXPECTED: &'static str = "grpc or http/protobuf";
    fn parse(text: &str) -> Option<Self> {
        Protocol::parse(text)
    }
    fn name(self) -> &'static str {
        Protocol::name(self)
    }
}

impl Spelled for Compression {
    const EXPECTED: &'static str = "gzip or none";
    fn parse(text: &str) -> Option<Self> {
        Compression::parse(text)
    }
    fn name(self) -> &'static str {
        Compression::name(self)
    }
}

/// A key's value, or empty (`None`): the variables or the default decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
// Read and written as a string, so the value's own serde is not needed.
#[serde(try_from = "String", into = "String", bound = "")]
pub struct OrUnset<T: Spelled>(pub Option<T>);

impl<T: Spelled> TryFrom<String> for OrUnset<T> {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(OrUnset(None));
        }
        T::parse(&text)
            .map(|value| OrUnset(Some(value)))
            .ok_or_else(|| format!("{text:?} is not {}", T::EXPECTED))
    }
}

impl<T: Spelled> From<OrUnset<T>> for String {
    fn from(key: OrUnset<T>) -> String {
        key.0.map_or("", T::name).to_owned()
    }
}

/// `[otlp] protocol`: grpc unless a variable says otherwise when empty.
pub type ProtocolKey = OrUnset<Protocol>;
/// `[otlp] compression`: none unless a variable says otherwise when empty.
pub type CompressionKey = OrUnset<Compression>;

/// `[otlp] headers`: a table of header names and values, checked when the
/// file is read. Debug output shows the names only: values are credentials.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    /// Names lowercased, as gRPC metadata requires (HTTP ignores case).
    fn normalized(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl TryFrom<BTreeMap<String, String>> for Headers {
    type Error = String;

    fn try_from(table: BTreeMap<String, String>) -> Result<Self, String> {
        for (name, value) in &table {
            check_header(name, value).map_err(|why| format!("header {name:?}: {why}"))?;
        }
        Ok(Headers(table))
    }
}

impl From<Headers> for BTreeMap<String, String> {
    fn from(headers: Headers) -> Self {
        headers.0
    }
}

/// Whether `name: value` can be sent both as an HTTP header and as gRPC
/// metadata; why not otherwise. The value is never quoted: it may be a
/// credential.
fn check_header(name: &str, value: &str) -> Result<(), String> {
    const TOKEN_PUNCTUATION: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if let Some(bad) = name
        .bytes()
        .find(|b| !b.is_ascii_alphanumeric() && !TOKEN_PUNCTUATION.contains(b))
    {
        return Err(format!(
            "the name has {:?}, which a header name cannot hold",
            char::from(bad)
        ));
    }
    if value.is_empty() {
        return Err("the value is empty".into());
    }
    // gRPC metadata values are printable ASCII; HTTP allows no control
    // characters either.
    if !value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return Err(
            "the value holds a control or non-ASCII character (percent-encode it in the \
             variable; in the file, only printable ASCII)"
                .into(),
        );
    }
    Ok(())
}

/// Where a setting came from, for errors and the start-up log: a variable's
/// name or a config key.
fn key(name: &str) -> String {
    format!("[otlp] {name}")
}

/// `OTEL_EXPORTER_OTLP_{KEY}` or, for a signal, `OTEL_EXPORTER_OTLP_{SIGNAL}_{KEY}`.
fn variable(signal: Option<Signal>, name: &str) -> String {
    match signal {
        Some(signal) => format!("OTEL_EXPORTER_OTLP_{}_{name}", signal.variable_infix()),
        None => format!("OTEL_EXPORTER_OTLP_{name}"),
    }
}

/// Reads the configuration layers: the environment, then the file.
struct Layers<'a> {
    config: &'a OtlpConfig,
    env: &'a dyn Fn(&str) -> Option<String>,
    read: &'a dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
}

impl Layers<'_> {
    /// A variable's value; empty counts as unset, as the specification says.
    fn var(&self, name: &str) -> Option<(String, String)> {
        (self.env)(name)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (v.trim().to_owned(), name.to_owned()))
    }

    /// The signal's own variable, else the generic one: (value, name).
    fn signal_var(&self, signal: Signal, name: &str) -> Option<(String, String)> {
        self.var(&variable(Some(signal), name))
            .or_else(|| self.var(&variable(None, name)))
    }

    /// A file's bytes, checked to hold `what` (a PEM label) at all, so that
    /// a wrong file fails at start rather than at the first connection.
    fn pem(&self, path: &str, from: &str, label: &str) -> Result<Vec<u8>> {
        let bytes =
            (self.read)(Path::new(path)).map_err(|e| anyhow!("{from}: cannot read {path}: {e}"))?;
        let text = String::from_utf8_lossy(&bytes);
        if !text.contains("-----BEGIN ") || !text.contains(&format!("{label}-----")) {
            bail!("{from}: {path} holds no PEM {label} (-----BEGIN ...{label}-----)");
        }
        Ok(bytes)
    }

    /// A variable, else the config key (empty: unset): (value, source).
    fn signal_var_or_key(
        &self,
        signal: Signal,
        name: &str,
        file_key: &str,
        file_value: &str,
    ) -> Option<(String, String)> {
        self.signal_var(signal, name)
            .or_else(|| (!file_value.is_empty()).then(|| (file_value.to_owned(), key(file_key))))
    }

    fn signal(&self, signal: Signal) -> Result<SignalSettings> {
        let config = self.config;
        let protocol = match self.signal_var(signal, "PROTOCOL") {
            Some((text, from)) => Protocol::parse(&text).ok_or_else(|| {
                anyhow!("{from}={text:?} is not supported: use grpc or http/protobuf")
            })?,
            None => config.protocol.0.unwrap_or(Protocol::Grpc),
        };
        let insecure = match self.signal_var(signal, "INSECURE") {
            Some((text, from)) => {
                parse_bool(&text).ok_or_else(|| anyhow!("{from}={text:?} is not true or false"))?
            }
            None => config.insecure,
        };

        // The environment is a layer over the file: any endpoint variable
        // wins over any endpoint key; within a layer the signal's own wins.
        // A signal's own endpoint is used as written, a base one gets the
        // signal's path (HTTP).
        let file_signal_endpoint = match signal {
            Signal::Metrics => &config.metrics_endpoint,
            Signal::Logs => &config.logs_endpoint,
            Signal::Traces => &config.traces_endpoint,
        };
        let (raw, endpoint_from, own) =
            if let Some((v, n)) = self.var(&variable(Some(signal), "ENDPOINT")) {
                (v, n, true)
            } else if let Some((v, n)) = self.var(&variable(None, "ENDPOINT")) {
                (v, n, false)
            } else if !file_signal_endpoint.is_empty() {
                (
                    file_signal_endpoint.clone(),
                    key(&format!("{}_endpoint", signal.name())),
                    true,
                )
            } else if !config.endpoint.is_empty() {
                (config.endpoint.clone(), key("endpoint"), false)
            } else {
                (
                    protocol.default_endpoint().to_owned(),
                    "default".into(),
                    false,
                )
            };
        let endpoint = endpoint_url(&raw, &endpoint_from, protocol, insecure, own, signal)?;

        let headers = match self.signal_var(signal, "HEADERS") {
            Some((text, from)) => parse_headers(&text, &from)?,
            None => config.headers.normalized(),
        };
        let timeout = match self.signal_var(signal, "TIMEOUT") {
            Some((text, from)) => parse_ms(&text, &from)?,
            None => config.timeout_seconds.get(),
        };
        let compression = match self.signal_var(signal, "COMPRESSION") {
            Some((text, from)) => Compression::parse(&text)
                .ok_or_else(|| anyhow!("{from}={text:?} is not supported: use gzip or none"))?,
            None => config.compression.0.unwrap_or(Compression::None),
        };

        let ca = self
            .signal_var_or_key(signal, "CERTIFICATE", "certificate", &config.certificate)
            .map(|(path, from)| self.pem(&path, &from, "CERTIFICATE"))
            .transpose()?;
        let cert = self.signal_var_or_key(
            signal,
            "CLIENT_CERTIFICATE",
            "client_certificate",
            &config.client_certificate,
        );
        let key_file =
            self.signal_var_or_key(signal, "CLIENT_KEY", "client_key", &config.client_key);
        let client = match (cert, key_file) {
            (None, None) => None,
            (Some((cert, cert_from)), Some((key_path, key_from))) => Some(ClientIdentity {
                cert_pem: self.pem(&cert, &cert_from, "CERTIFICATE")?,
                key_pem: self.pem(&key_path, &key_from, "PRIVATE KEY")?,
            }),
            (Some((_, from)), None) => bail!(
                "{from} is set but no client key is ({} or [otlp] client_key)",
                variable(None, "CLIENT_KEY")
            ),
            (None, Some((_, from))) => bail!(
                "{from} is set but no client certificate is ({} or [otlp] client_certificate)",
                variable(None, "CLIENT_CERTIFICATE")
            ),
        };

        Ok(SignalSettings {
            protocol,
            endpoint,
            endpoint_from,
            headers,
            timeout,
            compression,
            tls: Tls { ca_pem: ca, client },
        })
    }

    /// Whether any endpoint is set anywhere: OTLP export is off otherwise.
    fn any_endpoint(&self) -> bool {
        let config = self.config;
        let variables = [
            variable(None, "ENDPOINT"),
            variable(Some(Signal::Metrics), "ENDPOINT"),
            variable(Some(Signal::Logs), "ENDPOINT"),
            variable(Some(Signal::Traces), "ENDPOINT"),
        ];
        variables.iter().any(|name| self.var(name).is_some())
            || [
                &config.endpoint,
                &config.metrics_endpoint,
                &config.logs_endpoint,
                &config.traces_endpoint,
            ]
            .iter()
            .any(|e| !e.is_empty())
    }
}

/// The URL a signal's requests go to: a gRPC endpoint without a scheme gets
/// one from `insecure`; an HTTP base endpoint gets the signal's path.
fn endpoint_url(
    raw: &str,
    from: &str,
    protocol: Protocol,
    insecure: bool,
    own: bool,
    signal: Signal,
) -> Result<String> {
    let scheme = raw.split_once("://").map(|(scheme, _)| scheme);
    let url = match (scheme, protocol) {
        (Some("http" | "https"), _) => raw.to_owned(),
        (None, Protocol::Grpc) => {
            let scheme = if insecure { "http" } else { "https" };
            format!("{scheme}://{raw}")
        }
        (Some(other), _) => bail!("{from}={raw:?}: the scheme {other:?} is not http or https"),
        (None, Protocol::HttpProtobuf) => {
            bail!("{from}={raw:?} needs a scheme for http/protobuf: http:// or https://")
        }
    };
    if url
        .split_once("://")
        .is_some_and(|(_, rest)| rest.is_empty())
    {
        bail!("{from}={raw:?} names no host");
    }
    Ok(match protocol {
        Protocol::HttpProtobuf if !own => {
            format!("{}{}", url.trim_end_matches('/'), signal.http_path())
        }
        _ => url,
    })
}

/// `true`/`false` in any case, as the specification's boolean variables.
fn parse_bool(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// A whole number of milliseconds within [`PERIOD_MS`].
fn parse_ms(text: &str, from: &str) -> Result<Duration> {
    let ms: u64 = text
        .parse()
        .map_err(|_| anyhow!("{from}={text:?} is not a whole number of milliseconds"))?;
    if !PERIOD_MS.contains(&ms) {
        bail!(
            "{from}={ms} is not between {} and {} milliseconds",
            PERIOD_MS.start(),
            PERIOD_MS.end()
        );
    }
    Ok(Duration::from_millis(ms))
}

/// `key=value,key2=value2` with URL-encoded values (the W3C baggage form the
/// specification uses), names lowercased. Errors name the entry by its
/// position and never show a value: it may be a credential.
fn parse_headers(text: &str, from: &str) -> Result<BTreeMap<String, String>> {
    let mut headers = BTreeMap::new();
    for (position, entry) in crate::otel_env::entries(text) {
        let (name, value) = entry.map_err(|bad| match bad {
            BadEntry::NoEquals => {
                anyhow!("{from}: entry {position} has no `=` (the form is key=value,key2=value2)")
            }
            BadEntry::BadEscape(name) => {
                anyhow!("{from}: entry {position} ({name:?}): the value has a bad %-escape")
            }
        })?;
        check_header(name, &value)
            .map_err(|why| anyhow!("{from}: entry {position} ({name:?}): {why}"))?;
        headers.insert(name.to_ascii_lowercase(), value);
    }
    Ok(headers)
}

impl OtlpConfig {
    /// The settings in force, from this section and the process's
    /// environment, reading certificate files; `None` when no endpoint is
    /// configured anywhere.
    pub fn settings(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<OtlpSettings>> {
        self.resolve(env, &|path| std::fs::read(path))
    }

    /// As [`OtlpConfig::settings`], with the environment and the file
    /// system given: the one place every OTLP setting is decided.
    pub fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Option<OtlpSettings>> {
        let layers = Layers {
            config: self,
            env,
            read,
        };
        if !layers.any_endpoint() {
            return Ok(None);
        }
        let interval = match layers.var("OTEL_METRIC_EXPORT_INTERVAL") {
            Some((text, from)) => parse_ms(&text, &from)?,
            None => self.interval_seconds.get(),
        };
        let mut metrics = layers.signal(Signal::Metrics)?;
        // Both bound one metric export; the exporter's timeout covers its
        // retries, so the smaller one is the export's limit.
        if let Some((text, from)) = layers.var("OTEL_METRIC_EXPORT_TIMEOUT") {
            metrics.timeout = metrics.timeout.min(parse_ms(&text, &from)?);
        }
        Ok(Some(OtlpSettings {
            endpoint: metrics.endpoint.clone(),
            protocol: metrics.protocol,
            metrics,
            logs: layers.signal(Signal::Logs)?,
            traces: layers.signal(Signal::Traces)?,
            interval,
            max_queued_events: self.max_queued_events.get(),
            query_spans: self.query_spans,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

    /// Resolves `config` with `vars` as the environment and a file system of
    /// `/ca.pem`, `/client.pem`, `/client.key` and `/not-pem.txt`.
    fn resolve(config: &OtlpConfig, vars: &[(&str, &str)]) -> Result<Option<OtlpSettings>> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let files: HashMap<&str, &str> = [
            ("/ca.pem", CA),
            ("/client.pem", CA),
            ("/client.key", KEY),
            ("/not-pem.txt", "hello"),
        ]
        .into();
        config.resolve(&|name| env.get(name).cloned(), &|path| {
            files
                .get(path.to_str().unwrap_or_default())
                .map(|text| text.as_bytes().to_vec())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        })
    }

    fn settings(config: &OtlpConfig, vars: &[(&str, &str)]) -> OtlpSettings {
        resolve(config, vars)
            .unwrap_or_else(|e| panic!("{e:#}"))
            .expect("an endpoint is set")
    }

    fn error(config: &OtlpConfig, vars: &[(&str, &str)]) -> String {
        match resolve(config, vars) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn file(toml_text: &str) -> OtlpConfig {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn no_endpoint_anywhere_means_no_export() {
        let config = OtlpConfig::default();
        assert!(resolve(&config, &[]).expect("resolves").is_none());
        // Empty counts as unset (the DaemonSet ships the variable empty).
        let empty = [("OTEL_EXPORTER_OTLP_ENDPOINT", "")];
        assert!(resolve(&config, &empty).expect("resolves").is_none());
        // Other variables alone do not turn export on.
        let other = [("OTEL_EXPORTER_OTLP_HEADERS", "a=b")];
        assert!(resolve(&config, &other).expect("resolves").is_none());
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let config = file(
            "endpoint = \"http://file:4318\"\nprotocol = \"grpc\"\ntimeout_seconds = 3.0\n\
             compression = \"none\"\nheaders = { x-api-key = \"from-file\" }\n",
        );
        let s = settings(
            &config,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=from-env"),
            ],
        );
        assert_eq!(s.metrics.endpoint, "http://env:4318/v1/metrics");
        assert_eq!(s.metrics.endpoint_from, "OTEL_EXPORTER_OTLP_ENDPOINT");
        assert_eq!(s.logs.endpoint, "http://env:4318/v1/logs");
        assert_eq!(s.traces.endpoint, "http://env:4318/v1/traces");
        assert_eq!(s.metrics.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.logs.timeout, Duration::from_millis(2500));
        assert_eq!(s.logs.compression, Compression::Gzip);
        assert_eq!(s.logs.headers["x-api-key"], "from-env");
        // Without the variables, the file's values.
        let s = settings(&config, &[]);
        assert_eq!(s.metrics.endpoint, "http://file:4318");
        assert_eq!(s.metrics.endpoint_from, "[otlp] endpoint");
        assert_eq!(s.metrics.protocol, Protocol::Grpc);
        assert_eq!(s.metrics.timeout, Duration::from_secs(3));
        assert_eq!(s.metrics.compression, Compression::None);
        assert_eq!(s.metrics.headers["x-api-key"], "from-file");
    }

    #[test]
    fn a_signals_own_variables_win_over_the_generic_ones() {
        let s = settings(
            &OtlpConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4318/otlp/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                (
                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                    "http://m:9000/custom",
                ),
                ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "logs:4317"),
                ("OTEL_EXPORTER_OTLP_LOGS_INSECURE", "TRUE"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
                ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "2000"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
            ],
        );
        // A signal's own HTTP endpoint is used as written; the base one
        // gets the signal's path after its own.
        assert_eq!(s.metrics.endpoint, "http://m:9000/custom");
        assert_eq!(
            s.metrics.endpoint_from,
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
        );
        assert_eq!(s.traces.endpoint, "http://base:4318/otlp/v1/traces");
        // Logs: gRPC, a schemeless endpoint made plain by INSECURE.
        assert_eq!(s.logs.protocol, Protocol::Grpc);
        assert_eq!(s.logs.endpoint, "http://logs:4317");
        assert_eq!(
            s.metrics.headers,
            BTreeMap::from([("a".into(), "1".into())])
        );
        assert_eq!(s.traces.headers, BTreeMap::from([("b".into(), "2".into())]));
        assert_eq!(s.metrics.timeout, Duration::from_secs(2));
        assert_eq!(s.logs.timeout, Duration::from_secs(1));
        assert_eq!(s.metrics.compression, Compression::Gzip);
        assert_eq!(s.traces.compression, Compression::None);
    }

    #[test]
    fn any_endpoint_variable_wins_over_any_endpoint_key() {
        let config =
            file("endpoint = \"http://file:4317\"\nlogs_endpoint = \"http://file-logs:4317\"\n");
        let s = settings(&config, &[]);
        assert_eq!(s.metrics.endpoint, "http://file:4317");
        assert_eq!(s.logs.endpoint, "http://file-logs:4317");
        assert_eq!(s.logs.endpoint_from, "[otlp] logs_endpoint");
        let s = settings(
            &config,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")],
        );
        assert_eq!(s.logs.endpoint, "http://env:4317");
        // A signal's own endpoint alone turns export on; the others take
        // the specification's default.
        let s = settings(
            &OtlpConfig::default(),
            &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "https://m:4317")],
        );
        assert_eq!(s.metrics.endpoint, "https://m:4317");
        assert_eq!(s.logs.endpoint, "http://localhost:4317");
        assert_eq!(s.logs.endpoint_from, "default");
        let http = file("protocol = \"http/protobuf\"\nmetrics_endpoint = \"http://m:4318/x\"\n");
        assert_eq!(
            settings(&http, &[]).logs.endpoint,
            "http://localhost:4318/v1/logs"
        );
    }

    #[test]
    fn grpc_endpoints_without_a_scheme_are_tls_unless_insecure() {
        let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")];
        assert_eq!(
            settings(&OtlpConfig::default(), &vars).metrics.endpoint,
            "https://collector:4317"
        );
        let insecure = file("insecure = true\n");
        assert_eq!(
            settings(&insecure, &vars).metrics.endpoint,
            "http://collector:4317"
        );
        let overridden = [vars[0], ("OTEL_EXPORTER_OTLP_INSECURE", "false")];
        assert_eq!(
            settings(&insecure, &overridden).metrics.endpoint,
            "https://collector:4317"
        );
        // A scheme is kept whatever INSECURE says.
        let with_scheme = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ];
        assert_eq!(
            settings(&OtlpConfig::default(), &with_scheme)
                .metrics
                .endpoint,
            "https://c:4317"
        );
    }

    #[test]
    fn headers_are_url_decoded_and_lowercased() {
        let s = settings(
            &OtlpConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    " Authorization=Basic%20dXNlcjpwYXNz%3D%3D , X-Scope-OrgID=tenant+1,,",
                ),
            ],
        );
        assert_eq!(
            s.metrics.headers,
            BTreeMap::from([
                ("authorization".into(), "Basic dXNlcjpwYXNz==".into()),
                ("x-scope-orgid".into(), "tenant+1".into()),
            ])
        );
    }

    #[test]
    fn metric_interval_and_export_timeout_come_from_their_variables() {
        let config = file("endpoint = \"http://c:4317\"\ninterval_seconds = 30.0\n");
        assert_eq!(settings(&config, &[]).interval, Duration::from_secs(30));
        let s = settings(
            &config,
            &[
                ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
                ("OTEL_METRIC_EXPORT_TIMEOUT", "4000"),
            ],
        );
        assert_eq!(s.interval, Duration::from_millis(500));
        // The smaller of the metric export timeout and the exporter's.
        assert_eq!(s.metrics.timeout, Duration::from_secs(4));
        assert_eq!(s.logs.timeout, Duration::from_secs(10));
    }

    #[test]
    fn certificates_are_read_at_start() {
        let s = settings(
            &OtlpConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/client.pem"),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/client.key"),
            ],
        );
        assert_eq!(s.metrics.tls.ca_pem.as_deref(), Some(CA.as_bytes()));
        let client = s.logs.tls.client.expect("a client identity");
        assert_eq!(client.key_pem, KEY.as_bytes());
        let from_file = file(
            "endpoint = \"https://c:4317\"\ncertificate = \"/ca.pem\"\n\
             client_certificate = \"/client.pem\"\nclient_key = \"/client.key\"\n",
        );
        let s = settings(&from_file, &[]);
        assert!(s.traces.tls.ca_pem.is_some() && s.traces.tls.client.is_some());
    }

    #[test]
    fn bad_values_are_errors_that_name_their_variable_or_key() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
                "OTEL_EXPORTER_OTLP_COMPRESSION=\"zstd\" is not supported: use gzip or none",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "10s")],
                "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT=\"10s\" is not a whole number of milliseconds",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")],
                "OTEL_EXPORTER_OTLP_TIMEOUT=0 is not between 100 and 86400000 milliseconds",
            ),
            (
                &[("OTEL_METRIC_EXPORT_INTERVAL", "fast")],
                "OTEL_METRIC_EXPORT_INTERVAL=\"fast\" is not a whole number of milliseconds",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_HEADERS", "a=1,secret")],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 2 has no `=`",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_HEADERS", "a b=1")],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 1 (\"a b\"): the name has ' '",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_HEADERS", "a=%zz")],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 1 (\"a\"): the value has a bad %-escape",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_HEADERS", "a=x%0Ay")],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 1 (\"a\"): the value holds a control",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\" is not supported",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_INSECURE", "yes")],
                "OTEL_EXPORTER_OTLP_INSECURE=\"yes\" is not true or false",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/missing.pem")],
                "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read /missing.pem",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/not-pem.txt")],
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: /not-pem.txt holds no PEM CERTIFICATE",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/client.pem")],
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE is set but no client key is",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://c")],
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=\"ftp://c\": the scheme \"ftp\" is not http or https",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                    ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "c:4318"),
                ],
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=\"c:4318\" needs a scheme for http/protobuf",
            ),
        ];
        for (vars, expected) in cases {
            let mut all = vec![base];
            all.extend_from_slice(vars);
            let message = error(&OtlpConfig::default(), &all);
            assert!(
                message.contains(expected),
                "{vars:?}: {message:?} does not say {expected:?}"
            );
            assert!(!message.contains("secret"), "{message} shows a value");
        }
        let key_only = file("endpoint = \"https://c\"\nclient_key = \"/client.key\"\n");
        assert!(
            error(&key_only, &[]).contains("[otlp] client_key is set but no client certificate")
        );
    }

    #[test]
    fn bad_file_values_fail_when_the_file_is_read() {
        for (text, expected) in [
            ("compression = \"br\"\n", "\"br\" is not gzip or none"),
            ("protocol = \"http/json\"\n", "is not grpc or http/protobuf"),
            (
                "headers = { \"a b\" = \"1\" }\n",
                "header \"a b\": the name has ' '",
            ),
            (
                "headers = { a = \"x\\ny\" }\n",
                "header \"a\": the value holds a control",
            ),
        ] {
            let e = toml::from_str::<OtlpConfig>(text).expect_err(text);
            assert!(e.to_string().contains(expected), "{text}: {e}");
        }
        // Header values stay out of Debug output (a config dump, a panic).
        let config = file("headers = { authorization = \"Bearer hunter2\" }\n");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn the_file_reads_back_what_it_wrote() {
        let config = file(
            "endpoint = \"https://c:4317\"\ncompression = \"gzip\"\nheaders = { a = \"1\" }\n\
             protocol = \"http/protobuf\"\n",
        );
        let text = toml::to_string(&config).expect("serializes");
        assert_eq!(file(&text), config);
    }
}
