//! `fencepost keygen`: an Ed25519 key pair for signed tokens; `keygen
//! tls`: a test CA and certificates for the listeners' TLS (`tls.rs`);
//! `keygen client-token`: a client's bearer token and the config entry
//! holding its hash (`edge::access::TokenHash`).

mod tls;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use fencing::Signer;

use crate::cli::{ClientTokenArgs, KeygenArgs, KeygenKind};
use crate::edge::access::{self, TokenHash};
use crate::error::Error;

pub fn run(args: KeygenArgs) -> Result<ExitCode, Error> {
    match args.kind {
        Some(KeygenKind::Tls(tls)) => return tls::run(tls),
        Some(KeygenKind::ClientToken(t)) => return client_token(t),
        None => {}
    }
    let secret = with_ext(&args.out, "key");
    let public = with_ext(&args.out, "pub");
    for p in [&secret, &public] {
        if p.exists() && !args.force {
            return Err(Error::Usage(format!(
                "{} exists; pass --force to overwrite (tokens signed with the old key will stop verifying)",
                p.display()
            )));
        }
    }
    let signer = Signer::from_seed(rand::random());
    write_file(&secret, &signer.seed_text(), true)?;
    write_file(&public, &signer.verifier().public_text(), false)?;
    println!(
        "secret key: {}  (elector: signing_key = \"{}\")",
        secret.display(),
        secret.display()
    );
    println!(
        "public key: {}  (proxies: verify_key = \"{}\")",
        public.display(),
        public.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn with_ext(base: &std::path::Path, ext: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn write_file(path: &std::path::Path, text: &str, secret: bool) -> Result<(), Error> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts
        .open(path)
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    writeln!(f, "{text}").map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// Prints a new token (32 random bytes, base64url, `fpc_` in front so a
/// leaked one is recognisable in logs and secret scanners) and the entry
/// with its hash, ready to paste; the names are written as TOML strings.
fn client_token(args: ClientTokenArgs) -> Result<ExitCode, Error> {
    use base64::Engine as _;
    access::check_name("--name", &args.name).map_err(Error::Usage)?;
    let bytes: [u8; 32] = rand::random();
    let token = format!(
        "fpc_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    println!(
        "# the client's token (shown once; give it to {}):",
        args.name
    );
    println!("{token}");
    println!();
    match &args.role {
        None => {
            println!("[[elector.clients]]");
            println!("name = {}", quote(&args.name));
            println!("token_hash = \"{}\"", TokenHash::of(&token));
        }
        Some(role) => {
            println!("[[admin.clients]]");
            println!("name = {}", quote(&args.name));
            println!("token_hash = \"{}\"", TokenHash::of(&token));
            println!("role = {}", quote(role));
        }
    }
    Ok(ExitCode::SUCCESS)
}
