//! Pure logic for managed addons and `.miren/app.toml`: no I/O, no agent wiring.

pub mod app_toml;
pub mod catalogue;
pub mod credentials;
pub mod env;
pub mod ident;

pub use app_toml::{
    command_argv, parse_app_toml, AddonConfig, AppConfig, AppTomlError, Command, DiskConfig,
    DiskProvider, EnvEntry, Filesystem, Problem, ServiceConfig,
};
pub use catalogue::{
    AddonInfo, AddonKind, Catalogue, CatalogueError, ResolvedAddon, ResolvedVersion, Tenancy,
    Variant, VariantInfo,
};
pub use credentials::{generate_password, Credentials, RandomError};
pub use env::{EnvVar, PostgresConnection, MASK};
pub use ident::{validate_name, NameError, PgIdentifiers};
