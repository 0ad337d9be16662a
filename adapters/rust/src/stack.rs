//! Holder stacks (docs/adapter-protocol.md, "Holder stacks"): which code
//! took a connection, for the agent's leak and slow-holder reports.
//!
//! Every successful checkout keeps a [`Capture`]: the return addresses of
//! the [`RAW_FRAMES`] innermost frames of the thread that finished the
//! acquire (for an async pool, the chain of `poll`s of the futures that
//! awaited `get()`: the application's async fns, as `path::to::fn::{{closure}}`),
//! and the place that called the pool's `get()` / `acquire()`
//! (`#[track_caller]`, free). Walking the frames is the only cost on the
//! checkout path (no lock, no allocation besides the box, no symbol); the
//! addresses are turned into names ([`Capture::frames`]) only for a
//! checkout still held `stack_after` later, on the adapter's state thread.
//!
//! A checkout captures only if `stack_interval` (1 ms by default) has
//! passed since the last capture in the process ([`capture_due`]): at most
//! 1,000 walks a second, whatever the checkout rate, so the capture's CPU
//! stays bounded (a few µs × 1,000/s: well under 1 % of a core).

use std::{
    ffi::c_void,
    panic::Location,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::protocol::{MAX_FRAME_CHARS, MAX_STACK_FRAMES};

/// The environment variable that turns holder stacks off (`off`, `0`,
/// `false` or `no`); they are on by default.
pub const STACKS_ENV: &str = "POOLSCOPE_ADAPTER_STACKS";
/// The environment variable that sets `stack_after` in milliseconds.
pub const STACK_AFTER_ENV: &str = "POOLSCOPE_ADAPTER_STACK_AFTER_MS";
/// How long a checkout is held before its stack is sent.
pub const DEFAULT_STACK_AFTER: Duration = Duration::from_secs(1);
/// The environment variable that sets `stack_interval` in whole
/// microseconds (`0`: a capture at every checkout).
pub const STACK_INTERVAL_ENV: &str = "POOLSCOPE_ADAPTER_STACK_INTERVAL_US";
/// The least time between two captures in the process.
pub const DEFAULT_STACK_INTERVAL: Duration = Duration::from_millis(1);

/// When this process last captured a checkout's stack (monotonic
/// nanoseconds; 0: never), whatever the pool and the thread.
pub(crate) static LAST_CAPTURE_NS: AtomicU64 = AtomicU64::new(0);

/// Whether a checkout at `now` (monotonic nanoseconds) captures its stack:
/// if at least `interval_ns` passed since the `last` capture, which it
/// then becomes. One load and, for a capture, one store, both relaxed:
/// two threads may both capture close together, which is harmless.
#[inline]
pub(crate) fn capture_due(last: &AtomicU64, now: u64, interval_ns: u64) -> bool {
    let prev = last.load(Ordering::Relaxed);
    if interval_ns != 0 && prev != 0 && now.saturating_sub(prev) < interval_ns {
        return false;
    }
    last.store(now, Ordering::Relaxed);
    true
}

/// Frames walked per checkout: the adapter's own few, the application's
/// (an async fn's poll each), then the runtime's.
pub(crate) const RAW_FRAMES: usize = 16;

/// Whether the environment variable's value turns stacks off.
pub(crate) fn stacks_on_from(env: Option<std::ffi::OsString>) -> bool {
    let Some(value) = env else {
        return true;
    };
    let value = value.to_string_lossy();
    !matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "off" | "0" | "false" | "no"
    )
}

/// `stack_after` from the environment variable's value (milliseconds);
/// the default when absent or not a number.
pub(crate) fn stack_after_from(env: Option<std::ffi::OsString>) -> Duration {
    env.and_then(|v| v.to_str().and_then(|s| s.trim().parse::<u64>().ok()))
        .map_or(DEFAULT_STACK_AFTER, Duration::from_millis)
}

/// `stack_interval` from the environment variable's value (whole
/// microseconds); the default when absent or not a number.
pub(crate) fn stack_interval_from(env: Option<std::ffi::OsString>) -> Duration {
    env.and_then(|v| v.to_str().and_then(|s| s.trim().parse::<u64>().ok()))
        .map_or(DEFAULT_STACK_INTERVAL, Duration::from_micros)
}

/// The stack of the code that checked a connection out, unformatted.
pub(crate) struct Capture {
    ips: [usize; RAW_FRAMES],
    len: usize,
    caller: Option<&'static Location<'static>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("frames", &self.len)
            .field("caller", &self.caller)
            .finish()
    }
}

impl Capture {
    /// The calling thread's stack now; `caller` is where the application
    /// called the pool, if known.
    #[inline(never)]
    pub(crate) fn here(caller: Option<&'static Location<'static>>) -> Box<Capture> {
        let mut capture = Box::new(Capture {
            ips: [0; RAW_FRAMES],
            len: 0,
            caller,
        });
        let c = &mut *capture;
        // SAFETY: `trace_unsynchronized` is unsafe because some platforms'
        // unwinders (Windows' dbghelp) are not thread-safe; on Unix it is
        // libgcc's / libunwind's `_Unwind_Backtrace`, which is, and the
        // closure neither panics nor unwinds.
        unsafe {
            backtrace::trace_unsynchronized(|frame| {
                let ip = frame.ip() as usize;
                if ip != 0 {
                    c.ips[c.len] = ip;
                    c.len += 1;
                }
                c.len < RAW_FRAMES
            });
        }
        capture
    }

    /// A capture of given addresses, for tests.
    #[cfg(test)]
    pub(crate) fn of(ips: &[usize], caller: Option<&'static Location<'static>>) -> Capture {
        let mut capture = Capture {
            ips: [0; RAW_FRAMES],
            len: ips.len().min(RAW_FRAMES),
            caller,
        };
        capture.ips[..capture.len].copy_from_slice(&ips[..capture.len]);
        capture
    }

    /// The frames as the protocol wants them: innermost first, from the
    /// application's code on (the call into the pool, then the first frame
    /// that is neither the adapter's, the pool library's, its driver's, the
    /// async runtime's nor the standard library's), at most
    /// [`MAX_STACK_FRAMES`] of at most [`MAX_FRAME_CHARS`] characters, no
    /// control characters. Empty if nothing could be named.
    pub(crate) fn frames(&self) -> Vec<String> {
        let mut resolved: Vec<Frame> = Vec::with_capacity(self.len + 4);
        for &ip in &self.ips[..self.len] {
            let before = resolved.len();
            // Several symbols for one address: the functions inlined there,
            // innermost first (with debug info only).
            backtrace::resolve(ip as *mut c_void, |symbol| {
                let Some(name) = symbol.name() else {
                    return;
                };
                let name = format!("{name:#}");
                let text = match (symbol.filename(), symbol.lineno()) {
                    (Some(file), Some(line)) => format!("{name} ({}:{line})", file.display()),
                    _ => name.clone(),
                };
                resolved.push(Frame {
                    library: is_library(&name),
                    ours: is_ours(&name),
                    text,
                });
            });
            if resolved.len() == before {
                resolved.push(Frame {
                    library: true,
                    ours: false,
                    text: format!("{ip:#x}"),
                });
            }
        }
        let start = match resolved.iter().position(|f| !f.library) {
            Some(first_app) => first_app,
            // No application frame within the walk (a deep library): all
            // but the adapter's own.
            None => resolved
                .iter()
                .position(|f| !f.ours)
                .unwrap_or(resolved.len()),
        };
        let call = self
            .caller
            .map(|at| format!("{}:{}:{}", at.file(), at.line(), at.column()));
        call.into_iter()
            .chain(resolved.into_iter().skip(start).map(|f| f.text))
            .map(|text| clean(&text))
            .filter(|text| !text.is_empty())
            .take(MAX_STACK_FRAMES)
            .collect()
    }
}

struct Frame {
    /// The adapter's, the pool library's or below: not the application's.
    library: bool,
    /// The adapter's (or the unwinder's) own.
    ours: bool,
    text: String,
}

/// Crates whose frames lie between the application and the capture: the
/// adapter, the pools and drivers it wraps, the runtime and futures
/// combinators that poll an async caller, and the standard library.
const LIBRARY_PREFIXES: &[&str] = &[
    "poolscope_adapter::",
    "backtrace::",
    "bb8::",
    "deadpool::",
    "deadpool_postgres::",
    "deadpool_runtime::",
    "sqlx::",
    "sqlx_core::",
    "sqlx_postgres::",
    "sqlx_mysql::",
    "sqlx_sqlite::",
    "tokio_postgres::",
    "tokio::",
    "futures::",
    "futures_util::",
    "futures_core::",
    "tracing::",
    "core::",
    "std::",
    "alloc::",
];

/// The path a demangled name is classified by: `<X as T>::f` by `X`, or by
/// `T` when `X` is a generic parameter (`<F as core::future::Future>::poll`).
fn owner(name: &str) -> &str {
    let mut s = name;
    loop {
        let trimmed = s.trim_start_matches(['<', '&', ' ', '(', '*']);
        s = trimmed
            .strip_prefix("mut ")
            .or_else(|| trimmed.strip_prefix("const "))
            .or_else(|| trimmed.strip_prefix("dyn "))
            .unwrap_or(trimmed);
        if s.len() == trimmed.len() {
            break;
        }
    }
    if let Some((self_type, rest)) = s.split_once(" as ") {
        if !self_type.contains("::") {
            return rest;
        }
    }
    s
}

fn is_library(name: &str) -> bool {
    let owner = owner(name);
    // This crate's own tests stand for an application.
    if cfg!(test) && owner.starts_with("poolscope_adapter::") && owner.contains("::tests::") {
        return false;
    }
    LIBRARY_PREFIXES.iter().any(|p| owner.starts_with(p))
}

fn is_ours(name: &str) -> bool {
    let owner = owner(name);
    owner.starts_with("poolscope_adapter::") || owner.starts_with("backtrace::")
}

/// At most [`MAX_FRAME_CHARS`] characters, control characters replaced.
pub(crate) fn clean(text: &str) -> String {
    text.chars()
        .take(MAX_FRAME_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A held checkout's capture, and when its stack is due.
#[derive(Debug)]
pub(crate) struct HeldStack {
    pub(crate) capture: Box<Capture>,
    pub(crate) due_ns: u64,
}

#[cfg(test)]
mod tests;
