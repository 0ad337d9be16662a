//! Scripted child processes whose sockets and database sessions the tests
//! drive: the connection client and the database client.

use std::{
    fs::{self},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{json, kill_child, wait_exit, Value};

/// Python interpreter for the client: the system one when there is one, so
/// that the process is `python3` itself rather than a version-manager shim.
pub fn python3() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        system.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// The unprivileged user that attack tests run their attackers as.
pub const FUZZ_USER: &str = "poolscope-fuzz";

/// uid and gid of [`FUZZ_USER`], created (as a system user without a home
/// or a shell) if missing: CI machines have it only if a test makes it.
pub fn unprivileged_user() -> (u32, u32) {
    let exists = Command::new("id")
        .arg(FUZZ_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                FUZZ_USER,
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run useradd to create {FUZZ_USER}: {e}"));
        assert!(
            out.status.success(),
            "useradd {FUZZ_USER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, FUZZ_USER])
            .output()
            .unwrap_or_else(|e| panic!("cannot run id: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("id {flag} {FUZZ_USER}: {e}"))
    };
    let (uid, gid) = (id("-u"), id("-g"));
    assert_ne!(uid, 0, "{FUZZ_USER} must not be root");
    (uid, gid)
}

/// A Python script (`python3 -c`), run as this process's user or as
/// [`FUZZ_USER`], driven line by line: the test writes a line to its stdin
/// to tell it to go on, and it answers with a line on stdout. Killed on
/// drop.
pub struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub started: Instant,
}

impl Script {
    /// Runs `python3 -c script args...` as this process's user.
    pub fn python(script: &str, args: &[String]) -> Script {
        Script::spawn(script, args, None)
    }

    /// Runs `python3 -c script args...` as [`FUZZ_USER`], in `/` (the user
    /// may not read the test's directories).
    pub fn unprivileged(script: &str, args: &[String]) -> Script {
        Script::spawn(script, args, Some(unprivileged_user()))
    }

    fn spawn(script: &str, args: &[String], user: Option<(u32, u32)>) -> Script {
        use std::os::unix::process::CommandExt;
        let started = Instant::now();
        let mut cmd = Command::new(python3());
        cmd.arg("-c")
            .arg(script)
            .args(args)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let who = if user.is_some() {
            FUZZ_USER
        } else {
            "this user"
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 as {who}: {e}"));
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            panic!("python3 without pipes");
        };
        Script {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The script's next line, without its newline; panics at end of output.
    pub fn raw_line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the script's output: {e}"));
        assert!(n > 0, "the script (pid {}) ended its output", self.pid());
        line.trim_end_matches('\n').to_string()
    }

    /// The script's next line, as JSON.
    pub fn line(&mut self) -> Value {
        let line = self.raw_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the script said {line:?}: {e}"))
    }

    /// Writes `text` and a newline to the script's stdin.
    pub fn tell(&mut self, text: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("the script's stdin is closed"));
        writeln!(stdin, "{text}").unwrap_or_else(|e| panic!("writing to the script: {e}"));
        stdin
            .flush()
            .unwrap_or_else(|e| panic!("writing to the script: {e}"));
    }

    /// Closes the script's stdin (a script reading it to its end exits).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the script to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stdin = None;
        kill_child(&mut self.child);
    }
}

/// The path of `tests/scripts/NAME`.
pub fn script_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// A script of `tests/scripts/` under python3, driven one line at a time:
/// a line to its stdin, a one-line answer from its stdout. Killed on drop.
struct LineChild {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl LineChild {
    fn spawn(name: &str) -> LineChild {
        LineChild::spawn_with(name, &[], &[])
    }

    /// `python3 -u SCRIPT ARGS...` with `envs` added to the environment.
    fn spawn_with(name: &str, args: &[&str], envs: &[(&str, &str)]) -> LineChild {
        let script = script_path(name);
        let mut child = Command::new(python3())
            .arg("-u")
            .arg(&script)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        LineChild {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `line` and returns the answer line as read, newline and all;
    /// panics if the child exited instead. `shown` is the line as failures
    /// name it.
    fn ask(&mut self, line: &str, shown: &str) -> String {
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {shown} to the client: {e}"));
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("cannot read the client's answer to {shown}: {e}"));
        assert!(n > 0, "the client exited on {shown}");
        answer
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// `tests/scripts/conn_client.py`, driven over stdin/stdout. The test knows
/// its pid, so it can pick the child's connections out of the agent's view.
pub struct ConnClient {
    pub pid: u32,
    io: LineChild,
}

/// A failed connect as the client reports it: errno name and the fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub errno: String,
    pub fd: i32,
}

impl ConnClient {
    pub fn spawn() -> ConnClient {
        let io = LineChild::spawn("conn_client.py");
        let mut client = ConnClient { pid: io.pid(), io };
        let reported: u32 = client
            .command("pid")
            .parse()
            .expect("the client's pid is a number");
        assert_eq!(
            reported, client.pid,
            "the client runs in the process we spawned"
        );
        client
    }

    /// Sends one command line and returns the one-line answer.
    pub fn command(&mut self, line: &str) -> String {
        let answer = self.io.ask(line, &format!("{line:?}"));
        let answer = answer.trim().to_string();
        assert!(
            !answer.starts_with("error "),
            "the client failed {line:?}: {answer}"
        );
        answer
    }

    /// A blocking TCP connect: Ok((fd, local port)) or the errno and fd.
    pub fn try_open(&mut self, host: &str, port: u16) -> Result<(i32, u16), ConnectError> {
        let answer = self.command(&format!("open {host} {port}"));
        let words: Vec<&str> = answer.split_whitespace().collect();
        match words.as_slice() {
            ["err", errno, fd] => Err(ConnectError {
                errno: errno.to_string(),
                fd: fd.parse().expect("fd is a number"),
            }),
            [fd, local_port] => Ok((
                fd.parse().expect("fd is a number"),
                local_port.parse().expect("port is a number"),
            )),
            _ => panic!("unexpected answer to open: {answer:?}"),
        }
    }

    /// A TCP connect that must succeed: (fd, local port).
    pub fn open(&mut self, host: &str, port: u16) -> (i32, u16) {
        self.try_open(host, port)
            .unwrap_or_else(|e| panic!("connect to {host}:{port} failed: {e:?}"))
    }

    /// A Unix-socket connect that must succeed: the fd.
    pub fn open_unix(&mut self, path: &Path) -> i32 {
        let answer = self.command(&format!("open_unix {}", path.display()));
        answer
            .parse()
            .unwrap_or_else(|_| panic!("connect to {} failed: {answer}", path.display()))
    }

    pub fn close(&mut self, fd: i32) {
        let answer = self.command(&format!("close {fd}"));
        assert_eq!(answer, "ok", "close {fd}");
    }

    /// Half-closes a connection (`shutdown(SHUT_WR)`); its fd stays open.
    pub fn shutdown(&mut self, fd: i32) {
        let answer = self.command(&format!("shutdown {fd}"));
        assert_eq!(answer, "ok", "shutdown {fd}");
    }

    /// Makes the client exit at once without closing anything
    /// (`os._exit`) and reaps it.
    pub fn exit_without_closing(&mut self) -> ExitStatus {
        let io = &mut self.io;
        let stdin = io.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "exit")
            .and_then(|_| stdin.flush())
            .expect("cannot send exit to the client");
        io.stdin = None;
        wait_exit(&mut io.child, Duration::from_secs(10)).expect("the client did not exit")
    }
}

/// A database error as the client library reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDbError {
    /// SQLSTATE (psycopg) or MySQL error number (mysql-connector).
    pub code: String,
    pub message: String,
}

/// What one SQL statement returned: rows (None for statements without a
/// result set) or the database's error.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlOutcome {
    pub rows: Option<Vec<Vec<Value>>>,
    pub error: Option<ClientDbError>,
}

/// `tests/scripts/db_client.py`: one database connection (psycopg 3,
/// mysql-connector-python or a plain socket speaking RESP) in a child whose
/// pid the test knows, driven with one JSON request per line.
pub struct DbClient {
    pub pid: u32,
    io: LineChild,
}

impl DbClient {
    pub fn spawn() -> DbClient {
        DbClient::spawn_with(&[], &[])
    }

    /// A client with these environment variables (e.g. OTEL_SERVICE_NAME).
    pub fn spawn_with_env(envs: &[(&str, &str)]) -> DbClient {
        DbClient::spawn_with(&[], envs)
    }

    /// A client whose command line is `python3 -u .../db_client.py ARGS...`
    /// (the script ignores its arguments: they are there to be seen in
    /// /proc/PID/cmdline) and whose environment has `envs` added.
    pub fn spawn_with(args: &[&str], envs: &[(&str, &str)]) -> DbClient {
        let io = LineChild::spawn_with("db_client.py", args, envs);
        let mut client = DbClient { pid: io.pid(), io };
        let reported = client.request(json!({"op": "pid"}))["pid"].as_u64();
        assert_eq!(
            reported,
            Some(u64::from(client.pid)),
            "the client runs in the process we spawned"
        );
        client
    }

    /// Sends one request and returns the answer; panics unless it is ok.
    pub fn request(&mut self, request: Value) -> Value {
        let line = request.to_string();
        let answer = self.io.ask(&line, &line);
        let answer: Value = serde_json::from_str(&answer).unwrap_or_else(|e| {
            panic!("the client's answer to {line} is not JSON ({e}): {answer}")
        });
        assert_eq!(
            answer["ok"],
            Value::Bool(true),
            "the client failed {line}: {answer}"
        );
        answer
    }

    /// Connects to 127.0.0.1:`port`; `system` is "postgresql", "mysql" or
    /// "redis". Returns (fd, local port).
    pub fn connect(&mut self, system: &str, port: u16) -> (i32, u16) {
        self.connect_with(system, port, false)
    }

    /// As [`DbClient::connect`] over TLS ("postgresql": sslmode=require;
    /// "mysql": TLS through Python's ssl module), the server's certificate
    /// not verified.
    pub fn connect_tls(&mut self, system: &str, port: u16) -> (i32, u16) {
        self.connect_with(system, port, true)
    }

    fn connect_with(&mut self, system: &str, port: u16, tls: bool) -> (i32, u16) {
        let answer =
            self.request(json!({"op": "connect", "system": system, "port": port, "tls": tls}));
        let fd = answer["fd"].as_i64().and_then(|fd| i32::try_from(fd).ok());
        let local = answer["local_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok());
        match (fd, local) {
            (Some(fd), Some(local)) => (fd, local),
            _ => panic!("unexpected answer to connect: {answer}"),
        }
    }

    fn outcome(answer: &Value) -> SqlOutcome {
        let rows = answer["rows"].as_array().map(|rows| {
            rows.iter()
                .map(|row| row.as_array().cloned().unwrap_or_default())
                .collect()
        });
        let error = answer["db_error"].as_object().map(|e| ClientDbError {
            code: e
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        });
        SqlOutcome { rows, error }
    }

    /// One statement without parameters (PostgreSQL: simple query protocol;
    /// MySQL: COM_QUERY); a database error is returned, not a panic.
    pub fn try_sql(&mut self, sql: &str) -> SqlOutcome {
        Self::outcome(&self.request(json!({"op": "sql", "sql": sql})))
    }

    /// One statement that must succeed; its rows, if it returns any.
    pub fn sql(&mut self, sql: &str) -> Option<Vec<Vec<Value>>> {
        let outcome = self.try_sql(sql);
        if let Some(e) = outcome.error {
            panic!("{sql:?} failed: {e:?}");
        }
        outcome.rows
    }

    /// A statement with `%s` placeholders prepared once and executed once
    /// per parameter list (PostgreSQL: psycopg's `prepare=True`; MySQL: a
    /// prepared cursor). Must succeed; the rows of the last execution.
    pub fn prepared(&mut self, sql: &str, params_list: &[Vec<Value>]) -> Option<Vec<Vec<Value>>> {
        let answer = self.request(
            json!({"op": "sql", "sql": sql, "params_list": params_list, "prepared": true}),
        );
        let outcome = Self::outcome(&answer);
        if let Some(e) = outcome.error {
            panic!("prepared {sql:?} {params_list:?} failed: {e:?}");
        }
        outcome.rows
    }

    /// Sends all `commands` to Redis in one write and returns the replies
    /// (error replies as `{"error": "..."}`) and the bytes written.
    pub fn redis(&mut self, commands: &[Vec<String>]) -> (Vec<Value>, usize) {
        let answer = self.request(json!({"op": "redis", "commands": commands}));
        let replies = answer["replies"].as_array().cloned().unwrap_or_default();
        let sent = answer["bytes_sent"].as_u64().unwrap_or_default();
        (replies, usize::try_from(sent).unwrap_or(usize::MAX))
    }
}

/// Whether a process still runs (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = stat.rsplit_once(')')?.1;
            after_comm.split_whitespace().next().map(|s| s != "Z")
        })
        .unwrap_or(false)
}
