//! `cargo xtask bench`: what the agent costs the programs it watches, and
//! the ones it does not, measured so that a noisy machine cannot fool it.
//!
//! Each workload runs in interleaved pairs (without the agent, with it; the
//! order flips every round), so that slow drifts of the machine hit both
//! sides alike. The headline figure is CPU time per operation of the
//! workload's own processes (servers and clients), read from a cgroup the
//! bench creates for them: it hardly depends on what else runs on the
//! machine, and with the agent it includes the kernel time of the agent's
//! BPF programs, which run inside those processes' system calls. The
//! throughput ratio is reported beside it. The agent runs in a cgroup of its
//! own, so its CPU time (all threads, user and system) is read the same way.

mod adapters;
pub(crate) mod cgroup;
pub(crate) mod prom;
mod report;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use self::cgroup::{command_in, Cgroup};
use super::{cargo, is_root, output, root, run, setup, target_dir};

/// The agent option that turns on BPF run-time statistics, which the
/// kernel table needs (`poolscope_probe_*`). Passed only when
/// `poolscope run --help` lists it; agents without it keep no statistics
/// or keep them always.
const PROBE_STATS_FLAG: &str = "--probe-stats";

/// pgbench's scale: 1,000,000 accounts (about 160 MB).
const PG_SCALE: &str = "10";
/// Statements (round trips) in one transaction of pgbench's built-in
/// simple-update script (-N): BEGIN, UPDATE, SELECT, INSERT, END.
const PG_WRITE_STATEMENTS: f64 = 5.0;
const REDIS_CLIENTS: &str = "20";
const REDIS_PIPELINE: &str = "16";
const SYSBENCH_TABLES: &str = "4";
const SYSBENCH_TABLE_SIZE: &str = "10000";
const DD_BLOCK_BYTES: u64 = 4096;
/// After a run, the agent gets at least this long to read the last events,
/// and more while it is still counting (see `drain`).
const DRAIN: Duration = Duration::from_millis(300);
/// The most a drain waits for an agent that is still catching up.
const DRAIN_MAX: Duration = Duration::from_secs(10);
/// The agents' adapter stream socket, in the bench's directory.
const STREAM_SOCKET: &str = "adapter-stream.sock";
/// The agents' adapter datagram socket, in the bench's directory.
const ADAPTER_SOCKET: &str = "adapter.sock";
/// The agent's count of round trips, per server port.
const OPERATION_COUNT: &str = "db_client_operation_duration_seconds_count";
/// After the agent is ready, its start-up work settles for this long.
const SETTLE: Duration = Duration::from_millis(500);
/// Upper bound on the agent's start (load, attach, first /healthz).
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum Group {
    /// PostgreSQL: pgbench -S and pgbench's simple-update write mix.
    Pg,
    /// MariaDB: sysbench oltp_read_only.
    Mysql,
    /// Redis: redis-benchmark GET/SET, plain and pipelined.
    Redis,
    /// Unrelated file and pipe I/O: fio and dd through a pipe.
    Io,
    /// The pool adapters (HikariCP, node pg, node mysql2): CPU per
    /// acquire+release and borrow/query/return throughput, adapter off/on.
    /// Not in the default set (about 10 minutes more): ask for it.
    Adapters,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Interleaved pairs (without, with the agent) per workload.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    duration: u32,
    /// Workload groups to run (comma-separated); all but `adapters` by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Group>,
    /// Workloads to run, by name as the report gives it (e.g. `--workload
    /// "pg select tls"`; repeatable): more rounds of one workload in the
    /// same time, against this machine's noise.
    #[arg(long = "workload", value_name = "NAME")]
    workloads: Vec<String>,
    /// Acquire+release pairs per run of the adapters group (after a
    /// warm-up of a quarter as many); its query runs last --duration.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(100..))]
    adapter_pairs: u64,
    /// Acquire+release pairs a second at most in the adapters group's pair
    /// runs (0: unpaced, which floods the agent and measures drops).
    #[arg(long, default_value_t = 20_000)]
    adapter_rate: u64,
    /// The pools the adapters group measures (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    adapter_pools: Vec<adapters::Pool>,
    /// The adapters group runs only its pair runs with the agent: adapter
    /// off, on without stacks, on (stacks sampled), on with a stack at
    /// every checkout.
    #[arg(long)]
    adapter_stacks_only: bool,
    /// Measure this agent binary instead of building target/release/poolscope.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Run the agent without BPF run-time statistics (no kernel table, and
    /// none of the statistics' own cost in the with-agent runs).
    #[arg(long)]
    no_probe_stats: bool,
    /// An extra `[kernel]` setting for the agent, as KEY=VALUE in TOML
    /// (e.g. `--kernel unix_sockets=false`); repeatable.
    #[arg(long = "kernel", value_name = "KEY=VALUE")]
    kernel_settings: Vec<String>,
    /// The cgroup hierarchy to read CPU time from; by default v1's cpuacct
    /// where it is mounted, else v2.
    #[arg(long, value_enum)]
    cgroup: Option<cgroup::Version>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    PgSelect,
    /// pgbench -S over TLS (the agent reads OpenSSL's plaintext).
    PgSelectTls,
    PgWrite,
    MysqlReadOnly,
    RedisGetSet,
    RedisPipelined,
    FioRandRw,
    DdPipe,
}

impl Workload {
    const ALL: [Workload; 8] = [
        Workload::PgSelect,
        Workload::PgSelectTls,
        Workload::PgWrite,
        Workload::MysqlReadOnly,
        Workload::RedisGetSet,
        Workload::RedisPipelined,
        Workload::FioRandRw,
        Workload::DdPipe,
    ];

    fn group(self) -> Group {
        match self {
            Workload::PgSelect | Workload::PgSelectTls | Workload::PgWrite => Group::Pg,
            Workload::MysqlReadOnly => Group::Mysql,
            Workload::RedisGetSet | Workload::RedisPipelined => Group::Redis,
            Workload::FioRandRw | Workload::DdPipe => Group::Io,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::PgSelect => "pg select",
            Workload::PgSelectTls => "pg select tls",
            Workload::PgWrite => "pg write",
            Workload::MysqlReadOnly => "mysql read-only",
            Workload::RedisGetSet => "redis get/set",
            Workload::RedisPipelined => "redis -P 16",
            Workload::FioRandRw => "fio file",
            Workload::DdPipe => "dd pipe",
        }
    }

    /// The command, and what one operation is.
    pub fn describe(self) -> &'static str {
        match self {
            Workload::PgSelect => "pgbench -n -S -c 4 -j 2 (TCP loopback; op = query)",
            Workload::PgSelectTls => {
                "pgbench -n -S -c 4 -j 2 with sslmode=require (TLS; the agent reads OpenSSL's \
                 plaintext; op = query)"
            }
            Workload::PgWrite => {
                "pgbench -n -N -c 4 -j 2, simple-update write mix (op = statement, 5 per transaction)"
            }
            Workload::MysqlReadOnly => {
                "sysbench oltp_read_only --threads=4, 4 tables of 10k rows, MariaDB (op = query)"
            }
            Workload::RedisGetSet => "redis-benchmark -t set,get -c 20 (op = request)",
            Workload::RedisPipelined => "redis-benchmark -t set,get -c 20 -P 16 (op = request)",
            Workload::FioRandRw => {
                "fio randrw 70/30, 4 KiB, psync, 64 MiB file on /dev/shm when it is a tmpfs (op = I/O)"
            }
            Workload::DdPipe => "dd if=/dev/zero bs=4k | cat > /dev/null, both on CPU 0 (op = 4 KiB block)",
        }
    }
}

/// What the workload's tool reported about one run.
pub(crate) struct ToolRun {
    pub(crate) ops: f64,
    secs: f64,
    /// Round trips by the tool's own count.
    expected: Option<f64>,
}

/// One measured run.
pub struct Run {
    pub workload: Workload,
    pub round: u32,
    pub ops: f64,
    pub secs: f64,
    /// CPU time of the workload's cgroup during the run.
    pub work_cpu_ns: f64,
    pub expected: Option<f64>,
    pub agent: Option<AgentSample>,
}

/// The agent's side of a with-agent run (deltas over the run).
pub struct AgentSample {
    pub cpu_ns: f64,
    /// Round trips the agent counted to the workload's server port.
    pub seen: Option<f64>,
    /// Per kernel program: (run time in seconds, runs).
    pub probes: BTreeMap<String, (f64, f64)>,
    pub dropped: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if !is_root() {
        bail!("the bench needs root (cgroups, and the agent loads BPF programs): run it with sudo");
    }
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.contains(&w.group()))
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name()))
        .collect();
    if workloads.is_empty() {
        let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        bail!(
            "no workload selected; the workloads are: {}",
            names.join(", ")
        );
    }

    let agent_bin = agent_binary(args.agent.as_deref())?;
    setup::ensure_bench_deps()?;
    let help = Command::new(&agent_bin)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("cannot run {}", agent_bin.display()))?;
    let help = String::from_utf8_lossy(&help.stdout);
    let mut agent_args = Vec::new();
    let probe_stats_note = if args.no_probe_stats {
        "off (--no-probe-stats)".to_string()
    } else if help.contains(PROBE_STATS_FLAG) {
        agent_args.push(PROBE_STATS_FLAG.to_string());
        format!("on ({PROBE_STATS_FLAG}; the statistics cost a little per program run)")
    } else {
        format!("the agent has no {PROBE_STATS_FLAG} option: passed nothing")
    };

    let adapter_settings = args
        .only
        .contains(&Group::Adapters)
        .then_some(adapters::Settings {
            rounds: args.rounds,
            pairs: args.adapter_pairs,
            seconds: args.duration,
            rate: args.adapter_rate,
            pools: if args.adapter_pools.is_empty() {
                adapters::Pool::ALL.to_vec()
            } else {
                args.adapter_pools.clone()
            },
            stacks_only: args.adapter_stacks_only,
        });
    let programs = match &adapter_settings {
        Some(_) => {
            let built = setup::ensure_adapter_bench_deps()?;
            run(cargo().args(["build", "--release", "-p", "poolscope-adapter-testapp"]))?;
            Some(adapters::Programs {
                java_classpath: built.testapp_classpath(),
                node_script: root()
                    .join("adapters")
                    .join("node")
                    .join("bench")
                    .join("pool_bench.js"),
                rust_bench: target_dir().join("release").join("pool_bench"),
                python: crate::setup::TEST_PYTHON.into(),
                python_script: root()
                    .join("adapters")
                    .join("python")
                    .join("bench")
                    .join("pool_bench.py"),
            })
        }
        None => None,
    };

    let hierarchy = cgroup::detect(args.cgroup)?;
    let per_run = f64::from(args.duration) + 1.5;
    let minutes = (f64::from(args.rounds) * workloads.len() as f64 * 2.0 * per_run + 60.0) / 60.0
        + adapter_settings
            .as_ref()
            .map_or(0.0, adapters::estimate_minutes);
    eprintln!(
        "bench: {} workloads x {} rounds x 2 runs of {} s{}, about {minutes:.0} min; {hierarchy}",
        workloads.len(),
        args.rounds,
        args.duration,
        if adapter_settings.is_some() {
            ", and the pool adapters"
        } else {
            ""
        }
    );

    let mut header = vec![
        (
            "date".to_string(),
            command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
        (
            "commit".to_string(),
            commit_description(args.agent.as_deref()),
        ),
        ("kernel".to_string(), command_line("uname", &["-srm"])),
        (
            "CPUs".to_string(),
            thread::available_parallelism().map_or_else(|_| "?".to_string(), |n| n.to_string()),
        ),
        ("cgroups".to_string(), hierarchy.to_string()),
        ("load average at start".to_string(), load_average()),
    ];

    let mut bench = Bench::start(
        &hierarchy,
        &workloads,
        &agent_bin,
        agent_args,
        &args.kernel_settings,
        args.duration,
        adapter_settings.is_some(),
    )?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=args.rounds {
        for &workload in &workloads {
            // Alternate which side goes first, so that neither always runs
            // on a machine warmed (or disturbed) by the other.
            let order = if round % 2 == 1 {
                [false, true]
            } else {
                [true, false]
            };
            let mut pair = Vec::new();
            for with_agent in order {
                let side = if with_agent { "with" } else { "without" };
                match bench.measure(workload, with_agent, round) {
                    Ok(r) => {
                        eprintln!("[{round}/{}] {}", args.rounds, progress_line(&r));
                        pair.push(r);
                    }
                    Err(e) => {
                        eprintln!(
                            "[{round}/{}] {} {side}: FAILED: {e:#}",
                            args.rounds,
                            workload.name()
                        );
                        failures.push(format!(
                            "round {round}, {} {side}: {}",
                            workload.name(),
                            format!("{e:#}").lines().next().unwrap_or_default()
                        ));
                    }
                }
            }
            // Only complete pairs are compared.
            if pair.len() == 2 {
                runs.extend(pair);
            }
        }
    }
    let (adapter_samples, adapter_failures) = match (&adapter_settings, &programs) {
        (Some(settings), Some(programs)) => adapters::run(&mut bench, programs, settings),
        _ => (Vec::new(), Vec::new()),
    };
    drop(bench);
    header.push(("load average at end".to_string(), load_average()));
    header.push((
        "runs".to_string(),
        format!(
            "{} rounds x {} s per side, interleaved (order flips every round)",
            args.rounds, args.duration
        ),
    ));
    header.push((
        "agent".to_string(),
        format!(
            "{} run, BPF run-time statistics {probe_stats_note}{}",
            agent_bin.display(),
            if args.kernel_settings.is_empty() {
                String::new()
            } else {
                format!(", [kernel] {}", args.kernel_settings.join(", "))
            }
        ),
    ));

    let (mut text, mut markdown) = if workloads.is_empty() {
        report::header_only(&header)
    } else {
        report::render(&header, &workloads, &runs, &failures)
    };
    if let Some(settings) = &adapter_settings {
        let (t, md) = adapters::render(&adapter_samples, &adapter_failures, settings);
        text.push_str(&t);
        markdown.push_str(&md);
    }
    println!("{text}");
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("report.md");
    fs::write(&path, markdown).with_context(|| format!("cannot write {}", path.display()))?;
    println!("markdown: {}", path.display());
    if !workloads.is_empty() && runs.is_empty() {
        bail!("no run pair completed ({} failures)", failures.len());
    }
    if adapter_settings.is_some() && adapter_samples.is_empty() {
        bail!(
            "no adapter run completed ({} failures)",
            adapter_failures.len()
        );
    }
    Ok(())
}

/// The agent to measure: the given binary, or the release build (built now).
pub(crate) fn agent_binary(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(path) => {
            fs::canonicalize(path).with_context(|| format!("no agent binary at {}", path.display()))
        }
        None => {
            setup::setup(false)?;
            run(cargo().args(["build", "--release", "-p", "poolscope"]))?;
            Ok(target_dir().join("release").join("poolscope"))
        }
    }
}

fn progress_line(r: &Run) -> String {
    let side = if r.agent.is_some() {
        "with   "
    } else {
        "without"
    };
    let mut line = format!(
        "{:<16} {side}: {:>9.0} ops/s, workload {:>7.2} us/op",
        r.workload.name(),
        r.ops / r.secs,
        r.work_cpu_ns / r.ops / 1e3
    );
    if let Some(a) = &r.agent {
        line.push_str(&format!(", agent {:.3} us/op", a.cpu_ns / r.ops / 1e3));
        if let (Some(seen), Some(expected)) = (a.seen, r.expected) {
            line.push_str(&format!(", counted {seen:.0}/{expected:.0}"));
        }
    }
    line
}

/// The servers, cgroups and files of one bench; dropping it stops and
/// removes everything. Fields drop in declaration order: servers first,
/// then the cgroups (which stop whatever is left in them), then the files.
struct Bench {
    pg: Option<Postgres>,
    mariadb: Option<MariaDb>,
    redis: Option<Redis>,
    work_cg: Cgroup,
    agent_cg: Cgroup,
    work: WorkDir,
    /// fio's file: on tmpfs (/dev/shm) where there is one, so that the runs
    /// measure system calls and page copies rather than a disk.
    scratch: Option<WorkDir>,
    agent_bin: PathBuf,
    agent_args: Vec<String>,
    agent_config: PathBuf,
    agent_starts: u32,
    duration: u32,
    /// redis-benchmark -n for about `duration` seconds: plain, pipelined.
    redis_requests: (u64, u64),
    /// dd's count for about `duration` seconds.
    dd_blocks: u64,
}

impl Bench {
    fn start(
        hierarchy: &cgroup::Hierarchy,
        workloads: &[Workload],
        agent_bin: &Path,
        agent_args: Vec<String>,
        kernel_settings: &[String],
        duration: u32,
        adapters: bool,
    ) -> Result<Bench> {
        let pid = std::process::id();
        let work = WorkDir::create(std::env::temp_dir().join(format!("poolscope-bench-{pid}")))?;
        let work_cg = Cgroup::create(hierarchy, &format!("poolscope-bench-{pid}-workload"))?;
        let agent_cg = Cgroup::create(hierarchy, &format!("poolscope-bench-{pid}-agent"))?;
        let scratch = if workloads.contains(&Workload::FioRandRw) && is_tmpfs("/dev/shm") {
            let dir = Path::new("/dev/shm").join(format!("poolscope-bench-{pid}"));
            Some(WorkDir::create(dir)?)
        } else {
            None
        };
        let mut dirs = vec![work.path()];
        dirs.extend(scratch.as_ref().map(WorkDir::path));
        cgroup::spawn_watchdog(pid, &[&work_cg, &agent_cg], &dirs)?;
        let agent_config = work.path().join("poolscope.toml");
        // A private adapter socket: another agent on this host keeps its own.
        let socket = work.path().join(ADAPTER_SOCKET);
        let stream = work.path().join(STREAM_SOCKET);
        let mut config = format!(
            "[adapter]\nsocket = {:?}\nstream_socket = {:?}\n",
            socket.display().to_string(),
            stream.display().to_string()
        );
        if !kernel_settings.is_empty() {
            config.push_str("\n[kernel]\n");
            for setting in kernel_settings {
                config.push_str(setting);
                config.push('\n');
            }
        }
        fs::write(&agent_config, config)
            .with_context(|| format!("cannot write {}", agent_config.display()))?;

        let wants = |group| workloads.iter().any(|w| w.group() == group);
        let pg = if wants(Group::Pg) {
            eprintln!("starting PostgreSQL (pgbench -i -s {PG_SCALE})");
            Some(Postgres::start(
                work.path(),
                &work_cg,
                Some(PG_SCALE),
                true,
            )?)
        } else if adapters {
            eprintln!("starting PostgreSQL");
            Some(Postgres::start(work.path(), &work_cg, None, false)?)
        } else {
            None
        };
        let mariadb = if wants(Group::Mysql) || adapters {
            eprintln!("starting MariaDB (sysbench prepare)");
            Some(MariaDb::start(work.path(), &work_cg)?)
        } else {
            None
        };
        let redis = if wants(Group::Redis) {
            eprintln!("starting Redis");
            Some(Redis::start(work.path(), &work_cg)?)
        } else {
            None
        };
        let mut bench = Bench {
            pg,
            mariadb,
            redis,
            work_cg,
            agent_cg,
            work,
            scratch,
            agent_bin: agent_bin.to_path_buf(),
            agent_args,
            agent_config,
            agent_starts: 0,
            duration,
            redis_requests: (0, 0),
            dd_blocks: 0,
        };
        bench.calibrate(workloads)?;
        Ok(bench)
    }

    /// Sizes the fixed-count workloads (redis-benchmark, dd) to last about
    /// one run's duration, from a short run of each without the agent; the
    /// others get a short warm-up run, so that the first pair does not pay
    /// for cold caches on one side only.
    fn calibrate(&mut self, workloads: &[Workload]) -> Result<()> {
        const WARM_UP_SECONDS: u32 = 2;
        if workloads.contains(&Workload::PgSelect) {
            self.pgbench("-S", 1.0, WARM_UP_SECONDS)?;
        }
        if workloads.contains(&Workload::PgSelectTls) {
            self.pgbench_tls(WARM_UP_SECONDS)?;
        }
        if workloads.contains(&Workload::PgWrite) {
            self.pgbench("-N", PG_WRITE_STATEMENTS, WARM_UP_SECONDS)?;
        }
        if workloads.contains(&Workload::MysqlReadOnly) {
            self.sysbench(WARM_UP_SECONDS)?;
        }
        let secs = f64::from(self.duration);
        let size = |rate: f64, min: u64| ((rate * secs) as u64).clamp(min, 2_000_000_000);
        if workloads.contains(&Workload::RedisGetSet) {
            let probe = self.redis_benchmark(20_000, false)?;
            // Both SET and GET run -n requests.
            self.redis_requests.0 = size(probe.ops / probe.secs / 2.0, 1_000);
        }
        if workloads.contains(&Workload::RedisPipelined) {
            let probe = self.redis_benchmark(200_000, true)?;
            self.redis_requests.1 = size(probe.ops / probe.secs / 2.0, 10_000);
        }
        if workloads.contains(&Workload::DdPipe) {
            let probe = self.dd(200_000)?;
            self.dd_blocks = size(probe.ops / probe.secs, 10_000);
        }
        if workloads.contains(&Workload::FioRandRw) {
            // Also lays out the file, so that no run pays for it.
            self.fio(WARM_UP_SECONDS)?;
        }
        Ok(())
    }

    fn server_port(&self, workload: Workload) -> Option<u16> {
        match workload.group() {
            Group::Pg => self.pg.as_ref().map(|s| s.port),
            Group::Mysql => self.mariadb.as_ref().map(|s| s.port),
            Group::Redis => self.redis.as_ref().map(|s| s.port),
            Group::Io | Group::Adapters => None,
        }
    }

    /// The agent's adapter stream socket (the adapters group's programs
    /// report to it).
    fn stream_socket(&self) -> PathBuf {
        self.work.path().join(STREAM_SOCKET)
    }

    /// The agent's adapter datagram socket (the Rust adapter's).
    fn adapter_socket(&self) -> PathBuf {
        self.work.path().join(ADAPTER_SOCKET)
    }

    fn measure(&mut self, workload: Workload, with_agent: bool, round: u32) -> Result<Run> {
        let port = self.server_port(workload);
        let mut agent = if with_agent {
            Some(self.start_agent()?)
        } else {
            None
        };
        let before = match &agent {
            Some(a) => Some((a.metrics()?, self.agent_cg.usage_ns()?)),
            None => None,
        };
        let w0 = self.work_cg.usage_ns()?;
        let tool = self.run_tool(workload)?;
        let w1 = self.work_cg.usage_ns()?;
        let sample = match (agent.as_mut(), before) {
            (Some(agent), Some((m0, a0))) => {
                let m1 = drain(agent, &m0, port, tool.expected)?;
                let a1 = self.agent_cg.usage_ns()?;
                agent.check_running()?;
                let (rss_kb, hwm_kb) = agent.memory_kb();
                Some(agent_sample(
                    &m0,
                    &m1,
                    a1.saturating_sub(a0),
                    port,
                    rss_kb,
                    hwm_kb,
                ))
            }
            _ => None,
        };
        drop(agent);
        if tool.ops <= 0.0 || tool.secs <= 0.0 {
            bail!("the tool reported no operations");
        }
        Ok(Run {
            workload,
            round,
            ops: tool.ops,
            secs: tool.secs,
            work_cpu_ns: w1.saturating_sub(w0) as f64,
            expected: tool.expected,
            agent: sample,
        })
    }

    fn run_tool(&self, workload: Workload) -> Result<ToolRun> {
        match workload {
            Workload::PgSelect => self.pgbench("-S", 1.0, self.duration),
            Workload::PgSelectTls => self.pgbench_tls(self.duration),
            Workload::PgWrite => self.pgbench("-N", PG_WRITE_STATEMENTS, self.duration),
            Workload::MysqlReadOnly => self.sysbench(self.duration),
            Workload::RedisGetSet => self.redis_benchmark(self.redis_requests.0, false),
            Workload::RedisPipelined => self.redis_benchmark(self.redis_requests.1, true),
            Workload::FioRandRw => self.fio(self.duration),
            Workload::DdPipe => self.dd(self.dd_blocks),
        }
    }

    /// Bound for one run of a tool: fixed-count tools may run slower than
    /// calibrated.
    fn run_limit(&self) -> Duration {
        Duration::from_secs(u64::from(self.duration) * 4 + 120)
    }

    fn pgbench(&self, script: &str, statements: f64, seconds: u32) -> Result<ToolRun> {
        self.pgbench_with(script, statements, seconds, "disable")
    }

    fn pgbench_tls(&self, seconds: u32) -> Result<ToolRun> {
        self.pgbench_with("-S", 1.0, seconds, "require")
    }

    /// pgbench with libpq's `sslmode` (the server has TLS on: plaintext
    /// runs say `disable`, since libpq would prefer TLS).
    fn pgbench_with(
        &self,
        script: &str,
        statements: f64,
        seconds: u32,
        sslmode: &str,
    ) -> Result<ToolRun> {
        let pg = self.pg.as_ref().context("PostgreSQL is not running")?;
        let (port, seconds) = (pg.port.to_string(), seconds.to_string());
        let mut cmd = command_in(&self.work_cg, pg.bin.join("pgbench"));
        cmd.env("PGSSLMODE", sslmode)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            // -n: no vacuum before the run, so that only the script's
            // statements go over the connections.
            .args(["-n", script, "-c", "4", "-j", "2", "-T", &seconds])
            .arg("postgres");
        let base = self.work.path().join("pgbench");
        let out = run_bounded(&mut cmd, &base, self.run_limit())?;
        parse_pgbench(&out, statements)
    }

    fn sysbench(&self, seconds: u32) -> Result<ToolRun> {
        let db = self.mariadb.as_ref().context("MariaDB is not running")?;
        let mut cmd = command_in(&self.work_cg, "sysbench");
        cmd.args(sysbench_args(db.port))
            .arg(format!("--time={seconds}"))
            .args(["--threads=4", "--report-interval=0", "run"]);
        let out = run_bounded(
            &mut cmd,
            &self.work.path().join("sysbench"),
            self.run_limit(),
        )?;
        parse_sysbench(&out)
    }

    fn redis_benchmark(&self, requests: u64, pipelined: bool) -> Result<ToolRun> {
        let redis = self.redis.as_ref().context("Redis is not running")?;
        let mut cmd = command_in(&self.work_cg, "redis-benchmark");
        cmd.args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
            .args([
                "-t",
                "set,get",
                "-c",
                REDIS_CLIENTS,
                "-n",
                &requests.to_string(),
                "--csv",
            ]);
        if pipelined {
            cmd.args(["-P", REDIS_PIPELINE]);
        }
        let out = run_bounded(
            &mut cmd,
            &self.work.path().join("redis-benchmark"),
            self.run_limit(),
        )?;
        parse_redis_benchmark(&out, requests)
    }

    fn fio(&self, seconds: u32) -> Result<ToolRun> {
        let dir = self.scratch.as_ref().unwrap_or(&self.work);
        let file = dir.path().join("fio.dat");
        let mut cmd = command_in(&self.work_cg, "fio");
        cmd.arg("--name=poolscope-bench")
            .arg(format!("--filename={}", file.display()))
            .args(["--size=64m", "--rw=randrw", "--rwmixread=70", "--bs=4k"])
            .args(["--ioengine=psync", "--numjobs=1", "--time_based"])
            // Keep the file in the page cache between runs.
            .arg("--invalidate=0")
            .arg(format!("--runtime={seconds}"))
            .arg("--output-format=json");
        let started = Instant::now();
        let out = run_bounded(&mut cmd, &self.work.path().join("fio"), self.run_limit())?;
        parse_fio(&out, started.elapsed())
    }

    fn dd(&self, blocks: u64) -> Result<ToolRun> {
        let mut cmd = command_in(&self.work_cg, "sh");
        // Writer and reader on one CPU, taking turns. Left to the scheduler,
        // or on two CPUs, they contend for the pipe's mutex (spinning on
        // it, measured with perf), and the CPU per block moved between 1.1
        // and 3.4 us from run to run with or without the agent; on one CPU
        // it stays within 3 % (about 1.9 us here).
        let pin = "taskset -c 0 ";
        cmd.arg("-c").arg(format!(
            "{pin}dd if=/dev/zero bs={DD_BLOCK_BYTES} count={blocks} status=none | {pin}cat > /dev/null"
        ));
        let started = Instant::now();
        run_bounded(&mut cmd, &self.work.path().join("dd"), self.run_limit())?;
        Ok(ToolRun {
            ops: blocks as f64,
            secs: started.elapsed().as_secs_f64(),
            expected: None,
        })
    }

    /// Starts a fresh agent and waits until it is ready; a second and
    /// third try cover a listen port taken between choosing and binding it.
    fn start_agent(&mut self) -> Result<Agent> {
        let mut last_error = None;
        for _ in 0..3 {
            match self.try_start_agent() {
                Ok(agent) => {
                    thread::sleep(SETTLE);
                    return Ok(agent);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
    }

    fn try_start_agent(&mut self) -> Result<Agent> {
        self.agent_starts += 1;
        let log = self
            .work
            .path()
            .join(format!("agent-{}.log", self.agent_starts));
        Agent::start(
            &self.agent_cg,
            &self.agent_bin,
            &self.agent_config,
            &self.agent_args,
            log,
        )
    }
}

/// Deltas of the agent's own counters over a run.
/// Waits until the agent has read what the run left in the ring buffer:
/// it has counted the tool's operations, or its count stopped growing for
/// `DRAIN`. A saturated 2-core machine can leave it a fraction of a second
/// behind when the tool stops; measuring then would miss both operations
/// and the agent CPU they cost. Returns the metrics at the end.
fn drain(
    agent: &Agent,
    m0: &prom::Metrics,
    port: Option<u16>,
    expected: Option<f64>,
) -> Result<prom::Metrics> {
    let started = Instant::now();
    let Some(port) = port else {
        thread::sleep(DRAIN);
        return agent.metrics();
    };
    let port = port.to_string();
    let counted = |m: &prom::Metrics| {
        let matching = [("server_port", port.as_str())];
        m.sum(OPERATION_COUNT, &matching) - m0.sum(OPERATION_COUNT, &matching)
    };
    let (mut last, mut still_since) = (f64::NAN, Instant::now());
    loop {
        thread::sleep(Duration::from_millis(100));
        let m = agent.metrics()?;
        let seen = counted(&m);
        if seen != last {
            (last, still_since) = (seen, Instant::now());
        }
        let done = expected.is_some_and(|e| seen >= e) && started.elapsed() >= DRAIN;
        if done || still_since.elapsed() >= DRAIN || started.elapsed() >= DRAIN_MAX {
            return Ok(m);
        }
    }
}

fn agent_sample(
    m0: &prom::Metrics,
    m1: &prom::Metrics,
    cpu_ns: u64,
    port: Option<u16>,
    rss_kb: u64,
    hwm_kb: u64,
) -> AgentSample {
    const RUN_TIME: &str = "poolscope_probe_run_time_seconds_total";
    const RUNS: &str = "poolscope_probe_runs_total";
    const DROPPED: &str = "poolscope_kernel_events_dropped_total";
    let seen = port.map(|port| {
        let port = port.to_string();
        let matching = [("server_port", port.as_str())];
        m1.sum(OPERATION_COUNT, &matching) - m0.sum(OPERATION_COUNT, &matching)
    });
    let (t0, t1) = (
        m0.by_label(RUN_TIME, "probe"),
        m1.by_label(RUN_TIME, "probe"),
    );
    let (r0, r1) = (m0.by_label(RUNS, "probe"), m1.by_label(RUNS, "probe"));
    let probes = t1
        .iter()
        .map(|(probe, &time)| {
            let dt = time - t0.get(probe).copied().unwrap_or(0.0);
            let dr = r1.get(probe).copied().unwrap_or(0.0) - r0.get(probe).copied().unwrap_or(0.0);
            (probe.clone(), (dt, dr))
        })
        .collect();
    AgentSample {
        cpu_ns: cpu_ns as f64,
        seen,
        probes,
        dropped: m1.sum(DROPPED, &[]) - m0.sum(DROPPED, &[]),
        rss_kb,
        hwm_kb,
    }
}

// ---------------------------------------------------------------------------
// Tool output
// ---------------------------------------------------------------------------

/// "number of transactions actually processed: N" and "tps = X (without
/// initial connection time)".
pub(crate) fn parse_pgbench(out: &str, statements: f64) -> Result<ToolRun> {
    let txns: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .with_context(|| format!("no transaction count in pgbench's output:\n{out}"))?;
    let tps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no tps in pgbench's output:\n{out}"))?;
    let ops = txns * statements;
    Ok(ToolRun {
        ops,
        secs: txns / tps,
        expected: Some(ops),
    })
}

/// "queries:   160000 (15975.39 per sec.)" and "total time:   10.0012s".
fn parse_sysbench(out: &str) -> Result<ToolRun> {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .map(str::trim)
    };
    let queries: f64 = field("queries:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no query count in sysbench's output:\n{out}"))?;
    let secs: f64 = field("total time:")
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .with_context(|| format!("no total time in sysbench's output:\n{out}"))?;
    Ok(ToolRun {
        ops: queries,
        secs,
        expected: Some(queries),
    })
}

/// `--csv`: `"SET","98039.22",...` and `"GET",...`, each run `requests` times.
fn parse_redis_benchmark(out: &str, requests: u64) -> Result<ToolRun> {
    let rate = |test: &str| -> Result<f64> {
        let prefix = format!("\"{test}\",\"");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split('"').next()?.parse().ok())
            .filter(|rps: &f64| *rps > 0.0)
            .with_context(|| format!("no {test} rate in redis-benchmark's output:\n{out}"))
    };
    let n = requests as f64;
    Ok(ToolRun {
        ops: 2.0 * n,
        secs: n / rate("SET")? + n / rate("GET")?,
        expected: Some(2.0 * n),
    })
}

/// fio's JSON: the job's read and write `total_ios` and `job_runtime` (ms).
fn parse_fio(out: &str, wall: Duration) -> Result<ToolRun> {
    // fio may print notes before the JSON document.
    let start = out.find('{').context("fio printed no JSON")?;
    let doc: serde_json::Value =
        serde_json::from_str(&out[start..]).context("fio's JSON output does not parse")?;
    let job = &doc["jobs"][0];
    let ios = |dir: &str| job[dir]["total_ios"].as_f64().unwrap_or(0.0);
    let ops = ios("read") + ios("write");
    let secs = job["job_runtime"]
        .as_f64()
        .filter(|ms| *ms > 0.0)
        .map_or(wall.as_secs_f64(), |ms| ms / 1e3);
    Ok(ToolRun {
        ops,
        secs,
        expected: None,
    })
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// A throwaway PostgreSQL cluster (the newest installed) on loopback, its
/// postmaster started inside the workload cgroup.
pub(crate) struct Postgres {
    pub(crate) bin: PathBuf,
    dir: PathBuf,
    /// The data directory, as an argument.
    data: String,
    pub(crate) port: u16,
}

impl Postgres {
    /// With `init_scale`, pgbench's tables are created at that scale; with
    /// `tls`, the server also takes TLS, with a self-signed certificate.
    pub(crate) fn start(
        work: &Path,
        cg: &Cgroup,
        init_scale: Option<&str>,
        tls: bool,
    ) -> Result<Postgres> {
        let bin = postgres_bin_dir()?;
        let dir = work.join("pg");
        make_dir(&dir, Some("postgres"))?;
        let data = utf8(&dir.join("data"))?;
        let mut pg = Postgres {
            bin,
            dir,
            data,
            port: 0,
        };
        let data = pg.data.clone();
        pg.run_as_postgres(
            None,
            "initdb",
            &["-A", "trust", "-U", "postgres", "--no-sync", "--no-locale"],
            &["-E", "UTF8", "-D", &data],
        )?;
        let log = utf8(&pg.dir.join("postgres.log"))?;
        let tls_options = if tls {
            pg.make_certificate()?;
            " -c ssl=on"
        } else {
            ""
        };
        let mut last_error = None;
        // The free port may be taken before the server binds it.
        for _ in 0..3 {
            let port = free_port()?;
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50 \
                 -c fsync=off -c full_page_writes=off{tls_options}",
                pg.dir.display()
            );
            let started = pg.run_as_postgres(
                Some(cg),
                "pg_ctl",
                &["-D", &data, "-l", &log, "-w", "-t", "60"],
                &["-o", &options, "start"],
            );
            match started {
                Ok(()) => {
                    pg.port = port;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if pg.port == 0 {
            let e = last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt"));
            return Err(e.context(format!(
                "cannot start PostgreSQL; its log:\n{}",
                tail(Path::new(&log), 20)
            )));
        }
        let postmaster: u32 = fs::read_to_string(Path::new(&data).join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .context("no pid in postmaster.pid")?;
        ensure_in_cgroup(cg, postmaster, "postgres")?;
        let Some(scale) = init_scale else {
            return Ok(pg);
        };
        let mut init = Command::new(pg.bin.join("pgbench"));
        init.args(["-i", "-q", "-s", scale, "-h"])
            .arg(&pg.dir)
            .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"]);
        let base = pg.dir.join("pgbench-init");
        run_bounded(&mut init, &base, Duration::from_secs(600))?;
        Ok(pg)
    }

    /// A self-signed certificate and its key in the data directory, where
    /// `ssl = on` looks for them (`server.crt`, `server.key`, 0600 and the
    /// server's own).
    fn make_certificate(&self) -> Result<()> {
        let data = Path::new(&self.data);
        let (crt, key) = (data.join("server.crt"), data.join("server.key"));
        let status = Command::new("openssl")
            .args([
                "req",
                "-new",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run openssl to make PostgreSQL's certificate")?;
        if !status.success() {
            bail!("openssl req failed ({status}) making PostgreSQL's certificate");
        }
        for file in [&crt, &key] {
            run(Command::new("chown").arg("postgres").arg(file))?;
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", key.display()))
    }

    /// Runs one of the server's tools as `postgres` (initdb refuses root),
    /// inside `cg` if given; the arguments come in two slices only to keep
    /// the calls short.
    fn run_as_postgres(
        &self,
        cg: Option<&Cgroup>,
        tool: &str,
        args: &[&str],
        more: &[&str],
    ) -> Result<()> {
        let mut cmd = match cg {
            Some(cg) => command_in(cg, "runuser"),
            None => Command::new("runuser"),
        };
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .args(more)
            .current_dir(&self.dir);
        run_bounded(&mut cmd, &self.dir.join(tool), Duration::from_secs(300)).map(drop)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.port != 0 {
            let data = self.data.clone();
            let stop = ["-D", &data, "-m", "immediate", "-w", "stop"];
            let _ = self.run_as_postgres(None, "pg_ctl", &stop, &[]);
        }
    }
}

pub(crate) fn utf8(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The `bin` directory of the newest PostgreSQL under /usr/lib/postgresql.
fn postgres_bin_dir() -> Result<PathBuf> {
    let entries = fs::read_dir("/usr/lib/postgresql").context("no /usr/lib/postgresql")?;
    entries
        .filter_map(|e| {
            let entry = e.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .context("no PostgreSQL server in /usr/lib/postgresql/*/bin")
}

/// A throwaway MariaDB on loopback with the sysbench tables, started inside
/// the workload cgroup; its Unix socket and tmpdir stay in its directory.
struct MariaDb {
    server: Server,
    port: u16,
    dir: PathBuf,
}

impl MariaDb {
    const USER: &'static str = "bench";
    const DATABASE: &'static str = "sbtest";

    fn start(work: &Path, cg: &Cgroup) -> Result<MariaDb> {
        let dir = work.join("mariadb");
        make_dir(&dir, Some("mysql"))?;
        let tmp = dir.join("tmp");
        make_dir(&tmp, Some("mysql"))?;
        let data = dir.join("data");
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg("--user=mysql")
            .current_dir(&dir);
        run_bounded(&mut install, &dir.join("install"), Duration::from_secs(300))?;
        let mariadbd = ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .context("no /usr/sbin/mariadbd")?;
        let log = dir.join("mariadbd.log");
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = command_in(cg, mariadbd);
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--tmpdir={}", tmp.display()))
                .arg(format!("--port={port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--socket={}", dir.join("mysql.sock").display()))
                .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
                .args([
                    "--user=mysql",
                    "--skip-name-resolve",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=64M",
                    "--innodb-flush-log-at-trx-commit=0",
                    "--max-connections=50",
                ])
                .current_dir(&dir);
            let mut server = Server::spawn(&mut cmd, &log, "mariadbd")?;
            if !server.wait_listening(port, Duration::from_secs(60)) {
                continue;
            }
            let db = MariaDb { server, port, dir };
            let socket = db.dir.join("mysql.sock");
            wait_for(Duration::from_secs(30), || socket.exists())
                .with_context(|| format!("MariaDB made no socket; its log:\n{}", tail(&log, 20)))?;
            ensure_in_cgroup(cg, db.server.child.id(), "mariadbd")?;
            db.sql(&format!(
                "CREATE DATABASE {d}; CREATE USER '{u}'@'%' IDENTIFIED BY ''; \
                 GRANT ALL PRIVILEGES ON *.* TO '{u}'@'%'",
                d = Self::DATABASE,
                u = Self::USER
            ))?;
            let mut prepare = Command::new("sysbench");
            prepare.args(sysbench_args(db.port)).arg("prepare");
            run_bounded(
                &mut prepare,
                &db.dir.join("prepare"),
                Duration::from_secs(600),
            )?;
            return Ok(db);
        }
        bail!(
            "cannot start MariaDB on a free port; its log:\n{}",
            tail(&log, 20)
        )
    }

    fn sql(&self, sql: &str) -> Result<()> {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.join("mysql.sock").display()
            ))
            .args(["--user=root", "--batch", "-e", sql]);
        run_bounded(&mut cmd, &self.dir.join("sql"), Duration::from_secs(60)).map(drop)
    }
}

fn sysbench_args(port: u16) -> Vec<String> {
    [
        "oltp_read_only",
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        &format!("--mysql-port={port}"),
        &format!("--mysql-user={}", MariaDb::USER),
        "--mysql-password=",
        &format!("--mysql-db={}", MariaDb::DATABASE),
        &format!("--tables={SYSBENCH_TABLES}"),
        &format!("--table-size={SYSBENCH_TABLE_SIZE}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A throwaway Redis on loopback without persistence, inside the cgroup.
struct Redis {
    _server: Server,
    port: u16,
}

impl Redis {
    fn start(work: &Path, cg: &Cgroup) -> Result<Redis> {
        let dir = work.join("redis");
        make_dir(&dir, None)?;
        let log = dir.join("redis.log");
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = command_in(cg, "redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&dir)
                .current_dir(&dir);
            let mut server = Server::spawn(&mut cmd, &log, "redis-server")?;
            if server.wait_listening(port, Duration::from_secs(30)) {
                ensure_in_cgroup(cg, server.child.id(), "redis-server")?;
                return Ok(Redis {
                    _server: server,
                    port,
                });
            }
        }
        bail!(
            "cannot start redis-server on a free port; its log:\n{}",
            tail(&log, 20)
        )
    }
}

/// A server child (the cgroup wrapper execs it, so the pid is the
/// server's); killed and reaped on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
}

impl Server {
    pub(crate) fn spawn(cmd: &mut Command, log: &Path, name: &str) -> Result<Server> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Server { child })
    }

    /// Until it listens on 127.0.0.1:`port`; false if it exited first.
    fn wait_listening(&mut self, port: u16, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if tcp_listening(port) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn ensure_in_cgroup(cg: &Cgroup, pid: u32, name: &str) -> Result<()> {
    if cg.pids().contains(&pid) {
        Ok(())
    } else {
        bail!(
            "{name} (pid {pid}) is not in the workload cgroup {}: something moved it",
            cg.dir().display()
        )
    }
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

/// A running agent; SIGTERM (then SIGKILL) and reaped on drop.
pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    log: PathBuf,
}

impl Agent {
    /// Starts `bin run` inside `cg` on a free loopback port with `config`
    /// (and nothing from the environment), its output in `log`, and waits
    /// until it is ready.
    pub(crate) fn start(
        cg: &Cgroup,
        bin: &Path,
        config: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Agent> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command_in(cg, bin)
            .args(["run", "--listen", &addr.to_string(), "--config"])
            .arg(config)
            .args(args)
            .env_remove("POOLSCOPE_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut agent = Agent { child, addr, log };
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Until /healthz answers and the agent holds attached BPF links or
    /// perf events (its kernel probes), within [`AGENT_READY_TIMEOUT`].
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            self.check_running()?;
            // Connect only once the port listens: a refused connect would
            // show in every other agent running on this host.
            let healthy = tcp_listening(self.addr.port())
                && http_get(self.addr, "/healthz").is_ok_and(|body| body.trim() == "ok");
            if healthy && attached_hooks(self.child.id()) > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent was not ready (healthz and attached probes) within {} s; its log:\n{}",
                    AGENT_READY_TIMEOUT.as_secs(),
                    tail(&self.log, 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "the agent exited ({status}); its log:\n{}",
                tail(&self.log, 20)
            ),
            Err(e) => Err(e).context("cannot check on the agent"),
        }
    }

    pub(crate) fn metrics(&self) -> Result<prom::Metrics> {
        Ok(prom::Metrics::parse(&http_get(self.addr, "/metrics")?))
    }

    /// (VmRSS, VmHWM) in KiB.
    pub(crate) fn memory_kb(&self) -> (u64, u64) {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            cgroup::signal("TERM", &[self.child.id()]);
            let stopped = wait_for(Duration::from_secs(10), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            });
            if stopped.is_err() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// File descriptors of `pid` that hold attached BPF programs.
fn attached_hooks(pid: u32) -> usize {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| {
            let target = target.to_string_lossy();
            target.contains("bpf_link") || target.contains("[perf_event]")
        })
        .count()
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The bench's directory under /tmp; removed on drop.
pub(crate) struct WorkDir(PathBuf);

impl WorkDir {
    pub(crate) fn create(path: PathBuf) -> Result<WorkDir> {
        make_dir(&path, None)?;
        Ok(WorkDir(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A directory others can traverse (mode 0755), owned by `owner` if given.
fn make_dir(path: &Path, owner: Option<&str>) -> Result<()> {
    fs::create_dir(path).with_context(|| format!("cannot create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    if let Some(owner) = owner {
        run(Command::new("chown").arg(owner).arg(path))?;
    }
    Ok(())
}

/// Runs `cmd` to completion within `limit` (killed after it), its stdout in
/// `<base>.out` and stderr in `<base>.err`; returns stdout.
fn run_bounded(cmd: &mut Command, base: &Path, limit: Duration) -> Result<String> {
    let out_path = base.with_extension("out");
    let err_path = base.with_extension("err");
    let out =
        File::create(&out_path).with_context(|| format!("cannot create {}", out_path.display()))?;
    let err =
        File::create(&err_path).with_context(|| format!("cannot create {}", err_path.display()))?;
    let what = super::describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "{what} exited with {status}:\n{}{}",
            tail(&err_path, 15),
            tail(&out_path, 15)
        );
    }
    Ok(stdout)
}

/// Polls `done` every 50 ms until it holds or `limit` passes.
pub(crate) fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The last `lines` lines of a file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// Whether `path` is a tmpfs mount point, from /proc/self/mounts.
fn is_tmpfs(path: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&path) && fields.get(2) == Some(&"tmpfs")
        })
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether some socket listens on TCP `port` (IPv4), from /proc/net/tcp.
fn tcp_listening(port: u16) -> bool {
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // st 0A = LISTEN
        fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "0A"
    })
}

/// A plain HTTP/1.0 GET (the response then has no chunked framing), with
/// timeouts; the body of a 200 answer.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream
        .take(64 << 20)
        .read_to_end(&mut response)
        .with_context(|| format!("GET {path}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no HTTP header"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path}: {status}");
    }
    Ok(body.to_string())
}

pub(crate) fn command_line(program: &str, args: &[&str]) -> String {
    output(Command::new(program).args(args))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".to_string())
}

/// /proc/loadavg's 1, 5 and 15 minute averages (what `uptime` prints).
pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "?".to_string())
}

/// The short commit, and whether the agent was built with uncommitted
/// changes to its sources (a shared working tree often has some).
pub(crate) fn commit_description(agent: Option<&Path>) -> String {
    let root = root();
    let commit =
        output(
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(["rev-parse", "--short", "HEAD"]),
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".to_string());
    if let Some(agent) = agent {
        return format!("{commit} (agent binary given: {})", agent.display());
    }
    let sources = [
        "agent",
        "agent-ebpf",
        "agent-common",
        "Cargo.toml",
        "Cargo.lock",
    ];
    let dirty = output(
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["status", "--porcelain", "--"])
            .args(sources),
    )
    .is_some_and(|s| !s.trim().is_empty());
    if dirty {
        format!("{commit}, agent built with uncommitted changes in its sources")
    } else {
        commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench() {
        let out = "transaction type: <builtin: select only>\n\
                   number of transactions actually processed: 100000\n\
                   latency average = 0.4 ms\n\
                   tps = 10000.5 (without initial connection time)\n";
        let run = parse_pgbench(out, 5.0).expect("parses");
        assert_eq!(run.ops, 500_000.0);
        assert!((run.secs - 100_000.0 / 10000.5).abs() < 1e-9);
        assert_eq!(run.expected, Some(500_000.0));
    }

    #[test]
    fn reads_sysbench() {
        let out = "SQL statistics:\n    queries performed:\n        total:   160000\n\
                   \x20   transactions:                        10000  (998.46 per sec.)\n\
                   \x20   queries:                             160000 (15975.39 per sec.)\n\
                   General statistics:\n    total time:                          10.0012s\n";
        let run = parse_sysbench(out).expect("parses");
        assert_eq!(run.ops, 160_000.0);
        assert!((run.secs - 10.0012).abs() < 1e-9);
    }

    #[test]
    fn reads_redis_benchmark() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\"\n\
                   \"SET\",\"50000.00\",\"0.3\"\n\"GET\",\"100000.00\",\"0.2\"\n";
        let run = parse_redis_benchmark(out, 100_000).expect("parses");
        assert_eq!(run.ops, 200_000.0);
        assert!((run.secs - 3.0).abs() < 1e-9);
        assert!(parse_redis_benchmark("\"SET\",\"1\"\n", 1).is_err());
    }

    #[test]
    fn reads_fio() {
        let out = "note: both iodepth >= 1 and synchronous I/O engine\n{\"jobs\": [{\"job_runtime\": 2000, \
                   \"read\": {\"total_ios\": 700}, \"write\": {\"total_ios\": 300}}]}";
        let run = parse_fio(out, Duration::from_secs(3)).expect("parses");
        assert_eq!(run.ops, 1000.0);
        assert_eq!(run.secs, 2.0);
    }
}
