//! Unit tests of parsing and validation: every rejection, its message and its line.

use super::*;
use crate::topology::build::{build, summary};
use crate::topology::{KeyValue, Method};

/// A small valid config; tests break it with `replace`.
const BASE: &str = r#"# test config
listen: 127.0.0.1:7432
database: app
users:
  - { name: app, password: app-secret }
  - name: admin
    password: admin-secret
    admin: true
shards:
  - { name: s0, host: 127.0.0.1, port: 5433, database: app, user: app, password: pw }
  - { name: s1, host: 127.0.0.1, port: 5434, database: app, user: app, password: pw }
default_shard: s0
distributions:
  - name: users
    key_type: bigint
    method: hash
    slots: 1024
    placement:
      - { slots: 0-511, shard: s0 }
      - { slots: 512-1023, shard: s1 }
  - name: accounts
    key_type: bigint
    method: range
    placement:
      - { to: 1000, shard: s0 }
      - { from: 1000, shard: s1 }
tables:
  - { name: users, column: user_id, distribution: users }
  - { name: orders, column: user_id, distribution: users }
  - { name: accounts, column: account_id, distribution: accounts }
reference_tables: [countries]
"#;

/// `BASE` with `from` replaced by `to` (which must occur exactly once).
fn edit(from: &str, to: &str) -> String {
    assert_eq!(
        BASE.matches(from).count(),
        1,
        "`{from}` must occur once in BASE"
    );
    BASE.replacen(from, to, 1)
}

/// All errors of a config text (parse errors, else validation errors).
fn errors(src: &str) -> Vec<ConfigError> {
    match Config::from_yaml(src) {
        Err(errs) => errs,
        Ok(cfg) => cfg.validate().err().unwrap_or_default(),
    }
}

/// The single error of `src`, which must contain `path` and `needle`.
fn only_error(src: &str, path: &str, needle: &str) -> ConfigError {
    let errs = errors(src);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let e = errs.into_iter().next().expect("one error");
    assert_eq!(e.path, path, "{e}");
    assert!(e.message.contains(needle), "`{needle}` not in: {e}");
    e
}

/// 1-based line of the line that is exactly `text`.
fn line_eq(src: &str, text: &str) -> usize {
    let hits: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == text)
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "`{text}` must be exactly one line");
    hits[0]
}

/// 1-based line of the only line containing `needle`.
fn line_of(src: &str, needle: &str) -> usize {
    let hits: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "`{needle}` must be on exactly one line");
    hits[0]
}

#[test]
fn base_is_valid_and_defaults_apply() {
    let cfg = Config::from_yaml(BASE).expect("parses");
    cfg.validate().expect("valid");
    assert_eq!(cfg.listen, "127.0.0.1:7432");
    assert_eq!(cfg.http, None);
    assert_eq!(cfg.pool, PoolConfig::default());
    assert_eq!(cfg.pool.size, 20);
    assert_eq!(cfg.pool.connect_timeout_ms, 3000);
    assert_eq!(cfg.pool.checkout_timeout_ms, 5000);
    assert_eq!(cfg.pool.mode, PoolMode::Transaction);
    assert_eq!(cfg.pool.max_message_bytes, 1_073_741_824);
    assert!(!cfg.users[0].admin);
    assert!(cfg.users[1].admin);

    let minimal = edit("listen: 127.0.0.1:7432\n", "");
    let cfg = Config::from_yaml(&minimal).expect("parses");
    assert_eq!(cfg.listen, DEFAULT_LISTEN);
}

#[test]
fn pool_keys_are_read() {
    let src = edit(
        "default_shard: s0\n",
        "default_shard: s0\npool: { size: 5, connect_timeout_ms: 10, checkout_timeout_ms: 20, \
         mode: session, max_message_bytes: 65536 }\n",
    );
    let cfg = Config::from_yaml(&src).expect("parses");
    cfg.validate().expect("valid");
    assert_eq!(
        cfg.pool,
        PoolConfig {
            size: 5,
            connect_timeout_ms: 10,
            checkout_timeout_ms: 20,
            mode: PoolMode::Session,
            max_message_bytes: 65536,
            reuse_unnamed_statements: true,
            prepare_point_queries: true,
        }
    );
    let bad = edit(
        "default_shard: s0\n",
        "default_shard: s0\npool: { mode: statement }\n",
    );
    let e = only_error(&bad, "pool.mode", "unknown variant `statement`");
    assert_eq!(e.line, Some(line_of(&bad, "statement")));
    let bad = edit(
        "default_shard: s0\n",
        "default_shard: s0\npool: { size: 0, max_message_bytes: 10 }\n",
    );
    let errs = errors(&bad);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(errs[0].path, "pool.size");
    assert_eq!(errs[1].path, "pool.max_message_bytes");
}

#[test]
fn round_trip_through_yaml() {
    let cfg = Config::from_yaml(BASE).expect("parses");
    let text = cfg.to_yaml().expect("serializes");
    let again = Config::from_yaml(&text).expect("re-parses");
    again.validate().expect("still valid");
    assert_eq!(
        Config {
            source: String::new(),
            ..cfg
        },
        Config {
            source: String::new(),
            ..again
        }
    );
}

#[test]
fn repo_configs_are_valid_and_build() {
    for (name, src, first_port) in [
        (
            "shard-config.yaml",
            include_str!("../../shard-config.yaml"),
            5433,
        ),
        (
            "tests/shard-config.test.yaml",
            include_str!("../../tests/shard-config.test.yaml"),
            25433,
        ),
    ] {
        let cfg = Config::from_yaml(src).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let topo = build(&cfg).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(topo.shards.len(), 4, "{name}");
        for (i, s) in topo.shards.iter().enumerate() {
            assert_eq!(s.name, format!("s{i}"));
            assert_eq!(u32::from(s.port), first_port + i as u32);
            assert_eq!((s.database.as_str(), s.user.as_str()), ("app", "app"));
            assert_eq!(s.password, "app-secret");
        }
        assert_eq!(cfg.database, "app");
        assert_eq!(cfg.users.len(), 2);
        assert!(cfg.users.iter().any(|u| u.name == "admin" && u.admin));
        let users = &topo.distributions[0];
        let Method::Hash { slots, map } = &users.method else {
            panic!("users is hash")
        };
        assert_eq!(*slots, 1024);
        let spans: Vec<(u32, u32, usize)> =
            map.iter().map(|r| (r.first, r.last, r.shard)).collect();
        assert_eq!(
            spans,
            [(0, 255, 0), (256, 511, 1), (512, 767, 2), (768, 1023, 3)]
        );
        let accounts = &topo.distributions[1];
        for (key, shard) in [
            (i64::MIN, 0),
            (999_999, 0),
            (1_000_000, 1),
            (2_999_999, 2),
            (3_000_000, 3),
            (i64::MAX, 3),
        ] {
            assert_eq!(accounts.shard_for(&KeyValue::Int(key)), Ok(shard), "{key}");
        }
        for t in ["users", "orders", "events"] {
            assert_eq!(topo.table(t).map(|t| t.distribution), Some(0), "{t}");
        }
        assert_eq!(
            topo.table("accounts").map(|t| t.column.as_str()),
            Some("account_id")
        );
        assert!(topo.is_reference("countries"));
        assert_eq!(topo.default_shard, 0);
        assert_eq!(topo.version, 1);
    }
    let main = Config::from_yaml(include_str!("../../shard-config.yaml")).expect("parses");
    assert_eq!(main.listen, "127.0.0.1:6432");
    assert_eq!(main.http.as_deref(), Some("127.0.0.1:9930"));
    let test = Config::from_yaml(include_str!("../../tests/shard-config.test.yaml")).expect("ok");
    assert_eq!(test.listen, "127.0.0.1:26432");
}

#[test]
fn summary_names_everything() {
    let topo = build(&Config::from_yaml(BASE).expect("parses")).expect("builds");
    let text = summary(&topo);
    for needle in [
        "s0  127.0.0.1:5433/app",
        "s1  127.0.0.1:5434/app",
        "distribution users (key bigint, hash, 1024 slots)",
        "0-511  -> s0",
        "512-1023  -> s1",
        "distribution accounts (key bigint, range)",
        "(-inf, 1000)  -> s0",
        "[1000, +inf)  -> s1",
        "orders    by user_id  (distribution users)",
        "accounts  by account_id  (distribution accounts)",
        "reference tables: countries",
        "default shard: s0",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
}

#[test]
fn every_unknown_key_is_reported_with_its_line() {
    let src = edit("database: app\n", "database: app\ndatabse: x\n")
        .replace("port: 5434, database", "port: 5434, hots: h, database")
        .replace("    admin: true\n", "    admin: true\n    admni: false\n")
        .replace(
            "{ slots: 512-1023, shard: s1 }",
            "{ slots: 512-1023, shrad: s1 }",
        );
    let errs = errors(&src);
    let got: Vec<(&str, Option<usize>)> = errs.iter().map(|e| (e.path.as_str(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("databse", Some(line_of(&src, "databse"))),
            ("users[1].admni", Some(line_of(&src, "admni"))),
            ("shards[1].hots", Some(line_of(&src, "hots"))),
            (
                "distributions[0].placement[1].shrad",
                Some(line_of(&src, "shrad"))
            ),
        ]
    );
    assert!(errs[0]
        .message
        .contains("unknown key `databse` (did you mean `database`?)"));
    assert!(errs[2]
        .message
        .contains("expected one of: name, host, port"));
    // The column points at the key itself.
    let hots = &errs[2];
    let line = src.lines().nth(line_of(&src, "hots") - 1).expect("line");
    assert_eq!(hots.column, line.find("hots").map(|c| c + 1));
}

#[test]
fn overlapping_slots() {
    let src = edit(
        "{ slots: 512-1023, shard: s1 }",
        "{ slots: 500-1023, shard: s1 }",
    );
    let e = only_error(
        &src,
        "distributions[0].placement[1].slots",
        "slots 500-1023 overlap 0-511",
    );
    assert_eq!(e.line, Some(line_of(&src, "500-1023")));
    let line = src
        .lines()
        .nth(line_of(&src, "500-1023") - 1)
        .expect("line");
    assert_eq!(e.column, line.find("500").map(|c| c + 1));
    assert_eq!(
        e.to_string(),
        format!(
            "distributions[0].placement[1].slots: slots 500-1023 overlap 0-511 \
             (placement[0], shard s0) (line {}, column {})",
            e.line.expect("line"),
            e.column.expect("column")
        )
    );
}

#[test]
fn uncovered_slots_are_named() {
    let src = edit(
        "      - { slots: 512-1023, shard: s1 }\n",
        "      - { slots: 600-700, shard: s1 }\n      - { slots: 1023, shard: s1 }\n",
    );
    let e = only_error(
        &src,
        "distributions[0].placement",
        "slots 512-599, 701-1022 are not placed on any shard",
    );
    assert_eq!(e.line, Some(line_of(&src, "0-511")));
}

#[test]
fn slots_outside_the_slot_count() {
    let src = edit(
        "{ slots: 512-1023, shard: s1 }",
        "{ slots: 512-1024, shard: s1 }",
    );
    let e = only_error(
        &src,
        "distributions[0].placement[1].slots",
        "slots 512-1024 are outside 0-1023 (the distribution has 1024 slots)",
    );
    assert_eq!(e.line, Some(line_of(&src, "512-1024")));
}

#[test]
fn zero_slots_and_bad_slot_specs() {
    let src = edit("    slots: 1024\n", "    slots: 0\n");
    let e = only_error(&src, "distributions[0].slots", "slots must be at least 1");
    assert_eq!(e.line, Some(line_eq(&src, "    slots: 0")));

    let src = edit("{ slots: 0-511, shard: s0 }", "{ slots: 511-0, shard: s0 }");
    only_error(&src, "distributions[0].placement[0].slots", "backwards");
    let src = edit(
        "{ slots: 0-511, shard: s0 }",
        "{ slots: zero-511, shard: s0 }",
    );
    only_error(
        &src,
        "distributions[0].placement[0].slots",
        "`zero-511` is not a slot interval",
    );
}

#[test]
fn hash_needs_slots_and_range_must_not_have_them() {
    let src = edit("    slots: 1024\n", "");
    let e = only_error(&src, "distributions[0]", "needs `slots`");
    assert_eq!(e.line, Some(line_eq(&src, "  - name: users")));

    let src = edit("    method: range\n", "    method: range\n    slots: 16\n");
    let e = only_error(
        &src,
        "distributions[1].slots",
        "only for hash distributions",
    );
    assert_eq!(e.line, Some(line_of(&src, "slots: 16")));

    let src = edit(
        "{ to: 1000, shard: s0 }",
        "{ to: 1000, slots: 1, shard: s0 }",
    );
    only_error(
        &src,
        "distributions[1].placement[0].slots",
        "range placements use `from`/`to`",
    );
    let src = edit(
        "{ slots: 0-511, shard: s0 }",
        "{ slots: 0-511, to: 5, shard: s0 }",
    );
    only_error(
        &src,
        "distributions[0].placement[0].to",
        "`to` is for range distributions",
    );
    let src = edit("{ slots: 0-511, shard: s0 }", "{ shard: s0 }");
    let errs = errors(&src);
    assert_eq!(errs[0].path, "distributions[0].placement[0]", "{errs:#?}");
    assert!(errs[0].message.contains("missing `slots`"));
}

#[test]
fn range_overlap_gap_and_open_ends() {
    // Overlap.
    let src = edit("{ from: 1000, shard: s1 }", "{ from: 900, shard: s1 }");
    let e = only_error(
        &src,
        "distributions[1].placement[1]",
        "range [900, +inf) overlaps placement[0] (shard s0), which reaches 1000",
    );
    assert_eq!(e.line, Some(line_of(&src, "from: 900")));

    // Gap.
    let src = edit("{ from: 1000, shard: s1 }", "{ from: 2000, shard: s1 }");
    let e = only_error(
        &src,
        "distributions[1].placement[1]",
        "keys [1000, 2000) are not placed on any shard",
    );
    assert_eq!(e.line, Some(line_of(&src, "from: 2000")));

    // Lowest range bounded below.
    let src = edit(
        "{ to: 1000, shard: s0 }",
        "{ from: 0, to: 1000, shard: s0 }",
    );
    let e = only_error(
        &src,
        "distributions[1].placement[0]",
        "keys below 0 are not placed on any shard",
    );
    assert_eq!(e.line, Some(line_of(&src, "from: 0,")));

    // Highest range bounded above.
    let src = edit(
        "{ from: 1000, shard: s1 }",
        "{ from: 1000, to: 5000, shard: s1 }",
    );
    only_error(
        &src,
        "distributions[1].placement[1]",
        "keys from 5000 up are not placed on any shard",
    );

    // Two unbounded-below ranges overlap.
    let src = edit("{ from: 1000, shard: s1 }", "{ to: 2000, shard: s1 }");
    let errs = errors(&src);
    assert!(
        errs.iter()
            .any(|e| e.message.contains("overlaps placement[0]")),
        "{errs:#?}"
    );

    // Placement order in the file does not matter.
    let src = edit(
        "      - { to: 1000, shard: s0 }\n      - { from: 1000, shard: s1 }\n",
        "      - { from: 1000, shard: s1 }\n      - { to: 1000, shard: s0 }\n",
    );
    assert_eq!(errors(&src), []);
}

#[test]
fn range_bounds_are_checked() {
    let src = edit("{ to: 1000, shard: s0 }", "{ from: 5, to: 5, shard: s0 }");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0]
        .message
        .contains("empty range: from 5 is not below to 5"));

    let src = edit("{ from: 1000, shard: s1 }", "{ from: ten, shard: s1 }");
    let e = only_error(
        &src,
        "distributions[1].placement[1].from",
        "\"ten\" is not a valid bigint value",
    );
    assert_eq!(e.line, Some(line_of(&src, "from: ten")));

    // Integer bounds may also be strings.
    let src = edit("{ from: 1000, shard: s1 }", "{ from: \"1000\", shard: s1 }");
    assert_eq!(errors(&src), []);

    // int keys must fit in 32 bits.
    let src = edit(
        "    key_type: bigint\n    method: range",
        "    key_type: int\n    method: range",
    )
    .replace("{ to: 1000, shard: s0 }", "{ to: 3000000000, shard: s0 }")
    .replace(
        "{ from: 1000, shard: s1 }",
        "{ from: 3000000000, shard: s1 }",
    );
    let errs = errors(&src);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0]
        .message
        .contains("3000000000 is not a valid int value"));
}

#[test]
fn text_and_uuid_ranges() {
    let src = edit(
        "    key_type: bigint\n    method: range",
        "    key_type: text\n    method: range",
    )
    .replace("{ to: 1000, shard: s0 }", "{ to: \"m\", shard: s0 }")
    .replace("{ from: 1000, shard: s1 }", "{ from: \"m\", shard: s1 }");
    let topo = build(&Config::from_yaml(&src).expect("parses")).expect("builds");
    let d = &topo.distributions[1];
    assert_eq!(d.shard_for(&KeyValue::Text("apple".into())), Ok(0));
    assert_eq!(d.shard_for(&KeyValue::Text("m".into())), Ok(1));

    // A YAML number is not a text bound.
    let bad = src.replace("{ to: \"m\", shard: s0 }", "{ to: 5, shard: s0 }");
    let bad = bad.replace("{ from: \"m\", shard: s1 }", "{ from: \"5\", shard: s1 }");
    only_error(
        &bad,
        "distributions[1].placement[0].to",
        "write it as a quoted string",
    );

    let uuid = edit(
        "    key_type: bigint\n    method: range",
        "    key_type: uuid\n    method: range",
    )
    .replace(
        "{ to: 1000, shard: s0 }",
        "{ to: \"80000000-0000-0000-0000-000000000000\", shard: s0 }",
    )
    .replace(
        "{ from: 1000, shard: s1 }",
        "{ from: \"80000000-0000-0000-0000-000000000000\", shard: s1 }",
    );
    build(&Config::from_yaml(&uuid).expect("parses")).expect("builds");
    let bad = uuid.replacen("80000000-0000", "8000-0000", 1);
    only_error(
        &bad,
        "distributions[1].placement[0].to",
        "is not a valid uuid value",
    );
}

#[test]
fn unknown_shards_are_rejected() {
    let src = edit(
        "{ slots: 512-1023, shard: s1 }",
        "{ slots: 512-1023, shard: s7 }",
    );
    let e = only_error(
        &src,
        "distributions[0].placement[1].shard",
        "unknown shard `s7`; the shards are: s0, s1",
    );
    assert_eq!(e.line, Some(line_of(&src, "s7")));

    let src = edit("default_shard: s0", "default_shard: main");
    let e = only_error(&src, "default_shard", "unknown shard `main`");
    assert_eq!(e.line, Some(line_of(&src, "default_shard")));
}

#[test]
fn duplicate_shards_and_users() {
    let src = edit("{ name: s1, host", "{ name: s0, host");
    let errs = errors(&src);
    let e = errs
        .iter()
        .find(|e| e.path == "shards[1].name")
        .unwrap_or_else(|| panic!("{errs:#?}"));
    assert!(e
        .message
        .contains("duplicate shard name `s0` (also shards[0])"));
    assert_eq!(e.line, Some(line_of(&src, "port: 5434")));

    let src = edit("  - name: admin\n", "  - name: app\n");
    let e = only_error(
        &src,
        "users[1].name",
        "duplicate user name `app` (also users[0])",
    );
    assert_eq!(e.line, Some(line_of(&src, "  - name: app")));
}

#[test]
fn tables_duplicates_references_and_folding() {
    let src = edit(
        "  - { name: orders, column: user_id, distribution: users }",
        "  - { name: Users, column: user_id, distribution: users }",
    );
    let e = only_error(
        &src,
        "tables[1].name",
        "duplicate table `users` (also tables[0])",
    );
    assert_eq!(e.line, Some(line_of(&src, "name: Users")));

    let src = edit(
        "reference_tables: [countries]",
        "reference_tables: [countries, orders]",
    );
    let e = only_error(
        &src,
        "reference_tables[1]",
        "duplicate table `orders` (also tables[1]); a table is either sharded or a reference table",
    );
    assert_eq!(e.line, Some(line_of(&src, "reference_tables")));

    let src = edit("distribution: accounts }", "distribution: acounts }");
    only_error(
        &src,
        "tables[2].distribution",
        "unknown distribution `acounts`; the distributions are: users, accounts",
    );

    // Quoted names keep their case and are distinct from the folded ones.
    let src = edit(
        "  - { name: orders, column: user_id, distribution: users }",
        "  - { name: '\"Users\"', column: '\"UserId\"', distribution: users }\n  \
         - { name: ORDERS, column: USER_ID, distribution: users }",
    );
    let topo = build(&Config::from_yaml(&src).expect("parses")).expect("builds");
    assert_eq!(
        topo.table("Users").map(|t| t.column.as_str()),
        Some("UserId")
    );
    assert_eq!(
        topo.table("orders").map(|t| t.column.as_str()),
        Some("user_id")
    );
    assert!(topo.table("ORDERS").is_none());

    let src = edit(
        "reference_tables: [countries]",
        "reference_tables: [public.countries]",
    );
    only_error(&src, "reference_tables[0]", "schema-qualified");
}

#[test]
fn identifier_folding() {
    assert_eq!(fold_identifier("Users"), Ok("users".into()));
    assert_eq!(fold_identifier("user_id$2"), Ok("user_id$2".into()));
    assert_eq!(fold_identifier("\"Users\""), Ok("Users".into()));
    assert_eq!(fold_identifier("\"a\"\"b\""), Ok("a\"b".into()));
    assert_eq!(fold_identifier("\"my table\""), Ok("my table".into()));
    assert_eq!(
        fold_identifier("ÄPFEL"),
        Ok("Äpfel".into()),
        "ASCII-only folding"
    );
    for bad in [
        "", "\"\"", "\"open", "\"a\"b\"", "my table", "1abc", "a.b", "a-b",
    ] {
        assert!(fold_identifier(bad).is_err(), "{bad}");
    }
}

#[test]
fn bad_key_type_and_method() {
    let src = edit(
        "    key_type: bigint\n    method: hash",
        "    key_type: bigint8\n    method: hash",
    );
    let e = only_error(
        &src,
        "distributions[0].key_type",
        "unknown key_type `bigint8`; expected bigint, int, text or uuid",
    );
    assert_eq!(e.line, Some(line_of(&src, "bigint8")));

    let src = edit("    method: hash", "    method: consistent");
    let e = only_error(
        &src,
        "distributions[0].method",
        "unknown method `consistent`; expected hash or range",
    );
    assert_eq!(e.line, Some(line_of(&src, "consistent")));
}

#[test]
fn empty_users_and_shards() {
    let src = r#"database: app
users: []
shards: []
default_shard: s0
"#;
    let errs = errors(src);
    let got: Vec<(&str, &str, Option<usize>)> = errs
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str(), e.line))
        .collect();
    assert_eq!(
        got,
        [
            ("users", "at least one user is needed", Some(2)),
            ("shards", "at least one shard is needed", Some(3)),
        ]
    );
}

#[test]
fn port_zero_and_bad_addresses() {
    let src = edit("port: 5434", "port: 0");
    let e = only_error(&src, "shards[1].port", "port 0 is not a valid port");
    assert_eq!(e.line, Some(line_of(&src, "port: 0")));

    let src = edit("listen: 127.0.0.1:7432", "listen: 127.0.0.1");
    only_error(&src, "listen", "is not a host:port address");
    let src = edit("database: app\n", "database: app\nhttp: localhost:0\n");
    only_error(&src, "http", "is not a host:port address");
}

#[test]
fn syntax_and_type_errors_carry_positions() {
    let src = edit("port: 5434", "port: many");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].path, "shards[1].port");
    assert!(errs[0].message.contains("invalid type"), "{}", errs[0]);
    assert_eq!(errs[0].line, Some(line_of(&src, "port: many")));

    let src = edit("default_shard: s0\n", "default_shard: [s0\n");
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].line.is_some(), "{}", errs[0]);

    let src = edit("default_shard: s0\n", "");
    let errs = errors(&src);
    assert!(
        errs[0].message.contains("missing field `default_shard`"),
        "{errs:#?}"
    );
}

#[test]
fn scram_verifiers_are_checked() {
    let good = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$\
                AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:\
                AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let src = edit("password: app-secret }", &format!("password: '{good}' }}"));
    assert_eq!(errors(&src), []);
    let src = edit(
        "password: app-secret }",
        "password: 'SCRAM-SHA-256$4096:abc' }",
    );
    only_error(&src, "users[0].password", "malformed SCRAM verifier");
}

#[test]
fn all_problems_are_reported_together_in_file_order() {
    let src = edit("port: 5434", "port: 0")
        .replace(
            "{ slots: 512-1023, shard: s1 }",
            "{ slots: 500-1023, shard: s9 }",
        )
        .replace("default_shard: s0", "default_shard: nope")
        .replace("reference_tables: [countries]", "reference_tables: [users]");
    let errs = errors(&src);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "shards[1].port",
            "default_shard",
            "distributions[0].placement[1].slots",
            "distributions[0].placement[1].shard",
            "reference_tables[0]",
        ]
    );
    assert!(errs.windows(2).all(|w| w[0].line <= w[1].line));
}

#[test]
fn locate_finds_block_and_flow_nodes() {
    let p = KeyPath::root();
    let at = |path: &KeyPath| path.locate(BASE).map(|(l, _)| l);
    assert_eq!(at(&p.key("database")), Some(3));
    assert_eq!(at(&p.key("users").index(1)), Some(6));
    assert_eq!(at(&p.key("users").index(1).key("admin")), Some(8));
    assert_eq!(at(&p.key("shards").index(1).key("port")), Some(11));
    let slots = p.key("distributions").index(0).key("placement").index(1);
    assert_eq!(at(&slots), Some(line_of(BASE, "512-1023")));
    assert_eq!(at(&p.key("reference_tables").index(0)), Some(31));
    // Absent nodes fall back to their closest ancestor.
    assert_eq!(at(&p.key("distributions").index(1).key("slots")), Some(21));
    // (the root mapping starts at its first key, after the comment line)
    assert_eq!(at(&p.key("nothing")), Some(2));
    assert_eq!(
        p.key("distributions")
            .index(0)
            .key("placement")
            .index(1)
            .to_string(),
        "distributions[0].placement[1]"
    );
}

#[test]
fn configs_built_in_code_validate_without_positions() {
    let mut cfg = Config::from_yaml(BASE).expect("parses");
    cfg.source.clear();
    cfg.shards[0].port = 0;
    let errs = cfg.validate().expect_err("invalid");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, None);
    assert_eq!(
        errs[0].to_string(),
        "shards[0].port: port 0 is not a valid port"
    );
}
