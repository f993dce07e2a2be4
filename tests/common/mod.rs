//! Shared harness for integration tests: a router on port 0 in front of the test shards
//! that `scripts/test.sh` starts (tests/shard-config.test.yaml).
#![allow(dead_code)]

use std::time::Duration;

use shardwire::config::Config;
use shardwire::server::{start, RunningRouter, ServeOptions};

pub const SHARD_PORTS: [u16; 4] = [25433, 25434, 25435, 25436];

/// Router options from tests/shard-config.test.yaml, listening on a free port.
pub fn options() -> ServeOptions {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/shard-config.test.yaml");
    let cfg = Config::load(path).unwrap_or_else(|e| panic!("{path}: {:?}", e.errors()));
    let mut opts = ServeOptions::from_config(&cfg).expect("test config builds");
    opts.listen = "127.0.0.1:0".into();
    opts.grace = Duration::from_secs(1);
    opts
}

pub async fn router() -> RunningRouter {
    start(options()).await.expect("router starts")
}

/// A router whose pools hold one connection per shard, so that consecutive clients
/// share server connections.
pub async fn router_pool1() -> RunningRouter {
    router_pool1_with(|_| {}).await
}

/// `router_pool1` with further changes to its options.
pub async fn router_pool1_with(change: impl FnOnce(&mut ServeOptions)) -> RunningRouter {
    let mut opts = options();
    opts.pool.size = 1;
    opts.pool.checkout_timeout = Duration::from_secs(15);
    change(&mut opts);
    start(opts).await.expect("router starts")
}

/// Create table `name` afresh on s0 (the default shard), directly.
pub async fn fresh_table_s0(name: &str, columns: &str) {
    shard(0)
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns})"
        ))
        .await
        .unwrap_or_else(|e| panic!("create {name} on s0: {e}"));
}

pub async fn drop_table_s0(name: &str) {
    shard(0)
        .await
        .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
        .await
        .unwrap_or_else(|e| panic!("drop {name} on s0: {e}"));
}

pub fn conninfo(r: &RunningRouter) -> String {
    format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=app",
        r.addr.port()
    )
}

pub async fn connect(r: &RunningRouter) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&conninfo(r), tokio_postgres::NoTls)
        .await
        .expect("connect through router");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A direct connection to shard `i`, bypassing the router.
pub async fn shard(i: usize) -> tokio_postgres::Client {
    let info = format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=app",
        SHARD_PORTS[i]
    );
    let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "test shard s{i} on port {} is not reachable ({e}); run scripts/test.sh",
                SHARD_PORTS[i]
            )
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

// ---------------------------------------------------------------------------------------
// Helpers for the protocol / errors / routing / psql / pgbench tests.

/// The demo schema, created on every shard if missing: the same file the scripts load.
pub const SCHEMA: &str = include_str!("../../scripts/schema.sql");

static SCHEMA_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Make sure every shard has the demo tables. Concurrent `CREATE TABLE IF NOT EXISTS`
/// (other test processes) can collide on the catalog; such collisions are retried.
pub async fn ensure_schema() {
    SCHEMA_READY
        .get_or_init(|| async {
            for i in 0..SHARD_PORTS.len() {
                let c = shard(i).await;
                let mut attempt = 0;
                loop {
                    match c.batch_execute(SCHEMA).await {
                        Ok(()) => break,
                        Err(e) if attempt < 5 => {
                            attempt += 1;
                            eprintln!("schema on s{i}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("cannot create the test schema on s{i}: {e}"),
                    }
                }
            }
        })
        .await;
}

/// The test topology (tests/shard-config.test.yaml), as the router builds it.
pub fn topology() -> shardwire::topology::Topology {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/shard-config.test.yaml");
    let cfg = Config::load(path).unwrap_or_else(|e| panic!("{path}: {:?}", e.errors()));
    shardwire::topology::build::build(&cfg).expect("test topology builds")
}

/// The shard index that owns key `key` of sharded table `table` (by the placement
/// function, not by asking the router).
pub fn shard_for(topo: &shardwire::topology::Topology, table: &str, key: i64) -> usize {
    let t = topo
        .table(table)
        .unwrap_or_else(|| panic!("{table} is sharded"));
    topo.distribution_of(t)
        .shard_for(&shardwire::topology::KeyValue::Int(key))
        .expect("key is placed")
}

/// Connect through the router with extra conninfo (e.g. `application_name=x`).
pub async fn connect_with(r: &RunningRouter, extra: &str) -> tokio_postgres::Client {
    let info = format!("{} {extra}", conninfo(r));
    let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through router with `{extra}`: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// SQLSTATE of a failed statement, or a readable panic if it was not a server error.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.code().code().to_owned(),
        None => panic!("expected an ErrorResponse, got a client-side error: {e:?}"),
    }
}

/// Assert that `res` failed with SQLSTATE `code`; returns the server's error.
pub fn expect_sqlstate<T: std::fmt::Debug>(
    res: Result<T, tokio_postgres::Error>,
    code: &str,
    what: &str,
) -> tokio_postgres::error::DbError {
    match res {
        Ok(v) => panic!("{what}: expected SQLSTATE {code}, but it succeeded: {v:?}"),
        Err(e) => match e.as_db_error() {
            Some(db) => {
                assert_eq!(
                    db.code().code(),
                    code,
                    "{what}: wrong SQLSTATE; error was {db:?}"
                );
                db.clone()
            }
            None => panic!("{what}: expected SQLSTATE {code}, got {e:?}"),
        },
    }
}

/// Poll all futures concurrently on the current task (like `futures::future::join_all`),
/// so requests from one client are pipelined; outputs in input order.
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

// ---------------------------------------------------------------------------------------
// A raw protocol client (tests/regressions.rs), for message sequences tokio-postgres
// cannot express: frames built by hand, SCRAM-SHA-256 login, a small frame reader.

/// How long a raw read may wait before the test calls the router hung.
pub const RAW_HANG: Duration = Duration::from_secs(20);

/// One backend message: tag and body.
#[derive(Debug, Clone)]
pub struct RawMsg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl RawMsg {
    /// A field of an ErrorResponse/NoticeResponse by its one-letter code.
    pub fn field(&self, code: u8) -> Option<String> {
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

    /// SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        (self.tag == b'E').then(|| self.field(b'C')).flatten()
    }

    /// The tag of a CommandComplete.
    pub fn command_tag(&self) -> String {
        assert_eq!(self.tag, b'C', "not a CommandComplete: {self}");
        let end = self
            .body
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.body.len());
        String::from_utf8_lossy(&self.body[..end]).into_owned()
    }

    /// Column names of a RowDescription.
    pub fn column_names(&self) -> Vec<String> {
        assert_eq!(self.tag, b'T', "not a RowDescription: {self}");
        let n = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let mut out = Vec::with_capacity(n);
        let mut at = 2;
        for _ in 0..n {
            let end = at + self.body[at..].iter().position(|b| *b == 0).expect("name");
            out.push(String::from_utf8_lossy(&self.body[at..end]).into_owned());
            at = end + 1 + 18;
        }
        out
    }

    /// Values of a DataRow (text format).
    pub fn values(&self) -> Vec<Option<String>> {
        assert_eq!(self.tag, b'D', "not a DataRow: {self}");
        let n = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let mut out = Vec::with_capacity(n);
        let mut at = 2;
        for _ in 0..n {
            let len = i32::from_be_bytes(self.body[at..at + 4].try_into().expect("4"));
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                let len = len as usize;
                out.push(Some(
                    String::from_utf8_lossy(&self.body[at..at + len]).into_owned(),
                ));
                at += len;
            }
        }
        out
    }

    /// The status byte of a ReadyForQuery.
    pub fn status(&self) -> char {
        assert_eq!(self.tag, b'Z', "not a ReadyForQuery: {self}");
        self.body[0] as char
    }

    fn auth_code(&self) -> i32 {
        assert_eq!(
            self.tag, b'R',
            "expected an authentication message, got {self}"
        );
        i32::from_be_bytes(self.body[..4].try_into().expect("4 bytes"))
    }
}

impl std::fmt::Display for RawMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tag {
            b'E' | b'N' => write!(
                f,
                "{}({} {})",
                self.tag as char,
                self.field(b'C').unwrap_or_default(),
                self.field(b'M').unwrap_or_default()
            ),
            b'C' => write!(f, "C({})", self.command_tag()),
            b'Z' => write!(f, "Z({})", self.body[0] as char),
            t => write!(f, "{}", t as char),
        }
    }
}

/// The tags of `msgs` as a string ("12TDCZ"), for assertions.
pub fn raw_tags(msgs: &[RawMsg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// `msgs` readable in an assertion message.
pub fn raw_show(msgs: &[RawMsg]) -> String {
    msgs.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The reading half of a raw connection.
pub struct RawReader {
    r: tokio::net::tcp::OwnedReadHalf,
    buf: bytes::BytesMut,
}

impl RawReader {
    /// The next message, `None` when the router closed the connection. Panics if the
    /// router sends nothing for `RAW_HANG`.
    pub async fn try_recv(&mut self) -> Option<RawMsg> {
        use bytes::Buf;
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4")) as usize;
                assert!(len >= 4, "router sent a bad length");
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(RawMsg { tag, body });
                }
            }
            self.buf.reserve(64 * 1024);
            let n = tokio::time::timeout(RAW_HANG, self.r.read_buf(&mut self.buf))
                .await
                .expect("the router sent nothing for 20 s (hung)")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// The next message; panics if the connection closed.
    pub async fn recv(&mut self) -> RawMsg {
        self.try_recv()
            .await
            .expect("the router closed the connection")
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<RawMsg> {
        let mut out = Vec::new();
        loop {
            let Some(m) = self.try_recv().await else {
                panic!(
                    "the router closed the connection before ReadyForQuery, after: {}",
                    raw_show(&out)
                );
            };
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Exactly `n` messages.
    pub async fn take(&mut self, n: usize) -> Vec<RawMsg> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv().await);
        }
        out
    }
}

/// A logged-in raw protocol connection to the router.
pub struct RawClient {
    pub rd: RawReader,
    pub w: tokio::net::tcp::OwnedWriteHalf,
}

impl RawClient {
    /// Connect and log in as `app` to database `app`.
    pub async fn connect(r: &RunningRouter) -> RawClient {
        Self::connect_params(r, &[]).await
    }

    /// Connect with extra startup parameters.
    pub async fn connect_params(r: &RunningRouter, extra: &[(&str, &str)]) -> RawClient {
        Self::connect_addr(r.addr, extra).await
    }

    /// Connect to `addr` (the router, or a shard directly to compare with PostgreSQL).
    pub async fn connect_addr(addr: std::net::SocketAddr, extra: &[(&str, &str)]) -> RawClient {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        use postgres_protocol::message::frontend;
        let s = tokio::time::timeout(RAW_HANG, tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect hung")
            .expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (r, w) = s.into_split();
        let mut c = RawClient {
            rd: RawReader {
                r,
                buf: bytes::BytesMut::new(),
            },
            w,
        };
        let mut params = vec![("user", "app"), ("database", "app")];
        params.extend_from_slice(extra);
        let mut b = bytes::BytesMut::new();
        frontend::startup_message(params, &mut b).expect("startup");
        c.send(&b).await;
        let m = c.rd.recv().await;
        assert_eq!(m.auth_code(), 10, "SASL expected: {m}");
        let mut scram = ScramSha256::new(b"app-secret", ChannelBinding::unsupported());
        let mut b = bytes::BytesMut::new();
        frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut b).expect("p");
        c.send(&b).await;
        let m = c.rd.recv().await;
        assert_eq!(m.auth_code(), 11, "SASLContinue expected: {m}");
        scram.update(&m.body[4..]).expect("server-first parses");
        let mut b = bytes::BytesMut::new();
        frontend::sasl_response(scram.message(), &mut b).expect("p");
        c.send(&b).await;
        let m = c.rd.recv().await;
        assert_eq!(m.auth_code(), 12, "SASLFinal expected: {m}");
        scram
            .finish(&m.body[4..])
            .expect("server signature verifies");
        let m = c.rd.recv().await;
        assert_eq!(m.auth_code(), 0, "AuthenticationOk expected");
        loop {
            let m = c.rd.recv().await;
            match m.tag {
                b'S' | b'K' => {}
                b'Z' => {
                    assert_eq!(m.body, b"I");
                    return c;
                }
                _ => panic!("unexpected message during greeting: {m}"),
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        tokio::time::timeout(RAW_HANG, self.w.write_all(bytes))
            .await
            .expect("the router stopped reading for 20 s (hung)")
            .expect("write");
    }

    pub async fn recv(&mut self) -> RawMsg {
        self.rd.recv().await
    }

    pub async fn until_ready(&mut self) -> Vec<RawMsg> {
        self.rd.until_ready().await
    }

    /// A simple query; the messages up to ReadyForQuery.
    pub async fn query(&mut self, sql: &str) -> Vec<RawMsg> {
        let mut b = bytes::BytesMut::new();
        wire::query(&mut b, sql);
        self.send(&b).await;
        self.until_ready().await
    }

    /// Split into the reading half and the writing half (e.g. to read in another task).
    pub fn split(self) -> (RawReader, tokio::net::tcp::OwnedWriteHalf) {
        (self.rd, self.w)
    }
}

/// Frontend messages built by hand (counts as unsigned 16 bits, as PostgreSQL reads them).
pub mod wire {
    use bytes::{BufMut, BytesMut};

    fn frame(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
        buf.put_u8(tag);
        let at = buf.len();
        buf.put_i32(0);
        body(buf);
        let len = (buf.len() - at) as i32;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    fn cstr(buf: &mut BytesMut, s: &str) {
        buf.put_slice(s.as_bytes());
        buf.put_u8(0);
    }

    pub fn query(buf: &mut BytesMut, sql: &str) {
        frame(buf, b'Q', |b| cstr(b, sql));
    }

    pub fn parse(buf: &mut BytesMut, name: &str, sql: &str, types: &[u32]) {
        frame(buf, b'P', |b| {
            cstr(b, name);
            cstr(b, sql);
            b.put_u16(types.len() as u16);
            for t in types {
                b.put_u32(*t);
            }
        });
    }

    /// Bind with text parameters (`None` is NULL) and text results.
    pub fn bind(buf: &mut BytesMut, portal: &str, stmt: &str, params: &[Option<&[u8]>]) {
        frame(buf, b'B', |b| {
            cstr(b, portal);
            cstr(b, stmt);
            b.put_u16(0);
            b.put_u16(params.len() as u16);
            for p in params {
                match p {
                    Some(v) => {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v);
                    }
                    None => b.put_i32(-1),
                }
            }
            b.put_u16(0);
        });
    }

    /// Describe a statement (`b'S'`) or portal (`b'P'`).
    pub fn describe(buf: &mut BytesMut, kind: u8, name: &str) {
        frame(buf, b'D', |b| {
            b.put_u8(kind);
            cstr(b, name);
        });
    }

    /// Close a statement (`b'S'`) or portal (`b'P'`).
    pub fn close(buf: &mut BytesMut, kind: u8, name: &str) {
        frame(buf, b'C', |b| {
            b.put_u8(kind);
            cstr(b, name);
        });
    }

    pub fn execute(buf: &mut BytesMut, portal: &str, max_rows: i32) {
        frame(buf, b'E', |b| {
            cstr(b, portal);
            b.put_i32(max_rows);
        });
    }

    pub fn sync(buf: &mut BytesMut) {
        frame(buf, b'S', |_| {});
    }

    pub fn flush(buf: &mut BytesMut) {
        frame(buf, b'H', |_| {});
    }

    pub fn copy_data(buf: &mut BytesMut, data: &[u8]) {
        frame(buf, b'd', |b| b.put_slice(data));
    }

    pub fn copy_done(buf: &mut BytesMut) {
        frame(buf, b'c', |_| {});
    }

    /// Parse (unnamed), Bind (unnamed), Execute of `sql` without parameters.
    pub fn pbe(buf: &mut BytesMut, sql: &str) {
        parse(buf, "", sql, &[]);
        bind(buf, "", "", &[]);
        execute(buf, "", 0);
    }
}

/// A server that accepts connections and never answers (a shard that hangs): every
/// connect attempt to it lasts until the router's connect timeout. Returns its port and
/// how many connections it has accepted so far.
pub async fn silent_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("address").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    (port, accepted)
}
