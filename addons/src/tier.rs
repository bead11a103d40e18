//! PostgreSQL size tiers: one table of limits ([`TIERS`]), and what a server of a tier is
//! sized to (memory, CPU, disk, PostgreSQL settings, the pooler's limits), all derived from it.

use std::fmt;

use crate::catalogue::{AddonKind, CatalogueError};

/// A PostgreSQL addon's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Tier {
    #[default]
    Small,
    Medium,
    Large,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What a tier gets. The seed's numbers (storage, client connections, memory); the rest is
/// ours (see docs/addons.md, "Tiers").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierLimits {
    pub tier: Tier,
    /// The data disk's size at creation (GiB).
    pub storage_gb: u64,
    /// Pooled client connections (PgBouncer `max_client_conn` per pooler on a dedicated
    /// server; the app's `max_user_client_conn` and its roles' `CONNECTION LIMIT` on shared).
    pub client_connections: u32,
    /// The dedicated server's memory limit (its sandbox's cgroup).
    pub memory_bytes: u64,
    /// The dedicated server's CPU quota, in proportion to its memory.
    pub cpus: f64,
    /// Server connections per (database, role) of the transaction and session poolers.
    pub transaction_pool: u32,
    pub session_pool: u32,
    /// How much the data disk grows when it passes [`GROW_AT_PERCENT`] used (GiB).
    pub growth_step_gb: u64,
    /// The size automatic growth stops at (GiB); a resize by hand may go further.
    pub growth_ceiling_gb: u64,
}

/// The one table of tiers.
pub const TIERS: [TierLimits; 3] = [
    TierLimits {
        tier: Tier::Small,
        storage_gb: 1,
        client_connections: 100,
        memory_bytes: 512 * MIB,
        cpus: 1.0,
        transaction_pool: 20,
        session_pool: 40,
        growth_step_gb: 1,
        growth_ceiling_gb: 10,
    },
    TierLimits {
        tier: Tier::Medium,
        storage_gb: 10,
        client_connections: 200,
        memory_bytes: 2 * GIB,
        cpus: 2.0,
        transaction_pool: 40,
        session_pool: 60,
        growth_step_gb: 5,
        growth_ceiling_gb: 100,
    },
    TierLimits {
        tier: Tier::Large,
        storage_gb: 100,
        client_connections: 500,
        memory_bytes: 8 * GIB,
        cpus: 4.0,
        transaction_pool: 80,
        session_pool: 120,
        growth_step_gb: 25,
        growth_ceiling_gb: 1000,
    },
];

/// The most pooled client connections an app may be given (`client_connections`): every
/// client is a file descriptor in its pooler, and this is each pooler's `max_client_conn`.
pub const MAX_CLIENT_CONNECTIONS: u32 = 2000;

/// A data disk is grown once more than this share of it is used.
pub const GROW_AT_PERCENT: u64 = 80;

/// Server connections kept beside the poolers' for direct clients (`DATABASE_URL_DIRECT`:
/// migrations, `LISTEN`), the agent and the pooler's `auth_query` logins.
pub const DIRECT_CONNECTIONS: u32 = 25;

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Small, Tier::Medium, Tier::Large];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Small => "small",
            Tier::Medium => "medium",
            Tier::Large => "large",
        }
    }

    pub fn parse(name: &str) -> Result<Tier, CatalogueError> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| CatalogueError::UnknownTier(name.to_string()))
    }

    pub fn limits(self) -> &'static TierLimits {
        TIERS.iter().find(|l| l.tier == self).unwrap_or(&TIERS[0])
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl AddonKind {
    /// Whether it takes a `tier`.
    pub fn has_tiers(self) -> bool {
        self == AddonKind::Postgresql
    }

    /// `client_connections` as asked for this kind: the pooled client connections an app
    /// gets instead of its tier's (the seed: "connection limits are tunable per plan").
    pub fn check_client_connections(self, asked: i64) -> Result<u32, CatalogueError> {
        if !self.has_tiers() {
            return Err(CatalogueError::NoClientConnections(self.name()));
        }
        u32::try_from(asked)
            .ok()
            .filter(|n| (1..=MAX_CLIENT_CONNECTIONS).contains(n))
            .ok_or(CatalogueError::ClientConnections(asked))
    }

    /// `tier` as asked for this kind: an error for a kind without tiers.
    pub fn parse_tier(self, name: &str) -> Result<Tier, CatalogueError> {
        if !self.has_tiers() {
            return Err(CatalogueError::NoTiers(self.name()));
        }
        Tier::parse(name)
    }
}

/// Whether a PostgreSQL setting takes effect only after a server restart (the rest: a reload).
pub fn needs_restart(setting: &str) -> bool {
    matches!(setting, "shared_buffers" | "max_connections")
}

impl TierLimits {
    /// The server's `max_connections`: both pools of the app's login and the direct reserve.
    /// Not the clients: they queue in the pooler.
    pub fn max_connections(&self) -> u32 {
        self.transaction_pool + self.session_pool + DIRECT_CONNECTIONS
    }

    /// PostgreSQL settings derived from the memory limit, `(name, value)` in the server's
    /// units: `shared_buffers` 25%, `effective_cache_size` 75%, `maintenance_work_mem` 1/16,
    /// `work_mem` half the memory spread over every connection (at least 4 MB).
    pub fn pg_settings(&self) -> Vec<(&'static str, String)> {
        let mem_mb = self.memory_bytes / MIB;
        let max_connections = u64::from(self.max_connections());
        let work_mem_mb = (mem_mb / 2 / max_connections).max(4);
        vec![
            ("shared_buffers", format!("{}MB", mem_mb / 4)),
            ("max_connections", max_connections.to_string()),
            ("effective_cache_size", format!("{}MB", mem_mb * 3 / 4)),
            (
                "maintenance_work_mem",
                format!("{}MB", (mem_mb / 16).max(16)),
            ),
            ("work_mem", format!("{work_mem_mb}MB")),
        ]
    }

    /// The size a disk of `size_gb` grows to when it passes [`GROW_AT_PERCENT`], `None` at the
    /// ceiling.
    pub fn grown_size_gb(&self, size_gb: u64) -> Option<u64> {
        let next = (size_gb + self.growth_step_gb).min(self.growth_ceiling_gb);
        (next > size_gb).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_numbers_are_the_table() {
        let got: Vec<_> = Tier::ALL
            .iter()
            .map(|t| {
                let l = t.limits();
                (t.name(), l.storage_gb, l.client_connections, l.memory_bytes)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("small", 1, 100, 512 << 20),
                ("medium", 10, 200, 2 << 30),
                ("large", 100, 500, 8 << 30)
            ]
        );
        assert_eq!(Tier::default(), Tier::Small);
    }

    #[test]
    fn settings_follow_the_memory() {
        let small = Tier::Small.limits().pg_settings();
        let get =
            |s: &[(&str, String)], k: &str| s.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get(&small, "shared_buffers").as_deref(), Some("128MB"));
        assert_eq!(
            get(&small, "effective_cache_size").as_deref(),
            Some("384MB")
        );
        assert_eq!(get(&small, "max_connections").as_deref(), Some("85"));
        let large = Tier::Large.limits().pg_settings();
        assert_eq!(get(&large, "shared_buffers").as_deref(), Some("2048MB"));
        // The server serves the pools, far fewer than the clients.
        for t in Tier::ALL {
            assert!(t.limits().max_connections() < t.limits().client_connections);
        }
    }

    #[test]
    fn growth_stops_at_the_ceiling() {
        let small = Tier::Small.limits();
        assert_eq!(small.grown_size_gb(1), Some(2));
        assert_eq!(small.grown_size_gb(9), Some(10));
        assert_eq!(small.grown_size_gb(10), None);
        assert_eq!(small.grown_size_gb(12), None);
    }

    #[test]
    fn names_parse_and_other_kinds_have_none() {
        for t in Tier::ALL {
            assert_eq!(Tier::parse(t.name()).unwrap(), t);
        }
        let err = Tier::parse("huge").unwrap_err().to_string();
        assert!(err.contains("small, medium, large"), "{err}");
        assert!(AddonKind::Valkey.parse_tier("small").is_err());
    }
}
