//! A deadpool-postgres workload that reports through poolscope-adapter, for
//! the integration tests (tests/tests/adapter_rust.rs).
//!
//! `poolscope-adapter-testapp --port PORT [--tasks 8] [--cycles 200]
//! [--max 4] [--pool NAME]`: builds an [`InstrumentedPool`] of at most
//! `--max` connections to PostgreSQL on 127.0.0.1:PORT (user and database
//! `postgres`), runs `--tasks` concurrent tasks doing `--cycles`
//! get/query/drop rounds each, and prints one JSON line with its pid and the
//! acquires and releases it made. Then it answers commands on stdin, one
//! JSON line each:
//! - `leak`: checks a connection out (in [`leak_a_connection_on_purpose`],
//!   the function the leak report's holder stack names) and holds it
//!   without using it;
//! - `release`: drops the held connection;
//! - `stats`: the counts again;
//! - `exit` or end of input: exits.
//!
//! The agent socket comes from `POOLSCOPE_ADAPTER_SOCKET`.

use std::{
    future::Future,
    io::BufRead,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use poolscope_adapter::deadpool_pg::{Client, InstrumentedPool};
use serde_json::{json, Value};

struct Options {
    port: u16,
    tasks: u64,
    cycles: u64,
    max: usize,
    pool: String,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        port: 0,
        tasks: 8,
        cycles: 200,
        max: 4,
        pool: "rust-workload".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => options.port = value.parse().context("--port")?,
            "--tasks" => options.tasks = value.parse().context("--tasks")?,
            "--cycles" => options.cycles = value.parse().context("--cycles")?,
            "--max" => options.max = value.parse().context("--max")?,
            "--pool" => options.pool = value,
            other => bail!("unknown option {other}"),
        }
    }
    if options.port == 0 {
        bail!("--port is required");
    }
    Ok(options)
}

#[derive(Default)]
struct Counts {
    acquires: AtomicU64,
    releases: AtomicU64,
}

impl Counts {
    fn json(&self, pool: &InstrumentedPool) -> Value {
        let stats = pool.reporter().stats();
        let status = pool.status();
        json!({
            "pid": std::process::id(),
            "acquires": self.acquires.load(Ordering::SeqCst),
            "releases": self.releases.load(Ordering::SeqCst),
            "pool_size": status.size,
            "pool_max": status.max_size,
            "sent": stats.sent,
            "dropped": stats.dropped,
            "backlogged": stats.backlogged,
            "deferred": stats.deferred,
        })
    }
}

async fn checkout(pool: &InstrumentedPool, counts: &Counts) -> Result<Client> {
    let client = pool.get().await.context("pool.get()")?;
    counts.acquires.fetch_add(1, Ordering::SeqCst);
    Ok(client)
}

/// Takes the connection that `leak` holds: the code the adapter's holder
/// stack must name. Awaited as a `dyn Future`, so that its poll is a frame
/// of its own (named from the symbol table) even in a release build
/// without debug info, where the poll of an async fn awaited directly is
/// inlined into its caller's.
fn leak_a_connection_on_purpose<'a>(
    pool: &'a InstrumentedPool,
    counts: &'a Counts,
) -> Pin<Box<dyn Future<Output = Result<Client>> + Send + 'a>> {
    Box::pin(async move {
        let client = pool.get().await.context("pool.get()")?;
        counts.acquires.fetch_add(1, Ordering::SeqCst);
        Ok(client)
    })
}

fn give_back(client: Client, counts: &Counts) {
    drop(client);
    counts.releases.fetch_add(1, Ordering::SeqCst);
}

async fn workload(
    pool: InstrumentedPool,
    counts: Arc<Counts>,
    task: u64,
    cycles: u64,
) -> Result<()> {
    for i in 0..cycles {
        let client = checkout(&pool, &counts).await?;
        let statement = client
            .prepare_cached("SELECT $1::int8 + $2::int8")
            .await
            .context("prepare")?;
        let a = i64::try_from(task).unwrap_or(0);
        let b = i64::try_from(i).unwrap_or(0);
        let row = client
            .query_one(&statement, &[&a, &b])
            .await
            .context("query")?;
        let sum: i64 = row.get(0);
        if sum != a + b {
            bail!("{a} + {b} came back as {sum}");
        }
        give_back(client, &counts);
    }
    Ok(())
}

fn print(value: &Value) {
    println!("{value}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<()> {
    let options = parse_args()?;
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(options.port)
        .user("postgres")
        .dbname("postgres")
        .application_name("poolscope-adapter-testapp");
    let pool = InstrumentedPool::builder(&options.pool, pg, tokio_postgres::NoTls)
        .max_size(options.max)
        .wait_timeout(Some(Duration::from_secs(30)))
        .build()
        .context("cannot build the pool")?;
    let counts = Arc::new(Counts::default());

    let mut tasks = Vec::new();
    for task in 0..options.tasks {
        tasks.push(tokio::spawn(workload(
            pool.clone(),
            Arc::clone(&counts),
            task,
            options.cycles,
        )));
    }
    for task in tasks {
        task.await.context("a workload task panicked")??;
    }
    pool.reporter().flush(Duration::from_secs(5));
    print(&counts.json(&pool));

    let mut held: Option<Client> = None;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        match line.trim() {
            "leak" => {
                let client = leak_a_connection_on_purpose(&pool, &counts).await?;
                let id = client.conn_id();
                held = Some(client);
                pool.reporter().flush(Duration::from_secs(5));
                let mut answer = counts.json(&pool);
                answer["local_address"] = json!(id.local_address.map(|a| a.to_string()));
                answer["fd"] = json!(id.fd);
                print(&answer);
            }
            "release" => {
                if let Some(client) = held.take() {
                    give_back(client, &counts);
                }
                pool.reporter().flush(Duration::from_secs(5));
                print(&counts.json(&pool));
            }
            "stats" => print(&counts.json(&pool)),
            "exit" => break,
            other => print(&json!({"error": format!("unknown command {other:?}")})),
        }
    }
    drop(held);
    pool.close();
    pool.reporter().flush(Duration::from_secs(1));
    Ok(())
}
