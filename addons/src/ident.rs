//! Names: the app/service/disk rule, and the PostgreSQL and MySQL user and database names
//! derived from app names.

/// Longest app, service or disk name (a DNS label, so it can become a hostname or a path).
pub const MAX_NAME_LEN: usize = miren_sys::name::MAX_NAME_LEN;

/// PostgreSQL truncates identifiers past NAMEDATALEN - 1 bytes; we never produce longer ones.
pub const MAX_PG_IDENT_LEN: usize = 63;

/// Names an app's role or database may never take: the server's own roles and databases, and
/// the names PostgreSQL reserves or treats specially for roles.
pub const RESERVED_PG_NAMES: &[&str] = &[
    "postgres",
    "template0",
    "template1",
    "public",
    "none",
    "all",
    "user",
    "current_user",
    "current_role",
    "session_user",
    "miren",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty; use letters, digits and hyphens, e.g. `web`")]
    Empty,
    #[error("`{0}` is {1} characters long; the limit is 63")]
    TooLong(String, usize),
    #[error("`{0}` must start with a letter or digit")]
    BadStart(String),
    #[error("`{name}` contains `{ch}`; only letters, digits and hyphens are allowed")]
    BadChar { name: String, ch: char },
    #[error("`{0}` is reserved: names that are `addon` or start with `addon-` belong to the agent's addons; pick another name")]
    Reserved(String),
}

/// Apps, services and disks: letters, digits and hyphens, 1-63 characters, starting with a
/// letter or digit. The same rule as the agent's disk names, so any of them can name a disk.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    use miren_sys::name::NameViolation;
    miren_sys::name::check_name(name).map_err(|violation| match violation {
        NameViolation::Empty => NameError::Empty,
        NameViolation::TooLong(len) => NameError::TooLong(name.to_string(), len),
        NameViolation::BadChar(ch) => NameError::BadChar {
            name: name.to_string(),
            ch,
        },
        NameViolation::BadStart => NameError::BadStart(name.to_string()),
    })
}

/// Names the agent gives its own things (addon servers' sandboxes, disks and network apps are
/// `addon-<kind>[-<app>]`; shared servers `addon-<kind>`): no app, sandbox or disk a user names
/// may take one, so an app can never stand in for an addon. Compared ignoring case, like disk
/// names.
pub const RESERVED_NAME_PREFIX: &str = "addon";

/// Whether `name` is in the system's name space: `addon` itself or anything starting with
/// `addon-`, in any case.
pub fn is_reserved_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == RESERVED_NAME_PREFIX
        || lower
            .strip_prefix(RESERVED_NAME_PREFIX)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// [`validate_name`] for a name a user chooses (an app, a sandbox, a disk): also refuses the
/// names the agent keeps for itself.
pub fn validate_user_name(name: &str) -> Result<(), NameError> {
    validate_name(name)?;
    if is_reserved_name(name) {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
}

/// The role and database an app gets on a PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PgIdentifiers {
    pub role: String,
    pub database: String,
}

impl PgIdentifiers {
    /// Derives both names from the app name; total for any input.
    ///
    /// A name that is already a clean identifier (`^[a-z][a-z0-9]*$`, at most 63 bytes, not
    /// reserved) is used as is, so `myapp` gets `myapp`. Anything else is normalized (lowercase,
    /// other characters to `_`, `app_` before a leading non-letter or `pg_`, truncated) and gets `_` plus 8
    /// hex digits of a hash of the *original* name. Clean names contain no `_` and suffixed
    /// ones always do, so the two sets cannot meet; two different originals that normalize
    /// alike (`My-App`, `my-app`) differ in their hash. The suffix only prevents accidents:
    /// provisioning must still refuse a role that exists and was not made for this app.
    pub fn for_app(app_name: &str) -> PgIdentifiers {
        let ident = pg_identifier(app_name);
        PgIdentifiers {
            role: ident.clone(),
            database: ident,
        }
    }
}

fn pg_identifier(app_name: &str) -> String {
    PG_RULE.derive(app_name)
}

/// True for a valid identifier as this crate produces them; used by tests and callers that
/// want to check a stored name before putting it in SQL.
pub fn is_valid_pg_identifier(ident: &str) -> bool {
    PG_RULE.is_valid(ident)
}

/// The login names credential rotations alternate between for the app whose base login (its
/// PostgreSQL owner role, its MySQL user) is `base` (`n` is 1 or 2): `<base>_r1`, `<base>_r2`,
/// within `max_len`. Such names cannot be any app's base name (those are clean names without
/// `_`, or end in `_` and eight hex digits), so they never collide with another app's logins.
pub fn rotation_login(base: &str, n: u8, max_len: usize) -> String {
    let suffix = format!("_r{n}");
    if base.len() + suffix.len() <= max_len {
        return format!("{base}{suffix}");
    }
    // Too long: a shorter stem plus a hash of the whole base name keeps it unique.
    let hash = format!("_{:08x}", miren_sys::fnv::fnv1a64(base.as_bytes()) as u32);
    let keep = max_len.saturating_sub(hash.len() + suffix.len());
    // Base names are ASCII (`[a-z0-9_]`), so byte slicing stays on a char boundary.
    format!("{}{hash}{suffix}", &base[..keep.min(base.len())])
}

/// The login a rotation moves `base`'s app to from `current`.
pub fn next_rotation_login(base: &str, current: &str, max_len: usize) -> String {
    if current == rotation_login(base, 1, max_len) {
        rotation_login(base, 2, max_len)
    } else {
        rotation_login(base, 1, max_len)
    }
}

/// Whether `login` is one of `base`'s rotation logins.
pub fn is_rotation_login(base: &str, login: &str, max_len: usize) -> bool {
    login == rotation_login(base, 1, max_len) || login == rotation_login(base, 2, max_len)
}

/// How a server's user and database names are derived from app names: the same algorithm
/// for every server, within its length limit and around its reserved names.
struct IdentRule {
    max_len: usize,
    reserved: &'static [&'static str],
    /// A prefix the server keeps for itself (PostgreSQL's `pg_`).
    reserved_prefix: Option<&'static str>,
}

const PG_RULE: IdentRule = IdentRule {
    max_len: MAX_PG_IDENT_LEN,
    reserved: RESERVED_PG_NAMES,
    reserved_prefix: Some("pg_"),
};

const MYSQL_RULE: IdentRule = IdentRule {
    max_len: MAX_MYSQL_USER_LEN,
    reserved: RESERVED_MYSQL_NAMES,
    reserved_prefix: None,
};

impl IdentRule {
    /// `^[a-z][a-z0-9]*$`, within the limit and not reserved: used as is.
    fn is_clean(&self, name: &str) -> bool {
        name.len() <= self.max_len
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && !self.reserved.contains(&name)
    }

    fn derive(&self, app_name: &str) -> String {
        if self.is_clean(app_name) {
            return app_name.to_string();
        }
        let mut base: String = app_name
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if !base.starts_with(|c: char| c.is_ascii_lowercase())
            || self.reserved_prefix.is_some_and(|p| base.starts_with(p))
        {
            base.insert_str(0, "app_");
        }
        let suffix = format!(
            "_{:08x}",
            miren_sys::fnv::fnv1a64(app_name.as_bytes()) as u32
        );
        // Every char is ASCII here, so byte truncation stays on a char boundary.
        base.truncate(self.max_len - suffix.len());
        base.push_str(&suffix);
        base
    }

    fn is_valid(&self, ident: &str) -> bool {
        !ident.is_empty()
            && ident.len() <= self.max_len
            && ident.starts_with(|c: char| c.is_ascii_lowercase())
            && ident
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !self.reserved.contains(&ident)
            && !self.reserved_prefix.is_some_and(|p| ident.starts_with(p))
    }
}

/// MySQL caps user names at 32 characters (MariaDB at 80): we stay within MySQL's.
pub const MAX_MYSQL_USER_LEN: usize = 32;

/// Names an app's MySQL user or database may never take: the server's own accounts, schemas
/// and roles, and the agent's.
pub const RESERVED_MYSQL_NAMES: &[&str] = &[
    "root",
    "mysql",
    "information_schema",
    "performance_schema",
    "sys",
    "test",
    "public",
    "none",
    "current_user",
    "current_role",
    "miren",
];

/// The user and database an app gets on a MySQL (or MariaDB) server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MysqlIdentifiers {
    pub user: String,
    pub database: String,
}

impl MysqlIdentifiers {
    /// Derives both names from the app name; total for any input, at most 32 characters.
    ///
    /// The rule of [`PgIdentifiers::for_app`] within MySQL's user name limit: a clean name
    /// (`^[a-z][a-z0-9]*$`, at most 32 characters, not reserved) is used as is; anything else
    /// is normalized (lowercase, other characters to `_`, `app_` before a leading non-letter)
    /// and truncated, and gets `_` plus 8 hex digits of FNV-1a of the *original* name. Clean
    /// names have no `_` and suffixed ones do, so the two never meet.
    pub fn for_app(app_name: &str) -> MysqlIdentifiers {
        let ident = mysql_identifier(app_name);
        MysqlIdentifiers {
            user: ident.clone(),
            database: ident,
        }
    }
}

fn mysql_identifier(app_name: &str) -> String {
    MYSQL_RULE.derive(app_name)
}

/// True for a MySQL user or database name as this crate produces them.
pub fn is_valid_mysql_identifier(ident: &str) -> bool {
    MYSQL_RULE.is_valid(ident)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Role and database names live in PostgreSQL data directories: they never change.
    #[test]
    fn pg_identifiers_are_pinned() {
        assert_eq!(pg_identifier("myapp"), "myapp");
        assert_eq!(
            pg_identifier(&"a-very-long-application-name-".repeat(3)),
            "a_very_long_application_name_a_very_long_application_n_8efa5a82"
        );
    }
    use std::collections::HashSet;

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "A1", "my-app", "0day", &"x".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(64);
        for bad in ["", "-a", "a_b", "a.b", "a b", "é", "a\n", "a/b", &long] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let err = validate_name("a_b").unwrap_err().to_string();
        assert!(
            err.contains("`_`") && err.contains("letters, digits and hyphens"),
            "{err}"
        );
    }

    #[test]
    fn the_addon_name_space_is_reserved() {
        for reserved in ["addon", "addon-pg", "addon-pg-victim", "ADDON-pg", "Addon"] {
            assert!(is_reserved_name(reserved), "{reserved}");
            let err = validate_user_name(reserved).unwrap_err();
            assert_eq!(err, NameError::Reserved(reserved.to_string()));
            assert!(err.to_string().contains("reserved"), "{err}");
            // Still a valid name for what the agent makes itself.
            assert_eq!(validate_name(reserved), Ok(()));
        }
        for free in ["addons", "addonpg", "my-addon", "add-on", "pg-addon-x", "a"] {
            assert!(!is_reserved_name(free), "{free}");
            assert_eq!(validate_user_name(free), Ok(()), "{free}");
        }
        // The ordinary rule still applies first.
        assert!(matches!(
            validate_user_name("a_b"),
            Err(NameError::BadChar { .. })
        ));
    }

    #[test]
    fn clean_names_are_kept() {
        let ids = PgIdentifiers::for_app("myapp");
        assert_eq!(ids.role, "myapp");
        assert_eq!(ids.database, "myapp");
        assert_eq!(PgIdentifiers::for_app("app2").role, "app2");
    }

    #[test]
    fn other_names_are_normalized_with_a_suffix() {
        let id = PgIdentifiers::for_app("my-app").role;
        assert!(
            id.starts_with("my_app_") && id.len() == "my_app_".len() + 8,
            "{id}"
        );
        let id = PgIdentifiers::for_app("0day").role;
        assert!(id.starts_with("app_0day_"), "{id}");
        // Stable across releases: stored names must keep matching.
        assert_eq!(PgIdentifiers::for_app("my-app").role, "my_app_a85c37a9");
    }

    #[test]
    fn reserved_names_never_come_out() {
        for name in RESERVED_PG_NAMES {
            let id = PgIdentifiers::for_app(name).role;
            assert_ne!(&id, name);
            assert!(is_valid_pg_identifier(&id), "{id}");
        }
        for name in ["pg_foo", "pg-foo", "Postgres", "TEMPLATE1"] {
            let id = PgIdentifiers::for_app(name).role;
            assert!(is_valid_pg_identifier(&id), "{name} -> {id}");
        }
    }

    #[test]
    fn nasty_names_give_valid_distinct_identifiers() {
        let long_a = format!("{}a", "x".repeat(70));
        let long_b = format!("{}b", "x".repeat(70));
        let nasty = [
            "",
            "-",
            "My-App",
            "my-app",
            "MY-APP",
            "my_app",
            "my app",
            "x'; DROP ROLE postgres; --",
            "\"quoted\"",
            "日本語",
            "é",
            "9",
            &long_a,
            &long_b,
            "a\0b",
        ];
        let mut seen = HashSet::new();
        for name in nasty {
            let id = PgIdentifiers::for_app(name).role;
            assert!(is_valid_pg_identifier(&id), "{name:?} -> {id}");
            assert!(seen.insert(id.clone()), "{name:?} collided on {id}");
        }
    }

    /// MySQL users and databases live in data directories: their names never change.
    #[test]
    fn mysql_identifiers_are_pinned_and_short() {
        let ids = MysqlIdentifiers::for_app("myapp");
        assert_eq!(
            (ids.user.as_str(), ids.database.as_str()),
            ("myapp", "myapp")
        );
        assert_eq!(MysqlIdentifiers::for_app("my-app").user, "my_app_a85c37a9");
        let long = MysqlIdentifiers::for_app(&"a-very-long-application-name-".repeat(3)).user;
        assert_eq!(long.len(), MAX_MYSQL_USER_LEN, "{long}");
        assert!(long.starts_with("a_very_long_appli"), "{long}");
        // A clean name over 32 characters is hashed too, never cut to someone else's name.
        let clean_long = "x".repeat(40);
        let id = MysqlIdentifiers::for_app(&clean_long).user;
        assert!(id.len() <= MAX_MYSQL_USER_LEN && id.contains('_'), "{id}");
        assert_eq!(
            MysqlIdentifiers::for_app(&"x".repeat(32)).user,
            "x".repeat(32)
        );
    }

    #[test]
    fn mysql_identifiers_are_valid_and_distinct() {
        let long_a = format!("{}a", "x".repeat(40));
        let long_b = format!("{}b", "x".repeat(40));
        let mut seen = HashSet::new();
        for name in [
            "",
            "-",
            "My-App",
            "my-app",
            "MY-APP",
            "my_app",
            "my app",
            "root",
            "mysql",
            "sys",
            "Root",
            "x'; DROP USER root; --",
            "`tick`",
            "日本語",
            "9",
            "0day",
            &long_a,
            &long_b,
            "a\0b",
            "information_schema",
        ] {
            let id = MysqlIdentifiers::for_app(name).user;
            assert!(is_valid_mysql_identifier(&id), "{name:?} -> {id}");
            assert!(seen.insert(id.clone()), "{name:?} collided on {id}");
        }
    }

    #[test]
    fn rotation_logins_alternate_fit_and_never_meet_app_names() {
        for max in [MAX_PG_IDENT_LEN, MAX_MYSQL_USER_LEN] {
            assert_eq!(rotation_login("shop", 1, max), "shop_r1");
            assert_eq!(next_rotation_login("shop", "shop", max), "shop_r1");
            assert_eq!(next_rotation_login("shop", "shop_r1", max), "shop_r2");
            assert_eq!(next_rotation_login("shop", "shop_r2", max), "shop_r1");
            let long = "a".repeat(max);
            let (one, two) = (rotation_login(&long, 1, max), rotation_login(&long, 2, max));
            assert!(one.len() <= max && two.len() <= max && one != two);
            assert!(is_rotation_login(&long, &one, max) && is_rotation_login(&long, &two, max));
            let other = format!("{}b", "a".repeat(max - 1));
            assert_ne!(rotation_login(&other, 1, max), one);
        }
        for app in ["shop", "my-app", "x_r1"] {
            let pg = PgIdentifiers::for_app(app).role;
            let login = rotation_login(&pg, 2, MAX_PG_IDENT_LEN);
            assert!(is_valid_pg_identifier(&login));
            assert_ne!(PgIdentifiers::for_app(&login).role, login);
            let my = MysqlIdentifiers::for_app(app).user;
            let login = rotation_login(&my, 1, MAX_MYSQL_USER_LEN);
            assert!(is_valid_mysql_identifier(&login));
            assert_ne!(MysqlIdentifiers::for_app(&login).user, login);
        }
    }
}
