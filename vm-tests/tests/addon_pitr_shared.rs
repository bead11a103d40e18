//! PostgreSQL continuous protection, the rest of it, with real servers: restoring one app of
//! the shared server while another app on it keeps writing (and with both logins rotated after
//! the point), a kill -9 of the agent during such a restore, and `--latest` after the server
//! was killed right after committing.
//!
//! Runs when MIREN_IMAGE_MIRROR is set (`postgres:17` from `scripts/images`).

use std::time::Duration;

use miren_vm_tests::addons::{
    disk_names, env, psql, psql_ok, sandbox_names, server_pid, text, wait_for,
};
use miren_vm_tests::pitr::{backups, count, restore, server_now, RemoveDir};
use miren_vm_tests::{image_mirror, random_hex, ChildGuard, TestAgent};

const PG: &str = "miren-postgresql";

/// An agent archiving to a target directory of its own (removed with the guard).
fn agent() -> Option<(TestAgent, RemoveDir)> {
    let mirror = image_mirror()?;
    let dir = format!("/tmp/mrtst-pitr2-{}", random_hex(6));
    let guard = RemoveDir(dir.clone());
    let agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .arg("--backup-target")
        .arg(&format!("nas={dir}"))
        .start();
    agent.ok(&["image", "pull", "postgres:17"]);
    Some((agent, guard))
}

fn wait_base_backup(agent: &TestAgent, app: &str) {
    wait_for("the first base backup", Duration::from_secs(120), || {
        backups(agent, app)["base_backups"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
    });
}

fn url(agent: &TestAgent, app: &str) -> String {
    env(agent, app)["DATABASE_URL"].clone()
}

/// Databases on the server whose name ends with `suffix` (pg_database is readable by all).
fn databases_ending(url: &str, suffix: &str) -> i64 {
    psql_ok(
        url,
        &format!("SELECT count(*) FROM pg_database WHERE datname LIKE '%{suffix}'"),
    )
    .parse()
    .expect("a count")
}

/// Shared server: one app restored to a noted time (before both its login and the server's
/// administrator were rotated) gets exactly its rows at that time, with its current login,
/// while the other app's rows written since stay; the old database is kept until
/// `--discard-previous`. A kill -9 of the agent during a second restore leaves both apps'
/// data as it was. A fork of a shared app is refused with a reason.
#[test]
fn restore_one_app_of_the_shared_server() {
    let Some((mut agent, _dir)) = agent() else {
        return;
    };
    let shared = format!("{PG}:shared");
    agent.ok(&["addon", "create", &shared, "-a", "shopa"]);
    agent.ok(&["addon", "create", &shared, "-a", "shopb"]);
    wait_base_backup(&agent, "shopa");
    let a = url(&agent, "shopa");
    let b = url(&agent, "shopb");
    psql_ok(
        &a,
        "CREATE TABLE orders (id int primary key); INSERT INTO orders SELECT generate_series(1, 100); \
         CREATE TABLE customers (name text); INSERT INTO customers VALUES ('ada'), ('grace')",
    );
    psql_ok(
        &b,
        "CREATE TABLE items (id int); INSERT INTO items SELECT generate_series(1, 10)",
    );
    std::thread::sleep(Duration::from_millis(1100));
    let noted = server_now(&a);
    std::thread::sleep(Duration::from_millis(1100));

    // After the point: both logins change, and both apps keep writing.
    agent.ok(&["addon", "rotate", PG, "-a", "shopa", "--json"]);
    agent.ok(&[
        "addon",
        "rotate",
        PG,
        "-a",
        "shopb",
        "--credential",
        "root",
        "--json",
    ]);
    let a = url(&agent, "shopa");
    psql_ok(
        &a,
        "INSERT INTO orders SELECT generate_series(101, 150); DROP TABLE customers",
    );
    psql_ok(&b, "INSERT INTO items SELECT generate_series(11, 20)");

    let restored = restore(&agent, "shopa", &["--to-time", &noted]);
    let previous = restored["previous_database"]
        .as_str()
        .unwrap_or_else(|| panic!("a kept database: {restored}"))
        .to_string();
    let a = url(&agent, "shopa");
    assert_eq!(count(&a, "orders"), 100, "exactly shopa's rows at {noted}");
    assert_eq!(
        psql_ok(
            &a,
            "SELECT string_agg(name, ',' ORDER BY name) FROM customers"
        ),
        "ada,grace",
        "the dropped table is back"
    );
    assert_eq!(count(&b, "items"), 20, "shopb's new rows stay");
    // The restored data is the app's: its current login writes and owns what it makes.
    psql_ok(
        &a,
        "INSERT INTO orders VALUES (1000); CREATE TABLE later (n int)",
    );
    assert_eq!(
        psql_ok(
            &a,
            "SELECT tableowner FROM pg_tables WHERE tablename = 'orders'"
        ),
        psql_ok(
            &a,
            "SELECT tableowner FROM pg_tables WHERE tablename = 'later'"
        ),
    );
    assert_eq!(databases_ending(&a, "_pitr_new"), 0);
    assert_eq!(
        psql_ok(
            &a,
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{previous}'")
        ),
        "1",
        "the old database is kept"
    );
    assert!(sandbox_names(&agent)
        .iter()
        .all(|n| !n.starts_with("addon-pgr")));
    let plain = agent.fails(&["addon", "restore", PG, "-a", "shopa", "--latest", "--yes"]);
    assert!(plain.contains("--discard-previous"), "{plain}");
    let refused = agent.fails(&["addon", "fork", PG, "-a", "shopa", "--to-app", "shopc"]);
    assert!(refused.contains("shared"), "{refused}");
    assert_eq!(
        backups(&agent, "shopa")["previous_database"],
        previous.as_str()
    );
    let discarded = restore(&agent, "shopa", &["--discard-previous"]);
    assert_eq!(discarded["previous_database"], previous.as_str());
    assert_eq!(databases_ending(&a, "_pitr_prev"), 0);

    // Killed while the temporary server replays: both apps' data stays as it is (a fast
    // restore may already be swapping; finished, it holds the same rows: --latest).
    psql_ok(&b, "INSERT INTO items VALUES (21)");
    {
        let mut client = ChildGuard(
            agent.spawn_cli(&["addon", "restore", PG, "-a", "shopa", "--latest", "--yes"]),
        );
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
        "the restore to be resumed",
        Duration::from_secs(180),
        || {
            let a_ok = psql(&url(&agent, "shopa"), "SELECT count(*) FROM orders");
            a_ok.status.success()
                && !sandbox_names(&agent)
                    .iter()
                    .any(|n| n.starts_with("addon-pgr"))
                // Removing the temporary disk is a resumed restore's last step.
                && !disk_names(&agent)
                    .iter()
                    .any(|n| n.starts_with("addon-pgr"))
        },
    );
    let a = url(&agent, "shopa");
    assert_eq!(count(&a, "orders"), 101, "shopa as it was");
    assert_eq!(count(&a, "later"), 0);
    assert_eq!(count(&b, "items"), 21, "shopb as it was");
    wait_for(
        "the new database to be dropped",
        Duration::from_secs(60),
        || databases_ending(&a, "_pitr_new") == 0,
    );

    agent.ok(&["addon", "destroy", PG, "-a", "shopa", "--yes"]);
    agent.ok(&["addon", "destroy", PG, "-a", "shopb", "--yes"]);
    drop(agent);
}

/// Dedicated server: `--latest` right after the server was killed (kill -9 of its postmaster,
/// the sandbox's process) keeps every committed transaction; a restore to before a rotation
/// works and the app's current login keeps working.
#[test]
fn latest_after_a_crash_and_restore_before_a_rotation() {
    let Some((agent, _dir)) = agent() else {
        return;
    };
    let app = "crashy";
    agent.ok(&["addon", "create", PG, "-a", app]);
    wait_base_backup(&agent, app);
    let u = url(&agent, app);
    psql_ok(&u, "CREATE TABLE t (n int); INSERT INTO t VALUES (1)");
    std::thread::sleep(Duration::from_millis(1100));
    let noted = server_now(&u);
    std::thread::sleep(Duration::from_millis(1100));
    agent.ok(&["addon", "rotate", PG, "-a", app, "--json"]);
    let u = url(&agent, app);
    for n in 2..=20 {
        psql_ok(&u, &format!("INSERT INTO t VALUES ({n})"));
    }
    let server = sandbox_names(&agent)
        .into_iter()
        .find(|n| n.starts_with("addon-pg-"))
        .expect("the server's sandbox");
    let pid = server_pid(&agent, &server);
    // The server's process (its postmaster), killed right after the commits.
    let out = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .expect("kill");
    assert!(out.status.success(), "{}", text(&out));

    let restored = restore(&agent, app, &["--latest"]);
    assert!(restored["previous_disk"].is_string(), "{restored}");
    let u = url(&agent, app);
    assert_eq!(count(&u, "t"), 20, "every committed row after the crash");
    restore(&agent, app, &["--discard-previous"]);

    // Before the rotation: the rows then, and the CURRENT login works on them.
    restore(&agent, app, &["--to-time", &noted]);
    let u = url(&agent, app);
    assert_eq!(count(&u, "t"), 1, "the rows at {noted}");
    psql_ok(&u, "INSERT INTO t VALUES (99)");
    restore(&agent, app, &["--discard-previous"]);
    agent.ok(&["addon", "destroy", PG, "-a", app, "--yes"]);
    drop(agent);
}
