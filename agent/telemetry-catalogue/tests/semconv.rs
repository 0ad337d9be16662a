//! The catalogue against the OpenTelemetry semantic conventions, read from
//! the copy of their YAML registry checked in under `semconv/` (README.md
//! there says which release), so that a name, unit, kind or attribute that
//! drifts from the conventions fails CI with what differs.
//!
//! What is checked:
//! - an instrument outside `poolscope.` is a metric of the conventions, with
//!   their kind and unit, carries every attribute they require (declared as
//!   required), every attribute they make conditionally required, and no
//!   attribute they do not list unless [`EXTRA_ATTRIBUTES`] says why;
//! - a dotted attribute key outside `poolscope.` (on instruments, events and
//!   spans) is a registry attribute that is not deprecated;
//! - a key without a dot is one of [`OWN_KEYS`], each with its reason, so
//!   that a new one fails until someone decides on its name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use telemetry_catalogue::{
    attr, Instrument, Kind, Requirement, AGENT_RESOURCE_ATTRIBUTES, EVENTS, INSTRUMENTS,
    RESOURCE_ATTRIBUTES, SPANS,
};

/// The release the checked-in registry was copied from; README.md says it too.
const SEMCONV_RELEASE: &str = "v1.44.0";

/// Our own namespace: the conventions leave it to us.
const OWN_NAMESPACE: &str = "poolscope.";

/// Attributes the catalogue puts on a conventions metric although the
/// conventions do not list them there: (metric, or a prefix ending in `.`,
/// key, why).
const EXTRA_ATTRIBUTES: &[(&str, &str, &str)] = &[(
    "db.client.connection.wait_time",
    attr::ERROR_TYPE,
    "failed acquires (timeout, error) stay in the wait distribution; error.type, the \
         conventions' attribute for an operation's failure, tells them apart",
)];

/// Conditionally required attributes of a conventions metric that the
/// catalogue does not declare: (metric, key, why the condition never holds
/// for the agent). Empty: every condition can hold.
const UNDECLARED_CONDITIONAL: &[(&str, &str, &str)] = &[];

/// Keys without a namespace that are the agent's own, with no convention name.
const OWN_KEYS: &[(&str, &str)] = &[
    (attr::KIND, "which leak rule fired"),
    (
        attr::RESULT,
        "the outcome of the agent's own work (connects, adapter messages, exports)",
    ),
    (
        attr::REASON,
        "why the agent rejected or held something back",
    ),
    (
        attr::SIGNAL,
        "the OTLP signal of the agent's export counters",
    ),
    (attr::PROBE, "the agent's kernel program"),
];

/// Keys the conventions have a name for, and that name: what a failure
/// suggests instead.
const CONVENTION_NAMES: &[(&str, &str)] = &[
    ("pid", "process.pid"),
    ("process", "process.executable.name"),
    ("cmdline", "process.command_args (or process.command_line)"),
    ("container_id", "container.id"),
    ("pool", "db.client.connection.pool.name"),
    ("db_system", "db.system.name"),
    ("server", "server.address and server.port"),
    (
        "local_address",
        "network.local.address and network.local.port",
    ),
    ("holder_tid", "thread.id"),
    ("holder_thread", "thread.name"),
    ("holder_stack", "code.stacktrace"),
    ("namespace", "db.namespace"),
    ("operation", "db.operation.name"),
    ("query", "db.query.text"),
    ("last_query", "db.query.text"),
    ("rows", "db.response.returned_rows"),
    ("error.code", "db.response.status_code (and error.type)"),
];

// ---- the registry's YAML -------------------------------------------------

/// One YAML file of the model. Two formats live side by side in the
/// release: `groups` (the original) and `definition/2` (`attributes` with
/// `key`, `attribute_groups`). Unknown top-level keys fail, so that a newer
/// format is noticed rather than skipped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    file_format: Option<String>,
    #[serde(default)]
    groups: Vec<Group>,
    #[serde(default)]
    attributes: Vec<AttributeV2>,
    #[serde(default)]
    attribute_groups: Vec<AttributeGroupV2>,
}

#[derive(Deserialize, Clone)]
struct Group {
    id: String,
    #[serde(rename = "type")]
    group_type: String,
    metric_name: Option<String>,
    instrument: Option<String>,
    unit: Option<String>,
    extends: Option<String>,
    #[serde(default)]
    attributes: Vec<GroupAttribute>,
    deprecated: Option<Deprecation>,
}

/// An attribute in a group: a definition (`id`) or a reference (`ref`).
#[derive(Deserialize, Clone)]
struct GroupAttribute {
    id: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<String>,
    requirement_level: Option<RawLevel>,
    #[serde(rename = "type")]
    value_type: Option<serde_norway::Value>,
    deprecated: Option<Deprecation>,
}

#[derive(Deserialize)]
struct AttributeV2 {
    key: String,
    #[serde(rename = "type")]
    value_type: Option<serde_norway::Value>,
    deprecated: Option<Deprecation>,
}

#[derive(Deserialize)]
struct AttributeGroupV2 {
    id: String,
    #[serde(default)]
    attributes: Vec<GroupAttribute>,
}

#[derive(Deserialize, Clone, Debug)]
struct Deprecation {
    reason: String,
    renamed_to: Option<String>,
    note: Option<String>,
}

impl fmt::Display for Deprecation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.renamed_to {
            Some(to) => write!(f, "renamed to `{to}`"),
            None => write!(
                f,
                "{}: {}",
                self.reason,
                self.note
                    .as_deref()
                    .unwrap_or("no replacement given")
                    .trim()
            ),
        }
    }
}

/// `required`, `opt_in`, or `{conditionally_required: when}` and the like.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawLevel {
    Bare(String),
    WithCondition(BTreeMap<String, String>),
}

#[derive(Clone, Debug, PartialEq)]
enum Level {
    Required,
    ConditionallyRequired(String),
    Recommended,
    OptIn,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Required => write!(f, "required"),
            Level::ConditionallyRequired(when) => {
                write!(f, "conditionally required ({})", when.trim())
            }
            Level::Recommended => write!(f, "recommended"),
            Level::OptIn => write!(f, "opt-in"),
        }
    }
}

impl RawLevel {
    fn level(&self, context: &str) -> Level {
        let (name, condition) = match self {
            RawLevel::Bare(name) => (name.as_str(), String::new()),
            RawLevel::WithCondition(map) => {
                let mut entries = map.iter();
                match (entries.next(), entries.next()) {
                    (Some((name, condition)), None) => (name.as_str(), condition.clone()),
                    _ => panic!("{context}: requirement_level with {} keys", map.len()),
                }
            }
        };
        match name {
            "required" => Level::Required,
            "conditionally_required" => Level::ConditionallyRequired(condition),
            "recommended" => Level::Recommended,
            "opt_in" => Level::OptIn,
            other => panic!("{context}: unknown requirement_level `{other}`"),
        }
    }
}

struct AttributeDefinition {
    deprecated: Option<Deprecation>,
    /// `template[...]`: the key is a prefix for `key.<name>`.
    template: bool,
    file: PathBuf,
}

struct Registry {
    attributes: BTreeMap<String, AttributeDefinition>,
    groups: BTreeMap<String, Group>,
    /// metric name -> id of its group
    metrics: BTreeMap<String, String>,
}

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            found.push(path);
        }
    }
}

fn is_template(value_type: &Option<serde_norway::Value>) -> bool {
    matches!(value_type, Some(serde_norway::Value::String(t)) if t.starts_with("template["))
}

impl Registry {
    fn load() -> Registry {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("semconv/model");
        let mut files = Vec::new();
        yaml_files(&model, &mut files);
        files.sort();
        assert!(!files.is_empty(), "no YAML under {}", model.display());
        let mut registry = Registry {
            attributes: BTreeMap::new(),
            groups: BTreeMap::new(),
            metrics: BTreeMap::new(),
        };
        for path in files {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let file: ModelFile = serde_norway::from_str(&text)
                .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
            if let Some(format) = &file.file_format {
                assert_eq!(
                    format,
                    "definition/2",
                    "{}: unknown file_format",
                    path.display()
                );
            }
            for a in file.attributes {
                registry.define(a.key, a.deprecated, is_template(&a.value_type), &path);
            }
            for g in file.attribute_groups {
                registry.add_group(
                    Group {
                        id: g.id,
                        group_type: "attribute_group".into(),
                        metric_name: None,
                        instrument: None,
                        unit: None,
                        extends: None,
                        attributes: g.attributes,
                        deprecated: None,
                    },
                    &path,
                );
            }
            for g in file.groups {
                for a in &g.attributes {
                    if let Some(id) = &a.id {
                        registry.define(
                            id.clone(),
                            a.deprecated.clone(),
                            is_template(&a.value_type),
                            &path,
                        );
                    }
                }
                registry.add_group(g, &path);
            }
        }
        registry
    }

    fn define(
        &mut self,
        key: String,
        deprecated: Option<Deprecation>,
        template: bool,
        file: &Path,
    ) {
        let definition = AttributeDefinition {
            deprecated,
            template,
            file: file.to_path_buf(),
        };
        if let Some(earlier) = self.attributes.insert(key.clone(), definition) {
            panic!(
                "attribute {key} defined twice: {} and {}",
                earlier.file.display(),
                file.display()
            );
        }
    }

    fn add_group(&mut self, group: Group, file: &Path) {
        if group.group_type == "metric" {
            let name = group.metric_name.clone().unwrap_or_else(|| {
                panic!("{}: metric {} has no metric_name", file.display(), group.id)
            });
            if let Some(other) = self.metrics.insert(name.clone(), group.id.clone()) {
                panic!("metric {name} defined by {other} and {}", group.id);
            }
        }
        let id = group.id.clone();
        if self.groups.insert(id.clone(), group).is_some() {
            panic!("group {id} defined twice (again in {})", file.display());
        }
    }

    /// The registry attribute `key` names, directly or through a template.
    fn attribute(&self, key: &str) -> Option<(&str, &AttributeDefinition)> {
        if let Some((k, d)) = self.attributes.get_key_value(key) {
            return Some((k.as_str(), d));
        }
        self.attributes
            .iter()
            .filter(|(k, d)| d.template && key.len() > k.len() + 1)
            .find(|(k, _)| key.starts_with(k.as_str()) && key[k.len()..].starts_with('.'))
            .map(|(k, d)| (k.as_str(), d))
    }

    /// The attributes of a group with their levels, `extends` resolved: the
    /// group's own entries override its parent's.
    fn resolved_attributes(&self, group_id: &str) -> Result<BTreeMap<String, Level>, String> {
        let group = self
            .groups
            .get(group_id)
            .ok_or_else(|| format!("group `{group_id}` is not in semconv/ (copy its file)"))?;
        let mut resolved = match &group.extends {
            Some(parent) => self.resolved_attributes(parent)?,
            None => BTreeMap::new(),
        };
        for a in &group.attributes {
            let key = a
                .reference
                .as_ref()
                .or(a.id.as_ref())
                .ok_or_else(|| format!("group `{group_id}`: an attribute without id or ref"))?;
            if !self.attributes.contains_key(key) {
                return Err(format!(
                    "group `{group_id}` refers to `{key}`, which no file in semconv/ defines (copy \
                     its namespace's registry.yaml)"
                ));
            }
            // Unstated, a reference keeps its parent's level; the registry's
            // default level is recommended.
            let level = match &a.requirement_level {
                Some(raw) => raw.level(&format!("{group_id}/{key}")),
                None => resolved.get(key).cloned().unwrap_or(Level::Recommended),
            };
            resolved.insert(key.clone(), level);
        }
        Ok(resolved)
    }
}

// ---- the catalogue ----------------------------------------------------------

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Counter => "counter",
        Kind::UpDownCounter => "updowncounter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    }
}

fn is_conventions_metric(i: &Instrument) -> bool {
    !i.name.starts_with(OWN_NAMESPACE)
}

fn extra_allowed(metric: &str, key: &str) -> bool {
    EXTRA_ATTRIBUTES
        .iter()
        .any(|(pattern, k, _)| *k == key && matches_metric(pattern, metric))
}

fn matches_metric(pattern: &str, metric: &str) -> bool {
    if pattern.ends_with('.') {
        metric.starts_with(pattern)
    } else {
        metric == pattern
    }
}

/// Every attribute key the catalogue declares, with where: "instrument X",
/// "event Y", "span Z".
fn declared_keys() -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut keys: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for i in INSTRUMENTS {
        for a in i.attributes {
            keys.entry(a.key)
                .or_default()
                .insert(format!("instrument {}", i.name));
        }
    }
    for e in EVENTS {
        for a in e.attributes {
            keys.entry(a.key)
                .or_default()
                .insert(format!("event {}", e.name));
        }
    }
    for s in SPANS {
        for a in s.attributes {
            keys.entry(a.key)
                .or_default()
                .insert(format!("span \"{}\"", s.name));
        }
    }
    for r in RESOURCE_ATTRIBUTES {
        keys.entry(r.attribute.key)
            .or_default()
            .insert("the applications' resource".to_string());
    }
    for a in AGENT_RESOURCE_ATTRIBUTES {
        keys.entry(a.key)
            .or_default()
            .insert("the agent's resource".to_string());
    }
    keys
}

fn convention_name(key: &str) -> Option<&'static str> {
    CONVENTION_NAMES
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, name)| *name)
}

fn fail_if_any(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} difference(s) from the semantic conventions {SEMCONV_RELEASE} ({what}):\n  - {}\n",
        problems.len(),
        problems.join("\n  - ")
    );
}

fn describe(attributes: &BTreeMap<String, Level>) -> String {
    attributes
        .iter()
        .map(|(k, level)| format!("{k} ({level})"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- the tests ----------------------------------------------------------------

#[test]
fn conventions_metrics_have_their_kind_unit_and_attributes() {
    let registry = Registry::load();
    let mut problems = Vec::new();
    for i in INSTRUMENTS.iter().filter(|i| is_conventions_metric(i)) {
        let Some(group_id) = registry.metrics.get(i.name) else {
            problems.push(format!(
                "{}: no such metric in the conventions (semconv/model/*/metrics.yaml); own \
                 metrics go under `{OWN_NAMESPACE}`",
                i.name
            ));
            continue;
        };
        let group = &registry.groups[group_id];
        if let Some(deprecation) = &group.deprecated {
            problems.push(format!(
                "{}: a deprecated metric in the conventions ({deprecation})",
                i.name
            ));
        }
        let kind = kind_name(i.kind);
        let conventions_kind = group.instrument.as_deref().unwrap_or("(none)");
        if kind != conventions_kind {
            problems.push(format!(
                "{}: kind {kind}, the conventions say {conventions_kind}",
                i.name
            ));
        }
        let conventions_unit = group.unit.as_deref().unwrap_or("(none)");
        if i.unit != conventions_unit {
            problems.push(format!(
                "{}: unit `{}`, the conventions say `{conventions_unit}`",
                i.name, i.unit
            ));
        }
        let listed = match registry.resolved_attributes(group_id) {
            Ok(listed) => listed,
            Err(e) => {
                problems.push(format!("{}: {e}", i.name));
                continue;
            }
        };
        for (key, level) in &listed {
            if *level != Level::Required {
                continue;
            }
            match i.attribute(key) {
                None => problems.push(format!(
                    "{}: lacks `{key}`, which the conventions require",
                    i.name
                )),
                Some(a) if !matches!(a.requirement, Requirement::Required) => {
                    problems.push(format!(
                        "{}: declares `{key}` as {:?}, the conventions require it on every point",
                        i.name, a.requirement
                    ))
                }
                Some(_) => {}
            }
        }
        for a in i.attributes {
            if !listed.contains_key(a.key) && !extra_allowed(i.name, a.key) {
                problems.push(format!(
                    "{}: `{}` is not an attribute of this metric in the conventions, which list \
                     {}; drop it, or add it to EXTRA_ATTRIBUTES with the reason",
                    i.name,
                    a.key,
                    describe(&listed)
                ));
            }
        }
    }
    // An allowance nothing needs any more goes.
    for (pattern, key, _) in EXTRA_ATTRIBUTES {
        let still_needed = INSTRUMENTS.iter().any(|i| {
            matches_metric(pattern, i.name)
                && i.attribute(key).is_some()
                && registry
                    .metrics
                    .get(i.name)
                    .and_then(|g| registry.resolved_attributes(g).ok())
                    .is_some_and(|listed| !listed.contains_key(*key))
        });
        if !still_needed {
            problems.push(format!(
                "EXTRA_ATTRIBUTES ({pattern}, {key}): no conventions metric needs it any more"
            ));
        }
    }
    fail_if_any("instruments", &problems);
}

#[test]
fn conventions_metrics_declare_their_conditionally_required_attributes() {
    let registry = Registry::load();
    let mut problems = Vec::new();
    for i in INSTRUMENTS.iter().filter(|i| is_conventions_metric(i)) {
        // The test above reports a metric missing from the conventions.
        let Some(listed) = registry
            .metrics
            .get(i.name)
            .and_then(|g| registry.resolved_attributes(g).ok())
        else {
            continue;
        };
        for (key, level) in &listed {
            let Level::ConditionallyRequired(when) = level else {
                continue;
            };
            let excused = UNDECLARED_CONDITIONAL
                .iter()
                .any(|(m, k, _)| *m == i.name && k == key);
            if i.attribute(key).is_none() && !excused {
                problems.push(format!(
                    "{}: lacks `{key}`, which the conventions require {}",
                    i.name,
                    when.trim().to_lowercase().trim_end_matches('.')
                ));
            }
        }
    }
    fail_if_any("conditionally required attributes", &problems);
}

#[test]
fn attribute_keys_are_convention_names() {
    let registry = Registry::load();
    let own: BTreeSet<&str> = OWN_KEYS.iter().map(|(k, _)| *k).collect();
    assert_eq!(own.len(), OWN_KEYS.len(), "OWN_KEYS lists a key twice");
    for (key, name) in CONVENTION_NAMES {
        assert!(
            !own.contains(key),
            "`{key}` is both an own key and one with a convention name ({name})"
        );
    }
    let declared = declared_keys();
    let mut problems = Vec::new();
    for (key, places) in &declared {
        let places = places.iter().cloned().collect::<Vec<_>>().join(", ");
        let hint = convention_name(key)
            .map(|name| format!("; the conventions' name is {name}"))
            .unwrap_or_default();
        if key.starts_with(OWN_NAMESPACE) {
            continue;
        }
        if key.contains('.') {
            match registry.attribute(key) {
                None => problems.push(format!(
                    "`{key}` is not an attribute in the conventions' registry{hint} ({places})"
                )),
                Some((defined, definition)) => {
                    if let Some(deprecation) = &definition.deprecated {
                        problems.push(format!(
                            "`{key}` is deprecated in the conventions{}: {deprecation} ({places})",
                            if defined == *key {
                                String::new()
                            } else {
                                format!(" (as `{defined}`)")
                            }
                        ));
                    }
                }
            }
        } else if !own.contains(key) {
            problems.push(if hint.is_empty() {
                format!(
                    "`{key}` has no namespace: name it as the conventions do, put it under \
                     `{OWN_NAMESPACE}`, or add it to OWN_KEYS with the reason ({places})"
                )
            } else {
                format!("`{key}` is the agent's own name{hint} ({places})")
            });
        }
    }
    for (key, _) in OWN_KEYS {
        if !declared.contains_key(key) {
            problems.push(format!(
                "OWN_KEYS lists `{key}`, which nothing declares any more"
            ));
        }
    }
    fail_if_any("attribute keys", &problems);
}

/// The README beside the copy names the release the test says it checks.
#[test]
fn the_copy_says_which_release_it_is() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("semconv/README.md");
    let text = std::fs::read_to_string(&readme)
        .unwrap_or_else(|e| panic!("reading {}: {e}", readme.display()));
    assert!(
        text.contains(SEMCONV_RELEASE),
        "{} does not name {SEMCONV_RELEASE}",
        readme.display()
    );
}

/// The loader sees what the conventions define, so that the checks above
/// cannot pass on an empty or misread copy.
#[test]
fn the_registry_copy_reads_as_the_conventions_define_it() {
    let registry = Registry::load();
    let duration = &registry.metrics["db.client.operation.duration"];
    let listed = registry
        .resolved_attributes(duration)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed.get("db.system.name"), Some(&Level::Required));
    assert_eq!(listed.get("db.query.text"), Some(&Level::OptIn));
    assert!(
        matches!(
            listed.get("error.type"),
            Some(Level::ConditionallyRequired(_))
        ),
        "error.type comes from the group db.client.operation.duration extends"
    );
    assert_eq!(listed.get("server.address"), Some(&Level::Recommended));
    let renamed = registry
        .attribute("db.statement")
        .and_then(|(_, d)| d.deprecated.as_ref())
        .and_then(|d| d.renamed_to.as_deref());
    assert_eq!(renamed, Some("db.query.text"));
    assert!(
        registry.attribute("k8s.pod.label.app").is_some(),
        "templates match"
    );
    assert!(registry.attribute("k8s.pod.label").is_some());
    assert!(registry.attribute("server.addres").is_none());
    assert!(
        registry.metrics.len() > 50,
        "only {} metrics read",
        registry.metrics.len()
    );
}
