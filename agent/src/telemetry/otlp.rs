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
use opentelemetry::{
    logs::{AnyValue, LogRecord, Logger, LoggerProvider, Severity},
    trace::{Span, SpanKind, Tracer, TracerProvider},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::{LogExporter, MetricExporter, SpanExporter, WithExportConfig};
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
}

#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// Base endpoint (`http://collector:4317` for gRPC, `http://collector:4318`
    /// for HTTP); signal paths are appended for HTTP.
    pub endpoint: String,
    pub protocol: Protocol,
    pub interval: Duration,
    pub timeout: Duration,
    /// Events waiting for export, at most; more are dropped and counted.
    pub max_queued_events: usize,
    pub query_spans: bool,
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
        mut exporter: LogExporter,
        resource: &Resource,
        capacity: usize,
        executor: Executor,
        counters: Arc<ExportCounters>,
    ) -> anyhow::Result<QueueProcessor> {
        exporter.set_resource(resource);
        let (sender, receiver) = mpsc::sync_channel(capacity);
        let thread_counters = Arc::clone(&counters);
        let worker = std::thread::Builder::new()
            .name("poolscope-otlp-logs".into())
            .spawn(move || export_loop(exporter, receiver, executor, thread_counters))
            .context("cannot start the OTLP log thread")?;
        Ok(QueueProcessor {
            sender: Mutex::new(Some(sender)),
            worker: Mutex::new(Some(worker)),
            counters,
            capacity,
        })
    }
}

fn export_loop(
    exporter: LogExporter,
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
            let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
                batch.iter().map(|(r, s)| (r, s)).collect();
            // The exporter retries with backoff itself; a batch that still
            // fails is dropped, and counted.
            let result = executor.block_on(exporter.export(LogBatch::new(&refs)));
            let n = batch.len() as u64;
            counters.events_queued.fetch_sub(n, Ordering::Relaxed);
            if result.is_ok() {
                counters.log_batches_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.log_batches_failed.fetch_add(1, Ordering::Relaxed);
                counters.events_dropped.fetch_add(n, Ordering::Relaxed);
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

/// The metric readers: one for the agent's main meter provider, one for the
/// per-pool histograms' provider, and the means to build that one again
/// (the pool series' provider is rebuilt to forget the pools of processes
/// that exited, and a reader belongs to one provider for good).
pub struct MetricReaders {
    pub main: MetricReader,
    pub pools: MetricReader,
    pub factory: ReaderFactory,
}

/// Builds metric readers with exporters of their own, from any thread.
#[derive(Clone)]
pub struct ReaderFactory {
    settings: OtlpSettings,
    runtime: tokio::runtime::Handle,
    counters: Arc<ExportCounters>,
}

impl ReaderFactory {
    /// Builds the exporter on a plain thread of its own: the blocking HTTP
    /// client refuses to be built on a Tokio runtime thread, which is where
    /// the housekeeping task calls this.
    pub fn build(&self) -> anyhow::Result<MetricReader> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("poolscope-otlp-build".into())
                .spawn_scoped(scope, || self.build_here())
                .context("cannot start a thread to build the OTLP metric exporter")?
                .join()
                .map_err(|_| anyhow::anyhow!("building the OTLP metric exporter panicked"))?
        })
    }

    /// Only on a thread outside the Tokio runtime.
    fn build_here(&self) -> anyhow::Result<MetricReader> {
        let settings = &self.settings;
        let exporter = match settings.protocol {
            Protocol::Grpc => {
                // tonic needs the runtime's handle to build its channel.
                let _guard = self.runtime.enter();
                MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(signal_endpoint(settings, ""))
                    .with_timeout(settings.timeout)
                    .build()?
            }
            Protocol::HttpProtobuf => MetricExporter::builder()
                .with_http()
                .with_endpoint(signal_endpoint(settings, "/v1/metrics"))
                .with_timeout(settings.timeout)
                .build()?,
        };
        Ok(PeriodicReader::builder(CountedMetricExporter {
            inner: exporter,
            counters: Arc::clone(&self.counters),
        })
        .with_interval(settings.interval)
        .build())
    }
}

/// The OTLP pieces built, before the meter providers take the readers.
pub struct OtlpParts {
    pub reader: MetricReaders,
    pub export: OtlpExport,
}

/// HTTP endpoints take the signal's path; gRPC takes the base address.
fn signal_endpoint(settings: &OtlpSettings, path: &str) -> String {
    let base = settings.endpoint.trim_end_matches('/');
    match settings.protocol {
        Protocol::Grpc => base.to_string(),
        Protocol::HttpProtobuf => format!("{base}{path}"),
    }
}

/// Builds the exporters. Called on a plain thread: the blocking HTTP client
/// refuses to be built inside the Tokio runtime, while tonic wants its handle.
pub fn build(
    settings: &OtlpSettings,
    resource: &Resource,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<OtlpParts> {
    let counters = Arc::new(ExportCounters::default());
    let _guard = match settings.protocol {
        Protocol::Grpc => Some(runtime.enter()),
        Protocol::HttpProtobuf => None,
    };
    let factory = ReaderFactory {
        settings: settings.clone(),
        runtime: runtime.clone(),
        counters: Arc::clone(&counters),
    };
    let readers = MetricReaders {
        main: factory.build_here()?,
        pools: factory.build_here()?,
        factory,
    };
    let (log_exporter, span_exporter) = match settings.protocol {
        Protocol::Grpc => (
            LogExporter::builder()
                .with_tonic()
                .with_endpoint(signal_endpoint(settings, ""))
                .with_timeout(settings.timeout)
                .build()?,
            if settings.query_spans {
                Some(
                    SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(signal_endpoint(settings, ""))
                        .with_timeout(settings.timeout)
                        .build()?,
                )
            } else {
                None
            },
        ),
        Protocol::HttpProtobuf => (
            LogExporter::builder()
                .with_http()
                .with_endpoint(signal_endpoint(settings, "/v1/logs"))
                .with_timeout(settings.timeout)
                .build()?,
            if settings.query_spans {
                Some(
                    SpanExporter::builder()
                        .with_http()
                        .with_endpoint(signal_endpoint(settings, "/v1/traces"))
                        .with_timeout(settings.timeout)
                        .build()?,
                )
            } else {
                None
            },
        ),
    };
    let executor = match settings.protocol {
        Protocol::Grpc => Executor::Tokio(runtime),
        Protocol::HttpProtobuf => Executor::Plain,
    };
    let processor = QueueProcessor::start(
        log_exporter,
        resource,
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
            .with_batch_exporter(exporter)
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

/// Turns a JSON object (an API report) into log attributes: the same field
/// names as the API, nested objects flattened with dots, nulls left out.
pub fn json_attributes(value: &serde_json::Value) -> Vec<(String, AnyValue)> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, AnyValue)>) {
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::Bool(b) => out.push((prefix.to_string(), AnyValue::Boolean(*b))),
            serde_json::Value::Number(n) => {
                let v = match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => AnyValue::Int(i),
                    (None, Some(f)) => AnyValue::Double(f),
                    _ => AnyValue::String(n.to_string().into()),
                };
                out.push((prefix.to_string(), v));
            }
            serde_json::Value::String(s) => {
                out.push((prefix.to_string(), AnyValue::String(s.clone().into())))
            }
            serde_json::Value::Array(items) => out.push((
                prefix.to_string(),
                AnyValue::String(serde_json::Value::Array(items.clone()).to_string().into()),
            )),
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, v, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}

/// A leak report's log record attributes: its fields as the API shows
/// them, the holder's stack as the semantic conventions' `code.stacktrace`
/// (one string, a frame per line) instead of a list.
pub fn report_attributes(report: &crate::reports::LeakReport) -> Vec<(String, AnyValue)> {
    let mut attributes = serde_json::to_value(report)
        .map(|v| json_attributes(&v))
        .unwrap_or_default();
    attributes.retain(|(key, _)| key != "holder_stack");
    if let Some(stack) = &report.holder_stack {
        attributes.push((
            telemetry_catalogue::attr::CODE_STACKTRACE.to_string(),
            AnyValue::String(stack.join("\n").into()),
        ));
    }
    attributes
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
    fn protocols_parse_as_the_environment_spells_them() {
        assert_eq!(Protocol::parse("grpc"), Some(Protocol::Grpc));
        assert_eq!(
            Protocol::parse("http/protobuf"),
            Some(Protocol::HttpProtobuf)
        );
        assert_eq!(Protocol::parse("http/json"), None);
    }

    #[test]
    fn json_reports_become_flat_attributes() {
        let value = serde_json::json!({
            "kind": "leaked", "pid": 7, "held_for_seconds": 1.5, "pool": null,
            "error": {"code": "42601", "message": "syntax"}, "open": true
        });
        let attrs = json_attributes(&value);
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("kind"), Some(AnyValue::String("leaked".into())));
        assert_eq!(get("pid"), Some(AnyValue::Int(7)));
        assert_eq!(get("held_for_seconds"), Some(AnyValue::Double(1.5)));
        assert_eq!(get("error.code"), Some(AnyValue::String("42601".into())));
        assert_eq!(get("open"), Some(AnyValue::Boolean(true)));
        assert_eq!(get("pool"), None);
    }

    #[test]
    fn http_endpoints_get_signal_paths() {
        let mut settings = OtlpSettings {
            endpoint: "http://127.0.0.1:4318/".into(),
            protocol: Protocol::HttpProtobuf,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_queued_events: 10,
            query_spans: false,
        };
        assert_eq!(
            signal_endpoint(&settings, "/v1/logs"),
            "http://127.0.0.1:4318/v1/logs"
        );
        settings.protocol = Protocol::Grpc;
        assert_eq!(
            signal_endpoint(&settings, "/v1/logs"),
            "http://127.0.0.1:4318"
        );
    }

    /// The keys of the log record of `report` with every field set.
    fn record_keys(report: &impl serde::Serialize) -> std::collections::BTreeSet<String> {
        let value = serde_json::to_value(report).expect("serializable");
        json_attributes(&value)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    fn declared(event: &telemetry_catalogue::Event) -> std::collections::BTreeSet<String> {
        event.attributes.iter().map(|a| a.key.to_string()).collect()
    }

    /// Every attribute a log record can carry is declared in the
    /// catalogue (which docs/metrics.md is written from), and every declared
    /// one exists: a field added to a report fails here until declared.
    #[test]
    fn event_records_carry_the_attributes_the_catalogue_declares() {
        use crate::{
            detect::LeakKind,
            protocol::{DbError, DbSystem, SystemName, TxState},
            reports::{LeakReport, ReportStatus, SlowQuery},
        };
        let text = || Some("x".to_string());
        let report = LeakReport {
            id: 1,
            kind: LeakKind::Leaked,
            status: ReportStatus::Resolved,
            pid: 2,
            process: "app".into(),
            cmdline: text(),
            container_id: text(),
            pool: text(),
            db_system: Some(SystemName::Read(DbSystem::Postgresql)),
            server: text(),
            local_address: text(),
            fd: Some(3),
            generation: Some(4),
            holder_tid: Some(5),
            holder_thread: text(),
            holder_stack: Some(vec!["leak (app.py:3)".into(), "main (app.py:9)".into()]),
            connection_opened_at: text(),
            checked_out_at: text(),
            held_for_seconds: Some(1.5),
            last_activity: text(),
            last_query: text(),
            tx_state: Some(TxState::InTransaction),
            evidence: "e".into(),
            reported_at: "t".into(),
            resolved_at: text(),
            resolution: text(),
            wait_seconds: Some(0.5),
            pool_used: Some(1),
            pool_max: Some(2),
            pool_pending: Some(3),
        };
        for event in [
            &telemetry_catalogue::EVENT_LEAK_OPENED,
            &telemetry_catalogue::EVENT_LEAK_RESOLVED,
            &EVENT_ACQUIRE_SLOW,
        ] {
            let keys = report_attributes(&report)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<std::collections::BTreeSet<_>>();
            assert_eq!(keys, declared(event), "{}", event.name);
        }
        // The stack is one string, a frame per line, innermost first.
        let stacktrace = report_attributes(&report)
            .into_iter()
            .find(|(k, _)| k == "code.stacktrace")
            .map(|(_, v)| v);
        assert_eq!(
            stacktrace,
            Some(AnyValue::String("leak (app.py:3)\nmain (app.py:9)".into()))
        );
        let slow = SlowQuery {
            at: "t".into(),
            pid: 2,
            process: "app".into(),
            fd: 3,
            generation: 4,
            db_system: "postgresql".into(),
            server: "s".into(),
            namespace: text(),
            operation: text(),
            query: text(),
            duration_seconds: 1.0,
            error: Some(DbError {
                code: "42601".into(),
                message: "m".into(),
            }),
            rows: Some(1),
            tx_state: Some(TxState::Idle),
        };
        assert_eq!(record_keys(&slow), declared(&EVENT_QUERY_SLOW));
    }
}
