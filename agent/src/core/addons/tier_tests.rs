//! Tier changes on the fake node: recorded before anything acts, applied by the driver (the
//! server made again), and converged after a restart from any recorded state.

use std::time::Duration;

use super::fakes::{settle, Bench};
use super::tiers::{applied_tier, tier, APPLIED_TIER, TIER};
use super::*;
use crate::model::UpdateAddon;
use miren_addons::Tier;

const KIND: &str = "miren-postgresql";

fn request(app: &str, tier: Option<&str>) -> CreateAddon {
    CreateAddon {
        app: app.into(),
        addon: KIND.into(),
        variant: Some("small".into()),
        version: None,
        pooling: None,
        tier: tier.map(str::to_string),
        client_connections: None,
        wait: true,
    }
}

fn row(bench: &Bench, app: &str) -> AddonRow {
    bench.store.addon(app, KIND).unwrap().unwrap()
}

fn server_id(bench: &Bench, app: &str) -> String {
    let owner = server_owner(&row(bench, app));
    bench.host.server_sandbox(&owner).unwrap().unwrap().id
}

#[tokio::test]
async fn a_tier_change_is_recorded_then_applied_by_making_the_server_again() {
    let bench = Bench::new();
    let (addon, done) = bench
        .addons
        .create(&request("shop", None), "cli")
        .await
        .unwrap();
    assert_eq!(addon.tier.as_deref(), Some("small"));
    settle(done).await;
    let r = row(&bench, "shop");
    assert_eq!((tier(&r), applied_tier(&r)), (Tier::Small, Tier::Small));
    let before = server_id(&bench, "shop");

    let (from, _, done) = bench
        .addons
        .update(
            "shop",
            KIND,
            &UpdateAddon {
                tier: Some("medium".into()),
                client_connections: None,
            },
        )
        .unwrap();
    assert_eq!(from, Tier::Small);
    settle(done).await;
    let r = row(&bench, "shop");
    assert_eq!(r.status, AddonStatus::Active);
    assert_eq!((tier(&r), applied_tier(&r)), (Tier::Medium, Tier::Medium));
    assert_ne!(
        server_id(&bench, "shop"),
        before,
        "the server was made again"
    );

    // The same tier again: nothing to do, the server stays.
    let same = server_id(&bench, "shop");
    let (_, restarts, done) = bench
        .addons
        .update(
            "shop",
            KIND,
            &UpdateAddon {
                tier: Some("medium".into()),
                client_connections: None,
            },
        )
        .unwrap();
    settle(done).await;
    assert!(!restarts);
    assert_eq!(server_id(&bench, "shop"), same);

    // A create (a redeploy) with another tier changes it in place too.
    let (_, done) = bench
        .addons
        .create(&request("shop", Some("large")), "deploy")
        .await
        .unwrap();
    settle(done).await;
    let r = row(&bench, "shop");
    assert_eq!((tier(&r), applied_tier(&r)), (Tier::Large, Tier::Large));
    assert_eq!(r.status, AddonStatus::Active);

    let err = bench
        .addons
        .update(
            "shop",
            KIND,
            &UpdateAddon {
                tier: Some("huge".into()),
                client_connections: None,
            },
        )
        .unwrap_err();
    assert!(err.message.contains("small, medium, large"), "{err:?}");
}

#[tokio::test]
async fn a_recorded_change_the_agent_died_before_applying_converges_at_start() {
    let bench = Bench::new();
    let (_, done) = bench
        .addons
        .create(&request("shop", None), "cli")
        .await
        .unwrap();
    settle(done).await;
    let before = server_id(&bench, "shop");
    // As a kill -9 right after the wanted tier was written, status untouched (`active`).
    bench
        .store
        .set_addon_extra_key("shop", KIND, TIER, "medium".into(), &[])
        .unwrap();
    bench.addons.resume().unwrap();
    for _ in 0..1000 {
        let r = row(&bench, "shop");
        if r.status == AddonStatus::Active && applied_tier(&r) == Tier::Medium {
            assert_ne!(server_id(&bench, "shop"), before);
            assert_eq!(r.extra[APPLIED_TIER], "medium");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the tier change never converged: {:?}", row(&bench, "shop"));
}

#[tokio::test]
async fn client_connections_change_in_place_and_a_deploy_without_them_returns_to_the_tiers() {
    let bench = Bench::new();
    let mut asked = request("shop", None);
    asked.client_connections = Some(1000);
    let (addon, done) = bench.addons.create(&asked, "deploy").await.unwrap();
    assert_eq!(addon.client_connections, Some(1000));
    settle(done).await;
    let before = server_id(&bench, "shop");

    let (_, restarts, done) = bench
        .addons
        .update(
            "shop",
            KIND,
            &UpdateAddon {
                tier: None,
                client_connections: Some(250),
            },
        )
        .unwrap();
    settle(done).await;
    assert!(!restarts);
    let r = row(&bench, "shop");
    assert_eq!(r.status, AddonStatus::Active);
    assert_eq!(super::tiers::client_connections(&r), 250);
    assert_eq!(server_id(&bench, "shop"), before, "no restart for a limit");

    // A deploy that no longer names them: the tier's (small: 100).
    let (_, done) = bench
        .addons
        .create(&request("shop", None), "deploy")
        .await
        .unwrap();
    settle(done).await;
    assert_eq!(super::tiers::client_connections(&row(&bench, "shop")), 100);

    for bad in [0, 2001] {
        let err = bench
            .addons
            .update(
                "shop",
                KIND,
                &UpdateAddon {
                    tier: None,
                    client_connections: Some(bad),
                },
            )
            .unwrap_err();
        assert!(err.message.contains("give 1 to 2000"), "{err:?}");
    }
    let err = bench
        .addons
        .update("shop", KIND, &UpdateAddon::default())
        .unwrap_err();
    assert!(err.message.contains("nothing to change"), "{err:?}");
}
