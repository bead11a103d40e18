//! PostgreSQL's pooler: a PgBouncer sandbox beside each server (`miren-addons/pgbouncer`,
//! built by `scripts/images`; its env contract is in docs/addons.md). Clients log in as
//! themselves: PgBouncer looks their SCRAM secret up with `auth_query`, through a
//! `SECURITY DEFINER` function the agent keeps in the server, so there is no user list to
//! reload and a changed password works at once.

use std::net::Ipv4Addr;
use std::time::Duration;

use miren_addons::{Credentials, Tier, Variant, POOLER_SESSION_PORT, POOLER_TRANSACTION_PORT};
use tokio_postgres::{Client, NoTls};

use super::host::SandboxCommand;
use super::postgres::{describe, PORT};
use super::provider::{DbClientLimit, SidecarSpec};

/// The pooler image (Debian's PgBouncer 1.24; pulled through the agent's mirror like any).
pub const IMAGE: &str = "miren-addons/pgbouncer:1.24";
/// The role PgBouncer runs `auth_query` as. App roles never have a `_` unless it is followed
/// by 8 hex digits (`PgIdentifiers`), so no app can be called this.
pub const AUTH_USER: &str = "miren_pooler";
/// Where the lookup function lives, in the database the agent's session uses.
const SCHEMA: &str = "miren_pooler";
/// Server connections per (database, user) in transaction mode: 20 serve 1000 clients, and
/// with the session pooler's 40 stay below PostgreSQL's default `max_connections` (100).
pub const TRANSACTION_POOL_SIZE: u32 = 20;
pub const SESSION_POOL_SIZE: u32 = 40;
// Both pools together stay below the server's default max_connections (100).
const _: () = assert!(TRANSACTION_POOL_SIZE + SESSION_POOL_SIZE < 100);

/// Clients per pooler, of all its apps together; every one needs a file descriptor (the
/// sandbox has the agent's hard NOFILE limit). Each app's own limit is its database's
/// `max_db_client_connections` ([`limits_command`]).
pub const MAX_CLIENT_CONN: u32 = miren_addons::MAX_CLIENT_CONNECTIONS;
/// The image's entrypoint; `limits` as its argument rewrites the limits and reloads.
const ENTRYPOINT: &str = "/usr/local/bin/docker-entrypoint.sh";
/// Prepared statements PgBouncer tracks per server connection, so drivers that prepare
/// (Bun's `SQL`, asyncpg, Prisma) work in transaction mode.
pub const MAX_PREPARED_STATEMENTS: u32 = 200;

/// The sandbox beside a server at `server`, whose lookup function `prepare` put in
/// `admin.database`, admitting `limits` clients to each app's database.
/// A dedicated server's pooler takes its tier's pools; the shared server's serves every app
/// (its tenants' server connections are limited on the server, by `CONNECTION LIMIT`).
pub fn spec(
    server: Ipv4Addr,
    admin: &Credentials,
    secret: &str,
    variant: Variant,
    tier: Tier,
    limits: &[DbClientLimit],
) -> SidecarSpec {
    let (transaction_pool, session_pool) = match variant {
        Variant::Shared => (TRANSACTION_POOL_SIZE, SESSION_POOL_SIZE),
        Variant::Small => {
            let limits = tier.limits();
            (limits.transaction_pool, limits.session_pool)
        }
    };
    SidecarSpec {
        name_suffix: "pool",
        image: IMAGE.to_string(),
        command: Vec::new(),
        env: vec![
            format!("PGBOUNCER_SERVER_HOST={server}"),
            format!("PGBOUNCER_SERVER_PORT={PORT}"),
            format!("PGBOUNCER_AUTH_USER={AUTH_USER}"),
            format!("PGBOUNCER_AUTH_PASSWORD={secret}"),
            format!("PGBOUNCER_AUTH_DBNAME={}", admin.database),
            format!("PGBOUNCER_AUTH_QUERY=SELECT uname, phash FROM {SCHEMA}.user_lookup($1)"),
            format!("PGBOUNCER_TRANSACTION_PORT={POOLER_TRANSACTION_PORT}"),
            format!("PGBOUNCER_SESSION_PORT={POOLER_SESSION_PORT}"),
            format!("PGBOUNCER_DEFAULT_POOL_SIZE={transaction_pool}"),
            format!("PGBOUNCER_SESSION_POOL_SIZE={session_pool}"),
            format!("PGBOUNCER_MAX_CLIENT_CONN={MAX_CLIENT_CONN}"),
            format!("PGBOUNCER_MAX_PREPARED_STATEMENTS={MAX_PREPARED_STATEMENTS}"),
            limits_var(limits),
        ],
    }
}

/// `PGBOUNCER_DB_LIMITS=db=N,db=N` (the image's contract). Database names are the agent's
/// identifiers (`[a-z0-9_]`).
fn limits_var(limits: &[DbClientLimit]) -> String {
    let entries: Vec<String> = limits
        .iter()
        .map(|l| format!("{}={}", l.database, l.clients))
        .collect();
    format!("PGBOUNCER_DB_LIMITS={}", entries.join(","))
}

/// Run in the pooler's sandbox: replaces every per-database client limit with `limits` and
/// reloads both poolers (SIGHUP: no client is dropped; one over a lowered limit stays until it
/// leaves).
pub fn limits_command(server: Ipv4Addr, limits: &[DbClientLimit]) -> SandboxCommand {
    SandboxCommand {
        argv: vec![ENTRYPOINT.to_string(), "limits".to_string()],
        env: vec![
            format!("PGBOUNCER_SERVER_HOST={server}"),
            format!("PGBOUNCER_SERVER_PORT={PORT}"),
            limits_var(limits),
        ],
    }
}

/// Makes (or updates) the pooler's role with `secret`, and the lookup function it calls, in
/// the session's database. On a shared server superusers are never served through the
/// pooler; on a small one the app's own role is the superuser, so they are. The lookup returns a
/// set: a role that may not log in (a login retired by a rotation: `pg_shadow` lists only roles
/// that can) gives no row, which PgBouncer answers as a failed login, where a one-record
/// function's row of NULLs reads to it as "bouncer config error". Safe to repeat.
pub async fn prepare(admin: &Client, variant: Variant, secret: &str) -> Result<(), String> {
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(|e| describe(&e))?
        .get(0);
    let superusers = if variant == Variant::Shared {
        "AND NOT usesuper"
    } else {
        ""
    };
    let sql = format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{AUTH_USER}') THEN
             CREATE ROLE {AUTH_USER} LOGIN;
           END IF;
         END $$;
         ALTER ROLE {AUTH_USER} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {secret};
         CREATE SCHEMA IF NOT EXISTS {SCHEMA};
         REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
         DROP FUNCTION IF EXISTS {SCHEMA}.user_lookup(text);
         CREATE FUNCTION {SCHEMA}.user_lookup(i_username text)
           RETURNS TABLE (uname text, phash text) LANGUAGE sql SECURITY DEFINER
           SET search_path = pg_catalog AS
           $f$ SELECT usename::text, passwd::text FROM pg_catalog.pg_shadow
               WHERE usename = i_username AND usename <> '{AUTH_USER}' {superusers} $f$;
         REVOKE ALL ON FUNCTION {SCHEMA}.user_lookup(text) FROM PUBLIC;
         GRANT USAGE ON SCHEMA {SCHEMA} TO {AUTH_USER};
         GRANT EXECUTE ON FUNCTION {SCHEMA}.user_lookup(text) TO {AUTH_USER};
         GRANT CONNECT ON DATABASE {database} TO {AUTH_USER};",
        secret = literal(secret),
        database = ident(&database),
    );
    super::postgres::retry_concurrent(|| admin.batch_execute(&sql))
        .await
        .map_err(|e| format!("preparing the pooler's login: {}", describe(&e)))
}

/// `SELECT 1` through both poolers at `host` as `login`: the pooler's readiness check (it
/// also proves the auth query works).
pub async fn ready(host: Ipv4Addr, login: &Credentials) -> Result<(), String> {
    for port in [POOLER_TRANSACTION_PORT, POOLER_SESSION_PORT] {
        let (client, connection) = tokio_postgres::Config::new()
            .host(host.to_string())
            .port(port)
            .user(&login.user)
            .password(&login.password)
            .dbname(&login.database)
            .application_name("miren-agent")
            .connect_timeout(Duration::from_secs(2))
            .connect(NoTls)
            .await
            .map_err(|e| format!("the pooler on port {port}: {}", describe(&e)))?;
        let conn = tokio::spawn(connection);
        let result = client.simple_query("SELECT 1").await;
        drop(client);
        let _ = conn.await;
        result.map_err(|e| format!("the pooler on port {port}: {}", describe(&e)))?;
    }
    Ok(())
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooler_follows_its_image_contract() {
        let admin = Credentials {
            user: "postgres".into(),
            password: "x".into(),
            database: "postgres".into(),
        };
        let spec = spec(
            Ipv4Addr::new(10, 1, 2, 3),
            &admin,
            "s3cret",
            Variant::Shared,
            Tier::Small,
            &[
                DbClientLimit {
                    database: "app_a".into(),
                    clients: 100,
                },
                DbClientLimit {
                    database: "app_b".into(),
                    clients: 500,
                },
            ],
        );
        let get = |k: &str| {
            spec.env
                .iter()
                .find_map(|e| e.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_string()
        };
        assert_eq!(spec.image, "miren-addons/pgbouncer:1.24");
        assert_eq!(get("PGBOUNCER_SERVER_HOST"), "10.1.2.3");
        assert_eq!(get("PGBOUNCER_AUTH_USER"), "miren_pooler");
        assert_eq!(get("PGBOUNCER_AUTH_PASSWORD"), "s3cret");
        assert_eq!(get("PGBOUNCER_AUTH_DBNAME"), "postgres");
        assert_eq!(get("PGBOUNCER_TRANSACTION_PORT"), "6432");
        assert_eq!(get("PGBOUNCER_SESSION_PORT"), "6433");
        assert_eq!(get("PGBOUNCER_MAX_PREPARED_STATEMENTS"), "200");
        assert!(get("PGBOUNCER_MAX_CLIENT_CONN").parse::<u32>().unwrap() >= 1000);
        assert_eq!(get("PGBOUNCER_DB_LIMITS"), "app_a=100,app_b=500");
        assert!(spec.command.is_empty());
        // A dedicated server's pooler takes its tier's pools.
        let small = super::spec(
            Ipv4Addr::new(10, 1, 2, 3),
            &admin,
            "s",
            Variant::Small,
            Tier::Medium,
            &[],
        );
        assert!(small
            .env
            .contains(&"PGBOUNCER_DEFAULT_POOL_SIZE=40".to_string()));
        assert!(small.env.contains(&"PGBOUNCER_DB_LIMITS=".to_string()));
    }

    #[test]
    fn limits_are_replaced_by_the_entrypoint_in_the_running_sandbox() {
        let cmd = limits_command(
            Ipv4Addr::new(10, 1, 2, 3),
            &[DbClientLimit {
                database: "app_a".into(),
                clients: 7,
            }],
        );
        assert_eq!(cmd.argv, [ENTRYPOINT, "limits"]);
        assert!(cmd.env.contains(&"PGBOUNCER_DB_LIMITS=app_a=7".to_string()));
        assert!(cmd
            .env
            .contains(&"PGBOUNCER_SERVER_HOST=10.1.2.3".to_string()));
    }
}
