//! Credential rotations in flight, kept in the addon row's `extra` under `rotation`: the
//! next login is recorded before the server learns it, the row's login switches to it in one
//! transaction once the server accepts it, and the record goes once the old login is retired.
//! A rotation cut short by a crash is finished from this record at start.

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::core::status::{AddonStatus, ServerStatus};
use crate::store::{Store, StoreResult};
use crate::util::now_rfc3339;

/// The key in `addons.extra`.
const KEY: &str = "rotation";

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationPhase {
    /// The next login is recorded; the server may or may not know it yet. The row's login is
    /// still the previous one.
    AddingLogin,
    /// The server accepts the next login and the row's login is it; the app's services are
    /// restarted with it, then the previous login is retired.
    RetiringPrevious,
}

/// A rotation in flight.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub phase: RotationPhase,
    pub next_user: String,
    pub next_password: String,
    pub previous_user: String,
    pub started_at: String,
}

/// Never prints the password.
impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("phase", &self.phase)
            .field("next_user", &self.next_user)
            .field("previous_user", &self.previous_user)
            .field("started_at", &self.started_at)
            .finish_non_exhaustive()
    }
}

/// What [`Store::begin_rotation`] found.
#[derive(Debug)]
pub enum BeginRotation {
    /// Recorded.
    Begun(Rotation),
    /// One is in flight already (from an earlier request or agent).
    Pending(Rotation),
    /// The addon is not `active`.
    NotActive(AddonStatus),
    Gone,
}

type Extra = serde_json::Map<String, serde_json::Value>;

fn rotation_of(extra: &Extra) -> StoreResult<Option<Rotation>> {
    match extra.get(KEY) {
        None => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
                .into()
            }),
    }
}

fn read_extra(
    tx: &rusqlite::Transaction<'_>,
    app: &str,
    kind: &str,
) -> StoreResult<Option<(AddonStatus, Extra)>> {
    let found: Option<(AddonStatus, String)> = tx
        .query_row(
            "SELECT status, extra FROM addons WHERE app = ?1 AND kind = ?2",
            params![app, kind],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match found {
        None => Ok(None),
        Some((status, text)) => {
            let extra: Extra = serde_json::from_str(&text).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            Ok(Some((status, extra)))
        }
    }
}

fn to_json(value: impl Serialize) -> StoreResult<serde_json::Value> {
    serde_json::to_value(value)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)).into())
}

impl Store {
    /// Records `rotation` for an `active` addon that has none in flight.
    pub fn begin_rotation(
        &self,
        app: &str,
        kind: &str,
        rotation: &Rotation,
    ) -> StoreResult<BeginRotation> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some((status, mut extra)) = read_extra(&tx, app, kind)? else {
                return Ok(BeginRotation::Gone);
            };
            if let Some(pending) = rotation_of(&extra)? {
                return Ok(BeginRotation::Pending(pending));
            }
            if status != AddonStatus::Active {
                return Ok(BeginRotation::NotActive(status));
            }
            extra.insert(KEY.into(), to_json(rotation)?);
            tx.execute(
                "UPDATE addons SET extra = ?3, updated_at = ?4 WHERE app = ?1 AND kind = ?2",
                params![
                    app,
                    kind,
                    serde_json::Value::Object(extra).to_string(),
                    now_rfc3339()
                ],
            )?;
            tx.commit()?;
            Ok(BeginRotation::Begun(rotation.clone()))
        })
    }

    /// The rotation in flight for the addon, if any.
    pub fn rotation(&self, app: &str, kind: &str) -> StoreResult<Option<Rotation>> {
        match self.addon(app, kind)? {
            Some(row) => rotation_of(&row.extra),
            None => Ok(None),
        }
    }

    /// Every addon with a rotation in flight, as (app, kind).
    pub fn pending_rotations(&self) -> StoreResult<Vec<(String, String)>> {
        let mut pending = Vec::new();
        for row in self.all_addons()? {
            if rotation_of(&row.extra)?.is_some() {
                pending.push((row.app, row.kind));
            }
        }
        Ok(pending)
    }

    /// The server accepts the next login: the row's login becomes it, in the same transaction
    /// that moves the rotation on. Repeating it changes nothing; false if no rotation is in
    /// flight (or the addon is gone).
    pub fn switch_to_next_login(&self, app: &str, kind: &str) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some((_, mut extra)) = read_extra(&tx, app, kind)? else {
                return Ok(false);
            };
            let Some(mut rotation) = rotation_of(&extra)? else {
                return Ok(false);
            };
            if rotation.phase == RotationPhase::AddingLogin {
                rotation.phase = RotationPhase::RetiringPrevious;
                extra.insert(KEY.into(), to_json(&rotation)?);
                tx.execute(
                    "UPDATE addons SET user = ?3, password = ?4, extra = ?5, updated_at = ?6
                     WHERE app = ?1 AND kind = ?2",
                    params![
                        app,
                        kind,
                        rotation.next_user,
                        rotation.next_password,
                        serde_json::Value::Object(extra).to_string(),
                        now_rfc3339()
                    ],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// The rotation is over (the previous login is retired).
    pub fn end_rotation(&self, app: &str, kind: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if let Some((_, mut extra)) = read_extra(&tx, app, kind)? {
                if extra.remove(KEY).is_some() {
                    tx.execute(
                        "UPDATE addons SET extra = ?3, updated_at = ?4 WHERE app = ?1 AND kind = ?2",
                        params![app, kind, serde_json::Value::Object(extra).to_string(), now_rfc3339()],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }
}

/// Migration 10: a shared server's administrator rotates like an app's login; the rotation in
/// flight is kept with the server (JSON of [`Rotation`], NULL when none).
pub const MIGRATION_ADMIN_ROTATION: &str = "ALTER TABLE addon_servers ADD COLUMN rotation TEXT;";

/// What [`Store::begin_admin_rotation`] found.
#[derive(Debug)]
pub enum BeginAdminRotation {
    Begun(Rotation),
    Pending(Rotation),
    /// The server is being made or removed.
    NotServing(ServerStatus),
    Gone,
}

fn admin_rotation_of(text: Option<String>) -> StoreResult<Option<Rotation>> {
    match text {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
                .into()
        }),
    }
}

fn read_server_rotation(
    tx: &rusqlite::Transaction<'_>,
    kind: &str,
) -> StoreResult<Option<(ServerStatus, Option<Rotation>)>> {
    let found: Option<(ServerStatus, Option<String>)> = tx
        .query_row(
            "SELECT status, rotation FROM addon_servers WHERE kind = ?1",
            [kind],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match found {
        None => Ok(None),
        Some((status, text)) => Ok(Some((status, admin_rotation_of(text)?))),
    }
}

impl Store {
    /// Records a rotation of the shared server's administrator, if it serves and has none.
    pub fn begin_admin_rotation(
        &self,
        kind: &str,
        rotation: &Rotation,
    ) -> StoreResult<BeginAdminRotation> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some((status, pending)) = read_server_rotation(&tx, kind)? else {
                return Ok(BeginAdminRotation::Gone);
            };
            if let Some(pending) = pending {
                return Ok(BeginAdminRotation::Pending(pending));
            }
            if !status.serves() {
                return Ok(BeginAdminRotation::NotServing(status));
            }
            tx.execute(
                "UPDATE addon_servers SET rotation = ?2 WHERE kind = ?1",
                params![kind, to_json(rotation)?.to_string()],
            )?;
            tx.commit()?;
            Ok(BeginAdminRotation::Begun(rotation.clone()))
        })
    }

    /// The administrator rotation in flight on the shared server of `kind`, if any.
    pub fn admin_rotation(&self, kind: &str) -> StoreResult<Option<Rotation>> {
        let text: Option<Option<String>> = self.read(|conn| {
            Ok::<_, crate::store::StoreError>(
                conn.query_row(
                    "SELECT rotation FROM addon_servers WHERE kind = ?1",
                    [kind],
                    |r| r.get(0),
                )
                .optional()?,
            )
        })?;
        admin_rotation_of(text.flatten())
    }

    /// Kinds whose shared server has an administrator rotation in flight.
    pub fn pending_admin_rotations(&self) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare("SELECT kind FROM addon_servers WHERE rotation IS NOT NULL")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The server accepts the next administrator: the row's administrator becomes it.
    /// Repeating it changes nothing; false if no rotation is in flight.
    pub fn switch_to_next_admin(&self, kind: &str) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some((_, Some(mut rotation))) = read_server_rotation(&tx, kind)? else {
                return Ok(false);
            };
            if rotation.phase == RotationPhase::AddingLogin {
                rotation.phase = RotationPhase::RetiringPrevious;
                tx.execute(
                    "UPDATE addon_servers SET admin_user = ?2, admin_password = ?3, rotation = ?4
                     WHERE kind = ?1",
                    params![
                        kind,
                        rotation.next_user,
                        rotation.next_password,
                        to_json(&rotation)?.to_string()
                    ],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// The administrator rotation is over.
    pub fn end_admin_rotation(&self, kind: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE addon_servers SET rotation = NULL WHERE kind = ?1",
                [kind],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::addons::{AddonRow, Inserted};

    fn active_addon(store: &Store) {
        let row = AddonRow {
            app: "a".into(),
            kind: "miren-postgresql".into(),
            variant: "small".into(),
            version: "17".into(),
            image: "postgres:17".into(),
            source: "cli".into(),
            status: AddonStatus::Pending,
            reason: None,
            user: "a".into(),
            password: "old".into(),
            database: "a".into(),
            extra: Default::default(),
            created_at: now_rfc3339(),
            updated_at: now_rfc3339(),
        };
        assert!(matches!(
            store.insert_addon(&row, &[]).unwrap(),
            Inserted::New(_)
        ));
    }

    fn rotation() -> Rotation {
        Rotation {
            phase: RotationPhase::AddingLogin,
            next_user: "a_r1".into(),
            next_password: "new".into(),
            previous_user: "a".into(),
            started_at: now_rfc3339(),
        }
    }

    #[test]
    fn a_rotation_switches_the_login_once_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        active_addon(&store);
        // Only an active addon rotates.
        assert!(matches!(
            store
                .begin_rotation("a", "miren-postgresql", &rotation())
                .unwrap(),
            BeginRotation::NotActive(AddonStatus::Pending)
        ));
        assert!(store
            .transition_addon(
                "a",
                "miren-postgresql",
                &[AddonStatus::Pending],
                AddonStatus::Active,
                None
            )
            .unwrap());
        assert!(matches!(
            store
                .begin_rotation("a", "miren-postgresql", &rotation())
                .unwrap(),
            BeginRotation::Begun(_)
        ));
        // One at a time.
        assert!(matches!(
            store
                .begin_rotation("a", "miren-postgresql", &rotation())
                .unwrap(),
            BeginRotation::Pending(_)
        ));
        assert_eq!(
            store.pending_rotations().unwrap(),
            [("a".to_string(), "miren-postgresql".to_string())]
        );
        let row = store.addon("a", "miren-postgresql").unwrap().unwrap();
        assert_eq!((row.user.as_str(), row.password.as_str()), ("a", "old"));

        assert!(store.switch_to_next_login("a", "miren-postgresql").unwrap());
        assert!(store.switch_to_next_login("a", "miren-postgresql").unwrap());
        let row = store.addon("a", "miren-postgresql").unwrap().unwrap();
        assert_eq!((row.user.as_str(), row.password.as_str()), ("a_r1", "new"));
        let pending = store.rotation("a", "miren-postgresql").unwrap().unwrap();
        assert_eq!(pending.phase, RotationPhase::RetiringPrevious);
        assert_eq!(pending.previous_user, "a");

        store.end_rotation("a", "miren-postgresql").unwrap();
        store.end_rotation("a", "miren-postgresql").unwrap();
        assert!(store.rotation("a", "miren-postgresql").unwrap().is_none());
        assert!(store.pending_rotations().unwrap().is_empty());
        assert!(!store.switch_to_next_login("a", "miren-postgresql").unwrap());
    }

    #[test]
    fn an_administrator_rotation_switches_the_server_row() {
        use crate::store::addons::ServerRow;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        assert!(matches!(
            store
                .begin_admin_rotation("miren-postgresql", &rotation())
                .unwrap(),
            BeginAdminRotation::Gone
        ));
        store
            .insert_server(&ServerRow {
                kind: "miren-postgresql".into(),
                version: "17".into(),
                image: "postgres:17".into(),
                status: ServerStatus::Provisioning,
                admin_user: "postgres".into(),
                admin_password: "old".into(),
                created_at: now_rfc3339(),
            })
            .unwrap();
        assert!(matches!(
            store
                .begin_admin_rotation("miren-postgresql", &rotation())
                .unwrap(),
            BeginAdminRotation::NotServing(ServerStatus::Provisioning)
        ));
        store
            .set_server_status("miren-postgresql", ServerStatus::Active)
            .unwrap();
        assert!(matches!(
            store
                .begin_admin_rotation("miren-postgresql", &rotation())
                .unwrap(),
            BeginAdminRotation::Begun(_)
        ));
        assert!(matches!(
            store
                .begin_admin_rotation("miren-postgresql", &rotation())
                .unwrap(),
            BeginAdminRotation::Pending(_)
        ));
        assert_eq!(
            store.pending_admin_rotations().unwrap(),
            ["miren-postgresql"]
        );
        assert!(store.switch_to_next_admin("miren-postgresql").unwrap());
        assert!(store.switch_to_next_admin("miren-postgresql").unwrap());
        let server = store.server("miren-postgresql").unwrap().unwrap();
        assert_eq!(
            (server.admin_user.as_str(), server.admin_password.as_str()),
            ("a_r1", "new")
        );
        assert_eq!(
            store
                .admin_rotation("miren-postgresql")
                .unwrap()
                .unwrap()
                .phase,
            RotationPhase::RetiringPrevious
        );
        store.end_admin_rotation("miren-postgresql").unwrap();
        assert!(store.admin_rotation("miren-postgresql").unwrap().is_none());
        assert!(store.pending_admin_rotations().unwrap().is_empty());
    }
}
