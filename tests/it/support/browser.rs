//! A real browser for the console's tests: Debian's Chromium, headless,
//! driven by `chromedriver` over the W3C WebDriver protocol. The protocol
//! is a few JSON requests over HTTP, so this speaks it with the test
//! crate's own reqwest instead of adding a WebDriver crate; the browser
//! still loads the page, runs its script and renders it.
//!
//! `.ci/deps` installs `chromium` and `chromium-driver`; a machine
//! without them fails the test, it does not skip it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::{free_port, wait_port, TempDir};

/// The key a W3C WebDriver element reference is returned under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Option<Child>,
    base: String,
    http: reqwest::Client,
    _profile: TempDir,
}

fn which(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("none of {names:?} is installed: apt-get install -y chromium chromium-driver (.ci/deps does)");
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session
    /// with a profile of its own.
    pub async fn start() -> Browser {
        let driver_bin = which(&["chromedriver"]);
        let chromium = which(&["chromium", "chromium-browser"]);
        let port = free_port();
        let profile = TempDir::new("fp-chromium");
        let log = profile.path().join("chromedriver.log");
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so the browser it starts dies with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd.spawn().expect("start chromedriver");
        wait_port(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        let mut b = Browser {
            driver: Some(driver),
            base: format!("http://127.0.0.1:{port}"),
            http,
            _profile: profile,
        };
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1440,1400",
                        "--no-first-run", "--no-default-browser-check",
                        format!("--user-data-dir={}", b._profile.path().join("profile").display()),
                    ],
                },
            }},
        });
        let created = b.call("POST", "/session", caps).await;
        let id = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        b.base = format!("{}/session/{id}", b.base);
        b
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body),
        };
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {v}"
        );
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .expect("an element reference")
            .to_owned()
    }

    /// Types `text` into the element, as a user's keystrokes.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn clear(&self, css: &str) {
        let id = self.element(css).await;
        self.call("POST", &format!("/element/{id}/clear"), json!({}))
            .await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call("POST", &format!("/element/{id}/click"), json!({}))
            .await;
    }

    /// Runs `body` (a function body; `arguments` are `args`) in the page.
    pub async fn script(&self, body: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": body, "args": args }),
        )
        .await
    }

    /// Re-runs `body` until it returns something other than null or
    /// false, and returns that; panics after `secs` with `what`, the last
    /// value and a screenshot beside the failure.
    pub async fn wait_for(&self, what: &str, secs: u64, body: &str, args: Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.script(body, args.clone()).await;
            if !(v.is_null() || v == Value::Bool(false)) {
                return v;
            }
            if Instant::now() > deadline {
                let shot = artifact_dir().join("console-failure.png");
                self.screenshot(&shot).await;
                panic!(
                    "the page never showed {what} in {secs}s (screenshot: {})",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.call("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Ends the session (the browser quits) and the driver.
    pub async fn quit(mut self) {
        self.call("DELETE", "", Value::Null).await;
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut d) = self.driver.take() {
            // The whole group (its id is the driver's pid): chromedriver
            // and any browser it left. A pid, never 0 or -1, so nothing
            // else can be signalled.
            let group = i32::try_from(d.id())
                .ok()
                .filter(|&pid| pid > 1)
                .and_then(rustix::process::Pid::from_raw);
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the console tests keep their screenshots: the target dir's
/// scratch space for integration tests, kept after the run.
pub fn artifact_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")
}
