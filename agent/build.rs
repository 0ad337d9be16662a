//! Builds the kernel crate (agent-ebpf) with the recipe in
//! `xtask/kernel-build` (a rustc that ships BPF `core`, and bpf-linker); the
//! host crate then embeds the object with `include_bytes!`.

use std::{env, path::PathBuf};

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
    println!("cargo:rerun-if-env-changed={}", kernel_build::RUSTC_ENV);
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let dest = out_dir.join("agent-ebpf.o");

    // An already-built object may be handed in (packaging, cross builds).
    if let Some(prebuilt) = env::var_os("POOLSCOPE_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &dest).expect("copy POOLSCOPE_EBPF_OBJECT");
        return;
    }
    let toolchain = kernel_build::Toolchain::find().unwrap_or_else(|e| panic!("{e}"));
    // The programs read the saved registers of the architecture the agent
    // runs on.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("set by cargo");
    let status = toolchain
        .command(&toolchain.cargo, "build", &root, &arch)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", toolchain.cargo.display()));
    if !status.success() {
        panic!("building agent-ebpf failed ({status}); run `cargo xtask setup` if bpf-linker is missing");
    }
    let built = kernel_build::object(&root);
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), dest.display()));
}
