//! A real S3-compatible server for backup-target tests: SeaweedFS's `weed mini` (master, volume,
//! filer and S3 gateway in one process) on loopback, with its own data dir under
//! `/tmp/mrtst-s3-*`, its own ports and one access key. `scripts/setup` installs it.
//!
//! Stopped (and its data removed) on Drop, also when a test fails. `stop`/`resume` keep the
//! data, so a test can make the target unreachable for a while.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::random_hex;

pub const WEED: &str = "/opt/miren-seaweedfs/bin/weed";
pub const ACCESS_KEY: &str = "mrtstkey";

pub struct SeaweedFs {
    pub root: PathBuf,
    pub bucket: String,
    /// `http://127.0.0.1:PORT` of the S3 gateway.
    pub endpoint: String,
    /// A root-only file with the access key, for `credentials=` in a target URL.
    pub credentials_file: PathBuf,
    filer_port: u16,
    base_port: u16,
    child: Option<Child>,
}

/// A base port whose block (the ports `weed mini` takes, and their gRPC twins at +10000) is free,
/// and below the kernel's ephemeral range: the server is stopped and started again on the same
/// ports (an outage), and meanwhile any outgoing connection on the host may be given one of them.
fn free_base_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Blocks of 10 from 11000 up, twins included, below the ephemeral range.
    let blocks = ephemeral_low.saturating_sub(11000 + 10000 + 10) / 10;
    assert!(
        blocks > 0,
        "the ephemeral port range starts too low ({ephemeral_low}) for SeaweedFS's ports"
    );
    for _ in 0..200 {
        let mut byte = [0u8; 2];
        getrandom::fill(&mut byte).expect("randomness");
        let base = 11000 + (u16::from_le_bytes(byte) % blocks) * 10;
        let all_free = (0..10)
            .flat_map(|i| [base + i, base + i + 10000])
            .all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no free block of ports for SeaweedFS on loopback");
}

impl SeaweedFs {
    /// Starts a server with one bucket and waits until its S3 gateway answers.
    pub fn start() -> SeaweedFs {
        assert!(
            std::path::Path::new(WEED).exists(),
            "{WEED} not found: run scripts/setup (it installs SeaweedFS from PyPI)"
        );
        let root = PathBuf::from(format!("/tmp/mrtst-s3-{}", random_hex(8)));
        fs::create_dir_all(root.join("data")).expect("seaweedfs data dir");
        let secret = random_hex(32);
        let config = serde_json::json!({
            "identities": [{
                "name": "miren-tests",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }]
        });
        fs::write(root.join("s3.json"), config.to_string()).expect("s3 config");
        let credentials_file = root.join("credentials.env");
        fs::write(
            &credentials_file,
            format!("AWS_ACCESS_KEY_ID={ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={secret}\n"),
        )
        .expect("credentials file");
        fs::set_permissions(&credentials_file, fs::Permissions::from_mode(0o600))
            .expect("credentials file mode");
        let base_port = free_base_port();
        let mut server = SeaweedFs {
            root,
            bucket: "mrtst".to_string(),
            endpoint: format!("http://127.0.0.1:{}", base_port + 3),
            credentials_file,
            filer_port: base_port + 2,
            base_port,
            child: None,
        };
        server.resume();
        server
    }

    /// `NAME=s3://BUCKET/PREFIX?endpoint=..&credentials=..` for `miren agent --backup-target`.
    pub fn target_arg(&self, name: &str, prefix: &str) -> String {
        format!(
            "{name}=s3://{}/{prefix}?endpoint={}&credentials={}",
            self.bucket,
            self.endpoint,
            self.credentials_file.display()
        )
    }

    /// Starts (again) on the same ports and data.
    pub fn resume(&mut self) {
        if self.child.is_some() {
            return;
        }
        let p = self.base_port;
        let log = fs::File::create(self.root.join("weed.log")).expect("weed log");
        let child = Command::new(WEED)
            .arg("mini")
            .arg(format!("-dir={}", self.root.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={p}"))
            .arg(format!("-volume.port={}", p + 1))
            .arg(format!("-filer.port={}", p + 2))
            .arg(format!("-s3.port={}", p + 3))
            .arg(format!("-webdav.port={}", p + 4))
            .arg(format!("-admin.port={}", p + 5))
            .arg(format!("-s3.port.iceberg={}", p + 6))
            .arg(format!("-s3.port.lance={}", p + 7))
            .arg(format!("-metricsPort={}", p + 8))
            .arg("-admin.ui=false")
            .arg(format!(
                "-s3.config={}",
                self.root.join("s3.json").display()
            ))
            .arg(format!("-bucket={}", self.bucket))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("weed log"))
            .stderr(log)
            .spawn()
            .expect("starting weed mini");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // An unsigned request to the bucket: 403 once the gateway and its bucket are up.
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("{}/{}/", self.endpoint, self.bucket))
                .output()
                .expect("curl");
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            if code == "403" || code == "200" {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("weed mini exited ({status}): {}", self.log_text());
                }
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not come up in 90 s: {}",
                self.log_text()
            );
            sleep(Duration::from_millis(300));
        }
    }

    /// Stops the server but keeps its data: the target is unreachable until `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.root.join("weed.log")).unwrap_or_default()
    }

    /// The object's bytes, read through the filer (where the bucket's objects are files), or
    /// None when there is no such object.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        let out = Command::new("curl")
            .args(["-s", "-f"])
            .arg(self.filer_url(key))
            .output()
            .expect("curl");
        out.status.success().then_some(out.stdout)
    }

    /// Keys of the objects under `prefix` (a directory, without trailing `/`), recursively.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        self.collect_keys(prefix.trim_matches('/'), &mut keys);
        keys.sort();
        keys
    }

    fn collect_keys(&self, dir: &str, keys: &mut Vec<String>) {
        let out = Command::new("curl")
            .args(["-s", "-f", "-H", "Accept: application/json"])
            .arg(format!("{}/?limit=10000", self.filer_url(dir)))
            .output()
            .expect("curl");
        if !out.status.success() {
            return;
        }
        let listing: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        for entry in listing["Entries"].as_array().into_iter().flatten() {
            let full = entry["FullPath"].as_str().unwrap_or_default();
            let bucket_root = format!("/buckets/{}/", self.bucket);
            let Some(key) = full.strip_prefix(&bucket_root) else {
                continue;
            };
            // A directory has mode bit 0x80000000 (Go's os.ModeDir).
            let is_dir = entry["Mode"].as_u64().unwrap_or(0) & 0x8000_0000 != 0;
            if is_dir {
                self.collect_keys(key, keys);
            } else {
                keys.push(key.to_string());
            }
        }
    }

    fn filer_url(&self, key: &str) -> String {
        format!(
            "http://127.0.0.1:{}/buckets/{}/{}",
            self.filer_port,
            self.bucket,
            key.trim_start_matches('/')
        )
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}
