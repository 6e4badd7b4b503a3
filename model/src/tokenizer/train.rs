//! BPE training with rustbpe's semantics, so the same text gives the same ranks:
//! 1. split every document with the pattern and count distinct chunks (parallel over documents;
//!    memory holds counts, not text);
//! 2. count adjacent pairs over the chunks, weighted by chunk count, remembering which chunks hold
//!    each pair;
//! 3. repeatedly merge the most frequent pair (ties: the smaller (left, right) id pair) into a new
//!    id, with a lazily refreshed max-heap: a popped entry whose count is stale is re-pushed with
//!    the current count; merging updates pair counts by local deltas and pushes the new pairs.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap as HashMap;

use rayon::prelude::*;

use super::{Splitter, pack};

type Pair = (u32, u32);

/// Counts of distinct chunks. Chunks of up to 15 bytes (nearly all) are keyed by a packed
/// integer, which hashes and compares in a few instructions and needs no allocation per new
/// chunk; longer ones by their bytes.
#[derive(Default)]
pub(crate) struct Counts {
    short: HashMap<u128, i64>,
    long: HashMap<Vec<u8>, i64>,
}

impl Counts {
    fn add(&mut self, chunk: &[u8], n: i64) {
        match pack(chunk) {
            Some(key) => *self.short.entry(key).or_default() += n,
            // Look up by slice first: only a new chunk needs an owned key.
            None => match self.long.get_mut(chunk) {
                Some(c) => *c += n,
                None => {
                    self.long.insert(chunk.to_vec(), n);
                }
            },
        }
    }

    /// Sum of both; the larger map absorbs the smaller.
    pub(crate) fn merge(self, other: Counts) -> Counts {
        let (mut big, small) =
            if self.len() >= other.len() { (self, other) } else { (other, self) };
        for (k, v) in small.short {
            *big.short.entry(k).or_default() += v;
        }
        for (k, v) in small.long {
            *big.long.entry(k).or_default() += v;
        }
        big
    }

    /// Distinct chunks.
    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Every chunk's bytes with its count.
    pub(crate) fn into_map(self) -> HashMap<Vec<u8>, i64> {
        let mut map = self.long;
        map.reserve(self.short.len());
        for (key, v) in self.short {
            let bytes = key.to_le_bytes();
            // `pack` keeps the length in the top byte; it is at most 15.
            let n = (bytes[15] as usize).min(15);
            map.insert(bytes[..n].to_vec(), v);
        }
        map
    }
}

/// Distinct pre-split chunks of `docs` with their counts (training always uses the default
/// pattern, hence the built-in splitter).
pub(crate) fn count_chunks<S: AsRef<str> + Sync>(docs: &[S], splitter: Splitter) -> Counts {
    docs.par_iter()
        .fold(Counts::default, |mut counts, doc| {
            for piece in splitter.split(doc.as_ref()) {
                counts.add(piece.as_bytes(), 1);
            }
            counts
        })
        .reduce(Counts::default, Counts::merge)
}

struct Job {
    pair: Pair,
    count: i64,
    /// Chunks that held this pair when the entry was pushed.
    pos: Vec<usize>,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.pair == other.pair
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// Max-heap on count; on equal counts the smaller pair is greater (pops first).
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

/// Merge every occurrence of `pair` in `word` (left to right, non-overlapping) into `new`;
/// push the pair-count changes this makes (per occurrence of the word) into `deltas`.
/// In place: the write index never passes the read index, so nothing is allocated.
fn merge_word(word: &mut Vec<u32>, pair: Pair, new: u32, deltas: &mut Vec<(Pair, i64)>) {
    let (a, b) = pair;
    let n = word.len();
    let (mut r, mut w) = (0, 0);
    while r < n {
        if r + 1 < n && word[r] == a && word[r + 1] == b {
            // The left neighbour is what is already written (possibly a fresh `new`).
            if w > 0 {
                let x = word[w - 1];
                deltas.push(((x, a), -1));
                deltas.push(((x, new), 1));
            }
            deltas.push(((a, b), -1));
            // Unread yet, since r + 2 > w.
            if let Some(&y) = word.get(r + 2) {
                deltas.push(((b, y), -1));
                deltas.push(((new, y), 1));
            }
            word[w] = new;
            r += 2;
        } else {
            word[w] = word[r];
            r += 1;
        }
        w += 1;
    }
    word.truncate(w);
}

/// Train `vocab_size - 256` merges over counted chunks; returns mergeable ranks (bytes -> id)
/// for ids 0..vocab_size (fewer if the text runs out of pairs).
pub fn train_bpe(chunks: HashMap<Vec<u8>, i64>, vocab_size: usize) -> HashMap<Vec<u8>, u32> {
    let (mut words, counts): (Vec<Vec<u32>>, Vec<i64>) =
        chunks.into_iter().map(|(bytes, c)| (bytes.iter().map(|&b| b as u32).collect(), c)).unzip();

    let mut pair_counts: HashMap<Pair, i64> = HashMap::default();
    // Positions are pushed in increasing chunk order, so skipping a repeat of the last one keeps
    // each list sorted and unique without a set.
    let mut where_: HashMap<Pair, Vec<usize>> = HashMap::default();
    for (i, w) in words.iter().enumerate() {
        for p in w.windows(2) {
            *pair_counts.entry((p[0], p[1])).or_default() += counts[i];
            push_new(where_.entry((p[0], p[1])).or_default(), i);
        }
    }
    let mut heap: BinaryHeap<Job> = where_
        .into_iter()
        .filter_map(|(pair, pos)| {
            let count = pair_counts[&pair];
            (count > 0).then_some(Job { pair, count, pos })
        })
        .collect();

    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut deltas = Vec::new();
    while vocab.len() < vocab_size {
        let Some(mut top) = heap.pop() else { break };
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if top.count != current {
            top.count = current;
            if current > 0 {
                heap.push(top);
            }
            continue;
        }
        if current <= 0 {
            break;
        }
        let new = vocab.len() as u32;
        let mut bytes = vocab[top.pair.0 as usize].clone();
        bytes.extend_from_slice(&vocab[top.pair.1 as usize]);
        vocab.push(bytes);

        // `top.pos` is increasing, so `push_new` keeps these sorted and unique too.
        let mut fresh: HashMap<Pair, Vec<usize>> = HashMap::default();
        for &wi in &top.pos {
            deltas.clear();
            merge_word(&mut words[wi], top.pair, new, &mut deltas);
            for &(pair, d) in &deltas {
                *pair_counts.entry(pair).or_default() += d * counts[wi];
                if d > 0 {
                    push_new(fresh.entry(pair).or_default(), wi);
                }
            }
        }
        for (pair, pos) in fresh {
            let count = pair_counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                heap.push(Job { pair, count, pos });
            }
        }
    }
    vocab.into_iter().enumerate().map(|(id, bytes)| (bytes, id as u32)).collect()
}

/// Append chunk index `i` unless it is already the last one: callers push in increasing order,
/// so the list stays sorted (merges visit chunks deterministically) and unique.
fn push_new(pos: &mut Vec<usize>, i: usize) {
    if pos.last() != Some(&i) {
        pos.push(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed and byte-keyed counts, merged across documents, give back every chunk's bytes and
    /// total (chunks of 0-15 bytes are packed, longer ones not).
    #[test]
    fn counts_round_trip_through_packed_keys() {
        let docs = [
            "a bb a\u{e9}\u{e9} 123456789012345 Incomprehensibilities!!\n\n",
            " bb  Incomprehensibilities\u{3000}\u{3000}x 0\u{0}",
        ];
        let splitter = Splitter::new().unwrap();
        let mut want: HashMap<Vec<u8>, i64> = HashMap::default();
        for d in docs {
            for c in splitter.split(d) {
                *want.entry(c.as_bytes().to_vec()).or_default() += 1;
            }
        }
        let got = count_chunks(&docs, splitter);
        assert_eq!(got.len(), want.len());
        assert!(want.keys().any(|k| k.len() > 15) && want.keys().any(|k| k.len() <= 15));
        assert_eq!(got.into_map(), want);
        let twice = count_chunks(&docs, splitter).merge(count_chunks(&docs, splitter)).into_map();
        assert_eq!(twice, want.iter().map(|(k, v)| (k.clone(), 2 * v)).collect());
    }
}
