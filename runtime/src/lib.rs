//! Image half of miren's runtime: pull from OCI registries (through
//! mirrors), verify every digest, store blobs content-addressed, unpack each
//! layer once for overlayfs, import local images, list, remove and GC.
//!
//! Everything lives under `<data>/images`; see [`ImageStore`] and
//! `docs/images.md` for the layout.

mod digest;
mod error;
mod import;
mod mirrors;
mod oci;
mod pull;
mod store;
mod unpack;

pub use digest::digest_hex;
pub use error::{Error, Result};
pub use import::ImportKind;
pub use mirrors::{is_loopback_host, normalize_registry, Endpoint, Mirrors, MIRROR_ENV};
pub use oci::{ImageConfig, Platform};
pub use pull::{Credentials, Progress, ProgressFn, PullOptions};
pub use store::{normalize_reference, GcReport, ImageRecord, ImageStore, LayerInfo};
pub use unpack::{unpack_layer, Compression};
