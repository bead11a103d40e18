//! The `miren` CLI, built in this package so its tests can run it.

fn main() -> std::process::ExitCode {
    miren_agent::cli::main()
}
