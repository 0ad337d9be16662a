//! Fixtures for poolscope's integration tests: the real agent binary,
//! throwaway PostgreSQL, MariaDB and Redis servers, and scripted child
//! processes whose sockets (and database sessions) the tests drive. Each
//! fixture owns what it starts and stops it on drop, so a failing test leaves
//! no agent, server or temp dir behind.
//!
//! Events reach the agent asynchronously; tests poll with [`wait_until`] (or
//! [`Agent::wait_for`]) instead of sleeping.

use std::time::Duration;

pub use poolscope::api::{ConnectionView, ConnectionsResponse};
pub use poolscope::lifecycle::{CloseReason, ConnState, ConnectOutcome};
pub use poolscope::protocol::{DbSystem, SystemName, TxState};
pub use poolscope::reports::{SlowQueriesResponse, SlowQuery};
pub use serde_json::{json, Value};

pub mod otlp_receiver;
pub mod yaml;

/// The loopback address the fixtures' servers listen on.
pub const LOCALHOST_V4: &str = "127.0.0.1";

/// How long asynchronous kernel events get to show up in the API.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

mod adapters;
mod agent;
mod children;
mod databases;
mod env;
mod golden;
mod json_lines;
mod leak_watch;
mod prometheus;
mod scenario;

pub use adapters::*;
pub use agent::*;
pub use children::*;
pub use databases::*;
pub use env::*;
pub use golden::*;
pub use json_lines::*;
pub use leak_watch::*;
pub use prometheus::*;
pub use scenario::*;
