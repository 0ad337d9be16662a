//! The bench's report: the same tables as plain text (stdout) and markdown
//! (target/bench/report.md, to paste into BENCHMARKS.md).

use std::collections::BTreeMap;

use super::{Run, Workload};

/// Renders (plain text, markdown).
pub fn render(
    header: &[(String, String)],
    workloads: &[Workload],
    runs: &[Run],
    failures: &[String],
) -> (String, String) {
    let summaries: Vec<Summary> = workloads
        .iter()
        .filter_map(|&w| Summary::of(w, runs))
        .collect();
    let tables = [
        cost_table(&summaries),
        agent_table(&summaries),
        kernel_table(&summaries),
    ];
    let mut notes = vec![
        "ops: the workload's operations (SQL statements or Redis requests, i.e. round \
         trips; file I/Os; pipe blocks), by the tool's own count."
            .to_string(),
        "CPU us/op: CPU time of the workload's own processes (server and client, in a \
         cgroup of their own) per operation; with the agent it includes the kernel time \
         of the agent's BPF programs, which run inside those processes' system calls."
            .to_string(),
        "ratio: with / without, per interleaved pair (the order flips every round); \
         median [min..max] over the pairs. +agent adds the agent's own CPU to the \
         with-agent side."
            .to_string(),
        "agent us/op: the agent's CPU time (all threads, user and system, from its own \
         cgroup) during the run and the drain after it (until it has counted the tool's operations, \
         or its count stood still for 0.3 s), per operation; 1 us/op is 1 % of a \
         core at 10,000 ops/s. RSS: the median VmRSS at the end of the with-agent runs, and the highest VmHWM."
            .to_string(),
        "counted / tool: round trips the agent counted to the server's port \
         (db_client_operation_duration_seconds_count) against the tool's own count, \
         summed over the with-agent runs."
            .to_string(),
        "kernel: BPF run-time statistics (poolscope_probe_*), delta over the with-agent \
         runs. They count every process on the host, so on a busy machine runs/op \
         overstates what the workload itself caused; ns/run does not depend on it."
            .to_string(),
    ];
    if !failures.is_empty() {
        notes.push(format!(
            "{} run(s) failed and their pairs were left out: {}",
            failures.len(),
            failures.join("; ")
        ));
    }

    let (mut text, mut md) = header_only(header);
    text.push_str("\nworkloads:\n");
    md.push_str("\nWorkloads:\n\n");
    for w in workloads {
        text.push_str(&format!("  {:<16} {}\n", w.name(), w.describe()));
        md.push_str(&format!("- {}: {}\n", w.name(), w.describe()));
    }
    for table in &tables {
        text.push('\n');
        text.push_str(&table.text());
        md.push('\n');
        md.push_str(&table.markdown());
    }
    text.push('\n');
    md.push('\n');
    for note in &notes {
        text.push_str(&format!("* {note}\n"));
        md.push_str(&format!("- {note}\n"));
    }
    md.push('\n');
    md.push_str(&runs_table(runs).markdown());
    (text, md)
}

/// Only the header (when no workload of the main tables ran).
pub fn header_only(header: &[(String, String)]) -> (String, String) {
    let mut text = String::from("poolscope bench\n");
    let mut md = String::from("## poolscope bench\n\n");
    let width = header.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in header {
        text.push_str(&format!("{key:<width$}  {value}\n"));
        md.push_str(&format!("- {key}: {value}\n"));
    }
    (text, md)
}

/// One workload's pairs, reduced.
struct Summary {
    workload: Workload,
    pairs: usize,
    ops_per_s: (f64, f64),
    cpu_us_per_op: (f64, f64),
    cpu_ratio: Spread,
    total_ratio: Spread,
    throughput_ratio: Spread,
    agent_us_per_op: Spread,
    /// Median VmRSS at the end of the with-agent runs, highest VmHWM.
    rss_kb: f64,
    hwm_kb: u64,
    counted: Option<(f64, f64)>,
    dropped: f64,
    /// Per program: (run time s, runs) summed over the with-agent runs.
    probes: BTreeMap<String, (f64, f64)>,
    with_ops: f64,
}

impl Summary {
    fn of(workload: Workload, runs: &[Run]) -> Option<Summary> {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.workload == workload).collect();
        let pairs: Vec<(&Run, &Run)> = mine
            .iter()
            .filter(|r| r.agent.is_none())
            .filter_map(|without| {
                let with = mine
                    .iter()
                    .find(|r| r.round == without.round && r.agent.is_some())?;
                Some((*without, *with))
            })
            .collect();
        if pairs.is_empty() {
            return None;
        }
        let per_op = |r: &Run| r.work_cpu_ns / r.ops / 1e3;
        let rate = |r: &Run| r.ops / r.secs;
        let agent_ns = |r: &Run| r.agent.as_ref().map_or(0.0, |a| a.cpu_ns);
        let spread = |f: &dyn Fn(&Run, &Run) -> f64| {
            Spread::of(pairs.iter().map(|(wo, wi)| f(wo, wi)).collect())
        };
        let mut probes: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut counted = None::<(f64, f64)>;
        let mut dropped = 0.0;
        let mut hwm_kb = 0;
        for (_, with) in &pairs {
            let Some(agent) = &with.agent else { continue };
            for (probe, (time, count)) in &agent.probes {
                let entry = probes.entry(probe.clone()).or_default();
                entry.0 += time;
                entry.1 += count;
            }
            if let (Some(seen), Some(expected)) = (agent.seen, with.expected) {
                let c = counted.get_or_insert((0.0, 0.0));
                c.0 += seen;
                c.1 += expected;
            }
            dropped += agent.dropped;
            hwm_kb = hwm_kb.max(agent.hwm_kb).max(agent.rss_kb);
        }
        Some(Summary {
            workload,
            pairs: pairs.len(),
            ops_per_s: (
                median(pairs.iter().map(|(wo, _)| rate(wo)).collect()),
                median(pairs.iter().map(|(_, wi)| rate(wi)).collect()),
            ),
            cpu_us_per_op: (
                median(pairs.iter().map(|(wo, _)| per_op(wo)).collect()),
                median(pairs.iter().map(|(_, wi)| per_op(wi)).collect()),
            ),
            cpu_ratio: spread(&|wo, wi| per_op(wi) / per_op(wo)),
            total_ratio: spread(&|wo, wi| {
                (wi.work_cpu_ns + agent_ns(wi)) / wi.ops / 1e3 / per_op(wo)
            }),
            throughput_ratio: spread(&|wo, wi| rate(wi) / rate(wo)),
            agent_us_per_op: spread(&|_, wi| agent_ns(wi) / wi.ops / 1e3),
            rss_kb: median(
                pairs
                    .iter()
                    .filter_map(|(_, wi)| wi.agent.as_ref())
                    .map(|a| a.rss_kb as f64)
                    .collect(),
            ),
            hwm_kb,
            counted,
            dropped,
            probes,
            with_ops: pairs.iter().map(|(_, wi)| wi.ops).sum(),
        })
    }
}

pub(super) struct Spread {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

impl Spread {
    pub(super) fn of(values: Vec<f64>) -> Spread {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Spread {
            median: median(values),
            min,
            max,
        }
    }

    pub(super) fn ratio(&self) -> String {
        format!("{:.3} [{:.3}..{:.3}]", self.median, self.min, self.max)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Three significant-ish digits for microseconds.
pub(super) fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cost_table(summaries: &[Summary]) -> Table {
    let mut t = Table::new(
        "Cost per operation (headline: the workload's own CPU per op, from its cgroup)",
        &[
            "workload",
            "pairs",
            "ops/s without",
            "ops/s with",
            "CPU us/op without",
            "CPU us/op with",
            "CPU/op ratio",
            "CPU/op ratio +agent",
            "throughput ratio",
        ],
    );
    for s in summaries {
        t.row(vec![
            s.workload.name().to_string(),
            s.pairs.to_string(),
            format!("{:.0}", s.ops_per_s.0),
            format!("{:.0}", s.ops_per_s.1),
            us(s.cpu_us_per_op.0),
            us(s.cpu_us_per_op.1),
            s.cpu_ratio.ratio(),
            s.total_ratio.ratio(),
            s.throughput_ratio.ratio(),
        ]);
    }
    t
}

fn agent_table(summaries: &[Summary]) -> Table {
    let mut t = Table::new(
        "The agent",
        &[
            "workload",
            "agent us/op (= % core per 10k ops/s)",
            "agent RSS MiB at end / peak",
            "counted / tool",
            "dropped events",
        ],
    );
    for s in summaries {
        let a = &s.agent_us_per_op;
        t.row(vec![
            s.workload.name().to_string(),
            format!("{} [{}..{}]", us(a.median), us(a.min), us(a.max)),
            format!("{:.1} / {:.1}", s.rss_kb / 1024.0, s.hwm_kb as f64 / 1024.0),
            match s.counted {
                Some((seen, expected)) if expected > 0.0 => {
                    format!("{seen:.0} / {expected:.0} = {:.4}", seen / expected)
                }
                _ => "-".to_string(),
            },
            format!("{:.0}", s.dropped),
        ]);
    }
    t
}

/// Programs down, workloads across: "ns per run (runs per op)", and the
/// kernel time per operation of all programs together.
fn kernel_table(summaries: &[Summary]) -> Table {
    let mut headers = vec!["program: ns/run (runs/op)"];
    headers.extend(summaries.iter().map(|s| s.workload.name()));
    let mut t = Table::new(
        "Kernel programs (BPF run-time statistics, with-agent runs)",
        &headers,
    );
    let programs: std::collections::BTreeSet<&String> = summaries
        .iter()
        .flat_map(|s| s.probes.iter())
        .filter(|(_, (_, runs))| *runs > 0.0)
        .map(|(name, _)| name)
        .collect();
    if programs.is_empty() {
        let mut row = vec!["(no statistics: the agent kept none)".to_string()];
        row.extend(summaries.iter().map(|_| "-".to_string()));
        t.row(row);
        return t;
    }
    for program in programs {
        let mut row = vec![program.clone()];
        for s in summaries {
            row.push(match s.probes.get(program) {
                Some(&(time, runs)) if runs > 0.0 => {
                    let per_op = runs / s.with_ops;
                    let per_op = if per_op >= 0.01 {
                        format!("{per_op:.2}")
                    } else {
                        "<0.01".to_string()
                    };
                    format!("{:.0} ({per_op})", time * 1e9 / runs)
                }
                _ => "-".to_string(),
            });
        }
        t.row(row);
    }
    let mut total = vec!["all programs: kernel ns/op".to_string()];
    total.extend(summaries.iter().map(|s| {
        let ns: f64 = s.probes.values().map(|(time, _)| time * 1e9).sum();
        format!("{:.1}", ns / s.with_ops)
    }));
    t.row(total);
    t
}

fn runs_table(runs: &[Run]) -> Table {
    let mut t = Table::new(
        "Runs",
        &[
            "round",
            "workload",
            "agent",
            "ops",
            "s",
            "ops/s",
            "CPU us/op",
            "agent us/op",
            "counted / tool",
        ],
    );
    for r in runs {
        t.row(vec![
            r.round.to_string(),
            r.workload.name().to_string(),
            if r.agent.is_some() { "with" } else { "without" }.to_string(),
            format!("{:.0}", r.ops),
            format!("{:.2}", r.secs),
            format!("{:.0}", r.ops / r.secs),
            us(r.work_cpu_ns / r.ops / 1e3),
            r.agent
                .as_ref()
                .map_or("-".to_string(), |a| us(a.cpu_ns / r.ops / 1e3)),
            match (r.agent.as_ref().and_then(|a| a.seen), r.expected) {
                (Some(seen), Some(expected)) => format!("{seen:.0} / {expected:.0}"),
                _ => "-".to_string(),
            },
        ]);
    }
    t
}

pub(super) struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(title: &str, headers: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Columns padded to their widest cell; the first left-aligned, the
    /// rest right-aligned.
    pub(super) fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain([&self.headers[i]])
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, &w))| {
                    if i == 0 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        let mut out = format!("{}\n", self.title);
        out.push_str(&line(&self.headers));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    pub(super) fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&format!("| {} |\n", self.headers.join(" | ")));
        let align: Vec<&str> = (0..self.headers.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        out.push_str(&format!("|{}|\n", align.join("|")));
        for row in &self.rows {
            out.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let s = Spread::of(vec![1.0, 0.9, 1.1]);
        assert_eq!(s.ratio(), "1.000 [0.900..1.100]");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new("T", &["a", "bb"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.text(), "T\na    bb\nxyz   1\n");
        assert_eq!(
            t.markdown(),
            "### T\n\n| a | bb |\n|---|---:|\n| xyz | 1 |\n"
        );
    }
}
