//! The disk swap of a PostgreSQL point-in-time restore: in one transaction, so an agent killed
//! at any point finds either the old disk or the restored one as the server's, never neither.

use rusqlite::params;

use super::owner::owner_columns;
use super::{Owner, Store, StoreResult};

impl Store {
    /// Makes the disk `restored` owns `server`'s and the disk `server` had `previous`'s.
    /// Returns false (and changes nothing) when `restored` owns no disk: already swapped.
    pub fn swap_restored_disk(
        &self,
        server: &Owner,
        restored: &Owner,
        previous: &Owner,
    ) -> StoreResult<bool> {
        let (s_kind, s_app, s_part) = owner_columns(server);
        let (r_kind, r_app, r_part) = owner_columns(restored);
        let (p_kind, p_app, p_part) = owner_columns(previous);
        self.with_conn(|conn| {
            let tx = conn.transaction()?;
            let waiting: i64 = tx.query_row(
                "SELECT COUNT(*) FROM disks WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3",
                params![r_kind, r_app, r_part],
                |r| r.get(0),
            )?;
            if waiting == 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE disks SET owner_kind = ?4, owner_app = ?5, owner_part = ?6
                 WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3",
                params![s_kind, s_app, s_part, p_kind, p_app, p_part],
            )?;
            tx.execute(
                "UPDATE disks SET owner_kind = ?4, owner_app = ?5, owner_part = ?6
                 WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3",
                params![r_kind, r_app, r_part, s_kind, s_app, s_part],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }
}
