//! Stand-in for `miren supervise --state-dir DIR` until the agent wires it up.
//! Usage: sandbox-supervise DIR

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: sandbox-supervise STATE_DIR");
        return ExitCode::from(2);
    };
    match miren_runtime::sandbox::supervise(std::path::Path::new(&dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supervise: {e}");
            ExitCode::FAILURE
        }
    }
}
