//! Pulling from OCI distribution registries through `oci-client`, with
//! every digest checked here as well.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use crate::digest::{sha256_digest, verify, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::mirrors::{normalize_registry, Endpoint, Mirrors};
use crate::oci::{
    parse_manifest, select_platform, Descriptor, Parsed, Platform, ACCEPTED_MANIFESTS,
};
use crate::store::{normalize_reference, ImageRecord, ImageStore, MAX_JSON_BLOB};

/// Bytes done for one blob; `total` is the descriptor's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub digest: String,
    pub done: u64,
    pub total: u64,
}

/// Called as blobs download (the CLI draws bars from it).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Username and password per registry host (the host actually contacted,
/// so a mirror's own credentials go under the mirror's host).
#[derive(Clone, Default)]
pub struct Credentials(BTreeMap<String, (String, String)>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish() // never the secrets
    }
}

impl Credentials {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, host: &str, user: &str, password: &str) {
        self.0.insert(
            normalize_registry(host),
            (user.to_string(), password.to_string()),
        );
    }

    fn auth_for(&self, host: &str) -> RegistryAuth {
        match self.0.get(&normalize_registry(host)) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

#[derive(Clone)]
pub struct PullOptions {
    pub mirrors: Mirrors,
    pub credentials: Credentials,
    pub platform: Platform,
    pub progress: Option<ProgressFn>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            mirrors: Mirrors::default(),
            credentials: Credentials::default(),
            platform: Platform::current(),
            progress: None,
        }
    }
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("mirrors", &self.mirrors)
            .field("credentials", &self.credentials)
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

struct Remote {
    client: Client,
    auth: RegistryAuth,
    /// The reference as fetched (mirror host), not as written.
    fetch: Reference,
    host: String,
}

impl Remote {
    fn err(&self, e: oci_client::errors::OciDistributionError) -> Error {
        Error::Registry {
            registry: self.host.clone(),
            source: Box::new(e),
        }
    }

    async fn manifest(&self, digest: Option<&str>) -> Result<(Vec<u8>, String)> {
        let r = match digest {
            Some(d) => self.fetch.clone_with_digest(d.to_string()),
            None => self.fetch.clone(),
        };
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&r, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.err(e))?;
        if bytes.len() as u64 > MAX_JSON_BLOB {
            return Err(Error::BadImage("manifest too large".into()));
        }
        // Our own check, whatever the client did: the digest is what
        // the bytes hash to, and must be the one asked for.
        let actual = sha256_digest(&bytes);
        if let Some(d) = r.digest() {
            verify(&format!("manifest {}", r.whole()), d, &actual)?;
        }
        Ok((bytes.to_vec(), actual))
    }

    async fn blob(
        &self,
        store: &ImageStore,
        d: &Descriptor,
        progress: Option<&ProgressFn>,
    ) -> Result<()> {
        let total = d.size()?;
        if store.has_blob(&d.digest, Some(total))? {
            if let Some(p) = progress {
                p(&Progress {
                    digest: d.digest.clone(),
                    done: total,
                    total,
                });
            }
            return Ok(());
        }
        let tmp = store.tmp_path("download");
        let res = async {
            let mut s = self
                .client
                .pull_blob_stream(&self.fetch, d.digest.as_str())
                .await
                .map_err(|e| self.err(e))?;
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .ctx(|| format!("create {}", tmp.display()))?;
            let mut h = Hasher::default();
            let mut done: u64 = 0;
            while let Some(chunk) = s.stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        // oci-client's own check fails the stream at its end;
                        // report that as the mismatch it is.
                        if done == total {
                            verify(
                                &format!("blob {}", d.digest),
                                &d.digest,
                                &h.clone().finish(),
                            )?;
                        }
                        return Err(crate::error::io_err(format!("download {}", d.digest), e));
                    }
                };
                done += chunk.len() as u64;
                if done > total {
                    return Err(Error::SizeMismatch {
                        what: d.digest.clone(),
                        expected: total,
                        actual: done,
                    });
                }
                h.update(&chunk);
                f.write_all(&chunk)
                    .await
                    .ctx(|| format!("write {}", tmp.display()))?;
                if let Some(p) = progress {
                    p(&Progress {
                        digest: d.digest.clone(),
                        done,
                        total,
                    });
                }
            }
            f.sync_all()
                .await
                .ctx(|| format!("fsync {}", tmp.display()))?;
            drop(f);
            if done != total {
                return Err(Error::SizeMismatch {
                    what: d.digest.clone(),
                    expected: total,
                    actual: done,
                });
            }
            verify(&format!("blob {}", d.digest), &d.digest, &h.finish())?;
            store.commit_blob(&tmp, &d.digest)
        }
        .await;
        if res.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        res
    }
}

impl ImageStore {
    /// Pulls `reference` (`postgres:17`, `ghcr.io/org/app:v1`,
    /// `name@sha256:...`) and returns its record. Blobs and layers already
    /// in the store are not fetched or unpacked again.
    pub async fn pull(&self, reference: &str, opts: &PullOptions) -> Result<ImageRecord> {
        let r = normalize_reference(reference)?;
        let _lock = self.lock_shared_async().await?;
        let Endpoint { host, plain_http } = opts.mirrors.endpoint(r.registry());
        let fetch = match (r.tag(), r.digest()) {
            (_, Some(d)) => {
                Reference::with_digest(host.clone(), r.repository().to_string(), d.to_string())
            }
            (Some(t), None) => {
                Reference::with_tag(host.clone(), r.repository().to_string(), t.to_string())
            }
            (None, None) => Reference::with_tag(
                host.clone(),
                r.repository().to_string(),
                "latest".to_string(),
            ),
        };
        let client = Client::new(ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            ..Default::default()
        });
        let remote = Remote {
            client,
            auth: opts.credentials.auth_for(&host),
            fetch,
            host: host.clone(),
        };
        tracing::debug!(reference = %r.whole(), %host, plain_http, "pulling");

        let (mut bytes, mut digest) = remote.manifest(None).await?;
        let mut index_digest = None;
        let manifest = match parse_manifest(&bytes)? {
            Parsed::Manifest(m) => m,
            Parsed::Index(entries) => {
                let e = select_platform(&entries, &opts.platform)?;
                self.put_blob_bytes(&bytes, Some(&digest), "image index")?;
                index_digest = Some(digest);
                (bytes, digest) = remote.manifest(Some(&e.digest)).await?;
                verify("platform manifest", &e.digest, &digest)?;
                match parse_manifest(&bytes)? {
                    Parsed::Manifest(m) => m,
                    Parsed::Index(_) => {
                        return Err(Error::BadImage("index inside an index".into()))
                    }
                }
            }
        };
        self.put_blob_bytes(&bytes, Some(&digest), "manifest")?;
        remote.blob(self, &manifest.config, None).await?;
        // A few layers at a time, like docker's default of 3.
        // Owned descriptors: a closure over `&Descriptor` returning a future is higher-ranked,
        // and rustc then cannot prove the whole pull `Send` (the agent spawns it).
        let remote = &remote;
        let progress = opts.progress.as_ref();
        futures_util::stream::iter(manifest.layers.iter().cloned())
            .map(move |l| async move { remote.blob(self, &l, progress).await })
            .buffer_unordered(3)
            .try_collect::<Vec<()>>()
            .await?;
        let store = self.clone();
        let name = r.whole();
        let source = host;
        tokio::task::spawn_blocking(move || {
            store.finish_image(&name, &digest, index_digest, &manifest, source)
        })
        .await
        .map_err(|e| crate::error::io_err("unpack task", std::io::Error::other(e)))?
    }
}
