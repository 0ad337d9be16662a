//! `cargo xtask bench --only adapters`: what the pool adapters cost the
//! application that loads them (issue 12, item 5).
//!
//! For each pool (HikariCP on pgjdbc; node-postgres; mysql2; bb8), a small
//! program (adapters/java/testapp `PoolBench`, adapters/node/bench
//! `pool_bench.js`, adapters/rust/testapp `pool_bench`) runs one
//! single-threaded loop on a real pool against
//! the bench's PostgreSQL or MariaDB and prints its own CPU time (the
//! whole process: all threads, so the adapter's writer, GC and JIT count)
//! and wall time:
//!
//! - `pairs`: N acquire+release pairs, no query; adapter off and on, agent
//!   absent and present: the CPU per pair the adapter adds (target: at
//!   most 2 us);
//! - `query`: acquire, `SELECT 1`, release for `--duration` seconds,
//!   adapter off and on, agent running: the throughput ratio (target:
//!   at least 0.98).
//!
//! "Adapter off" is the same program and loop without the `instrument`
//! call. Every configuration is a fresh process (and a fresh agent when
//! the agent is present); within a round a pool's configurations run in one
//! order, in the next round in the reverse order (A,B,C,D,D,C,B,A...), and
//! on/off are compared within each round.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

use super::{
    cgroup::command_in,
    report::{us, Spread, Table},
    run_bounded, Bench,
};

/// Target: the CPU the adapter adds to one acquire+release pair.
pub const MAX_ADDED_NS_PER_PAIR: f64 = 2000.0;
/// Target: the CPU holder stacks add to one acquire+release pair (issue 14).
pub const MAX_STACK_NS_PER_PAIR: f64 = 5000.0;
/// Target: borrow/query/return throughput with the adapter over without.
pub const MIN_THROUGHPUT_RATIO: f64 = 0.98;
/// The most one program run may take (JVM start, pool fill, warm-up, loop).
const RUN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Pool {
    /// HikariCP on pgjdbc.
    #[value(name = "java")]
    Hikari,
    /// node-postgres.
    NodePg,
    /// mysql2.
    NodeMysql2,
    /// bb8 (tokio-postgres).
    RustBb8,
    /// sqlx (PostgreSQL).
    RustSqlx,
    /// A hand-rolled pool on the generic reporter, its connections named
    /// by ids that the agent binds to their sockets.
    RustIds,
    /// psycopg_pool (PostgreSQL): holder stacks' cost only.
    PythonPsycopg,
}

impl Pool {
    pub const ALL: [Pool; 7] = [
        Pool::Hikari,
        Pool::NodePg,
        Pool::NodeMysql2,
        Pool::RustBb8,
        Pool::RustSqlx,
        Pool::RustIds,
        Pool::PythonPsycopg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pool::Hikari => "java HikariCP",
            Pool::NodePg => "node pg",
            Pool::NodeMysql2 => "node mysql2",
            Pool::RustBb8 => "rust bb8",
            Pool::RustSqlx => "rust sqlx",
            Pool::RustIds => "rust ids",
            Pool::PythonPsycopg => "python psycopg_pool",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Pool::Hikari => {
                "HikariCP (Debian's 2.7.9) + pgjdbc against PostgreSQL, pool of 4, \
                 Poolscope.instrument(config) vs new HikariDataSource(config); \
                 java -XX:+UseSerialGC -Xmx256m"
            }
            Pool::NodePg => "pg.Pool (max 4) against PostgreSQL, connect()/release(), instrument(pool) or not",
            Pool::NodeMysql2 => {
                "mysql2/promise createPool (connectionLimit 4) against MariaDB, getConnection()/release(), \
                 instrument(pool) or not"
            }
            Pool::RustBb8 => {
                "bb8 (max 4, tokio-postgres) against PostgreSQL on a current-thread tokio runtime, \
                 InstrumentedPool::get() vs the bb8 pool beneath (no reporting)"
            }
            Pool::RustSqlx => {
                "sqlx PgPool (max 4, test_before_acquire off) against PostgreSQL on a current-thread \
                 tokio runtime, InstrumentedPool::acquire() vs the sqlx pool beneath (no reporting)"
            }
            Pool::RustIds => {
                "a hand-rolled pool of 4 tokio-postgres clients on the generic PoolReporter, each \
                 named by an id alone (connection_created_here after connecting it, so that the agent \
                 binds it to its socket), current-thread tokio runtime; off: a disabled reporter"
            }
            Pool::PythonPsycopg => {
                "psycopg_pool ConnectionPool (4, psycopg 3) against PostgreSQL, getconn()/putconn() \
                 20 frames below the program's top, instrument_psycopg_pool; holder stacks on and off \
                 only (the Python adapter sends a datagram per message and has no pair target)"
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Acquire+release pairs, no query.
    Pairs,
    /// Acquire, SELECT 1, release.
    Query,
    /// The query loop over a plain and an instrumented pool in one
    /// process, in alternating slices: one run gives both `Query` samples
    /// of a round.
    QueryAb,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Config {
    pub pool: Pool,
    pub mode: Mode,
    pub adapter: bool,
    pub agent: bool,
    /// Holder stacks: the adapters' default, off, or captured at every
    /// checkout.
    pub stacks: Stacks,
}

/// How the adapter captures holder stacks in a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stacks {
    /// The default: at most one capture per millisecond in the process.
    Sampled,
    /// `POOLSCOPE_ADAPTER_STACKS=off`.
    Off,
    /// `POOLSCOPE_ADAPTER_STACK_INTERVAL_US=0`: what one capture costs.
    Every,
}

impl Config {
    fn label(&self) -> String {
        format!(
            "{} {}, adapter {}, agent {}",
            self.pool.name(),
            match self.mode {
                Mode::Pairs => "pairs",
                Mode::Query => "query",
                Mode::QueryAb => "query A/B",
            },
            match (self.adapter, self.stacks) {
                (false, _) => "off",
                (true, Stacks::Sampled) => "on",
                (true, Stacks::Off) => "on without stacks",
                (true, Stacks::Every) => "on, a stack at every checkout",
            },
            if self.agent { "present" } else { "absent" },
        )
    }
}

/// A pool's configurations, in the order of odd rounds.
pub fn configs(pool: Pool) -> Vec<Config> {
    let c = |mode, adapter, agent| Config {
        pool,
        mode,
        adapter,
        agent,
        stacks: Stacks::Sampled,
    };
    // With the agent: an adapter that finds none (the JVM's) captures no
    // stacks, having nowhere to send them.
    let stacks = |stacks| Config {
        stacks,
        ..c(Mode::Pairs, true, true)
    };
    if pool == Pool::PythonPsycopg {
        return vec![
            stacks(Stacks::Off),
            stacks(Stacks::Sampled),
            stacks(Stacks::Every),
        ];
    }
    vec![
        c(Mode::Pairs, false, false),
        c(Mode::Pairs, true, false),
        c(Mode::Pairs, false, true),
        stacks(Stacks::Off),
        stacks(Stacks::Sampled),
        stacks(Stacks::Every),
        c(Mode::QueryAb, true, true),
    ]
}

/// The pair runs with the agent only: adapter off, and on with each way
/// of capturing stacks (`--adapter-stacks-only`).
pub fn stack_configs(pool: Pool) -> Vec<Config> {
    configs(pool)
        .into_iter()
        .filter(|c| c.mode == Mode::Pairs && c.agent)
        .collect()
}

/// Odd rounds run `configs` as given, even rounds in reverse, so that
/// neither side of a comparison always runs first (A,B,B,A).
pub fn round_order(configs: &[Config], round: u32) -> Vec<Config> {
    let mut order = configs.to_vec();
    if round.is_multiple_of(2) {
        order.reverse();
    }
    order
}

/// One program run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub config: Config,
    pub round: u32,
    pub ops: f64,
    pub cpu_ns: f64,
    pub wall_ns: f64,
    /// The adapter's messages sent and dropped during the loop (adapter on).
    pub sent: Option<f64>,
    pub dropped: Option<f64>,
    /// Whether the adapter was connected to the agent at the end.
    pub connected: Option<bool>,
    /// With the agent and the adapter: messages sent over the whole run
    /// (warm-up included), and the agent's CPU over the same run.
    pub sent_total: Option<f64>,
    pub agent_cpu_ns: Option<f64>,
}

/// The program's last stdout line: `{"ops":..,"cpu_ns":..,"wall_ns":..}`,
/// with `sent` and `dropped` when the adapter is on; for an A/B run
/// `{"ab":[plain side, instrumented side]}`, which gives the round's two
/// `Query` samples.
pub fn parse_output(config: Config, round: u32, out: &str) -> Result<Vec<Sample>> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("no JSON line in the program's output:\n{out}"))?;
    let doc: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
    if config.mode != Mode::QueryAb {
        return Ok(vec![sample_of(config, round, &doc, line)?]);
    }
    let sides = doc["ab"]
        .as_array()
        .filter(|sides| sides.len() == 2)
        .with_context(|| format!("no two A/B sides in {line}"))?;
    sides
        .iter()
        .zip([false, true])
        .map(|(side, adapter)| {
            let config = Config {
                mode: Mode::Query,
                adapter,
                ..config
            };
            sample_of(config, round, side, line)
        })
        .collect()
}

fn sample_of(config: Config, round: u32, doc: &serde_json::Value, line: &str) -> Result<Sample> {
    let num = |k: &str| doc[k].as_f64();
    let field = |k: &str| num(k).with_context(|| format!("no {k} in {line}"));
    let sample = Sample {
        config,
        round,
        ops: field("ops")?,
        cpu_ns: field("cpu_ns")?,
        wall_ns: field("wall_ns")?,
        sent: num("sent"),
        dropped: num("dropped"),
        connected: doc["connected"].as_bool(),
        sent_total: num("sent_total"),
        agent_cpu_ns: None,
    };
    if sample.ops <= 0.0 || sample.wall_ns <= 0.0 {
        bail!("the program did no work: {line}");
    }
    Ok(sample)
}

/// Settings of the adapters group.
pub struct Settings {
    pub rounds: u32,
    /// Acquire+release pairs per `pairs` run (after a warm-up of a quarter
    /// as many).
    pub pairs: u64,
    /// Seconds of each `query` run (after a 1 s warm-up).
    pub seconds: u32,
    /// Pairs a second at most in `pairs` runs (0: unpaced).
    pub rate: u64,
    /// The pools to measure, in this order.
    pub pools: Vec<Pool>,
    /// Only the pair runs with the agent ([`stack_configs`]).
    pub stacks_only: bool,
}

/// What the programs need to run.
pub struct Programs {
    /// The Java class path: the test application's jar, the adapter's and
    /// Debian's.
    pub java_classpath: String,
    /// adapters/node/bench/pool_bench.js
    pub node_script: PathBuf,
    /// adapters/rust/testapp's pool_bench binary.
    pub rust_bench: PathBuf,
    /// The Python interpreter with psycopg_pool, and
    /// adapters/python/bench/pool_bench.py.
    pub python: PathBuf,
    pub python_script: PathBuf,
}

/// Rough minutes for the group: program start-up, warm-ups, agent starts.
pub fn estimate_minutes(settings: &Settings) -> f64 {
    // Per pool and round: 6 pair runs (paced, or about 6 us a pair
    // unpaced; start-up and the warm-up included), one A/B query run (both
    // sides warmed up, then measured), 5 agent starts of about 2 s; with
    // --adapter-stacks-only, 4 pair runs each with an agent.
    let per_pair_s = if settings.rate > 0 {
        1.0 / settings.rate as f64
    } else {
        6e-6
    };
    let pairs = settings.pairs + warmup_pairs(settings.pairs, settings.rate);
    let pair_run = 2.0 + pairs as f64 * per_pair_s;
    let ab_run = 2.0 * f64::from(settings.seconds) + 2.0 * WARMUP_SECONDS as f64 + 3.0;
    let per_pool = if settings.stacks_only {
        4.0 * pair_run + 4.0 * 2.0
    } else {
        6.0 * pair_run + ab_run + 5.0 * 2.0
    };
    f64::from(settings.rounds) * settings.pools.len() as f64 * per_pool / 60.0
}

/// Runs every pool's configurations, round by round; returns the samples
/// of complete rounds (per pool) and the failures.
pub fn run(
    bench: &mut Bench,
    programs: &Programs,
    settings: &Settings,
) -> (Vec<Sample>, Vec<String>) {
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    for round in 1..=settings.rounds {
        for &pool in &settings.pools {
            let mut this_round = Vec::new();
            let configs = if settings.stacks_only {
                stack_configs(pool)
            } else {
                configs(pool)
            };
            for config in round_order(&configs, round) {
                match run_one(bench, programs, settings, config, round) {
                    Ok(run) => {
                        for s in run {
                            eprintln!(
                                "[{round}/{}] {}: {}",
                                settings.rounds,
                                s.config.label(),
                                progress(&s)
                            );
                            this_round.push(s);
                        }
                    }
                    Err(e) => {
                        eprintln!(
                            "[{round}/{}] {}: FAILED: {e:#}",
                            settings.rounds,
                            config.label()
                        );
                        failures.push(format!(
                            "round {round}, {}: {}",
                            config.label(),
                            format!("{e:#}").lines().next().unwrap_or_default()
                        ));
                    }
                }
            }
            samples.extend(this_round);
        }
    }
    (samples, failures)
}

fn progress(s: &Sample) -> String {
    let mut line = match s.config.mode {
        Mode::Pairs => format!("{} ns CPU/pair", ns(s.cpu_ns / s.ops)),
        Mode::Query | Mode::QueryAb => format!(
            "{:.0} queries/s, {} us CPU/query",
            s.ops / (s.wall_ns / 1e9),
            us(s.cpu_ns / s.ops / 1e3)
        ),
    };
    if let (Some(sent), Some(dropped)) = (s.sent, s.dropped) {
        line.push_str(&format!(", adapter sent {sent:.0} dropped {dropped:.0}"));
    }
    if s.config.agent && s.connected == Some(false) {
        line.push_str(", adapter NOT connected at the end");
    }
    line
}

fn run_one(
    bench: &mut Bench,
    programs: &Programs,
    settings: &Settings,
    config: Config,
    round: u32,
) -> Result<Vec<Sample>> {
    let mut cmd = command(bench, programs, settings, config, round)?;
    let agent = if config.agent {
        Some(bench.start_agent()?)
    } else {
        None
    };
    let base = bench.work.path().join("adapter-bench");
    let agent_cpu_before = bench.agent_cg.usage_ns()?;
    let out = run_bounded(&mut cmd, &base, RUN_LIMIT);
    let agent_cpu = bench.agent_cg.usage_ns()?.saturating_sub(agent_cpu_before);
    if let Some(mut agent) = agent {
        agent.check_running()?;
    }
    let mut samples = parse_output(config, round, &out?)?;
    for sample in &mut samples {
        if sample.config.agent && sample.config.adapter {
            sample.agent_cpu_ns = Some(agent_cpu as f64);
        }
    }
    Ok(samples)
}

fn command(
    bench: &Bench,
    programs: &Programs,
    settings: &Settings,
    config: Config,
    round: u32,
) -> Result<Command> {
    let pg_port = || bench.pg.as_ref().map(|p| p.port).context("no PostgreSQL");
    let mut cmd = match config.pool {
        Pool::Hikari => {
            let mut cmd = command_in(&bench.work_cg, "java");
            cmd.args(["-XX:+UseSerialGC", "-Xms256m", "-Xmx256m"])
                .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
                .args(["-cp", &programs.java_classpath])
                .arg("io.poolscope.testapp.PoolBench")
                .env(
                    "JDBC_URL",
                    format!("jdbc:postgresql://127.0.0.1:{}/postgres", pg_port()?),
                )
                .env("DB_USER", "postgres");
            cmd
        }
        Pool::NodePg | Pool::NodeMysql2 => {
            let mut cmd = command_in(&bench.work_cg, "node");
            cmd.arg(&programs.node_script);
            if config.pool == Pool::NodePg {
                cmd.env("LIB", "pg").env(
                    "PG_URL",
                    format!("postgres://postgres@127.0.0.1:{}/postgres", pg_port()?),
                );
            } else {
                let db = bench.mariadb.as_ref().context("no MariaDB")?;
                cmd.env("LIB", "mysql2")
                    .env("MYSQL_HOST", "127.0.0.1")
                    .env("MYSQL_PORT", db.port.to_string())
                    .env("MYSQL_USER", super::MariaDb::USER)
                    .env("MYSQL_DATABASE", super::MariaDb::DATABASE);
            }
            cmd
        }
        Pool::RustBb8 => rust_bench(bench, programs, "bb8", pg_port()?),
        Pool::RustSqlx => rust_bench(bench, programs, "sqlx", pg_port()?),
        Pool::RustIds => rust_bench(bench, programs, "ids", pg_port()?),
        Pool::PythonPsycopg => {
            let mut cmd = command_in(&bench.work_cg, &programs.python);
            cmd.arg(&programs.python_script)
                .env("PG_PORT", pg_port()?.to_string())
                .env("POOLSCOPE_ADAPTER_SOCKET", bench.adapter_socket());
            cmd
        }
    };
    match config.stacks {
        Stacks::Sampled => {}
        Stacks::Off => {
            cmd.env("POOLSCOPE_ADAPTER_STACKS", "off");
        }
        Stacks::Every => {
            cmd.env("POOLSCOPE_ADAPTER_STACK_INTERVAL_US", "0");
        }
    }
    let warmup = warmup_pairs(settings.pairs, settings.rate);
    cmd.env(
        "MODE",
        match config.mode {
            Mode::Pairs => "pairs",
            Mode::Query => "query",
            Mode::QueryAb => "query_ab",
        },
    )
    .env("ADAPTER", if config.adapter { "on" } else { "off" })
    .env("AGENT", if config.agent { "present" } else { "absent" })
    .env("N", settings.pairs.to_string())
    .env("RATE", settings.rate.to_string())
    .env("WARMUP", warmup.to_string())
    // An A/B run measures both sides for `seconds` each.
    .env(
        "SECONDS",
        match config.mode {
            Mode::QueryAb => 2 * settings.seconds,
            Mode::Pairs | Mode::Query => settings.seconds,
        }
        .to_string(),
    )
    .env("WARMUP_SECONDS", WARMUP_SECONDS.to_string())
    // A/B runs make the instrumented pool first in even rounds.
    .env(
        "AB_INSTRUMENTED_FIRST",
        if round.is_multiple_of(2) { "1" } else { "0" },
    )
    .env("POOLSCOPE_ADAPTER_STREAM_SOCKET", bench.stream_socket());
    Ok(cmd)
}

/// `pool_bench` with its pool `POOL` against the bench's PostgreSQL.
fn rust_bench(bench: &Bench, programs: &Programs, pool: &str, pg_port: u16) -> Command {
    let mut cmd = command_in(&bench.work_cg, &programs.rust_bench);
    cmd.env("PG_PORT", pg_port.to_string())
        .env("POOL", pool)
        .env("POOLSCOPE_ADAPTER_SOCKET", bench.adapter_socket());
    cmd
}

/// How long a process warms up before it is measured. The JITs keep
/// compiling for seconds: the JVM's writer thread runs a hundred times a
/// second, so its code crosses C2's thresholds 3-5 s in (seen with
/// -XX:+PrintCompilation), and CPU spent compiling inside the measured run
/// counted as the adapter's cost per pair.
const WARMUP_SECONDS: u64 = 3;

/// Warm-up pairs: a quarter of the measured ones, and at the paced rate at
/// least [`WARMUP_SECONDS`] of them.
fn warmup_pairs(pairs: u64, rate: u64) -> u64 {
    (pairs / 4)
        .max(rate.saturating_mul(WARMUP_SECONDS))
        .max(1000)
}

/// Nanoseconds, no decimals above 100.
fn ns(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One row of the table: a pool, a measure, both sides and the comparison.
struct Row {
    pool: Pool,
    measure: &'static str,
    agent: &'static str,
    off: Spread,
    on: Spread,
    /// Per round: on - off (ns per pair) or on / off (throughput).
    compared: Spread,
    rounds: usize,
    verdict: String,
    messages: String,
}

/// For each round with both sides, `side(false)` and `side(true)`: (off
/// value, on value).
fn paired(
    samples: &[Sample],
    side: &dyn Fn(bool) -> Config,
    value: &dyn Fn(&Sample) -> f64,
) -> (Vec<(f64, f64)>, (f64, f64)) {
    let find = |round: u32, on: bool| {
        samples
            .iter()
            .find(|s| s.round == round && s.config == side(on))
    };
    let mut rounds: Vec<u32> = samples.iter().map(|s| s.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    let mut pairs = Vec::new();
    let mut messages = (0.0, 0.0);
    for round in rounds {
        if let (Some(off), Some(on)) = (find(round, false), find(round, true)) {
            pairs.push((value(off), value(on)));
            messages.0 += on.sent.unwrap_or(0.0);
            messages.1 += on.dropped.unwrap_or(0.0);
        }
    }
    (pairs, messages)
}

fn rows(samples: &[Sample]) -> Vec<Row> {
    let mut rows = Vec::new();
    let per_pair = |s: &Sample| s.cpu_ns / s.ops;
    let rate = |s: &Sample| s.ops / (s.wall_ns / 1e9);
    for pool in Pool::ALL {
        for (mode, agent) in [
            (Mode::Pairs, false),
            (Mode::Pairs, true),
            (Mode::Query, true),
        ] {
            let value: &dyn Fn(&Sample) -> f64 = match mode {
                Mode::Pairs => &per_pair,
                Mode::Query | Mode::QueryAb => &rate,
            };
            let side = |adapter| Config {
                pool,
                mode,
                adapter,
                agent,
                stacks: Stacks::Sampled,
            };
            let (pairs, (sent, dropped)) = paired(samples, &side, value);
            if pairs.is_empty() {
                continue;
            }
            let off = Spread::of(pairs.iter().map(|p| p.0).collect());
            let on = Spread::of(pairs.iter().map(|p| p.1).collect());
            let (compared, verdict) = match mode {
                Mode::Pairs => {
                    let added = Spread::of(pairs.iter().map(|p| p.1 - p.0).collect());
                    let ok = added.median <= MAX_ADDED_NS_PER_PAIR;
                    let verdict = format!(
                        "added <= {MAX_ADDED_NS_PER_PAIR:.0} ns: {}",
                        if ok { "met" } else { "MISSED" }
                    );
                    (added, verdict)
                }
                Mode::Query | Mode::QueryAb => {
                    let ratio = Spread::of(pairs.iter().map(|p| p.1 / p.0).collect());
                    let ok = ratio.median >= MIN_THROUGHPUT_RATIO;
                    let verdict = format!(
                        "ratio >= {MIN_THROUGHPUT_RATIO}: {}",
                        if ok { "met" } else { "MISSED" }
                    );
                    (ratio, verdict)
                }
            };
            rows.push(Row {
                pool,
                measure: match mode {
                    Mode::Pairs => "CPU ns per acquire+release",
                    Mode::Query | Mode::QueryAb => "queries/s, borrow+SELECT 1+return",
                },
                agent: if agent { "present" } else { "absent" },
                off,
                on,
                compared,
                rounds: pairs.len(),
                verdict,
                messages: format!("{sent:.0} / {dropped:.0}"),
            });
        }
        for stacks in [Stacks::Every, Stacks::Sampled] {
            if let Some(row) = stacks_row(samples, pool, stacks) {
                rows.push(row);
            }
        }
    }
    rows
}

/// What holder stacks add to a pair: the adapter on without stacks
/// against on with them (`with`: captured at every checkout, or the
/// default), agent present, per round.
fn stacks_row(samples: &[Sample], pool: Pool, with: Stacks) -> Option<Row> {
    let side = |on| Config {
        pool,
        mode: Mode::Pairs,
        adapter: true,
        agent: true,
        stacks: if on { with } else { Stacks::Off },
    };
    let (pairs, _) = paired(samples, &side, &|s: &Sample| s.cpu_ns / s.ops);
    if pairs.is_empty() {
        return None;
    }
    let added = Spread::of(pairs.iter().map(|p| p.1 - p.0).collect());
    let ok = added.median <= MAX_STACK_NS_PER_PAIR;
    Some(Row {
        pool,
        measure: match with {
            Stacks::Every => "CPU ns per acquire+release: stacks off / a stack at every checkout",
            _ => "CPU ns per acquire+release: stacks off / on (default: at most 1 capture per ms)",
        },
        agent: "present",
        off: Spread::of(pairs.iter().map(|p| p.0).collect()),
        on: Spread::of(pairs.iter().map(|p| p.1).collect()),
        compared: added,
        rounds: pairs.len(),
        verdict: format!(
            "stacks add <= {MAX_STACK_NS_PER_PAIR:.0} ns: {}",
            if ok { "met" } else { "MISSED" }
        ),
        messages: "-".to_string(),
    })
}

/// Per pool: the agent's CPU per adapter message, over the runs with both
/// the agent and the adapter (whole runs: warm-up and the agent's idle
/// work included, so a little above the cost of a message).
/// The agent's CPU per acquire+release pair, over whole pair runs (their
/// `warmup` pairs included): per pair, not per message, since adapters
/// that batch fold many short checkouts into one message.
fn agent_cost(samples: &[Sample], pools: &[Pool], warmup: f64) -> Vec<String> {
    pools
        .iter()
        .filter_map(|&pool| {
            // Pair runs only: in a query run the agent also follows every
            // query's kernel events, which are no adapter's cost.
            let per_pair: Vec<f64> = samples
                .iter()
                .filter(|s| s.config.pool == pool && s.config.mode == Mode::Pairs)
                .filter_map(|s| match (s.agent_cpu_ns, s.sent_total) {
                    (Some(cpu), Some(sent)) if sent > 0.0 => Some(cpu / (s.ops + warmup)),
                    _ => None,
                })
                .collect();
            if per_pair.is_empty() {
                return None;
            }
            let n = per_pair.len();
            let s = Spread::of(per_pair);
            Some(format!(
                "{}: the agent's CPU per acquire+release {} [{}..{}] ({n} pair runs with agent and adapter, over the whole run, warm-up included)",
                pool.name(),
                ns(s.median),
                ns(s.min),
                ns(s.max)
            ))
        })
        .collect()
}

/// The group's one table.
pub fn table(samples: &[Sample]) -> Table {
    let mut t = Table::new(
        "Pool adapters: cost per acquire+release, and borrow/query/return throughput",
        &[
            "pool",
            "measure",
            "agent",
            "rounds",
            "adapter off",
            "adapter on",
            "on - off (ns) or on / off",
            "target",
            "adapter msgs sent / dropped",
        ],
    );
    let spread = |s: &Spread, f: &dyn Fn(f64) -> String| {
        format!("{} [{}..{}]", f(s.median), f(s.min), f(s.max))
    };
    for r in rows(samples) {
        let (off, on, compared) = if r.measure.starts_with("CPU") {
            (
                spread(&r.off, &ns),
                spread(&r.on, &ns),
                spread(&r.compared, &|v| format!("{v:+.0}")),
            )
        } else {
            let rate = |v: f64| format!("{v:.0}");
            (
                spread(&r.off, &rate),
                spread(&r.on, &rate),
                r.compared.ratio(),
            )
        };
        t.row(vec![
            r.pool.name().to_string(),
            r.measure.to_string(),
            r.agent.to_string(),
            r.rounds.to_string(),
            off,
            on,
            compared,
            r.verdict,
            r.messages,
        ]);
    }
    t
}

/// The group's section of the report: (plain text, markdown).
pub fn render(samples: &[Sample], failures: &[String], settings: &Settings) -> (String, String) {
    let t = table(samples);
    let mut notes = vec![
        format!(
            "pairs: {} acquire+release pairs per run, no query, after {} for warm-up, {}; CPU \
             is the whole application process's (all threads: the adapter's writer, GC, JIT), per \
             pair; on - off is per round, median [min..max] over the rounds.",
            settings.pairs,
            warmup_pairs(settings.pairs, settings.rate),
            if settings.rate > 0 {
                format!("paced at {} pairs/s at most", settings.rate)
            } else {
                "unpaced".to_string()
            }
        ),
        format!(
            "query: borrow, SELECT 1, return, agent running: one process per round with two \
             pools, one plain and one instrumented, in alternating 250 ms slices (plain, \
             instrumented, instrumented, plain, ...), {} s measured on each after {} s of \
             warm-up on each; on / off per round. Separate processes differed by more than the \
             2 % to resolve (JIT, which core the server's backends run on).",
            settings.seconds, WARMUP_SECONDS
        ),
        "adapter off: the same program without the instrument() call; every pairs run is a \
         fresh process (and a fresh agent when present); a pool's configurations run in one \
         order, then reversed in the next round."
            .to_string(),
        "adapter msgs: messages the adapter sent to the agent and dropped (its bounded queue \
         was full, or no agent) during the measured loops, summed over the adapter-on runs. \
         A tight loop makes messages faster than the agent may take them; drops are cheaper \
         than sends, so many drops understate the cost."
            .to_string(),
    ];
    let warmup = warmup_pairs(settings.pairs, settings.rate) as f64;
    notes.extend(agent_cost(samples, &settings.pools, warmup));
    if !failures.is_empty() {
        notes.push(format!(
            "{} run(s) failed and were left out: {}",
            failures.len(),
            failures.join("; ")
        ));
    }
    let mut text = String::from("\npool adapters:\n");
    let mut md = String::from("\n## Pool adapters\n\n");
    for pool in &settings.pools {
        text.push_str(&format!("  {:<14} {}\n", pool.name(), pool.describe()));
        md.push_str(&format!("- {}: {}\n", pool.name(), pool.describe()));
    }
    text.push('\n');
    text.push_str(&t.text());
    md.push('\n');
    md.push_str(&t.markdown());
    text.push('\n');
    md.push('\n');
    for note in &notes {
        text.push_str(&format!("* {note}\n"));
        md.push_str(&format!("- {note}\n"));
    }
    md.push_str("\n### Adapter runs\n\n| round | configuration | ops | s | CPU ns/op | sent | dropped |\n|---:|---|---:|---:|---:|---:|---:|\n");
    for s in samples {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {} | {} | {} |\n",
            s.round,
            s.config.label(),
            s.ops,
            s.wall_ns / 1e9,
            ns(s.cpu_ns / s.ops),
            s.sent.map_or("-".to_string(), |v| format!("{v:.0}")),
            s.dropped.map_or("-".to_string(), |v| format!("{v:.0}")),
        ));
    }
    (text, md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(config: Config, round: u32, ops: f64, cpu_ns: f64, wall_ns: f64) -> Sample {
        Sample {
            config,
            round,
            ops,
            cpu_ns,
            wall_ns,
            sent: config.adapter.then_some(3.0 * ops),
            dropped: config.adapter.then_some(0.0),
            connected: config.adapter.then_some(true),
            sent_total: (config.adapter && config.agent).then_some(4.0 * ops),
            agent_cpu_ns: (config.adapter && config.agent).then_some(8.0 * ops),
        }
    }

    #[test]
    fn agent_cost_is_per_pair_over_the_runs() {
        let c = configs(Pool::NodePg);
        let samples: Vec<Sample> = c.iter().map(|&c| sample(c, 1, 1000.0, 1e6, 1.0)).collect();
        // 8,000 ns of agent CPU over 1,000 measured and 3,000 warm-up pairs.
        let notes = agent_cost(&samples, &[Pool::NodePg, Pool::Hikari], 3000.0);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("per acquire+release 2.0 ["), "{notes:?}");
    }

    #[test]
    fn warm_up_lasts_seconds_at_the_paced_rate() {
        assert_eq!(warmup_pairs(100_000, 20_000), 60_000);
        assert_eq!(warmup_pairs(1_000_000, 20_000), 250_000);
        assert_eq!(warmup_pairs(2_000, 0), 1_000);
    }

    #[test]
    fn rounds_flip_order() {
        let c = configs(Pool::NodePg);
        assert_eq!(c.len(), 7);
        assert_eq!(round_order(&c, 1), c);
        let mut reversed = c.clone();
        reversed.reverse();
        assert_eq!(round_order(&c, 2), reversed);
        assert_eq!(round_order(&c, 3), c);
        // Adapter off and on of one measure sit side by side: A,B then B,A;
        // so do stacks off and on.
        assert!(!c[0].adapter && c[1].adapter && c[0].mode == c[1].mode);
        assert_eq!(
            (c[3].stacks, c[4].stacks, c[5].stacks),
            (Stacks::Off, Stacks::Sampled, Stacks::Every)
        );
        assert!(c[3].agent && c[4].agent && c[5].agent);
    }

    #[test]
    fn parses_program_output() {
        let c = configs(Pool::Hikari)[1];
        let s = &parse_output(
            c,
            2,
            "[main] INFO noise\n{\"ops\":1000,\"cpu_ns\":500000,\"wall_ns\":600000,\"sent\":3000,\"dropped\":5,\"connected\":false}\n",
        )
        .expect("parses")[0];
        assert_eq!((s.ops, s.cpu_ns, s.wall_ns), (1000.0, 500_000.0, 600_000.0));
        assert_eq!((s.sent, s.dropped), (Some(3000.0), Some(5.0)));
        assert_eq!(s.connected, Some(false));
        assert_eq!(s.round, 2);
        let off = &parse_output(
            configs(Pool::Hikari)[0],
            1,
            "{\"ops\":1,\"cpu_ns\":1,\"wall_ns\":1}",
        )
        .expect("parses")[0];
        assert_eq!(off.sent, None);
        assert!(parse_output(c, 1, "no json").is_err());
        assert!(parse_output(c, 1, "{\"ops\":0,\"cpu_ns\":1,\"wall_ns\":1}").is_err());
    }

    #[test]
    fn an_ab_run_gives_both_query_samples_of_its_round() {
        let ab = configs(Pool::NodePg)[6];
        assert_eq!(ab.mode, Mode::QueryAb);
        let got = parse_output(
            ab,
            3,
            "{\"ab\":[{\"ops\":100,\"cpu_ns\":7,\"wall_ns\":9},{\"ops\":98,\"cpu_ns\":8,\"wall_ns\":9,\"sent\":98,\"dropped\":0,\"connected\":true}]}",
        )
        .expect("parses");
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].config.mode, got[0].config.adapter),
            (Mode::Query, false)
        );
        assert_eq!(
            (got[1].config.mode, got[1].config.adapter),
            (Mode::Query, true)
        );
        assert_eq!((got[0].ops, got[1].ops, got[1].round), (100.0, 98.0, 3));
        assert_eq!((got[0].sent, got[1].sent), (None, Some(98.0)));
        assert!(parse_output(ab, 1, "{\"ab\":[{\"ops\":1,\"cpu_ns\":1,\"wall_ns\":1}]}").is_err());
        assert!(parse_output(ab, 1, "{\"ops\":1,\"cpu_ns\":1,\"wall_ns\":1}").is_err());
    }

    #[test]
    fn compares_within_rounds() {
        let c = configs(Pool::NodePg);
        let query = |adapter| Config {
            mode: Mode::Query,
            adapter,
            ..c[6]
        };
        let (off_absent, on_absent, q_off, q_on) = (c[0], c[1], query(false), query(true));
        // Round 1: 200 and 1,200 ns per pair; round 2: 300 and 1,000; round
        // 3 has only the off side and is left out. Queries: 10,000/s off,
        // 9,900/s on.
        let samples = vec![
            sample(off_absent, 1, 1000.0, 200_000.0, 1.0e6),
            sample(on_absent, 1, 1000.0, 1_200_000.0, 1.0e6),
            sample(on_absent, 2, 1000.0, 1_000_000.0, 1.0e6),
            sample(off_absent, 2, 1000.0, 300_000.0, 1.0e6),
            sample(off_absent, 3, 1000.0, 100.0, 1.0e6),
            sample(q_off, 1, 10_000.0, 1.0, 1.0e9),
            sample(q_on, 1, 9_900.0, 1.0, 1.0e9),
        ];

        let side = |adapter| Config {
            adapter,
            ..off_absent
        };
        let (pairs, (sent, dropped)) = paired(&samples, &side, &|s: &Sample| s.cpu_ns / s.ops);
        assert_eq!(pairs, vec![(200.0, 1200.0), (300.0, 1000.0)]);
        assert_eq!(
            Spread::of(pairs.iter().map(|p| p.1 - p.0).collect()).median,
            850.0
        );
        assert_eq!((sent, dropped), (6000.0, 0.0));

        let rows = rows(&samples);
        assert_eq!(rows.len(), 2, "agent-present pairs have no samples");
        assert_eq!(rows[0].rounds, 2);
        assert_eq!(rows[0].compared.median, 850.0);
        assert_eq!(
            (rows[0].compared.min, rows[0].compared.max),
            (700.0, 1000.0)
        );
        assert!(rows[0].verdict.ends_with("met"));
        assert!((rows[1].compared.median - 0.99).abs() < 1e-12);
        assert!(rows[1].verdict.ends_with("met"));

        let text = table(&samples).text();
        assert!(text.contains("node pg"), "{text}");
        assert!(text.contains("+850 [+700..+1000]"), "{text}");
        assert!(text.contains("0.990 [0.990..0.990]"), "{text}");
        assert!(text.contains("10000 [10000..10000]"), "{text}");
    }

    #[test]
    fn holder_stacks_are_compared_with_the_agent_and_the_adapter_on() {
        let c = configs(Pool::NodePg);
        let (without, with) = (c[3], c[5]);
        assert!(without.adapter && without.agent && without.stacks == Stacks::Off);
        assert!(with.adapter && with.agent && with.stacks == Stacks::Every);
        // 1,000 then 2,000 ns per pair without stacks; 4,000 and 8,000 with.
        let samples = vec![
            sample(without, 1, 1000.0, 1_000_000.0, 1.0),
            sample(with, 1, 1000.0, 4_000_000.0, 1.0),
            sample(without, 2, 1000.0, 2_000_000.0, 1.0),
            sample(with, 2, 1000.0, 8_000_000.0, 1.0),
        ];
        let row = stacks_row(&samples, Pool::NodePg, Stacks::Every).expect("a row");
        assert!(stacks_row(&samples, Pool::NodePg, Stacks::Sampled).is_none());
        assert_eq!((row.rounds, row.compared.median), (2, 4500.0));
        assert!(row.verdict.ends_with("met"), "{}", row.verdict);
        let text = table(&samples).text();
        assert!(text.contains("a stack at every checkout"), "{text}");
        // Python runs only the three stack runs.
        let python = configs(Pool::PythonPsycopg);
        assert_eq!(python.len(), 3);
        assert!(python
            .iter()
            .all(|c| c.adapter && c.agent && c.mode == Mode::Pairs));
        // --adapter-stacks-only: the four pair runs with the agent.
        let only = stack_configs(Pool::NodePg);
        assert_eq!(only.len(), 4);
        assert!(!only[0].adapter && only[1..].iter().all(|c| c.adapter));
    }

    #[test]
    fn misses_are_loud() {
        let c = configs(Pool::Hikari);
        let query = |adapter| Config {
            mode: Mode::Query,
            adapter,
            ..c[6]
        };
        let samples = vec![
            sample(query(false), 1, 10_000.0, 1.0, 1.0e9),
            sample(query(true), 1, 9_000.0, 1.0, 1.0e9),
            sample(c[2], 1, 1000.0, 100_000.0, 1.0),
            sample(c[4], 1, 1000.0, 2_500_000.0, 1.0),
        ];
        let rows = rows(&samples);
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.verdict.ends_with("MISSED")));
    }

    #[test]
    fn estimate_is_minutes() {
        let m = estimate_minutes(&Settings {
            rounds: 3,
            pairs: 200_000,
            seconds: 10,
            rate: 20_000,
            pools: Pool::ALL.to_vec(),
            stacks_only: false,
        });
        // A few minutes per pool.
        let per_pool = m / Pool::ALL.len() as f64;
        assert!((1.0..8.0).contains(&per_pool), "{m}");
    }
}
