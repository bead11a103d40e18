//! The API's routes as the CLI calls them: method and path template (as in
//! `docs/openapi.json`), and paths with their segments and query values percent-encoded.

use hyper::Method;
use miren_sys::percent_encode;

/// Every API route the CLI calls: its method and its path template as in `docs/openapi.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Info,
    ListDisks,
    CreateDisk,
    Disk,
    DeleteDisk,
    ResizeDisk,
    AcquireLease,
    ReleaseLease,
    ListLeases,
    LocalStorage,
    BackupDisk,
    BackupDiskToTarget,
    RestoreDisk,
    ListEndpoints,
    CreateEndpoint,
    Endpoint,
    DeleteEndpoint,
    NetGc,
    ListImages,
    PullImage,
    ImportImage,
    RemoveImage,
    ImageGc,
    ListSandboxes,
    RunSandbox,
    Sandbox,
    DeleteSandbox,
    SandboxLogs,
    ExecSandbox,
    StopSandbox,
    WaitSandbox,
    Deploy,
    Build,
    ListApps,
    App,
    DeleteApp,
    RestartApp,
    AppEnv,
    AppAddons,
    AppAddon,
    DestroyAddon,
    CreateAddon,
    RotateAddon,
    UpdateAddon,
    /// The same as `UpdateAddon`, for clients that only send POST.
    UpdateAddonPost,
    AddonCatalog,
    AddonBackups,
    RestoreAddon,
}

impl Route {
    pub const ALL: [Route; 48] = [
        Route::Info,
        Route::ListDisks,
        Route::CreateDisk,
        Route::Disk,
        Route::DeleteDisk,
        Route::ResizeDisk,
        Route::AcquireLease,
        Route::ReleaseLease,
        Route::ListLeases,
        Route::LocalStorage,
        Route::BackupDisk,
        Route::BackupDiskToTarget,
        Route::RestoreDisk,
        Route::ListEndpoints,
        Route::CreateEndpoint,
        Route::Endpoint,
        Route::DeleteEndpoint,
        Route::NetGc,
        Route::ListImages,
        Route::PullImage,
        Route::ImportImage,
        Route::RemoveImage,
        Route::ImageGc,
        Route::ListSandboxes,
        Route::RunSandbox,
        Route::Sandbox,
        Route::DeleteSandbox,
        Route::SandboxLogs,
        Route::ExecSandbox,
        Route::StopSandbox,
        Route::WaitSandbox,
        Route::Deploy,
        Route::Build,
        Route::ListApps,
        Route::App,
        Route::DeleteApp,
        Route::RestartApp,
        Route::AppEnv,
        Route::AppAddons,
        Route::AppAddon,
        Route::DestroyAddon,
        Route::CreateAddon,
        Route::RotateAddon,
        Route::UpdateAddon,
        Route::UpdateAddonPost,
        Route::AddonCatalog,
        Route::AddonBackups,
        Route::RestoreAddon,
    ];

    /// The HTTP method, upper case.
    pub fn method(self) -> &'static str {
        use Route::*;
        match self {
            Info | ListDisks | Disk | ListLeases | ListEndpoints | Endpoint | ListImages
            | ListSandboxes | Sandbox | SandboxLogs | ListApps | App | AppEnv | AppAddons
            | AppAddon | AddonCatalog | AddonBackups => "GET",
            CreateDisk | ResizeDisk | AcquireLease | BackupDisk | BackupDiskToTarget
            | RestoreDisk | CreateEndpoint | NetGc | PullImage | ImportImage | ImageGc
            | RunSandbox | ExecSandbox | StopSandbox | WaitSandbox | Deploy | Build
            | RestartApp | CreateAddon | RotateAddon | UpdateAddonPost | RestoreAddon => "POST",
            LocalStorage => "PUT",
            UpdateAddon => "PATCH",
            DeleteDisk | ReleaseLease | DeleteEndpoint | RemoveImage | DeleteSandbox
            | DeleteApp | DestroyAddon => "DELETE",
        }
    }

    /// The path, with `{name}` where a segment goes.
    pub fn template(self) -> &'static str {
        use Route::*;
        match self {
            Info => "/v1/info",
            ListDisks | CreateDisk => "/v1/disks",
            Disk | DeleteDisk => "/v1/disks/{disk}",
            ResizeDisk => "/v1/disks/{disk}/resize",
            AcquireLease | ReleaseLease => "/v1/disks/{disk}/lease",
            ListLeases => "/v1/leases",
            LocalStorage => "/v1/local-storage/{app}",
            BackupDisk => "/v1/disks/{disk}/backup",
            BackupDiskToTarget => "/v1/disks/{disk}/backups",
            RestoreDisk => "/v1/disks/restore",
            ListEndpoints | CreateEndpoint => "/v1/endpoints",
            Endpoint | DeleteEndpoint => "/v1/endpoints/{owner}",
            NetGc => "/v1/endpoints/gc",
            ListImages | RemoveImage => "/v1/images",
            PullImage => "/v1/images/pull",
            ImportImage => "/v1/images/import",
            ImageGc => "/v1/images/gc",
            ListSandboxes | RunSandbox => "/v1/sandboxes",
            Sandbox | DeleteSandbox => "/v1/sandboxes/{sandbox}",
            SandboxLogs => "/v1/sandboxes/{sandbox}/logs",
            ExecSandbox => "/v1/sandboxes/{sandbox}/exec",
            StopSandbox => "/v1/sandboxes/{sandbox}/stop",
            WaitSandbox => "/v1/sandboxes/{sandbox}/wait",
            Deploy => "/v1/deploy",
            Build => "/v1/builds",
            ListApps => "/v1/apps",
            App | DeleteApp => "/v1/apps/{app}",
            RestartApp => "/v1/apps/{app}/restart",
            AppEnv => "/v1/apps/{app}/env",
            AppAddons => "/v1/apps/{app}/addons",
            AppAddon | DestroyAddon | UpdateAddon | UpdateAddonPost => {
                "/v1/apps/{app}/addons/{addon}"
            }
            CreateAddon => "/v1/addons",
            RotateAddon => "/v1/apps/{app}/addons/{addon}/rotate",
            AddonCatalog => "/v1/addons/catalog",
            AddonBackups => "/v1/apps/{app}/addons/{addon}/backups",
            RestoreAddon => "/v1/apps/{app}/addons/{addon}/restore",
        }
    }

    pub(super) fn http_method(self) -> Method {
        match self.method() {
            "GET" => Method::GET,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            _ => Method::POST,
        }
    }

    /// The request target: the template with each `{..}` replaced by the next segment
    /// (percent-encoded), then the query with its values percent-encoded.
    pub fn path(self, segments: &[&str], query: &[(&str, String)]) -> String {
        let mut path = String::new();
        let mut segments = segments.iter();
        let mut rest = self.template();
        while let Some(start) = rest.find('{') {
            path.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .map_or(rest.len(), |e| start + e + 1);
            path.push_str(&percent_encode(
                segments.next().copied().unwrap_or_default(),
            ));
            rest = &rest[end..];
        }
        path.push_str(rest);
        for (i, (key, value)) in query.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(key);
            path.push('=');
            path.push_str(&percent_encode(value));
        }
        path
    }
}
