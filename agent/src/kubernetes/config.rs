//! `[kubernetes]`: what the agent asks the Kubernetes API server.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [kubernetes]")]
pub struct KubernetesConfig {
    /// Whether each observed pod's workload (Deployment, StatefulSet...)
    /// is looked up in the API server: `auto` when the agent runs in a pod
    /// with a service account token, `off` never.
    pub api: ApiLookups,
}

/// `[kubernetes] api`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiLookups {
    #[default]
    Auto,
    Off,
}
