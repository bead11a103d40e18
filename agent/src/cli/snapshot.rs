//! `miren disk backup | restore | verify`: run on the node. The agent captures and compresses
//! (it owns the disks and always thaws what it froze); the CLI moves bytes between the socket
//! and files or pipes, shows progress on a terminal, and never leaves a file under the final
//! name unless it is complete and synced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use miren_snapshot::{printable, SnapshotReader, StreamObserver};
use serde::Serialize;

use crate::cli::client::Client;
use crate::cli::output::human_bytes;
use crate::model::{BackupEvent, BackupToTarget, RestoreResult};

#[derive(Subcommand, Debug)]
pub enum DiskBackupCommand {
    /// Write a consistent, compressed, checksummed snapshot of a disk.
    Backup {
        #[arg(short = 'n', long = "name")]
        name: String,
        /// Output file or directory; `-` for stdout; or `s3://TARGET/KEY` for a backup target
        /// of the agent (`miren agent --backup-target`; a KEY ending in `/`, or none, gets the
        /// dated name). Default: NAME-YYYYMMDD-HHMMSS.miren.zst here.
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Recreate a disk from a snapshot (verified completely before anything changes).
    Restore {
        /// Snapshot file; `-` for stdin; or `s3://TARGET/KEY` in a backup target of the agent.
        #[arg(short = 's', long = "snapshot")]
        snapshot: String,
        /// Restore under this name instead of the one recorded in the snapshot.
        #[arg(short = 'n', long = "name")]
        name: Option<String>,
        /// Replace the contents of an existing disk (refused while it is leased).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check a whole snapshot (structure and every checksum) without restoring it.
    Verify {
        #[arg(short = 's', long = "snapshot")]
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(client: &Client, command: DiskBackupCommand) -> Result<()> {
    match command {
        DiskBackupCommand::Backup { name, output, json } => {
            backup(client, &name, output.as_deref(), json).await
        }
        DiskBackupCommand::Restore {
            snapshot,
            name,
            force,
            json,
        } => restore(client, &snapshot, name.as_deref(), force, json).await,
        DiskBackupCommand::Verify { snapshot, json } => verify(&snapshot, json),
    }
}

fn progress_bar(total: Option<u64>, what: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_string());
    bar
}

/// Default file name: NAME-YYYYMMDD-HHMMSS.miren.zst, in UTC.
pub fn default_file_name(disk: &str, at: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(at).to_string(); // 2026-03-24T12:00:00Z
    let digits: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
    format!("{disk}-{}-{}.miren.zst", &digits[..8], &digits[8..14])
}

#[derive(Serialize)]
struct BackupSummary {
    file: String,
    disk: String,
    size_bytes: u64,
    data_bytes: u64,
    snapshot_bytes: u64,
    image_checksum: String,
    freeze_seconds: Option<f64>,
}

/// Removes a partial output on drop unless it was completed.
struct PartialFile {
    path: PathBuf,
    done: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `s3://TARGET/KEY`: a key in one of the agent's backup targets (whatever the target's kind).
#[derive(Debug, PartialEq, Eq)]
struct TargetKey {
    target: String,
    key: String,
}

fn target_key(arg: &str) -> Option<TargetKey> {
    let rest = arg.strip_prefix("s3://")?;
    let (target, key) = rest.split_once('/').unwrap_or((rest, ""));
    Some(TargetKey {
        target: target.to_string(),
        key: key.to_string(),
    })
}

pub async fn backup(client: &Client, disk: &str, output: Option<&str>, json: bool) -> Result<()> {
    miren_disks::validate_name(disk)?;
    if let Some(mut to) = output.and_then(target_key) {
        if to.key.is_empty() || to.key.ends_with('/') {
            to.key.push_str(&default_file_name(disk, SystemTime::now()));
        }
        return backup_to_target(client, disk, to, json).await;
    }
    let to_stdout = output == Some("-");
    let final_path = match output {
        Some("-") => None,
        Some(path) if Path::new(path).is_dir() => {
            Some(Path::new(path).join(default_file_name(disk, SystemTime::now())))
        }
        Some(path) => Some(PathBuf::from(path)),
        None => Some(PathBuf::from(default_file_name(disk, SystemTime::now()))),
    };
    let mut backup = client.backup_disk(disk).await?;
    let freeze_seconds = backup.freeze_seconds;
    let data_total = backup.data_bytes;
    let size_bytes = backup.size_bytes.unwrap_or(0);

    let (mut sink, partial): (Box<dyn Write>, Option<PartialFile>) = match &final_path {
        None => (Box::new(io::stdout().lock()), None),
        Some(path) => {
            let partial = partial_name(path);
            // 0600 from the first byte: a backup holds a whole disk's data.
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            (
                Box::new(file),
                Some(PartialFile {
                    path: partial,
                    done: false,
                }),
            )
        }
    };
    let bar = progress_bar(data_total, &format!("backing up {disk}"));
    let mut observer = StreamObserver::new();
    let mut written = 0u64;
    let copy = async {
        while let Some(chunk) = backup.snapshot.chunk().await {
            let data = chunk.map_err(|e| anyhow!("the backup stream broke off: {e}"))?;
            sink.write_all(&data).context("writing the snapshot")?;
            observer.feed(&data);
            written += data.len() as u64;
            bar.set_position(observer.data_bytes());
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        result = copy => result?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; no snapshot was written"),
    }
    bar.finish_and_clear();
    let trailer = observer.trailer().cloned().ok_or_else(|| {
        anyhow!("the agent ended the backup stream early; no snapshot was written")
    })?;
    sink.flush().context("writing the snapshot")?;
    drop(sink);
    if let (Some(path), Some(mut partial)) = (&final_path, partial) {
        File::open(&partial.path)
            .and_then(|f| f.sync_all())
            .context("syncing the snapshot")?;
        fs::rename(&partial.path, path)
            .with_context(|| format!("moving the snapshot to {}", path.display()))?;
        partial.done = true;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
    }
    let summary = BackupSummary {
        file: final_path
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string()),
        disk: disk.to_string(),
        size_bytes,
        data_bytes: trailer.data_bytes,
        snapshot_bytes: written,
        image_checksum: trailer.image_checksum.clone(),
        freeze_seconds,
    };
    // With the snapshot on stdout, everything else goes to stderr.
    let mut report: Box<dyn Write> = if to_stdout {
        Box::new(io::stderr())
    } else {
        Box::new(io::stdout())
    };
    if json {
        writeln!(report, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(report, "{}", summary.file)?;
        writeln!(
            report,
            "disk {}: {} image, {} of data, {} snapshot",
            disk,
            human_bytes(size_bytes),
            human_bytes(trailer.data_bytes),
            human_bytes(written)
        )?;
        writeln!(report, "checksum blake3:{}", trailer.image_checksum)?;
        match freeze_seconds {
            Some(s) => writeln!(report, "filesystem frozen for {s:.3} s")?,
            None => writeln!(report, "not mounted writable: no freeze needed")?,
        }
    }
    Ok(())
}

async fn backup_to_target(client: &Client, disk: &str, to: TargetKey, json: bool) -> Result<()> {
    let req = BackupToTarget {
        target: Some(to.target.clone()),
        key: to.key.clone(),
    };
    let mut events = client.backup_disk_to_target(disk, &req).await?;
    let bar = progress_bar(None, &format!("backing up {disk} to {}", to.target));
    let stored = loop {
        let event = tokio::select! {
            event = events.next_event() => event,
            _ = tokio::signal::ctrl_c() => bail!(
                "interrupted; the agent finishes the upload on its own (or stores nothing): \
                 check with `miren disk restore -s s3://{}/{}` later",
                to.target, to.key
            ),
        };
        match event {
            Some(Ok(BackupEvent::Progress { done, total })) => {
                if bar.length().is_none() && total > 0 {
                    bar.set_length(total);
                }
                bar.set_position(done);
            }
            Some(Ok(BackupEvent::Stored(stored))) => break stored,
            Some(Ok(BackupEvent::Error(err))) => {
                bar.finish_and_clear();
                bail!("{} (nothing was stored under {})", err.message, to.key)
            }
            Some(Err(e)) => return Err(e.into()),
            None => bail!(
                "the agent ended the backup early; nothing was stored under {}",
                to.key
            ),
        }
    };
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&stored)?);
        return Ok(());
    }
    println!("s3://{}/{}", stored.target, stored.key);
    println!(
        "disk {}: {} image, {} of data, {} snapshot, in {}",
        stored.disk,
        human_bytes(stored.size_bytes),
        human_bytes(stored.data_bytes),
        human_bytes(stored.snapshot_bytes),
        stored.location
    );
    println!("checksum blake3:{}", stored.image_checksum);
    match stored.freeze_seconds {
        Some(s) => println!("filesystem frozen for {s:.3} s"),
        None => println!("not mounted writable: no freeze needed"),
    }
    if !stored.off_node {
        println!(
            "note: target `{}` is a directory on this node: the backup does not survive the loss of the node",
            stored.target
        );
    }
    Ok(())
}

fn partial_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn open_input(source: &str) -> Result<(Box<dyn Read + Send>, Option<u64>)> {
    if source == "-" {
        return Ok((Box::new(io::stdin()), None));
    }
    let file = File::open(source).with_context(|| format!("opening {source}"))?;
    let len = file.metadata().ok().map(|m| m.len());
    Ok((Box::new(file), len))
}

pub async fn restore(
    client: &Client,
    source: &str,
    name: Option<&str>,
    force: bool,
    json: bool,
) -> Result<()> {
    if let Some(name) = name {
        miren_disks::validate_name(name)?;
    }
    if let Some(from) = target_key(source) {
        if from.key.is_empty() {
            bail!("`{source}` names no backup: use s3://TARGET/KEY");
        }
        let bar = progress_bar(None, &format!("restoring from {}", from.target));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        let request = client.restore_disk_from_target(name, force, &from.target, &from.key);
        let result = tokio::select! {
            result = request => result?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; the agent finishes or discards the restore on its own, and changes nothing unless the whole backup checked out"),
        };
        bar.finish_and_clear();
        return print_restored(&result, source, json);
    }
    let (input, len) = open_input(source)?;
    let bar = progress_bar(len, "restoring");
    let counting = CountingReader {
        inner: input,
        bar: bar.clone(),
    };
    let request = client.restore_disk(name, force, counting);
    let result = tokio::select! {
        result = request => result?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the agent discards the partial upload and leaves the disk as it was"),
    };
    bar.finish_and_clear();
    print_restored(&result, source, json)
}

fn print_restored(result: &RestoreResult, source: &str, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(result)?);
    } else {
        println!(
            "{} disk {} ({}) from {}: {} of data, checksum blake3:{}",
            if result.replaced {
                "replaced"
            } else {
                "restored"
            },
            result.disk.name,
            result.disk.id,
            source,
            human_bytes(result.data_bytes),
            result.image_checksum
        );
        if result.replaced {
            println!("restart the app that uses it to pick up the restored data");
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct VerifySummary {
    disk: String,
    size_bytes: u64,
    filesystem: String,
    created_at: String,
    agent_version: String,
    format_version: u16,
    chunks: u64,
    data_bytes: u64,
    image_checksum: String,
}

/// Checks a whole snapshot without the agent and without restoring anything.
pub fn verify(source: &str, json: bool) -> Result<()> {
    let (input, len) = open_input(source)?;
    let bar = progress_bar(len, "verifying");
    let counting = CountingReader {
        inner: input,
        bar: bar.clone(),
    };
    let (reader, meta) = SnapshotReader::open(io::BufReader::with_capacity(1 << 20, counting))
        .map_err(|e| anyhow!("{source} is not a usable snapshot: {e}"))?;
    let info = reader.info();
    let summary = reader
        .verify(&mut miren_snapshot::NoProgress)
        .map_err(|e| anyhow!("{source} is damaged: {e}"))?;
    bar.finish_and_clear();
    // Every string a snapshot supplies is untrusted: escaped before it reaches a terminal.
    let out = VerifySummary {
        disk: printable(&meta.name),
        size_bytes: meta.size_bytes,
        filesystem: meta.filesystem.to_string(),
        created_at: humantime::format_rfc3339_seconds(meta.created_at).to_string(),
        agent_version: printable(&meta.agent_version),
        format_version: info.format_version,
        chunks: summary.chunks,
        data_bytes: summary.data_bytes,
        image_checksum: summary.image_checksum,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{source}: OK. disk {}, {} {} image taken {} by miren {}; {} chunks, {} of data, checksum blake3:{}",
            out.disk,
            human_bytes(out.size_bytes),
            out.filesystem,
            out.created_at,
            out.agent_version,
            out.chunks,
            human_bytes(out.data_bytes),
            out.image_checksum
        );
    }
    Ok(())
}

struct CountingReader {
    inner: Box<dyn Read + Send>,
    bar: ProgressBar,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_keys() {
        assert_eq!(
            target_key("s3://offsite/orders/a.miren.zst"),
            Some(TargetKey {
                target: "offsite".into(),
                key: "orders/a.miren.zst".into()
            })
        );
        assert_eq!(target_key("s3://local").map(|t| t.key), Some(String::new()));
        assert_eq!(target_key("/tmp/a.miren.zst"), None);
    }

    #[test]
    fn file_names_are_utc_stamped() {
        let at = humantime::parse_rfc3339("2026-03-24T12:00:00Z").unwrap();
        assert_eq!(
            default_file_name("pg-data", at),
            "pg-data-20260324-120000.miren.zst"
        );
    }
}
