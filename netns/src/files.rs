//! Content of `/etc/hosts` and `/etc/resolv.conf` for a sandbox.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// `/etc/hosts` naming the sandbox itself plus any `extra` (name, address) pairs.
pub fn hosts_file(hostname: &str, ip: Ipv4Addr, extra: &[(String, Ipv4Addr)]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    out.push_str(&format!("{ip}\t{hostname}\n"));
    for (name, addr) in extra {
        out.push_str(&format!("{addr}\t{name}\n"));
    }
    out
}

/// A generated resolv.conf and, when the host had no usable nameserver,
/// a warning for the caller to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    pub content: String,
    pub warning: Option<String>,
}

/// Builds a sandbox resolv.conf from the host's resolv.conf text.
///
/// Keeps IPv4 nameservers that are not loopback (a loopback resolver on the
/// host is unreachable from the sandbox's namespace) and the `search` and
/// `options` lines. IPv6 nameservers are dropped: endpoints have no IPv6.
/// When nothing usable is left the file has no nameserver, so lookups fail
/// fast instead of going to a wrong server, and `warning` says why.
pub fn resolv_conf(host_resolv_conf: &str) -> ResolvConf {
    let mut nameservers = Vec::new();
    let mut skipped = Vec::new();
    let mut other_lines = Vec::new();
    for line in host_resolv_conf.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => match words.next().map(str::parse::<IpAddr>) {
                Some(Ok(IpAddr::V4(addr))) if !addr.is_loopback() && !addr.is_unspecified() => {
                    nameservers.push(addr)
                }
                Some(Ok(addr)) => skipped.push(addr.to_string()),
                _ => {}
            },
            Some("search") | Some("domain") | Some("options") => other_lines.push(line.trim()),
            _ => {}
        }
    }
    let mut content = String::new();
    for line in other_lines {
        content.push_str(line);
        content.push('\n');
    }
    for addr in &nameservers {
        content.push_str(&format!("nameserver {addr}\n"));
    }
    let warning = nameservers.is_empty().then(|| {
        if skipped.is_empty() {
            "host resolv.conf has no nameserver; sandbox gets none".to_string()
        } else {
            format!(
                "host nameservers {} are unreachable from a sandbox (loopback or IPv6); sandbox gets none",
                skipped.join(", ")
            )
        }
    });
    ResolvConf { content, warning }
}

/// Reads the host's `/etc/resolv.conf`; when it only names loopback servers
/// (systemd-resolved's stub), falls back to the upstream list that
/// systemd-resolved keeps in `/run/systemd/resolve/resolv.conf`.
pub fn resolv_conf_from_host() -> ResolvConf {
    let read = |path: &str| std::fs::read_to_string(Path::new(path)).unwrap_or_default();
    let primary = resolv_conf(&read("/etc/resolv.conf"));
    if primary.warning.is_none() {
        return primary;
    }
    let upstream = resolv_conf(&read("/run/systemd/resolve/resolv.conf"));
    if upstream.warning.is_none() {
        upstream
    } else {
        primary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_names_the_sandbox() {
        let text = hosts_file(
            "web-1",
            Ipv4Addr::new(10, 88, 0, 5),
            &[("db".to_string(), Ipv4Addr::new(10, 88, 0, 6))],
        );
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(text.contains("10.88.0.5\tweb-1\n"));
        assert!(text.contains("10.88.0.6\tdb\n"));
    }

    #[test]
    fn copies_upstream_nameservers_and_search() {
        let conf = resolv_conf(
            "# comment\nsearch example.internal\nnameserver 192.0.2.53\nnameserver 127.0.0.1\nnameserver 2001:db8::1\noptions ndots:2\n",
        );
        assert_eq!(
            conf.content,
            "search example.internal\noptions ndots:2\nnameserver 192.0.2.53\n"
        );
        assert_eq!(conf.warning, None);
    }

    #[test]
    fn loopback_only_gives_no_nameserver_and_a_warning() {
        let conf = resolv_conf("nameserver 127.0.0.53\noptions edns0\n");
        assert!(!conf.content.contains("nameserver"));
        let warning = conf.warning.expect("a warning");
        assert!(warning.contains("127.0.0.53"));
    }

    #[test]
    fn empty_host_file_warns() {
        let conf = resolv_conf("");
        assert_eq!(conf.content, "");
        assert!(conf.warning.is_some());
    }
}
