//! Addons across the API: create, update, rotate, back up and restore an app's addons, and
//! the catalogue and variables they bring.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::core::status::AddonStatus;

/// `POST /v1/addons`: attach an addon to an app.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAddon {
    pub app: String,
    /// `miren-postgresql`, or `miren-postgresql:VARIANT`.
    pub addon: String,
    /// Overrides a variant given in `addon`; default: the addon's default variant.
    #[serde(default)]
    pub variant: Option<String>,
    /// A catalogue version (`17`, `mariadb-11`) or a full image reference; default: the catalogue default.
    #[serde(default)]
    pub version: Option<String>,
    /// PostgreSQL only: what `DATABASE_URL` points at, `transaction`, `session` or `none`;
    /// default: `transaction` on `shared`, `none` on `small`. Changes in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<String>,
    /// PostgreSQL only: `small` (default), `medium` or `large`; a different tier on an
    /// existing addon changes it in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// PostgreSQL only: the app's pooled client connections (1-2000) instead of its tier's;
    /// changes in place, without dropping a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_connections: Option<u32>,
    /// Answer once the addon is `active` or `error` instead of right away.
    #[serde(default)]
    pub wait: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Addon {
    /// The addon, e.g. `miren-postgresql`.
    pub name: String,
    pub app: String,
    pub variant: String,
    /// A catalogue version, or the image reference it was asked for with.
    pub version: String,
    pub image: String,
    /// `pending`, `provisioning`, `active`, `error` or `deprovisioning`; a destroyed addon
    /// is gone.
    #[schema(value_type = String)]
    pub status: AddonStatus,
    /// Why it is in `error` (or why its last step is being retried).
    pub reason: Option<String>,
    /// The sandbox the addon's server runs in.
    pub server: String,
    /// PostgreSQL: what `DATABASE_URL` points at (`transaction`, `session`, `none`); the
    /// pooler's sandbox is `pooler`. Absent for kinds without a pooler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler: Option<String>,
    /// PostgreSQL: its tier (`small`, `medium`, `large`); absent for kinds without tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// PostgreSQL: the pooled client connections the app may hold (its tier's, or what it
    /// asked for); its pooler refuses the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_connections: Option<u32>,
    /// Its server's data disk: size (GiB) and bytes used now; absent without a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_gb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_bytes: Option<u64>,
    /// The last time the agent grew the data disk by itself, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_growth: Option<String>,
    /// PostgreSQL: how far its continuous archive is behind (`miren addon backups` has more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveLag>,
    /// `cli` or `deploy`: a redeploy removes only addons a deploy made.
    pub source: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonDestroyed {
    pub name: String,
    pub app: String,
    /// True once everything is removed; false if the addon did not exist.
    pub deleted: bool,
}

/// Which credential a rotation replaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CredentialKind {
    /// The app's login (what its variables carry).
    #[default]
    User,
    /// The server's administrator.
    Root,
}

/// `POST /v1/apps/{app}/addons/{addon}/rotate`: new credentials for an addon.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateAddon {
    #[serde(default)]
    pub credential: CredentialKind,
}

/// `PATCH /v1/apps/{app}/addons/{addon}`: change an addon in place.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAddon {
    /// PostgreSQL: `small`, `medium` or `large`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// PostgreSQL: the app's pooled client connections (1-2000), applied live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_connections: Option<u32>,
}

/// An addon after an in-place change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonUpdated {
    pub addon: Addon,
    pub previous_tier: String,
    /// True when the server was restarted for the change (its memory limit,
    /// `shared_buffers` or `max_connections` changed); false when limits changed live.
    pub restarted: bool,
    /// What changed, for people.
    pub changes: Vec<String>,
}

/// A finished credential rotation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonRotated {
    pub name: String,
    pub app: String,
    pub credential: CredentialKind,
    /// The login the app's services now use.
    pub user: String,
    /// The login that can no longer log in.
    pub previous_user: String,
    /// True when this finished a rotation begun earlier (a failed request, a stopped agent)
    /// instead of starting a new one.
    pub resumed: bool,
}

/// How far a PostgreSQL server's continuous archive is behind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ArchiveLag {
    /// WAL files finished by the server and waiting in its spool for the target.
    pub pending_segments: u64,
    pub pending_bytes: u64,
    /// Age of the oldest waiting file; none when nothing waits.
    pub oldest_pending_seconds: Option<u64>,
    /// The last file shipped (since the agent started) and when.
    pub last_shipped: Option<String>,
    pub last_shipped_at: Option<String>,
    /// Why shipping fails now (the target unreachable); the files stay spooled meanwhile.
    pub last_error: Option<String>,
}

/// A base backup in the target.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BaseBackupView {
    pub label: String,
    pub started_at: String,
    /// The earliest point it restores to.
    pub finished_at: String,
    pub timeline: u32,
    /// The compressed object's size, and the data it holds.
    pub size_bytes: u64,
    pub data_bytes: u64,
}

/// `GET /v1/apps/{app}/addons/{addon}/backups`: what an addon's data can be restored to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonBackups {
    pub name: String,
    pub app: String,
    /// The backup target's name and where it is.
    pub target: String,
    pub target_location: String,
    /// False when the backups are on this node (lost with it).
    pub off_node: bool,
    /// The server's archive (`postgres/<server>/...` under the target).
    pub server: String,
    /// The restorable window: earliest and latest point; none without a base backup.
    pub earliest: Option<String>,
    pub latest: Option<String>,
    pub base_backups: Vec<BaseBackupView>,
    pub archive: ArchiveLag,
    /// The disk kept from before the last restore, until `--discard-previous`.
    pub previous_disk: Option<String>,
    /// An app of the shared server: its database kept from before the last restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_database: Option<String>,
    /// Why the target could not be read now (then the window and base backups are empty).
    pub target_error: Option<String>,
}

/// `POST /v1/apps/{app}/addons/{addon}/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreAddon {
    /// RFC 3339 time to restore to; with neither this nor `latest`, nothing is restored.
    #[serde(default)]
    pub to_time: Option<String>,
    /// Restore everything archived.
    #[serde(default)]
    pub latest: bool,
    /// Instead of restoring: delete the disk kept from before the last restore.
    #[serde(default)]
    pub discard_previous: bool,
    /// A fork: restore into a new dedicated addon of this other app instead.
    #[serde(default)]
    pub to_app: Option<String>,
}

/// A finished restore (or a discarded previous disk).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonRestored {
    pub name: String,
    pub app: String,
    /// The point restored to (RFC 3339) or `latest`; empty for `discard_previous`.
    pub restored_to: String,
    pub base_backup: String,
    /// The server's disk now.
    pub disk: String,
    /// The disk from before (kept) or the one deleted by `discard_previous`.
    pub previous_disk: Option<String>,
    /// An app of the shared server: its database from before (kept, renamed) or the one
    /// dropped by `discard_previous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_database: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonVariantInfo {
    pub name: String,
    pub description: String,
    pub default: bool,
    /// `dedicated` (a server per app) or `shared` (one server per node).
    pub tenancy: String,
    /// Its data disk; none for a server that keeps nothing (memcached).
    pub disk_size_gb: Option<u64>,
    pub disk_filesystem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddonCatalogEntry {
    pub name: String,
    pub description: String,
    pub variants: Vec<AddonVariantInfo>,
    pub versions: Vec<String>,
    pub default_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnvVarView {
    pub name: String,
    /// `********` for a sensitive value unless revealed.
    pub value: String,
    pub sensitive: bool,
    /// Where it comes from: an addon's name, or `app.toml`.
    pub source: String,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EnvQuery {
    /// Show sensitive values.
    #[serde(default)]
    pub reveal: bool,
}
