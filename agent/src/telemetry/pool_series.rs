//! The per-pool histograms (`db.client.connection.wait_time`, `.use_time`,
//! `.create_time`), in a meter provider of their own.
//!
//! Why a provider of their own: the SDK keeps every attribute set of a
//! cumulative instrument for the life of its meter provider and offers no
//! way to drop one, and any local user can name pools (the adapter socket is
//! open to all), so series of pools whose processes exited would pile up
//! until the instrument's cardinality limit folds a legitimate pool into the
//! overflow series. There is no observable histogram to report only live
//! pools instead. So this provider is thrown away and built again when
//! enough recorded pools are gone: the gone pools' series disappear, and the
//! live pools' histograms restart from zero (a counter reset, which
//! Prometheus' `rate()` and OTLP's new start time both handle).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use opentelemetry::{
    metrics::{BoundHistogram, Histogram, MeterProvider},
    KeyValue,
};
use opentelemetry_sdk::{
    metrics::{Instrument, SdkMeterProvider, Stream},
    Resource,
};

use telemetry_catalogue::{self as catalogue, attr};

use super::{instruments::histogram, otlp};

/// Series each pool histogram may hold. Live pools are bounded by the
/// tracker (at most 1,024 in all) and a pool has at most three wait-time
/// series (ok, timeout, error), so this leaves room for the gone pools
/// recorded between two rebuilds without ever folding a live pool into the
/// SDK's overflow series.
pub const CARDINALITY_LIMIT: usize = 8192;

/// Gone pools that make a rebuild worth its reset of the live pools.
pub const GONE_THRESHOLD: usize = 32;

/// Rebuilds happen at most this often (each one costs the live pools the
/// increments since the last scrape), unless the series run short of room.
pub const MIN_REBUILD_INTERVAL: Duration = Duration::from_secs(60);

/// Recorded pools past which a rebuild does not wait for the interval: the
/// wait-time series (three per pool at most) would otherwise come near the
/// cardinality limit, and overflow is worse than a reset.
pub const PRESSURE_POOLS: usize = CARDINALITY_LIMIT / 4;

/// One generation of the pool histograms.
struct Instruments {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    wait_time: Histogram<f64>,
    use_time: Histogram<f64>,
    create_time: Histogram<f64>,
    /// Whether an OTLP reader pushes this generation (its last export is
    /// worth waiting for on a thread of its own).
    pushes: bool,
}

impl Instruments {
    fn build(resource: &Resource, otlp: Option<otlp::MetricReader>) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            // The main registry already says who we are.
            .without_target_info()
            .build()
            .context("cannot build the Prometheus exporter of the pool series")?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(exporter)
            .with_view(|_: &Instrument| {
                Stream::builder()
                    .with_cardinality_limit(CARDINALITY_LIMIT)
                    .build()
                    .ok()
            });
        let pushes = otlp.is_some();
        if let Some(reader) = otlp {
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        let meter = provider.meter("poolscope");
        Ok(Instruments {
            wait_time: histogram(&meter, &catalogue::CONNECTION_WAIT_TIME),
            use_time: histogram(&meter, &catalogue::CONNECTION_USE_TIME),
            create_time: histogram(&meter, &catalogue::CONNECTION_CREATE_TIME),
            provider,
            registry,
            pushes,
        })
    }

    /// Sends this generation's last OTLP export. With a collector that
    /// hangs this takes the exporter's timeout, so it runs on a thread of
    /// its own unless there is nothing to push.
    fn retire(self) {
        if !self.pushes {
            let _ = self.provider.shutdown();
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("poolscope-pool-flush".into())
            .spawn(move || {
                if let Err(e) = self.provider.shutdown() {
                    log::debug!("retired pool series provider: {e}");
                }
            });
        if let Err(e) = spawned {
            log::debug!("cannot start the last export of the retired pool series: {e}");
        }
    }
}

#[derive(Clone, Copy)]
enum Series {
    Wait,
    Use,
    Create,
}

/// One pool's series in a generation: its attributes (built once: recording
/// runs for every checkout), and its successful-wait and use histograms
/// bound to them. A bound record skips hashing the attributes and the
/// series lookup, half of what recording cost per checkout. Each is bound
/// at its first record, because a bound series is exported from then on,
/// empty or not.
struct PoolSeriesHandles {
    attributes: Vec<KeyValue>,
    wait_ok: Option<BoundHistogram<f64>>,
    use_time: Option<BoundHistogram<f64>>,
}

impl PoolSeriesHandles {
    fn wait_ok(&mut self, instruments: &Instruments) -> &BoundHistogram<f64> {
        self.wait_ok
            .get_or_insert_with(|| instruments.wait_time.bind(&self.attributes))
    }

    fn use_time(&mut self, instruments: &Instruments) -> &BoundHistogram<f64> {
        self.use_time
            .get_or_insert_with(|| instruments.use_time.bind(&self.attributes))
    }
}

struct Generation {
    instruments: Instruments,
    /// The pools this generation has series for.
    recorded: HashMap<u32, HashMap<String, PoolSeriesHandles>>,
    recorded_count: usize,
    last_rebuild: Option<Instant>,
}

impl Generation {
    /// The pool's series and the generation's histograms; the series is
    /// made (and the pool counted as recorded) on its first record.
    fn series(&mut self, pid: u32, pool: &str) -> Option<(&mut PoolSeriesHandles, &Instruments)> {
        let pools = self.recorded.entry(pid).or_default();
        if !pools.contains_key(pool) {
            let handles = PoolSeriesHandles {
                attributes: attributes(pid, pool),
                wait_ok: None,
                use_time: None,
            };
            pools.insert(pool.to_string(), handles);
            self.recorded_count += 1;
        }
        Some((pools.get_mut(pool)?, &self.instruments))
    }

    fn record(
        &mut self,
        series: Series,
        pid: u32,
        pool: &str,
        seconds: f64,
        error: Option<&'static str>,
    ) {
        let Some((handles, instruments)) = self.series(pid, pool) else {
            return;
        };
        match (series, error) {
            (Series::Wait, None) => handles.wait_ok(instruments).record(seconds),
            (Series::Wait, Some(error)) => {
                let mut attrs = handles.attributes.clone();
                attrs.push(KeyValue::new(attr::ERROR_TYPE, error));
                instruments.wait_time.record(seconds, &attrs);
            }
            (Series::Use, _) => handles.use_time(instruments).record(seconds),
            // Once per connection: not worth a bound series.
            (Series::Create, _) => instruments.create_time.record(seconds, &handles.attributes),
        }
    }

    /// Recorded pools that are not in `live`.
    fn gone(&self, live: &HashSet<(u32, String)>) -> usize {
        // Walks `live` so that no key is built per recorded pool.
        let still_live = live
            .iter()
            .filter(|(pid, pool)| self.recorded.get(pid).is_some_and(|p| p.contains_key(pool)))
            .count();
        self.recorded_count.saturating_sub(still_live)
    }
}

/// What the self-metrics read.
#[derive(Debug, Default)]
pub struct ForgetCounts {
    /// Pools whose series were dropped because their pool was gone.
    pub forgotten: AtomicU64,
    /// Rebuilds, each of which restarted the live pools' histograms.
    pub resets: AtomicU64,
}

/// The pool histograms, rebuilt to forget gone pools.
pub struct PoolSeries {
    current: Mutex<Generation>,
    resource: Resource,
    otlp: Option<otlp::ReaderFactory>,
    pub counts: Arc<ForgetCounts>,
}

impl PoolSeries {
    pub fn new(
        resource: Resource,
        otlp: Option<(otlp::MetricReader, otlp::ReaderFactory)>,
    ) -> anyhow::Result<Self> {
        let (reader, factory) = match otlp {
            Some((reader, factory)) => (Some(reader), Some(factory)),
            None => (None, None),
        };
        Ok(PoolSeries {
            current: Mutex::new(Generation {
                instruments: Instruments::build(&resource, reader)?,
                recorded: HashMap::new(),
                recorded_count: 0,
                last_rebuild: None,
            }),
            resource,
            otlp: factory,
            counts: Arc::default(),
        })
    }

    /// Nothing inside the lock leaves the bookkeeping half-done in a way
    /// that matters (at worst a pool is counted once too often), so a panic
    /// elsewhere does not stop the pool series.
    fn lock(&self) -> MutexGuard<'_, Generation> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record_wait(&self, pid: u32, pool: &str, seconds: f64, error: Option<&'static str>) {
        self.lock().record(Series::Wait, pid, pool, seconds, error);
    }

    /// Folded checkouts' waits and uses (ns), under one lock and one
    /// lookup of the pool's series.
    pub fn record_folded(&self, pid: u32, pool: &str, waits_ns: &[u64], uses_ns: &[u64]) {
        let mut current = self.lock();
        let Some((handles, instruments)) = current.series(pid, pool) else {
            return;
        };
        if !waits_ns.is_empty() {
            let wait_ok = handles.wait_ok(instruments);
            for wait in waits_ns {
                wait_ok.record(*wait as f64 / 1e9);
            }
        }
        if !uses_ns.is_empty() {
            let use_time = handles.use_time(instruments);
            for used in uses_ns {
                use_time.record(*used as f64 / 1e9);
            }
        }
    }

    pub fn record_use(&self, pid: u32, pool: &str, seconds: f64) {
        self.lock().record(Series::Use, pid, pool, seconds, None);
    }

    pub fn record_create(&self, pid: u32, pool: &str, seconds: f64) {
        self.lock().record(Series::Create, pid, pool, seconds, None);
    }

    /// The current generation's Prometheus registry (gathered outside the
    /// lock, so that a scrape never holds up recording).
    pub fn registry(&self) -> prometheus::Registry {
        self.lock().instruments.registry.clone()
    }

    /// Drops the series of pools not in `live` (pid, pool name) by
    /// rebuilding the provider, when at least [`GONE_THRESHOLD`] recorded
    /// pools are gone and the last rebuild is [`MIN_REBUILD_INTERVAL`] old
    /// (or the series run short of room). Returns the pools forgotten.
    pub fn forget_gone(&self, live: &HashSet<(u32, String)>, now: Instant) -> usize {
        {
            let mut current = self.lock();
            let gone = current.gone(live);
            if gone < GONE_THRESHOLD {
                return 0;
            }
            let due = current
                .last_rebuild
                .is_none_or(|last| now.saturating_duration_since(last) >= MIN_REBUILD_INTERVAL);
            if !due && current.recorded_count < PRESSURE_POOLS {
                return 0;
            }
            // Failures wait for the next turn too, so that a failing
            // exporter build is not retried every second.
            current.last_rebuild = Some(now);
        }
        // Built outside the lock (the OTLP exporter is built on a thread of
        // its own): recording goes on meanwhile. Only housekeeping calls
        // this, so no other rebuild can start in between.
        let built = match &self.otlp {
            Some(factory) => factory.build().map(Some),
            None => Ok(None),
        }
        .and_then(|reader| Instruments::build(&self.resource, reader));
        let fresh = match built {
            Ok(fresh) => fresh,
            Err(e) => {
                log::warn!(
                    "cannot rebuild the pool histograms; the series of gone pools stay until the next try: {e:#}"
                );
                return 0;
            }
        };
        let mut current = self.lock();
        // Pools gone by now, including any recorded while building.
        let gone = current.gone(live);
        let old = std::mem::replace(&mut current.instruments, fresh);
        current.recorded.clear();
        current.recorded_count = 0;
        drop(current);
        self.counts.forgotten.fetch_add(gone as u64, Relaxed);
        self.counts.resets.fetch_add(1, Relaxed);
        log::info!(
            "forgot the histogram series of {gone} pools of exited processes; the live pools' histograms restart from zero"
        );
        old.retire();
        gone
    }

    /// The last export, then no more.
    pub fn shutdown(&self) {
        let provider = self.lock().instruments.provider.clone();
        if let Err(e) = provider.shutdown() {
            log::debug!("pool series provider shutdown: {e}");
        }
    }
}

/// Attributes of per-pool series: the pool and the process that owns it.
pub fn attributes(pid: u32, pool: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new(attr::DB_CONNECTION_POOL_NAME, pool.to_string()),
        KeyValue::new(attr::PROCESS_PID, i64::from(pid)),
    ]
}
