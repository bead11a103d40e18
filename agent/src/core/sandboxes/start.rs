//! Starting a sandbox: image, user, network endpoint, disk leases and mounts, then the
//! supervisor's launch, overlapped where the kernel allows.

use super::*;

impl SandboxService {
    pub(super) async fn start(
        &self,
        row: &SandboxRow,
        req: &SandboxRequest,
        timeline: &mut miren_sys::timeline::Timeline,
    ) -> Result<Option<String>, Error> {
        let record = match self.images.store().get(&req.image)? {
            Some(record) => record,
            None => {
                info!(image = %req.image, "pulling the image for a sandbox");
                self.images.pull(&req.image, None, None).await?;
                self.images.store().get(&req.image)?.ok_or_else(|| {
                    Error::internal(format!("{} vanished right after its pull", req.image))
                })?
            }
        };
        let mut layers = self.images.store().layer_dirs(&record)?;
        layers.reverse(); // overlayfs wants the top-most layer first
        let config = &record.config;
        let args: Vec<String> = config
            .entrypoint
            .iter()
            .chain(if req.cmd.is_empty() {
                &config.cmd
            } else {
                &req.cmd
            })
            .cloned()
            .collect();
        if args.is_empty() {
            return Err(Error::invalid(format!(
                "{} has no entrypoint or cmd; give the command after `--`",
                req.image
            )));
        }
        let base_env =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        let env = sandbox::merge_env([
            base_env.as_slice(),
            config.env.as_slice(),
            req.env.as_slice(),
        ]);
        let user = resolve_user(&config.user, &layers)?;
        timeline.mark("image");

        // The endpoint's address and netns path are known at once; its kernel side is made
        // while the supervisor prepares the sandbox, which waits for it before it creates
        // the container (`start_gate`).
        let reserved = self
            .net
            .reserve(EndpointRequest {
                owner: Holder::named(&row.id),
                app: row.app.clone(),
                allow_from: req.allow_from.clone(),
                publish: req.publish.clone(),
            })
            .await?;
        timeline.mark("reserve");
        let endpoint = reserved.endpoint.clone();
        let net = self.net.clone();
        let (netns_tx, netns_rx) = tokio::sync::oneshot::channel();
        let realized = tokio::spawn(async move { net.realize(reserved, Some(netns_tx)).await });
        let ip: std::net::Ipv4Addr = endpoint
            .ip
            .parse()
            .map_err(|_| Error::internal("endpoint without an address"))?;
        let hostname: String = row.name.chars().take(63).collect();

        let mut mounts = Vec::new();
        for DiskMount {
            disk,
            path,
            read_only,
        } in &req.disks
        {
            self.disks
                .acquire_lease(disk, &Holder::named(&row.id), req.lease_timeout)
                .await?;
            let view = self.disks.view_one(&self.disks.find(disk)?)?;
            let source = view.mount_path.ok_or_else(|| {
                Error::busy(format!(
                    "disk `{disk}` is not mounted; see `miren debug disk status -n {disk}`"
                ))
            })?;
            mounts.push(Mount::Bind {
                source: PathBuf::from(source),
                destination: path.clone(),
                read_only: *read_only || view.read_only,
            });
        }
        if let Some(path) = req.local_dir.clone() {
            let local = self.disks.ensure_local_storage(&row.app)?;
            mounts.push(Mount::Bind {
                source: PathBuf::from(local.mount_path.unwrap_or_default()),
                destination: path,
                read_only: false,
            });
        }
        for tmpfs in &req.tmpfs {
            mounts.push(Mount::Tmpfs {
                destination: tmpfs.path.clone(),
                size_bytes: Some(tmpfs.size_bytes),
            });
        }

        let spec = SandboxSpec {
            id: row.id.clone(),
            name: row.name.clone(),
            hostname: hostname.clone(),
            lower_dirs: layers,
            args,
            env,
            cwd: if config.working_dir.is_empty() {
                "/".into()
            } else {
                config.working_dir.clone()
            },
            user,
            mounts,
            resources: req.resources.clone(),
            netns: Some(PathBuf::from(&endpoint.netns_path)),
            hosts: Some(miren_netns::hosts_file(&hostname, ip, &[])),
            resolv_conf: Some(miren_netns::resolv_conf_from_host().content),
            restart: req.restart.clone(),
            logs: Default::default(),
            cgroup_prefix: self.cfg.name_prefix.clone(),
            stop_grace_ms: 10_000,
            start_gate: true,
            private_mounts: self.private_mounts.clone(),
        };
        timeline.mark("mounts");
        let state_dir = self.state_dir(&row.id);
        let spares = self.spares.clone();
        let launch = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            sandbox::create(&state_dir, &spec)?;
            spares.launch(&state_dir)
        })
        .await
        .map_err(|e| Error::internal(format!("starting the sandbox: {e}")))
        .and_then(|r| r);
        // The spare it took (if any) is replaced while this start goes on.
        self.replenish_spare();
        timeline.mark("supervisor");
        // The container is created as soon as its network namespace exists, while the
        // endpoint is completed; its process starts once the endpoint is ready.
        // The namespace's sysfs, made with it, becomes the container's `/sys`: held until
        // the supervisor has cloned it (the start is over).
        let mut sysfs = None;
        let launch = match (launch, netns_rx.await) {
            (Ok(mut launch), Ok(made)) => {
                sysfs = made;
                launch.allow_create(sysfs.as_ref().map(|s| s.proc_path()).as_deref());
                Ok(launch)
            }
            (launch, _) => launch,
        };
        timeline.mark("netns");
        let network = realized
            .await
            .map_err(|e| Error::internal(format!("creating the endpoint: {e}")))
            .and_then(|r| r);
        let launch = launch?;
        timeline.mark("endpoint");
        let started = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            if let Err(err) = network {
                launch.cancel();
                return Err(err);
            }
            let started = launch.open_gate();
            drop(sysfs);
            started.map_err(|e| {
                Error::new(
                    crate::core::error::ErrorKind::Unprocessable,
                    "start_failed",
                    format!("the sandbox did not start: {e}"),
                )
            })
        })
        .await
        .map_err(|e| Error::internal(format!("starting the sandbox: {e}")))??;
        timeline.mark("container");
        Ok(started.start_steps)
    }
}

/// Resolves the image's `user` (a name, uid, or uid:gid) against its layers' /etc/passwd.
fn resolve_user(user: &str, layers_top_first: &[PathBuf]) -> Result<User, Error> {
    if user.is_empty() {
        return Ok(User::default());
    }
    if let Ok(parsed) = user.parse::<User>() {
        return Ok(parsed);
    }
    let (name, group) = user.split_once(':').unwrap_or((user, ""));
    let passwd = layers_top_first
        .iter()
        .map(|l| l.join("etc/passwd"))
        .find(|p| p.exists())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name) && f.len() > 3)
        .ok_or_else(|| {
            Error::invalid(format!(
                "the image's user `{name}` is not in its /etc/passwd"
            ))
        })?;
    let uid = entry[2].parse().unwrap_or(0);
    let gid = if group.is_empty() {
        entry[3].parse().unwrap_or(0)
    } else {
        group.parse().unwrap_or(0)
    };
    Ok(User { uid, gid })
}
