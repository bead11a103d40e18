//! PostgreSQL tiers: a `small` server's sandbox gets its tier's memory limit (its cgroup),
//! `shared_buffers` and `max_connections` from it, its pooler the tier's client limit; a data
//! disk filled past 80% grows by itself (online, xfs); a tier change in place (`addon update`)
//! keeps the data, grows the disk, restarts the server for `shared_buffers`, and refuses a tier
//! smaller than the data; on `shared` the tier is the app's roles' `CONNECTION LIMIT` (rotation
//! logins too) and the server is not restarted; kill -9 during a tier change converges.
//!
//! Images from the loopback registry of `scripts/images` (`postgres:17`,
//! `miren-addons/pgbouncer:1.24`); the tests run when MIREN_IMAGE_MIRROR is set. Two tests,
//! one agent each, run in parallel.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use miren_vm_tests::addons::{
    addon_status, agent_with_mirror, assert_nothing_left, deploy, env, exec_sh, idle_app,
    kill_during, psql_ok, text, wait_for, write_app,
};
use miren_vm_tests::TestAgent;
use serde_json::Value;

const PG: &str = "miren-postgresql";
const POOLER_IMAGE: &str = "miren-addons/pgbouncer:1.24";
const GIB: u64 = 1 << 30;

fn pg_app(name: &str, settings: &str) -> String {
    idle_app(name, "postgres:17", "sleep infinity", Some((PG, settings)))
}

fn addon(agent: &TestAgent, app: &str) -> Value {
    addon_status(agent, app, PG).expect("the addon")
}

/// The memory limit of `sandbox`'s cgroup (v1 `memory` controller, or cgroup2).
fn memory_limit(agent: &TestAgent, sandbox: &str) -> u64 {
    let pid = miren_vm_tests::addons::server_pid(agent, sandbox);
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let file = if controllers.split(',').any(|c| c == "memory") {
            PathBuf::from(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
        } else if controllers.is_empty() {
            PathBuf::from(format!("/sys/fs/cgroup/unified{path}/memory.max"))
        } else {
            continue;
        };
        if let Ok(value) = fs::read_to_string(&file) {
            if let Ok(limit) = value.trim().parse() {
                return limit;
            }
        }
    }
    panic!("no memory limit found for {sandbox}: {cgroups}");
}

/// The app's client limit in its pooler (`max_db_client_connections` of its database), from
/// the limits file its entrypoint wrote.
fn pooler_max_client_conn(agent: &TestAgent, pooler: &str) -> u32 {
    let out = exec_sh(agent, pooler, "cat /tmp/pgbouncer/limits.ini");
    let file = String::from_utf8_lossy(&out.stdout).to_string();
    let limits: Vec<u32> = file
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("max_db_client_connections="))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        limits.len(),
        1,
        "one app's limit in {pooler}: {}",
        text(&out)
    );
    limits[0]
}

/// The host path where the addon's data disk is mounted.
fn disk_mount(agent: &TestAgent, disk: &str) -> PathBuf {
    let disks = agent.json(&["debug", "disk", "list", "--json"]);
    let found = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk}: {disks}"));
    assert_eq!(found["filesystem"], "xfs", "{found}");
    PathBuf::from(found["mount_path"].as_str().expect("mounted"))
}

/// Allocates `bytes` in a file on the mounted disk (real blocks: statvfs counts them).
fn fill(path: &PathBuf, bytes: u64) {
    let out = Command::new("fallocate")
        .args(["-l", &bytes.to_string()])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fallocate: {}", text(&out));
}

fn fs_size(mount: &PathBuf) -> u64 {
    let stat = nix::sys::statvfs::statvfs(mount).unwrap();
    stat.blocks() * stat.fragment_size()
}

#[test]
fn small_tier_limits_growth_and_change_in_place() {
    let Some(agent) = agent_with_mirror(&["postgres:17", POOLER_IMAGE]) else {
        return;
    };
    let dir = agent.root.join("ta");
    write_app(&dir, &pg_app("ta", "tier = \"small\"\n"));
    deploy(&agent, &dir);
    let a = addon(&agent, "ta");
    assert_eq!(a["status"], "active", "{a}");
    assert_eq!(a["tier"], "small", "{a}");
    assert_eq!(a["disk_size_gb"], 1, "{a}");

    // The small tier's limits: the sandbox's memory, settings derived from it, the pooler.
    let direct = env(&agent, "ta")["DATABASE_URL_DIRECT"].clone();
    assert_eq!(memory_limit(&agent, "addon-pg-ta"), 512 << 20);
    assert_eq!(psql_ok(&direct, "show shared_buffers"), "128MB");
    assert_eq!(psql_ok(&direct, "show max_connections"), "85");
    assert_eq!(psql_ok(&direct, "show effective_cache_size"), "384MB");
    assert_eq!(psql_ok(&direct, "show work_mem"), "4MB");
    assert_eq!(pooler_max_client_conn(&agent, "addon-pg-ta-pool"), 100);
    psql_ok(
        &direct,
        "create table kept(n int); insert into kept select generate_series(1, 1000)",
    );

    // A disk filled past 80% grows by the tier's step (1 GiB), online, with an event.
    let mount = disk_mount(&agent, "addon-pg-ta");
    let before = fs_size(&mount);
    let filler = mount.join("filler");
    fill(&filler, before * 85 / 100);
    wait_for("the disk to grow", Duration::from_secs(90), || {
        let a = addon(&agent, "ta");
        a["disk_size_gb"] == 2 && a["last_growth"].is_string()
    });
    let a = addon(&agent, "ta");
    assert!(
        a["last_growth"]
            .as_str()
            .is_some_and(|g| g.contains("from 1 to 2 GiB")),
        "{a}"
    );
    assert!(fs_size(&mount) > before + GIB / 2, "the filesystem grew");
    let listed = agent.ok(&["addon", "list", "-a", "ta"]);
    assert!(listed.contains("/2 GiB"), "{listed}");
    fs::remove_file(&filler).unwrap();
    assert_eq!(psql_ok(&direct, "select count(*) from kept"), "1000");

    // Up to medium in place: restart (shared_buffers), bigger limits, disk grown, data kept.
    let up = agent.json(&[
        "addon", "update", PG, "-a", "ta", "--tier", "medium", "--json",
    ]);
    assert_eq!(up["restarted"], true, "{up}");
    assert_eq!(up["previous_tier"], "small", "{up}");
    assert_eq!(up["addon"]["tier"], "medium", "{up}");
    assert_eq!(up["addon"]["disk_size_gb"], 10, "{up}");
    let direct = env(&agent, "ta")["DATABASE_URL_DIRECT"].clone();
    assert_eq!(psql_ok(&direct, "select count(*) from kept"), "1000");
    assert_eq!(psql_ok(&direct, "show shared_buffers"), "512MB");
    assert_eq!(psql_ok(&direct, "show max_connections"), "125");
    assert_eq!(memory_limit(&agent, "addon-pg-ta"), 2 << 30);
    assert_eq!(pooler_max_client_conn(&agent, "addon-pg-ta-pool"), 200);
    let mount = disk_mount(&agent, "addon-pg-ta");
    assert!(
        fs_size(&mount) > 9 * GIB,
        "the filesystem is the tier's size"
    );
    // The same tier again changes nothing.
    let same = agent.json(&[
        "addon", "update", PG, "-a", "ta", "--tier", "medium", "--json",
    ]);
    assert_eq!(same["restarted"], false, "{same}");
    // The app's services run with the server's new address.
    let pooled = env(&agent, "ta")["DATABASE_URL"].clone();
    let out = exec_sh(
        &agent,
        "ta-web",
        "PGCONNECT_TIMEOUT=3 psql \"$DATABASE_URL\" -tAc 'select count(*) from kept'",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1000"),
        "{pooled}: {}",
        text(&out)
    );

    // Down to small with more data than small holds: refused, saying what to do; nothing changed.
    let filler = mount.join("filler");
    fill(&filler, 2 * GIB);
    let refused = agent.fails(&["addon", "update", PG, "-a", "ta", "--tier", "small"]);
    assert!(refused.contains("never shrinks"), "{refused}");
    assert_eq!(addon(&agent, "ta")["tier"], "medium");
    fs::remove_file(&filler).unwrap();
    // With the data gone it goes down; the disk keeps its size (disks never shrink).
    let down = agent.json(&[
        "addon", "update", PG, "-a", "ta", "--tier", "small", "--json",
    ]);
    assert_eq!(down["restarted"], true, "{down}");
    assert_eq!(down["addon"]["disk_size_gb"], 10, "{down}");
    let direct = env(&agent, "ta")["DATABASE_URL_DIRECT"].clone();
    assert_eq!(psql_ok(&direct, "show shared_buffers"), "128MB");
    assert_eq!(psql_ok(&direct, "select count(*) from kept"), "1000");

    // app.toml's tier applies on redeploy.
    write_app(&dir, &pg_app("ta", "tier = \"medium\"\n"));
    deploy(&agent, &dir);
    assert_eq!(addon(&agent, "ta")["tier"], "medium");
    let direct = env(&agent, "ta")["DATABASE_URL_DIRECT"].clone();
    assert_eq!(psql_ok(&direct, "show shared_buffers"), "512MB");

    agent.ok(&["app", "delete", "ta"]);
    agent.ok(&["addon", "destroy", PG, "-a", "ta", "--yes"]);
    assert_nothing_left(&agent);
}

#[test]
fn shared_tier_limits_the_roles_and_kill_during_a_change_converges() {
    let Some(mut agent) = agent_with_mirror(&["postgres:17", POOLER_IMAGE]) else {
        return;
    };
    // Shared: the tier is the app's CONNECTION LIMIT; changing it restarts nothing.
    let dir = agent.root.join("tb");
    write_app(
        &dir,
        &pg_app("tb", "variant = \"shared\"\ntier = \"medium\"\n"),
    );
    deploy(&agent, &dir);
    let direct = env(&agent, "tb")["DATABASE_URL_DIRECT"].clone();
    let limit = "select rolconnlimit from pg_roles where rolname = current_user";
    assert_eq!(psql_ok(&direct, limit), "200");
    let server_pid = miren_vm_tests::addons::server_pid(&agent, "addon-pg");
    let up = agent.json(&[
        "addon", "update", PG, "-a", "tb", "--tier", "large", "--json",
    ]);
    assert_eq!(up["restarted"], false, "{up}");
    assert_eq!(psql_ok(&direct, limit), "500");
    assert_eq!(
        miren_vm_tests::addons::server_pid(&agent, "addon-pg"),
        server_pid
    );
    // A rotation's new login has the same limit.
    agent.ok(&["addon", "rotate", PG, "-a", "tb"]);
    let rotated = env(&agent, "tb")["DATABASE_URL_DIRECT"].clone();
    assert_ne!(rotated, direct);
    assert_eq!(psql_ok(&rotated, limit), "500");

    // kill -9 of the agent during a tier change of a small server: after a restart it
    // converges to the wanted tier, data kept.
    let dir = agent.root.join("tk");
    write_app(&dir, &pg_app("tk", ""));
    deploy(&agent, &dir);
    let direct = env(&agent, "tk")["DATABASE_URL_DIRECT"].clone();
    psql_ok(
        &direct,
        "create table kept(n int); insert into kept values (7)",
    );
    for (delay, tier, buffers) in [(300, "medium", "512MB"), (1200, "small", "128MB")] {
        kill_during(
            &mut agent,
            &["addon", "update", PG, "-a", "tk", "--tier", tier],
            Duration::from_millis(delay),
        );
        wait_for(
            "the tier change to converge",
            Duration::from_secs(120),
            || {
                let a = addon(&agent, "tk");
                a["status"] == "active" && a["tier"] == tier
            },
        );
        let direct = env(&agent, "tk")["DATABASE_URL_DIRECT"].clone();
        wait_for("the server to answer", Duration::from_secs(60), || {
            Command::new("psql")
                .args([direct.as_str(), "-tAc", "select 1"])
                .env("PGCONNECT_TIMEOUT", "3")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        assert_eq!(
            psql_ok(&direct, "show shared_buffers"),
            buffers,
            "after kill -9 during the change to {tier}"
        );
        assert_eq!(psql_ok(&direct, "select n from kept"), "7");
    }
    agent.assert_converged();

    for app in ["tb", "tk"] {
        agent.ok(&["app", "delete", app]);
        agent.ok(&["addon", "destroy", PG, "-a", app, "--yes"]);
    }
    miren_vm_tests::addons::shared_server_gone(&agent, "addon-pg");
    assert_nothing_left(&agent);
}
