//! Request validation at the API's edge: every string, number and path a client sends is
//! checked here, before anything is recorded or handed to the kernel or libcontainer, and a
//! bad one is a 400 that names the field (`env[2]`, `cmd[0]`, `memory`, ...).

use crate::core::error::Error;
use crate::model::{
    AcquireLease, CreateAddon, DeployApp, ExecRequest, ImportImage, PublishPort, PullImage,
    RunSandbox,
};

/// Longest free-text field (a reference, a version, a holder) the API takes.
const MAX_TEXT: usize = 1024;
/// Longest path inside a sandbox (PATH_MAX).
const MAX_PATH: usize = 4096;
/// Most arguments, environment entries, mounts or ports in one request.
const MAX_ITEMS: usize = 4096;
/// Longest single argument or environment entry (the kernel's MAX_ARG_STRLEN).
const MAX_ARG: usize = 128 * 1024;
/// Highest memory limit a sandbox may ask for (1 TiB).
pub(crate) const MAX_MEMORY: u64 = 1 << 40;
/// Highest pids limit (the kernel's PID_MAX_LIMIT).
pub(crate) const MAX_PIDS: i64 = 4 << 20;
/// Most CPUs a sandbox may ask for.
const MAX_CPUS: f64 = 1024.0;
/// Longest wait a request may ask for, in seconds (a day).
const MAX_WAIT_SECS: f64 = 86_400.0;
/// Largest app.toml a deploy takes.
const MAX_APP_TOML: usize = 1 << 20;

fn invalid(field: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{field}: {why}"))
}

fn count(field: &str, items: usize) -> Result<(), Error> {
    if items > MAX_ITEMS {
        return Err(invalid(
            field,
            format!("at most {MAX_ITEMS} entries, got {items}"),
        ));
    }
    Ok(())
}

/// Printable text: no control characters (newlines, escapes, NUL), at most `max` bytes.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("at most {max} bytes, got {}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(invalid(
            field,
            format!("control character {c:?} is not allowed; use printable text"),
        ));
    }
    Ok(())
}

fn non_empty_text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    text(field, value, max)
}

/// A name: letters, digits and hyphens, 1-63 characters, not starting with a hyphen.
pub fn name(field: &str, value: &str) -> Result<(), Error> {
    miren_disks::validate_name(value).map_err(|e| {
        // The shared name rules speak of disks; here it is whatever `field` names.
        let why = e
            .to_string()
            .replace("a disk name", "a name")
            .replace("disk name", "the name");
        invalid(field, why.escape_debug())
    })
}

/// A name as a [`Name`](miren_sys::name::Name): checked here once, with `field` in the error.
pub fn to_name(field: &str, value: impl Into<String>) -> Result<miren_sys::name::Name, Error> {
    let value = value.into();
    name(field, &value)?;
    miren_sys::name::Name::new(value).map_err(|v| invalid(field, v))
}

/// A command-line argument: anything but NUL (the kernel cannot pass it).
fn argument(field: &str, value: &str) -> Result<(), Error> {
    if value.contains('\0') {
        return Err(invalid(field, "NUL bytes cannot be passed to a process"));
    }
    if value.len() > MAX_ARG {
        return Err(invalid(
            field,
            format!("at most {MAX_ARG} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

pub(crate) fn command(field: &str, args: &[String]) -> Result<(), Error> {
    count(field, args.len())?;
    if args.first().is_some_and(String::is_empty) {
        return Err(invalid(
            &format!("{field}[0]"),
            "the program must not be empty",
        ));
    }
    for (i, arg) in args.iter().enumerate() {
        argument(&format!("{field}[{i}]"), arg)?;
    }
    Ok(())
}

/// `KEY=VALUE` with a POSIX name (`[A-Za-z_][A-Za-z0-9_]*`) and a value without NUL.
pub fn env(field: &str, entries: &[String]) -> Result<(), Error> {
    count(field, entries.len())?;
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let Some((key, value)) = entry.split_once('=') else {
            return Err(invalid(&field, "write KEY=VALUE"));
        };
        let mut chars = key.chars();
        let posix = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !posix {
            return Err(invalid(
                &field,
                format!(
                    "the name {:?} is not a valid variable name: use letters, digits and _, not starting with a digit",
                    key
                ),
            ));
        }
        argument(&field, value)?;
    }
    Ok(())
}

/// An absolute path inside a sandbox: no `..`, no NUL or other control characters.
pub fn container_path(field: &str, path: &str) -> Result<(), Error> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(invalid(
            field,
            format!(
                "`{}` must be an absolute path inside the sandbox, without `..`",
                path.escape_debug()
            ),
        ));
    }
    text(field, path, MAX_PATH)
}

/// `NAME:/path[:OPTIONS]` (a disk) or `/path[:OPTIONS]` (a tmpfs): the path part is checked
/// here, the rest by the service that parses it.
fn mount_entry(field: &str, entry: &str, named: bool) -> Result<(), Error> {
    text(field, entry, MAX_PATH)?;
    if named && !entry.contains(':') {
        return Err(invalid(field, "write NAME:/path or NAME:/path:ro"));
    }
    let mut parts = entry.splitn(3, ':');
    if named {
        let disk = parts.next().unwrap_or_default();
        name(field, disk)?;
    }
    container_path(field, parts.next().unwrap_or_default())
}

fn seconds(field: &str, value: Option<f64>, max: f64) -> Result<(), Error> {
    match value {
        Some(s) if !(s.is_finite() && (0.0..=max).contains(&s)) => Err(invalid(
            field,
            format!("a number of seconds from 0 to {max}, got {s}"),
        )),
        _ => Ok(()),
    }
}

pub(crate) fn publish(field: &str, ports: &[PublishPort]) -> Result<(), Error> {
    count(field, ports.len())?;
    for (i, p) in ports.iter().enumerate() {
        if let Some(ip) = &p.host_ip {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    &format!("{field}[{i}].host_ip"),
                    format!("`{}` is not an IP address", ip.escape_debug()),
                ));
            }
        }
        if p.host_port == 0 {
            return Err(invalid(
                &format!("{field}[{i}].host_port"),
                "a port from 1 to 65535",
            ));
        }
        if p.port == 0 {
            return Err(invalid(
                &format!("{field}[{i}].port"),
                "a port from 1 to 65535",
            ));
        }
    }
    Ok(())
}

pub(crate) fn image_reference(field: &str, reference: &str) -> Result<(), Error> {
    non_empty_text(field, reference, MAX_TEXT)?;
    miren_runtime::normalize_reference(reference).map_err(|e| invalid(field, e))?;
    Ok(())
}

pub fn run_sandbox(req: &RunSandbox) -> Result<(), Error> {
    image_reference("image", &req.image)?;
    if let Some(n) = &req.name {
        name("name", n)?;
    }
    if let Some(app) = &req.app {
        name("app", app)?;
    }
    env("env", &req.env)?;
    if let Some(memory) = &req.memory {
        text("memory", memory, 64)?;
        let bytes = crate::core::sandboxes::parse_memory(memory)?;
        if bytes > MAX_MEMORY {
            return Err(invalid(
                "memory",
                format!("`{memory}` is more than the 1024G a sandbox may ask for"),
            ));
        }
    }
    if let Some(cpus) = req.cpus {
        if !(cpus.is_finite() && cpus > 0.0 && cpus <= MAX_CPUS) {
            return Err(invalid(
                "cpus",
                format!("a number above 0 and at most {MAX_CPUS}, got {cpus}"),
            ));
        }
    }
    if let Some(pids) = req.pids {
        if !(1..=MAX_PIDS).contains(&pids) {
            return Err(invalid(
                "pids",
                format!("a number from 1 to {MAX_PIDS}, got {pids}"),
            ));
        }
    }
    count("disks", req.disks.len())?;
    for (i, d) in req.disks.iter().enumerate() {
        mount_entry(&format!("disks[{i}]"), d, true)?;
    }
    seconds("lease_timeout_secs", req.lease_timeout_secs, MAX_WAIT_SECS)?;
    if let Some(dir) = &req.local_dir {
        container_path("local_dir", dir)?;
    }
    count("tmpfs", req.tmpfs.len())?;
    for (i, t) in req.tmpfs.iter().enumerate() {
        mount_entry(&format!("tmpfs[{i}]"), t, false)?;
    }
    if let Some(restart) = &req.restart {
        text("restart", restart, 64)?;
    }
    publish("publish", &req.publish)?;
    count("allow_from", req.allow_from.len())?;
    for (i, app) in req.allow_from.iter().enumerate() {
        name(&format!("allow_from[{i}]"), app)?;
    }
    command("cmd", &req.cmd)
}

pub fn exec(req: &ExecRequest) -> Result<(), Error> {
    if req.args.is_empty() {
        return Err(invalid("args", "give the command to run"));
    }
    command("args", &req.args)?;
    env("env", &req.env)
}

pub fn lease(req: &AcquireLease) -> Result<(), Error> {
    non_empty_text("holder", &req.holder, 256)?;
    seconds("timeout_secs", req.timeout_secs, MAX_WAIT_SECS)
}

pub fn pull(req: &PullImage) -> Result<(), Error> {
    image_reference("reference", &req.reference)?;
    if let Some(user) = &req.username {
        text("username", user, MAX_TEXT)?;
    }
    if let Some(password) = &req.password {
        text("password", password, MAX_TEXT)?;
    }
    Ok(())
}

pub fn import(req: &ImportImage) -> Result<(), Error> {
    image_reference("reference", &req.reference)?;
    if !req.path.starts_with('/') {
        return Err(invalid("path", "an absolute path on the node"));
    }
    text("path", &req.path, MAX_PATH)
}

pub fn addon(req: &CreateAddon) -> Result<(), Error> {
    name("app", &req.app)?;
    non_empty_text("addon", &req.addon, MAX_TEXT)?;
    if let Some(variant) = &req.variant {
        non_empty_text("variant", variant, MAX_TEXT)?;
    }
    if let Some(version) = &req.version {
        non_empty_text("version", version, MAX_TEXT)?;
    }
    Ok(())
}

pub fn deploy(req: &DeployApp) -> Result<(), Error> {
    if req.app_toml.len() > MAX_APP_TOML {
        return Err(invalid(
            "app_toml",
            format!("at most {MAX_APP_TOML} bytes, got {}", req.app_toml.len()),
        ));
    }
    if req.app_toml.contains('\0') {
        return Err(invalid("app_toml", "NUL bytes are not allowed in TOML"));
    }
    if let Some(source) = &req.source {
        text("source", source, MAX_PATH)?;
    }
    count("publish", req.publish.len())?;
    for (i, p) in req.publish.iter().enumerate() {
        name(&format!("publish[{i}].service"), &p.service)?;
        publish(
            "publish",
            &[PublishPort {
                host_ip: p.host_ip.clone(),
                host_port: p.host_port,
                port: p.port,
            }],
        )
        .map_err(|e| {
            Error::invalid(
                e.message
                    .replacen("publish[0]", &format!("publish[{i}]"), 1),
            )
        })?;
    }
    Ok(())
}

/// A query's wait in seconds.
pub fn query_seconds(field: &str, value: Option<f64>, max: f64) -> Result<(), Error> {
    seconds(field, value, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(image: &str) -> RunSandbox {
        RunSandbox {
            image: image.into(),
            ..Default::default()
        }
    }

    fn refused(req: RunSandbox, field: &str) {
        let err = run_sandbox(&req).expect_err(field);
        assert_eq!(err.kind, crate::core::error::ErrorKind::Invalid);
        assert!(err.message.starts_with(field), "{field}: {}", err.message);
    }

    #[test]
    fn loose_input_is_refused_naming_the_field() {
        assert!(run_sandbox(&sandbox("busybox")).is_ok());
        let mut r = sandbox("busybox");
        r.env = vec!["A\nB=1".into()];
        refused(r, "env[0]");
        let mut r = sandbox("busybox");
        r.env = vec!["OK=1".into(), "A=x\0y".into()];
        refused(r, "env[1]");
        let mut r = sandbox("busybox");
        r.cmd = vec!["sh".into(), "a\0b".into()];
        refused(r, "cmd[1]");
        let mut r = sandbox("busybox");
        r.memory = Some("99999999999999G".into());
        refused(r, "memory");
        let mut r = sandbox("busybox");
        r.pids = Some(1 << 62);
        refused(r, "pids");
        let mut r = sandbox("busybox");
        r.cpus = Some(f64::NAN);
        refused(r, "cpus");
        let mut r = sandbox("busybox");
        r.tmpfs = vec!["/a/../../etc".into()];
        refused(r, "tmpfs[0]");
        let mut r = sandbox("busybox");
        r.local_dir = Some("relative".into());
        refused(r, "local_dir");
        let mut r = sandbox("busybox");
        r.disks = vec!["d:/x\0".into()];
        refused(r, "disks[0]");
        let mut r = sandbox("busybox");
        r.lease_timeout_secs = Some(-1.0);
        refused(r, "lease_timeout_secs");
        refused(sandbox("bad\nimage"), "image");
        let err = lease(&AcquireLease {
            holder: "me\x1b[2J".into(),
            timeout_secs: None,
        })
        .expect_err("holder");
        assert!(err.message.starts_with("holder"));
    }
}
