//! The app's source as `miren deploy` sends it to be built: one tar of the directory, leaving
//! out `.git`, `.miren` and what `.gitignore`/`.dockerignore` exclude (the `ignore` crate's
//! rules), symlinks kept as links and never followed, with size and count limits checked from
//! metadata before a file is read.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Same limits as the agent's (`miren_runtime::SourceLimits::default()`), checked here first so
/// the error comes before the upload.
pub const MAX_BYTES: u64 = 512 << 20;
pub const MAX_ENTRIES: u64 = 100_000;

/// A packed source: the tar in an unlinked temp file, rewound.
pub struct PackedSource {
    pub file: File,
    pub files: u64,
    pub bytes: u64,
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub fn human_bytes(bytes: u64) -> String {
    human(bytes)
}

pub fn pack(dir: &Path) -> Result<PackedSource> {
    pack_with(dir, MAX_BYTES, MAX_ENTRIES)
}

pub fn pack_with(dir: &Path, max_bytes: u64, max_entries: u64) -> Result<PackedSource> {
    let root = dir
        .canonicalize()
        .with_context(|| format!("reading {}", dir.display()))?;
    let walker = ignore::WalkBuilder::new(&root)
        .hidden(false)
        .parents(false)
        .ignore(false)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .git_ignore(true)
        .add_custom_ignore_filename(".dockerignore")
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|e| {
            let name = e.file_name();
            !(name == ".git" || (name == ".miren" && e.depth() == 1))
        })
        .build();
    let file = tempfile::tempfile().context("creating a temporary file for the source tar")?;
    let mut tar = tar::Builder::new(file);
    tar.follow_symlinks(false);
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in walker {
        let entry = entry.with_context(|| format!("reading {}", root.display()))?;
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(&root)
            .with_context(|| format!("{} is outside {}", path.display(), root.display()))?;
        // Not followed: a symlink's own metadata.
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading {}", path.display()))?;
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            eprintln!(
                "skipping {}: not a file, directory or symlink",
                rel.display()
            );
            continue;
        }
        files += 1;
        if files > max_entries {
            bail!(
                "{} has more than {max_entries} files and directories to send (the build's file-count limit); exclude generated directories (node_modules, .venv, build output) with .gitignore or .dockerignore",
                root.display()
            );
        }
        if kind.is_file() {
            bytes = bytes.saturating_add(meta.len());
            if bytes > max_bytes {
                bail!(
                    "the source in {} is over the build's size limit of {} at {} ({}); exclude large files with .gitignore or .dockerignore, or build an image yourself and set image = \"...\" in .miren/app.toml",
                    root.display(),
                    human(max_bytes),
                    rel.display(),
                    human(meta.len())
                );
            }
        }
        tar.append_path_with_name(path, rel)
            .with_context(|| format!("adding {} to the source tar", rel.display()))?;
    }
    let mut file = tar.into_inner().context("finishing the source tar")?;
    file.seek(SeekFrom::Start(0))
        .context("rewinding the source tar")?;
    Ok(PackedSource { file, files, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(packed: PackedSource) -> Vec<String> {
        let mut ar = tar::Archive::new(packed.file);
        ar.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn leaves_out_git_miren_and_ignored_files_and_keeps_symlinks_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(".git")).unwrap();
        std::fs::write(d.join(".git/HEAD"), "x").unwrap();
        std::fs::create_dir_all(d.join(".miren")).unwrap();
        std::fs::write(d.join(".miren/app.toml"), "x").unwrap();
        std::fs::write(d.join(".gitignore"), "secret.txt\n").unwrap();
        std::fs::write(d.join(".dockerignore"), "big/\n").unwrap();
        std::fs::write(d.join("secret.txt"), "x").unwrap();
        std::fs::create_dir_all(d.join("big")).unwrap();
        std::fs::write(d.join("big/blob"), "x").unwrap();
        std::fs::write(d.join("index.ts"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("out")).unwrap();
        let packed = pack(d).unwrap();
        assert_eq!(
            names(packed),
            [".dockerignore", ".gitignore", "index.ts", "out"]
        );
        let packed = pack(d).unwrap();
        let mut ar = tar::Archive::new(packed.file);
        let link = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("out"))
            .unwrap();
        assert_eq!(link.header().entry_type(), tar::EntryType::Symlink);
        assert_eq!(link.size(), 0);
    }

    #[test]
    fn limits_are_checked_from_metadata_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("huge.img")).unwrap();
        f.set_len(10 << 30).unwrap(); // sparse: 10 GiB, nothing allocated
        let err = pack(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("size limit of 512.0 MiB at huge.img (10.0 GiB)"),
            "{err}"
        );
        assert!(err.contains(".gitignore or .dockerignore"), "{err}");
        for i in 0..4 {
            std::fs::write(dir.path().join(format!("f{i}")), "").unwrap();
        }
        std::fs::remove_file(dir.path().join("huge.img")).unwrap();
        let err = pack_with(dir.path(), 1 << 20, 3).err().unwrap().to_string();
        assert!(err.contains("more than 3 files"), "{err}");
    }
}
