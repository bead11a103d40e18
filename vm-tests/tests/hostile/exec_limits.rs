//! Hostile tests: exec_limits (see docs/security.md).
