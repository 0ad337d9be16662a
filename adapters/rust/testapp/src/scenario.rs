//! The leak scenario app of the integration tests
//! (tests/tests/adapter_rust.rs), whatever pool it drives: `bb8_scenario`
//! and `sqlx_scenario` each build their pool and hand it to [`serve`]. One
//! JSON request per line on stdin, one JSON answer line each (`"ok":
//! true`, or `"ok": false` with `"error"`). Everything runs on one thread
//! (a current-thread tokio runtime), so the thread that takes every
//! connection is the main thread, whose id the startup line gives.
//!
//! `<app> --port PORT [--max 4] [--pool NAME] [--timeout-ms 1000]
//! [--system postgresql|mysql]` (the server on 127.0.0.1:PORT: PostgreSQL
//! with user and database `postgres`, or MySQL/MariaDB with user `poolscope`
//! and database `poolscope`, where the app supports it); then:
//! - `{"op": "workers", "n": N}`: N tasks borrow, query and return in a loop;
//! - `{"op": "checkout", "id": ID, "kind": "leak"|"busy"|"tx"}`: takes a
//!   connection and holds it: quiet, querying every 100 ms, or in a
//!   transaction begun and then quiet; answers its `local_address`
//!   (as the server saw it) and the taking thread's `tid`. A `leak` takes
//!   it in [`take_a_connection_to_leak`], which the leak report's holder
//!   stack must name;
//! - `{"op": "state"}`: the pool's own counts (`connections`, `idle`), the
//!   workers paused so that they hold still;
//! - `{"op": "resume_workers"}`;
//! - `{"op": "exhaust_and_wait"}`: pauses the workers, takes every idle
//!   connection, then waits for one more until the pool gives up; answers
//!   `result` (timeout), `active_while_waiting` and the waiter's `tid`;
//! - `{"op": "release", "id": ID}`: gives a held connection back (a busy
//!   one stops first and answers its `queries`);
//! - `{"op": "exit"}`: the workers' `worker_cycles` and `worker_errors` and
//!   the adapter's counters, then exits.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    future::Future,
    io::BufRead,
    pin::Pin,
    rc::Rc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use poolscope_adapter::Reporter;
use serde_json::{json, Value};

pub struct Options {
    pub port: u16,
    pub max: u32,
    pub pool: String,
    pub timeout: Duration,
    pub system: String,
}

pub fn parse_args(default_pool: &str) -> Result<Options> {
    let mut options = Options {
        port: 0,
        max: 4,
        pool: default_pool.into(),
        timeout: Duration::from_millis(1000),
        system: "postgresql".into(),
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
            "--system" => options.system = value,
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

/// How a checkout ended without a connection.
pub enum NoConnection {
    TimedOut,
    Failed(anyhow::Error),
}

/// What the scenario needs of a pool.
pub trait ScenarioPool: Clone + 'static {
    type Conn: 'static;

    async fn get(&self) -> Result<Self::Conn, NoConnection>;
    /// Runs `sql` (one or more statements) on `conn`.
    async fn execute(conn: &mut Self::Conn, sql: &str) -> Result<()>;
    /// The text of the one value `sql` returns.
    async fn text(conn: &mut Self::Conn, sql: &str) -> Result<String>;
    /// The pool's own counts: connections open, idle ones.
    fn counts(&self) -> (u32, u32);
    /// A query whose one value is the connection's "ip:port" as the server
    /// sees it.
    fn client_address_sql(&self) -> &'static str {
        "SELECT host(inet_client_addr()) || ':' || inet_client_port()"
    }
    fn reporter(&self) -> &Reporter;
}

/// A connection the app holds, and for a busy one the task querying on it.
struct Holding<C> {
    conn: Rc<tokio::sync::Mutex<C>>,
    busy: Option<(tokio::task::JoinHandle<()>, Rc<Cell<u64>>)>,
}

struct App<P: ScenarioPool> {
    pool: P,
    held: RefCell<HashMap<String, Holding<P::Conn>>>,
    workers_paused: Rc<Cell<bool>>,
    worker_cycles: Rc<Cell<u64>>,
    worker_errors: Rc<Cell<u64>>,
}

pub fn tid() -> u32 {
    poolscope_adapter::current_tid().unwrap_or(0)
}

async fn get<P: ScenarioPool>(pool: &P) -> Result<P::Conn> {
    match pool.get().await {
        Ok(conn) => Ok(conn),
        Err(NoConnection::TimedOut) => bail!("timed out"),
        Err(NoConnection::Failed(e)) => Err(e),
    }
}

/// Takes the connection a `leak` checkout never gives back: the code the
/// adapter's holder stack must name. Awaited as a `dyn Future`, so that
/// its poll is a frame of its own (named from the symbol table) even in a
/// release build without debug info, where the poll of an async fn
/// awaited directly is inlined into its caller's.
fn take_a_connection_to_leak<P: ScenarioPool>(
    pool: &P,
) -> Pin<Box<dyn Future<Output = Result<P::Conn>> + '_>> {
    Box::pin(async move { get(pool).await })
}

impl<P: ScenarioPool> App<P> {
    async fn checkout(&self, id: &str, kind: &str) -> Result<Value> {
        let taken = match kind {
            "leak" => take_a_connection_to_leak(&self.pool).await,
            _ => get(&self.pool).await,
        };
        let mut conn = taken.context("get")?;
        let taken_by = tid();
        // The client's address as the server saw it.
        let local = P::text(&mut conn, self.pool.client_address_sql())
            .await
            .context("the client's address")?;
        if kind == "tx" {
            P::execute(&mut conn, "BEGIN; SELECT 1")
                .await
                .context("BEGIN")?;
        }
        let conn = Rc::new(tokio::sync::Mutex::new(conn));
        let busy = match kind {
            "leak" | "tx" => None,
            "busy" => {
                let queries = Rc::new(Cell::new(0));
                let (on, count) = (Rc::clone(&conn), Rc::clone(&queries));
                let task = tokio::task::spawn_local(async move {
                    loop {
                        if P::execute(&mut *on.lock().await, "SELECT 1").await.is_ok() {
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
            .insert(id.to_string(), Holding { conn, busy });
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
        drop(holding.conn);
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
        while self.pool.counts().1 > 0 {
            taken.push(get(&self.pool).await.context("take an idle one")?);
        }
        let (connections, idle) = self.pool.counts();
        let waiter = tid();
        let result = match self.pool.get().await {
            Ok(_) => "ok",
            Err(NoConnection::TimedOut) => "timeout",
            Err(NoConnection::Failed(_)) => "error",
        };
        drop(taken);
        Ok(json!({"result": result, "active_while_waiting": connections - idle, "tid": waiter}))
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
                        Ok(mut conn) => match P::execute(&mut conn, "SELECT 1").await {
                            Ok(()) => cycles.set(cycles.get() + 1),
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
                let (connections, idle) = self.pool.counts();
                Ok(json!({"connections": connections, "idle": idle}))
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

/// Announces the app (pid, the main thread's id, the pool's connections)
/// and serves requests until `exit` or the end of stdin.
pub async fn serve<P: ScenarioPool>(pool: P) -> Result<()> {
    let app = App {
        pool,
        held: RefCell::new(HashMap::new()),
        workers_paused: Rc::new(Cell::new(false)),
        worker_cycles: Rc::new(Cell::new(0)),
        worker_errors: Rc::new(Cell::new(0)),
    };
    reply(
        json!({"pid": std::process::id(), "tid": tid(), "connections": app.pool.counts().0}),
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

/// Runs `f` on a current-thread runtime with a `LocalSet`.
pub fn run_local(f: impl Future<Output = Result<()>>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    tokio::task::LocalSet::new().block_on(&runtime, f)
}
