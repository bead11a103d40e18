//! Builds the OCI runtime spec for a sandbox: Docker-like defaults, tightened for this host.

use std::path::Path;

use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use super::cgroup;
use super::{Mount, SandboxError, SandboxSpec};

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Syscalls that fail with EPERM. Default-allow keeps ordinary servers working; these
/// are the ones that manipulate the kernel, mounts, namespaces, keys or other processes.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "_sysctl",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

const CLONE_NEWUSER: u64 = 0x1000_0000;

fn seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            { "names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM },
            // clone(CLONE_NEWUSER) would give a process a namespace where it holds all caps.
            { "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
              "args": [{ "index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                         "op": "SCMP_CMP_MASKED_EQ" }] },
            // clone3 flags live in memory seccomp cannot read: ENOSYS makes libc use clone.
            { "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS },
        ],
    })
}

/// runc's default masked / read-only paths.
fn masked_paths() -> Vec<&'static str> {
    vec![
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ]
}

fn readonly_paths() -> Vec<&'static str> {
    vec![
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
}

/// True when the supervisor mounts the container's `/sys` itself (a sysfs of the agent's
/// network namespace, `mountns::attach_sysfs`) rather than libcontainer: with a namespace of
/// the agent's, and the image's `/sys` a plain directory or absent. Anything else there (a
/// symlink in an image could point anywhere) is left to libcontainer's resolution in the
/// rootfs.
pub(crate) fn supervisor_mounts_sys(spec: &SandboxSpec, rootfs: &Path) -> bool {
    spec.netns.is_some()
        && match std::fs::symlink_metadata(rootfs.join("sys")) {
            Ok(meta) => meta.is_dir(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
}

/// The OCI spec. `rootfs` is the mounted overlay; `state_dir` holds hosts/resolv.conf.
pub(crate) fn build(
    spec: &SandboxSpec,
    rootfs: &Path,
    state_dir: &Path,
) -> Result<Spec, SandboxError> {
    // Deliberately no cgroup mount: youki would mount v1 hierarchies read-write.
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    // In a network namespace of the agent's the supervisor mounts /sys itself, from a sysfs
    // made with the namespace (`mountns::attach_sysfs`); the rootfs's submounts come along.
    if !supervisor_mounts_sys(spec, rootfs) {
        mounts.push(
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                           "options": ["nosuid", "noexec", "nodev", "ro"]}),
        );
    }
    if spec.hosts.is_some() {
        mounts.push(bind(&state_dir.join(super::HOSTS_FILE), "/etc/hosts", true));
    }
    if spec.resolv_conf.is_some() {
        mounts.push(bind(
            &state_dir.join(super::RESOLV_FILE),
            "/etc/resolv.conf",
            true,
        ));
    }
    for m in &spec.mounts {
        mounts.push(match m {
            Mount::Bind { source, destination, read_only } => bind(source, destination, *read_only),
            Mount::Tmpfs { destination, size_bytes } => {
                let mut opts = vec!["nosuid".to_string(), "nodev".to_string(), "mode=1777".to_string()];
                if let Some(s) = size_bytes {
                    opts.push(format!("size={s}"));
                }
                json!({"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": opts})
            }
        });
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    namespaces.push(match &spec.netns {
        Some(p) => json!({"type": "network", "path": p}),
        None => json!({"type": "network"}),
    });

    let mut resources = json!({ "devices": [{"allow": false, "access": "rwm"}] });
    if let Some(m) = spec.resources.memory_bytes {
        let mut mem = json!({"limit": m});
        // Only when swap accounting exists; otherwise libcgroups fails to write it.
        if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
            mem["swap"] = json!(m);
        }
        resources["memory"] = mem;
    }
    if let Some(c) = spec.resources.cpus {
        // Over the kernel's default 100 ms period, which is not written: each write of
        // either value makes the kernel check every CPU cgroup on the host
        // (`tg_set_cfs_bandwidth`), so one write instead of two.
        let period: f64 = 100_000.0;
        let quota = ((c * period) as i64).max(1000);
        resources["cpu"] = json!({ "quota": quota });
    }
    if let Some(p) = spec.resources.pids {
        resources["pids"] = json!({"limit": p});
    }

    let caps = DEFAULT_CAPS;
    // Raising a hard limit needs CAP_SYS_RESOURCE, which the agent may lack: never ask
    // for more than we have.
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard.min(1_048_576));
    let config = json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs, "readonly": false},
        "hostname": spec.hostname,
        "process": {
            "terminal": false,
            "user": {"uid": spec.user.uid, "gid": spec.user.gid},
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": true,
        },
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroup::cgroups_path(spec),
            "namespaces": namespaces,
            "resources": resources,
            "maskedPaths": masked_paths(),
            "readonlyPaths": readonly_paths(),
            "seccomp": seccomp(),
        },
    });
    serde_json::from_value(config).map_err(|e| SandboxError::InvalidSpec(format!("oci spec: {e}")))
}

fn bind(source: &Path, dest: &str, ro: bool) -> Value {
    let mut opts = vec!["rbind", "rprivate"];
    if ro {
        opts.push("ro");
    }
    json!({"destination": dest, "type": "bind", "source": source, "options": opts})
}
