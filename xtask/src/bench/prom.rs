//! Just enough of the Prometheus text format (0.0.4) to read the agent's
//! counters: `name{label="value",...} number`.

use std::collections::BTreeMap;

pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Metrics { samples }
    }

    /// Every series read, in the order of the text.
    pub fn series(&self) -> &[Sample] {
        &self.samples
    }

    /// Sum of the series of `name` whose labels include all of `matching`.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| matching.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
            .sum()
    }

    /// Sums of `name` per value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            if let Some(v) = s.label(label) {
                *out.entry(v.to_string()).or_insert(0.0) += s.value;
            }
        }
        out
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

/// Labels up to the closing brace, and what follows it.
#[allow(clippy::type_complexity)]
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_with_and_without_labels() {
        let m = Metrics::parse(
            "# HELP x y\n\
             db_client_operation_duration_seconds_count{db_operation_name=\"SELECT\",server_port=\"5432\"} 10\n\
             db_client_operation_duration_seconds_count{db_operation_name=\"BEGIN\",server_port=\"5432\"} 3\n\
             db_client_operation_duration_seconds_count{db_operation_name=\"GET\",server_port=\"6379\"} 7\n\
             poolscope_probe_runs_total{probe=\"sock_recv_length\"} 1.5e3\n\
             poolscope_kernel_events_dropped_total 2\n\
             odd{a=\"x\\\"},y\"} 1 1700000000\n",
        );
        let name = "db_client_operation_duration_seconds_count";
        assert_eq!(m.sum(name, &[("server_port", "5432")]), 13.0);
        assert_eq!(m.sum(name, &[]), 20.0);
        assert_eq!(m.sum("poolscope_kernel_events_dropped_total", &[]), 2.0);
        let runs = m.by_label("poolscope_probe_runs_total", "probe");
        assert_eq!(runs.get("sock_recv_length"), Some(&1500.0));
        assert_eq!(m.sum("odd", &[("a", "x\"},y")]), 1.0);
    }
}
