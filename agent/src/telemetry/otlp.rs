//! OTLP push, next to the Prometheus pull: the same meter's instruments go
//! out through the SDK's periodic reader, and events (leak reports, slow
//! acquires, slow queries) go out as log records through a bounded queue of
//! our own, so that a collector that is down or slow costs a fixed amount of
//! memory, drops are counted, and the event pipeline never waits.

pub mod config;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    logs::{AnyValue, LogRecord, Logger, LoggerProvider, Severity},
    trace::{Span, SpanKind, Tracer, TracerProvider},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::{
    tonic_types::{
        metadata::MetadataMap,
        transport::{Certificate, ClientTlsConfig, Identity},
    },
    LogExporter, MetricExporter, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    logs::{LogBatch, LogExporter as _, LogProcessor, SdkLogRecord, SdkLogger, SdkLoggerProvider},
    metrics::{data::ResourceMetrics, exporter::PushMetricExporter, PeriodicReader, Temporality},
    trace::SdkTracerProvider,
    Resource,
};
use telemetry_catalogue::{EVENT_ACQUIRE_SLOW, EVENT_QUERY_SLOW};

/// The two OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// `grpc` or `http/protobuf`, as OTEL_EXPORTER_OTLP_PROTOCOL spells them.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text {
            "grpc" => Some(Protocol::Grpc),
            "http/protobuf" | "http" => Some(Protocol::HttpProtobuf),
            _ => None,
        }
    }

    /// How [`Protocol::parse`] spells it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }

    /// The specification's endpoint when none is configured for a signal.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            Protocol::Grpc => "http://localhost:4317",
            Protocol::HttpProtobuf => "http://localhost:4318",
        }
    }
}

/// The three OTLP signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Logs,
    Traces,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
            Signal::Traces => "traces",
        }
    }

    /// `METRICS` in OTEL_EXPORTER_OTLP_METRICS_ENDPOINT.
    pub fn variable_infix(self) -> &'static str {
        match self {
            Signal::Metrics => "METRICS",
            Signal::Logs => "LOGS",
            Signal::Traces => "TRACES",
        }
    }

    /// The path an HTTP base endpoint gets for this signal.
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
            Signal::Traces => "/v1/traces",
        }
    }
}

/// Request body compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

impl Compression {
    /// `gzip` or `none`, in any case, as OTEL_EXPORTER_OTLP_COMPRESSION.
    pub fn parse(text: &str) -> Option<Compression> {
        if text.eq_ignore_ascii_case("gzip") {
            Some(Compression::Gzip)
        } else if text.eq_ignore_ascii_case("none") {
            Some(Compression::None)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
        }
    }
}

/// TLS material, read at start; used for `https://` endpoints only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// The CA to trust instead of the system's trust store.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and key, for mutual TLS.
    pub client: Option<ClientIdentity>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Shows what is configured, never the key or the certificates.
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.client.is_some())
            .finish()
    }
}

/// One signal's exporter, every setting explicit.
#[derive(Clone, PartialEq)]
pub struct SignalSettings {
    pub protocol: Protocol,
    /// Where requests go: for http/protobuf the whole URL, path included.
    pub endpoint: String,
    /// The variable or config key the endpoint came from, or `default`.
    pub endpoint_from: String,
    /// Lowercased names; the values are credentials, kept out of Debug.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The whole export, the exporter's retries included.
    pub timeout: Duration,
    pub compression: Compression,
    pub tls: Tls,
}

impl SignalSettings {
    fn is_https(&self) -> bool {
        self.endpoint.starts_with("https://")
    }

    /// One line for the start-up log: no header values, no key material.
    pub fn summary(&self) -> String {
        let mut parts = vec![
            format!("{} {}", self.protocol.name(), self.endpoint),
            format!("from {}", self.endpoint_from),
            format!("timeout {:?}", self.timeout),
        ];
        if self.compression != Compression::None {
            parts.push(self.compression.name().to_owned());
        }
        if !self.headers.is_empty() {
            let names: Vec<&str> = self.headers.keys().map(String::as_str).collect();
            parts.push(format!("headers {}", names.join(" ")));
        }
        if self.is_https() {
            parts.push(
                match (&self.tls.ca_pem, &self.tls.client) {
                    (Some(_), Some(_)) => "TLS with the configured CA and a client certificate",
                    (Some(_), None) => "TLS with the configured CA",
                    (None, Some(_)) => "TLS with the system's CAs and a client certificate",
                    (None, None) => "TLS with the system's CAs",
                }
                .to_owned(),
            );
        }
        parts.join(", ")
    }
}

impl std::fmt::Debug for SignalSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalSettings")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("endpoint_from", &self.endpoint_from)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("compression", &self.compression)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The OTLP export in force, resolved from `[otlp]` and the OTEL_*
/// variables by [`config::OtlpConfig::settings`].
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    pub metrics: SignalSettings,
    pub logs: SignalSettings,
    /// Used when query spans are on.
    pub traces: SignalSettings,
    /// Metric export interval.
    pub interval: Duration,
    /// Events waiting for export, at most; more are dropped and counted.
    pub max_queued_events: usize,
    pub query_spans: bool,
    /// The metrics signal's endpoint and protocol, for a one-line log;
    /// [`OtlpSettings::summary`] tells every signal's.
    pub endpoint: String,
    pub protocol: Protocol,
}

impl OtlpSettings {
    /// Every signal's exporter, for the start-up log.
    pub fn summary(&self) -> String {
        let mut lines = vec![
            format!(
                "metrics ({}), every {:?}",
                self.metrics.summary(),
                self.interval
            ),
            format!("logs ({})", self.logs.summary()),
        ];
        if self.query_spans {
            lines.push(format!("traces ({})", self.traces.summary()));
        }
        lines.join("; ")
    }
}

/// Export health, read by the self-metrics.
#[derive(Debug, Default)]
pub struct ExportCounters {
    pub metric_batches_ok: AtomicU64,
    pub metric_batches_failed: AtomicU64,
    pub log_batches_ok: AtomicU64,
    pub log_batches_failed: AtomicU64,
    /// Events dropped: the queue was full or their batch failed.
    pub events_dropped: AtomicU64,
    pub events_queued: AtomicU64,
}

/// Counts what the OTLP metric exporter achieves.
#[derive(Debug)]
pub struct CountedMetricExporter {
    inner: MetricExporter,
    counters: Arc<ExportCounters>,
}

impl PushMetricExporter for CountedMetricExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        let counter = if result.is_ok() {
            &self.counters.metric_batches_ok
        } else {
            &self.counters.metric_batches_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Runs an exporter future to completion from our own threads: tonic needs
/// the agent's Tokio runtime, the blocking HTTP client must not see one.
#[derive(Clone)]
enum Executor {
    Tokio(tokio::runtime::Handle),
    Plain,
}

impl Executor {
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        match self {
            Executor::Tokio(handle) => handle.block_on(future),
            Executor::Plain => futures_executor::block_on(future),
        }
    }
}

type QueuedRecord = (SdkLogRecord, InstrumentationScope);

/// A log processor with a bounded queue and one export thread.
#[derive(Debug)]
struct QueueProcessor {
    sender: Mutex<Option<SyncSender<QueuedRecord>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<ExportCounters>,
    capacity: usize,
}

const LOG_BATCH: usize = 256;

impl QueueProcessor {
    fn start(
        exporter: LogExporter,
        resources: ExportResources,
        capacity: usize,
        executor: Executor,
        counters: Arc<ExportCounters>,
    ) -> anyhow::Result<QueueProcessor> {
        let (sender, receiver) = mpsc::sync_channel(capacity);
        let thread_counters = Arc::clone(&counters);
        let worker = std::thread::Builder::new()
            .name("poolscope-otlp-logs".into())
            .spawn(move || export_loop(exporter, resources, receiver, executor, thread_counters))
            .context("cannot start the OTLP log thread")?;
        Ok(QueueProcessor {
            sender: Mutex::new(Some(sender)),
            worker: Mutex::new(Some(worker)),
            counters,
            capacity,
        })
    }
}

/// Who a log record or span is about: the application whose report or
/// round trip it is (`process.pid`), else the agent.
#[derive(Debug, Clone)]
struct ExportResources {
    agent: Resource,
    applications: Arc<super::apps::ApplicationResources>,
}

impl ExportResources {
    fn of(&self, pid: Option<u32>) -> Resource {
        pid.and_then(|pid| self.applications.get(pid))
            .unwrap_or_else(|| self.agent.clone())
    }
}

/// Sends each application's spans under its resource: the SDK gives the
/// exporter one resource, so each batch goes out as one request per
/// application.
#[derive(Debug)]
struct ApplicationSpans {
    /// Only the batch processor's thread exports; the lock is held across
    /// the export (a Tokio mutex, whose guard may be).
    inner: tokio::sync::Mutex<SpanExporter>,
    resources: ExportResources,
}

impl opentelemetry_sdk::trace::SpanExporter for ApplicationSpans {
    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> OTelSdkResult {
        let by_pid = by_process(batch, |span| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == telemetry_catalogue::attr::PROCESS_PID)
                .and_then(|kv| match kv.value {
                    opentelemetry::Value::I64(pid) => u32::try_from(pid).ok(),
                    _ => None,
                })
        });
        let mut inner = self.inner.lock().await;
        for (pid, spans) in by_pid {
            inner.set_resource(&self.resources.of(pid));
            // After one failure the rest would wait out the same timeout.
            inner.export(spans).await?;
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.shutdown_with_timeout(timeout),
            Err(_) => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.force_flush(),
            Err(_) => Ok(()),
        }
    }
}

/// Items grouped by the process they are about, in the order each first
/// appears: one request per application, under its resource. (A batch
/// holds at most a few hundred items.)
fn by_process<T>(
    items: impl IntoIterator<Item = T>,
    pid_of: impl Fn(&T) -> Option<u32>,
) -> Vec<(Option<u32>, Vec<T>)> {
    let mut groups: Vec<(Option<u32>, Vec<T>)> = Vec::new();
    for item in items {
        let pid = pid_of(&item);
        match groups.iter_mut().find(|(p, _)| *p == pid) {
            Some((_, members)) => members.push(item),
            None => groups.push((pid, vec![item])),
        }
    }
    groups
}

/// A queued record as the exporter takes it.
type RecordRef<'a> = (&'a SdkLogRecord, &'a InstrumentationScope);

/// The `process.pid` a record is about.
fn record_pid(record: &SdkLogRecord) -> Option<u32> {
    record
        .attributes_iter()
        .find(|(key, _)| key.as_str() == telemetry_catalogue::attr::PROCESS_PID)
        .and_then(|(_, value)| match value {
            AnyValue::Int(pid) => u32::try_from(*pid).ok(),
            _ => None,
        })
}

fn export_loop(
    mut exporter: LogExporter,
    resources: ExportResources,
    receiver: Receiver<QueuedRecord>,
    executor: Executor,
    counters: Arc<ExportCounters>,
) {
    let mut batch: Vec<QueuedRecord> = Vec::with_capacity(LOG_BATCH);
    loop {
        let closed = match receiver.recv_timeout(Duration::from_secs(1)) {
            Ok(record) => {
                batch.push(record);
                while batch.len() < LOG_BATCH {
                    match receiver.try_recv() {
                        Ok(record) => batch.push(record),
                        Err(_) => break,
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if !batch.is_empty() {
            let refs = batch.iter().map(|(record, scope)| (record, scope));
            let by_pid = by_process(refs, |(record, _): &RecordRef| record_pid(record));
            counters
                .events_queued
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            let mut failed = false;
            for (pid, records) in by_pid {
                // The exporter retries with backoff itself; a batch that
                // still fails is dropped, and counted. After one failure
                // the rest of the round is too: the others would wait out
                // the same timeout.
                let result = if failed {
                    Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                        "an earlier request of this round failed".into(),
                    ))
                } else {
                    exporter.set_resource(&resources.of(pid));
                    executor.block_on(exporter.export(LogBatch::new(&records)))
                };
                failed |= result.is_err();
                if result.is_ok() {
                    counters.log_batches_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.log_batches_failed.fetch_add(1, Ordering::Relaxed);
                    counters
                        .events_dropped
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                }
            }
            batch.clear();
        }
        if closed {
            let _ = exporter.shutdown_with_timeout(Duration::from_secs(1));
            return;
        }
    }
}

/// Events a local process can cause in any number by reporting its own pool
/// (or running slow queries), as opposed to leak reports, which need a
/// connection held for the leak threshold.
fn is_bulk_event(name: Option<&str>) -> bool {
    name == Some(EVENT_ACQUIRE_SLOW.name) || name == Some(EVENT_QUERY_SLOW.name)
}

/// Whether an event fits the queue holding `queued` of `capacity`: bulk
/// events may fill three quarters of it, the rest all of it.
fn queue_admits(queued: u64, capacity: usize, name: Option<&str>) -> bool {
    let bound = if is_bulk_event(name) {
        capacity - capacity / 4
    } else {
        capacity
    };
    queued < bound as u64
}

impl LogProcessor for QueueProcessor {
    fn emit(&self, data: &mut SdkLogRecord, instrumentation: &InstrumentationScope) {
        // The queue's plumbing stays valid whatever panicked while holding it.
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // The bound covers what waits in the channel and the batch being
        // exported: both hold memory. Events any sender can make in bulk
        // (slow acquires and slow queries) get only part of it, so that
        // leak reports still fit when they flood.
        let queued = self.counters.events_queued.load(Ordering::Relaxed);
        if !queue_admits(queued, self.capacity, data.event_name()) {
            self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match sender.try_send((data.clone(), instrumentation.clone())) {
            Ok(()) => {
                self.counters.events_queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// Closes the queue and waits (bounded) for the thread to send what it has.
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(worker) = worker {
            let deadline = Instant::now() + timeout;
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
        Ok(())
    }
}

/// Everything OTLP: the metric reader for the meter provider, the event
/// logger and, when asked for, the query tracer.
pub struct OtlpExport {
    pub counters: Arc<ExportCounters>,
    logger_provider: SdkLoggerProvider,
    logger: SdkLogger,
    tracer_provider: Option<SdkTracerProvider>,
}

/// A periodic OTLP metric reader, owned by one meter provider.
pub type MetricReader = PeriodicReader<CountedMetricExporter>;

/// The agent's own metric reader, and the export of the applications'
/// metrics (each under its own resource: `telemetry::apps`).
pub struct MetricReaders {
    pub main: MetricReader,
    pub apps: AppExport,
}

/// Sends one application's metrics at a time, from the applications'
/// export thread (not a Tokio one: the blocking HTTP client refuses those).
pub struct AppExport {
    exporter: CountedMetricExporter,
    executor: Executor,
    interval: Duration,
}

impl AppExport {
    /// Whether the collector took them (the counters say it too).
    pub fn export(&self, metrics: &ResourceMetrics) -> bool {
        self.executor
            .block_on(self.exporter.export(metrics))
            .is_ok()
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Builds metric readers with exporters of their own, from any thread.
#[derive(Clone)]
pub struct ReaderFactory {
    settings: OtlpSettings,
    runtime: tokio::runtime::Handle,
    counters: Arc<ExportCounters>,
}

impl ReaderFactory {
    /// Only on a thread outside the Tokio runtime.
    fn build_here(&self) -> anyhow::Result<MetricReader> {
        Ok(PeriodicReader::builder(self.exporter()?)
            .with_interval(self.settings.interval)
            .build())
    }

    /// The applications' export; only outside the Tokio runtime.
    fn app_export(&self) -> anyhow::Result<AppExport> {
        Ok(AppExport {
            exporter: self.exporter()?,
            executor: match self.settings.metrics.protocol {
                Protocol::Grpc => Executor::Tokio(self.runtime.clone()),
                Protocol::HttpProtobuf => Executor::Plain,
            },
            interval: self.settings.interval,
        })
    }

    /// A metric exporter that counts its batches; only outside the Tokio
    /// runtime.
    fn exporter(&self) -> anyhow::Result<CountedMetricExporter> {
        let settings = &self.settings.metrics;
        let exporter = match settings.protocol {
            Protocol::Grpc => {
                // tonic needs the runtime's handle to build its channel.
                let _guard = self.runtime.enter();
                tonic_settings(MetricExporter::builder().with_tonic(), settings).build()
            }
            Protocol::HttpProtobuf => {
                http_settings(MetricExporter::builder().with_http(), settings)?.build()
            }
        }
        .with_context(|| format!("OTLP metrics exporter to {}", settings.endpoint))?;
        Ok(CountedMetricExporter {
            inner: exporter,
            counters: Arc::clone(&self.counters),
        })
    }
}

/// The OTLP pieces built, before the meter providers take the readers.
pub struct OtlpParts {
    pub reader: MetricReaders,
    pub export: OtlpExport,
}

/// Gives a gRPC exporter builder every setting of `settings`, so that the
/// library's own reading of OTEL_* variables has nothing left to decide
/// (it reads them only for what is not set; headers it adds are the ones
/// resolved here, since the environment won there too).
fn tonic_settings<B: WithExportConfig + WithTonicConfig>(
    builder: B,
    settings: &SignalSettings,
) -> B {
    let mut headers = HeaderMap::new();
    for (name, value) in &settings.headers {
        // Checked when the settings were resolved; a pair that still does
        // not parse cannot be sent, and is left out rather than sent wrong.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    let mut builder = builder
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.timeout)
        .with_metadata(MetadataMap::from_headers(headers));
    if settings.compression == Compression::Gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    if settings.is_https() {
        let mut tls = ClientTlsConfig::new();
        tls = match &settings.tls.ca_pem {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some(client) = &settings.tls.client {
            tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
        }
        builder = builder.with_tls_config(tls);
    }
    builder
}

/// As [`tonic_settings`], for HTTP, with an HTTP client of our own that
/// carries the TLS settings and the timeout.
fn http_settings<B: WithExportConfig + WithHttpConfig>(
    builder: B,
    settings: &SignalSettings,
) -> anyhow::Result<B> {
    // The library URL-decodes header values it is given; ours are decoded
    // already, so a `%` they hold is escaped to come through as itself.
    let headers = settings
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), value.replace('%', "%25")))
        .collect();
    let mut builder = builder
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.timeout)
        .with_headers(headers)
        .with_http_client(http_client(settings)?);
    if settings.compression == Compression::Gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    Ok(builder)
}

/// A blocking HTTP client with the signal's timeout and TLS material. Only
/// on a thread outside the Tokio runtime.
fn http_client(settings: &SignalSettings) -> anyhow::Result<reqwest::blocking::Client> {
    crate::https::install_crypto_provider();
    let mut client = reqwest::blocking::Client::builder().timeout(settings.timeout);
    if settings.is_https() {
        if let Some(ca) = &settings.tls.ca_pem {
            let ca = reqwest::Certificate::from_pem(ca).context("the OTLP CA certificate")?;
            client = client.tls_certs_only([ca]);
        }
        if let Some(identity) = &settings.tls.client {
            let mut pem = identity.cert_pem.clone();
            pem.push(b'\n');
            pem.extend_from_slice(&identity.key_pem);
            let identity =
                reqwest::Identity::from_pem(&pem).context("the OTLP client certificate and key")?;
            client = client.identity(identity);
        }
    }
    client.build().context("cannot build the OTLP HTTP client")
}

/// Builds the exporters. Called on a plain thread: the blocking HTTP client
/// refuses to be built inside the Tokio runtime, while tonic wants its handle.
pub fn build(
    settings: &OtlpSettings,
    resource: &Resource,
    app_resources: Arc<super::apps::ApplicationResources>,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<OtlpParts> {
    let counters = Arc::new(ExportCounters::default());
    let factory = ReaderFactory {
        settings: settings.clone(),
        runtime: runtime.clone(),
        counters: Arc::clone(&counters),
    };
    let readers = MetricReaders {
        main: factory.build_here()?,
        apps: factory.app_export()?,
    };
    let logs = &settings.logs;
    let log_exporter = match logs.protocol {
        Protocol::Grpc => {
            let _guard = runtime.enter();
            tonic_settings(LogExporter::builder().with_tonic(), logs).build()
        }
        Protocol::HttpProtobuf => http_settings(LogExporter::builder().with_http(), logs)?.build(),
    }
    .with_context(|| format!("OTLP logs exporter to {}", logs.endpoint))?;
    let traces = &settings.traces;
    let span_exporter = if settings.query_spans {
        let exporter = match traces.protocol {
            Protocol::Grpc => {
                let _guard = runtime.enter();
                tonic_settings(SpanExporter::builder().with_tonic(), traces).build()
            }
            Protocol::HttpProtobuf => {
                http_settings(SpanExporter::builder().with_http(), traces)?.build()
            }
        }
        .with_context(|| format!("OTLP traces exporter to {}", traces.endpoint))?;
        Some(exporter)
    } else {
        None
    };
    let executor = match logs.protocol {
        Protocol::Grpc => Executor::Tokio(runtime),
        Protocol::HttpProtobuf => Executor::Plain,
    };
    let resources = ExportResources {
        agent: resource.clone(),
        applications: app_resources,
    };
    let processor = QueueProcessor::start(
        log_exporter,
        resources.clone(),
        settings.max_queued_events,
        executor,
        Arc::clone(&counters),
    )?;
    let logger_provider = SdkLoggerProvider::builder()
        .with_resource(resource.clone())
        .with_log_processor(processor)
        .build();
    let logger = logger_provider.logger("poolscope");
    let tracer_provider = span_exporter.map(|exporter| {
        SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(ApplicationSpans {
                inner: tokio::sync::Mutex::new(exporter),
                resources,
            })
            .build()
    });
    Ok(OtlpParts {
        reader: readers,
        export: OtlpExport {
            counters,
            logger_provider,
            logger,
            tracer_provider,
        },
    })
}

impl OtlpExport {
    /// Sends one event as a log record.
    pub fn emit_event(
        &self,
        event_name: &'static str,
        severity: Severity,
        body: String,
        attributes: Vec<(String, AnyValue)>,
    ) {
        let mut record = self.logger.create_log_record();
        record.set_event_name(event_name);
        record.set_severity_number(severity);
        record.set_severity_text(severity.name());
        record.set_body(AnyValue::String(body.into()));
        record.set_timestamp(std::time::SystemTime::now());
        record.add_attributes(attributes);
        self.logger.emit(record);
    }

    /// One round trip as a client span, when query spans are on.
    pub fn emit_span(
        &self,
        name: String,
        start: std::time::SystemTime,
        end: std::time::SystemTime,
        attributes: Vec<KeyValue>,
        error: bool,
    ) {
        let Some(provider) = &self.tracer_provider else {
            return;
        };
        let tracer = provider.tracer("poolscope");
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes)
            .start(&tracer);
        if error {
            span.set_status(opentelemetry::trace::Status::error("database error"));
        }
        span.end_with_timestamp(end);
    }

    pub fn spans_enabled(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Sends what is queued, within `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        let _ = self.logger_provider.shutdown_with_timeout(timeout);
        if let Some(tracer) = &self.tracer_provider {
            let _ = tracer.shutdown_with_timeout(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_catalogue::EVENT_LEAK_OPENED;

    #[test]
    fn a_flood_of_slow_acquires_leaves_room_for_leak_reports() {
        let slow = Some(EVENT_ACQUIRE_SLOW.name);
        let leak = Some(EVENT_LEAK_OPENED.name);
        assert!(queue_admits(749, 1000, slow));
        assert!(!queue_admits(750, 1000, slow));
        assert!(!queue_admits(750, 1000, Some(EVENT_QUERY_SLOW.name)));
        assert!(queue_admits(750, 1000, leak));
        assert!(queue_admits(999, 1000, leak));
        assert!(!queue_admits(1000, 1000, leak));
    }

    #[test]
    fn records_are_grouped_by_process_in_order_of_appearance() {
        let items = [(Some(7), 'a'), (None, 'b'), (Some(7), 'c'), (Some(8), 'd')];
        assert_eq!(
            by_process(items, |(pid, _)| *pid),
            vec![
                (Some(7), vec![(Some(7), 'a'), (Some(7), 'c')]),
                (None, vec![(None, 'b')]),
                (Some(8), vec![(Some(8), 'd')]),
            ]
        );
    }

    #[test]
    fn protocols_parse_as_the_environment_spells_them() {
        assert_eq!(Protocol::parse("grpc"), Some(Protocol::Grpc));
        assert_eq!(
            Protocol::parse("http/protobuf"),
            Some(Protocol::HttpProtobuf)
        );
        assert_eq!(Protocol::parse("http/json"), None);
    }

    /// The start-up log line names headers, never their values, and says
    /// which trust the TLS connection uses.
    #[test]
    fn the_summary_shows_no_credentials() {
        let signal = SignalSettings {
            protocol: Protocol::Grpc,
            endpoint: "https://collector:4317".into(),
            endpoint_from: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            headers: [("authorization".to_string(), "Bearer hunter2".to_string())].into(),
            timeout: Duration::from_secs(2),
            compression: Compression::Gzip,
            tls: Tls {
                ca_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
                client: None,
            },
        };
        let summary = signal.summary();
        assert_eq!(
            summary,
            "grpc https://collector:4317, from OTEL_EXPORTER_OTLP_ENDPOINT, timeout 2s, gzip, \
             headers authorization, TLS with the configured CA"
        );
        assert!(!format!("{signal:?}").contains("hunter2"));
    }
}
