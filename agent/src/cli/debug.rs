//! `miren debug ...`: low-level commands for operators.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::disks::{self, DiskCommand};
use crate::cli::network::{self, NetCommand};
use crate::cli::output::print_json;

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Disks: loop-backed, thin-provisioned volumes with exclusive leases.
    Disk {
        #[command(subcommand)]
        command: DiskCommand,
    },
    /// Network endpoints: a netns, a routed veth, an address.
    Net {
        #[command(subcommand)]
        command: NetCommand,
    },
    /// Show which agent answers on the socket.
    Info,
}

pub async fn run(client: &Client, command: DebugCommand) -> Result<()> {
    match command {
        DebugCommand::Info => print_json(&client.info().await?),
        DebugCommand::Disk { command } => disks::run(client, command).await,
        DebugCommand::Net { command } => network::run(client, command).await,
    }
}
