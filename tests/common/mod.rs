//! Shared harness for integration tests: a router on port 0 in front of the test shards
//! that `scripts/test.sh` starts (tests/shard-config.test.yaml).
#![allow(dead_code)]

use std::time::Duration;

use shardwire::backend::pool::PoolSettings;
use shardwire::server::{start, RunningRouter, ServeOptions, UserSpec};
use shardwire::topology::{Distribution, KeyRange, KeyType, KeyValue, Method, Shard, ShardedTable, SlotRange, Topology};

pub const SHARD_PORTS: [u16; 4] = [25433, 25434, 25435, 25436];

pub fn test_topology() -> Topology {
    let shards = SHARD_PORTS
        .iter()
        .enumerate()
        .map(|(i, p)| Shard {
            name: format!("s{i}"),
            host: "127.0.0.1".into(),
            port: *p,
            database: "app".into(),
            user: "app".into(),
            password: "app-secret".into(),
        })
        .collect();
    let users = Distribution {
        name: "users".into(),
        key_type: KeyType::Bigint,
        method: Method::Hash {
            slots: 1024,
            map: (0..4).map(|i| SlotRange { first: i * 256, last: i * 256 + 255, shard: i as usize }).collect(),
        },
    };
    let accounts = Distribution {
        name: "accounts".into(),
        key_type: KeyType::Bigint,
        method: Method::Range {
            map: vec![
                KeyRange { from: None, to: Some(KeyValue::Int(1_000_000)), shard: 0 },
                KeyRange { from: Some(KeyValue::Int(1_000_000)), to: Some(KeyValue::Int(2_000_000)), shard: 1 },
                KeyRange { from: Some(KeyValue::Int(2_000_000)), to: Some(KeyValue::Int(3_000_000)), shard: 2 },
                KeyRange { from: Some(KeyValue::Int(3_000_000)), to: None, shard: 3 },
            ],
        },
    };
    let mut tables = std::collections::HashMap::new();
    for t in ["users", "orders", "events"] {
        tables.insert(t.to_string(), ShardedTable { name: t.into(), column: "user_id".into(), distribution: 0 });
    }
    tables.insert("accounts".into(), ShardedTable { name: "accounts".into(), column: "account_id".into(), distribution: 1 });
    Topology {
        shards,
        distributions: vec![users, accounts],
        tables,
        reference_tables: ["countries".to_string()].into_iter().collect(),
        default_shard: 0,
        version: 1,
    }
}

pub fn options() -> ServeOptions {
    ServeOptions {
        topology: test_topology(),
        users: vec![
            UserSpec { name: "app".into(), password: "app-secret".into(), admin: false },
            UserSpec { name: "admin".into(), password: "admin-secret".into(), admin: true },
        ],
        database: "app".into(),
        listen: "127.0.0.1:0".into(),
        pool: PoolSettings { size: 8, connect_timeout: Duration::from_secs(3), checkout_timeout: Duration::from_secs(5) },
        max_message: 1 << 30,
        grace: Duration::from_secs(1),
    }
}

pub async fn router() -> RunningRouter {
    start(options()).await.expect("router starts")
}

pub fn conninfo(r: &RunningRouter) -> String {
    format!("host=127.0.0.1 port={} user=app password=app-secret dbname=app", r.addr.port())
}

pub async fn connect(r: &RunningRouter) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&conninfo(r), tokio_postgres::NoTls).await.expect("connect through router");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A direct connection to shard `i`, bypassing the router.
pub async fn shard(i: usize) -> tokio_postgres::Client {
    let info = format!("host=127.0.0.1 port={} user=app password=app-secret dbname=app", SHARD_PORTS[i]);
    let (client, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("test shard s{i} on port {} is not reachable ({e}); run scripts/test.sh", SHARD_PORTS[i]));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
