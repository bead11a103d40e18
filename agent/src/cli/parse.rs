//! Parsers for flag values shared by several commands.

use std::time::Duration;

use crate::model::{PublishPort, ServicePublish};

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 30s, 5m or 1h"))
}

/// HOSTPORT:PORT (127.0.0.1) or IP:HOSTPORT:PORT.
pub(crate) fn parse_publish(s: &str) -> Result<PublishPort, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{p}` in `{s}` is not a port (1-65535)"))
    };
    match parts.as_slice() {
        [host_port, port_in] => Ok(PublishPort {
            host_ip: None,
            host_port: port(host_port)?,
            port: port(port_in)?,
        }),
        [ip, host_port, port_in] => {
            ip.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("`{ip}` is not an IPv4 address"))?;
            Ok(PublishPort {
                host_ip: Some(ip.to_string()),
                host_port: port(host_port)?,
                port: port(port_in)?,
            })
        }
        _ => Err(format!(
            "`{s}`: write HOSTPORT:PORT or IP:HOSTPORT:PORT, e.g. 8080:80"
        )),
    }
}

/// [SERVICE=][IP:]HOSTPORT:PORT, service `web` by default.
pub(crate) fn parse_service_publish(s: &str) -> Result<ServicePublish, String> {
    let (service, rest) = match s.split_once('=') {
        Some((service, rest)) => (service, rest),
        None => ("web", s),
    };
    miren_addons::validate_name(service).map_err(|e| format!("`{s}`: service: {e}"))?;
    let port = parse_publish(rest)?;
    Ok(ServicePublish {
        service: service.to_string(),
        host_ip: port.host_ip,
        host_port: port.host_port,
        port: port.port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_forms() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!((p.host_ip, p.host_port, p.port), (None, 8080, 80));
        let p = parse_publish("0.0.0.0:8080:80").unwrap();
        assert_eq!(p.host_ip.as_deref(), Some("0.0.0.0"));
        assert!(parse_publish("0:80").is_err());
        assert!(parse_publish("x:1:2").is_err());
        let s = parse_service_publish("8080:3000").unwrap();
        assert_eq!(
            (s.service.as_str(), s.host_port, s.port),
            ("web", 8080, 3000)
        );
        let s = parse_service_publish("api=127.0.0.1:9000:9").unwrap();
        assert_eq!(s.service, "api");
    }
}
