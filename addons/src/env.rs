//! Environment variables an addon instance injects into its app.

use std::fmt;

use crate::catalogue::{AddonKind, Pooling};
use crate::credentials::Credentials;

/// What a sensitive value shows as. Fixed length, so it leaks nothing about the secret.
pub const MASK: &str = "********";

/// Names PostgreSQL injects, in the order [`postgres_env`] produces them.
pub const POSTGRES_ENV_KEYS: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_URL_SESSION",
    "DATABASE_URL_DIRECT",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
];

/// Names MySQL (and MariaDB) inject.
pub const MYSQL_ENV_KEYS: &[&str] = &[
    "DATABASE_URL",
    "MYSQL_HOST",
    "MYSQL_PORT",
    "MYSQL_USER",
    "MYSQL_PASSWORD",
    "MYSQL_DATABASE",
];

/// Names Valkey injects: its own, and the same four under the `REDIS_` names clients read.
pub const VALKEY_ENV_KEYS: &[&str] = &[
    "VALKEY_URL",
    "VALKEY_HOST",
    "VALKEY_PORT",
    "VALKEY_PASSWORD",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
];

/// Names Memcached injects (it has no credentials).
pub const MEMCACHE_ENV_KEYS: &[&str] = &["MEMCACHE_URL", "MEMCACHE_HOST", "MEMCACHE_PORT"];

/// Names RabbitMQ injects.
pub const RABBITMQ_ENV_KEYS: &[&str] = &[
    "RABBITMQ_URL",
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
    "RABBITMQ_VHOST",
];

/// Two addons of one app that would set the same variables: an error at deploy, since one
/// would silently overwrite the other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "addons {first} and {second} both set {}; an app can have only one of them: remove one of the two",
    .keys.join(", ")
)]
pub struct EnvClash {
    pub first: AddonKind,
    pub second: AddonKind,
    pub keys: Vec<&'static str>,
}

/// The kinds that cannot be on one app with `kind`: their variables overlap its.
pub fn clashing_kinds(kind: AddonKind) -> impl Iterator<Item = AddonKind> {
    AddonKind::ALL
        .iter()
        .copied()
        .filter(move |other| env_clash(&[kind, *other]).is_some())
}

/// The first pair of `kinds` whose variables overlap, if any.
pub fn env_clash(kinds: &[AddonKind]) -> Option<EnvClash> {
    for (i, first) in kinds.iter().enumerate() {
        for second in &kinds[i + 1..] {
            if first == second {
                continue;
            }
            let keys: Vec<&'static str> = first
                .env_keys()
                .iter()
                .copied()
                .filter(|k| second.env_keys().contains(k))
                .collect();
            if !keys.is_empty() {
                return Some(EnvClash {
                    first: *first,
                    second: *second,
                    keys,
                });
            }
        }
    }
    None
}

#[derive(Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub key: &'static str,
    pub value: String,
    /// Stored encrypted / shown masked by whoever displays it.
    pub sensitive: bool,
}

impl EnvVar {
    /// The value as `miren env list` should show it.
    pub fn display_value(&self) -> &str {
        if self.sensitive {
            MASK
        } else {
            &self.value
        }
    }
}

/// `KEY=value`, masked when sensitive.
impl fmt::Display for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.display_value())
    }
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvVar")
            .field("key", &self.key)
            .field("value", &self.display_value())
            .field("sensitive", &self.sensitive)
            .finish()
    }
}

/// Where and as whom an app reaches its PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConnection {
    /// A host name or an IP address; IPv6 is bracketed in the URL only.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl PostgresConnection {
    pub fn new(host: impl Into<String>, port: u16, credentials: &Credentials) -> Self {
        PostgresConnection {
            host: host.into(),
            port,
            user: credentials.user.clone(),
            password: credentials.password.clone(),
            database: credentials.database.clone(),
        }
    }

    /// `postgres://user:pass@host:port/db`, every part percent-encoded so any value survives.
    pub fn database_url(&self) -> String {
        self.url_with_password(&percent_encode(&self.password))
    }

    /// The URL with the password replaced by the mask, for logs and `env list`.
    pub fn redacted_url(&self) -> String {
        self.url_with_password(MASK)
    }

    fn url_with_password(&self, password: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            percent_encode(&self.user),
            password,
            url_host(&self.host),
            self.port,
            percent_encode(&self.database),
        )
    }

    /// The same login through another host and port (the pooler in front of the server).
    pub fn via(&self, host: impl Into<String>, port: u16) -> PostgresConnection {
        PostgresConnection {
            host: host.into(),
            port,
            ..self.clone()
        }
    }

    /// The server's own variables, without a pooler: `DATABASE_URL` and `PG*`.
    pub fn env_vars(&self) -> Vec<EnvVar> {
        let var = |key, value, sensitive| EnvVar {
            key,
            value,
            sensitive,
        };
        vec![
            var("DATABASE_URL", self.database_url(), true),
            var("PGHOST", self.host.clone(), false),
            var("PGPORT", self.port.to_string(), false),
            var("PGUSER", self.user.clone(), false),
            var("PGPASSWORD", self.password.clone(), true),
            var("PGDATABASE", self.database.clone(), false),
        ]
    }
}

impl fmt::Debug for PostgresConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

/// The pooler's transaction-mode port (PgBouncer's usual one).
pub const POOLER_TRANSACTION_PORT: u16 = 6432;
/// The pooler's session-mode port.
pub const POOLER_SESSION_PORT: u16 = 6433;

/// `miren-postgresql`'s variables with its pooler at `pooler_host`: `DATABASE_URL` where
/// `pooling` says, `DATABASE_URL_SESSION` (the session pooler), `DATABASE_URL_DIRECT` (the
/// server, for migrations, `LISTEN/NOTIFY`, advisory locks), and `PG*` naming the server.
pub fn postgres_env(
    direct: &PostgresConnection,
    pooler_host: &str,
    pooling: Pooling,
) -> Vec<EnvVar> {
    let transaction = direct.via(pooler_host, POOLER_TRANSACTION_PORT);
    let session = direct.via(pooler_host, POOLER_SESSION_PORT);
    let main = match pooling {
        Pooling::Transaction => &transaction,
        Pooling::Session => &session,
        Pooling::None => direct,
    };
    let mut vars = direct.env_vars();
    vars[0] = var("DATABASE_URL", main.database_url(), true);
    vars.insert(1, var("DATABASE_URL_SESSION", session.database_url(), true));
    vars.insert(2, var("DATABASE_URL_DIRECT", direct.database_url(), true));
    vars
}

fn var(key: &'static str, value: String, sensitive: bool) -> EnvVar {
    EnvVar {
        key,
        value,
        sensitive,
    }
}

/// `miren-mysql`'s variables: `DATABASE_URL` (`mysql://user:pass@host:port/db`) and `MYSQL_*`.
pub fn mysql_env(host: &str, port: u16, login: &Credentials) -> Vec<EnvVar> {
    let url = format!(
        "mysql://{}:{}@{}:{port}/{}",
        percent_encode(&login.user),
        percent_encode(&login.password),
        url_host(host),
        percent_encode(&login.database),
    );
    vec![
        var("DATABASE_URL", url, true),
        var("MYSQL_HOST", host.to_string(), false),
        var("MYSQL_PORT", port.to_string(), false),
        var("MYSQL_USER", login.user.clone(), false),
        var("MYSQL_PASSWORD", login.password.clone(), true),
        var("MYSQL_DATABASE", login.database.clone(), false),
    ]
}

/// `miren-valkey`'s variables: `redis://:pass@host:port` under both the `VALKEY_` and
/// `REDIS_` names.
pub fn valkey_env(host: &str, port: u16, password: &str) -> Vec<EnvVar> {
    let url = format!(
        "redis://:{}@{}:{port}",
        percent_encode(password),
        url_host(host)
    );
    let mut vars = Vec::with_capacity(8);
    for keys in [
        [
            "VALKEY_URL",
            "VALKEY_HOST",
            "VALKEY_PORT",
            "VALKEY_PASSWORD",
        ],
        ["REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"],
    ] {
        vars.push(var(keys[0], url.clone(), true));
        vars.push(var(keys[1], host.to_string(), false));
        vars.push(var(keys[2], port.to_string(), false));
        vars.push(var(keys[3], password.to_string(), true));
    }
    vars
}

/// `miren-memcache`'s variables: `memcache://host:port`, host and port.
pub fn memcache_env(host: &str, port: u16) -> Vec<EnvVar> {
    vec![
        var(
            "MEMCACHE_URL",
            format!("memcache://{}:{port}", url_host(host)),
            false,
        ),
        var("MEMCACHE_HOST", host.to_string(), false),
        var("MEMCACHE_PORT", port.to_string(), false),
    ]
}

/// `miren-rabbitmq`'s variables: `amqp://user:pass@host:port/vhost` and `RABBITMQ_*`. The
/// login's `database` is the vhost.
pub fn rabbitmq_env(host: &str, port: u16, login: &Credentials) -> Vec<EnvVar> {
    let url = format!(
        "amqp://{}:{}@{}:{port}/{}",
        percent_encode(&login.user),
        percent_encode(&login.password),
        url_host(host),
        percent_encode(&login.database),
    );
    vec![
        var("RABBITMQ_URL", url, true),
        var("RABBITMQ_HOST", host.to_string(), false),
        var("RABBITMQ_PORT", port.to_string(), false),
        var("RABBITMQ_USER", login.user.clone(), false),
        var("RABBITMQ_PASSWORD", login.password.clone(), true),
        var("RABBITMQ_VHOST", login.database.clone(), false),
    ]
}

/// An IPv6 literal needs brackets in a URL; anything else is percent-encoded like the rest.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        percent_encode(host)
    }
}

/// Encodes everything but RFC 3986 unreserved characters, byte by byte (UTF-8 included).
pub use miren_sys::percent_encode;

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(user: &str, password: &str, database: &str) -> PostgresConnection {
        PostgresConnection {
            host: "10.10.0.196".into(),
            port: 5432,
            user: user.into(),
            password: password.into(),
            database: database.into(),
        }
    }

    /// Strict decoder for the test: `%XX` only, result must be UTF-8.
    fn percent_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_values_read_like_the_docs() {
        let c = conn("myapp", "pass", "myapp");
        assert_eq!(
            c.database_url(),
            "postgres://myapp:pass@10.10.0.196:5432/myapp"
        );
        let vars = postgres_env(&c, "10.10.0.200", Pooling::None);
        let keys: Vec<_> = vars.iter().map(|v| v.key).collect();
        assert_eq!(keys, POSTGRES_ENV_KEYS);
        let get = |k: &str| vars.iter().find(|v| v.key == k).unwrap();
        assert_eq!(get("PGHOST").value, "10.10.0.196");
        assert_eq!(get("PGPORT").value, "5432");
        assert_eq!(get("PGUSER").value, "myapp");
        assert_eq!(get("PGPASSWORD").value, "pass");
        assert_eq!(get("PGDATABASE").value, "myapp");
        for v in &vars {
            let should = v.key.starts_with("DATABASE_URL") || v.key == "PGPASSWORD";
            assert_eq!(v.sensitive, should, "{}", v.key);
        }
    }

    #[test]
    fn pooling_picks_what_database_url_points_at() {
        let c = conn("myapp", "pass", "myapp");
        let url = |pooling| {
            let vars = postgres_env(&c, "10.10.0.200", pooling);
            let get = |k: &str| vars.iter().find(|v| v.key == k).unwrap().value.clone();
            // The other two URLs and PG* never change with the mode.
            assert_eq!(
                get("DATABASE_URL_SESSION"),
                "postgres://myapp:pass@10.10.0.200:6433/myapp"
            );
            assert_eq!(
                get("DATABASE_URL_DIRECT"),
                "postgres://myapp:pass@10.10.0.196:5432/myapp"
            );
            assert_eq!(get("PGHOST"), "10.10.0.196");
            assert_eq!(get("PGPORT"), "5432");
            get("DATABASE_URL")
        };
        assert_eq!(
            url(Pooling::Transaction),
            "postgres://myapp:pass@10.10.0.200:6432/myapp"
        );
        assert_eq!(
            url(Pooling::Session),
            "postgres://myapp:pass@10.10.0.200:6433/myapp"
        );
        assert_eq!(
            url(Pooling::None),
            "postgres://myapp:pass@10.10.0.196:5432/myapp"
        );
    }

    #[test]
    fn nasty_values_round_trip_through_a_url_parser() {
        let nasty = [
            "p@ss:w/rd?#[]",
            "%41%",
            "with space+plus",
            "quote\"'`\\",
            "ünïcødé 🐘",
            ":@/",
            "a&b=c;d",
            "",
        ];
        for s in nasty {
            let c = conn(s, s, s);
            let text = c.database_url();
            let url = url::Url::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(url.scheme(), "postgres");
            assert_eq!(url.host_str(), Some("10.10.0.196"), "{text}");
            assert_eq!(url.port(), Some(5432), "{text}");
            assert_eq!(percent_decode(url.username()), s, "{text}");
            assert_eq!(percent_decode(url.password().unwrap_or("")), s, "{text}");
            assert_eq!(percent_decode(&url.path()[1..]), s, "{text}");
            assert_eq!(url.query(), None, "{text}");
            assert_eq!(url.fragment(), None, "{text}");
        }
    }

    #[test]
    fn ipv6_hosts_are_bracketed_in_the_url_only() {
        let mut c = conn("u", "p", "d");
        c.host = "fd00::1".into();
        let url = url::Url::parse(&c.database_url()).unwrap();
        assert_eq!(url.host_str(), Some("[fd00::1]"));
        assert_eq!(url.port(), Some(5432));
        let pghost = c
            .env_vars()
            .into_iter()
            .find(|v| v.key == "PGHOST")
            .unwrap();
        assert_eq!(pghost.value, "fd00::1");
    }

    #[test]
    fn masking_hides_secrets_everywhere() {
        let c = conn("myapp", "s3cr3tpassword", "myapp");
        for v in c.env_vars() {
            let shown = format!("{v} {v:?}");
            assert!(!shown.contains("s3cr3tpassword"), "{shown}");
            if !v.sensitive {
                assert_eq!(v.display_value(), v.value);
            }
        }
        assert_eq!(
            c.redacted_url(),
            "postgres://myapp:********@10.10.0.196:5432/myapp"
        );
        assert!(!format!("{c:?}").contains("s3cr3tpassword"));
    }

    #[test]
    fn generated_credentials_make_a_working_url() {
        let creds = Credentials::generate("My-App").unwrap();
        let c = PostgresConnection::new("db.internal", 5432, &creds);
        let url = url::Url::parse(&c.database_url()).unwrap();
        assert_eq!(url.username(), creds.user);
        assert_eq!(url.password(), Some(creds.password.as_str()));
        assert_eq!(&url.path()[1..], creds.database);
    }

    #[test]
    fn every_kind_injects_exactly_its_catalogue_keys() {
        let login = Credentials {
            user: "shop_1".into(),
            password: "p@ss/w:rd".into(),
            database: "miren".into(),
        };
        let keys = |vars: Vec<EnvVar>| vars.iter().map(|v| v.key).collect::<Vec<_>>();
        let host = "10.10.0.7";
        assert_eq!(
            keys(postgres_env(
                &PostgresConnection::new(host, 5432, &login),
                "10.10.0.8",
                Pooling::Transaction
            )),
            AddonKind::Postgresql.env_keys()
        );
        assert_eq!(
            keys(mysql_env(host, 3306, &login)),
            AddonKind::Mysql.env_keys()
        );
        assert_eq!(
            keys(valkey_env(host, 6379, &login.password)),
            AddonKind::Valkey.env_keys()
        );
        assert_eq!(
            keys(memcache_env(host, 11211)),
            AddonKind::Memcache.env_keys()
        );
        assert_eq!(
            keys(rabbitmq_env(host, 5672, &login)),
            AddonKind::Rabbitmq.env_keys()
        );
    }

    #[test]
    fn urls_read_like_the_catalogue() {
        let login = Credentials {
            user: "shop_1".into(),
            password: "p@ss".into(),
            database: "shopdb".into(),
        };
        let value = |vars: &[EnvVar], key: &str| {
            vars.iter()
                .find(|v| v.key == key)
                .map(|v| v.value.clone())
                .unwrap()
        };
        let mysql = mysql_env("10.0.0.2", 3306, &login);
        assert_eq!(
            value(&mysql, "DATABASE_URL"),
            "mysql://shop_1:p%40ss@10.0.0.2:3306/shopdb"
        );
        let valkey = valkey_env("10.0.0.3", 6379, "p@ss");
        assert_eq!(
            value(&valkey, "VALKEY_URL"),
            "redis://:p%40ss@10.0.0.3:6379"
        );
        assert_eq!(value(&valkey, "REDIS_URL"), value(&valkey, "VALKEY_URL"));
        assert!(valkey
            .iter()
            .filter(|v| v.key.ends_with("_URL") || v.key.ends_with("_PASSWORD"))
            .all(|v| v.sensitive));
        let memcache = memcache_env("10.0.0.4", 11211);
        assert_eq!(
            value(&memcache, "MEMCACHE_URL"),
            "memcache://10.0.0.4:11211"
        );
        let rabbit = rabbitmq_env(
            "10.0.0.5",
            5672,
            &Credentials {
                database: "miren".into(),
                ..login
            },
        );
        assert_eq!(
            value(&rabbit, "RABBITMQ_URL"),
            "amqp://shop_1:p%40ss@10.0.0.5:5672/miren"
        );
    }

    #[test]
    fn addons_setting_the_same_variable_clash() {
        use AddonKind::*;
        let clash = env_clash(&[Postgresql, Valkey, Mysql]).unwrap();
        assert_eq!((clash.first, clash.second), (Postgresql, Mysql));
        assert_eq!(clash.keys, ["DATABASE_URL"]);
        let msg = clash.to_string();
        assert!(
            msg.contains("miren-postgresql") && msg.contains("miren-mysql"),
            "{msg}"
        );
        assert_eq!(env_clash(&[Postgresql, Valkey, Memcache, Rabbitmq]), None);
        assert_eq!(clashing_kinds(Mysql).collect::<Vec<_>>(), [Postgresql]);
        assert_eq!(clashing_kinds(Valkey).count(), 0);
        let all: usize = [Postgresql, Valkey, Memcache, Rabbitmq]
            .iter()
            .map(|k| k.env_keys().len())
            .sum();
        assert_eq!(all, 25);
    }
}
