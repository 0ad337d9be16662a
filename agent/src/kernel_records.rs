//! Records from the kernel's ring buffer -> typed events.
//!
//! Pure and length-checked: a short, oversized or unknown record is an error
//! value, never a panic, and the reader counts it and moves on.

use agent_common::{
    family, sock_flags, CloseEvent, ConnectEvent, DataEvent, EventHeader, ProcessExitEvent,
    RecordKind, SockStateEvent, DATA_EVENT_FIXED,
};
use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::lifecycle::{ConnId, Endpoint, Event, EventKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Short { need: usize, got: usize },
    UnknownKind(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short { need, got } => {
                write!(f, "kernel event too short: {got} bytes, need {need}")
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown kernel event kind {k}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Reads a `#[repr(C)]` plain-old-data struct from the front of `bytes`.
fn read_pod<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            need,
            got: bytes.len(),
        });
    }
    // SAFETY: length checked above; T is one of agent_common's POD event
    // structs (integers and byte arrays only), valid for any bit pattern;
    // read_unaligned copes with the ring buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A NUL-terminated kernel string (comm, path) as UTF-8, lossily.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn ip_from(fam: u16, raw: &[u8; 16]) -> IpAddr {
    if fam == family::INET6 {
        let v6 = Ipv6Addr::from(*raw);
        // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

fn unix_path(path: &[u8], len: u16) -> String {
    let len = usize::from(len).min(path.len());
    let path = &path[..len];
    // Abstract sockets start with a NUL; show them the way ss does.
    if path.first() == Some(&0) {
        format!("@{}", c_string(&path[1..]))
    } else {
        c_string(path)
    }
}

fn conn_id(h: &EventHeader) -> ConnId {
    ConnId {
        pid: h.tgid,
        fd: h.fd,
        generation: h.conn_start_ns,
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read_pod(bytes)?;
    let Some(record_kind) = RecordKind::from_u32(header.kind) else {
        return Err(DecodeError::UnknownKind(header.kind));
    };
    let kind = match record_kind {
        RecordKind::Connect => {
            let e: ConnectEvent = read_pod(bytes)?;
            let remote = if e.family == family::UNIX {
                Endpoint::Unix(unix_path(&e.path, e.path_len))
            } else {
                Endpoint::Inet(SocketAddr::new(ip_from(e.family, &e.addr), e.port))
            };
            EventKind::Connect {
                tid: e.header.tid,
                ret: e.ret,
                remote,
                comm: c_string(&e.comm),
            }
        }
        RecordKind::SockState => {
            let e: SockStateEvent = read_pod(bytes)?;
            EventKind::SockState {
                old_state: e.old_state,
                new_state: e.new_state,
                local: SocketAddr::new(ip_from(e.family, &e.saddr), e.sport),
                remote: SocketAddr::new(ip_from(e.family, &e.daddr), e.dport),
                reset_received: e.flags & sock_flags::RESET_RECEIVED != 0,
            }
        }
        RecordKind::Close => {
            let _: CloseEvent = read_pod(bytes)?;
            EventKind::Close
        }
        RecordKind::ProcessExit => {
            let e: ProcessExitEvent = read_pod(bytes)?;
            EventKind::ProcessExit {
                comm: c_string(&e.comm),
            }
        }
        RecordKind::Data => {
            // The fixed part; the kernel sizes records in a few classes, so
            // the record may hold more than the bytes it filled.
            let e: DataEvent<0> = read_pod(bytes)?;
            let head_len = usize::from(e.head_len);
            let need = DATA_EVENT_FIXED + head_len + usize::from(e.tail_len);
            let data = bytes
                .get(DATA_EVENT_FIXED..need)
                .ok_or(DecodeError::Short {
                    need,
                    got: bytes.len(),
                })?;
            let (head, tail) = data.split_at(head_len);
            EventKind::Data {
                sent: e.direction == agent_common::direction::SEND,
                enter_ns: e.enter_ns,
                total_len: e.total_len,
                head: head.to_vec(),
                tail: tail.to_vec(),
                tls_plaintext: e.source == agent_common::data_source::TLS_LIBRARY,
            }
        }
    };
    Ok(Event {
        ts_ns: header.ts_ns,
        conn: conn_id(&header),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{COMM_LEN, UNIX_PATH_LEN};

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: test-only view of a POD struct as bytes.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: u32) -> EventHeader {
        EventHeader {
            kind,
            tgid: 42,
            tid: 43,
            fd: 7,
            ts_ns: 1_000,
            conn_start_ns: 900,
        }
    }

    #[test]
    fn decodes_ipv4_connect() {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"psql");
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let e = ConnectEvent {
            header: header(RecordKind::Connect as u32),
            ret: -111,
            family: family::INET,
            port: 5432,
            path_len: 0,
            _pad0: 0,
            addr,
            comm,
            path: [0; UNIX_PATH_LEN],
            _pad1: [0; 4],
        };
        let ev = decode(&bytes_of(&e)).expect("decodes");
        assert_eq!(ev.conn.pid, 42);
        assert_eq!(ev.conn.generation, 900);
        match ev.kind {
            EventKind::Connect {
                ret, remote, comm, ..
            } => {
                assert_eq!(ret, -111);
                assert_eq!(
                    remote,
                    Endpoint::Inet("127.0.0.1:5432".parse().expect("addr"))
                );
                assert_eq!(comm, "psql");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decodes_unix_and_abstract_paths() {
        assert_eq!(
            unix_path(b"/run/pg/.s.PGSQL.5432\0zz", 30),
            "/run/pg/.s.PGSQL.5432"
        );
        assert_eq!(unix_path(b"\0hidden", 7), "@hidden");
        assert_eq!(unix_path(b"/x", 200), "/x");
    }

    #[test]
    fn maps_v4_in_v6() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            ip_from(family::INET6, &raw),
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))
        );
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let bytes = bytes_of(&header(RecordKind::Connect as u32));
        assert!(matches!(decode(&bytes), Err(DecodeError::Short { .. })));
        assert!(matches!(
            decode(&bytes[..5]),
            Err(DecodeError::Short { .. })
        ));
        assert_eq!(
            decode(&bytes_of(&header(99))),
            Err(DecodeError::UnknownKind(99))
        );
        assert!(matches!(decode(&[]), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn decodes_close_and_exit() {
        let ev = decode(&bytes_of(&CloseEvent {
            header: header(RecordKind::Close as u32),
        }))
        .expect("close");
        assert_eq!(ev.kind, EventKind::Close);
        let ev = decode(&bytes_of(&ProcessExitEvent {
            header: header(RecordKind::ProcessExit as u32),
            comm: [b'x'; COMM_LEN],
        }))
        .expect("exit");
        assert!(matches!(ev.kind, EventKind::ProcessExit { .. }));
    }

    /// A data record as the kernel writes it: the fixed part, then the
    /// head and the tail, in a record of one of its size classes.
    fn data_record(head: &[u8], tail: &[u8], room: usize) -> Vec<u8> {
        let fixed = DataEvent::<0> {
            header: header(RecordKind::Data as u32),
            enter_ns: 900,
            total_len: 5000,
            head_len: head.len() as u16,
            tail_len: tail.len() as u16,
            direction: agent_common::direction::RECV,
            io_kind: agent_common::io_kind::BUFFER,
            source: agent_common::data_source::SOCKET,
            _pad0: [0; 5],
            data: [],
        };
        let mut bytes = bytes_of(&fixed);
        bytes.extend_from_slice(head);
        bytes.extend_from_slice(tail);
        bytes.resize(DATA_EVENT_FIXED + room, 0xAA);
        bytes
    }

    #[test]
    fn decodes_data_records_of_any_size_class() {
        let bytes = data_record(b"T\0\0\0head", b"Z\0\0\0\x05I", 320);
        let ev = decode(&bytes).expect("decodes");
        assert_eq!(ev.ts_ns, 1_000);
        match ev.kind {
            EventKind::Data {
                sent,
                enter_ns,
                total_len,
                head,
                tail,
                tls_plaintext,
            } => {
                assert!(!sent);
                assert!(!tls_plaintext);
                assert_eq!((enter_ns, total_len), (900, 5000));
                assert_eq!(head, b"T\0\0\0head");
                assert_eq!(tail, b"Z\0\0\0\x05I");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_data_record_shorter_than_its_lengths_is_an_error() {
        let mut bytes = data_record(b"0123456789", b"", 10);
        bytes.truncate(DATA_EVENT_FIXED + 4);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Short {
                need: DATA_EVENT_FIXED + 10,
                got: DATA_EVENT_FIXED + 4
            })
        );
        assert!(matches!(
            decode(&bytes[..DATA_EVENT_FIXED - 1]),
            Err(DecodeError::Short { .. })
        ));
        let mut unknown = bytes_of(&header(99));
        unknown.resize(64, 0);
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(99)));
    }
}
