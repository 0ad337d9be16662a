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
}

/// The kernel programs, as (program name, tracepoint category, tracepoint name).
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
];

/// Event kinds carried in [`EventHeader::kind`].
pub mod kind {
    /// A connect() syscall finished (successfully, in progress, or failed).
    pub const CONNECT: u32 = 1;
    /// A tracked TCP socket changed state (established, peer closed, failed).
    pub const SOCK_STATE: u32 = 2;
    /// A tracked fd was closed.
    pub const CLOSE: u32 = 3;
    /// The last thread of a process exited.
    pub const PROCESS_EXIT: u32 = 4;
}

/// Indices into the per-CPU `STATS` array.
pub mod stat {
    /// Events that could not be reserved in the ring buffer.
    pub const DROPPED_EVENTS: u32 = 0;
    /// Bytes waiting in the ring buffer, sampled at the last emit on this CPU.
    pub const RINGBUF_PENDING_BYTES: u32 = 1;
    /// Connect attempts that could not be remembered (PENDING map full/failed).
    pub const PENDING_INSERT_FAILED: u32 = 2;
    pub const COUNT: u32 = 4;
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
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
}

/// Bits of [`SockStateEvent::flags`] and [`SockOwner::flags`].
pub mod sock_flags {
    /// The peer answered with a RST: a connect that fails after it was refused.
    pub const RESET_RECEIVED: u16 = 1;
}

/// The `ret` of connect() for a non-blocking socket whose handshake goes on.
pub const EINPROGRESS: i64 = -115;

pub const COMM_LEN: usize = 16;
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
    /// Set when the TCP stack moved this thread's socket to SYN_SENT, which
    /// tells TCP apart from a UDP connect().
    pub saw_syn_sent: u16,
    pub _pad0: u32,
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
    }
}
