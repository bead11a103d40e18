//! Many sandboxes on one agent: after many creates and deletes, and after a kill -9 of the
//! agent, isolation between apps still holds, the nftables sets and maps hold exactly the
//! elements of the live endpoints, and deleted sandboxes leave no mount, loop device or
//! element behind.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{layer_bounds, TestAgent};
use serde_json::{json, Value};

const SANDBOXES: usize = 30;
const APPS: usize = 5;

/// Whether a sandbox of `app` fetches the page of the server at `ip` (a throwaway client).
fn reaches(agent: &TestAgent, app: &str, ip: &str) -> bool {
    let client = agent.run_busybox(&["--app", app],
        // Busybox's wget crashes with -T here: `timeout` bounds a blocked connect instead.
        &format!("for i in 1 2 3 4 5 6; do timeout 2 wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.3; done; exit 1"),
    );
    let s = agent.wait_sandbox_state(&client, "exited");
    let logs = agent.ok(&["sandbox", "logs", &client]);
    agent.ok(&["sandbox", "delete", &client]);
    eprintln!("client of {app}: {s} {logs}");
    s["exit_code"] == 0 && logs.contains("hello-from-web")
}

fn assert_isolated(agent: &TestAgent, web_ip: &str, port: u16) {
    assert!(
        reaches(agent, "shop", web_ip),
        "shop cannot reach its own web at {web_ip}:\n{}",
        String::from_utf8_lossy(
            &Command::new("nft")
                .args(["list", "table", "inet", &agent.prefix])
                .output()
                .unwrap()
                .stdout
        )
    );
    assert!(!reaches(agent, "app1", web_ip), "app1 reached shop's web");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-m", "2"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("hello-from-web") {
            break;
        }
        assert!(Instant::now() < deadline, "published port not reachable");
        sleep(Duration::from_millis(100));
    }
}

/// `nft -j list table` of the agent's `family` table.
fn table(agent: &TestAgent, family: &str) -> Vec<Value> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", family, &agent.prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft list table {family}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"].as_array().unwrap().clone()
}

/// Keys of the elements of every set or map named by `wanted`, as strings.
fn keys(objects: &[Value], kind: &str, wanted: impl Fn(&str) -> bool) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for o in objects {
        let Some(obj) = o.get(kind) else { continue };
        if !wanted(obj["name"].as_str().unwrap_or("")) {
            continue;
        }
        for e in obj["elem"].as_array().into_iter().flatten() {
            let key = if kind == "map" { &e[0] } else { e };
            keys.insert(key.as_str().map_or_else(|| key.to_string(), str::to_string));
        }
    }
    keys
}

/// The table names exactly the live endpoints: their addresses in `dest` and the apps' sets,
/// their veths in `ports` and `port_ip` (with their addresses), no chain of their own.
fn assert_elements_match_endpoints(agent: &TestAgent) {
    let endpoints = agent.json(&["debug", "net", "list", "--json"]);
    let endpoints = endpoints.as_array().unwrap();
    let ips: BTreeSet<String> = endpoints
        .iter()
        .map(|e| e["ip"].as_str().unwrap().to_string())
        .collect();
    let veths: BTreeSet<String> = endpoints
        .iter()
        .map(|e| e["veth"].as_str().unwrap().to_string())
        .collect();
    let inet = table(agent, "inet");
    assert_eq!(keys(&inet, "map", |n| n == "dest"), ips, "dest map");
    assert_eq!(
        keys(&inet, "set", |n| n.starts_with("ips-")),
        ips,
        "app sets"
    );
    assert_eq!(keys(&inet, "set", |n| n == "ports"), veths, "ports set");
    let pairs: BTreeSet<String> = endpoints
        .iter()
        .map(|e| json!({ "concat": [e["veth"], e["ip"]] }).to_string())
        .collect();
    assert_eq!(keys(&inet, "set", |n| n == "port_ip"), pairs, "port_ip set");
    // No chain per endpoint (none here admits another app): libnftables lists every chain
    // before each change, so per-endpoint chains made every change O(N).
    let chains = |objects: &[Value], start: &str| {
        objects
            .iter()
            .filter_map(|o| o.get("chain")?["name"].as_str().map(str::to_string))
            .filter(|n| n.starts_with(start))
            .count()
    };
    assert_eq!(chains(&inet, "to-"), 0, "to- chains");
    assert_eq!(chains(&inet, "from-"), 0, "from- chains");
}

/// The host's mount table does not grow with sandboxes beyond one netns file each: layers
/// and overlay roots are only in each supervisor's own mount namespace, and a supervisor's
/// namespace holds nothing of any other sandbox (so nothing of a deleted one stays pinned).
/// Each live sandbox has its layer's loop device, deleted ones none.
fn assert_host_mounts(agent: &TestAgent) {
    let live = agent.json(&["sandbox", "list", "--json"]);
    let ids: Vec<String> = live
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let sandboxes = agent.data_dir.join("sandboxes");
    let mounts = miren_disks::mounts_under(&sandboxes).unwrap();
    assert!(mounts.is_empty(), "host mounts under sandboxes: {mounts:?}");
    let netns_dir = agent.run_dir.join("netns");
    let netns = miren_disks::mounts_under(&netns_dir).unwrap();
    assert_eq!(
        netns.iter().filter(|m| m.target != netns_dir).count(),
        ids.len(),
        "netns mounts: {netns:?}"
    );
    for id in &ids {
        let status: Value =
            serde_json::from_slice(&std::fs::read(sandboxes.join(id).join("status.json")).unwrap())
                .unwrap();
        let pid = status["supervisor_pid"].as_i64().unwrap();
        let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let others: Vec<&str> = table
            .lines()
            .filter(|l| ids.iter().any(|o| o != id && l.contains(o.as_str())))
            .collect();
        assert!(
            others.is_empty(),
            "supervisor of {id} holds others' mounts: {others:?}"
        );
        assert!(
            table.lines().any(|l| l.contains(&format!("{id}/rootfs"))),
            "supervisor of {id} has no overlay root:\n{table}"
        );
        let ours = format!(" {}/", netns_dir.display());
        let netns_mounts = table.lines().filter(|l| l.contains(&ours)).count();
        assert!(
            netns_mounts <= 1,
            "supervisor of {id} holds {netns_mounts} netns"
        );
    }
    // Layers are subvolumes of one store, no loop device of their own.
    let loops = miren_disks::loops_under(&sandboxes).unwrap();
    assert!(loops.is_empty(), "loop devices under sandboxes: {loops:?}");
    let layers: BTreeSet<String> = layer_bounds(&agent.data_dir)
        .into_keys()
        .filter(|name| !name.starts_with(".spare-"))
        .collect();
    assert_eq!(
        layers,
        ids.iter().cloned().collect(),
        "sandboxes' subvolumes"
    );
}

/// Spares copy their mount namespace from the agent's template (a thread of the agent in a
/// namespace of its own, made at start), not from the host's table with its netns file per
/// sandbox: the template holds none of those, and each spare has a namespace of its own.
fn assert_spares_copied_the_template(agent: &TestAgent, spare_layers: &Path, host: &str) {
    let netns_dir = format!(" {}/", agent.run_dir.join("netns").display());
    assert!(
        host.lines().any(|l| l.contains(&netns_dir)),
        "no netns mounts on the host to compare with:\n{host}"
    );
    let host_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut spare_namespaces = BTreeSet::new();
    for entry in std::fs::read_dir(spare_layers).unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue; // taken and gone meanwhile
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let template = args
            .iter()
            .position(|a| a == "--mount-template")
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("spare {pid} has no mount template: {args:?}"));
        let template_ns = std::fs::read_link(template).unwrap();
        assert_ne!(template_ns, host_ns, "the template is the host's namespace");
        let table = std::fs::read_to_string(template.replace("/ns/mnt", "/mountinfo")).unwrap();
        assert!(
            !table.lines().any(|l| l.contains(&netns_dir)),
            "the template holds netns mounts:\n{table}"
        );
        let own = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert!(
            own != template_ns && own != host_ns,
            "spare {pid} has no namespace of its own"
        );
        spare_namespaces.insert(own);
    }
    assert!(!spare_namespaces.is_empty(), "no spare to look at");
}

/// `PPid:` of `pid` (`None` once it is gone).
fn parent_of(pid: &str) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| parent_of(&p.to_string()) == Some(pid))
        .collect()
}

/// The agent's spare factory: its child `miren supervise --factory ...`.
fn factory_of(agent: &TestAgent) -> Option<u32> {
    children_of(agent.pid()?).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--factory"))
    })
}

/// Spares are forks of one spare factory, the agent's child (`supervise --factory`), so they
/// share its relocated pages instead of each exec'ing the binary (docs/sandbox.md "Spare
/// supervisors").
fn assert_spares_are_forks_of_one_factory(agent: &TestAgent, spare_layers: &Path) {
    let mut factories = BTreeSet::new();
    for entry in std::fs::read_dir(spare_layers).unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if let Some(parent) = parent_of(&pid) {
            factories.insert(parent);
        }
    }
    assert_eq!(factories.len(), 1, "spares' parents: {factories:?}");
    let factory = factories.pop_first().unwrap().to_string();
    let cmdline = std::fs::read(format!("/proc/{factory}/cmdline")).unwrap();
    assert!(
        cmdline.split(|b| *b == 0).any(|a| a == b"--factory"),
        "the spares' parent is not the factory: {}",
        String::from_utf8_lossy(&cmdline)
    );
    assert_eq!(
        parent_of(&factory),
        agent.pid(),
        "the factory is not the agent's child"
    );
}

/// Spares run no mkfs and attach no loop device for their layers: each has a subvolume of
/// the data dir's one store (`layers/.spare-<pid>`), bounded to the default size, and the
/// store's image is the only loop device of the agent.
fn assert_spare_layers_are_subvolumes_of_one_store(agent: &TestAgent, spare_layers: &Path) {
    let bounds = layer_bounds(&agent.data_dir);
    let mut spares = 0;
    for (name, bound) in &bounds {
        let Some(pid) = name.strip_prefix(".spare-") else {
            continue;
        };
        assert_eq!(*bound, 1 << 30, "{name}'s bound");
        assert!(
            Path::new("/proc").join(pid).exists() && spare_layers.join(pid).exists(),
            "{name} is not a live spare's"
        );
        spares += 1;
    }
    assert!(spares >= 2, "spares' subvolumes: {bounds:?}");
    let loops = miren_disks::loops_under(&agent.data_dir).unwrap();
    assert_eq!(loops.len(), 1, "loop devices: {loops:?}");
    assert_eq!(loops[0].backing_file, agent.data_dir.join("layers.img"));
}

#[test]
fn many_creates_deletes_and_a_kill_9_keep_isolation_and_exact_rules() {
    let mut agent = TestAgent::start_with_busybox();
    let port = 22000 + (std::process::id() % 20000) as u16;
    let web = agent.run_busybox(
        &[
            "--name",
            "web",
            "--app",
            "shop",
            "--publish",
            &format!("{port}:8080"),
        ],
        "mkdir -p /www; echo hello-from-web > /www/index.html; httpd -f -p 8080 -h /www",
    );
    let web_ip = agent.wait_sandbox_state(&web, "running")["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert_isolated(&agent, &web_ip, port);
    let sleepers: Vec<String> = (0..SANDBOXES)
        .map(|i| agent.run_busybox(&["--app", &format!("app{}", i % APPS)], "sleep 100000"))
        .collect();
    assert_elements_match_endpoints(&agent);
    assert_host_mounts(&agent);
    assert_isolated(&agent, &web_ip, port);

    // Every other one goes: their elements and chains with them, the rest untouched.
    for id in sleepers.iter().step_by(2) {
        agent.ok(&["sandbox", "delete", id]);
    }
    assert_elements_match_endpoints(&agent);
    assert_host_mounts(&agent);
    assert_isolated(&agent, &web_ip, port);

    // A kill -9 and a restart: the full apply at start rebuilds exactly the same elements.
    // The killed agent's spare factory and its spares end (their ends of the agent's socket
    // and pipes closed); the new agent starts its own.
    let old_factory = factory_of(&agent).expect("the agent's spare factory");
    let old_spares = children_of(old_factory);
    agent.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::iter::once(old_factory)
        .chain(old_spares.iter().copied())
        .any(|pid| parent_of(&pid.to_string()).is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the killed agent's factory {old_factory} or its spares {old_spares:?} live on"
        );
        sleep(Duration::from_millis(100));
    }
    agent.wait_for_log("reconciled endpoints and sandboxes");
    assert_elements_match_endpoints(&agent);
    assert_isolated(&agent, &web_ip, port);
    let more: Vec<String> = (0..4)
        .map(|i| agent.run_busybox(&["--app", &format!("app{i}")], "sleep 100000"))
        .collect();
    assert_elements_match_endpoints(&agent);
    assert_host_mounts(&agent);

    for id in sleepers.iter().skip(1).step_by(2).chain(&more) {
        agent.ok(&["sandbox", "delete", id]);
    }
    agent.ok(&["sandbox", "delete", &web]);
    assert_elements_match_endpoints(&agent);
    assert_host_mounts(&agent);
    assert!(
        keys(&table(&agent, "inet"), "map", |n| n.starts_with("pub_")).is_empty(),
        "a published port outlived its sandbox"
    );
    let left = std::fs::read_dir(agent.data_dir.join("sandboxes"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "sandbox state dirs left");
    // Every deleted sandbox's layer is gone: no subvolume but spares' is left in the store.
    let left: Vec<String> = std::fs::read_dir(agent.data_dir.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with(".spare-"))
        .collect();
    assert!(left.is_empty(), "subvolumes left: {left:?}");
    // Two spare supervisors wait, each with its writable layer made and mounted in the
    // mount namespace it made for its sandbox, so starts one after another wait neither for
    // a layer nor for a namespace (docs/sandbox.md "Spare supervisors"); the host's table
    // holds neither.
    // One live sandbox, so that the host has a netns mount the spares' template must lack.
    let last = agent.run_busybox(&["--app", "app0"], "sleep 100000");
    let spare_layers = agent.data_dir.join("spare-layers");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ready = std::fs::read_dir(&spare_layers)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let layer = format!(" {} ", e.path().join("layer").display());
                        // The spare's dir is named after its pid.
                        let pid = e.file_name().to_string_lossy().to_string();
                        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                            .is_ok_and(|own| own.lines().any(|l| l.contains(&layer)))
                    })
                    .count()
            })
            .unwrap_or(0);
        if ready == 2 {
            let spare_dir = format!(" {}/", spare_layers.display());
            assert!(
                !host.lines().any(|l| l.contains(&spare_dir)),
                "the host holds a ready spare's layer: {host}"
            );
            assert_spares_copied_the_template(&agent, &spare_layers, &host);
            assert_spares_are_forks_of_one_factory(&agent, &spare_layers);
            assert_spare_layers_are_subvolumes_of_one_store(&agent, &spare_layers);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} spare layers ready, not 2"
        );
        sleep(Duration::from_millis(100));
    }
    // Each start logs its steps, the wait for its spare among them.
    let log = agent.log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("sandbox started"))
            .filter_map(|l| l.split(" supervisor_ms=").nth(1))
            .any(|steps| steps.contains("spare=") && steps.contains("create=")),
        "no start logged its steps"
    );
    agent.ok(&["sandbox", "delete", &last]);
}

/// Unmounts the test's stand-in for another agent's mount, also when the test fails.
struct ForeignMount(std::path::PathBuf);

impl Drop for ForeignMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A mount the host made privately before a sandbox started (another agent's data dir and
/// disks are such mounts) is not copied into the supervisor's mount namespace: a copy there
/// would keep it alive after the host unmounts it (a loop device still backed, a disk
/// mounted twice) for as long as the supervisor lives.
#[test]
fn a_supervisor_holds_no_copy_of_another_agents_mounts() {
    let agent = TestAgent::start_with_busybox();
    let foreign =
        ForeignMount(std::env::temp_dir().join(format!("mrtst-foreign-{}", std::process::id())));
    std::fs::create_dir_all(&foreign.0).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign.0,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    nix::mount::mount(
        None::<&str>,
        &foreign.0,
        None::<&str>,
        nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    let id = agent.run_busybox(&["--app", "solo"], "sleep 100000");
    agent.wait_sandbox_state(&id, "running");
    let status: Value = serde_json::from_slice(
        &std::fs::read(
            agent
                .data_dir
                .join("sandboxes")
                .join(&id)
                .join("status.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let pid = status["supervisor_pid"].as_i64().unwrap();
    let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let name = foreign.0.display().to_string();
    assert!(
        !table.lines().any(|l| l.contains(&name)),
        "the supervisor holds a copy of {name}:\n{table}"
    );
    assert!(
        table.lines().any(|l| l.contains(&format!("{id}/rootfs"))),
        "the supervisor has no overlay root:\n{table}"
    );
    agent.ok(&["sandbox", "delete", &id]);
}
