//! Talking to the PostgreSQL servers the agent runs: readiness, and the role and database each
//! app gets on the shared server. Every statement is safe to repeat.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

pub const PORT: u16 = 5432;

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
async fn retry_concurrent<F, Fut>(mut step: F) -> Result<(), tokio_postgres::Error>
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
                ident(role)
            ))
            .await
            .or_else(ignore_missing_role)?;
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE (datname = $1 OR usename = $2) AND pid <> pg_backend_pid()",
                &[&database, &role],
            )
            .await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {}", ident(database)))
            .await?;
    }
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE usename = $1 AND pid <> pg_backend_pid()",
            &[&role],
        )
        .await?;
    admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {}", ident(role)))
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
    let rows = admin
        .query(
            "SELECT 1 FROM pg_roles WHERE rolname = $1
             UNION ALL SELECT 1 FROM pg_database WHERE datname = $2",
            &[&role, &database],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// An error's text without tokio-postgres' generic prefix, with the server's message if any.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_characters() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
