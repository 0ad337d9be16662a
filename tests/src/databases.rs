//! Throwaway PostgreSQL, MariaDB and Redis servers on loopback, and the
//! command-line SQL clients that talk to them.

use std::{
    ffi::CString,
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{
    free_port, is_root, kill_child, path_str, read_lossy, tcp_listening, wait_exit, wait_until,
    TempDir, LOCALHOST_V4,
};

/// The `bin` directory of the newest PostgreSQL under /usr/lib/postgresql.
/// A number after `label` in pgbench's summary.
pub fn pgbench_number(output: &str, label: &str) -> f64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in pgbench output:\n{output}"))
}

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
///
/// `getpwnam_r`, not `getpwnam`: tests start servers from parallel threads,
/// and `getpwnam`'s one static record, overwritten by another thread's
/// lookup of `mysql` between the call and the read, once gave the
/// PostgreSQL cluster directory to the wrong user (initdb: permission
/// denied).
fn user_ids(user: &str) -> (libc::uid_t, libc::gid_t) {
    let name = CString::new(user).expect("no NUL in a user name");
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut record: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut strings = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call; the strings the record
    // points to live in `strings`, which outlives the read below.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut record,
            strings.as_mut_ptr(),
            strings.len(),
            &mut found,
        )
    };
    assert!(
        rc == 0 && !found.is_null(),
        "there is no `{user}` user (getpwnam_r: {rc}): run cargo xtask setup"
    );
    (record.pw_uid, record.pw_gid)
}

/// A self-signed certificate for `localhost` and its key (0600), made with
/// `openssl req` in `dir` and owned by `owner` (uid, gid) when given: what a
/// server needs to accept TLS. Clients of the tests do not verify it.
fn self_signed_certificate(
    dir: &Path,
    owner: Option<(libc::uid_t, libc::gid_t)>,
) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    let output = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (run cargo xtask setup): {e}"));
    assert!(
        output.status.success(),
        "openssl req failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", key.display()));
    if let Some((uid, gid)) = owner {
        for file in [&cert, &key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot chown {}: {e}", file.display()));
        }
    }
    (cert, key)
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with_tls(false)
    }

    /// As [`Postgres::start`], with `ssl=on` and a self-signed certificate
    /// (`server.crt`, `server.key` in the cluster directory): clients with
    /// `sslmode=require` talk TLS, clients with `sslmode=disable` do not.
    pub fn start_tls() -> Postgres {
        Postgres::start_with_tls(true)
    }

    fn start_with_tls(tls: bool) -> Postgres {
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
        let ssl = if tls {
            let owner = is_root().then(postgres_ids);
            let (cert, key) = self_signed_certificate(pg.dir.path(), owner);
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                path_str(&cert),
                path_str(&key)
            )
        } else {
            String::new()
        };
        // Another test may take the port between free_port() and the server's
        // bind; try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{ssl}",
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

    /// `pgbench -i -s SCALE` over the Unix socket (the TCP port stays for
    /// what a test measures).
    pub fn pgbench_init(&self, scale: u32) {
        let init = Command::new(postgres_bin_dir().join("pgbench"))
            .args([
                "-h",
                path_str(self.socket_dir()),
                "-p",
                &self.port.to_string(),
            ])
            .args(["-U", "postgres", "-i", "-s", &scale.to_string(), "postgres"])
            .output()
            .expect("pgbench -i");
        assert!(init.status.success(), "pgbench -i failed: {init:?}");
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
        MariaDb::start_with_tls(false)
    }

    /// As [`MariaDb::start`], with `--ssl-cert`/`--ssl-key` a self-signed
    /// certificate in the server's directory; checks that the server says
    /// `have_ssl` YES. Clients may then ask for TLS (it is not required).
    pub fn start_tls() -> MariaDb {
        MariaDb::start_with_tls(true)
    }

    fn start_with_tls(tls: bool) -> MariaDb {
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
        let mut ssl_args = Vec::new();
        if tls {
            let owner = is_root().then(|| user_ids("mysql"));
            let (cert, key) = self_signed_certificate(dir.path(), owner);
            ssl_args.push(format!("--ssl-cert={}", path_str(&cert)));
            ssl_args.push(format!("--ssl-key={}", path_str(&key)));
        }
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
                // After --no-defaults, which must come first.
                .args(&ssl_args)
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
            if tls {
                let have_ssl = db.sql("SHOW VARIABLES LIKE 'have_ssl'");
                assert_eq!(
                    have_ssl,
                    "have_ssl\tYES",
                    "MariaDB did not take its certificate\n{}",
                    db.log()
                );
            }
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
