use std::time::SystemTime;

/// Random identifier with a kind prefix, e.g. `disk_1f0c9a7e5b3d2a41`. The underscore makes ids
/// impossible to confuse with names, which only allow letters, digits and hyphens.
pub fn new_id(kind: &str) -> String {
    let mut bytes = [0u8; 8];
    // getrandom only fails when the kernel has no entropy source at all; ids must still be
    // unique, so fall back to time and pid rather than aborting a create.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = ((nanos as u64) ^ ((std::process::id() as u64) << 32)).to_be_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}_{hex}")
}

/// A command that runs this very binary: `/proc/self/exe`, so supervisors, exec helpers and the
/// freeze helper are the agent's own version even after an upgrade replaced (and so unlinked)
/// the file it was started from; `current_exe()` would then name a path that no longer exists.
/// argv[0] stays the path it was started as, so `ps` and `scripts/cleanup` recognise it.
pub fn own_binary() -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Ok(path) = std::env::current_exe() {
        let shown = path.to_string_lossy();
        cmd.arg0(shown.trim_end_matches(" (deleted)"));
    }
    cmd
}

/// RFC 3339 UTC timestamp with seconds, as stored and shown everywhere.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for path segments and
/// query values (owners like `pid:12`, image references like `ghcr.io/org/app:1`).
pub use miren_sys::percent_encode;

/// One async lock per key (an app, a sandbox): operations on the same key run one at a time.
#[derive(Default)]
pub struct KeyedLocks(
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
);

impl KeyedLocks {
    pub fn of(&self, key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Forgets `key` (once what it named is gone); holders of its lock keep it.
    pub fn forget(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// An error's text followed by each of its sources' (`a: b: c`): client crates put the
/// useful part (a refused connection, the server's reply) in a source.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
