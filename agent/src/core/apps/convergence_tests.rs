//! Deploy convergence on a fake node: addons added, kept and removed across redeploys, and
//! services held until every addon is active. Root-free, real SQLite store.

use std::sync::{Arc, Mutex};

use super::*;
use crate::core::addons::fakes::Bench;
use crate::core::status::{AddonStatus, SandboxState};

const KIND: &str = "miren-postgresql";

/// Disks are not declared in these tests.
struct NoDisks;

impl AppDisks for NoDisks {
    fn ensure_for_app(&self, _req: &CreateDisk, _app: &str) -> Result<(), Error> {
        Ok(())
    }

    fn check_for_app(&self, _name: &str, _app: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// Service sandboxes in memory: (owner, request) of each running one.
#[derive(Default)]
struct FakeSandboxes {
    running: Mutex<Vec<(Owner, SandboxRequest)>>,
    started: Mutex<u32>,
}

impl FakeSandboxes {
    fn env_of(&self, service: &str) -> Option<Vec<String>> {
        self.running
            .lock()
            .unwrap()
            .iter()
            .find(|(o, _)| *o == Owner::service("shop", service))
            .map(|(_, req)| req.env.clone())
    }
}

fn sandbox(name: &str) -> Sandbox {
    Sandbox {
        id: format!("sbx_{name}"),
        name: name.into(),
        app: "shop".into(),
        image: "oven/bun:1".into(),
        state: SandboxState::Running,
        pid: None,
        ip: None,
        exit_code: None,
        oom_killed: false,
        restarts: 0,
        started_at: None,
        finished_at: None,
        disks: vec![],
        error: None,
        created_at: String::new(),
    }
}

impl ServiceSandboxes for FakeSandboxes {
    fn run_request(
        &self,
        req: SandboxRequest,
        owner: Option<Owner>,
    ) -> BoxFuture<'_, Result<Sandbox, Error>> {
        Box::pin(async move {
            let owner = owner.expect("services have owners");
            let name = req.name.as_deref().unwrap_or_default().to_string();
            let mut running = self.running.lock().unwrap();
            running.retain(|(o, _)| *o != owner);
            running.push((owner, req));
            *self.started.lock().unwrap() += 1;
            Ok(sandbox(&name))
        })
    }

    fn get_owned(&self, owner: &Owner) -> Result<Option<Sandbox>, Error> {
        Ok(self
            .running
            .lock()
            .unwrap()
            .iter()
            .find(|(o, _)| o == owner)
            .map(|(_, req)| sandbox(req.name.as_deref().unwrap_or_default())))
    }

    fn delete_owned<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.running.lock().unwrap().retain(|(o, _)| o != owner);
            Ok(())
        })
    }

    fn free_name(&self, preferred: &str, _owner: &Owner) -> Result<Name, Error> {
        crate::core::validate::to_name("sandbox name", preferred)
    }

    fn probe<'a>(
        &'a self,
        _id: &'a str,
        _ip: Option<std::net::Ipv4Addr>,
        _probe: &'a ProbeSpec,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn restart_process(&self, _id: &str) -> Result<(), Error> {
        Ok(())
    }

    fn stop<'a>(&'a self, _id: &'a str, _grace: Duration) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn switch_published<'a>(
        &'a self,
        _from: &'a str,
        _to: &'a str,
        _publish: &'a [miren_netns::PublishedPort],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn promote_next(&self, app: &str, service: &str) -> Result<(), Error> {
        use crate::core::owner::ReplacingRole;
        let mut running = self.running.lock().unwrap();
        let (next, retiring) = (
            Owner::replacing(app, service, ReplacingRole::Next),
            Owner::replacing(app, service, ReplacingRole::Retiring),
        );
        if running.iter().any(|(o, _)| *o == next) {
            for (o, _) in running.iter_mut() {
                if *o == Owner::service(app, service) {
                    *o = retiring.clone();
                } else if *o == next {
                    *o = Owner::service(app, service);
                }
            }
        }
        Ok(())
    }
}

struct World {
    bench: Bench,
    sandboxes: Arc<FakeSandboxes>,
    apps: Arc<AppService>,
}

fn world() -> World {
    let bench = Bench::new();
    let sandboxes = Arc::new(FakeSandboxes::default());
    let apps = AppService::new(
        bench.store.clone(),
        Arc::new(NoDisks),
        sandboxes.clone(),
        bench.addons.clone(),
    );
    World {
        bench,
        sandboxes,
        apps,
    }
}

fn app_toml(addon: Option<&str>) -> DeployApp {
    let mut text = "name = \"shop\"\n[services.web]\nimage = \"oven/bun:1\"\n".to_string();
    if let Some(variant) = addon {
        text.push_str(&format!("[addons.{KIND}]\nvariant = \"{variant}\"\n"));
    }
    serde_json::from_value(serde_json::json!({ "app_toml": text })).unwrap()
}

#[tokio::test]
async fn a_deploy_adds_keeps_and_removes_its_addon() {
    let w = world();
    let app = w.apps.deploy(app_toml(Some("small"))).await.unwrap();
    assert_eq!(app.status, AppStatus::Running);
    assert_eq!(app.addons.len(), 1);
    assert_eq!(app.addons[0].status, AddonStatus::Active);
    let env = w.sandboxes.env_of("web").unwrap();
    assert!(
        env.iter().any(|e| e.starts_with("FAKE_URL=fake://u_shop:")),
        "{env:?}"
    );
    assert!(env.contains(&"PORT=3000".to_string()), "{env:?}");
    let first = w.bench.store.addon("shop", KIND).unwrap().unwrap();
    assert_eq!(first.source, "deploy");

    // Redeployed as it is: the same addon, same credentials, same server.
    w.apps.deploy(app_toml(Some("small"))).await.unwrap();
    let kept = w.bench.store.addon("shop", KIND).unwrap().unwrap();
    assert_eq!(
        (kept.password.as_str(), kept.created_at.as_str()),
        (first.password.as_str(), first.created_at.as_str())
    );
    assert_eq!(
        w.bench.host.node().launches.len(),
        1,
        "the server is not started again"
    );

    // No longer declared: removed, and the services restarted without its variables.
    let app = w.apps.deploy(app_toml(None)).await.unwrap();
    assert!(app.addons.is_empty());
    assert!(w.bench.store.addon("shop", KIND).unwrap().is_none());
    assert!(w.bench.host.node().sandboxes.is_empty());
    let env = w.sandboxes.env_of("web").unwrap();
    assert!(!env.iter().any(|e| e.starts_with("FAKE_URL=")), "{env:?}");
}

#[tokio::test]
async fn an_addon_made_with_the_cli_survives_a_deploy_without_it() {
    let w = world();
    let (_, mut done) = w
        .bench
        .addons
        .create(
            &CreateAddon {
                app: "shop".into(),
                addon: KIND.into(),
                variant: None,
                version: None,
                pooling: None,
                tier: None,
                client_connections: None,
                wait: true,
            },
            "cli",
        )
        .await
        .unwrap();
    done.wait_for(|d| *d).await.unwrap();
    w.apps.deploy(app_toml(None)).await.unwrap();
    assert!(w.bench.store.addon("shop", KIND).unwrap().is_some());
}

#[tokio::test]
async fn services_are_held_until_every_addon_is_active() {
    let w = world();
    *w.bench.host.fail_run.lock().unwrap() = Some("no space left".into());
    let err = w.apps.deploy(app_toml(Some("small"))).await.err().unwrap();
    assert!(
        err.message
            .contains("was not started: its addons are not all active")
            && err.message.contains("no space left"),
        "{err}"
    );
    assert_eq!(
        *w.sandboxes.started.lock().unwrap(),
        0,
        "no service started"
    );
    let app = w.apps.get("shop").unwrap();
    assert_eq!(app.status, AppStatus::Error);
    assert!(app.reason.unwrap().contains("no space left"));
    // A restart is refused as long as the addon is not active.
    assert!(w.apps.restart("shop").await.is_err());
    assert_eq!(*w.sandboxes.started.lock().unwrap(), 0);

    // Fixed: deploying again provisions the addon and starts the service.
    *w.bench.host.fail_run.lock().unwrap() = None;
    let app = w.apps.deploy(app_toml(Some("small"))).await.unwrap();
    assert_eq!(app.status, AppStatus::Running);
    assert_eq!(*w.sandboxes.started.lock().unwrap(), 1);
}

#[tokio::test]
async fn an_addon_change_outside_a_deploy_restarts_the_services() {
    let w = world();
    w.apps.deploy(app_toml(Some("small"))).await.unwrap();
    assert_eq!(*w.sandboxes.started.lock().unwrap(), 1);
    // Nothing changed: nothing restarts.
    w.apps.addons_changed("shop").await.unwrap();
    assert_eq!(*w.sandboxes.started.lock().unwrap(), 1);
    let mut done = w.bench.addons.destroy("shop", KIND).unwrap().unwrap();
    done.wait_for(|d| *d).await.unwrap();
    w.apps.addons_changed("shop").await.unwrap();
    assert_eq!(*w.sandboxes.started.lock().unwrap(), 2);
    let env = w.sandboxes.env_of("web").unwrap();
    assert!(!env.iter().any(|e| e.starts_with("FAKE_URL=")), "{env:?}");
}

fn web_toml(extra: &str) -> DeployApp {
    let text = format!(
        "name = \"shop\"\n[services.web]\nimage = \"oven/bun:1\"\n{extra}\n[services.worker]\nimage = \"oven/bun:1\"\n"
    );
    serde_json::from_value(serde_json::json!({ "app_toml": text })).unwrap()
}

/// A redeploy replaces only the changed service, beside itself: the next sandbox is started,
/// promoted, and the switch row is gone once the previous one drained.
#[tokio::test]
async fn a_redeploy_replaces_only_the_changed_service_beside_itself() {
    let w = world();
    w.apps.deploy(web_toml("")).await.unwrap();
    assert_eq!(*w.sandboxes.started.lock().unwrap(), 2);
    let app = w
        .apps
        .deploy(web_toml(
            "[[services.web.env]]\nkey = \"V\"\nvalue = \"2\"\n",
        ))
        .await
        .unwrap();
    assert!(app.notes.is_empty(), "{:?}", app.notes);
    assert_eq!(
        *w.sandboxes.started.lock().unwrap(),
        3,
        "only web started again"
    );
    assert!(w.sandboxes.env_of("web").unwrap().contains(&"V=2".into()));
    let owners: Vec<Owner> = w
        .sandboxes
        .running
        .lock()
        .unwrap()
        .iter()
        .map(|(o, _)| o.clone())
        .collect();
    assert!(!owners.contains(&Owner::replacing(
        "shop",
        "web",
        crate::core::owner::ReplacingRole::Next
    )));
    // The previous sandbox drains in the background, then the row goes.
    for _ in 0..100 {
        if w.bench.store.switch_of("shop", "web").unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.bench.store.switch_of("shop", "web").unwrap(), None);

    // `strategy = "recreate"` is stop-then-start, and the deploy says so.
    let app = w
        .apps
        .deploy(web_toml("strategy = \"recreate\""))
        .await
        .unwrap();
    assert!(
        app.notes
            .iter()
            .any(|n| n.contains("replaced stop-then-start")),
        "{:?}",
        app.notes
    );
}

/// Switches an agent was killed in: before `switching` the next sandbox goes, from then on
/// the switch is finished.
#[tokio::test]
async fn switches_cut_short_are_undone_or_finished() {
    use crate::core::owner::ReplacingRole;
    use crate::core::status::SwitchPhase;
    let w = world();
    w.apps.deploy(web_toml("")).await.unwrap();
    let next = Owner::replacing("shop", "web", ReplacingRole::Next);
    let run_next = || async {
        w.sandboxes
            .run_request(SandboxRequest::new("oven/bun:1"), Some(next.clone()))
            .await
            .unwrap()
    };
    // Cut short while starting: the next sandbox is removed, the serving one stays.
    run_next().await;
    w.bench
        .store
        .begin_switch("shop", "web", "sbx_prev")
        .unwrap();
    w.apps.resume_switches().await.unwrap();
    assert!(w.sandboxes.get_owned(&next).unwrap().is_none());
    assert!(w
        .sandboxes
        .get_owned(&Owner::service("shop", "web"))
        .unwrap()
        .is_some());
    assert_eq!(w.bench.store.switch_of("shop", "web").unwrap(), None);

    // Cut short while switching: finished; the next one serves, the previous one is gone.
    let serving = w
        .sandboxes
        .get_owned(&Owner::service("shop", "web"))
        .unwrap()
        .unwrap();
    let started = run_next().await;
    w.bench
        .store
        .begin_switch("shop", "web", &serving.id)
        .unwrap();
    w.bench
        .store
        .set_switch_phase("shop", "web", SwitchPhase::Switching, Some(&started.id))
        .unwrap();
    w.apps.resume_switches().await.unwrap();
    for _ in 0..100 {
        if w.bench.store.switch_of("shop", "web").unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.bench.store.switch_of("shop", "web").unwrap(), None);
    assert!(w.sandboxes.get_owned(&next).unwrap().is_none());
    let retiring = Owner::replacing("shop", "web", ReplacingRole::Retiring);
    assert!(w.sandboxes.get_owned(&retiring).unwrap().is_none());
    assert!(w
        .sandboxes
        .get_owned(&Owner::service("shop", "web"))
        .unwrap()
        .is_some());
}
