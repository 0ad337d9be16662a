//! The deployment files: `deploy/kubernetes` (the DaemonSet and what goes
//! with it), `deploy/systemd` (the unit and its configuration), the
//! Dockerfile, and `deploy/README.md`, which documents them.
//!
//! - Every manifest, and every YAML example in deploy/README.md, passes
//!   `kubernetes-validate --strict` (offline Kubernetes schemas; unknown
//!   fields are errors). It has no schema for the Prometheus Operator's
//!   ServiceMonitor and only says WARN for it: that one warning is expected
//!   by name, and the ServiceMonitor is checked here instead, field by field
//!   against the CRD (prometheus-operator 0.84), with its metadata and label
//!   selector validated by kubernetes-validate inside core resources.
//!   Rust reads the YAML with `poolscope_tests::yaml`, which refuses what
//!   YAML 1.1 readers (kubernetes-validate's PyYAML, Kubernetes) would read
//!   otherwise; only kubernetes-validate itself runs in Python.
//! - Both configuration files parse with the agent's own parser, name every
//!   key, and keep every default but `[http] listen`.
//! - The capabilities are the same in the DaemonSet, the unit and the docs;
//!   the Service, ServiceMonitor and probes point at the port the config
//!   listens on.
//! - The unit passes `systemd-analyze verify` with nothing on stderr (bad
//!   keys only warn there and exit 0), and `systemd-analyze security` rates
//!   it 3.0 or better.
//! - As root: the agent runs under the unit's sandbox, rebuilt without
//!   systemd by deploy/systemd/unit-sandbox.py (systemd is not PID 1 on the
//!   machines this runs on), and still loads its probes, seeds existing
//!   connections, sees new ones, takes adapter messages and mounts tracefs.
//!
//! The tools come from `cargo xtask setup` (kubernetes-validate from PyPI,
//! systemd and python3-seccomp from Debian); without them these tests skip
//! with a message, and fail under CI (`CI=true`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use poolscope::config::Config;
use poolscope_tests::{
    agent_bin, free_port, json, operation_counts, python3, require_kernel, tcp_listening,
    wait_exit, wait_until, yaml, ConnClient, ConnectionView, Postgres, TempDir, Value,
    EVENT_TIMEOUT,
};

/// The capabilities the agent is given, as Kubernetes spells them.
const CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
];

/// The port the agent serves /metrics on, in both configurations.
const HTTP_PORT: u16 = 9464;

/// API groups that kubernetes-validate has no schema for (CRDs), checked
/// structurally by [`servicemonitor_follows_the_crd_and_scrapes_the_service`].
const CRD_API_VERSIONS: &[&str] = &["monitoring.coreos.com/v1"];

/// Kubernetes versions the manifests must validate against: the newest the
/// tool knows, and an older one still in use.
const KUBERNETES_VERSIONS: &[Option<&str>] = &[None, Some("1.28")];

/// Kinds without a namespace (besides Namespace itself).
const CLUSTER_SCOPED: &[&str] = &["ClusterRole", "ClusterRoleBinding"];

/// Files in deploy/kubernetes that kustomization.yaml deliberately leaves out.
const OPTIONAL_MANIFESTS: &[&str] = &["networkpolicy.yaml"];

const UNIT_EXEC_START: &str = "/usr/local/bin/poolscope run --config /etc/poolscope/poolscope.toml";

// ---------------------------------------------------------------------------
// Tools and files
// ---------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

fn kubernetes_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// True when `what` is usable; otherwise a skip message, or a failure in CI.
fn have(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    let text = format!("{what}: run cargo xtask setup");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{text}");
    }
    eprintln!("skipped: {text}");
    false
}

/// Whether the tests' interpreter imports all of `modules`.
fn python_has(modules: &str) -> bool {
    Command::new(python3())
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_kubernetes_validate() -> bool {
    have(
        python_has("kubernetes_validate, yaml"),
        "kubernetes-validate (and PyYAML) are not installed for python3",
    )
}

fn have_systemd_analyze() -> bool {
    have(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "systemd-analyze is not installed",
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The one resource in `deploy/kubernetes/<file>`.
fn manifest(file: &str) -> Value {
    let path = kubernetes_dir().join(file);
    let mut docs = yaml::read_documents(&path);
    assert_eq!(docs.len(), 1, "{} holds one resource", path.display());
    docs.remove(0)
}

/// Every manifest file in deploy/kubernetes but kustomization.yaml.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(kubernetes_dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "manifests in deploy/kubernetes: {files:?}"
    );
    files
}

/// The ```yaml blocks of a Markdown file.
fn markdown_yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unclosed ```yaml block");
    blocks
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

fn labels(value: &Value, pointer: &str) -> BTreeMap<String, String> {
    value
        .pointer(pointer)
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no labels at {pointer} in {value}"))
        .iter()
        .map(|(k, v)| {
            // Kubernetes takes strings only: `version: 1` is an error there.
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("label {k} at {pointer} is {v}, not a string"));
            (k.clone(), v.to_string())
        })
        .collect()
}

fn is_subset(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// ---------------------------------------------------------------------------
// kubernetes-validate
// ---------------------------------------------------------------------------

/// Runs `kubernetes-validate --strict` on `file`, whose resources are
/// `resources`, and panics unless every resource passed, but for CRDs, for
/// which exactly the "no schema" warning is expected.
fn kubernetes_validate(file: &Path, resources: &[Value], version: Option<&str>) {
    let mut cmd = Command::new(python3());
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    if let Some(v) = version {
        cmd.args(["--kubernetes-version", v]);
    }
    let out = run(cmd.arg(file));
    let report = format!(
        "kubernetes-validate --strict {}{}:\n{}{}",
        version.map(|v| format!("-k {v} ")).unwrap_or_default(),
        file.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let mut expected = Vec::new();
    for resource in resources {
        let kind = str_at(resource, "/kind");
        let name = str_at(resource, "/metadata/name");
        if CRD_API_VERSIONS.contains(&str_at(resource, "/apiVersion")) {
            expected.push(format!(
                "WARN {} Couldn't find schema for kind {kind} with api version {}",
                file.display(),
                str_at(resource, "/apiVersion")
            ));
        } else {
            expected.push(format!(
                "INFO {} passed for resource {}/{name} against version",
                file.display(),
                kind.to_lowercase()
            ));
        }
    }
    assert_eq!(lines.len(), expected.len(), "{report}");
    for (line, want) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(want.as_str()),
            "expected {want:?}\n{report}"
        );
    }
}

#[test]
fn manifests_pass_kubernetes_validate_strict() {
    if !have_kubernetes_validate() {
        return;
    }
    let mut files: Vec<(PathBuf, Vec<Value>)> = manifest_files()
        .into_iter()
        .map(|f| {
            let docs = yaml::read_documents(&f);
            (f, docs)
        })
        .collect();
    // The examples in deploy/README.md are manifests too.
    let scratch = TempDir::new("poolscope-deploy-readme");
    let blocks = markdown_yaml_blocks(&read(&root().join("deploy/README.md")));
    assert!(!blocks.is_empty(), "deploy/README.md has a YAML example");
    for (i, block) in blocks.iter().enumerate() {
        let path = scratch.path().join(format!("readme-{i}.yaml"));
        fs::write(&path, block).expect("write a README example");
        let docs = yaml::read_documents(&path);
        files.push((path, docs));
    }
    for version in KUBERNETES_VERSIONS {
        for (file, resources) in &files {
            kubernetes_validate(file, resources, *version);
        }
    }
}

#[test]
fn kubernetes_validate_rejects_unknown_fields() {
    // The check above is only worth something if --strict refuses what a
    // cluster would drop or reject.
    if !have_kubernetes_validate() {
        return;
    }
    let scratch = TempDir::new("poolscope-deploy-strict");
    let bad = scratch.path().join("service.yaml");
    let service = read(&kubernetes_dir().join("service.yaml"));
    fs::write(
        &bad,
        service.replace(
            "  clusterIP: None\n",
            "  clusterIP: None\n  clusterIPs2: []\n",
        ),
    )
    .expect("write a bad manifest");
    let out = run(Command::new(python3())
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&bad));
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("'clusterIPs2' was unexpected"),
        "{}",
        text(&out.stdout)
    );
}

// ---------------------------------------------------------------------------
// The ServiceMonitor: no schema in kubernetes-validate, so checked here
// ---------------------------------------------------------------------------

/// A map's keys must all be among `allowed` (the CRD's properties there).
fn only_known_keys(value: &Value, allowed: &[&str], at: &str) {
    let map = value
        .as_object()
        .unwrap_or_else(|| panic!("{at} must be an object: {value}"));
    for key in map.keys() {
        assert!(
            allowed.contains(&key.as_str()),
            "{at}.{key} is not a field of the ServiceMonitor CRD (known: {allowed:?})"
        );
    }
}

/// A Prometheus duration as the CRD's pattern accepts it (`30s`, `1m30s`,
/// `500ms`), in milliseconds.
fn prometheus_duration_ms(text: &str) -> Option<u64> {
    // The CRD's pattern also matches "", which means "Prometheus' default":
    // not what a manifest here should say.
    if text == "0" {
        return Some(0);
    }
    if text.is_empty() {
        return None;
    }
    const UNITS: &[(&str, u64)] = &[
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1_000),
    ];
    let order = ["y", "w", "d", "h", "m", "s", "ms"];
    let mut rest = text;
    let mut total = 0u64;
    let mut last_rank = None;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, factor) = UNITS.iter().find(|(u, _)| rest.starts_with(u))?;
        let rank = order.iter().position(|u| u == unit)?;
        if last_rank.is_some_and(|r| rank <= r) {
            return None;
        }
        last_rank = Some(rank);
        total += n * factor;
        rest = &rest[unit.len()..];
    }
    Some(total)
}

#[test]
fn prometheus_durations() {
    assert_eq!(prometheus_duration_ms("30s"), Some(30_000));
    assert_eq!(prometheus_duration_ms("1m30s"), Some(90_000));
    assert_eq!(prometheus_duration_ms("1h5m"), Some(3_900_000));
    assert_eq!(prometheus_duration_ms("500ms"), Some(500));
    assert_eq!(prometheus_duration_ms("0"), Some(0));
    for bad in ["", "30", "s", "30 s", "5s1m", "1.5s", "30sec"] {
        assert_eq!(prometheus_duration_ms(bad), None, "{bad:?}");
    }
}

#[test]
fn servicemonitor_follows_the_crd_and_scrapes_the_service() {
    if !have_kubernetes_validate() {
        return;
    }
    let monitor = manifest("servicemonitor.yaml");
    let service = manifest("service.yaml");

    // Field names and types, from the CRD's openAPIV3Schema (v0.84.1).
    assert_eq!(str_at(&monitor, "/apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_at(&monitor, "/kind"), "ServiceMonitor");
    only_known_keys(&monitor, &["apiVersion", "kind", "metadata", "spec"], "");
    let spec = &monitor["spec"];
    only_known_keys(
        spec,
        &[
            "attachMetadata",
            "bodySizeLimit",
            "convertClassicHistogramsToNHCB",
            "endpoints",
            "fallbackScrapeProtocol",
            "jobLabel",
            "keepDroppedTargets",
            "labelLimit",
            "labelNameLengthLimit",
            "labelValueLengthLimit",
            "namespaceSelector",
            "nativeHistogramBucketLimit",
            "nativeHistogramMinBucketFactor",
            "podTargetLabels",
            "sampleLimit",
            "scrapeClass",
            "scrapeClassicHistograms",
            "scrapeProtocols",
            "selector",
            "selectorMechanism",
            "targetLabels",
            "targetLimit",
        ],
        "spec",
    );
    // Required by the CRD: selector and endpoints.
    only_known_keys(
        &spec["selector"],
        &["matchLabels", "matchExpressions"],
        "spec.selector",
    );
    only_known_keys(
        &spec["namespaceSelector"],
        &["any", "matchNames"],
        "spec.namespaceSelector",
    );
    let endpoints = spec["endpoints"]
        .as_array()
        .filter(|e| !e.is_empty())
        .expect("spec.endpoints is a non-empty list");
    for (i, endpoint) in endpoints.iter().enumerate() {
        let at = format!("spec.endpoints[{i}]");
        only_known_keys(
            endpoint,
            &[
                "authorization",
                "basicAuth",
                "bearerTokenFile",
                "bearerTokenSecret",
                "enableHttp2",
                "filterRunning",
                "followRedirects",
                "honorLabels",
                "honorTimestamps",
                "interval",
                "metricRelabelings",
                "noProxy",
                "oauth2",
                "params",
                "path",
                "port",
                "proxyConnectHeader",
                "proxyFromEnvironment",
                "proxyUrl",
                "relabelings",
                "scheme",
                "scrapeTimeout",
                "targetPort",
                "tlsConfig",
                "trackTimestampsStaleness",
            ],
            &at,
        );
        for key in ["port", "path", "scheme", "interval", "scrapeTimeout"] {
            assert!(
                endpoint[key].is_string(),
                "{at}.{key} is a string: {endpoint}"
            );
        }
        assert!(
            ["http", "https"].contains(&str_at(endpoint, "/scheme")),
            "{at}.scheme"
        );
        let interval = prometheus_duration_ms(str_at(endpoint, "/interval"))
            .unwrap_or_else(|| panic!("{at}.interval is not a Prometheus duration"));
        let timeout = prometheus_duration_ms(str_at(endpoint, "/scrapeTimeout"))
            .unwrap_or_else(|| panic!("{at}.scrapeTimeout is not a Prometheus duration"));
        // The operator rejects a timeout longer than the interval.
        assert!(timeout <= interval, "{at}: scrapeTimeout > interval");
        for (j, rule) in endpoint["relabelings"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{at}.relabelings[{j}]");
            only_known_keys(
                rule,
                &[
                    "action",
                    "modulus",
                    "regex",
                    "replacement",
                    "separator",
                    "sourceLabels",
                    "targetLabel",
                ],
                &at,
            );
            let action = rule["action"].as_str().unwrap_or("replace");
            assert!(
                [
                    "replace",
                    "keep",
                    "drop",
                    "hashmod",
                    "labelmap",
                    "labeldrop",
                    "labelkeep",
                    "lowercase",
                    "uppercase",
                    "keepequal",
                    "dropequal"
                ]
                .contains(&action.to_lowercase().as_str()),
                "{at}.action {action:?}"
            );
            for label in rule["sourceLabels"].as_array().into_iter().flatten() {
                let label = label
                    .as_str()
                    .unwrap_or_else(|| panic!("{at}.sourceLabels: {label} is not a string"));
                assert!(
                    label.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{at}.sourceLabels: {label:?} is not a label name"
                );
            }
        }
    }

    // Its standard parts, by kubernetes-validate: the metadata as a
    // ConfigMap's, the selector as a NetworkPolicy's pod selector.
    let scratch = TempDir::new("poolscope-deploy-smon");
    let projections = [
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": monitor["metadata"]}),
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "selector", "namespace": "poolscope"},
            "spec": {"podSelector": spec["selector"]},
        }),
    ];
    for (i, resource) in projections.iter().enumerate() {
        // JSON is YAML.
        let path = scratch.path().join(format!("projection-{i}.yaml"));
        fs::write(&path, resource.to_string()).expect("write a projection");
        kubernetes_validate(&path, std::slice::from_ref(resource), None);
    }

    // It selects the Service, in its namespace, by the Service's port name.
    let selector = labels(spec, "/selector/matchLabels");
    assert!(
        is_subset(&selector, &labels(&service, "/metadata/labels")),
        "the ServiceMonitor's selector {selector:?} does not select the Service's labels"
    );
    assert!(spec["selector"].get("matchExpressions").is_none());
    let namespaces: Vec<&str> = spec["namespaceSelector"]["matchNames"]
        .as_array()
        .expect("namespaceSelector.matchNames")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(namespaces.contains(&str_at(&service, "/metadata/namespace")));
    let port_names: Vec<&str> = service["spec"]["ports"]
        .as_array()
        .expect("Service ports")
        .iter()
        .map(|p| str_at(p, "/name"))
        .collect();
    for endpoint in endpoints {
        assert!(
            port_names.contains(&str_at(endpoint, "/port")),
            "endpoint port {:?} is none of the Service's ports {port_names:?}",
            endpoint["port"]
        );
        assert_eq!(str_at(endpoint, "/path"), "/metrics");
    }
}

// ---------------------------------------------------------------------------
// The DaemonSet and its neighbours
// ---------------------------------------------------------------------------

/// A Kubernetes quantity in base units (cores or bytes); enough of the
/// syntax for resource requests and limits.
fn quantity(text: &str) -> f64 {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("m", 0.001),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<f64>().expect("a number before the suffix") * factor;
        }
    }
    text.parse()
        .unwrap_or_else(|_| panic!("not a quantity: {text:?}"))
}

fn agent_container(daemonset: &Value) -> &Value {
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container: the agent");
    &containers[0]
}

/// (name, mountPath, readOnly) of the container's mounts with the volume
/// each refers to.
fn mounts(daemonset: &Value) -> Vec<(String, String, bool, Value)> {
    let volumes = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    agent_container(daemonset)["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            let name = str_at(m, "/name").to_string();
            let volume = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("no volume {name}"))
                .clone();
            let read_only = match &m["readOnly"] {
                Value::Null => false,
                Value::Bool(b) => *b,
                other => panic!("{name}: readOnly is {other}, not a boolean"),
            };
            (name, str_at(m, "/mountPath").to_string(), read_only, volume)
        })
        .collect()
}

/// The config file in the ConfigMap, parsed by the agent.
fn configmap_config() -> (Value, Config) {
    let configmap = manifest("configmap.yaml");
    let text = str_at(&configmap, "/data/poolscope.toml");
    let config = Config::from_toml_str(text, "deploy/kubernetes/configmap.yaml")
        .unwrap_or_else(|e| panic!("the ConfigMap's poolscope.toml: {e:#}"));
    (configmap, config)
}

#[test]
fn daemonset_privileges_match_the_unit_and_the_docs() {
    let daemonset = manifest("daemonset.yaml");
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = agent_container(&daemonset);
    let security = &container["securityContext"];

    let added: BTreeSet<&str> = security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let expected: BTreeSet<&str> = CAPABILITIES.iter().copied().collect();
    assert_eq!(added, expected, "capabilities added to the agent");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["privileged"], json!(false));
    assert_eq!(security["readOnlyRootFilesystem"], json!(true));
    assert_eq!(security["runAsUser"], json!(0));
    assert_eq!(security["seccompProfile"]["type"], json!("RuntimeDefault"));
    // The API refuses `false` with CAP_SYS_ADMIN (checking that spelling
    // only); with SYS_ADMIN it would be a promise that cannot be kept.
    if added.contains("SYS_ADMIN") {
        assert_ne!(security["allowPrivilegeEscalation"], json!(false));
    }
    assert_eq!(pod["hostPID"], json!(true));
    assert_ne!(
        pod["hostNetwork"],
        json!(true),
        "the API stays off the node's addresses"
    );
    // The token for `get` on pods (rbac.yaml), and nothing more.
    assert_eq!(pod["automountServiceAccountToken"], json!(true));
    let rbac = yaml::read_documents(&kubernetes_dir().join("rbac.yaml"));
    let role = rbac
        .iter()
        .find(|r| r["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]),
        "the agent's account may get pods, nothing else"
    );
    let binding = rbac
        .iter()
        .find(|r| r["kind"] == "ClusterRoleBinding")
        .expect("a ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": str_at(pod, "/serviceAccountName"),
                "namespace": str_at(&daemonset, "/metadata/namespace")}])
    );

    // The unit grants the same, as systemd spells them.
    let unit = unit_settings(&read(&root().join("deploy/systemd/poolscope.service")));
    let unit_caps: BTreeSet<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got: BTreeSet<String> = unit_value(&unit, key)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert_eq!(got, unit_caps, "{key} in poolscope.service");
    }

    // deploy/README.md's table names each, for both; the main README's
    // requirements name no other.
    let readme = read(&root().join("deploy/README.md"));
    let rows: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| CAP_"))
        .map(|l| format!("CAP_{}", l.split_whitespace().next().unwrap_or_default()))
        .collect();
    assert_eq!(rows, unit_caps, "capability rows of deploy/README.md");
    for cap in CAPABILITIES {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| CAP_{cap} |")))
            .unwrap_or_else(|| panic!("no row for CAP_{cap}"));
        assert!(row.contains(&format!("`{cap}`")), "{row}");
        assert!(row.contains(&format!("`CAP_{cap}`")), "{row}");
    }
    let main_readme = read(&root().join("README.md"));
    let requirements = main_readme
        .split("\n## ")
        .find(|s| s.starts_with("Requirements"))
        .expect("README.md has a Requirements section");
    let mut named = 0;
    for word in requirements.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(cap) = word.strip_prefix("CAP_") {
            assert!(
                CAPABILITIES.contains(&cap),
                "README.md's requirements name {word}, which the deployments do not grant"
            );
            named += 1;
        }
    }
    assert!(named > 0, "README.md's requirements name the capabilities");

    // Resources: requests and limits for both, requests within limits.
    let resources = &container["resources"];
    for what in ["cpu", "memory"] {
        let request = quantity(str_at(resources, &format!("/requests/{what}")));
        let limit = quantity(str_at(resources, &format!("/limits/{what}")));
        assert!(
            request > 0.0 && request <= limit,
            "{what}: {request} > {limit}"
        );
    }
    // Above what the agent was measured to need (30 MiB charged at start).
    assert!(quantity(str_at(resources, "/limits/memory")) >= 64.0 * 1024.0 * 1024.0);

    // Probes: /healthz/live and /healthz/ready on the named port the config
    // listens on.
    let (configmap, config) = configmap_config();
    let port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(port["containerPort"], json!(config.http.listen.port()));
    for (probe, path) in [
        ("livenessProbe", "/healthz/live"),
        ("readinessProbe", "/healthz/ready"),
    ] {
        assert_eq!(str_at(container, &format!("/{probe}/httpGet/path")), path);
        assert_eq!(
            str_at(container, &format!("/{probe}/httpGet/port")),
            "metrics"
        );
    }
    let env: Vec<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| str_at(e, "/name"))
        .collect();
    assert!(env.contains(&"OTEL_EXPORTER_OTLP_ENDPOINT"), "{env:?}");

    // Volumes: the config file, tracefs read-only, the adapter socket's
    // directory and the pod log directory where the config expects them;
    // nothing for /proc or /sys/fs/bpf.
    let mounts = mounts(&daemonset);
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| Path::new(w[1]))
        .expect("--config FILE in args");
    let (_, _, _, config_volume) = mounts
        .iter()
        .find(|(_, path, ro, _)| {
            Path::new(path) == config_path.parent().expect("a directory") && *ro
        })
        .expect("a read-only mount holding the --config file");
    assert_eq!(
        config_volume["configMap"]["name"],
        configmap["metadata"]["name"]
    );
    let key = config_path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    assert!(
        configmap["data"][key].is_string(),
        "the ConfigMap has {key}"
    );

    let host_path = |path: &Path| {
        mounts
            .iter()
            .find(|(_, mount, _, _)| Path::new(mount) == path)
            .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()))
    };
    let (_, _, ro, volume) = host_path(Path::new("/sys/kernel/tracing"));
    assert!(*ro, "tracefs is only read");
    assert_eq!(str_at(volume, "/hostPath/path"), "/sys/kernel/tracing");
    let socket_dir = config
        .adapter
        .socket
        .parent()
        .expect("the socket's directory");
    let (_, _, ro, volume) = host_path(socket_dir);
    assert!(!*ro, "the agent creates its socket there");
    assert_eq!(Path::new(str_at(volume, "/hostPath/path")), socket_dir);
    assert_eq!(str_at(volume, "/hostPath/type"), "DirectoryOrCreate");
    let (_, _, ro, volume) = host_path(&config.tracking.pod_logs_dir);
    assert!(*ro);
    assert_eq!(
        Path::new(str_at(volume, "/hostPath/path")),
        config.tracking.pod_logs_dir
    );
    for (_, path, _, volume) in &mounts {
        for unwanted in ["/proc", "/sys/fs/bpf"] {
            let host = volume["hostPath"]["path"].as_str().unwrap_or_default();
            assert!(
                !Path::new(path).starts_with(unwanted) && !Path::new(host).starts_with(unwanted),
                "{path} ({host}) is mounted but not needed"
            );
        }
    }
}

/// `[adapter] min_queue_datagrams` by default, read by name so that this
/// file does not depend on the field (0 when there is none).
fn min_queue_datagrams() -> u64 {
    let defaults = serde_json::to_value(Config::default()).expect("Config serializes");
    defaults["adapter"]["min_queue_datagrams"]
        .as_u64()
        .unwrap_or(0)
}

/// daemonset.yaml with the commented lines between one `# BEGIN` and its
/// `# END` uncommented, for each such block.
fn daemonset_options() -> Vec<String> {
    let text = read(&kubernetes_dir().join("daemonset.yaml"));
    let lines: Vec<&str> = text.lines().collect();
    let mut options = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "# BEGIN" {
            i += 1;
            continue;
        }
        let indent = lines[i].len() - lines[i].trim_start().len();
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim() == "# END")
            .expect("every # BEGIN has its # END");
        let mut variant: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        for line in &mut variant[i + 1..end] {
            let (head, tail) = line.split_at(indent.min(line.len()));
            let tail = tail
                .strip_prefix("# ")
                .or_else(|| tail.strip_prefix('#'))
                .unwrap_or_else(|| panic!("not a commented YAML line: {line:?}"));
            *line = format!("{head}{tail}");
        }
        options.push(variant.join("\n") + "\n");
        i = end + 1;
    }
    options
}

#[test]
fn daemonset_sysctl_options_are_valid() {
    if !have_kubernetes_validate() {
        return;
    }
    let options = daemonset_options();
    assert_eq!(options.len(), 2, "the pod sysctl and the init container");
    let image = str_at(agent_container(&manifest("daemonset.yaml")), "/image").to_string();
    let scratch = TempDir::new("poolscope-deploy-options");
    for (i, text) in options.iter().enumerate() {
        let path = scratch.path().join(format!("daemonset-option-{i}.yaml"));
        fs::write(&path, text).expect("write an option");
        let docs = yaml::read_documents(&path);
        for version in KUBERNETES_VERSIONS {
            kubernetes_validate(&path, &docs, *version);
        }
        let pod = &docs[0]["spec"]["template"]["spec"];
        if let Some(sysctls) = pod["securityContext"]["sysctls"].as_array() {
            let sysctl = sysctls
                .iter()
                .find(|s| s["name"] == "net.unix.max_dgram_qlen")
                .expect("the sysctl");
            let value: u64 = str_at(sysctl, "/value").parse().expect("a number");
            assert!(value >= min_queue_datagrams());
        } else {
            let init = &pod["initContainers"][0];
            assert_eq!(str_at(init, "/image"), image, "the agent's own image");
            let script = init["command"].to_string();
            assert!(
                script.contains("/proc/sys/net/unix/max_dgram_qlen"),
                "{script}"
            );
            let value: u64 = script
                .split("echo ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no `echo N` in {script}"));
            assert!(value >= min_queue_datagrams(), "{script}");
            assert!(script.contains(&format!("-ge {value}")), "{script}");
        }
    }
}

#[test]
fn sysctl_file_raises_the_datagram_queue() {
    let text = read(&root().join("deploy/systemd/60-poolscope.conf"));
    let value: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("net.unix.max_dgram_qlen = "))
        .expect("net.unix.max_dgram_qlen = N")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        value >= min_queue_datagrams(),
        "{value} < [adapter] min_queue_datagrams"
    );
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(['#', ';']))
        .collect();
    assert_eq!(settings.len(), 1, "one setting: {settings:?}");
}

#[test]
fn service_and_networkpolicy_reach_the_agent() {
    let daemonset = manifest("daemonset.yaml");
    let pod_labels = labels(&daemonset, "/spec/template/metadata/labels");
    assert!(is_subset(
        &labels(&daemonset, "/spec/selector/matchLabels"),
        &pod_labels
    ));
    let (_, config) = configmap_config();

    let service = manifest("service.yaml");
    assert!(
        is_subset(&labels(&service, "/spec/selector"), &pod_labels),
        "the Service selects the agent pods"
    );
    assert_eq!(
        service["spec"]["clusterIP"],
        json!("None"),
        "headless: one target per pod"
    );
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], json!(HTTP_PORT));
    assert_eq!(ports[0]["targetPort"], json!("metrics"));
    assert_eq!(config.http.listen.port(), HTTP_PORT);

    let policy = manifest("networkpolicy.yaml");
    assert!(is_subset(
        &labels(&policy, "/spec/podSelector/matchLabels"),
        &pod_labels
    ));
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"][0]["port"],
        json!("metrics")
    );
}

#[test]
fn kustomization_lists_every_manifest_in_one_namespace() {
    let kustomization = yaml::read_documents(&kubernetes_dir().join("kustomization.yaml"));
    let kustomization = &kustomization[0];
    let namespace = str_at(kustomization, "/namespace");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let on_disk: BTreeSet<String> = manifest_files()
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .filter(|n| !OPTIONAL_MANIFESTS.contains(&n.as_str()))
        .collect();
    assert_eq!(listed, on_disk, "kustomization.yaml resources");
    let raw = read(&kubernetes_dir().join("kustomization.yaml"));
    for optional in OPTIONAL_MANIFESTS {
        assert!(
            raw.contains(&format!("# - {optional}")),
            "{optional} is offered, commented out"
        );
    }
    let mut names = BTreeSet::new();
    for file in manifest_files() {
        for resource in yaml::read_documents(&file) {
            let kind = str_at(&resource, "/kind").to_string();
            let name = str_at(&resource, "/metadata/name").to_string();
            if kind == "Namespace" {
                assert_eq!(name, namespace);
            } else if CLUSTER_SCOPED.contains(&kind.as_str()) {
                assert_eq!(resource["metadata"].get("namespace"), None, "{kind}/{name}");
            } else {
                assert_eq!(
                    str_at(&resource, "/metadata/namespace"),
                    namespace,
                    "{kind}/{name}"
                );
            }
            names.insert((kind, name));
        }
    }

    // Where kubectl is installed (the machines have it, Debian does not
    // package it), its kustomize must render exactly these resources.
    let Ok(out) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(kubernetes_dir())
        .stdin(Stdio::null())
        .output()
    else {
        eprintln!("note: no kubectl here; kustomization.yaml checked by its resource list only");
        return;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        text(&out.stderr)
    );
    let scratch = TempDir::new("poolscope-deploy-kustomize");
    let rendered_path = scratch.path().join("rendered.yaml");
    fs::write(&rendered_path, &out.stdout).expect("write the rendered manifests");
    let rendered: BTreeSet<(String, String)> = yaml::read_documents(&rendered_path)
        .iter()
        .map(|r| {
            (
                str_at(r, "/kind").to_string(),
                str_at(r, "/metadata/name").to_string(),
            )
        })
        .collect();
    let optional: BTreeSet<(String, String)> = OPTIONAL_MANIFESTS
        .iter()
        .flat_map(|f| yaml::read_documents(&kubernetes_dir().join(f)))
        .map(|r| {
            (
                str_at(&r, "/kind").to_string(),
                str_at(&r, "/metadata/name").to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = names.difference(&optional).cloned().collect();
    assert_eq!(rendered, expected, "kubectl kustomize deploy/kubernetes");
}

#[test]
fn readme_application_mounts_the_adapter_socket() {
    let (_, config) = configmap_config();
    let socket = config.adapter.socket.clone();
    let socket_dir = socket.parent().expect("the socket's directory");
    let scratch = TempDir::new("poolscope-deploy-app");
    let blocks = markdown_yaml_blocks(&read(&root().join("deploy/README.md")));
    let path = scratch.path().join("app.yaml");
    fs::write(&path, blocks.join("---\n")).expect("write the README examples");
    let apps: Vec<Value> = yaml::read_documents(&path)
        .into_iter()
        .filter(|r| r["kind"] == "Deployment")
        .collect();
    assert_eq!(
        apps.len(),
        1,
        "deploy/README.md shows one application Deployment"
    );
    let pod = &apps[0]["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["hostPath"]["path"].as_str().map(Path::new) == Some(socket_dir))
        .expect("a hostPath volume of the socket's directory");
    let container = &pod["containers"][0];
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the volume is mounted");
    assert_eq!(Path::new(str_at(mount, "/mountPath")), socket_dir);
    assert_eq!(
        mount["readOnly"],
        json!(true),
        "sending needs no write access"
    );
    let variable = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "POOLSCOPE_ADAPTER_SOCKET")
        .expect("POOLSCOPE_ADAPTER_SOCKET");
    assert_eq!(Path::new(str_at(variable, "/value")), socket);
}

// ---------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------

/// Every `[section]` and `key =` of the configuration must be in `text`, so
/// that the example shows all there is to change.
fn names_every_key(text: &str, origin: &str) {
    let defaults = serde_json::to_value(Config::default()).expect("Config serializes");
    let sections = defaults.as_object().expect("sections");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for (section, keys) in sections {
        let header = format!("[{section}]");
        let start = lines
            .iter()
            .position(|l| *l == header)
            .unwrap_or_else(|| panic!("{origin} has no {header}"));
        let end = lines[start + 1..]
            .iter()
            .position(|l| l.starts_with('['))
            .map_or(lines.len(), |i| start + 1 + i);
        for key in keys.as_object().expect("keys").keys() {
            assert!(
                lines[start..end]
                    .iter()
                    .any(|l| l.starts_with(&format!("{key} ="))),
                "{origin}: {header} does not show `{key}`"
            );
        }
    }
}

#[test]
fn configuration_files_show_every_key_and_keep_the_defaults() {
    let systemd_path = root().join("deploy/systemd/poolscope.toml");
    let systemd_text = read(&systemd_path);
    let systemd = Config::from_toml_str(&systemd_text, "deploy/systemd/poolscope.toml")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        systemd,
        Config::default(),
        "the unit's file is the defaults, shown"
    );
    names_every_key(&systemd_text, "deploy/systemd/poolscope.toml");

    let (configmap, config) = configmap_config();
    let mut expected = Config::default();
    expected.http.listen = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT));
    assert_eq!(
        config, expected,
        "the ConfigMap differs from the defaults in [http] listen only"
    );
    names_every_key(
        str_at(&configmap, "/data/poolscope.toml"),
        "deploy/kubernetes/configmap.yaml",
    );
}

// ---------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------

fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        settings
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    settings
}

fn unit_value<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    settings
        .get(key)
        .and_then(|v| v.last())
        .unwrap_or_else(|| panic!("the unit has no {key}="))
}

/// The unit as a file systemd-analyze can check here: ExecStart points at
/// the binary under test, because verify fails when the executable is
/// missing and this machine has no /usr/local/bin/poolscope installed.
fn unit_for_analysis(dir: &Path, extra: &str) -> PathBuf {
    let unit = read(&root().join("deploy/systemd/poolscope.service"));
    let exec = format!("ExecStart={UNIT_EXEC_START}\n");
    assert!(unit.contains(&exec), "the unit runs {UNIT_EXEC_START}");
    let here = UNIT_EXEC_START.replacen(
        "/usr/local/bin/poolscope",
        agent_bin().to_str().expect("a UTF-8 path"),
        1,
    );
    let rewritten = unit.replace(&exec, &format!("ExecStart={here}\n{extra}"));
    let path = dir.join("poolscope.service");
    fs::write(&path, rewritten).expect("write the unit");
    path
}

#[test]
fn systemd_unit_verifies_without_warnings() {
    if !have_systemd_analyze() {
        return;
    }
    let scratch = TempDir::new("poolscope-deploy-unit");
    let unit = unit_for_analysis(scratch.path(), "");
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    // It would have said so: a bad key is a warning on stderr, exit 0.
    let bad_dir = TempDir::new("poolscope-deploy-badunit");
    let bad = unit_for_analysis(bad_dir.path(), "ProtectSystm=strict\n");
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(
        text(&out.stderr).contains("ProtectSystm"),
        "a misspelt key goes unnoticed: {}",
        text(&out.stderr)
    );

    // Exposure 3.0 ("OK") or better, on systemd's 0-100 scale.
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
        .arg(&unit));
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 3.0:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn systemd_install_commands_match_the_unit() {
    let unit = read(&root().join("deploy/systemd/poolscope.service"));
    let readme = read(&root().join("deploy/README.md"));
    let settings = unit_settings(&unit);
    assert_eq!(unit_value(&settings, "ExecStart"), UNIT_EXEC_START);
    assert_eq!(unit_value(&settings, "RuntimeDirectory"), "poolscope");
    // The socket directory of the configuration is the runtime directory.
    let config = Config::from_toml_str(&read(&root().join("deploy/systemd/poolscope.toml")), "x")
        .expect("parses");
    assert_eq!(
        config.adapter.socket.parent(),
        Some(Path::new("/run/poolscope"))
    );
    for install in [
        "install -m 0755 target/release/poolscope /usr/local/bin/poolscope",
        "install -D -m 0644 deploy/systemd/poolscope.toml /etc/poolscope/poolscope.toml",
        "install -m 0644 deploy/systemd/poolscope.service /etc/systemd/system/poolscope.service",
        "install -m 0644 deploy/systemd/60-poolscope.conf /etc/sysctl.d/60-poolscope.conf",
        "/usr/lib/systemd/systemd-sysctl /etc/sysctl.d/60-poolscope.conf",
        "systemctl daemon-reload && systemctl enable --now poolscope",
    ] {
        assert!(
            unit.contains(install),
            "the unit's header shows `{install}`"
        );
        assert!(
            readme.contains(install),
            "deploy/README.md shows `{install}`"
        );
    }
}

// ---------------------------------------------------------------------------
// The Dockerfile (not built here: no container engine)
// ---------------------------------------------------------------------------

#[test]
fn dockerfile_copies_what_exists_and_builds_like_the_readme() {
    let dockerfile = read(&root().join("Dockerfile"));
    // Instructions with their continuation lines joined.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            instructions.push(std::mem::take(&mut current));
        }
    }
    let stages: Vec<&String> = instructions
        .iter()
        .filter(|i| i.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "a build and a runtime stage: {stages:?}");
    assert!(
        stages[0].starts_with("FROM debian:bookworm AS "),
        "{}",
        stages[0]
    );
    assert_eq!(stages[1], "FROM debian:bookworm-slim");

    for copy in instructions.iter().filter(|i| i.starts_with("COPY ")) {
        let words: Vec<&str> = copy.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let sources = &words[..words.len() - 1];
        for source in sources.iter().filter(|s| !s.starts_with("--")) {
            assert!(
                root().join(source).exists(),
                "COPY source {source} does not exist"
            );
        }
    }
    assert!(root().join(".dockerignore").is_file());

    // The README's build: prerequisites with `cargo xtask setup`, then the
    // release build that `cargo xtask run` and `cargo xtask test` do.
    let runs: Vec<&String> = instructions
        .iter()
        .filter(|i| i.starts_with("RUN "))
        .collect();
    let setup = runs
        .iter()
        .position(|r| r.contains("cargo xtask setup"))
        .expect("RUN cargo xtask setup");
    let build = runs
        .iter()
        .position(|r| r.contains("cargo build --release -p poolscope"))
        .expect("RUN cargo build --release -p poolscope");
    assert!(setup < build);
    assert!(read(&root().join("README.md")).contains("cargo xtask setup"));
    let xtask = read(&root().join("xtask/src/main.rs"));
    assert!(xtask.contains(r#"["build", "--release", "-p", "poolscope"]"#));
    let built = "target/release/poolscope";
    assert!(
        runs[build].contains(built),
        "the build RUN picks up {built}"
    );
    assert!(instructions.contains(&r#"ENTRYPOINT ["/usr/local/bin/poolscope", "run"]"#.to_string()));
}

// ---------------------------------------------------------------------------
// The agent under the unit's sandbox (root)
// ---------------------------------------------------------------------------

/// A directory outside /tmp, /home and /root (which the unit hides), holding
/// copies of the agent and its configuration that `nobody` may read.
struct Staged {
    dir: PathBuf,
}

impl Staged {
    fn new() -> Staged {
        use std::os::unix::fs::PermissionsExt;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/run/poolscope-deploy-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the staging directory");
        fs::copy(agent_bin(), dir.join("poolscope")).expect("stage the agent");
        fs::copy(
            root().join("deploy/systemd/poolscope.toml"),
            dir.join("poolscope.toml"),
        )
        .expect("stage the configuration");
        for (name, mode) in [("", 0o755), ("poolscope", 0o755), ("poolscope.toml", 0o644)] {
            fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode))
                .expect("chmod a staged file");
        }
        Staged { dir }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The agent started by unit-sandbox.py under poolscope.service.
struct SandboxedAgent {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _logs: TempDir,
    _staged: Staged,
}

impl SandboxedAgent {
    fn start(extra_env: &[(&str, &str)]) -> SandboxedAgent {
        let staged = Staged::new();
        let logs = TempDir::new("poolscope-deploy-sandbox");
        let log = logs.path().join("agent.log");
        let out = fs::File::create(&log).expect("create the log");
        let err = out.try_clone().expect("dup the log");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        let mut cmd = Command::new(python3());
        cmd.arg(root().join("deploy/systemd/unit-sandbox.py"))
            .arg(root().join("deploy/systemd/poolscope.service"))
            .arg("--")
            .arg(staged.dir.join("poolscope"))
            .args(["run", "--config"])
            .arg(staged.dir.join("poolscope.toml"))
            // The unit's own port may be taken by another agent here.
            .args(["--listen", &addr.to_string()])
            .env_remove("POOLSCOPE_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("start unit-sandbox.py");
        let mut agent = SandboxedAgent {
            addr,
            child,
            log,
            _logs: logs,
            _staged: staged,
        };
        let ready = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("the sandboxed agent exited: {status}\n{}", agent.log());
            }
            if !tcp_listening(addr.port()) {
                return None;
            }
            agent.get("/healthz").ok().filter(|b| b.trim() == "ok")
        });
        assert!(ready.is_some(), "no /healthz within 30 s\n{}", agent.log());
        agent
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> anyhow::Result<String> {
        poolscope::cli::AgentClient::without_token(self.addr).get(path)
    }

    fn connections(&self) -> Vec<ConnectionView> {
        poolscope::cli::fetch_connections(&poolscope::cli::AgentClient::without_token(self.addr))
            .expect("GET /api/v1/connections")
    }

    /// A line of /proc/PID/status of the agent (unshare and setpriv exec:
    /// the agent keeps the pid of the process we started).
    fn status(&self, field: &str) -> String {
        let status = read(Path::new(&format!("/proc/{}/status", self.child.id())));
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
            .trim()
            .to_string()
    }
}

impl Drop for SandboxedAgent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn have_sandbox_tools() -> bool {
    have(python_has("seccomp"), "python3-seccomp is not installed")
        && have_systemd_analyze()
        && have(
            ["setpriv", "unshare"].iter().all(|tool| {
                Command::new(tool)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            }),
            "setpriv and unshare (util-linux) are missing",
        )
}

#[test]
fn agent_runs_under_the_units_sandbox() {
    if !require_kernel() || !have_sandbox_tools() {
        return;
    }
    let pg = Postgres::start();
    // Opened before the agent, by root: listing it needs CAP_SYS_PTRACE and
    // CAP_DAC_READ_SEARCH, since the agent runs as nobody.
    let mut client = ConnClient::spawn();
    let (fd, local_port) = client.open("127.0.0.1", pg.port);

    let agent = SandboxedAgent::start(&[]);
    let log = agent.log();
    assert!(log.contains("kernel probes attached"), "{log}");

    // The sandbox is in force: user, capabilities, no_new_privs, seccomp.
    assert_eq!(agent.status("Uid").split_whitespace().next(), Some("65534"));
    let expected_caps = [39u32, 38, 21, 19, 2] // BPF PERFMON SYS_ADMIN SYS_PTRACE DAC_READ_SEARCH
        .iter()
        .fold(0u64, |caps, bit| caps | 1 << bit);
    for field in ["CapEff", "CapBnd", "CapAmb"] {
        let caps = u64::from_str_radix(&agent.status(field), 16).expect("hex capabilities");
        assert_eq!(caps, expected_caps, "{field}");
    }
    assert_eq!(agent.status("NoNewPrivs"), "1");
    assert_eq!(agent.status("Seccomp"), "2");
    let mountinfo = read(Path::new(&format!("/proc/{}/mountinfo", agent.child.id())));
    let options = |point: &str| {
        mountinfo
            .lines()
            .rfind(|l| l.split_whitespace().nth(4) == Some(point))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or_else(|| panic!("{point} is not a mount point of the agent"))
            .to_string()
    };
    assert!(options("/").starts_with("ro"), "{}", options("/"));
    assert!(options("/run/poolscope").starts_with("rw"));

    // Seeded from /proc, then seen from the kernel.
    let seeded = wait_until(EVENT_TIMEOUT, || {
        agent
            .connections()
            .into_iter()
            .find(|c| c.pid == client.pid && c.fd == fd && c.local_port == Some(local_port))
    })
    .unwrap_or_else(|| {
        panic!(
            "the connection opened before start was not seeded\n{}",
            agent.log()
        )
    });
    assert!(seeded.seen_at_start, "{seeded:?}");
    pg.psql("SELECT 1");
    let counted = wait_until(EVENT_TIMEOUT, || {
        let metrics = agent.get("/metrics").ok()?;
        let counts = operation_counts(&metrics, pg.port);
        (counts.get(&("SELECT".to_string(), String::new())).copied() >= Some(1)).then_some(())
    });
    assert!(
        counted.is_some(),
        "psql's SELECT was not timed\n{}",
        agent.log()
    );

    // The adapter socket, in the unit's runtime directory, takes messages.
    let socket = format!("/proc/{}/root/run/poolscope/adapter.sock", agent.child.id());
    let sender = std::os::unix::net::UnixDatagram::unbound().expect("a datagram socket");
    let message = json!({"v": 1, "kind": "pool", "pool": "deploy-test", "db_system": "postgresql"});
    sender
        .send_to(message.to_string().as_bytes(), &socket)
        .expect("send to the sandboxed agent's socket");
    let accepted = wait_until(EVENT_TIMEOUT, || {
        let metrics = agent.get("/metrics").ok()?;
        metrics
            .lines()
            .any(|l| l.starts_with(r#"poolscope_adapter_messages_total{result="accepted"}"#))
            .then_some(())
    });
    assert!(
        accepted.is_some(),
        "the adapter message was not accepted\n{}",
        agent.log()
    );
    client.close(fd);

    // Nothing refused along the way (a missing address family, capability or
    // system call shows as a warning), but the datagram queue that the unit
    // leaves to 60-poolscope.conf, which this machine may not have applied.
    let log = agent.log();
    for line in log.lines().filter(|l| l.contains(" WARN ")) {
        assert!(
            line.contains("max_dgram_qlen"),
            "unexpected warning: {line}\n{log}"
        );
    }
}

#[test]
fn agent_mounts_tracefs_under_the_units_sandbox() {
    if !require_kernel() || !have_sandbox_tools() {
        return;
    }
    // A host without tracefs: the agent mounts it in the unit's namespace
    // (CAP_SYS_ADMIN, `mount` in its system call filter).
    let agent = SandboxedAgent::start(&[("SANDBOX_NO_TRACEFS", "1")]);
    let log = agent.log();
    assert!(log.contains("tracefs was not mounted; mounted it"), "{log}");
    assert!(log.contains("kernel probes attached"), "{log}");
}
