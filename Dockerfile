# poolscope agent image.
#
# NOT BUILT OR RUN BY THIS PROJECT'S CI: its machines have no container
# engine (a docker client, no daemon) and reach only the package registries,
# not Docker Hub or rustup's server. tests/tests/deploy.rs checks what can be
# checked without building: that every COPY source exists and that the build
# runs the same commands as the README (`cargo xtask setup`, then the
# `cargo build --release -p poolscope` that `cargo xtask run` does).
#
#   docker build -t poolscope:0.1.0 .
#   docker run --rm --pid=host --cap-drop=ALL \
#     --cap-add=BPF --cap-add=PERFMON --cap-add=SYS_ADMIN \
#     --cap-add=SYS_PTRACE --cap-add=DAC_READ_SEARCH \
#     -v /sys/kernel/tracing:/sys/kernel/tracing:ro -v /run/poolscope:/run/poolscope \
#     -p 127.0.0.1:9464:9464 poolscope:0.1.0 --listen 0.0.0.0:9464
#
# deploy/kubernetes/ runs it as a DaemonSet; deploy/README.md says why each
# privilege is there.

# --- build: the README's "fresh Debian machine with Rust (rustup)" ---------
FROM debian:bookworm AS build

# The userspace toolchain the project builds with (rustup's stable 1.95); the
# kernel crate's compiler is Debian's rustc-web, which `cargo xtask setup`
# installs with apt, next to LLVM and a matching bpf-linker.
ARG RUST_TOOLCHAIN=1.95.0
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    DEBIAN_FRONTEND=noninteractive

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates curl pkg-config \
    && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
       | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$RUST_TOOLCHAIN" \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# .dockerignore leaves out target/, node_modules and .git; .cargo/config.toml
# (the `cargo xtask` alias) comes along.
COPY . .

# Installs Debian's rustc-web, LLVM and bpf-linker (built from crates.io, a
# few minutes), and the test servers, which this stage does not use: setup
# has no build-only mode.
RUN cargo xtask setup --build-only
# agent/build.rs builds the kernel programs with Debian's rustc and
# bpf-linker and embeds the object in the binary.
RUN cargo build --release -p poolscope \
    && install -D -m 0755 target/release/poolscope /out/poolscope

# --- runtime: the binary (it links only libc, libm and libgcc_s) and CA certificates
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="poolscope" \
      org.opencontainers.image.description="Host agent that sees database connection pools, leaks and queries from the kernel (eBPF)" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/poolscope /usr/local/bin/poolscope
# The CA bundle, for OTLP to https endpoints (hosted backends) without
# OTEL_EXPORTER_OTLP_CERTIFICATE: the slim image has none.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt

# Root in the container, but with only the capabilities the runtime grants
# (the DaemonSet drops all and adds five). Nothing in the image is setuid.
USER 0:0
EXPOSE 9464
# Flags after the image name go to `poolscope run` (e.g. --config FILE,
# --listen ADDR). SIGTERM stops it cleanly, flushing OTLP exports.
ENTRYPOINT ["/usr/local/bin/poolscope", "run"]
