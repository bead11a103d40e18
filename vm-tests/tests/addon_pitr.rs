//! PostgreSQL continuous protection, end to end with real servers: WAL archived to a backup
//! target (a local directory, and SeaweedFS over S3), `miren addon backups`, and
//! `miren addon restore` to a point in time and to the latest archived point, also with the
//! agent killed mid-restore and with the target unreachable while the server keeps writing.
//!
//! Runs when MIREN_IMAGE_MIRROR is set (`postgres:17` from `scripts/images`).

use std::thread::sleep;
use std::time::Duration;

use miren_vm_tests::addons::{disk_names, env, psql, psql_ok, sandbox_names, text, wait_for};
use miren_vm_tests::pitr::{backups, count, restore, server_now, RemoveDir};
use miren_vm_tests::s3::SeaweedFs;
use miren_vm_tests::{image_mirror, random_hex, ChildGuard, TestAgent};

const PG: &str = "miren-postgresql";

fn agent_with(args: &[&str]) -> Option<TestAgent> {
    let mirror = image_mirror()?;
    let mut builder = TestAgent::builder().arg("--image-mirror").arg(&mirror);
    for arg in args {
        builder = builder.arg(arg);
    }
    let agent = builder.start();
    agent.ok(&["image", "pull", "postgres:17"]);
    Some(agent)
}

/// Makes a small PostgreSQL for `app`; returns its DATABASE_URL once its first base backup is
/// in the target.
fn small_postgres(agent: &TestAgent, app: &str) -> String {
    agent.ok(&["addon", "create", PG, "-a", app]);
    wait_for("the first base backup", Duration::from_secs(120), || {
        backups(agent, app)["base_backups"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
    });
    env(agent, app)["DATABASE_URL"].clone()
}

/// Local-directory target: restore to a noted time brings back exactly the rows committed
/// before it and the table dropped after it; `--latest` keeps every committed transaction.
#[test]
fn restore_to_a_point_in_time_and_to_the_latest_from_a_local_directory() {
    let dir = format!("/tmp/mrtst-pitr-nas-{}", random_hex(6));
    let _remove = RemoveDir(dir.clone());
    let target = format!("nas={dir}");
    let Some(agent) = agent_with(&["--backup-target", &target]) else {
        return;
    };
    let app = "pitrlocal";
    let url = small_postgres(&agent, app);
    let shown = backups(&agent, app);
    assert_eq!(shown["target"], "nas", "{shown}");
    assert_eq!(shown["off_node"], false, "{shown}");
    let plain = agent.ok(&["addon", "backups", PG, "-a", app]);
    assert!(plain.contains("ON THIS NODE"), "{plain}");

    psql_ok(
        &url,
        "CREATE TABLE orders (id int primary key); INSERT INTO orders SELECT generate_series(1, 100); \
         CREATE TABLE customers (name text); INSERT INTO customers VALUES ('ada'), ('grace')",
    );
    sleep(Duration::from_millis(1100));
    let noted = server_now(&url);
    sleep(Duration::from_millis(1100));
    psql_ok(
        &url,
        "INSERT INTO orders SELECT generate_series(101, 150); DROP TABLE customers",
    );

    let restored = restore(&agent, app, &["--to-time", &noted]);
    let previous = restored["previous_disk"]
        .as_str()
        .expect("previous disk")
        .to_string();
    assert!(disk_names(&agent).contains(&previous), "{restored}");
    let url = env(&agent, app)["DATABASE_URL"].clone();
    assert_eq!(
        count(&url, "orders"),
        100,
        "exactly the rows committed before {noted}"
    );
    assert_eq!(
        psql_ok(
            &url,
            "SELECT string_agg(name, ',' ORDER BY name) FROM customers"
        ),
        "ada,grace",
        "the dropped table is back"
    );

    // A fork gives another app its own copy at the noted time, with its own login.
    let forked = agent.json(&[
        "addon",
        "fork",
        PG,
        "-a",
        app,
        "--to-app",
        "pitrfork",
        "--to-time",
        &noted,
        "--json",
    ]);
    assert_eq!(forked["app"], "pitrfork", "{forked}");
    let fork_url = env(&agent, "pitrfork")["DATABASE_URL"].clone();
    assert_ne!(fork_url, url);
    assert_eq!(
        count(&fork_url, "orders"),
        100,
        "the fork is the noted point"
    );
    psql_ok(&fork_url, "INSERT INTO orders VALUES (5000)");
    assert_eq!(count(&url, "orders"), 100, "the fork is a copy");
    agent.ok(&["addon", "destroy", PG, "-a", "pitrfork", "--yes"]);

    // A second restore first needs the kept disk gone.
    let refused = agent.fails(&["addon", "restore", PG, "-a", app, "--latest", "--yes"]);
    assert!(refused.contains("--discard-previous"), "{refused}");
    let discarded = restore(&agent, app, &["--discard-previous"]);
    assert_eq!(discarded["previous_disk"], previous.as_str());
    assert!(!disk_names(&agent).contains(&previous));

    // Committed after the restore, on the new timeline: --latest must keep it.
    psql_ok(&url, "INSERT INTO orders VALUES (1000)");
    restore(&agent, app, &["--latest"]);
    let url = env(&agent, app)["DATABASE_URL"].clone();
    assert_eq!(count(&url, "orders"), 101);
    assert_eq!(psql_ok(&url, "SELECT max(id) FROM orders"), "1000");
    let archives: Vec<String> = std::fs::read_dir(format!("{dir}/postgres"))
        .expect("the archive in the target directory")
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("app-pitrlocal-"))
        .collect();
    assert_eq!(
        archives.len(),
        1,
        "restores continue one archive: {archives:?}"
    );

    agent.ok(&["addon", "destroy", PG, "-a", app, "--yes"]);
    assert!(
        !disk_names(&agent).iter().any(|d| d.starts_with("addon-pg")),
        "{:?}",
        disk_names(&agent)
    );
    drop(agent);
}

/// S3 target: while it is down the server keeps running and its WAL waits in the spool (the
/// lag is shown); once it is back everything is shipped. A kill -9 of the agent during a
/// restore leaves the running database as it was. Base backups roll and old ones are pruned.
#[test]
fn s3_outage_kill_during_restore_and_pruning() {
    let mut s3 = SeaweedFs::start();
    let target = s3.target_arg("offsite", "node1");
    let Some(mut agent) = agent_with(&[
        "--backup-target",
        &target,
        "--pg-base-backup-interval",
        "20s",
        "--pg-base-backup-retention",
        "1s",
        "--pg-pitr-retention",
        "1s",
    ]) else {
        return;
    };
    let app = "pitrs3";
    let url = small_postgres(&agent, app);
    let shown = backups(&agent, app);
    assert_eq!(shown["off_node"], true, "{shown}");
    let server = shown["server"].as_str().expect("server id").to_string();
    let first_base = shown["base_backups"][0]["label"]
        .as_str()
        .unwrap()
        .to_string();

    // The target goes away; the server keeps committing and switching segments.
    s3.stop();
    psql_ok(&url, "CREATE TABLE events (n int)");
    for n in 0..3 {
        psql_ok(
            &url,
            &format!("INSERT INTO events VALUES ({n}); SELECT pg_switch_wal()"),
        );
    }
    wait_for("WAL to wait in the spool", Duration::from_secs(60), || {
        backups(&agent, app)["archive"]["pending_segments"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    });
    let during = backups(&agent, app);
    assert!(
        during["target_error"].is_string() || during["archive"]["last_error"].is_string(),
        "{during}"
    );
    assert_eq!(count(&url, "events"), 3, "the server keeps running");
    // The lag is in `miren addon status` too.
    let status = agent.json(&["addon", "status", PG, "-a", app, "--json"]);
    assert!(
        status["archive"]["pending_segments"].as_u64() >= Some(3),
        "{status}"
    );
    let plain = agent.ok(&["addon", "status", PG, "-a", app]);
    assert!(plain.contains("waiting"), "{plain}");

    s3.resume();
    wait_for("the spool to be shipped", Duration::from_secs(240), || {
        backups(&agent, app)["archive"]["pending_segments"] == 0
    });
    let shipped = s3.keys(&format!("node1/postgres/{server}/wal/"));
    assert!(shipped.len() >= 4, "{shipped:?}");

    // Killed mid-restore: the running database is untouched and the restore's disk goes.
    psql_ok(&url, "DROP TABLE events; CREATE TABLE after_kill (n int)");
    let out = agent.cli(&["addon", "list", "-a", app, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    // Killed while the restore's temporary server replays (phase `recovering`): seen as its
    // sandbox. A fast promote can still reach the swap first; then the restart finishes it.
    // Either way the temporary server goes and the database holds everything committed.
    {
        let mut client =
            ChildGuard(agent.spawn_cli(&["addon", "restore", PG, "-a", app, "--latest", "--yes"]));
        wait_for(
            "the restore's temporary server",
            Duration::from_secs(120),
            || {
                sandbox_names(&agent)
                    .iter()
                    .any(|n| n.starts_with("addon-pgr"))
            },
        );
        agent.kill9();
        let _ = client.0.wait();
    }
    agent.spawn();
    wait_for(
        "the addon to be active again",
        Duration::from_secs(120),
        || {
            miren_vm_tests::addons::addon_status(&agent, app, PG)
                .is_some_and(|a| a["status"] == "active")
                && !sandbox_names(&agent)
                    .iter()
                    .any(|n| n.starts_with("addon-pgr"))
        },
    );
    let url = env(&agent, app)["DATABASE_URL"].clone();
    wait_for("the server to answer", Duration::from_secs(60), || {
        psql(&url, "SELECT 1").status.success()
    });
    let events = psql(&url, "SELECT count(*) FROM events");
    assert!(
        !events.status.success(),
        "events stays dropped: {}",
        text(&events)
    );
    psql_ok(&url, "SELECT count(*) FROM after_kill");

    // Base backups roll every 20 s; with 1 s retentions the first one and its WAL go.
    wait_for(
        "the first base backup to be pruned",
        Duration::from_secs(180),
        || {
            s3.keys(&format!("node1/postgres/{server}/base/{first_base}/"))
                .is_empty()
        },
    );
    let shown = backups(&agent, app);
    assert!(
        !shown["base_backups"].as_array().unwrap().is_empty(),
        "{shown}"
    );

    agent.ok(&["addon", "destroy", PG, "-a", app, "--yes"]);
    drop(agent);
    s3.stop();
}
