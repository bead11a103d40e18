//! The tests' stand-in for `miren supervise`.
//! Usage: sandbox-supervise STATE_DIR
//!      | sandbox-supervise --spare|--factory SANDBOXES_DIR [PRIVATE_MOUNT...]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let supervised = match args.as_slice() {
        [flag, root, private_mounts @ ..] if flag == "--spare" => {
            let private_mounts: Vec<PathBuf> = private_mounts.iter().map(PathBuf::from).collect();
            miren_runtime::sandbox::supervise_spare(Path::new(root), &private_mounts, None)
                .map(drop)
        }
        [flag, root, private_mounts @ ..] if flag == "--factory" => {
            let private_mounts: Vec<PathBuf> = private_mounts.iter().map(PathBuf::from).collect();
            miren_runtime::sandbox::run_spare_factory(Path::new(root), &private_mounts, None)
        }
        [dir] => miren_runtime::sandbox::supervise(Path::new(dir)),
        _ => {
            eprintln!(
                "usage: sandbox-supervise STATE_DIR | sandbox-supervise --spare|--factory SANDBOXES_DIR [PRIVATE_MOUNT...]"
            );
            return ExitCode::from(2);
        }
    };
    match supervised {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supervise: {e}");
            ExitCode::FAILURE
        }
    }
}
