//! The dependency step: a stack's package manager run in a build sandbox on the base image
//! (plus the source at `/app`), with the same confinement and network as an app's sandbox; what
//! it leaves in `$DEPS` becomes a layer at `/app/<into>`, cached by (stack, base digest,
//! lockfile and manifest contents).

use super::*;
use crate::core::owner::Owner;

use miren_runtime::LayerInfo;

impl BuildService {
    pub(super) async fn dependencies(
        &self,
        req: &BuildRequest,
        def: &'static stacks::StackDef,
        base: &ImageRecord,
        tree: &Arc<SourceTree>,
        steps: &mut Vec<BuildStep>,
    ) -> Result<Option<LayerInfo>, Error> {
        let Some(dep) = def
            .deps
            .iter()
            .find(|d| d.when.iter().any(|f| tree.is_file(f)))
        else {
            return Ok(None);
        };
        let mut parts: Vec<Vec<u8>> = vec![
            def.stack.name().as_bytes().to_vec(),
            base.manifest_digest.as_bytes().to_vec(),
            dep.script.as_bytes().to_vec(),
        ];
        let mut keyed = Vec::new();
        for name in dep.when.iter().chain(dep.inputs) {
            if tree.is_file(name) {
                let bytes = tree.read_file(name, MAX_KEY_FILE)?.ok_or_else(|| {
                    Error::invalid(format!(
                        "{name} is larger than {} MiB; is it really a lockfile?",
                        MAX_KEY_FILE >> 20
                    ))
                })?;
                parts.push(name.as_bytes().to_vec());
                parts.push(bytes);
                keyed.push(*name);
            }
        }
        // Vendored wheels are inputs too.
        for name in tree.names().filter(|n| n.starts_with("wheels/")) {
            if let Some(bytes) = tree.read_file(name, MAX_KEY_FILE)? {
                parts.push(name.as_bytes().to_vec());
                parts.push(bytes);
            }
        }
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let key = sha256_hex(&refs);
        let record = self.dir.join("deps").join(&key);
        if let Ok(digest) = fs::read_to_string(&record) {
            if let Some(layer) = self.images.store().stored_layer(digest.trim())? {
                steps.push(step(
                    "dependencies",
                    format!(
                        "{} (keyed by {})",
                        first_words(dep.script),
                        keyed.join(", ")
                    ),
                    Some(layer.size),
                    true,
                ));
                return Ok(Some(layer));
            }
        }
        info!(app = %req.app, service = %req.service, key = %key, "running the dependency step");
        let layer = self.run_step(req, dep, base, tree, &key).await?;
        fs::create_dir_all(self.dir.join("deps"))
            .map_err(|e| Error::internal(format!("creating {}: {e}", self.dir.display())))?;
        write_atomically(&record, layer.digest.as_bytes())?;
        steps.push(step(
            "dependencies",
            format!(
                "{} (keyed by {})",
                first_words(dep.script),
                keyed.join(", ")
            ),
            Some(layer.size),
            false,
        ));
        Ok(Some(layer))
    }

    async fn run_step(
        &self,
        req: &BuildRequest,
        dep: &'static stacks::DependencyStep,
        base: &ImageRecord,
        tree: &Arc<SourceTree>,
        key: &str,
    ) -> Result<LayerInfo, Error> {
        // The base plus the source, for the step to run on; forgotten afterwards.
        let pre_ref = format!("miren.build/deps:{}", &key[..32]);
        {
            let images = self.images.clone();
            let tree = tree.clone();
            let base = base.clone();
            let pre_ref = pre_ref.clone();
            blocking(move || {
                let store = images.store();
                let layer = store.put_layer(|w| tree.write_layer("app", w))?;
                store.assemble(
                    &base,
                    &[layer],
                    &BuildConfig {
                        working_dir: "/app".into(),
                        ..Default::default()
                    },
                    &pre_ref,
                    "build:dependencies".into(),
                )?;
                Ok(())
            })
            .await?;
        }
        let out = self.local_dir.join(key);
        let _ = fs::remove_dir_all(&out);
        *self.running_steps.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let result = self.run_sandbox(req, dep, &pre_ref, key).await;
        let layer = match result {
            Ok(()) => {
                let images = self.images.clone();
                let out = out.clone();
                let into = format!("app/{}", dep.into);
                blocking(move || {
                    images.store().put_layer(|w| {
                        let mut b = tar::Builder::new(w);
                        b.follow_symlinks(false);
                        b.mode(tar::HeaderMode::Deterministic);
                        b.append_dir_all(&into, &out)
                            .map_err(|e| miren_runtime::Error::Io {
                                context: format!("tar {}", out.display()),
                                source: e,
                            })?;
                        b.finish().map_err(|e| miren_runtime::Error::Io {
                            context: "finish the dependency layer".into(),
                            source: e,
                        })
                    })
                })
                .await
            }
            Err(e) => Err(e),
        };
        let _ = fs::remove_dir_all(&out);
        let _ = self.images.store().remove(&pre_ref);
        {
            let mut running = self.running_steps.lock().unwrap_or_else(|e| e.into_inner());
            *running -= 1;
            if *running == 0 {
                let _ = self.disks.remove_local_storage_if_empty(BUILD_APP);
            }
        }
        layer
    }

    async fn run_sandbox(
        &self,
        req: &BuildRequest,
        dep: &'static stacks::DependencyStep,
        image: &str,
        key: &str,
    ) -> Result<(), Error> {
        let mut run = SandboxRequest::new(image);
        run.app =
            Some(Name::new(BUILD_APP).map_err(|e| Error::internal(format!("{BUILD_APP}: {e}")))?);
        run.local_dir = Some("/deps".into());
        run.env = vec![format!("DEPS=/deps/{key}"), "HOME=/tmp".into()];
        run.resources.memory_bytes = Some(BUILD_MEMORY);
        run.resources.writable_bytes = Some(4 << 30);
        run.cmd = vec![
            "sh".into(),
            "-c".into(),
            format!("set -e; mkdir -p \"$DEPS\"; cd /app; {}", dep.script),
        ];
        // Owned by the agent's build app (each build sandbox a service of its own), so the
        // reserved name is the agent's to use and no user sandbox can take it.
        let owner = Owner::service(BUILD_APP, &crate::util::new_id("deps"));
        let sandbox = self.sandboxes.run_request(run, Some(owner)).await?;
        let waited = self.sandboxes.wait(&sandbox.id, Some(DEPS_TIMEOUT)).await;
        let logs = log_tail(&self.sandboxes, &sandbox.id, 20);
        let _ = self.sandboxes.delete(&sandbox.id).await;
        let waited = waited?;
        match waited.exit_code {
            Some(0) => Ok(()),
            code => Err(Error::new(
                ErrorKind::Unprocessable,
                "build_failed",
                format!(
                    "services.{}: the dependency step `{}` failed (exit {}); its last output:\n{}",
                    req.service,
                    first_words(dep.script),
                    code.map_or("unknown".into(), |c| c.to_string()),
                    logs
                ),
            )),
        }
    }
}

/// The package manager's command in a step's script, for messages.
fn first_words(script: &str) -> &str {
    ["bun install", "npm ci", "pip install"]
        .into_iter()
        .find(|w| script.contains(w))
        .unwrap_or("dependency step")
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| Error::internal(format!("recording {}: {e}", path.display())))
}

/// The last `n` lines the sandbox wrote (stdout, then stderr), for a failure's message.
fn log_tail(sandboxes: &SandboxService, id: &str, n: usize) -> String {
    let Ok((stdout, stderr)) = sandboxes.log_files(id) else {
        return String::new();
    };
    let mut lines: Vec<String> = Vec::new();
    for file in stdout.iter().chain(stderr.iter()) {
        if let Ok(text) = fs::read(file) {
            lines.extend(String::from_utf8_lossy(&text).lines().map(str::to_string));
        }
    }
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}
