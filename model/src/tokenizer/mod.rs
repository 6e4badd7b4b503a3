//! Byte-level BPE (docs/reference.md §9): training with rustbpe's semantics (`train.rs`), encoding with
//! tiktoken's (lowest-rank merge first), decoding, streaming decoding, chat rendering (`chat.rs`),
//! and tiktoken's `.tiktoken` file format plus a small JSON for the pattern and specials.
mod chat;
pub mod split;
mod train;

use rustc_hash::FxHashMap as HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use fancy_regex::Regex;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use chat::{ChatMessage, Content, Conversation, DEFAULT_MAX_TOKENS, Part};
pub use split::Splitter;
pub use train::train_bpe;

use crate::error::{ModelError, Result};

/// GPT-4's split pattern with numbers of 1-2 digits, as nanochat.
pub const SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// nanochat's special tokens, in id order after the mergeable ranks.
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

fn tok_err(msg: impl Into<String>) -> ModelError {
    ModelError::Tokenizer(msg.into())
}

/// One part of a chunk being merged (see `Tokenizer::encode_chunk`).
#[derive(Clone, Copy, Debug)]
struct MergePart {
    start: usize,
    id: u32,
    pair: u32,
}

/// `bytes` as one integer (bytes in the low 15 bytes, the length in the top one), if it fits.
/// Built from (overlapping) whole-word loads rather than by copying into a buffer and reading it
/// back, which stalls on store forwarding and dominated lookups when measured.
#[inline(always)]
pub(crate) fn pack(bytes: &[u8]) -> Option<u128> {
    let n = bytes.len();
    let word = |at: usize| -> u64 {
        bytes.get(at..at + 8).and_then(|w| w.try_into().ok()).map_or(0, u64::from_le_bytes)
    };
    let half = |at: usize| -> u64 {
        bytes.get(at..at + 4).and_then(|w| w.try_into().ok()).map_or(0, u32::from_le_bytes) as u64
    };
    let byte = |at: usize| -> u64 { bytes.get(at).map_or(0, |&b| b as u64) };
    let (lo, hi) = match n {
        0 => (0, 0),
        // Bytes 0, n/2 and n-1 cover every byte of a 1-3 byte slice.
        1..=3 => (byte(0) | byte(n / 2) << (8 * (n / 2)) | byte(n - 1) << (8 * (n - 1)), 0),
        // Two 4-byte loads, the second shifted so that its bytes land at their offsets; where
        // they overlap they hold the same bytes, so OR is exact.
        4..=7 => (half(0) | half(n - 4) << (8 * (n - 4)), 0),
        8 => (word(0), 0),
        // Likewise with 8-byte loads: the second one's top n-8 bytes are bytes 8..n.
        9..=15 => (word(0), word(n - 8) >> (8 * (16 - n))),
        _ => return None,
    };
    Some((lo as u128) | (hi as u128) << 64 | (n as u128) << 120)
}

/// `bytes` as one u64 (bytes in the low 7 bytes, the length in the top one), if it fits.
#[inline(always)]
fn tiny_key(bytes: &[u8]) -> Option<u64> {
    // For up to 7 bytes `pack` puts them all in its low 56 bits.
    (bytes.len() <= 7).then(|| pack(bytes).map_or(0, |k| k as u64) | (bytes.len() as u64) << 56)
}

/// The JSON beside the ranks file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenizerJson {
    pattern: String,
    vocab_size: usize,
    special_tokens: HashMap<String, u32>,
}

/// A trained tokenizer: mergeable ranks (token bytes -> id, ids 0..n) plus special tokens.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    ranks: HashMap<Vec<u8>, u32>,
    /// The ranks of tokens of up to 7 bytes again, keyed by `tiny_key`: the most frequent
    /// lookups, in a table half the size of `short_ranks`'s, so it stays in cache better.
    tiny_ranks: HashMap<u64, u32>,
    /// The ranks of tokens of 8 to 15 bytes again, keyed by `pack`.
    short_ranks: HashMap<u128, u32>,
    /// Rank of each single byte.
    byte_ranks: [u32; 256],
    /// id -> bytes for every id, specials included.
    vocab: Vec<Vec<u8>>,
    specials: HashMap<String, u32>,
    pattern: String,
    splitter: PreSplit,
    /// Identifies these ranks for the per-thread `MISSES` cache (clones share it: same ranks).
    id: u64,
}

/// Most chunks `MISSES` keeps per thread.
const MISS_CACHE_ENTRIES: usize = 1 << 15;

/// Chunks that are not a single token, with their ids, for one tokenizer (`owner`), plus scratch
/// space for merging. Rare words recur within and across documents; merging one costs several
/// rank lookups per byte, looking it up here costs one.
#[derive(Default)]
struct MissCache {
    owner: u64,
    ids: HashMap<Box<[u8]>, Box<[u32]>>,
    parts: Vec<MergePart>,
}

thread_local! {
    static MISSES: std::cell::RefCell<MissCache> = std::cell::RefCell::default();
}

/// Source of `Tokenizer::id`s; 0 is never handed out, so a fresh cache belongs to no tokenizer.
static NEXT_TOKENIZER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How a tokenizer cuts text into chunks before byte-pair merging.
#[derive(Clone, Debug)]
enum PreSplit {
    /// The hand-written splitter, for the default [`SPLIT_PATTERN`] (same chunks, much faster).
    Builtin(Splitter),
    /// fancy-regex, for any other pattern a tokenizer was saved with.
    Regex(Box<Regex>),
}

impl PreSplit {
    fn new(pattern: &str) -> Result<PreSplit> {
        if pattern == SPLIT_PATTERN {
            Ok(PreSplit::Builtin(Splitter::new().map_err(tok_err)?))
        } else {
            let regex =
                Regex::new(pattern).map_err(|e| tok_err(format!("bad split pattern: {e}")))?;
            Ok(PreSplit::Regex(Box::new(regex)))
        }
    }
}

impl Tokenizer {
    /// From mergeable ranks (must be exactly the ids 0..n) and special tokens (ids n..).
    pub fn new(
        ranks: HashMap<Vec<u8>, u32>,
        specials: &[&str],
        pattern: &str,
    ) -> Result<Tokenizer> {
        let n = ranks.len();
        let mut vocab = vec![Vec::new(); n];
        for (bytes, &id) in &ranks {
            let slot = vocab
                .get_mut(id as usize)
                .ok_or_else(|| tok_err(format!("rank {id} >= {n} tokens")))?;
            if !slot.is_empty() {
                return Err(tok_err(format!("rank {id} is used twice")));
            }
            if bytes.is_empty() {
                return Err(tok_err(format!("rank {id} has empty bytes")));
            }
            *slot = bytes.clone();
        }
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&[*b][..])) {
            return Err(tok_err(format!(
                "byte {b:#04x} has no token: byte-level BPE needs all 256"
            )));
        }
        let mut spec = HashMap::default();
        for (i, s) in specials.iter().enumerate() {
            spec.insert(s.to_string(), (n + i) as u32);
            vocab.push(s.as_bytes().to_vec());
        }
        let splitter = PreSplit::new(pattern)?;
        let tiny_ranks =
            ranks.iter().filter_map(|(b, &id)| Some((tiny_key(b)?, id))).collect::<HashMap<_, _>>();
        let short_ranks = ranks
            .iter()
            .filter(|(b, _)| b.len() >= 8)
            .filter_map(|(b, &id)| Some((pack(b)?, id)))
            .collect::<HashMap<_, _>>();
        // All 256 bytes were checked to have a rank above.
        let byte_ranks = std::array::from_fn(|b| ranks.get(&[b as u8][..]).copied().unwrap_or(0));
        Ok(Tokenizer {
            ranks,
            tiny_ranks,
            short_ranks,
            byte_ranks,
            vocab,
            specials: spec,
            pattern: pattern.to_string(),
            splitter,
            id: NEXT_TOKENIZER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Train on documents (docs/reference.md §9): `vocab_size` includes the 9 special tokens.
    pub fn train<S: AsRef<str> + Sync>(docs: &[S], vocab_size: usize) -> Result<Tokenizer> {
        let n_special = SPECIAL_TOKENS.len();
        if vocab_size < 256 + n_special {
            return Err(tok_err(format!(
                "vocab size must be at least {}, got {vocab_size}",
                256 + n_special
            )));
        }
        let counts = train::count_chunks(docs, Splitter::new().map_err(tok_err)?).into_map();
        let ranks = train_bpe(counts, vocab_size - n_special);
        Tokenizer::new(ranks, &SPECIAL_TOKENS, SPLIT_PATTERN)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Id of a special token such as `<|bos|>`.
    pub fn special(&self, name: &str) -> Result<u32> {
        self.specials.get(name).copied().ok_or_else(|| tok_err(format!("no special token {name}")))
    }

    pub fn bos(&self) -> u32 {
        // Every tokenizer this crate builds or loads has all of SPECIAL_TOKENS.
        self.specials.get("<|bos|>").copied().unwrap_or(0)
    }

    /// Bytes of a token (specials give their text).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.get(id as usize).map(Vec::as_slice)
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        id as usize >= self.ranks.len() && (id as usize) < self.vocab.len()
    }

    /// Every token's length in bytes, 0 for special tokens: the denominator of bits per byte
    /// (nanochat's `token_bytes`), indexed by id.
    pub fn byte_lengths(&self) -> Vec<u32> {
        (0..self.vocab_size() as u32)
            .map(|id| {
                if self.is_special(id) {
                    0
                } else {
                    self.token_bytes(id).map_or(0, |b| b.len() as u32)
                }
            })
            .collect()
    }

    /// Encode text without special tokens (their text is encoded as ordinary bytes).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let fresh = |t: &str| self.encode_with(t, &mut MissCache::default());
        MISSES
            .try_with(|cell| match cell.try_borrow_mut() {
                Ok(mut cache) => {
                    if cache.owner != self.id {
                        cache.ids.clear();
                        cache.owner = self.id;
                    }
                    self.encode_with(text, &mut cache)
                }
                // Only if encode were re-entered on this thread; never expected.
                Err(_) => fresh(text),
            })
            // The thread is being torn down: no cache.
            .unwrap_or_else(|_| fresh(text))
    }

    fn encode_with(&self, text: &str, cache: &mut MissCache) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        match &self.splitter {
            PreSplit::Builtin(s) => {
                for chunk in s.split(text) {
                    self.encode_chunk(chunk.as_bytes(), &mut out, cache);
                }
            }
            PreSplit::Regex(regex) => {
                let mut done = 0;
                for m in regex.find_iter(text) {
                    match m {
                        Ok(m) => {
                            self.encode_chunk(m.as_str().as_bytes(), &mut out, cache);
                            done = m.end();
                        }
                        // fancy-regex can give up at run time (its backtracking limit, or its
                        // stack guard on very long runs); encode the rest as single bytes rather
                        // than drop it.
                        Err(_) => {
                            let rest = text.as_bytes().get(done..).unwrap_or_default();
                            out.extend(rest.iter().map(|&b| self.byte_ranks[b as usize]));
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Encode many texts in parallel.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Rank of a token's bytes. Tokens of up to 15 bytes (nearly all lookups: whole words and
    /// the pairs tried while merging) are found by a packed integer key, which hashes and compares
    /// in a few instructions instead of hashing a slice and calling memcmp.
    #[inline]
    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        if let Some(key) = tiny_key(bytes) {
            self.tiny_ranks.get(&key).copied()
        } else if let Some(key) = pack(bytes) {
            self.short_ranks.get(&key).copied()
        } else {
            self.ranks.get(bytes).copied()
        }
    }

    /// tiktoken's byte-pair merge of one pre-split chunk: repeatedly merge the adjacent pair whose
    /// concatenation has the lowest rank (leftmost on ties). Chunks that are not one token are
    /// remembered in `cache` (whose scratch space also makes merging allocation-free).
    fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>, cache: &mut MissCache) {
        if let Some(id) = self.rank(bytes) {
            out.push(id);
            return;
        }
        if let Some(ids) = cache.ids.get(bytes) {
            out.extend_from_slice(ids);
            return;
        }
        let parts = &mut cache.parts;
        // parts[i] covers bytes[parts[i].start..parts[i + 1].start] (the last one runs to the
        // end); `pair` is the rank of it merged with the next part, u32::MAX if that is no token.
        parts.clear();
        parts.extend(bytes.iter().enumerate().map(|(i, &b)| MergePart {
            start: i,
            id: self.byte_ranks[b as usize],
            pair: u32::MAX,
        }));
        let pair_rank = |parts: &[MergePart], i: usize| -> u32 {
            let end = parts.get(i + 2).map_or(bytes.len(), |p| p.start);
            match (parts.get(i), i + 1 < parts.len()) {
                (Some(p), true) => self.rank(&bytes[p.start..end]).unwrap_or(u32::MAX),
                _ => u32::MAX,
            }
        };
        for i in 0..parts.len() {
            parts[i].pair = pair_rank(parts, i);
        }
        loop {
            let (mut best, mut at) = (u32::MAX, 0);
            for (i, p) in parts.iter().enumerate() {
                if p.pair < best {
                    best = p.pair;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            // The merged part's token is the pair's token, whose id is its rank.
            parts[at].id = best;
            parts.remove(at + 1);
            parts[at].pair = pair_rank(parts, at);
            if at > 0 {
                parts[at - 1].pair = pair_rank(parts, at - 1);
            }
        }
        let start = out.len();
        out.extend(parts.iter().map(|p| p.id));
        // Bounded memory: start over when full (cheaper than tracking recency, and a full cache
        // refills with the words that are frequent now).
        if cache.ids.len() >= MISS_CACHE_ENTRIES {
            cache.ids.clear();
        }
        cache.ids.insert(bytes.into(), out[start..].into());
    }

    /// Bytes of a token sequence; unknown ids are an error.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(
                self.token_bytes(id).ok_or_else(|| tok_err(format!("unknown token id {id}")))?,
            );
        }
        Ok(out)
    }

    /// Text of a token sequence; invalid UTF-8 (a sequence cut inside a character) is replaced
    /// with U+FFFD, as tiktoken's `decode`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Load `DIR/tokenizer.tiktoken` and `DIR/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let ranks_path = dir.join("tokenizer.tiktoken");
        let json_path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&ranks_path)
            .map_err(|e| tok_err(format!("{}: {e}", ranks_path.display())))?;
        let ranks =
            parse_tiktoken(&text).map_err(|e| tok_err(format!("{}: {e}", ranks_path.display())))?;
        let meta: TokenizerJson = serde_json::from_slice(
            &std::fs::read(&json_path)
                .map_err(|e| tok_err(format!("{}: {e}", json_path.display())))?,
        )
        .map_err(|e| tok_err(format!("{}: {e}", json_path.display())))?;
        let tok =
            Tokenizer::from_parts(ranks, meta.special_tokens.into_iter().collect(), &meta.pattern)?;
        if tok.vocab_size() != meta.vocab_size {
            return Err(tok_err(format!(
                "{} declares vocab size {} but holds {} tokens",
                json_path.display(),
                meta.vocab_size,
                tok.vocab_size()
            )));
        }
        Ok(tok)
    }

    /// From mergeable ranks and special tokens with their ids (which must follow the ranks,
    /// in any order), as stored on disk; every nanochat special token must be present.
    pub fn from_parts(
        ranks: HashMap<Vec<u8>, u32>,
        mut specials: Vec<(String, u32)>,
        pattern: &str,
    ) -> Result<Tokenizer> {
        specials.sort_by_key(|(_, id)| *id);
        for (i, (name, id)) in specials.iter().enumerate() {
            if *id as usize != ranks.len() + i {
                return Err(tok_err(format!(
                    "special token {name} has id {id}, expected {}",
                    ranks.len() + i
                )));
            }
        }
        let names: Vec<&str> = specials.iter().map(|(n, _)| n.as_str()).collect();
        let tok = Tokenizer::new(ranks, &names, pattern)?;
        for s in SPECIAL_TOKENS {
            tok.special(s)?;
        }
        Ok(tok)
    }

    /// Mergeable ranks (token bytes, id 0..n) and special tokens (name, id), for writers of
    /// other formats.
    pub fn parts(&self) -> (Vec<&[u8]>, Vec<(&str, u32)>) {
        let ranks = self.vocab[..self.ranks.len()].iter().map(Vec::as_slice).collect();
        let mut specials: Vec<(&str, u32)> =
            self.specials.iter().map(|(n, &id)| (n.as_str(), id)).collect();
        specials.sort_by_key(|&(_, id)| id);
        (ranks, specials)
    }

    /// Write `DIR/tokenizer.tiktoken` (tiktoken's format: base64 bytes, space, rank) and
    /// `DIR/tokenizer.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| tok_err(format!("{}: {e}", dir.display())))?;
        let mut lines = String::new();
        for (id, bytes) in self.vocab[..self.ranks.len()].iter().enumerate() {
            lines.push_str(&B64.encode(bytes));
            lines.push(' ');
            lines.push_str(&id.to_string());
            lines.push('\n');
        }
        crate::checkpoint::write_atomic(&dir.join("tokenizer.tiktoken"), lines.as_bytes())?;
        let meta = TokenizerJson {
            pattern: self.pattern.clone(),
            vocab_size: self.vocab_size(),
            special_tokens: self.specials.clone(),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| tok_err(e.to_string()))?;
        crate::checkpoint::write_atomic(&dir.join("tokenizer.json"), &json)
    }
}

/// Streaming tokenizer training: feed documents in batches (counted in parallel, only chunk
/// counts are kept), then train.
pub struct ChunkCounter {
    splitter: Splitter,
    counts: train::Counts,
}

impl ChunkCounter {
    pub fn new() -> Result<ChunkCounter> {
        Ok(ChunkCounter {
            splitter: Splitter::new().map_err(tok_err)?,
            counts: train::Counts::default(),
        })
    }

    pub fn add<S: AsRef<str> + Sync>(&mut self, docs: &[S]) -> Result<()> {
        let batch = train::count_chunks(docs, self.splitter);
        self.counts = std::mem::take(&mut self.counts).merge(batch);
        Ok(())
    }

    /// Distinct chunks so far.
    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// `vocab_size` includes the 9 special tokens.
    pub fn train(self, vocab_size: usize) -> Result<Tokenizer> {
        let n_special = SPECIAL_TOKENS.len();
        if vocab_size < 256 + n_special {
            return Err(tok_err(format!(
                "vocab size must be at least {}, got {vocab_size}",
                256 + n_special
            )));
        }
        let ranks = train_bpe(self.counts.into_map(), vocab_size - n_special);
        Tokenizer::new(ranks, &SPECIAL_TOKENS, SPLIT_PATTERN)
    }
}

/// Parse tiktoken's ranks format; ranks must be exactly 0..n with no duplicates.
pub fn parse_tiktoken(text: &str) -> std::result::Result<HashMap<Vec<u8>, u32>, String> {
    let mut ranks = HashMap::default();
    for (lineno, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let at = || format!("line {}", lineno + 1);
        let (b64, rank) =
            line.split_once(' ').ok_or_else(|| format!("{}: expected `<base64> <rank>`", at()))?;
        let bytes = B64.decode(b64).map_err(|e| format!("{}: bad base64: {e}", at()))?;
        let rank: u32 = rank.trim().parse().map_err(|_| format!("{}: bad rank {rank:?}", at()))?;
        if ranks.insert(bytes, rank).is_some() {
            return Err(format!("{}: token bytes listed twice", at()));
        }
    }
    let mut seen = vec![false; ranks.len()];
    for &r in ranks.values() {
        match seen.get_mut(r as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(format!(
                    "ranks must be exactly 0..{} with no gaps or repeats (saw {r})",
                    ranks.len()
                ));
            }
        }
    }
    Ok(ranks)
}

/// Incremental decoder for streaming: feed tokens, get text only once it is complete UTF-8.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Append a token's bytes; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.pending.extend_from_slice(
            tok.token_bytes(id).ok_or_else(|| tok_err(format!("unknown token id {id}")))?,
        );
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return Ok(out);
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: the prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return Ok(out);
                        }
                        // Invalid bytes in the middle: emit a replacement and go on.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of the stream (lossy).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pack` equals the obvious definition (bytes copied into a zeroed buffer, length on top).
    #[test]
    fn pack_is_bytes_and_length() {
        let data: Vec<u8> = (0..40u32).map(|i| (i * 37 + 11) as u8 | 0x80).collect();
        for start in 0..8 {
            for n in 0..=17 {
                let bytes = &data[start..start + n];
                let want = (n <= 15).then(|| {
                    let mut buf = [0u8; 16];
                    buf[..n].copy_from_slice(bytes);
                    buf[15] = n as u8;
                    u128::from_le_bytes(buf)
                });
                assert_eq!(pack(bytes), want, "{n} bytes");
                let tiny = want.filter(|_| n <= 7).map(|k| k as u64 | (n as u64) << 56);
                assert_eq!(tiny_key(bytes), tiny, "{n} bytes");
            }
        }
    }
}
