//! Addons end to end: PostgreSQL `small` and `shared` on real sandboxes, disks and network
//! endpoints, reached with a real `psql` through the variables the agent injects; deploys from
//! `.miren/app.toml`; concurrent creates and destroys; kill -9 of the agent mid-way.
//!
//! The images come from the loopback registry of `scripts/images` (`postgres:17`,
//! `postgres:15`, both with `psql`). The tests run when MIREN_IMAGE_MIRROR is set
//! (`export "$(scripts/images | tail -n 1)"`; scripts/test sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    active_or_gone, addon_status, addons, agent_with_mirror, assert_nothing_left,
    assert_running_with_their_endpoints, deploy, disk_names, env, errored, exec_sh, idle_app,
    kill_during, names, psql, psql_ok, sandbox_names, shared_server_gone, text,
    wait_sandboxes_and_disks, write_app,
};
use miren_vm_tests::{ChildGuard, TestAgent};
use serde_json::Value;

const PG: &str = "miren-postgresql";

fn database_url(agent: &TestAgent, app: &str) -> String {
    env(agent, app)
        .remove("DATABASE_URL")
        .unwrap_or_else(|| panic!("app {app} has no DATABASE_URL"))
}

/// A statement as the shared server's superuser, inside its sandbox (local trust auth).
fn superuser(agent: &TestAgent, sql: &str) -> String {
    agent
        .ok(&[
            "sandbox", "exec", "addon-pg", "--", "psql", "-U", "postgres", "-tAc", sql,
        ])
        .trim()
        .to_string()
}

/// Tenant roles and databases on the shared server (what the images bring excluded).
fn tenants(agent: &TestAgent) -> (BTreeSet<String>, BTreeSet<String>) {
    let roles = superuser(
        agent,
        "select rolname from pg_roles where rolname !~ '^pg_' and rolname not in ('postgres', 'miren_pooler')",
    );
    let dbs = superuser(
        agent,
        "select datname from pg_database where datname not in ('postgres', 'template0', 'template1')",
    );
    let set = |s: &str| s.lines().map(|l| l.trim().to_string()).collect();
    (set(&roles), set(&dbs))
}

/// An app whose `web` service is a postgres:17 container idling, so `psql` runs inside it.
fn psql_app(name: &str, addon: Option<&str>) -> String {
    let settings = addon.map(|variant| format!("variant = \"{variant}\"\n"));
    idle_app(
        name,
        "postgres:17",
        "sleep infinity",
        settings.as_deref().map(|s| (PG, s)),
    )
}

/// Runs `sql` inside `sandbox` with the app's own `DATABASE_URL` (`psql -tA`).
fn app_query(agent: &TestAgent, sandbox: &str, sql: &str) -> Output {
    exec_sh(
        agent,
        sandbox,
        &format!("psql \"$DATABASE_URL\" -tAc '{sql}'"),
    )
}

/// Runs `sql` with the app's own `DATABASE_URL` inside `sandbox` until its output contains
/// `expected` (the server may still be starting), for up to two minutes.
fn eventually_queries(agent: &TestAgent, sandbox: &str, sql: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = app_query(agent, sandbox, sql);
        if text(&out).contains(expected) {
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

#[test]
fn small_variant_deploy_waits_for_the_addon_and_redeploy_and_destroy_remove_its_data() {
    let Some(agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    let dir = agent.root.join("shop");
    let mut toml = psql_app("shop", Some("small"));
    toml.push_str(
        "\n[[services.web.env]]\nkey = \"GREETING\"\nvalue = \"hello\"\n\n\
         [[services.web.disks]]\nname = \"shop-files\"\nmount_path = \"/files\"\nsize_gb = 1\n",
    );
    write_app(&dir, &toml);

    // The deploy runs in the background; while the addon is not active, no service runs.
    let mut deploying = ChildGuard(
        agent
            .command(&["deploy", "-C", dir.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut seen_unready = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while deploying.0.try_wait().unwrap().is_none() {
        // Sandboxes first: an addon never goes back from active, so a service seen before
        // a not-yet-active addon was started too early.
        let running = sandbox_names(&agent);
        let status =
            addon_status(&agent, "shop", PG).map(|a| a["status"].as_str().unwrap().to_string());
        if matches!(status.as_deref(), None | Some("pending" | "provisioning")) {
            seen_unready += 1;
            assert!(
                !running.contains("shop-web"),
                "shop-web runs while its addon is {status:?}"
            );
        }
        assert!(Instant::now() < deadline, "deploy never finished");
        sleep(Duration::from_millis(30));
    }
    let out = deploying.0.wait_with_output_ref();
    assert!(out.status.success(), "deploy failed: {}", text(&out));
    assert!(seen_unready > 0, "never saw the addon before it was active");
    let addon = addon_status(&agent, "shop", PG).expect("the addon");
    assert_eq!(addon["status"], "active", "{addon}");
    assert_eq!(addon["variant"], "small");
    assert_eq!(addon["version"], "17");
    assert!(sandbox_names(&agent).contains("addon-pg-shop"));
    assert!(disk_names(&agent).contains("addon-pg-shop"));

    // Secrets are masked unless revealed; the revealed URL works from the host.
    let masked = agent.json(&["env", "list", "-a", "shop", "--json"]);
    assert_eq!(masked["DATABASE_URL"], "********", "{masked}");
    assert_eq!(masked["PGPASSWORD"], "********", "{masked}");
    let vars = env(&agent, "shop");
    assert_eq!(vars["PGPORT"], "5432");
    assert!(vars["PGPASSWORD"].len() >= 22, "a short password");
    let url = vars["DATABASE_URL"].clone();
    assert_eq!(psql_ok(&url, "select current_user"), vars["PGUSER"]);
    psql_ok(
        &url,
        "create table visits(n int); insert into visits values (42)",
    );
    assert!(psql_ok(&url, "show server_version").starts_with("17"));
    let wrong = url.replace(&vars["PGPASSWORD"], "not-the-password");
    assert!(
        !psql(&wrong, "select 1").status.success(),
        "a wrong password got in"
    );

    // Inside the app's own sandbox, with the injected environment.
    let out = exec_sh(
        &agent,
        "shop-web",
        "echo \"$GREETING $PORT\"; psql \"$DATABASE_URL\" -tAc 'select n from visits'",
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello 3000"), "{stdout}");
    assert!(stdout.contains("42"), "{stdout}");

    // app list / status / restart.
    let apps = agent.json(&["app", "list", "--json"]);
    assert_eq!(names(&apps), BTreeSet::from(["shop".to_string()]));
    let status = agent.json(&["app", "status", "shop", "--json"]);
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["services"][0]["sandbox"], "shop-web");
    assert_eq!(status["services"][0]["state"], "running");
    assert_eq!(status["addons"][0]["status"], "active");
    let before = agent.json(&["sandbox", "status", "shop-web", "--json"])["id"].clone();
    agent.ok(&["app", "restart", "shop"]);
    let after = agent.json(&["sandbox", "status", "shop-web", "--json"]);
    assert_ne!(after["id"], before, "restart kept the old sandbox");
    assert_eq!(after["state"], "running");
    let out = app_query(&agent, "shop-web", "select n from visits");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("42"),
        "{}",
        text(&out)
    );

    // A redeploy without the section deprovisions the addon: server, disk and data go, and
    // the service runs without its variables.
    let without = toml
        .split(&format!("[addons.{PG}]"))
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    let mut stripped = without[0].clone();
    // Keep what followed the addon section's two lines (the env and disk tables).
    stripped.push_str(
        without[1]
            .split_once("\n\n")
            .map(|(_, rest)| rest)
            .unwrap_or(""),
    );
    assert!(!stripped.contains("addons"), "{stripped}");
    write_app(&dir, &stripped);
    deploy(&agent, &dir);
    assert!(
        addon_status(&agent, "shop", PG).is_none(),
        "{:?}",
        addons(&agent, "shop")
    );
    assert!(!sandbox_names(&agent).contains("addon-pg-shop"));
    assert!(!disk_names(&agent).contains("addon-pg-shop"));
    assert!(
        !miren_disks::loops_under(&agent.images_dir())
            .unwrap()
            .iter()
            .any(|l| l.backing_file.to_string_lossy().contains("addon-pg-shop")),
        "the addon's loop device stayed"
    );
    let out = exec_sh(&agent, "shop-web", "echo \"url=${DATABASE_URL:-none}\"");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("url=none"),
        "{}",
        text(&out)
    );
    assert!(
        !psql(&url, "select 1").status.success(),
        "the old server answers"
    );

    // Declared again: a new, empty database.
    write_app(&dir, &toml);
    deploy(&agent, &dir);
    let url = database_url(&agent, "shop");
    let out = psql(&url, "select n from visits");
    assert!(
        !out.status.success(),
        "the old data came back: {}",
        text(&out)
    );
    psql_ok(
        &url,
        "create table visits(n int); insert into visits values (7)",
    );

    // Destroy removes the data: disk gone, and a new addon starts empty.
    let destroyed = agent.ok(&["addon", "destroy", PG, "-a", "shop", "--yes"]);
    assert!(destroyed.contains("deleted"), "{destroyed}");
    assert!(addon_status(&agent, "shop", PG).is_none());
    assert!(!disk_names(&agent).contains("addon-pg-shop"));
    assert!(!sandbox_names(&agent).contains("addon-pg-shop"));
    // destroying again is a no-op
    agent.ok(&["addon", "destroy", PG, "-a", "shop", "--yes"]);
    agent.ok(&["addon", "create", PG, "-a", "shop"]);
    let url = database_url(&agent, "shop");
    let out = psql(&url, "select n from visits");
    assert!(
        !out.status.success(),
        "data survived destroy: {}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // app delete removes the services, keeps the disks and the addons.
    let deleted = agent.ok(&["app", "delete", "shop"]);
    assert!(deleted.contains("shop-files"), "{deleted}");
    assert!(!sandbox_names(&agent).contains("shop-web"));
    assert!(disk_names(&agent).contains("shop-files"));
    assert_eq!(
        addon_status(&agent, "shop", PG).unwrap()["status"],
        "active"
    );
    psql_ok(&url, "select 1");
    assert!(names(&agent.json(&["app", "list", "--json"])).is_empty());
    agent.fails(&["app", "status", "shop"]);

    agent.ok(&["addon", "destroy", PG, "-a", "shop", "--yes"]);
    agent.ok(&["debug", "disk", "delete", "-n", "shop-files"]);
    assert_nothing_left(&agent);
}

/// `wait_with_output` for a guarded child (the guard then has nothing left to kill).
trait WaitRef {
    fn wait_with_output_ref(&mut self) -> Output;
}

impl WaitRef for Child {
    fn wait_with_output_ref(&mut self) -> Output {
        let status = self.wait().unwrap();
        let stdout = self
            .stdout
            .take()
            .map(miren_vm_tests::read_all)
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .map(miren_vm_tests::read_all)
            .unwrap_or_default();
        Output {
            status,
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
        }
    }
}

#[test]
fn shared_variant_isolates_apps_and_versions_are_checked() {
    let Some(agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    // alice by hand, bob by a deploy whose service can run psql.
    let out = agent.ok(&["addon", "create", &format!("{PG}:shared"), "-a", "alice"]);
    assert!(out.contains("active"), "{out}");
    let bob_dir = agent.root.join("bob");
    write_app(&bob_dir, &psql_app("bob", Some("shared")));
    deploy(&agent, &bob_dir);
    let alice = env(&agent, "alice");
    let bob = env(&agent, "bob");
    assert_eq!(alice["PGHOST"], bob["PGHOST"], "not the same server");
    assert_ne!(alice["PGUSER"], bob["PGUSER"]);
    assert_ne!(alice["PGDATABASE"], bob["PGDATABASE"]);
    let alice_url = alice["DATABASE_URL"].clone();
    let bob_url = bob["DATABASE_URL"].clone();
    psql_ok(
        &alice_url,
        "create table secrets(s text); insert into secrets values ('alice-only')",
    );
    psql_ok(
        &bob_url,
        "create table notes(s text); insert into notes values ('bob-only')",
    );
    let out = app_query(&agent, "bob-web", "select s from notes");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bob-only"),
        "{}",
        text(&out)
    );

    // Each role is refused the other's database, even with a correct password.
    let swap_db = |url: &str, from: &str, to: &str| {
        let (base, db) = url.rsplit_once('/').unwrap();
        assert_eq!(db, from);
        format!("{base}/{to}")
    };
    for (url, own, other) in [
        (&alice_url, &alice["PGDATABASE"], &bob["PGDATABASE"]),
        (&bob_url, &bob["PGDATABASE"], &alice["PGDATABASE"]),
    ] {
        let out = psql(&swap_db(url, own, other), "select 1");
        assert!(!out.status.success(), "reached {other}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("permission denied"), "{err}");
    }
    // Versions: a shared request for another version is refused; an unknown one lists the
    // valid ones; a full image reference is used as given.
    let err = agent.fails(&[
        "addon",
        "create",
        &format!("{PG}:shared"),
        "-a",
        "carol",
        "--version",
        "15",
    ]);
    assert!(err.contains("postgres:17") && err.contains("15"), "{err}");
    assert!(addon_status(&agent, "carol", PG).is_none());
    let err = agent.fails(&["addon", "create", PG, "-a", "carol", "--version", "13"]);
    for v in ["14", "15", "16", "17", "18"] {
        assert!(err.contains(v), "{v} missing from {err}");
    }
    assert!(addon_status(&agent, "carol", PG).is_none());
    let same = agent.ok(&[
        "addon",
        "create",
        &format!("{PG}:shared"),
        "-a",
        "carol",
        "--version",
        "17",
    ]);
    assert!(same.contains("active"), "{same}");
    let dave = agent.json(&[
        "addon",
        "create",
        PG,
        "-a",
        "dave",
        "--version",
        "docker.io/library/postgres:15",
        "--json",
    ]);
    assert_eq!(dave["status"], "active", "{dave}");
    assert_eq!(dave["variant"], "small");
    assert_eq!(dave["image"], "docker.io/library/postgres:15");
    let dave_url = database_url(&agent, "dave");
    assert!(
        psql_ok(&dave_url, "show server_version").starts_with("15"),
        "not PostgreSQL 15"
    );

    // Network: an app attached to a server reaches it, others cannot reach its address at
    // all (they time out even with valid credentials).
    let outsider_dir = agent.root.join("outsider");
    write_app(&outsider_dir, &psql_app("outsider", None));
    deploy(&agent, &outsider_dir);
    let try_from = |sandbox: &str, url: &str| {
        exec_sh(
            &agent,
            sandbox,
            &format!("PGCONNECT_TIMEOUT=2 psql '{url}' -tAc 'select 42'"),
        )
    };
    let ok = try_from("bob-web", &bob_url);
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("42"),
        "{}",
        text(&ok)
    );
    for (from, url, what) in [
        ("outsider-web", &alice_url, "the shared server"),
        ("outsider-web", &dave_url, "dave's server"),
        ("bob-web", &dave_url, "dave's server"),
    ] {
        let out = try_from(from, url);
        assert!(
            !out.status.success(),
            "{from} reached {what}: {}",
            text(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("timeout") || err.contains("unreachable") || err.contains("refused"),
            "{from} -> {what} failed for another reason: {err}"
        );
    }
    // The rules follow membership: once outsider attaches the shared server, its service
    // (restarted with the new variables) gets in.
    agent.ok(&["addon", "create", &format!("{PG}:shared"), "-a", "outsider"]);
    let joined = exec_sh(
        &agent,
        "outsider-web",
        "PGCONNECT_TIMEOUT=2 psql \"$DATABASE_URL\" -tAc 'select 42'",
    );
    assert!(
        String::from_utf8_lossy(&joined.stdout).contains("42"),
        "{}",
        text(&joined)
    );

    // Destroy: alice's role and database are gone, connections included; bob is untouched.
    let (roles, dbs) = tenants(&agent);
    assert!(roles.contains(&alice["PGUSER"]) && dbs.contains(&alice["PGDATABASE"]));
    agent.ok(&["addon", "destroy", PG, "-a", "alice", "--yes"]);
    let (roles, dbs) = tenants(&agent);
    assert!(!roles.contains(&alice["PGUSER"]), "{roles:?}");
    assert!(!dbs.contains(&alice["PGDATABASE"]), "{dbs:?}");
    assert!(!psql(&alice_url, "select 1").status.success());
    assert_eq!(psql_ok(&bob_url, "select s from notes"), "bob-only");
    // Created again: a new, empty database.
    agent.ok(&["addon", "create", &format!("{PG}:shared"), "-a", "alice"]);
    let out = psql(&database_url(&agent, "alice"), "select s from secrets");
    assert!(
        !out.status.success(),
        "alice's data survived: {}",
        text(&out)
    );

    // An image that cannot be pulled: the create fails with the reason, leaves nothing made,
    // and the addon in `error` can be destroyed.
    let out = agent.cli(&[
        "addon",
        "create",
        PG,
        "-a",
        "erin",
        "--version",
        "docker.io/library/no-such-postgres:1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let failed = addon_status(&agent, "erin", PG).expect("the failed addon");
    assert_eq!(failed["status"], "error", "{failed}");
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no-such-postgres")),
        "{failed}"
    );
    assert!(!sandbox_names(&agent).contains("addon-pg-erin"));
    assert!(!disk_names(&agent).contains("addon-pg-erin"));
    agent.ok(&["addon", "destroy", PG, "-a", "erin", "--yes"]);
    assert!(addon_status(&agent, "erin", PG).is_none());

    for app in ["alice", "bob", "carol", "outsider"] {
        assert!(
            sandbox_names(&agent).contains("addon-pg"),
            "left before {app}"
        );
        agent.ok(&["addon", "destroy", PG, "-a", app, "--yes"]);
    }
    shared_server_gone(&agent, "addon-pg");
    agent.ok(&["addon", "destroy", PG, "-a", "dave", "--yes"]);
    agent.ok(&["app", "delete", "bob"]);
    agent.ok(&["app", "delete", "outsider"]);
    assert_nothing_left(&agent);
}

/// Runs the CLI commands at the same time; their outputs, in order.
fn all_at_once(agent: &TestAgent, commands: &[Vec<String>]) -> Vec<Output> {
    let children: Vec<Child> = commands
        .iter()
        .map(|args| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agent
                .command(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run miren")
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect()
}

fn create_shared(app: &str) -> Vec<String> {
    ["addon", "create", &format!("{PG}:shared"), "-a", app]
        .map(String::from)
        .to_vec()
}

fn destroy(app: &str) -> Vec<String> {
    ["addon", "destroy", PG, "-a", app, "--yes"]
        .map(String::from)
        .to_vec()
}

/// Every app of `members` is active on the shared server with a working database of its
/// own; the server has exactly their roles and databases; each is refused a neighbour's.
fn assert_shared_members(agent: &TestAgent, members: &[&str]) {
    let mut users = BTreeSet::new();
    let mut dbs = BTreeSet::new();
    let mut urls = Vec::new();
    for app in members {
        let addon = addon_status(agent, app, PG).unwrap_or_else(|| panic!("{app} lost its addon"));
        assert_eq!(addon["status"], "active", "{addon}");
        let vars = env(agent, app);
        let url = vars["DATABASE_URL"].clone();
        psql_ok(
            &url,
            &format!(
                "create table if not exists owner(a text); insert into owner values ('{app}')"
            ),
        );
        assert!(psql_ok(&url, "select a from owner").contains(app));
        users.insert(vars["PGUSER"].clone());
        dbs.insert(vars["PGDATABASE"].clone());
        urls.push((url, vars["PGDATABASE"].clone()));
    }
    let (roles, databases) = tenants(agent);
    assert_eq!(roles, users, "roles on the shared server");
    assert_eq!(databases, dbs, "databases on the shared server");
    // the allow list is exactly the members
    let server = agent.json(&["sandbox", "status", "addon-pg", "--json"]);
    let endpoints = agent.json(&["debug", "net", "list", "--json"]);
    let allow: BTreeSet<String> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["owner"] == server["id"])
        .expect("the shared server's endpoint")["allow_from"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    // ... and the pooler in front of it.
    let want: BTreeSet<String> = members
        .iter()
        .map(|m| m.to_string())
        .chain(["addon-pg-pool".to_string()])
        .collect();
    assert_eq!(
        allow, want,
        "the shared server admits other apps than its members"
    );
    if urls.len() >= 2 {
        let (url, _) = &urls[0];
        let (_, other_db) = &urls[1];
        let (base, _) = url.rsplit_once('/').unwrap();
        let out = psql(&format!("{base}/{other_db}"), "select 1");
        assert!(
            !out.status.success(),
            "a neighbour's database: {}",
            text(&out)
        );
    }
}

#[test]
fn concurrent_creates_and_destroys_on_the_shared_server() {
    let Some(agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    let apps: Vec<String> = (0..9).map(|i| format!("conc{i}")).collect();
    // Six at once, one of which creates the server while the others wait for it.
    let outs = all_at_once(
        &agent,
        &apps[..6]
            .iter()
            .map(|a| create_shared(a))
            .collect::<Vec<_>>(),
    );
    for (app, out) in apps.iter().zip(&outs) {
        assert!(out.status.success(), "create {app}: {}", text(out));
    }
    let six: Vec<&str> = apps[..6].iter().map(String::as_str).collect();
    assert_shared_members(&agent, &six);

    // Half leave while three others join, all at the same time.
    let mut commands: Vec<Vec<String>> = apps[..3].iter().map(|a| destroy(a)).collect();
    commands.extend(apps[6..9].iter().map(|a| create_shared(a)));
    let outs = all_at_once(&agent, &commands);
    for (cmd, out) in commands.iter().zip(&outs) {
        assert!(out.status.success(), "{cmd:?}: {}", text(out));
    }
    for app in &apps[..3] {
        assert!(
            addon_status(&agent, app, PG).is_none(),
            "{app} still has its addon"
        );
    }
    let six: Vec<&str> = apps[3..9].iter().map(String::as_str).collect();
    assert_shared_members(&agent, &six);

    // Everyone leaves at once while one joins: the joiner keeps a working server.
    let mut commands: Vec<Vec<String>> = apps[3..9].iter().map(|a| destroy(a)).collect();
    commands.push(create_shared("late"));
    let outs = all_at_once(&agent, &commands);
    for (cmd, out) in commands.iter().zip(&outs) {
        assert!(out.status.success(), "{cmd:?}: {}", text(out));
    }
    assert_shared_members(&agent, &["late"]);

    // The last one leaving, together with a create that races it: whichever wins, the
    // bookkeeping holds (one member and a server, or none and no server).
    let outs = all_at_once(&agent, &[destroy("late"), create_shared("later")]);
    for out in &outs {
        assert!(out.status.success(), "{}", text(out));
    }
    assert!(addon_status(&agent, "late", PG).is_none());
    assert_shared_members(&agent, &["later"]);

    // Three creates racing on an absent server, then all three destroyed at once.
    agent.ok(&["addon", "destroy", PG, "-a", "later", "--yes"]);
    shared_server_gone(&agent, "addon-pg");
    let trio = ["tri0", "tri1", "tri2"];
    let outs = all_at_once(&agent, &trio.map(create_shared));
    for out in &outs {
        assert!(out.status.success(), "{}", text(out));
    }
    assert_shared_members(&agent, &trio);
    let outs = all_at_once(&agent, &trio.map(destroy));
    for out in &outs {
        assert!(out.status.success(), "{}", text(out));
    }
    for app in trio {
        assert!(addon_status(&agent, app, PG).is_none());
    }
    shared_server_gone(&agent, "addon-pg");
    assert_nothing_left(&agent);
}

fn addon_args(op: &str, variant: &str, app: &str) -> Vec<String> {
    match op {
        "create" => ["addon", "create", &format!("{PG}:{variant}"), "-a", app]
            .map(String::from)
            .to_vec(),
        _ => destroy(app),
    }
}

/// After a restart: every addon of `known` (app -> variant) reaches `active` or is gone
/// (dropped from `known`), and the node has exactly the resources the survivors need.
fn converged(agent: &TestAgent, known: &mut BTreeMap<String, String>, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let poll = Duration::from_millis(50);
    let failed = |a: &Value| {
        errored(a)
            || a["reason"]
                .as_str()
                .is_some_and(|r| r.contains("removal failed"))
    };
    known.retain(|app, _| active_or_gone(agent, PG, app, deadline, poll, context, failed));
    let mut expected: BTreeSet<String> = known
        .iter()
        .filter(|(_, v)| *v == "small")
        .map(|(app, _)| format!("addon-pg-{app}"))
        .collect();
    let shared: Vec<&String> = known
        .iter()
        .filter(|(_, v)| *v == "shared")
        .map(|(app, _)| app)
        .collect();
    if !shared.is_empty() {
        expected.insert("addon-pg".into());
    }
    // Every server has its pooler beside it (a sandbox without a disk).
    let sandboxes = expected
        .iter()
        .map(|s| format!("{s}-pool"))
        .chain(expected.iter().cloned())
        .collect();
    // A shared server's removal finishes after its last member's row is gone.
    wait_sandboxes_and_disks(agent, &sandboxes, &expected, poll, context);
    let endpoints = assert_running_with_their_endpoints(agent, context);
    let ips: BTreeSet<&str> = endpoints
        .iter()
        .map(|e| e["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), endpoints.len(), "{context}: an address twice");
    agent.assert_converged();
    let mut users = BTreeSet::new();
    for app in known.keys() {
        let vars = env(agent, app);
        assert_eq!(
            psql_ok(&vars["DATABASE_URL"], "select 1"),
            "1",
            "{context}: {app}"
        );
        if known[app] == "shared" {
            users.insert(vars["PGUSER"].clone());
        }
    }
    if !shared.is_empty() {
        let (roles, dbs) = tenants(agent);
        assert_eq!(roles, users, "{context}: roles on the shared server");
        assert_eq!(dbs, users, "{context}: databases on the shared server");
    }
}

#[test]
fn kill_9_during_creates_and_destroys_converges_and_leaves_nothing() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    let started = Instant::now();
    let delays_ms = [
        0, 20, 50, 100, 200, 400, 700, 1000, 1500, 2000, 3000, 10, 35, 75, 150, 300, 550, 850,
        1250, 1750, 2500, 5, 250, 4000,
    ];
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    let mut points = 0;
    for (i, ms) in delays_ms.iter().enumerate() {
        let variant = if i % 2 == 0 { "small" } else { "shared" };
        // two rounds of creates, then one of destroys (oldest first)
        let victim = known
            .iter()
            .find(|(_, v)| *v == variant)
            .map(|(app, _)| app.clone());
        let (op, app) = match victim {
            Some(app) if (i / 2) % 3 == 2 => ("destroy", app),
            _ => {
                let app = format!("k{i:02}{}", &variant[..2]);
                known.insert(app.clone(), variant.to_string());
                ("create", app)
            }
        };
        let t = Instant::now();
        kill_during(
            &mut agent,
            &addon_args(op, variant, &app),
            Duration::from_millis(*ms),
        );
        let context = format!("kill {i} ({op} {variant} {app}, {ms} ms)");
        converged(&agent, &mut known, &context);
        points += 1;
        eprintln!(
            "{context}: converged in {:.1}s; {} addons",
            t.elapsed().as_secs_f64(),
            known.len()
        );
    }
    // Everything goes, also under kills (the last shared member takes the server with it).
    let final_delays = [0, 30, 90, 180, 350, 600, 1000, 60, 120, 450];
    let mut i = 0;
    while let Some((app, variant)) = known.iter().next().map(|(a, v)| (a.clone(), v.clone())) {
        let ms = final_delays[i % final_delays.len()];
        kill_during(&mut agent, &destroy(&app), Duration::from_millis(ms));
        let context = format!("final kill {i} (destroy {variant} {app}, {ms} ms)");
        converged(&agent, &mut known, &context);
        if known.contains_key(&app) {
            // the kill came before the request: destroy it for good
            agent.ok(&["addon", "destroy", PG, "-a", &app, "--yes"]);
            converged(&agent, &mut known, &context);
        }
        assert!(!known.contains_key(&app));
        points += 1;
        i += 1;
    }
    assert!(points >= 20, "only {points} kill points");
    assert_nothing_left(&agent);
    let log = agent.log_text();
    eprintln!(
        "{points} kill points in {:.0}s; {} resumed addons, {} tenant statements retried",
        started.elapsed().as_secs_f64(),
        log.matches("resuming addon").count(),
        log.matches("concurrent session changes the same tenant")
            .count()
    );
}

/// A deploy cut short by kill -9 while its addon provisions is finished by the next agent:
/// the service starts only once the addon is active, with its variables.
#[test]
fn a_deploy_killed_while_its_addon_provisions_is_finished_after_restart() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    let dir = agent.root.join("cut");
    write_app(&dir, &psql_app("cut", Some("small")));
    let args = ["deploy", "-C", dir.to_str().unwrap()].map(String::from);
    kill_during(&mut agent, &args, Duration::from_millis(1500));
    let status = addon_status(&agent, "cut", PG).expect("the deploy recorded the addon");
    assert_ne!(status["status"], "error", "{status}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = sandbox_names(&agent).contains("cut-web");
        let addon = addon_status(&agent, "cut", PG).expect("the addon");
        if running {
            assert_eq!(addon["status"], "active", "service started first: {addon}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deploy was never finished: {addon}\n{}",
            agent.log_text()
        );
        sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let app = agent.json(&["app", "status", "cut", "--json"]);
        if app["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "{app}");
        sleep(Duration::from_millis(50));
    }
    let out = app_query(&agent, "cut-web", "select 7");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains('7'),
        "{}",
        text(&out)
    );
    agent.ok(&["app", "delete", "cut"]);
    agent.ok(&["addon", "destroy", PG, "-a", "cut", "--yes"]);
    assert_nothing_left(&agent);
}

#[test]
fn an_app_and_its_addon_come_back_after_a_host_restart_with_their_data() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    let dir = agent.root.join("boot");
    write_app(&dir, &psql_app("boot", Some("shared")));
    deploy(&agent, &dir);
    let out = exec_sh(
        &agent,
        "boot-web",
        "psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -c 'create table kept (v text)' -c \"insert into kept values ('before the restart')\"",
    );
    assert!(out.status.success(), "{}", text(&out));

    agent.lose_everything_a_host_restart_loses();
    agent.spawn();

    // The service and the shared server run again; the row is there, read with the same
    // credentials from inside the service.
    eventually_queries(
        &agent,
        "boot-web",
        "select v from kept",
        "before the restart",
    );
    assert_eq!(
        agent.json(&["app", "status", "boot", "--json"])["status"],
        "running"
    );
    assert_eq!(
        addon_status(&agent, "boot", PG).expect("addon")["status"],
        "active"
    );
    let server = agent.json(&["sandbox", "status", "addon-pg", "--json"]);
    assert_eq!(
        server["restarts"], 1,
        "relaunched, not re-provisioned: {server}"
    );

    agent.ok(&["app", "delete", "boot"]);
    agent.ok(&["addon", "destroy", PG, "-a", "boot", "--yes"]);
    shared_server_gone(&agent, "addon-pg");
    assert_nothing_left(&agent);
}

#[test]
fn an_addon_made_without_waiting_reaches_the_running_app_by_itself() {
    let Some(agent) = agent_with_mirror(&["postgres:17"]) else {
        return;
    };
    let dir = agent.root.join("later");
    write_app(&dir, &psql_app("later", None));
    deploy(&agent, &dir);
    let before = agent.json(&["sandbox", "status", "later-web", "--json"]);
    let out = agent.ok(&[
        "addon",
        "create",
        &format!("{PG}:shared"),
        "-a",
        "later",
        "--no-wait",
    ]);
    assert!(out.contains("restarted"), "{out}");
    // No `app restart`: once the addon is active, the service runs again with its variables.
    eventually_queries(&agent, "later-web", "select 41+1", "42");
    let after = agent.json(&["sandbox", "status", "later-web", "--json"]);
    assert_ne!(after["id"], before["id"], "restarted as a new sandbox");
    assert_eq!(
        addon_status(&agent, "later", PG).expect("addon")["status"],
        "active"
    );

    agent.ok(&["app", "delete", "later"]);
    agent.ok(&["addon", "destroy", PG, "-a", "later", "--yes"]);
    shared_server_gone(&agent, "addon-pg");
    assert_nothing_left(&agent);
}
