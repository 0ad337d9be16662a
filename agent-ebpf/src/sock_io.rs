//! The socket data path (default): raw tracepoints at the end of every socket
//! send and receive (`sock_send_length`, `sock_recv_length`).
//!
//! Why not the syscall tracepoints: a per-call tracepoint on read/write fires
//! for every file, pipe and socket of every process, and its cost is paid
//! before any program runs. These fire only for socket I/O, in the caller's
//! context, after the bytes moved. They carry no fd or buffer, but the
//! syscall's saved user registers do: the syscall number tells which call it
//! is, and its arguments name the fd and the user buffer, which for a receive
//! now holds the bytes just read.
//!
//! Cost, in order: processes that track no connection leave after one array
//! load; their other sockets after one SOCKS lookup; their connections pay
//! one register read and one CONNS lookup; only database connections pay
//! for the copy.

use agent_common::{
    conn_flags, data_source, direction, io_kind, sock_flags, stat, tracked_procs,
    tracked_procs_slot, ConnKey,
};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext,
};

use crate::{
    arch,
    copy::{head_limit, send_data_event, UserIo},
    maps::{CONNS, SOCKS, TRACKED_PROCS},
    stat_add, syscall_regs,
    tls::{claim_tls_io, note_tls_receive, tls_call_in_flight},
    SyscallRegs,
};

/// `MSG_PEEK`: the bytes stay queued and will be read again.
const MSG_PEEK: i32 = 2;

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
    let _ = on_socket_io(&ctx, direction::SEND);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    let _ = on_socket_io(&ctx, direction::RECV);
    0
}

/// Where a data syscall's first argument is the fd and its second the
/// bytes: which form the bytes take. None for any other syscall.
fn data_syscall_kind(nr: u64) -> Option<u8> {
    match nr {
        arch::READ | arch::WRITE | arch::SENDTO | arch::RECVFROM => Some(io_kind::BUFFER),
        arch::READV | arch::WRITEV => Some(io_kind::IOVEC),
        arch::SENDMSG | arch::RECVMSG => Some(io_kind::MSGHDR),
        _ => None,
    }
}

/// TP_PROTO(struct sock *sk, int ret, int flags).
fn on_socket_io(ctx: &RawTracePointContext, dir: u8) -> Result<(), i64> {
    let ret = ctx.arg::<u64>(1) as i32;
    if ret <= 0 {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let marks = match TRACKED_PROCS.get(tracked_procs_slot(tgid)) {
        Some(&marks) if marks != 0 => marks,
        _ => return Ok(()),
    };
    if dir == direction::RECV && ctx.arg::<u64>(2) as i32 & MSG_PEEK != 0 {
        return Ok(());
    }
    // Inside a TLS library's call: the call's connection, and ciphertext.
    if let Some(call) = tls_call_in_flight(pid_tgid, marks) {
        let regs = syscall_regs()?;
        if data_syscall_kind(regs.nr).is_some() {
            let key = ConnKey {
                tgid,
                fd: regs.arg0 as u32,
            };
            claim_tls_io(call, key);
        } else {
            stat_add(stat::UNREADABLE_SOCKET_IO, 1);
        }
        return Ok(());
    }
    // A socket this process connected while we watched is in SOCKS; others
    // (its listening side, sockets it accepted) leave here, before the
    // costlier register read, unless it also owns connections that SOCKS
    // cannot know.
    let sk = ctx.arg::<u64>(0);
    let owner = SOCKS.get_ptr_mut(sk);
    match owner {
        // SAFETY: pointer into this socket's map entry, read once.
        Some(owner) if unsafe { (*owner).flags } & u32::from(sock_flags::NOT_CAPTURED) != 0 => {
            return Ok(());
        }
        None if marks & tracked_procs::UNBOUND == 0 => return Ok(()),
        _ => {}
    }
    let SyscallRegs {
        nr,
        arg0: di,
        arg1: si,
    } = syscall_regs()?;
    let Some(kind) = data_syscall_kind(nr) else {
        // io_uring, sendfile, sendmmsg, a kernel thread...: the bytes are
        // not where a syscall argument says, nor is the fd. Counted (for
        // any socket of a process that tracks one), not guessed.
        stat_add(stat::UNREADABLE_SOCKET_IO, 1);
        return Ok(());
    };
    let key = ConnKey {
        tgid,
        fd: di as u32,
    };
    // SAFETY: the value is copied out immediately.
    let info = match unsafe { CONNS.get(key) } {
        Some(info) => *info,
        None => return Ok(()),
    };
    if dir == direction::RECV
        && kind == io_kind::BUFFER
        && marks & tracked_procs::IN_TLS != 0
        && info.flags & conn_flags::CAPTURE_DATA != 0
    {
        note_tls_receive(pid_tgid, key.fd as i32, info.conn_start_ns, si);
    }
    // Connections assigned to the syscall path are copied there, those
    // whose TLS library is hooked at its calls.
    if info.flags
        & (conn_flags::CAPTURE_DATA | conn_flags::SYSCALL_COPY | conn_flags::TLS_PLAINTEXT)
        != conn_flags::CAPTURE_DATA
    {
        if info.flags & conn_flags::CAPTURE_DATA == 0 {
            if let Some(owner) = owner {
                // Not a database: its next I/O leaves at the SOCKS lookup.
                // SAFETY: pointer into this socket's map entry; a racing
                // writer only sets bits too.
                unsafe { (*owner).flags |= u32::from(sock_flags::NOT_CAPTURED) };
            }
        }
        return Ok(());
    }
    send_data_event(
        &UserIo {
            pid_tgid,
            fd: di as i32,
            conn_start_ns: info.conn_start_ns,
            capture_bytes: head_limit(info.capture_bytes),
            direction: dir,
            io_kind: kind,
            ptr: si,
            enter_ns: 0,
            source: data_source::SOCKET,
        },
        ret as u64,
    )
}
