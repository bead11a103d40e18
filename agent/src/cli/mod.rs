//! The `miren` command line. `miren agent` runs the daemon; everything else is a client of its
//! socket. Command names and flags are a contract with operators and scripts: keep them.

pub mod apps;
pub mod client;
pub mod images;
pub mod sandboxes;
pub mod snapshot;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use serde::Serialize;

use crate::cli::client::Client;
use crate::config::{self, AgentConfig};
use crate::model::{
    AcquireLease, AgentInfo, CreateDisk, CreateEndpoint, Disk, Endpoint, EndpointDeleted,
    FilesystemKind, Lease, NetGcReport, PublishPort, ReleaseResult, ResizeDisk,
};

#[derive(Parser, Debug)]
#[command(name = "miren", version, about = "miren node agent and CLI")]
pub struct Cli {
    /// The agent's Unix socket.
    #[arg(long, global = true, env = "MIREN_SOCKET", default_value = config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent in the foreground.
    Agent(AgentArgs),
    /// Disk backups: run on the node that has the disk.
    Disk {
        #[command(subcommand)]
        command: DiskBackupCommand,
    },
    /// Sandboxes: OCI containers, each run by its own supervisor.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// (internal) Run one sandbox's supervisor; started by the agent.
    #[command(hide = true)]
    Supervise {
        #[arg(
            long,
            required_unless_present = "sandboxes_dir",
            conflicts_with = "sandboxes_dir"
        )]
        state_dir: Option<PathBuf>,
        /// A spare: read the sandbox id (a directory under this one) from stdin first.
        #[arg(long)]
        sandboxes_dir: Option<PathBuf>,
    },
    /// (internal) Run a command inside a sandbox; started by the agent for `sandbox exec`.
    #[command(hide = true)]
    ExecIn {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// (internal) Hold a backup's freeze of a disk's filesystem; started by the agent. Thaws
    /// when stdin has a byte or reaches EOF (the agent died), or after --max-seconds (<= 600).
    #[command(hide = true)]
    FreezeHold {
        #[arg(long)]
        mount: PathBuf,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
        max_seconds: u64,
    },
    /// Deploy the app in DIR/.miren/app.toml: disks, addons, then its services.
    Deploy {
        /// The app's directory (holding .miren/app.toml).
        #[arg(short = 'C', long = "dir", default_value = ".")]
        dir: PathBuf,
        /// Forward a host port to a service: [SERVICE=][IP:]HOSTPORT:PORT (service `web` by
        /// default), e.g. web=8080:3000.
        #[arg(long, value_parser = parse_service_publish)]
        publish: Vec<crate::model::ServicePublish>,
        #[arg(long)]
        json: bool,
    },
    /// Managed addons (PostgreSQL) attached to apps.
    Addon {
        #[command(subcommand)]
        command: AddonCommand,
    },
    /// The environment an app's services get.
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// Deployed apps.
    App {
        #[command(subcommand)]
        command: AppCommand,
    },
    /// OCI images on this node.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Low-level commands for operators.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum AddonCommand {
    /// The addons this node offers.
    ListAvailable {
        #[arg(long)]
        json: bool,
    },
    /// An addon's variants and their defaults.
    Variants {
        addon: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach an addon to an app and wait until it is active: ADDON[:VARIANT], e.g.
    /// miren-postgresql:shared.
    Create {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        /// A major version from the catalogue (e.g. 16), or a full image reference.
        #[arg(long)]
        version: Option<String>,
        /// Return once recorded instead of waiting for `active`.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// An app's addons and their status.
    List {
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an addon and DELETE ITS DATA (asks on a terminal unless --yes).
    Destroy {
        addon: String,
        #[arg(short = 'a', long)]
        app: String,
        #[arg(short = 'y', long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Variables the app's services get (secrets masked unless --reveal).
    List {
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        reveal: bool,
        /// An object of names to values.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Status {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Recreate the app's services (with the addons' current variables).
    Restart { app: String },
    /// Remove the app's services; its disks and addons (and their data) stay.
    Delete { app: String },
}

fn parse_service_publish(s: &str) -> Result<crate::model::ServicePublish, String> {
    let (service, rest) = match s.split_once('=') {
        Some((service, rest)) => (service, rest),
        None => ("web", s),
    };
    miren_addons::validate_name(service).map_err(|e| format!("`{s}`: service: {e}"))?;
    let port = parse_publish(rest)?;
    Ok(crate::model::ServicePublish {
        service: service.to_string(),
        host_ip: port.host_ip,
        host_port: port.host_port,
        port: port.port,
    })
}

// Parsed once per process; boxing the big `run` arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Start a sandbox from an image and print its id.
    Run {
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        app: Option<String>,
        /// KEY=VALUE (repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Memory limit, e.g. 256M (default 512M).
        #[arg(long)]
        memory: Option<String>,
        /// CPUs, e.g. 0.5 (default 1).
        #[arg(long)]
        cpus: Option<f64>,
        /// Maximum number of tasks (default 1024).
        #[arg(long)]
        pids: Option<i64>,
        /// Size of the writable layer, the container's own root filesystem writes (default 1G).
        #[arg(long)]
        writable_size: Option<String>,
        /// NAME:/path[:ro] (repeatable): a disk, leased for the sandbox's life.
        #[arg(long)]
        disk: Vec<String>,
        #[arg(long, value_parser = parse_duration)]
        lease_timeout: Option<Duration>,
        /// Mount the app's local storage directory here.
        #[arg(long)]
        local_dir: Option<String>,
        /// A private tmpfs: /path[:size] (repeatable; default size 64M).
        #[arg(long)]
        tmpfs: Vec<String>,
        #[arg(long, value_parser = ["no", "on-failure", "always"])]
        restart: Option<String>,
        /// Publish a TCP port on the host: HOSTPORT:PORT (127.0.0.1) or IP:HOSTPORT:PORT.
        #[arg(long, value_parser = parse_publish)]
        publish: Vec<PublishPort>,
        #[arg(long)]
        json: bool,
        /// Command and arguments (default: the image's entrypoint and cmd).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List sandboxes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Status {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's output.
    Logs {
        sandbox: String,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a command inside a running sandbox.
    Exec {
        sandbox: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Wait until a sandbox is over (exited, no restart to come) and print its exit code.
    Wait {
        sandbox: String,
        /// Give up after this long (e.g. 30s, 5m); exits 1 then.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a sandbox: SIGTERM, a grace period, SIGKILL.
    Stop {
        sandbox: String,
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Stop a sandbox and remove everything it had.
    Delete { sandbox: String },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image (through the agent's mirrors), verifying every digest.
    Pull {
        reference: String,
        #[arg(long)]
        username: Option<String>,
        /// Read the registry password from stdin.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        #[arg(long)]
        json: bool,
    },
    /// List images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image (its blobs and layers go at the next gc).
    Rm { reference: String },
    /// Import an OCI image layout directory, an OCI archive, or a rootfs tarball.
    Import {
        reference: String,
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove blobs and unpacked layers no image uses.
    Gc,
}

#[derive(Subcommand, Debug)]
pub enum DiskBackupCommand {
    /// Write a consistent, compressed, checksummed snapshot of a disk.
    Backup {
        #[arg(short = 'n', long = "name")]
        name: String,
        /// Output file or directory; `-` for stdout. Default: NAME-YYYYMMDD-HHMMSS.miren.zst here.
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Recreate a disk from a snapshot (verified completely before anything changes).
    Restore {
        /// Snapshot file; `-` for stdin.
        #[arg(short = 's', long = "snapshot")]
        snapshot: String,
        /// Restore under this name instead of the one recorded in the snapshot.
        #[arg(short = 'n', long = "name")]
        name: Option<String>,
        /// Replace the contents of an existing disk (refused while it is leased).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check a whole snapshot (structure and every checksum) without restoring it.
    Verify {
        #[arg(short = 's', long = "snapshot")]
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_disk_backup(client: &Client, command: DiskBackupCommand) -> Result<()> {
    match command {
        DiskBackupCommand::Backup { name, output, json } => {
            crate::cli::snapshot::backup(client, &name, output.as_deref(), json).await
        }
        DiskBackupCommand::Restore {
            snapshot,
            name,
            force,
            json,
        } => crate::cli::snapshot::restore(client, &snapshot, name.as_deref(), force, json).await,
        DiskBackupCommand::Verify { snapshot, json } => {
            crate::cli::snapshot::verify(&snapshot, json)
        }
    }
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Where the agent keeps its state, disk images and mounts.
    #[arg(long, env = "MIREN_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Prefix of every kernel-visible name the agent makes (mounts, later bridges and cgroups).
    #[arg(long, env = "MIREN_NAME_PREFIX", default_value = config::DEFAULT_NAME_PREFIX)]
    pub name_prefix: String,
    /// Group (name or gid) whose members may use the socket besides root.
    #[arg(long, env = "MIREN_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// How often leases of holders that are gone are reclaimed, lost endpoints recreated and
    /// sandboxes whose supervisor was killed restarted per their policy (e.g. 30s, 1m).
    #[arg(long, env = "MIREN_RECLAIM_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reclaim_interval: Duration,
    /// Subnet sandboxes get their addresses from (the gateway is its first address).
    #[arg(long, env = "MIREN_SUBNET", default_value = crate::core::net::DEFAULT_SUBNET)]
    pub subnet: String,
    /// Runtime directory for state that ends with a reboot (network namespaces).
    #[arg(long, env = "MIREN_RUN_DIR", default_value = config::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Remove every endpoint, the bridge and the nftables tables of this agent, then exit.
    #[arg(long)]
    pub uninstall_network: bool,
    /// Fetch a registry's images from a mirror: REGISTRY=MIRROR (repeatable), e.g.
    /// docker.io=127.0.0.1:5123. The reference the user wrote is kept.
    #[arg(
        long = "image-mirror",
        env = "MIREN_IMAGE_MIRROR",
        value_delimiter = ','
    )]
    pub image_mirror: Vec<String>,
    /// Allow plain-HTTP mirrors that are not on loopback.
    #[arg(long, env = "MIREN_ALLOW_INSECURE_MIRRORS")]
    pub allow_insecure_mirrors: bool,
}

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Disks: loop-backed, thin-provisioned volumes with exclusive leases.
    Disk {
        #[command(subcommand)]
        command: DiskCommand,
    },
    /// Network endpoints: a netns, a veth on the agent's bridge, an address.
    Net {
        #[command(subcommand)]
        command: NetCommand,
    },
    /// Show which agent answers on the socket.
    Info,
}

#[derive(Subcommand, Debug)]
pub enum NetCommand {
    /// Create an endpoint and print it as JSON.
    Create {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        app: String,
        /// Other apps that may connect to this endpoint (comma-separated).
        #[arg(long, value_delimiter = ',')]
        allow_from: Vec<String>,
        /// Publish a TCP port on the host: HOSTPORT:PORT (127.0.0.1) or IP:HOSTPORT:PORT.
        #[arg(long, value_parser = parse_publish)]
        publish: Vec<PublishPort>,
    },
    /// List endpoints.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one endpoint.
    Status {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an endpoint and release its address.
    Delete {
        #[arg(long)]
        owner: String,
    },
    /// Run the reconciliation now and print what it released.
    Gc {
        #[arg(long)]
        json: bool,
    },
}

fn parse_publish(s: &str) -> Result<PublishPort, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{p}` in `{s}` is not a port (1-65535)"))
    };
    match parts.as_slice() {
        [host_port, port_in] => Ok(PublishPort {
            host_ip: None,
            host_port: port(host_port)?,
            port: port(port_in)?,
        }),
        [ip, host_port, port_in] => {
            ip.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("`{ip}` is not an IPv4 address"))?;
            Ok(PublishPort {
                host_ip: Some(ip.to_string()),
                host_port: port(host_port)?,
                port: port(port_in)?,
            })
        }
        _ => Err(format!(
            "`{s}`: write HOSTPORT:PORT or IP:HOSTPORT:PORT, e.g. 8080:80"
        )),
    }
}

#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct DiskRef {
    /// Disk id (disk_...).
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Disk name.
    #[arg(short = 'n', long = "name")]
    pub name: Option<String>,
}

impl DiskRef {
    fn path_segment(&self) -> Result<String> {
        match (&self.id, &self.name) {
            (Some(id), _) if id.starts_with("disk_") && id.len() < 64 => Ok(id.clone()),
            (Some(id), _) => bail!(
                "`{id}` is not a disk id (ids look like disk_1f0c9a7e5b3d2a41); use -n to refer to a disk by name"
            ),
            (None, Some(name)) => {
                miren_disks::validate_name(name)?;
                Ok(name.clone())
            }
            (None, None) => bail!("say which disk with -i ID or -n NAME"),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create, format and mount a disk.
    Create {
        #[arg(short = 'n', long = "name")]
        name: String,
        #[arg(long = "size-gb")]
        size_gb: u64,
        #[arg(long, value_enum, default_value = "ext4")]
        filesystem: FsArg,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        json: bool,
    },
    /// List disks and local storage.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one disk.
    Status {
        #[command(flatten)]
        disk: DiskRef,
        #[arg(long)]
        json: bool,
    },
    /// Grow a disk online.
    Resize {
        #[command(flatten)]
        disk: DiskRef,
        #[arg(long = "size-gb")]
        size_gb: u64,
        #[arg(long)]
        json: bool,
    },
    /// Unmount, detach and remove a disk and its data.
    Delete {
        #[command(flatten)]
        disk: DiskRef,
    },
    /// Acquire a disk's exclusive lease, waiting for the current holder.
    Lease {
        #[command(flatten)]
        disk: DiskRef,
        #[arg(long)]
        holder: String,
        /// How long to wait for the current holder (e.g. 30s, 5m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Release a disk's lease.
    LeaseRelease {
        #[command(flatten)]
        disk: DiskRef,
    },
    /// List leases.
    LeaseList {
        #[arg(long)]
        json: bool,
    },
    /// Make (or show) an app's local storage directory.
    Local {
        #[arg(short = 'a', long = "app")]
        app: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FsArg {
    Ext4,
    Xfs,
    Btrfs,
}

impl From<FsArg> for FilesystemKind {
    fn from(fs: FsArg) -> Self {
        match fs {
            FsArg::Ext4 => FilesystemKind::Ext4,
            FsArg::Xfs => FilesystemKind::Xfs,
            FsArg::Btrfs => FilesystemKind::Btrfs,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 30s, 5m or 1h"))
}

pub fn agent_config(args: &AgentArgs, socket: PathBuf) -> Result<AgentConfig> {
    config::validate_name_prefix(&args.name_prefix).map_err(anyhow::Error::msg)?;
    let socket_gid = match &args.socket_group {
        Some(group) => Some(config::resolve_group(group).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if args.reclaim_interval.is_zero() {
        bail!("--reclaim-interval must be longer than zero");
    }
    let data_dir = if args.data_dir.is_absolute() {
        args.data_dir.clone()
    } else {
        std::env::current_dir()?.join(&args.data_dir)
    };
    let absolute = |p: &PathBuf| -> Result<PathBuf> {
        Ok(if p.is_absolute() {
            p.clone()
        } else {
            std::env::current_dir()?.join(p)
        })
    };
    crate::core::net::net_config(&args.name_prefix, &args.subnet, &args.run_dir)
        .map_err(anyhow::Error::msg)?;
    miren_runtime::Mirrors::parse(&args.image_mirror, args.allow_insecure_mirrors)
        .map_err(|e| anyhow::anyhow!("--image-mirror: {e}"))?;
    Ok(AgentConfig {
        data_dir,
        socket,
        name_prefix: args.name_prefix.clone(),
        socket_gid,
        reclaim_interval: args.reclaim_interval,
        subnet: args.subnet.clone(),
        run_dir: absolute(&args.run_dir)?,
        image_mirrors: args.image_mirror.clone(),
        allow_insecure_mirrors: args.allow_insecure_mirrors,
    })
}

pub async fn run_debug(client: &Client, command: DebugCommand) -> Result<()> {
    match command {
        DebugCommand::Info => {
            let info: AgentInfo = client.get("/v1/info").await?;
            print_json(&info)
        }
        DebugCommand::Disk { command } => run_disk(client, command).await,
        DebugCommand::Net { command } => run_net(client, command).await,
    }
}

async fn run_net(client: &Client, command: NetCommand) -> Result<()> {
    match command {
        NetCommand::Create {
            owner,
            app,
            allow_from,
            publish,
        } => {
            let req = CreateEndpoint {
                owner,
                app,
                allow_from,
                publish,
            };
            let endpoint: Endpoint = client
                .call(Method::POST, "/v1/endpoints", Some(&req))
                .await?;
            print_json(&endpoint)
        }
        NetCommand::List { json } => {
            let endpoints: Vec<Endpoint> = client.get("/v1/endpoints").await?;
            if json {
                return print_json(&endpoints);
            }
            let rows = endpoints
                .iter()
                .map(|e| {
                    let publish: Vec<String> = e
                        .publish
                        .iter()
                        .map(|p| {
                            format!(
                                "{}:{}->{}",
                                p.host_ip.as_deref().unwrap_or("127.0.0.1"),
                                p.host_port,
                                p.port
                            )
                        })
                        .collect();
                    vec![
                        e.owner.clone(),
                        e.app.clone(),
                        e.ip.clone(),
                        e.veth.clone(),
                        e.status.clone(),
                        if e.allow_from.is_empty() {
                            "-".into()
                        } else {
                            e.allow_from.join(",")
                        },
                        if publish.is_empty() {
                            "-".into()
                        } else {
                            publish.join(",")
                        },
                    ]
                })
                .collect();
            print_table(
                &[
                    "OWNER",
                    "APP",
                    "IP",
                    "VETH",
                    "STATUS",
                    "ALLOW FROM",
                    "PUBLISH",
                ],
                rows,
            );
            Ok(())
        }
        NetCommand::Status { owner, json } => {
            let endpoint: Endpoint = client
                .get(&format!(
                    "/v1/endpoints/{}",
                    crate::util::percent_encode(&owner)
                ))
                .await?;
            if json {
                return print_json(&endpoint);
            }
            for (key, value) in [
                ("owner", endpoint.owner.clone()),
                ("app", endpoint.app.clone()),
                ("ip", endpoint.ip.clone()),
                ("gateway", endpoint.gateway.clone()),
                ("veth", endpoint.veth.clone()),
                ("netns", endpoint.netns_path.clone()),
                ("status", endpoint.status.clone()),
                ("allow from", endpoint.allow_from.join(",")),
            ] {
                println!("{:<11} {value}", format!("{key}:"));
            }
            Ok(())
        }
        NetCommand::Delete { owner } => {
            let deleted: EndpointDeleted = client
                .call(
                    Method::DELETE,
                    &format!("/v1/endpoints/{}", crate::util::percent_encode(&owner)),
                    None::<&()>,
                )
                .await?;
            if deleted.deleted {
                println!("deleted the endpoint of {owner}");
            } else {
                println!("{owner} had no endpoint; nothing to do");
            }
            Ok(())
        }
        NetCommand::Gc { json } => {
            let report: NetGcReport = client
                .call(Method::POST, "/v1/endpoints/gc", None::<&()>)
                .await?;
            if json {
                return print_json(&report);
            }
            let show = |what: &str, items: &[String]| {
                if items.is_empty() {
                    println!("{what}: nothing");
                } else {
                    println!("{what}: {}", items.join(", "));
                }
            };
            show("released", &report.released);
            show("removed", &report.removed);
            show("repaired", &report.repaired);
            if !report.failed.is_empty() {
                show("failed", &report.failed);
            }
            Ok(())
        }
    }
}

async fn run_disk(client: &Client, command: DiskCommand) -> Result<()> {
    match command {
        DiskCommand::Create {
            name,
            size_gb,
            filesystem,
            read_only,
            json,
        } => {
            // Checked here too, so a bad name fails before the agent is even asked.
            miren_disks::validate_name(&name)?;
            let req = CreateDisk {
                name,
                size_gb,
                filesystem: Some(filesystem.into()),
                read_only,
            };
            let disk: Disk = client.call(Method::POST, "/v1/disks", Some(&req)).await?;
            if json {
                print_json(&disk)
            } else {
                println!(
                    "created disk {} ({}), {} GiB {}, mounted at {}",
                    disk.name,
                    disk.id,
                    disk.size_gb.unwrap_or(0),
                    fs_name(&disk),
                    disk.mount_path.as_deref().unwrap_or("-")
                );
                Ok(())
            }
        }
        DiskCommand::List { json } => {
            let disks: Vec<Disk> = client.get("/v1/disks").await?;
            if json {
                print_json(&disks)
            } else {
                print_disks(&disks);
                Ok(())
            }
        }
        DiskCommand::Status { disk, json } => {
            let path = format!("/v1/disks/{}", disk.path_segment()?);
            let disk: Disk = client.get(&path).await?;
            if json {
                print_json(&disk)
            } else {
                print_disk(&disk);
                Ok(())
            }
        }
        DiskCommand::Resize {
            disk,
            size_gb,
            json,
        } => {
            let path = format!("/v1/disks/{}/resize", disk.path_segment()?);
            let disk: Disk = client
                .call(Method::POST, &path, Some(&ResizeDisk { size_gb }))
                .await?;
            if json {
                print_json(&disk)
            } else {
                println!(
                    "disk {} is now {} GiB",
                    disk.name,
                    disk.size_gb.unwrap_or(0)
                );
                Ok(())
            }
        }
        DiskCommand::Delete { disk } => {
            let segment = disk.path_segment()?;
            let _: () = client
                .call(Method::DELETE, &format!("/v1/disks/{segment}"), None::<&()>)
                .await?;
            println!("deleted disk {segment}");
            Ok(())
        }
        DiskCommand::Lease {
            disk,
            holder,
            timeout,
            json,
        } => {
            let path = format!("/v1/disks/{}/lease", disk.path_segment()?);
            let req = AcquireLease {
                holder,
                timeout_secs: Some(timeout.as_secs_f64()),
            };
            let lease: Lease = client.call(Method::POST, &path, Some(&req)).await?;
            if json {
                print_json(&lease)
            } else {
                println!(
                    "disk {} leased by {} since {}",
                    lease.disk, lease.holder, lease.acquired_at
                );
                Ok(())
            }
        }
        DiskCommand::LeaseRelease { disk } => {
            let path = format!("/v1/disks/{}/lease", disk.path_segment()?);
            let released: ReleaseResult = client.call(Method::DELETE, &path, None::<&()>).await?;
            match released.released_holder {
                Some(holder) => println!("released {}'s lease on disk {}", holder, released.disk),
                None => println!("disk {} was not leased", released.disk),
            }
            Ok(())
        }
        DiskCommand::LeaseList { json } => {
            let leases: Vec<Lease> = client.get("/v1/leases").await?;
            if json {
                return print_json(&leases);
            }
            let rows = leases
                .iter()
                .map(|l| {
                    vec![
                        l.disk.clone(),
                        l.disk_id.clone(),
                        l.holder.clone(),
                        l.acquired_at.clone(),
                    ]
                })
                .collect();
            print_table(&["DISK", "DISK ID", "HOLDER", "ACQUIRED"], rows);
            Ok(())
        }
        DiskCommand::Local { app, json } => {
            miren_disks::validate_name(&app)?;
            let path = format!("/v1/local-storage/{app}");
            let disk: Disk = client.call(Method::PUT, &path, None::<&()>).await?;
            if json {
                print_json(&disk)
            } else {
                println!(
                    "local storage of app {} at {}",
                    disk.name,
                    disk.mount_path.as_deref().unwrap_or("-")
                );
                Ok(())
            }
        }
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn fs_name(disk: &Disk) -> String {
    disk.filesystem
        .and_then(|f| serde_json::to_value(f).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

fn print_disks(disks: &[Disk]) {
    let rows = disks
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.name.clone(),
                d.provider.clone(),
                d.size_gb.map_or("-".into(), |s| format!("{s} GiB")),
                fs_name(d),
                d.status.clone(),
                human_bytes(d.allocated_bytes),
                d.device.clone().unwrap_or_else(|| "-".into()),
                d.lease.as_ref().map_or("-".into(), |l| l.holder.clone()),
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "NAME", "PROVIDER", "SIZE", "FS", "STATUS", "USED", "DEVICE", "LEASE",
        ],
        rows,
    );
}

fn print_disk(d: &Disk) {
    let lines = [
        ("id", d.id.clone()),
        ("name", d.name.clone()),
        ("provider", d.provider.clone()),
        ("size", d.size_gb.map_or("-".into(), |s| format!("{s} GiB"))),
        ("filesystem", fs_name(d)),
        ("read-only", d.read_only.to_string()),
        ("status", d.status.clone()),
        ("allocated", human_bytes(d.allocated_bytes)),
        ("image", d.image_path.clone().unwrap_or_else(|| "-".into())),
        ("device", d.device.clone().unwrap_or_else(|| "-".into())),
        (
            "mounted at",
            d.mount_path.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "lease",
            d.lease.as_ref().map_or("-".into(), |l| {
                format!("{} (since {})", l.holder, l.acquired_at)
            }),
        ),
        ("created", d.created_at.clone()),
    ];
    for (key, value) in lines {
        println!("{:<11} {value}", format!("{key}:"));
    }
    if let Some(error) = &d.error {
        println!("{:<11} {error}", "error:");
    }
}

pub(crate) fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_contract() {
        let cli = Cli::try_parse_from([
            "miren",
            "debug",
            "disk",
            "lease",
            "-n",
            "d1",
            "--holder",
            "h",
            "--timeout",
            "30s",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Debug { command: DebugCommand::Disk { command: DiskCommand::Lease { timeout, .. } } }
                if timeout == Duration::from_secs(30)
        ));
        assert!(Cli::try_parse_from(["miren", "debug", "disk", "status"]).is_err());
        assert!(
            Cli::try_parse_from(["miren", "debug", "disk", "status", "-i", "x", "-n", "y"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "miren",
            "debug",
            "disk",
            "create",
            "-n",
            "a",
            "--size-gb",
            "-1"
        ])
        .is_err());
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
    }
}
