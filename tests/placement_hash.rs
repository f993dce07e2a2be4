//! Placement hashes computed in Rust must equal what a live PostgreSQL shard computes.
//!
//! Connects to `SHARDWIRE_TEST_SHARD` (libpq-style conninfo; default: the project's first
//! test shard) and compares, for every key type, `shardwire::topology::hash` against the
//! server's `hashint8extended` / `hashtextextended` / `uuid_hash_extended`, and the slot
//! from `slot_for_hash` against the SQL slot expression. An unreachable server is a test
//! failure, never a skip: the project's test script starts the shards first.

use shardwire::topology::hash::{hashint8extended, hashtextextended, uuid_hash_extended};
use shardwire::topology::{slot_for_hash, KeyValue};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

const DEFAULT_SHARD: &str = "host=127.0.0.1 port=25433 user=app password=app-secret dbname=app";
const SLOTS: u32 = 1024;

/// SplitMix64: a tiny deterministic PRNG so the key set is the same on every run.
struct Prng(u64);

impl Prng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

async fn connect() -> Client {
    let conninfo = std::env::var("SHARDWIRE_TEST_SHARD").unwrap_or_else(|_| DEFAULT_SHARD.into());
    let (client, connection) = match tokio_postgres::connect(&conninfo, NoTls).await {
        Ok(c) => c,
        Err(e) => {
            // tokio-postgres' own message is terse ("error connecting to server"); the
            // cause (refused, timed out, bad password) is in the source chain.
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            panic!(
                "cannot connect to the PostgreSQL test shard `{conninfo}` ({e}{cause}); start \
                 the shards (the project's test script does) or point SHARDWIRE_TEST_SHARD at \
                 a PostgreSQL 15"
            )
        }
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("test shard connection error: {e}");
        }
    });
    // Text keys are hashed as UTF-8 bytes; a server in another encoding would store (and
    // hash) different bytes, so it cannot be the reference.
    let enc: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .expect("SHOW server_encoding")
        .get(0);
    assert!(
        enc == "UTF8" || enc == "SQL_ASCII",
        "test shard must use UTF8 encoding, has {enc}"
    );
    client
}

/// Integer keys: edge values around every boundary the int8 fold cares about, then random.
fn int_keys() -> Vec<i64> {
    let mut keys = vec![0, 1, -1, 2, -2, 42, -42, 1024, -1024, 1023, -1025];
    for p in [15, 16, 31, 32, 53, 62] {
        let v = 1i64 << p;
        keys.extend([v, -v, v - 1, -(v - 1), v + 1, -(v + 1)]);
    }
    keys.extend([i64::MIN, i64::MAX, i64::MIN + 1, i64::MAX - 1]);
    keys.extend([i64::from(i32::MIN), i64::from(i32::MAX)]);
    keys.extend([i64::from(i16::MIN), i64::from(i16::MAX)]);
    let mut rng = Prng(0x5eed_0001);
    while keys.len() < 1200 {
        let r = rng.next_u64() as i64;
        // Mix full-width values with small and int4-sized ones.
        keys.push(match keys.len() % 3 {
            0 => r,
            1 => r >> 32,
            _ => r >> 48,
        });
    }
    keys
}

/// Text keys: every length 0..=40 (all lookup3 tail cases, with and without full blocks),
/// non-ASCII, long strings, and random mixtures of 1- to 4-byte UTF-8 characters.
fn text_keys() -> Vec<String> {
    let mut keys: Vec<String> = vec![
        String::new(),
        "a".into(),
        "hello".into(),
        "é".into(),
        "café".into(),
        "日本語".into(),
        "🦀".into(),
        "emoji 🦀🚀 mix é 日本".into(),
        " leading and trailing ".into(),
        "x".repeat(1000),
        "日本語".repeat(100),
    ];
    for len in 0..=40 {
        keys.push(
            (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect(),
        );
    }
    let alphabet: Vec<char> = "abcXYZ019 -_/éüßçñ€日本語中文한국🦀🚀😀".chars().collect();
    let mut rng = Prng(0x5eed_0002);
    while keys.len() < 1200 {
        let chars = rng.below(41);
        keys.push(
            (0..chars)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect(),
        );
    }
    keys
}

fn uuid_keys() -> Vec<Uuid> {
    let mut keys = vec![Uuid::nil(), Uuid::max()];
    keys.push(Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").expect("uuid literal"));
    let mut rng = Prng(0x5eed_0003);
    while keys.len() < 1200 {
        let hi = rng.next_u64().to_be_bytes();
        let lo = rng.next_u64().to_be_bytes();
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi);
        b[8..].copy_from_slice(&lo);
        keys.push(Uuid::from_bytes(b));
    }
    keys
}

/// Runs `SELECT h, slot FROM unnest($1) ...` with the given hash expression over `u.k`,
/// keeping input order, and returns `(hash, slot)` per key.
async fn server_hashes<T>(
    client: &Client,
    array_type: &str,
    hash_expr: &str,
    keys: &[T],
    seed: i64,
) -> Vec<(i64, i64)>
where
    T: tokio_postgres::types::ToSql + Sync,
{
    let sql = format!(
        "SELECT h, ((h % {SLOTS}) + {SLOTS}) % {SLOTS} FROM \
         (SELECT {hash_expr} AS h, i FROM unnest($1::{array_type}) WITH ORDINALITY AS u(k, i)) s \
         ORDER BY i"
    );
    let rows = client
        .query(&sql, &[&keys, &seed])
        .await
        .unwrap_or_else(|e| panic!("query `{sql}` failed: {e}"));
    assert_eq!(rows.len(), keys.len(), "one row per key from `{sql}`");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Compares one key's Rust hash (and slot, for seed 0) with the server's.
fn check(what: &str, key: &dyn std::fmt::Debug, seed: i64, rust: i64, server: (i64, i64)) {
    assert_eq!(
        rust, server.0,
        "{what} hash of {key:?} with seed {seed}: rust {rust}, server {}",
        server.0
    );
    let slot = i64::from(slot_for_hash(rust, SLOTS));
    assert_eq!(
        slot, server.1,
        "{what} slot of {key:?}: rust {slot}, server {}",
        server.1
    );
}

/// Seeds to compare: 0 (the placement seed) and a few that exercise the seeded path,
/// including ones with the top bit set (negative as int8).
const SEEDS: [i64; 4] = [0, 1, 42, -0x0123_4567_89ab_cdef];

#[tokio::test]
async fn int8_hash_matches_server() {
    let client = connect().await;
    let keys = int_keys();
    for seed in SEEDS {
        let server = server_hashes(&client, "int8[]", "hashint8extended(k, $2)", &keys, seed).await;
        for (k, s) in keys.iter().zip(server) {
            check("int8", k, seed, hashint8extended(*k, seed as u64), s);
        }
    }
    eprintln!("int8: compared {} keys x {} seeds", keys.len(), SEEDS.len());
}

#[tokio::test]
async fn text_hash_matches_server() {
    let client = connect().await;
    let keys = text_keys();
    for seed in SEEDS {
        let server = server_hashes(&client, "text[]", "hashtextextended(k, $2)", &keys, seed).await;
        for (k, s) in keys.iter().zip(server) {
            check(
                "text",
                k,
                seed,
                hashtextextended(k.as_bytes(), seed as u64),
                s,
            );
        }
    }
    eprintln!("text: compared {} keys x {} seeds", keys.len(), SEEDS.len());
}

#[tokio::test]
async fn uuid_hash_matches_server() {
    let client = connect().await;
    let keys = uuid_keys();
    for seed in SEEDS {
        let server =
            server_hashes(&client, "uuid[]", "uuid_hash_extended(k, $2)", &keys, seed).await;
        for (k, s) in keys.iter().zip(server) {
            check(
                "uuid",
                k,
                seed,
                uuid_hash_extended(k.as_bytes(), seed as u64),
                s,
            );
        }
    }
    eprintln!("uuid: compared {} keys x {} seeds", keys.len(), SEEDS.len());
}

/// `KeyValue::placement_hash` of an integer must equal the server's hash of the same number
/// as int2, int4 and int8 (PostgreSQL designed the three to agree).
#[tokio::test]
async fn integer_widths_agree_via_key_value() {
    let client = connect().await;
    let keys = int_keys();
    let int8: Vec<i64> = keys.clone();
    let int4: Vec<i32> = keys.iter().filter_map(|&k| i32::try_from(k).ok()).collect();
    let int2: Vec<i16> = keys.iter().filter_map(|&k| i16::try_from(k).ok()).collect();
    assert!(
        int4.len() >= 300 && int2.len() >= 100,
        "too few narrow keys"
    );

    let h8 = server_hashes(&client, "int8[]", "hashint8extended(k, $2)", &int8, 0).await;
    for (k, s) in int8.iter().zip(h8) {
        check("int8 key", k, 0, KeyValue::Int(*k).placement_hash(), s);
    }
    let h4 = server_hashes(&client, "int4[]", "hashint4extended(k, $2)", &int4, 0).await;
    for (k, s) in int4.iter().zip(h4) {
        check(
            "int4 key",
            k,
            0,
            KeyValue::Int(i64::from(*k)).placement_hash(),
            s,
        );
    }
    let h2 = server_hashes(&client, "int2[]", "hashint2extended(k, $2)", &int2, 0).await;
    for (k, s) in int2.iter().zip(h2) {
        check(
            "int2 key",
            k,
            0,
            KeyValue::Int(i64::from(*k)).placement_hash(),
            s,
        );
    }
    eprintln!(
        "KeyValue: compared {} int8, {} int4, {} int2 keys",
        int8.len(),
        int4.len(),
        int2.len()
    );
}

/// Text and uuid keys through `KeyValue` as well, so the public entry point is covered.
#[tokio::test]
async fn text_and_uuid_agree_via_key_value() {
    let client = connect().await;
    let texts = text_keys();
    let server = server_hashes(&client, "text[]", "hashtextextended(k, $2)", &texts, 0).await;
    for (k, s) in texts.iter().zip(server) {
        check(
            "text key",
            k,
            0,
            KeyValue::Text(k.clone()).placement_hash(),
            s,
        );
    }
    let uuids = uuid_keys();
    let server = server_hashes(&client, "uuid[]", "uuid_hash_extended(k, $2)", &uuids, 0).await;
    for (k, s) in uuids.iter().zip(server) {
        check(
            "uuid key",
            k,
            0,
            KeyValue::Uuid(*k.as_bytes()).placement_hash(),
            s,
        );
    }
}
