//! Routing against real shards: rows written through the router land on exactly the
//! shard the placement function names (checked on each shard directly, with
//! PostgreSQL's own slot expression), reads by key find them, fan-outs return every
//! row once, shapes that cannot be merged yet are refused, reference tables are
//! written everywhere, and every error leaves the connection usable.
//!
//! Keys: users 7_000_000..7_009_999 (one sub-range per test), accounts near the range
//! boundaries with owner 'routing-test', countries codes starting with 'rt-'. Each test
//! deletes its keys directly on every shard before and after it runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use shardwire::topology::{Method, Topology};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

const SHARDS: usize = 4;

async fn shards() -> Vec<Client> {
    let mut v = Vec::new();
    for i in 0..SHARDS {
        v.push(common::shard(i).await);
    }
    v
}

/// Delete users/orders in `[lo, hi]` on every shard.
async fn clean_users(direct: &[Client], lo: i64, hi: i64) {
    for c in direct {
        c.execute(
            "DELETE FROM orders WHERE user_id BETWEEN $1 AND $2",
            &[&lo, &hi],
        )
        .await
        .expect("clean orders");
        c.execute(
            "DELETE FROM users WHERE user_id BETWEEN $1 AND $2",
            &[&lo, &hi],
        )
        .await
        .expect("clean users");
    }
}

/// The hash slot interval each shard owns in the users distribution.
fn slot_ranges(topo: &Topology) -> BTreeMap<usize, Vec<(u32, u32)>> {
    let t = topo.table("users").expect("users");
    let Method::Hash { map, .. } = &topo.distribution_of(t).method else {
        panic!("users is hash-distributed in the test config");
    };
    let mut out: BTreeMap<usize, Vec<(u32, u32)>> = BTreeMap::new();
    for r in map {
        out.entry(r.shard).or_default().push((r.first, r.last));
    }
    out
}

/// Rows of a simple query as text.
fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The connection still answers.
async fn usable(c: &Client) {
    let v: i32 = c
        .query_one("SELECT 1 + 1", &[])
        .await
        .expect("usable")
        .get(0);
    assert_eq!(v, 2);
}

#[tokio::test]
async fn hash_placement_of_single_row_inserts() {
    common::ensure_schema().await;
    let topo = common::topology();
    let direct = shards().await;
    let (lo, hi) = (7_000_000i64, 7_001_199i64);
    clean_users(&direct, lo, hi).await;
    let r = common::router().await;
    let c = common::connect(&r).await;

    let ids: Vec<i64> = (lo..=hi).collect();
    let (simple, extended) = ids.split_at(ids.len() / 2);
    // Simple protocol, literals (the plan cache sees one normalized statement with
    // 600 different literals).
    for id in simple {
        let msgs = c
            .simple_query(&format!(
                "INSERT INTO users (user_id, name, email) VALUES ({id}, 'user {id}', 'u{id}@example.com')"
            ))
            .await
            .unwrap_or_else(|e| panic!("insert {id}: {e:?}"));
        assert!(msgs
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(1))));
    }
    // Extended protocol, binary int8 parameter, pipelined in chunks.
    let ins = c
        .prepare("INSERT INTO users (user_id, name, email) VALUES ($1, $2, $3)")
        .await
        .expect("prepare");
    for chunk in extended.chunks(50) {
        let futs = chunk.iter().map(|id| {
            let (c, ins) = (&c, &ins);
            async move {
                let n = c
                    .execute(
                        ins,
                        &[id, &format!("user {id}"), &format!("u{id}@example.com")],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("insert {id}: {e:?}"));
                assert_eq!(n, 1);
            }
        });
        common::join_all(futs).await;
    }

    // On each shard: every row is where the placement function says, and PostgreSQL's
    // own slot expression agrees with the shard's slot interval.
    let ranges = slot_ranges(&topo);
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for (s, dc) in direct.iter().enumerate() {
        let found = dc
            .query(
                "SELECT user_id, name, (((hashint8extended(user_id, 0) % 1024) + 1024) % 1024)::int4 \
                 FROM users WHERE user_id BETWEEN $1 AND $2",
                &[&lo, &hi],
            )
            .await
            .expect("read shard");
        for row in found {
            let id: i64 = row.get(0);
            let name: String = row.get(1);
            let slot = row.get::<_, i32>(2) as u32;
            assert_eq!(name, format!("user {id}"));
            assert_eq!(
                common::shard_for(&topo, "users", id),
                s,
                "user {id} is on s{s}, placement says s{}",
                common::shard_for(&topo, "users", id)
            );
            assert!(
                ranges[&s].iter().any(|(a, b)| *a <= slot && slot <= *b),
                "user {id} has slot {slot}, outside s{s}'s slots {:?}",
                ranges[&s]
            );
            if let Some(prev) = seen.insert(id, s) {
                panic!("user {id} is on s{prev} and s{s}");
            }
        }
    }
    let missing: Vec<&i64> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(missing.is_empty(), "rows lost: {missing:?}");
    assert_eq!(seen.len(), ids.len());
    // Every shard got some of them (1200 keys over 4 equal slot ranges).
    let per_shard: BTreeSet<usize> = seen.values().copied().collect();
    assert_eq!(per_shard.len(), SHARDS, "keys spread over all shards");

    // Read each back by key through the router: simple and extended, various spellings.
    let by_key = c
        .prepare("SELECT user_id, name FROM users WHERE user_id = $1")
        .await
        .expect("prepare");
    for (k, id) in ids.iter().enumerate() {
        let row = c
            .query_one(&by_key, &[id])
            .await
            .unwrap_or_else(|e| panic!("read {id}: {e:?}"));
        assert_eq!(row.get::<_, i64>(0), *id);
        assert_eq!(row.get::<_, String>(1), format!("user {id}"));
        if k % 10 == 0 {
            let sql = match (k / 10) % 5 {
                0 => format!("SELECT user_id, name FROM users WHERE user_id = {id}"),
                1 => format!("SELECT user_id, name FROM users WHERE user_id = '{id}'"),
                2 => format!("SELECT user_id, name FROM users WHERE {id} = user_id"),
                3 => format!("SELECT user_id, name FROM users u WHERE (u.user_id = {id}::bigint)"),
                _ => format!(
                    "SELECT user_id, name FROM users WHERE user_id = {id} AND name IS NOT NULL"
                ),
            };
            let got = rows(
                &c.simple_query(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e:?}")),
            );
            assert_eq!(
                got,
                vec![vec![Some(id.to_string()), Some(format!("user {id}"))]],
                "{sql}"
            );
        }
        if k % 25 == 0 {
            // The same key as an int4 parameter hashes the same.
            let id4 = *id as i32;
            let row = c
                .query_typed_one(
                    "SELECT name FROM users WHERE user_id = $1",
                    &[(&id4, Type::INT4)],
                )
                .await
                .unwrap_or_else(|e| panic!("int4 read {id}: {e:?}"));
            assert_eq!(row.get::<_, String>(0), format!("user {id}"));
        }
    }
    // A key nobody inserted: no row, no error.
    assert!(c
        .query(&by_key, &[&(hi + 1)])
        .await
        .expect("absent")
        .is_empty());

    // IN lists and = ANY($1) over keys on several shards.
    let pick: Vec<i64> = ids.iter().step_by(97).copied().collect();
    let list = pick
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT user_id, name FROM users WHERE user_id IN ({list})");
    let mut got: Vec<i64> = rows(&c.simple_query(&sql).await.expect("IN list"))
        .iter()
        .map(|r| r[0].as_deref().expect("id").parse().expect("int"))
        .collect();
    got.sort_unstable();
    assert_eq!(got, pick, "IN list");
    let mut got: Vec<i64> = c
        .query(
            "SELECT user_id FROM users WHERE user_id IN ($1, $2, $3)",
            &[&pick[0], &pick[1], &pick[2]],
        )
        .await
        .expect("IN params")
        .iter()
        .map(|r| r.get(0))
        .collect();
    got.sort_unstable();
    assert_eq!(got, pick[..3].to_vec(), "IN params");
    let mut any: Vec<i64> = pick.clone();
    any.push(hi + 5); // not there
    let mut got: Vec<i64> = c
        .query("SELECT user_id FROM users WHERE user_id = ANY($1)", &[&any])
        .await
        .expect("= ANY")
        .iter()
        .map(|r| r.get(0))
        .collect();
    got.sort_unstable();
    assert_eq!(got, pick, "= ANY($1)");

    // Fan-out over a key range (hash: every shard), each row exactly once.
    for (a, b) in [(lo, hi), (lo + 100, lo + 399), (hi - 3, hi + 10)] {
        let mut got: Vec<i64> = c
            .query(
                "SELECT user_id FROM users WHERE user_id BETWEEN $1 AND $2",
                &[&a, &b],
            )
            .await
            .expect("fan-out")
            .iter()
            .map(|r| r.get(0))
            .collect();
        got.sort_unstable();
        let want: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| (a..=b).contains(id))
            .collect();
        assert_eq!(got, want, "BETWEEN {a} AND {b}");
        let got_simple = rows(
            &c.simple_query(&format!(
                "SELECT user_id FROM users WHERE user_id BETWEEN {a} AND {b}"
            ))
            .await
            .expect("fan-out simple"),
        );
        assert_eq!(got_simple.len(), want.len(), "simple BETWEEN {a} AND {b}");
    }

    clean_users(&direct, lo, hi).await;
    r.stop().await;
}

#[tokio::test]
async fn update_and_delete_by_key_touch_one_shard() {
    common::ensure_schema().await;
    let topo = common::topology();
    let direct = shards().await;
    let (lo, hi) = (7_002_000i64, 7_002_199i64);
    clean_users(&direct, lo, hi).await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    // The same rows on every shard, written directly: a mis-routed UPDATE/DELETE would
    // change a copy on the wrong shard.
    for dc in &direct {
        dc.execute(
            "INSERT INTO users (user_id, name) SELECT g, 'orig' FROM generate_series($1::int8, $2::int8) g",
            &[&lo, &hi],
        )
        .await
        .expect("seed");
    }
    let names =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    for id in [lo, lo + 1, lo + 2, lo + 3, lo + 50, hi] {
        let home = common::shard_for(&topo, "users", id);
        let n = c
            .execute(
                "UPDATE users SET name = 'changed' WHERE user_id = $1",
                &[&id],
            )
            .await
            .expect("update");
        assert_eq!(n, 1, "UPDATE of key {id} reports one row");
        for (s, dc) in direct.iter().enumerate() {
            let got = names(
                dc.query("SELECT name FROM users WHERE user_id = $1", &[&id])
                    .await
                    .expect("read"),
            );
            let want = if s == home { "changed" } else { "orig" };
            assert_eq!(
                got,
                vec![want.to_owned()],
                "key {id} on s{s} (home s{home})"
            );
        }
        // Simple protocol DELETE.
        let msgs = c
            .simple_query(&format!("DELETE FROM users WHERE user_id = {id}"))
            .await
            .expect("delete");
        assert!(msgs
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(1))));
        for (s, dc) in direct.iter().enumerate() {
            let n: i64 = dc
                .query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&id])
                .await
                .expect("count")
                .get(0);
            assert_eq!(
                n,
                i64::from(s != home),
                "key {id} on s{s} after DELETE (home s{home})"
            );
        }
    }
    // UPDATE of a key that is not on its home shard: zero rows (the copies elsewhere
    // are not visible through the router).
    let id = lo + 10;
    let home = common::shard_for(&topo, "users", id);
    direct[home]
        .execute("DELETE FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("delete home copy");
    let n = c
        .execute("UPDATE users SET name = 'ghost' WHERE user_id = $1", &[&id])
        .await
        .expect("update absent");
    assert_eq!(n, 0);
    // Co-located join on the key works; orders rows live with their user.
    let id = lo + 20;
    let home = common::shard_for(&topo, "users", id);
    c.execute(
        "INSERT INTO orders (order_id, user_id, amount, status) VALUES (1, $1, 12.50, 'new'), (2, $1, 7.25, 'paid')",
        &[&id],
    )
    .await
    .expect("insert orders for one user");
    for (s, dc) in direct.iter().enumerate() {
        let n: i64 = dc
            .query_one("SELECT count(*) FROM orders WHERE user_id = $1", &[&id])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, if s == home { 2 } else { 0 }, "orders of {id} on s{s}");
    }
    let got = rows(
        &c.simple_query(&format!(
            "SELECT u.name, o.order_id, o.amount FROM users u JOIN orders o ON o.user_id = u.user_id \
             WHERE u.user_id = {id} ORDER BY o.order_id"
        ))
        .await
        .expect("join on key"),
    );
    assert_eq!(
        got,
        vec![
            vec![Some("orig".into()), Some("1".into()), Some("12.50".into())],
            vec![Some("orig".into()), Some("2".into()), Some("7.25".into())],
        ]
    );
    // A write that would move a row to another shard is refused (principle 1).
    let other = (lo..hi)
        .find(|k| common::shard_for(&topo, "users", *k) != home)
        .expect("a key elsewhere");
    let res = c
        .execute(
            "UPDATE users SET user_id = $2 WHERE user_id = $1",
            &[&id, &other],
        )
        .await;
    assert!(
        res.is_err(),
        "changing the shard key across shards must be refused"
    );
    usable(&c).await;
    clean_users(&direct, lo, hi).await;
    r.stop().await;
}

#[tokio::test]
async fn range_distribution_accounts() {
    common::ensure_schema().await;
    let topo = common::topology();
    let direct = shards().await;
    let ids: Vec<i64> = vec![
        -5,
        999_998,
        999_999,
        1_000_000,
        1_000_001,
        1_999_999,
        2_000_000,
        2_500_000,
        2_999_999,
        3_000_000,
        7_000_000_000,
    ];
    let clean = || async {
        for dc in &direct {
            dc.execute(
                "DELETE FROM accounts WHERE account_id = ANY($1) OR owner = 'routing-test'",
                &[&ids],
            )
            .await
            .expect("clean accounts");
        }
    };
    clean().await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    for (k, id) in ids.iter().enumerate() {
        if k % 2 == 0 {
            c.execute(
                "INSERT INTO accounts (account_id, owner, balance) VALUES ($1, 'routing-test', 10)",
                &[id],
            )
            .await
            .unwrap_or_else(|e| panic!("insert account {id}: {e:?}"));
        } else {
            c.simple_query(&format!(
                "INSERT INTO accounts (account_id, owner, balance) VALUES ({id}, 'routing-test', 10)"
            ))
            .await
            .unwrap_or_else(|e| panic!("insert account {id}: {e:?}"));
        }
    }
    for id in &ids {
        let home = common::shard_for(&topo, "accounts", *id);
        for (s, dc) in direct.iter().enumerate() {
            let n: i64 = dc
                .query_one("SELECT count(*) FROM accounts WHERE account_id = $1", &[id])
                .await
                .expect("count")
                .get(0);
            assert_eq!(
                n,
                i64::from(s == home),
                "account {id} on s{s} (home s{home})"
            );
        }
    }
    // The boundaries are [from, to): check the placement itself too.
    assert_eq!(common::shard_for(&topo, "accounts", 999_999), 0);
    assert_eq!(common::shard_for(&topo, "accounts", 1_000_000), 1);
    // BETWEEN within one range and across boundaries.
    for (a, b) in [
        (999_990, 1_000_010),
        (1_000_000, 1_000_000),
        (999_999, 2_000_000),
        (1_500_000, 2_999_999),
        (-10, 10_000_000_000),
        (2_000_001, 2_999_998),
    ] {
        let mut got: Vec<i64> = c
            .query(
                "SELECT account_id FROM accounts WHERE account_id BETWEEN $1 AND $2 AND owner = 'routing-test'",
                &[&a, &b],
            )
            .await
            .unwrap_or_else(|e| panic!("BETWEEN {a} AND {b}: {e:?}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        got.sort_unstable();
        let want: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| (a..=b).contains(id))
            .collect();
        assert_eq!(got, want, "BETWEEN {a} AND {b}");
        let mut got_simple: Vec<i64> = rows(
            &c.simple_query(&format!(
                "SELECT account_id FROM accounts WHERE account_id >= {a} AND account_id <= {b} AND owner = 'routing-test'"
            ))
            .await
            .unwrap_or_else(|e| panic!(">= {a} <= {b}: {e:?}")),
        )
        .iter()
        .map(|r| r[0].as_deref().expect("id").parse().expect("int"))
        .collect();
        got_simple.sort_unstable();
        assert_eq!(got_simple, want, ">= {a} AND <= {b}");
    }
    // Half-open comparisons at a boundary.
    let got: Vec<i64> = c
        .query(
            "SELECT account_id FROM accounts WHERE account_id < $1 AND account_id > $2 AND owner = 'routing-test'",
            &[&1_000_000i64, &999_997i64],
        )
        .await
        .expect("< boundary")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut got = got;
    got.sort_unstable();
    assert_eq!(got, vec![999_998, 999_999]);
    // UPDATE by key on a range distribution.
    let n = c
        .execute(
            "UPDATE accounts SET balance = balance + 5 WHERE account_id = $1",
            &[&2_000_000i64],
        )
        .await
        .expect("update");
    assert_eq!(n, 1);
    for (s, dc) in direct.iter().enumerate() {
        let got: Vec<String> = dc
            .query(
                "SELECT balance::text FROM accounts WHERE account_id = 2000000",
                &[],
            )
            .await
            .expect("read")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if s == 2 {
            assert_eq!(got, vec!["15".to_owned()]);
        } else {
            assert!(got.is_empty(), "account 2000000 on s{s}");
        }
    }
    clean().await;
    r.stop().await;
}

#[tokio::test]
async fn unmergeable_fanouts_are_refused_but_keyed_versions_work() {
    common::ensure_schema().await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    let shapes = [
        "SELECT * FROM users ORDER BY user_id",
        "SELECT count(*) FROM users",
        "SELECT user_id FROM users LIMIT 5",
        "SELECT DISTINCT name FROM users",
        "SELECT u.name, o.amount FROM users u JOIN orders o ON o.status = u.name",
    ];
    for sql in shapes {
        for extended in [false, true] {
            let res = if extended {
                c.query(sql, &[]).await.map(|_| ())
            } else {
                c.simple_query(sql).await.map(|_| ())
            };
            let db = common::expect_sqlstate(res, "0A000", sql);
            assert!(!db.message().is_empty());
            assert!(
                db.hint().is_some(),
                "{sql}: refusal says what to do: {db:?}"
            );
            usable(&c).await;
        }
        // The same shape on one key is a single-shard statement and works.
        let keyed = if sql.contains(" JOIN ") {
            "SELECT u.name, o.amount FROM users u JOIN orders o ON o.status = u.name WHERE u.user_id = 42 AND o.user_id = 42".to_owned()
        } else if let Some((head, tail)) = sql.split_once(" ORDER BY") {
            format!("{head} WHERE user_id = 42 ORDER BY{tail}")
        } else if let Some((head, tail)) = sql.split_once(" LIMIT") {
            format!("{head} WHERE user_id = 42 LIMIT{tail}")
        } else {
            format!("{sql} WHERE user_id = 42")
        };
        c.simple_query(&keyed)
            .await
            .unwrap_or_else(|e| panic!("{keyed}: {e:?}"));
        c.query(keyed.as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("{keyed} (extended): {e:?}"));
    }
    usable(&c).await;
    r.stop().await;
}

/// A refusal by the router inside a transaction block fails the block exactly as a
/// shard's error would: every later statement gets 25P02 (simple and extended
/// protocol alike) until ROLLBACK, and nothing written in the block persists.
#[tokio::test]
async fn router_refusal_fails_the_transaction_block() {
    common::ensure_schema().await;
    let topo = common::topology();
    let (lo, hi) = (7_004_000i64, 7_004_099i64);
    let direct = shards().await;
    clean_users(&direct, lo, hi).await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    for (round, refuse_extended) in [(0i64, false), (1, true)] {
        let before = lo + round * 2;
        let after = before + 1;
        c.batch_execute("BEGIN").await.expect("begin");
        c.execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'before refusal')",
            &[&before],
        )
        .await
        .expect("insert before the refusal");
        let res = if refuse_extended {
            c.query("SELECT count(*) FROM users", &[]).await.map(|_| ())
        } else {
            c.simple_query("SELECT count(*) FROM users")
                .await
                .map(|_| ())
        };
        common::expect_sqlstate(res, "0A000", "fan-out count(*) in a block");
        common::expect_sqlstate(
            c.simple_query("SELECT 1").await,
            "25P02",
            "simple statement after a refusal in a block",
        );
        common::expect_sqlstate(
            c.query("SELECT 1", &[]).await,
            "25P02",
            "extended statement after a refusal in a block",
        );
        common::expect_sqlstate(
            c.execute(
                "INSERT INTO users (user_id, name) VALUES ($1, 'after refusal')",
                &[&after],
            )
            .await,
            "25P02",
            "extended INSERT after a refusal in a block",
        );
        // COMMIT of a failed block rolls back.
        c.batch_execute("COMMIT")
            .await
            .expect("commit of failed block");
        for id in [before, after] {
            let home = common::shard_for(&topo, "users", id);
            let n: i64 = direct[home]
                .query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&id])
                .await
                .expect("count")
                .get(0);
            assert_eq!(n, 0, "row {id} of a failed block persisted");
        }
        usable(&c).await;
    }
    clean_users(&direct, lo, hi).await;
    r.stop().await;
}

#[tokio::test]
async fn insert_without_shard_key_is_refused() {
    common::ensure_schema().await;
    let direct = shards().await;
    let marker = format!("no-key-{:x}", rand::random::<u32>());
    let r = common::router().await;
    let c = common::connect(&r).await;
    let res = c
        .simple_query(&format!("INSERT INTO users (name) VALUES ('{marker}')"))
        .await;
    assert!(res.is_err(), "INSERT without user_id succeeded: {res:?}");
    usable(&c).await;
    let res = c
        .execute(
            "INSERT INTO users (name, email) VALUES ($1, $2)",
            &[&marker, &marker],
        )
        .await;
    assert!(res.is_err(), "INSERT without user_id succeeded (extended)");
    usable(&c).await;
    // NULL key.
    let res = c
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, $2)",
            &[&None::<i64>, &marker],
        )
        .await;
    assert!(res.is_err(), "INSERT with a NULL key succeeded");
    usable(&c).await;
    for (s, dc) in direct.iter().enumerate() {
        let n: i64 = dc
            .query_one("SELECT count(*) FROM users WHERE name = $1", &[&marker])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "a keyless row reached s{s}");
    }
    r.stop().await;
}

#[tokio::test]
async fn reference_table_writes_reach_every_shard() {
    common::ensure_schema().await;
    let direct = shards().await;
    let code = format!("rt-{:x}", rand::random::<u32>());
    for dc in &direct {
        dc.execute("DELETE FROM countries WHERE code LIKE 'rt-%'", &[])
            .await
            .expect("clean");
    }
    let r = common::router().await;
    let c = common::connect(&r).await;
    let msgs = c
        .simple_query(&format!(
            "INSERT INTO countries (code, name) VALUES ('{code}', 'Routingland')"
        ))
        .await
        .expect("insert reference row");
    let counts: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(
        counts,
        vec![1],
        "the client sees one row inserted, not one per shard"
    );
    let on_shards = |name: &'static str| {
        let (direct, code) = (&direct, &code);
        async move {
            for (s, dc) in direct.iter().enumerate() {
                let got: Vec<String> = dc
                    .query("SELECT name FROM countries WHERE code = $1", &[code])
                    .await
                    .expect("read")
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if name.is_empty() {
                    assert!(got.is_empty(), "{code} still on s{s}");
                } else {
                    assert_eq!(got, vec![name.to_owned()], "{code} on s{s}");
                }
            }
        }
    };
    on_shards("Routingland").await;
    // Read through the router: once, not once per shard.
    let got = c
        .query("SELECT name FROM countries WHERE code = $1", &[&code])
        .await
        .expect("read");
    assert_eq!(got.len(), 1);
    let all = c
        .query("SELECT code FROM countries", &[])
        .await
        .expect("read all");
    let direct_all = direct[0]
        .query("SELECT code FROM countries", &[])
        .await
        .expect("direct");
    assert_eq!(
        all.len(),
        direct_all.len(),
        "a reference table read is one shard's rows"
    );
    c.simple_query(&format!(
        "UPDATE countries SET name = 'Renamed' WHERE code = '{code}'"
    ))
    .await
    .expect("update reference row");
    on_shards("Renamed").await;
    // A failed write reaches no shard: a duplicate key.
    let res = c
        .simple_query(&format!(
            "INSERT INTO countries (code, name) VALUES ('{code}', 'dup')"
        ))
        .await;
    common::expect_sqlstate(res, "23505", "duplicate reference row");
    on_shards("Renamed").await;
    // A replicated write that fails on one shard must not stay on the others: a code
    // that (against the rules) exists only on s2.
    let partial = format!("{code}-p");
    direct[2]
        .execute(
            "INSERT INTO countries (code, name) VALUES ($1, 'only on s2')",
            &[&partial],
        )
        .await
        .expect("seed s2");
    let res = c
        .simple_query(&format!(
            "INSERT INTO countries (code, name) VALUES ('{partial}', 'everywhere')"
        ))
        .await;
    common::expect_sqlstate(res, "23505", "reference insert that conflicts on s2");
    for (s, dc) in direct.iter().enumerate() {
        let got: Vec<String> = dc
            .query("SELECT name FROM countries WHERE code = $1", &[&partial])
            .await
            .expect("read")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let want: Vec<String> = if s == 2 {
            vec!["only on s2".into()]
        } else {
            vec![]
        };
        assert_eq!(
            got, want,
            "a reference write that failed on s2 was applied on s{s} (not atomic)"
        );
    }
    usable(&c).await;
    c.simple_query(&format!("DELETE FROM countries WHERE code = '{code}'"))
        .await
        .expect("delete reference row");
    on_shards("").await;

    // A prepared (extended-protocol) reference write either reaches every shard or is
    // refused with 0A000 and reaches none; never some of them.
    let res = c
        .execute(
            "INSERT INTO countries (code, name) VALUES ($1, 'Preparedland')",
            &[&code],
        )
        .await;
    match res {
        Ok(n) => {
            assert_eq!(n, 1);
            on_shards("Preparedland").await;
        }
        Err(e) => {
            assert_eq!(common::sqlstate(&e), "0A000", "{e:?}");
            on_shards("").await;
        }
    }
    for dc in &direct {
        dc.execute(
            "DELETE FROM countries WHERE code LIKE $1",
            &[&format!("{code}%")],
        )
        .await
        .expect("clean");
    }
    usable(&c).await;
    r.stop().await;
}

#[tokio::test]
async fn catalog_and_constant_queries_go_to_the_default_shard() {
    common::ensure_schema().await;
    let topo = common::topology();
    let r = common::router().await;
    let c = common::connect(&r).await;
    let v: i32 = c.query_one("SELECT 1", &[]).await.expect("SELECT 1").get(0);
    assert_eq!(v, 1);
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_class", &[])
        .await
        .expect("pg_class")
        .get(0);
    assert!(n > 0);
    let port: String = c
        .query_one("SELECT current_setting('port')", &[])
        .await
        .expect("port")
        .get(0);
    assert_eq!(
        port,
        topo.shards[topo.default_shard].port.to_string(),
        "statements without a table run on the default shard"
    );
    let tables = rows(
        &c.simple_query(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relname = 'users'",
        )
        .await
        .expect("catalog join"),
    );
    assert_eq!(tables, vec![vec![Some("users".to_owned())]]);
    let v = rows(&c.simple_query("SELECT version()").await.expect("version"));
    assert!(v[0][0]
        .as_deref()
        .is_some_and(|s| s.starts_with("PostgreSQL")));
    r.stop().await;
}

#[tokio::test]
async fn syntax_errors_carry_sqlstate_and_position() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let direct = common::shard(0).await;
    for sql in [
        "SELEC 1",
        "SELECT * FROM users WHERE",
        "SELECT 1 +",
        "INSERT INTO users (user_id) VALUES (1,",
        "SELECT * FROM users WHERE user_id = 42 AND AND name = 'x'",
    ] {
        let want = common::expect_sqlstate(direct.simple_query(sql).await, "42601", sql);
        for extended in [false, true] {
            let res = if extended {
                c.query(sql, &[]).await.map(|_| ())
            } else {
                c.simple_query(sql).await.map(|_| ())
            };
            let got = common::expect_sqlstate(res, "42601", sql);
            assert!(got.position().is_some(), "{sql}: no position in {got:?}");
            assert_eq!(
                format!("{:?}", got.position()),
                format!("{:?}", want.position()),
                "{sql}: position differs from PostgreSQL's"
            );
            usable(&c).await;
        }
    }
    // Errors the shard raises pass through unchanged.
    for sql in [
        "SELECT nosuchcol FROM users WHERE user_id = 1",
        "SELECT * FROM nosuchtable",
        "SELECT 1/0",
    ] {
        let want = direct.simple_query(sql).await.expect_err(sql);
        let want = want.as_db_error().expect("db error");
        let got = c.simple_query(sql).await.expect_err(sql);
        let got = got.as_db_error().expect("db error");
        assert_eq!(got.code(), want.code(), "{sql}");
        assert_eq!(got.message(), want.message(), "{sql}");
        assert_eq!(
            format!("{:?}", got.position()),
            format!("{:?}", want.position()),
            "{sql}"
        );
        usable(&c).await;
    }
    r.stop().await;
}

/// A multi-row INSERT whose rows belong to different shards is either refused with
/// 0A000 (and writes nothing) or puts every row on its own shard; never all on one.
#[tokio::test]
async fn multi_row_insert_is_split_or_refused() {
    common::ensure_schema().await;
    let topo = common::topology();
    let (lo, hi) = (7_006_000i64, 7_006_999i64);
    let direct = shards().await;
    clean_users(&direct, lo, hi).await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    // Two keys on different shards, then ten consecutive keys.
    let a = lo;
    let b = (lo + 1..)
        .find(|k| common::shard_for(&topo, "users", *k) != common::shard_for(&topo, "users", a))
        .expect("a key elsewhere");
    let ext = c
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'multi'), ($2, 'multi')",
            &[&a, &b],
        )
        .await;
    let many: Vec<i64> = (lo + 100..lo + 110).collect();
    let values = many
        .iter()
        .map(|k| format!("({k}, 'multi')"))
        .collect::<Vec<_>>()
        .join(", ");
    let simple = c
        .simple_query(&format!(
            "INSERT INTO users (user_id, name) VALUES {values}"
        ))
        .await;
    for (what, res, keys) in [
        ("extended", ext.map(|_| ()), vec![a, b]),
        ("simple", simple.map(|_| ()), many.clone()),
    ] {
        let mut found = BTreeMap::new();
        for (s, dc) in direct.iter().enumerate() {
            for row in dc
                .query(
                    "SELECT user_id FROM users WHERE user_id = ANY($1)",
                    &[&keys],
                )
                .await
                .expect("read")
            {
                found.insert(row.get::<_, i64>(0), s);
            }
        }
        match res {
            Ok(()) => {
                for k in &keys {
                    assert_eq!(
                        found.get(k),
                        Some(&common::shard_for(&topo, "users", *k)),
                        "{what}: key {k} of a multi-row INSERT is misplaced or missing"
                    );
                }
            }
            Err(e) => {
                assert_eq!(common::sqlstate(&e), "0A000", "{what}: {e:?}");
                assert!(found.is_empty(), "{what}: a refused INSERT wrote {found:?}");
            }
        }
        usable(&c).await;
    }
    clean_users(&direct, lo, hi).await;
    r.stop().await;
}

/// A Bind with more parameters than the router keeps on its stack, the key last, in
/// binary among text parameters: routed by the right one.
#[tokio::test]
async fn key_among_many_bind_parameters() {
    common::ensure_schema().await;
    let topo = common::topology();
    let direct = shards().await;
    let (lo, hi) = (7_002_000i64, 7_002_039i64);
    clean_users(&direct, lo, hi).await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    // Eleven parameters; the key is the eleventh.
    let ins = c
        .prepare(
            "INSERT INTO users (name, email, user_id) VALUES ($1 || $2 || $3 || $4 || $5, \
             $6 || $7 || $8 || $9 || $10, $11)",
        )
        .await
        .expect("prepare");
    for id in lo..=hi {
        let parts: Vec<String> = (0..10).map(|i| format!("{i}")).collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            parts.iter().map(|p| p as _).collect();
        params.push(&id);
        let n = c.execute(&ins, &params).await.expect("insert");
        assert_eq!(n, 1);
    }
    for id in lo..=hi {
        let want = common::shard_for(&topo, "users", id);
        for (s, dc) in direct.iter().enumerate() {
            let rows = dc
                .query("SELECT name, email FROM users WHERE user_id = $1", &[&id])
                .await
                .expect("read shard");
            if s == want {
                assert_eq!(rows.len(), 1, "user {id} on shard {s}");
                assert_eq!(rows[0].get::<_, String>(0), "01234");
                assert_eq!(rows[0].get::<_, String>(1), "56789");
            } else {
                assert!(rows.is_empty(), "user {id} also on shard {s}");
            }
        }
    }
    clean_users(&direct, lo, hi).await;
    r.stop().await;
}
