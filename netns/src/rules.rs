//! The agent's nftables tables: generated whole from the endpoint list (start,
//! reconciliation), or changed by one endpoint's elements and chains (create,
//! delete); each change is one atomic transaction.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use serde_json::{json, Value};

use crate::{EndpointSpec, Error, NetConfig, PublishedPort, Result};

const INET: &str = "inet";
/// The family of the table an older agent kept beside the `inet` one (it bridged endpoints).
const OLD_BRIDGE_FAMILY: &str = "bridge";

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

// Named sets and maps, so that one endpoint's change is a few elements and chains, whatever
// the number of endpoints (see docs/netns.md "Incremental updates").
/// inet: endpoint address -> `jump to-<key>`.
const DEST_MAP: &str = "dest";
/// inet: published `host address . host port` -> `jump pub-<key>`.
const PUB_ADDR_MAP: &str = "pub_addr";
/// inet: port published on every local address (`0.0.0.0`) -> `jump pub-<key>`.
const PUB_LOCAL_MAP: &str = "pub_local";
/// The host veth names of live endpoints (any other veth with our prefix is dropped).
const PORTS_SET: &str = "ports";
/// `host veth name . endpoint address`: the one IPv4 source address each veth may use.
const PORT_ADDRS_SET: &str = "port_ip";

/// App names are free text: an app's set and chain are named after its bytes in hex, which
/// keeps two apps apart (a hash could merge them) and fits nftables' 255-byte names.
fn app_hex(app: &str) -> String {
    app.bytes().map(|b| format!("{b:02x}")).collect()
}

fn app_set(app: &str) -> String {
    format!("ips-{}", app_hex(app))
}

fn app_chain(app: &str) -> String {
    format!("app-{}", app_hex(app))
}

/// The apps whose addresses may open connections to `spec`: its own and its `allow_from`.
fn allowed_apps(spec: &EndpointSpec) -> BTreeSet<&str> {
    std::iter::once(spec.app.as_str())
        .chain(spec.allow_from.iter().map(String::as_str))
        .collect()
}

fn set_ref(name: &str) -> Value {
    json!(format!("@{name}"))
}

/// The chain `spec`'s address is sent to by the `dest` map.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Admission {
    /// Only its own app may connect: that app's chain (most endpoints: no chain of their own,
    /// so the chains, which libnftables lists in full before every change, do not grow with
    /// the endpoints).
    App(String),
    /// Other apps too: its own `to-<key>` chain, which jumps to each allowed app's chain.
    Own(String),
}

impl Admission {
    /// Either way a connection from no allowed app falls back to the forward chain's drop.
    fn of(cfg: &NetConfig, spec: &EndpointSpec) -> Self {
        let apps = allowed_apps(spec);
        match apps.iter().next() {
            Some(only) if apps.len() == 1 => Admission::App(app_chain(only)),
            _ => Admission::Own(format!("to-{}", cfg.endpoint_key(&spec.owner))),
        }
    }

    fn chain(&self) -> &str {
        match self {
            Admission::App(chain) | Admission::Own(chain) => chain,
        }
    }
}

fn port_addr(key: &str, ip: &Value) -> Value {
    json!({ "concat": [key, ip] })
}

fn published_key(port: &PublishedPort) -> Value {
    json!({ "concat": [port.host_ip.to_string(), port.host_port] })
}

impl Batch {
    fn set(&mut self, family: &str, name: &str, kind: Value) {
        self.commands.push(json!({ "add": { "set": {
            "family": family, "table": self.table, "name": name, "type": kind,
        }}}));
    }

    fn verdict_map(&mut self, family: &str, name: &str, kind: Value) {
        self.commands.push(json!({ "add": { "map": {
            "family": family, "table": self.table, "name": name, "type": kind, "map": "verdict",
        }}}));
    }

    fn element(&mut self, op: &str, family: &str, set: &str, elem: Value) {
        self.commands.push(json!({ op: { "element": {
            "family": family, "table": self.table, "name": set, "elem": [elem],
        }}}));
    }

    /// A regular chain, empty whether or not it existed (add + flush).
    fn fresh_chain(&mut self, family: &str, name: &str) {
        self.chain(family, name);
        self.commands.push(json!({ "flush": { "chain": {
            "family": family, "table": self.table, "name": name,
        }}}));
    }

    /// Removes a chain whether or not it exists (add + flush + delete); whatever jumps to it
    /// must be gone earlier in the batch.
    fn remove_chain(&mut self, family: &str, name: &str) {
        self.fresh_chain(family, name);
        self.commands.push(json!({ "delete": { "chain": {
            "family": family, "table": self.table, "name": name,
        }}}));
    }

    /// Removes a set element or map entry whether or not it exists: add (a no-op when it is
    /// there with the same data) then delete. `entry` is the element, `[key, data]` for a map.
    fn remove_element(&mut self, family: &str, set: &str, entry: Value, key: Value) {
        self.element("add", family, set, entry);
        self.element("delete", family, set, key);
    }

    /// An app's address set and its chain (`ip saddr @ips-<app> accept`), rewritten whole.
    fn app(&mut self, app: &str) {
        let (set, chain) = (app_set(app), app_chain(app));
        self.set(INET, &set, json!("ipv4_addr"));
        self.fresh_chain(INET, &chain);
        self.rule(
            INET,
            &chain,
            vec![is(payload("ip", "saddr"), set_ref(&set)), accept()],
        );
    }

    /// Everything of one endpoint but its apps' chains (see [`Batch::app`]), rewritten whole.
    /// The map entries come last: until they exist what the endpoint's veth sends is dropped
    /// and nothing is routed to its address.
    fn endpoint(&mut self, cfg: &NetConfig, spec: &EndpointSpec) {
        let key = cfg.endpoint_key(&spec.owner);
        let ip = json!(spec.ip.to_string());

        let admission = Admission::of(cfg, spec);
        let to = admission.chain();
        if let Admission::Own(own) = &admission {
            self.fresh_chain(INET, own);
            for app in allowed_apps(spec) {
                self.rule(INET, own, vec![jump(&app_chain(app))]);
            }
            self.rule(INET, own, vec![drop_packet()]);
        }

        if !spec.publish.is_empty() {
            let chain = format!("pub-{key}");
            self.fresh_chain(INET, &chain);
            for port in &spec.publish {
                self.rule(INET, &chain, dnat_rule(spec, port));
            }
            for port in &spec.publish {
                let (map, key) = published_entry(port);
                self.element("add", INET, map, json!([key, jump(&chain)]));
            }
        }

        self.element("add", INET, PORT_ADDRS_SET, port_addr(&key, &ip));
        self.element("add", INET, &app_set(&spec.app), ip.clone());
        self.element("add", INET, DEST_MAP, json!([ip, jump(to)]));
        self.element("add", INET, PORTS_SET, json!(key));
    }

    /// A changed `allow_from`: the endpoint's `dest` entry is replaced (its chain may change
    /// between its app's and its own `to-` chain), and a `to-` chain it no longer uses goes.
    fn change_admission(&mut self, cfg: &NetConfig, old: &EndpointSpec, new: &EndpointSpec) {
        let ip = json!(new.ip.to_string());
        let (before, after) = (Admission::of(cfg, old), Admission::of(cfg, new));
        if before != after {
            // The chain the old entry names must exist for the add half of its removal.
            self.chain(INET, before.chain());
            self.remove_element(
                INET,
                DEST_MAP,
                json!([ip.clone(), jump(before.chain())]),
                ip,
            );
        }
        self.endpoint(cfg, new);
        if let (true, Admission::Own(own)) = (before != after, &before) {
            self.remove_chain(INET, own);
        }
    }

    /// Undoes [`Batch::endpoint`]: map entries first (from then on its veth is dropped and its
    /// address admits nothing), then its chains. Its apps' chains stay (other endpoints may
    /// jump to them; an empty one admits nothing) until the next full apply.
    fn remove_endpoint(&mut self, cfg: &NetConfig, spec: &EndpointSpec) {
        let key = cfg.endpoint_key(&spec.owner);
        let ip = json!(spec.ip.to_string());
        let (admission, publish) = (Admission::of(cfg, spec), format!("pub-{key}"));
        // Sets an older agent's table lacks are made, so that the removal itself succeeds.
        self.set(INET, PORTS_SET, json!("ifname"));
        self.remove_element(INET, PORTS_SET, json!(key), json!(key));
        // The chain the entry's data names must exist for the add half of its removal.
        self.chain(INET, admission.chain());
        self.remove_element(
            INET,
            DEST_MAP,
            json!([ip, jump(admission.chain())]),
            ip.clone(),
        );
        let pair = port_addr(&key, &ip);
        self.set(INET, PORT_ADDRS_SET, json!(["ifname", "ipv4_addr"]));
        self.remove_element(INET, PORT_ADDRS_SET, pair.clone(), pair);
        let set = app_set(&spec.app);
        self.set(INET, &set, json!("ipv4_addr"));
        self.remove_element(INET, &set, ip.clone(), ip);
        if !spec.publish.is_empty() {
            self.chain(INET, &publish);
            for port in &spec.publish {
                let (map, key) = published_entry(port);
                self.remove_element(INET, map, json!([key.clone(), jump(&publish)]), key);
            }
            self.remove_chain(INET, &publish);
        }
        if let Admission::Own(own) = &admission {
            self.remove_chain(INET, own);
        }
    }
}

impl Batch {
    /// Moves published ports from `from` to `to` (see [`publish_switch_json`]).
    fn switch_published(&mut self, cfg: &NetConfig, from: &EndpointSpec, to: &EndpointSpec) {
        let (old, new) = (
            format!("pub-{}", cfg.endpoint_key(&from.owner)),
            format!("pub-{}", cfg.endpoint_key(&to.owner)),
        );
        self.fresh_chain(INET, &new);
        for port in &to.publish {
            self.rule(INET, &new, dnat_rule(to, port));
        }
        self.chain(INET, &old);
        // Each map entry is deleted and added again pointing at the new chain within the
        // transaction: the kernel never sees the port unmapped.
        for port in &from.publish {
            let (map, key) = published_entry(port);
            self.remove_element(INET, map, json!([key.clone(), jump(&old)]), key);
        }
        for port in &to.publish {
            let (map, key) = published_entry(port);
            self.element("add", INET, map, json!([key, jump(&new)]));
        }
        self.remove_chain(INET, &old);
    }
}

/// Which map publishes `port`, and its key there.
fn published_entry(port: &PublishedPort) -> (&'static str, Value) {
    if port.host_ip == Ipv4Addr::UNSPECIFIED {
        (PUB_LOCAL_MAP, json!(port.host_port))
    } else {
        (PUB_ADDR_MAP, published_key(port))
    }
}

/// `[ip daddr X | fib daddr type local] tcp dport P dnat to <endpoint>:<port>`.
fn dnat_rule(spec: &EndpointSpec, port: &PublishedPort) -> Vec<Value> {
    let destination = if port.host_ip == Ipv4Addr::UNSPECIFIED {
        is(
            json!({ "fib": { "result": "type", "flags": ["daddr"] } }),
            json!("local"),
        )
    } else {
        is(payload("ip", "daddr"), json!(port.host_ip.to_string()))
    };
    vec![
        destination,
        is(payload("tcp", "dport"), json!(port.host_port)),
        json!({ "dnat": { "family": "ip", "addr": spec.ip.to_string(), "port": port.endpoint_port } }),
    ]
}

/// The complete JSON batch for `endpoints` (exposed for inspection and tests).
///
/// Endpoints are routed: each host veth (`<prefix>-*`) is a link of its own with a `/32`
/// route, so traffic between two endpoints is routed through the host and seen by
/// `inet <prefix>` forward, with conntrack. There, a connection into an endpoint passes only
/// from addresses of its own app or of an app in its `allow_from`. Egress is masqueraded;
/// routed traffic into an endpoint from elsewhere passes only as a reply or to a published
/// port (DNAT, its source then the gateway).
///
/// The `checks` chain makes addresses trustworthy before conntrack sees a packet: a veth may
/// only send IPv4 from its own address, and veths with the prefix that no spec names
/// (leftovers) send nothing. An older agent's `bridge <prefix>` table is removed in the same
/// transaction.
///
/// Per-endpoint parts live in named maps and sets: [`endpoint_rules_json`] and
/// [`endpoint_removal_json`] change one endpoint without rewriting the rest.
pub fn ruleset_json(cfg: &NetConfig, endpoints: &[EndpointSpec]) -> Result<Value> {
    validate(cfg, endpoints)?;
    let gateway_link = cfg.bridge_name();
    let subnet = json!({ "prefix": {
        "addr": cfg.subnet().network().to_string(),
        "len": cfg.subnet().prefix_len(),
    }});
    let mut batch = Batch::new(cfg.table_name());
    let mut sorted: Vec<&EndpointSpec> = endpoints.iter().collect();
    sorted.sort_by(|a, b| a.owner.cmp(&b.owner));

    // An older agent bridged its endpoints and checked their addresses in a `bridge` table.
    let old_table = json!({ "table": { "family": OLD_BRIDGE_FAMILY, "name": batch.table } });
    batch.commands.push(json!({ "add": old_table.clone() }));
    batch.commands.push(json!({ "delete": old_table }));

    batch.reset_table(INET);
    batch.base_chain(INET, "checks", "filter", "prerouting", -300);
    batch.base_chain(INET, "input", "filter", "input", 0);
    batch.base_chain(INET, "forward", "filter", "forward", 0);
    batch.base_chain(INET, "prerouting", "nat", "prerouting", -100);
    batch.base_chain(INET, "output", "nat", "output", -100);
    batch.base_chain(INET, "postrouting", "nat", "postrouting", 100);
    batch.verdict_map(INET, DEST_MAP, json!("ipv4_addr"));
    batch.verdict_map(INET, PUB_ADDR_MAP, json!(["ipv4_addr", "inet_service"]));
    batch.verdict_map(INET, PUB_LOCAL_MAP, json!("inet_service"));
    batch.set(INET, PORTS_SET, json!("ifname"));
    batch.set(INET, PORT_ADDRS_SET, json!(["ifname", "ipv4_addr"]));

    let our_veths = json!(format!("{}-*", cfg.prefix()));
    let from_endpoint = || is(meta("iifname"), our_veths.clone());
    let to_endpoint = || is(meta("oifname"), our_veths.clone());

    // From an endpoint, dropped before conntrack sees it:
    let dropped_from_endpoints = [
        // To the host's loopback: the veths have route_localnet=1 for published ports
        // (cf. CVE-2020-8558).
        is(
            payload("ip", "daddr"),
            json!({ "prefix": { "addr": "127.0.0.0", "len": 8 } }),
        ),
        // From a veth with our prefix that no live endpoint has (a leftover).
        matches("!=", meta("iifname"), set_ref(PORTS_SET)),
        // Anything but IPv4.
        matches("!=", meta("nfproto"), json!("ipv4")),
        // IPv4 from any address but the veth's own. (ARP needs no check: each veth is a link
        // of its own, so a false claim reaches only the host's neighbour entries of that veth,
        // and the host routes every other address through another veth.)
        matches(
            "!=",
            json!({ "concat": [meta("iifname"), payload("ip", "saddr")] }),
            set_ref(PORT_ADDRS_SET),
        ),
    ];
    for condition in dropped_from_endpoints {
        batch.rule(
            INET,
            "checks",
            vec![from_endpoint(), condition, drop_packet()],
        );
    }
    // The gateway's link has no port: what arrives on it comes from an older agent's bridged
    // endpoint not yet made routed, and passes nothing until it is.
    batch.rule(
        INET,
        "checks",
        vec![is(meta("iifname"), json!(gateway_link)), drop_packet()],
    );

    // Sandboxes get nothing from the host itself, on any of its addresses and in either IP
    // family: only answers to connections the host opened (e.g. to a published port, which
    // is DNAT'd in prerouting and so forwarded, not input) come in.
    batch.rule(
        INET,
        "input",
        vec![from_endpoint(), ct_established(), accept()],
    );
    batch.rule(INET, "input", vec![from_endpoint(), drop_packet()]);
    batch.rule(
        INET,
        "forward",
        vec![to_endpoint(), ct_established(), accept()],
    );
    batch.rule(INET, "forward", vec![to_endpoint(), ct_dnat(), accept()]);
    batch.rule(
        INET,
        "forward",
        vec![
            from_endpoint(),
            to_endpoint(),
            json!({ "vmap": { "key": payload("ip", "daddr"), "data": set_ref(DEST_MAP) } }),
        ],
    );
    batch.rule(
        INET,
        "forward",
        vec![from_endpoint(), to_endpoint(), drop_packet()],
    );
    // Nothing is forwarded to the gateway's link (addresses of the subnet no endpoint has).
    batch.rule(
        INET,
        "forward",
        vec![is(meta("oifname"), json!(gateway_link)), drop_packet()],
    );
    // Endpoints are IPv4 only: nothing else from them is routed anywhere, even on a host that
    // forwards IPv6.
    batch.rule(
        INET,
        "forward",
        vec![
            from_endpoint(),
            is(meta("nfproto"), json!("ipv4")),
            accept(),
        ],
    );
    batch.rule(INET, "forward", vec![from_endpoint(), drop_packet()]);
    batch.rule(INET, "forward", vec![to_endpoint(), drop_packet()]);

    batch.rule(
        INET,
        "postrouting",
        vec![
            is(payload("ip", "saddr"), subnet),
            matches("!=", meta("oifname"), our_veths.clone()),
            json!({ "masquerade": null }),
        ],
    );
    // A host veth has no address of its own to masquerade to: the gateway's, explicitly.
    batch.rule(
        INET,
        "postrouting",
        vec![
            to_endpoint(),
            ct_dnat(),
            json!({ "snat": { "family": "ip", "addr": cfg.gateway().to_string() } }),
        ],
    );
    for chain in ["prerouting", "output"] {
        let by_address = json!({ "concat": [payload("ip", "daddr"), payload("tcp", "dport")] });
        batch.rule(
            INET,
            chain,
            vec![json!({ "vmap": { "key": by_address, "data": set_ref(PUB_ADDR_MAP) } })],
        );
        batch.rule(
            INET,
            chain,
            vec![
                is(
                    json!({ "fib": { "result": "type", "flags": ["daddr"] } }),
                    json!("local"),
                ),
                json!({ "vmap": { "key": payload("tcp", "dport"), "data": set_ref(PUB_LOCAL_MAP) } }),
            ],
        );
    }

    let apps: BTreeSet<&str> = sorted.iter().flat_map(|s| allowed_apps(s)).collect();
    for app in apps {
        batch.app(app);
    }
    for spec in &sorted {
        batch.endpoint(cfg, spec);
    }
    Ok(batch.into_json())
}

/// The batch that adds (or rewrites) one endpoint in tables made by [`ruleset_json`]: its
/// chains, its apps' chains and sets, and its map entries, in one transaction whose size does
/// not depend on how many endpoints there are. It fails (and changes nothing) if the tables
/// are missing or an entry is held by another endpoint: apply the full ruleset then.
pub fn endpoint_rules_json(cfg: &NetConfig, spec: &EndpointSpec) -> Result<Value> {
    validate(cfg, std::slice::from_ref(spec))?;
    let mut batch = Batch::new(cfg.table_name());
    for app in allowed_apps(spec) {
        batch.app(app);
    }
    batch.endpoint(cfg, spec);
    Ok(batch.into_json())
}

/// The batch that changes which apps may connect to an endpoint from `old`'s to `new`'s
/// (the same endpoint): see [`Batch::change_admission`].
pub fn admission_change_json(
    cfg: &NetConfig,
    old: &EndpointSpec,
    new: &EndpointSpec,
) -> Result<Value> {
    validate(cfg, std::slice::from_ref(new))?;
    let mut batch = Batch::new(cfg.table_name());
    for app in allowed_apps(new) {
        batch.app(app);
    }
    batch.change_admission(cfg, old, new);
    Ok(batch.into_json())
}

/// Applies [`admission_change_json`]. On an error nothing changed: [`apply_rules`] converges.
pub async fn change_admission(
    cfg: &NetConfig,
    old: &EndpointSpec,
    new: &EndpointSpec,
) -> Result<()> {
    nft_apply(admission_change_json(cfg, old, new)?.to_string()).await
}

/// The batch that removes one endpoint's elements and chains, whether or not they exist.
pub fn endpoint_removal_json(cfg: &NetConfig, spec: &EndpointSpec) -> Result<Value> {
    validate(cfg, std::slice::from_ref(spec))?;
    let mut batch = Batch::new(cfg.table_name());
    batch.remove_endpoint(cfg, spec);
    Ok(batch.into_json())
}

/// The batch that moves a redeploy's published ports from the endpoint `from` (with the ports
/// it publishes now) to `to` (with the ports it is to publish) in one transaction: a
/// connection attempt meets the old mapping or the new one, never none; established
/// connections keep their conntrack NAT to the old endpoint. It fails (and changes nothing)
/// if an entry maps elsewhere, e.g. when the switch already happened: apply the full ruleset.
pub fn publish_switch_json(
    cfg: &NetConfig,
    from: &EndpointSpec,
    to: &EndpointSpec,
) -> Result<Value> {
    validate(cfg, std::slice::from_ref(to))?;
    let mut batch = Batch::new(cfg.table_name());
    batch.switch_published(cfg, from, to);
    Ok(batch.into_json())
}

/// Applies [`publish_switch_json`].
pub async fn switch_published(
    cfg: &NetConfig,
    from: &EndpointSpec,
    to: &EndpointSpec,
) -> Result<()> {
    nft_apply(publish_switch_json(cfg, from, to)?.to_string()).await
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
/// the kernel sees the old ruleset or the new one, never a mix. For start and
/// reconciliation; one endpoint's change is [`add_endpoint_rules`] /
/// [`remove_endpoint_rules`].
pub async fn apply_rules(cfg: &NetConfig, endpoints: &[EndpointSpec]) -> Result<()> {
    nft_apply(ruleset_json(cfg, endpoints)?.to_string()).await
}

/// Admits `spec` (or applies its changed `allow_from`) in one transaction of its own
/// elements and chains. On an error nothing changed: [`apply_rules`] converges.
pub async fn add_endpoint_rules(cfg: &NetConfig, spec: &EndpointSpec) -> Result<()> {
    nft_apply(endpoint_rules_json(cfg, spec)?.to_string()).await
}

/// Removes `spec`'s elements and chains in one transaction; what is already gone is fine.
pub async fn remove_endpoint_rules(cfg: &NetConfig, spec: &EndpointSpec) -> Result<()> {
    nft_apply(endpoint_removal_json(cfg, spec)?.to_string()).await
}

/// True when the prefix's `inet` table exists.
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
    Ok(has(INET))
}

/// Creates the table with no endpoint rules, unless it exists.
pub async fn ensure_tables(cfg: &NetConfig) -> Result<()> {
    if tables_exist(cfg).await? {
        return Ok(());
    }
    apply_rules(cfg, &[]).await
}

/// Deletes the table, and an older agent's `bridge` one; missing tables are fine
/// (add-then-delete in one batch).
pub async fn delete_tables(cfg: &NetConfig) -> Result<()> {
    let mut commands = vec![json!({ "metainfo": { "json_schema_version": 1 } })];
    for family in [INET, OLD_BRIDGE_FAMILY] {
        let table = json!({ "table": { "family": family, "name": cfg.table_name() } });
        commands.push(json!({ "add": table }));
        commands.push(json!({ "delete": table }));
    }
    nft_apply(json!({ "nftables": commands }).to_string()).await
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
