//! The parts of the OCI / Docker image formats the store reads. Parsed by
//! hand (serde) and tolerant of fields it does not use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::digest_hex;
use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Manifest media types accepted from a registry.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    pub fn size(&self) -> Result<u64> {
        u64::try_from(self.size)
            .map_err(|_| Error::BadImage(format!("negative size for {}", self.digest)))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// linux and this machine's architecture in OCI spelling.
    pub fn current() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            a => a,
        };
        Platform {
            architecture: arch.to_string(),
            os: "linux".to_string(),
            variant: None,
        }
    }

    fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A manifest or an index, told apart by content.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

pub enum Parsed {
    Index(Vec<Descriptor>),
    Manifest(Manifest),
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Manifest {
    /// The OCI image manifest document for this config and these layers (images this crate
    /// writes itself: an import, a build).
    pub fn to_oci_json(&self) -> Vec<u8> {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.config,
            "layers": self.layers,
        })
        .to_string()
        .into_bytes()
    }
}

pub fn parse_manifest(bytes: &[u8]) -> Result<Parsed> {
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadImage(format!("manifest is not valid JSON: {e}")))?;
    if raw.schema_version != 2 {
        return Err(Error::BadImage(format!(
            "manifest schemaVersion {} is not supported",
            raw.schema_version
        )));
    }
    let is_index = matches!(
        raw.media_type.as_deref(),
        Some(OCI_INDEX) | Some(DOCKER_LIST)
    ) || raw.manifests.is_some();
    if is_index {
        let m = raw.manifests.unwrap_or_default();
        for d in &m {
            digest_hex(&d.digest)?;
        }
        return Ok(Parsed::Index(m));
    }
    let config = raw
        .config
        .ok_or_else(|| Error::BadImage("manifest has no config".into()))?;
    digest_hex(&config.digest)?;
    if !matches!(config.media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG | "") {
        return Err(Error::BadImage(format!(
            "not a container image (config media type {})",
            config.media_type
        )));
    }
    for l in &raw.layers {
        digest_hex(&l.digest)?;
        l.size()?;
    }
    config.size()?;
    Ok(Parsed::Manifest(Manifest {
        config,
        layers: raw.layers,
    }))
}

/// Picks the entry of an index for `platform`.
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor> {
    entries
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .or_else(|| {
            // An index with one platform-less manifest (common in OCI layouts).
            (entries.len() == 1 && entries[0].platform.is_none()).then(|| &entries[0])
        })
        .ok_or_else(|| Error::NoPlatform(platform.to_string()))
}

/// What a container needs from the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct RawConfigFile {
    #[serde(default)]
    config: Option<RawConfig>,
    rootfs: RawRootfs,
}

#[derive(Debug, Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    stop_signal: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    volumes: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
}

/// Parses an image config blob into (config, diff ids).
pub fn parse_config(bytes: &[u8]) -> Result<(ImageConfig, Vec<String>)> {
    let raw: RawConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadImage(format!("image config is not valid: {e}")))?;
    for d in &raw.rootfs.diff_ids {
        digest_hex(d)?;
    }
    let c = raw.config.unwrap_or_default();
    Ok((
        ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            volumes: c.volumes.unwrap_or_default().into_keys().collect(),
            labels: c.labels.unwrap_or_default(),
        },
        raw.rootfs.diff_ids,
    ))
}

/// A config blob for an imported rootfs (like `docker import`).
pub fn synth_config(cfg: &ImageConfig, diff_ids: &[String]) -> Vec<u8> {
    let platform = Platform::current();
    let mut c = serde_json::Map::new();
    let strs = |v: &[String]| serde_json::Value::from(v.to_vec());
    if !cfg.env.is_empty() {
        c.insert("Env".into(), strs(&cfg.env));
    }
    if !cfg.entrypoint.is_empty() {
        c.insert("Entrypoint".into(), strs(&cfg.entrypoint));
    }
    if !cfg.cmd.is_empty() {
        c.insert("Cmd".into(), strs(&cfg.cmd));
    }
    if !cfg.working_dir.is_empty() {
        c.insert("WorkingDir".into(), cfg.working_dir.clone().into());
    }
    if !cfg.user.is_empty() {
        c.insert("User".into(), cfg.user.clone().into());
    }
    let v = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    v.to_string().into_bytes()
}
