//! The addon lifecycle on a fake node: root-free, real SQLite store.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::fakes::{settle, Bench};
use super::*;
use crate::store::addons::{ServerRow, ServerStatus};

const KIND: &str = "miren-postgresql";

fn request(app: &str, variant: &str) -> CreateAddon {
    CreateAddon {
        app: app.into(),
        addon: KIND.into(),
        variant: Some(variant.into()),
        version: None,
        pooling: None,
        tier: None,
        client_connections: None,
        wait: true,
    }
}

/// Waits until the addon's row satisfies `pred` (the driver runs in the background).
async fn until(bench: &Bench, app: &str, pred: impl Fn(Option<&AddonRow>) -> bool) {
    for _ in 0..1000 {
        if pred(bench.store.addon(app, KIND).unwrap().as_ref()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the addon of `{app}` never got there");
}

fn status(bench: &Bench, app: &str) -> Option<AddonStatus> {
    bench.store.addon(app, KIND).unwrap().map(|r| r.status)
}

/// A row as a previous agent left it, in `status`.
fn left_row(bench: &Bench, app: &str, variant: &str, status: AddonStatus) {
    let now = now_rfc3339();
    let row = AddonRow {
        app: app.into(),
        kind: KIND.into(),
        variant: variant.into(),
        version: "17".into(),
        image: "postgres:17".into(),
        source: "cli".into(),
        status,
        reason: None,
        user: format!("u_{app}"),
        password: "pw".into(),
        database: format!("db_{app}"),
        extra: Default::default(),
        created_at: now.clone(),
        updated_at: now,
    };
    bench.store.insert_addon(&row, &[]).unwrap();
}

#[tokio::test]
async fn a_dedicated_addon_goes_pending_provisioning_active() {
    let bench = Bench::new();
    let (addon, done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    assert!(
        ["pending", "provisioning"].contains(&addon.status.as_str()),
        "{}",
        addon.status
    );
    settle(done).await;
    assert_eq!(status(&bench, "shop"), Some(AddonStatus::Active));
    let node = bench.host.node();
    let owner = Owner::Addon {
        app: "shop".into(),
        kind: KIND.into(),
    };
    assert_eq!(
        node.disks.get(&owner.describe()).unwrap(),
        "addon-fake-shop"
    );
    let launch = &node.launches[0];
    assert_eq!(launch.name, "addon-fake-shop");
    assert_eq!(launch.env, ["FAKE_USER=u_shop"]);
    assert_eq!(launch.allow_from, ["shop"]);
    assert_eq!(
        launch.disk,
        Some(("addon-fake-shop".into(), "/data".into()))
    );
    // It never answered before: a half-made data directory is discarded first.
    assert_eq!(
        node.discarded,
        [("addon-fake-shop".to_string(), "half-made".to_string())]
    );
    drop(node);
    let env = bench.addons.env_of("shop").unwrap();
    assert_eq!(env.len(), 1);
    assert!(
        env[0].0.value.starts_with("fake://u_shop:"),
        "{:?}",
        env[0].0
    );
    assert!(bench.addons.not_active("shop").unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_step_leaves_error_with_its_reason_and_nothing_made() {
    let bench = Bench::new();
    *bench.host.fail_run.lock().unwrap() = Some("pulling the image failed".into());
    let (_, done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    settle(done).await;
    let row = bench.store.addon("shop", KIND).unwrap().unwrap();
    assert_eq!(row.status, AddonStatus::Error);
    assert_eq!(row.reason.as_deref(), Some("pulling the image failed"));
    assert!(
        bench.host.node().disks.is_empty(),
        "the disk it made is removed"
    );
    let not_active = bench.addons.not_active("shop").unwrap();
    assert_eq!(
        not_active,
        ["miren-postgresql (error: pulling the image failed)"]
    );
    // Creating again retries.
    *bench.host.fail_run.lock().unwrap() = None;
    let (_, done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    settle(done).await;
    assert_eq!(status(&bench, "shop"), Some(AddonStatus::Active));
}

#[tokio::test]
async fn a_server_that_never_answers_fails_with_its_output() {
    let bench = Bench::new();
    bench.provider.ready.store(false, Ordering::SeqCst);
    let (_, done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    settle(done).await;
    let row = bench.store.addon("shop", KIND).unwrap().unwrap();
    assert_eq!(row.status, AddonStatus::Error);
    let reason = row.reason.unwrap();
    assert!(
        reason.contains("did not answer `PING` within 2s (connection refused)")
            && reason.contains("(fake log)"),
        "{reason}"
    );
    assert!(bench.host.node().sandboxes.is_empty());
}

#[tokio::test]
async fn a_destroy_during_provisioning_wins() {
    let bench = Bench::new();
    let held = bench.host.hold_disks.lock().await;
    let (_, _done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    until(&bench, "shop", |r| {
        r.is_some_and(|r| r.status == AddonStatus::Provisioning)
    })
    .await;
    let done = bench
        .addons
        .destroy("shop", KIND)
        .unwrap()
        .expect("a driver");
    drop(held);
    settle(done).await;
    assert_eq!(status(&bench, "shop"), None);
    let node = bench.host.node();
    assert!(node.disks.is_empty() && node.sandboxes.is_empty());
    assert!(node.launches.is_empty(), "the server is never started");
}

#[tokio::test]
async fn destroying_what_is_not_there_is_none() {
    let bench = Bench::new();
    assert!(bench.addons.destroy("shop", KIND).unwrap().is_none());
}

#[tokio::test]
async fn shared_members_get_tenants_and_the_last_one_out_removes_the_server() {
    let bench = Bench::new();
    for app in ["a", "b"] {
        let (_, done) = bench
            .addons
            .create(&request(app, "shared"), "cli")
            .await
            .unwrap();
        settle(done).await;
        assert_eq!(status(&bench, app), Some(AddonStatus::Active));
    }
    {
        let node = bench.host.node();
        assert_eq!(node.launches.len(), 1, "one server for both");
        assert_eq!(node.launches[0].name, "addon-fake");
        assert_eq!(node.launches[0].env, ["FAKE_USER=admin"]);
        let tenants: Vec<&str> = node.tenants.iter().map(String::as_str).collect();
        assert_eq!(tenants, ["u_a", "u_b"]);
        let server = node.sandboxes.values().next().unwrap();
        assert_eq!(node.allow_from[&server.id], ["a", "b"]);
    }
    assert_eq!(
        bench.store.server(KIND).unwrap().unwrap().status,
        ServerStatus::Active
    );
    settle(bench.addons.destroy("a", KIND).unwrap().unwrap()).await;
    {
        let node = bench.host.node();
        assert_eq!(node.tenants.iter().collect::<Vec<_>>(), ["u_b"]);
        let server = node.sandboxes.values().next().expect("the server stays");
        assert_eq!(node.allow_from[&server.id], ["b"]);
    }
    settle(bench.addons.destroy("b", KIND).unwrap().unwrap()).await;
    let node = bench.host.node();
    assert!(node.tenants.is_empty() && node.sandboxes.is_empty() && node.disks.is_empty());
    assert!(bench.store.server(KIND).unwrap().is_none());
}

/// After a kill -9, the next agent resumes every addon from the state its row was left in.
#[tokio::test]
async fn resume_finishes_each_persisted_state() {
    let mut bench = Bench::new();
    left_row(&bench, "pending", "small", AddonStatus::Pending);
    left_row(&bench, "half", "small", AddonStatus::Provisioning);
    left_row(&bench, "going", "small", AddonStatus::Deprovisioning);
    left_row(&bench, "broken", "small", AddonStatus::Error);
    // `half` got as far as its disk; `going` still has its server.
    let owner = |app: &str| Owner::Addon {
        app: app.into(),
        kind: KIND.into(),
    };
    bench
        .host
        .node()
        .disks
        .insert(owner("half").describe(), "addon-fake-half".into());
    bench
        .host
        .ensure_disk(&owner("going"), "addon-fake-going", 1)
        .await
        .unwrap();
    bench
        .host
        .run_server(
            &owner("going"),
            host::ServerLaunch {
                name: "addon-fake-going".into(),
                image: "x".into(),
                command: vec![],
                env: vec![],
                disk: None,
                allow_from: vec![],
                limits: None,
            },
        )
        .await
        .unwrap();
    bench.restart();
    bench.addons.resume().unwrap();
    until(&bench, "pending", |r| {
        r.is_some_and(|r| r.status == AddonStatus::Active)
    })
    .await;
    until(&bench, "half", |r| {
        r.is_some_and(|r| r.status == AddonStatus::Active)
    })
    .await;
    until(&bench, "going", |r| r.is_none()).await;
    assert_eq!(
        status(&bench, "broken"),
        Some(AddonStatus::Error),
        "error waits for the user"
    );
    let node = bench.host.node();
    assert_eq!(
        node.disks.get(&owner("half").describe()).unwrap(),
        "addon-fake-half"
    );
    assert!(!node.disks.contains_key(&owner("going").describe()));
    assert!(!node.sandboxes.contains_key(&owner("going").describe()));
    assert!(node.sandboxes.contains_key(&owner("pending").describe()));
}

#[tokio::test]
async fn resume_restarts_an_active_addon_whose_server_is_gone_keeping_its_data() {
    let mut bench = Bench::new();
    let (_, done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    settle(done).await;
    let before = bench.store.addon("shop", KIND).unwrap().unwrap();
    // The host restarted: the supervisor, and so the server, is gone.
    bench.host.node().sandboxes.clear();
    bench.restart();
    bench.addons.resume().unwrap();
    until(&bench, "shop", |r| {
        r.is_some_and(|r| r.status == AddonStatus::Provisioning)
    })
    .await;
    until(&bench, "shop", |r| {
        r.is_some_and(|r| r.status == AddonStatus::Active)
    })
    .await;
    let after = bench.store.addon("shop", KIND).unwrap().unwrap();
    assert_eq!(after.password, before.password, "same credentials");
    let node = bench.host.node();
    assert_eq!(node.launches.len(), 2);
    // It answered once: its data directory is kept.
    assert_eq!(node.discarded.len(), 1);
}

#[tokio::test]
async fn resume_removes_a_shared_server_cut_short_while_being_removed() {
    let bench = Bench::new();
    bench
        .store
        .insert_server(&ServerRow {
            kind: KIND.into(),
            version: "17".into(),
            image: "postgres:17".into(),
            status: ServerStatus::Deleting,
            admin_user: "admin".into(),
            admin_password: "admin-pw".into(),
            created_at: now_rfc3339(),
        })
        .unwrap();
    bench
        .host
        .ensure_disk(&shared_owner(KIND), "addon-fake", 10)
        .await
        .unwrap();
    bench.addons.resume().unwrap();
    for _ in 0..500 {
        if bench.store.server(KIND).unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(bench.store.server(KIND).unwrap().is_none());
    assert!(bench.host.node().disks.is_empty());
}

#[tokio::test]
async fn a_changed_variant_is_refused() {
    let bench = Bench::new();
    let (_, done) = bench
        .addons
        .create(&request("shop", "small"), "cli")
        .await
        .unwrap();
    settle(done).await;
    let err = bench
        .addons
        .create(&request("shop", "shared"), "cli")
        .await
        .err()
        .unwrap();
    assert!(
        err.message.contains("variants cannot be changed in place"),
        "{err}"
    );
}

#[test]
fn server_names_fit_the_name_rule() {
    assert_eq!(dedicated_server_name("addon-pg", "myapp"), "addon-pg-myapp");
    let long = "a".repeat(63);
    let name = dedicated_server_name("addon-pg", &long);
    assert!(name.len() <= 63, "{name}");
    assert!(miren_addons::validate_name(&name).is_ok());
    assert_ne!(
        name,
        dedicated_server_name("addon-pg", &format!("{}b", "a".repeat(62)))
    );
}

#[test]
fn addon_args_split_into_name_and_variant() {
    assert_eq!(
        split_addon_arg("miren-postgresql:shared"),
        ("miren-postgresql", Some("shared"))
    );
    assert_eq!(
        split_addon_arg("miren-postgresql"),
        ("miren-postgresql", None)
    );
}
