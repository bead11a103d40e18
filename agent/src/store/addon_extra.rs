//! One key of an addon's `extra` (its kind-specific settings: PostgreSQL's `pooling`, `tier`),
//! written without losing the others.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::addons::AddonStatus;
use crate::store::{Store, StoreResult};
use crate::util::now_rfc3339;

impl Store {
    /// Sets one key of the addon's `extra` (other keys, such as a rotation's, are kept) and,
    /// if its status is one of `restart_from`, moves it to `provisioning`, in one transaction:
    /// a wanted change is recorded together with the work it owes. False: no such addon.
    pub fn set_addon_extra_key(
        &self,
        app: &str,
        kind: &str,
        key: &str,
        value: serde_json::Value,
        restart_from: &[AddonStatus],
    ) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<(String, AddonStatus)> = tx
                .query_row(
                    "SELECT extra, status FROM addons WHERE app = ?1 AND kind = ?2",
                    params![app, kind],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((extra, status)) = found else {
                return Ok(false);
            };
            let mut map = match serde_json::from_str::<serde_json::Value>(&extra) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            };
            map.insert(key.to_string(), value);
            let status = if restart_from.contains(&status) {
                AddonStatus::Provisioning
            } else {
                status
            };
            tx.execute(
                "UPDATE addons SET extra = ?3, status = ?4, updated_at = ?5 WHERE app = ?1 AND kind = ?2",
                params![
                    app,
                    kind,
                    serde_json::Value::Object(map).to_string(),
                    status,
                    now_rfc3339()
                ],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Changes the addon's `extra` with `change` in one transaction, so keys another writer
    /// set meanwhile (a tier, a rotation) are kept. False: no such addon.
    pub fn edit_addon_extra(
        &self,
        app: &str,
        kind: &str,
        change: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<String> = tx
                .query_row(
                    "SELECT extra FROM addons WHERE app = ?1 AND kind = ?2",
                    params![app, kind],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(extra) = found else {
                return Ok(false);
            };
            let mut map = match serde_json::from_str::<serde_json::Value>(&extra) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            };
            change(&mut map);
            tx.execute(
                "UPDATE addons SET extra = ?3, updated_at = ?4 WHERE app = ?1 AND kind = ?2",
                params![
                    app,
                    kind,
                    serde_json::Value::Object(map).to_string(),
                    now_rfc3339()
                ],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }
}
