//! The only module that talks to aya: prerequisites, loading, attaching, the
//! ring-buffer reader and the per-CPU counters.

pub mod config;

use std::{fs, os::fd::OwnedFd, path::Path};

use agent_common::{
    conn_flags, names, stat, tracked_procs, tracked_procs_slot, ConnInfo, ConnKey,
    SOCKET_DATA_RAW_TRACEPOINTS, SYSCALL_DATA_TRACEPOINTS, TLS_EXIT_PROGRAM, TLS_UPROBES,
    TRACEPOINTS, UNIX_SOCKET_TRACEPOINTS,
};
use anyhow::{bail, Context};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        trace_point::TracePointLinkId,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        RawTracePoint, TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use tokio::io::unix::AsyncFd;

pub use self::config::DataPath;
use crate::state::KernelCounters;
use crate::tls_libraries::FileId;

/// The kernel programs, built by build.rs.
static KERNEL_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Capability numbers from linux/capability.h.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
pub fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn has_capability(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Names the capabilities that loading the probes needs and we lack.
pub fn missing_capabilities(caps: u64) -> Vec<&'static str> {
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN alone also allows everything on older kernels.
    if !has_capability(caps, CAP_SYS_ADMIN) {
        if !has_capability(caps, CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has_capability(caps, CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    missing
}

/// Whether tracefs is mounted, and whether we had to mount it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracefsStatus {
    AlreadyMounted,
    MountedByUs,
}

/// Read from the mount table, not by looking inside: tracefs is 0700 root,
/// so an unprivileged stat would wrongly say "not mounted".
fn tracefs_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|table| {
            table.lines().any(|line| {
                let mut fields = line.split_whitespace();
                let mount_point = fields.nth(4);
                let fs_type = line
                    .split(" - ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                mount_point == Some(TRACEFS) && fs_type == Some("tracefs")
            })
        })
        .unwrap_or(false)
}

/// Fails with one sentence when we lack the privileges to load probes.
pub fn require_privileges() -> anyhow::Result<()> {
    let missing = missing_capabilities(effective_capabilities());
    if !missing.is_empty() {
        bail!(
            "poolscope needs root (or {}) to load its kernel probes; run it with sudo",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Tracepoints need tracefs; hosts and containers often lack the mount.
pub fn ensure_tracefs(may_mount: bool) -> anyhow::Result<TracefsStatus> {
    if tracefs_mounted() {
        return Ok(TracefsStatus::AlreadyMounted);
    }
    if !may_mount {
        bail!("tracefs is not mounted at {TRACEFS} and kernel.mount_tracefs is false; mount it with `mount -t tracefs nodev {TRACEFS}`");
    }
    let target = std::ffi::CString::new(TRACEFS).context("tracefs path")?;
    let fstype = std::ffi::CString::new("tracefs").context("fs type")?;
    let source = std::ffi::CString::new("nodev").context("source")?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!("tracefs is not mounted at {TRACEFS} and mounting it failed ({err}); mount it with `mount -t tracefs nodev {TRACEFS}`");
    }
    Ok(TracefsStatus::MountedByUs)
}

/// How often the reader drains the ring buffer when no wakeup came: data
/// events only wake it once an eighth of the buffer is full.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Loaded and attached kernel programs.
pub struct KernelProbes {
    ebpf: Ebpf,
    ring_buffer_bytes: u32,
    data_path: DataPathInUse,
    /// Keeps BPF run-time statistics enabled while we live (None when off
    /// or refused).
    _stats: Option<OwnedFd>,
    /// Processes that may own a tracked connection, and how many of them
    /// share each TRACKED_PROCS slot, so that a slot is cleared only when
    /// its last process is gone.
    tracked_pids: std::collections::HashSet<u32>,
    slot_users: std::collections::HashMap<u32, u32>,
    /// Slots whose processes own connections missing from SOCKS.
    unbound_slots: std::collections::HashSet<u32>,
    /// Whether the TLS library programs loaded (else why not).
    tls_programs: Result<(), String>,
    /// TLS library files held open, by the file they are.
    tls_files: std::collections::HashMap<FileId, crate::procfs::OpenedLibrary>,
    /// The uprobes of each held file: for every process (None) or one.
    tls_links: std::collections::HashMap<(FileId, Option<u32>), UProbeLinks>,
}

/// The uprobes of one attachment of a TLS library, by program.
type UProbeLinks = Vec<(&'static str, UProbeLinkId)>;

/// The data path the loader attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPathInUse {
    /// Raw tracepoints on socket sends and receives.
    Socket,
    /// Tracepoints on every read/write/send/recv syscall.
    Syscalls,
}

impl DataPathInUse {
    pub fn describe(self) -> &'static str {
        match self {
            DataPathInUse::Socket => {
                "socket path (raw tracepoints sock_send_length and sock_recv_length)"
            }
            DataPathInUse::Syscalls => {
                "syscall path (tracepoints on every read/write/send/recv syscall)"
            }
        }
    }
}

/// What the loader is asked for.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    /// Head bytes copied until a connection's protocol is known.
    pub capture_head_bytes: u32,
    pub data_path: DataPath,
    pub probe_stats: bool,
    /// Attach the syscall tracepoints that see Unix-socket connects and
    /// closes (`kernel.unix_sockets`).
    pub unix_sockets: bool,
    /// Load the uprobe programs that read TLS libraries' plaintext
    /// (`kernel.tls_libraries`); they attach per library, later.
    pub tls_libraries: bool,
}

fn load_and_attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> anyhow::Result<()> {
    let prog = tracepoint_program(ebpf, program)?;
    prog.load()
        .with_context(|| format!("the kernel refused program {program}"))?;
    prog.attach(category, name)
        .with_context(|| format!("cannot attach to tracepoint {category}:{name}"))?;
    Ok(())
}

fn attach_socket_path(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (program, tracepoint) in SOCKET_DATA_RAW_TRACEPOINTS {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(program)
            .with_context(|| format!("kernel object has no program {program}"))?
            .try_into()
            .with_context(|| format!("{program} is not a raw tracepoint program"))?;
        prog.load()
            .with_context(|| format!("the kernel refused program {program}"))?;
        prog.attach(tracepoint)
            .with_context(|| format!("cannot attach to raw tracepoint {tracepoint}"))?;
    }
    Ok(())
}

/// A tracepoint program of the kernel object, by name.
fn tracepoint_program<'a>(ebpf: &'a mut Ebpf, program: &str) -> anyhow::Result<&'a mut TracePoint> {
    ebpf.program_mut(program)
        .with_context(|| format!("kernel object has no program {program}"))?
        .try_into()
        .with_context(|| format!("{program} is not a tracepoint program"))
}

/// A uprobe program of the kernel object, by name.
fn uprobe_program<'a>(ebpf: &'a mut Ebpf, program: &str) -> anyhow::Result<&'a mut UProbe> {
    ebpf.program_mut(program)
        .with_context(|| format!("kernel object has no program {program}"))?
        .try_into()
        .with_context(|| format!("{program} is not a uprobe program"))
}

/// Loads the TLS library programs; they attach per library file.
fn load_tls_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let programs = TLS_UPROBES.iter().map(|(program, _)| *program);
    for program in programs.chain([TLS_EXIT_PROGRAM]) {
        uprobe_program(ebpf, program)?
            .load()
            .with_context(|| format!("the kernel refused program {program}"))?;
    }
    Ok(())
}

fn detach_uprobes(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (program, link) in links {
        if let Ok(prog) = uprobe_program(ebpf, program) {
            if let Err(e) = prog.detach(link) {
                log::warn!("cannot detach {program}: {e}");
            }
        }
    }
}

/// Loads the syscall path's programs without attaching them.
fn load_syscall_path(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (program, _, _) in SYSCALL_DATA_TRACEPOINTS {
        tracepoint_program(ebpf, program)?
            .load()
            .with_context(|| format!("the kernel refused program {program}"))?;
    }
    Ok(())
}

/// Attaches the (loaded) syscall path; on failure nothing stays attached.
/// The links live as long as the programs, which `Ebpf` owns.
fn attach_syscall_path(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut links = Vec::with_capacity(SYSCALL_DATA_TRACEPOINTS.len());
    for (program, category, tracepoint) in SYSCALL_DATA_TRACEPOINTS {
        let attached = tracepoint_program(ebpf, program).and_then(|prog| {
            prog.attach(category, tracepoint)
                .with_context(|| format!("cannot attach to tracepoint {category}:{tracepoint}"))
        });
        match attached {
            Ok(link) => links.push((*program, link)),
            Err(e) => {
                detach_syscall_path(ebpf, links);
                return Err(e);
            }
        }
    }
    Ok(())
}

fn detach_syscall_path(ebpf: &mut Ebpf, links: Vec<(&'static str, TracePointLinkId)>) {
    for (program, link) in links {
        if let Ok(prog) = tracepoint_program(ebpf, program) {
            if let Err(e) = prog.detach(link) {
                log::warn!("cannot detach {program}: {e}");
            }
        }
    }
}

/// Loads the kernel object; `syscall_path_for_all` tells the kernel whether
/// the syscall path is the data path in use.
fn load_object(options: &LoadOptions, syscall_path_for_all: bool) -> anyhow::Result<Ebpf> {
    // Wake the reader early enough that a burst cannot fill the buffer
    // between two of its timer ticks.
    let wakeup_bytes = u64::from(options.ring_buffer_bytes / 8);
    let own_tgid = std::process::id();
    let for_all = u32::from(syscall_path_for_all);
    EbpfLoader::new()
        .override_global(names::AGENT_TGID, &own_tgid, true)
        .override_global(names::CAPTURE_HEAD_BYTES, &options.capture_head_bytes, true)
        .override_global(names::WAKEUP_BYTES, &wakeup_bytes, true)
        .override_global(names::SYSCALL_PATH_FOR_ALL, &for_all, true)
        .map_max_entries(names::EVENTS, options.ring_buffer_bytes)
        .load(KERNEL_OBJECT)
        .map_err(|e| anyhow::anyhow!(explain_load_error(&e)))
}

/// Turns a load failure into one sentence a user can act on.
fn explain_load_error(err: &aya::EbpfError) -> String {
    let text = err.to_string();
    let lower = format!("{err:?}").to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("eperm") {
        format!("the kernel refused to load poolscope's probes (permission denied: {text}); run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN")
    } else if lower.contains("function not implemented") || lower.contains("enosys") {
        "this kernel has no BPF support (bpf() is not implemented)".to_string()
    } else {
        format!("cannot load poolscope's kernel probes: {text}")
    }
}

/// The connection tracepoints to attach: TCP's always, Unix sockets' when
/// they are watched.
pub fn connection_tracepoints(
    unix_sockets: bool,
) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str)> {
    let unix: &[_] = if unix_sockets {
        UNIX_SOCKET_TRACEPOINTS
    } else {
        &[]
    };
    TRACEPOINTS.iter().chain(unix)
}

impl KernelProbes {
    /// Loads the programs with our own pid filtered out and attaches the
    /// connection tracepoints and one data path. Fails with one clear
    /// sentence on missing prerequisites.
    pub fn load(options: LoadOptions) -> anyhow::Result<KernelProbes> {
        require_privileges()?;
        // The data path is chosen before the connection tracepoints attach,
        // so that no connection is marked for a path that is not in use.
        let (mut ebpf, data_path) = match options.data_path {
            DataPath::Socket => {
                let mut ebpf = load_object(&options, false)?;
                attach_socket_path(&mut ebpf)
                    .context("the socket data path (kernel.data_path = \"socket\")")?;
                (ebpf, DataPathInUse::Socket)
            }
            DataPath::Syscalls => {
                let mut ebpf = load_object(&options, true)?;
                load_syscall_path(&mut ebpf)?;
                attach_syscall_path(&mut ebpf)?;
                (ebpf, DataPathInUse::Syscalls)
            }
            DataPath::Auto => {
                let mut ebpf = load_object(&options, false)?;
                match attach_socket_path(&mut ebpf) {
                    Ok(()) => (ebpf, DataPathInUse::Socket),
                    Err(e) => {
                        log::warn!(
                            "the socket data path is not available on this kernel ({e:#}); \
                             falling back to the syscall path, which adds a cost to every \
                             read and write of every process"
                        );
                        drop(ebpf);
                        let mut ebpf = load_object(&options, true)?;
                        load_syscall_path(&mut ebpf)?;
                        attach_syscall_path(&mut ebpf)?;
                        (ebpf, DataPathInUse::Syscalls)
                    }
                }
            }
        };
        for (program, category, tracepoint) in connection_tracepoints(options.unix_sockets) {
            load_and_attach_tracepoint(&mut ebpf, program, category, tracepoint)?;
        }
        let tls_programs = if options.tls_libraries {
            load_tls_programs(&mut ebpf).map_err(|e| format!("{e:#}"))
        } else {
            Err("kernel.tls_libraries = false".to_string())
        };
        let ring_buffer_bytes = options.ring_buffer_bytes;
        // Per-program run time, where the kernel allows it (5.8+), only when
        // asked: the statistics cost on every run of every program.
        let stats = if options.probe_stats {
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| log::warn!("cannot enable BPF run-time statistics: {e}"))
                .ok()
        } else {
            None
        };
        Ok(KernelProbes {
            ebpf,
            ring_buffer_bytes,
            data_path,
            _stats: stats,
            tracked_pids: Default::default(),
            slot_users: Default::default(),
            unbound_slots: Default::default(),
            tls_programs,
            tls_files: Default::default(),
            tls_links: Default::default(),
        })
    }

    /// Whether TLS libraries can be hooked, and if not why.
    pub fn tls_programs(&self) -> Result<(), &str> {
        self.tls_programs
            .as_ref()
            .map(|_| ())
            .map_err(String::as_str)
    }

    /// Holds the TLS library `file` open as `library`, to attach its
    /// uprobes with [`Self::attach_tls_library`]. Refused when the programs
    /// are not loaded or the file lacks OpenSSL's read and write functions.
    pub fn keep_tls_library(
        &mut self,
        file: FileId,
        library: crate::procfs::OpenedLibrary,
    ) -> anyhow::Result<()> {
        if let Err(why) = &self.tls_programs {
            bail!("the TLS library programs are not loaded: {why}");
        }
        for function in ["SSL_read", "SSL_write"] {
            if !library
                .points
                .iter()
                .any(|p| p.carries.starts_with(function))
            {
                bail!("it defines neither {function} nor {function}_ex");
            }
        }
        self.tls_files.insert(file, library);
        Ok(())
    }

    /// Attaches the uprobes of the held library `file` (its read and write
    /// calls, and their `_ex` forms where it has them), for every process
    /// that maps it (`pid` None) or for one. On failure nothing of this
    /// attachment stays.
    pub fn attach_tls_library(&mut self, file: FileId, pid: Option<u32>) -> anyhow::Result<()> {
        if self.tls_links.contains_key(&(file, pid)) {
            return Ok(());
        }
        let library = self
            .tls_files
            .get(&file)
            .context("the TLS library is not held open")?;
        let path = library.attach_path();
        let points = library.points.clone();
        let scope = match pid.and_then(std::num::NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let mut links = Vec::new();
        for point in points {
            let enter = TLS_UPROBES
                .iter()
                .find(|(_, function)| *function == point.carries)
                .map(|(program, _)| *program);
            for program in enter.into_iter().chain([TLS_EXIT_PROGRAM]) {
                let attached = uprobe_program(&mut self.ebpf, program).and_then(|prog| {
                    prog.attach(
                        UProbeAttachLocation::AbsoluteOffset(point.offset),
                        &path,
                        scope,
                    )
                    .with_context(|| format!("cannot attach {program} at {:#x}", point.offset))
                });
                match attached {
                    Ok(link) => links.push((program, link)),
                    Err(e) => {
                        detach_uprobes(&mut self.ebpf, links);
                        return Err(e);
                    }
                }
            }
        }
        self.tls_links.insert((file, pid), links);
        Ok(())
    }

    /// Detaches one attachment of a held TLS library.
    pub fn detach_tls_library(&mut self, file: FileId, pid: Option<u32>) {
        if let Some(links) = self.tls_links.remove(&(file, pid)) {
            detach_uprobes(&mut self.ebpf, links);
        }
    }

    /// Lets a TLS library go: every attachment, and the file.
    pub fn release_tls_library(&mut self, file: FileId) {
        let attachments: Vec<_> = self
            .tls_links
            .keys()
            .filter(|(f, _)| *f == file)
            .copied()
            .collect();
        for (file, pid) in attachments {
            self.detach_tls_library(file, pid);
        }
        self.tls_files.remove(&file);
    }

    /// A Unix-socket connection that may speak a database protocol. The
    /// socket tracepoints fire for Unix sockets too, but SOCKS knows only
    /// TCP sockets: its process's socket I/O must also be looked up by fd.
    pub fn unix_connection_opened(&mut self, pid: u32) {
        self.process_has_unbound(pid);
    }

    /// The data path in use.
    pub fn data_path(&self) -> DataPathInUse {
        self.data_path
    }

    /// Notes that a process owns a tracked connection, so that the socket
    /// path looks at its socket I/O. The kernel marks a process itself at
    /// connect; this covers seeded connections and re-marks a slot that an
    /// exit in the same slot cleared in the meantime.
    pub fn process_tracks(&mut self, pid: u32) {
        if !self.tracked_pids.insert(pid) {
            return;
        }
        let slot = tracked_procs_slot(pid);
        *self.slot_users.entry(slot).or_insert(0) += 1;
        let marks = if self.unbound_slots.contains(&slot) {
            tracked_procs::TRACKS | tracked_procs::UNBOUND
        } else {
            tracked_procs::TRACKS
        };
        self.set_tracked_slot(slot, marks);
    }

    /// A process owns a connection that the kernel's socket map does not
    /// know (a Unix socket or one found in /proc): its socket I/O must be
    /// looked up by fd too.
    fn process_has_unbound(&mut self, pid: u32) {
        self.process_tracks(pid);
        let slot = tracked_procs_slot(pid);
        if self.unbound_slots.insert(slot) {
            self.set_tracked_slot(slot, tracked_procs::TRACKS | tracked_procs::UNBOUND);
        }
    }

    /// A process exited: its slot is cleared once no other tracked process
    /// shares it.
    pub fn process_exited(&mut self, pid: u32) {
        if !self.tracked_pids.remove(&pid) {
            return;
        }
        let slot = tracked_procs_slot(pid);
        let users = self.slot_users.entry(slot).or_insert(1);
        *users = users.saturating_sub(1);
        if *users == 0 {
            self.slot_users.remove(&slot);
            self.unbound_slots.remove(&slot);
            self.set_tracked_slot(slot, 0);
        }
    }

    fn set_tracked_slot(&mut self, slot: u32, value: u32) {
        let Some(map) = self.ebpf.map_mut(names::TRACKED_PROCS) else {
            return;
        };
        match Array::<&mut MapData, u32>::try_from(map) {
            Ok(mut slots) => {
                if let Err(e) = slots.set(slot, value, 0) {
                    log::warn!("cannot update the kernel's tracked-process filter: {e}");
                }
            }
            Err(e) => log::warn!("the kernel's tracked-process filter is not an array: {e}"),
        }
    }

    /// The event ring buffer, ready for async reading. Call once.
    pub fn take_events(&mut self) -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .context("kernel object has no EVENTS map")?;
        let ring = RingBuf::try_from(map).context("EVENTS is not a ring buffer")?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
        // the RingBuf, and always reports that same fd.
        unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {}", e))
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> anyhow::Result<KernelCounters> {
        let map = self
            .ebpf
            .map(names::STATS)
            .context("kernel object has no STATS map")?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let sum = |index: u32| -> anyhow::Result<u64> { Ok(stats.get(&index, 0)?.iter().sum()) };
        let max = |index: u32| -> anyhow::Result<u64> {
            Ok(stats.get(&index, 0)?.iter().copied().max().unwrap_or(0))
        };
        // Run-time statistics exist only while enabled (kernel 5.8+); a
        // program whose info cannot be read is left out.
        let probes = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((
                    name.to_string(),
                    info.run_time().as_nanos() as u64,
                    info.run_count(),
                ))
            })
            .collect();
        Ok(KernelCounters {
            dropped_events: sum(stat::DROPPED_EVENTS)?,
            ringbuf_pending_bytes: max(stat::RINGBUF_PENDING_BYTES)?,
            ringbuf_size_bytes: u64::from(self.ring_buffer_bytes),
            pending_insert_failed: sum(stat::PENDING_INSERT_FAILED)?,
            conns_full: sum(stat::CONNS_FULL)?,
            unattributed_socket_io: sum(stat::UNREADABLE_SOCKET_IO)?,
            unattributed_connects: sum(stat::UNATTRIBUTED_CONNECTS)?,
            unattributed_tls_calls: sum(stat::UNATTRIBUTED_TLS_CALLS)?
                + sum(stat::TLS_CALLS_FAILED)?,
            probes,
        })
    }

    /// Tells the kernel about a connection found in /proc, so that its
    /// close is reported and its data copied. Generation 0 marks it as
    /// seeded.
    pub fn track_seeded(&mut self, pid: u32, fd: i32, unix: bool) -> anyhow::Result<()> {
        self.process_has_unbound(pid);
        let syscall_copy = self.data_path == DataPathInUse::Syscalls;
        let map = self
            .ebpf
            .map_mut(names::CONNS)
            .context("kernel object has no CONNS map")?;
        let mut conns: BpfHashMap<&mut MapData, ConnKey, ConnInfo> = BpfHashMap::try_from(map)?;
        let key = ConnKey {
            tgid: pid,
            fd: fd as u32,
        };
        // BPF_NOEXIST: a connect the kernel saw after attaching wins.
        const BPF_NOEXIST: u64 = 1;
        let mut flags = conn_flags::CAPTURE_DATA;
        if syscall_copy {
            flags |= conn_flags::SYSCALL_COPY;
        }
        if unix {
            flags |= conn_flags::CLOSE_BY_SYSCALL;
        }
        let info = ConnInfo {
            conn_start_ns: 0,
            flags,
            capture_bytes: 0,
        };
        match conns.insert(key, info, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stops copying a connection's data (it speaks no database protocol).
    pub fn stop_capture(&mut self, pid: u32, fd: i32, generation: u64) {
        self.update_conn(pid, fd, generation, |info| {
            info.flags &= !conn_flags::CAPTURE_DATA
        });
    }

    /// Sets how many head bytes to copy of a connection's reads and writes.
    pub fn set_capture_bytes(&mut self, pid: u32, fd: i32, generation: u64, bytes: u32) {
        self.update_conn(pid, fd, generation, |info| info.capture_bytes = bytes);
    }

    /// Changes a connection's kernel entry, if it still belongs to that
    /// generation (the fd may have been reused since).
    fn update_conn(
        &mut self,
        pid: u32,
        fd: i32,
        generation: u64,
        change: impl FnOnce(&mut ConnInfo),
    ) {
        let Some(map) = self.ebpf.map_mut(names::CONNS) else {
            return;
        };
        let Ok(mut conns) = BpfHashMap::<&mut MapData, ConnKey, ConnInfo>::try_from(map) else {
            return;
        };
        let key = ConnKey {
            tgid: pid,
            fd: fd as u32,
        };
        if let Ok(mut info) = conns.get(&key, 0) {
            if info.conn_start_ns == generation {
                change(&mut info);
                let _ = conns.insert(key, info, 0);
            }
        }
    }

    /// Forgets a connection in the kernel's filter (its process exited
    /// without closing it, so no close() will remove it), or a connection
    /// the kernel already removed (closed).
    pub fn forget(&mut self, pid: u32, fd: i32) {
        let Some(map) = self.ebpf.map_mut(names::CONNS) else {
            return;
        };
        if let Ok(mut conns) = BpfHashMap::<&mut MapData, ConnKey, ConnInfo>::try_from(map) {
            let _ = conns.remove(&ConnKey {
                tgid: pid,
                fd: fd as u32,
            });
        }
    }
}

/// What `poolscope check` reports for one thing it looked at.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub ok: bool,
    pub what: String,
    pub detail: String,
}

/// Checks the kernel's support for what poolscope uses, one line each.
pub fn check_kernel() -> Vec<CheckLine> {
    let mut lines = Vec::new();
    let line = |ok: bool, what: &str, detail: String| CheckLine {
        ok,
        what: what.to_string(),
        detail,
    };
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    lines.push(line(true, "kernel", release));
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    lines.push(line(
        btf,
        "BTF",
        if btf {
            "/sys/kernel/btf/vmlinux present".into()
        } else {
            "no /sys/kernel/btf/vmlinux (not needed by the tracepoint path)".into()
        },
    ));
    let caps = effective_capabilities();
    let missing = missing_capabilities(caps);
    lines.push(line(
        missing.is_empty(),
        "capabilities",
        if missing.is_empty() {
            "CAP_BPF/CAP_PERFMON (or CAP_SYS_ADMIN) present".into()
        } else {
            format!("missing {}: run as root", missing.join(", "))
        },
    ));
    match ensure_tracefs(true) {
        Ok(TracefsStatus::AlreadyMounted) => {
            lines.push(line(true, "tracefs", format!("mounted at {TRACEFS}")))
        }
        Ok(TracefsStatus::MountedByUs) => lines.push(line(
            true,
            "tracefs",
            format!("was not mounted; mounted it at {TRACEFS}"),
        )),
        Err(e) => lines.push(line(false, "tracefs", format!("{e:#}"))),
    }
    let kprobes = Path::new(TRACEFS).join("kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists();
    lines.push(line(
        kprobes,
        "kprobes",
        if kprobes {
            "available (not used: tracepoints are the portable path)".into()
        } else {
            "unavailable (CONFIG_KPROBES off); not needed, tracepoints are in use".into()
        },
    ));
    lines.push(fentry_line());
    match KernelProbes::load(LoadOptions {
        ring_buffer_bytes: 1 << 16,
        capture_head_bytes: 64,
        data_path: DataPath::Auto,
        probe_stats: false,
        unix_sockets: true,
        tls_libraries: true,
    }) {
        Ok(mut probes) => {
            lines.extend(check_tls_libraries(&mut probes));
            for (program, category, tracepoint) in TRACEPOINTS {
                lines.push(line(
                    true,
                    &format!("tracepoint {category}:{tracepoint}"),
                    format!("{program} loaded and attached (in use)"),
                ));
            }
            for (program, category, tracepoint) in UNIX_SOCKET_TRACEPOINTS {
                lines.push(line(
                    true,
                    &format!("tracepoint {category}:{tracepoint}"),
                    format!(
                        "{program} loaded and attached (in use only with kernel.unix_sockets = true: \
                         it slows every syscall on the host)"
                    ),
                ));
            }
            let in_use = probes.data_path();
            lines.push(line(
                in_use == DataPathInUse::Socket,
                "data path",
                match in_use {
                    DataPathInUse::Socket => {
                        format!("{} loaded and attached (in use)", in_use.describe())
                    }
                    DataPathInUse::Syscalls => format!(
                        "the socket path was refused; {} in use (slower)",
                        in_use.describe()
                    ),
                },
            ));
        }
        Err(e) => lines.push(line(false, "tracepoints", format!("{e:#}"))),
    }
    lines
}

/// The TLS library programs, and each libssl file that a running process
/// maps now, hooked for a moment as the agent would hook it.
fn check_tls_libraries(probes: &mut KernelProbes) -> Vec<CheckLine> {
    let what = "TLS libraries (uprobes)".to_string();
    if let Err(why) = probes.tls_programs() {
        return vec![CheckLine {
            ok: false,
            what,
            detail: format!(
                "the programs did not load ({why}): statements on TLS connections are not read"
            ),
        }];
    }
    let mut lines = vec![CheckLine {
        ok: true,
        what,
        detail: "programs loaded; the agent hooks OpenSSL's libssl in each file that a process \
                 it observes maps"
            .into(),
    }];
    let mut seen = std::collections::BTreeMap::new();
    for (pid, found) in crate::procfs::tls_libraries_of_all(Path::new("/proc")) {
        for lib in found.libraries {
            seen.entry(lib.file).or_insert((pid, lib.path));
        }
    }
    if seen.is_empty() {
        lines.push(CheckLine {
            ok: true,
            what: "TLS library files".into(),
            detail: "no running process maps a libssl now".into(),
        });
    }
    for (file, (pid, path)) in seen {
        let reachable = std::path::PathBuf::from(format!("/proc/{pid}/root{path}"));
        let result =
            match crate::procfs::open_tls_library(&reachable, crate::tls_libraries::TLS_SYMBOLS) {
                Ok(library) => {
                    let public = library
                        .points
                        .iter()
                        .any(|p| library.offset(p.carries) == Some(p.offset));
                    let emulated = library.emulated;
                    probes
                        .keep_tls_library(file, library)
                        .and_then(|()| probes.attach_tls_library(file, None))
                        .map(|()| (public, emulated))
                }
                Err(e) => Err(anyhow::anyhow!("{e}")),
            };
        probes.release_tls_library(file);
        lines.push(CheckLine {
            ok: result.is_ok(),
            what: format!("TLS library {path}"),
            detail: match result {
                Ok((public, emulated)) => format!(
                    "can be hooked (mapped by pid {pid} and maybe others), at {}, whose first \
                     instruction the kernel {}",
                    if public {
                        "SSL_read/SSL_write and their _ex forms"
                    } else {
                        "its internal read/write functions"
                    },
                    if emulated {
                        "emulates: tls_hook_scope = \"process\" (the default) gives only the \
                         observed processes breakpoints, \"auto\" and \"file\" every process \
                         that maps it"
                    } else {
                        "single-steps (a VM exit under a hypervisor): tls_hook_scope = \"process\" \
                         (the default) and \"auto\" give only the observed processes \
                         breakpoints, \"file\" every process that maps it"
                    }
                ),
                Err(e) => format!("cannot be hooked: {e:#}"),
            },
        });
    }
    lines
}

/// fentry needs BTF and a kernel that accepts tracing programs; some
/// kernels (or lockdown) refuse them with EPERM. aya probes with a trivial one.
fn fentry_line() -> CheckLine {
    let what = "fentry/fexit".to_string();
    match aya::sys::is_program_supported(aya::programs::ProgramType::Tracing) {
        Ok(true) => CheckLine {
            ok: true,
            what,
            detail: "available (not used yet: tracepoints are in use)".into(),
        },
        Ok(false) => CheckLine {
            ok: false,
            what,
            detail: "unavailable on this kernel; tracepoints are in use".into(),
        },
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            CheckLine {
                ok: false,
                what,
                detail: format!(
                    "unavailable (loading a probe program failed{cause}); tracepoints are in use"
                ),
            }
        }
    }
}
