//! The HTTP transport: every connection has deadlines, at most
//! `max_connections` are served at once, and a few reserved slots keep
//! `/healthz` (and `/healthz/live`, `/healthz/ready`) and `/metrics`
//! answering when other clients hold all the rest.
//!
//! Any local user can connect to the API, so a client that opens many
//! connections and sends nothing (or half a request) must neither exhaust
//! the agent's fds nor stall its health checks:
//! - a request's line and headers must arrive within the header-read
//!   timeout, which also ends kept-alive connections waiting for their next
//!   request (hyper starts that timer whenever it waits for a request head);
//! - a connection on which no byte moves for the idle timeout is closed
//!   (a client that stops reading its response holds nothing for long);
//! - beyond `max_connections`, a connection is read only as far as its
//!   request line, within a second, on one of [`RESERVED_SLOTS`] slots: a
//!   GET or HEAD of /healthz or /metrics is served there (one request, then
//!   close), anything else is answered 503. When those slots are all taken
//!   the oldest still reading its request line is dropped for the newcomer
//!   (one already answering a probe only when none is left), so a flood
//!   must outpace a real probe, which sends its request line with its first
//!   packet;
//! - accept errors (EMFILE and kin) pause the loop instead of spinning it.

use std::{
    collections::BTreeMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant as StdInstant},
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
    time::{sleep, sleep_until, timeout, Instant},
};

use super::{config::HttpConfig, PROBE_PATHS};
use crate::ratelimit::RateLimitedLog;

/// Connections beyond `max_connections` that may be read for a probe's
/// request line at once.
pub const RESERVED_SLOTS: usize = 16;
/// How long a connection on a reserved slot gets to send its request line
/// (and then its headers): probes send them at once.
const PROBE_LINE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a probe connection lives, response included.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);
/// The longest request line a probe may send (`GET /metrics?...`).
const MAX_PROBE_LINE: usize = 2048;
/// hyper's read buffer per connection (it bounds the request head): with
/// 256 connections that is 16 MiB at most, not hyper's 400 KiB each.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// At most one warning per this long about refused connections or accept
/// errors: a flood must not become a flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What bounds the HTTP connections, from `[http]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn from_config(http: &HttpConfig) -> Limits {
        Limits {
            max_connections: http.max_connections.get(),
            header_read_timeout: http.header_read_timeout_seconds.get(),
            idle_timeout: http.idle_timeout_seconds.get(),
        }
    }
}

type Service = TowerToHyperService<Router>;

/// What every connection task shares.
struct Shared {
    service: Service,
    limits: Limits,
    /// Keep-alive connections for everything.
    general: http1::Builder,
    /// One request per connection, with a probe's short deadlines.
    probe: http1::Builder,
    reserved: Reserved,
}

/// Raises the soft fd limit to the hard one (systemd and container runtimes
/// often start services at 1,024 soft with a far higher hard limit), and
/// warns when the result leaves little room beside `max_connections` HTTP
/// connections and `max_streams` adapter streams: the BPF maps, programs
/// and sockets of the rest of the agent need fds too.
pub fn raise_fd_limit(max_connections: usize, max_streams: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into memory we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from memory we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // A stream holds its socket and a pidfd of its process.
    let needed = (max_connections + RESERVED_SLOTS + 2 * max_streams) as u64 + 512;
    if limit.rlim_cur < needed {
        log::warn!(
            "the fd limit is {} (RLIMIT_NOFILE), less than [http] max_connections = {} and \
             [adapter] max_streams = {} need beside the agent's own fds ({needed}): raise \
             LimitNOFILE or lower those",
            limit.rlim_cur,
            max_connections,
            max_streams
        );
    }
}

/// Serves `app` on `listener` until the task is dropped. Only a failure to
/// run at all returns; errors of single connections are theirs alone.
pub async fn run(listener: TcpListener, app: Router, limits: Limits) -> anyhow::Result<()> {
    let mut general = http1::Builder::new();
    general
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let mut probe = general.clone();
    probe
        .header_read_timeout(PROBE_LINE_TIMEOUT.min(limits.header_read_timeout))
        .keep_alive(false);
    let shared = Arc::new(Shared {
        service: TowerToHyperService::new(app),
        limits,
        general,
        probe,
        reserved: Reserved::new(RESERVED_SLOTS),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut over_cap = RateLimitedLog::new(WARN_EVERY);
    let mut accept_errors = RateLimitedLog::new(WARN_EVERY);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds or memory: the next accept would fail the same
                // way at once, so give closing connections time to free some.
                let pause = match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        Duration::from_millis(100)
                    }
                    _ => Duration::from_millis(5),
                };
                if let Some(more) = accept_errors.allow(StdInstant::now()) {
                    log::warn!(
                        "HTTP: cannot accept connections: {e} ({more} more times since the last \
                         warning); pausing {pause:?}"
                    );
                }
                sleep(pause).await;
                continue;
            }
        };
        // Responses are written whole; no reason to wait for more.
        let _ = stream.set_nodelay(true);
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    serve_general(stream, &shared).await;
                    drop(permit);
                });
            }
            Err(_) => {
                if let Some(more) = over_cap.allow(StdInstant::now()) {
                    log::warn!(
                        "HTTP: all {} connections are in use; this one and {more} more since the \
                         last warning got only /healthz and /metrics (others: 503)",
                        limits.max_connections
                    );
                }
                let slot = shared.reserved.admit();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = slot.evicted.notified() => {}
                        _ = timeout(PROBE_DEADLINE, serve_reserved(stream, &shared, slot.seq)) => {}
                    }
                    shared.reserved.release(slot.seq);
                });
            }
        }
    }
}

/// A connection within `max_connections`: keep-alive HTTP/1.1 with the
/// header-read timeout, closed when idle.
async fn serve_general(stream: TcpStream, shared: &Shared) {
    let activity = Activity::new();
    let io = TokioIo::new(Io::new(stream, Vec::new(), activity.clone()));
    let connection = shared.general.serve_connection(io, shared.service.clone());
    tokio::select! {
        // Errors are the client's (timeouts, resets, bad requests): hyper
        // has answered what can be answered.
        _ = connection => {}
        _ = activity.idle_for(shared.limits.idle_timeout) => {}
    }
}

/// A connection beyond `max_connections` on reserved slot `seq`: served
/// only if it is a probe.
async fn serve_reserved(mut stream: TcpStream, shared: &Shared, seq: u64) {
    let Ok(Ok(Some(head))) = timeout(PROBE_LINE_TIMEOUT, read_request_line(&mut stream)).await
    else {
        return;
    };
    if !is_probe_line(&head) {
        refuse(stream).await;
        return;
    }
    // From here the slot serves a real probe: newcomers evict others first.
    shared.reserved.verified(seq);
    // hyper reads the request from the start: the line we took comes first.
    let io = TokioIo::new(Io::new(stream, head, Activity::new()));
    let _ = shared
        .probe
        .serve_connection(io, shared.service.clone())
        .await;
}

/// Reads until the end of the first line (or [`MAX_PROBE_LINE`] bytes):
/// everything read, or `None` when the line does not end in time to be a
/// probe's.
async fn read_request_line(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while head.len() < MAX_PROBE_LINE {
        let room = chunk.len().min(MAX_PROBE_LINE - head.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.contains(&b'\n') {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

/// Whether a request starts with `GET` or `HEAD` of /healthz or /metrics.
pub fn is_probe_line(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut words = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return false;
    };
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    matches!(method, b"GET" | b"HEAD")
        && PROBE_PATHS.iter().any(|p| p.as_bytes() == path)
        && version.starts_with(b"HTTP/1.")
}

/// Answers 503 and closes, reading what the client still sends for a
/// moment so that the close does not reset the answer away.
async fn refuse(mut stream: TcpStream) {
    const BODY: &str =
        "busy: all HTTP connections are in use; only /healthz and /metrics are served now\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Retry-After: 1\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = timeout(Duration::from_millis(500), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// The reserved slots: at most `slots` connections, and a newcomer evicts
/// the oldest still reading its request line (probes send theirs at once,
/// so the oldest is the one most likely holding its slot on purpose); one
/// verified as a probe only when every slot is, and then the oldest.
struct Reserved {
    slots: usize,
    held: Mutex<(u64, BTreeMap<u64, Held>)>,
}

/// One taken slot: how to tell its task to go, and whether its request
/// line was a probe's.
struct Held {
    evicted: Arc<Notify>,
    verified: bool,
}

struct Slot {
    seq: u64,
    evicted: Arc<Notify>,
}

impl Reserved {
    fn new(slots: usize) -> Reserved {
        Reserved {
            slots,
            held: Mutex::new((0, BTreeMap::new())),
        }
    }

    fn admit(&self) -> Slot {
        // Nothing panics while the lock is held, so a poisoned lock still
        // holds a consistent table.
        let mut guard = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (next, held) = &mut *guard;
        let seq = *next;
        *next += 1;
        while held.len() >= self.slots {
            // Sequence numbers grow, so the map's first matching entry is
            // the oldest; at most `slots` entries to look through.
            let victim = held
                .iter()
                .find(|(_, h)| !h.verified)
                .or_else(|| held.iter().next())
                .map(|(&seq, _)| seq);
            let Some(victim) = victim.and_then(|seq| held.remove(&seq)) else {
                break;
            };
            // notify_one keeps the wake-up for a task not waiting yet.
            victim.evicted.notify_one();
        }
        let evicted = Arc::new(Notify::new());
        held.insert(
            seq,
            Held {
                evicted: Arc::clone(&evicted),
                verified: false,
            },
        );
        Slot { seq, evicted }
    }

    /// Slot `seq` serves a probe: evicted only after every unverified slot.
    /// A slot evicted meanwhile stays gone (its task is being stopped).
    fn verified(&self, seq: u64) {
        let mut guard = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = guard.1.get_mut(&seq) {
            held.verified = true;
        }
    }

    fn release(&self, seq: u64) {
        let mut guard = self.held.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.remove(&seq);
    }
}

/// When a byte last moved on a connection.
#[derive(Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    }
}

/// A TCP stream that first replays `head` (bytes already read from it) and
/// notes every byte that moves.
struct Io {
    head: Vec<u8>,
    pos: usize,
    inner: TcpStream,
    activity: Activity,
}

impl Io {
    fn new(inner: TcpStream, head: Vec<u8>, activity: Activity) -> Io {
        Io {
            head,
            pos: 0,
            inner,
            activity,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.pos);
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines() {
        for yes in [
            &b"GET /healthz HTTP/1.1\r\n"[..],
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
            b"HEAD /healthz HTTP/1.0\n",
            b"GET /healthz/live HTTP/1.1\r\n",
            b"GET /healthz/ready HTTP/1.1\r\n",
            b"GET /metrics?name[]=x HTTP/1.1\r\n",
        ] {
            assert!(is_probe_line(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"GET /api/v1/connections HTTP/1.1\r\n"[..],
            b"POST /healthz HTTP/1.1\r\n",
            b"GET /healthz/x HTTP/1.1\r\n",
            b"GET /healthz/liveness HTTP/1.1\r\n",
            b"GET http://x/healthz HTTP/1.1\r\n",
            b"GET /healthz  HTTP/1.1\r\n",
            b"GET /healthz\r\n",
            b"GET /healthz HTTP/2\r\n",
            b"",
        ] {
            assert!(!is_probe_line(no), "{}", String::from_utf8_lossy(no));
        }
    }

    /// One HTTP/1.0 GET: the status, or 0 when the connection closed first.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream
                .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await?;
            Ok::<_, io::Error>(raw)
        };
        let raw = timeout(Duration::from_secs(2), exchange)
            .await
            .expect("answered within 2 s")
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        (status, body.unwrap_or_default())
    }

    /// Serves `app` on a loopback port, at most 4 connections at once.
    async fn start(
        app: Router,
        header_read_timeout: Duration,
        idle_timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        Limits,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            max_connections: 4,
            header_read_timeout,
            idle_timeout,
        };
        (addr, limits, tokio::spawn(run(listener, app, limits)))
    }

    #[tokio::test]
    async fn probes_are_served_when_half_open_connections_hold_every_slot() {
        use axum::routing::get as route;
        let app = Router::new()
            .route("/healthz", route(|| async { "ok\n" }))
            .route("/api", route(|| async { "api\n" }));
        let (addr, limits, server) =
            start(app, Duration::from_millis(500), Duration::from_secs(5)).await;
        // Every general and reserved slot taken by half a request line.
        let mut hogs = Vec::new();
        for _ in 0..limits.max_connections + RESERVED_SLOTS {
            let mut hog = TcpStream::connect(addr).await.expect("connect");
            hog.write_all(b"GET /api HT").await.expect("write");
            hogs.push(hog);
        }
        sleep(Duration::from_millis(100)).await;

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(get(addr, "/api").await.0, 503);
        // The probe evicted the oldest reserved hog; the header-read timeout
        // (general slots) and the request-line deadline (reserved) close
        // the rest.
        for (i, hog) in hogs.iter_mut().enumerate() {
            let mut byte = [0u8; 64];
            let read = timeout(Duration::from_secs(3), hog.read(&mut byte)).await;
            assert!(
                matches!(read, Ok(Ok(0) | Err(_))),
                "hog {i} still open: {read:?}"
            );
        }
        assert_eq!(get(addr, "/api").await, (200, "api\n".to_owned()));
        server.abort();
    }

    #[tokio::test]
    async fn a_connection_where_nothing_moves_is_closed() {
        use axum::routing::get as route;
        // A response that never comes stands for a client that never reads.
        let app = Router::new().route("/stall", route(std::future::pending::<&'static str>));
        let (addr, _, server) =
            start(app, Duration::from_secs(5), Duration::from_millis(300)).await;
        let started = Instant::now();
        assert_eq!(get(addr, "/stall").await.0, 0, "closed without an answer");
        assert!(started.elapsed() >= Duration::from_millis(300));
        server.abort();
    }

    #[test]
    fn a_newcomer_evicts_the_oldest_reserved_slot() {
        let reserved = Reserved::new(2);
        let a = reserved.admit();
        let b = reserved.admit();
        let c = reserved.admit();
        let held = |r: &Reserved| r.held.lock().map(|g| g.1.len()).unwrap_or(0);
        assert_eq!(held(&reserved), 2);
        // `a` was told to go (the wake-up waits for it); `b` and `c` were not.
        let waker = futures_executor::block_on(async {
            tokio::select! {
                biased;
                _ = a.evicted.notified() => "a",
                _ = b.evicted.notified() => "b",
                _ = c.evicted.notified() => "c",
                _ = std::future::ready(()) => "none",
            }
        });
        assert_eq!(waker, "a");
        reserved.release(a.seq);
        reserved.release(b.seq);
        assert_eq!(held(&reserved), 1);
        reserved.release(c.seq);
        assert_eq!(held(&reserved), 0);
    }

    /// Whether `slot` was told to go (taking the wake-up).
    fn told_to_go(slot: &Slot) -> bool {
        futures_executor::block_on(async {
            tokio::select! {
                biased;
                _ = slot.evicted.notified() => true,
                _ = std::future::ready(()) => false,
            }
        })
    }

    #[test]
    fn a_slot_answering_a_probe_is_evicted_only_after_those_still_reading() {
        let reserved = Reserved::new(2);
        let a = reserved.admit();
        let b = reserved.admit();
        // `a` sent a probe's line and is being answered; `b` sends nothing.
        reserved.verified(a.seq);
        let c = reserved.admit();
        assert!(told_to_go(&b), "the reader goes first, though younger");
        assert!(!told_to_go(&a));
        reserved.release(b.seq);
        // Every slot verified: the oldest goes.
        reserved.verified(c.seq);
        let d = reserved.admit();
        assert!(told_to_go(&a));
        assert!(!told_to_go(&c));
        assert!(!told_to_go(&d));
        // A slot evicted before its line was verified stays evicted.
        reserved.verified(a.seq);
        let held = reserved.held.lock().map(|g| g.1.len()).unwrap_or(0);
        assert_eq!(held, 2);
        let e = reserved.admit();
        assert!(told_to_go(&d), "d still reads; c is verified");
        assert!(!told_to_go(&c));
        assert!(!told_to_go(&e));
    }
}
