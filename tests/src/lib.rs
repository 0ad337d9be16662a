//! Fixtures for poolscope's integration tests: the real agent binary,
//! throwaway PostgreSQL, MariaDB and Redis servers, and scripted child
//! processes whose sockets (and database sessions) the tests drive. Each
//! fixture owns what it starts and stops it on drop, so a failing test leaves
//! no agent, server or temp dir behind.
//!
//! Events reach the agent asynchronously; tests poll with [`wait_until`] (or
//! [`Agent::wait_for`]) instead of sleeping.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant, SystemTime},
};

pub use poolscope::api::{ConnectionView, ConnectionsResponse};
pub use poolscope::lifecycle::{CloseReason, ConnState, ConnectOutcome};
pub use poolscope::protocol::{DbSystem, TxState};
pub use poolscope::reports::{SlowQueriesResponse, SlowQuery};
pub use serde_json::{json, Value};

pub mod otlp_receiver;

/// The loopback address the fixtures' servers listen on.
pub const LOCALHOST_V4: &str = "127.0.0.1";

/// How long asynchronous kernel events get to show up in the API.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// True when this process may load BPF programs. Kernel tests call it first
/// and return early on `false`. In CI (`CI=true`) not being root is a failure,
/// so that a misconfigured runner cannot pass by skipping everything.
pub fn require_kernel() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("kernel tests must run as root in CI (euid is {euid})");
    }
    eprintln!("skipped: kernel tests need root to load BPF programs (euid is {euid})");
    false
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The agent binary under test: `$POOLSCOPE_BIN`, else the newest of
/// `target/release/poolscope` and `target/debug/poolscope`.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("POOLSCOPE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "POOLSCOPE_BIN={} does not exist; run cargo build -p poolscope first",
            bin.display()
        );
        return bin;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    ["release", "debug"]
        .iter()
        .map(|profile| target.join(profile).join("poolscope"))
        .filter_map(|p| {
            let modified = fs::metadata(&p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no poolscope binary in {}/{{release,debug}} and POOLSCOPE_BIN is not set: \
                 run cargo build -p poolscope first",
                target.display()
            )
        })
}

/// A TCP port on 127.0.0.1 that nothing listens on (at the time of the call).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
        .port()
}

/// Whether a socket listens on TCP `port` (any IPv4 address), read from
/// /proc/net/tcp so that asking does not itself connect.
pub fn tcp_listening(port: u16) -> bool {
    const TCP_LISTEN: &str = "0A";
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local_suffix = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3 && cols[1].ends_with(&local_suffix) && cols[3] == TCP_LISTEN
    })
}

/// Calls `f` every 100 ms until it returns `Some`, for at most `timeout`.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a child to exit, up to `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    wait_until(timeout, || child.try_wait().ok().flatten())
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// The `bin` directory of the newest PostgreSQL under /usr/lib/postgresql.
pub fn postgres_bin_dir() -> PathBuf {
    let versions = fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten();
    versions
        .filter_map(|e| {
            let entry = e.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: run cargo xtask setup"
            )
        })
}

/// A throwaway PostgreSQL cluster listening on 127.0.0.1:`port` and on the
/// Unix socket [`Postgres::socket_path`], with trust authentication for the
/// `postgres` user. Stopped (immediate mode) and deleted on drop.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
}

fn postgres_ids() -> (libc::uid_t, libc::gid_t) {
    user_ids("postgres")
}

/// uid and gid of a system user that `cargo xtask setup` creates (with the
/// server package that runs as it).
fn user_ids(user: &str) -> (libc::uid_t, libc::gid_t) {
    let name = CString::new(user).expect("no NUL in a user name");
    // SAFETY: `name` is a valid C string; getpwnam returns NULL or a pointer
    // to a static record that we read at once, before any other getpw* call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "there is no `{user}` user: run cargo xtask setup"
    );
    // SAFETY: checked non-NULL above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = postgres_bin_dir();
        let dir = TempDir::new("poolscope-pg");
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to `postgres`.
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("cannot chown the cluster directory to postgres");
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("cannot chmod the cluster directory");
        let data = dir.path().join("data");
        let mut pg = Postgres { port: 0, bin, dir };
        pg.run_as_postgres(
            "initdb",
            &[
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
                "-D",
                path_str(&data),
            ],
        );
        // Another test may take the port between free_port() and the server's
        // bind; try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                path_str(pg.dir.path())
            );
            let log = pg.dir.path().join("postgres.log");
            match pg.try_run_as_postgres(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data),
                    "-l",
                    path_str(&log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    &options,
                    "start",
                ],
            ) {
                Ok(_) => {
                    pg.port = port;
                    return pg;
                }
                Err(e) => last_error = format!("{e}\npostgres.log:\n{}", read_lossy(&log)),
            }
        }
        panic!("cannot start PostgreSQL: {last_error}");
    }

    fn command_as_postgres(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    fn try_run_as_postgres(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        // Output goes to a file: pg_ctl's server must not inherit our pipes.
        let out_path = self.dir.path().join(format!("{tool}.out"));
        let out = File::create(&out_path).map_err(|e| format!("cannot create output: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("dup: {e}"))?;
        let status = self
            .command_as_postgres(tool)
            .args(args)
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("cannot run {tool}: {e}"))?;
        let output = read_lossy(&out_path);
        if status.success() {
            Ok(output)
        } else {
            Err(format!("{tool} {args:?} failed ({status}):\n{output}"))
        }
    }

    fn run_as_postgres(&self, tool: &str, args: &[&str]) -> String {
        self.try_run_as_postgres(tool, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The psql client binary of the same installation.
    pub fn psql_bin(&self) -> PathBuf {
        self.bin.join("psql")
    }

    /// Directory that holds the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the server's Unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join(format!(".s.PGSQL.{}", self.port))
    }

    /// Runs one SQL command over TCP and returns psql's unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let output = Command::new(self.psql_bin())
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-At",
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run psql");
        assert!(
            output.status.success(),
            "psql -c {sql:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Runs one SQL command over the Unix socket, so that it does not show
    /// in the per-port metrics of the TCP port, and returns psql's output.
    pub fn psql_unix(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let output = Command::new(self.psql_bin())
            .args(["-X", "-p", &port, "-U", "postgres", "-At", "-h"])
            .arg(self.socket_dir())
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run psql");
        assert!(
            output.status.success(),
            "psql -c {sql:?} over the Unix socket failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Server log, for failure messages.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("postgres.log"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.port != 0 {
            let data = self.dir.path().join("data");
            let _ = self.try_run_as_postgres(
                "pg_ctl",
                &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

// ---------------------------------------------------------------------------
// MariaDB
// ---------------------------------------------------------------------------

/// A server child whose stdout and stderr go to `log` in its own temp dir.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let err = out.try_clone().expect("cannot dup a log file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Waits (60 s at most) until `child` listens on 127.0.0.1:`port`; false if
/// it exited first (typically: another process took the port).
fn wait_listening(child: &mut Child, port: u16) -> bool {
    wait_until(Duration::from_secs(60), || {
        if let Ok(Some(_)) = child.try_wait() {
            return Some(false);
        }
        tcp_listening(port).then_some(true)
    })
    .unwrap_or(false)
}

fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A throwaway MariaDB server on 127.0.0.1:`port` and on the Unix socket
/// [`MariaDb::socket_path`], with a database `poolscope` and a user
/// `poolscope` (any host, empty password, all privileges) for TCP clients.
/// Killed and deleted on drop.
pub struct MariaDb {
    pub port: u16,
    child: Child,
    dir: TempDir,
}

/// The MariaDB server binary: `mariadbd`, or `mysqld` on older packages.
fn mariadbd_bin() -> PathBuf {
    ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no /usr/sbin/mariadbd: run cargo xtask setup"))
}

impl MariaDb {
    /// The user TCP clients log in as.
    pub const USER: &'static str = "poolscope";
    /// The database TCP clients use.
    pub const DATABASE: &'static str = "poolscope";

    pub fn start() -> MariaDb {
        let dir = TempDir::new("poolscope-mariadb");
        let data = dir.path().join("data");
        if is_root() {
            // mariadbd drops to `mysql`, which must own the data and socket.
            let (uid, gid) = user_ids("mysql");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("cannot chown the MariaDB directory to mysql");
        }
        let install_log = dir.path().join("install.log");
        // A private tmpdir: bootstraps running in parallel collide on
        // temporary-table names in a shared /tmp.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("cannot create the MariaDB tmpdir");
        if is_root() {
            let (uid, gid) = user_ids("mysql");
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .expect("cannot chown the MariaDB tmpdir to mysql");
        }
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", path_str(&data)))
            .arg(format!("--tmpdir={}", path_str(&tmp)))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .current_dir(dir.path());
        if is_root() {
            install.arg("--user=mysql");
        }
        let status = spawn_logged(&mut install, &install_log)
            .wait()
            .expect("cannot wait for mariadb-install-db");
        assert!(
            status.success(),
            "mariadb-install-db failed ({status}):\n{}",
            read_lossy(&install_log)
        );
        // Another test may take the port between free_port() and the
        // server's bind; try a few.
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(mariadbd_bin());
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", path_str(&data)))
                .arg(format!("--tmpdir={}", path_str(&tmp)))
                .arg(format!("--port={port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!(
                    "--socket={}",
                    path_str(&dir.path().join("mysql.sock"))
                ))
                .arg(format!(
                    "--pid-file={}",
                    path_str(&dir.path().join("mariadbd.pid"))
                ))
                .args([
                    "--skip-name-resolve",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=16M",
                    "--innodb-log-file-size=8M",
                    "--skip-innodb-doublewrite",
                    "--innodb-flush-log-at-trx-commit=0",
                ])
                .current_dir(dir.path());
            if is_root() {
                cmd.arg("--user=mysql");
            }
            let mut child = spawn_logged(&mut cmd, &dir.path().join("mariadbd.log"));
            if !wait_listening(&mut child, port) {
                kill_child(&mut child);
                continue;
            }
            let db = MariaDb { port, child, dir };
            // The socket appears a moment after the TCP listener.
            let socket = db.socket_path();
            let ready = wait_until(Duration::from_secs(30), || socket.exists().then_some(()));
            assert!(
                ready.is_some(),
                "MariaDB never made its socket {}\n{}",
                socket.display(),
                db.log()
            );
            db.sql(&format!(
                "CREATE DATABASE {db_name}; \
                 CREATE USER '{user}'@'%' IDENTIFIED BY ''; \
                 GRANT ALL PRIVILEGES ON *.* TO '{user}'@'%'",
                db_name = Self::DATABASE,
                user = Self::USER
            ));
            return db;
        }
        panic!(
            "cannot start MariaDB on a free port:\n{}",
            read_lossy(&dir.path().join("mariadbd.log"))
        );
    }

    /// Path of the server's Unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("mysql.sock")
    }

    /// Runs SQL as root with the `mariadb` CLI over the Unix socket (so that
    /// it does not show in the per-port metrics of the TCP port), in the
    /// database `poolscope` once it exists, and returns the tab-separated
    /// output without column names.
    pub fn sql(&self, sql: &str) -> String {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", path_str(&self.socket_path())))
            .args(["--user=root", "--batch", "--skip-column-names"]);
        if !sql.starts_with("CREATE DATABASE") {
            cmd.arg(format!("--database={}", Self::DATABASE));
        }
        let output = cmd
            .args(["-e", sql])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run the mariadb client");
        assert!(
            output.status.success(),
            "mariadb -e {sql:?} failed ({}): {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// The `mariadb` command-line client in batch mode, connected over TCP
    /// as [`MariaDb::USER`] to [`MariaDb::DATABASE`], without TLS, going on
    /// after errors (`--force`): it sends exactly the statements it reads
    /// and nothing of its own.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new("mariadb");
        cmd.arg("--no-defaults")
            .args(["--host", LOCALHOST_V4, "--port", &self.port.to_string()])
            .arg(format!("--user={}", Self::USER))
            .arg(format!("--database={}", Self::DATABASE))
            .args(["--batch", "--skip-column-names", "--skip-ssl", "--force"]);
        cmd
    }

    /// Server log, for failure messages.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("mariadbd.log"))
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A throwaway Redis server on 127.0.0.1:`port`, without persistence.
/// Killed and deleted on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = TempDir::new("poolscope-redis");
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .current_dir(dir.path());
            let mut child = spawn_logged(&mut cmd, &dir.path().join("redis.log"));
            if wait_listening(&mut child, port) {
                return Redis { port, child, dir };
            }
            kill_child(&mut child);
        }
        panic!(
            "cannot start redis-server on a free port:\n{}",
            read_lossy(&dir.path().join("redis.log"))
        );
    }

    /// Server log, for failure messages.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("redis.log"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

/// What [`Agent::get_raw`] got back.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub body: String,
    /// From the connect to the end of the answer.
    pub took: Duration,
}

/// A running `poolscope run`, listening on its own loopback port, logging to
/// a file. SIGTERM and wait on drop.
pub struct Agent {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// Starts the agent with extra `run` arguments and waits (30 s at most)
    /// until `/healthz` answers. Panics with the agent's log if it exits first.
    pub fn start_with(args: &[&str]) -> Agent {
        Agent::launch(TempDir::new("poolscope-agent"), args)
    }

    /// Starts the agent with `toml` as its configuration file (written to
    /// the agent's temp dir) and extra `run` arguments.
    pub fn start_with_config(toml: &str, args: &[&str]) -> Agent {
        Agent::start_with_config_until(toml, args, "/healthz")
    }

    /// As [`Agent::start_with_config`], but waits only until `health_path`
    /// (e.g. `/healthz/live` for an agent that is not meant to be ready)
    /// answers `ok`.
    pub fn start_with_config_until(toml: &str, args: &[&str], health_path: &str) -> Agent {
        let dir = TempDir::new("poolscope-agent");
        let config = dir.path().join("poolscope.toml");
        fs::write(&config, toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let config = path_str(&config).to_string();
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        Agent::launch_until(dir, &all, health_path)
    }

    fn launch(dir: TempDir, args: &[&str]) -> Agent {
        Agent::launch_until(dir, args, "/healthz")
    }

    fn launch_until(dir: TempDir, args: &[&str], health_path: &str) -> Agent {
        let bin = agent_bin();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("valid address");
        let log_path = dir.path().join("agent.log");
        let log = File::create(&log_path).expect("cannot create the agent log");
        let log_err = log.try_clone().expect("cannot dup the agent log");
        let child = Command::new(&bin)
            .args(["run", "--listen", &addr.to_string()])
            .args(args)
            .env_remove("POOLSCOPE_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut agent = Agent { addr, child, dir };
        let ready = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent ({}) exited before serving /healthz: {status}\n--- agent log ---\n{}",
                    bin.display(),
                    agent.log()
                );
            }
            // Connect only once the port listens: a refused probe would count
            // as a refused connect in every other agent that runs meanwhile.
            if !tcp_listening(addr.port()) {
                return None;
            }
            agent
                .get(health_path)
                .ok()
                .filter(|body| body.trim() == "ok")
        });
        if ready.is_none() {
            panic!(
                "the agent did not answer {health_path} on {addr} within 30 s\n--- agent log ---\n{}",
                agent.log()
            );
        }
        agent
    }

    /// The status code and body of GET `path`, whatever the status.
    pub fn get_with_status(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.get_raw(path, None).map(|r| (r.status, r.body))
    }

    /// One HTTP/1.0 GET of `path`, with `Authorization: Bearer token` when
    /// given: the status, the body and how long the whole exchange took
    /// (connect to the end of the answer). The tests' one raw GET.
    pub fn get_raw(&self, path: &str, token: Option<&str>) -> anyhow::Result<RawResponse> {
        use std::io::Read;
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\n{auth}\r\n",
            self.addr
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("malformed response: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
        Ok(RawResponse {
            status,
            body: body.to_string(),
            took,
        })
    }

    /// Sends SIGTERM and waits (30 s at most) for the agent to exit: its
    /// exit status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let pid = i32::try_from(self.child.id()).expect("pid fits in i32");
        // SAFETY: plain kill(2) on our own child, which we have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = wait_exit(&mut self.child, Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "the agent did not exit within 30 s of SIGTERM\n--- agent log ---\n{}",
                self.log()
            )
        });
        (status, started.elapsed())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("agent.log"))
    }

    fn client(&self) -> poolscope::cli::AgentClient {
        poolscope::cli::AgentClient::without_token(self.addr)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        self.client().get(path)
    }

    /// Every connection the agent lists, following its pages.
    pub fn connections(&self) -> Vec<ConnectionView> {
        poolscope::cli::fetch_connections(&self.client())
            .unwrap_or_else(|e| panic!("GET /api/v1/connections: {e:#}"))
    }

    /// The connections of one process (one page: a test's process holds
    /// far fewer than a page).
    pub fn connections_of(&self, pid: u32) -> Vec<ConnectionView> {
        let path = format!("/api/v1/connections?pid={pid}&limit=10000");
        let body = self
            .get(&path)
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
        let response: ConnectionsResponse = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path} is not valid JSON ({e}): {body}"));
        response.connections
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e:#}"))
    }

    /// Value of the first sample matching `selector` (see [`metric_sample`]),
    /// 0 when there is none (counters and gauges appear on first use).
    pub fn metric_value(&self, selector: &str) -> f64 {
        metric_sample(&self.metrics(), selector).unwrap_or(0.0)
    }

    /// Polls the process's connections until `f` accepts them, for at most
    /// [`EVENT_TIMEOUT`]; panics with what the agent last showed and its log.
    pub fn wait_for<T>(
        &self,
        pid: u32,
        what: &str,
        mut f: impl FnMut(&[ConnectionView]) -> Option<T>,
    ) -> T {
        let mut last = Vec::new();
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.connections_of(pid);
            f(&last)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {what} (pid {pid})\n\
                 --- last connections of pid {pid} ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&last).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// `/api/v1/queries/slow`.
    pub fn slow_queries(&self) -> SlowQueriesResponse {
        let body = self
            .get("/api/v1/queries/slow")
            .unwrap_or_else(|e| panic!("GET /api/v1/queries/slow: {e:#}"));
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/queries/slow is not valid JSON ({e}): {body}"))
    }

    /// Polls the slow-query reports of one process (oldest first) until `f`
    /// accepts them, for at most [`EVENT_TIMEOUT`]; panics with what the
    /// agent last showed and its log.
    pub fn wait_for_slow<T>(
        &self,
        pid: u32,
        what: &str,
        mut f: impl FnMut(&[SlowQuery]) -> Option<T>,
    ) -> T {
        let mut last = Vec::new();
        let found = wait_until(EVENT_TIMEOUT, || {
            let mut mine: Vec<SlowQuery> = self
                .slow_queries()
                .slow_queries
                .into_iter()
                .filter(|q| q.pid == pid)
                .collect();
            mine.reverse();
            last = mine;
            f(&last)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {what} (pid {pid})\n\
                 --- last slow queries of pid {pid} ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&last).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// Round trips per (operation, error type) to 127.0.0.1:`port`, from the
    /// `db_client_operation_duration_seconds` histogram.
    pub fn operations(&self, port: u16) -> OperationCounts {
        operation_counts(&self.metrics(), port)
    }

    /// Polls [`Agent::operations`] until the round trips of `operation`
    /// with `error_type` ("" for none) have been counted `n` times, and
    /// returns all counts then. Round trips of one connection are counted in
    /// order, so when a client's last statement is this sentinel, everything
    /// it sent before is in the counts too.
    pub fn wait_for_operation(
        &self,
        port: u16,
        operation: &str,
        error_type: &str,
        n: u64,
    ) -> OperationCounts {
        let mut last = OperationCounts::new();
        let key = (operation.to_string(), error_type.to_string());
        let sentinel = format!("{operation} (error_type {error_type:?})");
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.operations(port);
            (last.get(&key).copied().unwrap_or(0) >= n).then(|| last.clone())
        });
        found.unwrap_or_else(|| {
            let conns: Vec<ConnectionView> = self
                .connections()
                .into_iter()
                .filter(|c| c.remote_port == Some(port))
                .collect();
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {n} {sentinel} round trips to \
                 port {port}\n--- operations to port {port} ---\n{last:#?}\n\
                 --- connections to port {port} ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&conns).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// Polls `/metrics` until the sample matching `selector` satisfies `ok`.
    pub fn wait_for_metric(&self, selector: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = String::new();
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.metrics();
            let v = metric_sample(&last, selector).unwrap_or(0.0);
            ok(v).then_some(v)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {selector} \
                 (now {:?})\n--- metrics ---\n{last}",
                metric_sample(&last, selector)
            )
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: plain kill(2) on our own child, which we have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            if wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// `name{a="1",b="2"}` -> ("name", [("a","1"), ("b","2")]).
fn parse_series(text: &str) -> Option<(&str, Vec<(String, String)>)> {
    let Some((name, rest)) = text.split_once('{') else {
        return Some((text.trim(), Vec::new()));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_string(), value));
    }
    Some((name.trim(), labels))
}

/// Every sample of metric `name`: its labels and value.
pub fn metric_series(metrics: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = parse_series(series)?;
            let value = value.trim().parse::<f64>().ok()?;
            (series_name == name).then_some((labels, value))
        })
        .collect()
}

/// Round trips per (`db_operation_name`, `error_type`), "" for a label that
/// is absent.
pub type OperationCounts = BTreeMap<(String, String), u64>;

/// Counts of the `db_client_operation_duration_seconds` histogram for
/// `server_port` = `port`, summed over the other labels.
pub fn operation_counts(metrics: &str, port: u16) -> OperationCounts {
    let port = port.to_string();
    let mut counts = OperationCounts::new();
    for (labels, value) in metric_series(metrics, "db_client_operation_duration_seconds_count") {
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        if label("server_port") != port {
            continue;
        }
        let key = (label("db_operation_name"), label("error_type"));
        // Counts are integers; the text format may print them as floats.
        *counts.entry(key).or_default() += value.round() as u64;
    }
    counts
}

/// Builds expected [`OperationCounts`]: `[("SELECT", "", 7), ("SELECT",
/// "42601", 1)]`.
pub fn operations(expected: &[(&str, &str, u64)]) -> OperationCounts {
    expected
        .iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(op, error, n)| ((op.to_string(), error.to_string()), *n))
        .collect()
}

/// The value of the first sample in Prometheus text `metrics` whose name is
/// the selector's and whose labels include all the selector's labels, e.g.
/// `poolscope_connects_total{result="refused"}`.
pub fn metric_sample(metrics: &str, selector: &str) -> Option<f64> {
    metric_samples(metrics, selector).into_iter().next()
}

/// Every sample matching `selector` (see [`metric_sample`]).
pub fn metric_samples(metrics: &str, selector: &str) -> Vec<f64> {
    let Some((want_name, want_labels)) = parse_series(selector) else {
        panic!("bad metric selector {selector:?}");
    };
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = parse_series(series)?;
            (name == want_name && want_labels.iter().all(|w| labels.contains(w)))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The connection client child
// ---------------------------------------------------------------------------

/// Python interpreter for the client: the system one when there is one, so
/// that the process is `python3` itself rather than a version-manager shim.
pub fn python3() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        system.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// The unprivileged user that attack tests run their attackers as.
pub const FUZZ_USER: &str = "poolscope-fuzz";

/// uid and gid of [`FUZZ_USER`], created (as a system user without a home
/// or a shell) if missing: CI machines have it only if a test makes it.
pub fn unprivileged_user() -> (u32, u32) {
    let exists = Command::new("id")
        .arg(FUZZ_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                FUZZ_USER,
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run useradd to create {FUZZ_USER}: {e}"));
        assert!(
            out.status.success(),
            "useradd {FUZZ_USER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, FUZZ_USER])
            .output()
            .unwrap_or_else(|e| panic!("cannot run id: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("id {flag} {FUZZ_USER}: {e}"))
    };
    let (uid, gid) = (id("-u"), id("-g"));
    assert_ne!(uid, 0, "{FUZZ_USER} must not be root");
    (uid, gid)
}

/// A Python script (`python3 -c`), run as this process's user or as
/// [`FUZZ_USER`], driven line by line: the test writes a line to its stdin
/// to tell it to go on, and it answers with a line on stdout. Killed on
/// drop.
pub struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub started: Instant,
}

impl Script {
    /// Runs `python3 -c script args...` as this process's user.
    pub fn python(script: &str, args: &[String]) -> Script {
        Script::spawn(script, args, None)
    }

    /// Runs `python3 -c script args...` as [`FUZZ_USER`], in `/` (the user
    /// may not read the test's directories).
    pub fn unprivileged(script: &str, args: &[String]) -> Script {
        Script::spawn(script, args, Some(unprivileged_user()))
    }

    fn spawn(script: &str, args: &[String], user: Option<(u32, u32)>) -> Script {
        use std::os::unix::process::CommandExt;
        let started = Instant::now();
        let mut cmd = Command::new(python3());
        cmd.arg("-c")
            .arg(script)
            .args(args)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let who = if user.is_some() {
            FUZZ_USER
        } else {
            "this user"
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 as {who}: {e}"));
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            panic!("python3 without pipes");
        };
        Script {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The script's next line, without its newline; panics at end of output.
    pub fn raw_line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the script's output: {e}"));
        assert!(n > 0, "the script (pid {}) ended its output", self.pid());
        line.trim_end_matches('\n').to_string()
    }

    /// The script's next line, as JSON.
    pub fn line(&mut self) -> Value {
        let line = self.raw_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the script said {line:?}: {e}"))
    }

    /// Writes `text` and a newline to the script's stdin.
    pub fn tell(&mut self, text: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("the script's stdin is closed"));
        writeln!(stdin, "{text}").unwrap_or_else(|e| panic!("writing to the script: {e}"));
        stdin
            .flush()
            .unwrap_or_else(|e| panic!("writing to the script: {e}"));
    }

    /// Closes the script's stdin (a script reading it to its end exits).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the script to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.stdin = None;
        kill_child(&mut self.child);
    }
}

/// `tests/scripts/conn_client.py`, driven over stdin/stdout. The test knows
/// its pid, so it can pick the child's connections out of the agent's view.
pub struct ConnClient {
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// A failed connect as the client reports it: errno name and the fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub errno: String,
    pub fd: i32,
}

impl ConnClient {
    pub fn spawn() -> ConnClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/conn_client.py");
        let mut child = Command::new(python3())
            .arg("-u")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut client = ConnClient {
            pid: child.id(),
            child,
            stdin: Some(stdin),
            stdout,
        };
        let reported: u32 = client
            .command("pid")
            .parse()
            .expect("the client's pid is a number");
        assert_eq!(
            reported, client.pid,
            "the client runs in the process we spawned"
        );
        client
    }

    /// Sends one command line and returns the one-line answer.
    pub fn command(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {line:?} to the client: {e}"));
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("cannot read the client's answer to {line:?}: {e}"));
        assert!(n > 0, "the client exited on {line:?}");
        let answer = answer.trim().to_string();
        assert!(
            !answer.starts_with("error "),
            "the client failed {line:?}: {answer}"
        );
        answer
    }

    /// A blocking TCP connect: Ok((fd, local port)) or the errno and fd.
    pub fn try_open(&mut self, host: &str, port: u16) -> Result<(i32, u16), ConnectError> {
        let answer = self.command(&format!("open {host} {port}"));
        let words: Vec<&str> = answer.split_whitespace().collect();
        match words.as_slice() {
            ["err", errno, fd] => Err(ConnectError {
                errno: errno.to_string(),
                fd: fd.parse().expect("fd is a number"),
            }),
            [fd, local_port] => Ok((
                fd.parse().expect("fd is a number"),
                local_port.parse().expect("port is a number"),
            )),
            _ => panic!("unexpected answer to open: {answer:?}"),
        }
    }

    /// A TCP connect that must succeed: (fd, local port).
    pub fn open(&mut self, host: &str, port: u16) -> (i32, u16) {
        self.try_open(host, port)
            .unwrap_or_else(|e| panic!("connect to {host}:{port} failed: {e:?}"))
    }

    /// A Unix-socket connect that must succeed: the fd.
    pub fn open_unix(&mut self, path: &Path) -> i32 {
        let answer = self.command(&format!("open_unix {}", path.display()));
        answer
            .parse()
            .unwrap_or_else(|_| panic!("connect to {} failed: {answer}", path.display()))
    }

    pub fn close(&mut self, fd: i32) {
        let answer = self.command(&format!("close {fd}"));
        assert_eq!(answer, "ok", "close {fd}");
    }

    /// Half-closes a connection (`shutdown(SHUT_WR)`); its fd stays open.
    pub fn shutdown(&mut self, fd: i32) {
        let answer = self.command(&format!("shutdown {fd}"));
        assert_eq!(answer, "ok", "shutdown {fd}");
    }

    /// Makes the client exit at once without closing anything
    /// (`os._exit`) and reaps it.
    pub fn exit_without_closing(&mut self) -> ExitStatus {
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "exit")
            .and_then(|_| stdin.flush())
            .expect("cannot send exit to the client");
        self.stdin = None;
        wait_exit(&mut self.child, Duration::from_secs(10)).expect("the client did not exit")
    }
}

impl Drop for ConnClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Command-line SQL clients
// ---------------------------------------------------------------------------

/// A command-line client (`psql`, `mariadb`) reading SQL from a pipe that
/// the test keeps open, so that its session lasts between statements.
/// Output goes to files; killed on drop.
pub struct SqlShell {
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    dir: TempDir,
}

/// What a [`SqlShell`] printed, once it exited.
#[derive(Debug)]
pub struct ShellOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl SqlShell {
    pub fn spawn(mut cmd: Command) -> SqlShell {
        let dir = TempDir::new("poolscope-shell");
        let stdout = File::create(dir.path().join("stdout")).expect("cannot create stdout");
        let stderr = File::create(dir.path().join("stderr")).expect("cannot create stderr");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        SqlShell {
            pid: child.id(),
            child,
            stdin,
            dir,
        }
    }

    /// Writes SQL (complete statements, with their `;`) to the client.
    pub fn send(&mut self, sql: &str) {
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "{sql}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {sql:?} to the client: {e}"));
    }

    /// What the client printed so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join("stdout"))
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr"))
    }

    /// Closes the client's stdin (end of script) and waits for it to exit.
    pub fn finish(&mut self) -> ShellOutput {
        self.stdin = None;
        let status = wait_exit(&mut self.child, Duration::from_secs(30))
            .expect("the client did not exit at the end of its input");
        ShellOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for SqlShell {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// The database client child
// ---------------------------------------------------------------------------

/// A database error as the client library reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientDbError {
    /// SQLSTATE (psycopg) or MySQL error number (mysql-connector).
    pub code: String,
    pub message: String,
}

/// What one SQL statement returned: rows (None for statements without a
/// result set) or the database's error.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlOutcome {
    pub rows: Option<Vec<Vec<Value>>>,
    pub error: Option<ClientDbError>,
}

/// `tests/scripts/db_client.py`: one database connection (psycopg 3,
/// mysql-connector-python or a plain socket speaking RESP) in a child whose
/// pid the test knows, driven with one JSON request per line.
pub struct DbClient {
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl DbClient {
    pub fn spawn() -> DbClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/db_client.py");
        let mut child = Command::new(python3())
            .arg("-u")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut client = DbClient {
            pid: child.id(),
            child,
            stdin: Some(stdin),
            stdout,
        };
        let reported = client.request(json!({"op": "pid"}))["pid"].as_u64();
        assert_eq!(
            reported,
            Some(u64::from(client.pid)),
            "the client runs in the process we spawned"
        );
        client
    }

    /// Sends one request and returns the answer; panics unless it is ok.
    pub fn request(&mut self, request: Value) -> Value {
        let line = request.to_string();
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {line} to the client: {e}"));
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("cannot read the client's answer to {line}: {e}"));
        assert!(n > 0, "the client exited on {line}");
        let answer: Value = serde_json::from_str(&answer).unwrap_or_else(|e| {
            panic!("the client's answer to {line} is not JSON ({e}): {answer}")
        });
        assert_eq!(
            answer["ok"],
            Value::Bool(true),
            "the client failed {line}: {answer}"
        );
        answer
    }

    /// Connects to 127.0.0.1:`port`; `system` is "postgresql", "mysql" or
    /// "redis". Returns (fd, local port).
    pub fn connect(&mut self, system: &str, port: u16) -> (i32, u16) {
        let answer = self.request(json!({"op": "connect", "system": system, "port": port}));
        let fd = answer["fd"].as_i64().and_then(|fd| i32::try_from(fd).ok());
        let local = answer["local_port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok());
        match (fd, local) {
            (Some(fd), Some(local)) => (fd, local),
            _ => panic!("unexpected answer to connect: {answer}"),
        }
    }

    fn outcome(answer: &Value) -> SqlOutcome {
        let rows = answer["rows"].as_array().map(|rows| {
            rows.iter()
                .map(|row| row.as_array().cloned().unwrap_or_default())
                .collect()
        });
        let error = answer["db_error"].as_object().map(|e| ClientDbError {
            code: e
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        });
        SqlOutcome { rows, error }
    }

    /// One statement without parameters (PostgreSQL: simple query protocol;
    /// MySQL: COM_QUERY); a database error is returned, not a panic.
    pub fn try_sql(&mut self, sql: &str) -> SqlOutcome {
        Self::outcome(&self.request(json!({"op": "sql", "sql": sql})))
    }

    /// One statement that must succeed; its rows, if it returns any.
    pub fn sql(&mut self, sql: &str) -> Option<Vec<Vec<Value>>> {
        let outcome = self.try_sql(sql);
        if let Some(e) = outcome.error {
            panic!("{sql:?} failed: {e:?}");
        }
        outcome.rows
    }

    /// A statement with `%s` placeholders prepared once and executed once
    /// per parameter list (PostgreSQL: psycopg's `prepare=True`; MySQL: a
    /// prepared cursor). Must succeed; the rows of the last execution.
    pub fn prepared(&mut self, sql: &str, params_list: &[Vec<Value>]) -> Option<Vec<Vec<Value>>> {
        let answer = self.request(
            json!({"op": "sql", "sql": sql, "params_list": params_list, "prepared": true}),
        );
        let outcome = Self::outcome(&answer);
        if let Some(e) = outcome.error {
            panic!("prepared {sql:?} {params_list:?} failed: {e:?}");
        }
        outcome.rows
    }

    /// Sends all `commands` to Redis in one write and returns the replies
    /// (error replies as `{"error": "..."}`) and the bytes written.
    pub fn redis(&mut self, commands: &[Vec<String>]) -> (Vec<Value>, usize) {
        let answer = self.request(json!({"op": "redis", "commands": commands}));
        let replies = answer["replies"].as_array().cloned().unwrap_or_default();
        let sent = answer["bytes_sent"].as_u64().unwrap_or_default();
        (replies, usize::try_from(sent).unwrap_or(usize::MAX))
    }
}

impl Drop for DbClient {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Whether a process still runs (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = stat.rsplit_once(')')?.1;
            after_comm.split_whitespace().next().map(|s| s != "Z")
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Node.js pool adapter (adapters/node)
// ---------------------------------------------------------------------------

/// `adapters/node`: the npm package `poolscope-adapter`.
pub fn node_adapter_dir() -> PathBuf {
    workspace_root().join("adapters").join("node")
}

/// True when `node`, the adapter's npm dependencies (`pg`) and its compiled
/// Unix-datagram sender are all there. In CI (`CI=true`) a missing one is a
/// failure, so that a runner without them cannot pass by skipping; elsewhere
/// the test is skipped with what to run.
pub fn require_node_adapter() -> bool {
    let dir = node_adapter_dir();
    let mut missing = Vec::new();
    let node_runs = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success());
    if !node_runs {
        missing.push("node (Debian's nodejs and npm)".to_string());
    }
    for (path, what) in [
        ("node_modules/pg/package.json", "the npm dependencies"),
        (
            "build/Release/poolscope_adapter.node",
            "the native sender (node-gyp)",
        ),
    ] {
        if !dir.join(path).is_file() {
            missing.push(format!("{what}: {}", dir.join(path).display()));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let text = format!(
        "the Node.js adapter tests need {}; run cargo xtask setup (or npm ci in {})",
        missing.join(", "),
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{text}");
    }
    eprintln!("skipped: {text}");
    false
}

// ===========================================================================
// Pool adapters: the Python application with real pools, leak reports
// through the CLI, pools, and the agent's memory. Used by
// tests/tests/adapter_python.rs.
// ===========================================================================

pub use poolscope::api::PoolsResponse;
pub use poolscope::detect::LeakKind;
pub use poolscope::lifecycle::PoolView;
pub use poolscope::reports::{LeakReport, LeaksResponse, ReportStatus};

/// `adapters/python`: the Python adapter package, put on the app's
/// PYTHONPATH.
pub fn python_adapter_dir() -> PathBuf {
    workspace_root().join("adapters/python")
}

/// An agent configuration with the adapter socket at `socket` and the
/// given `[leaks]` thresholds (`("leak_threshold_seconds", 3.0)`, ...).
pub fn adapter_config(socket: &Path, leaks: &[(&str, f64)]) -> String {
    let mut toml = format!("[adapter]\nsocket = {:?}\n\n[leaks]\n", path_str(socket));
    for (key, value) in leaks {
        toml.push_str(&format!("{key} = {value:?}\n"));
    }
    toml
}

/// `tests/scripts/pool_app.py`: an application with real SQLAlchemy and
/// psycopg_pool pools (and, when asked, the pool adapter), driven with one
/// JSON request per line. Killed on drop.
pub struct PoolApp {
    pub pid: u32,
    /// The native id of the app's main thread, which serves the requests
    /// (and so checks out the connections that `checkout` holds).
    pub tid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl PoolApp {
    /// Starts the app; its adapter (if a pool is created with one) sends to
    /// `adapter_socket`. Without a socket the variable is removed, so an
    /// adapter would try the default path.
    pub fn spawn(adapter_socket: Option<&Path>) -> PoolApp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pool_app.py");
        let mut cmd = Command::new(python3());
        cmd.arg("-u")
            .arg(&script)
            .env("PYTHONPATH", python_adapter_dir())
            .env_remove("POOLSCOPE_ADAPTER_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(socket) = adapter_socket {
            cmd.env("POOLSCOPE_ADAPTER_SOCKET", socket);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut app = PoolApp {
            pid: child.id(),
            tid: 0,
            child,
            stdin: Some(stdin),
            stdout,
        };
        let answer = app.request(json!({"op": "pid"}));
        assert_eq!(
            answer["pid"].as_u64(),
            Some(u64::from(app.pid)),
            "the app runs in the process we spawned"
        );
        app.tid = answer["tid"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .expect("the app's thread id");
        app
    }

    /// Sends one request and returns the answer; panics unless it is ok.
    pub fn request(&mut self, request: Value) -> Value {
        let line = request.to_string();
        let stdin = self.stdin.as_mut().expect("the app's stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {line} to the app: {e}"));
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("cannot read the app's answer to {line}: {e}"));
        assert!(n > 0, "the app exited on {line}");
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("the app's answer to {line} is not JSON ({e}): {answer}"));
        assert_eq!(
            answer["ok"],
            Value::Bool(true),
            "the app failed {line}: {answer}"
        );
        answer
    }
}

/// A held connection as the app saw it (getsockname on the driver's fd),
/// and when the test got it.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub fd: i32,
    pub port: u16,
    pub at: Instant,
}

impl PoolApp {
    /// Checks a connection out of `engine`'s pool and holds it as `id`.
    pub fn checkout(&mut self, engine: &str, id: &str) -> Held {
        let answer = self.request(json!({"op": "checkout", "engine": engine, "id": id}));
        held_from(&answer)
    }
}

/// The connection the app's answer names (`fd`, `local_port`, and a
/// `local_address` on 127.0.0.1 that agrees with the port), held from now.
fn held_from(answer: &Value) -> Held {
    let fd = answer["fd"].as_i64().and_then(|v| i32::try_from(v).ok());
    let port = answer["local_port"]
        .as_u64()
        .and_then(|v| u16::try_from(v).ok());
    assert_eq!(
        answer["local_address"].as_str(),
        port.map(|p| format!("{LOCALHOST_V4}:{p}")).as_deref(),
        "{answer}"
    );
    Held {
        fd: fd.unwrap_or_else(|| panic!("no fd in {answer}")),
        port: port.unwrap_or_else(|| panic!("no local port in {answer}")),
        at: Instant::now(),
    }
}

/// The local port of a report's connection, if it names one.
pub fn local_port(report: &LeakReport) -> Option<u16> {
    report
        .local_address
        .as_deref()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port())
}

impl Drop for PoolApp {
    fn drop(&mut self) {
        self.stdin = None;
        kill_child(&mut self.child);
    }
}

impl Agent {
    /// Leak reports as `poolscope leaks --json --agent ADDR` prints them.
    pub fn leaks_cli(&self) -> Vec<LeakReport> {
        let output = Command::new(agent_bin())
            .args(["leaks", "--json", "--agent", &self.addr.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run poolscope leaks");
        assert!(
            output.status.success(),
            "poolscope leaks --json failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let response: LeaksResponse = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "poolscope leaks --json printed no valid JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        response.reports
    }

    /// `/api/v1/pools`.
    pub fn pools(&self) -> Vec<PoolView> {
        let body = self
            .get("/api/v1/pools")
            .unwrap_or_else(|e| panic!("GET /api/v1/pools: {e:#}"));
        let response: PoolsResponse = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/pools is not valid JSON ({e}): {body}"));
        response.pools
    }

    /// The pool `name` of process `pid`, if the agent shows it.
    pub fn pool(&self, pid: u32, name: &str) -> Option<PoolView> {
        self.pools()
            .into_iter()
            .find(|p| p.pid == pid && p.name == name)
    }

    /// Waits ([`EVENT_TIMEOUT`] at most) until the agent shows the pool
    /// `name` of `pid` as `ok` wants it; panics with what it showed and its
    /// log.
    pub fn wait_for_pool(
        &self,
        pid: u32,
        name: &str,
        what: &str,
        ok: impl Fn(&PoolView) -> bool,
    ) -> PoolView {
        let mut last = None;
        let found = wait_until(EVENT_TIMEOUT, || {
            last = self.pool(pid, name);
            last.clone().filter(|p| ok(p))
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {EVENT_TIMEOUT:?} waiting for {what}: pool {name:?} of pid {pid} \
                 is {last:#?}\n--- all pools ---\n{}\n--- agent log ---\n{}",
                serde_json::to_string_pretty(&self.pools()).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// Sum of every sample matching `selector` (see [`metric_sample`]).
    pub fn metric_sum(&self, selector: &str) -> f64 {
        metric_samples(&self.metrics(), selector).iter().sum()
    }
}

/// Resident memory of a process in KiB (VmRSS in /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_label_subsets() {
        let text = "# HELP x\n\
            poolscope_connects_total{network_transport=\"tcp\",result=\"refused\"} 3\n\
            poolscope_connects_total{network_transport=\"tcp\",result=\"ok\"} 7\n\
            poolscope_connection_open{process_executable_name=\"a b\",process_pid=\"12\",server_address=\"127.0.0.1\",server_port=\"5432\"} 5\n\
            poolscope_kernel_events_dropped_total 0\n";
        assert_eq!(
            metric_sample(text, "poolscope_connects_total{result=\"refused\"}"),
            Some(3.0)
        );
        assert_eq!(
            metric_sample(
                text,
                "poolscope_connects_total{network_transport=\"tcp\",result=\"ok\"}"
            ),
            Some(7.0)
        );
        assert_eq!(
            metric_sample(text, "poolscope_connection_open{process_pid=\"12\"}"),
            Some(5.0)
        );
        assert_eq!(
            metric_sample(text, "poolscope_connection_open{process_pid=\"1\"}"),
            None
        );
        assert_eq!(
            metric_sample(text, "poolscope_kernel_events_dropped_total"),
            Some(0.0)
        );
        assert_eq!(metric_samples(text, "poolscope_connects_total").len(), 2);
        assert_eq!(metric_sample(text, "poolscope_connects"), None);
    }
}
