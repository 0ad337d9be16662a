//! The fast path of [`crate::decode`]: the kinds acquires and releases
//! send, read by one pass over the bytes. Everything it does not expect
//! (another kind, an escape in a string, a number that is not a plain
//! unsigned integer, a nested value, a field written twice, a message
//! that does not validate) makes it give up, and the full reading decides,
//! so that what is accepted never depends on the path, and a refusal and
//! its reason never come from here.

use std::net::SocketAddr;

use crate::{AcquireResult, Body, ConnRef, Message, Version, MAX_CHECKOUTS_PER_MESSAGE, VERSION};

/// The message, or `None` to leave it to the full reading.
pub(crate) fn decode(bytes: &[u8]) -> Option<Message> {
    let mut s = Scanner { bytes, at: 0 };
    let mut f = Fields::default();
    s.skip_whitespace();
    s.expect(b'{')?;
    loop {
        s.skip_whitespace();
        let key = s.string()?;
        s.skip_whitespace();
        s.expect(b':')?;
        s.skip_whitespace();
        f.read(key, &mut s)?;
        s.skip_whitespace();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.skip_whitespace();
    if s.at != bytes.len() {
        return None;
    }
    f.message()
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string without escapes or control characters, valid UTF-8.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => return None,
                b if b < 0x20 => return None,
                _ => {}
            }
        }
        std::str::from_utf8(&self.bytes[start..self.at - 1]).ok()
    }

    /// A plain unsigned integer as JSON writes it (no sign, fraction,
    /// exponent or leading zero) that fits in a u64.
    fn unsigned(&mut self) -> Option<u64> {
        let start = self.at;
        let mut value: u64 = 0;
        while let Some(b @ b'0'..=b'9') = self.peek() {
            value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        let leading_zero = digits > 1 && self.bytes[start] == b'0';
        if digits == 0 || leading_zero || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(value)
    }

    /// A list of plain unsigned integers, at most
    /// [`MAX_CHECKOUTS_PER_MESSAGE`] of them (longer is left to the full
    /// reading, which refuses it).
    fn unsigned_list(&mut self) -> Option<Vec<u64>> {
        self.expect(b'[')?;
        let mut values = Vec::new();
        self.skip_whitespace();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(values);
        }
        loop {
            self.skip_whitespace();
            if values.len() == MAX_CHECKOUTS_PER_MESSAGE {
                return None;
            }
            values.push(self.unsigned()?);
            self.skip_whitespace();
            match self.next()? {
                b',' => continue,
                b']' => return Some(values),
                _ => return None,
            }
        }
    }

    /// The value of a field this path does not read: a string, a plain
    /// unsigned integer, `true`, `false` or `null`.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'0'..=b'9' => self.unsigned().map(|_| ()),
            _ => {
                for word in [&b"true"[..], b"false", b"null"] {
                    if self.bytes[self.at..].starts_with(word) {
                        self.at += word.len();
                        return Some(());
                    }
                }
                None
            }
        }
    }
}

/// The fields read so far; each at most once.
#[derive(Default)]
struct Fields<'a> {
    v: Option<u64>,
    kind: Option<&'a str>,
    pool: Option<&'a str>,
    mono_ns: Option<u64>,
    pid: Option<u32>,
    request: Option<u64>,
    result: Option<&'a str>,
    tid: Option<u32>,
    wait_ns: Option<u64>,
    use_ns: Option<u64>,
    waits_ns: Option<Vec<u64>>,
    uses_ns: Option<Vec<u64>>,
    local_address: Option<SocketAddr>,
    fd: Option<i32>,
    conn: Option<u64>,
}

/// Sets a field read for the first time; a second time gives up.
fn once<T>(field: &mut Option<T>, value: T) -> Option<()> {
    if field.is_some() {
        return None;
    }
    *field = Some(value);
    Some(())
}

impl<'a> Fields<'a> {
    fn read(&mut self, key: &str, s: &mut Scanner<'a>) -> Option<()> {
        match key {
            "v" => once(&mut self.v, s.unsigned()?),
            "kind" => once(&mut self.kind, s.string()?),
            "pool" => once(&mut self.pool, s.string()?),
            "mono_ns" => once(&mut self.mono_ns, s.unsigned()?),
            "pid" => once(&mut self.pid, u32::try_from(s.unsigned()?).ok()?),
            "request" => once(&mut self.request, s.unsigned()?),
            "result" => once(&mut self.result, s.string()?),
            "tid" => once(&mut self.tid, u32::try_from(s.unsigned()?).ok()?),
            "wait_ns" => once(&mut self.wait_ns, s.unsigned()?),
            "use_ns" => once(&mut self.use_ns, s.unsigned()?),
            "waits_ns" => once(&mut self.waits_ns, s.unsigned_list()?),
            "uses_ns" => once(&mut self.uses_ns, s.unsigned_list()?),
            "local_address" => once(&mut self.local_address, s.string()?.parse().ok()?),
            "fd" => once(&mut self.fd, i32::try_from(s.unsigned()?).ok()?),
            "conn" => once(&mut self.conn, s.unsigned()?),
            _ => s.skip_value(),
        }
    }

    fn message(self) -> Option<Message> {
        if self.v? != u64::from(VERSION) {
            return None;
        }
        let conn = ConnRef {
            local_address: self.local_address,
            fd: self.fd,
            conn: self.conn,
        };
        let body = match self.kind? {
            "acquire_start" => Body::AcquireStart {
                request: self.request?,
                tid: self.tid,
            },
            "acquire_end" => Body::AcquireEnd {
                request: self.request?,
                result: match self.result? {
                    "ok" => AcquireResult::Ok(conn),
                    "timeout" => AcquireResult::Timeout,
                    "error" => AcquireResult::Error,
                    _ => return None,
                },
                tid: self.tid,
                wait_ns: self.wait_ns,
            },
            "release" => Body::Release(conn),
            "checkout" => Body::Checkout {
                request: self.request?,
                conn,
                tid: self.tid,
                wait_ns: self.wait_ns,
                use_ns: self.use_ns?,
            },
            "checkouts" => Body::Checkouts {
                conn,
                tid: self.tid,
                waits_ns: self.waits_ns?,
                uses_ns: self.uses_ns?,
            },
            "connection_created" => Body::ConnectionCreated {
                conn,
                tid: self.tid,
            },
            "connection_closed" => Body::ConnectionClosed(conn),
            _ => return None,
        };
        let message = Message {
            v: Version,
            pool: self.pool?.to_string(),
            body,
            mono_ns: self.mono_ns,
            pid: self.pid,
        };
        message.validate().ok()?;
        Some(message)
    }
}
