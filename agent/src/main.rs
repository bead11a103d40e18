use std::process::ExitCode;

use clap::Parser;
use miren_agent::cli::client::Client;
use miren_agent::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The supervisor must stay single-threaded (libcontainer clones with raw clone3 and its
    // container init is our child): no runtime, no threads, before this call.
    if let Command::Supervise {
        state_dir,
        sandboxes_dir,
    } = &cli.command
    {
        let supervised = match (state_dir, sandboxes_dir) {
            (Some(dir), _) => miren_runtime::sandbox::supervise(dir),
            (None, Some(root)) => miren_runtime::sandbox::supervise_spare(root).map(drop),
            (None, None) => Ok(()), // refused by clap
        };
        return match supervised {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    // The freeze helper: single-threaded, its only job is to thaw whatever happens to the agent.
    if let Command::FreezeHold { mount, max_seconds } = &cli.command {
        let mut stdout = std::io::stdout().lock();
        let held = miren_snapshot::hold_freeze(
            mount,
            std::time::Duration::from_secs(*max_seconds),
            &std::io::stdin(),
            &mut stdout,
        );
        return match held {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                use std::io::Write;
                let kind = if matches!(err, miren_snapshot::Error::AlreadyFrozen { .. }) {
                    "busy"
                } else {
                    "error"
                };
                let _ = writeln!(stdout, "{kind} {err}");
                ExitCode::FAILURE
            }
        };
    }
    // Same for exec: the command becomes this process's child, so no other threads here.
    if let Command::ExecIn {
        state_dir,
        env,
        cmd,
    } = &cli.command
    {
        use std::io::Write;
        return match miren_runtime::sandbox::exec(state_dir, cmd, env) {
            Ok(out) => {
                let _ = std::io::stdout().write_all(&out.stdout);
                let _ = std::io::stderr().write_all(&out.stderr);
                ExitCode::from(out.exit_code.clamp(0, 255) as u8)
            }
            Err(err) => {
                eprintln!("{}{err}", miren_agent::core::sandboxes::EXEC_ERROR_MARK);
                ExitCode::from(125)
            }
        };
    }
    if matches!(
        cli.command,
        Command::Deploy { .. } | Command::Addon { .. } | Command::Env { .. } | Command::App { .. }
    ) {
        let socket = cli.socket.clone();
        let command = cli.command;
        let result = run_client(
            |client| async move { miren_agent::cli::apps::run(&client, command).await },
            &socket,
        );
        return match result {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Sandbox { command } = cli.command {
        let socket = cli.socket.clone();
        let result = run_client(
            |client| async move { miren_agent::cli::sandboxes::run(&client, command).await },
            &socket,
        );
        return match result {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match cli.command {
        Command::Supervise { .. }
        | Command::ExecIn { .. }
        | Command::FreezeHold { .. }
        | Command::Sandbox { .. }
        | Command::Deploy { .. }
        | Command::Addon { .. }
        | Command::Env { .. }
        | Command::App { .. } => Ok(()),
        Command::Agent(args) => run_agent(&args, cli.socket),
        Command::Disk { command } => run_client(
            |client| async move { cli::run_disk_backup(&client, command).await },
            &cli.socket,
        ),
        Command::Image { command } => run_client(
            |client| async move { miren_agent::cli::images::run(&client, command).await },
            &cli.socket,
        ),
        Command::Debug { command } => run_client(
            |client| async move { cli::run_debug(&client, command).await },
            &cli.socket,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: &cli::AgentArgs, socket: std::path::PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = cli::agent_config(args, socket)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.uninstall_network {
        return runtime.block_on(miren_agent::server::uninstall_network(cfg));
    }
    runtime.block_on(miren_agent::server::run(cfg))
}

fn run_client<T, F, Fut>(f: F, socket: &std::path::Path) -> anyhow::Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(f(Client::new(socket)))
}
