//! Issue 15, item 4: the whole OTLP exporter configuration, against the real
//! agent and the test receiver (`poolscope_tests::otlp_receiver`).
//!
//! No database is needed: the agent's own metrics (`poolscope.kernel.events`
//! and the rest) go out every interval, and a slow acquire reported on the
//! adapter socket by the test itself makes a log record.
//!
//! - gRPC over TLS with a CA the test makes and a required header, the agent
//!   configured by variables only; a wrong header is refused and counted as
//!   failed batches, and without the CA the handshake fails;
//! - http/protobuf with a path per signal and gzip;
//! - http/protobuf over TLS with a client certificate (mutual TLS), from the
//!   config file's keys only;
//! - a variable wins over the config file;
//! - OTEL_METRIC_EXPORT_INTERVAL sets the interval;
//! - bad values stop the agent at start with the variable's name.
//!
//! Certificates are made with the `openssl` command.

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use poolscope_tests::{
    adapter_config, agent_bin, free_port, metric_sample,
    otlp_receiver::{OtlpReceiver, ReceiverOptions, ServerTls, Signal, Transport},
    require_kernel, tcp_listening, wait_exit, wait_until, TempDir,
};

/// How long exported data may take to arrive: a few one-second intervals.
const ARRIVAL: Duration = Duration::from_secs(30);

/// The agent's self-metric that every export carries.
const KERNEL_EVENTS: &str = "poolscope.kernel.events";

// ---------------------------------------------------------------------------
// The agent, with an environment of the test's choosing
// ---------------------------------------------------------------------------

/// `poolscope run` with a config file and the given OTEL_* variables (every
/// OTEL_* variable of the test's own environment removed, so that the
/// runner's cannot leak in). SIGTERM on drop.
struct EnvAgent {
    addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl EnvAgent {
    fn command(dir: &TempDir, toml: &str, env: &[(&str, &str)], addr: SocketAddr) -> Command {
        let config = dir.path().join("poolscope.toml");
        fs::write(&config, toml).expect("write the agent's config");
        let log = File::create(dir.path().join("agent.log")).expect("create the agent log");
        let log_err = log.try_clone().expect("dup the agent log");
        let mut command = Command::new(agent_bin());
        command
            .args(["run", "--listen", &addr.to_string(), "--config"])
            .arg(&config)
            .env_remove("POOLSCOPE_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        command.envs(env.iter().copied());
        command
    }

    /// Starts the agent and waits (30 s at most) for `/healthz`.
    fn start(toml: &str, env: &[(&str, &str)]) -> EnvAgent {
        let dir = TempDir::new("poolscope-otlp-config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let child = EnvAgent::command(&dir, toml, env, addr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin().display()));
        let mut agent = EnvAgent { addr, child, dir };
        let ready = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("the agent exited at start: {status}\n{}", agent.log());
            }
            // Connect only once the port listens, as tests/src/agent.rs does.
            if !tcp_listening(addr.port()) {
                return None;
            }
            agent
                .get("/healthz")
                .ok()
                .filter(|body| body.trim() == "ok")
        });
        assert!(ready.is_some(), "no /healthz within 30 s\n{}", agent.log());
        agent
    }

    /// Runs the agent expecting it to stop by itself (30 s at most): its
    /// exit status and log.
    fn run_to_exit(toml: &str, env: &[(&str, &str)]) -> (ExitStatus, String) {
        let dir = TempDir::new("poolscope-otlp-config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let mut child = EnvAgent::command(&dir, toml, env, addr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin().display()));
        let status = wait_exit(&mut child, Duration::from_secs(30));
        let log = read_text(&dir.path().join("agent.log"));
        match status {
            Some(status) => (status, log),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not stop within 30 s\n{log}");
            }
        }
    }

    fn log(&self) -> String {
        read_text(&self.dir.path().join("agent.log"))
    }

    /// The body of GET `path` (HTTP/1.0; the agent closes after answering).
    fn get(&self, path: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default())
    }

    /// A sample of the agent's `/metrics` (0 when absent).
    fn metric(&self, selector: &str) -> f64 {
        let text = self
            .get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", self.log()));
        metric_sample(&text, selector).unwrap_or(0.0)
    }
}

impl Drop for EnvAgent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if wait_exit(&mut self.child, Duration::from_secs(15)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_text(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// The agent's config: its adapter sockets in `dir` (away from any other
/// agent's), a 100 ms slow-acquire threshold, and `otlp` as `[otlp]`.
fn config(dir: &Path, otlp: &str) -> String {
    format!(
        "{}\n[otlp]\n{otlp}\n",
        adapter_config(&dir.join("adapter.sock"), &[("slow_acquire_ms", 100.0)])
    )
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn path_text(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A CA, a server certificate for localhost and 127.0.0.1, and a client
/// certificate, all signed by the CA, made with `openssl`.
struct Pki {
    dir: TempDir,
}

const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = poolscope-test-ca
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (is it installed?): {e}"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Pki {
    fn make() -> Pki {
        let dir = TempDir::new("poolscope-otlp-pki");
        let d = dir.path();
        fs::write(d.join("openssl.cnf"), OPENSSL_CONFIG).expect("write openssl.cnf");
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec![
            "req",
            "-x509",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
        ];
        ca.extend(new_key);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
        openssl(d, &ca);
        for (name, cn) in [("server", "localhost"), ("client", "poolscope-agent")] {
            let subject = format!("/CN={cn}");
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let mut request = vec!["req", "-new", "-config", "openssl.cnf", "-subj", &subject];
            request.extend(new_key);
            request.extend(["-keyout", &key, "-out", &csr]);
            openssl(d, &request);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    "openssl.cnf",
                    "-extensions",
                    name,
                    "-out",
                    &pem,
                ],
            );
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.path(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
    }

    /// The receiver's TLS: the server certificate, and the CA for client
    /// certificates when `mutual`.
    fn server(&self, mutual: bool) -> ServerTls {
        ServerTls {
            cert_pem: self.read("server.pem"),
            key_pem: self.read("server.key"),
            client_ca_pem: mutual.then(|| self.read("ca.pem")),
        }
    }
}

// ---------------------------------------------------------------------------
// What arrived
// ---------------------------------------------------------------------------

/// Waits for a metrics request holding the agent's self-metrics.
fn wait_for_metrics(receiver: &OtlpReceiver, transport: Transport, agent: &EnvAgent) {
    let arrived = wait_until(ARRIVAL, || {
        receiver
            .metric_snapshots()
            .iter()
            .any(|s| s.transport == transport && s.names.contains(KERNEL_EVENTS))
            .then_some(())
    });
    assert!(
        arrived.is_some(),
        "no {KERNEL_EVENTS} over {transport:?} within {ARRIVAL:?}\n{}\n--- agent log ---\n{}",
        receiver.summary(),
        agent.log()
    );
}

/// Reports a pool with one slow acquire on the agent's adapter socket (in
/// `config_dir`, see [`config`]), as an application's adapter would: an
/// acquire_end with the wait folded in. The agent sends it as a log record.
fn report_slow_acquire(agent: &EnvAgent, config_dir: &Path) {
    let socket = UnixDatagram::unbound().expect("a datagram socket");
    socket
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("a write timeout");
    for message in [
        r#"{"v":1,"kind":"pool","pool":"otlp-config","db_system":"postgresql","max":2}"#,
        r#"{"v":1,"kind":"acquire_end","pool":"otlp-config","request":1,"result":"timeout","wait_ns":2000000000}"#,
    ] {
        socket
            .send_to(message.as_bytes(), config_dir.join("adapter.sock"))
            .unwrap_or_else(|e| panic!("send to the adapter socket: {e}\n{}", agent.log()));
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// gRPC over TLS with a CA of our own and a required header, from variables
/// only (the config file has no endpoint): metrics arrive and carry the
/// header, URL-decoded. With a wrong header the receiver refuses every
/// request and the agent counts failed batches; without the CA (the system's
/// trust store knows ours not) no request gets through the handshake.
#[test]
fn grpc_over_tls_with_a_header_from_variables_only() {
    if !require_kernel() {
        return;
    }
    let pki = Pki::make();
    let receiver = OtlpReceiver::start_with(ReceiverOptions {
        tls: Some(pki.server(false)),
        required_header: Some(("x-api-key".into(), "s3cret value".into())),
        ..ReceiverOptions::default()
    });
    let endpoint = format!("https://localhost:{}", receiver.grpc_port);
    let ca = pki.path("ca.pem");
    let dir = TempDir::new("poolscope-otlp-grpc-tls");
    let toml = config(dir.path(), "");
    // Everything from variables: the endpoint, the header (URL-encoded),
    // the CA when given, a short timeout and interval.
    let env = |headers: &str, ca: Option<&Path>| -> Vec<(String, String)> {
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_HEADERS".into(), headers.to_owned()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT".into(), "2000".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL".into(), "1000".into()),
        ];
        if let Some(ca) = ca {
            env.push((
                "OTEL_EXPORTER_OTLP_CERTIFICATE".into(),
                path_text(ca).to_owned(),
            ));
        }
        env
    };

    let good = env("x-api-key=s3cret%20value", Some(&ca));
    {
        let agent = EnvAgent::start(&toml, &pairs(&good));
        wait_for_metrics(&receiver, Transport::Grpc, &agent);
        let seen = receiver.request_log();
        let metrics = seen
            .iter()
            .find(|r| r.signal == Signal::Metrics && !r.refused)
            .unwrap_or_else(|| panic!("no admitted metrics request in {seen:#?}"));
        assert_eq!(
            metrics.headers.get("x-api-key").map(String::as_str),
            Some("s3cret value")
        );
        assert_eq!(receiver.refused(), 0, "{}", receiver.summary());
    }

    let admitted_before = receiver.requests(Signal::Metrics, None);
    let wrong = env("x-api-key=wrong", Some(&ca));
    {
        let agent = EnvAgent::start(&toml, &pairs(&wrong));
        let failed = wait_until(ARRIVAL, || {
            let failed = agent
                .metric("poolscope_export_batches_total{signal=\"metrics\",result=\"failed\"}");
            (failed >= 1.0 && receiver.refused() >= 1).then_some(failed)
        });
        assert!(
            failed.is_some(),
            "no refused request counted as a failed batch\n{}\n{}",
            receiver.summary(),
            agent.log()
        );
        assert_eq!(
            agent.metric("poolscope_export_batches_total{signal=\"metrics\",result=\"ok\"}"),
            0.0,
            "a refused export counted as ok"
        );
    }
    assert_eq!(
        receiver.requests(Signal::Metrics, None),
        admitted_before,
        "the receiver took a request with the wrong header"
    );

    let no_ca = env("x-api-key=s3cret%20value", None);
    let seen_before = receiver.request_log().len();
    {
        let agent = EnvAgent::start(&toml, &pairs(&no_ca));
        let failed = wait_until(ARRIVAL, || {
            let failed = agent
                .metric("poolscope_export_batches_total{signal=\"metrics\",result=\"failed\"}");
            (failed >= 1.0).then_some(failed)
        });
        assert!(
            failed.is_some(),
            "an unknown CA did not fail the export\n{}",
            agent.log()
        );
    }
    assert_eq!(
        receiver.request_log().len(),
        seen_before,
        "a request got through TLS without the CA"
    );
}

/// http/protobuf with a full URL per signal (used as written: nothing is
/// appended) and gzip: metrics and the slow-acquire log record arrive at
/// their own paths, compressed, and nothing goes to the default paths.
#[test]
fn http_per_signal_endpoints_with_gzip() {
    if !require_kernel() {
        return;
    }
    let receiver = OtlpReceiver::start_with(ReceiverOptions {
        http_paths: [
            "/tenant/metrics-in".into(),
            "/tenant/logs-in".into(),
            "/tenant/traces-in".into(),
        ],
        ..ReceiverOptions::default()
    });
    let base = receiver.http_endpoint();
    let metrics_url = format!("{base}/tenant/metrics-in");
    let logs_url = format!("{base}/tenant/logs-in");
    let dir = TempDir::new("poolscope-otlp-http");
    let agent = EnvAgent::start(
        &config(dir.path(), ""),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &metrics_url),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", &logs_url),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ],
    );
    wait_for_metrics(&receiver, Transport::Http, &agent);
    report_slow_acquire(&agent, dir.path());
    let slow = telemetry_catalogue::EVENT_ACQUIRE_SLOW.name;
    receiver.wait_for(ARRIVAL, "the slow-acquire log record", |r| {
        (!r.events(slow).is_empty()).then_some(())
    });

    let seen = receiver.request_log();
    for (signal, path) in [
        (Signal::Metrics, "/tenant/metrics-in"),
        (Signal::Logs, "/tenant/logs-in"),
    ] {
        let requests: Vec<_> = seen.iter().filter(|r| r.signal == signal).collect();
        assert!(!requests.is_empty(), "no {signal:?} request: {seen:#?}");
        for request in requests {
            assert_eq!(request.path, path, "{request:#?}");
            assert_eq!(request.encoding(), Some("gzip"), "{request:#?}");
        }
    }
    assert!(
        receiver.rejected().is_empty(),
        "requests went elsewhere or did not decode: {:?}",
        receiver.rejected()
    );
}

/// http/protobuf over TLS with a client certificate, from the config file's
/// keys only: the receiver asks for a certificate signed by the CA, and
/// metrics arrive.
#[test]
fn https_with_a_client_certificate_from_the_config_file() {
    if !require_kernel() {
        return;
    }
    let pki = Pki::make();
    let receiver = OtlpReceiver::start_with(ReceiverOptions {
        tls: Some(pki.server(true)),
        required_header: Some(("authorization".into(), "Bearer file-token".into())),
        ..ReceiverOptions::default()
    });
    let dir = TempDir::new("poolscope-otlp-mtls");
    let otlp = format!(
        "endpoint = \"https://127.0.0.1:{}\"\nprotocol = \"http/protobuf\"\n\
         interval_seconds = 1.0\ncertificate = {:?}\nclient_certificate = {:?}\n\
         client_key = {:?}\nheaders = {{ Authorization = \"Bearer file-token\" }}\n",
        receiver.http_port,
        path_text(&pki.path("ca.pem")),
        path_text(&pki.path("client.pem")),
        path_text(&pki.path("client.key")),
    );
    let agent = EnvAgent::start(&config(dir.path(), &otlp), &[]);
    wait_for_metrics(&receiver, Transport::Http, &agent);
    assert_eq!(receiver.refused(), 0, "{}", receiver.summary());
    // The same without the client certificate: the handshake fails.
    drop(agent);
    let without_client = format!(
        "endpoint = \"https://127.0.0.1:{}\"\nprotocol = \"http/protobuf\"\n\
         interval_seconds = 1.0\ntimeout_seconds = 1.0\ncertificate = {:?}\n",
        receiver.http_port,
        path_text(&pki.path("ca.pem")),
    );
    let rejected_before = receiver.rejected().len();
    let dir = TempDir::new("poolscope-otlp-mtls");
    let agent = EnvAgent::start(&config(dir.path(), &without_client), &[]);
    let refused = wait_until(ARRIVAL, || {
        (receiver.rejected().len() > rejected_before
            && agent.metric("poolscope_export_batches_total{signal=\"metrics\",result=\"failed\"}")
                >= 1.0)
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "a client without a certificate was not refused\n{}\n{}",
        receiver.summary(),
        agent.log()
    );
}

/// The config file names one collector, OTEL_EXPORTER_OTLP_ENDPOINT
/// another: the data goes to the variable's.
#[test]
fn a_variable_wins_over_the_config_file() {
    if !require_kernel() {
        return;
    }
    let from_file = OtlpReceiver::start();
    let from_env = OtlpReceiver::start();
    let dir = TempDir::new("poolscope-otlp-precedence");
    let otlp = format!(
        "endpoint = {:?}\nprotocol = \"grpc\"\ninterval_seconds = 1.0\n",
        from_file.grpc_endpoint()
    );
    let agent = EnvAgent::start(
        &config(dir.path(), &otlp),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &from_env.grpc_endpoint())],
    );
    wait_for_metrics(&from_env, Transport::Grpc, &agent);
    report_slow_acquire(&agent, dir.path());
    let slow = telemetry_catalogue::EVENT_ACQUIRE_SLOW.name;
    from_env.wait_for(ARRIVAL, "the slow-acquire log record", |r| {
        (!r.events(slow).is_empty()).then_some(())
    });
    for signal in [Signal::Metrics, Signal::Logs] {
        assert_eq!(
            from_file.requests(signal, None),
            0,
            "the config file's collector got {signal:?}: {}",
            from_file.summary()
        );
    }
    // The file's endpoint is used when the variable is not set.
    drop(agent);
    let dir = TempDir::new("poolscope-otlp-precedence");
    let agent = EnvAgent::start(&config(dir.path(), &otlp), &[]);
    wait_for_metrics(&from_file, Transport::Grpc, &agent);
}

/// OTEL_METRIC_EXPORT_INTERVAL (milliseconds) wins over the file's 60 s:
/// exports come every half second.
#[test]
fn the_metric_export_interval_variable_takes_effect() {
    if !require_kernel() {
        return;
    }
    let receiver = OtlpReceiver::start();
    let dir = TempDir::new("poolscope-otlp-interval");
    let otlp = format!(
        "endpoint = {:?}\ninterval_seconds = 60.0\n",
        receiver.grpc_endpoint()
    );
    let started = Instant::now();
    let agent = EnvAgent::start(
        &config(dir.path(), &otlp),
        &[("OTEL_METRIC_EXPORT_INTERVAL", "500")],
    );
    wait_for_metrics(&receiver, Transport::Grpc, &agent);
    let first = receiver
        .metric_snapshots()
        .into_iter()
        .find(|s| s.names.contains(KERNEL_EVENTS))
        .map(|s| s.received_at)
        .expect("a first export");
    assert!(
        first.duration_since(started) < Duration::from_secs(30),
        "the first export came after {:?}",
        first.duration_since(started)
    );
    std::thread::sleep(Duration::from_secs(4));
    // The main provider's exports (the one with the kernel counters): one
    // per interval, so about 8 in 4 s; 60 s would give none.
    let exports = receiver
        .metric_snapshots()
        .iter()
        .filter(|s| s.names.contains(KERNEL_EVENTS) && s.received_at > first)
        .count();
    assert!(
        (5..=12).contains(&exports),
        "{exports} exports in the 4 s after the first, expected about 8 at 500 ms\n{}",
        agent.log()
    );
}

/// Bad values stop the agent at start, naming the variable or key.
#[test]
fn bad_values_stop_the_agent_naming_the_variable() {
    if !require_kernel() {
        return;
    }
    let dir = TempDir::new("poolscope-otlp-bad");
    let toml = config(dir.path(), "");
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
    for (variable, value, says) in [
        (
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            "br",
            "OTEL_EXPORTER_OTLP_COMPRESSION=\"br\" is not supported: use gzip or none",
        ),
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "/nonexistent/ca.pem",
            "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read /nonexistent/ca.pem",
        ),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "api-key",
            "OTEL_EXPORTER_OTLP_HEADERS: entry 1 has no `=`",
        ),
        (
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
            "5s",
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT=\"5s\" is not a whole number of milliseconds",
        ),
    ] {
        let (status, log) = EnvAgent::run_to_exit(&toml, &[endpoint, (variable, value)]);
        assert!(
            !status.success(),
            "{variable}={value:?}: exited {status}\n{log}"
        );
        assert!(
            log.contains(says),
            "{variable}={value:?}: the log does not say {says:?}\n{log}"
        );
    }
}
