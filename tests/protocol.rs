//! Wire-protocol behaviour through the router with a real client (tokio-postgres):
//! simple and extended protocol, text and binary results, prepared statements and
//! portals, pipelining, session settings under transaction pooling, transaction status,
//! notices and cancellation.
//!
//! Rows written here use user_ids 7_200_000.. that the placement function puts on the
//! default shard s0, so the tests hold both for the routing stub and the final router.

mod common;

use std::error::Error as _;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::join_all;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

/// How long a statement that should end "now" may take before the test calls it hung.
/// Not a speed check: the statements guarded by it would otherwise run for 30 s.
const HANG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Binary codecs tokio-postgres lacks without extra features: numeric and jsonb.

/// A numeric as a decimal string, sent and received in PostgreSQL's binary format.
#[derive(Debug, Clone, PartialEq)]
struct Numeric(String);

impl ToSql for Numeric {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let s = self.0.as_str();
        let (neg, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let int = int.trim_start_matches('0');
        let mut int_padded = "0".repeat((4 - int.len() % 4) % 4);
        int_padded.push_str(int);
        let mut frac_padded = frac.to_owned();
        frac_padded.push_str(&"0".repeat((4 - frac.len() % 4) % 4));
        let group = |c: &[u8]| -> i16 {
            std::str::from_utf8(c)
                .expect("ascii")
                .parse()
                .expect("digits")
        };
        let int_groups: Vec<i16> = int_padded.as_bytes().chunks(4).map(group).collect();
        let frac_groups: Vec<i16> = frac_padded.as_bytes().chunks(4).map(group).collect();
        let mut weight = int_groups.len() as i16 - 1;
        let mut digits: Vec<i16> = int_groups.into_iter().chain(frac_groups).collect();
        while digits.first() == Some(&0) {
            digits.remove(0);
            weight -= 1;
        }
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            weight = 0;
        }
        out.put_i16(digits.len() as i16);
        out.put_i16(weight);
        out.put_u16(if neg && !digits.is_empty() { 0x4000 } else { 0 });
        out.put_u16(frac.len() as u16);
        for d in digits {
            out.put_i16(d);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Numeric, Box<dyn std::error::Error + Sync + Send>> {
        let rd = |i: usize| i16::from_be_bytes([raw[i], raw[i + 1]]);
        let ndigits = rd(0) as i32;
        let weight = rd(2) as i32;
        let sign = u16::from_be_bytes([raw[4], raw[5]]);
        let dscale = u16::from_be_bytes([raw[6], raw[7]]) as usize;
        if sign == 0xC000 {
            return Ok(Numeric("NaN".into()));
        }
        let digit = |i: i32| -> i16 {
            if i >= 0 && i < ndigits {
                rd(8 + 2 * i as usize)
            } else {
                0
            }
        };
        let mut s = String::new();
        if sign == 0x4000 {
            s.push('-');
        }
        if weight < 0 {
            s.push('0');
        } else {
            for i in 0..=weight {
                if i == 0 {
                    s.push_str(&digit(i).to_string());
                } else {
                    s.push_str(&format!("{:04}", digit(i)));
                }
            }
        }
        if dscale > 0 {
            let mut frac = String::new();
            let mut k = 1;
            while frac.len() < dscale {
                frac.push_str(&format!("{:04}", digit(weight + k)));
                k += 1;
            }
            frac.truncate(dscale);
            s.push('.');
            s.push_str(&frac);
        }
        Ok(Numeric(s))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

/// jsonb text in the binary format (version byte 1, then the text).
#[derive(Debug, Clone, PartialEq)]
struct Jsonb(String);

impl ToSql for Jsonb {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Jsonb {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Jsonb, Box<dyn std::error::Error + Sync + Send>> {
        assert_eq!(raw[0], 1, "jsonb binary version");
        Ok(Jsonb(String::from_utf8(raw[1..].to_vec())?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

// ---------------------------------------------------------------------------------------

/// `n` user_ids from `start` on that the placement function puts on the default shard.
fn default_shard_ids(start: i64, n: usize) -> Vec<i64> {
    let topo = common::topology();
    let default = topo.default_shard;
    (start..)
        .filter(|id| common::shard_for(&topo, "users", *id) == default)
        .take(n)
        .collect()
}

/// Rows of a simple query, as text, per statement.
fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Vec<Option<String>>>> {
    let mut out = vec![Vec::new()];
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => out
                .last_mut()
                .expect("nonempty")
                .push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect()),
            SimpleQueryMessage::CommandComplete(_) => out.push(Vec::new()),
            _ => {}
        }
    }
    out.pop();
    out
}

#[tokio::test]
async fn simple_and_extended_text_and_binary_agree() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let sql = "SELECT g::int4 AS i, (g * 1000000000000)::int8 AS big, 'row ' || g AS t, \
               g / 4.0::float8 AS f, g % 2 = 0 AS even, \
               timestamptz '2024-02-29 12:34:56.789+00' + g * interval '1 day' AS ts \
               FROM generate_series(1, 25) g ORDER BY g";
    // Extended protocol, binary results.
    let bin = c.query(sql, &[]).await.expect("extended query");
    // Simple protocol, text results.
    let text = simple_rows(&c.simple_query(sql).await.expect("simple query"));
    assert_eq!(text.len(), 1);
    assert_eq!(bin.len(), 25);
    assert_eq!(text[0].len(), 25);
    // The same statement with results cast to text on the server (extended protocol):
    // the binary values must decode to what the server itself prints.
    let as_text = c
        .query(
            &format!("SELECT i::text, big::text, t, f::text, even::text FROM ({sql}) q"),
            &[],
        )
        .await
        .expect("text casts");
    for (i, row) in bin.iter().enumerate() {
        let n = i as i32 + 1;
        let v_i: i32 = row.get("i");
        let v_big: i64 = row.get("big");
        let v_t: String = row.get("t");
        let v_f: f64 = row.get("f");
        let v_even: bool = row.get("even");
        let _ts: std::time::SystemTime = row.get("ts");
        assert_eq!(v_i, n);
        assert_eq!(v_big, i64::from(n) * 1_000_000_000_000);
        assert_eq!(v_t, format!("row {n}"));
        assert_eq!(v_f, f64::from(n) / 4.0);
        assert_eq!(v_even, n % 2 == 0);
        let t = &text[0][i];
        let s = &as_text[i];
        for (col, cell) in t.iter().take(4).enumerate() {
            let st: String = s.get(col);
            assert_eq!(cell.as_deref(), Some(st.as_str()), "row {n} column {col}");
        }
        // Booleans print as t/f in text format.
        assert_eq!(t[4].as_deref(), Some(if v_even { "t" } else { "f" }));
        assert!(t[5].as_deref().is_some_and(|ts| ts.contains(':')));
    }
    // NULLs in both formats.
    let row = c
        .query_one("SELECT NULL::int4, NULL::text", &[])
        .await
        .expect("nulls");
    assert_eq!(row.get::<_, Option<i32>>(0), None);
    assert_eq!(row.get::<_, Option<String>>(1), None);
    let nulls = simple_rows(
        &c.simple_query("SELECT NULL::int4, ''::text")
            .await
            .expect("q"),
    );
    assert_eq!(nulls[0][0], vec![None, Some(String::new())]);
    r.stop().await;
}

#[tokio::test]
async fn multi_statement_simple_query() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let msgs = c
        .simple_query(
            "SELECT 1 AS a; SELECT 'x' AS b, 2 AS c UNION ALL SELECT 'y', 3; \
             SELECT g FROM generate_series(1, 5) g WHERE false; SELECT 'last'",
        )
        .await
        .expect("multi-statement query");
    let per_stmt = simple_rows(&msgs);
    assert_eq!(
        per_stmt.len(),
        4,
        "one CommandComplete per statement: {msgs:?}"
    );
    assert_eq!(per_stmt[0], vec![vec![Some("1".to_owned())]]);
    assert_eq!(
        per_stmt[1],
        vec![
            vec![Some("x".to_owned()), Some("2".to_owned())],
            vec![Some("y".to_owned()), Some("3".to_owned())]
        ]
    );
    assert!(per_stmt[2].is_empty());
    assert_eq!(per_stmt[3], vec![vec![Some("last".to_owned())]]);
    let counts: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![1, 2, 0, 1]);

    // A failing statement in the middle stops the rest (implicit transaction) and the
    // connection stays usable.
    let err = c
        .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
        .await
        .expect_err("division by zero");
    assert_eq!(common::sqlstate(&err), "22012");
    // Statements before the error in the same implicit transaction are rolled back too.
    let ids = default_shard_ids(7_200_000, 1);
    let id = ids[0];
    c.execute("DELETE FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("cleanup");
    let err = c
        .simple_query(&format!(
            "INSERT INTO users (user_id, name) VALUES ({id}, 'multi'); SELECT 1/0"
        ))
        .await
        .expect_err("second statement fails");
    assert_eq!(common::sqlstate(&err), "22012");
    let direct = common::shard(0).await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        n, 0,
        "the implicit transaction of a failed multi-statement query must roll back"
    );
    let one = simple_rows(&c.simple_query("SELECT 42").await.expect("after error"));
    assert_eq!(one[0][0][0].as_deref(), Some("42"));
    r.stop().await;
}

#[tokio::test]
async fn parameter_types_round_trip_in_binary() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let stmt = c
        .prepare(
            "SELECT $1::int2, $2::int4, $3::int8, $4::text, $5::uuid, $6::numeric, $7::bytea, \
             $8::jsonb, $1::text || '|' || $2::text || '|' || $3::text || '|' || $5::text \
             || '|' || $6::text || '|' || encode($7, 'hex') || '|' || $8::text",
        )
        .await
        .expect("prepare");
    type Case = (
        i16,
        i32,
        i64,
        String,
        uuid::Uuid,
        &'static str,
        Vec<u8>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (0, 0, 0, String::new(), uuid::Uuid::nil(), "0", vec![], "{}"),
        (
            i16::MIN,
            i32::MIN,
            i64::MIN,
            "héllo wörld 日本 🦀".into(),
            uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            "-12345.678",
            vec![0, 1, 2, 255, 0, 39, 92],
            r#"{"a": [1, 2.5, "x"], "b": {"c": null}}"#,
        ),
        (
            i16::MAX,
            i32::MAX,
            i64::MAX,
            "quote ' backslash \\ newline \n tab \t".into(),
            uuid::Uuid::max(),
            "123456789012345678901234567890.123456789",
            (0..=255).collect(),
            r#"[true, false, "é"]"#,
        ),
        (
            -1,
            7,
            -42,
            "x".repeat(100_000),
            uuid::Uuid::from_u128(42),
            "-0.0001",
            vec![0xAB; 70_000],
            r#""just a string""#,
        ),
    ];
    for (i, (a, b, cc, d, e, f, g, h)) in cases.iter().enumerate() {
        let num = Numeric((*f).to_owned());
        let js = Jsonb((*h).to_owned());
        let row = c
            .query_one(&stmt, &[a, b, cc, d, e, &num, g, &js])
            .await
            .unwrap_or_else(|err| panic!("case {i}: {err:?}"));
        assert_eq!(row.get::<_, i16>(0), *a, "case {i} int2");
        assert_eq!(row.get::<_, i32>(1), *b, "case {i} int4");
        assert_eq!(row.get::<_, i64>(2), *cc, "case {i} int8");
        assert_eq!(&row.get::<_, String>(3), d, "case {i} text");
        assert_eq!(row.get::<_, uuid::Uuid>(4), *e, "case {i} uuid");
        assert_eq!(row.get::<_, Numeric>(5), num, "case {i} numeric");
        assert_eq!(&row.get::<_, Vec<u8>>(6), g, "case {i} bytea");
        // jsonb normalizes its text; compare with the server's own rendering.
        let server_text: String = row.get(8);
        let expected = format!(
            "{a}|{b}|{cc}|{e}|{f}|{}|",
            g.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        assert!(
            server_text.starts_with(&expected),
            "case {i}: the server saw different parameter values: {} vs {expected}",
            &server_text[..server_text.len().min(200)]
        );
        let js_back: Jsonb = row.get(7);
        assert_eq!(
            server_text[expected.len()..],
            js_back.0,
            "case {i}: jsonb binary result differs from the server's text"
        );
    }
    // NULL parameters of every type.
    let row = c
        .query_one(
            &stmt,
            &[
                &None::<i16>,
                &None::<i32>,
                &None::<i64>,
                &None::<String>,
                &None::<uuid::Uuid>,
                &None::<Numeric>,
                &None::<Vec<u8>>,
                &None::<Jsonb>,
            ],
        )
        .await
        .expect("null params");
    assert_eq!(row.get::<_, Option<i16>>(0), None);
    assert_eq!(row.get::<_, Option<i32>>(1), None);
    assert_eq!(row.get::<_, Option<i64>>(2), None);
    assert_eq!(row.get::<_, Option<String>>(3), None);
    assert_eq!(row.get::<_, Option<uuid::Uuid>>(4), None);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(6), None);
    assert_eq!(row.get::<_, Option<Jsonb>>(7), None);
    assert_eq!(row.get::<_, Option<Numeric>>(5), None);
    assert_eq!(row.get::<_, Option<String>>(8), None);
    r.stop().await;
}

#[tokio::test]
async fn named_and_unnamed_statements_reused() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let double = c.prepare("SELECT $1::int8 * 2").await.expect("prepare");
    let concat = c
        .prepare("SELECT $1::text || '-' || $2::int4::text")
        .await
        .expect("prepare");
    let typed = c
        .prepare_typed("SELECT $1 + 1", &[Type::INT4])
        .await
        .expect("prepare_typed");
    assert_eq!(typed.params(), &[Type::INT4]);
    assert_eq!(double.columns()[0].type_(), &Type::INT8);
    for i in 0..200i64 {
        let d: i64 = c.query_one(&double, &[&i]).await.expect("double").get(0);
        assert_eq!(d, i * 2);
        let k = i as i32;
        let s: String = c
            .query_one(&concat, &[&format!("k{i}"), &k])
            .await
            .expect("concat")
            .get(0);
        assert_eq!(s, format!("k{i}-{i}"));
        let t: i32 = c.query_one(&typed, &[&k]).await.expect("typed").get(0);
        assert_eq!(t, k + 1);
        // The unnamed statement: Parse "" / Bind / Describe / Execute / Sync each time.
        let u: i64 = c
            .query_typed_one("SELECT $1::int8 - 1", &[(&i, Type::INT8)])
            .await
            .expect("unnamed")
            .get(0);
        assert_eq!(u, i - 1);
    }
    // A statement prepared, dropped (Close) and prepared again under new names.
    for round in 0..20i32 {
        let s = c
            .prepare(&format!("SELECT {round} + $1::int4"))
            .await
            .expect("prepare");
        let v: i32 = c.query_one(&s, &[&1i32]).await.expect("exec").get(0);
        assert_eq!(v, round + 1);
        drop(s);
    }
    // An error while executing a prepared statement does not break it.
    let div = c.prepare("SELECT 10 / $1::int4").await.expect("prepare");
    for k in [5i32, 0, 2, 0, 1] {
        let res = c.query_one(&div, &[&k]).await;
        if k == 0 {
            common::expect_sqlstate(res, "22012", "division by zero");
        } else {
            assert_eq!(res.expect("div").get::<_, i32>(0), 10 / k);
        }
    }
    r.stop().await;
}

#[tokio::test]
async fn pipelined_queries_on_one_client() {
    let r = common::router().await;
    let c = common::connect(&r).await;
    let stmt = c
        .prepare("SELECT $1::int4, repeat('x', $1::int4)")
        .await
        .expect("prepare");
    // tokio-postgres writes every request before reading any answer when futures are
    // polled together: the router must answer each in order.
    let futs = (0..60i32).map(|i| {
        let c = &c;
        let stmt = &stmt;
        async move {
            if i % 7 == 3 {
                // A failing request in the middle of the pipeline.
                let res = c.query_one("SELECT 1 / ($1::int4 - $1::int4)", &[&i]).await;
                (i, res.map(|_| (0, String::new())))
            } else if i % 5 == 0 {
                let res = c
                    .query_typed_one("SELECT $1::int4 * 10, 'u'", &[(&i, Type::INT4)])
                    .await;
                (i, res.map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1))))
            } else {
                let n = i * 100;
                let res = c.query_one(stmt, &[&n]).await;
                (i, res.map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1))))
            }
        }
    });
    let results = join_all(futs).await;
    for (i, res) in results {
        if i % 7 == 3 {
            common::expect_sqlstate(res, "22012", &format!("pipelined request {i}"));
        } else if i % 5 == 0 {
            assert_eq!(res.expect("typed"), (i * 10, "u".to_owned()), "request {i}");
        } else {
            let (v, s) = res.unwrap_or_else(|e| panic!("request {i}: {e:?}"));
            assert_eq!(v, i * 100, "request {i}");
            assert_eq!(s.len(), (i * 100) as usize, "request {i}");
        }
    }
    r.stop().await;
}

#[tokio::test]
async fn row_limited_portals_in_a_transaction() {
    let r = common::router().await;
    let mut c = common::connect(&r).await;
    let tx = c.transaction().await.expect("begin");
    let stmt = tx
        .prepare("SELECT g, 'r' || g FROM generate_series(1, $1::int4) g ORDER BY g")
        .await
        .expect("prepare");
    let a = tx.bind(&stmt, &[&95i32]).await.expect("bind a");
    let b = tx.bind(&stmt, &[&33i32]).await.expect("bind b");
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let (mut done_a, mut done_b) = (false, false);
    let mut fetches = 0;
    // Interleave two suspended portals on one transaction.
    while !(done_a && done_b) {
        fetches += 1;
        assert!(fetches < 100, "portals never finish");
        if !done_a {
            let rows = tx.query_portal(&a, 10).await.expect("fetch a");
            assert!(rows.len() <= 10);
            done_a = rows.is_empty();
            got_a.extend(
                rows.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1))),
            );
        }
        if !done_b {
            let rows = tx.query_portal(&b, 7).await.expect("fetch b");
            assert!(rows.len() <= 7);
            done_b = rows.is_empty();
            got_b.extend(
                rows.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1))),
            );
        }
    }
    let want = |n: i32| (1..=n).map(|g| (g, format!("r{g}"))).collect::<Vec<_>>();
    assert_eq!(got_a, want(95));
    assert_eq!(got_b, want(33));
    // The transaction is still fine after the portals.
    let v: i64 = tx
        .query_one("SELECT count(*) FROM generate_series(1, 10)", &[])
        .await
        .expect("in txn")
        .get(0);
    assert_eq!(v, 10);
    tx.commit().await.expect("commit");
    let v: i32 = c.query_one("SELECT 5", &[]).await.expect("after").get(0);
    assert_eq!(v, 5);
    r.stop().await;
}

#[tokio::test]
async fn prepared_statements_across_pooled_connections() {
    let mut opts = common::options();
    opts.pool.size = 2;
    opts.pool.checkout_timeout = Duration::from_secs(30);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let clients = join_all((0..10).map(|_| common::connect(&r))).await;
    let tasks = clients.into_iter().enumerate().map(|(k, c)| async move {
        let k = k as i64;
        // Same text on every client (same statement name "s0"... per client too).
        let shared = c
            .prepare("SELECT $1::int8 + 1")
            .await
            .expect("prepare shared");
        // Different text per client, maybe under a name another client also uses.
        let own = c
            .prepare(&format!("SELECT $1::int8 * {}, {k}::int8", k + 2))
            .await
            .expect("prepare own");
        for i in 0..50i64 {
            let v: i64 = c.query_one(&shared, &[&i]).await.expect("shared").get(0);
            assert_eq!(v, i + 1, "client {k}");
            let row = c.query_one(&own, &[&i]).await.expect("own");
            assert_eq!(
                row.get::<_, i64>(0),
                i * (k + 2),
                "client {k} iteration {i}"
            );
            assert_eq!(
                row.get::<_, i64>(1),
                k,
                "client {k} got another client's statement"
            );
            if i % 10 == 0 {
                // A statement prepared mid-way and used once.
                let once = c
                    .prepare(&format!("SELECT {k} * 1000 + {i} + $1::int8"))
                    .await
                    .expect("prepare once");
                let v: i64 = c.query_one(&once, &[&0i64]).await.expect("once").get(0);
                assert_eq!(v, k * 1000 + i);
            }
        }
    });
    join_all(tasks).await;
    r.stop().await;
}

/// `a`'s application_name, read on both server connections of a pool of two: once with
/// the other held by `b` in an open transaction.
async fn app_on_both(a: &tokio_postgres::Client, b: &tokio_postgres::Client, want: &str) {
    let app = || async {
        a.query_one("SELECT current_setting('application_name')", &[])
            .await
            .expect("application_name")
            .get::<_, String>(0)
    };
    assert_eq!(app().await, want);
    b.batch_execute("BEGIN").await.expect("begin");
    b.query_one("SELECT 1", &[])
        .await
        .expect("hold a connection");
    assert_eq!(app().await, want, "with the other connection held");
    b.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(app().await, want);
}

#[tokio::test]
async fn a_set_rolled_back_to_its_savepoint_does_not_stick() {
    // PostgreSQL undoes a SET made after a savepoint when the block rolls back to it;
    // the router must not adopt it at COMMIT (and replay it on other connections).
    let mut opts = common::options();
    opts.pool.size = 2;
    opts.pool.checkout_timeout = Duration::from_secs(30);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let a = common::connect(&r).await;
    let b = common::connect(&r).await;
    a.batch_execute("SET application_name = 'before'")
        .await
        .expect("set");
    for sql in [
        "BEGIN",
        "SAVEPOINT s1",
        "SET application_name = 'rolled_back'",
        "ROLLBACK TO SAVEPOINT s1",
        "COMMIT",
    ] {
        a.batch_execute(sql).await.expect(sql);
    }
    app_on_both(&a, &b, "before").await;
    for sql in [
        "BEGIN",
        "SET application_name = 'outer'",
        "SAVEPOINT s1",
        "SET application_name = 'inner'",
        "SAVEPOINT s2",
        "ROLLBACK TO SAVEPOINT s1",
        "COMMIT",
    ] {
        a.batch_execute(sql).await.expect(sql);
    }
    app_on_both(&a, &b, "outer").await;
    for sql in [
        "BEGIN",
        "SAVEPOINT s1",
        "SET application_name = 'released'",
        "RELEASE SAVEPOINT s1",
        "COMMIT",
    ] {
        a.batch_execute(sql).await.expect(sql);
    }
    app_on_both(&a, &b, "released").await;
    drop((a, b));
    r.stop().await;
}

#[tokio::test]
async fn session_settings_do_not_leak_between_clients() {
    let mut opts = common::options();
    // Two connections per shard: A and B must share server connections.
    opts.pool.size = 2;
    opts.pool.checkout_timeout = Duration::from_secs(30);
    let r = shardwire::server::start(opts).await.expect("router starts");
    // What a fresh session of this server says.
    let direct = common::shard(0).await;
    let default_tz: String = direct
        .query_one("SHOW TimeZone", &[])
        .await
        .expect("tz")
        .get(0);
    let default_app: String = direct
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .expect("app")
        .get(0);
    let want_tz = if default_tz == "America/New_York" {
        "Asia/Tokyo"
    } else {
        "America/New_York"
    };

    let a = common::connect(&r).await;
    let b = common::connect(&r).await;
    let b2 = common::connect(&r).await;
    a.batch_execute(&format!(
        "SET TimeZone = '{want_tz}'; SET application_name = 'client_a_leak_test'"
    ))
    .await
    .expect("set");

    let task_a = async {
        for i in 0..60 {
            let tz: String = a.query_one("SHOW TimeZone", &[]).await.expect("tz").get(0);
            assert_eq!(tz, want_tz, "client A lost its TimeZone at statement {i}");
            let app = simple_rows(
                &a.simple_query("SELECT current_setting('application_name')")
                    .await
                    .expect("app"),
            );
            assert_eq!(
                app[0][0][0].as_deref(),
                Some("client_a_leak_test"),
                "client A lost application_name at statement {i}"
            );
            if i == 20 {
                // SET inside a rolled back transaction does not stick.
                a.batch_execute("BEGIN; SET TimeZone = 'Asia/Kolkata'")
                    .await
                    .expect("begin+set");
                let tz: String = a.query_one("SHOW TimeZone", &[]).await.expect("tz").get(0);
                assert_eq!(tz, "Asia/Kolkata");
                a.batch_execute("ROLLBACK").await.expect("rollback");
            }
            if i == 40 {
                // SET LOCAL lasts only for its transaction.
                a.batch_execute("BEGIN; SET LOCAL application_name = 'local_only'")
                    .await
                    .expect("set local");
                let app: String = a
                    .query_one("SELECT current_setting('application_name')", &[])
                    .await
                    .expect("app in txn")
                    .get(0);
                assert_eq!(app, "local_only");
                a.batch_execute("COMMIT").await.expect("commit");
            }
        }
    };
    tokio::join!(
        task_a,
        check_defaults(&b, "client B", &default_tz, &default_app),
        check_defaults(&b2, "client B2", &default_tz, &default_app)
    );

    // A list-valued setting set with SQL reads back as PostgreSQL prints it, on every
    // connection A gets.
    direct
        .batch_execute("SET search_path TO foo, public")
        .await
        .expect("direct set");
    let want_sp: String = direct
        .query_one("SHOW search_path", &[])
        .await
        .expect("direct show")
        .get(0);
    a.batch_execute("SET search_path TO foo, public")
        .await
        .expect("set search_path");
    let plain = async {
        for _ in 0..20 {
            b.query_one("SELECT 1", &[]).await.expect("b");
        }
    };
    let with_sp = async {
        for i in 0..20 {
            let sp: String = a
                .query_one("SHOW search_path", &[])
                .await
                .expect("show")
                .get(0);
            assert_eq!(sp, want_sp, "client A's search_path at statement {i}");
        }
    };
    tokio::join!(plain, with_sp);
    a.batch_execute("RESET search_path").await.expect("reset");

    // RESET returns A to the defaults.
    a.batch_execute("RESET TimeZone; RESET application_name")
        .await
        .expect("reset");
    for _ in 0..5 {
        let row = a
            .query_one(
                "SELECT current_setting('TimeZone'), current_setting('application_name')",
                &[],
            )
            .await
            .expect("after reset");
        assert_eq!(row.get::<_, String>(0), default_tz);
        assert_eq!(row.get::<_, String>(1), default_app);
    }
    r.stop().await;
}

/// Many statements on `c`, each must see the server's default settings.
async fn check_defaults(c: &tokio_postgres::Client, who: &str, tz: &str, app: &str) {
    for i in 0..120 {
        let row = c
            .query_one(
                "SELECT current_setting('TimeZone'), current_setting('application_name')",
                &[],
            )
            .await
            .expect("settings");
        assert_eq!(
            row.get::<_, String>(0),
            tz,
            "{who} saw another client's TimeZone at statement {i}"
        );
        assert_eq!(
            row.get::<_, String>(1),
            app,
            "{who} saw another client's application_name at statement {i}"
        );
    }
}

#[tokio::test]
async fn startup_parameters_are_applied_on_every_connection() {
    let mut opts = common::options();
    opts.pool.size = 2;
    opts.pool.checkout_timeout = Duration::from_secs(30);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let extra = "application_name=startup_param_test options='-c search_path=foo,public -c statement_timeout=4321'";
    // The same startup parameters straight to a shard: what the router must reproduce.
    let (direct, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=app password=app-secret dbname=app {extra}",
            common::SHARD_PORTS[0]
        ),
        NoTls,
    )
    .await
    .expect("direct connect");
    tokio::spawn(conn);
    let q = "SELECT current_setting('search_path'), current_setting('application_name'), \
             current_setting('statement_timeout')";
    let want = direct.query_one(q, &[]).await.expect("direct");
    let want: (String, String, String) = (want.get(0), want.get(1), want.get(2));
    assert_eq!(want.1, "startup_param_test");

    let c = common::connect_with(&r, extra).await;
    let plain = common::connect(&r).await;
    let plain_want = common::shard(0)
        .await
        .query_one(q, &[])
        .await
        .expect("plain");
    let plain_want: (String, String, String) =
        (plain_want.get(0), plain_want.get(1), plain_want.get(2));
    let with_params = async {
        for i in 0..60 {
            let row = c.query_one(q, &[]).await.expect("settings");
            let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
            assert_eq!(got, want, "startup parameters missing at statement {i}");
            let sp = simple_rows(&c.simple_query("SHOW search_path").await.expect("show"));
            assert_eq!(sp[0][0][0].as_deref(), Some(want.0.as_str()));
        }
    };
    let without = async {
        for i in 0..60 {
            let row = plain.query_one(q, &[]).await.expect("settings");
            let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
            assert_eq!(
                got, plain_want,
                "another client's startup parameters leaked at {i}"
            );
        }
    };
    tokio::join!(with_params, without);
    r.stop().await;
}

#[tokio::test]
async fn transaction_status_and_outcomes() {
    common::ensure_schema().await;
    let r = common::router().await;
    let c = common::connect(&r).await;
    let direct = common::shard(0).await;
    let ids = default_shard_ids(7_200_100, 3);
    let (kept, discarded, after_err) = (ids[0], ids[1], ids[2]);
    direct
        .execute("DELETE FROM users WHERE user_id = ANY($1)", &[&ids])
        .await
        .expect("cleanup");

    // An error inside a block fails it: 25P02 until ROLLBACK.
    c.batch_execute("BEGIN").await.expect("begin");
    c.execute(
        "INSERT INTO users (user_id, name) VALUES ($1, 'in failed txn')",
        &[&after_err],
    )
    .await
    .expect("insert");
    let e = c.query("SELECT 1/0", &[]).await;
    common::expect_sqlstate(e, "22012", "division by zero in txn");
    let e = c.query("SELECT 1", &[]).await;
    common::expect_sqlstate(e, "25P02", "statement in failed txn (extended)");
    let e = c.simple_query("SELECT 1").await;
    common::expect_sqlstate(e, "25P02", "statement in failed txn (simple)");
    // COMMIT of a failed block reports ROLLBACK and ends it.
    let msgs = c
        .simple_query("COMMIT")
        .await
        .expect("commit of failed block");
    assert!(msgs
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_))));
    let v: i32 = c
        .query_one("SELECT 7", &[])
        .await
        .expect("recovered")
        .get(0);
    assert_eq!(v, 7);
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM users WHERE user_id = $1",
            &[&after_err],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "a failed transaction's insert must not persist");

    // Failed block, then ROLLBACK.
    c.batch_execute("BEGIN").await.expect("begin");
    let _ = c.batch_execute("SELECT nosuchcolumn FROM users").await;
    common::expect_sqlstate(
        c.query("SELECT 1", &[]).await,
        "25P02",
        "after undefined column",
    );
    c.batch_execute("ROLLBACK").await.expect("rollback");
    let v: i32 = c
        .query_one("SELECT 8", &[])
        .await
        .expect("recovered")
        .get(0);
    assert_eq!(v, 8);

    // COMMIT persists.
    c.batch_execute("BEGIN").await.expect("begin");
    c.execute(
        "INSERT INTO users (user_id, name) VALUES ($1, 'committed')",
        &[&kept],
    )
    .await
    .expect("insert");
    // Not visible from outside before COMMIT.
    let n: i64 = direct
        .query_one("SELECT count(*) FROM users WHERE user_id = $1", &[&kept])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "uncommitted row visible outside the transaction");
    c.batch_execute("COMMIT").await.expect("commit");
    let name: String = direct
        .query_one("SELECT name FROM users WHERE user_id = $1", &[&kept])
        .await
        .expect("committed row on shard")
        .get(0);
    assert_eq!(name, "committed");

    // ROLLBACK discards, including with the transaction API (extended protocol).
    let mut c2 = common::connect(&r).await;
    let tx = c2.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO users (user_id, name) VALUES ($1, 'discarded')",
        &[&discarded],
    )
    .await
    .expect("insert");
    let seen: i64 = tx
        .query_one(
            "SELECT count(*) FROM users WHERE user_id = $1",
            &[&discarded],
        )
        .await
        .expect("read own write")
        .get(0);
    assert_eq!(seen, 1, "a transaction must see its own write");
    tx.rollback().await.expect("rollback");
    for i in 0..common::SHARD_PORTS.len() {
        let n: i64 = common::shard(i)
            .await
            .query_one(
                "SELECT count(*) FROM users WHERE user_id = $1",
                &[&discarded],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "rolled back row found on s{i}");
    }
    // Savepoints.
    let tx = c2.transaction().await.expect("begin");
    tx.batch_execute("SAVEPOINT sp1").await.expect("savepoint");
    let _ = tx.batch_execute("SELECT 1/0").await;
    tx.batch_execute("ROLLBACK TO SAVEPOINT sp1")
        .await
        .expect("rollback to");
    let v: i32 = tx
        .query_one("SELECT 9", &[])
        .await
        .expect("after savepoint")
        .get(0);
    assert_eq!(v, 9);
    tx.commit().await.expect("commit");

    direct
        .execute("DELETE FROM users WHERE user_id = ANY($1)", &[&ids])
        .await
        .expect("cleanup");
    r.stop().await;
}

/// Connect through the router and collect the connection's async messages (notices).
async fn connect_collecting(
    r: &shardwire::server::RunningRouter,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut conn) = tokio_postgres::connect(&common::conninfo(r), NoTls)
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(m) => {
                    let _ = tx.send(m);
                }
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

#[tokio::test]
async fn notices_pass_through() {
    let r = common::router().await;
    let (c, mut rx) = connect_collecting(&r).await;
    c.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello %', 6 * 7; END $$")
        .await
        .expect("do (simple)");
    c.execute(
        "DO $$ BEGIN RAISE WARNING 'careful' USING HINT = 'a hint'; END $$",
        &[],
    )
    .await
    .expect("do (extended)");
    // Notices raised between DataRows, in a multi-statement simple query.
    c.batch_execute(
        "CREATE FUNCTION pg_temp.noisy(i int) RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN RAISE NOTICE 'row %', i; RETURN i; END $$; \
         SELECT pg_temp.noisy(g) FROM generate_series(1, 3) g",
    )
    .await
    .expect("noisy select");
    let v: i32 = c.query_one("SELECT 1", &[]).await.expect("q").get(0);
    assert_eq!(v, 1);
    let mut notices = Vec::new();
    while notices.len() < 5 {
        match tokio::time::timeout(HANG, rx.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => notices.push(n),
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection ended before the notices arrived"),
            Err(_) => panic!("notices never arrived; got {notices:?}"),
        }
    }
    assert_eq!(notices[0].severity(), "NOTICE");
    assert_eq!(notices[0].code().code(), "00000");
    assert_eq!(notices[0].message(), "hello 42");
    assert_eq!(notices[1].severity(), "WARNING");
    assert_eq!(notices[1].code().code(), "01000");
    assert_eq!(notices[1].message(), "careful");
    assert_eq!(notices[1].hint(), Some("a hint"));
    let rows: Vec<&str> = notices[2..].iter().map(|n| n.message()).collect();
    assert_eq!(rows, vec!["row 1", "row 2", "row 3"]);
    r.stop().await;
}

/// Wait until a statement containing `marker` is running on shard 0.
async fn wait_running(direct: &tokio_postgres::Client, marker: &str) {
    let pattern = format!("%{marker}%");
    let give_up = tokio::time::Instant::now() + HANG;
    loop {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                 AND query LIKE $1 AND pid <> pg_backend_pid()",
                &[&pattern],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "statement {marker} never started on the shard"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn still_running(direct: &tokio_postgres::Client, marker: &str) -> bool {
    let pattern = format!("%{marker}%");
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND query LIKE $1 AND pid <> pg_backend_pid()",
            &[&pattern],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    n > 0
}

#[tokio::test]
async fn cancel_reaches_the_right_query() {
    let r = common::router().await;
    let direct = common::shard(0).await;
    let a = common::connect(&r).await;
    let b = common::connect(&r).await;
    let tag = format!("{:x}", rand::random::<u64>());
    let (ma, mb) = (format!("cancel_a_{tag}"), format!("cancel_b_{tag}"));
    let qa = format!("SELECT pg_sleep(30) /* {ma} */");
    let qb = format!("SELECT pg_sleep(30) /* {mb} */");
    let ta = a.cancel_token();
    let tb = b.cancel_token();
    let run_a = tokio::spawn(async move {
        let res = tokio::time::timeout(HANG, a.simple_query(&qa)).await;
        (a, res)
    });
    let run_b = tokio::spawn(async move {
        let res = tokio::time::timeout(HANG * 2, b.query(&qb, &[])).await;
        (b, res)
    });
    wait_running(&direct, &ma).await;
    wait_running(&direct, &mb).await;
    ta.cancel_query(NoTls).await.expect("send cancel");
    let (a, res) = run_a.await.expect("task a");
    let res = res.expect("cancelled query must end, not run for 30 s");
    common::expect_sqlstate(res, "57014", "cancelled simple query");
    // B, on another server connection, keeps running.
    assert!(
        still_running(&direct, &mb).await,
        "cancelling client A stopped client B's query"
    );
    // A works afterwards.
    let v: i32 = a
        .query_one("SELECT 11", &[])
        .await
        .expect("after cancel")
        .get(0);
    assert_eq!(v, 11);
    // Cancel B (extended protocol).
    tb.cancel_query(NoTls).await.expect("send cancel");
    let (b, res) = run_b.await.expect("task b");
    let res = res.expect("cancelled query must end");
    common::expect_sqlstate(res, "57014", "cancelled extended query");
    let v: i32 = b
        .query_one("SELECT 12", &[])
        .await
        .expect("after cancel")
        .get(0);
    assert_eq!(v, 12);
    r.stop().await;
}

#[tokio::test]
async fn stale_cancel_keys_do_nothing() {
    let mut opts = common::options();
    // One server connection per shard: every client uses the same one in turn.
    opts.pool.size = 1;
    opts.pool.checkout_timeout = Duration::from_secs(30);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let direct = common::shard(0).await;
    // An idle client whose last statement ran on the connection the victim will use.
    let idle = common::connect(&r).await;
    idle.query_one("SELECT 1", &[])
        .await
        .expect("idle's statement");
    // A closed client, same story.
    let closed = common::connect(&r).await;
    closed
        .query_one("SELECT 1", &[])
        .await
        .expect("closed's statement");
    let closed_token = closed.cancel_token();
    drop(closed);
    let idle_token = idle.cancel_token();

    let victim = common::connect(&r).await;
    let marker = format!("victim_{:x}", rand::random::<u64>());
    let q = format!("SELECT pg_sleep(3), 'done' /* {marker} */");
    let run = tokio::spawn(async move {
        victim
            .query_one(&q, &[])
            .await
            .map(|r| r.get::<_, String>(1))
    });
    wait_running(&direct, &marker).await;
    idle_token
        .cancel_query(NoTls)
        .await
        .expect("send idle cancel");
    closed_token
        .cancel_query(NoTls)
        .await
        .expect("send stale cancel");
    // A cancel with a made-up key, on a raw socket.
    let mut raw = tokio::net::TcpStream::connect(r.addr)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&16i32.to_be_bytes());
    pkt.extend_from_slice(&80877102i32.to_be_bytes());
    pkt.extend_from_slice(&rand::random::<i32>().to_be_bytes());
    pkt.extend_from_slice(&rand::random::<i32>().to_be_bytes());
    raw.write_all(&pkt).await.expect("write cancel");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(HANG, raw.read(&mut buf))
        .await
        .expect("router must close a cancel connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "a CancelRequest gets no reply");
    let res = tokio::time::timeout(HANG, run)
        .await
        .expect("victim finishes")
        .expect("task");
    match res {
        Ok(s) => assert_eq!(s, "done"),
        Err(e) => panic!(
            "a stale or foreign cancel key cancelled another client's query: {e:?} {:?}",
            e.source()
        ),
    }
    let v: i32 = idle
        .query_one("SELECT 3", &[])
        .await
        .expect("idle still works")
        .get(0);
    assert_eq!(v, 3);
    r.stop().await;
}
