//! The bench's own cgroups: one for the workload (servers and clients), one
//! for the agent, read for CPU time and removed on the way out.
//!
//! cgroup v1 keeps CPU time per cgroup in the cpuacct controller
//! (`cpuacct.usage`, ns); cgroup v2 keeps it in every cgroup's `cpu.stat`
//! (`usage_usec`), without any controller enabled. Both count user and
//! system time of the member tasks, which includes the kernel time spent
//! in BPF programs that run in those tasks' system calls.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Version {
    /// cgroup v1, cpuacct controller.
    V1,
    /// cgroup v2 (unified), cpu.stat.
    V2,
}

/// Where the bench creates its cgroups: the cgroup this process is in, in
/// the hierarchy that accounts CPU time.
pub struct Hierarchy {
    pub version: Version,
    /// Our own cgroup in it, e.g. /sys/fs/cgroup/cpuacct/user.slice.
    pub parent: PathBuf,
}

impl fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Version::V1 => write!(f, "cgroup v1 (cpuacct.usage"),
            Version::V2 => write!(f, "cgroup v2 (cpu.stat usage_usec"),
        }?;
        write!(f, ", under {})", self.parent.display())
    }
}

/// A pure v2 machine mounts the unified hierarchy at /sys/fs/cgroup; a v1 or
/// hybrid machine mounts cpuacct there (alone or with cpu), and a hybrid
/// one has v2 besides (/sys/fs/cgroup/unified). Unless `wanted` says
/// otherwise, cpuacct is preferred where it exists, since a hybrid
/// machine's v2 tree is usually not the one its manager uses.
pub fn detect(wanted: Option<Version>) -> Result<Hierarchy> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    let own = fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let mut v1_cpuacct = None;
    let mut v2 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, mount, fstype, options, ..] = fields[..] else {
            continue;
        };
        match fstype {
            "cgroup" if options.split(',').any(|o| o == "cpuacct") => {
                v1_cpuacct.get_or_insert(PathBuf::from(mount));
            }
            "cgroup2" => {
                v2.get_or_insert(PathBuf::from(mount));
            }
            _ => {}
        }
    }
    let own_path = |wanted: &dyn Fn(&str, &str) -> bool| {
        own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            wanted(id, controllers).then(|| path.trim_start_matches('/').to_string())
        })
    };
    let pure_v2 = v2.as_deref() == Some(Path::new("/sys/fs/cgroup"));
    let use_v1 = match wanted {
        Some(Version::V1) => true,
        Some(Version::V2) => false,
        None => !pure_v2,
    };
    let (version, mount, path) = match (use_v1, v1_cpuacct, v2) {
        (true, Some(mount), _) => {
            let path = own_path(&|_, c| c.split(',').any(|c| c == "cpuacct"))
                .context("/proc/self/cgroup has no cpuacct line")?;
            (Version::V1, mount, path)
        }
        (false, _, Some(mount)) | (true, None, Some(mount)) if wanted != Some(Version::V1) => {
            let path = own_path(&|id, c| id == "0" && c.is_empty())
                .context("/proc/self/cgroup has no v2 (0::) line")?;
            (Version::V2, mount, path)
        }
        _ => bail!(
            "no cgroup hierarchy that accounts CPU time{} in /proc/self/mounts",
            match wanted {
                Some(Version::V1) => " (asked for v1: no cpuacct mount)",
                Some(Version::V2) => " (asked for v2: no cgroup2 mount)",
                None => " (neither a v1 cpuacct nor a v2 mount)",
            }
        ),
    };
    Ok(Hierarchy {
        version,
        parent: if path.is_empty() {
            mount
        } else {
            mount.join(path)
        },
    })
}

/// A cgroup the bench created; on drop, whatever still runs in it is
/// stopped (SIGTERM, then SIGKILL) and the directory is removed.
pub struct Cgroup {
    dir: PathBuf,
    version: Version,
}

impl Cgroup {
    pub fn create(hierarchy: &Hierarchy, name: &str) -> Result<Cgroup> {
        let dir = hierarchy.parent.join(name);
        fs::create_dir(&dir).with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        let cgroup = Cgroup {
            dir,
            version: hierarchy.version,
        };
        // Fails early (and removes the directory) if CPU time is not there.
        cgroup.usage_ns()?;
        Ok(cgroup)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a pid is written to in order to move that process in.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// CPU time of all tasks that ran in the cgroup, in nanoseconds.
    pub fn usage_ns(&self) -> Result<u64> {
        match self.version {
            Version::V1 => {
                let path = self.dir.join("cpuacct.usage");
                let text = fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                text.trim()
                    .parse()
                    .with_context(|| format!("{} is not a number: {text:?}", path.display()))
            }
            Version::V2 => {
                let path = self.dir.join("cpu.stat");
                let text = fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                text.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|usec| usec * 1000)
                    .with_context(|| format!("no usage_usec in {}", path.display()))
            }
        }
    }

    /// Processes in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// Stops what runs in it (SIGTERM, after 3 s SIGKILL) and removes it;
    /// bounded to about 10 s.
    fn remove(&self) -> Result<()> {
        for attempt in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                match fs::remove_dir(&self.dir) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    // Busy for a moment while exited tasks are released.
                    Err(_) if attempt < 99 => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot remove cgroup {}", self.dir.display())
                        })
                    }
                }
            } else {
                signal(if attempt < 30 { "TERM" } else { "KILL" }, &pids);
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "processes {:?} are still in cgroup {}",
            self.pids(),
            self.dir.display()
        )
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Sends a signal with the shell's `kill` builtin (no libc binding needed).
pub fn signal(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{signal} \"$@\" 2>/dev/null"))
        .arg("sh")
        .args(pids.iter().map(u32::to_string))
        .status();
}

/// Shell script that a [`Command`] runs to put itself into a cgroup before
/// it execs the real program, so that everything the program forks starts
/// inside it: `sh -c SCRIPT PROCS_FILE PROGRAM ARGS...`.
pub const ENTER_SCRIPT: &str = r#"echo $$ > "$0" && exec "$@""#;

/// A command that runs `program` inside `cgroup`.
pub fn command_in(cgroup: &Cgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(ENTER_SCRIPT)
        .arg(cgroup.procs_file())
        .arg(program);
    cmd
}

/// A detached watchdog that cleans up if this process dies without running
/// its destructors (SIGINT, SIGKILL): once `pid` is gone it stops what is
/// left in the cgroups, removes them, and deletes the directories `dirs`.
/// It runs in its own process group, so a terminal's Ctrl-C does not reach
/// it.
pub fn spawn_watchdog(pid: u32, cgroups: &[&Cgroup], dirs: &[&Path]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    const SCRIPT: &str = r#"
pid=$1; dirs=$2; shift 2
while [ -d /proc/$pid ]; do sleep 1; done
for cg in "$@"; do
  i=0
  while [ -d "$cg" ] && [ $i -lt 100 ]; do
    pids=$(cat "$cg/cgroup.procs" 2>/dev/null)
    if [ -z "$pids" ]; then
      rmdir "$cg" 2>/dev/null
    elif [ $i -lt 30 ]; then
      kill -TERM $pids 2>/dev/null
    else
      kill -KILL $pids 2>/dev/null
    fi
    sleep 0.1; i=$((i + 1))
  done
done
IFS='
'
for dir in $dirs; do rm -rf "$dir"; done
"#;
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if dirs.iter().any(|d| d.contains('\n') || !d.starts_with('/')) {
        bail!("the watchdog takes absolute paths without newlines: {dirs:?}");
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg("poolscope-bench-watchdog")
        .arg(pid.to_string())
        .arg(dirs.join("\n"))
        .args(cgroups.iter().map(|c| c.dir()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    // Not waited for: it outlives us by design and init reaps it.
    cmd.spawn().context("cannot start the cleanup watchdog")?;
    Ok(())
}
