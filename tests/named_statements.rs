//! A client's named prepared statement after the schema changed under it.
//!
//! The router keeps a client's named statement on every server connection that runs it,
//! parsing it afresh on a connection that does not hold it yet. PostgreSQL fixes a
//! statement's parameter types and result columns when it is prepared, and refuses to
//! run it once a schema change would alter its result columns (0A000 "cached plan must
//! not change result type"): the client decodes rows by the columns it was told about.
//! A fresh copy on another connection must behave the same: parsed with the parameter
//! types the statement was prepared with, and refused rather than run when its result
//! columns are no longer the ones the client knows.
//!
//! Every router here has two server connections to s0, the default shard. A test makes
//! the client's next statement run on the connection that does not hold its statement
//! by holding the other one in an open transaction (found by backend pid). Tables ns_*
//! are created directly on s0; schema changes are made directly on s0 too, as an
//! operator's migration would be.

mod common;

use bytes::BytesMut;
use common::{
    connect, drop_table_s0, expect_sqlstate, fresh_table_s0, raw_show, router_pool1_with, wire,
    RawClient, RawMsg,
};
use shardwire::server::RunningRouter;

async fn router_pool2() -> RunningRouter {
    router_pool1_with(|o| o.pool.size = 2).await
}

async fn on_s0(sql: &str) {
    common::shard(0)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A client of `r` in an open transaction on the server connection whose backend pid is
/// `pid`, so that every other client runs on the other connection until it ends.
async fn hold(r: &RunningRouter, pid: i32) -> tokio_postgres::Client {
    let a = connect(r).await;
    let b = connect(r).await;
    let mut holders = Vec::new();
    for c in [a, b] {
        c.batch_execute("BEGIN").await.expect("begin");
        let p: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        holders.push((p, c));
    }
    // Both connections are held now: keep the one on `pid`, release the other.
    assert_ne!(holders[0].0, holders[1].0, "two server connections");
    let at = holders
        .iter()
        .position(|(p, _)| *p == pid)
        .unwrap_or_else(|| panic!("no server connection with pid {pid}"));
    let (_, keep) = holders.swap_remove(at);
    let (_, other) = holders.pop().expect("the other holder");
    other.batch_execute("COMMIT").await.expect("commit");
    keep
}

/// The backend pid that ran `stmt` (whose last column is `pg_backend_pid()`).
fn pid_of(row: &tokio_postgres::Row) -> i32 {
    row.get(row.len() - 1)
}

#[tokio::test]
async fn a_fresh_copy_with_other_result_columns_is_refused_not_misread() {
    fresh_table_s0("ns_cols", "id int, a text, b text").await;
    on_s0("INSERT INTO ns_cols VALUES (1, 'aaa', 'bbb')").await;
    let r = router_pool2().await;
    let c = connect(&r).await;
    let stmt = c
        .prepare("SELECT *, pg_backend_pid() FROM ns_cols WHERE id = $1")
        .await
        .expect("prepare");
    let row = c.query_one(&stmt, &[&1i32]).await.expect("first run");
    assert_eq!(row.get::<_, String>("a"), "aaa");
    let first_pid = pid_of(&row);

    // `a` moves to the end: same count and types of columns, other order.
    on_s0("ALTER TABLE ns_cols DROP COLUMN a, ADD COLUMN a text; UPDATE ns_cols SET a = 'aaa'")
        .await;
    let holder = hold(&r, first_pid).await;
    let err = expect_sqlstate(
        c.query(&stmt, &[&1i32]).await,
        "0A000",
        "the statement on a connection that parses it after the change",
    );
    assert_eq!(err.message(), "cached plan must not change result type");
    assert_eq!(err.routine(), Some("RevalidateCachedQuery"));
    // Refused every time on that connection too, not only the first.
    expect_sqlstate(c.query(&stmt, &[&1i32]).await, "0A000", "again");

    // On its first connection PostgreSQL refuses it itself.
    holder.batch_execute("COMMIT").await.expect("commit");
    let _other = hold(&r, other_pid(&r, first_pid).await).await;
    expect_sqlstate(
        c.query(&stmt, &[&1i32]).await,
        "0A000",
        "the statement on its first connection",
    );
    drop(_other);

    // Prepared again, it has the new columns and reads the right values.
    let again = c
        .prepare("SELECT *, pg_backend_pid() FROM ns_cols WHERE id = $1")
        .await
        .expect("prepare again");
    let names: Vec<&str> = again.columns().iter().map(|col| col.name()).collect();
    assert_eq!(names, ["id", "b", "a", "pg_backend_pid"]);
    let row = c.query_one(&again, &[&1i32]).await.expect("new statement");
    assert_eq!(row.get::<_, String>("a"), "aaa");
    assert_eq!(row.get::<_, String>("b"), "bbb");
    drop((c, holder));
    r.stop().await;
    drop_table_s0("ns_cols").await;
}

/// The pid of the server connection of `r`'s s0 pool that is not `pid` (both open).
async fn other_pid(r: &RunningRouter, pid: i32) -> i32 {
    let a = connect(r).await;
    let b = connect(r).await;
    let mut pids = Vec::new();
    for c in [&a, &b] {
        c.batch_execute("BEGIN").await.expect("begin");
        pids.push(
            c.query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get::<_, i32>(0),
        );
    }
    for c in [&a, &b] {
        c.batch_execute("COMMIT").await.expect("commit");
    }
    pids.into_iter()
        .find(|p| *p != pid)
        .expect("another connection")
}

#[tokio::test]
async fn a_fresh_copy_with_the_same_columns_runs() {
    fresh_table_s0("ns_same", "id int, a text").await;
    on_s0("INSERT INTO ns_same VALUES (1, 'one'), (2, 'two')").await;
    let r = router_pool2().await;
    let c = connect(&r).await;
    let stmt = c
        .prepare("SELECT a, pg_backend_pid() FROM ns_same WHERE id = $1")
        .await
        .expect("prepare");
    let row = c.query_one(&stmt, &[&1i32]).await.expect("first run");
    let first_pid = pid_of(&row);
    // A change that leaves the statement's columns as they were.
    on_s0("CREATE INDEX ON ns_same (a); ALTER TABLE ns_same ADD COLUMN c int").await;
    let holder = hold(&r, first_pid).await;
    let row = c.query_one(&stmt, &[&2i32]).await.expect("fresh copy");
    assert_ne!(pid_of(&row), first_pid, "ran on the other connection");
    assert_eq!(row.get::<_, String>(0), "two");
    drop((c, holder));
    r.stop().await;
    drop_table_s0("ns_same").await;
}

#[tokio::test]
async fn a_fresh_copy_keeps_the_parameter_types_it_was_prepared_with() {
    fresh_table_s0("ns_types", "id int, a text").await;
    on_s0("INSERT INTO ns_types VALUES (7, 'seven')").await;
    let r = router_pool2().await;
    let c = connect(&r).await;
    let stmt = c
        .prepare("SELECT a, pg_backend_pid() FROM ns_types WHERE id = $1")
        .await
        .expect("prepare");
    assert_eq!(stmt.params(), [tokio_postgres::types::Type::INT4]);
    let first_pid = pid_of(&c.query_one(&stmt, &[&7i32]).await.expect("first run"));
    // Parsed afresh now, `$1` would be bigint: the client still sends a 4-byte int4.
    on_s0("ALTER TABLE ns_types ALTER COLUMN id TYPE bigint").await;
    let holder = hold(&r, first_pid).await;
    let row = c
        .query_one(&stmt, &[&7i32])
        .await
        .expect("fresh copy, int4 kept");
    assert_ne!(pid_of(&row), first_pid, "ran on the other connection");
    assert_eq!(row.get::<_, String>(0), "seven");
    drop((c, holder));
    r.stop().await;
    drop_table_s0("ns_types").await;
}

#[tokio::test]
async fn a_refused_copy_fails_its_transaction_block() {
    fresh_table_s0("ns_block", "id int, a text, b text").await;
    fresh_table_s0("ns_block_log", "n int").await;
    on_s0("INSERT INTO ns_block VALUES (1, 'aaa', 'bbb')").await;
    let r = router_pool2().await;
    let c = connect(&r).await;
    let stmt = c
        .prepare("SELECT *, pg_backend_pid() FROM ns_block WHERE id = $1")
        .await
        .expect("prepare");
    let first_pid = pid_of(&c.query_one(&stmt, &[&1i32]).await.expect("first run"));
    on_s0("ALTER TABLE ns_block DROP COLUMN a, ADD COLUMN a text").await;
    let holder = hold(&r, first_pid).await;
    c.batch_execute("BEGIN; INSERT INTO ns_block_log VALUES (1)")
        .await
        .expect("block");
    expect_sqlstate(c.query(&stmt, &[&1i32]).await, "0A000", "inside the block");
    expect_sqlstate(
        c.batch_execute("INSERT INTO ns_block_log VALUES (2)").await,
        "25P02",
        "the block failed",
    );
    // COMMIT of the failed block commits nothing: the shard's block failed too.
    c.batch_execute("COMMIT")
        .await
        .expect("commit ends the block");
    holder.batch_execute("COMMIT").await.expect("commit");
    let n: i64 = common::shard(0)
        .await
        .query_one("SELECT count(*) FROM ns_block_log", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "the failed block left nothing");
    // The session goes on normally.
    assert_eq!(
        c.query_one("SELECT 41 + 1", &[])
            .await
            .expect("after")
            .get::<_, i32>(0),
        42
    );
    drop(c);
    r.stop().await;
    drop_table_s0("ns_block").await;
    drop_table_s0("ns_block_log").await;
}

/// Bind/Execute of named statement `stmt` with text parameters.
fn run_named(b: &mut BytesMut, stmt: &str, params: &[&str]) {
    let params: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
    wire::bind(b, "", stmt, &params);
    wire::execute(b, "", 0);
}

/// A raw client prepares `ins` (an INSERT … RETURNING) and, under the names `sel` and
/// `sel_b`, the two texts of `sels` (whose last column is the backend pid); runs both
/// of the latter once, and returns the pid that ran them.
async fn prepare_three(c: &mut RawClient, ins: &str, sels: [&str; 2]) -> i32 {
    let mut b = BytesMut::new();
    wire::parse(&mut b, "ins", ins, &[]);
    for (name, sel) in ["sel", "sel_b"].into_iter().zip(sels) {
        wire::parse(&mut b, name, sel, &[]);
        wire::describe(&mut b, b'S', name);
        run_named(&mut b, name, &["1"]);
    }
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    let rows: Vec<&RawMsg> = got.iter().filter(|m| m.tag == b'D').collect();
    assert_eq!(rows.len(), 2, "{}", raw_show(&got));
    let pids: Vec<Option<String>> = rows.iter().map(|r| r.values().pop().flatten()).collect();
    assert_eq!(pids[0], pids[1], "one batch, one connection");
    pids[0]
        .as_deref()
        .expect("pid")
        .parse()
        .expect("pid is a number")
}

#[tokio::test]
async fn in_a_pipeline_what_precedes_a_refused_copy_runs_and_is_rolled_back() {
    fresh_table_s0("ns_pipe", "id int, a text, b text").await;
    fresh_table_s0("ns_pipe_log", "n int").await;
    on_s0("INSERT INTO ns_pipe VALUES (1, 'aaa', 'bbb')").await;
    let r = router_pool2().await;
    let mut c = RawClient::connect(&r).await;
    let ins = "INSERT INTO ns_pipe_log VALUES ($1::int) RETURNING n";
    // Two texts, so that they run as different copies on the server.
    let sels = [
        "SELECT *, pg_backend_pid() FROM ns_pipe WHERE id = $1::int",
        "SELECT *, pg_backend_pid() AS pid FROM ns_pipe WHERE id = $1::int",
    ];
    let first_pid = prepare_three(&mut c, ins, sels).await;
    // From here on the client runs on the other connection, where neither `sel` nor
    // `sel_b` has been made yet.
    let holder = hold(&r, first_pid).await;

    // Same columns: `sel`'s new copy passes; both statements run, in one implicit
    // transaction that commits.
    let mut b = BytesMut::new();
    run_named(&mut b, "ins", &["1"]);
    run_named(&mut b, "sel", &["1"]);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_eq!(common::raw_tags(&got), "2DC2DCZ", "{}", raw_show(&got));
    let values = got[4].values();
    assert_eq!(values[1].as_deref(), Some("aaa"), "{}", raw_show(&got));

    // After the change, the first INSERT runs and answers, then `sel_b`'s new copy is
    // refused, the last INSERT never runs, and the first is rolled back with the rest
    // of the implicit transaction.
    on_s0("ALTER TABLE ns_pipe DROP COLUMN a, ADD COLUMN a text").await;
    let mut b = BytesMut::new();
    run_named(&mut b, "ins", &["2"]);
    run_named(&mut b, "sel_b", &["1"]);
    run_named(&mut b, "ins", &["3"]);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_eq!(common::raw_tags(&got), "2DCEZ", "{}", raw_show(&got));
    let error = got.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(error.sqlstate().as_deref(), Some("0A000"));
    assert_eq!(got.last().map(|z| z.status()), Some('I'));
    holder.batch_execute("COMMIT").await.expect("commit");
    let logged: Vec<i32> = common::shard(0)
        .await
        .query("SELECT n FROM ns_pipe_log ORDER BY n", &[])
        .await
        .expect("log")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(logged, [1], "only the first pipeline's INSERT stays");
    drop(c);
    r.stop().await;
    drop_table_s0("ns_pipe").await;
    drop_table_s0("ns_pipe_log").await;
}

/// Router options with one more sharded table, `name` (key `user_id`, distribution
/// `users`), that only the test using it touches.
fn options_with_table(name: &str) -> shardwire::server::ServeOptions {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/shard-config.test.yaml");
    let mut cfg = shardwire::config::Config::load(path).expect("test config");
    cfg.tables.push(shardwire::config::TableConfig {
        name: name.into(),
        column: "user_id".into(),
        distribution: "users".into(),
    });
    let mut opts = shardwire::server::ServeOptions::from_config(&cfg).expect("builds");
    opts.listen = "127.0.0.1:0".into();
    opts.grace = std::time::Duration::from_secs(1);
    opts
}

async fn on_every_shard(sql: &str) {
    for i in 0..common::SHARD_PORTS.len() {
        common::shard(i)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("s{i}: {sql}: {e}"));
    }
}

#[tokio::test]
async fn a_statement_that_spans_shards_is_refused_when_its_columns_changed() {
    on_every_shard(
        "DROP TABLE IF EXISTS ns_fan; CREATE TABLE ns_fan (user_id bigint, a text, b text)",
    )
    .await;
    let r = shardwire::server::start(options_with_table("ns_fan"))
        .await
        .expect("router starts");
    let c = connect(&r).await;
    for k in 1..=8i64 {
        c.execute(
            "INSERT INTO ns_fan (user_id, a, b) VALUES ($1, 'aaa', 'bbb')",
            &[&k],
        )
        .await
        .expect("insert");
    }
    let keys = |rows: &[tokio_postgres::Row]| {
        let mut k: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        k.sort();
        k
    };
    // Runs on every shard: parsed unnamed on each, every time.
    let stmt = c
        .prepare("SELECT * FROM ns_fan WHERE a = $1")
        .await
        .expect("prepare");
    let rows = c.query(&stmt, &[&"aaa"]).await.expect("before the change");
    assert_eq!(keys(&rows), (1..=8).collect::<Vec<i64>>());
    assert!(rows.iter().all(|r| r.get::<_, String>("b") == "bbb"));

    // A change that keeps the columns: still runs, also twice in one batch (each use
    // is parsed and checked on every shard).
    on_every_shard("CREATE INDEX IF NOT EXISTS ns_fan_a ON ns_fan (a)").await;
    let rows = c.query(&stmt, &[&"aaa"]).await.expect("same columns");
    assert_eq!(rows.len(), 8);
    let mut raw = RawClient::connect(&r).await;
    let mut b = BytesMut::new();
    wire::parse(&mut b, "f", "SELECT * FROM ns_fan WHERE a = $1", &[]);
    wire::describe(&mut b, b'S', "f");
    wire::sync(&mut b);
    raw.send(&b).await;
    assert_eq!(common::raw_tags(&raw.until_ready().await), "1tTZ");
    let mut b = BytesMut::new();
    run_named(&mut b, "f", &["aaa"]);
    run_named(&mut b, "f", &["bbb"]);
    run_named(&mut b, "f", &["aaa"]);
    wire::sync(&mut b);
    raw.send(&b).await;
    let got = raw.until_ready().await;
    let tags = common::raw_tags(&got);
    assert_eq!(
        tags,
        format!("2{}C2C2{}CZ", "D".repeat(8), "D".repeat(8)),
        "{}",
        raw_show(&got)
    );
    drop(raw);

    // `a` moves to the end on every shard.
    on_every_shard(
        "ALTER TABLE ns_fan DROP COLUMN a, ADD COLUMN a text; UPDATE ns_fan SET a = 'aaa'",
    )
    .await;
    let err = expect_sqlstate(
        c.query(&stmt, &[&"aaa"]).await,
        "0A000",
        "a statement spanning shards after its columns changed",
    );
    assert_eq!(err.message(), "cached plan must not change result type");
    let again = c
        .prepare("SELECT * FROM ns_fan WHERE a = $1")
        .await
        .expect("prepare again");
    let rows = c.query(&again, &[&"aaa"]).await.expect("prepared again");
    assert_eq!(keys(&rows), (1..=8).collect::<Vec<i64>>());
    assert!(rows.iter().all(|r| r.get::<_, String>("b") == "bbb"));
    drop(c);
    r.stop().await;
    on_every_shard("DROP TABLE IF EXISTS ns_fan").await;
}

/// Parse (named `name`) / Describe / Bind / Execute / Sync; all messages up to
/// ReadyForQuery.
async fn prepare_and_run(c: &mut RawClient, name: &str, sql: &str, param: &str) -> Vec<RawMsg> {
    let mut b = BytesMut::new();
    wire::parse(&mut b, name, sql, &[]);
    wire::describe(&mut b, b'S', name);
    run_named(&mut b, name, &[param]);
    wire::sync(&mut b);
    c.send(&b).await;
    c.until_ready().await
}

/// Bind / Execute / Sync of named statement `name`; all messages up to ReadyForQuery.
async fn run_again(c: &mut RawClient, name: &str, param: &str) -> Vec<RawMsg> {
    let mut b = BytesMut::new();
    run_named(&mut b, name, &[param]);
    wire::sync(&mut b);
    c.send(&b).await;
    c.until_ready().await
}

/// The values of the single DataRow in `got`.
fn only_row(got: &[RawMsg]) -> Vec<Option<String>> {
    let rows: Vec<&RawMsg> = got.iter().filter(|m| m.tag == b'D').collect();
    assert!(
        rows.len() == 1 && !got.iter().any(|m| m.tag == b'E'),
        "{}",
        raw_show(got)
    );
    rows[0].values()
}

#[tokio::test]
async fn a_name_prepared_again_after_the_change_runs_on_every_connection() {
    // Drivers such as pgx name a statement after its text: after the error they close
    // it and prepare the same name and text again, which must then work everywhere.
    fresh_table_s0("ns_again", "id int, a text, b text").await;
    on_s0("INSERT INTO ns_again VALUES (1, 'aaa', 'bbb')").await;
    let r = router_pool2().await;
    let mut c = RawClient::connect(&r).await;
    let sql = "SELECT *, pg_backend_pid() FROM ns_again WHERE id = $1::int";
    let got = prepare_and_run(&mut c, "q", sql, "1").await;
    let row = only_row(&got);
    assert_eq!(row[1].as_deref(), Some("aaa"));
    let first_pid: i32 = row[3].as_deref().expect("pid").parse().expect("number");
    // Made on the other connection too.
    let holder = hold(&r, first_pid).await;
    only_row(&run_again(&mut c, "q", "1").await);
    holder.batch_execute("COMMIT").await.expect("commit");

    on_s0("ALTER TABLE ns_again DROP COLUMN a, ADD COLUMN a text; UPDATE ns_again SET a = 'aaa'")
        .await;
    let got = run_again(&mut c, "q", "1").await;
    let error = got
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("{}", raw_show(&got)));
    assert_eq!(error.sqlstate().as_deref(), Some("0A000"));

    let mut b = BytesMut::new();
    wire::close(&mut b, b'S', "q");
    wire::sync(&mut b);
    c.send(&b).await;
    assert_eq!(common::raw_tags(&c.until_ready().await), "3Z");
    let row = only_row(&prepare_and_run(&mut c, "q", sql, "1").await);
    assert_eq!(
        (row[1].as_deref(), row[2].as_deref()),
        (Some("bbb"), Some("aaa"))
    );
    let pid: i32 = row[3].as_deref().expect("pid").parse().expect("number");
    // And on the other connection, which held a copy made before the change.
    let holder = hold(&r, pid).await;
    let row = only_row(&run_again(&mut c, "q", "1").await);
    assert_eq!(
        (row[1].as_deref(), row[2].as_deref()),
        (Some("bbb"), Some("aaa"))
    );
    assert_ne!(row[3].as_deref(), Some(pid.to_string().as_str()));
    drop((c, holder));
    r.stop().await;
    drop_table_s0("ns_again").await;
}

#[tokio::test]
async fn a_copy_that_no_longer_parses_reports_the_shards_error() {
    fresh_table_s0("ns_gone", "id int, a text").await;
    on_s0("INSERT INTO ns_gone VALUES (1, 'aaa')").await;
    let r = router_pool2().await;
    let c = connect(&r).await;
    let stmt = c
        .prepare("SELECT a, pg_backend_pid() FROM ns_gone WHERE id = $1")
        .await
        .expect("prepare");
    let first_pid = pid_of(&c.query_one(&stmt, &[&1i32]).await.expect("first run"));
    on_s0("ALTER TABLE ns_gone DROP COLUMN a").await;
    let holder = hold(&r, first_pid).await;
    let err = expect_sqlstate(c.query(&stmt, &[&1i32]).await, "42703", "column gone");
    assert!(err.message().contains("\"a\""), "{err:?}");
    // The session and the connection go on.
    let row = c
        .query_one("SELECT count(*) FROM ns_gone", &[])
        .await
        .expect("after");
    assert_eq!(row.get::<_, i64>(0), 1);
    drop((c, holder));
    r.stop().await;
    drop_table_s0("ns_gone").await;
}

#[tokio::test]
async fn a_stale_kept_unnamed_query_before_a_check_still_runs_again() {
    // An unnamed query kept on the connection and made stale by a change runs again
    // parsed afresh, as it would alone, when its batch also holds a named statement
    // that must be checked on that connection first.
    fresh_table_s0("ns_mix", "id int, a text, b text").await;
    fresh_table_s0("ns_mix_named", "id int, v text").await;
    on_s0("INSERT INTO ns_mix VALUES (1, 'aaa', 'bbb'); INSERT INTO ns_mix_named VALUES (1, 'v1')")
        .await;
    let r = router_pool2().await;
    let mut c = RawClient::connect(&r).await;
    let named = "SELECT v, pg_backend_pid() FROM ns_mix_named WHERE id = $1::int";
    let row = only_row(&prepare_and_run(&mut c, "q", named, "1").await);
    let first_pid: i32 = row[1].as_deref().expect("pid").parse().expect("number");
    let holder = hold(&r, first_pid).await;
    // Kept on the other connection from its second use on.
    let unnamed = "SELECT * FROM ns_mix";
    for _ in 0..2 {
        let mut b = BytesMut::new();
        wire::parse(&mut b, "", unnamed, &[]);
        wire::bind(&mut b, "", "", &[]);
        wire::execute(&mut b, "", 0);
        wire::sync(&mut b);
        c.send(&b).await;
        only_row(&c.until_ready().await);
    }
    on_s0("ALTER TABLE ns_mix DROP COLUMN a, ADD COLUMN a text; UPDATE ns_mix SET a = 'aaa'").await;
    let mut b = BytesMut::new();
    wire::parse(&mut b, "", unnamed, &[]);
    wire::bind(&mut b, "", "", &[]);
    wire::describe(&mut b, b'P', "");
    wire::execute(&mut b, "", 0);
    run_named(&mut b, "q", &["1"]);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    assert_eq!(common::raw_tags(&got), "12TDC2DCZ", "{}", raw_show(&got));
    let described = got[2].column_names();
    assert_eq!(described, ["id", "b", "a"], "{}", raw_show(&got));
    assert_eq!(got[3].values()[2].as_deref(), Some("aaa"));
    assert_eq!(got[6].values()[0].as_deref(), Some("v1"));
    drop((c, holder));
    r.stop().await;
    drop_table_s0("ns_mix").await;
    drop_table_s0("ns_mix_named").await;
}

/// How many copies of the statement `sql` the (only) server connection of `c`'s router
/// holds, and how often they ran, as "copies/executions".
async fn copies(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(
        "SELECT count(*) || '/' || coalesce(sum(generic_plans + custom_plans), 0) \
         FROM pg_prepared_statements WHERE name LIKE 'sw\\_%' AND statement = $1",
        &[&sql],
    )
    .await
    .expect("pg_prepared_statements")
    .get(0)
}

#[tokio::test]
async fn clients_with_the_same_statement_share_its_copy_until_its_columns_differ() {
    fresh_table_s0("ns_share", "id int, a text, b text").await;
    on_s0("INSERT INTO ns_share VALUES (1, 'aaa', 'bbb')").await;
    let r = common::router_pool1().await;
    let sql = "SELECT * FROM ns_share WHERE id = $1";
    let (a, b) = (connect(&r).await, connect(&r).await);
    let mut stmts = Vec::new();
    for c in [&a, &b] {
        let stmt = c.prepare(sql).await.expect("prepare");
        for _ in 0..2 {
            let row = c.query_one(&stmt, &[&1i32]).await.expect("run");
            assert_eq!(row.get::<_, String>("a"), "aaa");
        }
        stmts.push(stmt);
    }
    // One copy on the connection, run by both clients' statements.
    assert_eq!(copies(&a, sql).await, "1/4");

    on_s0("ALTER TABLE ns_share DROP COLUMN a, ADD COLUMN a text; UPDATE ns_share SET a = 'aaa'")
        .await;
    // A client preparing it now gets the new columns, from a copy of its own.
    let late = connect(&r).await;
    let stmt = late.prepare(sql).await.expect("prepare after the change");
    let names: Vec<&str> = stmt.columns().iter().map(|col| col.name()).collect();
    assert_eq!(names, ["id", "b", "a"]);
    let row = late.query_one(&stmt, &[&1i32]).await.expect("run");
    assert_eq!(row.get::<_, String>("a"), "aaa");
    assert_eq!(copies(&a, sql).await, "2/5");
    // The earlier clients' statements are refused: PostgreSQL refuses their copy,
    // which is dropped, and a new one has the new columns, which the router refuses.
    for (c, stmt) in [&a, &b].into_iter().zip(&stmts) {
        expect_sqlstate(
            c.query(stmt, &[&1i32]).await,
            "0A000",
            "an earlier client's statement",
        );
    }
    assert_eq!(
        copies(&a, sql).await,
        "1/1",
        "only the new columns' copy is left"
    );
    drop((a, b, late));
    r.stop().await;
    drop_table_s0("ns_share").await;
}

#[tokio::test]
async fn clients_with_other_search_paths_do_not_share_a_copy() {
    on_s0(
        "DROP SCHEMA IF EXISTS ns_sa CASCADE; DROP SCHEMA IF EXISTS ns_sb CASCADE; \
         CREATE SCHEMA ns_sa; CREATE SCHEMA ns_sb; \
         CREATE TABLE ns_sa.t (id int, v text); CREATE TABLE ns_sb.t (id int, v text); \
         INSERT INTO ns_sa.t VALUES (1, 'from a'); INSERT INTO ns_sb.t VALUES (1, 'from b')",
    )
    .await;
    let r = common::router_pool1().await;
    let sql = "SELECT v FROM t WHERE id = $1";
    for (schema, want) in [
        ("ns_sa", "from a"),
        ("ns_sb", "from b"),
        ("ns_sa", "from a"),
    ] {
        let c = common::connect_with(&r, &format!("options='-c search_path={schema}'")).await;
        let stmt = c.prepare(sql).await.expect("prepare");
        for _ in 0..2 {
            let row = c.query_one(&stmt, &[&1i32]).await.expect("run");
            assert_eq!(row.get::<_, String>(0), want, "search_path {schema}");
        }
    }
    // One copy per search_path; the third client used the first one's.
    let c = connect(&r).await;
    assert_eq!(copies(&c, sql).await, "2/6");
    drop(c);
    r.stop().await;
    on_s0("DROP SCHEMA ns_sa CASCADE; DROP SCHEMA ns_sb CASCADE").await;
}

#[tokio::test]
async fn a_copy_is_shared_inside_a_block_with_savepoints_and_run_time_settings() {
    // Savepoints (ORMs' nested transactions) and run-time settings leave how a text
    // parses as it was: a named statement keeps running as its shared copy.
    fresh_table_s0("ns_sp", "id int, v text").await;
    on_s0("INSERT INTO ns_sp VALUES (1, 'one')").await;
    let r = common::router_pool1().await;
    let sql = "SELECT v FROM ns_sp WHERE id = $1";
    let a = connect(&r).await;
    let stmt = a.prepare(sql).await.expect("prepare");
    a.query_one(&stmt, &[&1i32]).await.expect("run");
    let b = connect(&r).await;
    let stmt = b.prepare(sql).await.expect("prepare");
    b.batch_execute("BEGIN; SAVEPOINT s1; SET LOCAL statement_timeout = '10s'")
        .await
        .expect("block");
    for _ in 0..3 {
        let row = b
            .query_one(&stmt, &[&1i32])
            .await
            .expect("run in the block");
        assert_eq!(row.get::<_, String>(0), "one");
    }
    b.batch_execute("RELEASE SAVEPOINT s1; COMMIT")
        .await
        .expect("commit");
    assert_eq!(copies(&a, sql).await, "1/4");
    // A setting that may change how the text parses: a copy of the session's own.
    b.batch_execute("BEGIN; SET LOCAL search_path = public")
        .await
        .expect("block");
    let row = b.query_one(&stmt, &[&1i32]).await.expect("run");
    assert_eq!(row.get::<_, String>(0), "one");
    b.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(copies(&a, sql).await, "2/5");
    drop((a, b));
    r.stop().await;
    drop_table_s0("ns_sp").await;
}

#[tokio::test]
async fn an_error_in_a_clients_values_leaves_the_shared_copy_in_place() {
    fresh_table_s0("ns_vals", "id int, v text").await;
    on_s0("INSERT INTO ns_vals VALUES (1, 'one')").await;
    let r = common::router_pool1().await;
    let sql = "SELECT v FROM ns_vals WHERE id = $1::int";
    let mut a = RawClient::connect(&r).await;
    only_row(&prepare_and_run(&mut a, "q", sql, "1").await);
    only_row(&run_again(&mut a, "q", "1").await);
    // Not an integer: PostgreSQL refuses the value at Bind.
    let got = run_again(&mut a, "q", "one").await;
    assert_eq!(common::raw_tags(&got), "EZ", "{}", raw_show(&got));
    assert_eq!(got[0].sqlstate().as_deref(), Some("22P02"));
    // Another client (with the same settings): its first use learns the statement's
    // shape on a fresh parse, its second runs the shared copy.
    let mut b = RawClient::connect(&r).await;
    let row = only_row(&prepare_and_run(&mut b, "q2", sql, "1").await);
    assert_eq!(row[0].as_deref(), Some("one"));
    only_row(&run_again(&mut b, "q2", "1").await);
    // One copy ran both executions: it was not dropped and made again.
    let c = connect(&r).await;
    assert_eq!(copies(&c, sql).await, "1/2");
    drop((a, b, c));
    r.stop().await;
    drop_table_s0("ns_vals").await;
}

#[tokio::test]
async fn shards_that_infer_other_parameter_types_are_refused() {
    // Only s3 has `a` as bigint: the same text takes an int8 there, an int4 elsewhere.
    on_every_shard("DROP TABLE IF EXISTS ns_fan2; CREATE TABLE ns_fan2 (user_id bigint, a int)")
        .await;
    common::shard(3)
        .await
        .batch_execute("ALTER TABLE ns_fan2 ALTER COLUMN a TYPE bigint")
        .await
        .expect("s3");
    let r = shardwire::server::start(options_with_table("ns_fan2"))
        .await
        .expect("router starts");
    let mut c = RawClient::connect(&r).await;
    // First used on every shard at once (no Describe before).
    let mut b = BytesMut::new();
    wire::parse(&mut b, "f", "SELECT user_id FROM ns_fan2 WHERE a = $1", &[]);
    run_named(&mut b, "f", &["1"]);
    wire::sync(&mut b);
    c.send(&b).await;
    let got = c.until_ready().await;
    let error = got
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("{}", raw_show(&got)));
    assert_eq!(
        error.sqlstate().as_deref(),
        Some("42804"),
        "{}",
        raw_show(&got)
    );
    assert!(
        error.field(b'M').is_some_and(|m| m.contains("s3")),
        "{}",
        raw_show(&got)
    );
    drop(c);
    r.stop().await;
    on_every_shard("DROP TABLE IF EXISTS ns_fan2").await;
}
