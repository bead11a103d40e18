//! Addon, shared-server and app rows. Status changes are compare-and-set, so a destroy that
//! lands while a provisioning step runs is never overwritten by that step's success.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

pub use crate::core::status::{AddonStatus, AppStatus, ServerStatus};
use crate::store::{Store, StoreResult};
use crate::util::now_rfc3339;

#[derive(Clone, PartialEq, Eq)]
pub struct AddonRow {
    pub app: String,
    pub kind: String,
    pub variant: String,
    /// As the user asked: a catalogue major (`17`) or an image reference.
    pub version: String,
    pub image: String,
    /// `cli` or `deploy`: a redeploy only removes addons a deploy made.
    pub source: String,
    pub status: AddonStatus,
    pub reason: Option<String>,
    /// The app's login: a role, a user, or empty for an addon without credentials.
    pub user: String,
    pub password: String,
    /// Its database (PostgreSQL, MySQL) or vhost (RabbitMQ); empty if the kind has none.
    pub database: String,
    /// Whatever else a provider keeps about the addon (a JSON object, `{}` for most).
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
}

/// Never prints the password.
impl std::fmt::Debug for AddonRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddonRow")
            .field("app", &self.app)
            .field("kind", &self.kind)
            .field("variant", &self.variant)
            .field("image", &self.image)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct ServerRow {
    pub kind: String,
    pub version: String,
    pub image: String,
    pub status: ServerStatus,
    pub admin_user: String,
    pub admin_password: String,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct AppRow {
    pub name: String,
    /// JSON of `apps::AppSpec`.
    pub spec: String,
    pub status: AppStatus,
    pub reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

const ADDON_COLUMNS: &str = "app, kind, variant, version, image, source, status, reason, \
     user, password, \"database\", extra, created_at, updated_at";

/// Migration 9: the credential columns stop being PostgreSQL's (`db_user`, `db_password`,
/// `db_name`), so every addon kind fits: `database` is a database or a vhost, and `extra`
/// holds whatever else a provider needs. Existing rows keep their values.
pub const MIGRATION_GENERIC_CREDENTIALS: &str = "ALTER TABLE addons RENAME COLUMN db_user TO user;
     ALTER TABLE addons RENAME COLUMN db_password TO password;
     ALTER TABLE addons RENAME COLUMN db_name TO \"database\";
     ALTER TABLE addons ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';";

fn extra_from_sql(
    index: usize,
    text: String,
) -> rusqlite::Result<serde_json::Map<String, serde_json::Value>> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn addon_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AddonRow> {
    Ok(AddonRow {
        app: r.get(0)?,
        kind: r.get(1)?,
        variant: r.get(2)?,
        version: r.get(3)?,
        image: r.get(4)?,
        source: r.get(5)?,
        status: r.get(6)?,
        reason: r.get(7)?,
        user: r.get(8)?,
        password: r.get(9)?,
        database: r.get(10)?,
        extra: extra_from_sql(11, r.get(11)?)?,
        created_at: r.get(12)?,
        updated_at: r.get(13)?,
    })
}

const SERVER_COLUMNS: &str = "kind, version, image, status, admin_user, admin_password, created_at";

fn server_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServerRow> {
    Ok(ServerRow {
        kind: r.get(0)?,
        version: r.get(1)?,
        image: r.get(2)?,
        status: r.get(3)?,
        admin_user: r.get(4)?,
        admin_password: r.get(5)?,
        created_at: r.get(6)?,
    })
}

const APP_COLUMNS: &str = "name, spec, status, reason, created_at, updated_at";

fn app_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AppRow> {
    Ok(AppRow {
        name: r.get(0)?,
        spec: r.get(1)?,
        status: r.get(2)?,
        reason: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

/// What inserting an addon found.
#[derive(Debug)]
pub enum Inserted {
    New(AddonRow),
    /// The app already has this addon (a retried create): the existing row.
    Existing(AddonRow),
    /// Not recorded: the kind's shared server runs (or is about to run) this other image.
    SharedImageInUse(String),
    /// Not recorded: the app has this other addon, whose variables the new one would
    /// overwrite.
    Clashes(String),
}

fn member_list() -> String {
    AddonStatus::members()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The image a kind's shared server runs, or its members are about to run it with.
fn shared_image_query() -> String {
    format!(
        "SELECT image FROM addon_servers WHERE kind = ?1 AND status != '{}'
         UNION ALL
         SELECT image FROM addons WHERE kind = ?1 AND variant = 'shared' AND status IN ({})
         LIMIT 1",
        ServerStatus::Deleting,
        member_list()
    )
}

impl Store {
    /// Records a new addon in `pending`, in one transaction with the shared-server checks: an
    /// app has at most one addon of a kind, and every member of a kind's shared server runs
    /// the same image.
    /// Records a new addon, unless the app has it already, the kind's shared server runs
    /// another image, or the app has one of `clashing_kinds` (not being removed). One
    /// transaction, so two concurrent creates cannot both pass the checks.
    pub fn insert_addon(&self, row: &AddonRow, clashing_kinds: &[&str]) -> StoreResult<Inserted> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some(existing) = tx
                .query_row(
                    &format!("SELECT {ADDON_COLUMNS} FROM addons WHERE app = ?1 AND kind = ?2"),
                    params![row.app, row.kind],
                    addon_from_row,
                )
                .optional()?
            {
                return Ok(Inserted::Existing(existing));
            }
            for other in clashing_kinds {
                let present: Option<String> = tx
                    .query_row(
                        "SELECT kind FROM addons WHERE app = ?1 AND kind = ?2 AND status <> ?3",
                        params![row.app, other, AddonStatus::Deprovisioning],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(kind) = present {
                    return Ok(Inserted::Clashes(kind));
                }
            }
            if row.variant == "shared" {
                let in_use: Option<String> = tx
                    .query_row(&shared_image_query(), [&row.kind], |r| r.get(0))
                    .optional()?;
                if let Some(image) = in_use.filter(|image| *image != row.image) {
                    return Ok(Inserted::SharedImageInUse(image));
                }
            }
            tx.execute(
                &format!(
                    "INSERT INTO addons ({ADDON_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
                ),
                params![
                    row.app,
                    row.kind,
                    row.variant,
                    row.version,
                    row.image,
                    row.source,
                    row.status,
                    row.reason,
                    row.user,
                    row.password,
                    row.database,
                    serde_json::Value::Object(row.extra.clone()).to_string(),
                    row.created_at,
                    row.updated_at
                ],
            )?;
            tx.commit()?;
            Ok(Inserted::New(row.clone()))
        })
    }

    /// The image a kind's shared server runs or is about to run, if any.
    pub fn shared_image(&self, kind: &str) -> StoreResult<Option<String>> {
        self.read(|conn| {
            Ok(conn
                .query_row(&shared_image_query(), [kind], |r| r.get(0))
                .optional()?)
        })
    }

    pub fn addon(&self, app: &str, kind: &str) -> StoreResult<Option<AddonRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {ADDON_COLUMNS} FROM addons WHERE app = ?1 AND kind = ?2"),
                    params![app, kind],
                    addon_from_row,
                )
                .optional()?)
        })
    }

    pub fn addons_of(&self, app: &str) -> StoreResult<Vec<AddonRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {ADDON_COLUMNS} FROM addons WHERE app = ?1 ORDER BY kind"
            ))?;
            let rows = stmt.query_map([app], addon_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn all_addons(&self) -> StoreResult<Vec<AddonRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {ADDON_COLUMNS} FROM addons ORDER BY app, kind"
            ))?;
            let rows = stmt.query_map([], addon_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Moves an addon to `to` if it is in one of `from`; false if it was not (or is gone).
    pub fn transition_addon(
        &self,
        app: &str,
        kind: &str,
        from: &[AddonStatus],
        to: AddonStatus,
        reason: Option<&str>,
    ) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let status: Option<AddonStatus> = tx
                .query_row(
                    "SELECT status FROM addons WHERE app = ?1 AND kind = ?2",
                    params![app, kind],
                    |r| r.get(0),
                )
                .optional()?;
            let moved = match status {
                Some(s) if from.contains(&s) => {
                    tx.execute(
                        "UPDATE addons SET status = ?3, reason = ?4, updated_at = ?5,
                           ever_active = ever_active OR ?6
                         WHERE app = ?1 AND kind = ?2",
                        params![
                            app,
                            kind,
                            to,
                            reason,
                            now_rfc3339(),
                            to == AddonStatus::Active
                        ],
                    )?;
                    true
                }
                _ => false,
            };
            tx.commit()?;
            Ok(moved)
        })
    }

    /// Records why a step is being retried without changing the status.
    pub fn set_addon_reason(&self, app: &str, kind: &str, reason: Option<&str>) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE addons SET reason = ?3, updated_at = ?4 WHERE app = ?1 AND kind = ?2",
                params![app, kind, reason, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Whether the addon's server ever answered (its data directory may hold data).
    pub fn addon_ever_active(&self, app: &str, kind: &str) -> StoreResult<bool> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT ever_active FROM addons WHERE app = ?1 AND kind = ?2",
                    params![app, kind],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(false))
        })
    }

    pub fn remove_addon(&self, app: &str, kind: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "DELETE FROM addons WHERE app = ?1 AND kind = ?2",
                params![app, kind],
            )?;
            Ok(())
        })
    }

    /// Apps whose addon of `kind` lives on the shared server and keeps it alive.
    pub fn shared_members(&self, kind: &str) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT app FROM addons WHERE kind = ?1 AND variant = 'shared' AND status IN ({})
                 ORDER BY app",
                member_list()
            ))?;
            let rows = stmt.query_map([kind], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn server(&self, kind: &str) -> StoreResult<Option<ServerRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {SERVER_COLUMNS} FROM addon_servers WHERE kind = ?1"),
                    [kind],
                    server_from_row,
                )
                .optional()?)
        })
    }

    pub fn servers(&self) -> StoreResult<Vec<ServerRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!("SELECT {SERVER_COLUMNS} FROM addon_servers"))?;
            let rows = stmt.query_map([], server_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    pub fn insert_server(&self, row: &ServerRow) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                &format!(
                    "INSERT INTO addon_servers ({SERVER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    row.kind,
                    row.version,
                    row.image,
                    row.status,
                    row.admin_user,
                    row.admin_password,
                    row.created_at
                ],
            )?;
            Ok(())
        })
    }

    pub fn set_server_status(&self, kind: &str, status: ServerStatus) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE addon_servers SET status = ?2 WHERE kind = ?1",
                params![kind, status],
            )?;
            Ok(())
        })
    }

    /// Marks the server `deleting` if no addon is a member any more, in one transaction with
    /// the membership count, so a create that just joined is never left without a server.
    pub fn begin_server_removal_if_unused(&self, kind: &str) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let members: i64 = tx.query_row(
                &format!(
                    "SELECT COUNT(*) FROM addons WHERE kind = ?1 AND variant = 'shared'
                     AND status IN ({})",
                    member_list()
                ),
                [kind],
                |r| r.get(0),
            )?;
            let exists = tx
                .query_row(
                    "SELECT 1 FROM addon_servers WHERE kind = ?1",
                    [kind],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            let remove = members == 0 && exists;
            if remove {
                tx.execute(
                    "UPDATE addon_servers SET status = ?2 WHERE kind = ?1",
                    params![kind, ServerStatus::Deleting],
                )?;
            }
            tx.commit()?;
            Ok(remove)
        })
    }

    pub fn remove_server(&self, kind: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute("DELETE FROM addon_servers WHERE kind = ?1", [kind])?;
            Ok(())
        })
    }

    pub fn app(&self, name: &str) -> StoreResult<Option<AppRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {APP_COLUMNS} FROM apps WHERE name = ?1"),
                    [name],
                    app_from_row,
                )
                .optional()?)
        })
    }

    pub fn apps(&self) -> StoreResult<Vec<AppRow>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare(&format!("SELECT {APP_COLUMNS} FROM apps ORDER BY name"))?;
            let rows = stmt.query_map([], app_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Inserts or replaces an app's declaration, keeping its creation time.
    pub fn put_app(&self, name: &str, spec: &str, status: AppStatus) -> StoreResult<()> {
        self.with_conn(|conn| {
            let now = now_rfc3339();
            conn.execute(
                "INSERT INTO apps (name, spec, status, reason, created_at, updated_at)
                 VALUES (?1, ?2, ?3, NULL, ?4, ?4)
                 ON CONFLICT(name) DO UPDATE SET spec = ?2, status = ?3, reason = NULL, updated_at = ?4",
                params![name, spec, status, now],
            )?;
            Ok(())
        })
    }

    /// The digest of the addon variables the app's services were last started with.
    pub fn app_addon_env(&self, name: &str) -> StoreResult<Option<String>> {
        self.read(|conn| {
            Ok(conn
                .query_row("SELECT addon_env FROM apps WHERE name = ?1", [name], |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()?
                .flatten())
        })
    }

    pub fn set_app_addon_env(&self, name: &str, digest: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE apps SET addon_env = ?2 WHERE name = ?1",
                params![name, digest],
            )?;
            Ok(())
        })
    }

    pub fn set_app_status(
        &self,
        name: &str,
        status: AppStatus,
        reason: Option<&str>,
    ) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE apps SET status = ?2, reason = ?3, updated_at = ?4 WHERE name = ?1",
                params![name, status, reason, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    pub fn remove_app(&self, name: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute("DELETE FROM apps WHERE name = ?1", [name])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    fn row(app: &str, variant: &str, image: &str) -> AddonRow {
        AddonRow {
            app: app.into(),
            kind: "miren-postgresql".into(),
            variant: variant.into(),
            version: "17".into(),
            image: image.into(),
            source: "cli".into(),
            status: AddonStatus::Pending,
            reason: None,
            user: app.into(),
            password: "secret".into(),
            database: app.into(),
            extra: Default::default(),
            created_at: now_rfc3339(),
            updated_at: now_rfc3339(),
        }
    }

    #[test]
    fn a_retried_insert_returns_the_existing_row() {
        let (_d, s) = store();
        assert!(matches!(
            s.insert_addon(&row("a", "small", "postgres:17"), &[])
                .unwrap(),
            Inserted::New(_)
        ));
        match s
            .insert_addon(&row("a", "small", "postgres:16"), &[])
            .unwrap()
        {
            Inserted::Existing(r) => assert_eq!(r.image, "postgres:17"),
            other => panic!("not the existing row: {other:?}"),
        }
    }

    #[test]
    fn an_addon_whose_variables_clash_is_not_recorded() {
        let (_d, s) = store();
        s.insert_addon(&row("a", "small", "postgres:17"), &[])
            .unwrap();
        let mut mysql = row("a", "small", "mysql:9");
        mysql.kind = "miren-mysql".into();
        assert!(matches!(
            s.insert_addon(&mysql, &["miren-postgresql"]).unwrap(),
            Inserted::Clashes(kind) if kind == "miren-postgresql"
        ));
        assert!(s.addon("a", "miren-mysql").unwrap().is_none());
        // Another app, or the clashing addon on its way out, does not stop it.
        mysql.app = "b".into();
        assert!(matches!(
            s.insert_addon(&mysql, &["miren-postgresql"]).unwrap(),
            Inserted::New(_)
        ));
        assert!(s
            .transition_addon(
                "a",
                "miren-postgresql",
                &[AddonStatus::Pending],
                AddonStatus::Deprovisioning,
                None
            )
            .unwrap());
        mysql.app = "a".into();
        assert!(matches!(
            s.insert_addon(&mysql, &["miren-postgresql"]).unwrap(),
            Inserted::New(_)
        ));
    }

    #[test]
    fn shared_members_must_agree_on_the_image() {
        let (_d, s) = store();
        s.insert_addon(&row("a", "shared", "postgres:17"), &[])
            .unwrap();
        assert!(matches!(
            s.insert_addon(&row("b", "shared", "postgres:16"), &[]).unwrap(),
            Inserted::SharedImageInUse(image) if image == "postgres:17"
        ));
        // A small addon of another version is fine.
        s.insert_addon(&row("b", "small", "postgres:16"), &[])
            .unwrap();
        // Once the only member is in error, the server's image no longer binds anyone.
        assert!(s
            .transition_addon(
                "a",
                "miren-postgresql",
                &[AddonStatus::Pending],
                AddonStatus::Error,
                Some("x")
            )
            .unwrap());
        s.insert_addon(&row("c", "shared", "postgres:16"), &[])
            .unwrap();
    }

    #[test]
    fn transitions_are_compare_and_set() {
        let (_d, s) = store();
        s.insert_addon(&row("a", "small", "postgres:17"), &[])
            .unwrap();
        assert!(s
            .transition_addon(
                "a",
                "miren-postgresql",
                &[AddonStatus::Pending],
                AddonStatus::Provisioning,
                None
            )
            .unwrap());
        assert!(s
            .transition_addon(
                "a",
                "miren-postgresql",
                &[AddonStatus::Provisioning],
                AddonStatus::Deprovisioning,
                None
            )
            .unwrap());
        // The provisioning step finishing late must not resurrect the addon.
        assert!(!s
            .transition_addon(
                "a",
                "miren-postgresql",
                &[AddonStatus::Provisioning],
                AddonStatus::Active,
                None
            )
            .unwrap());
        assert_eq!(
            s.addon("a", "miren-postgresql").unwrap().unwrap().status,
            AddonStatus::Deprovisioning
        );
    }

    #[test]
    fn the_server_is_removed_only_without_members() {
        let (_d, s) = store();
        s.insert_server(&ServerRow {
            kind: "miren-postgresql".into(),
            version: "17".into(),
            image: "postgres:17".into(),
            status: ServerStatus::Active,
            admin_user: "postgres".into(),
            admin_password: "x".into(),
            created_at: now_rfc3339(),
        })
        .unwrap();
        s.insert_addon(&row("a", "shared", "postgres:17"), &[])
            .unwrap();
        assert!(!s
            .begin_server_removal_if_unused("miren-postgresql")
            .unwrap());
        s.remove_addon("a", "miren-postgresql").unwrap();
        assert!(s
            .begin_server_removal_if_unused("miren-postgresql")
            .unwrap());
        assert_eq!(
            s.server("miren-postgresql").unwrap().unwrap().status,
            ServerStatus::Deleting
        );
    }

    /// Migration 9 renames the credential columns and keeps every value.
    #[test]
    fn migration_9_keeps_the_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            for sql in &super::super::MIGRATIONS[..8] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 8).unwrap();
            conn.execute(
                "INSERT INTO addons (app, kind, variant, version, image, source, status,
                                     db_user, db_password, db_name, created_at, updated_at)
                 VALUES ('shop', 'miren-postgresql', 'shared', '17', 'postgres:17', 'deploy',
                         'active', 'shop_role', 'pw', 'shop_db', '1', '1')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let row = store.addon("shop", "miren-postgresql").unwrap().unwrap();
        assert_eq!(
            (
                row.user.as_str(),
                row.password.as_str(),
                row.database.as_str()
            ),
            ("shop_role", "pw", "shop_db")
        );
        assert!(row.extra.is_empty());
        assert_eq!(row.status, AddonStatus::Active);
    }

    #[test]
    fn extra_round_trips() {
        let (_d, s) = store();
        let mut r = row("a", "small", "postgres:17");
        r.extra.insert("vhost".into(), serde_json::json!("a"));
        s.insert_addon(&r, &[]).unwrap();
        assert_eq!(
            s.addon("a", "miren-postgresql").unwrap().unwrap().extra,
            r.extra
        );
    }

    #[test]
    fn the_store_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let (d, _s) = store();
        let mode = std::fs::metadata(d.path().join("state.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}
