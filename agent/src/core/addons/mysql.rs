//! MySQL (and MariaDB): the official `mysql` and `mariadb` images' shared contract, readiness,
//! and the database and user each app gets on the shared server. Every statement is safe to
//! repeat.

use std::net::Ipv4Addr;
use std::time::Duration;

use miren_addons::ident::MAX_MYSQL_USER_LEN;
use miren_addons::{AddonKind, Credentials, EnvVar, MysqlIdentifiers, Variant};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use tokio::sync::Mutex;

use super::provider::{AddonProvider, BoxFuture, DataDisk, ServerConnection, ServerSpec};
use crate::core::error::Error;

pub const PORT: u16 = 3306;

/// Where both official images keep their data; the disk is mounted here.
const DATA_MOUNT: &str = "/var/lib/mysql";
/// The data directory, a subdirectory: MySQL's `--initialize` refuses a non-empty one, and a
/// fresh ext4 root has `lost+found`. Both official entrypoints take it from the server's
/// options.
const DATA_DIR_OPTION: &str = "--datadir=/var/lib/mysql/data";
/// The data directory relative to the disk's root.
const DATA_SUBDIR: &str = "data";
/// The administrator of a shared server.
const ADMIN_USER: &str = "root";
/// The stem of the administrators it rotates between (`miren_admin_r1`, `miren_admin_r2`).
const ADMIN_STEM: &str = "miren_admin";
/// How long one login attempt may take before it counts as not ready.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// MySQL's "Unknown thread id": a session that ended before we could kill it.
const ER_NO_SUCH_THREAD: u16 = 1094;

/// The `miren-mysql` addon.
pub struct Mysql;

impl AddonProvider for Mysql {
    fn kind(&self) -> AddonKind {
        AddonKind::Mysql
    }

    fn display_name(&self) -> &'static str {
        "MySQL"
    }

    fn readiness_check(&self) -> &'static str {
        "`SELECT 1`"
    }

    fn server_base_name(&self) -> &'static str {
        "addon-mysql"
    }

    fn app_credentials(&self, app: &str) -> Result<Credentials, Error> {
        let ids = MysqlIdentifiers::for_app(app);
        Ok(Credentials {
            user: ids.user,
            password: password()?,
            database: ids.database,
        })
    }

    fn admin_credentials(&self) -> Result<Credentials, Error> {
        Ok(self.admin_login(ADMIN_USER, &password()?))
    }

    fn admin_login(&self, user: &str, password: &str) -> Credentials {
        // No database: the administrator works across all of them.
        Credentials {
            user: user.to_string(),
            password: password.to_string(),
            database: String::new(),
        }
    }

    fn server(&self, variant: Variant, login: &Credentials) -> ServerSpec {
        // The `MYSQL_*` names: the official mysql image reads only those, the official
        // mariadb image reads them as twins of its `MARIADB_*` ones.
        let mut env = Vec::new();
        if variant == Variant::Shared {
            // The agent logs in as root from the host; the network admits members only.
            env.push(format!("MYSQL_ROOT_PASSWORD={}", login.password));
        } else {
            // The app never needs root: a random password, and only inside the sandbox.
            env.push("MYSQL_RANDOM_ROOT_PASSWORD=yes".into());
            env.push("MYSQL_ROOT_HOST=localhost".into());
            env.push(format!("MYSQL_DATABASE={}", login.database));
            env.push(format!("MYSQL_USER={}", login.user));
            env.push(format!("MYSQL_PASSWORD={}", login.password));
        }
        // Time zone tables cost seconds at init and nothing here needs them.
        env.push("MYSQL_INITDB_SKIP_TZINFO=1".into());
        ServerSpec {
            command: vec![DATA_DIR_OPTION.to_string()],
            env,
            port: PORT,
            data: Some(DataDisk {
                mount_path: DATA_MOUNT,
                size_gb: variant.disk_size_gb(),
                discard_if_never_ready: Some(DATA_SUBDIR),
            }),
        }
    }

    fn env_vars(&self, host: Ipv4Addr, login: &Credentials) -> Vec<EnvVar> {
        miren_addons::mysql_env(&host.to_string(), PORT, login)
    }

    fn next_admin(&self, current: &str) -> Result<Option<Credentials>, Error> {
        let user =
            miren_addons::ident::next_rotation_login(ADMIN_STEM, current, MAX_MYSQL_USER_LEN);
        Ok(Some(self.admin_login(&user, &password()?)))
    }

    /// Shared servers only: on a `small` one root's password is random and stays inside the
    /// sandbox, and the app's user may not make users.
    fn next_login(
        &self,
        variant: Variant,
        _app: &str,
        current: &Credentials,
    ) -> Result<Option<Credentials>, Error> {
        if variant != Variant::Shared {
            return Ok(None);
        }
        // The app's first user is named like its database (`MysqlIdentifiers`).
        Ok(Some(Credentials {
            user: miren_addons::ident::next_rotation_login(
                &current.database,
                &current.user,
                MAX_MYSQL_USER_LEN,
            ),
            password: password()?,
            database: current.database.clone(),
        }))
    }

    fn connect<'a>(
        &'a self,
        host: Ipv4Addr,
        login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>> {
        Box::pin(async move {
            let conn = select_one(host, login).await?;
            Ok(Box::new(Session(Mutex::new(conn))) as Box<dyn ServerConnection>)
        })
    }
}

fn password() -> Result<String, Error> {
    miren_addons::generate_password()
        .map_err(|e| Error::internal(format!("generating a password: {e}")))
}

/// Logs in to `host` as `login` (on its database, if it has one) and runs `SELECT 1`: the
/// readiness check, with the credentials the app will use.
pub async fn select_one(host: Ipv4Addr, login: &Credentials) -> Result<Conn, String> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(host.to_string())
        .tcp_port(PORT)
        .user(Some(login.user.as_str()))
        .pass(Some(login.password.as_str()))
        .db_name((!login.database.is_empty()).then_some(login.database.as_str()))
        .prefer_socket(false)
        .stmt_cache_size(0);
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts))
        .await
        .map_err(|_| format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| describe(&e))?;
    conn.query_drop("SELECT 1")
        .await
        .map_err(|e| describe(&e))?;
    Ok(conn)
}

/// A logged-in session with a MySQL server (queries need the connection exclusively).
struct Session(Mutex<Conn>);

impl ServerConnection for Session {
    fn ensure_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            retry_transient(&mut conn, tenant, Step::Ensure)
                .await
                .map_err(|e| format!("creating the user and database: {}", describe(&e)))
        })
    }

    fn drop_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            let dropped = retry_transient(&mut conn, tenant, Step::Drop).await;
            dropped.map_err(|e| {
                format!(
                    "dropping database `{}` and user `{}`: {}",
                    tenant.database,
                    tenant.user,
                    describe(&e)
                )
            })
        })
    }

    fn tenant_exists<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            tenant_exists(&mut conn, tenant)
                .await
                .map_err(|e| describe(&e))
        })
    }

    fn add_login<'a>(
        &'a self,
        _current: &'a Credentials,
        next: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            retry_transient(&mut conn, next, Step::AddLogin)
                .await
                .map_err(|e| format!("adding user `{}`: {}", next.user, describe(&e)))
        })
    }

    fn add_admin<'a>(&'a self, next: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            add_admin(&mut conn, next)
                .await
                .map_err(|e| format!("adding administrator `{}`: {}", next.user, describe(&e)))
        })
    }

    fn retire_admin<'a>(&'a self, retired: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            retire_login(&mut conn, retired)
                .await
                .map_err(|e| format!("retiring administrator `{retired}`: {}", describe(&e)))
        })
    }

    fn retire_login<'a>(
        &'a self,
        retired: &'a str,
        current: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.0.lock().await;
            let old = Credentials {
                user: retired.to_string(),
                password: String::new(),
                database: current.database.clone(),
            };
            retry_transient(&mut conn, &old, Step::Retire)
                .await
                .map_err(|e| format!("retiring user `{retired}`: {}", describe(&e)))
        })
    }
}

/// MySQL's "Lock wait timeout exceeded" and "Deadlock found": another session (say, of an
/// agent that was killed mid-statement, which the server finishes) held what we need.
const TRANSIENT: [u16; 2] = [1205, 1213];
/// How long a tenant step is retried while it collides with another session.
const TRANSIENT_RETRY: Duration = Duration::from_secs(30);

/// A tenant step, each idempotent.
#[derive(Clone, Copy)]
enum Step {
    Ensure,
    Drop,
    AddLogin,
    Retire,
}

/// Runs a tenant step again while it collides with another session.
async fn retry_transient(
    conn: &mut Conn,
    tenant: &Credentials,
    step: Step,
) -> Result<(), mysql_async::Error> {
    let deadline = tokio::time::Instant::now() + TRANSIENT_RETRY;
    loop {
        let result = match step {
            Step::Ensure => ensure_tenant(conn, tenant).await,
            Step::Drop => drop_tenant(conn, tenant).await,
            Step::AddLogin => add_login(conn, tenant).await,
            Step::Retire => retire_login(conn, &tenant.user).await,
        };
        match result {
            Err(mysql_async::Error::Server(e))
                if TRANSIENT.contains(&e.code) && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(error = %e, "another session holds the same tenant; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// `` `name` ``, for identifiers (ours are `[a-z0-9_]`, but quote anyway).
fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string literal, under either setting of `NO_BACKSLASH_ESCAPES` for our values.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A database name in `GRANT ... ON db.*`, where `_` and `%` are wildcards: `my_app` would
/// also match another app's `myxapp`.
fn grant_db(name: &str) -> String {
    ident(
        &name
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%"),
    )
}

/// `'user'@'%'`.
fn account(user: &str) -> String {
    format!("{}@'%'", literal(user))
}

/// Makes the tenant's database and `'user'@'%'` (with the recorded password, even if an
/// earlier run set another) with every privilege on that database and nothing else.
async fn ensure_tenant(conn: &mut Conn, tenant: &Credentials) -> Result<(), mysql_async::Error> {
    let user = account(&tenant.user);
    let password = literal(&tenant.password);
    conn.query_drop(format!(
        "CREATE DATABASE IF NOT EXISTS {}",
        ident(&tenant.database)
    ))
    .await?;
    conn.query_drop(format!(
        "CREATE USER IF NOT EXISTS {user} IDENTIFIED BY {password}"
    ))
    .await?;
    conn.query_drop(format!("ALTER USER {user} IDENTIFIED BY {password}"))
        .await?;
    conn.query_drop(format!(
        "GRANT ALL PRIVILEGES ON {}.* TO {user}",
        grant_db(&tenant.database)
    ))
    .await?;
    Ok(())
}

/// Every user of the tenant whose database is `database`: the first one (named like the
/// database) and its two rotation logins.
fn tenant_users(database: &str) -> [String; 3] {
    [
        database.to_string(),
        miren_addons::ident::rotation_login(database, 1, MAX_MYSQL_USER_LEN),
        miren_addons::ident::rotation_login(database, 2, MAX_MYSQL_USER_LEN),
    ]
}

/// Makes `login` a user (again) with every privilege on its database, beside the current
/// one (credential rotation). MySQL users own nothing, so both reach the same data.
async fn add_login(conn: &mut Conn, login: &Credentials) -> Result<(), mysql_async::Error> {
    let grant = format!("ALL PRIVILEGES ON {}.*", grant_db(&login.database));
    ensure_unlocked_user(conn, login, &grant, "").await
}

/// Makes `admin` a user (again) with every privilege on every database, able to grant them.
async fn add_admin(conn: &mut Conn, admin: &Credentials) -> Result<(), mysql_async::Error> {
    ensure_unlocked_user(conn, admin, "ALL PRIVILEGES ON *.*", " WITH GRANT OPTION").await
}

/// `'user'@'%'` with `login`'s password, unlocked, granted `privileges` (`ALL PRIVILEGES ON
/// db.*`) with `option` appended: made, or set again if an earlier run (or rotation) left it.
async fn ensure_unlocked_user(
    conn: &mut Conn,
    login: &Credentials,
    privileges: &str,
    option: &str,
) -> Result<(), mysql_async::Error> {
    let user = account(&login.user);
    let password = literal(&login.password);
    conn.query_drop(format!(
        "CREATE USER IF NOT EXISTS {user} IDENTIFIED BY {password}"
    ))
    .await?;
    conn.query_drop(format!(
        "ALTER USER {user} IDENTIFIED BY {password} ACCOUNT UNLOCK"
    ))
    .await?;
    conn.query_drop(format!("GRANT {privileges} TO {user}{option}"))
        .await?;
    Ok(())
}

/// Locks `'user'@'%'` (kept, not dropped: views and routines it defined keep their definer)
/// and ends its sessions. Accounts of other hosts (root's `localhost`, inside the sandbox) stay.
async fn retire_login(conn: &mut Conn, user: &str) -> Result<(), mysql_async::Error> {
    let exists: Option<u64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = '%'",
            (user,),
        )
        .await?;
    if exists.unwrap_or(0) > 0 {
        conn.query_drop(format!("ALTER USER {} ACCOUNT LOCK", account(user)))
            .await?;
    }
    kill_sessions_of(conn, &[user.to_string()], None).await
}

/// Ends the sessions of `users` (and in `database`, if given), except our own.
async fn kill_sessions_of(
    conn: &mut Conn,
    users: &[String],
    database: Option<&str>,
) -> Result<(), mysql_async::Error> {
    let listed: Vec<(u64, String, Option<String>)> = conn
        .query(
            "SELECT ID, USER, DB FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()",
        )
        .await?;
    for (id, user, db) in listed {
        let theirs = users.contains(&user) || (database.is_some() && db.as_deref() == database);
        if !theirs {
            continue;
        }
        match conn.query_drop(format!("KILL CONNECTION {id}")).await {
            Err(mysql_async::Error::Server(e)) if e.code == ER_NO_SUCH_THREAD => {}
            other => other?,
        }
    }
    Ok(())
}

/// Locks the tenant out, ends its sessions, then drops its database: a session in the
/// database would hold `DROP DATABASE` up.
async fn drop_tenant(conn: &mut Conn, tenant: &Credentials) -> Result<(), mysql_async::Error> {
    let mut users = tenant_users(&tenant.database).to_vec();
    if !users.contains(&tenant.user) {
        users.push(tenant.user.clone());
    }
    let accounts: Vec<String> = users.iter().map(|u| account(u)).collect();
    conn.query_drop(format!("DROP USER IF EXISTS {}", accounts.join(", ")))
        .await?;
    kill_sessions_of(conn, &users, Some(&tenant.database)).await?;
    conn.query_drop(format!(
        "DROP DATABASE IF EXISTS {}",
        ident(&tenant.database)
    ))
    .await?;
    Ok(())
}

/// Whether the tenant's user or database still exists.
async fn tenant_exists(conn: &mut Conn, tenant: &Credentials) -> Result<bool, mysql_async::Error> {
    let [first, r1, r2] = tenant_users(&tenant.database);
    let found: Option<u64> = conn
        .exec_first(
            "SELECT (SELECT COUNT(*) FROM mysql.user WHERE User IN (?, ?, ?, ?)) + \
             (SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?)",
            (
                tenant.user.as_str(),
                first.as_str(),
                r1.as_str(),
                r2.as_str(),
                tenant.database.as_str(),
            ),
        )
        .await?;
    Ok(found.unwrap_or(0) > 0)
}

/// An error's text, with the server's message if any.
pub fn describe(err: &mysql_async::Error) -> String {
    match err {
        mysql_async::Error::Server(e) => format!("ERROR {} ({}): {}", e.code, e.state, e.message),
        other => crate::util::error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dedicated_server_follows_the_image_contract() {
        let login = Credentials {
            user: "shop".into(),
            password: "pw".into(),
            database: "shopdb".into(),
        };
        let small = Mysql.server(Variant::Small, &login);
        assert_eq!(
            small.env,
            [
                "MYSQL_RANDOM_ROOT_PASSWORD=yes",
                "MYSQL_ROOT_HOST=localhost",
                "MYSQL_DATABASE=shopdb",
                "MYSQL_USER=shop",
                "MYSQL_PASSWORD=pw",
                "MYSQL_INITDB_SKIP_TZINFO=1",
            ]
        );
        assert_eq!(small.command, ["--datadir=/var/lib/mysql/data"]);
        assert_eq!(small.port, 3306);
        // Servers' names are on disk and in the database: they never change.
        assert_eq!(Mysql.server_base_name(), "addon-mysql");
        let data = small.data.unwrap();
        assert_eq!(data.size_gb, 1);
        // The discarded directory is the data directory, seen from the disk's root.
        assert_eq!(
            format!(
                "--datadir={}/{}",
                data.mount_path,
                data.discard_if_never_ready.unwrap()
            ),
            DATA_DIR_OPTION
        );
        let admin = Mysql.admin_login("root", "secret");
        assert_eq!(admin.database, "");
        let shared = Mysql.server(Variant::Shared, &admin);
        assert_eq!(
            shared.env,
            ["MYSQL_ROOT_PASSWORD=secret", "MYSQL_INITDB_SKIP_TZINFO=1"]
        );
        assert_eq!(shared.data.unwrap().size_gb, 10);
    }

    #[test]
    fn app_logins_fit_mysql() {
        let login = Mysql.app_credentials(&"long-app-name-".repeat(4)).unwrap();
        assert!(login.user.len() <= 32, "{}", login.user);
        assert_eq!(login.user, login.database);
        assert_eq!(login.password.len(), 32);
    }

    #[test]
    fn quoting_and_grant_wildcards() {
        assert_eq!(ident("a`b"), "`a``b`");
        assert_eq!(literal("it's\\"), "'it''s\\\\'");
        assert_eq!(account("shop"), "'shop'@'%'");
        // `my_app` in a GRANT would also match `myxapp`.
        assert_eq!(grant_db("my_app_1"), "`my\\_app\\_1`");
        assert_eq!(grant_db("a%"), "`a\\%`");
    }
}
