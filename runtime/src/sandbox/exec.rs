//! Running a command inside a running sandbox.

use std::path::Path;

use super::SandboxError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub fn exec(
    _state_dir: &Path,
    _args: &[String],
    _env: &[String],
) -> Result<ExecOutput, SandboxError> {
    Err(SandboxError::NotRunning)
}
