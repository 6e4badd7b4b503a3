//! The two micro models, defined once and built by both engines from the same numbers.
//!
//! - bigram: logits of the next character = row `wte[current]` (V, V); zero-initialised, so
//!   its initial loss is exactly ln V.
//! - mini-GPT: `x = wte[tok] + wpe[pos]` (optionally RMS-normalised), `depth` pre-norm blocks of
//!   causal multi-head attention and a relu^2 MLP (4x), a final RMSNorm and an LM head that is
//!   `lm_head` (V, C) or, tied, `wte` itself. No biases, no norm weights.
//!
//! Parameters are drawn in name order from the run's "init" stream as f32, so the scalar (f64)
//! and tensor (f32) engines start from identical values.
use std::collections::BTreeMap;

use anyhow::{Result, bail};
use femtochat_model::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Bigram,
    MiniGpt,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MicroConfig {
    pub kind: Kind,
    pub vocab_size: usize,
    /// Context length: windows of block_size inputs (the bigram reads only the last).
    pub block_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub depth: usize,
    pub tie_lm_head: bool,
    pub input_rmsnorm: bool,
    /// Standard deviation of the mini-GPT's Gaussian init (the bigram starts at zero).
    pub init_std: f32,
}

impl MicroConfig {
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size == 0 || self.block_size == 0 {
            bail!("the vocabulary and --block-size must be positive");
        }
        if self.kind == Kind::MiniGpt {
            if self.n_embd == 0 || self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
                bail!(
                    "--n-embd {} must be a positive multiple of --n-head {}",
                    self.n_embd,
                    self.n_head
                );
            }
            if self.depth == 0 {
                bail!("--depth must be at least 1");
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Every parameter: name -> shape, in name order.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let (v, c) = (self.vocab_size, self.n_embd);
        let mut s = BTreeMap::new();
        match self.kind {
            Kind::Bigram => {
                s.insert("wte".into(), vec![v, v]);
            }
            Kind::MiniGpt => {
                s.insert("wte".into(), vec![v, c]);
                s.insert("wpe".into(), vec![self.block_size, c]);
                if !self.tie_lm_head {
                    s.insert("lm_head".into(), vec![v, c]);
                }
                for l in 0..self.depth {
                    for w in ["wq", "wk", "wv", "wo"] {
                        s.insert(format!("h.{l}.attn.{w}"), vec![c, c]);
                    }
                    s.insert(format!("h.{l}.mlp.fc"), vec![4 * c, c]);
                    s.insert(format!("h.{l}.mlp.proj"), vec![c, 4 * c]);
                }
            }
        }
        s
    }

    pub fn num_params(&self) -> usize {
        self.shapes().values().map(|s| s.iter().product::<usize>()).sum()
    }

    /// Initial values by name, from `rng` (the "init" stream).
    pub fn init(&self, rng: &mut Rng) -> BTreeMap<String, Vec<f32>> {
        self.shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let data = match self.kind {
                    Kind::Bigram => vec![0.0; n],
                    Kind::MiniGpt => (0..n).map(|_| self.init_std * rng.normal()).collect(),
                };
                (name, data)
            })
            .collect()
    }
}

/// A micro model on one engine. Windows are `block_size + 1` ids: inputs then the next one.
pub trait MicroModel {
    /// The engine and where it runs, for the metrics: ("scalar"|"tensor", "cpu"|"gpu", adapter).
    fn engine(&self) -> (&'static str, String, String);
    /// Mean loss over every position of the windows, then one AdamW step at `lr`; returns the
    /// loss (before the step).
    fn train_step(&mut self, windows: &[Vec<u32>], lr: f64) -> Result<f64>;
    /// Sum of the per-position losses (nats) over the windows, without training.
    fn loss_sum(&mut self, windows: &[Vec<u32>]) -> Result<f64>;
    /// Logits of the character after `context` (1..=block_size ids).
    fn next_logits(&mut self, context: &[u32]) -> Result<Vec<f64>>;
    /// Every parameter by name (as `MicroConfig::shapes`), for the checkpoint.
    fn params(&self) -> Result<BTreeMap<String, Vec<f64>>>;
}

/// AdamW hyper-parameters shared by both engines.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AdamW {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt(tie: bool) -> MicroConfig {
        MicroConfig {
            kind: Kind::MiniGpt,
            vocab_size: 10,
            block_size: 8,
            n_embd: 16,
            n_head: 4,
            depth: 2,
            tie_lm_head: tie,
            input_rmsnorm: false,
            init_std: 0.1,
        }
    }

    #[test]
    fn parameter_counts() {
        // wte + wpe + 2 x 12 C^2 (+ lm_head)
        let tied = 10 * 16 + 8 * 16 + 2 * 12 * 16 * 16;
        assert_eq!(gpt(true).num_params(), tied);
        assert_eq!(gpt(false).num_params(), tied + 10 * 16);
        let bigram = MicroConfig { kind: Kind::Bigram, ..gpt(false) };
        assert_eq!(bigram.num_params(), 100);
        assert!(bigram.init(&mut Rng::new(0))["wte"].iter().all(|&x| x == 0.0));
        let mut bad = gpt(true);
        bad.n_head = 3;
        assert!(bad.validate().is_err());
    }
}
