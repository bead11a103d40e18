//! Redeploys beside the serving sandbox: a client making a request every 10 ms through the
//! published port sees none fail; a version failing its health check is removed and the old
//! one keeps serving; a service with a leased disk is replaced stop-then-start; the agent
//! killed at each phase of a switch leaves exactly one version serving after restart.
//!
//! The service is `busybox:1.35` (scripts/images) running `httpd`, serving its `VERSION`.
//! The tests run when MIREN_IMAGE_MIRROR is set (scripts/test sets it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{agent_with_mirror, text, write_app};
use miren_vm_tests::{image_mirror, TestAgent};
use serde_json::Value;

const IMAGE: &str = "busybox:1.35";

/// app.toml of app `name`: `web` serves `version` on port 3000 (checked with `GET /`), with
/// `extra` appended to the service (e.g. disks), and `health` replacing the default check.
fn app_toml(name: &str, version: &str, health: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"

[services.web]
image = "{IMAGE}"
command = "trap 'exit 0' TERM; mkdir -p /www; rm -f /www/sick; echo {version} > /www/index.html; httpd -f -p 3000 -h /www & wait"
{extra}
[[services.web.env]]
key = "PORT"
value = "3000"

[services.web.health]
{health}
"#
    )
}

const GOOD_CHECK: &str = "http = \"/\"\ninterval = \"1s\"\nstart_period = \"5s\"\n";

fn deploy(agent: &TestAgent, dir: &Path, port: u16) -> std::process::Output {
    agent.cli(&[
        "deploy",
        "-C",
        dir.to_str().unwrap(),
        "--publish",
        &format!("{port}:3000"),
    ])
}

/// One HTTP/1.0 GET of `/` on 127.0.0.1:`port`: the body on a 200.
fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    match out.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.trim().to_string())
        }
        _ => Err(format!("answer: {out:?}")),
    }
}

/// A client making a request every 10 ms until stopped: the failures and the versions seen.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, f, v) = (stop.clone(), failures.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                match get(port) {
                    Ok(body) => {
                        let mut v = v.lock().unwrap();
                        if v.last() != Some(&body) {
                            v.push(body);
                        }
                    }
                    Err(e) => f.lock().unwrap().push(e),
                }
                n += 1;
                sleep(Duration::from_millis(10));
            }
            n
        });
        Load {
            stop,
            failures,
            seen,
            thread: Some(thread),
        }
    }

    /// (requests, failures, versions seen in order).
    fn finish(mut self) -> (u32, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.thread.take().unwrap().join().unwrap();
        (
            n,
            self.failures.lock().unwrap().clone(),
            self.seen.lock().unwrap().clone(),
        )
    }
}

fn status(agent: &TestAgent, app: &str) -> Value {
    agent.json(&["app", "status", app, "--json"])
}

fn app_sandboxes(agent: &TestAgent, app: &str) -> Vec<Value> {
    agent
        .json(&["sandbox", "list", "--json"])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["app"] == app)
        .collect()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(100));
    }
}

fn port_for(n: u16) -> u16 {
    24000 + n * 1000 + (std::process::id() % 1000) as u16
}

#[test]
fn redeploys_under_load_fail_no_request_and_an_unhealthy_version_leaves_the_old_serving() {
    let Some(agent) = agent_with_mirror(&[IMAGE]) else {
        return;
    };
    let dir = agent.root.join("shop");
    let port = port_for(0);
    write_app(&dir, &app_toml("shop", "v1", GOOD_CHECK, ""));
    let out = deploy(&agent, &dir, port);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(get(port).as_deref(), Ok("v1"));
    wait_for("v1 healthy", || {
        status(&agent, "shop")["services"][0]["health"]["state"] == "healthy"
    });
    let first = app_sandboxes(&agent, "shop")[0]["id"].clone();

    // A new version under a request every 10 ms: none fails, and v2 serves after.
    let load = Load::start(port);
    sleep(Duration::from_millis(300));
    write_app(&dir, &app_toml("shop", "v2", GOOD_CHECK, ""));
    let out = deploy(&agent, &dir, port);
    assert!(out.status.success(), "{}", text(&out));
    sleep(Duration::from_millis(300));
    let (n, failures, seen) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(seen, ["v1", "v2"], "versions seen in order");
    assert_eq!(get(port).as_deref(), Ok("v2"));
    // The old one drains in the background: a pause, SIGTERM, then it is removed.
    wait_for("the old sandbox removed", || {
        app_sandboxes(&agent, "shop").len() == 1
    });
    // A new sandbox, under the service's usual name.
    let now = &app_sandboxes(&agent, "shop")[0];
    assert_ne!(now["id"], first, "{now}");
    assert_eq!(now["name"], "shop-web", "{now}");
    assert_eq!(status(&agent, "shop")["services"][0]["sandbox"], "shop-web");

    // `app restart` takes the same path: still no failed request.
    let load = Load::start(port);
    agent.ok(&["app", "restart", "shop"]);
    let (n, failures, _) = load.finish();
    assert!(
        failures.is_empty(),
        "restart: {} of {n} failed: {failures:?}",
        failures.len()
    );

    // A version whose check fails: the deploy fails with the check's output, the new sandbox
    // is removed and v2 keeps serving, without a failed request.
    let load = Load::start(port);
    write_app(
        &dir,
        &app_toml(
            "shop",
            "v3",
            "http = \"/missing\"\ninterval = \"200ms\"\nstart_period = \"1s\"\nfailure_threshold = 3\n",
            "",
        ),
    );
    let out = deploy(&agent, &dir, port);
    let (n, failures, seen) = load.finish();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not become healthy")
            && err.contains("http GET /missing")
            && err.contains("404"),
        "{err}"
    );
    assert!(
        failures.is_empty(),
        "{} of {n} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(seen, ["v2"]);
    assert_eq!(get(port).as_deref(), Ok("v2"));
    wait_for("only the serving sandbox left", || {
        app_sandboxes(&agent, "shop").len() == 1
    });

    // A service with a disk under an exclusive lease is replaced stop-then-start, and the
    // deploy says so.
    let disk = "[[services.web.disks]]\nname = \"rd-data\"\nmount_path = \"/data\"\nsize_gb = 1\n";
    let leased = agent.root.join("leased");
    let lport = port_for(1);
    write_app(&leased, &app_toml("leased", "l1", GOOD_CHECK, disk));
    let out = deploy(&agent, &leased, lport);
    assert!(out.status.success(), "{}", text(&out));
    let before = app_sandboxes(&agent, "leased")[0]["id"].clone();
    write_app(&leased, &app_toml("leased", "l2", GOOD_CHECK, disk));
    let out = deploy(&agent, &leased, lport);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("holds disk `rd-data` under an exclusive lease: replaced stop-then-start"),
        "{said}"
    );
    assert_eq!(get(lport).as_deref(), Ok("l2"));
    assert_eq!(app_sandboxes(&agent, "leased").len(), 1);
    assert_ne!(app_sandboxes(&agent, "leased")[0]["id"], before);

    // An exec check that starts failing: the service turns unhealthy, shows why, and its
    // process is restarted (its command removes the marker, so it is healthy again).
    let sick = agent.root.join("sick");
    let sport = port_for(3);
    let toml = app_toml(
        "sick",
        "s1",
        "exec = \"test ! -f /www/sick\"\ninterval = \"300ms\"\nstart_period = \"0s\"\nfailure_threshold = 2\n",
        "",
    );
    write_app(&sick, &toml);
    let out = deploy(&agent, &sick, sport);
    assert!(out.status.success(), "{}", text(&out));
    let sandbox = status(&agent, "sick")["services"][0]["sandbox"]
        .as_str()
        .unwrap()
        .to_string();
    agent.ok(&["sandbox", "exec", &sandbox, "--", "touch", "/www/sick"]);
    agent.wait_for_log("service unhealthy: restarting its process");
    let line = agent
        .log_text()
        .lines()
        .find(|l| l.contains("service unhealthy"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("test ! -f /www/sick") && line.contains("exited with 1"),
        "{line}"
    );
    wait_for("the unhealthy service restarted", || {
        status(&agent, "sick")["services"][0]["restarts"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    wait_for("healthy again", || {
        status(&agent, "sick")["services"][0]["health"]["state"] == "healthy"
    });
    let shown = agent.ok(&["app", "status", "sick"]);
    assert!(
        shown.contains("HEALTH") && shown.contains("healthy"),
        "{shown}"
    );
}

/// The agent killed at each phase of a switch (`MIREN_CRASH_AT_FILE` names the point): while
/// it is down the published port answers, and after its restart exactly one version serves,
/// the new one (the deploy is finished or redone).
#[test]
fn a_kill_9_at_each_phase_of_a_switch_leaves_exactly_one_version_serving() {
    let Some(mirror) = image_mirror() else {
        return;
    };
    let crash_file = std::env::temp_dir().join(format!("mrtst-crash-{}", std::process::id()));
    let mut agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .env("MIREN_CRASH_AT_FILE", crash_file.to_str().unwrap())
        .start();
    agent.ok(&["image", "pull", IMAGE]);
    let dir = agent.root.join("cut");
    let port = port_for(2);
    write_app(&dir, &app_toml("cut", "c0", GOOD_CHECK, ""));
    let out = deploy(&agent, &dir, port);
    assert!(out.status.success(), "{}", text(&out));

    let points = [
        "switch-recorded",
        "next-started",
        "switching",
        "ports-switched",
        "draining",
    ];
    for (i, point) in points.iter().enumerate() {
        let version = format!("c{}", i + 1);
        std::fs::write(&crash_file, point).unwrap();
        write_app(&dir, &app_toml("cut", &version, GOOD_CHECK, ""));
        let out = deploy(&agent, &dir, port);
        assert!(
            !out.status.success(),
            "{point}: the agent should have died: {}",
            text(&out)
        );
        let log = agent.log_text();
        let kills: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("MIREN_CRASH_AT_FILE: killing the agent"))
            .collect();
        assert!(
            kills.len() == i + 1 && kills[i].contains(point),
            "{point}: not the point the agent died at: {kills:?}"
        );
        let _ = std::fs::remove_file(&crash_file);
        // Down, the service still answers: the previous version or the next.
        let answer = get(port);
        assert!(
            answer.is_ok(),
            "{point}: while the agent is down: {answer:?}"
        );
        agent.restart();
        wait_for(&format!("{point}: {version} alone serving"), || {
            get(port).as_deref() == Ok(version.as_str())
                && app_sandboxes(&agent, "cut").len() == 1
                && status(&agent, "cut")["status"] == "running"
        });
    }
    let _ = std::fs::remove_file(&crash_file);
}
