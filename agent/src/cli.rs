//! Command-line interface: `run`, `check`, and the commands that read a
//! running agent's API.

use std::{
    fmt,
    io::Read,
    net::SocketAddr,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
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
    /// The running agent's HTTP listener: host:port (a name or an IP
    /// address, IPv6 in brackets: [::1]:9464), or an http:// URL, with the
    /// path prefix an API served under one needs (http://host:port/poolscope).
    #[arg(
        long,
        default_value = "127.0.0.1:9464",
        env = "POOLSCOPE_AGENT",
        value_parser = AgentUrl::parse
    )]
    pub agent: AgentUrl,
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
        Ok(AgentClient::new(
            self.agent.clone(),
            token.filter(|t| !t.is_empty()),
        ))
    }
}

/// What `--agent` accepts, for its error messages.
const AGENT_FORMS: &str =
    "expected host:port or http://host:port[/prefix], e.g. localhost:9464 or [::1]:9464";

/// Where a running agent's API is: an http:// origin and an optional path
/// prefix, as `--agent` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUrl {
    /// `http://host:port[/prefix]`, without a trailing slash, so that an
    /// API path (`/api/v1/...`) is appended as it is.
    base: String,
}

impl AgentUrl {
    /// Parses `host:port` or `http://host:port[/prefix]`; the error says
    /// what is wrong and which forms are accepted.
    pub fn parse(text: &str) -> Result<AgentUrl, String> {
        match text.split_once("://") {
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => Self::parse_url(text),
            // reqwest is compiled without TLS (the agent serves plain HTTP);
            // a TLS stack only for this would add rustls and its crypto crates.
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => Err(
                "https is not supported: the agent serves plain HTTP; reach a remote one \
                 through a tunnel (ssh -L 9464:127.0.0.1:9464 HOST) and use localhost:9464"
                    .to_string(),
            ),
            Some((scheme, _)) => Err(format!("{scheme}:// is not supported; {AGENT_FORMS}")),
            None => Self::parse_host_port(text),
        }
    }

    fn parse_host_port(text: &str) -> Result<AgentUrl, String> {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("no port; {AGENT_FORMS}"));
        };
        if host.is_empty() {
            return Err(format!("no host; {AGENT_FORMS}"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(format!(
                "an IPv6 address takes brackets: [{host}]:{port}; {AGENT_FORMS}"
            ));
        }
        let port = parse_port(port)?;
        // The URL parser checks the host (names, IPv4, bracketed IPv6); any
        // part beyond a host (a path, user info) means it was no plain host.
        let url = reqwest::Url::parse(&format!("http://{host}:{port}")).map_err(|e| {
            format!("{host:?} is not a host name or IP address ({e}); {AGENT_FORMS}")
        })?;
        match url.host_str() {
            Some(parsed)
                if url.username().is_empty()
                    && url.password().is_none()
                    && url.path() == "/"
                    && url.query().is_none()
                    && url.fragment().is_none() =>
            {
                Ok(AgentUrl {
                    base: format!("http://{parsed}:{port}"),
                })
            }
            _ => Err(format!(
                "{host:?} is not a host name or IP address; {AGENT_FORMS}"
            )),
        }
    }

    fn parse_url(text: &str) -> Result<AgentUrl, String> {
        let url = reqwest::Url::parse(text)
            .map_err(|e| format!("not a valid URL ({e}); {AGENT_FORMS}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "credentials do not belong in --agent (`ps` shows them): give the agent's \
                 bearer token with --token-file or POOLSCOPE_TOKEN"
                    .to_string(),
            );
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "the agent's URL takes no query or fragment; {AGENT_FORMS}"
            ));
        }
        let Some(host) = url.host_str() else {
            return Err(format!("no host; {AGENT_FORMS}"));
        };
        let port = match url.port_or_known_default() {
            Some(0) | None => return Err(format!("port 0 is no agent's port; {AGENT_FORMS}")),
            Some(port) => port,
        };
        let prefix = url.path().trim_end_matches('/');
        Ok(AgentUrl {
            base: format!("http://{host}:{port}{prefix}"),
        })
    }

    /// The URL of `path` (which starts with `/`) on this agent.
    pub fn join(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A TCP port from `--agent`: 1 to 65535.
fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!(
            "{text:?} is not a port (1 to 65535); {AGENT_FORMS}"
        )),
    }
}

impl std::str::FromStr for AgentUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<AgentUrl, String> {
        AgentUrl::parse(text)
    }
}

impl From<SocketAddr> for AgentUrl {
    fn from(addr: SocketAddr) -> AgentUrl {
        AgentUrl {
            base: format!("http://{addr}"),
        }
    }
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// How long the TCP connect to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the agent may take to start its answer, and each read of it.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole exchange may take; checked between reads, so a read
/// under way may run up to READ_TIMEOUT past it.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// The largest answer read. The API's pages are bounded far below this
/// (a connections page ends near 1 MiB); anything larger is no agent's.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// A running agent's API, as the CLI reads it.
pub struct AgentClient {
    pub agent: AgentUrl,
    pub token: Option<String>,
    /// Built on the first request, so that constructing a client cannot fail.
    http: OnceLock<reqwest::blocking::Client>,
}

impl AgentClient {
    pub fn new(agent: AgentUrl, token: Option<String>) -> AgentClient {
        AgentClient {
            agent,
            token,
            http: OnceLock::new(),
        }
    }

    /// A client for an agent whose API needs no token.
    pub fn without_token(agent: impl Into<AgentUrl>) -> AgentClient {
        AgentClient::new(agent.into(), None)
    }

    fn http(&self) -> anyhow::Result<&reqwest::blocking::Client> {
        if let Some(http) = self.http.get() {
            return Ok(http);
        }
        // reqwest has no TLS crypto provider of its own (see the root
        // Cargo.toml): building a client without one installed panics.
        crate::https::install_crypto_provider();
        let http = reqwest::blocking::Client::builder()
            .user_agent(concat!("poolscope/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(READ_TIMEOUT)
            // No proxy from HTTP_PROXY/ALL_PROXY: the agent is on this host
            // or one the user named, and a proxy set for the web would get
            // the bearer token (and usually cannot reach 127.0.0.1 anyway).
            .no_proxy()
            // The agent never redirects; following a redirect from whatever
            // else answers would send the request (and token) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(self.http.get_or_init(|| http))
    }

    /// GET `path`, which must answer 200.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let (code, body) = self.request(path)?;
        if code != 200 {
            bail!("the agent at {} answered {code} for {path}", self.agent);
        }
        Ok(body)
    }

    /// GET `path`: the status code and the body; a refused token is an error.
    pub fn request(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let agent = &self.agent;
        let started = Instant::now();
        let mut request = self.http()?.get(agent.join(path));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().map_err(|e| {
            let e = e.without_url();
            let what = if e.is_connect() {
                format!("cannot reach the agent at {agent}; is `poolscope run` running?")
            } else if e.is_timeout() {
                format!(
                    "the agent at {agent} did not answer {path} within {} s",
                    READ_TIMEOUT.as_secs()
                )
            } else {
                format!("the agent at {agent} sent no valid HTTP answer to {path}")
            };
            anyhow::Error::new(e).context(what)
        })?;
        let code = response.status().as_u16();
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
        let body = self.read_answer(&mut response, path, started)?;
        Ok((code, body))
    }

    /// The body of `response`, at most [`MAX_ANSWER_BYTES`], read by
    /// [`EXCHANGE_DEADLINE`] after `started`.
    fn read_answer(
        &self,
        response: &mut reqwest::blocking::Response,
        path: &str,
        started: Instant,
    ) -> anyhow::Result<String> {
        let agent = &self.agent;
        let too_large = || {
            anyhow!(
                "the answer of {agent} to {path} is larger than {} MiB, far more than any \
                 page of the agent's API",
                MAX_ANSWER_BYTES >> 20
            )
        };
        if response
            .content_length()
            .is_some_and(|length| length > MAX_ANSWER_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let read = response.read(&mut chunk).with_context(|| {
                format!("the agent at {agent} stopped sending its answer to {path}")
            })?;
            if read == 0 {
                break;
            }
            if body.len() + read > MAX_ANSWER_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk[..read]);
            if started.elapsed() > EXCHANGE_DEADLINE {
                bail!(
                    "the agent at {agent} took more than {} s to answer {path}",
                    EXCHANGE_DEADLINE.as_secs()
                );
            }
        }
        String::from_utf8(body)
            .map_err(|_| anyhow!("the answer of {agent} to {path} is not UTF-8 text"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> String {
        AgentUrl::parse(text)
            .unwrap_or_else(|e| panic!("{text:?} is refused: {e}"))
            .join("/api/v1/leaks")
    }

    fn refused(text: &str) -> String {
        match AgentUrl::parse(text) {
            Ok(url) => panic!("{text:?} is accepted as {url}"),
            Err(e) => e,
        }
    }

    #[test]
    fn agent_host_and_port() {
        for (text, url) in [
            ("localhost:9464", "http://localhost:9464/api/v1/leaks"),
            ("LocalHost:9464", "http://localhost:9464/api/v1/leaks"),
            ("127.0.0.1:19464", "http://127.0.0.1:19464/api/v1/leaks"),
            ("[::1]:9464", "http://[::1]:9464/api/v1/leaks"),
            (
                "agent-1.example.org:1",
                "http://agent-1.example.org:1/api/v1/leaks",
            ),
        ] {
            assert_eq!(parsed(text), url, "{text}");
        }
    }

    #[test]
    fn agent_url_with_and_without_prefix() {
        for (text, url) in [
            (
                "http://localhost:9464",
                "http://localhost:9464/api/v1/leaks",
            ),
            (
                "http://localhost:9464/",
                "http://localhost:9464/api/v1/leaks",
            ),
            ("HTTP://[::1]:9464", "http://[::1]:9464/api/v1/leaks"),
            (
                "http://host:8080/poolscope",
                "http://host:8080/poolscope/api/v1/leaks",
            ),
            ("http://host:8080/a/b/", "http://host:8080/a/b/api/v1/leaks"),
            // No port in a URL: the scheme's own.
            (
                "http://host/poolscope",
                "http://host:80/poolscope/api/v1/leaks",
            ),
        ] {
            assert_eq!(parsed(text), url, "{text}");
        }
    }

    #[test]
    fn agent_from_socket_address() {
        let v4: SocketAddr = "127.0.0.1:9464".parse().expect("address");
        let v6: SocketAddr = "[::1]:9464".parse().expect("address");
        assert_eq!(
            AgentUrl::from(v4),
            AgentUrl::parse("127.0.0.1:9464").expect("valid")
        );
        assert_eq!(AgentUrl::from(v6).to_string(), "http://[::1]:9464");
    }

    #[test]
    fn bad_agent_values_say_why_and_what_is_expected() {
        for (text, why) in [
            ("foo", "no port"),
            ("", "no port"),
            (":9464", "no host"),
            ("::1:9464", "IPv6 address takes brackets: [::1]:9464"),
            ("localhost:0", "is not a port"),
            ("localhost:65536", "is not a port"),
            ("localhost:http", "is not a port"),
            ("localhost:9464/", "is not a port"),
            ("[nope]:9464", "is not a host name or IP address"),
            ("exa mple:9464", "is not a host name or IP address"),
            ("foo/bar:9464", "is not a host name or IP address"),
            ("user@host:9464", "is not a host name or IP address"),
            ("999.1.1.1:9464", "is not a host name or IP address"),
            ("ftp://host:21", "ftp:// is not supported"),
            ("http://", "not a valid URL"),
            ("http://host:0/", "port 0"),
            ("http://host:9464/?pid=1", "no query or fragment"),
            ("http://host:9464/#top", "no query or fragment"),
        ] {
            let error = refused(text);
            assert!(error.contains(why), "{text:?}: {error}");
            assert!(
                error.contains("expected host:port or http://host:port"),
                "{text:?}: {error}"
            );
        }
    }

    #[test]
    fn https_and_credentials_are_refused_with_their_reason() {
        let https = refused("https://host:9464");
        assert!(https.contains("https is not supported"), "{https}");
        assert!(https.contains("plain HTTP"), "{https}");
        let credentials = refused("http://user:secret@host:9464");
        assert!(credentials.contains("--token-file"), "{credentials}");
        assert!(!credentials.contains("secret"), "{credentials}");
    }

    #[test]
    fn agent_flag_default_and_parse_error() {
        let Command::Pools(args) = Cli::try_parse_from(["poolscope", "pools"])
            .expect("parses")
            .command
        else {
            panic!("not the pools command");
        };
        if std::env::var_os("POOLSCOPE_AGENT").is_none() {
            assert_eq!(args.agent.to_string(), "http://127.0.0.1:9464");
        }
        let Command::Leaks(args) =
            Cli::try_parse_from(["poolscope", "leaks", "--agent", "[::1]:19464"])
                .expect("parses")
                .command
        else {
            panic!("not the leaks command");
        };
        assert_eq!(args.agent.to_string(), "http://[::1]:19464");
        let error = Cli::try_parse_from(["poolscope", "health", "--agent", "foo"])
            .expect_err("foo has no port");
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        let message = error.to_string();
        assert!(
            message.contains("--agent") && message.contains("expected host:port"),
            "{message}"
        );
    }
}
