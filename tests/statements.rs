//! Clients' unnamed extended-protocol queries kept on server connections
//! (`pool.reuse_unnamed_statements`): from a text's second use on, parsed once per
//! connection, shared only among clients with the same settings, and parsed afresh when
//! a schema change makes the kept statement stale.
//!
//! Every router here has one server connection per shard, so consecutive clients meet
//! on the same connection and a statement one of them left behind is visible to the
//! next (through `pg_prepared_statements`, which is per server connection).
//!
//! Tables st_* are created directly on s0, the default shard.

mod common;

use bytes::BytesMut;
use common::{
    drop_table_s0, fresh_table_s0, raw_show, router_pool1, router_pool1_with, wire, RawClient,
    RawMsg,
};

/// Parse (unnamed) / Bind / Describe / Execute / Sync of `sql`; all messages up to
/// ReadyForQuery.
async fn unnamed(c: &mut RawClient, sql: &str) -> Vec<RawMsg> {
    unnamed_with(c, sql, &[]).await
}

/// `unnamed` with text parameters (types left to the server).
async fn unnamed_with(c: &mut RawClient, sql: &str, params: &[&str]) -> Vec<RawMsg> {
    let mut b = BytesMut::new();
    wire::parse(&mut b, "", sql, &[]);
    let params: Vec<Option<&[u8]>> = params.iter().map(|p| Some(p.as_bytes())).collect();
    wire::bind(&mut b, "", "", &params);
    wire::describe(&mut b, b'P', "");
    wire::execute(&mut b, "", 0);
    wire::sync(&mut b);
    c.send(&b).await;
    c.until_ready().await
}

/// Run `sql` on s0 directly (not through the router).
async fn on_s0(sql: &str) {
    common::shard(0)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The first column of the single row `sql` returns, run as an unnamed statement.
async fn unnamed_value(c: &mut RawClient, sql: &str) -> String {
    let got = unnamed(c, sql).await;
    let rows: Vec<&RawMsg> = got.iter().filter(|m| m.tag == b'D').collect();
    assert!(
        rows.len() == 1 && !got.iter().any(|m| m.tag == b'E'),
        "unnamed `{sql}`: {}",
        raw_show(&got)
    );
    rows[0].values()[0].clone().expect("not NULL")
}

/// The first column of the single row of a simple query.
async fn simple_value(c: &mut RawClient, sql: &str) -> String {
    let got = c.query(sql).await;
    let rows: Vec<&RawMsg> = got.iter().filter(|m| m.tag == b'D').collect();
    assert!(rows.len() == 1, "`{sql}`: {}", raw_show(&got));
    rows[0].values()[0].clone().unwrap_or_default()
}

/// Named statements on s0's server connection whose text is `sql`, as
/// "count/name prefix/executions" (executions: custom plus generic plans).
async fn kept_on_s0(c: &mut RawClient, sql: &str) -> String {
    simple_value(
        c,
        &format!(
            "SELECT count(*) || '/' || coalesce(min(left(name, 3)), '-') || '/' \
             || coalesce(sum(generic_plans + custom_plans), 0) \
             FROM pg_prepared_statements WHERE statement = '{}'",
            sql.replace('\'', "''")
        ),
    )
    .await
}

#[tokio::test]
async fn a_repeated_unnamed_query_is_parsed_once_per_connection() {
    fresh_table_s0("st_once", "a int").await;
    common::shard(0)
        .await
        .batch_execute("INSERT INTO st_once VALUES (41)")
        .await
        .expect("row");
    let r = router_pool1().await;
    let sql = "select a + 1 from st_once";
    let mut a = RawClient::connect(&r).await;
    let mut b = RawClient::connect(&r).await;
    for _ in 0..3 {
        assert_eq!(unnamed_value(&mut a, sql).await, "42");
        assert_eq!(unnamed_value(&mut b, sql).await, "42");
    }
    // The first execution parses the text unnamed (it may never come back); one
    // statement on the connection serves the other five, of both clients.
    assert_eq!(kept_on_s0(&mut a, sql).await, "1/sw_/5");
    drop((a, b));
    r.stop().await;
    drop_table_s0("st_once").await;
}

#[tokio::test]
async fn a_text_run_once_is_not_kept() {
    let r = router_pool1().await;
    let mut a = RawClient::connect(&r).await;
    // Unique to this run, so no earlier test run's text can count as seen.
    let sql = format!(
        "select {} as once_only",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    let want = sql["select ".len()..sql.len() - " as once_only".len()].to_string();
    assert_eq!(unnamed_value(&mut a, &sql).await, want);
    assert_eq!(kept_on_s0(&mut a, &sql).await, "0/-/0");
    // Run again, it is kept.
    assert_eq!(unnamed_value(&mut a, &sql).await, want);
    let mut b = RawClient::connect(&r).await;
    assert_eq!(unnamed_value(&mut b, &sql).await, want);
    assert_eq!(kept_on_s0(&mut a, &sql).await, "1/sw_/2");
    drop((a, b));
    r.stop().await;
}

#[tokio::test]
async fn unnamed_queries_are_parsed_afresh_when_reuse_is_off() {
    fresh_table_s0("st_off", "a int").await;
    common::shard(0)
        .await
        .batch_execute("INSERT INTO st_off VALUES (7)")
        .await
        .expect("row");
    let r = router_pool1_with(|o| o.reuse_unnamed_statements = false).await;
    let sql = "select a from st_off";
    let mut a = RawClient::connect(&r).await;
    for _ in 0..2 {
        assert_eq!(unnamed_value(&mut a, sql).await, "7");
    }
    assert_eq!(kept_on_s0(&mut a, sql).await, "0/-/0");
    drop(a);
    r.stop().await;
    drop_table_s0("st_off").await;
}

/// With standard_conforming_strings off, '\\' in a literal is one backslash: the same
/// text means something else, so a client with other settings must not use the
/// statement another client's settings produced.
const BACKSLASHES: &str = r"select length('a\\b')";

#[tokio::test]
async fn clients_with_other_settings_do_not_share_a_kept_statement() {
    let r = router_pool1().await;
    let mut off = RawClient::connect(&r).await;
    let got = off.query("SET standard_conforming_strings = off").await;
    assert!(
        !got.iter().any(|m| m.tag == b'E'),
        "SET: {}",
        raw_show(&got)
    );
    let mut on = RawClient::connect(&r).await;
    for _ in 0..2 {
        assert_eq!(unnamed_value(&mut off, BACKSLASHES).await, "3");
        assert_eq!(unnamed_value(&mut on, BACKSLASHES).await, "4");
    }
    drop((off, on));
    r.stop().await;
}

#[tokio::test]
async fn a_setting_changed_inside_a_block_is_not_shared() {
    let r = router_pool1().await;
    let mut a = RawClient::connect(&r).await;
    let got = a
        .query("BEGIN; SET LOCAL standard_conforming_strings = off")
        .await;
    assert!(
        !got.iter().any(|m| m.tag == b'E'),
        "BEGIN; SET LOCAL: {}",
        raw_show(&got)
    );
    assert_eq!(unnamed_value(&mut a, BACKSLASHES).await, "3");
    assert_eq!(unnamed_value(&mut a, BACKSLASHES).await, "3");
    let got = a.query("COMMIT").await;
    assert!(
        !got.iter().any(|m| m.tag == b'E'),
        "COMMIT: {}",
        raw_show(&got)
    );
    // The connection is back to default settings; what the block parsed must not be
    // taken for the statement of those settings.
    let mut b = RawClient::connect(&r).await;
    assert_eq!(unnamed_value(&mut b, BACKSLASHES).await, "4");
    assert_eq!(unnamed_value(&mut a, BACKSLASHES).await, "4");
    drop((a, b));
    r.stop().await;
}

/// The column names of the RowDescription among `got`.
fn columns(got: &[RawMsg]) -> Option<Vec<String>> {
    got.iter().find(|m| m.tag == b'T').map(RawMsg::column_names)
}

#[tokio::test]
async fn a_stale_kept_statement_is_parsed_afresh_and_the_batch_run_again() {
    fresh_table_s0("st_ddl", "a int").await;
    common::shard(0)
        .await
        .batch_execute("INSERT INTO st_ddl VALUES (1)")
        .await
        .expect("row");
    let r = router_pool1().await;
    let sql = "select * from st_ddl";
    let mut a = RawClient::connect(&r).await;
    for _ in 0..2 {
        assert_eq!(unnamed_value(&mut a, sql).await, "1");
    }
    assert_eq!(kept_on_s0(&mut a, sql).await, "1/sw_/1");
    common::shard(0)
        .await
        .batch_execute("ALTER TABLE st_ddl ADD COLUMN b int DEFAULT 2")
        .await
        .expect("alter");
    // PostgreSQL refuses the kept statement (its columns changed); the client sees the
    // answer a fresh parse gives, with no error.
    let mut b = RawClient::connect(&r).await;
    for c in [&mut b, &mut a] {
        let got = unnamed(c, sql).await;
        assert!(!got.iter().any(|m| m.tag == b'E'), "{}", raw_show(&got));
        assert_eq!(columns(&got), Some(vec!["a".to_string(), "b".to_string()]));
        let row = got.iter().find(|m| m.tag == b'D').map(RawMsg::values);
        assert_eq!(
            row,
            Some(vec![Some("1".to_string()), Some("2".to_string())])
        );
    }
    // The replacement is kept (the old one closed): one statement, used twice since.
    assert_eq!(kept_on_s0(&mut a, sql).await, "1/sw_/2");
    drop((a, b));
    r.stop().await;
    drop_table_s0("st_ddl").await;
}

#[tokio::test]
async fn a_kept_statement_whose_parameter_type_changed_is_parsed_afresh() {
    fresh_table_s0("st_ptype", "c int, v text").await;
    on_s0("INSERT INTO st_ptype VALUES (5, 'five')").await;
    let r = router_pool1().await;
    let sql = "select v from st_ptype where c = $1";
    let mut a = RawClient::connect(&r).await;
    for _ in 0..2 {
        let got = unnamed_with(&mut a, sql, &["5"]).await;
        assert!(got.iter().any(|m| m.tag == b'D'), "{}", raw_show(&got));
    }
    assert_eq!(kept_on_s0(&mut a, sql).await, "1/sw_/1");
    // The kept statement's $1 is an integer; revalidated against a text column it fails
    // (text = integer does not exist), where a fresh parse infers text.
    on_s0("ALTER TABLE st_ptype ALTER c TYPE text").await;
    for _ in 0..2 {
        let got = unnamed_with(&mut a, sql, &["5"]).await;
        let row = got.iter().find(|m| m.tag == b'D').map(RawMsg::values);
        assert_eq!(
            row,
            Some(vec![Some("five".to_string())]),
            "{}",
            raw_show(&got)
        );
    }
    drop(a);
    r.stop().await;
    drop_table_s0("st_ptype").await;
}

/// Keep `select * from <table>`, run `maintenance` (which must leave the statement
/// alone), then `ddl` (which must retire it: the next use makes a new statement for the
/// new schema), each as a simple query through the router.
async fn maintenance_keeps_and_ddl_retires(table: &str, maintenance: &str, ddl: &str) {
    fresh_table_s0(table, "a int").await;
    on_s0(&format!("INSERT INTO {table} VALUES (1)")).await;
    let r = router_pool1().await;
    let sql = format!("select * from {table}");
    let mut a = RawClient::connect(&r).await;
    for _ in 0..2 {
        assert_eq!(unnamed_value(&mut a, &sql).await, "1");
    }
    assert_eq!(kept_on_s0(&mut a, &sql).await, "1/sw_/1");
    // Maintenance changes no names or types: the statement stays.
    let got = a.query(maintenance).await;
    assert!(!got.iter().any(|m| m.tag == b'E'), "{}", raw_show(&got));
    assert_eq!(unnamed_value(&mut a, &sql).await, "1");
    assert_eq!(kept_on_s0(&mut a, &sql).await, "1/sw_/2");
    let got = a.query(ddl).await;
    assert!(!got.iter().any(|m| m.tag == b'E'), "{}", raw_show(&got));
    // A new statement for the new schema; the old one is not touched again (a stale
    // one would have been closed and re-made under the same name: one statement).
    let got = unnamed(&mut a, &sql).await;
    assert_eq!(columns(&got), Some(vec!["a".to_string(), "b".to_string()]));
    assert_eq!(kept_on_s0(&mut a, &sql).await, "2/sw_/3");
    drop(a);
    r.stop().await;
    drop_table_s0(table).await;
}

#[tokio::test]
async fn ddl_through_the_router_retires_kept_statements() {
    maintenance_keeps_and_ddl_retires(
        "st_epoch",
        "ANALYZE st_epoch",
        "ALTER TABLE st_epoch ADD COLUMN b int DEFAULT 2",
    )
    .await;
}

#[tokio::test]
async fn statements_later_in_a_multi_statement_query_are_judged_by_their_own_text() {
    // Maintenance, then DDL, as the second statement of a query string.
    maintenance_keeps_and_ddl_retires(
        "st_multi",
        "SELECT 1; ANALYZE st_multi",
        "SELECT 1; ALTER TABLE st_multi ADD COLUMN b int DEFAULT 2",
    )
    .await;
}

#[tokio::test]
async fn a_failed_kept_statement_never_hides_a_lost_write() {
    fresh_table_s0("st_lost", "a int").await;
    fresh_table_s0("st_lost_log", "n int").await;
    on_s0("INSERT INTO st_lost VALUES (1)").await;
    let r = router_pool1().await;
    let sql = "select * from st_lost";
    let mut a = RawClient::connect(&r).await;
    for _ in 0..2 {
        assert_eq!(unnamed_value(&mut a, sql).await, "1");
    }
    on_s0("ALTER TABLE st_lost ADD COLUMN b int").await;
    // One implicit transaction: an INSERT answered after Flush, then the stale
    // statement, then Sync. Running only the second half again would report success
    // for a batch whose INSERT PostgreSQL rolled back with the error.
    let mut b = BytesMut::new();
    wire::pbe(&mut b, "insert into st_lost_log values (7)");
    wire::flush(&mut b);
    a.send(&b).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(a.recv().await);
    }
    assert_eq!(common::raw_tags(&got), "12C", "{}", raw_show(&got));
    let got = unnamed(&mut a, sql).await;
    let failed = got.iter().any(|m| m.tag == b'E');
    let logged = simple_value(&mut a, "select count(*) from st_lost_log").await;
    assert!(
        (failed && logged == "0") || (!failed && logged == "1"),
        "batch {} an error, and its INSERT left {logged} rows: {}",
        if failed { "reported" } else { "did not report" },
        raw_show(&got)
    );
    drop(a);
    r.stop().await;
    drop_table_s0("st_lost").await;
    drop_table_s0("st_lost_log").await;
}

#[tokio::test]
async fn a_stale_kept_statement_inside_a_transaction_is_replaced_after_it() {
    fresh_table_s0("st_txn", "a int").await;
    common::shard(0)
        .await
        .batch_execute("INSERT INTO st_txn VALUES (1)")
        .await
        .expect("row");
    let r = router_pool1().await;
    let sql = "select * from st_txn";
    let mut a = RawClient::connect(&r).await;
    // Twice: kept on the connection from the second use on.
    assert_eq!(unnamed_value(&mut a, sql).await, "1");
    assert_eq!(unnamed_value(&mut a, sql).await, "1");
    assert_eq!(kept_on_s0(&mut a, sql).await, "1/sw_/1");
    common::shard(0)
        .await
        .batch_execute("ALTER TABLE st_txn ADD COLUMN b int DEFAULT 2")
        .await
        .expect("alter");
    // Inside a transaction block the kept statement's error cannot be undone: the
    // client sees PostgreSQL's error (as it would for a named statement) …
    let got = a.query("BEGIN").await;
    assert!(
        !got.iter().any(|m| m.tag == b'E'),
        "BEGIN: {}",
        raw_show(&got)
    );
    let got = unnamed(&mut a, sql).await;
    let err = got.iter().find(|m| m.tag == b'E');
    assert_eq!(
        err.and_then(RawMsg::sqlstate).as_deref(),
        Some("0A000"),
        "stale statement inside a block: {}",
        raw_show(&got)
    );
    let got = a.query("ROLLBACK").await;
    assert!(
        !got.iter().any(|m| m.tag == b'E'),
        "ROLLBACK: {}",
        raw_show(&got)
    );
    // … and once the block is over the statement is parsed afresh, for every client.
    let mut b = RawClient::connect(&r).await;
    for c in [&mut a, &mut b] {
        let got = unnamed(c, sql).await;
        let cols = got.iter().find(|m| m.tag == b'T').map(RawMsg::column_names);
        assert_eq!(
            cols,
            Some(vec!["a".to_string(), "b".to_string()]),
            "{}",
            raw_show(&got)
        );
    }
    drop((a, b));
    r.stop().await;
    drop_table_s0("st_txn").await;
}
