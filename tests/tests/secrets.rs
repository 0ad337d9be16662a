//! Secrets never leave the agent (issue 10, item 4): real applications
//! whose command lines hold secrets in every form `agent/src/redact.rs`
//! handles connect to a real PostgreSQL, leak a pooled connection (reported
//! by the Python pool adapter), run a slow query and a slow failing query
//! whose texts (and the server's error message) carry secret-looking
//! literals. Then every output of the agent is collected: its log, every
//! JSON API (all pages of connections), `/metrics`, the live page, the CLI's
//! text views and everything the OTLP receiver got (metrics, event log
//! records and query spans, searched as protobuf bytes). No secret may be
//! in any of them, and each must really hold the report, process or query
//! it is about, so that the check cannot pass by finding nothing.
//!
//! Then the opt-ins: `[tracking] full_command_lines` shows the command
//! lines as they are (so the redacted ones above were really redacted),
//! while query literals stay hidden; `[queries] raw_text` shows them.
//!
//! Every secret contains [`MARK`]; nothing else on the host should. Agents
//! see every process on the host, so an agent of one test here also sees
//! the others' applications: that is harmless, since the default agent must
//! hide every secret whoever sent it, and the opt-in tests only look at
//! their own processes.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use poolscope_tests::{
    adapter_config, agent_bin, json, otlp_receiver::OtlpReceiver, python3, python_adapter_dir,
    require_kernel, wait_until, Agent, LeakKind, LeakReport, LeaksResponse, Postgres, ReportStatus,
    SlowQuery, TempDir, Value,
};

/// In every secret, and in nothing else the test or the agent writes.
const MARK: &str = "S3cret";

/// The slow query's literal, and the text the agent shows by default.
const SLOW_SQL: &str = "SELECT pg_sleep(0.3), 'S3cretLiteral'";
const SLOW_SQL_SANITIZED: &str = "SELECT pg_sleep(?), ?";
/// A slow query that fails on its literal: PostgreSQL quotes the value in
/// its error message (`invalid input syntax for type integer: "..."`).
const FAILING_SQL: &str = "SELECT ('S3cretErrLiteral' || pg_sleep(0.3)::text)::int";
/// SQLSTATE invalid_text_representation.
const FAILING_CODE: &str = "22P02";

/// Short thresholds, so that the reports come within seconds (as in
/// adapter_python.rs: idle in transaction below the leak threshold).
const LEAKS: &[(&str, f64)] = &[
    ("leak_threshold_seconds", 3.0),
    ("quiet_seconds", 1.5),
    ("idle_in_transaction_seconds", 2.0),
];

/// How long reports, events and exports get to show up.
const TIMEOUT: Duration = Duration::from_secs(30);

const POOL: &str = "secrets";

// ---------------------------------------------------------------------------
// Applications with secrets on their command lines
// ---------------------------------------------------------------------------

/// One argument as the process gets it and as the agent must show it.
struct Arg {
    given: String,
    shown: String,
}

fn kept(arg: &str) -> Arg {
    Arg {
        given: arg.to_string(),
        shown: arg.to_string(),
    }
}

fn hidden(given: &str, shown: &str) -> Arg {
    Arg {
        given: given.to_string(),
        shown: shown.to_string(),
    }
}

/// Every form of `redact.rs` that applies to any program: URL passwords
/// (bare, inside `--key=`, in a Redis URL without a user), a libpq
/// connection string in one argument, `KEY=value` for each secret key word
/// (upper and lower case, with and without dashes, `PGPASSWORD=` as
/// `env` passes it), and each flag whose next argument is the secret.
fn generic_forms(port: u16) -> Vec<Arg> {
    let mut args = vec![
        hidden(
            &format!("postgresql://postgres:S3cretUrl@127.0.0.1:{port}/postgres"),
            &format!("postgresql://postgres:***@127.0.0.1:{port}/postgres"),
        ),
        hidden(
            &format!(
                "--dsn=postgresql://app:S3cretDsnUrl@127.0.0.1:{port}/postgres?sslmode=disable"
            ),
            &format!("--dsn=postgresql://app:***@127.0.0.1:{port}/postgres?sslmode=disable"),
        ),
        hidden(
            "redis://:S3cretRedisUrl@127.0.0.1:6379/0",
            "redis://:***@127.0.0.1:6379/0",
        ),
        hidden(
            "host=127.0.0.1 user=postgres password=S3cretConninfo dbname=postgres",
            "host=127.0.0.1 user=postgres password=*** dbname=postgres",
        ),
        hidden("PGPASSWORD=S3cretEnv", "PGPASSWORD=***"),
        hidden("password=S3cretKv", "password=***"),
        hidden("--password=S3cretFlagEq", "--password=***"),
        hidden("--api-token=S3cretApiTokenEq", "--api-token=***"),
    ];
    // One `key=value` per secret key word of redact.rs.
    for (i, key) in [
        "DB_PASSWD",
        "pwd",
        "REDIS_PASS",
        "client_secret",
        "GITHUB_TOKEN",
        "apikey",
        "api_key",
        "x-api-key",
        "--auth",
        "AWS_CREDENTIALS",
        "private_key",
        "--private-key",
    ]
    .iter()
    .enumerate()
    {
        args.push(hidden(
            &format!("{key}=S3cretKey{i}"),
            &format!("{key}=***"),
        ));
    }
    // Each flag whose next argument is a secret (matched case-insensitively).
    for (i, flag) in [
        "--password",
        "--passwd",
        "--pass",
        "--token",
        "--secret",
        "--api-key",
        "--apikey",
        "--auth",
        "--access-token",
        "--Token",
    ]
    .iter()
    .enumerate()
    {
        args.push(kept(flag));
        args.push(hidden(&format!("S3cretFlag{i}"), "***"));
    }
    // Plain arguments stay as they are.
    args.push(kept("--workers"));
    args.push(kept("4"));
    args
}

/// The running application: `tests/scripts/pool_app.py` (which ignores its
/// arguments), started as `program` with `args` after the script.
struct SecretApp {
    pid: u32,
    /// The command line as given, and as the agent must show it by default.
    full: String,
    redacted: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl SecretApp {
    fn spawn(program: &Path, args: &[Arg], adapter_socket: &Path) -> SecretApp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pool_app.py");
        let script = script.to_str().unwrap().to_string();
        let program_text = program.to_str().unwrap().to_string();
        let mut all = vec![kept(&program_text), kept("-u"), kept(&script)];
        all.extend(args.iter().map(|a| hidden(&a.given, &a.shown)));
        let join = |f: fn(&Arg) -> &str| all.iter().map(f).collect::<Vec<_>>().join(" ");
        let full = join(|a| &a.given);
        let redacted = join(|a| &a.shown);
        let mut child = Command::new(program)
            .args(all[1..].iter().map(|a| &a.given))
            .env("PYTHONPATH", python_adapter_dir())
            .env("POOLSCOPE_ADAPTER_SOCKET", adapter_socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut app = SecretApp {
            pid: child.id(),
            full,
            redacted,
            child,
            stdin,
            stdout,
        };
        let answer = app.request_ok(json!({"op": "pid"}));
        assert_eq!(answer["pid"], json!(app.pid), "{answer}");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", app.pid)).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert_eq!(cmdline.trim_end(), app.full, "the process has the secrets");
        app
    }

    /// One request, its answer whether ok or not.
    fn request(&mut self, request: Value) -> Value {
        let line = request.to_string();
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let mut answer = String::new();
        let n = self.stdout.read_line(&mut answer).unwrap();
        assert!(n > 0, "the app exited on {line}");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }

    fn request_ok(&mut self, request: Value) -> Value {
        let answer = self.request(request.clone());
        assert_eq!(answer["ok"], json!(true), "{request} failed: {answer}");
        answer
    }

    /// A pooled connection held quietly (a leak), a slow query that fails
    /// on its literal (the connection given back), and a slow query with a
    /// secret literal on a connection then left idle in its transaction.
    fn misbehave(&mut self, port: u16) {
        let answer = self.request_ok(json!({
            "op": "sqlalchemy", "engine": "main", "port": port, "pool_size": 3,
            "max_overflow": 0, "adapter": true, "pool_name": POOL,
        }));
        assert_eq!(answer["pool_name"], json!(POOL), "{answer}");
        self.request_ok(json!({"op": "checkout", "engine": "main", "id": "err"}));
        let failed = self.request(json!({"op": "query", "id": "err", "sql": FAILING_SQL}));
        assert_eq!(
            failed["ok"],
            json!(false),
            "{FAILING_SQL} must fail: {failed}"
        );
        self.request_ok(json!({"op": "release", "id": "err"}));
        self.request_ok(json!({"op": "checkout", "engine": "main", "id": "leak"}));
        self.request_ok(json!({"op": "checkout", "engine": "main", "id": "tx"}));
        self.request_ok(json!({"op": "query", "id": "tx", "sql": SLOW_SQL, "commit": false}));
    }
}

impl Drop for SecretApp {
    fn drop(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three applications: python3 itself with every generic form, and python3
/// started as `mysql` (`-pSECRET`) and as `redis-cli` (`-a SECRET`), the
/// forms redact.rs applies to those programs only (`psql -p` is a port).
fn start_apps(pg: &Postgres, dir: &TempDir, socket: &Path) -> Vec<SecretApp> {
    let python = python3();
    // A symlink keeps the interpreter finding its library (it resolves its
    // own path) while argv[0] names another program.
    let alias = |name: &str| -> PathBuf {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(&python, &link).unwrap();
        link
    };
    let mysql = alias("mysql");
    let redis_cli = alias("redis-cli");
    let mut apps = vec![
        SecretApp::spawn(&python, &generic_forms(pg.port), socket),
        SecretApp::spawn(
            &mysql,
            &[
                kept("-uroot"),
                hidden("-pS3cretMysqlAttached", "-p***"),
                hidden("--password=S3cretMysqlEq", "--password=***"),
                kept("-h"),
                kept("127.0.0.1"),
            ],
            socket,
        ),
        SecretApp::spawn(
            &redis_cli,
            &[
                kept("-h"),
                kept("127.0.0.1"),
                kept("-a"),
                hidden("S3cretRedisCliA", "***"),
                kept("PING"),
            ],
            socket,
        ),
    ];
    for app in &mut apps {
        app.misbehave(pg.port);
    }
    apps
}

// ---------------------------------------------------------------------------
// Every output of an agent
// ---------------------------------------------------------------------------

/// Everything an agent has put out, by where it came from.
struct Outputs {
    texts: Vec<(String, String)>,
}

impl Outputs {
    fn add(&mut self, name: impl Into<String>, text: impl Into<String>) {
        self.texts.push((name.into(), text.into()));
    }

    fn get(&self, name: &str) -> &str {
        self.texts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("no output {name}"))
    }

    /// (output, the text around it) for every occurrence of `needle`.
    fn occurrences(&self, needle: &str) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for (name, text) in &self.texts {
            for (at, _) in text.match_indices(needle) {
                let start = text.floor_char_boundary(at.saturating_sub(120));
                let end = text.ceil_char_boundary((at + 120).min(text.len()));
                found.push((name.clone(), text[start..end].to_string()));
            }
        }
        found
    }

    fn contains(&self, needle: &str) -> bool {
        self.texts.iter().any(|(_, t)| t.contains(needle))
    }
}

/// The secrets in `text`: each [`MARK`] and the letters and digits after it.
fn secrets_in(text: &str) -> Vec<String> {
    text.match_indices(MARK)
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect()
        })
        .collect()
}

fn get(agent: &Agent, path: &str) -> String {
    let (status, body) = agent
        .get_with_status(path)
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

fn cli(agent: &Agent, args: &[&str]) -> String {
    let output = Command::new(agent_bin())
        .args(args)
        .args(["--agent", &agent.addr.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "poolscope {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The agent's log, every API page, `/metrics`, the live page, the CLI's
/// views and every OTLP request (protobuf bytes, read as lossy UTF-8: a
/// string in any field is there verbatim).
fn collect(agent: &Agent, receiver: &OtlpReceiver) -> Outputs {
    let mut out = Outputs { texts: Vec::new() };
    out.add("agent log", agent.log());
    for path in [
        "/api/v1/leaks",
        "/api/v1/pools",
        "/api/v1/queries/slow",
        "/metrics",
        "/",
        "/healthz",
    ] {
        out.add(path, get(agent, path));
    }
    // Small pages, so that paging itself is exercised.
    let mut path = "/api/v1/connections?limit=5".to_string();
    for page in 0.. {
        let body = get(agent, &path);
        let next: Option<String> = serde_json::from_str::<Value>(&body).unwrap()["next"]
            .as_str()
            .map(str::to_string);
        out.add(format!("/api/v1/connections page {page}"), body);
        match next {
            Some(next) => path = format!("/api/v1/connections?limit=5&after={next}"),
            None => break,
        }
        assert!(page < 10_000, "connections never end");
    }
    for args in [
        &["leaks"][..],
        &["leaks", "--json"],
        &["queries"],
        &["pools"],
        &["sizing"],
        &["connections", "--all"],
    ] {
        out.add(format!("poolscope {}", args.join(" ")), cli(agent, args));
    }
    for (i, (signal, bytes)) in receiver.encoded_requests().into_iter().enumerate() {
        out.add(
            format!("OTLP {signal:?} request {i}"),
            String::from_utf8_lossy(&bytes),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// The agent under test
// ---------------------------------------------------------------------------

struct Rig {
    pg: Postgres,
    receiver: OtlpReceiver,
    agent: Agent,
    socket: PathBuf,
    dir: TempDir,
}

/// A PostgreSQL, an OTLP receiver (keeping everything), and an agent with
/// its own adapter socket, short thresholds, slow queries from 200 ms,
/// OTLP export with query spans, `queries` added to `[queries]` and
/// `extra` tables.
fn rig(queries: &str, extra: &str) -> Rig {
    let pg = Postgres::start();
    let receiver = OtlpReceiver::start_keeping(usize::MAX);
    let dir = TempDir::new("poolscope-secrets");
    let socket = dir.path().join("adapter.sock");
    let config = format!(
        "{adapter}\n\
         [queries]\nslow_threshold_ms = 200\n{queries}\n\
         [otlp]\nendpoint = {endpoint:?}\nprotocol = \"grpc\"\ninterval_seconds = 1.0\n\
         timeout_seconds = 2.0\nquery_spans = true\n\n{extra}",
        adapter = adapter_config(&socket, LEAKS),
        endpoint = receiver.grpc_endpoint(),
    );
    let agent = Agent::start_with_config(&config, &[]);
    Rig {
        pg,
        receiver,
        agent,
        socket,
        dir,
    }
}

fn leaks(agent: &Agent) -> Vec<LeakReport> {
    serde_json::from_str::<LeaksResponse>(&get(agent, "/api/v1/leaks"))
        .unwrap()
        .reports
}

/// What each application must have caused, once all of it is there: an
/// open `leaked` and an open `idle_in_transaction` report, both slow
/// queries, their OTLP events and spans, and pushed metrics of the process.
struct Seen {
    leaked: LeakReport,
    idle: LeakReport,
    slow: SlowQuery,
    failed: SlowQuery,
}

fn wait_for_everything(rig: &Rig, app: &SecretApp, slow_text: &str) -> Seen {
    let pid = app.pid;
    let agent = &rig.agent;
    let receiver = &rig.receiver;
    let open = |kind: LeakKind| {
        leaks(agent)
            .into_iter()
            .find(|r| r.pid == pid && r.kind == kind && r.status == ReportStatus::Open)
    };
    let slow_of = || -> Vec<SlowQuery> {
        agent
            .slow_queries()
            .slow_queries
            .into_iter()
            .filter(|q| q.pid == pid)
            .collect()
    };
    let found = wait_until(TIMEOUT, || {
        let leaked = open(LeakKind::Leaked)?;
        let idle = open(LeakKind::IdleInTransaction)?;
        let queries = slow_of();
        let failed = queries
            .iter()
            .find(|q| q.error.as_ref().is_some_and(|e| e.code == FAILING_CODE))?
            .clone();
        let slow = queries
            .iter()
            .find(|q| q.query.as_deref() == Some(slow_text))?
            .clone();
        let pid_attr = Some(&json!(pid));
        let events = |name: &str| {
            receiver
                .events(name)
                .into_iter()
                .filter(|e| e.attributes.get("process.pid") == pid_attr)
                .count()
        };
        (events("poolscope.leak.opened") >= 2 && events("poolscope.query.slow") >= 2)
            .then_some(())?;
        receiver
            .spans()
            .iter()
            .any(|s| {
                s.attributes.get("process.pid") == pid_attr
                    && s.attributes.get("db.query.text") == Some(&json!(slow_text))
            })
            .then_some(())?;
        receiver
            .metric_value("poolscope.connection.open", &[("process.pid", json!(pid))])
            .filter(|v| *v >= 1.0)?;
        Some(Seen {
            leaked,
            idle,
            slow,
            failed,
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "timed out after {TIMEOUT:?} waiting for the reports, slow queries, events, spans \
             and metrics of pid {pid} ({})\n--- leaks ---\n{:#?}\n--- slow queries ---\n{:#?}\n\
             {}\n--- agent log ---\n{}",
            app.full,
            leaks(agent)
                .into_iter()
                .filter(|r| r.pid == pid)
                .collect::<Vec<_>>(),
            slow_of(),
            receiver.summary(),
            agent.log()
        )
    })
}

/// The log line (`poolscope::leak` or `poolscope::slow_query`) of `pid`
/// that holds `needle`.
fn log_line<'a>(log: &'a str, target: &str, pid: u32, needle: &str) -> Option<&'a str> {
    let pid_field = format!("\"pid\":{pid},");
    log.lines()
        .find(|l| l.contains(target) && l.contains(&pid_field) && l.contains(needle))
}

/// Asserts that each output really holds what it is about for `app`:
/// `cmdline` (the command line as the agent must show it) in the reports
/// of the API, the log and OTLP; `slow_text` in the slow queries, the
/// spans and the connection's last query; the process in the connections,
/// pools, metrics and the CLI's views.
fn check_outputs_hold(rig: &Rig, out: &Outputs, app: &SecretApp, seen: &Seen, cmdline: &str) {
    let pid = app.pid;
    let quoted_cmdline = serde_json::to_string(cmdline).unwrap();
    // Leak reports, in the API and the CLI's JSON.
    for report in [&seen.leaked, &seen.idle] {
        assert_eq!(report.cmdline.as_deref(), Some(cmdline), "{report:#?}");
        assert_eq!(report.pool.as_deref(), Some(POOL), "{report:#?}");
    }
    assert_eq!(
        seen.idle.last_query.as_deref(),
        Some(seen.slow.query.as_deref().unwrap()),
        "the transaction's last query: {:#?}",
        seen.idle
    );
    for name in ["/api/v1/leaks", "poolscope leaks --json"] {
        assert!(
            out.get(name).contains(&quoted_cmdline),
            "{name} lacks the command line {quoted_cmdline} of pid {pid}:\n{}",
            out.get(name)
        );
    }
    // The log: both kinds of report line.
    let log = out.get("agent log");
    for kind in ["\"leaked\"", "\"idle_in_transaction\""] {
        assert!(
            log_line(log, "poolscope::leak", pid, kind)
                .is_some_and(|l| l.contains("opened") && l.contains(&quoted_cmdline)),
            "no `opened` {kind} log line of pid {pid} with {quoted_cmdline}:\n{log}"
        );
    }
    for query in [seen.slow.query.as_deref(), seen.failed.query.as_deref()] {
        let query = serde_json::to_string(query.unwrap()).unwrap();
        assert!(
            log_line(log, "poolscope::slow_query", pid, &query).is_some(),
            "no slow_query log line of pid {pid} with {query}:\n{log}"
        );
    }
    // The failing query's report keeps its SQLSTATE (its message is
    // checked for secrets with everything else).
    assert_eq!(
        seen.failed.error.as_ref().map(|e| e.code.as_str()),
        Some(FAILING_CODE)
    );
    // Connections (some page), pools, metrics, the CLI's text views.
    let slow_text = serde_json::to_string(seen.slow.query.as_deref().unwrap()).unwrap();
    let pid_field = format!("\"pid\":{pid},");
    assert!(
        out.texts.iter().any(|(name, text)| {
            name.starts_with("/api/v1/connections")
                && text.contains(&pid_field)
                && text.contains(&format!("\"last_query\":{slow_text}"))
        }),
        "no connection of pid {pid} whose last query is {slow_text} in any page"
    );
    assert!(
        out.get("/api/v1/pools").contains(&pid_field)
            && out.get("/api/v1/pools").contains(&format!("\"{POOL}\"")),
        "{}",
        out.get("/api/v1/pools")
    );
    assert!(
        out.get("/metrics")
            .contains(&format!("process_pid=\"{pid}\"")),
        "/metrics has no series of pid {pid}"
    );
    for name in ["poolscope leaks", "poolscope queries", "poolscope pools"] {
        assert!(
            out.get(name).contains(&pid.to_string()),
            "{name} does not show pid {pid}:\n{}",
            out.get(name)
        );
    }
    // OTLP: the leak events with the command line, the slow-query events
    // with the query, the spans with the query text.
    let pid_attr = Some(json!(pid));
    let opened: Vec<_> = rig
        .receiver
        .events("poolscope.leak.opened")
        .into_iter()
        .filter(|e| e.attributes.get("process.pid") == pid_attr.as_ref())
        .collect();
    assert!(opened.len() >= 2, "{opened:#?}");
    for event in &opened {
        assert_eq!(
            event.attributes.get("process.command_line"),
            Some(&json!(cmdline)),
            "{event:#?}"
        );
    }
    let slow_events: Vec<_> = rig
        .receiver
        .events("poolscope.query.slow")
        .into_iter()
        .filter(|e| e.attributes.get("process.pid") == pid_attr.as_ref())
        .collect();
    assert!(
        slow_events
            .iter()
            .any(|e| e.attributes.get("db.query.text") == Some(&json!(seen.slow.query))),
        "{slow_events:#?}"
    );
}

/// The live page is served and is the page (its data comes from the API,
/// collected above).
fn check_live_page(out: &Outputs) {
    let page = out.get("/");
    assert!(
        page.contains("<html") && page.contains("/api/v1/"),
        "the live page: {page}"
    );
}

/// One test's run: the rig, the applications, what each caused and the
/// agent's outputs. Bound in this order, they are dropped the other way
/// round: the applications end before the rig's agent and server.
type Run = (Rig, Vec<SecretApp>, Vec<Seen>, Outputs);

/// Step: where the kernel lets an agent run, the rig (`queries` and
/// `extra` as [`rig`] takes them), the applications, everything each caused
/// (its slow query shown as `slow_text`), and then all the agent's outputs;
/// `None` elsewhere, and the test ends there.
fn run(queries: &str, extra: &str, slow_text: &str) -> Option<Run> {
    if !require_kernel() {
        return None;
    }
    let rig = rig(queries, extra);
    let apps = start_apps(&rig.pg, &rig.dir, &rig.socket);
    let seen = apps
        .iter()
        .map(|app| wait_for_everything(&rig, app, slow_text))
        .collect();
    let out = collect(&rig.agent, &rig.receiver);
    Some((rig, apps, seen, out))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn no_secret_from_command_lines_or_query_literals_reaches_any_output() {
    let Some((rig, apps, seen, out)) = run("", "", SLOW_SQL_SANITIZED) else {
        return;
    };

    // Not vacuous: every output holds what it is about, with the redaction
    // marker where the secrets were and `?` where the literals were.
    for (app, seen) in apps.iter().zip(&seen) {
        assert!(app.redacted.contains("***") && app.redacted != app.full);
        check_outputs_hold(&rig, &out, app, seen, &app.redacted);
        assert_eq!(
            seen.failed.query.as_deref(),
            Some("SELECT (? || pg_sleep(?)::text)::int"),
            "{:#?}",
            seen.failed
        );
        // The server quoted the literal in its message; the agent shows
        // the message without it.
        assert_eq!(
            seen.failed.error.as_ref().map(|e| e.message.as_str()),
            Some("invalid input syntax for type integer: ?"),
            "{:#?}",
            seen.failed
        );
    }
    check_live_page(&out);
    assert!(
        out.texts.iter().any(|(n, _)| n.starts_with("OTLP Traces")),
        "no spans arrived: {}",
        rig.receiver.summary()
    );

    // No secret anywhere.
    let leaks = out.occurrences(MARK);
    assert!(
        leaks.is_empty(),
        "{} secret(s) in the agent's outputs (output: context):\n{}",
        leaks.len(),
        leaks
            .iter()
            .map(|(name, context)| format!("- {name}: {context:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "secrets: {} applications, {} outputs checked ({} OTLP requests), no secret in any",
        apps.len(),
        out.texts.len(),
        rig.receiver.encoded_requests().len()
    );
}

#[test]
fn full_command_lines_show_the_secrets_but_query_literals_stay_hidden() {
    let full_command_lines = "[tracking]\nfull_command_lines = true\n";
    let Some((rig, apps, seen, out)) = run("", full_command_lines, SLOW_SQL_SANITIZED) else {
        return;
    };
    for (app, seen) in apps.iter().zip(&seen) {
        // The command line as given, secrets and all, wherever the
        // default agent showed the redacted one.
        check_outputs_hold(&rig, &out, app, seen, &app.full);
    }
    // Query literals stay hidden: the server's error message as well.
    for literal in ["S3cretLiteral", "S3cretErrLiteral"] {
        let found = out.occurrences(literal);
        assert!(found.is_empty(), "{literal} in {found:#?}");
    }
}

#[test]
fn raw_text_shows_query_literals() {
    let Some((rig, apps, seen, out)) = run("raw_text = true\n", "", SLOW_SQL) else {
        return;
    };
    for (app, seen) in apps.iter().zip(&seen) {
        check_outputs_hold(&rig, &out, app, seen, &app.redacted);
        assert_eq!(seen.failed.query.as_deref(), Some(FAILING_SQL));
    }
    assert!(out.contains("S3cretLiteral") && out.contains("S3cretErrLiteral"));
    // Command lines are still redacted.
    for app in &apps {
        for secret in secrets_in(&app.full) {
            let found = out.occurrences(&secret);
            assert!(found.is_empty(), "{secret} in {found:#?}");
        }
    }
}
