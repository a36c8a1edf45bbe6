//! The end-to-end tests, one binary (one link of the crate and the
//! harness, not twelve): each module proves one area against real
//! sockets, a real Postgres and, where a process is the point (kill -9,
//! SIGSTOP, the CLI, `lease run`), the real `fencepost` binary.
//!
//! - `support`: the shared harness: temp dirs and databases, the typed
//!   config builder, servers in-process or as processes, test upstreams.
//! - `audit`: leadership records in the audit log, kinds and filters.
//! - `console`: the web console in a real headless Chromium, and its API over plain HTTP.
//! - `audit_chain`: the audit log's hash chains and `fencepost audit verify`.
//! - `ops`: audit flush, admin API, metrics, CLI commands, config errors.
//! - `elector`: leases, tokens and the event stream over the elector API.
//! - `http_proxy`, `pg_proxy`: the two fencing proxies end to end.
//! - `framing`: HTTP/1.1 framing through the HTTP proxy over raw sockets.
//! - `signed`: signed tokens across elector and proxy.
//! - `tier`: three replicas on one Postgres store as one fencing tier.
//! - `pg_clients`: real Postgres clients (psql, pgbench, psycopg) through the proxy.
//! - `pg_idle`: idle Postgres client connections: memory per connection, no CPU.
//! - `checker`: the fault-injection checker, judged by the storages' histories.
//! - `guard`: guard mode's in-database gate, in SQL and through two proxies.
//! - `security`, `hostile`: abuse cases and hostile input.
//! - `tls`: TLS on every listener: keygen, verification both ways,
//!   plaintext refused, client certificates, certificate rotation.
//! - `identity`: client identities, grants and roles at the elector and the admin API.
//! - `docs`: docs/ kept true against the code.
//! - `deploy`: the Grafana dashboard and the alert rules under deploy/, by
//!   promtool and against a real process's metrics.
//! - `upstream_tls`: TLS to the upstreams: `https://` and `upstream_sslmode`.
//! - `lease_run`, `client`: `fencepost lease run` and `fencepost-client` as leaders use them.

// A test crate: unwrapping is how a test fails (the workspace denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod audit;
mod audit_chain;
mod checker;
mod client;
mod console;
mod deploy;
mod docs;
mod elector;
mod framing;
mod guard;
mod hostile;
mod http_proxy;
mod identity;
mod lease_run;
mod ops;
mod pg_clients;
mod pg_idle;
mod pg_proxy;
mod security;
mod signed;
mod tier;
mod tls;
mod upstream_tls;
