//! The pool-adapter side: applications' pool libraries report checkouts,
//! returns and waits over a Unix datagram socket, or a stream socket beside
//! it (docs/adapter-protocol.md).

pub mod config;
pub mod message;
pub mod server;
pub mod stream;
