//! The command line. Help texts are written for someone meeting fencepost
//! for the first time: each says what the command is for, not only its
//! flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

const ABOUT: &str = "\
fencepost keeps a leader that has lost its lease from writing.

A paused or partitioned old leader still believes it leads. fencepost sits in
front of your storage (an HTTP service or PostgreSQL), tracks the highest
fencing token seen per resource, and refuses every write that carries an
older one. A companion elector grants leases and issues strictly increasing
tokens.

Start here:
  fencepost demo                          watch a stale write get refused
  fencepost keygen --out elector          make a key pair for signed tokens
  fencepost keygen tls --out tls --client worker-a
                                          a test CA and certificates for TLS
  fencepost serve --config fencepost.toml run elector, proxies and admin API
  TOKEN=$(fencepost lease acquire --elector http://127.0.0.1:7070 \\
            --resource orders --holder $(hostname))
  curl -X PUT -H \"Fencing-Token: $TOKEN\" -H 'Fencing-Resource: orders' ...
  fencepost lease run --resource orders --holder $(hostname) -- ./worker
                                          lead: run a command with its token
  fencepost audit                         see refused writes";

#[derive(Debug, Parser)]
#[command(name = "fencepost", version, about = ABOUT, long_about = ABOUT)]
pub struct Cli {
    /// Log format: text for people, json for log pipelines.
    #[arg(long, global = true, env = "FENCEPOST_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the showcase: elector, HTTP fencing proxy and a key-value
    /// upstream in one process, two writers, a failover, a stale write
    /// refused. Needs nothing else; exits 0 only if fencing held.
    Demo(DemoArgs),
    /// Run what the config names: elector API, HTTP and Postgres proxies,
    /// admin API.
    #[command(long_about = SERVE_HELP)]
    Serve(ServeArgs),
    /// Acquire, renew, release or show a lease from a shell, or run a
    /// command while holding it.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Show refused writes, newest first; `audit verify` checks the
    /// audit log's hash chains.
    Audit(AuditArgs),
    /// The fencing tier, the marks and the latest refusals at a glance.
    Status(StatusArgs),
    /// Apply the store's schema migrations (serve also does this at start).
    Migrate(MigrateArgs),
    /// Generate an Ed25519 key pair for signed tokens: the elector signs
    /// with the secret key, proxies verify with the public one. `keygen
    /// tls` makes a test CA and certificates for the listeners' TLS;
    /// `keygen client-token` a client's bearer token.
    Keygen(KeygenArgs),
}

const SERVE_HELP: &str = "\
Run what the config file names: the elector API ([elector]), HTTP fencing
proxies ([[http]]), Postgres fencing proxies ([[postgres]]) and the admin
API ([admin]: /metrics, /healthz, /readyz, /v1/fences, /v1/audit, /v1/replicas). The store (store = ...) holds fences, leases and the
audit log; SQLite by default, Postgres to share it between replicas.

Stop with SIGINT or SIGTERM: listeners close, in-flight requests finish
(up to --shutdown-timeout), and the audit log is flushed before exit.

See fencepost.example.toml for every setting. Each one can also be set from
the environment (values are TOML when they parse, strings otherwise; for
[[http]] lists, FENCEPOST_HTTP_<KEY> sets the first entry and
FENCEPOST_HTTP_<N>_<KEY> entry N):
";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Lease length for the two writers in the story.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Directory for the demo's SQLite store (default: a fresh temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file. Without one, settings come from FENCEPOST_*
    /// variables alone.
    #[arg(long, short, env = "FENCEPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long shutdown waits for in-flight requests before closing them.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Once every listener is bound, write their addresses here as JSON
    /// ({"elector", "http": [..], "postgres": [..], "admin"}): how a
    /// supervisor or a test learns the ports of `listen = "...:0"`.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct LeaseTarget {
    /// The elector's base URL.
    #[arg(
        long,
        env = "FENCEPOST_ELECTOR_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    pub elector: String,
    /// The resource the lease is for (1-128 of A-Z a-z 0-9 . _ : / -).
    #[arg(long)]
    pub resource: String,
    /// Bearer token for the elector API, if it requires one.
    #[arg(long, env = "FENCEPOST_ELECTOR_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Ask for the lease. Prints only the token, so
    /// TOKEN=$(fencepost lease acquire ...) works. Exit 3 if another holder
    /// has it.
    Acquire {
        #[command(flatten)]
        target: LeaseTarget,
        /// Who is asking: a stable name for this process (host:pid, pod name).
        #[arg(long)]
        holder: String,
        /// Lease length; renew well before it runs out.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Extend a lease you hold. Exit 3 if it was lost: stop writing.
    Renew {
        #[command(flatten)]
        target: LeaseTarget,
        #[arg(long)]
        holder: String,
        /// The token acquire gave you.
        #[arg(long)]
        token: String,
        /// New lease length (default: the one acquired with).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Give the lease up so the next candidate need not wait for expiry.
    Release {
        #[command(flatten)]
        target: LeaseTarget,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        token: String,
    },
    /// Print the lease as JSON. Exit 4 if there is none.
    Show {
        #[command(flatten)]
        target: LeaseTarget,
    },
    /// Run a command while holding the lease: campaign, run CMD with its
    /// token in FENCING_TOKEN, renew, stop CMD if the lease is lost.
    #[command(long_about = LEASE_RUN_HELP)]
    Run(LeaseRunArgs),
}

const LEASE_RUN_HELP: &str = "\
Run a command while holding the lease, so a script or a program that knows
nothing of leases can lead.

fencepost campaigns for the lease (waiting, with jittered backoff, while
another holder leads), then runs CMD with these variables set:

  FENCING_TOKEN     the token: send it with every write
  FENCING_RESOURCE  the resource (--resource)
  FENCING_HOLDER    the holder name (--holder)
  FENCING_ELECTOR   the elector URL (--elector)

It renews the lease in the background (every third of the TTL). When the
lease is lost (a renewal is refused, or none is confirmed before the lease
could have expired by the local clock), it sends CMD's process group
SIGTERM, then SIGKILL after --kill-after (or as soon as CMD has exited, for
anything it left behind). Writes CMD still makes with the old token are
refused by the fencing proxies. Without --once, fencepost then campaigns
again and runs CMD anew under the new token.

When CMD exits by itself, fencepost releases the lease and exits with
CMD's status. SIGINT and SIGTERM are forwarded to CMD (and end the run once
CMD exits); SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded. CMD runs in
its own process group, so a loss stops everything it started.

Exit status:
  CMD's status   CMD exited by itself (128+N if signal N killed it)
  75             the lease was lost and CMD was stopped, and fencepost
                 did not campaign again (--once, or SIGINT/SIGTERM came)
  128+N          signal N (SIGINT, SIGTERM) arrived while campaigning
  125            fencepost itself failed (the elector refused the
                 holder or the bearer token, bad settings)
  126, 127       CMD could not be run / was not found
  2              bad arguments

Example:
  fencepost lease run --elector http://127.0.0.1:7070 --resource orders \\
      --holder \"$(hostname)\" --ttl 10s -- \\
    sh -c 'while :; do
             curl -fsS -X PUT -H \"Fencing-Token: $FENCING_TOKEN\" \\
                  -H \"Fencing-Resource: $FENCING_RESOURCE\" \\
                  http://127.0.0.1:8080/orders/tick -d \"$(date)\"
             sleep 1
           done'";

#[derive(Debug, Args)]
pub struct LeaseRunArgs {
    #[command(flatten)]
    pub target: LeaseTarget,
    /// Who is asking: a stable name for this process (host name, pod name).
    #[arg(long)]
    pub holder: String,
    /// Lease length. The loss is noticed within it; a paused or cut-off
    /// runner loses the lease after it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// After a loss, how long CMD gets between SIGTERM and SIGKILL.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub kill_after: Duration,
    /// Run CMD once: after a loss, exit 75 instead of campaigning again.
    #[arg(long, conflicts_with = "restart")]
    pub once: bool,
    /// After a loss, campaign again and run CMD anew (the default).
    #[arg(long)]
    pub restart: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub action: Option<AuditAction>,
    /// Admin API base URL. Without it, the store of --config (or
    /// ./fencepost.db) is read directly.
    #[arg(long, env = "FENCEPOST_ADMIN_URL")]
    pub admin: Option<String>,
    /// Bearer token for the admin API.
    #[arg(long, env = "FENCEPOST_ADMIN_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    #[arg(long, short, env = "FENCEPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only this resource.
    #[arg(long)]
    pub resource: Option<String>,
    /// Only records newer than this: a duration ago ("1h") or an RFC 3339
    /// time ("2026-11-23T10:00:00Z").
    #[arg(long)]
    pub since: Option<String>,
    /// Only records of this kind: refused_write (the default),
    /// lease_granted, lease_denied, lease_released, lease_expired,
    /// renewal_refused, lease_renewed, or all.
    #[arg(long, default_value = "refused_write")]
    pub kind: String,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check every writer's hash chain in the store and name the first
    /// record that does not match. Exit 0: every chain verifies; 3: a
    /// record does not match (edited, deleted, inserted or reordered);
    /// 1: the store could not be read.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Config whose store to check (its `store` key).
    #[arg(long, short, env = "FENCEPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Store URL (overrides the config's `store`).
    #[arg(long, env = "FENCEPOST_STORE")]
    pub store: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Admin API base URL of any replica.
    #[arg(
        long,
        env = "FENCEPOST_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "FENCEPOST_ADMIN_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[arg(long, short, env = "FENCEPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Store URL (overrides the config's `store`).
    #[arg(long, env = "FENCEPOST_STORE")]
    pub store: Option<String>,
    /// Install the in-database guard into this protected Postgres database
    /// (for enforce = "database") instead of migrating the store: schema
    /// `fencepost` with table `marks` and function `advance`. Idempotent;
    /// the role needs CREATE on the database.
    #[arg(long)]
    pub guard: Option<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct KeygenArgs {
    #[command(subcommand)]
    pub kind: Option<KeygenKind>,
    /// Write <OUT>.key (secret, mode 0600) and <OUT>.pub.
    #[arg(long, default_value = "elector")]
    pub out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeygenKind {
    /// A test CA and certificates for TLS on the listeners (tls_cert,
    /// tls_key, tls_client_ca) and for their clients.
    #[command(long_about = KEYGEN_TLS_HELP)]
    Tls(KeygenTlsArgs),
    /// A fresh client token, and the config entry that names its client
    /// with the token's hash. The token is printed once and stored nowhere:
    /// give it to the client (its Authorization: Bearer), put the entry in
    /// fencepost.toml.
    ClientToken(ClientTokenArgs),
}

const KEYGEN_TLS_HELP: &str = "\
A test CA and certificates signed by it, for TLS on the listeners and for
their clients (mutual TLS), in one step. Writes into --out:

  ca.pem, ca.key                 the CA (tls_client_ca = ca.pem; clients
                                 trust ca.pem: curl --cacert, sslrootcert)
  server.pem, server.key         a server certificate for --san names
                                 (tls_cert, tls_key)
  client-NAME.pem, client-NAME.key
                                 a client certificate per --client NAME:
                                 subject CN NAME, and NAME as a DNS SAN (or a
                                 URI SAN when it has \"://\")

An existing ca.key made by this command is reused, so clients can be added
later without replacing the CA; the server certificate is then written only
when --san is given. Keys are written with mode 0600. For tests and trials:
in production use your own CA.";

#[derive(Debug, Args)]
pub struct KeygenTlsArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// A name the server certificate is valid for (DNS name or IP address;
    /// repeatable). Default: localhost, 127.0.0.1 and ::1.
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// Also make a client certificate for NAME (repeatable).
    #[arg(long = "client", value_name = "NAME")]
    pub clients: Vec<String>,
    /// Validity of the certificates, in days from today.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Overwrite existing certificate and key files (a CA is always reused).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ClientTokenArgs {
    /// The client's name: its identity in [[elector.grants]] and in the
    /// audit log.
    #[arg(long)]
    pub name: String,
    /// Print an [[admin.clients]] entry with this role (read: GETs, for
    /// dashboards; admin: every method) instead of [[elector.clients]].
    #[arg(long, value_parser = ["read", "admin"])]
    pub role: Option<String>,
}
