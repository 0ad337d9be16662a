//! A pod's workload from its API object (`GET /api/v1/namespaces/{ns}/pods/{name}`):
//! pure, so that every owner kind and every malformed answer is a plain test.
//!
//! Only the pod itself is read, never its ReplicaSet or Job, so that the
//! agent needs no RBAC beyond `get pods`: a Deployment is named from its
//! ReplicaSet's name and the pod's `pod-template-hash` label, a CronJob from
//! its Job's name. The OpenTelemetry Collector's k8sattributes processor
//! names them the same way when it does not watch ReplicaSets and Jobs (its
//! CronJob rule, and its DeploymentNameFromReplicaSet feature gate, which
//! strips a hash-shaped suffix; the label here says exactly which suffix).

use serde::Deserialize;

/// Larger answers are refused: a pod object is a few KiB, tens with many
/// containers and managed fields, so this is no pod.
pub const MAX_POD_JSON_BYTES: usize = 1 << 20;

/// The longest object name Kubernetes accepts (a DNS-1123 subdomain).
const MAX_NAME_CHARS: usize = 253;

/// The Deployment controller's label: the hash its ReplicaSet's name ends with.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The controller that owns a pod, as the resource attributes name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Through a ReplicaSet named `<deployment>-<pod-template-hash>`.
    Deployment {
        name: String,
        replicaset: String,
    },
    /// A ReplicaSet nobody's Deployment made (or whose name does not say so).
    ReplicaSet {
        name: String,
    },
    StatefulSet {
        name: String,
    },
    DaemonSet {
        name: String,
    },
    /// Through a Job named `<cronjob>-<scheduled time in minutes>`.
    CronJob {
        name: String,
        job: String,
    },
    Job {
        name: String,
    },
}

impl Workload {
    /// Its resource attributes: the workload's own key, and the
    /// ReplicaSet's or Job's in between.
    pub fn attributes(&self) -> Vec<(&'static str, &str)> {
        match self {
            Workload::Deployment { name, replicaset } => vec![
                ("k8s.deployment.name", name),
                ("k8s.replicaset.name", replicaset),
            ],
            Workload::ReplicaSet { name } => vec![("k8s.replicaset.name", name)],
            Workload::StatefulSet { name } => vec![("k8s.statefulset.name", name)],
            Workload::DaemonSet { name } => vec![("k8s.daemonset.name", name)],
            Workload::CronJob { name, job } => {
                vec![("k8s.cronjob.name", name), ("k8s.job.name", job)]
            }
            Workload::Job { name } => vec![("k8s.job.name", name)],
        }
    }
}

/// Why an answer says nothing about a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodError {
    TooLarge(usize),
    /// Not JSON, or not shaped like a pod (serde_json's message).
    Malformed(String),
    /// An owner's name that no Kubernetes object can have.
    BadName(String),
}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodError::TooLarge(bytes) => write!(
                f,
                "the pod object is {bytes} bytes, more than the {MAX_POD_JSON_BYTES} read"
            ),
            PodError::Malformed(why) => write!(f, "not a pod object: {why}"),
            PodError::BadName(name) => {
                write!(f, "owner name {name:?} is not a Kubernetes object name")
            }
        }
    }
}

impl std::error::Error for PodError {}

// Only the fields read; serde skips the rest of the object.
#[derive(Deserialize)]
struct Pod {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
    #[serde(default, rename = "ownerReferences")]
    owner_references: Vec<OwnerReference>,
}

#[derive(Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
    #[serde(default)]
    controller: Option<bool>,
}

/// The workload of the pod whose API object is `json`: `None` for a pod
/// without a controller (a bare pod, a static pod's mirror owned by its
/// Node) or with one of a kind the conventions have no attribute for.
pub fn workload_of(json: &[u8]) -> Result<Option<Workload>, PodError> {
    if json.len() > MAX_POD_JSON_BYTES {
        return Err(PodError::TooLarge(json.len()));
    }
    let pod: Pod = serde_json::from_slice(json).map_err(|e| PodError::Malformed(e.to_string()))?;
    // At most one owner is the controller (the API server enforces it).
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .find(|owner| owner.controller == Some(true))
    else {
        return Ok(None);
    };
    if !is_object_name(&owner.name) {
        return Err(PodError::BadName(owner.name.clone()));
    }
    let name = owner.name.clone();
    Ok(Some(match owner.kind.as_str() {
        "ReplicaSet" => {
            let deployment = pod
                .metadata
                .labels
                .get(POD_TEMPLATE_HASH)
                .filter(|hash| !hash.is_empty())
                .and_then(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-'))
                .filter(|deployment| !deployment.is_empty());
            match deployment {
                Some(deployment) => Workload::Deployment {
                    name: deployment.to_string(),
                    replicaset: name,
                },
                None => Workload::ReplicaSet { name },
            }
        }
        "StatefulSet" => Workload::StatefulSet { name },
        "DaemonSet" => Workload::DaemonSet { name },
        "Job" => match cronjob_of_job(&name) {
            Some(cronjob) => Workload::CronJob {
                name: cronjob.to_string(),
                job: name,
            },
            None => Workload::Job { name },
        },
        _ => return Ok(None),
    }))
}

/// The CronJob controller names each Job `<cronjob>-<scheduled time in
/// minutes since the epoch>`; a Job named so by hand is taken for one too
/// (nothing in the pod tells them apart).
fn cronjob_of_job(job: &str) -> Option<&str> {
    let (cronjob, minutes) = job.rsplit_once('-')?;
    (!cronjob.is_empty() && !minutes.is_empty() && minutes.bytes().all(|b| b.is_ascii_digit()))
        .then_some(cronjob)
}

/// A DNS-1123 subdomain, what names pods, namespaces and their owners:
/// lower-case letters, digits, `-` and `.`, starting and ending with a
/// letter or digit. Also what keeps a name safe in a request path.
pub fn is_object_name(name: &str) -> bool {
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= MAX_NAME_CHARS
                && alphanumeric(*first)
                && alphanumeric(*last)
                && bytes
                    .iter()
                    .all(|b| alphanumeric(*b) || matches!(b, b'-' | b'.'))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod object as the API server answers it (trimmed of its spec and
    /// status, which are read past all the same).
    fn pod(labels: &str, owners: &str) -> String {
        format!(
            r#"{{
  "kind": "Pod",
  "apiVersion": "v1",
  "metadata": {{
    "name": "some-pod",
    "namespace": "shop",
    "uid": "8f2c2a4e-6a8e-4d7b-9a53-2b5f0b1c9e11",
    "resourceVersion": "123456",
    "creationTimestamp": "2025-01-01T00:00:00Z",
    "labels": {labels},
    "ownerReferences": {owners},
    "managedFields": [{{"manager": "kube-controller-manager", "operation": "Update",
                        "apiVersion": "v1", "fieldsType": "FieldsV1",
                        "fieldsV1": {{"f:metadata": {{"f:labels": {{".": {{}}}}}}}}}}]
  }},
  "spec": {{"containers": [{{"name": "orders", "image": "registry.example.com/orders:1.4.2"}}],
            "nodeName": "node-1"}},
  "status": {{"phase": "Running", "podIP": "10.0.0.7"}}
}}"#
        )
    }

    fn owner(kind: &str, name: &str, controller: bool) -> String {
        let api = match kind {
            "Job" | "CronJob" => "batch/v1",
            "Node" => "v1",
            _ => "apps/v1",
        };
        format!(
            r#"{{"apiVersion": "{api}", "kind": "{kind}", "name": "{name}",
                 "uid": "0d9c3b8e-1111-2222-3333-444455556666",
                 "controller": {controller}, "blockOwnerDeletion": true}}"#
        )
    }

    fn workload(labels: &str, owners: &[String]) -> Result<Option<Workload>, PodError> {
        workload_of(pod(labels, &format!("[{}]", owners.join(","))).as_bytes())
    }

    #[test]
    fn a_deployments_pod_names_the_deployment_and_its_replicaset() {
        let got = workload(
            r#"{"app": "orders", "pod-template-hash": "7d9c5b6f4"}"#,
            &[owner("ReplicaSet", "orders-api-7d9c5b6f4", true)],
        );
        assert_eq!(
            got,
            Ok(Some(Workload::Deployment {
                name: "orders-api".into(),
                replicaset: "orders-api-7d9c5b6f4".into(),
            }))
        );
        let attributes = got.ok().flatten().map(|w| {
            w.attributes()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            attributes,
            Some(vec![
                "k8s.deployment.name=orders-api".to_string(),
                "k8s.replicaset.name=orders-api-7d9c5b6f4".to_string()
            ])
        );
    }

    #[test]
    fn a_replicaset_whose_name_does_not_end_with_the_hash_is_itself() {
        for labels in [
            r#"{"app": "orders"}"#,
            r#"{"pod-template-hash": "abc12"}"#,
            r#"{"pod-template-hash": ""}"#,
            // The whole name is the hash: no deployment name left.
            r#"{"pod-template-hash": "orders"}"#,
        ] {
            assert_eq!(
                workload(labels, &[owner("ReplicaSet", "orders", true)]),
                Ok(Some(Workload::ReplicaSet {
                    name: "orders".into()
                })),
                "{labels}"
            );
        }
        // The hash must follow a dash.
        assert_eq!(
            workload(
                r#"{"pod-template-hash": "7d9c"}"#,
                &[owner("ReplicaSet", "orders7d9c", true)]
            ),
            Ok(Some(Workload::ReplicaSet {
                name: "orders7d9c".into()
            }))
        );
    }

    #[test]
    fn statefulsets_and_daemonsets_own_their_pods_directly() {
        assert_eq!(
            workload("{}", &[owner("StatefulSet", "postgres", true)]),
            Ok(Some(Workload::StatefulSet {
                name: "postgres".into()
            }))
        );
        assert_eq!(
            workload(
                r#"{"controller-revision-hash": "5f7d"}"#,
                &[owner("DaemonSet", "node-agent", true)]
            ),
            Ok(Some(Workload::DaemonSet {
                name: "node-agent".into()
            }))
        );
    }

    #[test]
    fn a_cronjobs_job_names_the_cronjob_and_a_job_of_its_own_only_itself() {
        assert_eq!(
            workload(
                r#"{"job-name": "nightly-report-28950720"}"#,
                &[owner("Job", "nightly-report-28950720", true)]
            ),
            Ok(Some(Workload::CronJob {
                name: "nightly-report".into(),
                job: "nightly-report-28950720".into(),
            }))
        );
        for job in ["migrate", "migrate-v2", "migrate-", "-123"] {
            let got = workload("{}", &[owner("Job", job, true)]);
            if job == "migrate-" || job == "-123" {
                // Not object names at all.
                assert!(matches!(got, Err(PodError::BadName(_))), "{job}: {got:?}");
            } else {
                assert_eq!(got, Ok(Some(Workload::Job { name: job.into() })), "{job}");
            }
        }
    }

    #[test]
    fn only_the_controller_counts() {
        // An owner that is not the controller (garbage collection only).
        assert_eq!(
            workload("{}", &[owner("StatefulSet", "postgres", false)]),
            Ok(None)
        );
        assert_eq!(
            workload(
                "{}",
                &[
                    owner("ConfigMap", "settings", false),
                    owner("DaemonSet", "node-agent", true)
                ]
            ),
            Ok(Some(Workload::DaemonSet {
                name: "node-agent".into()
            }))
        );
        // `controller` left out means false.
        let no_flag =
            r#"[{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "pg", "uid": "u"}]"#;
        assert_eq!(workload_of(pod("{}", no_flag).as_bytes()), Ok(None));
    }

    #[test]
    fn pods_without_a_known_controller_have_no_workload() {
        // A bare pod: no labels, no owners at all.
        let bare = r#"{"kind": "Pod", "metadata": {"name": "debug", "namespace": "default"}}"#;
        assert_eq!(workload_of(bare.as_bytes()), Ok(None));
        // A static pod's mirror is owned by its Node.
        assert_eq!(workload("{}", &[owner("Node", "node-1", true)]), Ok(None));
        // A controller the conventions have no attribute for.
        assert_eq!(
            workload("{}", &[owner("CloneSet", "orders", true)]),
            Ok(None)
        );
    }

    #[test]
    fn malformed_answers_are_errors() {
        for (json, what) in [
            ("", "empty"),
            ("not json", "text"),
            ("[]", "an array"),
            ("{}", "no metadata"),
            (r#"{"metadata": null}"#, "null metadata"),
            (r#"{"metadata": {"labels": ["a"]}}"#, "labels not a map"),
            (
                r#"{"metadata": {"ownerReferences": {}}}"#,
                "owners not a list",
            ),
            (
                r#"{"metadata": {"ownerReferences": [{"kind": "Job", "controller": true}]}}"#,
                "owner without a name",
            ),
            (
                r#"{"metadata": {"ownerReferences": [{"kind": "Job", "name": 7, "controller": true}]}}"#,
                "name not a string",
            ),
            (
                r#"{"metadata": {"ownerReferences": [{"kind": "Job", "name": "a", "controller": "yes"}]}}"#,
                "controller not a bool",
            ),
            (r#"{"metadata": {"name": "x""#, "cut short"),
            (
                "{\"metadata\": {\"labels\": {\"a\": \"\\ud800\"}}}",
                "a lone surrogate",
            ),
        ] {
            assert!(
                matches!(workload_of(json.as_bytes()), Err(PodError::Malformed(_))),
                "{what}: {json}"
            );
        }
        // Deeply nested fields that are not read are skipped without
        // recursing (no stack overflow), and the rest is read as usual.
        let deep = format!(
            r#"{{"metadata": {{"x": {}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(workload_of(deep.as_bytes()), Ok(None));
        // Nested where it is read: an error.
        let deep_owner = format!(
            r#"{{"metadata": {{"labels": {{"a": "b"}}, "ownerReferences": {}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            workload_of(deep_owner.as_bytes()),
            Err(PodError::Malformed(_))
        ));
        // Names no object can have become no attribute.
        for name in ["Orders", "orders/../x", "a b", &"a".repeat(254)] {
            let got = workload("{}", &[owner("StatefulSet", name, true)]);
            assert!(matches!(got, Err(PodError::BadName(_))), "{name}: {got:?}");
        }
    }

    #[test]
    fn huge_answers_are_refused_before_parsing() {
        let padding = "x".repeat(MAX_POD_JSON_BYTES);
        let huge = format!(
            r#"{{"metadata": {{"annotations": {{"a": "{padding}"}}, "ownerReferences": [{}]}}}}"#,
            owner("StatefulSet", "postgres", true)
        );
        assert_eq!(
            workload_of(huge.as_bytes()),
            Err(PodError::TooLarge(huge.len()))
        );
        // Just under the bound is read.
        let room = MAX_POD_JSON_BYTES + padding.len() - huge.len();
        let fits = huge.replace(&padding, &"x".repeat(room));
        assert_eq!(fits.len(), MAX_POD_JSON_BYTES);
        assert_eq!(
            workload_of(fits.as_bytes()),
            Ok(Some(Workload::StatefulSet {
                name: "postgres".into()
            }))
        );
    }

    #[test]
    fn object_names() {
        for good in ["a", "orders-api", "10.0.0.1", "x-1", &"a".repeat(253)] {
            assert!(is_object_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            ".a",
            "A",
            "a_b",
            "a/b",
            "a%2F",
            "..",
            "ü",
            &"a".repeat(254),
        ] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }
}
