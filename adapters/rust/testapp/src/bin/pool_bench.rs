//! The adapter bench's Rust side (`cargo xtask bench --only adapters`,
//! xtask/src/bench/adapters.rs): one loop over a real pool (POOL=bb8, sqlx
//! or ids: see [`IdPool`]) on one thread (a current-thread tokio runtime), then one JSON line
//! on stdout, as adapters/node/bench/pool_bench.js does for Node.
//!
//! MODE=pairs: N get/drop pairs, no query. MODE=query: get, `SELECT 1`,
//! drop, for SECONDS. MODE=query_ab: the query loop over two pools, one
//! plain and one instrumented, in alternating 250 ms slices (plain,
//! instrumented, instrumented, plain, ...), SECONDS measured on each after
//! WARMUP_SECONDS on each; prints `{"ab":[plain, instrumented]}`.
//! MODE=pairs_ab: N pairs on each of two such pools, in alternating slices
//! of AB_PAIRS pairs (plain, instrumented, instrumented, plain, ...) after
//! WARMUP pairs on each: the pair cost compared within one process, where
//! separate processes differ by more than it (sqlx); the same output.
//! ADAPTER=on checks out through the instrumented pool (`get`, `acquire`;
//! reporting to `$POOLSCOPE_ADAPTER_SOCKET`); ADAPTER=off through the bb8
//! or sqlx pool beneath, with a reporter that sends nothing: the same pool
//! and loop, without the adapter's work. CPU is the whole process's (CLOCK_PROCESS_CPUTIME_ID:
//! every thread, the adapter's backlog sender included).
//!
//! Environment: POOL, MODE, ADAPTER, AGENT (present: the agent is there), N,
//! RATE (pairs a second at most, 0: unpaced), WARMUP (pairs), SECONDS,
//! WARMUP_SECONDS, AB_INSTRUMENTED_FIRST, PG_PORT (127.0.0.1, user and
//! database postgres), POOLSCOPE_ADAPTER_SOCKET.

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use poolscope_adapter::{
    bb8_pg, sqlx_pool, AcquireResult, ConnId, DbSystem, PoolInfo, PoolReporter, Reporter,
    ReporterStats,
};
use serde_json::{json, Value};
use sqlx::Postgres;

const POOL_SIZE: u32 = 4;
const SLICE: Duration = Duration::from_millis(250);
/// Pairs between two yields to the runtime (its timers, the pool's tasks).
const PAIRS_PER_TURN: u64 = 64;

fn env(name: &str, fallback: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fallback.to_string())
}

fn env_num(name: &str, fallback: u64) -> Result<u64> {
    env(name, &fallback.to_string())
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

fn cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// The pool a side checks out from.
enum Pool {
    Bb8(bb8_pg::InstrumentedPool),
    Sqlx(sqlx_pool::InstrumentedPool<Postgres>),
    Ids(IdPool),
}

/// A hand-rolled pool of tokio-postgres clients reported through the
/// generic `PoolReporter`, each connection named by an id alone and
/// announced with `connection_created_here` right after this thread
/// connected it: the agent ties each id to its socket from the kernel's
/// evidence (issue 13's binding), so the bench measures what a bound,
/// id-named connection costs the agent per acquire+release. Off, the same
/// pool reports to a disabled reporter.
struct IdPool {
    report: PoolReporter,
    idle: RefCell<Vec<(u64, tokio_postgres::Client)>>,
}

impl IdPool {
    async fn connect(reporter: Reporter, port: u16) -> Result<IdPool> {
        let report = PoolReporter::new(reporter, "bench-rust-ids");
        report.register(&PoolInfo {
            db_system: Some(DbSystem::Postgresql),
            server_address: Some("127.0.0.1".into()),
            server_port: Some(port),
            max: Some(POOL_SIZE),
            library: Some("hand-rolled".into()),
            ..PoolInfo::default()
        });
        let mut idle = Vec::new();
        for id in 1..=u64::from(POOL_SIZE) {
            let (client, connection) = pg_config(port)
                .connect(tokio_postgres::NoTls)
                .await
                .context("cannot connect")?;
            tokio::spawn(connection);
            // On this current-thread runtime the connect above ran on this
            // thread: the claim's evidence.
            report.connection_created_here(IdPool::named(id));
            idle.push((id, client));
        }
        Ok(IdPool {
            report,
            idle: RefCell::new(idle),
        })
    }

    fn named(id: u64) -> ConnId {
        ConnId {
            conn: Some(id),
            ..ConnId::default()
        }
    }

    /// A checkout: never waits (one caller at a time).
    fn get(&self) -> Result<(u64, tokio_postgres::Client)> {
        let wait = self.report.acquire_start();
        let Some((id, client)) = self.idle.borrow_mut().pop() else {
            wait.finish(AcquireResult::Error);
            bail!("the id pool is empty");
        };
        wait.finish(AcquireResult::Ok(IdPool::named(id)));
        Ok((id, client))
    }

    fn put(&self, (id, client): (u64, tokio_postgres::Client)) {
        self.report.release(IdPool::named(id));
        self.idle.borrow_mut().push((id, client));
    }
}

fn pg_config(port: u16) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres");
    pg
}

/// One side of the bench: a pool, checked out with or without the adapter.
struct Side {
    pool: Pool,
    adapter: bool,
}

impl Side {
    async fn build(adapter: bool) -> Result<Side> {
        let port: u16 = env_num("PG_PORT", 5432)?.try_into().context("PG_PORT")?;
        let reporter = if adapter {
            Reporter::from_env()
        } else {
            Reporter::disabled()
        };
        let pool = match env("POOL", "bb8").as_str() {
            "bb8" => {
                let pool = bb8_pg::InstrumentedPool::builder(
                    "bench-rust-bb8",
                    pg_config(port),
                    tokio_postgres::NoTls,
                )
                .reporter(reporter)
                .max_size(POOL_SIZE)
                .test_on_check_out(false)
                .build()
                .await
                .context("cannot build the pool")?;
                Pool::Bb8(pool)
            }
            "sqlx" => {
                let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                let pool = sqlx_pool::InstrumentedPool::<Postgres>::builder("bench-rust-sqlx")
                    .reporter(reporter)
                    .max_connections(POOL_SIZE)
                    .test_before_acquire(false)
                    .connect(&url)
                    .await
                    .context("cannot build the pool")?;
                Pool::Sqlx(pool)
            }
            "ids" => Pool::Ids(IdPool::connect(reporter, port).await?),
            other => bail!("POOL={other}: bb8, sqlx or ids"),
        };
        Ok(Side { pool, adapter })
    }

    /// One checkout, a `SELECT 1` on it if `query`, and its return.
    async fn checkout(&self, query: bool) -> Result<()> {
        match (&self.pool, self.adapter) {
            (Pool::Bb8(pool), true) => {
                let client = pool.get().await.map_err(bb8_error)?;
                if query {
                    select_one(&client).await?;
                }
            }
            (Pool::Bb8(pool), false) => {
                let conn = pool.inner().get().await.map_err(bb8_error)?;
                if query {
                    select_one(&conn).await?;
                }
            }
            (Pool::Sqlx(pool), true) => {
                let mut conn = pool.acquire().await.context("acquire")?;
                if query {
                    sqlx_select_one(&mut conn).await?;
                }
            }
            (Pool::Sqlx(pool), false) => {
                let mut conn = pool.inner().acquire().await.context("acquire")?;
                if query {
                    sqlx_select_one(&mut conn).await?;
                }
            }
            // The adapter's presence is the reporter's (disabled when off).
            (Pool::Ids(pool), _) => {
                let held = pool.get()?;
                let queried = if query {
                    select_one(&held.1).await
                } else {
                    Ok(())
                };
                pool.put(held);
                queried?;
            }
        }
        Ok(())
    }

    fn stats(&self) -> ReporterStats {
        match &self.pool {
            Pool::Bb8(pool) => pool.reporter().stats(),
            Pool::Sqlx(pool) => pool.reporter().stats(),
            Pool::Ids(pool) => pool.report.reporter().stats(),
        }
    }
}

fn bb8_error(e: bb8_pg::RunError<bb8_pg::Error>) -> anyhow::Error {
    anyhow::anyhow!("get: {e:?}")
}

async fn select_one(client: &tokio_postgres::Client) -> Result<()> {
    let row = client
        .query_one("SELECT 1", &[])
        .await
        .context("SELECT 1")?;
    check_one(row.get(0))
}

async fn sqlx_select_one(conn: &mut sqlx::PgConnection) -> Result<()> {
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(conn)
        .await
        .context("SELECT 1")?;
    check_one(one)
}

fn check_one(one: i32) -> Result<()> {
    if one != 1 {
        bail!("SELECT 1 returned {one}");
    }
    Ok(())
}

async fn pairs(side: &Side, n: u64, rate: u64) -> Result<u64> {
    let start = Instant::now();
    for i in 0..n {
        side.checkout(false).await?;
        if i % PAIRS_PER_TURN == PAIRS_PER_TURN - 1 {
            let due = if rate > 0 {
                Duration::from_secs_f64((i + 1) as f64 / rate as f64)
            } else {
                Duration::ZERO
            };
            match due.checked_sub(start.elapsed()) {
                Some(ahead) if ahead >= Duration::from_millis(1) => tokio::time::sleep(ahead).await,
                _ => tokio::task::yield_now().await,
            }
        }
    }
    Ok(n)
}

async fn queries(side: &Side, until: Instant) -> Result<u64> {
    let mut done = 0;
    loop {
        side.checkout(true).await?;
        done += 1;
        if done % 64 == 0 && Instant::now() >= until {
            return Ok(done);
        }
    }
}

async fn query_ab(seconds: u64, warmup: Duration) -> Result<Value> {
    let sides = both_sides().await?;
    for side in &sides {
        queries(side, Instant::now() + warmup).await?;
    }
    let slices =
        (4 * ((seconds as f64 * 1000.0 / SLICE.as_millis() as f64 / 4.0).round() as u64)).max(4);
    alternate(&sides, slices, Slice::Queries).await
}

/// What one slice of an A/B run does on its side.
#[derive(Clone, Copy)]
enum Slice {
    /// The query loop for [`SLICE`].
    Queries,
    /// This many pairs, paced at this rate.
    Pairs(u64, u64),
}

/// `slices` slices over the two sides (plain, instrumented, instrumented,
/// plain, ...): each side's ops, CPU and wall time, as `ab_output`.
async fn alternate(sides: &[Side; 2], slices: u64, work: Slice) -> Result<Value> {
    let before = sides[1].stats();
    let mut totals = [(0u64, 0f64, 0f64); 2];
    for k in 0..slices {
        let which = usize::from(k % 4 == 1 || k % 4 == 2);
        let (cpu0, t0) = (cpu_ns(), Instant::now());
        totals[which].0 += match work {
            Slice::Queries => queries(&sides[which], t0 + SLICE).await?,
            Slice::Pairs(n, rate) => pairs(&sides[which], n, rate).await?,
        };
        totals[which].2 += t0.elapsed().as_nanos() as f64;
        totals[which].1 += cpu_ns() - cpu0;
    }
    Ok(ab_output(totals, before, sides[1].stats()))
}

/// The two sides of an A/B run, plain first unless AB_INSTRUMENTED_FIRST
/// (which pool connects first alternates between runs).
async fn both_sides() -> Result<[Side; 2]> {
    if env("AB_INSTRUMENTED_FIRST", "0") == "1" {
        let i = Side::build(true).await?;
        Ok([Side::build(false).await?, i])
    } else {
        let p = Side::build(false).await?;
        Ok([p, Side::build(true).await?])
    }
}

/// `{"ab": [plain, instrumented]}` from per-side (ops, CPU ns, wall ns) and
/// the instrumented side's reporter counts before and after.
fn ab_output(totals: [(u64, f64, f64); 2], before: ReporterStats, after: ReporterStats) -> Value {
    let side = |t: (u64, f64, f64)| json!({"ops": t.0, "cpu_ns": t.1, "wall_ns": t.2});
    let mut on = side(totals[1]);
    on["sent"] = json!(after.sent - before.sent);
    on["dropped"] = json!(after.dropped - before.dropped);
    on["connected"] = json!(after.dropped == before.dropped);
    on["sent_total"] = json!(after.sent);
    json!({"ab": [side(totals[0]), on]})
}

async fn pairs_ab(n: u64, warmup: u64, rate: u64) -> Result<Value> {
    let sides = both_sides().await?;
    for side in &sides {
        pairs(side, warmup, rate).await?;
    }
    let slice = env_num("AB_PAIRS", 10_000)?.max(PAIRS_PER_TURN);
    let slices = (2 * n.div_ceil(slice)).next_multiple_of(4);
    alternate(&sides, slices, Slice::Pairs(slice, rate)).await
}

async fn run() -> Result<Value> {
    let mode = env("MODE", "pairs");
    let n = env_num("N", 100_000)?;
    let rate = env_num("RATE", 0)?;
    let seconds = env_num("SECONDS", 5)?;
    let warmup_seconds = Duration::from_secs(env_num("WARMUP_SECONDS", 1)?);
    if mode == "query_ab" {
        return query_ab(seconds, warmup_seconds).await;
    }
    if mode == "pairs_ab" {
        return pairs_ab(n, env_num("WARMUP", n / 4)?, rate).await;
    }
    let side = Side::build(env("ADAPTER", "off") == "on").await?;
    if mode == "query" {
        queries(&side, Instant::now() + warmup_seconds).await?;
    } else {
        pairs(&side, env_num("WARMUP", n / 4)?, rate).await?;
    }
    let before = side.stats();
    let (cpu0, t0) = (cpu_ns(), Instant::now());
    let ops = if mode == "query" {
        queries(&side, t0 + Duration::from_secs(seconds)).await?
    } else {
        pairs(&side, n, rate).await?
    };
    let (wall, cpu) = (t0.elapsed().as_nanos() as f64, cpu_ns() - cpu0);
    let mut out = json!({"ops": ops, "cpu_ns": cpu, "wall_ns": wall});
    if side.adapter {
        let after = side.stats();
        out["sent"] = json!(after.sent - before.sent);
        out["dropped"] = json!(after.dropped - before.dropped);
        out["connected"] = json!(after.dropped == before.dropped);
        out["sent_total"] = json!(after.sent);
    }
    Ok(out)
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let out = runtime.block_on(run())?;
    println!("{out}");
    Ok(())
}
