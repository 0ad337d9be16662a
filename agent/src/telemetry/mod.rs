//! Every instrument the agent exports, as OpenTelemetry instruments on one
//! meter, built from their declarations in `agent/telemetry-catalogue`.
//! Prometheus reads them through the opentelemetry-prometheus exporter and
//! OTLP reads the same meter, so the two can never disagree on names, units
//! or values.
//!
//! Names follow the OpenTelemetry rules; the exporter derives the Prometheus
//! names (dots to underscores, unit suffix, `_total` for counters).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use anyhow::Context;
use opentelemetry::{
    metrics::{Counter, Histogram, Meter, MeterProvider},
    KeyValue, StringValue,
};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

pub mod apps;
pub mod attributes;
mod instruments;
pub mod otlp;
pub mod records;

use instruments::{
    counter, histogram, observable_counter, observable_f64_counter, observable_gauge,
    observable_up_down_counter,
};
use telemetry_catalogue::{self as catalogue, attr};

use crate::{
    adapter::message::AcquireResult,
    clock::monotonic_ns,
    lifecycle::{Endpoint, Output},
    percentiles::Latencies,
    protocol::DbSystem,
    reports::LeakChange,
    state::{KernelCounters, Shared, State},
};

/// What the observable instruments read at collection time.
pub struct Observed {
    /// Who we are (service.name, host.name, version).
    pub resource: opentelemetry_sdk::Resource,
    /// Push the same instruments over OTLP too, when configured.
    pub otlp_reader: Option<otlp::MetricReaders>,
    pub export_counters: Option<Arc<otlp::ExportCounters>>,
    /// Read at collection time; broken state shows nothing (the failure is
    /// on /healthz and the agent is stopping).
    pub state: Arc<Shared<State>>,
    /// Bound on distinct (process, server) series per gauge.
    pub max_series: usize,
    /// Processes with telemetry of their own at most (`_other` for the rest).
    pub max_applications: usize,
    /// The agent's host, on every application's resource.
    pub host_name: String,
    /// `[metrics]`: attributes added to or dropped from metrics.
    pub attributes: attributes::MetricsConfig,
    /// The applications' resources, shared with the OTLP log export.
    pub resources: Arc<apps::ApplicationResources>,
    /// How long an exited process's series stay on /metrics
    /// ([`apps::EXITED_SERIES_GRACE`]).
    pub exited_series_grace: std::time::Duration,
    /// `[queries] slow_threshold_ms`: round trips this long are counted
    /// as slow.
    pub slow_threshold_ns: u64,
}

pub struct Telemetry {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    connects: Counter<u64>,
    connect_duration: Histogram<f64>,
    lifetime: Histogram<f64>,
    events: Counter<u64>,
    events_unmatched: Counter<u64>,
    decode_errors: Counter<u64>,
    slow_threshold_ns: u64,
    protocol_lost: Counter<u64>,
    operation_names: OperationNames,
    /// Successful round trips go to bound series (see
    /// [`apps::App::record_round_trip`]), unless `[metrics.attributes]`
    /// adds to or drops from their attributes.
    bind_round_trips: bool,
    /// `db.query.summary` values, when opted in.
    query_summaries: Option<BoundedValues>,
    /// `db.collection.name` values, when opted in.
    collections: Option<BoundedValues>,
    /// Each observed application's instruments, under its own resource.
    apps: Arc<apps::Applications>,
    adapter_messages: Counter<u64>,
    leak_reports: Counter<u64>,
    unpublished: Counter<u64>,
    server_attributes: ServerAttributes,
    /// Percentiles over a sliding window, for the API (the histograms
    /// above are cumulative, for Prometheus and OTLP to take apart).
    latencies: Mutex<Latencies>,
}

/// A mutex locked at its first use and held until dropped: one lock for a
/// batch of outputs, none for a batch that needs none.
struct LockOnUse<'a, T> {
    mutex: &'a Mutex<T>,
    guard: Option<MutexGuard<'a, T>>,
}

impl<'a, T> LockOnUse<'a, T> {
    fn new(mutex: &'a Mutex<T>) -> Self {
        LockOnUse { mutex, guard: None }
    }

    fn get(&mut self) -> &mut T {
        // What the lock guards stays valid whatever panicked holding it.
        self.guard
            .get_or_insert_with(|| self.mutex.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The server attributes of round trips, built once per server and
/// database: formatting an address on every round trip was a tenth of the
/// agent's CPU under load.
#[derive(Default)]
struct ServerAttributes {
    by_server: Mutex<std::collections::HashMap<ServerKey, ServerEntry>>,
}

type ServerKey = (DbSystem, Endpoint);

#[derive(Default)]
struct ServerEntry {
    /// Without `db.namespace` (the parser has not seen the database).
    plain: Option<Arc<[KeyValue]>>,
    /// With each `db.namespace` seen, at most [`ServerAttributes::MAX_NAMESPACES`].
    by_namespace: std::collections::HashMap<Box<str>, Arc<[KeyValue]>>,
}

impl ServerAttributes {
    /// Servers remembered at most; past it the cache starts over, so an
    /// agent that sees many servers stays bounded.
    const MAX: usize = 4096;
    /// Databases named per server at most: a client chooses the database
    /// it asks for, so any local user could otherwise mint series; the
    /// rest share `db.namespace="_OTHER"`.
    const MAX_NAMESPACES: usize = 16;

    fn get(&self, system: DbSystem, remote: &Endpoint, namespace: Option<&str>) -> Arc<[KeyValue]> {
        // A cache stays valid whatever panicked while holding it.
        let mut cache = self
            .by_server
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(attrs) =
            cache
                .get(&(system, remote.clone()))
                .and_then(|entry| match namespace {
                    None => entry.plain.clone(),
                    Some(ns) => entry.by_namespace.get(ns).cloned(),
                })
        {
            return attrs;
        }
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        let entry = cache.entry((system, remote.clone())).or_default();
        let mut attrs = database_server_attributes(system, remote);
        match namespace {
            None => {
                let attrs: Arc<[KeyValue]> = attrs.into();
                entry.plain = Some(Arc::clone(&attrs));
                attrs
            }
            Some(ns) => {
                let key: &str = if entry.by_namespace.len() < Self::MAX_NAMESPACES {
                    ns
                } else {
                    "_OTHER"
                };
                if let Some(attrs) = entry.by_namespace.get(key) {
                    return Arc::clone(attrs);
                }
                attrs.push(KeyValue::new(attr::DB_NAMESPACE, key.to_string()));
                let attrs: Arc<[KeyValue]> = attrs.into();
                entry.by_namespace.insert(key.into(), Arc::clone(&attrs));
                attrs
            }
        }
    }
}

/// `db.system.name`, `server.address` and `server.port` (TCP): the
/// attributes that say which database server, on metrics and spans alike.
pub fn database_server_attributes(system: DbSystem, remote: &Endpoint) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new(attr::DB_SYSTEM_NAME, system.as_str()),
        KeyValue::new(attr::SERVER_ADDRESS, remote.address()),
    ];
    if let Some(port) = remote.port() {
        attrs.push(KeyValue::new(attr::SERVER_PORT, i64::from(port)));
    }
    attrs
}

/// SQL statements' first keywords that may become `db.operation.name`.
/// Anything else (a typo, a fragment after lost framing) is left unnamed so
/// that label values stay few and meaningful.
const SQL_OPERATIONS: &[&str] = &[
    "ABORT",
    "ALTER",
    "ANALYZE",
    "BEGIN",
    "CALL",
    "CHECK",
    "CHECKPOINT",
    "CHECKSUM",
    "CLOSE",
    "CLUSTER",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DESC",
    "DESCRIBE",
    "DISCARD",
    "DO",
    "DROP",
    "END",
    "EXECUTE",
    "EXPLAIN",
    "FETCH",
    "FLUSH",
    "GRANT",
    "HANDLER",
    "IMPORT",
    "INSERT",
    "INSTALL",
    "KILL",
    "LISTEN",
    "LOAD",
    "LOCK",
    "MERGE",
    "MOVE",
    "NOTIFY",
    "OPTIMIZE",
    // MySQL COM_PING, which the parser names like a statement.
    "PING",
    "PREPARE",
    "PURGE",
    "REASSIGN",
    "REFRESH",
    "REINDEX",
    "RELEASE",
    "RENAME",
    "REPAIR",
    "REPLACE",
    "RESET",
    "RESIGNAL",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SELECT",
    "SET",
    "SHOW",
    "SHUTDOWN",
    "SIGNAL",
    "START",
    "TABLE",
    "TRUNCATE",
    "UNINSTALL",
    "UNLISTEN",
    "UNLOCK",
    "UPDATE",
    "USE",
    "VACUUM",
    "VALUES",
    "WITH",
    "XA",
];

/// Most distinct Redis command names kept as label values.
const MAX_COMMAND_NAMES: usize = 256;

/// Bounds the values of `db.operation.name`.
#[derive(Default)]
struct OperationNames {
    /// Shared, so that naming a known command allocates nothing.
    commands: Mutex<HashSet<Arc<str>>>,
}

impl OperationNames {
    /// The operation as an attribute value, or None if it is not one to
    /// name: a static name for SQL, a shared one for Redis (no allocation
    /// per round trip either way).
    fn bounded(&self, system: DbSystem, operation: &str) -> Option<StringValue> {
        match system {
            DbSystem::Postgresql | DbSystem::Mysql => SQL_OPERATIONS
                .binary_search(&operation)
                .ok()
                .map(|i| StringValue::from(SQL_OPERATIONS[i])),
            DbSystem::Redis => {
                let plausible = !operation.is_empty()
                    && operation.len() <= 32
                    && operation
                        .bytes()
                        .all(|b| b.is_ascii_alphabetic() || b == b' ' || b == b'_');
                if !plausible {
                    return None;
                }
                let mut seen = self.commands.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(name) = seen.get(operation) {
                    return Some(StringValue::from(Arc::clone(name)));
                }
                if seen.len() >= MAX_COMMAND_NAMES {
                    return Some(StringValue::from("_OTHER"));
                }
                let name: Arc<str> = Arc::from(operation);
                seen.insert(Arc::clone(&name));
                Some(StringValue::from(name))
            }
        }
    }
}

/// Distinct `db.query.summary` values at most, and `db.collection.name`
/// ones (the catalogue says so too).
const MAX_QUERY_SUMMARIES: usize = 1024;
const MAX_COLLECTIONS: usize = 256;

/// Values of an attribute that any client chooses (its statements), at
/// most `max` distinct ones; the rest are `_OTHER`.
struct BoundedValues {
    max: usize,
    seen: Mutex<HashSet<Arc<str>>>,
}

impl BoundedValues {
    fn new(max: usize) -> BoundedValues {
        BoundedValues {
            max,
            seen: Mutex::default(),
        }
    }

    /// Shared, so that a value seen before allocates nothing.
    fn get(&self, value: &str) -> StringValue {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = seen.get(value) {
            return StringValue::from(Arc::clone(known));
        }
        if seen.len() >= self.max {
            return StringValue::from("_OTHER");
        }
        let value: Arc<str> = Arc::from(value);
        seen.insert(Arc::clone(&value));
        StringValue::from(value)
    }
}

/// The view of a provider: at most `series_limit` series per instrument,
/// and the attributes `[metrics.attributes]` keeps.
pub fn attributes_view(
    config: &attributes::MetricsConfig,
    series_limit: usize,
) -> impl Fn(&opentelemetry_sdk::metrics::Instrument) -> Option<opentelemetry_sdk::metrics::Stream>
       + Send
       + Sync
       + 'static {
    let kept: std::collections::HashMap<String, HashSet<opentelemetry::Key>> =
        catalogue::INSTRUMENTS
            .iter()
            .filter_map(|i| Some((i.name.to_string(), config.kept(i.name)?)))
            .collect();
    move |instrument| {
        let mut stream =
            opentelemetry_sdk::metrics::Stream::builder().with_cardinality_limit(series_limit);
        if let Some(keys) = kept.get(instrument.name()) {
            stream = stream.with_allowed_attribute_keys(keys.iter().cloned());
        }
        stream.build().ok()
    }
}

/// The last export's bound at shutdown.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

impl Telemetry {
    pub fn new(mut observed: Observed) -> anyhow::Result<Telemetry> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .context("cannot build the Prometheus exporter")?;
        // Every series the agent observes is bounded by `max_series` (pools
        // and servers; `db.client.connection.count` has two states per
        // pool), so the SDK's own limit must sit above that: its overflow
        // series would fold a legitimate pool into `otel_metric_overflow`.
        let series_limit = observed
            .max_series
            .saturating_mul(2)
            .saturating_add(16)
            .max(2000);
        let mut builder = SdkMeterProvider::builder()
            .with_resource(observed.resource.clone())
            .with_reader(exporter)
            .with_view(attributes_view(&observed.attributes, series_limit));
        let mut apps_otlp = None;
        if let Some(readers) = observed.otlp_reader.take() {
            builder = builder.with_reader(readers.main);
            apps_otlp = Some(readers.apps);
        }
        let provider = builder.build();
        let apps = Arc::new(apps::Applications::new(
            Arc::clone(&observed.state),
            apps::ApplicationsConfig {
                max_applications: observed.max_applications,
                max_series: observed.max_series,
                host_name: observed.host_name.clone(),
                otlp: apps_otlp.is_some(),
                attributes: observed.attributes.clone(),
                resources: Arc::clone(&observed.resources),
                exited_series_grace: observed.exited_series_grace,
            },
        ));
        if let Some(export) = apps_otlp {
            let interval = export.interval();
            apps.start_export(interval, move |metrics| export.export(metrics))?;
        }
        let meter = provider.meter("poolscope");
        register_application_observables(&meter, &apps.counts);
        let telemetry = Telemetry {
            connects: counter(&meter, &catalogue::CONNECTS),
            connect_duration: histogram(&meter, &catalogue::CONNECT_DURATION),
            lifetime: histogram(&meter, &catalogue::CONNECTION_LIFETIME),
            events: counter(&meter, &catalogue::KERNEL_EVENTS),
            events_unmatched: counter(&meter, &catalogue::KERNEL_EVENTS_UNMATCHED),
            decode_errors: counter(&meter, &catalogue::KERNEL_EVENTS_MALFORMED),
            slow_threshold_ns: observed.slow_threshold_ns,
            protocol_lost: counter(&meter, &catalogue::PROTOCOL_LOST),
            operation_names: OperationNames::default(),
            bind_round_trips: !observed
                .attributes
                .attributes
                .contains_key(catalogue::OPERATION_DURATION.name),
            query_summaries: observed
                .attributes
                .adds(catalogue::OPERATION_DURATION.name, attr::DB_QUERY_SUMMARY)
                .then(|| BoundedValues::new(MAX_QUERY_SUMMARIES)),
            collections: observed
                .attributes
                .adds(catalogue::OPERATION_DURATION.name, attr::DB_COLLECTION_NAME)
                .then(|| BoundedValues::new(MAX_COLLECTIONS)),
            server_attributes: ServerAttributes::default(),
            adapter_messages: counter(&meter, &catalogue::ADAPTER_MESSAGES),
            leak_reports: counter(&meter, &catalogue::LEAK_REPORTS),
            unpublished: counter(&meter, &catalogue::REPORTS_UNPUBLISHED),
            apps,
            latencies: Mutex::default(),
            registry,
            provider,
        };
        register_observables(&meter, observed);
        Ok(telemetry)
    }

    pub fn record(&self, outputs: &[Output]) {
        self.events.add(1, &[]);
        // Taken once per call, and only if an output needs it.
        let mut latencies = LockOnUse::new(&self.latencies);
        let mut now_ns = None;
        for output in outputs {
            match output {
                Output::ConnectFinished {
                    remote,
                    outcome,
                    latency_ns,
                    ..
                } => {
                    let attrs = [
                        KeyValue::new(attr::RESULT, outcome.as_str()),
                        KeyValue::new(attr::NETWORK_TRANSPORT, remote.transport()),
                    ];
                    self.connects.add(1, &attrs);
                    if let Some(ns) = latency_ns {
                        self.connect_duration.record(*ns as f64 / 1e9, &attrs);
                    }
                }
                Output::Closed {
                    remote,
                    lifetime_ns,
                    seen_at_start,
                    ..
                } => {
                    // A seeded connection's lifetime is only a lower bound.
                    if !seen_at_start {
                        self.lifetime.record(
                            *lifetime_ns as f64 / 1e9,
                            &[KeyValue::new(attr::NETWORK_TRANSPORT, remote.transport())],
                        );
                    }
                }
                Output::RoundTrip {
                    id,
                    remote,
                    system,
                    trip,
                    ..
                } => {
                    let server =
                        self.server_attributes
                            .get(*system, remote, trip.namespace.as_deref());
                    let operation = trip
                        .operation
                        .as_deref()
                        .and_then(|operation| self.operation_names.bounded(*system, operation));
                    let duration_ns = trip.end_ns.saturating_sub(trip.start_ns);
                    latencies.get().record_query(
                        *system,
                        remote,
                        operation.as_ref().map(StringValue::as_str),
                        duration_ns,
                        trip.end_ns,
                    );
                    let seconds = duration_ns as f64 / 1e9;
                    let attributes = || {
                        let mut attrs = Vec::with_capacity(server.len() + 3);
                        attrs.extend_from_slice(&server);
                        if let Some(name) = &operation {
                            attrs.push(KeyValue::new(attr::DB_OPERATION_NAME, name.clone()));
                        }
                        attrs
                    };
                    self.apps.with(id.pid, |app| {
                        // The same rule as the slow-query reports (reports.rs).
                        if duration_ns >= self.slow_threshold_ns {
                            app.slow_queries.add(1, &attributes());
                        }
                        if trip.error.is_none() && self.bind_round_trips {
                            return app.record_round_trip(
                                &server,
                                operation.as_ref(),
                                seconds,
                                attributes,
                            );
                        }
                        let mut attrs = attributes();
                        if self.query_summaries.is_some() || self.collections.is_some() {
                            self.summarize(*system, trip, &mut attrs);
                        }
                        if let Some(error) = &trip.error {
                            // The conventions' status code is the server's
                            // own code; error.type repeats it, as they advise.
                            let code = StringValue::from(error.code.clone());
                            attrs.push(KeyValue::new(attr::DB_RESPONSE_STATUS_CODE, code.clone()));
                            attrs.push(KeyValue::new(attr::ERROR_TYPE, code));
                        }
                        app.operation_duration.record(seconds, &attrs);
                    });
                }
                Output::ProtocolLost { .. } => self.protocol_lost.add(1, &[]),
                Output::AcquireFinished {
                    pid,
                    pool,
                    wait_ns,
                    result,
                    ..
                } => {
                    let error = match result {
                        AcquireResult::Ok => None,
                        AcquireResult::Timeout => Some("timeout"),
                        AcquireResult::Error => Some("error"),
                    };
                    self.apps.with(*pid, |app| {
                        app.record_pool(apps::PoolSeries::Wait, pool, *wait_ns as f64 / 1e9, error)
                    });
                    let now = *now_ns.get_or_insert_with(monotonic_ns);
                    latencies
                        .get()
                        .record_pool(*pid, pool, now, &[*wait_ns], &[]);
                }
                Output::CheckoutsFolded {
                    pid,
                    pool,
                    waits_ns,
                    uses_ns,
                    ..
                } => {
                    self.apps
                        .with(*pid, |app| app.record_folded(pool, waits_ns, uses_ns));
                    let now = *now_ns.get_or_insert_with(monotonic_ns);
                    latencies
                        .get()
                        .record_pool(*pid, pool, now, waits_ns, uses_ns);
                }
                Output::Released { pid, pool, use_ns } => {
                    self.apps.with(*pid, |app| {
                        app.record_pool(apps::PoolSeries::Use, pool, *use_ns as f64 / 1e9, None)
                    });
                    let now = *now_ns.get_or_insert_with(monotonic_ns);
                    latencies
                        .get()
                        .record_pool(*pid, pool, now, &[], &[*use_ns]);
                }
                Output::PoolConnectionCreated {
                    pid,
                    pool,
                    create_ns,
                } => {
                    self.apps.with(*pid, |app| {
                        app.record_pool(
                            apps::PoolSeries::Create,
                            pool,
                            *create_ns as f64 / 1e9,
                            None,
                        )
                    });
                }
                Output::PeerClosed { .. }
                | Output::NotDatabase { .. }
                | Output::Detected { .. }
                | Output::Encrypted { .. } => {}
                Output::Unmatched => self.events_unmatched.add(1, &[]),
                Output::AdapterRefused { reason } => {
                    self.record_adapter_message("rejected", reason)
                }
            }
        }
    }

    /// What `f` reads off the percentile windows.
    pub fn percentiles<T>(&self, f: impl FnOnce(&Latencies) -> T) -> T {
        f(LockOnUse::new(&self.latencies).get())
    }

    /// Counts `n` accepted adapter messages at once.
    pub fn record_adapter_messages_accepted(&self, n: u64) {
        if n > 0 {
            self.adapter_messages
                .add(n, &[KeyValue::new(attr::RESULT, "accepted")]);
        }
    }

    pub fn record_adapter_message(&self, result: &'static str, reason: &'static str) {
        if reason.is_empty() {
            self.adapter_messages
                .add(1, &[KeyValue::new(attr::RESULT, result)]);
        } else {
            self.adapter_messages.add(
                1,
                &[
                    KeyValue::new(attr::RESULT, result),
                    KeyValue::new(attr::REASON, reason),
                ],
            );
        }
    }

    pub fn record_leak_changes(&self, changes: &[LeakChange]) {
        for change in changes {
            if let LeakChange::Opened(report) = change {
                self.leak_reports
                    .add(1, &[KeyValue::new(attr::KIND, report.kind.as_str())]);
            }
        }
    }

    pub fn record_unpublished(&self, why: crate::reports::Unpublished) {
        self.unpublished
            .add(1, &[KeyValue::new(attr::REASON, why.as_str())]);
    }

    /// `db.query.summary` and `db.collection.name` (opt-in): read from the
    /// sanitized statement, SQL only, bounded in values.
    fn summarize(
        &self,
        system: DbSystem,
        trip: &crate::protocol::RoundTrip,
        attrs: &mut Vec<KeyValue>,
    ) {
        if system == DbSystem::Redis {
            return;
        }
        let Some(summary) = trip
            .query_text()
            .and_then(|text| crate::protocol::query_summary(&text))
        else {
            return;
        };
        if let Some(values) = &self.query_summaries {
            attrs.push(KeyValue::new(
                attr::DB_QUERY_SUMMARY,
                values.get(&summary.summary),
            ));
        }
        if let (Some(values), Some(collection)) = (&self.collections, &summary.collection) {
            attrs.push(KeyValue::new(
                attr::DB_COLLECTION_NAME,
                values.get(collection),
            ));
        }
    }

    pub fn record_decode_error(&self) {
        self.decode_errors.add(1, &[]);
    }

    /// Remembers what a process is, for its application's resource.
    pub fn learn_application(&self, pid: u32, identity: crate::identity::Identity) {
        self.apps.learn(pid, identity);
    }

    /// Gives each `active` process (with database connections, pools or
    /// open reports) its application, and lets go of those of processes
    /// no longer `known`. Called by housekeeping.
    pub fn sync_applications(&self, known: &HashSet<u32>, active: &HashSet<u32>) {
        self.apps.sync(known, active);
    }

    /// The Prometheus text exposition format 0.0.4.
    pub fn render_prometheus(&self) -> anyhow::Result<String> {
        // Each application's series are families of the same names: one
        // family each, its samples from every application.
        let mut by_name: BTreeMap<String, prometheus::proto::MetricFamily> = BTreeMap::new();
        for mut family in self.registry.gather().into_iter().chain(self.apps.gather()) {
            match by_name.get_mut(family.name()) {
                Some(merged) => merged.mut_metric().extend(family.take_metric()),
                None => {
                    by_name.insert(family.name().to_string(), family);
                }
            }
        }
        let families: Vec<_> = by_name.into_values().collect();
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .context("cannot encode metrics")?;
        String::from_utf8(buf).context("metrics are not UTF-8")
    }

    /// The last exports of the agent's and the applications' metrics,
    /// side by side so that a hung collector costs one timeout, not two.
    pub fn shutdown(&self) {
        std::thread::scope(|scope| {
            let apps = std::thread::Builder::new()
                .name("poolscope-apps-flush".into())
                .spawn_scoped(scope, || self.apps.shutdown(SHUTDOWN_TIMEOUT));
            if let Err(e) = self.provider.shutdown() {
                log::debug!("meter provider shutdown: {e}");
            }
            if apps.is_err() {
                self.apps.shutdown(SHUTDOWN_TIMEOUT);
            }
        });
    }
}

/// Self-metrics of the OTLP export.
fn register_export_observables(meter: &Meter, counters: Arc<otlp::ExportCounters>) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = Arc::clone(&counters);
    observable_counter(meter, &catalogue::EXPORT_BATCHES, move |obs| {
        for (signal, result, value) in [
            ("metrics", "ok", c.metric_batches_ok.load(Relaxed)),
            ("metrics", "failed", c.metric_batches_failed.load(Relaxed)),
            ("logs", "ok", c.log_batches_ok.load(Relaxed)),
            ("logs", "failed", c.log_batches_failed.load(Relaxed)),
        ] {
            obs.observe(
                value,
                &[
                    KeyValue::new(attr::SIGNAL, signal),
                    KeyValue::new(attr::RESULT, result),
                ],
            );
        }
    });
    let c = Arc::clone(&counters);
    observable_counter(meter, &catalogue::EXPORT_DROPPED, move |obs| {
        obs.observe(
            c.events_dropped.load(Relaxed),
            &[KeyValue::new(attr::SIGNAL, "logs")],
        )
    });
    observable_up_down_counter(meter, &catalogue::EXPORT_QUEUED, move |obs| {
        obs.observe(
            counters.events_queued.load(Relaxed) as i64,
            &[KeyValue::new(attr::SIGNAL, "logs")],
        )
    });
}

/// How many applications have telemetry of their own, and how many were
/// folded into `_other`.
fn register_application_observables(meter: &Meter, counts: &Arc<apps::ApplicationCounts>) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = Arc::clone(counts);
    observable_up_down_counter(meter, &catalogue::APPLICATIONS, move |obs| {
        obs.observe(c.live.load(Relaxed) as i64, &[])
    });
    let c = Arc::clone(counts);
    observable_counter(meter, &catalogue::APPLICATIONS_FOLDED, move |obs| {
        obs.observe(c.folded.load(Relaxed), &[])
    });
}

// The SDK keeps the callbacks alive; the instruments' handles need not be
// stored.
fn register_observables(meter: &Meter, observed: Observed) {
    let Observed {
        state,
        export_counters,
        ..
    } = observed;
    if let Some(counters) = export_counters {
        register_export_observables(meter, counters);
    }
    let bindings = Arc::clone(&state);
    observable_counter(meter, &catalogue::ADAPTER_CONNECTIONS_BOUND, move |obs| {
        if let Ok(stats) = bindings.with(|s| s.tracker.binding_stats()) {
            for (result, n) in [
                ("bound", stats.bound),
                ("ambiguous", stats.ambiguous),
                ("refused", stats.refused),
            ] {
                obs.observe(n, &[KeyValue::new(attr::RESULT, result)]);
            }
        }
    });
    // Plain kernel counters: one observable each, read from the last sample.
    type Reading = fn(&KernelCounters) -> u64;
    let counters: [(&'static catalogue::Instrument, Reading); 5] = [
        (&catalogue::KERNEL_EVENTS_DROPPED, |k| k.dropped_events),
        (&catalogue::KERNEL_CONNECTIONS_UNTRACKED, |k| k.conns_full),
        (&catalogue::KERNEL_SOCKET_IO_UNATTRIBUTED, |k| {
            k.unattributed_socket_io
        }),
        (&catalogue::KERNEL_CONNECTS_UNATTRIBUTED, |k| {
            k.unattributed_connects
        }),
        (&catalogue::KERNEL_TLS_CALLS_UNATTRIBUTED, |k| {
            k.unattributed_tls_calls
        }),
    ];
    for (instrument, read) in counters {
        let kernel = Arc::clone(&state);
        observable_counter(meter, instrument, move |obs| {
            if let Ok(value) = kernel.with(|s| read(&s.kernel)) {
                obs.observe(value, &[]);
            }
        });
    }
    let probe_time = Arc::clone(&state);
    observable_f64_counter(meter, &catalogue::PROBE_RUN_TIME, move |obs| {
        let _ = probe_time.with(|s| {
            for (name, ns, _) in &s.kernel.probes {
                obs.observe(
                    *ns as f64 / 1e9,
                    &[KeyValue::new(attr::PROBE, name.clone())],
                );
            }
        });
    });
    let probe_runs = Arc::clone(&state);
    observable_counter(meter, &catalogue::PROBE_RUNS, move |obs| {
        let _ = probe_runs.with(|s| {
            for (name, _, runs) in &s.kernel.probes {
                obs.observe(*runs, &[KeyValue::new(attr::PROBE, name.clone())]);
            }
        });
    });
    let pending = Arc::clone(&state);
    observable_gauge(meter, &catalogue::KERNEL_RINGBUF_PENDING, move |obs| {
        if let Ok(bytes) = pending.with(|s| s.kernel.ringbuf_pending_bytes) {
            obs.observe(bytes, &[]);
        }
    });
    observable_gauge(meter, &catalogue::KERNEL_RINGBUF_SIZE, move |obs| {
        if let Ok(bytes) = state.with(|s| s.kernel.ringbuf_size_bytes) {
            obs.observe(bytes, &[]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{ConnId, Endpoint, Event, EventKind, Tracker, TrackerConfig};

    fn tracker_with(conns: &[(u32, &str, u16)]) -> Tracker {
        let mut t = Tracker::new(TrackerConfig::default());
        for (i, (pid, comm, port)) in conns.iter().enumerate() {
            t.apply(Event {
                ts_ns: 10,
                conn: ConnId {
                    pid: *pid,
                    fd: i as i32,
                    generation: 1 + i as u64,
                },
                kind: EventKind::Connect {
                    tid: *pid,
                    ret: 0,
                    remote: Endpoint::Inet(format!("10.0.0.1:{port}").parse().expect("addr")),
                    comm: (*comm).into(),
                },
            });
        }
        t
    }

    #[test]
    fn sql_operation_list_is_sorted_for_binary_search() {
        assert!(SQL_OPERATIONS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn operation_names_are_bounded() {
        let names = OperationNames::default();
        assert_eq!(
            names
                .bounded(DbSystem::Postgresql, "SELECT")
                .as_ref()
                .map(StringValue::as_str),
            Some("SELECT")
        );
        assert_eq!(names.bounded(DbSystem::Postgresql, "SELEC"), None);
        assert_eq!(
            names
                .bounded(DbSystem::Redis, "GET")
                .as_ref()
                .map(StringValue::as_str),
            Some("GET")
        );
        assert_eq!(names.bounded(DbSystem::Redis, "G\u{0}T"), None);
        for i in 0..MAX_COMMAND_NAMES {
            let name: String = format!("X{i}")
                .chars()
                .map(|c| {
                    if c.is_ascii_digit() {
                        (b'A' + c as u8 - b'0') as char
                    } else {
                        c
                    }
                })
                .collect();
            names.bounded(DbSystem::Redis, &name);
        }
        assert_eq!(
            names
                .bounded(DbSystem::Redis, "NEVERSEEN")
                .as_ref()
                .map(StringValue::as_str),
            Some("_OTHER")
        );
        assert_eq!(
            names
                .bounded(DbSystem::Redis, "GET")
                .as_ref()
                .map(StringValue::as_str),
            Some("GET")
        );
    }

    /// Observed with room for `max_series` (process, server) series and
    /// `max_applications` applications, each of `pids` known by name.
    fn observed(state: Arc<Shared<State>>, max_series: usize, max_applications: usize) -> Observed {
        Observed {
            resource: opentelemetry_sdk::Resource::builder().build(),
            otlp_reader: None,
            export_counters: None,
            state,
            max_series,
            max_applications,
            host_name: "node-1".into(),
            attributes: attributes::MetricsConfig::default(),
            resources: Arc::default(),
            exited_series_grace: std::time::Duration::ZERO,
            slow_threshold_ns: 250_000_000,
        }
    }

    /// Names process `pid` `executable` and gives it its application.
    fn learn(telemetry: &Telemetry, pids: &[(u32, &str)]) {
        for (pid, executable) in pids {
            telemetry.learn_application(
                *pid,
                crate::identity::identify(&crate::identity::ProcessFacts {
                    pid: *pid,
                    executable: (*executable).into(),
                    host_name: "node-1".into(),
                    ..Default::default()
                }),
            );
        }
        let pids: HashSet<u32> = pids.iter().map(|(pid, _)| *pid).collect();
        telemetry.sync_applications(&pids, &pids);
    }

    /// The sample lines of `family`.
    fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        let prefix = format!("{family}{{");
        text.lines().filter(|l| l.starts_with(&prefix)).collect()
    }

    #[test]
    fn connection_series_are_bounded_in_all() {
        let t = tracker_with(&[
            (1, "a", 5432),
            (1, "a", 5432),
            (2, "b", 3306),
            (3, "c", 6379),
        ]);
        let telemetry =
            Telemetry::new(observed(State::shared_for_tests(t), 2, 10)).expect("telemetry");
        learn(&telemetry, &[(1, "a"), (2, "b"), (3, "c")]);
        let text = telemetry.render_prometheus().expect("render");
        let open = samples(&text, "poolscope_connection_open");
        assert_eq!(open.len(), 3, "two real series and one overflow: {open:?}");
        let total: f64 = open
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 4.0, "overflow keeps the counts");
        assert!(open.iter().any(|l| l.contains("server_address=\"_other\"")));
    }

    #[test]
    fn each_application_is_labelled_with_its_resource_and_forgotten_when_it_exits() {
        let t = tracker_with(&[(1, "api", 5432), (2, "worker", 5432)]);
        let telemetry =
            Telemetry::new(observed(State::shared_for_tests(t), 10, 10)).expect("telemetry");
        learn(&telemetry, &[(1, "api"), (2, "worker")]);
        telemetry.record(&[
            waited(1, "orders", AcquireResult::Ok),
            waited(2, "jobs", AcquireResult::Ok),
        ]);
        let text = telemetry.render_prometheus().expect("render");
        let open = samples(&text, "poolscope_connection_open");
        assert_eq!(open.len(), 2, "{open:?}");
        for (pid, service) in [(1, "api"), (2, "worker")] {
            let line = open
                .iter()
                .find(|l| l.contains(&format!("process_pid=\"{pid}\"")))
                .unwrap_or_else(|| panic!("no series of {pid}: {open:?}"));
            for label in [
                format!("service_name=\"{service}\""),
                format!("service_instance_id=\"node-1:{pid}\""),
                format!("process_executable_name=\"{service}\""),
                "server_address=\"10.0.0.1\"".to_string(),
            ] {
                assert!(line.contains(&label), "{label} missing: {line}");
            }
            assert!(
                !line.contains("host_name"),
                "host.name is not a label: {line}"
            );
        }
        assert_eq!(
            text.matches("# TYPE db_client_connection_wait_time_seconds ")
                .count(),
            1,
            "one family per name across applications:\n{text}"
        );
        assert!(
            text.contains("poolscope_telemetry_applications 2"),
            "{text}"
        );
        // Process 2 exits: its series go with it, process 1's stay.
        telemetry.sync_applications(&[1].into(), &[1].into());
        let text = telemetry.render_prometheus().expect("render");
        assert!(!text.contains("process_pid=\"2\""), "{text}");
        assert_eq!(wait_counts(&text, 1, "orders").len(), 1, "{text}");
        assert!(
            text.contains("poolscope_telemetry_applications 1"),
            "{text}"
        );
    }

    /// An exited process's series stay on /metrics for the grace period
    /// (a short-lived process's last increments are scraped), then go.
    #[test]
    fn an_exited_process_stays_on_metrics_for_the_grace_period() {
        let telemetry = Telemetry::new(Observed {
            exited_series_grace: std::time::Duration::from_millis(300),
            ..observed(
                State::shared_for_tests(Tracker::new(TrackerConfig::default())),
                10,
                10,
            )
        })
        .expect("telemetry");
        learn(&telemetry, &[(1, "job"), (2, "api")]);
        telemetry.record(&[
            waited(1, "p", AcquireResult::Ok),
            waited(2, "q", AcquireResult::Ok),
        ]);
        telemetry.sync_applications(&[2].into(), &[2].into());
        let text = telemetry.render_prometheus().expect("render");
        assert_eq!(wait_counts(&text, 1, "p").len(), 1, "kept a while: {text}");
        assert!(
            text.contains("poolscope_telemetry_applications 1"),
            "{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(350));
        telemetry.sync_applications(&[2].into(), &[2].into());
        let text = telemetry.render_prometheus().expect("render");
        assert!(wait_counts(&text, 1, "p").is_empty(), "{text}");
        assert_eq!(wait_counts(&text, 2, "q").len(), 1, "{text}");
    }

    /// A pid reused by another program (before housekeeping let the old
    /// one go) gets an application of its own: the new process's series
    /// never carry the old one's name.
    #[test]
    fn a_reused_pid_is_a_new_application() {
        let telemetry = pools_telemetry();
        learn(&telemetry, &[(7, "old-app")]);
        telemetry.record(&[waited(7, "p", AcquireResult::Ok)]);
        learn(&telemetry, &[(7, "new-app")]);
        telemetry.record(&[waited(7, "p", AcquireResult::Ok)]);
        let text = telemetry.render_prometheus().expect("render");
        let waits = samples(&text, "db_client_connection_wait_time_seconds_count");
        assert_eq!(waits.len(), 1, "{waits:?}");
        assert!(
            waits[0].contains("service_name=\"new-app\"") && waits[0].ends_with(" 1"),
            "{waits:?}"
        );
    }

    #[test]
    fn applications_past_the_bound_share_the_other_resource() {
        let telemetry = Telemetry::new(observed(
            State::shared_for_tests(Tracker::new(TrackerConfig::default())),
            10,
            2,
        ))
        .expect("telemetry");
        learn(&telemetry, &[(1, "a"), (2, "b")]);
        telemetry.record(&[
            waited(1, "p", AcquireResult::Ok),
            waited(2, "p", AcquireResult::Ok),
            waited(3, "p", AcquireResult::Ok),
            waited(4, "p", AcquireResult::Ok),
        ]);
        let text = telemetry.render_prometheus().expect("render");
        let waits = samples(&text, "db_client_connection_wait_time_seconds_count");
        assert_eq!(waits.len(), 3, "{waits:?}");
        let other = waits
            .iter()
            .find(|l| l.contains("service_name=\"_other\""))
            .expect("the _other application");
        assert!(
            other.ends_with(" 2") && !other.contains("process_pid"),
            "{other}"
        );
        assert!(
            text.contains("poolscope_telemetry_applications_folded_total 2"),
            "{text}"
        );
    }

    /// The connection of [`psql_telemetry`]'s tracker, and its server.
    const PSQL_CONN: ConnId = ConnId {
        pid: 7,
        fd: 3,
        generation: 1,
    };

    fn psql_server() -> Endpoint {
        Endpoint::Inet("127.0.0.1:5432".parse().expect("addr"))
    }

    /// Telemetry over one `psql` connection of pid 7 to port 5432; slow
    /// round trips from 250 ms.
    fn psql_telemetry() -> Telemetry {
        let telemetry = Telemetry::new(observed(
            State::shared_for_tests(tracker_with(&[(7, "psql", 5432)])),
            10,
            10,
        ))
        .expect("telemetry");
        learn(&telemetry, &[(7, "psql")]);
        telemetry
    }

    #[test]
    fn prometheus_text_has_the_documented_names() {
        let telemetry = psql_telemetry();
        telemetry.record(&[Output::ConnectFinished {
            id: PSQL_CONN,
            comm: "psql".into(),
            remote: psql_server(),
            outcome: crate::lifecycle::ConnectOutcome::Refused,
            latency_ns: Some(1_000),
        }]);
        let text = telemetry.render_prometheus().expect("render");
        for name in [
            "poolscope_connects_total{network_transport=\"tcp\",result=\"refused\"} 1",
            "poolscope_connect_duration_seconds_bucket",
            "poolscope_connection_open{",
            "process_executable_name=\"psql\"",
            "poolscope_kernel_events_dropped_total",
            "poolscope_kernel_ringbuf_size_bytes",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn round_trips_at_or_past_the_slow_threshold_are_counted_slow() {
        use crate::protocol::{DbSystem, RoundTrip};
        let telemetry = psql_telemetry();
        let trip = |ms: u64, error: bool| Output::RoundTrip {
            id: PSQL_CONN,
            comm: "psql".into(),
            remote: psql_server(),
            system: DbSystem::Postgresql,
            trip: RoundTrip {
                start_ns: 1_000,
                end_ns: 1_000 + ms * 1_000_000,
                operation: Some("SELECT".into()),
                query: None,
                namespace: None,
                error: error.then(|| crate::protocol::DbError {
                    code: "57014".into(),
                    message: "canceling statement".into(),
                }),
                rows: None,
                tx_state: None,
                prepared: false,
            },
        };
        telemetry.record(&[
            trip(10, false),
            trip(249, false),
            trip(250, false),
            trip(900, true),
        ]);
        let text = telemetry.render_prometheus().expect("render");
        let slow: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("poolscope_queries_slow_total{"))
            .collect();
        // One series, errors included and not split by error type.
        assert_eq!(slow.len(), 1, "{text}");
        assert!(
            slow[0].contains("db_operation_name=\"SELECT\""),
            "{}",
            slow[0]
        );
        assert!(slow[0].ends_with(" 2"), "{}", slow[0]);
    }

    /// `[metrics.attributes]`: the opt-in summary and collection appear
    /// when added, a dropped attribute goes, and the database is named.
    #[test]
    fn attributes_are_added_and_dropped_as_configured() {
        use crate::protocol::{DbSystem, QueryText, RoundTrip};
        let attributes: attributes::MetricsConfig = toml::from_str(
            r#"
            [attributes."db.client.operation.duration"]
            add = ["db.query.summary", "db.collection.name"]
            drop = ["server.port"]
            "#,
        )
        .expect("config");
        let telemetry = Telemetry::new(Observed {
            attributes,
            ..observed(
                State::shared_for_tests(tracker_with(&[(7, "psql", 5432)])),
                10,
                10,
            )
        })
        .expect("telemetry");
        learn(&telemetry, &[(7, "psql")]);
        let trip = |sql: &str| Output::RoundTrip {
            id: PSQL_CONN,
            comm: "psql".into(),
            remote: psql_server(),
            system: DbSystem::Postgresql,
            trip: RoundTrip {
                start_ns: 1_000,
                end_ns: 2_000,
                operation: Some("SELECT".into()),
                query: Some(QueryText::shown_as_is(sql.into())),
                namespace: Some("shop".into()),
                error: None,
                rows: None,
                tx_state: None,
                prepared: false,
            },
        };
        telemetry.record(&[
            trip("SELECT * FROM orders WHERE id = ?"),
            trip("SELECT * FROM orders o JOIN customers c ON o.c = c.id"),
        ]);
        let text = telemetry.render_prometheus().expect("render");
        let counts = samples(&text, "db_client_operation_duration_seconds_count");
        assert_eq!(counts.len(), 2, "{counts:?}");
        let single = counts
            .iter()
            .find(|l| l.contains("db_query_summary=\"SELECT orders\""))
            .unwrap_or_else(|| panic!("{counts:?}"));
        assert!(single.contains("db_collection_name=\"orders\""), "{single}");
        let join = counts
            .iter()
            .find(|l| l.contains("db_query_summary=\"SELECT orders customers\""))
            .unwrap_or_else(|| panic!("{counts:?}"));
        assert!(!join.contains("db_collection_name"), "two tables: {join}");
        for line in &counts {
            assert!(line.contains("db_namespace=\"shop\""), "{line}");
            assert!(!line.contains("server_port"), "dropped: {line}");
            assert!(line.contains("server_address=\"127.0.0.1\""), "{line}");
        }
        // Without the configuration, neither opt-in attribute is there.
        let plain = psql_telemetry();
        plain.record(&[trip("SELECT * FROM orders WHERE id = ?")]);
        let text = plain.render_prometheus().expect("render");
        assert!(!text.contains("db_query_summary"), "{text}");
        assert!(text.contains("server_port=\"5432\""), "{text}");
    }

    /// A tracker, leak store and telemetry where every instrument has data.
    fn everything_observed() -> Telemetry {
        use crate::adapter::message::{AdapterEvent, AdapterMessage, ConnRef, PoolInfo};
        use crate::detect::Finding;
        use crate::protocol::{DbSystem, RoundTrip, SystemName};
        let mut t = tracker_with(&[(7, "app", 5432), (7, "app", 5432)]);
        // fd 0: the server hung up.
        t.apply(Event {
            ts_ns: 20,
            conn: ConnId {
                pid: 7,
                fd: 0,
                generation: 1,
            },
            kind: EventKind::SockState {
                old_state: 1,
                new_state: 8,
                local: "127.0.0.1:40000".parse().expect("addr"),
                remote: "10.0.0.1:5432".parse().expect("addr"),
                reset_received: false,
            },
        });
        // fd 1: an adapter pool's connection, handed out.
        let adapter = |event| AdapterMessage {
            pool: "orders".into(),
            event,
            mono_ns: None,
            claimed_pid: None,
        };
        let fd1 = ConnRef {
            local: None,
            fd: Some(1),
            conn: None,
        };
        let mut outputs = t.apply_adapter(
            7,
            30,
            adapter(AdapterEvent::Register(PoolInfo {
                db_system: Some(SystemName::Read(DbSystem::Postgresql)),
                max: Some(5),
                min_idle: Some(1),
                idle_max: Some(5),
                ..PoolInfo::default()
            })),
        );
        outputs.extend(t.apply_adapter(
            7,
            31,
            adapter(AdapterEvent::ConnectionCreated {
                conn: fd1,
                tid: None,
            }),
        ));
        outputs.extend(t.apply_adapter(
            7,
            32,
            adapter(AdapterEvent::AcquireStart {
                request: 1,
                tid: None,
            }),
        ));
        outputs.extend(t.apply_adapter(
            7,
            33,
            adapter(AdapterEvent::AcquireStart {
                request: 2,
                tid: None,
            }),
        ));
        outputs.extend(t.apply_adapter(
            7,
            34,
            adapter(AdapterEvent::AcquireEnd {
                request: 1,
                result: AcquireResult::Ok,
                conn: fd1,
                tid: None,
                wait_ns: None,
            }),
        ));
        outputs.extend(t.apply_adapter(7, 35, adapter(AdapterEvent::Release { conn: fd1 })));
        outputs.extend(t.apply_adapter(
            7,
            36,
            adapter(AdapterEvent::AcquireEnd {
                request: 2,
                result: AcquireResult::Timeout,
                conn: ConnRef::default(),
                tid: None,
                wait_ns: None,
            }),
        ));
        let peer_closed = t
            .open_connections()
            .find(|c| c.id.fd == 0)
            .expect("fd 0")
            .id;
        let mut leaks = crate::reports::LeakReports::new(10);
        let clock = crate::clock::Clock::new();
        let changes = {
            let lookup = |id| t.connection(id);
            leaks.update(
                &[Finding {
                    kind: crate::detect::LeakKind::CloseWait,
                    conn: peer_closed,
                    evidence: "test".into(),
                }],
                &lookup,
                &|_| None,
                &mut |_, _| crate::reports::ProcessDetails::default(),
                40,
                &clock,
            )
        };
        let state = {
            let mut state = State::new(t, crate::reports::Reports::new(1, 1), leaks);
            state.kernel = KernelCounters {
                probes: vec![("sys_enter_read".into(), 1_000, 10)],
                ..KernelCounters::default()
            };
            Arc::new(Shared::new(state, "state", Arc::default()))
        };
        let telemetry = Telemetry::new(Observed {
            export_counters: Some(Arc::default()),
            ..observed(state, 10, 10)
        })
        .expect("telemetry");
        learn(&telemetry, &[(7, "app")]);
        let id = ConnId {
            pid: 7,
            fd: 9,
            generation: 1,
        };
        let remote = Endpoint::Inet("127.0.0.1:5432".parse().expect("addr"));
        outputs.extend([
            Output::ConnectFinished {
                id,
                comm: "app".into(),
                remote: remote.clone(),
                outcome: crate::lifecycle::ConnectOutcome::Ok,
                latency_ns: Some(1_000),
            },
            Output::Closed {
                id,
                comm: "app".into(),
                remote: remote.clone(),
                reason: crate::lifecycle::CloseReason::Closed,
                lifetime_ns: 5_000,
                seen_at_start: false,
            },
            Output::RoundTrip {
                id,
                comm: "app".into(),
                remote,
                system: DbSystem::Postgresql,
                trip: RoundTrip {
                    start_ns: 1,
                    end_ns: 300_000_001,
                    operation: Some("SELECT".into()),
                    query: None,
                    namespace: None,
                    error: None,
                    rows: None,
                    tx_state: None,
                    prepared: false,
                },
            },
            Output::ProtocolLost { id, reason: "test" },
            Output::Unmatched,
        ]);
        telemetry.record(&outputs);
        telemetry.record_decode_error();
        telemetry.record_adapter_messages_accepted(1);
        telemetry.record_unpublished(crate::reports::Unpublished::ProcessBudget);
        telemetry.record_leak_changes(&changes);
        telemetry
    }

    fn pools_telemetry() -> Telemetry {
        Telemetry::new(observed(
            State::shared_for_tests(Tracker::new(TrackerConfig::default())),
            10,
            10,
        ))
        .expect("telemetry")
    }

    fn waited(pid: u32, pool: &str, result: AcquireResult) -> Output {
        Output::AcquireFinished {
            pid,
            pool: pool.into(),
            wait_ns: 2_000_000,
            result,
            used_before: 0,
            pending_before: 0,
            max: None,
            tid: None,
        }
    }

    /// The `_count` lines of the wait-time histogram of one pool.
    fn wait_counts(text: &str, pid: u32, pool: &str) -> Vec<String> {
        let pool = format!("db_client_connection_pool_name=\"{pool}\"");
        let pid = format!("process_pid=\"{pid}\"");
        text.lines()
            .filter(|l| l.starts_with("db_client_connection_wait_time_seconds_count{"))
            .filter(|l| l.contains(&pool) && l.contains(&pid))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn folded_checkouts_count_one_wait_and_one_use_each() {
        let telemetry = pools_telemetry();
        telemetry.record(&[
            waited(7, "orders", AcquireResult::Ok),
            Output::CheckoutsFolded {
                pid: 7,
                pool: "orders".into(),
                waits_ns: vec![1_000, 2_000_000_000, 3],
                uses_ns: vec![5, 6, 7],
                used_before: 0,
                pending_before: 0,
                max: None,
                tid: None,
            },
        ]);
        let text = telemetry.render_prometheus().expect("render");
        let waits = wait_counts(&text, 7, "orders");
        assert!(waits.len() == 1 && waits[0].ends_with(" 4"), "{waits:?}");
        let uses: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("db_client_connection_use_time_seconds_count{"))
            .filter(|l| l.contains("process_pid=\"7\""))
            .collect();
        assert!(uses.len() == 1 && uses[0].ends_with(" 3"), "{uses:?}");
        let sum = text
            .lines()
            .find(|l| l.starts_with("db_client_connection_wait_time_seconds_sum{"))
            .expect("wait sum");
        assert!(sum.contains(" 2.002"), "the waits in seconds: {sum}");
    }

    #[test]
    fn a_pool_gets_a_series_only_for_what_it_recorded() {
        let telemetry = pools_telemetry();
        telemetry.record(&[
            waited(7, "orders", AcquireResult::Ok),
            waited(7, "orders", AcquireResult::Timeout),
            waited(7, "orders", AcquireResult::Ok),
        ]);
        let text = telemetry.render_prometheus().expect("render");
        let waits = wait_counts(&text, 7, "orders");
        assert_eq!(waits.len(), 2, "ok and timeout apart: {waits:?}");
        assert!(
            waits
                .iter()
                .any(|l| !l.contains("error_type") && l.ends_with(" 2")),
            "{waits:?}"
        );
        assert!(
            waits
                .iter()
                .any(|l| l.contains("error_type") && l.ends_with(" 1")),
            "{waits:?}"
        );
        // Bound series are exported from their binding on: a pool that
        // only waited must not show an empty use-time series.
        assert!(
            !text.contains("db_client_connection_use_time_seconds_count{"),
            "{text}"
        );
    }
    /// One exported sample line: (family, label names).
    fn sample_labels(line: &str) -> Option<(&str, Vec<&str>)> {
        if line.starts_with('#') || line.is_empty() {
            return None;
        }
        let (name, rest) = match line.find('{') {
            Some(brace) => (&line[..brace], &line[brace + 1..]),
            None => (line.split_whitespace().next()?, ""),
        };
        let labels = rest
            .split("\",")
            .filter_map(|pair| pair.split_once("=\""))
            .map(|(key, _)| key.trim_start_matches(','))
            .filter(|key| !key.is_empty())
            .collect();
        Some((name, labels))
    }

    /// Every family on /metrics is declared in the catalogue with its
    /// type and description, named by the OTLP -> Prometheus translation
    /// rules (`telemetry_catalogue::prometheus_metric_name`, so that both
    /// paths give the same series), every declared instrument is exported,
    /// and every sample carries its required attributes and no undeclared
    /// one, labelled as those rules say.
    #[test]
    fn what_is_exported_is_what_the_catalogue_declares() {
        let text = everything_observed().render_prometheus().expect("render");
        let mut exported = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                if name == "target_info" {
                    continue;
                }
                let declared = catalogue::by_prometheus_name(name)
                    .unwrap_or_else(|| panic!("{name} is exported but not in the catalogue"));
                assert_eq!(kind, declared.kind.prometheus_type(), "{name}");
                let help = format!("# HELP {name} {}", declared.description);
                assert!(text.contains(&help), "{name}: HELP is not its description");
                exported.insert(declared.name);
            }
        }
        for instrument in catalogue::INSTRUMENTS {
            assert!(
                exported.contains(instrument.name),
                "{} is declared but not exported",
                instrument.name
            );
        }
        for (sample, labels) in text.lines().filter_map(sample_labels) {
            if sample == "target_info" {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = sample.strip_suffix(suffix)?;
                    catalogue::by_prometheus_name(base)
                        .filter(|i| i.kind == catalogue::Kind::Histogram)
                })
                .or_else(|| catalogue::by_prometheus_name(sample))
                .unwrap_or_else(|| panic!("sample {sample} of no declared family"));
            // An application's series carry its resource as labels.
            let resource_labels = catalogue::RESOURCE_ATTRIBUTES
                .iter()
                .filter(|r| r.label && family.per_application)
                .map(|r| r.attribute);
            let declared = |label: &str| {
                family
                    .attributes
                    .iter()
                    .copied()
                    .chain(resource_labels.clone())
                    .any(|a| catalogue::prometheus_label_name(a.key) == label)
            };
            for label in &labels {
                assert!(
                    *label == "le" || declared(label),
                    "{}: attribute {label} is not declared",
                    family.name
                );
            }
            for required in family
                .attributes
                .iter()
                .copied()
                .chain(resource_labels.clone())
                .filter(|a| a.requirement == catalogue::Requirement::Required)
            {
                assert!(
                    labels.contains(&catalogue::prometheus_label_name(required.key).as_str()),
                    "{}: a sample lacks {}: {labels:?}",
                    family.name,
                    required.key
                );
            }
        }
    }
}
