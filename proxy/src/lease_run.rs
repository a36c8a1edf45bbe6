//! `fencepost lease run`: lead on behalf of a command that knows nothing
//! of leases.
//!
//! Built on `fencepost_client::LeaseKeeper`, the same keeper a Rust leader
//! uses: it campaigns, renews, and fires the lease's loss before the lease
//! could have expired at the elector. This file adds only what a process
//! supervisor needs: the command's environment, its process group, signal
//! forwarding, the stop sequence on loss (SIGTERM, then SIGKILL), and exit
//! codes a shell can branch on (listed in `--help`, `cli.rs`).
//!
//! The command runs in its own process group so that a loss stops
//! everything it started (a shell's children too), and so that a terminal's
//! Ctrl-C reaches it once, through this process, not twice.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};

use fencepost_client::{
    Lease, LeaseKeeper, Loss, ENV_ELECTOR, ENV_HOLDER, ENV_RESOURCE, ENV_TOKEN,
};
use rustix::process::{kill_process_group, Pid, Signal};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::LeaseRunArgs;

/// The lease was lost, CMD was stopped, and no new campaign followed
/// (`--once`, or a stop signal arrived). EX_TEMPFAIL: "try again later"
/// is what a supervisor should make of it.
pub const EXIT_LOST: u8 = 75;
/// fencepost itself failed (as `timeout`, `env` and `docker run` use it).
pub const EXIT_FAILED: u8 = 125;
/// CMD exists but could not be executed (shell convention).
const EXIT_CANNOT_RUN: u8 = 126;
/// CMD was not found (shell convention).
const EXIT_NOT_FOUND: u8 = 127;

pub async fn run(args: LeaseRunArgs) -> ExitCode {
    match Runner::start(args) {
        Ok(r) => r.run().await,
        Err(msg) => {
            eprintln!("fencepost: {msg}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

struct Runner {
    args: LeaseRunArgs,
    keeper: LeaseKeeper,
    signals: Signals,
    /// A stop signal (SIGINT/SIGTERM) was received: no new campaign.
    stopping: Option<Signal>,
    /// CMD's program, for messages.
    cmd: String,
}

/// How one run of CMD ended.
enum Ended {
    Exited(ExitStatus),
    Lost(Loss),
}

impl Runner {
    fn start(args: LeaseRunArgs) -> Result<Runner, String> {
        // Signal handlers first, so a signal that arrives while the child
        // starts is forwarded instead of killing this process.
        let signals = Signals::new().map_err(|e| format!("cannot handle signals: {e}"))?;
        let mut builder =
            LeaseKeeper::builder(&args.target.elector, &args.target.resource, &args.holder)
                .ttl(args.ttl)
                .campaign_again(!args.once);
        if let Some(t) = args.target.auth_token.as_deref().filter(|t| !t.is_empty()) {
            builder = builder.bearer_token(t);
        }
        let keeper = builder.start().map_err(|e| e.to_string())?;
        let cmd = args
            .command
            .first()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|| "CMD".into());
        Ok(Runner {
            args,
            keeper,
            signals,
            stopping: None,
            cmd,
        })
    }

    async fn run(mut self) -> ExitCode {
        let (resource, holder) = (self.args.target.resource.clone(), self.args.holder.clone());
        loop {
            eprintln!("fencepost: {holder} campaigning for {resource}");
            let lease = tokio::select! {
                l = self.keeper.leading() => match l {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("fencepost: {e}");
                        self.keeper.shutdown().await;
                        return ExitCode::from(EXIT_FAILED);
                    }
                },
                sig = self.signals.next() => {
                    if is_stop(sig) {
                        eprintln!("fencepost: {} while campaigning; not running {}", name(sig), self.cmd);
                        self.keeper.shutdown().await;
                        return ExitCode::from(signal_code(sig));
                    }
                    continue;
                }
            };
            let mut child = match self.spawn(&lease) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fencepost: cannot run {}: {e}", self.cmd);
                    self.keeper.shutdown().await;
                    return ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
                        EXIT_NOT_FOUND
                    } else {
                        EXIT_CANNOT_RUN
                    });
                }
            };
            // The child leads its own process group: its id is the group's.
            let pid = child.id();
            let group = pid
                .and_then(|id| i32::try_from(id).ok())
                .and_then(Pid::from_raw);
            eprintln!(
                "fencepost: {holder} leads {resource} with token {}; running {} (pid {})",
                lease.token(),
                self.cmd,
                pid.map_or("?".into(), |p| p.to_string())
            );
            match self.supervise(&mut child, group, &lease).await {
                Ended::Exited(status) => {
                    // Released only now: nothing of this term writes any more.
                    self.keeper.shutdown().await;
                    eprintln!(
                        "fencepost: {} exited ({}); lease released",
                        self.cmd,
                        describe(status)
                    );
                    return ExitCode::from(status_code(status));
                }
                Ended::Lost(loss) => {
                    eprintln!(
                        "fencepost: lease on {resource} lost ({}); stopping {}: SIGTERM, SIGKILL after {}",
                        loss.reason,
                        self.cmd,
                        humantime::format_duration(self.args.kill_after)
                    );
                    let status = self.stop_child(&mut child, group).await;
                    eprintln!("fencepost: {} stopped ({})", self.cmd, describe(status));
                    if self.args.once || self.stopping.is_some() {
                        self.keeper.shutdown().await;
                        return ExitCode::from(EXIT_LOST);
                    }
                }
            }
        }
    }

    /// Waits for CMD to exit or the lease to be lost, forwarding signals.
    async fn supervise(&mut self, child: &mut Child, group: Option<Pid>, lease: &Lease) -> Ended {
        loop {
            tokio::select! {
                // The loss first: if both are ready, whatever is left of
                // CMD's group must still be stopped.
                biased;
                loss = lease.lost() => return Ended::Lost(loss),
                status = child.wait() => {
                    return match status {
                        Ok(s) => Ended::Exited(s),
                        // Cannot happen for a child we spawned and did not
                        // wait for elsewhere; report it as a failure.
                        Err(e) => {
                            eprintln!("fencepost: cannot wait for {}: {e}", self.cmd);
                            Ended::Exited(ExitStatus::from_raw(i32::from(EXIT_FAILED) << 8))
                        }
                    };
                }
                sig = self.signals.next() => self.forward(group, sig),
            }
        }
    }

    /// SIGTERM to CMD's group; SIGKILL after `--kill-after` or once CMD has
    /// exited, for whatever it left behind in its group.
    async fn stop_child(&mut self, child: &mut Child, group: Option<Pid>) -> ExitStatus {
        signal_group(group, Signal::TERM);
        let deadline = tokio::time::Instant::now() + self.args.kill_after;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.ok(),
                _ = tokio::time::sleep_until(deadline) => {
                    eprintln!("fencepost: {} still running after {}; SIGKILL", self.cmd, humantime::format_duration(self.args.kill_after));
                    signal_group(group, Signal::KILL);
                    break child.wait().await.ok();
                }
                sig = self.signals.next() => self.forward(group, sig),
            }
        };
        signal_group(group, Signal::KILL);
        status.unwrap_or_else(|| ExitStatus::from_raw(Signal::KILL.as_raw()))
    }

    fn forward(&mut self, group: Option<Pid>, sig: Signal) {
        if is_stop(sig) {
            self.stopping = Some(sig);
        }
        signal_group(group, sig);
    }

    fn spawn(&self, lease: &Lease) -> std::io::Result<Child> {
        let (program, rest) = match self.args.command.split_first() {
            Some(p) => p,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no command given",
                ))
            }
        };
        Command::new(program)
            .args(rest)
            .env(ENV_TOKEN, lease.token().as_str())
            .env(ENV_RESOURCE, lease.resource())
            .env(ENV_HOLDER, lease.holder())
            .env(ENV_ELECTOR, &self.args.target.elector)
            .process_group(0)
            .spawn()
    }
}

/// Sends `sig` to a process group. A group that is already gone (ESRCH) is
/// what we wanted anyway.
fn signal_group(group: Option<Pid>, sig: Signal) {
    if let Some(g) = group {
        if let Err(e) = kill_process_group(g, sig) {
            if e != rustix::io::Errno::SRCH {
                eprintln!(
                    "fencepost: cannot send {} to process group {}: {e}",
                    name(sig),
                    g.as_raw_nonzero()
                );
            }
        }
    }
}

fn is_stop(sig: Signal) -> bool {
    sig == Signal::INT || sig == Signal::TERM
}

fn name(sig: Signal) -> &'static str {
    match sig {
        Signal::INT => "SIGINT",
        Signal::TERM => "SIGTERM",
        Signal::HUP => "SIGHUP",
        Signal::QUIT => "SIGQUIT",
        Signal::USR1 => "SIGUSR1",
        Signal::USR2 => "SIGUSR2",
        Signal::KILL => "SIGKILL",
        _ => "a signal",
    }
}

/// 128+N, as shells report a death by signal N.
fn signal_code(sig: Signal) -> u8 {
    u8::try_from(128 + sig.as_raw()).unwrap_or(EXIT_FAILED)
}

/// CMD's status as a shell would report it.
fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(EXIT_FAILED),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(EXIT_FAILED),
        (None, None) => EXIT_FAILED,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown status".into(),
    }
}

/// The signals this process catches (to forward them) instead of dying.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.int.recv() => Signal::INT,
            Some(()) = self.term.recv() => Signal::TERM,
            Some(()) = self.hup.recv() => Signal::HUP,
            Some(()) = self.quit.recv() => Signal::QUIT,
            Some(()) = self.usr1.recv() => Signal::USR1,
            Some(()) = self.usr2.recv() => Signal::USR2,
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_shells_read_them() {
        assert_eq!(status_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(status_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(
            status_code(ExitStatus::from_raw(Signal::TERM.as_raw())),
            143
        );
        assert_eq!(
            status_code(ExitStatus::from_raw(Signal::KILL.as_raw())),
            137
        );
        assert_eq!(signal_code(Signal::INT), 130);
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by signal 9");
    }
}
