//! A map with a bound on its keys, for per-client state (rate limits, violations) that an attacker
//! must not be able to grow without end. When a new key arrives at a full map, the least recently
//! seen key goes: a key that is being hit (for example one that is over its limit) is always among
//! the most recently seen, so it is never the one forgotten.
//!
//! Keys are 64-bit hashes chosen by the caller (hashed with a per-process random key, so that
//! nobody can aim collisions). The map is split into shards, each behind its own lock and each an
//! exact LRU: a hash table to a slot, and the slots in a doubly linked list by recency, held in one
//! vector with 32-bit links so that a key costs a few dozen bytes.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

const NONE: u32 = u32::MAX;
const SHARDS: usize = 64;

/// A bounded, sharded LRU map from `u64` keys to `V`.
pub struct BoundedMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
}

struct Slot<V> {
    key: u64,
    value: V,
    /// Towards the most recent.
    newer: u32,
    /// Towards the least recent.
    older: u32,
}

struct Shard<V> {
    index: HashMap<u64, u32, IdentityHash>,
    slots: Vec<Slot<V>>,
    /// The most recently seen slot.
    newest: u32,
    /// The least recently seen slot: the next to go.
    oldest: u32,
    capacity: usize,
}

impl<V: Default> BoundedMap<V> {
    /// A map that holds at most about `max_keys` keys (rounded up to a multiple of the shard
    /// count, at least one per shard).
    pub fn new(max_keys: usize) -> BoundedMap<V> {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        BoundedMap {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        index: HashMap::with_hasher(IdentityHash),
                        slots: Vec::new(),
                        newest: NONE,
                        oldest: NONE,
                        capacity: per_shard,
                    })
                })
                .collect(),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard<V>> {
        // The high bits pick the shard; the hash table uses the whole key.
        let index = (key >> 58) as usize % self.shards.len();
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the value of `key` (a default one for a new key), which becomes the most
    /// recently seen. Exact under concurrency: calls for one key run one after another.
    pub fn update<R>(&self, key: u64, f: impl FnOnce(&mut V) -> R) -> R {
        let mut shard = self.shard(key);
        let slot = shard.touch_or_insert(key);
        f(&mut shard.slots[slot as usize].value)
    }

    /// The value of `key`, if it is held, without making it recent.
    pub fn peek<R>(&self, key: u64, f: impl FnOnce(&V) -> R) -> Option<R> {
        let shard = self.shard(key);
        let slot = *shard.index.get(&key)?;
        Some(f(&shard.slots[slot as usize].value))
    }

    pub fn remove(&self, key: u64) -> bool {
        self.shard(key).remove(key)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .index
                    .len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The heap memory the map holds now, from its tables' capacities.
    pub fn memory_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                // A hash table entry is the key, the slot number and one control byte.
                shard.slots.capacity() * std::mem::size_of::<Slot<V>>()
                    + shard.index.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
            })
            .sum()
    }

    /// Calls `f` with every key and value; the map is locked a shard at a time meanwhile.
    pub fn for_each(&self, mut f: impl FnMut(u64, &V)) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (&key, &slot) in &shard.index {
                f(key, &shard.slots[slot as usize].value);
            }
        }
    }
}

impl<V: Default> Shard<V> {
    fn touch_or_insert(&mut self, key: u64) -> u32 {
        if let Some(&slot) = self.index.get(&key) {
            self.unlink(slot);
            self.push_newest(slot);
            return slot;
        }
        let slot = if self.index.len() >= self.capacity && self.oldest != NONE {
            // Full: the least recently seen key makes room.
            let slot = self.oldest;
            self.unlink(slot);
            let old_key = self.slots[slot as usize].key;
            self.index.remove(&old_key);
            let reused = &mut self.slots[slot as usize];
            reused.key = key;
            reused.value = V::default();
            slot
        } else {
            let slot = u32::try_from(self.slots.len()).unwrap_or(NONE - 1);
            self.slots.push(Slot {
                key,
                value: V::default(),
                newer: NONE,
                older: NONE,
            });
            slot
        };
        self.index.insert(key, slot);
        self.push_newest(slot);
        slot
    }

    fn remove(&mut self, key: u64) -> bool {
        let Some(slot) = self.index.remove(&key) else {
            return false;
        };
        self.unlink(slot);
        // The last slot moves into the hole, so that the vector stays dense.
        let last = u32::try_from(self.slots.len() - 1).unwrap_or(NONE - 1);
        if slot != last {
            let moved_key = self.slots[last as usize].key;
            self.unlink(last);
            self.slots.swap(slot as usize, last as usize);
            self.index.insert(moved_key, slot);
            // The moved key becomes the newest: removal is a rare operator action, and this only
            // shifts when that one key would be forgotten.
            self.push_newest(slot);
        }
        self.slots.pop();
        true
    }

    fn unlink(&mut self, slot: u32) {
        let (newer, older) = {
            let entry = &self.slots[slot as usize];
            (entry.newer, entry.older)
        };
        match newer {
            NONE => self.newest = older,
            newer => self.slots[newer as usize].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            older => self.slots[older as usize].newer = newer,
        }
        let entry = &mut self.slots[slot as usize];
        entry.newer = NONE;
        entry.older = NONE;
    }

    fn push_newest(&mut self, slot: u32) {
        let previous = self.newest;
        {
            let entry = &mut self.slots[slot as usize];
            entry.newer = NONE;
            entry.older = previous;
        }
        match previous {
            NONE => self.oldest = slot,
            previous => self.slots[previous as usize].newer = slot,
        }
        self.newest = slot;
    }
}

/// The keys are hashes already; hashing them again would only cost time.
#[derive(Clone, Copy, Default)]
struct IdentityHash;

impl std::hash::BuildHasher for IdentityHash {
    type Hasher = IdentityHasher;

    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spreads test keys over the whole 64-bit space, as real hashed keys are.
    fn key(n: u64) -> u64 {
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    #[test]
    fn values_are_kept_per_key() {
        let map = BoundedMap::<u64>::new(1000);
        map.update(key(1), |value| *value += 5);
        map.update(key(1), |value| *value += 1);
        map.update(key(2), |value| *value += 7);
        assert_eq!(map.peek(key(1), |value| *value), Some(6));
        assert_eq!(map.peek(key(2), |value| *value), Some(7));
        assert_eq!(map.peek(key(3), |value| *value), None);
        assert!(map.remove(key(1)));
        assert!(!map.remove(key(1)));
        assert_eq!(map.peek(key(2), |value| *value), Some(7));
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn the_least_recently_seen_key_goes_first_and_a_busy_key_stays() {
        let map = BoundedMap::<u64>::new(SHARDS * 4);
        let busy = key(0);
        map.update(busy, |value| *value = 99);
        for n in 1..100_000 {
            map.update(key(n), |value| *value = n);
            // The attacker's key is hit all the time.
            map.update(busy, |value| *value += 0);
        }
        assert!(map.len() <= SHARDS * 4);
        assert_eq!(map.peek(busy, |value| *value), Some(99));
        // The most recent keys are there, the oldest are gone.
        assert_eq!(map.peek(key(99_999), |value| *value), Some(99_999));
        assert_eq!(map.peek(key(1), |value| *value), None);
    }

    #[test]
    fn removal_keeps_the_structure_sound() {
        let map = BoundedMap::<u64>::new(SHARDS * 8);
        for n in 0..5_000 {
            map.update(key(n), |value| *value = n);
            if n % 3 == 0 {
                map.remove(key(n / 2));
            }
        }
        let mut seen = 0;
        map.for_each(|k, value| {
            assert_eq!(key(*value), k);
            seen += 1;
        });
        assert_eq!(seen, map.len());
        assert!(map.len() <= SHARDS * 8);
    }

    #[test]
    fn a_million_keys_stay_within_the_stated_memory() {
        let map = BoundedMap::<u64>::new(1_000_000);
        for n in 0..2_000_000 {
            map.update(key(n), |value| *value = n);
        }
        assert!(map.len() <= 1_000_000 + SHARDS);
        let bytes = map.memory_bytes();
        // docs/protection.md states 64 MiB per million keys of rate-limit state.
        assert!(bytes <= 64 << 20, "{} MiB", bytes >> 20);
    }
}
