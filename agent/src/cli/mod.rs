//! The `miren` command line. `miren agent` runs the daemon; everything else is a client of its
//! socket. Command names and flags are a contract with operators and scripts: keep them.
//!
//! One file per command group (`disks`, `network`, `debug`, `snapshot`, `sandboxes`, `images`,
//! `apps`, `addons`, `env`, `agent`, `internal`); they print, and `client` is the only one that
//! speaks HTTP.

pub mod addons;
pub mod agent;
pub mod apps;
pub mod client;
pub mod debug;
pub mod disks;
pub mod env;
pub mod images;
mod internal;
pub mod network;
pub mod output;
pub mod parse;
pub mod sandboxes;
pub mod snapshot;
pub mod source;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use crate::cli::addons::AddonCommand;
pub use crate::cli::agent::{agent_config, AgentArgs};
pub use crate::cli::apps::AppCommand;
use crate::cli::client::Client;
pub use crate::cli::debug::DebugCommand;
pub use crate::cli::env::EnvCommand;
pub use crate::cli::images::ImageCommand;
pub use crate::cli::output::human_bytes;
use crate::cli::parse::parse_service_publish;
pub use crate::cli::sandboxes::SandboxCommand;
pub use crate::cli::snapshot::DiskBackupCommand;
use crate::config;
use crate::model::ServicePublish;

#[derive(Parser, Debug)]
#[command(name = "miren", version, about = "miren node agent and CLI")]
pub struct Cli {
    /// The agent's Unix socket.
    #[arg(long, global = true, env = "MIREN_SOCKET", default_value = config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent in the foreground.
    Agent(AgentArgs),
    /// Disk backups: run on the node that has the disk.
    Disk {
        #[command(subcommand)]
        command: DiskBackupCommand,
    },
    /// Sandboxes: OCI containers, each run by its own supervisor.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// (internal) Run one sandbox's supervisor; started by the agent.
    #[command(hide = true)]
    Supervise {
        #[arg(
            long,
            required_unless_present = "sandboxes_dir",
            conflicts_with = "sandboxes_dir"
        )]
        state_dir: Option<PathBuf>,
        /// A spare: read the sandbox id (a directory under this one) from stdin first.
        #[arg(long)]
        sandboxes_dir: Option<PathBuf>,
        /// A spare: the agent's mount roots (repeated), so it makes its own mount namespace
        /// while it waits.
        #[arg(long, requires = "sandboxes_dir")]
        private_mount: Vec<PathBuf>,
        /// A spare: the agent's mount template (`/proc/PID/task/TID/ns/mnt`), the small
        /// namespace its own is copied from.
        #[arg(long, requires = "sandboxes_dir")]
        mount_template: Option<PathBuf>,
        /// The spare factory: fork a spare for each request on stdin (a socket from the
        /// agent) instead of being one.
        #[arg(long, requires = "sandboxes_dir")]
        factory: bool,
    },
    /// (internal) Run a command inside a sandbox; started by the agent for `sandbox exec`.
    #[command(hide = true)]
    ExecIn {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// (internal) Hold a backup's freeze of a disk's filesystem; started by the agent. Thaws
    /// when stdin has a byte or reaches EOF (the agent died), or after --max-seconds (<= 600).
    #[command(hide = true)]
    FreezeHold {
        #[arg(long)]
        mount: PathBuf,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
        max_seconds: u64,
    },
    /// Deploy the app in DIR/.miren/app.toml: disks, addons, then its services.
    Deploy {
        /// The app's directory (holding .miren/app.toml).
        #[arg(short = 'C', long = "dir", default_value = ".")]
        dir: PathBuf,
        /// Forward a host port to a service: [SERVICE=][IP:]HOSTPORT:PORT (service `web` by
        /// default), e.g. web=8080:3000.
        #[arg(long, value_parser = parse_service_publish)]
        publish: Vec<ServicePublish>,
        #[arg(long)]
        json: bool,
    },
    /// Managed addons (PostgreSQL, MySQL, Valkey, Memcached, RabbitMQ) attached to apps.
    Addon {
        #[command(subcommand)]
        command: AddonCommand,
    },
    /// The environment an app's services get.
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// Deployed apps.
    App {
        #[command(subcommand)]
        command: AppCommand,
    },
    /// OCI images on this node.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Low-level commands for operators.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

/// The whole `miren` binary: parses the command line and runs it.
pub fn main() -> ExitCode {
    run(Cli::parse())
}

pub fn run(cli: Cli) -> ExitCode {
    let socket = cli.socket;
    let result = match cli.command {
        // The agent's own helpers run before any runtime or thread exists.
        Command::Supervise {
            state_dir,
            sandboxes_dir,
            private_mount,
            mount_template,
            factory,
        } => {
            return internal::supervise(
                state_dir.as_deref(),
                sandboxes_dir.as_deref(),
                &private_mount,
                mount_template.as_deref(),
                factory,
            )
        }
        Command::FreezeHold { mount, max_seconds } => {
            return internal::freeze_hold(&mount, max_seconds)
        }
        Command::ExecIn {
            state_dir,
            env,
            cmd,
        } => return internal::exec_in(&state_dir, &env, &cmd),
        Command::Agent(args) => agent::run(&args, socket).map(|()| 0),
        Command::Deploy { dir, publish, json } => run_client(&socket, |client| async move {
            apps::deploy(&client, &dir, publish, json).await
        }),
        Command::Addon { command } => run_client(&socket, |client| async move {
            addons::run(&client, command).await
        }),
        Command::Env { command } => {
            run_client(
                &socket,
                |client| async move { env::run(&client, command).await },
            )
        }
        Command::App { command } => run_client(&socket, |client| async move {
            apps::run(&client, command).await
        }),
        Command::Sandbox { command } => run_client(&socket, |client| async move {
            sandboxes::run(&client, command).await
        }),
        Command::Disk { command } => run_client(&socket, |client| async move {
            snapshot::run(&client, command).await.map(|()| 0)
        }),
        Command::Image { command } => run_client(&socket, |client| async move {
            images::run(&client, command).await.map(|()| 0)
        }),
        Command::Debug { command } => run_client(&socket, |client| async move {
            debug::run(&client, command).await.map(|()| 0)
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command on a runtime of its own; returns the process exit code.
fn run_client<F, Fut>(socket: &Path, f: F) -> Result<i32>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<i32>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(f(Client::new(socket)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory;

    use super::*;
    use crate::cli::disks::DiskCommand;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_contract() {
        let cli = Cli::try_parse_from([
            "miren",
            "debug",
            "disk",
            "lease",
            "-n",
            "d1",
            "--holder",
            "h",
            "--timeout",
            "30s",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Debug { command: DebugCommand::Disk { command: DiskCommand::Lease { timeout, .. } } }
                if timeout == Duration::from_secs(30)
        ));
        assert!(Cli::try_parse_from(["miren", "debug", "disk", "status"]).is_err());
        assert!(
            Cli::try_parse_from(["miren", "debug", "disk", "status", "-i", "x", "-n", "y"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "miren",
            "debug",
            "disk",
            "create",
            "-n",
            "a",
            "--size-gb",
            "-1"
        ])
        .is_err());
    }
}
