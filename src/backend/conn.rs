//! One protocol connection to a shard: connect, authenticate, read frames, write bytes.
//!
//! The connection keeps its own read and write buffers so a relay can forward frames
//! without copying them twice. It knows what state the server is in (transaction status,
//! which prepared statements exist, which session settings are applied) so the pool can
//! tell whether it may be reused.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::codec::{frame_len, Frame, PROTOCOL_3_0};
use crate::protocol::error::summarize_error;
use crate::protocol::messages::{self, parse_parameter_status};
use crate::topology::{Shard, ShardId};

use super::BackendError;

/// Largest message accepted from a shard (PostgreSQL's own limit for a field is 1 GB).
pub const MAX_BACKEND_MESSAGE: u64 = 1 << 30;

/// A live, authenticated connection to one shard.
pub struct ServerConn {
    /// Which shard this talks to (index in the topology).
    pub shard: ShardId,
    /// The shard's name, for errors and logs.
    pub shard_name: String,
    stream: TcpStream,
    /// Bytes read from the server and not yet consumed.
    rbuf: BytesMut,
    /// Bytes queued for the server, sent by `flush`.
    pub wbuf: BytesMut,
    /// Where to send a CancelRequest for this connection.
    pub addr: SocketAddr,
    /// The server's BackendKeyData, for cancelling.
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values the server reported at startup.
    pub params: Vec<(String, String)>,
    /// Transaction status from the last ReadyForQuery (`I`, `T`, `E`).
    pub status: u8,
    /// Set when the connection can no longer be trusted (I/O error, protocol confusion,
    /// unread results); the pool drops it instead of reusing it.
    pub broken: bool,
    /// Server-side prepared statements that exist on this connection (by our hash name).
    pub prepared: foldhash::HashSet<u64>,
    /// Statements (by hash name) that still exist on the server but must not be used
    /// again: closed before this connection's next batch.
    pub stale: Vec<u64>,
    /// Fingerprint of the session settings applied to this connection (0: none).
    pub settings: u64,
    /// Messages were sent and their ReadyForQuery has not been read yet; such a
    /// connection must never go back to the pool.
    pub in_flight: bool,
}

impl ServerConn {
    /// Stop using the statement `hash` on this connection: it is closed before the
    /// connection's next batch.
    pub fn retire_statement(&mut self, hash: u64) {
        self.prepared.remove(&hash);
        self.stale.push(hash);
    }

    /// Connect and authenticate; returns once the server is ready for queries.
    pub async fn connect(
        shard_id: ShardId,
        shard: &Shard,
        timeout: Duration,
    ) -> Result<ServerConn, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(shard_id, shard)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Connect {
                shard: shard.name.clone(),
                reason: format!("timed out after {} ms", timeout.as_millis()),
            }),
        }
    }

    async fn connect_inner(shard_id: ShardId, shard: &Shard) -> Result<ServerConn, BackendError> {
        let connect_err = |reason: String| BackendError::Connect {
            shard: shard.name.clone(),
            reason,
        };
        let stream = TcpStream::connect((shard.host.as_str(), shard.port))
            .await
            .map_err(|e| connect_err(format!("{}:{}: {e}", shard.host, shard.port)))?;
        stream
            .set_nodelay(true)
            .map_err(|e| connect_err(e.to_string()))?;
        let addr = stream.peer_addr().map_err(|e| connect_err(e.to_string()))?;
        let mut conn = ServerConn {
            shard: shard_id,
            shard_name: shard.name.clone(),
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(8192),
            addr,
            pid: 0,
            secret: 0,
            params: Vec::new(),
            status: b'I',
            broken: false,
            prepared: Default::default(),
            stale: Vec::new(),
            settings: 0,
            in_flight: false,
        };
        // StartupMessage
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(PROTOCOL_3_0);
        for (k, v) in [
            ("user", shard.user.as_str()),
            ("database", shard.database.as_str()),
        ] {
            messages::put_cstr(&mut b, k);
            messages::put_cstr(&mut b, v);
        }
        b.put_u8(0);
        let len = b.len() as i32;
        b[0..4].copy_from_slice(&len.to_be_bytes());
        conn.wbuf.extend_from_slice(&b);
        conn.flush().await?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = conn.read_frame().await?;
            match f.tag {
                b'R' => {
                    let code = be_i32(&f.body, 0)
                        .ok_or_else(|| connect_err("short authentication message".into()))?;
                    let payload = &f.body[4..];
                    match code {
                        0 => {}
                        3 => conn.send_password(shard.password.as_bytes()),
                        5 => {
                            let salt: [u8; 4] = payload
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| connect_err("short MD5 salt".into()))?;
                            let hashed =
                                md5_hash(shard.user.as_bytes(), shard.password.as_bytes(), salt);
                            conn.send_password(hashed.as_bytes());
                        }
                        10 => {
                            let mechs = String::from_utf8_lossy(payload);
                            if !mechs.split('\0').any(|m| m == "SCRAM-SHA-256") {
                                return Err(connect_err(format!(
                                    "server offers no supported SASL mechanism ({mechs})"
                                )));
                            }
                            let s = ScramSha256::new(
                                shard.password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            let at = messages::begin(&mut conn.wbuf, b'p');
                            messages::put_cstr(&mut conn.wbuf, "SCRAM-SHA-256");
                            conn.wbuf.put_i32(s.message().len() as i32);
                            conn.wbuf.put_slice(s.message());
                            messages::finish(&mut conn.wbuf, at);
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| connect_err("unexpected SASL continue".into()))?;
                            s.update(payload)
                                .map_err(|e| connect_err(format!("SCRAM: {e}")))?;
                            let at = messages::begin(&mut conn.wbuf, b'p');
                            conn.wbuf.put_slice(s.message());
                            messages::finish(&mut conn.wbuf, at);
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| connect_err("unexpected SASL final".into()))?;
                            s.finish(payload)
                                .map_err(|e| connect_err(format!("SCRAM: {e}")))?;
                        }
                        other => {
                            return Err(connect_err(format!(
                                "unsupported authentication method {other}"
                            )))
                        }
                    }
                    conn.flush().await?;
                }
                b'S' => {
                    if let Some(kv) = parse_parameter_status(&f.body) {
                        conn.params.push(kv);
                    }
                }
                b'K' => {
                    conn.pid = be_i32(&f.body, 0).unwrap_or(0);
                    conn.secret = be_i32(&f.body, 4).unwrap_or(0);
                }
                b'Z' => return Ok(conn),
                b'E' => {
                    let (code, message) = summarize_error(&f.body);
                    return Err(BackendError::Rejected {
                        shard: shard.name.clone(),
                        code,
                        message,
                    });
                }
                b'N' => {}
                other => {
                    return Err(connect_err(format!(
                        "unexpected message '{}' during startup",
                        other as char
                    )))
                }
            }
        }
    }

    fn send_password(&mut self, pw: &[u8]) {
        let at = messages::begin(&mut self.wbuf, b'p');
        self.wbuf.put_slice(pw);
        self.wbuf.put_u8(0);
        messages::finish(&mut self.wbuf, at);
    }

    /// Read the next whole frame. Cancel-safe: a partial frame stays in the buffer.
    pub async fn read_frame(&mut self) -> Result<Frame, BackendError> {
        let mut raw = self.read_raw().await?;
        let tag = raw[0];
        raw.advance(crate::protocol::codec::HEADER);
        Ok(Frame {
            tag,
            body: raw.freeze(),
        })
    }

    /// Read the next whole frame as raw bytes (tag, length, body), ready to forward.
    /// Cancel-safe: a partial frame stays in the buffer.
    pub async fn read_raw(&mut self) -> Result<BytesMut, BackendError> {
        let n = self.ready_frame().await?;
        Ok(self.read_raw_buffered(n))
    }

    /// Wait until the next whole frame is buffered and return its length; it is then
    /// `frame(n)` until `consume(n)`. Lets a relay copy a frame straight to the client
    /// without splitting it off the buffer. Cancel-safe.
    pub async fn ready_frame(&mut self) -> Result<usize, BackendError> {
        loop {
            if let Some(n) = self.buffered_frame()? {
                return Ok(n);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(8192);
            }
            let n = match self.stream.read_buf(&mut self.rbuf).await {
                Ok(n) => n,
                Err(e) => {
                    self.broken = true;
                    return Err(BackendError::Lost {
                        shard: self.shard_name.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            if n == 0 {
                self.broken = true;
                return Err(BackendError::Lost {
                    shard: self.shard_name.clone(),
                    reason: "server closed the connection unexpectedly".into(),
                });
            }
        }
    }

    /// Split off the first `n` buffered bytes: a frame `ready_frame` returned the
    /// length of.
    pub fn read_raw_buffered(&mut self, n: usize) -> BytesMut {
        self.rbuf.split_to(n)
    }

    /// The first `n` buffered bytes: a frame `ready_frame` returned the length of.
    pub fn frame(&self, n: usize) -> &[u8] {
        &self.rbuf[..n]
    }

    /// The bytes received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.rbuf
    }

    /// Drop the first `n` buffered bytes: whole frames, relayed; `ready` is the
    /// transaction status of the last ReadyForQuery among them, if any.
    pub fn relayed(&mut self, n: usize, ready: Option<u8>) {
        if let Some(status) = ready {
            self.ready_for_query(status);
        }
        self.rbuf.advance(n);
    }

    /// A ReadyForQuery with transaction status `status` arrived: nothing is in flight.
    fn ready_for_query(&mut self, status: u8) {
        self.status = status;
        self.in_flight = false;
    }

    /// Drop the first `n` buffered bytes (a frame read with `frame`).
    pub fn consume(&mut self, n: usize) {
        self.rbuf.advance(n);
    }

    /// The length of the next frame if it is already whole in the buffer (reading it
    /// will not wait); room is reserved for a partial one.
    pub fn buffered_frame(&mut self) -> Result<Option<usize>, BackendError> {
        match frame_len(&self.rbuf, MAX_BACKEND_MESSAGE) {
            Ok(Some(n)) if self.rbuf.len() >= n => {
                if self.rbuf[0] == b'Z' {
                    self.ready_for_query(self.rbuf.get(5).copied().unwrap_or(b'I'));
                }
                Ok(Some(n))
            }
            Ok(Some(n)) => {
                let missing = n - self.rbuf.len();
                self.rbuf.reserve(missing.min(1 << 20));
                Ok(None)
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.broken = true;
                Err(BackendError::Protocol {
                    shard: self.shard_name.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Send everything queued in `wbuf`. A large batch is sent while the server's
    /// answers are read into `rbuf`, so a long pipeline cannot deadlock with the server
    /// blocked on writing answers nobody reads.
    pub async fn flush(&mut self) -> Result<(), BackendError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.in_flight = true;
        let result = if self.wbuf.len() <= 64 * 1024 {
            write_out(&mut self.stream, &self.wbuf).await
        } else {
            self.write_reading().await
        };
        if let Err(e) = result {
            self.broken = true;
            return Err(BackendError::Lost {
                shard: self.shard_name.clone(),
                reason: e.to_string(),
            });
        }
        self.wbuf.clear();
        Ok(())
    }

    async fn write_reading(&mut self) -> std::io::Result<()> {
        let mut written = 0;
        while written < self.wbuf.len() {
            let writable = {
                let s = &self.stream;
                tokio::select! {
                    r = s.writable() => { r?; true }
                    r = s.readable() => { r?; false }
                }
            };
            if writable {
                match self.stream.try_write(&self.wbuf[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            } else {
                self.rbuf.reserve(64 * 1024);
                match self.stream.try_read_buf(&mut self.rbuf) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Run a simple query whose results nobody needs (session setup, BEGIN, COMMIT),
    /// reading to ReadyForQuery. Returns the first error the server sent, as raw bytes.
    pub async fn run_quiet(&mut self, sql: &str) -> Result<Option<Frame>, BackendError> {
        messages::query(&mut self.wbuf, sql);
        self.flush().await?;
        let mut err = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'Z' => return Ok(err),
                b'E' if err.is_none() => err = Some(f),
                _ => {}
            }
        }
    }

    /// Whether an idle connection has gone bad while it sat in the pool: the server
    /// closed it or sent something unasked (a FATAL on shutdown). Costs one
    /// non-blocking read, no round trip.
    pub fn is_stale(&mut self) -> bool {
        if self.broken || !self.rbuf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            _ => {
                self.broken = true;
                true
            }
        }
    }

    /// Whether the connection may go back to the pool.
    pub fn reusable(&self) -> bool {
        !self.broken
            && !self.in_flight
            && self.status == b'I'
            && self.rbuf.is_empty()
            && self.wbuf.is_empty()
    }
}

fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Send a CancelRequest for the server connection `pid`/`secret` at `addr`.
pub async fn cancel(addr: SocketAddr, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut b = BytesMut::with_capacity(16);
    b.put_i32(16);
    b.put_i32(80_877_102);
    b.put_i32(pid);
    b.put_i32(secret);
    s.write_all(&b).await?;
    // The server closes the socket when done; wait for that so the cancel is delivered.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut sink)).await;
    Ok(())
}

/// Write all of `b`: straight away if the socket takes it (the usual case: an answer
/// is small and the socket buffer empty), else waiting for room.
pub(crate) async fn write_out(stream: &mut TcpStream, b: &[u8]) -> std::io::Result<()> {
    let sent = match stream.try_write(b) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if sent < b.len() {
        stream.write_all(&b[sent..]).await?;
    }
    Ok(())
}
