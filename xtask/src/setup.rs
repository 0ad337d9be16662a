//! `cargo xtask setup`: installs from the package registries only, prints one
//! line per thing it checks, and changes nothing when all is present.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::{cargo, cargo_home, is_root, output, run, which};

/// Debian's Rust for the kernel crate (1.96 with a prebuilt BPF `core`), its
/// clippy, and what bpf-linker's build links against besides LLVM itself.
const KERNEL_DEBS: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    "libzstd-dev",
];
/// Real servers and tools the integration tests start on loopback.
const TEST_DEBS: &[&str] = &[
    "postgresql",
    "postgresql-contrib",
    "mariadb-server",
    "redis-server",
    "prometheus",
    "python3",
    "curl",
    // tls_statements.rs makes the servers' self-signed certificates.
    "openssl",
    // The live page's test renders it in headless Chromium.
    "chromium",
    // deploy.rs: `systemd-analyze verify` of the unit, and libseccomp for
    // reproducing the unit's system call filters where systemd is not PID 1.
    "systemd",
    "python3-seccomp",
];
/// What `cargo xtask bench` runs: the servers, sysbench (built with its
/// MySQL driver, which talks to MariaDB) and fio. Only the bench installs
/// sysbench and fio.
const BENCH_DEBS: &[&str] = &[
    "postgresql",
    "postgresql-contrib",
    "mariadb-server",
    "mariadb-client",
    "redis-server",
    "sysbench",
    "fio",
    // The TLS workload's server certificate.
    "openssl",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The interpreter the integration tests run their Python clients with
/// (`poolscope_tests::python3`): Debian's, not a version manager's shim.
pub const TEST_PYTHON: &str = "/usr/bin/python3";
/// Database drivers the query tests' Python clients import, and the pool
/// libraries the Python adapter's tests instrument.
const TEST_PIP: &[&str] = &[
    "psycopg[binary]",
    "mysql-connector-python",
    "SQLAlchemy",
    "psycopg_pool",
    // The TLS tests' OpenSSL 1.1 client: this release's binary wheel
    // bundles libpq and OpenSSL 1.1.1 (psycopg2_binary.libs/libssl-*.so.1.1).
    "psycopg2-binary==2.9.5",
    // deploy.rs validates the Kubernetes manifests with it (offline schemas).
    "kubernetes-validate",
];
const TEST_PIP_IMPORTS: &str =
    "import psycopg, psycopg2, mysql.connector, sqlalchemy, psycopg_pool, kubernetes_validate";

/// `with_test_deps: false` installs only what building the agent needs.
pub fn setup(with_test_deps: bool) -> Result<()> {
    let mut apt = Apt::default();
    let mut debs: Vec<String> = KERNEL_DEBS.iter().map(|s| s.to_string()).collect();
    if with_test_deps {
        debs.extend(TEST_DEBS.iter().map(|s| s.to_string()));
    }
    apt.ensure(&debs)?;
    // LLVM's dev packages and bpf-linker must match the LLVM inside Debian's
    // rustc, which can only be asked once rustc-web is installed.
    let major = kernel_llvm_major()?;
    apt.ensure(&[format!("llvm-{major}-dev"), format!("libpolly-{major}-dev")])?;
    ensure_rustup_components()?;
    ensure_bpf_linker(major)?;
    if with_test_deps {
        ensure_test_python_packages(&mut apt)?;
        ensure_node_adapter_deps(&mut apt)?;
        ensure_dashboard_deps(&mut apt)?;
        ensure_java_adapter(&mut apt)?;
    }
    Ok(())
}

/// The servers and load generators of `cargo xtask bench`.
pub fn ensure_bench_deps() -> Result<()> {
    let debs: Vec<String> = BENCH_DEBS.iter().map(|s| s.to_string()).collect();
    Apt::default().ensure(&debs)
}

/// What `cargo xtask soak` runs: PostgreSQL and pgbench.
pub fn ensure_soak_deps() -> Result<()> {
    Apt::default().ensure(&["postgresql".to_string(), "postgresql-contrib".to_string()])
}

/// The dashboards' type checker (typescript and @grafana/schema, pinned in
/// dashboards/package-lock.json), installed with `npm ci` only when missing.
fn ensure_dashboard_deps(apt: &mut Apt) -> Result<()> {
    let dir = super::root().join("dashboards");
    let installed = ["typescript", "@grafana/schema"].iter().all(|package| {
        dir.join("node_modules")
            .join(package)
            .join("package.json")
            .is_file()
    });
    if installed {
        println!("ok: dashboard checker dependencies (dashboards)");
        return Ok(());
    }
    // As for the adapter: Debian's Node.js and npm only when there are none.
    for (tool, debs) in [("node", &["nodejs", "npm"][..]), ("npm", &["npm"][..])] {
        if which(tool).is_none() {
            apt.ensure(&debs.iter().map(|d| d.to_string()).collect::<Vec<_>>())?;
        }
    }
    println!("installing: dashboard checker dependencies (npm ci in dashboards)");
    run(Command::new("npm")
        .current_dir(&dir)
        .args(["ci", "--no-audit", "--no-fund"]))
}

/// The Node.js adapter's npm dependencies (`pg`, `mysql2` and `mysql`, its
/// devDependencies, for its tests; the adapter itself is pure JavaScript
/// and builds nothing), installed with `npm ci` in adapters/node only when
/// one of them is missing. Node.js and npm come from Debian when the
/// machine has none.
fn ensure_node_adapter_deps(apt: &mut Apt) -> Result<()> {
    let dir = super::root().join("adapters").join("node");
    let installed = ["pg", "mysql2", "mysql"].iter().all(|package| {
        dir.join("node_modules")
            .join(package)
            .join("package.json")
            .is_file()
    });
    if installed {
        println!("ok: node adapter dependencies (adapters/node)");
        return Ok(());
    }
    // Only when missing: the machine's own Node.js (e.g. a newer one that
    // bundles npm) must not be replaced by Debian's.
    for (tool, debs) in [("node", &["nodejs", "npm"][..]), ("npm", &["npm"][..])] {
        if which(tool).is_none() {
            apt.ensure(&debs.iter().map(|d| d.to_string()).collect::<Vec<_>>())?;
        }
    }
    let subcommand = if dir.join("package-lock.json").is_file() {
        "ci"
    } else {
        "install"
    };
    println!("installing: node adapter dependencies (npm {subcommand} in adapters/node)");
    run(Command::new("npm")
        .current_dir(&dir)
        .args([subcommand, "--no-audit", "--no-fund"]))
}

/// The Node.js example pool of SQLite handles (adapters/node/examples/
/// sqlite-pool), which its integration test runs: `npm ci` there builds
/// better-sqlite3 from source (no prebuilt binary can be downloaded here),
/// minutes of C compiling, so `cargo xtask test` starts it beside clippy
/// and the build and waits for it before the tests. None when it is
/// already built.
pub fn start_node_sqlite_example() -> Result<Option<Background>> {
    let dir = super::root()
        .join("adapters")
        .join("node")
        .join("examples")
        .join("sqlite-pool");
    let built = dir
        .join("node_modules")
        .join("better-sqlite3")
        .join("build")
        .join("Release")
        .join("better_sqlite3.node");
    if built.is_file() {
        println!("ok: node sqlite example (better-sqlite3 built)");
        return Ok(None);
    }
    let log = super::target_dir().join("npm-sqlite-example.log");
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let out = fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone().context("cannot share the log file")?;
    println!(
        "installing (in the background): node sqlite example (npm ci in {}, log {})",
        dir.display(),
        log.display()
    );
    let child = Command::new("npm")
        .current_dir(&dir)
        .args(["ci", "--no-audit", "--no-fund"])
        // Straight to the compiler: the download it would try first fails.
        .env("npm_config_build_from_source", "true")
        .env("JOBS", "max")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start npm ci in {}", dir.display()))?;
    Ok(Some(Background {
        child,
        what: format!("npm ci in {}", dir.display()),
        log,
    }))
}

/// A set-up step running in the background: [`Background::finish`] waits
/// for it.
pub struct Background {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Background {
    pub fn finish(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .with_context(|| format!("cannot wait for {}", self.what))?;
        if status.success() {
            println!("installed: {}", self.what);
            return Ok(());
        }
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} exited with {status}; the end of {}:\n{}",
            self.what,
            self.log.display(),
            tail.join("\n")
        )
    }
}

/// What `cargo xtask bench --only adapters` runs: the JVM adapter and its
/// test application's jar (with `PoolBench`), built from the current
/// source, and the Node.js adapter's pg and mysql2.
pub fn ensure_adapter_bench_deps() -> Result<java_build::Built> {
    let mut apt = Apt::default();
    ensure_node_adapter_deps(&mut apt)?;
    let debs: Vec<String> = java_build::DEBS.iter().map(|s| s.to_string()).collect();
    apt.ensure(&debs)?;
    let out = super::target_dir().join("java");
    java_build::build(&super::root(), &out).map_err(anyhow::Error::msg)
}

/// The JVM adapter: a JDK and Debian's HikariCP, pgjdbc, MariaDB
/// Connector/J and SLF4J jars (Maven Central is not reachable here), then
/// the adapter's jar, its unit tests and the test application compiled
/// with javac into target/java (java-build; the tests build them again
/// from the current source).
fn ensure_java_adapter(apt: &mut Apt) -> Result<()> {
    let debs: Vec<String> = java_build::DEBS.iter().map(|s| s.to_string()).collect();
    apt.ensure(&debs)?;
    let out = super::target_dir().join("java");
    let built = java_build::build(&super::root(), &out).map_err(anyhow::Error::msg)?;
    println!("built: JVM adapter {}", built.adapter_jar.display());
    Ok(())
}

/// The Python database drivers, installed with pip (Debian's python3-pip)
/// into the interpreter the tests use, only when importing them fails.
fn ensure_test_python_packages(apt: &mut Apt) -> Result<()> {
    if output(Command::new(TEST_PYTHON).args(["-c", TEST_PIP_IMPORTS])).is_some() {
        println!("ok: python packages {}", TEST_PIP.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Python packages {} are missing for {TEST_PYTHON} and installing them needs root: \
             run `cargo xtask setup` as root.",
            TEST_PIP.join(" ")
        );
    }
    apt.ensure(&["python3-pip".to_string()])?;
    println!("installing: python packages {}", TEST_PIP.join(" "));
    // Debian has no mysql-connector-python; --break-system-packages because
    // Debian marks its Python externally managed (PEP 668).
    run(Command::new(TEST_PYTHON)
        .args(["-m", "pip", "install", "--quiet", "--break-system-packages"])
        .args(TEST_PIP))
}

#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn ensure(&mut self, pkgs: &[String]) -> Result<()> {
        let mut missing = Vec::new();
        for pkg in pkgs {
            if deb_installed(pkg) {
                println!("ok: {pkg}");
            } else {
                missing.push(pkg.as_str());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if !is_root() {
            bail!(
                "Debian packages {} are missing and installing them needs root: run `cargo xtask setup` as root.",
                missing.join(" ")
            );
        }
        for pkg in &missing {
            println!("installing: {pkg}");
        }
        // The package index is refreshed at most once per run.
        if !self.updated {
            run(apt_get().arg("update"))?;
            self.updated = true;
        }
        run(apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))
    }
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn deb_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status == "install ok installed")
}

/// The LLVM major version of the kernel toolchain's rustc (Debian's), from
/// `LLVM version: 22.1.8`.
fn kernel_llvm_major() -> Result<u32> {
    let toolchain = kernel_build::Toolchain::find().map_err(anyhow::Error::msg)?;
    let rustc = toolchain.rustc.display();
    let vv = output(Command::new(&toolchain.rustc).arg("-vV"))
        .with_context(|| format!("`{rustc} -vV` failed"))?;
    vv.lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.trim().parse().ok())
        .with_context(|| format!("no `LLVM version: N.x` line in `{rustc} -vV`"))
}

/// rustup's minimal profile leaves out rustfmt and clippy, which `test` needs.
fn ensure_rustup_components() -> Result<()> {
    for (component, subcommand) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if output(cargo().args([subcommand, "--version"])).is_some() {
            println!("ok: {component}");
            continue;
        }
        if which("rustup").is_none() {
            bail!(
                "`cargo {subcommand}` is missing and there is no rustup to add {component} with."
            );
        }
        println!("installing: {component}");
        run(Command::new("rustup").args(["component", "add", component]))?;
    }
    Ok(())
}

/// bpf-linker has to be built against the same LLVM major as the rustc that
/// emits the kernel crate's bitcode, or it cannot read it.
fn ensure_bpf_linker(major: u32) -> Result<()> {
    let stamp = cargo_home().join("bpf-linker.llvm-major");
    let stamped = fs::read_to_string(&stamp)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let version = output(Command::new("bpf-linker").arg("--version"));
    let right_version =
        version.as_deref().map(str::trim) == Some(&*format!("bpf-linker {BPF_LINKER_VERSION}"));
    // Without our stamp (installed by hand), cargo's own record of the
    // features it was built with names the LLVM major just as well.
    if right_version && stamped.or_else(installed_llvm_feature) == Some(major) {
        if stamped.is_none() {
            fs::write(&stamp, format!("{major}\n"))
                .with_context(|| format!("cannot write {}", stamp.display()))?;
        }
        println!("ok: bpf-linker {BPF_LINKER_VERSION} (LLVM {major})");
        return Ok(());
    }
    println!("installing: bpf-linker {BPF_LINKER_VERSION} for LLVM {major} (builds for minutes)");
    run(cargo()
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        // --force: the same version built for another LLVM must be replaced.
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        // Without it llvm-sys finds an older llvm-config and fails to link.
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{major}")))?;
    fs::write(&stamp, format!("{major}\n"))
        .with_context(|| format!("cannot write {}", stamp.display()))
}

/// The `llvm-N` feature of the bpf-linker in cargo's install record.
fn installed_llvm_feature() -> Option<u32> {
    let text = fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let record: serde_json::Value = serde_json::from_str(&text).ok()?;
    let prefix = format!("bpf-linker {BPF_LINKER_VERSION} ");
    let (_, install) = record["installs"]
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with(&prefix))?;
    install["features"]
        .as_array()?
        .iter()
        .find_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
}
