//! The adapter stream socket: the same JSON messages as the datagram
//! socket, one per line, for runtimes that cannot send credentialed Unix
//! datagrams (the JVM, Node without native code). The kernel names the
//! sender once, at accept (SO_PEERCRED); what a stream says never does.
//!
//! Bounds: a line longer than a datagram may be drops the stream (the
//! sender is broken or hostile, and resynchronising inside a flood of bytes
//! is guesswork); streams are capped per uid and in all, so one user's
//! idle streams cannot take the slots of another's.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{
    io::AsyncReadExt,
    net::{UnixListener, UnixStream},
    sync::mpsc,
};

use poolscope_adapter_protocol as wire;

use super::{
    message::{MessageError, MAX_MESSAGE_BYTES},
    server::{bind_socket_file, judge, Outcome, Senders},
};

/// Streams open at once, in all and per uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_streams: usize,
    pub max_streams_per_uid: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_streams: 1024,
            max_streams_per_uid: 64,
        }
    }
}

/// Splits a byte stream into lines of at most `max_line` bytes (the
/// newline not counted), keeping at most one partial line.
#[derive(Debug)]
pub struct LineFramer {
    partial: Vec<u8>,
    max_line: usize,
}

/// A line longer than the limit: the stream must be dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct Oversized(pub usize);

impl LineFramer {
    pub fn new(max_line: usize) -> LineFramer {
        LineFramer {
            partial: Vec::new(),
            max_line,
        }
    }

    /// Feeds `bytes`, handing each complete line (without its newline, a
    /// trailing `\r` removed; empty lines skipped) to `line`.
    pub fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(&[u8])) -> Result<(), Oversized> {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(newline);
            bytes = &rest[1..];
            let whole_len = self.partial.len() + head.len();
            if whole_len > self.max_line {
                return Err(Oversized(whole_len));
            }
            let whole: &[u8] = if self.partial.is_empty() {
                head
            } else {
                self.partial.extend_from_slice(head);
                &self.partial
            };
            let whole = whole.strip_suffix(b"\r").unwrap_or(whole);
            if !whole.is_empty() {
                line(whole);
            }
            self.partial.clear();
        }
        let pending = self.partial.len() + bytes.len();
        if pending > self.max_line {
            return Err(Oversized(pending));
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
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
    /// `outcomes`. A stream over the limits is closed at once, and so is
    /// one whose sender the kernel cannot name; each is reported as a
    /// rejection.
    pub async fn serve(self, outcomes: mpsc::Sender<Outcome>) -> io::Result<()> {
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
                    let _ = outcomes.try_send(Outcome::Rejected {
                        pid: None,
                        error: MessageError::UnknownSender,
                    });
                    continue;
                }
            };
            let Some(slot) = take_slot(&self.open, creds.uid, self.limits) else {
                let _ = outcomes.try_send(Outcome::StreamLimit {
                    pid: u32::try_from(creds.pid).ok().filter(|&p| p > 0),
                    uid: creds.uid,
                });
                continue;
            };
            tokio::spawn(read_stream(
                stream,
                creds,
                self.senders.clone(),
                outcomes.clone(),
                slot,
            ));
        }
    }
}

impl Drop for AdapterStreamSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads one stream's lines until it closes, breaks a bound, or the agent
/// stops listening. Outcomes wait for room in the channel: a sender that
/// writes faster than the agent applies is slowed by its own socket
/// buffer, never by others.
async fn read_stream(
    mut stream: UnixStream,
    creds: libc::ucred,
    senders: Senders,
    outcomes: mpsc::Sender<Outcome>,
    _slot: Slot,
) {
    let mut framer = LineFramer::new(MAX_MESSAGE_BYTES);
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut judged = Vec::new();
        let fed = framer.feed(&buf[..n], |line| {
            judged.push(judge(line, false, Some(creds), &senders));
        });
        for outcome in judged {
            if outcomes.send(outcome).await.is_err() {
                return;
            }
        }
        if let Err(Oversized(len)) = fed {
            let _ = outcomes
                .send(Outcome::Rejected {
                    pid: u32::try_from(creds.pid).ok().filter(|&p| p > 0),
                    error: MessageError::Refused(wire::Error::TooLarge(len)),
                })
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(framer: &mut LineFramer, bytes: &[u8]) -> Result<Vec<String>, Oversized> {
        let mut out = Vec::new();
        framer.feed(bytes, |l| out.push(String::from_utf8_lossy(l).into_owned()))?;
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
    fn slots_are_bounded_per_uid_and_in_all_and_given_back() {
        let open = Arc::default();
        let limits = StreamLimits {
            max_streams: 3,
            max_streams_per_uid: 2,
        };
        let a1 = take_slot(&open, 1000, limits).expect("first");
        let _a2 = take_slot(&open, 1000, limits).expect("second");
        assert!(take_slot(&open, 1000, limits).is_none(), "per uid");
        let _b1 = take_slot(&open, 1001, limits).expect("other uid");
        assert!(take_slot(&open, 1002, limits).is_none(), "in all");
        drop(a1);
        assert!(take_slot(&open, 1002, limits).is_some(), "given back");
    }

    #[tokio::test]
    async fn lines_from_a_stream_are_judged_with_the_peers_pid() {
        use tokio::io::AsyncWriteExt;
        let dir = std::env::temp_dir().join(format!("poolscope-stream-{}", std::process::id()));
        let path = dir.join("adapter-stream.sock");
        let server =
            AdapterStreamSocket::bind(&path, 0o666, Senders::default(), StreamLimits::default())
                .expect("bind");
        let (tx, mut rx) = mpsc::channel(16);
        let serving = tokio::spawn(server.serve(tx));
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
        // A line past the limit drops the stream.
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
        let closed = client.read_to_end(&mut rest).await;
        assert!(
            closed.is_ok_and(|n| n == 0) || rest.is_empty(),
            "the agent closed it"
        );
        serving.abort();
        let _ = fs::remove_dir_all(&dir);
    }
}
