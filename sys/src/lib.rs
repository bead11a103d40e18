//! One home for each small Linux (and naming) helper that several crates need. Each module is
//! the only implementation of its primitive in the workspace: a change made here reaches every
//! caller, and the values that name on-disk or kernel objects are pinned by tests.

pub mod fnv;
pub mod fsmount;
pub mod mountinfo;
pub mod name;
pub mod percent;
pub mod printable;
pub mod proc;
pub mod sysfs;
pub mod timeline;
pub mod unmount;

pub use percent::percent_encode;
pub use printable::printable;
