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

/// The login roles of `owner` that rotations alternate between (`n` is 1 or 2). Names that
/// end in `_r1`/`_r2` cannot be an app's owner name (those are clean names without `_`, or end
/// in `_` and eight hex digits), so they never collide with another app's roles.
pub fn login_name(owner: &str, n: u8) -> String {
    let suffix = format!("_r{n}");
    if owner.len() + suffix.len() <= MAX_PG_IDENT_LEN {
        return format!("{owner}{suffix}");
    }
    // Too long: a shorter stem plus a hash of the whole owner name keeps it unique.
    let hash = format!("_{:08x}", miren_sys::fnv::fnv1a64(owner.as_bytes()) as u32);
    let keep = MAX_PG_IDENT_LEN - hash.len() - suffix.len();
    // Owner names are ASCII (`[a-z0-9_]`), so byte slicing stays on a char boundary.
    format!("{}{hash}{suffix}", &owner[..keep.min(owner.len())])
}

/// The login a rotation moves `owner`'s app to from `current_user`.
pub fn next_login_name(owner: &str, current_user: &str) -> String {
    if current_user == login_name(owner, 1) {
        login_name(owner, 2)
    } else {
        login_name(owner, 1)
    }
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
    login == login_name(owner, 1) || login == login_name(owner, 2)
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
    fn logins_alternate_and_stay_within_the_limit() {
        assert_eq!(login_name("shop", 1), "shop_r1");
        assert_eq!(next_login_name("shop", "shop"), "shop_r1");
        assert_eq!(next_login_name("shop", "shop_r1"), "shop_r2");
        assert_eq!(next_login_name("shop", "shop_r2"), "shop_r1");
        let long = "a".repeat(MAX_PG_IDENT_LEN);
        let (one, two) = (login_name(&long, 1), login_name(&long, 2));
        assert!(one.len() <= MAX_PG_IDENT_LEN && two.len() <= MAX_PG_IDENT_LEN);
        assert_ne!(one, two);
        assert!(is_login_of(&long, &one) && is_login_of(&long, &two));
        // Two long owners that share the stem still get different logins.
        let other = format!("{}b", "a".repeat(MAX_PG_IDENT_LEN - 1));
        assert_ne!(login_name(&long, 1), login_name(&other, 1));
        // A login is never a name an app's owner could have.
        for owner in ["shop", "my_app_0badcafe"] {
            let login = login_name(owner, 2);
            assert!(miren_addons::ident::is_valid_pg_identifier(&login));
            assert_ne!(miren_addons::PgIdentifiers::for_app(&login).role, login);
        }
    }
}
