//! Placeholder config (reconciled with the optimizer branch's config.rs at merge).
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GPTConfig {
    pub sequence_len: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    pub window_pattern: String,
}

impl GPTConfig {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(64) * 64
    }
    pub fn has_value_embed(&self, layer: usize) -> bool {
        layer % 2 == (self.n_layer - 1) % 2
    }
    pub fn window_sizes(&self) -> Vec<usize> {
        let long = self.sequence_len;
        let short = self.sequence_len.div_ceil(4).div_ceil(128) * 128;
        let pat: Vec<char> = self.window_pattern.chars().collect();
        (0..self.n_layer)
            .map(|i| if i + 1 == self.n_layer || pat[i % pat.len()] == 'L' { long } else { short })
            .collect()
    }
}
