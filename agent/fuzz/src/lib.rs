//! Turns fuzz input into a connection's chunks: each chunk is a control
//! byte (bit 0: direction, 0 to the server; bits 1-2: head size
//! 256/16/64/everything; bit 3: claim more bytes than were copied; bits
//! 4-7: high nibble of the length), a length byte, and up to 4095 bytes of
//! data. An input whose length is a multiple of 3 goes to a parser that
//! detects the protocol (hinted by the usual port); others to one preset to
//! the target's protocol. An odd length asks for raw query text.

use poolscope::protocol::{
    Chunk, DbSystem, Direction, Observation, SessionParser, ERROR_MESSAGE_MAX_CHARS,
    QUERY_MAX_CHARS,
};

/// Feeds `data`, cut into chunks, to a parser for `system`, and checks
/// what comes out. Panics (a finding) only on a broken invariant.
pub fn feed(system: DbSystem, data: &[u8]) {
    let detecting = data.len() % 3 == 0;
    let mut parser = if detecting {
        let port = match system {
            DbSystem::Postgresql => 5432,
            DbSystem::Mysql => 3306,
            DbSystem::Redis => 6379,
        };
        SessionParser::new(Some(port))
    } else {
        SessionParser::for_system(system)
    };
    parser.set_raw_queries(data.len() % 2 == 1);
    let mut out = Vec::new();
    let mut rest = data;
    let mut ts = 0u64;
    while let [ctl, len, tail @ ..] = rest {
        let len = (usize::from(*len) | usize::from(ctl >> 4) << 8).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        let direction = if ctl & 1 == 0 {
            Direction::ToServer
        } else {
            Direction::FromServer
        };
        let head_max = match (ctl >> 1) & 3 {
            0 => 256,
            1 => 16,
            2 => 64,
            _ => usize::MAX,
        };
        let mut chunk = Chunk::cut(direction, ts, bytes, head_max);
        if ctl & 8 != 0 {
            // Inconsistent lengths must be survived too.
            chunk.total_len = chunk
                .total_len
                .wrapping_mul(3)
                .wrapping_add(usize::from(*ctl));
        }
        parser.feed(&chunk, &mut out);
        check(&out);
        if parser.gave_up() {
            assert!(detecting && parser.system().is_none() && out.is_empty());
        }
        out.clear();
        ts += 1;
        rest = next;
    }
}

fn check(out: &[Observation]) {
    for o in out {
        if let Observation::RoundTrip(rt) = o {
            assert!(rt.end_ns >= rt.start_ns, "{rt:?}");
            let query = rt.query_text().unwrap_or_default();
            assert!(query.chars().count() <= QUERY_MAX_CHARS, "{rt:?}");
            if let Some(e) = &rt.error {
                assert!(
                    e.message.chars().count() <= ERROR_MESSAGE_MAX_CHARS,
                    "{rt:?}"
                );
            }
        }
    }
}
