//! The CLI's client side: `--agent` as a host name, an IPv6 address or a
//! URL with a prefix, against the real agent; and what it says when what
//! answers is not a healthy agent (refused token, error status, broken
//! HTTP, an endless or oversized answer, silence), against a small scripted
//! HTTP server on a real socket, since a real agent cannot be made to
//! misbehave so.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use poolscope_tests::{agent_bin, free_port, require_kernel, wait_exit, Agent, TempDir};

/// Longer than any bound of the client (10 s without an answer), so that
/// a client that hangs fails the test instead of stalling it.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `poolscope ARGS` with proxies set in its environment (they must be
/// ignored: each names a port nothing listens on) and no token unless
/// `token` is given: its output, and how long it ran.
fn poolscope(args: &[&str], token: Option<&str>) -> (Output, Duration) {
    let dir = TempDir::new("poolscope-cli-agent");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let dead_proxy = format!("http://127.0.0.1:{}", free_port());
    let mut cmd = Command::new(agent_bin());
    cmd.args(args)
        .env_remove("POOLSCOPE_AGENT")
        .env_remove("POOLSCOPE_TOKEN_FILE")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("RUST_BACKTRACE", "1");
    for proxy in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env(proxy, &dead_proxy);
    }
    match token {
        Some(token) => cmd.env("POOLSCOPE_TOKEN", token),
        None => cmd.env_remove("POOLSCOPE_TOKEN"),
    };
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, CLI_TIMEOUT);
    let took = started.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = Output {
        status: status.unwrap_or_else(|| panic!("poolscope {args:?} ran past {CLI_TIMEOUT:?}")),
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    };
    (output, took)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that the command failed with one `poolscope: ...` sentence
/// (its causes after colons) that contains every one of `parts`.
fn assert_fails_saying(output: &Output, parts: &[&str]) {
    let stderr = stderr(output);
    assert!(!output.status.success(), "it succeeds: {stderr}");
    assert!(
        stderr.starts_with("poolscope: ") && stderr.trim_end().lines().count() == 1,
        "one line: {stderr}"
    );
    for part in parts {
        assert!(stderr.contains(part), "says {part:?}: {stderr}");
    }
    assert!(!stderr.to_lowercase().contains("panicked"), "{stderr}");
}

/// A loopback HTTP server that answers every request with `answer` and
/// keeps each request's head (request line and headers).
struct ScriptedServer {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl ScriptedServer {
    fn start(answer: fn(&mut TcpStream)) -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (kept, stopped) = (heads.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let kept = kept.clone();
                thread::spawn(move || {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    kept.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    answer(&mut stream);
                });
            }
        });
        ScriptedServer { port, heads, stop }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Writes a whole answer; the client may hang up first (errors ignored).
fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

const SIZING_JSON: &str = r#"{"window_seconds":3600,"pools":[]}"#;

#[test]
fn url_prefix_token_and_host_reach_the_server_and_proxies_are_ignored() {
    let server = ScriptedServer::start(|s| respond(s, "200 OK", SIZING_JSON));
    let agent = format!("http://localhost:{}/poolscope/", server.port);
    let (output, _) = poolscope(&["sizing", "--json", "--agent", &agent], Some("tok-123"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), SIZING_JSON);
    let heads = server.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = heads[0].to_lowercase();
    assert!(
        head.starts_with("get /poolscope/api/v1/sizing http/1.1\r\n"),
        "the prefix comes first: {head}"
    );
    assert!(
        head.contains(&format!("\r\nhost: localhost:{}\r\n", server.port)),
        "{head}"
    );
    assert!(
        head.contains("\r\nauthorization: bearer tok-123\r\n"),
        "{head}"
    );

    // host:port with a name; no token, no Authorization header.
    let agent = format!("localhost:{}", server.port);
    let (output, _) = poolscope(&["sizing", "--json", "--agent", &agent], None);
    assert!(output.status.success(), "{}", stderr(&output));
    let heads = server.heads();
    assert!(
        heads[1].starts_with("GET /api/v1/sizing HTTP/1.1\r\n"),
        "{heads:?}"
    );
    assert!(
        !heads[1].to_lowercase().contains("authorization"),
        "{heads:?}"
    );
}

#[test]
fn refused_token_and_error_status_keep_their_messages() {
    let server = ScriptedServer::start(|s| respond(s, "401 Unauthorized", "{}"));
    let agent = format!("127.0.0.1:{}", server.port);
    let (output, _) = poolscope(&["pools", "--agent", &agent], None);
    assert_fails_saying(&output, &["wants a bearer token", "--token-file"]);
    let (output, _) = poolscope(&["pools", "--agent", &agent], Some("wrong"));
    assert_fails_saying(&output, &["refused the one given", "--token-file"]);

    let server = ScriptedServer::start(|s| respond(s, "500 Internal Server Error", "{}"));
    let agent = format!("127.0.0.1:{}", server.port);
    let (output, _) = poolscope(&["leaks", "--agent", &agent], None);
    assert_fails_saying(&output, &["answered 500 for /api/v1/leaks"]);

    let server = ScriptedServer::start(|s| respond(s, "200 OK", "{\"pools\": ["));
    let agent = format!("http://127.0.0.1:{}", server.port);
    let (output, _) = poolscope(&["sizing", "--agent", &agent], None);
    assert_fails_saying(&output, &["/api/v1/sizing is not valid JSON"]);
}

#[test]
fn what_is_not_http_is_said_so() {
    let server = ScriptedServer::start(|s| {
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
    });
    let agent = format!("127.0.0.1:{}", server.port);
    let (output, _) = poolscope(&["pools", "--agent", &agent], None);
    assert_fails_saying(&output, &["sent no valid HTTP answer to /api/v1/pools"]);
}

#[test]
fn oversized_answers_are_cut_off() {
    // Announced: refused before reading.
    let server = ScriptedServer::start(|s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\nConnection: close\r\n\r\n{",
        );
        thread::sleep(Duration::from_secs(2));
    });
    let agent = format!("127.0.0.1:{}", server.port);
    let (output, took) = poolscope(&["sizing", "--json", "--agent", &agent], None);
    assert_fails_saying(&output, &["larger than 64 MiB", "/api/v1/sizing"]);
    assert!(took < Duration::from_secs(2), "read no further: {took:?}");

    // Streamed without a length: cut once past the bound.
    let server = ScriptedServer::start(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..80 {
            let sent = write!(s, "{:x}\r\n", chunk.len())
                .and_then(|_| s.write_all(&chunk))
                .and_then(|_| s.write_all(b"\r\n"));
            if sent.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let agent = format!("127.0.0.1:{}", server.port);
    let (output, _) = poolscope(&["sizing", "--json", "--agent", &agent], None);
    assert_fails_saying(&output, &["larger than 64 MiB"]);
    assert!(output.stdout.is_empty(), "prints nothing of it");
}

#[test]
fn a_silent_server_times_out() {
    let server = ScriptedServer::start(|_| thread::sleep(Duration::from_secs(15)));
    let agent = format!("localhost:{}", server.port);
    let (output, took) = poolscope(&["pools", "--agent", &agent], None);
    assert_fails_saying(&output, &["did not answer /api/v1/pools within 10 s"]);
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(14),
        "gives up after 10 s: {took:?}"
    );
}

#[test]
fn nothing_listening_asks_whether_the_agent_runs() {
    let agent = format!("localhost:{}", free_port());
    let (output, took) = poolscope(&["pools", "--agent", &agent], None);
    assert_fails_saying(
        &output,
        &[
            &format!("cannot reach the agent at http://{agent}"),
            "is `poolscope run` running?",
        ],
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn real_agent_by_name_by_url_and_under_a_wrong_prefix() {
    if !require_kernel() {
        return;
    }
    let agent = Agent::start();
    let port = agent.addr.port();
    for address in [
        format!("localhost:{port}"),
        format!("http://localhost:{port}"),
        format!("http://127.0.0.1:{port}/"),
    ] {
        let (output, _) = poolscope(&["pools", "--json", "--agent", &address], None);
        assert!(output.status.success(), "{address}: {}", stderr(&output));
        let pools: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(pools["pools"].is_array(), "{address}: {pools}");
        let (output, _) = poolscope(&["connections", "--agent", &address], None);
        assert!(output.status.success(), "{address}: {}", stderr(&output));
        assert!(
            String::from_utf8_lossy(&output.stdout).starts_with("    PID PROCESS"),
            "{address}: the table's header"
        );
    }
    // The agent serves no prefix: the prefix is really sent.
    let address = format!("http://127.0.0.1:{port}/poolscope");
    let (output, _) = poolscope(&["pools", "--agent", &address], None);
    assert_fails_saying(
        &output,
        &[&format!(
            "the agent at {address} answered 404 for /api/v1/pools"
        )],
    );
    // The agent listens on 127.0.0.1 only: over IPv6 nothing answers.
    let address = format!("[::1]:{port}");
    let (output, _) = poolscope(&["pools", "--agent", &address], None);
    assert_fails_saying(&output, &["is `poolscope run` running?"]);
}
