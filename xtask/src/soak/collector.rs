//! An OTLP/HTTP "collector" that keeps failing: it answers 200 to every
//! `POST /v1/...` while up, and in its outages either accepts connections
//! and never answers (a hung collector) or does not listen at all (a
//! crashed one). The bodies are counted, not decoded: the soak is about
//! what the agent does while its exports fail, not about what it sends.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// One cycle: up for the first half, out for the second.
pub const CYCLE: Duration = Duration::from_secs(60);
/// Connections handled at once; the agent needs two or three, and a hung
/// phase holds the ones it gives up on until the phase ends.
const MAX_CONNECTIONS: usize = 64;
/// Largest request body accepted (the agent's batches are far smaller).
const MAX_BODY: usize = 64 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Up = 0,
    /// Accepts and never answers.
    Hung = 1,
    /// Not listening: connections are refused.
    Down = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Up,
            1 => Phase::Hung,
            _ => Phase::Down,
        }
    }

    /// Where the schedule is `elapsed` into the run: up, then an outage,
    /// the outages alternating between hung and down.
    pub fn at(elapsed: Duration) -> Phase {
        let cycle = elapsed.as_secs() / CYCLE.as_secs();
        let in_cycle = elapsed.as_secs() % CYCLE.as_secs();
        if in_cycle < CYCLE.as_secs() / 2 {
            Phase::Up
        } else if cycle.is_multiple_of(2) {
            Phase::Hung
        } else {
            Phase::Down
        }
    }
}

/// What the collector saw, for the report.
#[derive(Default)]
pub struct Stats {
    pub metrics_requests: AtomicU64,
    pub logs_requests: AtomicU64,
    pub other_requests: AtomicU64,
    pub connections: AtomicU64,
    /// Connections accepted while hung (held without an answer).
    pub held: AtomicU64,
    pub outages_hung: AtomicU64,
    pub outages_down: AtomicU64,
    /// Times the port could not be bound again after an outage.
    pub rebind_failures: AtomicU64,
}

pub struct Collector {
    pub port: u16,
    pub stats: Arc<Stats>,
    phase: Arc<AtomicU8>,
    open: Arc<AtomicUsize>,
    listener: Option<TcpListener>,
}

impl Collector {
    pub fn bind() -> std::io::Result<Collector> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        Ok(Collector {
            port: listener.local_addr()?.port(),
            stats: Arc::default(),
            phase: Arc::new(AtomicU8::new(Phase::Up as u8)),
            open: Arc::default(),
            listener: Some(listener),
        })
    }

    /// Follows [`Phase::at`] from now until `stop`, accepting connections
    /// and handing each to a thread of its own.
    pub fn run(mut self, stop: &AtomicBool) {
        let started = Instant::now();
        let mut current = Phase::Up;
        while !stop.load(Relaxed) {
            let phase = Phase::at(started.elapsed());
            if phase != current {
                self.enter(phase);
                current = phase;
            }
            match self.listener.as_ref().map(TcpListener::accept) {
                Some(Ok((stream, _))) => self.handle(stream),
                Some(Err(e)) if e.kind() != ErrorKind::WouldBlock => {
                    eprintln!("soak collector: accept: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
        // Handlers see this and close their connections.
        self.phase.store(Phase::Down as u8, Relaxed);
    }

    fn enter(&mut self, phase: Phase) {
        self.phase.store(phase as u8, Relaxed);
        match phase {
            Phase::Down => {
                self.stats.outages_down.fetch_add(1, Relaxed);
                self.listener = None;
            }
            Phase::Hung => {
                self.stats.outages_hung.fetch_add(1, Relaxed);
            }
            Phase::Up => {}
        }
        if phase != Phase::Down && self.listener.is_none() {
            // std sets SO_REUSEADDR, so the port is ours again even with
            // the last connections in TIME_WAIT.
            let bound = TcpListener::bind((Ipv4Addr::LOCALHOST, self.port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l));
            match bound {
                Ok(l) => self.listener = Some(l),
                Err(e) => {
                    self.stats.rebind_failures.fetch_add(1, Relaxed);
                    eprintln!("soak collector: cannot listen on {} again: {e}", self.port);
                }
            }
        }
    }

    fn handle(&self, stream: TcpStream) {
        self.stats.connections.fetch_add(1, Relaxed);
        if self.open.fetch_add(1, Relaxed) >= MAX_CONNECTIONS {
            self.open.fetch_sub(1, Relaxed);
            return;
        }
        if Phase::from_u8(self.phase.load(Relaxed)) == Phase::Hung {
            self.stats.held.fetch_add(1, Relaxed);
        }
        let (phase, stats, open) = (
            Arc::clone(&self.phase),
            Arc::clone(&self.stats),
            Arc::clone(&self.open),
        );
        // Not joined: a handler ends within 200 ms of `run` setting Down.
        thread::spawn(move || {
            serve(stream, &phase, &stats);
            open.fetch_sub(1, Relaxed);
        });
    }
}

/// Answers requests while the phase is up, holds the connection without
/// reading while hung, and closes it when the collector goes down.
fn serve(mut stream: TcpStream, phase: &AtomicU8, stats: &Stats) {
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .is_err()
    {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match Phase::from_u8(phase.load(Relaxed)) {
            Phase::Down => return,
            Phase::Hung => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            Phase::Up => {}
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while let Some(request) = complete_request(&buf) {
            let counter = match request.path.as_str() {
                "/v1/metrics" => &stats.metrics_requests,
                "/v1/logs" => &stats.logs_requests,
                _ => &stats.other_requests,
            };
            counter.fetch_add(1, Relaxed);
            let status = if request.path.starts_with("/v1/") {
                "200 OK"
            } else {
                "404 Not Found"
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
            );
            if stream.write_all(answer.as_bytes()).is_err() {
                return;
            }
            buf.drain(..request.len);
            if request.close {
                return;
            }
        }
        if buf.len() > MAX_BODY {
            return;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    path: String,
    /// Bytes of `buf` it takes, headers and body.
    len: usize,
    close: bool,
}

/// The first request in `buf` once all of it (headers, and a body sized by
/// Content-Length or sent chunked) has arrived.
fn complete_request(buf: &[u8]) -> Option<Request> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split_whitespace().nth(1)?.to_string();
    let (mut length, mut chunked, mut close) = (0usize, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse().ok()?,
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let len = if chunked {
        head_end + chunked_body_len(&buf[head_end..])?
    } else {
        head_end.checked_add(length)?
    };
    (buf.len() >= len).then_some(Request { path, len, close })
}

/// Length of a complete chunked body (through its last, empty chunk and
/// the blank line after it), or None while it is incomplete.
fn chunked_body_len(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + body[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[at..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // No trailers from the agent's client: just the final CRLF.
            return (body.len() >= at + 2).then_some(at + 2);
        }
        at = at.checked_add(size)?.checked_add(2)?;
        if at > body.len() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_alternates_outages() {
        let at = |s| Phase::at(Duration::from_secs(s));
        assert_eq!(at(0), Phase::Up);
        assert_eq!(at(29), Phase::Up);
        assert_eq!(at(30), Phase::Hung);
        assert_eq!(at(60), Phase::Up);
        assert_eq!(at(95), Phase::Down);
        assert_eq!(at(150), Phase::Hung);
    }

    #[test]
    fn finds_whole_requests() {
        let req = b"POST /v1/metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST";
        assert_eq!(
            complete_request(req),
            Some(Request {
                path: "/v1/metrics".into(),
                len: req.len() - 4,
                close: false
            })
        );
        assert_eq!(
            complete_request(b"POST /v1/logs HTTP/1.1\r\ncontent-length: 5\r\n\r\nab"),
            None
        );
        let chunked = b"POST /v1/logs HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let r = complete_request(chunked).expect("complete");
        assert_eq!((r.len, r.close), (chunked.len(), true));
        assert_eq!(complete_request(&chunked[..chunked.len() - 1]), None);
    }
}
