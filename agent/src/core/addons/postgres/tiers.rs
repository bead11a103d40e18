//! PostgreSQL tiers (`miren_addons::tier`): what a dedicated server of a tier is given, the
//! settings a running server takes with a reload, and a shared tenant's connection limit.

use miren_addons::tier::needs_restart;
use miren_addons::{Tier, Variant};
use tokio_postgres::Client;

use super::{describe, ident, literal, logins};
use crate::core::addons::provider::ServerSize;

/// A dedicated server's size. The shared server is sized for the node (its defaults), and
/// its tenants are limited instead ([`limit_tenant`]).
pub(super) fn server_size(variant: Variant, tier: Tier) -> Option<ServerSize> {
    if variant == Variant::Shared {
        return None;
    }
    let limits = tier.limits();
    let (restart, live): (Vec<_>, Vec<_>) = limits
        .pg_settings()
        .into_iter()
        .partition(|(name, _)| needs_restart(name));
    Some(ServerSize {
        memory_bytes: limits.memory_bytes,
        cpus: limits.cpus,
        disk_size_gb: limits.storage_gb,
        // The image's contract: options alone mean `postgres <options>`; `-c` settings on
        // the command line win over postgresql.conf and postgresql.auto.conf.
        args: restart
            .into_iter()
            .flat_map(|(name, value)| ["-c".to_string(), format!("{name}={value}")])
            .collect(),
        live_settings: live,
    })
}

/// `ALTER SYSTEM` each setting (kept in postgresql.auto.conf on the data disk), then reload.
/// Needs a superuser: a dedicated server's app login (it acts as its superuser owner).
pub(super) async fn apply_settings(
    client: &Client,
    settings: &[(&'static str, String)],
) -> Result<(), String> {
    for (name, value) in settings {
        // ALTER SYSTEM may not run in a transaction block: one statement per query.
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET {} = {}",
                ident(name),
                literal(value)
            ))
            .await
            .map_err(|e| format!("setting {name}: {}", describe(&e)))?;
    }
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(|e| format!("reloading the configuration: {}", describe(&e)))
}

/// `CONNECTION LIMIT` on every role of the tenant (the owner and its rotation logins).
pub(super) async fn limit_tenant(
    admin: &Client,
    login: &str,
    database: &str,
    connections: u32,
) -> Result<(), String> {
    let roles = logins::tenant_roles(admin, login, database)
        .await
        .map_err(|e| describe(&e))?;
    let existing: Vec<String> = admin
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)",
            &[&roles],
        )
        .await
        .map_err(|e| describe(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for role in existing {
        admin
            .batch_execute(&format!(
                "ALTER ROLE {} CONNECTION LIMIT {connections}",
                ident(&role)
            ))
            .await
            .map_err(|e| format!("limiting `{role}`'s connections: {}", describe(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_server_is_sized_by_its_tier() {
        let size = server_size(Variant::Small, Tier::Medium).unwrap();
        assert_eq!(size.memory_bytes, 2 << 30);
        assert_eq!(size.disk_size_gb, 10);
        assert_eq!(
            size.args,
            ["-c", "shared_buffers=512MB", "-c", "max_connections=125"]
        );
        let live: Vec<&str> = size.live_settings.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            live,
            ["effective_cache_size", "maintenance_work_mem", "work_mem"]
        );
        assert!(server_size(Variant::Shared, Tier::Large).is_none());
    }
}
