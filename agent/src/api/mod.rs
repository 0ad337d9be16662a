//! The HTTP surface: /metrics, /healthz and the JSON API, on one listener.

mod auth;
pub mod config;
pub mod listener;
pub mod live;

use std::{ops::Bound, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::{Deserialize, Serialize};

use self::config::HttpConfig;
use crate::{
    clock::{monotonic_ns, Clock},
    detect::pool_health::{self, HealthResponse, HealthThresholds, OpenLeaks, Status},
    detect::sizing::{SizingResponse, SizingWindow},
    health::{Health, Verdict},
    lifecycle::PoolView,
    lifecycle::{CloseReason, ConnId, ConnState, ConnectOutcome, Connection, Endpoint},
    percentiles::{self, PoolPercentiles, QueryPercentiles},
    procfs::Placement,
    protocol::{DbSystem, TxState},
    reports::{LeakReport, LeaksResponse, SlowQueriesResponse},
    state::{Broken, Shared, State as AgentState},
    telemetry::Telemetry,
};

#[derive(Clone)]
pub struct ApiState {
    pub state: Arc<Shared<AgentState>>,
    pub health: Arc<Health>,
    pub telemetry: Arc<Telemetry>,
    pub clock: Clock,
    /// `[pool_health]`: the thresholds of `/api/v1/health`.
    pub pool_health: HealthThresholds,
    /// `[sizing]`: the window of `/api/v1/sizing`.
    pub sizing: SizingWindow,
    /// The live page's feed (`/api/v1/live`).
    pub live: Arc<live::LiveFeed>,
}

/// One connection as `/api/v1/connections` shows it. The CLI reads the same
/// struct back, so the two cannot drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub pid: u32,
    pub process: String,
    pub fd: i32,
    /// Kernel time of connect(); with pid and fd it names the connection.
    pub generation: u64,
    pub tid: Option<u32>,
    pub transport: String,
    pub local_address: Option<String>,
    pub local_port: Option<u16>,
    pub remote_address: String,
    pub remote_port: Option<u16>,
    pub state: ConnState,
    pub connect_result: Option<ConnectOutcome>,
    pub opened_at: String,
    pub connect_latency_seconds: Option<f64>,
    pub peer_closed_at: Option<String>,
    pub closed_at: Option<String>,
    pub close_reason: Option<CloseReason>,
    pub lifetime_seconds: f64,
    pub seen_at_start: bool,
    pub db_system: Option<DbSystem>,
    pub encrypted: bool,
    /// The agent reads the connection's statements: it is not encrypted,
    /// or a hooked TLS library gives its plaintext.
    pub plaintext: bool,
    pub namespace: Option<String>,
    pub db_user: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_activity: Option<String>,
    pub round_trips: u64,
    pub last_operation: Option<String>,
    pub last_query: Option<String>,
    pub tx_state: Option<TxState>,
    pub protocol_lost: u64,
    pub pool: Option<String>,
    /// The id its adapter names it by (`conn`), when one does: sent beside
    /// the socket, or tied to it from the kernel's evidence.
    #[serde(default)]
    pub adapter_conn: Option<u64>,
    pub checked_out: bool,
    /// Where the process runs (container id, pod), when it runs in one.
    #[serde(flatten)]
    pub placement: Placement,
}

/// One page of `/api/v1/connections`, in (pid, fd, generation) order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionsResponse {
    pub connections: Vec<ConnectionView>,
    /// Where the next page starts (`?after=` this), or null on the last
    /// page. Absent from agents that did not page (read as null).
    #[serde(default)]
    pub next: Option<String>,
}

/// Connections on a page when the caller names no `limit`.
pub const CONNECTIONS_PAGE_DEFAULT: usize = 1000;
/// The largest `limit` honoured; larger ones are lowered to it.
pub const CONNECTIONS_PAGE_MAX: usize = 10_000;
/// A page also ends once its JSON passes this size (then `next` is set even
/// below `limit`): what one caller makes the agent hold stays about this,
/// however long the queries on its connections are.
pub const CONNECTIONS_PAGE_BYTES: usize = 1 << 20;
/// Connections turned into views per hold of the tracker lock, so that a
/// page never stalls the event pipeline for long.
const VIEWS_PER_LOCK: usize = 256;

/// `/api/v1/connections?limit=N&after=CURSOR&pid=PID`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConnectionsQuery {
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
    /// Only this process's connections.
    pub pid: Option<u32>,
}

/// The cursor naming a connection: opaque to callers, "pid.fd.generation".
pub fn connections_cursor(id: ConnId) -> String {
    format!("{}.{}.{}", id.pid, id.fd, id.generation)
}

pub fn parse_connections_cursor(text: &str) -> Option<ConnId> {
    let mut parts = text.splitn(3, '.');
    let pid = parts.next()?.parse().ok()?;
    let fd = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    Some(ConnId {
        pid,
        fd,
        generation,
    })
}

/// Why a page could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    BadCursor,
    Broken(Broken),
}

impl From<Broken> for PageError {
    fn from(e: Broken) -> PageError {
        PageError::Broken(e)
    }
}

/// One page of connections as JSON (a [`ConnectionsResponse`]), built a
/// few hundred connections per hold of the lock and written out as it
/// goes: neither the tracker lock nor the memory grows with the number of
/// connections.
pub fn connections_page(
    state: &Shared<AgentState>,
    query: &ConnectionsQuery,
    clock: &Clock,
    now_ns: u64,
) -> Result<Vec<u8>, PageError> {
    let limit = query
        .limit
        .unwrap_or(CONNECTIONS_PAGE_DEFAULT)
        .clamp(1, CONNECTIONS_PAGE_MAX);
    let after = match &query.after {
        Some(text) => Some(parse_connections_cursor(text).ok_or(PageError::BadCursor)?),
        None => None,
    };
    let mut start = match (after, query.pid) {
        (Some(id), Some(pid)) if id.pid < pid => Bound::Included(first_of(pid)),
        (Some(id), _) => Bound::Excluded(id),
        (None, Some(pid)) => Bound::Included(first_of(pid)),
        (None, None) => Bound::Unbounded,
    };
    let in_scope = |c: &Connection| query.pid.is_none_or(|pid| c.id.pid == pid);

    // Room for the whole page up front: no copying as it grows, and the
    // pages of it never written are never touched.
    let room = CONNECTIONS_PAGE_BYTES.min(limit.saturating_mul(2048)) + 64 * 1024;
    let mut body = Vec::with_capacity(room);
    body.extend_from_slice(b"{\"connections\":[");
    let mut emitted = 0usize;
    let mut last: Option<ConnId> = None;
    let mut next = None;
    'page: loop {
        let want = VIEWS_PER_LOCK.min(limit - emitted);
        let (views, more) = state.with(|state| {
            let tracker = &state.tracker;
            let mut listed = tracker.connections_from(start).take_while(|c| in_scope(c));
            let views: Vec<(ConnId, ConnectionView)> = listed
                .by_ref()
                .take(want)
                .map(|c| {
                    let view = connection_view(c, tracker.placement(c.id.pid), clock, now_ns);
                    (c.id, view)
                })
                .collect();
            (views, listed.next().is_some())
        })?;
        for (id, view) in views {
            if emitted > 0 && body.len() >= CONNECTIONS_PAGE_BYTES {
                // Full before `id`: the next page starts after the last one here.
                next = last;
                break 'page;
            }
            if emitted > 0 {
                body.push(b',');
            }
            // A struct of strings and numbers always serializes.
            if serde_json::to_writer(&mut body, &view).is_err() {
                body.extend_from_slice(b"null");
            }
            emitted += 1;
            last = Some(id);
        }
        match last {
            Some(id) if more => {
                if emitted >= limit {
                    next = Some(id);
                    break;
                }
                start = Bound::Excluded(id);
            }
            _ => break,
        }
    }
    body.extend_from_slice(b"],\"next\":");
    match next {
        Some(id) => {
            let cursor = connections_cursor(id);
            if serde_json::to_writer(&mut body, &cursor).is_err() {
                body.extend_from_slice(b"null");
            }
        }
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
    Ok(body)
}

/// The lowest id of a process, where its listing starts.
fn first_of(pid: u32) -> ConnId {
    ConnId {
        pid,
        fd: i32::MIN,
        generation: 0,
    }
}

pub fn connection_view(
    conn: &Connection,
    placement: Option<&Placement>,
    clock: &Clock,
    now_ns: u64,
) -> ConnectionView {
    let (remote_address, remote_port) = match &conn.remote {
        Endpoint::Inet(sa) => (sa.ip().to_string(), Some(sa.port())),
        Endpoint::Unix(path) | Endpoint::Declared(path) => (path.clone(), None),
    };
    ConnectionView {
        pid: conn.id.pid,
        process: conn.comm.clone(),
        fd: conn.id.fd,
        generation: conn.id.generation,
        tid: conn.tid,
        transport: conn.remote.transport().to_string(),
        local_address: conn.local.map(|sa| sa.ip().to_string()),
        local_port: conn.local.map(|sa| sa.port()),
        remote_address,
        remote_port,
        state: conn.state,
        connect_result: conn.outcome,
        opened_at: clock.rfc3339(conn.opened_at_ns),
        connect_latency_seconds: conn.connect_latency_ns.map(|ns| ns as f64 / 1e9),
        peer_closed_at: conn.peer_closed_at_ns.map(|ns| clock.rfc3339(ns)),
        closed_at: conn.closed_at_ns.map(|ns| clock.rfc3339(ns)),
        close_reason: conn.close_reason,
        lifetime_seconds: conn.lifetime_ns(now_ns) as f64 / 1e9,
        seen_at_start: conn.seen_at_start,
        db_system: conn.db_system,
        encrypted: conn.encrypted,
        plaintext: !conn.encrypted || conn.plaintext,
        namespace: conn.namespace.clone(),
        db_user: conn.db_user.clone(),
        bytes_sent: conn.bytes_sent,
        bytes_received: conn.bytes_received,
        last_activity: conn.last_activity_ns.map(|ns| clock.rfc3339(ns)),
        round_trips: conn.round_trips,
        last_operation: conn.last_operation.clone(),
        last_query: conn.last_query_text(),
        tx_state: conn.tx_state,
        protocol_lost: conn.protocol_lost,
        pool: conn.pool.as_deref().map(str::to_string),
        adapter_conn: conn.adapter_conn,
        checked_out: conn.checked_out_at_ns.is_some(),
        placement: placement.cloned().unwrap_or_default(),
    }
}

/// The health checks and the scrape: served without the token (`auth`) and
/// on the reserved slots when every connection is taken (`listener`).
pub const PROBE_PATHS: &[&str] = &[HEALTHZ, HEALTHZ_LIVE, HEALTHZ_READY, METRICS];
const HEALTHZ: &str = "/healthz";
const HEALTHZ_LIVE: &str = "/healthz/live";
const HEALTHZ_READY: &str = "/healthz/ready";
const METRICS: &str = "/metrics";
/// Pool health; unlike `/healthz` (the agent's own), it names processes
/// and pools, so it takes the token.
pub const POOL_HEALTH: &str = "/api/v1/health";
pub const QUERY_LATENCY: &str = "/api/v1/queries/latency";
pub const SIZING: &str = "/api/v1/sizing";
pub const TLS_LIBRARIES: &str = "/api/v1/tls/libraries";

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(live_page))
        .route(METRICS, get(metrics))
        .route(HEALTHZ, get(healthz))
        .route(HEALTHZ_LIVE, get(liveness))
        .route(HEALTHZ_READY, get(readiness))
        .route("/api/v1/connections", get(connections))
        .route("/api/v1/queries/slow", get(slow_queries))
        .route(QUERY_LATENCY, get(query_latency))
        .route(SIZING, get(sizing))
        .route("/api/v1/leaks", get(leaks))
        .route("/api/v1/pools", get(pools))
        .route(POOL_HEALTH, get(pool_health_endpoint))
        .route(TLS_LIBRARIES, get(tls_libraries))
        .route(live::SNAPSHOT, get(live::snapshot))
        .route(live::EVENTS, get(live::events))
        .with_state(state)
}

/// Serves the API with the limits and token of `[http]` (see `listener`).
pub async fn serve(http: HttpConfig, state: ApiState) -> anyhow::Result<()> {
    let listen = http.listen;
    let token = http
        .bearer_token()
        .map_err(|(key, reason)| anyhow::anyhow!("config key `http.{key}`: {reason}"))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    if token.is_none() && !listen.ip().is_loopback() {
        log::warn!(
            "HTTP API on {listen}, beyond loopback, without a token: anyone who reaches it can \
             read every connection and query; set [http] bearer_token_file"
        );
    }
    log::info!(
        "HTTP API on http://{listen} (/metrics, /healthz, /api/v1/{{connections,pools,health,leaks,queries/slow}}{}); \
         at most {} connections",
        if token.is_some() { " with a bearer token" } else { "" },
        http.max_connections.get()
    );
    tokio::spawn(live::produce(state.clone()));
    let app = auth::require_token(router(state), token);
    listener::run(listener, app, listener::Limits::from_config(&http)).await
}

/// The page a person opens first: pools, connections and open leak
/// reports of this host, refreshing itself from the JSON API.
const LIVE_PAGE: &str = include_str!("live.html");

async fn live_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page only talks to this agent.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
        ],
        LIVE_PAGE,
    )
        .into_response()
}

/// `ok` (200), or 503 with one line per problem.
fn health_response(verdict: Verdict) -> Response {
    if verdict.ok() {
        return "ok\n".into_response();
    }
    let mut body = String::new();
    for problem in verdict.problems {
        body.push_str(&problem);
        body.push('\n');
    }
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

/// Live and ready: what a person or a load balancer asks.
async fn healthz(State(state): State<ApiState>) -> Response {
    health_response(state.health.readiness(monotonic_ns()))
}

/// Whether to restart the agent (the kubelet's liveness probe).
async fn liveness(State(state): State<ApiState>) -> Response {
    health_response(state.health.liveness(monotonic_ns()))
}

/// Whether the agent sees and serves everything it should.
async fn readiness(State(state): State<ApiState>) -> Response {
    health_response(state.health.readiness(monotonic_ns()))
}

/// The state is broken: say so and where to look.
fn broken(e: Broken) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    match state.telemetry.render_prometheus() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

async fn connections(
    State(state): State<ApiState>,
    Query(query): Query<ConnectionsQuery>,
) -> Response {
    let now = monotonic_ns();
    match connections_page(&state.state, &query, &state.clock, now) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(PageError::BadCursor) => (
            StatusCode::BAD_REQUEST,
            "after: not a cursor this API gave (use the previous page's next)\n",
        )
            .into_response(),
        Err(PageError::Broken(e)) => broken(e),
    }
}

async fn slow_queries(State(state): State<ApiState>) -> Response {
    match state.state.with(|s| SlowQueriesResponse {
        threshold_seconds: s.reports.slow_threshold_ns() as f64 / 1e9,
        slow_queries: s.reports.slow_queries(),
    }) {
        Ok(response) => Json(response).into_response(),
        Err(e) => broken(e),
    }
}

/// `/api/v1/tls/libraries`: the TLS libraries the observed processes map,
/// hooked or not and why, refreshed once a second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsLibrariesResponse {
    pub libraries: Vec<crate::tls_libraries::LibraryStatus>,
}

async fn tls_libraries(State(state): State<ApiState>) -> Response {
    match state.state.with(|s| TlsLibrariesResponse {
        libraries: s.tls_libraries.clone(),
    }) {
        Ok(response) => Json(response).into_response(),
        Err(e) => broken(e),
    }
}

async fn leaks(State(state): State<ApiState>) -> Response {
    match state.state.with(|s| LeaksResponse {
        reports: s.leaks.reports(),
    }) {
        Ok(response) => Json(response).into_response(),
        Err(e) => broken(e),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolsResponse {
    /// The span each pool's percentiles cover.
    #[serde(default)]
    pub window_seconds: u64,
    pub pools: Vec<PoolWithPercentiles>,
}

/// A pool as `/api/v1/pools` shows it: the tracker's view and, beside it,
/// its acquire waits and use times over the last minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolWithPercentiles {
    #[serde(flatten)]
    pub view: PoolView,
    #[serde(flatten)]
    pub percentiles: PoolPercentiles,
}

/// The span of the percentiles the API shows.
pub const WINDOW_SECONDS: u64 = percentiles::WINDOW_NS / 1_000_000_000;

/// `/api/v1/health`'s parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolHealthQuery {
    /// Only this process's pools.
    pub pid: Option<u32>,
    /// Only pools of this name.
    pub pool: Option<String>,
    /// A warning fails too (503), not only critical.
    #[serde(default)]
    pub strict: bool,
}

/// The pools' health as `/api/v1/health` answers: 503 when a pool (of
/// those asked for) is critical, or with `strict` when one is not ok; 404
/// when none is asked for by `pid` or `pool`, so that a probe for a
/// process that lost its pools fails.
pub fn pool_health(
    s: &AgentState,
    query: &PoolHealthQuery,
    thresholds: &HealthThresholds,
    now_ns: u64,
) -> (StatusCode, HealthResponse) {
    let views: Vec<PoolView> = s
        .tracker
        .pool_views()
        .into_iter()
        .filter(|v| query.pid.is_none_or(|pid| v.pid == pid))
        .filter(|v| query.pool.as_ref().is_none_or(|name| &v.name == name))
        .collect();
    let activity = s.tracker.pool_activity(now_ns, thresholds.recent_ns);
    let leaks = OpenLeaks::count(s.leaks.open_reports().map(LeakReport::open_leak));
    let response = pool_health::assess_all(&views, &activity, &leaks, thresholds);
    let filtered = query.pid.is_some() || query.pool.is_some();
    let failing = match response.status {
        Status::Critical => true,
        Status::Warning => query.strict,
        Status::Ok => false,
    };
    let code = if filtered && response.pools.is_empty() {
        StatusCode::NOT_FOUND
    } else if failing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, response)
}

async fn pool_health_endpoint(
    State(state): State<ApiState>,
    Query(query): Query<PoolHealthQuery>,
) -> Response {
    let thresholds = state.pool_health;
    match state
        .state
        .with(|s| pool_health(s, &query, &thresholds, monotonic_ns()))
    {
        Ok((code, response)) => (code, Json(response)).into_response(),
        Err(e) => broken(e),
    }
}

/// `/api/v1/pools`'s answer.
pub fn pools_response(api: &ApiState, now_ns: u64) -> Result<PoolsResponse, Broken> {
    let views = api.state.with(|s| s.tracker.pool_views())?;
    let pools = api.telemetry.percentiles(|l| {
        views
            .into_iter()
            .map(|view| PoolWithPercentiles {
                percentiles: l.pool_percentiles(view.pid, &view.name, now_ns),
                view,
            })
            .collect()
    });
    Ok(PoolsResponse {
        window_seconds: WINDOW_SECONDS,
        pools,
    })
}

async fn pools(State(state): State<ApiState>) -> Response {
    match pools_response(&state, monotonic_ns()) {
        Ok(response) => Json(response).into_response(),
        Err(e) => broken(e),
    }
}

/// `/api/v1/sizing`'s answer: each adapter pool's advice over the window.
pub fn sizing_advice(
    s: &AgentState,
    telemetry: &Telemetry,
    window: SizingWindow,
    now_ns: u64,
) -> SizingResponse {
    let views = s.tracker.pool_views();
    let pools = telemetry.percentiles(|l| {
        s.pool_usage.advice(&views, now_ns, window, |v| {
            l.pool_percentiles(v.pid, &v.name, now_ns)
                .wait_seconds
                .map(|w| w.p99)
        })
    });
    SizingResponse {
        window_seconds: window.window_ns / 1_000_000_000,
        pools,
    }
}

async fn sizing(State(state): State<ApiState>) -> Response {
    let window = state.sizing;
    match state
        .state
        .with(|s| sizing_advice(s, &state.telemetry, window, monotonic_ns()))
    {
        Ok(response) => Json(response).into_response(),
        Err(e) => broken(e),
    }
}

/// `/api/v1/queries/latency`: round-trip percentiles per server and
/// operation, slowest P99 first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryLatencyResponse {
    /// The span the percentiles cover.
    pub window_seconds: u64,
    pub queries: Vec<QueryPercentiles>,
}

/// `/api/v1/queries/latency`'s answer.
pub fn query_latency_response(api: &ApiState, now_ns: u64) -> QueryLatencyResponse {
    QueryLatencyResponse {
        window_seconds: WINDOW_SECONDS,
        queries: api.telemetry.percentiles(|l| l.query_percentiles(now_ns)),
    }
}

async fn query_latency(State(state): State<ApiState>) -> Response {
    Json(query_latency_response(&state, monotonic_ns())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Event, EventKind, Tracker, TrackerConfig};
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    /// Counts each thread's live heap bytes and their peak, so that a test
    /// can tell what one API caller makes the agent hold.
    struct PerThread;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn count(delta: isize) {
        // try_with: allocations during thread teardown are not counted.
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is passed on to the system allocator unchanged.
    unsafe impl GlobalAlloc for PerThread {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: PerThread = PerThread;

    /// Peak heap growth of this thread while `f` runs.
    fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let result = f();
        let peak = PEAK.with(Cell::get) - base;
        (result, usize::try_from(peak).unwrap_or(0))
    }

    /// A tracker with `n` open connections over 10 processes, each named
    /// `comm` (a long one makes long views), and `closed` closed ones.
    fn tracker(n: u32, closed: u32, comm: &str) -> Arc<Shared<AgentState>> {
        let mut t = Tracker::new(TrackerConfig::default());
        for i in 0..n + closed {
            let conn = ConnId {
                pid: 1_000 + i % 10,
                fd: (i / 10) as i32,
                generation: 1_000,
            };
            t.apply(Event {
                ts_ns: 1_100,
                conn,
                kind: EventKind::Connect {
                    tid: 1,
                    ret: 0,
                    remote: Endpoint::Inet("127.0.0.1:5432".parse().expect("addr")),
                    comm: comm.to_string(),
                },
            });
            if i >= n {
                t.apply(Event {
                    ts_ns: 1_200,
                    conn,
                    kind: EventKind::Close,
                });
            }
        }
        AgentState::shared_for_tests(t)
    }

    fn page(t: &Shared<AgentState>, query: &ConnectionsQuery) -> ConnectionsResponse {
        let body = connections_page(t, query, &Clock::new(), 2_000).expect("page");
        serde_json::from_slice(&body).expect("page is a ConnectionsResponse")
    }

    /// Follows `next` from `query`; returns the pages' sizes and all ids.
    fn all_pages(t: &Shared<AgentState>, mut query: ConnectionsQuery) -> (Vec<usize>, Vec<ConnId>) {
        let mut sizes = Vec::new();
        let mut ids = Vec::new();
        loop {
            let response = page(t, &query);
            sizes.push(response.connections.len());
            ids.extend(response.connections.iter().map(|c| ConnId {
                pid: c.pid,
                fd: c.fd,
                generation: c.generation,
            }));
            match response.next {
                Some(next) => query.after = Some(next),
                None => return (sizes, ids),
            }
        }
    }

    fn all_ids(t: &Shared<AgentState>) -> Vec<ConnId> {
        let mut ids: Vec<ConnId> = t
            .with(|s| {
                s.tracker
                    .open_connections()
                    .chain(s.tracker.closed_connections())
                    .map(|c| c.id)
                    .collect()
            })
            .expect("state");
        ids.sort();
        ids
    }

    #[test]
    fn pages_cover_every_connection_once_in_order() {
        let t = tracker(2_300, 200, "app");
        let (sizes, ids) = all_pages(&t, ConnectionsQuery::default());
        assert_eq!(sizes, vec![1_000, 1_000, 500]);
        assert_eq!(ids, all_ids(&t));

        // Larger pages on request, up to the page's size in bytes (views
        // of these connections are about 700 bytes).
        let (sizes, ids) = all_pages(
            &t,
            ConnectionsQuery {
                limit: Some(1_000_000),
                ..ConnectionsQuery::default()
            },
        );
        assert!(sizes[0] > 1_000 && sizes.len() == 2, "{sizes:?}");
        assert_eq!(ids, all_ids(&t));
        // An exact fit ends without an empty page.
        let (sizes, _) = all_pages(
            &t,
            ConnectionsQuery {
                limit: Some(500),
                ..ConnectionsQuery::default()
            },
        );
        assert_eq!(sizes, vec![500; 5]);
        let first = page(
            &t,
            &ConnectionsQuery {
                limit: Some(0),
                ..ConnectionsQuery::default()
            },
        );
        assert_eq!(first.connections.len(), 1);
    }

    #[test]
    fn pages_of_one_process() {
        let t = tracker(2_000, 0, "app");
        let (sizes, ids) = all_pages(
            &t,
            ConnectionsQuery {
                limit: Some(150),
                pid: Some(1_003),
                ..ConnectionsQuery::default()
            },
        );
        assert_eq!(sizes, vec![150, 50]);
        let expected: Vec<ConnId> = all_ids(&t).into_iter().filter(|c| c.pid == 1_003).collect();
        assert_eq!(ids, expected);
        // A cursor from an earlier process starts at this one's first.
        let response = page(
            &t,
            &ConnectionsQuery {
                after: Some(connections_cursor(expected[0]).replace("1003.", "1001.")),
                pid: Some(1_003),
                ..ConnectionsQuery::default()
            },
        );
        assert_eq!(response.connections.len(), 200);
        let none = page(
            &t,
            &ConnectionsQuery {
                pid: Some(7),
                ..ConnectionsQuery::default()
            },
        );
        assert!(none.connections.is_empty() && none.next.is_none());
    }

    #[test]
    fn a_page_ends_at_its_size_in_bytes() {
        // Views of about 10 kB: a page of 1000 would be 10 MB.
        let t = tracker(500, 0, &"x".repeat(10_000));
        let (sizes, ids) = all_pages(&t, ConnectionsQuery::default());
        assert!(sizes.len() >= 4, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 110), "{sizes:?}");
        assert_eq!(ids, all_ids(&t));
        let body =
            connections_page(&t, &ConnectionsQuery::default(), &Clock::new(), 2_000).expect("page");
        assert!(
            body.len() < CONNECTIONS_PAGE_BYTES + 20_000,
            "{}",
            body.len()
        );
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let id = ConnId {
            pid: 7,
            fd: -1,
            generation: 123_456_789_012,
        };
        assert_eq!(parse_connections_cursor(&connections_cursor(id)), Some(id));
        let t = tracker(3, 0, "app");
        for bad in ["", "1.2", "a.b.c", "1.2.3.4", "-1.2.3"] {
            let query = ConnectionsQuery {
                after: Some(bad.into()),
                ..ConnectionsQuery::default()
            };
            assert_eq!(
                connections_page(&t, &query, &Clock::new(), 0),
                Err(PageError::BadCursor),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn twenty_callers_at_100k_connections_hold_little_memory() {
        /// What a caller reads of a page here: its length and `next`,
        /// without keeping the views.
        #[derive(Deserialize)]
        struct Skim {
            connections: Vec<serde::de::IgnoredAny>,
            next: Option<String>,
        }
        let (t, state) = peak_bytes(|| tracker(100_000, 4_096, "postgres-client"));
        println!(
            "tracker with 100,000 open and 4,096 closed connections (no traffic): {:.1} MiB",
            state as f64 / (1 << 20) as f64
        );
        // Unoptimized builds read the first pages only: memory is per page.
        let pages = if cfg!(debug_assertions) {
            10
        } else {
            usize::MAX
        };
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let clock = Clock::new();
                    let mut query = ConnectionsQuery::default();
                    let (mut listed, mut peak) = (0, 0);
                    for _ in 0..pages {
                        let (body, held) =
                            peak_bytes(|| connections_page(&t, &query, &clock, 2_000));
                        peak = peak.max(held);
                        let skim: Skim =
                            serde_json::from_slice(&body.expect("page")).expect("JSON");
                        listed += skim.connections.len();
                        match skim.next {
                            Some(next) => query.after = Some(next),
                            None => break,
                        }
                    }
                    (listed, peak)
                })
            })
            .collect();
        let mut total_peak = 0;
        for caller in callers {
            let (listed, peak) = caller.join().expect("caller");
            if !cfg!(debug_assertions) {
                assert_eq!(listed, 104_096);
            }
            total_peak += peak;
        }
        println!(
            "20 callers paging through 104,096 connections: at most {:.1} MiB held for them at once",
            total_peak as f64 / (1 << 20) as f64
        );
        // The DaemonSet's limit is 128 MiB; the tracker's own state needs
        // most of it at 100k connections.
        assert!(total_peak < 32 << 20, "{total_peak} bytes");
    }

    /// Process 300 with a pool "handles" of `max` SQLite handles, `out` of
    /// them checked out and `waiting` requests waiting.
    fn pool_of(max: u32, out: u64, waiting: u64) -> Arc<Shared<AgentState>> {
        use crate::adapter::message::{
            AcquireResult, AdapterEvent, AdapterMessage, ConnRef, PoolInfo,
        };
        use crate::protocol::SystemName;
        const S: u64 = 1_000_000_000;
        let mut t = Tracker::new(TrackerConfig::default());
        t.set_placement(
            300,
            Placement {
                process_started_ns: Some(S),
                ..Placement::default()
            },
        );
        let mut send = |event| {
            let message = AdapterMessage {
                pool: "handles".into(),
                event,
                mono_ns: None,
                claimed_pid: None,
            };
            t.apply_adapter(300, 10 * S, message);
        };
        send(AdapterEvent::Register(PoolInfo {
            db_system: Some(SystemName::Named("sqlite".into())),
            max: Some(max),
            ..PoolInfo::default()
        }));
        for id in 1..=u64::from(max) {
            let conn = ConnRef {
                conn: Some(id),
                ..ConnRef::default()
            };
            send(AdapterEvent::ConnectionCreated { conn, tid: None });
            if id <= out {
                send(AdapterEvent::AcquireEnd {
                    request: id,
                    result: AcquireResult::Ok,
                    conn,
                    tid: Some(7),
                    wait_ns: Some(0),
                });
            }
        }
        for request in 100..100 + waiting {
            send(AdapterEvent::AcquireStart { request, tid: None });
        }
        AgentState::shared_for_tests(t)
    }

    fn health_of(
        state: &Shared<AgentState>,
        query: PoolHealthQuery,
    ) -> (StatusCode, HealthResponse) {
        state
            .with(|s| pool_health(s, &query, &HealthThresholds::default(), 12_000_000_000))
            .expect("state")
    }

    #[test]
    fn an_exhausted_pool_is_critical_and_fails_the_probe() {
        let (code, r) = health_of(&pool_of(2, 2, 1), PoolHealthQuery::default());
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.status, Status::Critical);
        let rules: Vec<&str> = r.pools[0].reasons.iter().map(|r| r.rule.as_str()).collect();
        assert_eq!(rules, ["utilization", "exhausted", "long_wait", "no_idle"]);
        assert_eq!((r.pools[0].used, r.pools[0].pending), (2, 1));
        // The request has waited 2 s (since 10 s; now 12 s).
        assert!(
            r.pools[0].reasons[2]
                .detail
                .starts_with("a request has waited 2.0 s"),
            "{r:?}"
        );
    }

    #[test]
    fn a_warning_passes_the_probe_unless_strict() {
        let state = pool_of(10, 8, 0);
        let (code, r) = health_of(&state, PoolHealthQuery::default());
        assert_eq!((code, r.status), (StatusCode::OK, Status::Warning));
        let strict = PoolHealthQuery {
            strict: true,
            ..PoolHealthQuery::default()
        };
        assert_eq!(health_of(&state, strict).0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, r) = health_of(&pool_of(10, 1, 0), PoolHealthQuery::default());
        assert_eq!((code, r.status), (StatusCode::OK, Status::Ok));
    }

    #[test]
    fn health_asked_for_a_pool_nobody_has_is_not_found() {
        let state = pool_of(2, 2, 1);
        let mine = PoolHealthQuery {
            pid: Some(300),
            pool: Some("handles".into()),
            ..PoolHealthQuery::default()
        };
        assert_eq!(health_of(&state, mine).1.pools.len(), 1);
        for query in [
            PoolHealthQuery {
                pid: Some(301),
                ..PoolHealthQuery::default()
            },
            PoolHealthQuery {
                pool: Some("other".into()),
                ..PoolHealthQuery::default()
            },
        ] {
            let (code, r) = health_of(&state, query);
            assert_eq!(code, StatusCode::NOT_FOUND);
            assert!(r.pools.is_empty());
        }
        // No filter and no pool at all: nothing is wrong.
        let empty = AgentState::shared_for_tests(Tracker::new(TrackerConfig::default()));
        assert_eq!(
            health_of(&empty, PoolHealthQuery::default()).0,
            StatusCode::OK
        );
    }
}
