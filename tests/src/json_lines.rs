//! A child application driven with one JSON request per line on its stdin,
//! answering each with one JSON line on its stdout (`"ok": true`, or the
//! request failed): how the adapter tests drive their pool applications.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use crate::{wait_exit, Value};

/// Stdin closed on drop, then killed if it has not exited within 5 s (or
/// at once, see [`JsonLinesChild::kill_on_drop`]).
pub struct JsonLinesChild {
    pub pid: u32,
    grace: Duration,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl JsonLinesChild {
    /// Starts `cmd` with piped stdin and stdout (stderr inherited);
    /// `what` names it in a failure.
    pub fn spawn(cmd: &mut Command, what: &str) -> JsonLinesChild {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        JsonLinesChild {
            pid: child.id(),
            grace: Duration::from_secs(5),
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// Starts `cmd` and reads its first answer, which must say that it runs
    /// in the process started (`"pid"`); returns the child and that answer.
    pub fn start(cmd: &mut Command, what: &str) -> (JsonLinesChild, Value) {
        let mut app = JsonLinesChild::spawn(cmd, what);
        let ready = app.answer("startup");
        assert_eq!(
            ready["pid"].as_u64(),
            Some(u64::from(app.pid)),
            "the app runs in the process we spawned: {ready}"
        );
        (app, ready)
    }

    /// Killed on drop without waiting for it to exit.
    pub fn kill_on_drop(mut self) -> JsonLinesChild {
        self.grace = Duration::ZERO;
        self
    }

    /// Reads the next answer (to `what`); panics unless it is ok.
    pub fn answer(&mut self, what: &str) -> Value {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("cannot read the app's answer to {what}: {e}"));
        assert!(n > 0, "the app exited on {what}");
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the app's answer to {what} is not JSON ({e}): {line}"));
        assert_eq!(
            answer["ok"],
            Value::Bool(true),
            "the app failed {what}: {answer}"
        );
        answer
    }

    /// Sends one request and returns its answer; panics unless it is ok.
    pub fn request(&mut self, request: Value) -> Value {
        let line = request.to_string();
        let stdin = self.stdin.as_mut().expect("the app's stdin is open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {line} to the app: {e}"));
        self.answer(&line)
    }
}

impl Drop for JsonLinesChild {
    fn drop(&mut self) {
        self.stdin = None;
        if self.grace.is_zero() || wait_exit(&mut self.child, self.grace).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
