//! Pure logic for managed addons and `.miren/app.toml`: no I/O, no agent wiring.

pub mod catalogue;
pub mod credentials;
pub mod env;
pub mod ident;

pub use catalogue::{
    AddonInfo, AddonKind, Catalogue, CatalogueError, ResolvedAddon, ResolvedVersion, Tenancy,
    Variant, VariantInfo,
};
pub use credentials::{generate_password, Credentials, RandomError};
pub use env::{EnvVar, PostgresConnection, MASK};
pub use ident::{validate_name, NameError, PgIdentifiers};
