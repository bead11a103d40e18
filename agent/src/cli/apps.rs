//! `miren deploy` and `miren app ...`: deployed apps.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::cli::addons::print_addons;
use crate::cli::client::Client;
use crate::cli::output::{print_json, print_table};
use crate::model::{App, DeployApp, ServicePublish};

#[derive(Subcommand, Debug)]
pub enum AppCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Status {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Recreate the app's services (with the addons' current variables).
    Restart { app: String },
    /// Remove the app's services; its disks and addons (and their data) stay.
    Delete { app: String },
}

/// Deploys DIR/.miren/app.toml; returns the process exit code.
pub async fn deploy(
    client: &Client,
    dir: &Path,
    publish: Vec<ServicePublish>,
    as_json: bool,
) -> Result<i32> {
    let path = dir.join(".miren").join("app.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: run `miren deploy` in the app's directory or pass -C DIR",
            path.display()
        )
    })?;
    let started = Instant::now();
    if !as_json {
        eprintln!("deploying {} ...", path.display());
    }
    let req = DeployApp {
        app_toml: text,
        source: Some(path.display().to_string()),
        publish,
    };
    let app = client.deploy(&req).await?;
    if as_json {
        print_json(&app)?;
    } else {
        print_app(&app);
        println!();
        println!(
            "deployed {} in {:.1}s",
            app.name,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

fn print_app(app: &App) {
    println!("app:      {}", app.name);
    println!("status:   {}", app.status);
    if let Some(reason) = &app.reason {
        println!("reason:   {reason}");
    }
    println!("updated:  {}", app.updated_at);
    println!();
    let rows = app
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.sandbox.clone(),
                s.state
                    .map_or_else(|| "not started".into(), |state| state.to_string()),
                s.ip.clone().unwrap_or_else(|| "-".into()),
                s.image.clone(),
            ]
        })
        .collect();
    print_table(&["SERVICE", "SANDBOX", "STATE", "IP", "IMAGE"], rows);
    if !app.addons.is_empty() {
        println!();
        print_addons(&app.addons);
    }
}

pub async fn run(client: &Client, command: AppCommand) -> Result<i32> {
    match command {
        AppCommand::List { json: as_json } => {
            let apps = client.apps().await?;
            if as_json {
                print_json(&apps)?;
                return Ok(0);
            }
            let rows = apps
                .iter()
                .map(|a| {
                    let running = a
                        .services
                        .iter()
                        .filter(|s| s.state.is_some_and(|state| state.is_running()))
                        .count();
                    vec![
                        a.name.clone(),
                        a.status.to_string(),
                        format!("{running}/{} running", a.services.len()),
                        a.addons
                            .iter()
                            .map(|x| format!("{}:{} ({})", x.name, x.variant, x.status))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                })
                .collect();
            print_table(&["NAME", "STATUS", "SERVICES", "ADDONS"], rows);
            Ok(0)
        }
        AppCommand::Status { app, json: as_json } => {
            let app = client.app(&app).await?;
            if as_json {
                print_json(&app)?;
            } else {
                print_app(&app);
            }
            Ok(0)
        }
        AppCommand::Restart { app } => {
            let app = client.restart_app(&app).await?;
            print_app(&app);
            Ok(0)
        }
        AppCommand::Delete { app } => {
            let deleted = client.delete_app(&app).await?;
            println!(
                "app `{}` deleted ({} sandbox(es) removed)",
                deleted.name,
                deleted.sandboxes.len()
            );
            if !deleted.disks_kept.is_empty() {
                println!("disks kept: {}", deleted.disks_kept.join(", "));
            }
            for addon in &deleted.addons_kept {
                println!(
                    "addon kept with its data: {addon} (remove it with `miren addon destroy {addon} -a {}`)",
                    deleted.name
                );
            }
            Ok(0)
        }
    }
}
