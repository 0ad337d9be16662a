//! A bb8 pool (poolscope-adapter's `bb8_pg::InstrumentedPool`) driven by
//! the integration tests (tests/tests/adapter_rust.rs), one JSON request per
//! line on stdin, one JSON answer line each (`"ok": true`, or `"ok": false`
//! with `"error"`). Everything runs on one thread (a current-thread tokio
//! runtime), so the thread that takes every connection is the main thread,
//! whose id the startup line gives.
//!
//! `bb8_scenario --port PORT [--max 4] [--pool NAME] [--timeout-ms 1000]`
//! (PostgreSQL on 127.0.0.1:PORT, user and database `postgres`); then:
//! - `{"op": "workers", "n": N}`: N tasks borrow, query and return in a loop;
//! - `{"op": "checkout", "id": ID, "kind": "leak"|"busy"|"tx"}`: takes a
//!   connection and holds it: quiet, querying every 100 ms, or in a
//!   transaction begun and then quiet; answers its `local_address`
//!   (as the server saw it) and the taking thread's `tid`;
//! - `{"op": "state"}`: bb8's own counts (`connections`, `idle`), the
//!   workers paused so that they hold still;
//! - `{"op": "resume_workers"}`;
//! - `{"op": "exhaust_and_wait"}`: pauses the workers, takes every idle
//!   connection, then waits for one more until bb8 gives up; answers
//!   `result` (timeout), `active_while_waiting` and the waiter's `tid`;
//! - `{"op": "release", "id": ID}`: gives a held connection back (a busy
//!   one stops first and answers its `queries`);
//! - `{"op": "exit"}`: the workers' `worker_cycles` and `worker_errors` and
//!   the adapter's counters, then exits.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    io::BufRead,
    rc::Rc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use poolscope_adapter::bb8_pg::{Client, InstrumentedPool};
use serde_json::{json, Value};

struct Options {
    port: u16,
    max: u32,
    pool: String,
    timeout: Duration,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        port: 0,
        max: 4,
        pool: "rust-bb8".into(),
        timeout: Duration::from_millis(1000),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => options.port = value.parse().context("--port")?,
            "--max" => options.max = value.parse().context("--max")?,
            "--pool" => options.pool = value,
            "--timeout-ms" => {
                options.timeout = Duration::from_millis(value.parse().context("--timeout-ms")?)
            }
            other => bail!("unknown option {other}"),
        }
    }
    if options.port == 0 {
        bail!("--port is required");
    }
    Ok(options)
}

/// A connection the app holds, and for a busy one the task querying on it.
struct Holding {
    client: Rc<Client<'static>>,
    busy: Option<(tokio::task::JoinHandle<()>, Rc<Cell<u64>>)>,
}

struct App {
    pool: InstrumentedPool,
    held: RefCell<HashMap<String, Holding>>,
    workers_paused: Rc<Cell<bool>>,
    worker_cycles: Rc<Cell<u64>>,
    worker_errors: Rc<Cell<u64>>,
}

fn tid() -> u32 {
    poolscope_adapter::current_tid().unwrap_or(0)
}

/// The client's address as the server saw it.
async fn server_seen_address(client: &Client<'_>) -> Result<String> {
    let row = client
        .query_one(
            "SELECT host(inet_client_addr()) || ':' || inet_client_port()",
            &[],
        )
        .await
        .context("inet_client_addr")?;
    Ok(row.get(0))
}

impl App {
    async fn checkout(&self, id: &str, kind: &str) -> Result<Value> {
        let client = self.pool.get_owned().await.context("get")?;
        let taken_by = tid();
        let local = server_seen_address(&client).await?;
        let client = Rc::new(client);
        let busy = match kind {
            "leak" => None,
            "tx" => {
                client
                    .batch_execute("BEGIN; SELECT 1")
                    .await
                    .context("BEGIN")?;
                None
            }
            "busy" => {
                let queries = Rc::new(Cell::new(0));
                let (on, count) = (Rc::clone(&client), Rc::clone(&queries));
                let task = tokio::task::spawn_local(async move {
                    loop {
                        if on.simple_query("SELECT 1").await.is_ok() {
                            count.set(count.get() + 1);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
                Some((task, queries))
            }
            other => bail!("unknown kind {other}"),
        };
        self.held
            .borrow_mut()
            .insert(id.to_string(), Holding { client, busy });
        Ok(json!({"local_address": local, "tid": taken_by}))
    }

    fn release(&self, id: &str) -> Result<Value> {
        let Some(holding) = self.held.borrow_mut().remove(id) else {
            bail!("nothing held as {id}");
        };
        let mut answer = json!({});
        if let Some((task, queries)) = holding.busy {
            task.abort();
            answer["queries"] = json!(queries.get());
        }
        // The busy task's clone went with the abort (at its next poll):
        // drop ours, the last, so that the connection goes back.
        drop(holding.client);
        Ok(answer)
    }

    async fn pause_workers(&self) {
        self.workers_paused.set(true);
        // A worker mid-cycle finishes it within a query.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    async fn exhaust_and_wait(&self) -> Result<Value> {
        self.pause_workers().await;
        let mut taken = Vec::new();
        while self.pool.state().idle_connections > 0 {
            taken.push(self.pool.get().await.context("take an idle one")?);
        }
        let state = self.pool.state();
        let active = state.connections - state.idle_connections;
        let waiter = tid();
        let result = match self.pool.get().await {
            Ok(_) => "ok",
            Err(poolscope_adapter::bb8_pg::RunError::TimedOut) => "timeout",
            Err(_) => "error",
        };
        drop(taken);
        Ok(json!({"result": result, "active_while_waiting": active, "tid": waiter}))
    }

    fn start_workers(&self, n: u64) {
        for _ in 0..n {
            let pool = self.pool.clone();
            let (paused, cycles, errors) = (
                Rc::clone(&self.workers_paused),
                Rc::clone(&self.worker_cycles),
                Rc::clone(&self.worker_errors),
            );
            tokio::task::spawn_local(async move {
                loop {
                    if paused.get() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    match pool.get().await {
                        Ok(client) => match client.simple_query("SELECT 1").await {
                            Ok(_) => cycles.set(cycles.get() + 1),
                            Err(_) => errors.set(errors.get() + 1),
                        },
                        Err(_) => errors.set(errors.get() + 1),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    }

    async fn handle(&self, request: &Value) -> Result<Value> {
        let id = request["id"].as_str().unwrap_or("");
        match request["op"].as_str().unwrap_or("") {
            "workers" => {
                self.start_workers(request["n"].as_u64().unwrap_or(2));
                Ok(json!({}))
            }
            "checkout" => {
                self.checkout(id, request["kind"].as_str().unwrap_or("leak"))
                    .await
            }
            "state" => {
                self.pause_workers().await;
                let state = self.pool.state();
                Ok(json!({"connections": state.connections, "idle": state.idle_connections}))
            }
            "resume_workers" => {
                self.workers_paused.set(false);
                Ok(json!({}))
            }
            "exhaust_and_wait" => self.exhaust_and_wait().await,
            "release" => self.release(id),
            "exit" => {
                let stats = self.pool.reporter().stats();
                Ok(json!({
                    "worker_cycles": self.worker_cycles.get(),
                    "worker_errors": self.worker_errors.get(),
                    "adapter": {"sent": stats.sent, "dropped": stats.dropped},
                }))
            }
            other => bail!("unknown op {other:?}"),
        }
    }
}

fn reply(mut answer: Value, outcome: Result<()>) {
    match outcome {
        Ok(()) => answer["ok"] = json!(true),
        Err(e) => answer = json!({"ok": false, "error": format!("{e:#}")}),
    }
    println!("{answer}");
}

async fn run(options: Options) -> Result<()> {
    let mut pg = tokio_postgres::Config::new();
    pg.host("127.0.0.1")
        .port(options.port)
        .user("postgres")
        .dbname("postgres")
        .application_name("poolscope-bb8-scenario");
    let pool = InstrumentedPool::builder(&options.pool, pg, tokio_postgres::NoTls)
        .max_size(options.max)
        .min_idle(Some(options.max))
        .connection_timeout(options.timeout)
        .build()
        .await
        .context("cannot build the pool")?;
    let app = App {
        pool,
        held: RefCell::new(HashMap::new()),
        workers_paused: Rc::new(Cell::new(false)),
        worker_cycles: Rc::new(Cell::new(0)),
        worker_errors: Rc::new(Cell::new(0)),
    };
    let state = app.pool.state();
    reply(
        json!({"pid": std::process::id(), "tid": tid(), "connections": state.connections}),
        Ok(()),
    );

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
        let request: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                reply(json!({}), Err(e.into()));
                continue;
            }
        };
        let exit = request["op"] == "exit";
        match app.handle(&request).await {
            Ok(answer) => reply(answer, Ok(())),
            Err(e) => reply(json!({}), Err(e)),
        }
        if exit {
            break;
        }
    }
    app.pool.reporter().flush(Duration::from_secs(1));
    Ok(())
}

fn main() -> Result<()> {
    let options = parse_args()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    tokio::task::LocalSet::new().block_on(&runtime, run(options))
}
