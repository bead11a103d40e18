//! Tiers in the driver: the wanted tier is recorded in the addon's row (`extra.tier`) before
//! anything acts, together with the work it owes (`provisioning`); the driver converges the
//! server to it (a dedicated server made for another tier, recorded in `extra.server_tier`, is
//! replaced: its memory limit, `shared_buffers` and `max_connections` need a restart). And the
//! one task that grows data disks past [`GROW_AT_PERCENT`] used.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use miren_addons::{AddonKind, Tier, Variant, GROW_AT_PERCENT};
use tokio::sync::watch;
use tracing::{info, warn};

use super::provider::DbClientLimit;
use super::{is_shared, server_owner, shared_owner, AddonService};
use crate::core::error::Error;
use crate::model::{AddonUpdated, UpdateAddon};
use crate::store::addons::{AddonRow, AddonStatus};
use crate::store::Owner;
use crate::util::now_rfc3339;

/// The tier the addon should have.
pub(super) const TIER: &str = "tier";
/// The tier its server (or shared tenant) was last made for.
pub(super) const APPLIED_TIER: &str = "server_tier";
/// The app's own pooled client connections, when it asked for other than its tier's.
pub(super) const CLIENT_CONNECTIONS: &str = "client_connections";
/// The last automatic growth of its data disk, for `addon list`.
pub(super) const LAST_GROWTH: &str = "last_growth";

/// How often the data disks' use is checked (one statvfs per disk).
const GROWTH_CHECK_EVERY: Duration = Duration::from_secs(5);

const GIB: u64 = 1 << 30;

fn tier_at(row: &AddonRow, key: &str) -> Option<Tier> {
    row.extra
        .get(key)
        .and_then(|v| v.as_str())
        .and_then(|t| Tier::parse(t).ok())
}

/// The addon's wanted tier (`small` for rows from before tiers).
pub(crate) fn tier(row: &AddonRow) -> Tier {
    tier_at(row, TIER).unwrap_or_default()
}

/// The tier its server was made for; a server from before tiers counts as `small` (it runs
/// with the sandbox defaults, which are `small`'s memory), so an upgrade restarts nothing.
pub(super) fn applied_tier(row: &AddonRow) -> Tier {
    tier_at(row, APPLIED_TIER).unwrap_or_default()
}

/// The pooled client connections the app may hold: what it asked for, else its tier's.
pub(crate) fn client_connections(row: &AddonRow) -> u32 {
    row.extra
        .get(CLIENT_CONNECTIONS)
        .and_then(|v| v.as_u64())
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(tier(row).limits().client_connections)
}

/// The app's limit in its pooler: its own database's client connections.
pub(super) fn db_client_limit(row: &AddonRow) -> DbClientLimit {
    DbClientLimit {
        database: row.database.clone(),
        clients: client_connections(row),
    }
}

pub(super) fn last_growth(row: &AddonRow) -> Option<String> {
    row.extra
        .get(LAST_GROWTH)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// The limits automatic growth follows: the addon's tier on a dedicated server; the shared
/// server's disk (10 GiB, like `medium`'s) grows by `medium`'s step.
fn growth_limits(row: &AddonRow) -> &'static miren_addons::TierLimits {
    if is_shared(row) {
        Tier::Medium.limits()
    } else {
        tier(row).limits()
    }
}

impl AddonService {
    /// Deletes a server made for another tier and its sidecar; `ensure_server_sandbox` then
    /// makes them again, sized for the wanted tier, on the same (grown) disk.
    pub(super) async fn replace_for_tier(&self, owner: &Owner) -> Result<(), Error> {
        if self.host.server_sandbox(owner)?.is_none() {
            return Ok(());
        }
        info!(server = %owner.describe(), "restarting an addon server for its new tier");
        self.remove_sidecar(owner).await?;
        self.host.delete_owned(owner).await
    }

    /// Records `to` as the addon's tier and the work it owes. Refused for a kind without
    /// tiers, and for a tier whose storage is smaller than the data already on the disk.
    /// Returns whether its server restarts for it.
    pub(super) fn record_tier(&self, row: &AddonRow, to: Tier) -> Result<bool, Error> {
        let kind = AddonKind::parse(&row.kind)?;
        if !kind.has_tiers() {
            return Err(Error::invalid(format!(
                "{} has no tiers: `tier` is for miren-postgresql only",
                row.kind
            )));
        }
        if row.status == AddonStatus::Deprovisioning {
            return Err(Error::conflict(format!(
                "{} of app `{}` is being removed",
                row.kind, row.app
            )));
        }
        let from = tier(row);
        if !is_shared(row) && to < from {
            if let Some(usage) = self.host.disk_usage(&server_owner(row))? {
                let room = to.limits().storage_gb * GIB;
                if usage.used_bytes > room * GROW_AT_PERCENT / 100 {
                    return Err(Error::conflict(format!(
                        "{} of app `{}` holds {:.1} GiB, more than {}% of tier `{to}`'s {} GiB; a disk never shrinks below its data: delete data (and VACUUM FULL), or keep tier `{from}`",
                        row.kind,
                        row.app,
                        usage.used_bytes as f64 / GIB as f64,
                        GROW_AT_PERCENT,
                        to.limits().storage_gb,
                    )));
                }
            }
        }
        let provider = self.provider(&row.kind)?;
        let variant = if is_shared(row) {
            Variant::Shared
        } else {
            Variant::Small
        };
        let restarts = match (
            provider.server_size(variant, applied_tier(row)),
            provider.server_size(variant, to),
        ) {
            (Some(a), Some(b)) => {
                a.memory_bytes != b.memory_bytes || a.cpus != b.cpus || a.args != b.args
            }
            _ => false,
        };
        if from == to && applied_tier(row) == to {
            return Ok(false);
        }
        self.store.set_addon_extra_key(
            &row.app,
            &row.kind,
            TIER,
            to.name().into(),
            &[AddonStatus::Active, AddonStatus::Error],
        )?;
        info!(app = %row.app, addon = %row.kind, from = %from, to = %to, restarts, "addon tier change recorded");
        Ok(restarts)
    }

    /// Records the app's own pooled client connections (`None`: its tier's) and the work it
    /// owes: the driver gives its pooler the new limit, live. Nothing when it has them.
    pub(super) fn record_client_connections(
        &self,
        row: &AddonRow,
        wanted: Option<u32>,
    ) -> Result<(), Error> {
        let current = row.extra.get(CLIENT_CONNECTIONS).and_then(|v| v.as_u64());
        if current == wanted.map(u64::from) {
            return Ok(());
        }
        if row.status == AddonStatus::Deprovisioning {
            return Err(Error::conflict(format!(
                "{} of app `{}` is being removed",
                row.kind, row.app
            )));
        }
        self.store.set_addon_extra_key(
            &row.app,
            &row.kind,
            CLIENT_CONNECTIONS,
            wanted.map_or(serde_json::Value::Null, |n| n.into()),
            &[AddonStatus::Active, AddonStatus::Error],
        )?;
        info!(app = %row.app, addon = %row.kind, client_connections = ?wanted, "addon client connections change recorded");
        Ok(())
    }

    /// `miren addon update`: changes the addon's tier or client connections in place and
    /// waits for the driver to apply them (the receiver turns true once it has).
    pub fn update(
        self: &Arc<Self>,
        app: &str,
        kind_arg: &str,
        req: &UpdateAddon,
    ) -> Result<(Tier, bool, watch::Receiver<bool>), Error> {
        let (name, _) = super::split_addon_arg(kind_arg);
        let kind = AddonKind::parse(name)?;
        let row = self.find(app, kind.name())?;
        let to = req
            .tier
            .as_deref()
            .map(|t| kind.parse_tier(t))
            .transpose()?;
        let clients = req
            .client_connections
            .map(|n| kind.check_client_connections(i64::from(n)))
            .transpose()?;
        if to.is_none() && clients.is_none() {
            return Err(Error::invalid(
                "nothing to change: give --tier (small, medium or large) or --client-connections N",
            ));
        }
        let from = tier(&row);
        let restarts = match to {
            Some(to) => self.record_tier(&row, to)?,
            None => false,
        };
        if clients.is_some() {
            let row = self.find(app, kind.name())?;
            self.record_client_connections(&row, clients)?;
        }
        let done = self.kick(app, kind.name());
        Ok((from, restarts, done))
    }

    /// The update's answer, once the driver settled.
    pub fn updated(
        &self,
        app: &str,
        kind: &str,
        from: Tier,
        restarted: bool,
    ) -> Result<AddonUpdated, Error> {
        let row = self.find(app, kind)?;
        let addon = self.view(&row);
        if row.status != AddonStatus::Active {
            return Err(Error::conflict(format!(
                "{kind} of app `{app}` is {} after the change: {}; run the update again to retry",
                row.status,
                row.reason.unwrap_or_default()
            )));
        }
        let to = tier(&row);
        let limits = to.limits();
        let mut changes = Vec::new();
        if from != to {
            changes.push(format!("tier {from} -> {to}"));
        }
        changes.push(format!(
            "{} pooled client connections for the app (applied live: no client dropped)",
            client_connections(&row)
        ));
        if is_shared(&row) {
            changes.push(format!(
                "CONNECTION LIMIT {} on the app's roles; the shared server was not restarted",
                limits.client_connections
            ));
        } else {
            changes.push(format!(
                "memory {} MiB, {} CPUs",
                limits.memory_bytes >> 20,
                limits.cpus
            ));
            if let Some(size) = addon.disk_size_gb {
                changes.push(format!("data disk {size} GiB (grown online, never shrunk)"));
            }
            changes.push(if restarted {
                "server restarted: shared_buffers and max_connections (and the memory limit) take effect only on a restart; data kept".to_string()
            } else {
                "no restart needed".to_string()
            });
        }
        Ok(AddonUpdated {
            addon,
            previous_tier: from.name().to_string(),
            restarted,
            changes,
        })
    }

    /// Every member's client limit in the shared server's pooler of `kind`.
    pub(super) fn shared_client_limits(&self, kind: &str) -> Result<Vec<DbClientLimit>, Error> {
        let mut limits = Vec::new();
        for app in self.store.shared_members(kind)? {
            if let Some(row) = self.store.addon(&app, kind)? {
                limits.push(db_client_limit(&row));
            }
        }
        Ok(limits)
    }

    /// After a shared tenant left: its pooler's limits without it (a pooler that is not
    /// running starts with the members' limits anyway).
    pub(super) async fn release_shared_client_limit(&self, kind: &str) -> Result<(), Error> {
        let provider = self.provider(kind)?.clone();
        let owner = shared_owner(kind);
        let (Some(server), Some(sidecar)) = (
            self.host.server_sandbox(&owner)?,
            self.host.server_sandbox(&Owner::sidecar_of(&owner))?,
        ) else {
            return Ok(());
        };
        let limits = self.shared_client_limits(kind)?;
        self.apply_sidecar_limits(provider.as_ref(), &sidecar, &server, &limits)
            .await
    }

    /// Starts the one task that checks every addon server's data disk and grows one past
    /// [`GROW_AT_PERCENT`] used by its tier's step, up to its tier's ceiling.
    pub(super) fn watch_disks(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut at_ceiling: HashSet<String> = HashSet::new();
            loop {
                tokio::time::sleep(GROWTH_CHECK_EVERY).await;
                let Some(this) = this.upgrade() else { return };
                if let Err(e) = this.grow_full_disks(&mut at_ceiling).await {
                    warn!(error = %e, "checking addon disks' use failed");
                }
            }
        });
    }

    async fn grow_full_disks(&self, at_ceiling: &mut HashSet<String>) -> Result<(), Error> {
        let mut seen = HashSet::new();
        for row in self.store.all_addons()? {
            let Ok(kind) = AddonKind::parse(&row.kind) else {
                continue;
            };
            if row.status != AddonStatus::Active || !kind.has_tiers() {
                continue;
            }
            let owner = server_owner(&row);
            if !seen.insert(owner.describe()) {
                continue;
            }
            let Some(usage) = self.host.disk_usage(&owner)? else {
                continue;
            };
            if usage.used_bytes * 100 <= usage.total_bytes * GROW_AT_PERCENT {
                continue;
            }
            let percent = usage.used_bytes * 100 / usage.total_bytes.max(1);
            let Some(next) = growth_limits(&row).grown_size_gb(usage.size_gb) else {
                if at_ceiling.insert(owner.describe()) {
                    warn!(server = %owner.describe(), size_gb = usage.size_gb, percent, "an addon's data disk is nearly full and at its tier's growth ceiling; move to a larger tier");
                }
                continue;
            };
            match self.host.grow_disk(&owner, next).await {
                Ok(()) => {
                    let event = format!(
                        "{}: grew the data disk from {} to {next} GiB ({percent}% was used)",
                        now_rfc3339(),
                        usage.size_gb
                    );
                    info!(server = %owner.describe(), from = usage.size_gb, to = next, percent, "grew an addon's data disk");
                    self.store.set_addon_extra_key(
                        &row.app,
                        &row.kind,
                        LAST_GROWTH,
                        event.into(),
                        &[],
                    )?;
                }
                Err(e) => {
                    warn!(server = %owner.describe(), error = %e, "growing an addon's data disk failed; retrying at the next check")
                }
            }
        }
        Ok(())
    }
}
