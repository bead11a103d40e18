//! PostgreSQL's pooler: a PgBouncer sandbox beside every PostgreSQL server
//! (`miren-addons/pgbouncer:1.24`), transaction pooling on 6432 and session pooling on 6433,
//! clients logging in as themselves through `auth_query`. The pooled, session and direct URLs
//! from inside the app; `SET` not leaking between clients in transaction mode; 1000
//! concurrent clients (`client_connections = 1000`) through the pooler of a `small`-tier server
//! with `max_connections` 85, and a lowered limit applied live; each app's own client limit on
//! the shared server's pooler; no other app reaching the pooler; the seeds' Bun example through
//! the transaction pooler; kill -9 while the pooler is being made.
//!
//! The images come from the loopback registry of `scripts/images` (`postgres:17`,
//! `miren-addons/pgbouncer:1.24`, `miren-examples/bun-visits:1`); the tests run when
//! MIREN_IMAGE_MIRROR is set. Two tests, one agent each, run in parallel.

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    active_or_gone, addon_status, agent_with_mirror, assert_nothing_left, deploy, env, errored,
    exec_sh, idle_app, kill_during, psql, text, wait_sandboxes_and_disks, write_app,
};
use miren_vm_tests::TestAgent;
use serde_json::Value;

const PG: &str = "miren-postgresql";
const POOLER_IMAGE: &str = "miren-addons/pgbouncer:1.24";

/// An app whose `web` service is a postgres:17 container idling, so `psql` runs inside it.
fn psql_app(name: &str, settings: Option<&str>) -> String {
    idle_app(
        name,
        "postgres:17",
        "sleep infinity",
        settings.map(|s| (PG, s)),
    )
}

/// `psql "$VAR" -tAc SQL` inside `sandbox`, with the app's own variable `var`.
fn in_app(agent: &TestAgent, sandbox: &str, var: &str, sql: &str) -> Output {
    exec_sh(
        agent,
        sandbox,
        &format!("PGCONNECT_TIMEOUT=3 psql \"${var}\" -v ON_ERROR_STOP=1 -tAc \"{sql}\""),
    )
}

fn in_app_ok(agent: &TestAgent, sandbox: &str, var: &str, sql: &str) -> String {
    let out = in_app(agent, sandbox, var, sql);
    assert!(
        out.status.success(),
        "{var}: `{sql}` in {sandbox}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The host part of a `postgres://user:pass@host:port/db` URL, and its port.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.rsplit_once('@').unwrap().1;
    let hostport = rest.split('/').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

/// The `allow_from` of the endpoint of sandbox `name`.
fn allow_from(agent: &TestAgent, name: &str) -> BTreeSet<String> {
    let sandbox = agent.json(&["sandbox", "status", name, "--json"]);
    let endpoints = agent.json(&["debug", "net", "list", "--json"]);
    endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["owner"] == sandbox["id"])
        .unwrap_or_else(|| panic!("no endpoint for {name}: {endpoints}"))["allow_from"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn pooled_session_and_direct_urls_isolation_and_the_tiers_clients_on_a_small_server() {
    let Some(agent) = agent_with_mirror(&["postgres:17", POOLER_IMAGE]) else {
        return;
    };
    let dir = agent.root.join("pa");
    write_app(
        &dir,
        &psql_app(
            "pa",
            Some("variant = \"small\"\npooling = \"transaction\"\nclient_connections = 1000\n"),
        ),
    );
    deploy(&agent, &dir);
    let addon = addon_status(&agent, "pa", PG).expect("the addon");
    assert_eq!(addon["status"], "active", "{addon}");
    assert_eq!(addon["tier"], "small", "{addon}");
    assert_eq!(addon["client_connections"], 1000, "{addon}");
    assert_eq!(addon["pooling"], "transaction", "{addon}");
    assert_eq!(addon["pooler"], "addon-pg-pa-pool", "{addon}");

    // The variables: DATABASE_URL is the transaction pooler, the session pooler is beside it,
    // DIRECT and PG* name the server.
    let vars = env(&agent, "pa");
    let (pooler, port) = host_port(&vars["DATABASE_URL"]);
    assert_eq!(port, 6432, "{vars:?}");
    assert_eq!(
        host_port(&vars["DATABASE_URL_SESSION"]),
        (pooler.clone(), 6433)
    );
    assert_eq!(
        host_port(&vars["DATABASE_URL_DIRECT"]),
        (vars["PGHOST"].clone(), 5432)
    );
    assert_ne!(pooler, vars["PGHOST"]);
    assert_eq!(vars["PGPORT"], "5432");
    let listed = agent.ok(&["env", "list", "-a", "pa"]);
    for key in [
        "DATABASE_URL",
        "DATABASE_URL_SESSION",
        "DATABASE_URL_DIRECT",
    ] {
        assert!(listed.contains(key), "env list: {listed}");
    }
    // The server and the pooler admit the app; the server admits the pooler too.
    assert_eq!(allow_from(&agent, "addon-pg-pa-pool"), set(&["pa"]));
    assert_eq!(
        allow_from(&agent, "addon-pg-pa"),
        set(&["pa", "addon-pg-pa-pool"])
    );

    // All three work from inside the app's service, as the app's own role.
    for var in [
        "DATABASE_URL",
        "DATABASE_URL_SESSION",
        "DATABASE_URL_DIRECT",
    ] {
        assert_eq!(
            in_app_ok(&agent, "pa-web", var, "select current_user"),
            vars["PGUSER"],
            "{var}"
        );
    }
    in_app_ok(
        &agent,
        "pa-web",
        "DATABASE_URL",
        "create table t(n int); insert into t values (1)",
    );
    assert_eq!(
        in_app_ok(&agent, "pa-web", "DATABASE_URL_SESSION", "select n from t"),
        "1"
    );

    // SET in transaction mode: the next clients (PgBouncer reuses the last server connection
    // first) do not see it. In session mode it holds for the session.
    in_app_ok(
        &agent,
        "pa-web",
        "DATABASE_URL",
        "SET statement_timeout = '4242ms'",
    );
    for _ in 0..5 {
        let seen = in_app_ok(&agent, "pa-web", "DATABASE_URL", "show statement_timeout");
        assert_ne!(seen, "4242ms", "a SET leaked to the next client");
    }
    let out = exec_sh(
        &agent,
        "pa-web",
        "psql \"$DATABASE_URL_SESSION\" -tA -c \"SET statement_timeout = '4242ms'\" -c 'show statement_timeout'",
    );
    assert!(text(&out).contains("4242ms"), "{}", text(&out));

    // Another app reaches neither the pooler nor the server, even with pa's password.
    let other = agent.root.join("other");
    write_app(&other, &psql_app("other", None));
    deploy(&agent, &other);
    for url in [
        &vars["DATABASE_URL"],
        &vars["DATABASE_URL_SESSION"],
        &vars["DATABASE_URL_DIRECT"],
    ] {
        let out = exec_sh(
            &agent,
            "other-web",
            &format!("PGCONNECT_TIMEOUT=3 psql '{url}' -tAc 'select 1'"),
        );
        assert!(
            !out.status.success(),
            "another app reached {}: {}",
            host_port(url).0,
            text(&out)
        );
    }

    // 1000 concurrent clients (the app asked for them: the small tier alone admits 100)
    // through the transaction pooler of a small-tier server that takes 85, whose pools hold
    // 20 of them, with prepared statements (pgbench -M prepared), from the host.
    let direct = &vars["DATABASE_URL_DIRECT"];
    let max: u32 = String::from_utf8_lossy(&psql(direct, "show max_connections").stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(max < 100, "max_connections {max}");
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", direct])
        .output()
        .unwrap();
    assert!(init.status.success(), "pgbench -i: {}", text(&init));
    let run = Command::new("pgbench")
        .args([
            "-n", "-S", "-M", "prepared", "-c", "1000", "-j", "4", "-t", "10",
        ])
        .arg(&vars["DATABASE_URL"])
        .output()
        .unwrap();
    let out = text(&run);
    assert!(run.status.success(), "pgbench through the pooler: {out}");
    assert!(
        out.contains("number of transactions actually processed: 10000/10000"),
        "{out}"
    );
    assert!(
        out.contains("number of failed transactions: 0 (0.000%)"),
        "{out}"
    );

    // A lower limit, applied live: the pooler stays (same sandbox), the 6th client is refused
    // with PgBouncer's reason, 5 still work.
    let pooler_before =
        agent.json(&["sandbox", "status", "addon-pg-pa-pool", "--json"])["id"].clone();
    let updated = agent.json(&[
        "addon",
        "update",
        PG,
        "-a",
        "pa",
        "--client-connections",
        "5",
        "--json",
    ]);
    assert_eq!(updated["restarted"], false, "{updated}");
    assert_eq!(updated["addon"]["client_connections"], 5, "{updated}");
    assert_eq!(
        agent.json(&["sandbox", "status", "addon-pg-pa-pool", "--json"])["id"],
        pooler_before,
        "the pooler was not replaced"
    );
    assert_clients(&vars["DATABASE_URL"], 5, true);
    assert_clients(&vars["DATABASE_URL"], 6, false);

    agent.ok(&["app", "delete", "pa"]);
    agent.ok(&["app", "delete", "other"]);
    agent.ok(&["addon", "destroy", PG, "-a", "pa", "--yes"]);
    assert_nothing_left(&agent);
}

/// `clients` concurrent pgbench clients (all connected before the first transaction) through
/// `url`: they all work, or the pooler refuses one for the database's client limit.
fn assert_clients(url: &str, clients: u32, admitted: bool) {
    let script = std::env::temp_dir().join(format!("mrtst-select1-{}.sql", std::process::id()));
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let run = Command::new("pgbench")
        .args(["-n", "-t", "5", "-f"])
        .arg(&script)
        .arg("-c")
        .arg(clients.to_string())
        .arg(url)
        .output();
    let _ = std::fs::remove_file(&script);
    let run = run.unwrap();
    let out = text(&run);
    if admitted {
        assert!(run.status.success(), "{clients} clients: {out}");
    } else {
        assert!(
            !run.status.success(),
            "{clients} clients were all admitted: {out}"
        );
        assert!(out.contains("max_db_client_connections"), "{out}");
    }
}

#[test]
fn each_app_on_the_shared_pooler_has_its_own_client_limit() {
    let Some(agent) = agent_with_mirror(&["postgres:17", POOLER_IMAGE]) else {
        return;
    };
    for (app, settings) in [
        ("sa", "variant = \"shared\"\nclient_connections = 3\n"),
        ("sb", "variant = \"shared\"\n"),
    ] {
        let dir = agent.root.join(app);
        write_app(&dir, &psql_app(app, Some(settings)));
        deploy(&agent, &dir);
    }
    assert_eq!(
        addon_status(&agent, "sa", PG).unwrap()["client_connections"],
        3
    );
    assert_eq!(
        addon_status(&agent, "sb", PG).unwrap()["client_connections"],
        100
    );
    let sa = env(&agent, "sa")["DATABASE_URL"].clone();
    let sb = env(&agent, "sb")["DATABASE_URL"].clone();
    assert_eq!(
        host_port(&sa),
        host_port(&sb),
        "one pooler for the shared server"
    );
    assert_clients(&sa, 3, true);
    assert_clients(&sa, 4, false);
    // The other app on the same pooler is not held to sa's limit.
    assert_clients(&sb, 20, true);

    // Raised live; the shared pooler is not replaced.
    let pooler = addon_status(&agent, "sa", PG).unwrap()["pooler"]
        .as_str()
        .unwrap()
        .to_string();
    let before = agent.json(&["sandbox", "status", &pooler, "--json"])["id"].clone();
    agent.ok(&[
        "addon",
        "update",
        PG,
        "-a",
        "sa",
        "--client-connections",
        "10",
    ]);
    assert_clients(&sa, 10, true);
    assert_clients(&sa, 11, false);
    assert_eq!(
        agent.json(&["sandbox", "status", &pooler, "--json"])["id"],
        before
    );
    // A tenant that leaves takes its limit with it; the other keeps its own.
    agent.ok(&["app", "delete", "sa"]);
    agent.ok(&["addon", "destroy", PG, "-a", "sa", "--yes"]);
    assert_clients(&sb, 20, true);
    agent.ok(&["app", "delete", "sb"]);
    agent.ok(&["addon", "destroy", PG, "-a", "sb", "--yes"]);
    assert_nothing_left(&agent);
}

/// GET http://ip:3000/ from the host; the body.
fn get(ip: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "3", &format!("http://{ip}:3000/")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// After a restart: every app of `known` has its addon active (or gone, dropped), each
/// server with exactly its pooler, both admitting the right apps, and the pooled URL works.
fn converged(agent: &TestAgent, known: &mut BTreeSet<String>, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let poll = Duration::from_millis(50);
    known.retain(|app| active_or_gone(agent, PG, app, deadline, poll, context, errored));
    let disks: BTreeSet<String> = known.iter().map(|a| format!("addon-pg-{a}")).collect();
    let sandboxes: BTreeSet<String> = disks
        .iter()
        .flat_map(|d| [d.clone(), format!("{d}-pool")])
        .collect();
    wait_sandboxes_and_disks(agent, &sandboxes, &disks, poll, context);
    agent.assert_converged();
    for app in known.iter() {
        let server = format!("addon-pg-{app}");
        let pool = format!("{server}-pool");
        assert_eq!(allow_from(agent, &pool), set(&[app]), "{context}");
        assert_eq!(allow_from(agent, &server), set(&[app, &pool]), "{context}");
        let vars = env(agent, app);
        assert_eq!(host_port(&vars["DATABASE_URL"]).1, 6432, "{context}");
        for var in ["DATABASE_URL", "DATABASE_URL_SESSION"] {
            let out = psql(&vars[var], "select 1");
            assert!(
                out.status.success(),
                "{context}: {app} {var}: {}\n{}",
                text(&out),
                agent.log_text()
            );
        }
    }
}

#[test]
fn visits_example_through_the_pooler_and_kill_9_while_the_pooler_is_made() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17", POOLER_IMAGE, "oven/bun:1"]) else {
        return;
    };
    // The seeds' Bun example, unchanged (built from its source): shared, so its DATABASE_URL
    // is the transaction pooler by default; Bun's SQL prepares its statements.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bun-visits");
    let dir = agent.root.join("visits");
    write_app(
        &dir,
        &std::fs::read_to_string(format!("{example}/.miren/app.toml")).unwrap(),
    );
    std::fs::copy(format!("{example}/index.ts"), dir.join("index.ts")).unwrap();
    deploy(&agent, &dir);
    let addon = addon_status(&agent, "my-bun-app", PG).expect("the addon");
    assert_eq!(addon["pooling"], "transaction", "{addon}");
    assert_eq!(
        host_port(&env(&agent, "my-bun-app")["DATABASE_URL"]).1,
        6432
    );
    let web = agent.json(&["sandbox", "status", "my-bun-app-web", "--json"]);
    let ip = web["ip"]
        .as_str()
        .expect("the service's address")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(body) = get(&ip) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the example never answered: {}",
            agent.log_text()
        );
        sleep(Duration::from_millis(200));
    };
    assert_eq!(first, "Visits: 1");
    for n in 2..=10 {
        assert_eq!(get(&ip).as_deref(), Some(format!("Visits: {n}").as_str()));
    }
    agent.ok(&["app", "delete", "my-bun-app"]);
    agent.ok(&["addon", "destroy", PG, "-a", "my-bun-app", "--yes"]);
    assert_nothing_left(&agent);

    // kill -9 at points of a small addon's creation around the pooler's (it starts once the
    // server answers: about a second in on a quiet machine, later under load).
    let mut known = BTreeSet::new();
    for (i, ms) in [800u64, 1500, 2400].into_iter().enumerate() {
        let app = format!("k{i}");
        known.insert(app.clone());
        kill_during(
            &mut agent,
            &[
                "addon",
                "create",
                PG,
                "-a",
                &app,
                "--pooling",
                "transaction",
            ],
            Duration::from_millis(ms),
        );
        converged(
            &agent,
            &mut known,
            &format!("create {app} killed at {ms} ms"),
        );
    }
    assert!(!known.is_empty(), "no addon survived a kill");
    for app in known.clone() {
        agent.ok(&["addon", "destroy", PG, "-a", &app, "--yes"]);
    }
    let left: Vec<Value> = known
        .iter()
        .filter_map(|a| addon_status(&agent, a, PG))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_nothing_left(&agent);
}
