//! Network namespaces made ahead of need.
//!
//! Making a namespace (`unshare(CLONE_NEWNET)`: the kernel sets up every per-namespace
//! subsystem) takes one to three milliseconds, more the busier the node, and a sandbox's
//! container cannot be created before its namespace exists. The pool keeps a few made in
//! the background, held only by open files ([`UnboundNetns`]): an endpoint takes one and
//! binds it at its path, which is a single bind mount. A spare is named nowhere on the host,
//! so a crash or kill of its holder frees it with nothing to clean up.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::nsfs::{ensure_netns, is_netns_mount, NetnsSysfs, UnboundNetns};
use crate::Result;

#[derive(Debug)]
pub struct NetnsPool {
    spares: Mutex<Vec<UnboundNetns>>,
    size: usize,
    filling: AtomicBool,
}

impl NetnsPool {
    /// A pool that keeps `size` spares once [`NetnsPool::fill`] has run.
    pub fn new(size: usize) -> Arc<NetnsPool> {
        Arc::new(NetnsPool {
            spares: Mutex::new(Vec::with_capacity(size)),
            size,
            filling: AtomicBool::new(false),
        })
    }

    /// How many spares are ready.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<UnboundNetns>> {
        // A panic while holding the lock cannot leave the vector half-changed.
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes spares until the pool holds its size. One fill runs at a time; a call while
    /// another runs returns at once.
    pub async fn fill(&self) -> Result<()> {
        if self.filling.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let filled = async {
            while self.ready() < self.size {
                let spare = UnboundNetns::new().await?;
                self.lock().push(spare);
            }
            Ok(())
        }
        .await;
        self.filling.store(false, Ordering::Release);
        filled
    }

    /// Makes `path` a bound network namespace: leaves one that is there, binds a spare if
    /// one is ready, makes one otherwise; then tops the pool up in the background. Gives the
    /// spare's sysfs when a spare was bound (and the kernel let it make one).
    pub async fn ensure_at(self: &Arc<Self>, path: &Path) -> Result<Option<NetnsSysfs>> {
        if is_netns_mount(path) {
            return Ok(None);
        }
        let spare = self.lock().pop();
        let sysfs = match spare {
            Some(spare) => {
                let target = path.to_path_buf();
                tokio::task::spawn_blocking(move || spare.bind_at(&target))
                    .await
                    .map_err(|_| {
                        crate::Error::ThreadPanicked("binding a network namespace".into())
                    })??
            }
            None => {
                ensure_netns(path).await?;
                None
            }
        };
        let pool = self.clone();
        tokio::spawn(async move {
            // A spare that could not be made now is made by the next start's top-up, or
            // that start makes its namespace itself.
            let _ = pool.fill().await;
        });
        Ok(sysfs)
    }
}
