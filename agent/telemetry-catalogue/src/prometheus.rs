//! How an OTLP metric and its attributes are named in Prometheus.
//!
//! One naming for both paths: the agent's own `/metrics`
//! (opentelemetry-prometheus) and an OTLP -> Prometheus path (Prometheus's
//! OTLP receiver, or the OpenTelemetry Collector's `prometheus` and
//! `prometheusremotewrite` exporters) must give the same series, so that
//! the shipped dashboards and alerts work on either. These are the rules
//! those translators document, followed as of Prometheus 3.0-3.5
//! (`otlp.translation_strategy: UnderscoreEscapingWithSuffixes`, the
//! default) and the Collector's `pkg/translator/prometheus` with
//! `add_metric_suffixes: true` (its default, contrib v0.90 onwards):
//!
//! - the name is cut into words at every character that is not a letter
//!   or a digit, and the words are joined with `_`;
//! - the unit's Prometheus word is appended unless the name has it already
//!   (`s` -> `seconds`, `By` -> `bytes`...; `{annotations}` give none; a
//!   `/` unit gives `_per_<word>`);
//! - a monotonic sum (a counter) ends in `_total`; a gauge of unit `1`
//!   ends in `_ratio`;
//! - a name that would begin with a digit gets a leading `_`;
//! - attribute keys become labels with every character that is not a
//!   letter, digit or `_` turned into `_`; a key starting with a digit gets
//!   `key_` before it, one starting with a single `_` gets `key`.
//!
//! Resource attributes are not labels on either path by default: an OTLP
//! receiver puts them on `target_info` (and `service.name` /
//! `service.instance.id` into `job` / `instance`).

use crate::Kind;

/// The Prometheus word for an OTLP unit (UCUM), as the translators map it;
/// an unknown unit is used as it is written, cleaned like a name.
fn unit_word(unit: &str) -> Option<String> {
    let unit = unit.trim();
    if unit.is_empty() || unit.contains(['{', '}']) {
        return None;
    }
    let word = match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        // `1` is the ratio's unit; a gauge gets `_ratio` below.
        "1" => return None,
        other => return Some(words(other).join("_")).filter(|w| !w.is_empty()),
    };
    Some(word.to_string())
}

/// The per-unit word after `/` (`By/s` -> `per_second`).
fn per_unit_word(unit: &str) -> Option<String> {
    let word = match unit.trim() {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        other => return unit_word(other),
    };
    Some(word.to_string())
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The Prometheus metric name of an instrument.
pub fn prometheus_metric_name(name: &str, unit: &str, kind: Kind) -> String {
    let mut tokens = words(name);
    let (main, per) = match unit.split_once('/') {
        Some((main, per)) => (main, Some(per)),
        None => (unit, None),
    };
    if let Some(word) = unit_word(main) {
        if !tokens.contains(&word) {
            tokens.push(word);
        }
    }
    if let Some(word) = per.and_then(per_unit_word) {
        if !tokens.contains(&word) {
            tokens.push("per".into());
            tokens.push(word);
        }
    }
    match kind {
        Kind::Counter => {
            tokens.retain(|t| t != "total");
            tokens.push("total".into());
        }
        Kind::Gauge | Kind::UpDownCounter if unit == "1" => {
            tokens.retain(|t| t != "ratio");
            tokens.push("ratio".into());
        }
        _ => {}
    }
    let joined = tokens.join("_");
    if joined.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{joined}")
    } else {
        joined
    }
}

/// The Prometheus label name of an attribute key.
pub fn prometheus_label_name(key: &str) -> String {
    let label: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if label.starts_with(|c: char| c.is_ascii_digit()) {
        format!("key_{label}")
    } else if label.starts_with('_') && !label.starts_with("__") {
        format!("key{label}")
    } else {
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases from the translators' own documentation and tests.
    #[test]
    fn names_follow_the_documented_translation() {
        for (name, unit, kind, expected) in [
            ("system.io", "By", Kind::Counter, "system_io_bytes_total"),
            (
                "http.server.duration",
                "ms",
                Kind::Histogram,
                "http_server_duration_milliseconds",
            ),
            (
                "system.cpu.utilization",
                "1",
                Kind::Gauge,
                "system_cpu_utilization_ratio",
            ),
            (
                "system.network.io",
                "By/s",
                Kind::Gauge,
                "system_network_io_bytes_per_second",
            ),
            (
                "requests.total",
                "{request}",
                Kind::Counter,
                "requests_total",
            ),
            (
                "request_duration_seconds",
                "s",
                Kind::Histogram,
                "request_duration_seconds",
            ),
            (
                "2xx.responses",
                "{response}",
                Kind::Counter,
                "_2xx_responses_total",
            ),
            (
                "db.client.connection.count",
                "{connection}",
                Kind::UpDownCounter,
                "db_client_connection_count",
            ),
            (
                "db.client.connection.pending_requests",
                "{request}",
                Kind::UpDownCounter,
                "db_client_connection_pending_requests",
            ),
            ("foo..bar__baz", "", Kind::Gauge, "foo_bar_baz"),
        ] {
            assert_eq!(
                prometheus_metric_name(name, unit, kind),
                expected,
                "{name} [{unit}]"
            );
        }
    }

    #[test]
    fn labels_follow_the_documented_translation() {
        for (key, expected) in [
            (
                "db.client.connection.pool.name",
                "db_client_connection_pool_name",
            ),
            ("process.pid", "process_pid"),
            ("k8s.pod.uid", "k8s_pod_uid"),
            ("0abc", "key_0abc"),
            ("_private", "key_private"),
            ("__reserved", "__reserved"),
            ("with-dash", "with_dash"),
        ] {
            assert_eq!(prometheus_label_name(key), expected, "{key}");
        }
    }
}
