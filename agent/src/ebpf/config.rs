//! `[kernel]`: the kernel programs, their ring buffer and hooks.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [kernel]")]
pub struct KernelConfig {
    /// Size of each BPF ring buffer.
    pub ring_buffer_bytes: RingBufferBytes,
    /// Mount tracefs at /sys/kernel/tracing if it is not mounted yet.
    pub mount_tracefs: bool,
    /// Which hooks copy socket data: `auto` (the socket path, else the
    /// syscall path), `socket` or `syscalls` (see docs/data-path.md).
    pub data_path: DataPath,
    /// Keep BPF run-time statistics (poolscope.probe.*). They cost a little
    /// on every run of every program, so they are for measuring.
    pub probe_stats: bool,
    /// Watch database connections over Unix sockets. Off by default: their
    /// connects and closes can only be seen by syscall tracepoints, and
    /// while any syscall tracepoint is attached every syscall of every
    /// process on the host takes the kernel's slow path (+44 ns per call
    /// here, BENCHMARKS.md); TCP connections need none.
    pub unix_sockets: bool,
    /// Read the statements of TLS connections from the TLS library's
    /// plaintext: uprobes on OpenSSL's SSL_read/SSL_write in the libssl
    /// files that observed processes map (docs/data-path.md).
    pub tls_libraries: bool,
    /// Where a hooked library's breakpoints are: `process` (the default:
    /// only in the observed processes that map it, from their first
    /// connect on, so a database server or web server that maps the same
    /// libssl pays nothing), `auto` (per file: `file` where its probes sit
    /// at instructions the kernel emulates, else `process`) or `file`
    /// (every process that maps it, from its first call: connections
    /// opened before the agent saw their process are read from their
    /// startup too). Each TLS call that hits a breakpoint costs its traps
    /// whether the process is observed or not: about 2.5 us a call in a
    /// workload here when emulated, 16 us more single-stepped
    /// (BENCHMARKS.md).
    pub tls_hook_scope: crate::tls_libraries::HookScope,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: RingBufferBytes(1 << 22),
            mount_tracefs: true,
            data_path: DataPath::Auto,
            probe_stats: false,
            unix_sockets: false,
            tls_libraries: true,
            tls_hook_scope: crate::tls_libraries::HookScope::Process,
        }
    }
}

/// A BPF ring buffer's size: the kernel requires a power of two that is a
/// multiple of the page size (4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct RingBufferBytes(u32);

impl RingBufferBytes {
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for RingBufferBytes {
    type Error = String;

    fn try_from(bytes: u32) -> Result<Self, String> {
        // A power of two is a multiple of 4096 exactly when it is >= 4096.
        if bytes.is_power_of_two() && bytes >= 4096 {
            Ok(Self(bytes))
        } else {
            Err(format!(
                "{bytes} is not a power of two that is a multiple of 4096 \
                 (e.g. 262144, 1048576)"
            ))
        }
    }
}

impl From<RingBufferBytes> for u32 {
    fn from(bytes: RingBufferBytes) -> u32 {
        bytes.0
    }
}

/// The kernel hooks that copy socket data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// The socket path where the kernel loads it, else the syscall path.
    #[default]
    Auto,
    /// Raw tracepoints on socket sends and receives only; fail if refused.
    Socket,
    /// Tracepoints on every read/write/send/recv syscall (costly; fallback).
    Syscalls,
}
