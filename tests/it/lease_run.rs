//! `fencepost lease run` as real processes: two runners campaigning for
//! one resource through a real elector, their commands (shell loops
//! writing with curl) going through a real HTTP fencing proxy to an
//! upstream that records what arrived. Leaders are frozen with SIGSTOP,
//! runners alone or with their commands; exit codes and signal forwarding
//! are checked as `lease run --help` documents them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const RESOURCE: &str = "jobs";
const BEARER: &str = "s3cret-elector-token";

/// The command every leader runs: a PUT through the proxy every 50 ms
/// with its token, one line per write in $LOG: `<pid> <token> <status>`.
const WRITER: &str = r#"i=0
while :; do
  i=$((i+1))
  code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -X PUT \
    -H "Fencing-Token: $FENCING_TOKEN" -H "Fencing-Resource: $FENCING_RESOURCE" \
    --data-binary x "$URL/kv/$FENCING_HOLDER-$i")
  echo "$$ $FENCING_TOKEN $code" >> "$LOG"
  sleep 0.05
done"#;

/// An elector (with a bearer token) and an HTTP proxy watching it, in
/// front of a recording upstream.
struct Env {
    dir: TempDir,
    _server: InProc,
    upstream: Upstream,
    elector: String,
    proxy: String,
}

impl Env {
    async fn start() -> Env {
        let dir = TempDir::new("fp-lease-run");
        let upstream = Upstream::start().await;
        let mut conf = Conf::sqlite(dir.path());
        let el = conf.elector(Section::new().set("min_ttl", "50ms").set("token", BEARER));
        let px = conf.http(
            Section::to(format!("http://{}", upstream.addr))
                .set("elector_watch", format!("http://{el}"))
                .set("watch_resources", vec![RESOURCE]),
        );
        let server = InProc::start(conf).await;
        Env {
            dir,
            _server: server,
            upstream,
            elector: format!("http://{el}"),
            proxy: format!("http://{px}"),
        }
    }

    /// `lease run` for `holder`, running `sh -c script`.
    fn runner(&self, holder: &str, flags: &[&str], script: &str) -> Runner {
        let log = self.dir.path().join(format!("{holder}.writes"));
        let err = self.dir.path().join(format!("{holder}.stderr"));
        let child = Command::new(bin())
            .args(["lease", "run", "--elector", &self.elector])
            .args(["--resource", RESOURCE, "--holder", holder])
            .args(["--ttl", "1s", "--kill-after", "1s"])
            .args(flags)
            .args(["--", "sh", "-c", script])
            .env("FENCEPOST_ELECTOR_TOKEN", BEARER)
            .env("URL", &self.proxy)
            .env("LOG", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("spawn fencepost lease run");
        Runner {
            child,
            err,
            log,
            exited: None,
        }
    }

    /// The tokens of what reached the upstream, in arrival order.
    fn arrived_tokens(&self) -> Vec<u64> {
        self.upstream
            .arrivals()
            .iter()
            .filter_map(|a| a.token.as_deref().and_then(|t| t.parse().ok()))
            .collect()
    }

    /// Whether the lease is live right now, per the elector.
    async fn lease_live(&self) -> bool {
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/leases/{RESOURCE}", self.elector))
            .bearer_auth(BEARER)
            .send()
            .await
            .expect("elector answers");
        let v: serde_json::Value = resp.json().await.expect("lease JSON");
        v["live"] == true
    }
}

/// Nothing stale landed: the tokens that reached the upstream never go
/// down.
fn assert_monotonic(tokens: &[u64]) {
    for w in tokens.windows(2) {
        assert!(
            w[1] >= w[0],
            "token {} reached the upstream after {}: {tokens:?}",
            w[1],
            w[0]
        );
    }
}

struct Runner {
    child: Child,
    err: PathBuf,
    log: PathBuf,
    exited: Option<i32>,
}

/// One line of a writer's log.
#[derive(Debug, Clone, PartialEq)]
struct Write {
    pid: u32,
    token: u64,
    status: u16,
}

impl Runner {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn writes(&self) -> Vec<Write> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(Write {
                    pid: f.next()?.parse().ok()?,
                    token: f.next()?.parse().ok()?,
                    status: f.next()?.parse().ok()?,
                })
            })
            .collect()
    }

    /// Waits until stderr holds `needle` `n` times.
    async fn wait_for(&self, needle: &str, n: usize, secs: u64) -> String {
        let found = eventually(secs, || async {
            let e = self.stderr();
            (e.matches(needle).count() >= n).then_some(e)
        })
        .await;
        found.unwrap_or_else(|| panic!("no {n}x {needle:?} in {secs}s; stderr:\n{}", self.stderr()))
    }

    /// The token and command pid of the `n`th term (1-based).
    async fn term(&self, n: usize) -> (u64, u32) {
        let e = self.wait_for("running sh (pid", n, 20).await;
        let line = e
            .lines()
            .filter(|l| l.contains("running sh (pid"))
            .nth(n - 1)
            .expect("term line");
        let token = line
            .split("with token ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no token in {line:?}"));
        let pid = line
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"));
        (token, pid)
    }

    /// Waits until the writer's log has at least `n` lines.
    async fn wait_writes(&self, n: usize, secs: u64) -> Vec<Write> {
        eventually(secs, || async {
            let w = self.writes();
            (w.len() >= n).then_some(w)
        })
        .await
        .unwrap_or_else(|| panic!("fewer than {n} writes in {secs}s: {:?}", self.writes()))
    }

    async fn exit_code(&mut self, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                let code = st.code().unwrap_or(-1);
                self.exited = Some(code);
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "lease run did not exit in {secs}s; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every command pid this runner started, from its stderr.
    fn command_pids(&self) -> Vec<u32> {
        self.stderr()
            .lines()
            .filter_map(|l| l.split("(pid ").nth(1))
            .filter_map(|r| r.trim_end_matches(')').parse().ok())
            .collect()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Never leave a writer behind: the runner, then its commands'
        // process groups (no-ops for those already gone).
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in self.command_pids() {
            signal_group(pid, "KILL");
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn signal_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        // A zombie still answers kill -0; it has stopped all the same.
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

async fn wait_dead(pid: u32, secs: u64) -> Duration {
    let start = Instant::now();
    eventually(secs, || async { (!alive(pid)).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("process {pid} still running after {secs}s"));
    start.elapsed()
}

/// The whole leader (runner and command) frozen, as a VM pause freezes
/// it: the other runner takes over with a higher token; the old command,
/// thawed first, keeps writing and every such write is refused; its
/// runner, thawed next, notices the loss at once, stops the command and
/// (with --once) exits 75. Nothing stale reaches the upstream.
#[tokio::test]
async fn a_frozen_leader_is_replaced_refused_and_stopped_when_its_runner_wakes() {
    let env = Env::start().await;
    let mut a = env.runner("a", &["--once"], WRITER);
    let (token_a, child_a) = a.term(1).await;
    a.wait_writes(3, 10).await;
    assert!(
        a.writes().iter().all(|w| w.status == 200),
        "{:?}",
        a.writes()
    );

    let mut b = env.runner("b", &[], WRITER);
    b.wait_for("b campaigning", 1, 10).await;
    // A healthy runner keeps its lease: over a whole TTL, b gets nowhere.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!b.stderr().contains("leads"), "{}", b.stderr());

    signal(a.pid(), "STOP");
    signal_group(child_a, "STOP");
    let (token_b, _) = b.term(1).await;
    assert!(token_b > token_a, "{token_b} > {token_a}");
    eventually(10, || async {
        env.arrived_tokens().contains(&token_b).then_some(())
    })
    .await
    .expect("b's writes reach the upstream");

    // The old command wakes first and writes on with its old token.
    let before = a.writes().len();
    signal_group(child_a, "CONT");
    let after = a.wait_writes(before + 3, 10).await;
    // The first may be a write that was already answered before the
    // freeze; everything after it was refused.
    let refused: Vec<&Write> = after[before + 1..].iter().collect();
    assert!(
        refused
            .iter()
            .all(|w| w.token == token_a && w.status == 409),
        "the old command's writes after the takeover: {refused:?}"
    );

    // Its runner wakes: the loss is already past, the command is stopped.
    signal(a.pid(), "CONT");
    let took = wait_dead(child_a, 5).await;
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert_eq!(a.exit_code(10).await, 75, "{}", a.stderr());
    let err = a.stderr();
    assert!(err.contains("lost"), "{err}");
    assert!(err.contains("stopping sh"), "{err}");

    assert_monotonic(&env.arrived_tokens());
    // b still leads and still writes.
    let n = b.writes().len();
    let w = b.wait_writes(n + 2, 10).await;
    assert!(w.iter().all(|w| w.status == 200 && w.token == token_b));
    signal(b.pid(), "TERM");
    assert_eq!(b.exit_code(10).await, 143, "{}", b.stderr());
}

/// Only the runner paused: its command keeps writing, refused from the
/// takeover on; when the runner wakes it stops the command and, without
/// --once, campaigns again, leads again once the other runner is gone,
/// and runs the command anew under a newer token. SIGTERM and SIGINT are
/// forwarded; each runner exits with its command's status.
#[tokio::test]
async fn a_paused_runner_stops_its_command_on_waking_and_campaigns_again() {
    let env = Env::start().await;
    let mut a = env.runner("a", &[], WRITER);
    let (token_a1, child_a1) = a.term(1).await;
    a.wait_writes(2, 10).await;
    let mut b = env.runner("b", &["--once"], WRITER);
    b.wait_for("b campaigning", 1, 10).await;

    signal(a.pid(), "STOP");
    let (token_b, _) = b.term(1).await;
    assert!(token_b > token_a1);
    // a's command runs on and is refused.
    eventually(10, || async {
        let refused = a
            .writes()
            .iter()
            .filter(|w| w.pid == child_a1 && w.status == 409)
            .count();
        (refused >= 2).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("a's command was not refused: {:?}", a.writes()));
    assert!(alive(child_a1));

    signal(a.pid(), "CONT");
    wait_dead(child_a1, 5).await;
    a.wait_for("a campaigning", 2, 10).await;
    assert!(!a.stderr().contains("exited"), "{}", a.stderr());

    // b leaves (SIGTERM forwarded to its command); the lease is released
    // and a leads again at once, under a newer token.
    signal(b.pid(), "TERM");
    assert_eq!(b.exit_code(10).await, 143, "{}", b.stderr());
    assert!(b.stderr().contains("lease released"), "{}", b.stderr());
    let (token_a2, child_a2) = a.term(2).await;
    assert!(token_a2 > token_b, "{token_a2} > {token_b}");
    assert_ne!(child_a2, child_a1);
    eventually(10, || async {
        a.writes()
            .iter()
            .any(|w| w.pid == child_a2 && w.token == token_a2 && w.status == 200)
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("a's second command did not write: {:?}", a.writes()));

    signal(a.pid(), "INT");
    assert_eq!(a.exit_code(10).await, 130, "{}", a.stderr());
    wait_dead(child_a2, 5).await;
    assert!(!env.lease_live().await, "released on exit");
    assert_monotonic(&env.arrived_tokens());
}

/// A command that is merely stopped does not cost the lease: its runner
/// renews for it (a hung command keeps the lease; give it its own
/// watchdog). Once it continues, its writes are admitted.
#[tokio::test]
async fn a_stopped_command_alone_keeps_the_lease() {
    let env = Env::start().await;
    let mut a = env.runner("a", &[], WRITER);
    let (token_a, child_a) = a.term(1).await;
    a.wait_writes(2, 10).await;
    let mut b = env.runner("b", &[], WRITER);
    b.wait_for("b campaigning", 1, 10).await;
    signal_group(child_a, "STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!b.stderr().contains("leads"), "{}", b.stderr());
    let before = a.writes().len();
    signal_group(child_a, "CONT");
    let w = a.wait_writes(before + 2, 10).await;
    assert!(
        w[before..]
            .iter()
            .all(|w| w.token == token_a && w.status == 200),
        "{w:?}"
    );
    signal(a.pid(), "TERM");
    assert_eq!(a.exit_code(10).await, 143);
    // a released on exit: b takes over without waiting out the TTL.
    b.term(1).await;
    signal(b.pid(), "TERM");
    assert_eq!(b.exit_code(10).await, 143);
}

#[tokio::test]
async fn exit_codes_are_the_commands_or_documented() {
    let env = Env::start().await;
    // The command's own status, and 128+N for a death by signal N.
    for (script, code) in [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 137)] {
        let mut r = env.runner("x", &["--once"], script);
        assert_eq!(r.exit_code(20).await, code, "{script}: {}", r.stderr());
        assert!(r.stderr().contains("lease released"), "{}", r.stderr());
    }
    assert!(!env.lease_live().await);

    // The command's environment.
    let out = env.dir.path().join("env.out");
    let mut r = env.runner(
        "envy",
        &[],
        &format!(
            "echo \"$FENCING_TOKEN|$FENCING_RESOURCE|$FENCING_HOLDER|$FENCING_ELECTOR\" > {}",
            out.display()
        ),
    );
    assert_eq!(r.exit_code(20).await, 0);
    let (token, _) = r.term(1).await;
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        format!("{token}|{RESOURCE}|envy|{}", env.elector)
    );

    // SIGTERM is forwarded; the command's answer is the exit status.
    let ready = env.dir.path().join("ready");
    let script = format!(
        "trap 'exit 42' TERM; touch {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let mut r = env.runner("t", &[], &script);
    eventually(20, || async { ready.exists().then_some(()) })
        .await
        .expect("command ready");
    signal(r.pid(), "TERM");
    assert_eq!(r.exit_code(10).await, 42, "{}", r.stderr());
    assert!(!env.lease_live().await, "released after the command exited");

    // A signal while campaigning: 128+N, and the command never ran.
    let holder = fencepost_client::ElectorClient::new(&env.elector)
        .unwrap()
        .bearer_token(BEARER);
    holder
        .acquire(RESOURCE, "someone-else", Duration::from_secs(30))
        .await
        .expect("acquire");
    let marker = env.dir.path().join("ran");
    let mut r = env.runner("w", &[], &format!("touch {}", marker.display()));
    r.wait_for("w campaigning", 1, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(r.pid(), "INT");
    assert_eq!(r.exit_code(10).await, 130, "{}", r.stderr());
    assert!(!marker.exists());

    // Cannot run: 127 not found, 126 not executable.
    let run = |cmd: &str| {
        let o = Command::new(bin())
            .args(["lease", "run", "--elector", &env.elector])
            .args(["--resource", "other", "--holder", "h", "--", cmd])
            .env("FENCEPOST_ELECTOR_TOKEN", BEARER)
            .output()
            .expect("run");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(run("/nonexistent/command").0, 127);
    let plain = env.dir.path().join("not-executable");
    std::fs::write(&plain, "echo hi").unwrap();
    assert_eq!(run(plain.to_str().unwrap()).0, 126);

    // fencepost's own failure: the elector refuses the bearer token.
    let o = Command::new(bin())
        .args(["lease", "run", "--elector", &env.elector])
        .args(["--resource", "other", "--holder", "h"])
        .args(["--auth-token", "wrong", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Bad arguments: clap's 2.
    let (code, _, _) = run_cli(
        &[
            "lease",
            "run",
            "--resource",
            "r",
            "--holder",
            "h",
            "--once",
            "--restart",
            "--",
            "true",
        ],
        &[],
    );
    assert_eq!(code, 2);
}

#[test]
fn lease_run_help_teaches() {
    let (code, out, _) = run_cli(&["lease", "run", "--help"], &[]);
    assert_eq!(code, 0);
    for needle in [
        "FENCING_TOKEN",
        "FENCING_RESOURCE",
        "FENCING_HOLDER",
        "FENCING_ELECTOR",
        "--kill-after",
        "--once",
        "SIGTERM",
        "75",
        "125",
        "Example:",
        "FENCEPOST_ELECTOR_TOKEN",
    ] {
        assert!(
            out.contains(needle),
            "lease run --help lacks {needle}:\n{out}"
        );
    }
}
