//! `miren debug net ...`: network endpoints (a netns, a routed veth, an address).

use anyhow::Result;
use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::output::{print_field, print_json, print_table};
use crate::cli::parse::parse_publish;
use crate::model::{CreateEndpoint, PublishPort};

#[derive(Subcommand, Debug)]
pub enum NetCommand {
    /// Create an endpoint and print it as JSON.
    Create {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        app: String,
        /// Other apps that may connect to this endpoint (comma-separated).
        #[arg(long, value_delimiter = ',')]
        allow_from: Vec<String>,
        /// Publish a TCP port on the host: HOSTPORT:PORT (127.0.0.1) or IP:HOSTPORT:PORT.
        #[arg(long, value_parser = parse_publish)]
        publish: Vec<PublishPort>,
    },
    /// List endpoints.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one endpoint.
    Status {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an endpoint and release its address.
    Delete {
        #[arg(long)]
        owner: String,
    },
    /// Run the reconciliation now and print what it released.
    Gc {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(client: &Client, command: NetCommand) -> Result<()> {
    match command {
        NetCommand::Create {
            owner,
            app,
            allow_from,
            publish,
        } => {
            let req = CreateEndpoint {
                owner,
                app,
                allow_from,
                publish,
            };
            print_json(&client.create_endpoint(&req).await?)
        }
        NetCommand::List { json } => {
            let endpoints = client.endpoints().await?;
            if json {
                return print_json(&endpoints);
            }
            let rows = endpoints
                .iter()
                .map(|e| {
                    let publish: Vec<String> = e
                        .publish
                        .iter()
                        .map(|p| {
                            format!(
                                "{}:{}->{}",
                                p.host_ip.as_deref().unwrap_or("127.0.0.1"),
                                p.host_port,
                                p.port
                            )
                        })
                        .collect();
                    vec![
                        e.owner.clone(),
                        e.app.clone(),
                        e.ip.clone(),
                        e.veth.clone(),
                        e.status.to_string(),
                        joined_or_dash(&e.allow_from),
                        joined_or_dash(&publish),
                    ]
                })
                .collect();
            print_table(
                &[
                    "OWNER",
                    "APP",
                    "IP",
                    "VETH",
                    "STATUS",
                    "ALLOW FROM",
                    "PUBLISH",
                ],
                rows,
            );
            Ok(())
        }
        NetCommand::Status { owner, json } => {
            let endpoint = client.endpoint(&owner).await?;
            if json {
                return print_json(&endpoint);
            }
            for (key, value) in [
                ("owner", &endpoint.owner),
                ("app", &endpoint.app),
                ("ip", &endpoint.ip),
                ("gateway", &endpoint.gateway),
                ("veth", &endpoint.veth),
                ("netns", &endpoint.netns_path),
                ("status", &endpoint.status.to_string()),
                ("allow from", &endpoint.allow_from.join(",")),
            ] {
                print_field(key, value);
            }
            Ok(())
        }
        NetCommand::Delete { owner } => {
            if client.delete_endpoint(&owner).await?.deleted {
                println!("deleted the endpoint of {owner}");
            } else {
                println!("{owner} had no endpoint; nothing to do");
            }
            Ok(())
        }
        NetCommand::Gc { json } => {
            let report = client.net_gc().await?;
            if json {
                return print_json(&report);
            }
            let show = |what: &str, items: &[String]| {
                if items.is_empty() {
                    println!("{what}: nothing");
                } else {
                    println!("{what}: {}", items.join(", "));
                }
            };
            show("released", &report.released);
            show("removed", &report.removed);
            show("repaired", &report.repaired);
            if !report.failed.is_empty() {
                show("failed", &report.failed);
            }
            Ok(())
        }
    }
}

fn joined_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}
