//! Builders of protocol bytes and a driver for the parsers' tests.

use super::{Chunk, DbSystem, Direction, Observation, RoundTrip, SessionParser};

pub(crate) fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

// ---- PostgreSQL ----

pub(crate) fn pg_msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend(((body.len() + 4) as u32).to_be_bytes());
    v.extend(body);
    v
}

pub(crate) fn pg_startup(user: &str, database: Option<&str>) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend(cstring("user"));
    body.extend(cstring(user));
    if let Some(db) = database {
        body.extend(cstring("database"));
        body.extend(cstring(db));
    }
    body.extend(cstring("application_name"));
    body.extend(cstring("psql"));
    body.push(0);
    let mut v = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    v.extend(body);
    v
}

pub(crate) fn pg_ssl_request() -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend(80_877_103u32.to_be_bytes());
    v
}

pub(crate) fn pg_query(sql: &str) -> Vec<u8> {
    pg_msg(b'Q', &cstring(sql))
}

pub(crate) fn pg_parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = cstring(name);
    body.extend(cstring(sql));
    body.extend(0u16.to_be_bytes());
    pg_msg(b'P', &body)
}

pub(crate) fn pg_bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = cstring(portal);
    body.extend(cstring(statement));
    // No parameter formats, one text parameter "42", no result formats.
    body.extend(0u16.to_be_bytes());
    body.extend(1u16.to_be_bytes());
    body.extend(2u32.to_be_bytes());
    body.extend(b"42");
    body.extend(0u16.to_be_bytes());
    pg_msg(b'B', &body)
}

pub(crate) fn pg_execute(portal: &str) -> Vec<u8> {
    let mut body = cstring(portal);
    body.extend(0u32.to_be_bytes());
    pg_msg(b'E', &body)
}

pub(crate) fn pg_sync() -> Vec<u8> {
    pg_msg(b'S', &[])
}

pub(crate) fn pg_complete(tag: &str) -> Vec<u8> {
    pg_msg(b'C', &cstring(tag))
}

pub(crate) fn pg_ready(status: u8) -> Vec<u8> {
    pg_msg(b'Z', &[status])
}

pub(crate) fn pg_error(code: &str, message: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend(cstring("ERROR"));
    body.push(b'C');
    body.extend(cstring(code));
    body.push(b'M');
    body.extend(cstring(message));
    body.push(0);
    pg_msg(b'E', &body)
}

pub(crate) fn pg_data_row(value: &str) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend((value.len() as u32).to_be_bytes());
    body.extend(value.as_bytes());
    pg_msg(b'D', &body)
}

/// What a server sends after a successful startup.
pub(crate) fn pg_startup_ok() -> Vec<u8> {
    let mut v = pg_msg(b'R', &0u32.to_be_bytes());
    let mut status = cstring("server_version");
    status.extend(cstring("16.2"));
    v.extend(pg_msg(b'S', &status));
    v.extend(pg_msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
    v.extend(pg_ready(b'I'));
    v
}

// ---- MySQL ----

pub(crate) fn my_packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut v = len.to_le_bytes()[..3].to_vec();
    v.push(seq);
    v.extend(payload);
    v
}

pub(crate) const MY_CAPS: u32 = 0x0000_0200 // PROTOCOL_41
    | 0x0000_8000 // SECURE_CONNECTION
    | 0x0008_0000 // PLUGIN_AUTH
    | 0x0000_0008 // CONNECT_WITH_DB
    | 0x0100_0000; // DEPRECATE_EOF

pub(crate) fn my_greeting_caps(caps: u32) -> Vec<u8> {
    let mut p = vec![0x0a];
    p.extend(cstring("8.0.36"));
    p.extend(42u32.to_le_bytes());
    p.extend(b"abcdefgh");
    p.push(0);
    p.extend((caps as u16).to_le_bytes());
    p.push(0xff);
    p.extend(2u16.to_le_bytes());
    p.extend(((caps >> 16) as u16).to_le_bytes());
    p.push(21);
    p.extend([0u8; 10]);
    p.extend(b"ijklmnopqrst\0");
    p.extend(cstring("caching_sha2_password"));
    my_packet(0, &p)
}

pub(crate) fn my_greeting() -> Vec<u8> {
    my_greeting_caps(MY_CAPS | 0x0800)
}

pub(crate) fn my_handshake_response(caps: u32, user: &str, db: Option<&str>) -> Vec<u8> {
    let caps = if db.is_some() {
        caps | 0x08
    } else {
        caps & !0x08
    };
    let mut p = caps.to_le_bytes().to_vec();
    p.extend(16_777_216u32.to_le_bytes());
    p.push(255);
    p.extend([0u8; 23]);
    p.extend(cstring(user));
    p.push(20);
    p.extend([7u8; 20]);
    if let Some(db) = db {
        p.extend(cstring(db));
    }
    p.extend(cstring("caching_sha2_password"));
    my_packet(1, &p)
}

pub(crate) fn my_ssl_request(caps: u32) -> Vec<u8> {
    let mut p = (caps | 0x0800).to_le_bytes().to_vec();
    p.extend(16_777_216u32.to_le_bytes());
    p.push(255);
    p.extend([0u8; 23]);
    my_packet(1, &p)
}

pub(crate) fn my_query(sql: &str) -> Vec<u8> {
    let mut p = vec![0x03];
    p.extend(sql.as_bytes());
    p
}

pub(crate) fn my_ok(seq: u8, affected: u8, status: u16) -> Vec<u8> {
    let mut p = vec![0x00, affected, 0];
    p.extend(status.to_le_bytes());
    p.extend(0u16.to_le_bytes());
    my_packet(seq, &p)
}

/// The OK that ends a result set under CLIENT_DEPRECATE_EOF.
pub(crate) fn my_eof_ok(seq: u8, status: u16) -> Vec<u8> {
    let mut p = vec![0xfe, 0, 0];
    p.extend(status.to_le_bytes());
    p.extend(0u16.to_le_bytes());
    my_packet(seq, &p)
}

/// A classic EOF packet.
pub(crate) fn my_eof(seq: u8, status: u16) -> Vec<u8> {
    let mut p = vec![0xfe, 0, 0];
    p.extend(status.to_le_bytes());
    my_packet(seq, &p)
}

pub(crate) fn my_err(seq: u8, code: u16, state: &str, message: &str) -> Vec<u8> {
    let mut p = vec![0xff];
    p.extend(code.to_le_bytes());
    p.push(b'#');
    p.extend(state.as_bytes());
    p.extend(message.as_bytes());
    my_packet(seq, &p)
}

fn lenenc_str(s: &str) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend(s.as_bytes());
    v
}

/// A text result set with one column and the given rows.
pub(crate) fn my_result_set(rows: &[&str], deprecate_eof: bool, status: u16) -> Vec<u8> {
    let mut v = my_packet(1, &[1]);
    v.extend(my_packet(2, &my_column_def("c")));
    let mut seq = 3u8;
    if !deprecate_eof {
        v.extend(my_eof(seq, status));
        seq += 1;
    }
    for row in rows {
        v.extend(my_packet(seq, &lenenc_str(row)));
        seq = seq.wrapping_add(1);
    }
    if deprecate_eof {
        v.extend(my_eof_ok(seq, status));
    } else {
        v.extend(my_eof(seq, status));
    }
    v
}

fn my_column_def(name: &str) -> Vec<u8> {
    let mut def = Vec::new();
    for part in ["def", "db", "t", "t", name, name] {
        def.extend(lenenc_str(part));
    }
    def.extend([0x0c, 33, 0, 0, 0, 1, 0xfd, 0, 0, 0, 0, 0]);
    def
}

/// COM_STMT_PREPARE's response: the OK (statement `id`), the parameter
/// definitions, then the column definitions, each group followed by an EOF
/// unless `deprecate_eof`.
pub(crate) fn my_prepare_ok(id: u32, params: u16, columns: u16, deprecate_eof: bool) -> Vec<u8> {
    let mut ok = vec![0x00];
    ok.extend(id.to_le_bytes());
    ok.extend(columns.to_le_bytes());
    ok.extend(params.to_le_bytes());
    ok.extend([0, 0, 0]);
    let mut v = my_packet(1, &ok);
    let mut seq = 2u8;
    for n in [params, columns] {
        for i in 0..n {
            v.extend(my_packet(seq, &my_column_def(&format!("c{i}"))));
            seq = seq.wrapping_add(1);
        }
        if n > 0 && !deprecate_eof {
            v.extend(my_eof(seq, 0x0002));
            seq = seq.wrapping_add(1);
        }
    }
    v
}

/// COM_STMT_EXECUTE of statement `id` with one integer parameter.
pub(crate) fn my_execute(id: u32, param: u32) -> Vec<u8> {
    let mut p = vec![0x17];
    p.extend(id.to_le_bytes());
    // No cursor, iteration count 1, NULL bitmap, new-params-bound, LONG.
    p.extend([0, 1, 0, 0, 0, 0, 1, 3, 0]);
    p.extend(param.to_le_bytes());
    my_packet(0, &p)
}

/// A binary result set (COM_STMT_EXECUTE's) with one column and the given
/// rows.
pub(crate) fn my_binary_result_set(rows: &[&str], deprecate_eof: bool, status: u16) -> Vec<u8> {
    let mut v = my_packet(1, &[1]);
    v.extend(my_packet(2, &my_column_def("c")));
    let mut seq = 3u8;
    if !deprecate_eof {
        v.extend(my_eof(seq, status));
        seq += 1;
    }
    for row in rows {
        // Header 0x00, a NULL bitmap of (columns + 7 + 2) / 8 bytes, values.
        let mut p = vec![0x00, 0x00];
        p.extend(lenenc_str(row));
        v.extend(my_packet(seq, &p));
        seq = seq.wrapping_add(1);
    }
    if deprecate_eof {
        v.extend(my_eof_ok(seq, status));
    } else {
        v.extend(my_eof(seq, status));
    }
    v
}

/// The reads of a client that reads each packet's 4-byte header and then
/// its payload (mysql-connector-python): `stream` cut into those pieces.
pub(crate) fn my_reads(stream: &[u8]) -> Vec<&[u8]> {
    let mut reads = Vec::new();
    let mut rest = stream;
    while rest.len() >= 4 {
        let len = usize::from(rest[0]) | usize::from(rest[1]) << 8 | usize::from(rest[2]) << 16;
        let (header, after) = rest.split_at(4);
        let (payload, after) = after.split_at(len.min(after.len()));
        reads.push(header);
        if !payload.is_empty() {
            reads.push(payload);
        }
        rest = after;
    }
    if !rest.is_empty() {
        reads.push(rest);
    }
    reads
}

// ---- Redis ----

pub(crate) fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend(format!("${}\r\n{}\r\n", a.len(), a).into_bytes());
    }
    v
}

// ---- driving ----

/// Feeds chunks to a parser and collects what it says.
pub(crate) struct Drive {
    pub(crate) parser: SessionParser,
    pub(crate) out: Vec<Observation>,
    pub(crate) ts: u64,
    pub(crate) head_max: usize,
}

impl Drive {
    pub(crate) fn new(system: Option<DbSystem>) -> Self {
        let parser = match system {
            Some(s) => SessionParser::for_system(s),
            None => SessionParser::new(None),
        };
        Drive {
            parser,
            out: Vec::new(),
            ts: 0,
            head_max: usize::MAX,
        }
    }

    pub(crate) fn detect() -> Self {
        Drive::new(None)
    }

    /// One syscall's bytes, cut as the kernel would with `head_max`.
    pub(crate) fn send(&mut self, direction: Direction, data: &[u8]) -> &mut Self {
        self.ts += 1000;
        let chunk = Chunk::cut(direction, self.ts, data, self.head_max);
        self.parser.feed(&chunk, &mut self.out);
        self
    }

    pub(crate) fn client(&mut self, data: &[u8]) -> &mut Self {
        self.send(Direction::ToServer, data)
    }

    pub(crate) fn server(&mut self, data: &[u8]) -> &mut Self {
        self.send(Direction::FromServer, data)
    }

    /// `data` read by the client packet by packet, header and payload apart
    /// (MySQL).
    pub(crate) fn server_reads(&mut self, data: &[u8]) -> &mut Self {
        for read in my_reads(data) {
            self.server(read);
        }
        self
    }

    pub(crate) fn round_trips(&self) -> Vec<RoundTrip> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Observation::RoundTrip(rt) => Some(rt.clone()),
                _ => None,
            })
            .collect()
    }

    /// Observations other than round trips.
    pub(crate) fn others(&self) -> Vec<Observation> {
        self.out
            .iter()
            .filter(|o| !matches!(o, Observation::RoundTrip(_)))
            .cloned()
            .collect()
    }

    pub(crate) fn take(&mut self) -> Vec<RoundTrip> {
        let rts = self.round_trips();
        self.out.clear();
        rts
    }
}

/// Pseudo-random bytes (xorshift) for garbage tests.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The robustness check every parser gets: `stream` (a conversation that
/// `first` opens) cut at every byte, fed in both orders with small head
/// limits (`head_limits`: what the kernel copies), then 200 conversations
/// of seeded noise (`noise_seed`: multipliers for the seed and the length,
/// so that each protocol sees other bytes). Passing means not panicking;
/// what the parser makes of it is the other tests' business.
pub(crate) fn feed_truncated_and_random(
    system: DbSystem,
    first: Direction,
    stream: &[u8],
    head_limits: [usize; 4],
    noise_seed: (u64, usize),
) {
    let other = match first {
        Direction::ToServer => Direction::FromServer,
        Direction::FromServer => Direction::ToServer,
    };
    for cut in 0..stream.len() {
        for head_max in head_limits {
            let mut d = Drive::new(Some(system));
            d.head_max = head_max;
            d.send(first, &stream[..cut]);
            d.send(other, &stream[cut..]);
            d.send(first, &stream[cut..]);
            d.send(other, &stream[..cut]);
        }
    }
    let (seed_mul, len_mul) = noise_seed;
    for seed in 1..200u64 {
        let mut d = Drive::new(Some(system));
        d.head_max = 64;
        for i in 0..8u64 {
            let bytes = noise(seed * seed_mul + i, (seed as usize * len_mul) % 300);
            d.send(if i % 2 == 0 { first } else { other }, &bytes);
        }
    }
}
