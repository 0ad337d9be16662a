//! The pool adapters under test: the Node.js adapter's checkout and the
//! Python application with real pools.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use crate::{json, path_str, python3, workspace_root, JsonLinesChild, Value, LOCALHOST_V4};

/// The npm packages the Node.js adapter's tests use (its devDependencies).
pub const NODE_ADAPTER_DEV_PACKAGES: [&str; 3] = ["pg", "mysql2", "mysql"];

/// `adapters/node`: the npm package `poolscope-adapter`.
pub fn node_adapter_dir() -> PathBuf {
    workspace_root().join("adapters").join("node")
}

/// The example pool of SQLite handles (`examples/sqlite-pool` in
/// adapters/node) and the npm package it needs besides the adapter.
pub const NODE_SQLITE_EXAMPLE: &str = "examples/sqlite-pool";
pub const NODE_SQLITE_EXAMPLE_PACKAGES: [&str; 1] = ["better-sqlite3"];

/// True when `node` and the adapter's npm dependencies (`pg`, `mysql2` and
/// `mysql`, for its tests; the adapter itself is pure JavaScript) are there.
/// In CI (`CI=true`) a missing one is a failure, so that a runner without
/// them cannot pass by skipping; elsewhere the test is skipped with what to
/// run.
pub fn require_node_adapter() -> bool {
    require_node_packages(&node_adapter_dir(), &NODE_ADAPTER_DEV_PACKAGES)
}

/// As [`require_node_adapter`], and the SQLite example's `better-sqlite3`
/// (a native module that npm builds from source here: no prebuilt binary
/// can be downloaded).
pub fn require_node_sqlite_example() -> bool {
    require_node_adapter()
        && require_node_packages(
            &node_adapter_dir().join(NODE_SQLITE_EXAMPLE),
            &NODE_SQLITE_EXAMPLE_PACKAGES,
        )
}

fn require_node_packages(dir: &Path, packages: &[&str]) -> bool {
    let mut missing = Vec::new();
    let node_runs = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success());
    if !node_runs {
        missing.push("node (Debian's nodejs and npm)".to_string());
    }
    for package in packages {
        let manifest = dir.join("node_modules").join(package).join("package.json");
        if !manifest.is_file() {
            missing.push(format!("the npm package {package}: {}", manifest.display()));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let text = format!(
        "the Node.js tests need {}; run cargo xtask setup (or npm ci in {})",
        missing.join(", "),
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{text}");
    }
    eprintln!("skipped: {text}");
    false
}

/// A Node.js application of `adapters/node` (`script`, relative to it),
/// driven with one JSON request per line on stdin and one JSON answer per
/// line on stdout; its adapter sends to the stream socket `stream`. Its
/// first line says it is ready, with its pid. Killed on drop.
pub struct NodeApp {
    pub pid: u32,
    /// The app's first answer (`ready`, `pid`, and what the app adds).
    pub ready: Value,
    app: JsonLinesChild,
}

impl NodeApp {
    pub fn spawn(script: &str, stream: &Path, envs: &[(&str, String)]) -> NodeApp {
        let dir = node_adapter_dir();
        let mut cmd = Command::new("node");
        cmd.arg(dir.join(script))
            .current_dir(&dir)
            .env_remove("POOLSCOPE_ADAPTER_SOCKET")
            .env("POOLSCOPE_ADAPTER_STREAM_SOCKET", stream);
        for (key, value) in envs {
            cmd.env(key, value);
        }
        let (app, ready) = JsonLinesChild::start(&mut cmd, &format!("node {script}"));
        assert_eq!(
            ready["adapter"]["socket"].as_str(),
            stream.to_str(),
            "the adapter sends to the agent's stream socket: {ready}"
        );
        NodeApp {
            pid: app.pid,
            ready,
            app,
        }
    }

    /// Sends one request and returns the answer; panics unless it is ok.
    pub fn request(&mut self, request: Value) -> Value {
        self.app.request(request)
    }
}

pub use poolscope::api::PoolsResponse;
pub use poolscope::detect::LeakKind;
pub use poolscope::lifecycle::PoolView;
pub use poolscope::reports::{LeakReport, LeaksResponse, ReportStatus};

/// `adapters/python`: the Python adapter package, put on the app's
/// PYTHONPATH.
pub fn python_adapter_dir() -> PathBuf {
    workspace_root().join("adapters/python")
}

/// An agent configuration with the adapter socket at `socket` (and the
/// stream socket beside it, [`stream_socket_beside`]) and the given
/// `[leaks]` thresholds (`("leak_threshold_seconds", 3.0)`, ...).
pub fn adapter_config(socket: &Path, leaks: &[(&str, f64)]) -> String {
    let mut toml = format!(
        "[adapter]\nsocket = {:?}\nstream_socket = {:?}\n\n[leaks]\n",
        path_str(socket),
        path_str(&stream_socket_beside(socket))
    );
    for (key, value) in leaks {
        toml.push_str(&format!("{key} = {value:?}\n"));
    }
    toml
}

/// The stream socket an [`adapter_config`] puts beside the datagram one.
pub fn stream_socket_beside(socket: &Path) -> PathBuf {
    socket.with_file_name("adapter-stream.sock")
}

/// `tests/scripts/pool_app.py`: an application with real SQLAlchemy and
/// psycopg_pool pools (and, when asked, the pool adapter), driven with one
/// JSON request per line. Killed on drop.
pub struct PoolApp {
    pub pid: u32,
    /// The native id of the app's main thread, which serves the requests
    /// (and so checks out the connections that `checkout` holds).
    pub tid: u32,
    app: JsonLinesChild,
}

impl PoolApp {
    /// Starts the app; its adapter (if a pool is created with one) sends to
    /// `adapter_socket`. Without a socket the variable is removed, so an
    /// adapter would try the default path.
    pub fn spawn(adapter_socket: Option<&Path>) -> PoolApp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pool_app.py");
        let mut cmd = Command::new(python3());
        cmd.arg("-u")
            .arg(&script)
            .env("PYTHONPATH", python_adapter_dir())
            // A stack for every checkout: the scenarios' leaks follow
            // other checkouts within the default millisecond.
            .env("POOLSCOPE_ADAPTER_STACK_INTERVAL_US", "0")
            .env_remove("POOLSCOPE_ADAPTER_SOCKET");
        if let Some(socket) = adapter_socket {
            cmd.env("POOLSCOPE_ADAPTER_SOCKET", socket);
        }
        let child = JsonLinesChild::spawn(&mut cmd, &format!("python3 {}", script.display()));
        let mut app = PoolApp {
            pid: child.pid,
            tid: 0,
            app: child.kill_on_drop(),
        };
        let answer = app.request(json!({"op": "pid"}));
        assert_eq!(
            answer["pid"].as_u64(),
            Some(u64::from(app.pid)),
            "the app runs in the process we spawned"
        );
        app.tid = answer["tid"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .expect("the app's thread id");
        app
    }

    /// Sends one request and returns the answer; panics unless it is ok.
    pub fn request(&mut self, request: Value) -> Value {
        self.app.request(request)
    }
}

/// A held connection as the app saw it (getsockname on the driver's fd),
/// and when the test got it.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub fd: i32,
    pub port: u16,
    pub at: Instant,
}

impl PoolApp {
    /// Checks a connection out of `engine`'s pool and holds it as `id`.
    pub fn checkout(&mut self, engine: &str, id: &str) -> Held {
        let answer = self.request(json!({"op": "checkout", "engine": engine, "id": id}));
        held_from(&answer)
    }
}

/// The connection the app's answer names (`fd`, `local_port`, and a
/// `local_address` on 127.0.0.1 that agrees with the port), held from now.
fn held_from(answer: &Value) -> Held {
    let fd = answer["fd"].as_i64().and_then(|v| i32::try_from(v).ok());
    let port = answer["local_port"]
        .as_u64()
        .and_then(|v| u16::try_from(v).ok());
    assert_eq!(
        answer["local_address"].as_str(),
        port.map(|p| format!("{LOCALHOST_V4}:{p}")).as_deref(),
        "{answer}"
    );
    Held {
        fd: fd.unwrap_or_else(|| panic!("no fd in {answer}")),
        port: port.unwrap_or_else(|| panic!("no local port in {answer}")),
        at: Instant::now(),
    }
}

/// The local port of a report's connection, if it names one.
pub fn local_port(report: &LeakReport) -> Option<u16> {
    report
        .local_address
        .as_deref()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port())
}
