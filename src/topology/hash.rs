//! PostgreSQL's extended hash functions with seed, reproduced bit-for-bit.
//!
//! PostgreSQL (11 and later, checked against 15) hashes with Bob Jenkins' 2006 "lookup3"
//! function, adapted to take a 64-bit seed and to return 64 bits: the final `b` word in the
//! high half and the final `c` word in the low half. SQL shows that `uint64` as an `int8`,
//! which is why the public functions here return `i64` (a plain bit reinterpretation).
//!
//! Placement hashes (see DESIGN.md, "Placement functions, exactly") must equal what a shard
//! computes for `hashint8extended(col, 0)` and friends, so that a shard's `WHERE` clause and
//! a publication row filter select exactly the keys the router sends to it.
//!
//! Byte order: PostgreSQL's lookup3 has four code paths (aligned/unaligned source data ×
//! little/big-endian). On a little-endian machine (x86_64, aarch64), which is where our
//! shards run, the aligned and unaligned paths produce the same result: every 4-byte group
//! is read as a little-endian `u32`, and the last 0..=11 bytes are added as if zero-padded,
//! except that the third tail word is shifted left by 8 because the lowest byte of `c` is
//! "reserved for the length". That single behaviour is implemented here, independent of
//! the byte order of the machine running shardwire.

/// Initial value of the lookup3 state words before the key length is added
/// (the golden ratio constant plus PostgreSQL's fixed offset 3923095).
const INIT: u32 = 0x9e37_79b9_u32.wrapping_add(3_923_095);

/// The three 32-bit words of lookup3's internal state.
struct State {
    a: u32,
    b: u32,
    c: u32,
}

impl State {
    /// Set up the state for a key of `len` bytes, perturbed by `seed`.
    ///
    /// With `seed == 0` the state is exactly that of the unseeded 32-bit hash (so seed 0
    /// means "no seed", not "a seed of zero"). Otherwise the seed is treated like an extra
    /// 12-byte block hashed first: high half into `a`, low half into `b`, nothing into `c`,
    /// followed by one `mix`.
    fn new(len: u32, seed: u64) -> State {
        let init = INIT.wrapping_add(len);
        let mut s = State {
            a: init,
            b: init,
            c: init,
        };
        if seed != 0 {
            // Truncating casts are intended: they split the seed into its two halves.
            s.a = s.a.wrapping_add((seed >> 32) as u32);
            s.b = s.b.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    /// lookup3 `mix()`: reversibly mix the three words (between 12-byte blocks).
    fn mix(&mut self) {
        let State { a, b, c } = self;
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);

        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);

        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);

        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);

        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);

        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// lookup3 `final()`: final avalanche of the three words into `c` (and `b`).
    fn final_mix(&mut self) {
        let State { a, b, c } = self;
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
    }

    /// The 64-bit result: `b` in the high half, `c` in the low half.
    fn result(&self) -> u64 {
        (u64::from(self.b) << 32) | u64::from(self.c)
    }
}

/// Little-endian `u32` from the 4 bytes at `w[i..i + 4]`.
fn le_word(w: &[u8; 12], i: usize) -> u32 {
    u32::from_le_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]])
}

/// `hash_bytes_extended(k, len, seed)` (a.k.a. `hash_any_extended`), little-endian path.
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    // PostgreSQL passes the length as a C `int` and then stores it in a uint32; values
    // handed to it (varlena payloads) are below 1 GB, so the truncation never bites.
    let mut s = State::new(key.len() as u32, seed);

    // Whole 12-byte blocks, each followed by a mix. Note PostgreSQL loops while at least
    // 12 bytes remain (Jenkins' original loops while more than 12 remain), so a key whose
    // length is a multiple of 12 gets an empty tail, not a full last block.
    let mut blocks = key.chunks_exact(12);
    for block in &mut blocks {
        let mut w = [0u8; 12];
        w.copy_from_slice(block);
        s.a = s.a.wrapping_add(le_word(&w, 0));
        s.b = s.b.wrapping_add(le_word(&w, 4));
        s.c = s.c.wrapping_add(le_word(&w, 8));
        s.mix();
    }

    // The last 0..=11 bytes, zero-padded. Bytes 8..11 go into `c` shifted up by one byte:
    // its lowest byte is left alone ("reserved for the length" in lookup3). Since at most
    // 11 bytes remain, w[11] is always 0 and the shift loses nothing.
    let tail = blocks.remainder();
    let mut w = [0u8; 12];
    w[..tail.len()].copy_from_slice(tail);
    s.a = s.a.wrapping_add(le_word(&w, 0));
    s.b = s.b.wrapping_add(le_word(&w, 4));
    s.c = s.c.wrapping_add(le_word(&w, 8) << 8);

    s.final_mix();
    s.result()
}

/// `hash_bytes_uint32_extended(k, seed)` (a.k.a. `hash_uint32_extended`).
///
/// Same result as `hash_bytes_extended` of the 4 little-endian bytes of `k`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut s = State::new(4, seed);
    s.a = s.a.wrapping_add(k);
    s.final_mix();
    s.result()
}

/// `hashint8extended(v, seed)`.
///
/// The int8 is folded into 32 bits so that int2, int4 and int8 values that are equal hash
/// equal (`hashint2extended`/`hashint4extended` hash the sign-extended value directly):
/// the high half is xor-ed into the low half, complemented for negative values, so for any
/// value that fits in an int4 the fold yields that int4's own bits.
pub fn hashint8extended(v: i64, seed: u64) -> i64 {
    // Truncating casts are intended: they take the low and high 32-bit halves.
    let lohalf = v as u32;
    let hihalf = (v >> 32) as u32;
    let folded = lohalf ^ if v >= 0 { hihalf } else { !hihalf };
    hash_uint32_extended(folded, seed) as i64
}

/// `hashtextextended(s, seed)` for a deterministic-collation text value (bytes as stored).
///
/// For deterministic collations PostgreSQL hashes the varlena payload bytes as they are,
/// without any collation transform, so only the server encoding (UTF-8) matters.
pub fn hashtextextended(s: &[u8], seed: u64) -> i64 {
    hash_bytes_extended(s, seed) as i64
}

/// `uuid_hash_extended(u, seed)`: the 16 bytes in their stored (network) order.
pub fn uuid_hash_extended(u: &[u8; 16], seed: u64) -> i64 {
    hash_bytes_extended(u, seed) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values were computed by a PostgreSQL 15.18 server (x86_64), e.g.
    // `SELECT hashint8extended(1, 0)`.

    #[test]
    fn int8_matches_postgres() {
        assert_eq!(hashint8extended(0, 0), 4154612158245552303);
        assert_eq!(hashint8extended(1, 0), -3670598878359251130);
        assert_eq!(hashint8extended(-1, 0), -1888257769727981238);
    }

    #[test]
    fn int8_with_seed_matches_postgres() {
        assert_eq!(hashint8extended(1, 42), 2207685931686633351);
    }

    #[test]
    fn text_matches_postgres() {
        assert_eq!(hashtextextended(b"", 0), -6939563903564495251);
        assert_eq!(hashtextextended(b"hello", 0), 3449563369152288809);
        // 13 bytes: one full block plus a 1-byte tail.
        assert_eq!(hashtextextended(b"hello world!x", 0), -6683131005855957752);
        assert_eq!(
            hashtextextended("日本語".as_bytes(), 0),
            2870829529307104068
        );
    }

    #[test]
    fn text_with_seed_matches_postgres() {
        assert_eq!(hashtextextended(b"abc", 42), 4423357919252764502);
    }

    #[test]
    fn uuid_matches_postgres() {
        assert_eq!(uuid_hash_extended(&[0; 16], 0), -6859010066814654381);
        let u = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(uuid_hash_extended(&u, 0), 7543054272012930821);
    }

    #[test]
    fn uint32_agrees_with_bytes() {
        for (k, seed) in [(0u32, 0u64), (1, 0), (0xdead_beef, 7), (u32::MAX, u64::MAX)] {
            assert_eq!(
                hash_uint32_extended(k, seed),
                hash_bytes_extended(&k.to_le_bytes(), seed)
            );
        }
    }

    #[test]
    fn int4_range_folds_to_own_bits() {
        // For values that fit in an int4, the fold must equal hashing the int4 itself.
        for v in [
            0i64,
            1,
            -1,
            42,
            -42,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
        ] {
            assert_eq!(
                hashint8extended(v, 0),
                hash_uint32_extended(v as i32 as u32, 0) as i64
            );
        }
    }
}
