//! A deadpool-postgres pool that reports to poolscope by itself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use poolscope_adapter::deadpool_pg::InstrumentedPool;
//!
//! let pg: tokio_postgres::Config = "host=127.0.0.1 user=app dbname=shop".parse()?;
//! let pool = InstrumentedPool::builder("orders", pg, tokio_postgres::NoTls)
//!     .max_size(16)
//!     .build()?;
//! let client = pool.get().await?; // acquire_start, acquire_end
//! client.query_one("SELECT 1", &[]).await?;
//! drop(client); // release
//! # Ok(()) }
//! ```
//!
//! # How connections are named
//!
//! tokio-postgres keeps its socket to itself: neither `Client` nor the
//! `Connection` future shows its fd or address, and deadpool's hooks only
//! see the `Client`. So this pool's [`Manager`] opens each connection's
//! socket itself (TCP or Unix, following the `tokio_postgres::Config`: hosts,
//! `hostaddr`, ports, `connect_timeout`, keepalives, `tcp_user_timeout`,
//! `target_session_attrs`), reads its fd and, for TCP, its local address
//! (`getsockname`), and only then runs the PostgreSQL startup (and TLS, with
//! the connector you give) over it with `Config::connect_raw`. Every message
//! about that connection carries both names, so the agent can match it to
//! the socket it saw in the kernel whichever it knows first.
//!
//! The events:
//! - `pool` when the pool is built (again on each new connection and on
//!   [`InstrumentedPool::resize`], so an agent that restarted learns it);
//! - `connection_created` when the manager has a ready connection;
//! - `acquire_start` / `acquire_end` around [`InstrumentedPool::get`]
//!   (`timeout` for deadpool's `PoolError::Timeout`, `error` for any other
//!   error or when the caller drops the `get()` future before it finishes);
//! - `release` when the [`Client`] is dropped, sent *before* the connection
//!   goes back to the pool, so it always precedes the next `acquire_end`;
//! - `connection_closed` when the pool discards a connection (failed
//!   recycle, pool closed or shrunk) or its socket ends (the server hung up),
//!   whichever comes first, once.
//!
//! # Differences from `deadpool_postgres::Pool`
//! - The pool error is `PoolError<`[`Error`]`>`: tokio-postgres errors cannot
//!   be built outside tokio-postgres, so socket errors have their own variant.
//! - `load_balance_hosts=random` is not honoured: hosts (and the addresses a
//!   name resolves to) are tried in order.
//! - `Client::cancel_token().cancel_query()` does not know the address
//!   (connect_raw leaves it unset); use [`Client::cancel_query`], which
//!   sends the cancel request to the same server without TLS (as libpq
//!   before PostgreSQL 17 does).
//! - `Manager::statement_caches` (clearing every connection's cache at once)
//!   is not there; each connection's cache is `client.statement_cache`.

use std::{
    fmt,
    future::Future,
    ops::Deref,
    panic::Location,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
pub use deadpool::managed::{PoolConfig, QueueMode, Status, TimeoutType, Timeouts};
pub use deadpool::Runtime;
pub use deadpool_postgres::{ClientWrapper, ManagerConfig, RecyclingMethod};
use tokio_postgres::{
    tls::{MakeTlsConnect, TlsConnect},
    Config as PgConfig,
};

pub use crate::pg_connect::{Error, Stream};
use crate::{
    pg_connect::{ConnShared, PgConnector},
    AcquireResult, ConnId, PoolInfo, PoolReporter, Reporter,
};

/// The library name sent in the `pool` message.
pub const LIBRARY: &str = "deadpool-postgres";

/// What [`InstrumentedPool::get`] fails with.
pub type PoolError = managed::PoolError<Error>;
pub type BuildError = managed::BuildError;

/// One pooled connection: deadpool-postgres' [`ClientWrapper`] (with its
/// statement cache) and what names it.
pub struct Connection {
    client: ClientWrapper,
    shared: Arc<ConnShared>,
}

impl Connection {
    /// The connection's fd and (TCP) local address, as reported.
    pub fn conn_id(&self) -> ConnId {
        self.shared.id
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
        // Runs before `client` is dropped (which closes the socket), so the
        // agent hears of it before the kernel's close.
        self.shared.closed();
    }
}

/// A deadpool [`managed::Manager`] for tokio-postgres connections whose
/// sockets it opens itself (see the module docs).
pub struct Manager {
    connector: PgConnector,
    config: ManagerConfig,
    pool: Arc<PoolReporter>,
    max_size: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("pg_config", &self.connector.pg_config)
            .field("config", &self.config)
            .field("pool", &self.pool.name())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// The `pool` message for this pool.
    pub fn pool_info(&self) -> PoolInfo {
        let max = self.max_size.load(Ordering::Relaxed);
        self.connector.pool_info(max, LIBRARY)
    }

    fn register(&self) {
        self.pool.register(&self.pool_info());
    }

    async fn connect(&self) -> Result<Connection, Error> {
        let connected = self.connector.connect(&self.pool).await?;
        let client = ClientWrapper::new(connected.client, connected.task);
        let conn = Connection {
            client,
            shared: connected.shared,
        };
        self.register();
        conn.shared.announce();
        Ok(conn)
    }
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = Error;

    async fn create(&self) -> Result<Connection, Error> {
        self.connect().await
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<Error> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("Connection closed"));
        }
        if let Some(sql) = self.config.recycling_method.query() {
            conn.client
                .simple_query(sql)
                .await
                .map_err(|e| RecycleError::Backend(Error::Postgres(e)))?;
        }
        Ok(())
    }
}

/// A connection checked out of an [`InstrumentedPool`]; derefs to
/// deadpool-postgres' [`ClientWrapper`] (and so to `tokio_postgres::Client`).
/// Dropping it reports `release` and returns the connection to the pool.
pub struct Client {
    // Dropped after `Drop::drop` has sent `release`.
    obj: managed::Object<Manager>,
}

impl Client {
    /// The connection's fd and (TCP) local address, as reported.
    pub fn conn_id(&self) -> ConnId {
        self.obj.shared.id
    }

    /// Asks the server to cancel what this connection is running, over a
    /// new socket to the same server, without TLS.
    pub async fn cancel_query(&self) -> Result<(), Error> {
        let token = self.obj.client.cancel_token();
        self.obj.shared.target.cancel(token).await
    }
}

impl Deref for Client {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.obj.client
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.obj.client
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("conn_id", &self.conn_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Before the object goes back to the pool (when `obj` is dropped,
        // right after this), so that the next holder's acquire_end comes
        // after this release.
        self.obj.shared.pool.release(self.obj.shared.id);
    }
}

/// A deadpool-postgres pool that reports its connections' lives to the
/// poolscope agent. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct InstrumentedPool {
    pool: managed::Pool<Manager>,
}

impl fmt::Debug for InstrumentedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumentedPool")
            .field("name", &self.name())
            .field("status", &self.status())
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
            manager_config: ManagerConfig::default(),
            reporter: None,
            pool_config: PoolConfig::default(),
            runtime: Some(Runtime::Tokio1),
            batch_window: crate::BATCH_WINDOW,
            stacks: crate::StackOptions::default(),
        }
    }

    /// A builder from a `deadpool_postgres::Config` (as read from a file or
    /// the environment): its connection, manager and pool settings.
    pub fn builder_from_config<T>(
        name: &str,
        config: &deadpool_postgres::Config,
        tls: T,
    ) -> Result<PoolBuilder, deadpool_postgres::ConfigError>
    where
        T: MakeTlsConnect<Stream> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Stream>>::Future: Send,
    {
        let mut builder = InstrumentedPool::builder(name, config.get_pg_config()?, tls);
        builder.manager_config = config.get_manager_config();
        builder.pool_config = config.get_pool_config();
        Ok(builder)
    }

    /// Checks a connection out: reports `acquire_start`, then `acquire_end`
    /// with the connection (or `timeout` / `error`). An `async fn` for its
    /// caller; the place that calls it heads the checkout's holder stack.
    #[track_caller]
    pub fn get(&self) -> impl Future<Output = Result<Client, PoolError>> + '_ {
        self.get_with(None, Location::caller())
    }

    /// [`InstrumentedPool::get`] with other timeouts than the pool's.
    #[track_caller]
    pub fn timeout_get<'a>(
        &'a self,
        timeouts: &'a Timeouts,
    ) -> impl Future<Output = Result<Client, PoolError>> + 'a {
        self.get_with(Some(timeouts), Location::caller())
    }

    async fn get_with(
        &self,
        timeouts: Option<&Timeouts>,
        caller: &'static Location<'static>,
    ) -> Result<Client, PoolError> {
        let reporter = &self.pool.manager().pool;
        // Dropped unfinished (the caller gave up waiting): reports `error`.
        let pending = reporter.acquire_start_from(caller);
        let got = match timeouts {
            Some(t) => self.pool.timeout_get(t).await,
            None => self.pool.get().await,
        };
        match got {
            Ok(obj) => {
                pending.finish(AcquireResult::Ok(obj.shared.id));
                Ok(Client { obj })
            }
            Err(e) => {
                pending.finish(match e {
                    managed::PoolError::Timeout(_) => AcquireResult::Timeout,
                    _ => AcquireResult::Error,
                });
                Err(e)
            }
        }
    }

    pub fn name(&self) -> &str {
        self.pool.manager().pool.name()
    }

    pub fn reporter(&self) -> &Reporter {
        self.pool.manager().pool.reporter()
    }

    pub fn status(&self) -> Status {
        self.pool.status()
    }

    pub fn timeouts(&self) -> Timeouts {
        self.pool.timeouts()
    }

    /// Changes the most connections, and tells the agent.
    pub fn resize(&self, max_size: usize) {
        self.pool.resize(max_size);
        let manager = self.pool.manager();
        manager.max_size.store(max_size, Ordering::Relaxed);
        manager.register();
    }

    /// Closes the pool: idle connections are closed (and reported), checked
    /// out ones when they come back.
    pub fn close(&self) {
        self.pool.close();
    }

    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    pub fn manager(&self) -> &Manager {
        self.pool.manager()
    }
}

/// Builds an [`InstrumentedPool`]; defaults are deadpool's (at most
/// `cpu_count * 2` connections, waiting without limit), on the Tokio runtime.
pub struct PoolBuilder {
    name: String,
    connector: PgConnector,
    manager_config: ManagerConfig,
    reporter: Option<Reporter>,
    pool_config: PoolConfig,
    runtime: Option<Runtime>,
    batch_window: Duration,
    stacks: crate::StackOptions,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("name", &self.name)
            .field("pool_config", &self.pool_config)
            .finish_non_exhaustive()
    }
}

impl PoolBuilder {
    /// How connections are recycled (deadpool-postgres' [`ManagerConfig`]).
    pub fn manager_config(mut self, config: ManagerConfig) -> Self {
        self.manager_config = config;
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

    /// Where to report; [`Reporter::from_env`] unless set.
    pub fn reporter(mut self, reporter: Reporter) -> Self {
        self.reporter = Some(reporter);
        self
    }

    pub fn config(mut self, config: PoolConfig) -> Self {
        self.pool_config = config;
        self
    }

    pub fn max_size(mut self, max_size: usize) -> Self {
        self.pool_config.max_size = max_size;
        self
    }

    pub fn wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_config.timeouts.wait = timeout;
        self
    }

    pub fn create_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_config.timeouts.create = timeout;
        self
    }

    pub fn recycle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_config.timeouts.recycle = timeout;
        self
    }

    pub fn queue_mode(mut self, mode: QueueMode) -> Self {
        self.pool_config.queue_mode = mode;
        self
    }

    /// The runtime for timeouts; Tokio unless set.
    pub fn runtime(mut self, runtime: Option<Runtime>) -> Self {
        self.runtime = runtime;
        self
    }

    /// Builds the pool and sends its `pool` message. No connection is
    /// opened until the first `get()`.
    pub fn build(self) -> Result<InstrumentedPool, BuildError> {
        let reporter = self.reporter.unwrap_or_else(Reporter::from_env);
        let manager = Manager {
            connector: self.connector,
            config: self.manager_config,
            pool: Arc::new(self.stacks.apply(
                PoolReporter::new(reporter, &self.name).with_batch_window(self.batch_window),
            )),
            max_size: std::sync::atomic::AtomicUsize::new(self.pool_config.max_size),
        };
        let mut builder = managed::Pool::builder(manager).config(self.pool_config);
        if let Some(runtime) = self.runtime {
            builder = builder.runtime(runtime);
        }
        let pool = builder.build()?;
        pool.manager().register();
        Ok(InstrumentedPool { pool })
    }
}

#[cfg(test)]
mod tests;
