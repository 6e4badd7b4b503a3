//! The GPT configuration (docs/reference.md §1) and what derives from it: the depth dial, padded vocab,
//! per-layer attention windows, value-embedding layers, parameter and FLOP counts.
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// nanochat's GPTConfig; the field names are the reference's (fixtures and checkpoints carry it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GPTConfig {
    pub sequence_len: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    #[serde(default = "default_window_pattern")]
    pub window_pattern: String,
}

fn default_window_pattern() -> String {
    "SSSL".to_string()
}

impl GPTConfig {
    /// The training CLI's depth dial: model_dim = depth * aspect_ratio rounded up to a multiple
    /// of head_dim; n_head = model_dim / head_dim; n_kv_head = n_head.
    pub fn from_depth(
        depth: usize,
        aspect_ratio: usize,
        head_dim: usize,
        sequence_len: usize,
        vocab_size: usize,
        window_pattern: &str,
    ) -> Result<GPTConfig> {
        if depth == 0 || aspect_ratio == 0 || head_dim == 0 {
            return Err(ModelError::Config(format!(
                "depth ({depth}), aspect ratio ({aspect_ratio}) and head dim ({head_dim}) must be positive"
            )));
        }
        let model_dim = (depth * aspect_ratio).div_ceil(head_dim) * head_dim;
        let n_head = model_dim / head_dim;
        let c = GPTConfig {
            sequence_len,
            vocab_size,
            n_layer: depth,
            n_head,
            n_kv_head: n_head,
            n_embd: model_dim,
            window_pattern: window_pattern.to_string(),
        };
        c.validate()?;
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Embedding and lm_head rows: vocab rounded up to a multiple of 64.
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(64) * 64
    }

    /// Layers alternate value embeddings, the last layer always has one.
    pub fn has_value_embed(&self, layer: usize) -> bool {
        layer % 2 == (self.n_layer - 1) % 2
    }

    /// Attention window (max distance to an attended key) of every layer: the pattern tiled
    /// across layers, the last layer long; long = sequence_len, short = ceil(seq / 4 / 128) * 128.
    pub fn window_sizes(&self) -> Vec<usize> {
        let long = self.sequence_len;
        let short = self.sequence_len.div_ceil(512) * 128;
        let pattern = self.window_pattern.as_bytes();
        (0..self.n_layer)
            .map(|i| {
                let is_long = i + 1 == self.n_layer || pattern[i % pattern.len()] == b'L';
                if is_long { long } else { short }
            })
            .collect()
    }

    /// Checks that every derived quantity is well defined.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layer == 0 || self.n_head == 0 || self.n_kv_head == 0 || self.vocab_size == 0 {
            return bad(format!(
                "n_layer, n_head, n_kv_head and vocab_size must be positive: {self:?}"
            ));
        }
        if self.sequence_len == 0 {
            return bad("sequence_len must be positive".into());
        }
        if !self.n_embd.is_multiple_of(self.n_head) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "n_embd {} must split into {} heads of even size",
                self.n_embd, self.n_head
            ));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            ));
        }
        // The smear gate reads 24 channels.
        if self.n_embd < 24 {
            return bad(format!("n_embd {} is below the smear gate's 24 channels", self.n_embd));
        }
        if self.window_pattern.is_empty()
            || self.window_pattern.chars().any(|c| c != 'L' && c != 'S')
        {
            return bad(format!(
                "window_pattern {:?} must be a non-empty string of L and S",
                self.window_pattern
            ));
        }
        Ok(())
    }

    /// Parameters inside the transformer blocks (nanochat's `transformer_matrices`: the
    /// attention and MLP matrices plus the value-embedding gates).
    pub fn transformer_matrix_params(&self) -> usize {
        let (c, kvd) = (self.n_embd, self.n_kv_head * self.head_dim());
        let per_layer = c * c * 2 + 2 * kvd * c + 8 * c * c;
        let ve_gates = (0..self.n_layer).filter(|&i| self.has_value_embed(i)).count()
            * self.n_kv_head
            * VE_GATE_CHANNELS;
        self.n_layer * per_layer + ve_gates
    }

    /// Transformer matrices plus lm_head: the count the scaling rules use (docs/reference.md §7).
    pub fn scaling_params(&self) -> usize {
        self.transformer_matrix_params() + self.padded_vocab_size() * self.n_embd
    }

    /// Parameters that multiply the token stream (every `Linear` of nanochat: the scaling
    /// parameters plus the smear gate); embeddings are lookups and do not count.
    pub fn matmul_params(&self) -> usize {
        self.scaling_params() + SMEAR_GATE_CHANNELS
    }

    /// Training FLOPs per token: 6 * (matmul params) + attention, 12 * H * D * min(window, T)
    /// per layer (docs/reference.md §7).
    pub fn flops_per_token(&self) -> f64 {
        let attn: usize = self
            .window_sizes()
            .iter()
            .map(|&w| 12 * self.n_head * self.head_dim() * w.min(self.sequence_len))
            .sum();
        6.0 * self.matmul_params() as f64 + attn as f64
    }
}

/// Channels of the residual stream the value-embedding gate reads.
pub const VE_GATE_CHANNELS: usize = 12;
/// Channels the smear gate reads.
pub const SMEAR_GATE_CHANNELS: usize = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_dial() {
        let c = GPTConfig::from_depth(12, 64, 128, 2048, 32768, "SSSL").unwrap();
        assert_eq!((c.n_embd, c.n_head, c.n_kv_head, c.head_dim()), (768, 6, 6, 128));
        let c = GPTConfig::from_depth(4, 64, 128, 512, 8192, "L").unwrap();
        assert_eq!((c.n_embd, c.n_head), (256, 2));
        let c = GPTConfig::from_depth(3, 64, 128, 512, 8192, "L").unwrap();
        assert_eq!(c.n_embd, 256, "192 rounds up to a multiple of the head dim");
        assert!(GPTConfig::from_depth(0, 64, 128, 512, 8192, "L").is_err());
        assert!(GPTConfig::from_depth(4, 64, 128, 512, 8192, "X").is_err());
    }

    #[test]
    fn windows_follow_the_pattern_last_layer_long() {
        let c = GPTConfig::from_depth(6, 64, 64, 2048, 100, "SSSL").unwrap();
        assert_eq!(c.window_sizes(), vec![512, 512, 512, 2048, 512, 2048]);
        let c = GPTConfig { sequence_len: 512, window_pattern: "SL".into(), ..c };
        assert_eq!(c.window_sizes()[..2], [128, 512]);
    }

    /// nanochat's `num_scaling_params()['transformer_matrices'] + ['lm_head']` for d12 at its
    /// defaults, counted by hand: 12 layers of 12 C^2 (C = 768), six value-embedding gates of
    /// 6 x 12, and a 32768 x 768 lm_head.
    #[test]
    fn scaling_params_match_nanochat() {
        let c = GPTConfig::from_depth(12, 64, 128, 2048, 32768, "SSSL").unwrap();
        assert_eq!(c.transformer_matrix_params(), 12 * 12 * 768 * 768 + 6 * 6 * 12);
        assert_eq!(c.scaling_params(), 84_935_088 + 32768 * 768);
        assert_eq!(c.matmul_params(), c.scaling_params() + 24);
    }

    #[test]
    fn padded_vocab() {
        let c = GPTConfig::from_depth(2, 64, 64, 64, 300, "L").unwrap();
        assert_eq!(c.padded_vocab_size(), 320);
    }
}
