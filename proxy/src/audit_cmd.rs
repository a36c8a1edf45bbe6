//! `fencepost audit`: audit records (refused writes unless `--kind` says
//! otherwise), newest first, from the admin API or straight from the store;
//! `fencepost audit verify` is [`crate::audit_verify`].

use std::process::ExitCode;

use serde_json::Value;
use store::AuditQuery;

use crate::admin::{audit_json, parse_kind, parse_since};
use crate::cli::{AuditAction, AuditArgs};
use crate::config::Config;
use crate::error::Error;

pub async fn run(args: AuditArgs) -> Result<ExitCode, Error> {
    if let Some(AuditAction::Verify(v)) = args.action {
        return crate::audit_verify::run(v).await;
    }
    if let Some(r) = &args.resource {
        fencing::resource::validate(r).map_err(|e| Error::Usage(format!("--resource: {e}")))?;
    }
    parse_kind(Some(&args.kind)).map_err(|e| Error::Usage(format!("--kind: {e}")))?;
    let rows: Vec<Value> = match &args.admin {
        Some(base) => from_admin(base, &args).await?,
        None => from_store(&args).await?,
    };
    if args.json {
        for r in &rows {
            println!("{r}");
        }
    } else {
        print_table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn from_admin(base: &str, args: &AuditArgs) -> Result<Vec<Value>, Error> {
    let mut query: Vec<(&str, String)> = vec![
        ("limit", args.limit.to_string()),
        ("kind", args.kind.clone()),
    ];
    if let Some(r) = &args.resource {
        query.push(("resource", r.clone()));
    }
    if let Some(s) = &args.since {
        query.push(("since", s.clone()));
    }
    let url = format!("{}/v1/audit", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| Error::Remote(e.to_string()))?;
    let mut req = client.get(&url).query(&query);
    if let Some(t) = &args.auth_token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Error::Remote(format!("cannot reach the admin API at {url}: {e}")))?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| {
        Error::Remote(format!(
            "admin API answered {status} with a body that is not JSON: {e}"
        ))
    })?;
    if !status.is_success() {
        let detail = body
            .get("detail")
            .and_then(Value::as_str)
            .unwrap_or("no detail");
        return Err(Error::Remote(format!(
            "admin API answered {status}: {detail}"
        )));
    }
    match body {
        Value::Array(rows) => Ok(rows),
        _ => Err(Error::Remote("admin API did not answer with a list".into())),
    }
}

async fn from_store(args: &AuditArgs) -> Result<Vec<Value>, Error> {
    let config = Config::load(args.config.as_deref())?;
    let since_ms = match &args.since {
        Some(s) => Some(parse_since(s, crate::fencer::now_ms()).map_err(Error::Usage)?),
        None => None,
    };
    let store = store::open(&config.store, config.fencing.store_timeout).await?;
    store.migrate().await?;
    let rows = store
        .query_audit(&AuditQuery {
            resource: args.resource.clone(),
            since_ms,
            kind: parse_kind(Some(&args.kind)).map_err(Error::Usage)?,
            limit: args.limit.clamp(1, 10_000),
        })
        .await?;
    Ok(rows.iter().map(audit_json).collect())
}

fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn print_table(rows: &[Value]) {
    if rows.is_empty() {
        println!("no audit records");
        return;
    }
    let cols = [
        "at",
        "kind",
        "resource",
        "holder",
        "identity",
        "protocol",
        "reason",
        "presented_token",
        "current_token",
        "client_addr",
        "detail",
    ];
    let heads = [
        "AT",
        "KIND",
        "RESOURCE",
        "HOLDER",
        "IDENTITY",
        "PROTO",
        "REASON",
        "PRESENTED",
        "CURRENT",
        "CLIENT",
        "DETAIL",
    ];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(r, c)).collect())
        .collect();
    let widths: Vec<usize> = (0..cols.len())
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(heads[i].len())
        })
        .collect();
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(&heads.map(String::from));
    for r in &table {
        line(r);
    }
}
