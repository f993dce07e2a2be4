//! Failure paths: bad logins, hostile or broken bytes on the socket, oversized
//! messages, SSL/GSS negotiation, and shards that are unreachable or go down mid-run.
//! Every test also checks that the router keeps serving well-behaved clients.
//!
//! Timeouts here are hang detectors, not speed checks: a router that answers a broken
//! client neither with an error nor by closing the socket would wait forever.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

const HANG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// A raw protocol client, for what tokio-postgres will not send.

/// One backend message: tag and body.
#[derive(Debug)]
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    /// Fields of an ErrorResponse/NoticeResponse by their one-letter code.
    fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&t, tail)) = rest.split_first() {
            if t == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0)?;
            if t == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    fn auth_code(&self) -> i32 {
        assert_eq!(
            self.tag, b'R',
            "expected an authentication message, got {self:?}"
        );
        i32::from_be_bytes(self.body[..4].try_into().expect("4 bytes"))
    }
}

struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(r: &shardwire::server::RunningRouter) -> Raw {
        let s = TcpStream::connect(r.addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// Send without caring whether the router already closed.
    async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }

    /// Read `n` raw bytes (for the one-byte SSL answer); `None` at EOF.
    async fn read_byte(&mut self) -> Option<u8> {
        if self.buf.is_empty() {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(HANG, self.s.read(&mut b))
                .await
                .expect("the router neither answered nor closed")
                .unwrap_or(0);
            return (n == 1).then_some(b[0]);
        }
        Some(self.buf.get_u8())
    }

    /// The next message, `None` when the router closed the connection. Panics if the
    /// router neither answers nor closes within `HANG`.
    async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4")) as usize;
                assert!(len >= 4, "router sent a bad length");
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(Msg { tag, body });
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(HANG, self.s.read(&mut chunk))
                .await
                .expect("the router neither answered nor closed the connection")
                .unwrap_or(0);
            if n == 0 {
                assert!(self.buf.is_empty(), "connection closed mid-message");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Read until EOF; returns every message the router sent before closing.
    async fn drain(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
            assert!(out.len() < 1000, "router keeps talking to a broken client");
        }
        out
    }

    /// Startup + SCRAM-SHA-256 as `app`, up to the first ReadyForQuery.
    async fn login(&mut self) {
        let mut b = BytesMut::new();
        frontend::startup_message([("user", "app"), ("database", "app")], &mut b).expect("startup");
        self.send(&b).await;
        self.scram("app-secret").await;
    }

    async fn scram(&mut self, password: &str) {
        let m = self.recv().await.expect("auth request");
        assert_eq!(m.auth_code(), 10, "SASL expected: {m:?}");
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut b = BytesMut::new();
        frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut b).expect("p");
        self.send(&b).await;
        let m = self.recv().await.expect("server-first");
        assert_eq!(m.auth_code(), 11, "SASLContinue expected: {m:?}");
        scram.update(&m.body[4..]).expect("server-first parses");
        let mut b = BytesMut::new();
        frontend::sasl_response(scram.message(), &mut b).expect("p");
        self.send(&b).await;
        let m = self.recv().await.expect("server-final");
        assert_eq!(m.auth_code(), 12, "SASLFinal expected: {m:?}");
        scram
            .finish(&m.body[4..])
            .expect("server signature verifies");
        let m = self.recv().await.expect("auth ok");
        assert_eq!(m.auth_code(), 0, "AuthenticationOk expected");
        loop {
            let m = self.recv().await.expect("greeting");
            match m.tag {
                b'S' | b'K' => {}
                b'Z' => {
                    assert_eq!(m.body, b"I");
                    return;
                }
                _ => panic!("unexpected message during greeting: {m:?}"),
            }
        }
    }

    /// A simple query; returns the messages up to ReadyForQuery.
    async fn query(&mut self, sql: &str) -> Vec<Msg> {
        self.query_bytes(sql.as_bytes()).await
    }

    /// A simple query of any bytes (NUL-terminated here); the messages up to
    /// ReadyForQuery.
    async fn query_bytes(&mut self, sql: &[u8]) -> Vec<Msg> {
        self.send(&query_message(sql)).await;
        let mut out = Vec::new();
        loop {
            let m = self.recv().await.expect("answer before close");
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }
}

/// A Query message carrying `sql` as it is, NUL-terminated.
fn query_message(sql: &[u8]) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
    q.extend_from_slice(sql);
    q.push(0);
    q
}

/// The router must still serve a normal client.
async fn still_serving(r: &shardwire::server::RunningRouter) {
    let c = common::connect(r).await;
    let v: i32 = c
        .query_one("SELECT $1::int4 + 1", &[&41i32])
        .await
        .expect("query")
        .get(0);
    assert_eq!(v, 42);
}

/// The router answered a broken client with ErrorResponse(s) and/or closed, and if it
/// answered, with an ErrorResponse of one of `codes`.
fn assert_refused(msgs: &[Msg], codes: &[&str], what: &str) {
    for m in msgs {
        assert_eq!(m.tag, b'E', "{what}: router answered with {m:?}");
        let code = m.field(b'C').unwrap_or_default();
        assert!(
            codes.contains(&code.as_str()),
            "{what}: SQLSTATE {code} ({:?}), expected one of {codes:?}",
            m.field(b'M')
        );
        assert_eq!(m.field(b'S').as_deref(), Some("FATAL"), "{what}: severity");
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_logins_are_refused_with_sqlstates() {
    let r = common::router().await;
    let port = r.addr.port();
    let try_login = |user: &str, password: &str, db: &str| {
        let info =
            format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}");
        async move { tokio_postgres::connect(&info, NoTls).await.map(|(c, _)| c) }
    };
    let e = try_login("app", "wrong-secret", "app").await;
    let db = common::expect_sqlstate(e, "28P01", "wrong password");
    assert!(
        db.message().contains("app"),
        "message names the user: {db:?}"
    );
    let e = try_login("nosuchuser", "app-secret", "app").await;
    common::expect_sqlstate(e, "28P01", "unknown user");
    let e = try_login("app", "app-secret", "nosuchdb").await;
    let db = common::expect_sqlstate(e, "3D000", "unknown database");
    assert!(
        db.message().contains("nosuchdb"),
        "message names the database: {db:?}"
    );
    // An unknown database does not reveal itself before authentication.
    let e = try_login("app", "wrong-secret", "nosuchdb").await;
    common::expect_sqlstate(e, "28P01", "wrong password, unknown database");
    // The admin user's password is not app's.
    let e = try_login("admin", "app-secret", "app").await;
    common::expect_sqlstate(e, "28P01", "admin with app's password");
    still_serving(&r).await;
    r.stop().await;
}

#[tokio::test]
async fn broken_startup_packets_get_an_error_or_a_close() {
    let r = common::router().await;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // 200 random bytes whose length word matches but whose protocol is nonsense.
    let mut garbage: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
    garbage[..4].copy_from_slice(&200i32.to_be_bytes());
    garbage[4] = 0x7f;
    cases.push(("random bytes", garbage));
    // 200 random bytes as they come (whatever the length word says).
    let random: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
    cases.push(("raw random bytes", random));
    cases.push(("length 3", 3i32.to_be_bytes().to_vec()));
    cases.push(("length 0", vec![0, 0, 0, 0, 0, 3, 0, 0]));
    cases.push(("negative length", (-8i32).to_be_bytes().to_vec()));
    let mut huge = 0x7fff_ffffi32.to_be_bytes().to_vec();
    huge.extend_from_slice(&196608i32.to_be_bytes());
    cases.push(("huge length", huge));
    let mut big = 1_000_000i32.to_be_bytes().to_vec();
    big.extend_from_slice(&196608i32.to_be_bytes());
    cases.push(("startup longer than 10000 bytes", big));
    // Protocol 3.0 with parameters that are not NUL-terminated.
    let mut b = BytesMut::new();
    b.put_i32(8 + 10);
    b.put_i32(196608);
    b.put_slice(b"userxxxxxx");
    cases.push(("unterminated parameters", b.to_vec()));
    // Protocol 2.0.
    let mut b = BytesMut::new();
    b.put_i32(8 + 10);
    b.put_i32(2 << 16);
    b.put_slice(b"user\0app\0\0\0");
    cases.push(("protocol 2", b[..18].to_vec()));
    // A CancelRequest that is too short.
    let mut b = BytesMut::new();
    b.put_i32(12);
    b.put_i32(80877102);
    b.put_i32(1);
    cases.push(("short cancel", b.to_vec()));
    // No user.
    let mut b = BytesMut::new();
    frontend::startup_message([("database", "app")], &mut b).expect("startup");
    cases.push(("no user", b.to_vec()));

    for (what, bytes) in &cases {
        let mut raw = Raw::connect(&r).await;
        raw.send_lossy(bytes).await;
        // The router may wait for the rest of a plausible packet; closing our side must
        // then end it. Either way it must not hang, and must say nothing but errors.
        let msgs = match what {
            &"raw random bytes" => {
                let _ = raw.s.shutdown().await;
                raw.drain().await
            }
            _ => raw.drain().await,
        };
        assert_refused(msgs.as_slice(), &["08P01", "0A000", "28000", "28P01"], what);
    }
    still_serving(&r).await;
    r.stop().await;
}

#[tokio::test]
async fn broken_messages_during_authentication() {
    let r = common::router().await;
    // A SASL response that claims to be 100 MB long: PostgreSQL refuses auth messages
    // over 64 kB at once; waiting for (and buffering) 100 MB from an unauthenticated
    // client would be a memory hole.
    for (what, len) in [
        ("huge SASL message", 100_000_000i32),
        ("2 GB SASL message", 0x7fff_ffff),
        ("tiny SASL message", 2),
    ] {
        let mut raw = Raw::connect(&r).await;
        let mut b = BytesMut::new();
        frontend::startup_message([("user", "app"), ("database", "app")], &mut b).expect("startup");
        raw.send(&b).await;
        let m = raw.recv().await.expect("auth request");
        assert_eq!(m.auth_code(), 10);
        let mut p = vec![b'p'];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(b"SCRAM-SHA-256\0");
        raw.send_lossy(&p).await;
        let msgs = raw.drain().await;
        assert_refused(&msgs, &["08P01", "28P01", "54000"], what);
    }
    // A wrong message type instead of the SASL response.
    let mut raw = Raw::connect(&r).await;
    let mut b = BytesMut::new();
    frontend::startup_message([("user", "app"), ("database", "app")], &mut b).expect("startup");
    raw.send(&b).await;
    raw.recv().await.expect("auth request");
    let mut q = BytesMut::new();
    frontend::query("SELECT 1", &mut q).expect("Q");
    raw.send_lossy(&q).await;
    let msgs = raw.drain().await;
    assert_refused(&msgs, &["08P01", "28P01"], "query instead of SASL response");
    // A SCRAM proof made with the wrong password.
    let mut raw = Raw::connect(&r).await;
    let mut b = BytesMut::new();
    frontend::startup_message([("user", "app"), ("database", "app")], &mut b).expect("startup");
    raw.send(&b).await;
    let m = raw.recv().await.expect("auth request");
    assert_eq!(m.auth_code(), 10);
    let mut scram = ScramSha256::new(b"not-the-password", ChannelBinding::unsupported());
    let mut b = BytesMut::new();
    frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut b).expect("p");
    raw.send(&b).await;
    let m = raw.recv().await.expect("server-first");
    scram.update(&m.body[4..]).expect("update");
    let mut b = BytesMut::new();
    frontend::sasl_response(scram.message(), &mut b).expect("p");
    raw.send(&b).await;
    let msgs = raw.drain().await;
    assert!(!msgs.is_empty(), "a failed login gets an ErrorResponse");
    assert_refused(&msgs, &["28P01"], "wrong SCRAM proof");
    still_serving(&r).await;
    r.stop().await;
}

#[tokio::test]
async fn ssl_and_gss_requests_get_n_then_startup_works() {
    let r = common::router().await;
    for code in [80877103i32, 80877104] {
        let mut raw = Raw::connect(&r).await;
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(code);
        raw.send(&b).await;
        assert_eq!(raw.read_byte().await, Some(b'N'), "request {code}");
        raw.login().await;
        let msgs = raw.query("SELECT 40 + 2").await;
        let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
        assert_eq!(tags, b"TDCZ".to_vec(), "{msgs:?}");
        // DataRow: 1 column, length 2, "42".
        assert_eq!(&msgs[1].body[..], &[0, 1, 0, 0, 0, 2, b'4', b'2']);
    }
    // Both, one after the other, as libpq with gssencmode=prefer sslmode=prefer does.
    let mut raw = Raw::connect(&r).await;
    let mut b = BytesMut::new();
    b.put_i32(8);
    b.put_i32(80877104);
    raw.send(&b).await;
    assert_eq!(raw.read_byte().await, Some(b'N'));
    let mut b = BytesMut::new();
    frontend::ssl_request(&mut b);
    raw.send(&b).await;
    assert_eq!(raw.read_byte().await, Some(b'N'));
    raw.login().await;
    let msgs = raw.query("SELECT 1").await;
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'));
    r.stop().await;
}

#[tokio::test]
async fn lying_frames_after_login_are_fatal() {
    let r = common::router().await;
    // A Query claiming 2 GB: refused at once with 54000, not buffered.
    let mut raw = Raw::connect(&r).await;
    raw.login().await;
    let mut q = vec![b'Q'];
    q.extend_from_slice(&0x7fff_ffffi32.to_be_bytes());
    q.extend_from_slice(b"SELECT 1");
    raw.send_lossy(&q).await;
    let msgs = raw.drain().await;
    assert_eq!(msgs.len(), 1, "one FATAL, then close: {msgs:?}");
    assert_refused(&msgs, &["54000"], "2 GB Query");

    // A length below 4.
    let mut raw = Raw::connect(&r).await;
    raw.login().await;
    raw.send_lossy(&[b'Q', 0, 0, 0, 3]).await;
    let msgs = raw.drain().await;
    assert_eq!(msgs.len(), 1, "one FATAL, then close: {msgs:?}");
    assert_refused(&msgs, &["08P01"], "length 3");

    // An unknown message type.
    let mut raw = Raw::connect(&r).await;
    raw.login().await;
    raw.send_lossy(&[b'!', 0, 0, 0, 4]).await;
    let msgs = raw.drain().await;
    assert_eq!(msgs.len(), 1, "one FATAL, then close: {msgs:?}");
    assert_refused(&msgs, &["08P01"], "unknown message type");

    // A Query without its terminating NUL is an error too, but the session survives or
    // ends cleanly; either way the router must answer.
    let mut raw = Raw::connect(&r).await;
    raw.login().await;
    let mut q = vec![b'Q'];
    q.extend_from_slice(&12i32.to_be_bytes());
    q.extend_from_slice(b"SELECT 1");
    raw.send_lossy(&q).await;
    let m = raw.recv().await;
    if let Some(m) = m {
        assert_eq!(m.tag, b'E', "unterminated query string: {m:?}");
    }

    // A client that disappears in the middle of a message.
    let mut raw = Raw::connect(&r).await;
    raw.login().await;
    let mut q = vec![b'Q'];
    q.extend_from_slice(&1000i32.to_be_bytes());
    q.extend_from_slice(b"SELECT");
    raw.send_lossy(&q).await;
    drop(raw);

    still_serving(&r).await;
    r.stop().await;
}

/// A Query whose bytes are not UTF-8, or hold a NUL before the terminator, after the
/// same point SELECT's shape is cached (the router looks such a text up before it checks
/// the bytes): refused as PostgreSQL refuses it, and nothing of the bytes runs.
#[tokio::test]
async fn query_strings_not_utf8_or_with_a_nul_are_refused_after_their_shape_is_cached() {
    common::ensure_schema().await;
    let r = common::router().await;
    let id = 7_400_001i64;
    let home = common::shard_for(&common::topology(), "users", id);
    let shard = common::shard(home).await;
    shard
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'utf8 check') \
             ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name",
            &[&id],
        )
        .await
        .expect("seed");
    let text = format!("SELECT name FROM users WHERE user_id = {id}");
    let answer = |msgs: &[Msg]| -> Vec<(u8, Option<String>)> {
        msgs.iter()
            .map(|m| (m.tag, (m.tag == b'E').then(|| m.field(b'C')).flatten()))
            .collect()
    };
    let mut raw = Raw::connect(&r).await;
    raw.login().await;
    // Twice: the second run finds the cached shape.
    for _ in 0..2 {
        let msgs = raw.query(&text).await;
        let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
        assert_eq!(tags, b"TDCZ", "{msgs:?}");
        assert!(msgs[1].body.ends_with(b"utf8 check"), "{msgs:?}");
    }
    // Not UTF-8: a 0xff in a quoted alias (`?` below; one literal, so the lexer takes it
    // for a point query's text), and half a character in a comment. 22021, and the
    // session goes on.
    for body in [
        format!("SELECT name AS \"?\" FROM users WHERE user_id = {id}").into_bytes(),
        [text.as_bytes(), b" -- \xc3"].concat(),
    ] {
        let body = body
            .iter()
            .map(|&b| if b == b'?' { 0xff } else { b })
            .collect::<Vec<u8>>();
        let msgs = raw.query_bytes(&body).await;
        assert_eq!(
            answer(&msgs),
            vec![(b'E', Some("22021".into())), (b'Z', None)],
            "{:?}: {msgs:?}",
            String::from_utf8_lossy(&body)
        );
    }
    let msgs = raw.query(&text).await;
    assert_eq!(answer(&msgs).len(), 4, "the session goes on: {msgs:?}");

    // A NUL inside the text, in a comment and before a second statement: the message is
    // malformed (FATAL 08P01), and the statement after the NUL never runs.
    for tail in [
        &b" /* \0 */"[..],
        b"\0; DELETE FROM users WHERE user_id = 7400001",
    ] {
        let mut raw = Raw::connect(&r).await;
        raw.login().await;
        raw.query(&text).await;
        raw.send_lossy(&query_message(&[text.as_bytes(), tail].concat()))
            .await;
        let msgs = raw.drain().await;
        assert_eq!(msgs.len(), 1, "one FATAL, then close: {msgs:?}");
        assert_refused(&msgs, &["08P01"], "a NUL inside a Query");
    }
    let left: i64 = shard
        .query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 1, "nothing after a NUL ran");
    still_serving(&r).await;
    r.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused_with_54000() {
    let mut opts = common::options();
    opts.max_message = 1 << 20;
    let r = shardwire::server::start(opts).await.expect("router starts");
    let other = common::connect(&r).await;

    // Under the limit: fine (a 512 kB query string).
    let c = common::connect(&r).await;
    let filler = "x".repeat(512 * 1024);
    let sql = format!("SELECT length('{filler}')");
    let n: i32 = c
        .query_one(sql.as_str(), &[])
        .await
        .expect("512 kB query")
        .get(0);
    assert_eq!(n, 512 * 1024);

    // 2 MiB query string, simple protocol.
    let big = "y".repeat(2 << 20);
    let res = c.simple_query(&format!("SELECT length('{big}')")).await;
    match res {
        Ok(_) => panic!("a 2 MiB query passed a 1 MiB limit"),
        Err(e) => {
            if let Some(db) = e.as_db_error() {
                assert_eq!(db.code().code(), "54000", "{db:?}");
            } else {
                assert!(
                    c.is_closed() || e.is_closed(),
                    "neither 54000 nor closed: {e:?}"
                );
            }
        }
    }
    // 2 MiB parameter, extended protocol (Bind).
    let c = common::connect(&r).await;
    let res = c.query_one("SELECT length($1::text)", &[&big]).await;
    match res {
        Ok(_) => panic!("a 2 MiB Bind passed a 1 MiB limit"),
        Err(e) => {
            if let Some(db) = e.as_db_error() {
                assert_eq!(db.code().code(), "54000", "{db:?}");
            }
        }
    }
    // Others are unaffected.
    let v: i32 = other
        .query_one("SELECT 5", &[])
        .await
        .expect("other client")
        .get(0);
    assert_eq!(v, 5);
    still_serving(&r).await;
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// Shards that cannot be reached.

#[tokio::test]
async fn unreachable_default_shard_reports_08001_naming_it() {
    let mut opts = common::options();
    opts.topology.shards[3].port = 1;
    opts.topology.default_shard = 3;
    opts.pool.connect_timeout = Duration::from_secs(3);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let c = common::connect(&r).await;
    for i in 0..3 {
        let db = common::expect_sqlstate(c.query("SELECT 1", &[]).await, "08001", "SELECT 1");
        assert!(db.message().contains("s3"), "error names the shard: {db:?}");
        let db = common::expect_sqlstate(
            c.simple_query("SELECT 1").await,
            "08001",
            &format!("simple SELECT 1 #{i}"),
        );
        assert!(db.message().contains("s3"), "error names the shard: {db:?}");
    }
    // Inside a transaction block the failure is a normal error; ROLLBACK ends it.
    c.batch_execute("BEGIN").await.ok();
    let _ = c.query("SELECT 1", &[]).await;
    c.batch_execute("ROLLBACK")
        .await
        .expect("rollback after a shard failure");
    assert!(
        !c.is_closed(),
        "a shard failure must not close the client connection"
    );
    r.stop().await;
}

#[tokio::test]
async fn unreachable_shard_fails_only_its_keys() {
    common::ensure_schema().await;
    let topo = common::topology();
    let mut opts = common::options();
    opts.topology.shards[3].port = 1;
    let r = shardwire::server::start(opts).await.expect("router starts");
    let c = common::connect(&r).await;
    // Keys 7_300_000.. : find one per shard.
    let mut per_shard = [None; 4];
    for id in 7_300_000i64.. {
        let s = common::shard_for(&topo, "users", id);
        if per_shard[s].is_none() {
            per_shard[s] = Some(id);
        }
        if per_shard.iter().all(Option::is_some) {
            break;
        }
    }
    let ids: Vec<i64> = per_shard.iter().map(|x| x.expect("found")).collect();
    for i in 0..3 {
        common::shard(i)
            .await
            .execute("DELETE FROM users WHERE user_id = ANY($1)", &[&ids])
            .await
            .expect("cleanup");
    }
    for round in 0..3 {
        for (s, id) in ids.iter().enumerate() {
            let res = c
                .query("SELECT user_id FROM users WHERE user_id = $1", &[id])
                .await;
            if s == 3 {
                let db = common::expect_sqlstate(res, "08001", &format!("key {id} on s3"));
                assert!(db.message().contains("s3"), "error names the shard: {db:?}");
            } else {
                let rows = res.unwrap_or_else(|e| {
                    panic!("round {round}: key {id} on s{s} failed while s3 is down: {e:?}")
                });
                assert!(rows.is_empty());
            }
        }
        let res = c
            .simple_query(&format!("SELECT * FROM users WHERE user_id = {}", ids[3]))
            .await;
        common::expect_sqlstate(res, "08001", "simple-protocol key on s3");
        let v = c
            .simple_query(&format!("SELECT * FROM users WHERE user_id = {}", ids[0]))
            .await;
        assert!(v.is_ok(), "key on s0 after an s3 failure: {v:?}");
    }
    r.stop().await;
}

/// Stop and start one test shard, the way scripts/shards.sh does (that script when the
/// repo has it). Restarts the shard when dropped, so a failing test leaves it running.
struct StoppedShard {
    name: &'static str,
    data_dir: String,
    bin_dir: String,
    started: bool,
}

impl StoppedShard {
    async fn stop(index: usize, name: &'static str) -> StoppedShard {
        let c = common::shard(index).await;
        let data_dir: String = c
            .query_one("SELECT current_setting('data_directory')", &[])
            .await
            .expect("data_directory (shard roles are superusers)")
            .get(0);
        let bin_dir: String = c
            .query_one("SELECT setting FROM pg_config WHERE name = 'BINDIR'", &[])
            .await
            .expect("pg_config")
            .get(0);
        drop(c);
        let mut s = StoppedShard {
            name,
            data_dir,
            bin_dir,
            started: false,
        };
        s.run("stop");
        s
    }

    fn script() -> Option<std::path::PathBuf> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/shards.sh");
        p.exists().then_some(p)
    }

    /// Run `action`; `Err` with a description if it did not succeed.
    fn try_run(&mut self, action: &str) -> Result<(), String> {
        let status = if let Some(script) = Self::script() {
            let base = std::path::Path::new(&self.data_dir)
                .parent()
                .expect("data dir has a parent")
                .to_owned();
            std::process::Command::new("bash")
                .arg(script)
                .arg(format!("{action}-one"))
                .arg(self.name)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/shard-config.test.yaml"
                ))
                .env("SHARDS_DIR", base)
                .env("SHARDWIRE_BIN", env!("CARGO_BIN_EXE_shardwire"))
                .status()
        } else {
            let pg_ctl = format!("{}/pg_ctl", self.bin_dir);
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]);
            if action == "start" {
                let log = format!("{}/server.log", self.data_dir);
                cmd.args(["setsid", "-w", &pg_ctl, "-D", &self.data_dir, "-l", &log]);
                cmd.args(["-w", "-t", "60", "start"]);
                cmd.stdin(std::process::Stdio::null());
                cmd.stdout(std::process::Stdio::null());
            } else {
                cmd.args([
                    &pg_ctl,
                    "-D",
                    &self.data_dir,
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ]);
            }
            cmd.status()
        };
        let status = status.map_err(|e| format!("{action} shard {}: {e}", self.name))?;
        if !status.success() {
            return Err(format!("{action} shard {} failed: {status}", self.name));
        }
        self.started = action == "start";
        Ok(())
    }

    fn run(&mut self, action: &str) {
        if let Err(e) = self.try_run(action) {
            panic!("{e}");
        }
    }

    fn start(mut self) {
        self.run("start");
    }
}

impl Drop for StoppedShard {
    fn drop(&mut self) {
        if !self.started {
            // No panic here: this may run while a failed test is already unwinding.
            if let Err(e) = self.try_run("start") {
                eprintln!("could not restart shard {}: {e}", self.name);
            }
        }
    }
}

#[tokio::test]
async fn shard_stopped_mid_run_then_back() {
    common::ensure_schema().await;
    let topo = common::topology();
    // One key per shard (no rows needed: an empty answer is a success).
    let key_on = |s: usize| {
        (7_300_100i64..)
            .find(|k| common::shard_for(&topo, "users", *k) == s)
            .expect("a key")
    };
    let keys: Vec<i64> = (0..4).map(key_on).collect();
    let by_key = "SELECT user_id FROM users WHERE user_id = $1";
    let mut opts = common::options();
    opts.pool.connect_timeout = Duration::from_secs(3);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let c = common::connect(&r).await;
    let in_txn = common::connect(&r).await;
    // Pooled connections to s3 exist before it goes away.
    for k in &keys {
        c.query(by_key, &[k]).await.expect("all shards up");
    }
    in_txn.batch_execute("BEGIN").await.expect("begin");
    in_txn
        .query(by_key, &[&keys[3]])
        .await
        .expect("s3 statement in a block");

    let stopped = StoppedShard::stop(3, "s3").await;
    for i in 0..3 {
        for simple in [false, true] {
            let res = if simple {
                c.simple_query(&format!(
                    "SELECT user_id FROM users WHERE user_id = {}",
                    keys[3]
                ))
                .await
                .map(|_| ())
            } else {
                c.query(by_key, &[&keys[3]]).await.map(|_| ())
            };
            let err = res.expect_err("s3 is down; its key must fail");
            let db = err
                .as_db_error()
                .unwrap_or_else(|| panic!("attempt {i}: expected an ErrorResponse, got {err:?}"));
            let code = db.code().code();
            assert!(
                code.starts_with("08") || code == "57P01",
                "attempt {i}: SQLSTATE {code} ({db:?})"
            );
            if code.starts_with("08") {
                assert!(db.message().contains("s3"), "error names the shard: {db:?}");
            }
        }
        // Keys on live shards still work through the same router and client.
        for (s, k) in keys.iter().enumerate().take(3) {
            let rows = c
                .query(by_key, &[k])
                .await
                .unwrap_or_else(|e| panic!("key on s{s} while s3 is down: {e:?}"));
            assert!(rows.is_empty());
            c.simple_query(&format!("SELECT user_id FROM users WHERE user_id = {k}"))
                .await
                .unwrap_or_else(|e| panic!("simple key on s{s} while s3 is down: {e:?}"));
        }
    }
    // A fan-out that needs s3 fails instead of returning partial rows.
    let res = c
        .query(
            "SELECT user_id FROM users WHERE user_id BETWEEN 7300000 AND 7300999",
            &[],
        )
        .await;
    assert!(
        res.is_err(),
        "a fan-out with a shard down returned (partial) rows: {res:?}"
    );
    // The block that held an s3 connection fails, and ROLLBACK ends it.
    let res = in_txn.query(by_key, &[&keys[3]]).await;
    assert!(res.is_err(), "statement on a dead connection succeeded");
    in_txn
        .batch_execute("ROLLBACK")
        .await
        .expect("ROLLBACK after the shard went away");
    in_txn
        .query(by_key, &[&keys[0]])
        .await
        .expect("client usable after ROLLBACK");

    stopped.start();
    // The same router and the same client connections recover without a restart.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match c.query(by_key, &[&keys[3]]).await {
            Ok(rows) => {
                assert!(rows.is_empty());
                break;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < give_up,
                    "router did not recover after s3 came back: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for c in [&c, &in_txn] {
        for k in &keys {
            c.query(by_key, &[k]).await.expect("after recovery");
        }
    }
    r.stop().await;
}

/// While the default shard cannot be reached, a client's start tries it once to learn
/// its ParameterStatus values, and the clients right after it do not try again: they
/// are greeted at once with PostgreSQL's defaults. Statements still go to the shard.
#[tokio::test]
async fn clients_do_not_each_wait_on_an_unreachable_default_shard_to_start() {
    // The default shard: a socket that accepts and never answers, counting attempts.
    let (port, attempts) = common::silent_server().await;
    let tried = || attempts.load(std::sync::atomic::Ordering::SeqCst);
    let mut opts = common::options();
    opts.topology.shards[0].port = port;
    opts.pool.connect_timeout = Duration::from_millis(500);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let first = common::connect(&r).await;
    assert_eq!(
        tried(),
        1,
        "the first client's start tried the default shard"
    );
    let others = [common::connect(&r).await, common::connect(&r).await];
    assert_eq!(tried(), 1, "later starts did not try it again");
    // Greeted with the defaults, and served as usual: a statement for the default
    // shard tries it and fails with the shard's name.
    for c in [&first, &others[0], &others[1]] {
        let version = c
            .simple_query("SHOW server_version")
            .await
            .map(|_| ())
            .map_err(|e| e.as_db_error().map(|d| d.code().code().to_owned()));
        assert_eq!(version, Err(Some("08001".to_owned())));
    }
    assert!(tried() > 1, "statements still go to the shard");
    r.stop().await;
}
