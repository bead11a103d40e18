//! Hostile tests: identity (see docs/security.md). An app's sandboxes are found by (app,
//! service), addon servers and their disks by the addon that owns them, the addon name space
//! belongs to the agent, and a disk belongs to the app (or addon) that made or claimed it. Each
//! test makes the attack of issue 10 finding 3 on a real agent and fails if it works.

use std::fs;
use std::process::{Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::psql;
use miren_vm_tests::{busybox_rootfs_tar, TestAgent};
use serde_json::Value;

const BUSYBOX: &str = "local/busybox:test";

fn with_busybox(agent: &TestAgent) {
    let tar = agent.root.join("busybox.tar");
    busybox_rootfs_tar(&tar);
    agent.ok(&["image", "import", BUSYBOX, tar.to_str().unwrap()]);
}

/// An app.toml: one busybox service that idles with `WHO=<app>` in its env, optional extras.
fn busybox_app(app: &str, service: &str, extra: &str) -> String {
    format!(
        "name = \"{app}\"\n\n[services.{service}]\nimage = \"{BUSYBOX}\"\ncommand = \"sleep 100000\"\n\
         [[services.{service}.env]]\nkey = \"WHO\"\nvalue = \"{app}\"\n{extra}"
    )
}

fn disk_extra(service: &str, disk: &str) -> String {
    format!(
        "[[services.{service}.disks]]\nname = \"{disk}\"\nmount_path = \"/data\"\nsize_gb = 1\n"
    )
}

/// Writes `<root>/<dir>/.miren/app.toml` and returns the directory for `deploy -C`.
fn app_dir(agent: &TestAgent, dir: &str, toml: &str) -> String {
    let dir = agent.root.join(dir);
    fs::create_dir_all(dir.join(".miren")).unwrap();
    fs::write(dir.join(".miren/app.toml"), toml).unwrap();
    dir.to_str().unwrap().to_string()
}

fn deploy(agent: &TestAgent, dir: &str) -> Output {
    agent.cli(&["deploy", "-C", dir])
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The sandbox of an app's service, as `app status` reports it: (name, state).
fn service_sandbox(agent: &TestAgent, app: &str, service: &str) -> (String, String) {
    let status = agent.json(&["app", "status", app, "--json"]);
    let svc = status["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("app {app} has no service {service}: {status}"))
        .clone();
    (
        svc["sandbox"].as_str().unwrap().to_string(),
        svc["state"].as_str().unwrap_or("none").to_string(),
    )
}

/// `echo $WHO` inside a sandbox: which app's environment it runs with.
fn who(agent: &TestAgent, sandbox: &str) -> String {
    agent
        .ok(&["sandbox", "exec", sandbox, "--", "sh", "-c", "echo $WHO"])
        .trim()
        .to_string()
}

fn sandboxes(agent: &TestAgent) -> Vec<Value> {
    agent
        .json(&["sandbox", "list", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

fn assert_refused(out: &Output, words: &[&str]) {
    assert!(!out.status.success(), "the attack worked: {}", text(out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    for w in words {
        assert!(
            err.contains(&w.to_lowercase()),
            "expected `{w}` in: {}",
            text(out)
        );
    }
}

#[test]
fn colliding_app_and_service_names_run_side_by_side_and_delete_only_their_own() {
    let agent = TestAgent::start();
    with_busybox(&agent);
    // `mrs-a` + `b-c` and `mrs-a-b` + `c` both read `mrs-a-b-c`.
    let first = app_dir(&agent, "first", &busybox_app("mrs-a", "b-c", ""));
    let second = app_dir(&agent, "second", &busybox_app("mrs-a-b", "c", ""));
    let out = deploy(&agent, &first);
    assert!(out.status.success(), "{}", text(&out));
    let out = deploy(&agent, &second);
    assert!(out.status.success(), "{}", text(&out));

    let (a_name, a_state) = service_sandbox(&agent, "mrs-a", "b-c");
    let (b_name, b_state) = service_sandbox(&agent, "mrs-a-b", "c");
    assert_ne!(a_name, b_name, "two services share one sandbox");
    assert_eq!((a_state.as_str(), b_state.as_str()), ("running", "running"));
    assert_eq!(who(&agent, &a_name), "mrs-a");
    assert_eq!(who(&agent, &b_name), "mrs-a-b");

    // Redeploying either replaces its own service only.
    let b_id = agent.json(&["sandbox", "status", &b_name, "--json"])["id"].clone();
    let out = deploy(&agent, &first);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        agent.json(&["sandbox", "status", &b_name, "--json"])["id"],
        b_id,
        "redeploying mrs-a replaced mrs-a-b's service"
    );
    let (a_name, _) = service_sandbox(&agent, "mrs-a", "b-c");
    assert_eq!(who(&agent, &a_name), "mrs-a");

    // Deleting one app leaves the other's service running.
    agent.ok(&["app", "delete", "mrs-a"]);
    let (b_after, b_state) = service_sandbox(&agent, "mrs-a-b", "c");
    assert_eq!(b_after, b_name);
    assert_eq!(b_state, "running");
    assert_eq!(who(&agent, &b_name), "mrs-a-b");
    assert_eq!(
        agent.json(&["sandbox", "status", &b_name, "--json"])["id"],
        b_id
    );
    assert!(
        !sandboxes(&agent).iter().any(|s| s["app"] == "mrs-a"),
        "mrs-a's service outlived its app"
    );

    // The other order: delete the second, the first (deployed again) stays.
    let out = deploy(&agent, &first);
    assert!(out.status.success(), "{}", text(&out));
    let (a_name, _) = service_sandbox(&agent, "mrs-a", "b-c");
    agent.ok(&["app", "delete", "mrs-a-b"]);
    let (a_after, a_state) = service_sandbox(&agent, "mrs-a", "b-c");
    assert_eq!(
        (a_after.as_str(), a_state.as_str()),
        (a_name.as_str(), "running")
    );
    assert_eq!(who(&agent, &a_name), "mrs-a");
    agent.ok(&["app", "delete", "mrs-a"]);
    assert!(sandboxes(&agent).is_empty(), "{:?}", sandboxes(&agent));

    // Both at once: whichever takes the readable name, the other gets its own.
    let deploys: Vec<_> = [&first, &second]
        .iter()
        .map(|dir| {
            agent
                .command(&["deploy", "-C", dir])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("deploy")
        })
        .collect();
    for child in deploys {
        let out = child.wait_with_output().expect("deploy");
        assert!(out.status.success(), "{}", text(&out));
    }
    let (a_name, a_state) = service_sandbox(&agent, "mrs-a", "b-c");
    let (b_name, b_state) = service_sandbox(&agent, "mrs-a-b", "c");
    assert_ne!(a_name, b_name);
    assert_eq!((a_state.as_str(), b_state.as_str()), ("running", "running"));
    assert_eq!(who(&agent, &a_name), "mrs-a");
    assert_eq!(who(&agent, &b_name), "mrs-a-b");
    agent.ok(&["app", "delete", "mrs-a"]);
    agent.ok(&["app", "delete", "mrs-a-b"]);
    assert!(sandboxes(&agent).is_empty(), "{:?}", sandboxes(&agent));
}

#[test]
fn the_addon_name_space_cannot_be_taken_and_disks_belong_to_their_app() {
    let agent = TestAgent::start();
    with_busybox(&agent);

    // Apps named like addon servers, or declaring an addon's disk name: refused at parse,
    // before anything is recorded.
    for (app, service, extra) in [
        ("addon-pg", "victim", String::new()),
        ("addon", "pg", String::new()),
        ("ADDON-pg", "victim", String::new()),
        ("mrs-thief", "web", disk_extra("web", "addon-pg-victim")),
        ("mrs-thief", "web", disk_extra("web", "addon-pg")),
    ] {
        let dir = app_dir(&agent, "reserved", &busybox_app(app, service, &extra));
        assert_refused(&deploy(&agent, &dir), &["reserved"]);
    }
    assert!(agent
        .json(&["app", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());

    // The same names through every other door a user has.
    let run = |args: &[&str]| {
        let mut full = vec!["sandbox", "run", "--image", BUSYBOX];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--", "sleep", "1000"]);
        agent.cli(&full)
    };
    assert_refused(&run(&["--name", "addon-pg-victim"]), &["reserved"]);
    assert_refused(&run(&["--name", "addon-pg"]), &["reserved"]);
    assert_refused(&run(&["--app", "addon-pg-victim"]), &["reserved"]);
    assert_refused(&run(&["--name", "mrs-x", "--app", "Addon"]), &["reserved"]);
    assert_refused(
        &agent.cli(&[
            "debug",
            "disk",
            "create",
            "-n",
            "addon-pg-victim",
            "--size-gb",
            "1",
        ]),
        &["reserved"],
    );
    assert_refused(
        &agent.cli(&[
            "debug",
            "net",
            "create",
            "--owner",
            "mrs-o",
            "--app",
            "addon-pg-victim",
        ]),
        &["reserved"],
    );
    assert_refused(
        &agent.cli(&[
            "addon",
            "create",
            "miren-postgresql",
            "-a",
            "addon-pg",
            "--no-wait",
        ]),
        &["reserved"],
    );
    assert!(sandboxes(&agent).is_empty());
    assert!(agent.disks().is_empty());
    assert!(agent
        .json(&["debug", "net", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());

    // An unowned disk is claimed by the first app that deploys with it.
    agent.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "mrs-loose",
        "--size-gb",
        "1",
    ]);
    let one = app_dir(
        &agent,
        "one",
        &busybox_app("mrs-one", "web", &disk_extra("web", "mrs-loose")),
    );
    let out = deploy(&agent, &one);
    assert!(out.status.success(), "{}", text(&out));
    let (one_sandbox, _) = service_sandbox(&agent, "mrs-one", "web");
    agent.ok(&[
        "sandbox",
        "exec",
        &one_sandbox,
        "--",
        "sh",
        "-c",
        "echo mine > /data/secret",
    ]);

    // A second app naming it is refused before anything of it is recorded or started.
    let two = app_dir(
        &agent,
        "two",
        &busybox_app("mrs-two", "web", &disk_extra("web", "mrs-loose")),
    );
    assert_refused(
        &deploy(&agent, &two),
        &["mrs-loose", "belongs to app `mrs-one`"],
    );
    assert!(
        agent
            .cli(&["app", "status", "mrs-two", "--json"])
            .status
            .code()
            != Some(0),
        "the refused deploy left an app behind"
    );
    // So is a disk the first app's deploy made itself.
    let three = app_dir(
        &agent,
        "three",
        &format!(
            "{}{}",
            busybox_app("mrs-one", "web", &disk_extra("web", "mrs-loose")),
            "[[services.web.disks]]\nname = \"mrs-one-made\"\nmount_path = \"/made\"\nsize_gb = 1\n"
        ),
    );
    let out = deploy(&agent, &three);
    assert!(out.status.success(), "{}", text(&out));
    let four = app_dir(
        &agent,
        "four",
        &busybox_app("mrs-two", "web", &disk_extra("web", "mrs-one-made")),
    );
    assert_refused(
        &deploy(&agent, &four),
        &["mrs-one-made", "belongs to app `mrs-one`"],
    );

    // A plain sandbox of another app cannot attach it either; the owner's app still can.
    assert_refused(
        &run(&["--app", "mrs-two", "--disk", "mrs-one-made:/d"]),
        &["belongs to app `mrs-one`"],
    );
    assert_refused(
        &run(&["--name", "mrs-two", "--disk", "mrs-one-made:/d"]),
        &["belongs to app `mrs-one`"],
    );
    let (one_sandbox, state) = service_sandbox(&agent, "mrs-one", "web");
    assert_eq!(state, "running");
    assert_eq!(
        agent
            .ok(&["sandbox", "exec", &one_sandbox, "--", "cat", "/data/secret"])
            .trim(),
        "mine"
    );
    agent.ok(&["app", "delete", "mrs-one"]);
    assert!(sandboxes(&agent).is_empty());
    // The disks stay (app delete keeps data); they are still mrs-one's.
    assert_refused(&deploy(&agent, &two), &["belongs to app `mrs-one`"]);
    for disk in ["mrs-loose", "mrs-one-made"] {
        agent.ok(&["debug", "disk", "delete", "-n", disk]);
    }
}

// ---- PostgreSQL: an app cannot stand in for another app's addon server ----

fn env_of(agent: &TestAgent, app: &str) -> serde_json::Map<String, Value> {
    agent
        .json(&["env", "list", "-a", app, "--json", "--reveal"])
        .as_object()
        .expect("env list is an object")
        .clone()
}

fn psql_eventually(url: &str, sql: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = psql(url, sql);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(Instant::now() < deadline, "psql {sql:?}: {}", text(&out));
        sleep(Duration::from_millis(200));
    }
}

/// The server sandbox of an app's `small` PostgreSQL: the one that runs as the addon's app.
fn server_of(agent: &TestAgent, victim: &str) -> Value {
    let network_app = format!("addon-pg-{victim}");
    sandboxes(agent)
        .into_iter()
        .find(|s| s["app"] == network_app.as_str())
        .unwrap_or_else(|| panic!("no server for {victim}: {:?}", sandboxes(agent)))
}

fn pg_app(app: &str, extra: &str) -> String {
    busybox_app(
        app,
        "web",
        &format!("{extra}\n[addons.miren-postgresql]\nvariant = \"small\"\n"),
    )
}

#[test]
fn an_app_cannot_take_over_another_apps_postgres_server_or_its_disk() {
    let Some(mirror) = miren_vm_tests::image_mirror() else {
        return;
    };
    let agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .start();
    with_busybox(&agent);
    agent.ok(&["image", "pull", "postgres:17"]);

    let victim = app_dir(&agent, "victim", &pg_app("mrsvictim", ""));
    let out = deploy(&agent, &victim);
    assert!(out.status.success(), "{}", text(&out));
    let env = env_of(&agent, "mrsvictim");
    let url = env["DATABASE_URL"].as_str().unwrap().to_string();
    let pghost = env["PGHOST"].clone();
    psql_eventually(
        &url,
        "CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('gold')",
    );
    let server = server_of(&agent, "mrsvictim");
    let server_disk = server["disks"][0].as_str().unwrap().to_string();

    // The attacks of the finding, and their case-shifted siblings.
    for (app, service, extra) in [
        ("addon-pg", "mrsvictim", String::new()),
        ("addon", "pg", String::new()),
        ("mrs-thief", "web", disk_extra("web", &server_disk)),
    ] {
        let dir = app_dir(&agent, "attack", &busybox_app(app, service, &extra));
        assert_refused(&deploy(&agent, &dir), &["reserved"]);
    }
    // The server's disk through a plain sandbox: owned by the addon, so refused.
    let spec = format!("{server_disk}:/stolen");
    for args in [
        vec!["--app", "mrs-thief", "--disk", spec.as_str()],
        vec!["--name", "mrs-thief", "--disk", spec.as_str()],
        vec!["--app", "mrsvictim", "--disk", spec.as_str()],
    ] {
        let mut full = vec![
            "sandbox",
            "run",
            "--image",
            BUSYBOX,
            "--lease-timeout",
            "1s",
        ];
        full.extend_from_slice(&args);
        full.extend_from_slice(&["--", "sleep", "1000"]);
        assert_refused(
            &agent.cli(&full),
            &["belongs to the miren-postgresql addon of app `mrsvictim`"],
        );
    }
    // An app whose name differs only in case gets a server and disk of its own (disk names
    // are unique ignoring case, so `addon-pg-Mrsvictim` must not resolve to the victim's).
    let twin = app_dir(&agent, "twin", &pg_app("Mrsvictim", ""));
    let out = deploy(&agent, &twin);
    assert!(out.status.success(), "{}", text(&out));
    let twin_env = env_of(&agent, "Mrsvictim");
    assert_ne!(
        twin_env["PGHOST"], pghost,
        "the twin's PGHOST is the victim's server"
    );
    let twin_url = twin_env["DATABASE_URL"].as_str().unwrap().to_string();
    let out = psql(&twin_url, "SELECT v FROM secrets");
    assert!(
        !out.status.success(),
        "the twin reads the victim's data: {}",
        text(&out)
    );

    // The victim's server, data and PGHOST are as they were.
    let after = server_of(&agent, "mrsvictim");
    assert_eq!(
        after["id"], server["id"],
        "the victim's server was replaced"
    );
    assert_eq!(after["state"], "running");
    assert_eq!(env_of(&agent, "mrsvictim")["PGHOST"], pghost);
    assert_eq!(psql_eventually(&url, "SELECT v FROM secrets"), "gold");
    let (web, _) = service_sandbox(&agent, "mrsvictim", "web");
    let seen = agent.ok(&["sandbox", "exec", &web, "--", "sh", "-c", "echo $PGHOST"]);
    assert_eq!(seen.trim(), pghost.as_str().unwrap());

    // Destroying the twin's addon removes the twin's server only.
    agent.ok(&["app", "delete", "Mrsvictim"]);
    agent.ok(&["addon", "destroy", "miren-postgresql", "-a", "Mrsvictim"]);
    assert_eq!(server_of(&agent, "mrsvictim")["id"], server["id"]);
    assert_eq!(psql_eventually(&url, "SELECT v FROM secrets"), "gold");
    assert!(agent
        .disks()
        .iter()
        .any(|d| d["name"] == server_disk.as_str()));

    agent.ok(&["app", "delete", "mrsvictim"]);
    agent.ok(&["addon", "destroy", "miren-postgresql", "-a", "mrsvictim"]);
    assert!(sandboxes(&agent).is_empty(), "{:?}", sandboxes(&agent));
    assert!(agent.disks().is_empty(), "{:?}", agent.disks());
}
