use std::hint::black_box;

use super::*;

#[test]
fn the_switch_and_the_delay_come_from_the_environment() {
    let on = |v: Option<&str>| stacks_on_from(v.map(Into::into));
    assert!(on(None));
    for off in ["off", "OFF", "0", "false", "no", " off "] {
        assert!(!on(Some(off)), "{off}");
    }
    for value in ["on", "1", "true", "full", ""] {
        assert!(on(Some(value)), "{value}");
    }
    let after = |v: Option<&str>| stack_after_from(v.map(Into::into));
    assert_eq!(after(None), DEFAULT_STACK_AFTER);
    assert_eq!(after(Some("250")), Duration::from_millis(250));
    assert_eq!(after(Some("0")), Duration::ZERO);
    assert_eq!(after(Some("soon")), DEFAULT_STACK_AFTER);
}

#[test]
fn the_stack_interval_comes_from_the_environment_in_microseconds() {
    let interval = |v: Option<&str>| stack_interval_from(v.map(Into::into));
    assert_eq!(DEFAULT_STACK_INTERVAL, Duration::from_millis(1));
    assert_eq!(interval(None), DEFAULT_STACK_INTERVAL);
    assert_eq!(interval(Some("250")), Duration::from_micros(250));
    assert_eq!(interval(Some(" 20000 ")), Duration::from_millis(20));
    assert_eq!(interval(Some("0")), Duration::ZERO);
    for invalid in ["", "soon", "-5", "1.5", "1ms"] {
        assert_eq!(interval(Some(invalid)), DEFAULT_STACK_INTERVAL, "{invalid}");
    }
}

#[test]
fn a_capture_is_due_an_interval_after_the_last() {
    const MS: u64 = 1_000_000;
    let last = AtomicU64::new(0);
    let t0 = 5_000 * MS;
    // The first ever captures; then nothing until 10 ms later.
    assert!(capture_due(&last, t0, 10 * MS));
    assert_eq!(last.load(Ordering::Relaxed), t0);
    let within = (1..100).filter(|i| capture_due(&last, t0 + i * MS / 10, 10 * MS));
    assert_eq!(within.count(), 0);
    assert_eq!(last.load(Ordering::Relaxed), t0);
    assert!(capture_due(&last, t0 + 10 * MS, 10 * MS));
    assert!(!capture_due(&last, t0 + 11 * MS, 10 * MS));
    // A time read before another thread's capture: not due.
    assert!(!capture_due(&last, t0, 10 * MS));
    // No interval: every one, and the last kept for the others.
    for i in 0..100 {
        assert!(capture_due(&last, t0 + 11 * MS + i, 0));
    }
    assert_eq!(last.load(Ordering::Relaxed), t0 + 11 * MS + 99);
}

#[test]
fn library_frames_are_told_from_the_applications() {
    for name in [
        "poolscope_adapter::PoolReporter::finish",
        "<poolscope_adapter::bb8_pg::InstrumentedPool>::get::{{closure}}",
        "bb8::api::Pool<M>::get::{{closure}}",
        "<core::pin::Pin<P> as core::future::future::Future>::poll",
        "<F as core::future::future::Future>::poll",
        "<&mut F as core::future::future::Future>::poll",
        "tokio::runtime::task::raw::poll",
        "std::thread::local::LocalKey<T>::with",
        "sqlx_core::pool::inner::PoolInner<DB>::acquire::{{closure}}",
        "backtrace::backtrace::libunwind::trace",
    ] {
        assert!(is_library(name), "{name}");
    }
    for name in [
        "poolscope_adapter_testapp::scenario::App<P>::checkout::{{closure}}",
        "<bb8_scenario::Bb8 as bb8_scenario::scenario::ScenarioPool>::get::{{closure}}",
        "myapp::reports::leaky",
        "<myapp::Job as core::future::future::Future>::poll",
        "main",
    ] {
        assert!(!is_library(name), "{name}");
    }
    assert!(is_ours("<poolscope_adapter::stack::Capture>::here"));
    assert!(!is_ours("tokio::runtime::task::raw::poll"));
}

#[test]
fn frames_are_cut_and_cleaned() {
    assert_eq!(clean("f (a.rs:1)\nforged\tline"), "f (a.rs:1)?forged?line");
    let long = "é".repeat(300);
    assert_eq!(clean(&long).chars().count(), MAX_FRAME_CHARS);
}

#[inline(never)]
fn a_distinctively_named_caller() -> Box<Capture> {
    black_box(Capture::here(Some(Location::caller())))
}

#[inline(never)]
fn its_caller() -> Box<Capture> {
    black_box(a_distinctively_named_caller())
}

#[test]
fn a_capture_names_the_functions_that_took_the_connection_innermost_first() {
    let capture = its_caller();
    let frames = capture.frames();
    assert!(!frames.is_empty() && frames.len() <= MAX_STACK_FRAMES);
    // First the place of the call, then the application's functions: none
    // of the adapter's (the capture itself) or of the unwinder's before them.
    assert!(
        frames[0].starts_with("adapters/rust/src/stack/tests.rs:"),
        "{frames:#?}"
    );
    assert!(
        frames[1].starts_with("poolscope_adapter::stack::tests::a_distinctively_named_caller"),
        "{frames:#?}"
    );
    assert!(
        frames[2].starts_with("poolscope_adapter::stack::tests::its_caller"),
        "{frames:#?}"
    );
    assert!(frames.iter().all(|f| !f.is_empty()
        && f.chars().count() <= MAX_FRAME_CHARS
        && !f.chars().any(char::is_control)));
}

#[test]
fn addresses_that_name_nothing_are_kept_as_addresses() {
    let frames = Capture::of(&[0x10, 0x20], None).frames();
    assert_eq!(frames, ["0x10", "0x20"]);
}

#[inline(never)]
fn recurse(depth: usize, f: &mut dyn FnMut()) {
    if depth == 0 {
        f();
    } else {
        recurse(black_box(depth - 1), f);
    }
    black_box(depth);
}

/// What a capture costs: `cargo test --release -p poolscope-adapter
/// --all-features -- --ignored --nocapture capture_cost`.
#[test]
#[ignore = "a measurement, not a test"]
fn capture_cost() {
    const N: u32 = 100_000;
    for depth in [0, 10, 30] {
        recurse(depth, &mut || {
            for _ in 0..1000 {
                black_box(Capture::here(None));
            }
            let start = std::time::Instant::now();
            for _ in 0..N {
                black_box(Capture::here(None));
            }
            let per = start.elapsed() / N;
            let frames = Capture::here(None).len;
            eprintln!("capture at depth +{depth}: {frames} frames walked, {per:?} each");
        });
    }
    let capture = its_caller();
    let start = std::time::Instant::now();
    let frames = capture.frames();
    eprintln!("first naming: {:?}: {frames:#?}", start.elapsed());
    let start = std::time::Instant::now();
    let frames = capture.frames();
    eprintln!(
        "second naming: {:?} ({} frames)",
        start.elapsed(),
        frames.len()
    );
}
