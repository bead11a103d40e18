//! Environment variables an addon instance injects into its app.

use std::fmt;

use crate::credentials::Credentials;

/// What a sensitive value shows as. Fixed length, so it leaks nothing about the secret.
pub const MASK: &str = "********";

/// Names PostgreSQL injects, in the order they are produced.
pub const POSTGRES_ENV_KEYS: &[&str] = &[
    "DATABASE_URL",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
];

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
        let vars = c.env_vars();
        let keys: Vec<_> = vars.iter().map(|v| v.key).collect();
        assert_eq!(keys, POSTGRES_ENV_KEYS);
        let get = |k: &str| vars.iter().find(|v| v.key == k).unwrap();
        assert_eq!(get("PGHOST").value, "10.10.0.196");
        assert_eq!(get("PGPORT").value, "5432");
        assert_eq!(get("PGUSER").value, "myapp");
        assert_eq!(get("PGPASSWORD").value, "pass");
        assert_eq!(get("PGDATABASE").value, "myapp");
        for v in &vars {
            let should = matches!(v.key, "DATABASE_URL" | "PGPASSWORD");
            assert_eq!(v.sensitive, should, "{}", v.key);
        }
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
}
