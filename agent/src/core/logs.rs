//! A sandbox's logs: what it wrote so far (every rotation, oldest first; stdout, then stderr),
//! then, when followed, what its current files gain. The supervisor rotates a full log by
//! renaming it and starting a new file; a follower notices that as a file shorter than what
//! it has sent, and starts over at the new file's beginning.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::core::error::Error;
use crate::core::sandboxes::SandboxService;

/// How often a follower looks at the current files.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A sandbox's log files, found when the logs were asked for.
pub struct SandboxLogs {
    sandbox: String,
    stdout: Vec<PathBuf>,
    stderr: Vec<PathBuf>,
}

impl SandboxService {
    /// The logs of a sandbox (by id or name); not found if there is no such sandbox.
    pub fn logs(&self, id_or_name: &str) -> Result<SandboxLogs, Error> {
        let (stdout, stderr) = self.log_files(id_or_name)?;
        Ok(SandboxLogs {
            sandbox: id_or_name.to_string(),
            stdout,
            stderr,
        })
    }

    /// Sends the logs into `out` in chunks; with `follow`, keeps sending new output until the
    /// sandbox is deleted or the receiver is gone.
    pub async fn send_logs(&self, logs: SandboxLogs, follow: bool, out: mpsc::Sender<Vec<u8>>) {
        let sandbox = logs.sandbox.clone();
        logs.send(follow, || self.get(&sandbox).is_ok(), out).await;
    }
}

impl SandboxLogs {
    /// Sends every file's contents, then (with `follow`) what the current files gain, for as
    /// long as `still_there` says the sandbox exists and `out` has a receiver.
    async fn send(self, follow: bool, still_there: impl Fn() -> bool, out: mpsc::Sender<Vec<u8>>) {
        for file in self.stdout.iter().chain(self.stderr.iter()) {
            if let Ok(bytes) = tokio::fs::read(file).await {
                if !bytes.is_empty() && out.send(bytes).await.is_err() {
                    return;
                }
            }
        }
        if !follow {
            return;
        }
        let current = [self.stdout.last(), self.stderr.last()];
        let mut tail = LogTail::at_end_of(current.into_iter().flatten().map(PathBuf::as_path));
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            if !still_there() {
                return;
            }
            // Reading files blocks; the tail travels to a blocking thread and back.
            let Ok((back, chunks)) = tokio::task::spawn_blocking(move || {
                let chunks = tail.read_new();
                (tail, chunks)
            })
            .await
            else {
                return;
            };
            tail = back;
            for chunk in chunks {
                if out.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Files followed from where the reader has got to.
pub struct LogTail {
    files: Vec<(PathBuf, u64)>,
}

impl LogTail {
    /// Follows `files` from their current ends (a missing file from its beginning).
    pub fn at_end_of<'a>(files: impl IntoIterator<Item = &'a Path>) -> Self {
        let files = files
            .into_iter()
            .map(|path| {
                let len = std::fs::metadata(path).map_or(0, |m| m.len());
                (path.to_path_buf(), len)
            })
            .collect();
        LogTail { files }
    }

    /// What each file gained since the last call, in the order the files were given. A file
    /// shorter than what was read was rotated: it is read from its beginning. A file that
    /// cannot be read is skipped until it can.
    pub fn read_new(&mut self) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        for (path, offset) in &mut self.files {
            let Ok(mut file) = File::open(&*path) else {
                continue;
            };
            let Ok(len) = file.metadata().map(|m| m.len()) else {
                continue;
            };
            if len < *offset {
                *offset = 0;
            }
            if len == *offset || file.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_err() || bytes.is_empty() {
                continue;
            }
            *offset += bytes.len() as u64;
            chunks.push(bytes);
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_tail_sends_what_the_files_gain_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (stdout, stderr) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
        append(&stdout, "old out\n");
        append(&stderr, "old err\n");
        let mut tail = LogTail::at_end_of([stdout.as_path(), stderr.as_path()]);
        assert!(tail.read_new().is_empty());
        append(&stderr, "err 1\n");
        append(&stdout, "out 1\n");
        assert_eq!(
            tail.read_new(),
            vec![b"out 1\n".to_vec(), b"err 1\n".to_vec()]
        );
        assert!(tail.read_new().is_empty());
    }

    #[test]
    fn a_rotated_file_is_read_from_its_beginning() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        append(&log, "a long first line\n");
        let mut tail = LogTail::at_end_of([log.as_path()]);
        std::fs::rename(&log, dir.path().join("stdout.log.1")).unwrap();
        append(&log, "new\n");
        assert_eq!(tail.read_new(), vec![b"new\n".to_vec()]);
        append(&log, "more\n");
        assert_eq!(tail.read_new(), vec![b"more\n".to_vec()]);
    }

    #[test]
    fn a_missing_file_is_followed_from_its_beginning_once_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let mut tail = LogTail::at_end_of([log.as_path()]);
        assert!(tail.read_new().is_empty());
        append(&log, "first\n");
        assert_eq!(tail.read_new(), vec![b"first\n".to_vec()]);
    }

    #[tokio::test]
    async fn logs_are_sent_oldest_rotation_first_then_followed_until_the_sandbox_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            append(&path, text);
            path
        };
        let logs = SandboxLogs {
            sandbox: "s".into(),
            stdout: vec![file("stdout.log.1", "o1\n"), file("stdout.log", "o2\n")],
            stderr: vec![file("stderr.log", "e1\n")],
        };
        let current = dir.path().join("stdout.log");
        let (tx, mut rx) = mpsc::channel(16);
        let there = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still_there = {
            let there = there.clone();
            move || there.load(std::sync::atomic::Ordering::SeqCst)
        };
        let sender = tokio::spawn(logs.send(true, still_there, tx));
        for expected in ["o1\n", "o2\n", "e1\n"] {
            assert_eq!(rx.recv().await.unwrap(), expected.as_bytes());
        }
        append(&current, "o3\n");
        assert_eq!(rx.recv().await.unwrap(), b"o3\n");
        there.store(false, std::sync::atomic::Ordering::SeqCst);
        sender.await.unwrap();
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn without_follow_only_what_was_written_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        append(&path, "only\n");
        let logs = SandboxLogs {
            sandbox: "s".into(),
            stdout: vec![path],
            stderr: vec![dir.path().join("stderr.log")],
        };
        let (tx, mut rx) = mpsc::channel(16);
        logs.send(false, || true, tx).await;
        assert_eq!(rx.recv().await.unwrap(), b"only\n");
        assert!(rx.recv().await.is_none());
    }
}
