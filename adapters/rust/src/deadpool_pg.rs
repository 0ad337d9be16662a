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
    fmt, io,
    net::SocketAddr,
    ops::Deref,
    os::fd::AsRawFd,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
pub use deadpool::managed::{PoolConfig, QueueMode, Status, TimeoutType, Timeouts};
pub use deadpool::Runtime;
pub use deadpool_postgres::{ClientWrapper, ManagerConfig, RecyclingMethod};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
};
use tokio_postgres::{
    config::{Host, TargetSessionAttrs},
    tls::{MakeTlsConnect, TlsConnect},
    Client as PgClient, Config as PgConfig, SimpleQueryMessage,
};

use crate::{AcquireResult, ConnId, DbSystem, PoolInfo, PoolReporter, Reporter};

/// The library name sent in the `pool` message.
pub const LIBRARY: &str = "deadpool-postgres";

/// What [`InstrumentedPool::get`] fails with.
pub type PoolError = managed::PoolError<Error>;
pub type BuildError = managed::BuildError;

type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a connection could not be made or recycled.
#[derive(Debug)]
pub enum Error {
    /// From tokio-postgres: startup, authentication, TLS negotiation, queries.
    Postgres(tokio_postgres::Error),
    /// Opening the socket (resolving, connecting, socket options).
    Io(io::Error),
    /// The TLS connector could not be set up for a host.
    Tls(BoxError),
    /// The `tokio_postgres::Config` names no usable server.
    Config(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Postgres(e) => write!(f, "{e}"),
            Error::Io(e) => write!(f, "cannot connect: {e}"),
            Error::Tls(e) => write!(f, "cannot set up TLS: {e}"),
            Error::Config(e) => write!(f, "invalid configuration: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Postgres(e) => Some(e),
            Error::Io(e) => Some(e),
            Error::Tls(e) => Some(e.as_ref()),
            Error::Config(_) => None,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// The socket under a connection, opened by the [`Manager`] so that it
/// knows the fd and local address. TLS connectors wrap this type
/// (`MakeTlsConnect<Stream>`).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn conn_id(&self) -> ConnId {
        match self {
            Stream::Tcp(s) => ConnId {
                local_address: s.local_addr().ok(),
                fd: Some(s.as_raw_fd()),
                conn: None,
            },
            Stream::Unix(s) => ConnId {
                local_address: None,
                fd: Some(s.as_raw_fd()),
                conn: None,
            },
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// The connection future, boxed so that the TLS type does not leak out.
type Driver = BoxFuture<'static, Result<(), tokio_postgres::Error>>;

/// The TLS connector, type-erased.
trait RawConnect: Send + Sync {
    fn connect<'a>(
        &'a self,
        stream: Stream,
        hostname: Option<&'a str>,
        config: &'a PgConfig,
    ) -> BoxFuture<'a, Result<(PgClient, Driver), Error>>;
}

struct Tls<T>(T);

impl<T> RawConnect for Tls<T>
where
    T: MakeTlsConnect<Stream> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Stream>>::Future: Send,
{
    fn connect<'a>(
        &'a self,
        stream: Stream,
        hostname: Option<&'a str>,
        config: &'a PgConfig,
    ) -> BoxFuture<'a, Result<(PgClient, Driver), Error>> {
        let mut tls = self.0.clone();
        Box::pin(async move {
            let connector = tls
                .make_tls_connect(hostname.unwrap_or(""))
                .map_err(|e| Error::Tls(e.into()))?;
            let (client, connection) = config.connect_raw(stream, connector).await?;
            let driver: Driver = Box::pin(connection);
            Ok((client, driver))
        })
    }
}

/// Where one connection attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One host of the configuration: what to connect to (`hostaddr` if given,
/// else `host`), the host name for TLS, and the port.
struct Attempt {
    hostname: Option<String>,
    host: Option<Host>,
    port: u16,
}

/// Connection life as the adapter reports it: announced once, closed once.
const CONN_NEW: u8 = 0;
const CONN_ANNOUNCED: u8 = 1;
const CONN_CLOSED: u8 = 2;

/// What the connection, its driver task and the pool share about one
/// connection.
struct ConnShared {
    id: ConnId,
    target: Target,
    pool: Arc<PoolReporter>,
    state: AtomicU8,
}

impl ConnShared {
    fn announce(&self) {
        if self
            .state
            .compare_exchange(
                CONN_NEW,
                CONN_ANNOUNCED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.pool.connection_created(self.id);
        }
    }

    fn closed(&self) {
        if self.state.swap(CONN_CLOSED, Ordering::AcqRel) == CONN_ANNOUNCED {
            self.pool.connection_closed(self.id);
        }
    }
}

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
    pg_config: PgConfig,
    config: ManagerConfig,
    connector: Box<dyn RawConnect>,
    pool: Arc<PoolReporter>,
    max_size: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("pg_config", &self.pg_config)
            .field("config", &self.config)
            .field("pool", &self.pool.name())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// The `pool` message for this pool.
    pub fn pool_info(&self) -> PoolInfo {
        let port = self.pg_config.get_ports().first().copied().unwrap_or(5432);
        let server_address = match (
            self.pg_config.get_hosts().first(),
            self.pg_config.get_hostaddrs().first(),
        ) {
            (_, Some(addr)) => Some(addr.to_string()),
            (Some(Host::Tcp(host)), None) => Some(host.clone()),
            (Some(Host::Unix(dir)), None) => {
                Some(dir.join(format!(".s.PGSQL.{port}")).display().to_string())
            }
            (None, None) => None,
        };
        let tcp = !matches!(
            (
                self.pg_config.get_hosts().first(),
                self.pg_config.get_hostaddrs().first()
            ),
            (Some(Host::Unix(_)), None)
        );
        PoolInfo {
            db_system: Some(DbSystem::Postgresql),
            server_address,
            server_port: tcp.then_some(port),
            namespace: self
                .pg_config
                .get_dbname()
                .or(self.pg_config.get_user())
                .map(str::to_string),
            max: u32::try_from(self.max_size.load(Ordering::Relaxed)).ok(),
            min_idle: None,
            idle_max: None,
            library: Some(LIBRARY.into()),
        }
    }

    fn register(&self) {
        self.pool.register(&self.pool_info());
    }

    /// The hosts to try, in order.
    fn plan(&self) -> Result<Vec<Attempt>, Error> {
        let config = &self.pg_config;
        let hosts = config.get_hosts();
        let hostaddrs = config.get_hostaddrs();
        let ports = config.get_ports();
        if hosts.is_empty() && hostaddrs.is_empty() {
            return Err(Error::Config("both host and hostaddr are missing".into()));
        }
        if !hosts.is_empty() && !hostaddrs.is_empty() && hosts.len() != hostaddrs.len() {
            return Err(Error::Config(format!(
                "number of hosts ({}) is different from number of hostaddrs ({})",
                hosts.len(),
                hostaddrs.len()
            )));
        }
        let n = hosts.len().max(hostaddrs.len());
        if ports.len() > 1 && ports.len() != n {
            return Err(Error::Config("invalid number of ports".into()));
        }
        Ok((0..n)
            .map(|i| {
                let host = hosts.get(i);
                let port = ports
                    .get(i)
                    .or_else(|| ports.first())
                    .copied()
                    .unwrap_or(5432);
                let hostname = match host {
                    Some(Host::Tcp(h)) => Some(h.clone()),
                    _ => None,
                };
                let connect_to = match hostaddrs.get(i) {
                    Some(addr) => Some(Host::Tcp(addr.to_string())),
                    None => host.cloned(),
                };
                Attempt {
                    hostname,
                    host: connect_to,
                    port,
                }
            })
            .collect())
    }

    async fn connect(&self) -> Result<Connection, Error> {
        let mut last = None;
        for Attempt {
            hostname,
            host,
            port,
        } in self.plan()?
        {
            let targets = match host {
                Some(Host::Tcp(name)) => match tokio::net::lookup_host((name.as_str(), port)).await
                {
                    Ok(addrs) => addrs.map(Target::Tcp).collect(),
                    Err(e) => {
                        last = Some(Error::Io(e));
                        continue;
                    }
                },
                Some(Host::Unix(dir)) => vec![Target::Unix(dir.join(format!(".s.PGSQL.{port}")))],
                None => continue,
            };
            for target in targets {
                match self.connect_once(target, hostname.as_deref()).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "could not resolve any addresses",
            ))
        }))
    }

    async fn open(&self, target: &Target) -> Result<Stream, Error> {
        let timeout = self.pg_config.get_connect_timeout().copied();
        let stream = match target {
            Target::Tcp(addr) => {
                let stream = with_timeout(TcpStream::connect(addr), timeout).await?;
                stream.set_nodelay(true)?;
                set_tcp_options(&stream, &self.pg_config)?;
                Stream::Tcp(stream)
            }
            Target::Unix(path) => {
                Stream::Unix(with_timeout(UnixStream::connect(path), timeout).await?)
            }
        };
        Ok(stream)
    }

    async fn connect_once(
        &self,
        target: Target,
        hostname: Option<&str>,
    ) -> Result<Connection, Error> {
        let stream = self.open(&target).await?;
        let id = stream.conn_id();
        let (client, driver) = self
            .connector
            .connect(stream, hostname, &self.pg_config)
            .await?;
        let shared = Arc::new(ConnShared {
            id,
            target,
            pool: Arc::clone(&self.pool),
            state: AtomicU8::new(CONN_NEW),
        });
        let on_end = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // The socket is closed once the driver returns: say so (unless
            // the pool already did when it dropped the connection).
            let _ = driver.await;
            on_end.closed();
        });
        let client = ClientWrapper::new(client, task);
        let conn = Connection { client, shared };
        let wanted = self.pg_config.get_target_session_attrs();
        if wanted != TargetSessionAttrs::Any {
            check_session_attrs(&conn.client, wanted).await?;
        }
        self.register();
        conn.shared.announce();
        Ok(conn)
    }
}

/// `target_session_attrs`, as tokio-postgres checks it.
async fn check_session_attrs(client: &PgClient, wanted: TargetSessionAttrs) -> Result<(), Error> {
    let rows = client.simple_query("SHOW transaction_read_only").await?;
    let read_only = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "on"),
        _ => None,
    });
    let refused = match (wanted, read_only) {
        (TargetSessionAttrs::ReadWrite, Some(true)) => Some("database does not allow writes"),
        (TargetSessionAttrs::ReadOnly, Some(false)) => Some("database is not read only"),
        _ => None,
    };
    match refused {
        Some(why) => Err(Error::Io(io::Error::new(
            io::ErrorKind::PermissionDenied,
            why,
        ))),
        None => Ok(()),
    }
}

async fn with_timeout<T>(
    connect: impl std::future::Future<Output = io::Result<T>>,
    timeout: Option<Duration>,
) -> io::Result<T> {
    match timeout {
        Some(limit) => tokio::time::timeout(limit, connect)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                ))
            }),
        None => connect.await,
    }
}

fn setsockopt(fd: i32, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn seconds(d: Duration) -> libc::c_int {
    libc::c_int::try_from(d.as_secs().max(1)).unwrap_or(libc::c_int::MAX)
}

/// Keepalives and `tcp_user_timeout`, as tokio-postgres sets them.
fn set_tcp_options(stream: &TcpStream, config: &PgConfig) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    #[cfg(target_os = "linux")]
    if let Some(timeout) = config.get_tcp_user_timeout() {
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)?;
    }
    if config.get_keepalives() {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        #[cfg(target_os = "linux")]
        {
            let idle = seconds(config.get_keepalives_idle());
            setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
            if let Some(interval) = config.get_keepalives_interval() {
                setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_KEEPINTVL,
                    seconds(interval),
                )?;
            }
            if let Some(retries) = config.get_keepalives_retries() {
                let retries = libc::c_int::try_from(retries).unwrap_or(libc::c_int::MAX);
                setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, retries)?;
            }
        }
    }
    Ok(())
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
        match &self.obj.shared.target {
            Target::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                token
                    .cancel_query_raw(stream, tokio_postgres::NoTls)
                    .await?;
            }
            Target::Unix(path) => {
                let stream = UnixStream::connect(path).await?;
                token
                    .cancel_query_raw(stream, tokio_postgres::NoTls)
                    .await?;
            }
        }
        Ok(())
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
            pg_config,
            manager_config: ManagerConfig::default(),
            connector: Box::new(Tls(tls)),
            reporter: None,
            pool_config: PoolConfig::default(),
            runtime: Some(Runtime::Tokio1),
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
    /// with the connection (or `timeout` / `error`).
    pub async fn get(&self) -> Result<Client, PoolError> {
        self.get_with(None).await
    }

    /// [`InstrumentedPool::get`] with other timeouts than the pool's.
    pub async fn timeout_get(&self, timeouts: &Timeouts) -> Result<Client, PoolError> {
        self.get_with(Some(timeouts)).await
    }

    async fn get_with(&self, timeouts: Option<&Timeouts>) -> Result<Client, PoolError> {
        let reporter = &self.pool.manager().pool;
        // Dropped unfinished (the caller gave up waiting): reports `error`.
        let pending = reporter.acquire_start();
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
    pg_config: PgConfig,
    manager_config: ManagerConfig,
    connector: Box<dyn RawConnect>,
    reporter: Option<Reporter>,
    pool_config: PoolConfig,
    runtime: Option<Runtime>,
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
            pg_config: self.pg_config,
            config: self.manager_config,
            connector: self.connector,
            pool: Arc::new(PoolReporter::new(reporter, &self.name)),
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
