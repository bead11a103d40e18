//! Prints the nftables JSON batch for a small sample: `cargo run --example ruleset`.

use std::net::Ipv4Addr;

use miren_netns::{ruleset_json, EndpointSpec, NetConfig, PublishedPort};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = NetConfig::new("miren", "10.88.0.0/16".parse()?, "/run/miren/netns")?;
    let mut web = EndpointSpec::new("web-1", "shop", Ipv4Addr::new(10, 88, 0, 2));
    web.allow_from = vec!["blog".into()];
    web.publish = vec![PublishedPort::loopback(8080, 80)];
    let blog = EndpointSpec::new("blog-1", "blog", Ipv4Addr::new(10, 88, 0, 3));
    println!(
        "{}",
        serde_json::to_string_pretty(&ruleset_json(&cfg, &[web, blog])?)?
    );
    Ok(())
}
