//! Network endpoints end to end through the agent: real netns, routed veths and nftables.
//! Traffic only flows between this test's own namespaces and the host's loopback.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{ChildGuard, TestAgent};
use serde_json::Value;

const SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    c, _ = s.accept(); c.sendall(b"hello from " + sys.argv[2].encode()); c.close()
"#;

const CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode()); sys.exit(0)
except Exception as e:
    print(e); sys.exit(1)
"#;

fn create(agent: &TestAgent, owner: &str, app: &str, extra: &[&str]) -> Value {
    let mut args = vec!["debug", "net", "create", "--owner", owner, "--app", app];
    args.extend_from_slice(extra);
    agent.json(&args)
}

fn serve(endpoint: &Value, port: u16) -> ChildGuard {
    let netns = endpoint["netns_path"].as_str().unwrap();
    let name = endpoint["owner"].as_str().unwrap();
    ChildGuard(
        Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["python3", "-c", SERVER, &port.to_string(), name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Connects from inside `from` (or from the host when None); Ok(greeting) or Err(reason).
fn connect(from: Option<&Value>, ip: &str, port: u16, timeout_s: f64) -> Result<String, String> {
    let mut cmd = match from {
        Some(endpoint) => {
            let mut c = Command::new("nsenter");
            c.arg(format!(
                "--net={}",
                endpoint["netns_path"].as_str().unwrap()
            ))
            .arg("python3");
            c
        }
        None => Command::new("python3"),
    };
    let out = cmd
        .args(["-c", CLIENT, ip, &port.to_string(), &timeout_s.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Retries until the listener is up (it takes a moment to start).
fn eventually_connects(from: Option<&Value>, ip: &str, port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match connect(from, ip, port, 1.0) {
            Ok(text) => return text,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {ip}:{port}: {e}"),
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}

fn host_veths(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect()
}

fn netns_mounts(agent: &TestAgent) -> usize {
    // nsfs only: the netns dir itself is a mount too (a bind of itself, docs/sandbox.md).
    let all = miren_disks::mounts_under(&agent.run_dir).unwrap();
    all.iter().filter(|m| m.fstype == "nsfs").count()
}

fn endpoints(agent: &TestAgent) -> Vec<Value> {
    agent
        .json(&["debug", "net", "list", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

/// Kernel objects match the agent's list exactly; every address is unique and in the subnet.
/// Veths of deleted endpoints go away in the background (deleting one waits for an RCU grace
/// period), and so do their rules: give both a bounded moment.
fn assert_net_converged(agent: &TestAgent) {
    let list = endpoints(agent);
    let expected: HashSet<String> = list
        .iter()
        .map(|e| e["veth"].as_str().unwrap().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let veths: HashSet<String> = host_veths(&agent.prefix).into_iter().collect();
        if veths == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "veths {veths:?} differ from endpoints {expected:?}"
        );
        sleep(Duration::from_millis(20));
    }
    assert_eq!(
        netns_mounts(agent),
        list.len(),
        "netns mounts differ from endpoints"
    );
    let ips: HashSet<&str> = list.iter().map(|e| e["ip"].as_str().unwrap()).collect();
    assert_eq!(ips.len(), list.len(), "an address is assigned twice");
    for e in &list {
        assert_eq!(e["status"], "ready", "{e}");
    }
}

#[test]
fn an_app_talks_to_itself_and_other_apps_only_when_allowed() {
    let agent = TestAgent::start();
    let web = create(&agent, "web-1", "shop", &[]);
    for field in ["owner", "app", "ip", "netns_path", "veth"] {
        assert!(web.get(field).is_some(), "{field} missing: {web}");
    }
    let worker = create(&agent, "worker-1", "shop", &[]);
    let intruder = create(&agent, "intruder-1", "blog", &[]);
    let _server = serve(&web, 8000);
    let web_ip = web["ip"].as_str().unwrap();

    // same app: connects
    let greeting = eventually_connects(Some(&worker), web_ip, 8000);
    assert_eq!(greeting, "hello from web-1");
    // the host (the gateway side) reaches it too
    eventually_connects(None, web_ip, 8000);
    // another app: refused
    assert!(
        connect(Some(&intruder), web_ip, 8000, 1.0).is_err(),
        "blog reached shop"
    );

    // an endpoint that admits blog, e.g. an addon server attached to it
    let db = create(&agent, "db-1", "shop-db", &["--allow-from", "blog,shop"]);
    let _db_server = serve(&db, 5432);
    let db_ip = db["ip"].as_str().unwrap();
    eventually_connects(Some(&intruder), db_ip, 5432);
    eventually_connects(Some(&worker), db_ip, 5432);
    // ...while blog still cannot reach shop's own endpoints
    assert!(connect(Some(&intruder), web_ip, 8000, 1.0).is_err());
    let third = create(&agent, "other-1", "news", &[]);
    assert!(
        connect(Some(&third), db_ip, 5432, 1.0).is_err(),
        "news reached shop-db"
    );

    let status = agent.json(&["debug", "net", "status", "--owner", "db-1", "--json"]);
    assert_eq!(status["allow_from"], serde_json::json!(["blog", "shop"]));
    assert!(agent.ok(&["debug", "net", "list"]).contains("shop-db"));
    assert_net_converged(&agent);
}

#[test]
fn a_published_port_is_reachable_from_the_host_loopback_until_deleted() {
    let agent = TestAgent::start();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let publish = format!("{port}:8080");
    let ep = create(&agent, "pub-1", "site", &["--publish", &publish]);
    assert_eq!(ep["publish"][0]["host_port"], port);
    let _server = serve(&ep, 8080);
    assert_eq!(
        eventually_connects(None, "127.0.0.1", port),
        "hello from pub-1"
    );
    // the host port is taken now
    let err = agent.fails(&[
        "debug",
        "net",
        "create",
        "--owner",
        "pub-2",
        "--app",
        "site",
        "--publish",
        &publish,
    ]);
    assert!(err.contains("already published"), "{err}");
    agent.ok(&["debug", "net", "delete", "--owner", "pub-1"]);
    assert!(
        connect(None, "127.0.0.1", port, 1.0).is_err(),
        "still published after delete"
    );
    // deleting again is fine
    assert!(agent
        .ok(&["debug", "net", "delete", "--owner", "pub-1"])
        .contains("nothing to do"));
    assert_net_converged(&agent);
}

#[test]
fn two_hundred_endpoints_leave_nothing_behind() {
    let agent = TestAgent::start();
    let mut ips = HashSet::new();
    for i in 0..200 {
        let ep = create(&agent, &format!("e{i}"), &format!("app{}", i % 7), &[]);
        assert!(
            ips.insert(ep["ip"].as_str().unwrap().to_string()),
            "address handed out twice"
        );
    }
    assert_eq!(endpoints(&agent).len(), 200);
    assert_net_converged(&agent);
    for i in 0..200 {
        agent.ok(&["debug", "net", "delete", "--owner", &format!("e{i}")]);
    }
    assert!(endpoints(&agent).is_empty());
    assert_eq!(netns_mounts(&agent), 0, "netns mounts left");
    assert_net_converged(&agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    let rules = loop {
        let out = Command::new("nft")
            .args(["list", "table", "inet", &agent.prefix])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout).into_owned();
        let left: Vec<&String> = ips
            .iter()
            .filter(|ip| rules.contains(&format!("{ip} ")) || rules.contains(&format!("{ip},")))
            .collect();
        if left.is_empty() {
            break rules;
        }
        assert!(Instant::now() < deadline, "rules left for {left:?}");
        sleep(Duration::from_millis(50));
    };
    // the table itself stays until --uninstall-network
    assert!(rules.contains("table inet"));
}

/// Runs `ip` with `args`, inside `netns` when given.
fn ip(netns: Option<&str>, args: &[&str]) {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={ns}")).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let out = cmd.args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// An agent from before endpoints were routed left them as bridge ports, each sandbox with
/// its address on the subnet's prefix; after an upgrade the agent's reconciliation makes them
/// routed, and isolation holds throughout.
#[test]
fn an_older_agents_bridged_endpoints_are_routed_after_a_restart() {
    let mut agent = TestAgent::start();
    let web = create(&agent, "web-1", "shop", &[]);
    let worker = create(&agent, "worker-1", "shop", &[]);
    let intruder = create(&agent, "intruder-1", "blog", &[]);
    let _server = serve(&web, 8000);
    let web_ip = web["ip"].as_str().unwrap();
    eventually_connects(Some(&worker), web_ip, 8000);

    agent.stop();
    let bridge = format!("{}0", agent.prefix);
    let gateway = web["gateway"].as_str().unwrap();
    let prefix_len = agent.subnet.rsplit('/').next().unwrap().to_string();
    for endpoint in [&web, &worker, &intruder] {
        let (veth, ns) = (
            endpoint["veth"].as_str().unwrap(),
            endpoint["netns_path"].as_str().unwrap(),
        );
        let address = format!("{}/{prefix_len}", endpoint["ip"].as_str().unwrap());
        ip(
            None,
            &[
                "route",
                "del",
                &format!("{}/32", endpoint["ip"].as_str().unwrap()),
            ],
        );
        ip(None, &["link", "set", veth, "master", &bridge]);
        ip(Some(ns), &["addr", "flush", "dev", "eth0"]);
        ip(Some(ns), &["neigh", "flush", "dev", "eth0"]);
        ip(Some(ns), &["addr", "add", &address, "dev", "eth0"]);
        ip(Some(ns), &["route", "replace", "default", "via", gateway]);
    }

    agent.spawn();
    let gc = agent.json(&["debug", "net", "gc", "--json"]);
    let ports = Command::new("ip")
        .args(["-o", "link", "show", "master", &bridge])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ports.stdout).trim().is_empty(),
        "bridge ports left: {ports:?} (gc: {gc})"
    );
    assert_eq!(
        eventually_connects(Some(&worker), web_ip, 8000),
        "hello from web-1"
    );
    assert!(
        connect(Some(&intruder), web_ip, 8000, 1.0).is_err(),
        "blog reached shop after the conversion"
    );
    assert!(agent
        .log_text()
        .contains("making an older agent's bridged endpoints routed"));
    assert_net_converged(&agent);
}

#[test]
fn kill_9_during_creates_and_deletes_then_gc_leaks_nothing() {
    let mut agent = TestAgent::start();
    let keeper = create(&agent, "keeper", "core", &[]);
    let delays_ms = [0u64, 3, 7, 12, 18, 25, 35, 50, 70, 100];
    let mut round_owners = Vec::new();
    for (round, delay) in delays_ms.iter().enumerate() {
        let existing: Vec<String> = endpoints(&agent)
            .iter()
            .map(|e| e["owner"].as_str().unwrap().to_string())
            .filter(|o| o != "keeper")
            .collect();
        let mut clients = Vec::new();
        for i in 0..4 {
            let owner = format!("r{round}-{i}");
            round_owners.push(owner.clone());
            clients.push(agent.spawn_cli(&[
                "debug", "net", "create", "--owner", &owner, "--app", "churn",
            ]));
        }
        for owner in existing.iter().take(3) {
            clients.push(agent.spawn_cli(&["debug", "net", "delete", "--owner", owner]));
        }
        sleep(Duration::from_millis(*delay));
        agent.kill9();
        for mut c in clients {
            let _ = c.wait();
        }
        agent.spawn();
        agent.ok(&["debug", "net", "gc"]);
        assert_net_converged(&agent);
        // the endpoint that was never touched kept its address
        let k = agent.json(&["debug", "net", "status", "--owner", "keeper", "--json"]);
        assert_eq!(k["ip"], keeper["ip"], "round {round}");
    }
    for e in endpoints(&agent) {
        agent.ok(&[
            "debug",
            "net",
            "delete",
            "--owner",
            e["owner"].as_str().unwrap(),
        ]);
    }
    assert_net_converged(&agent);
    assert!(host_veths(&agent.prefix).is_empty());
}

#[test]
fn gc_releases_endpoints_whose_owner_is_gone() {
    let agent = TestAgent::start();
    let owner_proc = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    let owner = format!("pid:{}", owner_proc.0.id());
    let ep = create(&agent, &owner, "short-lived", &[]);
    create(&agent, "stays", "short-lived", &[]);
    let gc = agent.json(&["debug", "net", "gc", "--json"]);
    assert!(gc["released"].as_array().unwrap().is_empty(), "{gc}");
    drop(owner_proc);
    let gc = agent.json(&["debug", "net", "gc", "--json"]);
    assert_eq!(gc["released"], serde_json::json!([owner]));
    assert!(agent
        .ok(&["debug", "net", "gc"])
        .contains("released: nothing"));
    let left = endpoints(&agent);
    assert_eq!(left.len(), 1);
    assert_ne!(left[0]["ip"], ep["ip"]);
    assert_net_converged(&agent);

    // Objects the kernel has but the agent does not know are removed too.
    // Shaped like an endpoint key (15 characters) so it looks like one of ours.
    let stray = format!("{}-{}", agent.prefix, "z".repeat(14 - agent.prefix.len()));
    let peer = format!("{}peer", agent.prefix);
    let status = Command::new("ip")
        .args(["link", "add", &stray, "type", "veth", "peer", "name", &peer])
        .status()
        .unwrap();
    assert!(status.success());
    let gc = agent.json(&["debug", "net", "gc", "--json"]);
    assert!(
        gc["removed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == stray.as_str()),
        "{gc}"
    );
    assert_net_converged(&agent);
}

#[test]
fn bad_endpoint_requests_are_refused_cleanly() {
    let agent = TestAgent::start();
    for args in [
        vec!["--owner", "", "--app", "a"],
        vec!["--owner", "o1", "--app", "bad_app"],
        vec!["--owner", "o1", "--app", "a", "--allow-from", "x y"],
        vec!["--owner", "o1", "--app", "a", "--publish", "0:80"],
        vec!["--owner", "o1", "--app", "a", "--publish", "80"],
        vec!["--owner", "a/b", "--app", "a"],
    ] {
        let mut full = vec!["debug", "net", "create"];
        full.extend(args.iter().copied());
        agent.fails(&full);
    }
    assert!(endpoints(&agent).is_empty());
    assert!(host_veths(&agent.prefix).is_empty());
    create(&agent, "same", "a", &[]);
    // a retried create is idempotent; a different spec for the same owner conflicts
    create(&agent, "same", "a", &[]);
    let err = agent.fails(&["debug", "net", "create", "--owner", "same", "--app", "b"]);
    assert!(err.contains("already has an endpoint"), "{err}");
    assert_net_converged(&agent);
}

#[test]
fn two_agents_with_different_prefixes_and_subnets_side_by_side() {
    let mut one = TestAgent::start();
    let two = TestAgent::start();
    let a = create(&one, "x", "app", &[]);
    let b = create(&two, "x", "app", &[]);
    assert_ne!(a["veth"], b["veth"]);
    assert_ne!(a["ip"], b["ip"]);
    assert!(a["veth"].as_str().unwrap().starts_with(&one.prefix));
    assert_eq!(endpoints(&one).len(), 1);
    assert_eq!(endpoints(&two).len(), 1);
    one.ok(&["debug", "net", "delete", "--owner", "x"]);
    assert_net_converged(&one);
    assert_net_converged(&two);
    assert_eq!(endpoints(&two).len(), 1);
    // uninstalling one agent's network (agent stopped) leaves the other's alone
    one.stop();
    let out = one.uninstall_network();
    assert!(out.status.success(), "{out:?}");
    assert_net_converged(&two);
}
