//! Helpers shared by the addon tests (`tests/addon*.rs`): agents that pull through the test
//! mirror, the CLI's addon, env, sandbox and disk lists, app.toml files, kill -9 mid-command,
//! and the checks that the node converged or has nothing left. What is specific to one kind
//! (its client, its server's tenants) stays in that kind's test file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{ChildGuard, TestAgent};

/// An agent that pulls through the test mirror, with `images` already pulled; None (and the
/// test skipped) without a mirror.
pub fn agent_with_mirror(images: &[&str]) -> Option<TestAgent> {
    let mirror = crate::image_mirror()?;
    let agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .start();
    for image in images {
        agent.ok(&["image", "pull", image]);
    }
    Some(agent)
}

/// A command's exit code, stdout and stderr, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A command's stdout, trimmed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The app's addons as `addon list --json` shows them.
pub fn addons(agent: &TestAgent, app: &str) -> Vec<Value> {
    agent
        .json(&["addon", "list", "-a", app, "--json"])
        .as_array()
        .expect("addon list is an array")
        .clone()
}

/// The app's addon of `kind` (e.g. `miren-valkey`) as `addon list --json` shows it; None when
/// it has none.
pub fn addon_status(agent: &TestAgent, app: &str, kind: &str) -> Option<Value> {
    addons(agent, app).into_iter().find(|a| a["name"] == kind)
}

/// `env list --reveal --json`: names to values.
pub fn env(agent: &TestAgent, app: &str) -> BTreeMap<String, String> {
    let v = agent.json(&["env", "list", "-a", app, "--json", "--reveal"]);
    v.as_object()
        .expect("env list is an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string value").to_string()))
        .collect()
}

/// The `name`s of a JSON list.
pub fn names(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .expect("an array")
        .iter()
        .map(|x| x["name"].as_str().expect("name").to_string())
        .collect()
}

/// `sandbox list --json`.
pub fn sandboxes(agent: &TestAgent) -> Value {
    agent.json(&["sandbox", "list", "--json"])
}

pub fn sandbox_names(agent: &TestAgent) -> BTreeSet<String> {
    names(&sandboxes(agent))
}

pub fn disk_names(agent: &TestAgent) -> BTreeSet<String> {
    names(&agent.json(&["debug", "disk", "list", "--json"]))
}

/// Polls `f` every 50 ms until it holds; panics after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

/// Writes `<dir>/.miren/app.toml`.
pub fn write_app(dir: &Path, toml: &str) {
    fs::create_dir_all(dir.join(".miren")).unwrap();
    fs::write(dir.join(".miren/app.toml"), toml).unwrap();
}

/// An app.toml whose `web` service runs `command` in `image` (a client's image, idling), with
/// an `[addons.<kind>]` section holding `settings` (lines such as `variant = "small"`) if
/// `addon` is `Some((kind, settings))`.
pub fn idle_app(name: &str, image: &str, command: &str, addon: Option<(&str, &str)>) -> String {
    let mut toml = format!(
        "name = \"{name}\"\n\n[services.web]\nimage = \"{image}\"\ncommand = \"{command}\"\n"
    );
    if let Some((kind, settings)) = addon {
        toml.push_str(&format!("\n[addons.{kind}]\n{settings}"));
    }
    toml
}

/// `miren deploy -C dir`; its stdout.
pub fn deploy(agent: &TestAgent, dir: &Path) -> String {
    agent.ok(&["deploy", "-C", dir.to_str().unwrap()])
}

/// Runs `sh -c script` in a sandbox; the output, whether it worked or not.
pub fn exec_sh(agent: &TestAgent, sandbox: &str, script: &str) -> Output {
    agent.cli(&["sandbox", "exec", sandbox, "--", "sh", "-c", script])
}

/// The pid of `sandbox`'s process, from `sandbox status`.
pub fn server_pid(agent: &TestAgent, sandbox: &str) -> i32 {
    let s = agent.json(&["sandbox", "status", sandbox, "--json"]);
    s["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{sandbox} has no pid: {s}")) as i32
}

/// Nothing of any addon or app is left: no sandbox, disk, loop device, mount, endpoint.
pub fn assert_nothing_left(agent: &TestAgent) {
    assert!(
        sandbox_names(agent).is_empty(),
        "sandboxes left: {}",
        sandboxes(agent)
    );
    assert!(
        disk_names(agent).is_empty(),
        "disks left: {:?}",
        disk_names(agent)
    );
    let endpoints = agent.json(&["debug", "net", "list", "--json"]);
    assert!(
        endpoints.as_array().unwrap().is_empty(),
        "endpoints left: {endpoints}"
    );
    let loops = miren_disks::loops_under(&agent.images_dir()).unwrap();
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
    agent.assert_converged();
}

/// Waits up to 30 s until the shared server `sandbox` (and its disk of that name) is gone.
pub fn shared_server_gone(agent: &TestAgent, sandbox: &str) {
    wait_for("the shared server to go", Duration::from_secs(30), || {
        !sandbox_names(agent).contains(sandbox) && !disk_names(agent).contains(sandbox)
    });
}

/// Issues the command, kills the agent `delay` later, waits for the client to notice, and
/// starts the agent again on the same data dir.
pub fn kill_during(agent: &mut TestAgent, args: &[impl AsRef<str>], delay: Duration) {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let mut client = ChildGuard(agent.spawn_cli(&args));
    sleep(delay);
    agent.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
    drop(client);
    agent.spawn();
}

/// An addon that `addon list` shows in `error`.
pub fn errored(addon: &Value) -> bool {
    addon["status"] == "error"
}

/// For [`converged`]-style checks after a restart: polls (every `poll`) `app`'s addon of
/// `kind` until it is active (true) or gone (false); panics if `failed` says it ended badly,
/// or at `deadline`.
pub fn active_or_gone(
    agent: &TestAgent,
    kind: &str,
    app: &str,
    deadline: Instant,
    poll: Duration,
    context: &str,
    failed: impl Fn(&Value) -> bool,
) -> bool {
    loop {
        match addon_status(agent, app, kind) {
            None => return false,
            Some(a) if a["status"] == "active" => return true,
            Some(a) if failed(&a) => {
                panic!("{context}: {app} ended in error: {a}\n{}", agent.log_text())
            }
            Some(a) => assert!(
                Instant::now() < deadline,
                "{context}: {app} stuck: {a}\n{}",
                agent.log_text()
            ),
        }
        sleep(poll);
    }
}

/// Polls (every `poll`, up to 30 s) until the node's sandboxes and disks are exactly the
/// expected names.
pub fn wait_sandboxes_and_disks(
    agent: &TestAgent,
    sandboxes: &BTreeSet<String>,
    disks: &BTreeSet<String>,
    poll: Duration,
    context: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, d) = (sandbox_names(agent), disk_names(agent));
        if &s == sandboxes && &d == disks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: sandboxes {s:?} and disks {d:?}, expected {sandboxes:?} and {disks:?}"
        );
        sleep(poll);
    }
}

/// Every sandbox runs and the endpoints are exactly the sandboxes'; returns the endpoints.
pub fn assert_running_with_their_endpoints(agent: &TestAgent, context: &str) -> Vec<Value> {
    let ids: BTreeSet<String> = sandboxes(agent)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["state"], "running", "{context}: {s}");
            s["id"].as_str().unwrap().to_string()
        })
        .collect();
    let endpoints = agent.json(&["debug", "net", "list", "--json"]);
    let endpoints = endpoints.as_array().unwrap().clone();
    let owners: BTreeSet<String> = endpoints
        .iter()
        .map(|e| e["owner"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(owners, ids, "{context}: endpoints are not the sandboxes'");
    endpoints
}

/// `psql URL -tAc SQL` from the host (the agent's host reaches its addon servers and poolers).
pub fn psql(url: &str, sql: &str) -> Output {
    Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .output()
        .expect("psql (apt-get install postgresql-client)")
}

/// [`psql`] that must succeed; its output, trimmed.
pub fn psql_ok(url: &str, sql: &str) -> String {
    let out = psql(url, sql);
    assert!(out.status.success(), "psql {sql:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
