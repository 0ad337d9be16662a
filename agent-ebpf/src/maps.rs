//! Every map the kernel programs share with userspace. Names must match
//! `agent_common::names`; userspace resizes some of them at load time.

use agent_common::{
    stat, ConnInfo, ConnKey, IoArgs, PendingConnect, SockOwner, TlsCall, TlsSession, TlsSessionKey,
    MAX_TRACKED_CONNECTIONS, TRACKED_PROCS_SLOTS,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

/// Events to userspace. 1 MiB by default; the loader may resize it.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU counters, indexed by `agent_common::stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Live tracked connections by (tgid, fd): the read/write/close filter.
/// Not LRU: evicting a live connection would lose it silently.
#[map]
pub static CONNS: HashMap<ConnKey, ConnInfo> =
    HashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Non-zero where a process (by `tracked_procs_slot(tgid)`) may own a
/// tracked connection: the first, cheapest filter of socket I/O.
#[map]
pub static TRACKED_PROCS: Array<u32> = Array::with_max_entries(TRACKED_PROCS_SLOTS, 0);

/// connect() calls in flight, by pid_tgid.
#[map]
pub static PENDING: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(16384, 0);

/// Kernel socket address -> owning connection, for softirq-context state changes.
/// Entries leave at TCP_CLOSE, so a plain hash never fills with the dead.
#[map]
pub static SOCKS: HashMap<u64, SockOwner> = HashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Reads and writes in flight on tracked fds, by pid_tgid.
#[map]
pub static IO_ARGS: LruHashMap<u64, IoArgs> = LruHashMap::with_max_entries(16384, 0);

/// Each thread's TLS library read or write, in flight or its last, by
/// pid_tgid: written in place at each call, removed at the thread's exit
/// (`sched_process_exit`). Not LRU, and not inserted and deleted at every
/// call: those map operations cost more than the rest of the programs.
/// Full, a new thread's calls are counted (`TLS_CALLS_FAILED`) and not read.
#[map]
pub static TLS_CALLS: HashMap<u64, TlsCall> = HashMap::with_max_entries(32768, 0);

/// TLS session (`SSL *`) -> the connection it last moved bytes on, for the
/// reads a library serves from its buffer without touching the socket.
/// LRU: sessions end without telling (SSL_free is not hooked); the least
/// recently used is a session gone, or one that learns its connection
/// again at its next call that moves bytes. About 2.5 MiB of kernel memory.
#[map]
pub static TLS_SESSIONS: LruHashMap<TlsSessionKey, TlsSession> =
    LruHashMap::with_max_entries(32768, 0);

/// The tracked connection whose TLS records each thread (of a process that
/// calls a TLS library) last received outside a TLS call: the connection
/// of its next read call, for libraries that encrypt in memory.
#[map]
pub static LAST_TLS_RECEIVE: LruHashMap<u64, TlsSession> = LruHashMap::with_max_entries(16384, 0);
