//! miren's container runtime. Images: pull from OCI registries (through mirrors), verify
//! every digest, store blobs content-addressed, unpack each layer once for overlayfs, import
//! local images, list, remove and GC; everything lives under `<data>/images` (see
//! [`ImageStore`] and `docs/images.md`). Sandboxes: OCI containers run with youki's
//! libcontainer by one small supervisor process each (see [`sandbox`] and `docs/sandbox.md`).

mod build;
mod confined;
mod digest;
mod error;
mod import;
mod mirrors;
mod oci;
mod pull;
mod store;
mod unpack;

pub mod sandbox;

pub use build::{BuildConfig, SourceError, SourceLimits, SourceTree};
pub use digest::digest_hex;
pub use error::{Error, Result};
pub use import::ImportKind;
pub use mirrors::{is_loopback_host, normalize_registry, Endpoint, Mirrors, MIRROR_ENV};
pub use oci::{ImageConfig, Platform};
pub use pull::{Credentials, Progress, ProgressFn, PullOptions};
pub use store::{normalize_reference, GcReport, ImageRecord, ImageStore, LayerInfo};
pub use unpack::{unpack_layer, Compression};
