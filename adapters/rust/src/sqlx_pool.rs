//! sqlx pools (`PgPool`, `MySqlPool`) that report to poolscope by
//! themselves.
//!
//! ```no_run
//! # #[cfg(feature = "sqlx-postgres")]
//! # async fn demo() -> Result<(), sqlx::Error> {
//! use poolscope_adapter::sqlx_pool::InstrumentedPool;
//!
//! let pool = InstrumentedPool::<sqlx::Postgres>::builder("orders")
//!     .max_connections(16)
//!     .connect("postgres://app@127.0.0.1/shop")
//!     .await?;
//! let mut conn = pool.acquire().await?; // acquire_start, acquire_end
//! sqlx::query("SELECT 1").execute(&mut *conn).await?;
//! drop(conn); // release
//! # Ok(()) }
//! ```
//!
//! # How connections are named
//!
//! sqlx hides its sockets: no fd, no address, and no way to hand it a
//! socket opened outside. So each connection gets an id of this pool's
//! (`conn`) in `after_connect`, where the pool also asks the server which
//! address the connection comes from (`inet_client_addr()` and
//! `inet_client_port()` on PostgreSQL, the process list's `host` on
//! MySQL/MariaDB). For a direct TCP connection that is the socket's local
//! address, sent beside the id: the agent joins the connection to the
//! kernel's view of it (quiet or busy, idle in a transaction, the last
//! query). Through a proxy or NAT the server sees another address, which
//! names no socket of this process; over a Unix socket it sees none. The
//! connection is then known by its id alone, and on a current-thread
//! runtime (where the connect ran on the thread that reports it) the
//! `connection_created` says which thread connected it, so that the agent
//! may tie it to its socket from the kernel's connects when exactly one
//! fits (docs/adapter-protocol.md).
//!
//! Which connection a checkout got is read from the connection value:
//! `PgConnection` and `MySqlConnection` are each one private `Box` whose
//! address stays the connection's while it lives (the value itself moves
//! between the pool and its holders). [`connection_identity`] reads it; a
//! sqlx whose connection types are anything more than that pointer fails
//! to compile here rather than misname connections.
//!
//! The events:
//! - `pool` when the pool is built (max, min, server, database);
//! - `connection_created` from `after_connect`;
//! - `acquire_start` / `acquire_end` around [`InstrumentedPool::acquire`]
//!   (`timeout` for `sqlx::Error::PoolTimedOut`, `error` for any other
//!   error or when the caller drops the future first);
//! - `release` when the [`PoolConnection`] is dropped, before sqlx takes
//!   the connection back;
//! - `connection_closed` for a connection whose place a new one took (sqlx
//!   says nothing when it closes one): late, so the socket's close, which
//!   the kernel shows at once, is what the agent goes by where it knows the
//!   socket.
//!
//! # Differences from `sqlx::Pool`
//! - Checkouts go through [`InstrumentedPool::acquire`]; the pool beneath
//!   ([`InstrumentedPool::inner`]) hands out connections the agent hears
//!   nothing of, and so do `&Pool` executors (`query.fetch_one(&pool)`).
//! - `after_connect` is this pool's: set your own through
//!   [`PoolBuilder::configure`] and it replaces this one.

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    ops::{Deref, DerefMut},
    panic::Location,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{
    pool::{PoolConnectionMetadata, PoolOptions},
    Database,
};

use crate::{batch::FastMap, AcquireResult, ConnId, DbSystem, PoolInfo, PoolReporter, Reporter};

/// The library name sent in the `pool` message.
pub const LIBRARY: &str = "sqlx";

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What this pool needs of a sqlx database beyond sqlx's traits: its name
/// in the protocol, where its connect options point, and how the server
/// says where a connection comes from.
pub trait Backend: Database {
    /// `db_system`.
    fn system() -> DbSystem;

    /// Host (or Unix socket path), port and database of `options`.
    fn server(options: &ConnectOptions<Self>) -> (String, Option<u16>, Option<String>);

    /// The connection's address as the server sees it, if it sees one.
    fn client_address(conn: &mut Self::Connection) -> BoxFuture<'_, Option<SocketAddr>>;
}

type ConnectOptions<DB> = <<DB as Database>::Connection as sqlx::Connection>::Options;

#[cfg(feature = "sqlx-postgres")]
impl Backend for sqlx::Postgres {
    fn system() -> DbSystem {
        DbSystem::Postgresql
    }

    fn server(options: &sqlx::postgres::PgConnectOptions) -> (String, Option<u16>, Option<String>) {
        let host = match options.get_socket() {
            Some(dir) => dir.display().to_string(),
            None => options.get_host().to_string(),
        };
        let database = options.get_database().map(str::to_string);
        (host, Some(options.get_port()), database)
    }

    fn client_address(conn: &mut sqlx::PgConnection) -> BoxFuture<'_, Option<SocketAddr>> {
        Box::pin(async move {
            let (host, port): (Option<String>, Option<i32>) =
                sqlx::query_as("SELECT host(inet_client_addr()), inet_client_port()")
                    .fetch_one(conn)
                    .await
                    .ok()?;
            let port = u16::try_from(port?).ok()?;
            Some(SocketAddr::new(host?.parse().ok()?, port))
        })
    }
}

#[cfg(feature = "sqlx-mysql")]
impl Backend for sqlx::MySql {
    fn system() -> DbSystem {
        DbSystem::Mysql
    }

    fn server(options: &sqlx::mysql::MySqlConnectOptions) -> (String, Option<u16>, Option<String>) {
        let host = match options.get_socket() {
            Some(path) => path.display().to_string(),
            None => options.get_host().to_string(),
        };
        let database = options.get_database().map(str::to_string);
        (host, Some(options.get_port()), database)
    }

    fn client_address(conn: &mut sqlx::MySqlConnection) -> BoxFuture<'_, Option<SocketAddr>> {
        Box::pin(async move {
            // "ip:port" for TCP ("localhost" over a Unix socket).
            let host: String = sqlx::query_scalar(
                "SELECT host FROM information_schema.processlist WHERE id = CONNECTION_ID()",
            )
            .fetch_one(conn)
            .await
            .ok()?;
            let (ip, port) = host.rsplit_once(':')?;
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
        })
    }
}

/// The address of the state behind a sqlx connection value (see the
/// module docs): stable while the connection lives, unique among live
/// ones. Compiles only for a type exactly one pointer wide.
pub fn connection_identity<C>(conn: &C) -> usize {
    const {
        assert!(
            std::mem::size_of::<C>() == std::mem::size_of::<usize>(),
            "this sqlx's connection is not one Box: its connections cannot be told apart"
        );
    }
    // SAFETY: `C` is exactly as wide as a usize (checked above at compile
    // time) and `conn` is a valid reference, so its bytes may be read; the
    // copy is a plain integer, which takes no ownership of what `C` holds.
    unsafe { std::mem::transmute_copy::<C, usize>(conn) }
}

/// The pool's connections by identity, with the id and socket address
/// they are named by.
struct Names {
    by_identity: Mutex<FastMap<usize, Named>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Counts creations and hand-outs: the order of last use.
    uses: std::sync::atomic::AtomicU64,
    /// Entries past this are dropped, least recently used first (sqlx
    /// does not say when it closes a connection).
    limit: usize,
}

#[derive(Clone, Copy)]
struct Named {
    conn: ConnId,
    /// When it was last created or handed out (`Names::next_use`).
    used: u64,
}

impl Names {
    fn new(max_connections: u32) -> Names {
        Names {
            by_identity: Mutex::new(FastMap::default()),
            next_id: std::sync::atomic::AtomicU64::new(1),
            uses: std::sync::atomic::AtomicU64::new(0),
            limit: 2 * max_connections as usize + 16,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<usize, Named>> {
        self.by_identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fresh_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn next_use(&self) -> u64 {
        self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A new connection at `identity`, named `conn`; returns what it
    /// replaces (a connection gone, whose place it took) and what the
    /// bound pushed out.
    fn created(&self, identity: usize, conn: ConnId) -> Vec<ConnId> {
        let mut names = self.lock();
        let used = self.next_use();
        let mut gone: Vec<ConnId> = names
            .insert(identity, Named { conn, used })
            .map(|old| old.conn)
            .into_iter()
            .collect();
        while names.len() > self.limit {
            let Some((&oldest, _)) = names.iter().min_by_key(|(_, n)| n.used) else {
                break;
            };
            if let Some(old) = names.remove(&oldest) {
                gone.push(old.conn);
            }
        }
        gone
    }

    /// The name of the connection at `identity`, handed out now (a new id
    /// if it was never seen or was forgotten).
    fn handed_out(&self, identity: usize) -> (ConnId, bool) {
        let mut names = self.lock();
        let used = self.next_use();
        match names.get_mut(&identity) {
            Some(named) => {
                named.used = used;
                (named.conn, false)
            }
            None => {
                let conn = ConnId {
                    conn: Some(self.fresh_id()),
                    ..ConnId::default()
                };
                names.insert(identity, Named { conn, used });
                (conn, true)
            }
        }
    }
}

/// A sqlx pool that reports its connections' lives to the poolscope
/// agent. Cheap to clone (clones share the pool).
pub struct InstrumentedPool<DB: Backend> {
    pool: sqlx::Pool<DB>,
    reporter: Arc<PoolReporter>,
    names: Arc<Names>,
}

impl<DB: Backend> Clone for InstrumentedPool<DB> {
    fn clone(&self) -> Self {
        InstrumentedPool {
            pool: self.pool.clone(),
            reporter: Arc::clone(&self.reporter),
            names: Arc::clone(&self.names),
        }
    }
}

impl<DB: Backend> fmt::Debug for InstrumentedPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumentedPool")
            .field("name", &self.name())
            .field("size", &self.pool.size())
            .field("idle", &self.pool.num_idle())
            .finish()
    }
}

impl<DB: Backend> InstrumentedPool<DB> {
    /// A pool named `name` (unique within the process, at most 128
    /// characters); sqlx's defaults otherwise.
    pub fn builder(name: &str) -> PoolBuilder<DB> {
        PoolBuilder {
            name: name.to_string(),
            options: PoolOptions::new(),
            reporter: None,
            batch_window: crate::BATCH_WINDOW,
            stacks: crate::StackOptions::default(),
        }
    }

    /// Checks a connection out: reports `acquire_start`, then `acquire_end`
    /// with the connection (or `timeout` / `error`). An `async fn` for its
    /// caller; the place that calls it heads the checkout's holder stack.
    #[track_caller]
    pub fn acquire(&self) -> impl Future<Output = Result<PoolConnection<DB>, sqlx::Error>> + '_ {
        self.acquire_from(Location::caller())
    }

    async fn acquire_from(
        &self,
        caller: &'static Location<'static>,
    ) -> Result<PoolConnection<DB>, sqlx::Error> {
        let pending = self.reporter.acquire_start_from(caller);
        match self.pool.acquire().await {
            Ok(conn) => {
                let (name, new) = self.names.handed_out(connection_identity(&*conn));
                if new {
                    self.reporter.connection_created(name);
                }
                pending.finish(AcquireResult::Ok(name));
                Ok(PoolConnection {
                    conn,
                    name,
                    reporter: Arc::clone(&self.reporter),
                })
            }
            Err(e) => {
                let result = match e {
                    sqlx::Error::PoolTimedOut => AcquireResult::Timeout,
                    _ => AcquireResult::Error,
                };
                pending.finish(result);
                Err(e)
            }
        }
    }

    pub fn name(&self) -> &str {
        self.reporter.name()
    }

    pub fn reporter(&self) -> &Reporter {
        self.reporter.reporter()
    }

    /// Connections open now, and how many of them are idle (sqlx's counts).
    pub fn size(&self) -> u32 {
        self.pool.size()
    }

    pub fn num_idle(&self) -> usize {
        self.pool.num_idle()
    }

    /// The sqlx pool beneath: what it hands out is not reported.
    pub fn inner(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }
}

/// A checked-out connection: derefs to sqlx's connection (`&mut *conn` is
/// an executor); dropping it reports the `release` and gives it back.
pub struct PoolConnection<DB: Backend> {
    conn: sqlx::pool::PoolConnection<DB>,
    name: ConnId,
    reporter: Arc<PoolReporter>,
}

impl<DB: Backend> PoolConnection<DB> {
    /// The id (and, for a direct TCP connection, the local address) the
    /// agent knows this connection by.
    pub fn conn_id(&self) -> ConnId {
        self.name
    }
}

impl<DB: Backend> Deref for PoolConnection<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.conn
    }
}

impl<DB: Backend> DerefMut for PoolConnection<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

impl<DB: Backend> fmt::Debug for PoolConnection<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConnection")
            .field("conn_id", &self.name)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Drop for PoolConnection<DB> {
    fn drop(&mut self) {
        // Before sqlx takes it back (the field is dropped right after
        // this), so that the next holder's acquire_end comes after this
        // release.
        self.reporter.release(self.name);
    }
}

/// Builds an [`InstrumentedPool`] from sqlx's `PoolOptions`.
pub struct PoolBuilder<DB: Backend> {
    name: String,
    options: PoolOptions<DB>,
    reporter: Option<Reporter>,
    batch_window: Duration,
    stacks: crate::StackOptions,
}

impl<DB: Backend> fmt::Debug for PoolBuilder<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> PoolBuilder<DB> {
    /// Where to report (default: [`Reporter::from_env`]).
    pub fn reporter(mut self, reporter: Reporter) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// How long events wait to be sent together (default
    /// [`crate::BATCH_WINDOW`]; zero sends each at once).
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

    pub fn max_connections(mut self, max: u32) -> Self {
        self.options = self.options.max_connections(max);
        self
    }

    pub fn min_connections(mut self, min: u32) -> Self {
        self.options = self.options.min_connections(min);
        self
    }

    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.options = self.options.acquire_timeout(timeout);
        self
    }

    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.options = self.options.idle_timeout(timeout);
        self
    }

    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.options = self.options.max_lifetime(lifetime);
        self
    }

    pub fn test_before_acquire(mut self, test: bool) -> Self {
        self.options = self.options.test_before_acquire(test);
        self
    }

    /// Any other sqlx setting (`before_acquire`, `after_release`...). An
    /// `after_connect` set here is replaced by this pool's.
    pub fn configure(mut self, f: impl FnOnce(PoolOptions<DB>) -> PoolOptions<DB>) -> Self {
        self.options = f(self.options);
        self
    }

    /// Builds the pool and opens its `min_connections` (as
    /// `PoolOptions::connect`).
    pub async fn connect(self, url: &str) -> Result<InstrumentedPool<DB>, sqlx::Error> {
        let options: ConnectOptions<DB> = url.parse()?;
        self.connect_with(options).await
    }

    pub async fn connect_with(
        self,
        options: ConnectOptions<DB>,
    ) -> Result<InstrumentedPool<DB>, sqlx::Error> {
        let (host, port, database) = DB::server(&options);
        let max = self.options.get_max_connections();
        let min = self.options.get_min_connections();
        let reporter = self.stacks.apply(
            PoolReporter::new(self.reporter.unwrap_or_else(Reporter::from_env), &self.name)
                .with_batch_window(self.batch_window),
        );
        let reporter = Arc::new(reporter);
        reporter.register(&PoolInfo {
            db_system: Some(DB::system()),
            server_address: Some(host),
            server_port: port,
            namespace: database,
            max: Some(max),
            min_idle: (min > 0).then_some(min),
            library: Some(LIBRARY.into()),
            ..PoolInfo::default()
        });
        let names = Arc::new(Names::new(max));
        let (on_connect, named) = (Arc::clone(&reporter), Arc::clone(&names));
        let pool = self
            .options
            .after_connect(move |conn, _: PoolConnectionMetadata| {
                let (reporter, names) = (Arc::clone(&on_connect), Arc::clone(&named));
                Box::pin(async move {
                    let identity = connection_identity(&*conn);
                    let local_address = DB::client_address(conn).await;
                    let name = ConnId {
                        local_address,
                        conn: Some(names.fresh_id()),
                        ..ConnId::default()
                    };
                    for gone in names.created(identity, name) {
                        reporter.connection_closed(gone);
                    }
                    if local_address.is_none() && on_current_thread_runtime() {
                        reporter.connection_created_here(name);
                    } else {
                        reporter.connection_created(name);
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(InstrumentedPool {
            pool,
            reporter,
            names,
        })
    }
}

/// Whether the caller runs on a current-thread tokio runtime, where a
/// connect and the code after it run on one thread.
fn on_current_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}
