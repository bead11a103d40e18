//! Size-capped log files rotated by rename: `stdout.log`, `stdout.log.1`, ... `.N`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    max_files: u32,
}

impl RotatingLog {
    pub(crate) fn open(path: &Path, max_bytes: u64, max_files: u32) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            max_files,
        })
    }

    /// Appends `buf`, rotating whenever the file would exceed the cap. Splits at the last
    /// newline that fits, so lines stay whole unless one line is longer than the cap.
    pub(crate) fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let room = self.max_bytes.saturating_sub(self.size) as usize;
            if buf.len() <= room {
                self.append(buf)?;
                return Ok(());
            }
            let cut = match buf[..room].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                // No whole line fits: start a fresh file, or split a line that is
                // longer than the cap.
                None if self.size > 0 => 0,
                None => room.max(1),
            };
            self.append(&buf[..cut])?;
            buf = &buf[cut..];
            self.rotate()?;
        }
        Ok(())
    }

    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.max_files == 0 {
            self.file.set_len(0)?;
        } else {
            for i in (1..self.max_files).rev() {
                let from = numbered(i);
                if from.exists() {
                    fs::rename(&from, numbered(i + 1))?;
                }
            }
            fs::rename(&self.path, numbered(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}
