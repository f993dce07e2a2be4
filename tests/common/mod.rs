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
