//! `miren addon rotate` for PostgreSQL, end to end: an app's service keeps opening connections
//! with the variables it was started with (a `psql` every 20 ms, failures written to its local
//! storage) while its credentials rotate, `small` and `shared`, also with the agent killed at
//! points of a rotation; no connection of the app may fail, the previous login may not log in
//! afterwards, and the data stays the app's.
//!
//! Runs when MIREN_IMAGE_MIRROR is set (`postgres:17` from `scripts/images`).

use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    agent_with_mirror, deploy, env, exec_sh, psql, psql_ok, text, wait_for, write_app,
};
use miren_vm_tests::TestAgent;
use serde_json::Value;

const PG: &str = "miren-postgresql";

/// An app whose `web` service connects with its `DATABASE_URL` every 20 ms and writes each
/// success to /log/ok and each failure (with psql's message) to /log/fail, on the app's local
/// storage, which outlives the service's restarts.
fn client_app(name: &str, variant: &str) -> String {
    format!(
        r#"name = "{name}"

[services.web]
image = "postgres:17"
command = '''
trap 'exit 0' TERM
while true; do
  if out=$(psql "$DATABASE_URL" -tAc 'select 1' 2>&1); then echo ok >> /log/ok
  else echo "$(date +%T.%N) $PGUSER: $out" >> /log/fail; fi
  sleep 0.02
done'''

[[services.web.disks]]
name = "{name}-log"
mount_path = "/log"
provider = "local"

[addons.{PG}]
variant = "{variant}"
"#
    )
}

/// (successful connections, failure lines) the app's client recorded so far.
fn client_record(agent: &TestAgent, app: &str) -> (usize, String) {
    let out = exec_sh(
        agent,
        &format!("{app}-web"),
        "wc -l < /log/ok 2>/dev/null || echo 0; echo ---; cat /log/fail 2>/dev/null; true",
    );
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (count, fails) = all.split_once("---").unwrap_or(("0", ""));
    (count.trim().parse().unwrap_or(0), fails.trim().to_string())
}

/// Waits until the app's client has made `more` connections beyond `after`.
fn client_makes_progress(agent: &TestAgent, app: &str, after: usize, more: usize) -> usize {
    let mut now = 0;
    wait_for(
        &format!("{app}'s client to connect {more} more times"),
        Duration::from_secs(60),
        || {
            now = client_record(agent, app).0;
            now >= after + more
        },
    );
    now
}

fn rotate(agent: &TestAgent, app: &str) -> Value {
    agent.json(&["addon", "rotate", PG, "-a", app, "--json"])
}

/// The app's `DATABASE_URL` with `user` in place of its user (and no password change).
fn url_as(url: &str, from: &str, to: &str) -> String {
    url.replacen(&format!("//{from}:"), &format!("//{to}:"), 1)
}

/// Deploys `app` with a `variant` PostgreSQL and its client; returns its DATABASE_URL.
fn deploy_client(agent: &TestAgent, app: &str, variant: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_app(dir.path(), &client_app(app, variant));
    deploy(agent, dir.path());
    client_makes_progress(agent, app, 0, 5);
    env(agent, app)["DATABASE_URL"].clone()
}

/// Rotates twice and back to the first rotation login, checking each time that the app's
/// client never failed, the new login works and owns nothing new, and the one before it
/// cannot log in.
fn rotations_never_fail_a_connection(agent: &TestAgent, app: &str, variant: &str) {
    let url0 = deploy_client(agent, app, variant);
    let owner = env(agent, app)["PGUSER"].clone();
    psql_ok(
        &url0,
        "create table kept (n int); insert into kept values (1)",
    );

    let mut previous = (owner.clone(), url0.clone());
    for (round, expected) in [
        format!("{owner}_r1"),
        format!("{owner}_r2"),
        format!("{owner}_r1"),
    ]
    .into_iter()
    .enumerate()
    {
        let rotated = rotate(agent, app);
        assert_eq!(
            rotated["user"],
            expected.as_str(),
            "round {round}: {rotated}"
        );
        assert_eq!(rotated["previous_user"], previous.0.as_str());
        assert_eq!(rotated["resumed"], false);

        let vars = env(agent, app);
        assert_eq!(vars["PGUSER"], expected);
        let url = vars["DATABASE_URL"].clone();
        assert_ne!(url, previous.1, "the password changed too");
        // The new login acts as the owner: the data stays the owner's.
        assert_eq!(psql_ok(&url, "select current_user"), owner);
        psql_ok(&url, &format!("insert into kept values ({})", round + 2));
        psql_ok(&url, &format!("create table t{round} (n int)"));
        assert_eq!(
            psql_ok(
                &url,
                &format!("select tableowner from pg_tables where tablename = 't{round}'")
            ),
            owner
        );
        // The previous login is refused, with its own password too.
        let refused = psql(&previous.1, "select 1");
        assert!(!refused.status.success(), "the previous login still works");
        assert!(
            text(&refused).contains("not permitted to log in")
                || text(&refused).contains("authentication failed"),
            "{}",
            text(&refused)
        );
        // The restarted service connects with the new login, and never failed.
        client_makes_progress(agent, app, 0, 5);
        let (_, fails) = client_record(agent, app);
        assert!(
            fails.is_empty(),
            "{app}'s client failed to connect:\n{fails}"
        );
        previous = (expected, url);
    }
    assert_eq!(psql_ok(&previous.1, "select count(*) from kept"), "4");
    // The login a password was never set for cannot log in with the other's password either.
    let other = url_as(&previous.1, &previous.0, &format!("{owner}_r2"));
    assert!(!psql(&other, "select 1").status.success());
}

#[test]
fn small_and_shared_rotate_without_a_failed_connection() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17"]) else {
        eprintln!("skipped: MIREN_IMAGE_MIRROR is not set");
        return;
    };
    std::thread::scope(|s| {
        s.spawn(|| rotations_never_fail_a_connection(&agent, "rot-small", "small"));
        s.spawn(|| rotations_never_fail_a_connection(&agent, "rot-shared", "shared"));
    });
    // A second rotation while one runs is refused; an addon without credentials cannot.
    let busy = {
        let first = agent.spawn_cli(&["addon", "rotate", PG, "-a", "rot-small", "--json"]);
        let mut first = miren_vm_tests::ChildGuard(first);
        let mut refused = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while first.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
            let out = agent.cli(&["addon", "rotate", PG, "-a", "rot-small"]);
            if !out.status.success() {
                refused = Some(text(&out));
                break;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = first.0.wait();
        refused
    };
    if let Some(message) = busy {
        assert!(message.contains("is running"), "{message}");
    }
    let (_, fails) = client_record(&agent, "rot-small");
    assert!(fails.is_empty(), "{fails}");

    // The shared server's administrator rotates too, also when cut short by kill -9; the
    // agent keeps managing tenants with whichever it holds, and the image's first password
    // no longer logs in over the network.
    let first_admin_password = agent
        .ok(&[
            "sandbox",
            "exec",
            "addon-pg",
            "--",
            "printenv",
            "POSTGRES_PASSWORD",
        ])
        .trim()
        .to_string();
    let small_root = agent.fails(&[
        "addon",
        "rotate",
        PG,
        "-a",
        "rot-small",
        "--credential",
        "root",
    ]);
    assert!(
        small_root.contains("its own PostgreSQL server"),
        "{small_root}"
    );
    let rotated = agent.json(&[
        "addon",
        "rotate",
        PG,
        "-a",
        "rot-shared",
        "--credential",
        "root",
        "--json",
    ]);
    assert_eq!(rotated["user"], "miren_admin_r1", "{rotated}");
    assert_eq!(rotated["previous_user"], "postgres");
    let shared_ip = env(&agent, "rot-shared")["PGHOST"].clone();
    let old_admin = format!("postgres://postgres:{first_admin_password}@{shared_ip}:5432/postgres");
    assert!(
        !psql(&old_admin, "select 1").status.success(),
        "the first administrator password still works"
    );
    for delay_ms in [30u64, 250] {
        miren_vm_tests::addons::kill_during(
            &mut agent,
            &[
                "addon",
                "rotate",
                PG,
                "-a",
                "rot-shared",
                "--credential",
                "root",
            ],
            Duration::from_millis(delay_ms),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = agent.cli(&[
                "addon",
                "rotate",
                PG,
                "-a",
                "rot-shared",
                "--credential",
                "root",
                "--json",
            ]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "root rotation after kill -9: {}",
                text(&out)
            );
            sleep(Duration::from_millis(200));
        }
    }
    // Another member keeps the shared server up, so its catalog can be read afterwards; its
    // tenant is made with the rotated administrator.
    agent.ok(&[
        "addon",
        "create",
        "miren-postgresql:shared",
        "-a",
        "rot-keeper",
    ]);
    let admins = agent
        .ok(&[
            "sandbox", "exec", "addon-pg", "--", "psql", "-U", "postgres", "-tAc",
            "select string_agg(rolname, ',' order by rolname) from pg_roles where rolcanlogin and rolname like 'miren_admin%'",
        ])
        .trim()
        .to_string();
    assert!(
        admins == "miren_admin_r1" || admins == "miren_admin_r2",
        "{admins}"
    );

    // Destroying the shared addon drops the owner and both rotation logins.
    let owner = env(&agent, "rot-shared")["PGUSER"]
        .trim_end_matches("_r1")
        .trim_end_matches("_r2")
        .to_string();
    // Another member keeps the shared server up, so its catalog can be read afterwards.
    agent.ok(&[
        "addon",
        "create",
        "miren-postgresql:shared",
        "-a",
        "rot-keeper",
    ]);
    agent.ok(&["addon", "destroy", PG, "-a", "rot-shared", "--yes"]);
    let roles = agent
        .ok(&[
            "sandbox",
            "exec",
            "addon-pg",
            "--",
            "psql",
            "-U",
            "postgres",
            "-tAc",
            &format!("select rolname from pg_roles where rolname like '{owner}%'"),
        ])
        .trim()
        .to_string();
    assert_eq!(roles, "", "roles of the destroyed tenant are left");
    agent.ok(&["addon", "destroy", PG, "-a", "rot-keeper", "--yes"]);
    for app in ["rot-small", "rot-shared"] {
        agent.ok(&["app", "delete", app]);
    }
    agent.ok(&["addon", "destroy", PG, "-a", "rot-small", "--yes"]);
}

#[test]
fn a_rotation_cut_short_by_kill_9_is_finished_at_start() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17"]) else {
        eprintln!("skipped: MIREN_IMAGE_MIRROR is not set");
        return;
    };
    let url0 = deploy_client(&agent, "rot-kill", "small");
    let owner = env(&agent, "rot-kill")["PGUSER"].clone();
    psql_ok(
        &url0,
        "create table kept (n int); insert into kept values (1)",
    );
    let logins = [owner.clone(), format!("{owner}_r1"), format!("{owner}_r2")];
    for (i, delay_ms) in [0u64, 40, 120, 300, 700, 1500].into_iter().enumerate() {
        let context = format!("kill -9 {delay_ms} ms into rotation {i}");
        miren_vm_tests::addons::kill_during(
            &mut agent,
            &["addon", "rotate", PG, "-a", "rot-kill"],
            Duration::from_millis(delay_ms),
        );
        // The agent finishes what was begun by itself; `addon rotate` then starts (or
        // finishes) another, so the login moves on either way.
        let deadline = Instant::now() + Duration::from_secs(120);
        let rotated = loop {
            let out = agent.cli(&["addon", "rotate", PG, "-a", "rot-kill", "--json"]);
            if out.status.success() {
                break serde_json::from_slice::<Value>(&out.stdout).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{context}: rotate kept failing: {}\n{}",
                text(&out),
                agent.log_text()
            );
            sleep(Duration::from_millis(200));
        };
        let vars = env(&agent, "rot-kill");
        assert_eq!(
            vars["PGUSER"],
            rotated["user"].as_str().unwrap(),
            "{context}"
        );
        let url = vars["DATABASE_URL"].clone();
        // Exactly the current login can log in.
        let can_login = psql_ok(
            &url,
            &format!(
                "select string_agg(rolname, ',' order by rolname) from pg_roles where rolcanlogin and rolname in ('{}')",
                logins.join("','")
            ),
        );
        assert_eq!(can_login, vars["PGUSER"], "{context}");
        assert_eq!(psql_ok(&url, "select count(*) from kept"), "1", "{context}");
        client_makes_progress(&agent, "rot-kill", 0, 3);
        let (_, fails) = client_record(&agent, "rot-kill");
        assert!(fails.is_empty(), "{context}: the client failed:\n{fails}");
    }
    agent.ok(&["app", "delete", "rot-kill"]);
    agent.ok(&["addon", "destroy", PG, "-a", "rot-kill", "--yes"]);
    agent.assert_converged();
}

const MY: &str = "miren-mysql";

/// The MySQL twin of [`client_app`]: a `mariadb` client connecting every 20 ms with the app's
/// `MYSQL_*` variables, on MariaDB 11 (the catalogue's `mariadb-11`) shared.
fn mysql_client_app(name: &str) -> String {
    format!(
        r#"name = "{name}"

[services.web]
image = "mariadb:11"
command = '''
trap 'exit 0' TERM
while true; do
  if out=$(MYSQL_PWD="$MYSQL_PASSWORD" mariadb --connect-timeout=3 -N -B -h "$MYSQL_HOST" -u "$MYSQL_USER" "$MYSQL_DATABASE" -e 'select 1' 2>&1); then echo ok >> /log/ok
  else echo "$(date +%T.%N) $MYSQL_USER: $out" >> /log/fail; fi
  sleep 0.02
done'''

[[services.web.disks]]
name = "{name}-log"
mount_path = "/log"
provider = "local"

[addons.{MY}]
variant = "shared"
version = "mariadb-11"
"#
    )
}

/// `sql` with the `mariadb` client in the app's service, as `user` with `password`.
fn mariadb_as(agent: &TestAgent, app: &str, user: &str, password: &str, sql: &str) -> Output {
    exec_sh(
        agent,
        &format!("{app}-web"),
        &format!(
            "MYSQL_PWD='{password}' mariadb --connect-timeout=3 -N -B -h \"$MYSQL_HOST\" -u '{user}' \"$MYSQL_DATABASE\" -e '{sql}'"
        ),
    )
}

#[test]
fn shared_mysql_rotates_without_a_failed_connection() {
    let Some(agent) = agent_with_mirror(&["mariadb:11"]) else {
        eprintln!("skipped: MIREN_IMAGE_MIRROR is not set");
        return;
    };
    let app = "rot-my";
    let dir = tempfile::tempdir().unwrap();
    write_app(dir.path(), &mysql_client_app(app));
    deploy(&agent, dir.path());
    client_makes_progress(&agent, app, 0, 5);
    let first = env(&agent, app);
    let base = first["MYSQL_USER"].clone();
    let ok = |user: &str, password: &str, sql: &str| {
        let out = mariadb_as(&agent, app, user, password, sql);
        assert!(out.status.success(), "{sql} as {user}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    ok(
        &base,
        &first["MYSQL_PASSWORD"],
        "create table kept (n int); insert into kept values (1)",
    );
    let mut previous = (base.clone(), first["MYSQL_PASSWORD"].clone());
    for (round, expected) in [format!("{base}_r1"), format!("{base}_r2")]
        .into_iter()
        .enumerate()
    {
        let rotated = agent.json(&["addon", "rotate", MY, "-a", app, "--json"]);
        assert_eq!(rotated["user"], expected.as_str(), "{rotated}");
        let vars = env(&agent, app);
        assert_eq!(vars["MYSQL_USER"], expected);
        assert!(vars["DATABASE_URL"].contains(&format!("//{expected}:")));
        ok(
            &expected,
            &vars["MYSQL_PASSWORD"],
            &format!("insert into kept values ({})", round + 2),
        );
        let refused = mariadb_as(&agent, app, &previous.0, &previous.1, "select 1");
        assert!(!refused.status.success(), "the previous user still logs in");
        client_makes_progress(&agent, app, 0, 5);
        let (_, fails) = client_record(&agent, app);
        assert!(
            fails.is_empty(),
            "{app}'s client failed to connect:\n{fails}"
        );
        previous = (expected, vars["MYSQL_PASSWORD"].clone());
    }
    assert_eq!(
        ok(&previous.0, &previous.1, "select count(*) from kept"),
        "3"
    );
    // The shared server's root rotates: `root@'%'` is locked, a new administrator makes the
    // next app's tenant.
    let root_password = agent
        .ok(&[
            "sandbox",
            "exec",
            "addon-mysql",
            "--",
            "printenv",
            "MYSQL_ROOT_PASSWORD",
        ])
        .trim()
        .to_string();
    assert!(mariadb_as(&agent, app, "root", &root_password, "select 1")
        .status
        .success());
    let rotated = agent.json(&[
        "addon",
        "rotate",
        MY,
        "-a",
        app,
        "--credential",
        "root",
        "--json",
    ]);
    assert_eq!(rotated["user"], "miren_admin_r1", "{rotated}");
    assert_eq!(rotated["previous_user"], "root");
    let refused = mariadb_as(&agent, app, "root", &root_password, "select 1");
    assert!(
        !refused.status.success(),
        "root still logs in over the network"
    );
    agent.ok(&[
        "addon",
        "create",
        "miren-mysql:shared",
        "-a",
        "rot-my-2",
        "--version",
        "mariadb-11",
    ]);
    agent.ok(&["addon", "destroy", MY, "-a", "rot-my-2", "--yes"]);
    agent.ok(&["app", "delete", app]);
    agent.ok(&["addon", "destroy", MY, "-a", app, "--yes"]);
    agent.assert_converged();
}
