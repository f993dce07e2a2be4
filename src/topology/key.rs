//! Shard-key types and values: parsing from SQL literals and Bind parameters, ordering for
//! range distributions, and the placement hash for hash distributions.

use std::fmt;

use super::hash;

/// The SQL type of a distribution's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// `bigint` (int8); int2/int4 keys hash identically, so they may share it.
    Bigint,
    /// `int` (int4).
    Int,
    /// `text` / `varchar`.
    Text,
    /// `uuid`.
    Uuid,
}

impl KeyType {
    /// The name used in shard-config.yaml.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Bigint => "bigint",
            KeyType::Int => "int",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }

    pub fn parse(name: &str) -> Option<KeyType> {
        match name {
            "bigint" | "int8" => Some(KeyType::Bigint),
            "int" | "int4" | "integer" => Some(KeyType::Int),
            "text" | "varchar" => Some(KeyType::Text),
            "uuid" => Some(KeyType::Uuid),
            _ => None,
        }
    }

    /// SQL expression computing the placement hash of column `col` on a shard.
    pub fn hash_sql(self, col: &str) -> String {
        match self {
            KeyType::Bigint | KeyType::Int => format!("hashint8extended({col}::int8, 0)"),
            KeyType::Text => format!("hashtextextended({col}::text, 0)"),
            KeyType::Uuid => format!("uuid_hash_extended({col}::uuid, 0)"),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A concrete shard-key value. Ordering is numeric for integers and bytewise for text
/// (PostgreSQL's `COLLATE "C"`) and uuid (PostgreSQL's uuid order).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyValue {
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

impl KeyValue {
    /// Whether this value can be a key of `ty`.
    pub fn fits(&self, ty: KeyType) -> bool {
        match (self, ty) {
            (KeyValue::Int(_), KeyType::Bigint) => true,
            (KeyValue::Int(v), KeyType::Int) => i32::try_from(*v).is_ok(),
            (KeyValue::Text(_), KeyType::Text) => true,
            (KeyValue::Uuid(_), KeyType::Uuid) => true,
            _ => false,
        }
    }

    /// PostgreSQL's extended hash of the value with seed 0.
    pub fn placement_hash(&self) -> i64 {
        match self {
            KeyValue::Int(v) => hash::hashint8extended(*v, 0),
            KeyValue::Text(s) => hash::hashtextextended(s.as_bytes(), 0),
            KeyValue::Uuid(u) => hash::uuid_hash_extended(u, 0),
        }
    }

    /// Parse a value given in PostgreSQL's text format for a key of type `ty`.
    pub fn from_text(s: &str, ty: KeyType) -> Option<KeyValue> {
        match ty {
            KeyType::Bigint | KeyType::Int => {
                // PostgreSQL's int8in skips ASCII white space (isspace) around the digits.
                let t = s.trim_ascii();
                let t = t.strip_prefix('+').unwrap_or(t);
                let v = t.parse::<i64>().ok()?;
                let v = KeyValue::Int(v);
                v.fits(ty).then_some(v)
            }
            KeyType::Text => Some(KeyValue::Text(s.to_owned())),
            KeyType::Uuid => parse_uuid(s).map(KeyValue::Uuid),
        }
    }

    /// Parse a Bind parameter in binary format. Integers may arrive as int2, int4 or
    /// int8 (told apart by length), since a client may bind a narrower type.
    pub fn from_binary(b: &[u8], ty: KeyType) -> Option<KeyValue> {
        match ty {
            KeyType::Bigint | KeyType::Int => {
                let v = match b.len() {
                    2 => i64::from(i16::from_be_bytes([b[0], b[1]])),
                    4 => i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                    8 => i64::from_be_bytes(b.try_into().ok()?),
                    _ => return None,
                };
                let v = KeyValue::Int(v);
                v.fits(ty).then_some(v)
            }
            KeyType::Text => std::str::from_utf8(b)
                .ok()
                .map(|s| KeyValue::Text(s.to_owned())),
            KeyType::Uuid => b.try_into().ok().map(KeyValue::Uuid),
        }
    }
}

/// PostgreSQL's uuid input: 32 hex digits, optionally in braces, with a hyphen allowed
/// after any group of four digits.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    let s = match s.strip_prefix('{') {
        Some(inner) => inner.strip_suffix('}')?,
        None => s,
    };
    let mut out = [0u8; 16];
    let mut digits = 0usize;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'-' {
            // Hyphens only between groups of four digits, never doubled or trailing.
            if digits == 0
                || !digits.is_multiple_of(4)
                || i + 1 == bytes.len()
                || bytes[i + 1] == b'-'
            {
                return None;
            }
            i += 1;
            continue;
        }
        let v = (c as char).to_digit(16)? as u8;
        if digits >= 32 {
            return None;
        }
        out[digits / 2] |= if digits.is_multiple_of(2) { v << 4 } else { v };
        digits += 1;
        i += 1;
    }
    (digits == 32).then_some(out)
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            KeyValue::Uuid(u) => {
                for (i, b) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_parse_from_text_and_binary() {
        assert_eq!(
            KeyValue::from_text(" +42 ", KeyType::Bigint),
            Some(KeyValue::Int(42))
        );
        assert_eq!(
            KeyValue::from_text("-9223372036854775808", KeyType::Bigint),
            Some(KeyValue::Int(i64::MIN))
        );
        assert_eq!(KeyValue::from_text("3000000000", KeyType::Int), None);
        assert_eq!(KeyValue::from_text("12a", KeyType::Bigint), None);
        assert_eq!(
            KeyValue::from_binary(&7i16.to_be_bytes(), KeyType::Bigint),
            Some(KeyValue::Int(7))
        );
        assert_eq!(
            KeyValue::from_binary(&(-7i32).to_be_bytes(), KeyType::Int),
            Some(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(&7i64.to_be_bytes(), KeyType::Bigint),
            Some(KeyValue::Int(7))
        );
        assert_eq!(KeyValue::from_binary(&[1, 2, 3], KeyType::Bigint), None);
    }

    #[test]
    fn uuids_parse_in_postgres_forms() {
        let want = KeyValue::from_text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", KeyType::Uuid)
            .expect("valid");
        for form in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(
                KeyValue::from_text(form, KeyType::Uuid).as_ref(),
                Some(&want),
                "{form}"
            );
        }
        for bad in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99--9c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            assert_eq!(KeyValue::from_text(bad, KeyType::Uuid), None, "{bad}");
        }
        assert_eq!(want.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    #[test]
    fn text_keys_order_bytewise() {
        assert!(KeyValue::Text("B".into()) < KeyValue::Text("a".into()));
        assert!(KeyValue::Text("a".into()) < KeyValue::Text("ab".into()));
    }
}
