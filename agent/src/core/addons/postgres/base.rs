//! Base backups: PostgreSQL's non-exclusive low-level backup (`pg_backup_start`, copy the
//! data directory, `pg_backup_stop`), the copy read by the agent from the disk's host mount
//! and streamed as a zstd-compressed tar into a multipart upload (memory stays bounded). The
//! `backup_label` PostgreSQL returns is the tar's last entry; `info.json`, written after the
//! upload completed, is what makes a base backup count (a cut-short one is never listed).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::archive::{base_prefix, rfc3339, ArchivedServer};
use crate::core::addons::AddonService;
use crate::core::error::Error;
use crate::core::targets::Target;

pub const BASE_FILE: &str = "base.tar.zst";
const INFO_FILE: &str = "info.json";

/// What a finished base backup is, as `info.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseInfo {
    pub label: String,
    pub started_at: String,
    /// The earliest point it restores to (the backup's end).
    pub finished_at: String,
    /// The first WAL segment a restore from it needs.
    pub start_wal: String,
    pub timeline: u32,
    /// The compressed object's size.
    pub size_bytes: u64,
    /// The data directory's bytes it holds.
    pub data_bytes: u64,
}

impl BaseInfo {
    pub fn finished_time(&self) -> SystemTime {
        humantime::parse_rfc3339_weak(&self.finished_at).unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// The finished base backups of a server, in no particular order.
pub(crate) async fn list_bases(target: &Target, id: &str) -> Result<Vec<BaseInfo>, Error> {
    let store = target.store();
    let prefix = target.path(&base_prefix(id))?;
    let mut listing = store.list(Some(&prefix));
    let mut infos = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| unreachable_target(target, &e))?;
        if meta.location.filename() != Some(INFO_FILE) {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|e| unreachable_target(target, &e))?
            .bytes()
            .await
            .map_err(|e| unreachable_target(target, &e))?;
        match serde_json::from_slice::<BaseInfo>(&bytes) {
            Ok(info) => infos.push(info),
            Err(e) => {
                tracing::warn!(object = %meta.location, error = %e, "skipping an unreadable base backup record")
            }
        }
    }
    Ok(infos)
}

pub(crate) async fn newest_base(target: &Target, id: &str) -> Result<Option<BaseInfo>, Error> {
    Ok(list_bases(target, id)
        .await?
        .into_iter()
        .max_by_key(|b| b.finished_time()))
}

pub(crate) fn unreachable_target(target: &Target, e: &dyn std::fmt::Display) -> Error {
    Error::busy(format!(
        "backup target `{}` ({}) cannot be read: {e}; check that it is reachable",
        target.name(),
        target.describe()
    ))
}

/// What the tar-writing thread tells the uploader.
enum Chunk {
    Data(Vec<u8>),
    /// Every file of the data directory is in; the thread now waits for the label.
    FilesDone,
}

/// A `Write` that hands full buffers to the async uploader (bounded channel: back-pressure).
struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
    written: u64,
}

const CHUNK: usize = 1 << 20;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Chunk::Data(data))
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }
}

/// Files and directories of a data directory a base backup leaves out (PostgreSQL's
/// documented list): their contents are rebuilt or meaningless on another server.
fn skip_contents(rel: &Path) -> bool {
    const DIRS: &[&str] = &[
        "pg_wal",
        "pg_replslot",
        "pg_dynshmem",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_stat_tmp",
        "pg_subtrans",
    ];
    rel.parent()
        .and_then(|p| p.to_str())
        .is_some_and(|p| DIRS.contains(&p))
}

fn skip_file(rel: &Path) -> bool {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    matches!(
        name,
        "postmaster.pid"
            | "postmaster.opts"
            | "backup_label"
            | "tablespace_map"
            | "backup_manifest"
    ) || name.starts_with("pgsql_tmp")
}

/// Appends the data directory to `tar` (files that vanish while copied are skipped, ones that
/// shrink are padded: WAL replay makes every file consistent). Returns the data bytes.
fn append_data_dir<W: Write>(tar: &mut tar::Builder<W>, pgdata: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = pgdata.join(&rel);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&meta);
        if meta.is_dir() {
            if !rel.as_os_str().is_empty() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, &rel, std::io::empty())?;
            }
            let entries = match std::fs::read_dir(&full) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let child = rel.join(entry?.file_name());
                if !skip_contents(&child) {
                    stack.push(child);
                }
            }
        } else if meta.is_file() {
            if skip_file(&rel) {
                continue;
            }
            let file = match std::fs::File::open(&full) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = meta.len();
            header.set_size(len);
            let body = file.take(len).chain(std::io::repeat(0)).take(len);
            tar.append_data(&mut header, &rel, body)?;
            bytes += len;
        } else if meta.file_type().is_symlink() {
            let link = std::fs::read_link(&full)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, &rel, &link)?;
        }
    }
    Ok(bytes)
}

fn add_text<W: Write>(tar: &mut tar::Builder<W>, name: &str, text: &str) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o600);
    header.set_uid(super::PG_UID.into());
    header.set_gid(super::PG_UID.into());
    header.set_mtime(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    );
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, text.as_bytes())
}

/// `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` -> the file.
fn label_start_wal(label: &str) -> Option<String> {
    let line = label
        .lines()
        .find(|l| l.starts_with("START WAL LOCATION:"))?;
    let file = line.split("(file ").nth(1)?.trim_end_matches(')');
    super::archive::is_segment(file).then(|| file.to_string())
}

fn label_timeline(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|t| t.trim().parse().ok())
}

impl AddonService {
    /// Takes a base backup of a running server into the default target.
    pub(crate) async fn base_backup(&self, server: &ArchivedServer) -> Result<BaseInfo, Error> {
        let pitr = self.pitr()?.clone();
        let target = pitr.target().clone();
        let ip = self.server(&server.owner)?.ip()?;
        let client = super::connect(&super::Login {
            host: ip,
            user: &server.login.user,
            password: &server.login.password,
            database: &server.login.database,
        })
        .await
        .map_err(|e| {
            Error::busy(format!(
                "connecting for a base backup: {}",
                super::describe(&e)
            ))
        })?;
        let started = SystemTime::now();
        let label = humantime::format_rfc3339_seconds(started)
            .to_string()
            .replace([':', '-'], "");
        let pg =
            |e: tokio_postgres::Error| Error::busy(format!("base backup: {}", super::describe(&e)));
        client
            .query_one("SELECT pg_backup_start($1, true)::text", &[&label])
            .await
            .map_err(pg)?;
        let path = target.path(&format!(
            "{}/{label}/{}",
            base_prefix(&server.id),
            BASE_FILE
        ))?;
        let upload = target
            .store()
            .put_multipart(&path)
            .await
            .map_err(|e| unreachable_target(&target, &e))?;
        let mut upload = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
        let (tx, mut rx) = mpsc::channel::<Chunk>(4);
        let (label_tx, label_rx) = std::sync::mpsc::channel::<Option<String>>();
        let pgdata = server.mount.join(super::PG_DATA_SUBDIR);
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64)> {
            let out = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::new(),
                written: 0,
            };
            let mut tar = tar::Builder::new(zstd::Encoder::new(out, 1)?);
            let data = append_data_dir(&mut tar, &pgdata)?;
            tar.get_mut().flush()?;
            tx.blocking_send(Chunk::FilesDone)
                .map_err(|_| std::io::Error::other("the upload stopped"))?;
            let Ok(Some(label)) = label_rx.recv() else {
                return Err(std::io::Error::other("the backup was not finished"));
            };
            add_text(&mut tar, "backup_label", &label)?;
            let mut out = tar.into_inner()?.finish()?;
            out.flush()?;
            Ok((data, out.written))
        });
        let mut stop: Option<(String, SystemTime)> = None;
        let mut failed: Option<Error> = None;
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Chunk::Data(data) => {
                    upload.write(&data);
                    if let Err(e) = upload.wait_for_capacity(4).await {
                        failed = Some(unreachable_target(&target, &e));
                        break;
                    }
                }
                Chunk::FilesDone => {
                    // Waits until the last segment the backup needs is archived (spooled).
                    match client
                        .query_one("SELECT labelfile FROM pg_backup_stop(true)", &[])
                        .await
                    {
                        Ok(row) => {
                            let text: String = row.get(0);
                            stop = Some((text.clone(), SystemTime::now()));
                            let _ = label_tx.send(Some(text));
                        }
                        Err(e) => {
                            let _ = label_tx.send(None);
                            failed = Some(pg(e));
                        }
                    }
                }
            }
        }
        drop(rx);
        let written = writer
            .await
            .map_err(|e| Error::internal(format!("base backup writer: {e}")))?;
        let (data_bytes, size_bytes) = match (failed, written, &stop) {
            (None, Ok(sizes), Some(_)) => sizes,
            (failed, written, _) => {
                let _ = upload.abort().await;
                return Err(failed.unwrap_or_else(|| {
                    Error::internal(format!(
                        "writing the base backup: {}",
                        written
                            .err()
                            .map_or("not finished".into(), |e| e.to_string())
                    ))
                }));
            }
        };
        upload
            .finish()
            .await
            .map_err(|e| unreachable_target(&target, &e))?;
        let (label_text, finished) = stop.unwrap_or_else(|| (String::new(), SystemTime::now()));
        let info = BaseInfo {
            label: label.clone(),
            started_at: rfc3339(started),
            finished_at: rfc3339(finished),
            start_wal: label_start_wal(&label_text).ok_or_else(|| {
                Error::internal(format!(
                    "unexpected backup label from PostgreSQL: {label_text}"
                ))
            })?,
            timeline: label_timeline(&label_text).unwrap_or(server.timeline),
            size_bytes,
            data_bytes,
        };
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| Error::internal(format!("encoding base backup info: {e}")))?;
        let info_path = target.path(&format!("{}/{label}/{INFO_FILE}", base_prefix(&server.id)))?;
        target
            .store()
            .put(&info_path, PutPayload::from(json))
            .await
            .map_err(|e| unreachable_target(&target, &e))?;
        pitr.base_done(&server.id, info.finished_time(), info.timeline);
        Ok(info)
    }
}

/// A `Read` over chunks the async side downloads.
struct ChannelReader {
    rx: mpsc::Receiver<Result<bytes::Bytes, String>>,
    current: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Streams a base backup from the target and unpacks it into `dest` (owners and modes kept).
pub(crate) async fn unpack_base(
    target: &Target,
    id: &str,
    label: &str,
    dest: PathBuf,
) -> Result<(), Error> {
    let path = target.path(&format!("{}/{label}/{BASE_FILE}", base_prefix(id)))?;
    let mut stream = target
        .store()
        .get(&path)
        .await
        .map_err(|e| unreachable_target(target, &e))?
        .into_stream();
    // Download, decompression and unpacking each in their own thread, as `zstd -dc | tar -x`
    // would: on 2 cores the unpacking does not wait for the decompression.
    let (tx, rx) = mpsc::channel(8);
    let (plain_tx, plain_rx) = mpsc::channel(8);
    let decompress = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let decompressed = decompress_into(
            ChannelReader {
                rx,
                current: bytes::Bytes::new(),
            },
            &plain_tx,
        );
        if let Err(e) = &decompressed {
            // The unpacking must fail too, not take a cut-short archive for a whole one.
            let _ = plain_tx.blocking_send(Err(e.to_string()));
        }
        decompressed
    });
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dest)?;
        let mut archive = tar::Archive::new(ChannelReader {
            rx: plain_rx,
            current: bytes::Bytes::new(),
        });
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.unpack(&dest)
    });
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string());
        let stop = chunk.is_err();
        if tx.send(chunk).await.is_err() || stop {
            break;
        }
    }
    drop(tx);
    let failed = |e: std::io::Error| Error::internal(format!("unpacking base backup {label}: {e}"));
    let joined =
        |e: tokio::task::JoinError| Error::internal(format!("unpacking the base backup: {e}"));
    let unpacked = reader.await.map_err(joined)?;
    decompress.await.map_err(joined)?.map_err(failed)?;
    unpacked.map_err(failed)
}

/// Decompresses `input` into 1 MiB chunks for the unpacking thread.
fn decompress_into(
    input: ChannelReader,
    out: &mpsc::Sender<Result<bytes::Bytes, String>>,
) -> std::io::Result<()> {
    let mut decoder = zstd::Decoder::new(input)?;
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        while filled < buf.len() {
            let n = decoder.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(());
        }
        buf.truncate(filled);
        if out.blocking_send(Ok(buf.into())).is_err() {
            // The unpacking stopped; it reports why.
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_backup_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nSTART TIMELINE: 1\n";
        assert_eq!(
            label_start_wal(label).as_deref(),
            Some("000000010000000000000002")
        );
        assert_eq!(label_timeline(label), Some(1));
        assert!(skip_contents(Path::new("pg_wal/000000010000000000000001")));
        assert!(!skip_contents(Path::new("pg_wal")));
        assert!(skip_file(Path::new("postmaster.pid")));
    }
}
