//! Bridge, endpoints (netns + veth) and the kernel inventory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::link::{self, netlink_error, EEXIST};
use crate::nsfs::{self, HostConf, NetlinkWork};
use crate::{rules, EndpointSpec, Error, NetConfig, Result};

/// Name of the sandbox side of every veth.
pub const SANDBOX_IFNAME: &str = "eth0";

/// A ready endpoint: a sandbox joins it through `netns_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub owner: String,
    /// `<prefix>-<hash>`: host veth name and netns file name.
    pub key: String,
    pub netns_path: PathBuf,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

/// One endpoint-shaped thing found in the kernel or the runtime dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEndpoint {
    pub key: String,
    /// Owner recorded in the host veth's alias (absent if the veth is gone or
    /// was interrupted before the alias was set).
    pub owner: Option<String>,
    pub host_veth: bool,
    /// The host veth is a bridge port, as an older agent made endpoints: creating the
    /// endpoint again makes it routed.
    pub bridged: bool,
    /// A netns file exists in the runtime dir (mounted or left empty).
    pub netns_file: bool,
    /// That file is a live namespace mount (false: an interrupted create).
    pub netns_mounted: bool,
}

/// What exists for one prefix. Anything here the agent has no record of can
/// be removed with [`delete_endpoint_by_key`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelObjects {
    pub bridge: bool,
    pub tables: bool,
    pub endpoints: Vec<KernelEndpoint>,
}

fn io_error(context: impl Into<String>, source: std::io::Error) -> Error {
    Error::Io {
        context: context.into(),
        source,
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| io_error(format!("writing {path}"), e))
}

/// Locally administered MAC derived from the prefix, so the bridge keeps one
/// address instead of taking its lowest port's (which would churn ARP caches).
pub(crate) fn bridge_mac(prefix: &str) -> Vec<u8> {
    let b = miren_sys::fnv::fnv1a64(prefix.as_bytes()).to_be_bytes();
    vec![0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// Creates (or completes) the agent's gateway link `<prefix>0`, a bridge without ports that
/// holds the gateway address (this kernel has no dummy links; a bridge with no port costs
/// nothing per endpoint), enables IPv4 forwarding, and creates the nftables tables if they
/// are missing. Existing tables are left alone: their content comes from
/// [`crate::apply_rules`]. Endpoints are routed, not bridged ([`create_endpoint`]); the ports
/// an older agent attached are detached when their endpoint is next created.
pub async fn ensure_bridge_and_table(cfg: &NetConfig) -> Result<()> {
    let handle = link::connect()?;
    let name = cfg.bridge_name();
    let bridge = match link::get_by_name(&handle, &name).await? {
        Some(bridge) => bridge,
        None => {
            let message = LinkBridge::new(&name)
                .address(bridge_mac(cfg.prefix()))
                .mcast_snooping(false)
                .build();
            match handle.link().add(message).execute().await {
                Ok(()) => {}
                Err(e) if link::errno(&e) == Some(EEXIST) => {}
                Err(e) => return Err(netlink_error(format!("creating bridge {name}"))(e)),
            }
            link::get_by_name(&handle, &name)
                .await?
                .ok_or_else(|| Error::BridgeMissing(name.clone()))?
        }
    };
    let index = bridge.header.index;
    let gateway = cfg.gateway();
    let has_gateway = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect::<Vec<AddressMessage>>()
        .await
        .map_err(netlink_error(format!("listing addresses of {name}")))?
        .iter()
        .any(|a| {
            a.header.prefix_len == cfg.subnet().prefix_len()
                && a.attributes
                    .iter()
                    .any(|attr| matches!(attr, AddressAttribute::Local(ip) if *ip == IpAddr::V4(gateway)))
        });
    if !has_gateway {
        match handle
            .address()
            .add(index, IpAddr::V4(gateway), cfg.subnet().prefix_len())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if link::errno(&e) == Some(EEXIST) => {}
            Err(e) => return Err(netlink_error(format!("adding {gateway} to {name}"))(e)),
        }
    }
    if !link::is_up(&bridge) {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink_error(format!("bringing {name} up")))?;
    }
    write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    rules::ensure_tables(cfg).await
}

/// Creates the endpoint or completes a partly made one; an endpoint that is
/// already complete is left untouched (a running sandbox keeps its network).
/// Does not touch nftables: call [`crate::apply_rules`] with the full set.
///
/// Routed, not bridged: the host veth carries a `/32` route to the sandbox's address (source:
/// the gateway), and the sandbox has its address as `/32` with a default route to the gateway
/// on-link and the gateway's neighbour entry fixed to the host veth's MAC. So nothing is ever
/// switched between sandboxes, every packet from one passes the host's routing and nftables,
/// and adding or removing an endpoint walks no other endpoint's objects (a bridge walks
/// every port on each port added or removed, and takes at most 1023).
pub async fn create_endpoint(cfg: &NetConfig, spec: &EndpointSpec) -> Result<Endpoint> {
    spec.validate(cfg)?;
    let key = cfg.endpoint_key(&spec.owner);
    let netns_path = cfg.netns_path(&key);
    nsfs::ensure_netns(&netns_path).await?;

    let handle = link::connect()?;
    let bridge_name = cfg.bridge_name();
    if link::get_by_name(&handle, &bridge_name).await?.is_none() {
        return Err(Error::BridgeMissing(bridge_name));
    }

    let existing = link::get_by_name(&handle, &key).await?;
    if let Some(host) = &existing {
        match link::alias(host) {
            Some(found) if !found.is_empty() && found != spec.owner => {
                return Err(Error::OwnerCollision {
                    name: key,
                    found: found.to_string(),
                    wanted: spec.owner.clone(),
                })
            }
            _ => {}
        }
    }
    let mut host = match existing {
        Some(host) => host,
        None => create_veth(&handle, &key, &netns_path).await?,
    };
    configure_host_side(cfg, &handle, &host, spec, &key).await?;
    let mut matched = configure_sandbox_side(cfg, spec.ip, &netns_path, &host).await?;
    if !matched {
        // The host veth was a leftover whose peer is not our eth0: start over.
        link::delete_index(&handle, host.header.index, &key).await?;
        host = create_veth(&handle, &key, &netns_path).await?;
        configure_host_side(cfg, &handle, &host, spec, &key).await?;
        matched = configure_sandbox_side(cfg, spec.ip, &netns_path, &host).await?;
    }
    if !matched {
        return Err(Error::InvalidEndpoint(format!(
            "{SANDBOX_IFNAME} in {} is not the peer of {key}",
            netns_path.display()
        )));
    }
    Ok(Endpoint {
        owner: spec.owner.clone(),
        key,
        netns_path,
        ip: spec.ip,
        gateway: cfg.gateway(),
    })
}

/// Creates the pair in one netlink call, the peer born inside the namespace as
/// `eth0`, so no half-moved peer can be left in the host namespace.
async fn create_veth(
    handle: &rtnetlink::Handle,
    key: &str,
    netns_path: &Path,
) -> Result<LinkMessage> {
    let attempt = |ns_fd: i32| {
        let peer = LinkUnspec::new_with_name(SANDBOX_IFNAME)
            .setns_by_fd(ns_fd)
            .build();
        LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(key.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build()
    };
    for retry in [false, true] {
        let ns_file = std::fs::File::open(netns_path)
            .map_err(|e| io_error(format!("opening {}", netns_path.display()), e))?;
        match handle
            .link()
            .add(attempt(ns_file.as_raw_fd()))
            .execute()
            .await
        {
            Ok(()) => break,
            // A stray eth0 in the namespace (its peer is not ours): remove, retry once.
            Err(e) if link::errno(&e) == Some(EEXIST) && !retry => {
                let work: NetlinkWork<()> = Box::new(|h| {
                    Box::pin(async move { link::delete_by_name(&h, SANDBOX_IFNAME).await })
                });
                nsfs::in_netns(netns_path, work).await?;
                // The host name itself may have appeared meanwhile.
                link::delete_by_name(handle, key).await?;
            }
            Err(e) => return Err(netlink_error(format!("creating veth {key}"))(e)),
        }
    }
    link::get_by_name(handle, key)
        .await?
        .ok_or_else(|| Error::InvalidEndpoint(format!("veth {key} vanished after creation")))
}

/// The host veth: IPv6 off, `route_localnet`, no bridge (an older agent's port is detached),
/// its owner in its alias, up, and the `/32` route to the sandbox through it.
async fn configure_host_side(
    cfg: &NetConfig,
    handle: &rtnetlink::Handle,
    host: &LinkMessage,
    spec: &EndpointSpec,
    key: &str,
) -> Result<()> {
    let index = host.header.index;
    // IPv6 off before it comes up. Sandboxes are IPv4 only; with IPv6 every host veth got a
    // link-local address, DAD and MLD, and its own `fe80::/64` and `ff00::/8` routes in the
    // host's tables beside every other veth's: the kernel walks a prefix's routes to add or
    // remove one, so each veth cost more to bring up and to delete the more ran.
    nsfs::host_conf_write(HostConf::Ipv6, key, "disable_ipv6", "1")?;
    // A published port's DNAT from 127.0.0.1 leaves through this veth; the kernel routes a
    // loopback source out of a device only with `route_localnet` on it (the sandboxes cannot
    // use it the other way: the rules drop what they send to 127.0.0.0/8).
    nsfs::host_conf_write(HostConf::Ipv4, key, "route_localnet", "1")?;
    let mut message = LinkUnspec::new_with_index(index)
        .up()
        .append_extra_attribute(LinkAttribute::IfAlias(spec.owner.clone()));
    if link::controller(host).is_some() {
        message = message.nocontroller();
    }
    handle
        .link()
        .set(message.build())
        .execute()
        .await
        .map_err(netlink_error(format!("setting up {key}")))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(spec.ip, 32)
        .output_interface(index)
        .pref_source(cfg.gateway())
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(netlink_error(format!("route to {} through {key}", spec.ip)))
}

/// Inside the namespace: `lo` up, `eth0` with exactly our address (as a `/32`), up, the
/// gateway's neighbour entry fixed to the host veth's MAC and a default route via the gateway
/// on-link: every packet goes to the host, and no ARP is needed for the gateway (nor answered
/// by the host for other sandboxes: they are reached through it). Returns false when `eth0`
/// is missing or is not the peer of `host`.
async fn configure_sandbox_side(
    cfg: &NetConfig,
    ip: Ipv4Addr,
    netns_path: &Path,
    host: &LinkMessage,
) -> Result<bool> {
    let host_index = host.header.index;
    let host_mac = link::mac(host)
        .ok_or_else(|| Error::InvalidEndpoint(format!("host veth {host_index} has no MAC")))?
        .to_vec();
    let gateway = cfg.gateway();
    let work: NetlinkWork<bool> = Box::new(move |handle| {
        Box::pin(async move {
            let Some(eth0) = link::get_by_name(&handle, SANDBOX_IFNAME).await? else {
                return Ok(false);
            };
            if link::peer_index(&eth0) != Some(host_index) {
                link::delete_index(&handle, eth0.header.index, SANDBOX_IFNAME).await?;
                return Ok(false);
            }
            let index = eth0.header.index;
            if let Some(lo) = link::get_by_name(&handle, "lo").await? {
                if !link::is_up(&lo) {
                    handle
                        .link()
                        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
                        .execute()
                        .await
                        .map_err(netlink_error("bringing lo up"))?;
                }
            }
            let addresses: Vec<AddressMessage> = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(netlink_error("listing eth0 addresses"))?;
            let mut have_ours = false;
            for address in addresses {
                let is_ours = address.header.prefix_len == 32
                    && address
                        .attributes
                        .iter()
                        .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(v)) if *v == ip));
                let is_v4 = address.header.family == rtnetlink::packet_route::AddressFamily::Inet;
                if is_ours {
                    have_ours = true;
                } else if is_v4 {
                    // A different address from an earlier spec of this owner, or ours with
                    // the subnet's prefix (an older agent's bridged endpoint).
                    handle
                        .address()
                        .del(address)
                        .execute()
                        .await
                        .map_err(netlink_error("removing a stale eth0 address"))?;
                }
            }
            if !have_ours {
                match handle
                    .address()
                    .add(index, IpAddr::V4(ip), 32)
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if link::errno(&e) == Some(EEXIST) => {}
                    Err(e) => return Err(netlink_error(format!("adding {ip} to eth0"))(e)),
                }
            }
            // A namespace made before IPv6 was off by default in it ([`crate::nsfs`]): no
            // IPv6 multicast from `eth0` once it is up. Asked of netlink first: the sysctl's
            // path walks every namespace's cached entries (see [`nsfs::host_conf_write`]),
            // and `eth0` born in our namespaces has IPv6 off already.
            if link::ipv6_disabled(&eth0) != Some(true) {
                nsfs::ipv6_off(SANDBOX_IFNAME)?;
            }
            if !link::is_up(&eth0) {
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(netlink_error("bringing eth0 up"))?;
            }
            handle
                .neighbours()
                .add(index, IpAddr::V4(gateway))
                .link_layer_address(&host_mac)
                .replace()
                .execute()
                .await
                .map_err(netlink_error(format!("neighbour entry of {gateway}")))?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(index)
                .gateway(gateway)
                .onlink()
                .build();
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(netlink_error(format!("default route via {gateway}")))?;
            Ok(true)
        })
    });
    nsfs::in_netns(netns_path, work).await
}

/// Removes the endpoint of `owner`; whatever part of it is already gone is fine.
pub async fn delete_endpoint(cfg: &NetConfig, owner: &str) -> Result<()> {
    delete_endpoint_by_key(cfg, &cfg.endpoint_key(owner)).await
}

/// Removes an endpoint by its key (as found by [`list_kernel_objects`]).
pub async fn delete_endpoint_by_key(cfg: &NetConfig, key: &str) -> Result<()> {
    if !cfg.is_endpoint_key(key) {
        return Err(Error::InvalidEndpoint(format!(
            "{key:?} is not an endpoint key of prefix {}",
            cfg.prefix()
        )));
    }
    let handle = link::connect()?;
    let host_veth = link::get_by_name(&handle, key).await?;
    nsfs::remove_netns(&cfg.netns_path(key))?;
    // Deleting a veth waits for an RCU grace period (tens of ms here), most of an endpoint's
    // teardown, so it happens after we return. By index, not name: a new endpoint may reuse
    // the name at once (create replaces a leftover veth of that name itself). Until it is
    // gone the veth carries nothing: its namespace is unmounted and the rules drop what
    // comes from a veth no endpoint owns. Its `/32` route goes with it, unless a new endpoint
    // of the same address has replaced it already.
    if let Some(veth) = host_veth {
        let index = veth.header.index;
        tokio::spawn(async move {
            let _ = link::delete_index(&handle, index, "veth of a deleted endpoint").await;
        });
    }
    Ok(())
}

/// Lists this prefix's bridge, tables, host veths and netns files.
pub async fn list_kernel_objects(cfg: &NetConfig) -> Result<KernelObjects> {
    let handle = link::connect()?;
    let bridge_name = cfg.bridge_name();
    let mut bridge = false;
    let mut found: BTreeMap<String, KernelEndpoint> = BTreeMap::new();
    for l in link::all_links(&handle).await? {
        let Some(name) = link::name(&l) else { continue };
        if name == bridge_name {
            bridge = true;
        } else if cfg.is_endpoint_key(name) {
            found.insert(
                name.to_string(),
                KernelEndpoint {
                    key: name.to_string(),
                    owner: link::alias(&l)
                        .filter(|a| !a.is_empty())
                        .map(str::to_string),
                    host_veth: true,
                    bridged: link::controller(&l).is_some(),
                    netns_file: false,
                    netns_mounted: false,
                },
            );
        }
    }
    match std::fs::read_dir(cfg.runtime_dir()) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if cfg.is_endpoint_key(&name) {
                    let mounted = nsfs::is_netns_mount(&entry.path());
                    let endpoint = found.entry(name.clone()).or_insert_with(|| KernelEndpoint {
                        key: name,
                        owner: None,
                        host_veth: false,
                        bridged: false,
                        netns_file: false,
                        netns_mounted: false,
                    });
                    endpoint.netns_file = true;
                    endpoint.netns_mounted = mounted;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io_error(
                format!("reading {}", cfg.runtime_dir().display()),
                e,
            ))
        }
    }
    Ok(KernelObjects {
        bridge,
        tables: rules::tables_exist(cfg).await?,
        endpoints: found.into_values().collect(),
    })
}

/// Removes every endpoint of the prefix, the bridge and both tables.
/// `ip_forward` is left on: other software may rely on it.
pub async fn uninstall(cfg: &NetConfig) -> Result<()> {
    for endpoint in list_kernel_objects(cfg).await?.endpoints {
        delete_endpoint_by_key(cfg, &endpoint.key).await?;
    }
    let handle = link::connect()?;
    link::delete_by_name(&handle, &cfg.bridge_name()).await?;
    rules::delete_tables(cfg).await
}
