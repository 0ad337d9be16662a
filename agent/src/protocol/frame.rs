//! From chunks to messages, for the protocols whose messages announce their
//! length in a fixed header (PostgreSQL, MySQL). Also the view of a chunk
//! with its unknown middle, which the RESP reader uses too.

use super::{Chunk, Observation};

/// Bytes of a message body kept for the parser; the rest is skipped. Enough
/// for any query text the head can hold, and bounded per connection.
pub(crate) const KEEP_MAX: usize = 4096;

/// How far back from a chunk's end to look for its last messages. A chunk
/// cut by the kernel ends in a tail of [`super::TAIL_MAX`] bytes; a chunk
/// held whole may be longer, and scanning all of it would not pay.
const SUFFIX_SCAN: usize = 512;

/// Carry buffers up to this capacity are reused; larger ones are freed, so
/// that an idle connection holds little.
const CARRY_RECYCLE: usize = 512;

/// A chunk as positions `0..total`: bytes `0..first.len()` and
/// `tail_start..total` are known, the rest is not.
pub(crate) struct View<'a> {
    first: Run<'a>,
    tail: &'a [u8],
    tail_start: usize,
    total: usize,
}

/// Head and tail that meet, joined on the stack when they are short (the
/// default capture), without an allocation per chunk.
const INLINE_MAX: usize = super::DEFAULT_HEAD_MAX + super::TAIL_MAX;

/// The first run of known bytes. (A `View` lives on the stack for one
/// chunk: its size is the point.)
#[allow(clippy::large_enum_variant)]
enum Run<'a> {
    Borrowed(&'a [u8]),
    Inline([u8; INLINE_MAX], usize),
    Owned(Vec<u8>),
}

impl Run<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Run::Borrowed(b) => b,
            Run::Inline(buf, len) => buf.get(..*len).unwrap_or_default(),
            Run::Owned(v) => v,
        }
    }

    fn joined<'a>(head: &[u8], tail: &[u8]) -> Run<'a> {
        let len = head.len() + tail.len();
        if len <= INLINE_MAX {
            let mut buf = [0u8; INLINE_MAX];
            if let Some(dst) = buf.get_mut(..head.len()) {
                dst.copy_from_slice(head);
            }
            if let Some(dst) = buf.get_mut(head.len()..len) {
                dst.copy_from_slice(tail);
            }
            Run::Inline(buf, len)
        } else {
            let mut all = Vec::with_capacity(len);
            all.extend_from_slice(head);
            all.extend_from_slice(tail);
            Run::Owned(all)
        }
    }
}

impl<'a> View<'a> {
    pub(crate) fn new(chunk: &Chunk<'a>) -> Self {
        let known = chunk.head.len().saturating_add(chunk.tail.len());
        let total = chunk.total_len.max(known);
        if chunk.tail.is_empty() {
            View {
                first: Run::Borrowed(chunk.head),
                tail: &[],
                tail_start: total,
                total,
            }
        } else if known == total {
            // Head and tail meet: one contiguous run is simpler to frame.
            View {
                first: Run::joined(chunk.head, chunk.tail),
                tail: &[],
                tail_start: total,
                total,
            }
        } else {
            View {
                first: Run::Borrowed(chunk.head),
                tail: chunk.tail,
                tail_start: total - chunk.tail.len(),
                total,
            }
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Known bytes from `pos` up to the end of the run holding it; empty when
    /// `pos` is unknown or past the end.
    pub(crate) fn from(&self, pos: usize) -> &[u8] {
        if let Some(run) = self.first.bytes().get(pos..) {
            if !run.is_empty() {
                return run;
            }
        }
        match pos.checked_sub(self.tail_start) {
            Some(off) => self.tail.get(off..).unwrap_or_default(),
            None => &[],
        }
    }

    /// The known bytes that end the chunk, with the position of the first.
    pub(crate) fn suffix(&self) -> (usize, &[u8]) {
        let first = self.first.bytes();
        if first.len() >= self.total {
            (0, first)
        } else {
            (self.tail_start, self.tail)
        }
    }

    /// The first known bytes of the chunk.
    pub(crate) fn start(&self) -> &[u8] {
        self.first.bytes()
    }
}

/// One message as the framer saw it.
pub(crate) struct Msg<'m> {
    pub(crate) header: &'m [u8],
    /// The known start of the body, at most [`KEEP_MAX`] bytes.
    pub(crate) body: &'m [u8],
    /// The length the header announced.
    pub(crate) body_len: usize,
}

/// What a message handler asks of the framer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// The rest of the chunk is not framed this way (e.g. TLS follows).
    Stop,
}

/// How a chunk ended for the framer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fed {
    /// Framing holds at the chunk's end.
    Framed,
    /// Framing was lost at this position (an unknown or invalid header).
    LostAt(usize),
    /// Framing had been lost before this chunk; nothing was parsed.
    StillLost,
}

/// Header layout: its size, and the body length it announces, or `None`
/// when these bytes cannot start a message.
pub(crate) struct Wire {
    pub(crate) header_len: usize,
    pub(crate) body_len: fn(&[u8]) -> Option<usize>,
}

impl Wire {
    /// Body length announced by `header`, if it can start a message.
    pub(crate) fn announced(&self, header: &[u8]) -> Option<usize> {
        (self.body_len)(header)
    }
}

/// Per-direction framing state carried from chunk to chunk.
#[derive(Default)]
pub(crate) struct Framer {
    /// The start of a message the chunk ended in, kept until its header and
    /// kept body are whole (at most header + [`KEEP_MAX`] bytes).
    carry: Vec<u8>,
    /// Body length of the carried message once its header is whole.
    carry_body: Option<usize>,
    /// Header length of the wire last framed.
    header_len: usize,
    /// Bytes of the current message still to pass before the next starts.
    skip: u64,
    lost: bool,
}

impl Framer {
    pub(crate) fn is_lost(&self) -> bool {
        self.lost
    }

    /// Bytes still to come of a message that outlived the last chunk (0 if
    /// unknown: its header is cut).
    pub(crate) fn remaining(&self) -> u64 {
        match self.carry_body {
            Some(body) => (self.header_len + body).saturating_sub(self.carry.len()) as u64,
            None => self.skip,
        }
    }

    /// The last chunk ended inside a message.
    pub(crate) fn mid_message(&self) -> bool {
        self.skip > 0 || !self.carry.is_empty()
    }

    /// Forget everything: the next chunk starts a message.
    pub(crate) fn resync(&mut self) {
        *self = Framer::default();
    }

    /// The next `n` bytes belong to something framed elsewhere (a
    /// PostgreSQL startup message): pass over them.
    pub(crate) fn pass(&mut self, n: usize) {
        self.skip = self.skip.saturating_add(n as u64);
    }

    fn lose(&mut self, at: usize) -> Fed {
        *self = Framer {
            lost: true,
            ..Framer::default()
        };
        Fed::LostAt(at)
    }

    /// Frames one chunk, handing each message to `on_msg` in order.
    pub(crate) fn feed(
        &mut self,
        view: &View<'_>,
        wire: &Wire,
        mut on_msg: impl FnMut(&Msg<'_>) -> Flow,
    ) -> Fed {
        if self.lost {
            return Fed::StillLost;
        }
        let total = view.total();
        let hdr = wire.header_len;
        self.header_len = hdr;
        let mut pos = 0usize;
        if self.skip > 0 {
            match usize::try_from(self.skip) {
                Ok(skip) if skip < total => {
                    pos = skip;
                    self.skip = 0;
                }
                _ => {
                    self.skip -= total as u64;
                    return Fed::Framed;
                }
            }
        }
        if !self.carry.is_empty() {
            match self.finish_carry(view, wire, &mut pos, &mut on_msg) {
                Some(fed) => return fed,
                None if self.skip > 0 => return Fed::Framed,
                None => {}
            }
        }
        while pos < total {
            let avail = view.from(pos);
            if avail.len() < hdr {
                if pos + avail.len() == total {
                    self.carry.extend_from_slice(avail);
                    return Fed::Framed;
                }
                return self.lose(pos);
            }
            let Some(body_len) = wire.announced(&avail[..hdr]) else {
                return self.lose(pos);
            };
            let keep = body_len.min(KEEP_MAX);
            let end = pos.saturating_add(hdr).saturating_add(body_len);
            if avail.len() < hdr + keep && pos + avail.len() == total {
                // The kept part goes on in the next chunk: wait for it.
                self.carry.extend_from_slice(avail);
                self.carry_body = Some(body_len);
                return Fed::Framed;
            }
            let known = avail.len().min(hdr + keep);
            let msg = Msg {
                header: &avail[..hdr],
                body: &avail[hdr..known],
                body_len,
            };
            if on_msg(&msg) == Flow::Stop {
                self.resync();
                return Fed::Framed;
            }
            if end >= total {
                self.skip = (end - total) as u64;
                return Fed::Framed;
            }
            pos = end;
        }
        Fed::Framed
    }

    /// Completes the carried message from the start of this chunk. Returns
    /// `Some` when the chunk is used up, `None` to go on framing at `pos`
    /// (or to keep skipping, when `self.skip` was set).
    fn finish_carry(
        &mut self,
        view: &View<'_>,
        wire: &Wire,
        pos: &mut usize,
        on_msg: &mut impl FnMut(&Msg<'_>) -> Flow,
    ) -> Option<Fed> {
        let total = view.total();
        let hdr = wire.header_len;
        loop {
            let want = match self.carry_body {
                Some(body) => hdr + body.min(KEEP_MAX),
                None => hdr,
            };
            let avail = view.from(*pos);
            let take = avail.len().min(want.saturating_sub(self.carry.len()));
            self.carry.extend_from_slice(&avail[..take]);
            *pos += take;
            if self.carry.len() < want {
                if *pos >= total {
                    return Some(Fed::Framed);
                }
                if self.carry_body.is_none() {
                    // The header runs into the unknown middle.
                    return Some(self.lose(*pos));
                }
                // The body runs into the unknown middle: hand on what we have.
            }
            let Some(body_len) = self.carry_body else {
                let header = self.carry.get(..hdr).unwrap_or_default();
                match wire.announced(header) {
                    Some(body) => {
                        self.carry_body = Some(body);
                        continue;
                    }
                    None => return Some(self.lose(0)),
                }
            };
            let carry = std::mem::take(&mut self.carry);
            self.carry_body = None;
            let had = carry.len() - hdr;
            let rest = body_len - had;
            let end = pos.saturating_add(rest);
            let msg = Msg {
                header: carry.get(..hdr).unwrap_or_default(),
                body: carry.get(hdr..).unwrap_or_default(),
                body_len,
            };
            let fed = if on_msg(&msg) == Flow::Stop {
                self.resync();
                Some(Fed::Framed)
            } else if end >= total {
                self.skip = (end - total) as u64;
                Some(Fed::Framed)
            } else {
                *pos = end;
                None
            };
            self.recycle(carry);
            return fed;
        }
    }

    /// Keeps a small carry buffer for the next message that outlives its
    /// chunk (a client reading packet headers apart carries every packet).
    fn recycle(&mut self, mut carry: Vec<u8>) {
        if carry.capacity() <= CARRY_RECYCLE && self.carry.is_empty() {
            carry.clear();
            self.carry = carry;
        }
    }
}

/// The last messages of a chunk, found backwards from its end: each must be
/// accepted whole by `accept` (which checks that the announced length matches
/// the candidate's size). Returns them in stream order, empty when the chunk
/// does not end with an accepted message. Only bytes from position `from`
/// on are considered.
pub(crate) fn last_messages<'v>(
    view: &'v View<'_>,
    from: usize,
    header_len: usize,
    accept: impl Fn(&[u8]) -> bool,
) -> Vec<&'v [u8]> {
    let (start, suffix) = view.suffix();
    let skip = from.saturating_sub(start);
    let suffix = suffix.get(skip..).unwrap_or_default();
    let floor = suffix.len().saturating_sub(SUFFIX_SCAN);
    let mut found = Vec::new();
    let mut end = suffix.len();
    // A handful is all a response's end needs (e.g. CommandComplete,
    // CommandComplete, ReadyForQuery).
    while found.len() < 8 && end >= floor + header_len {
        let Some(msg) = (floor..=end - header_len)
            .rev()
            .filter_map(|s| suffix.get(s..end))
            .find(|m| accept(m))
        else {
            break;
        };
        end -= msg.len();
        found.push(msg);
    }
    found.reverse();
    found
}

/// One direction of a length-prefixed protocol: its framer, and the rules
/// for losing framing, reading a chunk's end from its tail, and finding
/// framing again.
#[derive(Default)]
pub(crate) struct FramedDirection {
    framer: Framer,
    report: FramingLoss,
}

/// `Lost` once per loss of framing, `Resynced` when found again.
#[derive(Default)]
pub(crate) struct FramingLoss {
    /// `Lost` was reported and `Resynced` not yet.
    lost: bool,
}

impl FramingLoss {
    pub(crate) fn lost(&mut self, reason: &'static str, out: &mut Vec<Observation>) {
        if !self.lost {
            self.lost = true;
            out.push(Observation::Lost { reason });
        }
    }

    pub(crate) fn framed(&mut self, out: &mut Vec<Observation>) {
        if self.lost {
            self.lost = false;
            out.push(Observation::Resynced);
        }
    }
}

/// What [`FramedDirection::feed`] saw beyond the messages it handed on.
pub(crate) struct Ending<'v> {
    /// Messages read back from the chunk's tail, in order, for the caller to
    /// handle after the framed ones.
    pub(crate) tail: Vec<&'v [u8]>,
    /// Framing was lost in this chunk: messages may have gone unseen.
    pub(crate) missed: bool,
    /// Framing is lost at the chunk's end.
    lost: bool,
    /// A message announced more bytes than came before the response's end.
    overran: bool,
}

impl FramedDirection {
    pub(crate) fn is_lost(&self) -> bool {
        self.framer.is_lost()
    }

    /// The last chunk ended inside a message.
    pub(crate) fn mid_message(&self) -> bool {
        self.framer.mid_message()
    }

    /// Frame the next chunk from its start (the other side moved on).
    pub(crate) fn resync(&mut self) {
        self.framer.resync();
    }

    /// The next `n` bytes are framed elsewhere (a PostgreSQL startup).
    pub(crate) fn pass(&mut self, n: usize) {
        self.framer.pass(n);
    }

    /// Whether to frame a client chunk. Lost framing, or a length that would
    /// swallow the whole chunk, gives way to a chunk that `starts` like a
    /// request: clients write whole requests, so a write usually starts one.
    pub(crate) fn admit(
        &mut self,
        view: &View<'_>,
        starts: impl Fn(&View<'_>) -> bool,
        out: &mut Vec<Observation>,
    ) -> bool {
        let rest = self.framer.remaining();
        let swallowed = rest > 0 && rest >= view.total() as u64;
        if !self.framer.is_lost() && !swallowed {
            return true;
        }
        if !starts(view) {
            return !self.framer.is_lost();
        }
        if swallowed {
            self.report
                .lost("request shorter than its announced length", out);
        }
        self.framer.resync();
        true
    }

    /// Frames a chunk. Where framing cannot see the chunk's end (lost in the
    /// unseen middle, or inside a long message), its tail is read backwards
    /// with `accept` (whole messages that can end a response or request).
    /// Inside a long message, the tail counts only if its last message
    /// `ends` a response: then that message had overrun the response.
    pub(crate) fn feed<'v>(
        &mut self,
        view: &'v View<'_>,
        wire: &Wire,
        accept: fn(&[u8]) -> bool,
        ends: fn(&[u8]) -> bool,
        on_msg: impl FnMut(&Msg<'_>) -> Flow,
    ) -> Ending<'v> {
        let mut ending = Ending {
            tail: Vec::new(),
            missed: false,
            lost: false,
            overran: false,
        };
        let from = match self.framer.feed(view, wire, on_msg) {
            Fed::Framed if !self.framer.mid_message() => return ending,
            Fed::Framed => None,
            Fed::LostAt(at) => {
                ending.missed = true;
                Some(at)
            }
            Fed::StillLost => Some(0),
        };
        let tail = last_messages(view, from.unwrap_or(0), wire.header_len, accept);
        match from {
            None if !tail.last().is_some_and(|m| ends(m)) => return ending,
            None => ending.overran = true,
            Some(_) if tail.is_empty() => {
                ending.lost = true;
                return ending;
            }
            Some(_) => {}
        }
        self.framer.resync();
        ending.tail = tail;
        ending
    }

    /// Reports what `ending` means for framing (`Lost` once, `Resynced`
    /// when found again) and hands back its tail messages.
    pub(crate) fn report<'v>(
        &mut self,
        ending: Ending<'v>,
        gap_reason: &'static str,
        out: &mut Vec<Observation>,
    ) -> Vec<&'v [u8]> {
        if ending.overran {
            self.report
                .lost("message shorter than its announced length", out);
        }
        if ending.lost {
            self.report.lost(gap_reason, out);
        } else {
            self.report.framed(out);
        }
        ending.tail
    }
}

/// A whole message found in a chunk's tail, as the framer would hand it.
pub(crate) fn whole_msg(m: &[u8], header_len: usize) -> Msg<'_> {
    let (header, body) = m.split_at(m.len().min(header_len));
    Msg {
        header,
        body,
        body_len: body.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Direction;

    // 1-byte type + 1-byte body length, for framing tests.
    fn tiny(h: &[u8]) -> Option<usize> {
        match h {
            [b'm', n] => Some(usize::from(*n)),
            _ => None,
        }
    }
    const TINY: Wire = Wire {
        header_len: 2,
        body_len: tiny,
    };

    fn frame_all(framer: &mut Framer, chunk: &Chunk<'_>) -> (Vec<Vec<u8>>, Fed) {
        let view = View::new(chunk);
        let mut got = Vec::new();
        let fed = framer.feed(&view, &TINY, |m| {
            got.push(m.body.to_vec());
            Flow::Continue
        });
        (got, fed)
    }

    #[test]
    fn messages_split_anywhere_come_out_whole() {
        let stream = b"m\x03abcm\x00m\x02xy";
        for cut in 0..=stream.len() {
            let mut framer = Framer::default();
            let (mut a, fa) = frame_all(
                &mut framer,
                &Chunk::whole(Direction::FromServer, 0, &stream[..cut]),
            );
            let (b, fb) = frame_all(
                &mut framer,
                &Chunk::whole(Direction::FromServer, 0, &stream[cut..]),
            );
            a.extend(b);
            assert_eq!(
                a,
                vec![b"abc".to_vec(), vec![], b"xy".to_vec()],
                "cut {cut}"
            );
            assert_eq!((fa, fb), (Fed::Framed, Fed::Framed));
        }
    }

    #[test]
    fn a_message_ending_in_the_tail_keeps_framing() {
        // One long message from the head into the tail, then a short one.
        let mut data = vec![b'm', 200];
        data.extend([b'.'; 200]);
        data.extend(b"m\x01z");
        let mut framer = Framer::default();
        let (got, fed) = frame_all(
            &mut framer,
            &Chunk::cut(Direction::FromServer, 0, &data, 16),
        );
        assert_eq!(fed, Fed::Framed);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], b"z".to_vec());
    }

    #[test]
    fn head_and_tail_that_meet_are_joined() {
        // Short (joined on the stack) and long (joined on the heap).
        for (count, head_max) in [(60, 256), (830, 4096)] {
            let mut data = Vec::new();
            for _ in 0..count {
                data.extend(b"m\x03abc");
            }
            let chunk = Chunk::cut(Direction::FromServer, 0, &data, head_max);
            assert!(!chunk.tail.is_empty());
            let mut framer = Framer::default();
            let (got, fed) = frame_all(&mut framer, &chunk);
            assert_eq!((got.len(), fed), (count, Fed::Framed));
            assert_eq!(View::new(&chunk).suffix(), (0, &data[..]));
        }
    }

    #[test]
    fn a_boundary_in_the_unknown_middle_loses_framing() {
        let mut data = Vec::new();
        for _ in 0..50 {
            data.extend(b"m\x03abc");
        }
        let mut framer = Framer::default();
        let (_, fed) = frame_all(
            &mut framer,
            &Chunk::cut(Direction::FromServer, 0, &data, 16),
        );
        assert!(matches!(fed, Fed::LostAt(_)));
        let (got, fed) = frame_all(
            &mut framer,
            &Chunk::whole(Direction::FromServer, 0, b"m\x00"),
        );
        assert_eq!((got.len(), fed), (0, Fed::StillLost));
    }

    #[test]
    fn last_messages_reads_back_from_the_end() {
        let mut data = vec![b'm', 250];
        data.extend([b'm'; 250]);
        data.extend(b"m\x01zm\x02ok");
        let chunk = Chunk::cut(Direction::FromServer, 0, &data, 16);
        let view = View::new(&chunk);
        let accept = |m: &[u8]| {
            m.len() >= 2 && m[0] == b'm' && usize::from(m[1]) + 2 == m.len() && m.len() < 5
        };
        let found = last_messages(&view, 0, 2, accept);
        assert_eq!(found, vec![&b"m\x01z"[..], &b"m\x02ok"[..]]);
    }

    #[test]
    fn inconsistent_chunks_do_not_panic() {
        let chunk = Chunk {
            direction: Direction::ToServer,
            ts_ns: 0,
            head: b"m\x05ab",
            tail: b"cdm",
            total_len: 1,
        };
        let mut framer = Framer::default();
        let _ = frame_all(&mut framer, &chunk);
        let view = View::new(&chunk);
        assert_eq!(view.total(), 7);
        let _ = last_messages(&view, 100, 2, |_| true);
    }
}
