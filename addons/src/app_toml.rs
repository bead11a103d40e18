//! `.miren/app.toml`: parsed into a spanned tree and walked by hand, so every problem names its
//! line and its field path (`services.web.disks[0].size_gb`), and all problems are reported at
//! once rather than one per deploy attempt.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::catalogue::{
    validate_image_ref, AddonKind, Pooling, ResolvedAddon, ResolvedVersion, Variant,
};
use crate::ident::{validate_name, validate_user_name};

mod health;
pub use health::{HealthCheck, HealthProbe, ReplaceStrategy};

/// Largest `size_gb`: 1 PiB. Keeps `size_gb << 30` far inside u64 and SQLite's i64.
pub const MAX_SIZE_GB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    pub name: String,
    /// In the order they appear in the file.
    pub services: Vec<ServiceConfig>,
    /// In the order they appear in the file.
    pub addons: Vec<AddonConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    /// A prebuilt image, or one the agent builds from the app's source.
    pub image: ImageSource,
    /// `memory`, `cpus`, `pids`, `disk`; unset ones take the agent's defaults.
    pub limits: ServiceLimits,
    pub command: Option<Command>,
    pub env: Vec<EnvEntry>,
    pub disks: Vec<DiskConfig>,
    /// `[services.NAME.health]`; None: the agent's default (see [`HealthCheck::default_tcp`]).
    pub health: Option<HealthCheck>,
    /// `strategy`: how a redeploy replaces the service's sandbox.
    pub strategy: ReplaceStrategy,
}

/// What a service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `image = "..."`: a prebuilt OCI image.
    Image(String),
    /// No `image`: the agent builds one from the app's source on a stack's base image;
    /// `stack` and `base` override what detection picks (see docs/builds.md).
    Build {
        stack: Option<Stack>,
        base: Option<String>,
    },
}

impl ImageSource {
    /// The prebuilt image, if this is one.
    pub fn image(&self) -> Option<&str> {
        match self {
            ImageSource::Image(i) => Some(i),
            ImageSource::Build { .. } => None,
        }
    }
}

impl From<&str> for ImageSource {
    fn from(image: &str) -> Self {
        ImageSource::Image(image.to_string())
    }
}

/// A build stack: how a source tree becomes an image (catalogue: the agent's `core/build`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stack {
    Bun,
    Node,
    Python,
    Static,
}

impl Stack {
    pub const ALL: [Stack; 4] = [Stack::Bun, Stack::Node, Stack::Python, Stack::Static];

    pub fn name(self) -> &'static str {
        match self {
            Stack::Bun => "bun",
            Stack::Node => "node",
            Stack::Python => "python",
            Stack::Static => "static",
        }
    }

    pub fn parse(name: &str) -> Result<Stack, String> {
        Stack::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Stack::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown stack `{name}`; the stacks are: {} (or set image = \"...\" to run a prebuilt image)",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A service's own limits (`None`: the agent's default, see docs/sandbox.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceLimits {
    /// `memory = "1G"`, in bytes.
    pub memory_bytes: Option<u64>,
    /// `cpus = 2` or `cpus = 0.5`, in thousandths of a CPU.
    pub millicpus: Option<u32>,
    /// `pids = 4096`: the most tasks at once.
    pub pids: Option<u32>,
    /// `disk = "2G"`: the writable layer (writes to the container's own filesystem), in bytes.
    pub disk_bytes: Option<u64>,
}

/// Bounds of the service limits: what a sandbox can start with, and what fits the kernel's
/// interfaces (ext4's 16 TiB, a sane task count).
const MIN_MEMORY: u64 = 4 << 20;
const MIN_DISK: u64 = 16 << 20;
const MAX_DISK: u64 = 16 << 40;
const MAX_PIDS: i64 = 4_194_304;
const MAX_MILLICPUS: f64 = 1_024_000.0;

/// A service's `command`, and the argv it runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// As written in app.toml.
    pub raw: String,
    /// Split into words when the string is plain words and quotes (so images without a shell
    /// work); `["sh", "-c", raw]` when it uses anything a shell would interpret.
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub name: String,
    pub mount_path: String,
    pub read_only: bool,
    pub provider: DiskProvider,
}

/// Where a disk comes from. Size, filesystem and lease only mean something for miren disks,
/// so they live in that arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskProvider {
    /// A managed, leased disk (`provider = "miren"`, the default).
    Miren {
        size_gb: u64,
        filesystem: Filesystem,
        lease_timeout: Option<Duration>,
    },
    /// A host directory (`provider = "local"`).
    Local,
}

/// The one filesystem type, the disks crate's: app.toml names it, the agent makes it.
pub use miren_disks::Filesystem;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddonConfig {
    pub kind: AddonKind,
    pub variant: Variant,
    pub version: ResolvedVersion,
    /// True when `version` was written: a pinned addon is never moved to a newer default.
    pub version_pinned: bool,
    /// `pooling` (PostgreSQL only); `None`: the variant's default (`Pooling::default_for`).
    pub pooling: Option<Pooling>,
    /// `tier` (PostgreSQL only); `None`: `small`, or what the addon has.
    pub tier: Option<crate::tier::Tier>,
    /// `client_connections` (PostgreSQL only): the app's pooled client connections instead
    /// of its tier's; `None`: the tier's, or what the addon has.
    pub client_connections: Option<u32>,
}

impl AddonConfig {
    pub fn resolved(&self) -> ResolvedAddon {
        ResolvedAddon {
            kind: self.kind,
            variant: self.variant,
            version: self.version.clone(),
        }
    }

    pub fn image_ref(&self) -> String {
        self.version.image_ref()
    }
}

impl AppConfig {
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// One thing wrong in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; `None` when the problem is the absence of something at the top level.
    pub line: Option<usize>,
    /// Dotted path such as `services.web.disks[0].size_gb`; empty for TOML syntax errors.
    pub field: String,
    pub message: String,
}

/// Every problem found, each as `PATH line N: FIELD: MESSAGE`, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AppTomlError {
    pub path: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for AppTomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&self.path)?;
            if let Some(line) = p.line {
                write!(f, " line {line}")?;
            }
            if !p.field.is_empty() {
                write!(f, ": {}", p.field)?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

/// Parses and validates `.miren/app.toml`. `path_for_messages` only prefixes error messages.
pub fn parse_app_toml(text: &str, path_for_messages: &str) -> Result<AppConfig, AppTomlError> {
    let mut ctx = Ctx {
        text,
        problems: Vec::new(),
    };
    let config = match DeTable::parse(text) {
        Ok(root) => ctx.app(root.get_ref()),
        Err(e) => {
            let line = e.span().map(|s| ctx.line(&s));
            ctx.problems.push(Problem {
                line,
                field: String::new(),
                message: format!("invalid TOML: {}", e.message()),
            });
            None
        }
    };
    match config {
        Some(config) if ctx.problems.is_empty() => Ok(config),
        _ => {
            // Stable, readable order: by line, top-level ones (no line) first.
            ctx.problems.sort_by_key(|p| p.line);
            Err(AppTomlError {
                path: path_for_messages.to_string(),
                problems: ctx.problems,
            })
        }
    }
}

type Value<'i> = Spanned<DeValue<'i>>;

/// `"512M"`, `"2G"`, `"1024K"`, `"1T"` (powers of 1024, an optional `B`) or plain bytes; None
/// if it is not one or overflows. The one size grammar: app.toml and the sandbox API share it.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_lowercase().trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

const APP_FIELDS: &[&str] = &["name", "services", "addons"];
const SERVICE_FIELDS: &[&str] = &[
    "image", "stack", "base", "command", "env", "disks", "memory", "cpus", "pids", "disk",
    "health", "strategy",
];
const ENV_FIELDS: &[&str] = &["key", "value"];
const DISK_FIELDS: &[&str] = &[
    "name",
    "provider",
    "mount_path",
    "size_gb",
    "filesystem",
    "read_only",
    "lease_timeout",
];
const PROVIDERS: &[&str] = &["miren (default)", "local"];
const ADDON_FIELDS: &[&str] = &[
    "variant",
    "version",
    "pooling",
    "tier",
    "client_connections",
];

struct Ctx<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

/// A table being read: its path, where it is, and its entries.
struct Tbl<'a, 'i> {
    path: String,
    span: Range<usize>,
    table: &'a DeTable<'i>,
}

impl<'a, 'i> Tbl<'a, 'i> {
    fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    fn field(&self, key: &str) -> String {
        child(&self.path, key)
    }

    /// Entries in source order (the map itself is sorted by key).
    fn entries(&self) -> Vec<(&'a Spanned<std::borrow::Cow<'i, str>>, &'a Value<'i>)> {
        let mut entries: Vec<_> = self.table.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        entries
    }
}

fn child(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl<'t> Ctx<'t> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        // Spans are byte offsets from the parser; get() avoids a panic on a bad boundary.
        self.text
            .get(..end)
            .map_or(1, |before| before.matches('\n').count() + 1)
    }

    fn err(&mut self, span: &Range<usize>, field: String, message: impl Into<String>) {
        let line = Some(self.line(span));
        self.problems.push(Problem {
            line,
            field,
            message: message.into(),
        });
    }

    /// Reports every key not in `allowed`, listing the valid ones.
    fn check_fields(&mut self, t: &Tbl<'_, '_>, allowed: &[&str]) {
        for (k, _) in t.entries() {
            if !allowed.contains(&k.get_ref().as_ref()) {
                let hint = closest(k.get_ref(), allowed)
                    .map(|c| format!(" did you mean `{c}`?"))
                    .unwrap_or_default();
                let msg = format!(
                    "unknown field;{hint} valid fields here are: {}",
                    allowed.join(", ")
                );
                self.err(&k.span(), t.field(k.get_ref()), msg);
            }
        }
    }

    fn table<'a, 'i>(&mut self, v: &'a Value<'i>, path: String, want: &str) -> Option<Tbl<'a, 'i>> {
        match v.get_ref() {
            DeValue::Table(table) => Some(Tbl {
                path,
                span: v.span(),
                table,
            }),
            other => {
                let msg = format!("expected {want}, found {}", type_name(other));
                self.err(&v.span(), path, msg);
                None
            }
        }
    }

    fn missing(&mut self, t: &Tbl<'_, '_>, key: &str, hint: &str) {
        let field = t.field(key);
        let message = format!("missing required field; {hint}");
        if t.path.is_empty() {
            self.problems.push(Problem {
                line: None,
                field,
                message,
            });
        } else {
            self.err(&t.span, field, message);
        }
    }

    fn string(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<(String, Range<usize>)> {
        let v = t.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.to_string(), v.span())),
            other => {
                let msg = format!("expected a string, found {}", type_name(other));
                self.err(&v.span(), t.field(key), msg);
                None
            }
        }
    }

    fn boolean(&mut self, t: &Tbl<'_, '_>, key: &str) -> Option<bool> {
        let v = t.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                let msg = format!("expected true or false, found {}", type_name(other));
                self.err(&v.span(), t.field(key), msg);
                None
            }
        }
    }

    /// An array of tables (`[[x]]` or `x = [{..}]`), each with its indexed path.
    fn array_of_tables<'a, 'i>(&mut self, t: &Tbl<'a, 'i>, key: &str) -> Vec<Tbl<'a, 'i>> {
        let Some(v) = t.get(key) else {
            return Vec::new();
        };
        let path = t.field(key);
        let DeValue::Array(items) = v.get_ref() else {
            let msg = format!(
                "expected an array of tables, written [[{path}]], found {}",
                type_name(v.get_ref())
            );
            self.err(&v.span(), path, msg);
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(tbl) = self.table(item, format!("{path}[{i}]"), "a table") {
                out.push(tbl);
            }
        }
        out
    }

    fn app(&mut self, root: &DeTable<'_>) -> Option<AppConfig> {
        let root = Tbl {
            path: String::new(),
            span: 0..0,
            table: root,
        };
        self.check_fields(&root, APP_FIELDS);

        let name = match self.string(&root, "name") {
            Some((name, span)) => {
                if let Err(e) = validate_user_name(&name) {
                    self.err(&span, "name".into(), format!("app name {e}"));
                }
                Some(name)
            }
            None => {
                if root.get("name").is_none() {
                    self.missing(&root, "name", "add e.g. name = \"my-app\" at the top");
                }
                None
            }
        };

        // Addons first: services' env must not shadow what addons inject.
        let addons = match root.get("addons") {
            Some(v) => self.addons(v),
            None => Vec::new(),
        };
        let services = match root.get("services") {
            Some(v) => self.services(v, &addons),
            None => {
                self.missing(
                    &root,
                    "services",
                    "add at least one service, e.g. [services.web] with command = \"...\" (built from source) or image = \"...\"",
                );
                Vec::new()
            }
        };
        Some(AppConfig {
            name: name?,
            services,
            addons,
        })
    }

    fn addons(&mut self, v: &Value<'_>) -> Vec<AddonConfig> {
        let Some(t) = self.table(
            v,
            "addons".into(),
            "a table of addons, e.g. [addons.miren-postgresql]",
        ) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // Every named kind with where it was named, for the clash check below.
        let mut named = Vec::new();
        for (k, v) in t.entries() {
            let path = t.field(k.get_ref());
            let kind = match AddonKind::parse(k.get_ref()) {
                Ok(kind) => {
                    named.push((kind, k.span(), path.clone()));
                    Some(kind)
                }
                Err(e) => {
                    self.err(&k.span(), path.clone(), e.to_string());
                    None
                }
            };
            let Some(at) = self.table(
                v,
                path,
                "a table with optional variant, version, pooling, tier and client_connections",
            ) else {
                continue;
            };
            self.check_fields(&at, ADDON_FIELDS);
            let Some(kind) = kind else { continue };

            let variant = match self.string(&at, "variant") {
                Some((s, span)) => match kind.parse_variant(&s) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        self.err(&span, at.field("variant"), e.to_string());
                        None
                    }
                },
                None if at.get("variant").is_some() => None,
                None => Some(kind.default_variant()),
            };

            let version_value = at.get("version");
            let version = match version_value.map(|v| (v.get_ref(), v.span())) {
                None => Some(ResolvedVersion::Catalogue(kind.default_version())),
                Some((value, span)) => {
                    // `version = 16` is as clear as `version = "16"`; accept both.
                    let text = match value {
                        DeValue::String(s) => Some(s.to_string()),
                        // Through u64 so `0x11` means 17, as TOML says.
                        DeValue::Integer(i) => Some(
                            u64::from_str_radix(i.as_str(), i.radix())
                                .map_or_else(|_| i.as_str().to_string(), |n| n.to_string()),
                        ),
                        other => {
                            let msg = format!(
                                "expected a version such as \"17\" or an image reference, found {}",
                                type_name(other)
                            );
                            self.err(&span, at.field("version"), msg);
                            None
                        }
                    };
                    match text.map(|t| kind.parse_version(&t)) {
                        Some(Ok(v)) => Some(v),
                        Some(Err(e)) => {
                            self.err(&span, at.field("version"), e.to_string());
                            None
                        }
                        None => None,
                    }
                }
            };
            let pooling = self.addon_pooling(&at, kind);
            let tier = self.addon_tier(&at, kind);
            let clients = self.addon_client_connections(&at, kind);
            if let (Some(variant), Some(version), Some(pooling), Some(tier), Some(clients)) =
                (variant, version, pooling, tier, clients)
            {
                out.push(AddonConfig {
                    kind,
                    variant,
                    version,
                    version_pinned: version_value.is_some(),
                    pooling,
                    tier,
                    client_connections: clients,
                });
            }
        }
        let kinds: Vec<AddonKind> = named.iter().map(|(kind, _, _)| *kind).collect();
        if let Some(clash) = crate::env::env_clash(&kinds) {
            if let Some((_, span, path)) = named.iter().find(|(kind, _, _)| *kind == clash.second) {
                self.err(span, path.clone(), clash.to_string());
            }
        }
        out
    }

    /// `pooling = "transaction" | "session" | "none"`: Some(None) when absent, None after an
    /// error (recorded).
    fn addon_pooling(&mut self, at: &Tbl<'_, '_>, kind: AddonKind) -> Option<Option<Pooling>> {
        if at.get("pooling").is_none() {
            return Some(None);
        }
        let (s, span) = self.string(at, "pooling")?;
        match kind.parse_pooling(&s) {
            Ok(p) => Some(Some(p)),
            Err(e) => {
                self.err(&span, at.field("pooling"), e.to_string());
                None
            }
        }
    }

    /// `tier = "small" | "medium" | "large"`: Some(None) when absent, None after an error
    /// (recorded).
    fn addon_tier(
        &mut self,
        at: &Tbl<'_, '_>,
        kind: AddonKind,
    ) -> Option<Option<crate::tier::Tier>> {
        if at.get("tier").is_none() {
            return Some(None);
        }
        let (s, span) = self.string(at, "tier")?;
        match kind.parse_tier(&s) {
            Ok(t) => Some(Some(t)),
            Err(e) => {
                self.err(&span, at.field("tier"), e.to_string());
                None
            }
        }
    }

    /// `client_connections = N`: Some(None) when absent, None after an error (recorded).
    fn addon_client_connections(
        &mut self,
        at: &Tbl<'_, '_>,
        kind: AddonKind,
    ) -> Option<Option<u32>> {
        let Some(v) = at.get("client_connections") else {
            return Some(None);
        };
        let asked = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => None,
        };
        let Some(asked) = asked else {
            let msg = format!(
                "expected a whole number of client connections (1-{}), found {}",
                crate::tier::MAX_CLIENT_CONNECTIONS,
                type_name(v.get_ref())
            );
            self.err(&v.span(), at.field("client_connections"), msg);
            return None;
        };
        match kind.check_client_connections(asked) {
            Ok(n) => Some(Some(n)),
            Err(e) => {
                self.err(&v.span(), at.field("client_connections"), e.to_string());
                None
            }
        }
    }

    fn services(&mut self, v: &Value<'_>, addons: &[AddonConfig]) -> Vec<ServiceConfig> {
        let Some(t) = self.table(
            v,
            "services".into(),
            "a table of services, e.g. [services.web]",
        ) else {
            return Vec::new();
        };
        if t.table.is_empty() {
            self.err(
                &t.span,
                "services".into(),
                "no services; add at least one, e.g. [services.web] with image = \"...\"",
            );
        }
        let mut out = Vec::new();
        for (k, v) in t.entries() {
            let name = k.get_ref().to_string();
            let path = t.field(&name);
            let name_ok = match validate_name(&name) {
                Ok(()) => true,
                Err(e) => {
                    self.err(&k.span(), path.clone(), format!("service name {e}"));
                    false
                }
            };
            let Some(st) = self.table(v, path, "a table, e.g. [services.web]") else {
                continue;
            };
            if let Some(service) = self.service(&st, name, addons) {
                if name_ok {
                    out.push(service);
                }
            }
        }
        out
    }

    fn service(
        &mut self,
        t: &Tbl<'_, '_>,
        name: String,
        addons: &[AddonConfig],
    ) -> Option<ServiceConfig> {
        self.check_fields(t, SERVICE_FIELDS);

        let image = self.image_source(t);

        let command = match self.string(t, "command") {
            Some((raw, span)) => match command_argv(&raw) {
                Ok(argv) => Some(Command { raw, argv }),
                Err(msg) => {
                    self.err(&span, t.field("command"), msg);
                    None
                }
            },
            None => None,
        };

        let injected: Vec<(&str, AddonKind)> = addons
            .iter()
            .flat_map(|a| a.kind.env_keys().iter().map(move |k| (*k, a.kind)))
            .collect();
        let mut env: Vec<EnvEntry> = Vec::new();
        for et in self.array_of_tables(t, "env") {
            self.check_fields(&et, ENV_FIELDS);
            let key = match self.string(&et, "key") {
                Some((key, span)) => {
                    if let Err(msg) = validate_env_key(&key) {
                        self.err(&span, et.field("key"), msg);
                        None
                    } else if env.iter().any(|e| e.key == key) {
                        self.err(
                            &span,
                            et.field("key"),
                            format!("`{key}` is already set earlier in this service"),
                        );
                        None
                    } else if let Some((_, addon)) = injected.iter().find(|(k, _)| *k == key) {
                        self.err(&span, et.field("key"), format!("`{key}` is injected by addon {addon}; remove this entry or the addon"));
                        None
                    } else {
                        Some(key)
                    }
                }
                None => {
                    if et.get("key").is_none() {
                        self.missing(&et, "key", "add e.g. key = \"PORT\"");
                    }
                    None
                }
            };
            let value = match self.string(&et, "value") {
                Some((value, _)) => Some(value),
                None => {
                    if et.get("value").is_none() {
                        self.missing(
                            &et,
                            "value",
                            "add e.g. value = \"3000\" (use \"\" for empty)",
                        );
                    }
                    None
                }
            };
            if let (Some(key), Some(value)) = (key, value) {
                env.push(EnvEntry { key, value });
            }
        }

        let mut disks: Vec<DiskConfig> = Vec::new();
        for dt in self.array_of_tables(t, "disks") {
            if let Some(disk) = self.disk(&dt) {
                if disks.iter().any(|d| d.name == disk.name) {
                    let span = dt.get("name").map_or(dt.span.clone(), |v| v.span());
                    self.err(
                        &span,
                        dt.field("name"),
                        format!("disk `{}` is already used by this service", disk.name),
                    );
                } else if disks.iter().any(|d| d.mount_path == disk.mount_path) {
                    let span = dt.get("mount_path").map_or(dt.span.clone(), |v| v.span());
                    self.err(
                        &span,
                        dt.field("mount_path"),
                        format!(
                            "`{}` is already the mount path of another disk in this service",
                            disk.mount_path
                        ),
                    );
                } else {
                    disks.push(disk);
                }
            }
        }

        let limits = self.service_limits(t);
        let health_ok = t.get("health").is_none();
        let health = self.service_health(t);
        let strategy = self.replace_strategy(t);
        if !health_ok && health.is_none() {
            return None;
        }

        Some(ServiceConfig {
            name,
            image: image?,
            limits,
            command,
            env,
            disks,
            health,
            strategy: strategy?,
        })
    }

    /// `image`, or `stack`/`base` (both optional) for a build from source; never both.
    fn image_source(&mut self, t: &Tbl<'_, '_>) -> Option<ImageSource> {
        let image_ref = |ctx: &mut Self, key: &str| match ctx.string(t, key) {
            Some((image, span)) => match validate_image_ref(&image) {
                Ok(()) => Some(Some(image)),
                Err(reason) => {
                    ctx.err(
                        &span,
                        t.field(key),
                        format!("`{image}` is not a valid image reference: {reason}"),
                    );
                    None
                }
            },
            None if t.get(key).is_some() => None,
            None => Some(None),
        };
        let image = image_ref(self, "image");
        let base = image_ref(self, "base");
        let stack = match self.string(t, "stack") {
            Some((name, span)) => match Stack::parse(&name) {
                Ok(stack) => Some(Some(stack)),
                Err(msg) => {
                    self.err(&span, t.field("stack"), msg);
                    None
                }
            },
            None if t.get("stack").is_some() => None,
            None => Some(None),
        };
        if t.get("image").is_some() {
            for key in ["stack", "base"] {
                if let Some(v) = t.get(key) {
                    self.err(
                        &v.span(),
                        t.field(key),
                        format!("`{key}` builds the image from source, `image` names a prebuilt one; keep one of them"),
                    );
                }
            }
        }
        match (image?, stack?, base?) {
            (Some(image), None, None) => Some(ImageSource::Image(image)),
            (Some(_), _, _) => None,
            (None, stack, base) => Some(ImageSource::Build { stack, base }),
        }
    }

    fn service_limits(&mut self, t: &Tbl<'_, '_>) -> ServiceLimits {
        let memory_bytes = self.size(t, "memory", MIN_MEMORY, u64::MAX, "512M or 1G");
        let disk_bytes = self.size(t, "disk", MIN_DISK, MAX_DISK, "1G or 2G");
        let pids = t.get("pids").and_then(|v| match v.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) if (1..=MAX_PIDS).contains(&n) => u32::try_from(n).ok(),
                _ => {
                    let msg = format!(
                        "expected a task count from 1 to {MAX_PIDS}, found {}",
                        i.as_str()
                    );
                    self.err(&v.span(), t.field("pids"), msg);
                    None
                }
            },
            other => {
                let msg = format!(
                    "expected an integer such as 1024, found {}",
                    type_name(other)
                );
                self.err(&v.span(), t.field("pids"), msg);
                None
            }
        });
        let millicpus = t.get("cpus").and_then(|v| {
            let cpus = match v.get_ref() {
                DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .map(|n| n as f64),
                DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
                _ => None,
            };
            match cpus.map(|c| (c * 1000.0).round()) {
                Some(m) if (1.0..=MAX_MILLICPUS).contains(&m) => Some(m as u32),
                _ => {
                    let found = match v.get_ref() {
                        DeValue::Integer(i) => i.as_str().to_string(),
                        DeValue::Float(f) => f.as_str().to_string(),
                        other => type_name(other).to_string(),
                    };
                    let msg = format!(
                        "expected a number of CPUs above 0 such as 2 or 0.5, found {found}"
                    );
                    self.err(&v.span(), t.field("cpus"), msg);
                    None
                }
            }
        });
        ServiceLimits {
            memory_bytes,
            millicpus,
            pids,
            disk_bytes,
        }
    }

    /// A size string (`"512M"`, `"2G"`; K, M, G, T are powers of 1024) within `min..=max`.
    fn size(
        &mut self,
        t: &Tbl<'_, '_>,
        key: &str,
        min: u64,
        max: u64,
        example: &str,
    ) -> Option<u64> {
        let (text, span) = self.string(t, key)?;
        match parse_size(&text) {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(_) => {
                let msg = format!(
                    "`{text}` is out of range: give from {}M{}",
                    min >> 20,
                    if max == u64::MAX {
                        String::new()
                    } else {
                        format!(" to {}T", max >> 40)
                    }
                );
                self.err(&span, t.field(key), msg);
                None
            }
            None => {
                let msg = format!(
                    "`{text}` is not a size; write e.g. \"{}\"",
                    example.split(' ').next().unwrap_or(example)
                );
                self.err(&span, t.field(key), msg);
                None
            }
        }
    }

    fn disk(&mut self, t: &Tbl<'_, '_>) -> Option<DiskConfig> {
        self.check_fields(t, DISK_FIELDS);

        let name = match self.string(t, "name") {
            Some((name, span)) => match validate_user_name(&name) {
                Ok(()) => Some(name),
                Err(e) => {
                    self.err(&span, t.field("name"), format!("disk name {e}"));
                    None
                }
            },
            None => {
                if t.get("name").is_none() {
                    self.missing(t, "name", "add e.g. name = \"app-data\"");
                }
                None
            }
        };

        let mount_path = match self.string(t, "mount_path") {
            Some((path, span)) => match validate_mount_path(&path) {
                Ok(()) => Some(path),
                Err(msg) => {
                    self.err(&span, t.field("mount_path"), msg);
                    None
                }
            },
            None => {
                if t.get("mount_path").is_none() {
                    self.missing(t, "mount_path", "add e.g. mount_path = \"/data\"");
                }
                None
            }
        };

        let read_only = self.boolean(t, "read_only").unwrap_or(false);

        let provider = match self.string(t, "provider") {
            None if t.get("provider").is_some() => None,
            None => Some(false),
            Some((p, _)) if p == "miren" => Some(false),
            Some((p, _)) if p == "local" => Some(true),
            Some((p, span)) => {
                let msg = format!(
                    "unknown provider `{p}`; choose one of: {}",
                    PROVIDERS.join(", ")
                );
                self.err(&span, t.field("provider"), msg);
                None
            }
        };
        let is_local = provider?;

        let provider = if is_local {
            // A host directory has no size, filesystem or lease: saying so beats ignoring it.
            for key in ["size_gb", "filesystem", "lease_timeout"] {
                if let Some(v) = t.get(key) {
                    let msg = format!("not allowed with provider = \"local\" (a host directory has no {}); remove it or use provider = \"miren\"", key.replace('_', " "));
                    self.err(&v.span(), t.field(key), msg);
                }
            }
            Some(DiskProvider::Local)
        } else {
            self.miren_disk(t)
        };

        Some(DiskConfig {
            name: name?,
            mount_path: mount_path?,
            read_only,
            provider: provider?,
        })
    }

    fn miren_disk(&mut self, t: &Tbl<'_, '_>) -> Option<DiskProvider> {
        let size_gb = match t.get("size_gb") {
            None => {
                self.missing(
                    t,
                    "size_gb",
                    "miren disks need a size in GiB to be created, e.g. size_gb = 10",
                );
                None
            }
            Some(v) => {
                let parsed = match v.get_ref() {
                    DeValue::Integer(i) => u64::from_str_radix(i.as_str(), i.radix()).ok(),
                    _ => None,
                };
                match parsed {
                    Some(n) if (1..=MAX_SIZE_GB).contains(&n) => Some(n),
                    Some(n) if n > MAX_SIZE_GB => {
                        self.err(
                            &v.span(),
                            t.field("size_gb"),
                            format!("{n} GiB is more than the limit of {MAX_SIZE_GB}"),
                        );
                        None
                    }
                    _ => {
                        let found = match v.get_ref() {
                            DeValue::Integer(i) => format!("found {}", i.as_str()),
                            other => format!("found {}", type_name(other)),
                        };
                        self.err(
                            &v.span(),
                            t.field("size_gb"),
                            format!("expected a positive integer (GiB), {found}"),
                        );
                        None
                    }
                }
            }
        };

        let filesystem = match self.string(t, "filesystem") {
            None if t.get("filesystem").is_some() => None,
            None => Some(Filesystem::Ext4),
            Some((fs, span)) => match Filesystem::ALL.iter().find(|f| f.as_str() == fs) {
                Some(f) => Some(*f),
                None => {
                    let msg = format!(
                        "unknown filesystem `{fs}`; choose one of: ext4 (default), xfs, btrfs"
                    );
                    self.err(&span, t.field("filesystem"), msg);
                    None
                }
            },
        };

        let lease_timeout = match self.string(t, "lease_timeout") {
            None if t.get("lease_timeout").is_some() => return None,
            None => None,
            Some((s, span)) => match humantime::parse_duration(&s) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => {
                    self.err(
                        &span,
                        t.field("lease_timeout"),
                        "must be longer than zero, e.g. \"5m\"",
                    );
                    return None;
                }
                Err(e) => {
                    let msg = format!(
                        "`{s}` is not a duration ({e}); write e.g. \"30s\", \"5m\" or \"1h\""
                    );
                    self.err(&span, t.field("lease_timeout"), msg);
                    return None;
                }
            },
        };

        Some(DiskProvider::Miren {
            size_gb: size_gb?,
            filesystem: filesystem?,
            lease_timeout,
        })
    }
}

/// The allowed name within two edits (typos like `sizegb`, `mountpath`, `varient`), if any.
fn closest<'a>(word: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(word, a), *a))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

/// Levenshtein distance over chars; inputs are short field names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// POSIX-style names, so every shell and runtime can pass them on.
fn validate_env_key(key: &str) -> Result<(), String> {
    let ok = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{key}` is not a valid variable name; use letters, digits and `_`, not starting with a digit"
        ))
    }
}

fn validate_mount_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{path}` must be an absolute path such as /data"));
    }
    if path == "/" || path.trim_end_matches('/').is_empty() {
        return Err("cannot mount over the root directory; use a path such as /data".into());
    }
    if path.contains('\0') {
        return Err("must not contain a NUL byte".into());
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("`{path}` must not contain `..`"));
    }
    if path.len() > 4096 {
        return Err("is longer than 4096 bytes".into());
    }
    Ok(())
}

/// Characters that make a command mean something only a shell can do.
const SHELL_SPECIAL: &[char] = &[
    '|', '&', ';', '<', '>', '(', ')', '$', '`', '*', '?', '[', ']', '{', '}', '~', '!', '#', '\n',
    '\r',
];

/// Splits a plain command into words, honoring `'...'`, `"..."` and `\`, as sh would.
/// Anything using pipes, redirects, expansions, globs, comments or a leading `VAR=x`
/// runs as `sh -c` instead, so it means exactly what it would in a shell.
pub fn command_argv(raw: &str) -> Result<Vec<String>, String> {
    if raw.trim().is_empty() {
        return Err("command is empty; remove it to use the image's default".into());
    }
    let shell = || Ok(vec!["sh".to_string(), "-c".to_string(), raw.to_string()]);
    if raw.contains(SHELL_SPECIAL) {
        return shell();
    }
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            // sh splits on IFS (space, tab; newline is sent to sh above), not on any Unicode space.
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated ' quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        // Inside double quotes sh only unescapes these (and $ `, excluded above).
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated \" quote".into()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated \" quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err("command ends with a lone backslash".into()),
            },
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    // `FOO=bar cmd` sets a variable in sh; exec'ing it would run a program named `FOO=bar`.
    if words.first().is_some_and(|w| {
        w.split_once('=')
            .is_some_and(|(name, _)| validate_env_key(name).is_ok())
    }) {
        return shell();
    }
    Ok(words)
}
