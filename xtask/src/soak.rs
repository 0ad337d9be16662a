//! `cargo xtask soak`: the release agent under a hostile, changing host for
//! N minutes, to show that its memory and file descriptors stay flat.
//!
//! While the agent runs (default configuration, plus an OTLP endpoint),
//! the soak keeps up at once: connection churn (pgbench reconnecting for
//! every transaction) beside a steady set of long-lived connections to a
//! throwaway PostgreSQL; floods of adapter datagrams from short-lived
//! processes, half of them an unprivileged user's (many pool names, old
//! timestamps, malformed messages), beside one well-behaved pool; and an
//! OTLP collector that goes away every minute (hung, then refusing). Every
//! 5 s it samples the agent's RSS, fds, threads, CPU time, /healthz and
//! its own counters. The verdict compares the end with the end of the
//! first minute, when the bounded state (closed connections, reports,
//! queues) has had time to fill.

mod collector;
pub mod sender;

use std::{
    env, fmt,
    fs::{self, OpenOptions},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use self::{collector::Collector, sender::LEGIT_POOL};
use super::{
    bench::{
        self,
        cgroup::{self, command_in, Cgroup},
        prom, Agent, Postgres, Server, WorkDir,
    },
    is_root, output, run, setup, target_dir,
};

const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The verdict's baseline: the end of the first minute (or of the first
/// fifth of a shorter soak).
const BASELINE: Duration = Duration::from_secs(60);
/// Flat means: RSS at the end less than 10 % above the baseline...
const RSS_GROWTH_LIMIT: f64 = 0.10;
/// ...and fewer than 16 more open fds (a few come and go with HTTP and
/// OTLP connections in flight).
const FD_GROWTH_LIMIT: i64 = 16;
/// pgbench -C: new connections per second (one per transaction).
const CHURN_RATE: &str = "100";
/// Long-lived connections, each running a query every 200 ms.
const STEADY_CLIENTS: &str = "8";
const FUZZ_USER: &str = "poolscope-fuzz";
/// A flood sender is started every second and runs this long.
const SENDER_SECONDS: &str = "3";
const SENDER_RATE: &str = "2000";
/// Flood senders alive at once, at most (on a slow machine they overlap).
const MAX_SENDERS: usize = 8;
/// The flood senders' modes in turn, as `--mode` spells them (a test
/// checks that they parse).
const FLOOD_MODES: [&str; 3] = ["pools", "old", "malformed"];
const LEGIT_RATE: &str = "20";
/// A second legitimate pool, from a process started halfway, when the
/// floods have long filled every bound.
const LATE_POOL: &str = "soak-legit-late";
const WAIT_TIME_COUNT: &str = "db_client_connection_wait_time_seconds_count";
const POOL_LABEL: &str = "db_client_connection_pool_name";

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1440))]
    minutes: u32,
    /// Soak this agent binary instead of building target/release/poolscope.
    #[arg(long)]
    agent: Option<PathBuf>,
}

/// One look at the agent.
struct Sample {
    /// Seconds since the load started.
    t: f64,
    rss_kb: u64,
    fds: u64,
    threads: u64,
    cpu_s: f64,
    healthz_ms: f64,
    /// None when /healthz answered 200.
    healthz_error: Option<String>,
    /// Series in /metrics (None if it could not be read).
    series: Option<u64>,
    /// The legitimate pools in /metrics: (any series, wait-time series).
    legit: (bool, bool),
    late: (bool, bool),
}

pub fn soak(args: SoakArgs) -> Result<()> {
    if !is_root() {
        bail!("the soak needs root (the agent loads BPF programs, and the soak uses cgroups and another user): run it with sudo");
    }
    let command = format!(
        "cargo xtask {}",
        env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let agent_bin = bench::agent_binary(args.agent.as_deref())?;
    setup::ensure_soak_deps()?;
    ensure_fuzz_user()?;
    let total = Duration::from_secs(u64::from(args.minutes) * 60);
    let baseline = BASELINE.min(total / 5);

    let mut header = vec![
        ("command", format!("`{command}`")),
        (
            "date",
            bench::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
        ("commit", bench::commit_description(args.agent.as_deref())),
        ("kernel", bench::command_line("uname", &["-srm"])),
        (
            "CPUs",
            thread::available_parallelism().map_or_else(|_| "?".to_string(), |n| n.to_string()),
        ),
        ("load average at start", bench::load_average()),
    ];

    // Dropped in reverse: the agent, PostgreSQL, the cgroups (stopping what
    // is left in them), then the directory.
    let pid = std::process::id();
    let hierarchy = cgroup::detect(None)?;
    let work = WorkDir::create(env::temp_dir().join(format!("poolscope-soak-{pid}")))?;
    let load_cg = Cgroup::create(&hierarchy, &format!("poolscope-soak-{pid}-load"))?;
    let agent_cg = Cgroup::create(&hierarchy, &format!("poolscope-soak-{pid}-agent"))?;
    cgroup::spawn_watchdog(pid, &[&load_cg, &agent_cg], &[work.path()])?;

    // The senders are this binary; a copy in the work directory is one the
    // unprivileged user can run wherever the checkout lives.
    let sender_bin = work.path().join("xtask-sender");
    let me = env::current_exe().context("cannot find the xtask binary")?;
    fs::copy(&me, &sender_bin).with_context(|| format!("cannot copy {}", me.display()))?;
    fs::set_permissions(&sender_bin, fs::Permissions::from_mode(0o755))?;

    eprintln!("soak: starting PostgreSQL");
    let pg = Postgres::start(work.path(), &load_cg, None, false)?;
    let collector = Collector::bind().context("cannot listen for the OTLP collector")?;
    let collector_port = collector.port;
    let stats = std::sync::Arc::clone(&collector.stats);
    let socket = work.path().join("adapter.sock");
    let config = work.path().join("poolscope.toml");
    // The defaults, but a private adapter socket (another agent on this
    // host keeps its own) and an OTLP endpoint.
    fs::write(
        &config,
        format!(
            "[adapter]\nsocket = {:?}\n\n[otlp]\nendpoint = \"http://127.0.0.1:{collector_port}\"\nprotocol = \"http/protobuf\"\n",
            socket.display().to_string()
        ),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let agent_log = work.path().join("agent.log");
    eprintln!("soak: starting the agent");
    let mut agent = Agent::start(&agent_cg, &agent_bin, &config, &[], agent_log.clone())?;

    let secs = total.as_secs().to_string();
    let scripts = write_pgbench_scripts(work.path())?;
    let pgbench = pg.bin.join("pgbench");
    let pg_args = |extra: &[&str]| -> Vec<String> {
        [
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
        ]
        .iter()
        .chain(extra)
        .chain(&["-T", &secs, "postgres"])
        .map(|s| s.to_string())
        .collect()
    };
    let churn_log = work.path().join("pgbench-churn.log");
    let steady_log = work.path().join("pgbench-steady.log");
    let mut churn = Server::spawn(
        command_in(&load_cg, &pgbench).args(pg_args(&[
            "-n", "-C", "-c", "2", "-j", "1", "-R", CHURN_RATE, "-f", &scripts.0,
        ])),
        &churn_log,
        "pgbench (churn)",
    )?;
    let mut steady = Server::spawn(
        command_in(&load_cg, &pgbench).args(pg_args(&[
            "-n",
            "-c",
            STEADY_CLIENTS,
            "-j",
            "1",
            "-f",
            &scripts.1,
        ])),
        &steady_log,
        "pgbench (steady)",
    )?;
    let legit_log = |pool: &str| work.path().join(format!("{pool}.log"));
    let legit_sender = |pool: &str| {
        Server::spawn(
            command_in(&load_cg, &sender_bin)
                .args(["soak-sender", "--mode", "legit", "--rate", LEGIT_RATE])
                .args(["--pool", pool])
                .args(["--seconds", &(total.as_secs() + 120).to_string()])
                .arg("--socket")
                .arg(&socket),
            &legit_log(pool),
            "a legitimate adapter sender",
        )
    };
    let mut legit = legit_sender(LEGIT_POOL)?;
    // The late sender, and when it started (seconds into the soak).
    let mut late: Option<(Server, f64)> = None;
    let late_at = total / 2;
    eprintln!(
        "soak: {} min of churn, adapter floods and collector outages; a sample every {} s",
        args.minutes,
        SAMPLE_EVERY.as_secs()
    );

    let stop = AtomicBool::new(false);
    let mut samples = Vec::new();
    // Only the last /metrics is kept: one per sample would grow with
    // samples × series on long runs.
    let mut metrics = None;
    let mut problems = Vec::new();
    let mut agent_death = None;
    let senders_log = work.path().join("senders.log");
    let floods = thread::scope(|scope| -> Result<FloodStats> {
        let stop = &stop;
        scope.spawn(move || collector.run(stop));
        let floods = scope.spawn(|| flood(&load_cg, &sender_bin, &socket, &senders_log, stop));
        let started = Instant::now();
        let mut next = started;
        let mut late_failed = false;
        loop {
            let (sample, read) = sample(&agent, &agent_cg, started);
            eprintln!("{}", progress_line(&sample));
            samples.push(sample);
            metrics = read.or(metrics.take());
            if late.is_none() && !late_failed && started.elapsed() >= late_at {
                let at = started.elapsed().as_secs_f64();
                match legit_sender(LATE_POOL) {
                    Ok(sender) => late = Some((sender, at)),
                    Err(e) => {
                        late_failed = true;
                        problems.push(format!("{e:#}"));
                    }
                }
            }
            if let Err(e) = agent.check_running() {
                agent_death = Some(format!("{e:#}"));
                break;
            }
            for (name, load) in [("churn", &mut churn), ("steady", &mut steady)] {
                if started.elapsed() + Duration::from_secs(2) < total {
                    if let Ok(Some(status)) = load.child.try_wait() {
                        let what = format!("pgbench ({name}) exited early ({status})");
                        if !problems.contains(&what) {
                            problems.push(what);
                        }
                    }
                }
            }
            if started.elapsed() >= total {
                break;
            }
            next += SAMPLE_EVERY;
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        stop.store(true, Relaxed);
        floods
            .join()
            .map_err(|_| anyhow::anyhow!("the flood thread panicked"))
    })?;
    // The legitimate senders stop only now, so that their pools were there
    // to be seen by the last sample; one that already exited stopped
    // sending before the end.
    let late_started = late.as_ref().map(|(_, at)| *at);
    for (pool, sender) in [
        (LEGIT_POOL, Some(&mut legit)),
        (LATE_POOL, late.as_mut().map(|(sender, _)| sender)),
    ] {
        if let Some(Ok(Some(status))) = sender.map(|s| s.child.try_wait()) {
            problems.push(format!(
                "the legitimate sender of `{pool}` exited before the end ({status}): {}",
                bench::tail(&legit_log(pool), 3)
            ));
        }
    }
    drop(legit);
    drop(late);
    if agent_death.is_none() {
        agent_death = agent.check_running().err().map(|e| format!("{e:#}"));
    }
    // After an early death pgbench still runs its -T: nothing to wait for.
    let churned = if agent_death.is_none() {
        let churned = pgbench_transactions(&mut churn, &churn_log, &mut problems);
        let _ = pgbench_transactions(&mut steady, &steady_log, &mut problems);
        churned
    } else {
        None
    };
    if floods.failed_starts > 0 {
        problems.push(format!(
            "{} flood senders could not be started: {}",
            floods.failed_starts, floods.last_error
        ));
    }
    let stopping = Instant::now();
    drop(agent);
    let shutdown = stopping.elapsed();
    header.push(("load average at end", bench::load_average()));

    let report = Report {
        header,
        minutes: args.minutes,
        baseline,
        samples: &samples,
        metrics: metrics.as_ref(),
        problems: &problems,
        agent_death: agent_death.as_deref(),
        churned,
        floods: &floods,
        collector: &stats,
        shutdown,
        late_started,
        agent_log_bytes: fs::metadata(&agent_log).map_or(0, |m| m.len()),
    };
    let verdict = report.verdict();
    let markdown = report.markdown(&verdict).to_string();
    println!("{markdown}");
    let dir = target_dir().join("soak");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("report.md");
    fs::write(&path, &markdown).with_context(|| format!("cannot write {}", path.display()))?;
    // The agent's log, for a look at what it said under the floods.
    let _ = fs::copy(&agent_log, dir.join("agent.log"));
    println!("report: {}", path.display());
    drop(pg);
    match verdict {
        Ok(()) => Ok(()),
        Err(reasons) => bail!("soak verdict FAIL: {}", reasons.join("; ")),
    }
}

/// The fuzz user, created if missing (as the hostile-host tests do).
fn ensure_fuzz_user() -> Result<()> {
    let exists = Command::new("id")
        .arg(FUZZ_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run id")?
        .success();
    if !exists {
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            FUZZ_USER,
        ]))?;
    }
    let uid = output(Command::new("id").args(["-u", FUZZ_USER]))
        .context("id -u poolscope-fuzz failed")?;
    if uid.trim() == "0" {
        bail!("{FUZZ_USER} is root: the floods must come from an unprivileged user");
    }
    Ok(())
}

/// pgbench scripts: (churn, steady).
fn write_pgbench_scripts(dir: &Path) -> Result<(String, String)> {
    let churn = dir.join("churn.sql");
    let steady = dir.join("steady.sql");
    fs::write(&churn, "SELECT 1;\n")?;
    fs::write(&steady, "SELECT 1;\n\\sleep 200 ms\n")?;
    Ok((bench::utf8(&churn)?, bench::utf8(&steady)?))
}

/// Transactions a pgbench run reports once it ends by itself (`-T`);
/// waits a little for it, else stops it and notes a problem.
fn pgbench_transactions(run: &mut Server, log: &Path, problems: &mut Vec<String>) -> Option<f64> {
    let done = bench::wait_for(Duration::from_secs(30), || {
        matches!(run.child.try_wait(), Ok(Some(_)))
    });
    if done.is_err() {
        problems.push("pgbench did not finish within 30 s of the soak's end".to_string());
        return None;
    }
    let out = fs::read_to_string(log).unwrap_or_default();
    bench::parse_pgbench(&out, 1.0).ok().map(|r| r.ops)
}

/// A look at the agent, and its /metrics if they could be read.
fn sample(agent: &Agent, cg: &Cgroup, started: Instant) -> (Sample, Option<prom::Metrics>) {
    let pid = agent.child.id();
    let t = started.elapsed().as_secs_f64();
    let (rss_kb, _) = agent.memory_kb();
    let count =
        |dir: &str| fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, |d| d.count() as u64);
    let asked = Instant::now();
    let healthz = bench::http_get(agent.addr, "/healthz");
    let healthz_ms = asked.elapsed().as_secs_f64() * 1e3;
    let metrics = agent.metrics().ok();
    let seen = |pool: &str| {
        metrics.as_ref().map_or((false, false), |m| {
            (
                m.series().iter().any(|s| s.label(POOL_LABEL) == Some(pool)),
                m.sum(WAIT_TIME_COUNT, &[(POOL_LABEL, pool)]) > 0.0,
            )
        })
    };
    let sample = Sample {
        t,
        rss_kb,
        fds: count("fd"),
        threads: count("task"),
        // The agent is alone in its cgroup: all its threads, user and system.
        cpu_s: cg.usage_ns().map_or(0.0, |ns| ns as f64 / 1e9),
        healthz_ms,
        healthz_error: healthz.err().map(|e| {
            format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        }),
        series: metrics.as_ref().map(|m| m.series().len() as u64),
        legit: seen(LEGIT_POOL),
        late: seen(LATE_POOL),
    };
    (sample, metrics)
}

/// The three metric families with most series, and their counts.
fn largest_families(metrics: &prom::Metrics) -> Vec<(&str, u64)> {
    let mut families = std::collections::BTreeMap::<&str, u64>::new();
    for s in metrics.series() {
        *families.entry(s.name.as_str()).or_default() += 1;
    }
    let mut families: Vec<(&str, u64)> = families.into_iter().collect();
    families.sort_by_key(|f| std::cmp::Reverse(f.1));
    families.truncate(3);
    families
}

/// A sample's values, formatted once for the progress line and the
/// report's table: t (s), RSS (MiB), fds, threads, CPU (s), /healthz (ms,
/// and the error if any), series.
fn cells(s: &Sample) -> [String; 7] {
    [
        format!("{:.0}", s.t),
        format!("{:.1}", s.rss_kb as f64 / 1024.0),
        s.fds.to_string(),
        s.threads.to_string(),
        format!("{:.1}", s.cpu_s),
        format!(
            "{:.1}{}",
            s.healthz_ms,
            s.healthz_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ),
        s.series.map_or_else(|| "?".to_string(), |n| n.to_string()),
    ]
}

fn progress_line(s: &Sample) -> String {
    let [t, rss, fds, threads, cpu, healthz, series] = cells(s);
    format!(
        "[{t:>4} s] RSS {rss:>6} MiB, fds {fds:>4}, threads {threads:>3}, CPU {cpu:>6} s, healthz {healthz:>6} ms, series {series}"
    )
}

#[derive(Default)]
struct FloodStats {
    started_root: u64,
    started_fuzz: u64,
    /// Senders that exited with an error.
    failed: u64,
    /// The last error a sender reported, from the senders' log.
    last_failure: String,
    failed_starts: u64,
    last_error: String,
}

/// Starts a flood sender every second (modes in turn, each mode as root
/// and as the fuzz user in turn) until `stop`, at most [`MAX_SENDERS`] at
/// once; each sends for a few seconds and exits.
fn flood(
    cg: &Cgroup,
    sender_bin: &Path,
    socket: &Path,
    log: &Path,
    stop: &AtomicBool,
) -> FloodStats {
    let mut stats = FloodStats::default();
    let mut running: Vec<Child> = Vec::new();
    let mut i: u64 = 0;
    let reap = |running: &mut Vec<Child>, stats: &mut FloodStats| {
        running.retain_mut(|child| match child.try_wait() {
            Ok(Some(status)) => {
                stats.failed += u64::from(!status.success());
                false
            }
            Ok(None) => true,
            // Its state is unknown: stopped, reaped and counted as failed.
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                stats.failed += 1;
                false
            }
        });
    };
    while !stop.load(Relaxed) {
        reap(&mut running, &mut stats);
        if running.len() < MAX_SENDERS {
            let mode = FLOOD_MODES[(i % 3) as usize];
            let as_fuzz = (i / 3) % 2 == 1;
            let mut cmd = if as_fuzz {
                let mut cmd = command_in(cg, "setpriv");
                cmd.args(["--reuid", FUZZ_USER, "--regid", FUZZ_USER, "--clear-groups"])
                    .arg("--")
                    .arg(sender_bin);
                cmd
            } else {
                command_in(cg, sender_bin)
            };
            cmd.args(["soak-sender", "--mode", mode, "--seconds", SENDER_SECONDS])
                .args(["--rate", SENDER_RATE, "--seed", &i.to_string()])
                .arg("--socket")
                .arg(socket);
            let err = OpenOptions::new().create(true).append(true).open(log);
            let spawned = err.and_then(|err| {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(err)
                    .spawn()
            });
            match spawned {
                Ok(child) => {
                    running.push(child);
                    if as_fuzz {
                        stats.started_fuzz += 1;
                    } else {
                        stats.started_root += 1;
                    }
                }
                Err(e) => {
                    stats.failed_starts += 1;
                    stats.last_error = e.to_string();
                }
            }
            i += 1;
        }
        thread::sleep(Duration::from_secs(1));
    }
    // The last ones finish their few seconds.
    let _ = bench::wait_for(Duration::from_secs(15), || {
        reap(&mut running, &mut stats);
        running.is_empty()
    });
    for mut child in running {
        let _ = child.kill();
        let _ = child.wait();
    }
    if stats.failed > 0 {
        // Senders report their failure on stderr as "error: ..." (main).
        let text = fs::read_to_string(log).unwrap_or_default();
        stats.last_failure = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or("no error in the senders' log")
            .to_string();
    }
    stats
}

struct Report<'a> {
    header: Vec<(&'static str, String)>,
    minutes: u32,
    baseline: Duration,
    samples: &'a [Sample],
    /// The last /metrics read.
    metrics: Option<&'a prom::Metrics>,
    problems: &'a [String],
    /// How the agent died, if it did not run to the end.
    agent_death: Option<&'a str>,
    churned: Option<f64>,
    floods: &'a FloodStats,
    collector: &'a collector::Stats,
    shutdown: Duration,
    /// When the late pool's sender started (seconds into the soak).
    late_started: Option<f64>,
    agent_log_bytes: u64,
}

/// Ok, or the reasons the soak failed.
type Verdict = std::result::Result<(), Vec<String>>;

const ADAPTER: &str = "poolscope_adapter_messages_total";

/// Where a sample records whether a pool was in /metrics: (any series,
/// wait-time series).
type Seen = fn(&Sample) -> (bool, bool);

/// first, min, max, last, at the baseline.
struct Row {
    first: f64,
    min: f64,
    max: f64,
    last: f64,
    base: f64,
}

impl Report<'_> {
    fn base_sample(&self) -> Option<&Sample> {
        let at = self.baseline.as_secs_f64();
        self.samples
            .iter()
            .find(|s| s.t >= at - 0.5)
            .or(self.samples.last())
    }

    fn row(&self, value: impl Fn(&Sample) -> Option<f64>) -> Option<Row> {
        let values: Vec<f64> = self.samples.iter().filter_map(&value).collect();
        Some(Row {
            first: *values.first()?,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            last: *values.last()?,
            base: value(self.base_sample()?)?,
        })
    }

    /// The legitimate pools: each with the time its samples count from
    /// (one interval after its sender started: the first sample may come
    /// before its first datagram is read), if it was started.
    fn pools(&self) -> Vec<(&'static str, f64, Seen)> {
        let interval = SAMPLE_EVERY.as_secs_f64();
        let mut pools: Vec<(&'static str, f64, Seen)> = vec![(LEGIT_POOL, interval, |s| s.legit)];
        if let Some(at) = self.late_started {
            pools.push((LATE_POOL, at + interval, |s| s.late));
        }
        pools
    }

    fn verdict(&self) -> Verdict {
        let mut reasons = Vec::new();
        let base = self.base_sample().map_or(0.0, |s| s.t);
        match self.row(|s| Some(s.rss_kb as f64)) {
            Some(r) if r.base > 0.0 => {
                let growth = r.last / r.base - 1.0;
                if growth >= RSS_GROWTH_LIMIT {
                    reasons.push(format!(
                        "RSS grew {:.1} % from {base:.0} s to the end (limit {:.0} %)",
                        growth * 100.0,
                        RSS_GROWTH_LIMIT * 100.0
                    ));
                }
            }
            _ => reasons.push("no RSS samples".to_string()),
        }
        match self.row(|s| Some(s.fds as f64)) {
            Some(r) => {
                let growth = (r.last - r.base) as i64;
                if growth >= FD_GROWTH_LIMIT {
                    reasons.push(format!(
                        "open fds grew by {growth} from {base:.0} s to the end (limit: fewer than {FD_GROWTH_LIMIT})"
                    ));
                }
            }
            None => reasons.push("no fd samples".to_string()),
        }
        let failed = self
            .samples
            .iter()
            .filter(|s| s.healthz_error.is_some())
            .count();
        if failed > 0 {
            reasons.push(format!("/healthz failed {failed} times"));
        }
        if let Some(death) = self.agent_death {
            reasons.push(format!("the agent did not run to the end: {death}"));
        }
        for (pool, since, seen) in self.pools() {
            let due: Vec<&Sample> = self.samples.iter().filter(|s| s.t >= since).collect();
            let missing: Vec<String> = due
                .iter()
                .filter(|s| !seen(s).0)
                .map(|s| format!("{:.0} s", s.t))
                .collect();
            if !missing.is_empty() {
                // A few times are enough to see a pattern; a long run could
                // list hundreds.
                const SHOWN: usize = 5;
                let more = if missing.len() > SHOWN { ", …" } else { "" };
                reasons.push(format!(
                    "legitimate pool `{pool}` missing from /metrics in {} of {} samples from {since:.0} s (at {}{more})",
                    missing.len(),
                    due.len(),
                    missing[..missing.len().min(SHOWN)].join(", "),
                ));
            }
        }
        if self.floods.failed > 0 {
            reasons.push(format!(
                "{} of {} flood senders exited with an error (last: {})",
                self.floods.failed,
                self.floods.started_root + self.floods.started_fuzz,
                self.floods.last_failure
            ));
        }
        // The malformed flood must have reached the agent and been refused.
        match self.metrics {
            None => reasons.push("/metrics was never read".to_string()),
            Some(m) if m.sum(ADAPTER, &[("result", "rejected")]) <= 0.0 => {
                reasons.push("the agent rejected no adapter datagrams".to_string());
            }
            Some(_) => {}
        }
        reasons.extend(self.problems.iter().cloned());
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    /// The last value read of a counter of the agent (since its start).
    fn counter(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        self.metrics.map_or(0.0, |m| m.sum(name, matching))
    }

    /// The report in Markdown, with its verdict.
    fn markdown<'r>(&'r self, verdict: &'r Verdict) -> Markdown<'r> {
        Markdown {
            report: self,
            verdict,
        }
    }
}

struct Markdown<'r> {
    report: &'r Report<'r>,
    verdict: &'r Verdict,
}

impl fmt::Display for Markdown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Markdown { report, verdict } = *self;
        let base = report.base_sample().map_or(0.0, |s| s.t);
        writeln!(f, "# poolscope soak, {} min\n", report.minutes)?;
        writeln!(f, "| | |\n|---|---|")?;
        for (k, v) in &report.header {
            writeln!(f, "| {k} | {v} |")?;
        }
        writeln!(
            f,
            "| agent | default configuration plus `[otlp] endpoint` (http/protobuf) to the soak's collector; adapter socket in a temp dir |"
        )?;
        writeln!(
            f,
            "| load | `pgbench -C -R {CHURN_RATE}` (a new connection per `SELECT 1`) and {STEADY_CLIENTS} long-lived pgbench connections (`SELECT 1` every 200 ms) to a throwaway PostgreSQL; \
             a flood sender started every second ({SENDER_RATE} datagrams/s for {SENDER_SECONDS} s, then exits; modes in turn: 200 pool names, acquire_start dated 500 s back / at boot / in the future, malformed), \
             half as root, half as `{FUZZ_USER}`; legitimate pools `{LEGIT_POOL}` from the start and `{LATE_POOL}` from halfway; \
             the OTLP collector up 30 s, then 30 s out (hung, then refusing, in turn) |"
        )?;

        writeln!(
            f,
            "\n## Agent resources ({} samples, every {} s)\n",
            report.samples.len(),
            SAMPLE_EVERY.as_secs()
        )?;
        writeln!(
            f,
            "| | first | min | max | last | at {base:.0} s | growth {base:.0} s → end |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
        type Value = fn(&Sample) -> Option<f64>;
        let rows: [(&str, Value, bool); 4] = [
            ("RSS (MiB)", |s| Some(s.rss_kb as f64 / 1024.0), true),
            ("open fds", |s| Some(s.fds as f64), false),
            ("threads", |s| Some(s.threads as f64), false),
            ("/metrics series", |s| s.series.map(|n| n as f64), false),
        ];
        for (name, value, relative) in rows {
            let Some(r) = report.row(value) else {
                writeln!(f, "| {name} | no samples | | | | | |")?;
                continue;
            };
            let growth = if relative {
                format!(
                    "{:+.1} ({:+.1} %)",
                    r.last - r.base,
                    (r.last / r.base - 1.0) * 100.0
                )
            } else {
                format!("{:+.0}", r.last - r.base)
            };
            let n = |v: f64| {
                if relative {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            };
            writeln!(
                f,
                "| {name} | {} | {} | {} | {} | {} | {growth} |",
                n(r.first),
                n(r.min),
                n(r.max),
                n(r.last),
                n(r.base)
            )?;
        }

        let cpu = report.samples.last().map_or(0.0, |s| s.cpu_s);
        let span = report.samples.last().map_or(0.0, |s| s.t).max(1.0);
        writeln!(
            f,
            "\nAgent CPU (its cgroup's, all threads, user and system): {cpu:.1} s over the soak, {:.1} % of one core on average.",
            cpu / span * 100.0
        )?;
        let mut latencies: Vec<f64> = report.samples.iter().map(|s| s.healthz_ms).collect();
        latencies.sort_by(f64::total_cmp);
        let worst = report
            .samples
            .iter()
            .max_by(|a, b| a.healthz_ms.total_cmp(&b.healthz_ms));
        let failures: Vec<String> = report
            .samples
            .iter()
            .filter_map(|s| Some(format!("{} at {:.0} s", s.healthz_error.as_deref()?, s.t)))
            .collect();
        writeln!(
            f,
            "`/healthz`: {} checks, {}; latency median {:.1} ms, worst {:.1} ms{}.",
            report.samples.len(),
            if failures.is_empty() {
                "all 200".to_string()
            } else {
                format!("{} failed: {}", failures.len(), failures.join(", "))
            },
            latencies.get(latencies.len() / 2).copied().unwrap_or(0.0),
            worst.map_or(0.0, |s| s.healthz_ms),
            worst.map_or_else(String::new, |s| format!(" (at {:.0} s)", s.t)),
        )?;

        let pct = RSS_GROWTH_LIMIT * 100.0;
        match verdict {
            Ok(()) => writeln!(
                f,
                "\n**Verdict: PASS** (flat: RSS growth from {base:.0} s to the end below {pct:.0} %, open fds growth below {FD_GROWTH_LIMIT}; \
                 every /healthz 200; the legitimate pools in /metrics from one interval after their start; every flood sender delivered; \
                 malformed datagrams rejected; the agent and the load ran throughout)"
            )?,
            Err(reasons) => writeln!(
                f,
                "\n**Verdict: FAIL**: {} (limits: RSS growth from {base:.0} s to the end below {pct:.0} %, open fds growth below {FD_GROWTH_LIMIT}, \
                 every /healthz 200, the legitimate pools in /metrics from one interval after their start, every flood sender delivering, \
                 malformed datagrams rejected, the agent and the load running throughout)",
                reasons.join("; ")
            )?,
        }

        writeln!(
            f,
            "\n## What the load did (agent counters since its start)\n"
        )?;
        writeln!(f, "| | |\n|---|---|")?;
        let c = |name: &str, matching: &[(&str, &str)]| report.counter(name, matching);
        writeln!(
            f,
            "| connections opened by `pgbench -C` | {} |",
            report
                .churned
                .map_or_else(|| "?".to_string(), |n| format!("{n:.0}"))
        )?;
        writeln!(
            f,
            "| TCP connects the agent counted | {:.0} |",
            c("poolscope_connects_total", &[])
        )?;
        writeln!(
            f,
            "| flood senders started | {} as root, {} as `{FUZZ_USER}` ({} exited with an error) |",
            report.floods.started_root, report.floods.started_fuzz, report.floods.failed
        )?;
        let reasons = report
            .metrics
            .map(|m| m.by_label(ADAPTER, "reason"))
            .unwrap_or_default();
        let reasons: Vec<String> = reasons
            .iter()
            .map(|(reason, n)| format!("{reason} {n:.0}"))
            .collect();
        writeln!(
            f,
            "| adapter datagrams accepted / rejected | {:.0} / {:.0} ({}) |",
            c(ADAPTER, &[("result", "accepted")]),
            c(ADAPTER, &[("result", "rejected")]),
            reasons.join(", ")
        )?;
        if report.late_started.is_none() {
            writeln!(f, "| legitimate pool `{LATE_POOL}` | never started |")?;
        }
        for (pool, since, seen) in report.pools() {
            let after: Vec<(bool, bool)> = report
                .samples
                .iter()
                .filter(|s| s.t >= since)
                .map(seen)
                .collect();
            writeln!(
                f,
                "| legitimate pool `{pool}` (sending from {:.0} s) | in /metrics in {} of {} samples from {since:.0} s; its wait-time histogram in {} |",
                (since - SAMPLE_EVERY.as_secs_f64()).max(0.0),
                after.iter().filter(|s| s.0).count(),
                after.len(),
                after.iter().filter(|s| s.1).count(),
            )?;
        }
        if let Some(metrics) = report.metrics {
            let families: Vec<String> = largest_families(metrics)
                .iter()
                .map(|(name, n)| format!("`{name}` {n}"))
                .collect();
            writeln!(
                f,
                "| largest /metrics families at the end (lines) | {} |",
                families.join(", ")
            )?;
        }
        let s = report.collector;
        writeln!(
            f,
            "| OTLP collector | {} hung and {} refusing outages; answered {} metric and {} log requests; held {} connections unanswered |",
            s.outages_hung.load(Relaxed),
            s.outages_down.load(Relaxed),
            s.metrics_requests.load(Relaxed),
            s.logs_requests.load(Relaxed),
            s.held.load(Relaxed)
        )?;
        if s.rebind_failures.load(Relaxed) > 0 || s.other_requests.load(Relaxed) > 0 {
            writeln!(
                f,
                "| OTLP collector trouble | {} failed re-listens, {} requests to other paths |",
                s.rebind_failures.load(Relaxed),
                s.other_requests.load(Relaxed)
            )?;
        }
        const BATCHES: &str = "poolscope_export_batches_total";
        writeln!(
            f,
            "| OTLP export batches ok / failed | metrics {:.0} / {:.0}, logs {:.0} / {:.0} |",
            c(BATCHES, &[("signal", "metrics"), ("result", "ok")]),
            c(BATCHES, &[("signal", "metrics"), ("result", "failed")]),
            c(BATCHES, &[("signal", "logs"), ("result", "ok")]),
            c(BATCHES, &[("signal", "logs"), ("result", "failed")]),
        )?;
        writeln!(
            f,
            "| OTLP events dropped | {:.0} |",
            c("poolscope_export_dropped_total", &[])
        )?;
        writeln!(
            f,
            "| report lines held back (rate limit) | {:.0} |",
            c("poolscope_reports_unpublished_total", &[])
        )?;
        writeln!(
            f,
            "| kernel events dropped | {:.0} |",
            c("poolscope_kernel_events_dropped_total", &[])
        )?;
        writeln!(
            f,
            "| agent log | {:.1} KiB |",
            report.agent_log_bytes as f64 / 1024.0
        )?;
        writeln!(
            f,
            "| SIGTERM to exit (collector down) | {:.2} s |",
            report.shutdown.as_secs_f64()
        )?;
        if !report.problems.is_empty() {
            writeln!(f, "\nProblems: {}", report.problems.join("; "))?;
        }

        writeln!(f, "\n## Samples\n")?;
        writeln!(
            f,
            "| t (s) | RSS (MiB) | fds | threads | CPU (s) | /healthz (ms) | series |"
        )?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|---:|")?;
        for s in report.samples {
            writeln!(f, "| {} |", cells(s).join(" | "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    const GOOD_METRICS: &str = "\
poolscope_adapter_messages_total{result=\"accepted\"} 100
poolscope_adapter_messages_total{result=\"rejected\",reason=\"json\"} 7
db_client_connection_wait_time_seconds_count{db_client_connection_pool_name=\"soak-legit\"} 3
db_client_connection_wait_time_seconds_count{db_client_connection_pool_name=\"soak-legit-late\"} 2
";

    /// A flat, healthy sample at `t` s, both pools seen.
    fn sample(t: f64) -> Sample {
        Sample {
            t,
            rss_kb: 50_000,
            fds: 40,
            threads: 9,
            cpu_s: t / 10.0,
            healthz_ms: 1.0,
            healthz_error: None,
            series: Some(4),
            legit: (true, true),
            late: (true, true),
        }
    }

    /// A minute of samples every 5 s, the late pool's sender started at
    /// 30.05 s (just after the sample at 30 s, as the soak does).
    fn samples() -> Vec<Sample> {
        (0..=12).map(|i| sample(f64::from(i) * 5.0)).collect()
    }

    struct Inputs {
        samples: Vec<Sample>,
        metrics: Option<prom::Metrics>,
        problems: Vec<String>,
        agent_death: Option<String>,
        floods: FloodStats,
        collector: collector::Stats,
        late_started: Option<f64>,
    }

    impl Inputs {
        fn new(samples: Vec<Sample>) -> Inputs {
            Inputs {
                samples,
                metrics: Some(prom::Metrics::parse(GOOD_METRICS)),
                problems: Vec::new(),
                agent_death: None,
                floods: FloodStats {
                    started_root: 30,
                    started_fuzz: 30,
                    ..FloodStats::default()
                },
                collector: collector::Stats::default(),
                late_started: Some(30.05),
            }
        }

        fn report(&self) -> Report<'_> {
            Report {
                header: Vec::new(),
                minutes: 1,
                baseline: Duration::from_secs(12),
                samples: &self.samples,
                metrics: self.metrics.as_ref(),
                problems: &self.problems,
                agent_death: self.agent_death.as_deref(),
                churned: Some(6000.0),
                floods: &self.floods,
                collector: &self.collector,
                shutdown: Duration::from_millis(200),
                late_started: self.late_started,
                agent_log_bytes: 0,
            }
        }

        fn reasons(&self) -> Vec<String> {
            self.report().verdict().err().unwrap_or_default()
        }
    }

    #[test]
    fn a_flat_healthy_run_passes() {
        let inputs = Inputs::new(samples());
        assert_eq!(inputs.report().verdict(), Ok(()));
    }

    #[test]
    fn the_legitimate_pool_may_miss_only_the_first_sample() {
        let mut inputs = Inputs::new(samples());
        inputs.samples[0].legit = (false, false);
        assert_eq!(inputs.reasons(), Vec::<String>::new());
        inputs.samples[1].legit = (false, false);
        inputs.samples[12].legit = (false, false);
        assert_eq!(
            inputs.reasons(),
            ["legitimate pool `soak-legit` missing from /metrics in 2 of 12 samples from 5 s (at 5 s, 60 s)"]
        );
    }

    #[test]
    fn the_late_pool_must_show_one_interval_after_its_start() {
        let mut inputs = Inputs::new(samples());
        // Before the sender started, and the first sample after: allowed.
        for s in &mut inputs.samples[..=7] {
            s.late = (false, false);
        }
        assert_eq!(inputs.reasons(), Vec::<String>::new());
        inputs.samples[8].late = (false, false);
        assert_eq!(
            inputs.reasons(),
            ["legitimate pool `soak-legit-late` missing from /metrics in 1 of 5 samples from 35 s (at 40 s)"]
        );
        for s in &mut inputs.samples[8..] {
            s.late = (false, false);
        }
        assert_eq!(
            inputs.reasons(),
            ["legitimate pool `soak-legit-late` missing from /metrics in 5 of 5 samples from 35 s (at 40 s, 45 s, 50 s, 55 s, 60 s)"]
        );
        inputs.samples[7].late = (false, false);
        inputs.late_started = Some(29.0);
        assert_eq!(
            inputs.reasons(),
            ["legitimate pool `soak-legit-late` missing from /metrics in 6 of 6 samples from 34 s (at 35 s, 40 s, 45 s, 50 s, 55 s, …)"]
        );
        // Never started: that is a problem of its own (recorded by the
        // soak), not a missing pool.
        inputs.late_started = None;
        assert_eq!(inputs.reasons(), Vec::<String>::new());
    }

    #[test]
    fn failed_flood_senders_fail_the_soak() {
        let mut inputs = Inputs::new(samples());
        inputs.floods.failed = 2;
        inputs.floods.last_failure = "sender Pools seed 3: sent 0".to_string();
        assert_eq!(
            inputs.reasons(),
            ["2 of 60 flood senders exited with an error (last: sender Pools seed 3: sent 0)"]
        );
    }

    #[test]
    fn malformed_datagrams_must_be_rejected() {
        let mut inputs = Inputs::new(samples());
        inputs.metrics = Some(prom::Metrics::parse(
            "poolscope_adapter_messages_total{result=\"accepted\"} 100\n",
        ));
        assert_eq!(
            inputs.reasons(),
            ["the agent rejected no adapter datagrams"]
        );
        inputs.metrics = None;
        assert_eq!(inputs.reasons(), ["/metrics was never read"]);
    }

    #[test]
    fn an_early_death_is_one_reason() {
        let mut inputs = Inputs::new(samples().into_iter().take(4).collect());
        inputs.agent_death = Some("the agent exited (signal: 9)".to_string());
        inputs.late_started = None;
        assert_eq!(
            inputs.reasons(),
            ["the agent did not run to the end: the agent exited (signal: 9)"]
        );
    }

    #[test]
    fn the_report_shows_the_verdict_it_is_given() {
        let inputs = Inputs::new(samples());
        let report = inputs.report();
        let verdict = Err(vec!["given reason".to_string()]);
        let markdown = report.markdown(&verdict).to_string();
        assert!(
            markdown.contains("**Verdict: FAIL**: given reason ("),
            "{markdown}"
        );
        let markdown = report.markdown(&Ok(())).to_string();
        assert!(markdown.contains("**Verdict: PASS**"), "{markdown}");
    }

    #[test]
    fn progress_and_table_show_the_same_cells() {
        let mut s = sample(35.0);
        s.healthz_error = Some("timed out".to_string());
        s.series = None;
        let line = progress_line(&s);
        for cell in cells(&s) {
            assert!(line.contains(&cell), "{cell:?} not in {line:?}");
        }
        assert!(line.contains("1.0 (timed out)"), "{line}");
    }

    #[test]
    fn flood_modes_are_sender_modes() {
        for mode in FLOOD_MODES {
            assert!(sender::Mode::from_str(mode, false).is_ok(), "{mode}");
        }
    }
}
