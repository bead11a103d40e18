//! An app as a deploy declared it: app.toml read into the spec the agent stores and converges
//! to.

use super::*;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AppSpec {
    pub services: Vec<ServiceSpec>,
    pub addons: Vec<AddonSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub image: String,
    /// Empty: the image's entrypoint and cmd.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub disks: Vec<DiskSpec>,
    pub publish: Vec<PublishPort>,
    /// app.toml's `memory`, `cpus`, `pids`, `disk`; unset: the sandbox defaults. Absent in
    /// specs stored before they existed.
    #[serde(default)]
    pub limits: ServiceLimitsSpec,
    /// Set when the agent built the image from the app's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<BuiltSpec>,
}

/// How a service's image was built from source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuiltSpec {
    pub stack: String,
    pub digest: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceLimitsSpec {
    pub memory_bytes: Option<u64>,
    pub millicpus: Option<u32>,
    pub pids: Option<u32>,
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskSpec {
    pub name: String,
    pub mount_path: String,
    pub read_only: bool,
    /// The app's local storage directory instead of a miren disk.
    pub local: bool,
    pub size_gb: u64,
    /// None for local storage (stored as `""` before this was a type).
    #[serde(deserialize_with = "filesystem_or_none")]
    pub filesystem: Option<Filesystem>,
    pub lease_timeout_secs: Option<f64>,
}

/// Reads a stored filesystem: a name, `""` or null (local storage).
fn filesystem_or_none<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<Filesystem>, D::Error> {
    match Option::<String>::deserialize(de)?.as_deref() {
        None | Some("") => Ok(None),
        Some(name) => Filesystem::ALL
            .into_iter()
            .find(|fs| fs.as_str() == name)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown filesystem `{name}`"))),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddonSpec {
    pub kind: String,
    pub variant: String,
    /// Only when app.toml pins one.
    pub version: Option<String>,
    /// Only when app.toml sets one (PostgreSQL's `pooling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<String>,
    /// PostgreSQL's tier: app.toml's, `small` when it names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// The display name a service's sandbox is given when no other sandbox has it:
/// `<app>-<service>`, shortened with a hash past 63 characters. Only a name: services are found
/// by (app, service) on the sandbox row, since `a` + `b-c` and `a-b` + `c` read alike.
pub fn service_sandbox_name(app: &str, service: &str) -> String {
    let name = format!("{app}-{service}");
    miren_sys::name::shortened(&name, miren_sys::fnv::fnv1a32(name.as_bytes()))
}

pub(super) fn spec_from_config(
    config: &miren_addons::AppConfig,
    publish: &[crate::model::ServicePublish],
    built: &[crate::model::BuiltImage],
    source: &str,
) -> Result<AppSpec, Error> {
    let mut services = Vec::new();
    for s in &config.services {
        let (image, built) = match &s.image {
            miren_addons::ImageSource::Image(image) => (image.clone(), None),
            miren_addons::ImageSource::Build { .. } => {
                let b = built.iter().find(|b| b.service == s.name).ok_or_else(|| {
                    Error::invalid(format!(
                        "{source}: services.{} has no `image` and no image was built for it; run `miren deploy` in the app's directory (it sends the source to be built), or set image = \"...\"",
                        s.name
                    ))
                })?;
                crate::core::validate::image_reference("built image", &b.image)?;
                (
                    b.image.clone(),
                    Some(BuiltSpec {
                        stack: b.stack.clone(),
                        digest: b.digest.clone(),
                    }),
                )
            }
        };
        services.push((s, image, built));
    }
    Ok(AppSpec {
        services: services
            .into_iter()
            .map(|(s, image, built)| ServiceSpec {
                name: s.name.clone(),
                image,
                built,
                limits: ServiceLimitsSpec {
                    memory_bytes: s.limits.memory_bytes,
                    millicpus: s.limits.millicpus,
                    pids: s.limits.pids,
                    disk_bytes: s.limits.disk_bytes,
                },
                command: s
                    .command
                    .as_ref()
                    .map(|c| c.argv.clone())
                    .unwrap_or_default(),
                env: s
                    .env
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect(),
                disks: s
                    .disks
                    .iter()
                    .map(|d| match &d.provider {
                        miren_addons::DiskProvider::Miren {
                            size_gb,
                            filesystem,
                            lease_timeout,
                        } => DiskSpec {
                            name: d.name.clone(),
                            mount_path: d.mount_path.clone(),
                            read_only: d.read_only,
                            local: false,
                            size_gb: *size_gb,
                            filesystem: Some(*filesystem),
                            lease_timeout_secs: lease_timeout.map(|t| t.as_secs_f64()),
                        },
                        miren_addons::DiskProvider::Local => DiskSpec {
                            name: d.name.clone(),
                            mount_path: d.mount_path.clone(),
                            read_only: d.read_only,
                            local: true,
                            size_gb: 0,
                            filesystem: None,
                            lease_timeout_secs: None,
                        },
                    })
                    .collect(),
                publish: publish
                    .iter()
                    .filter(|p| p.service == s.name)
                    .map(|p| PublishPort {
                        host_ip: p.host_ip.clone(),
                        host_port: p.host_port,
                        port: p.port,
                    })
                    .collect(),
            })
            .collect(),
        addons: config
            .addons
            .iter()
            .map(|a| AddonSpec {
                kind: a.kind.name().to_string(),
                variant: a.variant.name().to_string(),
                version: a.version_pinned.then(|| a.version.name().to_string()),
                pooling: a.pooling.map(|p| p.name().to_string()),
                tier: a
                    .kind
                    .has_tiers()
                    .then(|| a.tier.unwrap_or_default().name().to_string()),
            })
            .collect(),
    })
}
