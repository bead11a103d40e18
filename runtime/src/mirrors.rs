use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::error::{Error, Result};

/// Environment variable holding comma-separated `REGISTRY=MIRROR` pairs.
pub const MIRROR_ENV: &str = "MIREN_IMAGE_MIRROR";

/// Where a registry's images are actually fetched from. The image keeps the
/// reference the user wrote (`docker.io/library/postgres:17`); only the host
/// contacted changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirrors {
    map: BTreeMap<String, Endpoint>,
}

/// A host to contact and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
}

impl Mirrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `REGISTRY=MIRROR` specs such as `docker.io=127.0.0.1:5123`.
    /// MIRROR may carry `http://` or `https://`. Without a scheme, loopback
    /// mirrors use plain HTTP and others HTTPS. Plain HTTP to a mirror off
    /// loopback is refused unless `allow_insecure`.
    pub fn parse<S: AsRef<str>>(
        specs: impl IntoIterator<Item = S>,
        allow_insecure: bool,
    ) -> Result<Self> {
        let mut m = Mirrors::new();
        for spec in specs {
            m.add(spec.as_ref(), allow_insecure)?;
        }
        Ok(m)
    }

    /// Parses the comma-separated form used in the environment.
    pub fn parse_list(list: &str, allow_insecure: bool) -> Result<Self> {
        Self::parse(
            list.split(',').map(str::trim).filter(|s| !s.is_empty()),
            allow_insecure,
        )
    }

    /// Reads [`MIRROR_ENV`]; empty when unset.
    pub fn from_env(allow_insecure: bool) -> Result<Self> {
        match std::env::var(MIRROR_ENV) {
            Ok(v) => Self::parse_list(&v, allow_insecure),
            Err(_) => Ok(Self::new()),
        }
    }

    pub fn add(&mut self, spec: &str, allow_insecure: bool) -> Result<()> {
        let bad = |reason: &str| Error::InvalidMirror {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (registry, mirror) = spec
            .split_once('=')
            .ok_or_else(|| bad("expected REGISTRY=MIRROR"))?;
        let registry = normalize_registry(registry.trim());
        let mirror = mirror.trim();
        let (scheme, host) = match mirror.split_once("://") {
            Some((s, h)) => (Some(s), h),
            None => (None, mirror),
        };
        let host = host.trim_end_matches('/');
        if registry.is_empty() || host.is_empty() {
            return Err(bad("empty registry or mirror"));
        }
        if host.contains('/') || host.contains('@') || host.chars().any(char::is_whitespace) {
            return Err(bad("mirror must be host[:port]"));
        }
        let loopback = is_loopback_host(host);
        let plain_http = match scheme {
            None => loopback,
            Some("https") => false,
            Some("http") if loopback || allow_insecure => true,
            Some("http") => {
                return Err(bad(
                    "plain HTTP to a mirror off loopback needs the allow-insecure flag",
                ))
            }
            Some(_) => return Err(bad("scheme must be http or https")),
        };
        self.map.insert(
            registry,
            Endpoint {
                host: host.to_string(),
                plain_http,
            },
        );
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The mirror for `registry`, if one is set.
    pub fn mirror_for(&self, registry: &str) -> Option<&Endpoint> {
        self.map.get(&normalize_registry(registry))
    }

    /// Where to fetch `registry`'s images from: its mirror, or the registry
    /// itself (plain HTTP only on loopback, like Docker's localhost rule).
    pub fn endpoint(&self, registry: &str) -> Endpoint {
        if let Some(e) = self.mirror_for(registry) {
            return e.clone();
        }
        Endpoint {
            host: registry.to_string(),
            plain_http: is_loopback_host(registry),
        }
    }
}

/// Docker Hub has several names; they are one registry.
pub fn normalize_registry(r: &str) -> String {
    let r = r.to_ascii_lowercase();
    match r.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => r,
    }
}

/// `localhost`, `127.x.y.z`, `::1`, with or without a port.
pub fn is_loopback_host(hostport: &str) -> bool {
    let host = if let Some(rest) = hostport.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if hostport.matches(':').count() == 1 {
        hostport.split(':').next().unwrap_or("")
    } else {
        hostport
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_rewrite() {
        let m = Mirrors::parse_list(
            "docker.io=127.0.0.1:5123, ghcr.io=https://mirror.example",
            false,
        )
        .unwrap();
        let e = m.endpoint("index.docker.io");
        assert_eq!(e.host, "127.0.0.1:5123");
        assert!(e.plain_http);
        let g = m.endpoint("ghcr.io");
        assert_eq!(g.host, "mirror.example");
        assert!(!g.plain_http);
        let q = m.endpoint("quay.io");
        assert_eq!(q.host, "quay.io");
        assert!(!q.plain_http);
        assert!(m.endpoint("localhost:5000").plain_http);
    }

    #[test]
    fn insecure_needs_flag() {
        assert!(Mirrors::parse(["docker.io=http://10.0.0.1:5000"], false).is_err());
        let m = Mirrors::parse(["docker.io=http://10.0.0.1:5000"], true).unwrap();
        assert!(m.endpoint("docker.io").plain_http);
        // No scheme off loopback means HTTPS, even with the flag.
        let m = Mirrors::parse(["docker.io=10.0.0.1:5000"], true).unwrap();
        assert!(!m.endpoint("docker.io").plain_http);
        assert!(Mirrors::parse(["docker.io"], false).is_err());
        assert!(Mirrors::parse(["docker.io=host/path"], false).is_err());
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("example.com:5000"));
    }
}
