//! The `fencepost` binary: parses the command line and runs the command on
//! a multi-threaded runtime. Everything else is the library (`lib.rs`
//! names the layout; ARCHITECTURE.md says how the pieces fit).

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = fencepost::parse_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fencepost: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(fencepost::run(cli))
}
