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
    time::Instant,
};

use anyhow::Context;
use opentelemetry::{
    metrics::{Counter, Histogram, Meter, MeterProvider},
    KeyValue, StringValue,
};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

mod instruments;
pub mod otlp;
pub mod pool_series;

use instruments::{
    counter, histogram, observable_counter, observable_f64_counter, observable_gauge,
    observable_up_down_counter,
};
use telemetry_catalogue::{self as catalogue, attr};

use crate::{
    adapter::message::AcquireResult,
    clock::monotonic_ns,
    detect::LeakKind,
    lifecycle::{ConnState, Connection, Endpoint, Output, PoolView},
    percentiles::Latencies,
    procfs::Placement,
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
    operation_duration: Histogram<f64>,
    slow_queries: Counter<u64>,
    slow_threshold_ns: u64,
    protocol_lost: Counter<u64>,
    operation_names: OperationNames,
    /// Per-pool histograms, forgotten when their pools are gone.
    pool_series: pool_series::PoolSeries,
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

/// The server attributes of round trips, built once per server: formatting
/// an address on every round trip was a tenth of the agent's CPU under load.
#[derive(Default)]
struct ServerAttributes {
    by_server: Mutex<std::collections::HashMap<ServerKey, Arc<[KeyValue]>>>,
}

type ServerKey = (DbSystem, Endpoint);

impl ServerAttributes {
    /// Servers remembered at most; past it the cache starts over, so an
    /// agent that sees many servers stays bounded.
    const MAX: usize = 4096;

    fn get(&self, system: DbSystem, remote: &Endpoint) -> Arc<[KeyValue]> {
        // A cache stays valid whatever panicked while holding it.
        let mut cache = self
            .by_server
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(attrs) = cache.get(&(system, remote.clone())) {
            return Arc::clone(attrs);
        }
        if cache.len() >= Self::MAX {
            cache.clear();
        }
        let attrs: Arc<[KeyValue]> = database_server_attributes(system, remote).into();
        cache.insert((system, remote.clone()), Arc::clone(&attrs));
        attrs
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

/// Series key for per-process, per-server gauges.
type SeriesKey = (u32, String, String, Option<u16>, Option<Placement>);

/// Counts open and CLOSE_WAIT connections per (process, server), folding
/// everything past `max_series` into one overflow series so that a process
/// that talks to thousands of servers cannot blow up the label space.
pub fn connection_series(
    open: &mut dyn Iterator<Item = &Connection>,
    placement: &dyn Fn(u32) -> Option<Placement>,
    max_series: usize,
) -> BTreeMap<SeriesKey, (u64, u64)> {
    let mut series: BTreeMap<SeriesKey, (u64, u64)> = BTreeMap::new();
    for conn in open {
        let mut key = (
            conn.id.pid,
            conn.comm.clone(),
            conn.remote.address(),
            conn.remote.port(),
            placement(conn.id.pid),
        );
        if !series.contains_key(&key) && series.len() >= max_series {
            key = (0, "_other".into(), "_other".into(), None, None);
        }
        let entry = series.entry(key).or_default();
        entry.0 += 1;
        if conn.state == ConnState::PeerClosed {
            entry.1 += 1;
        }
    }
    series
}

fn series_attributes(key: &SeriesKey) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new(attr::PROCESS_PID, i64::from(key.0)),
        KeyValue::new(attr::PROCESS_EXECUTABLE_NAME, key.1.clone()),
        KeyValue::new(attr::SERVER_ADDRESS, key.2.clone()),
    ];
    if let Some(port) = key.3 {
        attrs.push(KeyValue::new(attr::SERVER_PORT, i64::from(port)));
    }
    if let Some(placement) = &key.4 {
        placement_attributes(placement, &mut attrs);
    }
    attrs
}

/// `container.id`, `k8s.pod.uid`, `k8s.pod.name`, `k8s.namespace.name`.
fn placement_attributes(placement: &Placement, attrs: &mut Vec<KeyValue>) {
    for (key, value) in [
        (attr::CONTAINER_ID, &placement.container_id),
        (attr::K8S_POD_UID, &placement.pod_uid),
        (attr::K8S_POD_NAME, &placement.pod_name),
        (attr::K8S_NAMESPACE_NAME, &placement.pod_namespace),
    ] {
        if let Some(value) = value {
            attrs.push(KeyValue::new(key, value.clone()));
        }
    }
}

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
            .with_view(move |_: &opentelemetry_sdk::metrics::Instrument| {
                opentelemetry_sdk::metrics::Stream::builder()
                    .with_cardinality_limit(series_limit)
                    .build()
                    .ok()
            });
        let mut pool_otlp = None;
        if let Some(readers) = observed.otlp_reader.take() {
            builder = builder.with_reader(readers.main);
            pool_otlp = Some((readers.pools, readers.factory));
        }
        let provider = builder.build();
        let pool_series = pool_series::PoolSeries::new(observed.resource.clone(), pool_otlp)?;
        register_forget_observables(&provider.meter("poolscope"), &pool_series.counts);
        let meter = provider.meter("poolscope");
        let telemetry = Telemetry {
            connects: counter(&meter, &catalogue::CONNECTS),
            connect_duration: histogram(&meter, &catalogue::CONNECT_DURATION),
            lifetime: histogram(&meter, &catalogue::CONNECTION_LIFETIME),
            events: counter(&meter, &catalogue::KERNEL_EVENTS),
            events_unmatched: counter(&meter, &catalogue::KERNEL_EVENTS_UNMATCHED),
            decode_errors: counter(&meter, &catalogue::KERNEL_EVENTS_MALFORMED),
            operation_duration: histogram(&meter, &catalogue::OPERATION_DURATION),
            slow_queries: counter(&meter, &catalogue::QUERIES_SLOW),
            slow_threshold_ns: observed.slow_threshold_ns,
            protocol_lost: counter(&meter, &catalogue::PROTOCOL_LOST),
            operation_names: OperationNames::default(),
            server_attributes: ServerAttributes::default(),
            adapter_messages: counter(&meter, &catalogue::ADAPTER_MESSAGES),
            leak_reports: counter(&meter, &catalogue::LEAK_REPORTS),
            unpublished: counter(&meter, &catalogue::REPORTS_UNPUBLISHED),
            pool_series,
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
                    remote,
                    system,
                    trip,
                    ..
                } => {
                    let server = self.server_attributes.get(*system, remote);
                    let mut attrs = Vec::with_capacity(server.len() + 2);
                    attrs.extend_from_slice(&server);
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
                    if let Some(name) = operation {
                        attrs.push(KeyValue::new(attr::DB_OPERATION_NAME, name));
                    }
                    // The same rule as the slow-query reports (reports.rs).
                    if duration_ns >= self.slow_threshold_ns {
                        self.slow_queries.add(1, &attrs);
                    }
                    if let Some(error) = &trip.error {
                        attrs.push(KeyValue::new(attr::ERROR_TYPE, error.code.clone()));
                    }
                    self.operation_duration
                        .record(duration_ns as f64 / 1e9, &attrs);
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
                    self.pool_series
                        .record_wait(*pid, pool, *wait_ns as f64 / 1e9, error);
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
                    self.pool_series
                        .record_folded(*pid, pool, waits_ns, uses_ns);
                    let now = *now_ns.get_or_insert_with(monotonic_ns);
                    latencies
                        .get()
                        .record_pool(*pid, pool, now, waits_ns, uses_ns);
                }
                Output::Released { pid, pool, use_ns } => {
                    self.pool_series
                        .record_use(*pid, pool, *use_ns as f64 / 1e9);
                    let now = *now_ns.get_or_insert_with(monotonic_ns);
                    latencies
                        .get()
                        .record_pool(*pid, pool, now, &[], &[*use_ns]);
                }
                Output::PoolConnectionCreated {
                    pid,
                    pool,
                    create_ns,
                } => self
                    .pool_series
                    .record_create(*pid, pool, *create_ns as f64 / 1e9),
                Output::PeerClosed { .. }
                | Output::NotDatabase { .. }
                | Output::Detected { .. } => {}
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

    pub fn record_decode_error(&self) {
        self.decode_errors.add(1, &[]);
    }

    /// Forgets the histogram series of pools that are not in `live` (pid,
    /// pool name), the pools the tracker still knows. Called by
    /// housekeeping; see [`pool_series`] for when it acts and what it costs.
    pub fn forget_gone_pools(&self, live: &HashSet<(u32, String)>) {
        self.pool_series.forget_gone(live, Instant::now());
    }

    /// The Prometheus text exposition format 0.0.4.
    pub fn render_prometheus(&self) -> anyhow::Result<String> {
        let mut families = self.registry.gather();
        families.extend(self.pool_series.registry().gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        for family in &mut families {
            if let Some(renamed) = prometheus_rename(family.name()) {
                family.set_name(renamed);
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .context("cannot encode metrics")?;
        String::from_utf8(buf).context("metrics are not UTF-8")
    }

    /// The last exports of both providers, side by side so that a hung
    /// collector costs one timeout, not two.
    pub fn shutdown(&self) {
        std::thread::scope(|scope| {
            let pools = std::thread::Builder::new()
                .name("poolscope-pool-flush".into())
                .spawn_scoped(scope, || self.pool_series.shutdown());
            if let Err(e) = self.provider.shutdown() {
                log::debug!("meter provider shutdown: {e}");
            }
            if pools.is_err() {
                self.pool_series.shutdown();
            }
        });
    }
}

/// The catalogue's name for a family the exporter names wrongly (a gauge
/// ending in `_count`, which Prometheus reserves for histograms).
fn prometheus_rename(derived: &str) -> Option<String> {
    catalogue::INSTRUMENTS
        .iter()
        .find(|i| i.prometheus_name_override.is_some() && i.derived_prometheus_name() == derived)
        .map(|i| i.prometheus_name())
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

/// How often gone pools' series were forgotten.
fn register_forget_observables(meter: &Meter, counts: &Arc<pool_series::ForgetCounts>) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = Arc::clone(counts);
    observable_counter(meter, &catalogue::POOL_SERIES_FORGOTTEN, move |obs| {
        obs.observe(c.forgotten.load(Relaxed), &[])
    });
    let c = Arc::clone(counts);
    observable_counter(meter, &catalogue::POOL_SERIES_RESETS, move |obs| {
        obs.observe(c.resets.load(Relaxed), &[])
    });
}

/// Per-pool gauges, all read from one snapshot of the pools.
fn register_pool_observables(meter: &Meter, state: &Arc<Shared<State>>, max_series: usize) {
    let views = move |state: &Shared<State>| -> Vec<PoolView> {
        state
            .with(|s| {
                let mut views = s.tracker.pool_views();
                views.truncate(max_series);
                views
            })
            .unwrap_or_default()
    };
    let t = Arc::clone(state);
    observable_up_down_counter(meter, &catalogue::CONNECTION_COUNT, move |obs| {
        for view in views(&t) {
            for (state, count) in [("used", view.used), ("idle", view.idle)] {
                let mut attrs = pool_series::attributes(view.pid, &view.name);
                attrs.push(KeyValue::new(attr::DB_CONNECTION_STATE, state));
                obs.observe(count as i64, &attrs);
            }
        }
    });
    type Field = fn(&PoolView) -> Option<i64>;
    let gauges: [(&'static catalogue::Instrument, Field); 4] = [
        (&catalogue::CONNECTION_MAX, |v| v.max.map(i64::from)),
        (&catalogue::CONNECTION_IDLE_MAX, |v| {
            v.idle_max.map(i64::from)
        }),
        (&catalogue::CONNECTION_IDLE_MIN, |v| {
            v.min_idle.map(i64::from)
        }),
        (&catalogue::CONNECTION_PENDING_REQUESTS, |v| {
            v.from_adapter.then_some(v.pending as i64)
        }),
    ];
    for (instrument, field) in gauges {
        let t = Arc::clone(state);
        observable_up_down_counter(meter, instrument, move |obs| {
            for view in views(&t) {
                if let Some(value) = field(&view) {
                    obs.observe(value, &pool_series::attributes(view.pid, &view.name));
                }
            }
        });
    }
    let t = Arc::clone(state);
    observable_counter(meter, &catalogue::CONNECTION_TIMEOUTS, move |obs| {
        for view in views(&t) {
            if view.from_adapter {
                obs.observe(
                    view.timeouts,
                    &pool_series::attributes(view.pid, &view.name),
                );
            }
        }
    });
}

// The SDK keeps the callbacks alive; the instruments' handles need not be
// stored.
fn register_observables(meter: &Meter, observed: Observed) {
    let Observed {
        state,
        max_series,
        export_counters,
        ..
    } = observed;
    if let Some(counters) = export_counters {
        register_export_observables(meter, counters);
    }
    let leaks = Arc::clone(&state);
    observable_up_down_counter(meter, &catalogue::LEAK_OPEN, move |obs| {
        let counts = leaks.with(|s| {
            let mut counts: BTreeMap<(LeakKind, u32, String), i64> = BTreeMap::new();
            for report in s.leaks.open_reports() {
                let pool = report.pool.clone().unwrap_or_default();
                *counts.entry((report.kind, report.pid, pool)).or_default() += 1;
            }
            counts
        });
        let Ok(counts) = counts else { return };
        for ((kind, pid, pool), count) in counts.into_iter().take(max_series) {
            let mut attrs = vec![
                KeyValue::new(attr::KIND, kind.as_str()),
                KeyValue::new(attr::PROCESS_PID, i64::from(pid)),
            ];
            if !pool.is_empty() {
                attrs.push(KeyValue::new(attr::DB_CONNECTION_POOL_NAME, pool));
            }
            obs.observe(count, &attrs);
        }
    });
    register_pool_observables(meter, &state, max_series);
    let open_tracker = Arc::clone(&state);
    observable_gauge(meter, &catalogue::CONNECTION_OPEN, move |obs| {
        let _ = open_tracker.with(|s| {
            let t = &s.tracker;
            let placement = |pid| t.placement(pid).cloned();
            for (key, (open, _)) in
                connection_series(&mut t.open_connections(), &placement, max_series)
            {
                obs.observe(open, &series_attributes(&key));
            }
        });
    });
    let close_wait_tracker = Arc::clone(&state);
    observable_gauge(meter, &catalogue::CONNECTION_CLOSE_WAIT, move |obs| {
        let _ = close_wait_tracker.with(|s| {
            let t = &s.tracker;
            let placement = |pid| t.placement(pid).cloned();
            for (key, (_, close_wait)) in
                connection_series(&mut t.open_connections(), &placement, max_series)
            {
                if close_wait > 0 {
                    obs.observe(close_wait, &series_attributes(&key));
                }
            }
        });
    });
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
    let counters: [(&'static catalogue::Instrument, Reading); 4] = [
        (&catalogue::KERNEL_EVENTS_DROPPED, |k| k.dropped_events),
        (&catalogue::KERNEL_CONNECTIONS_UNTRACKED, |k| k.conns_full),
        (&catalogue::KERNEL_SOCKET_IO_UNATTRIBUTED, |k| {
            k.unattributed_socket_io
        }),
        (&catalogue::KERNEL_CONNECTS_UNATTRIBUTED, |k| {
            k.unattributed_connects
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

    #[test]
    fn series_are_bounded() {
        let t = tracker_with(&[
            (1, "a", 5432),
            (1, "a", 5432),
            (2, "b", 3306),
            (3, "c", 6379),
        ]);
        let series = connection_series(&mut t.open_connections(), &|_| None, 2);
        assert_eq!(
            series.len(),
            3,
            "two real series and one overflow: {series:?}"
        );
        let total: u64 = series.values().map(|v| v.0).sum();
        assert_eq!(total, 4, "overflow keeps the counts");
        assert!(series.keys().any(|k| k.1 == "_other"));
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
        Telemetry::new(Observed {
            resource: opentelemetry_sdk::Resource::builder().build(),
            otlp_reader: None,
            export_counters: None,
            state: State::shared_for_tests(tracker_with(&[(7, "psql", 5432)])),
            max_series: 10,
            slow_threshold_ns: 250_000_000,
        })
        .expect("telemetry")
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
                    kind: LeakKind::CloseWait,
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
        let telemetry = Telemetry::new(Observed {
            resource: opentelemetry_sdk::Resource::builder().build(),
            otlp_reader: None,
            export_counters: Some(Arc::default()),
            state: {
                let mut state = State::new(t, crate::reports::Reports::new(1, 1), leaks);
                state.kernel = KernelCounters {
                    probes: vec![("sys_enter_read".into(), 1_000, 10)],
                    ..KernelCounters::default()
                };
                Arc::new(Shared::new(state, "state", Arc::default()))
            },
            max_series: 10,
            slow_threshold_ns: 250_000_000,
        })
        .expect("telemetry");
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
        Telemetry::new(Observed {
            resource: opentelemetry_sdk::Resource::builder().build(),
            otlp_reader: None,
            export_counters: None,
            state: State::shared_for_tests(Tracker::new(TrackerConfig::default())),
            max_series: 10,
            slow_threshold_ns: 250_000_000,
        })
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
    #[test]
    fn gone_pools_series_are_forgotten_and_live_pools_restart_from_zero() {
        let telemetry = pools_telemetry();
        let mut outputs = vec![waited(7, "orders", AcquireResult::Ok); 3];
        for i in 0..200u32 {
            let pool = format!("p{}", i % 8);
            outputs.push(waited(1000 + i / 8, &pool, AcquireResult::Timeout));
            outputs.push(Output::Released {
                pid: 1000 + i / 8,
                pool: pool.clone(),
                use_ns: 1_000,
            });
            outputs.push(Output::PoolConnectionCreated {
                pid: 1000 + i / 8,
                pool,
                create_ns: 1_000,
            });
        }
        telemetry.record(&outputs);
        let before = telemetry.render_prometheus().expect("render");
        assert_eq!(wait_counts(&before, 1003, "p5").len(), 1, "{before}");
        assert_eq!(wait_counts(&before, 7, "orders").len(), 1);

        let live: HashSet<(u32, String)> = [(7, "orders".to_string())].into();
        telemetry.forget_gone_pools(&live);
        telemetry.record(&vec![waited(7, "orders", AcquireResult::Ok); 2]);
        let after = telemetry.render_prometheus().expect("render");
        for pid in 1000..1025 {
            assert!(
                !after.contains(&format!("process_pid=\"{pid}\"")),
                "pools of gone process {pid} still exported:\n{after}"
            );
        }
        let live_lines = wait_counts(&after, 7, "orders");
        assert_eq!(live_lines.len(), 1, "{after}");
        assert!(
            live_lines[0].ends_with(" 2"),
            "counts restart at the reset: {live_lines:?}"
        );
        assert!(after.contains("poolscope_telemetry_pool_series_forgotten_total 200"));
        assert!(after.contains("poolscope_telemetry_pool_series_resets_total 1"));
        assert_eq!(
            after
                .matches("# TYPE db_client_connection_wait_time_seconds ")
                .count(),
            1,
            "one family per name across both registries:\n{after}"
        );

        // More gone pools right away: the next rebuild waits its turn...
        let many: Vec<Output> = (0..100)
            .map(|i| waited(2000 + i, "q", AcquireResult::Ok))
            .collect();
        telemetry.record(&many);
        telemetry.forget_gone_pools(&live);
        let text = telemetry.render_prometheus().expect("render");
        assert_eq!(wait_counts(&text, 2042, "q").len(), 1);
        // ...and comes once the interval has passed.
        let later = Instant::now() + pool_series::MIN_REBUILD_INTERVAL;
        assert_eq!(telemetry.pool_series.forget_gone(&live, later), 100);
        let text = telemetry.render_prometheus().expect("render");
        assert!(wait_counts(&text, 2042, "q").is_empty(), "{text}");
        assert!(text.contains("poolscope_telemetry_pool_series_resets_total 2"));

        // A few gone pools are not worth resetting the live ones.
        telemetry.record(&[
            waited(3000, "r", AcquireResult::Ok),
            waited(7, "orders", AcquireResult::Ok),
        ]);
        let much_later = later + 2 * pool_series::MIN_REBUILD_INTERVAL;
        assert_eq!(telemetry.pool_series.forget_gone(&live, much_later), 0);
    }

    #[test]
    fn gone_pools_near_the_cardinality_limit_are_forgotten_without_waiting() {
        let telemetry = pools_telemetry();
        let live: HashSet<(u32, String)> = [(7, "orders".to_string())].into();
        let first: Vec<Output> = (0..100)
            .map(|i| waited(2000 + i, "q", AcquireResult::Ok))
            .collect();
        telemetry.record(&first);
        let now = Instant::now();
        assert_eq!(telemetry.pool_series.forget_gone(&live, now), 100);
        let flood: Vec<Output> = (0..pool_series::PRESSURE_POOLS as u32)
            .map(|i| waited(10_000 + i, "flood", AcquireResult::Ok))
            .collect();
        telemetry.record(&flood);
        assert_eq!(
            telemetry.pool_series.forget_gone(&live, now),
            pool_series::PRESSURE_POOLS
        );
    }

    #[test]
    fn a_live_pool_keeps_its_own_series_among_a_thousand_live_pools() {
        let telemetry = pools_telemetry();
        let mut outputs = Vec::new();
        let mut live = HashSet::new();
        // Every result, so that the wait-time histogram holds 3,000 series,
        // past the SDK's default limit of 2,000.
        for i in 0..1000u32 {
            for result in [
                AcquireResult::Ok,
                AcquireResult::Timeout,
                AcquireResult::Error,
            ] {
                outputs.push(waited(5000 + i, "crowd", result));
            }
            live.insert((5000 + i, "crowd".to_string()));
        }
        outputs.push(waited(7, "orders", AcquireResult::Ok));
        live.insert((7, "orders".to_string()));
        telemetry.record(&outputs);
        telemetry.forget_gone_pools(&live);
        let text = telemetry.render_prometheus().expect("render");
        assert!(!text.contains("otel_metric_overflow"), "overflowed");
        let lines = wait_counts(&text, 7, "orders");
        assert_eq!(lines.len(), 1, "the live pool has its own series");
        assert!(lines[0].ends_with(" 1"), "{lines:?}");
        assert!(text.contains("poolscope_telemetry_pool_series_resets_total 0"));
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
    /// type and description, every declared instrument is exported, and
    /// every sample carries its required attributes and no undeclared one.
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
            let declared = |label: &str| {
                family
                    .attributes
                    .iter()
                    .any(|a| a.key.replace('.', "_") == label)
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
                .filter(|a| a.requirement == catalogue::Requirement::Required)
            {
                assert!(
                    labels.contains(&required.key.replace('.', "_").as_str()),
                    "{}: a sample lacks {}: {labels:?}",
                    family.name,
                    required.key
                );
            }
        }
    }
}
