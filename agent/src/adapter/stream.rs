//! The adapter stream socket: the same JSON messages as the datagram
//! socket, one per line, for runtimes that cannot send credentialed Unix
//! datagrams (the JVM, Node without native code). The kernel names the
//! sender once, at accept (SO_PEERCRED); what a stream says never does.
//!
//! Bounds: a line longer than a datagram may be drops the stream (the
//! sender is broken or hostile, and resynchronising inside a flood of bytes
//! is guesswork); streams are capped per uid and in all, so one user's
//! idle streams cannot take the slots of another's; a stream lives no
//! longer than the process that opened it (a pidfd), so a child that
//! inherited it cannot speak for a later process that reuses the pid.

use std::{
    collections::HashMap,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    io::{unix::AsyncFd, AsyncReadExt},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};

use poolscope_adapter_protocol as wire;

use super::{
    message::{MessageError, MAX_MESSAGE_BYTES},
    server::{admit_sender, bind_socket_file, judge_message, Outcome, Senders},
};

/// Streams open at once, in all and per uid, and how long a new stream
/// may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_streams: usize,
    pub max_streams_per_uid: usize,
    /// A stream whose first complete line has not come by then is closed:
    /// otherwise a sender could hold its uid's slots (and, with a few
    /// uids, everyone's) with connections that say nothing.
    pub first_line_timeout: Duration,
}

/// The adapters send their registration as they connect; this leaves a
/// stalled process plenty of room.
pub const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_streams: 1024,
            max_streams_per_uid: 64,
            first_line_timeout: FIRST_LINE_TIMEOUT,
        }
    }
}

/// Splits a byte stream into lines of at most `max_line` bytes (the
/// newline not counted). It keeps at most one partial line and the bytes
/// of the last read, and hands lines out one at a time, so that a reader
/// can wait between them.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Where the next line starts in `buf`.
    start: usize,
    max_line: usize,
}

/// A line longer than the limit: the stream must be dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct Oversized(pub usize);

impl LineFramer {
    pub fn new(max_line: usize) -> LineFramer {
        LineFramer {
            buf: Vec::new(),
            start: 0,
            max_line,
        }
    }

    /// Appends what was read.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (without its newline, a trailing `\r`
    /// removed; empty lines skipped), `None` when no complete line is left,
    /// or `Oversized` when a line, complete or not, is longer than allowed.
    pub fn next_line(&mut self) -> Option<Result<&[u8], Oversized>> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
                return (rest.len() > self.max_line).then_some(Err(Oversized(rest.len())));
            };
            if newline > self.max_line {
                return Some(Err(Oversized(newline)));
            }
            let line_start = self.start;
            self.start += newline + 1;
            let line = &self.buf[line_start..line_start + newline];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.is_empty() {
                // Re-borrowed so that the loop's earlier borrow has ended.
                let end = line_start + line.len();
                return Some(Ok(&self.buf[line_start..end]));
            }
        }
    }
}

/// Open streams per uid and in all.
#[derive(Debug, Default)]
struct OpenStreams {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

/// A slot for one stream, given back when dropped.
struct Slot {
    open: Arc<Mutex<OpenStreams>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_uid.remove(&self.uid);
            }
        }
    }
}

fn take_slot(open: &Arc<Mutex<OpenStreams>>, uid: u32, limits: StreamLimits) -> Option<Slot> {
    let mut streams = open.lock().unwrap_or_else(PoisonError::into_inner);
    let of_uid = streams.per_uid.get(&uid).copied().unwrap_or(0);
    if streams.total >= limits.max_streams || of_uid >= limits.max_streams_per_uid {
        return None;
    }
    streams.total += 1;
    *streams.per_uid.entry(uid).or_default() += 1;
    Some(Slot {
        open: Arc::clone(open),
        uid,
    })
}

pub struct AdapterStreamSocket {
    listener: UnixListener,
    path: PathBuf,
    senders: Senders,
    limits: StreamLimits,
    open: Arc<Mutex<OpenStreams>>,
}

impl AdapterStreamSocket {
    /// Binds the stream socket (replacing a stale one) with the given mode.
    pub fn bind(
        path: &Path,
        mode: u32,
        senders: Senders,
        limits: StreamLimits,
    ) -> anyhow::Result<AdapterStreamSocket> {
        let listener = bind_socket_file(path, mode, "adapter stream socket", |path| {
            UnixListener::bind(path)
        })?;
        Ok(AdapterStreamSocket {
            listener,
            path: path.to_path_buf(),
            senders,
            limits,
            open: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts streams for ever, sending what each line became to
    /// `outcomes`. A stream is closed at once, and reported to `refused`
    /// (never through the channel, which a flood of refusals would fill),
    /// when the kernel cannot name its sender, the allow-lists refuse it,
    /// its process is already gone, or its uid (or everyone) has as many
    /// streams open as allowed.
    pub async fn serve(
        self,
        outcomes: mpsc::Sender<Outcome>,
        refused: impl Fn(Outcome) + Send + Sync + 'static,
    ) {
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                // Out of fds and the like: the agent lives on; wait a little.
                Err(e) => {
                    log::debug!("adapter stream accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let creds = match stream.peer_cred() {
                Ok(cred) => libc::ucred {
                    pid: cred.pid().unwrap_or(0),
                    uid: cred.uid(),
                    gid: cred.gid(),
                },
                Err(_) => {
                    refused(Outcome::Rejected {
                        pid: None,
                        error: MessageError::UnknownSender,
                    });
                    continue;
                }
            };
            let pid = match admit_sender(&creds, &self.senders) {
                Ok(pid) => pid,
                Err(refusal) => {
                    refused(refusal.into());
                    continue;
                }
            };
            let Some(exited) = ProcessExit::watch(&stream, pid) else {
                refused(Outcome::Rejected {
                    pid: Some(pid),
                    error: MessageError::SenderExited,
                });
                continue;
            };
            let Some(slot) = take_slot(&self.open, creds.uid, self.limits) else {
                refused(Outcome::StreamLimit {
                    pid: Some(pid),
                    uid: creds.uid,
                });
                continue;
            };
            tokio::spawn(read_stream(
                stream,
                pid,
                creds.uid,
                exited,
                outcomes.clone(),
                slot,
                self.limits.first_line_timeout,
            ));
        }
    }
}

impl Drop for AdapterStreamSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Readable once the process exits: a pidfd, from the socket itself
/// (`SO_PEERPIDFD`, Linux 6.5+, exact) or else opened by pid right after
/// accept (the process connected a moment ago, so the pid is still its).
struct ProcessExit(AsyncFd<OwnedFd>);

/// `SO_PEERPIDFD` (linux/socket.h), which the libc crate may not name.
const SO_PEERPIDFD: libc::c_int = 77;

impl ProcessExit {
    fn watch(stream: &UnixStream, pid: u32) -> Option<ProcessExit> {
        let fd = peer_pidfd(stream).or_else(|| open_pidfd(pid))?;
        // SAFETY: the OwnedFd owns the pidfd for as long as the AsyncFd owns
        // it, and always reports that same fd.
        unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .ok()
            .map(ProcessExit)
    }

    async fn exited(&self) {
        // Readable means exited; an error means the same to us.
        let _ = self.0.readable().await;
    }
}

fn peer_pidfd(stream: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and a c_int with its size for the answer.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: the kernel returned a new fd that nothing else owns.
    (rc == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one stream's lines until it closes, breaks a bound (a line too
/// long, no first line within `first_line_timeout`), its process exits (a
/// child that inherited the stream cannot outlive the process the kernel
/// named), or the agent stops listening. Each line's outcome
/// waits for room in the channel before the next line is read, so a
/// stream holds at most one read's bytes and one outcome; streams share
/// the channel in turn.
async fn read_stream(
    mut stream: UnixStream,
    pid: u32,
    uid: u32,
    exited: ProcessExit,
    outcomes: mpsc::Sender<Outcome>,
    _slot: Slot,
    first_line_timeout: Duration,
) {
    let mut framer = LineFramer::new(MAX_MESSAGE_BYTES);
    let mut buf = vec![0u8; 8192];
    let first_line_due = tokio::time::sleep(first_line_timeout);
    tokio::pin!(first_line_due);
    let mut spoke = false;
    loop {
        let n = tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = exited.exited() => return,
            () = &mut first_line_due, if !spoke => {
                let _ = outcomes
                    .send(Outcome::Rejected {
                        pid: Some(pid),
                        error: MessageError::SilentStream,
                    })
                    .await;
                return;
            }
        };
        framer.push(&buf[..n]);
        while let Some(line) = framer.next_line() {
            spoke = true;
            let outcome = match line {
                Ok(line) => judge_message(line, pid, uid),
                Err(Oversized(len)) => {
                    let _ = outcomes
                        .send(Outcome::Rejected {
                            pid: Some(pid),
                            error: MessageError::Refused(wire::Error::TooLarge(len)),
                        })
                        .await;
                    return;
                }
            };
            if outcomes.send(outcome).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(framer: &mut LineFramer, bytes: &[u8]) -> Result<Vec<String>, Oversized> {
        framer.push(bytes);
        let mut out = Vec::new();
        while let Some(line) = framer.next_line() {
            out.push(String::from_utf8_lossy(line?).into_owned());
        }
        Ok(out)
    }

    #[test]
    fn lines_are_split_across_reads_and_blank_lines_skipped() {
        let mut f = LineFramer::new(16);
        assert_eq!(lines(&mut f, b"ab").as_deref(), Ok(&[][..]));
        assert_eq!(
            lines(&mut f, b"c\n\nde\r\nf").expect("fits"),
            vec!["abc", "de"]
        );
        assert_eq!(lines(&mut f, b"\n").expect("fits"), vec!["f"]);
    }

    #[test]
    fn an_oversized_line_is_refused_whether_complete_or_not() {
        let mut f = LineFramer::new(4);
        assert_eq!(lines(&mut f, b"12345\n"), Err(Oversized(5)));
        let mut f = LineFramer::new(4);
        assert_eq!(lines(&mut f, b"123").expect("fits"), Vec::<String>::new());
        assert_eq!(lines(&mut f, b"45"), Err(Oversized(5)));
        let mut f = LineFramer::new(4);
        assert_eq!(lines(&mut f, b"1234\n1234").expect("fits"), vec!["1234"]);
    }

    #[test]
    fn every_cut_of_a_stream_gives_the_same_lines() {
        let stream = b"{\"a\":1}\n{\"b\":2}\r\n\n{\"c\":3}\n";
        let whole = lines(&mut LineFramer::new(64), stream).expect("fits");
        for cut in 0..stream.len() {
            let mut f = LineFramer::new(64);
            let mut got = lines(&mut f, &stream[..cut]).expect("fits");
            got.extend(lines(&mut f, &stream[cut..]).expect("fits"));
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn the_framer_holds_at_most_one_partial_line_and_the_last_read() {
        let mut f = LineFramer::new(8);
        let mut got = Vec::new();
        for _ in 0..10_000 {
            got.extend(lines(&mut f, b"ab\ncd\nef").expect("fits"));
            assert!(f.buf.len() <= 8 + 8, "kept {} bytes", f.buf.len());
        }
        assert_eq!(got.len(), 20_000);
        assert!(got
            .iter()
            .all(|l| ["ab", "cd", "efab"].contains(&l.as_str())));
    }

    #[test]
    fn slots_are_bounded_per_uid_and_in_all_and_given_back() {
        let open = Arc::default();
        let limits = StreamLimits {
            max_streams: 3,
            max_streams_per_uid: 2,
            ..StreamLimits::default()
        };
        let a1 = take_slot(&open, 1000, limits).expect("first");
        let _a2 = take_slot(&open, 1000, limits).expect("second");
        assert!(take_slot(&open, 1000, limits).is_none(), "per uid");
        let _b1 = take_slot(&open, 1001, limits).expect("other uid");
        assert!(take_slot(&open, 1002, limits).is_none(), "in all");
        drop(a1);
        assert!(take_slot(&open, 1002, limits).is_some(), "given back");
    }

    /// A stream socket served in a directory of its own: the directory,
    /// the socket's path, the server's task and its outcomes.
    fn serve_in(
        name: &str,
        limits: StreamLimits,
    ) -> (
        PathBuf,
        PathBuf,
        tokio::task::JoinHandle<()>,
        mpsc::Receiver<Outcome>,
    ) {
        let dir = std::env::temp_dir().join(format!("poolscope-{name}-{}", std::process::id()));
        let path = dir.join("adapter-stream.sock");
        let server =
            AdapterStreamSocket::bind(&path, 0o666, Senders::default(), limits).expect("bind");
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(server.serve(tx, |refused| panic!("refused {refused:?}")));
        (dir, path, task, rx)
    }

    #[tokio::test]
    async fn a_stream_silent_past_its_first_line_time_is_closed_and_one_that_spoke_is_not() {
        use tokio::io::AsyncWriteExt;
        let limits = StreamLimits {
            first_line_timeout: Duration::from_millis(300),
            ..StreamLimits::default()
        };
        let (dir, path, serving, mut rx) = serve_in("silent", limits);
        let mut silent = UnixStream::connect(&path).await.expect("connect");
        let mut talker = UnixStream::connect(&path).await.expect("connect");
        // Half a line is not a line.
        silent.write_all(b"{\"v\":1,").await.expect("write");
        talker
            .write_all(b"{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":3}\n")
            .await
            .expect("write");
        assert!(matches!(
            rx.recv().await.expect("outcome"),
            Outcome::Accepted(_)
        ));
        let outcome = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        match outcome
            .expect("the silent stream's outcome in time")
            .expect("outcome")
        {
            Outcome::Rejected {
                pid,
                error: MessageError::SilentStream,
            } => assert_eq!(pid, Some(std::process::id())),
            other => panic!("unexpected {other:?}"),
        }
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "the silent one is closed: {closed:?}"
        );
        // The one that spoke in time is still read, well past the timeout.
        tokio::time::sleep(Duration::from_millis(400)).await;
        talker
            .write_all(b"{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":4}\n")
            .await
            .expect("write");
        assert!(matches!(
            rx.recv().await.expect("outcome"),
            Outcome::Accepted(_)
        ));
        serving.abort();
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn lines_from_a_stream_are_judged_with_the_peers_pid() {
        use tokio::io::AsyncWriteExt;
        let (dir, path, serving, mut rx) = serve_in("stream", StreamLimits::default());
        let mut client = UnixStream::connect(&path).await.expect("connect");
        client
            .write_all(b"{\"v\":1,\"kind\":\"release\",\"pool\":\"p\",\"fd\":3}\nnot json\n")
            .await
            .expect("write");
        match rx.recv().await.expect("outcome") {
            Outcome::Accepted(r) => assert_eq!(r.pid, std::process::id()),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            rx.recv().await.expect("outcome"),
            Outcome::Rejected {
                error: MessageError::Refused(wire::Error::Malformed(_)),
                ..
            }
        ));
        // A line past the limit drops the stream: the agent closes it.
        client
            .write_all(&vec![b'x'; MAX_MESSAGE_BYTES + 2])
            .await
            .expect("write");
        assert!(matches!(
            rx.recv().await.expect("outcome"),
            Outcome::Rejected {
                error: MessageError::Refused(wire::Error::TooLarge(_)),
                ..
            }
        ));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_to_end(&mut rest),
        )
        .await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "the agent closes the stream: {closed:?}"
        );
        serving.abort();
        let _ = fs::remove_dir_all(&dir);
    }
}
