//! Valkey: the official valkey/valkey image's contract, a password on every connection, and
//! an append-only file on the server's disk. Readiness is `AUTH` + `PING` and a probe key
//! written, read back and deleted, with the app's password.

use std::net::Ipv4Addr;
use std::time::Duration;

use miren_addons::{AddonKind, Credentials, EnvVar, Variant};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use super::provider::{
    AddonProvider, BoxFuture, DataDisk, DedicatedSession, ServerConnection, ServerSpec,
};
use crate::core::error::Error;

pub const PORT: u16 = 6379;

/// The image's working directory, where the server keeps its files; the disk is mounted here.
const DATA_MOUNT: &str = "/data";
/// The variable that carries the password into the server's sandbox, and no further.
const PASSWORD_ENV: &str = "VALKEY_PASSWORD";
/// Written by every readiness check and deleted right after; it expires on its own if an
/// agent is killed between the two.
const PROBE_KEY: &str = "miren:readiness-probe";
const PROBE_TTL_MS: u64 = 60_000;
const TIMEOUT: Duration = Duration::from_secs(2);

/// The server's command, after the image's entrypoint. The password goes in as a config read
/// from stdin (`valkey-server -`), never on a command line: a host's `ps` shows argv. The
/// shell reads it from the sandbox's env, drops it from the env the server inherits, and
/// `exec`s the image's entrypoint, which chowns `/data` and runs the server as `valkey`
/// (PID 1, so a stop is its own clean shutdown). The append-only file, fsynced every second,
/// loses at most a second of acked writes when the server is killed.
///
/// `user ""` is the `default` user again (same password, same rights) under the empty name:
/// `redis://:pass@host` means the default user in every client, but valkey-cli (8.1) sends it
/// as `AUTH "" pass`, which would otherwise fail.
const START_SCRIPT: &str = r#"p="$VALKEY_PASSWORD"; unset VALKEY_PASSWORD
exec docker-entrypoint.sh valkey-server - --port 6379 --dir /data --appendonly yes --appendfsync everysec --protected-mode no <<EOF
requirepass "$p"
user "" on >$p ~* &* +@all
EOF
"#;

/// The `miren-valkey` addon.
pub struct Valkey;

impl AddonProvider for Valkey {
    fn kind(&self) -> AddonKind {
        AddonKind::Valkey
    }

    fn display_name(&self) -> &'static str {
        "Valkey"
    }

    fn readiness_check(&self) -> &'static str {
        "`AUTH` + `PING` and a `SET`/`GET` of a probe key"
    }

    fn server_base_name(&self) -> &'static str {
        "addon-valkey"
    }

    /// The password only: Valkey's `default` user, and no database (the app uses db 0).
    fn app_credentials(&self, _app: &str) -> Result<Credentials, Error> {
        let password = miren_addons::generate_password()
            .map_err(|e| Error::internal(format!("generating a password: {e}")))?;
        Ok(Credentials {
            user: String::new(),
            password,
            database: String::new(),
        })
    }

    fn admin_credentials(&self) -> Result<Credentials, Error> {
        Err(Error::invalid("Valkey has no shared variant"))
    }

    fn admin_login(&self, _user: &str, password: &str) -> Credentials {
        Credentials {
            user: String::new(),
            password: password.to_string(),
            database: String::new(),
        }
    }

    fn server(&self, variant: Variant, login: &Credentials) -> ServerSpec {
        ServerSpec {
            command: vec!["sh".into(), "-c".into(), START_SCRIPT.into()],
            env: vec![format!("{PASSWORD_ENV}={}", login.password)],
            port: PORT,
            data: Some(DataDisk {
                mount_path: DATA_MOUNT,
                size_gb: variant.disk_size_gb(),
                // A server that never answered left at most an empty append-only file.
                discard_if_never_ready: None,
            }),
        }
    }

    fn env_vars(&self, host: Ipv4Addr, login: &Credentials) -> Vec<EnvVar> {
        miren_addons::valkey_env(&host.to_string(), PORT, &login.password)
    }

    fn connect<'a>(
        &'a self,
        host: Ipv4Addr,
        login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>> {
        Box::pin(async move {
            let conn = probe(host, &login.password)
                .await
                .map_err(|e| describe(&e))?;
            Ok(DedicatedSession::boxed("Valkey", conn))
        })
    }
}

/// Connects (`AUTH` with `password` is part of the handshake), then `PING`, and `SET`, `GET`
/// and `DEL` of the probe key: the server answers, authenticates, and accepts writes (not
/// still loading its append-only file, not out of disk).
pub async fn probe(
    host: Ipv4Addr,
    password: &str,
) -> Result<MultiplexedConnection, redis::RedisError> {
    let info = ConnectionAddr::Tcp(host.to_string(), PORT)
        .into_connection_info()?
        .set_redis_settings(RedisConnectionInfo::default().set_password(password));
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = redis::Client::open(info)?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
    if pong != "PONG" {
        return Err(unexpected("PING", &pong));
    }
    let value = format!("{:x}", std::process::id());
    redis::cmd("SET")
        .arg(PROBE_KEY)
        .arg(&value)
        .arg("PX")
        .arg(PROBE_TTL_MS)
        .query_async::<()>(&mut conn)
        .await?;
    let read: Option<String> = redis::cmd("GET")
        .arg(PROBE_KEY)
        .query_async(&mut conn)
        .await?;
    if read.as_deref() != Some(value.as_str()) {
        return Err(unexpected(
            "GET of the probe key",
            read.as_deref().unwrap_or("nil"),
        ));
    }
    redis::cmd("DEL")
        .arg(PROBE_KEY)
        .query_async::<()>(&mut conn)
        .await?;
    Ok(conn)
}

fn unexpected(what: &str, got: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected answer",
        format!("{what} answered `{got}`"),
    ))
}

/// An error's text with its causes.
fn describe(err: &redis::RedisError) -> String {
    crate::util::error_chain(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_in_the_env_and_never_on_the_command_line() {
        let login = Valkey.app_credentials("shop").unwrap();
        let spec = Valkey.server(Variant::Small, &login);
        assert_eq!(spec.env, [format!("VALKEY_PASSWORD={}", login.password)]);
        assert!(spec.command.iter().all(|a| !a.contains(&login.password)));
        assert!(START_SCRIPT.contains("--appendonly yes --appendfsync everysec"));
        assert_eq!(spec.port, 6379);
        let data = spec.data.unwrap();
        assert_eq!((data.mount_path, data.size_gb), ("/data", 1));
        // Servers' names are on disk and in the database: they never change.
        assert_eq!(Valkey.server_base_name(), "addon-valkey");
    }

    #[test]
    fn the_app_gets_both_sets_of_variables() {
        let login = Credentials {
            user: String::new(),
            password: "pw".into(),
            database: String::new(),
        };
        let vars = Valkey.env_vars(Ipv4Addr::new(10, 0, 0, 2), &login);
        let url = vars.iter().find(|v| v.key == "REDIS_URL").unwrap();
        assert_eq!(url.value, "redis://:pw@10.0.0.2:6379");
        assert_eq!(vars.len(), 8);
    }
}
