//! Disk rows, their leases, restores in flight, and apps' local storage.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::core::status::DiskStatus;
use crate::store::error::{DiskOp, StoreError, StoreResult};
use crate::store::owner::{owner_columns, owner_from_columns};
use crate::store::{Owner, Store};

#[derive(Debug, Clone)]
pub struct DiskRow {
    pub id: String,
    pub name: String,
    pub size_gb: u64,
    pub filesystem: String,
    pub read_only: bool,
    pub status: DiskStatus,
    pub error: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub disk_id: String,
    pub holder: String,
    pub acquired_at: String,
    /// For `pid:N` holders: the process and its start time, so a reused pid is not mistaken
    /// for the holder.
    pub holder_pid: Option<i64>,
    pub holder_start_time: Option<i64>,
}

pub enum LeaseAttempt {
    Acquired(LeaseRow),
    HeldBy(LeaseRow),
}

/// A restore waiting to be swapped in: the verified image beside the old one, and what the
/// disk becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRestore {
    pub image: String,
    pub size_gb: u64,
    pub filesystem: String,
}

const DISK_COLUMNS: &str = "id, name, size_gb, filesystem, read_only, status, error, created_at";
const LEASE_COLUMNS: &str = "disk_id, holder, acquired_at, holder_pid, holder_start_time";

fn disk_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DiskRow> {
    Ok(DiskRow {
        id: row.get(0)?,
        name: row.get(1)?,
        size_gb: row.get::<_, i64>(2)? as u64,
        filesystem: row.get(3)?,
        read_only: row.get(4)?,
        status: row.get(5)?,
        error: row.get(6)?,
        created_at: row.get(7)?,
    })
}

fn lease_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRow> {
    Ok(LeaseRow {
        disk_id: row.get(0)?,
        holder: row.get(1)?,
        acquired_at: row.get(2)?,
        holder_pid: row.get(3)?,
        holder_start_time: row.get(4)?,
    })
}

fn disk_in(conn: &Connection, id: &str) -> StoreResult<Option<DiskRow>> {
    Ok(conn
        .query_row(
            &format!("SELECT {DISK_COLUMNS} FROM disks WHERE id = ?1"),
            [id],
            disk_from_row,
        )
        .optional()?)
}

fn existing_disk_in(conn: &Connection, id: &str) -> StoreResult<DiskRow> {
    disk_in(conn, id)?.ok_or_else(|| StoreError::disk_not_found(id))
}

fn lease_in(conn: &Connection, disk_id: &str) -> StoreResult<Option<LeaseRow>> {
    Ok(conn
        .query_row(
            &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE disk_id = ?1"),
            [disk_id],
            lease_from_row,
        )
        .optional()?)
}

impl Store {
    /// Records a new disk in `creating`, refusing a name that exists in any case.
    pub fn insert_creating_disk(&self, disk: &DiskRow) -> StoreResult<()> {
        self.insert_creating_disk_owned(disk, None)
    }

    /// [`Self::insert_creating_disk`], owned by `owner` from the start.
    pub fn insert_creating_disk_owned(
        &self,
        disk: &DiskRow,
        owner: Option<&Owner>,
    ) -> StoreResult<()> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<(String, String)> = tx
                .query_row(
                    "SELECT id, name FROM disks WHERE name_key = ?1",
                    [disk.name.to_lowercase()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((id, name)) = existing {
                return Err(StoreError::DiskNameTaken { name, id });
            }
            let owner = owner.map(owner_columns);
            tx.execute(
                "INSERT INTO disks (id, name, name_key, size_gb, filesystem, read_only, status, created_at,
                                    owner_kind, owner_app, owner_part)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    disk.id,
                    disk.name,
                    disk.name.to_lowercase(),
                    disk.size_gb as i64,
                    disk.filesystem,
                    disk.read_only,
                    DiskStatus::Creating,
                    disk.created_at,
                    owner.map(|o| o.0),
                    owner.map(|o| o.1),
                    owner.map(|o| o.2),
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn set_status(&self, id: &str, status: DiskStatus, error: Option<&str>) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE disks SET status = ?2, error = ?3 WHERE id = ?1",
                params![id, status, error],
            )?;
            Ok(())
        })
    }

    pub fn disk(&self, id: &str) -> StoreResult<Option<DiskRow>> {
        self.read(|conn| disk_in(conn, id))
    }

    pub fn disk_by_name(&self, name: &str) -> StoreResult<Option<DiskRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {DISK_COLUMNS} FROM disks WHERE name_key = ?1"),
                    [name.to_lowercase()],
                    disk_from_row,
                )
                .optional()?)
        })
    }

    /// Who the disk belongs to; None while nobody claimed it.
    pub fn disk_owner(&self, id: &str) -> StoreResult<Option<Owner>> {
        self.read(|conn| disk_owner_in(conn, id))
    }

    /// The disk `owner` has (addons have one each; apps may have several: the oldest).
    pub fn disk_of(&self, owner: &Owner) -> StoreResult<Option<DiskRow>> {
        let (kind, app, part) = owner_columns(owner);
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!(
                        "SELECT {DISK_COLUMNS} FROM disks
                         WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3
                         ORDER BY created_at LIMIT 1"
                    ),
                    params![kind, app, part],
                    disk_from_row,
                )
                .optional()?)
        })
    }

    /// Gives an unowned disk to `owner` (in one statement, so two claimants cannot both win);
    /// returns who owns it afterwards.
    pub fn claim_disk(&self, id: &str, owner: &Owner) -> StoreResult<Option<Owner>> {
        let (kind, app, part) = owner_columns(owner);
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE disks SET owner_kind = ?2, owner_app = ?3, owner_part = ?4
                 WHERE id = ?1 AND owner_kind IS NULL",
                params![id, kind, app, part],
            )?;
            disk_owner_in(conn, id)
        })
    }

    pub fn disks(&self) -> StoreResult<Vec<DiskRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {DISK_COLUMNS} FROM disks ORDER BY name_key"
            ))?;
            let rows = stmt.query_map([], disk_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Moves a disk to `deleting`, in the same transaction that checks it is not leased, so a
    /// lease can never be granted on a disk that is going away.
    pub fn begin_delete(&self, id: &str) -> StoreResult<DiskRow> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let disk = existing_disk_in(&tx, id)?;
            if let Some(lease) = lease_in(&tx, id)? {
                return Err(StoreError::Leased {
                    disk: disk.name,
                    lease: Box::new(lease),
                    op: DiskOp::Delete,
                });
            }
            match disk.status {
                status if status.can_delete() => {}
                status => {
                    return Err(StoreError::WrongState {
                        disk: disk.name,
                        status,
                        op: DiskOp::Delete,
                    })
                }
            }
            tx.execute(
                "UPDATE disks SET status = ?2 WHERE id = ?1",
                params![id, DiskStatus::Deleting],
            )?;
            tx.commit()?;
            Ok(disk)
        })
    }

    pub fn remove_disk(&self, id: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM leases WHERE disk_id = ?1", [id])?;
            tx.execute("DELETE FROM disks WHERE id = ?1", [id])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the new size and marks the disk `resizing`; the kernel side follows and
    /// reconciliation finishes it after a crash.
    pub fn begin_resize(&self, id: &str, size_gb: u64) -> StoreResult<DiskRow> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let disk = existing_disk_in(&tx, id)?;
            if !disk.status.can_resize() {
                return Err(StoreError::WrongState {
                    disk: disk.name,
                    status: disk.status,
                    op: DiskOp::Resize,
                });
            }
            if size_gb < disk.size_gb {
                return Err(StoreError::Shrink {
                    disk: disk.name,
                    size_gb: disk.size_gb,
                    requested_gb: size_gb,
                });
            }
            tx.execute(
                "UPDATE disks SET status = ?3, size_gb = ?2 WHERE id = ?1",
                params![id, size_gb as i64, DiskStatus::Resizing],
            )?;
            tx.commit()?;
            Ok(DiskRow {
                size_gb,
                status: DiskStatus::Resizing,
                ..disk
            })
        })
    }

    /// Ends a resize, successful or rolled back: records the size the disk really has now.
    pub fn end_resize(&self, id: &str, size_gb: u64, error: Option<&str>) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE disks SET status = ?4, size_gb = ?2, error = ?3 WHERE id = ?1 AND status = ?5",
                params![
                    id,
                    size_gb as i64,
                    error,
                    DiskStatus::Ready,
                    DiskStatus::Resizing
                ],
            )?;
            Ok(())
        })
    }

    /// Grants the lease if the disk is free (or already held by the same holder: retries are
    /// idempotent), otherwise reports the current holder.
    pub fn try_acquire_lease(&self, lease: &LeaseRow) -> StoreResult<LeaseAttempt> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let status: Option<DiskStatus> = tx
                .query_row(
                    "SELECT status FROM disks WHERE id = ?1",
                    [&lease.disk_id],
                    |r| r.get(0),
                )
                .optional()?;
            match status {
                None => return Err(StoreError::disk_not_found(&lease.disk_id)),
                Some(status) if status.can_lease() => {}
                Some(status) => {
                    return Err(StoreError::WrongState {
                        disk: lease.disk_id.clone(),
                        status,
                        op: DiskOp::Lease,
                    })
                }
            }
            if let Some(current) = lease_in(&tx, &lease.disk_id)? {
                return Ok(if current.holder == lease.holder {
                    LeaseAttempt::Acquired(current)
                } else {
                    LeaseAttempt::HeldBy(current)
                });
            }
            tx.execute(
                &format!("INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![
                    lease.disk_id,
                    lease.holder,
                    lease.acquired_at,
                    lease.holder_pid,
                    lease.holder_start_time
                ],
            )?;
            tx.commit()?;
            Ok(LeaseAttempt::Acquired(lease.clone()))
        })
    }

    /// Releases a disk's lease. With `only_holder`, releases only if that holder has it (so a
    /// stale release can never take a lease from its next holder).
    pub fn release_lease(
        &self,
        disk_id: &str,
        only_holder: Option<&str>,
    ) -> StoreResult<Option<String>> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let holder: Option<String> = tx
                .query_row(
                    "SELECT holder FROM leases WHERE disk_id = ?1",
                    [disk_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(holder) = holder else {
                return Ok(None);
            };
            if only_holder.is_some_and(|h| h != holder) {
                return Ok(None);
            }
            tx.execute("DELETE FROM leases WHERE disk_id = ?1", [disk_id])?;
            tx.commit()?;
            Ok(Some(holder))
        })
    }

    pub fn lease(&self, disk_id: &str) -> StoreResult<Option<LeaseRow>> {
        self.read(|conn| lease_in(conn, disk_id))
    }

    pub fn leases(&self) -> StoreResult<Vec<LeaseRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT l.disk_id, l.holder, l.acquired_at, l.holder_pid, l.holder_start_time
                 FROM leases l JOIN disks d ON d.id = l.disk_id ORDER BY d.name_key",
            )?;
            let rows = stmt.query_map([], lease_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Leases held by `holder` (disk ids).
    pub fn leases_of(&self, holder: &str) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            let mut stmt = conn.prepare("SELECT disk_id FROM leases WHERE holder = ?1")?;
            let rows = stmt.query_map([holder], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Records an app's local storage; returns its creation time (existing or new).
    pub fn ensure_local_storage(&self, app: &str, now: &str) -> StoreResult<String> {
        self.with_conn(|conn| {
            conn.execute(
                "INSERT OR IGNORE INTO local_storage (app, created_at) VALUES (?1, ?2)",
                params![app, now],
            )?;
            Ok(conn.query_row(
                "SELECT created_at FROM local_storage WHERE app = ?1",
                [app],
                |r| r.get(0),
            )?)
        })
    }

    /// Forgets an app's local storage (its directory is the caller's to remove).
    pub fn remove_local_storage(&self, app: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute("DELETE FROM local_storage WHERE app = ?1", [app])?;
            Ok(())
        })
    }

    pub fn local_storage(&self) -> StoreResult<Vec<(String, String)>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare("SELECT app, created_at FROM local_storage ORDER BY app")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Marks an existing disk `restoring`, refusing while it is leased (in the same
    /// transaction, so no lease can be granted meanwhile).
    pub fn begin_restore(&self, id: &str, pending: &PendingRestore) -> StoreResult<()> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let disk = existing_disk_in(&tx, id)?;
            if let Some(lease) = lease_in(&tx, id)? {
                return Err(StoreError::Leased {
                    disk: disk.name,
                    lease: Box::new(lease),
                    op: DiskOp::Restore,
                });
            }
            if !disk.status.can_restore() {
                return Err(StoreError::WrongState {
                    disk: disk.name,
                    status: disk.status,
                    op: DiskOp::Restore,
                });
            }
            tx.execute(
                "UPDATE disks SET status = ?5, restore_image = ?2, restore_size_gb = ?3,
                 restore_filesystem = ?4 WHERE id = ?1",
                params![
                    id,
                    pending.image,
                    pending.size_gb as i64,
                    pending.filesystem,
                    DiskStatus::Restoring
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn pending_restore(&self, id: &str) -> StoreResult<Option<PendingRestore>> {
        let row: Option<(Option<String>, Option<i64>, Option<String>)> =
            self.read(|conn| -> StoreResult<_> {
                Ok(conn
                    .query_row(
                        "SELECT restore_image, restore_size_gb, restore_filesystem FROM disks WHERE id = ?1",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?)
            })?;
        Ok(match row {
            Some((Some(image), Some(size_gb), Some(filesystem))) => Some(PendingRestore {
                image,
                size_gb: size_gb as u64,
                filesystem,
            }),
            _ => None,
        })
    }

    /// Ends a restore: with `applied`, the disk takes the restored size and filesystem.
    pub fn end_restore(&self, id: &str, applied: bool) -> StoreResult<()> {
        let sql = if applied {
            "UPDATE disks SET size_gb = restore_size_gb, filesystem = restore_filesystem,
             status = ?2, error = NULL, restore_image = NULL, restore_size_gb = NULL,
             restore_filesystem = NULL WHERE id = ?1 AND restore_image IS NOT NULL"
        } else {
            "UPDATE disks SET status = ?2, restore_image = NULL, restore_size_gb = NULL,
             restore_filesystem = NULL WHERE id = ?1"
        };
        self.with_conn(|conn| {
            conn.execute(sql, params![id, DiskStatus::Ready])?;
            Ok(())
        })
    }
}

fn disk_owner_in(conn: &Connection, id: &str) -> StoreResult<Option<Owner>> {
    let cols: Option<(Option<String>, Option<String>, Option<String>)> = conn
        .query_row(
            "SELECT owner_kind, owner_app, owner_part FROM disks WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(cols.and_then(|(k, a, p)| owner_from_columns(k, a, p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::error::Error;

    fn disk(id: &str, name: &str) -> DiskRow {
        DiskRow {
            id: id.into(),
            name: name.into(),
            size_gb: 1,
            filesystem: "ext4".into(),
            read_only: false,
            status: DiskStatus::Creating,
            error: None,
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn lease(disk_id: &str, holder: &str) -> LeaseRow {
        LeaseRow {
            disk_id: disk_id.into(),
            holder: holder.into(),
            acquired_at: "now".into(),
            holder_pid: None,
            holder_start_time: None,
        }
    }

    #[test]
    fn names_are_unique_ignoring_case() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-db")
            .tempdir()
            .unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store.insert_creating_disk(&disk("disk_1", "Data")).unwrap();
        let err = store
            .insert_creating_disk(&disk("disk_2", "data"))
            .unwrap_err();
        let err = Error::from(err);
        assert_eq!(err.code, "conflict");
        assert!(err.message.contains("disk_1"));
    }

    #[test]
    fn leases_are_exclusive_and_block_deletes() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-db")
            .tempdir()
            .unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store.insert_creating_disk(&disk("disk_1", "d")).unwrap();
        assert!(
            store.try_acquire_lease(&lease("disk_1", "a")).is_err(),
            "creating disks can't be leased"
        );
        store.set_status("disk_1", DiskStatus::Ready, None).unwrap();
        assert!(matches!(
            store.try_acquire_lease(&lease("disk_1", "a")).unwrap(),
            LeaseAttempt::Acquired(_)
        ));
        assert!(matches!(
            store.try_acquire_lease(&lease("disk_1", "a")).unwrap(),
            LeaseAttempt::Acquired(_)
        ));
        assert!(
            matches!(store.try_acquire_lease(&lease("disk_1", "b")).unwrap(), LeaseAttempt::HeldBy(l) if l.holder == "a")
        );
        assert!(matches!(
            store.begin_delete("disk_1").unwrap_err(),
            StoreError::Leased {
                op: DiskOp::Delete,
                ..
            }
        ));
        assert_eq!(store.release_lease("disk_1", Some("b")).unwrap(), None);
        assert_eq!(
            store.release_lease("disk_1", None).unwrap(),
            Some("a".into())
        );
        assert_eq!(store.release_lease("disk_1", None).unwrap(), None);
        store.begin_delete("disk_1").unwrap();
        assert!(store.try_acquire_lease(&lease("disk_1", "b")).is_err());
    }
}
