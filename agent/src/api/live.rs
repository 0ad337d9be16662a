//! The live page's feed: what the page shows, as one JSON snapshot built
//! every [`EVERY`] while anyone watches, pushed to every viewer as
//! Server-Sent Events ([`EVENTS`]); [`SNAPSHOT`] answers one snapshot (the
//! page reads it when it cannot stream).
//!
//! One snapshot serves every viewer, so a viewer costs the agent a copy of
//! a string every two seconds, not a walk over its state. Any local user
//! can open the page, so streams are bounded ([`MAX_STREAMS`], far below
//! `[http] max_connections`: viewers can never hold the API's connections)
//! and each lives at most [`STREAM_LIFETIME`] (the page reconnects); a
//! viewer that stops reading is closed by the listener's idle timeout,
//! since no byte moves.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};

use super::{
    broken, connection_view, pools_response, query_latency_response, sizing_advice, ApiState,
    ConnectionView, PoolsResponse, QueryLatencyResponse,
};
use crate::{
    clock::monotonic_ns,
    detect::sizing::SizingResponse,
    reports::{LeakReport, ReportStatus},
    state::Broken,
    trends::{self, PoolTrend},
};

pub const SNAPSHOT: &str = "/api/v1/live";
pub const EVENTS: &str = "/api/v1/live/events";
/// Live streams open at once, from everyone.
pub const MAX_STREAMS: usize = 16;
/// The longest one stream lasts; the page then opens another.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// How often a snapshot is built while a stream is open.
pub const EVERY: Duration = Duration::from_secs(2);
/// Open connections listed in a snapshot (the page shows these; the API
/// pages through all of them).
pub const CONNECTIONS_SHOWN: usize = 100;

/// Everything the live page shows, at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was built (RFC 3339).
    pub at: String,
    /// Open leak reports, holder stacks included.
    pub leaks: Vec<LeakReport>,
    pub pools: PoolsResponse,
    pub sizing: SizingResponse,
    pub queries: QueryLatencyResponse,
    pub connections: LiveConnections,
    pub trends: LiveTrends,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveConnections {
    /// Open connections in all.
    pub open: usize,
    /// The first [`CONNECTIONS_SHOWN`] of them, by process and fd.
    pub shown: Vec<ConnectionView>,
}

/// Each adapter pool's last minutes (see [`crate::trends`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveTrends {
    pub step_seconds: u64,
    pub span_seconds: u64,
    pub pools: Vec<PoolTrend>,
}

/// A snapshot as built: when (monotonic), and its JSON.
#[derive(Debug, Default)]
struct Built {
    at_ns: u64,
    json: Arc<str>,
}

/// The newest snapshot, and the streams' slots.
#[derive(Debug)]
pub struct LiveFeed {
    latest: watch::Sender<Arc<Built>>,
    streams: Arc<Semaphore>,
    /// When a stream last had a snapshot built for it at once (monotonic
    /// ns): at most once per [`EVERY`], so that opening streams in a loop
    /// cannot make the agent build snapshots in a loop.
    built_on_demand_ns: std::sync::atomic::AtomicU64,
}

impl LiveFeed {
    pub fn new() -> Arc<LiveFeed> {
        let (latest, _) = watch::channel(Arc::new(Built::default()));
        Arc::new(LiveFeed {
            latest,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            built_on_demand_ns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Builds and publishes a snapshot now, unless the newest is fresh or
    /// one was built on demand within [`EVERY`].
    fn freshen(&self, api: &ApiState) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = monotonic_ns();
        let every = EVERY.as_nanos() as u64;
        if now.saturating_sub(self.latest.borrow().at_ns) <= every {
            return;
        }
        let last = self.built_on_demand_ns.load(Relaxed);
        if now.saturating_sub(last) < every
            || self
                .built_on_demand_ns
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        publish(api, now);
    }
}

/// Builds a snapshot at `now` and makes it the newest.
fn publish(api: &ApiState, now: u64) {
    match snapshot_of(api, now).map(|s| serde_json::to_string(&s)) {
        Ok(Ok(json)) => {
            api.live.latest.send_replace(Arc::new(Built {
                at_ns: now,
                json: json.into(),
            }));
        }
        Ok(Err(e)) => log::debug!("live snapshot: {e}"),
        // The state is broken: /healthz says so; streams get nothing new.
        Err(e) => log::debug!("live snapshot: {e}"),
    }
}

pub fn snapshot_of(api: &ApiState, now_ns: u64) -> Result<Snapshot, Broken> {
    let (leaks, sizing, connections, trend_pools) = api.state.with(|s| {
        let leaks: Vec<LeakReport> = s
            .leaks
            .open_reports()
            .filter(|r| r.status == ReportStatus::Open)
            .cloned()
            .collect();
        let sizing = sizing_advice(s, &api.telemetry, api.sizing, now_ns);
        let tracker = &s.tracker;
        let shown = tracker
            .open_connections()
            .filter(|c| c.is_open())
            .take(CONNECTIONS_SHOWN)
            .map(|c| connection_view(c, tracker.placement(c.id.pid), &api.clock, now_ns))
            .collect();
        let connections = LiveConnections {
            open: tracker.open_count(),
            shown,
        };
        (leaks, sizing, connections, s.trends.series())
    })?;
    Ok(Snapshot {
        at: api.clock.rfc3339(now_ns),
        leaks,
        pools: pools_response(api, now_ns)?,
        sizing,
        queries: query_latency_response(api, now_ns),
        connections,
        trends: LiveTrends {
            step_seconds: trends::STEP_NS / 1_000_000_000,
            span_seconds: trends::SPAN_NS / 1_000_000_000,
            pools: trend_pools,
        },
    })
}

/// `GET /api/v1/live`: one snapshot.
pub async fn snapshot(State(api): State<ApiState>) -> Response {
    match snapshot_of(&api, monotonic_ns()) {
        Ok(snapshot) => Json(snapshot).into_response(),
        Err(e) => broken(e),
    }
}

/// Builds a snapshot every [`EVERY`] while a stream is open.
pub async fn produce(api: ApiState) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if api.live.latest.receiver_count() > 0 {
            publish(&api, monotonic_ns());
        }
    }
}

/// `GET /api/v1/live/events`: a snapshot every [`EVERY`] as Server-Sent
/// Events (`event: snapshot`, its JSON on one `data:` line), for at most
/// [`STREAM_LIFETIME`]; 503 when [`MAX_STREAMS`] are open.
pub async fn events(State(api): State<ApiState>) -> Response {
    let Ok(permit) = api.live.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "10")],
            format!("at most {MAX_STREAMS} live streams are open; GET {SNAPSHOT} instead\n"),
        )
            .into_response();
    };
    let mut latest = api.live.latest.subscribe();
    let (frames, rx) = mpsc::channel::<Result<String, Infallible>>(1);
    tokio::spawn(async move {
        // The first snapshot at once, not at the producer's next tick.
        api.live.freshen(&api);
        let _slot = permit;
        let deadline = tokio::time::Instant::now() + STREAM_LIFETIME;
        // Reconnect after 2 s if the stream breaks.
        if frames.send(Ok("retry: 2000\n\n".into())).await.is_err() {
            return;
        }
        let mut first = true;
        loop {
            let current = latest.borrow_and_update().clone();
            // A snapshot left from before anyone watched is stale: the
            // next one comes within EVERY.
            let stale = monotonic_ns().saturating_sub(current.at_ns) > 2 * EVERY.as_nanos() as u64;
            let skip = current.json.is_empty() || (first && stale);
            if !skip {
                let frame = format!("event: snapshot\ndata: {}\n\n", current.json);
                if frames.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            first = false;
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
                () = frames.closed() => return,
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(Frames(rx)),
    )
        .into_response()
}

/// The stream's frames, as the body reads them.
struct Frames(mpsc::Receiver<Result<String, Infallible>>);

impl futures_core::Stream for Frames {
    type Item = Result<String, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
