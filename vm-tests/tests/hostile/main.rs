//! Hostile inputs: each test performs an attack on a real agent (or on the crate that holds the
//! boundary) and fails if the attack works. One module per boundary; docs/security.md lists
//! which test holds which boundary.

mod api;
mod disks;
mod exec_limits;
mod identity;
mod network;
mod unpack;
