//! `miren image ...`: pull (with progress bars on a terminal), list, rm, import, gc.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Read};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Method;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::client::Client;
use crate::cli::{human_bytes, ImageCommand};
use crate::model::{ImageGcReport, ImageRemoved, ImageSummary, ImportImage, PullEvent, PullImage};

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
            let body = Full::new(Bytes::from(serde_json::to_vec(&req)?));
            let response = client
                .send(Method::POST, "/v1/images/pull", "application/json", body)
                .await?;
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
            let mut body = response.into_body();
            let mut pending = Vec::new();
            let mut result = None;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow!("the pull broke off: {e}"))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    match serde_json::from_slice::<PullEvent>(&line)? {
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
            }
            for bar in per_blob.values() {
                bar.finish_and_clear();
            }
            let image =
                result.ok_or_else(|| anyhow!("the agent ended the pull without a result"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&image)?);
            } else {
                print!("pulled ");
                print_summary(&image);
            }
            Ok(())
        }
        ImageCommand::List { json } => {
            let images: Vec<ImageSummary> = client.get("/v1/images").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
                return Ok(());
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
            Ok(())
        }
        ImageCommand::Rm { reference } => {
            let removed: ImageRemoved = client
                .call(
                    Method::DELETE,
                    &format!(
                        "/v1/images?reference={}",
                        crate::util::percent_encode(&reference)
                    ),
                    None::<&()>,
                )
                .await?;
            if removed.removed {
                println!("removed {}", removed.reference);
            } else {
                println!("{} was not on this node; nothing to do", removed.reference);
            }
            Ok(())
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
            let image: ImageSummary = client
                .call(Method::POST, "/v1/images/import", Some(&req))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&image)?);
            } else {
                print!("imported ");
                print_summary(&image);
            }
            Ok(())
        }
        ImageCommand::Gc => {
            let report: ImageGcReport = client
                .call(Method::POST, "/v1/images/gc", None::<&()>)
                .await?;
            println!(
                "removed {} blobs and {} layers, freed {}",
                report.blobs_removed,
                report.layers_removed,
                human_bytes(report.bytes_freed)
            );
            Ok(())
        }
    }
}
