//! Framing of PostgreSQL protocol messages. Pure byte handling, no I/O.
//!
//! Every message after startup is `tag: u8, len: i32 (includes itself), body`. The
//! startup family (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) has no tag.
//! Decoders take a `BytesMut` that holds whatever has arrived so far and return
//! `Ok(None)` when a frame is incomplete; a frame is split off without copying.

use bytes::{Buf, Bytes, BytesMut};

/// One protocol message: its tag and its body (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// A frame we refuse to read any further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u64 },
}

/// The size of the tag + length header.
pub const HEADER: usize = 5;

/// Length of the frame at the start of `buf` (tag + length + body), if its header has
/// arrived. Validates the length against `max_len` before anything is allocated, so a
/// lying length field costs nothing.
pub fn frame_len(buf: &[u8], max_len: u64) -> Result<Option<usize>, FrameError> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(i64::from(len)));
    }
    let len = len as u64;
    if len > max_len {
        return Err(FrameError::TooLarge {
            len,
            limit: max_len,
        });
    }
    Ok(Some(len as usize + 1))
}

/// Split one complete frame off the front of `buf`.
pub fn decode_frame(buf: &mut BytesMut, max_len: u64) -> Result<Option<Frame>, FrameError> {
    let Some(total) = frame_len(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < total {
        // Reserve at most a bounded amount ahead; the rest grows as bytes arrive.
        buf.reserve((total - buf.len()).min(1 << 20));
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let tag = frame[0];
    frame.advance(HEADER);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

/// Split one complete frame off `buf` keeping its header: the raw bytes, ready to be
/// forwarded untouched.
pub fn decode_raw(buf: &mut BytesMut, max_len: u64) -> Result<Option<BytesMut>, FrameError> {
    let Some(total) = frame_len(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(1 << 20));
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// The first, untagged message of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// Protocol version and the key/value parameters (user, database, options, …).
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
}

pub const PROTOCOL_3_0: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// PostgreSQL caps the startup packet at 10,000 bytes; so do we.
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Why a startup packet was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("invalid startup packet layout: expected terminator as last byte")]
    Layout,
    #[error("startup packet is not valid UTF-8")]
    Encoding,
}

/// Decode the untagged startup-family packet at the front of `buf`.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(StartupError::BadLength);
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut pkt = buf.split_to(len);
    pkt.advance(4);
    let code = pkt.get_i32();
    match code {
        SSL_REQUEST if len == 8 => return Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST if len == 8 => return Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST if len == 16 => {
            let pid = pkt.get_i32();
            let secret = pkt.get_i32();
            return Ok(Some(StartupPacket::Cancel { pid, secret }));
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => return Err(StartupError::BadLength),
        _ => {}
    }
    // key\0value\0 … \0
    if pkt.last() != Some(&0) {
        return Err(StartupError::Layout);
    }
    let body = &pkt[..pkt.len() - 1];
    let mut params = Vec::new();
    let mut parts = body.split(|b| *b == 0);
    while let Some(k) = parts.next() {
        if k.is_empty() {
            break;
        }
        let v = parts.next().ok_or(StartupError::Layout)?;
        let k = std::str::from_utf8(k).map_err(|_| StartupError::Encoding)?;
        let v = std::str::from_utf8(v).map_err(|_| StartupError::Encoding)?;
        params.push((k.to_owned(), v.to_owned()));
    }
    Ok(Some(StartupPacket::Startup {
        version: code,
        params,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn frames_split_and_wait_for_more() {
        let mut buf = BytesMut::new();
        buf.put_u8(b'Q');
        buf.put_i32(4 + 9);
        buf.put_slice(b"select 1");
        assert_eq!(decode_frame(&mut buf, 1 << 30), Ok(None));
        buf.put_u8(0);
        buf.put_u8(b'S');
        let f = decode_frame(&mut buf, 1 << 30).expect("ok").expect("frame");
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body[..], b"select 1\0");
        assert_eq!(&buf[..], b"S");
    }

    #[test]
    fn lying_lengths_are_rejected_without_allocating() {
        let mut buf = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            decode_frame(&mut buf, 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.capacity() < 1 << 20);
        let mut buf = BytesMut::from(&b"Q\x00\x00\x00\x02"[..]);
        assert_eq!(
            decode_frame(&mut buf, 1 << 20),
            Err(FrameError::BadLength(2))
        );
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert_eq!(
            decode_frame(&mut buf, 1 << 20),
            Err(FrameError::BadLength(-1))
        );
    }

    #[test]
    fn startup_packets_decode() {
        let mut buf = BytesMut::new();
        buf.put_i32(8);
        buf.put_i32(SSL_REQUEST);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::SslRequest))
        );

        let body = b"user\0app\0database\0db\0\0";
        buf.put_i32(8 + body.len() as i32);
        buf.put_i32(PROTOCOL_3_0);
        buf.put_slice(body);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::Startup {
                version: PROTOCOL_3_0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }))
        );
        buf.put_i32(16);
        buf.put_i32(CANCEL_REQUEST);
        buf.put_i32(7);
        buf.put_i32(9);
        assert_eq!(
            decode_startup(&mut buf),
            Ok(Some(StartupPacket::Cancel { pid: 7, secret: 9 }))
        );
    }

    #[test]
    fn bad_startup_packets_are_errors() {
        let mut buf = BytesMut::from(&b"\x00\x00\x00\x02"[..]);
        assert_eq!(decode_startup(&mut buf), Err(StartupError::BadLength));
        let mut buf = BytesMut::from(&b"\x7f\x00\x00\x00"[..]);
        assert_eq!(decode_startup(&mut buf), Err(StartupError::BadLength));
        let mut buf = BytesMut::new();
        buf.put_i32(12);
        buf.put_i32(PROTOCOL_3_0);
        buf.put_slice(b"user");
        assert_eq!(decode_startup(&mut buf), Err(StartupError::Layout));
    }
}
