//! Data capture on tracked sockets: the head (and for long plain buffers the
//! tail) of every read/write, with byte counts and timestamps.
//!
//! This file holds the copy both data paths share, and the syscall path: the
//! fallback for kernels where the socket path (`sock_io`) cannot load. On it
//! every read/write syscall on the host pays one CONNS lookup at entry; only
//! tracked fds pay more. Entry remembers the buffer per thread; exit, once the
//! byte count is known, copies the bytes into a ring-buffer record.

use core::ptr::addr_of_mut;

use agent_common::{
    conn_flags, data_source, direction, io_kind, stat, ConnKey, DataEvent, IoArgs, RecordKind,
    HEAD_MAX, TAIL_MAX,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    data_wakeup_flag, header,
    maps::{CONNS, EVENTS, IO_ARGS},
    stat_add,
    tls::claim_tls_io,
    BPF_RB_NO_WAKEUP, SYSCALL_ARG0, SYSCALL_ARG1, SYSCALL_ARG2, SYSCALL_RET,
};

/// Head bytes to copy while a connection's protocol is not known yet; the
/// loader sets it, userspace sets a per-connection value once it knows.
#[no_mangle]
static CAPTURE_HEAD_BYTES: u32 = 4096;

/// The head limit for a connection: its own, else the default.
pub(crate) fn head_limit(per_connection: u32) -> u32 {
    if per_connection != 0 {
        return per_connection;
    }
    // SAFETY: a read-only global that the loader patches before load.
    unsafe { core::ptr::read_volatile(&CAPTURE_HEAD_BYTES) }
}

/// Connections this path copies: capturing, and assigned to this path.
const COPIED_HERE: u32 = conn_flags::CAPTURE_DATA | conn_flags::SYSCALL_COPY;

fn io_enter(ctx: &TracePointContext, dir: u8, io: u8) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: offsets from the syscalls' format files (all args are 8 bytes).
    let fd: u64 = unsafe { ctx.read_at(SYSCALL_ARG0) }.map_err(i64::from)?;
    let key = ConnKey {
        tgid: (pid_tgid >> 32) as u32,
        fd: fd as u32,
    };
    // SAFETY: the value is copied out immediately.
    let info = match unsafe { CONNS.get(key) } {
        Some(info) => *info,
        None => return Ok(()),
    };
    // A TLS library's I/O: its plaintext is copied at the library's call.
    if claim_tls_io(pid_tgid, key) {
        return Ok(());
    }
    if info.flags & (COPIED_HERE | conn_flags::TLS_PLAINTEXT) != COPIED_HERE {
        return Ok(());
    }
    let (conn_start_ns, capture_bytes) = (info.conn_start_ns, head_limit(info.capture_bytes));
    let ptr: u64 = unsafe { ctx.read_at(SYSCALL_ARG1) }.map_err(i64::from)?;
    let iov_count: u64 = if io == io_kind::IOVEC {
        unsafe { ctx.read_at(SYSCALL_ARG2) }.map_err(i64::from)?
    } else {
        0
    };
    let args = IoArgs {
        // SAFETY: helper without preconditions.
        enter_ns: unsafe { bpf_ktime_get_ns() },
        conn_start_ns,
        ptr,
        iov_count,
        fd: fd as i32,
        direction: dir,
        io_kind: io,
        _pad0: 0,
        capture_bytes,
        _pad1: 0,
    };
    let _ = IO_ARGS.insert(pid_tgid, args, 0);
    Ok(())
}

/// The first buffer of an iovec array: (base, length).
fn first_iovec(iov: u64) -> Result<(u64, u64), i64> {
    // SAFETY: bpf_probe_read_user checks the user pointer; struct iovec is
    // { void *iov_base; size_t iov_len; }.
    let pair: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }?;
    Ok((pair[0], pair[1]))
}

fn io_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let args = match unsafe { IO_ARGS.get(pid_tgid) } {
        Some(a) => *a,
        None => return Ok(()),
    };
    let _ = IO_ARGS.remove(pid_tgid);
    // SAFETY: offset from the format file.
    let ret: i64 = unsafe { ctx.read_at(SYSCALL_RET) }.map_err(i64::from)?;
    if ret <= 0 {
        // EAGAIN, EOF or an error: no bytes moved.
        return Ok(());
    }
    send_data_event(
        &UserIo {
            pid_tgid,
            fd: args.fd,
            conn_start_ns: args.conn_start_ns,
            capture_bytes: args.capture_bytes,
            direction: args.direction,
            io_kind: args.io_kind,
            ptr: args.ptr,
            enter_ns: args.enter_ns,
            source: data_source::SOCKET,
        },
        ret as u64,
    )
}

/// One finished read or write of a tracked connection, as the user made it.
pub(crate) struct UserIo {
    pub pid_tgid: u64,
    pub fd: i32,
    pub conn_start_ns: u64,
    /// Head bytes to copy (already resolved against the default).
    pub capture_bytes: u32,
    pub direction: u8,
    pub io_kind: u8,
    /// Buffer, iovec array or msghdr in user memory, per `io_kind`.
    pub ptr: u64,
    pub enter_ns: u64,
    /// `data_source`: socket bytes or a TLS library's plaintext.
    pub source: u8,
}

/// Copies the head (and for long plain buffers the tail) of `total` bytes
/// that `io` moved into a data event. Shared by both data paths, so that
/// userspace sees the same events whichever is attached.
pub(crate) fn send_data_event(io: &UserIo, total: u64) -> Result<(), i64> {
    // Where the bytes are, and how many are contiguous there. For vectored
    // I/O only the first buffer is copied and no tail is taken.
    let (buf, contiguous) = match io.io_kind {
        io_kind::BUFFER => (io.ptr, total),
        io_kind::IOVEC => first_iovec(io.ptr)?,
        _ => {
            // struct user_msghdr: msg_iov at offset 16.
            // SAFETY: bpf_probe_read_user checks the user pointer.
            let iov: u64 = unsafe { bpf_probe_read_user((io.ptr + 16) as *const u64) }?;
            first_iovec(iov)?
        }
    };
    let contiguous = if contiguous > total {
        total
    } else {
        contiguous
    };

    let mut head = contiguous;
    let limit = u64::from(io.capture_bytes);
    if head > limit {
        head = limit;
    }
    let head = if head > HEAD_MAX as u64 {
        HEAD_MAX
    } else {
        head as usize
    };
    let mut tail = 0usize;
    if io.io_kind == io_kind::BUFFER && total > head as u64 {
        let rest = total - head as u64;
        tail = if rest > TAIL_MAX as u64 {
            TAIL_MAX
        } else {
            rest as usize
        };
    }
    // The smallest record that holds the copy: the bytes go straight from
    // the user's buffer into the ring buffer, and short messages (most Redis
    // requests and replies, short SQL) use little of it.
    let copy = Copy {
        io,
        buf,
        total,
        head,
        tail,
    };
    if tail == 0 && head <= 64 {
        copy.emit::<64, 64>()
    } else if head <= 256 {
        copy.emit::<256, { 256 + TAIL_MAX }>()
    } else if head <= 1024 {
        copy.emit::<1024, { 1024 + TAIL_MAX }>()
    } else {
        copy.emit::<HEAD_MAX, { HEAD_MAX + TAIL_MAX }>()
    }
}

/// What to copy of one read/write: `head` bytes from `buf` and the last
/// `tail` of its `total` bytes.
struct Copy<'a> {
    io: &'a UserIo,
    buf: u64,
    total: u64,
    head: usize,
    tail: usize,
}

impl Copy<'_> {
    /// Reserves a record with room for `H` head bytes and `N - H` tail
    /// bytes, copies into it and sends it.
    #[inline(always)]
    fn emit<const H: usize, const N: usize>(&self) -> Result<(), i64> {
        const { assert!(H.is_power_of_two() && N >= H && N - H <= TAIL_MAX) };
        let Some(mut entry) = EVENTS.reserve::<DataEvent<N>>(0) else {
            stat_add(stat::DROPPED_EVENTS, 1);
            stat_add(stat::DROPPED_DATA_EVENTS, 1);
            return Ok(());
        };
        // Constant clamps the verifier can see: head <= H, tail <= N - H.
        // The compiler knows the caller's bounds and would drop them, while
        // the verifier may have lost those bounds: hide the values from it.
        let head = core::hint::black_box(self.head) & (H * 2 - 1);
        let head = if head > H { H } else { head };
        let tail = core::hint::black_box(self.tail) & (TAIL_MAX * 2 - 1);
        let tail = if tail > N - H { N - H } else { tail };
        let event = entry.as_mut_ptr();
        // SAFETY: `event` is the reserved record, which the kernel sized for
        // DataEvent<N>; head + tail <= N; the helpers check the user
        // pointers.
        unsafe {
            let dst = (*event).data.as_mut_ptr();
            if generated::bpf_probe_read_user(dst.cast(), head as u32, self.buf as *const _) != 0 {
                entry.discard(BPF_RB_NO_WAKEUP);
                return Ok(());
            }
            if tail > 0 {
                let src = (self.buf + self.total - tail as u64) as *const _;
                if generated::bpf_probe_read_user(dst.add(head).cast(), tail as u32, src) != 0 {
                    entry.discard(BPF_RB_NO_WAKEUP);
                    return Ok(());
                }
            }
            let io = self.io;
            let header = header(RecordKind::Data, io.pid_tgid, io.fd, io.conn_start_ns);
            let enter_ns = if io.enter_ns == 0 {
                header.ts_ns
            } else {
                io.enter_ns
            };
            addr_of_mut!((*event).header).write(header);
            addr_of_mut!((*event).enter_ns).write(enter_ns);
            addr_of_mut!((*event).total_len).write(if self.total > u32::MAX as u64 {
                u32::MAX
            } else {
                self.total as u32
            });
            addr_of_mut!((*event).head_len).write(head as u16);
            addr_of_mut!((*event).tail_len).write(tail as u16);
            addr_of_mut!((*event).direction).write(io.direction);
            addr_of_mut!((*event).io_kind).write(io.io_kind);
            addr_of_mut!((*event).source).write(io.source);
            addr_of_mut!((*event)._pad0).write([0; 5]);
        }
        entry.submit(data_wakeup_flag());
        Ok(())
    }
}

macro_rules! io_programs {
    ($($enter:ident, $exit:ident, $dir:expr, $kind:expr;)*) => {$(
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            let _ = io_enter(&ctx, $dir, $kind);
            0
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            let _ = io_exit(&ctx);
            0
        }
    )*};
}

io_programs! {
    sys_enter_write, sys_exit_write, direction::SEND, io_kind::BUFFER;
    sys_enter_sendto, sys_exit_sendto, direction::SEND, io_kind::BUFFER;
    sys_enter_writev, sys_exit_writev, direction::SEND, io_kind::IOVEC;
    sys_enter_sendmsg, sys_exit_sendmsg, direction::SEND, io_kind::MSGHDR;
    sys_enter_read, sys_exit_read, direction::RECV, io_kind::BUFFER;
    sys_enter_recvfrom, sys_exit_recvfrom, direction::RECV, io_kind::BUFFER;
    sys_enter_readv, sys_exit_readv, direction::RECV, io_kind::IOVEC;
    sys_enter_recvmsg, sys_exit_recvmsg, direction::RECV, io_kind::MSGHDR;
}
