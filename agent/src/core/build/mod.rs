//! Builds from source: an app's source tree (an untrusted tar from `miren deploy`) becomes an
//! image in the content store: the stack's base image, a cached dependency layer (its step run
//! in a build sandbox on the base image), and the source as one deterministic layer at `/app`.
//!
//! An image is recorded as `miren.build/<app>-<service>:<key>`, the key hashing everything
//! that goes into it (stack, base digest, dependency layer, source digest, command), so the same
//! source gives the same reference and digest and a redeploy of unchanged source builds
//! nothing. Blobs are written under temp names and the record last (`miren_runtime::build`):
//! an agent killed mid-build leaves no image, and the next build starts over.

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use miren_addons::Stack;
use miren_runtime::{BuildConfig, ImageRecord, SourceError, SourceLimits, SourceTree};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::core::error::{Error, ErrorKind};
use crate::core::images::ImageService;
use crate::core::sandboxes::{SandboxRequest, SandboxService};
use crate::model::{BuildResult, BuildStep, BuiltImage};
use miren_sys::name::Name;

pub mod stacks;

/// The app whose local storage holds dependency steps' output while they run, and whose
/// endpoints the build sandboxes get. In the agent's reserved `addon-` name space, so no user
/// app can be it (and share its scratch storage or network).
const BUILD_APP: &str = "addon-build";
/// Largest lockfile or manifest read to key the dependency cache.
const MAX_KEY_FILE: u64 = 64 << 20;
/// How long a dependency step may run.
const DEPS_TIMEOUT: Duration = Duration::from_secs(600);
/// Memory of a build sandbox (package managers want more than an app's default).
const BUILD_MEMORY: u64 = 2 << 30;

/// A build as the API asks for it, parsed.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub app: Name,
    pub service: Name,
    pub stack: Option<Stack>,
    pub base: Option<String>,
    /// app.toml's command as argv; empty: the stack's default.
    pub command: Vec<String>,
}

impl BuildRequest {
    pub fn from_api(q: crate::model::BuildQuery) -> Result<BuildRequest, Error> {
        let name = |what: &str, v: &str| {
            Name::new(v).map_err(|e| Error::invalid(format!("{what} `{v}`: {e}")))
        };
        let stack = q
            .stack
            .as_deref()
            .map(Stack::parse)
            .transpose()
            .map_err(Error::invalid)?;
        if let Some(base) = &q.base {
            crate::core::validate::image_reference("base", base)?;
        }
        let command = match q.command.as_deref() {
            Some(raw) => miren_addons::command_argv(raw)
                .map_err(|e| Error::invalid(format!("command: {e}")))?,
            None => Vec::new(),
        };
        Ok(BuildRequest {
            app: name("app", &q.app)?,
            service: name("service", &q.service)?,
            stack,
            base: q.base,
            command,
        })
    }
}

pub struct BuildService {
    images: Arc<ImageService>,
    disks: Arc<crate::core::disks::DiskService>,
    /// Dependency steps running; the scratch storage goes when the last one ends.
    running_steps: std::sync::Mutex<usize>,
    sandboxes: Arc<SandboxService>,
    /// `<data>/builds`: `deps/<key>` names the cached dependency layer of each key.
    dir: PathBuf,
    /// `<local>/addon-build`, where build sandboxes' `/deps` is.
    local_dir: PathBuf,
    limits: SourceLimits,
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex_of(&h.finalize())
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes what is written, keeps nothing.
struct HashSink(Sha256);

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn source_error(e: SourceError) -> Error {
    match e {
        SourceError::TooLarge { .. } | SourceError::TooManyEntries { .. } => {
            Error::new(ErrorKind::Unprocessable, "source_too_large", e.to_string())
        }
        SourceError::Unsafe { .. } => {
            Error::new(ErrorKind::Invalid, "source_refused", e.to_string())
        }
        SourceError::Malformed(_) => Error::invalid(e.to_string()),
    }
}

fn step(step: &str, detail: String, bytes: Option<u64>, cached: bool) -> BuildStep {
    BuildStep {
        step: step.into(),
        detail,
        bytes,
        cached,
    }
}

impl BuildService {
    pub fn new(
        images: Arc<ImageService>,
        disks: Arc<crate::core::disks::DiskService>,
        sandboxes: Arc<SandboxService>,
        data_dir: PathBuf,
        local_dir: PathBuf,
    ) -> Arc<BuildService> {
        Arc::new(BuildService {
            images,
            disks,
            running_steps: std::sync::Mutex::new(0),
            sandboxes,
            dir: data_dir.join("builds"),
            local_dir: local_dir.join(BUILD_APP),
            limits: SourceLimits::default(),
        })
    }

    /// Removes what builds an earlier agent was killed in left: their build sandboxes, their
    /// output directories and the intermediate images the dependency steps ran on. Runs at
    /// start, before any build.
    pub async fn reconcile(&self) -> Result<(), Error> {
        for sandbox in self.sandboxes.list()? {
            if sandbox.app == BUILD_APP {
                info!(sandbox = %sandbox.name, "removing a build sandbox left by an interrupted build");
                self.sandboxes.delete(&sandbox.id).await?;
            }
        }
        if let Ok(entries) = fs::read_dir(&self.local_dir) {
            for entry in entries.flatten() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        self.disks.remove_local_storage_if_empty(BUILD_APP)?;
        for image in self.images.store().list()? {
            if image.reference.starts_with("miren.build/deps:") {
                self.images.store().remove(&image.reference)?;
            }
        }
        Ok(())
    }

    /// Reads and checks the uploaded source (blocking).
    pub fn receive(&self, input: &mut dyn Read) -> Result<SourceTree, Error> {
        let spool = self.images.store().spool_file()?;
        SourceTree::read(input, self.limits, spool).map_err(source_error)
    }

    /// The image for `req` from `tree`: found if built before, else built.
    pub async fn build(&self, req: BuildRequest, tree: SourceTree) -> Result<BuildResult, Error> {
        let tree = Arc::new(tree);
        let stack = match req.stack {
            Some(stack) => stack,
            None => stacks::detect(&tree, &req.command)?,
        };
        let def = stacks::def(stack);
        let base_ref = req.base.clone().unwrap_or_else(|| def.base.to_string());
        let mut steps = Vec::new();
        let (base, base_cached) = self.base_image(&base_ref).await?;
        steps.push(step(
            "base",
            format!("{base_ref} ({})", base.manifest_digest),
            None,
            base_cached,
        ));
        let cmd = if req.command.is_empty() {
            stacks::default_command(stack, &tree)
        } else {
            req.command.clone()
        };
        let source_digest = {
            let tree = tree.clone();
            blocking(move || {
                let mut sink = HashSink(Sha256::new());
                tree.write_layer("app", &mut sink)?;
                Ok(format!("sha256:{}", hex_of(&sink.0.finalize())))
            })
            .await?
        };
        let deps = self
            .dependencies(&req, def, &base, &tree, &mut steps)
            .await?;
        let key = sha256_hex(&[
            stack.name().as_bytes(),
            base.manifest_digest.as_bytes(),
            deps.as_ref().map_or(b"" as &[u8], |l| l.digest.as_bytes()),
            source_digest.as_bytes(),
            serde_json::to_string(&cmd).unwrap_or_default().as_bytes(),
            def.env.join("\n").as_bytes(),
        ]);
        let reference = format!("miren.build/{}-{}:{}", req.app, req.service, &key[..32]);
        let files = tree.len() as u64;
        let source_bytes = tree.bytes();
        let existing = self.images.store().get(&reference)?;
        let (image, cached) = match existing {
            Some(image) => {
                steps.push(step("source", source_digest.clone(), None, true));
                steps.push(step("image", image.manifest_digest.clone(), None, true));
                (image, true)
            }
            None => {
                let images = self.images.clone();
                let tree = tree.clone();
                let reference = reference.clone();
                let config = BuildConfig {
                    working_dir: "/app".into(),
                    cmd,
                    env: def.env.iter().map(|e| e.to_string()).collect(),
                };
                let deps = deps.clone();
                let (layer, image) = blocking(move || {
                    let store = images.store();
                    let layer = store.put_layer(|w| tree.write_layer("app", w))?;
                    let layers: Vec<_> = deps.into_iter().chain([layer.clone()]).collect();
                    let image = store.assemble(
                        &base,
                        &layers,
                        &config,
                        &reference,
                        "build:source".into(),
                    )?;
                    Ok((layer, image))
                })
                .await?;
                steps.push(step(
                    "source",
                    layer.digest.clone(),
                    Some(layer.size),
                    false,
                ));
                steps.push(step("image", image.manifest_digest.clone(), None, false));
                (image, false)
            }
        };
        info!(app = %req.app, service = %req.service, stack = %stack, image = %reference, digest = %image.manifest_digest, cached, "built from source");
        Ok(BuildResult {
            image: BuiltImage {
                service: req.service.to_string(),
                image: reference,
                digest: image.manifest_digest,
                stack: stack.name().into(),
            },
            base: base_ref,
            files,
            source_bytes,
            steps,
            cached,
        })
    }

    /// The base image, pulled if the node lacks it; true when it was already here.
    async fn base_image(&self, reference: &str) -> Result<(ImageRecord, bool), Error> {
        if let Some(record) = self.images.store().get(reference)? {
            return Ok((record, true));
        }
        self.images
            .pull(reference, None, None)
            .await
            .map_err(|e| e.with_context(format!("pulling the base image {reference}")))?;
        let record =
            self.images.store().get(reference)?.ok_or_else(|| {
                Error::internal(format!("{reference} vanished right after its pull"))
            })?;
        Ok((record, false))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, miren_runtime::Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("build task: {e}")))?
        .map_err(Error::from)
}

mod deps;
