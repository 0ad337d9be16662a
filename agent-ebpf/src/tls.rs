//! Plaintext of TLS connections: uprobes on the TLS library's read and
//! write calls (OpenSSL's `SSL_read`, `SSL_write` and their `_ex` forms).
//!
//! Which connection a call belongs to is learnt from the call itself: a
//! library that owns its socket sends and receives on it inside the call,
//! in the caller's thread, and the copy paths see that I/O's fd in the
//! syscall's registers (`claim_tls_io`). The session (`SSL *`) remembers
//! it for the reads the library serves from its buffer without touching
//! the socket. A library that encrypts in memory and leaves the socket to
//! its caller (Node.js) does no I/O inside its calls: its session is tied
//! by a read call that follows the thread's receive of TLS records on a
//! tracked connection (`note_tls_receive`). None of this needs offsets into
//! the library's structures, which differ between versions and builds. The
//! ciphertext of a connection whose plaintext is copied here is not copied
//! (`conn_flags::TLS_PLAINTEXT`).
//!
//! Cost: the uprobes fire in every process that calls the library. One that
//! tracks no connection leaves after one array load; a session known not
//! to be a database's leaves after one lookup. The breakpoint trap itself
//! costs more than these programs (docs/data-path.md, TLS libraries).

use agent_common::{
    conn_flags, data_source, direction, io_kind, stat, tls_flags, tracked_procs,
    tracked_procs_slot, ConnKey, TlsCall, TlsSession, TlsSessionKey, TLS_NOT_DATABASE_SKIPS,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    copy::{head_limit, send_data_event, UserIo},
    maps::{CONNS, LAST_TLS_RECEIVE, TLS_CALLS, TLS_SESSIONS, TRACKED_PROCS},
    stat_add,
};

/// Byte of a `TRACKED_PROCS` slot that `tracked_procs::IN_TLS` occupies.
const IN_TLS_BYTE: usize = 2;

#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    let _ = tls_call_enter(&ctx, direction::SEND, false);
    0
}

#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    let _ = tls_call_enter(&ctx, direction::SEND, true);
    0
}

#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    let _ = tls_call_enter(&ctx, direction::RECV, false);
    0
}

#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    let _ = tls_call_enter(&ctx, direction::RECV, true);
    0
}

#[uretprobe]
pub fn ssl_call_exit(ctx: RetProbeContext) -> u32 {
    let _ = tls_call_exit(&ctx);
    0
}

/// `SSL_write(ssl, buf, num)`, `SSL_write_ex(ssl, buf, num, *written)` and
/// the same for reads: remembers the call for its socket I/O and its exit.
fn tls_call_enter(ctx: &ProbeContext, dir: u8, ex: bool) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = TRACKED_PROCS.get_ptr_mut(tracked_procs_slot(tgid)) else {
        return Ok(());
    };
    // SAFETY: pointer into an array slot, read once.
    if unsafe { *slot } == 0 {
        return Ok(());
    }
    let session: u64 = ctx.arg(0).ok_or(0i64)?;
    let key = TlsSessionKey {
        tgid,
        _pad0: 0,
        session,
    };
    if let Some(known) = TLS_SESSIONS.get_ptr_mut(key) {
        // SAFETY: pointer into this session's map entry; a racing thread
        // of the same session only makes a skip more or less.
        unsafe {
            if (*known).flags & u16::from(tls_flags::NOT_DATABASE) != 0 && (*known).skips_left > 0 {
                (*known).skips_left -= 1;
                return Ok(());
            }
        }
    }
    // Lets this process's socket I/O look for the call (one byte, as the
    // kernel's TRACKS: userspace's bytes stay).
    // SAFETY: pointer into an array slot.
    unsafe { *slot.cast::<u8>().add(IN_TLS_BYTE) = 1 };
    let call = TlsCall {
        session,
        buf: ctx.arg(1).ok_or(0i64)?,
        len_ptr: if ex { ctx.arg(3).ok_or(0i64)? } else { 0 },
        conn_start_ns: 0,
        fd: -1,
        direction: dir,
        flags: 0,
        in_call: 1,
        _pad0: 0,
    };
    match TLS_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: this thread's own entry; only this thread writes it.
        Some(entry) => unsafe { *entry = call },
        None => {
            if TLS_CALLS.insert(pid_tgid, call, 0).is_err() {
                stat_add(stat::TLS_CALLS_FAILED, 1);
            }
        }
    }
    Ok(())
}

/// The TLS call the thread `pid_tgid` is inside, if its process (with
/// `TRACKED_PROCS` marks `marks`) ever made one: one lookup, and none for
/// processes that never called a hooked library.
#[inline(always)]
pub(crate) fn tls_call_in_flight(pid_tgid: u64, marks: u32) -> Option<*mut TlsCall> {
    if marks & tracked_procs::IN_TLS == 0 {
        return None;
    }
    let call = TLS_CALLS.get_ptr_mut(pid_tgid)?;
    // SAFETY: pointer into this thread's entry, which only it writes.
    (unsafe { (*call).in_call } != 0).then_some(call)
}

/// Socket I/O on `key` inside `call` (from [`tls_call_in_flight`]): names
/// the call's connection. These bytes are ciphertext, not to be copied.
#[inline(always)]
pub(crate) fn claim_tls_io(call: *mut TlsCall, key: ConnKey) {
    // SAFETY: pointers into this thread's call entry and this connection's
    // entry; only this thread writes the call, and a racing writer of the
    // connection's flags only sets bits too.
    unsafe {
        match CONNS.get_ptr_mut(key) {
            Some(info) => {
                (*call).fd = key.fd as i32;
                (*call).conn_start_ns = (*info).conn_start_ns;
                if (*info).flags & conn_flags::CAPTURE_DATA != 0 {
                    (*info).flags |= conn_flags::TLS_PLAINTEXT;
                    (*call).flags &= !tls_flags::NOT_DATABASE;
                } else {
                    (*call).flags |= tls_flags::NOT_DATABASE;
                }
            }
            None => (*call).flags |= tls_flags::NOT_DATABASE,
        }
    }
}

fn tls_call_exit(ctx: &RetProbeContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(entry) = TLS_CALLS.get_ptr_mut(pid_tgid) else {
        return Ok(());
    };
    // SAFETY: this thread's own entry; only this thread writes it. It stays
    // for the thread's next call (removed at the thread's exit).
    let call = unsafe {
        if (*entry).in_call == 0 {
            return Ok(());
        }
        (*entry).in_call = 0;
        *entry
    };
    let tgid = (pid_tgid >> 32) as u32;
    let key = TlsSessionKey {
        tgid,
        _pad0: 0,
        session: call.session,
    };
    // The session's connection, learnt before the byte count is looked at:
    // a failed call (a handshake step) still tells it.
    let connection = call_connection(pid_tgid, key, &call);
    let ret: i32 = ctx.ret();
    let bytes = if call.len_ptr != 0 {
        if ret != 1 {
            return Ok(());
        }
        // SAFETY: bpf_probe_read_user checks the user pointer (size_t *).
        unsafe { bpf_probe_read_user(call.len_ptr as *const u64) }?
    } else if ret > 0 {
        ret as u64
    } else {
        return Ok(());
    };
    if bytes == 0 {
        return Ok(());
    }
    let (fd, conn_start_ns) = match connection {
        Known::Database(fd, conn_start_ns) => (fd, conn_start_ns),
        Known::NotDatabase => return Ok(()),
        Known::Unknown => {
            stat_add(stat::UNATTRIBUTED_TLS_CALLS, 1);
            return Ok(());
        }
    };
    let conn = ConnKey {
        tgid,
        fd: fd as u32,
    };
    let Some(info) = CONNS.get_ptr_mut(conn) else {
        // The connection ended since the session last moved bytes on it.
        stat_add(stat::UNATTRIBUTED_TLS_CALLS, 1);
        return Ok(());
    };
    // SAFETY: pointer into this connection's entry; a racing writer of its
    // flags only sets bits too (userspace's clear of CAPTURE_DATA is a
    // whole-entry update, which this store may undo at worst once: the
    // connection is then copied once more and cleared again).
    let info = unsafe {
        if (*info).conn_start_ns != conn_start_ns {
            // Its fd was reused for another connection.
            stat_add(stat::UNATTRIBUTED_TLS_CALLS, 1);
            return Ok(());
        }
        if (*info).flags & conn_flags::CAPTURE_DATA != 0 {
            // Libraries that write their ciphertext after the call (memory
            // BIOs) are not claimed by the copy paths: their socket bytes
            // stop being copied here.
            (*info).flags |= conn_flags::TLS_PLAINTEXT;
        }
        *info
    };
    if info.flags & conn_flags::CAPTURE_DATA == 0 {
        // Not a database's: the session's next calls leave at their entry.
        let session = TlsSession {
            conn_start_ns,
            fd,
            flags: u16::from(tls_flags::NOT_DATABASE),
            skips_left: TLS_NOT_DATABASE_SKIPS,
        };
        let _ = TLS_SESSIONS.insert(key, session, 0);
        return Ok(());
    }
    send_data_event(
        &UserIo {
            pid_tgid,
            fd,
            conn_start_ns,
            capture_bytes: head_limit(info.capture_bytes),
            direction: call.direction,
            io_kind: io_kind::BUFFER,
            ptr: call.buf,
            // No clock read at the call's entry (it costs ~0.1 µs under a
            // hypervisor): a write's request starts when the call returns,
            // right after its socket send, as on the socket path.
            enter_ns: 0,
            source: data_source::TLS_LIBRARY,
        },
        bytes,
    )
}

/// What a call's session is tied to.
enum Known {
    Database(i32, u64),
    NotDatabase,
    Unknown,
}

/// The connection `call` (of session `key`) belongs to: the one its own
/// socket I/O named; else the one the session was last seen on; else, for
/// a read of a library that encrypts in memory (Node.js), the connection
/// whose TLS records this thread received last, just before the call (the
/// library is fed what was read, then asked for the plaintext). Learnt
/// ties are remembered for the session.
#[inline(always)]
fn call_connection(pid_tgid: u64, key: TlsSessionKey, call: &TlsCall) -> Known {
    if call.fd >= 0 {
        let not_database = call.flags & tls_flags::NOT_DATABASE != 0;
        // SAFETY: the value is copied out immediately.
        let known = unsafe { TLS_SESSIONS.get(key) }.copied();
        let unchanged = matches!(known, Some(known) if known.fd == call.fd
            && known.conn_start_ns == call.conn_start_ns
            && known.flags & u16::from(tls_flags::NOT_DATABASE) == 0);
        // A database session's entry is written once, not at every call:
        // an LRU update costs more than the lookup.
        if not_database || !unchanged {
            let session = TlsSession {
                conn_start_ns: call.conn_start_ns,
                fd: call.fd,
                flags: u16::from(call.flags & tls_flags::NOT_DATABASE),
                skips_left: if not_database {
                    TLS_NOT_DATABASE_SKIPS
                } else {
                    0
                },
            };
            let _ = TLS_SESSIONS.insert(key, session, 0);
        }
        return if not_database {
            Known::NotDatabase
        } else {
            Known::Database(call.fd, call.conn_start_ns)
        };
    }
    // SAFETY: the value is copied out immediately.
    if let Some(known) = unsafe { TLS_SESSIONS.get(key) }.copied() {
        return if known.flags & u16::from(tls_flags::NOT_DATABASE) != 0 {
            Known::NotDatabase
        } else {
            Known::Database(known.fd, known.conn_start_ns)
        };
    }
    if call.direction == direction::RECV {
        // SAFETY: the value is copied out before the entry is removed.
        if let Some(last) = unsafe { LAST_TLS_RECEIVE.get(pid_tgid) }.copied() {
            // One receive names one session: a later call of another
            // session must not take it.
            let _ = LAST_TLS_RECEIVE.remove(pid_tgid);
            let _ = TLS_SESSIONS.insert(key, last, 0);
            return Known::Database(last.fd, last.conn_start_ns);
        }
    }
    Known::Unknown
}

/// A tracked connection of a process that calls a TLS library received
/// bytes outside any TLS call: if they start with a TLS record, remember
/// the connection for this thread's next read call (see
/// `call_connection`). `buf` holds the bytes just read.
#[inline(always)]
pub(crate) fn note_tls_receive(pid_tgid: u64, fd: i32, conn_start_ns: u64, buf: u64) {
    // SAFETY: bpf_probe_read_user checks the user pointer.
    let Ok(head) = (unsafe { bpf_probe_read_user(buf as *const [u8; 3]) }) else {
        return;
    };
    // Content type 20..=23 (change cipher spec, alert, handshake, data),
    // version 3.0 (SSL 3) to 3.4.
    if !(20..=23).contains(&head[0]) || head[1] != 3 || head[2] > 4 {
        return;
    }
    let last = TlsSession {
        conn_start_ns,
        fd,
        flags: 0,
        skips_left: 0,
    };
    let _ = LAST_TLS_RECEIVE.insert(pid_tgid, last, 0);
}
