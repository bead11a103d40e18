//! What a kind of addon is, as the generic driver (`super`) sees it. The driver owns rows,
//! steps, resumption and the shared server's membership; a provider says what server to run
//! and how to talk to it. Adding an addon kind is a provider file here plus its catalogue
//! entry in `miren-addons`, and one line in [`builtin`].

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;

use miren_addons::{AddonKind, Credentials, EnvVar, Pooling, Tier, Variant};

use crate::core::error::Error;

/// A boxed future, so the traits below can be used as `dyn` (providers are picked at runtime).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The server an addon runs: the image's contract, made concrete for one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Empty: the image's entrypoint and cmd.
    pub command: Vec<String>,
    /// `KEY=value` for the image (secrets included: the sandbox's env is not shown anywhere).
    pub env: Vec<String>,
    /// Where the server listens, on its sandbox's address.
    pub port: u16,
    /// Its data disk; `None` for a server that keeps nothing (memcached).
    pub data: Option<DataDisk>,
}

/// A server's data disk (ext4, leased by the server's sandbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDisk {
    /// Where the disk is mounted in the server's sandbox.
    pub mount_path: &'static str,
    pub size_gb: u64,
    /// A directory, relative to the disk's root, that a server which never answered left
    /// half-made (an initdb cut short) and must start without.
    pub discard_if_never_ready: Option<&'static str>,
}

/// What a server of a tier gets (kinds with tiers): its sandbox's limits, its disk's size,
/// arguments for the image (settings that need a restart) and settings a running server takes
/// on a reload.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSize {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub disk_size_gb: u64,
    /// Appended to the server's command (a restart applies them).
    pub args: Vec<String>,
    /// Applied to the running server ([`ServerConnection::apply_settings`]).
    pub live_settings: Vec<(&'static str, String)>,
}

/// A sandbox run beside each server of a kind (PostgreSQL's pooler): no disk, reachable by
/// the same apps as its server, which admits it in turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarSpec {
    /// Its sandbox's name is the server's plus `-<name_suffix>`.
    pub name_suffix: &'static str,
    pub image: String,
    /// Empty: the image's entrypoint and cmd.
    pub command: Vec<String>,
    /// `KEY=value` for the image (secrets included, as for servers).
    pub env: Vec<String>,
}

/// A kind of addon.
pub trait AddonProvider: Send + Sync {
    /// Its catalogue entry (variants, versions, images) is `kind()`'s in `miren-addons`.
    fn kind(&self) -> AddonKind;

    /// The product's name in messages (`PostgreSQL`).
    fn display_name(&self) -> &'static str;

    /// The readiness check in messages (`` `SELECT 1` ``).
    fn readiness_check(&self) -> &'static str;

    /// The sandbox and disk name of the node's shared server, and the prefix of an app's
    /// dedicated one (`addon-pg`). In the reserved `addon` name space.
    fn server_base_name(&self) -> &'static str;

    /// A fresh login for an app (empty strings for a kind without credentials).
    fn app_credentials(&self, app: &str) -> Result<Credentials, Error>;

    /// A fresh administrator login for a shared server.
    fn admin_credentials(&self) -> Result<Credentials, Error>;

    /// The administrator login a shared server was made with (its row keeps user and password).
    fn admin_login(&self, user: &str, password: &str) -> Credentials;

    /// The server a variant runs, its image set up for `login` (the app's on a dedicated
    /// server, the administrator's on a shared one).
    fn server(&self, variant: Variant, login: &Credentials) -> ServerSpec;

    /// What a server of `tier` gets; `None`: the kind has no tiers (defaults apply).
    fn server_size(&self, _variant: Variant, _tier: Tier) -> Option<ServerSize> {
        None
    }

    /// The filesystem of its servers' new data disks.
    fn data_filesystem(&self) -> crate::model::FilesystemKind {
        crate::model::FilesystemKind::Ext4
    }

    /// The variables an app gets to reach its addon at `host`.
    fn env_vars(&self, host: Ipv4Addr, login: &Credentials) -> Vec<EnvVar>;

    /// Logs in to the server at `host` as `login` and checks that it answers: the readiness
    /// check, made with the credentials the app will use. `Err` is the reason, for logs.
    fn connect<'a>(
        &'a self,
        host: Ipv4Addr,
        login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>>;

    /// Whether each server has a sidecar ([`AddonProvider::sidecar`]).
    fn has_sidecar(&self) -> bool {
        false
    }

    /// The sidecar beside a server at `server` whose administrator session ran
    /// [`ServerConnection::prepare_sidecar`] with `secret` as `admin`; `None` for a kind
    /// without one.
    fn sidecar(
        &self,
        _variant: Variant,
        _tier: Tier,
        _server: Ipv4Addr,
        _admin: &Credentials,
        _secret: &str,
        _limits: &[DbClientLimit],
    ) -> Option<SidecarSpec> {
        None
    }

    /// The command that gives the running sidecar of a server at `server` these per-database
    /// client limits (applied live); `None`: this kind's sidecar has none.
    fn sidecar_limits(
        &self,
        _server: Ipv4Addr,
        _limits: &[DbClientLimit],
    ) -> Option<super::host::SandboxCommand> {
        None
    }

    /// Checks that the sidecar at `host` serves `login` (the sidecar's readiness check).
    fn sidecar_ready<'a>(
        &'a self,
        _host: Ipv4Addr,
        _login: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// The variables of an addon with a sidecar at `sidecar`, `DATABASE_URL` where `pooling`
    /// says. Kinds without a sidecar never get here.
    fn env_vars_with_sidecar(
        &self,
        server: Ipv4Addr,
        _sidecar: Ipv4Addr,
        login: &Credentials,
        _pooling: Pooling,
    ) -> Vec<EnvVar> {
        self.env_vars(server, login)
    }

    /// The administrator a shared server's administrator `current` rotates to: another
    /// login, with a fresh password (see [`ServerConnection::add_admin`]). `None`: this kind
    /// cannot rotate it.
    fn next_admin(&self, _current: &str) -> Result<Option<Credentials>, Error> {
        Ok(None)
    }

    /// The login an app's credentials rotate to from `current`: another login, with a fresh
    /// password, that reaches the same data (see [`ServerConnection::add_login`]). `None`:
    /// this kind cannot rotate credentials.
    fn next_login(
        &self,
        _variant: Variant,
        _app: &str,
        _current: &Credentials,
    ) -> Result<Option<Credentials>, Error> {
        Ok(None)
    }
}

/// How many client connections a sidecar admits to one app's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbClientLimit {
    pub database: String,
    pub clients: u32,
}

/// A session with a running server, logged in as the administrator (shared servers) or an
/// app. Every step converges from any partial earlier run; errors are messages for the
/// addon's `reason`.
pub trait ServerConnection: Send + Sync {
    /// Runs once, when a new shared server first answers (locks the maintenance databases).
    fn prepare_shared(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Readies the server for a new sidecar that logs in with `secret` (run before each
    /// sidecar is started, so an old sidecar's secret stops working). Converges.
    fn prepare_sidecar<'a>(
        &'a self,
        _variant: Variant,
        _secret: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Applies settings a running server takes without a restart (and reloads). Converges.
    fn apply_settings<'a>(
        &'a self,
        _settings: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Limits a tenant's logins on a shared server to `connections` each. Converges.
    fn limit_tenant<'a>(
        &'a self,
        _tenant: &'a Credentials,
        _connections: u32,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Makes an app's tenant on a shared server (role and database, user and vhost).
    fn ensure_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>>;

    /// Removes an app's tenant and ends its sessions.
    fn drop_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>>;

    /// Makes `next` a login with exactly `current`'s rights on the same data, beside it
    /// (credential rotation; both work until one is retired). Safe to repeat.
    fn add_login<'a>(
        &'a self,
        _current: &'a Credentials,
        _next: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("this kind cannot rotate credentials".to_string()) })
    }

    /// Stops the login `retired` from logging in and ends its sessions; `current` (the one
    /// that replaced it) keeps working. Safe to repeat.
    fn retire_login<'a>(
        &'a self,
        _retired: &'a str,
        _current: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("this kind cannot rotate credentials".to_string()) })
    }

    /// Makes `next` an administrator of the server beside the current one. Safe to repeat.
    fn add_admin<'a>(&'a self, _next: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("this kind cannot rotate its administrator".to_string()) })
    }

    /// Stops the administrator `retired` from logging in over the network and ends its
    /// sessions. Safe to repeat.
    fn retire_admin<'a>(&'a self, _retired: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("this kind cannot rotate its administrator".to_string()) })
    }

    /// Whether anything of the tenant is left (tests and leftovers checks).
    fn tenant_exists<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<bool, String>>;
}

/// A session with a server that belongs to one app (Valkey, Memcached, RabbitMQ): it holds
/// the connection that passed the readiness check for as long as the driver keeps it, and
/// has no tenants.
pub struct DedicatedSession<C> {
    display_name: &'static str,
    _conn: C,
}

impl<C: Send + Sync> DedicatedSession<C> {
    pub fn boxed(display_name: &'static str, conn: C) -> Box<dyn ServerConnection>
    where
        C: 'static,
    {
        Box::new(DedicatedSession {
            display_name,
            _conn: conn,
        })
    }

    fn no_tenants(&self) -> String {
        format!(
            "{} servers are dedicated: they have no tenants",
            self.display_name
        )
    }
}

impl<C: Send + Sync> ServerConnection for DedicatedSession<C> {
    fn ensure_tenant<'a>(&'a self, _tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { Err(self.no_tenants()) })
    }

    fn drop_tenant<'a>(&'a self, _tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { Err(self.no_tenants()) })
    }

    fn tenant_exists<'a>(
        &'a self,
        _tenant: &'a Credentials,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async { Ok(false) })
    }
}

/// The providers this build has, one per catalogue entry.
pub fn builtin() -> Vec<Arc<dyn AddonProvider>> {
    vec![
        Arc::new(super::postgres::Postgres),
        Arc::new(super::valkey::Valkey),
        Arc::new(super::memcache::Memcache),
        Arc::new(super::mysql::Mysql),
        Arc::new(super::rabbitmq::Rabbitmq),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalogue_entry_has_exactly_one_provider() {
        let providers = builtin();
        for kind in AddonKind::ALL {
            let count = providers.iter().filter(|p| p.kind() == *kind).count();
            assert_eq!(count, 1, "{}", kind.name());
        }
        assert_eq!(providers.len(), AddonKind::ALL.len());
    }
}
