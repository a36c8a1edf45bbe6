//! `fencepost lease acquire|renew|release|show`: the elector from a shell.
//! (`lease run` is `lease_run.rs`.)
//!
//! stdout carries only what a script captures (the token; the lease JSON
//! for `show`); everything meant for a person goes to stderr. Exit codes
//! are the interface a script branches on:
//!
//! - 0: done;
//! - 1: an error (bad arguments, elector unreachable, store down...);
//! - 3: the lease is held by another holder (acquire) or was lost
//!   (renew, release): stop writing;
//! - 4: `show` found no lease for the resource.

use std::process::ExitCode;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cli::{LeaseCommand, LeaseTarget};
use crate::client::{read_json, read_problem, ApiClient};
use crate::error::Error;

/// Long enough for an elector waiting on a slow store (it gives up after
/// 5 s and answers 503), short enough that a script does not hang.
const TIMEOUT: Duration = Duration::from_secs(15);

const EXIT_LOST: u8 = 3;
const EXIT_NONE: u8 = 4;

/// What acquire and renew answer.
#[derive(Deserialize)]
struct Grant {
    token: String,
    expires_at: String,
}

fn client(target: &LeaseTarget) -> Result<(ApiClient, String), Error> {
    let resource = fencing::ResourceName::new(&target.resource)
        .map_err(|e| Error::Usage(format!("--resource {:?}: {e}", target.resource)))?;
    let client = ApiClient::new(&target.elector, target.auth_token.as_deref(), TIMEOUT)?;
    // The name alphabet is URL-safe, `/` included: no encoding needed.
    Ok((client, format!("/v1/leases/{resource}")))
}

fn ttl_ms(d: Duration) -> Result<i64, Error> {
    i64::try_from(d.as_millis())
        .map_err(|_| Error::Usage(format!("--ttl {}: too long", humantime::format_duration(d))))
}

pub async fn run(cmd: LeaseCommand) -> Result<ExitCode, Error> {
    match cmd {
        LeaseCommand::Run(args) => Ok(crate::lease_run::run(args).await),
        LeaseCommand::Acquire {
            target,
            holder,
            ttl,
        } => {
            let (c, path) = client(&target)?;
            let body = json!({ "holder": holder, "ttl_ms": ttl_ms(ttl)? });
            let resp = c
                .send(c.post_json(&format!("{path}/acquire"), &body))
                .await?;
            grant_or_lost(resp, &holder, &target.resource, "not acquired").await
        }
        LeaseCommand::Renew {
            target,
            holder,
            token,
            ttl,
        } => {
            let (c, path) = client(&target)?;
            let mut body = json!({ "holder": holder, "token": token });
            if let Some(t) = ttl {
                body["ttl_ms"] = Value::from(ttl_ms(t)?);
            }
            let resp = c.send(c.post_json(&format!("{path}/renew"), &body)).await?;
            grant_or_lost(resp, &holder, &target.resource, "lease lost, stop writing").await
        }
        LeaseCommand::Release {
            target,
            holder,
            token,
        } => {
            let (c, path) = client(&target)?;
            let body = json!({ "holder": holder, "token": token });
            let resp = c
                .send(c.post_json(&format!("{path}/release"), &body))
                .await?;
            if resp.status().is_success() {
                eprintln!("fencepost: released {}", target.resource);
                return Ok(ExitCode::SUCCESS);
            }
            let p = read_problem(resp).await;
            if p.status == StatusCode::CONFLICT {
                eprintln!("fencepost: not released: {}", p.detail);
                return Ok(ExitCode::from(EXIT_LOST));
            }
            Err(p.into_error())
        }
        LeaseCommand::Show { target } => {
            let (c, path) = client(&target)?;
            let resp = c.send(c.get(&path)).await?;
            if resp.status().is_success() {
                let v: Value = read_json(resp).await?;
                let text = serde_json::to_string_pretty(&v)
                    .map_err(|e| Error::Remote(format!("unreadable answer: {e}")))?;
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            let p = read_problem(resp).await;
            if p.status == StatusCode::NOT_FOUND {
                eprintln!("fencepost: no lease for {}", target.resource);
                return Ok(ExitCode::from(EXIT_NONE));
            }
            Err(p.into_error())
        }
    }
}

/// Acquire and renew answer alike: on success the token goes to stdout
/// (renew prints the same token again, so `TOKEN=$(fencepost lease renew
/// ...)` is as safe as with acquire); a 409 means this holder does not
/// have the lease and must not write.
async fn grant_or_lost(
    resp: reqwest::Response,
    holder: &str,
    resource: &str,
    lost: &str,
) -> Result<ExitCode, Error> {
    if resp.status().is_success() {
        let g: Grant = read_json(resp).await?;
        eprintln!(
            "fencepost: {holder} holds {resource} until {}",
            g.expires_at
        );
        println!("{}", g.token);
        return Ok(ExitCode::SUCCESS);
    }
    let p = read_problem(resp).await;
    if p.status == StatusCode::CONFLICT {
        eprintln!("fencepost: {lost}: {}", p.detail);
        return Ok(ExitCode::from(EXIT_LOST));
    }
    Err(p.into_error())
}
