//! `miren-mysql` end to end, run on MariaDB (catalogue version `mariadb-11`, the image
//! `mariadb:11` that `scripts/images` builds from Debian's packages): `small` and `shared` on
//! real sandboxes, disks and endpoints, reached with the real `mariadb` client inside the
//! app's service through the variables the agent injects; backups; kill -9 of the agent.
//!
//! The tests run when MIREN_IMAGE_MIRROR is set (`export "$(scripts/images | tail -n 1)"`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    active_or_gone, addon_status, agent_with_mirror, assert_nothing_left,
    assert_running_with_their_endpoints, deploy, disk_names, env, errored, exec_sh, idle_app,
    kill_during, sandbox_names, shared_server_gone, stdout, text, wait_for,
    wait_sandboxes_and_disks, write_app,
};
use miren_vm_tests::{ChildGuard, TestAgent};

const MY: &str = "miren-mysql";
const VERSION: &str = "mariadb-11";
const IMAGE: &str = "mariadb:11";
const SHARED: &str = "addon-mysql";

/// An app whose `web` service idles in a mariadb:11 container (for its `mariadb` client),
/// with the MySQL addon's section if `variant` is given.
fn write_client_app(dir: &Path, name: &str, variant: Option<&str>) {
    let settings = variant.map(|v| format!("variant = \"{v}\"\nversion = \"{VERSION}\"\n"));
    let addon = settings.as_deref().map(|s| (MY, s));
    write_app(dir, &idle_app(name, IMAGE, "sleep infinity", addon));
}

fn deploy_client_app(agent: &TestAgent, name: &str, variant: Option<&str>) {
    let dir = agent.root.join(name);
    write_client_app(&dir, name, variant);
    deploy(agent, &dir);
}

/// `sql` (no single quotes) with the `mariadb` client inside `sandbox`, logged in with the
/// app's `MYSQL_*` variables.
fn sql_vars(agent: &TestAgent, sandbox: &str, sql: &str) -> Output {
    exec_sh(
        agent,
        sandbox,
        &format!(
            "MYSQL_PWD=\"$MYSQL_PASSWORD\" mariadb --connect-timeout=3 -N -B -h \"$MYSQL_HOST\" \
             -P \"$MYSQL_PORT\" -u \"$MYSQL_USER\" \"$MYSQL_DATABASE\" -e '{sql}'"
        ),
    )
}

/// The same, logged in with the parts of the app's `DATABASE_URL`.
fn sql_url(agent: &TestAgent, sandbox: &str, sql: &str) -> Output {
    exec_sh(
        agent,
        sandbox,
        &format!(
            "u=${{DATABASE_URL#mysql://}}; creds=${{u%%@*}}; hp=${{u#*@}}; hp=${{hp%%/*}}; \
             MYSQL_PWD=${{creds#*:}} mariadb --connect-timeout=3 -N -B -h ${{hp%:*}} \
             -P ${{hp##*:}} -u ${{creds%%:*}} ${{u##*/}} -e '{sql}'"
        ),
    )
}

fn sql_ok(agent: &TestAgent, sandbox: &str, sql: &str) -> String {
    let out = sql_vars(agent, sandbox, sql);
    assert!(out.status.success(), "`{sql}` in {sandbox}: {}", text(&out));
    stdout(&out)
}

/// `sql` as root inside the shared server's sandbox (its root password is in its env).
fn root_sql(agent: &TestAgent, sql: &str) -> String {
    let out = exec_sh(
        agent,
        SHARED,
        &format!("MYSQL_PWD=\"$MYSQL_ROOT_PASSWORD\" mariadb -uroot -N -B -e '{sql}'"),
    );
    assert!(out.status.success(), "root `{sql}`: {}", text(&out));
    stdout(&out)
}

/// Tenant users and databases on the shared server (what the server brings excluded).
fn tenants(agent: &TestAgent) -> (BTreeSet<String>, BTreeSet<String>) {
    let set = |s: String| s.lines().map(|l| l.trim().to_string()).collect();
    let users = root_sql(
        agent,
        "select user from mysql.user where user not in (\"root\", \"mariadb.sys\", \"\")",
    );
    let dbs = root_sql(
        agent,
        "select schema_name from information_schema.schemata where schema_name not in \
         (\"mysql\", \"information_schema\", \"performance_schema\", \"sys\")",
    );
    (set(users), set(dbs))
}

/// Runs `sql` with the app's variables inside `sandbox` until its output contains
/// `expected` (the server may be starting, the service restarting), for up to two minutes.
fn eventually(agent: &TestAgent, sandbox: &str, sql: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = sql_vars(agent, sandbox, sql);
        if out.status.success() && stdout(&out) == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{sql}` in {sandbox} never gave {expected}: {}\n{}",
            text(&out),
            agent.log_text()
        );
        sleep(Duration::from_millis(200));
    }
}

/// A refusal by the server or the network, never success.
fn assert_refused(out: &Output, what: &str, because: &[&str]) {
    assert!(!out.status.success(), "{what} worked: {}", text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        because.iter().any(|b| err.contains(b)),
        "{what} failed for another reason: {err}"
    );
}

#[test]
fn small_through_app_toml_and_the_cli_isolated_backed_up_and_removed() {
    let Some(mut agent) = agent_with_mirror(&[IMAGE]) else {
        return;
    };
    deploy_client_app(&agent, "shop", Some("small"));
    let addon = addon_status(&agent, "shop", MY).expect("the addon");
    assert_eq!(addon["status"], "active", "{addon}");
    assert_eq!(addon["variant"], "small");
    assert_eq!(addon["version"], VERSION);
    assert_eq!(addon["image"], IMAGE);
    assert!(sandbox_names(&agent).contains("addon-mysql-shop"));
    assert!(disk_names(&agent).contains("addon-mysql-shop"));

    // The variables: secrets masked unless revealed, the URL made of the other five.
    let masked = agent.json(&["env", "list", "-a", "shop", "--json"]);
    assert_eq!(masked["DATABASE_URL"], "********", "{masked}");
    assert_eq!(masked["MYSQL_PASSWORD"], "********", "{masked}");
    let vars = env(&agent, "shop");
    assert_eq!(vars["MYSQL_PORT"], "3306");
    assert_eq!(vars["MYSQL_USER"], "shop");
    assert_eq!(vars["MYSQL_DATABASE"], "shop");
    assert_eq!(
        vars["DATABASE_URL"],
        format!(
            "mysql://shop:{}@{}:3306/shop",
            vars["MYSQL_PASSWORD"], vars["MYSQL_HOST"]
        )
    );

    // The app's service writes through DATABASE_URL and reads through MYSQL_*.
    let out = sql_url(
        &agent,
        "shop-web",
        "create table visits (n int); insert into visits values (42)",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sql_ok(&agent, "shop-web", "select n from visits"), "42");
    assert_eq!(
        sql_ok(&agent, "shop-web", "select current_user()"),
        "shop@%"
    );
    assert!(sql_ok(&agent, "shop-web", "select version()").contains("MariaDB"));
    let wrong = exec_sh(
        &agent,
        "shop-web",
        "MYSQL_PWD=not-the-password mariadb --connect-timeout=3 -h \"$MYSQL_HOST\" -u \"$MYSQL_USER\" -e 'select 1'",
    );
    assert_refused(&wrong, "a wrong password", &["Access denied"]);
    let root = exec_sh(
        &agent,
        "shop-web",
        "MYSQL_PWD=\"$MYSQL_PASSWORD\" mariadb --connect-timeout=3 -h \"$MYSQL_HOST\" -u root -e 'select 1'",
    );
    assert_refused(&root, "root over the network", &["Access denied"]);

    // Made with the CLI: the app's service (deployed without the section) gets it too.
    let out = agent.ok(&[
        "addon",
        "create",
        &format!("{MY}:small"),
        "-a",
        "cli",
        "--version",
        VERSION,
    ]);
    assert!(out.contains("active"), "{out}");
    deploy_client_app(&agent, "cli", None);
    assert_eq!(
        sql_ok(
            &agent,
            "cli-web",
            "select count(*) from information_schema.schemata where schema_name = database()"
        ),
        "1"
    );
    // Another app's sandbox cannot reach a small server at all, credentials or not.
    let cli = env(&agent, "cli");
    let across = exec_sh(
        &agent,
        "shop-web",
        &format!(
            "MYSQL_PWD={} mariadb --connect-timeout=2 -h {} -u {} -e 'select 1'",
            cli["MYSQL_PASSWORD"], cli["MYSQL_HOST"], cli["MYSQL_USER"]
        ),
    );
    assert_refused(&across, "shop reaching cli's server", &["Can't connect"]);

    // A backup while the server runs, a row after it, then the backup restored over the
    // disk: the server comes back on it, with the row of the backup and not the later one.
    let backup = agent.root.join("shop.miren.zst");
    agent.ok(&[
        "disk",
        "backup",
        "-n",
        "addon-mysql-shop",
        "-o",
        backup.to_str().unwrap(),
    ]);
    sql_ok(&agent, "shop-web", "insert into visits values (43)");
    assert_eq!(
        sql_ok(
            &agent,
            "shop-web",
            "select group_concat(n order by n) from visits"
        ),
        "42,43"
    );
    agent.ok(&["sandbox", "delete", "addon-mysql-shop"]);
    agent.ok(&[
        "disk",
        "restore",
        "-s",
        backup.to_str().unwrap(),
        "-n",
        "addon-mysql-shop",
        "--force",
    ]);
    // The next agent finds the server gone and starts it again on the restored disk.
    agent.restart();
    eventually(
        &agent,
        "shop-web",
        "select group_concat(n order by n) from visits",
        "42",
    );
    assert_eq!(
        addon_status(&agent, "shop", MY).unwrap()["status"],
        "active"
    );

    // A redeploy without the section deprovisions: server, disk and variables go; the
    // CLI-made addon of the other app stays.
    let shop_host = env(&agent, "shop")["MYSQL_HOST"].clone();
    deploy_client_app(&agent, "shop", None);
    assert!(addon_status(&agent, "shop", MY).is_none());
    assert!(!sandbox_names(&agent).contains("addon-mysql-shop"));
    assert!(!disk_names(&agent).contains("addon-mysql-shop"));
    let out = exec_sh(&agent, "shop-web", "echo \"url=${DATABASE_URL:-none}\"");
    assert_eq!(stdout(&out), "url=none", "{}", text(&out));
    let gone = exec_sh(
        &agent,
        "shop-web",
        &format!("mariadb --connect-timeout=2 -h {shop_host} -u shop -e 'select 1'"),
    );
    assert!(!gone.status.success(), "the old server answers");
    assert_eq!(addon_status(&agent, "cli", MY).unwrap()["status"], "active");

    // Destroy removes the data: the disk is gone, and a new addon starts empty.
    sql_ok(&agent, "cli-web", "create table kept (n int)");
    let out = agent.ok(&["addon", "destroy", MY, "-a", "cli", "--yes"]);
    assert!(out.contains("deleted"), "{out}");
    assert!(!disk_names(&agent).contains("addon-mysql-cli"));
    assert!(!sandbox_names(&agent).contains("addon-mysql-cli"));
    agent.ok(&["addon", "create", MY, "-a", "cli", "--version", VERSION]);
    eventually(
        &agent,
        "cli-web",
        "select count(*) from information_schema.tables where table_schema = database()",
        "0",
    );

    agent.ok(&["addon", "destroy", MY, "-a", "cli", "--yes"]);
    agent.ok(&["app", "delete", "shop"]);
    agent.ok(&["app", "delete", "cli"]);
    assert_nothing_left(&agent);
}

#[test]
fn shared_server_keeps_apps_apart_and_refuses_other_versions() {
    let Some(agent) = agent_with_mirror(&[IMAGE]) else {
        return;
    };
    deploy_client_app(&agent, "web-a", Some("shared"));
    let a = env(&agent, "web-a");
    assert_eq!(
        addon_status(&agent, "web-a", MY).unwrap()["variant"],
        "shared"
    );
    // A clean app name that `web-a`'s database name matches if its `_` were a wildcard.
    let twin = a["MYSQL_DATABASE"].replace('_', "z");
    assert!(a["MYSQL_USER"].starts_with("web_a_"), "{a:?}");
    deploy_client_app(&agent, &twin, Some("shared"));
    let b = env(&agent, &twin);
    assert_eq!(a["MYSQL_HOST"], b["MYSQL_HOST"], "not the same server");
    assert_eq!(b["MYSQL_USER"], twin);
    let (a_web, b_web) = ("web-a-web".to_string(), format!("{twin}-web"));

    sql_ok(
        &agent,
        &a_web,
        "create table secrets (s text); insert into secrets values (\"a-only\")",
    );
    sql_ok(
        &agent,
        &b_web,
        "create table notes (s text); insert into notes values (\"b-only\")",
    );
    // Each user sees and opens its own database only.
    for (web, own, other, table) in [(&a_web, &a, &b, "notes"), (&b_web, &b, &a, "secrets")] {
        let seen: BTreeSet<String> = sql_ok(&agent, web, "show databases")
            .lines()
            .map(String::from)
            .collect();
        let mine: BTreeSet<String> =
            [own["MYSQL_DATABASE"].clone(), "information_schema".into()].into();
        assert_eq!(seen, mine, "{web} sees other databases");
        let db = &other["MYSQL_DATABASE"];
        for sql in [format!("use {db}"), format!("select * from {db}.{table}")] {
            assert_refused(
                &sql_vars(&agent, web, &sql),
                &format!("{sql} from {web}"),
                &["Access denied", "command denied"],
            );
        }
        let login = exec_sh(
            &agent,
            web,
            &format!(
                "MYSQL_PWD=\"$MYSQL_PASSWORD\" mariadb --connect-timeout=3 -h \"$MYSQL_HOST\" -u \"$MYSQL_USER\" {db} -e 'select 1'"
            ),
        );
        assert_refused(
            &login,
            "logging in to the other database",
            &["Access denied"],
        );
    }
    let (users, dbs) = tenants(&agent);
    let want: BTreeSet<String> = [a["MYSQL_USER"].clone(), twin.clone()].into();
    assert_eq!((&users, &dbs), (&want, &want));

    // Another version on the running server is refused, naming the one it runs.
    for version in ["docker.io/library/mariadb:11", "9"] {
        let err = agent.fails(&[
            "addon",
            "create",
            &format!("{MY}:shared"),
            "-a",
            "carol",
            "--version",
            version,
        ]);
        assert!(err.contains(IMAGE), "{err}");
        assert!(addon_status(&agent, "carol", MY).is_none());
    }

    // The other MariaDB of the catalogue, as a small server of its own beside the shared one.
    let old = agent.json(&[
        "addon",
        "create",
        MY,
        "-a",
        "old",
        "--version",
        "mariadb-10.11",
        "--json",
    ]);
    assert_eq!(old["status"], "active", "{old}");
    assert_eq!(old["image"], "mariadb:10.11");
    let version = agent.ok(&[
        "sandbox",
        "exec",
        "addon-mysql-old",
        "--",
        "mariadbd",
        "--version",
    ]);
    assert!(version.contains("10.11."), "{version}");
    agent.ok(&["addon", "destroy", MY, "-a", "old", "--yes"]);

    // Destroy ends the tenant's sessions and drops its database and user; the other app is
    // untouched.
    let mut session = ChildGuard(
        agent
            .command(&[
                "sandbox",
                "exec",
                &a_web,
                "--",
                "sh",
                "-c",
                "MYSQL_PWD=\"$MYSQL_PASSWORD\" mariadb -h \"$MYSQL_HOST\" -u \"$MYSQL_USER\" \"$MYSQL_DATABASE\" -e 'select sleep(600)'",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the session to start", Duration::from_secs(30), || {
        root_sql(
            &agent,
            "select count(*) from information_schema.processlist where info like \"select sleep%\"",
        ) == "1"
    });
    agent.ok(&["addon", "destroy", MY, "-a", "web-a", "--yes"]);
    wait_for("the session to end", Duration::from_secs(30), || {
        session.0.try_wait().unwrap().is_some()
    });
    let (users, dbs) = tenants(&agent);
    let want: BTreeSet<String> = [twin.clone()].into();
    assert_eq!((&users, &dbs), (&want, &want));
    assert_eq!(sql_ok(&agent, &b_web, "select s from notes"), "b-only");
    // Created again: a new, empty database.
    agent.ok(&["addon", "create", &format!("{MY}:shared"), "-a", "web-a"]);
    eventually(
        &agent,
        &a_web,
        "select count(*) from information_schema.tables where table_schema = database()",
        "0",
    );

    // The last app leaving takes the server and its disk.
    agent.ok(&["addon", "destroy", MY, "-a", "web-a", "--yes"]);
    assert!(sandbox_names(&agent).contains(SHARED));
    agent.ok(&["addon", "destroy", MY, "-a", &twin, "--yes"]);
    shared_server_gone(&agent, SHARED);
    agent.ok(&["app", "delete", "web-a"]);
    agent.ok(&["app", "delete", &twin]);
    assert_nothing_left(&agent);
}

/// After a restart: every addon of `known` (app -> variant) reaches `active` or is gone
/// (dropped from `known`); the node has exactly the servers, disks and endpoints they need,
/// the shared server exactly their tenants, and each app's login works.
fn converged(agent: &TestAgent, known: &mut BTreeMap<String, String>, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let poll = Duration::from_millis(50);
    known.retain(|app, _| active_or_gone(agent, MY, app, deadline, poll, context, errored));
    let mut expected: BTreeSet<String> = known
        .iter()
        .filter(|(_, v)| *v == "small")
        .map(|(app, _)| format!("addon-mysql-{app}"))
        .collect();
    let shared: BTreeSet<String> = known
        .iter()
        .filter(|(_, v)| *v == "shared")
        .map(|(app, _)| app.clone())
        .collect();
    if !shared.is_empty() {
        expected.insert(SHARED.into());
    }
    // A shared server's removal finishes after its last member's row is gone.
    wait_sandboxes_and_disks(agent, &expected, &expected, poll, context);
    assert_running_with_their_endpoints(agent, context);
    agent.assert_converged();
    if !shared.is_empty() {
        let (users, dbs) = tenants(agent);
        assert_eq!(users, shared, "{context}: users on the shared server");
        assert_eq!(dbs, shared, "{context}: databases on the shared server");
    }
    // Each app's own login works, from inside its server's sandbox over TCP.
    for (app, variant) in known.iter() {
        let vars = env(agent, app);
        let server = if variant == "small" {
            format!("addon-mysql-{app}")
        } else {
            SHARED.to_string()
        };
        let out = exec_sh(
            agent,
            &server,
            &format!(
                "MYSQL_PWD={} mariadb -N -h {} -u {} {} -e 'select 1'",
                vars["MYSQL_PASSWORD"],
                vars["MYSQL_HOST"],
                vars["MYSQL_USER"],
                vars["MYSQL_DATABASE"]
            ),
        );
        assert_eq!(stdout(&out), "1", "{context}: {app}: {}", text(&out));
    }
}

#[test]
fn kill_9_during_creates_and_destroys_converges_and_leaves_nothing() {
    let Some(mut agent) = agent_with_mirror(&[IMAGE]) else {
        return;
    };
    let started = Instant::now();
    // (operation, variant, app, delay): creates of small servers and of the shared server
    // (its first member makes it) at points from the request to the init, then destroys.
    let plan: &[(&str, &str, &str, u64)] = &[
        ("create", "small", "ks1", 300),
        ("create", "shared", "kh1", 400),
        ("create", "small", "ks2", 1500),
        ("create", "shared", "kh2", 150),
        ("create", "shared", "kh3", 900),
        ("destroy", "small", "ks1", 100),
        ("destroy", "shared", "kh1", 250),
        ("create", "small", "ks3", 2500),
        ("destroy", "shared", "kh2", 40),
        ("destroy", "shared", "kh3", 400),
        ("destroy", "small", "ks2", 600),
        ("destroy", "small", "ks3", 0),
    ];
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    for (i, (op, variant, app, ms)) in plan.iter().enumerate() {
        let addon = format!("{MY}:{variant}");
        let args: Vec<&str> = if *op == "create" {
            known.insert(app.to_string(), variant.to_string());
            vec!["addon", "create", &addon, "-a", app, "--version", VERSION]
        } else {
            vec!["addon", "destroy", MY, "-a", app, "--yes"]
        };
        let t = Instant::now();
        kill_during(&mut agent, &args, Duration::from_millis(*ms));
        let context = format!("kill {i} ({op} {variant} {app}, {ms} ms)");
        converged(&agent, &mut known, &context);
        if *op == "destroy" && known.contains_key(*app) {
            // The kill came before the request arrived: destroy it for good.
            agent.ok(&["addon", "destroy", MY, "-a", app, "--yes"]);
            converged(&agent, &mut known, &context);
        }
        eprintln!(
            "{context}: converged in {:.1}s; {} addons",
            t.elapsed().as_secs_f64(),
            known.len()
        );
    }
    assert!(known.is_empty(), "{known:?}");
    assert_nothing_left(&agent);
    // Kills landed mid-work: the next agent had provisioning or removal to finish.
    let resumed = agent.log_text().matches("resuming addon").count();
    eprintln!(
        "{} kill points in {:.0}s; {resumed} addons resumed",
        plan.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        resumed > 0,
        "no kill landed while an addon was being worked on"
    );
}
