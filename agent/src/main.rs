use std::process::ExitCode;

use clap::Parser;
use poolscope::{
    cli::{self, Cli, Command},
    config::Config,
    detect::pool_health::Status,
    ebpf, pipeline,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Errors are one sentence for a person: no backtrace, no Debug dump.
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("poolscope: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let mut config = Config::load(args.config.as_deref())?;
            config.apply(&args.overrides())?;
            init_logging(config.log.level.as_str());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let result = runtime.block_on(pipeline::run(config));
            // Blocking work still running (a /proc read, an export stuck
            // on a hung collector) must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_millis(300));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let lines = ebpf::check_kernel();
            for line in &lines {
                let mark = if line.ok { "ok  " } else { "MISS" };
                println!("{mark} {:<40} {}", line.what, line.detail);
            }
            // Missing optional features (kprobes, fentry) are not failures;
            // the tracepoint path and the privileges it needs are.
            let essential_missing = lines.iter().any(|l| {
                !l.ok
                    && (l.what == "capabilities"
                        || l.what == "tracefs"
                        || l.what.starts_with("tracepoint"))
            });
            Ok(if essential_missing {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Connections(args) => {
            cli::connections(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queries(args) => {
            cli::queries(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Leaks(args) => {
            cli::leaks(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pools(args) => {
            cli::pools(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sizing(args) => {
            cli::sizing(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        // Nagios's codes: 0 ok, 1 warning, 2 critical, 3 unknown.
        Command::Health(args) => Ok(match cli::health(&args) {
            Ok(Status::Ok) => ExitCode::SUCCESS,
            Ok(Status::Warning) => ExitCode::from(1),
            Ok(Status::Critical) => ExitCode::from(2),
            Err(e) => {
                eprintln!("poolscope: {e:#}");
                ExitCode::from(3)
            }
        }),
    }
}
