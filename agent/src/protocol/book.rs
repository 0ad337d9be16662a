//! Bookkeeping every protocol parser shares: the requests waiting for
//! their responses, how a finished round trip is reported, maps bounded
//! per connection, and the timing of encrypted sessions by turns.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use super::frame::View;
use super::{DbError, Direction, Observation, RoundTrip, TxState};

/// Requests waiting for a response, per connection. A client that pipelines
/// more than this without reading is not one we can follow.
const MAX_PENDING: usize = 1024;

/// One database protocol's parser of one connection: what the dispatcher
/// (`session`) needs from it, so that it knows nothing of the parsers'
/// insides.
pub(crate) trait Protocol {
    /// Parses one chunk of `direction`; what completes goes to `cx.out`.
    fn feed(&mut self, direction: Direction, view: &View<'_>, cx: &mut FeedContext<'_>);
    /// The session switched to TLS (or GSSAPI encryption).
    fn encrypted(&self) -> bool;
    /// Transaction status after the last response that told it.
    fn tx_state(&self) -> Option<TxState>;
    /// A request went out and the end of its response has not come back.
    fn request_outstanding(&self) -> bool;
    /// A hooked TLS library's plaintext follows the encrypted bytes: true
    /// when this parser goes on from where the encryption began (the
    /// session's start so far is needed), false when the dispatcher should
    /// start the session afresh from its first plaintext message.
    fn plaintext_follows(&mut self) -> bool {
        false
    }
}

/// What one feed needs besides the bytes.
pub(crate) struct FeedContext<'o> {
    pub(crate) ts: u64,
    pub(crate) raw: bool,
    pub(crate) out: &'o mut Vec<Observation>,
}

/// A request waiting for (or receiving) its response.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) start_ns: u64,
    pub(crate) operation: Option<String>,
    pub(crate) query: Option<super::QueryText>,
    pub(crate) error: Option<DbError>,
    pub(crate) rows: Option<u64>,
    pub(crate) prepared: bool,
    /// Answered but not worth reporting (a bare PostgreSQL Sync).
    pub(crate) silent: bool,
    /// PostgreSQL: an extended-protocol batch not yet closed by Sync.
    pub(crate) open: bool,
    /// Protocol-specific class of the request (MySQL command byte, Redis
    /// command class).
    pub(crate) kind: u8,
    /// Protocol-specific argument kept for the response (a database name).
    pub(crate) note: Option<String>,
}

impl Pending {
    pub(crate) fn new(start_ns: u64) -> Self {
        Pending {
            start_ns,
            ..Pending::default()
        }
    }

    /// Keeps the first error: later ones are consequences.
    pub(crate) fn set_error(&mut self, error: DbError) {
        self.error.get_or_insert(error);
    }

    pub(crate) fn add_rows(&mut self, n: u64) {
        self.rows = Some(self.rows.unwrap_or(0).saturating_add(n));
    }
}

/// Requests in the order sent; responses answer the oldest (all three
/// protocols answer in order).
#[derive(Default)]
pub(crate) struct RequestQueue {
    pending: VecDeque<Pending>,
    /// Set while requests may have gone unseen (the client's framing was
    /// lost): answers with nothing pending are then round trips of unknown
    /// requests that started at this time.
    orphan_start: Option<u64>,
    last_server_ns: Option<u64>,
}

impl RequestQueue {
    pub(crate) fn push(&mut self, p: Pending, out: &mut Vec<Observation>) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            out.push(Observation::Lost {
                reason: "too many requests without a response",
            });
        }
        self.pending.push_back(p);
    }

    /// The request the response being read answers: the oldest, or an
    /// unseen one while requests may have been missed.
    pub(crate) fn front_mut(&mut self) -> Option<&mut Pending> {
        if self.pending.is_empty() {
            let orphan = self.orphan_start?;
            self.pending.push_back(Pending::new(orphan));
        }
        self.pending.front_mut()
    }

    pub(crate) fn back_mut(&mut self) -> Option<&mut Pending> {
        self.pending.back_mut()
    }

    /// The request a complete response answers: the oldest, or an unseen
    /// one while requests may have been missed.
    pub(crate) fn pop(&mut self) -> Option<Pending> {
        self.pending
            .pop_front()
            .or_else(|| self.orphan_start.map(Pending::new))
    }

    /// A request was sent and its response has not ended (a bare
    /// PostgreSQL Sync included: the server has not said it is ready).
    pub(crate) fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(crate) fn may_have_missed_requests(&mut self, ts: Option<u64>) {
        self.orphan_start = ts;
    }

    pub(crate) fn server_chunk(&mut self, ts: u64) {
        self.last_server_ns = Some(ts);
    }

    /// Every request still waiting is taken as answered by the last server
    /// chunk: used when the response's end was not seen and the client moved
    /// on to a new request.
    pub(crate) fn answer_all(
        &mut self,
        namespace: Option<&str>,
        tx_state: Option<TxState>,
        out: &mut Vec<Observation>,
    ) {
        let Some(end_ns) = self.last_server_ns else {
            self.pending.clear();
            return;
        };
        let end = ResponseEnd {
            end_ns,
            namespace,
            tx_state,
        };
        while let Some(p) = self.pending.pop_front() {
            end.emit(p, out);
        }
    }
}

/// What a finished round trip takes from the session.
#[derive(Clone, Copy)]
pub(crate) struct ResponseEnd<'s> {
    pub(crate) end_ns: u64,
    pub(crate) namespace: Option<&'s str>,
    pub(crate) tx_state: Option<TxState>,
}

impl ResponseEnd<'_> {
    pub(crate) fn emit(&self, p: Pending, out: &mut Vec<Observation>) {
        if p.silent {
            return;
        }
        out.push(Observation::RoundTrip(RoundTrip {
            start_ns: p.start_ns,
            end_ns: self.end_ns.max(p.start_ns),
            operation: p.operation,
            query: p.query,
            namespace: self.namespace.map(str::to_string),
            error: p.error,
            rows: p.rows,
            tx_state: self.tx_state,
            prepared: p.prepared,
        }));
    }
}

/// A map that forgets its oldest entry past `cap` (prepared statements,
/// portals): memory per connection stays bounded whatever the client does.
pub(crate) struct BoundedMap<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        BoundedMap {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key)
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.map.remove(key).is_some() {
            self.order.retain(|k| k.borrow() != key);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Round trips of an encrypted (or otherwise opaque) session, timed by
/// alternation: a turn starts with the first client chunk after a server
/// chunk and ends with the last server chunk before the next client chunk.
/// A turn is reported when the next one starts (the end is not known
/// before). Turns whose first client record is a TLS handshake, change
/// cipher spec or alert record are the TLS handshake itself, not requests.
#[derive(Default)]
pub(crate) struct Alternation {
    start: Option<u64>,
    end: Option<u64>,
    counted: bool,
}

impl Alternation {
    pub(crate) fn client(
        &mut self,
        view: &View<'_>,
        ts: u64,
        namespace: Option<&str>,
        out: &mut Vec<Observation>,
    ) {
        if let (Some(start_ns), Some(end_ns)) = (self.start, self.end) {
            if self.counted {
                let end = ResponseEnd {
                    end_ns,
                    namespace,
                    tx_state: None,
                };
                end.emit(Pending::new(start_ns), out);
            }
            self.start = None;
            self.end = None;
        }
        if self.start.is_none() {
            self.start = Some(ts);
            self.counted = !matches!(view.start().first(), Some(0x14..=0x16));
        }
    }

    pub(crate) fn server(&mut self, ts: u64) {
        if self.start.is_some() {
            self.end = Some(ts);
        }
    }

    /// The client spoke and the server has not answered yet. Once it has,
    /// the turn may go on (a long response) or be over: without framing,
    /// the first answer is taken as the end.
    pub(crate) fn waiting(&self) -> bool {
        self.start.is_some() && self.end.is_none()
    }
}

/// A TLS record header: content type 20..=23, version 3.x.
pub(crate) fn is_tls_record(bytes: &[u8]) -> bool {
    matches!(bytes, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_map_forgets_the_oldest() {
        let mut m = BoundedMap::new(2);
        m.insert(1, "a");
        m.insert(2, "b");
        m.insert(1, "a2");
        m.insert(3, "c");
        assert_eq!(
            (m.get(&1), m.get(&2), m.get(&3)),
            (None, Some(&"b"), Some(&"c"))
        );
        m.remove(&2);
        assert_eq!(m.len(), 1);
    }
}
