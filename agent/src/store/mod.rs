//! The agent's durable state: SQLite in WAL mode with versioned migrations. The database says
//! what *should* exist; the kernel says what does. Every change is one transaction, so a
//! kill -9 leaves either the old or the new row, and reconciliation closes the gap.
//!
//! One module per table family (`disks`, `sandboxes`, `endpoints`, `addons`); this one opens
//! the store, migrates it, and owns the one way to the connection, [`Store::with_conn`]. The
//! store speaks SQL only: it refuses with a [`StoreError`] that says what was refused, and
//! core turns that into the message the user reads.

mod addon_extra;
pub mod addons;
mod disks;
mod endpoints;
mod error;
mod owner;
pub mod pitr;
pub mod rotations;
mod sandboxes;
mod sql;
pub mod switches;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

pub use crate::core::owner::Owner;
pub use crate::core::status::{DiskStatus, EndpointStatus, SandboxStatus};
pub use disks::{DiskRow, LeaseAttempt, LeaseRow, PendingRestore};
pub use endpoints::EndpointRow;
pub use error::{DiskOp, StoreError, StoreResult};
pub use sandboxes::SandboxRow;

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
    // 10: a shared server's administrator rotation in flight (store/rotations.rs).
    rotations::MIGRATION_ADMIN_ROTATION,
    // 11: redeploy switches in flight (store/switches.rs).
    switches::MIGRATION_SWITCHES,
];

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

    /// Runs `work`, which may commit durably, on the connection under the store's lock.
    ///
    /// A commit with `synchronous = FULL` waits for an fsync (milliseconds). On the agent's
    /// multi-thread runtime that must not stall a worker thread (and every task queued on it),
    /// so the work runs under `block_in_place`, which hands the worker's other tasks to
    /// another thread first. `block_in_place` panics on a current-thread runtime (tests,
    /// tools), and outside a runtime there is nothing to protect: there the work runs
    /// directly. Taking a closure (never handing out the guard) means the lock cannot be held
    /// across an `.await`. Reads and unforced commits go through [`Store::read`] and
    /// [`Store::volatile`] instead.
    pub(crate) fn with_conn<T, E>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let locked = || work(&mut self.lock());
        if on_multi_thread_runtime() {
            tokio::task::block_in_place(locked)
        } else {
            locked()
        }
    }

    /// Runs `work` that only reads, on the caller's thread. A read is served from SQLite's
    /// page cache and the WAL in microseconds; handing the worker off (`block_in_place`) costs
    /// more than that (measured: 1.4 ms more per network endpoint create, which reads the
    /// endpoint table several times). It may wait for the lock while a durable commit holds
    /// it: one fsync at most.
    pub(crate) fn read<T, E>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        work(&mut self.lock())
    }

    /// Runs `work` with commits that are not forced to disk (`synchronous = NORMAL`; in WAL
    /// mode the next forced commit makes them durable too, in order). Only for rows that
    /// describe what a host crash ends anyway (sandboxes, network endpoints): a process
    /// crash loses none of them, a power loss at most the newest few, and reconciliation
    /// removes whatever those described. Saves an fsync per commit on a sandbox start.
    fn volatile<T>(&self, work: impl FnOnce(&mut Connection) -> StoreResult<T>) -> StoreResult<T> {
        /// Puts `synchronous = FULL` back even if `work` panics.
        struct Unforced<'a>(&'a mut Connection);
        impl Drop for Unforced<'_> {
            fn drop(&mut self) {
                if let Err(e) = self.0.execute_batch("PRAGMA synchronous = FULL") {
                    tracing::error!(error = %e, "restoring synchronous = FULL failed");
                }
            }
        }
        // No fsync to wait for: on the caller's thread, like a read.
        self.read(|conn| {
            let unforced = Unforced(conn);
            unforced.0.execute_batch("PRAGMA synchronous = NORMAL")?;
            work(&mut *unforced.0)
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> StoreResult<i64> {
        self.read(|conn| Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?))
    }
}

/// Whether this thread runs a multi-thread tokio runtime's tasks (or may block inside one):
/// the only place `block_in_place` is both allowed and useful.
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
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
    use crate::core::error::Error;
    use rusqlite::params;

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
        let err = Error::from(store.insert_sandbox(&row).unwrap_err());
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
                .with_conn(|conn| conn.query_row("PRAGMA synchronous", [], |r| r.get(0)))
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

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-db")
            .tempdir()
            .unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    /// Outside any runtime (tools, reconcile before the runtime starts) the work runs directly.
    #[test]
    fn store_calls_work_outside_a_runtime() {
        let (_dir, store) = temp_store();
        assert!(!on_multi_thread_runtime());
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    /// `block_in_place` would panic here: the work must run directly.
    #[tokio::test(flavor = "current_thread")]
    async fn store_calls_work_on_a_current_thread_runtime() {
        let (_dir, store) = temp_store();
        assert!(!on_multi_thread_runtime());
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert!(store.sandboxes().unwrap().is_empty());
    }

    /// On the agent's runtime, store work leaves the worker thread: with one worker, a task
    /// the store work waits for still runs (it could not if the work blocked the worker).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn store_work_on_a_multi_thread_runtime_does_not_block_the_worker() {
        let (_dir, store) = temp_store();
        let store = std::sync::Arc::new(store);
        let in_task = std::sync::Arc::clone(&store);
        // Runs on the one worker (the test body itself runs on the main thread).
        let heard = tokio::spawn(async move {
            assert!(on_multi_thread_runtime());
            let (tx, rx) = std::sync::mpsc::channel();
            // Queued on this worker: it runs only once the store work hands the worker off.
            let signal = tokio::spawn(async move { tx.send(()).is_ok() });
            let heard = in_task.with_conn(|conn| {
                let heard = rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok();
                conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                    .map(|_| heard)
            });
            assert!(signal.await.unwrap());
            heard
        })
        .await
        .unwrap();
        assert!(
            heard.unwrap(),
            "the queued task never ran: the worker was blocked"
        );
        // The ordinary methods work from a task as well.
        let in_task = std::sync::Arc::clone(&store);
        let count = tokio::spawn(async move { in_task.disks().map(|d| d.len()) })
            .await
            .unwrap();
        assert_eq!(count.unwrap(), 0);
    }

    /// Blocking threads of a multi-thread runtime (`spawn_blocking`) may call the store too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn store_calls_work_from_spawn_blocking() {
        let (_dir, store) = temp_store();
        let store = std::sync::Arc::new(store);
        let in_blocking = std::sync::Arc::clone(&store);
        let version = tokio::task::spawn_blocking(move || in_blocking.schema_version())
            .await
            .unwrap();
        assert_eq!(version.unwrap(), MIGRATIONS.len() as i64);
    }
}
