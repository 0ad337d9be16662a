//! PostgreSQL frontend/backend protocol 3.0: startup, SSL/GSS negotiation,
//! simple and extended query, copy (framed like any message), errors and
//! ReadyForQuery's transaction status.

use super::book::{
    is_tls_record, Alternation, BoundedMap, FeedContext, Pending, Protocol, RequestQueue,
    ResponseEnd,
};
use super::frame::{whole_msg, Flow, FramedDirection, Msg, View, Wire};
use super::sql::{cstr, db_error, describe, Dialect};
use super::{DbError, Direction, Observation, TxState};

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// The server refuses longer startup packets (MAX_STARTUP_PACKET_LENGTH).
const STARTUP_MAX: u32 = 10_000;
/// PostgreSQL messages are at most 1 GiB; a longer length is garbage.
const MESSAGE_MAX: usize = 1 << 30;
/// Named statements (and portals) remembered per connection.
const STATEMENTS_MAX: usize = 256;

const FRONTEND_TYPES: &[u8] = b"QPBEDSCHFXpdcf";
const BACKEND_TYPES: &[u8] = b"RKSZCENADTI123nstGHWdcVv";

fn be32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Body length of a typed message (1-byte type, int32 length counting
/// itself) whose type is in `types`.
fn body_len(header: &[u8], types: &[u8]) -> Option<usize> {
    let (&t, len) = header.split_first()?;
    let len = usize::try_from(be32(len)?).ok()?;
    (types.contains(&t) && (4..=MESSAGE_MAX).contains(&len)).then(|| len - 4)
}

const FRONTEND: Wire = Wire {
    header_len: 5,
    body_len: |h| body_len(h, FRONTEND_TYPES),
};
const BACKEND: Wire = Wire {
    header_len: 5,
    body_len: |h| body_len(h, BACKEND_TYPES),
};

/// The (length, code) of an untyped first message: StartupMessage,
/// SSLRequest, GSSENCRequest or CancelRequest.
fn startup_code(start: &[u8]) -> Option<(u32, u32)> {
    let len = be32(start)?;
    let code = be32(start.get(4..)?)?;
    let ok = match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        // Protocol 3.x.
        c if c >> 16 == 3 => (8..=STARTUP_MAX).contains(&len),
        _ => false,
    };
    ok.then_some((len, code))
}

pub(crate) fn is_startup(start: &[u8]) -> bool {
    startup_code(start).is_some()
}

/// A whole frontend message's body fits its type. Used where framing is
/// guessed (mid-session detection, resync, the end of a pipeline).
fn plausible_frontend(t: u8, body: &[u8]) -> bool {
    let nuls = body.iter().filter(|&&b| b == 0).count();
    match t {
        b'Q' => nuls == 1 && body.last() == Some(&0),
        b'S' | b'H' | b'X' => body.is_empty(),
        b'P' | b'B' => nuls >= 2,
        b'E' => body.len() >= 5 && body.get(body.len() - 5) == Some(&0) && nuls <= 5,
        b'D' | b'C' => matches!(body.first(), Some(b'S' | b'P')) && body.last() == Some(&0),
        _ => true,
    }
}

/// A chunk that starts with frontend messages: each header valid and each
/// whole body plausible, and either the messages cover the chunk exactly or
/// at least one whole message was checked before they run out of sight.
pub(crate) fn is_request_start(view: &View<'_>) -> bool {
    let total = view.total();
    let (mut pos, mut seen, mut checked) = (0usize, 0usize, 0usize);
    while pos < total && seen < 16 {
        let avail = view.from(pos);
        let Some(len) = avail.get(..5).and_then(|h| FRONTEND.announced(h)) else {
            return checked > 0 && avail.len() < 5;
        };
        let t = avail.first().copied().unwrap_or_default();
        if seen == 0 && matches!(t, b'p' | b'd' | b'c' | b'f') {
            return false;
        }
        if let Some(body) = avail.get(5..5 + len) {
            if !plausible_frontend(t, body) {
                return false;
            }
            checked += 1;
        }
        seen += 1;
        pos = pos.saturating_add(5 + len);
    }
    seen > 0 && (pos == total || checked > 0)
}

/// A whole message `m` (header and body) of `wire` whose type is in
/// `types` and whose body passes `check`.
fn whole(m: &[u8], wire: &Wire, types: &[u8], check: impl Fn(u8, &[u8]) -> bool) -> bool {
    match (
        m.first(),
        m.get(..5).and_then(|h| wire.announced(h)),
        m.get(5..),
    ) {
        (Some(&t), Some(len), Some(body)) => {
            types.contains(&t) && len == body.len() && check(t, body)
        }
        _ => false,
    }
}

/// Messages that can end a response, strictly checked: the tail of a long
/// response is read backwards with these.
fn backend_end(m: &[u8]) -> bool {
    whole(m, &BACKEND, b"ZCENI123ns", |t, body| match t {
        b'Z' => matches!(body, [b'I' | b'T' | b'E']),
        b'C' => {
            let (tag, rest) = cstr(body);
            rest.is_empty()
                && body.last() == Some(&0)
                && tag.len() <= 64
                && tag.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
        }
        b'E' | b'N' => error_fields(body).is_some(),
        _ => body.is_empty(),
    })
}

/// Messages that can end a pipelined write (Execute, Sync...).
fn frontend_end(m: &[u8]) -> bool {
    whole(m, &FRONTEND, b"SHEXCD", plausible_frontend)
}

/// ErrorResponse/NoticeResponse fields: (code, value) pairs ending in NUL.
fn error_fields(body: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut fields = Vec::new();
    let mut rest = body;
    loop {
        let (&code, after) = rest.split_first()?;
        if code == 0 {
            return after.is_empty().then_some(fields);
        }
        let at = after.iter().position(|&b| b == 0)?;
        fields.push((code, after.get(..at)?));
        rest = after.get(at + 1..)?;
    }
}

/// SQLSTATE and message of an ErrorResponse, even a truncated one.
fn parse_error(body: &[u8]) -> DbError {
    let mut code: &[u8] = b"";
    let mut message: &[u8] = b"";
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let (value, next) = cstr(after);
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = next;
    }
    db_error(
        &String::from_utf8_lossy(code),
        &String::from_utf8_lossy(message),
    )
}

/// Rows from a CommandComplete tag ("SELECT 5", "INSERT 0 1", "UPDATE 3").
fn tag_rows(tag: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(tag).ok()?;
    let mut words = tag.split_ascii_whitespace();
    let command = words.next()?;
    let counted = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "MOVE", "FETCH", "COPY",
    ];
    if !counted.contains(&command) {
        return None;
    }
    words.last()?.parse().ok()
}

/// A statement's text, already described (operation, sanitized text).
#[derive(Clone)]
struct Statement {
    operation: Option<String>,
    query: Option<super::QueryText>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet: a startup, an SSL/GSS request, TLS, or (the agent
    /// came late) plain requests.
    Start,
    /// SSLRequest/GSSENCRequest sent: the server answers one byte.
    SecurityAsked,
    /// StartupMessage sent: authentication until the first ReadyForQuery.
    Authenticating,
    Ready,
    Encrypted,
    /// Terminate or CancelRequest: nothing more to parse.
    Ended,
}

pub(crate) struct Session {
    phase: Phase,
    client: FramedDirection,
    server: FramedDirection,
    book: RequestQueue,
    statements: BoundedMap<Vec<u8>, Statement>,
    /// Portal name → statement name.
    portals: BoundedMap<Vec<u8>, Vec<u8>>,
    namespace: Option<String>,
    tx: Option<TxState>,
    alternation: Alternation,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            phase: Phase::Start,
            client: FramedDirection::default(),
            server: FramedDirection::default(),
            book: RequestQueue::default(),
            statements: BoundedMap::new(STATEMENTS_MAX),
            portals: BoundedMap::new(STATEMENTS_MAX),
            namespace: None,
            tx: None,
            alternation: Alternation::default(),
        }
    }
}

impl Protocol for Session {
    fn encrypted(&self) -> bool {
        self.phase == Phase::Encrypted
    }

    fn tx_state(&self) -> Option<TxState> {
        self.tx
    }

    fn request_outstanding(&self) -> bool {
        match self.phase {
            Phase::Encrypted => self.alternation.waiting(),
            Phase::Ended => false,
            _ => self.book.waiting(),
        }
    }

    fn feed(&mut self, direction: Direction, view: &View<'_>, cx: &mut FeedContext<'_>) {
        match (self.phase, direction) {
            (Phase::Ended, _) => {}
            (Phase::Encrypted, Direction::ToServer) => {
                self.alternation
                    .client(view, cx.ts, self.namespace.as_deref(), cx.out)
            }
            (Phase::Encrypted, Direction::FromServer) => self.alternation.server(cx.ts),
            (Phase::Start | Phase::SecurityAsked, Direction::ToServer) => self.start(view, cx),
            (Phase::SecurityAsked, Direction::FromServer) => match view.start().first() {
                // 'S' (SSL) or 'G' (GSS): encryption starts with the client's
                // next bytes. 'N' or an error: the client sends its startup.
                Some(b'S' | b'G') => self.encrypt(cx),
                _ => self.phase = Phase::Start,
            },
            // Server bytes before any request: the agent came late and
            // cannot tell where messages start; the next request tells.
            (Phase::Start, Direction::FromServer) => {}
            (_, Direction::ToServer) => self.client_chunk(view, cx),
            (_, Direction::FromServer) => self.server_chunk(view, cx),
        }
    }
}

impl Session {
    fn encrypt(&mut self, cx: &mut FeedContext<'_>) {
        self.phase = Phase::Encrypted;
        self.book = RequestQueue::default();
        cx.out.push(Observation::Encrypted);
    }

    fn start(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        let start = view.start();
        if is_tls_record(start) {
            // PostgreSQL 17's direct TLS: no SSLRequest first.
            self.encrypt(cx);
            self.alternation
                .client(view, cx.ts, self.namespace.as_deref(), cx.out);
            return;
        }
        match startup_code(start) {
            Some((_, SSL_REQUEST | GSSENC_REQUEST)) => self.phase = Phase::SecurityAsked,
            Some((_, CANCEL_REQUEST)) => self.phase = Phase::Ended,
            Some((len, _)) => {
                let len = len as usize;
                let params = start.get(8..len).or_else(|| start.get(8..));
                self.startup(params.unwrap_or_default(), cx);
                self.phase = Phase::Authenticating;
                if len < view.total() {
                    // Whatever follows the startup in the same write.
                    self.client.pass(len);
                    self.client_chunk(view, cx);
                }
            }
            None => {
                self.phase = Phase::Ready;
                self.client_chunk(view, cx);
            }
        }
    }

    /// StartupMessage parameters: NUL-terminated name/value pairs.
    fn startup(&mut self, params: &[u8], cx: &mut FeedContext<'_>) {
        let (mut user, mut database) = (None, None);
        let mut rest = params;
        loop {
            let (name, after) = cstr(rest);
            if name.is_empty() {
                break;
            }
            let (value, next) = cstr(after);
            let value = String::from_utf8_lossy(value).into_owned();
            match name {
                b"user" => user = Some(value),
                b"database" => database = Some(value),
                _ => {}
            }
            rest = next;
        }
        // The server's default database is the user's name.
        self.namespace = database.clone().or_else(|| user.clone());
        cx.out.push(Observation::Startup { user, database });
    }

    fn client_chunk(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        if self.server.is_lost() {
            // The response's end was not seen and the client moved on.
            self.book
                .answer_all(self.namespace.as_deref(), self.tx, cx.out);
            self.server.resync();
        }
        self.book.may_have_missed_requests(None);
        let mut link = std::mem::take(&mut self.client);
        if link.admit(view, is_request_start, cx.out) {
            let ending = link.feed(
                view,
                &FRONTEND,
                frontend_end,
                |_| false,
                |m| self.on_frontend(m, cx),
            );
            if ending.missed {
                // Requests in the unseen middle: answers to them count.
                self.book.may_have_missed_requests(Some(cx.ts));
            }
            let reason = "request boundary in the unseen middle of a write";
            // The write's last messages (Execute, Sync) may be in its tail.
            for m in link.report(ending, reason, cx.out) {
                self.on_frontend(&whole_msg(m, 5), cx);
            }
        }
        self.client = link;
    }

    fn server_chunk(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        self.book.server_chunk(cx.ts);
        let mut link = std::mem::take(&mut self.server);
        let is_ready = |m: &[u8]| m.first() == Some(&b'Z');
        let ending = link.feed(view, &BACKEND, backend_end, is_ready, |m| {
            self.on_backend(m, cx)
        });
        let reason = "response boundary in the unseen middle of a read";
        // A long response's end (CommandComplete, ReadyForQuery) is in its
        // tail.
        for m in link.report(ending, reason, cx.out) {
            self.on_backend(&whole_msg(m, 5), cx);
        }
        self.server = link;
    }

    fn end(&self, ts: u64) -> ResponseEnd<'_> {
        ResponseEnd {
            end_ns: ts,
            namespace: self.namespace.as_deref(),
            tx_state: self.tx,
        }
    }

    fn on_backend(&mut self, m: &Msg<'_>, cx: &mut FeedContext<'_>) -> Flow {
        let Some(&t) = m.header.first() else {
            return Flow::Continue;
        };
        let authenticating = self.phase == Phase::Authenticating;
        match t {
            b'Z' => {
                self.tx = match m.body.first() {
                    Some(b'I') => Some(TxState::Idle),
                    Some(b'T') => Some(TxState::InTransaction),
                    Some(b'E') => Some(TxState::Failed),
                    _ => self.tx,
                };
                if authenticating {
                    // The end of startup, not a round trip.
                    self.phase = Phase::Ready;
                } else if let Some(p) = self.book.pop() {
                    self.end(cx.ts).emit(p, cx.out);
                }
            }
            b'C' if !authenticating => {
                // The first tag that counts rows: the operation is the first
                // statement's too.
                if let Some(p) = self.book.front_mut() {
                    if p.rows.is_none() {
                        p.rows = tag_rows(cstr(m.body).0);
                    }
                }
            }
            b'E' if !authenticating => {
                if let Some(p) = self.book.front_mut() {
                    p.set_error(parse_error(m.body));
                }
            }
            _ => {}
        }
        Flow::Continue
    }

    fn on_frontend(&mut self, m: &Msg<'_>, cx: &mut FeedContext<'_>) -> Flow {
        let Some(&t) = m.header.first() else {
            return Flow::Continue;
        };
        let body = m.body;
        match t {
            b'Q' => {
                let (operation, query) = describe(cstr(body).0, cx.raw, Dialect::Standard);
                let p = Pending {
                    operation,
                    query,
                    ..Pending::new(cx.ts)
                };
                self.book.push(p, cx.out);
                self.phase = Phase::Ready;
            }
            b'P' => {
                let (name, rest) = cstr(body);
                let (operation, query) = describe(cstr(rest).0, cx.raw, Dialect::Standard);
                let statement = Statement { operation, query };
                batch(&mut self.book, Some(&statement), cx);
                if terminated(body, 1) {
                    self.statements.insert(name.to_vec(), statement);
                }
            }
            b'B' => {
                let (portal, rest) = cstr(body);
                let (name, _) = cstr(rest);
                // The same portal bound to the same statement again (the
                // unnamed portal, each execution): nothing to remember.
                if terminated(body, 2) && self.portals.get(portal).map(Vec::as_slice) != Some(name)
                {
                    self.portals.insert(portal.to_vec(), name.to_vec());
                }
                batch(&mut self.book, self.statements.get(name), cx);
            }
            b'E' => {
                let statement = portal_statement(&self.portals, &self.statements, cstr(body).0);
                batch(&mut self.book, statement, cx);
            }
            b'D' => {
                let statement = match body.split_first() {
                    Some((b'S', name)) => self.statements.get(cstr(name).0),
                    Some((b'P', name)) => {
                        portal_statement(&self.portals, &self.statements, cstr(name).0)
                    }
                    _ => None,
                };
                batch(&mut self.book, statement, cx);
            }
            b'C' => match body.split_first() {
                Some((b'S', name)) => self.statements.remove(cstr(name).0),
                Some((b'P', name)) => self.portals.remove(cstr(name).0),
                _ => {}
            },
            b'S' => match self.book.back_mut() {
                Some(p) if p.open => p.open = false,
                // A Sync with nothing before it still gets a ReadyForQuery.
                _ => self.book.push(
                    Pending {
                        silent: true,
                        ..Pending::new(cx.ts)
                    },
                    cx.out,
                ),
            },
            b'F' => self.book.push(Pending::new(cx.ts), cx.out),
            b'X' => {
                self.phase = Phase::Ended;
                return Flow::Stop;
            }
            // Password/SASL, copy data, Flush: no round trip of their own.
            _ => {}
        }
        Flow::Continue
    }
}

/// The statement a portal was bound to.
fn portal_statement<'s>(
    portals: &BoundedMap<Vec<u8>, Vec<u8>>,
    statements: &'s BoundedMap<Vec<u8>, Statement>,
    portal: &[u8],
) -> Option<&'s Statement> {
    statements.get(portals.get(portal)?.as_slice())
}

/// Adds a Parse/Bind/Describe/Execute to the extended-protocol batch being
/// sent (until Sync), opening one if needed.
fn batch(book: &mut RequestQueue, statement: Option<&Statement>, cx: &mut FeedContext<'_>) {
    if !book.back_mut().is_some_and(|p| p.open) {
        let p = Pending {
            open: true,
            prepared: true,
            ..Pending::new(cx.ts)
        };
        book.push(p, cx.out);
    }
    if let Some(p) = book.back_mut() {
        p.describe(statement);
    }
}

/// The first `n` NUL-terminated strings of `body` are whole (not cut by
/// the kernel's head), so names are safe to remember.
fn terminated(body: &[u8], n: usize) -> bool {
    body.iter().filter(|&&b| b == 0).count() >= n
}

impl Pending {
    /// Takes the statement's text unless the batch already has one: a batch
    /// reports its first statement.
    fn describe(&mut self, statement: Option<&Statement>) {
        if self.query.is_none() {
            if let Some(s) = statement {
                self.operation.clone_from(&s.operation);
                self.query.clone_from(&s.query);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testutil::*;
    use crate::protocol::{DbSystem, RoundTrip};

    /// A session through startup, as psql would open it.
    fn connected() -> Drive {
        let mut d = Drive::detect();
        d.client(&pg_startup("alice", Some("shop")));
        d.server(&pg_startup_ok());
        d
    }

    fn one(d: &mut Drive) -> RoundTrip {
        let mut rts = d.take();
        assert_eq!(rts.len(), 1, "{rts:?}");
        rts.remove(0)
    }

    #[test]
    fn startup_gives_user_and_namespace_and_no_round_trip() {
        let d = connected();
        assert_eq!(d.parser.system(), Some(DbSystem::Postgresql));
        assert_eq!(
            d.out,
            vec![Observation::Startup {
                user: Some("alice".into()),
                database: Some("shop".into())
            }]
        );
        assert_eq!(d.parser.tx_state(), Some(TxState::Idle));
    }

    /// Issue 9: a connection that has only completed its start-up is
    /// `idle` in pg_stat_activity. Its transaction status is known from the
    /// start-up's ReadyForQuery, before any round trip, however the client
    /// reads the start-up response.
    #[test]
    fn startup_ready_for_query_gives_the_transaction_status() {
        let ok = pg_startup_ok();
        for cut in 0..=ok.len() {
            let mut d = Drive::detect();
            d.client(&pg_startup("alice", Some("shop")));
            assert_eq!(d.parser.tx_state(), None, "cut {cut}: not ready yet");
            assert!(!d.parser.request_outstanding(), "start-up is no request");
            d.server(&ok[..cut]);
            d.server(&ok[cut..]);
            assert_eq!(d.parser.tx_state(), Some(TxState::Idle), "cut {cut}");
            assert!(!d.parser.request_outstanding(), "cut {cut}");
            assert!(d.take().is_empty(), "cut {cut}: start-up is no round trip");
        }
        // Password authentication: the client answers mid-start-up.
        let mut d = Drive::detect();
        d.client(&pg_startup("alice", Some("shop")));
        d.server(&pg_msg(
            b'R',
            &5u32
                .to_be_bytes()
                .iter()
                .chain(b"salt")
                .copied()
                .collect::<Vec<_>>(),
        ));
        assert_eq!(d.parser.tx_state(), None);
        d.client(&pg_msg(b'p', b"md5abc\0"));
        assert!(!d.parser.request_outstanding(), "a password is no request");
        d.server(&ok);
        assert_eq!(d.parser.tx_state(), Some(TxState::Idle));
        assert!(d.take().is_empty());
    }

    /// What pg_stat_activity calls `active`: a request sent and its
    /// ReadyForQuery not yet read, also while rows stream back.
    #[test]
    fn a_request_is_outstanding_until_its_ready_for_query() {
        let mut d = connected();
        d.take();
        assert!(!d.parser.request_outstanding());
        d.client(&pg_query("SELECT pg_sleep(30)"));
        assert!(d.parser.request_outstanding(), "the server is sleeping");
        assert_eq!(d.parser.tx_state(), Some(TxState::Idle), "as last told");
        let mut resp = pg_msg(b'T', &[0, 0]);
        resp.extend(pg_data_row(""));
        resp.extend(pg_complete("SELECT 1"));
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert!(!d.parser.request_outstanding());
        assert_eq!(d.take().len(), 1);

        // Rows streaming back, read in pieces that cut messages anywhere,
        // each well past the kernel's head.
        d.head_max = 256;
        let big = "x".repeat(20_000);
        let mut resp = pg_msg(b'T', &[0, 0]);
        for _ in 0..12 {
            resp.extend(pg_data_row(&big));
        }
        resp.extend(pg_complete("SELECT 12"));
        resp.extend(pg_ready(b'I'));
        for read in [8192, 16_384, 5000] {
            d.client(&pg_query("SELECT g, repeat('x', 20000) FROM t"));
            let pieces: Vec<&[u8]> = resp.chunks(read).collect();
            let (last, rows) = pieces.split_last().expect("pieces");
            for piece in rows {
                d.server(piece);
                assert!(
                    d.parser.request_outstanding(),
                    "read {read}: rows still come"
                );
            }
            d.server(last);
            assert!(
                !d.parser.request_outstanding(),
                "read {read}: {:?}",
                d.others()
            );
            assert_eq!(d.take().len(), 1, "read {read}");
        }

        // Extended protocol: until the Sync's ReadyForQuery.
        d.head_max = usize::MAX;
        let mut batch = pg_parse("", "SELECT $1");
        batch.extend(pg_bind("", ""));
        batch.extend(pg_execute(""));
        batch.extend(pg_sync());
        d.client(&batch);
        assert!(d.parser.request_outstanding());
        let mut resp = pg_msg(b'1', &[]);
        resp.extend(pg_msg(b'2', &[]));
        resp.extend(pg_data_row("42"));
        d.server(&resp);
        assert!(d.parser.request_outstanding());
        let mut resp = pg_complete("SELECT 1");
        resp.extend(pg_ready(b'T'));
        d.server(&resp);
        assert!(!d.parser.request_outstanding());
        assert_eq!(d.parser.tx_state(), Some(TxState::InTransaction));

        // Terminate: nothing more is outstanding.
        d.client(&pg_query("SELECT 1"));
        d.client(&pg_msg(b'X', &[]));
        assert!(!d.parser.request_outstanding());
    }

    #[test]
    fn encrypted_sessions_wait_until_the_server_answers() {
        let mut d = Drive::detect();
        d.client(&pg_ssl_request());
        d.server(b"S");
        assert!(!d.parser.request_outstanding());
        d.client(&[0x17, 3, 3, 0, 1, 0]);
        assert!(d.parser.request_outstanding());
        d.server(&[0x17, 3, 3, 0, 1, 0]);
        assert!(!d.parser.request_outstanding());
        assert_eq!(d.parser.tx_state(), None, "nothing to read it from");
    }

    #[test]
    fn simple_query_in_one_chunk() {
        let mut d = connected();
        d.take();
        d.client(&pg_query("SELECT * FROM items WHERE id = 42"));
        let mut resp = pg_msg(b'T', &[0, 0]);
        resp.extend(pg_data_row("x"));
        resp.extend(pg_complete("SELECT 1"));
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(rt.operation.as_deref(), Some("SELECT"));
        assert_eq!(
            rt.query_text().as_deref(),
            Some("SELECT * FROM items WHERE id = ?")
        );
        assert_eq!(rt.namespace.as_deref(), Some("shop"));
        assert_eq!(
            (rt.rows, rt.tx_state, rt.prepared),
            (Some(1), Some(TxState::Idle), false)
        );
        assert_eq!((rt.start_ns, rt.end_ns), (3000, 4000));
    }

    #[test]
    fn simple_query_response_split_anywhere() {
        let mut resp = pg_complete("UPDATE 3");
        resp.extend(pg_ready(b'I'));
        for cut in 0..=resp.len() {
            let mut d = connected();
            d.take();
            d.client(&pg_query("UPDATE t SET a = 1"));
            d.server(&resp[..cut]);
            d.server(&resp[cut..]);
            let rt = one(&mut d);
            // An empty second read completes nothing.
            let end = if cut == resp.len() { 4000 } else { 5000 };
            assert_eq!((rt.rows, rt.end_ns), (Some(3), end), "cut {cut}");
            assert!(d.others().is_empty());
        }
    }

    #[test]
    fn several_statements_are_one_round_trip() {
        let mut d = connected();
        d.take();
        d.client(&pg_query("BEGIN; UPDATE t SET a = 1; COMMIT"));
        let mut resp = pg_complete("BEGIN");
        resp.extend(pg_complete("UPDATE 2"));
        resp.extend(pg_complete("COMMIT"));
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!((rt.operation.as_deref(), rt.rows), (Some("BEGIN"), Some(2)));
    }

    #[test]
    fn begin_error_and_transaction_states() {
        let mut d = connected();
        d.take();
        d.client(&pg_query("BEGIN"));
        let mut resp = pg_complete("BEGIN");
        resp.extend(pg_ready(b'T'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(rt.tx_state, Some(TxState::InTransaction));
        assert_eq!(d.parser.tx_state(), Some(TxState::InTransaction));

        d.client(&pg_query("SELEC 1"));
        let mut resp = pg_error("42601", "syntax error at or near \"SELEC\"");
        resp.extend(pg_ready(b'E'));
        d.server(&resp);
        let rt = one(&mut d);
        let err = rt.error.expect("error");
        assert_eq!(err.code, "42601");
        // Quoted parts of messages are hidden unless raw text is on.
        assert_eq!(err.message, "syntax error at or near ?");
        assert_eq!(rt.tx_state, Some(TxState::Failed));

        d.client(&pg_query("ROLLBACK"));
        let mut resp = pg_complete("ROLLBACK");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert_eq!(one(&mut d).tx_state, Some(TxState::Idle));
    }

    #[test]
    fn extended_protocol_named_statement_parsed_once() {
        // pgbench -M prepared: Parse once, then Bind/Execute/Sync.
        let mut d = connected();
        d.take();
        let mut first = pg_parse(
            "P0_1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        );
        first.extend(pg_bind("", "P0_1"));
        first.extend(pg_msg(b'D', b"P\0"));
        first.extend(pg_execute(""));
        first.extend(pg_sync());
        d.client(&first);
        let mut resp = pg_msg(b'1', &[]);
        resp.extend(pg_msg(b'2', &[]));
        resp.extend(pg_data_row("5"));
        resp.extend(pg_complete("SELECT 1"));
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        for _ in 0..3 {
            let mut again = pg_bind("", "P0_1");
            again.extend(pg_execute(""));
            again.extend(pg_sync());
            d.client(&again);
            let mut resp = pg_msg(b'2', &[]);
            resp.extend(pg_data_row("5"));
            resp.extend(pg_complete("SELECT 1"));
            resp.extend(pg_ready(b'I'));
            d.server(&resp);
        }
        let rts = d.take();
        assert_eq!(rts.len(), 4);
        for rt in rts {
            assert_eq!(rt.operation.as_deref(), Some("SELECT"));
            assert_eq!(
                rt.query_text().as_deref(),
                Some("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
            );
            assert!(rt.prepared);
            assert_eq!(rt.rows, Some(1));
        }
    }

    #[test]
    fn extended_protocol_unnamed_statement_and_close() {
        let mut d = connected();
        d.take();
        let mut batch = pg_parse("", "INSERT INTO t VALUES ($1)");
        batch.extend(pg_bind("", ""));
        batch.extend(pg_execute(""));
        batch.extend(pg_sync());
        d.client(&batch);
        let mut resp = pg_msg(b'1', &[]);
        resp.extend(pg_msg(b'2', &[]));
        resp.extend(pg_complete("INSERT 0 1"));
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(
            (rt.operation.as_deref(), rt.rows, rt.prepared),
            (Some("INSERT"), Some(1), true)
        );

        // A named statement closed, then executed by name: text unknown.
        d.client(&pg_parse("s1", "DELETE FROM t"));
        d.client(&pg_sync());
        let mut resp = pg_msg(b'1', &[]);
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert_eq!(one(&mut d).operation.as_deref(), Some("DELETE"));
        let mut close = pg_msg(b'C', b"Ss1\0");
        close.extend(pg_sync());
        d.client(&close);
        let mut resp = pg_msg(b'3', &[]);
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert!(d.take().is_empty(), "Close + Sync is housekeeping");
        let mut exec = pg_bind("", "s1");
        exec.extend(pg_execute(""));
        exec.extend(pg_sync());
        d.client(&exec);
        let mut resp = pg_error("26000", "prepared statement \"s1\" does not exist");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(
            (rt.query_text(), rt.error.map(|e| e.code)),
            (None, Some("26000".into()))
        );
    }

    #[test]
    fn ssl_accepted_means_alternation() {
        let mut d = Drive::detect();
        d.client(&pg_ssl_request());
        d.server(b"S");
        assert!(d.parser.is_encrypted());
        assert_eq!(d.others(), vec![Observation::Encrypted]);
        d.client(&[0x16, 3, 1, 0, 1, 0]); // ClientHello
        d.server(&[0x16, 3, 3, 0, 1, 0]); // ServerHello...
        d.client(&[0x17, 3, 3, 0, 1, 0]); // a query (start 7000)
        d.server(&[0x17, 3, 3, 0, 1, 0]);
        d.server(&[0x17, 3, 3, 0, 1, 0]); // response ends (9000)
        assert!(
            d.round_trips().is_empty(),
            "reported when the next turn starts"
        );
        d.client(&[0x17, 3, 3, 0, 1, 0]);
        let rts = d.take();
        assert_eq!(rts.len(), 1);
        assert_eq!(
            (rts[0].start_ns, rts[0].end_ns, rts[0].operation.clone()),
            (5000, 7000, None)
        );
    }

    #[test]
    fn ssl_refused_goes_on_in_plaintext() {
        let mut d = Drive::detect();
        d.client(&pg_ssl_request());
        d.server(b"N");
        d.client(&pg_startup("bob", None));
        d.server(&pg_startup_ok());
        d.client(&pg_query("SELECT 1"));
        let mut resp = pg_complete("SELECT 1");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert!(!d.parser.is_encrypted());
        let rts = d.round_trips();
        assert_eq!(rts.len(), 1);
        assert_eq!(
            rts[0].namespace.as_deref(),
            Some("bob"),
            "database defaults to the user"
        );
    }

    #[test]
    fn big_response_ends_in_the_tail() {
        let mut d = connected();
        d.head_max = 256;
        d.take();
        d.client(&pg_query("SELECT * FROM big"));
        let mut resp = pg_msg(b'T', &[0, 0]);
        for i in 0..1000 {
            resp.extend(pg_data_row(&format!("row {i}")));
        }
        resp.extend(pg_complete("SELECT 1000"));
        resp.extend(pg_ready(b'T'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(
            (rt.rows, rt.tx_state),
            (Some(1000), Some(TxState::InTransaction))
        );
        assert!(d.others().is_empty(), "one read: no loss to report");
        // Framing resumes with the next response.
        d.client(&pg_query("COMMIT"));
        let mut resp = pg_complete("COMMIT");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert_eq!(one(&mut d).operation.as_deref(), Some("COMMIT"));
    }

    #[test]
    fn big_response_over_several_reads() {
        let mut d = connected();
        d.head_max = 256;
        d.take();
        d.client(&pg_query("SELECT * FROM big"));
        let mut resp = Vec::new();
        for i in 0..3000 {
            resp.extend(pg_data_row(&format!("row {i}")));
        }
        resp.extend(pg_complete("SELECT 3000"));
        resp.extend(pg_ready(b'I'));
        for piece in resp.chunks(8192) {
            d.server(piece);
        }
        let rts = d.round_trips();
        assert_eq!(rts.len(), 1);
        assert_eq!(rts[0].rows, Some(3000));
        assert_eq!(
            d.others(),
            vec![
                Observation::Lost {
                    reason: "response boundary in the unseen middle of a read"
                },
                Observation::Resynced
            ]
        );
    }

    #[test]
    fn pipeline_longer_than_the_head_ends_with_its_sync() {
        let mut d = connected();
        d.head_max = 256;
        d.take();
        let mut batch = pg_parse("", "INSERT INTO t VALUES ($1)");
        for _ in 0..50 {
            batch.extend(pg_bind("", ""));
            batch.extend(pg_execute(""));
        }
        batch.extend(pg_sync());
        d.client(&batch);
        let mut resp = pg_msg(b'1', &[]);
        for _ in 0..50 {
            resp.extend(pg_msg(b'2', &[]));
            resp.extend(pg_complete("INSERT 0 1"));
        }
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(rt.operation.as_deref(), Some("INSERT"));
        assert!(d.others().is_empty());
    }

    #[test]
    fn late_attach_starts_at_the_next_request() {
        let mut d = Drive::detect();
        d.server(&pg_data_row("the middle of something"));
        d.client(&pg_query("SELECT 1"));
        let mut resp = pg_complete("SELECT 1");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!(
            (rt.operation.as_deref(), rt.namespace),
            (Some("SELECT"), None)
        );
    }

    #[test]
    fn copy_in_is_framed_like_any_message() {
        let mut d = connected();
        d.take();
        d.client(&pg_query("COPY t FROM STDIN"));
        d.server(&pg_msg(b'G', &[0, 0, 0]));
        for _ in 0..3 {
            d.client(&pg_msg(b'd', b"1\t2\n"));
        }
        d.client(&pg_msg(b'c', &[]));
        let mut resp = pg_complete("COPY 3");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rt = one(&mut d);
        assert_eq!((rt.operation.as_deref(), rt.rows), (Some("COPY"), Some(3)));
    }

    #[test]
    fn garbage_loses_then_resyncs() {
        let mut d = connected();
        d.take();
        d.client(b"\x01\x02garbage that is no message");
        assert_eq!(
            d.others(),
            vec![Observation::Lost {
                reason: "request boundary in the unseen middle of a write"
            }]
        );
        d.client(b"more garbage");
        d.client(&pg_query("SELECT 2"));
        let mut resp = pg_complete("SELECT 1");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert_eq!(d.others().last(), Some(&Observation::Resynced));
        assert_eq!(
            d.round_trips()
                .last()
                .and_then(|r| r.operation.clone())
                .as_deref(),
            Some("SELECT")
        );
    }

    #[test]
    fn a_bogus_length_does_not_stall() {
        let mut d = connected();
        d.take();
        // A DataRow announcing 1 GiB, then the response's real end.
        d.client(&pg_query("SELECT 1"));
        let mut resp = vec![b'D', 0x3f, 0xff, 0xff, 0xff, 0, 1];
        resp.extend(pg_complete("SELECT 1"));
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        assert_eq!(d.round_trips().len(), 1);
        d.take();
        // A request announcing far more than it sends; the next one is seen.
        d.client(&[b'Q', 0x30, 0, 0, 0, b'S']);
        d.client(&pg_query("SELECT 3"));
        let mut resp = pg_complete("SELECT 1");
        resp.extend(pg_ready(b'I'));
        d.server(&resp);
        let rts = d.round_trips();
        assert_eq!(
            rts.last().and_then(|r| r.query_text()).as_deref(),
            Some("SELECT ?")
        );
    }

    #[test]
    fn terminate_ends_the_session() {
        let mut d = connected();
        d.take();
        d.client(&pg_msg(b'X', &[]));
        d.client(&pg_query("SELECT 1"));
        d.server(&pg_ready(b'I'));
        assert!(d.take().is_empty());
    }

    #[test]
    fn truncated_and_random_input_never_panics() {
        let mut stream = pg_startup("u", Some("d"));
        stream.extend(pg_parse("s", "SELECT 1"));
        stream.extend(pg_bind("p", "s"));
        stream.extend(pg_execute("p"));
        stream.extend(pg_sync());
        stream.extend(pg_complete("SELECT 1"));
        stream.extend(pg_error("42601", "x"));
        stream.extend(pg_ready(b'I'));
        feed_truncated_and_random(
            DbSystem::Postgresql,
            Direction::ToServer,
            &stream,
            [1, 5, 16, usize::MAX],
            (31, 7),
        );
    }
}
