//! Memcached: the official memcached image's contract, no disk and no password. Its only
//! protection is the network: the server's endpoint admits the app alone. Readiness is the
//! `version` command.

use std::net::Ipv4Addr;
use std::time::Duration;

use miren_addons::{AddonKind, Credentials, EnvVar, Variant};

use super::provider::{AddonProvider, BoxFuture, DedicatedSession, ServerConnection, ServerSpec};
use crate::core::error::Error;

pub const PORT: u16 = 11211;
/// The cache's size in MB (`-m`).
const MEMORY_MB: u32 = 64;
const TIMEOUT: Duration = Duration::from_secs(2);

/// The `miren-memcache` addon.
pub struct Memcache;

impl AddonProvider for Memcache {
    fn kind(&self) -> AddonKind {
        AddonKind::Memcache
    }

    fn display_name(&self) -> &'static str {
        "Memcached"
    }

    fn readiness_check(&self) -> &'static str {
        "`version`"
    }

    fn server_base_name(&self) -> &'static str {
        "addon-memcache"
    }

    /// Memcached has no logins: all three fields are empty.
    fn app_credentials(&self, _app: &str) -> Result<Credentials, Error> {
        Ok(no_login())
    }

    fn admin_credentials(&self) -> Result<Credentials, Error> {
        Err(Error::invalid("Memcached has no shared variant"))
    }

    fn admin_login(&self, _user: &str, _password: &str) -> Credentials {
        no_login()
    }

    fn server(&self, _variant: Variant, _login: &Credentials) -> ServerSpec {
        ServerSpec {
            // The image's entrypoint takes options alone as `memcached <options>`.
            command: vec![
                "memcached".into(),
                "-m".into(),
                MEMORY_MB.to_string(),
                "-p".into(),
                PORT.to_string(),
            ],
            env: Vec::new(),
            port: PORT,
            data: None,
        }
    }

    fn env_vars(&self, host: Ipv4Addr, _login: &Credentials) -> Vec<EnvVar> {
        miren_addons::memcache_env(&host.to_string(), PORT)
    }

    fn connect<'a>(
        &'a self,
        host: Ipv4Addr,
        _login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>> {
        Box::pin(async move {
            version(host).await?;
            Ok(DedicatedSession::boxed("Memcached", ()))
        })
    }
}

fn no_login() -> Credentials {
    Credentials {
        user: String::new(),
        password: String::new(),
        database: String::new(),
    }
}

/// The server's `version` answer (the library has no timeouts of its own).
pub async fn version(host: Ipv4Addr) -> Result<String, String> {
    let check = async {
        let mut client = async_memcached::Client::new(format!("tcp://{host}:{PORT}"))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        client
            .version()
            .await
            .map_err(|e| format!("`version`: {e}"))
    };
    match tokio::time::timeout(TIMEOUT, check).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {}s", TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_without_disk_or_password() {
        let spec = Memcache.server(Variant::Small, &no_login());
        assert_eq!(spec.command, ["memcached", "-m", "64", "-p", "11211"]);
        assert!(spec.env.is_empty());
        assert_eq!(spec.data, None);
        assert_eq!(Memcache.server_base_name(), "addon-memcache");
        let vars = Memcache.env_vars(Ipv4Addr::new(10, 0, 0, 3), &no_login());
        assert_eq!(vars[0].value, "memcache://10.0.0.3:11211");
    }
}
