//! `miren-valkey` end to end: a real Valkey server (`valkey/valkey:8`, Debian's valkey-server
//! built by `scripts/images`) on a real sandbox, disk and endpoint, reached by `valkey-cli`
//! inside the app's service through the injected `VALKEY_URL`; durability across a SIGKILL of
//! the server; a backup of its disk while in use, restored; kill -9 of the agent mid-way.
//!
//! The tests run when MIREN_IMAGE_MIRROR is set (`export "$(scripts/images | tail -n 1)"`).

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    active_or_gone, addon_status, agent_with_mirror, assert_nothing_left,
    assert_running_with_their_endpoints, deploy, disk_names, env, errored, exec_sh, idle_app,
    kill_during, sandbox_names, server_pid, stdout, text, wait_sandboxes_and_disks, write_app,
};
use miren_vm_tests::TestAgent;

const VALKEY: &str = "miren-valkey";
const IMAGE: &str = "valkey/valkey:8";

/// An app whose `web` service idles in the valkey image, so `valkey-cli` runs inside it.
fn cli_app(name: &str, with_addon: bool) -> String {
    let addon = with_addon.then_some((VALKEY, "variant = \"small\"\n"));
    idle_app(name, IMAGE, "sleep infinity", addon)
}

/// `valkey-cli -u "$VALKEY_URL" ARGS` inside the app's service; its trimmed output.
fn app_cli(agent: &TestAgent, sandbox: &str, args: &str) -> String {
    let out = exec_sh(
        agent,
        sandbox,
        &format!("valkey-cli --no-auth-warning -u \"$VALKEY_URL\" {args}"),
    );
    assert!(out.status.success(), "valkey-cli {args}: {}", text(&out));
    stdout(&out)
}

/// Runs `args` in the service until the answer is `expected` (the server may be restarting).
fn eventually(agent: &TestAgent, sandbox: &str, args: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = exec_sh(
            agent,
            sandbox,
            &format!("valkey-cli --no-auth-warning -u \"$VALKEY_URL\" {args}"),
        );
        if out.status.success() && stdout(&out) == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{args}` in {sandbox} never gave {expected}: {}\n{}",
            text(&out),
            agent.log_text()
        );
        sleep(Duration::from_millis(200));
    }
}

/// RESP from the host: `AUTH password`, `commands`, `QUIT`; everything the server answered
/// (it closes the connection after `QUIT`).
fn resp(host: &str, password: &str, commands: &[&[&str]]) -> Result<String, String> {
    let addr = format!("{host}:6379").parse().map_err(|e| format!("{e}"))?;
    let mut conn =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut request = String::new();
    for command in [&["AUTH", password][..]]
        .iter()
        .chain(commands)
        .chain(&[&["QUIT"][..]])
    {
        request.push_str(&format!("*{}\r\n", command.len()));
        for arg in command.iter() {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
    }
    conn.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut got = String::new();
    conn.read_to_string(&mut got).map_err(|e| e.to_string())?;
    Ok(got)
}

#[test]
fn valkey_through_app_toml_and_cli_keeps_acked_writes_backs_up_and_admits_only_its_app() {
    let Some(agent) = agent_with_mirror(&[IMAGE]) else {
        return;
    };
    let dir = agent.root.join("shop");
    let toml = cli_app("shop", true);
    write_app(&dir, &toml);
    deploy(&agent, &dir);
    let addon = addon_status(&agent, "shop", VALKEY).expect("the addon");
    assert_eq!(addon["status"], "active", "{addon}");
    assert_eq!(addon["variant"], "small");
    assert_eq!(addon["version"], "8");
    assert!(sandbox_names(&agent).contains("addon-valkey-shop"));
    assert!(disk_names(&agent).contains("addon-valkey-shop"));

    // The variables: secrets masked unless revealed, the REDIS_ names equal to the VALKEY_ ones.
    let masked = agent.json(&["env", "list", "-a", "shop", "--json"]);
    for key in [
        "VALKEY_URL",
        "VALKEY_PASSWORD",
        "REDIS_URL",
        "REDIS_PASSWORD",
    ] {
        assert_eq!(masked[key], "********", "{key}: {masked}");
    }
    let vars = env(&agent, "shop");
    for suffix in ["URL", "HOST", "PORT", "PASSWORD"] {
        assert_eq!(
            vars[&format!("VALKEY_{suffix}")],
            vars[&format!("REDIS_{suffix}")]
        );
    }
    let password = vars["VALKEY_PASSWORD"].clone();
    let host = vars["VALKEY_HOST"].clone();
    assert_eq!(vars["VALKEY_PORT"], "6379");
    assert_eq!(password.len(), 32);
    assert_eq!(
        vars["VALKEY_URL"],
        format!("redis://:{password}@{host}:6379")
    );

    // A real client in the app's service, with the injected URL (and the REDIS_ one).
    assert_eq!(app_cli(&agent, "shop-web", "SET greeting hello"), "OK");
    assert_eq!(app_cli(&agent, "shop-web", "GET greeting"), "hello");
    let out = exec_sh(
        &agent,
        "shop-web",
        "valkey-cli --no-auth-warning -u \"$REDIS_URL\" GET greeting",
    );
    assert_eq!(stdout(&out), "hello", "{}", text(&out));
    // A password is required, and the right one.
    let out = exec_sh(
        &agent,
        "shop-web",
        "valkey-cli -h \"$VALKEY_HOST\" GET greeting",
    );
    assert!(stdout(&out).contains("NOAUTH"), "{}", text(&out));
    let out = exec_sh(
        &agent,
        "shop-web",
        "valkey-cli --no-auth-warning -u \"redis://:wrong@$VALKEY_HOST:6379\" GET greeting",
    );
    assert!(!stdout(&out).contains("hello"), "{}", text(&out));
    assert!(
        text(&out).contains("WRONGPASS") || text(&out).contains("AUTH failed"),
        "{}",
        text(&out)
    );
    // The append-only file, fsynced every second, on the disk at /data.
    assert_eq!(
        app_cli(&agent, "shop-web", "CONFIG GET appendonly"),
        "appendonly\nyes"
    );
    assert_eq!(
        app_cli(&agent, "shop-web", "CONFIG GET appendfsync"),
        "appendfsync\neverysec"
    );
    assert_eq!(app_cli(&agent, "shop-web", "CONFIG GET dir"), "dir\n/data");

    // The password is on no command line and not in the server's environment; the server
    // runs as the image's valkey user (uid 999).
    let pid = server_pid(&agent, "addon-valkey-shop");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("valkey-server"), "{cmdline}");
    assert!(!cmdline.contains(&password), "the password is on argv");
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains(&password),
        "the password is in the server's environment"
    );
    let proc_status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<&str> = uid_line.split_whitespace().skip(1).collect();
    assert!(uids.iter().all(|u| *u != "0"), "runs as root: {uid_line}");

    // Durability: an acked write survives a SIGKILL of the server, which its restart policy
    // brings back on the same disk.
    assert_eq!(app_cli(&agent, "shop-web", "SET durable survives"), "OK");
    let before = agent.json(&["sandbox", "status", "addon-valkey-shop", "--json"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = agent.json(&["sandbox", "status", "addon-valkey-shop", "--json"]);
        if now["restarts"].as_u64() > before["restarts"].as_u64() && now["state"] == "running" {
            assert_eq!(now["id"], before["id"], "replaced, not restarted: {now}");
            break;
        }
        assert!(Instant::now() < deadline, "never restarted: {now}");
        sleep(Duration::from_millis(50));
    }
    eventually(&agent, "shop-web", "GET durable", "survives");
    assert_ne!(server_pid(&agent, "addon-valkey-shop"), pid);

    // Another app cannot reach the server at all, even with the right password.
    let outsider = agent.root.join("outsider");
    write_app(&outsider, &cli_app("outsider", false));
    deploy(&agent, &outsider);
    let out = exec_sh(
        &agent,
        "outsider-web",
        &format!(
            "timeout 5 valkey-cli --no-auth-warning -u '{}' GET durable",
            vars["VALKEY_URL"]
        ),
    );
    assert!(!out.status.success(), "outsider got in: {}", text(&out));
    assert!(!stdout(&out).contains("survives"), "{}", text(&out));
    assert_eq!(app_cli(&agent, "shop-web", "GET durable"), "survives");

    // A backup of the disk while the server runs.
    let backup = agent.root.join("valkey.miren.zst");
    agent.ok(&[
        "disk",
        "backup",
        "-n",
        "addon-valkey-shop",
        "-o",
        backup.to_str().unwrap(),
    ]);
    assert_eq!(
        app_cli(&agent, "shop-web", "SET durable after-backup"),
        "OK"
    );

    // Destroy removes the data: disk gone, and a new addon starts empty.
    agent.ok(&["addon", "destroy", VALKEY, "-a", "shop", "--yes"]);
    assert!(addon_status(&agent, "shop", VALKEY).is_none());
    assert!(!disk_names(&agent).contains("addon-valkey-shop"));
    assert!(!sandbox_names(&agent).contains("addon-valkey-shop"));
    let t = Instant::now();
    agent.ok(&["addon", "create", VALKEY, "-a", "shop"]);
    // Context for the bench, not asserted: the image is pulled, the disk is new.
    eprintln!("addon create to active: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(app_cli(&agent, "shop-web", "EXISTS durable"), "0");
    assert_ne!(env(&agent, "shop")["VALKEY_PASSWORD"], password);

    // Restored: the backup becomes the addon's disk (adopted by name), the key comes back.
    agent.ok(&["addon", "destroy", VALKEY, "-a", "shop", "--yes"]);
    agent.ok(&[
        "disk",
        "restore",
        "-s",
        backup.to_str().unwrap(),
        "-n",
        "addon-valkey-shop",
    ]);
    agent.ok(&["addon", "create", VALKEY, "-a", "shop"]);
    eventually(&agent, "shop-web", "GET durable", "survives");
    assert_eq!(app_cli(&agent, "shop-web", "GET greeting"), "hello");

    // An addon made with `addon create` is the operator's: a deploy leaves it alone.
    deploy(&agent, &dir);
    assert_eq!(app_cli(&agent, "shop-web", "GET durable"), "survives");
    agent.ok(&["addon", "destroy", VALKEY, "-a", "shop", "--yes"]);

    // One declared in app.toml goes with its section: server, disk and variables.
    deploy(&agent, &dir);
    assert_eq!(app_cli(&agent, "shop-web", "EXISTS durable"), "0");
    let url = env(&agent, "shop")["VALKEY_URL"].clone();
    write_app(&dir, &cli_app("shop", false));
    deploy(&agent, &dir);
    assert!(addon_status(&agent, "shop", VALKEY).is_none());
    assert!(!sandbox_names(&agent).contains("addon-valkey-shop"));
    assert!(!disk_names(&agent).contains("addon-valkey-shop"));
    let out = exec_sh(&agent, "shop-web", "echo \"url=${VALKEY_URL:-none}\"");
    assert_eq!(stdout(&out), "url=none", "{}", text(&out));
    let out = exec_sh(
        &agent,
        "shop-web",
        &format!("timeout 5 valkey-cli --no-auth-warning -u '{url}' PING"),
    );
    assert!(!stdout(&out).contains("PONG"), "the old server answers");

    agent.ok(&["app", "delete", "shop"]);
    agent.ok(&["app", "delete", "outsider"]);
    assert_nothing_left(&agent);
}

/// After a restart: every addon of `known` reaches `active` or is gone (dropped from
/// `known`), and the node has exactly the servers, disks and endpoints the survivors need,
/// each answering `AUTH` + `PING` with its app's password.
fn converged(agent: &TestAgent, known: &mut BTreeSet<String>, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let poll = Duration::from_millis(50);
    known.retain(|app| active_or_gone(agent, VALKEY, app, deadline, poll, context, errored));
    let expected: BTreeSet<String> = known.iter().map(|a| format!("addon-valkey-{a}")).collect();
    wait_sandboxes_and_disks(agent, &expected, &expected, poll, context);
    assert_running_with_their_endpoints(agent, context);
    agent.assert_converged();
    for app in known.iter() {
        let vars = env(agent, app);
        let answer = resp(&vars["VALKEY_HOST"], &vars["VALKEY_PASSWORD"], &[&["PING"]]);
        assert_eq!(
            answer.as_deref(),
            Ok("+OK\r\n+PONG\r\n+OK\r\n"),
            "{context}: {app}"
        );
    }
}

#[test]
fn kill_9_during_valkey_creates_and_destroys_converges_and_leaves_nothing() {
    let Some(mut agent) = agent_with_mirror(&[IMAGE]) else {
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
            &["addon", "create", VALKEY, "-a", &app],
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
                    agent.ok(&["addon", "create", VALKEY, "-a", &spare]);
                    known.insert(spare.clone());
                    converged(&agent, &mut known, &format!("create {spare} whole"));
                    spare
                }
            };
            kill_during(
                &mut agent,
                &["addon", "destroy", VALKEY, "-a", &victim, "--yes"],
                Duration::from_millis(destroy_ms),
            );
            let context = format!("destroy {victim} at {destroy_ms} ms");
            converged(&agent, &mut known, &context);
            if known.contains(&victim) {
                // the kill came before the request
                agent.ok(&["addon", "destroy", VALKEY, "-a", &victim, "--yes"]);
                converged(&agent, &mut known, &context);
            }
            points += 1;
        }
    }
    // A host restart: every server is launched again on its disk, its keys there.
    let survivor = known.iter().next().cloned().expect("a survivor");
    let vars = env(&agent, &survivor);
    let set = resp(
        &vars["VALKEY_HOST"],
        &vars["VALKEY_PASSWORD"],
        &[&["SET", "kept", "across the restart"]],
    );
    assert_eq!(set.as_deref(), Ok("+OK\r\n+OK\r\n+OK\r\n"));
    agent.lose_everything_a_host_restart_loses();
    agent.spawn();
    converged(&agent, &mut known, "after a host restart");
    let vars = env(&agent, &survivor);
    let got = resp(
        &vars["VALKEY_HOST"],
        &vars["VALKEY_PASSWORD"],
        &[&["GET", "kept"]],
    );
    assert_eq!(
        got.as_deref(),
        Ok("+OK\r\n$18\r\nacross the restart\r\n+OK\r\n")
    );
    for app in known.clone() {
        agent.ok(&["addon", "destroy", VALKEY, "-a", &app, "--yes"]);
    }
    known.clear();
    converged(&agent, &mut known, "all destroyed");
    assert!(points >= 9, "only {points} kill points");
    assert_nothing_left(&agent);
}
