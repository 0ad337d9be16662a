//! The soak's adapter senders: `cargo xtask soak-sender` (hidden), run by
//! the soak as separate processes, some as an unprivileged user, because
//! the agent names senders by the pid the kernel gives it and forgets a
//! sender's pools when that process exits.

use std::{
    fs,
    io::ErrorKind,
    os::unix::net::UnixDatagram,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Mode {
    /// Many pool names (more than the per-process cap), each with
    /// acquire/release cycles naming connections that do not exist.
    Pools,
    /// acquire_start floods dated far back (or at boot, or in the future),
    /// half of them ended by a timeout: slow-acquire reports.
    Old,
    /// Datagrams the agent must refuse: not JSON, too large, unknown
    /// version or kind, missing fields, a spoofed pid, deep nesting.
    Malformed,
    /// One well-behaved pool (`--pool`), whose series must be exported
    /// whatever the floods do.
    Legit,
}

#[derive(clap::Args, Debug)]
pub struct SenderArgs {
    /// The agent's adapter socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    mode: Mode,
    /// How long to send before exiting.
    #[arg(long)]
    seconds: f64,
    /// Datagrams per second.
    #[arg(long)]
    rate: u32,
    /// Distinguishes this sender's pool names from other senders'.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The legitimate sender's pool name.
    #[arg(long, default_value = LEGIT_POOL)]
    pool: String,
}

/// Name of the legitimate pool that the soak checks for at the end.
pub const LEGIT_POOL: &str = "soak-legit";
/// How far back the `old` flood dates its acquires.
const OLD_NS: u64 = 500_000_000_000;
/// Sends happen in bursts this far apart.
const TICK: Duration = Duration::from_millis(10);

pub fn run(args: SenderArgs) -> Result<()> {
    let socket = UnixDatagram::unbound().context("cannot create a datagram socket")?;
    // Never wait on the agent: a full queue (EAGAIN) is counted and skipped,
    // as a real adapter would drop the message.
    socket.set_nonblocking(true)?;
    let clock = Clock::new()?;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.seconds.max(0.0));
    let per_tick = f64::from(args.rate) * TICK.as_secs_f64();
    let (mut sent, mut full, mut failed, mut i, mut budget) = (0u64, 0u64, 0u64, 0u64, 0.0);
    let mut last_error = None;
    while started.elapsed() < limit {
        budget += per_tick;
        while budget >= 1.0 {
            budget -= 1.0;
            let message = message(args.mode, args.seed, &args.pool, i, clock.now_ns());
            i += 1;
            match socket.send_to(&message, &args.socket) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => full += 1,
                Err(e) => {
                    failed += 1;
                    last_error = Some(e);
                }
            }
        }
        thread::sleep(TICK);
    }
    let summary = format!(
        "sender {:?} seed {}: sent {sent}, queue full {full}, failed {failed}",
        args.mode, args.seed
    );
    // A non-zero exit is how the soak learns that a flood never reached
    // the agent (no socket, no permission): its checks would pass vacuously.
    if !delivered_enough(sent, failed) {
        let why = last_error.map_or_else(String::new, |e| format!(" (last error: {e})"));
        bail!("{summary}{why}");
    }
    eprintln!("{summary}");
    Ok(())
}

/// Something was sent, and no more sends failed than succeeded. A full
/// queue (the agent not keeping up) is the agent's to handle, not the
/// sender's failure, so it is left out.
fn delivered_enough(sent: u64, failed: u64) -> bool {
    sent > 0 && failed <= sent
}

/// CLOCK_MONOTONIC in ns, as adapters send it. Without a libc binding it is
/// taken from /proc/uptime (CLOCK_BOOTTIME, the same clock unless the
/// machine was suspended) once, and advanced by `Instant`.
struct Clock {
    base_ns: u64,
    at: Instant,
}

impl Clock {
    fn new() -> Result<Clock> {
        let uptime = fs::read_to_string("/proc/uptime").context("cannot read /proc/uptime")?;
        let secs: f64 = uptime
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .context("/proc/uptime does not start with a number")?;
        Ok(Clock {
            base_ns: (secs * 1e9) as u64,
            at: Instant::now(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base_ns + self.at.elapsed().as_nanos() as u64
    }
}

/// The `i`th datagram of a sender.
fn message(mode: Mode, seed: u64, legit_pool: &str, i: u64, now: u64) -> Vec<u8> {
    match mode {
        Mode::Pools => pools_message(seed, i, now),
        Mode::Old => old_message(seed, i, now),
        Mode::Malformed => malformed_message(i),
        Mode::Legit => legit_message(legit_pool, i, now),
    }
    .into_bytes()
    .into_iter()
    .chain(malformed_bytes(mode, i))
    .collect()
}

/// Pool `k % 200` of this sender: registration, then one acquire, hand-out
/// and release of a connection the kernel never showed the agent.
fn pools_message(seed: u64, i: u64, now: u64) -> String {
    let k = i / 4;
    let pool = format!("flood-{seed}-{:03}", k % 200);
    let addr = format!("127.0.0.1:{}", 20_000 + k % 30_000);
    match i % 4 {
        0 => format!(
            r#"{{"v":1,"kind":"pool","pool":"{pool}","db_system":"postgresql","server_address":"127.0.0.1","server_port":5432,"max":10}}"#
        ),
        1 => format!(
            r#"{{"v":1,"kind":"acquire_start","pool":"{pool}","request":{k},"mono_ns":{now}}}"#
        ),
        2 => format!(
            r#"{{"v":1,"kind":"acquire_end","pool":"{pool}","request":{k},"result":"ok","local_address":"{addr}","fd":{},"mono_ns":{now}}}"#,
            1000 + k % 100
        ),
        _ => format!(
            r#"{{"v":1,"kind":"release","pool":"{pool}","local_address":"{addr}","mono_ns":{now}}}"#
        ),
    }
}

/// acquire_start dated 500 s back (every third at boot, every fifth in the
/// future), every other one followed by its timeout: the agent must clamp
/// these to the sender's start and rate-limit the reports.
fn old_message(seed: u64, i: u64, now: u64) -> String {
    let pool = format!("old-{seed}-{}", (i / 1000) % 8);
    if i.is_multiple_of(1000) {
        return format!(r#"{{"v":1,"kind":"pool","pool":"{pool}","db_system":"postgresql"}}"#);
    }
    if i.is_multiple_of(2) {
        let request = i - 1;
        return format!(
            r#"{{"v":1,"kind":"acquire_end","pool":"{pool}","request":{request},"result":"timeout","mono_ns":{now}}}"#
        );
    }
    let mono_ns = if i.is_multiple_of(3) {
        1
    } else if i.is_multiple_of(5) {
        now + OLD_NS
    } else {
        now.saturating_sub(OLD_NS)
    };
    format!(
        r#"{{"v":1,"kind":"acquire_start","pool":"{pool}","request":{i},"tid":{},"mono_ns":{mono_ns}}}"#,
        i % 7
    )
}

fn malformed_message(i: u64) -> String {
    match i % 12 {
        0 => "not json at all".to_string(),
        1 => format!(
            r#"{{"v":1,"kind":"pool","pool":"big","x":"{}"}}"#,
            "x".repeat(5000)
        ),
        2 => r#"{"v":2,"kind":"pool","pool":"future"}"#.to_string(),
        3 => r#"{"v":1,"kind":"explode","pool":"x"}"#.to_string(),
        4 => r#"{"v":1,"kind":"acquire_start"}"#.to_string(),
        5 => r#"{"v":1,"kind":"pool","pool":"spoofed","pid":1}"#.to_string(),
        6 => String::new(),
        7 => format!(r#"{{"v":1,"kind":"pool","pool":"{}"}}"#, "p".repeat(200)),
        8 => r#"{"v":1,"kind":"acquire_end","pool":"x","request":"NaN","result":"maybe"}"#
            .to_string(),
        9 => r#"{"v":1,"kind":"pool","pool":"trunc"#.to_string(),
        10 => format!("{}{}", "[".repeat(2000), "]".repeat(2000)),
        // Invalid UTF-8 is appended by `malformed_bytes`.
        _ => "{\"v\":1,\"kind\":\"pool\",\"pool\":\"".to_string(),
    }
}

/// Bytes that no `String` can hold, for the malformed flood's last case.
fn malformed_bytes(mode: Mode, i: u64) -> Vec<u8> {
    if mode == Mode::Malformed && i % 12 == 11 {
        vec![0xff, 0xfe, b'"', b'}']
    } else {
        Vec::new()
    }
}

/// The legitimate pool: registered again every 101 messages (as adapters
/// re-send state), and between, 50 short waits that end in an error.
fn legit_message(pool: &str, i: u64, now: u64) -> String {
    let p = i % 101;
    if p == 0 {
        return format!(
            r#"{{"v":1,"kind":"pool","pool":"{pool}","db_system":"postgresql","server_address":"127.0.0.1","server_port":5432,"max":5,"library":"soak"}}"#
        );
    }
    let request = i / 101 * 50 + p.div_ceil(2);
    if p % 2 == 1 {
        format!(
            r#"{{"v":1,"kind":"acquire_start","pool":"{pool}","request":{request},"mono_ns":{now}}}"#
        )
    } else {
        format!(
            r#"{{"v":1,"kind":"acquire_end","pool":"{pool}","request":{request},"result":"error","mono_ns":{now}}}"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_modes_send_json() {
        for mode in [Mode::Pools, Mode::Old, Mode::Legit] {
            for i in 0..2000 {
                let m = message(mode, 7, LEGIT_POOL, i, 10_000_000_000);
                let v: serde_json::Value = serde_json::from_slice(&m).expect("JSON");
                assert_eq!(v["v"], 1, "{mode:?} {i}");
                assert!(m.len() <= 4096);
            }
        }
        // Every legitimate wait ends.
        let mut open = std::collections::BTreeSet::new();
        for i in 0..1010 {
            let v: serde_json::Value =
                serde_json::from_slice(&message(Mode::Legit, 0, LEGIT_POOL, i, 1)).expect("JSON");
            match v["kind"].as_str() {
                Some("acquire_start") => assert!(open.insert(v["request"].as_u64())),
                Some("acquire_end") => assert!(open.remove(&v["request"].as_u64())),
                _ => {}
            }
        }
        assert!(open.is_empty(), "{open:?}");
    }

    #[test]
    fn a_sender_that_delivered_nothing_or_mostly_failed_fails() {
        assert!(delivered_enough(10, 0));
        assert!(delivered_enough(10, 10));
        assert!(!delivered_enough(0, 0));
        assert!(!delivered_enough(10, 11));
    }

    #[test]
    fn malformed_messages_are_not_valid_messages() {
        let mut oversized = 0;
        for i in 0..12 {
            let m = message(Mode::Malformed, 0, LEGIT_POOL, i, 1);
            oversized += usize::from(m.len() > 4096);
        }
        assert_eq!(oversized, 1);
        assert!(std::str::from_utf8(&message(Mode::Malformed, 0, LEGIT_POOL, 11, 1)).is_err());
    }
}
