//! Key paths (`distributions[0].placement[1].slots`) and finding them in YAML text.
//!
//! serde gives values without positions, so to point an error at a line we let the YAML
//! parser find it: a probe deserializer walks the document along the key path and fails
//! on purpose at the target node; the parser stamps that failure with the node's line and
//! column. This handles every YAML form (block and flow collections, quoting, anchors,
//! comments) exactly as the real parse saw it, at the cost of one re-parse per lookup
//! (configs are small and errors few).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// A path from the document root to a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Segment>);

impl KeyPath {
    /// The document root.
    pub fn root() -> KeyPath {
        KeyPath(Vec::new())
    }

    /// This path extended by a mapping key.
    pub fn key(&self, k: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Segment::Key(k.to_owned()));
        p
    }

    /// This path extended by a sequence index.
    pub fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Segment::Index(i));
        p
    }

    /// The enclosing node's path (the root is its own parent).
    pub fn parent(&self) -> KeyPath {
        let mut p = self.clone();
        p.0.pop();
        p
    }

    /// Line and column (1-based) of the node at this path, or of its closest existing
    /// ancestor when the node itself is absent (e.g. a missing key).
    pub fn locate(&self, src: &str) -> Option<(usize, usize)> {
        let mut path = self.clone();
        loop {
            if let Some(pos) = probe(src, &path.0, false) {
                return Some(pos);
            }
            if path.0.is_empty() {
                return None;
            }
            path = path.parent();
        }
    }

    /// Line and column of the mapping key that ends this path (rather than its value);
    /// falls back like [`KeyPath::locate`].
    pub fn locate_key(&self, src: &str) -> Option<(usize, usize)> {
        match self.0.last() {
            Some(Segment::Key(_)) => probe(src, &self.0, true).or_else(|| self.locate(src)),
            _ => self.locate(src),
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The message of the deliberate failure; anything else is a real parse error.
const FOUND: &str = "shardwire-locate: found";

fn probe(src: &str, path: &[Segment], at_key: bool) -> Option<(usize, usize)> {
    let de = serde_norway::Deserializer::from_str(src);
    match (Probe { path, at_key }).deserialize(de) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(FOUND) => {
            e.location().map(|loc| (loc.line(), loc.column()))
        }
        Err(_) => None,
    }
}

/// Walks to `path`; fails with [`FOUND`] at the target node (or at its key).
struct Probe<'p> {
    path: &'p [Segment],
    at_key: bool,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let Segment::Key(want) = first else {
            return Ok(());
        };
        let fail_at_key = self.at_key && rest.is_empty();
        while let Some(hit) = map.next_key_seed(KeyProbe {
            want,
            fail: fail_at_key,
        })? {
            if hit {
                return map.next_value_seed(Probe {
                    path: rest,
                    at_key: self.at_key,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let Segment::Index(want) = first else {
            return Ok(());
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Probe {
            path: rest,
            at_key: self.at_key,
        })
        .map(|_| ())
    }

    // Scalars: found if the path ends here, otherwise the path does not exist.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): treat the tagged value as the node.
        let (_, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

impl Probe<'_> {
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

/// Reads a mapping key; `true` if it is the wanted one. With `fail`, a match is reported
/// as [`FOUND`] so that the position is the key's own.
struct KeyProbe<'a> {
    want: &'a str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.matches(v == self.want)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.matches(v.to_string() == self.want)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.matches(v.to_string() == self.want)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.matches(v.to_string() == self.want)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

impl KeyProbe<'_> {
    fn matches<E: de::Error>(&self, hit: bool) -> Result<bool, E> {
        if hit && self.fail {
            Err(E::custom(FOUND))
        } else {
            Ok(hit)
        }
    }
}
