//! Pure IPv4 address-management logic. Persistence lives with the caller.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::Error;

/// An IPv4 subnet such as `10.88.0.0/16`: the gateway takes the first host
/// address, endpoints get the rest, network and broadcast are never handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Subnet {
    /// Builds a subnet; the address must be the network address itself and
    /// the prefix must leave room for a gateway and at least one endpoint.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, Error> {
        let invalid = |why: &str| Error::InvalidSubnet(format!("{network}/{prefix_len}: {why}"));
        if !(8..=30).contains(&prefix_len) {
            return Err(invalid("prefix length must be between 8 and 30"));
        }
        let subnet = Subnet {
            network,
            prefix_len,
        };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(invalid("host bits are set"));
        }
        Ok(subnet)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix_len))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// The first host address, assigned to the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// First and last address an endpoint may get (inclusive).
    pub fn usable_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::from(u32::from(self.network) + 2),
            Ipv4Addr::from(u32::from(self.broadcast()) - 1),
        )
    }

    /// Number of addresses endpoints can get.
    pub fn capacity(&self) -> u32 {
        let (first, last) = self.usable_range();
        u32::from(last) - u32::from(first) + 1
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }

    /// True when `addr` may be given to an endpoint.
    pub fn is_assignable(&self, addr: Ipv4Addr) -> bool {
        let (first, last) = self.usable_range();
        (u32::from(first)..=u32::from(last)).contains(&u32::from(addr))
    }

    /// Lowest assignable address not in `used`.
    pub fn next_free(&self, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, Error> {
        let (first, last) = self.usable_range();
        (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .find(|addr| !used.contains(addr))
            .ok_or(Error::SubnetExhausted(*self))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidSubnet(format!("{text:?}: expected a.b.c.d/len"));
        let (addr, len) = text.trim().split_once('/').ok_or_else(invalid)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        let len: u8 = len.parse().map_err(|_| invalid())?;
        Subnet::new(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(text: &str) -> Subnet {
        text.parse().expect("valid subnet")
    }

    #[test]
    fn parses_and_describes_a_subnet() {
        let s = subnet("10.88.0.0/16");
        assert_eq!(s.to_string(), "10.88.0.0/16");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert_eq!(
            s.usable_range(),
            (Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 255, 254))
        );
        assert_eq!(s.capacity(), 65533);
        assert!(s.contains(Ipv4Addr::new(10, 88, 3, 4)));
        assert!(!s.contains(Ipv4Addr::new(10, 89, 0, 1)));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "10.88.0.1/16",
            "10.88.0.0",
            "10.88.0.0/31",
            "10.88.0.0/32",
            "10.0.0.0/7",
            "300.1.1.0/24",
            "10.88.0.0/x",
            "",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn never_hands_out_network_gateway_or_broadcast() {
        let s = subnet("192.168.7.0/29");
        let mut used = HashSet::new();
        let mut handed = Vec::new();
        while let Ok(addr) = s.next_free(&used) {
            assert!(s.is_assignable(addr));
            used.insert(addr);
            handed.push(addr);
        }
        assert_eq!(handed.len(), 5);
        for forbidden in [s.network(), s.gateway(), s.broadcast()] {
            assert!(!handed.contains(&forbidden));
            assert!(!s.is_assignable(forbidden));
        }
        assert!(matches!(s.next_free(&used), Err(Error::SubnetExhausted(_))));
    }

    #[test]
    fn fills_holes_first() {
        let s = subnet("10.1.0.0/24");
        let used: HashSet<_> = [Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 4)]
            .into_iter()
            .collect();
        assert_eq!(s.next_free(&used).ok(), Some(Ipv4Addr::new(10, 1, 0, 3)));
    }

    #[test]
    fn smallest_subnet_has_one_endpoint() {
        let s = subnet("10.2.0.0/30");
        assert_eq!(s.capacity(), 1);
        assert_eq!(
            s.next_free(&HashSet::new()).ok(),
            Some(Ipv4Addr::new(10, 2, 0, 2))
        );
    }
}
