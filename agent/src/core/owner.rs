//! Who holds a lease or owns an endpoint, and whether it still exists; and who a sandbox or
//! disk belongs to ([`Owner`]). A holder written `pid:N` is tied to process N (and its start
//! time, so a reused pid does not count); any other string is an opaque name that exists until
//! it is released. The /proc reads live here, not in the store.

use crate::core::error::Error;

/// A holder, parsed once where it enters (the API) or made directly (a sandbox id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    text: String,
    kind: HolderKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderKind {
    Process { pid: i64, start_time: i64 },
    Named,
}

impl Holder {
    /// A holder named by the agent itself (a sandbox id): opaque, nothing to parse or check.
    pub fn named(name: impl Into<String>) -> Holder {
        Holder {
            text: name.into(),
            kind: HolderKind::Named,
        }
    }

    /// A holder a client wrote: `pid:N` ties it to process N as it runs now; anything else is
    /// an opaque name.
    pub fn parse(holder: &str) -> Result<Holder, Error> {
        if holder.trim().is_empty() || holder.len() > 256 {
            return Err(Error::invalid(
                "a holder must be a non-empty string of at most 256 bytes (e.g. a sandbox id, or pid:1234)",
            ));
        }
        let Some(pid) = holder.strip_prefix("pid:") else {
            return Ok(Holder::named(holder));
        };
        let pid: i64 = pid.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
            Error::invalid(format!(
                "`{holder}` is not a valid pid holder; write pid:N with N a process id"
            ))
        })?;
        let start_time = process_start_time(pid)
            .ok_or_else(|| Error::invalid(format!("`{holder}`: no process {pid} is running")))?;
        Ok(Holder {
            text: holder.to_string(),
            kind: HolderKind::Process { pid, start_time },
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn kind(&self) -> HolderKind {
        self.kind
    }

    pub fn pid_and_start(&self) -> (Option<i64>, Option<i64>) {
        match self.kind {
            HolderKind::Process { pid, start_time } => (Some(pid), Some(start_time)),
            HolderKind::Named => (None, None),
        }
    }
}

/// Start time (clock ticks since boot) of a live process; a zombie has exited and holds
/// nothing, so it has none (see `miren_sys::proc::start_time`).
pub fn process_start_time(pid: i64) -> Option<i64> {
    let pid = i32::try_from(pid).ok()?;
    i64::try_from(miren_sys::proc::start_time(pid)?).ok()
}

/// True when a `pid:N` holder's process is gone; opaque holders never are.
pub fn holder_is_gone(pid: Option<i64>, start_time: Option<i64>) -> bool {
    match (pid, start_time) {
        (Some(pid), Some(start)) => process_start_time(pid) != Some(start),
        _ => false,
    }
}

/// Who a sandbox or disk belongs to, as recorded in its row (never derived from its name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// An app: its service's sandbox, or (with `service` empty) a disk it claimed.
    App { app: String, service: String },
    /// An app's dedicated server of an addon kind: its sandbox and its disk.
    Addon { app: String, kind: String },
    /// The node's shared server of an addon kind: its sandbox and its disk.
    Shared { kind: String },
    /// The sidecar beside an addon server (`Addon` or `Shared`): PostgreSQL's pooler. A
    /// sandbox only, no disk; removed with its server.
    Sidecar { server: Box<Owner> },
    /// A service's sandbox while a redeploy replaces it (`core/apps/switch.rs`): the next one
    /// starting beside the serving one, or the previous one draining after the switch.
    Replacing {
        app: String,
        service: String,
        role: ReplacingRole,
    },
}

/// Which side of a redeploy's switch a [`Owner::Replacing`] sandbox is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplacingRole {
    /// Started beside the serving sandbox; takes over once healthy.
    Next,
    /// Served until the switch; drains, then is removed.
    Retiring,
}

impl Owner {
    /// The sidecar of an addon server.
    pub fn sidecar_of(server: &Owner) -> Owner {
        Owner::Sidecar {
            server: Box::new(server.clone()),
        }
    }

    /// An app as a disk owner.
    pub fn app(app: &str) -> Owner {
        Owner::App {
            app: app.to_string(),
            service: String::new(),
        }
    }

    pub fn service(app: &str, service: &str) -> Owner {
        Owner::App {
            app: app.to_string(),
            service: service.to_string(),
        }
    }

    /// The sandbox beside `app`'s `service` in a redeploy's `role`.
    pub fn replacing(app: &str, service: &str, role: ReplacingRole) -> Owner {
        Owner::Replacing {
            app: app.to_string(),
            service: service.to_string(),
            role,
        }
    }

    /// The same owner as a disk owner: a service's disks belong to its app.
    pub fn as_disk_owner(&self) -> Owner {
        match self {
            Owner::App { app, .. } | Owner::Replacing { app, .. } => Owner::app(app),
            other => other.clone(),
        }
    }

    /// For messages: `app `x``, `the miren-postgresql addon of app `x``, ...
    pub fn describe(&self) -> String {
        match self {
            Owner::App { app, service } if service.is_empty() => format!("app `{app}`"),
            Owner::App { app, service } => format!("service `{service}` of app `{app}`"),
            Owner::Addon { app, kind } => format!("the {kind} addon of app `{app}`"),
            Owner::Shared { kind } => format!("the shared {kind} server"),
            Owner::Sidecar { server } => format!("the sidecar of {}", server.describe()),
            Owner::Replacing {
                app,
                service,
                role: ReplacingRole::Next,
            } => format!("the next sandbox of service `{service}` of app `{app}`"),
            Owner::Replacing {
                app,
                service,
                role: ReplacingRole::Retiring,
            } => format!("the retiring sandbox of service `{service}` of app `{app}`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders() {
        let named = Holder::parse("sandbox-1").unwrap();
        assert_eq!(named, Holder::named("sandbox-1"));
        assert_eq!(named.kind(), HolderKind::Named);
        assert!(Holder::parse("").is_err());
        assert!(Holder::parse("pid:abc").is_err());
        assert!(Holder::parse("pid:0").is_err());
        let me = format!("pid:{}", std::process::id());
        let parsed = Holder::parse(&me).unwrap();
        assert_eq!(parsed.as_str(), me);
        let HolderKind::Process { pid, start_time } = parsed.kind() else {
            panic!("own pid not found")
        };
        assert!(!holder_is_gone(Some(pid), Some(start_time)));
        assert!(holder_is_gone(Some(pid), Some(start_time + 1)));
        assert!(!holder_is_gone(None, None));
    }

    /// A process that exited but is not reaped yet (a zombie) holds nothing: its lease is free.
    #[test]
    fn a_zombie_holder_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawning sleep");
        let pid = i64::from(child.id());
        let Ok(HolderKind::Process { start_time, .. }) =
            Holder::parse(&format!("pid:{pid}")).map(|h| h.kind())
        else {
            panic!("running child not found")
        };
        assert!(!holder_is_gone(Some(pid), Some(start_time)));
        child.kill().expect("killing sleep");
        // Not reaped: /proc/PID stays, as a zombie, until wait() below.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(holder_is_gone(Some(pid), Some(start_time)));
        assert!(Holder::parse(&format!("pid:{pid}")).is_err());
        child.wait().expect("reaping sleep");
    }
}
