//! `[metrics.attributes."<metric>"]`: attributes added to or dropped from a
//! metric, against what the catalogue declares for it.
//!
//! Adding takes only the metric's opt-in attributes (each bounded where it
//! is computed); dropping takes any attribute that is not required (a
//! required one is what the conventions say a series must say). A dropped
//! attribute goes through the SDK's own view (`with_allowed_attribute_keys`),
//! so the series it would have split are summed.

use std::collections::{BTreeMap, HashSet};

use anyhow::{anyhow, Result};
use opentelemetry::Key;
use serde::{Deserialize, Serialize};
use telemetry_catalogue::{self as catalogue, Requirement};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a table, [metrics]")]
pub struct MetricsConfig {
    /// By OpenTelemetry metric name, e.g. `"db.client.operation.duration"`.
    pub attributes: BTreeMap<String, AttributeChoice>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a table with `add` and `drop` lists"
)]
pub struct AttributeChoice {
    /// Opt-in attributes to record.
    pub add: Vec<String>,
    /// Attributes (not required ones) to leave out.
    pub drop: Vec<String>,
}

impl MetricsConfig {
    /// Whether every metric, added and dropped attribute is one the
    /// catalogue allows; the error names the key at fault.
    pub fn check(&self) -> Result<()> {
        for (metric, choice) in &self.attributes {
            let key = format!("metrics.attributes.\"{metric}\"");
            let instrument = catalogue::INSTRUMENTS
                .iter()
                .find(|i| i.name == metric)
                .ok_or_else(|| anyhow!("key `{key}`: no metric is named {metric:?}"))?;
            for added in &choice.add {
                match instrument.attribute(added).map(|a| a.requirement) {
                    Some(Requirement::OptIn(_)) => {}
                    _ => {
                        let opt_in: Vec<&str> = instrument
                            .attributes
                            .iter()
                            .filter(|a| matches!(a.requirement, Requirement::OptIn(_)))
                            .map(|a| a.key)
                            .collect();
                        return Err(anyhow!(
                            "key `{key}.add`: {added:?} is not an opt-in attribute of {metric} \
                             (those are: {})",
                            if opt_in.is_empty() {
                                "none".to_string()
                            } else {
                                opt_in.join(", ")
                            }
                        ));
                    }
                }
            }
            for dropped in &choice.drop {
                match instrument.attribute(dropped).map(|a| a.requirement) {
                    None => {
                        return Err(anyhow!(
                            "key `{key}.drop`: {metric} has no attribute {dropped:?}"
                        ))
                    }
                    Some(Requirement::Required) => {
                        return Err(anyhow!(
                            "key `{key}.drop`: {dropped} is required on {metric}; it cannot be \
                             dropped"
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Whether the opt-in `attribute` of `metric` is added.
    pub fn adds(&self, metric: &str, attribute: &str) -> bool {
        self.attributes
            .get(metric)
            .is_some_and(|c| c.add.iter().any(|a| a == attribute))
    }

    /// The attributes `metric` keeps, when some are dropped (`None`: all).
    pub fn kept(&self, metric: &str) -> Option<HashSet<Key>> {
        let choice = self.attributes.get(metric)?;
        if choice.drop.is_empty() {
            return None;
        }
        let instrument = catalogue::INSTRUMENTS.iter().find(|i| i.name == metric)?;
        Some(
            instrument
                .attributes
                .iter()
                .filter(|a| !choice.drop.iter().any(|d| d == a.key))
                .map(|a| Key::from_static_str(a.key))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<MetricsConfig> {
        let config: MetricsConfig = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn opt_in_attributes_can_be_added_and_optional_ones_dropped() {
        let c = config(
            r#"
            [attributes."db.client.operation.duration"]
            add = ["db.query.summary"]
            drop = ["server.port", "db.namespace"]
            "#,
        )
        .expect("valid");
        assert!(c.adds("db.client.operation.duration", "db.query.summary"));
        assert!(!c.adds("db.client.operation.duration", "db.collection.name"));
        let kept = c
            .kept("db.client.operation.duration")
            .expect("some dropped");
        assert!(kept.contains(&Key::from_static_str("db.system.name")));
        assert!(!kept.contains(&Key::from_static_str("server.port")));
        assert!(c.kept("db.client.connection.count").is_none());
    }

    #[test]
    fn what_cannot_be_added_or_dropped_is_named() {
        for (text, expected) in [
            (
                r#"[attributes."db.client.operation.duraton"]"#,
                "no metric is named \"db.client.operation.duraton\"",
            ),
            (
                r#"[attributes."db.client.operation.duration"]
                add = ["server.port"]"#,
                "\"server.port\" is not an opt-in attribute of db.client.operation.duration \
                 (those are: db.collection.name, db.query.summary)",
            ),
            (
                r#"[attributes."db.client.operation.duration"]
                drop = ["db.system.name"]"#,
                "db.system.name is required on db.client.operation.duration",
            ),
            (
                r#"[attributes."db.client.connection.count"]
                drop = ["nope"]"#,
                "db.client.connection.count has no attribute \"nope\"",
            ),
        ] {
            let err = config(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
