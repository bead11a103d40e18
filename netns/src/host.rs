//! Where a published port may point: an address of this host that no host service and no
//! sandbox owns. A DNAT rule on any other address would take over traffic meant for someone
//! else (another sandbox, another agent's bridge, a host service on the same port).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;

use crate::link::{self, netlink_error};
use crate::{NetConfig, PublishedPort, Result};

/// Why a published port is refused. Each message says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    #[error("publish: ports must be between 1 and 65535 (got host port {host_port}, port {endpoint_port})")]
    PortZero { host_port: u16, endpoint_port: u16 },
    #[error("publish: {ip}:{port} is listed twice in this request (0.0.0.0 covers every address); list each host address and port once")]
    Duplicate { ip: Ipv4Addr, port: u16 },
    #[error("publish host_ip {0} is not an address of this host: use 127.0.0.1 (the default), 0.0.0.0 (every host address) or an address of a host interface (`ip -4 addr`)")]
    NotHostAddress(Ipv4Addr),
    #[error("publish host_ip {ip} is inside the sandbox subnet {subnet} (it would capture sandbox traffic): use 127.0.0.1, 0.0.0.0 or an address of a host interface outside it")]
    InSandboxSubnet { ip: Ipv4Addr, subnet: String },
    #[error("publish host_ip {ip} belongs to {bridge}, the bridge of another miren agent (it would capture that agent's sandbox traffic): use 127.0.0.1, 0.0.0.0 or an address of another host interface")]
    OtherAgentBridge { ip: Ipv4Addr, bridge: String },
    #[error("host port {ip}:{port} is in use: a host service listens on {listener}; stop that service or publish another host port")]
    HostListens {
        ip: Ipv4Addr,
        port: u16,
        listener: String,
    },
}

impl PublishRefused {
    /// True when the request is fine in itself but collides with something that exists
    /// (HTTP 409 rather than 400).
    pub fn is_conflict(&self) -> bool {
        matches!(self, PublishRefused::HostListens { .. })
    }
}

/// Checks published ports before anything is recorded: ports in range, no address:port twice
/// (a wildcard overlaps every address), each address the host's own (loopback, 0.0.0.0 or an
/// address on a host interface) and neither in `cfg`'s subnet nor on another agent's bridge,
/// and no TCP listener of the host (in the caller's network namespace) on that address and
/// port, wildcard listeners included. Conflicts with other endpoints are the caller's to check.
pub async fn check_publish(cfg: &NetConfig, ports: &[PublishedPort]) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    check_shape(ports)?;
    let mut addresses = None;
    for port in ports {
        let ip = port.host_ip;
        if ip.is_unspecified() || ip.is_loopback() {
            continue;
        }
        if cfg.subnet().contains(ip) {
            return Err(PublishRefused::InSandboxSubnet {
                ip,
                subnet: cfg.subnet().to_string(),
            }
            .into());
        }
        if addresses.is_none() {
            addresses = Some(host_addresses().await?);
        }
        let found = addresses
            .as_ref()
            .and_then(|all| all.iter().find(|a| a.ip == ip));
        match found {
            None => return Err(PublishRefused::NotHostAddress(ip).into()),
            Some(address) if address.is_agent_bridge => {
                return Err(PublishRefused::OtherAgentBridge {
                    ip,
                    bridge: address.link.clone(),
                }
                .into())
            }
            Some(_) => {}
        }
    }
    let listeners = tcp_listeners()?;
    for port in ports {
        if let Some(listener) = listeners
            .iter()
            .find(|l| l.port == port.host_port && l.covers(port.host_ip))
        {
            return Err(PublishRefused::HostListens {
                ip: port.host_ip,
                port: port.host_port,
                listener: listener.to_string(),
            }
            .into());
        }
    }
    Ok(())
}

/// What needs no look-up: port ranges and duplicates within the request.
fn check_shape(ports: &[PublishedPort]) -> Result<(), PublishRefused> {
    for (i, port) in ports.iter().enumerate() {
        if port.host_port == 0 || port.endpoint_port == 0 {
            return Err(PublishRefused::PortZero {
                host_port: port.host_port,
                endpoint_port: port.endpoint_port,
            });
        }
        if let Some(other) = ports[..i].iter().find(|o| overlaps(o, port)) {
            let ip = if other.host_ip.is_unspecified() {
                port.host_ip
            } else {
                other.host_ip
            };
            return Err(PublishRefused::Duplicate {
                ip,
                port: port.host_port,
            });
        }
    }
    Ok(())
}

/// Two published ports that would match the same packets.
pub fn overlaps(a: &PublishedPort, b: &PublishedPort) -> bool {
    a.host_port == b.host_port
        && (a.host_ip == b.host_ip || a.host_ip.is_unspecified() || b.host_ip.is_unspecified())
}

struct HostAddress {
    ip: Ipv4Addr,
    link: String,
    /// The link is a miren agent's bridge (`<prefix>0` with the MAC derived from `<prefix>`).
    is_agent_bridge: bool,
}

/// Every IPv4 address on an interface of the caller's network namespace.
async fn host_addresses() -> Result<Vec<HostAddress>> {
    let handle = link::connect()?;
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink_error("listing host addresses"))?;
    let links = link::all_links(&handle).await?;
    let mut addresses = Vec::new();
    for message in &messages {
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local.or(address) else {
            continue;
        };
        let link = links
            .iter()
            .find(|l| l.header.index == message.header.index);
        let name = link.and_then(link::name).unwrap_or_default().to_string();
        let mac = link.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => Some(mac.as_slice()),
                _ => None,
            })
        });
        let is_agent_bridge = name
            .strip_suffix('0')
            .filter(|prefix| !prefix.is_empty())
            .is_some_and(|prefix| Some(crate::endpoint::bridge_mac(prefix).as_slice()) == mac);
        addresses.push(HostAddress {
            ip,
            link: name,
            is_agent_bridge,
        });
    }
    Ok(addresses)
}

/// A TCP socket in LISTEN state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listener {
    ip: IpAddr,
    port: u16,
}

impl Listener {
    /// Whether IPv4 connections to `ip` (0.0.0.0: to any address) reach this listener.
    fn covers(&self, ip: Ipv4Addr) -> bool {
        let listening_on = match self.ip {
            IpAddr::V4(v4) => Some(v4),
            // `::` takes IPv4 too unless IPV6_V6ONLY, which /proc does not show: assume it does.
            IpAddr::V6(v6) if v6.is_unspecified() => Some(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        listening_on.is_some_and(|l| l.is_unspecified() || ip.is_unspecified() || l == ip)
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

const TCP_LISTEN: &str = "0A";

/// Listening TCP sockets of the calling thread's network namespace.
fn tcp_listeners() -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/thread-self/net/{file}");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // No IPv6 in this kernel: no tcp6 file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == "tcp6" => continue,
            Err(source) => {
                return Err(crate::Error::Io {
                    context: format!("reading {path}"),
                    source,
                })
            }
        };
        listeners.extend(text.lines().skip(1).filter_map(parse_proc_net_line));
    }
    Ok(listeners)
}

/// One line of /proc/net/tcp{,6}: `sl local_address rem_address st ...`, addresses as hex
/// 32-bit words in host byte order, then `:PORT` in hex.
fn parse_proc_net_line(line: &str) -> Option<Listener> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if state != TCP_LISTEN {
        return None;
    }
    let (address, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..address.len()).step_by(8) {
        let word = u32::from_str_radix(address.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(Listener { ip, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(ip: [u8; 4], host_port: u16) -> PublishedPort {
        PublishedPort {
            host_ip: Ipv4Addr::from(ip),
            host_port,
            endpoint_port: 80,
        }
    }

    #[test]
    fn shape_refuses_zero_ports_and_overlaps() {
        assert!(check_shape(&[publish([127, 0, 0, 1], 8080), publish([0, 0, 0, 0], 8081)]).is_ok());
        assert!(matches!(
            check_shape(&[publish([127, 0, 0, 1], 0)]),
            Err(PublishRefused::PortZero { .. })
        ));
        for pair in [
            [publish([127, 0, 0, 1], 8080), publish([127, 0, 0, 1], 8080)],
            [publish([127, 0, 0, 1], 8080), publish([0, 0, 0, 0], 8080)],
            [publish([0, 0, 0, 0], 8080), publish([127, 0, 0, 1], 8080)],
        ] {
            assert_eq!(
                check_shape(&pair),
                Err(PublishRefused::Duplicate {
                    ip: Ipv4Addr::LOCALHOST,
                    port: 8080
                })
            );
        }
    }

    #[test]
    fn proc_net_lines_parse_in_host_byte_order() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
        let listener = parse_proc_net_line(v4).expect("listener");
        assert_eq!(
            listener,
            Listener {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 8080
            }
        );
        assert!(listener.covers(Ipv4Addr::LOCALHOST));
        assert!(listener.covers(Ipv4Addr::UNSPECIFIED));
        assert!(!listener.covers(Ipv4Addr::new(10, 0, 0, 1)));
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_proc_net_line(&established), None);
        let any6 = "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
        let listener = parse_proc_net_line(any6).expect("listener");
        assert_eq!(listener.port, 22);
        assert!(
            listener.covers(Ipv4Addr::new(192, 0, 2, 7)),
            "[::] takes IPv4 too"
        );
        let loopback6 = any6.replacen(
            "00000000000000000000000000000000",
            &format!(
                "{:08X}{:08X}{:08X}{:08X}",
                0,
                0,
                0,
                u32::from_ne_bytes([0, 0, 0, 1])
            ),
            1,
        );
        let listener = parse_proc_net_line(&loopback6).expect("listener");
        assert_eq!(listener.ip, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(!listener.covers(Ipv4Addr::LOCALHOST), "::1 is IPv6 only");
    }
}
