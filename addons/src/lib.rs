//! Pure logic for managed addons and `.miren/app.toml`: no I/O, no agent wiring.
//!
//! The deploy path this crate serves, end to end:
//!
//! ```
//! use miren_addons::{parse_app_toml, Credentials, PostgresConnection};
//!
//! let text = r#"
//! name = "my-app"
//! [services.web]
//! image = "oven/bun:1"
//! command = "bun run index.ts"
//! [addons.miren-postgresql]
//! variant = "shared"
//! "#;
//! let app = parse_app_toml(text, ".miren/app.toml")?;
//! let addon = &app.addons[0];
//! assert_eq!(addon.image_ref(), "postgres:17");
//!
//! // Provisioning (elsewhere) creates the role and database these name.
//! let creds = Credentials::generate(&app.name)?;
//! let conn = PostgresConnection::new("10.10.0.196", 5432, &creds);
//! for var in conn.env_vars() {
//!     println!("{var}"); // DATABASE_URL=******** ... PGUSER=my_app_a85c37a9 ...
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod app_toml;
pub mod catalogue;
pub mod credentials;
pub mod env;
pub mod ident;
pub mod tier;

pub use app_toml::{
    command_argv, parse_app_toml, AddonConfig, AppConfig, AppTomlError, Command, DiskConfig,
    DiskProvider, EnvEntry, Filesystem, HealthCheck, HealthProbe, ImageSource, Problem,
    ReplaceStrategy, ServiceConfig, ServiceLimits, Stack,
};
pub use catalogue::{
    AddonInfo, AddonKind, Catalogue, CatalogueError, CatalogueVersion, Pooling, ResolvedAddon,
    ResolvedVersion, Tenancy, Variant, VariantInfo,
};
pub use credentials::{generate_password, Credentials, RandomError};
pub use env::{
    clashing_kinds, env_clash, memcache_env, mysql_env, postgres_env, rabbitmq_env, valkey_env,
    EnvClash, EnvVar, PostgresConnection, MASK, POOLER_SESSION_PORT, POOLER_TRANSACTION_PORT,
};
pub use ident::{
    is_reserved_name, validate_name, validate_user_name, MysqlIdentifiers, NameError,
    PgIdentifiers, RESERVED_NAME_PREFIX,
};
pub use tier::{Tier, TierLimits, GROW_AT_PERCENT, MAX_CLIENT_CONNECTIONS, TIERS};
