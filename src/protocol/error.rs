//! Errors that reach a client, and their encoding as ErrorResponse / NoticeResponse.
//!
//! Only the router's own errors are built here; errors from shards are forwarded as the
//! bytes the shard sent.

use bytes::{BufMut, BytesMut};

use super::messages::{begin, finish};

/// A PostgreSQL-style error or notice the router sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// `ERROR`, `FATAL`, `WARNING`, `NOTICE`.
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position in the query string.
    pub position: Option<u32>,
    /// The PostgreSQL source routine that raises this error, for an error the router
    /// raises in PostgreSQL's place (drivers recognise some errors by it).
    pub routine: Option<Routine>,
}

/// PostgreSQL source routines whose errors the router raises in their place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routine {
    /// "cached plan must not change result type" (pgjdbc prepares the statement again
    /// and retries when it sees this routine).
    RevalidateCachedQuery,
}

impl Routine {
    fn as_str(self) -> &'static str {
        match self {
            Routine::RevalidateCachedQuery => "RevalidateCachedQuery",
        }
    }
}

impl PgError {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
            routine: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: "FATAL",
            ..Self::error(code, message)
        }
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: "WARNING",
            ..Self::error(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_position(mut self, position: Option<u32>) -> Self {
        self.position = position;
        self
    }

    pub fn with_routine(mut self, routine: Routine) -> Self {
        self.routine = Some(routine);
        self
    }

    /// Append as an ErrorResponse (`E`), or NoticeResponse (`N`) for warnings/notices.
    pub fn encode(&self, buf: &mut BytesMut) {
        let tag = if matches!(self.severity, "ERROR" | "FATAL" | "PANIC") {
            b'E'
        } else {
            b'N'
        };
        let at = begin(buf, tag);
        let mut field = |t: u8, v: &str| {
            buf.put_u8(t);
            // A NUL inside a field would end it early on the client: drop any.
            buf.put_slice(v.replace('\0', "").as_bytes());
            buf.put_u8(0);
        };
        field(b'S', self.severity);
        field(b'V', self.severity);
        field(b'C', self.code);
        field(b'M', &self.message);
        if let Some(d) = &self.detail {
            field(b'D', d);
        }
        if let Some(h) = &self.hint {
            field(b'H', h);
        }
        if let Some(p) = self.position {
            field(b'P', &p.to_string());
        }
        if let Some(r) = self.routine {
            field(b'R', r.as_str());
        }
        buf.put_u8(0);
        finish(buf, at);
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// The SQLSTATE and message fields of an ErrorResponse body from a shard (for logs).
pub fn summarize_error(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut msg = String::new();
    for field in body.split(|b| *b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
            Some(b'M') => msg = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    (code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sqlstate;

    #[test]
    fn error_response_fields() {
        let mut b = BytesMut::new();
        PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "no")
            .with_hint("h")
            .with_position(Some(3))
            .encode(&mut b);
        assert_eq!(b[0], b'E');
        let body = &b[5..];
        let (code, msg) = summarize_error(body);
        assert_eq!((code.as_str(), msg.as_str()), ("0A000", "no"));
        assert!(body.windows(2).any(|w| w == b"Hh"));
        assert!(body.windows(2).any(|w| w == b"P3"));
        assert_eq!(
            i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize,
            b.len() - 1
        );
    }
}
