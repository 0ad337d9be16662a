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

use self::{
    collector::Collector,
    sender::{Mode, LEGIT_POOL},
};
use super::{
    bench::{
        self,
        cgroup::{self, command_in, Cgroup},
        prom, Agent, Postgres, Server, WorkDir,
    },
    is_root, output, setup, target_dir,
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
    /// Sample lines in /metrics (None if it could not be read).
    series: Option<u64>,
    metrics: prom::Metrics,
    /// The legitimate pools in /metrics: (any series, wait-time series).
    legit: (bool, bool),
    late: (bool, bool),
    /// Sample lines per metric family, for the families with most.
    families: Vec<(String, u64)>,
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
    let pg = Postgres::start(work.path(), &load_cg, None)?;
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
    let clock_ticks: f64 = bench::command_line("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0);

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
    let legit_sender = |pool: &str| {
        Server::spawn(
            command_in(&load_cg, &sender_bin)
                .args(["soak-sender", "--mode", "legit", "--rate", LEGIT_RATE])
                .args(["--pool", pool])
                .args(["--seconds", &(total.as_secs() + 120).to_string()])
                .arg("--socket")
                .arg(&socket),
            &work.path().join(format!("{pool}.log")),
            "a legitimate adapter sender",
        )
    };
    let legit = legit_sender(LEGIT_POOL)?;
    let mut late = None;
    let late_at = total / 2;
    eprintln!(
        "soak: {} min of churn, adapter floods and collector outages; a sample every {} s",
        args.minutes,
        SAMPLE_EVERY.as_secs()
    );

    let stop = AtomicBool::new(false);
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    let senders_log = work.path().join("senders.log");
    let floods = thread::scope(|scope| -> Result<FloodStats> {
        let stop = &stop;
        scope.spawn(move || collector.run(stop));
        let floods = scope.spawn(|| flood(&load_cg, &sender_bin, &socket, &senders_log, stop));
        let started = Instant::now();
        let mut next = started;
        loop {
            let sample = sample(&mut agent, started, clock_ticks);
            eprintln!("{}", progress_line(&sample));
            samples.push(sample);
            if late.is_none() && started.elapsed() >= late_at {
                match legit_sender(LATE_POOL) {
                    Ok(sender) => late = Some(sender),
                    Err(e) => problems.push(format!("{e:#}")),
                }
            }
            if let Err(e) = agent.check_running() {
                problems.push(format!("{e:#}"));
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
    // The legitimate sender stops only now, so that its pool was there to
    // be seen by the last sample.
    drop(legit);
    drop(late);
    let churned = pgbench_transactions(&mut churn, &churn_log, &mut problems);
    let _ = pgbench_transactions(&mut steady, &steady_log, &mut problems);
    if floods.failed_starts > 0 {
        problems.push(format!(
            "{} flood senders could not be started: {}",
            floods.failed_starts, floods.last_error
        ));
    }
    let alive = agent.check_running().is_ok();
    let stopping = Instant::now();
    drop(agent);
    let shutdown = stopping.elapsed();
    header.push(("load average at end", bench::load_average()));

    let report = Report {
        header,
        minutes: args.minutes,
        baseline,
        samples: &samples,
        problems: &problems,
        alive,
        churned,
        floods: &floods,
        collector: &stats,
        shutdown,
        late_at,
        agent_log_bytes: fs::metadata(&agent_log).map_or(0, |m| m.len()),
    };
    let verdict = report.verdict();
    let markdown = report.to_string();
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
        bench::run_bounded(
            Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                FUZZ_USER,
            ]),
            &env::temp_dir().join(format!("poolscope-soak-useradd-{}", std::process::id())),
            Duration::from_secs(60),
        )?;
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

fn sample(agent: &mut Agent, started: Instant, clock_ticks: f64) -> Sample {
    let pid = agent.child.id();
    let t = started.elapsed().as_secs_f64();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    // utime and stime: the 12th and 13th fields after the command name
    // (which may itself hold spaces and parentheses).
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    let asked = Instant::now();
    let healthz = bench::http_get(agent.addr, "/healthz");
    let healthz_ms = asked.elapsed().as_secs_f64() * 1e3;
    let text = bench::http_get(agent.addr, "/metrics").ok();
    let metrics = text
        .as_deref()
        .map(prom::Metrics::parse)
        .unwrap_or_default();
    let lines = || {
        text.iter()
            .flat_map(|t| t.lines())
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    };
    let mut families = std::collections::BTreeMap::<String, u64>::new();
    for line in lines() {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        *families.entry(name.to_string()).or_default() += 1;
    }
    let mut families: Vec<(String, u64)> = families.into_iter().collect();
    families.sort_by_key(|f| std::cmp::Reverse(f.1));
    families.truncate(3);
    let seen = |pool: &str| {
        let label = format!("{POOL_LABEL}=\"{pool}\"");
        (
            lines().any(|l| l.contains(&label)),
            metrics.sum(WAIT_TIME_COUNT, &[(POOL_LABEL, pool)]) > 0.0,
        )
    };
    Sample {
        t,
        rss_kb: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        cpu_s: ticks / clock_ticks,
        healthz_ms,
        healthz_error: healthz.err().map(|e| {
            format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        }),
        series: text.as_ref().map(|_| lines().count() as u64),
        legit: seen(LEGIT_POOL),
        late: seen(LATE_POOL),
        families,
        metrics,
    }
}

fn progress_line(s: &Sample) -> String {
    format!(
        "[{:>4.0} s] RSS {:>6.1} MiB, fds {:>4}, threads {:>3}, CPU {:>6.1} s, healthz {:>6.1} ms{}, series {}",
        s.t,
        s.rss_kb as f64 / 1024.0,
        s.fds,
        s.threads,
        s.cpu_s,
        s.healthz_ms,
        s.healthz_error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default(),
        s.series.map_or_else(|| "?".to_string(), |n| n.to_string()),
    )
}

#[derive(Default)]
struct FloodStats {
    started_root: u64,
    started_fuzz: u64,
    /// Senders that exited with an error.
    failed: u64,
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
    const MODES: [(Mode, &str); 3] = [
        (Mode::Pools, "pools"),
        (Mode::Old, "old"),
        (Mode::Malformed, "malformed"),
    ];
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
            Err(_) => false,
        });
    };
    while !stop.load(Relaxed) {
        reap(&mut running, &mut stats);
        if running.len() < MAX_SENDERS {
            let (_, mode) = MODES[(i % 3) as usize];
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
    stats
}

struct Report<'a> {
    header: Vec<(&'static str, String)>,
    minutes: u32,
    baseline: Duration,
    samples: &'a [Sample],
    problems: &'a [String],
    alive: bool,
    churned: Option<f64>,
    floods: &'a FloodStats,
    collector: &'a collector::Stats,
    shutdown: Duration,
    late_at: Duration,
    agent_log_bytes: u64,
}

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

    /// Ok, or the reasons it failed.
    fn verdict(&self) -> std::result::Result<(), Vec<String>> {
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
        if !self.alive {
            reasons.push("the agent did not run to the end".to_string());
        }
        reasons.extend(self.problems.iter().cloned());
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    /// The last sample's value of a counter of the agent (since its start).
    fn counter(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .rev()
            .find(|s| s.series.is_some())
            .map_or(0.0, |s| s.metrics.sum(name, matching))
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.base_sample().map_or(0.0, |s| s.t);
        writeln!(f, "# poolscope soak, {} min\n", self.minutes)?;
        writeln!(f, "| | |\n|---|---|")?;
        for (k, v) in &self.header {
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
            self.samples.len(),
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
            let Some(r) = self.row(value) else {
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

        let cpu = self.samples.last().map_or(0.0, |s| s.cpu_s);
        let span = self.samples.last().map_or(0.0, |s| s.t).max(1.0);
        writeln!(
            f,
            "\nAgent CPU (utime + stime): {cpu:.1} s over the soak, {:.1} % of one core on average.",
            cpu / span * 100.0
        )?;
        let mut latencies: Vec<f64> = self.samples.iter().map(|s| s.healthz_ms).collect();
        latencies.sort_by(f64::total_cmp);
        let worst = self
            .samples
            .iter()
            .max_by(|a, b| a.healthz_ms.total_cmp(&b.healthz_ms));
        let failures: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| Some(format!("{} at {:.0} s", s.healthz_error.as_deref()?, s.t)))
            .collect();
        writeln!(
            f,
            "`/healthz`: {} checks, {}; latency median {:.1} ms, worst {:.1} ms{}.",
            self.samples.len(),
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
        match self.verdict() {
            Ok(()) => writeln!(
                f,
                "\n**Verdict: PASS** (flat: RSS growth from {base:.0} s to the end below {pct:.0} %, open fds growth below {FD_GROWTH_LIMIT}; \
                 every /healthz 200; the agent and the load ran throughout)"
            )?,
            Err(reasons) => writeln!(
                f,
                "\n**Verdict: FAIL**: {} (limits: RSS growth from {base:.0} s to the end below {pct:.0} %, open fds growth below {FD_GROWTH_LIMIT}, \
                 every /healthz 200, the agent and the load running throughout)",
                reasons.join("; ")
            )?,
        }

        writeln!(
            f,
            "\n## What the load did (agent counters since its start)\n"
        )?;
        writeln!(f, "| | |\n|---|---|")?;
        let c = |name: &str, matching: &[(&str, &str)]| self.counter(name, matching);
        writeln!(
            f,
            "| connections opened by `pgbench -C` | {} |",
            self.churned
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
            self.floods.started_root, self.floods.started_fuzz, self.floods.failed
        )?;
        const ADAPTER: &str = "poolscope_adapter_messages_total";
        let last = self.samples.iter().rev().find(|s| s.series.is_some());
        let reasons = last
            .map(|s| s.metrics.by_label(ADAPTER, "reason"))
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
        let late_from = self.late_at.as_secs_f64() + SAMPLE_EVERY.as_secs_f64();
        type Seen = fn(&Sample) -> (bool, bool);
        let pools: [(&str, f64, Seen); 2] = [
            (LEGIT_POOL, 0.0, |s| s.legit),
            (LATE_POOL, late_from, |s| s.late),
        ];
        for (pool, since, seen) in pools {
            let after: Vec<(bool, bool)> = self
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
        if let Some(last) = self.samples.iter().rev().find(|s| s.series.is_some()) {
            let families: Vec<String> = last
                .families
                .iter()
                .map(|(name, n)| format!("`{name}` {n}"))
                .collect();
            writeln!(
                f,
                "| largest /metrics families at the end (lines) | {} |",
                families.join(", ")
            )?;
        }
        let s = self.collector;
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
            self.agent_log_bytes as f64 / 1024.0
        )?;
        writeln!(
            f,
            "| SIGTERM to exit (collector down) | {:.2} s |",
            self.shutdown.as_secs_f64()
        )?;
        if !self.problems.is_empty() {
            writeln!(f, "\nProblems: {}", self.problems.join("; "))?;
        }

        writeln!(f, "\n## Samples\n")?;
        writeln!(
            f,
            "| t (s) | RSS (MiB) | fds | threads | CPU (s) | /healthz (ms) | series |"
        )?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|---:|")?;
        for s in self.samples {
            writeln!(
                f,
                "| {:.0} | {:.1} | {} | {} | {:.1} | {:.1}{} | {} |",
                s.t,
                s.rss_kb as f64 / 1024.0,
                s.fds,
                s.threads,
                s.cpu_s,
                s.healthz_ms,
                s.healthz_error
                    .as_deref()
                    .map(|e| format!(" {e}"))
                    .unwrap_or_default(),
                s.series.map_or_else(|| "?".to_string(), |n| n.to_string())
            )?;
        }
        Ok(())
    }
}
