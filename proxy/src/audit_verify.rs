//! `fencepost audit verify`: walks every writer's hash chain in the store,
//! in (chain, seq) order a page at a time, through the pure
//! [`fencing::ChainVerifier`], and names the first record that does not
//! match. The exit code is the interface a script or a cron job branches
//! on: 0 every chain verifies, [`MISMATCH`] a record does not, 1 the store
//! could not be read.

use std::process::ExitCode;

use fencing::ChainVerifier;

use crate::cli::VerifyArgs;
use crate::config::Config;
use crate::error::Error;

/// The exit code when a chain does not verify.
pub const MISMATCH: u8 = 3;

/// Records read per store round trip.
const PAGE: u32 = 1000;

/// Mismatches printed before the rest are only counted.
const SHOWN: usize = 20;

pub async fn run(args: VerifyArgs) -> Result<ExitCode, Error> {
    let config = Config::load(args.config.as_deref())?;
    let url = args.store.unwrap_or(config.store);
    let store = store::open(&url, config.fencing.store_timeout).await?;
    store.migrate().await?;
    let mut verifier = ChainVerifier::new();
    let mut mismatches = 0usize;
    let mut after: Option<(String, u64)> = None;
    loop {
        let page = store
            .audit_chain_page(after.as_ref().map(|(c, s)| (c.as_str(), *s)), PAGE)
            .await?;
        for rec in &page {
            if let Err(m) = verifier.push(rec) {
                if mismatches < SHOWN {
                    let lead = if mismatches == 0 {
                        "FIRST MISMATCH"
                    } else {
                        "MISMATCH"
                    };
                    println!("{lead}: {m}");
                }
                mismatches += 1;
            }
        }
        match page.last().and_then(|r| r.chain.as_ref()) {
            Some(l) if page.len() == PAGE as usize => after = Some((l.chain.clone(), l.seq)),
            _ => break,
        }
    }
    let unchained = store.audit_unchained().await?;
    let summary = format!(
        "{} records in {} chains; {unchained} unchained (written before chains, not checked)",
        verifier.records, verifier.chains
    );
    if mismatches == 0 {
        println!("verified: {summary}");
        Ok(ExitCode::SUCCESS)
    } else {
        if mismatches > SHOWN {
            println!("... and {} more", mismatches - SHOWN);
        }
        println!("NOT verified: {mismatches} records do not match; {summary}");
        Ok(ExitCode::from(MISMATCH))
    }
}
