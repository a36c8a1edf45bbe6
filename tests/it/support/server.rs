//! Servers for the tests: [`InProc`], the library's `serve::start` on a
//! runtime of its own in this process, on the listeners [`Conf`] bound;
//! and [`Server`], the real `fencepost serve` process, for what needs one
//! (kill -9, SIGTERM, SIGSTOP, its exit code and log).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fencepost::serve::Addrs;

use super::{bin, Conf};

/// A running `fencepost serve`, killed (SIGKILL) on drop.
pub struct Server {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    envs: Vec<(String, String)>,
    /// Where `--ready-file` is written; `None` for a raw config text.
    ready: Option<PathBuf>,
}

impl Server {
    /// Writes `conf` into `dir/fencepost.toml`, starts serve on its
    /// addresses (the held sockets are closed just before) and waits
    /// until every listener is bound (`--ready-file`).
    pub async fn run(dir: &Path, conf: Conf) -> Server {
        let s = Self::launch(dir, conf);
        s.wait_ready().await;
        s
    }

    /// Like [`Server::run`] without waiting: the process is started, and
    /// [`Server::ready_file`] appears once every listener is bound.
    pub fn launch(dir: &Path, mut conf: Conf) -> Server {
        conf.release();
        let config = dir.join("fencepost.toml");
        std::fs::write(&config, conf.render()).expect("write config");
        let mut s = Server {
            child: None,
            log: dir.join(format!("serve-{}.log", rand::random::<u32>())),
            config,
            envs: conf.env.clone(),
            ready: Some(dir.join(format!("ready-{}.json", rand::random::<u32>()))),
        };
        s.spawn();
        s
    }

    /// Where `--ready-file` is written; `None` for a raw config text.
    pub fn ready_file(&self) -> Option<&Path> {
        self.ready.as_deref()
    }

    /// Waits until serve has written its ready file (every listener
    /// bound, the store opened). Async, so what the test runs on its own
    /// runtime (a [`super::Shim`] in front of the store) keeps running.
    pub async fn wait_ready(&self) -> Addrs {
        let Some(path) = &self.ready else {
            panic!("a server started from text has no ready file");
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return serde_json::from_str(&text).expect("ready file is JSON");
            }
            assert!(
                Instant::now() < deadline,
                "serve not ready after 30s\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Writes `config_text` into `dir/fencepost.toml` and starts serve.
    pub fn start(dir: &Path, config_text: &str) -> Server {
        Self::start_with_env(dir, config_text, &[])
    }

    pub fn start_with_env(dir: &Path, config_text: &str, envs: &[(&str, &str)]) -> Server {
        let config = dir.join("fencepost.toml");
        std::fs::write(&config, config_text).expect("write config");
        let mut s = Server {
            child: None,
            log: dir.join(format!("serve-{}.log", rand::random::<u32>())),
            config,
            envs: envs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ready: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        if let Some(r) = &self.ready {
            let _ = std::fs::remove_file(r);
        }
        let log = std::fs::File::create(&self.log).expect("create log file");
        let child = Command::new(bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .args(
                self.ready
                    .iter()
                    .flat_map(|r| [Path::new("--ready-file"), r]),
            )
            .current_dir(self.config.parent().unwrap_or(Path::new(".")))
            .envs(self.envs.iter().map(|(a, b)| (a.as_str(), b.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fencepost serve");
        self.child = Some(child);
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit: the graceful path.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// kill -9, then start again on the same config (and so the same
    /// ports); [`Server::wait_ready`] says when it is up.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A server in this process: `fencepost::serve::start` on the listeners
/// the [`Conf`] bound, on a runtime (and thread) of its own, so a test
/// that blocks its own runtime (a `psql` child, a sync client) cannot
/// stall the server. Stopped (gracefully) on drop.
pub struct InProc {
    pub addrs: Addrs,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl InProc {
    /// Starts the server and waits until it serves; async, so what the
    /// test runs on its own runtime (a [`super::Shim`] in front of the
    /// store) keeps running meanwhile.
    pub async fn start(mut conf: Conf) -> InProc {
        let text = conf.render();
        let held = conf.take_listeners();
        let env = conf.env.clone();
        let store_up = conf.store_up;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let start = async {
                    let config = fencepost::config::Config::from_parts(&text, "test config", env)
                        .map_err(|e| e.to_string())?;
                    fencepost::serve::start(config, held.into_tokio(), Duration::from_secs(10))
                        .await
                        .map_err(|e| e.to_string())
                };
                let server = match start.await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                // A store that is up is migrated before the test begins,
                // however slow the machine (serve itself waits 3 s).
                let deadline = Instant::now() + Duration::from_secs(30);
                while store_up && !server.is_migrated() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let _ = ready_tx.send(Ok(server.addrs().clone()));
                server
                    .run_until(async {
                        let _ = stopped.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        let addrs = match ready_rx.await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("in-process server did not start: {e}"),
            Err(_) => panic!("in-process server thread died: {:?}", thread.join()),
        };
        InProc {
            addrs,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Shuts down as SIGTERM would (listeners, in-flight work, audit
    /// flush) and waits for it; the server's own result.
    pub fn shutdown(mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the server thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        // Begin the shutdown; the thread finishes on its own.
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A server a test may start either way: in-process unless the test is
/// about the process (a signal, kill -9, its memory, its log).
pub enum Served {
    // Held for its drop, which stops the server.
    #[allow(dead_code)]
    InProc(InProc),
    Process(Server),
}

impl Served {
    /// Starts `conf` in a process (`dir` holds its config and log) or in
    /// this one.
    pub async fn start(process: bool, dir: &Path, conf: Conf) -> Served {
        if process {
            Served::Process(Server::run(dir, conf).await)
        } else {
            Served::InProc(InProc::start(conf).await)
        }
    }

    /// The process, for a test that started one.
    pub fn process(&mut self) -> &mut Server {
        match self {
            Served::Process(s) => s,
            Served::InProc(_) => panic!("the test started its server in-process"),
        }
    }

    /// The process's log, for a failure message (an in-process server
    /// logs nowhere).
    pub fn log_text(&self) -> String {
        match self {
            Served::InProc(_) => String::new(),
            Served::Process(s) => s.log_text(),
        }
    }
}
