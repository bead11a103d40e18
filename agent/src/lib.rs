//! The miren node agent: a root daemon that turns declarations into Linux primitives, and the
//! CLI that drives it over a Unix socket.
//!
//! Layers, each importing only those below it:
//! - `api`: the HTTP API on the Unix socket. Parses a request into a typed core call and maps the
//!   result (errors in one place, `api/error.rs`).
//! - `core`: the services (disks, backups, network, images, sandboxes, apps, addons). No HTTP.
//! - `store`: the SQLite state. No HTTP, no `/proc`.
//! - `cli`: the `miren` command line, a client of the API.
//! - `model`: the API's wire types, shared by `api` and `cli`.

pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod model;
pub mod server;
pub mod store;
pub mod util;
