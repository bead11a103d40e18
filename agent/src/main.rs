use std::process::ExitCode;

fn main() -> ExitCode {
    miren_agent::cli::main()
}
