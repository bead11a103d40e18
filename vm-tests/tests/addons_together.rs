//! Several addons on one app: every addon's variables reach every service (four kinds at
//! once give all 25), two kinds that set the same variable are refused before anything is
//! made, and the second example app (`examples/python-orders`) works on MySQL shared, Valkey
//! and RabbitMQ together.
//!
//! The images come from the loopback registry of `scripts/images`; the tests run when
//! MIREN_IMAGE_MIRROR is set (scripts/test sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{agent_with_mirror, assert_nothing_left, env, names, text, write_app};
use miren_vm_tests::TestAgent;
use serde_json::Value;

/// The variables of PostgreSQL, Valkey, Memcached and RabbitMQ, as apps already read them.
const FOUR_KINDS_VARIABLES: [&str; 25] = [
    "DATABASE_URL",
    "DATABASE_URL_SESSION",
    "DATABASE_URL_DIRECT",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "VALKEY_URL",
    "VALKEY_HOST",
    "VALKEY_PORT",
    "VALKEY_PASSWORD",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "MEMCACHE_URL",
    "MEMCACHE_HOST",
    "MEMCACHE_PORT",
    "RABBITMQ_URL",
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
    "RABBITMQ_VHOST",
];

fn addon_names(agent: &TestAgent, app: &str) -> BTreeSet<String> {
    names(&agent.json(&["addon", "list", "-a", app, "--json"]))
}

/// The environment a process in `sandbox` gets, as `env` prints it there.
fn sandbox_env(agent: &TestAgent, sandbox: &str) -> BTreeMap<String, String> {
    let out = agent.ok(&["sandbox", "exec", sandbox, "--", "env"]);
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn destroy_all(agent: &TestAgent, app: &str, kinds: &[&str]) {
    agent.ok(&["app", "delete", app]);
    for kind in kinds {
        agent.ok(&["addon", "destroy", kind, "-a", app, "--yes"]);
    }
}

#[test]
fn four_addons_on_one_app_give_every_service_all_25_variables() {
    let Some(agent) = agent_with_mirror(&[]) else {
        return;
    };
    let dir = agent.root.join("many");
    write_app(
        &dir,
        "name = \"many\"\n\
         [services.web]\nimage = \"busybox:latest\"\ncommand = \"sleep 3600\"\n\
         [services.worker]\nimage = \"busybox:latest\"\ncommand = \"sleep 3600\"\n\
         [addons.miren-postgresql]\n[addons.miren-valkey]\n[addons.miren-memcache]\n\
         [addons.miren-rabbitmq]\n",
    );
    agent.ok(&["deploy", "-C", dir.to_str().unwrap()]);
    let kinds = [
        "miren-postgresql",
        "miren-valkey",
        "miren-memcache",
        "miren-rabbitmq",
    ];
    let addons = agent.json(&["addon", "list", "-a", "many", "--json"]);
    for addon in addons.as_array().unwrap() {
        assert_eq!(addon["status"], "active", "{addons}");
    }
    assert_eq!(
        addon_names(&agent, "many"),
        kinds.iter().map(|k| k.to_string()).collect()
    );

    let declared = env(&agent, "many");
    let want: BTreeSet<String> = FOUR_KINDS_VARIABLES.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        declared.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "env list"
    );
    for service in ["many-web", "many-worker"] {
        let seen = sandbox_env(&agent, service);
        for key in FOUR_KINDS_VARIABLES {
            assert_eq!(
                seen.get(key),
                declared.get(key),
                "{key} in {service}: {seen:?}"
            );
        }
    }
    // Each server is its own: four addresses (and every URL names its own).
    let hosts: BTreeSet<&String> = ["PGHOST", "VALKEY_HOST", "MEMCACHE_HOST", "RABBITMQ_HOST"]
        .iter()
        .map(|k| &declared[*k])
        .collect();
    assert_eq!(hosts.len(), 4, "{declared:?}");
    assert!(declared["VALKEY_URL"].contains(&declared["VALKEY_HOST"]));
    assert_eq!(declared["REDIS_URL"], declared["VALKEY_URL"]);

    destroy_all(&agent, "many", &kinds);
    assert_nothing_left(&agent);
}

#[test]
fn postgres_and_mysql_on_one_app_are_refused_naming_both_and_nothing_is_made() {
    let Some(agent) = agent_with_mirror(&[]) else {
        return;
    };
    let dir = agent.root.join("clash");
    write_app(
        &dir,
        "name = \"clash\"\n[services.web]\nimage = \"busybox:latest\"\ncommand = \"sleep 3600\"\n\
         [addons.miren-postgresql]\n[addons.miren-mysql]\nvariant = \"shared\"\n",
    );
    let err = agent.fails(&["deploy", "-C", dir.to_str().unwrap()]);
    for part in ["miren-postgresql", "miren-mysql", "DATABASE_URL"] {
        assert!(err.contains(part), "{part} not in: {err}");
    }
    assert!(addon_names(&agent, "clash").is_empty());
    assert!(agent
        .json(&["app", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_nothing_left(&agent);

    // The same through `addon create`, whichever comes second: refused, the first untouched.
    agent.ok(&["addon", "create", "miren-postgresql", "-a", "clash"]);
    let err = agent.fails(&["addon", "create", "miren-mysql", "-a", "clash"]);
    for part in [
        "miren-postgresql",
        "miren-mysql",
        "DATABASE_URL",
        "addon destroy",
    ] {
        assert!(err.contains(part), "{part} not in: {err}");
    }
    assert_eq!(
        addon_names(&agent, "clash"),
        BTreeSet::from(["miren-postgresql".to_string()])
    );
    // And a deploy declaring MySQL next to the PostgreSQL made by hand.
    write_app(
        &dir,
        "name = \"clash\"\n[services.web]\nimage = \"busybox:latest\"\ncommand = \"sleep 3600\"\n\
         [addons.miren-mysql]\n",
    );
    let err = agent.fails(&["deploy", "-C", dir.to_str().unwrap()]);
    assert!(
        err.contains("miren-mysql") && err.contains("miren-postgresql"),
        "{err}"
    );
    assert_eq!(addon_names(&agent, "clash").len(), 1);
    agent.ok(&[
        "addon",
        "destroy",
        "miren-postgresql",
        "-a",
        "clash",
        "--yes",
    ]);
    assert_nothing_left(&agent);
}

/// GET from the host through the published port, retried while the app starts.
fn http_get(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = std::process::Command::new("curl")
            .args(["-fsS", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "GET :{port}: {}", text(&out));
        sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_orders_example_uses_mysql_valkey_and_rabbitmq_together() {
    let Some(agent) = agent_with_mirror(&[]) else {
        return;
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-orders");
    let port = miren_vm_tests::free_port();
    let out = agent.ok(&[
        "deploy",
        "-C",
        example.to_str().unwrap(),
        "--publish",
        &format!("web={port}:3000"),
    ]);
    assert!(out.contains("orders"), "{out}");
    let first: Value = serde_json::from_str(&http_get(port)).unwrap();
    assert!(first.get("error").is_none(), "{first}");
    let order = first["order"].as_i64().expect("an order id");
    assert_eq!(first["rabbitmq_event"]["order"], order, "{first}");
    let second: Value = serde_json::from_str(&http_get(port)).unwrap();
    assert_eq!(
        second["mysql_rows"],
        first["mysql_rows"].as_i64().unwrap() + 1
    );
    assert_eq!(
        second["valkey_count"],
        first["valkey_count"].as_i64().unwrap() + 1
    );
    assert_eq!(second["rabbitmq_event"]["order"], second["order"]);
    // What it read back is also in its log.
    let logs = agent.ok(&["sandbox", "logs", "orders-web"]);
    assert!(logs.contains("\"rabbitmq_event\""), "{logs}");

    destroy_all(
        &agent,
        "orders",
        &["miren-mysql", "miren-valkey", "miren-rabbitmq"],
    );
    assert_nothing_left(&agent);
}

#[test]
fn a_redeploy_may_swap_postgres_for_mysql() {
    let Some(agent) = agent_with_mirror(&[]) else {
        return;
    };
    let dir = agent.root.join("swap");
    let app = |addon: &str| {
        format!(
            "name = \"swap\"\n[services.web]\nimage = \"busybox:latest\"\ncommand = \"sleep 3600\"\n{addon}"
        )
    };
    write_app(&dir, &app("[addons.miren-postgresql]\n"));
    agent.ok(&["deploy", "-C", dir.to_str().unwrap()]);
    assert!(env(&agent, "swap")["DATABASE_URL"].starts_with("postgres://"));
    // The one going away does not clash with the one coming.
    write_app(
        &dir,
        &app("[addons.miren-mysql]\nversion = \"mariadb-11\"\n"),
    );
    agent.ok(&["deploy", "-C", dir.to_str().unwrap()]);
    assert_eq!(
        addon_names(&agent, "swap"),
        BTreeSet::from(["miren-mysql".to_string()])
    );
    let vars = env(&agent, "swap");
    assert!(vars["DATABASE_URL"].starts_with("mysql://"), "{vars:?}");
    assert!(!vars.contains_key("PGHOST"), "{vars:?}");
    assert_eq!(
        sandbox_env(&agent, "swap-web")["DATABASE_URL"],
        vars["DATABASE_URL"]
    );
    destroy_all(&agent, "swap", &["miren-mysql"]);
    assert_nothing_left(&agent);
}
