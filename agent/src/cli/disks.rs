//! `miren debug disk ...`: loop-backed disks, their leases, and apps' local storage.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::cli::client::Client;
use crate::cli::output::{human_bytes, print_field, print_json, print_table};
use crate::cli::parse::parse_duration;
use crate::model::{AcquireLease, CreateDisk, Disk, FilesystemKind, ResizeDisk};

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
    /// The id or name the API takes, checked before the agent is asked.
    fn key(&self) -> Result<String> {
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

pub async fn run(client: &Client, command: DiskCommand) -> Result<()> {
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
            let disk = client.create_disk(&req).await?;
            if json {
                return print_json(&disk);
            }
            println!(
                "created disk {} ({}), {} GiB {}, mounted at {}",
                disk.name,
                disk.id,
                disk.size_gb.unwrap_or(0),
                fs_name(&disk),
                disk.mount_path.as_deref().unwrap_or("-")
            );
        }
        DiskCommand::List { json } => {
            let disks = client.disks().await?;
            if json {
                return print_json(&disks);
            }
            print_disks(&disks);
        }
        DiskCommand::Status { disk, json } => {
            let disk = client.disk(&disk.key()?).await?;
            if json {
                return print_json(&disk);
            }
            print_disk(&disk);
        }
        DiskCommand::Resize {
            disk,
            size_gb,
            json,
        } => {
            let disk = client
                .resize_disk(&disk.key()?, &ResizeDisk { size_gb })
                .await?;
            if json {
                return print_json(&disk);
            }
            println!(
                "disk {} is now {} GiB",
                disk.name,
                disk.size_gb.unwrap_or(0)
            );
        }
        DiskCommand::Delete { disk } => {
            let key = disk.key()?;
            client.delete_disk(&key).await?;
            println!("deleted disk {key}");
        }
        DiskCommand::Lease {
            disk,
            holder,
            timeout,
            json,
        } => {
            let req = AcquireLease {
                holder,
                timeout_secs: Some(timeout.as_secs_f64()),
            };
            let lease = client.acquire_lease(&disk.key()?, &req).await?;
            if json {
                return print_json(&lease);
            }
            println!(
                "disk {} leased by {} since {}",
                lease.disk, lease.holder, lease.acquired_at
            );
        }
        DiskCommand::LeaseRelease { disk } => {
            let released = client.release_lease(&disk.key()?).await?;
            match released.released_holder {
                Some(holder) => println!("released {}'s lease on disk {}", holder, released.disk),
                None => println!("disk {} was not leased", released.disk),
            }
        }
        DiskCommand::LeaseList { json } => {
            let leases = client.leases().await?;
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
        }
        DiskCommand::Local { app, json } => {
            miren_disks::validate_name(&app)?;
            let disk = client.local_storage(&app).await?;
            if json {
                return print_json(&disk);
            }
            println!(
                "local storage of app {} at {}",
                disk.name,
                disk.mount_path.as_deref().unwrap_or("-")
            );
        }
    }
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
        print_field(key, &value);
    }
    if let Some(error) = &d.error {
        print_field("error", error);
    }
}
