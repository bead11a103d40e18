//! Hostile tests: unpack (see docs/security.md).
