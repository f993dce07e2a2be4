//! Regression tests for the review findings fixed in "Fix review findings…": each test
//! failed (or hung) on the router before that commit.
//!
//! Message sequences tokio-postgres cannot send (Flush, batches in one Sync, COPY via
//! Execute, huge pipelines, 40,000 parameters) go through `common::RawClient`. Every
//! wait is bounded (`common::RAW_HANG`, `HANG`): a timeout is how a hang shows, not a
//! speed check.
//!
//! Keys used here: user_id 7_400_000.. ; tables rg_* (created directly on s0, the
//! default shard, unless noted) ; reference rows with codes 'rg…'; role rg_role.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{
    drop_table_s0, fresh_table_s0, raw_show, raw_tags, router_pool1, wire, RawClient, RawMsg,
};
use tokio_postgres::SimpleQueryMessage;

const HANG: Duration = Duration::from_secs(20);

/// Bound a future: a hang fails the test with `what`.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG:?} (hung)"))
}

/// The first key at or after `from` that the placement function puts on `shard`.
fn key_on(shard: usize, from: i64) -> i64 {
    let topo = common::topology();
    (from..)
        .find(|k| common::shard_for(&topo, "users", *k) == shard)
        .expect("a key")
}

/// Delete `keys` from users on every shard directly.
async fn delete_users(keys: &[i64]) {
    for i in 0..common::SHARD_PORTS.len() {
        common::shard(i)
            .await
            .execute("DELETE FROM users WHERE user_id = ANY($1)", &[&keys])
            .await
            .expect("cleanup users");
    }
}

/// Which shards hold a users row with `key`.
async fn shards_with_user(key: i64) -> Vec<usize> {
    let mut out = Vec::new();
    for i in 0..common::SHARD_PORTS.len() {
        let n: i64 = common::shard(i)
            .await
            .query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&key])
            .await
            .expect("count")
            .get(0);
        if n > 0 {
            out.push(i);
        }
    }
    out
}

/// (Re)create an unsharded table on the default shard s0.
/// The single value of a simple query's single row.
fn simple_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 1, "expected one row");
    rows.into_iter().next().expect("one row")
}

fn assert_tags(msgs: &[RawMsg], want: &str, what: &str) {
    assert_eq!(raw_tags(msgs), want, "{what}: got {}", raw_show(msgs));
}

// ---------------------------------------------------------------------------------------
// 1. Flush sends the batch to the shard and the answers to the client.

#[tokio::test]
async fn flush_delivers_answers_before_sync() {
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let mut b = BytesMut::new();
    wire::parse(&mut b, "", "select 1", &[]);
    wire::bind(&mut b, "", "", &[]);
    wire::describe(&mut b, b'P', "");
    wire::execute(&mut b, "", 0);
    wire::flush(&mut b);
    c.send(&b).await;
    // Old: the router kept everything until Sync and the client waited after '1'.
    let got = c.rd.take(5).await;
    assert_tags(&got, "12TDC", "answers to P/B/D/E before Sync");
    assert_eq!(got[3].values(), vec![Some("1".to_owned())]);
    assert_eq!(got[4].command_tag(), "SELECT 1");
    let mut b = BytesMut::new();
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "Z", "Sync after Flush");
    assert_eq!(got[0].status(), 'I');
    // A named statement with a sharded key on a non-default shard, flushed twice.
    let k = key_on(2, 7_400_000);
    let mut b = BytesMut::new();
    wire::parse(
        &mut b,
        "rg_flush",
        "SELECT count(*) FROM users WHERE user_id = $1",
        &[20],
    );
    wire::flush(&mut b);
    c.send(&b).await;
    assert_tags(&c.rd.take(1).await, "1", "Parse then Flush");
    let mut b = BytesMut::new();
    wire::bind(&mut b, "", "rg_flush", &[Some(k.to_string().as_bytes())]);
    wire::execute(&mut b, "", 0);
    wire::flush(&mut b);
    c.send(&b).await;
    let got = c.rd.take(3).await;
    assert_tags(&got, "2DC", "B/E on s2 then Flush");
    let mut b = BytesMut::new();
    wire::sync(&mut b);
    c.send(&b).await;
    assert_tags(&c.until_ready().await, "Z", "Sync");
    r.stop().await;
}

/// Messages that arrive until the connection has been quiet for a second (what a
/// direct PostgreSQL connection answers to a batch without Sync).
async fn answers_until_quiet(c: &mut RawClient) -> Vec<RawMsg> {
    let mut out = Vec::new();
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(1), c.rd.recv()).await {
        out.push(m);
    }
    out
}

/// After an error PostgreSQL ignores everything up to Sync, Flush included, but it
/// flushes every ErrorResponse at once: a client that sent Flush gets the answers up to
/// the error, and the error, without sending Sync. (Drivers in pipeline mode wait for
/// them before they decide to Sync.)
#[tokio::test]
async fn flush_delivers_errors_before_sync() {
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let shard0 = format!("127.0.0.1:{}", common::SHARD_PORTS[0])
        .parse()
        .expect("addr");
    let mut pg = RawClient::connect_addr(shard0, &[]).await;
    let mut failures = Vec::new();
    let cases: [(&str, &[u8]); 3] = [
        // Fails at Bind (constant folding) on the shard.
        ("SELECT 1/0", b"22012"),
        // Fails at Execute on the shard.
        (
            "SELECT 1/a FROM (VALUES (0), (1)) v(a) ORDER BY a",
            b"22012",
        ),
        // Fails at Parse.
        ("SELECT 1 +", b"42601"),
    ];
    for (sql, code) in cases {
        let code = std::str::from_utf8(code).expect("ascii");
        let mut b = BytesMut::new();
        wire::pbe(&mut b, sql);
        wire::flush(&mut b);
        pg.send(&b).await;
        let want = answers_until_quiet(&mut pg).await;
        assert_eq!(
            want.last().and_then(RawMsg::sqlstate).as_deref(),
            Some(code),
            "PostgreSQL itself: {}",
            raw_show(&want)
        );
        c.send(&b).await;
        let got = answers_until_quiet(&mut c).await;
        if raw_tags(&got) != raw_tags(&want)
            || got.last().and_then(RawMsg::sqlstate).as_deref() != Some(code)
        {
            failures.push(format!(
                "`{sql}` + Flush: PostgreSQL answers {}, the router {}",
                raw_show(&want),
                raw_show(&got)
            ));
        }
        let mut b = BytesMut::new();
        wire::sync(&mut b);
        pg.send(&b).await;
        assert_tags(&pg.until_ready().await, "Z", "PostgreSQL: Sync");
        c.send(&b).await;
        c.until_ready().await;
    }
    // An error the router raises itself at Bind (a fan-out aggregate it refuses): as for
    // a Bind error on a shard, ParseComplete and the error.
    let mut b = BytesMut::new();
    wire::pbe(
        &mut b,
        "SELECT count(*) FROM users WHERE user_id BETWEEN 7400000 AND 7400999",
    );
    wire::flush(&mut b);
    c.send(&b).await;
    let got = answers_until_quiet(&mut c).await;
    if raw_tags(&got) != "1E" || got[1].sqlstate().as_deref() != Some("0A000") {
        failures.push(format!(
            "refused fan-out + Flush: want 1 E(0A000), the router answers {}",
            raw_show(&got)
        ));
    }
    let mut b = BytesMut::new();
    wire::sync(&mut b);
    c.send(&b).await;
    c.until_ready().await;
    assert_tags(&c.query("SELECT 1").await, "TDCZ", "still in step");
    r.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 2. A JDBC-style batch: BEGIN, INSERT, COMMIT in one Sync.

#[tokio::test]
async fn begin_insert_commit_in_one_sync() {
    common::ensure_schema().await;
    let k = key_on(1, 7_400_100);
    delete_users(&[k]).await;
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let mut b = BytesMut::new();
    wire::pbe(&mut b, "BEGIN");
    wire::pbe(
        &mut b,
        &format!("INSERT INTO users (user_id, name) VALUES ({k}, 'x')"),
    );
    wire::pbe(&mut b, "COMMIT");
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "12C12C12CZ", "BEGIN/INSERT/COMMIT batch");
    assert_eq!(got[2].command_tag(), "BEGIN");
    assert_eq!(got[5].command_tag(), "INSERT 0 1");
    assert_eq!(got[8].command_tag(), "COMMIT");
    assert_eq!(got[9].status(), 'I');
    assert_eq!(
        shards_with_user(k).await,
        vec![1],
        "the row is on its shard"
    );
    // The connection keeps working.
    let got = c.query("SELECT 7").await;
    assert_tags(&got, "TDCZ", "after the batch");
    delete_users(&[k]).await;
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. COPY FROM STDIN started by Execute.

#[tokio::test]
async fn copy_from_stdin_via_extended_protocol() {
    fresh_table_s0("rg_copy", "a int").await;
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let mut b = BytesMut::new();
    wire::pbe(&mut b, "copy rg_copy from stdin");
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.rd.take(3).await;
    assert_tags(&got, "12G", "P/B/E/S of COPY FROM STDIN");
    let mut b = BytesMut::new();
    wire::copy_data(&mut b, b"1\n");
    wire::copy_done(&mut b);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "CZ", "CopyData/CopyDone/Sync");
    assert_eq!(got[0].command_tag(), "COPY 1");
    assert_eq!(got[1].status(), 'I');
    let n: i64 = common::shard(0)
        .await
        .query_one("SELECT count(*) FROM rg_copy WHERE a = 1", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "the copied row is on s0");
    // Still in step: a simple and an extended query.
    let got = c.query("SELECT count(*) FROM rg_copy").await;
    assert_tags(&got, "TDCZ", "simple query after COPY");
    assert_eq!(got[1].values(), vec![Some("1".to_owned())]);
    let mut b = BytesMut::new();
    wire::pbe(&mut b, "SELECT 2");
    wire::sync(&mut b);
    c.send(&b).await;
    assert_tags(&c.until_ready().await, "12DCZ", "extended query after COPY");
    drop(c);
    r.stop().await;
    drop_table_s0("rg_copy").await;
}

// ---------------------------------------------------------------------------------------
// 4. A pipeline far larger than the socket buffers, written while answers are read.

/// One Parse of `INSERT INTO rg_pipe VALUES ($1) <returning>`, then `n` × (Bind,
/// Execute), then one Sync, written while a spawned task reads the answers.
async fn pipeline(table: &str, n: usize, returning: &str) {
    fresh_table_s0(table, "a int").await;
    let r = common::router().await;
    let c = RawClient::connect(&r).await;
    let (mut rd, mut w) = c.split();
    let rows_wanted = !returning.is_empty();
    let reader = tokio::spawn(async move {
        let first = rd.recv().await;
        assert_eq!(first.tag, b'1', "ParseComplete first: {first}");
        let (mut binds, mut rows, mut completes) = (0usize, 0usize, 0usize);
        loop {
            let m = rd.recv().await;
            match m.tag {
                b'2' => binds += 1,
                b'D' if rows_wanted => rows += 1,
                b'C' => {
                    assert_eq!(m.command_tag(), "INSERT 0 1");
                    completes += 1;
                }
                b'Z' => return (binds, rows, completes, m.status()),
                _ => panic!("unexpected message after {completes} inserts: {m}"),
            }
        }
    });
    let started = std::time::Instant::now();
    let mut b = BytesMut::new();
    let sql = format!("INSERT INTO {table} VALUES ($1) {returning}");
    wire::parse(&mut b, "rg_pipe_ins", &sql, &[23]);
    for i in 0..n {
        wire::bind(&mut b, "", "rg_pipe_ins", &[Some(i.to_string().as_bytes())]);
        wire::execute(&mut b, "", 0);
        if b.len() > 256 * 1024 || i + 1 == n {
            if i + 1 == n {
                wire::sync(&mut b);
            }
            bounded("writing the pipeline", async {
                use tokio::io::AsyncWriteExt;
                w.write_all(&b).await.expect("write");
            })
            .await;
            b.clear();
        }
    }
    let (binds, rows, completes, status) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the answers did not end within 60 s")
        .expect("reader");
    assert_eq!(
        (binds, completes),
        (n, n),
        "answers to every Bind and Execute"
    );
    if rows_wanted {
        assert_eq!(rows, n, "RETURNING rows");
    }
    assert_eq!(status, 'I');
    eprintln!(
        "pipeline of {n} inserts {returning} took {:?}",
        started.elapsed()
    );
    let count: i64 = common::shard(0)
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, n as i64);
    drop(w);
    r.stop().await;
    drop_table_s0(table).await;
}

/// The answers (about 60 MB) must be larger than the kernel's socket buffers between
/// router and shard (localhost autotunes receive buffers up to tcp_rmem's 32 MB here):
/// a router that writes the whole batch before reading deadlocks with the shard. Plain
/// INSERTs (21 bytes of answer each) would fit in the buffers even at 150,000.
#[tokio::test]
async fn large_pipeline_does_not_deadlock() {
    pipeline("rg_pipe", 120_000, "RETURNING a, repeat('x', 500)").await;
}

// ---------------------------------------------------------------------------------------
// 5. Everything up to Sync is one implicit transaction, also across shards.

#[tokio::test]
async fn failed_batch_commits_nothing() {
    common::ensure_schema().await;
    let a = key_on(1, 7_400_200);
    delete_users(&[a]).await;
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let mut b = BytesMut::new();
    wire::parse(
        &mut b,
        "",
        "INSERT INTO users (user_id, name) VALUES ($1, 'rg')",
        &[20],
    );
    wire::bind(&mut b, "", "", &[Some(a.to_string().as_bytes())]);
    wire::execute(&mut b, "", 0);
    wire::bind(&mut b, "", "rg_no_such_statement", &[]);
    wire::execute(&mut b, "", 0);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "12CEZ", "INSERT then a Bind of a missing statement");
    assert_eq!(got[3].sqlstate().as_deref(), Some("26000"), "{}", got[3]);
    assert_eq!(got[4].status(), 'I');
    assert_eq!(
        shards_with_user(a).await,
        Vec::<usize>::new(),
        "the INSERT of a failed batch was committed"
    );
    delete_users(&[a]).await;
    r.stop().await;
}

#[tokio::test]
async fn failed_two_shard_batch_commits_nothing() {
    common::ensure_schema().await;
    let a = key_on(1, 7_400_300);
    let bkey = key_on(2, 7_400_300);
    delete_users(&[a, bkey]).await;
    // B exists already: inserting it again violates the primary key on its shard.
    common::shard(2)
        .await
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'pre')",
            &[&bkey],
        )
        .await
        .expect("pre-insert B");
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let mut b = BytesMut::new();
    wire::parse(
        &mut b,
        "",
        "INSERT INTO users (user_id, name) VALUES ($1, 'rg')",
        &[20],
    );
    wire::bind(&mut b, "", "", &[Some(a.to_string().as_bytes())]);
    wire::execute(&mut b, "", 0);
    wire::bind(&mut b, "", "", &[Some(bkey.to_string().as_bytes())]);
    wire::execute(&mut b, "", 0);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "12C2EZ", "INSERT on s1, duplicate INSERT on s2");
    assert_eq!(got[4].sqlstate().as_deref(), Some("23505"), "{}", got[4]);
    assert_eq!(got[5].status(), 'I');
    assert_eq!(
        shards_with_user(a).await,
        Vec::<usize>::new(),
        "A was committed although the batch failed on another shard"
    );
    assert_eq!(shards_with_user(bkey).await, vec![2]);
    // The same client carries on.
    let got = c.query("SELECT 1").await;
    assert_tags(&got, "TDCZ", "after the failed batch");
    delete_users(&[a, bkey]).await;
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. DEALLOCATE ALL forgets the client's statements, not the router's server ones.

#[tokio::test]
async fn deallocate_all_then_other_client_reuses_text() {
    let r = router_pool1().await;
    let sql = "SELECT $1::int + 7400000";
    let a = common::connect(&r).await;
    let st = a.prepare(sql).await.expect("A prepares");
    let v: i32 = a.query_one(&st, &[&1i32]).await.expect("A runs").get(0);
    assert_eq!(v, 7_400_001);
    a.batch_execute("DEALLOCATE ALL")
        .await
        .expect("DEALLOCATE ALL");
    // As in PostgreSQL, A's statement is gone.
    common::expect_sqlstate(
        a.query_one(&st, &[&1i32]).await,
        "26000",
        "A's statement after DEALLOCATE ALL",
    );
    // Another client with the same text on the same (pooled) server connection.
    let b = common::connect(&r).await;
    let st_b = b
        .prepare(sql)
        .await
        .expect("B prepares after A's DEALLOCATE ALL");
    let v: i32 = b.query_one(&st_b, &[&2i32]).await.expect("B runs").get(0);
    assert_eq!(v, 7_400_002);
    // A can prepare it again.
    let st = a.prepare(sql).await.expect("A prepares again");
    let v: i32 = a
        .query_one(&st, &[&3i32])
        .await
        .expect("A runs again")
        .get(0);
    assert_eq!(v, 7_400_003);
    // DEALLOCATE ALL through the extended protocol too.
    a.execute("DEALLOCATE ALL", &[])
        .await
        .expect("extended DEALLOCATE ALL");
    common::expect_sqlstate(
        a.query_one(&st, &[&1i32]).await,
        "26000",
        "A's statement after the second DEALLOCATE ALL",
    );
    let v: i32 = b
        .query_one(&st_b, &[&4i32])
        .await
        .expect("B unaffected")
        .get(0);
    assert_eq!(v, 7_400_004);
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 7. The unnamed statement is parsed afresh, so DDL in between does not break it.

async fn unnamed_select_columns(c: &mut RawClient, sql: &str) -> Vec<String> {
    let mut b = BytesMut::new();
    wire::parse(&mut b, "", sql, &[]);
    wire::bind(&mut b, "", "", &[]);
    wire::describe(&mut b, b'P', "");
    wire::execute(&mut b, "", 0);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "12TDCZ", &format!("unnamed `{sql}`"));
    got[2].column_names()
}

#[tokio::test]
async fn unnamed_statement_after_alter_table() {
    fresh_table_s0("rg_ddl", "a int").await;
    common::shard(0)
        .await
        .batch_execute("INSERT INTO rg_ddl VALUES (1)")
        .await
        .expect("row");
    let r = router_pool1().await;
    let sql = "select * from rg_ddl";
    let mut a = RawClient::connect(&r).await;
    assert_eq!(unnamed_select_columns(&mut a, sql).await, vec!["a"]);
    let got = a.query("ALTER TABLE rg_ddl ADD COLUMN b int").await;
    assert_tags(&got, "CZ", "ALTER TABLE through the router");
    let mut b = RawClient::connect(&r).await;
    assert_eq!(
        unnamed_select_columns(&mut b, sql).await,
        vec!["a", "b"],
        "a new client's unnamed statement after DDL"
    );
    assert_eq!(
        unnamed_select_columns(&mut a, sql).await,
        vec!["a", "b"],
        "the same client's unnamed statement after DDL"
    );
    drop((a, b));
    r.stop().await;
    drop_table_s0("rg_ddl").await;
}

// ---------------------------------------------------------------------------------------
// 8. RETURNING rows of a reference-table write come once, not once per shard.

#[tokio::test]
async fn returning_on_reference_table_returns_each_row_once() {
    common::ensure_schema().await;
    let cleanup = || async {
        for i in 0..common::SHARD_PORTS.len() {
            common::shard(i)
                .await
                .batch_execute("DELETE FROM countries WHERE code IN ('rg1', 'rg2', 'rg3')")
                .await
                .expect("cleanup countries");
        }
    };
    cleanup().await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    let rows = c
        .query("INSERT INTO countries VALUES ('rg1', 'x') RETURNING *", &[])
        .await
        .expect("insert returning");
    assert_eq!(rows.len(), 1, "INSERT … RETURNING on a reference table");
    assert_eq!(rows[0].get::<_, String>(0), "rg1");
    let msgs = c
        .simple_query("INSERT INTO countries VALUES ('rg2', 'y') RETURNING code")
        .await
        .expect("simple insert returning");
    let n = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 1, "simple INSERT … RETURNING on a reference table");
    for i in 0..common::SHARD_PORTS.len() {
        let n: i64 = common::shard(i)
            .await
            .query_one(
                "SELECT count(*) FROM countries WHERE code IN ('rg1', 'rg2')",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 2, "the rows are on every shard (s{i})");
    }
    let rows = c
        .query(
            "UPDATE countries SET name = 'z' WHERE code = 'rg1' RETURNING name",
            &[],
        )
        .await
        .expect("update returning");
    assert_eq!(rows.len(), 1, "UPDATE … RETURNING one row");
    assert_eq!(rows[0].get::<_, String>(0), "z");
    let rows = c
        .query(
            "UPDATE countries SET name = name || '!' WHERE code IN ('rg1', 'rg2') RETURNING code",
            &[],
        )
        .await
        .expect("update returning two");
    let mut codes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    codes.sort();
    assert_eq!(codes, vec!["rg1", "rg2"], "UPDATE … RETURNING two rows");
    let n = c
        .execute(
            "INSERT INTO countries VALUES ('rg3', 'w') RETURNING code",
            &[],
        )
        .await
        .expect("execute insert returning");
    assert_eq!(n, 1, "rows affected of a replicated INSERT");
    let rows = c
        .query(
            "DELETE FROM countries WHERE code IN ('rg1', 'rg2', 'rg3') RETURNING code",
            &[],
        )
        .await
        .expect("delete returning");
    assert_eq!(rows.len(), 3, "DELETE … RETURNING");
    r.stop().await;
    cleanup().await;
}

// ---------------------------------------------------------------------------------------
// 9. A pooled server connection carries nothing of its previous client.

async fn ensure_rg_role() {
    for i in 0..common::SHARD_PORTS.len() {
        let c = common::shard(i).await;
        let res = c
            .batch_execute(
                "DO $$ BEGIN CREATE ROLE rg_role; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
            )
            .await;
        if let Err(e) = res {
            panic!("create rg_role on s{i}: {e}");
        }
        c.batch_execute("GRANT rg_role TO app")
            .await
            .unwrap_or_else(|e| panic!("grant rg_role on s{i}: {e}"));
    }
}

#[tokio::test]
async fn no_leak_role() {
    ensure_rg_role().await;
    let r = router_pool1().await;
    let a = common::connect(&r).await;
    a.batch_execute("SET ROLE rg_role").await.expect("SET ROLE");
    let who: String = a
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("A current_user")
        .get(0);
    assert_eq!(who, "rg_role");
    drop(a);
    let b = common::connect(&r).await;
    for _ in 0..3 {
        let who: String = b
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("B current_user")
            .get(0);
        assert_eq!(who, "app", "B runs as the role A set");
    }
    drop(b);
    // SET SESSION AUTHORIZATION too.
    let a = common::connect(&r).await;
    a.batch_execute("SET SESSION AUTHORIZATION rg_role")
        .await
        .expect("SET SESSION AUTHORIZATION");
    let who: String = a
        .query_one("SELECT session_user::text", &[])
        .await
        .expect("A session_user")
        .get(0);
    assert_eq!(who, "rg_role");
    drop(a);
    let b = common::connect(&r).await;
    let row = b
        .query_one("SELECT session_user::text, current_user::text", &[])
        .await
        .expect("B session_user");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("app".to_owned(), "app".to_owned()),
        "B runs with A's session authorization"
    );
    r.stop().await;
}

#[tokio::test]
async fn no_leak_set_config() {
    let r = router_pool1().await;
    let default: String = common::shard(0)
        .await
        .query_one("SHOW lock_timeout", &[])
        .await
        .expect("default")
        .get(0);
    assert_ne!(default, "777ms");
    let a = common::connect(&r).await;
    let v: String = a
        .query_one("SELECT set_config('lock_timeout', '777ms', false)", &[])
        .await
        .expect("set_config")
        .get(0);
    assert_eq!(v, "777ms");
    drop(a);
    let b = common::connect(&r).await;
    let v: String = b
        .query_one("SHOW lock_timeout", &[])
        .await
        .expect("B lock_timeout")
        .get(0);
    assert_eq!(v, default, "B sees A's set_config");
    drop(b);
    // The simple protocol too.
    let a = common::connect(&r).await;
    a.simple_query("SELECT pg_catalog.set_config('lock_timeout', '778ms', false)")
        .await
        .expect("simple set_config");
    drop(a);
    let b = common::connect(&r).await;
    let v = simple_value(&b.simple_query("SHOW lock_timeout").await.expect("show"));
    assert_eq!(
        v.as_deref(),
        Some(default.as_str()),
        "B sees A's set_config"
    );
    r.stop().await;
}

#[tokio::test]
async fn no_leak_temp_table() {
    let r = router_pool1().await;
    let a = common::connect(&r).await;
    a.batch_execute("CREATE TEMP TABLE rg_tmp (a int)")
        .await
        .expect("create temp");
    drop(a);
    let b = common::connect(&r).await;
    common::expect_sqlstate(
        b.simple_query("SELECT * FROM rg_tmp").await,
        "42P01",
        "B sees A's temporary table",
    );
    r.stop().await;
}

/// Temporary tables made by other spellings: `SELECT … INTO TEMP`, and `CREATE TEMP`
/// with a line break before `TABLE`.
#[tokio::test]
async fn no_leak_temp_table_other_spellings() {
    let r = router_pool1().await;
    let mut leaks = Vec::new();
    for (create, table) in [
        ("SELECT 1 AS a INTO TEMP rg_tmp2", "rg_tmp2"),
        ("CREATE TEMP\nTABLE rg_tmp3 (a int)", "rg_tmp3"),
    ] {
        let a = common::connect(&r).await;
        a.batch_execute(create).await.expect("create temp");
        drop(a);
        let b = common::connect(&r).await;
        match b.simple_query(&format!("SELECT * FROM {table}")).await {
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => {}
            other => leaks.push(format!("`{create}`: B got {other:?}")),
        }
    }
    r.stop().await;
    assert!(
        leaks.is_empty(),
        "B sees A's temporary tables:\n{}",
        leaks.join("\n")
    );
}

#[tokio::test]
async fn no_leak_advisory_lock() {
    const LOCK: i64 = 74_004_242;
    let r = router_pool1().await;
    let a = common::connect(&r).await;
    a.query_one("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .expect("lock");
    drop(a);
    // B uses the connection A had (and so it is cleaned up).
    let b = common::connect(&r).await;
    b.query_one("SELECT 1", &[]).await.expect("B");
    // Nobody holds the lock any more: another session can take it.
    let direct = common::shard(0).await;
    let got: bool = direct
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])
        .await
        .expect("direct try lock")
        .get(0);
    assert!(
        got,
        "A's advisory lock is still held by a pooled connection"
    );
    direct
        .query_one("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await
        .expect("unlock");
    drop(direct);
    let got: bool = b
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])
        .await
        .expect("B try lock")
        .get(0);
    assert!(got, "B can take the lock");
    b.query_one("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await
        .expect("B unlock");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 10. Settings reach every shard, a trailing comment notwithstanding.

#[tokio::test]
async fn settings_after_comment_reach_new_shards() {
    let r = common::router().await;
    let a = common::connect(&r).await;
    a.batch_execute("SET search_path = public, pg_catalog -- comment")
        .await
        .expect("SET search_path");
    a.batch_execute("SET statement_timeout = '4321ms'")
        .await
        .expect("SET statement_timeout");
    for shard in 1..4 {
        let k = key_on(shard, 7_400_400);
        let sql = format!(
            "SELECT current_setting('statement_timeout'), current_setting('search_path'), count(*) \
             FROM users WHERE user_id = {k}"
        );
        let row = a.query_one(sql.as_str(), &[]).await.expect("by key");
        assert_eq!(
            row.get::<_, String>(0),
            "4321ms",
            "statement_timeout on s{shard}"
        );
        assert_eq!(
            row.get::<_, String>(1),
            "public, pg_catalog",
            "search_path on s{shard}"
        );
        let v = a.simple_query(&sql).await.expect("simple by key");
        let row = v
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                _ => None,
            })
            .expect("a row");
        assert_eq!(row.as_deref(), Some("4321ms"), "simple, s{shard}");
    }
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 11. RESET goes back to the startup value, as in PostgreSQL.

async fn timezone_everywhere(c: &tokio_postgres::Client, want: &str, what: &str) {
    for i in 0..4 {
        let tz = simple_value(&c.simple_query("SHOW TimeZone").await.expect("show"));
        assert_eq!(tz.as_deref(), Some(want), "{what}: SHOW TimeZone #{i}");
        let tz: String = c
            .query_one("SHOW TimeZone", &[])
            .await
            .expect("show")
            .get(0);
        assert_eq!(tz, want, "{what}: extended SHOW TimeZone #{i}");
    }
    for shard in 0..4 {
        let k = key_on(shard, 7_400_500);
        let tz: String = c
            .query_one(
                "SELECT current_setting('TimeZone'), count(*) FROM users WHERE user_id = $1",
                &[&k],
            )
            .await
            .expect("by key")
            .get(0);
        assert_eq!(tz, want, "{what}: TimeZone on s{shard}");
    }
}

#[tokio::test]
async fn startup_options_survive_reset() {
    let mut opts = common::options();
    opts.pool.size = 2;
    let r = shardwire::server::start(opts).await.expect("router starts");
    let extra = "options='-c timezone=America/New_York'";
    let a = common::connect_with(&r, extra).await;
    timezone_everywhere(&a, "America/New_York", "before RESET").await;
    a.batch_execute("RESET ALL").await.expect("RESET ALL");
    timezone_everywhere(&a, "America/New_York", "after RESET ALL").await;

    let b = common::connect_with(&r, extra).await;
    b.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .expect("SET");
    timezone_everywhere(&b, "Asia/Tokyo", "after SET").await;
    b.batch_execute("RESET timezone")
        .await
        .expect("RESET timezone");
    timezone_everywhere(&b, "America/New_York", "after RESET timezone").await;
    b.batch_execute("RESET timezone")
        .await
        .expect("RESET timezone again");
    timezone_everywhere(&b, "America/New_York", "after a second RESET timezone").await;
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 12. ROLLBACK TO SAVEPOINT recovers a block that has not reached a shard yet.

#[tokio::test]
async fn rollback_to_savepoint_before_any_shard() {
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let got = c.query("BEGIN").await;
    assert_eq!(got.last().expect("Z").status(), 'T');
    let got = c.query("SAVEPOINT b").await;
    assert_tags(&got, "CZ", "SAVEPOINT");
    // Refused by the router (a join on a non-key column), before any shard is reached.
    let got = c
        .query("SELECT * FROM users u JOIN orders o ON u.name = o.status")
        .await;
    assert_tags(&got, "EZ", "refused statement");
    assert_eq!(got[1].status(), 'E');
    let got = c.query("ROLLBACK TO SAVEPOINT b").await;
    assert_tags(&got, "CZ", "ROLLBACK TO SAVEPOINT");
    assert_eq!(got[1].status(), 'T', "block recovered");
    let got = c.query("SELECT 3").await;
    assert_tags(&got, "TDCZ", "SELECT after ROLLBACK TO SAVEPOINT");
    assert_eq!(got[1].values(), vec![Some("3".to_owned())]);
    assert_eq!(got[3].status(), 'T');
    let got = c.query("COMMIT").await;
    assert_tags(&got, "CZ", "COMMIT");
    assert_eq!(got[0].command_tag(), "COMMIT");
    assert_eq!(got[1].status(), 'I');
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 13. COMMIT AND CHAIN starts the next block at once.

#[tokio::test]
async fn commit_and_chain_keeps_a_block_open() {
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let got = c.query("BEGIN").await;
    assert_eq!(got.last().expect("Z").status(), 'T');
    let got = c.query("COMMIT AND CHAIN").await;
    assert_tags(&got, "CZ", "COMMIT AND CHAIN");
    assert_eq!(got[0].command_tag(), "COMMIT");
    assert_eq!(got[1].status(), 'T', "a new block after COMMIT AND CHAIN");
    let got = c.query("SELECT 1").await;
    assert_tags(&got, "TDCZ", "SELECT in the chained block");
    assert_eq!(got[3].status(), 'T');
    let got = c.query("COMMIT").await;
    assert_eq!(got.last().expect("Z").status(), 'I');

    // The chained block keeps the characteristics of the first.
    c.query("BEGIN ISOLATION LEVEL SERIALIZABLE").await;
    c.query("SELECT 1").await;
    let got = c.query("COMMIT AND CHAIN").await;
    assert_eq!(got.last().expect("Z").status(), 'T');
    let got = c.query("SHOW transaction_isolation").await;
    assert_tags(&got, "TDCZ", "SHOW in the chained block");
    assert_eq!(got[1].values(), vec![Some("serializable".to_owned())]);
    let got = c.query("ROLLBACK").await;
    assert_eq!(got.last().expect("Z").status(), 'I');

    // Outside a block it is an error.
    let got = c.query("COMMIT AND CHAIN").await;
    assert_tags(&got, "EZ", "COMMIT AND CHAIN outside a block");
    assert_eq!(got[0].sqlstate().as_deref(), Some("25P01"), "{}", got[0]);
    assert_eq!(got[1].status(), 'I');
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 14. Parameter counts are unsigned 16 bits.

#[tokio::test]
async fn bind_with_40000_parameters() {
    const N: usize = 40_000;
    let r = common::router().await;
    let mut c = RawClient::connect(&r).await;
    let values: Vec<String> = (1..=N).map(|i| format!("(${i}::int)")).collect();
    let sql = format!("SELECT sum(x) FROM (VALUES {}) v(x)", values.join(","));
    let params: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    let params: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
    let mut b = BytesMut::new();
    wire::parse(&mut b, "", &sql, &vec![23; N]);
    wire::bind(&mut b, "", "", &params);
    wire::execute(&mut b, "", 0);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_tags(&got, "12DCZ", "40,000 parameters");
    let want = (N * (N + 1) / 2).to_string();
    assert_eq!(got[2].values(), vec![Some(want)]);
    // Still connected and in step.
    assert_tags(&c.query("SELECT 1").await, "TDCZ", "after the big Bind");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 15. VACUUM fans out without a transaction block.

#[tokio::test]
async fn vacuum_fans_out() {
    common::ensure_schema().await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    bounded("VACUUM users", c.simple_query("VACUUM users"))
        .await
        .expect("VACUUM users through the router");
    bounded(
        "VACUUM (ANALYZE) users",
        c.simple_query("VACUUM (ANALYZE) users"),
    )
    .await
    .expect("VACUUM (ANALYZE) users through the router");
    // The client is not left in a block.
    c.batch_execute("BEGIN; ROLLBACK")
        .await
        .expect("after VACUUM");
    r.stop().await;
}

// ---------------------------------------------------------------------------------------
// 16. With session pooling, a SET outside a block reaches every connection the client
//     holds, not only the default shard's.

#[tokio::test]
async fn session_pooling_set_reaches_every_held_connection() {
    common::ensure_schema().await;
    let mut opts = common::options();
    opts.session_pooling = true;
    let r = shardwire::server::start(opts).await.expect("router starts");
    let c = common::connect(&r).await;
    let tz_on = |shard: usize| {
        format!(
            "SELECT current_setting('TimeZone') FROM users WHERE user_id = {}",
            key_on(shard, 7_600_000)
        )
    };
    // A user on every shard, and a connection to every shard held (session pooling
    // keeps them).
    for s in 0..common::SHARD_PORTS.len() {
        let k = key_on(s, 7_600_000);
        c.batch_execute(&format!(
            "DELETE FROM users WHERE user_id = {k}; \
             INSERT INTO users (user_id, name, email) VALUES ({k}, 'rg16', 'rg16@x')"
        ))
        .await
        .expect("user on the shard");
        c.simple_query(&tz_on(s)).await.expect("touch shard");
    }
    c.batch_execute("SET TimeZone = 'Asia/Kolkata'")
        .await
        .expect("SET");
    for s in 0..common::SHARD_PORTS.len() {
        let got = c.simple_query(&tz_on(s)).await.expect("read TimeZone");
        let rows: Vec<_> = got
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect();
        assert_eq!(
            rows,
            vec!["Asia/Kolkata".to_string()],
            "TimeZone on shard {s}"
        );
    }
    for s in 0..common::SHARD_PORTS.len() {
        c.batch_execute(&format!(
            "DELETE FROM users WHERE user_id = {}",
            key_on(s, 7_600_000)
        ))
        .await
        .expect("cleanup");
    }
    drop(c);
    r.stop().await;
}
