//! Container runtime: image handling and sandboxes.

pub mod sandbox;
