//! PostgreSQL's extended hash functions with seed, reproduced bit-for-bit.
//!
//! STUB: to be replaced by the real implementation.

/// `hashint8extended(v, seed)`.
pub fn hashint8extended(v: i64, seed: u64) -> i64 {
    let _ = seed;
    v
}

/// `hashtextextended(s, seed)` for a deterministic-collation text value (bytes as stored).
pub fn hashtextextended(s: &[u8], seed: u64) -> i64 {
    let _ = seed;
    s.len() as i64
}

/// `uuid_hash_extended(u, seed)`.
pub fn uuid_hash_extended(u: &[u8; 16], seed: u64) -> i64 {
    let _ = seed;
    u[0] as i64
}
