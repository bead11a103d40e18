//! Types that cross the API: request and response bodies. The OpenAPI document is generated
//! from these definitions.

use miren_disks::Filesystem;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::core::status::{AppStatus, EndpointStatus};

pub use crate::core::status::SandboxState;

mod addons;
pub use addons::*;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable error kind, e.g. `not_found`, `conflict`, `invalid_argument`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FilesystemKind {
    Ext4,
    Xfs,
    Btrfs,
}

impl From<FilesystemKind> for Filesystem {
    fn from(kind: FilesystemKind) -> Self {
        match kind {
            FilesystemKind::Ext4 => Filesystem::Ext4,
            FilesystemKind::Xfs => Filesystem::Xfs,
            FilesystemKind::Btrfs => Filesystem::Btrfs,
        }
    }
}

impl From<Filesystem> for FilesystemKind {
    fn from(fs: Filesystem) -> Self {
        match fs {
            Filesystem::Ext4 => FilesystemKind::Ext4,
            Filesystem::Xfs => FilesystemKind::Xfs,
            Filesystem::Btrfs => FilesystemKind::Btrfs,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDisk {
    /// Letters, digits and hyphens, 1-63 characters, starting with a letter or digit.
    pub name: String,
    /// Apparent size in GiB; space is allocated only as data is written.
    pub size_gb: u64,
    #[serde(default)]
    pub filesystem: Option<FilesystemKind>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeDisk {
    /// New size in GiB; must not be smaller than the current size.
    pub size_gb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireLease {
    /// Who holds the disk: a sandbox id, or `pid:N` to tie the lease to a process's life.
    pub holder: String,
    /// How long to wait for the current holder to release, in seconds (default 300).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LeaseInfo {
    pub holder: String,
    pub acquired_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    pub id: String,
    pub name: String,
    /// `miren` for a loop-backed disk, `local` for an app's local storage directory.
    pub provider: String,
    pub size_gb: Option<u64>,
    pub filesystem: Option<FilesystemKind>,
    pub read_only: bool,
    /// `creating`, `attached`, `detached`, `resizing`, `deleting` or `error`.
    pub status: String,
    /// Why the disk is in `error`, when it is.
    pub error: Option<String>,
    /// Real space used by the image file on the host.
    pub allocated_bytes: u64,
    pub image_path: Option<String>,
    /// Loop device, e.g. `/dev/loop3`, while attached.
    pub device: Option<String>,
    /// Host path where the disk is mounted, while mounted.
    pub mount_path: Option<String>,
    pub lease: Option<LeaseInfo>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    /// Name of the leased disk.
    pub disk: String,
    pub disk_id: String,
    pub holder: String,
    pub acquired_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReleaseResult {
    pub disk: String,
    /// The holder that was released, or null when the disk was not leased.
    pub released_holder: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentInfo {
    pub version: String,
    pub data_dir: String,
    pub name_prefix: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishPort {
    /// Host address to listen on (default 127.0.0.1; 0.0.0.0 for every local address).
    #[serde(default)]
    pub host_ip: Option<String>,
    pub host_port: u16,
    /// TCP port inside the sandbox.
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    /// Who the endpoint belongs to: a sandbox id, or `pid:N` to tie it to a process.
    pub owner: String,
    /// The app whose endpoints may reach this one.
    pub app: String,
    /// Other apps allowed to reach this endpoint.
    #[serde(default)]
    pub allow_from: Vec<String>,
    #[serde(default)]
    pub publish: Vec<PublishPort>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Endpoint {
    pub owner: String,
    pub app: String,
    pub ip: String,
    pub gateway: String,
    /// Bind-mounted network namespace a sandbox joins by path.
    pub netns_path: String,
    /// Host end of the veth pair (inside, it is `eth0`).
    pub veth: String,
    pub allow_from: Vec<String>,
    pub publish: Vec<PublishPort>,
    /// `creating`, `ready`, `deleting` or `failed`.
    #[schema(value_type = String)]
    pub status: EndpointStatus,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointDeleted {
    pub owner: String,
    /// False when there was no endpoint (deleting is idempotent).
    pub deleted: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct NetGcReport {
    /// Owners whose endpoints were released (owner gone, or a create/delete cut short).
    pub released: Vec<String>,
    /// Kernel objects (veth / netns keys) that no endpoint owned, removed.
    pub removed: Vec<String>,
    /// Endpoints whose kernel side was missing and has been recreated.
    pub repaired: Vec<String>,
    /// Endpoints that could not be repaired.
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RestoreResult {
    pub disk: Disk,
    /// True when an existing disk's contents were replaced (`force`).
    pub replaced: bool,
    /// Whole-image checksum of the restored image (see docs/snapshot-format.md).
    pub image_checksum: String,
    /// Non-zero image bytes the snapshot held.
    pub data_bytes: u64,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct RestoreQuery {
    /// Disk to restore into (default: the name recorded in the snapshot).
    pub name: Option<String>,
    /// Replace an existing disk's contents (never while it is leased).
    #[serde(default)]
    pub force: bool,
    /// Read the snapshot from this key of a backup target instead of the request body
    /// (which must then be empty).
    pub key: Option<String>,
    /// The backup target `key` is in (default: the agent's default target).
    pub target: Option<String>,
}

/// Back a disk up into a backup target of the agent (`miren agent --backup-target`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupToTarget {
    /// The target's name (default: the agent's default target).
    pub target: Option<String>,
    /// Object key in the target, e.g. `orders/pg-data-20261201-120000.miren.zst`; a backup
    /// is never written over an existing one.
    pub key: String,
}

/// A backup stored in a backup target.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TargetBackup {
    pub disk: String,
    pub target: String,
    pub key: String,
    /// Where the target is (a directory, or `s3://bucket/prefix at endpoint`).
    pub location: String,
    /// Whether the target survives the loss of this node.
    pub off_node: bool,
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub snapshot_bytes: u64,
    pub image_checksum: String,
    /// How long the filesystem was frozen; absent when it was not mounted writable.
    pub freeze_seconds: Option<f64>,
}

/// One line of a target backup's NDJSON response: progress while the snapshot is written,
/// then the stored backup or an error (in which case nothing is stored under the key).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupEvent {
    Progress { done: u64, total: u64 },
    Stored(TargetBackup),
    Error(ErrorBody),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageSummary {
    /// Normalized reference, e.g. `docker.io/library/postgres:17`.
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: usize,
    /// Sum of the (compressed) layer blobs.
    pub size_bytes: u64,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Registry host it came from (after mirrors), or `import:<path>`.
    pub source: String,
    pub stored_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// Docker Hub style (`postgres:17`), a full reference, or `...@sha256:...`.
    pub reference: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    pub reference: String,
    /// On the node: an OCI image-layout directory, an OCI archive, or a rootfs tarball.
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageRemoved {
    pub reference: String,
    pub removed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ImageGcReport {
    pub blobs_removed: usize,
    pub layers_removed: usize,
    pub bytes_freed: u64,
}

/// One line of a pull's NDJSON response: progress while blobs download, then the image or
/// an error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PullEvent {
    Progress {
        digest: String,
        done: u64,
        total: u64,
    },
    Image(ImageSummary),
    Error(ErrorBody),
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct ImageQuery {
    /// The image reference.
    pub reference: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSandbox {
    /// Image reference; pulled through the agent's mirrors if it is not on the node.
    pub image: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The app the sandbox belongs to (network isolation, local storage); default: its name.
    #[serde(default)]
    pub app: Option<String>,
    /// `K=V`, applied over the image's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Memory limit, e.g. `256M`, `1G`; default 512M.
    #[serde(default)]
    pub memory: Option<String>,
    /// CPUs (CFS quota); default 1.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Maximum number of tasks; default 1024.
    #[serde(default)]
    pub pids: Option<i64>,
    /// `NAME:/path[:ro]`: a disk, leased for the sandbox's life.
    #[serde(default)]
    pub disks: Vec<String>,
    /// How long to wait for each disk's lease, in seconds (default 300).
    #[serde(default)]
    pub lease_timeout_secs: Option<f64>,
    /// Where the app's local storage directory appears inside.
    #[serde(default)]
    pub local_dir: Option<String>,
    /// `/path[:size]`: a private tmpfs, 64M unless sized (e.g. `/scratch:256M`).
    #[serde(default)]
    pub tmpfs: Vec<String>,
    /// Size of the writable layer (writes to the container's own root filesystem), e.g.
    /// `2G`; default 1G.
    #[serde(default)]
    pub writable_size: Option<String>,
    /// `no` (default), `on-failure` or `always`.
    #[serde(default)]
    pub restart: Option<String>,
    #[serde(default)]
    pub publish: Vec<PublishPort>,
    /// Other apps whose sandboxes may reach this one (an addon server admits its apps).
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// Command and arguments; default: the image's entrypoint and cmd.
    #[serde(default)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub app: String,
    pub image: String,
    /// `creating`, `running`, `exited` or `failed` (`deleting` while it goes).
    #[schema(value_type = String)]
    pub state: SandboxState,
    pub pid: Option<i32>,
    pub ip: Option<String>,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    pub restarts: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub disks: Vec<String>,
    pub error: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    /// The first 4 MiB of what the command wrote to stdout.
    pub stdout: String,
    /// The first 4 MiB of what it wrote to stderr.
    pub stderr: String,
    /// True when stdout was longer than what `stdout` holds.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// True when stderr was longer than what `stderr` holds.
    #[serde(default)]
    pub stderr_truncated: bool,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct StopQuery {
    /// Seconds between SIGTERM and SIGKILL (default: the sandbox's, 10).
    pub grace_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct WaitQuery {
    /// Give up after this many seconds (408); default: wait as long as it runs.
    pub timeout_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct LogsQuery {
    /// Keep streaming what the sandbox writes.
    #[serde(default)]
    pub follow: bool,
}

/// A host port forwarded to one of an app's services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicePublish {
    pub service: String,
    #[serde(default)]
    pub host_ip: Option<String>,
    pub host_port: u16,
    pub port: u16,
}

/// `POST /v1/deploy`: the text of an app's `.miren/app.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployApp {
    pub app_toml: String,
    /// Where the file came from, for error messages.
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub publish: Vec<ServicePublish>,
    /// Images `POST /v1/builds` built for the services app.toml gives no `image`.
    #[serde(default)]
    pub built: Vec<BuiltImage>,
}

/// A service's image built from source, as a deploy names it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct BuiltImage {
    pub service: String,
    /// The reference the build recorded, e.g. `miren.build/my-app-web:<key>`.
    pub image: String,
    /// Its manifest digest.
    pub digest: String,
    /// The stack it was built with (`bun`, `node`, `python`, `static`).
    pub stack: String,
}

/// `POST /v1/builds`: the body is the app's source as a tar stream.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::IntoParams)]
pub struct BuildQuery {
    /// The app the image is for.
    pub app: String,
    /// The service the image is for.
    pub service: String,
    /// app.toml's `stack` (default: detected from the source).
    pub stack: Option<String>,
    /// app.toml's `base` (default: the stack's base image).
    pub base: Option<String>,
    /// app.toml's `command`, as written (the image's command).
    pub command: Option<String>,
}

/// One step of a build.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildStep {
    /// `source`, `base`, `dependencies`, `image`.
    pub step: String,
    pub detail: String,
    /// Size of the layer it made, if it made one.
    pub bytes: Option<u64>,
    /// Reused from an earlier build instead of done again.
    pub cached: bool,
}

/// What `POST /v1/builds` made (or found already built).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildResult {
    pub image: BuiltImage,
    /// The base image's reference.
    pub base: String,
    /// Files and bytes in the source received.
    pub files: u64,
    pub source_bytes: u64,
    pub steps: Vec<BuildStep>,
    /// True when the image already existed: nothing was built.
    pub cached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppServiceView {
    pub name: String,
    pub sandbox: String,
    pub image: String,
    /// The image's manifest digest, when the agent built it.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// The stack the image was built from source with; absent for prebuilt images.
    #[serde(default)]
    pub built_from_source: Option<String>,
    /// The sandbox's state, absent while it does not exist.
    #[schema(value_type = Option<String>)]
    pub state: Option<SandboxState>,
    pub ip: Option<String>,
    pub restarts: Option<u32>,
    /// The service's health check and what it last found; absent for a service without a
    /// check (no port and no `[services.NAME.health]`) or without a running sandbox.
    #[serde(default)]
    pub health: Option<ServiceHealth>,
}

/// What a service's health check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Started; no check has passed yet.
    Starting,
    /// The last check passed.
    Healthy,
    /// `failure_threshold` checks in a row failed (after the start period).
    Unhealthy,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Starting => "starting",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceHealth {
    pub state: HealthState,
    /// What is checked, e.g. `http GET /healthz on port 3000`.
    pub check: String,
    /// The last failed check's output (bounded), until a check passes.
    pub last_failure: Option<String>,
    /// Consecutive failed checks.
    pub failures: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct App {
    pub name: String,
    /// `deploying`, `running`, `error`.
    #[schema(value_type = String)]
    pub status: AppStatus,
    pub reason: Option<String>,
    pub services: Vec<AppServiceView>,
    pub addons: Vec<Addon>,
    pub created_at: String,
    pub updated_at: String,
    /// What this deploy or restart did that the caller should know (a service replaced
    /// stop-then-start); empty when the app is only read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppDeleted {
    pub name: String,
    /// Sandboxes removed.
    pub sandboxes: Vec<String>,
    /// Addons kept (their data stays until `miren addon destroy`).
    pub addons_kept: Vec<String>,
    /// Disks kept.
    pub disks_kept: Vec<String>,
}
