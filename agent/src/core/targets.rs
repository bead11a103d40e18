//! Backup targets: the named places backups and archives are stored, behind one object-store
//! interface (`object_store`), so a local directory and S3-compatible storage are used alike.
//!
//! An agent always has the target `local` (a directory under its data dir, on the node) unless
//! the operator defines a target of that name; `--backup-target NAME=URL` adds more. The default
//! target is `--default-backup-target`, else the first one configured, else `local`.
//!
//! S3 credentials never come from the command line: from the agent's environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`) or from a file named by the URL's
//! `credentials=` that only root can read.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

use crate::core::error::Error;

mod io;
pub use io::{ObjectReader, ObjectWriter};

/// The name of the target every agent has unless the operator defines one of that name.
pub const LOCAL_TARGET: &str = "local";

/// Where a target keeps its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this node (another disk, a network mount).
    Directory(PathBuf),
    /// An S3-compatible bucket, under an optional key prefix.
    S3(S3Location),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Endpoint URL of an S3-compatible server; AWS itself when unset.
    pub endpoint: Option<String>,
    pub region: String,
    /// A root-only file with `AWS_ACCESS_KEY_ID=` and `AWS_SECRET_ACCESS_KEY=` lines.
    pub credentials: Option<PathBuf>,
}

/// `NAME=URL` as given to `--backup-target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub name: String,
    pub location: Location,
}

const URL_FORMS: &str = "use NAME=/absolute/dir, NAME=file:///absolute/dir or \
     NAME=s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION&credentials=/root-only/file]";

impl FromStr for TargetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("backup target `{s}` has no name: {URL_FORMS}"))?;
        validate_target_name(name)?;
        let location = parse_location(url).map_err(|e| format!("backup target `{name}`: {e}"))?;
        Ok(TargetSpec {
            name: name.to_string(),
            location,
        })
    }
}

pub fn validate_target_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "backup target name `{name}` is invalid: use up to 32 lowercase letters, digits and `-`, starting with a letter"
        ))
    }
}

fn parse_location(url: &str) -> Result<Location, String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        return parse_s3(rest).map(Location::S3);
    }
    let dir = url.strip_prefix("file://").unwrap_or(url);
    let dir = PathBuf::from(dir);
    if !dir.is_absolute()
        || dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!("`{url}` is not an absolute directory: {URL_FORMS}"));
    }
    Ok(Location::Directory(dir))
}

fn parse_s3(rest: &str) -> Result<S3Location, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err(format!("the S3 URL names no bucket: {URL_FORMS}"));
    }
    let mut location = S3Location {
        bucket: bucket.to_string(),
        prefix: prefix.trim_matches('/').to_string(),
        endpoint: None,
        region: "us-east-1".to_string(),
        credentials: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` in the S3 URL is not KEY=VALUE"))?;
        match key {
            "endpoint" => {
                if !(value.starts_with("http://") || value.starts_with("https://")) {
                    return Err(format!(
                        "endpoint `{value}` must start with http:// or https://"
                    ));
                }
                location.endpoint = Some(value.trim_end_matches('/').to_string());
            }
            "region" => location.region = value.to_string(),
            "credentials" => {
                let file = PathBuf::from(value);
                if !file.is_absolute() {
                    return Err(format!(
                        "credentials file `{value}` must be an absolute path"
                    ));
                }
                location.credentials = Some(file);
            }
            "access_key_id" | "secret_access_key" => return Err(
                "credentials are never given in the URL: put them in a root-only file named by \
                     credentials=, or in the agent's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                    .to_string(),
            ),
            other => {
                return Err(format!(
                    "unknown S3 URL parameter `{other}`: use endpoint, region or credentials"
                ))
            }
        }
    }
    Ok(location)
}

/// One configured target, opened.
pub struct Target {
    name: String,
    location: Location,
    store: Arc<dyn ObjectStore>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("location", &self.location)
            .finish()
    }
}

impl Target {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether the backups survive the loss of this node. A directory may be another disk or a
    /// network mount, but the agent cannot tell: it says "on the node".
    pub fn off_node(&self) -> bool {
        matches!(self.location, Location::S3(_))
    }

    /// Where the target is, for output and logs: never a credential.
    pub fn describe(&self) -> String {
        match &self.location {
            Location::Directory(dir) => dir.display().to_string(),
            Location::S3(s3) => {
                let mut url = format!("s3://{}", s3.bucket);
                if !s3.prefix.is_empty() {
                    url.push('/');
                    url.push_str(&s3.prefix);
                }
                if let Some(endpoint) = &s3.endpoint {
                    url.push_str(&format!(" at {endpoint}"));
                }
                url
            }
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object path of `key` in this target: relative `/`-separated segments, no `.`/`..`.
    pub fn path(&self, key: &str) -> Result<ObjectPath, Error> {
        object_key(key)
    }

    fn open(spec: &TargetSpec) -> Result<Target, String> {
        let store: Arc<dyn ObjectStore> = match &spec.location {
            Location::Directory(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating backup directory {}: {e}", dir.display()))?;
                // Backups hold whole disks' data: only root reads them.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("securing backup directory {}: {e}", dir.display()))?;
                Arc::new(
                    LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| format!("opening backup directory {}: {e}", dir.display()))?
                        .with_automatic_cleanup(true),
                )
            }
            Location::S3(s3) => open_s3(&spec.name, s3)?,
        };
        Ok(Target {
            name: spec.name.clone(),
            location: spec.location.clone(),
            store,
        })
    }
}

/// Checks a key given by a client: a relative path of plain segments.
pub fn object_key(key: &str) -> Result<ObjectPath, Error> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.ends_with('/')
        || key.len() > 512
        || key
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == ".." || s.chars().any(|c| c.is_control()));
    if bad {
        return Err(Error::invalid(
            format!(
                "backup key `{key}` is invalid: use a relative path of names separated by `/` (e.g. `orders/2026-12-01.mrsnap`)"
            ),
        ));
    }
    ObjectPath::parse(key).map_err(|e| Error::invalid(format!("backup key `{key}`: {e}")))
}

fn open_s3(name: &str, s3: &S3Location) -> Result<Arc<dyn ObjectStore>, String> {
    // Retries are bounded: an unreachable target fails a backup in seconds with an error that
    // says so (the archive shipper tries again on its next pass), not after minutes.
    let retry = object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    };
    // Payloads are not signed (`UNSIGNED-PAYLOAD`): signing hashes every byte with SHA-256 on
    // the node (and the server hashes it again to check), a second pass over a backup beside its
    // compression. What we store checks itself: a snapshot's chunks carry BLAKE3 hashes and zstd
    // checksums verified on restore, WAL records their CRCs; https protects the transfer.
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_unsigned_payload(true)
        .with_retry(retry);
    if let Some(endpoint) = &s3.endpoint {
        let loopback = ["http://127.", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| endpoint.starts_with(p));
        if endpoint.starts_with("http://") && !loopback {
            return Err(format!(
                "backup target `{name}`: plain http is allowed only on loopback; use an https:// endpoint"
            ));
        }
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(loopback)
            .with_virtual_hosted_style_request(false);
    }
    if let Some(file) = &s3.credentials {
        let (key_id, secret) =
            read_credentials(file).map_err(|e| format!("backup target `{name}`: {e}"))?;
        builder = builder
            .with_access_key_id(key_id)
            .with_secret_access_key(secret);
    }
    let store = builder
        .build()
        .map_err(|e| format!("backup target `{name}`: {e}"))?;
    Ok(if s3.prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, s3.prefix.as_str()))
    })
}

/// Reads `AWS_ACCESS_KEY_ID=` and `AWS_SECRET_ACCESS_KEY=` from a file only root may read.
fn read_credentials(file: &Path) -> Result<(String, String), String> {
    let meta = std::fs::metadata(file)
        .map_err(|e| format!("reading credentials file {}: {e}", file.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "credentials file {} must belong to root and be readable by no one else: run `chown root {0} && chmod 600 {0}`",
            file.display()
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("reading credentials file {}: {e}", file.display()))?;
    let mut values = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            values.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    match (
        values.remove("AWS_ACCESS_KEY_ID"),
        values.remove("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Ok((id, secret)),
        _ => Err(format!(
            "credentials file {} needs AWS_ACCESS_KEY_ID= and AWS_SECRET_ACCESS_KEY= lines",
            file.display()
        )),
    }
}

/// The agent's targets, opened at start.
#[derive(Debug)]
pub struct Targets {
    targets: Vec<Arc<Target>>,
    default: usize,
}

impl Targets {
    /// Opens the configured targets plus `local` (`DATA_DIR/backups`) unless one is named so.
    pub fn open(
        specs: &[TargetSpec],
        default: Option<&str>,
        data_dir: &Path,
    ) -> Result<Targets, String> {
        let mut all: Vec<TargetSpec> = Vec::new();
        for spec in specs {
            if all.iter().any(|s| s.name == spec.name) {
                return Err(format!("backup target `{}` is configured twice", spec.name));
            }
            all.push(spec.clone());
        }
        if !all.iter().any(|s| s.name == LOCAL_TARGET) {
            all.push(TargetSpec {
                name: LOCAL_TARGET.to_string(),
                location: Location::Directory(data_dir.join("backups")),
            });
        }
        let default = match default {
            Some(name) => all.iter().position(|s| s.name == name).ok_or_else(|| {
                format!(
                    "--default-backup-target `{name}` is not a configured target (have: {})",
                    all.iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
            None => 0,
        };
        let targets = all
            .iter()
            .map(|spec| Target::open(spec).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Targets { targets, default })
    }

    /// The named target, or the default one.
    pub fn resolve(&self, name: Option<&str>) -> Result<Arc<Target>, Error> {
        match name {
            Some(name) => self.get(name).cloned(),
            None => Ok(self.default_target().clone()),
        }
    }

    pub fn default_target(&self) -> &Arc<Target> {
        &self.targets[self.default]
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Target>, Error> {
        self.targets.iter().find(|t| t.name == name).ok_or_else(|| {
            Error::not_found(
                format!(
                    "no backup target `{name}` on this agent (have: {}); add one with `miren agent --backup-target {name}=URL`",
                    self.names().join(", ")
                ),
            )
        })
    }

    pub fn list(&self) -> &[Arc<Target>] {
        &self.targets
    }

    fn names(&self) -> Vec<&str> {
        self.targets.iter().map(|t| t.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directory_and_s3_targets() {
        let dir: TargetSpec = "nas=/mnt/nas/backups".parse().unwrap();
        assert_eq!(dir.location, Location::Directory("/mnt/nas/backups".into()));
        let file: TargetSpec = "nas=file:///mnt/nas".parse().unwrap();
        assert_eq!(file.location, Location::Directory("/mnt/nas".into()));
        let s3: TargetSpec =
            "offsite=s3://bkt/node-1/?endpoint=http://127.0.0.1:8333/&region=eu-west-1&credentials=/etc/miren/s3.env"
                .parse()
                .unwrap();
        assert_eq!(
            s3.location,
            Location::S3(S3Location {
                bucket: "bkt".into(),
                prefix: "node-1".into(),
                endpoint: Some("http://127.0.0.1:8333".into()),
                region: "eu-west-1".into(),
                credentials: Some("/etc/miren/s3.env".into()),
            })
        );
    }

    #[test]
    fn refuses_bad_targets() {
        for bad in [
            "nobody",
            "Bad=/x",
            "x=relative/dir",
            "x=/a/../b",
            "x=s3://",
            "x=s3://b?secret_access_key=hunter2",
            "x=s3://b?endpoint=ftp://h",
            "x=s3://b?colour=red",
            "x=s3://b?credentials=rel",
        ] {
            assert!(bad.parse::<TargetSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_relative_plain_paths() {
        assert!(object_key("orders/2026-12-01.mrsnap").is_ok());
        for bad in ["", "/abs", "a/../b", "a//b", "a/", "./a", "a\nb"] {
            assert!(object_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn local_is_always_there_and_default_is_chosen() {
        let data = tempfile::tempdir().unwrap();
        let other = data.path().join("nas");
        let specs = vec![TargetSpec {
            name: "nas".into(),
            location: Location::Directory(other),
        }];
        let targets = Targets::open(&specs, None, data.path()).unwrap();
        assert_eq!(targets.default_target().name(), "nas");
        assert!(targets.get(LOCAL_TARGET).is_ok());
        assert!(!targets.get(LOCAL_TARGET).unwrap().off_node());
        let targets = Targets::open(&specs, Some("local"), data.path()).unwrap();
        assert_eq!(targets.default_target().name(), "local");
        assert!(Targets::open(&specs, Some("nope"), data.path()).is_err());
        assert!(Targets::open(&[], None, data.path())
            .unwrap()
            .get("nas")
            .is_err());
    }

    #[test]
    fn credentials_file_must_be_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s3.env");
        std::fs::write(&file, "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_credentials(&file).is_err());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(read_credentials(&file).unwrap(), ("k".into(), "s".into()));
        }
    }
}
