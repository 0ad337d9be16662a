//! Every map the kernel programs share with userspace. Names must match
//! `agent_common::names`; userspace resizes some of them at load time.

use agent_common::{stat, ConnInfo, ConnKey, DataEvent, IoArgs, PendingConnect, SockOwner};
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};

/// Events to userspace. 1 MiB by default; the loader may resize it.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU counters, indexed by `agent_common::stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Live tracked connections by (tgid, fd): the read/write/close filter.
#[map]
pub static CONNS: LruHashMap<ConnKey, ConnInfo> = LruHashMap::with_max_entries(65536, 0);

/// connect() calls in flight, by pid_tgid.
#[map]
pub static PENDING: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(16384, 0);

/// Kernel socket address -> owning connection, for softirq-context state changes.
#[map]
pub static SOCKS: LruHashMap<u64, SockOwner> = LruHashMap::with_max_entries(65536, 0);

/// Reads and writes in flight on tracked fds, by pid_tgid.
#[map]
pub static IO_ARGS: LruHashMap<u64, IoArgs> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU room to assemble a data event (too big for the BPF stack).
#[map]
pub static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);
