//! `[services.NAME.health]` and `strategy`.

use std::time::Duration;

use miren_addons::{parse_app_toml, HealthCheck, HealthProbe, ReplaceStrategy};

fn service(extra: &str) -> Result<miren_addons::ServiceConfig, String> {
    let text = format!("name = \"shop\"\n[services.web]\nimage = \"busybox:1\"\n{extra}");
    parse_app_toml(&text, "app.toml")
        .map(|c| c.services[0].clone())
        .map_err(|e| e.to_string())
}

#[test]
fn no_health_table_means_the_agent_default() {
    let s = service("").unwrap();
    assert_eq!(s.health, None);
    assert_eq!(s.strategy, ReplaceStrategy::Overlap);
    let d = HealthCheck::default_tcp(3000);
    assert_eq!(d.probe, HealthProbe::Tcp { port: 3000 });
    assert!(d.failure_threshold >= 1 && d.timeout < d.interval);
}

#[test]
fn http_check_with_defaults() {
    let s = service("[services.web.health]\nhttp = \"/healthz\"\n").unwrap();
    let h = s.health.unwrap();
    assert_eq!(
        h.probe,
        HealthProbe::Http {
            path: "/healthz".into()
        }
    );
    assert_eq!(h, {
        let mut d = HealthCheck::default_tcp(1);
        d.probe = h.probe.clone();
        d
    });
}

#[test]
fn every_field_is_read() {
    let s = service(
        "strategy = \"recreate\"\n[services.web.health]\ntcp = 5432\ninterval = \"500ms\"\ntimeout = \"200ms\"\nstart_period = \"0s\"\nfailure_threshold = 5\n",
    )
    .unwrap();
    assert_eq!(s.strategy, ReplaceStrategy::Recreate);
    assert_eq!(
        s.health,
        Some(HealthCheck {
            probe: HealthProbe::Tcp { port: 5432 },
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            start_period: Duration::ZERO,
            failure_threshold: 5,
        })
    );
}

#[test]
fn exec_is_split_like_command() {
    let s = service("[services.web.health]\nexec = \"pg_isready -q\"\n").unwrap();
    match s.health.unwrap().probe {
        HealthProbe::Exec { command } => assert_eq!(command.argv, ["pg_isready", "-q"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn exactly_one_probe() {
    let e = service("[services.web.health]\nhttp = \"/\"\ntcp = 80\n").unwrap_err();
    assert!(
        e.contains("app.toml line 4: services.web.health: give exactly one"),
        "{e}"
    );
    let e = service("[services.web.health]\ninterval = \"1s\"\n").unwrap_err();
    assert!(e.contains("line 4: services.web.health.http: missing required field; a health check needs exactly one"), "{e}");
}

#[test]
fn bad_values_name_their_line_and_field() {
    let e = service("[services.web.health]\nhttp = \"healthz\"\n").unwrap_err();
    assert!(
        e.contains("line 5: services.web.health.http: `healthz` is not a request path"),
        "{e}"
    );
    let e = service("[services.web.health]\ntcp = 70000\n").unwrap_err();
    assert!(
        e.contains("line 5: services.web.health.tcp: expected a port from 1 to 65535, found 70000"),
        "{e}"
    );
    let e = service("[services.web.health]\ntcp = 80\ninterval = \"soon\"\n").unwrap_err();
    assert!(
        e.contains("line 6: services.web.health.interval: `soon` is not a duration"),
        "{e}"
    );
    let e = service("[services.web.health]\ntcp = 80\ninterval = \"1ms\"\n").unwrap_err();
    assert!(
        e.contains("services.web.health.interval: `1ms` is out of range"),
        "{e}"
    );
    let e = service("[services.web.health]\ntcp = 80\nfailure_threshold = 0\n").unwrap_err();
    assert!(e.contains("line 6: services.web.health.failure_threshold: expected a count from 1 to 100, found 0"), "{e}");
    let e = service("[services.web.health]\ntcp = 80\nretries = 3\n").unwrap_err();
    assert!(
        e.contains("services.web.health.retries: unknown field"),
        "{e}"
    );
    let e = service("strategy = \"blue-green\"\n").unwrap_err();
    assert!(
        e.contains("line 4: services.web.strategy: unknown strategy `blue-green`"),
        "{e}"
    );
}
