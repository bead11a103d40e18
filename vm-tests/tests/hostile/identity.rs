//! Hostile tests: identity (see docs/security.md).
