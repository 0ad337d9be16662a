//! One parser per connection: detects the protocol from the first bytes,
//! then hands every chunk to that protocol's parser.

use super::book::{is_tls_record, FeedContext, Protocol};
use super::frame::View;
use super::{mysql, postgres, redis};
use super::{Chunk, DbSystem, Direction, Observation, RoundTrip, TxState};

/// Chunks looked at before deciding a connection speaks no known protocol:
/// at most this many client chunks, or four times as many server chunks.
const DETECT_CLIENT_CHUNKS: u8 = 4;
const DETECT_CHUNKS_MAX: u8 = 16;

enum Inner {
    Detecting,
    Speaking(DbSystem, Box<dyn Protocol + Send>),
    /// Not a database protocol we know: feed does nothing.
    Other,
}

impl Inner {
    fn of(system: DbSystem) -> Inner {
        let parser: Box<dyn Protocol + Send> = match system {
            DbSystem::Postgresql => Box::<postgres::Session>::default(),
            DbSystem::Mysql => Box::<mysql::Session>::default(),
            DbSystem::Redis => Box::<redis::Session>::default(),
        };
        Inner::Speaking(system, parser)
    }

    fn parser(&self) -> Option<&(dyn Protocol + Send)> {
        match self {
            Inner::Speaking(_, parser) => Some(parser.as_ref()),
            Inner::Detecting | Inner::Other => None,
        }
    }
}

/// The protocol parser of one connection. Feed it every chunk in order.
pub struct SessionParser {
    hint: Option<DbSystem>,
    raw: bool,
    looked: u8,
    /// While detecting: the last server chunk was only a packet header that
    /// may announce a MySQL greeting (the client reads header and payload
    /// apart).
    greeting_header: Option<[u8; 4]>,
    /// A hooked TLS library gives this session's plaintext.
    tls_plaintext: bool,
    inner: Inner,
}

impl SessionParser {
    /// `hint_port` (the server's port) only orders the guesses: the protocol
    /// is detected from the first bytes.
    pub fn new(hint_port: Option<u16>) -> Self {
        SessionParser {
            hint: hint_port.and_then(DbSystem::from_port),
            raw: false,
            looked: 0,
            greeting_header: None,
            tls_plaintext: false,
            inner: Inner::Detecting,
        }
    }

    /// A parser that takes `system` for granted (no detection): for
    /// connections known from elsewhere (a pool adapter) and for fuzzing.
    pub fn for_system(system: DbSystem) -> Self {
        SessionParser {
            hint: Some(system),
            raw: false,
            looked: 0,
            greeting_header: None,
            tls_plaintext: false,
            inner: Inner::of(system),
        }
    }

    /// The protocol, once detected.
    pub fn system(&self) -> Option<DbSystem> {
        match self.inner {
            Inner::Speaking(system, _) => Some(system),
            Inner::Detecting | Inner::Other => None,
        }
    }

    /// Detection concluded that the connection speaks no database protocol
    /// we know: `feed` ignores everything from now on.
    pub fn gave_up(&self) -> bool {
        matches!(self.inner, Inner::Other)
    }

    /// The session switched to TLS (or GSSAPI encryption).
    pub fn is_encrypted(&self) -> bool {
        self.tls_plaintext || self.inner.parser().is_some_and(|p| p.encrypted())
    }

    /// Whether a hooked TLS library gives this session's plaintext.
    pub fn reads_tls_plaintext(&self) -> bool {
        self.tls_plaintext
    }

    /// From now on the chunks fed are the plaintext a hooked TLS library
    /// was given or returned, no longer the socket's encrypted bytes. The
    /// plaintext starts where the encryption began: a MySQL session goes on
    /// with the client's handshake response; the others start afresh
    /// (PostgreSQL with its startup message, Redis with its first command),
    /// detected again with what the encrypted start told as the hint.
    pub fn plaintext_follows(&mut self) {
        if std::mem::replace(&mut self.tls_plaintext, true) {
            return;
        }
        if let Inner::Speaking(system, parser) = &mut self.inner {
            if parser.plaintext_follows() {
                return;
            }
            self.hint = Some(*system);
        }
        self.inner = Inner::Detecting;
        self.looked = 0;
        self.greeting_header = None;
    }

    /// Transaction status after the last response that told it, start-up
    /// included: PostgreSQL's first ReadyForQuery and MySQL's
    /// authentication OK say it before any round trip, so callers should
    /// read it after every feed rather than only from round trips.
    pub fn tx_state(&self) -> Option<TxState> {
        self.inner.parser().and_then(|p| p.tx_state())
    }

    /// A request went out and the end of its response (ReadyForQuery, the
    /// last OK/ERR/EOF, the whole RESP reply) has not come back: the
    /// server is working on it, or still sending its answer. Start-up and
    /// authentication are not requests. What `pg_stat_activity` calls
    /// `active`, and what an inferred pool counts as used.
    pub fn request_outstanding(&self) -> bool {
        self.inner.parser().is_some_and(|p| p.request_outstanding())
    }

    /// Report query text as sent instead of sanitized (default: sanitized).
    pub fn set_raw_queries(&mut self, raw: bool) {
        self.raw = raw;
    }

    /// Parses one chunk; what it completes is appended to `out`.
    pub fn feed(&mut self, chunk: &Chunk<'_>, out: &mut Vec<Observation>) {
        if matches!(self.inner, Inner::Other) || (chunk.total_len == 0 && chunk.head.is_empty()) {
            return;
        }
        let view = View::new(chunk);
        if let Inner::Detecting = self.inner {
            let header = self.greeting_header.take();
            if let Some(system) = detect(chunk.direction, &view, self.hint) {
                self.inner = Inner::of(system);
            } else if let (Direction::FromServer, Some(header)) = (chunk.direction, header) {
                if mysql::is_split_greeting(&header, view.start()) {
                    // The greeting's header came alone: replay it first.
                    self.inner = Inner::of(DbSystem::Mysql);
                    let first = Chunk::whole(Direction::FromServer, chunk.ts_ns, &header);
                    self.parse(&first, &View::new(&first), out);
                }
            }
            if let Inner::Detecting = self.inner {
                if chunk.direction == Direction::FromServer {
                    self.greeting_header = mysql::greeting_header(&view);
                }
                // Servers may stream a while (the agent came late during a
                // long response): client chunks count more.
                self.looked += match chunk.direction {
                    Direction::ToServer => DETECT_CHUNKS_MAX / DETECT_CLIENT_CHUNKS,
                    Direction::FromServer => 1,
                };
                if self.looked >= DETECT_CHUNKS_MAX {
                    self.inner = Inner::Other;
                    self.greeting_header = None;
                }
                return;
            }
        }
        self.parse(chunk, &view, out);
    }

    fn parse(&mut self, chunk: &Chunk<'_>, view: &View<'_>, out: &mut Vec<Observation>) {
        let before = out.len();
        let mut cx = FeedContext {
            ts: chunk.ts_ns,
            raw: self.raw,
            out,
        };
        if let Inner::Speaking(_, parser) = &mut self.inner {
            parser.feed(chunk.direction, view, &mut cx);
        }
        if self.raw {
            return;
        }
        // Error messages echo query literals: sanitized here, in one place
        // for all three protocols, like the query text.
        for observation in out.iter_mut().skip(before) {
            if let Observation::RoundTrip(RoundTrip {
                error: Some(error), ..
            }) = observation
            {
                error.message = super::sql::sanitize_error_message(&error.message);
            }
        }
    }
}

/// The protocol a connection's first chunks show. Connection starts
/// (PostgreSQL startup, MySQL greeting, a RESP command) are unambiguous;
/// requests seen mid-session (the agent started after the connection) are
/// checked strictly, the hinted protocol first.
fn detect(direction: Direction, view: &View<'_>, hint: Option<DbSystem>) -> Option<DbSystem> {
    let start = view.start();
    match direction {
        Direction::FromServer => mysql::is_greeting(start).then_some(DbSystem::Mysql),
        Direction::ToServer => {
            if postgres::is_startup(start) {
                return Some(DbSystem::Postgresql);
            }
            if is_tls_record(start) {
                // Direct TLS: PostgreSQL 17 and Redis can; MySQL greets first.
                return hint.filter(|h| *h != DbSystem::Mysql);
            }
            let order = [DbSystem::Redis, DbSystem::Postgresql, DbSystem::Mysql];
            let rest = order.into_iter().filter(|s| Some(*s) != hint);
            hint.into_iter().chain(rest).find(|s| match s {
                DbSystem::Redis => redis::is_request_start(start),
                DbSystem::Postgresql => postgres::is_request_start(view),
                DbSystem::Mysql => mysql::is_command_start(view),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testutil::*;

    /// The error message of the one round trip `d` saw.
    fn error_message(d: &Drive) -> String {
        let trips = d.round_trips();
        assert_eq!(trips.len(), 1, "{trips:?}");
        trips[0].error.clone().expect("an error").message
    }

    #[test]
    fn error_messages_are_sanitized_unless_raw() {
        for raw in [false, true] {
            let mut pg = Drive::new(Some(DbSystem::Postgresql));
            pg.parser.set_raw_queries(raw);
            pg.client(&pg_query("SELECT 's3cret'::int"));
            let mut resp = pg_error("22P02", "invalid input syntax for type integer: \"s3cret\"");
            resp.extend(pg_ready(b'I'));
            pg.server(&resp);

            let mut my = Drive::detect();
            my.parser.set_raw_queries(raw);
            my.server(&my_greeting());
            my.client(&my_handshake_response(MY_CAPS, "app", None));
            my.server(&my_ok(2, 0, 0x0002));
            my.take();
            my.client(&my_packet(0, &my_query("INSERT INTO t VALUES ('s3cret')")));
            my.server(&my_err(
                1,
                1062,
                "23000",
                "Duplicate entry 's3cret' for key 'PRIMARY'",
            ));

            let mut rd = Drive::new(Some(DbSystem::Redis));
            rd.parser.set_raw_queries(raw);
            rd.client(&resp_command(&["AUTHX", "s3cret"]));
            rd.server(b"-ERR unknown command 'AUTHX', with args beginning with: 's3cret' \r\n");

            for (d, sanitized) in [
                (&pg, "invalid input syntax for type integer: ?"),
                (&my, "Duplicate entry ?"),
                (&rd, "unknown command ?"),
            ] {
                let message = error_message(d);
                if raw {
                    assert!(message.contains("s3cret"), "{message:?}");
                } else {
                    assert!(message.ends_with(sanitized), "{message:?}");
                    assert!(!message.contains("s3cret"), "{message:?}");
                }
            }
        }
    }

    #[test]
    fn detection_by_first_bytes() {
        let cases: Vec<(Direction, Vec<u8>, Option<DbSystem>)> = vec![
            (
                Direction::ToServer,
                pg_startup("u", Some("db")),
                Some(DbSystem::Postgresql),
            ),
            (
                Direction::ToServer,
                pg_ssl_request(),
                Some(DbSystem::Postgresql),
            ),
            (Direction::FromServer, my_greeting(), Some(DbSystem::Mysql)),
            (
                Direction::ToServer,
                resp_command(&["PING"]),
                Some(DbSystem::Redis),
            ),
            (
                Direction::ToServer,
                b"PING\r\n".to_vec(),
                Some(DbSystem::Redis),
            ),
            (
                Direction::ToServer,
                pg_msg(b'Q', &cstring("SELECT 1")),
                Some(DbSystem::Postgresql),
            ),
            (
                Direction::ToServer,
                my_packet(0, &my_query("SELECT 1")),
                Some(DbSystem::Mysql),
            ),
            (
                Direction::ToServer,
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                None,
            ),
            (
                Direction::FromServer,
                b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
                None,
            ),
        ];
        for (dir, bytes, want) in cases {
            let mut p = SessionParser::new(None);
            let mut out = Vec::new();
            p.feed(&Chunk::whole(dir, 1, &bytes), &mut out);
            assert_eq!(p.system(), want, "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn greeting_read_in_two_calls_is_detected() {
        let greeting = my_greeting();
        let (header, payload) = greeting.split_at(4);
        let mut p = SessionParser::new(None);
        let mut out = Vec::new();
        p.feed(&Chunk::whole(Direction::FromServer, 1, header), &mut out);
        assert_eq!((p.system(), p.gave_up()), (None, false));
        p.feed(&Chunk::whole(Direction::FromServer, 2, payload), &mut out);
        assert_eq!(p.system(), Some(DbSystem::Mysql));
        let response = my_handshake_response(MY_CAPS, "app", Some("db"));
        p.feed(&Chunk::whole(Direction::ToServer, 3, &response), &mut out);
        assert_eq!(
            out,
            vec![Observation::Startup {
                user: Some("app".into()),
                database: Some("db".into())
            }]
        );

        // A header whose payload is not a greeting's detects nothing.
        let mut p = SessionParser::new(Some(3306));
        p.feed(&Chunk::whole(Direction::FromServer, 1, header), &mut out);
        p.feed(
            &Chunk::whole(Direction::FromServer, 2, &payload[1..]),
            &mut out,
        );
        assert_eq!(p.system(), None);
        // Nor does a payload whose header came with other bytes.
        let mut p = SessionParser::new(Some(3306));
        p.feed(
            &Chunk::whole(Direction::FromServer, 1, &greeting[..5]),
            &mut out,
        );
        p.feed(&Chunk::whole(Direction::FromServer, 2, payload), &mut out);
        assert_eq!(p.system(), None);
    }

    #[test]
    fn gives_up_after_a_few_client_chunks() {
        let mut p = SessionParser::new(None);
        let mut out = Vec::new();
        for i in 0..3 {
            p.feed(
                &Chunk::whole(Direction::ToServer, i, b"GET / HTTP/1.1\r\n\r\n"),
                &mut out,
            );
            assert!(!p.gave_up());
        }
        p.feed(
            &Chunk::whole(Direction::ToServer, 4, b"GET / HTTP/1.1\r\n\r\n"),
            &mut out,
        );
        assert!(p.gave_up());
        assert!(!SessionParser::for_system(DbSystem::Redis).gave_up());
    }

    #[test]
    fn not_a_database_goes_quiet() {
        let mut p = SessionParser::new(Some(5432));
        let mut out = Vec::new();
        for i in 0..10 {
            p.feed(
                &Chunk::whole(Direction::ToServer, i, b"greetings, friend\n"),
                &mut out,
            );
        }
        // Even a valid start is ignored once the parser gave up.
        p.feed(
            &Chunk::whole(Direction::ToServer, 11, &pg_startup("u", None)),
            &mut out,
        );
        assert_eq!((p.system(), out.len()), (None, 0));
    }

    #[test]
    fn direct_tls_needs_a_hint() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let mut out = Vec::new();
        let mut p = SessionParser::new(None);
        p.feed(&Chunk::whole(Direction::ToServer, 1, &hello), &mut out);
        assert_eq!(p.system(), None);
        let mut p = SessionParser::new(Some(5432));
        p.feed(&Chunk::whole(Direction::ToServer, 1, &hello), &mut out);
        assert_eq!(
            (p.system(), p.is_encrypted()),
            (Some(DbSystem::Postgresql), true)
        );
        assert_eq!(out, vec![Observation::Encrypted]);
        let mut p = SessionParser::new(Some(6380));
        p.feed(&Chunk::whole(Direction::ToServer, 1, &hello), &mut out);
        assert_eq!(p.system(), Some(DbSystem::Redis), "rediss' usual port");
    }
}
