//! `poolscope run`: probes -> ring buffer -> decode -> tracker -> telemetry,
//! plus the HTTP API, until SIGTERM or SIGINT.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use opentelemetry::{logs::Severity, KeyValue};
use tokio::io::unix::AsyncFd;

use crate::{
    adapter::server::{AdapterSocket, Outcome, RateLimitedLog},
    api::{self, ApiState},
    clock::{monotonic_ns, Clock},
    config::Config,
    detect::{self, LeakKind, Thresholds},
    ebpf::{self, KernelProbes, LoadOptions, TracefsStatus},
    lifecycle::{
        CloseReason, ConnId, Endpoint, Event, EventKind, Output, SeededPhase, Tracker,
        TrackerConfig,
    },
    procfs::{self, SeededPeer, SeededTcpState},
    protocol::{self, DbSystem},
    reports::{LeakChange, LeakReports, ProcessDetails, Reports},
    telemetry::{
        otlp::{self, OtlpExport},
        KernelCounters, Observed, Telemetry,
    },
    wire,
};

struct Pipeline {
    tracker: Arc<Mutex<Tracker>>,
    telemetry: Arc<Telemetry>,
    probes: Arc<Mutex<KernelProbes>>,
    reports: Arc<Mutex<Reports>>,
    leaks: Arc<Mutex<LeakReports>>,
    otlp: Option<Arc<OtlpExport>>,
    /// The kubelet's pod log directory, to name pods (when it exists).
    pod_logs_dir: Option<std::path::PathBuf>,
    thresholds: Thresholds,
    clock: Clock,
    capture: CaptureBytes,
    /// Socket type of each Unix path seen, so /proc is read once per path.
    unix_types: Mutex<HashMap<String, u16>>,
    /// Command lines as they are, secrets included (off by default).
    full_command_lines: bool,
}

/// Head bytes copied per read/write, by protocol.
#[derive(Debug, Clone, Copy)]
struct CaptureBytes {
    sql: u32,
    redis: u32,
}

/// Unix paths whose socket type we remember; past this the cache restarts.
const UNIX_TYPE_CACHE: usize = 1024;

impl Pipeline {
    /// connect() on a Unix datagram socket (syslog, journald) is no
    /// connection: only stream sockets are tracked. The kernel cannot tell
    /// them apart cheaply, so we ask /proc once per path.
    fn is_unix_datagram(&self, event: &Event) -> bool {
        let EventKind::Connect {
            remote: Endpoint::Unix(path),
            ret: 0,
            ..
        } = &event.kind
        else {
            return false;
        };
        let Ok(mut cache) = self.unix_types.lock() else {
            return false;
        };
        let kind = match cache.get(path) {
            Some(kind) => Some(*kind),
            None => {
                let kind = procfs::unix_bound_type(Path::new("/proc"), event.conn.pid, path);
                if let Some(kind) = kind {
                    if cache.len() >= UNIX_TYPE_CACHE {
                        cache.clear();
                    }
                    cache.insert(path.clone(), kind);
                }
                kind
            }
        };
        kind.is_some_and(|k| k != procfs::UNIX_SOCK_STREAM)
    }

    /// Applies one event and does what its outputs ask of the kernel side.
    fn apply(&self, event: Event) {
        if self.is_unix_datagram(&event) {
            if let Ok(mut probes) = self.probes.lock() {
                probes.forget(event.conn.pid, event.conn.fd);
            }
            return;
        }
        // The socket data path looks only at processes that track a
        // connection: keep its per-process filter in step.
        match event.kind {
            EventKind::Connect {
                ref remote, ret, ..
            } => {
                if let Ok(mut probes) = self.probes.lock() {
                    probes.process_tracks(event.conn.pid);
                    if ret == 0
                        && matches!(remote, Endpoint::Unix(path) if protocol::unix_path_may_be_database(path))
                    {
                        probes.unix_connection_opened(event.conn.pid, event.conn.fd);
                    }
                }
            }
            EventKind::ProcessExit { .. } => {
                if let Ok(mut probes) = self.probes.lock() {
                    probes.process_exited(event.conn.pid);
                }
            }
            _ => {}
        }
        let outputs = match self.tracker.lock() {
            Ok(mut tracker) => {
                // Where a process runs is read once, at its first connect.
                if matches!(
                    event.kind,
                    EventKind::Connect { .. } | EventKind::Seeded { .. }
                ) && !tracker.knows_placement(event.conn.pid)
                {
                    let placement = procfs::placement(
                        Path::new("/proc"),
                        event.conn.pid,
                        self.pod_logs_dir.as_deref(),
                    );
                    tracker.set_placement(event.conn.pid, placement);
                    if let Some(name) = procfs::process_comm(Path::new("/proc"), event.conn.pid) {
                        tracker.set_process_name(event.conn.pid, name);
                    }
                }
                tracker.apply(event)
            }
            Err(_) => return,
        };
        self.handle_outputs(&outputs);
    }

    /// Counts, reports and acts on what the tracker concluded.
    fn handle_outputs(&self, outputs: &[Output]) {
        self.telemetry.record(outputs);
        if outputs
            .iter()
            .any(|o| matches!(o, Output::AcquireFinished { .. }))
        {
            let changes = match self.leaks.lock() {
                Ok(mut leaks) => leaks.observe_acquires(
                    outputs,
                    self.thresholds.slow_acquire_ns,
                    &mut |pid, tid| process_details(pid, tid, self.full_command_lines),
                    &|pid| procfs::process_comm(Path::new("/proc"), pid).unwrap_or_default(),
                    monotonic_ns(),
                    &self.clock,
                ),
                Err(_) => Vec::new(),
            };
            self.publish_leak_changes(&changes);
        }
        let slow = match self.reports.lock() {
            Ok(mut reports) => reports.observe(outputs, &self.clock),
            Err(_) => Vec::new(),
        };
        for report in slow {
            // One structured line per report, for log pipelines.
            if let Ok(line) = serde_json::to_string(&report) {
                log::warn!(target: "poolscope::slow_query", "{line}");
            }
            if let Some(otlp) = &self.otlp {
                let attributes = serde_json::to_value(&report)
                    .map(|v| otlp::json_attributes(&v))
                    .unwrap_or_default();
                let body = report.query.clone().unwrap_or_default();
                otlp.emit_event("poolscope.query.slow", Severity::Info, body, attributes);
            }
        }
        if let Some(otlp) = self.otlp.as_ref().filter(|o| o.spans_enabled()) {
            self.emit_spans(otlp, outputs);
        }
        for output in outputs {
            match output {
                Output::NotDatabase { id } => {
                    if let Ok(mut probes) = self.probes.lock() {
                        probes.stop_capture(id.pid, id.fd, id.generation);
                    }
                }
                Output::Detected { id, system } => {
                    let bytes = match system {
                        DbSystem::Redis => self.capture.redis,
                        DbSystem::Postgresql | DbSystem::Mysql => self.capture.sql,
                    };
                    if let Ok(mut probes) = self.probes.lock() {
                        probes.set_capture_bytes(id.pid, id.fd, id.generation, bytes);
                    }
                }
                _ => {}
            }
            // An exit closes fds without close(): drop them from the filter.
            // A close() already removed its entry in the kernel.
            if let Output::Closed { id, reason, .. } = output {
                if let Ok(mut probes) = self.probes.lock() {
                    if *reason == CloseReason::ProcessExit {
                        probes.forget(id.pid, id.fd);
                    } else {
                        probes.connection_closed(id.pid, id.fd);
                    }
                }
            }
        }
    }

    /// Logs each opened or resolved report as one JSON line, sends it as an
    /// OTLP log record, and counts it.
    fn publish_leak_changes(&self, changes: &[LeakChange]) {
        for change in changes {
            let (verb, report) = match change {
                LeakChange::Opened(r) => ("opened", r),
                LeakChange::Resolved(r) => ("resolved", r),
            };
            if let Ok(line) = serde_json::to_string(report) {
                log::warn!(target: "poolscope::leak", "{verb} {line}");
            }
            if let Some(otlp) = &self.otlp {
                let (name, severity) = match (change, report.kind) {
                    (_, LeakKind::SlowAcquire) => ("poolscope.acquire.slow", Severity::Warn),
                    (LeakChange::Resolved(_), _) => ("poolscope.leak.resolved", Severity::Info),
                    (LeakChange::Opened(_), LeakKind::SlowHolder) => {
                        ("poolscope.leak.opened", Severity::Info)
                    }
                    (LeakChange::Opened(_), _) => ("poolscope.leak.opened", Severity::Warn),
                };
                let attributes = serde_json::to_value(report)
                    .map(|v| otlp::json_attributes(&v))
                    .unwrap_or_default();
                otlp.emit_event(name, severity, report.evidence.clone(), attributes);
            }
        }
        self.telemetry.record_leak_changes(changes);
    }

    /// Sends round trips as client spans (when configured).
    fn emit_spans(&self, otlp: &OtlpExport, outputs: &[Output]) {
        for output in outputs {
            let Output::RoundTrip {
                id,
                remote,
                system,
                trip,
                ..
            } = output
            else {
                continue;
            };
            let mut attributes = vec![
                KeyValue::new("db.system.name", system.as_str()),
                KeyValue::new("server.address", remote.address()),
                KeyValue::new("process.pid", i64::from(id.pid)),
            ];
            if let Some(port) = remote.port() {
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
            if let Some(op) = &trip.operation {
                attributes.push(KeyValue::new("db.operation.name", op.clone()));
            }
            if let Some(query) = &trip.query {
                attributes.push(KeyValue::new("db.query.text", query.clone()));
            }
            if let Some(ns) = &trip.namespace {
                attributes.push(KeyValue::new("db.namespace", ns.clone()));
            }
            if let Some(error) = &trip.error {
                attributes.push(KeyValue::new("error.type", error.code.clone()));
                attributes.push(KeyValue::new("db.response.status_code", error.code.clone()));
            }
            let name = trip
                .operation
                .clone()
                .unwrap_or_else(|| system.as_str().to_string());
            otlp.emit_span(
                name,
                self.clock.to_wall(trip.start_ns),
                self.clock.to_wall(trip.end_ns),
                attributes,
                trip.error.is_some(),
            );
        }
    }

    /// Applies the leak rules to the tracker's connections now.
    fn evaluate_leaks(&self, now: u64) {
        let changes = {
            let Ok(tracker) = self.tracker.lock() else {
                return;
            };
            let findings = detect::evaluate(tracker.open_connections(), now, &self.thresholds);
            let lookup = |id| tracker.connection(id);
            match self.leaks.lock() {
                Ok(mut leaks) => leaks.update(
                    &findings,
                    &lookup,
                    &mut |pid, tid| process_details(pid, tid, self.full_command_lines),
                    now,
                    &self.clock,
                ),
                Err(_) => return,
            }
        };
        self.publish_leak_changes(&changes);
    }

    /// One adapter datagram, judged by the socket.
    fn apply_adapter(&self, outcome: Outcome, rejections: &mut RateLimitedLog) {
        match outcome {
            Outcome::Accepted(received) => {
                self.telemetry.record_adapter_message("accepted", "");
                let now = monotonic_ns();
                // The adapter's own CLOCK_MONOTONIC is the kernel's; trust it
                // when plausible, so that waits are measured where they happen.
                // Adapters may hold messages back briefly when our queue is
                // full, so an old timestamp is still the right one; only
                // the future and the implausibly old are replaced.
                let ts = received
                    .message
                    .mono_ns
                    .filter(|&t| {
                        t <= now.saturating_add(1_000_000_000)
                            && now.saturating_sub(t) < 600_000_000_000
                    })
                    .map(|t| t.min(now))
                    .unwrap_or(now);
                let outputs = match self.tracker.lock() {
                    Ok(mut tracker) => tracker.apply_adapter(received.pid, ts, received.message),
                    Err(_) => return,
                };
                self.handle_outputs(&outputs);
            }
            Outcome::Rejected { pid, error } => {
                self.telemetry
                    .record_adapter_message("rejected", error.reason());
                let who = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
                if let Some(line) = rejections.line(
                    std::time::Instant::now(),
                    &format!("adapter message from {who} dropped: {error}"),
                ) {
                    log::warn!("{line}");
                }
            }
            Outcome::Spoofed { pid, claimed } => {
                self.telemetry
                    .record_adapter_message("rejected", "spoofed_pid");
                if let Some(line) = rejections.line(
                    std::time::Instant::now(),
                    &format!("adapter message from pid {pid} claimed to be pid {claimed}: dropped"),
                ) {
                    log::warn!("{line}");
                }
            }
        }
    }
}

/// What /proc says about a process (and a thread) for a report.
fn process_details(pid: u32, tid: Option<u32>, full_command_line: bool) -> ProcessDetails {
    let proc_root = Path::new("/proc");
    ProcessDetails {
        cmdline: procfs::process_cmdline(proc_root, pid, full_command_line),
        container_id: procfs::container_id(proc_root, pid),
        thread_name: tid.and_then(|tid| procfs::thread_name(proc_root, pid, tid)),
    }
}

/// service.name, service.version and host.name for every signal.
fn agent_resource() -> opentelemetry_sdk::Resource {
    // In a DaemonSet the hostname is the pod's: the downward API's node
    // name (NODE_NAME) is the host's.
    let host = std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default();
    opentelemetry_sdk::Resource::builder()
        .with_service_name("poolscope")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("host.name", host),
        ])
        .build()
}

async fn serve_adapters(mut socket: AdapterSocket, pipeline: Arc<Pipeline>) -> anyhow::Result<()> {
    let mut rejections = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        match socket.recv().await {
            Ok(outcome) => pipeline.apply_adapter(outcome, &mut rejections),
            Err(e) => {
                log::warn!("adapter socket {}: {e}", socket.path().display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    ebpf::require_privileges()?;
    match ebpf::ensure_tracefs(config.kernel.mount_tracefs)? {
        TracefsStatus::AlreadyMounted => {}
        TracefsStatus::MountedByUs => {
            log::info!("tracefs was not mounted; mounted it at {}", ebpf::TRACEFS)
        }
    }
    let mut probes = KernelProbes::load(LoadOptions {
        ring_buffer_bytes: config.kernel.ring_buffer_bytes,
        // Until a connection's protocol is known, copy enough for either.
        capture_head_bytes: config
            .queries
            .capture_bytes
            .max(config.queries.redis_capture_bytes),
        data_path: config.kernel.data_path,
        probe_stats: config.kernel.probe_stats,
    })?;
    log::info!(
        "kernel probes attached: {} connection tracepoints and the {}{} (kprobes and fentry are not used)",
        agent_common::TRACEPOINTS.len(),
        probes.data_path().describe(),
        if config.kernel.probe_stats {
            ", with BPF run-time statistics"
        } else {
            ""
        }
    );
    let events = probes.take_events()?;
    let clock = Clock::new();
    let tracker = Arc::new(Mutex::new(Tracker::new(TrackerConfig {
        closed_retention_ns: config.tracking.closed_retention_seconds * 1_000_000_000,
        max_closed: config.tracking.max_closed,
        raw_queries: config.queries.raw_text,
        ..TrackerConfig::default()
    })));
    let kernel = Arc::new(Mutex::new(KernelCounters::default()));
    let reports = Arc::new(Mutex::new(Reports::new(
        config.queries.slow_threshold_ms.saturating_mul(1_000_000),
        config.queries.max_slow_kept,
    )));
    let leaks = Arc::new(Mutex::new(LeakReports::new(config.leaks.max_resolved_kept)));
    let resource = agent_resource();
    let otlp_settings = config.otlp.settings(&|name| std::env::var(name).ok())?;
    let (otlp_reader, otlp_export) = match &otlp_settings {
        Some(settings) => {
            let handle = tokio::runtime::Handle::current();
            let resource = resource.clone();
            let settings_for_thread = settings.clone();
            // The blocking HTTP client cannot be built on a runtime thread.
            let parts =
                std::thread::spawn(move || otlp::build(&settings_for_thread, &resource, handle))
                    .join()
                    .map_err(|_| anyhow::anyhow!("building the OTLP exporters panicked"))??;
            log::info!(
                "OTLP export to {} ({:?}): metrics every {:?}, events as log records{}",
                settings.endpoint,
                settings.protocol,
                settings.interval,
                if settings.query_spans {
                    ", query spans"
                } else {
                    ""
                }
            );
            (Some(parts.reader), Some(Arc::new(parts.export)))
        }
        None => (None, None),
    };
    let telemetry = Arc::new(Telemetry::new(Observed {
        resource,
        otlp_reader,
        export_counters: otlp_export.as_ref().map(|e| Arc::clone(&e.counters)),
        tracker: Arc::clone(&tracker),
        kernel: Arc::clone(&kernel),
        leaks: Arc::clone(&leaks),
        max_series: config.tracking.max_series,
    })?);
    let pipeline = Arc::new(Pipeline {
        tracker: Arc::clone(&tracker),
        telemetry: Arc::clone(&telemetry),
        probes: Arc::new(Mutex::new(probes)),
        reports: Arc::clone(&reports),
        leaks: Arc::clone(&leaks),
        otlp: otlp_export.clone(),
        pod_logs_dir: Some(config.tracking.pod_logs_dir.clone()).filter(|d| d.is_dir()),
        thresholds: config.leaks.thresholds(),
        clock,
        capture: CaptureBytes {
            sql: config.queries.capture_bytes,
            redis: config.queries.redis_capture_bytes,
        },
        unix_types: Mutex::default(),
        full_command_lines: config.tracking.full_command_lines,
    });

    // Seed after attaching, so nothing closes unseen between scan and attach.
    if config.tracking.seed_from_proc {
        seed_from_proc(&pipeline);
    }

    let reader = tokio::spawn(read_events(events, Arc::clone(&pipeline)));
    // Without the adapter socket the agent still sees every connection from
    // the kernel; say so rather than refuse to run.
    let adapters = if config.adapter.enabled {
        match AdapterSocket::bind(
            &config.adapter.socket,
            config.adapter.mode(),
            config.adapter.min_queue_datagrams,
        ) {
            Ok(socket) => {
                log::info!("pool adapters: listening on {}", socket.path().display());
                Some(tokio::spawn(serve_adapters(socket, Arc::clone(&pipeline))))
            }
            Err(e) => {
                log::warn!("pool adapters disabled: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let housekeeping = tokio::spawn(housekeeping(Arc::clone(&pipeline), kernel));
    let api_state = ApiState {
        tracker,
        reports,
        leaks,
        telemetry: Arc::clone(&telemetry),
        clock,
    };
    let server = tokio::spawn(api::serve(config.http.clone(), api_state));

    let result = tokio::select! {
        r = server => r.context("HTTP task failed")?,
        r = reader => r.context("event reader failed")?,
        _ = shutdown_signal() => {
            log::info!("shutting down");
            Ok(())
        }
    };
    housekeeping.abort();
    // Flush what we have, within bounded time: the meter's last export and
    // the queued events.
    telemetry.shutdown();
    if let Some(otlp) = &otlp_export {
        otlp.shutdown(Duration::from_secs(5));
    }
    if let Some(adapters) = adapters {
        adapters.abort();
    }
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn seed_from_proc(pipeline: &Pipeline) {
    let own_pid = std::process::id();
    let found = procfs::scan_connections(Path::new("/proc"), own_pid);
    let now = monotonic_ns();
    let count = found.len();
    for socket in found {
        let unix = matches!(&socket.peer, SeededPeer::Unix { path } if protocol::unix_path_may_be_database(path));
        let (local, remote, phase) = match socket.peer {
            SeededPeer::Tcp {
                local,
                remote,
                state,
            } => (
                Some(local),
                Endpoint::Inet(remote),
                match state {
                    SeededTcpState::SynSent => SeededPhase::Connecting,
                    SeededTcpState::Established => SeededPhase::Established,
                    SeededTcpState::CloseWait => SeededPhase::PeerClosed,
                },
            ),
            SeededPeer::Unix { path } => (None, Endpoint::Unix(path), SeededPhase::Established),
        };
        if let Ok(mut probes) = pipeline.probes.lock() {
            if let Err(e) = probes.track_seeded(socket.pid, socket.fd, unix) {
                log::debug!(
                    "cannot track seeded fd {} of pid {}: {e:#}",
                    socket.fd,
                    socket.pid
                );
            }
        }
        pipeline.apply(Event {
            ts_ns: now,
            conn: ConnId {
                pid: socket.pid,
                fd: socket.fd,
                generation: 0,
            },
            kind: EventKind::Seeded {
                comm: socket.comm,
                local,
                remote,
                phase,
            },
        });
    }
    log::info!("seeded {count} existing connections from /proc");
}

async fn read_events(
    mut events: AsyncFd<RingBuf<MapData>>,
    pipeline: Arc<Pipeline>,
) -> anyhow::Result<()> {
    let mut drain = tokio::time::interval(ebpf::DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Lifecycle events and a filling buffer wake us; quiet data events
        // wait for the next tick.
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain_ring(guard.get_inner_mut(), &pipeline);
                guard.clear_ready();
            }
            _ = drain.tick() => drain_ring(events.get_mut(), &pipeline),
        }
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, pipeline: &Pipeline) {
    while let Some(record) = ring.next() {
        match wire::decode(&record) {
            Ok(event) => pipeline.apply(event),
            Err(e) => {
                pipeline.telemetry.record_decode_error();
                log::debug!("{e}");
            }
        }
    }
}

/// Once a second: refresh kernel counters and forget expired history.
async fn housekeeping(pipeline: Arc<Pipeline>, kernel: Arc<Mutex<KernelCounters>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let counters = pipeline.probes.lock().ok().map(|mut p| {
            p.tick();
            p.counters()
        });
        match counters {
            Some(Ok(c)) => {
                if let Ok(mut k) = kernel.lock() {
                    *k = c;
                }
            }
            Some(Err(e)) => log::debug!("cannot read kernel counters: {e:#}"),
            None => {}
        }
        let now = monotonic_ns();
        if let Ok(mut tracker) = pipeline.tracker.lock() {
            tracker.expire(now);
        }
        pipeline.evaluate_leaks(now);
    }
}
