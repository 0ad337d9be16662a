//! How the kernel crate (`agent-ebpf`) is built: one recipe for
//! `agent/build.rs`, which builds it, and `xtask`, which lints it and
//! installs what it needs.
//!
//! The kernel crate needs a rustc that ships `core` for the BPF target
//! (Debian's `rustc-web` does; rustup's stable does not, and aya-build would
//! reach for a nightly that these machines do not have) and bpf-linker on
//! PATH. The toolchain is found, not assumed: `$POOLSCOPE_KERNEL_RUSTC`,
//! else the first `rustc` on PATH or in `/usr/bin` whose sysroot has the
//! target.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The kernel crate's package name.
pub const PACKAGE: &str = "agent-ebpf";
/// The target the kernel programs are compiled for.
pub const TARGET: &str = "bpfel-unknown-none";
/// Names a rustc to use instead of searching for one.
pub const RUSTC_ENV: &str = "POOLSCOPE_KERNEL_RUSTC";
/// Where to look after PATH: Debian installs its toolchain here.
const FALLBACK_DIR: &str = "/usr/bin";

/// A rustc that can build for [`TARGET`], and the cargo beside it.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub rustc: PathBuf,
    pub cargo: PathBuf,
}

impl Toolchain {
    /// Finds the kernel toolchain; the error says where it looked and what
    /// installs one.
    pub fn find() -> Result<Toolchain, String> {
        if let Some(rustc) = env::var_os(RUSTC_ENV) {
            let rustc = PathBuf::from(rustc);
            return if has_target(&rustc) {
                Ok(Toolchain::beside(rustc))
            } else {
                Err(format!(
                    "${RUSTC_ENV} = {} has no `core` for {TARGET}",
                    rustc.display()
                ))
            };
        }
        let path = env::var_os("PATH").unwrap_or_default();
        let dirs = env::split_paths(&path).chain([PathBuf::from(FALLBACK_DIR)]);
        let mut tried = Vec::new();
        for dir in dirs {
            let rustc = dir.join("rustc");
            if !rustc.is_file() || tried.contains(&rustc) {
                continue;
            }
            if has_target(&rustc) {
                return Ok(Toolchain::beside(rustc));
            }
            tried.push(rustc);
        }
        let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        Err(format!(
            "no rustc with `core` for {TARGET} (tried: {}); run `cargo xtask setup`, \
             or name one in ${RUSTC_ENV}",
            if tried.is_empty() {
                "none found".to_string()
            } else {
                tried.join(", ")
            }
        ))
    }

    fn beside(rustc: PathBuf) -> Toolchain {
        let cargo = rustc.with_file_name("cargo");
        Toolchain { rustc, cargo }
    }

    /// The clippy for this toolchain, if installed.
    pub fn cargo_clippy(&self) -> Option<PathBuf> {
        Some(self.rustc.with_file_name("cargo-clippy")).filter(|p| p.is_file())
    }

    /// `program subcommand` acting on the kernel crate, for the host
    /// architecture `arch` (`CARGO_CFG_TARGET_ARCH` in a build script,
    /// `std::env::consts::ARCH` elsewhere). `program` is this toolchain's
    /// cargo or a cargo subcommand binary such as [`Self::cargo_clippy`].
    /// Arguments for the subcommand itself (after `--`) go on the returned
    /// command.
    pub fn command(
        &self,
        program: &Path,
        subcommand: &str,
        workspace: &Path,
        arch: &str,
    ) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg(subcommand).current_dir(workspace);
        // What the calling cargo (rustup's, or a build script's) set would
        // pull in its compiler, flags and target directory.
        for var in [
            "RUSTUP_TOOLCHAIN",
            "RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_BUILD_RUSTC",
            "CARGO_TARGET_DIR",
            "TARGET",
            "HOST",
            "OUT_DIR",
            "PROFILE",
            "OPT_LEVEL",
            "DEBUG",
        ] {
            cmd.env_remove(var);
        }
        for (key, _) in env::vars_os() {
            let inherited = key.to_str().is_some_and(|key| {
                key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_CFG_")
            });
            if inherited {
                cmd.env_remove(&key);
            }
        }
        let flags = [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".to_string(),
            "-Clink-arg=--btf".to_string(),
        ];
        cmd.env("RUSTC", &self.rustc)
            // cargo subcommands such as clippy run $CARGO.
            .env("CARGO", &self.cargo)
            // aya-ebpf 0.2.1 uses asm_experimental_arch; allowed for that
            // crate only.
            .env("RUSTC_BOOTSTRAP", "aya_ebpf")
            .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
            .args(["-p", PACKAGE, "--release", "--target", TARGET])
            .arg("--target-dir")
            .arg(target_dir(workspace));
        cmd
    }
}

/// Where the kernel crate is built, apart from the host crates (another
/// compiler, another target).
pub fn target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("ebpf")
}

/// The object a release build leaves.
pub fn object(workspace: &Path) -> PathBuf {
    target_dir(workspace)
        .join(TARGET)
        .join("release")
        .join(PACKAGE)
}

/// Whether `rustc`'s sysroot holds a prebuilt library for [`TARGET`].
fn has_target(rustc: &Path) -> bool {
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout);
    Path::new(sysroot.trim())
        .join("lib")
        .join("rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(cmd: &Command, key: &str) -> Option<Option<String>> {
        cmd.get_envs()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn the_command_names_the_toolchain_and_drops_the_callers_settings() {
        let toolchain = Toolchain::beside(PathBuf::from("/opt/rust/bin/rustc"));
        assert_eq!(toolchain.cargo, Path::new("/opt/rust/bin/cargo"));
        let cmd = toolchain.command(&toolchain.cargo, "build", Path::new("/ws"), "aarch64");
        assert_eq!(
            env_of(&cmd, "RUSTC"),
            Some(Some("/opt/rust/bin/rustc".into()))
        );
        assert_eq!(env_of(&cmd, "RUSTFLAGS"), Some(None), "removed");
        assert_eq!(env_of(&cmd, "CARGO_TARGET_DIR"), Some(None), "removed");
        let flags = env_of(&cmd, "CARGO_ENCODED_RUSTFLAGS")
            .flatten()
            .unwrap_or_default();
        assert!(flags.contains("bpf_target_arch=\"aarch64\""), "{flags}");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[..2], ["build".to_string(), "-p".to_string()]);
        assert!(args.contains(&TARGET.to_string()));
        assert!(args.contains(&"/ws/target/ebpf".to_string()), "{args:?}");
    }

    #[test]
    fn a_named_rustc_without_the_target_is_refused_with_its_name() {
        // `true` prints no sysroot, so it cannot have the target.
        assert!(!has_target(Path::new("/bin/true")));
        assert!(!has_target(Path::new("/nonexistent/rustc")));
    }
}
