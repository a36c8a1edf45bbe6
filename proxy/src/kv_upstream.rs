//! A small in-process HTTP key-value service to put behind the proxy.
//!
//! `fencepost demo` needs an upstream on a machine with nothing else
//! running, and it needs to prove from the upstream's side that a stale
//! write never arrived. So besides the data, the service keeps an arrival
//! log of every request it received, readable in-process.
//!
//! - `PUT|POST /kv/{key}`: store the body (and the `Fencing-Token` it came
//!   with); `200` with `{"key","bytes","token","seq"}`.
//! - `GET /kv/{key}`: the stored body, or `404`.
//! - `DELETE /kv/{key}`: `204`, or `404`.
//! - `GET /kv`: every entry as a JSON array of `{"key","value","token"}`.
// The demo reads the arrival log; the other accessors (`get`, `entries`,
// `url`, `stop`) serve tests and embedders, so the binary alone leaves
// some of them unused.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Largest value accepted: the service is a demo store, not a blob store.
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// One request as the upstream saw it, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arrival {
    /// 1, 2, 3... in the order requests arrived.
    pub seq: u64,
    pub method: String,
    /// The key the request addressed (empty for `GET /kv`).
    pub key: String,
    /// The `Fencing-Token` header, as sent.
    pub token: Option<String>,
    #[serde(skip)]
    pub at: SystemTime,
}

/// A stored value and the token of the write that stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub token: Option<String>,
}

#[derive(Default)]
struct State {
    data: BTreeMap<String, Entry>,
    arrivals: Vec<Arrival>,
}

pub struct KvUpstream {
    addr: SocketAddr,
    state: Mutex<State>,
    stop: watch::Sender<bool>,
}

impl KvUpstream {
    /// Starts serving on `listener` in the background; the service stops
    /// when [`KvUpstream::stop`] is called.
    pub async fn start(listener: TcpListener) -> std::io::Result<Arc<KvUpstream>> {
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let kv = Arc::new(KvUpstream {
            addr,
            state: Mutex::new(State::default()),
            stop,
        });
        let server = Arc::clone(&kv);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(a) => a,
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                    _ = async { stopped.wait_for(|s| *s).await.map(|_| ()) } => return,
                };
                let kv = Arc::clone(&server);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let kv = Arc::clone(&kv);
                        async move { Ok::<_, Infallible>(kv.handle(req).await) }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(30))
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(kv)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, ready to be a proxy's `upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Every request received so far, oldest first.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.lock().arrivals.clone()
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        self.lock().data.get(key).cloned()
    }

    /// Every stored entry, by key.
    pub fn entries(&self) -> Vec<(String, Entry)> {
        self.lock()
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing below panics while holding the lock; a poisoned one still
        // holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let token = req
            .headers()
            .get("fencing-token")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let key = match path.strip_prefix("/kv") {
            Some("") | Some("/") => Some(String::new()),
            Some(rest) => rest.strip_prefix('/').map(str::to_owned),
            None => None,
        };
        let seq = {
            let mut st = self.lock();
            let seq = st.arrivals.len() as u64 + 1;
            st.arrivals.push(Arrival {
                seq,
                method: method.to_string(),
                key: key.clone().unwrap_or_else(|| path.clone()),
                token: token.clone(),
                at: SystemTime::now(),
            });
            seq
        };
        let Some(key) = key else {
            return text(StatusCode::NOT_FOUND, "no such path; try /kv/{key}\n");
        };
        match (method, key.is_empty()) {
            (Method::GET, true) => {
                let list: Vec<serde_json::Value> = self
                    .lock()
                    .data
                    .iter()
                    .map(|(k, e)| {
                        serde_json::json!({
                            "key": k,
                            "value": String::from_utf8_lossy(&e.value),
                            "token": e.token,
                        })
                    })
                    .collect();
                json(StatusCode::OK, &serde_json::Value::Array(list))
            }
            (Method::GET | Method::HEAD, false) => match self.get(&key) {
                Some(e) => {
                    let mut resp = Response::new(Full::new(e.value));
                    if let Some(t) = e.token.and_then(|t| http::HeaderValue::from_str(&t).ok()) {
                        resp.headers_mut().insert("fencing-token", t);
                    }
                    resp
                }
                None => text(StatusCode::NOT_FOUND, "no such key\n"),
            },
            (Method::PUT | Method::POST, false) => {
                let value = match Limited::new(req.into_body(), MAX_VALUE_BYTES)
                    .collect()
                    .await
                {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        return text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "value too large or body failed\n",
                        )
                    }
                };
                let bytes = value.len();
                self.lock().data.insert(
                    key.clone(),
                    Entry {
                        value,
                        token: token.clone(),
                    },
                );
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "key": key, "bytes": bytes, "token": token, "seq": seq }),
                )
            }
            (Method::DELETE, false) => match self.lock().data.remove(&key) {
                Some(_) => {
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                    resp
                }
                None => text(StatusCode::NOT_FOUND, "no such key\n"),
            },
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let client = reqwest::Client::new();
        let mut req = client
            .request(method.parse().unwrap(), format!("http://{addr}{path}"))
            .body(body.to_owned());
        if let Some(t) = token {
            req = req.header("fencing-token", t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    #[tokio::test]
    async fn stores_lists_deletes_and_logs_arrivals() {
        let kv = KvUpstream::start(TcpListener::bind("127.0.0.1:0").await.unwrap())
            .await
            .unwrap();
        let a = kv.addr();
        assert_eq!(call(a, "PUT", "/kv/x", Some("3"), "hello").await.0, 200);
        assert_eq!(
            call(a, "GET", "/kv/x", None, "").await,
            (200, "hello".into())
        );
        let (status, list) = call(a, "GET", "/kv", None, "").await;
        assert_eq!(status, 200);
        assert!(list.contains("\"hello\""), "{list}");
        assert_eq!(call(a, "DELETE", "/kv/x", Some("3"), "").await.0, 204);
        assert_eq!(call(a, "GET", "/kv/x", None, "").await.0, 404);
        let log = kv.arrivals();
        assert_eq!(log.len(), 5);
        assert_eq!(log[0].token.as_deref(), Some("3"));
        assert_eq!(
            (log[0].seq, log[0].method.as_str(), log[0].key.as_str()),
            (1, "PUT", "x")
        );
        assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
        kv.stop();
    }
}
