//! What one endpoint's create costs with N already there: `endpoint_scale [N] [FIRST]` makes N
//! endpoints (netns, routed veth, addresses, then its rules, as the agent does) one
//! after another and prints the mean milliseconds of each tenth of the link and the rules
//! steps. Needs root; uses the fixed prefix `mrbench7` (so one run at a time; `scripts/cleanup`
//! matches it) and 10.237.0.0/16; removes all it made unless `KEEP` is set (a later run with
//! FIRST past the last one adds more; one with N=0 removes them). `docs/netns.md` "Scaling"
//! has what it showed.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use miren_netns::{
    add_endpoint_rules, create_endpoint, ensure_bridge_and_table, uninstall, EndpointSpec,
    NetConfig,
};

type BoxError = Box<dyn std::error::Error>;

const PREFIX: &str = "mrbench7";

fn spec(i: u32) -> EndpointSpec {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 237, 0, 10)) + i);
    EndpointSpec::new(format!("o{i}"), format!("app{}", i % 50), ip)
}

fn tenths(samples: &[f64]) -> String {
    let tenth = (samples.len() / 10).max(1);
    samples
        .chunks(tenth)
        .map(|c| format!("{:.2}", c.iter().sum::<f64>() / c.len() as f64))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(cfg: &NetConfig, first: u32, n: u32) -> Result<(), BoxError> {
    ensure_bridge_and_table(cfg).await?;
    let (mut link, mut rules) = (Vec::new(), Vec::new());
    for i in first..first + n {
        let spec = spec(i);
        let started = Instant::now();
        create_endpoint(cfg, &spec).await?;
        let linked = Instant::now();
        add_endpoint_rules(cfg, &spec).await?;
        link.push((linked - started).as_secs_f64() * 1e3);
        rules.push(linked.elapsed().as_secs_f64() * 1e3);
    }
    if n > 0 {
        println!("link, ms by tenth: {}", tenths(&link));
        println!("rules, ms by tenth: {}", tenths(&rules));
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500);
    let first: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0);
    let runtime_dir = PathBuf::from(format!("/run/{PREFIX}-netns"));
    std::fs::create_dir_all(&runtime_dir)?;
    let cfg = NetConfig::new(PREFIX, "10.237.0.0/16".parse()?, &runtime_dir)?;
    let outcome = run(&cfg, first, n).await;
    if n == 0 || std::env::var_os("KEEP").is_none() {
        uninstall(&cfg).await?;
        let _ = std::fs::remove_dir_all(&runtime_dir);
    }
    outcome
}
