//! The syscall data path: the fallback for kernels where the socket path
//! (`sock_io`) cannot load. On it every read/write syscall on the host pays
//! one CONNS lookup at entry; only tracked fds pay more. Entry remembers the
//! buffer per thread; exit, once the byte count is known, copies the bytes
//! into a ring-buffer record (`copy`).

use agent_common::{
    conn_flags, data_source, direction, io_kind, tracked_procs_slot, ConnKey, IoArgs,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    copy::{head_limit, send_data_event, UserIo},
    maps::{CONNS, IO_ARGS, TRACKED_PROCS},
    tls::{claim_tls_io, tls_call_in_flight},
    SYSCALL_ARG0, SYSCALL_ARG1, SYSCALL_ARG2, SYSCALL_RET,
};

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
    let marks = TRACKED_PROCS
        .get(tracked_procs_slot(key.tgid))
        .copied()
        .unwrap_or(0);
    if let Some(call) = tls_call_in_flight(pid_tgid, marks) {
        claim_tls_io(call, key);
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
