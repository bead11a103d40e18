//! `miren agent`: the daemon's flags, checked into an `AgentConfig`, and its runtime.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::cli::parse::parse_duration;
use crate::config::{self, AgentConfig};

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
    /// Remove every endpoint, the gateway link and the nftables table of this agent, then exit.
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
    /// A place backups and archives can go: NAME=/dir, NAME=file:///dir or
    /// NAME=s3://BUCKET[/PREFIX][?endpoint=URL&region=R&credentials=/root-only/file]
    /// (repeatable). S3 credentials come from that file or the agent's AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, never from this flag. `local` (DATA_DIR/backups) always exists.
    #[arg(
        long = "backup-target",
        env = "MIREN_BACKUP_TARGETS",
        value_delimiter = ','
    )]
    pub backup_target: Vec<crate::core::targets::TargetSpec>,
    /// The target continuous archives and addon backups go to (default: the first
    /// --backup-target, else `local`).
    #[arg(long, env = "MIREN_DEFAULT_BACKUP_TARGET")]
    pub default_backup_target: Option<String>,
    /// How far back a PostgreSQL point-in-time restore reaches (older WAL is pruned).
    #[arg(long, env = "MIREN_PG_PITR_RETENTION", default_value = "7days", value_parser = parse_duration)]
    pub pg_pitr_retention: Duration,
    /// How long PostgreSQL base backups are kept (the newest always is).
    #[arg(long, env = "MIREN_PG_BASE_BACKUP_RETENTION", default_value = "30days", value_parser = parse_duration)]
    pub pg_base_backup_retention: Duration,
    /// How often each PostgreSQL server gets a base backup (and one right after it is made).
    #[arg(long, env = "MIREN_PG_BASE_BACKUP_INTERVAL", default_value = "1day", value_parser = parse_duration)]
    pub pg_base_backup_interval: Duration,
}

pub fn agent_config(args: &AgentArgs, socket: PathBuf) -> Result<AgentConfig> {
    config::validate_name_prefix(&args.name_prefix).map_err(anyhow::Error::msg)?;
    let socket_gid = match &args.socket_group {
        Some(group) => Some(config::resolve_group(group).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if args.pg_base_backup_interval.is_zero() {
        bail!("--pg-base-backup-interval must be longer than zero");
    }
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
        backup_targets: args.backup_target.clone(),
        default_backup_target: args.default_backup_target.clone(),
        pitr: crate::core::addons::postgres::archive::PitrSettings {
            retention: args.pg_pitr_retention,
            base_retention: args.pg_base_backup_retention,
            base_interval: args.pg_base_backup_interval,
        },
    })
}

pub(crate) fn run(args: &AgentArgs, socket: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = agent_config(args, socket)?;
    // glibc gives each thread that allocates its own arena (up to 8 per core); with the
    // runtime's workers and blocking threads taking turns, freed memory stayed spread over
    // them and the agent's RSS grew with every sandbox started (docs/sandbox.md "Cost").
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.uninstall_network {
        return runtime.block_on(crate::server::uninstall_network(cfg));
    }
    runtime.block_on(crate::server::run(cfg))
}
