//! Point SELECTs sent with the simple protocol (`pool.prepare_point_queries`): from a
//! shape's second use on, `SELECT … WHERE key = 42` runs on the shard as the kept
//! statement `SELECT … WHERE key = $1` with 42 as an int4 parameter, parsed once per
//! server connection, and answers exactly what the text would.
//!
//! Each test has its own table pt_*, sharded by `id` in the test config's `users`
//! distribution (added to the router's topology here) and created directly on every
//! shard. Routers have one server connection per shard, so `pg_prepared_statements`
//! (per server connection) shows what the router kept there.

mod common;

use common::{raw_show, router_pool1_with, RawClient, RawMsg, SHARD_PORTS};
use shardwire::server::{RunningRouter, ServeOptions};
use shardwire::topology::ShardedTable;

/// Create `table (id bigint primary key, v text)` afresh on every shard.
async fn fresh_table(table: &str) {
    for i in 0..SHARD_PORTS.len() {
        common::shard(i)
            .await
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, v text)"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {table} on s{i}: {e}"));
    }
}

async fn drop_table(table: &str) {
    for i in 0..SHARD_PORTS.len() {
        common::shard(i)
            .await
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await
            .unwrap_or_else(|e| panic!("drop {table} on s{i}: {e}"));
    }
}

/// Add `table` to the router's topology, sharded by `id` like `users`.
fn shard_by_id(o: &mut ServeOptions, table: &str) {
    let users = o
        .topology
        .distributions
        .iter()
        .position(|d| d.name == "users")
        .expect("users distribution");
    o.topology.tables.insert(
        table.into(),
        ShardedTable {
            name: table.into(),
            column: "id".into(),
            distribution: users,
        },
    );
}

/// A router with one connection per shard, `table` sharded by id, and `change` applied.
async fn router_with(table: &str, change: impl FnOnce(&mut ServeOptions)) -> RunningRouter {
    router_pool1_with(|o| {
        shard_by_id(o, table);
        change(o);
    })
    .await
}

/// The shard (index) that owns key `id` of a table sharded like `users`.
fn home(id: i64) -> usize {
    common::shard_for(&common::topology(), "users", id)
}

/// A raw client straight to shard `i`, to compare answers with PostgreSQL's own.
async fn direct(i: usize) -> RawClient {
    let addr = format!("127.0.0.1:{}", SHARD_PORTS[i])
        .parse()
        .expect("addr");
    RawClient::connect_addr(addr, &[]).await
}

/// Kept statements with this text on shard `i`'s connection, as "count/executions".
async fn kept_on(c: &mut RawClient, i: usize, table: &str, bound: &str) -> String {
    // A query of the same table pinned to shard i (by a probe row far from the tests'
    // keys) reaches the connection that ran the statements, and reads the view there.
    // Its two literals keep it from being a kept point query itself.
    let key = (1_000_000_000_000..)
        .find(|k| home(*k) == i)
        .expect("a key on shard i");
    c.query(&format!(
        "INSERT INTO {table} (id, v) VALUES ({key}, 'probe') ON CONFLICT DO NOTHING"
    ))
    .await;
    let sql = format!(
        "SELECT (SELECT count(*) || '/' || coalesce(sum(generic_plans + custom_plans), 0) \
         FROM pg_prepared_statements WHERE statement = '{}' AND parameter_types = '{{integer}}') \
         FROM {table} WHERE id = {key}",
        bound.replace('\'', "''")
    );
    let got = c.query(&sql).await;
    let rows: Vec<&RawMsg> = got.iter().filter(|m| m.tag == b'D').collect();
    assert!(!rows.is_empty(), "{sql}: {}", raw_show(&got));
    rows[0].values()[0].clone().expect("not NULL")
}

/// The answer as the client sees it: message tags and, for the messages that carry
/// them, column names, values, command tags and error code/message/position.
fn answer(msgs: &[RawMsg]) -> String {
    msgs.iter()
        .map(|m| match m.tag {
            b'T' => format!("T{:?}", m.column_names()),
            b'D' => format!("D{:?}", m.values()),
            b'C' => format!("C[{}]", m.command_tag()),
            b'E' => format!(
                "E[{} {} at {}]",
                m.sqlstate().unwrap_or_default(),
                m.field(b'M').unwrap_or_default(),
                m.field(b'P').unwrap_or_default()
            ),
            b'Z' => format!("Z{}", m.status()),
            t => (t as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn a_point_select_is_kept_with_its_key_as_a_parameter() {
    let t = "pt_kept";
    fresh_table(t).await;
    let r = router_with(t, |_| {}).await;
    let mut c = RawClient::connect(&r).await;
    let keys: Vec<i64> = (1..=12).collect();
    for k in &keys {
        let got = c
            .query(&format!("INSERT INTO {t} (id, v) VALUES ({k}, 'v{k}')"))
            .await;
        assert!(!got.iter().any(|m| m.tag == b'E'), "{}", raw_show(&got));
    }
    let bound = format!("SELECT v, id FROM {t} WHERE id = $1");
    for round in 0..3 {
        for k in &keys {
            let got = c
                .query(&format!("SELECT v, id FROM {t} WHERE id = {k}"))
                .await;
            assert_eq!(
                answer(&got),
                format!("T[\"v\", \"id\"] D[Some(\"v{k}\"), Some(\"{k}\")] C[SELECT 1] ZI"),
                "round {round}, key {k}"
            );
        }
    }
    // A key with no row: no DataRow, same RowDescription.
    let none = c
        .query(&format!("SELECT v, id FROM {t} WHERE id = 999999"))
        .await;
    assert_eq!(answer(&none), "T[\"v\", \"id\"] C[SELECT 0] ZI");
    // The shape's first use ran as text; every later one on a shard ran the one kept
    // statement of that shard's connection.
    let s0 = home(999999);
    let on_s0 = keys.iter().filter(|k| home(**k) == s0).count() * 3 + 1;
    let first_on_s0 = if home(keys[0]) == s0 { 1 } else { 0 };
    assert_eq!(
        kept_on(&mut c, s0, t, &bound).await,
        format!("1/{}", on_s0 - first_on_s0)
    );
    drop(c);
    r.stop().await;
    drop_table(t).await;
}

/// A kept statement's text and whether it is expected on the shard (see its use).
type Expect = Option<(String, bool)>;

#[tokio::test]
async fn point_queries_answer_exactly_as_their_text_does() {
    let t = "pt_same";
    fresh_table(t).await;
    let r = router_with(t, |_| {}).await;
    let mut c = RawClient::connect(&r).await;
    for k in [5i64, 7, 2147483647] {
        c.query(&format!("INSERT INTO {t} (id, v) VALUES ({k}, NULL)"))
            .await;
    }
    c.query(&format!(
        "INSERT INTO {t} (id, v) VALUES (3000000000, 'big')"
    ))
    .await;
    // (key, query, expectation): `Some((bound, true))` if the query is run as the kept
    // statement `bound` from its second round on, `Some((bound, false))` if `bound` never
    // gets made (its Parse fails), `None` if not checked (the shape is shared with
    // queries that are kept on the same shard).
    let kept = |bound: &str| Some((bound.replace("{t}", t), true));
    let never = |bound: &str| Some((bound.replace("{t}", t), false));
    let queries: Vec<(i64, String, Expect)> = vec![
        (
            5,
            format!("SELECT * FROM {t} WHERE id = 5"),
            kept("SELECT * FROM {t} WHERE id = $1"),
        ),
        (
            7,
            format!("SELECT * FROM {t} WHERE id = 7"),
            kept("SELECT * FROM {t} WHERE id = $1"),
        ),
        (
            7,
            format!("SELECT * FROM {t} WHERE id = 007"),
            kept("SELECT * FROM {t} WHERE id = $1"),
        ),
        (
            2_147_483_647,
            format!("SELECT * FROM {t} WHERE id = 2147483647"),
            kept("SELECT * FROM {t} WHERE id = $1"),
        ),
        // The same shape beyond int4: PostgreSQL types these literals int8 and numeric,
        // so they run as text (the router's unit tests check that they are not bound).
        (
            3_000_000_000,
            format!("SELECT * FROM {t} WHERE id = 3000000000"),
            None,
        ),
        (5, format!("SELECT * FROM {t} WHERE id = 5.0"), None),
        (
            5,
            format!("SELECT FROM {t} WHERE id = 5"),
            kept("SELECT FROM {t} WHERE id = $1"),
        ),
        (
            7,
            format!(
                "SELECT v IS NULL AS missing, id + id AS twice FROM {t} WHERE id = 7 FOR UPDATE"
            ),
            kept("SELECT v IS NULL AS missing, id + id AS twice FROM {t} WHERE id = $1 FOR UPDATE"),
        ),
        (
            7,
            format!("select id from {t} where id in (7)"),
            kept("select id from {t} where id in ($1)"),
        ),
        (
            5,
            format!("/* lead */ SELECT id::text || v FROM {t} WHERE 5 = id -- tail\n ;"),
            kept("SELECT id::text || v FROM {t} WHERE $1 = id -- tail"),
        ),
        // Errors keep the position in their own text (the kept statement says `$1`,
        // one byte longer than `5`, before the error's position).
        (
            5,
            format!("SELECT id FROM {t} WHERE id = 5 AND no_such_column"),
            never("SELECT id FROM {t} WHERE id = $1 AND no_such_column"),
        ),
        (
            5,
            format!("SELECT id FROM {t} WHERE id = 5 AND v"),
            never("SELECT id FROM {t} WHERE id = $1 AND v"),
        ),
        // An error while running: the kept statement's own answer, which is the text's.
        (
            5,
            format!("SELECT id / (id - id) FROM {t} WHERE id = 5"),
            kept("SELECT id / (id - id) FROM {t} WHERE id = $1"),
        ),
    ];
    for (key, sql, expect) in &queries {
        let want = answer(&direct(home(*key)).await.query(sql).await);
        // Three times: the text, then the kept statement (created, then reused).
        for round in 0..3 {
            let got = answer(&c.query(sql).await);
            assert_eq!(got, want, "round {round}: {sql}");
        }
        if let Some((bound, is_kept)) = expect {
            let on = kept_on(&mut c, home(*key), t, bound).await;
            assert_eq!(
                on.starts_with("1/"),
                *is_kept,
                "{sql}: kept as `{bound}`: {on}"
            );
        }
    }
    drop(c);
    r.stop().await;
    drop_table(t).await;
}

#[tokio::test]
async fn a_kept_point_query_made_stale_by_ddl_on_a_shard_runs_as_its_text() {
    let t = "pt_stale";
    fresh_table(t).await;
    let r = router_with(t, |_| {}).await;
    let mut c = RawClient::connect(&r).await;
    c.query(&format!("INSERT INTO {t} (id, v) VALUES (5, 'five')"))
        .await;
    let sql = format!("SELECT * FROM {t} WHERE id = 5");
    for _ in 0..3 {
        assert_eq!(
            answer(&c.query(&sql).await),
            "T[\"id\", \"v\"] D[Some(\"5\"), Some(\"five\")] C[SELECT 1] ZI"
        );
    }
    // Directly on the shard, not through the router: the kept `SELECT *` now fails its
    // revalidation ("cached plan must not change result type").
    common::shard(home(5))
        .await
        .batch_execute(&format!("ALTER TABLE {t} ADD COLUMN w int DEFAULT 9"))
        .await
        .expect("alter");
    for round in 0..3 {
        assert_eq!(
            answer(&c.query(&sql).await),
            "T[\"id\", \"v\", \"w\"] D[Some(\"5\"), Some(\"five\"), Some(\"9\")] C[SELECT 1] ZI",
            "round {round} after ALTER TABLE"
        );
    }
    // The stale statement was dropped (round 0 ran the text), then made afresh and run
    // in rounds 1 and 2.
    let bound = format!("SELECT * FROM {t} WHERE id = $1");
    assert_eq!(kept_on(&mut c, home(5), t, &bound).await, "1/2");
    drop(c);
    r.stop().await;
    drop_table(t).await;
}

#[tokio::test]
async fn point_queries_are_not_kept_in_blocks_or_when_off() {
    let t = "pt_off";
    fresh_table(t).await;
    let bound = format!("SELECT v FROM {t} WHERE id = $1");
    let sql = format!("SELECT v FROM {t} WHERE id = 5");
    // Off: the text every time.
    let r = router_with(t, |o| o.prepare_point_queries = false).await;
    let mut c = RawClient::connect(&r).await;
    for _ in 0..3 {
        assert_eq!(answer(&c.query(&sql).await), "T[\"v\"] C[SELECT 0] ZI");
    }
    assert_eq!(kept_on(&mut c, home(5), t, &bound).await, "0/0");
    drop(c);
    r.stop().await;
    // Inside a transaction block: an error at a kept statement would fail the block,
    // so the text runs.
    let r = router_with(t, |_| {}).await;
    let mut c = RawClient::connect(&r).await;
    c.query("BEGIN").await;
    for _ in 0..3 {
        assert_eq!(answer(&c.query(&sql).await), "T[\"v\"] C[SELECT 0] ZT");
    }
    assert_eq!(kept_on(&mut c, home(5), t, &bound).await, "0/0");
    c.query("COMMIT").await;
    // Outside it, the shape is kept from its second use on.
    for _ in 0..3 {
        assert_eq!(answer(&c.query(&sql).await), "T[\"v\"] C[SELECT 0] ZI");
    }
    assert_eq!(kept_on(&mut c, home(5), t, &bound).await, "1/2");
    drop(c);
    r.stop().await;
    drop_table(t).await;
}
