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
    /// The service's health check; None: none (no port, or a spec stored before checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// How a redeploy replaces its sandbox.
    #[serde(default)]
    pub strategy: Strategy,
}

/// A health check as the agent runs it (app.toml's, or the default TCP check).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthSpec {
    pub probe: ProbeSpec,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub start_period_ms: u64,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProbeSpec {
    /// GET `path` on the sandbox's address and `port`: 2xx or 3xx passes.
    Http { path: String, port: u16 },
    /// A TCP connect to the sandbox's address and `port`.
    Tcp { port: u16 },
    /// `argv` run in the sandbox exits 0.
    Exec { argv: Vec<String> },
}

impl ProbeSpec {
    /// For status output: `http GET /healthz on port 3000`.
    pub fn describe(&self) -> String {
        match self {
            ProbeSpec::Http { path, port } => format!("http GET {path} on port {port}"),
            ProbeSpec::Tcp { port } => format!("tcp connect to port {port}"),
            ProbeSpec::Exec { argv } => format!("exec {}", argv.join(" ")),
        }
    }
}

/// How a redeploy replaces a service's sandbox (app.toml's `strategy`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The next sandbox starts beside the serving one and takes over once healthy.
    #[default]
    Overlap,
    /// The serving sandbox stops first (also forced by disks under exclusive leases).
    Recreate,
}

fn health_spec(s: &miren_addons::ServiceConfig, publish: &[PublishPort]) -> Option<HealthSpec> {
    let env_port = s
        .env
        .iter()
        .find(|e| e.key == "PORT")
        .and_then(|e| e.value.parse::<u16>().ok());
    let port = env_port.unwrap_or(DEFAULT_PORT);
    let check = match &s.health {
        Some(h) => h.clone(),
        // Without a declared check, a service with a port is checked with a TCP connect.
        None if env_port.is_some() || !publish.is_empty() => {
            miren_addons::HealthCheck::default_tcp(env_port.or(publish.first().map(|p| p.port))?)
        }
        None => return None,
    };
    let probe = match check.probe {
        miren_addons::HealthProbe::Http { path } => ProbeSpec::Http { path, port },
        miren_addons::HealthProbe::Tcp { port } => ProbeSpec::Tcp { port },
        miren_addons::HealthProbe::Exec { command } => ProbeSpec::Exec { argv: command.argv },
    };
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Some(HealthSpec {
        probe,
        interval_ms: ms(check.interval),
        timeout_ms: ms(check.timeout),
        start_period_ms: ms(check.start_period),
        failure_threshold: check.failure_threshold,
    })
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
    /// PostgreSQL's `client_connections`: app.toml's; none: the tier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_connections: Option<u32>,
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
            .map(|(s, image, built)| {
                let publish: Vec<PublishPort> = publish
                    .iter()
                    .filter(|p| p.service == s.name)
                    .map(|p| PublishPort {
                        host_ip: p.host_ip.clone(),
                        host_port: p.host_port,
                        port: p.port,
                    })
                    .collect();
                ServiceSpec {
                    health: health_spec(s, &publish),
                    strategy: match s.strategy {
                        miren_addons::ReplaceStrategy::Overlap => Strategy::Overlap,
                        miren_addons::ReplaceStrategy::Recreate => Strategy::Recreate,
                    },
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
                    publish,
                }
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
                client_connections: a.client_connections,
            })
            .collect(),
    })
}
