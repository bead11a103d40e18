//! Hostile tests: disks (see docs/security.md).
