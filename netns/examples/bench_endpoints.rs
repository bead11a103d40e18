//! Endpoint setup + teardown latency: this crate vs the CNI reference plugins
//! (`bridge` + `host-local`), run side by side. Used by `bench/net`.
//!
//! `bench_endpoints [ITERATIONS] [CNI_PATH]`; needs root. Prints the medians
//! and one final `RESULT net-endpoint-vs-cni ...` line. Removes all it made.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use miren_netns::{
    apply_rules, create_endpoint, delete_endpoint, ensure_bridge_and_table, uninstall,
    EndpointSpec, NetConfig,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

type BoxError = Box<dyn std::error::Error>;

const WARMUP: usize = 5;

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What a container runtime does before calling CNI: a new netns pinned by a
/// bind mount (done in-process, as this crate does it, so both sides pay the same).
fn make_netns(path: &Path) -> Result<(), BoxError> {
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    std::thread::spawn(move || -> Result<(), nix::Error> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .map_err(|_| "netns thread panicked")??;
    Ok(())
}

fn remove_netns(path: &Path) -> Result<(), BoxError> {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

struct Cni {
    plugin_dir: PathBuf,
    config: String,
}

impl Cni {
    fn call(&self, command: &str, id: &str, netns: &Path) -> Result<(), BoxError> {
        let mut child = Command::new(self.plugin_dir.join("bridge"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.plugin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(self.config.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            return Err(format!(
                "CNI {command} {id} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        Ok(())
    }
}

async fn delete_link(name: &str) -> Result<(), BoxError> {
    use futures::TryStreamExt;
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    if let Ok(Some(link)) = links.try_next().await {
        handle.link().del(link.header.index).execute().await?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let iterations: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    if iterations == 0 {
        return Err("ITERATIONS must be at least 1".into());
    }
    let plugin_dir = PathBuf::from(args.next().unwrap_or_else(|| "/usr/lib/cni".into()));
    let tag = format!("{:03x}", std::process::id() & 0xfff);
    let runtime_dir = PathBuf::from(format!("/run/mrbench{tag}"));
    let cfg = NetConfig::new(
        &format!("mrbn{tag}"),
        "10.238.0.0/24".parse()?,
        &runtime_dir,
    )?;
    let cni_bridge = format!("mrbc{tag}0");
    let cni_ipam_dir = runtime_dir.join("cni-ipam");
    let cni = Cni {
        plugin_dir,
        config: serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("mrbc{tag}"),
            "type": "bridge",
            "bridge": cni_bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.239.0.0/24" }]],
                "dataDir": cni_ipam_dir,
            },
        })
        .to_string(),
    };
    std::fs::create_dir_all(&runtime_dir)?;

    let outcome = run(iterations, &cfg, &cni, &runtime_dir).await;

    // Clean up whatever happened above.
    let cleanup_ours = uninstall(&cfg).await;
    let cleanup_cni = delete_link(&cni_bridge).await;
    let _ = std::fs::remove_dir_all(&cni_ipam_dir);
    let _ = std::fs::remove_dir_all(&runtime_dir);
    let (ours, cni_total) = outcome?;
    cleanup_ours?;
    cleanup_cni?;
    println!(
        "RESULT net-endpoint-vs-cni ours={:.6} cni={:.6} ratio={:.3}",
        ours.as_secs_f64(),
        cni_total.as_secs_f64(),
        ours.as_secs_f64() / cni_total.as_secs_f64()
    );
    Ok(())
}

async fn run(
    iterations: usize,
    cfg: &NetConfig,
    cni: &Cni,
    runtime_dir: &Path,
) -> Result<(Duration, Duration), BoxError> {
    ensure_bridge_and_table(cfg).await?;
    let ip = Ipv4Addr::new(10, 238, 0, 10);
    let (mut ours_total, mut ours_setup, mut ours_teardown, mut ours_netlink) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cni_total, mut cni_setup, mut cni_teardown) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUP + iterations {
        // Ours: endpoint + full ruleset apply, then delete + apply the empty set.
        let spec = EndpointSpec::new(format!("bench-{i}"), "bench", ip);
        let started = Instant::now();
        create_endpoint(cfg, &spec).await?;
        let created = Instant::now();
        apply_rules(cfg, std::slice::from_ref(&spec)).await?;
        let set_up = Instant::now();
        delete_endpoint(cfg, &spec.owner).await?;
        let deleted = Instant::now();
        apply_rules(cfg, &[]).await?;
        let torn_down = Instant::now();

        // CNI, as a runtime calls it: netns, ADD; DEL, netns removal.
        let netns = runtime_dir.join(format!("cni-{i}"));
        let id = format!("bench-{i}");
        let cni_started = Instant::now();
        make_netns(&netns)?;
        cni.call("ADD", &id, &netns)?;
        let cni_set_up = Instant::now();
        cni.call("DEL", &id, &netns)?;
        remove_netns(&netns)?;
        let cni_torn_down = Instant::now();

        if i >= WARMUP {
            ours_total.push(torn_down - started);
            ours_setup.push(set_up - started);
            ours_teardown.push(torn_down - set_up);
            ours_netlink.push((created - started) + (deleted - set_up));
            cni_total.push(cni_torn_down - cni_started);
            cni_setup.push(cni_set_up - cni_started);
            cni_teardown.push(cni_torn_down - cni_set_up);
        }
    }
    let ours = median(&mut ours_total);
    let cni_median = median(&mut cni_total);
    println!("iterations: {iterations} (after {WARMUP} warm-up), subnet size /24 on both sides");
    println!(
        "ours: setup {:.2} ms + teardown {:.2} ms, total {:.2} ms (of which netns+netlink only {:.2} ms; the rest is two `nft` runs)",
        ms(median(&mut ours_setup)),
        ms(median(&mut ours_teardown)),
        ms(ours),
        ms(median(&mut ours_netlink)),
    );
    println!(
        "cni bridge+host-local (ipMasq off): ADD {:.2} ms + DEL {:.2} ms, total {:.2} ms (netns creation included)",
        ms(median(&mut cni_setup)),
        ms(median(&mut cni_teardown)),
        ms(cni_median),
    );
    Ok((ours, cni_median))
}
