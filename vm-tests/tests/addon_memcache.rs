//! `miren-memcache` end to end: a real Memcached server (`memcached:1.6`, Debian's memcached
//! built by `scripts/images`) on a real sandbox and endpoint, no disk and no password, reached
//! with `set`/`get` over busybox `nc` inside the app's service through the injected variables.
//! The network is its only protection, so another app failing to reach it is tested; kill -9
//! of the agent mid-way.
//!
//! The tests run when MIREN_IMAGE_MIRROR is set (`export "$(scripts/images | tail -n 1)"`).

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Output;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    active_or_gone, addon_status, agent_with_mirror, assert_nothing_left,
    assert_running_with_their_endpoints, deploy, disk_names, env, errored, exec_sh, idle_app,
    kill_during, sandbox_names, server_pid, text, wait_sandboxes_and_disks, write_app,
};
use miren_vm_tests::TestAgent;

const MEMCACHE: &str = "miren-memcache";
const IMAGE: &str = "memcached:1.6";
/// The app's services: busybox, for its `nc`.
const CLIENT_IMAGE: &str = "busybox:latest";

/// An app whose `web` service idles in busybox, so `nc` runs inside it.
fn nc_app(name: &str, with_addon: bool) -> String {
    let addon = with_addon.then_some((MEMCACHE, "variant = \"small\"\n"));
    idle_app(name, CLIENT_IMAGE, "sleep 1000000", addon)
}

/// Memcached's text protocol over busybox `nc` inside `sandbox`, to `target` (a shell word
/// such as `"$MEMCACHE_HOST" "$MEMCACHE_PORT"`); `quit` ends the session, so `nc` returns.
fn nc(agent: &TestAgent, sandbox: &str, target: &str, lines: &[&str]) -> Output {
    let mut input = String::new();
    for line in lines.iter().chain(&["quit"]) {
        input.push_str(line);
        input.push_str("\\r\\n");
    }
    exec_sh(
        agent,
        sandbox,
        &format!("printf '{input}' | timeout 5 nc {target}"),
    )
}

/// The same, to the app's own server through its injected variables; the answer.
fn app_nc(agent: &TestAgent, sandbox: &str, lines: &[&str]) -> String {
    let out = nc(
        agent,
        sandbox,
        "\"$MEMCACHE_HOST\" \"$MEMCACHE_PORT\"",
        lines,
    );
    assert!(out.status.success(), "nc {lines:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n")
}

/// `version` from the host.
fn version(host: &str) -> Result<String, String> {
    let addr = format!("{host}:11211")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut conn =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"version\r\n").map_err(|e| e.to_string())?;
    let mut got = String::new();
    let mut buf = [0u8; 256];
    while !got.contains("\r\n") {
        let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Ok(got.trim().to_string())
}

#[test]
fn memcache_through_app_toml_and_cli_answers_its_app_and_no_other() {
    let Some(agent) = agent_with_mirror(&[IMAGE, CLIENT_IMAGE]) else {
        return;
    };
    let dir = agent.root.join("cache");
    write_app(&dir, &nc_app("cache", true));
    deploy(&agent, &dir);
    let addon = addon_status(&agent, "cache", MEMCACHE).expect("the addon");
    assert_eq!(addon["status"], "active", "{addon}");
    assert_eq!(addon["variant"], "small");
    assert_eq!(addon["version"], "1.6");
    assert!(sandbox_names(&agent).contains("addon-memcache-cache"));
    assert!(
        disk_names(&agent).is_empty(),
        "Memcached keeps nothing on disk"
    );

    // The variables: nothing secret, so nothing masked.
    let shown = agent.json(&["env", "list", "-a", "cache", "--json"]);
    let vars = env(&agent, "cache");
    let host = vars["MEMCACHE_HOST"].clone();
    assert_eq!(vars["MEMCACHE_PORT"], "11211");
    assert_eq!(vars["MEMCACHE_URL"], format!("memcache://{host}:11211"));
    assert_eq!(shown["MEMCACHE_URL"], vars["MEMCACHE_URL"].as_str());

    // A real client in the app's service, with the injected host and port.
    let answer = app_nc(
        &agent,
        "cache-web",
        &["set greeting 0 0 5", "hello", "get greeting", "version"],
    );
    assert!(answer.starts_with("STORED\n"), "{answer}");
    assert!(
        answer.contains("VALUE greeting 0 5\nhello\nEND\n"),
        "{answer}"
    );
    assert!(answer.contains("VERSION 1.6."), "{answer}");

    // The image's contract: memcached as uid 11211, 64 MB.
    let pid = server_pid(&agent, "addon-memcache-cache");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.starts_with("memcached -m 64"), "{cmdline}");
    let proc_status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "11211"),
        "{uid_line}"
    );

    // The network is Memcached's only protection: another app cannot reach it at all, also
    // once it has a Memcached server of its own.
    let outsider = agent.root.join("outsider");
    write_app(&outsider, &nc_app("outsider", false));
    deploy(&agent, &outsider);
    let target = format!("{host} 11211");
    let refused = |context: &str| {
        let out = nc(&agent, "outsider-web", &target, &["get greeting"]);
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{context}: {}", text(&out));
        assert!(
            !seen.contains("hello") && !seen.contains("END"),
            "{context}: outsider reached cache's server: {}",
            text(&out)
        );
    };
    refused("without an addon");
    agent.ok(&["addon", "create", MEMCACHE, "-a", "outsider"]);
    let own = app_nc(&agent, "outsider-web", &["get greeting", "version"]);
    assert!(
        own.starts_with("END\n"),
        "another app's server has its keys: {own}"
    );
    assert!(own.contains("VERSION 1.6."), "{own}");
    assert_ne!(env(&agent, "outsider")["MEMCACHE_HOST"], host);
    refused("with its own server");
    // ... and cache's own service still gets in.
    assert!(app_nc(&agent, "cache-web", &["get greeting"]).contains("hello"));
    agent.ok(&["addon", "destroy", MEMCACHE, "-a", "outsider", "--yes"]);
    assert!(!sandbox_names(&agent).contains("addon-memcache-outsider"));

    // Destroy removes the data (the server and its memory); a new addon starts empty.
    agent.ok(&["addon", "destroy", MEMCACHE, "-a", "cache", "--yes"]);
    assert!(addon_status(&agent, "cache", MEMCACHE).is_none());
    assert!(!sandbox_names(&agent).contains("addon-memcache-cache"));
    let t = Instant::now();
    agent.ok(&["addon", "create", MEMCACHE, "-a", "cache"]);
    // Context for the bench, not asserted: the image is pulled, the disk is new.
    eprintln!("addon create to active: {:.2} s", t.elapsed().as_secs_f64());
    let answer = app_nc(&agent, "cache-web", &["get greeting"]);
    assert_eq!(answer, "END\n", "data survived destroy");
    agent.ok(&["addon", "destroy", MEMCACHE, "-a", "cache", "--yes"]);

    // Declared in app.toml, it goes with its section: server, endpoint and variables.
    deploy(&agent, &dir);
    assert_eq!(
        addon_status(&agent, "cache", MEMCACHE).expect("the addon")["status"],
        "active"
    );
    let host = env(&agent, "cache")["MEMCACHE_HOST"].clone();
    write_app(&dir, &nc_app("cache", false));
    deploy(&agent, &dir);
    assert!(addon_status(&agent, "cache", MEMCACHE).is_none());
    assert!(!sandbox_names(&agent).contains("addon-memcache-cache"));
    let out = exec_sh(&agent, "cache-web", "echo \"url=${MEMCACHE_URL:-none}\"");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "url=none",
        "{}",
        text(&out)
    );
    assert!(version(&host).is_err(), "the old server answers");

    agent.ok(&["app", "delete", "cache"]);
    agent.ok(&["app", "delete", "outsider"]);
    assert_nothing_left(&agent);
}

/// After a restart: every addon of `known` reaches `active` or is gone (dropped from
/// `known`), and the node has exactly the servers and endpoints (no disks) the survivors need,
/// each answering `version`.
fn converged(agent: &TestAgent, known: &mut BTreeSet<String>, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let poll = Duration::from_millis(50);
    known.retain(|app| active_or_gone(agent, MEMCACHE, app, deadline, poll, context, errored));
    let expected: BTreeSet<String> = known
        .iter()
        .map(|a| format!("addon-memcache-{a}"))
        .collect();
    wait_sandboxes_and_disks(agent, &expected, &BTreeSet::new(), poll, context);
    assert_running_with_their_endpoints(agent, context);
    agent.assert_converged();
    for app in known.iter() {
        let vars = env(agent, app);
        let answer = version(&vars["MEMCACHE_HOST"]);
        assert!(
            answer
                .as_deref()
                .is_ok_and(|a| a.starts_with("VERSION 1.6")),
            "{context}: {app}: {answer:?}"
        );
    }
}

#[test]
fn kill_9_during_memcache_creates_and_destroys_converges_and_leaves_nothing() {
    let Some(mut agent) = agent_with_mirror(&[IMAGE, CLIENT_IMAGE]) else {
        return;
    };
    let mut known = BTreeSet::new();
    let mut points = 0;
    // Creates cut at several points of provisioning (disk, sandbox, readiness), each
    // followed by a destroy of the oldest one cut at another point.
    let steps: [(u64, u64); 6] = [
        (0, 0),
        (60, 30),
        (250, 120),
        (700, 400),
        (1500, 900),
        (3000, 2000),
    ];
    for (i, (create_ms, destroy_ms)) in steps.into_iter().enumerate() {
        let app = format!("k{i}");
        known.insert(app.clone());
        kill_during(
            &mut agent,
            &["addon", "create", MEMCACHE, "-a", &app],
            Duration::from_millis(create_ms),
        );
        converged(
            &agent,
            &mut known,
            &format!("create {app} at {create_ms} ms"),
        );
        points += 1;
        if i % 2 == 1 {
            let victim = match known.iter().next().cloned() {
                Some(victim) => victim,
                None => {
                    // Every create so far was cut before its request arrived: make one
                    // whole, so that this destroy still has something to be cut in.
                    let spare = format!("k{i}d");
                    agent.ok(&["addon", "create", MEMCACHE, "-a", &spare]);
                    known.insert(spare.clone());
                    converged(&agent, &mut known, &format!("create {spare} whole"));
                    spare
                }
            };
            kill_during(
                &mut agent,
                &["addon", "destroy", MEMCACHE, "-a", &victim, "--yes"],
                Duration::from_millis(destroy_ms),
            );
            let context = format!("destroy {victim} at {destroy_ms} ms");
            converged(&agent, &mut known, &context);
            if known.contains(&victim) {
                // the kill came before the request
                agent.ok(&["addon", "destroy", MEMCACHE, "-a", &victim, "--yes"]);
                converged(&agent, &mut known, &context);
            }
            points += 1;
        }
    }
    // A host restart: every server is launched again (empty: it has no disk) and answers.
    agent.lose_everything_a_host_restart_loses();
    agent.spawn();
    converged(&agent, &mut known, "after a host restart");
    assert!(!known.is_empty(), "no server went through the restart");
    for app in known.clone() {
        agent.ok(&["addon", "destroy", MEMCACHE, "-a", &app, "--yes"]);
    }
    known.clear();
    converged(&agent, &mut known, "all destroyed");
    assert!(points >= 9, "only {points} kill points");
    assert_nothing_left(&agent);
}

/// Every addon's variables reach every service: an app with PostgreSQL, Valkey and Memcached
/// gets all 17, and a redeploy without the three sections removes all three servers.
#[test]
fn postgres_valkey_and_memcache_together_give_the_app_every_variable() {
    let Some(agent) = agent_with_mirror(&[IMAGE, CLIENT_IMAGE]) else {
        return;
    };
    let dir = agent.root.join("multi");
    let mut toml = nc_app("multi", true);
    toml.push_str("\n[addons.miren-postgresql]\n\n[addons.miren-valkey]\n");
    write_app(&dir, &toml);
    deploy(&agent, &dir);
    let expected = [
        "DATABASE_URL",
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
    ];
    let vars = env(&agent, "multi");
    for key in expected {
        assert!(
            vars.get(key).is_some_and(|v| !v.is_empty()),
            "{key} missing: {vars:?}"
        );
    }
    // Inside the service, each one set, with the value `env list` shows.
    let script = expected
        .iter()
        .map(|k| format!("echo \"{k}=${k}\""))
        .collect::<Vec<_>>()
        .join("; ");
    let out = exec_sh(&agent, "multi-web", &script);
    assert!(out.status.success(), "{}", text(&out));
    let seen = String::from_utf8_lossy(&out.stdout);
    for key in expected {
        assert!(
            seen.lines().any(|l| l == format!("{key}={}", vars[key])),
            "{key} in the service: {seen}"
        );
    }
    assert!(app_nc(&agent, "multi-web", &["version"]).contains("VERSION 1.6."));

    write_app(&dir, &nc_app("multi", false));
    deploy(&agent, &dir);
    let left = agent.json(&["addon", "list", "-a", "multi", "--json"]);
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");
    agent.ok(&["app", "delete", "multi"]);
    assert_nothing_left(&agent);
}
