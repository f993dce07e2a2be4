//! Decoding the frontend messages the router must look into, and encoding the messages
//! it writes itself (to clients and to shards). Pure byte handling, no I/O.

use bytes::{BufMut, Bytes, BytesMut};

/// A body that does not have the layout its tag promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} message: {why}")]
pub struct MalformedMessage {
    pub what: &'static str,
    pub why: &'static str,
}

impl MalformedMessage {
    /// The body was well formed but a string in it is not UTF-8: a statement error,
    /// not a protocol violation.
    pub fn is_encoding(&self) -> bool {
        self.why == NOT_UTF8
    }
}

const NOT_UTF8: &str = "string is not valid UTF-8";

/// Cursor over a message body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn err(&self, why: &'static str) -> MalformedMessage {
        MalformedMessage {
            what: self.what,
            why,
        }
    }

    fn cstr(&mut self) -> Result<&'a str, MalformedMessage> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(self.err("missing string terminator"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| self.err(NOT_UTF8))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn i16(&mut self) -> Result<i16, MalformedMessage> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, MalformedMessage> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u8(&mut self) -> Result<u8, MalformedMessage> {
        Ok(self.take(1)?[0])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MalformedMessage> {
        if self.buf.len() - self.pos < n {
            return Err(self.err("message is shorter than its contents"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A count of parameters or formats: unsigned 16 bits, as PostgreSQL reads it.
    fn count(&mut self) -> Result<usize, MalformedMessage> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn finish(&self) -> Result<(), MalformedMessage> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err("trailing bytes after contents"))
        }
    }
}

/// `Q`: a simple query string.
pub fn parse_query(body: &[u8]) -> Result<&str, MalformedMessage> {
    // The common case in one pass each: the terminator last and no other NUL (a slice's
    // `contains` of a byte is a word-at-a-time search).
    if let Some((0, text)) = body.split_last() {
        if !text.contains(&0) {
            return std::str::from_utf8(text).map_err(|_| MalformedMessage {
                what: "Query",
                why: NOT_UTF8,
            });
        }
    }
    let mut r = Reader::new(body, "Query");
    let s = r.cstr()?;
    r.finish()?;
    Ok(s)
}

/// `P`: Parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    pub param_types: Vec<u32>,
}

/// Whether a Parse body is exactly the one that would carry `name`, `sql` and
/// `param_types` (a cheap check before decoding it).
pub fn is_parse_of(body: &[u8], name: &str, sql: &str, param_types: &[u32]) -> bool {
    let mut at = 0;
    let mut part = |want: &[u8]| {
        let ok = body.get(at..at + want.len()) == Some(want);
        at += want.len();
        ok
    };
    part(name.as_bytes())
        && part(&[0])
        && part(sql.as_bytes())
        && part(&[0])
        && u16::try_from(param_types.len()).is_ok_and(|n| part(&n.to_be_bytes()))
        && param_types.iter().all(|t| part(&t.to_be_bytes()))
        && at == body.len()
}

pub fn parse_parse(body: &[u8]) -> Result<Parse<'_>, MalformedMessage> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cstr()?;
    let sql = r.cstr()?;
    let n = r.count()?;
    let mut param_types = Vec::with_capacity(n);
    for _ in 0..n {
        param_types.push(r.i32()? as u32);
    }
    r.finish()?;
    Ok(Parse {
        name,
        sql,
        param_types,
    })
}

/// `B`: Bind, read in place: nothing is copied or collected (checked once when parsed,
/// the sections are walked again on demand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Format codes as sent (2 bytes each): none (all text), one for all, or one per
    /// parameter.
    formats: &'a [u8],
    /// The parameter values as sent: each a 4-byte length (-1: NULL) and its bytes.
    values: &'a [u8],
    /// How many parameters.
    pub param_count: usize,
    /// Offset in the body where the parameter-format count starts: everything after the
    /// two names, so the message can be re-sent under another statement name.
    pub rest_offset: usize,
}

impl<'a> Bind<'a> {
    /// Whether parameter `i` (0-based) is sent in binary format.
    pub fn is_binary(&self, i: usize) -> bool {
        let code = |k: usize| self.formats.get(2 * k..2 * k + 2) == Some(&[0, 1][..]);
        match self.formats.len() / 2 {
            0 => false,
            1 => code(0),
            _ => code(i),
        }
    }

    /// The parameter values in order (`None` is NULL).
    pub fn params(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        let mut rest = self.values;
        (0..self.param_count).map(move |_| {
            let (len, tail) = rest.split_at_checked(4)?;
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            let Ok(len) = usize::try_from(len) else {
                rest = tail;
                return None;
            };
            let (value, tail) = tail.split_at_checked(len)?;
            rest = tail;
            Some(value)
        })
    }
}

pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, MalformedMessage> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let rest_offset = r.pos;
    let nf = r.count()?;
    let formats = r.take(2 * nf)?;
    if formats.chunks_exact(2).any(|f| f != [0, 0] && f != [0, 1]) {
        return Err(r.err("unsupported format code"));
    }
    let np = r.count()?;
    let values_at = r.pos;
    for _ in 0..np {
        let len = r.i32()?;
        if len != -1 {
            let len = usize::try_from(len).map_err(|_| r.err("negative parameter length"))?;
            r.take(len)?;
        }
    }
    let values = &body[values_at..r.pos];
    let nr = r.count()?;
    for _ in 0..nr {
        r.i16()?;
    }
    r.finish()?;
    if nf > 1 && nf != np {
        return Err(r.err("parameter format count does not match parameter count"));
    }
    Ok(Bind {
        portal,
        statement,
        formats,
        values,
        param_count: np,
        rest_offset,
    })
}

/// `D` / `C`: Describe or Close of a statement (`S`) or portal (`P`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a str,
}

pub fn parse_target<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<Target<'a>, MalformedMessage> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(r.err("expected 'S' or 'P'"));
    }
    let name = r.cstr()?;
    r.finish()?;
    Ok(Target { kind, name })
}

/// `E`: Execute.
pub fn parse_execute(body: &[u8]) -> Result<(&str, i32), MalformedMessage> {
    let mut r = Reader::new(body, "Execute");
    let portal = r.cstr()?;
    let max_rows = r.i32()?;
    r.finish()?;
    Ok((portal, max_rows))
}

// ---------------------------------------------------------------------------------------
// Encoding

/// Start a message with `tag`; returns the offset of its length field for `finish`.
pub fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

/// Fill in the length of the message begun at `at`.
pub fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    put_cbytes(buf, s.as_bytes());
}

/// `s` and a terminating NUL (`s` holds none).
fn put_cbytes(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// A message with a fixed tag and a body made of C strings.
pub fn cstr_message(buf: &mut BytesMut, tag: u8, parts: &[&str]) {
    let at = begin(buf, tag);
    for p in parts {
        put_cstr(buf, p);
    }
    finish(buf, at);
}

pub fn empty_message(buf: &mut BytesMut, tag: u8) {
    buf.put_u8(tag);
    buf.put_i32(4);
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    cstr_message(buf, b'Q', &[sql]);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.put_u8(b'Z');
    buf.put_i32(5);
    buf.put_u8(status);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    cstr_message(buf, b'C', &[tag]);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    cstr_message(buf, b'S', &[name, value]);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_u8(b'K');
    buf.put_i32(12);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// `R` Authentication with a sub-code and optional payload.
pub fn authentication(buf: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(code);
    buf.put_slice(payload);
    finish(buf, at);
}

/// Frontend Parse.
pub fn parse(buf: &mut BytesMut, name: impl AsRef<[u8]>, sql: &str, types: &[u32]) {
    let at = begin(buf, b'P');
    put_cbytes(buf, name.as_ref());
    put_cstr(buf, sql);
    buf.put_u16(types.len() as u16);
    for t in types {
        buf.put_u32(*t);
    }
    finish(buf, at);
}

/// Frontend Bind re-addressed to `statement`, keeping the client's parameters and formats.
pub fn rebind(buf: &mut BytesMut, portal: &str, statement: impl AsRef<[u8]>, rest: &[u8]) {
    let at = begin(buf, b'B');
    put_cstr(buf, portal);
    put_cbytes(buf, statement.as_ref());
    buf.put_slice(rest);
    finish(buf, at);
}

/// Frontend Bind of `statement` to `portal` with one parameter in text format and every
/// result column in text format.
pub fn bind_one_text(buf: &mut BytesMut, portal: &str, statement: &[u8], value: &[u8]) {
    let at = begin(buf, b'B');
    put_cstr(buf, portal);
    buf.put_slice(statement);
    buf.put_u8(0);
    buf.put_u16(0);
    buf.put_u16(1);
    buf.put_u32(value.len() as u32);
    buf.put_slice(value);
    buf.put_u16(0);
    finish(buf, at);
}

/// Describe, Execute (no row limit) and Sync of the unnamed portal: the end of every
/// kept point query, as one copy of constant bytes.
pub fn describe_execute_sync_unnamed(buf: &mut BytesMut) {
    const TAIL: [u8; 22] = [
        b'D', 0, 0, 0, 6, b'P', 0, // Describe portal ""
        b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0, // Execute "" 0
        b'S', 0, 0, 0, 4, // Sync
    ];
    buf.extend_from_slice(&TAIL);
}

/// Frontend Describe / Close.
pub fn target(buf: &mut BytesMut, tag: u8, kind: u8, name: impl AsRef<[u8]>) {
    let at = begin(buf, tag);
    buf.put_u8(kind);
    put_cbytes(buf, name.as_ref());
    finish(buf, at);
}

pub fn execute(buf: &mut BytesMut, portal: &str, max_rows: i32) {
    let at = begin(buf, b'E');
    put_cstr(buf, portal);
    buf.put_i32(max_rows);
    finish(buf, at);
}

/// The command tag of a CommandComplete body, without its terminator.
pub fn command_tag(body: &[u8]) -> &[u8] {
    body.strip_suffix(&[0]).unwrap_or(body)
}

/// `t`: the parameter types of a ParameterDescription body.
pub fn parse_parameter_description(body: &[u8]) -> Result<Vec<u32>, MalformedMessage> {
    let mut r = Reader::new(body, "ParameterDescription");
    let n = r.count()?;
    let mut types = Vec::with_capacity(n);
    for _ in 0..n {
        types.push(r.i32()? as u32);
    }
    r.finish()?;
    Ok(types)
}

/// Parse the cstring pair of a ParameterStatus body.
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut r = Reader::new(body, "ParameterStatus");
    let k = r.cstr().ok()?;
    let v = r.cstr().ok()?;
    Some((k.to_owned(), v.to_owned()))
}

/// A frame as raw bytes (tag, length, body).
pub fn raw(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constant_point_tail_is_describe_execute_sync_of_the_unnamed_portal() {
        let mut built = BytesMut::new();
        target(&mut built, b'D', b'P', "");
        execute(&mut built, "", 0);
        empty_message(&mut built, b'S');
        let mut tail = BytesMut::new();
        describe_execute_sync_unnamed(&mut tail);
        assert_eq!(tail, built);
    }

    fn bind_body(stmt: &str, formats: &[i16], params: &[Option<&[u8]>]) -> BytesMut {
        let mut b = BytesMut::new();
        put_cstr(&mut b, "p1");
        put_cstr(&mut b, stmt);
        b.put_i16(formats.len() as i16);
        for f in formats {
            b.put_i16(*f);
        }
        b.put_i16(params.len() as i16);
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(1);
        b.put_i16(1);
        b
    }

    #[test]
    fn bind_round_trips_under_a_new_name() {
        let body = bind_body("s1", &[1], &[Some(&[0, 0, 0, 5]), None]);
        let bind = parse_bind(&body).expect("valid");
        assert_eq!(bind.portal, "p1");
        assert_eq!(bind.statement, "s1");
        assert!(bind.is_binary(0) && bind.is_binary(1));
        let params: Vec<_> = bind.params().collect();
        assert_eq!(params, vec![Some(&[0u8, 0, 0, 5][..]), None]);
        let mut out = BytesMut::new();
        rebind(&mut out, "p1", "sw_1", &body[bind.rest_offset..]);
        let reparsed = parse_bind(&out[5..]).expect("valid");
        assert_eq!(reparsed.statement, "sw_1");
        assert!(reparsed.params().eq(bind.params()));
    }

    #[test]
    fn bind_format_codes_none_one_or_each() {
        let params: &[Option<&[u8]>] = &[Some(b"1"), Some(b"2")];
        let none = bind_body("s", &[], params);
        let b = parse_bind(&none).expect("valid");
        assert!(!b.is_binary(0) && !b.is_binary(1));
        let each = bind_body("s", &[0, 1], params);
        let b = parse_bind(&each).expect("valid");
        assert!(!b.is_binary(0) && b.is_binary(1));
        assert!(parse_bind(&bind_body("s", &[0, 1, 1], params)).is_err());
        assert!(parse_bind(&bind_body("s", &[2], params)).is_err());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(parse_bind(b"p\0s\0\x00\x01").is_err());
        assert!(parse_bind(&bind_body("s", &[0, 1, 0], &[None, None])).is_err());
        assert!(parse_bind(&bind_body("s", &[2], &[None])).is_err());
        let mut neg = bind_body("s", &[], &[]);
        neg.truncate(neg.len() - 6);
        neg.put_i16(1);
        neg.put_i32(-5);
        assert!(parse_bind(&neg).is_err());
        assert!(parse_parse(b"name\0select 1\0\xff\xff").is_err());
        assert!(parse_parse(b"name\0select").is_err());
        assert!(parse_query(b"select 1").is_err());
        assert!(parse_query(b"select 1\0extra").is_err());
        assert!(parse_target(b"X\0", "Describe").is_err());
        assert!(parse_execute(b"\0\0\0").is_err());
        // Every prefix of a valid Bind is rejected cleanly.
        let body = bind_body("s1", &[0], &[Some(b"42")]);
        for n in 0..body.len() {
            assert!(parse_bind(&body[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn parse_reads_param_types() {
        let mut b = BytesMut::new();
        parse(&mut b, "s", "select $1", &[20]);
        let p = parse_parse(&b[5..]).expect("valid");
        assert_eq!(
            p,
            Parse {
                name: "s",
                sql: "select $1",
                param_types: vec![20]
            }
        );
    }

    fn body(name: &str, sql: &str, types: &[u32]) -> BytesMut {
        let mut b = BytesMut::new();
        parse(&mut b, name, sql, types);
        b.split_off(5)
    }

    #[test]
    fn only_the_identical_parse_matches() {
        let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        let b = body("", sql, &[20]);
        assert!(is_parse_of(&b, "", sql, &[20]));
        assert_eq!(parse_parse(&b).map(|p| p.sql), Ok(sql));
        assert!(!is_parse_of(&b, "", sql, &[]), "types differ");
        assert!(!is_parse_of(&b, "", sql, &[23]), "type differs");
        assert!(
            !is_parse_of(&b, "", &sql[..sql.len() - 1], &[20]),
            "text differs"
        );
        assert!(!is_parse_of(&b, "s1", sql, &[20]), "name differs");
        assert!(!is_parse_of(&b[..b.len() - 1], "", sql, &[20]), "truncated");
        let mut longer = b.clone();
        longer.extend_from_slice(&[0]);
        assert!(!is_parse_of(&longer, "", sql, &[20]), "trailing bytes");
        let none = body("", "SELECT 1", &[]);
        assert!(is_parse_of(&none, "", "SELECT 1", &[]));
        assert!(!is_parse_of(&none, "", "SELECT 2", &[]));
    }
}
