//! An OTLP receiver for the export tests: a gRPC server (the collector's
//! MetricsService, LogsService and TraceService) and an HTTP/protobuf server
//! (`POST /v1/metrics`, `/v1/logs`, `/v1/traces`) on free loopback ports,
//! keeping what it receives in memory.
//!
//! The tests are synchronous, so the receiver owns its Tokio runtime.
//! [`OtlpReceiver::stop`] shuts that runtime down: the listeners and every
//! accepted connection close at once, as when a collector crashes, and the
//! agent's next attempt is refused. [`OtlpReceiver::start_again`] listens on
//! the same ports again; what was received before stays.
//!
//! Helpers read the received data flattened: metric data points with their
//! attributes as JSON values ([`MetricPoint`]), log records with their event
//! name and attributes ([`LogRecordView`]), and resource attributes.
//!
//! [`OtlpReceiver::start_with`] takes [`ReceiverOptions`]: TLS on both
//! servers (and, when given a CA, client certificates required), a header
//! every request must carry (else gRPC UNAUTHENTICATED, HTTP 401), and the
//! HTTP paths per signal. Every request's headers are kept
//! ([`OtlpReceiver::request_log`]); gzip bodies are accepted on both servers.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            logs_service_server::{LogsService, LogsServiceServer},
            ExportLogsServiceRequest, ExportLogsServiceResponse,
        },
        metrics::v1::{
            metrics_service_server::{MetricsService, MetricsServiceServer},
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        },
        trace::v1::{
            trace_service_server::{TraceService, TraceServiceServer},
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        },
    },
    common::v1::{any_value, AnyValue, KeyValue},
    metrics::v1::{metric::Data, number_data_point, NumberDataPoint},
    resource::v1::Resource,
};
use prost::Message;
use serde_json::Value;
use tokio_rustls::rustls;

use crate::{tcp_listening, wait_until};

/// How a request reached the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    Grpc,
    Http,
}

/// The three OTLP signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    Metrics,
    Logs,
    Traces,
}

/// Log records kept by default; older requests are forgotten past it (the
/// totals still count them), so that a test that produces events for
/// minutes holds a bounded amount.
pub const DEFAULT_MAX_LOG_RECORDS: usize = 50_000;

/// Metric requests kept (the newest); one arrives per export interval.
const MAX_METRIC_REQUESTS: usize = 2_000;

struct Received<T> {
    at: Instant,
    transport: Transport,
    request: T,
}

struct Store {
    metrics: VecDeque<Received<ExportMetricsServiceRequest>>,
    logs: VecDeque<Received<ExportLogsServiceRequest>>,
    traces: VecDeque<Received<ExportTraceServiceRequest>>,
    /// Log records in `logs`, and the bound on them.
    log_records_kept: usize,
    max_log_records: usize,
    /// Every request and log record ever received, by signal and transport.
    requests: BTreeMap<(Signal, Transport), u64>,
    log_records_total: u64,
    spans_total: u64,
    /// Requests that could not be decoded (HTTP only: tonic rejects them
    /// before they reach us), to paths no signal has, and TLS handshakes
    /// that failed (HTTP), with why.
    rejected: Vec<String>,
    /// The newest requests' headers, refused ones included.
    request_log: VecDeque<RequestSeen>,
    /// Requests refused for a missing or wrong required header.
    refused: u64,
}

/// Request headers kept, at most (the newest).
const MAX_REQUEST_LOG: usize = 2_000;

/// One request as it arrived: where, and with which headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSeen {
    pub signal: Signal,
    pub transport: Transport,
    /// HTTP: the request's path; gRPC: empty.
    pub path: String,
    /// Names lowercased; values that are not text are left out.
    pub headers: BTreeMap<String, String>,
    /// Refused for the required header.
    pub refused: bool,
}

impl RequestSeen {
    /// How the body was compressed: `content-encoding` (HTTP) or
    /// `grpc-encoding` (gRPC), `None` for neither.
    pub fn encoding(&self) -> Option<&str> {
        self.headers
            .get("content-encoding")
            .or_else(|| self.headers.get("grpc-encoding"))
            .map(String::as_str)
    }
}

type Shared = Arc<Mutex<Store>>;

fn lock(store: &Shared) -> MutexGuard<'_, Store> {
    // A panicking test thread cannot leave the store half-written: every
    // update is one push under the lock.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

fn log_record_count(request: &ExportLogsServiceRequest) -> usize {
    request
        .resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .map(|s| s.log_records.len())
        .sum()
}

impl Store {
    fn new(max_log_records: usize) -> Store {
        Store {
            metrics: VecDeque::new(),
            logs: VecDeque::new(),
            traces: VecDeque::new(),
            log_records_kept: 0,
            max_log_records,
            requests: BTreeMap::new(),
            log_records_total: 0,
            spans_total: 0,
            rejected: Vec::new(),
            request_log: VecDeque::new(),
            refused: 0,
        }
    }

    fn log_request(&mut self, seen: RequestSeen) {
        if seen.refused {
            self.refused += 1;
        }
        if self.request_log.len() >= MAX_REQUEST_LOG {
            self.request_log.pop_front();
        }
        self.request_log.push_back(seen);
    }

    fn count(&mut self, signal: Signal, transport: Transport) {
        *self.requests.entry((signal, transport)).or_default() += 1;
    }

    fn add_metrics(&mut self, transport: Transport, request: ExportMetricsServiceRequest) {
        self.count(Signal::Metrics, transport);
        if self.metrics.len() >= MAX_METRIC_REQUESTS {
            self.metrics.pop_front();
        }
        self.metrics.push_back(Received {
            at: Instant::now(),
            transport,
            request,
        });
    }

    fn add_logs(&mut self, transport: Transport, request: ExportLogsServiceRequest) {
        self.count(Signal::Logs, transport);
        let n = log_record_count(&request);
        self.log_records_total += n as u64;
        self.log_records_kept += n;
        self.logs.push_back(Received {
            at: Instant::now(),
            transport,
            request,
        });
        while self.log_records_kept > self.max_log_records && self.logs.len() > 1 {
            if let Some(old) = self.logs.pop_front() {
                self.log_records_kept -= log_record_count(&old.request);
            }
        }
    }

    fn add_traces(&mut self, transport: Transport, request: ExportTraceServiceRequest) {
        self.count(Signal::Traces, transport);
        self.spans_total += request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len() as u64)
            .sum::<u64>();
        if self.traces.len() >= MAX_METRIC_REQUESTS {
            self.traces.pop_front();
        }
        self.traces.push_back(Received {
            at: Instant::now(),
            transport,
            request,
        });
    }
}

// ---------------------------------------------------------------------------
// Flattened views
// ---------------------------------------------------------------------------

/// An OTLP attribute value as JSON: strings, integers, doubles and booleans
/// as themselves, arrays and key-value lists as arrays and objects, bytes
/// as lowercase hex.
pub fn any_value_json(value: &AnyValue) -> Value {
    match &value.value {
        None => Value::Null,
        Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number)
        }
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(any_value_json).collect())
        }
        Some(any_value::Value::KvlistValue(kv)) => Value::Object(
            kv.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        kv.value.as_ref().map_or(Value::Null, any_value_json),
                    )
                })
                .collect(),
        ),
        Some(any_value::Value::BytesValue(b)) => {
            Value::String(b.iter().map(|x| format!("{x:02x}")).collect())
        }
        Some(any_value::Value::StringValueStrindex(i)) => Value::String(format!("strindex:{i}")),
    }
}

/// Attributes as a map of JSON values.
pub fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map_or(Value::Null, any_value_json),
            )
        })
        .collect()
}

fn resource_attributes(resource: Option<&Resource>) -> BTreeMap<String, Value> {
    resource
        .map(|r| attributes(&r.attributes))
        .unwrap_or_default()
}

/// What kind of data a metric carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Gauge,
    Sum { monotonic: bool },
    Histogram,
    ExponentialHistogram,
    Summary,
}

/// One data point of one metric, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub name: String,
    pub unit: String,
    pub kind: MetricKind,
    /// 1 = delta, 2 = cumulative, 0 for gauges.
    pub temporality: i32,
    pub attributes: BTreeMap<String, Value>,
    /// The attributes of the resource the point came under (one request
    /// may carry several, e.g. one per application).
    pub resource: BTreeMap<String, Value>,
    /// Gauges and sums: the value; histograms: the count.
    pub value: f64,
    /// Histograms: the sum of the recorded values.
    pub sum: Option<f64>,
    /// Histograms: explicit bucket bounds and the count in each bucket.
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
}

impl MetricPoint {
    /// Whether every `(key, value)` of `filter` is among the attributes,
    /// or else among the resource's.
    pub fn matches(&self, filter: &[(&str, Value)]) -> bool {
        filter.iter().all(|(k, v)| {
            self.attributes
                .get(*k)
                .or_else(|| self.resource.get(*k))
                .is_some_and(|a| a == v)
        })
    }
}

fn number(point: &NumberDataPoint) -> f64 {
    match point.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => f64::NAN,
    }
}

/// One metrics export request: its resource(s) and every data point.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    pub received_at: Instant,
    pub transport: Transport,
    /// The attributes of the (first) resource.
    pub resource: BTreeMap<String, Value>,
    pub points: Vec<MetricPoint>,
    /// Metric names in the request, also those without data points.
    pub names: BTreeSet<String>,
}

impl MetricsSnapshot {
    fn from_request(received: &Received<ExportMetricsServiceRequest>) -> MetricsSnapshot {
        let mut points = Vec::new();
        let mut names = BTreeSet::new();
        for rm in &received.request.resource_metrics {
            let resource = resource_attributes(rm.resource.as_ref());
            for sm in &rm.scope_metrics {
                for metric in &sm.metrics {
                    names.insert(metric.name.clone());
                    let point = |kind, temporality, attrs: &[KeyValue], value| MetricPoint {
                        name: metric.name.clone(),
                        unit: metric.unit.clone(),
                        kind,
                        temporality,
                        attributes: attributes(attrs),
                        resource: resource.clone(),
                        value,
                        sum: None,
                        bounds: Vec::new(),
                        bucket_counts: Vec::new(),
                    };
                    match &metric.data {
                        Some(Data::Gauge(g)) => {
                            for p in &g.data_points {
                                points.push(point(MetricKind::Gauge, 0, &p.attributes, number(p)));
                            }
                        }
                        Some(Data::Sum(s)) => {
                            let kind = MetricKind::Sum {
                                monotonic: s.is_monotonic,
                            };
                            for p in &s.data_points {
                                points.push(point(
                                    kind,
                                    s.aggregation_temporality,
                                    &p.attributes,
                                    number(p),
                                ));
                            }
                        }
                        Some(Data::Histogram(h)) => {
                            for p in &h.data_points {
                                let mut mp = point(
                                    MetricKind::Histogram,
                                    h.aggregation_temporality,
                                    &p.attributes,
                                    p.count as f64,
                                );
                                mp.sum = p.sum;
                                mp.bounds = p.explicit_bounds.clone();
                                mp.bucket_counts = p.bucket_counts.clone();
                                points.push(mp);
                            }
                        }
                        Some(Data::ExponentialHistogram(h)) => {
                            for p in &h.data_points {
                                let mut mp = point(
                                    MetricKind::ExponentialHistogram,
                                    h.aggregation_temporality,
                                    &p.attributes,
                                    p.count as f64,
                                );
                                mp.sum = p.sum;
                                points.push(mp);
                            }
                        }
                        Some(Data::Summary(s)) => {
                            for p in &s.data_points {
                                let mut mp =
                                    point(MetricKind::Summary, 0, &p.attributes, p.count as f64);
                                mp.sum = Some(p.sum);
                                points.push(mp);
                            }
                        }
                        None => {}
                    }
                }
            }
        }
        MetricsSnapshot {
            received_at: received.at,
            transport: received.transport,
            resource: resource_attributes(
                received
                    .request
                    .resource_metrics
                    .first()
                    .and_then(|r| r.resource.as_ref()),
            ),
            points,
            names,
        }
    }

    /// The data points of metric `name` whose attributes include `filter`.
    pub fn points(&self, name: &str, filter: &[(&str, Value)]) -> Vec<&MetricPoint> {
        self.points
            .iter()
            .filter(|p| p.name == name && p.matches(filter))
            .collect()
    }

    /// Sum of the values (histograms: counts) of the matching points; None
    /// when no point matches.
    pub fn value(&self, name: &str, filter: &[(&str, Value)]) -> Option<f64> {
        let points = self.points(name, filter);
        (!points.is_empty()).then(|| points.iter().map(|p| p.value).sum())
    }
}

/// Requests (newest first) merged into one snapshot: each series (metric,
/// resource and attributes) as its newest request has it.
fn merge_newest_first<'a>(
    requests: impl Iterator<Item = &'a Received<ExportMetricsServiceRequest>>,
    wanted: impl Fn(&MetricPoint) -> bool,
) -> Option<MetricsSnapshot> {
    let mut merged: Option<MetricsSnapshot> = None;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for received in requests {
        let snapshot = MetricsSnapshot::from_request(received);
        let fresh: Vec<MetricPoint> = snapshot
            .points
            .iter()
            .filter(|p| wanted(p))
            .filter(|p| seen.insert(format!("{}|{:?}|{:?}", p.name, p.resource, p.attributes)))
            .cloned()
            .collect();
        match merged.as_mut() {
            None => {
                merged = Some(MetricsSnapshot {
                    points: fresh,
                    ..snapshot
                })
            }
            Some(merged) => {
                merged.points.extend(fresh);
                merged.names.extend(snapshot.names);
            }
        }
    }
    merged
}

/// One log record, flattened, with its resource.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecordView {
    pub transport: Transport,
    pub event_name: String,
    pub severity_number: i32,
    pub severity_text: String,
    pub body: Value,
    pub attributes: BTreeMap<String, Value>,
    pub resource: BTreeMap<String, Value>,
    pub scope: String,
    pub time_unix_nano: u64,
}

/// One span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanView {
    pub name: String,
    pub kind: i32,
    pub attributes: BTreeMap<String, Value>,
    /// The attributes of the resource it came under.
    pub resource: BTreeMap<String, Value>,
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// How the receiver serves: see the module's documentation.
#[derive(Clone, Debug)]
pub struct ReceiverOptions {
    /// Serve both ports over TLS.
    pub tls: Option<ServerTls>,
    /// A header (name in lowercase, value) every request must carry.
    pub required_header: Option<(String, String)>,
    /// The HTTP server's paths for metrics, logs and traces.
    pub http_paths: [String; 3],
    /// Log records kept, at most (see [`DEFAULT_MAX_LOG_RECORDS`]).
    pub max_log_records: usize,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            tls: None,
            required_header: None,
            http_paths: ["/v1/metrics".into(), "/v1/logs".into(), "/v1/traces".into()],
            max_log_records: DEFAULT_MAX_LOG_RECORDS,
        }
    }
}

/// The servers' certificate chain and key (PEM) and, when given, the CA
/// that must sign the clients' certificates (mutual TLS).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// What both servers share: the store and the header rule.
#[derive(Clone)]
struct Collector {
    store: Shared,
    required_header: Option<(String, String)>,
}

/// Header names lowercased and text values of `headers`.
fn header_texts(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

impl Collector {
    /// Logs the request; whether the required header (if any) is there.
    fn admit(&self, signal: Signal, transport: Transport, path: &str, headers: &HeaderMap) -> bool {
        let headers = header_texts(headers);
        let admitted = self
            .required_header
            .as_ref()
            .is_none_or(|(name, value)| headers.get(name) == Some(value));
        lock(&self.store).log_request(RequestSeen {
            signal,
            transport,
            path: path.to_owned(),
            headers,
            refused: !admitted,
        });
        admitted
    }

    fn admit_grpc<T>(
        &self,
        signal: Signal,
        request: &tonic::Request<T>,
    ) -> Result<(), tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        if self.admit(signal, Transport::Grpc, "", &headers) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated(
                "the required header is missing or wrong",
            ))
        }
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.admit_grpc(Signal::Metrics, &request)?;
        lock(&self.store).add_metrics(Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.admit_grpc(Signal::Logs, &request)?;
        lock(&self.store).add_logs(Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.admit_grpc(Signal::Traces, &request)?;
        lock(&self.store).add_traces(Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Decodes an OTLP/HTTP binary-protobuf body, plain or gzip (JSON and
/// other encodings are refused with 415).
fn decode_http<T: Message + Default>(headers: &HeaderMap, body: &Bytes) -> Result<T, String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-protobuf" {
        return Err(format!(
            "content-type {content_type:?} is not application/x-protobuf"
        ));
    }
    let decoded;
    let bytes = match headers.get(header::CONTENT_ENCODING) {
        None => body.as_ref(),
        Some(encoding) if encoding == "gzip" => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body.as_ref()), &mut out)
                .map_err(|e| format!("cannot gunzip the body: {e}"))?;
            decoded = out;
            decoded.as_slice()
        }
        Some(encoding) => return Err(format!("content-encoding {encoding:?} is not supported")),
    };
    T::decode(bytes).map_err(|e| format!("cannot decode the protobuf body: {e}"))
}

fn protobuf_response<T: Message>(message: &T) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        message.encode_to_vec(),
    )
        .into_response()
}

fn http_export<T: Message + Default, R: Message + Default>(
    collector: &Collector,
    signal: Signal,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    add: impl FnOnce(&mut Store, T),
) -> Response {
    let path = uri.path();
    if !collector.admit(signal, Transport::Http, path, headers) {
        return (
            StatusCode::UNAUTHORIZED,
            "the required header is missing or wrong",
        )
            .into_response();
    }
    match decode_http::<T>(headers, body) {
        Ok(request) => {
            add(&mut lock(&collector.store), request);
            protobuf_response(&R::default())
        }
        Err(e) => {
            lock(&collector.store)
                .rejected
                .push(format!("POST {path}: {e}"));
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, e).into_response()
        }
    }
}

async fn http_metrics(
    State(collector): State<Collector>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    http_export::<ExportMetricsServiceRequest, ExportMetricsServiceResponse>(
        &collector,
        Signal::Metrics,
        &uri,
        &headers,
        &body,
        |s, r| s.add_metrics(Transport::Http, r),
    )
}

async fn http_logs(
    State(collector): State<Collector>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    http_export::<ExportLogsServiceRequest, ExportLogsServiceResponse>(
        &collector,
        Signal::Logs,
        &uri,
        &headers,
        &body,
        |s, r| s.add_logs(Transport::Http, r),
    )
}

async fn http_traces(
    State(collector): State<Collector>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    http_export::<ExportTraceServiceRequest, ExportTraceServiceResponse>(
        &collector,
        Signal::Traces,
        &uri,
        &headers,
        &body,
        |s, r| s.add_traces(Transport::Http, r),
    )
}

/// A request to a path no signal has: kept among the rejected, and 404.
async fn http_elsewhere(State(collector): State<Collector>, uri: Uri) -> Response {
    lock(&collector.store)
        .rejected
        .push(format!("{uri}: no signal has this path"));
    StatusCode::NOT_FOUND.into_response()
}

/// A listener on 127.0.0.1:`port` (0: any free port) with SO_REUSEADDR, so
/// that a restarted receiver can take its port back at once.
fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
}

/// The HTTP server's TLS configuration (rustls, as the agent's client).
fn rustls_config(tls: &ServerTls) -> std::io::Result<rustls::ServerConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(invalid)?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots.add(cert.map_err(invalid)?).map_err(invalid)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(invalid)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(chain, key).map_err(invalid)
}

/// A TLS listener for axum: connections whose handshake fails are dropped
/// and kept among the rejected, with why.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    store: Shared,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            // One handshake at a time is enough for the tests' one client;
            // the timeout keeps a stuck peer from blocking the next.
            let handshake = self.acceptor.accept(tcp);
            match tokio::time::timeout(Duration::from_secs(5), handshake).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => lock(&self.store)
                    .rejected
                    .push(format!("TLS handshake from {addr}: {e}")),
                Err(_) => lock(&self.store)
                    .rejected
                    .push(format!("TLS handshake from {addr}: timed out")),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Binds both listeners and serves them on a new runtime.
fn serve(
    store: &Shared,
    options: &ReceiverOptions,
    grpc_port: u16,
    http_port: u16,
) -> std::io::Result<(tokio::runtime::Runtime, u16, u16)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("otlp-receiver")
        .enable_all()
        .build()?;
    let (grpc, http) = runtime
        .block_on(async { Ok::<_, std::io::Error>((listen(grpc_port)?, listen(http_port)?)) })?;
    let grpc_port = grpc.local_addr()?.port();
    let http_port = http.local_addr()?.port();

    let collector = Collector {
        store: Arc::clone(store),
        required_header: options.required_header.clone(),
    };
    let gzip = tonic::codec::CompressionEncoding::Gzip;
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        let mut config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        grpc_builder = grpc_builder.tls_config(config).map_err(invalid)?;
    }
    let grpc_server = grpc_builder
        .add_service(MetricsServiceServer::new(collector.clone()).accept_compressed(gzip))
        .add_service(LogsServiceServer::new(collector.clone()).accept_compressed(gzip))
        .add_service(TraceServiceServer::new(collector.clone()).accept_compressed(gzip))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc));
    runtime.spawn(async move {
        if let Err(e) = grpc_server.await {
            eprintln!("otlp receiver: the gRPC server failed: {e}");
        }
    });

    let [metrics_path, logs_path, traces_path] = &options.http_paths;
    let app = axum::Router::new()
        .route(metrics_path, post(http_metrics))
        .route(logs_path, post(http_logs))
        .route(traces_path, post(http_traces))
        .fallback(http_elsewhere)
        .layer(DefaultBodyLimit::disable())
        .with_state(collector);
    match &options.tls {
        Some(tls) => {
            let listener = TlsListener {
                tcp: http,
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(rustls_config(tls)?)),
                store: Arc::clone(store),
            };
            runtime.spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    eprintln!("otlp receiver: the HTTPS server failed: {e}");
                }
            });
        }
        None => {
            runtime.spawn(async move {
                if let Err(e) = axum::serve(http, app).await {
                    eprintln!("otlp receiver: the HTTP server failed: {e}");
                }
            });
        }
    }
    Ok((runtime, grpc_port, http_port))
}

/// The receiver: both servers and what they received. Stopped on drop.
pub struct OtlpReceiver {
    pub grpc_port: u16,
    pub http_port: u16,
    store: Shared,
    options: ReceiverOptions,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OtlpReceiver {
    /// Starts both servers on free ports.
    pub fn start() -> OtlpReceiver {
        OtlpReceiver::start_with(ReceiverOptions::default())
    }

    /// Starts both servers, keeping at most `max_log_records` log records.
    pub fn start_keeping(max_log_records: usize) -> OtlpReceiver {
        OtlpReceiver::start_with(ReceiverOptions {
            max_log_records,
            ..ReceiverOptions::default()
        })
    }

    /// Starts both servers as `options` say.
    pub fn start_with(options: ReceiverOptions) -> OtlpReceiver {
        let store = Arc::new(Mutex::new(Store::new(options.max_log_records)));
        let (runtime, grpc_port, http_port) = serve(&store, &options, 0, 0)
            .unwrap_or_else(|e| panic!("cannot start the OTLP receiver: {e}"));
        OtlpReceiver {
            grpc_port,
            http_port,
            store,
            options,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT` of the gRPC server.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// `http://127.0.0.1:PORT` of the HTTP server (signal paths not included).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }

    /// Closes both listeners and every open connection, and waits until
    /// neither port listens any more.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
        let closed = wait_until(Duration::from_secs(10), || {
            (!tcp_listening(self.grpc_port) && !tcp_listening(self.http_port)).then_some(())
        });
        assert!(
            closed.is_some(),
            "the OTLP receiver's ports {} and {} still listen after stop",
            self.grpc_port,
            self.http_port
        );
    }

    /// Listens again on the same ports (retrying for a few seconds if the
    /// kernel has not let go of them yet).
    pub fn start_again(&mut self) {
        assert!(self.runtime.is_none(), "the receiver is already running");
        let mut last_error = None;
        let started = wait_until(Duration::from_secs(10), || {
            match serve(&self.store, &self.options, self.grpc_port, self.http_port) {
                Ok((runtime, _, _)) => Some(runtime),
                Err(e) => {
                    last_error = Some(e);
                    None
                }
            }
        });
        match started {
            Some(runtime) => self.runtime = Some(runtime),
            None => panic!(
                "cannot listen on ports {} and {} again: {last_error:?}",
                self.grpc_port, self.http_port
            ),
        }
    }

    /// Requests received for `signal` over `transport` (None: either).
    pub fn requests(&self, signal: Signal, transport: Option<Transport>) -> u64 {
        lock(&self.store)
            .requests
            .iter()
            .filter(|((s, t), _)| *s == signal && transport.is_none_or(|want| want == *t))
            .map(|(_, n)| n)
            .sum()
    }

    /// Log records received in all, also those no longer kept.
    pub fn log_records_total(&self) -> u64 {
        lock(&self.store).log_records_total
    }

    /// Spans received in all.
    pub fn spans_total(&self) -> u64 {
        lock(&self.store).spans_total
    }

    /// HTTP requests that could not be decoded or went to a path no
    /// signal has, and failed TLS handshakes (HTTP), with why.
    pub fn rejected(&self) -> Vec<String> {
        lock(&self.store).rejected.clone()
    }

    /// The newest requests (up to 2,000), oldest first, refused ones too.
    pub fn request_log(&self) -> Vec<RequestSeen> {
        lock(&self.store).request_log.iter().cloned().collect()
    }

    /// Requests refused for a missing or wrong required header.
    pub fn refused(&self) -> u64 {
        lock(&self.store).refused
    }

    /// Every metrics request kept, oldest first.
    pub fn metric_snapshots(&self) -> Vec<MetricsSnapshot> {
        lock(&self.store)
            .metrics
            .iter()
            .map(MetricsSnapshot::from_request)
            .collect()
    }

    /// The newest metrics request.
    pub fn latest_metrics(&self) -> Option<MetricsSnapshot> {
        lock(&self.store)
            .metrics
            .back()
            .map(MetricsSnapshot::from_request)
    }

    /// The newest state of every series among the requests received within
    /// `window` before the newest one: the agent pushes each export as one
    /// request for its own metrics and one per application (each under its
    /// own resource), so no single request holds every series.
    pub fn latest_export(&self, window: Duration) -> Option<MetricsSnapshot> {
        let store = lock(&self.store);
        let newest = store.metrics.back()?.at;
        let requests = store
            .metrics
            .iter()
            .rev()
            .take_while(|received| newest.duration_since(received.at) <= window);
        merge_newest_first(requests, |_| true)
    }

    /// The newest point of every series of metric `name`, over every
    /// request received (each application's series come in a request of
    /// its own).
    pub fn latest_with(&self, name: &str) -> Option<MetricsSnapshot> {
        let store = lock(&self.store);
        merge_newest_first(store.metrics.iter().rev(), |p| p.name == name)
            .filter(|s| s.names.contains(name))
    }

    /// The latest value of metric `name`: the sum over the data points
    /// whose attributes include `filter` (histograms: their counts), in the
    /// newest request that holds the metric. None if no such point.
    pub fn metric_value(&self, name: &str, filter: &[(&str, Value)]) -> Option<f64> {
        self.latest_with(name)?.value(name, filter)
    }

    /// Names of every metric received so far.
    pub fn metric_names(&self) -> BTreeSet<String> {
        self.metric_snapshots()
            .into_iter()
            .flat_map(|s| s.names)
            .collect()
    }

    /// Every log record kept, oldest first.
    pub fn log_records(&self) -> Vec<LogRecordView> {
        let store = lock(&self.store);
        let mut out = Vec::new();
        for received in &store.logs {
            for rl in &received.request.resource_logs {
                let resource = resource_attributes(rl.resource.as_ref());
                for sl in &rl.scope_logs {
                    let scope = sl
                        .scope
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    for record in &sl.log_records {
                        out.push(LogRecordView {
                            transport: received.transport,
                            event_name: record.event_name.clone(),
                            severity_number: record.severity_number,
                            severity_text: record.severity_text.clone(),
                            body: record.body.as_ref().map_or(Value::Null, any_value_json),
                            attributes: attributes(&record.attributes),
                            resource: resource.clone(),
                            scope: scope.clone(),
                            time_unix_nano: record.time_unix_nano,
                        });
                    }
                }
            }
        }
        out
    }

    /// The kept log records with event name `event_name`, oldest first.
    pub fn events(&self, event_name: &str) -> Vec<LogRecordView> {
        self.log_records()
            .into_iter()
            .filter(|r| r.event_name == event_name)
            .collect()
    }

    /// Every request kept, of every signal, encoded as protobuf again: a
    /// string anywhere in what arrived (attribute, body, name, resource) is
    /// in these bytes as UTF-8, whatever field holds it.
    pub fn encoded_requests(&self) -> Vec<(Signal, Vec<u8>)> {
        let store = lock(&self.store);
        let metrics = store
            .metrics
            .iter()
            .map(|r| (Signal::Metrics, r.request.encode_to_vec()));
        let logs = store
            .logs
            .iter()
            .map(|r| (Signal::Logs, r.request.encode_to_vec()));
        let traces = store
            .traces
            .iter()
            .map(|r| (Signal::Traces, r.request.encode_to_vec()));
        metrics.chain(logs).chain(traces).collect()
    }

    /// Every span kept, oldest first, flattened.
    pub fn spans(&self) -> Vec<SpanView> {
        let store = lock(&self.store);
        let mut out = Vec::new();
        for received in &store.traces {
            for rs in &received.request.resource_spans {
                let resource = resource_attributes(rs.resource.as_ref());
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        out.push(SpanView {
                            name: span.name.clone(),
                            kind: span.kind,
                            attributes: attributes(&span.attributes),
                            resource: resource.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Resource attributes of the newest request of `signal`.
    pub fn resource(&self, signal: Signal) -> Option<BTreeMap<String, Value>> {
        let store = lock(&self.store);
        let resource = match signal {
            Signal::Metrics => store
                .metrics
                .back()
                .and_then(|r| r.request.resource_metrics.first())
                .map(|r| resource_attributes(r.resource.as_ref())),
            Signal::Logs => store
                .logs
                .back()
                .and_then(|r| r.request.resource_logs.first())
                .map(|r| resource_attributes(r.resource.as_ref())),
            Signal::Traces => store
                .traces
                .back()
                .and_then(|r| r.request.resource_spans.first())
                .map(|r| resource_attributes(r.resource.as_ref())),
        };
        resource
    }

    /// Every distinct resource that metrics came under (the agent's own,
    /// and one per application).
    pub fn metric_resources(&self) -> Vec<BTreeMap<String, Value>> {
        let store = lock(&self.store);
        let mut resources: Vec<BTreeMap<String, Value>> = Vec::new();
        for received in &store.metrics {
            for rm in &received.request.resource_metrics {
                let resource = resource_attributes(rm.resource.as_ref());
                if !resources.contains(&resource) {
                    resources.push(resource);
                }
            }
        }
        resources
    }

    /// The resource the agent's own metrics (`service.name=poolscope`)
    /// came under.
    pub fn agent_metrics_resource(&self) -> Option<BTreeMap<String, Value>> {
        self.metric_resources()
            .into_iter()
            .find(|r| r.get("service.name").and_then(Value::as_str) == Some("poolscope"))
    }

    /// One line of what arrived, for failure messages.
    pub fn summary(&self) -> String {
        let store = lock(&self.store);
        let requests: Vec<String> = store
            .requests
            .iter()
            .map(|((s, t), n)| format!("{s:?}/{t:?}: {n}"))
            .collect();
        format!(
            "OTLP receiver (gRPC {}, HTTP {}, {}): requests [{}], {} log records, {} spans, \
             {} refused for the header, {} rejected {:?}",
            self.grpc_port,
            self.http_port,
            if self.runtime.is_some() {
                "running"
            } else {
                "stopped"
            },
            requests.join(", "),
            store.log_records_total,
            store.spans_total,
            store.refused,
            store.rejected.len(),
            store.rejected.iter().take(3).collect::<Vec<_>>(),
        )
    }

    /// Calls `f` every 100 ms until it returns `Some`, for at most
    /// `timeout`; panics with `what` and [`Self::summary`] otherwise.
    #[track_caller]
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&OtlpReceiver) -> Option<T>,
    ) -> T {
        match wait_until(timeout, || f(self)) {
            Some(found) => found,
            None => panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.summary()
            ),
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
