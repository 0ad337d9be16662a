//! Builds the kernel crate (agent-ebpf) for bpfel-unknown-none with Debian's
//! rustc, which ships a prebuilt `core` for that target, and bpf-linker. The
//! host crate then embeds the object with `include_bytes!`.
//!
//! The compiler is named explicitly: rustup's stable has no BPF `core`, and
//! aya-build would pick `rustup run nightly`, which these machines do not have.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const KERNEL_RUSTC: &str = "/usr/bin/rustc";
const KERNEL_CARGO: &str = "/usr/bin/cargo";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf();
    for watched in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=POOLSCOPE_EBPF_OBJECT");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let dest = out_dir.join("agent-ebpf.o");

    // An already-built object may be handed in (packaging, cross builds).
    if let Some(prebuilt) = env::var_os("POOLSCOPE_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &dest).expect("copy POOLSCOPE_EBPF_OBJECT");
        return;
    }
    for tool in [KERNEL_RUSTC, KERNEL_CARGO] {
        if !Path::new(tool).exists() {
            panic!("{tool} is missing: run `cargo xtask setup` to install the kernel toolchain");
        }
    }

    let target_dir = root.join("target").join("ebpf");
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let mut cmd = Command::new(KERNEL_CARGO);
    cmd.current_dir(&root)
        .args(["build", "-p", "agent-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTC", KERNEL_RUSTC)
        // aya-ebpf 0.2.1 uses asm_experimental_arch; allow it for that crate only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", flags);
    // Cargo sets these for build scripts; they would leak into the nested build.
    for (key, _) in env::vars_os() {
        if let Some(key) = key.to_str() {
            if key.starts_with("CARGO_FEATURE_")
                || key.starts_with("CARGO_CFG_")
                || key == "TARGET"
                || key == "HOST"
                || key == "OUT_DIR"
                || key == "PROFILE"
                || key == "OPT_LEVEL"
                || key == "DEBUG"
            {
                cmd.env_remove(key);
            }
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {KERNEL_CARGO}: {e}"));
    if !status.success() {
        panic!("building agent-ebpf failed ({status}); run `cargo xtask setup` if bpf-linker is missing");
    }
    let built = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("agent-ebpf");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), dest.display()));
}
