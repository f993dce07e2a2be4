//! The client's socket as a protocol stream: whole frames in, buffered bytes out.
//!
//! Deliberately does not expose the raw socket: everything a session writes goes through
//! `wbuf` and is sent by `flush`, once per batch of messages.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::codec::{decode_raw, decode_startup, FrameError, StartupError, StartupPacket};
use crate::protocol::PgError;

/// Why reading from the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client closed the connection")]
    Closed,
    #[error("client I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Startup(#[from] StartupError),
}

/// Buffer capacity a client keeps between requests.
const KEEP_BUFFER: usize = 4096;

pub struct ClientConn {
    stream: TcpStream,
    /// Bytes received and not yet decoded.
    rbuf: BytesMut,
    /// Bytes queued for the client.
    pub wbuf: BytesMut,
    /// `wbuf` holds a message PostgreSQL itself would have sent at once (a notice, an
    /// error, a notification): send it before waiting on a shard again. Other answers
    /// wait for the end of the request, as PostgreSQL's own do.
    pub flush_soon: bool,
    /// Largest message accepted from this client (pool.max_message_bytes).
    max_message: u64,
    /// How many times `wbuf` was sent: tells a caller whether what it queued is still
    /// unsent (and can be taken back).
    flushes: u64,
    /// Keep the next relayed error in `wbuf` (not sent at once): the session may take it
    /// back and run the batch again.
    pub hold_first_error: bool,
}

/// What was queued for the client at some point (see `ClientConn::mark`).
#[derive(Clone, Copy)]
pub struct OutputMark {
    len: usize,
    flushes: u64,
    flush_soon: bool,
}

impl ClientConn {
    /// Remember what is queued now, to take back what is queued after it.
    pub fn mark(&self) -> OutputMark {
        OutputMark {
            len: self.wbuf.len(),
            flushes: self.flushes,
            flush_soon: self.flush_soon,
        }
    }

    /// Whether nothing queued since `m` has been sent (so it can still be taken back).
    pub fn unsent_since(&self, m: OutputMark) -> bool {
        self.flushes == m.flushes
    }

    /// What was queued since `m` (while `unsent_since(m)`).
    pub fn queued_since(&self, m: OutputMark) -> &[u8] {
        self.wbuf.get(m.len..).unwrap_or_default()
    }

    /// Drop what was queued since `m`, which must be unsent.
    pub fn take_back(&mut self, m: OutputMark) {
        self.wbuf.truncate(m.len);
        self.flush_soon = m.flush_soon;
    }

    pub fn new(stream: TcpStream, max_message: u64) -> ClientConn {
        ClientConn {
            stream,
            // Both buffers start empty and grow on demand: an idle client (thousands of
            // them) should hold next to nothing.
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            flush_soon: false,
            max_message,
            flushes: 0,
            hold_first_error: false,
        }
    }

    /// Bytes received from the client and not yet read as frames.
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Read whatever the client sent next into the buffer. Cancel-safe. Without room
    /// in the buffer, waits for the socket to be readable before growing it, so a
    /// client that sits idle holds no more read buffer than it already had.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        // poll_read_ready rather than `readable()`: it keeps the waker in the socket's
        // own reader slot instead of a mutex-guarded waiter list (one task owns it).
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)).await?;
            // Small to start with (most messages are); a large message makes the frame
            // decoder reserve what it needs.
            self.rbuf.reserve(1024);
        }
        // `read_buf` rather than `try_read_buf`: after a short read tokio knows the socket
        // is drained and clears its readiness, so the next wait costs no read that finds
        // nothing (one recv per statement less). Cancel-safe as well.
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(ClientError::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Change the largest message accepted (small before authentication).
    pub fn set_max_message(&mut self, max: u64) {
        self.max_message = max;
    }

    /// Give back buffer memory grown by a large request or answer, before waiting for
    /// the client's next message. Small buffers are kept: a busy client then reuses them
    /// instead of allocating on every request.
    pub fn shrink(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP_BUFFER {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > KEEP_BUFFER {
            self.wbuf = BytesMut::new();
        }
    }

    /// Read the untagged first packet of a connection.
    pub async fn read_startup(&mut self) -> Result<StartupPacket, ClientError> {
        loop {
            if let Some(p) = decode_startup(&mut self.rbuf)? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    /// Read one whole tagged frame (raw: tag, length, body). Cancel-safe.
    pub async fn read_raw(&mut self) -> Result<BytesMut, ClientError> {
        loop {
            if let Some(f) = decode_raw(&mut self.rbuf, self.max_message)? {
                return Ok(f);
            }
            self.shrink();
            self.fill().await?;
        }
    }

    /// Whether a whole frame is already buffered.
    pub fn has_buffered_frame(&self) -> bool {
        matches!(crate::protocol::codec::frame_len(&self.rbuf, self.max_message), Ok(Some(n)) if self.rbuf.len() >= n)
    }

    /// Whether bytes that arrived before the handshake finished are waiting (a client
    /// that pipelines after SSLRequest 'N' is fine; this is for the SSL answer only).
    pub fn has_pending_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.flush_soon = false;
        if !self.wbuf.is_empty() {
            self.flushes += 1;
            crate::backend::conn::write_out(&mut self.stream, &self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Write raw bytes straight away (e.g. the one-byte SSL refusal).
    pub async fn write_now(&mut self, b: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(b).await?;
        Ok(())
    }

    pub fn send_error(&mut self, e: &PgError) {
        e.encode(&mut self.wbuf);
    }

    pub fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into())
    }
}
