//! The agent's durable state: SQLite in WAL mode with versioned migrations. The database says
//! what *should* exist; the kernel says what does. Every change is one transaction, so a
//! kill -9 leaves either the old or the new row, and reconciliation closes the gap.

pub mod addons;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::core::error::Error;
pub use crate::core::status::{DiskStatus, EndpointStatus, SandboxStatus};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Never edit a shipped entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: disks, leases, local storage.
    "CREATE TABLE disks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL UNIQUE,
        size_gb INTEGER NOT NULL,
        filesystem TEXT NOT NULL,
        read_only INTEGER NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE leases (
        disk_id TEXT PRIMARY KEY REFERENCES disks(id),
        holder TEXT NOT NULL,
        acquired_at TEXT NOT NULL,
        holder_pid INTEGER,
        holder_start_time INTEGER
    );
    CREATE TABLE local_storage (
        app TEXT PRIMARY KEY,
        created_at TEXT NOT NULL
    );",
    // 2: network endpoints and the IPAM cursor.
    "CREATE TABLE endpoints (
        owner TEXT PRIMARY KEY,
        app TEXT NOT NULL,
        ip TEXT NOT NULL UNIQUE,
        allow_from TEXT NOT NULL,
        publish TEXT NOT NULL,
        status TEXT NOT NULL,
        owner_pid INTEGER,
        owner_start_time INTEGER,
        created_at TEXT NOT NULL
    );
    CREATE TABLE ipam (
        subnet TEXT PRIMARY KEY,
        last_ip TEXT NOT NULL
    );",
    // 3: restores in flight. The new image is fully written and verified beside the old one
    // before the row says `restoring`; after a crash, the presence of that file tells whether
    // the swap happened.
    "ALTER TABLE disks ADD COLUMN restore_image TEXT;
     ALTER TABLE disks ADD COLUMN restore_size_gb INTEGER;
     ALTER TABLE disks ADD COLUMN restore_filesystem TEXT;",
    // 4: sandboxes. The supervisor's files in the state dir say how the sandbox runs; the row
    // says it exists (and whether a run or delete was cut short).
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        app TEXT NOT NULL,
        image TEXT NOT NULL,
        status TEXT NOT NULL,
        disks TEXT NOT NULL,
        created_at TEXT NOT NULL
    );",
    // 5: apps (the last deployed declaration), addons attached to apps (with their
    // credentials), and the per-node servers shared addons live on. An addon row exists
    // before anything is made for it and goes only after everything is removed, so a crash
    // can never orphan a sandbox, disk, database or role.
    "CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE addons (
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        variant TEXT NOT NULL,
        version TEXT NOT NULL,
        image TEXT NOT NULL,
        source TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        db_user TEXT NOT NULL,
        db_password TEXT NOT NULL,
        db_name TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (app, kind)
    );
    CREATE TABLE addon_servers (
        kind TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        image TEXT NOT NULL,
        status TEXT NOT NULL,
        admin_user TEXT NOT NULL,
        admin_password TEXT NOT NULL,
        created_at TEXT NOT NULL
    );",
    // 6: whether an addon's server ever answered: a data directory left by an initdb cut
    // short is only discarded for an addon that never did.
    "ALTER TABLE addons ADD COLUMN ever_active INTEGER NOT NULL DEFAULT 0;
     UPDATE addons SET ever_active = 1 WHERE status = 'active';",
    // 7: a digest of the addon variables an app's services were last started with, so a
    // change made outside a deploy (an addon settling in the background) restarts them.
    "ALTER TABLE apps ADD COLUMN addon_env TEXT;",
    // 8: structural identity. Who a sandbox or disk belongs to is recorded in columns, never
    // read out of its name: `app` (app, service; for disks the service is empty), `addon`
    // (app, addon kind: an app's dedicated server) or `shared` ('', addon kind). No owner:
    // a plain `sandbox run`, or a disk made with `debug disk create` that no app claimed yet.
    // Existing rows are filled from the names the agent gave them, which are unambiguous
    // together with the sandbox's recorded app: an addon server runs as its own app
    // (`addon-pg-<app>` or `addon-pg`), a service as its app with `<app>-<service>`.
    "ALTER TABLE sandboxes ADD COLUMN owner_kind TEXT;
     ALTER TABLE sandboxes ADD COLUMN owner_app TEXT;
     ALTER TABLE sandboxes ADD COLUMN owner_part TEXT;
     ALTER TABLE disks ADD COLUMN owner_kind TEXT;
     ALTER TABLE disks ADD COLUMN owner_app TEXT;
     ALTER TABLE disks ADD COLUMN owner_part TEXT;
     UPDATE sandboxes SET owner_kind = 'shared', owner_app = '', owner_part = 'miren-postgresql'
      WHERE name = 'addon-pg' AND app = 'addon-pg'
        AND EXISTS (SELECT 1 FROM addon_servers WHERE kind = 'miren-postgresql');
     UPDATE sandboxes SET owner_app = (SELECT a.app FROM addons a
        WHERE a.variant = 'small' AND 'addon-pg-' || a.app = sandboxes.name)
      WHERE owner_kind IS NULL AND app = name;
     UPDATE sandboxes SET owner_kind = 'addon', owner_part = 'miren-postgresql'
      WHERE owner_kind IS NULL AND owner_app IS NOT NULL;
     UPDATE sandboxes SET owner_app = app, owner_part = (
        SELECT json_extract(s.value, '$.name') FROM apps, json_each(apps.spec, '$.services') s
         WHERE apps.name = sandboxes.app
           AND sandboxes.name = apps.name || '-' || json_extract(s.value, '$.name'))
      WHERE owner_kind IS NULL;
     UPDATE sandboxes SET owner_kind = 'app' WHERE owner_kind IS NULL AND owner_part IS NOT NULL;
     UPDATE sandboxes SET owner_app = NULL, owner_part = NULL WHERE owner_kind IS NULL;
     CREATE UNIQUE INDEX sandboxes_by_owner ON sandboxes (owner_kind, owner_app, owner_part)
      WHERE owner_kind IS NOT NULL;
     UPDATE disks SET owner_kind = 'shared', owner_app = '', owner_part = 'miren-postgresql'
      WHERE name = 'addon-pg'
        AND EXISTS (SELECT 1 FROM addon_servers WHERE kind = 'miren-postgresql');
     UPDATE disks SET owner_app = (SELECT a.app FROM addons a
        WHERE a.variant = 'small' AND 'addon-pg-' || a.app = disks.name)
      WHERE owner_kind IS NULL;
     UPDATE disks SET owner_kind = 'addon', owner_part = 'miren-postgresql'
      WHERE owner_kind IS NULL AND owner_app IS NOT NULL;
     UPDATE disks SET owner_app = (
        SELECT apps.name FROM apps, json_each(apps.spec, '$.services') s,
               json_each(s.value, '$.disks') d
         WHERE NOT json_extract(d.value, '$.local')
           AND lower(json_extract(d.value, '$.name')) = disks.name_key
         ORDER BY apps.created_at, apps.name LIMIT 1)
      WHERE owner_kind IS NULL;
     UPDATE disks SET owner_kind = 'app', owner_part = ''
      WHERE owner_kind IS NULL AND owner_app IS NOT NULL;",
    // 9: generic addon credentials (store/addons.rs).
    addons::MIGRATION_GENERIC_CREDENTIALS,
];

/// Who a sandbox or disk belongs to, as recorded in its row (never derived from its name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// An app: its service's sandbox, or (with `service` empty) a disk it claimed.
    App { app: String, service: String },
    /// An app's dedicated server of an addon kind: its sandbox and its disk.
    Addon { app: String, kind: String },
    /// The node's shared server of an addon kind: its sandbox and its disk.
    Shared { kind: String },
}

impl Owner {
    /// An app as a disk owner.
    pub fn app(app: &str) -> Owner {
        Owner::App {
            app: app.to_string(),
            service: String::new(),
        }
    }

    pub fn service(app: &str, service: &str) -> Owner {
        Owner::App {
            app: app.to_string(),
            service: service.to_string(),
        }
    }

    fn columns(&self) -> (&'static str, &str, &str) {
        match self {
            Owner::App { app, service } => ("app", app, service),
            Owner::Addon { app, kind } => ("addon", app, kind),
            Owner::Shared { kind } => ("shared", "", kind),
        }
    }

    fn from_columns(
        kind: Option<String>,
        app: Option<String>,
        part: Option<String>,
    ) -> Option<Owner> {
        let (app, part) = (app.unwrap_or_default(), part.unwrap_or_default());
        match kind.as_deref()? {
            "app" => Some(Owner::App { app, service: part }),
            "addon" => Some(Owner::Addon { app, kind: part }),
            "shared" => Some(Owner::Shared { kind: part }),
            _ => None,
        }
    }

    /// The same owner as a disk owner: a service's disks belong to its app.
    pub fn as_disk_owner(&self) -> Owner {
        match self {
            Owner::App { app, .. } => Owner::app(app),
            other => other.clone(),
        }
    }

    /// For messages: `app `x``, `the miren-postgresql addon of app `x``, ...
    pub fn describe(&self) -> String {
        match self {
            Owner::App { app, service } if service.is_empty() => format!("app `{app}`"),
            Owner::App { app, service } => format!("service `{service}` of app `{app}`"),
            Owner::Addon { app, kind } => format!("the {kind} addon of app `{app}`"),
            Owner::Shared { kind } => format!("the shared {kind} server"),
        }
    }
}

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

pub struct Store {
    conn: Mutex<Connection>,
}

/// Why the state store could not be opened. The agent refuses to start on any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("opening state store {}: {error}", path.display())]
    Open {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("configuring state store: {0}")]
    Configure(rusqlite::Error),
    #[error("reading schema version: {0}")]
    ReadVersion(rusqlite::Error),
    #[error(
        "the state store has schema version {found}, newer than this agent understands ({known}); run the newer miren that wrote it"
    )]
    TooNew { found: i64, known: i64 },
    #[error("applying schema migration {target}: {error}")]
    Migrate { target: i64, error: rusqlite::Error },
    #[error("securing state store {}: {error}", path.display())]
    Secure {
        path: PathBuf,
        error: std::io::Error,
    },
}

const DISK_COLUMNS: &str = "id, name, size_gb, filesystem, read_only, status, error, created_at";

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

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreOpenError> {
        let conn = Connection::open(path).map_err(|error| StoreOpenError::Open {
            path: path.to_path_buf(),
            error,
        })?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(StoreOpenError::Configure)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(StoreOpenError::Configure)?;
        migrate(&conn)?;
        // The store holds addon credentials: only root may read it (and its WAL files).
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            if let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(StoreOpenError::Secure {
                        path: path.to_path_buf(),
                        error: e,
                    });
                }
            }
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `work` with commits that are not forced to disk (`synchronous = NORMAL`; in WAL
    /// mode the next forced commit makes them durable too, in order). Only for rows that
    /// describe what a host crash ends anyway (sandboxes, network endpoints): a process
    /// crash loses none of them, a power loss at most the newest few, and reconciliation
    /// removes whatever those described. Saves an fsync per commit on a sandbox start.
    fn volatile<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        /// Puts `synchronous = FULL` back even if `work` panics.
        struct Unforced<'a>(MutexGuard<'a, Connection>);
        impl Drop for Unforced<'_> {
            fn drop(&mut self) {
                if let Err(e) = self.0.execute_batch("PRAGMA synchronous = FULL") {
                    tracing::error!(error = %e, "restoring synchronous = FULL failed");
                }
            }
        }
        let mut conn = Unforced(self.conn());
        conn.0.execute_batch("PRAGMA synchronous = NORMAL")?;
        work(&mut conn.0)
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64, Error> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Records a new disk in `creating`, refusing a name that exists in any case.
    pub fn insert_creating_disk(&self, disk: &DiskRow) -> Result<(), Error> {
        self.insert_creating_disk_owned(disk, None)
    }

    /// [`Self::insert_creating_disk`], owned by `owner` from the start.
    pub fn insert_creating_disk_owned(
        &self,
        disk: &DiskRow,
        owner: Option<&Owner>,
    ) -> Result<(), Error> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(String, String)> = tx
            .query_row(
                "SELECT id, name FROM disks WHERE name_key = ?1",
                [disk.name.to_lowercase()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((id, name)) = existing {
            return Err(Error::conflict(format!(
                "a disk named `{name}` already exists (id {id}); use it, pick another name, or delete it first"
            )));
        }
        let owner = owner.map(Owner::columns);
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
                DiskStatus::Creating.as_str(),
                disk.created_at,
                owner.map(|o| o.0),
                owner.map(|o| o.1),
                owner.map(|o| o.2),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn set_status(
        &self,
        id: &str,
        status: DiskStatus,
        error: Option<&str>,
    ) -> Result<(), Error> {
        self.conn().execute(
            "UPDATE disks SET status = ?2, error = ?3 WHERE id = ?1",
            params![id, status, error],
        )?;
        Ok(())
    }

    pub fn disk(&self, id: &str) -> Result<Option<DiskRow>, Error> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {DISK_COLUMNS} FROM disks WHERE id = ?1"),
                [id],
                disk_from_row,
            )
            .optional()?)
    }

    pub fn disk_by_name(&self, name: &str) -> Result<Option<DiskRow>, Error> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {DISK_COLUMNS} FROM disks WHERE name_key = ?1"),
                [name.to_lowercase()],
                disk_from_row,
            )
            .optional()?)
    }

    /// Who the disk belongs to; None while nobody claimed it.
    pub fn disk_owner(&self, id: &str) -> Result<Option<Owner>, Error> {
        let cols: Option<(Option<String>, Option<String>, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT owner_kind, owner_app, owner_part FROM disks WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(cols.and_then(|(k, a, p)| Owner::from_columns(k, a, p)))
    }

    /// The disk `owner` has (addons have one each; apps may have several: the oldest).
    pub fn disk_of(&self, owner: &Owner) -> Result<Option<DiskRow>, Error> {
        let (kind, app, part) = owner.columns();
        Ok(self
            .conn()
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
    }

    /// Gives an unowned disk to `owner` (in one statement, so two claimants cannot both win);
    /// returns who owns it afterwards.
    pub fn claim_disk(&self, id: &str, owner: &Owner) -> Result<Option<Owner>, Error> {
        let (kind, app, part) = owner.columns();
        self.conn().execute(
            "UPDATE disks SET owner_kind = ?2, owner_app = ?3, owner_part = ?4
             WHERE id = ?1 AND owner_kind IS NULL",
            params![id, kind, app, part],
        )?;
        self.disk_owner(id)
    }

    pub fn disks(&self) -> Result<Vec<DiskRow>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {DISK_COLUMNS} FROM disks ORDER BY name_key"
        ))?;
        let rows = stmt.query_map([], disk_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Moves a disk to `deleting`, in the same transaction that checks it is not leased, so a
    /// lease can never be granted on a disk that is going away.
    pub fn begin_delete(&self, id: &str) -> Result<DiskRow, Error> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let disk = tx
            .query_row(
                &format!("SELECT {DISK_COLUMNS} FROM disks WHERE id = ?1"),
                [id],
                disk_from_row,
            )
            .optional()?
            .ok_or_else(|| Error::not_found(format!("disk {id} does not exist")))?;
        let lease = tx
            .query_row(
                "SELECT disk_id, holder, acquired_at, holder_pid, holder_start_time FROM leases WHERE disk_id = ?1",
                [id],
                lease_from_row,
            )
            .optional()?;
        if let Some(lease) = lease {
            return Err(Error::conflict(format!(
                "disk `{}` is leased by `{}` (since {}); stop the holder or run `miren debug disk lease-release -n {}` first",
                disk.name, lease.holder, lease.acquired_at, disk.name
            )));
        }
        match disk.status {
            DiskStatus::Ready | DiskStatus::Error | DiskStatus::Resizing | DiskStatus::Deleting => {
            }
            other => {
                return Err(Error::busy(format!(
                    "disk `{}` is {}; retry when that finishes",
                    disk.name,
                    other.as_str()
                )))
            }
        }
        tx.execute(
            "UPDATE disks SET status = ?2 WHERE id = ?1",
            params![id, DiskStatus::Deleting],
        )?;
        tx.commit()?;
        Ok(disk)
    }

    pub fn remove_disk(&self, id: &str) -> Result<(), Error> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM leases WHERE disk_id = ?1", [id])?;
        tx.execute("DELETE FROM disks WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Records the new size and marks the disk `resizing`; the kernel side follows and
    /// reconciliation finishes it after a crash.
    pub fn begin_resize(&self, id: &str, size_gb: u64) -> Result<DiskRow, Error> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let disk = tx
            .query_row(
                &format!("SELECT {DISK_COLUMNS} FROM disks WHERE id = ?1"),
                [id],
                disk_from_row,
            )
            .optional()?
            .ok_or_else(|| Error::not_found(format!("disk {id} does not exist")))?;
        if disk.status != DiskStatus::Ready && disk.status != DiskStatus::Resizing {
            return Err(Error::busy(format!(
                "disk `{}` is {}; it can be resized once it is ready",
                disk.name,
                disk.status.as_str()
            )));
        }
        if size_gb < disk.size_gb {
            return Err(Error::invalid(format!(
                "disk `{}` is {} GiB; shrinking to {size_gb} GiB is not supported (disks only grow). Back it up and restore into a new, smaller disk instead",
                disk.name, disk.size_gb
            )));
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
    }

    /// Ends a resize, successful or rolled back: records the size the disk really has now.
    pub fn end_resize(&self, id: &str, size_gb: u64, error: Option<&str>) -> Result<(), Error> {
        self.conn().execute(
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
    }

    /// Grants the lease if the disk is free (or already held by the same holder: retries are
    /// idempotent), otherwise reports the current holder.
    pub fn try_acquire_lease(&self, lease: &LeaseRow) -> Result<LeaseAttempt, Error> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let status: Option<DiskStatus> = tx
            .query_row(
                "SELECT status FROM disks WHERE id = ?1",
                [&lease.disk_id],
                |r| r.get(0),
            )
            .optional()?;
        match status {
            None => {
                return Err(Error::not_found(format!(
                    "disk {} does not exist",
                    lease.disk_id
                )))
            }
            // Not while resizing: ext4 may have to grow unmounted on hosts that forbid online growth.
            Some(DiskStatus::Ready) => {}
            Some(other) => {
                return Err(Error::busy(format!(
                    "disk {} is {} and cannot be leased",
                    lease.disk_id,
                    other.as_str()
                )))
            }
        }
        let current = tx
            .query_row(
                "SELECT disk_id, holder, acquired_at, holder_pid, holder_start_time FROM leases WHERE disk_id = ?1",
                [&lease.disk_id],
                lease_from_row,
            )
            .optional()?;
        if let Some(current) = current {
            return Ok(if current.holder == lease.holder {
                LeaseAttempt::Acquired(current)
            } else {
                LeaseAttempt::HeldBy(current)
            });
        }
        tx.execute(
            "INSERT INTO leases (disk_id, holder, acquired_at, holder_pid, holder_start_time)
             VALUES (?1, ?2, ?3, ?4, ?5)",
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
    }

    /// Releases a disk's lease. With `only_holder`, releases only if that holder has it (so a
    /// stale release can never take a lease from its next holder).
    pub fn release_lease(
        &self,
        disk_id: &str,
        only_holder: Option<&str>,
    ) -> Result<Option<String>, Error> {
        let mut conn = self.conn();
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
    }

    pub fn lease(&self, disk_id: &str) -> Result<Option<LeaseRow>, Error> {
        Ok(self
            .conn()
            .query_row(
                "SELECT disk_id, holder, acquired_at, holder_pid, holder_start_time FROM leases WHERE disk_id = ?1",
                [disk_id],
                lease_from_row,
            )
            .optional()?)
    }

    pub fn leases(&self) -> Result<Vec<LeaseRow>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT l.disk_id, l.holder, l.acquired_at, l.holder_pid, l.holder_start_time
             FROM leases l JOIN disks d ON d.id = l.disk_id ORDER BY d.name_key",
        )?;
        let rows = stmt.query_map([], lease_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records an app's local storage; returns its creation time (existing or new).
    pub fn ensure_local_storage(&self, app: &str, now: &str) -> Result<String, Error> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO local_storage (app, created_at) VALUES (?1, ?2)",
            params![app, now],
        )?;
        Ok(conn.query_row(
            "SELECT created_at FROM local_storage WHERE app = ?1",
            [app],
            |r| r.get(0),
        )?)
    }

    pub fn local_storage(&self) -> Result<Vec<(String, String)>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT app, created_at FROM local_storage ORDER BY app")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A restore waiting to be swapped in: the verified image beside the old one, and what the
/// disk becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRestore {
    pub image: String,
    pub size_gb: u64,
    pub filesystem: String,
}

impl Store {
    /// Marks an existing disk `restoring`, refusing while it is leased (in the same
    /// transaction, so no lease can be granted meanwhile).
    pub fn begin_restore(&self, id: &str, pending: &PendingRestore) -> Result<(), Error> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let disk = tx
            .query_row(
                &format!("SELECT {DISK_COLUMNS} FROM disks WHERE id = ?1"),
                [id],
                disk_from_row,
            )
            .optional()?
            .ok_or_else(|| Error::not_found(format!("disk {id} does not exist")))?;
        let holder: Option<(String, String)> = tx
            .query_row(
                "SELECT holder, acquired_at FROM leases WHERE disk_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((holder, since)) = holder {
            return Err(Error::conflict(format!(
                "disk `{}` is in use by `{holder}` (since {since}); stop the app that holds it, then restore",
                disk.name
            )));
        }
        if !matches!(disk.status, DiskStatus::Ready | DiskStatus::Error) {
            return Err(Error::busy(format!(
                "disk `{}` is {}; retry when that finishes",
                disk.name,
                disk.status.as_str()
            )));
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
    }

    pub fn pending_restore(&self, id: &str) -> Result<Option<PendingRestore>, Error> {
        let row: Option<(Option<String>, Option<i64>, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT restore_image, restore_size_gb, restore_filesystem FROM disks WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
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
    pub fn end_restore(&self, id: &str, applied: bool) -> Result<(), Error> {
        let sql = if applied {
            "UPDATE disks SET size_gb = restore_size_gb, filesystem = restore_filesystem,
             status = ?2, error = NULL, restore_image = NULL, restore_size_gb = NULL,
             restore_filesystem = NULL WHERE id = ?1 AND restore_image IS NOT NULL"
        } else {
            "UPDATE disks SET status = ?2, restore_image = NULL, restore_size_gb = NULL,
             restore_filesystem = NULL WHERE id = ?1"
        };
        self.conn().execute(sql, params![id, DiskStatus::Ready])?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub name: String,
    pub app: String,
    pub image: String,
    /// `creating`, `created` or `deleting`.
    pub status: SandboxStatus,
    /// Names of the disks whose leases the sandbox holds.
    pub disks: Vec<String>,
    pub created_at: String,
    /// Whose it is (an app's service, an addon's server); None for a plain `sandbox run`.
    pub owner: Option<Owner>,
}

fn sandbox_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let disks: String = row.get(5)?;
    Ok(SandboxRow {
        id: row.get(0)?,
        name: row.get(1)?,
        app: row.get(2)?,
        image: row.get(3)?,
        status: row.get(4)?,
        disks: serde_json::from_str(&disks).unwrap_or_default(),
        created_at: row.get(6)?,
        owner: Owner::from_columns(row.get(7)?, row.get(8)?, row.get(9)?),
    })
}

const SANDBOX_COLUMNS: &str =
    "id, name, app, image, status, disks, created_at, owner_kind, owner_app, owner_part";

impl Store {
    pub fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), Error> {
        self.volatile(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM sandboxes WHERE name = ?1",
                    [&row.name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = existing {
                return Err(Error::name_taken(format!(
                    "a sandbox named `{}` already exists ({id}); pick another name or delete it first",
                    row.name
                )));
            }
            let owner = row.owner.as_ref().map(Owner::columns);
            if let Some((kind, app, part)) = owner {
                let existing: Option<String> = tx
                    .query_row(
                        "SELECT name FROM sandboxes
                         WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3",
                        params![kind, app, part],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(name) = existing {
                    return Err(Error::conflict(format!(
                        "{} already runs as sandbox `{name}`; delete it first",
                        row.owner.as_ref().map(Owner::describe).unwrap_or_default()
                    )));
                }
            }
            tx.execute(
                &format!(
                    "INSERT INTO sandboxes ({SANDBOX_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                ),
                params![
                    row.id,
                    row.name,
                    row.app,
                    row.image,
                    row.status,
                    serde_json::to_string(&row.disks).unwrap_or_else(|_| "[]".into()),
                    row.created_at,
                    owner.map(|o| o.0),
                    owner.map(|o| o.1),
                    owner.map(|o| o.2),
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn set_sandbox_status(&self, id: &str, status: SandboxStatus) -> Result<(), Error> {
        self.volatile(|conn| {
            conn.execute(
                "UPDATE sandboxes SET status = ?2 WHERE id = ?1",
                params![id, status],
            )?;
            Ok(())
        })
    }

    pub fn sandbox(&self, id_or_name: &str) -> Result<Option<SandboxRow>, Error> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1 OR name = ?1"),
                [id_or_name],
                sandbox_from_row,
            )
            .optional()?)
    }

    /// The sandbox `owner` runs (an app's service, an addon's server), whatever it is called.
    pub fn sandbox_of(&self, owner: &Owner) -> Result<Option<SandboxRow>, Error> {
        let (kind, app, part) = owner.columns();
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3"
                ),
                params![kind, app, part],
                sandbox_from_row,
            )
            .optional()?)
    }

    /// Whether a sandbox has this name (display names stay unique).
    pub fn sandbox_name_taken(&self, name: &str) -> Result<bool, Error> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM sandboxes WHERE name = ?1",
                [name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn sandboxes(&self) -> Result<Vec<SandboxRow>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, name"
        ))?;
        let rows = stmt.query_map([], sandbox_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn remove_sandbox(&self, id: &str) -> Result<(), Error> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Whether a lease holder or endpoint owner still exists: sandbox ids (`sbx_...`) exist
    /// while their row does; `pid:N` while the process does; other names always.
    pub fn holder_exists(&self, holder: &str, pid: Option<i64>, start: Option<i64>) -> bool {
        if crate::core::owner::holder_is_gone(pid, start) {
            return false;
        }
        if holder.starts_with("sbx_") {
            return self
                .conn()
                .query_row(
                    "SELECT 1 FROM sandboxes WHERE id = ?1",
                    [holder],
                    |_| Ok(()),
                )
                .optional()
                .map(|r| r.is_some())
                .unwrap_or(true);
        }
        true
    }

    /// Leases held by `holder` (disk ids).
    pub fn leases_of(&self, holder: &str) -> Result<Vec<String>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT disk_id FROM leases WHERE holder = ?1")?;
        let rows = stmt.query_map([holder], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A network endpoint as recorded: `creating` and `deleting` mark operations in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRow {
    pub owner: String,
    pub app: String,
    pub ip: Ipv4Addr,
    pub allow_from: Vec<String>,
    /// Published ports as `host_ip:host_port:port`.
    pub publish: Vec<String>,
    pub status: EndpointStatus,
    pub owner_pid: Option<i64>,
    pub owner_start_time: Option<i64>,
    pub created_at: String,
}

const ENDPOINT_COLUMNS: &str =
    "owner, app, ip, allow_from, publish, status, owner_pid, owner_start_time, created_at";

fn endpoint_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EndpointRow> {
    let ip: String = row.get(2)?;
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = row.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    Ok(EndpointRow {
        owner: row.get(0)?,
        app: row.get(1)?,
        ip: ip.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
        })?,
        allow_from: list(3)?,
        publish: list(4)?,
        status: row.get(5)?,
        owner_pid: row.get(6)?,
        owner_start_time: row.get(7)?,
        created_at: row.get(8)?,
    })
}

impl Store {
    /// Allocates an address and records the endpoint as `creating`, in one transaction: an
    /// address is never handed out twice, and allocation continues after the last address
    /// handed out, so a just-released address is not reused while caches may remember it.
    pub fn insert_creating_endpoint(
        &self,
        endpoint: &EndpointRow,
        subnet_key: &str,
        candidates: impl Fn(Option<Ipv4Addr>, &HashSet<Ipv4Addr>) -> Option<Ipv4Addr>,
    ) -> Result<EndpointRow, Error> {
        self.volatile(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing = tx
                .query_row(
                    &format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE owner = ?1"),
                    [&endpoint.owner],
                    endpoint_from_row,
                )
                .optional()?;
            if let Some(existing) = existing {
                return Err(Error::conflict(format!(
                    "owner `{}` already has an endpoint ({}, app {}); delete it first or use another owner",
                    existing.owner, existing.ip, existing.app
                )));
            }
            let used: HashSet<Ipv4Addr> = {
                let mut stmt = tx.prepare("SELECT ip FROM endpoints")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                rows.filter_map(|r| r.ok().and_then(|ip| ip.parse().ok()))
                    .collect()
            };
            let last: Option<Ipv4Addr> = tx
                .query_row(
                    "SELECT last_ip FROM ipam WHERE subnet = ?1",
                    [subnet_key],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
                .and_then(|ip| ip.parse().ok());
            let ip = candidates(last, &used).ok_or_else(|| {
                Error::new(
                    crate::core::error::ErrorKind::NoSpace,
                    "subnet_exhausted",
                    format!(
                        "no free address left in {subnet_key} ({} in use); delete endpoints or start the agent with a larger --subnet",
                        used.len()
                    ),
                )
            })?;
            let row = EndpointRow {
                ip,
                status: EndpointStatus::Creating,
                ..endpoint.clone()
            };
            tx.execute(
                &format!("INSERT INTO endpoints ({ENDPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    row.owner,
                    row.app,
                    row.ip.to_string(),
                    serde_json::to_string(&row.allow_from).unwrap_or_else(|_| "[]".into()),
                    serde_json::to_string(&row.publish).unwrap_or_else(|_| "[]".into()),
                    row.status,
                    row.owner_pid,
                    row.owner_start_time,
                    row.created_at
                ],
            )?;
            tx.execute(
                "INSERT INTO ipam (subnet, last_ip) VALUES (?1, ?2)
                 ON CONFLICT(subnet) DO UPDATE SET last_ip = excluded.last_ip",
                params![subnet_key, row.ip.to_string()],
            )?;
            tx.commit()?;
            Ok(row)
        })
    }

    pub fn set_endpoint_allow_from(
        &self,
        owner: &str,
        allow_from: &[String],
    ) -> Result<bool, Error> {
        let changed = self.conn().execute(
            "UPDATE endpoints SET allow_from = ?2 WHERE owner = ?1",
            params![
                owner,
                serde_json::to_string(allow_from).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        Ok(changed > 0)
    }

    pub fn set_endpoint_status(&self, owner: &str, status: EndpointStatus) -> Result<(), Error> {
        self.volatile(|conn| {
            conn.execute(
                "UPDATE endpoints SET status = ?2 WHERE owner = ?1",
                params![owner, status],
            )?;
            Ok(())
        })
    }

    pub fn endpoint(&self, owner: &str) -> Result<Option<EndpointRow>, Error> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE owner = ?1"),
                [owner],
                endpoint_from_row,
            )
            .optional()?)
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointRow>, Error> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY owner"
        ))?;
        let rows = stmt.query_map([], endpoint_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Releases the endpoint's address. Idempotent: releasing twice is fine.
    pub fn remove_endpoint(&self, owner: &str) -> Result<(), Error> {
        self.conn()
            .execute("DELETE FROM endpoints WHERE owner = ?1", [owner])?;
        Ok(())
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreOpenError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(StoreOpenError::ReadVersion)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreOpenError::TooNew {
            found: version,
            known,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let target = index as i64 + 1;
        let apply = || -> rusqlite::Result<()> {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", target)?;
            tx.commit()
        };
        apply().map_err(|error| StoreOpenError::Migrate { target, error })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn migrations_apply_once_and_refuse_newer_schemas() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-db")
            .tempdir()
            .unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(store);
        Store::open(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap();
        assert!(
            matches!(err, StoreOpenError::TooNew { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("run the newer miren"), "{err}");
    }

    /// Migration 8 on a store an agent of schema 7 left, in the state the finding left it:
    /// services of colliding apps, an app named like an addon server, an app disk named like an
    /// addon's disk, and disks made by hand.
    #[test]
    fn migration_8_fills_owners_from_the_agents_own_names() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-db")
            .tempdir()
            .unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..7] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 7).unwrap();
            let spec = |services: &[(&str, &[&str])]| {
                let services: Vec<serde_json::Value> = services
                    .iter()
                    .map(|(name, disks)| {
                        serde_json::json!({
                            "name": name,
                            "disks": disks.iter().map(|d| serde_json::json!({
                                "name": d, "local": false
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                serde_json::json!({ "services": services, "addons": [] }).to_string()
            };
            for (app, services, at) in [
                ("shop", spec(&[("web", &["shop-data"])]), "1"),
                ("mrs-a", spec(&[("b-c", &[])]), "2"),
                ("victim", spec(&[("web", &[])]), "3"),
                // The attacker, deployed after: same disk, and a server-like service.
                (
                    "addon-pg",
                    spec(&[("victim", &["addon-pg-victim", "shop-data"])]),
                    "4",
                ),
            ] {
                conn.execute(
                    "INSERT INTO apps (name, spec, status, created_at, updated_at)
                     VALUES (?1, ?2, 'running', ?3, ?3)",
                    params![app, services, at],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO addons (app, kind, variant, version, image, source, status,
                                     db_user, db_password, db_name, created_at, updated_at)
                 VALUES ('victim', 'miren-postgresql', 'small', '17', 'postgres:17', 'deploy',
                         'active', 'victim', 'pw', 'victim', '1', '1')",
                [],
            )
            .unwrap();
            for (id, name, app) in [
                ("sbx_1", "shop-web", "shop"),
                ("sbx_2", "mrs-a-b-c", "mrs-a"),
                ("sbx_3", "addon-pg-victim", "addon-pg-victim"),
                ("sbx_4", "victim-web", "victim"),
                ("sbx_5", "loose", "loose"),
            ] {
                conn.execute(
                    "INSERT INTO sandboxes (id, name, app, image, status, disks, created_at)
                     VALUES (?1, ?2, ?3, 'x', 'created', '[]', '1')",
                    params![id, name, app],
                )
                .unwrap();
            }
            for (id, name) in [
                ("disk_1", "shop-data"),
                ("disk_2", "addon-pg-victim"),
                ("disk_3", "by-hand"),
            ] {
                conn.execute(
                    "INSERT INTO disks (id, name, name_key, size_gb, filesystem, read_only,
                                        status, created_at)
                     VALUES (?1, ?2, ?3, 1, 'ext4', 0, 'ready', '1')",
                    params![id, name, name.to_lowercase()],
                )
                .unwrap();
            }
        }
        let store = Store::open(&path).unwrap();
        let owner = |id: &str| store.sandbox(id).unwrap().unwrap().owner;
        assert_eq!(owner("sbx_1"), Some(Owner::service("shop", "web")));
        assert_eq!(owner("sbx_2"), Some(Owner::service("mrs-a", "b-c")));
        let victims_server = Owner::Addon {
            app: "victim".into(),
            kind: "miren-postgresql".into(),
        };
        assert_eq!(owner("sbx_3"), Some(victims_server.clone()));
        assert_eq!(owner("sbx_4"), Some(Owner::service("victim", "web")));
        assert_eq!(owner("sbx_5"), None);
        assert_eq!(
            store.sandbox_of(&victims_server).unwrap().unwrap().id,
            "sbx_3"
        );
        // The first app to declare a disk owns it; the addon owns its own.
        assert_eq!(
            store.disk_owner("disk_1").unwrap(),
            Some(Owner::app("shop"))
        );
        assert_eq!(store.disk_owner("disk_2").unwrap(), Some(victims_server));
        assert_eq!(store.disk_owner("disk_3").unwrap(), None);
        // A hand-made disk is claimed once, by the first.
        assert_eq!(
            store.claim_disk("disk_3", &Owner::app("one")).unwrap(),
            Some(Owner::app("one"))
        );
        assert_eq!(
            store.claim_disk("disk_3", &Owner::app("two")).unwrap(),
            Some(Owner::app("one"))
        );
        // One sandbox per owner.
        let mut row = store.sandbox("sbx_1").unwrap().unwrap();
        row.id = "sbx_9".into();
        row.name = "shop-web-2".into();
        let err = store.insert_sandbox(&row).unwrap_err();
        assert!(
            err.message.contains("already runs as sandbox `shop-web`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn unforced_commits_leave_later_ones_forced() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-db")
            .tempdir()
            .unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let synchronous = |store: &Store| -> i64 {
            store
                .conn()
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(synchronous(&store), 2, "FULL");
        let row = SandboxRow {
            id: "sbx_1".into(),
            name: "one".into(),
            app: "one".into(),
            image: "busybox".into(),
            status: SandboxStatus::Creating,
            disks: vec![],
            created_at: "2026-01-01T00:00:00Z".into(),
            owner: None,
        };
        store.insert_sandbox(&row).unwrap();
        assert!(store.insert_sandbox(&row).is_err(), "a name is taken once");
        store
            .set_sandbox_status("sbx_1", SandboxStatus::Created)
            .unwrap();
        assert_eq!(
            synchronous(&store),
            2,
            "FULL again after unforced commits and errors"
        );
        assert_eq!(
            store.sandbox("one").unwrap().unwrap().status,
            SandboxStatus::Created
        );
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
        assert_eq!(store.begin_delete("disk_1").unwrap_err().code, "conflict");
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
