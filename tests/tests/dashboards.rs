//! The Grafana dashboards and Prometheus alerts in `dashboards/`:
//!
//! - every dashboard type-checks against `@grafana/schema`'s `Dashboard`
//!   (`dashboards/check/check-dashboards.mjs`, TypeScript `--strict`);
//! - every PromQL expression (panel targets, template-variable selectors,
//!   alert rules) parses, checked by promtool as recording rules;
//! - every expression queries only metrics the agent exports, as declared
//!   in agent/telemetry-catalogue (which the agent builds its instruments
//!   from, and its unit test checks against /metrics), with only the labels
//!   those metrics carry;
//! - `promtool check rules` and `promtool test rules` pass on the alerts,
//!   and every alert has a firing and a silent unit test.
//!
//! Needs node with `npm ci` run in dashboards/ and promtool (Debian's
//! `prometheus`); `cargo xtask setup` installs both. Without them the tests
//! that use them skip with a message; under `CI=true` they fail instead.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use poolscope_tests::{yaml, TempDir, Value};

/// The dashboards the project ships; each must exist and pass every check.
const DASHBOARDS: &[&str] = &["agent.json", "leaks.json", "pools.json", "queries.json"];
/// The alerts `dashboards/alerts.yaml` must define.
const ALERTS: &[&str] = &[
    "PoolNearExhaustion",
    "SlowAcquires",
    "ConnectionLeakOpen",
    "ConnectionHeldTooLong",
    "CloseWaitLeak",
    "IdleInTransaction",
    "QueryErrorRate",
    "AgentDroppingEvents",
    "AgentExportDropping",
    "PoolHighUtilization",
    "PoolExhausted",
    "PoolLongQueue",
    "PoolNoIdleConnections",
    "PoolAcquireTimeouts",
    "ConnectionErrors",
    "QueryLatencyHigh",
    "SlowQueryRate",
    "AgentDown",
];
const SEVERITIES: &[&str] = &["critical", "warning", "info"];
const ANNOTATIONS: &[&str] = &["summary", "description", "runbook", "runbook_url"];
/// The runbook every alert's `runbook_url` points into, from the repository's root.
const RUNBOOK: &str = "docs/runbook.md";
/// The data source every panel and variable queries: a template variable, so
/// the dashboards import into any Grafana whatever its Prometheus is called.
const DATASOURCE_UID: &str = "${DS_PROMETHEUS}";
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

// ---------------------------------------------------------------------------
// Paths and prerequisites
// ---------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

fn dashboards_dir() -> PathBuf {
    workspace_root().join("dashboards")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// True when nothing is missing. Otherwise the test is skipped with what to
/// run, or, under `CI=true`, fails: a runner without the tools must not pass
/// by skipping.
fn require(check: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let text = format!(
        "{check} needs {}; run cargo xtask setup",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{text}");
    }
    eprintln!("skipped: {text}");
    false
}

fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success())
}

fn require_promtool(check: &str) -> bool {
    let missing = if runs("promtool") {
        vec![]
    } else {
        vec!["promtool (Debian's prometheus package)".to_string()]
    };
    require(check, &missing)
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// The metrics the agent exports
// ---------------------------------------------------------------------------

/// Every series name a query may use, with the labels it carries.
struct Catalog {
    /// Series name (histograms as `_bucket`, `_sum` and `_count`) to labels.
    series: BTreeMap<String, BTreeSet<String>>,
    /// Histogram base names, which are no series of their own.
    histograms: BTreeSet<String>,
    /// Every label of every series.
    labels: BTreeSet<String>,
}

impl Catalog {
    /// From the telemetry catalogue, which the agent builds its instruments
    /// from (and its unit test checks against what it exports).
    fn from_agent() -> Catalog {
        let mut catalog = Catalog {
            series: BTreeMap::new(),
            histograms: BTreeSet::new(),
            labels: TARGET_LABELS.iter().map(|l| l.to_string()).collect(),
        };
        // Prometheus's own series for every target: the agent-down alert.
        catalog.series.insert(
            "up".to_string(),
            TARGET_LABELS.iter().map(|l| l.to_string()).collect(),
        );
        for instrument in telemetry_catalogue::INSTRUMENTS {
            let name = instrument.prometheus_name();
            // An application's series carry its resource's labelled
            // attributes too (docs/metrics.md, "One resource per application").
            let resource_labels = telemetry_catalogue::RESOURCE_ATTRIBUTES
                .iter()
                .filter(|r| r.label && instrument.per_application)
                .map(|r| &r.attribute);
            let mut labels: BTreeSet<String> = instrument
                .attributes
                .iter()
                .chain(resource_labels)
                .map(|a| telemetry_catalogue::prometheus_label_name(a.key))
                .collect();
            labels.extend(TARGET_LABELS.iter().map(|l| l.to_string()));
            catalog.labels.extend(labels.iter().cloned());
            if instrument.kind == telemetry_catalogue::Kind::Histogram {
                catalog.histograms.insert(name.clone());
                for suffix in ["_sum", "_count"] {
                    catalog
                        .series
                        .insert(format!("{name}{suffix}"), labels.clone());
                }
                labels.insert("le".to_string());
                catalog.labels.insert("le".to_string());
                catalog.series.insert(format!("{name}_bucket"), labels);
            } else {
                catalog.series.insert(name, labels);
            }
        }
        catalog
    }

    /// What is wrong with the metrics and labels `refs` names, if anything.
    fn problems(&self, refs: &Refs) -> Vec<String> {
        let mut problems = Vec::new();
        for metric in &refs.metrics {
            if self.histograms.contains(metric) {
                problems.push(format!(
                    "`{metric}` is a histogram: query {metric}_bucket, {metric}_sum or {metric}_count"
                ));
            } else if !self.series.contains_key(metric) {
                problems.push(format!(
                    "metric `{metric}` is not exported (not in agent/telemetry-catalogue)"
                ));
            }
        }
        for (metric, label) in &refs.selector_labels {
            if let Some(labels) = self.series.get(metric) {
                if !labels.contains(label) && label != "__name__" {
                    problems.push(format!("`{metric}` has no label `{label}`"));
                }
            }
        }
        for label in &refs.grouping_labels {
            if !self.labels.contains(label) {
                problems.push(format!("no exported metric has a label `{label}`"));
            }
        }
        problems
    }
}

// ---------------------------------------------------------------------------
// PromQL: the metric names and labels an expression uses
// ---------------------------------------------------------------------------

/// PromQL 2.42's functions (lowercase, called with parentheses).
#[rustfmt::skip]
const FUNCTIONS: &[&str] = &[
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "end", "exp", "floor", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "max_over_time",
    "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_desc", "sqrt", "start", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan",
    "tanh", "time", "timestamp", "vector", "year",
];
/// Aggregation operators (case-insensitive, may be followed by `by`/`without`).
const AGGREGATORS: &[&str] = &[
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
];
/// Keywords whose parenthesised list names labels.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Other bare keywords (case-insensitive).
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num,
    /// A `[...]` range or subquery, skipped whole.
    Range,
    Op(String),
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
}

fn lex(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            let mut s = String::new();
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err("unterminated string".into());
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c != '`' {
                    if let Some(&escaped) = chars.get(i) {
                        s.push(escaped);
                        i += 1;
                    }
                    continue;
                }
                s.push(d);
            }
            toks.push(Tok::Str(s));
        } else if c.is_ascii_digit() || (c == '.' && next.is_some_and(|n| n.is_ascii_digit())) {
            // Numbers (1, 0.95, 1e-3, 0x1f, Inf handled as keyword) and durations (5m, 1h30m).
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_'))
            {
                let mantissa = chars[start..i]
                    .iter()
                    .all(|d| d.is_ascii_digit() || *d == '.');
                if matches!(chars[i], 'e' | 'E')
                    && mantissa
                    && matches!(chars.get(i + 1), Some('+' | '-'))
                {
                    i += 2;
                } else {
                    i += 1;
                }
            }
            toks.push(Tok::Num);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            if i == chars.len() {
                return Err("unclosed `[`".into());
            }
            i += 1;
            toks.push(Tok::Range);
        } else if "=!~<>+-*/%^@".contains(c) {
            let start = i;
            while i < chars.len() && "=!~<>+-*/%^@".contains(chars[i]) {
                i += 1;
            }
            toks.push(Tok::Op(chars[start..i].iter().collect()));
        } else {
            toks.push(match c {
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                '{' => Tok::LBrace,
                '}' => Tok::RBrace,
                ',' => Tok::Comma,
                _ => return Err(format!("unexpected character `{c}`")),
            });
            i += 1;
        }
    }
    Ok(toks)
}

/// What an expression reads.
#[derive(Debug, Default)]
struct Refs {
    /// Metric names, bare or before `{` / `[`, or in `{__name__="..."}`.
    metrics: Vec<String>,
    /// (metric, label) for each label matcher of a selector.
    selector_labels: Vec<(String, String)>,
    /// Labels in `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    grouping_labels: Vec<String>,
}

fn promql_refs(expr: &str) -> Result<Refs, String> {
    let toks = lex(expr)?;
    let mut refs = Refs::default();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(name) => {
                let lower = name.to_ascii_lowercase();
                let called = toks.get(i + 1) == Some(&Tok::LParen);
                i += 1;
                if KEYWORDS.contains(&lower.as_str()) || AGGREGATORS.contains(&lower.as_str()) {
                    continue;
                }
                if GROUPING.contains(&lower.as_str()) {
                    if called {
                        i += 1;
                        loop {
                            match toks.get(i) {
                                Some(Tok::RParen) => break,
                                Some(Tok::Ident(label)) => refs.grouping_labels.push(label.clone()),
                                Some(Tok::Comma) => {}
                                other => return Err(format!("`{name}(...)` holds {other:?}")),
                            }
                            i += 1;
                        }
                        i += 1;
                    }
                    continue;
                }
                if called {
                    if !FUNCTIONS.contains(&name.as_str()) {
                        return Err(format!("unknown function `{name}`"));
                    }
                    continue;
                }
                refs.metrics.push(name.clone());
                if toks.get(i) == Some(&Tok::LBrace) {
                    let (labels, _) = matchers(&toks, &mut i)?;
                    for label in labels {
                        refs.selector_labels.push((name.clone(), label));
                    }
                }
            }
            Tok::LBrace => {
                let (labels, metric) = matchers(&toks, &mut i)?;
                let metric = metric.ok_or("a selector without a metric name")?;
                refs.metrics.push(metric.clone());
                for label in labels {
                    refs.selector_labels.push((metric.clone(), label));
                }
            }
            _ => i += 1,
        }
    }
    Ok(refs)
}

/// The label matchers of the `{...}` at `toks[*i]`: the labels they name and
/// the metric name of a `__name__="..."` matcher. Leaves `*i` after the `}`.
fn matchers(toks: &[Tok], i: &mut usize) -> Result<(Vec<String>, Option<String>), String> {
    let mut labels = Vec::new();
    let mut name = None;
    *i += 1;
    loop {
        match toks.get(*i) {
            Some(Tok::RBrace) => break,
            Some(Tok::Comma) => *i += 1,
            Some(Tok::Ident(label)) => {
                let (Some(Tok::Op(op)), Some(Tok::Str(value))) =
                    (toks.get(*i + 1), toks.get(*i + 2))
                else {
                    return Err(format!(
                        "label matcher `{label}` is not `label op \"value\"`"
                    ));
                };
                if label == "__name__" && op == "=" {
                    name = Some(value.clone());
                }
                labels.push(label.clone());
                *i += 3;
            }
            other => return Err(format!("unexpected {other:?} in a label matcher")),
        }
    }
    *i += 1;
    Ok((labels, name))
}

// ---------------------------------------------------------------------------
// Grafana: dashboards, their expressions and variables
// ---------------------------------------------------------------------------

/// A PromQL expression and where it comes from.
struct Expr {
    source: String,
    /// With Grafana's variables replaced by valid values.
    promql: String,
    /// `{{label}}` names in the target's legend.
    legend_labels: Vec<String>,
    /// For `label_values(selector, label)`: the metric's label asked for.
    values_of: Option<String>,
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = dashboards_dir();
    DASHBOARDS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let json = serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            (name.to_string(), json)
        })
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .collect()
}

/// Replaces Grafana's variables (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`) with values PromQL accepts: durations for the interval
/// built-ins, `x` for the dashboard's own variables (used inside label
/// matchers' strings). Variables the dashboard does not define are replaced
/// too, and returned as the second value.
fn substitute(text: &str, defined: &BTreeSet<String>) -> (String, Vec<String>) {
    let mut undefined = Vec::new();
    let mut value = |name: &str| match name {
        "__rate_interval" | "__interval" => "5m",
        "__range" => "1h",
        "__range_s" => "3600",
        "__range_ms" | "__interval_ms" => "3600000",
        _ => {
            if !defined.contains(name) {
                undefined.push(name.to_string());
            }
            "x"
        }
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find(['$', '[']) {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let braced = rest
            .strip_prefix("${")
            .and_then(|inner| Some((inner, inner.find('}')?, 1)))
            .or_else(|| {
                let inner = rest.strip_prefix("[[")?;
                Some((inner, inner.find("]]")?, 2))
            });
        if let Some((inner, end, close)) = braced {
            out.push_str(value(inner[..end].split(':').next().unwrap_or_default()));
            rest = &inner[end + close..];
        } else if let Some(inner) = rest.strip_prefix('$') {
            let end = inner.find(|c| !is_name(c)).unwrap_or(inner.len());
            if end == 0 {
                out.push('$');
            } else {
                out.push_str(value(&inner[..end]));
            }
            rest = &inner[end..];
        } else {
            out.push_str(&rest[..1]);
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    (out, undefined)
}

/// `{{label}}` names in a legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(label, _)| label.trim().to_string())
        .collect()
}

/// The PromQL of every panel target and every query variable of a
/// dashboard; problems (a target without `expr`, an unknown variable) go
/// to `problems`.
fn dashboard_exprs(file: &str, dashboard: &Value, problems: &mut Vec<String>) -> Vec<Expr> {
    let defined: BTreeSet<String> = variables(dashboard)
        .iter()
        .filter_map(|v| v["name"].as_str())
        .map(str::to_string)
        .collect();
    let mut exprs = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let source = format!(
                "{file}: panel \"{title}\", target {}",
                target["refId"].as_str().unwrap_or("?")
            );
            let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                problems.push(format!("{source}: no `expr`"));
                continue;
            };
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            let (promql, undefined) = substitute(expr, &defined);
            for name in undefined {
                problems.push(format!("{source}: undefined variable `{name}` in `{expr}`"));
            }
            exprs.push(Expr {
                source,
                promql,
                legend_labels: legend_labels(legend),
                values_of: None,
            });
        }
    }
    for var in variables(dashboard) {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let source = format!("{file}: variable ${name}");
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .unwrap_or_default()
            .trim();
        // Grafana's Prometheus variable queries: label_values(selector,
        // label) or query_result(expr).
        let (promql, values_of) = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            match args.rsplit_once(',') {
                Some((selector, label)) => (selector.trim(), Some(label.trim().to_string())),
                None => {
                    problems.push(format!(
                        "{source}: `{query}` names no metric; use label_values(metric, label)"
                    ));
                    continue;
                }
            }
        } else if let Some(expr) = query
            .strip_prefix("query_result(")
            .and_then(|q| q.strip_suffix(')'))
        {
            (expr, None)
        } else {
            problems.push(format!(
                "{source}: unsupported variable query `{query}` (label_values or query_result)"
            ));
            continue;
        };
        let (promql, undefined) = substitute(promql, &defined);
        for name in undefined {
            problems.push(format!(
                "{source}: undefined variable `{name}` in `{query}`"
            ));
        }
        exprs.push(Expr {
            source,
            promql,
            legend_labels: Vec::new(),
            values_of,
        });
    }
    exprs
}

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

fn alerts_yaml() -> Value {
    yaml::read(&dashboards_dir().join("alerts.yaml"))
}

fn alert_rules(alerts: &Value) -> Vec<&Value> {
    alerts["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect()
}

fn alert_exprs(alerts: &Value) -> Vec<Expr> {
    alert_rules(alerts)
        .into_iter()
        .map(|rule| {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            // A plain number is PromQL too, and YAML reads it as one.
            let promql = match &rule["expr"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            Expr {
                source: format!("alerts.yaml: {}", name.unwrap_or("?")),
                promql,
                legend_labels: Vec::new(),
                values_of: None,
            }
        })
        .collect()
}

/// Every expression of every dashboard and alert, and the problems found
/// while collecting them (a target without PromQL, an undefined variable).
fn all_exprs() -> (Vec<Expr>, Vec<String>) {
    let mut problems = Vec::new();
    let mut exprs = Vec::new();
    for (file, dashboard) in dashboards() {
        let found = dashboard_exprs(&file, &dashboard, &mut problems);
        if found.is_empty() {
            problems.push(format!("{file}: no PromQL found in its panels"));
        }
        exprs.extend(found);
    }
    exprs.extend(alert_exprs(&alerts_yaml()));
    (exprs, problems)
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// (a) Every dashboard, wrapped as `export const d = <json> satisfies
/// Dashboard;`, compiles with `tsc --noEmit --strict`.
#[test]
fn dashboards_satisfy_the_grafana_schema() {
    let dir = dashboards_dir();
    let mut missing = Vec::new();
    if !runs("node") {
        missing.push("node (Debian's nodejs)".to_string());
    }
    let installed = ["typescript", "@grafana/schema"].iter().all(|package| {
        dir.join("node_modules")
            .join(package)
            .join("package.json")
            .is_file()
    });
    if !installed {
        missing.push(format!(
            "typescript and @grafana/schema (`npm ci` in {})",
            dir.display()
        ));
    }
    if !require("the dashboard schema check", &missing) {
        return;
    }
    let out = run(Command::new("node")
        .arg("check/check-dashboards.mjs")
        .current_dir(&dir));
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "dashboards fail the schema check:\n{text}"
    );
    for name in DASHBOARDS {
        let ok = format!("ok: {}", dir.join(name).display());
        assert!(
            text.lines().any(|l| l == ok),
            "{name} was not checked:\n{text}"
        );
    }
}

/// (b) Every expression parses: promtool has no command that parses one
/// expression, so each becomes a recording rule of a generated rules file
/// for `promtool check rules`.
#[test]
fn every_promql_expression_parses() {
    if !require_promtool("the PromQL parse check") {
        return;
    }
    let (exprs, problems) = all_exprs();
    let mut rules =
        String::from("groups:\n  - name: poolscope-dashboard-expressions\n    rules:\n");
    for (n, expr) in exprs.iter().enumerate() {
        // A JSON string is a valid YAML double-quoted scalar.
        let quoted = serde_json::to_string(&expr.promql).expect("a string serializes");
        rules.push_str(&format!(
            "      - record: \"dashboard:expr:{n}\"\n        expr: {quoted}\n"
        ));
    }
    let tmp = TempDir::new("poolscope-promql");
    let file = tmp.path().join("expressions.yaml");
    fs::write(&file, &rules).expect("write the generated rules file");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file));
    if !out.status.success() {
        let text = output_text(&out);
        let named = |n: usize| text.contains(&format!("\"dashboard:expr:{n}\""));
        let any_named = (0..exprs.len()).any(named);
        let index: Vec<String> = exprs
            .iter()
            .enumerate()
            .filter(|(n, _)| named(*n) || !any_named)
            .map(|(n, e)| format!("dashboard:expr:{n} = {}: {}", e.source, e.promql))
            .collect();
        panic!(
            "promtool rejects expressions:\n{text}\nwhere\n{}\n{}",
            index.join("\n"),
            problems.join("\n")
        );
    }
    let found = output_text(&out);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        found.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "promtool did not check all {} expressions:\n{found}",
        exprs.len()
    );
}

/// (c) Panels, variables and alerts query only the metrics the telemetry
/// catalogue declares (the agent's unit test checks it against /metrics), with
/// the labels those metrics carry; legends and alert annotations name only
/// exported labels.
#[test]
fn dashboards_and_alerts_query_only_exported_metrics() {
    let catalog = Catalog::from_agent();
    let (exprs, mut problems) = all_exprs();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let refs = match promql_refs(&expr.promql) {
            Ok(refs) => refs,
            Err(e) => {
                problems.push(format!(
                    "{}: {e} (expression: `{}`)",
                    expr.source, expr.promql
                ));
                continue;
            }
        };
        if refs.metrics.is_empty() {
            problems.push(format!(
                "{}: queries no metric: `{}`",
                expr.source, expr.promql
            ));
        }
        let mut found = catalog.problems(&refs);
        for label in &expr.legend_labels {
            if !catalog.labels.contains(label) {
                found.push(format!("the legend names `{label}`, which no metric has"));
            }
        }
        if let Some(label) = &expr.values_of {
            for metric in &refs.metrics {
                if catalog
                    .series
                    .get(metric)
                    .is_some_and(|l| !l.contains(label))
                {
                    found.push(format!(
                        "label_values asks for `{label}`, which `{metric}` lacks"
                    ));
                }
            }
        }
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{}: {p} (expression: `{}`)", expr.source, expr.promql)),
        );
        used.extend(refs.metrics);
    }
    // `{{ $labels.x }}` in the alerts' annotations.
    let alerts = read(&dashboards_dir().join("alerts.yaml"));
    for label in alerts.split("$labels.").skip(1).map(|s| {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or_default()
    }) {
        if !catalog.labels.contains(label) {
            problems.push(format!(
                "alerts.yaml: annotation uses `$labels.{label}`, which no metric has"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    let unused: Vec<_> = catalog
        .series
        .keys()
        .filter(|s| !s.ends_with("_sum") && !s.ends_with("_count"))
        .filter(|s| !used.contains(*s) && !used.contains(&s.replace("_bucket", "_count")))
        .collect();
    if !unused.is_empty() {
        eprintln!("note: no dashboard or alert shows {unused:?}");
    }
    println!(
        "{} expressions checked; they use {} of {} exported series",
        exprs.len(),
        used.len(),
        catalog.series.len()
    );
}

/// (c) The check above really fails on a metric the agent does not export,
/// a histogram queried without its suffix, and a label a metric lacks.
#[test]
fn the_metric_check_rejects_what_the_agent_does_not_export() {
    let catalog = Catalog::from_agent();
    let problems = |expr: &str| {
        let refs = promql_refs(expr).unwrap_or_else(|e| panic!("{e} in {expr}"));
        catalog.problems(&refs)
    };
    // Real expressions pass.
    for ok in [
        r#"sum by (le) (rate(db_client_operation_duration_seconds_bucket{db_system_name=~"x"}[5m]))"#,
        r#"sum without (db_client_connection_state) (db_client_connection_count{db_client_connection_state="used"}) / on (db_client_connection_pool_name, process_pid) group_left db_client_connection_max > 0.9"#,
        r#"{__name__="poolscope_kernel_events_total", instance=~"x"} offset 5m"#,
        "rate(poolscope_kernel_events_total[5m:1m]) * 1e-3 > bool 0.5",
    ] {
        assert_eq!(problems(ok), Vec::<String>::new(), "{ok}");
    }
    let cases = [
        (
            "rate(poolscope_made_up_total[5m])",
            "`poolscope_made_up_total` is not exported",
        ),
        (
            r#"poolscope_made_up_total{kind="leaked"} > 0"#,
            "`poolscope_made_up_total` is not exported",
        ),
        (
            "sum(poolscope_made_up)",
            "`poolscope_made_up` is not exported",
        ),
        (
            r#"{__name__="poolscope_made_up"}"#,
            "`poolscope_made_up` is not exported",
        ),
        (
            "histogram_quantile(0.9, rate(db_client_operation_duration_seconds[5m]))",
            "is a histogram",
        ),
        (
            r#"poolscope_leak_open{server_address="db"}"#,
            "`poolscope_leak_open` has no label `server_address`",
        ),
        (
            "db_client_connection_max_total",
            "`db_client_connection_max_total` is not exported",
        ),
        (
            "sum by (made_up_label) (poolscope_leak_open)",
            "no exported metric has a label `made_up_label`",
        ),
    ];
    for (expr, expected) in cases {
        let found = problems(expr);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "`{expr}`: expected a problem containing {expected:?}, got {found:?}"
        );
    }
    assert!(promql_refs("made_up_function(poolscope_kernel_events_total)").is_err());
}

/// (d) promtool accepts the rules and their unit tests pass.
#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    if !require_promtool("the alert rule checks") {
        return;
    }
    let dir = dashboards_dir();
    let check = run(Command::new("promtool")
        .args(["check", "rules", "alerts.yaml"])
        .current_dir(&dir));
    assert!(
        check.status.success(),
        "promtool check rules alerts.yaml:\n{}",
        output_text(&check)
    );
    let test = run(Command::new("promtool")
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(&dir));
    assert!(
        test.status.success(),
        "promtool test rules alerts_test.yaml:\n{}",
        output_text(&test)
    );
}

/// Every alert the project promises exists, with a severity, a summary, a
/// description and a runbook, and has a unit test where it fires and one
/// where it stays silent.
#[test]
fn every_alert_is_documented_and_tested_both_ways() {
    let alerts = alerts_yaml();
    let rules = alert_rules(&alerts);
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for rule in &rules {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        names.insert(name.to_string());
        let severity = &rule["labels"]["severity"];
        if !severity.as_str().is_some_and(|s| SEVERITIES.contains(&s)) {
            problems.push(format!(
                "{name}: severity {severity} is not one of {SEVERITIES:?}"
            ));
        }
        for key in ANNOTATIONS {
            if rule["annotations"][key]
                .as_str()
                .is_none_or(|s| s.trim().is_empty())
            {
                problems.push(format!(
                    "{name}: no `{key}` annotation (a non-empty string)"
                ));
            }
        }
    }
    for expected in ALERTS {
        if !names.contains(*expected) {
            problems.push(format!("alerts.yaml has no alert {expected}"));
        }
    }
    problems.extend(runbook_problems(&rules));

    let tests = yaml::read(&dashboards_dir().join("alerts_test.yaml"));
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for group in tests["tests"].as_array().into_iter().flatten() {
        let has_input = group["input_series"]
            .as_array()
            .is_some_and(|s| !s.is_empty());
        for case in group["alert_rule_test"].as_array().into_iter().flatten() {
            let Some(name) = case["alertname"].as_str().map(str::to_string) else {
                problems.push(format!(
                    "alerts_test.yaml: alertname {} is not a string",
                    case["alertname"]
                ));
                continue;
            };
            if !names.contains(&name) {
                problems.push(format!("alerts_test.yaml tests an unknown alert {name:?}"));
            }
            match case["exp_alerts"].as_array() {
                Some(expected) if !expected.is_empty() => fires.insert(name),
                _ if has_input => silent.insert(name),
                _ => false,
            };
        }
    }
    for name in &names {
        if !fires.contains(name) {
            problems.push(format!("alerts_test.yaml never makes {name} fire"));
        }
        if !silent.contains(name) {
            problems.push(format!(
                "alerts_test.yaml never checks that {name} stays silent on healthy series"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// GitHub's anchor of a Markdown heading: lower case, spaces as dashes,
/// other punctuation dropped.
fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Each alert's `runbook_url` is `docs/runbook.md#<its section>`, and that
/// section exists and is the alert's own (headed by its name).
fn runbook_problems(rules: &[&Value]) -> Vec<String> {
    let runbook = read(&workspace_root().join(RUNBOOK));
    let sections: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(heading_anchor)
        .collect();
    let mut problems = Vec::new();
    for rule in rules {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let wanted = format!("{RUNBOOK}#{}", heading_anchor(name));
        if url != wanted {
            problems.push(format!("{name}: runbook_url {url:?}, expected {wanted:?}"));
        } else if !sections.contains(&heading_anchor(name)) {
            problems.push(format!("{name}: {RUNBOOK} has no section `## {name}`"));
        }
    }
    problems
}

#[test]
fn the_runbook_check_finds_a_missing_section() {
    let rule = serde_json::json!({
        "alert": "NoSuchAlert",
        "annotations": {"runbook_url": "docs/runbook.md#nosuchalert"},
    });
    let problems = runbook_problems(&[&rule]);
    assert_eq!(
        problems,
        ["NoSuchAlert: docs/runbook.md has no section `## NoSuchAlert`"]
    );
    let rule = serde_json::json!({
        "alert": "PoolExhausted",
        "annotations": {"runbook_url": "https://example.com/x"},
    });
    assert_eq!(runbook_problems(&[&rule]).len(), 1);
}

/// Every dashboard queries Prometheus through the `${DS_PROMETHEUS}`
/// variable, has a unique uid and unique panel ids, and lays its panels out
/// within Grafana's 24 columns.
#[test]
fn dashboards_use_the_datasource_variable_and_a_sound_layout() {
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for (file, dashboard) in dashboards() {
        let uid = dashboard["uid"].as_str().unwrap_or_default();
        if uid.is_empty() || !uids.insert(uid.to_string()) {
            problems.push(format!("{file}: missing or duplicate uid {uid:?}"));
        }
        let ds_var = variables(&dashboard).into_iter().any(|v| {
            v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"
        });
        if !ds_var {
            problems.push(format!(
                "{file}: no `DS_PROMETHEUS` variable of type datasource (query \"prometheus\")"
            ));
        }
        for var in variables(&dashboard) {
            if var["type"] == "query" && var["datasource"]["uid"] != DATASOURCE_UID {
                problems.push(format!(
                    "{file}: variable {} does not use {DATASOURCE_UID}",
                    var["name"]
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for panel in panels(&dashboard) {
            let title = panel["title"].as_str().unwrap_or("?");
            if !panel["id"].as_u64().is_some_and(|id| ids.insert(id)) {
                problems.push(format!(
                    "{file}: panel \"{title}\" has a missing or duplicate id"
                ));
            }
            let pos = &panel["gridPos"];
            let (x, w) = (
                pos["x"].as_u64().unwrap_or(99),
                pos["w"].as_u64().unwrap_or(99),
            );
            if x + w > 24 || pos["h"].as_u64().is_none() || pos["y"].as_u64().is_none() {
                problems.push(format!("{file}: panel \"{title}\" has a bad gridPos {pos}"));
            }
            let targets = panel["targets"].as_array().into_iter().flatten();
            let sources =
                std::iter::once(&panel["datasource"]).chain(targets.map(|t| &t["datasource"]));
            if panel["targets"].is_array() {
                for ds in sources {
                    if ds["type"] != "prometheus" || ds["uid"] != DATASOURCE_UID {
                        problems.push(format!(
                            "{file}: panel \"{title}\" queries {ds}, not {{\"type\": \"prometheus\", \"uid\": \"{DATASOURCE_UID}\"}}"
                        ));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The tests' YAML reader (`poolscope_tests::yaml`) reads the block style
/// the rules files use, keeping YAML's types: a group's `limit` is a number,
/// a duration a string.
#[test]
fn yaml_reader_reads_the_rules_files_style() {
    let doc = r#"
# comment
groups:
  - name: g   # trailing comment
    limit: 10
    rules:
      - alert: A
        for: 5m
        expr: |
          sum(x)
            > 1
        labels:
          severity: "warning"
        annotations:
          runbook: >-
            one
            two

            three
          quoted: 'it''s "x": y'
      - record: r
        expr: up{job="a"} > 0
empty: []
list: [a, b]
nothing: {}
"#;
    let v = yaml::parse(doc).expect("parses");
    let rule = &v["groups"][0]["rules"][0];
    assert_eq!(v["groups"][0]["name"], "g");
    assert_eq!(rule["expr"], "sum(x)\n  > 1\n");
    assert_eq!(rule["labels"]["severity"], "warning");
    assert_eq!(rule["annotations"]["runbook"], "one two\nthree");
    assert_eq!(rule["annotations"]["quoted"], "it's \"x\": y");
    assert_eq!(v["groups"][0]["rules"][1]["expr"], r#"up{job="a"} > 0"#);
    assert_eq!(v["empty"], Value::Array(vec![]));
    assert_eq!(v["list"][1], "b");
    assert!(v["nothing"].as_object().is_some_and(|m| m.is_empty()));
    assert!(yaml::parse("a: b\n  c: d\n").is_err());
    assert_eq!(v["groups"][0]["limit"], 10);
    assert_ne!(v["groups"][0]["limit"], "10");
    assert_eq!(rule["for"], "5m");
}
