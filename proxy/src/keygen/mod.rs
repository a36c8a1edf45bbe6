//! `fencepost keygen`: an Ed25519 key pair for signed tokens; `keygen
//! tls`: a test CA and certificates for the listeners' TLS (`tls.rs`).

mod tls;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use fencing::Signer;

use crate::cli::{KeygenArgs, KeygenKind};
use crate::error::Error;

pub fn run(args: KeygenArgs) -> Result<ExitCode, Error> {
    if let Some(KeygenKind::Tls(tls)) = args.kind {
        return tls::run(tls);
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
