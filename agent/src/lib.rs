//! The miren node agent: a root daemon that turns declarations into Linux primitives, and the
//! CLI that drives it over a Unix socket.

pub mod addons;
pub mod api;
pub mod app_cli;
pub mod apps;
pub mod backup;
pub mod cli;
pub mod client;
pub mod config;
pub mod disks;
pub mod error;
pub mod image_cli;
pub mod images;
pub mod model;
pub mod net;
pub mod owner;
pub mod sandbox_cli;
pub mod sandboxes;
pub mod server;
pub mod snapshot_cli;
pub mod state;
pub mod status;
pub mod stream;
pub mod util;
pub mod validate;
