//! `miren deploy`, `miren addon ...`, `miren env ...` and `miren app ...`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use hyper::Method;

use crate::cli::client::Client;
use crate::cli::{print_table, AddonCommand, AppCommand, Command, EnvCommand};
use crate::model::{
    Addon, AddonCatalogEntry, AddonDestroyed, App, AppDeleted, CreateAddon, DeployApp, EnvVarView,
};
use crate::util::percent_encode;

fn json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_addons(addons: &[Addon]) {
    let rows = addons
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.variant.clone(),
                a.version.clone(),
                a.status.clone(),
                a.reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(&["NAME", "VARIANT", "VERSION", "STATUS", "REASON"], rows);
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

/// Asks on a terminal; scripts (no terminal) pass --yes or are not asked.
fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Returns the process exit code: 1 when an addon ends in `error` or a deploy fails.
pub async fn run(client: &Client, command: Command) -> Result<i32> {
    match command {
        Command::Deploy {
            dir,
            publish,
            json: as_json,
        } => {
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
            let app: App = client
                .call(
                    Method::POST,
                    "/v1/deploy",
                    Some(&DeployApp {
                        app_toml: text,
                        source: Some(path.display().to_string()),
                        publish,
                    }),
                )
                .await?;
            if as_json {
                json(&app)?;
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
        Command::Addon { command } => run_addon(client, command).await,
        Command::Env {
            command:
                EnvCommand::List {
                    app,
                    reveal,
                    json: as_json,
                },
        } => {
            let vars: Vec<EnvVarView> = client
                .get(&format!(
                    "/v1/apps/{}/env?reveal={reveal}",
                    percent_encode(&app)
                ))
                .await?;
            if as_json {
                let object: serde_json::Map<String, serde_json::Value> = vars
                    .into_iter()
                    .map(|v| (v.name, serde_json::Value::String(v.value)))
                    .collect();
                json(&object)?;
            } else if vars.is_empty() {
                println!("app `{app}` has no variables yet (addons inject theirs once active)");
            } else {
                let rows = vars
                    .into_iter()
                    .map(|v| {
                        vec![
                            v.name,
                            v.value,
                            if v.sensitive {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                            v.source,
                        ]
                    })
                    .collect();
                print_table(&["NAME", "VALUE", "SENSITIVE", "SOURCE"], rows);
            }
            Ok(0)
        }
        Command::App { command } => run_app(client, command).await,
        _ => Err(anyhow!("not an app command")),
    }
}

async fn run_addon(client: &Client, command: AddonCommand) -> Result<i32> {
    match command {
        AddonCommand::ListAvailable { json: as_json } => {
            let catalog: Vec<AddonCatalogEntry> = client.get("/v1/addons/catalog").await?;
            if as_json {
                json(&catalog)?;
                return Ok(0);
            }
            let rows = catalog
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        a.description.clone(),
                        a.variants
                            .iter()
                            .map(|v| v.name.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                        format!("{} (default {})", a.versions.join(", "), a.default_version),
                    ]
                })
                .collect();
            print_table(&["NAME", "DESCRIPTION", "VARIANTS", "VERSIONS"], rows);
            Ok(0)
        }
        AddonCommand::Variants {
            addon,
            json: as_json,
        } => {
            let catalog: Vec<AddonCatalogEntry> = client.get("/v1/addons/catalog").await?;
            let Some(entry) = catalog.into_iter().find(|a| a.name == addon) else {
                let names: Vec<String> = client
                    .get::<Vec<AddonCatalogEntry>>("/v1/addons/catalog")
                    .await?
                    .into_iter()
                    .map(|a| a.name)
                    .collect();
                bail!(
                    "unknown addon `{addon}`; available addons: {}",
                    names.join(", ")
                );
            };
            if as_json {
                json(&entry.variants)?;
                return Ok(0);
            }
            let rows = entry
                .variants
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.description.clone(),
                        if v.default { "yes".into() } else { "".into() },
                        format!("{} GiB {}", v.disk_size_gb, v.disk_filesystem),
                        format!("PostgreSQL {}", entry.default_version),
                    ]
                })
                .collect();
            print_table(
                &["VARIANT", "DESCRIPTION", "DEFAULT", "DISK", "VERSION"],
                rows,
            );
            Ok(0)
        }
        AddonCommand::Create {
            addon,
            app,
            version,
            no_wait,
            json: as_json,
        } => {
            let started = Instant::now();
            let created: Addon = client
                .call(
                    Method::POST,
                    "/v1/addons",
                    Some(&CreateAddon {
                        app: app.clone(),
                        addon,
                        variant: None,
                        version,
                        wait: !no_wait,
                    }),
                )
                .await?;
            if as_json {
                json(&created)?;
            } else if created.status == "error" {
                eprintln!(
                    "error: {} for app `{app}` failed: {}",
                    created.name,
                    created.reason.as_deref().unwrap_or("no reason recorded")
                );
                eprintln!(
                    "what it made was removed; fix the cause and run the create again, or `miren addon destroy {} -a {app}`",
                    created.name
                );
            } else if no_wait {
                println!(
                    "{}:{} ({}) for app `{app}`: {}; `miren addon list -a {app}` shows when it is active; a running app is restarted with its variables then",
                    created.name, created.variant, created.version, created.status
                );
            } else {
                println!(
                    "{}:{} ({}) for app `{app}`: {} in {:.2}s",
                    created.name,
                    created.variant,
                    created.version,
                    created.status,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(if created.status == "error" { 1 } else { 0 })
        }
        AddonCommand::List { app, json: as_json } => {
            let addons: Vec<Addon> = client
                .get(&format!("/v1/apps/{}/addons", percent_encode(&app)))
                .await?;
            if as_json {
                json(&addons)?;
            } else if addons.is_empty() {
                println!("app `{app}` has no addons");
            } else {
                print_addons(&addons);
            }
            Ok(0)
        }
        AddonCommand::Destroy {
            addon,
            app,
            yes,
            json: as_json,
        } => {
            if !yes
                && !confirm(&format!(
                    "Destroy {addon} of app `{app}`? Its database and all its data are deleted; this cannot be undone."
                ))?
            {
                eprintln!("nothing was destroyed");
                return Ok(1);
            }
            let destroyed: AddonDestroyed = client
                .call::<(), _>(
                    Method::DELETE,
                    &format!(
                        "/v1/apps/{}/addons/{}",
                        percent_encode(&app),
                        percent_encode(&addon)
                    ),
                    None,
                )
                .await?;
            if as_json {
                json(&destroyed)?;
            } else if destroyed.deleted {
                println!("{} of app `{app}`: deleted", destroyed.name);
            } else {
                println!("app `{app}` has no {} addon; nothing to do", destroyed.name);
            }
            Ok(0)
        }
    }
}

async fn run_app(client: &Client, command: AppCommand) -> Result<i32> {
    match command {
        AppCommand::List { json: as_json } => {
            let apps: Vec<App> = client.get("/v1/apps").await?;
            if as_json {
                json(&apps)?;
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
                        a.status.clone(),
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
            let app: App = client
                .get(&format!("/v1/apps/{}", percent_encode(&app)))
                .await?;
            if as_json {
                json(&app)?;
            } else {
                print_app(&app);
            }
            Ok(0)
        }
        AppCommand::Restart { app } => {
            let app: App = client
                .call::<(), _>(
                    Method::POST,
                    &format!("/v1/apps/{}/restart", percent_encode(&app)),
                    None,
                )
                .await?;
            print_app(&app);
            Ok(0)
        }
        AppCommand::Delete { app } => {
            let deleted: AppDeleted = client
                .call::<(), _>(
                    Method::DELETE,
                    &format!("/v1/apps/{}", percent_encode(&app)),
                    None,
                )
                .await?;
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
