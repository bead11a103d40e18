//! PostgreSQL, the first addon provider: the official postgres image's contract, readiness,
//! and the role and database each app gets on the shared server. Every statement is safe to
//! repeat.

use std::net::Ipv4Addr;
use std::time::Duration;

use miren_addons::{AddonKind, Credentials, EnvVar, Pooling, PostgresConnection, Tier, Variant};
use tokio_postgres::{Client, NoTls};

use super::host::SandboxCommand;
use super::provider::{
    AddonProvider, BoxFuture, DataDisk, DbClientLimit, ServerConnection, ServerSize, ServerSpec,
    SidecarSpec,
};
use crate::core::error::Error;

pub mod archive;
mod base;
mod fork;
mod listing;
mod logins;
mod recovered;
pub mod restore;
mod shared_restore;
mod tiers;
mod wal_fetch;

pub const PORT: u16 = 5432;
/// The image's `postgres` user and group (as the official image).
const PG_UID: u32 = 999;

/// Where the official postgres image keeps its data; the disk is mounted here.
const PG_DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// A subdirectory, because initdb refuses a mount point's non-empty root (`lost+found`).
const PG_DATA_DIR: &str = "/var/lib/postgresql/data/pgdata";
/// `PG_DATA_DIR` relative to the disk's root.
const PG_DATA_SUBDIR: &str = "pgdata";
/// The image's superuser, and the maintenance database the agent logs in to as it.
const ADMIN_USER: &str = "postgres";
const ADMIN_DATABASE: &str = "postgres";

/// The `miren-postgresql` addon.
pub struct Postgres;

impl AddonProvider for Postgres {
    fn kind(&self) -> AddonKind {
        AddonKind::Postgresql
    }

    fn display_name(&self) -> &'static str {
        "PostgreSQL"
    }

    fn readiness_check(&self) -> &'static str {
        "`SELECT 1`"
    }

    fn server_base_name(&self) -> &'static str {
        "addon-pg"
    }

    fn app_credentials(&self, app: &str) -> Result<Credentials, Error> {
        Credentials::generate(app)
            .map_err(|e| Error::internal(format!("generating a password: {e}")))
    }

    fn admin_credentials(&self) -> Result<Credentials, Error> {
        let password = miren_addons::generate_password()
            .map_err(|e| Error::internal(format!("generating a password: {e}")))?;
        Ok(self.admin_login(ADMIN_USER, &password))
    }

    fn admin_login(&self, user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.to_string(),
            password: password.to_string(),
            database: ADMIN_DATABASE.to_string(),
        }
    }

    fn server(&self, variant: Variant, login: &Credentials) -> ServerSpec {
        let mut env = vec![
            format!("POSTGRES_USER={}", login.user),
            format!("POSTGRES_PASSWORD={}", login.password),
        ];
        if variant != Variant::Shared {
            env.push(format!("POSTGRES_DB={}", login.database));
        }
        env.push(format!("PGDATA={PG_DATA_DIR}"));
        env.push("POSTGRES_HOST_AUTH_METHOD=scram-sha-256".into());
        // Durability comes from one syncfs of the disk once the server is ready.
        env.push("POSTGRES_INITDB_ARGS=--no-sync".into());
        ServerSpec {
            command: archive::server_args(),
            env,
            port: PORT,
            data: Some(DataDisk {
                mount_path: PG_DATA_MOUNT,
                size_gb: variant.disk_size_gb(),
                discard_if_never_ready: Some(PG_DATA_SUBDIR),
            }),
        }
    }

    fn server_size(&self, variant: Variant, tier: Tier) -> Option<ServerSize> {
        tiers::server_size(variant, tier)
    }

    /// xfs: it grows while mounted here (ext4 needs CAP_SYS_RESOURCE for that, which this
    /// kind of host does not give), so a tier change or automatic growth needs no restart.
    fn data_filesystem(&self) -> crate::model::FilesystemKind {
        crate::model::FilesystemKind::Xfs
    }

    fn env_vars(&self, host: Ipv4Addr, login: &Credentials) -> Vec<EnvVar> {
        PostgresConnection::new(host.to_string(), PORT, login).env_vars()
    }

    fn next_admin(&self, current: &str) -> Result<Option<Credentials>, Error> {
        let password = miren_addons::generate_password()
            .map_err(|e| Error::internal(format!("generating a password: {e}")))?;
        Ok(Some(
            self.admin_login(&logins::next_admin_name(current), &password),
        ))
    }

    fn next_login(
        &self,
        _variant: Variant,
        app: &str,
        current: &Credentials,
    ) -> Result<Option<Credentials>, Error> {
        let owner = miren_addons::PgIdentifiers::for_app(app).role;
        let password = miren_addons::generate_password()
            .map_err(|e| Error::internal(format!("generating a password: {e}")))?;
        Ok(Some(Credentials {
            user: logins::next_login_name(&owner, &current.user),
            password,
            database: current.database.clone(),
        }))
    }

    fn connect<'a>(
        &'a self,
        host: Ipv4Addr,
        login: &'a Credentials,
    ) -> BoxFuture<'a, Result<Box<dyn ServerConnection>, String>> {
        Box::pin(async move {
            let client = select_one(&Login {
                host,
                user: &login.user,
                password: &login.password,
                database: &login.database,
            })
            .await
            .map_err(|e| describe(&e))?;
            Ok(Box::new(Session(client)) as Box<dyn ServerConnection>)
        })
    }

    // Pooling: a PgBouncer beside every server (`pooler.rs`).

    fn has_sidecar(&self) -> bool {
        true
    }

    fn sidecar(
        &self,
        variant: Variant,
        tier: Tier,
        server: Ipv4Addr,
        admin: &Credentials,
        secret: &str,
        limits: &[DbClientLimit],
    ) -> Option<SidecarSpec> {
        Some(super::pooler::spec(
            server, admin, secret, variant, tier, limits,
        ))
    }

    fn sidecar_limits(&self, server: Ipv4Addr, limits: &[DbClientLimit]) -> Option<SandboxCommand> {
        Some(super::pooler::limits_command(server, limits))
    }

    fn sidecar_ready<'a>(
        &'a self,
        host: Ipv4Addr,
        login: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(super::pooler::ready(host, login))
    }

    fn env_vars_with_sidecar(
        &self,
        server: Ipv4Addr,
        sidecar: Ipv4Addr,
        login: &Credentials,
        pooling: Pooling,
    ) -> Vec<EnvVar> {
        let direct = PostgresConnection::new(server.to_string(), PORT, login);
        miren_addons::postgres_env(&direct, &sidecar.to_string(), pooling)
    }
}

/// A logged-in session with a PostgreSQL server.
struct Session(Client);

impl ServerConnection for Session {
    fn prepare_shared(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            // Tenants get their own database; the maintenance ones are for the agent only.
            self.0
                .batch_execute(
                    "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC; \
                     REVOKE CONNECT ON DATABASE template1 FROM PUBLIC",
                )
                .await
                .map_err(|e| format!("securing the shared server: {}", describe(&e)))
        })
    }

    fn prepare_sidecar<'a>(
        &'a self,
        variant: Variant,
        secret: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(super::pooler::prepare(&self.0, variant, secret))
    }

    fn apply_settings<'a>(
        &'a self,
        settings: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(tiers::apply_settings(&self.0, settings))
    }

    fn limit_tenant<'a>(
        &'a self,
        tenant: &'a Credentials,
        connections: u32,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(tiers::limit_tenant(
            &self.0,
            &tenant.user,
            &tenant.database,
            connections,
        ))
    }

    fn ensure_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            ensure_tenant(&self.0, &tenant.user, &tenant.password, &tenant.database)
                .await
                .map_err(|e| format!("creating the role and database: {}", describe(&e)))
        })
    }

    fn drop_tenant<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            drop_tenant(&self.0, &tenant.user, &tenant.database)
                .await
                .map_err(|e| {
                    format!(
                        "dropping database `{}` and role `{}`: {}",
                        tenant.database,
                        tenant.user,
                        describe(&e)
                    )
                })
        })
    }

    fn tenant_exists<'a>(&'a self, tenant: &'a Credentials) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            tenant_exists(&self.0, &tenant.user, &tenant.database)
                .await
                .map_err(|e| describe(&e))
        })
    }

    fn add_login<'a>(
        &'a self,
        current: &'a Credentials,
        next: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            logins::add_login(&self.0, &current.database, &next.user, &next.password)
                .await
                .map_err(|e| format!("adding login `{}`: {e}", next.user))
        })
    }

    fn add_admin<'a>(&'a self, next: &'a Credentials) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            logins::add_admin(&self.0, &next.user, &next.password)
                .await
                .map_err(|e| format!("adding administrator `{}`: {}", next.user, describe(&e)))
        })
    }

    fn retire_admin<'a>(&'a self, retired: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            logins::retire_admin(&self.0, retired)
                .await
                .map_err(|e| format!("retiring administrator `{retired}`: {}", describe(&e)))
        })
    }

    fn retire_login<'a>(
        &'a self,
        retired: &'a str,
        _current: &'a Credentials,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            logins::retire_login(&self.0, retired)
                .await
                .map_err(|e| format!("retiring login `{retired}`: {}", describe(&e)))
        })
    }
}

/// Who to log in as.
pub struct Login<'a> {
    pub host: Ipv4Addr,
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
}

pub async fn connect(login: &Login<'_>) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(login.host.to_string())
        .port(PORT)
        .user(login.user)
        .password(login.password)
        .dbname(login.database)
        .application_name("miren-agent")
        .connect_timeout(Duration::from_secs(2))
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        // Ends when the client is dropped or the server goes away; either is fine here.
        let _ = connection.await;
    });
    Ok(client)
}

/// `SELECT 1` as `login`: the readiness check, with the credentials the app will use.
pub async fn select_one(login: &Login<'_>) -> Result<Client, tokio_postgres::Error> {
    let client = connect(login).await?;
    client.simple_query("SELECT 1").await?;
    Ok(client)
}

/// `"name"`, for identifiers (ours are `[a-z0-9_]`, but quote anyway).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// How long a tenant statement is retried while it collides with another session's.
const CONCURRENT_RETRY: Duration = Duration::from_secs(30);

/// Whether `err` is a collision with a concurrent session changing the same catalog rows:
/// typically the session of an agent that was killed mid-statement, which the server keeps
/// running until the statement ends (`tuple concurrently deleted` from a second `DROP
/// DATABASE`, a duplicate key from a second `CREATE ROLE`). The same statement succeeds, or
/// finds its work done, once that session is over.
fn is_concurrent_change(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(err.code(), Some(code) if [
        SqlState::INTERNAL_ERROR, // tuple concurrently updated / deleted
        SqlState::UNIQUE_VIOLATION,
        SqlState::DUPLICATE_OBJECT,
        SqlState::DUPLICATE_DATABASE,
        SqlState::OBJECT_IN_USE,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
    ]
    .contains(code))
}

/// Runs an idempotent tenant step again while it collides with a concurrent session.
pub(super) async fn retry_concurrent<F, Fut>(mut step: F) -> Result<(), tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    let deadline = tokio::time::Instant::now() + CONCURRENT_RETRY;
    let mut pause = Duration::from_millis(50);
    loop {
        match step().await {
            Err(e) if is_concurrent_change(&e) && tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %describe(&e), "a concurrent session changes the same tenant; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Makes `role` (able to log in with `password`) and `database` owned by it, reachable by no
/// other role. Converges from any partial earlier run, also one still running in a session of
/// a killed agent.
pub async fn ensure_tenant(
    admin: &Client,
    role: &str,
    password: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    retry_concurrent(|| ensure_tenant_once(admin, role, password, database)).await
}

async fn ensure_tenant_once(
    admin: &Client,
    role: &str,
    password: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    let role_exists = !admin
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_empty();
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    admin
        .batch_execute(&format!(
            "{verb} ROLE {} LOGIN PASSWORD {}",
            ident(role),
            literal(password)
        ))
        .await?;
    // After a credential rotation the login is not the owner: the data stays the owner's.
    if let Some(owner) = logins::owner_of(admin, role, database).await? {
        if owner != role {
            return admin
                .batch_execute(&format!(
                    "REVOKE ALL ON DATABASE {db} FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO {owner}",
                    db = ident(database),
                    owner = ident(&owner)
                ))
                .await;
        }
    }
    let db_exists = !admin
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await?
        .is_empty();
    if !db_exists {
        // CREATE DATABASE cannot run inside a transaction block: one statement on its own.
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} OWNER {}",
                ident(database),
                ident(role)
            ))
            .await?;
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} OWNER TO {role}; REVOKE ALL ON DATABASE {db} FROM PUBLIC; \
             GRANT CONNECT ON DATABASE {db} TO {role}",
            db = ident(database),
            role = ident(role)
        ))
        .await?;
    Ok(())
}

/// Ends every session of the tenant, then drops its database and role. Converges from any
/// partial earlier run, also one still running in a session of a killed agent.
pub async fn drop_tenant(
    admin: &Client,
    role: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    retry_concurrent(|| drop_tenant_once(admin, role, database)).await
}

async fn drop_tenant_once(
    admin: &Client,
    role: &str,
    database: &str,
) -> Result<(), tokio_postgres::Error> {
    // The owner and its rotation logins go with the login the row names, in one statement.
    let roles = logins::tenant_roles(admin, role, database).await?;
    let db_exists = !admin
        .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await?
        .is_empty();
    if db_exists {
        // No new sessions, then end the ones there are; DROP ... WITH (FORCE) also does this
        // on 13+, but custom images may be older.
        admin
            .batch_execute(&format!(
                "REVOKE ALL ON DATABASE {} FROM PUBLIC, {}",
                ident(database),
                roles
                    .iter()
                    .map(|r| ident(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .await
            .or_else(ignore_missing_role)?;
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE (datname = $1 OR usename = ANY($2)) AND pid <> pg_backend_pid()",
                &[&database, &roles],
            )
            .await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {}", ident(database)))
            .await?;
    }
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE usename = ANY($1) AND pid <> pg_backend_pid()",
            &[&roles],
        )
        .await?;
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {}",
            roles
                .iter()
                .map(|r| ident(r))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await?;
    Ok(())
}

fn ignore_missing_role(err: tokio_postgres::Error) -> Result<(), tokio_postgres::Error> {
    if err.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Whether the tenant's database or role still exists (tests and leftovers checks).
pub async fn tenant_exists(
    admin: &Client,
    role: &str,
    database: &str,
) -> Result<bool, tokio_postgres::Error> {
    let roles = logins::tenant_roles(admin, role, database).await?;
    let rows = admin
        .query(
            "SELECT 1 FROM pg_roles WHERE rolname = ANY($1)
             UNION ALL SELECT 1 FROM pg_database WHERE datname = $2",
            &[&roles, &database],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// An error's text without tokio-postgres' generic prefix, with the server's message if any.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => crate::util::error_chain(err),
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
        let small = Postgres.server(Variant::Small, &login);
        assert_eq!(
            small.env,
            [
                "POSTGRES_USER=shop",
                "POSTGRES_PASSWORD=pw",
                "POSTGRES_DB=shopdb",
                "PGDATA=/var/lib/postgresql/data/pgdata",
                "POSTGRES_HOST_AUTH_METHOD=scram-sha-256",
                "POSTGRES_INITDB_ARGS=--no-sync",
            ]
        );
        assert_eq!(small.port, 5432);
        // Servers' names are on disk and in the database: they never change.
        assert_eq!(Postgres.server_base_name(), "addon-pg");
        let data = small.data.unwrap();
        assert_eq!(data.mount_path, "/var/lib/postgresql/data");
        assert_eq!(data.size_gb, 1);
        // The discarded directory is PGDATA, seen from the disk's root.
        assert_eq!(
            format!(
                "{}/{}",
                data.mount_path,
                data.discard_if_never_ready.unwrap()
            ),
            PG_DATA_DIR
        );
        let shared = Postgres.server(Variant::Shared, &Postgres.admin_login("postgres", "x"));
        assert!(!shared.env.iter().any(|e| e.starts_with("POSTGRES_DB=")));
        assert_eq!(shared.data.unwrap().size_gb, 10);
    }

    #[test]
    fn quoting_doubles_the_quote_characters() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
