//! nanochat's base-training recipe (base_train.py; docs/reference.md "Batch sizing"): from the
//! model alone, the training horizon, the batch size, and the learning-rate and weight-decay
//! corrections for that batch size.
//!
//! - target tokens D = target_param_data_ratio * scaling params (transformer matrices + lm_head);
//! - D_REF = the same for a depth-12 model of the same shape settings, B_REF = 2^19 tokens;
//! - auto batch B = 2^round(log2(B_REF * (D / D_REF)^0.383)) (Power Lines);
//! - every learning rate scales by sqrt(B / B_REF), the Muon weight decay by
//!   sqrt(B / B_REF) * D_REF / D (constant T_epoch);
//! - steps: --num-iterations, else round(target_flops / (flops_per_token * B)), else D // B.
use anyhow::{Result, bail};
use femtochat_model::GPTConfig;
use serde::{Deserialize, Serialize};

/// nanochat's reference batch size at depth 12, in tokens.
pub const B_REF: usize = 1 << 19;
/// Depth of nanochat's reference model, where the hyper-parameters were tuned.
pub const DEPTH_REF: usize = 12;
/// Exponent of the optimal batch size in the training tokens (Bopt ∝ D^0.383).
const BATCH_EXPONENT: f64 = 0.383;

/// What the user asked for (flags of `train base`).
#[derive(Clone, Debug)]
pub struct RecipeInput {
    pub model: GPTConfig,
    pub aspect_ratio: usize,
    pub head_dim: usize,
    pub target_param_data_ratio: f64,
    pub total_batch_size: Option<usize>,
    pub num_iterations: Option<usize>,
    pub target_flops: Option<f64>,
    /// Learning rates and weight decay before the batch-size corrections.
    pub embedding_lr: f32,
    pub unembedding_lr: f32,
    pub matrix_lr: f32,
    pub scalar_lr: f32,
    pub weight_decay: f32,
}

/// Where the number of steps came from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Horizon {
    NumIterations,
    TargetFlops,
    ParamDataRatio,
}

/// Everything the recipe derives (recorded in `run.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub scaling_params: usize,
    pub target_tokens: usize,
    /// Target tokens of the depth-12 reference.
    pub d_ref: f64,
    pub total_batch_size: usize,
    pub batch_auto: bool,
    pub batch_lr_scale: f64,
    pub num_iterations: usize,
    pub horizon: Horizon,
    pub flops_per_token: f64,
    pub embedding_lr: f32,
    pub unembedding_lr: f32,
    pub matrix_lr: f32,
    pub scalar_lr: f32,
    /// Muon weight decay at step 0 after the batch and horizon correction.
    pub weight_decay: f32,
}

impl Recipe {
    pub fn derive(i: &RecipeInput) -> Result<Recipe> {
        let m = &i.model;
        let scaling_params = m.scaling_params();
        let target_tokens = (i.target_param_data_ratio * scaling_params as f64) as usize;
        let reference = GPTConfig::from_depth(
            DEPTH_REF,
            i.aspect_ratio,
            i.head_dim,
            m.sequence_len,
            m.vocab_size,
            &m.window_pattern,
        )?;
        let d_ref = i.target_param_data_ratio * reference.scaling_params() as f64;
        let (total_batch_size, batch_auto) = match i.total_batch_size {
            Some(b) => (b, false),
            None => {
                if target_tokens == 0 {
                    bail!(
                        "--target-param-data-ratio {} gives no training tokens to size the batch \
                         from; give --total-batch-size",
                        i.target_param_data_ratio
                    );
                }
                let predicted = B_REF as f64 * (target_tokens as f64 / d_ref).powf(BATCH_EXPONENT);
                (1usize << predicted.log2().round().max(0.0) as u32, true)
            }
        };
        if total_batch_size == 0 {
            bail!("--total-batch-size must be positive");
        }
        let batch_ratio = total_batch_size as f64 / B_REF as f64;
        let batch_lr_scale = batch_ratio.sqrt();
        let flops_per_token = m.flops_per_token();
        let (num_iterations, horizon) = if let Some(n) = i.num_iterations {
            (n, Horizon::NumIterations)
        } else if let Some(f) = i.target_flops {
            (
                (f / (flops_per_token * total_batch_size as f64)).round() as usize,
                Horizon::TargetFlops,
            )
        } else {
            (target_tokens / total_batch_size, Horizon::ParamDataRatio)
        };
        if num_iterations == 0 {
            bail!(
                "the training horizon is 0 steps ({horizon:?} with a batch of {total_batch_size} \
                 tokens); give --num-iterations or a larger target"
            );
        }
        let weight_decay = if target_tokens == 0 {
            i.weight_decay as f64
        } else {
            i.weight_decay as f64 * batch_ratio.sqrt() * d_ref / target_tokens as f64
        };
        let scale = |lr: f32| (lr as f64 * batch_lr_scale) as f32;
        Ok(Recipe {
            scaling_params,
            target_tokens,
            d_ref,
            total_batch_size,
            batch_auto,
            batch_lr_scale,
            num_iterations,
            horizon,
            flops_per_token,
            embedding_lr: scale(i.embedding_lr),
            unembedding_lr: scale(i.unembedding_lr),
            matrix_lr: scale(i.matrix_lr),
            scalar_lr: scale(i.scalar_lr),
            weight_decay: weight_decay as f32,
        })
    }

    /// The derived numbers, worded as nanochat's base_train prints them.
    pub fn describe(&self, i: &RecipeInput, micro_batch_tokens: usize) -> Vec<String> {
        let m = &i.model;
        let thousands = |n: usize| {
            let s = n.to_string();
            let mut out = String::new();
            for (k, c) in s.chars().enumerate() {
                if k > 0 && (s.len() - k).is_multiple_of(3) {
                    out.push(',');
                }
                out.push(c);
            }
            out
        };
        let mut lines = vec![
            "Parameter counts:".to_string(),
            format!("{:24}: {}", "transformer_matrices", thousands(m.transformer_matrix_params())),
            format!("{:24}: {}", "lm_head", thousands(m.padded_vocab_size() * m.n_embd)),
            format!("Estimated FLOPs per token: {:e}", self.flops_per_token),
        ];
        if self.batch_auto {
            lines.push(format!(
                "Auto-computed optimal batch size: {} tokens",
                thousands(self.total_batch_size)
            ));
        }
        if self.total_batch_size != B_REF {
            lines.push(format!(
                "Scaling LRs by {:.4} for batch size {} (reference: {})",
                self.batch_lr_scale,
                thousands(self.total_batch_size),
                thousands(B_REF)
            ));
        }
        if self.weight_decay != i.weight_decay {
            lines.push(format!(
                "Scaling weight decay from {:.6} to {:.6} for depth {}",
                i.weight_decay, self.weight_decay, m.n_layer
            ));
        }
        lines.push(match self.horizon {
            Horizon::NumIterations => {
                format!(
                    "Using user-provided number of iterations: {}",
                    thousands(self.num_iterations)
                )
            }
            Horizon::TargetFlops => format!(
                "Calculated number of iterations from target FLOPs: {}",
                thousands(self.num_iterations)
            ),
            Horizon::ParamDataRatio => format!(
                "Calculated number of iterations from target data:param ratio: {}",
                thousands(self.num_iterations)
            ),
        });
        let total_tokens = self.total_batch_size * self.num_iterations;
        lines.push(format!("Total number of training tokens: {}", thousands(total_tokens)));
        lines.push(format!(
            "Tokens : Scaling params ratio: {:.2}",
            total_tokens as f64 / self.scaling_params as f64
        ));
        lines.push(format!(
            "Total training FLOPs estimate: {:e}",
            self.flops_per_token * total_tokens as f64
        ));
        lines.push(format!("Tokens / micro-batch: {}", thousands(micro_batch_tokens)));
        if micro_batch_tokens > 0 && self.total_batch_size.is_multiple_of(micro_batch_tokens) {
            lines.push(format!(
                "Total batch size {} => gradient accumulation steps: {}",
                thousands(self.total_batch_size),
                self.total_batch_size / micro_batch_tokens
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nanochat's defaults: aspect 64, head dim 128, context 2048, vocab 32768, pattern SSSL.
    fn input(depth: usize) -> RecipeInput {
        RecipeInput {
            model: GPTConfig::from_depth(depth, 64, 128, 2048, 32768, "SSSL").unwrap(),
            aspect_ratio: 64,
            head_dim: 128,
            target_param_data_ratio: 12.0,
            total_batch_size: None,
            num_iterations: None,
            target_flops: None,
            embedding_lr: 0.3,
            unembedding_lr: 0.008,
            matrix_lr: 0.02,
            scalar_lr: 0.5,
            weight_decay: 0.28,
        }
    }

    /// The scaling parameters written out by hand from the architecture: 12 C^2 per layer, a
    /// value-embedding gate of (heads x 12) on every other layer counted from the last, and a
    /// (32768 x C) lm_head; C = 64 * depth rounded up to a multiple of 128.
    fn scaling_params_by_hand(depth: usize) -> f64 {
        let c = (64 * depth).div_ceil(128) * 128;
        let heads = c / 128;
        let ve_layers = (0..depth).filter(|i| i % 2 == (depth - 1) % 2).count();
        (depth * 12 * c * c + ve_layers * heads * 12 + 32768 * c) as f64
    }

    /// The formulas of docs/reference.md "Batch sizing", evaluated independently of the code.
    fn expected(depth: usize) -> (usize, f64, f64, usize) {
        let d = 12.0 * scaling_params_by_hand(depth);
        let d_ref = 12.0 * scaling_params_by_hand(12);
        let b = 2f64.powf((524288.0 * (d / d_ref).powf(0.383)).log2().round());
        let lr_scale = (b / 524288.0).sqrt();
        let wd = 0.28 * (b / 524288.0).sqrt() * d_ref / d.floor();
        (b as usize, lr_scale, wd, (d.floor() / b) as usize)
    }

    #[test]
    fn derived_batch_lrs_and_weight_decay_follow_the_formulas() {
        for depth in [4, 12, 20] {
            let r = Recipe::derive(&input(depth)).unwrap();
            let (b, lr_scale, wd, steps) = expected(depth);
            assert_eq!(r.total_batch_size, b, "depth {depth}");
            assert!(r.batch_auto);
            assert!((r.batch_lr_scale - lr_scale).abs() < 1e-12, "depth {depth}");
            assert!((r.matrix_lr as f64 - 0.02 * lr_scale).abs() < 1e-8, "depth {depth}");
            assert!((r.embedding_lr as f64 - 0.3 * lr_scale).abs() < 1e-7, "depth {depth}");
            assert!((r.unembedding_lr as f64 - 0.008 * lr_scale).abs() < 1e-8, "depth {depth}");
            assert!((r.scalar_lr as f64 - 0.5 * lr_scale).abs() < 1e-7, "depth {depth}");
            assert!((r.weight_decay as f64 - wd).abs() < 1e-6 * wd, "depth {depth}: {r:?}");
            assert_eq!(r.num_iterations, steps, "depth {depth}");
            assert_eq!(r.horizon, Horizon::ParamDataRatio);
        }
    }

    /// Values worked out once by hand for the record: d12 is the reference itself, d20 doubles
    /// the batch (as nanochat's speedrun logs show) and d4 halves it.
    #[test]
    fn known_values() {
        let d12 = Recipe::derive(&input(12)).unwrap();
        assert_eq!((d12.total_batch_size, d12.batch_lr_scale), (B_REF, 1.0));
        assert!((d12.weight_decay - 0.28).abs() < 1e-7);
        assert_eq!(d12.num_iterations, 12 * 110_100_912 / B_REF);
        let d20 = Recipe::derive(&input(20)).unwrap();
        assert_eq!((d20.total_batch_size, d20.num_iterations), (1 << 20, 4980));
        assert!((d20.weight_decay - 0.10019).abs() < 1e-4, "{}", d20.weight_decay);
        let d4 = Recipe::derive(&input(4)).unwrap();
        assert_eq!((d4.total_batch_size, d4.num_iterations), (1 << 18, 528));
    }

    #[test]
    fn explicit_batch_and_horizons() {
        let mut i = input(12);
        i.total_batch_size = Some(B_REF / 4);
        let r = Recipe::derive(&i).unwrap();
        assert!(!r.batch_auto);
        assert!((r.batch_lr_scale - 0.5).abs() < 1e-12);
        assert!((r.weight_decay - 0.14).abs() < 1e-7);
        i.target_flops = Some(1e18);
        let r = Recipe::derive(&i).unwrap();
        assert_eq!(r.horizon, Horizon::TargetFlops);
        let flops = i.model.flops_per_token() * (B_REF / 4) as f64;
        assert_eq!(r.num_iterations, (1e18 / flops).round() as usize);
        i.num_iterations = Some(7);
        assert_eq!(Recipe::derive(&i).unwrap().num_iterations, 7);
        i.num_iterations = Some(0);
        assert!(Recipe::derive(&i).is_err());
    }
}
