//! Kernel timestamps are CLOCK_MONOTONIC; people read wall-clock time. One
//! offset, taken at start, converts between them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Now, on the kernel's clock (what `bpf_ktime_get_ns` returns).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_BOOTTIME: the monotonic clock plus time spent suspended (what
/// /proc counts process start times in).
pub fn boottime_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock ns since the epoch minus monotonic ns.
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Clock {
        let wall = clock_ns(libc::CLOCK_REALTIME);
        let mono = monotonic_ns();
        Clock {
            offset_ns: i128::from(wall) - i128::from(mono),
        }
    }

    pub fn to_wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = (i128::from(monotonic_ns) + self.offset_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// RFC 3339 with milliseconds, UTC.
    pub fn rfc3339(&self, monotonic_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.to_wall(monotonic_ns)).to_string()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
