//! app.toml: the seed documents' examples, and one test per rule.

use std::time::Duration;

use miren_addons::{
    parse_app_toml, AddonConfig, AddonKind, AppConfig, Command, DiskConfig, DiskProvider, EnvEntry,
    Filesystem, ImageSource, Pooling, ResolvedVersion, ServiceConfig, ServiceLimits, Stack,
    Variant,
};

const PATH: &str = ".miren/app.toml";

fn parse(text: &str) -> AppConfig {
    parse_app_toml(text, PATH).unwrap_or_else(|e| panic!("{e}"))
}

fn error(text: &str) -> String {
    match parse_app_toml(text, PATH) {
        Ok(c) => panic!("expected an error, parsed {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn pg(variant: Variant, version: ResolvedVersion, pinned: bool) -> AddonConfig {
    AddonConfig {
        kind: AddonKind::Postgresql,
        variant,
        version,
        version_pinned: pinned,
        pooling: None,
        tier: None,
        client_connections: None,
    }
}

#[test]
fn pooling_is_typed_and_postgresql_only() {
    let toml = |section: &str, body: &str| {
        format!(
            "name = \"a\"\n[services.web]\nimage = \"oven/bun:1\"\n[addons.{section}]\n{body}\n"
        )
    };
    let app = parse(&toml(
        "miren-postgresql",
        "variant = \"shared\"\npooling = \"session\"",
    ));
    assert_eq!(app.addons[0].pooling, Some(Pooling::Session));
    let app = parse(&toml("miren-postgresql", ""));
    assert_eq!(app.addons[0].pooling, None);
    let e = error(&toml("miren-postgresql", "pooling = \"always\""));
    assert!(
        e.contains("line 5") && e.contains("addons.miren-postgresql.pooling"),
        "{e}"
    );
    assert!(e.contains("transaction, session, none"), "{e}");
    let e = error(&toml("miren-valkey", "pooling = \"session\""));
    assert!(
        e.contains("line 5") && e.contains("miren-postgresql only"),
        "{e}"
    );
    let e = error(&toml("miren-postgresql", "pooling = 1"));
    assert!(e.contains("expected a string"), "{e}");
}

#[test]
fn tier_is_typed_and_postgresql_only() {
    let toml = |section: &str, body: &str| {
        format!(
            "name = \"a\"\n[services.web]\nimage = \"oven/bun:1\"\n[addons.{section}]\n{body}\n"
        )
    };
    let app = parse(&toml("miren-postgresql", "tier = \"medium\""));
    assert_eq!(app.addons[0].tier, Some(miren_addons::Tier::Medium));
    let app = parse(&toml("miren-postgresql", "variant = \"shared\""));
    assert_eq!(app.addons[0].tier, None);
    let e = error(&toml("miren-postgresql", "\ntier = \"huge\""));
    assert!(
        e.contains("line 6") && e.contains("addons.miren-postgresql.tier"),
        "{e}"
    );
    assert!(e.contains("small, medium, large"), "{e}");
    let e = error(&toml("miren-valkey", "tier = \"large\""));
    assert!(e.contains("miren-postgresql only"), "{e}");
    let e = error(&toml("miren-postgresql", "tier = 2"));
    assert!(e.contains("expected a string"), "{e}");
}

#[test]
fn client_connections_are_a_bounded_number_for_postgresql_only() {
    let toml = |section: &str, body: &str| {
        format!(
            "name = \"a\"\n[services.web]\nimage = \"oven/bun:1\"\n[addons.{section}]\n{body}\n"
        )
    };
    let app = parse(&toml("miren-postgresql", "client_connections = 1000"));
    assert_eq!(app.addons[0].client_connections, Some(1000));
    let app = parse(&toml("miren-postgresql", ""));
    assert_eq!(app.addons[0].client_connections, None);
    for bad in ["0", "2001", "-5"] {
        let e = error(&toml(
            "miren-postgresql",
            &format!("client_connections = {bad}"),
        ));
        assert!(
            e.contains("addons.miren-postgresql.client_connections")
                && e.contains("give 1 to 2000"),
            "{e}"
        );
    }
    let e = error(&toml("miren-postgresql", "client_connections = \"many\""));
    assert!(e.contains("expected a whole number"), "{e}");
    let e = error(&toml("miren-valkey", "client_connections = 10"));
    assert!(e.contains("miren-postgresql only"), "{e}");
}

// The Bun example from the addons announcement and docs, verbatim: it has no image.
const SEED_BUN: &str = r#"# .miren/app.toml
name = "my-app"
[services.web]
command = "bun run index.ts"
[addons.miren-postgresql]
variant = "shared"
"#;

#[test]
fn seed_bun_example_without_an_image_is_built_from_source() {
    let mut want = bun_app("my-app");
    want.services[0].image = ImageSource::Build {
        stack: None,
        base: None,
    };
    assert_eq!(parse(SEED_BUN), want);
}

#[test]
fn stack_and_base_override_detection() {
    let text = "name = \"a\"\n[services.web]\nstack = \"python\"\nbase = \"python:3.11\"\n";
    assert_eq!(
        parse(text).services[0].image,
        ImageSource::Build {
            stack: Some(Stack::Python),
            base: Some("python:3.11".into()),
        }
    );
}

#[test]
fn unknown_stack_names_the_stacks() {
    assert_eq!(
        error("name = \"a\"\n[services.web]\nstack = \"cobol\"\n"),
        ".miren/app.toml line 3: services.web.stack: unknown stack `cobol`; the stacks are: bun, \
         node, python, static (or set image = \"...\" to run a prebuilt image)"
    );
}

#[test]
fn image_and_stack_exclude_each_other() {
    assert_eq!(
        error("name = \"a\"\n[services.web]\nimage = \"x\"\nstack = \"bun\"\n"),
        ".miren/app.toml line 4: services.web.stack: `stack` builds the image from source, \
         `image` names a prebuilt one; keep one of them"
    );
}

#[test]
fn seed_bun_example_with_an_image_parses_exactly() {
    // The announcement names the app `my-app`, the docs `my-bun-app`; otherwise identical.
    for name in ["my-app", "my-bun-app"] {
        let text = SEED_BUN
            .replace(
                "[services.web]\n",
                "[services.web]\nimage = \"oven/bun:1\"\n",
            )
            .replace("\"my-app\"", &format!("{name:?}"));
        assert_eq!(parse(&text), bun_app(name));
    }
}

fn bun_app(name: &str) -> AppConfig {
    AppConfig {
        name: name.into(),
        services: vec![ServiceConfig {
            name: "web".into(),
            image: "oven/bun:1".into(),
            limits: Default::default(),
            command: Some(Command {
                raw: "bun run index.ts".into(),
                argv: argv(&["bun", "run", "index.ts"]),
            }),
            env: vec![],
            disks: vec![],
            health: None,
            strategy: Default::default(),
        }],
        addons: vec![pg(Variant::Shared, pg_version("17"), false)],
    }
}

#[test]
fn seed_docs_example_small_parses_exactly() {
    let text = r#"name = "myapp"
[services.web]
image = "node:22"
command = "npm start"
[addons.miren-postgresql]
variant = "small"
"#;
    let app = parse(text);
    assert_eq!(app.name, "myapp");
    assert_eq!(
        app.addons,
        vec![pg(Variant::Small, pg_version("17"), false)]
    );
    assert_eq!(app.addons[0].image_ref(), "postgres:17");
    assert_eq!(
        app.service("web").and_then(|s| s.command.clone()),
        Some(Command {
            raw: "npm start".into(),
            argv: argv(&["npm", "start"]),
        })
    );
}

#[test]
fn seed_addon_forms_parse() {
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    let cases = [
        ("[addons.miren-postgresql]\n", Variant::Small, pg_version("17"), false),
        (
            "[addons.miren-postgresql]\nvariant = \"small\"\nversion = \"16\"\n",
            Variant::Small,
            pg_version("16"),
            true,
        ),
        (
            "[addons.miren-postgresql]\nvariant = \"small\"\nversion = \"ghcr.io/my-org/postgres-with-pgvector:17.2\"\n",
            Variant::Small,
            ResolvedVersion::Image("ghcr.io/my-org/postgres-with-pgvector:17.2".into()),
            true,
        ),
        (
            "[addons.miren-postgresql]\nversion = 0x12\n",
            Variant::Small,
            pg_version("18"),
            true,
        ),
        (
            "[addons.miren-postgresql]\nversion = 18\n",
            Variant::Small,
            pg_version("18"),
            true,
        ),
    ];
    for (addon, variant, version, pinned) in cases {
        let app = parse(&format!("{base}{addon}"));
        assert_eq!(app.addons, vec![pg(variant, version, pinned)], "{addon}");
    }
    let app = parse(&format!("{base}{}", cases_image()));
    assert_eq!(
        app.addons[0].image_ref(),
        "ghcr.io/my-org/postgres-with-pgvector:17.2"
    );
}

fn cases_image() -> &'static str {
    "[addons.miren-postgresql]\nversion = \"ghcr.io/my-org/postgres-with-pgvector:17.2\"\n"
}

#[test]
fn seed_disk_example_postgres_with_storage_parses_exactly() {
    let text = r#"name = "myapp"
[services.db]
image = "postgres:16"
[[services.db.env]]
key = "POSTGRES_PASSWORD"
value = "secret"
[[services.db.env]]
key = "PGDATA"
value = "/var/lib/postgresql/data/pgdata"
[[services.db.disks]]
name = "myapp-postgres"
mount_path = "/var/lib/postgresql/data"
size_gb = 20
filesystem = "ext4"
"#;
    assert_eq!(
        parse(text).services,
        vec![ServiceConfig {
            name: "db".into(),
            image: "postgres:16".into(),
            limits: Default::default(),
            command: None,
            env: vec![
                EnvEntry {
                    key: "POSTGRES_PASSWORD".into(),
                    value: "secret".into()
                },
                EnvEntry {
                    key: "PGDATA".into(),
                    value: "/var/lib/postgresql/data/pgdata".into()
                },
            ],
            disks: vec![DiskConfig {
                name: "myapp-postgres".into(),
                mount_path: "/var/lib/postgresql/data".into(),
                read_only: false,
                provider: DiskProvider::Miren {
                    size_gb: 20,
                    filesystem: Filesystem::Ext4,
                    lease_timeout: None,
                },
            }],
            health: None,
            strategy: Default::default(),
        }]
    );
}

#[test]
fn seed_disk_examples_local_and_defaults() {
    let text = r#"name = "myapp"
[services.web]
image = "myapp:latest"
command = "node server.js"
[[services.web.disks]]
name = "data"
provider = "local"
mount_path = "/miren/data/local"
[[services.web.disks]]
name = "myapp-uploads"
mount_path = "/app/uploads"
size_gb = 50
[services.db]
image = "postgres:16"
[[services.db.disks]]
name = "pgdata"
provider = "local"
mount_path = "/var/lib/postgresql/data"
read_only = true
"#;
    let app = parse(text);
    let names: Vec<_> = app.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "db"], "source order, not sorted");
    let web = app.service("web").unwrap();
    assert_eq!(web.disks[0].provider, DiskProvider::Local);
    assert_eq!(
        web.disks[1].provider,
        DiskProvider::Miren {
            size_gb: 50,
            filesystem: Filesystem::Ext4,
            lease_timeout: None
        }
    );
    let db = app.service("db").unwrap();
    assert!(db.disks[0].read_only);
}

#[test]
fn lease_timeout_and_filesystems() {
    let text = r#"name = "a"
[services.web]
image = "x"
[[services.web.disks]]
name = "d"
mount_path = "/d"
size_gb = 1
filesystem = "xfs"
lease_timeout = "5m"
[[services.web.disks]]
name = "e"
mount_path = "/e"
size_gb = 1
filesystem = "btrfs"
lease_timeout = "1h 30s"
"#;
    let disks = &parse(text).services[0].disks;
    assert_eq!(
        disks[0].provider,
        DiskProvider::Miren {
            size_gb: 1,
            filesystem: Filesystem::Xfs,
            lease_timeout: Some(Duration::from_secs(300)),
        }
    );
    assert_eq!(
        disks[1].provider,
        DiskProvider::Miren {
            size_gb: 1,
            filesystem: Filesystem::Btrfs,
            lease_timeout: Some(Duration::from_secs(3630)),
        }
    );
}

const DISK_HEAD: &str = "name = \"a\"\n[services.web]\nimage = \"x\"\n\n[[services.web.disks]]\nname = \"d\"\nmount_path = \"/d\"\n";

#[test]
fn bad_size_names_line_and_field() {
    // Line 8, as the brief's example (line 7 there had one fewer header line).
    for (value, found) in [
        ("0", "found 0"),
        ("-1", "found -1"),
        ("1.5", "found a float"),
        ("\"10\"", "found a string"),
    ] {
        let err = error(&format!("{DISK_HEAD}size_gb = {value}\n"));
        assert_eq!(
            err,
            format!(
                ".miren/app.toml line 8: services.web.disks[0].size_gb: expected a positive integer (GiB), {found}"
            )
        );
    }
    let err = error(&format!("{DISK_HEAD}size_gb = 9999999999\n"));
    assert!(
        err.contains(
            "line 8: services.web.disks[0].size_gb: 9999999999 GiB is more than the limit"
        ),
        "{err}"
    );
}

#[test]
fn size_gb_is_required_for_miren_and_forbidden_for_local() {
    let err = error(DISK_HEAD);
    assert_eq!(
        err,
        ".miren/app.toml line 5: services.web.disks[0].size_gb: missing required field; miren \
         disks need a size in GiB to be created, e.g. size_gb = 10"
    );
    let err = error(&format!(
        "{DISK_HEAD}provider = \"local\"\nsize_gb = 1\nfilesystem = \"xfs\"\nlease_timeout = \"5m\"\n"
    ));
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with(".miren/app.toml line 9: services.web.disks[0].size_gb: not allowed with provider = \"local\""), "{err}");
    assert!(
        lines[1]
            .starts_with(".miren/app.toml line 10: services.web.disks[0].filesystem: not allowed"),
        "{err}"
    );
    assert!(
        lines[2].starts_with(
            ".miren/app.toml line 11: services.web.disks[0].lease_timeout: not allowed"
        ),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_named_with_the_valid_ones() {
    let cases = [
        (
            "name = \"a\"\nversion = 2\n[services.web]\nimage = \"x\"\n",
            ".miren/app.toml line 2: version: unknown field; valid fields here are: name, services, addons",
        ),
        (
            "name = \"a\"\n[services.web]\nimage = \"x\"\nport = 80\n",
            ".miren/app.toml line 4: services.web.port: unknown field; valid fields here are: image, stack, base, command, env, disks, memory, cpus, pids, disk, health, strategy",
        ),
        (
            "name = \"a\"\n[services.web]\nimage = \"x\"\n[[services.web.env]]\nkey = \"A\"\nvalue = \"b\"\nsecret = true\n",
            ".miren/app.toml line 7: services.web.env[0].secret: unknown field; valid fields here are: key, value",
        ),
        (
            &format!("{DISK_HEAD}size_gb = 1\nsizegb = 2\n"),
            ".miren/app.toml line 9: services.web.disks[0].sizegb: unknown field; did you mean `size_gb`? valid fields here are: name, provider, mount_path, size_gb, filesystem, read_only, lease_timeout",
        ),
        (
            "name = \"a\"\n[services.web]\nimage = \"x\"\n[addons.miren-postgresql]\nvariant = \"small\"\nsize = \"big\"\n",
            ".miren/app.toml line 6: addons.miren-postgresql.size: unknown field; valid fields here are: variant, version, pooling, tier, client_connections",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(error(text), want);
    }
}

#[test]
fn unknown_fields_suggest_a_close_one() {
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    let err = error(&format!(
        "{base}[addons.miren-postgresql]\nvarient = \"small\"\n"
    ));
    assert!(
        err.contains("addons.miren-postgresql.varient: unknown field; did you mean `variant`?"),
        "{err}"
    );
    let err = error("name = \"a\"\n[services.web]\nimag = \"x\"\n");
    assert!(
        err.contains("services.web.imag: unknown field; did you mean `image`?"),
        "{err}"
    );
    let err = error(&format!("{DISK_HEAD}size_gb = 1\nmountpath = \"/x\"\n"));
    assert!(err.contains("did you mean `mount_path`?"), "{err}");
}

#[test]
fn unknown_choices_list_the_valid_ones() {
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    let cases = [
        (
            format!("{base}[addons.redis]\n"),
            ".miren/app.toml line 4: addons.redis: unknown addon `redis`; available addons: miren-postgresql, miren-mysql, miren-valkey, miren-memcache, miren-rabbitmq".to_string(),
        ),
        (
            format!("{base}[addons.miren-postgresql]\nvariant = \"large\"\n"),
            ".miren/app.toml line 5: addons.miren-postgresql.variant: addon miren-postgresql has no variant `large`; choose one of: small (default), shared".to_string(),
        ),
        (
            format!("{base}[addons.miren-postgresql]\nversion = \"13\"\n"),
            ".miren/app.toml line 5: addons.miren-postgresql.version: addon miren-postgresql has no version `13`; choose one of: 14, 15, 16, 17 (default), 18, or a full image reference such as `ghcr.io/my-org/postgres-with-pgvector:17.2`".to_string(),
        ),
        (
            format!("{DISK_HEAD}size_gb = 1\nprovider = \"nfs\"\n"),
            ".miren/app.toml line 9: services.web.disks[0].provider: unknown provider `nfs`; choose one of: miren (default), local".to_string(),
        ),
        (
            format!("{DISK_HEAD}size_gb = 1\nfilesystem = \"zfs\"\n"),
            ".miren/app.toml line 9: services.web.disks[0].filesystem: unknown filesystem `zfs`; choose one of: ext4 (default), xfs, btrfs".to_string(),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(error(&text), want);
    }
    let err = error(&format!(
        "{base}[addons.miren-postgresql]\nversion = \"ghcr.io/My-Org/pg:1\"\n"
    ));
    assert!(
        err.starts_with(".miren/app.toml line 5: addons.miren-postgresql.version: version `ghcr.io/My-Org/pg:1` looks like an image reference but is not a valid one"),
        "{err}"
    );
}

#[test]
fn nasty_names_are_refused_where_they_are() {
    let long = "x".repeat(64);
    for bad in ["", "-web", "my_app", "a.b", "a b", "é", &long] {
        let err = error(&format!("name = {bad:?}\n[services.web]\nimage = \"x\"\n"));
        assert!(
            err.starts_with(".miren/app.toml line 1: name: app name"),
            "{bad:?}: {err}"
        );

        let err = error(&format!(
            "name = \"a\"\n[services.{bad:?}]\nimage = \"x\"\n"
        ));
        assert!(
            err.starts_with(".miren/app.toml line 2: services."),
            "{bad:?}: {err}"
        );
        assert!(err.contains(": service name"), "{bad:?}: {err}");

        let err = error(&format!(
            "name = \"a\"\n[services.web]\nimage = \"x\"\n[[services.web.disks]]\nname = {bad:?}\nmount_path = \"/d\"\nsize_gb = 1\n"
        ));
        assert!(
            err.starts_with(".miren/app.toml line 5: services.web.disks[0].name: disk name"),
            "{bad:?}: {err}"
        );
    }
    // Every name rule message says what is allowed.
    let err = error("name = \"my_app\"\n[services.web]\nimage = \"x\"\n");
    assert!(err.contains("only letters, digits and hyphens"), "{err}");
    // Odd keys are quoted in the field path.
    let err = error("name = \"a\"\n[services.\"we.b\"]\nimage = \"x\"\n");
    assert!(err.contains("services.\"we.b\": service name"), "{err}");
}

#[test]
fn missing_and_mistyped_top_level_fields() {
    assert_eq!(
        error("[services.web]\nimage = \"x\"\n"),
        ".miren/app.toml: name: missing required field; add e.g. name = \"my-app\" at the top"
    );
    assert_eq!(
        error("name = \"a\"\n"),
        ".miren/app.toml: services: missing required field; add at least one service, e.g. [services.web] with command = \"...\" (built from source) or image = \"...\""
    );
    assert_eq!(
        error("name = 5\n[services.web]\nimage = \"x\"\n"),
        ".miren/app.toml line 1: name: expected a string, found an integer"
    );
    assert_eq!(
        error("name = \"a\"\nservices = \"web\"\n"),
        ".miren/app.toml line 2: services: expected a table of services, e.g. [services.web], found a string"
    );
    assert_eq!(
        error("name = \"a\"\n[services.web]\nimage = \"x\"\ndisks = { name = \"d\" }\n"),
        ".miren/app.toml line 4: services.web.disks: expected an array of tables, written [[services.web.disks]], found a table"
    );
    assert_eq!(
        error("name = \"a\"\n[services.web]\nimage = \"x\"\n[[services.web.disks]]\nname = \"d\"\nmount_path = \"/d\"\nsize_gb = 1\nread_only = \"yes\"\n"),
        ".miren/app.toml line 8: services.web.disks[0].read_only: expected true or false, found a string"
    );
}

fn pg_version(name: &str) -> ResolvedVersion {
    AddonKind::Postgresql.parse_version(name).unwrap()
}

#[test]
fn several_addons_parse_and_clashing_variables_are_refused() {
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    let app = parse_app_toml(
        &format!(
            "{base}[addons.miren-postgresql]\n[addons.miren-valkey]\n[addons.miren-memcache]\n[addons.miren-rabbitmq]\nversion = \"3\"\n"
        ),
        ".miren/app.toml",
    )
    .unwrap();
    let images: Vec<String> = app.addons.iter().map(|a| a.image_ref()).collect();
    assert_eq!(
        images,
        [
            "postgres:17",
            "valkey/valkey:8",
            "memcached:1.6",
            "rabbitmq:3"
        ]
    );
    assert_eq!(
        error(&format!(
            "{base}[addons.miren-postgresql]\n[addons.miren-mysql]\nvariant = \"shared\"\n"
        )),
        ".miren/app.toml line 5: addons.miren-mysql: addons miren-postgresql and miren-mysql both set DATABASE_URL; an app can have only one of them: remove one of the two"
    );
    // A service's own entry naming an addon's variable is refused too.
    let err = error(&format!(
        "{base}env = [{{ key = \"REDIS_URL\", value = \"x\" }}]\n[addons.miren-valkey]\n"
    ));
    assert!(
        err.contains("`REDIS_URL` is injected by addon miren-valkey"),
        "{err}"
    );
}

#[test]
fn mistyped_addons_and_empty_services() {
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    assert_eq!(
        error(&format!("{base}[addons.miren-postgresql]\nversion = 1.5\n")),
        ".miren/app.toml line 5: addons.miren-postgresql.version: expected a version such as \"17\" or an image reference, found a float"
    );
    assert_eq!(
        error(&format!("{base}[addons]\nmiren-postgresql = \"small\"\n")),
        ".miren/app.toml line 5: addons.miren-postgresql: expected a table with optional variant, version, pooling, tier and client_connections, found a string"
    );
    assert_eq!(
        error(&format!("{base}[addons.miren-postgresql]\nvariant = 1\n")),
        ".miren/app.toml line 5: addons.miren-postgresql.variant: expected a string, found an integer"
    );
    assert_eq!(
        error("name = \"a\"\n[services]\n"),
        ".miren/app.toml line 2: services: no services; add at least one, e.g. [services.web] with image = \"...\""
    );
}

#[test]
fn toml_syntax_errors_give_the_line() {
    let err = error("name = \"a\"\n[services.web]\nimage = x\n");
    assert!(
        err.starts_with(".miren/app.toml line 3: invalid TOML: "),
        "{err}"
    );
    let err = error("name = \"a\"\nname = \"b\"\n");
    assert!(
        err.starts_with(".miren/app.toml line 2: invalid TOML: "),
        "{err}"
    );
}

#[test]
fn env_rules() {
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    let err = error(&format!(
        "{base}[[services.web.env]]\nkey = \"1BAD\"\nvalue = \"v\"\n"
    ));
    assert!(
        err.starts_with(
            ".miren/app.toml line 5: services.web.env[0].key: `1BAD` is not a valid variable name"
        ),
        "{err}"
    );

    let err = error(&format!(
        "{base}[[services.web.env]]\nkey = \"A\"\nvalue = \"1\"\n[[services.web.env]]\nkey = \"A\"\nvalue = \"2\"\n"
    ));
    assert_eq!(err, ".miren/app.toml line 8: services.web.env[1].key: `A` is already set earlier in this service");

    let err = error(&format!("{base}[[services.web.env]]\nkey = \"A\"\n"));
    assert!(
        err.starts_with(
            ".miren/app.toml line 4: services.web.env[0].value: missing required field"
        ),
        "{err}"
    );

    let err = error(&format!(
        "{base}[[services.web.env]]\nkey = \"DATABASE_URL\"\nvalue = \"postgres://elsewhere\"\n[addons.miren-postgresql]\n"
    ));
    assert_eq!(err, ".miren/app.toml line 5: services.web.env[0].key: `DATABASE_URL` is injected by addon miren-postgresql; remove this entry or the addon");

    // Without the addon the same variable is the user's own.
    let app = parse(&format!(
        "{base}[[services.web.env]]\nkey = \"DATABASE_URL\"\nvalue = \"\"\n"
    ));
    assert_eq!(app.services[0].env[0].value, "");
}

#[test]
fn disk_paths_and_duplicates() {
    for (path, want) in [
        ("data", "must be an absolute path"),
        ("/", "cannot mount over the root"),
        ("/a/../etc", "must not contain `..`"),
    ] {
        let err = error(&format!(
            "name = \"a\"\n[services.web]\nimage = \"x\"\n[[services.web.disks]]\nname = \"d\"\nmount_path = {path:?}\nsize_gb = 1\n"
        ));
        assert!(
            err.starts_with(".miren/app.toml line 6: services.web.disks[0].mount_path: ")
                && err.contains(want),
            "{err}"
        );
    }
    let disk = |name: &str, path: &str| {
        format!("[[services.web.disks]]\nname = \"{name}\"\nmount_path = \"{path}\"\nsize_gb = 1\n")
    };
    let base = "name = \"a\"\n[services.web]\nimage = \"x\"\n";
    let err = error(&format!("{base}{}{}", disk("d", "/a"), disk("d", "/b")));
    assert_eq!(err, ".miren/app.toml line 9: services.web.disks[1].name: disk `d` is already used by this service");
    let err = error(&format!("{base}{}{}", disk("d", "/a"), disk("e", "/a")));
    assert_eq!(err, ".miren/app.toml line 10: services.web.disks[1].mount_path: `/a` is already the mount path of another disk in this service");
}

#[test]
fn lease_timeout_must_be_a_positive_duration() {
    let err = error(&format!(
        "{DISK_HEAD}size_gb = 1\nlease_timeout = \"soon\"\n"
    ));
    assert!(
        err.starts_with(
            ".miren/app.toml line 9: services.web.disks[0].lease_timeout: `soon` is not a duration"
        ),
        "{err}"
    );
    let err = error(&format!("{DISK_HEAD}size_gb = 1\nlease_timeout = \"0s\"\n"));
    assert!(
        err.contains("lease_timeout: must be longer than zero"),
        "{err}"
    );
    let err = error(&format!("{DISK_HEAD}size_gb = 1\nlease_timeout = 300\n"));
    assert!(
        err.contains("lease_timeout: expected a string, found an integer"),
        "{err}"
    );
}

#[test]
fn every_problem_is_reported_in_line_order() {
    let text = r#"name = "bad_name"
[services.web]
command = "x"
port = 1
[addons.miren-postgresql]
variant = "huge"
"#;
    let err = parse_app_toml(text, PATH).unwrap_err();
    let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, [Some(1), Some(4), Some(6)], "{err}");
    let fields: Vec<_> = err.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "name",
            "services.web.port",
            "addons.miren-postgresql.variant"
        ]
    );
}

#[test]
fn commands_split_like_sh_or_run_under_it() {
    let cases: &[(&str, &[&str])] = &[
        ("bun run index.ts", &["bun", "run", "index.ts"]),
        ("  node   server.js ", &["node", "server.js"]),
        ("echo 'a b' \"c d\" e\\ f", &["echo", "a b", "c d", "e f"]),
        ("printf \"say \\\"hi\\\"\"", &["printf", "say \"hi\""]),
        (
            "npm start -- --port=3000",
            &["npm", "start", "--", "--port=3000"],
        ),
        ("a ''", &["a", ""]),
        ("a\tb\u{a0}c", &["a", "b\u{a0}c"]),
        ("echo $HOME", &["sh", "-c", "echo $HOME"]),
        ("a && b", &["sh", "-c", "a && b"]),
        ("a | b", &["sh", "-c", "a | b"]),
        ("ls *.ts", &["sh", "-c", "ls *.ts"]),
        (
            "NODE_ENV=production node x",
            &["sh", "-c", "NODE_ENV=production node x"],
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(miren_addons::command_argv(raw), Ok(argv(want)), "{raw}");
    }
    for (raw, want) in [
        ("echo 'oops", "unterminated ' quote"),
        ("echo \"oops", "unterminated \" quote"),
        ("echo oops\\", "lone backslash"),
        ("   ", "command is empty"),
    ] {
        let err = error(&format!(
            "name = \"a\"\n[services.web]\nimage = \"x\"\ncommand = {raw:?}\n"
        ));
        assert!(
            err.starts_with(".miren/app.toml line 4: services.web.command: ") && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn bad_images_are_refused() {
    let err = error("name = \"a\"\n[services.web]\nimage = \"My Image\"\n");
    assert!(
        err.starts_with(
            ".miren/app.toml line 3: services.web.image: `My Image` is not a valid image reference"
        ),
        "{err}"
    );
}

#[test]
fn arbitrary_input_never_panics() {
    // Every prefix and a byte flip at every position of a full file: errors, never a panic.
    let text = r#"name = "my-app"
[services.web]
image = "oven/bun:1"
command = "bun run 'index.ts'"
[[services.web.env]]
key = "PORT"
value = "3000"
[[services.web.disks]]
name = "data"
mount_path = "/data"
size_gb = 10
lease_timeout = "5m"
[addons.miren-postgresql]
variant = "shared"
version = "ghcr.io/x/pg:17"
"#;
    assert!(parse_app_toml(text, PATH).is_ok());
    let bytes = text.as_bytes();
    for i in 0..=bytes.len() {
        let prefix = String::from_utf8_lossy(&bytes[..i]);
        let _ = parse_app_toml(&prefix, PATH);
        for flip in [b'"', b'[', b'\n', b'=', 0xff, b'\\', b'.'] {
            if i < bytes.len() {
                let mut v = bytes.to_vec();
                v[i] = flip;
                let _ = parse_app_toml(&String::from_utf8_lossy(&v), PATH);
            }
        }
    }
}

#[test]
fn the_agents_own_names_are_refused_for_apps_and_disks() {
    for reserved in ["addon", "addon-pg", "Addon-PG-victim"] {
        let err = error(&format!(
            "name = {reserved:?}\n[services.web]\nimage = \"x\"\n"
        ));
        assert!(
            err.starts_with(".miren/app.toml line 1: name: app name") && err.contains("reserved"),
            "{reserved}: {err}"
        );
        let err = error(&format!(
            "name = \"a\"\n[services.web]\nimage = \"x\"\n[[services.web.disks]]\nname = {reserved:?}\nmount_path = \"/d\"\nsize_gb = 1\n"
        ));
        assert!(
            err.starts_with(".miren/app.toml line 5: services.web.disks[0].name: disk name")
                && err.contains("reserved"),
            "{reserved}: {err}"
        );
    }
    // A service may be called anything valid: services are found by (app, service).
    let config = parse("name = \"a\"\n[services.addon-pg]\nimage = \"x\"\n");
    assert_eq!(config.services[0].name, "addon-pg");
}

#[test]
fn service_limits_parse() {
    let text = r#"name = "limited"
[services.web]
image = "busybox"
memory = "1G"
cpus = 2
pids = 4096
disk = "2G"
[services.worker]
image = "busybox"
cpus = 0.5
"#;
    let services = parse(text).services;
    assert_eq!(
        services[0].limits,
        ServiceLimits {
            memory_bytes: Some(1 << 30),
            millicpus: Some(2000),
            pids: Some(4096),
            disk_bytes: Some(2 << 30),
        }
    );
    assert_eq!(
        services[1].limits,
        ServiceLimits {
            millicpus: Some(500),
            ..Default::default()
        }
    );
}

#[test]
fn bad_service_limits_name_line_and_field() {
    let text = r#"name = "limited"
[services.web]
image = "busybox"
memory = "lots"
cpus = 0
pids = 4611686018427387904
disk = "1K"
"#;
    let err = error(text);
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(
        lines[0].starts_with(".miren/app.toml line 4: services.web.memory: `lots` is not a size"),
        "{err}"
    );
    assert!(
        lines[1].starts_with(
            ".miren/app.toml line 5: services.web.cpus: expected a number of CPUs above 0"
        ),
        "{err}"
    );
    assert!(
        lines[2].starts_with(
            ".miren/app.toml line 6: services.web.pids: expected a task count from 1 to"
        ),
        "{err}"
    );
    assert!(
        lines[3].starts_with(".miren/app.toml line 7: services.web.disk: `1K` is out of range"),
        "{err}"
    );
    let err = error("name = \"x\"\n[services.web]\nimage = \"busybox\"\npids = \"many\"\n");
    assert!(
        err.contains("line 4: services.web.pids: expected an integer such as 1024, found a string"),
        "{err}"
    );
}
