//! An app's logins on a PostgreSQL server, for credential rotation. The app's data belongs to
//! one role, the *owner* (the role its database was made for, named after the app). At first
//! the owner is also the login; a rotation adds a second login role that owns nothing, is a
//! member of the owner and acts as it (`ALTER ROLE .. SET role`: what it creates belongs to
//! the owner), switches the app to it, and then retires the previous login (`NOLOGIN`, no
//! password). Rotations alternate between two login names, `<owner>_r1` and `<owner>_r2`, so
//! a tenant never has more than three roles, all derived from the owner's name.

use miren_addons::ident::MAX_PG_IDENT_LEN;
use tokio_postgres::Client;

use super::{ident, literal, retry_concurrent};

/// The login roles of `owner` that rotations alternate between (`n` is 1 or 2).
pub fn login_name(owner: &str, n: u8) -> String {
    miren_addons::ident::rotation_login(owner, n, MAX_PG_IDENT_LEN)
}

/// The login a rotation moves `owner`'s app to from `current_user`.
pub fn next_login_name(owner: &str, current_user: &str) -> String {
    miren_addons::ident::next_rotation_login(owner, current_user, MAX_PG_IDENT_LEN)
}

/// The role that owns `database` (the app's data), if the database exists.
async fn database_owner(
    admin: &Client,
    database: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(admin
        .query_opt(
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Whether `login` is one of `owner`'s rotation logins.
fn is_login_of(owner: &str, login: &str) -> bool {
    miren_addons::ident::is_rotation_login(owner, login, MAX_PG_IDENT_LEN)
}

/// The owner of the data `login` reaches on `database`: the database's owner while it exists;
/// after a drop cut short, the role `login` is a member of and is a rotation login of.
pub async fn owner_of(
    admin: &Client,
    login: &str,
    database: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    if let Some(owner) = database_owner(admin, database).await? {
        return Ok(Some(owner));
    }
    let groups = admin
        .query(
            "SELECT g.rolname::text FROM pg_auth_members m
             JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member
             WHERE u.rolname = $1",
            &[&login],
        )
        .await?;
    Ok(groups
        .iter()
        .map(|row| row.get::<_, String>(0))
        .find(|group| is_login_of(group, login)))
}

/// Every role of the tenant whose current login is `login`: the owner and its rotation logins
/// (only those: a role someone else made a member of the owner is not the tenant's).
pub async fn tenant_roles(
    admin: &Client,
    login: &str,
    database: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut roles = vec![login.to_string()];
    if let Some(owner) = owner_of(admin, login, database).await? {
        for role in [login_name(&owner, 1), login_name(&owner, 2), owner] {
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
    }
    Ok(roles)
}

/// Makes `next` (with `password`) a login that acts as the owner of `database`, beside the
/// current one. Run as a superuser (the shared server's administrator, or a dedicated
/// server's app login, which acts as its superuser owner).
pub async fn add_login(
    admin: &Client,
    database: &str,
    next: &str,
    password: &str,
) -> Result<(), AddLoginError> {
    let owner = database_owner(admin, database)
        .await?
        .ok_or_else(|| AddLoginError::NoDatabase(database.to_string()))?;
    if !is_login_of(&owner, next) {
        return Err(AddLoginError::NotALogin {
            login: next.to_string(),
            owner,
        });
    }
    retry_concurrent(|| async {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&next])
            .await?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        admin
            .batch_execute(&format!(
                "{verb} ROLE {} LOGIN PASSWORD {}",
                ident(next),
                literal(password)
            ))
            .await?;
        admin
            .batch_execute(&format!(
                "GRANT {owner} TO {next}; ALTER ROLE {next} SET role TO {owner_value}",
                owner = ident(&owner),
                next = ident(next),
                owner_value = literal(&owner),
            ))
            .await?;
        // A tier's `CONNECTION LIMIT` (shared servers) holds for every login of the tenant.
        let limit: i32 = admin
            .query_one(
                "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
                &[&owner],
            )
            .await?
            .get(0);
        admin
            .batch_execute(&format!(
                "ALTER ROLE {} CONNECTION LIMIT {limit}",
                ident(next)
            ))
            .await
    })
    .await?;
    Ok(())
}

/// Stops `retired` from logging in (no password, `NOLOGIN`) and ends its sessions. The owner
/// keeps owning the data when it is the one retired (the first rotation).
pub async fn retire_login(admin: &Client, retired: &str) -> Result<(), tokio_postgres::Error> {
    retry_concurrent(|| async {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&retired])
            .await?
            .is_some();
        if exists {
            admin
                .batch_execute(&format!(
                    "ALTER ROLE {} NOLOGIN PASSWORD NULL",
                    ident(retired)
                ))
                .await?;
        }
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE usename = $1 AND pid <> pg_backend_pid()",
                &[&retired],
            )
            .await?;
        Ok(())
    })
    .await
}

/// The stem of the administrators a shared server's administrator rotates between
/// (`miren_admin_r1`, `miren_admin_r2`); `miren` names are reserved for apps.
const ADMIN_STEM: &str = "miren_admin";

/// The administrator a rotation moves the shared server to from `current`.
pub fn next_admin_name(current: &str) -> String {
    miren_addons::ident::next_rotation_login(ADMIN_STEM, current, MAX_PG_IDENT_LEN)
}

/// Makes `admin` (with `password`) a superuser that can log in.
pub async fn add_admin(
    session: &Client,
    admin: &str,
    password: &str,
) -> Result<(), tokio_postgres::Error> {
    retry_concurrent(|| async {
        let exists = session
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&admin])
            .await?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        session
            .batch_execute(&format!(
                "{verb} ROLE {} SUPERUSER LOGIN PASSWORD {}",
                ident(admin),
                literal(password)
            ))
            .await
    })
    .await
}

/// Stops `admin` from logging in over the network (no password: the server admits only
/// password logins from outside its sandbox) and ends its sessions. The image's bootstrap
/// superuser keeps its local login (trust, inside the sandbox only); a rotation administrator
/// also loses `LOGIN`.
pub async fn retire_admin(session: &Client, admin: &str) -> Result<(), tokio_postgres::Error> {
    retry_concurrent(|| async {
        let bootstrap: Option<bool> = session
            .query_opt(
                "SELECT oid = 10 FROM pg_roles WHERE rolname = $1",
                &[&admin],
            )
            .await?
            .map(|row| row.get(0));
        match bootstrap {
            Some(true) => {
                session
                    .batch_execute(&format!("ALTER ROLE {} PASSWORD NULL", ident(admin)))
                    .await?
            }
            Some(false) => {
                session
                    .batch_execute(&format!(
                        "ALTER ROLE {} NOLOGIN PASSWORD NULL",
                        ident(admin)
                    ))
                    .await?
            }
            None => {}
        }
        session
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE usename = $1 AND pid <> pg_backend_pid()",
                &[&admin],
            )
            .await?;
        Ok(())
    })
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum AddLoginError {
    #[error("database `{0}` does not exist")]
    NoDatabase(String),
    #[error("`{login}` is not a rotation login of `{owner}`")]
    NotALogin { login: String, owner: String },
    #[error("{}", super::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_alternate_between_two_names_of_the_owner() {
        assert_eq!(login_name("shop", 1), "shop_r1");
        assert_eq!(next_login_name("shop", "shop"), "shop_r1");
        assert_eq!(next_login_name("shop", "shop_r1"), "shop_r2");
        assert_eq!(next_login_name("shop", "shop_r2"), "shop_r1");
        assert!(is_login_of("shop", "shop_r2") && !is_login_of("shop", "shop"));
    }
}
