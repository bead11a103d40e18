//! Blocking `Write`/`Read` over a target's objects, for the snapshot code, which is
//! synchronous and runs on a blocking thread: each call waits on the runtime's handle.
//!
//! A write is a multipart upload: memory stays bounded (a few parts) whatever the size, and
//! the object appears under its key only when `finish` completes the upload. Dropped
//! unfinished, the upload is aborted, so a failed backup leaves nothing under the final key.

use std::io::{self, Read, Write};
use std::pin::Pin;

use hyper::body::Bytes;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;
use tokio_stream::{Stream, StreamExt};

use super::Target;
use crate::core::error::{Error, ErrorKind};

/// Part size of a multipart upload: S3 needs at least 5 MiB per part but the last.
const PART_BYTES: usize = 16 << 20;
/// Parts uploaded at once: bounds memory to about PART_BYTES times this.
const PARTS_IN_FLIGHT: usize = 2;

pub struct ObjectWriter {
    handle: Handle,
    upload: Option<BufWriter>,
    what: String,
}

impl ObjectWriter {
    /// Starts writing `key` in `target`. Call from a blocking thread.
    pub fn create(handle: Handle, target: &Target, key: &ObjectPath) -> ObjectWriter {
        let upload = BufWriter::with_capacity(target.store().clone(), key.clone(), PART_BYTES)
            .with_max_concurrency(PARTS_IN_FLIGHT);
        ObjectWriter {
            handle,
            upload: Some(upload),
            what: format!("{key} in backup target `{}`", target.name()),
        }
    }

    /// Completes the upload: only now does the object exist under its key.
    pub fn finish(mut self) -> Result<(), Error> {
        let Some(mut upload) = self.upload.take() else {
            return Err(Error::internal(format!(
                "writing {}: already finished",
                self.what
            )));
        };
        let what = self.what.clone();
        self.handle.block_on(async move {
            match upload.shutdown().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = upload.abort().await;
                    Err(Error::new(ErrorKind::Unavailable, "target_unreachable", format!(
                        "completing {what}: {e}; nothing was stored under that key, retry when the target is reachable"
                    )))
                }
            }
        })
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let upload = self
            .upload
            .as_mut()
            .ok_or_else(|| io::Error::other("the upload already ended"))?;
        self.handle.block_on(upload.write_all(buf))?;
        Ok(buf.len())
    }

    /// Parts are sent as they fill; the object is completed by `finish`, never by a flush.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            let _ = self.handle.block_on(upload.abort());
        }
    }
}

/// An object read as a stream, one network chunk at a time.
pub struct ObjectReader {
    handle: Handle,
    stream: Pin<Box<dyn Stream<Item = object_store::Result<Bytes>> + Send>>,
    chunk: Bytes,
    /// The object's size, for progress.
    pub size: u64,
}

impl ObjectReader {
    /// Opens `key` in `target`; a missing object is `not_found`. Call from a blocking thread.
    pub fn open(handle: Handle, target: &Target, key: &ObjectPath) -> Result<ObjectReader, Error> {
        let store = target.store().clone();
        let got = handle.block_on(store.get(key)).map_err(|e| match e {
            object_store::Error::NotFound { .. } => Error::not_found(format!(
                "no backup `{key}` in backup target `{}` ({})",
                target.name(),
                target.describe()
            )),
            other => Error::new(ErrorKind::Unavailable, "target_unreachable", format!(
                "reading {key} from backup target `{}`: {other}; retry when the target is reachable",
                target.name()
            )),
        })?;
        Ok(ObjectReader {
            handle,
            size: got.meta.size,
            stream: got.into_stream(),
            chunk: Bytes::new(),
        })
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}
