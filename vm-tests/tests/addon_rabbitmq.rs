//! `miren-rabbitmq` end to end: a dedicated RabbitMQ server on its own disk, provisioned from
//! `.miren/app.toml` and with `miren addon create`, reached with a real AMQP client (Debian's
//! amqp-tools) from inside the app's service through the injected `RABBITMQ_URL`; durable
//! messages across server, agent and host restarts and through a disk backup and restore;
//! kill -9 of the agent during creates and destroys.
//!
//! The images come from the loopback registry of `scripts/images` (`rabbitmq:4`,
//! `miren-tests/amqp-tools:trixie`). The tests run when MIREN_IMAGE_MIRROR is set.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{
    active_or_gone, addon_status, agent_with_mirror, assert_nothing_left,
    assert_running_with_their_endpoints, deploy, disk_names, env, errored, idle_app, kill_during,
    sandbox_names, text, wait_sandboxes_and_disks, write_app,
};
use miren_vm_tests::TestAgent;
use serde_json::Value;

const MQ: &str = "miren-rabbitmq";
const CLIENT_IMAGE: &str = "miren-tests/amqp-tools:trixie";

/// An app whose `web` service idles in the amqp-tools image, so the client runs inside it.
fn client_app(name: &str, with_addon: bool) -> String {
    let addon = with_addon.then_some((MQ, "variant = \"small\"\n"));
    idle_app(name, CLIENT_IMAGE, "sleep infinity", addon)
}

/// Runs `sh -c script` in a sandbox; the output, whether it worked or not. A service that
/// is being restarted (new variables once its addon's server moved) is waited for.
fn exec_sh(agent: &TestAgent, sandbox: &str, script: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = agent.cli(&["sandbox", "exec", sandbox, "--", "sh", "-c", script]);
        let err = String::from_utf8_lossy(&out.stderr);
        // The agent's own refusals (the sandbox being replaced), not the script's failures.
        let restarting = err.contains("cannot exec in sandbox") || err.contains("no sandbox");
        if out.status.success() || !restarting || Instant::now() >= deadline {
            return out;
        }
        sleep(Duration::from_millis(100));
    }
}

fn exec_ok(agent: &TestAgent, sandbox: &str, script: &str) -> String {
    let out = exec_sh(agent, sandbox, script);
    assert!(
        out.status.success(),
        "`{script}` in {sandbox}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Declares durable `queue` and publishes `body` to it as a persistent message, from inside
/// `sandbox` with `url` (the app's `$RABBITMQ_URL` unless given).
fn publish(agent: &TestAgent, sandbox: &str, url: &str, queue: &str, body: &str) {
    exec_ok(
        agent,
        sandbox,
        &format!(
            "amqp-declare-queue --url \"{url}\" -d -q {queue} && \
             amqp-publish --url \"{url}\" -r {queue} -p -b {body}"
        ),
    );
}

/// One message consumed from `queue` (acked), from inside `sandbox`: its body, or the output
/// of a failed attempt. A server still booting (relaunched after a host restart, where its
/// addon stays active) is waited for.
fn consume_one(agent: &TestAgent, sandbox: &str, url: &str, queue: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = exec_sh(
            agent,
            sandbox,
            &format!("timeout 20 amqp-consume --url \"{url}\" -q {queue} -c 1 cat"),
        );
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        let booting = String::from_utf8_lossy(&out.stderr).contains("opening socket");
        if !booting || Instant::now() >= deadline {
            return Err(text(&out));
        }
        sleep(Duration::from_millis(200));
    }
}

/// Every message left in `queue`, taken one by one with `basic.get` from inside `sandbox`
/// (a server still booting is waited for).
fn drain(agent: &TestAgent, sandbox: &str, url: &str, queue: &str) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let mut last = String::new();
    // A deadline, not a count: a broker still starting after a host restart refuses for a
    // while, and each refusal must not use up the tries the messages need.
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let out = exec_sh(
            agent,
            sandbox,
            &format!("timeout 20 amqp-get --url \"{url}\" -q {queue}; echo \" rc=$?\""),
        );
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        last = text(&out);
        match said.trim().rsplit_once("rc=") {
            Some((body, "0")) => {
                got.insert(body.trim().to_string());
            }
            Some((_, "2")) => return got,
            _ if text(&out).contains("opening socket") => sleep(Duration::from_millis(200)),
            _ => panic!("amqp-get from {queue}: {}", text(&out)),
        }
    }
    panic!("{queue} never emptied: {got:?}; the last amqp-get: {last}");
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// How many messages `queue` holds (a passive declare), from inside `sandbox`.
fn queue_length(agent: &TestAgent, sandbox: &str, url: &str, queue: &str) -> Result<u32, String> {
    // amqp-get takes one message without consuming a stream: empty queue = exit code 2.
    let out = exec_sh(
        agent,
        sandbox,
        &format!("timeout 20 amqp-get --url \"{url}\" -q {queue} >/dev/null; echo rc=$?"),
    );
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    match s.trim() {
        "rc=0" => Ok(1),
        "rc=2" => Ok(0),
        _ => Err(text(&out)),
    }
}

fn wait_active(agent: &TestAgent, app: &str, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let a =
            addon_status(agent, app, MQ).unwrap_or_else(|| panic!("{context}: {app} has no addon"));
        if a["status"] == "active" {
            return;
        }
        assert!(
            a["status"] != "error" && Instant::now() < deadline,
            "{context}: {a}\n{}",
            agent.log_text()
        );
        sleep(Duration::from_millis(100));
    }
}

fn url_of(agent: &TestAgent, app: &str) -> String {
    env(agent, app)
        .remove("RABBITMQ_URL")
        .unwrap_or_else(|| panic!("app {app} has no RABBITMQ_URL"))
}

#[test]
fn an_app_publishes_and_consumes_and_durable_messages_survive_restarts_and_a_restore() {
    let Some(mut agent) = agent_with_mirror(&["rabbitmq:4", CLIENT_IMAGE]) else {
        return;
    };
    let dir = agent.root.join("shop");
    let toml = client_app("shop", true);
    write_app(&dir, &toml);
    let started = Instant::now();
    deploy(&agent, &dir);
    eprintln!(
        "deploy with a RabbitMQ addon: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let addon = addon_status(&agent, "shop", MQ).expect("the addon");
    assert_eq!(addon["status"], "active", "{addon}");
    assert_eq!(addon["variant"], "small");
    assert_eq!(addon["version"], "4");
    assert!(sandbox_names(&agent).contains("addon-rabbitmq-shop"));
    assert!(disk_names(&agent).contains("addon-rabbitmq-shop"));

    // The variables: secrets masked unless revealed; user and vhost `miren`.
    let masked = agent.json(&["env", "list", "-a", "shop", "--json"]);
    assert_eq!(masked["RABBITMQ_URL"], "********", "{masked}");
    assert_eq!(masked["RABBITMQ_PASSWORD"], "********", "{masked}");
    let vars = env(&agent, "shop");
    assert_eq!(vars["RABBITMQ_USER"], "miren");
    assert_eq!(vars["RABBITMQ_VHOST"], "miren");
    assert_eq!(vars["RABBITMQ_PORT"], "5672");
    let url = vars["RABBITMQ_URL"].clone();
    assert_eq!(
        url,
        format!(
            "amqp://miren:{}@{}:5672/miren",
            vars["RABBITMQ_PASSWORD"], vars["RABBITMQ_HOST"]
        )
    );

    // Inside the app's service, with the injected URL: publish, then consume.
    let out = exec_ok(
        &agent,
        "shop-web",
        "amqp-declare-queue --url \"$RABBITMQ_URL\" -q jobs >/dev/null && \
         amqp-publish --url \"$RABBITMQ_URL\" -r jobs -b job-42 && \
         timeout 20 amqp-consume --url \"$RABBITMQ_URL\" -q jobs -c 1 cat",
    );
    assert_eq!(out, "job-42");
    // A wrong password is refused.
    let wrong = url.replace(&vars["RABBITMQ_PASSWORD"], "not-the-password");
    let out = exec_sh(
        &agent,
        "shop-web",
        &format!("timeout 20 amqp-get --url '{wrong}' -q jobs"),
    );
    assert!(
        !out.status.success(),
        "a wrong password got in: {}",
        text(&out)
    );

    // Another app cannot reach the server's address at all, even with the right URL.
    let outsider = agent.root.join("outsider");
    write_app(&outsider, &client_app("outsider", false));
    deploy(&agent, &outsider);
    let out = exec_sh(
        &agent,
        "outsider-web",
        &format!("timeout 10 amqp-get --url '{url}' -q jobs; echo rc=$?"),
    );
    let said = text(&out);
    assert!(
        !said.contains("rc=0") && !said.contains("rc=2"),
        "outsider got in: {said}"
    );
    assert!(
        said.contains("rc=124")
            || said.contains("refused")
            || said.contains("unreachable")
            || said.contains("timed out"),
        "outsider failed for another reason: {said}"
    );
    agent.ok(&["app", "delete", "outsider"]);

    // A durable queue with persistent messages survives its server stopped and started
    // again in a new sandbox by the next agent (this one killed -9): the node's name is
    // fixed and its cookie is on the disk, so it finds its own database.
    publish(&agent, "shop-web", &url, "kept", "kept-1");
    publish(&agent, "shop-web", &url, "kept", "kept-2");
    agent.ok(&["sandbox", "stop", "addon-rabbitmq-shop"]);
    agent.ok(&["sandbox", "delete", "addon-rabbitmq-shop"]);
    agent.kill9();
    agent.spawn();
    wait_active(&agent, "shop", "after the server was stopped and deleted");
    let url = url_of(&agent, "shop");
    assert_eq!(
        consume_one(&agent, "shop-web", &url, "kept").unwrap(),
        "kept-1"
    );

    // A crash of the server (its sandbox killed) once the broker wrote the message out.
    // Without publisher confirms (amqp-publish has none) that is the broker's idle flush;
    // acks are written lazily too, so a consumed message may come again (at least once).
    publish(&agent, "shop-web", &url, "kept", "crash-1");
    wait_on_disk(&agent, "addon-rabbitmq-shop", "crash-1");
    agent.ok(&["sandbox", "delete", "addon-rabbitmq-shop"]);
    agent.kill9();
    agent.spawn();
    wait_active(&agent, "shop", "after the server was killed");
    let url = url_of(&agent, "shop");
    let got = drain(&agent, "shop-web", &url, "kept");
    assert!(
        got.contains("kept-2")
            && got.contains("crash-1")
            && got.is_subset(&set(&["kept-1", "kept-2", "crash-1"])),
        "after the crash: {got:?}"
    );

    // And a host restart (every process and mount gone).
    publish(&agent, "shop-web", &url, "kept", "host-1");
    wait_on_disk(&agent, "addon-rabbitmq-shop", "host-1");
    agent.lose_everything_a_host_restart_loses();
    agent.spawn();
    wait_active(&agent, "shop", "after a host restart");
    wait_running(&agent, "shop-web");
    let url = url_of(&agent, "shop");
    let got = drain(&agent, "shop-web", &url, "kept");
    assert!(
        got.contains("host-1") && got.is_subset(&set(&["kept-1", "kept-2", "crash-1", "host-1"])),
        "after the host restart: {got:?}"
    );

    // A backup of the disk while the server runs; the message is then consumed, and a
    // restore of the disk brings it back.
    publish(&agent, "shop-web", &url, "saved", "backed-up");
    // The backup freezes the filesystem and so takes what the broker has written: the
    // message, and the new queue's declaration.
    wait_on_disk(&agent, "addon-rabbitmq-shop", "backed-up");
    wait_for_queue_on_disk(&agent, "addon-rabbitmq-shop", "saved");
    let snapshot = agent.root.join("mq.miren.zst");
    agent.ok(&[
        "disk",
        "backup",
        "-n",
        "addon-rabbitmq-shop",
        "-o",
        snapshot.to_str().unwrap(),
    ]);
    assert_eq!(
        consume_one(&agent, "shop-web", &url, "saved").unwrap(),
        "backed-up"
    );
    assert_eq!(queue_length(&agent, "shop-web", &url, "saved").unwrap(), 0);
    // A restore replaces a disk no sandbox holds: the server goes, the next agent starts
    // it again on the restored disk.
    agent.ok(&["sandbox", "stop", "addon-rabbitmq-shop"]);
    agent.ok(&["sandbox", "delete", "addon-rabbitmq-shop"]);
    agent.ok(&[
        "disk",
        "restore",
        "-s",
        snapshot.to_str().unwrap(),
        "--force",
    ]);
    agent.kill9();
    agent.spawn();
    wait_active(&agent, "shop", "after the restore");
    let url = url_of(&agent, "shop");
    assert_eq!(
        consume_one(&agent, "shop-web", &url, "saved").unwrap(),
        "backed-up"
    );

    // A redeploy without the section deprovisions: server, disk and variables go.
    write_app(&dir, &client_app("shop", false));
    deploy(&agent, &dir);
    assert!(addon_status(&agent, "shop", MQ).is_none());
    assert!(!sandbox_names(&agent).contains("addon-rabbitmq-shop"));
    assert!(!disk_names(&agent).contains("addon-rabbitmq-shop"));
    let out = exec_ok(&agent, "shop-web", "echo \"url=${RABBITMQ_URL:-none}\"");
    assert_eq!(out, "url=none");

    // Made with the CLI: a new, empty server (the durable queue is gone with the old disk).
    agent.ok(&["addon", "create", MQ, "-a", "shop"]);
    wait_active(&agent, "shop", "addon create");
    wait_running(&agent, "shop-web");
    let out = exec_sh(
        &agent,
        "shop-web",
        "timeout 20 amqp-get --url \"$RABBITMQ_URL\" -q saved",
    );
    assert!(
        !out.status.success() && text(&out).contains("NOT_FOUND"),
        "the old queue came back: {}",
        text(&out)
    );

    // Destroy removes the data: disk gone.
    let destroyed = agent.ok(&["addon", "destroy", MQ, "-a", "shop", "--yes"]);
    assert!(destroyed.contains("deleted"), "{destroyed}");
    assert!(addon_status(&agent, "shop", MQ).is_none());
    assert!(!disk_names(&agent).contains("addon-rabbitmq-shop"));
    assert!(!sandbox_names(&agent).contains("addon-rabbitmq-shop"));
    agent.ok(&["app", "delete", "shop"]);
    assert_nothing_left(&agent);
    eprintln!("whole test: {:.0}s", started.elapsed().as_secs_f64());
}

/// Waits until `body` is in a file of the server's database on `disk` (seen from the host,
/// which shares the page cache): the broker wrote the message out of its buffers.
fn wait_on_disk(agent: &TestAgent, disk: &str, body: &str) {
    wait_in_files(agent, disk, body, |_| true);
}

/// Waits until the broker's metadata store (Mnesia's transaction log and table files) names
/// `queue`: a durable queue's declaration is logged by Mnesia asynchronously, so its messages
/// can be on disk before the queue is, and a snapshot taken in between restores messages of a
/// queue that does not exist.
fn wait_for_queue_on_disk(agent: &TestAgent, disk: &str, queue: &str) {
    wait_in_files(agent, disk, queue, |path| {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "LOG" | "DCD" | "DCL"))
    });
}

/// Waits until a file under the disk's `mnesia` directory that `wanted` accepts holds `body`.
fn wait_in_files(agent: &TestAgent, disk: &str, body: &str, wanted: fn(&Path) -> bool) {
    let disks = agent.json(&["debug", "disk", "list", "--json"]);
    let mount = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == disk)
        .and_then(|d| d["mount_path"].as_str())
        .unwrap_or_else(|| panic!("disk {disk} is not mounted: {disks}"))
        .to_string();
    let root = Path::new(&mount).join("mnesia");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir_contains(&root, body.as_bytes(), wanted) {
        assert!(
            Instant::now() < deadline,
            "the broker never wrote {body} to {}",
            root.display()
        );
        sleep(Duration::from_millis(100));
    }
}

fn dir_contains(dir: &Path, needle: &[u8], wanted: fn(&Path) -> bool) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => dir_contains(&path, needle, wanted),
            Ok(t) if t.is_file() && wanted(&path) => fs::read(&path)
                .map(|data| data.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false),
            _ => false,
        }
    })
}

/// Waits until `sandbox` runs (a service restarted with new variables, or after a restart).
fn wait_running(agent: &TestAgent, sandbox: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = agent.cli(&["sandbox", "status", sandbox, "--json"]);
        if s.status.success() {
            let v: Value = serde_json::from_slice(&s.stdout).unwrap_or(Value::Null);
            if v["state"] == "running" {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{sandbox} never ran: {}",
            text(&s)
        );
        sleep(Duration::from_millis(100));
    }
}

/// After a restart: every app of `known` has its addon active (or it is gone, and dropped
/// from `known`), and the node has exactly one server sandbox and disk per survivor, running,
/// with endpoints that are exactly the sandboxes'.
fn converged(agent: &TestAgent, known: &mut BTreeSet<String>, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let poll = Duration::from_millis(100);
    known.retain(|app| active_or_gone(agent, MQ, app, deadline, poll, context, errored));
    let expected: BTreeSet<String> = known
        .iter()
        .map(|a| format!("addon-rabbitmq-{a}"))
        .collect();
    wait_sandboxes_and_disks(agent, &expected, &expected, poll, context);
    assert_running_with_their_endpoints(agent, context);
    agent.assert_converged();
    for app in known.iter() {
        let vars = env(agent, app);
        assert_eq!(vars["RABBITMQ_VHOST"], "miren", "{context}: {app}");
    }
}

#[test]
fn kill_9_during_creates_and_destroys_converges_and_leaves_nothing() {
    let Some(mut agent) = agent_with_mirror(&["rabbitmq:4", CLIENT_IMAGE]) else {
        return;
    };
    let started = Instant::now();
    let mut known = BTreeSet::new();
    let mut points = 0;
    // Creates cut at several depths: before the request, while the disk and sandbox are
    // made, during the server's first boot.
    for (i, ms) in [0u64, 60, 150, 300, 700, 1500, 3000, 5000]
        .iter()
        .enumerate()
    {
        let app = format!("k{i}");
        known.insert(app.clone());
        kill_during(
            &mut agent,
            &["addon", "create", MQ, "-a", &app],
            Duration::from_millis(*ms),
        );
        let context = format!("kill {i} (create {app}, {ms} ms)");
        converged(&agent, &mut known, &context);
        points += 1;
        eprintln!(
            "{context}: converged at {:.0}s; {} addons",
            started.elapsed().as_secs_f64(),
            known.len()
        );
    }
    // A server made by a killed create answers AMQP from an app of its own.
    let app = known.iter().next().cloned().expect("an addon survived");
    let dir = agent.root.join(&app);
    write_app(&dir, &client_app(&app, true));
    deploy(&agent, &dir);
    let out = exec_ok(
        &agent,
        &format!("{app}-web"),
        "amqp-declare-queue --url \"$RABBITMQ_URL\" -q q1 >/dev/null && \
         amqp-publish --url \"$RABBITMQ_URL\" -r q1 -b after-kill && \
         timeout 20 amqp-consume --url \"$RABBITMQ_URL\" -q q1 -c 1 cat",
    );
    assert_eq!(out, "after-kill");
    agent.ok(&["app", "delete", &app]);

    // Destroys cut at several depths.
    let delays = [0u64, 40, 150, 400, 1000, 80, 250];
    let mut i = 0;
    while let Some(app) = known.iter().next().cloned() {
        let ms = delays[i % delays.len()];
        kill_during(
            &mut agent,
            &["addon", "destroy", MQ, "-a", &app, "--yes"],
            Duration::from_millis(ms),
        );
        let context = format!("final kill {i} (destroy {app}, {ms} ms)");
        converged(&agent, &mut known, &context);
        if known.contains(&app) {
            // The kill came before the request: destroy it for good.
            agent.ok(&["addon", "destroy", MQ, "-a", &app, "--yes"]);
            converged(&agent, &mut known, &context);
        }
        assert!(!known.contains(&app));
        points += 1;
        i += 1;
    }
    assert!(points >= 12, "only {points} kill points");
    assert_nothing_left(&agent);
    eprintln!(
        "{points} kill points in {:.0}s",
        started.elapsed().as_secs_f64()
    );
}
