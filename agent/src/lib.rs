//! poolscope: sees database connection pools from the kernel and from pool
//! adapters. The binary (`main.rs`) is a thin shell over this library so that
//! tests reuse the loader, the tracker and the API.

pub mod adapter;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod config_types;
pub mod detect;
pub mod ebpf;
pub mod health;
pub mod https;
pub mod identity;
pub mod kernel_records;
pub mod kubernetes;
pub mod lifecycle;
pub mod otel_env;
pub mod percentiles;
pub mod pipeline;
pub mod procfs;
pub mod protocol;
pub mod ratelimit;
pub mod redact;
pub mod reports;
pub mod state;
pub mod telemetry;
pub mod tls_libraries;
pub mod trends;
