//! Hostile tests: network (see docs/security.md).
//!
//! Issue 10, finding 4: a published port is a DNAT rule, so publishing on an address that is
//! not the host's own (another sandbox's, another agent's bridge) or on a port a host service
//! listens on would take over traffic meant for someone else. Finding 7: sandboxes must not
//! reach the host itself, on any of its addresses, while published ports, egress through NAT
//! and an app's own endpoints keep working.
//!
//! Traffic only goes between this test's namespaces and the host's own addresses.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{ChildGuard, TestAgent};
use serde_json::{json, Value};

fn create_endpoint(agent: &TestAgent, owner: &str, app: &str, publish: Value) -> (u16, Value) {
    let body = json!({ "owner": owner, "app": app, "publish": publish }).to_string();
    let (status, text) = agent.curl("POST", "/v1/endpoints", Some(&body));
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// A create that must be refused with `status`; its message must contain `says`.
fn refused(agent: &TestAgent, owner: &str, publish: Value, status: u16, says: &str) {
    let (got, body) = create_endpoint(agent, owner, "attacker", publish.clone());
    assert_eq!(got, status, "publish {publish} answered {got}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(says),
        "publish {publish}: message {message:?} should say {says:?}"
    );
    let (status, _) = agent.curl("GET", &format!("/v1/endpoints/{owner}"), None);
    assert_eq!(status, 404, "a refused create left endpoint {owner} behind");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Accepts connections and answers each with `greeting`; records every peer. Stops on drop.
struct HostService {
    port: u16,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl HostService {
    fn start(listener: TcpListener, greeting: &'static [u8]) -> HostService {
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (peers.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        seen.lock().expect("peers").push(peer);
                        let _ = stream.write_all(greeting);
                    }
                    Err(_) => sleep(Duration::from_millis(5)),
                }
            }
        });
        HostService { port, peers, stop }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

impl Drop for HostService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn published_ports_cannot_take_over_traffic_meant_for_others() {
    let agent = TestAgent::start();
    let neighbour = TestAgent::start();
    let (status, victim) = create_endpoint(&agent, "victim", "shop", json!([]));
    assert_eq!(status, 201, "{victim}");
    let victim_ip = victim["ip"].as_str().expect("ip").to_string();
    let gateway = victim["gateway"].as_str().expect("gateway").to_string();
    let (status, other) = create_endpoint(&neighbour, "other", "blog", json!([]));
    assert_eq!(status, 201, "{other}");
    let neighbour_gateway = other["gateway"].as_str().expect("gateway").to_string();
    let port = free_port();
    let publish =
        |ip: &str, host_port: u16| json!([{ "host_ip": ip, "host_port": host_port, "port": 80 }]);

    // Addresses that are not the host's own: another sandbox's (its traffic would be
    // redirected), the gateway (every sandbox's way out), another agent's bridge, an address
    // of no interface, broadcast and multicast, IPv6.
    refused(
        &agent,
        "a1",
        publish(&victim_ip, port),
        400,
        "inside the sandbox subnet",
    );
    let err = agent.fails(&[
        "debug",
        "net",
        "create",
        "--owner",
        "a1",
        "--app",
        "attacker",
        "--publish",
        &format!("{victim_ip}:{port}:80"),
    ]);
    assert!(
        err.contains("inside the sandbox subnet"),
        "the CLI says why: {err}"
    );
    refused(
        &agent,
        "a2",
        publish(&gateway, port),
        400,
        "inside the sandbox subnet",
    );
    refused(
        &agent,
        "a3",
        publish(&neighbour_gateway, port),
        400,
        "another miren agent",
    );
    for ip in ["198.51.100.7", "255.255.255.255", "224.0.0.1"] {
        refused(
            &agent,
            "a4",
            publish(ip, port),
            400,
            "not an address of this host",
        );
    }
    refused(&agent, "a5", publish("::1", port), 400, "host_ip");

    // Ports: 0 and out of range; the same host address and port twice in one request
    // (0.0.0.0 overlaps every address).
    refused(
        &agent,
        "a6",
        publish("127.0.0.1", 0),
        400,
        "between 1 and 65535",
    );
    let (status, body) = create_endpoint(
        &agent,
        "a7",
        "attacker",
        json!([{ "host_port": 70000, "port": 80 }]),
    );
    assert_eq!(status, 400, "{body}");
    refused(
        &agent,
        "a8",
        json!([{ "host_port": port, "port": 80 }, { "host_ip": "0.0.0.0", "host_port": port, "port": 81 }]),
        400,
        "listed twice",
    );

    // Host services: on the exact address, through a wildcard listener (IPv4 and IPv6), and a
    // wildcard publish over a loopback-only service. Each keeps answering its own clients.
    let exact = HostService::start(TcpListener::bind("127.0.0.1:0").expect("bind"), b"exact");
    let wildcard = HostService::start(TcpListener::bind("0.0.0.0:0").expect("bind"), b"wild");
    refused(
        &agent,
        "a9",
        publish("127.0.0.1", exact.port),
        409,
        "a host service listens",
    );
    refused(
        &agent,
        "a10",
        publish("0.0.0.0", exact.port),
        409,
        "a host service listens",
    );
    refused(
        &agent,
        "a11",
        publish("127.0.0.1", wildcard.port),
        409,
        "a host service listens",
    );
    let host_ip = host_addresses(&agent)
        .into_iter()
        .next()
        .expect("the host has a non-loopback IPv4 address");
    refused(
        &agent,
        "a12",
        publish(&host_ip, wildcard.port),
        409,
        "a host service listens",
    );
    if let Ok(v6) = TcpListener::bind("[::]:0") {
        let dual = HostService::start(v6, b"dual");
        refused(
            &agent,
            "a13",
            publish("127.0.0.1", dual.port),
            409,
            "a host service listens",
        );
    }
    for (service, greeting) in [(&exact, "exact"), (&wildcard, "wild")] {
        let mut stream = TcpStream::connect(("127.0.0.1", service.port)).expect("connect");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        assert_eq!(text, greeting, "the host service was shadowed");
    }

    // A port another endpoint publishes, on the same address or through a wildcard.
    let (status, body) = create_endpoint(&agent, "first", "site", publish("127.0.0.1", port));
    assert_eq!(status, 201, "{body}");
    refused(
        &agent,
        "a14",
        publish("127.0.0.1", port),
        409,
        "already published",
    );
    refused(
        &agent,
        "a15",
        publish("0.0.0.0", port),
        409,
        "already published",
    );

    // A legitimate publish on a host interface's address still works.
    let (status, body) = create_endpoint(&agent, "second", "site", publish(&host_ip, free_port()));
    assert_eq!(status, 201, "{body}");
    let (_, list) = agent.curl("GET", "/v1/endpoints", None);
    let owners: Vec<String> = serde_json::from_str::<Vec<Value>>(&list)
        .expect("endpoint list")
        .iter()
        .map(|e| e["owner"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        owners.len(),
        3,
        "only victim, first and second exist: {owners:?}"
    );
}

/// IPv4 addresses of the host's interfaces, loopback and miren bridges (test agents') left out.
fn host_addresses(agent: &TestAgent) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains(" lo ") && !l.contains(&agent.prefix) && !l.contains("mr"))
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .collect()
}

/// IPv6 link-local address of the agent's bridge, as a sandbox would use it (`addr%eth0`).
fn bridge_link_local(agent: &TestAgent) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            &format!("{}0", agent.prefix),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("scope link"))
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .map(|ip| format!("{ip}%eth0"))
        .next()
}

const PROBE: &str = r#"
import socket, sys
port, udp_port, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for target in sys.argv[4:]:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        u = socket.socket(family, socket.SOCK_DGRAM)
        u.sendto(b"probe", (target, udp_port)); u.close()
    except Exception:
        pass
    try:
        c = socket.create_connection((target, port), timeout=timeout)
        c.settimeout(timeout)
        data = c.recv(100)
        print(target, "REACHED", data.decode(errors="replace"))
    except Exception as e:
        print(target, "refused:", e)
"#;

/// From inside `netns`: one TCP connect and one UDP datagram to each target; the lines printed.
fn probe_from(netns: &str, port: u16, udp_port: u16, targets: &[String]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["python3", "-c", PROBE])
        .args([port.to_string(), udp_port.to_string(), "1.0".to_string()])
        .args(targets)
        .output()
        .expect("nsenter python3");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()
"#;

fn serve_in(netns: &str, port: u16, greeting: &str) -> ChildGuard {
    ChildGuard(
        Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["python3", "-c", SERVER, &port.to_string(), greeting])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsenter python3"),
    )
}

/// Reads what `ip:port` says, from inside `netns` (None: the host), retrying while the
/// server starts.
fn eventually_reads(netns: Option<&str>, ip: &str, port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={ns}")).arg("python3");
                c
            }
            None => Command::new("python3"),
        };
        let out = cmd
            .args(["-c", PROBE, &port.to_string(), "9", "1.0", ip])
            .output()
            .expect("python3");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(data) = text.split(" REACHED ").nth(1) {
            return data.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "cannot reach {ip}:{port}: {text}"
        );
        sleep(Duration::from_millis(100));
    }
}

/// A stand-in for the outside world: a namespace linked to the host by a veth on a /30 of a
/// subnet no other test uses; removed on drop (its link also by the harness, by prefix).
struct Outside {
    name: String,
    ip: String,
}

impl Outside {
    fn new(prefix: &str) -> Outside {
        let subnet = miren_vm_tests::unique_subnet();
        let network: Ipv4Addr = subnet
            .split('/')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("subnet");
        let host_ip = Ipv4Addr::from(u32::from(network) + 1);
        let ip = Ipv4Addr::from(u32::from(network) + 2);
        let outside = Outside {
            name: format!("{prefix}o"),
            ip: ip.to_string(),
        };
        let name = outside.name.as_str();
        for args in [
            vec!["netns", "add", name],
            vec![
                "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", name],
            vec!["link", "set", name, "up"],
            vec![
                "-n",
                name,
                "addr",
                "add",
                &format!("{ip}/30"),
                "dev",
                "eth0",
            ],
            vec!["-n", name, "link", "set", "eth0", "up"],
            vec!["-n", name, "link", "set", "lo", "up"],
        ] {
            let status = Command::new("ip").args(&args).status().expect("ip");
            assert!(status.success(), "ip {args:?}");
        }
        outside
    }

    fn netns(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for args in [
            vec!["link", "del", &self.name],
            vec!["netns", "del", &self.name],
        ] {
            let _ = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn sandboxes_cannot_reach_the_host_but_published_ports_and_egress_work() {
    let agent = TestAgent::start();
    // Host services a sandbox could try: TCP on every address (IPv6 too where it exists), UDP.
    let listener = TcpListener::bind("[::]:0").or_else(|_| TcpListener::bind("0.0.0.0:0"));
    let host = HostService::start(listener.expect("bind"), b"host-secret");
    let udp = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let udp_port = udp.local_addr().expect("addr").port();

    let web_port = free_port();
    let any_port = free_port();
    let publish = json!([
        { "host_port": web_port, "port": 8080 },
        { "host_ip": "0.0.0.0", "host_port": any_port, "port": 8080 },
    ]);
    let (status, web) = create_endpoint(&agent, "web", "shop", publish);
    assert_eq!(status, 201, "{web}");
    let (status, worker) = create_endpoint(&agent, "worker", "shop", json!([]));
    assert_eq!(status, 201, "{worker}");
    let web_ns = web["netns_path"].as_str().expect("netns").to_string();
    let worker_ns = worker["netns_path"].as_str().expect("netns").to_string();
    let web_ip = web["ip"].as_str().expect("ip").to_string();
    let gateway = web["gateway"].as_str().expect("gateway").to_string();
    let _web_server = serve_in(&web_ns, 8080, "hello-from-web");

    // What must keep working: the app's own endpoints, the host to an endpoint, published
    // ports (loopback and every host address), egress through NAT.
    assert_eq!(
        eventually_reads(Some(&worker_ns), &web_ip, 8080),
        "hello-from-web"
    );
    assert_eq!(eventually_reads(None, &web_ip, 8080), "hello-from-web");
    assert_eq!(
        eventually_reads(None, "127.0.0.1", web_port),
        "hello-from-web"
    );
    let host_ips = host_addresses(&agent);
    for ip in &host_ips {
        assert_eq!(eventually_reads(None, ip, any_port), "hello-from-web");
    }
    let outside = Outside::new(&agent.prefix);
    let _outside_server = serve_in(&outside.netns(), 9000, "hello-from-outside");
    assert_eq!(
        eventually_reads(Some(&worker_ns), &outside.ip, 9000),
        "hello-from-outside"
    );

    // The attack: from inside an endpoint, the host's services through the gateway, every
    // other address of the host and the gateway link's IPv6 link-local address (if it has one).
    let mut targets = vec![gateway.clone()];
    targets.extend(host_ips.iter().cloned());
    targets.extend(bridge_link_local(&agent));
    let seen_before = host.peers().len();
    let report = probe_from(&worker_ns, host.port, udp_port, &targets);
    assert!(
        !report.contains("REACHED"),
        "a sandbox reached the host:\n{report}"
    );
    assert_eq!(
        report.lines().count(),
        targets.len(),
        "every target was probed:\n{report}"
    );
    assert_eq!(
        host.peers().len(),
        seen_before,
        "the host service accepted a sandbox's connection: {:?}",
        host.peers()
    );
    let mut buf = [0u8; 16];
    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
        panic!("a sandbox's datagram reached a host UDP service from {peer}");
    }
    // The host's own clients still get the service.
    let mut stream = TcpStream::connect(("127.0.0.1", host.port)).expect("connect");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    assert_eq!(text, "host-secret");
}
