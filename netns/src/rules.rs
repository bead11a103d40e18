//! The agent's nftables tables, generated whole from the endpoint list and
//! applied in one `nft -j -f -` transaction.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

use serde_json::{json, Value};

use crate::{EndpointSpec, Error, NetConfig, Result};

const INET: &str = "inet";
const BRIDGE: &str = "bridge";

fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({ "match": { "op": op, "left": left, "right": right } })
}

fn is(left: Value, right: Value) -> Value {
    matches("==", left, right)
}

fn accept() -> Value {
    json!({ "accept": null })
}

fn drop_packet() -> Value {
    json!({ "drop": null })
}

fn jump(chain: &str) -> Value {
    json!({ "jump": { "target": chain } })
}

fn ct_established() -> Value {
    matches(
        "in",
        json!({ "ct": { "key": "state" } }),
        json!(["established", "related"]),
    )
}

fn ct_dnat() -> Value {
    matches("in", json!({ "ct": { "key": "status" } }), json!("dnat"))
}

struct Batch {
    table: String,
    commands: Vec<Value>,
}

impl Batch {
    fn new(table: String) -> Self {
        Batch {
            table,
            commands: vec![json!({ "metainfo": { "json_schema_version": 1 } })],
        }
    }

    /// add + delete + add: an empty table whether or not it existed.
    fn reset_table(&mut self, family: &str) {
        let table = json!({ "table": { "family": family, "name": self.table } });
        self.commands.push(json!({ "add": table }));
        self.commands.push(json!({ "delete": table }));
        self.commands.push(json!({ "add": table }));
    }

    fn base_chain(&mut self, family: &str, name: &str, kind: &str, hook: &str, prio: i32) {
        self.commands.push(json!({ "add": { "chain": {
            "family": family, "table": self.table, "name": name,
            "type": kind, "hook": hook, "prio": prio, "policy": "accept",
        }}}));
    }

    fn chain(&mut self, family: &str, name: &str) {
        self.commands.push(json!({ "add": { "chain": {
            "family": family, "table": self.table, "name": name,
        }}}));
    }

    fn rule(&mut self, family: &str, chain: &str, expr: Vec<Value>) {
        self.commands.push(json!({ "add": { "rule": {
            "family": family, "table": self.table, "chain": chain, "expr": expr,
        }}}));
    }

    fn into_json(self) -> Value {
        json!({ "nftables": self.commands })
    }
}

fn validate(cfg: &NetConfig, endpoints: &[EndpointSpec]) -> Result<()> {
    let mut owners = HashSet::new();
    let mut ips = HashSet::new();
    let mut published = HashSet::new();
    for spec in endpoints {
        spec.validate(cfg)?;
        if !owners.insert(spec.owner.as_str()) {
            return Err(Error::InvalidEndpoint(format!(
                "owner {} listed twice",
                spec.owner
            )));
        }
        if !ips.insert(spec.ip) {
            return Err(Error::InvalidEndpoint(format!(
                "address {} used twice",
                spec.ip
            )));
        }
        for port in &spec.publish {
            if !published.insert((port.host_ip, port.host_port)) {
                return Err(Error::InvalidEndpoint(format!(
                    "{}:{} published twice",
                    port.host_ip, port.host_port
                )));
            }
        }
    }
    Ok(())
}

/// The complete JSON batch for `endpoints` (exposed for inspection and tests).
///
/// Bridge ports are isolated and the bridge answers every ARP request
/// (`proxy_arp_pvlan`), so traffic between two endpoints is routed through the
/// host and seen by `inet <prefix>` forward, with conntrack (this kernel has
/// no bridge-family conntrack). There, a connection into an endpoint passes
/// only from addresses of its own app or of an app in its `allow_from`.
/// Egress is masqueraded; routed traffic into the bridge from elsewhere passes
/// only as a reply or to a published port (DNAT, masqueraded to the gateway).
///
/// `bridge <prefix>` makes addresses trustworthy: a port may only send IPv4
/// and ARP with its own address, and ports with the prefix that no spec names
/// (leftovers) are dropped.
pub fn ruleset_json(cfg: &NetConfig, endpoints: &[EndpointSpec]) -> Result<Value> {
    validate(cfg, endpoints)?;
    let bridge = cfg.bridge_name();
    let subnet = json!({ "prefix": {
        "addr": cfg.subnet().network().to_string(),
        "len": cfg.subnet().prefix_len(),
    }});
    let mut batch = Batch::new(cfg.table_name());
    let mut sorted: Vec<&EndpointSpec> = endpoints.iter().collect();
    sorted.sort_by(|a, b| a.owner.cmp(&b.owner));

    batch.reset_table(INET);
    batch.base_chain(INET, "input", "filter", "input", 0);
    batch.base_chain(INET, "forward", "filter", "forward", 0);
    batch.base_chain(INET, "prerouting", "nat", "prerouting", -100);
    batch.base_chain(INET, "output", "nat", "output", -100);
    batch.base_chain(INET, "postrouting", "nat", "postrouting", 100);

    let mut ips_by_app: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for spec in &sorted {
        ips_by_app
            .entry(spec.app.as_str())
            .or_default()
            .insert(spec.ip.to_string());
    }
    // App names are free text: chains are numbered instead.
    let app_chain: BTreeMap<&str, String> = ips_by_app
        .keys()
        .enumerate()
        .map(|(i, app)| (*app, format!("app{i}")))
        .collect();
    for (app, ips) in &ips_by_app {
        let chain = &app_chain[app];
        batch.chain(INET, chain);
        batch.rule(
            INET,
            chain,
            vec![is(payload("ip", "saddr"), json!({ "set": ips })), accept()],
        );
    }
    let mut destination_map = Vec::new();
    for spec in &sorted {
        let chain = format!("to-{}", cfg.endpoint_key(&spec.owner));
        batch.chain(INET, &chain);
        let allowed: BTreeSet<&str> = std::iter::once(spec.app.as_str())
            .chain(spec.allow_from.iter().map(String::as_str))
            .collect();
        for app in allowed {
            if let Some(app_chain) = app_chain.get(app) {
                batch.rule(INET, &chain, vec![jump(app_chain)]);
            }
        }
        batch.rule(INET, &chain, vec![drop_packet()]);
        destination_map.push(json!([spec.ip.to_string(), jump(&chain)]));
    }

    let from_bridge = || is(meta("iifname"), json!(bridge));
    let to_bridge = || is(meta("oifname"), json!(bridge));
    // Sandboxes get nothing from the host itself, on any of its addresses and in either IP
    // family: only answers to connections the host opened (e.g. to a published port, which
    // is DNAT'd in prerouting and so forwarded, not input) come in.
    batch.rule(
        INET,
        "input",
        vec![from_bridge(), ct_established(), accept()],
    );
    batch.rule(INET, "input", vec![from_bridge(), drop_packet()]);
    batch.rule(
        INET,
        "forward",
        vec![to_bridge(), ct_established(), accept()],
    );
    batch.rule(INET, "forward", vec![to_bridge(), ct_dnat(), accept()]);
    if !destination_map.is_empty() {
        batch.rule(
            INET,
            "forward",
            vec![
                from_bridge(),
                to_bridge(),
                json!({ "vmap": { "key": payload("ip", "daddr"), "data": { "set": destination_map } } }),
            ],
        );
    }
    batch.rule(
        INET,
        "forward",
        vec![from_bridge(), to_bridge(), drop_packet()],
    );
    // Endpoints are IPv4 only: nothing else from them is routed anywhere, even on a host that
    // forwards IPv6.
    batch.rule(
        INET,
        "forward",
        vec![from_bridge(), is(meta("nfproto"), json!("ipv4")), accept()],
    );
    batch.rule(INET, "forward", vec![from_bridge(), drop_packet()]);
    batch.rule(INET, "forward", vec![to_bridge(), drop_packet()]);

    batch.rule(
        INET,
        "postrouting",
        vec![
            is(payload("ip", "saddr"), subnet),
            matches("!=", meta("oifname"), json!(bridge)),
            json!({ "masquerade": null }),
        ],
    );
    batch.rule(
        INET,
        "postrouting",
        vec![to_bridge(), ct_dnat(), json!({ "masquerade": null })],
    );
    for spec in &sorted {
        for port in &spec.publish {
            let destination = if port.host_ip == Ipv4Addr::UNSPECIFIED {
                is(
                    json!({ "fib": { "result": "type", "flags": ["daddr"] } }),
                    json!("local"),
                )
            } else {
                is(payload("ip", "daddr"), json!(port.host_ip.to_string()))
            };
            let expr = vec![
                destination,
                is(payload("tcp", "dport"), json!(port.host_port)),
                json!({ "dnat": { "family": "ip", "addr": spec.ip.to_string(), "port": port.endpoint_port } }),
            ];
            batch.rule(INET, "prerouting", expr.clone());
            batch.rule(INET, "output", expr);
        }
    }

    batch.reset_table(BRIDGE);
    batch.base_chain(BRIDGE, "prerouting", "filter", "prerouting", -200);
    let mut source_map = Vec::new();
    for spec in &sorted {
        let key = cfg.endpoint_key(&spec.owner);
        let chain = format!("from-{key}");
        batch.chain(BRIDGE, &chain);
        let ip = json!(spec.ip.to_string());
        batch.rule(
            BRIDGE,
            &chain,
            vec![
                is(payload("ether", "type"), json!("ip")),
                matches("!=", payload("ip", "saddr"), ip.clone()),
                drop_packet(),
            ],
        );
        batch.rule(
            BRIDGE,
            &chain,
            vec![
                is(payload("ether", "type"), json!("arp")),
                matches("!=", payload("arp", "saddr ip"), ip),
                drop_packet(),
            ],
        );
        // Accept here, or the catch-all drop for unknown ports below would apply.
        batch.rule(BRIDGE, &chain, vec![accept()]);
        source_map.push(json!([key, jump(&chain)]));
    }
    let our_ports = json!(format!("{}-*", cfg.prefix()));
    // The bridge has route_localnet=1 for published ports: never let a sandbox
    // address the host's loopback through it (cf. CVE-2020-8558).
    batch.rule(
        BRIDGE,
        "prerouting",
        vec![
            is(meta("iifname"), our_ports.clone()),
            is(payload("ether", "type"), json!("ip")),
            is(
                payload("ip", "daddr"),
                json!({ "prefix": { "addr": "127.0.0.0", "len": 8 } }),
            ),
            drop_packet(),
        ],
    );
    if !source_map.is_empty() {
        batch.rule(
            BRIDGE,
            "prerouting",
            vec![json!({ "vmap": { "key": meta("iifname"), "data": { "set": source_map } } })],
        );
    }
    batch.rule(
        BRIDGE,
        "prerouting",
        vec![is(meta("iifname"), our_ports), drop_packet()],
    );
    Ok(batch.into_json())
}

async fn nft_apply(payload: String) -> Result<()> {
    tokio::task::spawn_blocking(move || match crate::libnft::apply_json(&payload) {
        Some(result) => result.map_err(Error::Libnftables),
        None => {
            nftables::helper::apply_ruleset_raw(&payload, None::<&str>, std::iter::empty::<&str>())
                .map(drop)
                .map_err(Error::from)
        }
    })
    .await
    .map_err(|_| Error::ThreadPanicked("nft".into()))??;
    Ok(())
}

/// Replaces both tables with the rules for exactly `endpoints`, atomically:
/// the kernel sees the old ruleset or the new one, never a mix.
pub async fn apply_rules(cfg: &NetConfig, endpoints: &[EndpointSpec]) -> Result<()> {
    nft_apply(ruleset_json(cfg, endpoints)?.to_string()).await
}

/// True when both of the prefix's tables exist.
pub async fn tables_exist(cfg: &NetConfig) -> Result<bool> {
    let output = tokio::task::spawn_blocking(|| {
        nftables::helper::get_current_ruleset_raw(None::<&str>, ["list", "tables"])
    })
    .await
    .map_err(|_| Error::ThreadPanicked("nft".into()))??;
    let listed: Value = serde_json::from_str(&output)
        .map_err(|e| Error::Nftables(nftables::helper::NftablesError::NftInvalidJson(e)))?;
    let name = cfg.table_name();
    let has = |family: &str| {
        listed["nftables"].as_array().is_some_and(|items| {
            items.iter().any(|item| {
                item["table"]["family"] == family && item["table"]["name"] == name.as_str()
            })
        })
    };
    Ok(has(INET) && has(BRIDGE))
}

/// Creates the tables with no endpoint rules, unless both already exist.
pub async fn ensure_tables(cfg: &NetConfig) -> Result<()> {
    if tables_exist(cfg).await? {
        return Ok(());
    }
    apply_rules(cfg, &[]).await
}

/// Deletes both tables; missing tables are fine (add-then-delete in one batch).
pub async fn delete_tables(cfg: &NetConfig) -> Result<()> {
    let mut commands = vec![json!({ "metainfo": { "json_schema_version": 1 } })];
    for family in [INET, BRIDGE] {
        let table = json!({ "table": { "family": family, "name": cfg.table_name() } });
        commands.push(json!({ "add": table }));
        commands.push(json!({ "delete": table }));
    }
    nft_apply(json!({ "nftables": commands }).to_string()).await
}

#[cfg(test)]
mod tests {
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
    fn the_host_admits_only_answers_from_the_bridge() {
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
        assert_eq!(last[0]["match"]["right"], "mt0");
        assert_eq!(last[1], drop_packet());
        let forward_from_bridge: Vec<&Value> = rules["nftables"]
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
            forward_from_bridge.last().map(|expr| &expr[1]),
            Some(&drop_packet()),
            "only IPv4 is forwarded from the bridge: {forward_from_bridge:?}"
        );
    }

    #[test]
    fn gateway_is_not_an_endpoint_address() {
        let cfg =
            NetConfig::new("mt", "10.9.0.0/24".parse().expect("subnet"), "/run/x").expect("config");
        let spec = EndpointSpec::new("a", "app", Ipv4Addr::new(10, 9, 0, 1));
        assert!(ruleset_json(&cfg, &[spec]).is_err());
    }
}
