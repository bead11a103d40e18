//! Hostile tests: network (see docs/security.md).
