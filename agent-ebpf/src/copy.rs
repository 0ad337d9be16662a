//! The copy both data paths and the TLS library hooks share: the head (and
//! for long plain buffers the tail) of what one read or write moved,
//! straight from the user's buffer into a ring-buffer record, so that
//! userspace sees the same events whichever hook saw the bytes.

use core::ptr::addr_of_mut;

use agent_common::{io_kind, stat, DataEvent, RecordKind, HEAD_MAX, TAIL_MAX};
use aya_ebpf::helpers::{bpf_probe_read_user, generated};

use crate::{data_wakeup_flag, header, maps::EVENTS, stat_add, BPF_RB_NO_WAKEUP};

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

/// The first buffer of an iovec array: (base, length).
fn first_iovec(iov: u64) -> Result<(u64, u64), i64> {
    // SAFETY: bpf_probe_read_user checks the user pointer; struct iovec is
    // { void *iov_base; size_t iov_len; }.
    let pair: [u64; 2] = unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }?;
    Ok((pair[0], pair[1]))
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
