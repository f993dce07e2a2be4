//! Micro-benchmarks of the per-statement hot path (issue 3): the routing decision on a
//! plan-cache hit and on a miss, the placement hash, DataRow framing, and relaying a
//! 1,000-row result. Run with `cargo bench --bench hot_path` (add a filter such as
//! `-- router/` to run a group); `cargo test --all-targets` runs each once as a test.
//!
//! The topology is `tests/shard-config.test.yaml` (4 shards, `users` hash-sharded by
//! `user_id` over 1024 slots). Nothing here does I/O.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use shardwire::config::Config;
use shardwire::protocol::codec::{decode_frame, decode_raw};
use shardwire::protocol::messages;
use shardwire::router::{Param, Route, Router};
use shardwire::topology::hash::{hashint8extended, hashtextextended};
use shardwire::topology::key::KeyValue;
use shardwire::topology::{build, Topology};

/// The largest message the relay accepts (the config default, 1 GiB).
const MAX_MESSAGE: u64 = 1 << 30;

fn topology() -> Arc<Topology> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shard-config.test.yaml");
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => panic!("loading {}: {e}", path.display()),
    };
    match build::build(&cfg) {
        Ok(t) => Arc::new(t),
        Err(e) => panic!("building the topology of {}: {e:?}", path.display()),
    }
}

fn expect_one_shard(route: &Route) {
    assert!(
        matches!(route, Route::Shard(_)),
        "expected one shard, got {route:?}"
    );
}

/// Routing a statement whose text is in the plan cache: `plan` alone, and `plan` +
/// `route` for a literal key (simple protocol) and a `$1` key (extended protocol).
fn router_hit(c: &mut Criterion) {
    let topo = topology();
    let router = Router::new(Arc::clone(&topo));
    let literal = "SELECT name, email FROM users WHERE user_id = 4242";
    let param_sql = "SELECT name, email FROM users WHERE user_id = $1";
    let key = b"4242";
    let params = [Param {
        value: Some(&key[..]),
        binary: false,
        type_oid: 0,
    }];
    // Warm the cache; check the decisions once, outside the timed loops.
    for sql in [literal, param_sql] {
        let plan = router.plan(sql).expect("plan");
        let routed = plan.statements[0].route(&topo, &params).expect("route");
        expect_one_shard(&routed.route);
    }

    let mut g = c.benchmark_group("router");
    // A text without literals: the exact-text cache.
    g.bench_function("plan_hit", |b| {
        b.iter(|| router.plan(black_box(param_sql)).expect("plan"))
    });
    // A text with literals is found by its shape: a lexer pass, then the plan is
    // instantiated with this text's literal values.
    g.bench_function("plan_hit_literal", |b| {
        b.iter(|| router.plan(black_box(literal)).expect("plan"))
    });
    g.bench_function("plan_hit+route_literal", |b| {
        b.iter(|| {
            let plan = router.plan(black_box(literal)).expect("plan");
            plan.statements[0].route(&topo, &[]).expect("route")
        })
    });
    g.bench_function("plan_hit+route_param", |b| {
        b.iter(|| {
            let plan = router.plan(black_box(param_sql)).expect("plan");
            plan.statements[0]
                .route(&topo, black_box(&params))
                .expect("route")
        })
    });
    // The simple protocol's point query: plan, then the kept-statement form and shard.
    g.bench_function("plan_hit+point_literal", |b| {
        b.iter(|| {
            let plan = router.plan(black_box(literal)).expect("plan");
            let point = plan.statements[0]
                .point_literal(&topo)
                .expect("a point query");
            point.0
        })
    });
    // What the proxy does for it once its shape is cached: the same answer, no plan.
    g.bench_function("point_query", |b| {
        b.iter(|| {
            router
                .point_query(black_box(literal.as_bytes()))
                .expect("a point query")
                .shard
        })
    });
    let plan = router.plan(param_sql).expect("plan");
    g.bench_function("route_only_param", |b| {
        b.iter(|| {
            plan.statements[0]
                .route(&topo, black_box(&params))
                .expect("route")
        })
    });
    g.finish();
}

/// Cache misses. `plan_miss_parse`: a text never seen and with a new shape (a new
/// column alias each time), so the statement is parsed with pg_query. Also
/// `plan_miss_shape_hit`: a new text whose normalized form is cached (only the key
/// literal differs), which costs a lexer pass and no parse.
fn router_miss(c: &mut Criterion) {
    let topo = topology();
    let router = Router::new(Arc::clone(&topo));
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("router");
    g.bench_function("plan_miss_parse+route", |b| {
        b.iter_batched(
            || {
                let i = n.fetch_add(1, Ordering::Relaxed);
                format!("SELECT name AS n{i}, email FROM users WHERE user_id = 4242")
            },
            |sql| {
                let plan = router.plan(&sql).expect("plan");
                plan.statements[0].route(&topo, &[]).expect("route")
            },
            BatchSize::SmallInput,
        )
    });
    let router = Router::new(Arc::clone(&topo));
    router
        .plan("SELECT name, email FROM users WHERE user_id = 1")
        .expect("plan");
    g.bench_function("plan_miss_shape_hit+route", |b| {
        b.iter_batched(
            || {
                let i = n.fetch_add(1, Ordering::Relaxed);
                format!("SELECT name, email FROM users WHERE user_id = {i}")
            },
            |sql| {
                let plan = router.plan(&sql).expect("plan");
                plan.statements[0].route(&topo, &[]).expect("route")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The placement hash (PostgreSQL's extended hashes, seed 0) and key → shard.
fn placement(c: &mut Criterion) {
    let topo = topology();
    let table = topo
        .table("users")
        .expect("users is sharded in the test config");
    let dist = topo.distribution_of(table);
    let mut g = c.benchmark_group("hash");
    let mut k: i64 = 1;
    g.bench_function("hashint8extended", |b| {
        b.iter(|| {
            k = k.wrapping_add(7919);
            hashint8extended(black_box(k), 0)
        })
    });
    g.bench_function("hashtextextended_16B", |b| {
        b.iter(|| hashtextextended(black_box(b"user-0000004242@"), 0))
    });
    g.bench_function("hashtextextended_64B", |b| {
        b.iter(|| hashtextextended(black_box(&[b'x'; 64]), 0))
    });
    let key = KeyValue::Int(4242);
    g.bench_function("shard_for_bigint", |b| {
        b.iter(|| dist.shard_for(black_box(&key)).expect("placed"))
    });
    g.finish();
}

/// A DataRow like `SELECT user_id, name, email`: int8 as text, two short strings.
fn data_row(buf: &mut BytesMut, i: usize) {
    let cols = [
        format!("{}", 1_000_000 + i),
        format!("user {i}"),
        format!("user{i}@example.com"),
    ];
    let at = messages::begin(buf, b'D');
    buf.put_i16(cols.len() as i16);
    for col in &cols {
        buf.put_i32(col.len() as i32);
        buf.put_slice(col.as_bytes());
    }
    messages::finish(buf, at);
}

/// Encoding one DataRow, and splitting one off a buffer (decoded body, and raw bytes
/// kept for forwarding).
fn codec(c: &mut Criterion) {
    let mut one = BytesMut::new();
    data_row(&mut one, 42);
    let len = one.len();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(len as u64));
    let mut out = BytesMut::with_capacity(1024);
    g.bench_function("encode_datarow", |b| {
        b.iter(|| {
            out.clear();
            let at = messages::begin(&mut out, b'D');
            out.put_i16(3);
            for col in [&b"1000042"[..], b"user 42", b"user42@example.com"] {
                out.put_i32(col.len() as i32);
                out.put_slice(black_box(col));
            }
            messages::finish(&mut out, at);
            out.len()
        })
    });
    g.bench_function("decode_frame_datarow", |b| {
        b.iter_batched(
            || one.clone(),
            |mut buf| {
                decode_frame(&mut buf, MAX_MESSAGE)
                    .expect("valid")
                    .expect("complete")
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decode_raw_datarow", |b| {
        b.iter_batched(
            || one.clone(),
            |mut buf| {
                decode_raw(&mut buf, MAX_MESSAGE)
                    .expect("valid")
                    .expect("complete")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What the single-shard relay does with a 1,000-row answer that arrived in one read:
/// split every frame off the read buffer (`decode_raw`) and append it to the client's
/// write buffer, until ReadyForQuery.
fn relay(c: &mut Criterion) {
    const ROWS: usize = 1000;
    let mut input = BytesMut::new();
    for i in 0..ROWS {
        data_row(&mut input, i);
    }
    messages::command_complete(&mut input, "SELECT 1000");
    messages::ready_for_query(&mut input, b'I');
    let bytes = input.len();
    let mut out = BytesMut::with_capacity(bytes * 2);
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("1000_rows_decode_raw+append", |b| {
        b.iter_batched(
            || input.clone(),
            |mut rbuf| {
                out.clear();
                let mut frames = 0usize;
                while let Some(frame) = decode_raw(&mut rbuf, MAX_MESSAGE).expect("valid") {
                    frames += 1;
                    out.extend_from_slice(&frame);
                    if frame[0] == b'Z' {
                        break;
                    }
                }
                assert_eq!(frames, ROWS + 2);
                out.len()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, router_hit, router_miss, placement, codec, relay);
criterion_main!(benches);
