//! The real agent binary as a fixture: started with a config, read
//! through its API, its metrics and its CLI, stopped on drop.

use std::{
    fs::{self, File},
    io::Write,
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{
    agent_bin, free_port, metric_sample, metric_samples, operation_counts, path_str, read_lossy,
    tcp_listening, wait_exit, wait_until, ConnectionView, ConnectionsResponse, LeakReport,
    LeaksResponse, OperationCounts, PoolView, PoolsResponse, SlowQueriesResponse, SlowQuery,
    TempDir, EVENT_TIMEOUT,
};

/// What [`Agent::get_raw`] got back.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub body: String,
    /// From the connect to the end of the answer.
    pub took: Duration,
}

/// A running `poolscope run`, listening on its own loopback port, logging to
/// a file. SIGTERM and wait on drop.
pub struct Agent {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// Starts the agent with extra `run` arguments and waits (30 s at most)
    /// until `/healthz` answers. Panics with the agent's log if it exits first.
    pub fn start_with(args: &[&str]) -> Agent {
        Agent::launch(TempDir::new("poolscope-agent"), args)
    }

    /// Starts the agent with `toml` as its configuration file (written to
    /// the agent's temp dir) and extra `run` arguments.
    pub fn start_with_config(toml: &str, args: &[&str]) -> Agent {
        Agent::start_with_config_until(toml, args, "/healthz")
    }

    /// As [`Agent::start_with_config`], but waits only until `health_path`
    /// (e.g. `/healthz/live` for an agent that is not meant to be ready)
    /// answers `ok`.
    pub fn start_with_config_until(toml: &str, args: &[&str], health_path: &str) -> Agent {
        let dir = TempDir::new("poolscope-agent");
        let config = dir.path().join("poolscope.toml");
        fs::write(&config, toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let config = path_str(&config).to_string();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        Agent::launch_until(dir, &all, health_path)
    }

    fn launch(dir: TempDir, args: &[&str]) -> Agent {
        Agent::launch_until(dir, args, "/healthz")
    }

    fn launch_until(dir: TempDir, args: &[&str], health_path: &str) -> Agent {
        let bin = agent_bin();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("valid address");
        let log_path = dir.path().join("agent.log");
        let log = File::create(&log_path).expect("cannot create the agent log");
        let log_err = log.try_clone().expect("cannot dup the agent log");
        let child = Command::new(&bin)
            .args(["run", "--listen", &addr.to_string()])
            .args(args)
            .env_remove("POOLSCOPE_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut agent = Agent { addr, child, dir };
        let ready = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent ({}) exited before serving /healthz: {status}\n--- agent log ---\n{}",
                    bin.display(),
                    agent.log()
                );
            }
            // Connect only once the port listens: a refused probe would count
            // as a refused connect in every other agent that runs meanwhile.
            if !tcp_listening(addr.port()) {
                return None;
            }
            agent
                .get(health_path)
                .ok()
                .filter(|body| body.trim() == "ok")
        });
        if ready.is_none() {
            panic!(
                "the agent did not answer {health_path} on {addr} within 30 s\n--- agent log ---\n{}",
                agent.log()
            );
        }
        agent
    }

    /// The status code and body of GET `path`, whatever the status.
    pub fn get_with_status(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.get_raw(path, None).map(|r| (r.status, r.body))
    }

    /// One HTTP/1.0 GET of `path`, with `Authorization: Bearer token` when
    /// given: the status, the body and how long the whole exchange took
    /// (connect to the end of the answer). The tests' one raw GET.
    pub fn get_raw(&self, path: &str, token: Option<&str>) -> anyhow::Result<RawResponse> {
        use std::io::Read;
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\n{auth}\r\n",
            self.addr
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("malformed response: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
        Ok(RawResponse {
            status,
            body: body.to_string(),
            took,
        })
    }

    /// Sends SIGTERM and waits (30 s at most) for the agent to exit: its
    /// exit status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let pid = i32::try_from(self.child.id()).expect("pid fits in i32");
        // SAFETY: plain kill(2) on our own child, which we have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = wait_exit(&mut self.child, Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "the agent did not exit within 30 s of SIGTERM\n--- agent log ---\n{}",
                self.log()
            )
        });
        (status, started.elapsed())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("agent.log"))
    }

    fn client(&self) -> poolscope::cli::AgentClient {
        poolscope::cli::AgentClient::without_token(self.addr)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        self.client().get(path)
    }

    /// Every connection the agent lists, following its pages.
    pub fn connections(&self) -> Vec<ConnectionView> {
        poolscope::cli::fetch_connections(&self.client())
            .unwrap_or_else(|e| panic!("GET /api/v1/connections: {e:#}"))
    }

    /// The connections of one process (one page: a test's process holds
    /// far fewer than a page).
    pub fn connections_of(&self, pid: u32) -> Vec<ConnectionView> {
        let path = format!("/api/v1/connections?pid={pid}&limit=10000");
        let body = self
            .get(&path)
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        let response: ConnectionsResponse = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path} is not valid JSON ({e}): {body}"));
        response.connections
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e:#}"))
    }

    /// Value of the first sample matching `selector` (see [`metric_sample`]),
    /// 0 when there is none (counters and gauges appear on first use).
    pub fn metric_value(&self, selector: &str) -> f64 {
        metric_sample(&self.metrics(), selector).unwrap_or(0.0)
    }

    /// Polls the process's connections until `f` accepts them, for at most
    /// [`EVENT_TIMEOUT`]; panics with what the agent last showed and its log.
    pub fn wait_for<T>(
        &self,
        pid: u32,
        what: &str,
        mut f: impl FnMut(&[ConnectionView]) -> Option<T>,
    ) -> T {
        let mut last = Vec::new();
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.connections_of(pid);
            f(&last)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {what} (pid {pid})\n\
                 --- last connections of pid {pid} ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&last).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// `/api/v1/queries/slow`.
    pub fn slow_queries(&self) -> SlowQueriesResponse {
        let body = self
            .get("/api/v1/queries/slow")
            .unwrap_or_else(|e| panic!("GET /api/v1/queries/slow: {e:#}"));
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/queries/slow is not valid JSON ({e}): {body}"))
    }

    /// Polls the slow-query reports of one process (oldest first) until `f`
    /// accepts them, for at most [`EVENT_TIMEOUT`]; panics with what the
    /// agent last showed and its log.
    pub fn wait_for_slow<T>(
        &self,
        pid: u32,
        what: &str,
        mut f: impl FnMut(&[SlowQuery]) -> Option<T>,
    ) -> T {
        let mut last = Vec::new();
        let found = wait_until(EVENT_TIMEOUT, || {
            let mut mine: Vec<SlowQuery> = self
                .slow_queries()
                .slow_queries
                .into_iter()
                .filter(|q| q.pid == pid)
                .collect();
            mine.reverse();
            last = mine;
            f(&last)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {what} (pid {pid})\n\
                 --- last slow queries of pid {pid} ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&last).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// Round trips per (operation, error type) to 127.0.0.1:`port`, from the
    /// `db_client_operation_duration_seconds` histogram.
    pub fn operations(&self, port: u16) -> OperationCounts {
        operation_counts(&self.metrics(), port)
    }

    /// Polls [`Agent::operations`] until the round trips of `operation`
    /// with `error_type` ("" for none) have been counted `n` times, and
    /// returns all counts then. Round trips of one connection are counted in
    /// order, so when a client's last statement is this sentinel, everything
    /// it sent before is in the counts too.
    pub fn wait_for_operation(
        &self,
        port: u16,
        operation: &str,
        error_type: &str,
        n: u64,
    ) -> OperationCounts {
        let mut last = OperationCounts::new();
        let key = (operation.to_string(), error_type.to_string());
        let sentinel = format!("{operation} (error_type {error_type:?})");
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.operations(port);
            (last.get(&key).copied().unwrap_or(0) >= n).then(|| last.clone())
        });
        found.unwrap_or_else(|| {
            let conns: Vec<ConnectionView> = self
                .connections()
                .into_iter()
                .filter(|c| c.remote_port == Some(port))
                .collect();
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {n} {sentinel} round trips to \
                 port {port}\n--- operations to port {port} ---\n{last:#?}\n\
                 --- connections to port {port} ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&conns).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// Polls `/metrics` until the sample matching `selector` satisfies `ok`.
    pub fn wait_for_metric(&self, selector: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = String::new();
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.metrics();
            let v = metric_sample(&last, selector).unwrap_or(0.0);
            ok(v).then_some(v)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {selector} \
                 (now {:?})\n--- metrics ---\n{last}",
                metric_sample(&last, selector)
            )
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: plain kill(2) on our own child, which we have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            if wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

impl Agent {
    /// Leak reports as `poolscope leaks --json --agent ADDR` prints them.
    pub fn leaks_cli(&self) -> Vec<LeakReport> {
        let output = Command::new(agent_bin())
            .args(["leaks", "--json", "--agent", &self.addr.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run poolscope leaks");
        assert!(
            output.status.success(),
            "poolscope leaks --json failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let response: LeaksResponse = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "poolscope leaks --json printed no valid JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        response.reports
    }

    /// `poolscope health --agent ADDR ARGS...`: its exit code and what it
    /// printed.
    pub fn health_cli(&self, args: &[&str]) -> (i32, String) {
        self.cli("health", args)
    }

    /// `poolscope COMMAND --agent ADDR ARGS...`: its exit code and what it
    /// printed (stdout, then stderr).
    pub fn cli(&self, command: &str, args: &[&str]) -> (i32, String) {
        let output = Command::new(agent_bin())
            .args([command, "--agent", &self.addr.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run poolscope {command}: {e}"));
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code().unwrap_or(-1), printed)
    }

    /// `/api/v1/pools`, the tracker's views (without the percentiles).
    pub fn pools(&self) -> Vec<PoolView> {
        let body = self
            .get("/api/v1/pools")
            .unwrap_or_else(|e| panic!("GET /api/v1/pools: {e:#}"));
        let response: PoolsResponse = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/pools is not valid JSON ({e}): {body}"));
        response.pools.into_iter().map(|p| p.view).collect()
    }

    /// The pool `name` of process `pid`, if the agent shows it.
    pub fn pool(&self, pid: u32, name: &str) -> Option<PoolView> {
        self.pools()
            .into_iter()
            .find(|p| p.pid == pid && p.name == name)
    }

    /// Waits ([`EVENT_TIMEOUT`] at most) until the agent shows the pool
    /// `name` of `pid` as `ok` wants it; panics with what it showed and its
    /// log.
    pub fn wait_for_pool(
        &self,
        pid: u32,
        name: &str,
        what: &str,
        ok: impl Fn(&PoolView) -> bool,
    ) -> PoolView {
        let mut last = None;
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.pool(pid, name);
            last.clone().filter(|p| ok(p))
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {what}: pool {name:?} of pid {pid} \
                 is {last:#?}\n--- all pools ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&self.pools()).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// Sum of every sample matching `selector` (see [`metric_sample`]).
    pub fn metric_sum(&self, selector: &str) -> f64 {
        metric_samples(&self.metrics(), selector).iter().sum()
    }
}

/// Resident memory of a process in KiB (VmRSS in /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
