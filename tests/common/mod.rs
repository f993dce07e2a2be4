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

/// The demo schema (scripts/schema.sql), created on every shard if missing.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    user_id    bigint PRIMARY KEY,
    name       text,
    email      text,
    created_at timestamptz DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orders (
    order_id   bigint,
    user_id    bigint,
    amount     numeric(10, 2),
    status     text,
    created_at timestamptz DEFAULT now(),
    PRIMARY KEY (user_id, order_id)
);
CREATE TABLE IF NOT EXISTS events (
    user_id  bigint,
    event_id bigint,
    kind     text,
    payload  jsonb,
    at       timestamptz DEFAULT now(),
    PRIMARY KEY (user_id, event_id)
);
CREATE TABLE IF NOT EXISTS accounts (
    account_id bigint PRIMARY KEY,
    owner      text,
    balance    numeric
);
CREATE TABLE IF NOT EXISTS countries (
    code text PRIMARY KEY,
    name text
);
";

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
