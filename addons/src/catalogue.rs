//! What addons exist, their variants and versions, and how a request resolves to an image.

use std::fmt;

/// Every addon this build knows. Data lives in `AddonKind::spec`, so a kind is one arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddonKind {
    Postgresql,
    Mysql,
    Valkey,
    Memcache,
    Rabbitmq,
}

/// How an addon is laid out on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// One server per app, with its own disk.
    Small,
    /// One server per node; each app gets its own database and role inside it.
    Shared,
}

/// Whether a variant's server belongs to one app or is shared by every app on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tenancy {
    Dedicated,
    SharedPerNode,
}

/// One version the catalogue offers: its name in app.toml and the stock image it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CatalogueVersion {
    /// As written in app.toml and `--version`: `17`, `mariadb-11`, `1.6`.
    pub name: &'static str,
    /// The official image's repository (`postgres`, `mariadb`, `valkey/valkey`).
    pub repository: &'static str,
    pub tag: &'static str,
}

impl CatalogueVersion {
    const fn new(name: &'static str, repository: &'static str, tag: &'static str) -> Self {
        CatalogueVersion {
            name,
            repository,
            tag,
        }
    }

    /// `repository:tag`, as pulled (through the agent's registry mirror, if any).
    pub fn image_ref(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// A version request after resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ResolvedVersion {
    /// A version from the catalogue, run from its stock image.
    Catalogue(CatalogueVersion),
    /// A full OCI image reference given by the user, run as given.
    Image(String),
}

/// A fully resolved addon request: what to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResolvedAddon {
    pub kind: AddonKind,
    pub variant: Variant,
    pub version: ResolvedVersion,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    #[error("unknown addon `{name}`; available addons: {}", .valid.join(", "))]
    UnknownAddon {
        name: String,
        valid: Vec<&'static str>,
    },
    #[error("addon {addon} has no variant `{variant}`; choose one of: {}", .valid.join(", "))]
    UnknownVariant {
        addon: &'static str,
        variant: String,
        valid: Vec<String>,
    },
    #[error(
        "addon {addon} has no version `{version}`; choose one of: {}, or a full image reference such as `ghcr.io/my-org/postgres-with-pgvector:17.2`",
        .valid.join(", ")
    )]
    UnknownVersion {
        addon: &'static str,
        version: String,
        valid: Vec<String>,
    },
    #[error("version `{version}` looks like an image reference but is not a valid one: {reason}")]
    BadImageRef { version: String, reason: String },
    #[error("unknown pooling `{0}`; choose one of: transaction, session, none")]
    UnknownPooling(String),
    #[error("addon {0} has no connection pooler: `pooling` is for miren-postgresql only")]
    NoPooler(&'static str),
    #[error("unknown tier `{0}`; choose one of: small, medium, large")]
    UnknownTier(String),
    #[error("addon {0} has no tiers: `tier` is for miren-postgresql only")]
    NoTiers(&'static str),
    #[error("addon {0} has no pooled client connections: `client_connections` is for miren-postgresql only")]
    NoClientConnections(&'static str),
    #[error("client_connections {0} is out of range: give 1 to {max} (each is a file descriptor in the pooler)", max = crate::tier::MAX_CLIENT_CONNECTIONS)]
    ClientConnections(i64),
}

/// What a PostgreSQL addon's `DATABASE_URL` points at: its pooler (PgBouncer) in transaction
/// or session mode, or the server itself. The other URLs are always injected as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pooling {
    /// A server connection per transaction: many clients on few server connections; no
    /// session state (`SET`, `LISTEN`, advisory locks) survives a transaction.
    Transaction,
    /// A server connection per client session, kept until the client disconnects.
    Session,
    /// The server itself.
    None,
}

impl Pooling {
    pub const ALL: [Pooling; 3] = [Pooling::Transaction, Pooling::Session, Pooling::None];

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Transaction => "transaction",
            Pooling::Session => "session",
            Pooling::None => "none",
        }
    }

    pub fn parse(name: &str) -> Result<Pooling, CatalogueError> {
        Pooling::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| CatalogueError::UnknownPooling(name.to_string()))
    }

    /// `transaction` on a shared server (many apps, one `max_connections`), `none` on a
    /// small one (as before pooling existed).
    pub fn default_for(variant: Variant) -> Pooling {
        match variant {
            Variant::Shared => Pooling::Transaction,
            Variant::Small => Pooling::None,
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Static facts about one variant, for `miren addon variants NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantInfo {
    pub variant: Variant,
    pub name: &'static str,
    pub description: &'static str,
    pub is_default: bool,
    pub tenancy: Tenancy,
    /// Size of the data disk (GiB), `None` for a server that keeps nothing. For
    /// `SharedPerNode` it is the one disk of the node's server.
    pub disk_size_gb: Option<u64>,
    pub disk_filesystem: &'static str,
}

/// Static facts about one addon, for `miren addon list-available` and `variants`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddonInfo {
    pub kind: AddonKind,
    pub name: &'static str,
    pub description: &'static str,
    pub variants: Vec<VariantInfo>,
    pub versions: &'static [CatalogueVersion],
    pub default_version: CatalogueVersion,
}

struct AddonSpec {
    name: &'static str,
    description: &'static str,
    /// Each variant with its description; the first is the default.
    variants: &'static [(Variant, &'static str)],
    versions: &'static [CatalogueVersion],
    default_version: &'static str,
    /// Whether its server keeps data on a disk (memcached does not).
    has_disk: bool,
}

const fn v(name: &'static str, repository: &'static str, tag: &'static str) -> CatalogueVersion {
    CatalogueVersion::new(name, repository, tag)
}

static POSTGRESQL: AddonSpec = AddonSpec {
    name: "miren-postgresql",
    description: "Managed PostgreSQL database",
    variants: &[
        (Variant::Small, "Dedicated PostgreSQL server (1 GB storage)"),
        (Variant::Shared, "Multi-app shared PostgreSQL server"),
    ],
    versions: &[
        v("14", "postgres", "14"),
        v("15", "postgres", "15"),
        v("16", "postgres", "16"),
        v("17", "postgres", "17"),
        v("18", "postgres", "18"),
    ],
    default_version: "17",
    has_disk: true,
};

// MySQL majors pull Oracle's official `mysql` image; MariaDB majors the official
// `mariadb` image. Both speak the same protocol and image contract.
static MYSQL: AddonSpec = AddonSpec {
    name: "miren-mysql",
    description: "Managed MySQL database (MySQL or MariaDB)",
    variants: &[
        (Variant::Small, "Dedicated MySQL server (1 GB storage)"),
        (Variant::Shared, "Multi-app shared MySQL server"),
    ],
    versions: &[
        v("8", "mysql", "8"),
        v("9", "mysql", "9"),
        v("mariadb-10.11", "mariadb", "10.11"),
        v("mariadb-11", "mariadb", "11"),
    ],
    default_version: "9",
    has_disk: true,
};

static VALKEY: AddonSpec = AddonSpec {
    name: "miren-valkey",
    description: "Managed Valkey (Redis-compatible) key-value store",
    variants: &[(
        Variant::Small,
        "Dedicated Valkey server (1 GB storage, append-only file)",
    )],
    versions: &[v("7", "valkey/valkey", "7"), v("8", "valkey/valkey", "8")],
    default_version: "8",
    has_disk: true,
};

static MEMCACHE: AddonSpec = AddonSpec {
    name: "miren-memcache",
    description: "Managed Memcached cache",
    variants: &[(
        Variant::Small,
        "Dedicated Memcached server (64 MB of memory, no storage)",
    )],
    versions: &[v("1.6", "memcached", "1.6")],
    default_version: "1.6",
    has_disk: false,
};

static RABBITMQ: AddonSpec = AddonSpec {
    name: "miren-rabbitmq",
    description: "Managed RabbitMQ message broker",
    variants: &[(Variant::Small, "Dedicated RabbitMQ server (1 GB storage)")],
    versions: &[v("3", "rabbitmq", "3"), v("4", "rabbitmq", "4")],
    default_version: "4",
    has_disk: true,
};

impl AddonKind {
    pub const ALL: &'static [AddonKind] = &[
        AddonKind::Postgresql,
        AddonKind::Mysql,
        AddonKind::Valkey,
        AddonKind::Memcache,
        AddonKind::Rabbitmq,
    ];

    fn spec(self) -> &'static AddonSpec {
        match self {
            AddonKind::Postgresql => &POSTGRESQL,
            AddonKind::Mysql => &MYSQL,
            AddonKind::Valkey => &VALKEY,
            AddonKind::Memcache => &MEMCACHE,
            AddonKind::Rabbitmq => &RABBITMQ,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn description(self) -> &'static str {
        self.spec().description
    }

    pub fn variants(self) -> impl Iterator<Item = Variant> {
        self.spec().variants.iter().map(|(variant, _)| *variant)
    }

    pub fn default_variant(self) -> Variant {
        self.spec().variants[0].0
    }

    /// What `variant` of this kind is, in a few words.
    pub fn variant_description(self, variant: Variant) -> &'static str {
        self.spec()
            .variants
            .iter()
            .find(|(v, _)| *v == variant)
            .map_or("", |(_, description)| description)
    }

    pub fn versions(self) -> &'static [CatalogueVersion] {
        self.spec().versions
    }

    pub fn default_version(self) -> CatalogueVersion {
        let spec = self.spec();
        spec.versions
            .iter()
            .copied()
            .find(|v| v.name == spec.default_version)
            .unwrap_or(spec.versions[0])
    }

    /// Whether its servers keep data on a disk.
    pub fn has_disk(self) -> bool {
        self.spec().has_disk
    }

    /// The catalogue version whose stock image is `image` (`postgres:17` -> `17`), if any.
    pub fn version_of_image(self, image: &str) -> Option<CatalogueVersion> {
        self.versions()
            .iter()
            .copied()
            .find(|v| v.image_ref() == image)
    }

    /// Whether its servers have a connection pooler (and so take `pooling`).
    pub fn has_pooler(self) -> bool {
        self == AddonKind::Postgresql
    }

    /// `pooling` as asked for this kind: an error for a kind without a pooler.
    pub fn parse_pooling(self, name: &str) -> Result<Pooling, CatalogueError> {
        if !self.has_pooler() {
            return Err(CatalogueError::NoPooler(self.name()));
        }
        Pooling::parse(name)
    }

    /// The variables an instance injects into its app (see `env`).
    pub fn env_keys(self) -> &'static [&'static str] {
        match self {
            AddonKind::Postgresql => crate::env::POSTGRES_ENV_KEYS,
            AddonKind::Mysql => crate::env::MYSQL_ENV_KEYS,
            AddonKind::Valkey => crate::env::VALKEY_ENV_KEYS,
            AddonKind::Memcache => crate::env::MEMCACHE_ENV_KEYS,
            AddonKind::Rabbitmq => crate::env::RABBITMQ_ENV_KEYS,
        }
    }

    pub fn parse(name: &str) -> Result<AddonKind, CatalogueError> {
        AddonKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == name)
            .ok_or_else(|| CatalogueError::UnknownAddon {
                name: name.to_string(),
                valid: AddonKind::ALL.iter().map(|k| k.name()).collect(),
            })
    }

    /// Variant names with the default marked, for error messages.
    fn variant_choices(self) -> Vec<String> {
        self.variants()
            .map(|v| {
                if v == self.default_variant() {
                    format!("{} (default)", v.name())
                } else {
                    v.name().to_string()
                }
            })
            .collect()
    }

    fn version_choices(self) -> Vec<String> {
        self.versions()
            .iter()
            .map(|v| {
                if *v == self.default_version() {
                    format!("{} (default)", v.name)
                } else {
                    v.name.to_string()
                }
            })
            .collect()
    }

    pub fn parse_variant(self, name: &str) -> Result<Variant, CatalogueError> {
        self.variants()
            .find(|v| v.name() == name)
            .ok_or_else(|| CatalogueError::UnknownVariant {
                addon: self.name(),
                variant: name.to_string(),
                valid: self.variant_choices(),
            })
    }

    /// A catalogue version (`"17"`, `"mariadb-11"`), or anything containing `/`, `:` or `@`
    /// as an image reference.
    pub fn parse_version(self, version: &str) -> Result<ResolvedVersion, CatalogueError> {
        if version.contains(['/', ':', '@']) {
            return match validate_image_ref(version) {
                Ok(()) => Ok(ResolvedVersion::Image(version.to_string())),
                Err(reason) => Err(CatalogueError::BadImageRef {
                    version: version.to_string(),
                    reason,
                }),
            };
        }
        // Only canonical spellings: "017" or "+17" would be surprising aliases.
        self.versions()
            .iter()
            .copied()
            .find(|v| v.name == version)
            .map(ResolvedVersion::Catalogue)
            .ok_or_else(|| CatalogueError::UnknownVersion {
                addon: self.name(),
                version: version.to_string(),
                valid: self.version_choices(),
            })
    }

    pub fn info(self) -> AddonInfo {
        AddonInfo {
            kind: self,
            name: self.name(),
            description: self.description(),
            variants: self
                .variants()
                .map(|v| VariantInfo {
                    variant: v,
                    name: v.name(),
                    description: self.variant_description(v),
                    is_default: v == self.default_variant(),
                    tenancy: v.tenancy(),
                    disk_size_gb: self.has_disk().then(|| v.disk_size_gb()),
                    // PostgreSQL's grows online here (tiers, automatic growth); ext4 cannot.
                    disk_filesystem: match self {
                        _ if !self.has_disk() => "",
                        AddonKind::Postgresql => "xfs",
                        _ => "ext4",
                    },
                })
                .collect(),
            versions: self.versions(),
            default_version: self.default_version(),
        }
    }
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Small => "small",
            Variant::Shared => "shared",
        }
    }

    pub fn tenancy(self) -> Tenancy {
        match self {
            Variant::Small => Tenancy::Dedicated,
            Variant::Shared => Tenancy::SharedPerNode,
        }
    }

    /// GiB, the unit of `size_gb` everywhere in miren.
    pub fn disk_size_gb(self) -> u64 {
        match self {
            Variant::Small => 1,
            Variant::Shared => 10,
        }
    }
}

impl ResolvedVersion {
    /// The image to run: `postgres:17` for a catalogue version, the user's reference otherwise.
    pub fn image_ref(&self) -> String {
        match self {
            ResolvedVersion::Catalogue(version) => version.image_ref(),
            ResolvedVersion::Image(image) => image.clone(),
        }
    }

    /// As the user asked and as recorded: a catalogue version's name or the image reference.
    pub fn name(&self) -> &str {
        match self {
            ResolvedVersion::Catalogue(version) => version.name,
            ResolvedVersion::Image(image) => image,
        }
    }
}

impl ResolvedAddon {
    pub fn image_ref(&self) -> String {
        self.version.image_ref()
    }
}

impl fmt::Display for AddonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in catalogue. A value rather than free functions so a cluster can later offer
/// a subset without changing callers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Catalogue;

impl Catalogue {
    pub fn builtin() -> Catalogue {
        Catalogue
    }

    pub fn addons(&self) -> Vec<AddonInfo> {
        AddonKind::ALL.iter().map(|k| k.info()).collect()
    }

    /// The view behind `miren addon variants NAME`.
    pub fn describe(&self, addon: &str) -> Result<AddonInfo, CatalogueError> {
        Ok(AddonKind::parse(addon)?.info())
    }

    /// Resolve `addon`, with defaults for a missing variant or version.
    pub fn resolve(
        &self,
        addon: &str,
        variant: Option<&str>,
        version: Option<&str>,
    ) -> Result<ResolvedAddon, CatalogueError> {
        let kind = AddonKind::parse(addon)?;
        let variant = match variant {
            Some(v) => kind.parse_variant(v)?,
            None => kind.default_variant(),
        };
        let version = match version {
            Some(v) => kind.parse_version(v)?,
            None => ResolvedVersion::Catalogue(kind.default_version()),
        };
        Ok(ResolvedAddon {
            kind,
            variant,
            version,
        })
    }
}

/// Checks a reference with the distribution grammar the image puller uses (`oci-spec`'s, so
/// app.toml accepts exactly what can be pulled), plus bounds it leaves out (a port above
/// 65535). When it is refused, [`explain_image_ref`] says what is wrong in words, since users
/// type these by hand.
pub fn validate_image_ref(reference: &str) -> Result<(), String> {
    let explained = explain_image_ref(reference);
    match reference.parse::<oci_spec::distribution::Reference>() {
        Ok(_) => explained,
        Err(e) => Err(explained.err().unwrap_or_else(|| e.to_string())),
    }
}

/// `[host[:port]/]path[:tag][@algo:hex]`, piece by piece, for the message.
fn explain_image_ref(reference: &str) -> Result<(), String> {
    if reference.is_empty() {
        return Err("it is empty".into());
    }
    if reference.len() > 512 {
        return Err("it is longer than 512 characters".into());
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        validate_digest(digest)?;
    }
    // A tag is the part after the last `:` that follows the last `/` (a `:` before a `/` is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(format!(
                "tag `{tag}` must be 1-128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
            ));
        }
    }
    if name.is_empty() {
        return Err("it has no repository name".into());
    }
    if name.len() > 255 {
        return Err("the repository name is longer than 255 characters".into());
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // As in Docker: the first component is a registry host if it looks like one.
    if components.len() > 1 {
        let first = components[0];
        if first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase())
        {
            validate_host(first)?;
            components.remove(0);
        }
    }
    for component in components {
        validate_path_component(component)?;
    }
    Ok(())
}

fn validate_host(host: &str) -> Result<(), String> {
    let (hostname, port) = if let Some(stripped) = host.strip_prefix('[') {
        // [IPv6]:port
        let (addr, after) = stripped
            .split_once(']')
            .ok_or_else(|| format!("registry `{host}` has an unclosed `[`"))?;
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(format!("registry `{host}` is not a valid IPv6 address"));
        }
        match after {
            "" => return Ok(()),
            _ => match after.strip_prefix(':') {
                Some(port) => ("ipv6", Some(port)),
                None => return Err(format!("registry `{host}` has junk after `]`")),
            },
        }
    } else {
        match host.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty()
            || !port.chars().all(|c| c.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(format!("registry `{host}` has an invalid port `{port}`"));
        }
    }
    let labels_ok = hostname.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if !labels_ok {
        return Err(format!("registry `{host}` is not a valid host name"));
    }
    Ok(())
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn validate_path_component(component: &str) -> Result<(), String> {
    let err = || {
        Err(format!(
            "repository path component `{component}` must be lowercase letters and digits, separated by `.`, `_`, `__` or `-`"
        ))
    };
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return err();
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator: measure its run and check it is one of the allowed forms.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-');
        if !ok {
            return err();
        }
    }
    Ok(())
}

fn validate_digest(digest: &str) -> Result<(), String> {
    let (algorithm, encoded) = digest
        .split_once(':')
        .ok_or_else(|| format!("digest `{digest}` must look like `sha256:<64 hex digits>`"))?;
    let algo_ok = !algorithm.is_empty()
        && algorithm
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
    let encoded_ok = !encoded.is_empty()
        && encoded
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=_-".contains(c));
    if !algo_ok || !encoded_ok {
        return Err(format!(
            "digest `{digest}` must look like `sha256:<64 hex digits>`"
        ));
    }
    if algorithm == "sha256"
        && !(encoded.len() == 64
            && encoded
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)))
    {
        return Err(format!(
            "digest `{digest}`: sha256 needs 64 lowercase hex digits"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_small_and_17() {
        let r = Catalogue::builtin()
            .resolve("miren-postgresql", None, None)
            .unwrap();
        assert_eq!(r.variant, Variant::Small);
        assert_eq!(r.version.name(), "17");
        assert_eq!(r.image_ref(), "postgres:17");
    }

    #[test]
    fn every_catalogue_version_maps_to_a_stock_image() {
        for v in ["14", "15", "16", "17", "18"] {
            let r = Catalogue::builtin()
                .resolve("miren-postgresql", Some("shared"), Some(v))
                .unwrap();
            assert_eq!(r.variant, Variant::Shared);
            assert_eq!(r.image_ref(), format!("postgres:{v}"));
        }
    }

    #[test]
    fn image_references_are_used_as_given() {
        for image in [
            "ghcr.io/my-org/postgres-with-pgvector:17.2",
            "postgres:16",
            "library/postgres",
            "localhost:5000/pg",
            "registry.example.com:5000/team/pg:17-alpine",
            "postgres@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "pgvector/pgvector:pg17",
        ] {
            let r = Catalogue::builtin()
                .resolve("miren-postgresql", None, Some(image))
                .unwrap_or_else(|e| panic!("{image}: {e}"));
            assert_eq!(r.version, ResolvedVersion::Image(image.to_string()));
            assert_eq!(r.image_ref(), image);
        }
    }

    #[test]
    fn bad_image_references_say_why() {
        for bad in [
            ":17",
            "postgres:",
            "Postgres:17",
            "ghcr.io/My-Org/pg:1",
            "pg:-x",
            "pg@sha256:abc",
            "pg@nocolon",
            "a//b:1",
            "host:99999/pg",
            "pg:has space",
            // The puller's grammar has no IPv6 registry hosts: refused here, not at pull time.
            "[fd00::1]:5000/pg:17",
        ] {
            let err = Catalogue::builtin()
                .resolve("miren-postgresql", None, Some(bad))
                .unwrap_err();
            assert!(
                matches!(err, CatalogueError::BadImageRef { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn unknown_names_list_the_choices() {
        let c = Catalogue::builtin();
        let err = c.resolve("mysql", None, None).unwrap_err().to_string();
        assert!(err.contains("miren-mysql, miren-valkey"), "{err}");
        assert!(
            err.contains("`mysql`") && err.contains("miren-postgresql"),
            "{err}"
        );

        let err = c
            .resolve("miren-postgresql", Some("large"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`large`") && err.contains("small (default), shared"),
            "{err}"
        );

        for v in ["13", "19", "17.2", "017", "latest", ""] {
            let err = c
                .resolve("miren-postgresql", None, Some(v))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("14, 15, 16, 17 (default), 18") && err.contains("image reference"),
                "{err}"
            );
        }
    }

    #[test]
    fn variants_view_describes_both() {
        let info = Catalogue::builtin().describe("miren-postgresql").unwrap();
        assert_eq!(info.description, "Managed PostgreSQL database");
        let small = &info.variants[0];
        assert_eq!(small.name, "small");
        assert!(small.is_default);
        assert_eq!(
            small.description,
            "Dedicated PostgreSQL server (1 GB storage)"
        );
        assert_eq!(
            (small.tenancy, small.disk_size_gb),
            (Tenancy::Dedicated, Some(1))
        );
        let shared = &info.variants[1];
        assert_eq!(shared.name, "shared");
        assert!(!shared.is_default);
        assert_eq!(shared.description, "Multi-app shared PostgreSQL server");
        assert_eq!(
            (shared.tenancy, shared.disk_size_gb),
            (Tenancy::SharedPerNode, Some(10))
        );
        assert_eq!(info.default_version.name, "17");
        assert!(Catalogue::builtin().describe("redis").is_err());
    }

    #[test]
    fn the_launch_catalogue_resolves_to_the_official_images() {
        let c = Catalogue::builtin();
        for (addon, version, image) in [
            ("miren-mysql", None, "mysql:9"),
            ("miren-mysql", Some("8"), "mysql:8"),
            ("miren-mysql", Some("mariadb-11"), "mariadb:11"),
            ("miren-mysql", Some("mariadb-10.11"), "mariadb:10.11"),
            ("miren-valkey", None, "valkey/valkey:8"),
            ("miren-valkey", Some("7"), "valkey/valkey:7"),
            ("miren-memcache", None, "memcached:1.6"),
            ("miren-rabbitmq", None, "rabbitmq:4"),
            ("miren-rabbitmq", Some("3"), "rabbitmq:3"),
        ] {
            let r = c.resolve(addon, None, version).unwrap();
            assert_eq!(r.image_ref(), image);
            assert_eq!(r.variant, Variant::Small);
            assert_eq!(
                r.kind.version_of_image(image).map(|v| v.name),
                Some(r.version.name())
            );
        }
        assert_eq!(
            c.resolve("miren-mysql", Some("shared"), None)
                .unwrap()
                .variant,
            Variant::Shared
        );
        for single in ["miren-valkey", "miren-memcache", "miren-rabbitmq"] {
            let err = c.resolve(single, Some("shared"), None).unwrap_err();
            assert!(err.to_string().contains("small (default)"), "{err}");
        }
        let memcache = c.describe("miren-memcache").unwrap();
        assert_eq!(memcache.variants[0].disk_size_gb, None);
    }
}
