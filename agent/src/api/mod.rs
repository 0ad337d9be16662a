//! The HTTP surface: /metrics, /healthz and the JSON API, on one listener.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::{Deserialize, Serialize};

use crate::{
    clock::{monotonic_ns, Clock},
    lifecycle::PoolView,
    lifecycle::{CloseReason, ConnState, ConnectOutcome, Connection, Endpoint, Tracker},
    procfs::Placement,
    protocol::{DbSystem, TxState},
    reports::{LeakReports, LeaksResponse, Reports, SlowQueriesResponse},
    telemetry::Telemetry,
};

#[derive(Clone)]
pub struct ApiState {
    pub tracker: Arc<Mutex<Tracker>>,
    pub reports: Arc<Mutex<Reports>>,
    pub leaks: Arc<Mutex<LeakReports>>,
    pub telemetry: Arc<Telemetry>,
    pub clock: Clock,
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
    pub checked_out: bool,
    /// Where the process runs (container id, pod), when it runs in one.
    #[serde(flatten)]
    pub placement: Placement,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionsResponse {
    pub connections: Vec<ConnectionView>,
}

pub fn connection_view(
    conn: &Connection,
    placement: Option<&Placement>,
    clock: &Clock,
    now_ns: u64,
) -> ConnectionView {
    let (remote_address, remote_port) = match &conn.remote {
        Endpoint::Inet(sa) => (sa.ip().to_string(), Some(sa.port())),
        Endpoint::Unix(path) => (path.clone(), None),
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
        namespace: conn.namespace.clone(),
        db_user: conn.db_user.clone(),
        bytes_sent: conn.bytes_sent,
        bytes_received: conn.bytes_received,
        last_activity: conn.last_activity_ns.map(|ns| clock.rfc3339(ns)),
        round_trips: conn.round_trips,
        last_operation: conn.last_operation.clone(),
        last_query: conn.last_query.clone(),
        tx_state: conn.tx_state,
        protocol_lost: conn.protocol_lost,
        pool: conn.pool.clone(),
        checked_out: conn.checked_out_at_ns.is_some(),
        placement: placement.cloned().unwrap_or_default(),
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(live_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/v1/connections", get(connections))
        .route("/api/v1/queries/slow", get(slow_queries))
        .route("/api/v1/leaks", get(leaks))
        .route("/api/v1/pools", get(pools))
        .with_state(state)
}

pub async fn serve(listen: SocketAddr, state: ApiState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    log::info!("HTTP API on http://{listen} (/metrics, /healthz, /api/v1/{{connections,pools,leaks,queries/slow}})");
    axum::serve(listener, router(state))
        .await
        .map_err(|e| anyhow::anyhow!("HTTP server failed: {e}"))
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

async fn healthz() -> &'static str {
    "ok\n"
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

async fn connections(State(state): State<ApiState>) -> Response {
    let now = monotonic_ns();
    let Ok(tracker) = state.tracker.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "tracker lock poisoned\n").into_response();
    };
    let mut connections: Vec<ConnectionView> = tracker
        .open_connections()
        .chain(tracker.closed_connections())
        .map(|c| connection_view(c, tracker.placement(c.id.pid), &state.clock, now))
        .collect();
    connections.sort_by_key(|c| (c.pid, c.fd, c.generation));
    Json(ConnectionsResponse { connections }).into_response()
}

async fn slow_queries(State(state): State<ApiState>) -> Response {
    let Ok(reports) = state.reports.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "reports lock poisoned\n").into_response();
    };
    Json(SlowQueriesResponse {
        threshold_seconds: reports.slow_threshold_ns() as f64 / 1e9,
        slow_queries: reports.slow_queries(),
    })
    .into_response()
}

async fn leaks(State(state): State<ApiState>) -> Response {
    let Ok(leaks) = state.leaks.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "leaks lock poisoned\n").into_response();
    };
    Json(LeaksResponse {
        reports: leaks.reports(),
    })
    .into_response()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolsResponse {
    pub pools: Vec<PoolView>,
}

async fn pools(State(state): State<ApiState>) -> Response {
    let Ok(tracker) = state.tracker.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "tracker lock poisoned\n").into_response();
    };
    Json(PoolsResponse {
        pools: tracker.pool_views(),
    })
    .into_response()
}
