//! The pool-adapter side: applications' pool libraries report checkouts,
//! returns and waits over a Unix datagram socket (docs/adapter-protocol.md).

pub mod config;
pub mod message;
pub mod server;
