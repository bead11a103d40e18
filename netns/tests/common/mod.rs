//! Shared helpers for the privileged tests: unique names, a cleanup guard,
//! and TCP traffic from inside namespaces. Traffic only ever goes to
//! addresses on the test's own bridge or to the host loopback.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miren_netns::{NetConfig, Subnet};
use nix::sched::{setns, CloneFlags};

pub fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

/// Owns one test network: uninstalls it (bridge, veths, netns mounts, tables)
/// and removes its runtime dir on drop, also when the test panics.
pub struct TestNet {
    pub cfg: NetConfig,
}

impl TestNet {
    /// `subnet` must be unique to the calling test.
    pub fn new(subnet: &str) -> TestNet {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the miren-netns integration tests need root (netns, veth, nftables)"
        );
        let prefix = format!("mrtst{:03x}", random_u64() & 0xfff);
        let subnet: Subnet = subnet.parse().expect("test subnet");
        let runtime_dir = PathBuf::from(format!("/run/{prefix}-netns"));
        let cfg = NetConfig::new(&prefix, subnet, runtime_dir).expect("test config");
        TestNet { cfg }
    }

    pub fn ip(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cfg.subnet().network()) + host)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let cfg = self.cfg.clone();
        // Drop may run inside the test's runtime: clean up on a thread of our own.
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            let result = runtime.block_on(miren_netns::uninstall(&cfg));
            let _ = std::fs::remove_dir(cfg.runtime_dir());
            result
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of {} failed: {e}", self.cfg.prefix()),
            Err(_) => eprintln!("cleanup of {} panicked", self.cfg.prefix()),
        }
    }
}

fn enter(netns: &Path) {
    let file = File::open(netns).expect("open netns file");
    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// A TCP server inside a namespace answering "pong" to each connection until stopped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Source address of the last client served.
    pub last_peer: Arc<std::sync::Mutex<Option<SocketAddr>>>,
}

impl Server {
    pub fn start(netns: &Path, port: u16) -> Server {
        let netns = netns.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let last_peer = Arc::new(std::sync::Mutex::new(None));
        let peer_slot = last_peer.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&netns);
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind in netns");
            listener.set_nonblocking(true).expect("nonblocking");
            let _ = ready_tx.send(());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop_flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        if let Ok(mut slot) = peer_slot.lock() {
                            *slot = Some(peer);
                        }
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4];
                        if stream.read_exact(&mut buf).is_ok() && &buf == b"ping" {
                            let _ = stream.write_all(b"pong");
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server ready");
        Server {
            stop,
            thread: Some(thread),
            last_peer,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether a UDP datagram sent from inside `from` to `addr:port` reaches a socket bound to
/// that port inside `to`: one datagram is all a one-way attack (a spoofed source) needs.
pub fn udp_arrives(to: &Path, from: &Path, addr: Ipv4Addr, port: u16) -> bool {
    let (to, from) = (to.to_path_buf(), from.to_path_buf());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        enter(&to);
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind udp in netns");
        socket
            .set_read_timeout(Some(Duration::from_millis(1000)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let mut buf = [0u8; 16];
        socket.recv(&mut buf).is_ok()
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("receiver ready");
    std::thread::spawn(move || {
        enter(&from);
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        for _ in 0..3 {
            let _ = socket.send_to(b"probe", (addr, port));
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .join()
    .expect("sender");
    receiver.join().expect("receiver")
}

/// Ping-pong with `addr:port`, from inside `netns` or (None) from the host.
pub fn can_talk(netns: Option<&Path>, addr: Ipv4Addr, port: u16) -> bool {
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(ns) = &netns {
            enter(ns);
        }
        let target = SocketAddr::V4(SocketAddrV4::new(addr, port));
        let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_millis(1500))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = [0u8; 4];
        stream.write_all(b"ping").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"pong"
    })
    .join()
    .unwrap_or(false)
}

/// Names of host interfaces starting with `prefix`.
pub fn host_links_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .expect("read /sys/class/net")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// Mount points under `dir` (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = dir.to_string_lossy().to_string();
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|mount_point| mount_point.starts_with(&dir))
        .count()
}

/// `nft list table <family> <name>` output, or None when the table is absent.
pub fn nft_table(family: &str, name: &str) -> Option<String> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", family, name])
        .output()
        .expect("run nft");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// A stand-in for "the outside world": a namespace linked to the host by a
/// veth on a /30, removed on drop. Traffic to it never leaves the machine.
pub struct Outside {
    pub name: String,
    pub netns_path: PathBuf,
    pub host_ip: Ipv4Addr,
    pub ip: Ipv4Addr,
}

fn ip_cmd(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args:?}");
}

impl Outside {
    /// `net30` like "10.229.0.0": host gets .1, the outside namespace .2.
    pub fn new(prefix: &str, net30: Ipv4Addr) -> Outside {
        let name = format!("{prefix}o");
        let host_ip = Ipv4Addr::from(u32::from(net30) + 1);
        let ip = Ipv4Addr::from(u32::from(net30) + 2);
        let outside = Outside {
            netns_path: PathBuf::from(format!("/run/netns/{name}")),
            name: name.clone(),
            host_ip,
            ip,
        };
        ip_cmd(&["netns", "add", &name]);
        ip_cmd(&[
            "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip_cmd(&["addr", "add", &format!("{host_ip}/30"), "dev", &name]);
        ip_cmd(&["link", "set", &name, "up"]);
        ip_cmd(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            "eth0",
        ]);
        ip_cmd(&["-n", &name, "link", "set", "eth0", "up"]);
        ip_cmd(&["-n", &name, "link", "set", "lo", "up"]);
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for args in [
            vec!["link", "del", &self.name],
            vec!["netns", "del", &self.name],
        ] {
            let _ = std::process::Command::new("ip")
                .args(&args)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
