//! `miren deploy` and `miren app ...`: deployed apps.

use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::addons::print_addons;
use crate::cli::client::Client;
use crate::cli::output::{print_json, print_table};
use crate::cli::source;
use crate::model::{App, BuildQuery, BuildResult, BuiltImage, DeployApp, ServicePublish};

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
    // Services without an image are built from the directory first. A file the agent would
    // refuse is sent as it is: its answer names every problem.
    let mut built = Vec::new();
    if let Ok(config) = miren_addons::parse_app_toml(&text, &path.display().to_string()) {
        built = build_services(client, dir, &config, as_json).await?;
    }
    let req = DeployApp {
        app_toml: text,
        source: Some(path.display().to_string()),
        publish,
        built,
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

/// Sends the source once per service that has no image and shows each build's steps.
async fn build_services(
    client: &Client,
    dir: &Path,
    config: &miren_addons::AppConfig,
    as_json: bool,
) -> Result<Vec<BuiltImage>> {
    let wanted: Vec<_> = config
        .services
        .iter()
        .filter_map(|s| match &s.image {
            miren_addons::ImageSource::Build { stack, base } => Some((s, *stack, base.clone())),
            miren_addons::ImageSource::Image(_) => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let dir = dir.to_path_buf();
    let mut packed = tokio::task::spawn_blocking(move || source::pack(&dir))
        .await
        .context("packing the source")??;
    let mut built = Vec::new();
    for (service, stack, base) in wanted {
        let spinner = (!as_json).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(format!(
                "building {} from source ({} files, {})",
                service.name,
                packed.files,
                source::human_bytes(packed.bytes)
            ));
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        packed
            .file
            .seek(SeekFrom::Start(0))
            .context("rewinding the source tar")?;
        let body = packed.file.try_clone().context("reading the source tar")?;
        let query = BuildQuery {
            app: config.name.clone(),
            service: service.name.clone(),
            stack: stack.map(|s| s.name().to_string()),
            base,
            command: service.command.as_ref().map(|c| c.raw.clone()),
        };
        let result = client.build_source(&query, body).await;
        if let Some(bar) = spinner {
            bar.finish_and_clear();
        }
        let result = result.with_context(|| format!("building services.{}", service.name))?;
        if !as_json {
            print_build(&result, packed.files, packed.bytes);
        }
        built.push(result.image);
    }
    Ok(built)
}

fn print_build(result: &BuildResult, files: u64, bytes: u64) {
    eprintln!(
        "built {} from source: stack {}, {files} files ({}){}",
        result.image.service,
        result.image.stack,
        source::human_bytes(bytes),
        if result.cached {
            ", unchanged: image reused"
        } else {
            ""
        }
    );
    for step in &result.steps {
        eprintln!(
            "  {:<13} {:<10} {:<10} {}",
            step.step,
            if step.cached { "cached" } else { "done" },
            step.bytes.map(source::human_bytes).unwrap_or_default(),
            step.detail
        );
    }
    eprintln!("  image         {}", result.image.image);
    eprintln!("  digest        {}", result.image.digest);
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
                s.health
                    .as_ref()
                    .map_or("-", |h| h.state.as_str())
                    .to_string(),
                s.image.clone(),
                s.built_from_source
                    .as_ref()
                    .map_or_else(|| "prebuilt".into(), |stack| format!("source ({stack})")),
                s.image_digest.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        &[
            "SERVICE", "SANDBOX", "STATE", "IP", "HEALTH", "IMAGE", "BUILT", "DIGEST",
        ],
        rows,
    );
    for s in &app.services {
        if let Some(h) = &s.health {
            match &h.last_failure {
                Some(failure) => println!(
                    "health of {}: {} ({} failed in a row): {failure}",
                    s.name, h.check, h.failures
                ),
                None => println!("health of {}: {}", s.name, h.check),
            }
        }
    }
    if !app.addons.is_empty() {
        println!();
        print_addons(&app.addons);
    }
    if !app.notes.is_empty() {
        println!();
        for note in &app.notes {
            println!("note: {note}");
        }
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
