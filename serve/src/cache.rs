//! Response cache for deterministic, non-streaming requests (temperature 0 or a seed): the same
//! request gets the same body back without running the model. Least recently used entries go
//! first when either bound (entries, bytes) is exceeded; entries older than the TTL are misses.
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// 0 disables the cache.
    pub max_entries: usize,
    pub max_bytes: usize,
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_entries: 1024, max_bytes: 64 << 20, ttl: Duration::from_secs(600) }
    }
}

struct Entry {
    body: Vec<u8>,
    at: Instant,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub ttl_s: u64,
}

pub struct ResponseCache {
    config: CacheConfig,
    map: Option<LruCache<String, Entry>>,
    bytes: usize,
    hits: u64,
    misses: u64,
}

impl ResponseCache {
    pub fn new(config: CacheConfig) -> ResponseCache {
        // The LRU's own bound is the entry count; the byte bound is enforced on insert.
        let map = NonZeroUsize::new(config.max_entries).map(LruCache::new);
        ResponseCache { config, map, bytes: 0, hits: 0, misses: 0 }
    }

    /// The cached body for `key`, if present and fresh.
    pub fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        let Some(map) = &mut self.map else { return None };
        let fresh = map.get(key).map(|e| e.at.elapsed() <= self.config.ttl);
        match fresh {
            Some(true) => {
                self.hits += 1;
                map.get(key).map(|e| e.body.clone())
            }
            Some(false) => {
                if let Some(e) = map.pop(key) {
                    self.bytes -= e.body.len() + key.len();
                }
                self.misses += 1;
                None
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, key: String, body: Vec<u8>) {
        let Some(map) = &mut self.map else { return };
        let size = body.len() + key.len();
        if size > self.config.max_bytes {
            return;
        }
        let new = Entry { body, at: Instant::now() };
        // `push` hands back the entry it displaced: the old value of this key, or the LRU one.
        if let Some((k, old)) = map.push(key, new) {
            self.bytes -= old.body.len() + k.len();
        }
        self.bytes += size;
        while self.bytes > self.config.max_bytes {
            match map.pop_lru() {
                Some((k, old)) => self.bytes -= old.body.len() + k.len(),
                None => break,
            }
        }
    }

    pub fn clear(&mut self) {
        if let Some(map) = &mut self.map {
            map.clear();
        }
        self.bytes = 0;
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.map.as_ref().map_or(0, LruCache::len),
            bytes: self.bytes,
            hits: self.hits,
            misses: self.misses,
            max_entries: self.config.max_entries,
            max_bytes: self.config.max_bytes,
            ttl_s: self.config.ttl.as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: usize, bytes: usize, ttl: Duration) -> ResponseCache {
        ResponseCache::new(CacheConfig { max_entries: entries, max_bytes: bytes, ttl })
    }

    #[test]
    fn lru_by_entries_and_bytes() {
        let mut c = cache(2, 1000, Duration::from_secs(60));
        c.insert("a".into(), vec![1; 10]);
        c.insert("b".into(), vec![2; 10]);
        assert_eq!(c.get("a"), Some(vec![1; 10])); // a is now the most recent
        c.insert("c".into(), vec![3; 10]);
        assert_eq!(c.get("b"), None);
        assert_eq!(c.stats().entries, 2);
        assert_eq!(c.stats().bytes, 22);
        // Replacing a key keeps the byte count right.
        c.insert("a".into(), vec![4; 5]);
        assert_eq!(c.stats().bytes, 17);

        let mut c = cache(10, 25, Duration::from_secs(60));
        c.insert("a".into(), vec![0; 10]);
        c.insert("b".into(), vec![0; 10]);
        c.insert("c".into(), vec![0; 10]); // 33 bytes > 25: a goes
        assert_eq!((c.get("a"), c.stats().entries, c.stats().bytes), (None, 2, 22));
        c.insert("big".into(), vec![0; 100]); // larger than the whole cache: not kept
        assert_eq!(c.stats().entries, 2);
        c.clear();
        assert_eq!((c.stats().entries, c.stats().bytes), (0, 0));
    }

    #[test]
    fn ttl_and_disabled() {
        let mut c = cache(10, 1000, Duration::ZERO);
        c.insert("a".into(), vec![1]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(c.get("a"), None);
        assert_eq!(c.stats().bytes, 0);
        let mut off = cache(0, 1000, Duration::from_secs(1));
        off.insert("a".into(), vec![1]);
        assert_eq!(off.get("a"), None);
    }
}
