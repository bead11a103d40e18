//! `miren addon backups`: what a PostgreSQL addon can be restored to, from the target itself.

use tokio_stream::StreamExt;

use super::archive::{is_segment, rfc3339, wal_prefix};
use super::base::{list_bases, unreachable_target};
use crate::core::addons::{credentials, server_owner, AddonService};
use crate::core::error::Error;
use crate::model::{AddonBackups, BaseBackupView};

impl AddonService {
    pub async fn pg_backups(&self, app: &str, addon_arg: &str) -> Result<AddonBackups, Error> {
        let (name, _) = super::super::split_addon_arg(addon_arg);
        let row = self.find(app, name)?;
        if row.kind != "miren-postgresql" {
            return Err(Error::invalid(format!(
                "`{name}` has no continuous archive: only miren-postgresql has"
            )));
        }
        let pitr = self.pitr()?.clone();
        let target = pitr.target().clone();
        let server = self
            .archived_server(&pitr, server_owner(&row), credentials(&row))?
            .ok_or_else(|| Error::busy(format!("the server of app `{app}` is not running")))?;
        let read = async {
            let mut bases = list_bases(&target, &server.id).await?;
            bases.sort_by_key(|b| b.finished_time());
            let mut newest_wal = None;
            let prefix = target.path(&wal_prefix(&server.id))?;
            let mut listing = target.store().list(Some(&prefix));
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(|e| unreachable_target(&target, &e))?;
                if meta.location.filename().is_some_and(is_segment) {
                    let at: std::time::SystemTime = meta.last_modified.into();
                    newest_wal = newest_wal.max(Some(at));
                }
            }
            Ok::<_, Error>((bases, newest_wal))
        };
        // The lag is worth showing most when the target is unreachable.
        let (bases, newest_wal, target_error) =
            match tokio::time::timeout(std::time::Duration::from_secs(20), read).await {
                Ok(Ok((bases, newest))) => (bases, newest, None),
                Ok(Err(e)) => (Vec::new(), None, Some(e.message)),
                Err(_) => (
                    Vec::new(),
                    None,
                    Some(format!(
                        "backup target `{}` did not answer within 20s",
                        target.name()
                    )),
                ),
            };
        let earliest = bases.first().map(|b| b.finished_time());
        let latest = bases
            .last()
            .map(|b| b.finished_time())
            .max(newest_wal)
            .filter(|_| earliest.is_some());
        Ok(AddonBackups {
            name: row.kind.clone(),
            app: app.to_string(),
            target: target.name().to_string(),
            target_location: target.describe(),
            off_node: target.off_node(),
            server: server.id.clone(),
            earliest: earliest.map(rfc3339),
            latest: latest.map(rfc3339),
            base_backups: bases
                .iter()
                .map(|b| BaseBackupView {
                    label: b.label.clone(),
                    started_at: b.started_at.clone(),
                    finished_at: b.finished_at.clone(),
                    timeline: b.timeline,
                    size_bytes: b.size_bytes,
                    data_bytes: b.data_bytes,
                })
                .collect(),
            archive: pitr.lag(&server),
            previous_disk: row
                .extra
                .get("pg_previous_disk")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            previous_database: row
                .extra
                .get("pg_previous_database")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            target_error,
        })
    }
}
