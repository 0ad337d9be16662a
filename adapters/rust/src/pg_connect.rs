//! Opening tokio-postgres connections whose sockets the adapter knows:
//! shared by the pools whose libraries hide the socket (deadpool-postgres,
//! bb8). tokio-postgres keeps its socket to itself (neither `Client` nor the
//! `Connection` future shows its fd or address), so the [`PgConnector`]
//! opens each connection's socket itself (TCP or Unix, following the
//! `tokio_postgres::Config`: hosts, `hostaddr`, ports, `connect_timeout`,
//! keepalives, `tcp_user_timeout`, `target_session_attrs`), reads its fd
//! and, for TCP, its local address (`getsockname`), and only then runs the
//! PostgreSQL startup (and TLS, with the connector given) over it with
//! `Config::connect_raw`.

use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    pin::Pin,
    sync::{atomic::AtomicU8, atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
    task::JoinHandle,
};
use tokio_postgres::{
    config::{Host, TargetSessionAttrs},
    tls::{MakeTlsConnect, TlsConnect},
    CancelToken, Client as PgClient, Config as PgConfig, SimpleQueryMessage,
};

use crate::{ConnId, DbSystem, PoolInfo, PoolReporter};

#[cfg(test)]
pub(crate) mod fake_postgres;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
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

/// The socket under a connection, opened by the [`PgConnector`] so that
/// it knows the fd and local address. TLS connectors wrap this type
/// (`MakeTlsConnect<Stream>`).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn conn_id(&self) -> ConnId {
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
pub(crate) type Driver = BoxFuture<'static, Result<(), tokio_postgres::Error>>;

/// The TLS connector, type-erased.
pub(crate) trait RawConnect: Send + Sync {
    fn connect<'a>(
        &'a self,
        stream: Stream,
        hostname: Option<&'a str>,
        config: &'a PgConfig,
    ) -> BoxFuture<'a, Result<(PgClient, Driver), Error>>;
}

pub(crate) struct Tls<T>(pub(crate) T);

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
pub(crate) enum Target {
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
pub(crate) struct ConnShared {
    pub(crate) id: ConnId,
    pub(crate) target: Target,
    pub(crate) pool: Arc<PoolReporter>,
    state: AtomicU8,
}

impl ConnShared {
    pub(crate) fn announce(&self) {
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

    pub(crate) fn closed(&self) {
        if self.state.swap(CONN_CLOSED, Ordering::AcqRel) == CONN_ANNOUNCED {
            self.pool.connection_closed(self.id);
        }
    }
}

/// Opens connections for one pool: the configuration and the TLS
/// connector, type-erased.
pub(crate) struct PgConnector {
    pub(crate) pg_config: PgConfig,
    connector: Box<dyn RawConnect>,
}

/// A connection just opened: the client, its driver task, and what names it.
pub(crate) struct Connected {
    pub(crate) client: PgClient,
    pub(crate) task: JoinHandle<()>,
    pub(crate) shared: Arc<ConnShared>,
}

impl PgConnector {
    pub(crate) fn new<T>(pg_config: PgConfig, tls: T) -> PgConnector
    where
        T: MakeTlsConnect<Stream> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Stream>>::Future: Send,
    {
        PgConnector {
            pg_config,
            connector: Box::new(Tls(tls)),
        }
    }

    /// The `pool` message of a pool of `max` connections made by this
    /// connector, with `library`.
    pub(crate) fn pool_info(&self, max: usize, library: &str) -> PoolInfo {
        let port = self.pg_config.get_ports().first().copied().unwrap_or(5432);
        let host = self.pg_config.get_hosts().first();
        let hostaddr = self.pg_config.get_hostaddrs().first();
        let server_address = match (host, hostaddr) {
            (_, Some(addr)) => Some(addr.to_string()),
            (Some(Host::Tcp(host)), None) => Some(host.clone()),
            (Some(Host::Unix(dir)), None) => {
                Some(dir.join(format!(".s.PGSQL.{port}")).display().to_string())
            }
            (None, None) => None,
        };
        let tcp = !matches!((host, hostaddr), (Some(Host::Unix(_)), None));
        PoolInfo {
            db_system: Some(DbSystem::Postgresql),
            server_address,
            server_port: tcp.then_some(port),
            namespace: self
                .pg_config
                .get_dbname()
                .or(self.pg_config.get_user())
                .map(str::to_string),
            max: u32::try_from(max).ok(),
            min_idle: None,
            idle_max: None,
            library: Some(library.into()),
        }
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

    /// Opens a connection: tries the configuration's hosts in order, names
    /// its socket, runs the startup over it, checks
    /// `target_session_attrs`, and spawns its driver, which says
    /// `connection_closed` to `pool` when the socket ends.
    pub(crate) async fn connect(&self, pool: &Arc<PoolReporter>) -> Result<Connected, Error> {
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
                match self.connect_once(target, hostname.as_deref(), pool).await {
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
        pool: &Arc<PoolReporter>,
    ) -> Result<Connected, Error> {
        let stream = self.open(&target).await?;
        let id = stream.conn_id();
        let (client, driver) = self
            .connector
            .connect(stream, hostname, &self.pg_config)
            .await?;
        let shared = Arc::new(ConnShared {
            id,
            target,
            pool: Arc::clone(pool),
            state: AtomicU8::new(CONN_NEW),
        });
        let on_end = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // The socket is closed once the driver returns: say so (unless
            // the pool already did when it dropped the connection).
            let _ = driver.await;
            on_end.closed();
        });
        let wanted = self.pg_config.get_target_session_attrs();
        if wanted != TargetSessionAttrs::Any {
            if let Err(e) = check_session_attrs(&client, wanted).await {
                task.abort();
                return Err(e);
            }
        }
        Ok(Connected {
            client,
            task,
            shared,
        })
    }
}

impl Target {
    /// Asks the server to cancel what the connection of `token` runs, over
    /// a new socket to the same server, without TLS (as libpq before
    /// PostgreSQL 17 does): `connect_raw` leaves the token without the
    /// address.
    pub(crate) async fn cancel(&self, token: CancelToken) -> Result<(), Error> {
        match self {
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
