//! Reading the Prometheus text format: series, samples and label selectors.

use std::collections::BTreeMap;

/// `name{a="1",b="2"}` -> ("name", [("a","1"), ("b","2")]).
fn parse_series(text: &str) -> Option<(&str, Vec<(String, String)>)> {
    let Some((name, rest)) = text.split_once('{') else {
        return Some((text.trim(), Vec::new()));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_string(), value));
    }
    Some((name.trim(), labels))
}

/// Every sample of metric `name`: its labels and value.
pub fn metric_series(metrics: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = parse_series(series)?;
            let value = value.trim().parse::<f64>().ok()?;
            (series_name == name).then_some((labels, value))
        })
        .collect()
}

/// Round trips per (`db_operation_name`, `error_type`), "" for a label that
/// is absent.
pub type OperationCounts = BTreeMap<(String, String), u64>;

/// Counts of the `db_client_operation_duration_seconds` histogram for
/// `server_port` = `port`, summed over the other labels.
pub fn operation_counts(metrics: &str, port: u16) -> OperationCounts {
    let port = port.to_string();
    let mut counts = OperationCounts::new();
    for (labels, value) in metric_series(metrics, "db_client_operation_duration_seconds_count") {
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        if label("server_port") != port {
            continue;
        }
        let key = (label("db_operation_name"), label("error_type"));
        // Counts are integers; the text format may print them as floats.
        *counts.entry(key).or_default() += value.round() as u64;
    }
    counts
}

/// Builds expected [`OperationCounts`]: `[("SELECT", "", 7), ("SELECT",
/// "42601", 1)]`.
pub fn operations(expected: &[(&str, &str, u64)]) -> OperationCounts {
    expected
        .iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(op, error, n)| ((op.to_string(), error.to_string()), *n))
        .collect()
}

/// The value of the first sample in Prometheus text `metrics` whose name is
/// the selector's and whose labels include all the selector's labels, e.g.
/// `poolscope_connects_total{result="refused"}`.
pub fn metric_sample(metrics: &str, selector: &str) -> Option<f64> {
    metric_samples(metrics, selector).into_iter().next()
}

/// Every sample matching `selector` (see [`metric_sample`]).
pub fn metric_samples(metrics: &str, selector: &str) -> Vec<f64> {
    let Some((want_name, want_labels)) = parse_series(selector) else {
        panic!("bad metric selector {selector:?}");
    };
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = parse_series(series)?;
            (name == want_name && want_labels.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_label_subsets() {
        let text = "# HELP x\n\
            poolscope_connects_total{network_transport=\"tcp\",result=\"refused\"} 3\n\
            poolscope_connects_total{network_transport=\"tcp\",result=\"ok\"} 7\n\
            poolscope_connection_open{process_executable_name=\"a b\",process_pid=\"12\",server_address=\"127.0.0.1\",server_port=\"5432\"} 5\n\
            poolscope_kernel_events_dropped_total 0\n";
        assert_eq!(
            metric_sample(text, "poolscope_connects_total{result=\"refused\"}"),
            Some(3.0)
        );
        assert_eq!(
            metric_sample(
                text,
                "poolscope_connects_total{network_transport=\"tcp\",result=\"ok\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            metric_sample(text, "poolscope_connection_open{process_pid=\"12\"}"),
            Some(5.0)
        );
        assert_eq!(
            metric_sample(text, "poolscope_connection_open{process_pid=\"1\"}"),
            None
        );
        assert_eq!(
            metric_sample(text, "poolscope_kernel_events_dropped_total"),
            Some(0.0)
        );
        assert_eq!(metric_samples(text, "poolscope_connects_total").len(), 2);
        assert_eq!(metric_sample(text, "poolscope_connects"), None);
    }
}
