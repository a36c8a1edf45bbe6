//! `fencepost status`: the tier, the marks and the latest refusals at a
//! glance, from a running process's admin API.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::cli::StatusArgs;
use crate::client::{read_json, read_problem, ApiClient};
use crate::error::Error;

pub async fn run(args: StatusArgs) -> Result<ExitCode, Error> {
    let api = ApiClient::new(
        &args.admin,
        args.auth_token.as_deref(),
        Duration::from_secs(10),
    )?;
    let get = |path: &'static str| {
        let api = &api;
        async move {
            let resp = api.send(api.get(path)).await?;
            if !resp.status().is_success() {
                return Err(read_problem(resp).await.into_error());
            }
            read_json::<Value>(resp).await
        }
    };
    let tier = get("/v1/replicas").await?;
    let fences = get("/v1/fences").await?;
    let audit = get("/v1/audit?limit=5").await?;
    print!("{}", render(&tier, &fences, &audit));
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The report, plain text, one section each.
fn render(tier: &Value, fences: &Value, audit: &Value) -> String {
    let mut out = String::new();
    let replicas = tier["replicas"].as_array().cloned().unwrap_or_default();
    if replicas.is_empty() {
        out.push_str(&format!(
            "tier: none ({} store: one process)\n",
            text(&tier["store"])
        ));
    } else {
        out.push_str(&format!(
            "tier: {} live of {} replicas\n",
            text(&tier["live"]),
            replicas.len()
        ));
        let me = tier["self"]["id"].as_str().unwrap_or("");
        for r in &replicas {
            let id = text(&r["id"]);
            let state = if r["live"] == Value::Bool(true) {
                "live"
            } else {
                "expired"
            };
            let marker = if id == me { " (this one)" } else { "" };
            out.push_str(&format!(
                "  {id:<40} {state:<8} {}{marker}\n",
                text(&r["addresses"])
            ));
        }
        if tier["self"]["admitting"] == Value::Bool(false) {
            out.push_str(
                "  this replica is SELF-FENCED: its lease is unconfirmed, it refuses every write\n",
            );
        }
    }
    let fences = fences.as_array().cloned().unwrap_or_default();
    out.push_str(&format!("marks: {}\n", fences.len()));
    for f in fences.iter().take(20) {
        out.push_str(&format!(
            "  {:<40} {}\n",
            text(&f["resource"]),
            text(&f["token"])
        ));
    }
    if fences.len() > 20 {
        out.push_str(&format!("  ... and {} more\n", fences.len() - 20));
    }
    let audit = audit.as_array().cloned().unwrap_or_default();
    if audit.is_empty() {
        out.push_str("recent refusals: none\n");
    } else {
        out.push_str("recent refusals:\n");
        for a in &audit {
            out.push_str(&format!(
                "  {} {} {} presented {} current {} from {}\n",
                text(&a["at"]),
                text(&a["resource"]),
                text(&a["reason"]),
                text(&a["presented_token"]),
                text(&a["current_token"]),
                text(&a["client_addr"]),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn shows_the_tier_marks_and_refusals() {
        let tier = json!({"store": "postgres", "live": 1, "self": {"id": "a", "admitting": false},
            "replicas": [{"id": "a", "live": true, "addresses": "http=1"},
                         {"id": "b", "live": false, "addresses": "http=2"}]});
        let fences = json!([{"resource": "orders", "token": 7}]);
        let audit = json!([{"at": "t", "resource": "orders", "reason": "stale",
            "presented_token": 5, "current_token": 7, "client_addr": "c"}]);
        let out = render(&tier, &fences, &audit);
        assert!(out.contains("tier: 1 live of 2 replicas"), "{out}");
        assert!(out.contains("(this one)"), "{out}");
        assert!(out.contains("expired"), "{out}");
        assert!(out.contains("SELF-FENCED"), "{out}");
        assert!(out.contains("orders"), "{out}");
        assert!(out.contains("stale presented 5 current 7"), "{out}");
        let out = render(
            &json!({"store": "sqlite", "replicas": []}),
            &json!([]),
            &json!([]),
        );
        assert!(out.contains("tier: none (sqlite store"), "{out}");
        assert!(out.contains("recent refusals: none"), "{out}");
    }
}
