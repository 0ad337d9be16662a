//! A bb8 pool of tokio-postgres connections that reports to poolscope by
//! itself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use poolscope_adapter::bb8_pg::InstrumentedPool;
//!
//! let pg: tokio_postgres::Config = "host=127.0.0.1 user=app dbname=shop".parse()?;
//! let pool = InstrumentedPool::builder("orders", pg, tokio_postgres::NoTls)
//!     .max_size(16)
//!     .build()
//!     .await?;
//! let client = pool.get().await?; // acquire_start, acquire_end
//! client.query_one("SELECT 1", &[]).await?;
//! drop(client); // release
//! # Ok(()) }
//! ```
//!
//! # How connections are named
//!
//! As in `deadpool_pg`: bb8-postgres' `PostgresConnectionManager` hands
//! tokio-postgres its own socket, which no one can name afterwards, so this
//! pool's [`Manager`] opens each socket itself (following the
//! `tokio_postgres::Config`), reads its fd and local address, and runs the
//! startup over it with `Config::connect_raw`. Every message about that
//! connection names its socket, so the agent joins it to what it sees in
//! the kernel: quiet or busy, idle in a transaction, the last query.
//!
//! The events:
//! - `pool` when the pool is built and on each new connection (with
//!   `max_size` and `min_idle`);
//! - `connection_created` when the manager has a ready connection (bb8
//!   makes them on its own tasks, not the caller's);
//! - `acquire_start` / `acquire_end` around [`InstrumentedPool::get`]
//!   (`timeout` for bb8's `RunError::TimedOut`, `error` for a connection
//!   error or when the caller drops the `get()` future before it finishes);
//! - `release` when the [`Client`] is dropped, before the connection goes
//!   back to the pool (bb8 puts it back synchronously, on the same thread);
//! - `connection_closed` when bb8 drops a connection (broken, past its
//!   lifetime or idle timeout, the pool dropped) or its socket ends,
//!   whichever comes first, once.
//!
//! # Differences from `bb8::Pool<PostgresConnectionManager<T>>`
//! - Checkouts go through [`InstrumentedPool::get`] (or `get_owned`); the
//!   pool beneath ([`InstrumentedPool::inner`]) hands out connections the
//!   agent hears nothing of until they close.
//! - The error is `RunError<`[`Error`]`>`: tokio-postgres errors cannot be
//!   built outside tokio-postgres, so socket errors have their own variant.
//! - Hosts (and the addresses a name resolves to) are tried in order;
//!   cancel a query with [`Client::cancel_query`].

use std::{
    fmt,
    future::Future,
    ops::{Deref, DerefMut},
    panic::Location,
    sync::Arc,
    time::Duration,
};

pub use bb8::{RunError, State};
use tokio::task::JoinHandle;
use tokio_postgres::{
    tls::{MakeTlsConnect, TlsConnect},
    Client as PgClient, Config as PgConfig,
};

pub use crate::pg_connect::{Error, Stream};
use crate::{
    pg_connect::{ConnShared, PgConnector},
    AcquireResult, ConnId, PendingAcquire, PoolInfo, PoolReporter, Reporter,
};

/// The library name sent in the `pool` message.
pub const LIBRARY: &str = "bb8";

/// One pooled connection: the tokio-postgres client and what names it.
pub struct Connection {
    client: PgClient,
    driver: JoinHandle<()>,
    shared: Arc<ConnShared>,
}

impl Connection {
    /// The connection's fd and (TCP) local address, as reported.
    pub fn conn_id(&self) -> ConnId {
        self.shared.id
    }
}

/// What the bb8 pool beneath ([`InstrumentedPool::inner`]) hands out
/// derefs to the client.
impl Deref for Connection {
    type Target = PgClient;

    fn deref(&self) -> &PgClient {
        &self.client
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("conn_id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Before the socket closes with the driver, so that the agent hears
        // of it before the kernel's close.
        self.shared.closed();
        self.driver.abort();
    }
}

/// A bb8 [`bb8::ManageConnection`] for tokio-postgres connections whose
/// sockets it opens itself (see the module docs).
pub struct Manager {
    connector: PgConnector,
    pool: Arc<PoolReporter>,
    max_size: u32,
    min_idle: Option<u32>,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("pg_config", &self.connector.pg_config)
            .field("pool", &self.pool.name())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// The `pool` message for this pool.
    pub fn pool_info(&self) -> PoolInfo {
        let max = usize::try_from(self.max_size).unwrap_or(usize::MAX);
        PoolInfo {
            min_idle: self.min_idle,
            ..self.connector.pool_info(max, LIBRARY)
        }
    }

    fn register(&self) {
        self.pool.register(&self.pool_info());
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = Error;

    async fn connect(&self) -> Result<Connection, Error> {
        let connected = self.connector.connect(&self.pool).await?;
        let conn = Connection {
            client: connected.client,
            driver: connected.task,
            shared: connected.shared,
        };
        self.register();
        conn.shared.announce();
        Ok(conn)
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), Error> {
        conn.client.simple_query("").await.map(drop)?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.client.is_closed()
    }
}

/// A connection checked out of an [`InstrumentedPool`]; derefs to
/// `tokio_postgres::Client`. Dropping it reports `release` and returns the
/// connection to the pool.
pub struct Client<'a> {
    conn: bb8::PooledConnection<'a, Manager>,
}

impl Client<'_> {
    /// The connection's fd and (TCP) local address, as reported.
    pub fn conn_id(&self) -> ConnId {
        self.conn.shared.id
    }

    /// Asks the server to cancel what this connection is running, over a
    /// new socket to the same server, without TLS.
    pub async fn cancel_query(&self) -> Result<(), Error> {
        let token = self.conn.client.cancel_token();
        self.conn.shared.target.cancel(token).await
    }
}

impl Deref for Client<'_> {
    type Target = PgClient;

    fn deref(&self) -> &PgClient {
        &self.conn.client
    }
}

impl DerefMut for Client<'_> {
    fn deref_mut(&mut self) -> &mut PgClient {
        &mut self.conn.client
    }
}

impl fmt::Debug for Client<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("conn_id", &self.conn_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Client<'_> {
    fn drop(&mut self) {
        // Before `conn` puts the connection back (right after this), so
        // that the next holder's acquire_end comes after this release.
        self.conn.shared.pool.release(self.conn.shared.id);
    }
}

/// A bb8 pool that reports its connections' lives to the poolscope agent.
/// Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct InstrumentedPool {
    pool: bb8::Pool<Manager>,
    // The manager's, which bb8 does not show again.
    reporter: Arc<PoolReporter>,
}

impl fmt::Debug for InstrumentedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumentedPool")
            .field("name", &self.name())
            .field("state", &self.state())
            .finish()
    }
}

impl InstrumentedPool {
    /// A pool named `name` (unique within the process, at most 128
    /// characters) of connections made from `pg_config` with `tls`
    /// (`tokio_postgres::NoTls` or any `MakeTlsConnect<`[`Stream`]`>`).
    pub fn builder<T>(name: &str, pg_config: PgConfig, tls: T) -> PoolBuilder
    where
        T: MakeTlsConnect<Stream> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Stream>>::Future: Send,
    {
        PoolBuilder {
            name: name.to_string(),
            connector: PgConnector::new(pg_config, tls),
            builder: bb8::Pool::builder(),
            max_size: 10,
            min_idle: None,
            reporter: None,
            batch_window: crate::BATCH_WINDOW,
            stacks: crate::StackOptions::default(),
        }
    }

    /// Checks a connection out: reports `acquire_start`, then `acquire_end`
    /// with the connection (or `timeout` / `error`). An `async fn` for its
    /// caller; the place that calls it heads the checkout's holder stack.
    #[track_caller]
    pub fn get(&self) -> impl Future<Output = Result<Client<'_>, RunError<Error>>> + '_ {
        let caller = Location::caller();
        async move {
            let pending = self.reporter.acquire_start_from(caller);
            let got = self.pool.get().await;
            finish(pending, got.map(|conn| Client { conn }))
        }
    }

    /// [`InstrumentedPool::get`], for a connection that outlives the borrow
    /// of the pool.
    #[track_caller]
    pub fn get_owned(&self) -> impl Future<Output = Result<Client<'static>, RunError<Error>>> + '_ {
        let caller = Location::caller();
        async move {
            let pending = self.reporter.acquire_start_from(caller);
            let got = self.pool.get_owned().await;
            finish(pending, got.map(|conn| Client { conn }))
        }
    }

    pub fn name(&self) -> &str {
        self.reporter.name()
    }

    pub fn reporter(&self) -> &Reporter {
        self.reporter.reporter()
    }

    /// bb8's counts: connections, idle ones, and its statistics.
    pub fn state(&self) -> State {
        self.pool.state()
    }

    /// The bb8 pool beneath: what it hands out is not reported.
    pub fn inner(&self) -> &bb8::Pool<Manager> {
        &self.pool
    }
}

/// Ends an acquire as it went.
fn finish<'a>(
    pending: PendingAcquire<'_>,
    got: Result<Client<'a>, RunError<Error>>,
) -> Result<Client<'a>, RunError<Error>> {
    match &got {
        Ok(client) => pending.finish(AcquireResult::Ok(client.conn_id())),
        Err(RunError::TimedOut) => pending.finish(AcquireResult::Timeout),
        Err(RunError::User(_)) => pending.finish(AcquireResult::Error),
    }
    got
}

/// Builds an [`InstrumentedPool`]; defaults are bb8's (10 connections,
/// 30 s to get one), on the Tokio runtime.
pub struct PoolBuilder {
    name: String,
    connector: PgConnector,
    builder: bb8::Builder<Manager>,
    max_size: u32,
    min_idle: Option<u32>,
    reporter: Option<Reporter>,
    batch_window: Duration,
    stacks: crate::StackOptions,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("name", &self.name)
            .field("max_size", &self.max_size)
            .finish_non_exhaustive()
    }
}

impl PoolBuilder {
    /// Where to report; [`Reporter::from_env`] unless set.
    pub fn reporter(mut self, reporter: Reporter) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// How long short checkouts wait to be folded into one line
    /// ([`crate::BATCH_WINDOW`]; zero: every event sent at once).
    pub fn batch_window(mut self, window: Duration) -> Self {
        self.batch_window = window;
        self
    }

    /// Whether checkouts keep the stack of the code that took the
    /// connection, sent for those held past `stack_after` (default: on,
    /// unless `POOLSCOPE_ADAPTER_STACKS=off`).
    pub fn holder_stacks(mut self, on: bool) -> Self {
        self.stacks.on = Some(on);
        self
    }

    /// How long a checkout is held before its stack is sent (default
    /// `POOLSCOPE_ADAPTER_STACK_AFTER_MS`, else [`crate::DEFAULT_STACK_AFTER`]).
    pub fn stack_after(mut self, after: Duration) -> Self {
        self.stacks.after = Some(after);
        self
    }

    /// The least time since the process's last stack capture for a
    /// checkout to capture its stack (default
    /// `POOLSCOPE_ADAPTER_STACK_INTERVAL_US`, else
    /// [`crate::DEFAULT_STACK_INTERVAL`]; zero: every checkout).
    pub fn stack_interval(mut self, interval: Duration) -> Self {
        self.stacks.interval = Some(interval);
        self
    }

    pub fn max_size(mut self, max_size: u32) -> Self {
        self.max_size = max_size;
        self.builder = self.builder.max_size(max_size);
        self
    }

    pub fn min_idle(mut self, min_idle: Option<u32>) -> Self {
        self.min_idle = min_idle;
        self.builder = self.builder.min_idle(min_idle);
        self
    }

    /// How long `get` waits before `RunError::TimedOut`.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.builder = self.builder.connection_timeout(timeout);
        self
    }

    pub fn test_on_check_out(mut self, test: bool) -> Self {
        self.builder = self.builder.test_on_check_out(test);
        self
    }

    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.builder = self.builder.max_lifetime(lifetime);
        self
    }

    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.builder = self.builder.idle_timeout(timeout);
        self
    }

    /// Any other bb8 setting (queue strategy, reaper rate, error sink...);
    /// `max_size` and `min_idle` belong to this builder, which reports them.
    pub fn configure(
        mut self,
        f: impl FnOnce(bb8::Builder<Manager>) -> bb8::Builder<Manager>,
    ) -> Self {
        self.builder = f(self.builder)
            .max_size(self.max_size)
            .min_idle(self.min_idle);
        self
    }

    fn manager(self) -> (bb8::Builder<Manager>, Manager, Arc<PoolReporter>) {
        let reporter = self.reporter.unwrap_or_else(Reporter::from_env);
        let manager = Manager {
            connector: self.connector,
            pool: Arc::new(self.stacks.apply(
                PoolReporter::new(reporter, &self.name).with_batch_window(self.batch_window),
            )),
            max_size: self.max_size,
            min_idle: self.min_idle,
        };
        manager.register();
        let reporter = Arc::clone(&manager.pool);
        (self.builder, manager, reporter)
    }

    /// Builds the pool and sends its `pool` message, then waits for its
    /// `min_idle` connections (as bb8's `build`).
    pub async fn build(self) -> Result<InstrumentedPool, Error> {
        let (builder, manager, reporter) = self.manager();
        Ok(InstrumentedPool {
            pool: builder.build(manager).await?,
            reporter,
        })
    }

    /// Builds the pool without waiting for a connection.
    pub fn build_unchecked(self) -> InstrumentedPool {
        let (builder, manager, reporter) = self.manager();
        InstrumentedPool {
            pool: builder.build_unchecked(manager),
            reporter,
        }
    }
}

#[cfg(test)]
mod tests;
