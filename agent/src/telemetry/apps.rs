//! Each observed application's telemetry under a resource of its own.
//!
//! An application is one process (its resource: `crate::identity`). Its
//! pool, connection, query and leak metrics live in a meter provider of its
//! own, so that OTLP carries one resource per application (a backend
//! groups them by `service.name`) and `/metrics` labels its series with
//! the same resource attributes (what Prometheus's
//! `promote_resource_attributes` gives on the OTLP path).
//!
//! A provider per process also forgets cleanly: the SDK keeps every
//! attribute set of a cumulative instrument for the life of its provider,
//! so the series of a process that exited go away with its provider.
//!
//! Bounds: at most `max_applications` processes get a provider of their
//! own; the rest share one whose `service.name` is `_other` (counted in
//! `poolscope.telemetry.applications.folded`). Each instrument of a
//! provider holds at most [`SERIES_LIMIT`] series, so one process cannot
//! crowd out another's.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use opentelemetry::{
    metrics::{BoundHistogram, Counter, Histogram, Meter, MeterProvider},
    Array, Key, KeyValue, StringValue, Value as OtelValue,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        data::ResourceMetrics, reader::MetricReader, InstrumentKind, ManualReader, Pipeline,
        SdkMeterProvider, Temporality,
    },
    Resource,
};
use telemetry_catalogue::{self as catalogue, attr};

use super::instruments::{
    counter, histogram, observable_counter, observable_gauge, observable_up_down_counter,
};
use crate::{
    detect::LeakKind,
    identity::{Identity, Value},
    lifecycle::{ConnState, PoolView},
    state::{Shared, State},
};

/// Series each instrument of one application may hold: a process's pools
/// (at most 64, three wait-time series each), servers and operations fit
/// well within it; past it the SDK folds the rest into its overflow
/// series, of that process only.
pub const SERIES_LIMIT: usize = 512;

/// Pools of one application whose histogram handles are kept bound.
const MAX_BOUND_POOLS: usize = 128;

/// Round-trip series of one application kept bound (servers x operations).
const MAX_BOUND_ROUND_TRIPS: usize = 256;

/// A successful round trip's series: its server attributes (shared, built
/// once per server and database: compared by identity, which the key's
/// own reference keeps unique) and its operation.
struct RoundTripKey {
    server: Arc<[KeyValue]>,
    operation: Option<StringValue>,
}

impl PartialEq for RoundTripKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.server, &other.server) && self.operation == other.operation
    }
}

impl Eq for RoundTripKey {}

impl std::hash::Hash for RoundTripKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.server).cast::<KeyValue>(), state);
        self.operation.as_ref().map(StringValue::as_str).hash(state);
    }
}

/// How long an exited process's series stay on /metrics: a short-lived
/// process (a job, a CLI) would otherwise lose what it did since the last
/// scrape. OTLP sends them once more at the exit instead.
pub const EXITED_SERIES_GRACE: Duration = Duration::from_secs(60);

/// Identities learned this recently are kept even when housekeeping's list
/// of known processes (taken a moment before) lacks them.
const JUST_LEARNED: Duration = Duration::from_secs(5);

/// How long one snapshot of the state serves the observable instruments:
/// a scrape or an export collects every application within it.
const SNAPSHOT_AGE: Duration = Duration::from_millis(500);

/// The per-application gauges' values, read from the state once for all
/// applications.
#[derive(Default)]
struct AppValues {
    pools: Vec<PoolView>,
    /// (server address, port) -> (open, close_wait).
    servers: BTreeMap<(String, Option<u16>), (u64, u64)>,
    /// (kind, pool) -> open reports.
    leaks: BTreeMap<(LeakKind, String), i64>,
}

/// Values by application: `Some(pid)` for a process with a provider of its
/// own, `None` for the shared `_other` one.
type Snapshot = HashMap<Option<u32>, AppValues>;

/// What the observable instruments read.
struct Views {
    state: Arc<Shared<State>>,
    /// Processes with a provider of their own; the rest fold into `_other`.
    own: Mutex<HashSet<u32>>,
    cache: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// Bound on (process, server) series in all.
    max_series: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // What these locks guard stays consistent whatever panicked holding them.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Views {
    fn snapshot(&self) -> Arc<Snapshot> {
        let mut cache = lock(&self.cache);
        if let Some((at, snapshot)) = cache.as_ref() {
            if at.elapsed() < SNAPSHOT_AGE {
                return Arc::clone(snapshot);
            }
        }
        let snapshot = Arc::new(self.build());
        *cache = Some((Instant::now(), Arc::clone(&snapshot)));
        snapshot
    }

    fn build(&self) -> Snapshot {
        let own = lock(&self.own).clone();
        let key = |pid: u32| own.contains(&pid).then_some(pid);
        let mut snapshot = Snapshot::new();
        let _ = self.state.with(|s| {
            for view in s.tracker.pool_views() {
                snapshot.entry(key(view.pid)).or_default().pools.push(view);
            }
            let mut series = 0usize;
            for conn in s.tracker.open_connections() {
                let values = snapshot.entry(key(conn.id.pid)).or_default();
                let mut server = (conn.remote.address(), conn.remote.port());
                if !values.servers.contains_key(&server) {
                    if series >= self.max_series {
                        server = ("_other".into(), None);
                    } else {
                        series += 1;
                    }
                }
                let entry = values.servers.entry(server).or_default();
                entry.0 += 1;
                if conn.state == ConnState::PeerClosed {
                    entry.1 += 1;
                }
            }
            for report in s.leaks.open_reports() {
                let pool = report.pool.clone().unwrap_or_default();
                *snapshot
                    .entry(key(report.pid))
                    .or_default()
                    .leaks
                    .entry((report.kind, pool))
                    .or_default() += 1;
            }
        });
        snapshot
    }
}

/// A manual reader the provider and the OTLP export share: the provider
/// takes its reader by value, the export loop collects through the same.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// A pool's attributes (built once: recording runs for every checkout)
/// and its successful-wait and use histograms bound to them. A bound
/// record skips hashing the attributes and the series lookup; each is
/// bound at its first record, since a bound series is exported from then
/// on, empty or not.
struct PoolHandles {
    attributes: Vec<KeyValue>,
    wait_ok: Option<BoundHistogram<f64>>,
    use_time: Option<BoundHistogram<f64>>,
}

impl PoolHandles {
    fn wait_ok(&mut self, app: &App) -> &BoundHistogram<f64> {
        self.wait_ok
            .get_or_insert_with(|| app.wait_time.bind(&self.attributes))
    }

    fn use_time(&mut self, app: &App) -> &BoundHistogram<f64> {
        self.use_time
            .get_or_insert_with(|| app.use_time.bind(&self.attributes))
    }
}

/// One application's instruments.
pub struct App {
    /// What it was made as: a process learned anew under the same pid (a
    /// pid reused) gets an application of its own.
    identity: Identity,
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    reader: Option<SharedReader>,
    pub operation_duration: Histogram<f64>,
    pub slow_queries: Counter<u64>,
    wait_time: Histogram<f64>,
    use_time: Histogram<f64>,
    create_time: Histogram<f64>,
    pools: Mutex<HashMap<String, PoolHandles>>,
    round_trips: Mutex<HashMap<RoundTripKey, BoundHistogram<f64>>>,
}

/// Which pool histogram.
#[derive(Clone, Copy)]
pub enum PoolSeries {
    Wait,
    Use,
    Create,
}

impl App {
    fn build(
        identity: &Identity,
        key: Option<u32>,
        views: &Arc<Views>,
        config: &ApplicationsConfig,
    ) -> anyhow::Result<App> {
        let resource = resource(identity);
        let registry = prometheus::Registry::new();
        let labels: HashSet<Key> = catalogue::RESOURCE_ATTRIBUTES
            .iter()
            .filter(|r| r.label)
            .map(|r| Key::from_static_str(r.attribute.key))
            .collect();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            // The resource is on every series (as labels); the agent's own
            // target_info says who scrapes.
            .without_target_info()
            .with_resource_selector(labels)
            .build()
            .context("cannot build an application's Prometheus exporter")?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(exporter)
            .with_view(super::attributes_view(&config.attributes, SERIES_LIMIT));
        let reader = config
            .otlp
            .then(|| SharedReader(Arc::new(ManualReader::builder().build())));
        if let Some(reader) = &reader {
            builder = builder.with_reader(reader.clone());
        }
        let provider = builder.build();
        let meter = provider.meter("poolscope");
        register_observables(&meter, key, views);
        Ok(App {
            identity: identity.clone(),
            operation_duration: histogram(&meter, &catalogue::OPERATION_DURATION),
            slow_queries: counter(&meter, &catalogue::QUERIES_SLOW),
            wait_time: histogram(&meter, &catalogue::CONNECTION_WAIT_TIME),
            use_time: histogram(&meter, &catalogue::CONNECTION_USE_TIME),
            create_time: histogram(&meter, &catalogue::CONNECTION_CREATE_TIME),
            pools: Mutex::default(),
            round_trips: Mutex::default(),
            provider,
            registry,
            reader,
        })
    }

    /// Records one pool measurement.
    pub fn record_pool(
        &self,
        series: PoolSeries,
        pool: &str,
        seconds: f64,
        error: Option<&'static str>,
    ) {
        self.with_pool(pool, |handles, app| match (series, error) {
            (PoolSeries::Wait, None) => handles.wait_ok(app).record(seconds),
            (PoolSeries::Wait, Some(error)) => {
                let mut attrs = handles.attributes.clone();
                attrs.push(KeyValue::new(attr::ERROR_TYPE, error));
                app.wait_time.record(seconds, &attrs);
            }
            (PoolSeries::Use, _) => handles.use_time(app).record(seconds),
            // Once per connection: not worth a bound series.
            (PoolSeries::Create, _) => app.create_time.record(seconds, &handles.attributes),
        });
    }

    /// A successful round trip: recorded through its bound series, which
    /// skips the SDK's hashing of the attributes (and building them) on
    /// every round trip; `attributes` builds them for its first.
    pub fn record_round_trip(
        &self,
        server: &Arc<[KeyValue]>,
        operation: Option<&StringValue>,
        seconds: f64,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) {
        let key = RoundTripKey {
            server: Arc::clone(server),
            operation: operation.cloned(),
        };
        let mut bound = lock(&self.round_trips);
        if let Some(series) = bound.get(&key) {
            return series.record(seconds);
        }
        let attrs = attributes();
        if bound.len() >= MAX_BOUND_ROUND_TRIPS {
            // Past the bound the series are the SDK's to limit.
            return self.operation_duration.record(seconds, &attrs);
        }
        let series = self.operation_duration.bind(&attrs);
        series.record(seconds);
        bound.insert(key, series);
    }

    /// Folded checkouts' waits and uses (ns), under one lookup of the pool.
    pub fn record_folded(&self, pool: &str, waits_ns: &[u64], uses_ns: &[u64]) {
        self.with_pool(pool, |handles, app| {
            if !waits_ns.is_empty() {
                let wait_ok = handles.wait_ok(app);
                for wait in waits_ns {
                    wait_ok.record(*wait as f64 / 1e9);
                }
            }
            if !uses_ns.is_empty() {
                let use_time = handles.use_time(app);
                for used in uses_ns {
                    use_time.record(*used as f64 / 1e9);
                }
            }
        });
    }

    fn with_pool(&self, pool: &str, f: impl FnOnce(&mut PoolHandles, &App)) {
        let mut pools = lock(&self.pools);
        if let Some(handles) = pools.get_mut(pool) {
            return f(handles, self);
        }
        let mut handles = PoolHandles {
            attributes: pool_attributes(pool),
            wait_ok: None,
            use_time: None,
        };
        if pools.len() >= MAX_BOUND_POOLS {
            // Past the bound the series are the SDK's to limit; only the
            // handles are not kept.
            return f(&mut handles, self);
        }
        f(pools.entry(pool.to_string()).or_insert(handles), self);
    }

    /// Its series in the Prometheus text format's model.
    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Collects its metrics for an OTLP export.
    pub fn collect(&self) -> Option<ResourceMetrics> {
        let reader = self.reader.as_ref()?;
        let mut metrics = ResourceMetrics::default();
        reader.collect(&mut metrics).ok()?;
        let has_data = metrics
            .scope_metrics()
            .any(|scope| scope.metrics().next().is_some());
        has_data.then_some(metrics)
    }
}

/// Attributes of a pool's series (its process is the resource).
pub fn pool_attributes(pool: &str) -> Vec<KeyValue> {
    vec![KeyValue::new(
        attr::DB_CONNECTION_POOL_NAME,
        pool.to_string(),
    )]
}

fn resource(identity: &Identity) -> Resource {
    let attributes = identity.attributes.iter().map(|(key, value)| {
        let value = match value {
            Value::Text(text) => OtelValue::from(text.clone()),
            Value::Int(i) => OtelValue::I64(*i),
            Value::Texts(items) => OtelValue::Array(Array::String(
                items.iter().cloned().map(StringValue::from).collect(),
            )),
        };
        KeyValue::new(key.clone(), value)
    });
    // Only what the agent knows: no SDK or environment detectors, whose
    // values would be the agent's own.
    Resource::builder_empty()
        .with_attributes(attributes)
        .build()
}

/// The per-application gauges, all read from one snapshot.
fn register_observables(meter: &Meter, key: Option<u32>, views: &Arc<Views>) {
    let values = move |views: &Views, f: &mut dyn FnMut(&AppValues)| {
        let snapshot = views.snapshot();
        if let Some(values) = snapshot.get(&key) {
            f(values);
        }
    };
    let v = Arc::clone(views);
    observable_up_down_counter(meter, &catalogue::CONNECTION_COUNT, move |obs| {
        values(&v, &mut |app| {
            for view in &app.pools {
                for (state, count) in [("used", view.used), ("idle", view.idle)] {
                    let mut attrs = pool_attributes(&view.name);
                    attrs.push(KeyValue::new(attr::DB_CONNECTION_STATE, state));
                    obs.observe(count as i64, &attrs);
                }
            }
        })
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
        let v = Arc::clone(views);
        observable_up_down_counter(meter, instrument, move |obs| {
            values(&v, &mut |app| {
                for view in &app.pools {
                    if let Some(value) = field(view) {
                        obs.observe(value, &pool_attributes(&view.name));
                    }
                }
            })
        });
    }
    let v = Arc::clone(views);
    observable_counter(meter, &catalogue::CONNECTION_TIMEOUTS, move |obs| {
        values(&v, &mut |app| {
            for view in app.pools.iter().filter(|v| v.from_adapter) {
                obs.observe(view.timeouts, &pool_attributes(&view.name));
            }
        })
    });
    let v = Arc::clone(views);
    observable_gauge(meter, &catalogue::CONNECTION_OPEN, move |obs| {
        values(&v, &mut |app| {
            for (server, (open, _)) in &app.servers {
                obs.observe(*open, &server_attributes(server));
            }
        })
    });
    let v = Arc::clone(views);
    observable_gauge(meter, &catalogue::CONNECTION_CLOSE_WAIT, move |obs| {
        values(&v, &mut |app| {
            for (server, (_, close_wait)) in &app.servers {
                if *close_wait > 0 {
                    obs.observe(*close_wait, &server_attributes(server));
                }
            }
        })
    });
    let v = Arc::clone(views);
    observable_up_down_counter(meter, &catalogue::LEAK_OPEN, move |obs| {
        values(&v, &mut |app| {
            for ((kind, pool), count) in &app.leaks {
                let mut attrs = vec![KeyValue::new(attr::KIND, kind.as_str())];
                if !pool.is_empty() {
                    attrs.push(KeyValue::new(attr::DB_CONNECTION_POOL_NAME, pool.clone()));
                }
                obs.observe(*count, &attrs);
            }
        })
    });
}

fn server_attributes((address, port): &(String, Option<u16>)) -> Vec<KeyValue> {
    let mut attrs = vec![KeyValue::new(attr::SERVER_ADDRESS, address.clone())];
    if let Some(port) = port {
        attrs.push(KeyValue::new(attr::SERVER_PORT, i64::from(*port)));
    }
    attrs
}

/// Each known process's resource, for what is not a metric: the log
/// records of its reports go out under it too.
#[derive(Debug, Default)]
pub struct ApplicationResources {
    by_pid: Mutex<HashMap<u32, Resource>>,
}

impl ApplicationResources {
    pub fn get(&self, pid: u32) -> Option<Resource> {
        lock(&self.by_pid).get(&pid).cloned()
    }
}

/// What the self-metrics read.
#[derive(Debug, Default)]
pub struct ApplicationCounts {
    /// Processes with telemetry of their own now.
    pub live: AtomicU64,
    /// Processes folded into `_other` because all room was taken.
    pub folded: AtomicU64,
}

pub struct ApplicationsConfig {
    pub max_applications: usize,
    /// Bound on (process, server) series of the connection gauges in all.
    pub max_series: usize,
    pub host_name: String,
    /// Whether applications are pushed over OTLP too.
    pub otlp: bool,
    /// `[metrics]`: attributes added to or dropped from metrics.
    pub attributes: super::attributes::MetricsConfig,
    /// Where the applications' resources are kept for the log records.
    pub resources: Arc<ApplicationResources>,
    /// How long an exited process's series stay on /metrics.
    pub exited_series_grace: Duration,
}

#[derive(Default)]
struct Registry {
    /// What each known process is, learned when it is first seen, and
    /// when (housekeeping's view of the known processes may predate it).
    identities: HashMap<u32, (Identity, Instant)>,
    apps: HashMap<u32, Arc<App>>,
    other: Option<Arc<App>>,
    /// Processes counted as folded into `_other` (each once).
    folded: HashSet<u32>,
    /// Applications of exited processes, waiting for their last export.
    retired: Vec<Arc<App>>,
    /// Applications of exited processes still on /metrics, and since when
    /// (see [`EXITED_SERIES_GRACE`]).
    departed: Vec<(u32, Instant, Arc<App>)>,
}

/// Every application's telemetry.
pub struct Applications {
    registry: Mutex<Registry>,
    config: ApplicationsConfig,
    views: Arc<Views>,
    pub counts: Arc<ApplicationCounts>,
    export: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
}

impl Applications {
    pub fn new(state: Arc<Shared<State>>, config: ApplicationsConfig) -> Applications {
        Applications {
            views: Arc::new(Views {
                state,
                own: Mutex::default(),
                cache: Mutex::default(),
                max_series: config.max_series,
            }),
            registry: Mutex::default(),
            config,
            counts: Arc::default(),
            export: Mutex::default(),
        }
    }

    /// Remembers what a process is, for its resource. An application
    /// made for the pid as something else (a pid reused before its old
    /// process was let go, or used before it was read) is let go: the next
    /// record makes the right one.
    pub fn learn(&self, pid: u32, identity: Identity) {
        lock(&self.config.resources.by_pid).insert(pid, resource(&identity));
        let mut registry = lock(&self.registry);
        if registry
            .apps
            .get(&pid)
            .is_some_and(|app| app.identity != identity)
        {
            self.let_go(&mut registry, pid);
        }
        registry.identities.insert(pid, (identity, Instant::now()));
    }

    /// Drops the application of `pid`; its last values go out in the next
    /// OTLP export.
    fn let_go(&self, registry: &mut Registry, pid: u32) {
        if let Some(app) = registry.apps.remove(&pid) {
            if self.config.otlp {
                registry.retired.push(Arc::clone(&app));
            }
            if !self.config.exited_series_grace.is_zero() {
                registry.departed.push((pid, Instant::now(), app));
            }
        }
        lock(&self.views.own).remove(&pid);
        self.counts.live.store(registry.apps.len() as u64, Relaxed);
    }

    /// Runs `f` with the application of `pid`, made at its first use.
    pub fn with<R>(&self, pid: u32, f: impl FnOnce(&App) -> R) -> Option<R> {
        let mut registry = lock(&self.registry);
        if let Some(app) = registry.apps.get(&pid) {
            return Some(f(app));
        }
        let app = self.make(&mut registry, pid)?;
        Some(f(&app))
    }

    fn make(&self, registry: &mut Registry, pid: u32) -> Option<Arc<App>> {
        if registry.apps.len() < self.config.max_applications {
            let identity = registry
                .identities
                .get(&pid)
                .map(|(identity, _)| identity.clone())
                .unwrap_or_else(|| crate::identity::unknown(pid, &self.config.host_name));
            match App::build(&identity, Some(pid), &self.views, &self.config) {
                Ok(app) => {
                    // The pid's former process must not show beside it
                    // (their series could be alike).
                    registry.departed.retain(|(departed, ..)| *departed != pid);
                    let app = Arc::new(app);
                    registry.apps.insert(pid, Arc::clone(&app));
                    lock(&self.views.own).insert(pid);
                    self.counts.live.store(registry.apps.len() as u64, Relaxed);
                    return Some(app);
                }
                Err(e) => log::warn!("process {pid}'s telemetry joins `_other`: {e:#}"),
            }
        }
        if registry.folded.insert(pid) {
            self.counts.folded.fetch_add(1, Relaxed);
        }
        if registry.other.is_none() {
            let identity = Identity::other(&self.config.host_name);
            match App::build(&identity, None, &self.views, &self.config) {
                Ok(app) => registry.other = Some(Arc::new(app)),
                Err(e) => log::warn!("no telemetry for process {pid}: {e:#}"),
            }
        }
        registry.other.clone()
    }

    /// Makes an application for each `active` process that has none yet
    /// (one with idle connections only has gauges to show), and lets go of
    /// those of processes no longer `known` (their last values go out in
    /// the next OTLP export).
    pub fn sync(&self, known: &HashSet<u32>, active: &HashSet<u32>) {
        let mut registry = lock(&self.registry);
        let gone: Vec<u32> = registry
            .apps
            .keys()
            .copied()
            .filter(|pid| !known.contains(pid))
            .collect();
        for pid in gone {
            self.let_go(&mut registry, pid);
        }
        let grace = self.config.exited_series_grace;
        registry
            .departed
            .retain(|(_, since, _)| since.elapsed() < grace);
        registry
            .identities
            .retain(|pid, (_, learned)| known.contains(pid) || learned.elapsed() < JUST_LEARNED);
        let identities = &registry.identities;
        lock(&self.config.resources.by_pid).retain(|pid, _| identities.contains_key(pid));
        registry.folded.retain(|pid| known.contains(pid));
        for pid in active {
            if !registry.apps.contains_key(pid) && !registry.folded.contains(pid) {
                self.make(&mut registry, *pid);
            }
        }
        self.counts.live.store(registry.apps.len() as u64, Relaxed);
    }

    /// Every application's Prometheus families.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        // Gathered outside the lock: a scrape never holds up recording.
        let apps: Vec<Arc<App>> = {
            let registry = lock(&self.registry);
            registry
                .apps
                .values()
                .chain(registry.other.as_ref())
                .chain(registry.departed.iter().map(|(_, _, app)| app))
                .cloned()
                .collect()
        };
        apps.iter().flat_map(|app| app.gather()).collect()
    }

    /// Pushes every application's metrics every `interval` with `export`
    /// (one request per application; `false` when it failed, and then the
    /// rest of that round waits for the next).
    pub fn start_export(
        self: &Arc<Self>,
        interval: Duration,
        export: impl Fn(&ResourceMetrics) -> bool + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = mpsc::channel::<()>();
        let apps = Arc::downgrade(self);
        let worker = std::thread::Builder::new()
            .name("poolscope-otlp-apps".into())
            .spawn(move || loop {
                let last = match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => false,
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
                };
                let Some(apps) = apps.upgrade() else { return };
                apps.export_round(&export);
                if last {
                    return;
                }
            })
            .context("cannot start the applications' OTLP export")?;
        *lock(&self.export) = Some((stop, worker));
        Ok(())
    }

    fn export_round(&self, export: &dyn Fn(&ResourceMetrics) -> bool) {
        let (apps, retired) = {
            let mut registry = lock(&self.registry);
            let apps: Vec<Arc<App>> = registry
                .apps
                .values()
                .chain(registry.other.as_ref())
                .cloned()
                .collect();
            (apps, std::mem::take(&mut registry.retired))
        };
        for app in retired.iter().chain(&apps) {
            if let Some(metrics) = app.collect() {
                if !export(&metrics) {
                    // The collector is down or slow: the others would wait
                    // out the same timeout.
                    break;
                }
            }
        }
        for app in retired {
            let _ = app.provider.shutdown();
        }
    }

    /// The last export, within `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        let Some((stop, worker)) = lock(&self.export).take() else {
            return;
        };
        let _ = stop.send(());
        let deadline = Instant::now() + timeout;
        while !worker.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if worker.is_finished() {
            let _ = worker.join();
        }
    }
}
