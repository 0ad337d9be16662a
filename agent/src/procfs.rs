//! Seeding from /proc at agent start: client connections that existed before
//! the probes were attached, plus small process metadata readers.
//!
//! The `procfs` crate reads and parses /proc (TCP and unix tables, fd links,
//! namespaces, stat, cgroups, threads); what is left here is what the crate
//! does not do: the sock_diag netlink dump, container and pod conventions of
//! cgroup paths and kubelet directories, and a bounded read of environ. Every
//! reader takes a `proc_root` so tests can point it at a fake tree. A process
//! that cannot be read (it exited, or we lack permission) is skipped; a scan
//! never fails as a whole.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

// `::procfs` is the crate; plain `procfs` would be this module's own name
// at the crate root.
use ::procfs::net::{TcpNetEntry, TcpState};
use ::procfs::process::{FDTarget, Process};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeededPeer {
    Tcp {
        local: SocketAddr,
        remote: SocketAddr,
        state: SeededTcpState,
    },
    /// `path` is what the server socket was bound to, as given to bind()
    /// (abstract names start with `@`).
    Unix { path: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeededTcpState {
    SynSent,
    Established,
    CloseWait,
}

/// One client socket held by one process. A socket shared by several fds or
/// processes (dup, fork) appears once per (pid, fd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededSocket {
    pub pid: u32,
    pub fd: i32,
    pub comm: String,
    pub inode: u64,
    pub peer: SeededPeer,
}

/// Opens `/proc/PID` under `proc_root`; `None` if the process is gone or
/// unreadable.
fn open_process(proc_root: &Path, pid: u32) -> Option<Process> {
    Process::new_with_root(proc_root.join(pid.to_string())).ok()
}

// ---------------------------------------------------------------------------
// TCP tables (/proc/PID/net/tcp, tcp6)
// ---------------------------------------------------------------------------

/// One row of a TCP table, IPv4-mapped IPv6 addresses turned into IPv4 (a
/// dual-stack socket talking IPv4 is listed in tcp6 that way).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    state: TcpState,
    inode: u64,
}

impl From<TcpNetEntry> for TcpEntry {
    fn from(entry: TcpNetEntry) -> Self {
        TcpEntry {
            local: unmap_ipv4(entry.local_address),
            remote: unmap_ipv4(entry.remote_address),
            state: entry.state,
            inode: entry.inode,
        }
    }
}

fn unmap_ipv4(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// A client connection found in a namespace's TCP tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConnection {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: SeededTcpState,
}

/// Keeps the outbound connections (SYN_SENT, ESTABLISHED, CLOSE_WAIT) of one
/// network namespace, keyed by socket inode. `entries` should hold both the
/// tcp and tcp6 tables of that namespace: a dual-stack `::` listener
/// accepts IPv4 connections, which the kernel lists in tcp6.
///
/// A socket is inbound (accepted by a local server) when its local port is
/// the port of a LISTEN socket bound to the same address or a wildcard.
fn outbound_connections(entries: &[TcpEntry]) -> HashMap<u64, TcpConnection> {
    let listeners: Vec<SocketAddr> = entries
        .iter()
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| e.local)
        .collect();
    let accepted_by_listener = |local: SocketAddr| {
        listeners.iter().any(|l| {
            l.port() == local.port()
                && match l.ip() {
                    // 0.0.0.0 takes only IPv4; :: takes IPv6 and (unless
                    // V6ONLY, which /proc does not show) IPv4 too.
                    IpAddr::V4(ip) if ip.is_unspecified() => local.is_ipv4(),
                    IpAddr::V6(ip) if ip.is_unspecified() => true,
                    ip => ip == local.ip(),
                }
        })
    };
    entries
        .iter()
        .filter(|e| e.inode != 0)
        .filter_map(|e| {
            let state = match e.state {
                TcpState::Established => SeededTcpState::Established,
                TcpState::SynSent => SeededTcpState::SynSent,
                TcpState::CloseWait => SeededTcpState::CloseWait,
                _ => return None,
            };
            if accepted_by_listener(e.local) {
                return None;
            }
            Some((
                e.inode,
                TcpConnection {
                    local: e.local,
                    remote: e.remote,
                    state,
                },
            ))
        })
        .collect()
}

/// Reads and classifies the TCP tables of the namespace `process` lives in
/// (/proc/PID/net shows the tables of that process's namespace).
fn namespace_connections(process: &Process) -> HashMap<u64, TcpConnection> {
    // tcp6 is absent when IPv6 is disabled; a missing or unreadable table
    // is just empty.
    let entries: Vec<TcpEntry> = [process.tcp(), process.tcp6()]
        .into_iter()
        .flat_map(|table| table.unwrap_or_default())
        .map(TcpEntry::from)
        .collect();
    outbound_connections(&entries)
}

// ---------------------------------------------------------------------------
// Unix sockets (NETLINK_SOCK_DIAG)
// ---------------------------------------------------------------------------
// By hand: the procfs crate has no netlink, and /proc/net/unix, which it
// parses, does not show a socket's peer.

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const UNIX_DIAG_MSG_LEN: usize = 16;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
// Attribute types carry NLA_F_NESTED / NLA_F_NET_BYTEORDER in the top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
// Unix sockets reuse the TCP state numbers; connected is ESTABLISHED.
const UNIX_STATE_CONNECTED: u8 = 1;

/// One unix socket from a sock_diag dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketInfo {
    pub inode: u32,
    /// Socket type: SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET.
    pub kind: u8,
    pub state: u8,
    /// Bound name; abstract names are rendered with a leading `@` like
    /// /proc/net/unix does.
    pub name: Option<String>,
    /// Inode of the connected peer socket.
    pub peer: Option<u32>,
}

/// What one or more netlink reply datagrams held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixDiagReply {
    pub sockets: Vec<UnixSocketInfo>,
    /// NLMSG_DONE was seen: the dump is complete.
    pub done: bool,
    /// An NLMSG_ERROR with a non-zero errno (positive) was seen.
    pub error: Option<i32>,
}

/// Parses netlink messages from one received datagram, appending to `out`.
/// Every length is checked; truncated or odd input stops parsing at the
/// last complete message and never panics.
pub fn parse_unix_diag(buf: &[u8], out: &mut UnixDiagReply) {
    let mut offset = 0usize;
    while let Some(header) = buf.get(offset..offset.saturating_add(NLMSG_HDRLEN)) {
        let len = read_u32(header, 0).unwrap_or(0) as usize;
        let kind = read_u16(header, 4).unwrap_or(0);
        if len < NLMSG_HDRLEN {
            return;
        }
        let Some(payload) = buf.get(offset + NLMSG_HDRLEN..offset.saturating_add(len)) else {
            return;
        };
        match kind {
            NLMSG_DONE => {
                out.done = true;
                return;
            }
            NLMSG_ERROR => {
                // struct nlmsgerr starts with a negative errno; 0 is an ack.
                if let Some(errno) = read_u32(payload, 0).map(|e| e as i32) {
                    if errno != 0 {
                        out.error = Some(errno.saturating_neg());
                        return;
                    }
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(info) = parse_unix_diag_msg(payload) {
                    out.sockets.push(info);
                }
            }
            _ => {}
        }
        offset = offset.saturating_add(align4(len));
    }
}

fn parse_unix_diag_msg(payload: &[u8]) -> Option<UnixSocketInfo> {
    // unix_diag_msg { family u8, type u8, state u8, pad u8, ino u32, cookie [u32; 2] }
    let fixed = payload.get(..UNIX_DIAG_MSG_LEN)?;
    if fixed[0] != libc::AF_UNIX as u8 {
        return None;
    }
    let mut info = UnixSocketInfo {
        kind: fixed[1],
        state: fixed[2],
        inode: read_u32(fixed, 4)?,
        name: None,
        peer: None,
    };
    let mut offset = UNIX_DIAG_MSG_LEN;
    // rtattr { len u16, type u16 } + data, each padded to 4 bytes.
    while let Some(header) = payload.get(offset..offset.saturating_add(4)) {
        let len = read_u16(header, 0).unwrap_or(0) as usize;
        let kind = read_u16(header, 2).unwrap_or(0) & NLA_TYPE_MASK;
        if len < 4 {
            break;
        }
        let Some(data) = payload.get(offset + 4..offset.saturating_add(len)) else {
            break;
        };
        match kind {
            UNIX_DIAG_NAME => info.name = unix_name(data),
            UNIX_DIAG_PEER => info.peer = read_u32(data, 0),
            _ => {}
        }
        offset = offset.saturating_add(align4(len));
    }
    Some(info)
}

/// Renders a sun_path: a path up to its NUL, or `@name` for abstract names
/// (leading NUL), with inner NULs shown as `@` as /proc/net/unix does.
fn unix_name(data: &[u8]) -> Option<String> {
    match data.split_first() {
        None => None,
        Some((0, rest)) => {
            let shown: Vec<u8> = rest
                .iter()
                .map(|&b| if b == 0 { b'@' } else { b })
                .collect();
            Some(format!("@{}", String::from_utf8_lossy(&shown)))
        }
        Some(_) => {
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            Some(String::from_utf8_lossy(&data[..end]).into_owned())
        }
    }
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([bytes[0], bytes[1]]))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

/// The sock_diag dump request for connected unix sockets with their names
/// and peers.
fn unix_diag_request(seq: u32) -> [u8; 40] {
    let mut req = [0u8; 40];
    // nlmsghdr { len u32, type u16, flags u16, seq u32, pid u32 }
    req[0..4].copy_from_slice(&40u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // unix_diag_req { family u8, protocol u8, pad u16, states u32, ino u32,
    //                 show u32, cookie [u32; 2] }
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&(1u32 << UNIX_STATE_CONNECTED).to_ne_bytes());
    req[28..32].copy_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes());
    req[32..40].fill(0xff);
    req
}

/// Dumps the connected unix sockets of the agent's own network namespace
/// (sock_diag only answers for the caller's netns; sockets of processes in
/// other namespaces are simply not found). Works without privileges.
pub fn dump_unix_sockets() -> io::Result<Vec<UnixSocketInfo>> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();

    // A dump should never stall, but do not let a missing reply hang startup.
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: valid fd; the option value points to a live timeval of the
    // length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }

    let request = unix_diag_request(1);
    // SAFETY: zeroed sockaddr_nl is valid; pid 0 addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid fd; buffer and address pointers are live for the call
    // with the lengths passed.
    let sent = unsafe {
        libc::sendto(
            fd,
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut reply = UnixDiagReply::default();
    // The kernel sizes dump datagrams to at most 32 KiB; 64 KiB leaves room.
    let mut buf = vec![0u8; 64 * 1024];
    while !reply.done {
        // SAFETY: valid fd; `buf` is live and writable for `buf.len()` bytes.
        // MSG_TRUNC makes recv return the datagram's real length so that a
        // truncated one is detected instead of parsed as complete.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let n = n as usize;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag dump ended without NLMSG_DONE",
            ));
        }
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sock_diag reply of {n} bytes exceeds the receive buffer"),
            ));
        }
        parse_unix_diag(&buf[..n], &mut reply);
        if let Some(errno) = reply.error {
            return Err(io::Error::from_raw_os_error(errno));
        }
    }
    Ok(reply.sockets)
}

/// Client-side unix stream sockets and the path each is connected to, keyed
/// by inode. A client socket has no name of its own (accepted server-side
/// sockets carry the listener's name) and its peer has a name.
pub fn unix_client_paths(sockets: &[UnixSocketInfo]) -> HashMap<u64, String> {
    let names: HashMap<u32, &str> = sockets
        .iter()
        .filter_map(|s| Some((s.inode, s.name.as_deref()?)))
        .collect();
    sockets
        .iter()
        .filter(|s| {
            s.kind == libc::SOCK_STREAM as u8 && s.state == UNIX_STATE_CONNECTED && s.name.is_none()
        })
        .filter_map(|s| {
            let path = names.get(&s.peer?)?;
            Some((u64::from(s.inode), (*path).to_owned()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Unix socket types (/proc/PID/net/unix)
// ---------------------------------------------------------------------------

/// Socket type numbers as /proc/net/unix prints them.
pub const UNIX_SOCK_STREAM: u16 = 1;

/// The type of the socket bound to `path`, as seen from `pid`'s network
/// namespace: tells a stream server (a connection) from a datagram one
/// (syslog, journald).
pub fn unix_bound_type(proc_root: &Path, pid: u32, path: &str) -> Option<u16> {
    let table = open_process(proc_root, pid)?.unix().ok()?;
    let path = Path::new(path);
    table
        .into_iter()
        .find(|entry| entry.path.as_deref() == Some(path))
        .map(|entry| entry.socket_type)
}

// ---------------------------------------------------------------------------
// Containers and pods (cgroup path conventions, kubelet directories)
// ---------------------------------------------------------------------------

/// The cgroup paths of a process (one per hierarchy on cgroup v1, one on v2).
fn cgroup_paths(process: &Process) -> Vec<String> {
    process
        .cgroups()
        .map(|groups| groups.into_iter().map(|g| g.pathname).collect())
        .unwrap_or_default()
}

/// The container a cgroup path names: the 64-hex id that Docker,
/// containerd, CRI-O and systemd-managed runtimes put in it
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>`, or a bare
/// `/kubepods/.../<id>`). By hand: a runtime convention, not a /proc format.
pub fn container_id_in_cgroup_path(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|segment| {
        let segment = segment.strip_suffix(".scope").unwrap_or(segment);
        let id = segment.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_ascii_lowercase())
    })
}

fn container_id_of(cgroup_paths: &[String]) -> Option<String> {
    cgroup_paths
        .iter()
        .find_map(|path| container_id_in_cgroup_path(path))
}

pub fn container_id(proc_root: &Path, pid: u32) -> Option<String> {
    container_id_of(&cgroup_paths(&open_process(proc_root, pid)?))
}

/// The Kubernetes pod a cgroup path names, if any: `pod<uid>` segments
/// (cgroupfs driver) or `kubepods-<qos>-pod<uid_with_underscores>.slice`
/// (systemd driver). Returned with dashes, as the API server spells it.
/// By hand: a kubelet convention, not a /proc format.
pub fn pod_uid_in_cgroup_path(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        let at = segment.rfind("pod")?;
        let uid = segment.get(at + 3..)?.replace('_', "-");
        let is_uid = uid.len() == 36
            && uid.bytes().enumerate().all(|(i, b)| {
                matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
            });
        is_uid.then_some(uid)
    })
}

/// Where a process runs: its container and pod, when it has them.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Placement {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// The Kubernetes container's name, when the kubelet's files say.
    pub container_name: Option<String>,
    /// When the process started (CLOCK_MONOTONIC ns), read with the rest:
    /// the floor for times the process claims about itself. Not shown.
    #[serde(skip)]
    pub process_started_ns: Option<u64>,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// Pod name and namespace by uid, from the kubelet's log directory names
/// (`<namespace>_<name>_<uid>` under /var/log/pods), which every node has.
/// By hand: a kubelet convention, not a /proc file.
pub fn pod_names(pod_logs_dir: &Path, uid: &str) -> Option<(String, String)> {
    std::fs::read_dir(pod_logs_dir).ok()?.find_map(|entry| {
        let name = entry.ok()?.file_name().into_string().ok()?;
        let rest = name.strip_suffix(uid)?.strip_suffix('_')?;
        let (namespace, pod) = rest.split_once('_')?;
        Some((namespace.to_string(), pod.to_string()))
    })
}

/// A Kubernetes container's name from the kubelet's log links
/// (`<pod>_<namespace>_<container>-<id>.log`), given that directory's file
/// names. By hand: a kubelet convention, not a /proc file.
fn container_name_in<'a>(
    file_names: impl IntoIterator<Item = &'a str>,
    container_id: &str,
) -> Option<String> {
    let suffix = format!("-{container_id}.log");
    file_names.into_iter().find_map(|name| {
        let rest = name.strip_suffix(&suffix)?;
        let (_pod, rest) = rest.split_once('_')?;
        let (_namespace, container) = rest.split_once('_')?;
        (!container.is_empty()).then(|| container.to_string())
    })
}

/// A container's name from the kubelet's `containers` log directory, the
/// sibling of its `pods` one.
fn container_name(pod_logs_dir: &Path, container_id: &str) -> Option<String> {
    let dir = pod_logs_dir.parent()?.join("containers");
    let names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    container_name_in(names.iter().map(String::as_str), container_id)
}

/// A process's placement, from its cgroup and (for pods) the kubelet's
/// log directories.
pub fn placement(proc_root: &Path, pid: u32, pod_logs_dir: Option<&Path>) -> Placement {
    let Some(process) = open_process(proc_root, pid) else {
        return Placement::default();
    };
    let paths = cgroup_paths(&process);
    let pod_uid = paths.iter().find_map(|path| pod_uid_in_cgroup_path(path));
    let names = match (&pod_uid, pod_logs_dir) {
        (Some(uid), Some(dir)) => pod_names(dir, uid),
        _ => None,
    };
    let container_id = container_id_of(&paths);
    let container_name = match (&container_id, pod_logs_dir) {
        (Some(id), Some(dir)) if pod_uid.is_some() => container_name(dir, id),
        _ => None,
    };
    Placement {
        container_id,
        container_name,
        pod_uid,
        pod_namespace: names.as_ref().map(|n| n.0.clone()),
        pod_name: names.map(|n| n.1),
        process_started_ns: started_ns(&process),
    }
}

// ---------------------------------------------------------------------------
// Process metadata
// ---------------------------------------------------------------------------

/// `starttime` of /proc/PID/stat: clock ticks since boot.
fn start_ticks(process: &Process) -> Option<u64> {
    process.stat().ok().map(|stat| stat.starttime)
}

/// When process `pid` started, on CLOCK_MONOTONIC. The kernel counts
/// `starttime` on the boot-time clock, which runs ahead of the monotonic
/// one by the time spent suspended; rounded down to a tick, so it never
/// lies after the real start.
pub fn process_started_ns(proc_root: &Path, pid: u32) -> Option<u64> {
    started_ns(&open_process(proc_root, pid)?)
}

fn started_ns(process: &Process) -> Option<u64> {
    let ticks = start_ticks(process)?;
    let hz = Some(::procfs::ticks_per_second()).filter(|&hz| hz > 0)?;
    let boot_ns = ticks.checked_mul(1_000_000_000)? / hz;
    let suspended = crate::clock::boottime_ns().saturating_sub(crate::clock::monotonic_ns());
    Some(boot_ns.saturating_sub(suspended))
}

/// A thread's name (the comm of /proc/PID/task/TID/stat).
pub fn thread_name(proc_root: &Path, pid: u32, tid: u32) -> Option<String> {
    let task = open_process(proc_root, pid)?
        .task_from_tid(i32::try_from(tid).ok()?)
        .ok()?;
    Some(task.stat().ok()?.comm)
}

/// A process's command name (the comm of /proc/PID/stat, the same text as
/// /proc/PID/comm).
pub fn process_comm(proc_root: &Path, pid: u32) -> Option<String> {
    Some(open_process(proc_root, pid)?.stat().ok()?.comm)
}

/// `/proc/PID/cmdline` with the NUL separators turned into spaces, secrets
/// redacted unless `full` (see `redact`); `None` when unreadable or empty
/// (kernel threads, zombies).
pub fn process_cmdline(proc_root: &Path, pid: u32, full: bool) -> Option<String> {
    process_args(proc_root, pid, full).map(|args| args.join(" "))
}

/// A process's arguments, redacted unless `full`.
pub fn process_args(proc_root: &Path, pid: u32, full: bool) -> Option<Vec<String>> {
    // By hand: the crate's Process::cmdline() fails as a whole on one
    // non-UTF-8 argument; such a process should still show, lossily.
    let bytes = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    let args: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if args.is_empty() {
        None
    } else if full {
        Some(args)
    } else {
        Some(crate::redact::command_args(&args))
    }
}

/// How much of /proc/PID/environ is read: a process can carry megabytes.
const ENVIRON_READ_LIMIT: u64 = 1024 * 1024;
/// Longest value kept, in bytes (cut at a character boundary).
const ENVIRON_VALUE_LIMIT: usize = 4096;

/// The values of the variables `names` in /proc/PID/environ (the
/// environment the process was started with), in the order of `names`;
/// the first occurrence of a name wins, as with getenv. Reads at most 1 MiB,
/// cuts values at 4,096 bytes, skips values that are not UTF-8. Empty when
/// the process is gone or unreadable (environ needs ptrace-read access).
pub fn process_environment(proc_root: &Path, pid: u32, names: &[&str]) -> Vec<(String, String)> {
    // By hand: the crate's Process::environ() reads the whole file, with no
    // bound on its size.
    let path = proc_root.join(pid.to_string()).join("environ");
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut bytes = Vec::new();
    if file
        .take(ENVIRON_READ_LIMIT)
        .read_to_end(&mut bytes)
        .is_err()
    {
        return Vec::new();
    }
    let mut entries: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    // The piece after the last NUL is either empty or, when the limit cut
    // the file, an entry whose value may be cut short: not trusted.
    if bytes.len() as u64 == ENVIRON_READ_LIMIT || bytes.last() == Some(&0) {
        entries.pop();
    }
    let mut found: Vec<Option<String>> = vec![None; names.len()];
    for entry in entries {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (name, value) = (&entry[..eq], &entry[eq + 1..]);
        let Some(slot) = names.iter().position(|n| n.as_bytes() == name) else {
            continue;
        };
        if found[slot].is_some() {
            continue;
        }
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        found[slot] = Some(truncate_at_char_boundary(value, ENVIRON_VALUE_LIMIT).to_owned());
    }
    names
        .iter()
        .zip(found)
        .filter_map(|(name, value)| Some(((*name).to_owned(), value?)))
        .collect()
}

fn truncate_at_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// ---------------------------------------------------------------------------
// The scan
// ---------------------------------------------------------------------------

/// (fd, socket inode) for every socket fd of a process; `None` if the fd
/// directory cannot be read. An fd that closes between readdir and readlink
/// is skipped by the crate's iterator.
fn socket_fds(process: &Process) -> Option<Vec<(i32, u64)>> {
    let fds = process.fd().ok()?;
    Some(
        fds.flatten()
            .filter_map(|info| match info.target {
                FDTarget::Socket(inode) => Some((info.fd, inode)),
                _ => None,
            })
            .collect(),
    )
}

/// Identifies a network namespace; a process whose namespaces are
/// unreadable gets its own key so that its tables are still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NetnsKey {
    Inode(u64),
    Pid(u32),
}

fn netns_key(process: &Process, pid: u32) -> NetnsKey {
    process
        .namespaces()
        .ok()
        .and_then(|ns| ns.0.get(OsStr::new("net")).map(|net| net.identifier))
        .map_or(NetnsKey::Pid(pid), NetnsKey::Inode)
}

/// Finds database-candidate client connections that exist now: outbound TCP
/// connections (any namespace) and client-side unix stream sockets (the
/// agent's own namespace). Sorted by (pid, fd).
pub fn scan_connections(proc_root: &Path, own_pid: u32) -> Vec<SeededSocket> {
    scan_connections_with(proc_root, own_pid, || match dump_unix_sockets() {
        Ok(sockets) => unix_client_paths(&sockets),
        Err(e) => {
            log::warn!("cannot list unix sockets via sock_diag, not seeding them: {e}");
            HashMap::new()
        }
    })
}

/// [`scan_connections`] with the unix socket source injected, so tests on a
/// fake tree do not mix in the real kernel's sockets.
fn scan_connections_with(
    proc_root: &Path,
    own_pid: u32,
    unix_source: impl FnOnce() -> HashMap<u64, String>,
) -> Vec<SeededSocket> {
    // Pids first, in order, so a scan is deterministic; a `Process` holds an
    // open fd, so they are not all kept open at once.
    let mut pids: Vec<u32> = match ::procfs::process::all_processes_with_root(proc_root) {
        Ok(processes) => processes
            .flatten()
            .filter_map(|process| u32::try_from(process.pid).ok())
            .filter(|&pid| pid != own_pid)
            .collect(),
        Err(e) => {
            log::warn!(
                "cannot read {}, not seeding connections: {e}",
                proc_root.display()
            );
            return Vec::new();
        }
    };
    pids.sort_unstable();

    let mut tcp_by_netns: HashMap<NetnsKey, HashMap<u64, TcpConnection>> = HashMap::new();
    let mut unix_source = Some(unix_source);
    let mut unix_paths: HashMap<u64, String> = HashMap::new();
    let mut found = Vec::new();

    for pid in pids {
        let Some(process) = open_process(proc_root, pid) else {
            continue;
        };
        let Some(fds) = socket_fds(&process) else {
            continue;
        };
        if fds.is_empty() {
            continue;
        }
        let tcp = tcp_by_netns
            .entry(netns_key(&process, pid))
            .or_insert_with(|| namespace_connections(&process));
        let comm = process.stat().map(|stat| stat.comm).unwrap_or_default();

        for (fd, inode) in fds {
            let peer = if let Some(c) = tcp.get(&inode) {
                SeededPeer::Tcp {
                    local: c.local,
                    remote: c.remote,
                    state: c.state,
                }
            } else {
                // Dump unix sockets once, and only if some socket is not TCP.
                if let Some(source) = unix_source.take() {
                    unix_paths = source();
                }
                match unix_paths.get(&inode) {
                    Some(path) => SeededPeer::Unix { path: path.clone() },
                    None => continue,
                }
            };
            found.push(SeededSocket {
                pid,
                fd,
                comm: comm.clone(),
                inode,
                peer,
            });
        }
    }
    found.sort_by_key(|s| (s.pid, s.fd));
    found
}

/// The TLS libraries each running process maps (processes that map none
/// are left out; executables are not looked at).
pub fn tls_libraries_of_all(proc_root: &Path) -> Vec<(u32, TlsMappings)> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let found = tls_libraries(proc_root, pid)?;
            (!found.libraries.is_empty()).then_some((pid, found))
        })
        .collect()
}

/// What `pid` maps that may be a TLS library: libssl files, and its own
/// executable (which may link OpenSSL statically, as Node.js does; see
/// [`exports_tls_functions`]). Paths are as the process sees them, inside
/// its mount namespace.
pub struct TlsMappings {
    /// The user the process runs as.
    pub uid: u32,
    pub libraries: Vec<crate::tls_libraries::MappedLibrary>,
    pub executable: Option<crate::tls_libraries::MappedLibrary>,
}

/// The TLS libraries `pid` maps (see [`crate::tls_libraries::is_tls_library`]);
/// None when its /proc entry cannot be read (it exited).
pub fn tls_libraries(proc_root: &Path, pid: u32) -> Option<TlsMappings> {
    use crate::tls_libraries::{is_tls_library, FileId, MappedLibrary};
    let process = Process::new_with_root(proc_root.join(pid.to_string())).ok()?;
    let uid = process.uid().ok()?;
    let exe = process.exe().ok();
    let maps = process.maps().ok()?;
    let mut found = TlsMappings {
        uid,
        libraries: Vec::new(),
        executable: None,
    };
    for map in maps {
        let ::procfs::process::MMapPath::Path(path) = &map.pathname else {
            continue;
        };
        let is_executable = exe.as_deref() == Some(path.as_path());
        let Some(path) = path.to_str() else {
            continue;
        };
        let library = MappedLibrary {
            file: FileId {
                dev_major: map.dev.0 as u32,
                dev_minor: map.dev.1 as u32,
                inode: map.inode,
            },
            path: path.to_string(),
        };
        if is_executable {
            found.executable.get_or_insert(library);
        } else if is_tls_library(path) && !found.libraries.iter().any(|l| l.file == library.file) {
            // A library is mapped several times (code, data, ...).
            found.libraries.push(library);
        }
    }
    Some(found)
}

/// Opens a file that a process maps, as found through its root
/// (`/proc/PID/root/...`), which that process's owner controls: the path
/// is first opened without opening the file itself (`O_PATH`: a FIFO
/// cannot block, a device is not opened), and only a regular file is then
/// opened for reading, through that same handle so that it cannot be
/// swapped in between.
pub fn open_mapped_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    if !handle.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    std::fs::File::open(fd_path(&handle))
}

/// The path by which the kernel reaches the file behind `file`, whatever
/// becomes of the path it was opened by.
pub fn fd_path(file: &std::fs::File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Whether the ELF file at `path` (see [`open_mapped_file`]) defines and
/// exports OpenSSL's `SSL_write` (an executable that links OpenSSL
/// statically and exports it, as Node.js does). Reads the headers, the
/// dynamic symbol table and a few bytes of code, not the whole file.
pub fn exports_tls_functions(path: &Path) -> bool {
    open_tls_library(path, &["SSL_write"])
        .is_ok_and(|library| library.offset("SSL_write").is_some())
}

/// A TLS library file held open for hooking, so that the process which
/// showed it may exit meanwhile: the kernel attaches through
/// [`Self::attach_path`], and offsets were read from this very file.
#[derive(Debug)]
pub struct OpenedLibrary {
    file: std::fs::File,
    /// File offset of each symbol asked for that the file defines.
    pub offsets: Vec<(&'static str, u64)>,
    /// Where the TLS programs attach (see
    /// [`crate::tls_libraries::probe_points`]).
    pub points: Vec<crate::tls_libraries::ProbePoint>,
    /// Whether every point is at an instruction the kernel emulates.
    pub emulated: bool,
}

impl OpenedLibrary {
    /// The path by which the kernel reaches this file.
    pub fn attach_path(&self) -> PathBuf {
        fd_path(&self.file)
    }

    /// The file offset of `symbol`, if the file defines it.
    pub fn offset(&self, symbol: &str) -> Option<u64> {
        self.offsets
            .iter()
            .find(|(name, _)| *name == symbol)
            .map(|(_, offset)| *offset)
    }
}

/// `len` bytes of `file` at `offset`, if it has them.
fn read_at(file: &std::fs::File, offset: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, offset).ok()?;
    Some(bytes)
}

/// Why a library could not be opened for hooking.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenLibraryError {
    /// The process, or the file at its path, is gone: another process
    /// that maps the same file may show it again.
    Gone(String),
    /// The file is not one that can be hooked (not ELF, no symbols).
    Unusable(String),
}

impl std::fmt::Display for OpenLibraryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenLibraryError::Gone(why) => write!(f, "gone before it was opened ({why})"),
            OpenLibraryError::Unusable(why) => f.write_str(why),
        }
    }
}

/// Opens the library at `path` (see [`open_mapped_file`]) and reads the
/// file offsets of the `symbols` it defines (the offsets uprobes take:
/// the symbol's address less its section's address plus the section's
/// file offset).
pub fn open_tls_library(
    path: &Path,
    symbols: &[&'static str],
) -> Result<OpenedLibrary, OpenLibraryError> {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSection, ObjectSymbol};
    let file = open_mapped_file(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => OpenLibraryError::Gone(e.to_string()),
        // ESRCH: /proc/PID/root of a process that is exiting.
        _ if e.raw_os_error() == Some(libc::ESRCH) => OpenLibraryError::Gone(e.to_string()),
        _ => OpenLibraryError::Unusable(format!("cannot open it: {e}")),
    })?;
    let reader = file
        .try_clone()
        .map_err(|e| OpenLibraryError::Unusable(format!("cannot read it: {e}")))?;
    let cache = object::ReadCache::new(reader);
    let elf = ElfFile64::<object::Endianness, _>::parse(&cache)
        .map_err(|e| OpenLibraryError::Unusable(format!("not a 64-bit ELF file: {e}")))?;
    let mut offsets = Vec::new();
    // The file range of the section that holds the first symbol found: the
    // code, for probe_points.
    let mut code_range = None;
    for symbol in elf.dynamic_symbols().filter(|s| s.is_definition()) {
        let Some(&name) = symbols
            .iter()
            .find(|wanted| symbol.name_bytes().ok() == Some(wanted.as_bytes()))
        else {
            continue;
        };
        if offsets.iter().any(|(known, _)| *known == name) {
            continue;
        }
        let Some(section) = symbol
            .section_index()
            .and_then(|i| elf.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((section_offset, _)) = section.file_range() else {
            continue;
        };
        let offset = symbol
            .address()
            .checked_sub(section.address())
            .and_then(|into_section| into_section.checked_add(section_offset));
        if let Some(offset) = offset {
            offsets.push((name, offset));
            code_range.get_or_insert((section_offset, section_offset + section.size()));
        }
    }
    drop(elf);
    drop(cache);
    let offset_of = |name: &str| {
        offsets
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, offset)| *offset)
    };
    let (points, emulated) = crate::tls_libraries::probe_points(
        offset_of,
        |at, len| read_at(&file, at, len),
        code_range,
    );
    Ok(OpenedLibrary {
        file,
        offsets,
        points,
        emulated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fake /proc under the temp dir, removed on drop.
    struct FakeProc(PathBuf);

    /// A /proc/PID/stat line as the kernel prints it (52 fields).
    fn stat_line(pid: u32, comm: &str, start_ticks: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1585 0 0 0 3 1 0 0 20 0 1 0 \
             {start_ticks} 12345678 900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 \
             17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    impl FakeProc {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("poolscope-procfs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("create fake proc");
            FakeProc(root)
        }

        fn dir(&self, pid: u32) -> PathBuf {
            self.0.join(pid.to_string())
        }

        /// A process; processes given the same `netns` share a network
        /// namespace (their ns/net links resolve to the same inode, as the
        /// kernel's do).
        fn process(&self, pid: u32, comm: &str, netns: Option<u64>, fds: &[(i32, &str)]) {
            let dir = self.dir(pid);
            std::fs::create_dir_all(dir.join("fd")).expect("fd dir");
            std::fs::create_dir_all(dir.join("ns")).expect("ns dir");
            std::fs::write(dir.join("stat"), stat_line(pid, comm, 4242)).expect("stat");
            std::fs::write(dir.join("cmdline"), format!("{comm}\0--flag\0x y\0")).expect("cmdline");
            if let Some(ns) = netns {
                let namespaces = self.0.join("namespaces");
                std::fs::create_dir_all(&namespaces).expect("namespaces dir");
                let target = namespaces.join(format!("net-{ns}"));
                std::fs::write(&target, "").expect("namespace");
                std::os::unix::fs::symlink(target, dir.join("ns/net")).expect("ns link");
            }
            for (fd, target) in fds {
                std::os::unix::fs::symlink(target, dir.join("fd").join(fd.to_string()))
                    .expect("fd link");
            }
        }

        fn tables(&self, pid: u32, tcp: &str, tcp6: Option<&str>) {
            let net = self.dir(pid).join("net");
            std::fs::create_dir_all(&net).expect("net dir");
            std::fs::write(net.join("tcp"), tcp).expect("tcp");
            if let Some(tcp6) = tcp6 {
                std::fs::write(net.join("tcp6"), tcp6).expect("tcp6");
            }
        }

        fn file(&self, pid: u32, name: &str, content: impl AsRef<[u8]>) {
            let path = self.dir(pid).join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("parent dir");
            }
            std::fs::write(path, content).expect("file");
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn start_time_survives_a_command_name_with_spaces_and_parentheses() {
        let fake = FakeProc::new("stat");
        fake.process(7, "my (odd) app", None, &[]);
        fake.file(7, "stat", stat_line(7, "my (odd) app", 987_654));
        let process = open_process(&fake.0, 7).expect("fake process");
        assert_eq!(start_ticks(&process), Some(987_654));
        assert_eq!(process_comm(&fake.0, 7).as_deref(), Some("my (odd) app"));
        assert!(process_started_ns(&fake.0, 7).is_some());
        assert_eq!(
            placement(&fake.0, 7, None).process_started_ns,
            process_started_ns(&fake.0, 7)
        );
        // A short or garbled stat gives nothing, and no panic.
        fake.file(7, "stat", "7 (app) S 1 2\n");
        assert_eq!(process_started_ns(&fake.0, 7), None);
        assert_eq!(process_comm(&fake.0, 7), None);
        // Gone.
        assert_eq!(process_started_ns(&fake.0, 99), None);
        assert_eq!(placement(&fake.0, 99, None), Placement::default());
    }

    #[test]
    fn our_own_start_is_in_the_past_on_the_monotonic_clock() {
        let started = process_started_ns(Path::new("/proc"), std::process::id())
            .expect("our own /proc/PID/stat");
        assert!(started <= crate::clock::monotonic_ns());
    }

    // Fixture lines come from a little-endian host, as the kernel prints them.
    const TCP4: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   115        0 21001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1538 01 00000000:00000000 00:00000000 00000000  1000        0 21002 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1538 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   115        0 21003 1 0000000000000000 20 4 30 10 -1
   3: 0A00000A:D431 1400000A:0CEA 02 00000001:00000000 01:00000064 00000000  1000        0 21004 1 0000000000000000 100 0 0 10 -1
   4: 0A00000A:D432 1400000A:0CEA 08 00000000:00000000 00:00000000 00000000  1000        0 21005 1 0000000000000000 20 4 30 10 -1
   5: 0A00000A:D433 1400000A:0CEA 06 00000000:00000000 03:00000064 00000000     0        0 0 3 0000000000000000
   6: 0100007F:0CEA 0100007F:C000 01 00000000:00000000 00:00000000 00000000  1000        0 21006 1 0000000000000000 20 4 30 10 -1
";

    // ::1 port 5432 listening; [::1]:50000 -> [::1]:5432 and its accepted
    // side; a v4-mapped client 10.0.0.10:40001 -> 10.0.0.20:3306; a v4
    // client accepted by the dual-stack [::]:6379 listener.
    const TCP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1538 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   115        0 22001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1538 01 00000000:00000000 00:00000000 00000000  1000        0 22002 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000001000000:1538 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000   115        0 22003 1 0000000000000000 20 4 30 10 -1
   3: 0000000000000000FFFF00000A00000A:9C41 0000000000000000FFFF00001400000A:0CEA 01 00000000:00000000 00:00000000 00000000  1000        0 22004 1 0000000000000000 20 4 30 10 -1
   4: 00000000000000000000000000000000:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 22005 1 0000000000000000 100 0 0 10 0
   5: 0000000000000000FFFF00000A00000A:18EB 0000000000000000FFFF00001E00000A:E000 01 00000000:00000000 00:00000000 00000000   999        0 22006 1 0000000000000000 20 4 30 10 -1
   6: 000080FE00000000FF005452C4D24DFE:E001 B80D0120000000000000000001000000:01BB 01 00000000:00000000 00:00000000 00000000  1000        0 22007 1 0000000000000000 20 4 30 10 -1
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn keeps_only_outbound_connections() {
        let fake = FakeProc::new("outbound");
        fake.process(10, "app", None, &[]);
        fake.tables(10, TCP4, Some(TCP6));
        let out = namespace_connections(&open_process(&fake.0, 10).expect("fake process"));
        let mut inodes: Vec<u64> = out.keys().copied().collect();
        inodes.sort_unstable();
        // Not 21001/22001/22005 (listeners), 21003/22003 (accepted by the
        // 5432 listeners), 22006 (v4 accepted by [::]:6379), 21000-series
        // TIME_WAIT with inode 0.
        assert_eq!(
            inodes,
            vec![21002, 21004, 21005, 21006, 22002, 22004, 22007]
        );
        assert_eq!(
            out[&21002],
            TcpConnection {
                local: addr("127.0.0.1:40000"),
                remote: addr("127.0.0.1:5432"),
                state: SeededTcpState::Established,
            }
        );
        assert_eq!(out[&21004].state, SeededTcpState::SynSent);
        assert_eq!(out[&21004].remote, addr("10.0.0.20:3306"));
        assert_eq!(out[&21005].state, SeededTcpState::CloseWait);
        // IPv4-mapped addresses in tcp6 come out as IPv4.
        assert_eq!(out[&22004].local, addr("10.0.0.10:40001"));
        assert_eq!(out[&22004].remote, addr("10.0.0.20:3306"));
        assert_eq!(out[&22002].remote, addr("[::1]:5432"));
        assert_eq!(out[&22007].local, addr("[fe80::5254:ff:fe4d:d2c4]:57345"));
        assert_eq!(out[&22007].remote, addr("[2001:db8::1]:443"));

        // Without tcp6 (IPv6 disabled) the IPv4 table still counts.
        fake.process(11, "v4only", None, &[]);
        fake.tables(11, TCP4, None);
        let out = namespace_connections(&open_process(&fake.0, 11).expect("fake process"));
        assert_eq!(out.len(), 4);
        // Without tables at all, nothing, and no error.
        fake.process(12, "none", None, &[]);
        assert!(
            namespace_connections(&open_process(&fake.0, 12).expect("fake process")).is_empty()
        );
    }

    #[test]
    fn listener_address_must_match_unless_wildcard() {
        let entry = |local: &str, remote: &str, state: TcpState, inode: u64| TcpEntry {
            local: addr(local),
            remote: addr(remote),
            state,
            inode,
        };
        let entries = [
            // Listens on 10.0.0.1:80 only.
            entry("10.0.0.1:80", "0.0.0.0:0", TcpState::Listen, 1),
            // Same port on another local address: not accepted by it.
            entry("127.0.0.1:80", "127.0.0.1:9999", TcpState::Established, 2),
            entry("10.0.0.1:80", "10.0.0.9:9999", TcpState::Established, 3),
            // 0.0.0.0 takes IPv4 only.
            entry("0.0.0.0:81", "0.0.0.0:0", TcpState::Listen, 4),
            entry(
                "[2001:db8::1]:81",
                "[2001:db8::2]:9999",
                TcpState::Established,
                5,
            ),
            entry(
                "192.168.1.1:81",
                "192.168.1.2:9999",
                TcpState::Established,
                6,
            ),
        ];
        let out = outbound_connections(&entries);
        let mut inodes: Vec<u64> = out.keys().copied().collect();
        inodes.sort_unstable();
        assert_eq!(inodes, vec![2, 5]);
    }

    /// Builds one netlink message.
    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn rtattr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn diag_msg(inode: u32, name: Option<&[u8]>, peer: Option<u32>) -> Vec<u8> {
        let mut p = vec![libc::AF_UNIX as u8, libc::SOCK_STREAM as u8, 1, 0];
        p.extend_from_slice(&inode.to_ne_bytes());
        p.extend_from_slice(&[0xaa; 8]);
        if let Some(name) = name {
            p.extend(rtattr(UNIX_DIAG_NAME, name));
        }
        // An attribute we do not know is skipped.
        p.extend(rtattr(5, &[1, 2, 3]));
        if let Some(peer) = peer {
            p.extend(rtattr(UNIX_DIAG_PEER, &peer.to_ne_bytes()));
        }
        nlmsg(SOCK_DIAG_BY_FAMILY, &p)
    }

    fn sample_dump() -> Vec<u8> {
        let mut buf = Vec::new();
        // Client 100 <-> accepted 101 on /run/postgresql/.s.PGSQL.5432.
        buf.extend(diag_msg(100, None, Some(101)));
        buf.extend(diag_msg(
            101,
            Some(b"/run/postgresql/.s.PGSQL.5432\0"),
            Some(100),
        ));
        // Client 200 of an abstract server 201.
        buf.extend(diag_msg(200, None, Some(201)));
        buf.extend(diag_msg(201, Some(b"\0redis\0x"), Some(200)));
        // A socketpair: neither side has a name.
        buf.extend(diag_msg(300, None, Some(301)));
        buf.extend(diag_msg(301, None, Some(300)));
        buf.extend(nlmsg(NLMSG_DONE, &0u32.to_ne_bytes()));
        buf
    }

    #[test]
    fn parses_unix_diag_replies() {
        let mut reply = UnixDiagReply::default();
        parse_unix_diag(&sample_dump(), &mut reply);
        assert!(reply.done);
        assert_eq!(reply.error, None);
        assert_eq!(reply.sockets.len(), 6);
        assert_eq!(
            reply.sockets[1],
            UnixSocketInfo {
                inode: 101,
                kind: libc::SOCK_STREAM as u8,
                state: 1,
                name: Some("/run/postgresql/.s.PGSQL.5432".to_owned()),
                peer: Some(100),
            }
        );
        assert_eq!(reply.sockets[3].name.as_deref(), Some("@redis@x"));

        let clients = unix_client_paths(&reply.sockets);
        assert_eq!(clients.len(), 2);
        assert_eq!(clients[&100], "/run/postgresql/.s.PGSQL.5432");
        assert_eq!(clients[&200], "@redis@x");

        // Stream sockets only.
        let mut dgram = reply.sockets.clone();
        dgram[0].kind = libc::SOCK_DGRAM as u8;
        assert!(!unix_client_paths(&dgram).contains_key(&100));
    }

    #[test]
    fn unix_diag_error_reply() {
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]);
        let mut reply = UnixDiagReply::default();
        parse_unix_diag(&nlmsg(NLMSG_ERROR, &payload), &mut reply);
        assert_eq!(reply.error, Some(libc::EPERM));
        assert!(!reply.done);
    }

    #[test]
    fn truncated_unix_diag_never_panics() {
        let full = sample_dump();
        let whole_messages = {
            let mut r = UnixDiagReply::default();
            parse_unix_diag(&full, &mut r);
            r.sockets
        };
        for cut in 0..full.len() {
            let mut reply = UnixDiagReply::default();
            parse_unix_diag(&full[..cut], &mut reply);
            // Whatever was complete is returned, in order.
            assert!(reply.sockets.len() <= whole_messages.len());
            assert_eq!(reply.sockets[..], whole_messages[..reply.sockets.len()]);
            assert!(!reply.done);
        }
        // Lying lengths: a header longer than the buffer, a zero length, an
        // attribute running past its message, a message too short for
        // unix_diag_msg.
        let mut reply = UnixDiagReply::default();
        let mut lying = nlmsg(SOCK_DIAG_BY_FAMILY, &[1, 2, 3, 4]);
        lying[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        parse_unix_diag(&lying, &mut reply);
        parse_unix_diag(&[0u8; 64], &mut reply);
        parse_unix_diag(&nlmsg(SOCK_DIAG_BY_FAMILY, &[1, 2, 3]), &mut reply);
        assert!(reply.sockets.is_empty());

        let mut bad_attr = diag_msg(7, None, None);
        let at = NLMSG_HDRLEN + UNIX_DIAG_MSG_LEN;
        bad_attr[at..at + 2].copy_from_slice(&500u16.to_ne_bytes());
        parse_unix_diag(&bad_attr, &mut reply);
        assert_eq!(reply.sockets.len(), 1);
        assert_eq!(reply.sockets[0].inode, 7);
        // A peer attribute too short for a u32 gives no peer.
        let mut p = vec![libc::AF_UNIX as u8, 1, 1, 0];
        p.extend_from_slice(&8u32.to_ne_bytes());
        p.extend_from_slice(&[0; 8]);
        p.extend(rtattr(UNIX_DIAG_PEER, &[1, 2]));
        parse_unix_diag(&nlmsg(SOCK_DIAG_BY_FAMILY, &p), &mut reply);
        assert_eq!(reply.sockets[1].peer, None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn scans_a_fake_proc_tree() {
        let fake = FakeProc::new("scan");
        // pid 10: client of 127.0.0.1:5432 (21002) and of 10.0.0.20:3306 via
        // tcp6 (22004), plus a pipe, a unix client and an unknown socket.
        fake.process(
            10,
            "app",
            Some(1),
            &[
                (0, "/dev/null"),
                (3, "socket:[21002]"),
                (4, "pipe:[77]"),
                (5, "socket:[22004]"),
                (6, "socket:[555]"),
                (7, "socket:[999999]"),
            ],
        );
        fake.tables(10, TCP4, Some(TCP6));
        // pid 11: the postgres server; its sockets are listeners/accepted.
        fake.process(
            11,
            "postgres",
            Some(1),
            &[(5, "socket:[21001]"), (9, "socket:[21003]")],
        );
        // In the same namespace: its tables must not be read again, so give
        // it none (reading would find nothing and lose 21006).
        fake.process(12, "worker", Some(1), &[(8, "socket:[21006]")]);
        // Another namespace with its own tables, no tcp6.
        fake.process(13, "other", Some(2), &[(3, "socket:[21002]")]);
        fake.tables(
            13,
            "  sl  local_address rem_address   st\n   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 21002 1\n",
            None,
        );
        // The agent itself is skipped.
        fake.process(14, "poolscope", Some(1), &[(3, "socket:[21002]")]);
        // A process whose fd dir vanished.
        std::fs::create_dir_all(fake.0.join("15")).expect("dir");
        // Non-numeric entries are ignored.
        std::fs::create_dir_all(fake.0.join("self")).expect("dir");
        std::fs::write(fake.0.join("uptime"), "1 1\n").expect("file");

        let unix = || HashMap::from([(555u64, "/run/pg/.s.PGSQL.5432".to_owned())]);
        let found = scan_connections_with(&fake.0, 14, unix);
        assert_eq!(
            found,
            vec![
                SeededSocket {
                    pid: 10,
                    fd: 3,
                    comm: "app".to_owned(),
                    inode: 21002,
                    peer: SeededPeer::Tcp {
                        local: addr("127.0.0.1:40000"),
                        remote: addr("127.0.0.1:5432"),
                        state: SeededTcpState::Established,
                    },
                },
                SeededSocket {
                    pid: 10,
                    fd: 5,
                    comm: "app".to_owned(),
                    inode: 22004,
                    peer: SeededPeer::Tcp {
                        local: addr("10.0.0.10:40001"),
                        remote: addr("10.0.0.20:3306"),
                        state: SeededTcpState::Established,
                    },
                },
                SeededSocket {
                    pid: 10,
                    fd: 6,
                    comm: "app".to_owned(),
                    inode: 555,
                    peer: SeededPeer::Unix {
                        path: "/run/pg/.s.PGSQL.5432".to_owned(),
                    },
                },
                SeededSocket {
                    pid: 12,
                    fd: 8,
                    comm: "worker".to_owned(),
                    inode: 21006,
                    peer: SeededPeer::Tcp {
                        local: addr("127.0.0.1:3306"),
                        remote: addr("127.0.0.1:49152"),
                        state: SeededTcpState::Established,
                    },
                },
            ]
        );
        // Without the skip, the agent's own socket shows up.
        let found = scan_connections_with(&fake.0, 0, HashMap::new);
        assert!(found.iter().any(|s| s.pid == 14 && s.fd == 3));

        assert_eq!(process_comm(&fake.0, 10).as_deref(), Some("app"));
        assert_eq!(
            process_cmdline(&fake.0, 10, false).as_deref(),
            Some("app --flag x y")
        );
        assert_eq!(process_comm(&fake.0, 99), None);
        assert_eq!(process_cmdline(&fake.0, 99, false), None);
        assert_eq!(
            scan_connections_with(&fake.0.join("nope"), 0, HashMap::new),
            vec![]
        );
    }

    #[test]
    fn finds_own_tcp_client_socket() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        let client = TcpStream::connect(server).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");

        let pid = std::process::id();
        let found = scan_connections(Path::new("/proc"), 0);
        let mine: Vec<&SeededSocket> = found.iter().filter(|s| s.pid == pid).collect();
        let seeded = mine
            .iter()
            .find(|s| s.fd == client.as_raw_fd())
            .unwrap_or_else(|| panic!("client socket not found in {mine:#?}"));
        assert_eq!(
            seeded.peer,
            SeededPeer::Tcp {
                local: client.local_addr().expect("local"),
                remote: server,
                state: SeededTcpState::Established,
            }
        );
        assert!(!seeded.comm.is_empty());
        assert!(!mine.iter().any(|s| s.fd == accepted.as_raw_fd()));
        assert!(!mine.iter().any(|s| s.fd == listener.as_raw_fd()));
    }

    #[test]
    fn finds_own_unix_client_socket() {
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("poolscope-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("db.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let client = UnixStream::connect(&path).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");

        let pid = std::process::id();
        let found = scan_connections(Path::new("/proc"), 0);
        let _ = std::fs::remove_dir_all(&dir);
        let mine: Vec<&SeededSocket> = found.iter().filter(|s| s.pid == pid).collect();
        let seeded = mine
            .iter()
            .find(|s| s.fd == client.as_raw_fd())
            .unwrap_or_else(|| panic!("client socket not found in {mine:#?}"));
        assert_eq!(
            seeded.peer,
            SeededPeer::Unix {
                path: path.display().to_string()
            }
        );
        assert!(!mine.iter().any(|s| s.fd == accepted.as_raw_fd()));
        assert!(!mine.iter().any(|s| s.fd == listener.as_raw_fd()));
    }

    #[test]
    fn unix_bound_type_tells_stream_from_datagram() {
        let fake = FakeProc::new("unix");
        fake.process(20, "app", None, &[]);
        fake.file(
            20,
            "net/unix",
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 2001 /run/postgresql/.s.PGSQL.5432\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 2002 /dev/log\n\
            0000000000000000: 00000002 00000000 00000000 0001 03 2003\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 2004 @redis\n",
        );
        assert_eq!(
            unix_bound_type(&fake.0, 20, "/run/postgresql/.s.PGSQL.5432"),
            Some(UNIX_SOCK_STREAM)
        );
        assert_eq!(unix_bound_type(&fake.0, 20, "/dev/log"), Some(2));
        assert_eq!(
            unix_bound_type(&fake.0, 20, "@redis"),
            Some(UNIX_SOCK_STREAM)
        );
        assert_eq!(unix_bound_type(&fake.0, 20, "/nope"), None);
        // Another process, no table; a process that does not exist.
        fake.process(21, "app", None, &[]);
        assert_eq!(unix_bound_type(&fake.0, 21, "/dev/log"), None);
        assert_eq!(unix_bound_type(&fake.0, 99, "/dev/log"), None);
        // A garbled table is no answer, not a panic.
        fake.file(21, "net/unix", "garbage\nmore garbage\n");
        assert_eq!(unix_bound_type(&fake.0, 21, "/dev/log"), None);
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "3f4a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677889900aabbccdde";
        for path in [
            format!("/system.slice/docker-{id}.scope"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{id}.scope"),
            format!("/kubepods/burstable/pod5678/{id}"),
            format!("/machine.slice/libpod-{id}.scope/container"),
            format!("/kubepods/besteffort/podabc/crio-{id}"),
            format!("/kubepods/besteffort/podabc/crio-{}", id.to_ascii_uppercase()),
        ] {
            assert_eq!(container_id_in_cgroup_path(&path).as_deref(), Some(id), "{path}");
        }
        assert_eq!(
            container_id_in_cgroup_path("/user.slice/user-0.slice/session-3.scope"),
            None
        );
        assert_eq!(container_id_in_cgroup_path("garbage"), None);
    }

    #[test]
    fn pod_uids_from_both_cgroup_drivers() {
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-abc.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_in_cgroup_path(&systemd).as_deref(), Some(uid));
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/0123");
        assert_eq!(pod_uid_in_cgroup_path(&cgroupfs).as_deref(), Some(uid));
        assert_eq!(
            pod_uid_in_cgroup_path("/system.slice/docker-abc.scope"),
            None
        );
        assert_eq!(pod_uid_in_cgroup_path("/kubepods/podnot-a-uid/x"), None);
    }

    #[test]
    fn placement_from_a_fake_process() {
        let fake = FakeProc::new("placement");
        let id = "3f4a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677889900aabbccdde";
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let logs = fake.0.join("pods");
        std::fs::create_dir_all(logs.join(format!("shop_orders-7d9f_{uid}"))).expect("mkdir");
        // Its sibling, the containers' log links (only their names count).
        let containers = fake.0.join("containers");
        std::fs::create_dir_all(&containers).expect("mkdir");
        std::fs::write(
            containers.join(format!("orders-7d9f_shop_api-{id}.log")),
            "",
        )
        .expect("link");

        // cgroup v1: several hierarchies, the ids in a later line.
        fake.process(30, "app", None, &[]);
        fake.file(
            30,
            "cgroup",
            format!(
                "13:misc:/\n12:pids:/kubepods/besteffort/pod{uid}/{id}\n\
                 1:name=systemd:/kubepods/besteffort/pod{uid}/{id}\n0::/\n"
            ),
        );
        let placed = placement(&fake.0, 30, Some(&logs));
        assert_eq!(placed.container_id.as_deref(), Some(id));
        assert_eq!(placed.pod_uid.as_deref(), Some(uid));
        assert_eq!(placed.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(placed.pod_name.as_deref(), Some("orders-7d9f"));
        assert_eq!(placed.container_name.as_deref(), Some("api"));
        assert!(placed.process_started_ns.is_some());
        assert_eq!(container_id(&fake.0, 30).as_deref(), Some(id));
        // Without the kubelet's directory: the uid but no names.
        let placed = placement(&fake.0, 30, None);
        assert_eq!(placed.pod_uid.as_deref(), Some(uid));
        assert_eq!(placed.pod_name, None);

        // cgroup v2 outside any container.
        fake.process(31, "sshd", None, &[]);
        fake.file(31, "cgroup", "0::/system.slice/ssh.service\n");
        let placed = placement(&fake.0, 31, Some(&logs));
        assert!(placed.is_empty());
        assert!(placed.process_started_ns.is_some());
        assert_eq!(container_id(&fake.0, 31), None);

        // No cgroup file (or an unreadable one): no placement, still a start.
        fake.process(32, "gone-cgroup", None, &[]);
        let placed = placement(&fake.0, 32, None);
        assert!(placed.is_empty());
        assert!(placed.process_started_ns.is_some());
        assert_eq!(container_id(&fake.0, 99), None);
    }

    #[test]
    fn thread_names_from_the_task_directory() {
        let fake = FakeProc::new("threads");
        fake.process(40, "java", None, &[]);
        fake.file(40, "task/40/stat", stat_line(40, "java", 1));
        fake.file(40, "task/41/stat", stat_line(41, "HikariPool-1 h", 1));
        assert_eq!(
            thread_name(&fake.0, 40, 41).as_deref(),
            Some("HikariPool-1 h")
        );
        assert_eq!(thread_name(&fake.0, 40, 40).as_deref(), Some("java"));
        assert_eq!(thread_name(&fake.0, 40, 42), None);
        assert_eq!(thread_name(&fake.0, 99, 41), None);
        assert_eq!(thread_name(&fake.0, 40, u32::MAX), None);
    }

    #[test]
    fn thread_name_of_a_real_thread() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("procfs-probe".to_owned())
            .spawn(move || {
                // SAFETY: gettid has no memory effects.
                let tid = unsafe { libc::gettid() };
                ready_tx.send(tid).expect("send tid");
                let _ = done_rx.recv();
            })
            .expect("spawn");
        let tid = ready_rx.recv().expect("tid");
        let name = thread_name(Path::new("/proc"), std::process::id(), tid as u32);
        drop(done_tx);
        worker.join().expect("join");
        assert_eq!(name.as_deref(), Some("procfs-probe"));
    }

    #[test]
    fn environment_values_by_name() {
        let fake = FakeProc::new("environ");
        fake.process(50, "app", None, &[]);
        let mut environ = b"PATH=/usr/bin\0OTEL_SERVICE_NAME=orders\0EMPTY=\0".to_vec();
        environ.extend_from_slice(b"OTEL_RESOURCE_ATTRIBUTES=a=b,c=d\0");
        environ.extend_from_slice(b"LATIN1=caf\xe9\0NOEQUALS\0OTEL_SERVICE_NAME=second\0");
        fake.file(50, "environ", &environ);
        let got = process_environment(
            &fake.0,
            50,
            &[
                "OTEL_RESOURCE_ATTRIBUTES",
                "OTEL_SERVICE_NAME",
                "EMPTY",
                "LATIN1",
                "NOEQUALS",
                "MISSING",
            ],
        );
        assert_eq!(
            got,
            vec![
                ("OTEL_RESOURCE_ATTRIBUTES".to_owned(), "a=b,c=d".to_owned()),
                // The first occurrence wins, as with getenv.
                ("OTEL_SERVICE_NAME".to_owned(), "orders".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        // A name is matched whole, not as a prefix.
        assert!(process_environment(&fake.0, 50, &["OTEL"]).is_empty());
        assert!(process_environment(&fake.0, 50, &[]).is_empty());
        assert!(process_environment(&fake.0, 99, &["PATH"]).is_empty());
        // An environment without a final NUL (rewritten by the process) still
        // counts its last entry.
        fake.file(50, "environ", "A=1\0B=2");
        assert_eq!(
            process_environment(&fake.0, 50, &["B"]),
            vec![("B".to_owned(), "2".to_owned())]
        );
    }

    #[test]
    fn environment_values_and_reads_are_bounded() {
        let fake = FakeProc::new("environ-bounds");
        fake.process(51, "app", None, &[]);
        // A value of 5000 bytes whose 4096th byte falls inside a 3-byte
        // character: cut before that character.
        let long = format!("{}€{}", "x".repeat(4095), "y".repeat(902));
        let mut environ = format!("LONG={long}\0").into_bytes();
        // Padding up to just before 1 MiB, then a variable the limit cuts
        // in its value, then one past the limit.
        let pad = ENVIRON_READ_LIMIT as usize - environ.len() - 10;
        environ.extend_from_slice(format!("PAD={}\0", "p".repeat(pad - 5)).as_bytes());
        environ.extend_from_slice(b"CUT=0123456789\0AFTER=1\0");
        fake.file(51, "environ", &environ);
        let got = process_environment(&fake.0, 51, &["LONG", "CUT", "AFTER", "PAD"]);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["LONG", "PAD"]);
        assert_eq!(got[0].1, "x".repeat(4095));
        assert_eq!(got[1].1.len(), ENVIRON_VALUE_LIMIT);
    }

    #[test]
    fn pod_names_from_the_kubelet_log_directory() {
        let dir = std::env::temp_dir().join(format!("poolscope-pods-{}", std::process::id()));
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        std::fs::create_dir_all(dir.join(format!("shop_orders-7d9f_{uid}"))).expect("mkdir");
        std::fs::create_dir_all(
            dir.join("kube-system_coredns-1_11111111-2222-3333-4444-555555555555"),
        )
        .expect("mkdir");
        assert_eq!(
            pod_names(&dir, uid),
            Some(("shop".to_string(), "orders-7d9f".to_string()))
        );
        assert_eq!(
            pod_names(&dir, "99999999-2222-3333-4444-555555555555"),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn container_names_come_from_the_kubelets_log_links() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let names = [
            "web-1_shop_sidecar-ffff.log".to_string(),
            format!("web-1_shop_app-server-{id}.log"),
        ];
        assert_eq!(
            container_name_in(names.iter().map(String::as_str), id).as_deref(),
            Some("app-server")
        );
        assert_eq!(container_name_in(["x.log"], id), None);
    }

    #[test]
    fn symbol_offsets_are_where_the_loader_put_the_functions() {
        use std::io::{Seek, SeekFrom};
        let libc_path = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let library = open_tls_library(libc_path, &["getpid", "socket", "no_such_symbol"])
            .expect("libc opens");
        assert_eq!(library.offset("no_such_symbol"), None);
        for name in ["getpid", "socket"] {
            let offset = library.offset(name).expect("libc defines it");
            // The function's first bytes in the file at that offset are its
            // first bytes in this process's memory, where the loader put it.
            let mut in_file = [0u8; 16];
            let mut file = std::fs::File::open(library.attach_path()).expect("reopen by fd");
            file.seek(SeekFrom::Start(offset)).expect("seek");
            file.read_exact(&mut in_file).expect("read");
            let c_name = std::ffi::CString::new(name).expect("name");
            // SAFETY: dlsym with a NUL-terminated name; the address it gives
            // is of mapped code, read for 16 bytes.
            let in_memory = unsafe {
                let address = libc::dlsym(libc::RTLD_DEFAULT, c_name.as_ptr());
                assert!(!address.is_null(), "{name} is loaded");
                std::slice::from_raw_parts(address as *const u8, 16).to_vec()
            };
            assert_eq!(in_file.to_vec(), in_memory, "{name} at {offset:#x}");
        }
    }

    #[test]
    fn mapped_files_that_are_not_regular_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("poolscope-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        // A FIFO that nobody writes to: opening it for reading would block.
        let fifo = dir.join("libssl.so.3");
        let c_fifo = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        let refused = open_mapped_file(&fifo).expect_err("a FIFO is refused");
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput);
        assert!(matches!(
            open_tls_library(&fifo, &["SSL_write"]),
            Err(OpenLibraryError::Unusable(_))
        ));
        assert!(open_mapped_file(&dir).is_err(), "a directory is refused");
        assert!(matches!(
            open_tls_library(&dir.join("gone.so"), &["SSL_write"]),
            Err(OpenLibraryError::Gone(_))
        ));
        let text = dir.join("libssl.so.1.1");
        std::fs::write(&text, "not ELF").expect("write");
        assert!(matches!(
            open_tls_library(&text, &["SSL_write"]),
            Err(OpenLibraryError::Unusable(_))
        ));
        assert!(!exports_tls_functions(&fifo) && !exports_tls_functions(&text));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Debian 12's OpenSSL 3.0 (what `cargo xtask setup` installs): both
    /// directions are hooked at their internal function, whose first
    /// instruction (a push) the kernel emulates.
    #[test]
    fn the_systems_openssl_3_0_is_hooked_at_its_internal_functions() {
        let path = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let library =
            open_tls_library(path, crate::tls_libraries::TLS_SYMBOLS).expect("libssl.so.3 opens");
        assert!(library.emulated);
        let carried: Vec<&str> = library.points.iter().map(|p| p.carries).collect();
        assert_eq!(
            carried,
            ["SSL_read_ex", "SSL_write_ex"],
            "{:?}",
            library.points
        );
        for point in &library.points {
            let first = read_at(&library.file, point.offset, 2).expect("code");
            assert!(
                crate::tls_libraries::starts_with_push(&first),
                "a push at {:#x}: {first:x?}",
                point.offset
            );
        }
        let ex = ["SSL_read_ex", "SSL_write_ex"].map(|s| library.offset(s).expect("defined"));
        assert!(library.points.iter().all(|p| !ex.contains(&p.offset)));
    }
}
