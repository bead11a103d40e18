//! Network endpoints as the agent manages them: addresses come from an IPAM in the state
//! store, kernel objects from `miren_netns`. As with disks, intent is recorded first, the
//! kernel changed next, the outcome recorded last; `gc` finishes or undoes what a crash cut
//! short and removes whatever the kernel has that no endpoint owns.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use miren_netns::{self as netns, EndpointSpec, NetConfig, PublishedPort, Subnet};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::core::error::Error;
use crate::core::owner::Holder;
use crate::model::{CreateEndpoint, Endpoint, EndpointDeleted, NetGcReport, PublishPort};
use crate::store::{EndpointRow, EndpointStatus, Store};
use crate::util::now_rfc3339;

pub const DEFAULT_SUBNET: &str = "10.117.0.0/16";

/// An endpoint recorded with its address (see [`NetService::reserve`]): nothing exists in the
/// kernel yet, and other endpoint changes wait until it is passed to [`NetService::realize`]
/// (or dropped).
pub struct ReservedEndpoint {
    /// What the endpoint will be: address, gateway, netns path.
    pub endpoint: Endpoint,
    row: EndpointRow,
    /// Already complete (a retried create).
    made: bool,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// Spare network namespaces kept: starts come one at a time or a few at once, and a spare
/// is made again in 1-3 ms; a start that finds none makes its own.
const SPARE_NETNS: usize = 2;

pub struct NetService {
    cfg: NetConfig,
    store: Arc<Store>,
    /// Endpoint changes are serialized: each ends with an atomic rules change (its own
    /// elements, or a full apply at start, gc and on errors), and two racing would let the
    /// older state win.
    lock: Arc<Mutex<()>>,
    /// Set when removing a deleted endpoint's rules failed: a background full apply follows.
    rules_stale: tokio::sync::Notify,
    /// Network namespaces made ahead, so that a start binds one instead of waiting while
    /// the kernel makes it (the container's creation waits for its namespace).
    netns_pool: Arc<netns::NetnsPool>,
}

impl From<netns::Error> for Error {
    fn from(err: netns::Error) -> Self {
        match err {
            netns::Error::SubnetExhausted { .. } => Error::new(
                crate::core::error::ErrorKind::NoSpace,
                "subnet_exhausted",
                err.to_string(),
            ),
            netns::Error::InvalidEndpoint(_) | netns::Error::InvalidSubnet(_) => {
                Error::invalid(err.to_string())
            }
            netns::Error::PublishRefused(ref refused) if refused.is_conflict() => {
                Error::conflict(err.to_string())
            }
            netns::Error::PublishRefused(_) => Error::invalid(err.to_string()),
            _ => Error::internal(format!("network: {err}")),
        }
    }
}

pub fn net_config(
    prefix: &str,
    subnet: &str,
    run_dir: &std::path::Path,
) -> Result<NetConfig, String> {
    let subnet: Subnet = subnet
        .parse()
        .map_err(|e| format!("--subnet `{subnet}`: {e}"))?;
    NetConfig::new(prefix, subnet, netns_dir(run_dir)).map_err(|e| e.to_string())
}

/// Where the endpoints' netns files are (bind mounts of their namespaces).
pub fn netns_dir(run_dir: &std::path::Path) -> std::path::PathBuf {
    run_dir.join("netns")
}

fn validate_owner(owner: &str) -> Result<(), Error> {
    let ok = !owner.is_empty()
        && owner.len() <= 128
        && owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if !ok {
        return Err(Error::invalid(format!(
            "owner `{owner}` is invalid: use 1-128 letters, digits, `.`, `_`, `:` or `-` (a sandbox id, or pid:N)"
        )));
    }
    Ok(())
}

fn validate_app(what: &str, app: &str) -> Result<(), Error> {
    miren_disks::validate_name(app).map_err(|e| {
        Error::invalid(format!(
            "{what}: {}",
            e.to_string().replace("disk name", "app name")
        ))
    })
}

/// An endpoint as core asks for it: owner parsed, published ports typed.
#[derive(Debug, Clone)]
pub struct EndpointRequest {
    pub owner: Holder,
    pub app: String,
    pub allow_from: Vec<String>,
    pub publish: Vec<PublishedPort>,
}

impl EndpointRequest {
    /// The API's request, checked and parsed.
    pub fn from_api(req: &CreateEndpoint) -> Result<EndpointRequest, Error> {
        validate_owner(&req.owner)?;
        validate_app("app", &req.app)?;
        for app in &req.allow_from {
            validate_app("allow_from", app)?;
        }
        let publish = req
            .publish
            .iter()
            .map(published_port)
            .collect::<Result<_, _>>()?;
        Ok(EndpointRequest {
            owner: Holder::parse(&req.owner)?,
            app: req.app.clone(),
            allow_from: req.allow_from.clone(),
            publish,
        })
    }
}

/// A port to publish as the API writes it, typed (the host address defaults to loopback).
pub fn published_port(p: &PublishPort) -> Result<PublishedPort, Error> {
    let host_ip: Ipv4Addr = p
        .host_ip
        .as_deref()
        .unwrap_or("127.0.0.1")
        .parse()
        .map_err(|_| {
            Error::invalid(format!(
                "publish host_ip `{}` is not an IPv4 address (IPv6 is not published): use 127.0.0.1 (the default), 0.0.0.0 or an IPv4 address of a host interface",
                p.host_ip.as_deref().unwrap_or_default()
            ))
        })?;
    Ok(PublishedPort {
        host_ip,
        host_port: p.host_port,
        endpoint_port: p.port,
    })
}

fn publish_key(p: &PublishedPort) -> String {
    format!("{}:{}:{}", p.host_ip, p.host_port, p.endpoint_port)
}

fn parse_publish_key(s: &str) -> Option<PublishedPort> {
    let mut parts = s.rsplitn(3, ':');
    let endpoint_port = parts.next()?.parse().ok()?;
    let host_port = parts.next()?.parse().ok()?;
    let host_ip = parts.next()?.parse().ok()?;
    Some(PublishedPort {
        host_ip,
        host_port,
        endpoint_port,
    })
}

fn spec_of(row: &EndpointRow) -> EndpointSpec {
    let mut spec = EndpointSpec::new(row.owner.clone(), row.app.clone(), row.ip);
    spec.allow_from = row.allow_from.clone();
    spec.publish = row
        .publish
        .iter()
        .filter_map(|p| parse_publish_key(p))
        .collect();
    spec
}

impl NetService {
    /// Makes sure the bridge and the agent's nftables tables exist, then returns the service
    /// with its background rules applier running.
    pub async fn start(cfg: NetConfig, store: Arc<Store>) -> Result<Arc<NetService>, Error> {
        netns::ensure_bridge_and_table(&cfg).await?;
        let resolv = netns::resolv_conf_from_host();
        if let Some(warning) = resolv.warning {
            warn!("{warning}");
        }
        let service = Arc::new(NetService {
            cfg,
            store,
            lock: Arc::new(Mutex::new(())),
            rules_stale: tokio::sync::Notify::new(),
            netns_pool: netns::NetnsPool::new(SPARE_NETNS),
        });
        let pool = service.netns_pool.clone();
        tokio::spawn(async move {
            if let Err(e) = pool.fill().await {
                warn!(error = %e, "making spare network namespaces failed; starts make their own");
            }
        });
        // Lives as long as the agent, like the service itself.
        let applier = service.clone();
        tokio::spawn(async move {
            let service = applier;
            loop {
                service.rules_stale.notified().await;
                let _guard = service.lock.lock().await;
                if let Err(e) = service.apply().await {
                    warn!(error = %e, "applying network rules after deletes failed; gc retries");
                }
            }
        });
        Ok(service)
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    fn view(&self, row: &EndpointRow) -> Endpoint {
        let key = self.cfg.endpoint_key(&row.owner);
        Endpoint {
            owner: row.owner.clone(),
            app: row.app.clone(),
            ip: row.ip.to_string(),
            gateway: self.cfg.gateway().to_string(),
            netns_path: self.cfg.netns_path(&key).display().to_string(),
            veth: key,
            allow_from: row.allow_from.clone(),
            publish: row
                .publish
                .iter()
                .filter_map(|p| parse_publish_key(p))
                .map(|p| PublishPort {
                    host_ip: Some(p.host_ip.to_string()),
                    host_port: p.host_port,
                    port: p.endpoint_port,
                })
                .collect(),
            status: row.status,
            created_at: row.created_at.clone(),
        }
    }

    pub fn list(&self) -> Result<Vec<Endpoint>, Error> {
        Ok(self
            .store
            .endpoints()?
            .iter()
            .map(|r| self.view(r))
            .collect())
    }

    pub fn get(&self, owner: &str) -> Result<Endpoint, Error> {
        let row = self.store.endpoint(owner)?.ok_or_else(|| {
            Error::not_found(format!(
                "no endpoint for owner `{owner}`; `miren debug net list` shows them all"
            ))
        })?;
        Ok(self.view(&row))
    }

    /// Rules for every endpoint not being deleted, applied atomically.
    async fn apply(&self) -> Result<(), Error> {
        let specs: Vec<EndpointSpec> = self
            .store
            .endpoints()?
            .iter()
            .filter(|r| !r.status.is_going())
            .map(spec_of)
            .collect();
        netns::apply_rules(&self.cfg, &specs).await?;
        Ok(())
    }

    /// Admits one endpoint (or applies its new `allow_from`) with its own elements and
    /// chains: the cost does not grow with the number of endpoints. Anything unexpected in
    /// the tables (missing, an entry held by a leftover) falls back to the full apply, which
    /// rebuilds them from the store.
    async fn admit(&self, spec: &EndpointSpec) -> Result<(), Error> {
        if let Err(e) = netns::add_endpoint_rules(&self.cfg, spec).await {
            warn!(owner = %spec.owner, error = %e, "adding an endpoint's rules failed; applying all rules");
            self.apply().await?;
        }
        Ok(())
    }

    /// Every assignable address of the subnet once, starting after `last` (the last one
    /// handed out) and wrapping around.
    fn addresses_after(&self, last: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> {
        let subnet = self.cfg.subnet();
        let (first, end) = subnet.usable_range();
        let (first, end) = (u32::from(first), u32::from(end));
        let span = end - first + 1;
        let start = last
            .map(u32::from)
            .filter(|l| (first..=end).contains(l))
            .map_or(first, |l| if l == end { first } else { l + 1 });
        (0..span)
            .map(move |i| Ipv4Addr::from(first + (start - first + i) % span))
            .filter(move |ip| subnet.is_assignable(*ip))
    }

    pub async fn create(&self, req: &CreateEndpoint) -> Result<Endpoint, Error> {
        let reserved = self.reserve(EndpointRequest::from_api(req)?).await?;
        self.realize(reserved, None).await
    }

    /// The first half of [`Self::create`]: checks the request and records the endpoint as
    /// `creating` with its address, holding the endpoint lock until [`Self::realize`] made it, so
    /// a caller knows the address and netns path while the kernel work is still to come.
    pub async fn reserve(&self, req: EndpointRequest) -> Result<ReservedEndpoint, Error> {
        validate_app("app", &req.app)?;
        for app in &req.allow_from {
            validate_app("allow_from", app)?;
        }
        let publish = &req.publish;
        let (owner_pid, owner_start_time) = req.owner.pid_and_start();
        let guard = self.lock.clone().lock_owned().await;

        if let Some(existing) = self.store.endpoint(req.owner.as_str())? {
            let same = existing.app == req.app
                && existing.allow_from == req.allow_from
                && existing.publish == publish.iter().map(publish_key).collect::<Vec<_>>();
            if same && existing.status == EndpointStatus::Ready {
                // A retried create.
                return Ok(ReservedEndpoint {
                    endpoint: self.view(&existing),
                    row: existing,
                    made: true,
                    _guard: guard,
                });
            }
        }
        // Ranges, duplicates, host addresses only, no host listener: a DNAT anywhere else
        // would take traffic meant for a sandbox, another agent or a host service.
        netns::check_publish(&self.cfg, publish).await?;
        // Only a request that publishes reads every endpoint (a start stays O(1) otherwise).
        let others = if publish.is_empty() {
            Vec::new()
        } else {
            self.store.endpoints()?
        };
        for other in others {
            for p in other.publish.iter().filter_map(|p| parse_publish_key(p)) {
                if publish.iter().any(|q| netns::overlaps(q, &p)) {
                    return Err(Error::conflict(format!(
                        "host port {}:{} is already published by `{}`; pick another host port",
                        p.host_ip, p.host_port, other.owner
                    )));
                }
            }
        }
        let wanted = EndpointRow {
            owner: req.owner.as_str().to_string(),
            app: req.app.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            allow_from: req.allow_from.clone(),
            publish: publish.iter().map(publish_key).collect(),
            status: EndpointStatus::Creating,
            owner_pid,
            owner_start_time,
            created_at: now_rfc3339(),
        };
        let subnet_key = self.cfg.subnet().to_string();
        let row = self
            .store
            .insert_creating_endpoint(&wanted, &subnet_key, |last| self.addresses_after(last))?;
        Ok(ReservedEndpoint {
            endpoint: self.view(&row),
            row,
            made: false,
            _guard: guard,
        })
    }

    /// The second half of [`Self::create`]: netns, veth, address, routes, then the rules of
    /// every endpoint, then `ready`. On failure it removes what it made, and the row.
    /// `netns_ready` hears as soon as the network namespace exists (a container can be
    /// created in it while the rest is made).
    pub async fn realize(
        &self,
        reserved: ReservedEndpoint,
        netns_ready: Option<tokio::sync::oneshot::Sender<Option<netns::NetnsSysfs>>>,
    ) -> Result<Endpoint, Error> {
        if reserved.made {
            if let Some(tx) = netns_ready {
                let _ = tx.send(None);
            }
            return Ok(reserved.endpoint);
        }
        let row = &reserved.row;
        let mut steps = miren_sys::timeline::Timeline::start();
        let made = async {
            let path = std::path::Path::new(&reserved.endpoint.netns_path);
            let sysfs = self.netns_pool.ensure_at(path).await?;
            steps.mark("netns");
            if let Some(tx) = netns_ready {
                let _ = tx.send(sysfs);
            }
            let spec = spec_of(row);
            netns::create_endpoint(&self.cfg, &spec).await?;
            steps.mark("link");
            self.admit(&spec).await?;
            steps.mark("rules");
            Ok::<(), Error>(())
        }
        .await;
        if let Err(err) = made {
            warn!(owner = %row.owner, error = %err, "endpoint create failed; removing what it made");
            if netns::delete_endpoint(&self.cfg, &row.owner).await.is_ok() {
                self.store.remove_endpoint(&row.owner)?;
                let _ = self.apply().await;
            }
            return Err(err);
        }
        self.store
            .set_endpoint_status(&row.owner, EndpointStatus::Ready)?;
        steps.mark("row");
        info!(owner = %row.owner, app = %row.app, ip = %row.ip, ms = ?steps.to_string(), "endpoint created");
        let mut endpoint = reserved.endpoint;
        endpoint.status = EndpointStatus::Ready;
        Ok(endpoint)
    }

    /// Replaces the apps allowed to reach `owner`'s endpoint; the rules are applied before it
    /// returns, so an app removed here is refused from then on.
    pub async fn set_allow_from(&self, owner: &str, apps: &[String]) -> Result<(), Error> {
        for app in apps {
            validate_app("allow_from", app)?;
        }
        let _guard = self.lock.lock().await;
        let row = self
            .store
            .endpoint(owner)?
            .ok_or_else(|| Error::not_found(format!("no endpoint for owner `{owner}`")))?;
        if row.allow_from == apps {
            return Ok(());
        }
        self.store.set_endpoint_allow_from(owner, apps)?;
        let old = spec_of(&row);
        let mut spec = old.clone();
        spec.allow_from = apps.to_vec();
        if let Err(e) = netns::change_admission(&self.cfg, &old, &spec).await {
            warn!(owner = %owner, error = %e, "changing an endpoint's admission failed; applying all rules");
            self.apply().await?;
        }
        info!(owner = %owner, allow_from = ?apps, "endpoint admits new apps");
        Ok(())
    }

    /// A redeploy's switch: the ports `from` publishes stop and `to` publishes `publish`
    /// instead, in one nftables transaction (rows first: the full apply, the fallback here and
    /// at every gc, converges to them). Repeating it after it happened changes nothing.
    pub async fn switch_published(
        &self,
        from: &str,
        to: &str,
        publish: &[PublishedPort],
    ) -> Result<(), Error> {
        let _guard = self.lock.lock().await;
        let old = self
            .store
            .endpoint(from)?
            .ok_or_else(|| Error::not_found(format!("no endpoint for owner `{from}`")))?;
        let new = self
            .store
            .endpoint(to)?
            .ok_or_else(|| Error::not_found(format!("no endpoint for owner `{to}`")))?;
        let keys: Vec<String> = publish.iter().map(publish_key).collect();
        for other in self.store.endpoints()? {
            if other.owner == old.owner || other.owner == new.owner {
                continue;
            }
            for p in other.publish.iter().filter_map(|p| parse_publish_key(p)) {
                if publish.iter().any(|q| netns::overlaps(q, &p)) {
                    return Err(Error::conflict(format!(
                        "host port {}:{} is already published by `{}`; pick another host port",
                        p.host_ip, p.host_port, other.owner
                    )));
                }
            }
        }
        self.store.move_endpoint_publish(from, to, &keys)?;
        let mut to_spec = spec_of(&new);
        to_spec.publish = publish.to_vec();
        if let Err(e) = netns::switch_published(&self.cfg, &spec_of(&old), &to_spec).await {
            warn!(from = %from, to = %to, error = %e, "switching published ports failed; applying all rules");
            self.apply().await?;
        }
        info!(from = %from, to = %to, ports = publish.len(), "published ports switched");
        Ok(())
    }

    pub async fn delete(&self, owner: &str) -> Result<EndpointDeleted, Error> {
        let _guard = self.lock.lock().await;
        let Some(row) = self.store.endpoint(owner)? else {
            return Ok(EndpointDeleted {
                owner: owner.to_string(),
                deleted: false,
            });
        };
        self.remove(&row).await?;
        info!(owner = %row.owner, ip = %row.ip, "endpoint deleted");
        Ok(EndpointDeleted {
            owner: owner.to_string(),
            deleted: true,
        })
    }

    /// Rules first (from then on the endpoint's port is dropped and its address admits
    /// nothing), kernel objects next, the address last: an address is free only once nothing
    /// uses it. Removing the rules is a few elements and chains; if it fails, a full apply
    /// follows in the background (left entries for a freed address are refused by the next
    /// create's elements, which then falls back to a full apply too).
    async fn remove(&self, row: &EndpointRow) -> Result<(), Error> {
        self.store
            .set_endpoint_status(&row.owner, EndpointStatus::Deleting)?;
        if let Err(e) = netns::remove_endpoint_rules(&self.cfg, &spec_of(row)).await {
            warn!(owner = %row.owner, error = %e, "removing an endpoint's rules failed; applying all rules in the background");
            self.rules_stale.notify_one();
        }
        netns::delete_endpoint(&self.cfg, &row.owner).await?;
        self.store.remove_endpoint(&row.owner)?;
        Ok(())
    }

    /// Reconciliation: finishes or undoes interrupted creates and deletes, releases endpoints
    /// whose owner is gone, removes kernel objects no endpoint owns, recreates what the kernel
    /// lost, and re-applies the rules.
    pub async fn gc(&self) -> Result<NetGcReport, Error> {
        let _guard = self.lock.lock().await;
        netns::ensure_bridge_and_table(&self.cfg).await?;
        let mut report = NetGcReport::default();
        for row in self.store.endpoints()? {
            let interrupted = row.status.in_flight();
            let orphaned = !self.store.holder_exists(
                &row.owner,
                row.owner_pid,
                row.owner_start_time,
                crate::core::owner::holder_is_gone,
            );
            if interrupted || orphaned {
                self.store
                    .set_endpoint_status(&row.owner, EndpointStatus::Deleting)?;
                netns::delete_endpoint(&self.cfg, &row.owner).await?;
                self.store.remove_endpoint(&row.owner)?;
                let why = if orphaned {
                    "owner gone"
                } else {
                    "interrupted"
                };
                info!(owner = %row.owner, ip = %row.ip, why, "released endpoint");
                report.released.push(row.owner.clone());
            }
        }
        let rows = self.store.endpoints()?;
        let keys: HashSet<String> = rows
            .iter()
            .map(|r| self.cfg.endpoint_key(&r.owner))
            .collect();
        let kernel = netns::list_kernel_objects(&self.cfg).await?;
        for object in &kernel.endpoints {
            if !keys.contains(&object.key) {
                netns::delete_endpoint_by_key(&self.cfg, &object.key).await?;
                warn!(key = %object.key, owner = ?object.owner, "removed network objects no endpoint owns");
                report.removed.push(object.key.clone());
            }
        }
        // An older agent bridged endpoints: the rules for routed ones go in first, which pass
        // nothing from or to the bridge, so each endpoint is closed until it is made routed
        // below (never open under rules that do not know its veth).
        let bridged = kernel.endpoints.iter().filter(|o| o.bridged).count();
        if bridged > 0 {
            self.apply().await?;
            info!(bridged, "making an older agent's bridged endpoints routed");
        }
        for row in &rows {
            let key = self.cfg.endpoint_key(&row.owner);
            let whole = kernel
                .endpoints
                .iter()
                .any(|o| o.key == key && o.host_veth && o.netns_mounted && !o.bridged);
            if whole && row.status == EndpointStatus::Ready {
                continue;
            }
            match netns::create_endpoint(&self.cfg, &spec_of(row)).await {
                Ok(_) => {
                    self.store
                        .set_endpoint_status(&row.owner, EndpointStatus::Ready)?;
                    info!(owner = %row.owner, "recreated an endpoint the kernel had lost");
                    report.repaired.push(row.owner.clone());
                }
                Err(err) => {
                    warn!(owner = %row.owner, error = %err, "could not recreate endpoint");
                    self.store
                        .set_endpoint_status(&row.owner, EndpointStatus::Failed)?;
                    report.failed.push(row.owner.clone());
                }
            }
        }
        self.apply().await?;
        Ok(report)
    }

    /// `miren agent --uninstall-network`: every endpoint, the bridge and the tables.
    pub async fn uninstall(cfg: NetConfig, store: Arc<Store>) -> Result<usize, Error> {
        let rows = store.endpoints()?;
        for row in &rows {
            netns::delete_endpoint(&cfg, &row.owner).await?;
            store.remove_endpoint(&row.owner)?;
        }
        for object in netns::list_kernel_objects(&cfg).await?.endpoints {
            netns::delete_endpoint_by_key(&cfg, &object.key).await?;
        }
        netns::uninstall(&cfg).await?;
        Ok(rows.len())
    }
}
