//! poolscope's kernel programs: tracepoints, and uprobes on TLS libraries,
//! because they load on every kernel we target (kprobes and fentry are often
//! disabled or refused).
//!
//! Each program follows `fn prog(ctx) -> u32 { try_prog(ctx).unwrap_or(0) }`:
//! a failed map operation or read is dropped silently in the kernel and shows
//! up in userspace as a missing event or a counted drop, never as a stall.
#![no_std]
#![no_main]

mod copy;
mod io;
mod maps;
mod sock_io;
mod tls;

use agent_common::{
    conn_flags, family, sock_flags, stat, tcp_state, CloseEvent, ConnInfo, ConnKey, ConnectEvent,
    EventHeader, PendingConnect, ProcessExitEvent, RecordKind, SockOwner, SockStateEvent, COMM_LEN,
    EINPROGRESS, UNIX_PATH_LEN,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_user_buf, generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use maps::{CONNS, EVENTS, PENDING, SOCKS, STATS, TRACKED_PROCS};

/// 1 when the syscall data path is the one in use, so that it copies every
/// connection; 0 when the socket path copies them.
#[no_mangle]
static SYSCALL_PATH_FOR_ALL: u32 = 0;

/// Flags of a new connection: which data path copies it.
fn new_conn_flags(addr_family: u16) -> u32 {
    // SAFETY: a read-only global that the loader patches before load.
    let for_all = unsafe { core::ptr::read_volatile(&SYSCALL_PATH_FOR_ALL) } != 0;
    let close = if addr_family == family::UNIX {
        conn_flags::CLOSE_BY_SYSCALL
    } else {
        0
    };
    if for_all {
        conn_flags::CAPTURE_DATA | conn_flags::SYSCALL_COPY | close
    } else {
        conn_flags::CAPTURE_DATA | close
    }
}

/// The agent's own tgid, set by the loader, so that its own sockets are ignored.
#[no_mangle]
static AGENT_TGID: u32 = 0;

/// `bpf_ringbuf_query` flag: bytes not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// `bpf_ringbuf_output` flags.
pub(crate) const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Data events wake the reader only once this many bytes wait; below it the
/// reader's own timer collects them. A wakeup per query would cost the host
/// a context switch per query. Set by the loader from the ring buffer size.
#[no_mangle]
static WAKEUP_BYTES: u64 = 65536;

/// Wakeup flag for a data event: none until enough bytes wait.
pub(crate) fn data_wakeup_flag() -> u64 {
    // SAFETY: a read-only global that the loader patches before load.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Offsets of `sys_enter_*` / `sys_exit_*` arguments (see the tracepoint's format file).
pub(crate) const SYSCALL_ARG0: usize = 16;
pub(crate) const SYSCALL_ARG1: usize = 24;
pub(crate) const SYSCALL_ARG2: usize = 32;
pub(crate) const SYSCALL_RET: usize = 16;

const IPPROTO_TCP: u16 = 6;

/// Syscall numbers and the saved-register layout (`struct pt_regs`) of the
/// target architecture.
#[cfg(bpf_target_arch = "x86_64")]
pub(crate) mod arch {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const CLOSE: u64 = 3;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const CONNECT: u64 = 42;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const SHUTDOWN: u64 = 48;
    /// Offsets in `struct pt_regs` of the first two syscall arguments and
    /// the syscall number.
    pub const REGS_SI_OFFSET: usize = 104;
    pub const REGS_DI_OFFSET: usize = 112;
    pub const REGS_ORIG_AX_OFFSET: usize = 120;
}

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("the kernel programs know the syscall registers of x86_64 only");

/// The syscall the current task is in, as its saved user registers tell.
pub(crate) struct SyscallRegs {
    pub nr: u64,
    pub arg0: u64,
    pub arg1: u64,
}

#[inline(always)]
pub(crate) fn syscall_regs() -> Result<SyscallRegs, i64> {
    // SAFETY: helpers without preconditions; the kernel checks that the
    // task pointer is the BTF-typed current task.
    let regs = unsafe { generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) };
    // The helper returns a BTF-typed pointer to `struct pt_regs`: the
    // verifier lets its members be loaded directly (a fault-handled load),
    // which costs less than a bpf_probe_read_kernel call.
    let at = |offset: usize| {
        // SAFETY: a member of struct pt_regs, 8 bytes; the kernel checks
        // the offset against the BTF type and handles a fault.
        unsafe { core::ptr::read_volatile((regs as usize + offset) as *const u64) }
    };
    let (si, di, nr) = (
        at(arch::REGS_SI_OFFSET),
        at(arch::REGS_DI_OFFSET),
        at(arch::REGS_ORIG_AX_OFFSET),
    );
    Ok(SyscallRegs {
        nr,
        arg0: di,
        arg1: si,
    })
}

/// Lets this process's socket I/O past the first filter. Only userspace
/// clears a slot (when no live process hashing to it tracks a connection).
fn mark_tracked_process(tgid: u32) {
    if let Some(slot) = TRACKED_PROCS.get_ptr_mut(agent_common::tracked_procs_slot(tgid)) {
        // SAFETY: pointer into an array slot. One byte only (the low one on
        // this little-endian target): the UNBOUND byte is userspace's.
        unsafe { *slot.cast::<u8>() = agent_common::tracked_procs::TRACKS as u8 };
    }
}

fn agent_tgid() -> u32 {
    // SAFETY: a read-only global that the loader patches before load.
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

pub(crate) fn stat_add(index: u32, value: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += value };
    }
}

fn stat_set(index: u32, value: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot = value };
    }
}

/// Writes one event into the ring buffer, counting it as dropped when full.
fn emit<T: Copy + 'static>(event: &T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
            stat_set(stat::RINGBUF_PENDING_BYTES, EVENTS.query(BPF_RB_AVAIL_DATA));
        }
        None => stat_add(stat::DROPPED_EVENTS, 1),
    }
}

pub(crate) fn header(kind: RecordKind, pid_tgid: u64, fd: i32, conn_start_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn_start_ns,
    }
}

/// A connect event of the calling thread, its address still to fill in.
fn connect_event(header: EventHeader, ret: i64, family: u16, port: u16) -> ConnectEvent {
    ConnectEvent {
        header,
        ret,
        family,
        port,
        path_len: 0,
        _pad0: 0,
        addr: [0; 16],
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        path: [0; UNIX_PATH_LEN],
        _pad1: [0; 4],
    }
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_connect(&ctx);
    0
}

fn try_sys_enter_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return Ok(());
    }
    // SAFETY: offsets come from the tracepoint's format file.
    let fd: u64 = unsafe { ctx.read_at(SYSCALL_ARG0) }.map_err(i64::from)?;
    let uservaddr: u64 = unsafe { ctx.read_at(SYSCALL_ARG1) }.map_err(i64::from)?;
    let addrlen: u64 = unsafe { ctx.read_at(SYSCALL_ARG2) }.map_err(i64::from)?;
    // SAFETY: bpf_probe_read_user checks the user pointer.
    let addr_family: u16 = unsafe { bpf_probe_read_user(uservaddr as *const u16) }?;
    // TCP connects are seen at their SYN_SENT state change instead.
    if addr_family != family::UNIX {
        return Ok(());
    }
    let pending = PendingConnect {
        // SAFETY: helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        uservaddr,
        fd: fd as i32,
        addrlen: addrlen as u32,
        family: addr_family,
        _pad0: 0,
        _pad1: 0,
    };
    if PENDING.insert(pid_tgid, pending, 0).is_err() {
        stat_add(stat::PENDING_INSERT_FAILED, 1);
    }
    Ok(())
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_connect(&ctx);
    0
}

fn try_sys_exit_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let pending = match unsafe { PENDING.get(pid_tgid) } {
        Some(p) => *p,
        None => return Ok(()),
    };
    let _ = PENDING.remove(pid_tgid);
    // SAFETY: offset from the tracepoint's format file.
    let ret: i64 = unsafe { ctx.read_at(SYSCALL_RET) }.map_err(i64::from)?;
    if ret == 0 || ret == EINPROGRESS {
        let key = ConnKey {
            tgid: (pid_tgid >> 32) as u32,
            fd: pending.fd as u32,
        };
        let info = ConnInfo {
            conn_start_ns: pending.start_ns,
            flags: new_conn_flags(pending.family),
            capture_bytes: 0,
        };
        if CONNS.insert(key, info, 0).is_err() {
            stat_add(stat::CONNS_FULL, 1);
        }
        mark_tracked_process(key.tgid);
    }

    let mut event = connect_event(
        header(RecordKind::Connect, pid_tgid, pending.fd, pending.start_ns),
        ret,
        pending.family,
        0,
    );
    let sa = pending.uservaddr as *const u8;
    let len = (pending.addrlen as usize).saturating_sub(2);
    let len = if len > UNIX_PATH_LEN {
        UNIX_PATH_LEN
    } else {
        len
    };
    event.path_len = len as u16;
    // SAFETY: bpf_probe_read_user_buf checks the user pointer; the path
    // follows sockaddr_un's 2-byte family. A short sockaddr_un may end
    // before 108 bytes: read what is there.
    if unsafe { bpf_probe_read_user_buf(sa.add(2), &mut event.path) }.is_err() {
        let _ = unsafe { bpf_probe_read_user_buf(sa.add(2), &mut event.path[..64]) };
    }
    emit(&event);
    Ok(())
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY (all reads): offsets from sock/inet_sock_set_state/format.
    let protocol: u16 = unsafe { ctx.read_at(30) }.map_err(i64::from)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let skaddr: u64 = unsafe { ctx.read_at(8) }.map_err(i64::from)?;
    let old_state: i32 = unsafe { ctx.read_at(16) }.map_err(i64::from)?;
    let new_state: i32 = unsafe { ctx.read_at(20) }.map_err(i64::from)?;
    match new_state {
        tcp_state::SYN_SENT => on_tcp_connect(ctx, skaddr),
        // Only the owner's close() or shutdown() sends the first FIN, so
        // these run in its context, where its saved registers say which.
        tcp_state::FIN_WAIT1 | tcp_state::LAST_ACK => on_local_fin(skaddr),
        tcp_state::CLOSE if old_state != tcp_state::SYN_SENT => {
            // A reset, or the end of a socket that was shut down before its
            // close(): the connection is over, whatever the fd does next.
            // SAFETY: the value is copied out immediately.
            if let Some(owner) = unsafe { SOCKS.get(skaddr) }.copied() {
                let _ = SOCKS.remove(skaddr);
                emit_close(owner.tgid, owner.fd, owner.conn_start_ns, 0);
            }
            Ok(())
        }
        _ => on_tcp_state(ctx, skaddr, old_state, new_state),
    }
}

/// A TCP connect() sends its SYN: runs inside the call, in the caller's
/// context, so the fd is in its saved registers and the peer in the
/// tracepoint. Later state changes run in softirq context and find the
/// owner by socket.
fn on_tcp_connect(ctx: &TracePointContext, skaddr: u64) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == agent_tgid() {
        return Ok(());
    }
    let regs = syscall_regs()?;
    if regs.nr != arch::CONNECT {
        // io_uring or TCP Fast Open: the fd is not where connect() keeps it.
        stat_add(stat::UNATTRIBUTED_CONNECTS, 1);
        return Ok(());
    }
    let fd = regs.arg0 as i32;
    // SAFETY: helper without preconditions.
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let owner = SockOwner {
        tgid,
        fd,
        conn_start_ns: start_ns,
        flags: 0,
        _pad0: 0,
    };
    if SOCKS.insert(skaddr, owner, 0).is_err() {
        stat_add(stat::CONNS_FULL, 1);
        return Ok(());
    }
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    let info = ConnInfo {
        conn_start_ns: start_ns,
        flags: new_conn_flags(family::INET),
        capture_bytes: 0,
    };
    if CONNS.insert(key, info, 0).is_err() {
        let _ = SOCKS.remove(skaddr);
        stat_add(stat::CONNS_FULL, 1);
        return Ok(());
    }
    mark_tracked_process(tgid);

    // SAFETY (all reads): offsets from sock/inet_sock_set_state/format.
    let addr_family: u16 = unsafe { ctx.read_at(28) }.map_err(i64::from)?;
    let mut event = connect_event(
        header(RecordKind::Connect, pid_tgid, fd, start_ns),
        // The handshake goes on; its end comes as a state change.
        EINPROGRESS,
        addr_family,
        unsafe { ctx.read_at(26) }.map_err(i64::from)?,
    );
    if addr_family == family::INET6 {
        event.addr = unsafe { ctx.read_at(56) }.map_err(i64::from)?;
    } else {
        let d: [u8; 4] = unsafe { ctx.read_at(36) }.map_err(i64::from)?;
        event.addr[..4].copy_from_slice(&d);
    }
    emit(&event);
    Ok(())
}

/// The local side sent its first FIN: close() (or the process's exit, or
/// dup2 over the fd) ends the connection; shutdown() only half-closes it,
/// and its end comes at CLOSE.
fn on_local_fin(skaddr: u64) -> Result<(), i64> {
    let regs = syscall_regs()?;
    if regs.nr == arch::SHUTDOWN {
        return Ok(());
    }
    // SAFETY: the value is copied out immediately.
    if let Some(owner) = unsafe { SOCKS.get(skaddr) }.copied() {
        let _ = SOCKS.remove(skaddr);
        emit_close(
            owner.tgid,
            owner.fd,
            owner.conn_start_ns,
            bpf_get_current_pid_tgid() as u32,
        );
        return Ok(());
    }
    // A connection found in /proc at start-up, whose socket was never
    // learned: known by (tgid, fd) only, so only a close() names it.
    if regs.nr != arch::CLOSE {
        return Ok(());
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out immediately.
    if let Some(info) = unsafe {
        CONNS.get(ConnKey {
            tgid,
            fd: regs.arg0 as u32,
        })
    } {
        if info.flags & conn_flags::CLOSE_BY_SYSCALL == 0 {
            emit_close(
                tgid,
                regs.arg0 as i32,
                info.conn_start_ns,
                bpf_get_current_pid_tgid() as u32,
            );
        }
    }
    Ok(())
}

/// Forgets the connection `(tgid, fd)` that began at `conn_start_ns`,
/// unless the fd already names a newer one.
fn forget_conn(tgid: u32, fd: i32, conn_start_ns: u64) {
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: the value is read immediately.
    if unsafe { CONNS.get(key) }.is_some_and(|info| info.conn_start_ns == conn_start_ns) {
        let _ = CONNS.remove(key);
    }
}

/// Ends the connection `(tgid, fd)` that began at `conn_start_ns` and tells
/// userspace.
fn emit_close(tgid: u32, fd: i32, conn_start_ns: u64, tid: u32) {
    forget_conn(tgid, fd, conn_start_ns);
    let mut hdr = header(
        RecordKind::Close,
        ((tgid as u64) << 32) | tgid as u64,
        fd,
        conn_start_ns,
    );
    hdr.tid = tid;
    emit(&CloseEvent { header: hdr });
}

/// Handshake outcomes and peer hang-ups.
fn on_tcp_state(
    ctx: &TracePointContext,
    skaddr: u64,
    old_state: i32,
    new_state: i32,
) -> Result<(), i64> {
    let interesting = new_state == tcp_state::ESTABLISHED
        || new_state == tcp_state::CLOSE_WAIT
        || (new_state == tcp_state::CLOSE && old_state == tcp_state::SYN_SENT);
    if !interesting {
        return Ok(());
    }
    // SAFETY: the value is copied out immediately.
    let owner = unsafe { SOCKS.get(skaddr) }.copied();
    if new_state == tcp_state::CLOSE {
        let _ = SOCKS.remove(skaddr);
        if let Some(owner) = owner {
            forget_conn(owner.tgid, owner.fd, owner.conn_start_ns);
        }
    }
    // Peer hang-ups are reported even for sockets we did not see connect, so
    // that connections seeded from /proc are matched by address in userspace.
    if owner.is_none() && new_state != tcp_state::CLOSE_WAIT {
        return Ok(());
    }
    let owner = owner.unwrap_or_default();
    let mut hdr = header(
        RecordKind::SockState,
        ((owner.tgid as u64) << 32) | owner.tgid as u64,
        owner.fd,
        owner.conn_start_ns,
    );
    hdr.tid = 0;
    let mut event = SockStateEvent {
        header: hdr,
        skaddr,
        old_state,
        new_state,
        family: unsafe { ctx.read_at(28) }.map_err(i64::from)?,
        sport: unsafe { ctx.read_at(24) }.map_err(i64::from)?,
        dport: unsafe { ctx.read_at(26) }.map_err(i64::from)?,
        flags: owner.flags as u16,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if event.family == family::INET6 {
        event.saddr = unsafe { ctx.read_at(40) }.map_err(i64::from)?;
        event.daddr = unsafe { ctx.read_at(56) }.map_err(i64::from)?;
    } else {
        let s: [u8; 4] = unsafe { ctx.read_at(32) }.map_err(i64::from)?;
        let d: [u8; 4] = unsafe { ctx.read_at(36) }.map_err(i64::from)?;
        event.saddr[..4].copy_from_slice(&s);
        event.daddr[..4].copy_from_slice(&d);
    }
    emit(&event);
    Ok(())
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_receive_reset(&ctx);
    0
}

fn try_tcp_receive_reset(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offset from tcp/tcp_receive_reset/format.
    let skaddr: u64 = unsafe { ctx.read_at(8) }.map_err(i64::from)?;
    if let Some(owner) = SOCKS.get_ptr_mut(skaddr) {
        // SAFETY: pointer into the map entry for this socket.
        unsafe { (*owner).flags |= u32::from(sock_flags::RESET_RECEIVED) };
    }
    Ok(())
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_close(&ctx);
    0
}

fn try_sys_enter_close(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: offset from the tracepoint's format file.
    let fd: u64 = unsafe { ctx.read_at(SYSCALL_ARG0) }.map_err(i64::from)?;
    let key = ConnKey {
        tgid: (pid_tgid >> 32) as u32,
        fd: fd as u32,
    };
    // The one lookup that every close() on the host pays while Unix
    // sockets are watched. TCP connections end at their state changes.
    // SAFETY: the value is copied out immediately.
    let info = match unsafe { CONNS.get(key) } {
        Some(info) if info.flags & conn_flags::CLOSE_BY_SYSCALL != 0 => *info,
        _ => return Ok(()),
    };
    let _ = CONNS.remove(key);
    emit(&CloseEvent {
        header: header(RecordKind::Close, pid_tgid, fd as i32, info.conn_start_ns),
    });
    Ok(())
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Every exiting thread of a process that made a TLS call: a thread
    // that dies inside a call (killed while it waits in SSL_read) leaves
    // its call behind, which no return would remove.
    let marks = TRACKED_PROCS
        .get(agent_common::tracked_procs_slot((pid_tgid >> 32) as u32))
        .copied()
        .unwrap_or(0);
    if marks & agent_common::tracked_procs::IN_TLS != 0 {
        let _ = maps::TLS_CALLS.remove(pid_tgid);
    }
    // SAFETY: offset from sched/sched_process_exit/format.
    let group_dead: u8 = unsafe { ctx.read_at(32) }.map_err(i64::from)?;
    if group_dead == 0 {
        return Ok(());
    }
    emit(&ProcessExitEvent {
        header: header(RecordKind::ProcessExit, pid_tgid, -1, 0),
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    });
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
