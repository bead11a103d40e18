//! Unit tests of the ruleset's JSON shape (`rules.rs`).
use super::*;

#[test]
fn rejects_duplicates() {
    let cfg =
        NetConfig::new("mt", "10.9.0.0/24".parse().expect("subnet"), "/run/x").expect("config");
    let a = EndpointSpec::new("a", "app", Ipv4Addr::new(10, 9, 0, 2));
    let mut b = EndpointSpec::new("b", "app", Ipv4Addr::new(10, 9, 0, 2));
    assert!(ruleset_json(&cfg, &[a.clone(), b.clone()]).is_err());
    b.ip = Ipv4Addr::new(10, 9, 0, 3);
    assert!(ruleset_json(&cfg, &[a.clone(), b]).is_ok());
    assert!(ruleset_json(&cfg, &[a.clone(), a]).is_err());
}

#[test]
fn the_host_admits_only_answers_from_endpoints() {
    let cfg =
        NetConfig::new("mt", "10.9.0.0/24".parse().expect("subnet"), "/run/x").expect("config");
    let rules = ruleset_json(&cfg, &[]).expect("rules");
    let input: Vec<&Value> = rules["nftables"]
        .as_array()
        .expect("commands")
        .iter()
        .filter(|c| c["add"]["rule"]["chain"] == "input")
        .collect();
    assert_eq!(input.len(), 2, "{input:?}");
    let last = &input[1]["add"]["rule"]["expr"];
    assert_eq!(last[0]["match"]["right"], "mt-*");
    assert_eq!(last[1], drop_packet());
    let forward_from_endpoints: Vec<&Value> = rules["nftables"]
        .as_array()
        .expect("commands")
        .iter()
        .filter(|c| c["add"]["rule"]["chain"] == "forward")
        .map(|c| &c["add"]["rule"]["expr"])
        .filter(|expr| {
            expr.as_array().is_some_and(|e| e.len() <= 3)
                && expr[0]["match"]["left"] == meta("iifname")
        })
        .collect();
    assert_eq!(
        forward_from_endpoints.last().map(|expr| &expr[1]),
        Some(&drop_packet()),
        "only IPv4 is forwarded from endpoints: {forward_from_endpoints:?}"
    );
}

#[test]
fn gateway_is_not_an_endpoint_address() {
    let cfg =
        NetConfig::new("mt", "10.9.0.0/24".parse().expect("subnet"), "/run/x").expect("config");
    let spec = EndpointSpec::new("a", "app", Ipv4Addr::new(10, 9, 0, 1));
    assert!(ruleset_json(&cfg, &[spec]).is_err());
}

fn cfg() -> NetConfig {
    NetConfig::new("mt", "10.9.0.0/24".parse().expect("subnet"), "/run/x").expect("config")
}

/// The commands of `batch` as `(verb, object kind, object)`.
fn commands(batch: &Value) -> Vec<(String, String, Value)> {
    batch["nftables"]
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c.as_object())
        .filter_map(|c| c.iter().next())
        .filter(|(verb, _)| verb.as_str() != "metainfo")
        .filter_map(|(verb, obj)| {
            let (kind, body) = obj.as_object()?.iter().next()?;
            Some((verb.clone(), kind.clone(), body.clone()))
        })
        .collect()
}

#[test]
fn one_endpoint_is_a_constant_number_of_commands() {
    let cfg = cfg();
    let spec = EndpointSpec::new("a", "shop", Ipv4Addr::new(10, 9, 0, 2));
    let batch = endpoint_rules_json(&cfg, &spec).expect("batch");
    let cmds = commands(&batch);
    // No table is reset: the rest of the ruleset stays as it is.
    assert!(cmds.iter().all(|(_, kind, _)| kind != "table"), "{cmds:?}");
    let elements: Vec<_> = cmds
        .iter()
        .filter(|(verb, kind, _)| verb == "add" && kind == "element")
        .map(|(_, _, body)| (body["name"].clone(), body["elem"][0].clone()))
        .collect();
    let key = cfg.endpoint_key("a");
    assert_eq!(
        elements,
        vec![
            (json!("port_ip"), json!({ "concat": [key, "10.9.0.2"] })),
            (json!("ips-73686f70"), json!("10.9.0.2")),
            (
                json!("dest"),
                json!(["10.9.0.2", { "jump": { "target": app_chain("shop") } }])
            ),
            (json!("ports"), json!(key)),
        ]
    );
    // No chain of its own: only its app's, which the dest entry names. (libnftables lists
    // every chain before each change: chains per endpoint made every change O(N).)
    let chains: Vec<&Value> = cmds
        .iter()
        .filter(|(verb, kind, _)| verb == "add" && kind == "chain")
        .map(|(_, _, body)| &body["name"])
        .collect();
    assert_eq!(chains, vec![&json!(app_chain("shop"))]);
    // The map entries come after the chains they name, as the last commands.
    let last = cmds.len() - 4;
    assert!(cmds[last..].iter().all(|(_, kind, _)| kind == "element"));
    assert!(cmds[..last - 1]
        .iter()
        .all(|(_, kind, body)| kind != "element" || body["name"] != "dest"));

    // The same size with one endpoint or many: nothing else's rules are in it.
    let many: Vec<EndpointSpec> = (0..100)
        .map(|i| EndpointSpec::new(format!("e{i}"), "shop", Ipv4Addr::new(10, 9, 0, 10 + i)))
        .collect();
    let full = commands(&ruleset_json(&cfg, &many).expect("full"));
    let one = commands(&ruleset_json(&cfg, &many[..1]).expect("full"));
    let per_endpoint = cmds.len() - 4; // without the app's set and chain (add, flush, rule)
    assert_eq!(full.len() - one.len(), 99 * per_endpoint);
}

#[test]
fn allow_from_jumps_to_each_apps_chain() {
    let cfg = cfg();
    let mut spec = EndpointSpec::new("a", "db", Ipv4Addr::new(10, 9, 0, 2));
    spec.allow_from = vec!["web".into(), "db".into()];
    let cmds = commands(&endpoint_rules_json(&cfg, &spec).expect("batch"));
    let to = format!("to-{}", cfg.endpoint_key("a"));
    let rules: Vec<Value> = cmds
        .iter()
        .filter(|(verb, kind, body)| verb == "add" && kind == "rule" && body["chain"] == to)
        .map(|(_, _, body)| body["expr"][0].clone())
        .collect();
    assert_eq!(
        rules,
        vec![
            jump(&app_chain("db")),
            jump(&app_chain("web")),
            drop_packet()
        ]
    );
    // Both apps' chains and sets exist after the batch, and the chain was flushed first.
    for app in ["db", "web"] {
        assert!(cmds.iter().any(|(verb, kind, body)| verb == "add"
            && kind == "set"
            && body["name"] == app_set(app)));
        assert!(cmds.iter().any(|(verb, kind, body)| verb == "flush"
            && kind == "chain"
            && body["name"] == app_chain(app)));
    }
    // A changed allow_from rewrites the chain: it is flushed before its rules.
    let flush = cmds
        .iter()
        .position(|(verb, _, body)| verb == "flush" && body["name"] == to)
        .expect("flush");
    let first_rule = cmds
        .iter()
        .position(|(verb, kind, body)| verb == "add" && kind == "rule" && body["chain"] == to)
        .expect("rule");
    assert!(flush < first_rule);
}

#[test]
fn removal_deletes_entries_before_chains_and_tolerates_absence() {
    let cfg = cfg();
    let mut spec = EndpointSpec::new("a", "db", Ipv4Addr::new(10, 9, 0, 2));
    spec.publish = vec![
        PublishedPort::loopback(5432, 5432),
        PublishedPort {
            host_ip: Ipv4Addr::UNSPECIFIED,
            host_port: 8080,
            endpoint_port: 80,
        },
    ];
    let cmds = commands(&endpoint_removal_json(&cfg, &spec).expect("batch"));
    let deleted: Vec<(String, String)> = cmds
        .iter()
        .filter(|(verb, _, _)| verb == "delete")
        .map(|(_, kind, body)| (kind.clone(), body["name"].as_str().unwrap_or("").into()))
        .collect();
    let key = cfg.endpoint_key("a");
    assert_eq!(
        deleted,
        vec![
            ("element".into(), "ports".into()),
            ("element".into(), "dest".into()),
            ("element".into(), "port_ip".into()),
            ("element".into(), "ips-6462".into()),
            ("element".into(), "pub_addr".into()),
            ("element".into(), "pub_local".into()),
            ("chain".into(), format!("pub-{key}")),
        ]
    );
    // One with other apps allowed has its own admission chain, which goes last.
    spec.allow_from = vec!["web".into()];
    let cmds = commands(&endpoint_removal_json(&cfg, &spec).expect("batch"));
    let last = cmds.last().expect("commands");
    assert_eq!((last.0.as_str(), last.1.as_str()), ("delete", "chain"));
    assert_eq!(last.2["name"], json!(format!("to-{key}")));
    // Every delete is preceded by an add of the same object: absent is fine.
    for (i, (verb, kind, body)) in cmds.iter().enumerate() {
        if verb == "delete" {
            assert!(
                cmds[..i]
                    .iter()
                    .any(|(v, k, b)| v == "add" && k == kind && b["name"] == body["name"]),
                "{kind} {body} deleted without an add before"
            );
        }
    }
    // The published key is `address . port` for one address, the port for 0.0.0.0.
    let pub_addr = cmds
        .iter()
        .find(|(verb, _, body)| verb == "delete" && body["name"] == "pub_addr")
        .expect("pub_addr");
    assert_eq!(
        pub_addr.2["elem"][0],
        json!({ "concat": ["127.0.0.1", 5432] })
    );
    let pub_local = cmds
        .iter()
        .find(|(verb, _, body)| verb == "delete" && body["name"] == "pub_local")
        .expect("pub_local");
    assert_eq!(pub_local.2["elem"][0], json!(8080));
}

#[test]
fn full_ruleset_holds_maps_and_every_endpoint() {
    let cfg = cfg();
    let mut a = EndpointSpec::new("a", "shop", Ipv4Addr::new(10, 9, 0, 2));
    a.publish = vec![PublishedPort::loopback(8080, 80)];
    let b = EndpointSpec::new("b", "blog", Ipv4Addr::new(10, 9, 0, 3));
    let cmds = commands(&ruleset_json(&cfg, &[a, b]).expect("full"));
    let maps: Vec<&str> = cmds
        .iter()
        .filter(|(_, kind, _)| kind == "map")
        .filter_map(|(_, _, body)| body["name"].as_str())
        .collect();
    assert_eq!(maps, vec!["dest", "pub_addr", "pub_local"]);
    let sets: Vec<&str> = cmds
        .iter()
        .filter(|(_, kind, _)| kind == "set")
        .filter_map(|(_, _, body)| body["name"].as_str())
        .filter(|name| !name.starts_with("ips-"))
        .collect();
    assert_eq!(sets, vec!["ports", "port_ip"]);
    let entries = |name: &str| {
        cmds.iter()
            .filter(|(verb, kind, body)| verb == "add" && kind == "element" && body["name"] == name)
            .count()
    };
    assert_eq!(
        (entries("dest"), entries("ports"), entries("port_ip")),
        (2, 2, 2)
    );
    // A veth sends only with its own address, checked against `port_ip` before conntrack;
    // an older agent's `bridge` table goes in the same transaction.
    let checks: Vec<&Value> = cmds
        .iter()
        .filter(|(_, kind, body)| kind == "rule" && body["chain"] == "checks")
        .filter(|(_, _, body)| body["table"] == cfg.table_name() && body["family"] == "inet")
        .filter_map(|(_, _, body)| body["expr"].as_array()?.get(1))
        .filter(|m| m["match"]["right"] == "@port_ip")
        .collect();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(checks.iter().all(|m| m["match"]["op"] == "!="));
    assert!(cmds.iter().any(|(verb, kind, body)| verb == "delete"
        && kind == "table"
        && body["family"] == "bridge"));
    let checks_chain = cmds
        .iter()
        .find(|(_, kind, body)| kind == "chain" && body["name"] == "checks")
        .expect("checks chain");
    assert_eq!(
        (
            checks_chain.2["hook"].as_str(),
            checks_chain.2["prio"].as_i64()
        ),
        (Some("prerouting"), Some(-300))
    );
    assert_eq!((entries("pub_addr"), entries("pub_local")), (1, 0));
    // The forward chain looks the destination up in the map, not in an inline list.
    assert!(cmds.iter().any(|(_, kind, body)| kind == "rule"
        && body["chain"] == "forward"
        && body["expr"][2]["vmap"]["data"] == "@dest"));
}

#[test]
fn an_admission_change_moves_the_dest_entry_between_the_apps_and_its_own_chain() {
    let cfg = cfg();
    let alone = EndpointSpec::new("a", "db", Ipv4Addr::new(10, 9, 0, 2));
    let mut shared = alone.clone();
    shared.allow_from = vec!["web".into()];
    let to = format!("to-{}", cfg.endpoint_key("a"));
    let dest = |cmds: &[(String, String, Value)]| -> Vec<(String, Value)> {
        cmds.iter()
            .filter(|(_, kind, body)| kind == "element" && body["name"] == "dest")
            .map(|(verb, _, body)| (verb.clone(), body["elem"][0].clone()))
            .collect()
    };
    let ip = json!("10.9.0.2");

    let opened = commands(&admission_change_json(&cfg, &alone, &shared).expect("batch"));
    assert_eq!(
        dest(&opened),
        vec![
            ("add".into(), json!([ip.clone(), jump(&app_chain("db"))])),
            ("delete".into(), ip.clone()),
            ("add".into(), json!([ip.clone(), jump(&to)])),
        ]
    );
    assert!(opened
        .iter()
        .any(|(verb, kind, body)| verb == "add" && kind == "rule" && body["chain"] == to));

    let closed = commands(&admission_change_json(&cfg, &shared, &alone).expect("batch"));
    assert_eq!(
        dest(&closed),
        vec![
            ("add".into(), json!([ip.clone(), jump(&to)])),
            ("delete".into(), ip.clone()),
            ("add".into(), json!([ip, jump(&app_chain("db"))])),
        ]
    );
    // Its own chain goes once nothing names it.
    let last = closed.last().expect("commands");
    assert_eq!((last.0.as_str(), last.1.as_str()), ("delete", "chain"));
    assert_eq!(last.2["name"], json!(to));
}

#[test]
fn app_names_stay_apart_and_bounded() {
    assert_ne!(app_chain("a-b"), app_chain("a_b"));
    assert_eq!(app_set("shop"), "ips-73686f70");
    let long = "x".repeat(crate::MAX_APP_LEN + 1);
    let spec = EndpointSpec::new("a", long, Ipv4Addr::new(10, 9, 0, 2));
    assert!(endpoint_rules_json(&cfg(), &spec).is_err());
}

#[test]
fn a_publish_switch_remaps_each_port_to_the_new_endpoint_in_one_batch() {
    let cfg = cfg();
    let mut old = EndpointSpec::new("old", "shop", Ipv4Addr::new(10, 9, 0, 2));
    old.publish = vec![PublishedPort::loopback(8080, 3000)];
    let mut new = EndpointSpec::new("new", "shop", Ipv4Addr::new(10, 9, 0, 3));
    new.publish = old.publish.clone();
    let cmds = commands(&publish_switch_json(&cfg, &old, &new).expect("batch"));
    let (old_chain, new_chain) = (
        format!("pub-{}", cfg.endpoint_key("old")),
        format!("pub-{}", cfg.endpoint_key("new")),
    );
    // The new chain DNATs to the new address before any entry points at it.
    let dnat = cmds
        .iter()
        .position(|(verb, kind, body)| {
            verb == "add" && kind == "rule" && body["chain"] == new_chain
        })
        .expect("dnat rule");
    assert_eq!(
        cmds[dnat].2["expr"][2]["dnat"]["addr"],
        json!("10.9.0.3"),
        "{:?}",
        cmds[dnat]
    );
    let entries: Vec<(String, Value)> = cmds
        .iter()
        .filter(|(_, kind, body)| kind == "element" && body["name"] == "pub_addr")
        .map(|(verb, _, body)| (verb.clone(), body["elem"][0].clone()))
        .collect();
    let key = json!({ "concat": ["127.0.0.1", 8080] });
    assert_eq!(
        entries,
        vec![
            ("add".into(), json!([key.clone(), jump(&old_chain)])),
            ("delete".into(), key.clone()),
            ("add".into(), json!([key, jump(&new_chain)])),
        ]
    );
    assert!(
        dnat < cmds
            .iter()
            .rposition(|(v, _, b)| v == "add" && b["name"] == "pub_addr")
            .unwrap()
    );
    // The old chain goes last, once nothing jumps to it.
    let last = cmds.last().expect("commands");
    assert_eq!((last.0.as_str(), last.1.as_str()), ("delete", "chain"));
    assert_eq!(last.2["name"], json!(old_chain));
}
