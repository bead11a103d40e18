//! Hostile tests: api (see docs/security.md).
