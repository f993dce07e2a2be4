//! Table-driven routing tests: statements, parameters, expected routes or errors.
//! No sockets. Hash-distribution expectations are computed with
//! `Distribution::shard_for`, never hard-coded slot numbers.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::*;
use crate::topology::{
    Distribution, KeyRange, KeyType, KeyValue, Method, Shard, ShardedTable, SlotRange,
};

const USERS: usize = 0;
const ACCOUNTS: usize = 1;
const TENANTS: usize = 2;
const DEVICES: usize = 3;

fn shard(i: usize) -> Shard {
    Shard {
        name: format!("s{i}"),
        host: "127.0.0.1".into(),
        port: 5433 + i as u16,
        database: "app".into(),
        user: "app".into(),
        password: "x".into(),
    }
}

fn slots4() -> Vec<SlotRange> {
    (0..4)
        .map(|i| SlotRange {
            first: i * 256,
            last: i * 256 + 255,
            shard: i as usize,
        })
        .collect()
}

fn range(from: Option<KeyValue>, to: Option<KeyValue>, shard: usize) -> KeyRange {
    KeyRange { from, to, shard }
}

fn topology() -> Topology {
    let i = KeyValue::Int;
    let t = |s: &str| KeyValue::Text(s.into());
    let distributions = vec![
        Distribution {
            name: "users".into(),
            key_type: KeyType::Bigint,
            method: Method::Hash {
                slots: 1024,
                map: slots4(),
            },
        },
        Distribution {
            name: "accounts".into(),
            key_type: KeyType::Bigint,
            method: Method::Range {
                map: vec![
                    range(None, Some(i(1000)), 0),
                    range(Some(i(1000)), Some(i(2000)), 1),
                    range(Some(i(2000)), Some(i(3000)), 2),
                    range(Some(i(3000)), None, 3),
                ],
            },
        },
        Distribution {
            name: "tenants".into(),
            key_type: KeyType::Text,
            method: Method::Range {
                map: vec![range(None, Some(t("m")), 0), range(Some(t("m")), None, 1)],
            },
        },
        Distribution {
            name: "devices".into(),
            key_type: KeyType::Uuid,
            method: Method::Hash {
                slots: 1024,
                map: slots4(),
            },
        },
    ];
    let mut tables = foldhash::HashMap::default();
    for (name, column, distribution) in [
        ("users", "user_id", USERS),
        ("orders", "user_id", USERS),
        ("events", "user_id", USERS),
        ("accounts", "account_id", ACCOUNTS),
        ("tenants", "name", TENANTS),
        ("devices", "device_id", DEVICES),
    ] {
        tables.insert(
            name.to_owned(),
            ShardedTable {
                name: name.into(),
                column: column.into(),
                distribution,
            },
        );
    }
    Topology {
        shards: (0..4).map(shard).collect(),
        distributions,
        tables,
        reference_tables: ["countries".to_owned()].into_iter().collect(),
        default_shard: 0,
        version: 1,
    }
}

/// An expected outcome.
enum Want {
    Shard(usize),
    Multi(&'static [usize]),
    Replicated,
    /// Every shard of a distribution, concatenated.
    AllOf(usize),
    /// The shards of these keys in a distribution (one → `Shard`, more → Concat).
    Keys(usize, Vec<KeyValue>),
    /// An error with this SQLSTATE whose message contains this text.
    Err(&'static str, &'static str),
}

use Want::*;

const UNSUPPORTED: &str = "0A000";

fn int(v: i64) -> KeyValue {
    KeyValue::Int(v)
}

const UUID_A: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

fn uuid_a() -> KeyValue {
    KeyValue::from_text(UUID_A, KeyType::Uuid).expect("uuid")
}

fn text(v: &'static str) -> Param<'static> {
    Param {
        value: Some(v.as_bytes()),
        binary: false,
        type_oid: 0,
    }
}

fn bin(v: &'static [u8]) -> Param<'static> {
    Param {
        value: Some(v),
        binary: true,
        type_oid: 0,
    }
}

const NULL: Param<'static> = Param {
    value: None,
    binary: false,
    type_oid: 0,
};

fn expected(topo: &Topology, want: &Want) -> Result<Route, (&'static str, &'static str)> {
    let multi = |set: BTreeSet<usize>, merge| {
        let v: Vec<usize> = set.into_iter().collect();
        if v.len() == 1 {
            Route::Shard(v[0])
        } else {
            Route::Multi { shards: v, merge }
        }
    };
    match want {
        Shard(s) => Ok(Route::Shard(*s)),
        Multi(v) => Ok(multi(v.iter().copied().collect(), MergePlan::Concat)),
        Replicated => Ok(multi(topo.all_shards(), MergePlan::Replicated)),
        AllOf(d) => Ok(multi(topo.distributions[*d].shards(), MergePlan::Concat)),
        Keys(d, keys) => Ok(multi(
            keys.iter()
                .map(|k| topo.distributions[*d].shard_for(k).expect("placed"))
                .collect(),
            MergePlan::Concat,
        )),
        Err(code, text) => Result::Err((code, text)),
    }
}

fn check(router: &Router, sql: &str, params: &[Param<'_>], want: Want) {
    let topo = router.topology().clone();
    let got = router.plan(sql).and_then(|p| {
        let last = p
            .statements
            .last()
            .unwrap_or_else(|| panic!("no statement in {sql}"));
        let full = last.route(&topo, params);
        // The hot path (no reason text, point fast path, the memo of which parameter
        // is the key) must decide exactly alike, and the same every time.
        let quiet = last.route_quiet(&topo, params);
        let again = last.route_quiet(&topo, params);
        assert_eq!(
            format!("{quiet:?}"),
            format!("{again:?}"),
            "{sql}: route_quiet changed its mind"
        );
        match (&full, &quiet) {
            (Ok(f), Ok(q)) => assert_eq!(f.route, q.route, "{sql}: route_quiet differs"),
            (Result::Err(f), Result::Err(q)) => assert_eq!(
                (f.sqlstate(), f.message()),
                (q.sqlstate(), q.message()),
                "{sql}: route_quiet error differs"
            ),
            _ => panic!("{sql}: route gave {full:?}, route_quiet gave {quiet:?}"),
        }
        full
    });
    match (expected(&topo, &want), got) {
        (Ok(w), Ok(g)) => {
            assert_eq!(g.route, w, "{sql}: reason {}", g.reason);
            assert!(!g.reason.is_empty(), "{sql}: empty reason");
        }
        (Result::Err((code, text)), Result::Err(e)) => {
            assert_eq!(e.sqlstate(), code, "{sql}: {e}");
            assert!(
                e.message().contains(text),
                "{sql}: message {:?} lacks {text:?}",
                e.message()
            );
            if code == UNSUPPORTED {
                assert!(e.hint().is_some(), "{sql}: refusal without hint");
            }
        }
        (Ok(w), Result::Err(e)) => panic!("{sql}: wanted {w:?}, got error {e}"),
        (Result::Err((code, _)), Ok(g)) => {
            panic!(
                "{sql}: wanted error {code}, got {:?} ({})",
                g.route, g.reason
            )
        }
    }
}

fn router() -> Router {
    Router::new(Arc::new(topology()))
}

#[test]
fn routing_table() {
    let r = router();
    let cases: Vec<(&str, Vec<Param<'_>>, Want)> = vec![
        // --- no tables, catalogs, unsharded ---
        ("SELECT 1", vec![], Shard(0)),
        ("SELECT now()", vec![], Shard(0)),
        ("SELECT set_config('a.b', 'c', false)", vec![], Shard(0)),
        ("SELECT * FROM pg_catalog.pg_class", vec![], Shard(0)),
        ("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname ~ '^(users)$'", vec![], Shard(0)),
        ("SELECT * FROM information_schema.tables", vec![], Shard(0)),
        ("SELECT * FROM settings WHERE id = 3", vec![], Shard(0)),
        ("VALUES (1), (2)", vec![], Shard(0)),
        // --- single key ---
        ("SELECT * FROM users WHERE user_id = 42", vec![], Keys(USERS, vec![int(42)])),
        ("SELECT * FROM users WHERE 42 = user_id", vec![], Keys(USERS, vec![int(42)])),
        ("select * from USERS where USER_ID = 42", vec![], Keys(USERS, vec![int(42)])),
        ("SELECT * FROM \"users\" WHERE \"user_id\" = 7", vec![], Keys(USERS, vec![int(7)])),
        ("SELECT * FROM \"Users\" WHERE user_id = 7", vec![], Shard(0)),
        ("SELECT * FROM public.users WHERE user_id = 7", vec![], Keys(USERS, vec![int(7)])),
        ("SELECT * FROM app.users u WHERE u.user_id = 7", vec![], Keys(USERS, vec![int(7)])),
        ("SELECT * FROM users u WHERE u.user_id = -5", vec![], Keys(USERS, vec![int(-5)])),
        ("SELECT * FROM users WHERE user_id = '42'::bigint", vec![], Keys(USERS, vec![int(42)])),
        ("SELECT * FROM users WHERE user_id = CAST($1 AS int8)", vec![text("9")], Keys(USERS, vec![int(9)])),
        ("SELECT * FROM users WHERE user_id = 9000000000", vec![], Keys(USERS, vec![int(9_000_000_000)])),
        ("SELECT * FROM users WHERE user_id = 5 AND name = 'x'", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users WHERE user_id = 5 AND user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users u WHERE u.user_id = 8 AND u.name = 'x'", vec![], Keys(USERS, vec![int(8)])),
        ("SELECT * FROM users WHERE user_id = 5 AND user_id = 6", vec![], Shard(0)),
        ("SELECT * FROM users WHERE user_id = 5 AND user_id IN (5, 6)", vec![], Keys(USERS, vec![int(5)])),
        ("UPDATE users SET name = 'y' WHERE user_id = $1", vec![text("11")], Keys(USERS, vec![int(11)])),
        ("DELETE FROM users WHERE user_id = $1 RETURNING *", vec![bin(&[0, 0, 0, 12])], Keys(USERS, vec![int(12)])),
        ("SELECT * FROM users WHERE user_id = '13'", vec![], Keys(USERS, vec![int(13)])),
        ("SELECT * FROM tenants t WHERE t.name = $1", vec![text("zed")], Shard(1)),
        // --- expressions that are not keys ---
        ("SELECT * FROM users WHERE user_id = 1+1", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id = other_col", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id::text = '5'", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE NOT (user_id = 5)", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id <> 5", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id = 5 OR name = 'x'", vec![], AllOf(USERS)),
        ("SELECT * FROM users", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id > 5", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id = 5.0", vec![], AllOf(USERS)),
        // --- IN, ANY, OR ---
        ("SELECT * FROM users WHERE user_id IN (1, 2, 3, 4, 5, 6, 7, 8)", vec![], Keys(USERS, (1..=8).map(int).collect())),
        ("SELECT * FROM users WHERE user_id = 1 OR user_id = 2", vec![], Keys(USERS, vec![int(1), int(2)])),
        ("SELECT * FROM users WHERE user_id = 3 OR user_id = 3", vec![], Keys(USERS, vec![int(3)])),
        ("SELECT * FROM users WHERE user_id = ANY('{10,20,30}')", vec![], Keys(USERS, vec![int(10), int(20), int(30)])),
        ("SELECT * FROM users WHERE user_id = ANY(ARRAY[10, 20])", vec![], Keys(USERS, vec![int(10), int(20)])),
        ("SELECT * FROM users WHERE user_id = ANY($1)", vec![text("{11,12,NULL}")], Keys(USERS, vec![int(11), int(12)])),
        ("SELECT * FROM users WHERE user_id = ANY($1::bigint[])", vec![text("{13}")], Keys(USERS, vec![int(13)])),
        ("SELECT * FROM users WHERE (user_id = 1 OR user_id = 2) AND user_id = 2", vec![], Keys(USERS, vec![int(2)])),
        // --- parameters ---
        ("SELECT * FROM users WHERE user_id = $1", vec![text("77")], Keys(USERS, vec![int(77)])),
        ("SELECT * FROM users WHERE user_id = $1", vec![bin(&[0, 77])], Keys(USERS, vec![int(77)])),
        ("SELECT * FROM users WHERE user_id = $1", vec![bin(&[0, 0, 0, 77])], Keys(USERS, vec![int(77)])),
        ("SELECT * FROM users WHERE user_id = $1", vec![bin(&[0, 0, 0, 0, 0, 0, 0, 77])], Keys(USERS, vec![int(77)])),
        ("SELECT * FROM users WHERE name = $1 AND user_id = $2", vec![text("x"), text("78")], Keys(USERS, vec![int(78)])),
        ("SELECT * FROM users WHERE user_id = $1", vec![NULL], Shard(0)),
        ("SELECT * FROM users WHERE user_id = $1", vec![text("abc")], Err("22P02", "invalid input syntax for type bigint")),
        ("SELECT * FROM users WHERE user_id = $1", vec![bin(&[1, 2, 3])], Err("22P03", "not a valid bigint")),
        ("SELECT * FROM users WHERE user_id = $1", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id = 'abc'", vec![], Err("22P02", "\"abc\"")),
        // --- range distribution ---
        ("SELECT * FROM accounts WHERE account_id = 1500", vec![], Shard(1)),
        ("SELECT * FROM accounts WHERE account_id BETWEEN 500 AND 1500", vec![], Multi(&[0, 1])),
        ("SELECT * FROM accounts WHERE account_id BETWEEN 1000 AND 1999", vec![], Shard(1)),
        ("SELECT * FROM accounts WHERE account_id >= 2000 AND account_id < 3000", vec![], Shard(2)),
        ("SELECT * FROM accounts WHERE account_id > 2500", vec![], Multi(&[2, 3])),
        ("SELECT * FROM accounts WHERE 999 >= account_id", vec![], Shard(0)),
        ("SELECT * FROM accounts WHERE account_id < 1000 OR account_id >= 3000", vec![], Multi(&[0, 3])),
        ("SELECT * FROM accounts WHERE account_id BETWEEN $1 AND $2", vec![text("2100"), text("2200")], Shard(2)),
        ("SELECT * FROM accounts WHERE account_id > 5 AND account_id < 3", vec![], Shard(0)),
        // --- text and uuid keys ---
        ("SELECT * FROM tenants WHERE name = 'acme'", vec![], Shard(0)),
        ("SELECT * FROM tenants WHERE name = 'zeta'", vec![], Shard(1)),
        ("SELECT * FROM tenants WHERE name IN ('acme', 'zeta')", vec![], Multi(&[0, 1])),
        ("SELECT * FROM tenants WHERE name = $1", vec![text("nova")], Shard(1)),
        ("SELECT * FROM tenants WHERE name = E'zeta'", vec![], Shard(1)),
        ("SELECT * FROM tenants WHERE name = E'acme'", vec![], Shard(0)),
        ("SELECT * FROM tenants WHERE name = 'ab'\n'zz'", vec![], Shard(0)),
        ("SELECT * FROM tenants WHERE name = 'zz'\n'ab'", vec![], Shard(1)),
        ("SELECT * FROM devices WHERE device_id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", vec![], Keys(DEVICES, vec![uuid_a()])),
        ("SELECT * FROM devices WHERE device_id = $1::uuid", vec![text(UUID_A)], Keys(DEVICES, vec![uuid_a()])),
        ("SELECT * FROM devices WHERE device_id = 'not-a-uuid'", vec![], Err("22P02", "uuid")),
        // --- joins ---
        ("SELECT * FROM users u JOIN orders o ON u.user_id = o.user_id WHERE u.user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users u JOIN orders o USING (user_id) WHERE o.user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users u, orders o WHERE u.user_id = o.user_id AND o.user_id = 6", vec![], Keys(USERS, vec![int(6)])),
        ("SELECT * FROM users u JOIN orders o ON u.user_id = o.user_id", vec![], AllOf(USERS)),
        ("SELECT * FROM users u LEFT JOIN orders o ON u.user_id = o.user_id WHERE u.user_id = 8", vec![], Keys(USERS, vec![int(8)])),
        ("SELECT * FROM users u JOIN orders o ON u.name = o.note", vec![], Err(UNSUPPORTED, "join of sharded tables users and orders across shards")),
        ("SELECT * FROM users u JOIN orders o ON u.user_id = o.user_id WHERE u.user_id = 5 AND o.user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users u JOIN countries c ON c.code = u.country WHERE u.user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users u JOIN countries c ON c.code = u.country", vec![], AllOf(USERS)),
        ("SELECT * FROM countries", vec![], Shard(0)),
        // user 2 hashes to a slot of s0 (hashint8extended), where account 5 also lives.
        ("SELECT * FROM users u JOIN accounts a ON a.owner = u.user_id WHERE u.user_id = 2 AND a.account_id = 5", vec![], Keys(USERS, vec![int(2)])),
        ("SELECT * FROM users u JOIN accounts a ON a.owner = u.user_id", vec![], Err(UNSUPPORTED, "different distributions")),
        ("SELECT * FROM accounts a JOIN settings s ON s.id = a.owner WHERE a.account_id = 1500", vec![], Err(UNSUPPORTED, "unsharded table settings")),
        ("SELECT * FROM accounts a JOIN settings s ON s.id = a.owner WHERE a.account_id = 5", vec![], Shard(0)),
        ("SELECT * FROM accounts a JOIN settings s ON s.id = a.owner", vec![], Err(UNSUPPORTED, "unsharded table settings")),
        // --- subqueries and CTEs ---
        ("SELECT * FROM (SELECT * FROM users WHERE user_id = 5) s", vec![], Keys(USERS, vec![int(5)])),
        ("WITH x AS (SELECT * FROM users WHERE user_id = 1) SELECT * FROM x", vec![], Keys(USERS, vec![int(1)])),
        ("WITH x AS (SELECT * FROM users) SELECT * FROM x", vec![], AllOf(USERS)),
        ("WITH x AS (SELECT count(*) FROM users) SELECT * FROM x", vec![], Err(UNSUPPORTED, "aggregate count()")),
        ("SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.user_id)", vec![], AllOf(USERS)),
        ("SELECT u.*, (SELECT count(*) FROM orders o WHERE o.user_id = u.user_id) FROM users u", vec![], AllOf(USERS)),
        ("SELECT * FROM users WHERE user_id IN (SELECT user_id FROM orders WHERE total > 5)", vec![], Err(UNSUPPORTED, "orders")),
        ("SELECT * FROM users WHERE user_id = 3 AND name IN (SELECT name FROM orders WHERE user_id = 3)", vec![], Keys(USERS, vec![int(3)])),
        ("SELECT * FROM settings WHERE id IN (SELECT user_id FROM users)", vec![], Err(UNSUPPORTED, "users")),
        ("SELECT (SELECT max(user_id) FROM users WHERE user_id = 4)", vec![], Keys(USERS, vec![int(4)])),
        // --- fan-out shapes that are refused ---
        ("SELECT * FROM users ORDER BY name", vec![], Err(UNSUPPORTED, "ORDER BY on a query that spans 4 shards")),
        ("SELECT * FROM users LIMIT 10", vec![], Err(UNSUPPORTED, "LIMIT")),
        ("SELECT * FROM users OFFSET 10", vec![], Err(UNSUPPORTED, "OFFSET")),
        ("SELECT * FROM users FETCH FIRST 3 ROWS ONLY", vec![], Err(UNSUPPORTED, "LIMIT")),
        ("SELECT count(*) FROM users", vec![], Err(UNSUPPORTED, "aggregate count()")),
        ("SELECT sum(balance) FROM accounts WHERE account_id IN (1, 1500)", vec![], Err(UNSUPPORTED, "aggregate sum() on a query that spans 2 shards")),
        ("SELECT name FROM users GROUP BY name", vec![], Err(UNSUPPORTED, "GROUP BY")),
        ("SELECT DISTINCT name FROM users", vec![], Err(UNSUPPORTED, "DISTINCT")),
        ("SELECT DISTINCT ON (name) * FROM users", vec![], Err(UNSUPPORTED, "DISTINCT ON")),
        ("SELECT rank() OVER (ORDER BY name) FROM users", vec![], Err(UNSUPPORTED, "window function rank()")),
        ("SELECT * FROM users UNION ALL SELECT * FROM users", vec![], Err(UNSUPPORTED, "UNION")),
        ("SELECT 1 FROM users HAVING true", vec![], Err(UNSUPPORTED, "HAVING")),
        ("SELECT COALESCE(max(user_id), 0) FROM users", vec![], Err(UNSUPPORTED, "aggregate max()")),
        // --- the same shapes on one shard are fine ---
        ("SELECT count(*) FROM users WHERE user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users WHERE user_id = 5 ORDER BY name LIMIT 1", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users WHERE user_id = 5 UNION SELECT * FROM users WHERE user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users WHERE user_id = 5 FOR UPDATE", vec![], Keys(USERS, vec![int(5)])),
        ("SELECT * FROM users FOR UPDATE", vec![], AllOf(USERS)),
        // --- INSERT ---
        ("INSERT INTO users (user_id, name) VALUES (5, 'a')", vec![], Keys(USERS, vec![int(5)])),
        ("INSERT INTO users (name, user_id) VALUES ($1, $2) RETURNING *", vec![text("a"), text("6")], Keys(USERS, vec![int(6)])),
        ("INSERT INTO users (user_id, name) VALUES (5, 'a'), (5, 'b')", vec![], Keys(USERS, vec![int(5)])),
        ("INSERT INTO accounts (account_id) VALUES (1), (2), (999)", vec![], Shard(0)),
        ("INSERT INTO accounts (account_id) VALUES (1), (2000)", vec![], Err(UNSUPPORTED, "multi-row INSERT into accounts with rows on shards s0, s2")),
        ("INSERT INTO users (name) VALUES ('a')", vec![], Err(UNSUPPORTED, "INSERT into sharded table users must give user_id")),
        ("INSERT INTO users VALUES (5, 'a')", vec![], Err(UNSUPPORTED, "without a column list")),
        ("INSERT INTO users (user_id) VALUES (NULL)", vec![], Err("23502", "null value in shard key column users.user_id")),
        ("INSERT INTO users (user_id) VALUES ($1)", vec![NULL], Shard(0)),
        ("INSERT INTO users (user_id) VALUES (DEFAULT)", vec![], Err(UNSUPPORTED, "DEFAULT")),
        ("INSERT INTO users (user_id) VALUES (nextval('s'))", vec![], Err(UNSUPPORTED, "constant or parameter")),
        ("INSERT INTO users (user_id) SELECT user_id FROM orders", vec![], Err(UNSUPPORTED, "INSERT … SELECT")),
        ("INSERT INTO users DEFAULT VALUES", vec![], Err(UNSUPPORTED, "without a column list")),
        ("INSERT INTO users (user_id, name) VALUES (5, 'a') ON CONFLICT (user_id) DO UPDATE SET name = excluded.name", vec![], Keys(USERS, vec![int(5)])),
        ("INSERT INTO users (user_id, name) VALUES (5, 'a') ON CONFLICT (name) DO UPDATE SET user_id = 6", vec![], Err(UNSUPPORTED, "UPDATE of shard key column users.user_id")),
        ("INSERT INTO users (user_id) VALUES ('x')", vec![], Err("22P02", "bigint")),
        ("INSERT INTO countries (code, name) VALUES ('de', 'Germany')", vec![], Replicated),
        ("INSERT INTO settings (id) VALUES (1)", vec![], Shard(0)),
        ("INSERT INTO tenants (name) VALUES ('zulu')", vec![], Shard(1)),
        // --- UPDATE / DELETE ---
        ("UPDATE users SET name = 'x' WHERE user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("UPDATE users SET name = 'x'", vec![], AllOf(USERS)),
        ("UPDATE users SET user_id = 6 WHERE user_id = 5", vec![], Err(UNSUPPORTED, "UPDATE of shard key column users.user_id")),
        ("UPDATE orders o SET total = 0 FROM users u WHERE u.user_id = o.user_id AND u.user_id = $1", vec![text("5")], Keys(USERS, vec![int(5)])),
        ("DELETE FROM users WHERE user_id = 5 RETURNING *", vec![], Keys(USERS, vec![int(5)])),
        ("DELETE FROM users WHERE name = 'x'", vec![], AllOf(USERS)),
        ("DELETE FROM accounts WHERE account_id >= 3000", vec![], Shard(3)),
        ("UPDATE countries SET name = 'x' WHERE code = 'de'", vec![], Replicated),
        ("DELETE FROM countries", vec![], Replicated),
        ("UPDATE countries SET name = 'x' WHERE code IN (SELECT country FROM users)", vec![], Err(UNSUPPORTED, "reference table countries reading sharded table users")),
        ("WITH d AS (DELETE FROM users WHERE user_id = 1 RETURNING *) SELECT * FROM d", vec![], Keys(USERS, vec![int(1)])),
        ("MERGE INTO users u USING src s ON u.user_id = s.id WHEN MATCHED THEN DELETE", vec![], Err(UNSUPPORTED, "MERGE into sharded table users")),
        // --- DDL and utilities ---
        ("CREATE TABLE users (user_id bigint primary key)", vec![], Replicated),
        ("CREATE TABLE widgets (id int)", vec![], Shard(0)),
        ("CREATE INDEX ON orders (total)", vec![], Replicated),
        ("ALTER TABLE users ADD COLUMN age int", vec![], Replicated),
        ("DROP TABLE users", vec![], Replicated),
        ("DROP TABLE IF EXISTS widgets", vec![], Shard(0)),
        ("TRUNCATE users, orders", vec![], Replicated),
        ("TRUNCATE countries", vec![], Replicated),
        ("COMMENT ON TABLE users IS 'people'", vec![], Replicated),
        ("GRANT SELECT ON users TO app", vec![], Replicated),
        ("VACUUM ANALYZE users", vec![], Replicated),
        ("CREATE VIEW v AS SELECT * FROM users", vec![], Err(UNSUPPORTED, "CREATE VIEW over sharded table users")),
        ("CREATE TABLE t2 AS SELECT * FROM users", vec![], Err(UNSUPPORTED, "CREATE TABLE AS")),
        ("SELECT * INTO t3 FROM users WHERE user_id = 1", vec![], Err(UNSUPPORTED, "SELECT INTO")),
        ("CREATE EXTENSION IF NOT EXISTS pgcrypto", vec![], Shard(0)),
        ("COPY users FROM STDIN", vec![], Err(UNSUPPORTED, "COPY of sharded table users")),
        ("COPY settings TO STDOUT", vec![], Shard(0)),
        ("COPY (SELECT * FROM users WHERE user_id = 5) TO STDOUT", vec![], Keys(USERS, vec![int(5)])),
        ("COPY (SELECT * FROM users) TO STDOUT", vec![], Err(UNSUPPORTED, "COPY of a statement spanning 4 shards")),
        ("PREPARE p AS SELECT 1", vec![], Err(UNSUPPORTED, "PREPARE")),
        ("EXECUTE p", vec![], Err(UNSUPPORTED, "EXECUTE")),
        ("DEALLOCATE p", vec![], Err(UNSUPPORTED, "DEALLOCATE")),
        ("LISTEN chan", vec![], Err(UNSUPPORTED, "LISTEN")),
        ("NOTIFY chan, 'x'", vec![], Err(UNSUPPORTED, "NOTIFY")),
        ("PREPARE TRANSACTION 'g1'", vec![], Err(UNSUPPORTED, "PREPARE TRANSACTION")),
        ("DO $$ BEGIN PERFORM 1; END $$", vec![], Shard(0)),
        ("CALL do_things(1)", vec![], Shard(0)),
        ("SHOW search_path", vec![], Shard(0)),
        ("EXPLAIN SELECT * FROM users WHERE user_id = 5", vec![], Keys(USERS, vec![int(5)])),
        ("EXPLAIN ANALYZE SELECT * FROM users", vec![], Err(UNSUPPORTED, "EXPLAIN of a statement spanning 4 shards")),
        // --- writes hidden in CTEs, opaque uses ---
        ("WITH i AS (INSERT INTO users (user_id) VALUES (1) RETURNING *) SELECT * FROM i", vec![], Err(UNSUPPORTED, "sharded table users used where the router cannot analyse it")),
        ("WITH i AS (INSERT INTO settings (id) VALUES (1) RETURNING *) SELECT * FROM i", vec![], Shard(0)),
        ("WITH u AS (UPDATE countries SET name = 'x' RETURNING *) SELECT * FROM u", vec![], Replicated),
        ("WITH u AS (UPDATE users SET user_id = 2 WHERE user_id = 1 RETURNING *) SELECT * FROM u", vec![], Err(UNSUPPORTED, "UPDATE of shard key column")),
        ("SELECT * FROM users u JOIN orders o ON u.user_id = o.user_id JOIN events e ON e.user_id = o.user_id WHERE e.user_id = 9", vec![], Keys(USERS, vec![int(9)])),
        ("SELECT * FROM users u JOIN orders o ON u.user_id = o.user_id WHERE u.user_id = 1 OR o.user_id = 2", vec![], AllOf(USERS)),
        ("SELECT * FROM accounts WHERE account_id IN (1, 2) OR account_id = 2999", vec![], Multi(&[0, 2])),
    ];
    let n = cases.len();
    for (sql, params, want) in cases {
        check(&r, sql, &params, want);
    }
    assert!(n >= 80, "only {n} cases");
}

#[test]
fn uncovered_key_is_an_error_not_a_panic() {
    let mut topo = topology();
    topo.distributions[ACCOUNTS].method = Method::Range {
        map: vec![range(Some(int(0)), Some(int(100)), 0)],
    };
    let r = Router::new(Arc::new(topo));
    check(
        &r,
        "SELECT * FROM accounts WHERE account_id = 500",
        &[],
        Err(
            "23514",
            "no placement of distribution \"accounts\" covers key 500",
        ),
    );
    check(
        &r,
        "INSERT INTO accounts (account_id) VALUES (-1)",
        &[],
        Err("23514", "covers key -1"),
    );
}

#[test]
fn binary_array_parameter() {
    // int8[] {21, 22}: ndim 1, no nulls, elem oid 20, dim (2, lbound 1), elements.
    let mut b = Vec::new();
    for v in [1i32, 0, 20, 2, 1] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    for v in [21i64, 22] {
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&v.to_be_bytes());
    }
    let b: &'static [u8] = Box::leak(b.into_boxed_slice());
    check(
        &router(),
        "SELECT * FROM users WHERE user_id = ANY($1)",
        &[bin(b)],
        Keys(USERS, vec![int(21), int(22)]),
    );
}

#[test]
fn statement_kinds() {
    let r = router();
    let kinds = |sql: &str| -> Vec<StatementKind> {
        r.plan(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .statements
            .iter()
            .map(|s| s.kind.clone())
            .collect()
    };
    use StatementKind as K;
    let set = |n: &str, local| K::Set {
        name: n.into(),
        local,
    };
    assert_eq!(
        kinds("BEGIN; INSERT INTO users (user_id) VALUES (1); COMMIT"),
        vec![K::Begin, K::Query, K::Commit]
    );
    assert_eq!(
        kinds("START TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        vec![K::Begin]
    );
    assert_eq!(kinds("END"), vec![K::Commit]);
    assert_eq!(kinds("COMMIT AND CHAIN"), vec![K::Commit]);
    assert_eq!(kinds("ABORT"), vec![K::Rollback]);
    assert_eq!(kinds("ROLLBACK"), vec![K::Rollback]);
    let sp = |op, name: &str| K::Savepoint {
        op,
        name: name.into(),
    };
    assert_eq!(
        kinds("SAVEPOINT a; RELEASE SAVEPOINT a; ROLLBACK TO SAVEPOINT \"B c\"; RELEASE A"),
        vec![
            sp(SavepointOp::Define, "a"),
            sp(SavepointOp::Release, "a"),
            sp(SavepointOp::RollbackTo, "B c"),
            sp(SavepointOp::Release, "a"),
        ]
    );
    assert_eq!(
        kinds("SET search_path = app"),
        vec![set("search_path", false)]
    );
    assert_eq!(
        kinds("SET SESSION Work_Mem TO '4MB'"),
        vec![set("work_mem", false)]
    );
    assert_eq!(
        kinds("SET LOCAL statement_timeout = 5"),
        vec![set("statement_timeout", true)]
    );
    assert_eq!(kinds("SET TIME ZONE 'UTC'"), vec![set("timezone", false)]);
    assert_eq!(
        kinds("SET NAMES 'UTF8'"),
        vec![set("client_encoding", false)]
    );
    assert_eq!(
        kinds("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
        vec![set("transaction", true)]
    );
    assert_eq!(
        kinds("RESET work_mem; RESET ALL"),
        vec![
            K::Reset {
                name: Some("work_mem".into())
            },
            K::Reset { name: None }
        ]
    );
    assert_eq!(
        kinds("DISCARD ALL; DISCARD PLANS; DEALLOCATE ALL"),
        vec![K::Discard, K::Discard, K::Discard]
    );
    assert_eq!(kinds("SHOW work_mem"), vec![K::Show]);
    assert_eq!(kinds("CREATE TABLE x (a int)"), vec![K::Other]);
    assert_eq!(kinds("PREPARE TRANSACTION 'x'"), vec![K::Commit]);
    assert_eq!(kinds(""), vec![]);
    assert_eq!(kinds("  ;  -- nothing\n"), vec![]);
}

#[test]
fn statement_texts_and_writes() {
    let r = router();
    let sql = "BEGIN; INSERT INTO users (user_id) VALUES (1);  SELECT * FROM users WHERE user_id = 1 ; COMMIT";
    let p = r.plan(sql).expect("plan");
    let texts: Vec<&str> = p.statements.iter().map(|s| s.text(sql)).collect();
    assert_eq!(
        texts,
        vec![
            "BEGIN",
            "INSERT INTO users (user_id) VALUES (1)",
            "SELECT * FROM users WHERE user_id = 1",
            "COMMIT"
        ]
    );
    let writes: Vec<bool> = p.statements.iter().map(|s| s.is_write()).collect();
    assert_eq!(writes, vec![false, true, false, false]);
    let w = |sql: &str| r.plan(sql).expect("plan").statements[0].is_write();
    assert!(w("SELECT * FROM users WHERE user_id = 1 FOR UPDATE"));
    assert!(w(
        "WITH d AS (DELETE FROM users WHERE user_id = 1 RETURNING *) SELECT * FROM d"
    ));
    assert!(w("CREATE INDEX ON users (name)"));
    assert!(w("UPDATE users SET name = 'x' WHERE user_id = 1"));
    assert!(!w("SELECT 1"));
    assert!(!w("SHOW work_mem"));
}

#[test]
fn syntax_error_has_position() {
    let r = router();
    let e = r
        .plan("SELECT * FROM users WHERE")
        .expect_err("syntax error");
    assert_eq!(e.sqlstate(), sqlstate::SYNTAX_ERROR);
    assert_eq!(e.position(), Some(26), "{e}");
    assert!(e.message().contains("syntax error"), "{e}");
    let e = r.plan("SELEC 1").expect_err("syntax error");
    assert_eq!(e.position(), Some(1));
    // Position counts characters, not bytes.
    // (`FRM` is an alias; the error is at `users`, character 16, byte 17.)
    let e = r.plan("SELECT 'é' FRM users").expect_err("syntax error");
    assert_eq!(e.position(), Some(16), "{e}");
    let e = r.plan("SELECT 1\0").expect_err("nul");
    assert_eq!(e.sqlstate(), sqlstate::SYNTAX_ERROR);
}

#[test]
fn cache_hits_share_plans_and_literals_stay_per_call() {
    let r = router();
    let topo = r.topology().clone();
    let twice = |sql: &str| (r.plan(sql).expect("plan"), r.plan(sql).expect("plan"));
    // A text without literals: the exact-text cache returns the very same plan.
    let (a, b) = twice("SELECT * FROM users WHERE user_id = $1");
    assert!(Arc::ptr_eq(&a, &b), "exact hit must return the same plan");
    // With literals, the text is found by its shape (even when repeated exactly).
    let (c, d) = twice("SELECT * FROM users WHERE user_id = 5");
    assert!(Arc::ptr_eq(&c.statements[0].shape, &d.statements[0].shape));

    // Through the normalized cache: same analysis, different values (a range
    // distribution, so the two keys are known to be on different shards).
    let sx = "SELECT * FROM accounts WHERE account_id = 5 AND name = 'a'";
    let sy = "SELECT * FROM accounts WHERE account_id = 2500 AND name = 'bb'";
    let px = r.plan(sx).expect("plan");
    let py = r.plan(sy).expect("plan");
    assert!(!Arc::ptr_eq(&px, &py));
    assert!(
        Arc::ptr_eq(&px.statements[0].shape, &py.statements[0].shape),
        "normalized hit must share the analysis"
    );
    let rx = px.statements[0].route(&topo, &[]).expect("route");
    let ry = py.statements[0].route(&topo, &[]).expect("route");
    assert_eq!(rx.route, Route::Shard(0));
    assert_eq!(ry.route, Route::Shard(2));
    // And for a hash distribution, whatever the hash: each text routes by its own key.
    let d = &topo.distributions[USERS];
    for k in [1i64, 300, 600, 900, 77_777] {
        let p = r
            .plan(&format!("SELECT * FROM users WHERE user_id = {k}"))
            .expect("plan");
        let got = p.statements[0].route(&topo, &[]).expect("route");
        assert_eq!(
            got.route,
            Route::Shard(d.shard_for(&int(k)).expect("placed"))
        );
    }

    // Statement texts follow literal length changes.
    let p1 = r
        .plan("SELECT 1; SELECT * FROM users WHERE user_id = 5; SELECT 'a'")
        .expect("plan");
    let sql2 = "SELECT 100; SELECT * FROM users WHERE user_id = 12345; SELECT 'abc'";
    let p2 = r.plan(sql2).expect("plan");
    assert!(Arc::ptr_eq(
        &p1.statements[1].shape,
        &p2.statements[1].shape
    ));
    let texts: Vec<&str> = p2.statements.iter().map(|s| s.text(sql2)).collect();
    assert_eq!(
        texts,
        vec![
            "SELECT 100",
            "SELECT * FROM users WHERE user_id = 12345",
            "SELECT 'abc'"
        ]
    );

    // Negative literals share with positive ones and keep their sign.
    let n1 = r
        .plan("SELECT * FROM accounts WHERE account_id = -5")
        .expect("plan");
    let n2 = r
        .plan("SELECT * FROM accounts WHERE account_id = -2500")
        .expect("plan");
    let route = |p: &QueryPlan| p.statements[0].route(&topo, &[]).expect("route").route;
    assert_eq!(route(&n1), Route::Shard(0));
    assert_eq!(route(&n2), Route::Shard(0));
    let n3 = r
        .plan("SELECT * FROM accounts WHERE account_id = - 2500")
        .expect("plan");
    assert_eq!(route(&n3), Route::Shard(0));
}

#[test]
fn reasons_name_table_key_slot_and_shard() {
    let r = router();
    let topo = r.topology().clone();
    let p = r
        .plan("SELECT * FROM users WHERE user_id = 42")
        .expect("plan");
    let got = p.statements[0].route(&topo, &[]).expect("route");
    let d = &topo.distributions[USERS];
    let slot = d.slot_of(&int(42)).expect("slot");
    let shard = d.shard_for(&int(42)).expect("shard");
    assert_eq!(
        got.reason,
        format!("users.user_id = 42 → slot {slot} → shard s{shard} (distribution users)")
    );
    let p = r.plan("SELECT * FROM users").expect("plan");
    let got = p.statements[0].route(&topo, &[]).expect("route");
    assert!(
        got.reason
            .starts_with("no shard key on users → all 4 shards"),
        "{}",
        got.reason
    );
    let p = r.plan("SELECT 1").expect("plan");
    let got = p.statements[0].route(&topo, &[]).expect("route");
    assert_eq!(got.reason, "no sharded table → default shard s0");
}

#[test]
fn odd_inputs_never_panic() {
    let r = router();
    let topo = r.topology().clone();
    let mut inputs: Vec<String> = [
        "", ";", ";;;", "'", "\"", "$$", "$1", "$0", "$99999999999", "--", "/*", "/* /* */",
        "SELECT", "SELECT $", "SELECT 'a'\n'b'", "SELECT E'\\''", "SELECT U&'\\0041'",
        "SELECT 1e", "SELECT .5", "SELECT 1_000", "SELECT 0x", "SELECT \u{1}",
        "SELECT * FROM users WHERE user_id = ANY('{{1,2},{3,4}}')",
        "SELECT * FROM users WHERE user_id = ANY('{\"1\",2')",
        "SELECT * FROM users WHERE user_id = ANY('not an array')",
        "SELECT * FROM users WHERE user_id IN ()", "SELECT * FROM users WHERE user_id = $0",
        "SELECT * FROM users u WHERE u.* = 1", "SELECT * FROM users WHERE users.user_id.x = 1",
        "SELECT * FROM a.b.c.users WHERE user_id = 1", "INSERT INTO users (user_id) VALUES ()",
        "INSERT INTO users (user_id, name) VALUES (1)", "WITH RECURSIVE t AS (SELECT 1 UNION ALL SELECT * FROM t) SELECT * FROM t",
        "SELECT * FROM users, LATERAL (SELECT * FROM orders WHERE orders.user_id = users.user_id) o",
        "SELECT * FROM users TABLESAMPLE SYSTEM (10)", "SELECT * FROM ROWS FROM (generate_series(1,3))",
        "SELECT xmlelement(name x, (SELECT name FROM users))", "SELECT * FROM users WHERE user_id = 1 COLLATE \"C\"",
        "SELECT * FROM users WHERE (user_id, name) = (1, 'x')", "SELECT * FROM users WHERE user_id = ANY(NULL)",
        "SELECT * FROM users WHERE user_id BETWEEN SYMMETRIC 5 AND 1", "SELECT * FROM accounts WHERE account_id BETWEEN 5 AND 1",
        "SELECT * FROM accounts WHERE account_id > $1", "SELECT * FROM tenants WHERE name > 'k' AND name < 'n'",
        "ALTER TABLE users RENAME TO people", "DROP INDEX users_name_idx", "CREATE TRIGGER t AFTER INSERT ON users EXECUTE FUNCTION f()",
        "CREATE POLICY p ON users USING (true)", "LOCK TABLE users", "CLUSTER users", "REINDEX TABLE users",
        "SECURITY LABEL ON TABLE users IS 'x'", "FETCH 5 FROM c", "DECLARE c CURSOR FOR SELECT * FROM users",
        "CHECKPOINT", "ANALYZE", "SELECT * FROM users WHERE user_id = 1; SELECT * FROM users WHERE",
        "EXPLAIN CREATE TABLE x AS SELECT 1", "COPY (SELECT 1) TO STDOUT", "COPY users (user_id) FROM STDIN WHERE user_id > 5",
        "MERGE INTO countries c USING (VALUES (1)) v(x) ON true WHEN NOT MATCHED THEN INSERT VALUES (1)",
        "UPDATE users SET (name, age) = (SELECT 'x', 1) WHERE user_id = 1",
        "SELECT * FROM users JOIN orders USING (user_id) JOIN events USING (user_id)",
        "SELECT * FROM users NATURAL JOIN orders", "SELECT * FROM users u FULL JOIN orders o ON u.user_id = o.user_id",
        "SELECT * FROM users WHERE user_id = 99999999999999999999999", "SELECT * FROM users WHERE user_id = -9223372036854775808",
        "SELECT * FROM devices WHERE device_id = ANY($1)", "SELECT * FROM tenants WHERE name = E'a\\'b'",
        "SELECT * FROM tenants WHERE name = 'a' 'b'", "SELECT * FROM tenants WHERE name = 'a'\n'b'",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Truncations of a long statement at every character.
    let long = "WITH x AS (SELECT * FROM users u JOIN orders o ON u.user_id = o.user_id WHERE u.user_id IN (1, $1, '3') AND o.note = 'it''s') SELECT * FROM x /* c */ -- d";
    for (i, _) in long.char_indices() {
        inputs.push(long[..i].to_owned());
    }
    let params = [
        text("1"),
        NULL,
        bin(&[0xff; 3]),
        text("{1,2}"),
        bin(&[0, 0, 0, 1]),
    ];
    for sql in &inputs {
        if let Ok(plan) = r.plan(sql) {
            for st in &plan.statements {
                for n in 0..=params.len() {
                    let _ = st.route(&topo, &params[..n]);
                }
                let _ = st.is_write();
            }
        }
    }
    assert!(inputs.len() > 200);
}

#[test]
fn opaque_uses_of_sharded_tables_are_refused() {
    // xmlelement's arguments are walked, but other exotic expression nodes are not:
    // the safety net must catch a sharded table inside one.
    let r = router();
    let topo = r.topology().clone();
    let p = r
        .plan("SELECT * FROM settings WHERE x = ANY(ARRAY(SELECT user_id FROM users))")
        .expect("plan");
    assert!(p.statements[0].route(&topo, &[]).is_err());
}

#[test]
#[ignore = "timing loop, run with --ignored --nocapture"]
fn cache_hit_cost() {
    let r = router();
    let topo = r.topology().clone();
    let sql = "SELECT id, name, email FROM users WHERE user_id = $1";
    let params = [text("12345")];
    r.plan(sql).expect("plan");
    let n = 200_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let p = r.plan(sql).expect("plan");
        std::hint::black_box(p.statements[0].route(&topo, &params).expect("route"));
    }
    let per = t.elapsed().as_nanos() / n;
    println!("exact cache hit + route: {per} ns/op");
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.plan(sql).expect("plan"));
    }
    println!(
        "exact cache hit alone: {} ns/op",
        t.elapsed().as_nanos() / n
    );
    let t = std::time::Instant::now();
    for i in 0..n {
        let s = format!("SELECT id FROM users WHERE user_id = {}", i % 50_000);
        std::hint::black_box(r.plan(&s).expect("plan"));
    }
    let per = t.elapsed().as_nanos() / n;
    println!("normalized/exact mix incl. format!: {per} ns/op");
}

#[test]
fn session_effects_are_seen_in_every_text_of_a_shape() {
    let r = router();
    let effects = |sql: &str| r.plan(sql).unwrap().statements[0].session_effects;
    assert!(!effects("SELECT * FROM users WHERE user_id = 1"));
    assert!(effects("SELECT set_config('a.b', 'c', false)"));
    assert!(effects("CREATE TEMP TABLE t (a int)"));
    // Both share the shape `DO <string>`: the second one's body creates a temp table.
    assert!(!effects("DO 'BEGIN PERFORM 1; END'"));
    assert!(effects("DO 'BEGIN CREATE TEMP TABLE t (a int); END'"));
    assert!(!effects("DO 'BEGIN PERFORM 2; END'"));
    // A literal that merely mentions a marker errs towards a reset; the next text of
    // the same shape without one does not inherit it.
    assert!(effects("SELECT * FROM users WHERE name = 'temp table'"));
    assert!(!effects("SELECT * FROM users WHERE name = 'bob'"));
}

#[test]
fn int4_digits_reads_digits_as_parse_does_and_nothing_else() {
    for s in [
        "0",
        "7",
        "007",
        "2147483647",
        "2147483648",
        "0000000000002147483647",
        "99999999999999999999",
        "",
        "+5",
        "-5",
        "4a",
        " 4",
        "4\u{0}",
    ] {
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let want = digits.then(|| s.parse::<i32>().ok()).flatten();
        assert_eq!(int4_digits(s.as_bytes()), want, "{s:?}");
    }
}

/// A point query's digits as a `String`.
fn digits_text(digits: &[u8]) -> String {
    String::from_utf8(digits.to_vec()).expect("ASCII digits")
}

#[test]
fn point_literal_binds_only_a_lone_integer_key_literal_of_a_select() {
    let r = router();
    let topo = topology();
    let users = &topo.distributions[USERS];
    // Before its shape is cached, a text is planned the long way.
    assert!(r
        .point_query(b"SELECT name FROM users WHERE user_id = 42")
        .is_none());
    let point = |sql: &str| {
        let plan = r.plan(sql).expect("plans");
        assert_eq!(plan.statements.len(), 1, "{sql}");
        let planned = plan.statements[0]
            .point_literal(&topo)
            .map(|(s, b, v)| (s, b.sql.clone(), v.to_owned()));
        // Once the shape is cached, the proxy's fast path gives the same answer.
        let fast = r
            .point_query(sql.as_bytes())
            .map(|p| (p.shard, p.bound.sql.clone(), digits_text(p.value)));
        assert_eq!(fast, planned, "point_query: {sql}");
        planned
    };
    let home = |k: i64| users.shard_for(&int(k)).expect("covered");
    // Twice each: the second plan comes from the shape cache, as later texts do.
    for _ in 0..2 {
        assert_eq!(
            point("SELECT name FROM users WHERE user_id = 42;"),
            Some((
                home(42),
                "SELECT name FROM users WHERE user_id = $1".into(),
                "42".into()
            ))
        );
        assert_eq!(
            point("  select * from users u where u.user_id=7 for update "),
            Some((
                home(7),
                "select * from users u where u.user_id=$1 for update".into(),
                "7".into()
            ))
        );
    }
    // Same shape, other literal: the same statement with this text's value.
    let (s, bound, v) = point("SELECT name FROM users WHERE user_id = 2147483647").expect("bound");
    assert_eq!(
        (s, bound.as_str(), v.as_str()),
        (
            home(2147483647),
            "SELECT name FROM users WHERE user_id = $1",
            "2147483647"
        )
    );
    for sql in [
        // Shares the shape, but is not an int4 literal in PostgreSQL: run as text.
        "SELECT name FROM users WHERE user_id = 2147483648",
        "SELECT name FROM users WHERE user_id = 42.0",
        "SELECT name FROM users WHERE user_id = 1e3",
        // Not a lone integer key literal of a plain SELECT.
        "SELECT name FROM users WHERE user_id = -5",
        "SELECT name FROM users WHERE user_id = '5'",
        "SELECT name FROM users WHERE user_id = 5 AND name = 'x'",
        "SELECT name FROM users WHERE user_id = $1 AND created_at > now() - interval '1 day'",
        "SELECT name, 1 FROM users WHERE user_id = $1",
        "SELECT name FROM users WHERE user_id = $1 LIMIT 5",
        "SELECT name FROM users WHERE name = $1 AND user_id = 5 OR user_id = 6",
        "SELECT name FROM users WHERE created_at > $1 AND user_id = 5",
        "SELECT name FROM countries WHERE code = 5",
        "SELECT name FROM users WHERE user_id > 5",
        "EXPLAIN SELECT name FROM users WHERE user_id = 5",
        "SELECT name INTO TEMP t FROM users WHERE user_id = 5",
        "UPDATE users SET name = 'x' WHERE user_id = 5",
        "DELETE FROM users WHERE user_id = 5",
        "SELECT $$a$$ FROM users WHERE user_id = 5",
        "SELECT count(*) FROM users WHERE user_id = 5 GROUP BY 1",
    ] {
        assert_eq!(point(sql), None, "{sql}");
    }
    // A point SELECT among other statements is not one (each runs in the string's
    // implicit transaction).
    for sql in [
        "SELECT name FROM users WHERE user_id = 5; SELECT name FROM users WHERE user_id = $1",
        "SET x = DEFAULT; SELECT name FROM users WHERE user_id = 5",
    ] {
        assert_eq!(r.plan(sql).expect("plans").statements.len(), 2, "{sql}");
        assert!(r.point_query(sql.as_bytes()).is_none(), "{sql}");
    }
}

/// The point path's shard is the one routing the statement gives, for every key type a
/// number literal can pin (`BoundForm::shard_for` reads int keys itself).
#[test]
fn point_literal_routes_as_the_statement_does_for_every_key_type() {
    // users' key as bigint (the test topology's) and as int.
    let mut as_int = topology();
    as_int.distributions[USERS].key_type = KeyType::Int;
    for topo in [topology(), as_int] {
        point_literals_route_as_their_statements(topo);
    }
}

fn point_literals_route_as_their_statements(topo: Topology) {
    let r = Router::new(Arc::new(topo.clone()));
    let mut bound = 0;
    for (table, column) in [
        ("users", "user_id"),
        ("accounts", "account_id"),
        ("tenants", "name"),
        ("devices", "device_id"),
    ] {
        for value in ["0", "7", "007", "999", "1000", "2999", "3000", "2147483647"] {
            let sql = format!("SELECT * FROM {table} WHERE {column} = {value}");
            let plan = r.plan(&sql).expect("plans");
            let stmt = &plan.statements[0];
            let Some((shard, _, v)) = stmt.point_literal(&topo) else {
                continue;
            };
            bound += 1;
            assert_eq!(v, value);
            let routed = stmt.route(&topo, &[]).expect("routes");
            assert_eq!(routed.route, Route::Shard(shard), "{sql}");
        }
    }
    // users, accounts and tenants (the digits as text) bind; a uuid has no number.
    assert_eq!(bound, 24);
}

/// `point_query` takes a Query's bytes before they are checked (see `normalize_into`):
/// only bytes that a checked text with the same shape has can match, so a text that is
/// not UTF-8 or holds a NUL always goes the long way (where PostgreSQL's errors are).
#[test]
fn point_query_matches_no_text_that_is_not_utf8_or_holds_a_nul() {
    let r = router();
    let sql = "SELECT name FROM users WHERE user_id = 42 /* cafe */";
    r.plan(sql).expect("plans");
    let hit = |b: &[u8]| r.point_query(b).map(|p| digits_text(p.value));
    assert_eq!(hit(sql.as_bytes()), Some("42".into()));
    assert_eq!(
        hit(b"SELECT name FROM users WHERE user_id = 7 /* cafe */"),
        Some("7".into())
    );
    for bad in [
        // Half a character, a lone continuation byte, a byte never in UTF-8.
        &b"SELECT name FROM users WHERE user_id = 7 /* caf\xc3 */"[..],
        b"SELECT name FROM users WHERE user_id = 7 /* caf\xa9 */",
        b"SELECT name FROM users WHERE user_id = 7 /* caf\xff */",
        // A NUL in the comment, after the literal, and in place of a space.
        b"SELECT name FROM users WHERE user_id = 7 /* caf\0 */",
        b"SELECT name FROM users WHERE user_id = 7\0/* cafe */",
        b"SELECT name FROM users WHERE user_id =\x007 /* cafe */",
    ] {
        assert_eq!(hit(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}

/// `point_query_memo` answers every text as `point_query` does while the shapes are
/// cached, whatever the memo holds: texts of the memo's shape with other literals,
/// texts that differ from it anywhere else, and texts no checked text has the key of.
/// (A shape evicted from the cache stays known to the memo: its analysis still holds.)
#[test]
fn point_query_memo_answers_as_point_query_does() {
    let r = Arc::new(router());
    let shapes = [
        "SELECT name FROM users WHERE user_id = 42",
        "SELECT name FROM users WHERE user_id = 42;",
        "  select * from users u where u.user_id=7 for update ",
        "SELECT name FROM users WHERE user_id = 42 /* cafe */",
        "SELECT name FROM users WHERE user_id = 42 -- c\n",
        "SELECT name FROM users WHERE user_id = 42 ORDER BY name",
        "SELECT name FROM users WHERE user_id = 42 ",
        // Tokens that end right at the literal, or start right after it.
        "SELECT name FROM users WHERE user_id =/*c*/42",
        "SELECT name FROM users WHERE user_id = 42/*c*/",
        "SELECT name FROM users WHERE user_id = 42--c",
        "SELECT name FROM users WHERE user_id =42;",
        "SELECT name FROM users WHERE user_id = 42 ORDER BY e",
        "SELECT U&\"name\" FROM users WHERE user_id = 42",
        "SELECT $$x$$, name FROM users WHERE user_id = 42",
        "SELECT E'\\'', name FROM users WHERE user_id = 42",
        // Not point queries: the memo stays as it was.
        "SELECT name FROM users WHERE user_id > 42",
        "SELECT name FROM users WHERE user_id = 42 AND name = E'\\''",
    ];
    let mut texts: Vec<Vec<u8>> = Vec::new();
    for shape in shapes {
        r.plan(shape).expect("plans");
        let norm = lexer::normalize(shape).expect("lexes");
        let lit = norm.lits[0];
        let (prefix, suffix) = (&shape.as_bytes()[..lit.start], &shape.as_bytes()[lit.end..]);
        let with = |pre: &[u8], lit: &[u8], suf: &[u8]| [pre, lit, suf].concat();
        for lit in [
            &b"5"[..],
            b"2147483647",
            b"2147483648",
            b"99999999999999999999",
            b"007",
            b"0",
            b"",
            b"4a",
            b"4.5",
            b".5",
            b"4e3",
            b"4e+3",
            b"-4",
            b"4 ",
            b" 4",
            b"$1",
            b"'4'",
            b"4\0",
            b"\xff",
        ] {
            texts.push(with(prefix, lit, suffix));
        }
        // The same literal, other bytes around it.
        for (pre, suf) in [
            (&prefix[1..], suffix),
            (prefix, &suffix[suffix.len().min(1)..]),
            (&prefix[..prefix.len() - 1], suffix),
        ] {
            texts.push(with(pre, b"43", suf));
        }
        texts.push(with(prefix, b"43", &[suffix, b"x"].concat()));
        texts.push(with(prefix, b"43", &[suffix, b"\0"].concat()));
        texts.push(with(prefix, b"43", &[suffix, b" OR user_id = 5"].concat()));
        texts.push(with(&[b"\xff", prefix].concat(), b"43", suffix));
        // Shorter than the memo's text around its literal (prefix and suffix overlap).
        texts.push(prefix.to_vec());
    }
    let long = |sql: &[u8]| {
        r.point_query(sql)
            .map(|p| (p.shard, p.bound.sql.clone(), p.value.to_owned()))
    };
    let mut hits = 0;
    for first in &texts {
        for then in &texts {
            let mut memo = PointMemo::default();
            let seen = r
                .point_query_memo(first, &mut memo)
                .map(|p| p.value.to_owned());
            assert_eq!(seen, long(first).map(|p| p.2));
            let got = r
                .point_query_memo(then, &mut memo)
                .map(|p| (p.shard, p.bound.sql.clone(), p.value.to_owned()));
            let want = long(then);
            hits += usize::from(want.is_some());
            assert_eq!(
                got,
                want,
                "after {:?}: {:?}",
                String::from_utf8_lossy(first),
                String::from_utf8_lossy(then)
            );
        }
    }
    assert!(hits > 1000, "{hits} point queries among the pairs");
}

/// A point query longer than `POINT_MEMO_MAX` is answered but not kept (a memo lives as
/// long as its session); the memo keeps the last one that fits.
#[test]
fn point_query_memo_keeps_no_long_text() {
    let r = Arc::new(router());
    r.plan("SELECT name FROM users WHERE user_id = 1")
        .expect("plans");
    let long = format!(
        "SELECT name FROM users WHERE user_id = 7 /* {} */",
        "x".repeat(POINT_MEMO_MAX)
    );
    r.plan(&long).expect("plans");
    let mut memo = PointMemo::default();
    let short = b"SELECT name FROM users WHERE user_id = 5";
    assert!(r.point_query_memo(short, &mut memo).is_some());
    let p = r
        .point_query_memo(long.as_bytes(), &mut memo)
        .expect("a point query");
    assert_eq!(p.value, b"7");
    assert_eq!(memo.text, short, "the long text is not kept");
    assert!(memo.text.capacity() < POINT_MEMO_MAX);
}

/// The memo answers on its own (the cache emptied, it still knows the shape), and only
/// for the router that made it.
#[test]
fn point_query_memo_is_used_and_only_by_its_router() {
    let sql = b"SELECT name FROM users WHERE user_id = 42";
    let (a, b) = (Arc::new(router()), Arc::new(router()));
    for r in [&a, &b] {
        r.plan("SELECT name FROM users WHERE user_id = 1")
            .expect("plans");
    }
    let mut memo = PointMemo::default();
    assert!(a.point_query_memo(sql, &mut memo).is_some());
    a.with_cache(0, |_| {}); // another version: the cache is emptied
    assert!(a.point_query(sql).is_none(), "the cache was emptied");
    let p = a
        .point_query_memo(b"SELECT name FROM users WHERE user_id = 9", &mut memo)
        .expect("known by the memo");
    assert_eq!(p.value, b"9");
    b.with_cache(0, |_| {}); // (b's too: only the memo could answer)
    assert!(b.point_query_memo(sql, &mut memo).is_none(), "a's memo");
    // Nor does a router made after `a` is gone (the memo keeps `a`'s address taken),
    // whose cache is empty as `b`'s.
    a.plan("SELECT name FROM users WHERE user_id = 1")
        .expect("plans");
    let mut memo = PointMemo::default();
    assert!(a.point_query_memo(sql, &mut memo).is_some());
    drop(a);
    for _ in 0..100 {
        let c = Arc::new(router());
        assert!(c.point_query_memo(sql, &mut memo).is_none(), "a's memo");
    }
}

#[test]
fn point_literal_keeps_texts_that_read_themselves_or_hold_odd_spaces_as_text() {
    let r = router();
    let topo = topology();
    for sql in [
        // A no-break space is part of the identifier `name\u{a0}` for PostgreSQL.
        "SELECT name FROM users WHERE user_id = 5 ORDER BY name\u{a0}",
        "SELECT name, 'é' FROM users WHERE user_id = 5",
        "SELECT current_query(), name FROM users WHERE user_id = 5",
        "SELECT (SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()) FROM users WHERE user_id = 5",
    ] {
        let plan = r.plan(sql).expect("plans");
        assert!(plan.statements[0].point_literal(&topo).is_none(), "{sql}");
    }
    // Trimming stops at SQL whitespace: the statement keeps its no-break space.
    let sql = " SELECT name\u{a0}\n;\t";
    assert_eq!(statement_text(sql, 0, sql.len()), "SELECT name\u{a0}");
}

#[test]
fn a_number_cast_to_a_text_key_routes_by_its_value_not_its_spelling() {
    // tenants hash-distributed, so that spellings of one number land apart.
    let mut topo = topology();
    topo.distributions[TENANTS].method = Method::Hash {
        slots: 1024,
        map: slots4(),
    };
    let dist = topo.distributions[TENANTS].clone();
    let shard = |k: &str| dist.shard_for(&KeyValue::Text(k.into())).expect("covered");
    let n = (1..1000)
        .find(|n| shard(&n.to_string()) != shard(&format!("00{n}")))
        .expect("a number whose spellings hash apart");
    let topo = Arc::new(topo);
    let r = Router::new(topo.clone());
    for (sql, key) in [
        (
            format!("SELECT * FROM tenants WHERE name = 00{n}::text"),
            n.to_string(),
        ),
        (
            format!("SELECT * FROM tenants WHERE name = {n}::text"),
            n.to_string(),
        ),
        (
            format!("SELECT * FROM tenants WHERE name = (-00{n})::text"),
            format!("-{n}"),
        ),
        (
            "SELECT * FROM tenants WHERE name = 000::text".to_string(),
            "0".to_string(),
        ),
        (
            format!("INSERT INTO tenants (name) VALUES (00{n})"),
            n.to_string(),
        ),
    ] {
        // Twice: the fast path on the cached plan as well.
        for _ in 0..2 {
            let plan = r.plan(&sql).expect("plans");
            let routed = plan.statements[0].route_quiet(&topo, &[]).expect("routes");
            assert_eq!(routed.route, Route::Shard(shard(&key)), "{sql}");
        }
    }
    // A number whose text depends on its type, or a cast that changes the value
    // (`'abcdef'::varchar(3)` is 'abc'): every shard decides.
    for sql in [
        "SELECT * FROM tenants WHERE name = 1.50::text",
        "SELECT * FROM tenants WHERE name = 'abcdef'::varchar(3)",
        "SELECT * FROM tenants WHERE name = 'abcdef'::char(3)",
    ] {
        let plan = r.plan(sql).expect("plans");
        let routed = plan.statements[0].route_quiet(&topo, &[]).expect("routes");
        assert!(
            matches!(routed.route, Route::Multi { .. }),
            "{sql}: {:?}",
            routed.route
        );
    }
}

#[test]
fn a_parameter_key_is_read_by_the_topology_it_was_found_under_only() {
    let sql = "SELECT name FROM users WHERE user_id = $1";
    let plan = router().plan(sql).expect("plans");
    let stmt = &plan.statements[0];
    let a = Arc::new(topology());
    // The same tables with users placed by the accounts ranges: another shard for 2500.
    let mut moved = topology();
    for t in ["users", "orders", "events"] {
        moved.tables.get_mut(t).expect("sharded").distribution = ACCOUNTS;
    }
    let b = Arc::new(moved);
    let key = text("2500");
    let on = |topo: &Topology| {
        let dist = &topo.distributions[topo.table("users").expect("sharded").distribution];
        Route::Shard(dist.shard_for(&int(2500)).expect("placed"))
    };
    assert_ne!(on(&a), on(&b), "the test needs a key placed apart");
    for _ in 0..2 {
        for topo in [&a, &b] {
            let routed = stmt.route_quiet(topo, &[key]).expect("routes");
            assert_eq!(routed.route, on(topo));
            assert_eq!(
                routed.route,
                stmt.route(topo, &[key]).expect("routes").route
            );
        }
    }
    // Nor does a topology made after `a` is gone (the plan keeps `a`'s address taken),
    // though it is a new allocation of the same size: with users unsharded, such a
    // topology sends the key to the default shard, which `a`'s distribution does not.
    let mut unsharded = topology();
    unsharded.tables.clear();
    unsharded.default_shard = (0..4)
        .find(|s| Route::Shard(*s) != on(&a))
        .expect("another shard");
    drop(a);
    for _ in 0..100 {
        let c = Arc::new(unsharded.clone());
        let routed = stmt.route_quiet(&c, &[key]).expect("routes");
        assert_eq!(routed.route, Route::Shard(c.default_shard));
        assert_eq!(routed.route, stmt.route(&c, &[key]).expect("routes").route);
    }
    let a2 = Arc::new(topology());
    // The key is the parameter the statement names, not the first one.
    let users = &b.distributions[USERS];
    let v = (6..1000)
        .find(|v| users.shard_for(&int(*v)) != users.shard_for(&int(5)))
        .expect("keys placed apart");
    let second = router()
        .plan("SELECT name FROM users WHERE user_id = $2 AND name = $1")
        .expect("plans");
    let v_text = v.to_string();
    let params = [
        text("5"),
        Param {
            value: Some(v_text.as_bytes()),
            ..text("")
        },
    ];
    for _ in 0..2 {
        let routed = second.statements[0]
            .route_quiet(&a2, &params)
            .expect("routes");
        assert_eq!(
            routed.route,
            Route::Shard(users.shard_for(&int(v)).expect("placed"))
        );
    }
    // A NULL or a value that is no key is routed the long way.
    let b_plan = router().plan(sql).expect("plans");
    for p in [Param::NULL, text("x")] {
        let quiet = b_plan.statements[0].route_quiet(&b, &[p]);
        let full = b_plan.statements[0].route(&b, &[p]);
        assert_eq!(
            quiet.map(|r| r.route).map_err(|e| e.sqlstate().to_owned()),
            full.map(|r| r.route).map_err(|e| e.sqlstate().to_owned())
        );
    }
}
