//! Developer commands behind `cargo xtask`: the ones the README shows.

mod bench;
mod setup;
mod soak;

use std::{
    env,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "poolscope's developer commands"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and test dependencies (idempotent; apt needs root).
    Setup {
        /// Only what building the agent needs (for images and packaging).
        #[arg(long)]
        build_only: bool,
    },
    /// Build the agent in release mode and run it: `cargo xtask run -- ARGS`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write the generated tables of docs/metrics.md from the telemetry
    /// catalogue; `--check` fails instead when the document is stale.
    Docs {
        #[arg(long)]
        check: bool,
    },
    /// Format check, lints, build and the whole test suite; args go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// What the agent costs PostgreSQL, MariaDB, Redis and unrelated I/O:
    /// interleaved runs without/with it, CPU per operation from cgroups
    /// (root; about 13 minutes with the defaults). `--only adapters`: what
    /// the pool adapters cost per acquire+release (not in the default set).
    Bench(bench::BenchArgs),
    /// The release agent for N minutes under connection churn, adapter
    /// floods and collector outages: are its RSS and fds flat? (root; not
    /// part of `test`)
    Soak(soak::SoakArgs),
    /// One of the soak's adapter senders (the soak runs it).
    #[command(hide = true)]
    SoakSender(soak::sender::SenderArgs),
}

fn main() -> ExitCode {
    // One readable line; returning the error from main would print a
    // backtrace whenever RUST_BACKTRACE is set.
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    // bpf-linker (and anything else `cargo install`ed) lives here; CI and
    // `sudo` shells often leave it off PATH.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![cargo_home().join("bin")];
    dirs.extend(env::split_paths(&path));
    env::set_var("PATH", env::join_paths(dirs)?);

    match Cli::parse().cmd {
        Cmd::Setup { build_only } => {
            setup::setup(!build_only)?;
            if build_only {
                return Ok(());
            }
            match setup::start_node_sqlite_example()? {
                Some(build) => build.finish(),
                None => Ok(()),
            }
        }
        Cmd::Run { args } => run_agent(&args),
        Cmd::Docs { check } => docs(check),
        Cmd::Test { args } => test(&args),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::Soak(args) => soak::soak(args),
        Cmd::SoakSender(args) => soak::sender::run(args),
    }
}

fn run_agent(args: &[String]) -> Result<()> {
    setup::setup(false)?;
    run(cargo().args(["build", "--release", "-p", "poolscope"]))?;
    let bin = target_dir().join("release").join("poolscope");
    // Loading BPF needs root; without sudo the agent explains that itself.
    let mut cmd = match which("sudo") {
        Some(sudo) if !is_root() => {
            let mut cmd = Command::new(sudo);
            cmd.arg(&bin);
            cmd
        }
        _ => Command::new(&bin),
    };
    cmd.arg("run").args(args);
    // exec: the agent gets signals directly and its exit code is ours.
    Err(cmd.exec()).with_context(|| format!("cannot start {}", bin.display()))
}

/// Every host crate of the workspace, in release: what the tests run.
const WORKSPACE_RELEASE: [&str; 4] = ["--release", "--workspace", "--exclude", "agent-ebpf"];

fn test(args: &[String]) -> Result<()> {
    step("setup", || setup::setup(true))?;
    let sqlite_example = setup::start_node_sqlite_example()?;
    step("cargo fmt --all --check", || {
        run(cargo().args(["fmt", "--all", "--check"]))
    })?;
    step("docs/metrics.md matches the telemetry catalogue", || {
        docs(true)
    })?;
    step("clippy (host crates)", || {
        run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
    })?;
    step("clippy (kernel crate)", clippy_kernel)?;
    // The agent and the test apps are built with the features of the
    // whole workspace, as `cargo test --workspace` resolves them: built
    // alone (`-p poolscope`, `-p poolscope-adapter-testapp`) they would
    // differ in a few features (tokio's, tonic's, hyper-util's), and every
    // crate above those would be compiled twice.
    step("build release agent and test apps", || {
        run(cargo().arg("build").args(WORKSPACE_RELEASE))
    })?;
    if let Some(build) = sqlite_example {
        step("node sqlite example built", || build.finish())?;
    }
    if !is_root() {
        println!("note: not root, so tests that load BPF programs skip themselves");
    }
    step("cargo test", || {
        let release = target_dir().join("release");
        run(cargo()
            .arg("test")
            .args(WORKSPACE_RELEASE)
            .args(args)
            .env("POOLSCOPE_BIN", release.join("poolscope"))
            .env(
                "POOLSCOPE_ADAPTER_TESTAPP",
                release.join("poolscope-adapter-testapp"),
            ))
    })?;
    println!("all steps passed");
    Ok(())
}

fn docs(check: bool) -> Result<()> {
    let path = root().join("docs").join("metrics.md");
    let current = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let updated = telemetry_catalogue::update_document(&current)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if updated == current {
        println!("{} is up to date", path.display());
        return Ok(());
    }
    if check {
        bail!(
            "{} is stale: its tables differ from agent/telemetry-catalogue; run `cargo xtask docs`",
            path.display()
        );
    }
    std::fs::write(&path, updated).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn clippy_kernel() -> Result<()> {
    // The kernel crate is linted with the toolchain that builds it
    // (xtask/kernel-build); its cargo-clippy is called directly, since
    // `cargo clippy` would find rustup's first ($CARGO_HOME/bin comes
    // before PATH), whose driver has no BPF `core`.
    let toolchain = kernel_build::Toolchain::find().map_err(anyhow::Error::msg)?;
    let Some(clippy) = toolchain.cargo_clippy() else {
        println!("skipped: no clippy for the kernel toolchain (apt-get install rust-web-clippy)");
        return Ok(());
    };
    let mut cmd = toolchain.command(&clippy, "clippy", &root(), env::consts::ARCH);
    run(cmd.args(["--", "-D", "warnings"]))
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {name}");
    f().with_context(|| format!("step failed: {name}"))
}

/// The workspace's cargo (the one running us), at the workspace root.
fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} exited with {status}", describe(cmd));
    }
    Ok(())
}

/// Stdout of a command that succeeded, or None.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "`cargo fmt --all --check`": the program's file name keeps it short.
fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut words = vec![program.file_name().unwrap_or(program.as_os_str())];
    words.extend(cmd.get_args());
    let words: Vec<_> = words.iter().map(|w| w.to_string_lossy()).collect();
    format!("`{}`", words.join(" "))
}

fn root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Effective uid 0, read from /proc so that no libc binding is needed.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}
