//! Redis RESP2/RESP3: commands (arrays of bulk strings, or inline), replies
//! of every RESP3 type, pipelining, MULTI/EXEC, pub/sub pushes.
//!
//! Each command is one round trip; replies answer commands in order. Bulk
//! payloads are skipped by their announced length, so a large value costs
//! nothing; a type line that falls in a chunk's unseen middle loses framing.

use super::book::{
    is_tls_record, Alternation, FeedContext, Pending, Protocol, RequestQueue, ResponseEnd,
};
use super::frame::{FramingLoss, View};
use super::sql::{db_error, truncate_chars};
use super::{DbError, Direction, Observation, TxState, QUERY_MAX_CHARS};

/// Nesting deeper than this is not a reply we can follow.
const MAX_DEPTH: usize = 64;
/// A line longer than this (with no end in sight) is garbage.
const LINE_MAX: usize = 64 * 1024;
/// Bytes of a line kept: enough for an error message or an inline command.
const LINE_KEEP: usize = 512;
/// Bytes of a bulk string kept (command names, blob errors).
const STRING_KEEP: usize = 256;
/// Largest element count or bulk length believed.
const COUNT_MAX: u64 = 1 << 32;

/// Commands whose first argument is a subcommand, shown in the query text
/// ("CONFIG GET ?"); the operation is the first word only, so that it stays
/// a short, bounded set.
const CONTAINERS: &[&str] = &[
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

/// Inline commands recognised at a connection's start (telnet, health checks).
const INLINE_STARTS: &[&str] = &[
    "PING",
    "HELLO",
    "AUTH",
    "SELECT",
    "INFO",
    "QUIT",
    "ECHO",
    "GET",
    "SET",
    "DEL",
    "EXISTS",
    "KEYS",
    "CLIENT",
    "CONFIG",
    "COMMAND",
    "DBSIZE",
    "TIME",
    "MONITOR",
    "SUBSCRIBE",
    "FLUSHDB",
];

// Command classes kept in `Pending::kind`.
const K_MULTI: u8 = 1;
const K_EXEC: u8 = 2;
const K_SELECT: u8 = 3;
const K_SUBSCRIBE: u8 = 4;
const K_RESET: u8 = 5;

/// A connection's first bytes are a Redis command: a RESP array of bulk
/// strings, or a known inline command (not an HTTP request line).
pub(crate) fn is_request_start(start: &[u8]) -> bool {
    if let Some(rest) = start.strip_prefix(b"*") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        return (1..=6).contains(&digits)
            && rest.first() != Some(&b'0')
            && matches!(
                rest.get(digits..),
                Some([b'\r', b'\n', b'$', ..] | [b'\r', b'\n'])
            );
    }
    let line_end = start.iter().position(|&b| b == b'\r' || b == b'\n');
    let line = start
        .get(..line_end.unwrap_or(start.len()))
        .unwrap_or_default();
    let word = line.split(|&b| b == b' ').next().unwrap_or_default();
    line_end.is_some()
        && !line.windows(5).any(|w| w == b"HTTP/")
        && INLINE_STARTS
            .iter()
            .any(|c| c.as_bytes().eq_ignore_ascii_case(word))
}

/// What is kept of one top-level value.
#[derive(Default)]
struct Value {
    /// Its type byte (`b'i'` for an inline command).
    kind: u8,
    /// The content of its line, for simple strings and errors and inline
    /// commands (at most [`LINE_KEEP`] bytes).
    line: Vec<u8>,
    /// Its first two bulk strings among its direct elements (or itself), at
    /// most [`STRING_KEEP`] bytes each.
    strings: Vec<Vec<u8>>,
    /// Elements announced by a top-level aggregate.
    elements: u64,
}

#[derive(Clone, Copy)]
struct Level {
    /// Elements still to come; `None`: streamed, until `.` (or `;0`).
    left: Option<u64>,
    /// An attribute map: it precedes a value and is not an element itself.
    attribute: bool,
}

#[derive(Clone, Copy, Default)]
enum State {
    /// At the start of a type line (or inside one, carried in `line`).
    #[default]
    Line,
    /// Bulk payload and its CRLF still to pass; `capture` keeps its start.
    Payload { left: u64, capture: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Framed,
    Lost,
}

enum Count {
    Null,
    Streamed,
    Of(u64),
}

fn count(digits: &[u8]) -> Option<Count> {
    match digits {
        b"?" => Some(Count::Streamed),
        b"-1" => Some(Count::Null),
        _ => {
            let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
            (n <= COUNT_MAX).then_some(Count::Of(n))
        }
    }
}

/// A streaming RESP reader for one direction.
#[derive(Default)]
struct Reader {
    /// Client side: a top-level line not starting with `*` is an inline
    /// command.
    inline: bool,
    stack: Vec<Level>,
    state: State,
    /// A line the last chunk ended in.
    line: Vec<u8>,
    line_len: usize,
    value: Value,
    lost: bool,
}

impl Reader {
    fn client() -> Self {
        Reader {
            inline: true,
            ..Reader::default()
        }
    }

    fn resync(&mut self) {
        *self = Reader {
            inline: self.inline,
            ..Reader::default()
        };
    }

    /// Bulk bytes still to pass before the next line.
    fn skipping(&self) -> u64 {
        match self.state {
            State::Payload { left, .. } => left,
            State::Line => 0,
        }
    }

    fn lose(&mut self) -> Framing {
        self.resync();
        self.lost = true;
        Framing::Lost
    }

    /// Reads one chunk, handing each complete top-level value to `on_value`.
    fn feed(&mut self, view: &View<'_>, mut on_value: impl FnMut(&Value)) -> Framing {
        if self.lost {
            return Framing::Lost;
        }
        let total = view.total();
        let mut pos = 0usize;
        while pos < total {
            let avail = view.from(pos);
            let done = match self.state {
                State::Payload { left, capture } => {
                    if capture {
                        if let Some(s) = self.value.strings.last_mut() {
                            let room = STRING_KEEP.saturating_sub(s.len());
                            let data =
                                usize::try_from(left.saturating_sub(2)).unwrap_or(usize::MAX);
                            s.extend_from_slice(
                                avail
                                    .get(..avail.len().min(room).min(data))
                                    .unwrap_or_default(),
                            );
                        }
                    }
                    let step = left.min((total - pos) as u64);
                    pos += step as usize;
                    let left = left - step;
                    if left > 0 {
                        self.state = State::Payload { left, capture };
                        continue;
                    }
                    self.state = State::Line;
                    self.element_done()
                }
                State::Line => {
                    if avail.is_empty() {
                        return self.lose();
                    }
                    let Some(at) = avail.iter().position(|&b| b == b'\n') else {
                        if pos + avail.len() < total || self.line_len + avail.len() > LINE_MAX {
                            return self.lose();
                        }
                        self.keep_line(avail);
                        break;
                    };
                    self.keep_line(avail.get(..at).unwrap_or_default());
                    pos += at + 1;
                    let mut line = std::mem::take(&mut self.line);
                    self.line_len = 0;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    match self.on_line(&line) {
                        Some(done) => done,
                        None => return self.lose(),
                    }
                }
            };
            if done {
                on_value(&self.value);
            }
        }
        Framing::Framed
    }

    fn keep_line(&mut self, bytes: &[u8]) {
        let room = LINE_KEEP.saturating_sub(self.line.len());
        self.line
            .extend_from_slice(bytes.get(..bytes.len().min(room)).unwrap_or_default());
        self.line_len += bytes.len();
    }

    /// One type line. `Some(true)`: a top-level value is complete; `None`:
    /// not RESP.
    fn on_line(&mut self, line: &[u8]) -> Option<bool> {
        let top = self.stack.is_empty();
        if top {
            self.value = Value::default();
        }
        let Some((&t, rest)) = line.split_first() else {
            // Clients may send empty lines between inline commands.
            return (self.inline && top).then_some(false);
        };
        if self.inline && top && t != b'*' {
            self.value.kind = b'i';
            self.value.line = line.to_vec();
            return Some(self.element_done());
        }
        if top {
            self.value.kind = t;
        }
        match t {
            b'*' | b'%' | b'~' | b'>' | b'|' => {
                let attribute = t == b'|';
                let left = match count(rest)? {
                    Count::Null => return Some(self.element_done()),
                    Count::Streamed => None,
                    Count::Of(0) if attribute => return Some(false),
                    Count::Of(0) => return Some(self.element_done()),
                    Count::Of(n) if matches!(t, b'%' | b'|') => Some(n * 2),
                    Count::Of(n) => Some(n),
                };
                if top {
                    self.value.elements = left.unwrap_or(0);
                }
                self.push(Level { left, attribute })?;
                Some(false)
            }
            b'$' | b'!' | b'=' => match count(rest)? {
                Count::Null => Some(self.element_done()),
                Count::Streamed if t == b'$' => {
                    self.push(Level {
                        left: None,
                        attribute: false,
                    })?;
                    Some(false)
                }
                Count::Streamed => None,
                Count::Of(n) => {
                    let capture = self.stack.len() <= 1 && self.value.strings.len() < 2;
                    if capture {
                        self.value.strings.push(Vec::new());
                    }
                    self.state = State::Payload {
                        left: n + 2,
                        capture,
                    };
                    Some(false)
                }
            },
            // A streamed string's part: `;0` ends it.
            b';' => match count(rest)? {
                Count::Of(0) => self.pop_streamed(),
                Count::Of(n) => {
                    self.state = State::Payload {
                        left: n + 2,
                        capture: false,
                    };
                    Some(false)
                }
                _ => None,
            },
            b'.' if rest.is_empty() => self.pop_streamed(),
            b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
                if top {
                    self.value.line = rest.to_vec();
                }
                Some(self.element_done())
            }
            _ => None,
        }
    }

    fn push(&mut self, level: Level) -> Option<()> {
        (self.stack.len() < MAX_DEPTH).then(|| self.stack.push(level))
    }

    fn pop_streamed(&mut self) -> Option<bool> {
        match self.stack.last() {
            Some(Level { left: None, .. }) => {
                self.stack.pop();
                Some(self.element_done())
            }
            _ => None,
        }
    }

    /// An element ended: count it in its aggregate, closing aggregates that
    /// are full. True when a top-level value is complete.
    fn element_done(&mut self) -> bool {
        loop {
            let Some(level) = self.stack.last_mut() else {
                return true;
            };
            let Some(left) = level.left else {
                return false;
            };
            if left > 1 {
                level.left = Some(left - 1);
                return false;
            }
            let attribute = level.attribute;
            self.stack.pop();
            if attribute {
                // It preceded the value it annotates, which comes next.
                return false;
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Session {
    started: bool,
    encrypted: bool,
    client: Reader,
    server: Reader,
    client_report: FramingLoss,
    server_report: FramingLoss,
    book: RequestQueue,
    namespace: Option<String>,
    tx: Option<TxState>,
    /// A SUBSCRIBE was sent: RESP2 pushes arrive as plain arrays.
    subscribed: bool,
    alternation: Alternation,
}

impl Protocol for Session {
    fn encrypted(&self) -> bool {
        self.encrypted
    }

    fn tx_state(&self) -> Option<TxState> {
        self.tx
    }

    fn request_outstanding(&self) -> bool {
        if self.encrypted {
            self.alternation.waiting()
        } else {
            self.book.waiting()
        }
    }

    fn feed(&mut self, direction: Direction, view: &View<'_>, cx: &mut FeedContext<'_>) {
        if !std::mem::replace(&mut self.started, true) {
            self.client = Reader::client();
            if direction == Direction::ToServer && is_tls_record(view.start()) {
                self.encrypted = true;
                cx.out.push(Observation::Encrypted);
            }
        }
        match (self.encrypted, direction) {
            (true, Direction::ToServer) => {
                self.alternation
                    .client(view, cx.ts, self.namespace.as_deref(), cx.out)
            }
            (true, Direction::FromServer) => self.alternation.server(cx.ts),
            (false, Direction::ToServer) => self.client_chunk(view, cx),
            (false, Direction::FromServer) => self.server_chunk(view, cx),
        }
    }
}

impl Session {
    fn end(&self, ts: u64) -> ResponseEnd<'_> {
        ResponseEnd {
            end_ns: ts,
            namespace: self.namespace.as_deref(),
            tx_state: self.tx,
        }
    }

    fn client_chunk(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        if self.server.lost {
            // The reply's end was not seen and the client moved on.
            self.book
                .answer_all(self.namespace.as_deref(), self.tx, cx.out);
            self.server.resync();
        }
        self.book.may_have_missed_requests(None);
        let skip = self.client.skipping();
        let swallowed = skip > 0 && skip >= view.total() as u64;
        if self.client.lost || swallowed {
            if !is_request_start(view.start()) {
                if self.client.lost {
                    return;
                }
            } else {
                if swallowed {
                    self.client_report
                        .lost("request shorter than its announced length", cx.out);
                }
                self.client.resync();
            }
        }
        let mut reader = std::mem::take(&mut self.client);
        let fed = reader.feed(view, |v| self.on_command(v, cx));
        self.client = reader;
        match fed {
            Framing::Framed => self.client_report.framed(cx.out),
            Framing::Lost => {
                // Commands in the unseen middle: replies to them count.
                self.book.may_have_missed_requests(Some(cx.ts));
                self.client_report
                    .lost("command boundary in the unseen middle of a write", cx.out);
            }
        }
    }

    fn server_chunk(&mut self, view: &View<'_>, cx: &mut FeedContext<'_>) {
        self.book.server_chunk(cx.ts);
        if self.server.lost {
            // Replies cannot be told apart from the middle of one: wait
            // for the client's next command.
            return;
        }
        let mut reader = std::mem::take(&mut self.server);
        let fed = reader.feed(view, |v| self.on_reply(v, cx));
        self.server = reader;
        match fed {
            Framing::Framed => self.server_report.framed(cx.out),
            Framing::Lost => self
                .server_report
                .lost("reply boundary in the unseen middle of a read", cx.out),
        }
    }

    fn on_command(&mut self, v: &Value, cx: &mut FeedContext<'_>) {
        let inline_words: Vec<&[u8]>;
        let (name, sub, args) = match v.kind {
            b'*' => (
                v.strings.first().map(Vec::as_slice),
                v.strings.get(1).map(Vec::as_slice),
                v.elements.saturating_sub(1),
            ),
            b'i' => {
                inline_words = v
                    .line
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|w| !w.is_empty())
                    .collect();
                let args = inline_words.len().saturating_sub(1) as u64;
                (
                    inline_words.first().copied(),
                    inline_words.get(1).copied(),
                    args,
                )
            }
            // Not a command: nothing a reply will answer.
            _ => return,
        };
        let Some(name) = name.and_then(word) else {
            self.book.push(Pending::new(cx.ts), cx.out);
            return;
        };
        let mut query = name.clone();
        let mut args = args;
        if let Some(sub) = sub
            .and_then(word)
            .filter(|_| CONTAINERS.contains(&name.as_str()))
        {
            query.push(' ');
            query.push_str(&sub);
            args = args.saturating_sub(1);
        }
        // Arguments are data: only their number shows.
        for _ in 0..args.min(QUERY_MAX_CHARS as u64) {
            query.push_str(" ?");
        }
        let kind = match name.as_str() {
            "MULTI" => K_MULTI,
            "EXEC" | "DISCARD" => K_EXEC,
            "SELECT" => K_SELECT,
            "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" => K_SUBSCRIBE,
            "RESET" => K_RESET,
            _ => 0,
        };
        if kind == K_SUBSCRIBE {
            self.subscribed = true;
        }
        let note = (kind == K_SELECT)
            .then(|| sub.map(|s| String::from_utf8_lossy(s).into_owned()))
            .flatten()
            .filter(|db| !db.is_empty() && db.bytes().all(|b| b.is_ascii_digit()));
        let p = Pending {
            operation: Some(name),
            query: Some(super::QueryText::shown_as_is(truncate_chars(
                &query,
                QUERY_MAX_CHARS,
            ))),
            kind,
            note,
            ..Pending::new(cx.ts)
        };
        self.book.push(p, cx.out);
    }

    fn on_reply(&mut self, v: &Value, cx: &mut FeedContext<'_>) {
        let first = v.strings.first().map(|s| s.to_ascii_lowercase());
        let first = first.as_deref().unwrap_or_default();
        let confirmation = matches!(first, b"subscribe" | b"psubscribe" | b"ssubscribe");
        let pushed = v.kind == b'>'
            || (self.subscribed
                && v.kind == b'*'
                && (confirmation
                    || matches!(
                        first,
                        b"message"
                            | b"pmessage"
                            | b"smessage"
                            | b"unsubscribe"
                            | b"punsubscribe"
                            | b"sunsubscribe"
                    )));
        if pushed {
            // Pub/sub messages answer no command; a subscription's first
            // confirmation answers its SUBSCRIBE (later ones its other
            // channels).
            let waiting = self.book.front_mut().is_some_and(|p| p.kind == K_SUBSCRIBE);
            if !(confirmation && waiting) {
                return;
            }
        }
        let error = match v.kind {
            b'-' => Some(error(&v.line)),
            b'!' => v.strings.first().map(|s| error(s)),
            _ => None,
        };
        let Some(mut p) = self.book.pop() else {
            return;
        };
        match (p.kind, &error) {
            (K_MULTI, None) => self.tx = Some(TxState::InTransaction),
            // EXECABORT ends the transaction too.
            (K_EXEC, _) => self.tx = Some(TxState::Idle),
            (K_SELECT, None) => self.namespace = p.note.take(),
            (K_RESET, _) => {
                self.subscribed = false;
                self.tx = self.tx.map(|_| TxState::Idle);
                self.namespace = None;
            }
            (_, Some(_)) if self.tx == Some(TxState::InTransaction) => {
                // A command that failed to queue dooms the transaction.
                self.tx = Some(TxState::Failed);
            }
            _ => {}
        }
        if let Some(e) = error {
            p.set_error(e);
        }
        self.end(cx.ts).emit(p, cx.out);
    }
}

/// A command or subcommand name, uppercased; `None` if it does not look
/// like one (it is then data, and must not show).
fn word(bytes: &[u8]) -> Option<String> {
    let ok = (1..=32).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'|'));
    ok.then(|| String::from_utf8_lossy(bytes).to_ascii_uppercase())
}

/// `ERR unknown command`: the code is the first word.
fn error(text: &[u8]) -> DbError {
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    match text.split_once(' ') {
        Some((code, message)) => db_error(code, message),
        None => db_error(text, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testutil::*;
    use crate::protocol::{DbSystem, RoundTrip};

    fn one(d: &mut Drive) -> RoundTrip {
        let mut rts = d.take();
        assert_eq!(rts.len(), 1, "{rts:?} {:?}", d.out);
        rts.remove(0)
    }

    #[test]
    fn a_command_and_its_reply() {
        let mut d = Drive::detect();
        d.client(&resp_command(&["get", "user:42"]));
        assert_eq!(d.parser.system(), Some(DbSystem::Redis));
        d.server(b"$5\r\nalice\r\n");
        let rt = one(&mut d);
        assert_eq!(
            (rt.operation.as_deref(), rt.query_text().as_deref()),
            (Some("GET"), Some("GET ?"))
        );
        assert_eq!((rt.start_ns, rt.end_ns, rt.tx_state), (1000, 2000, None));
    }

    #[test]
    fn pipeline_of_100_with_replies_over_3_reads() {
        for head_max in [usize::MAX, 256] {
            let mut d = Drive::detect();
            d.head_max = head_max;
            let mut write = Vec::new();
            for i in 0..100 {
                write.extend(resp_command(&["SET", &format!("k{i}"), "v"]));
            }
            d.client(&write);
            let replies = b"+OK\r\n".repeat(100);
            // Cut inside replies, not only between them.
            d.server(&replies[..163]);
            d.server(&replies[163..331]);
            d.server(&replies[331..]);
            let rts = d.take();
            assert_eq!(rts.len(), 100, "head {head_max}");
            assert!(rts.iter().all(|r| r.end_ns >= r.start_ns));
            if head_max == usize::MAX {
                assert!(rts
                    .iter()
                    .all(|r| r.query_text().as_deref() == Some("SET ? ?")));
                assert_eq!(rts[99].end_ns, 4000);
            } else {
                // Commands past the head are counted from their replies.
                assert_eq!(rts[0].operation.as_deref(), Some("SET"));
                assert_eq!(rts[99].operation, None);
            }
        }
    }

    #[test]
    fn resp3_map_attribute_and_push() {
        let mut d = Drive::detect();
        d.client(&resp_command(&["HELLO", "3"]));
        d.server(b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(one(&mut d).operation.as_deref(), Some("HELLO"));
        d.client(&resp_command(&["HGETALL", "h"]));
        d.client(&resp_command(&["SMEMBERS", "s"]));
        // A push first (not a reply), then an attribute before the map,
        // then a set with RESP3 scalars.
        let mut replies = b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n_\r\n".to_vec();
        replies.extend(b"|1\r\n+ttl\r\n:10\r\n%1\r\n$1\r\na\r\n,1.5\r\n");
        replies.extend(b"~4\r\n#t\r\n(123456789012345678901\r\n=7\r\ntxt:abc\r\n_\r\n");
        d.server(&replies);
        let rts = d.take();
        assert_eq!(rts.len(), 2);
        assert_eq!(rts[1].operation.as_deref(), Some("SMEMBERS"));
        assert!(d.others().is_empty());
    }

    #[test]
    fn error_replies() {
        let mut d = Drive::detect();
        d.client(&resp_command(&["LPUSH", "s", "x"]));
        d.server(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        let err = one(&mut d).error.expect("error");
        assert_eq!(err.code, "WRONGTYPE");
        assert_eq!(
            err.message,
            "Operation against a key holding the wrong kind of value"
        );
        d.client(b"FOO\r\n");
        d.server(b"!21\r\nSYNTAX invalid syntax\r\n");
        let rt = one(&mut d);
        assert_eq!(
            (rt.operation.as_deref(), rt.error.map(|e| e.code)),
            (Some("FOO"), Some("SYNTAX".into()))
        );
    }

    #[test]
    fn multi_exec_round_trips_and_transaction_state() {
        let mut d = Drive::detect();
        let mut write = resp_command(&["MULTI"]);
        write.extend(resp_command(&["INCR", "a"]));
        write.extend(resp_command(&["INCR", "b"]));
        d.client(&write);
        d.server(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n");
        assert_eq!(d.parser.tx_state(), Some(TxState::InTransaction));
        d.client(&resp_command(&["EXEC"]));
        d.server(b"*2\r\n:1\r\n:1\r\n");
        let rts = d.take();
        let ops: Vec<_> = rts.iter().filter_map(|r| r.operation.as_deref()).collect();
        assert_eq!(ops, ["MULTI", "INCR", "INCR", "EXEC"]);
        assert_eq!(rts[3].tx_state, Some(TxState::Idle));
        // A command that fails to queue dooms the transaction.
        d.client(&resp_command(&["MULTI"]));
        d.client(&resp_command(&["NOPE"]));
        d.server(b"+OK\r\n-ERR unknown command 'NOPE'\r\n");
        assert_eq!(d.parser.tx_state(), Some(TxState::Failed));
    }

    #[test]
    fn a_pipeline_is_outstanding_until_its_last_reply() {
        let mut d = Drive::detect();
        let mut write = resp_command(&["SET", "a", "1"]);
        write.extend(resp_command(&["BLPOP", "q", "0"]));
        d.client(&write);
        assert!(d.parser.request_outstanding());
        d.server(b"+OK\r\n");
        assert!(d.parser.request_outstanding(), "BLPOP still blocks");
        d.server(b"*2\r\n$1\r\nq\r\n$1\r\n");
        assert!(d.parser.request_outstanding(), "half a reply");
        d.server(b"x\r\n");
        assert!(!d.parser.request_outstanding());
        assert_eq!(d.take().len(), 2);
    }

    #[test]
    fn big_values_are_skipped() {
        let mut d = Drive::detect();
        d.head_max = 256;
        let value = "v".repeat(100_000);
        d.client(&resp_command(&["SET", "k", &value]));
        d.server(b"+OK\r\n");
        d.client(&resp_command(&["GET", "k"]));
        let reply = format!("${}\r\n{}\r\n", value.len(), value);
        for piece in reply.as_bytes().chunks(16_384) {
            d.server(piece);
        }
        let rts = d.take();
        assert_eq!(rts.len(), 2);
        assert_eq!(rts[0].query_text().as_deref(), Some("SET ? ?"));
        assert_eq!(
            rts[1].end_ns,
            3000 + 1000 * reply.len().div_ceil(16_384) as u64
        );
        assert!(d.others().is_empty());
    }

    #[test]
    fn select_sets_the_namespace_and_containers_show_subcommands() {
        let mut d = Drive::detect();
        d.client(&resp_command(&["SELECT", "2"]));
        d.server(b"+OK\r\n");
        d.client(&resp_command(&["CONFIG", "GET", "maxmemory"]));
        d.server(b"*2\r\n$9\r\nmaxmemory\r\n$1\r\n0\r\n");
        let rts = d.take();
        assert_eq!(rts[0].namespace.as_deref(), Some("2"));
        assert_eq!(
            (rts[1].operation.as_deref(), rts[1].query_text().as_deref()),
            (Some("CONFIG"), Some("CONFIG GET ?"))
        );
        assert_eq!(rts[1].namespace.as_deref(), Some("2"));
    }

    #[test]
    fn pubsub_messages_answer_nothing() {
        let mut d = Drive::detect();
        d.client(&resp_command(&["SUBSCRIBE", "a", "b"]));
        d.server(
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
        );
        d.server(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n");
        d.client(&resp_command(&["PING"]));
        d.server(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        let ops: Vec<_> = d.take().into_iter().filter_map(|r| r.operation).collect();
        assert_eq!(ops, ["SUBSCRIBE", "PING"]);
    }

    #[test]
    fn garbage_loses_then_resyncs() {
        let mut d = Drive::detect();
        d.client(&resp_command(&["PING"]));
        d.server(b"+PONG\r\n");
        d.take();
        d.client(b"*1\r\n\x00\x01 not resp\r\n");
        assert_eq!(
            d.others(),
            vec![Observation::Lost {
                reason: "command boundary in the unseen middle of a write"
            }]
        );
        d.client(b"still junk");
        d.client(&resp_command(&["PING"]));
        d.server(b"+PONG\r\n");
        assert_eq!(d.others().last(), Some(&Observation::Resynced));
        assert_eq!(
            d.round_trips()
                .last()
                .and_then(|r| r.operation.clone())
                .as_deref(),
            Some("PING")
        );
    }

    #[test]
    fn lost_reply_ends_when_the_client_moves_on() {
        let mut d = Drive::detect();
        d.head_max = 256;
        d.client(&resp_command(&["LRANGE", "l", "0", "-1"]));
        let mut reply = b"*1000\r\n".to_vec();
        for i in 0..1000 {
            reply.extend(format!("$3\r\n{:03}\r\n", i % 1000).into_bytes());
        }
        d.server(&reply);
        assert!(d.round_trips().is_empty());
        d.client(&resp_command(&["PING"]));
        d.server(b"+PONG\r\n");
        let rts = d.take();
        assert_eq!(rts.len(), 2);
        assert_eq!(
            (rts[0].operation.as_deref(), rts[0].end_ns),
            (Some("LRANGE"), 2000)
        );
    }

    #[test]
    fn truncated_and_random_input_never_panics() {
        let mut stream = resp_command(&["SET", "a", "b"]);
        stream.extend(
            b"*3\r\n%1\r\n+a\r\n|1\r\n+b\r\n:1\r\n$?\r\n;2\r\nab\r\n;0\r\n*?\r\n:1\r\n.\r\n",
        );
        stream.extend(b"PING\r\n-ERR x\r\n>2\r\n+a\r\n+b\r\n");
        feed_truncated_and_random(
            DbSystem::Redis,
            Direction::ToServer,
            &stream,
            [1, 3, 16, usize::MAX],
            (13, 5),
        );
        // Deep nesting is refused, not followed.
        let mut d = Drive::new(Some(DbSystem::Redis));
        d.client(&resp_command(&["GET", "k"]));
        d.server(&b"*1\r\n".repeat(10_000));
    }
}
