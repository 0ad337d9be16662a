//! Tells the poolscope agent what a Rust application's connection pool does:
//! when connections are created, handed out, returned and closed, and how
//! long callers wait for one. The agent joins these events to the sockets it
//! sees in the kernel, so that a leak report can say which pool holds a
//! connection, which thread took it, and since when.
//!
//! The wire format is docs/adapter-protocol.md (version 1): one JSON object
//! per Unix datagram, sent to `$POOLSCOPE_ADAPTER_SOCKET`, else
//! `/run/poolscope/adapter.sock`. Messages are built as values of the
//! protocol crate's types ([`protocol`]), the same the agent decodes. The
//! agent names the sender from the kernel's credentials, so no message
//! carries a pid.
//!
//! Reporting never gets in the application's way: sends are non-blocking,
//! and when the agent is absent (`ENOENT`, `ECONNREFUSED`) or a message
//! cannot be built, it is dropped and counted, never a panic or an error.
//! See [`Reporter`] for what happens when the agent is present but busy.
//!
//! - [`Reporter`]: the socket, for any pool library.
//! - [`PoolReporter`]: one pool's messages, with request ids for acquires.
//! - `deadpool_pg` (feature `deadpool-postgres`): a deadpool-postgres pool
//!   that reports by itself, naming each connection by its socket.
//! - `bb8_pg` (feature `bb8-postgres`): the same for a bb8 pool.
//! - `sqlx_pool` (features `sqlx-postgres`, `sqlx-mysql`): the same for a
//!   sqlx pool.
//!
//! # Holder stacks
//!
//! At every checkout the pool keeps the stack of the code that took the
//! connection (a few return addresses and the place that called `get()`,
//! no text: about a microsecond); if the checkout is still out
//! `stack_after` later (1 s; `POOLSCOPE_ADAPTER_STACK_AFTER_MS`), the
//! stack is named, innermost first from the application's own code on,
//! and sent once as `holder_stack`, for the agent's leak reports. Release
//! builds name functions from the symbol table (keep it: no `strip =
//! "symbols"`); with debug info (`debug = "line-tables-only"`) frames
//! also get their file and line. `POOLSCOPE_ADAPTER_STACKS=off` turns
//! stacks off ([`PoolReporter::with_holder_stacks`] too).
//!
//! To bound the capture's CPU whatever the checkout rate, a checkout
//! captures only if `stack_interval` has passed since the process's last
//! capture (any pool, any thread): 1 ms, at most 1,000 captures a second;
//! `POOLSCOPE_ADAPTER_STACK_INTERVAL_US` (`0`: every checkout),
//! [`PoolReporter::with_stack_interval`]. A checkout without a capture
//! sends no `holder_stack`.

#![cfg(unix)]

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixDatagram,
    },
    panic::Location,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak,
    },
    thread,
    time::{Duration, Instant},
};

pub use batch::BATCH_WINDOW;
pub use poolscope_adapter_protocol as protocol;
/// Which connection a message means: the client side's `ip:port` for TCP,
/// the socket's fd in this process, or both (the agent tries the fd first).
/// [`conn_of_socket`] names a socket.
pub use protocol::ConnRef as ConnId;
pub use protocol::{AcquireResult, DbSystem, PoolInfo};
use protocol::{Body, Message};

mod batch;
mod stack;
pub use stack::{
    DEFAULT_STACK_AFTER, DEFAULT_STACK_INTERVAL, STACKS_ENV, STACK_AFTER_ENV, STACK_INTERVAL_ENV,
};
#[cfg(feature = "bb8-postgres")]
pub mod bb8_pg;
#[cfg(feature = "deadpool-postgres")]
pub mod deadpool_pg;
#[cfg(any(feature = "deadpool-postgres", feature = "bb8-postgres"))]
mod pg_connect;
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
pub mod sqlx_pool;

/// Protocol version.
pub const PROTOCOL_VERSION: u32 = protocol::VERSION;
/// Where the agent listens unless `POOLSCOPE_ADAPTER_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/poolscope/adapter.sock";
/// The environment variable naming the agent's socket.
pub const SOCKET_ENV: &str = "POOLSCOPE_ADAPTER_SOCKET";
/// The agent refuses larger datagrams; we do not send them.
pub const MAX_MESSAGE_BYTES: usize = protocol::MAX_MESSAGE_BYTES;
/// Longest pool name (and other text field) the agent accepts, in characters.
pub const MAX_TEXT_CHARS: usize = protocol::MAX_TEXT_CHARS;
/// Messages kept in order while the agent's queue is full (see [`Reporter`]).
pub const MAX_BACKLOG: usize = 16_384;

/// How often the background sender retries while the agent's queue is full.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);
/// How long the background sender keeps retrying a full queue before it
/// gives the backlog up (the agent is not reading).
const BACKLOG_GIVE_UP: Duration = Duration::from_secs(5);
/// How often a pool with connections checked out re-sends its registration
/// and checkouts (`checkout_state`), so that an agent that restarted while
/// the application was idle learns them back.
pub const DEFAULT_STATE_INTERVAL: Duration = Duration::from_secs(30);
/// Entries per `checkout_state` datagram (the agent takes up to 64).
const STATE_ENTRIES_PER_MESSAGE: usize = 32;
/// Messages the background sender sends per hold of the lock.
const BACKLOG_BATCH: usize = 64;

/// `CLOCK_MONOTONIC` in nanoseconds: the kernel's clock, which the agent
/// uses too. 0 if the clock cannot be read (never on Linux).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(target_os = "linux")]
static FORKS: AtomicU32 = AtomicU32::new(0);
#[cfg(target_os = "linux")]
static FORK_HANDLER: std::sync::Once = std::sync::Once::new();
#[cfg(target_os = "linux")]
thread_local! {
    /// This thread's id, and the fork count when it was read.
    static TID: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
}

#[cfg(target_os = "linux")]
extern "C" fn forked() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// The calling thread's id (what `/proc/<pid>/task/<tid>` names), if the
/// platform has one.
pub fn current_tid() -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        // Read once per thread (a system call each time cost a checkout
        // more than the rest of its reporting); a fork gives the child's
        // thread a new id, so the cache is as old as the last fork.
        FORK_HANDLER.call_once(|| {
            // SAFETY: registers a handler that only bumps an atomic.
            unsafe { libc::pthread_atfork(None, None, Some(forked)) };
        });
        let forks = FORKS.load(Ordering::Relaxed);
        TID.with(|cached| {
            let (seen, tid) = cached.get();
            if seen == forks && tid != 0 {
                return Some(tid);
            }
            // SAFETY: gettid has no preconditions and cannot fail.
            let tid = u32::try_from(unsafe { libc::gettid() }).ok()?;
            cached.set((forks, tid));
            Some(tid)
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Names a socket by its fd and, for TCP, its local address
/// (`getsockname`). For a Unix socket only the fd names it.
pub fn conn_of_socket(fd: &impl AsRawFd) -> ConnId {
    let fd = fd.as_raw_fd();
    ConnId {
        local_address: local_inet_address(fd),
        fd: (fd >= 0).then_some(fd),
        conn: None,
    }
}

/// The local `ip:port` of an IPv4 or IPv6 socket, from `getsockname`.
fn local_inet_address(fd: RawFd) -> Option<SocketAddr> {
    if fd < 0 {
        return None;
    }
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is writable for `len` bytes; getsockname writes at
    // most that much and sets len.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked).
            let sin: libc::sockaddr_in = unsafe {
                std::ptr::read_unaligned((&storage as *const libc::sockaddr_storage).cast())
            };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6, length checked).
            let sin6: libc::sockaddr_in6 = unsafe {
                std::ptr::read_unaligned((&storage as *const libc::sockaddr_storage).cast())
            };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// What a [`Reporter`] did with the messages it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReporterStats {
    /// Handed to the kernel (queued at the agent's socket).
    pub sent: u64,
    /// Given up: no agent, a full backlog, or a message that could not be built.
    pub dropped: u64,
    /// Waiting in the backlog for room in the agent's queue.
    pub backlogged: u64,
    /// Ever put in the backlog because the agent's queue was full (sent
    /// later, or dropped if the agent made no room).
    pub deferred: u64,
}

/// The connection to the agent: an unbound, non-blocking Unix datagram
/// socket. Cheap to clone (clones share the socket); `Send + Sync`.
///
/// Sends never block and never fail the caller:
/// - no agent (`ENOENT`, `ECONNREFUSED`, ...): the message is dropped;
/// - the agent's queue is full (`EAGAIN`: Linux queues only
///   `net.unix.max_dgram_qlen` datagrams per socket, 10 by default, and a
///   pool under load sends bursts): the message goes to an in-memory backlog
///   of at most [`MAX_BACKLOG`] messages that a background thread sends on,
///   in order, as the agent makes room (and drops if it makes none within
///   5 s). While the backlog is not empty new messages queue behind it, so
///   the agent always sees a connection's events in the order they
///   happened (a `release` before the next `acquire_end` of that
///   connection). Each message carries its own `mono_ns`, so a late
///   delivery does not shift the times the agent records.
#[derive(Clone)]
pub struct Reporter {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("socket", &self.socket_path())
            .field("stats", &self.stats())
            .finish()
    }
}

struct Inner {
    path: PathBuf,
    socket: UnixDatagram,
    queue: Mutex<VecDeque<Vec<u8>>>,
    wake: Condvar,
    sender_started: AtomicBool,
    sent: AtomicU64,
    dropped: AtomicU64,
    deferred: AtomicU64,
    /// A send failed for want of an agent (`ENOENT`, `ECONNREFUSED`).
    agent_gone: AtomicBool,
    /// Sends that succeeded after `agent_gone`: agents (re)starting.
    comebacks: AtomicU64,
}

/// What one non-blocking send did.
enum Sent {
    Ok,
    Full,
    Failed,
}

/// Locks `m`, poisoned or not: a panic while holding one of this crate's
/// locks leaves valid data behind.
pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        locked(&self.queue)
    }

    fn try_send(&self, bytes: &[u8]) -> Sent {
        match self.socket.send_to(bytes, &self.path) {
            Ok(_) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                if self.agent_gone.swap(false, Ordering::AcqRel) {
                    self.comebacks.fetch_add(1, Ordering::AcqRel);
                }
                Sent::Ok
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Full,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Sent::Full,
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) {
                    self.agent_gone.store(true, Ordering::Release);
                }
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Sent::Failed
            }
        }
    }

    /// Sends queued messages until the queue is empty or the agent's is
    /// full (at most `limit`). Returns whether the queue is now empty.
    fn drain(&self, queue: &mut VecDeque<Vec<u8>>, limit: usize) -> bool {
        for _ in 0..limit {
            let Some(front) = queue.front() else {
                return true;
            };
            match self.try_send(front) {
                Sent::Ok | Sent::Failed => {
                    queue.pop_front();
                }
                Sent::Full => return false,
            }
        }
        queue.is_empty()
    }

    fn send(self: &Arc<Self>, bytes: Vec<u8>) {
        let mut queue = self.lock();
        if queue.is_empty() {
            match self.try_send(&bytes) {
                Sent::Ok | Sent::Failed => return,
                Sent::Full => {}
            }
        } else if self.drain(&mut queue, BACKLOG_BATCH) {
            match self.try_send(&bytes) {
                Sent::Ok | Sent::Failed => return,
                Sent::Full => {}
            }
        }
        if queue.len() >= MAX_BACKLOG {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push_back(bytes);
        self.deferred.fetch_add(1, Ordering::Relaxed);
        drop(queue);
        self.start_sender();
        self.wake.notify_one();
    }

    /// Starts the background sender the first time the agent's queue is full.
    fn start_sender(self: &Arc<Self>) {
        if self.sender_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = thread::Builder::new()
            .name("poolscope-adapter".into())
            .spawn(move || background_sender(weak));
        if spawned.is_err() {
            // No thread: the backlog drains on later sends instead.
            self.sender_started.store(false, Ordering::Release);
        }
    }
}

/// Sends the backlog as the agent makes room; exits with the last Reporter.
fn background_sender(weak: Weak<Inner>) {
    let mut stuck_since: Option<std::time::Instant> = None;
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let mut queue = inner.lock();
        if queue.is_empty() {
            stuck_since = None;
            // Wake up now and then to notice that every Reporter is gone.
            let (guard, _) = inner
                .wake
                .wait_timeout(queue, Duration::from_millis(500))
                .unwrap_or_else(PoisonError::into_inner);
            queue = guard;
            if queue.is_empty() {
                continue;
            }
        }
        let before = queue.len();
        let empty = inner.drain(&mut queue, BACKLOG_BATCH);
        if empty || queue.len() < before {
            stuck_since = None;
        } else {
            let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= BACKLOG_GIVE_UP {
                // The agent is not reading: give the backlog up.
                inner
                    .dropped
                    .fetch_add(queue.len() as u64, Ordering::Relaxed);
                queue.clear();
                stuck_since = None;
            }
        }
        drop(queue);
        drop(inner);
        if !empty {
            thread::sleep(BACKLOG_RETRY);
        }
    }
}

impl Reporter {
    /// Sends to `$POOLSCOPE_ADAPTER_SOCKET`, else [`DEFAULT_SOCKET`].
    pub fn from_env() -> Reporter {
        Reporter::with_socket(socket_path_from(std::env::var_os(SOCKET_ENV)))
    }

    /// Sends to the agent socket at `path`. If no socket can be made (out
    /// of file descriptors), the reporter is disabled.
    pub fn with_socket(path: impl Into<PathBuf>) -> Reporter {
        let socket = UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        Reporter {
            inner: socket.ok().map(|socket| {
                Arc::new(Inner {
                    path: path.into(),
                    socket,
                    queue: Mutex::new(VecDeque::new()),
                    wake: Condvar::new(),
                    sender_started: AtomicBool::new(false),
                    sent: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                    deferred: AtomicU64::new(0),
                    agent_gone: AtomicBool::new(false),
                    comebacks: AtomicU64::new(0),
                })
            }),
        }
    }

    /// A reporter that sends nothing.
    pub fn disabled() -> Reporter {
        Reporter { inner: None }
    }

    /// The agent socket this reporter sends to, if enabled.
    pub fn socket_path(&self) -> Option<&Path> {
        self.inner.as_deref().map(|i| i.path.as_path())
    }

    pub fn stats(&self) -> ReporterStats {
        match &self.inner {
            Some(inner) => ReporterStats {
                sent: inner.sent.load(Ordering::Relaxed),
                dropped: inner.dropped.load(Ordering::Relaxed),
                backlogged: inner.lock().len() as u64,
                deferred: inner.deferred.load(Ordering::Relaxed),
            },
            None => ReporterStats::default(),
        }
    }

    /// How many times a send succeeded after sends had failed for want of
    /// an agent: each is an agent (re)starting.
    pub fn comebacks(&self) -> u64 {
        self.inner
            .as_deref()
            .map_or(0, |i| i.comebacks.load(Ordering::Acquire))
    }

    /// Waits up to `timeout` for the backlog to be sent (for a clean exit);
    /// returns whether it is empty. Does nothing without a backlog.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        // What the pools keep for their batches goes first.
        batch::BATCHER.flush_all();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let mut queue = inner.lock();
                if inner.drain(&mut queue, BACKLOG_BATCH) {
                    return true;
                }
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(BACKLOG_RETRY);
        }
    }

    /// Sends one message about `pool`, stamped now. Messages the agent
    /// would refuse (an empty pool name, a connection named by nothing,
    /// more than 4096 bytes) are dropped here and counted.
    fn send(&self, pool: &str, body: Body) {
        self.send_at(pool, body, monotonic_ns());
    }

    fn send_at(&self, pool: &str, body: Body, mono_ns: u64) {
        let Some(inner) = &self.inner else {
            return;
        };
        match Message::new(truncate(pool), body).at(mono_ns).encode() {
            Ok(bytes) => inner.send(bytes),
            Err(_) => {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `pool`: registers (or updates) a pool. Texts longer than the agent
    /// accepts are cut.
    pub fn pool(&self, pool: &str, info: &PoolInfo) {
        let cut = |text: &Option<String>| text.as_deref().map(|t| truncate(t).to_string());
        let info = PoolInfo {
            server_address: cut(&info.server_address),
            namespace: cut(&info.namespace),
            library: cut(&info.library),
            ..info.clone()
        };
        self.send(pool, Body::Pool(info));
    }

    /// `connection_created`: the pool opened a connection, ready to use.
    pub fn connection_created(&self, pool: &str, conn: ConnId) {
        self.send(pool, Body::ConnectionCreated { conn, tid: None });
    }

    /// `connection_created` of a connection whose socket this thread
    /// connected (a blocking driver, or a runtime that runs the connect
    /// on this thread): the agent may then tie a connection named by `conn`
    /// alone to that socket. Say it only when it is certain; under a
    /// work-stealing runtime the connect may have run on another thread.
    pub fn connection_created_here(&self, pool: &str, conn: ConnId) {
        let tid = current_tid();
        self.send(pool, Body::ConnectionCreated { conn, tid });
    }

    /// `acquire_start`: a caller (this thread) asks for a connection.
    /// `request` must be unique among the pool's waiting requests.
    pub fn acquire_start(&self, pool: &str, request: u64) {
        let tid = current_tid();
        self.send(pool, Body::AcquireStart { request, tid });
    }

    /// `acquire_end`: the caller (this thread) got a connection or gave up.
    pub fn acquire_end(&self, pool: &str, request: u64, result: AcquireResult) {
        self.acquire_end_at(pool, request, result, current_tid(), monotonic_ns());
    }

    fn acquire_end_at(
        &self,
        pool: &str,
        request: u64,
        result: AcquireResult,
        tid: Option<u32>,
        mono_ns: u64,
    ) {
        let body = Body::AcquireEnd {
            request,
            result,
            tid,
            wait_ns: None,
        };
        self.send_at(pool, body, mono_ns);
    }

    /// `release`: the caller returned the connection to the pool.
    pub fn release(&self, pool: &str, conn: ConnId) {
        self.send(pool, Body::Release(conn));
    }

    /// `connection_closed`: the pool closed or discarded the connection.
    pub fn connection_closed(&self, pool: &str, conn: ConnId) {
        self.send(pool, Body::ConnectionClosed(conn));
    }

    /// `holder_stack`: the code that holds the checkout of `conn` that
    /// began at `since_ns` (its `acquire_end`'s `mono_ns`), innermost frame
    /// first. Frames are cut to what the agent accepts (32 of 256
    /// characters, no control characters) and, if the message would be
    /// too large, the outermost ones left out. Nothing is sent without a
    /// frame.
    pub fn holder_stack(&self, pool: &str, conn: ConnId, since_ns: u64, stack: Vec<String>) {
        self.holder_stack_at(pool, conn, since_ns, &stack, monotonic_ns());
    }

    fn holder_stack_at(
        &self,
        pool: &str,
        conn: ConnId,
        since_ns: u64,
        stack: &[String],
        mono_ns: u64,
    ) {
        let Some(inner) = &self.inner else {
            return;
        };
        let stack: Vec<String> = stack
            .iter()
            .map(|frame| stack::clean(frame))
            .filter(|frame| !frame.is_empty())
            .take(protocol::MAX_STACK_FRAMES)
            .collect();
        if stack.is_empty() {
            return;
        }
        let body = Body::HolderStack {
            conn,
            since_ns,
            stack,
        };
        let mut message = Message::new(truncate(pool), body).at(mono_ns);
        loop {
            match message.encode() {
                Ok(bytes) => return inner.send(bytes),
                Err(protocol::Error::TooLarge(_)) => match &mut message.body {
                    Body::HolderStack { stack, .. } if stack.len() > 1 => {
                        stack.pop();
                    }
                    _ => break,
                },
                Err(_) => break,
            }
        }
        inner.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The agent socket named by the environment variable's value, if set and
/// not empty.
fn socket_path_from(env: Option<std::ffi::OsString>) -> PathBuf {
    env.filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// At most [`MAX_TEXT_CHARS`] characters, as the agent requires.
fn truncate(text: &str) -> &str {
    match text.char_indices().nth(MAX_TEXT_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// One pool's side of the protocol: its name, its reporter, request ids
/// for acquires, and the connections checked out now, which it re-sends
/// (`pool` and `checkout_state`) when the agent comes back and every
/// [`DEFAULT_STATE_INTERVAL`] while any are out, so that a leak that began
/// before an agent restart is still reported. Share it (`Arc`) among the
/// pool's users.
#[derive(Debug)]
pub struct PoolReporter {
    state: Arc<PoolState>,
    next_request: AtomicU64,
}

/// What a pool re-sends; the state ticker holds it weakly.
#[derive(Debug)]
struct PoolState {
    reporter: Reporter,
    name: String,
    info: Mutex<Option<PoolInfo>>,
    /// Short checkouts waiting to be folded (see `batch`), and the
    /// checkouts out now (one lock for both: each checkout takes it twice).
    batch: Mutex<batch::Batch>,
    /// Whether the state ticker knows this pool.
    watched: AtomicBool,
    /// The batch window in nanoseconds; 0: every event sent at once.
    window_ns: AtomicU64,
    comebacks_seen: AtomicU64,
    /// Nanoseconds between periodic re-sends; 0: none.
    interval_ns: AtomicU64,
    last_state: Mutex<Instant>,
    /// Whether checkouts keep their holder's stack.
    stacks: AtomicBool,
    /// How long a checkout is out before its stack is sent, in nanoseconds.
    stack_after_ns: AtomicU64,
    /// The least time since the process's last capture for a checkout to
    /// capture, in nanoseconds; 0: every checkout captures.
    stack_interval_ns: AtomicU64,
    /// When the last capture was: [`stack::LAST_CAPTURE_NS`] (a test's own
    /// clock in tests).
    last_capture_ns: &'static AtomicU64,
}

impl PoolState {
    /// Re-sends the state if a send just found the agent back.
    fn after_send(&self) {
        let now = self.reporter.comebacks();
        // Loaded first: every checkout passes here, and a swap is a locked
        // instruction each time.
        if self.comebacks_seen.load(Ordering::Acquire) != now
            && self.comebacks_seen.swap(now, Ordering::AcqRel) != now
        {
            self.send_state();
        }
    }

    /// Sends the registration, the checkouts out now (`checkout_state`)
    /// and, right after, the holder stacks already sent for those of them
    /// still out, the same again (the agent kept them in memory only).
    /// Sent with the batch locked, so that no `release` slips between a
    /// checkout's entry or stack and what the pool knows.
    fn send_state(&self) {
        *locked(&self.last_state) = Instant::now();
        if let Some(info) = locked(&self.info).clone() {
            self.reporter.pool(&self.name, &info);
        }
        let batch = locked(&self.batch);
        let entries = batch.checkouts();
        for chunk in entries.chunks(STATE_ENTRIES_PER_MESSAGE) {
            let checkouts = chunk.to_vec();
            // 32 entries of at most ~120 bytes and a 128-character name
            // fit in 4096 bytes.
            self.reporter
                .send(&self.name, Body::CheckoutState { checkouts });
        }
        for (checkout, frames) in batch.sent_stacks() {
            self.reporter.holder_stack_at(
                &self.name,
                checkout.conn,
                checkout.mono_ns,
                &frames,
                monotonic_ns(),
            );
        }
        drop(batch);
    }

    /// Sends a batch's messages; called with the batch locked, so that
    /// messages about one connection leave in order.
    fn send_all(&self, out: Vec<batch::Out>) {
        for (body, at) in out {
            self.reporter.send_at(&self.name, body, at);
        }
    }

    /// Sends the holder stacks due by `now` (monotonic nanoseconds) of the
    /// checkouts still out; returns when the next one is due. Names the
    /// frames without holding the batch's lock (the first time, it reads
    /// the program's symbol table), and sends with it, after whatever
    /// waits about the connection, so that a stack leaves after its
    /// checkout's `acquire_end` and before its `release`.
    fn send_stacks(&self, now: u64) -> Option<u64> {
        let mut due = Vec::new();
        let next = locked(&self.batch).due_stacks(now, &mut due);
        if due.is_empty() {
            return next;
        }
        let named: Vec<_> = due
            .into_iter()
            .map(|(checkout, held)| {
                // Never the state thread's end: a stack is worth less.
                let frames = std::panic::catch_unwind(|| held.capture.frames());
                (checkout, frames.unwrap_or_default())
            })
            .filter(|(_, frames)| !frames.is_empty())
            .collect();
        let mut batch = locked(&self.batch);
        for (checkout, frames) in named {
            let mut out = Vec::new();
            if batch.still_out(&checkout, &mut out) {
                self.send_all(out);
                let frames: Arc<[String]> = frames.into();
                self.reporter.holder_stack_at(
                    &self.name,
                    checkout.conn,
                    checkout.mono_ns,
                    &frames,
                    monotonic_ns(),
                );
                // Kept with the checkout, for the states to come.
                batch.stack_sent(&checkout, frames);
            }
        }
        drop(batch);
        self.after_send();
        next
    }

    /// How long until the periodic state is due (zero: now), or `None`
    /// when there is nothing to send.
    fn state_due(&self, now: Instant) -> Option<Duration> {
        let interval = Duration::from_nanos(self.interval_ns.load(Ordering::Relaxed));
        if interval.is_zero() || !locked(&self.batch).any_out() {
            return None;
        }
        let next = *locked(&self.last_state) + interval;
        Some(next.saturating_duration_since(now))
    }
}

impl batch::Flush for PoolState {
    fn flush(&self, force: bool) -> bool {
        let more = {
            let mut batch = locked(&self.batch);
            let mut out = Vec::new();
            let young = if force {
                0
            } else {
                self.window_ns.load(Ordering::Relaxed)
            };
            let more = batch.flush(monotonic_ns(), young, &mut out);
            batch.scheduled = more;
            self.send_all(out);
            more
        };
        self.after_send();
        more
    }
}

/// One thread per process re-sends the state of pools with connections
/// out, and sends the holder stacks of long checkouts.
struct Ticker {
    pools: Mutex<Vec<Weak<PoolState>>>,
    wake: Condvar,
    started: AtomicBool,
    /// When the ticker must scan the pools next for stacks (monotonic
    /// nanoseconds; 0: now, for a new pool): a checkout whose stack is due
    /// earlier wakes it.
    next_scan_ns: AtomicU64,
}

static TICKER: Ticker = Ticker {
    pools: Mutex::new(Vec::new()),
    wake: Condvar::new(),
    started: AtomicBool::new(false),
    next_scan_ns: AtomicU64::new(u64::MAX),
};

/// Longest the ticker sleeps, so that it notices pools that went away.
const TICKER_MAX_SLEEP: Duration = Duration::from_secs(30);

impl Ticker {
    fn watch(&'static self, pool: &Arc<PoolState>) {
        {
            let mut pools = locked(&self.pools);
            if pools
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(pool)))
            {
                // Watched already: the ticker finds it busy at its next
                // wake (within an interval). Waking it on every idle ->
                // busy would cost a checkout a futex wake-up.
                return;
            }
            pools.retain(|w| w.strong_count() > 0);
            pools.push(Arc::downgrade(pool));
            // A scan now, which learns when its state is due.
            self.next_scan_ns.store(0, Ordering::Release);
        }
        if !self.started.swap(true, Ordering::AcqRel) {
            let spawned = thread::Builder::new()
                .name("poolscope-adapter-state".into())
                .spawn(move || self.run());
            if spawned.is_err() {
                self.started.store(false, Ordering::Release);
            }
        }
        self.wake.notify_one();
    }

    /// A checkout's stack is due at `due_ns`: has the ticker scan by then.
    /// Only a load when it already will (the usual case: it waits for an
    /// older checkout's stack); otherwise a wake-up to set its timer, once
    /// per `stack_after` at most, not once per checkout.
    fn stack_due(&self, due_ns: u64) {
        if due_ns >= self.next_scan_ns.load(Ordering::Acquire) {
            return;
        }
        self.scan_by(due_ns);
    }

    /// Has the ticker scan the pools by `at` (monotonic nanoseconds).
    fn scan_by(&self, at: u64) {
        if at < self.next_scan_ns.fetch_min(at, Ordering::AcqRel) {
            // Taken so that the ticker is either waiting (and wakes) or
            // has yet to read next_scan_ns.
            drop(locked(&self.pools));
            self.wake.notify_one();
        }
    }

    fn run(&'static self) {
        // When the periodic states are due next.
        let mut state_at = 0;
        loop {
            let now = monotonic_ns();
            if now >= state_at.min(self.next_scan_ns.load(Ordering::Acquire)) {
                state_at = now.saturating_add(duration_ns(self.scan()));
                continue;
            }
            let guard = locked(&self.pools);
            // Read again with the lock, which a stack_due that wants an
            // earlier scan takes before it notifies.
            let wake_at = state_at.min(self.next_scan_ns.load(Ordering::Acquire));
            let now = monotonic_ns();
            if wake_at > now {
                let _ = self
                    .wake
                    .wait_timeout(guard, Duration::from_nanos(wake_at - now));
            }
        }
    }

    /// Sends the stacks due and the periodic states due; returns how long
    /// until the next state is due.
    fn scan(&self) -> Duration {
        // Stacks registered from now on ask for their own scan; those still
        // waiting ask below.
        self.next_scan_ns.store(u64::MAX, Ordering::Release);
        let pools: Vec<Arc<PoolState>> = locked(&self.pools)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut sleep = TICKER_MAX_SLEEP;
        let mut next_stack = u64::MAX;
        for pool in &pools {
            if let Some(next) = pool.send_stacks(monotonic_ns()) {
                next_stack = next_stack.min(next);
            }
            let Some(mut due) = pool.state_due(Instant::now()) else {
                continue;
            };
            if due.is_zero() {
                pool.send_state();
                due = Duration::from_nanos(pool.interval_ns.load(Ordering::Relaxed));
            }
            sleep = sleep.min(due);
        }
        drop(pools);
        self.next_scan_ns.fetch_min(next_stack, Ordering::AcqRel);
        sleep.max(Duration::from_millis(10))
    }
}

impl PoolReporter {
    /// `name` must be unique within the process (at most 128 characters;
    /// longer names are cut).
    pub fn new(reporter: Reporter, name: &str) -> PoolReporter {
        PoolReporter {
            state: Arc::new(PoolState {
                comebacks_seen: AtomicU64::new(reporter.comebacks()),
                reporter,
                name: truncate(name).to_string(),
                info: Mutex::new(None),
                batch: Mutex::new(batch::Batch::default()),
                watched: AtomicBool::new(false),
                window_ns: AtomicU64::new(batch::BATCH_WINDOW.as_nanos() as u64),
                interval_ns: AtomicU64::new(DEFAULT_STATE_INTERVAL.as_nanos() as u64),
                last_state: Mutex::new(Instant::now()),
                stacks: AtomicBool::new(stack::stacks_on_from(std::env::var_os(STACKS_ENV))),
                stack_after_ns: AtomicU64::new(duration_ns(stack::stack_after_from(
                    std::env::var_os(STACK_AFTER_ENV),
                ))),
                stack_interval_ns: AtomicU64::new(duration_ns(stack::stack_interval_from(
                    std::env::var_os(STACK_INTERVAL_ENV),
                ))),
                last_capture_ns: &stack::LAST_CAPTURE_NS,
            }),
            next_request: AtomicU64::new(1),
        }
    }

    /// How long short checkouts wait to be folded into one line
    /// ([`BATCH_WINDOW`]); zero sends every event at once, one datagram
    /// each.
    pub fn with_batch_window(self, window: Duration) -> PoolReporter {
        let ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        self.state.window_ns.store(ns, Ordering::Relaxed);
        self
    }

    /// Whether checkouts keep the stack of the code that took the
    /// connection, sent for those still out `stack_after` later. On unless
    /// `POOLSCOPE_ADAPTER_STACKS` is `off` (or `0`, `false`, `no`).
    pub fn with_holder_stacks(self, on: bool) -> PoolReporter {
        self.state.stacks.store(on, Ordering::Relaxed);
        self
    }

    /// How long a checkout is out before its stack is sent:
    /// `POOLSCOPE_ADAPTER_STACK_AFTER_MS`, else [`DEFAULT_STACK_AFTER`].
    pub fn with_stack_after(self, after: Duration) -> PoolReporter {
        self.state
            .stack_after_ns
            .store(duration_ns(after), Ordering::Relaxed);
        self
    }

    /// The least time between two captures in the process for this pool's
    /// checkouts to capture their stack: `POOLSCOPE_ADAPTER_STACK_INTERVAL_US`,
    /// else [`DEFAULT_STACK_INTERVAL`]; zero: every checkout captures. The
    /// time of the last capture is the process's, whatever the pool.
    pub fn with_stack_interval(self, interval: Duration) -> PoolReporter {
        self.state
            .stack_interval_ns
            .store(duration_ns(interval), Ordering::Relaxed);
        self
    }

    /// This pool's captures timed by `clock` instead of the process's.
    #[cfg(test)]
    fn with_capture_clock(mut self, clock: &'static AtomicU64) -> PoolReporter {
        Arc::get_mut(&mut self.state)
            .expect("a new pool")
            .last_capture_ns = clock;
        self
    }

    fn batching(&self) -> bool {
        self.state.window_ns.load(Ordering::Relaxed) > 0
    }

    /// Has the batcher flush this pool's batch (`batch` is its lock);
    /// without a batcher thread, flushes it now.
    fn schedule(&self, batch: &mut batch::Batch) {
        if batch.scheduled {
            return;
        }
        let weak = Arc::downgrade(&self.state);
        if !batch.tracked {
            batch::BATCHER.track(weak.clone());
            batch.tracked = true;
        }
        if batch::BATCHER.schedule(weak) {
            batch.scheduled = true;
            return;
        }
        let mut out = Vec::new();
        batch.flush(monotonic_ns(), 0, &mut out);
        self.state.send_all(out);
    }

    /// How often the checkouts are re-sent while there are any
    /// ([`DEFAULT_STATE_INTERVAL`]; zero turns it off, re-sends after the
    /// agent comes back remain).
    pub fn with_state_interval(self, interval: Duration) -> PoolReporter {
        let ns = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        self.state.interval_ns.store(ns, Ordering::Relaxed);
        self
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn reporter(&self) -> &Reporter {
        &self.state.reporter
    }

    /// Sends the registration, and keeps it to send again with the state.
    pub fn register(&self, info: &PoolInfo) {
        *locked(&self.state.info) = Some(info.clone());
        self.state.reporter.pool(&self.state.name, info);
        self.state.after_send();
    }

    /// Sends the registration and the connections checked out now, as
    /// after an agent restart. The agent takes it idempotently.
    pub fn send_state(&self) {
        self.state.send_state();
    }

    /// Sends `acquire_start` and returns the pending acquire, which sends
    /// `acquire_end` when finished, or `result: "error"` if dropped unfinished
    /// (the caller stopped waiting: a cancelled future, a panic). The
    /// caller's place in the code heads the checkout's holder stack.
    #[track_caller]
    pub fn acquire_start(&self) -> PendingAcquire<'_> {
        self.acquire_start_from(Location::caller())
    }

    /// [`PoolReporter::acquire_start`] for a pool's `get()`, which knows
    /// where its caller is.
    pub(crate) fn acquire_start_from(
        &self,
        caller: &'static Location<'static>,
    ) -> PendingAcquire<'_> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        if self.batching() {
            let (at, tid) = (monotonic_ns(), current_tid());
            let mut batch = locked(&self.state.batch);
            batch.start(request, at, tid);
            self.schedule(&mut batch);
        } else {
            self.state.reporter.acquire_start(&self.state.name, request);
            self.state.after_send();
        }
        PendingAcquire {
            pool: self,
            request,
            done: false,
            caller,
        }
    }

    pub fn connection_created(&self, conn: ConnId) {
        self.state
            .reporter
            .connection_created(&self.state.name, conn);
        self.state.after_send();
    }

    /// `connection_created` of a connection this thread connected (see
    /// [`Reporter::connection_created_here`]).
    pub fn connection_created_here(&self, conn: ConnId) {
        self.state
            .reporter
            .connection_created_here(&self.state.name, conn);
        self.state.after_send();
    }

    pub fn release(&self, conn: ConnId) {
        let at = monotonic_ns();
        let mut batch = locked(&self.state.batch);
        if self.batching() {
            let mut out = Vec::new();
            batch.release(conn, at, &mut out);
            self.schedule(&mut batch);
            self.state.send_all(out);
        } else {
            batch.returned_unbatched(conn);
            self.state.reporter.release(&self.state.name, conn);
        }
        drop(batch);
        self.state.after_send();
    }

    pub fn connection_closed(&self, conn: ConnId) {
        let at = monotonic_ns();
        let mut batch = locked(&self.state.batch);
        if self.batching() {
            let mut out = Vec::new();
            batch.closed(conn, at, &mut out);
            self.state.send_all(out);
        } else {
            batch.closed_unbatched(conn);
            self.state
                .reporter
                .connection_closed(&self.state.name, conn);
        }
        drop(batch);
        self.state.after_send();
    }

    fn finish(&self, request: u64, result: AcquireResult, caller: &'static Location<'static>) {
        let at = monotonic_ns();
        // Walked before the lock is taken: the stack of the code that now
        // holds the connection, if none was captured in the process for
        // `stack_interval` (the acquire_end's time tells).
        let capture = match result {
            AcquireResult::Ok(conn)
                if !conn.is_empty()
                    && self.state.stacks.load(Ordering::Relaxed)
                    && stack::capture_due(
                        self.state.last_capture_ns,
                        at,
                        self.state.stack_interval_ns.load(Ordering::Relaxed),
                    ) =>
            {
                Some(stack::Capture::here(Some(caller)))
            }
            _ => None,
        };
        let tid = current_tid();
        let stack = capture.map(|capture| stack::HeldStack {
            capture,
            due_ns: at.saturating_add(self.state.stack_after_ns.load(Ordering::Relaxed)),
        });
        let stack_due = stack.as_ref().map(|s| s.due_ns);
        let mut batch = locked(&self.state.batch);
        let checked_out = if self.batching() {
            let mut out = Vec::new();
            let checked_out = batch.finish(request, result, tid, at, stack, &mut out);
            self.schedule(&mut batch);
            self.state.send_all(out);
            checked_out
        } else {
            let checked_out = batch.finish_unbatched(result, tid, at, stack);
            self.state
                .reporter
                .acquire_end_at(&self.state.name, request, result, tid, at);
            checked_out
        };
        drop(batch);
        // Once per pool: the ticker then looks at it at every wake.
        if checked_out
            && !self.state.watched.load(Ordering::Relaxed)
            && !self.state.watched.swap(true, Ordering::Relaxed)
        {
            TICKER.watch(&self.state);
        }
        if let Some(due) = stack_due {
            TICKER.stack_due(due);
        }
        self.state.after_send();
    }
}

/// A pool builder's holder-stack settings: the environment's unless set.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StackOptions {
    pub(crate) on: Option<bool>,
    pub(crate) after: Option<Duration>,
    pub(crate) interval: Option<Duration>,
}

impl StackOptions {
    #[cfg_attr(
        not(any(
            feature = "deadpool-postgres",
            feature = "bb8-postgres",
            feature = "sqlx-postgres",
            feature = "sqlx-mysql"
        )),
        allow(dead_code)
    )]
    pub(crate) fn apply(self, mut pool: PoolReporter) -> PoolReporter {
        if let Some(on) = self.on {
            pool = pool.with_holder_stacks(on);
        }
        if let Some(after) = self.after {
            pool = pool.with_stack_after(after);
        }
        if let Some(interval) = self.interval {
            pool = pool.with_stack_interval(interval);
        }
        pool
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An acquire in progress (see [`PoolReporter::acquire_start`]).
#[derive(Debug)]
#[must_use = "dropping it reports the acquire as failed"]
pub struct PendingAcquire<'a> {
    pool: &'a PoolReporter,
    request: u64,
    done: bool,
    caller: &'static Location<'static>,
}

impl PendingAcquire<'_> {
    pub fn request(&self) -> u64 {
        self.request
    }

    pub fn finish(mut self, result: AcquireResult) {
        self.done = true;
        self.pool.finish(self.request, result, self.caller);
    }
}

impl Drop for PendingAcquire<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool
                .finish(self.request, AcquireResult::Error, self.caller);
        }
    }
}

#[cfg(test)]
mod tests;
