//! Pulls the images `scripts/images` serves, as the agent will. Opt-in:
//! runs only when MIREN_IMAGE_MIRROR is set, e.g.
//!   export "$(scripts/images | tail -n 1)"

mod common;

use std::os::unix::fs::MetadataExt;

use miren_runtime::{ImageStore, Mirrors, PullOptions, MIRROR_ENV};

#[tokio::test]
async fn pulls_images_built_by_scripts_images() {
    let Ok(list) = std::env::var(MIRROR_ENV) else {
        // Under CI a missing mirror is a broken setup, not a reason to pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "{MIRROR_ENV} is not set under CI: scripts/test must export it"
        );
        eprintln!("skipped: set {MIRROR_ENV} (export \"$(scripts/images | tail -n 1)\")");
        return;
    };
    let opts = PullOptions {
        mirrors: Mirrors::parse_list(&list, false).expect("mirrors"),
        ..Default::default()
    };
    let data = common::tempdir();
    let store = ImageStore::open(data.path()).expect("open");

    let bb = store.pull("busybox", &opts).await.expect("busybox");
    assert_eq!(bb.reference, "docker.io/library/busybox:latest");
    let root = &store.layer_dirs(&bb).expect("dirs")[0];
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).expect("sh"),
        std::path::Path::new("busybox")
    );

    for (tag, major) in [("17", "17"), ("15", "15")] {
        let pg = store
            .pull(&format!("postgres:{tag}"), &opts)
            .await
            .expect("postgres");
        assert_eq!(pg.config.entrypoint, ["docker-entrypoint.sh"]);
        assert_eq!(pg.config.cmd, ["postgres"]);
        assert!(pg
            .config
            .env
            .iter()
            .any(|e| e == "PGDATA=/var/lib/postgresql/data"));
        let dirs = store.layer_dirs(&pg).expect("dirs");
        let top = dirs.last().expect("layers");
        assert!(top.join("usr/local/bin/docker-entrypoint.sh").is_file());
        assert_eq!(
            std::fs::metadata(top.join("var/lib/postgresql/data"))
                .expect("pgdata")
                .uid(),
            999
        );
        assert!(dirs[0]
            .join(format!("usr/lib/postgresql/{major}/bin/postgres"))
            .is_file());
        let passwd = std::fs::read_to_string(dirs[0].join("etc/passwd")).expect("passwd");
        assert!(passwd.contains("postgres:x:999:999:"));
    }

    // debian:bookworm-slim and oven/bun:1 share their base layer.
    let deb = store
        .pull("debian:bookworm-slim", &opts)
        .await
        .expect("debian");
    let base = store.layer_path(&deb.layers[0].diff_id).expect("path");
    let ino = std::fs::metadata(&base).expect("stat").ino();
    let bun = store.pull("oven/bun:1", &opts).await.expect("bun");
    assert_eq!(bun.layers[0].diff_id, deb.layers[0].diff_id);
    assert_eq!(std::fs::metadata(&base).expect("stat").ino(), ino);
    assert!(store.layer_dirs(&bun).expect("dirs")[1]
        .join("usr/local/bin/bun")
        .is_file());
}
