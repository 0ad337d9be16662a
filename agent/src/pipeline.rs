//! `poolscope run`: probes -> ring buffer -> decode -> tracker -> telemetry,
//! plus the HTTP API, until SIGTERM or SIGINT.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use opentelemetry::{logs::Severity, KeyValue};
use tokio::io::unix::AsyncFd;

use crate::{
    adapter::{
        server::{AdapterSocket, Outcome},
        stream::AdapterStreamSocket,
    },
    api::{self, ApiState},
    clock::{monotonic_ns, Clock},
    config::Config,
    detect::{
        self,
        sizing::{PoolUsage, SizingWindow},
        LeakKind, Thresholds,
    },
    ebpf::{self, KernelProbes, LoadOptions, TracefsStatus},
    health::{AdapterState, Health},
    identity, kernel_records,
    kubernetes::{self, ApiLookups, KubernetesConfig, PodKey, Workload, Workloads},
    lifecycle::{
        CloseReason, ConnId, Endpoint, Event, EventKind, Output, PoolView, SeededPhase, Tracker,
        TrackerConfig,
    },
    procfs::{self, SeededPeer, SeededTcpState},
    protocol::{self, DbSystem},
    ratelimit::RateLimitedLog,
    reports::{
        LeakChange, LeakReports, ProcessDetails, Reports, PUBLISH_IN_ALL, PUBLISH_PER_PROCESS,
    },
    state::{Broken, Shared, State},
    telemetry::{
        self,
        otlp::{self, OtlpExport},
        Observed, Telemetry,
    },
    tls_libraries::{HookScope, MappedLibrary, TlsLibraries},
    trends,
};
use telemetry_catalogue::{self as catalogue, attr};

struct Pipeline {
    state: Arc<Shared<State>>,
    /// The probes and what steering them needs; only the pipeline uses it.
    kernel: Shared<KernelSide>,
    telemetry: Arc<Telemetry>,
    otlp: Option<Arc<OtlpExport>>,
    /// The kubelet's pod log directory, to name pods (when it exists).
    pod_logs_dir: Option<std::path::PathBuf>,
    /// Pods' workloads from the Kubernetes API server (`[kubernetes] api`).
    workloads: Option<Workloads>,
    thresholds: Thresholds,
    /// `[sizing]`: how far back pools are sampled, and how often.
    sizing: SizingWindow,
    sizing_sample_ticks: u64,
    clock: Clock,
    capture: CaptureBytes,
    /// Command lines as they are, secrets included (off by default).
    full_command_lines: bool,
    /// `[kernel] tls_libraries`: hook the TLS libraries processes map.
    tls_libraries: bool,
    /// `process.command_args` on applications' resources (off by default).
    resource_command_args: bool,
    host_name: String,
    /// Kernel events that arrived while /proc was scanned and did not fit
    /// in what the reader holds meanwhile.
    dropped_while_seeding: AtomicU64,
}

/// The loaded kernel programs, the Unix socket types seen and the TLS
/// libraries hooked.
struct KernelSide {
    probes: KernelProbes,
    /// Socket type of each Unix path seen, so /proc is read once per path.
    unix_types: HashMap<String, u16>,
    tls: TlsLibraries,
}

impl KernelSide {
    /// `pid`, run by `uid`, maps `mapped`: sets the breakpoints of the
    /// libraries already held; the libraries to open (outside the lock)
    /// and hand to [`Self::hook_opened_tls_library`].
    fn tls_libraries_mapped(
        &mut self,
        pid: u32,
        uid: u32,
        mapped: &[MappedLibrary],
    ) -> Vec<MappedLibrary> {
        let to_open = self.tls.process_maps(pid, uid, mapped);
        self.attach_waiting_processes();
        to_open
    }

    /// Hooks `library` (shown by `pid` as `mapped`), unless it was hooked,
    /// refused or let go since it was asked for.
    fn hook_opened_tls_library(
        &mut self,
        mapped: &MappedLibrary,
        pid: u32,
        library: procfs::OpenedLibrary,
    ) {
        if !self.tls.is_pending(mapped.file) {
            return;
        }
        let points = library
            .points
            .iter()
            .map(|p| format!("{}@{:#x}", p.carries, p.offset))
            .collect::<Vec<_>>()
            .join(" ");
        let scope = self.tls.scope_for(library.emulated);
        let mut result = self.probes.keep_tls_library(mapped.file, library);
        if result.is_ok() && scope == HookScope::File {
            result = self.probes.attach_tls_library(mapped.file, None);
        }
        match result {
            Ok(()) => {
                self.tls.hook_result(mapped.file, Ok(scope));
                // Before the log line, which says the process that showed
                // the library has its breakpoints.
                self.attach_waiting_processes();
                log::info!(
                    "hooked TLS library {} (inode {}, first mapped by pid {pid}; breakpoints \
                     in {}, at {}): statements on its connections are read",
                    mapped.path,
                    mapped.file.inode,
                    if scope == HookScope::File {
                        "every process that maps it"
                    } else {
                        "each observed process that maps it"
                    },
                    points
                );
            }
            Err(e) => {
                self.probes.release_tls_library(mapped.file);
                let why = format!("{e:#}");
                log::warn!("cannot hook TLS library {}: {why}", mapped.path);
                self.tls.hook_result(mapped.file, Err(why));
            }
        }
    }

    /// Sets the breakpoints of the observed processes that map a held
    /// library and have none in it yet ([`HookScope::Process`]).
    fn attach_waiting_processes(&mut self) {
        for hook in self.tls.processes_to_attach() {
            let attached = self.probes.attach_tls_library(hook.file, Some(hook.pid));
            match &attached {
                Ok(()) => log::debug!(
                    "TLS library inode {}: breakpoints in pid {}",
                    hook.file.inode,
                    hook.pid
                ),
                // It exited meanwhile (ESRCH), most likely.
                Err(e) => log::debug!(
                    "TLS library inode {}: no breakpoints in pid {}: {e:#}",
                    hook.file.inode,
                    hook.pid
                ),
            }
            self.tls.process_attached(hook, attached.is_ok());
        }
    }

    /// A process exited: its own breakpoints go.
    fn tls_process_exited(&mut self, pid: u32, now_ns: u64) {
        for file in self.tls.process_exited(pid, now_ns) {
            self.probes.detach_tls_library(file, Some(pid));
        }
    }

    /// Lets go of the TLS libraries no observed process maps any more.
    fn unhook_unused_tls_libraries(&mut self, now_ns: u64) {
        for file in self.tls.take_unused(now_ns) {
            self.probes.release_tls_library(file);
            log::debug!("let go of TLS library inode {}", file.inode);
        }
    }
}

/// The reports an event made, and whether each gets a log line.
struct Reported {
    changes: Vec<(LeakChange, bool)>,
    slow: Vec<(crate::reports::SlowQuery, bool)>,
}

/// Head bytes copied per read/write, by protocol.
#[derive(Debug, Clone, Copy)]
struct CaptureBytes {
    sql: u32,
    redis: u32,
}

/// How long after its seeding the agent hooks the libssl files of the
/// processes already running.
const RUNNING_TLS_LIBRARIES_AFTER: Duration = Duration::from_secs(3);

/// How often a process with encrypted connections and no hooked TLS library
/// has its libraries looked at again.
const TLS_RESCAN_NS: u64 = 10_000_000_000;

/// Unix paths whose socket type we remember; past this the cache restarts.
const UNIX_TYPE_CACHE: usize = 1024;

impl Pipeline {
    fn health(&self) -> &Arc<Health> {
        self.state.health()
    }

    /// connect() on a Unix datagram socket (syslog, journald) is no
    /// connection: only stream sockets are tracked. The kernel cannot tell
    /// them apart cheaply, so we ask /proc once per path.
    fn is_unix_datagram(&self, event: &Event) -> Result<bool, Broken> {
        let EventKind::Connect {
            remote: Endpoint::Unix(path),
            ret: 0,
            ..
        } = &event.kind
        else {
            return Ok(false);
        };
        let kind = self.kernel.with(|k| match k.unix_types.get(path) {
            Some(kind) => Some(*kind),
            None => {
                let kind = procfs::unix_bound_type(Path::new("/proc"), event.conn.pid, path);
                if let Some(kind) = kind {
                    if k.unix_types.len() >= UNIX_TYPE_CACHE {
                        k.unix_types.clear();
                    }
                    k.unix_types.insert(path.clone(), kind);
                }
                kind
            }
        })?;
        Ok(kind.is_some_and(|k| k != procfs::UNIX_SOCK_STREAM))
    }

    /// Applies one event and does what its outputs ask of the kernel side.
    fn apply(&self, event: Event) -> Result<(), Broken> {
        if self.is_unix_datagram(&event)? {
            return self
                .kernel
                .with(|k| k.probes.forget(event.conn.pid, event.conn.fd));
        }
        // The socket data path looks only at processes that track a
        // connection: keep its per-process filter in step.
        match event.kind {
            EventKind::Connect {
                ref remote, ret, ..
            } => self.kernel.with(|k| {
                k.probes.process_tracks(event.conn.pid);
                if ret == 0
                    && matches!(remote, Endpoint::Unix(path) if protocol::unix_path_may_be_database(path))
                {
                    k.probes.unix_connection_opened(event.conn.pid);
                }
            })?,
            EventKind::ProcessExit { .. } => self.kernel.with(|k| {
                k.probes.process_exited(event.conn.pid);
                k.tls_process_exited(event.conn.pid, monotonic_ns());
            })?,
            _ => {}
        }
        if matches!(
            event.kind,
            EventKind::Connect { .. } | EventKind::Seeded { .. }
        ) {
            self.learn_process(event.conn.pid)?;
        }
        // One hold of the state per event: the tracker's conclusions and
        // the reports they make.
        let (outputs, reports) = self.state.with(|state| {
            let outputs = state.tracker.apply(event);
            let reports = self.report(state, &outputs);
            (outputs, reports)
        })?;
        self.handle_outputs(&outputs, reports)
    }

    /// Where a process runs, when it started and its name: read from /proc
    /// once, at its first connect or adapter message, outside the state's
    /// lock (the event reader must not wait on /proc).
    fn learn_process(&self, pid: u32) -> Result<(), Broken> {
        if self.state.with(|s| s.tracker.knows_placement(pid))? {
            return Ok(());
        }
        self.read_process(pid)
    }

    /// Reads what /proc says of `pid` and learns its resource (anew, when
    /// it was known: its pod's workload arrived since).
    fn read_process(&self, pid: u32) -> Result<(), Broken> {
        // First: with breakpoints per process, what it sends over TLS
        // before they are set is not read, and its first connection's
        // handshake is under way.
        self.look_for_tls_libraries(pid)?;
        let proc_root = Path::new("/proc");
        let placement = procfs::placement(proc_root, pid, self.pod_logs_dir.as_deref());
        let name = procfs::process_comm(proc_root, pid);
        let command_args = self
            .resource_command_args
            .then(|| procfs::process_args(proc_root, pid, self.full_command_lines))
            .flatten();
        let identity = identity::identify(&identity::ProcessFacts {
            pid,
            executable: name.clone().unwrap_or_default(),
            workload: self.pod_workload(&placement),
            placement: placement.clone(),
            environment: procfs::process_environment(
                proc_root,
                pid,
                identity::ENVIRONMENT_VARIABLES,
            ),
            command_args,
            host_name: self.host_name.clone(),
        });
        self.telemetry.learn_application(pid, identity);
        self.state.with(|s| {
            s.tracker.set_placement(pid, placement);
            if let Some(name) = name {
                s.tracker.set_process_name(pid, name);
            }
        })
    }

    /// Hooks the TLS libraries `pid` maps, read outside the kernel side's
    /// lock. Once at its first connect, and again (at most every
    /// `TLS_RESCAN_NS`) when one of its connections turns out encrypted
    /// with nothing hooked: a library may be loaded late (Python imports).
    fn look_for_tls_libraries(&self, pid: u32) -> Result<(), Broken> {
        if !self.tls_libraries || pid == std::process::id() {
            return Ok(());
        }
        let Some(found) = procfs::tls_libraries(Path::new("/proc"), pid) else {
            return Ok(());
        };
        let mut mapped = found.libraries;
        if let Some(exe) = found.executable {
            let verdict = self.kernel.with(|k| k.tls.executable_verdict(exe.file))?;
            let exports = match verdict {
                Some(exports) => exports,
                None => {
                    let path = format!("/proc/{pid}/root{}", exe.path);
                    let exports = procfs::exports_tls_functions(Path::new(&path));
                    self.kernel
                        .with(|k| k.tls.record_executable(exe.file, exports))?;
                    exports
                }
            };
            if exports {
                mapped.push(exe);
            }
        }
        self.hook_tls_libraries(pid, found.uid, &mapped)
    }

    /// Hooks what `pid` maps of TLS libraries and is not hooked yet. Each
    /// file is opened, and its symbols read, outside the kernel side's
    /// lock, which only attaching holds; it is held open meanwhile, so the
    /// process that showed it may exit.
    fn hook_tls_libraries(
        &self,
        pid: u32,
        uid: u32,
        mapped: &[MappedLibrary],
    ) -> Result<(), Broken> {
        let to_hook = self
            .kernel
            .with(|k| k.tls_libraries_mapped(pid, uid, mapped))?;
        for lib in to_hook {
            // Through the process's root: the library of a container.
            let path = std::path::PathBuf::from(format!("/proc/{pid}/root{}", lib.path));
            match procfs::open_tls_library(&path, crate::tls_libraries::TLS_SYMBOLS) {
                Ok(opened) => self
                    .kernel
                    .with(|k| k.hook_opened_tls_library(&lib, pid, opened))?,
                Err(procfs::OpenLibraryError::Gone(why)) => {
                    log::debug!(
                        "TLS library {} of pid {pid} not opened ({why}): asked for again \
                         when a process shows it",
                        lib.path
                    );
                    self.kernel.with(|k| k.tls.hook_abandoned(lib.file))?;
                }
                Err(e) => {
                    log::warn!("cannot hook TLS library {}: {e}", lib.path);
                    self.kernel
                        .with(|k| k.tls.hook_result(lib.file, Err(e.to_string())))?;
                }
            }
        }
        Ok(())
    }

    /// The workload of the pod a process runs in, when the API server has
    /// answered for it; else it is asked for, and the answer comes to
    /// [`Self::apply_workloads`].
    fn pod_workload(&self, placement: &procfs::Placement) -> Option<Workload> {
        let key = pod_key(placement)?;
        self.workloads.as_ref()?.lookup(&key.namespace, &key.name)
    }

    /// Makes anew the resources of the processes whose pod's workload
    /// arrived since the last call, and (`forget`) forgets the workloads of
    /// pods no process runs in any more.
    fn apply_workloads(&self, workloads: &Workloads, forget: bool) -> Result<(), Broken> {
        let answered: std::collections::HashSet<PodKey> =
            workloads.take_answered().into_iter().collect();
        if answered.is_empty() && !forget {
            return Ok(());
        }
        let (pids, seen) = self.state.with(|s| {
            let mut pids = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for pid in s.tracker.known_processes() {
                let Some(key) = s.tracker.placement(pid).and_then(pod_key) else {
                    continue;
                };
                if answered.contains(&key) {
                    pids.push(pid);
                }
                if forget {
                    seen.insert(key);
                }
            }
            (pids, seen)
        })?;
        if forget {
            workloads.retain_seen(&seen);
        }
        for pid in pids {
            self.read_process(pid)?;
        }
        Ok(())
    }

    /// The leak and slow-query reports the tracker's outputs make, each
    /// with whether it gets a log line (see [`Self::within_budget`]).
    fn report(&self, state: &mut State, outputs: &[Output]) -> Reported {
        let changes = if outputs.iter().any(|o| {
            matches!(
                o,
                Output::AcquireFinished { .. } | Output::CheckoutsFolded { .. }
            )
        }) {
            state.leaks.observe_acquires(
                outputs,
                self.thresholds.slow_acquire_ns,
                &mut |pid, tid| process_details(pid, tid, self.full_command_lines),
                &|pid| procfs::process_comm(Path::new("/proc"), pid).unwrap_or_default(),
                monotonic_ns(),
                &self.clock,
            )
        } else {
            Vec::new()
        };
        self.telemetry.record_leak_changes(&changes);
        let changes = self.within_budget(state, changes, LeakChange::pid);
        let slow = state.reports.observe(outputs, &self.clock);
        let slow = self.within_budget(state, slow, |r| r.pid);
        Reported { changes, slow }
    }

    /// Counts, publishes and acts on what the tracker concluded.
    fn handle_outputs(&self, outputs: &[Output], reported: Reported) -> Result<(), Broken> {
        self.telemetry.record(outputs);
        let Reported { changes, slow } = reported;
        self.publish_leak_changes(&changes);
        for (report, log_it) in slow {
            // One structured line per report, for log pipelines.
            if log_it {
                if let Ok(line) = serde_json::to_string(&report) {
                    log::warn!(target: "poolscope::slow_query", "{line}");
                }
            }
            if let Some(otlp) = &self.otlp {
                let attributes = telemetry::records::record_attributes(&report);
                let body = report.query.clone().unwrap_or_default();
                otlp.emit_event(
                    catalogue::EVENT_QUERY_SLOW.name,
                    Severity::Info,
                    body,
                    attributes,
                );
            }
        }
        if let Some(otlp) = self.otlp.as_ref().filter(|o| o.spans_enabled()) {
            self.emit_spans(otlp, outputs);
        }
        for output in outputs {
            if let Output::Encrypted { id } = output {
                self.encrypted_without_plaintext(id.pid)?;
            }
        }
        let steers_kernel = outputs.iter().any(|o| {
            matches!(
                o,
                Output::NotDatabase { .. } | Output::Detected { .. } | Output::Closed { .. }
            )
        });
        if !steers_kernel {
            return Ok(());
        }
        self.kernel.with(|k| {
            for output in outputs {
                match output {
                    Output::NotDatabase { id } => {
                        k.probes.stop_capture(id.pid, id.fd, id.generation);
                    }
                    Output::Detected { id, system } => {
                        let bytes = match system {
                            DbSystem::Redis => self.capture.redis,
                            DbSystem::Postgresql | DbSystem::Mysql => self.capture.sql,
                        };
                        k.probes
                            .set_capture_bytes(id.pid, id.fd, id.generation, bytes);
                    }
                    // An exit closes fds without close(): drop them from the
                    // filter. A close() already removed its entry in the kernel.
                    Output::Closed { id, reason, .. } if *reason == CloseReason::ProcessExit => {
                        k.probes.forget(id.pid, id.fd);
                    }
                    _ => {}
                }
            }
        })
    }

    /// Hooks the libssl files that running processes map, so that a
    /// process started later with one of them is read from its first call:
    /// those whose breakpoints go to every process that maps them (all of
    /// them with `tls_hook_scope = "file"`; with "auto" those whose probes
    /// the kernel emulates, the others waiting for an observed process).
    fn hook_running_tls_libraries(&self) {
        let Ok(every_file) = self
            .kernel
            .with(|k| k.tls.scope_for(false) == HookScope::File)
        else {
            return;
        };
        let mut emulated: HashMap<crate::tls_libraries::FileId, bool> = HashMap::new();
        for (pid, found) in procfs::tls_libraries_of_all(Path::new("/proc")) {
            if pid == std::process::id() {
                continue;
            }
            let wanted: Vec<MappedLibrary> = found
                .libraries
                .into_iter()
                .filter(|lib| {
                    every_file
                        || *emulated.entry(lib.file).or_insert_with(|| {
                            let path = format!("/proc/{pid}/root{}", lib.path);
                            procfs::open_tls_library(
                                Path::new(&path),
                                crate::tls_libraries::TLS_SYMBOLS,
                            )
                            .is_ok_and(|l| l.emulated)
                        })
                })
                .collect();
            if self.hook_tls_libraries(pid, found.uid, &wanted).is_err() {
                // The kernel side is broken; the agent is stopping.
                return;
            }
        }
    }

    /// A connection of `pid` is encrypted and its plaintext not read: look
    /// at the process's libraries again, unless one is hooked already (its
    /// next call gives the plaintext) or it was looked at lately.
    fn encrypted_without_plaintext(&self, pid: u32) -> Result<(), Broken> {
        let now = monotonic_ns();
        let look = self
            .kernel
            .with(|k| !k.tls.hooks_process(pid) && k.tls.may_look_again(pid, now, TLS_RESCAN_NS))?;
        if look {
            self.look_for_tls_libraries(pid)?;
        }
        Ok(())
    }

    /// Which of `reports` get a log line under the per-process and global
    /// budgets (true); the rest are counted, and summed up in the log once
    /// per window. OTLP events go out for all of them: the bounded queue,
    /// which favours leak reports, is their limit.
    fn within_budget<T>(
        &self,
        state: &mut State,
        reports: Vec<T>,
        pid: impl Fn(&T) -> u32,
    ) -> Vec<(T, bool)> {
        if reports.is_empty() {
            return Vec::new();
        }
        let now = monotonic_ns();
        let mut held_back = Vec::new();
        let mut admitted = Vec::with_capacity(reports.len());
        for report in reports {
            let log_it = match state.publish.admit(pid(&report), now, &mut held_back) {
                Ok(()) => true,
                Err(why) => {
                    self.telemetry.record_unpublished(why);
                    false
                }
            };
            admitted.push((report, log_it));
        }
        for (pid, count) in held_back {
            log::warn!(
                "{count} report lines about pid {pid} were held back in the last minute \
                 (at most {PUBLISH_PER_PROCESS} per process and {PUBLISH_IN_ALL} in all per minute); \
                 the reports are in /api/v1/leaks and /api/v1/queries/slow"
            );
        }
        admitted
    }

    /// Logs each opened or resolved report as one JSON line (within the
    /// budget) and sends it as an OTLP log record (they were counted when
    /// they changed).
    fn publish_leak_changes(&self, changes: &[(LeakChange, bool)]) {
        for (change, log_it) in changes {
            let (verb, report) = match change {
                LeakChange::Opened(r) => ("opened", r),
                LeakChange::Resolved(r) => ("resolved", r),
            };
            if *log_it {
                if let Ok(line) = serde_json::to_string(report) {
                    log::warn!(target: "poolscope::leak", "{verb} {line}");
                }
            }
            if let Some(otlp) = &self.otlp {
                let (name, severity) = match (change, report.kind) {
                    (_, LeakKind::SlowAcquire) => {
                        (catalogue::EVENT_ACQUIRE_SLOW.name, Severity::Warn)
                    }
                    (LeakChange::Resolved(_), _) => {
                        (catalogue::EVENT_LEAK_RESOLVED.name, Severity::Info)
                    }
                    (LeakChange::Opened(_), LeakKind::SlowHolder) => {
                        (catalogue::EVENT_LEAK_OPENED.name, Severity::Info)
                    }
                    (LeakChange::Opened(_), _) => {
                        (catalogue::EVENT_LEAK_OPENED.name, Severity::Warn)
                    }
                };
                let attributes = telemetry::records::record_attributes(report);
                otlp.emit_event(name, severity, report.evidence.clone(), attributes);
            }
        }
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
            // Declared in the catalogue's QUERY_SPAN.
            let mut attributes = telemetry::database_server_attributes(*system, remote);
            attributes.push(KeyValue::new(attr::PROCESS_PID, i64::from(id.pid)));
            if let Some(op) = &trip.operation {
                attributes.push(KeyValue::new(attr::DB_OPERATION_NAME, op.clone()));
            }
            if let Some(query) = trip.query_text() {
                attributes.push(KeyValue::new(attr::DB_QUERY_TEXT, query));
            }
            if let Some(ns) = &trip.namespace {
                attributes.push(KeyValue::new(attr::DB_NAMESPACE, ns.clone()));
            }
            if let Some(error) = &trip.error {
                attributes.push(KeyValue::new(attr::ERROR_TYPE, error.code.clone()));
                attributes.push(KeyValue::new(
                    attr::DB_RESPONSE_STATUS_CODE,
                    error.code.clone(),
                ));
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

    /// A point of the live page's trends for each adapter pool in `views`:
    /// in use, max, waiting, and the P99 wait of about the last minute.
    fn sample_trends(&self, now: u64, views: Vec<PoolView>) -> Result<(), Broken> {
        let samples: Vec<((u32, String), trends::Sample)> = self.telemetry.percentiles(|l| {
            views
                .into_iter()
                .filter(|v| v.from_adapter)
                .map(|v| {
                    let sample = trends::Sample {
                        used: v.used,
                        max: v.max,
                        pending: v.pending,
                        wait_p99_seconds: l.pool_recent_wait_p99(v.pid, &v.name, now),
                    };
                    ((v.pid, v.name), sample)
                })
                .collect()
        });
        let unix_seconds = self
            .clock
            .to_wall(now)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.state.with(|s| s.trends.sample(unix_seconds, samples))
    }

    /// Applies the leak rules to the tracker's connections now.
    fn evaluate_leaks(&self, now: u64) -> Result<(), Broken> {
        let changes = self.state.with(|state| {
            let tracker = &state.tracker;
            let connections = tracker
                .open_connections()
                .chain(tracker.adapter_only_connections());
            let findings = detect::evaluate(connections, now, &self.thresholds);
            let lookup = |id| tracker.connection(id);
            let holder_stack = |conn: &_| tracker.holder_stack(conn).cloned();
            let changes = state.leaks.update(
                &findings,
                &lookup,
                &holder_stack,
                &mut |pid, tid| process_details(pid, tid, self.full_command_lines),
                now,
                &self.clock,
            );
            self.telemetry.record_leak_changes(&changes);
            self.within_budget(state, changes, LeakChange::pid)
        })?;
        self.publish_leak_changes(&changes);
        Ok(())
    }

    /// One adapter datagram, judged by the socket.
    /// Applies one adapter message (or counts its refusal). Returns whether
    /// it was accepted, for the caller to count: a stream's lines are
    /// counted once per batch, not once each.
    fn apply_adapter(
        &self,
        outcome: Outcome,
        rejections: &mut RateLimitedLog,
    ) -> Result<bool, Broken> {
        match outcome {
            Outcome::Accepted(received) => {
                self.learn_process(received.pid)?;
                let now = monotonic_ns();
                let (outputs, reports) = self.state.with(|state| {
                    let tracker = &mut state.tracker;
                    let ts = tracker.adapter_time(received.pid, received.message.mono_ns, now);
                    let outputs = tracker.apply_adapter(received.pid, ts, received.message);
                    let reports = self.report(state, &outputs);
                    (outputs, reports)
                })?;
                // A refusal by a bound is counted as a rejection instead.
                let accepted = !outputs
                    .iter()
                    .any(|o| matches!(o, Output::AdapterRefused { .. }));
                self.handle_outputs(&outputs, reports)?;
                return Ok(accepted);
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
            Outcome::StreamLimit { pid, uid } => {
                self.telemetry
                    .record_adapter_message("rejected", "stream_limit");
                let who = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
                if let Some(line) = rejections.line(
                    std::time::Instant::now(),
                    &format!("adapter stream from {who} (uid {uid}) closed: too many open streams"),
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
        Ok(false)
    }
}

/// The pod a process runs in, when the kubelet's directories named it.
fn pod_key(placement: &procfs::Placement) -> Option<PodKey> {
    Some(PodKey {
        namespace: placement.pod_namespace.clone()?,
        name: placement.pod_name.clone()?,
    })
}

/// The lookups of pods' workloads, when `[kubernetes] api` allows and the
/// agent runs in a pod with a service account.
fn start_workload_lookups(config: &KubernetesConfig) -> Option<Workloads> {
    if config.api == ApiLookups::Off {
        return None;
    }
    let server = match kubernetes::in_cluster(
        &|name| std::env::var(name).ok(),
        Path::new(kubernetes::client::SERVICE_ACCOUNT_DIR),
    ) {
        Ok(server) => server,
        Err(kubernetes::client::NotInCluster::NoServiceVariables) => return None,
        Err(reason) => {
            log::info!(
                "workload names from the Kubernetes API: off, {reason}; they come from the \
                 processes' own OTEL_RESOURCE_ATTRIBUTES"
            );
            return None;
        }
    };
    match Workloads::start(server) {
        Ok(workloads) => Some(workloads),
        Err(e) => {
            log::warn!("workload names from the Kubernetes API: off, {e:#}");
            None
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

/// The host's name. In a DaemonSet the hostname is the pod's: the
/// downward API's node name (NODE_NAME) is the host's.
fn host_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// The agent's own resource: service.name (poolscope, unless the agent's
/// OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name it), service.version,
/// host.name, and what OTEL_RESOURCE_ATTRIBUTES adds (the SDK's detectors).
fn agent_resource() -> opentelemetry_sdk::Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|n| !n.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| {
            identity::parse_resource_attributes(&a)
                .iter()
                .any(|(k, _)| k == "service.name")
        });
    let mut builder = opentelemetry_sdk::Resource::builder();
    if !named {
        builder = builder.with_service_name("poolscope");
    }
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("host.name", host_name()),
        ])
        .build()
}

async fn serve_adapters(mut socket: AdapterSocket, pipeline: Arc<Pipeline>) -> anyhow::Result<()> {
    let mut rejections = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        match socket.recv().await {
            Ok(outcome) => {
                if pipeline.apply_adapter(outcome, &mut rejections)? {
                    pipeline.telemetry.record_adapter_messages_accepted(1);
                }
            }
            Err(e) => {
                log::warn!("adapter socket {}: {e}", socket.path().display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Stream lines applied per wake-up of the applying task at most.
const ADAPTER_BATCH: usize = 256;

/// Applies what the streams' lines became, in the order each stream sent
/// them; the channel's room is what slows a stream that writes faster than
/// the agent applies.
async fn serve_adapter_streams(
    socket: AdapterStreamSocket,
    pipeline: Arc<Pipeline>,
) -> anyhow::Result<()> {
    let (outcomes, mut received) = tokio::sync::mpsc::channel(1024);
    // Refusals at accept are counted (and logged, within the budget) on
    // the accepting task, not queued behind the streams' lines.
    let refusals = Arc::new(Mutex::new(RateLimitedLog::new(Duration::from_secs(10))));
    let at_accept = Arc::clone(&pipeline);
    let accepting = tokio::spawn(socket.serve(outcomes, move |outcome| {
        let mut log = refusals.lock().unwrap_or_else(PoisonError::into_inner);
        // A refusal touches no state, so it cannot break the pipeline.
        let _ = at_accept.apply_adapter(outcome, &mut log);
    }));
    let mut rejections = RateLimitedLog::new(Duration::from_secs(10));
    // Taken many at a time: under load this task wakes once per batch of
    // lines, not once per line.
    let mut batch = Vec::with_capacity(ADAPTER_BATCH);
    while received.recv_many(&mut batch, ADAPTER_BATCH).await > 0 {
        let mut accepted = 0;
        for outcome in batch.drain(..) {
            accepted += u64::from(pipeline.apply_adapter(outcome, &mut rejections)?);
        }
        pipeline
            .telemetry
            .record_adapter_messages_accepted(accepted);
    }
    accepting.abort();
    Err(anyhow::anyhow!(
        "adapter stream socket: its accepting task ended"
    ))
}

/// From SIGTERM to exit, whatever the collector does: the exporters' last
/// flush shares this one deadline, and what is left after it is dropped.
pub const SHUTDOWN_FLUSH_DEADLINE: Duration = Duration::from_secs(3);

pub async fn run(config: Config) -> anyhow::Result<()> {
    keep_large_buffers_mapped();
    ebpf::require_privileges()?;
    match ebpf::ensure_tracefs(config.kernel.mount_tracefs)? {
        TracefsStatus::AlreadyMounted => {}
        TracefsStatus::MountedByUs => {
            log::info!("tracefs was not mounted; mounted it at {}", ebpf::TRACEFS)
        }
    }
    let health = Arc::new(Health::default());
    health.adapter(if config.adapter.enabled {
        AdapterState::Pending
    } else {
        AdapterState::Disabled
    });
    let mut probes = KernelProbes::load(LoadOptions {
        ring_buffer_bytes: config.kernel.ring_buffer_bytes.get(),
        // Until a connection's protocol is known, copy enough for either.
        capture_head_bytes: config
            .queries
            .capture_bytes
            .get()
            .max(config.queries.redis_capture_bytes.get()),
        data_path: config.kernel.data_path,
        probe_stats: config.kernel.probe_stats,
        unix_sockets: config.kernel.unix_sockets,
        tls_libraries: config.kernel.tls_libraries,
    })?;
    match probes.tls_programs() {
        Ok(()) => log::info!(
            "TLS libraries: OpenSSL's libssl is hooked (uprobes) where an observed process maps it, \
             so that statements on TLS connections are read"
        ),
        Err(why) => log::warn!(
            "TLS libraries are not hooked ({why}): TLS connections are counted and timed, \
             their statements not read"
        ),
    }
    log::info!(
        "kernel probes attached: {} connection tracepoints{} and the {}{} (kprobes and fentry are not used)",
        ebpf::connection_tracepoints(config.kernel.unix_sockets).count(),
        if config.kernel.unix_sockets {
            " (with Unix-socket connects and closes)"
        } else {
            " (TCP only: kernel.unix_sockets is off)"
        },
        probes.data_path().describe(),
        if config.kernel.probe_stats {
            ", with BPF run-time statistics"
        } else {
            ""
        }
    );
    health.probes_attached();
    let events = probes.take_events()?;
    let clock = Clock::new();
    let tracker = Tracker::new(TrackerConfig {
        closed_retention_ns: config.tracking.closed_retention_seconds.as_nanos(),
        max_closed: config.tracking.max_closed,
        raw_queries: config.queries.raw_text,
        ..TrackerConfig::default()
    });
    let reports = Reports::new(
        config.queries.slow_threshold_ms.as_nanos(),
        config.queries.max_slow_kept,
    );
    let leaks = LeakReports::new(config.leaks.max_resolved_kept);
    let state = Arc::new(Shared::new(
        State::new(tracker, reports, leaks),
        "agent state",
        Arc::clone(&health),
    ));
    let resource = agent_resource();
    let app_resources = Arc::new(telemetry::apps::ApplicationResources::default());
    let otlp_settings = config.otlp.settings(&|name| std::env::var(name).ok())?;
    let (otlp_reader, otlp_export) = match &otlp_settings {
        Some(settings) => {
            let handle = tokio::runtime::Handle::current();
            let resource = resource.clone();
            let settings_for_thread = settings.clone();
            let resources = Arc::clone(&app_resources);
            // The blocking HTTP client cannot be built on a runtime thread.
            let parts = std::thread::spawn(move || {
                otlp::build(&settings_for_thread, &resource, resources, handle)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("building the OTLP exporters panicked"))??;
            // Per signal: where, from which variable or key, how (header
            // names only, never their values).
            log::info!("OTLP export: {}", settings.summary());
            (Some(parts.reader), Some(Arc::new(parts.export)))
        }
        None => (None, None),
    };
    let telemetry = Arc::new(Telemetry::new(Observed {
        resource,
        otlp_reader,
        export_counters: otlp_export.as_ref().map(|e| Arc::clone(&e.counters)),
        state: Arc::clone(&state),
        max_series: config.tracking.max_series.get(),
        max_applications: config.tracking.max_applications.get(),
        host_name: host_name(),
        attributes: config.metrics.clone(),
        resources: app_resources,
        exited_series_grace: telemetry::apps::EXITED_SERIES_GRACE,
        slow_threshold_ns: config.queries.slow_threshold_ms.as_nanos(),
    })?);
    let pipeline = Arc::new(Pipeline {
        state: Arc::clone(&state),
        kernel: Shared::new(
            KernelSide {
                probes,
                unix_types: HashMap::new(),
                tls: TlsLibraries::new(config.kernel.tls_hook_scope),
            },
            "kernel probe bookkeeping",
            Arc::clone(&health),
        ),
        telemetry: Arc::clone(&telemetry),
        otlp: otlp_export.clone(),
        pod_logs_dir: Some(config.tracking.pod_logs_dir.clone()).filter(|d| d.is_dir()),
        workloads: start_workload_lookups(&config.kubernetes),
        thresholds: config.leaks.thresholds(),
        sizing: config.sizing.window(),
        sizing_sample_ticks: config.sizing.sample_seconds.get().as_secs().max(1),
        clock,
        capture: CaptureBytes {
            sql: config.queries.capture_bytes.get(),
            redis: config.queries.redis_capture_bytes.get(),
        },
        full_command_lines: config.tracking.full_command_lines,
        tls_libraries: config.kernel.tls_libraries,
        resource_command_args: config.tracking.resource_command_args,
        host_name: host_name(),
        dropped_while_seeding: AtomicU64::new(0),
    });

    // Every task that must run for the agent to be whole; the first one to
    // end, however it ends, stops the agent with its reason.
    let mut tasks = Tasks::default();
    // HTTP first, so that /healthz says what is still starting.
    let api_state = ApiState {
        state: Arc::clone(&state),
        health: Arc::clone(&health),
        telemetry: Arc::clone(&telemetry),
        clock,
        pool_health: config.pool_health.thresholds(),
        sizing: config.sizing.window(),
        live: api::live::LiveFeed::new(),
    };
    let streams = if config.adapter.enabled && !config.adapter.stream_socket.as_os_str().is_empty()
    {
        config.adapter.max_streams.get()
    } else {
        0
    };
    api::listener::raise_fd_limit(config.http.max_connections.get(), streams);
    tasks.spawn("HTTP server", api::serve(config.http.clone(), api_state));
    tasks.spawn(
        "event reader",
        read_events(
            events,
            Arc::clone(&pipeline),
            Seeding {
                from_proc: config.tracking.seed_from_proc,
                unix_sockets: config.kernel.unix_sockets,
                tls_libraries: config.kernel.tls_libraries
                    && config.kernel.tls_hook_scope != HookScope::Process,
            },
        ),
    );
    // Without the adapter socket the agent still sees every connection from
    // the kernel; say so (log and readiness) rather than refuse to run.
    if config.adapter.enabled {
        match AdapterSocket::bind(
            &config.adapter.socket,
            config.adapter.mode(),
            config.adapter.min_queue_datagrams,
            config.adapter.senders(),
        ) {
            Ok(socket) => {
                log::info!("pool adapters: listening on {}", socket.path().display());
                health.adapter(AdapterState::Bound);
                tasks.spawn(
                    "adapter socket server",
                    serve_adapters(socket, Arc::clone(&pipeline)),
                );
            }
            Err(e) => {
                log::warn!("pool adapters disabled: {e:#}");
                health.adapter(AdapterState::Unavailable);
            }
        }
    }
    if config.adapter.enabled && !config.adapter.stream_socket.as_os_str().is_empty() {
        match AdapterStreamSocket::bind(
            &config.adapter.stream_socket,
            config.adapter.mode(),
            config.adapter.senders(),
            config.adapter.stream_limits(),
        ) {
            Ok(socket) => {
                log::info!(
                    "pool adapters: listening for streams on {}",
                    socket.path().display()
                );
                tasks.spawn(
                    "adapter stream server",
                    serve_adapter_streams(socket, Arc::clone(&pipeline)),
                );
            }
            Err(e) => log::warn!("pool adapter streams disabled: {e:#}"),
        }
    }
    tasks.spawn("housekeeping", housekeeping(Arc::clone(&pipeline)));

    let failure = tokio::select! {
        failure = tasks.first_to_end() => Some(failure),
        _ = shutdown_signal() => {
            log::info!("shutting down");
            None
        }
    };
    if let Some(reason) = &failure {
        health.fail(reason.clone());
    }
    tasks.abort_all();
    flush_exporters(telemetry, otlp_export, SHUTDOWN_FLUSH_DEADLINE);
    match failure {
        Some(reason) => Err(anyhow::anyhow!("{reason}")),
        None => Ok(()),
    }
}

/// The agent's long-running tasks, by name.
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end and says why it did. None of them
    /// ends on its own while the agent is well, so any end is a failure.
    async fn first_to_end(&mut self) -> String {
        let Some(done) = self.set.join_next_with_id().await else {
            return "no task was running".to_string();
        };
        let (id, outcome) = match done {
            Ok((id, result)) => (id, result.err().map(|e| format!("{e:#}"))),
            Err(e) => {
                let name = self.name(e.id());
                let why = if e.is_panic() {
                    let payload = e.into_panic();
                    let text = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_string());
                    format!("panicked: {text}")
                } else {
                    "was cancelled".to_string()
                };
                return format!("the {name} {why}");
            }
        };
        let name = self.name(id);
        match outcome {
            Some(error) => format!("the {name} failed: {error}"),
            None => format!("the {name} stopped"),
        }
    }

    fn name(&self, id: tokio::task::Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("task")
    }

    fn abort_all(&mut self) {
        self.set.abort_all();
    }
}

/// Sends what the exporters hold, for at most `deadline` in all: a hung
/// collector must not hold the agent past its supervisor's patience.
fn flush_exporters(telemetry: Arc<Telemetry>, otlp: Option<Arc<OtlpExport>>, deadline: Duration) {
    let started = std::time::Instant::now();
    let (done, finished) = std::sync::mpsc::channel();
    let flush = std::thread::Builder::new()
        .name("poolscope-flush".into())
        .spawn(move || {
            telemetry.shutdown();
            if let Some(otlp) = otlp {
                otlp.shutdown(deadline.saturating_sub(started.elapsed()));
            }
            let _ = done.send(());
        });
    if let Err(e) = flush {
        log::warn!("cannot start the final export: {e}");
        return;
    }
    if finished.recv_timeout(deadline).is_err() {
        log::warn!(
            "the exporters did not finish within {} s (collector unreachable or slow): exiting without them",
            deadline.as_secs()
        );
    }
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

/// Makes the connections found in /proc known, as if each had just been
/// opened.
fn seed(pipeline: &Pipeline, found: Vec<procfs::SeededSocket>) -> Result<(), Broken> {
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
        pipeline.kernel.with(|k| {
            if let Err(e) = k.probes.track_seeded(socket.pid, socket.fd, unix) {
                log::debug!(
                    "cannot track seeded fd {} of pid {}: {e:#}",
                    socket.fd,
                    socket.pid
                );
            }
        })?;
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
        })?;
    }
    log::info!("seeded {count} existing connections from /proc");
    Ok(())
}

/// Ring-buffer records held in memory while /proc is scanned, at most this
/// many bytes; past it they are counted as dropped events.
const HELD_WHILE_SEEDING_BYTES: usize = 32 << 20;

/// Records read from the ring while seeding, applied once the seeded
/// connections are known (the order the kernel produced them in stays).
#[derive(Default)]
struct Held {
    records: Vec<Box<[u8]>>,
    bytes: usize,
    dropped: u64,
}

impl Held {
    fn take_from(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(record) = ring.next() {
            if self.bytes + record.len() > HELD_WHILE_SEEDING_BYTES {
                self.dropped += 1;
                continue;
            }
            self.bytes += record.len();
            self.records.push(Box::from(&*record));
        }
    }
}

/// What the event reader seeds from /proc before reading events.
struct Seeding {
    from_proc: bool,
    /// Without the Unix-socket tracepoints nothing would see such a
    /// connection close, so none is seeded.
    unix_sockets: bool,
    /// `[kernel] tls_libraries` with `tls_hook_scope` "file" or "auto":
    /// once seeded, hook the libssl files that running processes map
    /// (with "process", the seeded processes' own libraries are hooked as
    /// they are learnt).
    tls_libraries: bool,
}

/// Seeds from /proc (when asked) while already draining the ring, so that a
/// slow scan on a busy host cannot overflow it; then reads events for good.
async fn read_events(
    mut events: AsyncFd<RingBuf<MapData>>,
    pipeline: Arc<Pipeline>,
    seeding: Seeding,
) -> anyhow::Result<()> {
    let mut drain = tokio::time::interval(ebpf::DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if seeding.from_proc {
        let own_pid = std::process::id();
        let scan = tokio::task::spawn_blocking(move || {
            procfs::scan_connections(Path::new("/proc"), own_pid)
        });
        tokio::pin!(scan);
        let mut held = Held::default();
        let mut found = loop {
            tokio::select! {
                found = &mut scan => break found.context("the /proc scan failed")?,
                guard = events.readable_mut() => {
                    let mut guard = guard.context("waiting on the ring buffer")?;
                    held.take_from(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = drain.tick() => held.take_from(events.get_mut()),
            }
        };
        if !seeding.unix_sockets {
            let unwatched = found
                .iter()
                .filter(|socket| matches!(&socket.peer, SeededPeer::Unix { path } if protocol::unix_path_may_be_database(path)))
                .count();
            found.retain(|socket| !matches!(socket.peer, SeededPeer::Unix { .. }));
            if unwatched > 0 {
                log::warn!(
                    "{unwatched} connections to database Unix sockets are open and not watched: \
                     set kernel.unix_sockets = true to watch them (its syscall hooks slow \
                     every syscall on the host; see docs/data-path.md)"
                );
            }
        }
        // A connection closed during the scan may be in it: its close, held
        // here, comes after its seeding, as it happened.
        seed(&pipeline, found)?;
        for record in held.records {
            apply_record(&record, &pipeline)?;
        }
        if held.dropped > 0 {
            log::warn!(
                "{} kernel events dropped while seeding from /proc (more than {} MiB arrived during the scan)",
                held.dropped,
                HELD_WHILE_SEEDING_BYTES >> 20
            );
            pipeline
                .dropped_while_seeding
                .fetch_add(held.dropped, Relaxed);
        }
    }
    if seeding.tls_libraries {
        // After the seeding (its /proc scan must not share the CPU with this
        // one: the events held meanwhile are bounded) and a few seconds more
        // (hooking a file holds the kernel side, and the reader has the
        // start-up's backlog to drain first), beside the reader.
        let pipeline = Arc::clone(&pipeline);
        tokio::spawn(async move {
            tokio::time::sleep(RUNNING_TLS_LIBRARIES_AFTER).await;
            tokio::task::spawn_blocking(move || pipeline.hook_running_tls_libraries()).await
        });
    }
    pipeline.health().reader_started(monotonic_ns());
    loop {
        // Lifecycle events and a filling buffer wake us; quiet data events
        // wait for the next tick.
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain_ring(guard.get_inner_mut(), &pipeline)?;
                guard.clear_ready();
            }
            _ = drain.tick() => drain_ring(events.get_mut(), &pipeline)?,
        }
        pipeline.health().reader_beat(monotonic_ns());
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, pipeline: &Pipeline) -> Result<(), Broken> {
    while let Some(record) = ring.next() {
        apply_record(&record, pipeline)?;
    }
    Ok(())
}

fn apply_record(record: &[u8], pipeline: &Pipeline) -> Result<(), Broken> {
    match kernel_records::decode(record) {
        Ok(event) => pipeline.apply(event),
        Err(e) => {
            pipeline.telemetry.record_decode_error();
            log::debug!("{e}");
            Ok(())
        }
    }
}

/// How often (housekeeping ticks, seconds) freed heap goes back to the
/// system.
const RETURN_MEMORY_EVERY_TICKS: u64 = 30;

/// Gives freed heap pages back to the system. Forgotten pools, closed
/// connections and rebuilt pool series free memory in the arenas of
/// whichever threads allocated it; glibc keeps it for reuse by those arenas
/// only, so under churn the agent's RSS would creep up to the sum of every
/// arena's peak instead of what it holds (measured by `cargo xtask soak`).
fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations at least this large get pages of their own (mmap), given back
/// to the system when freed.
const MMAP_THRESHOLD_BYTES: usize = 256 * 1024;

/// Fixes glibc's mmap threshold. Left dynamic, glibc raises it to the size of
/// the largest mmapped block freed so far (loading the probes frees several
/// MiB), after which every /metrics body and pool-series rebuild buffer
/// (hundreds of KiB) comes from the arenas and fragments them: under the
/// soak RSS crept about 0.5 MiB a minute while the live heap stayed flat.
fn keep_large_buffers_mapped() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes an allocator setting; no pointer is involved.
    unsafe {
        // 256 KiB fits an int; mallopt returns 0 only for a bad parameter.
        if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as libc::c_int) == 0 {
            log::warn!("could not set the allocator's mmap threshold; RSS may creep under churn");
        }
    }
}

/// Housekeeping ticks (seconds) between two points of the live page's
/// trends.
const TREND_TICKS: u64 = trends::STEP_NS / 1_000_000_000;

/// Housekeeping ticks between two forgettings of the workloads of pods
/// no known process runs in.
const FORGET_PODS_TICKS: u64 = 60;

/// Once a second: refresh kernel counters and forget expired history.
async fn housekeeping(pipeline: Arc<Pipeline>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        if ticks.is_multiple_of(RETURN_MEMORY_EVERY_TICKS) {
            return_free_memory();
        }
        let now = monotonic_ns();
        let (counters, tls_libraries) = pipeline.kernel.with(|k| {
            k.unhook_unused_tls_libraries(now);
            (k.probes.counters(), k.tls.status())
        })?;
        match counters {
            Ok(mut c) => {
                c.dropped_events += pipeline.dropped_while_seeding.load(Relaxed);
                pipeline.state.with(|s| s.kernel = c)?;
            }
            Err(e) => log::debug!("cannot read kernel counters: {e:#}"),
        }
        pipeline.state.with(|s| s.tls_libraries = tls_libraries)?;
        if let Some(workloads) = &pipeline.workloads {
            pipeline.apply_workloads(workloads, ticks.is_multiple_of(FORGET_PODS_TICKS))?;
        }
        let sample_usage = ticks.is_multiple_of(pipeline.sizing_sample_ticks);
        let sample_trends = ticks.is_multiple_of(TREND_TICKS);
        let window_ns = pipeline.sizing.window_ns;
        let (live, trend_views) = pipeline.state.with(|s| {
            s.tracker.bind_hidden_sockets(now, s.kernel.dropped_events);
            s.tracker.expire(now);
            // Only adapter pools are sized and charted: without one, no
            // walk over the connections.
            let views = if (sample_usage || sample_trends) && s.tracker.pools().next().is_some() {
                s.tracker.pool_views()
            } else {
                Vec::new()
            };
            if sample_usage && views.is_empty() {
                s.pool_usage = PoolUsage::default();
            } else if sample_usage {
                let activity = s.tracker.pool_activity(now, 0);
                let tracker = &mut s.tracker;
                s.pool_usage.sample(now, window_ns, &views, &activity, |v| {
                    tracker.take_peak_used(v.pid, &v.name)
                });
            }
            let known: std::collections::HashSet<u32> = s.tracker.known_processes().collect();
            // Processes with something to show: open connections, pools,
            // open reports.
            let active: std::collections::HashSet<u32> = s
                .tracker
                .open_connections()
                .map(|c| c.id.pid)
                .chain(s.tracker.pools().map(|p| p.pid))
                .chain(s.leaks.open_reports().map(|r| r.pid))
                .collect();
            ((known, active), sample_trends.then_some(views))
        })?;
        let (known, active) = live;
        pipeline.telemetry.sync_applications(&known, &active);
        if let Some(views) = trend_views {
            pipeline.sample_trends(now, views)?;
        }
        pipeline.evaluate_leaks(now)?;
        pipeline.health().housekeeping_beat(monotonic_ns());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc's threshold only ever moves up, and other tests in this process
    /// allocate too, so the check runs in a process of its own.
    #[cfg(target_env = "gnu")]
    #[test]
    fn large_buffers_stay_mapped_after_a_larger_one_was_freed() {
        const CHILD: &str = "POOLSCOPE_MMAP_THRESHOLD_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let exe = std::env::current_exe().expect("test binary");
            let out = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "pipeline::tests::large_buffers_stay_mapped_after_a_larger_one_was_freed",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .expect("run child");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "child failed: {text}");
            assert!(text.contains("1 passed"), "child ran no test: {text}");
            return;
        }
        keep_large_buffers_mapped();
        // Without the fix, freeing this raises the threshold to 8 MiB.
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        // SAFETY: mallinfo2 only reads allocator statistics.
        let mapped_before = unsafe { libc::mallinfo2() }.hblkhd;
        let buffer = std::hint::black_box(vec![1u8; 1 << 20]);
        let mapped_after = unsafe { libc::mallinfo2() }.hblkhd;
        assert!(
            mapped_after >= mapped_before + buffer.len(),
            "a 1 MiB buffer came from the arenas: mapped {mapped_before} -> {mapped_after}"
        );
    }

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_its_reason() {
        let mut tasks = Tasks::default();
        tasks.spawn("steady", std::future::pending());
        tasks.spawn("failing", async {
            Err(anyhow::anyhow!("ring buffer gone"))
        });
        assert_eq!(
            tasks.first_to_end().await,
            "the failing failed: ring buffer gone"
        );

        let mut tasks = Tasks::default();
        tasks.spawn("steady", std::future::pending());
        tasks.spawn("panicking", async { panic!("index out of bounds") });
        assert_eq!(
            tasks.first_to_end().await,
            "the panicking panicked: index out of bounds"
        );

        let mut tasks = Tasks::default();
        tasks.spawn("quitter", async { Ok(()) });
        assert_eq!(tasks.first_to_end().await, "the quitter stopped");
        tasks.abort_all();
    }
}
