//! A node and an addon kind that exist only in memory, for unit tests of the driver and of
//! app convergence without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miren_addons::{AddonKind, Credentials, EnvVar, Variant};

use super::host::{AddonHost, ServerLaunch, ServerSandbox};
use super::provider::{AddonProvider, BoxFuture, DataDisk, ServerConnection, ServerSpec};
use super::AddonService;
use crate::core::error::Error;
use crate::store::{Owner, Store};

/// What the fake node holds, for assertions.
#[derive(Default)]
pub struct NodeState {
    /// Disk name by owner.
    pub disks: BTreeMap<String, String>,
    /// Sandbox by owner.
    pub sandboxes: BTreeMap<String, ServerSandbox>,
    pub launches: Vec<ServerLaunch>,
    pub allow_from: BTreeMap<String, Vec<String>>,
    /// (disk, dir) pairs discarded.
    pub discarded: Vec<(String, String)>,
    /// Tenants (user) on shared servers.
    pub tenants: BTreeSet<String>,
    /// Commands run in sandboxes, by sandbox id.
    pub execs: Vec<(String, super::host::SandboxCommand)>,
    pub next_id: u32,
}

#[derive(Default)]
pub struct FakeHost {
    pub state: Mutex<NodeState>,
    /// `run_server` fails with this message.
    pub fail_run: Mutex<Option<String>>,
    /// Held by a test to stop provisioning inside `ensure_disk`.
    pub hold_disks: tokio::sync::Mutex<()>,
}

fn key(owner: &Owner) -> String {
    owner.describe()
}

impl FakeHost {
    pub fn node(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap()
    }
}

impl AddonHost for FakeHost {
    fn ensure_disk<'a>(
        &'a self,
        owner: &'a Owner,
        name: &'a str,
        _size_gb: u64,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            let _held = self.hold_disks.lock().await;
            let mut node = self.node();
            Ok(node
                .disks
                .entry(key(owner))
                .or_insert_with(|| name.to_string())
                .clone())
        })
    }

    fn remove_disk<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.node().disks.remove(&key(owner));
            Ok(())
        })
    }

    fn discard_dir<'a>(&'a self, disk: &'a str, dir: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.node()
                .discarded
                .push((disk.to_string(), dir.to_string()));
            Ok(())
        })
    }

    fn sync_disk<'a>(&'a self, _disk: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn server_sandbox(&self, owner: &Owner) -> Result<Option<ServerSandbox>, Error> {
        Ok(self.node().sandboxes.get(&key(owner)).cloned())
    }

    fn sandbox(&self, id: &str) -> Result<ServerSandbox, Error> {
        self.node()
            .sandboxes
            .values()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no sandbox {id}")))
    }

    fn remove_unowned_server<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn run_server<'a>(
        &'a self,
        owner: &'a Owner,
        launch: ServerLaunch,
    ) -> BoxFuture<'a, Result<ServerSandbox, Error>> {
        Box::pin(async move {
            if let Some(message) = self.fail_run.lock().unwrap().clone() {
                return Err(Error::internal(message));
            }
            let mut node = self.node();
            node.next_id += 1;
            let id = node.next_id;
            let sandbox = ServerSandbox {
                id: format!("sbx_{id}"),
                name: launch.name.clone(),
                ip: Some(Ipv4Addr::new(10, 0, 0, id as u8)),
                failed: false,
                restarts: 0,
                exit_code: None,
            };
            node.allow_from
                .insert(sandbox.id.clone(), launch.allow_from.clone());
            node.launches.push(launch);
            node.sandboxes.insert(key(owner), sandbox.clone());
            Ok(sandbox)
        })
    }

    fn delete_sandbox<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.node().sandboxes.retain(|_, s| s.id != id);
            Ok(())
        })
    }

    fn delete_owned<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.node().sandboxes.remove(&key(owner));
            Ok(())
        })
    }

    fn set_allow_from<'a>(
        &'a self,
        sandbox_id: &'a str,
        apps: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.node()
                .allow_from
                .insert(sandbox_id.to_string(), apps.to_vec());
            Ok(())
        })
    }

    fn log_tail(&self, _sandbox_id: &str, _lines: usize) -> String {
        "(fake log)".into()
    }

    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        command: super::host::SandboxCommand,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.node().execs.push((sandbox_id.to_string(), command));
            Ok(())
        })
    }
}

/// An addon kind whose server answers once `ready` is set, with tenants kept in the host.
pub struct FakeProvider {
    pub host: Arc<FakeHost>,
    pub ready: AtomicBool,
}

impl AddonProvider for FakeProvider {
    fn kind(&self) -> AddonKind {
        AddonKind::Postgresql
    }

    fn display_name(&self) -> &'static str {
        "Fake"
    }

    fn readiness_check(&self) -> &'static str {
        "`PING`"
    }

    fn server_base_name(&self) -> &'static str {
        "addon-fake"
    }

    fn app_credentials(&self, app: &str) -> Result<Credentials, Error> {
        Ok(Credentials {
            user: format!("u_{app}"),
            password: format!("pw-{}", self.host.node().next_id),
            database: format!("db_{app}"),
        })
    }

    fn admin_credentials(&self) -> Result<Credentials, Error> {
        Ok(self.admin_login("admin", "admin-pw"))
    }

    fn admin_login(&self, user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
            database: String::new(),
        }
    }

    fn server(&self, variant: Variant, login: &Credentials) -> ServerSpec {
        ServerSpec {
            command: vec!["fake-server".into()],
            env: vec![format!("FAKE_USER={}", login.user)],
            port: 1,
            data: Some(DataDisk {
                mount_path: "/data",
                size_gb: variant.disk_size_gb(),
                discard_if_never_ready: Some("half-made"),
            }),
        }
    }

    fn env_vars(&self, host: Ipv4Addr, login: &Credentials) -> Vec<EnvVar> {
        vec![EnvVar {
            key: "FAKE_URL",
            value: format!(
                "fake://{}:{}@{host}/{}",
                login.user, login.password, login.database
            ),
            sensitive: true,
        }]
    }

    fn connect<'a>(
        &'a self,
        _host: Ipv4Addr,
        _login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>> {
        Box::pin(async move {
            if !self.ready.load(Ordering::SeqCst) {
                return Err("connection refused".into());
            }
            Ok(Box::new(FakeSession(self.host.clone())) as Box<dyn ServerConnection>)
        })
    }
}

struct FakeSession(Arc<FakeHost>);

impl ServerConnection for FakeSession {
    fn ensure_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.0.node().tenants.insert(tenant.user.clone());
            Ok(())
        })
    }

    fn drop_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.0.node().tenants.remove(&tenant.user);
            Ok(())
        })
    }

    fn tenant_exists<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move { Ok(self.0.node().tenants.contains(&tenant.user)) })
    }
}

/// A store in a temp dir, a fake node, and an addon service on them.
pub struct Bench {
    pub _dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub host: Arc<FakeHost>,
    pub provider: Arc<FakeProvider>,
    pub addons: Arc<AddonService>,
}

impl Bench {
    pub fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("state.db")).unwrap());
        let host = Arc::new(FakeHost::default());
        let provider = Arc::new(FakeProvider {
            host: host.clone(),
            ready: AtomicBool::new(true),
        });
        let addons = Bench::service(&store, &host, &provider);
        Bench {
            _dir: dir,
            store,
            host,
            provider,
            addons,
        }
    }

    /// A new agent on the same store and node (after a "crash" of the previous one).
    pub fn service(
        store: &Arc<Store>,
        host: &Arc<FakeHost>,
        provider: &Arc<FakeProvider>,
    ) -> Arc<AddonService> {
        let mut service =
            AddonService::with_host(store.clone(), host.clone(), vec![provider.clone()]);
        if let Some(s) = Arc::get_mut(&mut service) {
            s.ready_timeout = Duration::from_secs(2);
        }
        service
    }

    pub fn restart(&mut self) {
        self.addons = Bench::service(&self.store, &self.host, &self.provider);
    }
}

/// Waits (at most 10 s) until a driver reports it settled.
pub(super) async fn settle(mut done: tokio::sync::watch::Receiver<bool>) {
    tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d))
        .await
        .expect("the driver settles")
        .unwrap();
}
