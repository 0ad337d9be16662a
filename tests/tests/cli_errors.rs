//! What a person sees when the agent cannot start, and `poolscope check`.
//! Errors must be one sentence on stderr (for a bad configuration file, the
//! TOML parser's few lines that show the line at fault), never a panic or a
//! backtrace, even with RUST_BACKTRACE=1.
#![allow(clippy::unwrap_used)]

use std::{
    fs::{self, File},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use poolscope_tests::{agent_bin, free_port, is_root, require_kernel, wait_exit, TempDir};

/// How long a command that is expected to end (an error, `check`) may run.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the command to its end: its exit status, stdout and stderr. A
/// command still running after [`EXIT_TIMEOUT`] (say, an agent that accepted
/// a configuration it should have refused) is killed and fails the test.
fn run_agent(cmd: &mut Command) -> (ExitStatus, String, String) {
    let dir = TempDir::new("poolscope-cli-output");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .env("RUST_BACKTRACE", "1")
        .env_remove("POOLSCOPE_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, EXIT_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap()).into_owned();
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    let status = status.unwrap_or_else(|| {
        panic!(
            "{cmd:?} was still running after {EXIT_TIMEOUT:?} (killed)\n\
             --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
    });
    (status, stdout, stderr)
}

fn assert_no_panic(stderr: &str) {
    let lower = stderr.to_lowercase();
    for word in ["panicked", "backtrace", "stack backtrace", "rust_backtrace"] {
        assert!(
            !lower.contains(word),
            "stderr must not show {word:?}:\n{stderr}"
        );
    }
}

/// Runs `poolscope run --config FILE` with `text` in FILE, expecting it
/// to fail at once without a panic: FILE's path and the stderr.
fn refused_config(text: &str) -> (TempDir, String, String) {
    let dir = TempDir::new("poolscope-cli");
    let config = dir.path().join("poolscope.toml");
    fs::write(&config, text).unwrap();
    let (status, _, stderr) = run_agent(
        Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&config),
    );
    assert!(!status.success(), "{text:?} is an error: {stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr);
    (dir, config.display().to_string(), stderr)
}

/// Asserts that `text` is refused with a short error that names the file,
/// the key's path and line first, then shows that line and says `what` is
/// wrong on the last.
fn assert_config_refused(text: &str, key: &str, line: usize, what: &str) {
    let (_dir, config, stderr) = refused_config(text);
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    let first = lines.first().copied().unwrap_or_default();
    assert!(
        first.starts_with(&format!("poolscope: config {config}: ")),
        "names the file first:\n{stderr}"
    );
    assert!(
        first.contains(&format!("key `{key}`")),
        "names the key:\n{stderr}"
    );
    assert!(
        first.contains(&format!("line {line},")),
        "names the line:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("\n{line} | ")),
        "shows the line:\n{stderr}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains(what)),
        "says what is wrong:\n{stderr}"
    );
    assert!(lines.len() <= 6, "a few lines, one screen:\n{stderr}");
}

#[test]
fn unknown_config_key_names_key_and_line() {
    assert_config_refused(
        "[http]\nlisten = \"127.0.0.1:9464\"\nno_such_knob = true\n\n[log]\nlevel = \"info\"\n",
        "http.no_such_knob",
        3,
        "unknown field `no_such_knob`, expected one of `listen`,",
    );
    assert_config_refused(
        "[log]\nlevel = \"info\"\n\n[htp]\nlisten = \"127.0.0.1:9464\"\n",
        "htp",
        4,
        "unknown field `htp`, expected one of `http`, `kernel`,",
    );
}

#[test]
fn bad_config_values_name_key_and_line() {
    for (text, key, line, what) in [
        (
            "[kernel]\nmount_tracefs = \"yes\"\n",
            "kernel.mount_tracefs",
            2,
            "invalid type: string \"yes\", expected a boolean",
        ),
        (
            "[leaks]\n\nquiet_seconds = \"5 parsecs\"\n",
            "leaks.quiet_seconds",
            3,
            "\"5 parsecs\" is not a duration",
        ),
        (
            "[kernel]\nring_buffer_bytes = 100000\n",
            "kernel.ring_buffer_bytes",
            2,
            "100000 is not a power of two that is a multiple of 4096",
        ),
        (
            "[adapter]\nsocket_mode = \"0999\"\n",
            "adapter.socket_mode",
            2,
            "\"0999\" is not an octal mode",
        ),
        (
            "[http]\nlisten = \"localhost\"\n",
            "http.listen",
            2,
            "\"localhost\" is not an IP address with a port",
        ),
    ] {
        assert_config_refused(text, key, line, what);
    }
}

#[test]
fn malformed_config_file_names_the_line() {
    let (_dir, config, stderr) = refused_config("[http]\nlisten = \"127.0.0.1:9464\"\n[kernel\n");
    assert!(
        stderr.starts_with(&format!(
            "poolscope: config {config}: TOML parse error at line 3, column "
        )),
        "names the file and the line:\n{stderr}"
    );
    assert!(
        stderr.contains("\n3 | [kernel\n"),
        "shows the line:\n{stderr}"
    );
    assert!(stderr.trim_end().lines().count() <= 6, "{stderr}");
}

#[test]
fn missing_config_file_is_one_line() {
    let dir = TempDir::new("poolscope-cli");
    let missing = dir.path().join("absent.toml");
    let (status, _, stderr) = run_agent(
        Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&missing),
    );
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(missing.to_str().unwrap()),
        "names the file:\n{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert_no_panic(&stderr);
}

#[test]
fn run_without_privileges_says_so_in_one_line() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut bin = agent_bin();
    // nobody may not be able to reach the build tree (a clone under /root):
    // run a world-readable copy.
    let copy_dir = TempDir::new("poolscope-nobody");
    if is_root() {
        let copy = copy_dir.path().join("poolscope");
        fs::copy(&bin, &copy).unwrap();
        fs::set_permissions(copy_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        bin = copy;
    }
    let mut cmd = if is_root() {
        // Drop to nobody with no capabilities at all.
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin);
        cmd
    } else {
        Command::new(&bin)
    };
    cmd.args(["run", "--listen", &listen]).current_dir("/");
    let (status, _, stderr) = run_agent(&mut cmd);
    assert!(
        !stderr.contains("failed to execute"),
        "nobody cannot execute {}: {stderr}",
        bin.display()
    );
    assert!(
        !status.success(),
        "the agent cannot run unprivileged:\n{stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line on stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("root") || stderr.contains("CAP_BPF"),
        "the error says what is missing (root or CAP_BPF):\n{stderr}"
    );
    assert_no_panic(&stderr);
}

/// `check`'s lines: `MARK WHAT DETAIL`, MARK being `ok` or `MISS`.
fn check_line<'a>(stdout: &'a str, what: &str) -> (&'a str, &'a str) {
    stdout
        .lines()
        .find_map(|line| {
            let (mark, rest) = line.split_once(' ')?;
            let rest = rest.trim_start();
            rest.starts_with(what).then_some((mark, rest))
        })
        .unwrap_or_else(|| panic!("no {what:?} line in check's output:\n{stdout}"))
}

#[test]
fn check_reports_each_feature() {
    if !require_kernel() {
        return;
    }
    // A process that maps the system's libssl (Python's ssl module), so
    // that check has a TLS library to report.
    let mut mapper = Command::new("python3")
        .args(["-c", "import ssl, sys; sys.stdin.read()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let libssl = "/usr/lib/x86_64-linux-gnu/libssl.so.3";
    let mapped = poolscope_tests::wait_until(poolscope_tests::EVENT_TIMEOUT, || {
        std::fs::read_to_string(format!("/proc/{}/maps", mapper.id()))
            .ok()?
            .contains(libssl)
            .then_some(())
    });
    assert!(mapped.is_some(), "python3's ssl module maps {libssl}");
    let (status, stdout, stderr) = run_agent(Command::new(agent_bin()).arg("check"));
    drop(mapper.stdin.take());
    let _ = mapper.wait();
    assert!(
        status.success(),
        "check passes as root on this kernel:\n{stdout}\n{stderr}"
    );
    assert_no_panic(&stderr);

    for what in ["kernel", "capabilities", "tracefs"] {
        let (mark, rest) = check_line(&stdout, what);
        assert_eq!(mark, "ok", "{rest}\n{stdout}");
    }

    // kprobes: available exactly when tracefs has kprobe_events.
    let kprobes_present = Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists();
    let (mark, rest) = check_line(&stdout, "kprobes");
    if kprobes_present {
        assert_eq!(mark, "ok", "{rest}");
    } else {
        assert_eq!(mark, "MISS", "{rest}");
        assert!(rest.contains("unavailable"), "{rest}");
    }

    // fentry: a MISS line says it is unavailable and that tracepoints are used.
    let (mark, rest) = check_line(&stdout, "fentry");
    assert!(mark == "ok" || mark == "MISS", "{rest}");
    assert_eq!(mark == "MISS", rest.contains("unavailable"), "{rest}");
    if mark == "MISS" {
        assert!(rest.contains("tracepoints are in use"), "{rest}");
    }

    for tracepoint in [
        "syscalls:sys_enter_connect",
        "syscalls:sys_exit_connect",
        "sock:inet_sock_set_state",
        "syscalls:sys_enter_close",
        "sched:sched_process_exit",
    ] {
        let (mark, rest) = check_line(&stdout, &format!("tracepoint {tracepoint}"));
        assert_eq!(mark, "ok", "{rest}");
        assert!(rest.contains("in use"), "{rest}");
    }
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        let (mark, what) = (words.next(), words.next());
        if what.is_some_and(|w| w.starts_with("tracepoint")) {
            assert_eq!(mark, Some("ok"), "every tracepoint loads: {line}");
        }
    }

    // Issue 16: the TLS programs load, and Debian 12's OpenSSL 3.0 can be
    // hooked at its internal functions (emulated: every process).
    let (mark, rest) = check_line(&stdout, "TLS libraries (uprobes)");
    assert_eq!(mark, "ok", "{rest}");
    let (mark, rest) = check_line(&stdout, &format!("TLS library {libssl}"));
    assert_eq!(mark, "ok", "{rest}");
    assert!(
        rest.contains("can be hooked") && rest.contains("internal read/write functions"),
        "{rest}"
    );
}

#[test]
fn bad_token_settings_name_the_key() {
    let dir = TempDir::new("poolscope-token-config");
    let token_file = dir.path().join("token");
    fs::write(&token_file, "secret\n").unwrap();
    let empty_file = dir.path().join("empty");
    fs::write(&empty_file, "\n").unwrap();
    let missing = dir.path().join("missing");
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    for (config, key, why) in [
        (
            format!(
                "bearer_token = \"a\"\nbearer_token_file = {}\n",
                quoted(&token_file)
            ),
            "bearer_token",
            "not both",
        ),
        ("bearer_token = \"\"\n".to_owned(), "bearer_token", "empty"),
        (
            format!("bearer_token_file = {}\n", quoted(&empty_file)),
            "bearer_token_file",
            "empty",
        ),
        (
            format!("bearer_token_file = {}\n", quoted(&missing)),
            "bearer_token_file",
            "cannot read",
        ),
    ] {
        let path = dir.path().join("poolscope.toml");
        fs::write(&path, format!("[http]\n{config}")).unwrap();
        // Its own port: were the configuration accepted, the agent would
        // run (until run_agent kills it) without taking the default one.
        let listen = format!("127.0.0.1:{}", free_port());
        let (status, _, stderr) = run_agent(
            Command::new(agent_bin())
                .args(["run", "--listen", &listen, "--config"])
                .arg(&path),
        );
        assert!(!status.success(), "{config}: {stderr}");
        assert!(
            stderr.contains(&format!("key `http.{key}`")) && stderr.contains(why),
            "{config}: {stderr}"
        );
        assert_no_panic(&stderr);
    }
}

#[test]
fn bad_agent_address_is_a_usage_error() {
    for (agent, why) in [
        ("foo", "no port"),
        ("::1:9464", "[::1]:9464"),
        ("localhost:99999", "is not a port"),
        ("https://localhost:9464", "https is not supported"),
    ] {
        let (status, _, stderr) =
            run_agent(Command::new(agent_bin()).args(["pools", "--agent", agent]));
        assert_eq!(status.code(), Some(2), "a usage error: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{agent}' for '--agent <AGENT>'")),
            "names the value and the flag: {stderr}"
        );
        assert!(stderr.contains(why), "{agent}: {stderr}");
        if !agent.starts_with("https") {
            assert!(
                stderr.contains("expected host:port or http://host:port"),
                "says what is expected: {stderr}"
            );
        }
        assert_no_panic(&stderr);
    }
    // The same from the environment.
    let (status, _, stderr) = run_agent(
        Command::new(agent_bin())
            .arg("leaks")
            .env("POOLSCOPE_AGENT", "agent.example"),
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("expected host:port"), "{stderr}");
}
