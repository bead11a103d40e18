//! Stand-in for a single-threaded `miren` exec helper: runs a command in a sandbox.
//! Usage: sandbox-exec STATE_DIR CMD [ARGS...]; copies its output and exit code.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, cmd @ ..] = &args[..] else {
        eprintln!("usage: sandbox-exec STATE_DIR CMD [ARGS...]");
        return ExitCode::from(2);
    };
    if cmd.is_empty() {
        eprintln!("usage: sandbox-exec STATE_DIR CMD [ARGS...]");
        return ExitCode::from(2);
    }
    let env = ["EXEC_MARK=1".to_string()];
    match miren_runtime::sandbox::exec(std::path::Path::new(dir), cmd, &env) {
        Ok(out) => {
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stderr().write_all(&out.stderr);
            ExitCode::from(out.exit_code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("exec: {e}");
            ExitCode::from(125)
        }
    }
}
