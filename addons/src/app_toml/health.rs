//! `[services.NAME.health]`: how the agent tells a service is serving, and how often it asks.

use std::time::Duration;

use toml::de::DeValue;

use super::{command_argv, type_name, Command, Ctx, Tbl};

const HEALTH_FIELDS: &[&str] = &[
    "http",
    "tcp",
    "exec",
    "interval",
    "timeout",
    "start_period",
    "failure_threshold",
];

/// Defaults for what a `[services.NAME.health]` table leaves out, and for the TCP check a
/// service with a port gets without one.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_START_PERIOD: Duration = Duration::from_secs(30);
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Bounds: a check more often than this is load, not health; longer ones are a typo.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_FAILURE_THRESHOLD: i64 = 100;

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthProbe {
    /// `http = "/healthz"`: a GET to the service's `PORT` answered with a 2xx or 3xx.
    Http { path: String },
    /// `tcp = 5432`: a connect to that port succeeds.
    Tcp { port: u16 },
    /// `exec = "pg_isready"`: the command, run inside the sandbox, exits 0.
    Exec { command: Command },
}

/// A service's health check: its probe and its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    /// Between the end of one check and the start of the next.
    pub interval: Duration,
    /// One check failing when it takes longer.
    pub timeout: Duration,
    /// After a start, failures do not count until a check passed or this has passed.
    pub start_period: Duration,
    /// Consecutive failures that make the service unhealthy.
    pub failure_threshold: u32,
}

impl HealthCheck {
    /// The check a service with a port gets when app.toml declares none.
    pub fn default_tcp(port: u16) -> HealthCheck {
        HealthCheck {
            probe: HealthProbe::Tcp { port },
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            start_period: DEFAULT_START_PERIOD,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
        }
    }
}

impl Ctx<'_> {
    /// `[services.NAME.health]`, if there is one; problems are recorded, None returned.
    pub(super) fn service_health(&mut self, service: &Tbl<'_, '_>) -> Option<HealthCheck> {
        let v = service.get("health")?;
        let t = self.table(
            v,
            service.field("health"),
            "a table, e.g. [services.web.health] with http = \"/healthz\"",
        )?;
        self.check_fields(&t, HEALTH_FIELDS);
        let mut probes = Vec::new();
        if let Some((path, span)) = self.string(&t, "http") {
            if path.starts_with('/') && !path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                probes.push(HealthProbe::Http { path });
            } else {
                self.err(
                    &span,
                    t.field("http"),
                    format!("`{path}` is not a request path; write e.g. \"/healthz\""),
                );
                return None;
            }
        }
        if let Some(v) = t.get("tcp") {
            let port = match v.get_ref() {
                DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|p| *p > 0),
                _ => None,
            };
            match port {
                Some(port) => probes.push(HealthProbe::Tcp { port }),
                None => {
                    let found = match v.get_ref() {
                        DeValue::Integer(i) => i.as_str().to_string(),
                        other => type_name(other).to_string(),
                    };
                    self.err(
                        &v.span(),
                        t.field("tcp"),
                        format!("expected a port from 1 to 65535, found {found}"),
                    );
                    return None;
                }
            }
        }
        if let Some((raw, span)) = self.string(&t, "exec") {
            match command_argv(&raw) {
                Ok(argv) if !argv.is_empty() => probes.push(HealthProbe::Exec {
                    command: Command { raw, argv },
                }),
                Ok(_) => {
                    self.err(
                        &span,
                        t.field("exec"),
                        "empty command; write e.g. \"pg_isready\"",
                    );
                    return None;
                }
                Err(msg) => {
                    self.err(&span, t.field("exec"), msg);
                    return None;
                }
            }
        }
        let interval = self.duration(&t, "interval", DEFAULT_INTERVAL, MIN_INTERVAL);
        let timeout = self.duration(&t, "timeout", DEFAULT_TIMEOUT, MIN_INTERVAL);
        let start_period = self.duration(&t, "start_period", DEFAULT_START_PERIOD, Duration::ZERO);
        let failure_threshold = match t.get("failure_threshold") {
            None => Some(DEFAULT_FAILURE_THRESHOLD),
            Some(v) => match v.get_ref() {
                DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                    Ok(n) if (1..=MAX_FAILURE_THRESHOLD).contains(&n) => u32::try_from(n).ok(),
                    _ => {
                        let msg = format!(
                            "expected a count from 1 to {MAX_FAILURE_THRESHOLD}, found {}",
                            i.as_str()
                        );
                        self.err(&v.span(), t.field("failure_threshold"), msg);
                        None
                    }
                },
                other => {
                    let msg = format!("expected an integer such as 3, found {}", type_name(other));
                    self.err(&v.span(), t.field("failure_threshold"), msg);
                    None
                }
            },
        };
        let probe = match probes.len() {
            1 => probes.pop(),
            0 => {
                self.missing(
                    &t,
                    "http",
                    "a health check needs exactly one of http = \"/healthz\", tcp = PORT or exec = \"command\"",
                );
                None
            }
            _ => {
                self.err(
                    &t.span,
                    t.path.clone(),
                    "give exactly one of `http`, `tcp` or `exec`; this table has more",
                );
                None
            }
        };
        Some(HealthCheck {
            probe: probe?,
            interval: interval?,
            timeout: timeout?,
            start_period: start_period?,
            failure_threshold: failure_threshold?,
        })
    }

    /// A duration string (`"10s"`, `"500ms"`) from `min` to an hour; `default` when absent.
    fn duration(
        &mut self,
        t: &Tbl<'_, '_>,
        key: &str,
        default: Duration,
        min: Duration,
    ) -> Option<Duration> {
        let Some((s, span)) = self.string(t, key) else {
            return t.get(key).is_none().then_some(default);
        };
        match humantime::parse_duration(&s) {
            Ok(d) if d >= min && d <= MAX_DURATION => Some(d),
            Ok(_) => {
                let msg = format!(
                    "`{s}` is out of range: give from {} to 1h",
                    humantime::format_duration(min)
                );
                self.err(&span, t.field(key), msg);
                None
            }
            Err(e) => {
                let msg = format!("`{s}` is not a duration ({e}); write e.g. \"10s\" or \"500ms\"");
                self.err(&span, t.field(key), msg);
                None
            }
        }
    }
}

/// How a redeploy replaces a service's sandbox: `strategy = "..."` in `[services.NAME]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplaceStrategy {
    /// `"overlap"` (the default): the new sandbox starts beside the old one and takes over
    /// once healthy.
    #[default]
    Overlap,
    /// `"recreate"`: the old sandbox stops before the new one starts (an outage).
    Recreate,
}

impl ReplaceStrategy {
    pub fn name(self) -> &'static str {
        match self {
            ReplaceStrategy::Overlap => "overlap",
            ReplaceStrategy::Recreate => "recreate",
        }
    }
}

impl Ctx<'_> {
    pub(super) fn replace_strategy(&mut self, t: &Tbl<'_, '_>) -> Option<ReplaceStrategy> {
        let Some((s, span)) = self.string(t, "strategy") else {
            return t
                .get("strategy")
                .is_none()
                .then_some(ReplaceStrategy::Overlap);
        };
        match s.as_str() {
            "overlap" => Some(ReplaceStrategy::Overlap),
            "recreate" => Some(ReplaceStrategy::Recreate),
            _ => {
                self.err(
                    &span,
                    t.field("strategy"),
                    format!(
                        "unknown strategy `{s}`; the strategies are: overlap (default), recreate"
                    ),
                );
                None
            }
        }
    }
}
