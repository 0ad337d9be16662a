//! Wire types shared by poolscope's kernel programs and its userspace agent.
//!
//! Every event in the ring buffer starts with [`EventHeader`]; its `kind` says
//! which struct follows. All structs are `#[repr(C)]` with explicit padding so
//! that the kernel and userspace agree on every byte. Userspace never trusts the
//! bytes blindly: `agent::wire` decodes them with length checks.
#![no_std]

/// Names of maps and globals, shared so that the loader and the kernel crate
/// cannot drift apart.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const CONNS: &str = "CONNS";
    pub const PENDING: &str = "PENDING";
    pub const SOCKS: &str = "SOCKS";
    pub const AGENT_TGID: &str = "AGENT_TGID";
    pub const IO_ARGS: &str = "IO_ARGS";
    pub const CAPTURE_HEAD_BYTES: &str = "CAPTURE_HEAD_BYTES";
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    pub const TRACKED_PROCS: &str = "TRACKED_PROCS";
    pub const SYSCALL_PATH_FOR_ALL: &str = "SYSCALL_PATH_FOR_ALL";
    pub const TLS_CALLS: &str = "TLS_CALLS";
    pub const TLS_SESSIONS: &str = "TLS_SESSIONS";
}

/// Slots in `TRACKED_PROCS`, indexed by `tgid & (TRACKED_PROCS_SLOTS - 1)`.
/// A slot is non-zero while some process hashing to it may own a tracked
/// connection, so socket I/O of every other process leaves after one array
/// load. Collisions only cost the colliding process a hash lookup.
pub const TRACKED_PROCS_SLOTS: u32 = 1 << 16;

/// Values of a `TRACKED_PROCS` slot, one byte each so that the kernel's
/// one-byte store of `TRACKS` can never undo userspace's `UNBOUND`.
pub mod tracked_procs {
    /// A process in this slot tracks a connection (set by the kernel at
    /// connect and by userspace).
    pub const TRACKS: u32 = 0x1;
    /// ... and some of them are not in SOCKS (Unix sockets or connections
    /// found in /proc at start), so socket I/O that SOCKS does not know
    /// must still be looked up by fd.
    pub const UNBOUND: u32 = 0x100;
    /// ... and one of them called a hooked TLS library (set by the kernel
    /// at the call): its socket I/O may be a TLS call's ciphertext.
    pub const IN_TLS: u32 = 0x10000;
}

/// The slot of a process in `TRACKED_PROCS`.
pub const fn tracked_procs_slot(tgid: u32) -> u32 {
    tgid & (TRACKED_PROCS_SLOTS - 1)
}

/// Capacity of the live-connection maps (CONNS, SOCKS). Plain hash maps, not
/// LRU: a tracked connection is never evicted silently; a full map refuses
/// the insert and the refusal is counted (`stat::CONNS_FULL`).
pub const MAX_TRACKED_CONNECTIONS: u32 = 131_072;

/// The kernel programs that every data path needs, as (program name,
/// tracepoint category, tracepoint name): TCP state changes (which also
/// carry TCP connects and closes, from the caller's saved registers) and
/// process exits. None of them is a syscall tracepoint: enabling any
/// syscall tracepoint sends every syscall of every task on the host
/// through the kernel's slow syscall path.
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
];

/// Connects and closes of Unix sockets, which no socket-level tracepoint
/// reports: syscall tracepoints, attached only when Unix-socket connections
/// are watched (`kernel.unix_sockets`), at the slow-path cost above.
pub const UNIX_SOCKET_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
];

/// The socket data path (the default): raw tracepoints that fire only for
/// socket sends and receives, as (program name, tracepoint name). They read
/// the fd and user buffer from the syscall's saved registers.
pub const SOCKET_DATA_RAW_TRACEPOINTS: &[(&str, &str)] = &[
    ("sock_send_length", "sock_send_length"),
    ("sock_recv_length", "sock_recv_length"),
];

/// The syscall data path (the fallback where the socket path cannot load):
/// per-call tracepoints on every read/write/send/recv of every process.
pub const SYSCALL_DATA_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_write", "syscalls", "sys_enter_write"),
    ("sys_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("sys_enter_writev", "syscalls", "sys_enter_writev"),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("sys_enter_read", "syscalls", "sys_enter_read"),
    ("sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("sys_enter_readv", "syscalls", "sys_enter_readv"),
    ("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("sys_exit_write", "syscalls", "sys_exit_write"),
    ("sys_exit_sendto", "syscalls", "sys_exit_sendto"),
    ("sys_exit_writev", "syscalls", "sys_exit_writev"),
    ("sys_exit_sendmsg", "syscalls", "sys_exit_sendmsg"),
    ("sys_exit_read", "syscalls", "sys_exit_read"),
    ("sys_exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
    ("sys_exit_readv", "syscalls", "sys_exit_readv"),
    ("sys_exit_recvmsg", "syscalls", "sys_exit_recvmsg"),
];

/// What a ring-buffer record is: [`EventHeader::kind`] holds it as a `u32`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A connect() syscall finished (successfully, in progress, or failed).
    Connect = 1,
    /// A tracked TCP socket changed state (established, peer closed, failed).
    SockState = 2,
    /// A tracked fd was closed.
    Close = 3,
    /// The last thread of a process exited.
    ProcessExit = 4,
    /// Bytes a tracked socket sent or received.
    Data = 5,
}

impl RecordKind {
    /// The kind an `EventHeader::kind` names, if any.
    pub const fn from_u32(value: u32) -> Option<RecordKind> {
        use RecordKind::*;
        Some(match value {
            v if v == Connect as u32 => Connect,
            v if v == SockState as u32 => SockState,
            v if v == Close as u32 => Close,
            v if v == ProcessExit as u32 => ProcessExit,
            v if v == Data as u32 => Data,
            _ => return None,
        })
    }
}

/// Indices into the per-CPU `STATS` array.
pub mod stat {
    /// Events that could not be reserved in the ring buffer.
    pub const DROPPED_EVENTS: u32 = 0;
    /// Bytes waiting in the ring buffer, sampled at the last emit on this CPU.
    pub const RINGBUF_PENDING_BYTES: u32 = 1;
    /// Connect attempts that could not be remembered (PENDING map full/failed).
    pub const PENDING_INSERT_FAILED: u32 = 2;
    /// Data events lost because the ring buffer was full (also in DROPPED_EVENTS).
    pub const DROPPED_DATA_EVENTS: u32 = 3;
    /// Connections not tracked because CONNS or SOCKS was full.
    pub const CONNS_FULL: u32 = 4;
    /// Socket I/O, by a process that tracks a connection, that the socket
    /// path could not attribute to an fd (io_uring, sendfile, sendmmsg...).
    pub const UNREADABLE_SOCKET_IO: u32 = 5;
    /// TCP connects that were not made by connect() (io_uring, TCP Fast
    /// Open through sendto/sendmsg): no fd to name them by, so not tracked.
    pub const UNATTRIBUTED_CONNECTS: u32 = 6;
    /// TLS library reads/writes, by a process that tracks a connection,
    /// whose connection could not be told: the call moved no bytes on a
    /// socket and its session was never seen to (or its connection ended).
    pub const UNATTRIBUTED_TLS_CALLS: u32 = 7;
    /// TLS library calls not remembered (TLS_CALLS full or failed).
    pub const TLS_CALLS_FAILED: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Address families as the kernel numbers them.
pub mod family {
    pub const UNIX: u16 = 1;
    pub const INET: u16 = 2;
    pub const INET6: u16 = 10;
}

/// TCP states as numbered by `sock:inet_sock_set_state`.
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const FIN_WAIT1: i32 = 4;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
}

/// Bits of [`SockStateEvent::flags`] and [`SockOwner::flags`].
pub mod sock_flags {
    /// The peer answered with a RST: a connect that fails after it was refused.
    pub const RESET_RECEIVED: u16 = 1;
    /// Userspace stopped copying this connection (not a database): the
    /// socket path leaves at the SOCKS lookup for it.
    pub const NOT_CAPTURED: u16 = 2;
}

/// The `ret` of connect() for a non-blocking socket whose handshake goes on.
pub const EINPROGRESS: i64 = -115;

pub const COMM_LEN: usize = 16;
/// Most bytes copied from the start of one read/write buffer. The loader may
/// lower it (CAPTURE_HEAD_BYTES); the struct is sized for the maximum.
pub const HEAD_MAX: usize = 4096;
/// Bytes copied from the end of a buffer longer than the head: enough for
/// end-of-response markers (ReadyForQuery, MySQL's final OK/EOF).
pub const TAIL_MAX: usize = 64;
/// Room for the data of the largest data event: a full head and a tail.
pub const DATA_BUF: usize = HEAD_MAX + TAIL_MAX;

/// Which syscall family moved the bytes.
pub mod io_kind {
    /// read/write/recvfrom/sendto: one plain buffer.
    pub const BUFFER: u8 = 0;
    /// readv/writev: an iovec array.
    pub const IOVEC: u8 = 1;
    /// recvmsg/sendmsg: a msghdr with an iovec array.
    pub const MSGHDR: u8 = 2;
}

/// Where a data event's bytes were read: [`DataEvent::source`].
pub mod data_source {
    /// The socket's bytes, as a send/receive moved them.
    pub const SOCKET: u8 = 0;
    /// The plaintext a TLS library call was given or returned, on the
    /// connection whose socket that library encrypts.
    pub const TLS_LIBRARY: u8 = 1;
}

/// TLS library functions hooked, as (entry program, symbol): each point
/// where a program attaches carries the arguments and result of one of
/// these. `_ex` forms report the byte count through a pointer argument
/// instead of the return value.
pub const TLS_UPROBES: &[(&str, &str)] = &[
    ("ssl_write_enter", "SSL_write"),
    ("ssl_write_ex_enter", "SSL_write_ex"),
    ("ssl_read_enter", "SSL_read"),
    ("ssl_read_ex_enter", "SSL_read_ex"),
];
/// The return probe every entry point gets too.
pub const TLS_EXIT_PROGRAM: &str = "ssl_call_exit";

/// Direction of a data event.
pub mod direction {
    /// The process wrote: a request to its server.
    pub const SEND: u8 = 0;
    /// The process read: a response from its server.
    pub const RECV: u8 = 1;
}
pub const UNIX_PATH_LEN: usize = 108;

/// Header of every ring-buffer event.
///
/// `conn_start_ns` is the kernel time at which the connect() that created the
/// connection began: together with (tgid, fd) it names one connection, so that
/// a reused fd number is never mistaken for the connection it replaced. It is
/// 0 for connections that userspace seeded from /proc.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    pub ts_ns: u64,
    pub conn_start_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// connect()'s return value: 0, -EINPROGRESS or -errno.
    pub ret: i64,
    pub family: u16,
    /// Remote port, host byte order (0 for Unix sockets).
    pub port: u16,
    /// Bytes of `path` that are meaningful (Unix sockets).
    pub path_len: u16,
    pub _pad0: u16,
    /// Remote address: 4 bytes for IPv4, 16 for IPv6, network order.
    pub addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    pub path: [u8; UNIX_PATH_LEN],
    pub _pad1: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStateEvent {
    /// tgid/fd/conn_start_ns are 0 when the socket is not one we saw connect
    /// (for instance one seeded from /proc); userspace matches those by address.
    pub header: EventHeader,
    pub skaddr: u64,
    pub old_state: i32,
    pub new_state: i32,
    pub family: u16,
    /// Local and remote ports, host byte order.
    pub sport: u16,
    pub dport: u16,
    /// `sock_flags` bits, e.g. whether the peer answered with a reset.
    pub flags: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseEvent {
    pub header: EventHeader,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessExitEvent {
    pub header: EventHeader,
    pub comm: [u8; COMM_LEN],
}

/// Data a tracked socket moved: `data` holds `head_len` bytes of the head
/// followed by `tail_len` bytes of the tail; the rest of `data` is not
/// written. The kernel reserves the smallest of a few sizes `N` that holds
/// what it copies (so that it copies straight into the ring buffer), hence a
/// record may be longer than `DATA_EVENT_FIXED + head_len + tail_len`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent<const N: usize = DATA_BUF> {
    pub header: EventHeader,
    /// When the syscall began (header.ts_ns is when it returned). The socket
    /// path sees only the end of a send or receive: there both are that time.
    pub enter_ns: u64,
    /// Bytes the syscall transferred.
    pub total_len: u32,
    pub head_len: u16,
    pub tail_len: u16,
    pub direction: u8,
    pub io_kind: u8,
    /// `data_source`: the socket's bytes or a TLS library's plaintext.
    pub source: u8,
    pub _pad0: [u8; 5],
    pub data: [u8; N],
}

/// Size of `DataEvent` without `data`.
pub const DATA_EVENT_FIXED: usize = 32 + 8 + 4 + 2 + 2 + 1 + 1 + 1 + 5;

/// A read/write in flight on a tracked fd, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoArgs {
    pub enter_ns: u64,
    pub conn_start_ns: u64,
    /// Buffer, iovec array or msghdr, per `io_kind`.
    pub ptr: u64,
    pub iov_count: u64,
    pub fd: i32,
    pub direction: u8,
    pub io_kind: u8,
    pub _pad0: u16,
    /// Head bytes to copy (from the connection's ConnInfo).
    pub capture_bytes: u32,
    pub _pad1: u32,
}

/// Key of the kernel's live-connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the kernel's live-connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn_start_ns: u64,
    /// `conn_flags` bits.
    pub flags: u32,
    /// Head bytes to copy per read/write; 0 means the loader's default
    /// (CAPTURE_HEAD_BYTES), used until userspace knows the protocol.
    pub capture_bytes: u32,
}

/// Bits of [`ConnInfo::flags`].
pub mod conn_flags {
    /// Copy this connection's reads and writes. Userspace clears it once it
    /// knows the connection speaks no database protocol, so that such
    /// connections cost one map lookup per syscall and nothing more.
    pub const CAPTURE_DATA: u32 = 1;
    /// The syscall data path copies this connection (set on every
    /// connection when that path is the one in use).
    pub const SYSCALL_COPY: u32 = 2;
    /// `sys_enter_close` ends this connection (Unix sockets). TCP
    /// connections end at their state changes instead.
    pub const CLOSE_BY_SYSCALL: u32 = 4;
    /// A hooked TLS library encrypts this connection: its plaintext is
    /// copied at the library's calls, its socket bytes (ciphertext) not.
    pub const TLS_PLAINTEXT: u32 = 8;
}

/// A thread's TLS library read or write: the one in flight while
/// `in_call` is 1, else the last one (kept, so that the next call writes
/// the entry in place instead of inserting and deleting it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCall {
    /// The library's session object (`SSL *`).
    pub session: u64,
    /// The caller's plaintext buffer.
    pub buf: u64,
    /// Where `_ex` calls store the byte count; 0 for the others.
    pub len_ptr: u64,
    /// The connection whose socket the call moved bytes on, once seen
    /// (`fd` -1 until then).
    pub conn_start_ns: u64,
    pub fd: i32,
    pub direction: u8,
    /// `tls_flags` bits.
    pub flags: u8,
    /// 1 from the call's entry to its return.
    pub in_call: u8,
    pub _pad0: u8,
}

/// Bits of [`TlsCall::flags`] and [`TlsSession::flags`].
pub mod tls_flags {
    /// The session's connection is not a database's (or not tracked): its
    /// calls leave at their entry for a while.
    pub const NOT_DATABASE: u8 = 1;
}

/// Calls of a session found not to be a database's that leave at their
/// entry after one lookup, before the session is looked at again (its
/// `SSL *` may have been freed and reused for another connection).
pub const TLS_NOT_DATABASE_SKIPS: u16 = 256;

/// Key of the TLS session -> connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsSessionKey {
    pub tgid: u32,
    pub _pad0: u32,
    /// The library's session object (`SSL *`).
    pub session: u64,
}

/// The connection a TLS session was last seen moving bytes on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsSession {
    pub conn_start_ns: u64,
    pub fd: i32,
    /// `tls_flags` bits (as u16 so that the struct has no padding).
    pub flags: u16,
    /// NOT_DATABASE sessions: calls left to skip before looking again.
    pub skips_left: u16,
}

/// A connect() in flight, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingConnect {
    pub start_ns: u64,
    pub uservaddr: u64,
    pub fd: i32,
    pub addrlen: u32,
    pub family: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// Who owns a kernel socket, recorded when its connect() sent the SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    pub tgid: u32,
    pub fd: i32,
    pub conn_start_ns: u64,
    /// `sock_flags` bits seen on this socket so far.
    pub flags: u32,
    pub _pad0: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are plain-old-data #[repr(C)] structs whose every
    // bit pattern is valid and which have no implicit padding.
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnInfo {}
    unsafe impl aya::Pod for PendingConnect {}
    unsafe impl aya::Pod for SockOwner {}
    unsafe impl aya::Pod for IoArgs {}
    unsafe impl aya::Pod for TlsCall {}
    unsafe impl aya::Pod for TlsSessionKey {}
    unsafe impl aya::Pod for TlsSession {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel writes these sizes; a change here is a wire-format change.
    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<EventHeader>(), 32);
        assert_eq!(size_of::<ConnectEvent>(), 32 + 8 + 8 + 16 + 16 + 108 + 4);
        assert_eq!(size_of::<SockStateEvent>(), 32 + 8 + 8 + 8 + 32);
        assert_eq!(size_of::<CloseEvent>(), 32);
        assert_eq!(size_of::<ProcessExitEvent>(), 48);
        assert_eq!(size_of::<PendingConnect>(), 32);
        assert_eq!(size_of::<SockOwner>(), 24);
        assert_eq!(size_of::<DataEvent>(), DATA_EVENT_FIXED + DATA_BUF);
        assert_eq!(size_of::<IoArgs>(), 48);
        assert_eq!(size_of::<ConnInfo>(), 16);
        assert_eq!(size_of::<DataEvent<64>>(), DATA_EVENT_FIXED + 64);
        assert_eq!(size_of::<TlsCall>(), 40);
        assert_eq!(size_of::<TlsSessionKey>(), 16);
        assert_eq!(size_of::<TlsSession>(), 16);
        assert!(HEAD_MAX.is_power_of_two());
    }
}
