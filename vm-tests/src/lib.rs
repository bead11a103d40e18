//! Shared harness for privileged end-to-end tests.
