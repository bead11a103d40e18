//! Sandbox rows. A host crash ends every sandbox, so their commits are not forced to disk
//! (see [`Store::volatile`]).

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use crate::core::status::SandboxStatus;
use crate::store::error::{StoreError, StoreResult};
use crate::store::owner::{owner_columns, owner_from_columns};
use crate::store::{Owner, Store};

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
        owner: owner_from_columns(row.get(7)?, row.get(8)?, row.get(9)?),
    })
}

const SANDBOX_COLUMNS: &str =
    "id, name, app, image, status, disks, created_at, owner_kind, owner_app, owner_part";

impl Store {
    pub fn insert_sandbox(&self, row: &SandboxRow) -> StoreResult<()> {
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
                return Err(StoreError::SandboxNameTaken {
                    name: row.name.clone(),
                    id,
                });
            }
            let owner_cols = row.owner.as_ref().map(owner_columns);
            if let (Some(owner), Some((kind, app, part))) = (&row.owner, owner_cols) {
                let existing: Option<String> = tx
                    .query_row(
                        "SELECT name FROM sandboxes
                         WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3",
                        params![kind, app, part],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(sandbox) = existing {
                    return Err(StoreError::OwnerTaken {
                        owner: owner.clone(),
                        sandbox,
                    });
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
                    owner_cols.map(|o| o.0),
                    owner_cols.map(|o| o.1),
                    owner_cols.map(|o| o.2),
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn set_sandbox_status(&self, id: &str, status: SandboxStatus) -> StoreResult<()> {
        self.volatile(|conn| {
            conn.execute(
                "UPDATE sandboxes SET status = ?2 WHERE id = ?1",
                params![id, status],
            )?;
            Ok(())
        })
    }

    pub fn sandbox(&self, id_or_name: &str) -> StoreResult<Option<SandboxRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1 OR name = ?1"),
                    [id_or_name],
                    sandbox_from_row,
                )
                .optional()?)
        })
    }

    /// The sandbox `owner` runs (an app's service, an addon's server), whatever it is called.
    pub fn sandbox_of(&self, owner: &Owner) -> StoreResult<Option<SandboxRow>> {
        let (kind, app, part) = owner_columns(owner);
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!(
                        "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                         WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3"
                    ),
                    params![kind, app, part],
                    sandbox_from_row,
                )
                .optional()?)
        })
    }

    /// Whether a sandbox has this name (display names stay unique).
    pub fn sandbox_name_taken(&self, name: &str) -> StoreResult<bool> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT 1 FROM sandboxes WHERE name = ?1",
                    [name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }

    pub fn sandboxes(&self) -> StoreResult<Vec<SandboxRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, name"
            ))?;
            let rows = stmt.query_map([], sandbox_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn remove_sandbox(&self, id: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Whether a lease holder or endpoint owner still exists: sandbox ids (`sbx_...`) exist
    /// while their row does; `pid:N` while the process does; other names always. Whether a
    /// process is gone is the caller's to say (`is_gone(pid, start_time)`, a /proc read in
    /// `core::owner`): the store only knows its rows.
    pub fn holder_exists(
        &self,
        holder: &str,
        pid: Option<i64>,
        start: Option<i64>,
        is_gone: impl FnOnce(Option<i64>, Option<i64>) -> bool,
    ) -> bool {
        if is_gone(pid, start) {
            return false;
        }
        if holder.starts_with("sbx_") {
            // A store that cannot answer keeps the holder: reclaiming a live lease is worse.
            return self
                .with_conn(|conn| {
                    Ok::<_, StoreError>(
                        conn.query_row("SELECT 1 FROM sandboxes WHERE id = ?1", [holder], |_| {
                            Ok(())
                        })
                        .optional()?
                        .is_some(),
                    )
                })
                .unwrap_or(true);
        }
        true
    }
}
