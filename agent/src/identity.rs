//! Who an observed process is, as an OpenTelemetry resource: its service
//! (from its own `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, else its
//! Kubernetes workload or container, else its executable), and where it
//! runs (pid, container, pod), so that each application's telemetry is
//! grouped under its own service by any backend.
//!
//! What the process says about itself (its environment) may name its
//! service; what the kernel says (pid, executable, cgroup: container and
//! pod) always wins, so that no process can pass for another. Its pod's
//! workload (`k8s.deployment.name`...) is the Kubernetes API server's
//! answer when there is one, which replaces every workload key the
//! process declares; else what the process declares.
//!
//! Pure: the facts are read by `procfs` and `kubernetes`.

use telemetry_catalogue::attr;

use crate::{kubernetes::Workload, procfs::Placement};

/// The variables read from each process's environment.
pub const ENVIRONMENT_VARIABLES: &[&str] = &["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"];

/// `OTEL_RESOURCE_ATTRIBUTES` entries taken at most, and their bounds: a
/// process chooses them, and they become labels of its own series.
const MAX_ENVIRONMENT_ATTRIBUTES: usize = 32;
const MAX_KEY_CHARS: usize = 128;
const MAX_VALUE_CHARS: usize = 256;

/// Keys only the agent sets: the kernel's word on who and where a process
/// is, never the process's own.
fn agent_named(key: &str) -> bool {
    key.starts_with("process.")
        || key.starts_with("host.")
        || matches!(
            key,
            attr::CONTAINER_ID
                | attr::K8S_POD_UID
                | attr::K8S_POD_NAME
                | attr::K8S_NAMESPACE_NAME
                | attr::K8S_CONTAINER_NAME
        )
}

/// What is known of a process, from the kernel and /proc.
#[derive(Debug, Clone, Default)]
pub struct ProcessFacts {
    pub pid: u32,
    /// `process.executable.name` (the kernel's comm).
    pub executable: String,
    pub placement: Placement,
    /// The values of [`ENVIRONMENT_VARIABLES`] the process has.
    pub environment: Vec<(String, String)>,
    /// `process.command_args`, only when configured (it may hold secrets,
    /// so it is redacted like command lines in reports).
    pub command_args: Option<Vec<String>>,
    /// The agent's host.
    pub host_name: String,
    /// The pod's controller, as the Kubernetes API server said (None: not
    /// asked, not answered yet, or no controller of a kind we name).
    pub workload: Option<Workload>,
}

/// One attribute value of an application's resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
    Texts(Vec<String>),
}

/// An application's resource attributes, keys sorted and unique.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    pub attributes: Vec<(String, Value)>,
}

impl Identity {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// `service.name`.
    pub fn service_name(&self) -> &str {
        match self.get(attr::SERVICE_NAME) {
            Some(Value::Text(name)) => name,
            _ => "",
        }
    }

    /// The resource of a process the agent could not tell apart from
    /// others (past `max_applications`): one shared `_other` service.
    pub fn other(host_name: &str) -> Identity {
        let mut identity = Identity::default();
        identity.set(attr::SERVICE_NAME, Value::Text("_other".into()));
        identity.set(attr::HOST_NAME, Value::Text(host_name.into()));
        identity
    }

    fn set(&mut self, key: &str, value: Value) {
        match self
            .attributes
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
        {
            Ok(at) => self.attributes[at].1 = value,
            Err(at) => self.attributes.insert(at, (key.to_string(), value)),
        }
    }
}

/// The resource of a process the agent has not read yet (it exited at
/// once, or /proc could not be read): the conventions' `unknown_service`.
pub fn unknown(pid: u32, host_name: &str) -> Identity {
    identify(&ProcessFacts {
        pid,
        host_name: host_name.into(),
        ..ProcessFacts::default()
    })
}

/// `OTEL_RESOURCE_ATTRIBUTES` (`key1=value1,key2=value2`, values
/// percent-encoded), bounded; malformed entries are skipped.
pub fn parse_resource_attributes(text: &str) -> Vec<(String, String)> {
    crate::otel_env::entries(text)
        .filter_map(|(_, entry)| {
            let (key, value) = entry.ok()?;
            let plausible_key = !key.is_empty()
                && key.len() <= MAX_KEY_CHARS
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            let plausible_value = !value.is_empty()
                && value.chars().count() <= MAX_VALUE_CHARS
                && !value.chars().any(char::is_control);
            (plausible_key && plausible_value).then(|| (key.to_string(), value))
        })
        .take(MAX_ENVIRONMENT_ATTRIBUTES)
        .collect()
}

/// The workload keys a process's environment may carry (the OpenTelemetry
/// Operator and the downward API set them) and the API server's answer
/// sets, in the order that names a service (the conventions' order).
const WORKLOAD_KEYS: &[&str] = &[
    "k8s.deployment.name",
    "k8s.replicaset.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.cronjob.name",
    "k8s.job.name",
];

/// The resource of one process.
pub fn identify(facts: &ProcessFacts) -> Identity {
    let mut identity = Identity::default();
    let variable = |name: &str| {
        facts
            .environment
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let declared = variable("OTEL_RESOURCE_ATTRIBUTES")
        .map(parse_resource_attributes)
        .unwrap_or_default();
    // The API server's word on the pod's workload replaces all the
    // process says of it, so that its keys never mix with contradicting ones.
    let from_api = facts.workload.is_some();
    for (key, value) in &declared {
        let replaced_by_api = from_api && WORKLOAD_KEYS.contains(&key.as_str());
        if !(agent_named(key) || replaced_by_api) {
            identity.set(key, Value::Text(value.clone()));
        }
    }
    if let Some(workload) = &facts.workload {
        for (key, value) in workload.attributes() {
            identity.set(key, Value::Text(value.to_string()));
        }
    }
    let placement = &facts.placement;
    let workload = WORKLOAD_KEYS
        .iter()
        .find_map(|key| match identity.get(key) {
            Some(Value::Text(name)) => Some(name.clone()),
            _ => None,
        });
    let service = variable("OTEL_SERVICE_NAME")
        .filter(|name| name.chars().count() <= MAX_VALUE_CHARS)
        .map(str::to_string)
        .or_else(|| {
            declared
                .iter()
                .find(|(k, _)| k == attr::SERVICE_NAME)
                .map(|(_, v)| v.clone())
        })
        .or(workload)
        .or_else(|| placement.container_name.clone())
        .or_else(|| (!facts.executable.is_empty()).then(|| facts.executable.clone()))
        // The conventions' name for a service nobody named.
        .unwrap_or_else(|| "unknown_service".into());
    identity.set(attr::SERVICE_NAME, Value::Text(service));
    if identity.get(attr::SERVICE_INSTANCE_ID).is_none() {
        // The conventions' advice for Kubernetes; elsewhere the host and pid.
        let instance = match (
            &placement.pod_namespace,
            &placement.pod_name,
            &placement.container_name,
        ) {
            (Some(namespace), Some(pod), Some(container)) => {
                format!("{namespace}.{pod}.{container}")
            }
            _ => format!("{}:{}", facts.host_name, facts.pid),
        };
        identity.set(attr::SERVICE_INSTANCE_ID, Value::Text(instance));
    }
    identity.set(attr::PROCESS_PID, Value::Int(i64::from(facts.pid)));
    if !facts.executable.is_empty() {
        identity.set(
            attr::PROCESS_EXECUTABLE_NAME,
            Value::Text(facts.executable.clone()),
        );
    }
    if let Some(args) = &facts.command_args {
        identity.set(attr::PROCESS_COMMAND_ARGS, Value::Texts(args.clone()));
    }
    identity.set(attr::HOST_NAME, Value::Text(facts.host_name.clone()));
    for (key, value) in [
        (attr::CONTAINER_ID, &placement.container_id),
        (attr::K8S_POD_UID, &placement.pod_uid),
        (attr::K8S_POD_NAME, &placement.pod_name),
        (attr::K8S_NAMESPACE_NAME, &placement.pod_namespace),
        (attr::K8S_CONTAINER_NAME, &placement.container_name),
    ] {
        if let Some(value) = value {
            identity.set(key, Value::Text(value.clone()));
        }
    }
    identity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(environment: &[(&str, &str)]) -> ProcessFacts {
        ProcessFacts {
            pid: 4242,
            executable: "gunicorn".into(),
            placement: Placement::default(),
            environment: environment
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            command_args: None,
            host_name: "node-1".into(),
            workload: None,
        }
    }

    fn text(identity: &Identity, key: &str) -> Option<String> {
        match identity.get(key) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        }
    }

    #[test]
    fn the_service_is_what_the_process_names_else_its_workload_container_or_executable() {
        let id = identify(&facts(&[
            ("OTEL_SERVICE_NAME", "orders"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=ignored,service.version=1.2",
            ),
        ]));
        assert_eq!(id.service_name(), "orders");
        assert_eq!(text(&id, "service.version").as_deref(), Some("1.2"));
        let id = identify(&facts(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=billing,deployment.environment.name=prod",
        )]));
        assert_eq!(id.service_name(), "billing");
        let id = identify(&facts(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.statefulset.name=db-client,k8s.deployment.name=web",
        )]));
        assert_eq!(id.service_name(), "web");
        let mut in_pod = facts(&[]);
        in_pod.placement.container_name = Some("api".into());
        in_pod.placement.pod_name = Some("api-7d9c-x2".into());
        in_pod.placement.pod_namespace = Some("shop".into());
        let id = identify(&in_pod);
        assert_eq!(id.service_name(), "api");
        assert_eq!(
            text(&id, "service.instance.id").as_deref(),
            Some("shop.api-7d9c-x2.api")
        );
        let id = identify(&facts(&[]));
        assert_eq!(id.service_name(), "gunicorn");
        assert_eq!(
            text(&id, "service.instance.id").as_deref(),
            Some("node-1:4242")
        );
        assert_eq!(id.get("process.pid"), Some(&Value::Int(4242)));
    }

    #[test]
    fn the_api_servers_workload_replaces_what_the_process_declares() {
        let declared = "k8s.statefulset.name=claimed,k8s.job.name=claimed-job,team=payments";
        let mut f = facts(&[("OTEL_RESOURCE_ATTRIBUTES", declared)]);
        f.placement.container_name = Some("api".into());
        // Before the API's answer: what the process says.
        let id = identify(&f);
        assert_eq!(id.service_name(), "claimed");
        assert_eq!(text(&id, "k8s.job.name").as_deref(), Some("claimed-job"));
        f.workload = Some(Workload::Deployment {
            name: "orders".into(),
            replicaset: "orders-7d9c5b6f4".into(),
        });
        let id = identify(&f);
        assert_eq!(id.service_name(), "orders");
        assert_eq!(text(&id, "k8s.deployment.name").as_deref(), Some("orders"));
        assert_eq!(
            text(&id, "k8s.replicaset.name").as_deref(),
            Some("orders-7d9c5b6f4")
        );
        assert_eq!(id.get("k8s.statefulset.name"), None);
        assert_eq!(id.get("k8s.job.name"), None);
        assert_eq!(text(&id, "team").as_deref(), Some("payments"));
        // The process's own service name still wins over its workload.
        let mut named = f.clone();
        named
            .environment
            .push(("OTEL_SERVICE_NAME".into(), "checkout".into()));
        assert_eq!(identify(&named).service_name(), "checkout");
        // A CronJob's pod: both keys, the CronJob names the service.
        f.workload = Some(Workload::CronJob {
            name: "nightly".into(),
            job: "nightly-28950720".into(),
        });
        let id = identify(&f);
        assert_eq!(id.service_name(), "nightly");
        assert_eq!(
            text(&id, "k8s.job.name").as_deref(),
            Some("nightly-28950720")
        );
        // A bare ReplicaSet names the service before the container does.
        f.workload = Some(Workload::ReplicaSet {
            name: "legacy-rs".into(),
        });
        assert_eq!(identify(&f).service_name(), "legacy-rs");
    }

    #[test]
    fn a_process_not_read_is_the_unknown_service() {
        let id = unknown(9, "node-1");
        assert_eq!(id.service_name(), "unknown_service");
        assert_eq!(id.get("process.pid"), Some(&Value::Int(9)));
        assert_eq!(id.get("process.executable.name"), None);
    }

    #[test]
    fn a_process_cannot_claim_to_be_another() {
        let mut f = facts(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "process.pid=1,container.id=abc,k8s.pod.name=other,host.name=elsewhere,team=payments",
        )]);
        f.placement.container_id = Some("c0ffee".into());
        let id = identify(&f);
        assert_eq!(id.get("process.pid"), Some(&Value::Int(4242)));
        assert_eq!(text(&id, "container.id").as_deref(), Some("c0ffee"));
        assert_eq!(id.get("k8s.pod.name"), None);
        assert_eq!(text(&id, "host.name").as_deref(), Some("node-1"));
        assert_eq!(text(&id, "team").as_deref(), Some("payments"));
    }

    #[test]
    fn resource_attributes_are_decoded_and_bounded() {
        assert_eq!(
            parse_resource_attributes("a=x%2Cy, b = 2 ,bad,=v,c=,d=%zz,e f=1"),
            vec![("a".into(), "x,y".into()), ("b".into(), "2".into())]
        );
        let many: Vec<String> = (0..100).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse_resource_attributes(&many.join(",")).len(), 32);
        let long = format!("k={}", "v".repeat(300));
        assert!(parse_resource_attributes(&long).is_empty());
        let control = "k=a\u{1b}[31m";
        assert!(parse_resource_attributes(control).is_empty());
    }

    #[test]
    fn attributes_are_sorted_and_unique() {
        let id = identify(&facts(&[("OTEL_RESOURCE_ATTRIBUTES", "z=1,a=2,a=3")]));
        let keys: Vec<&str> = id.attributes.iter().map(|(k, _)| k.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted);
        assert_eq!(text(&id, "a").as_deref(), Some("3"));
    }
}
