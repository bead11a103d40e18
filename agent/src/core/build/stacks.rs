//! The stacks catalogue: how a source tree is recognised, which base image it runs on, what
//! its dependency step is and what it runs by default. Table in docs/builds.md; a new stack is
//! one more entry here (and its name in `miren_addons::Stack`).

use miren_addons::Stack;
use miren_runtime::SourceTree;

use crate::core::error::Error;

/// A stack's dependency step: run in a build sandbox on the base image with the source at
/// `/app`; what it leaves in `$DEPS` becomes a layer at `/app/<into>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DependencyStep {
    /// Runs when one of these files exists; they (all that exist) key the cached layer.
    pub when: &'static [&'static str],
    /// Files that also key the cache when present (manifests next to the lockfile).
    pub inputs: &'static [&'static str],
    /// `sh -c` script, run in `/app`; must leave its result in `$DEPS`.
    pub script: &'static str,
    /// Where `/deps` ends up under `/app`.
    pub into: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct StackDef {
    pub stack: Stack,
    /// The base image (an official image's name; `scripts/images` builds them locally).
    pub base: &'static str,
    /// What detection looks for, as the error and docs say it.
    pub looks_for: &'static str,
    pub deps: &'static [DependencyStep],
    /// Extra environment of the built image.
    pub env: &'static [&'static str],
}

pub const CATALOGUE: &[StackDef] = &[
    StackDef {
        stack: Stack::Bun,
        base: "oven/bun:1",
        looks_for: "bun.lock or bun.lockb, a command starting with `bun`, or .ts files without package.json",
        deps: &[DependencyStep {
            when: &["bun.lock", "bun.lockb"],
            inputs: &["package.json"],
            script: "bun install --frozen-lockfile && cp -a node_modules/. \"$DEPS\"/",
            into: "node_modules",
        }],
        env: &[],
    },
    StackDef {
        stack: Stack::Node,
        base: "library/node:18",
        looks_for: "package.json",
        deps: &[DependencyStep {
            when: &["package-lock.json"],
            inputs: &["package.json"],
            script: "npm ci --no-audit --no-fund && cp -a node_modules/. \"$DEPS\"/",
            into: "node_modules",
        }],
        env: &[],
    },
    StackDef {
        stack: Stack::Python,
        base: "library/python:3.11",
        looks_for: "requirements.txt or pyproject.toml",
        deps: &[DependencyStep {
            when: &["requirements.txt"],
            inputs: &[],
            // Vendored wheels (a `wheels/` directory) are used offline when present.
            script: "if [ -d wheels ]; then set -- --no-index --find-links wheels; fi; pip install --no-cache-dir --disable-pip-version-check --target \"$DEPS\" -r requirements.txt \"$@\"",
            into: ".deps",
        }],
        env: &["PYTHONPATH=/app/.deps"],
    },
    StackDef {
        stack: Stack::Static,
        base: "library/busybox:1.35",
        looks_for: "index.html (and no package.json, requirements.txt or pyproject.toml)",
        deps: &[],
        env: &[],
    },
];

pub fn def(stack: Stack) -> &'static StackDef {
    CATALOGUE
        .iter()
        .find(|d| d.stack == stack)
        .unwrap_or(&CATALOGUE[0])
}

/// The stack a tree is, by the catalogue's rules in order; an error listing what was looked for.
pub fn detect(tree: &SourceTree, command: &[String]) -> Result<Stack, Error> {
    let has = |name: &str| tree.is_file(name);
    let top_level_ts = tree
        .names()
        .any(|n| !n.contains('/') && n.ends_with(".ts") && tree.is_file(n));
    if has("bun.lock")
        || has("bun.lockb")
        || command.first().is_some_and(|c| c == "bun" || c == "bunx")
        || (top_level_ts && !has("package.json"))
    {
        return Ok(Stack::Bun);
    }
    if has("package.json") {
        return Ok(Stack::Node);
    }
    if has("requirements.txt") || has("pyproject.toml") {
        return Ok(Stack::Python);
    }
    if has("index.html") {
        return Ok(Stack::Static);
    }
    let looked: Vec<String> = CATALOGUE
        .iter()
        .map(|d| format!("{} ({})", d.stack, d.looks_for))
        .collect();
    Err(Error::new(
        crate::core::error::ErrorKind::Unprocessable,
        "stack_unknown",
        format!(
            "cannot tell how to build this source: looked for {}; set `stack = \"...\"` (one of bun, node, python, static) or `image = \"...\"` under the service in .miren/app.toml",
            looked.join("; ")
        ),
    ))
}

/// The command a stack runs when app.toml gives none.
pub fn default_command(stack: Stack, tree: &SourceTree) -> Vec<String> {
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
    match stack {
        Stack::Bun if tree.is_file("index.ts") => words(&["bun", "run", "index.ts"]),
        Stack::Bun => words(&["bun", "run", "start"]),
        Stack::Node => words(&["npm", "start"]),
        Stack::Python if tree.is_file("main.py") => words(&["python3", "main.py"]),
        Stack::Python => words(&["python3", "app.py"]),
        Stack::Static => words(&[
            "sh",
            "-c",
            "exec busybox httpd -f -v -p \"${PORT:-3000}\" -h /app",
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> SourceTree {
        let mut b = tar::Builder::new(Vec::new());
        for name in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &b"{}"[..]).unwrap();
        }
        let bytes = b.into_inner().unwrap();
        let spool = tempfile::tempfile().unwrap();
        SourceTree::read(&bytes[..], miren_runtime::SourceLimits::default(), spool).unwrap()
    }

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn detection_follows_the_catalogue_order() {
        let none: Vec<String> = Vec::new();
        assert_eq!(detect(&tree(&["index.ts"]), &none).unwrap(), Stack::Bun);
        assert_eq!(
            detect(&tree(&["package.json", "bun.lock"]), &none).unwrap(),
            Stack::Bun
        );
        assert_eq!(
            detect(
                &tree(&["package.json", "server.js"]),
                &argv(&["bun", "run", "x"])
            )
            .unwrap(),
            Stack::Bun
        );
        assert_eq!(
            detect(&tree(&["package.json", "index.ts"]), &none).unwrap(),
            Stack::Node
        );
        assert_eq!(
            detect(&tree(&["pyproject.toml"]), &none).unwrap(),
            Stack::Python
        );
        assert_eq!(
            detect(&tree(&["index.html", "style.css"]), &none).unwrap(),
            Stack::Static
        );
        // A .ts file below the top is not an entry file.
        assert!(detect(&tree(&["src/x.ts"]), &none).is_err());
    }

    #[test]
    fn an_unknown_tree_lists_what_was_looked_for_and_the_fix() {
        let err = detect(&tree(&["README.md"]), &[]).unwrap_err();
        assert_eq!(err.code, "stack_unknown");
        for want in [
            "bun.lock",
            "package.json",
            "requirements.txt",
            "index.html",
            "stack = ",
            "image = ",
        ] {
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }

    #[test]
    fn default_commands() {
        assert_eq!(
            default_command(Stack::Bun, &tree(&["index.ts"])),
            argv(&["bun", "run", "index.ts"])
        );
        assert_eq!(
            default_command(Stack::Python, &tree(&["main.py"])),
            argv(&["python3", "main.py"])
        );
        assert_eq!(
            default_command(Stack::Node, &tree(&[])),
            argv(&["npm", "start"])
        );
    }
}
