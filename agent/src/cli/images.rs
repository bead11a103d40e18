//! `miren image ...`: pull (with progress bars on a terminal), list, rm, import, gc.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::client::{Client, ClientError};
use crate::cli::output::{human_bytes, print_json};
use crate::model::{ImageSummary, ImportImage, PullEvent, PullImage};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image (through the agent's mirrors), verifying every digest.
    Pull {
        reference: String,
        #[arg(long)]
        username: Option<String>,
        /// Read the registry password from stdin.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        #[arg(long)]
        json: bool,
    },
    /// List images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (its blobs and layers go at the next gc).
    Rm { reference: String },
    /// Import an OCI image layout directory, an OCI archive, or a rootfs tarball.
    Import {
        reference: String,
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove blobs and unpacked layers no image uses.
    Gc,
}

fn print_summary(image: &ImageSummary) {
    println!(
        "{} {} ({} layers, {})",
        image.reference,
        image.manifest_digest,
        image.layers,
        human_bytes(image.size_bytes)
    );
}

pub async fn run(client: &Client, command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Pull {
            reference,
            username,
            password_stdin,
            json,
        } => {
            let password = if password_stdin {
                let mut password = String::new();
                io::stdin()
                    .read_to_string(&mut password)
                    .context("reading the password from stdin")?;
                Some(password.trim_end_matches(['\n', '\r']).to_string())
            } else {
                None
            };
            let req = PullImage {
                reference,
                username,
                password,
            };
            let image = pull(client, &req).await?;
            if json {
                print_json(&image)?;
            } else {
                print!("pulled ");
                print_summary(&image);
            }
        }
        ImageCommand::List { json } => {
            let images = client.images().await?;
            if json {
                return print_json(&images);
            }
            println!(
                "{:<50} {:<20} {:>7} {:>10}",
                "REFERENCE", "DIGEST", "LAYERS", "SIZE"
            );
            for image in images {
                let digest: String = image
                    .manifest_digest
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect();
                println!(
                    "{:<50} {:<20} {:>7} {:>10}",
                    image.reference,
                    digest,
                    image.layers,
                    human_bytes(image.size_bytes)
                );
            }
        }
        ImageCommand::Rm { reference } => {
            let removed = client.remove_image(&reference).await?;
            if removed.removed {
                println!("removed {}", removed.reference);
            } else {
                println!("{} was not on this node; nothing to do", removed.reference);
            }
        }
        ImageCommand::Import {
            reference,
            path,
            json,
        } => {
            let path = std::fs::canonicalize(&path)
                .with_context(|| format!("{} does not exist", path.display()))?;
            let req = ImportImage {
                reference,
                path: path.display().to_string(),
            };
            let image = client.import_image(&req).await?;
            if json {
                print_json(&image)?;
            } else {
                print!("imported ");
                print_summary(&image);
            }
        }
        ImageCommand::Gc => {
            let report = client.image_gc().await?;
            println!(
                "removed {} blobs and {} layers, freed {}",
                report.blobs_removed,
                report.layers_removed,
                human_bytes(report.bytes_freed)
            );
        }
    }
    Ok(())
}

/// Follows a pull's events, with a bar per blob on a terminal, to its image.
async fn pull(client: &Client, req: &PullImage) -> Result<ImageSummary> {
    let mut events = client.pull_image(req).await?;
    let bars = if io::stderr().is_terminal() {
        Some(MultiProgress::new())
    } else {
        None
    };
    let mut per_blob: HashMap<String, ProgressBar> = HashMap::new();
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut result = None;
    while let Some(event) = events.next_event().await {
        let event = match event {
            Ok(event) => event,
            Err(e @ ClientError::Stream(_)) => bail!("the pull broke off: {e}"),
            Err(e) => return Err(e.into()),
        };
        match event {
            PullEvent::Progress {
                digest,
                done,
                total,
            } => {
                if let Some(multi) = &bars {
                    let bar = per_blob.entry(digest.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(total));
                        bar.set_style(style.clone());
                        let short = digest.trim_start_matches("sha256:");
                        bar.set_message(short.chars().take(12).collect::<String>());
                        bar
                    });
                    bar.set_length(total);
                    bar.set_position(done);
                }
            }
            PullEvent::Image(image) => result = Some(image),
            PullEvent::Error(err) => bail!("{}", err.message),
        }
    }
    for bar in per_blob.values() {
        bar.finish_and_clear();
    }
    result.ok_or_else(|| anyhow!("the agent ended the pull without a result"))
}
