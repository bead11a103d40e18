//! Bridges between blocking snapshot code (std `Read`/`Write`) and HTTP bodies.

use std::io::{self, Read, Write};

use hyper::body::{Bytes, Frame};
use tokio::sync::mpsc;

/// Chunk size handed to the HTTP layer: big enough to keep syscalls rare.
const CHUNK: usize = 1 << 20;

/// An upload that sends nothing for this long is cut off (and its work undone).
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub type FrameResult = Result<Frame<Bytes>, io::Error>;

/// A `Write` whose bytes become HTTP body frames. Fails with BrokenPipe once the receiver
/// (the client's connection) is gone, which stops the work that writes into it.
pub struct ChannelWriter {
    tx: mpsc::Sender<FrameResult>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<FrameResult>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(Frame::data(data)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send_buffer()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// A `Read` over body chunks forwarded from an async task.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    /// An end or error [`Self::wait_for_data`] saw, handed to the next read.
    pending: Option<Option<io::Result<Bytes>>>,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            pending: None,
        }
    }

    /// Waits (without a thread) until the first bytes, the end, or an error arrived.
    pub async fn wait_for_data(&mut self) {
        if !self.current.is_empty() || self.pending.is_some() {
            return;
        }
        match self.rx.recv().await {
            Some(Ok(bytes)) => self.current = bytes,
            other => self.pending = Some(other),
        }
    }

    /// Reads and discards the rest, so the client finishes sending and sees our answer.
    pub fn drain(&mut self) {
        while let Some(Ok(_)) = self.rx.blocking_recv() {}
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current.is_empty() {
                let n = out.len().min(self.current.len());
                out[..n].copy_from_slice(&self.current[..n]);
                self.current = self.current.slice(n..);
                return Ok(n);
            }
            let next = match self.pending.take() {
                Some(next) => next,
                None => self.rx.blocking_recv(),
            };
            match next {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
    }
}

/// Forwards an HTTP request body into a channel a `ChannelReader` reads from.
pub fn forward_body(body: axum::body::Body) -> ChannelReader {
    use http_body_util::BodyExt;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut body = body;
        loop {
            let frame = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    let _ = tx
                        .send(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the upload stalled: nothing arrived for {}s; send the body without pauses",
                                BODY_IDLE_TIMEOUT.as_secs()
                            ),
                        )))
                        .await;
                    break;
                }
            };
            let item = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => Ok(data),
                    Err(_) => continue, // trailers carry nothing we need
                },
                Err(e) => Err(io::Error::other(format!("the upload broke off: {e}"))),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    ChannelReader::new(rx)
}
