//! The I/O of the lookups: finding the API server from inside a pod, one
//! `GET /api/v1/namespaces/{namespace}/pods/{name}` per pod, and the worker
//! thread that makes them one at a time as `directory` says.
//!
//! A thread with reqwest's blocking client, like the OTLP exports: the
//! lookups are rare (one per pod), and a slow API server then holds up
//! this thread only, never the runtime's two workers.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;

use super::{
    directory::{Next, Notice, Outcome, PodKey},
    pod::{self, MAX_POD_JSON_BYTES},
    Shared,
};

/// Where a pod's service account is mounted (the kubelet's convention).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A lookup gets this long in all (connect, request, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A token file larger than this is no token (they are about 1 KiB).
const MAX_TOKEN_BYTES: u64 = 64 << 10;

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct ApiServer {
    /// `https://host:port`, no trailing slash.
    pub base_url: String,
    /// The CA that signed the server's certificate (PEM); the service
    /// account's `ca.crt`.
    pub ca_pem: Option<Vec<u8>>,
    /// Read at each request: the kubelet rotates projected tokens.
    pub token_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// Why the agent does not look pods up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotInCluster {
    /// No KUBERNETES_SERVICE_HOST/PORT: not in a pod.
    NoServiceVariables,
    /// In a pod, but without its service account's token or CA (the
    /// DaemonSet of an older deploy/ has `automountServiceAccountToken: false`).
    NoAccount(PathBuf),
    Unreadable(PathBuf, String),
}

impl std::fmt::Display for NotInCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotInCluster::NoServiceVariables => {
                write!(f, "not in a pod (no KUBERNETES_SERVICE_HOST/PORT)")
            }
            NotInCluster::NoAccount(path) => write!(
                f,
                "no service account token at {} (is automountServiceAccountToken false?)",
                path.display()
            ),
            NotInCluster::Unreadable(path, why) => {
                write!(f, "cannot read {}: {why}", path.display())
            }
        }
    }
}

/// The API server as a pod sees it: the `kubernetes` Service's address
/// from the variables the kubelet sets, and the service account mounted at
/// `account_dir`.
pub fn in_cluster(
    variable: &dyn Fn(&str) -> Option<String>,
    account_dir: &Path,
) -> Result<ApiServer, NotInCluster> {
    let set = |name: &str| variable(name).filter(|v| !v.trim().is_empty());
    let (Some(host), Some(port)) = (
        set("KUBERNETES_SERVICE_HOST"),
        set("KUBERNETES_SERVICE_PORT"),
    ) else {
        return Err(NotInCluster::NoServiceVariables);
    };
    let (host, port) = (host.trim(), port.trim());
    // An IPv6 service address goes in brackets in a URL.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let token_file = account_dir.join("token");
    let ca_file = account_dir.join("ca.crt");
    for file in [&token_file, &ca_file] {
        if !file.is_file() {
            return Err(NotInCluster::NoAccount(file.clone()));
        }
    }
    let ca_pem = std::fs::read(&ca_file)
        .map_err(|e| NotInCluster::Unreadable(ca_file.clone(), e.to_string()))?;
    Ok(ApiServer {
        base_url: format!("https://{host}:{port}"),
        ca_pem: Some(ca_pem),
        token_file: Some(token_file),
        timeout: REQUEST_TIMEOUT,
    })
}

/// The outcome a status code decides without reading the body: everything
/// but 200.
fn outcome_of_status(status: u16) -> Option<Outcome> {
    match status {
        200 => None,
        404 => Some(Outcome::NotFound),
        401 | 403 => Some(Outcome::Refused { status }),
        other => Some(Outcome::Failed(format!(
            "the API server answered HTTP {other}"
        ))),
    }
}

/// At most `cap` bytes of `reader`; `Ok(Err(()))` when there are more.
fn read_capped(reader: impl Read, cap: usize) -> std::io::Result<Result<Vec<u8>, ()>> {
    let mut body = Vec::new();
    reader.take(cap as u64 + 1).read_to_end(&mut body)?;
    Ok(if body.len() > cap { Err(()) } else { Ok(body) })
}

/// The service account's token, read anew (the kubelet rotates it).
fn read_token(file: &Path) -> anyhow::Result<String> {
    let mut token = String::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_TOKEN_BYTES).read_to_string(&mut token))
        .with_context(|| format!("cannot read the service account token {}", file.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the service account token {} is empty",
        file.display()
    );
    Ok(token.to_string())
}

/// Makes the requests. Blocking: only on the worker's thread.
pub struct Fetcher {
    server: ApiServer,
    http: reqwest::blocking::Client,
}

impl Fetcher {
    /// Builds the HTTP client; not on a Tokio runtime thread (reqwest's
    /// blocking client refuses).
    pub fn new(server: ApiServer) -> anyhow::Result<Fetcher> {
        // reqwest has no TLS crypto provider of its own (root Cargo.toml).
        crate::https::install_crypto_provider();
        let mut builder = reqwest::blocking::Client::builder()
            .user_agent(concat!("poolscope/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(server.timeout)
            .timeout(server.timeout)
            // The token goes to the API server only: not through a proxy
            // the pod's environment names for the web, nor wherever a
            // redirect points.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &server.ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(ca)
                .context("the service account's CA (ca.crt)")?;
            anyhow::ensure!(
                !certificates.is_empty(),
                "the service account's CA (ca.crt) holds no certificate"
            );
            // Only the cluster's CA: the API server's certificate is not
            // signed by a public one.
            builder = builder.tls_certs_only(certificates);
        }
        let http = builder
            .build()
            .context("cannot build the Kubernetes API client")?;
        Ok(Fetcher { server, http })
    }

    /// One lookup. Every failure is an [`Outcome`], never a panic.
    pub fn fetch(&self, pod: &PodKey) -> Outcome {
        let url = format!(
            "{}/api/v1/namespaces/{}/pods/{}",
            self.server.base_url, pod.namespace, pod.name
        );
        let mut request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(file) = &self.server.token_file {
            match read_token(file) {
                Ok(token) => request = request.bearer_auth(token),
                Err(e) => return Outcome::Failed(format!("{e:#}")),
            }
        }
        let response = match request.send() {
            Ok(response) => response,
            // Without the URL: it names the pod, which the caller knows.
            Err(e) => return Outcome::Failed(describe(&e.without_url())),
        };
        if let Some(outcome) = outcome_of_status(response.status().as_u16()) {
            return outcome;
        }
        if let Some(length) = response
            .content_length()
            .filter(|length| *length > MAX_POD_JSON_BYTES as u64)
        {
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            return Outcome::Unreadable(pod::PodError::TooLarge(length).to_string());
        }
        match read_capped(response, MAX_POD_JSON_BYTES) {
            Err(e) => Outcome::Failed(format!("the answer was cut short: {e}")),
            Ok(Err(())) => Outcome::Unreadable(format!(
                "the pod object is larger than the {MAX_POD_JSON_BYTES} bytes read"
            )),
            Ok(Ok(body)) => match pod::workload_of(&body) {
                Ok(workload) => Outcome::Found(workload),
                Err(e) => Outcome::Unreadable(e.to_string()),
            },
        }
    }
}

/// A request error in one line, with its causes (reqwest's own Display
/// says only "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Starts the thread that makes the lookups `shared`'s directory asks for.
pub(super) fn spawn_worker(server: ApiServer, shared: Arc<Shared>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("poolscope-k8s".into())
        .spawn(move || {
            let base_url = server.base_url.clone();
            match Fetcher::new(server) {
                Ok(fetcher) => {
                    log::info!(
                        "Kubernetes API at {base_url}: looking up each observed pod's workload"
                    );
                    work(&fetcher, &shared);
                }
                Err(e) => {
                    log::warn!(
                        "no workload names from the Kubernetes API: {e:#}; they come from the \
                         processes' own OTEL_RESOURCE_ATTRIBUTES only"
                    );
                    shared.lock().closed = true;
                }
            }
        })
        .context("cannot start the Kubernetes lookups' thread")?;
    Ok(())
}

fn work(fetcher: &Fetcher, shared: &Shared) {
    loop {
        let pod = {
            let mut state = shared.lock();
            loop {
                if state.closed {
                    return;
                }
                state = match state.directory.next(Instant::now()) {
                    Next::Fetch(pod) => break pod,
                    Next::Wait(wait) => {
                        shared
                            .wake
                            .wait_timeout(state, wait)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    }
                    Next::Idle => shared
                        .wake
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                };
            }
        };
        // Outside the lock: the agent's lookups never wait on the network.
        let outcome = fetcher.fetch(&pod);
        let notice = shared
            .lock()
            .directory
            .complete(pod, outcome, Instant::now());
        if let Some(notice) = notice {
            log_notice(&notice);
        }
    }
}

fn log_notice(notice: &Notice) {
    const MEANWHILE: &str = "workload names (k8s.deployment.name...) come from the processes' own \
                             OTEL_RESOURCE_ATTRIBUTES meanwhile";
    match notice {
        Notice::Refused {
            status: 403,
            retry_in,
        } => log::warn!(
            "Kubernetes API: the agent's service account may not get pods (HTTP 403): grant it \
             `get` on `pods` (deploy/kubernetes/rbac.yaml), or set `[kubernetes] api = \"off\"`; \
             {MEANWHILE}; trying again in {} s",
            retry_in.as_secs()
        ),
        Notice::Refused { status, retry_in } => log::warn!(
            "Kubernetes API: the service account's token was refused (HTTP {status}); \
             {MEANWHILE}; trying again in {} s",
            retry_in.as_secs()
        ),
        Notice::Failing { error, retry_in } => log::warn!(
            "Kubernetes API: cannot look up a pod: {error}; {MEANWHILE}; trying again in {} s, \
             then less often while it fails",
            retry_in.as_secs()
        ),
        Notice::Recovered => log::info!("Kubernetes API: pod lookups work again"),
        Notice::Unreadable { pod, error } => log::warn!(
            "Kubernetes API: pod {}/{}: {error}; its workload stays unnamed",
            pod.namespace,
            pod.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;
    use crate::kubernetes::{directory::Limits, Workload, Workloads};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("poolscope-k8s-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn in_a_pod_the_api_server_is_the_kubernetes_service_with_the_account() {
        let dir = scratch("account");
        let env = |host: &'static str| {
            move |name: &str| match name {
                "KUBERNETES_SERVICE_HOST" => Some(host.to_string()),
                "KUBERNETES_SERVICE_PORT" => Some("443".to_string()),
                _ => None,
            }
        };
        assert_eq!(
            in_cluster(&|_| None, &dir).err(),
            Some(NotInCluster::NoServiceVariables)
        );
        assert_eq!(
            in_cluster(&env("10.96.0.1"), &dir).err(),
            Some(NotInCluster::NoAccount(dir.join("token")))
        );
        std::fs::write(dir.join("token"), "eyJhbGciOi.x.y\n").expect("token");
        assert_eq!(
            in_cluster(&env("10.96.0.1"), &dir).err(),
            Some(NotInCluster::NoAccount(dir.join("ca.crt")))
        );
        std::fs::write(dir.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").expect("ca");
        let server = in_cluster(&env("10.96.0.1"), &dir).expect("in a pod");
        assert_eq!(server.base_url, "https://10.96.0.1:443");
        assert_eq!(server.token_file, Some(dir.join("token")));
        assert_eq!(server.timeout, REQUEST_TIMEOUT);
        let server = in_cluster(&env("fd00:10:96::1"), &dir).expect("IPv6");
        assert_eq!(server.base_url, "https://[fd00:10:96::1]:443");
        assert_eq!(
            read_token(&dir.join("token")).expect("token"),
            "eyJhbGciOi.x.y"
        );
        std::fs::write(dir.join("token"), "\n").expect("empty token");
        assert!(read_token(&dir.join("token")).is_err());
        // A CA file that holds no certificate fails the client, not a panic.
        assert!(Fetcher::new(server).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn statuses_and_capped_bodies() {
        assert_eq!(outcome_of_status(200), None);
        assert_eq!(outcome_of_status(404), Some(Outcome::NotFound));
        assert_eq!(
            outcome_of_status(403),
            Some(Outcome::Refused { status: 403 })
        );
        assert_eq!(
            outcome_of_status(401),
            Some(Outcome::Refused { status: 401 })
        );
        for status in [429, 500, 503, 301] {
            assert!(
                matches!(outcome_of_status(status), Some(Outcome::Failed(_))),
                "{status}"
            );
        }
        assert_eq!(
            read_capped(&b"abcd"[..], 4).expect("read"),
            Ok(b"abcd".to_vec())
        );
        assert_eq!(read_capped(&b"abcde"[..], 4).expect("read"), Err(()));
        // An endless body stops at the cap.
        assert_eq!(
            read_capped(std::io::repeat(b'x'), 1024).expect("read"),
            Err(())
        );
    }

    /// A plain-HTTP server on loopback that answers each request with the
    /// next of `answers` (or with nothing, holding the connection, for
    /// `None`) and sends each request's head to the test. It stands in for
    /// the API server's HTTP only: no TLS, no Kubernetes.
    fn local_server(answers: Vec<Option<String>>) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (heads, received) = mpsc::channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for answer in answers {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let _ = heads.send(head);
                let mut stream = reader.into_inner();
                match answer {
                    Some(answer) => {
                        let _ = stream.write_all(answer.as_bytes());
                    }
                    None => held.push(stream),
                }
            }
            // Held connections stay open, unanswered, past the test's timeouts.
            std::thread::sleep(Duration::from_secs(5));
            drop(held);
        });
        (url, received)
    }

    fn http(status: &str, body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    const STATEFUL_POD: &str = r#"{"kind": "Pod", "metadata": {"name": "postgres-0",
        "namespace": "shop", "ownerReferences": [{"apiVersion": "apps/v1",
        "kind": "StatefulSet", "name": "postgres", "uid": "u", "controller": true}]}}"#;

    fn local(url: &str, token_file: Option<PathBuf>) -> ApiServer {
        ApiServer {
            base_url: url.to_string(),
            ca_pem: None,
            token_file,
            timeout: Duration::from_millis(500),
        }
    }

    fn pod_key(namespace: &str, name: &str) -> PodKey {
        PodKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn each_answer_becomes_an_outcome() {
        let dir = scratch("fetch");
        std::fs::write(dir.join("token"), "s3cret\n").expect("token");
        let huge = format!(r#"{{"x": "{}"}}"#, "y".repeat(MAX_POD_JSON_BYTES));
        let (url, heads) = local_server(vec![
            http("200 OK", STATEFUL_POD),
            http("403 Forbidden", r#"{"kind": "Status", "code": 403}"#),
            http("404 Not Found", "{}"),
            http("500 Internal Server Error", ""),
            http("200 OK", "<html>"),
            http("200 OK", &huge),
            None,
        ]);
        let fetcher = Fetcher::new(local(&url, Some(dir.join("token")))).expect("client");
        let pod = pod_key("shop", "postgres-0");
        assert_eq!(
            fetcher.fetch(&pod),
            Outcome::Found(Some(Workload::StatefulSet {
                name: "postgres".into()
            }))
        );
        let head = heads.recv().expect("a request");
        assert!(
            head.starts_with("GET /api/v1/namespaces/shop/pods/postgres-0 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer s3cret\r\n"),
            "{head}"
        );
        assert_eq!(fetcher.fetch(&pod), Outcome::Refused { status: 403 });
        assert_eq!(fetcher.fetch(&pod), Outcome::NotFound);
        assert!(matches!(fetcher.fetch(&pod), Outcome::Failed(e) if e.contains("HTTP 500")));
        assert!(matches!(fetcher.fetch(&pod), Outcome::Unreadable(e) if e.contains("not a pod")));
        assert!(matches!(fetcher.fetch(&pod), Outcome::Unreadable(e) if e.contains("more than")));
        let started = Instant::now();
        let got = fetcher.fetch(&pod);
        assert!(
            matches!(&got, Outcome::Failed(e) if e.contains("timed out")),
            "a server that never answers: {got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_worker_answers_later_and_never_makes_the_caller_wait() {
        let (url, heads) = local_server(vec![
            http("503 Service Unavailable", ""),
            http("200 OK", STATEFUL_POD),
        ]);
        let limits = Limits {
            first_backoff: Duration::from_millis(50),
            ..Limits::default()
        };
        let workloads = Workloads::start_with(local(&url, None), limits).expect("worker");
        assert_eq!(workloads.lookup("shop", "postgres-0"), None);
        // Names that are no object names are never asked for.
        assert_eq!(workloads.lookup("shop", "../../secrets"), None);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut answered = Vec::new();
        while answered.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            answered = workloads.take_answered();
        }
        assert_eq!(answered, vec![pod_key("shop", "postgres-0")]);
        assert_eq!(
            workloads.lookup("shop", "postgres-0"),
            Some(Workload::StatefulSet {
                name: "postgres".into()
            })
        );
        let counts = workloads.counts();
        assert_eq!((counts.failed, counts.found), (1, 1));
        // Two requests in all, both for the one pod.
        let heads: Vec<String> = heads.try_iter().collect();
        assert_eq!(heads.len(), 2);
        assert!(heads
            .iter()
            .all(|h| h.starts_with("GET /api/v1/namespaces/shop/pods/postgres-0 ")));
        // Forgotten once no longer seen.
        workloads.retain_seen(&Default::default());
        assert_eq!(workloads.shared.lock().directory.remembered(), 0);
    }
}
