//! MySQL/MariaDB client/server protocol: handshake, COM_QUERY, COM_STMT_*,
//! and responses (OK, ERR, EOF, result sets) with SERVER_STATUS_IN_TRANS.
//!
//! Packets are a 3-byte little-endian payload length, a sequence id, and the
//! payload; a payload of 0xFFFFFF bytes continues in the next packet.

use super::book::{
    Alternation, BoundedMap, FeedContext, Pending, Protocol, RequestQueue, ResponseEnd,
};
use super::frame::{whole_msg, Flow, FramedDirection, Msg, View, Wire};
use super::sql::{cstr, db_error, describe, Dialect};
use super::{Chunk, Direction, Observation, TxState};

const HEADER: usize = 4;
const MAX_PAYLOAD: usize = 0xFF_FFFF;

const CLIENT_CONNECT_WITH_DB: u32 = 0x0000_0008;
const CLIENT_COMPRESS: u32 = 0x0000_0020;
const CLIENT_PROTOCOL_41: u32 = 0x0000_0200;
const CLIENT_SSL: u32 = 0x0000_0800;
const CLIENT_SECURE_CONNECTION: u32 = 0x0000_8000;
const CLIENT_PLUGIN_AUTH_LENENC_DATA: u32 = 0x0020_0000;
const CLIENT_DEPRECATE_EOF: u32 = 0x0100_0000;
const CLIENT_ZSTD_COMPRESSION: u32 = 0x0400_0000;

const SERVER_STATUS_IN_TRANS: u16 = 0x0001;
const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;

const COM_QUIT: u8 = 0x01;
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_PING: u8 = 0x0e;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;
/// Commands taken as the start of a request when framing is guessed.
const KNOWN_COMMANDS: &[u8] = &[
    COM_QUIT,
    COM_INIT_DB,
    COM_QUERY,
    0x09,
    COM_PING,
    0x11,
    COM_STMT_PREPARE,
    COM_STMT_EXECUTE,
    COM_STMT_SEND_LONG_DATA,
    COM_STMT_CLOSE,
    0x1a,
    0x1b,
    0x1c,
    0x1f,
];

/// Prepared statements remembered per connection.
const STATEMENTS_MAX: usize = 256;

const WIRE: Wire = Wire {
    header_len: HEADER,
    body_len: |h| match h {
        [a, b, c, _] => Some(usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16),
        _ => None,
    },
};

fn le16(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(..2)?.try_into().ok()?))
}

fn le32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// A length-encoded integer and what follows it.
fn lenenc(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    let width = match first {
        0..=0xfa => return Some((u64::from(first), rest)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let mut value = [0u8; 8];
    value.get_mut(..width)?.copy_from_slice(rest.get(..width)?);
    Some((u64::from_le_bytes(value), rest.get(width..)?))
}

/// A server greeting: HandshakeV10 (protocol 10, a printable version).
pub(crate) fn is_greeting(start: &[u8]) -> bool {
    packet(start).is_some_and(|(len, seq, payload)| greeting_packet(len, seq, payload))
}

/// A chunk that is only a packet header (the client reads each packet's
/// header and payload apart) that could announce a greeting: sequence id 0
/// and a greeting's length.
pub(crate) fn greeting_header(view: &View<'_>) -> Option<[u8; HEADER]> {
    let header: [u8; HEADER] = view.start().try_into().ok()?;
    let len = WIRE.announced(&header)?;
    (view.total() == HEADER && header[3] == 0 && GREETING_LEN.contains(&len)).then_some(header)
}

/// `start` is the payload of the greeting that `header` announced.
pub(crate) fn is_split_greeting(header: &[u8; HEADER], start: &[u8]) -> bool {
    let len = WIRE.announced(header).unwrap_or_default();
    greeting_packet(len, header[3], start.get(..len).unwrap_or(start))
}

/// Payload lengths of a plausible greeting.
const GREETING_LEN: std::ops::RangeInclusive<usize> = 40..=1024;

fn greeting_packet(len: usize, seq: u8, payload: &[u8]) -> bool {
    let Some((&10, rest)) = payload.split_first() else {
        return false;
    };
    let (version, after) = cstr(rest);
    seq == 0
        && GREETING_LEN.contains(&len)
        && (1..=64).contains(&version.len())
        && version.iter().all(u8::is_ascii_graphic)
        && after.len() >= 4 + 8 + 1 + 2
}

/// The first packet of `bytes`: payload length, sequence id, known payload.
fn packet(bytes: &[u8]) -> Option<(usize, u8, &[u8])> {
    let len = WIRE.announced(bytes.get(..HEADER)?)?;
    let seq = *bytes.get(3)?;
    let payload = bytes.get(HEADER..)?;
    Some((len, seq, payload.get(..len).unwrap_or(payload)))
}

/// A chunk made of whole commands (sequence id 0, a known command byte, a
/// plausible payload) that cover it exactly: clients write each command
/// whole.
pub(crate) fn is_command_start(view: &View<'_>) -> bool {
    let total = view.total();
    let mut pos = 0usize;
    for _ in 0..8 {
        let Some((len, 0, payload)) = packet(view.from(pos)) else {
            return false;
        };
        let plausible = match payload.split_first() {
            Some((&c, rest)) if KNOWN_COMMANDS.contains(&c) => match c {
                COM_QUIT | COM_PING => len == 1,
                COM_STMT_CLOSE => len == 5,
                COM_STMT_EXECUTE => len >= 10,
                COM_QUERY | COM_STMT_PREPARE | COM_INIT_DB => rest
                    .first()
                    .is_some_and(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()),
                _ => true,
            },
            _ => false,
        };
        if !plausible {
            return false;
        }
        pos = pos.saturating_add(HEADER + len);
        if pos >= total {
            return pos == total;
        }
    }
    false
}

/// Packets that can end a response, for reading a long result's tail
/// backwards: an EOF or OK-as-EOF (0xFE, payload 5 to 11 bytes: the EOF is
/// 5, the OK 7 plus a few bytes of info; rows cannot start with 0xFE unless
/// they are at least 9 bytes long, and long rows are not read this way) or
/// an ERR with its SQLSTATE marker.
fn response_end(m: &[u8]) -> bool {
    match packet(m) {
        Some((len, _, payload)) if len + HEADER == m.len() => match payload.first() {
            Some(0xfe) => (5..=11).contains(&len),
            Some(0xff) => len >= 9 && payload.get(3) == Some(&b'#'),
            _ => false,
        },
        _ => false,
    }
}

/// Status flags of an OK packet (0x00 or 0xFE header) or an EOF packet.
fn status_flags(payload: &[u8]) -> Option<u16> {
    let (&header, rest) = payload.split_first()?;
    if header == 0xfe && payload.len() == 5 {
        return le16(rest.get(2..)?);
    }
    let (_, rest) = lenenc(rest)?;
    let (_, rest) = lenenc(rest)?;
    le16(rest)
}

/// A classic EOF packet (0xFE, warnings, status): exactly 5 bytes. An OK
/// with the 0xFE header (DEPRECATE_EOF) has at least 7, and a text row
/// starting with 0xFE at least 9 (binary rows start with 0x00).
fn is_classic_eof(m: &Msg<'_>) -> bool {
    m.body.first() == Some(&0xfe) && m.body_len == 5
}

#[derive(Clone)]
struct Statement {
    operation: Option<String>,
    query: Option<super::QueryText>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the server's greeting; a client command first means the
    /// agent came late.
    Greeting,
    /// Greeting seen: the client answers (or asks for TLS).
    HandshakeResponse,
    /// Authentication exchange until the server's OK or ERR.
    Auth,
    Command,
    /// TLS or compression: only request/response alternation is visible.
    Opaque,
    Ended,
}

/// Where the server is in its response to the oldest command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// The first packet of a response (or of the next result set).
    First,
    /// Column definitions still to come.
    Columns(u64),
    /// After the definitions: a classic EOF, if the client did not ask for
    /// DEPRECATE_EOF (unknown when the agent came late).
    ColumnsEnd,
    Rows,
    /// Parameter then column definitions after COM_STMT_PREPARE's OK:
    /// definitions left in this group, and the size of the group after it.
    Definitions {
        left: u16,
        then: u16,
    },
    /// A group of definitions ended: a classic EOF follows unless
    /// DEPRECATE_EOF.
    DefinitionsEnd {
        then: u16,
    },
}

pub(crate) struct Session {
    phase: Phase,
    client: FramedDirection,
    server: FramedDirection,
    book: RequestQueue,
    server_caps: u32,
    /// CLIENT_DEPRECATE_EOF as negotiated; `None` when the handshake was not
    /// seen.
    deprecate_eof: Option<bool>,
    /// Compression starts after authentication.
    compress: bool,
    encrypted: bool,
    statements: BoundedMap<u32, Statement>,
    namespace: Option<String>,
    tx: Option<TxState>,
    reply: Reply,
    /// The last packet in each direction was 0xFFFFFF bytes: the next one
    /// continues it.
    client_continues: bool,
    server_continues: bool,
    /// A chunk that held only the header of what may be the greeting.
    greeting_header: Option<[u8; HEADER]>,
    alternation: Alternation,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            phase: Phase::Greeting,
            client: FramedDirection::default(),
            server: FramedDirection::default(),
            book: RequestQueue::default(),
            server_caps: u32::MAX,
            deprecate_eof: None,
            compress: false,
            encrypted: false,
            statements: BoundedMap::new(STATEMENTS_MAX),
            namespace: None,
            tx: None,
            reply: Reply::First,
            client_continues: false,
            server_continues: false,
            greeting_header: None,
            alternation: Alternation::default(),
        }
    }
}

impl Protocol for Session {
    fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// After an SSLRequest the client's next packet, inside TLS, is its
    /// whole handshake response: parsing goes on from there, with the
    /// greeting's capabilities. (No SSLRequest seen: start afresh.)
    fn plaintext_follows(&mut self) -> bool {
        if self.phase != Phase::Opaque || self.compress {
            return false;
        }
        self.phase = Phase::HandshakeResponse;
        self.encrypted = false;
        self.client = FramedDirection::default();
        self.server = FramedDirection::default();
        self.book = RequestQueue::default();
        self.alternation = Alternation::default();
        true
    }

    fn tx_state(&self) -> Option<TxState> {
        self.tx
    }

    fn request_outstanding(&self) -> bool {
        match self.phase {
            Phase::Opaque => self.alternation.waiting(),
            Phase::Command => self.book.waiting(),
            Phase::Greeting | Phase::HandshakeResponse | Phase::Auth | Phase::Ended => false,
        }
    }

    fn feed(&mut self, direction: Direction, view: &View<'_>, cx: &mut FeedContext<'_>) {
        match (self.phase, direction) {
            (Phase::Ended, _) => {}
            (Phase::Opaque, Direction::ToServer) => {
                self.alternation
                    .client(view, cx.ts, self.namespace.as_deref(), cx.out)
            }
            (Phase::Opaque, Direction::FromServer) => self.alternation.server(cx.ts),
            (Phase::Greeting, Direction::FromServer) => self.greeting(view, cx),
            (Phase::Greeting, Direction::ToServer) => {
                self.phase = Phase::Command;
                self.client_chunk(view, cx);
            }
            (_, Direction::ToServer) => self.client_chunk(view, cx),
            (_, Direction::FromServer) => self.server_chunk(view, cx),
        }
    }
}

impl Session {
    /// A server chunk before any request: the greeting, whole or (read in
    /// two calls) its header and then its payload; anything else means the
    /// agent came late.
    fn greeting(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        if let Some(header) = self.greeting_header.take() {
            if is_split_greeting(&header, view.start()) {
                let chunk = Chunk::whole(Direction::FromServer, cx.ts, &header);
                self.server_chunk(&View::new(&chunk), cx);
                self.server_chunk(view, cx);
                return;
            }
        }
        if is_greeting(view.start()) || self.server.mid_message() {
            // (The rest of a greeting that began in the last chunk.)
            self.server_chunk(view, cx);
        } else {
            self.greeting_header = greeting_header(view);
        }
    }

    fn end(&self, ts: u64) -> ResponseEnd<'_> {
        ResponseEnd {
            end_ns: ts,
            namespace: self.namespace.as_deref(),
            tx_state: self.tx,
        }
    }

    fn client_chunk(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        if self.server.is_lost() {
            // The response's end was not seen and the client moved on.
            self.book
                .answer_all(self.namespace.as_deref(), self.tx, cx.out);
            self.server.resync();
            self.reply = Reply::First;
            self.server_continues = false;
        }
        self.book.may_have_missed_requests(None);
        let mut link = std::mem::take(&mut self.client);
        let starts = |v: &View<'_>| self.phase != Phase::Command || is_command_start(v);
        if link.admit(view, starts, cx.out) {
            let ending = link.feed(view, &WIRE, |_| false, |_| false, |m| self.on_client(m, cx));
            if ending.missed {
                self.book.may_have_missed_requests(Some(cx.ts));
                self.client_continues = false;
            }
            let reason = "request boundary in the unseen middle of a write";
            link.report(ending, reason, cx.out);
        }
        self.client = link;
    }

    fn server_chunk(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        self.book.server_chunk(cx.ts);
        let mut link = std::mem::take(&mut self.server);
        let ending = link.feed(view, &WIRE, response_end, response_end, |m| {
            self.on_server(m, cx)
        });
        if ending.missed {
            // Rows went by unseen: the count is unknown.
            if let Some(p) = self.book.front_mut() {
                p.rows = None;
            }
            self.server_continues = false;
        }
        let reason = "response boundary in the unseen middle of a read";
        let tail = link.report(ending, reason, cx.out);
        self.server = link;
        for m in tail {
            // Whatever state the response was in, these packets end a
            // result set (or the response, with an error).
            self.reply = Reply::Rows;
            self.server_continues = false;
            self.on_server(&whole_msg(m, HEADER), cx);
        }
    }

    fn on_client(&mut self, m: &Msg<'_>, cx: &mut FeedContext<'_>) -> Flow {
        if std::mem::replace(&mut self.client_continues, m.body_len == MAX_PAYLOAD) {
            return Flow::Continue;
        }
        let seq = m.header.get(3).copied().unwrap_or_default();
        match self.phase {
            Phase::HandshakeResponse => self.handshake_response(m.body, m.body_len, cx),
            Phase::Command if seq == 0 => self.command(m.body, cx),
            _ => Flow::Continue,
        }
    }

    fn handshake_response(&mut self, payload: &[u8], len: usize, cx: &mut FeedContext<'_>) -> Flow {
        let caps = le32(payload).unwrap_or_default();
        if caps & CLIENT_PROTOCOL_41 == 0 {
            // Pre-4.1 clients: too old to be worth parsing; keep going.
            self.phase = Phase::Auth;
            return Flow::Continue;
        }
        let agreed = caps & self.server_caps;
        if agreed & CLIENT_SSL != 0 && len <= 32 {
            // SSLRequest: TLS starts with the client's next bytes.
            self.phase = Phase::Opaque;
            self.encrypted = true;
            self.book = RequestQueue::default();
            cx.out.push(Observation::Encrypted);
            return Flow::Stop;
        }
        self.deprecate_eof = Some(agreed & CLIENT_DEPRECATE_EOF != 0);
        self.compress = agreed & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION) != 0;
        let (user, rest) = cstr(payload.get(32..).unwrap_or_default());
        let rest = if caps & CLIENT_PLUGIN_AUTH_LENENC_DATA != 0 {
            lenenc(rest).and_then(|(n, r)| r.get(usize::try_from(n).ok()?..))
        } else if caps & CLIENT_SECURE_CONNECTION != 0 {
            rest.split_first()
                .and_then(|(&n, r)| r.get(usize::from(n)..))
        } else {
            Some(cstr(rest).1)
        };
        let database = match rest {
            Some(rest) if caps & CLIENT_CONNECT_WITH_DB != 0 => {
                let (db, _) = cstr(rest);
                (!db.is_empty()).then(|| String::from_utf8_lossy(db).into_owned())
            }
            _ => None,
        };
        self.namespace.clone_from(&database);
        cx.out.push(Observation::Startup {
            user: Some(String::from_utf8_lossy(user).into_owned()),
            database,
        });
        self.phase = Phase::Auth;
        Flow::Continue
    }

    fn command(&mut self, payload: &[u8], cx: &mut FeedContext<'_>) -> Flow {
        let Some((&command, rest)) = payload.split_first() else {
            return Flow::Continue;
        };
        let mut p = Pending {
            kind: command,
            ..Pending::new(cx.ts)
        };
        match command {
            COM_QUERY | COM_STMT_PREPARE => {
                (p.operation, p.query) = describe(rest, cx.raw, Dialect::Mysql);
                p.prepared = command == COM_STMT_PREPARE;
                if p.operation.as_deref() == Some("USE") {
                    p.note = use_database(rest);
                }
            }
            COM_STMT_EXECUTE => {
                if let Some(s) = le32(rest).and_then(|id| self.statements.get(&id)) {
                    p.operation.clone_from(&s.operation);
                    p.query.clone_from(&s.query);
                }
                p.prepared = true;
            }
            COM_STMT_CLOSE => {
                // No response.
                if let Some(id) = le32(rest) {
                    self.statements.remove(&id);
                }
                return Flow::Continue;
            }
            COM_STMT_SEND_LONG_DATA => return Flow::Continue,
            COM_QUIT => {
                self.phase = Phase::Ended;
                return Flow::Stop;
            }
            COM_PING => p.operation = Some("PING".to_string()),
            COM_INIT_DB => {
                p.operation = Some("USE".to_string());
                p.note = Some(String::from_utf8_lossy(rest).into_owned());
            }
            _ => {}
        }
        self.book.push(p, cx.out);
        Flow::Continue
    }

    fn on_server(&mut self, m: &Msg<'_>, cx: &mut FeedContext<'_>) -> Flow {
        if std::mem::replace(&mut self.server_continues, m.body_len == MAX_PAYLOAD) {
            return Flow::Continue;
        }
        match self.phase {
            Phase::Greeting => {
                // Capabilities: low half after version, thread id, 8 bytes
                // of scramble and a filler; high half after charset and
                // status.
                let (_, rest) = cstr(m.body.get(1..).unwrap_or_default());
                let low = rest.get(13..).and_then(le16).unwrap_or(u16::MAX);
                let high = rest.get(18..).and_then(le16).unwrap_or(u16::MAX);
                self.server_caps = u32::from(low) | u32::from(high) << 16;
                self.phase = Phase::HandshakeResponse;
            }
            Phase::HandshakeResponse | Phase::Auth => match m.body.first() {
                Some(0x00) if self.phase == Phase::Auth => {
                    self.tx = status_flags(m.body).map(tx_of);
                    if self.compress {
                        self.phase = Phase::Opaque;
                        cx.out.push(Observation::Lost {
                            reason: "compressed protocol",
                        });
                    } else {
                        self.phase = Phase::Command;
                    }
                }
                Some(0xff) => self.phase = Phase::Ended,
                // Auth switch, more data: the exchange goes on.
                _ => {}
            },
            Phase::Command => self.reply(m, cx),
            Phase::Opaque | Phase::Ended => {}
        }
        Flow::Continue
    }

    /// One packet of the response to the oldest command.
    fn reply(&mut self, m: &Msg<'_>, cx: &mut FeedContext<'_>) {
        let Some(p) = self.book.front_mut() else {
            return;
        };
        let first = m.body.first().copied();
        match self.reply {
            Reply::First => match (p.kind, first) {
                (_, Some(0xff)) => {
                    p.set_error(parse_error(m.body));
                    self.finish(cx);
                }
                (COM_STMT_PREPARE, Some(0x00)) => {
                    let body = m.body;
                    let columns = body.get(5..).and_then(le16).unwrap_or_default();
                    let params = body.get(7..).and_then(le16).unwrap_or_default();
                    if let Some(id) = body.get(1..).and_then(le32) {
                        let statement = Statement {
                            operation: p.operation.clone(),
                            query: p.query.clone(),
                        };
                        self.statements.insert(id, statement);
                    }
                    // Parameter definitions, then column definitions.
                    if params > 0 {
                        self.reply = Reply::Definitions {
                            left: params,
                            then: columns,
                        };
                    } else {
                        self.next_definitions(columns, cx);
                    }
                }
                (_, Some(0x00)) if m.body_len >= 7 => {
                    if let Some((affected, _)) = m.body.get(1..).and_then(lenenc) {
                        p.rows.get_or_insert(affected);
                    }
                    if p.kind == COM_INIT_DB || (p.kind == COM_QUERY && p.note.is_some()) {
                        self.namespace = p.note.take();
                    }
                    self.end_of_result(m.body, cx);
                }
                (_, Some(0xfe)) if m.body_len < 9 => self.end_of_result(m.body, cx),
                // LOCAL INFILE: the client sends the file, then the server
                // answers with OK or ERR.
                (COM_QUERY, Some(0xfb)) => {}
                // (0: a request that went unseen, most likely a query.)
                (COM_QUERY | COM_STMT_EXECUTE | 0, _) => {
                    let columns = lenenc(m.body).map_or(0, |(n, _)| n);
                    p.rows.get_or_insert(0);
                    self.reply = Reply::Columns(columns);
                }
                // Other commands answer with one packet.
                _ => self.finish(cx),
            },
            Reply::Columns(left) => {
                self.reply = match left.saturating_sub(1) {
                    0 if self.deprecate_eof == Some(true) => Reply::Rows,
                    0 => Reply::ColumnsEnd,
                    n => Reply::Columns(n),
                }
            }
            Reply::ColumnsEnd => {
                self.reply = Reply::Rows;
                if is_classic_eof(m) {
                    self.deprecate_eof.get_or_insert(false);
                } else {
                    // No EOF after the definitions (possible only when the
                    // handshake went unseen): a row or the result's end.
                    self.deprecate_eof.get_or_insert(true);
                    self.reply(m, cx);
                }
            }
            Reply::Rows => match first {
                Some(0xfe) if m.body_len < MAX_PAYLOAD => self.end_of_result(m.body, cx),
                Some(0xff) => {
                    p.set_error(parse_error(m.body));
                    self.finish(cx);
                }
                _ => p.add_rows(1),
            },
            Reply::Definitions { left, then } => match left.saturating_sub(1) {
                0 if self.deprecate_eof == Some(true) => self.next_definitions(then, cx),
                0 => self.reply = Reply::DefinitionsEnd { then },
                left => self.reply = Reply::Definitions { left, then },
            },
            Reply::DefinitionsEnd { then } => {
                if is_classic_eof(m) {
                    self.deprecate_eof.get_or_insert(false);
                    self.next_definitions(then, cx);
                } else {
                    // No EOF after the group (the handshake went unseen):
                    // this packet is what follows it, a definition of the
                    // next group or the next response.
                    self.deprecate_eof.get_or_insert(true);
                    self.next_definitions(then, cx);
                    self.reply(m, cx);
                }
            }
        }
    }

    /// After a group of definitions: the next group, or the response's end.
    fn next_definitions(&mut self, then: u16, cx: &mut FeedContext<'_>) {
        if then > 0 {
            self.reply = Reply::Definitions {
                left: then,
                then: 0,
            };
        } else {
            self.finish(cx);
        }
    }

    /// An OK or EOF that ends a result: the response ends unless more
    /// results follow.
    fn end_of_result(&mut self, payload: &[u8], cx: &mut FeedContext<'_>) {
        let status = status_flags(payload);
        if let Some(status) = status {
            self.tx = Some(tx_of(status));
        }
        if status.is_some_and(|s| s & SERVER_MORE_RESULTS_EXISTS != 0) {
            self.reply = Reply::First;
        } else {
            self.finish(cx);
        }
    }

    fn finish(&mut self, cx: &mut FeedContext<'_>) {
        self.reply = Reply::First;
        if let Some(p) = self.book.pop() {
            self.end(cx.ts).emit(p, cx.out);
        }
    }
}

fn tx_of(status: u16) -> TxState {
    if status & SERVER_STATUS_IN_TRANS != 0 {
        TxState::InTransaction
    } else {
        TxState::Idle
    }
}

/// ERR packet: 0xFF, error number, then `#` and a SQLSTATE (protocol 4.1),
/// then the message.
fn parse_error(payload: &[u8]) -> super::DbError {
    let code = payload.get(1..).and_then(le16).unwrap_or_default();
    let rest = payload.get(3..).unwrap_or_default();
    let message = match rest.first() {
        Some(b'#') => rest.get(6..).unwrap_or_default(),
        _ => rest,
    };
    db_error(&code.to_string(), &String::from_utf8_lossy(message))
}

/// The database of `USE db` (backticks removed).
fn use_database(sql: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(sql);
    let mut words = text.split_whitespace();
    words.next();
    let db = words.next()?.trim_end_matches(';').trim_matches('`');
    (!db.is_empty()).then(|| db.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testutil::*;
    use crate::protocol::{DbSystem, RoundTrip};

    fn connected(caps: u32) -> Drive {
        let mut d = Drive::detect();
        d.server(&my_greeting());
        d.client(&my_handshake_response(caps, "app", Some("orders")));
        d.server(&my_ok(2, 0, 0x0002));
        d
    }

    fn one(d: &mut Drive) -> RoundTrip {
        let mut rts = d.take();
        assert_eq!(rts.len(), 1, "{rts:?} {:?}", d.out);
        rts.remove(0)
    }

    fn query(d: &mut Drive, sql: &str) {
        d.client(&my_packet(0, &my_query(sql)));
    }

    #[test]
    fn handshake_gives_user_and_namespace() {
        let mut d = connected(MY_CAPS);
        assert_eq!(d.parser.system(), Some(DbSystem::Mysql));
        assert_eq!(
            d.others(),
            vec![Observation::Startup {
                user: Some("app".into()),
                database: Some("orders".into())
            }]
        );
        assert!(d.take().is_empty(), "authentication is not a round trip");
        query(&mut d, "DELETE FROM t WHERE id = 7");
        d.server(&my_ok(1, 3, 0x0002));
        let rt = one(&mut d);
        assert_eq!(
            rt.query_text().as_deref(),
            Some("DELETE FROM t WHERE id = ?")
        );
        assert_eq!(
            (rt.namespace.as_deref(), rt.rows),
            (Some("orders"), Some(3))
        );
        assert_eq!(rt.tx_state, Some(TxState::Idle));
    }

    #[test]
    fn error_1064() {
        let mut d = connected(MY_CAPS);
        d.take();
        query(&mut d, "SELEC 1");
        d.server(&my_err(
            1,
            1064,
            "42000",
            "You have an error in your SQL syntax",
        ));
        let err = one(&mut d).error.expect("error");
        assert_eq!(
            (err.code.as_str(), err.message.as_str()),
            ("1064", "You have an error in your SQL syntax")
        );
    }

    #[test]
    fn result_sets_with_and_without_deprecate_eof() {
        for deprecate in [true, false] {
            let caps = if deprecate {
                MY_CAPS
            } else {
                MY_CAPS & !0x0100_0000
            };
            let mut d = connected(caps);
            d.take();
            query(&mut d, "SELECT name FROM users");
            let resp = my_result_set(&["ann", "bob", "cy"], deprecate, 0x0002);
            // Split inside the rows: the response ends at the last packet.
            d.server(&resp[..30]);
            assert!(d.round_trips().is_empty());
            d.server(&resp[30..]);
            let rt = one(&mut d);
            assert_eq!(
                (rt.operation.as_deref(), rt.rows),
                (Some("SELECT"), Some(3)),
                "deprecate {deprecate}"
            );
            assert_eq!(rt.end_ns, 6000);
        }
    }

    /// Like PostgreSQL's start-up: the authentication OK tells the
    /// transaction status before any round trip, and authentication is no
    /// request outstanding.
    #[test]
    fn handshake_ok_gives_the_transaction_status() {
        let mut d = Drive::detect();
        d.server(&my_greeting());
        d.client(&my_handshake_response(MY_CAPS, "app", Some("orders")));
        assert_eq!(d.parser.tx_state(), None);
        assert!(!d.parser.request_outstanding(), "authentication");
        d.server(&my_ok(2, 0, 0x0002));
        assert_eq!(d.parser.tx_state(), Some(TxState::Idle));
        assert!(!d.parser.request_outstanding());
        assert!(d.take().is_empty());
    }

    #[test]
    fn a_command_is_outstanding_until_its_last_packet() {
        let mut d = connected(MY_CAPS);
        d.take();
        query(&mut d, "SELECT SLEEP(30)");
        assert!(d.parser.request_outstanding());
        let rows = ["a", "b", "c"];
        let resp = my_result_set(&rows, true, 0x0002);
        let reads = my_reads(&resp);
        let (last, before) = reads.split_last().expect("reads");
        for read in before {
            d.server(read);
            assert!(d.parser.request_outstanding(), "the result set goes on");
        }
        d.server(last);
        assert!(!d.parser.request_outstanding());
        assert_eq!(one(&mut d).rows, Some(3));
        query(&mut d, "SELECT 1");
        d.client(&my_packet(0, &[0x01])); // COM_QUIT
        assert!(!d.parser.request_outstanding(), "the session ended");
    }

    #[test]
    fn transaction_flag() {
        let mut d = connected(MY_CAPS);
        d.take();
        query(&mut d, "BEGIN");
        d.server(&my_ok(1, 0, 0x0003));
        assert_eq!(one(&mut d).tx_state, Some(TxState::InTransaction));
        query(&mut d, "SELECT 1");
        d.server(&my_result_set(&["1"], true, 0x0003));
        assert_eq!(one(&mut d).tx_state, Some(TxState::InTransaction));
        query(&mut d, "COMMIT");
        d.server(&my_ok(1, 0, 0x0002));
        assert_eq!(one(&mut d).tx_state, Some(TxState::Idle));
        assert_eq!(d.parser.tx_state(), Some(TxState::Idle));
    }

    #[test]
    fn prepared_statements() {
        let mut d = connected(MY_CAPS);
        d.take();
        let mut prepare = vec![COM_STMT_PREPARE];
        prepare.extend(b"SELECT * FROM t WHERE id = ?");
        d.client(&my_packet(0, &prepare));
        // OK: statement 9, 1 column, 1 parameter; then their definitions.
        let mut ok = vec![0x00];
        ok.extend(9u32.to_le_bytes());
        ok.extend(1u16.to_le_bytes());
        ok.extend(1u16.to_le_bytes());
        ok.extend([0, 0, 0]);
        let mut resp = my_packet(1, &ok);
        resp.extend(my_packet(2, b"\x03defparam"));
        resp.extend(my_packet(3, b"\x03defcolumn"));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(
            (rt.operation.as_deref(), rt.prepared),
            (Some("SELECT"), true)
        );

        let mut execute = vec![COM_STMT_EXECUTE];
        execute.extend(9u32.to_le_bytes());
        execute.extend([0, 1, 0, 0, 0, 0, 1, 3, 0, 42, 0, 0, 0]);
        d.client(&my_packet(0, &execute));
        d.server(&my_result_set(&["x"], true, 0x0002));
        let rt = one(&mut d);
        assert_eq!(
            rt.query_text().as_deref(),
            Some("SELECT * FROM t WHERE id = ?")
        );
        assert_eq!((rt.prepared, rt.rows), (true, Some(1)));

        // Close has no response; executing the closed id has no text.
        let mut close = vec![COM_STMT_CLOSE];
        close.extend(9u32.to_le_bytes());
        d.client(&my_packet(0, &close));
        assert!(d.take().is_empty());
        d.client(&my_packet(0, &execute));
        d.server(&my_err(
            1,
            1243,
            "HY000",
            "Unknown prepared statement handler",
        ));
        let rt = one(&mut d);
        assert_eq!(
            (rt.query_text(), rt.error.map(|e| e.code)),
            (None, Some("1243".into()))
        );
    }

    #[test]
    fn more_results_continue_the_response() {
        let mut d = connected(MY_CAPS);
        d.take();
        query(&mut d, "CALL p()");
        let mut resp = my_result_set(&["a", "b"], true, 0x000a);
        resp.extend(my_ok(6, 0, 0x0002));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!((rt.operation.as_deref(), rt.rows), (Some("CALL"), Some(2)));
    }

    #[test]
    fn ssl_request_means_encrypted() {
        let mut d = Drive::detect();
        d.server(&my_greeting());
        d.client(&my_ssl_request(MY_CAPS));
        assert!(d.parser.is_encrypted());
        assert_eq!(d.others(), vec![Observation::Encrypted]);
        d.client(&[0x16, 3, 1, 0, 0]);
        d.server(&[0x16, 3, 3, 0, 0]);
        d.client(&[0x17, 3, 3, 0, 0]);
        d.server(&[0x17, 3, 3, 0, 0]);
        d.client(&[0x17, 3, 3, 0, 0]);
        assert_eq!(d.round_trips().len(), 1);
    }

    #[test]
    fn namespace_changes() {
        let mut d = connected(MY_CAPS);
        d.take();
        let mut init = vec![COM_INIT_DB];
        init.extend(b"billing");
        d.client(&my_packet(0, &init));
        d.server(&my_ok(1, 0, 0x0002));
        let rt = one(&mut d);
        assert_eq!(
            (rt.operation.as_deref(), rt.namespace.as_deref()),
            (Some("USE"), Some("billing"))
        );
        query(&mut d, "USE `archive`");
        d.server(&my_ok(1, 0, 0x0002));
        assert_eq!(one(&mut d).namespace.as_deref(), Some("archive"));
    }

    #[test]
    fn big_result_set_ends_in_the_tail() {
        for deprecate in [true, false] {
            let caps = if deprecate {
                MY_CAPS
            } else {
                MY_CAPS & !0x0100_0000
            };
            let mut d = connected(caps);
            d.head_max = 256;
            d.take();
            query(&mut d, "SELECT * FROM big");
            let rows: Vec<String> = (0..500).map(|i| format!("row number {i}")).collect();
            let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
            d.server(&my_result_set(&rows, deprecate, 0x0003));
            let rt = one(&mut d);
            assert_eq!((rt.rows, rt.tx_state), (None, Some(TxState::InTransaction)));
            assert!(d.others().is_empty());
            query(&mut d, "COMMIT");
            d.server(&my_ok(1, 0, 0x0002));
            assert_eq!(one(&mut d).operation.as_deref(), Some("COMMIT"));
        }
    }

    #[test]
    fn late_attach_guesses_deprecate_eof() {
        for deprecate in [true, false] {
            let mut d = Drive::detect();
            query(&mut d, "SELECT 1");
            assert_eq!(d.parser.system(), Some(DbSystem::Mysql));
            d.server(&my_result_set(&[], deprecate, 0x0002));
            query(&mut d, "SELECT 2");
            d.server(&my_result_set(&["2"], deprecate, 0x0002));
            let rts = d.take();
            assert_eq!(rts.len(), 2, "deprecate {deprecate}");
            assert_eq!((rts[0].rows, rts[1].rows), (Some(0), Some(1)));
        }
    }

    #[test]
    fn quit_ends_the_session() {
        let mut d = connected(MY_CAPS);
        d.take();
        d.client(&my_packet(0, &[COM_QUIT]));
        query(&mut d, "SELECT 1");
        d.server(&my_ok(1, 0, 0));
        assert!(d.take().is_empty());
    }

    #[test]
    fn garbage_loses_then_resyncs() {
        let mut d = connected(MY_CAPS);
        d.head_max = 16;
        d.take();
        // A write of two queries whose boundary is unseen.
        let long = format!("SELECT '{}'", "x".repeat(100));
        let mut two = my_packet(0, &my_query(&long));
        two.extend(my_packet(0, &my_query(&long)));
        d.client(&two);
        assert_eq!(
            d.others(),
            vec![Observation::Lost {
                reason: "request boundary in the unseen middle of a write"
            }]
        );
        d.client(b"\xff\xff\xff\xff junk");
        query(&mut d, "SELECT 3");
        assert_eq!(d.others().last(), Some(&Observation::Resynced));
    }

    const COM_STMT_RESET: u8 = 0x1a;

    /// mysql-connector-python's session, every packet read as a header read
    /// and a payload read: greeting, authentication, a ping, a prepare, and
    /// executions each preceded by a reset.
    #[test]
    fn packets_read_header_then_payload() {
        for deprecate in [true, false] {
            let caps = if deprecate {
                MY_CAPS
            } else {
                MY_CAPS & !CLIENT_DEPRECATE_EOF
            };
            let mut d = Drive::detect();
            d.server_reads(&my_greeting());
            assert_eq!(d.parser.system(), Some(DbSystem::Mysql), "{deprecate}");
            d.client(&my_handshake_response(caps, "app", Some("orders")));
            d.server_reads(&my_ok(2, 0, 0x0002));
            assert_eq!(
                d.others(),
                vec![Observation::Startup {
                    user: Some("app".into()),
                    database: Some("orders".into())
                }]
            );
            assert!(d.take().is_empty());

            d.client(&my_packet(0, &[COM_PING]));
            d.server_reads(&my_ok(1, 0, 0x0002));
            assert_eq!(one(&mut d).operation.as_deref(), Some("PING"));

            let mut prepare = vec![COM_STMT_PREPARE];
            prepare.extend(b"SELECT name FROM items WHERE id = ?");
            d.client(&my_packet(0, &prepare));
            d.server_reads(&my_prepare_ok(1, 1, 1, deprecate));
            let rt = one(&mut d);
            assert_eq!((rt.prepared, rt.rows), (true, None));
            assert_eq!(rt.end_ns, d.ts, "the prepare ends with its last packet");

            for id in 1..=3 {
                let mut reset = vec![COM_STMT_RESET];
                reset.extend(1u32.to_le_bytes());
                d.client(&my_packet(0, &reset));
                d.server_reads(&my_ok(1, 0, 0x0002));
                assert_eq!(one(&mut d).operation, None);

                d.client(&my_execute(1, id));
                let start = d.ts;
                d.server_reads(&my_binary_result_set(&["one"], deprecate, 0x0002));
                let rt = one(&mut d);
                assert_eq!(
                    rt.query_text().as_deref(),
                    Some("SELECT name FROM items WHERE id = ?")
                );
                assert_eq!(
                    (rt.rows, rt.start_ns, rt.end_ns),
                    (Some(1), start, d.ts),
                    "deprecate {deprecate}"
                );
                assert_eq!(rt.namespace.as_deref(), Some("orders"));
            }
            query(&mut d, "SELECT name FROM items");
            d.server_reads(&my_result_set(&["a", "b"], deprecate, 0x0003));
            assert_eq!(one(&mut d).rows, Some(2));
            assert_eq!(d.parser.tx_state(), Some(TxState::InTransaction));
            assert!(d.others().is_empty(), "{:?}", d.others());
        }
    }

    /// The agent came late (no handshake seen): whether EOFs follow the
    /// definitions is learnt from the packets, read one by one or not.
    #[test]
    fn late_attach_executes_read_per_packet() {
        for deprecate in [true, false] {
            for per_packet in [true, false] {
                let mut d = Drive::detect();
                let feed = |d: &mut Drive, bytes: &[u8]| {
                    if per_packet {
                        d.server_reads(bytes);
                    } else {
                        d.server(bytes);
                    }
                };
                let mut prepare = vec![COM_STMT_PREPARE];
                prepare.extend(b"SELECT c FROM t WHERE a = ? AND b = ?");
                d.client(&my_packet(0, &prepare));
                assert_eq!(d.parser.system(), Some(DbSystem::Mysql));
                feed(&mut d, &my_prepare_ok(4, 2, 1, deprecate));
                for _ in 0..2 {
                    d.client(&my_execute(4, 7));
                    feed(&mut d, &my_binary_result_set(&["x"], deprecate, 0x0002));
                }
                query(&mut d, "SELECT 1");
                feed(&mut d, &my_result_set(&[], deprecate, 0x0002));
                let rts = d.take();
                let got: Vec<_> = rts.iter().map(|r| (r.prepared, r.rows)).collect();
                assert_eq!(
                    got,
                    vec![
                        (true, None),
                        (true, Some(1)),
                        (true, Some(1)),
                        (false, Some(0))
                    ],
                    "deprecate {deprecate}, per packet {per_packet}"
                );
                assert!(d.others().is_empty(), "{:?}", d.others());
            }
        }
    }

    #[test]
    fn a_greeting_split_anywhere_is_followed() {
        let mut stream = my_greeting();
        stream.extend(my_handshake_response(MY_CAPS, "u", Some("d")));
        let greeting = my_greeting().len();
        for cut in 1..greeting {
            let mut d = Drive::new(Some(DbSystem::Mysql));
            d.server(&stream[..cut]);
            d.server(&stream[cut..greeting]);
            d.client(&stream[greeting..]);
            d.server_reads(&my_ok(2, 0, 0));
            // Cut elsewhere, a first read too short to look like a
            // greeting's start makes the agent take itself for late.
            let want = if cut == 4 || is_greeting(&stream[..cut]) {
                vec![Observation::Startup {
                    user: Some("u".into()),
                    database: Some("d".into()),
                }]
            } else {
                vec![]
            };
            assert_eq!(d.others(), want, "cut {cut}");
        }
    }

    #[test]
    fn truncated_and_random_input_never_panics() {
        let mut stream = my_greeting();
        stream.extend(my_handshake_response(MY_CAPS, "u", Some("d")));
        stream.extend(my_ok(2, 0, 0));
        stream.extend(my_packet(0, &my_query("SELECT 1")));
        stream.extend(my_result_set(&["a", "b"], false, 0x0008));
        stream.extend(my_err(1, 1064, "42000", "x"));
        feed_truncated_and_random(
            DbSystem::Mysql,
            Direction::FromServer,
            &stream,
            [1, 4, 16, usize::MAX],
            (17, 11),
        );
    }
}
