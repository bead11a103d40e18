//! Pure logic for managed addons and `.miren/app.toml`: no I/O, no agent wiring.

pub mod catalogue;

pub use catalogue::{
    AddonInfo, AddonKind, Catalogue, CatalogueError, ResolvedAddon, ResolvedVersion, Tenancy,
    Variant, VariantInfo,
};
