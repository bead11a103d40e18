//! Disk leases: one holder at a time, waited for, and reclaimed from holders that are gone.

use super::*;

impl DiskService {
    /// Acquires a disk's lease for `holder`, waiting up to `timeout` for the current holder.
    pub async fn acquire_lease(
        &self,
        id_or_name: &str,
        holder: &Holder,
        timeout: Duration,
    ) -> Result<Lease, Error> {
        let row = self.find(id_or_name)?;
        let (holder_pid, holder_start_time) = holder.pid_and_start();
        let wanted = LeaseRow {
            disk_id: row.id.clone(),
            holder: holder.as_str().to_string(),
            acquired_at: now_rfc3339(),
            holder_pid,
            holder_start_time,
        };
        let deadline = Instant::now() + timeout;
        loop {
            // Register interest before checking, so a release in between is not missed.
            let released = self.lease_released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.store.try_acquire_lease(&wanted)? {
                LeaseAttempt::Acquired(lease) => {
                    info!(disk = %row.name, holder = %lease.holder, "lease acquired");
                    return Ok(self.lease_view(&row, lease));
                }
                LeaseAttempt::HeldBy(current)
                    if !self.store.holder_exists(
                        &current.holder,
                        current.holder_pid,
                        current.holder_start_time,
                        owner::holder_is_gone,
                    ) =>
                {
                    self.reclaim(&row.name, &current)?;
                    continue;
                }
                LeaseAttempt::HeldBy(current) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::new(
                            crate::core::error::ErrorKind::Conflict,
                            "lease_timeout",
                            format!(
                                "disk `{}` is leased by `{}` (since {}); waited {} for it to be released. Stop that holder, release it with `miren debug disk lease-release -n {}`, or wait longer with --timeout",
                                row.name,
                                current.holder,
                                current.acquired_at,
                                humantime::format_duration(round_secs(timeout)),
                                row.name
                            ),
                        ));
                    }
                    // Wake on a release, and at least every second to notice a dead holder.
                    let wait = (deadline - now).min(Duration::from_secs(1));
                    let _ = tokio::time::timeout(wait, released).await;
                }
            }
        }
    }

    /// Wakes lease waiters after leases were released behind this service's back.
    pub fn notify_lease_released(&self) {
        self.lease_released.notify_waiters();
    }

    pub fn release_lease(&self, id_or_name: &str) -> Result<ReleaseResult, Error> {
        let row = self.find(id_or_name)?;
        let released = self.store.release_lease(&row.id, None)?;
        if let Some(holder) = &released {
            info!(disk = %row.name, holder = %holder, "lease released");
            self.lease_released.notify_waiters();
        }
        Ok(ReleaseResult {
            disk: row.name,
            released_holder: released,
        })
    }

    pub fn leases(&self) -> Result<Vec<Lease>, Error> {
        let names: std::collections::HashMap<String, DiskRow> = self
            .store
            .disks()?
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        Ok(self
            .store
            .leases()?
            .into_iter()
            .filter_map(|l| names.get(&l.disk_id).map(|d| self.lease_view(d, l)))
            .collect())
    }

    fn lease_view(&self, disk: &DiskRow, lease: LeaseRow) -> Lease {
        Lease {
            disk: disk.name.clone(),
            disk_id: disk.id.clone(),
            holder: lease.holder,
            acquired_at: lease.acquired_at,
        }
    }

    fn reclaim(&self, disk_name: &str, lease: &LeaseRow) -> Result<(), Error> {
        if self
            .store
            .release_lease(&lease.disk_id, Some(&lease.holder))?
            .is_some()
        {
            warn!(disk = %disk_name, holder = %lease.holder, "reclaimed the lease of a holder that no longer exists");
            self.lease_released.notify_waiters();
        }
        Ok(())
    }

    /// Releases every lease whose holder is gone. Run at start and periodically.
    pub fn reclaim_dead_holders(&self) -> Result<usize, Error> {
        let mut reclaimed = 0;
        for lease in self.store.leases()? {
            if !self.store.holder_exists(
                &lease.holder,
                lease.holder_pid,
                lease.holder_start_time,
                owner::holder_is_gone,
            ) {
                let name = self
                    .store
                    .disk(&lease.disk_id)?
                    .map(|d| d.name)
                    .unwrap_or_else(|| lease.disk_id.clone());
                self.reclaim(&name, &lease)?;
                reclaimed += 1;
            }
        }
        Ok(reclaimed)
    }
}
