//! Real-kernel tests (root only): cleanup, idempotency, two agents side by side.

mod common;

use common::{can_talk, host_links_with_prefix, mounts_under, nft_table, Server, TestNet};
use miren_netns::{
    apply_rules, create_endpoint, delete_endpoint, delete_endpoint_by_key, ensure_bridge_and_table,
    list_kernel_objects, uninstall, EndpointSpec, NetnsPool,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_endpoints_leave_nothing_behind() {
    let net = TestNet::new("10.233.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let specs: Vec<EndpointSpec> = (0..200)
        .map(|i| {
            EndpointSpec::new(
                format!("sandbox-{i}"),
                format!("app-{}", i % 7),
                net.ip(2 + i),
            )
        })
        .collect();
    for spec in &specs {
        create_endpoint(cfg, spec).await.expect("create");
    }
    apply_rules(cfg, &specs).await.expect("rules for 200");
    let listed = list_kernel_objects(cfg).await.expect("list");
    assert_eq!(listed.endpoints.len(), 200);
    assert!(listed.endpoints.iter().all(|e| e.host_veth
        && !e.bridged
        && e.netns_file
        && e.netns_mounted
        && e.owner.is_some()));
    assert_eq!(mounts_under(cfg.runtime_dir()), 200);
    // Routed: one /32 route per endpoint through its veth, from the gateway; the gateway's
    // link (a bridge) has no port.
    let routes = std::process::Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    for spec in &specs {
        let key = cfg.endpoint_key(&spec.owner);
        let (start, source) = (
            format!("{} dev {key} ", spec.ip),
            format!(" src {}", cfg.gateway()),
        );
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&start) && l.contains("scope link") && l.contains(&source)),
            "no route {start:?} in\n{routes}"
        );
    }
    let ports = std::fs::read_dir(format!("/sys/class/net/{}/brif", cfg.bridge_name()))
        .expect("brif")
        .count();
    assert_eq!(ports, 0);
    // No IPv6 on the host sides: no address, route or MLD per port in the host's tables.
    let prefix_dash = format!("{}-", cfg.prefix());
    let routes = std::process::Command::new("ip")
        .args(["-6", "route", "show", "table", "all"])
        .output()
        .expect("ip -6 route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains(&prefix_dash),
        "host veths have IPv6 routes:\n{routes}"
    );
    // Every endpoint is in `dest`, none has a chain of its own: the 7 apps' chains are all.
    let table = nft_table("inet", cfg.prefix()).expect("inet table");
    assert_eq!(table.matches("chain to-").count(), 0);
    assert_eq!(table.matches("chain app-").count(), 7);
    assert_eq!(table.matches(": jump app-").count(), 200, "{table}");

    for spec in &specs {
        delete_endpoint(cfg, &spec.owner).await.expect("delete");
    }
    apply_rules(cfg, &[]).await.expect("empty rules");

    let listed = list_kernel_objects(cfg).await.expect("list");
    assert!(listed.endpoints.is_empty(), "{:?}", listed.endpoints);
    assert!(listed.bridge && listed.tables);
    assert!(host_links_with_prefix(&prefix_dash).is_empty());
    assert_eq!(mounts_under(cfg.runtime_dir()), 0);
    let table = nft_table("inet", cfg.prefix()).expect("table kept until uninstall");
    // Only the wildcard for every veth of the prefix may still name it.
    let without_wildcard = table.replace(&format!("{prefix_dash}*"), "");
    assert!(
        !without_wildcard.contains(&prefix_dash),
        "the table still names endpoints:\n{table}"
    );
    assert!(nft_table("bridge", cfg.prefix()).is_none());

    uninstall(cfg).await.expect("uninstall");
    let listed = list_kernel_objects(cfg).await.expect("list");
    assert!(!listed.bridge && !listed.tables && listed.endpoints.is_empty());
    assert!(host_links_with_prefix(cfg.prefix()).is_empty());
    assert!(nft_table("inet", cfg.prefix()).is_none());
    assert!(nft_table("bridge", cfg.prefix()).is_none());
    uninstall(cfg).await.expect("uninstall twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_delete_are_idempotent_and_complete_half_made_endpoints() {
    let net = TestNet::new("10.234.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    ensure_bridge_and_table(cfg).await.expect("ensure twice");
    let server_spec = EndpointSpec::new("server", "app", net.ip(2));
    let client_spec = EndpointSpec::new("client", "app", net.ip(3));
    let server = create_endpoint(cfg, &server_spec).await.expect("server");
    assert_eq!(
        create_endpoint(cfg, &server_spec).await.expect("again"),
        server
    );
    apply_rules(cfg, &[server_spec.clone(), client_spec.clone()])
        .await
        .expect("rules");

    // Killed after creating the netns file but before mounting it.
    let client_key = cfg.endpoint_key(&client_spec.owner);
    std::fs::write(cfg.netns_path(&client_key), b"").expect("empty netns file");
    let client = create_endpoint(cfg, &client_spec).await.expect("completes");
    assert_ipv4_only(&server.netns_path);
    assert_ipv4_only(&client.netns_path);
    let _listener = Server::start(&server.netns_path, 7000);
    assert!(can_talk(Some(&client.netns_path), server_spec.ip, 7000));

    // Veth lost (e.g. killed mid-create, or deleted by hand): create repairs it.
    let handle_gone = std::process::Command::new("ip")
        .args(["link", "del", &client.key])
        .status()
        .expect("ip link del");
    assert!(handle_gone.success());
    assert!(!can_talk(Some(&client.netns_path), server_spec.ip, 7000));
    create_endpoint(cfg, &client_spec)
        .await
        .expect("repairs veth");
    assert!(can_talk(Some(&client.netns_path), server_spec.ip, 7000));

    // Killed after the veth was made but before it was configured and routed.
    let client_route = format!("{}/32", client_spec.ip);
    for args in [
        vec!["route", "del", client_route.as_str()],
        vec!["link", "set", client.key.as_str(), "down"],
    ] {
        assert!(std::process::Command::new("ip")
            .args(&args)
            .status()
            .expect("ip")
            .success());
    }
    // And made by an agent from before sandboxes were IPv4 only: IPv6 on in the namespace.
    in_ns(
        &client.netns_path,
        &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"],
    );
    for args in [
        ["ip", "addr", "flush", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "down"],
        ["ip", "link", "set", "lo", "down"],
    ] {
        in_ns(&client.netns_path, &args);
    }
    assert!(!can_talk(Some(&client.netns_path), server_spec.ip, 7000));
    create_endpoint(cfg, &client_spec)
        .await
        .expect("completes attach and config");
    assert_ipv4_only(&client.netns_path);
    assert!(can_talk(Some(&client.netns_path), server_spec.ip, 7000));

    // Address changed by a new spec for the same owner: replaced, not added.
    let mut moved = client_spec.clone();
    moved.ip = net.ip(9);
    create_endpoint(cfg, &moved).await.expect("new address");
    apply_rules(cfg, &[server_spec.clone(), moved.clone()])
        .await
        .expect("rules");
    assert!(can_talk(Some(&client.netns_path), server_spec.ip, 7000));

    // Reconciliation: a netns file with no veth is listed and removable by key.
    delete_endpoint(cfg, &moved.owner).await.expect("delete");
    delete_endpoint(cfg, &moved.owner)
        .await
        .expect("delete twice");
    std::fs::write(cfg.netns_path(&client_key), b"").expect("stray file");
    let listed = list_kernel_objects(cfg).await.expect("list");
    let stray = listed
        .endpoints
        .iter()
        .find(|e| e.key == client_key)
        .expect("stray listed");
    assert!(stray.netns_file && !stray.netns_mounted && !stray.host_veth);
    let owned = listed
        .endpoints
        .iter()
        .find(|e| e.key == server.key)
        .expect("server listed");
    assert_eq!(owned.owner.as_deref(), Some("server"));
    delete_endpoint_by_key(cfg, &client_key)
        .await
        .expect("delete stray");
    assert!(!cfg.netns_path(&client_key).exists());
    assert!(delete_endpoint_by_key(cfg, "eth0").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_configs_side_by_side() {
    let first = TestNet::new("10.235.0.0/24");
    let mut second = TestNet::new("10.236.0.0/24");
    while second.cfg.prefix() == first.cfg.prefix() {
        second = TestNet::new("10.236.0.0/24");
    }
    let mut endpoints = Vec::new();
    for net in [&first, &second] {
        ensure_bridge_and_table(&net.cfg).await.expect("ensure");
        // Same owner and app names in both: only the prefix tells them apart.
        let a = EndpointSpec::new("a", "app", net.ip(2));
        let b = EndpointSpec::new("b", "app", net.ip(3));
        let ea = create_endpoint(&net.cfg, &a).await.expect("a");
        let eb = create_endpoint(&net.cfg, &b).await.expect("b");
        apply_rules(&net.cfg, &[a, b]).await.expect("rules");
        endpoints.push((ea, eb));
    }
    let (first_a, first_b) = &endpoints[0];
    let (second_a, _second_b) = &endpoints[1];
    assert_ne!(first_a.netns_path, second_a.netns_path);

    let _server = Server::start(&first_a.netns_path, 6000);
    assert!(can_talk(Some(&first_b.netns_path), first_a.ip, 6000));
    assert!(
        !can_talk(Some(&second_a.netns_path), first_a.ip, 6000),
        "another agent's endpoint must not get in"
    );

    uninstall(&second.cfg).await.expect("uninstall second");
    assert!(can_talk(Some(&first_b.netns_path), first_a.ip, 6000));
    let listed = list_kernel_objects(&first.cfg).await.expect("list first");
    assert!(listed.bridge && listed.tables);
    assert_eq!(listed.endpoints.len(), 2);
}

#[test]
fn guard_removes_everything_when_a_test_panics() {
    let (made_tx, made_rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let net = TestNet::new("10.237.0.0/24");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            ensure_bridge_and_table(&net.cfg).await.expect("ensure");
            let spec = EndpointSpec::new("doomed", "app", net.ip(2));
            create_endpoint(&net.cfg, &spec).await.expect("endpoint");
            apply_rules(&net.cfg, &[spec]).await.expect("rules");
        });
        made_tx.send(net.cfg.clone()).expect("send config");
        panic!("deliberate panic with a live endpoint");
    })
    .join();
    assert!(outcome.is_err(), "the worker must have panicked");
    let cfg = made_rx.recv().expect("config of the panicked test");
    assert!(host_links_with_prefix(cfg.prefix()).is_empty());
    assert!(nft_table("inet", cfg.prefix()).is_none());
    assert!(nft_table("bridge", cfg.prefix()).is_none());
    assert!(!cfg.runtime_dir().exists());
}

/// The namespace's inode: two paths name the same namespace when these are equal.
fn netns_inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("netns metadata").ino()
}

/// Runs `command` in the network namespace at `netns` and returns its stdout.
fn in_ns(netns: &std::path::Path, command: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(command)
        .output()
        .expect("nsenter");
    assert!(out.status.success(), "{command:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sandboxes are IPv4 only: `eth0` has IPv6 off (no link-local address, no router
/// solicitations, DAD or MLD sent to the host), `lo` keeps `::1` for programs that
/// listen on it.
fn assert_ipv4_only(netns: &std::path::Path) {
    let off = in_ns(netns, &["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"]);
    assert_eq!(off.trim(), "1", "IPv6 on eth0 in {}", netns.display());
    let lo = in_ns(netns, &["ip", "-6", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("::1/128"), "{lo}");
    let eth0 = in_ns(netns, &["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(eth0.trim().is_empty(), "{eth0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_namespaces_are_distinct_carry_endpoints_and_refill() {
    let net = TestNet::new("10.226.0.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let pool = NetnsPool::new(2);
    pool.fill().await.expect("fill");
    assert_eq!(pool.ready(), 2);

    let specs = [
        EndpointSpec::new("server", "app", net.ip(2)),
        EndpointSpec::new("client", "app", net.ip(3)),
        EndpointSpec::new("third", "app", net.ip(4)),
    ];
    let mut inodes = std::collections::BTreeSet::new();
    inodes.insert(netns_inode(std::path::Path::new("/proc/self/ns/net")));
    let mut endpoints = Vec::new();
    let mut sysfs_of = Vec::new();
    for spec in &specs {
        let path = cfg.netns_path(&cfg.endpoint_key(&spec.owner));
        let sysfs = pool.ensure_at(&path).await.expect("ensure_at");
        // Asked again (a retried start): the namespace bound there stays, no second sysfs.
        let inode = netns_inode(&path);
        let again = pool.ensure_at(&path).await.expect("ensure_at again");
        assert!(again.is_none());
        assert_eq!(netns_inode(&path), inode);
        assert!(inodes.insert(inode), "{} shares a namespace", spec.owner);
        endpoints.push(create_endpoint(cfg, spec).await.expect("endpoint"));
        sysfs_of.push(sysfs);
    }
    // A spare's sysfs was made in its namespace: it shows that namespace's links (its eth0,
    // made after the sysfs) and none of the host's. The first two came from the filled pool.
    for sysfs in sysfs_of.iter().take(2) {
        let sysfs = sysfs
            .as_ref()
            .expect("a pooled namespace comes with its sysfs");
        let links: std::collections::BTreeSet<String> =
            std::fs::read_dir(sysfs.proc_path().join("class/net"))
                .expect("class/net")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
        assert!(links.contains("eth0"), "{links:?}");
        assert!(!links.contains(&cfg.bridge_name()), "{links:?}");
    }
    for endpoint in &endpoints {
        assert_ipv4_only(&endpoint.netns_path);
    }
    apply_rules(cfg, &specs).await.expect("rules");
    let _listener = Server::start(&endpoints[0].netns_path, 7000);
    assert!(can_talk(Some(&endpoints[1].netns_path), net.ip(2), 7000));
    assert!(can_talk(Some(&endpoints[2].netns_path), net.ip(2), 7000));

    // Taken spares are made again in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pool.ready() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool was not refilled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Spares are named nowhere on the host: only the three endpoints' files are mounted.
    assert_eq!(mounts_under(cfg.runtime_dir()), 3);
    for spec in &specs {
        delete_endpoint(cfg, &spec.owner).await.expect("delete");
    }
    assert_eq!(mounts_under(cfg.runtime_dir()), 0);
}

/// An endpoint as an older agent made it: its host veth a port of the bridge, its address
/// with the subnet's prefix and a default route via the gateway, no `/32` route on the host.
fn make_bridged(cfg: &miren_netns::NetConfig, spec: &EndpointSpec, netns_path: &std::path::Path) {
    let key = cfg.endpoint_key(&spec.owner);
    for args in [
        vec!["route".to_string(), "del".into(), format!("{}/32", spec.ip)],
        vec![
            "link".into(),
            "set".into(),
            key.clone(),
            "master".into(),
            cfg.bridge_name(),
        ],
    ] {
        let status = std::process::Command::new("ip")
            .args(&args)
            .status()
            .expect("ip");
        assert!(status.success(), "ip {args:?}");
    }
    let address = format!("{}/{}", spec.ip, cfg.subnet().prefix_len());
    let gateway = cfg.gateway().to_string();
    for args in [
        vec!["ip", "addr", "flush", "dev", "eth0"],
        vec!["ip", "neigh", "flush", "dev", "eth0"],
        vec!["ip", "addr", "add", address.as_str(), "dev", "eth0"],
        vec!["ip", "route", "replace", "default", "via", gateway.as_str()],
    ] {
        in_ns(netns_path, &args);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_agents_bridged_endpoint_is_made_routed() {
    let net = TestNet::new("10.233.8.0/24");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let server_spec = EndpointSpec::new("server", "app", net.ip(2));
    let client_spec = EndpointSpec::new("client", "app", net.ip(3));
    let server = create_endpoint(cfg, &server_spec).await.expect("server");
    let client = create_endpoint(cfg, &client_spec).await.expect("client");
    apply_rules(cfg, &[server_spec.clone(), client_spec.clone()])
        .await
        .expect("rules");
    let _listener = Server::start(&server.netns_path, 7000);
    assert!(can_talk(Some(&client.netns_path), server_spec.ip, 7000));

    make_bridged(cfg, &client_spec, &client.netns_path);
    let listed = list_kernel_objects(cfg).await.expect("list");
    let bridged: Vec<&str> = listed
        .endpoints
        .iter()
        .filter(|e| e.bridged)
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(bridged, vec![client.key.as_str()]);
    // Under the routed rules, what arrives on the bridge passes nothing.
    assert!(!can_talk(Some(&client.netns_path), server_spec.ip, 7000));

    // Creating it again (what the agent's reconciliation does) makes it routed.
    assert_eq!(
        create_endpoint(cfg, &client_spec).await.expect("routed"),
        client
    );
    let listed = list_kernel_objects(cfg).await.expect("list");
    assert!(listed.endpoints.iter().all(|e| !e.bridged));
    assert!(can_talk(Some(&client.netns_path), server_spec.ip, 7000));
    let addresses = in_ns(
        &client.netns_path,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(
        addresses.contains(&format!("{}/32", client_spec.ip)) && addresses.lines().count() == 1,
        "{addresses}"
    );
    for spec in [&server_spec, &client_spec] {
        delete_endpoint(cfg, &spec.owner).await.expect("delete");
    }
    assert_eq!(mounts_under(cfg.runtime_dir()), 0);
}

/// Endpoints are routed, not bridge ports: more than a bridge's 1023 ports work, the last as
/// the first, and go without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_endpoints_than_a_bridge_could_hold() {
    let net = TestNet::new("10.238.0.0/21");
    let cfg = &net.cfg;
    ensure_bridge_and_table(cfg).await.expect("ensure");
    let specs: Vec<EndpointSpec> = (0..1030)
        .map(|i| EndpointSpec::new(format!("sandbox-{i}"), "app", net.ip(2 + i)))
        .collect();
    let mut endpoints = Vec::new();
    for spec in &specs {
        endpoints.push(create_endpoint(cfg, spec).await.expect("create"));
    }
    apply_rules(cfg, &specs).await.expect("rules for 1030");
    let (first, last) = (&endpoints[0], &endpoints[endpoints.len() - 1]);
    let _server = Server::start(&first.netns_path, 7100);
    assert!(can_talk(Some(&last.netns_path), first.ip, 7100));
    for spec in &specs {
        delete_endpoint(cfg, &spec.owner).await.expect("delete");
    }
    let prefix_dash = format!("{}-", cfg.prefix());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !host_links_with_prefix(&prefix_dash).is_empty() {
        assert!(std::time::Instant::now() < deadline, "veths left");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(mounts_under(cfg.runtime_dir()), 0);
}
