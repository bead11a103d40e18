//! The agent's services: what it does, without HTTP. Each takes typed requests and returns a
//! [`error::Error`] that says what went wrong and what to do.

pub mod addons;
pub mod app_addons;
pub mod apps;
pub mod backup;
pub mod build;
pub mod disks;
pub mod error;
pub mod images;
pub mod logs;
pub mod net;
pub mod owner;
pub mod sandboxes;
pub mod status;
pub mod targets;
pub mod validate;
