//! Bridges between core work (std `Read`/`Write`, channels of chunks) and HTTP bodies.

use std::io::{self, Read, Write};

use axum::http::{header, HeaderValue};
use axum::response::Response;
use hyper::body::{Bytes, Frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::core::error::Error;

/// Chunk size handed to the HTTP layer: big enough to keep syscalls rare.
const CHUNK: usize = 1 << 20;

/// An upload that sends nothing for this long is cut off (and its work undone).
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub type FrameResult = Result<Frame<Bytes>, io::Error>;

/// A response of `content_type` whose body is `frames`, sent as they come.
pub fn response(
    frames: impl Stream<Item = FrameResult> + Send + 'static,
    content_type: &'static str,
) -> Response {
    let mut response = Response::new(axum::body::Body::new(http_body_util::StreamBody::new(
        frames,
    )));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Body frames of the chunks core work sends into a channel.
/// One event of an NDJSON response: its JSON and a newline.
pub fn ndjson_line(event: &impl serde::Serialize) -> FrameResult {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Ok(Frame::data(Bytes::from(bytes)))
}

pub fn chunks(rx: mpsc::Receiver<Vec<u8>>) -> impl Stream<Item = FrameResult> {
    ReceiverStream::new(rx).map(|chunk| Ok(Frame::data(Bytes::from(chunk))))
}

/// Body frames of what `write` writes, run on a blocking thread. A failure ends the body with
/// an error frame, which aborts the response: the client never takes a truncated stream for
/// a whole one.
pub fn written_by(
    write: impl FnOnce(&mut ChannelWriter) -> Result<(), Error> + Send + 'static,
) -> ReceiverStream<FrameResult> {
    let (tx, rx) = mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter::new(tx.clone());
        if let Err(e) = write(&mut out) {
            let _ = tx.blocking_send(Err(io::Error::other(e.message)));
        }
    });
    ReceiverStream::new(rx)
}

/// A `Write` whose bytes become HTTP body frames. Fails with BrokenPipe once the receiver
/// (the client's connection) is gone, which stops the work that writes into it.
pub struct ChannelWriter {
    tx: mpsc::Sender<FrameResult>,
    buf: Vec<u8>,
    /// The runtime the response is served on, to wait for a slow reader with a bound.
    runtime: Option<tokio::runtime::Handle>,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<FrameResult>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let frame = Ok(Frame::data(data));
        let gone = |_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away");
        let Some(runtime) = &self.runtime else {
            return self.tx.blocking_send(frame).map_err(gone);
        };
        // A client that stops reading does not hold this thread (and a frozen disk's
        // capture) for ever.
        match runtime.block_on(tokio::time::timeout(BODY_IDLE_TIMEOUT, self.tx.send(frame))) {
            Ok(sent) => sent.map_err(gone),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {}s; the download was cut off",
                    BODY_IDLE_TIMEOUT.as_secs()
                ),
            )),
        }
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
    /// The client stopped sending for [`BODY_IDLE_TIMEOUT`].
    stalled: bool,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            pending: None,
            stalled: false,
        }
    }

    /// True once the upload was cut off for sending nothing for [`BODY_IDLE_TIMEOUT`].
    pub fn stalled(&self) -> bool {
        self.stalled
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
                Some(Err(e)) => {
                    self.stalled |= e.kind() == io::ErrorKind::TimedOut;
                    return Err(e);
                }
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
