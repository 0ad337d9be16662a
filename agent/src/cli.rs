//! Command-line interface: `run`, `check`, and the commands that read a
//! running agent's API.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::{
    api::{
        ConnectionView, ConnectionsResponse, PoolsResponse, QueryLatencyResponse,
        CONNECTIONS_PAGE_MAX, POOL_HEALTH, QUERY_LATENCY, SIZING,
    },
    config::{DataPath, Overrides},
    detect::pool_health::{HealthResponse, Status},
    detect::sizing::SizingResponse,
    lifecycle::ConnState,
    percentiles::Percentiles,
    reports::SlowQueriesResponse,
    reports::{LeakReport, LeaksResponse},
};

#[derive(Debug, Parser)]
#[command(
    name = "poolscope",
    version,
    about = "See database connection pools from the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel probes and serve metrics and the API (needs root).
    Run(RunArgs),
    /// Report what this kernel supports, one line per feature.
    Check,
    /// Show the connections a running agent tracks.
    Connections(ConnectionsArgs),
    /// Show recent slow queries from a running agent.
    Queries(ClientArgs),
    /// Show leak reports (open first, then recently resolved).
    Leaks(ClientArgs),
    /// Show every pool: adapter pools and implicit ones.
    Pools(ClientArgs),
    /// Advise each adapter pool's max (grow, shrink or keep, and why) from
    /// its use over the last hour.
    Sizing(ClientArgs),
    /// Say whether each pool is ok, a warning or critical, and why. Exits 0
    /// when every pool is ok, 1 on a warning, 2 when one is critical, 3
    /// when the agent cannot tell (the Nagios convention).
    Health(HealthArgs),
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only this process's pools.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only pools of this name.
    #[arg(long)]
    pub pool: Option<String>,
}

#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Include closed and failed connections (kept for a while after they end).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file; flags override it.
    #[arg(long, short = 'c', env = "POOLSCOPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP listener (metrics and API).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Size of the kernel ring buffer in bytes (a power of two, >= 4096).
    #[arg(long)]
    pub ring_buffer_bytes: Option<u32>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Keep BPF run-time statistics per kernel program (poolscope.probe.*);
    /// they cost a little on every run, so they are off unless measuring.
    #[arg(long)]
    pub probe_stats: bool,
    /// Hooks that copy socket data: auto, socket or syscalls
    /// (docs/data-path.md).
    #[arg(long, value_enum)]
    pub data_path: Option<DataPath>,
}

impl RunArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            ring_buffer_bytes: self.ring_buffer_bytes,
            log_level: self.log_level.clone(),
            probe_stats: self.probe_stats,
            data_path: self.data_path,
        }
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Address of the running agent's HTTP listener.
    #[arg(long, default_value = "127.0.0.1:9464", env = "POOLSCOPE_AGENT")]
    pub agent: SocketAddr,
    /// File holding the agent's API bearer token, for an agent configured
    /// with one (the environment variable POOLSCOPE_TOKEN works too; a
    /// token is never taken on the command line, where `ps` would show it).
    #[arg(long, env = "POOLSCOPE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    /// A client for the agent these arguments name, with its token.
    pub fn client(&self) -> anyhow::Result<AgentClient> {
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var("POOLSCOPE_TOKEN").ok(),
        };
        Ok(AgentClient {
            addr: self.agent,
            token: token.filter(|t| !t.is_empty()),
        })
    }
}

/// A running agent's API, as the CLI reads it.
pub struct AgentClient {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl AgentClient {
    /// A client for an agent whose API needs no token.
    pub fn without_token(addr: SocketAddr) -> AgentClient {
        AgentClient { addr, token: None }
    }

    /// GET `path`, which must answer 200.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let (code, body) = self.request(path)?;
        if code != 200 {
            bail!("the agent at {} answered {code} for {path}", self.addr);
        }
        Ok(body)
    }

    /// A minimal HTTP/1.0 GET: the CLI only ever talks to a local agent.
    /// Returns the status code and the body; a refused token is an error.
    pub fn request(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let agent = self.addr;
        let unreachable =
            || format!("cannot reach the agent at {agent}; is `poolscope run` running?");
        let mut stream =
            TcpStream::connect_timeout(&agent, Duration::from_secs(3)).with_context(unreachable)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let authorization = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {agent}\r\n{authorization}\r\n"
        )
        .with_context(unreachable)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).with_context(unreachable)?;
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("the agent at {agent} sent a malformed response");
        };
        let status = head.lines().next().unwrap_or_default();
        let Some(code) = status.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()) else {
            bail!("the agent at {agent} sent a malformed status line: {status:?}");
        };
        if code == 401 {
            bail!(
                "the agent at {agent} wants a bearer token for {path}{}: pass --token-file \
                 or set POOLSCOPE_TOKEN",
                if self.token.is_some() {
                    " and refused the one given"
                } else {
                    ""
                }
            );
        }
        Ok((code, body.to_string()))
    }
}

/// Every connection a running agent lists, following its pages.
pub fn fetch_connections(agent: &AgentClient) -> anyhow::Result<Vec<ConnectionView>> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            // Cursors are digits, dots and minus signs: nothing to escape.
            Some(cursor) => {
                format!("/api/v1/connections?limit={CONNECTIONS_PAGE_MAX}&after={cursor}")
            }
            None => format!("/api/v1/connections?limit={CONNECTIONS_PAGE_MAX}"),
        };
        let body = agent.get(&path)?;
        let page: ConnectionsResponse = serde_json::from_str(&body)
            .context("the agent's /api/v1/connections is not valid JSON")?;
        all.extend(page.connections);
        match page.next {
            Some(next) if after.as_ref() != Some(&next) => after = Some(next),
            Some(next) => bail!("the agent's /api/v1/connections repeated the cursor {next}"),
            None => return Ok(all),
        }
    }
}

pub fn connections(args: &ConnectionsArgs) -> anyhow::Result<()> {
    let mut response = ConnectionsResponse {
        connections: fetch_connections(&args.client.client()?)?,
        next: None,
    };
    if !args.all {
        response
            .connections
            .retain(|c| !matches!(c.state, ConnState::Closed | ConnState::Failed));
    }
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else {
        print!("{}", connections_table(&response.connections));
    }
    Ok(())
}

pub fn queries(args: &ClientArgs) -> anyhow::Result<()> {
    let client = args.client()?;
    let latency_body = client.get(QUERY_LATENCY)?;
    let body = client.get("/api/v1/queries/slow")?;
    if args.json {
        println!("{{\"latency\":{latency_body},\"slow\":{body}}}");
        return Ok(());
    }
    let latency: QueryLatencyResponse = serde_json::from_str(&latency_body)
        .with_context(|| format!("the agent's {QUERY_LATENCY} is not valid JSON"))?;
    let response: SlowQueriesResponse = serde_json::from_str(&body)
        .context("the agent's /api/v1/queries/slow is not valid JSON")?;
    println!("{}", query_latency_table(&latency));
    print!("{}", slow_queries_table(&response));
    Ok(())
}

/// A duration in seconds as a person reads it: 0, 850us, 12.3ms, 1.20s.
pub fn short_duration(seconds: f64) -> String {
    if seconds <= 0.0 {
        "0".to_string()
    } else if seconds < 1e-3 {
        format!("{:.0}us", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.1}ms", seconds * 1e3)
    } else {
        format!("{seconds:.2}s")
    }
}

/// A number, or "-" for none.
fn or_dash(n: Option<u32>) -> String {
    n.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// "p50 / p95 / p99" of a window, or "-" without samples.
fn percentile_cells(p: Option<&Percentiles>) -> [String; 3] {
    match p {
        Some(p) => [p.p50, p.p95, p.p99].map(short_duration),
        None => ["-", "-", "-"].map(String::from),
    }
}

pub fn query_latency_table(response: &QueryLatencyResponse) -> String {
    let mut out = format!(
        "query latency over the last {} s, slowest p99 first\n{:<10} {:<28} {:<16} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
        response.window_seconds, "SYSTEM", "SERVER", "OPERATION", "COUNT", "P50", "P95", "P99", "MAX"
    );
    for q in &response.queries {
        let [p50, p95, p99] = percentile_cells(Some(&q.duration_seconds));
        out.push_str(&format!(
            "{:<10} {:<28} {:<16} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
            q.db_system,
            q.server,
            q.operation.as_deref().unwrap_or("-"),
            q.duration_seconds.count,
            p50,
            p95,
            p99,
            short_duration(q.duration_seconds.max)
        ));
    }
    out
}

pub fn slow_queries_table(response: &SlowQueriesResponse) -> String {
    let mut out = format!(
        "slow queries (over {:.0} ms), newest first\n{:<24} {:>7} {:<14} {:<10} {:<22} {:>10} {:<8} {}\n",
        response.threshold_seconds * 1e3,
        "AT",
        "PID",
        "PROCESS",
        "SYSTEM",
        "SERVER",
        "DURATION",
        "ERROR",
        "QUERY"
    );
    for q in &response.slow_queries {
        out.push_str(&format!(
            "{:<24} {:>7} {:<14} {:<10} {:<22} {:>8.1}ms {:<8} {}\n",
            q.at,
            q.pid,
            q.process,
            q.db_system,
            q.server,
            q.duration_seconds * 1e3,
            q.error.as_ref().map(|e| e.code.as_str()).unwrap_or("-"),
            q.query.as_deref().unwrap_or("-")
        ));
    }
    out
}

fn endpoint(address: Option<&str>, port: Option<u16>) -> String {
    match (address, port) {
        (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "-".to_string(),
    }
}

pub fn connections_table(rows: &[ConnectionView]) -> String {
    let mut out = format!(
        "{:>7} {:<16} {:>4} {:<22} {:<28} {:<12} {:<10} {:>10} {:>10} {}\n",
        "PID", "PROCESS", "FD", "LOCAL", "REMOTE", "STATE", "DB", "CONNECT", "AGE", "NOTE"
    );
    for c in rows {
        let connect = c
            .connect_latency_seconds
            .map(|s| format!("{:.2}ms", s * 1e3))
            .unwrap_or_else(|| "-".into());
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut note = Vec::new();
        if c.seen_at_start {
            note.push("seen-at-start".to_string());
        }
        if let Some(result) = c.connect_result {
            if result != crate::lifecycle::ConnectOutcome::Ok {
                note.push(result.as_str().to_string());
            }
        }
        if c.encrypted {
            note.push("tls".into());
        }
        if let Some(tx) = c.tx_state {
            if tx != crate::protocol::TxState::Idle {
                if let Ok(serde_json::Value::String(name)) = serde_json::to_value(tx) {
                    note.push(name);
                }
            }
        }
        if let Some(query) = &c.last_query {
            let short: String = query.chars().take(60).collect();
            note.push(format!("last: {short}"));
        }
        let db = c.db_system.map(|d| d.as_str()).unwrap_or("-");
        out.push_str(&format!(
            "{:>7} {:<16} {:>4} {:<22} {:<28} {:<12} {:<10} {:>10} {:>9.1}s {}\n",
            c.pid,
            c.process,
            c.fd,
            endpoint(c.local_address.as_deref(), c.local_port),
            endpoint(Some(&c.remote_address), c.remote_port),
            state,
            db,
            connect,
            c.lifetime_seconds,
            note.join(",")
        ));
    }
    out
}

pub fn leaks(args: &ClientArgs) -> anyhow::Result<()> {
    let body = args.client()?.get("/api/v1/leaks")?;
    let response: LeaksResponse =
        serde_json::from_str(&body).context("the agent's /api/v1/leaks is not valid JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else {
        print!("{}", leaks_table(&response.reports));
    }
    Ok(())
}

fn json_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "-".into(),
    }
}

pub fn leaks_table(reports: &[LeakReport]) -> String {
    let mut out = format!(
        "{:>4} {:<20} {:<8} {:>7} {:<14} {:<16} {:<22} {:>4} {:>8}  {}\n",
        "ID", "KIND", "STATUS", "PID", "PROCESS", "POOL", "LOCAL", "FD", "HELD", "EVIDENCE"
    );
    for r in reports {
        let held = r
            .held_for_seconds
            .or(r.wait_seconds)
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        let mut evidence = r.evidence.clone();
        if let Some(resolution) = &r.resolution {
            evidence = format!("{evidence} [{resolution}]");
        }
        if let Some(query) = &r.last_query {
            let short: String = query.chars().take(50).collect();
            evidence = format!("{evidence}; last query: {short}");
        }
        out.push_str(&format!(
            "{:>4} {:<20} {:<8} {:>7} {:<14} {:<16} {:<22} {:>4} {:>8}  {}\n",
            r.id,
            json_name(&r.kind),
            json_name(&r.status),
            r.pid,
            r.process,
            r.pool.as_deref().unwrap_or("-"),
            r.local_address.as_deref().unwrap_or("-"),
            r.fd.map(|fd| fd.to_string()).unwrap_or_else(|| "-".into()),
            held,
            evidence
        ));
        // The holder's code under its row, as a JVM prints a stack.
        for frame in r.holder_stack.iter().flatten() {
            out.push_str(&format!("{:>12} at {frame}\n", ""));
        }
    }
    out
}

pub fn pools(args: &ClientArgs) -> anyhow::Result<()> {
    let body = args.client()?.get("/api/v1/pools")?;
    let response: PoolsResponse =
        serde_json::from_str(&body).context("the agent's /api/v1/pools is not valid JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(());
    }
    print!("{}", pools_table(&response));
    Ok(())
}

pub fn pools_table(response: &PoolsResponse) -> String {
    let mut out = format!(
        "wait and use percentiles over the last {} s\n{:>7} {:<14} {:<32} {:<8} {:<10} {:>5} {:>5} {:>5} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
        response.window_seconds,
        "PID",
        "PROCESS",
        "POOL",
        "SOURCE",
        "DB",
        "USED",
        "IDLE",
        "MAX",
        "PENDING",
        "ACQUIRES",
        "TIMEOUTS",
        "WAIT50",
        "WAIT99",
        "USE50",
        "USE99"
    );
    for pool in &response.pools {
        let [wait50, _, wait99] = percentile_cells(pool.percentiles.wait_seconds.as_ref());
        let [use50, _, use99] = percentile_cells(pool.percentiles.use_seconds.as_ref());
        let p = &pool.view;
        out.push_str(&format!(
            "{:>7} {:<14} {:<32} {:<8} {:<10} {:>5} {:>5} {:>5} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8}\n",
            p.pid,
            p.process,
            p.name,
            if p.from_adapter {
                "adapter"
            } else {
                "inferred"
            },
            p.db_system.as_ref().map_or("-", |d| d.as_str()),
            p.used,
            p.idle,
            or_dash(p.max),
            p.pending,
            p.acquires,
            p.timeouts,
            wait50,
            wait99,
            use50,
            use99
        ));
    }
    out
}

pub fn sizing(args: &ClientArgs) -> anyhow::Result<()> {
    let body = args.client()?.get(SIZING)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let response: SizingResponse = serde_json::from_str(&body)
        .with_context(|| format!("the agent's {SIZING} is not valid JSON"))?;
    print!("{}", sizing_table(&response));
    Ok(())
}

pub fn sizing_table(response: &SizingResponse) -> String {
    let mut out = format!(
        "sizing advice from the last {} s\n{:>7} {:<14} {:<32} {:<17} {:>5} {:>7} {}\n",
        response.window_seconds, "PID", "PROCESS", "POOL", "VERDICT", "MAX", "ADVISED", "WHY"
    );
    for p in &response.pools {
        out.push_str(&format!(
            "{:>7} {:<14} {:<32} {:<17} {:>5} {:>7} {}\n",
            p.pid,
            p.process,
            p.pool,
            p.advice.verdict.as_str(),
            or_dash(p.advice.max),
            or_dash(p.advice.recommended_max),
            p.advice.reason
        ));
    }
    out
}

/// `/api/v1/health`'s query for these arguments, its values escaped.
fn health_path(args: &HealthArgs) -> String {
    let mut params = Vec::new();
    if let Some(pid) = args.pid {
        params.push(format!("pid={pid}"));
    }
    if let Some(pool) = &args.pool {
        params.push(format!("pool={}", percent_encode(pool)));
    }
    if params.is_empty() {
        POOL_HEALTH.to_string()
    } else {
        format!("{POOL_HEALTH}?{}", params.join("&"))
    }
}

/// `text` with everything but unreserved URL characters percent-encoded.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prints the pools' health; returns the worst status.
pub fn health(args: &HealthArgs) -> anyhow::Result<Status> {
    let path = health_path(args);
    let (code, body) = args.client.client()?.request(&path)?;
    if code == 404 {
        bail!("the agent knows no pool for {path}");
    }
    if code != 200 && code != 503 {
        bail!("the agent answered {code} for {path}: {}", body.trim());
    }
    let response: HealthResponse = serde_json::from_str(&body)
        .with_context(|| format!("the agent's {POOL_HEALTH} is not valid JSON"))?;
    if args.client.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else {
        print!("{}", health_table(&response));
    }
    Ok(response.status)
}

/// The health table: one line per pool, then its reasons indented.
pub fn health_table(response: &HealthResponse) -> String {
    let mut out = format!(
        "{:<9} {:>7} {:<14} {:<32} {:>5} {:>5} {:>5} {:>8}\n",
        "STATUS", "PID", "PROCESS", "POOL", "USED", "IDLE", "MAX", "PENDING"
    );
    for p in &response.pools {
        out.push_str(&format!(
            "{:<9} {:>7} {:<14} {:<32} {:>5} {:>5} {:>5} {:>8}\n",
            p.status.as_str(),
            p.pid,
            p.process,
            p.pool,
            p.used,
            p.idle,
            or_dash(p.max),
            p.pending
        ));
        for r in &p.reasons {
            out.push_str(&format!(
                "          {:<8} {:<16} {}\n",
                r.status.as_str(),
                r.rule,
                r.detail
            ));
        }
    }
    out.push_str(&format!("overall: {}\n", response.status.as_str()));
    out
}
