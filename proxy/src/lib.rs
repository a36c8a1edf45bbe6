//! fencepost as a library: the runtime behind the `fencepost` binary
//! (`main.rs` only parses the command line and calls [`run`]), imported
//! as well by the benches and the end-to-end tests, which start servers
//! in-process on listeners they bound themselves ([`serve::start`]).
//!
//! # Layout
//! - `cli`: the command line and its help texts.
//! - `config/`: `fencepost.toml` and `FENCEPOST_*`, parsed into types, one file per section.
//! - `serve`: wiring a server from a config and bound listeners; the shutdown order.
//! - `listener`: the accept loop and per-listener connection bound every listener shares.
//! - `edge/`: what the HTTP listeners share: problem+json, the bearer check, the HTTP/1 serve loop.
//! - `tls/`: TLS on every listener: the server config from PEM files, its reload, client certificate names.
//! - `fencer`: the decision service both proxies call (store, token cache, audit, metrics).
//! - `cluster/`: the fencing tier: replica lease, advances across replicas, acknowledgements.
//! - `http_proxy/`: the HTTP fencing proxy: routing, forwarding, the upstream pool, the elector watch.
//! - `pg_proxy/`: the Postgres fencing proxy: the listener (`mod.rs`) and one session's protocol.
//! - `upstream_tls`: TLS from both proxies to their upstreams (`https://`, `upstream_sslmode`).
//! - `elector/`: the lease elector's API and its event stream.
//! - `admin`: the admin API (`/metrics`, `/healthz`, `/readyz`, `/v1/fences`, `/v1/leases`, `/v1/audit`, `/v1/replicas`).
//! - `console/`: the web console on the admin port (`/ui`, embedded assets) and its event stream (`/v1/events`).
//! - `audit_sink`: the batched, bounded writer of refusals to the store.
//! - `metrics`: metric names and pre-registered handles.
//! - `shutdown`: the one shutdown signal of a process.
//! - `logging`: the tracing subscriber.
//! - `error`: the error a command fails with, worded for the person who ran it.
//! - `lease_cmd`, `lease_run`, `audit_cmd`, `status_cmd`, `keygen`: the client commands.
//! - `demo`, `kv_upstream`: the showcase and its toy key-value upstream.
//! - `client`: the HTTP client the commands share.
//!
//! The public surface is what the binary, the benches and the tests use:
//! [`cli`], [`config::Config`], [`serve`] and [`TokenChecker`]; the rest is
//! private to the crate.

#![forbid(unsafe_code)]

use std::process::ExitCode;

mod admin;
mod audit_cmd;
mod audit_sink;
mod audit_spool;
mod audit_verify;
pub mod cli;
mod client;
mod cluster;
pub mod config;
mod console;
mod demo;
mod edge;
mod elector;
pub mod error;
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
pub mod serve;
mod shutdown;
mod status_cmd;
mod tls;
mod upstream_tls;

pub use crate::fencer::TokenChecker;

/// Parses the command line; `serve --help` lists every FENCEPOST_*
/// variable, generated from the config's own table so the two cannot
/// drift apart.
pub fn parse_args() -> cli::Cli {
    let command = <cli::Cli as clap::CommandFactory>::command()
        .mut_subcommand("serve", |c| c.after_long_help(config::env_help()));
    match <cli::Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    }
}

/// Runs one command to its end; errors are printed for the person who
/// ran it and exit 1.
pub async fn run(cli: cli::Cli) -> ExitCode {
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
        Command::Status(args) => {
            logging::init(format, "warn");
            status_cmd::run(args).await
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
