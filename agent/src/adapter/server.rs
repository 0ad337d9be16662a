//! The adapter socket: a Unix datagram socket whose senders are named by the
//! kernel (SCM_CREDENTIALS), never by what they write.

use std::{
    fs, io,
    os::{
        fd::AsRawFd,
        unix::{fs::PermissionsExt, net::UnixDatagram},
    },
    path::{Path, PathBuf},
};

use anyhow::Context;
use tokio::io::unix::AsyncFd;

use super::message::{self, AdapterMessage, MessageError, MAX_MESSAGE_BYTES};

/// A message the kernel vouched for: `pid` is the sender's real pid (in our
/// pid namespace), whatever the message says.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub pid: u32,
    pub uid: u32,
    pub message: AdapterMessage,
}

/// What became of one datagram.
#[derive(Debug)]
pub enum Outcome {
    Accepted(Received),
    Rejected {
        pid: Option<u32>,
        error: MessageError,
    },
    /// The message claimed a pid that is not the sender's.
    Spoofed {
        pid: u32,
        claimed: u32,
    },
    /// A stream refused at accept: its uid, or everyone, had as many open
    /// as allowed.
    StreamLimit {
        pid: Option<u32>,
        uid: u32,
    },
}

/// Who may send: everyone when both lists are empty (the default; the
/// kernel names each sender, so none can speak for another), else only
/// root and the listed uids and primary gids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Senders {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Senders {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        (self.uids.is_empty() && self.gids.is_empty())
            || uid == 0
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
    }
}

pub struct AdapterSocket {
    socket: AsyncFd<UnixDatagram>,
    path: PathBuf,
    buf: Vec<u8>,
    senders: Senders,
}

impl AdapterSocket {
    /// Binds the socket (replacing a stale one) with the given mode, and
    /// asks the kernel for each sender's credentials.
    pub fn bind(
        path: &Path,
        mode: u32,
        min_queue: u32,
        senders: Senders,
    ) -> anyhow::Result<AdapterSocket> {
        ensure_datagram_queue(min_queue);
        let socket = bind_socket_file(path, mode, "adapter socket", |p| UnixDatagram::bind(p))?;
        let one: libc::c_int = 1;
        // SAFETY: valid socket fd and a pointer to a c_int of the right size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("cannot enable SO_PASSCRED");
        }
        socket.set_nonblocking(true)?;
        Ok(AdapterSocket {
            // SAFETY: the UnixDatagram owns its fd for as long as the AsyncFd
            // owns it, and always reports that same fd.
            socket: unsafe { AsyncFd::register(socket) }
                .map_err(|e| anyhow::anyhow!("cannot poll the adapter socket: {e}"))?,
            path: path.to_path_buf(),
            // One byte more than allowed, to notice oversized datagrams.
            buf: vec![0; MAX_MESSAGE_BYTES + 1],
            senders,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram and judges it.
    pub async fn recv(&mut self) -> io::Result<Outcome> {
        loop {
            let mut guard = self.socket.readable().await?;
            let fd = guard.get_inner().as_raw_fd();
            match guard.try_io(|_| recv_with_credentials(fd, &mut self.buf)) {
                Ok(Ok((len, truncated, creds))) => {
                    return Ok(judge(
                        &self.buf[..len.min(self.buf.len())],
                        truncated,
                        creds,
                        &self.senders,
                    ))
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for AdapterSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Binds a socket at `path` with `bind`: the directory created, a stale
/// socket file replaced, the file given `mode`.
pub fn bind_socket_file<S>(
    path: &Path,
    mode: u32,
    what: &str,
    bind: impl FnOnce(&Path) -> io::Result<S>,
) -> anyhow::Result<S> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", path.display())),
    }
    let socket =
        bind(path).with_context(|| format!("cannot bind the {what} {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(socket)
}

const MAX_DGRAM_QLEN: &str = "/proc/sys/net/unix/max_dgram_qlen";

/// A Unix datagram socket queues `net.unix.max_dgram_qlen` datagrams
/// (often 10); a pool's burst of checkouts overflows that in a millisecond
/// and senders get EAGAIN. The limit is taken when a socket is created, so
/// raise it (for this network namespace) before binding, and say so.
fn ensure_datagram_queue(min_queue: u32) {
    if min_queue == 0 {
        return;
    }
    let current = fs::read_to_string(MAX_DGRAM_QLEN)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match current {
        Some(n) if n >= min_queue => {}
        Some(n) => match fs::write(MAX_DGRAM_QLEN, min_queue.to_string()) {
            Ok(()) => log::info!(
                "raised net.unix.max_dgram_qlen from {n} to {min_queue} so that adapters' bursts are not refused"
            ),
            Err(e) => log::warn!(
                "net.unix.max_dgram_qlen is {n}: adapters' bursts may be refused (cannot raise it: {e})"
            ),
        },
        None => {}
    }
}

/// Decides on one datagram: the kernel's pid wins over any claim.
pub fn judge(
    bytes: &[u8],
    truncated: bool,
    creds: Option<libc::ucred>,
    senders: &Senders,
) -> Outcome {
    let Some(creds) = creds else {
        return Outcome::Rejected {
            pid: None,
            error: MessageError::NoCredentials,
        };
    };
    let pid = match admit_sender(&creds, senders) {
        Ok(pid) => pid,
        Err(refusal) => return refusal.into(),
    };
    if truncated {
        return Outcome::Rejected {
            pid: Some(pid),
            error: MessageError::Refused(poolscope_adapter_protocol::Error::TooLarge(bytes.len())),
        };
    }
    judge_message(bytes, pid, creds.uid)
}

/// Why a sender is refused before anything it sent is read.
#[derive(Debug)]
pub struct Refusal {
    pub pid: Option<u32>,
    pub error: MessageError,
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Outcome {
        Outcome::Rejected {
            pid: r.pid,
            error: r.error,
        }
    }
}

/// The sender's pid, if the kernel named one the agent can see and the
/// allow-lists admit it.
pub fn admit_sender(creds: &libc::ucred, senders: &Senders) -> Result<u32, Refusal> {
    // pid 0: the sender is outside our pid namespace. Accepting it would
    // let every such sender speak for one shared, unknowable process.
    let Ok(pid @ 1..) = u32::try_from(creds.pid) else {
        return Err(Refusal {
            pid: None,
            error: MessageError::UnknownSender,
        });
    };
    if !senders.allows(creds.uid, creds.gid) {
        return Err(Refusal {
            pid: Some(pid),
            error: MessageError::NotAllowed {
                uid: creds.uid,
                gid: creds.gid,
            },
        });
    }
    Ok(pid)
}

/// One message of an admitted sender: the kernel's pid wins over any claim.
pub fn judge_message(bytes: &[u8], pid: u32, uid: u32) -> Outcome {
    match message::decode(bytes) {
        Ok(message) => match message.claimed_pid {
            Some(claimed) if claimed != pid => Outcome::Spoofed { pid, claimed },
            _ => Outcome::Accepted(Received { pid, uid, message }),
        },
        Err(error) => Outcome::Rejected {
            pid: Some(pid),
            error,
        },
    }
}

/// recvmsg with room for one SCM_CREDENTIALS message.
fn recv_with_credentials(
    fd: i32,
    buf: &mut [u8],
) -> io::Result<(usize, bool, Option<libc::ucred>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0 || n as usize > MAX_MESSAGE_BYTES;
    let mut creds = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // bounded by msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
            {
                creds = Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<libc::ucred>(),
                ));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, truncated, creds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(pid: i32) -> Option<libc::ucred> {
        Some(libc::ucred {
            pid,
            uid: 1000,
            gid: 1000,
        })
    }

    #[test]
    fn allow_lists_admit_root_and_the_listed_only() {
        let msg = br#"{"v":1,"kind":"release","pool":"p","fd":3}"#;
        let from = |uid, gid, senders: &Senders| {
            judge(msg, false, Some(libc::ucred { pid: 42, uid, gid }), senders)
        };
        assert!(matches!(
            from(1000, 1000, &Senders::default()),
            Outcome::Accepted(_)
        ));
        let apps = Senders {
            uids: vec![1001],
            gids: vec![50],
        };
        for (uid, gid) in [(1001, 1000), (1000, 50), (0, 0)] {
            assert!(
                matches!(from(uid, gid, &apps), Outcome::Accepted(_)),
                "{uid}/{gid}"
            );
        }
        let refused = from(1000, 1000, &apps);
        assert!(
            matches!(
                &refused,
                Outcome::Rejected {
                    pid: Some(42),
                    error: MessageError::NotAllowed {
                        uid: 1000,
                        gid: 1000
                    }
                }
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn senders_outside_our_pid_namespace_are_rejected() {
        let msg = br#"{"v":1,"kind":"release","pool":"p","fd":3}"#;
        let outcome = judge(msg, false, creds(0), &Senders::default());
        assert!(
            matches!(
                outcome,
                Outcome::Rejected {
                    pid: None,
                    error: MessageError::UnknownSender
                }
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn the_kernel_pid_wins_over_a_claimed_one() {
        let msg = br#"{"v":1,"kind":"release","pool":"p","fd":3,"pid":1}"#;
        assert!(matches!(
            judge(msg, false, creds(42), &Senders::default()),
            Outcome::Spoofed {
                pid: 42,
                claimed: 1
            }
        ));
        let msg = br#"{"v":1,"kind":"release","pool":"p","fd":3,"pid":42}"#;
        assert!(matches!(
            judge(msg, false, creds(42), &Senders::default()),
            Outcome::Accepted(Received { pid: 42, .. })
        ));
        let msg = br#"{"v":1,"kind":"release","pool":"p","fd":3}"#;
        assert!(matches!(
            judge(msg, false, creds(42), &Senders::default()),
            Outcome::Accepted(_)
        ));
        assert!(matches!(
            judge(msg, false, None, &Senders::default()),
            Outcome::Rejected { pid: None, .. }
        ));
        assert!(matches!(
            judge(msg, true, creds(42), &Senders::default()),
            Outcome::Rejected { .. }
        ));
    }

    #[tokio::test]
    async fn receives_with_the_senders_real_pid() {
        let dir = std::env::temp_dir().join(format!("poolscope-adapter-{}", std::process::id()));
        let path = dir.join("adapter.sock");
        let mut server = AdapterSocket::bind(&path, 0o666, 0, Senders::default()).expect("bind");
        let client = UnixDatagram::unbound().expect("client");
        client
            .send_to(br#"{"v":1,"kind":"release","pool":"p","fd":3}"#, &path)
            .expect("send");
        client.send_to(b"garbage", &path).expect("send");
        match server.recv().await.expect("recv") {
            Outcome::Accepted(r) => assert_eq!(r.pid, std::process::id()),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            server.recv().await.expect("recv"),
            Outcome::Rejected { .. }
        ));
        drop(server);
        assert!(!path.exists(), "the socket file is removed on drop");
        let _ = fs::remove_dir(&dir);
    }
}
