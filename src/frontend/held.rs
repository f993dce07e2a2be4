//! The shard connections a session holds, by shard, in shard order.
//!
//! A session holds one connection most of the time and a handful at most, so a sorted
//! vector beats a tree: no node allocated per checkout, and clearing keeps the capacity
//! for the next statement.

use crate::topology::ShardId;

pub struct Held<T> {
    entries: Vec<(ShardId, T)>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Held {
            entries: Vec::new(),
        }
    }
}

impl<T> Held<T> {
    fn find(&self, shard: ShardId) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&shard, |(s, _)| *s)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains_key(&self, shard: &ShardId) -> bool {
        self.find(*shard).is_ok()
    }

    pub fn get(&self, shard: &ShardId) -> Option<&T> {
        self.find(*shard).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, shard: &ShardId) -> Option<&mut T> {
        self.find(*shard).ok().map(|i| &mut self.entries[i].1)
    }

    /// Add or replace; returns the value replaced.
    pub fn insert(&mut self, shard: ShardId, value: T) -> Option<T> {
        match self.find(shard) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (shard, value));
                None
            }
        }
    }

    pub fn remove(&mut self, shard: &ShardId) -> Option<T> {
        self.find(*shard).ok().map(|i| self.entries.remove(i).1)
    }

    /// Drop every entry, keeping the allocation.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn keys(&self) -> impl Iterator<Item = &ShardId> + '_ {
        self.entries.iter().map(|(s, _)| s)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> + '_ {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.entries.iter_mut().map(|(_, v)| v)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ShardId, &mut T)> + '_ {
        self.entries.iter_mut().map(|(s, v)| (&*s, v))
    }
}

#[cfg(test)]
mod tests {
    use super::Held;

    #[test]
    fn sorted_by_shard_and_replaces() {
        let mut h = Held::default();
        assert!(h.insert(3, "c").is_none());
        assert!(h.insert(1, "a").is_none());
        assert!(h.insert(2, "b").is_none());
        assert_eq!(h.insert(2, "B"), Some("b"));
        assert_eq!(h.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(h.get(&2), Some(&"B"));
        assert!(h.contains_key(&3) && !h.contains_key(&4));
        assert_eq!(h.remove(&1), Some("a"));
        assert_eq!(h.values().copied().collect::<Vec<_>>(), vec!["B", "c"]);
        h.clear();
        assert!(h.is_empty() && h.get(&3).is_none());
    }
}
