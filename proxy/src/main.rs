//! The `fencepost` binary: see `cli.rs` for the commands and ARCHITECTURE.md
//! for how the pieces fit.

#![forbid(unsafe_code)]

use std::process::ExitCode;

mod admin;
mod audit_cmd;
mod audit_sink;
mod cli;
mod client;
mod config;
mod demo;
mod edge;
mod elector;
mod error;
mod fencer;
mod http_proxy;
mod keygen;
mod kv_upstream;
mod lease_cmd;
mod lease_run;
mod listener;
mod logging;
mod metrics;
mod pg_proxy;
mod serve;
mod shutdown;

fn main() -> ExitCode {
    // `serve --help` lists every FENCEPOST_* variable, generated from the
    // config's own table so the two cannot drift apart.
    let command = <cli::Cli as clap::CommandFactory>::command()
        .mut_subcommand("serve", |c| c.after_long_help(config::env_help()));
    let cli = match <cli::Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fencepost: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: cli::Cli) -> ExitCode {
    use cli::Command;
    let format = cli.log_format.unwrap_or_default();
    let result = match cli.command {
        Command::Demo(args) => {
            logging::init(format, "warn");
            demo::run(args).await
        }
        Command::Serve(args) => serve::run(args, cli.log_format).await,
        Command::Lease(cmd) => {
            logging::init(format, "warn");
            lease_cmd::run(cmd).await
        }
        Command::Audit(args) => {
            logging::init(format, "warn");
            audit_cmd::run(args).await
        }
        Command::Migrate(args) => {
            logging::init(format, "info");
            serve::migrate(args).await
        }
        Command::Keygen(args) => keygen::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fencepost: {e:#}");
            ExitCode::from(1)
        }
    }
}
