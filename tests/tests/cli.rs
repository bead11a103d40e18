//! The CLI's output and `--json` contracts, against a fake agent answering canned model JSON.
//! Every test also checks that each request the CLI made is an operation of docs/openapi.json.

use miren_agent::model::{
    Addon, App, Disk, Endpoint, EnvVarView, ImageSummary, Lease, RestoreResult, Sandbox,
};
use miren_contract_tests::{assert_requests_in_openapi, cli_binary, FakeAgent, Run};
use serde_json::{json, Value};

fn agent() -> FakeAgent {
    FakeAgent::start(cli_binary(env!("CARGO_BIN_EXE_miren-contract-cli")))
}

/// Canned JSON that must be a valid model value: it round-trips through `T` unchanged, so it
/// holds exactly the fields the model has.
fn model<T: serde::de::DeserializeOwned + serde::Serialize>(value: Value) -> Value {
    let typed: T = serde_json::from_value(value.clone()).expect("canned JSON fits the model");
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        value,
        "canned JSON has every field"
    );
    value
}

fn disk() -> Value {
    model::<Disk>(json!({
        "id": "disk_1f0c9a7e5b3d2a41",
        "name": "pg-data",
        "provider": "miren",
        "size_gb": 10,
        "filesystem": "xfs",
        "read_only": false,
        "status": "attached",
        "error": null,
        "allocated_bytes": 5 << 20,
        "image_path": "/var/lib/miren/disks/disk_1f0c9a7e5b3d2a41.img",
        "device": "/dev/loop3",
        "mount_path": "/var/lib/miren/mounts/pg-data",
        "lease": {"holder": "pid:42", "acquired_at": "2026-03-24T12:00:00Z"},
        "created_at": "2026-03-24T11:00:00Z"
    }))
}

fn local_disk() -> Value {
    model::<Disk>(json!({
        "id": "local_shop",
        "name": "shop",
        "provider": "local",
        "size_gb": null,
        "filesystem": null,
        "read_only": false,
        "status": "attached",
        "error": null,
        "allocated_bytes": 512,
        "image_path": null,
        "device": null,
        "mount_path": "/var/lib/miren/local/shop",
        "lease": null,
        "created_at": "2026-03-24T11:30:00Z"
    }))
}

fn sandbox(id: &str, name: &str, state: &str, exit_code: Option<i32>) -> Value {
    model::<Sandbox>(json!({
        "id": id,
        "name": name,
        "app": "shop",
        "image": "docker.io/library/busybox:latest",
        "state": state,
        "pid": if state == "running" { json!(4242) } else { Value::Null },
        "ip": if state == "running" { json!("10.88.0.5") } else { Value::Null },
        "exit_code": exit_code,
        "oom_killed": false,
        "restarts": 0,
        "started_at": "2026-03-24T12:00:00Z",
        "finished_at": exit_code.map(|_| "2026-03-24T12:05:00Z"),
        "disks": ["pg-data:/data"],
        "error": null,
        "created_at": "2026-03-24T11:59:59Z"
    }))
}

fn lines(run: &Run) -> Vec<&str> {
    run.ok().lines().collect()
}

#[test]
fn disk_list_json_is_the_models_fields() {
    let agent = agent();
    let disks = json!([disk(), local_disk()]);
    agent.on("GET", "/v1/disks", 200, &disks);
    assert_eq!(
        agent.miren(&["debug", "disk", "list", "--json"]).json(),
        disks
    );
    let requests = agent.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].target, "/v1/disks");
    assert_requests_in_openapi(&requests);
}

#[test]
fn disk_list_table() {
    let agent = agent();
    agent.on("GET", "/v1/disks", 200, &json!([disk(), local_disk()]));
    let run = agent.miren(&["debug", "disk", "list"]);
    assert_eq!(
        lines(&run),
        [
            "ID                     NAME     PROVIDER  SIZE    FS   STATUS    USED     DEVICE      LEASE",
            "disk_1f0c9a7e5b3d2a41  pg-data  miren     10 GiB  xfs  attached  5.0 MiB  /dev/loop3  pid:42",
            "local_shop             shop     local     -       -    attached  512 B    -           -",
        ]
    );
}

#[test]
fn disk_status_by_name_and_id() {
    let agent = agent();
    agent.on("GET", "/v1/disks/pg-data", 200, &disk());
    let run = agent.miren(&["debug", "disk", "status", "-n", "pg-data"]);
    assert_eq!(
        lines(&run),
        [
            "id:         disk_1f0c9a7e5b3d2a41",
            "name:       pg-data",
            "provider:   miren",
            "size:       10 GiB",
            "filesystem: xfs",
            "read-only:  false",
            "status:     attached",
            "allocated:  5.0 MiB",
            "image:      /var/lib/miren/disks/disk_1f0c9a7e5b3d2a41.img",
            "device:     /dev/loop3",
            "mounted at: /var/lib/miren/mounts/pg-data",
            "lease:      pid:42 (since 2026-03-24T12:00:00Z)",
            "created:    2026-03-24T11:00:00Z",
        ]
    );
    agent.on("GET", "/v1/disks/disk_1f0c9a7e5b3d2a41", 200, &disk());
    let run = agent.miren(&[
        "debug",
        "disk",
        "status",
        "-i",
        "disk_1f0c9a7e5b3d2a41",
        "--json",
    ]);
    assert_eq!(run.json(), disk());
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn a_bad_disk_name_fails_before_the_agent_is_asked() {
    let agent = agent();
    let run = agent.miren(&["debug", "disk", "status", "-n", "no_underscores"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.starts_with("error: "), "{run:?}");
    let run = agent.miren(&["debug", "disk", "status", "-i", "pg-data"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("is not a disk id"), "{run:?}");
    assert!(agent.requests().is_empty());
}

#[test]
fn disk_create_sends_the_model_and_prints_one_line() {
    let agent = agent();
    agent.on("POST", "/v1/disks", 201, &disk());
    let run = agent.miren(&[
        "debug",
        "disk",
        "create",
        "-n",
        "pg-data",
        "--size-gb",
        "10",
        "--filesystem",
        "xfs",
    ]);
    assert_eq!(
        run.ok(),
        "created disk pg-data (disk_1f0c9a7e5b3d2a41), 10 GiB xfs, mounted at /var/lib/miren/mounts/pg-data\n"
    );
    let requests = agent.requests();
    let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(
        sent,
        json!({"name": "pg-data", "size_gb": 10, "filesystem": "xfs", "read_only": false})
    );
    assert_requests_in_openapi(&requests);
}

#[test]
fn disk_lease_and_release() {
    let agent = agent();
    let lease = model::<Lease>(json!({
        "disk": "pg-data",
        "disk_id": "disk_1f0c9a7e5b3d2a41",
        "holder": "pid:42",
        "acquired_at": "2026-03-24T12:00:00Z"
    }));
    agent.on("POST", "/v1/disks/pg-data/lease", 200, &lease);
    let run = agent.miren(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "pg-data",
        "--holder",
        "pid:42",
        "--timeout",
        "30s",
    ]);
    assert_eq!(
        run.ok(),
        "disk pg-data leased by pid:42 since 2026-03-24T12:00:00Z\n"
    );
    let sent: Value = serde_json::from_slice(&agent.requests()[0].body).unwrap();
    assert_eq!(sent, json!({"holder": "pid:42", "timeout_secs": 30.0}));
    agent.on(
        "DELETE",
        "/v1/disks/pg-data/lease",
        200,
        &json!({"disk": "pg-data", "released_holder": null}),
    );
    let run = agent.miren(&["debug", "disk", "lease-release", "-n", "pg-data"]);
    assert_eq!(run.ok(), "disk pg-data was not leased\n");
    agent.on("GET", "/v1/leases", 200, &json!([lease]));
    let run = agent.miren(&["debug", "disk", "lease-list"]);
    assert_eq!(
        lines(&run),
        [
            "DISK     DISK ID                HOLDER  ACQUIRED",
            "pg-data  disk_1f0c9a7e5b3d2a41  pid:42  2026-03-24T12:00:00Z",
        ]
    );
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn disk_delete_answers_no_content() {
    let agent = agent();
    agent.on_raw(
        "DELETE",
        "/v1/disks/pg-data",
        204,
        "application/json",
        Vec::new(),
    );
    let run = agent.miren(&["debug", "disk", "delete", "-n", "pg-data"]);
    assert_eq!(run.ok(), "deleted disk pg-data\n");
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn api_errors_are_printed_with_their_message_and_fail() {
    let agent = agent();
    let message =
        "disk pg-data is leased by pid:42; run `miren debug disk lease-release -n pg-data` first";
    agent.fail("POST", "/v1/disks/pg-data/resize", 409, "conflict", message);
    let run = agent.miren(&[
        "debug",
        "disk",
        "resize",
        "-n",
        "pg-data",
        "--size-gb",
        "20",
    ]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, format!("error: {message}\n"));
}

#[test]
fn a_404_reads_as_not_found() {
    let agent = agent();
    let message = "no sandbox `nope`; `miren sandbox list` shows them";
    agent.fail("GET", "/v1/sandboxes/nope", 404, "not_found", message);
    let run = agent.miren(&["sandbox", "status", "nope"]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.stderr, format!("error: {message}\n"));
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn an_error_that_is_not_the_apis_shape_shows_the_status() {
    let agent = agent();
    agent.on_raw("GET", "/v1/apps", 500, "text/plain", b"boom".to_vec());
    let run = agent.miren(&["app", "list"]);
    assert_eq!(run.code, Some(1));
    assert_eq!(
        run.stderr,
        "error: talking to the agent: agent answered 500 Internal Server Error: boom\n"
    );
}

#[test]
fn no_agent_says_how_to_find_one() {
    let dir = tempfile::tempdir().unwrap();
    let binary = cli_binary(env!("CARGO_BIN_EXE_miren-contract-cli"));
    let socket = dir.path().join("none.sock");
    let run = miren_contract_tests::run_cli(&binary, &socket, &["debug", "info"], &[]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.starts_with(&format!(
        "error: cannot reach the miren agent at {}: ",
        socket.display()
    )));
    assert!(run
        .stderr
        .contains("Point to it with --socket or MIREN_SOCKET"));
}

#[test]
fn sandbox_list_table_and_json() {
    let agent = agent();
    let sandboxes = json!([
        sandbox("sb_0123456789abcdef", "web", "running", None),
        sandbox("sb_fedcba9876543210", "job", "exited", Some(3)),
    ]);
    agent.on("GET", "/v1/sandboxes", 200, &sandboxes);
    let run = agent.miren(&["sandbox", "list"]);
    assert_eq!(
        lines(&run),
        [
            "ID                     NAME                 APP            STATE      EXIT IP              IMAGE",
            "sb_0123456789abcdef    web                  shop           running       - 10.88.0.5       docker.io/library/busybox:latest",
            "sb_fedcba9876543210    job                  shop           exited        3 -               docker.io/library/busybox:latest",
        ]
    );
    assert_eq!(
        agent.miren(&["sandbox", "list", "--json"]).json(),
        sandboxes
    );
}

#[test]
fn sandbox_status_wait_stop_and_delete() {
    let agent = agent();
    let exited = sandbox("sb_fedcba9876543210", "job", "exited", Some(3));
    agent.on("GET", "/v1/sandboxes/job", 200, &exited);
    let run = agent.miren(&["sandbox", "status", "job"]);
    assert_eq!(
        lines(&run),
        [
            "id:         sb_fedcba9876543210",
            "name:       job",
            "app:        shop",
            "image:      docker.io/library/busybox:latest",
            "state:      exited",
            "pid:        -",
            "ip:         -",
            "exit code:  3",
            "oom killed: false",
            "restarts:   0",
            "started:    2026-03-24T12:00:00Z",
            "finished:   2026-03-24T12:05:00Z",
            "disks:      pg-data:/data",
        ]
    );
    agent.on("POST", "/v1/sandboxes/job/wait", 200, &exited);
    assert_eq!(
        agent
            .miren(&["sandbox", "wait", "job", "--timeout", "1m30s"])
            .ok(),
        "3\n"
    );
    agent.on("POST", "/v1/sandboxes/job/stop", 200, &exited);
    let run = agent.miren(&["sandbox", "stop", "job", "--grace", "1500ms"]);
    assert_eq!(run.ok(), "stopped job (exit code 3)\n");
    agent.on_raw(
        "DELETE",
        "/v1/sandboxes/job",
        204,
        "application/json",
        Vec::new(),
    );
    assert_eq!(
        agent.miren(&["sandbox", "delete", "job"]).ok(),
        "deleted job\n"
    );
    let targets: Vec<String> = agent.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        [
            "/v1/sandboxes/job",
            "/v1/sandboxes/job/wait?timeout_secs=90",
            "/v1/sandboxes/job/stop?grace_secs=1.5",
            "/v1/sandboxes/job",
        ]
    );
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn sandbox_run_prints_the_id_and_sends_the_flags() {
    let agent = agent();
    agent.on(
        "POST",
        "/v1/sandboxes",
        201,
        &sandbox("sb_0123456789abcdef", "web", "running", None),
    );
    let run = agent.miren(&[
        "sandbox",
        "run",
        "--image",
        "busybox",
        "--name",
        "web",
        "--env",
        "A=1",
        "--disk",
        "pg-data:/data:ro",
        "--restart",
        "always",
        "--publish",
        "8080:80",
        "--",
        "sleep",
        "9",
    ]);
    assert_eq!(run.ok(), "sb_0123456789abcdef\n");
    let sent: Value = serde_json::from_slice(&agent.requests()[0].body).unwrap();
    assert_eq!(sent["image"], "busybox");
    assert_eq!(sent["disks"], json!(["pg-data:/data:ro"]));
    assert_eq!(sent["restart"], "always");
    assert_eq!(
        sent["publish"],
        json!([{"host_ip": null, "host_port": 8080, "port": 80}])
    );
    assert_eq!(sent["cmd"], json!(["sleep", "9"]));
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn sandbox_exec_passes_the_exit_code_through() {
    let agent = agent();
    agent.on(
        "POST",
        "/v1/sandboxes/web/exec",
        200,
        &json!({"exit_code": 7, "stdout": "out\n", "stderr": "err\n",
                "stdout_truncated": false, "stderr_truncated": false}),
    );
    let run = agent.miren(&["sandbox", "exec", "web", "--", "false"]);
    assert_eq!(run.code, Some(7));
    assert_eq!(run.stdout, "out\n");
    assert_eq!(run.stderr, "err\n");
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn sandbox_logs_stream_to_stdout() {
    let agent = agent();
    agent.on_raw(
        "GET",
        "/v1/sandboxes/web/logs",
        200,
        "application/octet-stream",
        b"line one\nline two\n".to_vec(),
    );
    assert_eq!(
        agent.miren(&["sandbox", "logs", "web"]).ok(),
        "line one\nline two\n"
    );
    assert_eq!(
        agent.requests()[0].target,
        "/v1/sandboxes/web/logs?follow=false"
    );
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn endpoint_owners_are_percent_encoded() {
    let agent = agent();
    let endpoint = model::<Endpoint>(json!({
        "owner": "pid:12",
        "app": "shop",
        "ip": "10.88.0.7",
        "gateway": "10.88.0.1",
        "netns_path": "/run/miren/netns/ep1",
        "veth": "mrv1",
        "allow_from": [],
        "publish": [{"host_ip": null, "host_port": 8080, "port": 80}],
        "status": "ready",
        "created_at": "2026-03-24T12:00:00Z"
    }));
    // The fake matches the path as sent: encoded.
    agent.on("GET", "/v1/endpoints/pid%3A12", 200, &endpoint);
    agent.on("GET", "/v1/endpoints", 200, &json!([endpoint]));
    let run = agent.miren(&["debug", "net", "status", "--owner", "pid:12"]);
    assert_eq!(
        lines(&run),
        [
            "owner:      pid:12",
            "app:        shop",
            "ip:         10.88.0.7",
            "gateway:    10.88.0.1",
            "veth:       mrv1",
            "netns:      /run/miren/netns/ep1",
            "status:     ready",
            "allow from: ",
        ]
    );
    assert_eq!(agent.requests()[0].target, "/v1/endpoints/pid%3A12");
    let run = agent.miren(&["debug", "net", "list"]);
    assert_eq!(
        lines(&run),
        [
            "OWNER   APP   IP         VETH  STATUS  ALLOW FROM  PUBLISH",
            "pid:12  shop  10.88.0.7  mrv1  ready   -           127.0.0.1:8080->80",
        ]
    );
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn image_pull_follows_the_event_stream() {
    let agent = agent();
    let image = model::<ImageSummary>(json!({
        "reference": "docker.io/library/busybox:latest",
        "manifest_digest": "sha256:aaaa",
        "config_digest": "sha256:bbbb",
        "layers": 1,
        "size_bytes": 2 << 20,
        "entrypoint": [],
        "cmd": ["sh"],
        "source": "127.0.0.1:5123",
        "stored_at": "2026-03-24T12:00:00Z"
    }));
    let events = format!(
        "{}\n{}\n",
        json!({"progress": {"digest": "sha256:cccc", "done": 1, "total": 2}}),
        json!({"image": image})
    );
    agent.on_raw(
        "POST",
        "/v1/images/pull",
        200,
        "application/x-ndjson",
        events.into_bytes(),
    );
    let run = agent.miren(&["image", "pull", "busybox"]);
    assert_eq!(
        run.ok(),
        "pulled docker.io/library/busybox:latest sha256:aaaa (1 layers, 2.0 MiB)\n"
    );
    let failed = format!(
        "{}\n",
        json!({"error": {"code": "upstream", "message": "the registry said no"}})
    );
    agent.on_raw(
        "POST",
        "/v1/images/pull",
        200,
        "application/x-ndjson",
        failed.into_bytes(),
    );
    let run = agent.miren(&["image", "pull", "busybox"]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.stderr, "error: the registry said no\n");
    agent.on(
        "DELETE",
        "/v1/images",
        200,
        &json!({"reference": "ghcr.io/org/app:1", "removed": false}),
    );
    let run = agent.miren(&["image", "rm", "ghcr.io/org/app:1"]);
    assert_eq!(
        run.ok(),
        "ghcr.io/org/app:1 was not on this node; nothing to do\n"
    );
    let requests = agent.requests();
    assert_eq!(
        requests.last().unwrap().target,
        "/v1/images?reference=ghcr.io%2Forg%2Fapp%3A1"
    );
    assert_requests_in_openapi(&requests);
}

#[test]
fn disk_restore_uploads_the_snapshot() {
    let agent = agent();
    let result = model::<RestoreResult>(json!({
        "disk": disk(),
        "replaced": true,
        "image_checksum": "abcd",
        "data_bytes": 1 << 20
    }));
    agent.on("POST", "/v1/disks/restore", 200, &result);
    let snapshot = vec![7u8; 3 << 20];
    let run = agent.miren_with_stdin(
        &["disk", "restore", "-s", "-", "-n", "pg-data", "--force"],
        &snapshot,
    );
    assert_eq!(
        lines(&run),
        [
            "replaced disk pg-data (disk_1f0c9a7e5b3d2a41) from -: 1.0 MiB of data, checksum blake3:abcd",
            "restart the app that uses it to pick up the restored data",
        ]
    );
    let requests = agent.requests();
    assert_eq!(
        requests[0].target,
        "/v1/disks/restore?force=true&name=pg-data"
    );
    assert_eq!(requests[0].body, snapshot);
    assert_requests_in_openapi(&requests);
}

fn addon(status: &str, reason: Option<&str>) -> Value {
    model::<Addon>(json!({
        "name": "miren-postgresql",
        "app": "shop",
        "variant": "small",
        "version": "17",
        "image": "docker.io/library/postgres:17",
        "status": status,
        "reason": reason,
        "server": "addon-pg-shop",
        "source": "cli",
        "created_at": "2026-03-24T12:00:00Z",
        "updated_at": "2026-03-24T12:00:05Z"
    }))
}

#[test]
fn addon_create_in_error_exits_one() {
    let agent = agent();
    agent.on(
        "POST",
        "/v1/addons",
        201,
        &addon("error", Some("the server did not start")),
    );
    let run = agent.miren(&["addon", "create", "miren-postgresql", "-a", "shop"]);
    assert_eq!(run.code, Some(1));
    assert_eq!(
        run.stderr.lines().next(),
        Some("error: miren-postgresql for app `shop` failed: the server did not start")
    );
    let sent: Value = serde_json::from_slice(&agent.requests()[0].body).unwrap();
    assert_eq!(
        sent,
        json!({"app": "shop", "addon": "miren-postgresql", "variant": null,
               "version": null, "wait": true})
    );
    agent.on(
        "GET",
        "/v1/apps/shop/addons",
        200,
        &json!([addon("active", None)]),
    );
    let run = agent.miren(&["addon", "list", "-a", "shop"]);
    assert_eq!(
        lines(&run),
        [
            "NAME              VARIANT  TIER  VERSION  STATUS  DISK  REASON",
            "miren-postgresql  small    -     17       active  -     -",
        ]
    );
    agent.on(
        "DELETE",
        "/v1/apps/shop/addons/miren-postgresql",
        200,
        &json!({"name": "miren-postgresql", "app": "shop", "deleted": true}),
    );
    let run = agent.miren(&[
        "addon",
        "destroy",
        "miren-postgresql",
        "-a",
        "shop",
        "--yes",
    ]);
    assert_eq!(run.ok(), "miren-postgresql of app `shop`: deleted\n");
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn env_list_json_is_an_object() {
    let agent = agent();
    let vars: Vec<Value> = vec![
        model::<EnvVarView>(json!({"name": "DATABASE_URL", "value": "********",
            "sensitive": true, "source": "miren-postgresql"})),
        model::<EnvVarView>(json!({"name": "PGHOST", "value": "10.88.0.9",
            "sensitive": false, "source": "miren-postgresql"})),
    ];
    agent.on("GET", "/v1/apps/shop/env", 200, &vars);
    let run = agent.miren(&["env", "list", "-a", "shop", "--json"]);
    assert_eq!(
        run.json(),
        json!({"DATABASE_URL": "********", "PGHOST": "10.88.0.9"})
    );
    let run = agent.miren(&["env", "list", "-a", "shop", "--reveal"]);
    assert_eq!(
        lines(&run),
        [
            "NAME          VALUE      SENSITIVE  SOURCE",
            "DATABASE_URL  ********   yes        miren-postgresql",
            "PGHOST        10.88.0.9  no         miren-postgresql",
        ]
    );
    let targets: Vec<String> = agent.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        [
            "/v1/apps/shop/env?reveal=false",
            "/v1/apps/shop/env?reveal=true"
        ]
    );
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn app_status_and_list() {
    let agent = agent();
    let app = model::<App>(json!({
        "name": "shop",
        "status": "running",
        "reason": null,
        "services": [{"name": "web", "sandbox": "shop-web", "image": "oven/bun:1",
                      "image_digest": null, "built_from_source": null,
                      "state": "running", "ip": "10.88.0.5", "restarts": 0,
                      "health": {"state": "unhealthy", "check": "http GET /healthz on port 3000",
                                 "last_failure": "http GET /healthz on 10.88.0.5:3000: HTTP 503 Service Unavailable: down",
                                 "failures": 3}}],
        "addons": [addon("active", None)],
        "created_at": "2026-03-24T12:00:00Z",
        "updated_at": "2026-03-24T12:00:09Z"
    }));
    agent.on("GET", "/v1/apps/shop", 200, &app);
    agent.on("GET", "/v1/apps", 200, &json!([app]));
    let run = agent.miren(&["app", "status", "shop"]);
    assert_eq!(
        lines(&run),
        [
            "app:      shop",
            "status:   running",
            "updated:  2026-03-24T12:00:09Z",
            "",
            "SERVICE  SANDBOX   STATE    IP         HEALTH     IMAGE       BUILT     DIGEST",
            "web      shop-web  running  10.88.0.5  unhealthy  oven/bun:1  prebuilt  -",
            "health of web: http GET /healthz on port 3000 (3 failed in a row): http GET /healthz on 10.88.0.5:3000: HTTP 503 Service Unavailable: down",
            "",
            "NAME              VARIANT  TIER  VERSION  STATUS  DISK  REASON",
            "miren-postgresql  small    -     17       active  -     -",
        ]
    );
    let run = agent.miren(&["app", "list"]);
    assert_eq!(
        lines(&run),
        [
            "NAME  STATUS   SERVICES     ADDONS",
            "shop  running  1/1 running  miren-postgresql:small (active)",
        ]
    );
    assert_eq!(agent.miren(&["app", "list", "--json"]).json(), json!([app]));
    assert_requests_in_openapi(&agent.requests());
}

#[test]
fn debug_info_prints_the_agent_as_json() {
    let agent = agent();
    let info = json!({"version": "0.1.0", "data_dir": "/tmp/x", "name_prefix": "mrtst", "pid": 1});
    agent.on("GET", "/v1/info", 200, &info);
    assert_eq!(agent.miren(&["debug", "info"]).json(), info);
    assert_requests_in_openapi(&agent.requests());
}
