//! The cluster's shape: shards, distributions (key spaces) and which table uses which.
//!
//! Owns the placement functions (key → slot → shard, key → range → shard). The router and
//! the rebalancer ask this module where a key lives; it asks neither of them. A `Topology`
//! is immutable once built; a new version is swapped in atomically by whoever owns it.

pub mod build;
pub mod hash;
pub mod key;

use std::collections::BTreeSet;

use foldhash::{HashMap, HashSet};
use std::ops::Bound;

pub use key::{KeyType, KeyValue};

/// Index of a shard in `Topology::shards`.
pub type ShardId = usize;

/// One PostgreSQL server that holds part of the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Operator-facing name (`s0`), used in errors, logs and the admin console.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Database on the shard server (may differ from the name clients ask for).
    pub database: String,
    pub user: String,
    pub password: String,
}

/// A half-open key interval `[from, to)` owned by one shard; `None` is unbounded.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRange {
    pub from: Option<KeyValue>,
    pub to: Option<KeyValue>,
    pub shard: ShardId,
}

/// An inclusive slot interval `first..=last` owned by one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u32,
    pub last: u32,
    pub shard: ShardId,
}

/// How a distribution places keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// `slot = hash(key) mod slots`, slot intervals sorted by `first`, covering `0..slots`.
    Hash { slots: u32, map: Vec<SlotRange> },
    /// Key intervals sorted by `from`, covering the whole key space without overlap.
    Range { map: Vec<KeyRange> },
}

/// A named key space; all tables attached to it are co-located by key.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    pub name: String,
    pub key_type: KeyType,
    pub method: Method,
}

/// Why a key could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no placement of distribution \"{distribution}\" covers key {key}")]
    Uncovered { distribution: String, key: String },
    #[error("key {key} is not a valid {key_type} for distribution \"{distribution}\"")]
    WrongType {
        distribution: String,
        key: String,
        key_type: KeyType,
    },
}

impl Distribution {
    /// The hash slot of `key`, for hash distributions; `None` for range distributions.
    pub fn slot_of(&self, key: &KeyValue) -> Option<u32> {
        match &self.method {
            Method::Hash { slots, .. } => Some(slot_for_hash(key.placement_hash(), *slots)),
            Method::Range { .. } => None,
        }
    }

    /// The shard that owns `key`.
    pub fn shard_for(&self, key: &KeyValue) -> Result<ShardId, PlacementError> {
        if !key.fits(self.key_type) {
            return Err(PlacementError::WrongType {
                distribution: self.name.clone(),
                key: key.to_string(),
                key_type: self.key_type,
            });
        }
        let found = match &self.method {
            Method::Hash { slots, map } => {
                let slot = slot_for_hash(key.placement_hash(), *slots);
                map.iter()
                    .find(|r| r.first <= slot && slot <= r.last)
                    .map(|r| r.shard)
            }
            Method::Range { map } => map
                .iter()
                .find(|r| {
                    r.from.as_ref().is_none_or(|f| f <= key)
                        && r.to.as_ref().is_none_or(|t| key < t)
                })
                .map(|r| r.shard),
        };
        found.ok_or_else(|| PlacementError::Uncovered {
            distribution: self.name.clone(),
            key: key.to_string(),
        })
    }

    /// Every shard that owns part of this distribution.
    pub fn shards(&self) -> BTreeSet<ShardId> {
        match &self.method {
            Method::Hash { map, .. } => map.iter().map(|r| r.shard).collect(),
            Method::Range { map } => map.iter().map(|r| r.shard).collect(),
        }
    }

    /// The shards that may hold keys between `lo` and `hi`. Exact for range
    /// distributions; a hash distribution cannot narrow a key interval, so it returns
    /// all its shards.
    pub fn shards_for_interval(
        &self,
        lo: Bound<&KeyValue>,
        hi: Bound<&KeyValue>,
    ) -> BTreeSet<ShardId> {
        let Method::Range { map } = &self.method else {
            return self.shards();
        };
        map.iter()
            .filter(|r| {
                // The piece [from, to) intersects the query interval unless it lies wholly
                // below `lo` or wholly above `hi`.
                let below = match (&r.to, lo) {
                    (Some(to), Bound::Included(l)) | (Some(to), Bound::Excluded(l)) => to <= l,
                    _ => false,
                };
                let above = match (&r.from, hi) {
                    (Some(from), Bound::Included(h)) => from > h,
                    (Some(from), Bound::Excluded(h)) => from >= h,
                    _ => false,
                };
                !below && !above
            })
            .map(|r| r.shard)
            .collect()
    }
}

/// `slot = h mod slots`, taken non-negative (SQL: `((h % slots) + slots) % slots`).
pub fn slot_for_hash(h: i64, slots: u32) -> u32 {
    // rem_euclid of a positive divisor is in 0..slots, so the cast cannot truncate.
    h.rem_euclid(i64::from(slots)) as u32
}

/// A table attached to a distribution by its shard-key column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedTable {
    /// Unqualified, case-folded table name as PostgreSQL stores it.
    pub name: String,
    /// The shard-key column (case-folded).
    pub column: String,
    /// Index into `Topology::distributions`.
    pub distribution: usize,
}

/// The whole cluster as the router sees it. Immutable; replaced as a unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub shards: Vec<Shard>,
    pub distributions: Vec<Distribution>,
    /// Sharded tables by unqualified name.
    pub tables: HashMap<String, ShardedTable>,
    /// Tables copied to every shard.
    pub reference_tables: HashSet<String>,
    /// Where catalog queries, unsharded tables and table-less statements go.
    pub default_shard: ShardId,
    /// Bumped on every change, so cached routing plans can tell they are stale.
    pub version: u64,
}

impl Topology {
    /// The sharded table named `name` (unqualified, as PostgreSQL folds it).
    pub fn table(&self, name: &str) -> Option<&ShardedTable> {
        self.tables.get(name)
    }

    pub fn is_reference(&self, name: &str) -> bool {
        self.reference_tables.contains(name)
    }

    pub fn distribution_of(&self, table: &ShardedTable) -> &Distribution {
        &self.distributions[table.distribution]
    }

    pub fn all_shards(&self) -> BTreeSet<ShardId> {
        (0..self.shards.len()).collect()
    }

    pub fn shard_by_name(&self, name: &str) -> Option<ShardId> {
        self.shards.iter().position(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range_dist() -> Distribution {
        Distribution {
            name: "accounts".into(),
            key_type: KeyType::Bigint,
            method: Method::Range {
                map: vec![
                    KeyRange {
                        from: None,
                        to: Some(KeyValue::Int(1000)),
                        shard: 0,
                    },
                    KeyRange {
                        from: Some(KeyValue::Int(1000)),
                        to: Some(KeyValue::Int(2000)),
                        shard: 1,
                    },
                    KeyRange {
                        from: Some(KeyValue::Int(2000)),
                        to: None,
                        shard: 2,
                    },
                ],
            },
        }
    }

    #[test]
    fn range_edges_are_half_open() {
        let d = range_dist();
        assert_eq!(d.shard_for(&KeyValue::Int(i64::MIN)), Ok(0));
        assert_eq!(d.shard_for(&KeyValue::Int(999)), Ok(0));
        assert_eq!(d.shard_for(&KeyValue::Int(1000)), Ok(1));
        assert_eq!(d.shard_for(&KeyValue::Int(1999)), Ok(1));
        assert_eq!(d.shard_for(&KeyValue::Int(2000)), Ok(2));
        assert_eq!(d.shard_for(&KeyValue::Int(i64::MAX)), Ok(2));
    }

    #[test]
    fn range_intervals_select_overlapping_pieces() {
        let d = range_dist();
        let k = KeyValue::Int;
        let set = |v: &[usize]| v.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(
            d.shards_for_interval(Bound::Included(&k(5)), Bound::Excluded(&k(1000))),
            set(&[0])
        );
        assert_eq!(
            d.shards_for_interval(Bound::Included(&k(5)), Bound::Included(&k(1000))),
            set(&[0, 1])
        );
        assert_eq!(
            d.shards_for_interval(Bound::Included(&k(2000)), Bound::Unbounded),
            set(&[2])
        );
        assert_eq!(
            d.shards_for_interval(Bound::Included(&k(1999)), Bound::Unbounded),
            set(&[1, 2])
        );
        assert_eq!(
            d.shards_for_interval(Bound::Unbounded, Bound::Unbounded),
            set(&[0, 1, 2])
        );
    }

    #[test]
    fn slots_are_non_negative() {
        assert_eq!(slot_for_hash(-1, 1024), 1023);
        assert_eq!(slot_for_hash(i64::MIN, 1024), 0);
        assert_eq!(slot_for_hash(1025, 1024), 1);
    }

    #[test]
    fn uncovered_and_wrong_type_keys_are_errors() {
        let d = Distribution {
            name: "u".into(),
            key_type: KeyType::Bigint,
            method: Method::Range {
                map: vec![KeyRange {
                    from: Some(KeyValue::Int(0)),
                    to: None,
                    shard: 0,
                }],
            },
        };
        assert!(matches!(
            d.shard_for(&KeyValue::Int(-1)),
            Err(PlacementError::Uncovered { .. })
        ));
        assert!(matches!(
            d.shard_for(&KeyValue::Text("x".into())),
            Err(PlacementError::WrongType { .. })
        ));
    }
}
