//! RabbitMQ: a dedicated server per app on the official rabbitmq image's contract. The app's
//! user and vhost are both `miren` (the login's `database` is the vhost); the server makes
//! them on its first boot from `RABBITMQ_DEFAULT_*`. Readiness is an AMQP session as that
//! user that declares and deletes a probe queue.

use std::net::Ipv4Addr;
use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Connection, ConnectionProperties};
use miren_addons::{AddonKind, Credentials, EnvVar, Variant};

use super::provider::{
    AddonProvider, BoxFuture, DataDisk, DedicatedSession, ServerConnection, ServerSpec,
};
use crate::core::error::Error;

pub const PORT: u16 = 5672;

/// The rabbitmq user's HOME in the image: the node's database and its Erlang cookie.
const DATA_MOUNT: &str = "/var/lib/rabbitmq";
/// The node's databases (`mnesia/<node>`), relative to the disk's root. A first boot cut
/// short leaves one without the default user, which a later boot would keep.
const DATABASE_SUBDIR: &str = "mnesia";
/// A fixed host part, so the node's name (and the database named after it) survives a new
/// sandbox; `localhost` resolves in every sandbox (its hosts file has it).
const NODE_NAME: &str = "rabbit@localhost";
/// The app's user and vhost (issue 12's catalogue).
const USER: &str = "miren";
const VHOST: &str = "miren";
/// Declared and deleted by the readiness check; exclusive, so it also goes with the session.
const PROBE_QUEUE: &str = "miren.readiness-probe";
/// One readiness attempt: connecting plus the queue round trip.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `miren-rabbitmq` addon.
pub struct Rabbitmq;

impl AddonProvider for Rabbitmq {
    fn kind(&self) -> AddonKind {
        AddonKind::Rabbitmq
    }

    fn display_name(&self) -> &'static str {
        "RabbitMQ"
    }

    fn readiness_check(&self) -> &'static str {
        "an AMQP session that declares and deletes a probe queue"
    }

    fn server_base_name(&self) -> &'static str {
        "addon-rabbitmq"
    }

    fn app_credentials(&self, _app: &str) -> Result<Credentials, Error> {
        let password = miren_addons::generate_password()
            .map_err(|e| Error::internal(format!("generating a password: {e}")))?;
        Ok(self.admin_login(USER, &password))
    }

    fn admin_credentials(&self) -> Result<Credentials, Error> {
        // No shared variant: the app's login is the server's only one.
        self.app_credentials("")
    }

    fn admin_login(&self, user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.to_string(),
            password: password.to_string(),
            database: VHOST.to_string(),
        }
    }

    fn server(&self, variant: Variant, login: &Credentials) -> ServerSpec {
        ServerSpec {
            command: Vec::new(),
            env: vec![
                format!("RABBITMQ_DEFAULT_USER={}", login.user),
                format!("RABBITMQ_DEFAULT_PASS={}", login.password),
                format!("RABBITMQ_DEFAULT_VHOST={}", login.database),
                format!("RABBITMQ_NODENAME={NODE_NAME}"),
            ],
            port: PORT,
            data: Some(DataDisk {
                mount_path: DATA_MOUNT,
                size_gb: variant.disk_size_gb(),
                discard_if_never_ready: Some(DATABASE_SUBDIR),
            }),
        }
    }

    fn env_vars(&self, host: Ipv4Addr, login: &Credentials) -> Vec<EnvVar> {
        miren_addons::env::rabbitmq_env(&host.to_string(), PORT, login)
    }

    fn connect<'a>(
        &'a self,
        host: Ipv4Addr,
        login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>> {
        Box::pin(async move {
            let session = tokio::time::timeout(ATTEMPT_TIMEOUT, probe(host, login))
                .await
                .map_err(|_| format!("no AMQP answer within {}s", ATTEMPT_TIMEOUT.as_secs()))?
                .map_err(|e| describe(&e))?;
            Ok(DedicatedSession::boxed("RabbitMQ", session))
        })
    }
}

/// The AMQP URI of `login` at `host`, built field by field (no percent-encoding to get wrong).
fn uri(host: Ipv4Addr, login: &Credentials) -> AMQPUri {
    AMQPUri {
        scheme: AMQPScheme::AMQP,
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: login.user.clone(),
                password: login.password.clone(),
            },
            host: host.to_string(),
            port: PORT,
        },
        vhost: login.database.clone(),
        query: AMQPQueryString {
            connection_timeout: Some(2000),
            ..AMQPQueryString::default()
        },
    }
}

/// The readiness check: a session to the vhost as `login` that declares and deletes a probe
/// queue, so the user, its permissions on the vhost and the queue machinery all answer.
async fn probe(host: Ipv4Addr, login: &Credentials) -> Result<Connection, lapin::Error> {
    let conn = Connection::connect_uri(uri(host, login), ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(PROBE_QUEUE.into(), options, FieldTable::default())
        .await?;
    channel
        .queue_delete(PROBE_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    // The channel is done; the connection is the session the driver keeps for a moment.
    let _ = channel.close(200, "probe done".into()).await;
    Ok(conn)
}

/// An error's text with its sources (refused connections, the broker's reply text).
fn describe(err: &lapin::Error) -> String {
    crate::util::error_chain(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dedicated_server_follows_the_image_contract() {
        let login = Rabbitmq.admin_login("miren", "pw");
        let spec = Rabbitmq.server(Variant::Small, &login);
        assert_eq!(
            spec.env,
            [
                "RABBITMQ_DEFAULT_USER=miren",
                "RABBITMQ_DEFAULT_PASS=pw",
                "RABBITMQ_DEFAULT_VHOST=miren",
                "RABBITMQ_NODENAME=rabbit@localhost",
            ]
        );
        assert_eq!(spec.port, 5672);
        // Servers' names are on disk and in the database: they never change.
        assert_eq!(Rabbitmq.server_base_name(), "addon-rabbitmq");
        let data = spec.data.unwrap();
        assert_eq!(data.mount_path, "/var/lib/rabbitmq");
        assert_eq!(data.size_gb, 1);
        assert_eq!(data.discard_if_never_ready, Some("mnesia"));
    }

    #[test]
    fn the_app_gets_user_and_vhost_miren() {
        let login = Rabbitmq.app_credentials("shop").unwrap();
        assert_eq!(
            (login.user.as_str(), login.database.as_str()),
            ("miren", "miren")
        );
        assert!(login.password.len() >= 16);
        let vars = Rabbitmq.env_vars(Ipv4Addr::new(10, 0, 0, 2), &login);
        let url = vars.iter().find(|v| v.key == "RABBITMQ_URL").unwrap();
        assert_eq!(
            url.value,
            format!("amqp://miren:{}@10.0.0.2:5672/miren", login.password)
        );
    }

    #[test]
    fn the_probe_uri_names_the_vhost_and_user() {
        let login = Rabbitmq.admin_login("miren", "p@ss/word");
        let u = uri(Ipv4Addr::new(10, 0, 0, 2), &login);
        assert_eq!(u.vhost, "miren");
        assert_eq!(u.authority.userinfo.password, "p@ss/word");
        assert_eq!(u.authority.port, 5672);
    }
}
