//! Hostile tests: api (see docs/security.md). A client of the socket is trusted to ask for
//! things, not to be well-behaved: slow, stalled, flooding or malformed requests must neither
//! starve other clients nor grow the agent without bound, and bad input is a 400 naming the
//! field, with nothing recorded.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use miren_vm_tests::{busybox_rootfs_tar, TestAgent};
use serde_json::Value;

const IMAGE: &str = "local/busybox:test";

/// The agent's bounds (agent/src/server.rs, api.rs, stream.rs), with room for a slow machine:
/// a test waits this long for the agent to act on a bound before calling the attack a success.
const HEADER_BOUND_WAIT: Duration = Duration::from_secs(60);
const MAX_RESTORES: usize = 4;
/// Fewer than the agent's per-process connection cap (128), so the uploads that follow reach
/// the restore cap; the rest of the 530 meet the connection cap.
const HALF_HEADERS: usize = 100;

fn connect(agent: &TestAgent) -> UnixStream {
    UnixStream::connect(&agent.socket).expect("connecting to the agent")
}

/// Reads what the agent sends until it closes the connection, or None if it is still open
/// after `wait`.
fn read_until_closed(stream: &mut UnixStream, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("reading from the agent: {e}"),
        }
    }
}

/// `GET path` from another process (curl), as a second client would send it: (status, body),
/// or a panic naming the route if the agent does not answer within `wait` (a starved API
/// hangs rather than fails).
fn get_answered(agent: &TestAgent, path: &str, wait: Duration) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time"])
        .arg(wait.as_secs().to_string())
        .arg("--unix-socket")
        .arg(&agent.socket)
        .arg(format!("http://agent{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let code: u16 = code.trim().parse().unwrap_or(0);
    assert!(code != 0, "GET {path} got no answer: the API is starved");
    (code, body.to_string())
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// 100 connections that send half a header, and 530 restore uploads that send a few bytes and
/// stall: reads keep answering meanwhile, restores over the cap are refused with 503 at once,
/// the half-header connections are closed by the agent, and the stalled uploads are cut off.
#[test]
fn stalled_clients_do_not_starve_the_api() {
    let agent = TestAgent::start();
    let mut half_headers: Vec<UnixStream> = (0..HALF_HEADERS)
        .map(|_| {
            let mut s = connect(&agent);
            s.write_all(b"GET /v1/disks HTTP/1.1\r\nHost: agent\r\nX-Slow: ")
                .expect("half a header");
            s
        })
        .collect();
    let mut uploads: Vec<UnixStream> = (0..530)
        .map(|_| {
            let mut s = connect(&agent);
            s.write_all(
                b"POST /v1/disks/restore HTTP/1.1\r\nHost: agent\r\ncontent-type: application/octet-stream\r\ncontent-length: 1048576\r\n\r\nMIREN",
            )
            .expect("start of an upload");
            s
        })
        .collect();

    // Reads answer while all of that is open.
    let (code, body) = get_answered(&agent, "/v1/disks", HEADER_BOUND_WAIT);
    assert_eq!(code, 200, "GET /v1/disks while clients stall: {body}");
    let (code, body) = get_answered(&agent, "/v1/sandboxes", HEADER_BOUND_WAIT);
    assert_eq!(code, 200, "GET /v1/sandboxes while clients stall: {body}");

    // Every upload over the cap was refused right away with a 503 saying why; at most the
    // cap's worth are still waiting for their bodies.
    let mut waiting = Vec::new();
    let mut refused = 0;
    let mut refused_as_restore = 0;
    for (i, upload) in uploads.iter_mut().enumerate() {
        match read_until_closed(upload, Duration::from_millis(200)) {
            Some(answer) => {
                assert!(
                    answer.starts_with("HTTP/1.1 503")
                        && (answer.contains("too_many_restores")
                            || answer.contains("too_many_connections")),
                    "an upload over the cap got: {answer}"
                );
                refused += 1;
                refused_as_restore += usize::from(answer.contains("too_many_restores"));
            }
            None => waiting.push(i),
        }
    }
    assert!(
        waiting.len() <= MAX_RESTORES,
        "{} stalled restores are held open (cap {MAX_RESTORES}); {refused} refused",
        waiting.len()
    );

    // The agent closes the half-header connections itself, without answering a request.
    for (i, conn) in half_headers.iter_mut().enumerate() {
        let answer = read_until_closed(conn, HEADER_BOUND_WAIT)
            .unwrap_or_else(|| panic!("half-header connection {i} still open"));
        assert!(
            !answer.contains("200 OK"),
            "a half header was answered as a request: {answer}"
        );
    }
    // And cuts off the stalled uploads that got in, undoing them: no disk, no temporary image.
    assert!(
        !waiting.is_empty() && refused_as_restore > 0,
        "no upload reached the restore cap ({refused} refused, {refused_as_restore} by it)"
    );
    for &i in &waiting {
        let answer = read_until_closed(&mut uploads[i], HEADER_BOUND_WAIT)
            .expect("a stalled upload is still open after the body idle bound");
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains("upload_stalled"),
            "a stalled upload was not cut off as stalled: {answer}"
        );
    }
    let (code, body) = agent.curl("GET", "/v1/disks", None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body.trim(), "[]", "a stalled restore left a disk: {body}");
    let leftovers: Vec<_> = std::fs::read_dir(agent.images_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "restore leftovers: {leftovers:?}");
}

/// A command printing 300 MB through exec: the agent keeps a bounded prefix, says it cut the
/// output, and its memory does not grow with what the command prints.
#[test]
fn exec_flood_keeps_agent_memory_bounded() {
    let agent = TestAgent::start();
    let tar = agent.root.join("busybox.tar");
    busybox_rootfs_tar(&tar);
    agent.ok(&["image", "import", IMAGE, tar.to_str().expect("utf-8 path")]);
    let (code, body) = agent.curl(
        "POST",
        "/v1/sandboxes",
        Some(&format!(
            r#"{{"image":"{IMAGE}","name":"flood","cmd":["sleep","3600"]}}"#
        )),
    );
    assert_eq!(code, 201, "{body}");
    let pid = agent.pid().expect("agent pid");
    let rss_before = status_kb(pid, "VmRSS:");
    let peak_before = status_kb(pid, "VmHWM:");

    let (code, body) = agent.curl(
        "POST",
        "/v1/sandboxes/flood/exec",
        Some(r#"{"args":["sh","-c","yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde 2>/dev/null | head -c 300000000; echo done >&2"]}"#),
    );
    assert_eq!(code, 200, "exec failed: {}", &body[..body.len().min(500)]);
    let result: Value = serde_json::from_str(&body).expect("exec result JSON");
    let stdout = result["stdout"].as_str().expect("stdout");
    assert!(
        stdout.len() <= 4 << 20 && stdout.len() >= 1 << 20,
        "stdout holds {} bytes",
        stdout.len()
    );
    assert_eq!(result["stdout_truncated"], true, "the cut is not marked");
    assert_eq!(result["stderr"], "done\n");
    assert_eq!(result["stderr_truncated"], false);
    assert_eq!(result["exit_code"], 0);

    let rss_after = status_kb(pid, "VmRSS:");
    let peak_after = status_kb(pid, "VmHWM:");
    let bound_kb = 64 * 1024;
    assert!(
        rss_after.saturating_sub(rss_before) < bound_kb,
        "agent RSS grew from {rss_before} kB to {rss_after} kB"
    );
    assert!(
        peak_after.saturating_sub(peak_before.max(rss_before)) < bound_kb,
        "agent peak RSS grew from {peak_before} kB to {peak_after} kB (RSS before: {rss_before} kB)"
    );
    let (code, body) = agent.curl("DELETE", "/v1/sandboxes/flood", None);
    assert_eq!(code, 204, "{body}");
}

/// Each loose input of issue 10 finding 10, and its siblings: a 400 whose message names the
/// field, and nothing recorded (no sandbox, no lease, no state directory).
#[test]
fn loose_input_is_refused_naming_the_field() {
    let agent = TestAgent::start();
    let (code, body) = agent.curl(
        "POST",
        "/v1/disks",
        Some(r#"{"name":"mrtst-lease","size_gb":1}"#),
    );
    assert_eq!(code, 201, "{body}");

    let sandbox = |extra: &str| format!(r#"{{"image":"{IMAGE}","name":"loose",{extra}}}"#);
    let cases: Vec<(&str, String, String)> = vec![
        (
            "POST /v1/sandboxes",
            sandbox(r#""env":["A\nB=1"]"#),
            "env[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""env":["OK=1","A=x\u0000y"]"#),
            "env[1]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""env":["1A=x"]"#),
            "env[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""cmd":["sh","a\u0000b"]"#),
            "cmd[1]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""cmd":[""]"#),
            "cmd[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""memory":"99999999999999G""#),
            "memory".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""pids":4611686018427387904"#),
            "pids".into(),
        ),
        ("POST /v1/sandboxes", sandbox(r#""cpus":-1"#), "cpus".into()),
        (
            "POST /v1/sandboxes",
            sandbox(r#""cpus":1e300"#),
            "cpus".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""tmpfs":["/tmp/../../etc"]"#),
            "tmpfs[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""tmpfs":["/t\u0000x"]"#),
            "tmpfs[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""local_dir":"data""#),
            "local_dir".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""disks":["mrtst-lease:/d\nx"]"#),
            "disks[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""disks":["mrtst-lease:../x"]"#),
            "disks[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""lease_timeout_secs":-5"#),
            "lease_timeout_secs".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""publish":[{"host_ip":"1.2.3","host_port":8080,"port":80}]"#),
            "publish[0].host_ip".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""publish":[{"host_port":0,"port":80}]"#),
            "publish[0].host_port".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""allow_from":["a b"]"#),
            "allow_from[0]".into(),
        ),
        (
            "POST /v1/sandboxes",
            sandbox(r#""restart":"no\u001b[2J""#),
            "restart".into(),
        ),
        (
            "POST /v1/sandboxes",
            format!(r#"{{"image":"{IMAGE}","name":"bad\nname"}}"#),
            "name".into(),
        ),
        (
            "POST /v1/sandboxes",
            r#"{"image":"busybox\u0000:1"}"#.into(),
            "image".into(),
        ),
        (
            "POST /v1/sandboxes/loose/exec",
            r#"{"args":["sh","x\u0000"]}"#.into(),
            "args[1]".into(),
        ),
        (
            "POST /v1/sandboxes/loose/exec",
            r#"{"args":["true"],"env":["BAD\nKEY=1"]}"#.into(),
            "env[0]".into(),
        ),
        (
            "POST /v1/disks/mrtst-lease/lease",
            r#"{"holder":"me\u001b]0;owned\u0007"}"#.into(),
            "holder".into(),
        ),
        (
            "POST /v1/disks/mrtst-lease/lease",
            r#"{"holder":"me\nyou"}"#.into(),
            "holder".into(),
        ),
        (
            "POST /v1/disks/mrtst-lease/lease",
            r#"{"holder":"me","timeout_secs":-1}"#.into(),
            "timeout_secs".into(),
        ),
        (
            "POST /v1/images/pull",
            r#"{"reference":"busybox\n:1"}"#.into(),
            "reference".into(),
        ),
        (
            "POST /v1/images/import",
            r#"{"reference":"local/x:1","path":"rel/x.tar"}"#.into(),
            "path".into(),
        ),
        (
            "POST /v1/addons",
            r#"{"app":"a\nb","addon":"miren-postgresql"}"#.into(),
            "app".into(),
        ),
        (
            "POST /v1/addons",
            r#"{"app":"ab","addon":"miren-postgresql","version":"17\u0000"}"#.into(),
            "version".into(),
        ),
        (
            "POST /v1/sandboxes/loose/stop?grace_secs=-1",
            String::new(),
            "grace_secs".into(),
        ),
    ];
    for (route, body, field) in &cases {
        let (method, path) = route.split_once(' ').expect("METHOD path");
        let (code, answer) = agent.curl(method, path, (!body.is_empty()).then_some(body.as_str()));
        assert_eq!(code, 400, "{route} {body:?} was not refused: {answer}");
        let error: Value = serde_json::from_str(&answer).expect("error JSON");
        assert_eq!(
            error["code"], "invalid_argument",
            "{route} {body:?}: {answer}"
        );
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(field.as_str()),
            "{route} {body:?}: the message does not name {field}: {message}"
        );
    }

    // Nothing was recorded or made.
    let (_, sandboxes) = agent.curl("GET", "/v1/sandboxes", None);
    assert_eq!(sandboxes.trim(), "[]", "a refused run left a sandbox");
    let (_, leases) = agent.curl("GET", "/v1/leases", None);
    assert_eq!(leases.trim(), "[]", "a refused lease was recorded");
    let state_dirs = std::fs::read_dir(agent.data_dir.join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(state_dirs, 0, "a refused run left a state directory");
    let (_, addons) = agent.curl("GET", "/v1/apps/ab/addons", None);
    assert!(
        !addons.contains("miren-postgresql"),
        "a refused addon was recorded: {addons}"
    );
    let (code, body) = agent.curl("DELETE", "/v1/disks/mrtst-lease", None);
    assert_eq!(code, 204, "{body}");
}
