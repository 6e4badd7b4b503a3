//! Character-level data for the micro models: the vocabulary is the sorted set of characters of
//! the corpus, the last `val_fraction` of it is the validation split, training windows are drawn
//! uniformly at random (from the run's "data" stream), validation windows are fixed.
use std::path::PathBuf;

use anyhow::{Result, bail};
use femtochat_model::rng::Rng;

use crate::docs;

pub struct CharData {
    /// id -> character, sorted.
    pub chars: Vec<char>,
    train: Vec<u32>,
    val: Vec<u32>,
}

impl CharData {
    /// Every document of `files` (any format `train base` reads), joined by blank lines.
    pub fn load(files: &[PathBuf], val_fraction: f64) -> Result<CharData> {
        let mut text = String::new();
        for doc in docs::documents(&docs::expand(files)?) {
            if !text.is_empty() {
                text.push_str("\n\n");
            }
            text.push_str(&doc?);
        }
        CharData::from_text(&text, val_fraction)
    }

    pub fn from_text(text: &str, val_fraction: f64) -> Result<CharData> {
        if !(0.0..1.0).contains(&val_fraction) || val_fraction <= 0.0 {
            bail!("--val-fraction must be in (0, 1), got {val_fraction}");
        }
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        let ids: Vec<u32> =
            text.chars().map(|c| chars.binary_search(&c).map_or(0, |i| i as u32)).collect();
        let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
        let (train, val) = ids.split_at(ids.len() - n_val);
        Ok(CharData { chars, train: train.to_vec(), val: val.to_vec() })
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// Check that both splits hold at least one window of `block + 1` characters.
    pub fn check_windows(&self, block: usize) -> Result<()> {
        if self.train.len() <= block || self.val.len() <= block {
            bail!(
                "the data is too small: {} training and {} validation characters, need more than \
                 --block-size {block} in each",
                self.train.len(),
                self.val.len()
            );
        }
        Ok(())
    }

    /// `batch` training windows of `block + 1` ids at uniform random offsets.
    pub fn batch(&self, rng: &mut Rng, batch: usize, block: usize) -> Vec<Vec<u32>> {
        let starts = self.train.len() - block; // > 0 by check_windows
        (0..batch)
            .map(|_| {
                let s = (rng.next_u64() % starts as u64) as usize;
                self.train[s..s + block + 1].to_vec()
            })
            .collect()
    }

    /// Up to `max` validation windows of `block + 1` ids, evenly spaced over the split (the
    /// same ones at every evaluation and in every run).
    pub fn val_windows(&self, block: usize, max: usize) -> Vec<Vec<u32>> {
        let n = (self.val.len() - 1) / block; // non-overlapping targets
        let stride = n.div_ceil(max.max(1)).max(1);
        (0..n)
            .step_by(stride)
            .map(|i| self.val[i * block..i * block + block + 1].to_vec())
            .collect()
    }

    /// UTF-8 bytes of the characters `ids` (for bits per byte).
    pub fn bytes(&self, ids: &[u32]) -> usize {
        ids.iter().map(|&i| self.chars[i as usize].len_utf8()).sum()
    }

    /// Ids of `text`; errors on a character the corpus does not contain.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| match self.chars.binary_search(&c) {
                Ok(i) => Ok(i as u32),
                Err(_) => bail!("character {c:?} of the prompt is not in the corpus vocabulary"),
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.chars[i as usize]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_split_windows_and_round_trip() {
        let d = CharData::from_text("hello world, hello again!", 0.2).unwrap();
        assert_eq!(d.decode(&d.encode("hello").unwrap()), "hello");
        assert!(d.encode("hellq").is_err());
        assert_eq!(d.train.len() + d.val.len(), 25);
        assert_eq!(d.val.len(), 5);
        let mut rng = Rng::new(1);
        for w in d.batch(&mut rng, 4, 3) {
            assert_eq!(w.len(), 4);
        }
        let val = d.val_windows(2, 10);
        assert_eq!(val, vec![d.val[0..3].to_vec(), d.val[2..5].to_vec()]);
        assert!(d.check_windows(5).is_err());
        let u = CharData::from_text("aébc", 0.25).unwrap();
        assert_eq!(u.bytes(&u.encode("aé").unwrap()), 3);
    }
}
