//! The test environment: root and kernel checks, the agent binary, ports,
//! polling, child processes and temp dirs.

use std::{
    fs::{self},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant, SystemTime},
};

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

pub(crate) fn workspace_root() -> PathBuf {
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

pub(crate) fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

pub(crate) fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
