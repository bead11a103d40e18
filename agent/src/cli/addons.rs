//! `miren addon ...`: managed addons (PostgreSQL, MySQL, Valkey, Memcached, RabbitMQ) attached to apps.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::output::{print_json, print_table};
use crate::core::status::AddonStatus;
use crate::model::{Addon, CreateAddon, CredentialKind, RotateAddon, UpdateAddon};

/// `--credential`, as clap parses it.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum CredentialArg {
    User,
    Root,
}

impl From<CredentialArg> for CredentialKind {
    fn from(arg: CredentialArg) -> Self {
        match arg {
            CredentialArg::User => CredentialKind::User,
            CredentialArg::Root => CredentialKind::Root,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum AddonCommand {
    /// The addons this node offers.
    ListAvailable {
        #[arg(long)]
        json: bool,
    },
    /// An addon's variants and their defaults.
    Variants {
        addon: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach an addon to an app and wait until it is active: ADDON[:VARIANT], e.g.
    /// miren-postgresql:shared.
    Create {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        /// A version from the catalogue (e.g. 16, mariadb-11), or a full image reference.
        #[arg(long)]
        version: Option<String>,
        /// PostgreSQL: what DATABASE_URL points at: transaction (the pooler, default on
        /// shared), session (the session pooler) or none (the server, default on small).
        #[arg(long, value_parser = ["transaction", "session", "none"])]
        pooling: Option<String>,
        /// PostgreSQL: small (default; 1 GB, 100 pooled clients, 512 MB), medium (10 GB,
        /// 200, 2 GB) or large (100 GB, 500, 8 GB).
        #[arg(long, value_parser = ["small", "medium", "large"])]
        tier: Option<String>,
        /// PostgreSQL: the app's pooled client connections (1-2000) instead of its tier's;
        /// its pooler refuses the next one.
        #[arg(long, value_name = "N")]
        client_connections: Option<u32>,
        /// Return once recorded instead of waiting for `active`.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Change an addon in place and wait until it is applied: its tier or its pooled client
    /// connections (PostgreSQL). The disk grows online and is never shrunk; the output says
    /// whether the server restarted.
    Update {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long, value_parser = ["small", "medium", "large"], required_unless_present = "client_connections")]
        tier: Option<String>,
        /// The app's pooled client connections (1-2000) instead of its tier's; applied live,
        /// no client is dropped.
        #[arg(long, value_name = "N")]
        client_connections: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// One addon of an app: status, server, pooling, tier, disk use and growth, and (for
    /// PostgreSQL) how far its continuous archive is behind.
    Status {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// An app's addons and their status.
    List {
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// New credentials for an app's addon: the server accepts a second login, the app's
    /// services restart with it, then the previous login stops working.
    Rotate {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        /// `user`: the app's login; `root`: the server's administrator.
        #[arg(long, value_enum, default_value = "user")]
        credential: CredentialArg,
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL: the restorable window (earliest and latest point), base backups, archive
    /// lag, and where the backups are.
    Backups {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL: restore the app's database to a point in time (a new disk, swapped in once
    /// recovery reached the point; the old disk is kept until --discard-previous).
    Restore {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        /// RFC 3339 UTC time, e.g. 2026-12-01T23:59:59Z.
        #[arg(long, conflicts_with_all = ["latest", "discard_previous"])]
        to_time: Option<String>,
        /// Everything archived (the server's WAL is switched and shipped first).
        #[arg(long, conflicts_with = "discard_previous")]
        latest: bool,
        /// Delete the disk kept from before the last restore.
        #[arg(long)]
        discard_previous: bool,
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL: a copy of the app's database at a point in time (default: the latest
    /// archived) as a new dedicated addon of another app.
    Fork {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        to_app: String,
        /// RFC 3339 UTC time, e.g. 2026-12-01T23:59:59Z.
        #[arg(long)]
        to_time: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove an addon and DELETE ITS DATA (asks on a terminal unless --yes).
    Destroy {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn print_addons(addons: &[Addon]) {
    // The archive column only where some addon has an archive (PostgreSQL).
    let archived = addons.iter().any(|a| a.archive.is_some());
    let rows = addons
        .iter()
        .map(|a| {
            let mut row = vec![
                a.name.clone(),
                a.variant.clone(),
                a.tier.clone().unwrap_or_else(|| "-".into()),
                a.version.clone(),
                a.status.to_string(),
                match (a.disk_size_gb, a.disk_used_bytes) {
                    (Some(size), Some(used)) => {
                        format!("{:.2}/{size} GiB", used as f64 / (1u64 << 30) as f64)
                    }
                    _ => "-".into(),
                },
                a.reason.clone().unwrap_or_else(|| "-".into()),
            ];
            if !archived {
                return row;
            }
            row.push(match &a.archive {
                None => "-".into(),
                Some(lag) if lag.last_error.is_some() => {
                    format!("{} waiting, shipping fails", lag.pending_segments)
                }
                Some(lag) => match lag.oldest_pending_seconds {
                    Some(age) => format!("{} waiting, oldest {age}s", lag.pending_segments),
                    None => "shipped".into(),
                },
            });
            row
        })
        .collect();
    let headers: &[&str] = if archived {
        &[
            "NAME", "VARIANT", "TIER", "VERSION", "STATUS", "DISK", "REASON", "ARCHIVE",
        ]
    } else {
        &[
            "NAME", "VARIANT", "TIER", "VERSION", "STATUS", "DISK", "REASON",
        ]
    };
    print_table(headers, rows);
    for a in addons {
        if let Some(growth) = &a.last_growth {
            println!("{}: {growth}", a.name);
        }
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

/// Returns the process exit code: 1 when an addon ends in `error` or a destroy is declined.
pub async fn run(client: &Client, command: AddonCommand) -> Result<i32> {
    match command {
        AddonCommand::ListAvailable { json: as_json } => {
            let catalog = client.addon_catalog().await?;
            if as_json {
                print_json(&catalog)?;
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
            let catalog = client.addon_catalog().await?;
            let names: Vec<String> = catalog.iter().map(|a| a.name.clone()).collect();
            let Some(entry) = catalog.into_iter().find(|a| a.name == addon) else {
                bail!(
                    "unknown addon `{addon}`; available addons: {}",
                    names.join(", ")
                );
            };
            if as_json {
                print_json(&entry.variants)?;
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
                        match (v.disk_size_gb, &v.disk_filesystem) {
                            (Some(size), Some(fs)) => format!("{size} GiB {fs}"),
                            (Some(size), None) => format!("{size} GiB"),
                            _ => "none".into(),
                        },
                        format!("{} (default)", entry.default_version),
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
            pooling,
            tier,
            client_connections,
            no_wait,
            json: as_json,
        } => {
            let started = Instant::now();
            let req = CreateAddon {
                app: app.clone(),
                addon,
                variant: None,
                version,
                pooling,
                tier,
                client_connections,
                wait: !no_wait,
            };
            let created = client.create_addon(&req).await?;
            if as_json {
                print_json(&created)?;
            } else if created.status == AddonStatus::Error {
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
            Ok(if created.status == AddonStatus::Error {
                1
            } else {
                0
            })
        }
        AddonCommand::Update {
            addon,
            app,
            tier,
            client_connections,
            json: as_json,
        } => {
            let started = Instant::now();
            let req = UpdateAddon {
                tier,
                client_connections,
            };
            let updated = client.update_addon(&app, &addon, &req).await?;
            if as_json {
                print_json(&updated)?;
            } else {
                println!(
                    "{} of app `{app}`: {} ({:.2}s)",
                    updated.addon.name,
                    if updated.restarted {
                        "applied with a server restart"
                    } else {
                        "applied without a server restart"
                    },
                    started.elapsed().as_secs_f64()
                );
                for change in &updated.changes {
                    println!("  {change}");
                }
            }
            Ok(0)
        }
        AddonCommand::Status {
            addon,
            app,
            json: as_json,
        } => {
            let addon = client.app_addon(&app, &addon).await?;
            if as_json {
                print_json(&addon)?;
            } else {
                print_addon_status(&addon);
            }
            Ok(0)
        }
        AddonCommand::List { app, json: as_json } => {
            let addons = client.app_addons(&app).await?;
            if as_json {
                print_json(&addons)?;
            } else if addons.is_empty() {
                println!("app `{app}` has no addons");
            } else {
                print_addons(&addons);
            }
            Ok(0)
        }
        AddonCommand::Rotate {
            addon,
            app,
            credential,
            json: as_json,
        } => {
            let started = Instant::now();
            let req = RotateAddon {
                credential: credential.into(),
            };
            let rotated = client.rotate_addon(&app, &addon, &req).await?;
            if as_json {
                print_json(&rotated)?;
            } else {
                if rotated.resumed {
                    println!("finished the rotation begun earlier");
                }
                println!(
                    "{} of app `{app}`: the app's services now log in as `{}`; `{}` can no longer log in ({:.2}s)",
                    rotated.name,
                    rotated.user,
                    rotated.previous_user,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(0)
        }
        AddonCommand::Backups {
            addon,
            app,
            json: as_json,
        } => {
            let b = client.addon_backups(&app, &addon).await?;
            if as_json {
                print_json(&b)?;
                return Ok(0);
            }
            let place = if b.off_node {
                "off this node"
            } else {
                "ON THIS NODE: they are lost with it; add an off-node target with `miren agent --backup-target NAME=s3://...`"
            };
            println!("target:   {} ({}), {place}", b.target, b.target_location);
            println!("archive:  postgres/{}", b.server);
            match (&b.earliest, &b.latest) {
                (Some(e), Some(l)) => println!("window:   {e} .. {l}"),
                _ => println!("window:   none yet (no base backup)"),
            }
            let lag = &b.archive;
            println!(
                "lag:      {} WAL file(s) waiting ({} bytes){}{}",
                lag.pending_segments,
                lag.pending_bytes,
                lag.oldest_pending_seconds
                    .map(|s| format!(", oldest {s}s"))
                    .unwrap_or_default(),
                lag.last_shipped
                    .as_ref()
                    .map(|s| format!(
                        "; last shipped {s} at {}",
                        lag.last_shipped_at.as_deref().unwrap_or("?")
                    ))
                    .unwrap_or_default()
            );
            if let Some(err) = &b.target_error {
                println!("target:   UNREADABLE: {err}");
            }
            if let Some(err) = &lag.last_error {
                println!("shipping: FAILING: {err}");
            }
            if let Some(previous) = &b.previous_disk {
                println!("kept:     disk `{previous}` from before the last restore");
            }
            if let Some(previous) = &b.previous_database {
                println!("kept:     database `{previous}` from before the last restore");
            }
            let rows = b
                .base_backups
                .iter()
                .map(|x| {
                    vec![
                        x.label.clone(),
                        x.finished_at.clone(),
                        x.timeline.to_string(),
                        x.size_bytes.to_string(),
                        x.data_bytes.to_string(),
                    ]
                })
                .collect();
            print_table(
                &["BASE BACKUP", "RESTORES FROM", "TIMELINE", "SIZE", "DATA"],
                rows,
            );
            Ok(0)
        }
        AddonCommand::Restore {
            addon,
            app,
            to_time,
            latest,
            discard_previous,
            yes,
            json: as_json,
        } => {
            if !discard_previous
                && !yes
                && !confirm(&format!(
                    "Restore {addon} of app `{app}` to {}? Changes after that point are no longer the app's (the current disk is kept).",
                    to_time.as_deref().unwrap_or("the latest archived point")
                ))?
            {
                eprintln!("nothing was restored");
                return Ok(1);
            }
            let req = crate::model::RestoreAddon {
                to_time,
                latest,
                discard_previous,
                to_app: None,
            };
            let started = Instant::now();
            let r = client.restore_addon(&app, &addon, &req).await?;
            if as_json {
                print_json(&r)?;
            } else if discard_previous {
                match (&r.previous_disk, &r.previous_database) {
                    (Some(d), _) => println!(
                        "{} of app `{app}`: deleted disk `{d}` kept from before the last restore",
                        r.name
                    ),
                    (None, Some(d)) => println!(
                        "{} of app `{app}`: dropped database `{d}` kept from before the last restore",
                        r.name
                    ),
                    (None, None) => {
                        println!("{} of app `{app}`: nothing was kept; nothing to do", r.name)
                    }
                }
            } else {
                println!(
                    "{} of app `{app}`: restored to {} from base backup {} in {:.1}s; the server runs on disk `{}`",
                    r.name,
                    r.restored_to,
                    r.base_backup,
                    started.elapsed().as_secs_f64(),
                    r.disk
                );
                if let Some(d) = &r.previous_disk {
                    println!("the previous disk `{d}` is kept; delete it with `miren addon restore {addon} -a {app} --discard-previous`");
                }
                if let Some(d) = &r.previous_database {
                    println!("the app's database from before is kept on the shared server as `{d}`; drop it with `miren addon restore {addon} -a {app} --discard-previous`");
                }
            }
            Ok(0)
        }
        AddonCommand::Fork {
            addon,
            app,
            to_app,
            to_time,
            json: as_json,
        } => {
            let req = crate::model::RestoreAddon {
                latest: to_time.is_none(),
                to_time,
                discard_previous: false,
                to_app: Some(to_app.clone()),
            };
            let started = Instant::now();
            let r = client.restore_addon(&app, &addon, &req).await?;
            if as_json {
                print_json(&r)?;
            } else {
                println!(
                    "{} of app `{to_app}`: a copy of app `{app}`'s at {} (base backup {}) in {:.1}s",
                    r.name,
                    r.restored_to,
                    r.base_backup,
                    started.elapsed().as_secs_f64()
                );
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
            let destroyed = client.destroy_addon(&app, &addon).await?;
            if as_json {
                print_json(&destroyed)?;
            } else if destroyed.deleted {
                println!("{} of app `{app}`: deleted", destroyed.name);
            } else {
                println!("app `{app}` has no {} addon; nothing to do", destroyed.name);
            }
            Ok(0)
        }
    }
}

/// `miren addon status`: one line per fact, only the facts this addon has.
fn print_addon_status(a: &crate::model::Addon) {
    use crate::cli::output::human_bytes;
    let line = |key: &str, value: &str| println!("{key:<10} {value}");
    line("addon", &format!("{} of app {}", a.name, a.app));
    line("status", &a.status.to_string());
    if let Some(reason) = &a.reason {
        line("reason", reason);
    }
    line("variant", &a.variant);
    line("version", &format!("{} ({})", a.version, a.image));
    line("server", &a.server);
    if let Some(tier) = &a.tier {
        line("tier", tier);
    }
    if let Some(pooling) = &a.pooling {
        let pooler = a.pooler.as_deref().unwrap_or("-");
        line("pooling", &format!("{pooling} (pooler {pooler})"));
    }
    if let (Some(size), Some(used)) = (a.disk_size_gb, a.disk_used_bytes) {
        line("disk", &format!("{} used of {size} GiB", human_bytes(used)));
    }
    if let Some(growth) = &a.last_growth {
        line("grown", growth);
    }
    if let Some(lag) = &a.archive {
        let state = match (&lag.last_error, lag.oldest_pending_seconds) {
            (Some(error), _) => format!(
                "{} segments ({}) waiting; shipping fails: {error}",
                lag.pending_segments,
                human_bytes(lag.pending_bytes)
            ),
            (None, Some(age)) => format!(
                "{} segments ({}) waiting, oldest {age} s",
                lag.pending_segments,
                human_bytes(lag.pending_bytes)
            ),
            (None, None) => "everything shipped".to_string(),
        };
        line("archive", &state);
        if let (Some(last), Some(at)) = (&lag.last_shipped, &lag.last_shipped_at) {
            line("shipped", &format!("{last} at {at}"));
        }
    }
    line("created", &a.created_at);
}
