//! Disk backups and restores. A backup freezes the mounted filesystem only while the image's
//! allocated extents are copied aside (into memory when they fit, else a file), then
//! compresses from the copy; a read-only disk is compressed straight from its image. A restore
//! writes and verifies a complete new image beside the old one and only then swaps it in with
//! a rename.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant, SystemTime};

use miren_disks::{self as kernel, Filesystem, GIB};
use miren_snapshot::{self as snapshot, SnapshotMeta, SnapshotReader};
use tracing::{info, warn};

use crate::core::disks::{DiskOperation, DiskService, MAX_SIZE_GB};
use crate::core::error::{Error, ErrorKind};
use crate::core::targets::{ObjectWriter, Target};
use crate::model::{Disk, RestoreResult, TargetBackup};
use crate::store::{DiskRow, DiskStatus, PendingRestore};
use crate::util::{new_id, now_rfc3339};
use object_store::path::Path as ObjectPath;

/// A point-in-time copy of a disk's image, removed when dropped.
pub struct Capture {
    /// What the snapshot is written from: `/proc/self/fd/N` of `held`, or a file in the tmp dir.
    pub path: PathBuf,
    /// The copy in memory, or a read-only disk's image itself, open for as long as the capture
    /// lives.
    held: Option<File>,
    /// The copy in the tmp dir, deleted on drop.
    owned_file: Option<PathBuf>,
    pub meta: SnapshotMeta,
    /// How long the filesystem was frozen, when it was mounted writable.
    pub freeze_seconds: Option<f64>,
    /// Bytes copied aside (a read-only disk: the image's allocated bytes, read in place).
    pub copied_bytes: u64,
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.held = None;
        if let Some(path) = self.owned_file.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The most a capture keeps in memory: a quarter of what the kernel says is available. A copy
/// that fits goes into an anonymous memory file instead of the tmp dir: the copy is thrown away
/// after the backup, and as a file on the node's disk it was written back (1 GiB took 2-8 s
/// instead of 1 s on a busy node, all of it under the freeze).
fn memory_budget() -> u64 {
    let Ok(text) = fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024 / 4)
}

fn fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

impl Capture {
    /// Writes the snapshot of the captured image into `out` (a file, a response body) and
    /// flushes it. A failure is logged and returned; whatever was written must then not be
    /// taken for a whole snapshot.
    pub fn write_snapshot(
        &self,
        out: &mut impl Write,
        progress: &mut impl snapshot::Progress,
    ) -> Result<snapshot::Summary, Error> {
        let started = Instant::now();
        let written = snapshot::write_snapshot(
            &self.path,
            &self.meta,
            &mut *out,
            &snapshot::WriteOptions::default(),
            progress,
        )
        .map_err(Error::from)
        .and_then(|summary| {
            out.flush()
                .map_err(|e| Error::internal(format!("writing the snapshot: {e}")))?;
            Ok(summary)
        });
        match &written {
            Ok(summary) => {
                info!(disk = %self.meta.name, bytes = summary.compressed_bytes_written, checksum = %summary.image_checksum,
                      stream_seconds = started.elapsed().as_secs_f64(), "backup streamed")
            }
            Err(e) => warn!(disk = %self.meta.name, error = %e, "backup stream failed"),
        }
        written
    }
}

/// Writes the capture's snapshot into `key` of `target` as one multipart upload: the object
/// appears only when the whole snapshot is written; on any failure the upload is aborted and
/// nothing is left under the key. Runs on a blocking thread.
pub fn capture_to_target(
    capture: &Capture,
    target: &Target,
    key: &ObjectPath,
    handle: tokio::runtime::Handle,
    progress: &mut impl snapshot::Progress,
) -> Result<TargetBackup, Error> {
    let mut upload = ObjectWriter::create(handle, target, key);
    let summary = capture.write_snapshot(&mut upload, progress)?;
    let snapshot_bytes = summary.compressed_bytes_written;
    upload.finish()?;
    info!(disk = %capture.meta.name, target = target.name(), %key, bytes = snapshot_bytes, "backup stored in target");
    Ok(TargetBackup {
        disk: capture.meta.name.clone(),
        target: target.name().to_string(),
        key: key.to_string(),
        location: target.describe(),
        off_node: target.off_node(),
        size_bytes: capture.meta.size_bytes,
        data_bytes: summary.data_bytes_stored,
        snapshot_bytes,
        image_checksum: summary.image_checksum,
        freeze_seconds: capture.freeze_seconds,
    })
}

/// Refuses a key that already holds an object: a backup is never written over another.
pub async fn ensure_key_free(target: &Target, key: &ObjectPath) -> Result<(), Error> {
    use object_store::ObjectStoreExt;
    match target.store().head(key).await {
        Ok(_) => Err(Error::conflict(format!(
            "backup target `{}` already holds `{key}`; a backup is never overwritten: choose another key (or leave it out for a dated name)",
            target.name()
        ))),
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::new(
            ErrorKind::Unavailable,
            "target_unreachable",
            format!(
                "backup target `{}` ({}) did not answer: {e}; check that it is reachable and retry",
                target.name(),
                target.describe()
            ),
        )),
    }
}

pub struct Restored {
    pub disk: Disk,
    pub replaced: bool,
    pub image_checksum: String,
    pub data_bytes: u64,
}

impl From<Restored> for RestoreResult {
    fn from(r: Restored) -> Self {
        RestoreResult {
            disk: r.disk,
            replaced: r.replaced,
            image_checksum: r.image_checksum,
            data_bytes: r.data_bytes,
        }
    }
}

fn snapshot_fs(fs: Filesystem) -> snapshot::Filesystem {
    match fs {
        Filesystem::Ext4 => snapshot::Filesystem::Ext4,
        Filesystem::Xfs => snapshot::Filesystem::Xfs,
        Filesystem::Btrfs => snapshot::Filesystem::Btrfs,
    }
}

impl From<snapshot::Error> for Error {
    fn from(err: snapshot::Error) -> Self {
        if err.is_corruption() || matches!(err, snapshot::Error::UnsupportedVersion { .. }) {
            return Error::invalid(format!("{err}; nothing was changed"));
        }
        match &err {
            snapshot::Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Error::new(
                    ErrorKind::NoSpace,
                    "no_space",
                    format!("{err}: free space on the node and retry; nothing was changed"),
                )
            }
            snapshot::Error::AlreadyFrozen { .. } => Error::busy(format!(
                "{err}; another backup is running, retry when it ends"
            )),
            _ => Error::internal(err.to_string()),
        }
    }
}

impl DiskService {
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("tmp")
    }

    /// Copies the disk's data aside, consistently: a mounted, writable filesystem is frozen
    /// (FIFREEZE) for exactly as long as the copy of its allocated extents takes.
    pub fn capture_for_backup(&self, id_or_name: &str) -> Result<Capture, Error> {
        let row = self.find(id_or_name)?;
        let _only = DiskOperation::begin(&row, "backup")?;
        if !row.status.can_back_up() {
            return Err(Error::busy(format!(
                "disk `{}` is {}; back it up once that finishes",
                row.name,
                row.status.as_str()
            )));
        }
        let fs: Filesystem = row.filesystem.parse().map_err(Error::internal)?;
        let image = self.cfg.image_path(&row.id);
        let mount_path = self.cfg.mount_path(&row.id);
        let mounted = kernel::mount_point_of(&mount_path)?.is_some();
        let allocated = fs::metadata(&image).map_or(0, |m| m.blocks() * 512);
        let mut capture = Capture {
            path: PathBuf::new(),
            held: None,
            owned_file: None,
            meta: SnapshotMeta {
                name: row.name.clone(),
                size_bytes: row.size_gb * GIB,
                filesystem: snapshot_fs(fs),
                block_size: kernel::BLOCK_SIZE,
                created_at: SystemTime::now(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
            },
            freeze_seconds: None,
            copied_bytes: 0,
        };
        let started = Instant::now();
        if row.read_only {
            // Mounted read-only from its creation on (and never resized): the image does not
            // change, so it is compressed in place. Held open: a later rename over it (a
            // restore) does not change what this backup reads.
            let file = File::open(&image)
                .map_err(|e| Error::internal(format!("opening {}: {e}", image.display())))?;
            capture.path = fd_path(&file);
            capture.held = Some(file);
            capture.copied_bytes = allocated;
            info!(disk = %row.name, bytes = allocated, "backing up a read-only disk from its image");
            return Ok(capture);
        }
        let copy = if allocated <= memory_budget() {
            snapshot::memory_file(&format!("miren-backup-{}", row.id))?
        } else {
            fs::create_dir_all(self.tmp_dir()).map_err(|e| {
                Error::internal(format!("creating {}: {e}", self.tmp_dir().display()))
            })?;
            let path = self.tmp_dir().join(format!(
                "backup-{}-{}.img",
                row.id,
                crate::util::new_id("t")
            ));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::internal(format!("creating {}: {e}", path.display())))?;
            capture.owned_file = Some(path);
            file
        };
        capture.path = capture.owned_file.clone().unwrap_or_else(|| fd_path(&copy));
        let what = capture.path.display().to_string();
        if mounted {
            // The freeze is held by a helper process that thaws when we release it, when we
            // die (its stdin pipe reaches EOF), or after a bound that grows with the data to
            // copy (at most MAX_FREEZE), whichever comes first.
            let frozen = HeldFreeze::start(&mount_path, snapshot::freeze_bound(allocated))?;
            let frozen_at = Instant::now();
            let copied = snapshot::capture_extents_into(&image, &copy, &what);
            hold_for_test(&row.name);
            let thawed = frozen.release();
            capture.freeze_seconds = Some(frozen_at.elapsed().as_secs_f64());
            capture.copied_bytes = copied?;
            thawed?;
        } else {
            capture.copied_bytes = snapshot::capture_extents_into(&image, &copy, &what)?;
        }
        capture.held = Some(copy);
        info!(disk = %row.name, bytes = capture.copied_bytes, freeze_seconds = ?capture.freeze_seconds,
              in_memory = capture.owned_file.is_none(), capture_seconds = started.elapsed().as_secs_f64(), "captured disk for backup");
        Ok(capture)
    }

    /// Thaws any of our filesystems a previous agent left frozen mid-backup, and removes
    /// leftover captures. Runs at start.
    pub(crate) fn recover_backups(&self) -> Result<(), Error> {
        for row in self.store().disks()? {
            let mount_path = self.cfg.mount_path(&row.id);
            if kernel::mount_point_of(&mount_path)?.is_some() {
                match snapshot::thaw(&mount_path) {
                    Ok(true) => {
                        warn!(disk = %row.name, "thawed a filesystem a previous agent left frozen")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(disk = %row.name, error = %e, "could not check for a frozen filesystem")
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.tmp_dir()) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Restores a snapshot into a new disk, or (with `force`) over an existing one that is not
    /// leased. Nothing changes unless the whole snapshot arrived and checked out.
    pub fn restore(
        &self,
        input: impl Read,
        name: Option<String>,
        force: bool,
    ) -> Result<Restored, Error> {
        let (reader, meta) = SnapshotReader::open(input)?;
        let name = name.unwrap_or_else(|| meta.name.clone());
        kernel::validate_name(&name).map_err(|e| Error::invalid(e.to_string()))?;
        let fs: Filesystem = match &meta.filesystem {
            snapshot::Filesystem::Ext4 => Filesystem::Ext4,
            snapshot::Filesystem::Xfs => Filesystem::Xfs,
            snapshot::Filesystem::Btrfs => Filesystem::Btrfs,
            snapshot::Filesystem::Other(other) => {
                return Err(Error::invalid(format!(
                    "the snapshot holds a `{}` filesystem, which this agent cannot mount",
                    snapshot::printable(other)
                )))
            }
        };
        if meta.size_bytes == 0 || meta.size_bytes % GIB != 0 || meta.size_bytes / GIB > MAX_SIZE_GB
        {
            return Err(Error::invalid(format!(
                "the snapshot's image is {} bytes, not a whole number of GiB up to {MAX_SIZE_GB}; it was not written by miren",
                meta.size_bytes
            )));
        }
        let size_gb = meta.size_bytes / GIB;
        // Before the image is sized: a size the host cannot hold is the snapshot's problem (400).
        self.check_size_fits(fs, size_gb, None)?;
        let existing = self.store().disk_by_name(&name)?;
        if let Some(disk) = &existing {
            if !force {
                return Err(Error::conflict(format!(
                    "disk `{}` already exists; pass --force to replace its contents with the snapshot (they are lost), or restore under a new name with -n",
                    disk.name
                )));
            }
            if let Some(lease) = self.store().lease(&disk.id)? {
                return Err(Error::conflict(format!(
                    "disk `{}` is in use by `{}` (since {}); stop the app that holds it, then restore",
                    disk.name, lease.holder, lease.acquired_at
                )));
            }
        }

        // The new image, written and checked beside the old one.
        let tmp = self
            .cfg
            .images_dir()
            .join(format!("restore-{}.img.tmp", new_id("r")));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::internal(format!("creating {}: {e}", tmp.display())))?;
        let written = reader
            .restore_into(&file, &mut snapshot::NoProgress)
            .map_err(Error::from)
            .and_then(|summary| {
                file.sync_all()
                    .map_err(|e| Error::internal(format!("syncing {}: {e}", tmp.display())))?;
                Ok(summary)
            });
        drop(file);
        let summary = match written {
            Ok(summary) => summary,
            Err(err) => {
                let _ = fs::remove_file(&tmp);
                return Err(err);
            }
        };

        let result = match existing {
            None => self.restore_as_new(&tmp, &name, size_gb, fs),
            Some(disk) => self.restore_over(&disk, &tmp, size_gb, fs),
        };
        let _ = fs::remove_file(&tmp);
        let (disk, replaced) = result?;
        info!(disk = %disk.name, replaced, checksum = %summary.image_checksum, "disk restored from snapshot");
        Ok(Restored {
            disk,
            replaced,
            image_checksum: summary.image_checksum,
            data_bytes: summary.data_bytes,
        })
    }

    fn restore_as_new(
        &self,
        tmp: &Path,
        name: &str,
        size_gb: u64,
        fs: Filesystem,
    ) -> Result<(Disk, bool), Error> {
        let row = DiskRow {
            id: new_id("disk"),
            name: name.to_string(),
            size_gb,
            filesystem: fs.as_str().to_string(),
            read_only: false,
            status: DiskStatus::Creating,
            error: None,
            created_at: now_rfc3339(),
        };
        self.store().insert_creating_disk(&row)?;
        let image = self.cfg.image_path(&row.id);
        let made =
            rename_durably(tmp, &image).and_then(|()| self.ensure_attached(&row).map(|_| ()));
        if let Err(err) = made {
            // Still `creating`: the teardown (or the next start's reconciliation) removes it.
            if self.teardown(&row).is_ok() {
                self.store().remove_disk(&row.id)?;
            }
            return Err(err);
        }
        self.store().set_status(&row.id, DiskStatus::Ready, None)?;
        Ok((self.view_one(&self.find(&row.id)?)?, false))
    }

    fn restore_over(
        &self,
        disk: &DiskRow,
        tmp: &Path,
        size_gb: u64,
        fs: Filesystem,
    ) -> Result<(Disk, bool), Error> {
        let _only = DiskOperation::begin(disk, "restore")?;
        let pending = PendingRestore {
            image: tmp.display().to_string(),
            size_gb,
            filesystem: fs.as_str().to_string(),
        };
        self.store().begin_restore(&disk.id, &pending)?;
        if let Err(err) = self.swap_in(disk, &pending) {
            self.finish_interrupted_restore(disk)?;
            return Err(err);
        }
        Ok((self.view_one(&self.find(&disk.id)?)?, true))
    }

    /// Unmount, rename the verified image over the old one (atomic), record, mount.
    fn swap_in(&self, disk: &DiskRow, pending: &PendingRestore) -> Result<(), Error> {
        let image = self.cfg.image_path(&disk.id);
        kernel::unmount(&self.cfg.mount_path(&disk.id))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !kernel::loops_backed_by(&image)?.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::busy(format!(
                    "disk `{}` is still in use outside its mount; stop whatever uses it and retry",
                    disk.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        rename_durably(Path::new(&pending.image), &image)?;
        self.store().end_restore(&disk.id, true)?;
        let row = self.find(&disk.id)?;
        self.ensure_attached(&row)?;
        Ok(())
    }

    /// After a failure or a crash mid-restore: if the new image is still beside the old one,
    /// the swap never happened and the old disk comes back as it was; otherwise the swap
    /// happened and the restore is recorded. Either way the disk ends up attached.
    pub(crate) fn finish_interrupted_restore(&self, disk: &DiskRow) -> Result<(), Error> {
        match self.store().pending_restore(&disk.id)? {
            Some(pending) if Path::new(&pending.image).exists() => {
                let _ = fs::remove_file(&pending.image);
                self.store().end_restore(&disk.id, false)?;
                info!(disk = %disk.name, "restore did not complete; the disk is as it was");
            }
            Some(_) => {
                self.store().end_restore(&disk.id, true)?;
                info!(disk = %disk.name, "finished a restore interrupted after its swap");
            }
            None => self.store().end_restore(&disk.id, false)?,
        }
        let row = self.find(&disk.id)?;
        self.ensure_attached(&row)?;
        Ok(())
    }
}

/// Test knob, harmless: `MIREN_TEST_FREEZE_HOLD_MS` keeps a backup's filesystem frozen that
/// much longer after the copy (never beyond MAX_FREEZE, which the helper enforces anyway), so
/// a test can kill the agent while a freeze is certainly held.
fn hold_for_test(disk: &str) {
    let Some(ms) = std::env::var("MIREN_TEST_FREEZE_HOLD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let hold = Duration::from_millis(ms).min(snapshot::MAX_FREEZE);
    warn!(disk = %disk, ms = hold.as_millis() as u64, "MIREN_TEST_FREEZE_HOLD_MS: holding the backup freeze (test knob)");
    std::thread::sleep(hold);
}

/// A freeze held by `miren freeze-hold`, a child process that owns the FIFREEZE: the thaw no
/// longer depends on this process living until the copy ends.
struct HeldFreeze {
    bound: Duration,
    child: Child,
    control: Option<ChildStdin>,
    report: BufReader<ChildStdout>,
    mount: PathBuf,
}

impl HeldFreeze {
    fn start(mount: &Path, bound: Duration) -> Result<HeldFreeze, Error> {
        let mut child = crate::util::own_binary()
            .arg("freeze-hold")
            .arg("--mount")
            .arg(mount)
            .arg("--max-seconds")
            .arg(bound.as_secs().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::internal(format!("starting the freeze helper: {e}")))?;
        let (Some(control), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::internal("the freeze helper has no pipes"));
        };
        let mut held = HeldFreeze {
            bound,
            child,
            control: Some(control),
            report: BufReader::new(stdout),
            mount: mount.to_path_buf(),
        };
        let line = held.read_line();
        match line
            .split_once(' ')
            .map_or((line.as_str(), ""), |(a, b)| (a, b))
        {
            ("frozen", _) => Ok(held),
            ("busy", msg) => Err(Error::busy(format!(
                "{msg}; another backup is running, retry when it ends"
            ))),
            (_, msg) => Err(Error::internal(format!(
                "freezing {} failed: {}",
                mount.display(),
                if msg.is_empty() {
                    "the freeze helper exited"
                } else {
                    msg
                }
            ))),
        }
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        let _ = self.report.read_line(&mut line);
        line.trim_end().to_string()
    }

    /// Thaws now. An error if the freeze did not last until now (the helper's bound ran out
    /// or it died): the copy is then not point-in-time and must not be used.
    fn release(mut self) -> Result<(), Error> {
        if let Some(mut control) = self.control.take() {
            let _ = control.write_all(b"t");
        }
        let line = self.read_line();
        let _ = self.child.wait();
        match line.as_str() {
            "thawed released" => Ok(()),
            "thawed timeout" => Err(Error::internal(format!(
                "copying the disk took longer than its {} s freeze bound; the filesystem was thawed and the copy discarded. Retry when the disk is less busy",
                self.bound.as_secs()
            ))),
            other => {
                // The helper died without saying it thawed: make sure ourselves.
                let _ = snapshot::thaw(&self.mount);
                Err(Error::internal(format!(
                    "the freeze helper ended unexpectedly ({other:?}); the filesystem was thawed and the copy discarded"
                )))
            }
        }
    }
}

impl Drop for HeldFreeze {
    fn drop(&mut self) {
        // Closing the pipe thaws (EOF); reap the helper so it does not linger as a zombie.
        self.control.take();
        let _ = self.child.wait();
    }
}

fn rename_durably(from: &Path, to: &Path) -> Result<(), Error> {
    fs::rename(from, to).map_err(|e| {
        Error::internal(format!(
            "moving {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })?;
    if let Some(dir) = to.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::internal(format!("syncing {}: {e}", dir.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_writes_a_snapshot_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capture.img");
        let size = 4 * 1024 * 1024;
        {
            let mut image = File::create(&path).unwrap();
            image.set_len(size).unwrap();
            image.write_all(&[7u8; 8192]).unwrap();
        }
        let capture = Capture {
            path: path.clone(),
            held: None,
            owned_file: Some(path.clone()),
            meta: SnapshotMeta {
                name: "data".into(),
                size_bytes: size,
                filesystem: snapshot::Filesystem::Ext4,
                block_size: 4096,
                created_at: SystemTime::now(),
                agent_version: "0.0.0".into(),
            },
            freeze_seconds: None,
            copied_bytes: 8192,
        };
        let mut out = Vec::new();
        let written = capture
            .write_snapshot(&mut out, &mut snapshot::NoProgress)
            .unwrap();
        assert_eq!(written.compressed_bytes_written, out.len() as u64);
        let (reader, meta) = SnapshotReader::open(out.as_slice()).unwrap();
        assert_eq!(meta.name, "data");
        let read = reader.verify(&mut snapshot::NoProgress).unwrap();
        assert_eq!(read.image_checksum, written.image_checksum);
        assert_eq!(read.data_bytes, 8192);
        drop(capture);
        assert!(!path.exists(), "a capture's copy is removed with it");
    }

    #[test]
    fn a_capture_in_memory_is_read_through_its_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let size = 8 * 1024 * 1024;
        {
            let mut f = File::create(&image).unwrap();
            f.set_len(size).unwrap();
            f.write_all(&[9u8; 12288]).unwrap();
        }
        let copy = snapshot::memory_file("test").unwrap();
        let copied = snapshot::capture_extents_into(&image, &copy, "memory").unwrap();
        assert!(copied >= 12288);
        let capture = Capture {
            path: fd_path(&copy),
            held: Some(copy),
            owned_file: None,
            meta: SnapshotMeta {
                name: "mem".into(),
                size_bytes: size,
                filesystem: snapshot::Filesystem::Ext4,
                block_size: 4096,
                created_at: SystemTime::now(),
                agent_version: "0.0.0".into(),
            },
            freeze_seconds: None,
            copied_bytes: copied,
        };
        let mut out = Vec::new();
        let written = capture
            .write_snapshot(&mut out, &mut snapshot::NoProgress)
            .unwrap();
        assert_eq!(written.data_bytes_stored, 12288);
        let (reader, _) = SnapshotReader::open(out.as_slice()).unwrap();
        let read = reader.verify(&mut snapshot::NoProgress).unwrap();
        assert_eq!(read.image_checksum, written.image_checksum);
        assert!(image.exists(), "the source image is not touched");
    }

    #[test]
    fn a_failing_writer_fails_the_snapshot() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capture.img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let capture = Capture {
            path,
            held: None,
            owned_file: None,
            meta: SnapshotMeta {
                name: "data".into(),
                size_bytes: 1 << 20,
                filesystem: snapshot::Filesystem::Xfs,
                block_size: 4096,
                created_at: SystemTime::now(),
                agent_version: "0.0.0".into(),
            },
            freeze_seconds: None,
            copied_bytes: 0,
        };
        assert!(capture
            .write_snapshot(&mut Gone, &mut snapshot::NoProgress)
            .is_err());
    }
}
