//! Real-kernel tests (root only): traffic between endpoints and from the host.

mod common;

use common::{can_talk, udp_arrives, Outside, Server, TestNet};
use miren_netns::{
    add_endpoint_rules, apply_rules, change_admission, create_endpoint, ensure_bridge_and_table,
    remove_endpoint_rules, EndpointSpec, PublishedPort,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_app_talks_other_app_only_when_allowed() {
    let net = TestNet::new("10.231.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");

    let web = EndpointSpec::new("web-1", "shop", net.ip(2));
    let worker = EndpointSpec::new("worker-1", "shop", net.ip(3));
    let mut intruder = EndpointSpec::new("other-1", "blog", net.ip(4));
    let web_ep = create_endpoint(cfg, &web).await.expect("web");
    let worker_ep = create_endpoint(cfg, &worker).await.expect("worker");
    let intruder_ep = create_endpoint(cfg, &intruder).await.expect("intruder");
    apply_rules(cfg, &[web.clone(), worker.clone(), intruder.clone()])
        .await
        .expect("rules");

    let _server = Server::start(&web_ep.netns_path, 8080);
    assert!(
        can_talk(Some(&worker_ep.netns_path), web.ip, 8080),
        "same app must connect"
    );
    assert!(
        !can_talk(Some(&intruder_ep.netns_path), web.ip, 8080),
        "other app must be blocked"
    );
    // The gateway (host) can reach endpoints, and the blocked app still reaches the gateway side.
    assert!(can_talk(None, web.ip, 8080), "host reaches endpoint");

    let mut web_allowing = web.clone();
    web_allowing.allow_from = vec!["blog".into()];
    apply_rules(cfg, &[web_allowing, worker.clone(), intruder.clone()])
        .await
        .expect("rules with allow_from");
    assert!(
        can_talk(Some(&intruder_ep.netns_path), web.ip, 8080),
        "allow_from must let the other app in"
    );
    // allow_from is one-way: web's app may not open connections to blog.
    let _intruder_server = Server::start(&intruder_ep.netns_path, 8081);
    assert!(!can_talk(Some(&worker_ep.netns_path), intruder.ip, 8081));

    // A sandbox that takes an address of the allowed app is cut off by the source address
    // check: "ghost" is in the rules (its address admitted to web) but not in the kernel, so
    // without the check the spoofer's datagrams would reach web. A routed endpoint's replies
    // follow the spoofed address's route, never back to the spoofer, so a one-way datagram
    // is what such an attack has.
    intruder.allow_from.clear();
    let ghost = EndpointSpec::new("ghost-1", "shop", net.ip(5));
    apply_rules(cfg, &[web.clone(), worker, intruder, ghost.clone()])
        .await
        .expect("rules");
    let udp_port = 8082;
    assert!(
        udp_arrives(&web_ep.netns_path, &worker_ep.netns_path, web.ip, udp_port),
        "same app's datagram"
    );
    assert!(!udp_arrives(
        &web_ep.netns_path,
        &intruder_ep.netns_path,
        web.ip,
        udp_port
    ));
    let ns = intruder_ep.netns_path.to_string_lossy().to_string();
    let spoofed = format!("{}/32", ghost.ip);
    let gateway = cfg.gateway().to_string();
    for args in [
        vec!["addr", "flush", "dev", "eth0"],
        vec!["addr", "add", spoofed.as_str(), "dev", "eth0"],
        vec![
            "route",
            "replace",
            "default",
            "via",
            gateway.as_str(),
            "dev",
            "eth0",
            "onlink",
        ],
    ] {
        let status = std::process::Command::new("nsenter")
            .arg(format!("--net={ns}"))
            .arg("ip")
            .args(&args)
            .status()
            .expect("nsenter ip");
        assert!(status.success());
    }
    assert!(
        !udp_arrives(
            &web_ep.netns_path,
            &intruder_ep.netns_path,
            web.ip,
            udp_port
        ),
        "a spoofed source address got through"
    );
    assert!(!can_talk(Some(&intruder_ep.netns_path), net.ip(2), 8080));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_port_reachable_from_host_loopback() {
    let net = TestNet::new("10.232.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let host_port = 20000 + (common::random_u64() % 20000) as u16;
    let mut spec = EndpointSpec::new("db-1", "db", net.ip(10));
    let any_port = host_port + 1;
    spec.publish = vec![
        PublishedPort::loopback(host_port, 5432),
        PublishedPort {
            host_ip: std::net::Ipv4Addr::UNSPECIFIED,
            host_port: any_port,
            endpoint_port: 5432,
        },
    ];
    let endpoint = create_endpoint(cfg, &spec).await.expect("endpoint");
    apply_rules(cfg, std::slice::from_ref(&spec))
        .await
        .expect("rules");

    let _server = Server::start(&endpoint.netns_path, 5432);
    assert!(
        can_talk(None, std::net::Ipv4Addr::LOCALHOST, host_port),
        "127.0.0.1:{host_port} must reach the endpoint"
    );
    // 0.0.0.0 means every local address, e.g. the gateway's.
    assert!(can_talk(None, cfg.gateway(), any_port));
    assert!(!can_talk(None, std::net::Ipv4Addr::LOCALHOST, any_port + 1));
    spec.publish.clear();
    apply_rules(cfg, &[spec]).await.expect("rules");
    assert!(!can_talk(None, std::net::Ipv4Addr::LOCALHOST, host_port));
}

/// Host veths have route_localnet=1 (for published ports); a sandbox that
/// routes 127.0.0.0/8 to the gateway must still not reach host-only services.
/// UDP, because one datagram is all such an attack needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_cannot_reach_host_loopback_services() {
    let net = TestNet::new("10.230.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let spec = EndpointSpec::new("curious-1", "curious", net.ip(2));
    let endpoint = create_endpoint(cfg, &spec).await.expect("endpoint");
    apply_rules(cfg, &[spec]).await.expect("rules");

    let host_service = std::net::UdpSocket::bind("127.0.0.1:0").expect("host socket");
    let port = host_service.local_addr().expect("addr").port();
    let ns = endpoint.netns_path.to_string_lossy().to_string();
    let gateway = cfg.gateway().to_string();
    let script = format!(
        "set -e; echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet; \
         ip route del local 127.0.0.0/8 dev lo table local; \
         ip route del local 127.0.0.1 dev lo table local; \
         ip route add 127.0.0.0/8 via {gateway} dev eth0 onlink; \
         for i in 1 2 3; do echo probe > /dev/udp/127.0.0.1/{port}; sleep 0.1; done"
    );
    let status = std::process::Command::new("nsenter")
        .arg(format!("--net={ns}"))
        .args(["bash", "-c", &script])
        .status()
        .expect("nsenter bash");
    assert!(status.success(), "probing from the sandbox");
    host_service
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert!(
        host_service.recv(&mut buf).is_err(),
        "a sandbox reached a host loopback service"
    );
}

/// Egress is masqueraded to the host's address; the outside cannot open
/// connections into an endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_masqueraded_and_inbound_is_refused() {
    let net = TestNet::new("10.228.0.0/24");
    let cfg = &net.cfg;
    let outside = Outside::new(cfg.prefix(), std::net::Ipv4Addr::new(10, 229, 0, 0));
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let spec = EndpointSpec::new("app-1", "app", net.ip(2));
    let endpoint = create_endpoint(cfg, &spec).await.expect("endpoint");
    apply_rules(cfg, std::slice::from_ref(&spec))
        .await
        .expect("rules");

    let server = Server::start(&outside.netns_path, 9000);
    assert!(
        can_talk(Some(&endpoint.netns_path), outside.ip, 9000),
        "egress"
    );
    let seen = server.last_peer.lock().expect("lock").map(|a| a.ip());
    assert_eq!(
        seen,
        Some(std::net::IpAddr::V4(outside.host_ip)),
        "masqueraded"
    );

    let status = std::process::Command::new("ip")
        .args(["-n", &outside.name, "route", "add"])
        .arg(cfg.subnet().to_string())
        .args(["via", &outside.host_ip.to_string()])
        .status()
        .expect("ip route");
    assert!(status.success());
    let _endpoint_server = Server::start(&endpoint.netns_path, 9001);
    assert!(
        !can_talk(Some(&outside.netns_path), spec.ip, 9001),
        "the outside must not open connections into an endpoint"
    );
}

/// One endpoint's change is its own elements and chains (what the agent does on create and
/// delete): isolation, allow_from and published ports hold exactly as with a full apply, a
/// removal is idempotent, and afterwards nothing in the tables names the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_endpoint_changes_keep_isolation() {
    let net = TestNet::new("10.227.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let web = EndpointSpec::new("web-1", "shop", net.ip(2));
    apply_rules(cfg, std::slice::from_ref(&web))
        .await
        .expect("full rules");
    let web_ep = create_endpoint(cfg, &web).await.expect("web");
    let worker = EndpointSpec::new("worker-1", "shop", net.ip(3));
    let mut intruder = EndpointSpec::new("other-1", "blog", net.ip(4));
    let worker_ep = create_endpoint(cfg, &worker).await.expect("worker");
    let intruder_ep = create_endpoint(cfg, &intruder).await.expect("intruder");
    // Fail closed: a port without its elements carries nothing.
    let _server = Server::start(&web_ep.netns_path, 8080);
    assert!(!can_talk(Some(&worker_ep.netns_path), web.ip, 8080));
    add_endpoint_rules(cfg, &worker)
        .await
        .expect("worker rules");
    add_endpoint_rules(cfg, &intruder)
        .await
        .expect("intruder rules");
    assert!(can_talk(Some(&worker_ep.netns_path), web.ip, 8080));
    assert!(!can_talk(Some(&intruder_ep.netns_path), web.ip, 8080));

    let mut web_allowing = web.clone();
    web_allowing.allow_from = vec!["blog".into()];
    change_admission(cfg, &web, &web_allowing)
        .await
        .expect("allow blog");
    assert!(can_talk(Some(&intruder_ep.netns_path), web.ip, 8080));
    change_admission(cfg, &web_allowing, &web)
        .await
        .expect("back to own app");
    assert!(!can_talk(Some(&intruder_ep.netns_path), web.ip, 8080));

    let host_port = 20000 + (common::random_u64() % 20000) as u16;
    intruder.publish = vec![PublishedPort::loopback(host_port, 8081)];
    add_endpoint_rules(cfg, &intruder).await.expect("publish");
    let _intruder_server = Server::start(&intruder_ep.netns_path, 8081);
    assert!(can_talk(None, std::net::Ipv4Addr::LOCALHOST, host_port));

    for spec in [&worker, &intruder] {
        remove_endpoint_rules(cfg, spec).await.expect("remove");
        remove_endpoint_rules(cfg, spec)
            .await
            .expect("remove again is fine");
    }
    assert!(!can_talk(Some(&worker_ep.netns_path), web.ip, 8080));
    assert!(!can_talk(None, std::net::Ipv4Addr::LOCALHOST, host_port));
    assert!(can_talk(None, web.ip, 8080), "the rest is untouched");
    assert!(common::nft_table("bridge", cfg.prefix()).is_none());
    let table = common::nft_table("inet", cfg.prefix()).expect("table");
    for spec in [&worker, &intruder] {
        let key = cfg.endpoint_key(&spec.owner);
        assert!(!table.contains(&key), "still names {key}:\n{table}");
        assert!(!table.contains(&format!("{} ", spec.ip)), "{table}");
    }
    // The rest is still named: web's address in `dest`, its veth in the sets.
    for kept in [format!("{} ", web.ip), cfg.endpoint_key("web-1")] {
        assert!(table.contains(&kept), "lost web-1 ({kept}):\n{table}");
    }
}
