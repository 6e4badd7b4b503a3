//! How much host memory a training step needs, without running it (`train bench --dry-run`):
//! the same quantities the engine's accounting measures (`femtochat_engine::mem`), counted from
//! the shapes the forward records.
//!
//! A step's peak is at the end of the backward: the parameters, the optimizer state, every
//! parameter gradient, the activations the forward kept (all of them without recomputation),
//! and the buffers the engine's recycler holds for the next step (the largest gradients in
//! flight, which are freed into it). With recomputation the forward keeps only segment inputs,
//! and one segment's activations are rebuilt at a time.
//!
//! Counts are in f32 elements per token unless named otherwise; `tests/memory.rs` in the train
//! crate checks the total against the measured peak.
use serde::Serialize;

use crate::config::{GPTConfig, SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS};
use crate::gpt::{loss_chunk_rows, param_shapes};
use crate::recompute::Recompute;

/// Estimated bytes of one training step, by kind; `total` is the estimated peak.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    pub params: u64,
    pub optimizer: u64,
    pub grads: u64,
    /// Kept by the forward for the backward.
    pub activations: u64,
    /// Rebuilt by the backward at once (one segment's activations), 0 without recomputation.
    pub recomputed: u64,
    /// Gradient buffers in flight during the backward, and held by the recycler after it.
    pub transient: u64,
    pub total: u64,
}

/// Elements the forward keeps per token inside block `i`: every op result (reshapes share
/// storage and add nothing) plus the rms norms' and attention's saved row statistics.
fn block_floats(c: &GPTConfig, i: usize) -> u64 {
    let (ce, d) = (c.n_embd as u64, c.head_dim() as u64);
    let (h, hkv) = (c.n_head as u64, c.n_kv_head as u64);
    let (hd, kvd) = (h * d, hkv * d);
    // x mix (2 products, a sum), norm, the residual sums and the mlp's output projection.
    let resid = 3 * ce + ce + 2 * ce + ce + ce;
    let qkv = hd + 2 * kvd;
    // rope, norm, scale of q and of k; attention output; output projection
    let attn = 3 * hd + 3 * kvd + hd + ce;
    let mlp = 4 * ce + 4 * ce + ce; // c_fc, relu2, the norm before it
    let stats = 1 + h + hkv + h + 1; // rstd of 2 norms, q/k norm rstds, lse
    let ve = if c.has_value_embed(i) {
        // embedding, gate (narrow, linear, sigmoid, scale), gated ve, v + ve
        kvd + VE_GATE_CHANNELS as u64 + 3 * hkv + 2 * kvd
    } else {
        0
    };
    resid + qkv + attn + mlp + stats + ve
}

/// Of `block_floats`, those of the MLP half (norm, c_fc, relu2, projection, residual sum, the
/// norm's rstd): what a `sublayers` segment of that half rebuilds.
fn mlp_half_floats(c: &GPTConfig) -> u64 {
    let ce = c.n_embd as u64;
    ce + 4 * ce + 4 * ce + ce + ce + 1
}

/// Elements kept per token outside the blocks: embedding, norm and smear before them, backout
/// and the final norm after.
fn trunk_floats(c: &GPTConfig) -> u64 {
    let ce = c.n_embd as u64;
    let smear = 2 * ce + SMEAR_GATE_CHANNELS as u64 + 3 + 3 * ce; // cur, prev, gate; product, sum, cat
    2 * ce + 1 + smear + 3 * ce + 1
}

/// Elements kept per token by the lm head and loss: logits (padded), cut to the vocab,
/// soft-capped; the loss's log-sum-exp.
fn head_floats(c: &GPTConfig) -> u64 {
    (c.padded_vocab_size() + 2 * c.vocab_size) as u64 + 2
}

/// Estimate the peak host bytes of a training step of `c` on (b, t) tokens with MuonAdamW.
pub fn estimate_train_step(c: &GPTConfig, b: usize, t: usize, r: Recompute) -> MemoryEstimate {
    let tokens = (b * t) as u64;
    let shapes = param_shapes(c);
    let params: u64 = shapes.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
    // Muon (the block matrices): momentum + a factored second moment; AdamW: two moments.
    let optimizer: u64 = shapes
        .iter()
        .map(|(n, s)| {
            let numel = s.iter().product::<usize>() as u64;
            if n.starts_with("transformer.h.") && s.len() == 2 {
                numel + s[0].max(s[1]) as u64
            } else {
                2 * numel
            }
        })
        .sum();
    let ce = c.n_embd as u64;
    let blocks: Vec<u64> = (0..c.n_layer).map(|i| block_floats(c, i)).collect();
    let segments = r.segments(c.n_layer, c.n_layer / 2);
    let (kept_blocks, recomputed) = if segments.is_empty() {
        (blocks.iter().sum::<u64>(), 0)
    } else if r.sublayers() {
        // Two (B, T, C) inputs per block; the larger half of the largest block is rebuilt.
        let mlp = mlp_half_floats(c);
        let largest = blocks.iter().map(|&f| mlp.max(f - mlp)).max();
        (2 * c.n_layer as u64 * ce, largest.unwrap_or(0))
    } else {
        // One (B, T, C) output per segment; the largest segment is rebuilt in the backward.
        let largest = segments.iter().map(|&(s, e)| blocks[s..e].iter().sum::<u64>()).max();
        (segments.len() as u64 * ce, largest.unwrap_or(0))
    };
    // The share of the rows in one lm-head chunk (all of them, unless the head is recomputed).
    let chunk = (loss_chunk_rows(c, r, b * t) as f64 / tokens.max(1) as f64).min(1.0);
    let chunked = |floats: u64| (floats as f64 * chunk).ceil() as u64;
    let head = head_floats(c);
    let (kept_head, recomputed) =
        if r.head() { (ce + 2, recomputed.max(chunked(head))) } else { (head, recomputed) };
    let activations = kept_blocks + trunk_floats(c) + kept_head;
    // In flight and then recycled: two (rows, vocab) gradients at the head's start (of one
    // chunk's rows when the head is recomputed), and a few (rows, C) / (rows, 4C) ones through
    // the blocks.
    let head_grads = 2 * c.vocab_size as u64;
    let head_grads = if r.head() { chunked(head_grads) } else { head_grads };
    let transient = head_grads + 3 * ce + 2 * 4 * ce;
    let f = 4u64; // bytes per f32
    let (params, optimizer, grads) = (params * f, optimizer * f, params * f);
    let activations = activations * tokens * f;
    let recomputed = recomputed * tokens * f;
    let transient = transient * tokens * f;
    MemoryEstimate {
        params,
        optimizer,
        grads,
        activations,
        recomputed,
        transient,
        total: params + optimizer + grads + activations + recomputed + transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recomputation_shrinks_the_estimate_and_keeps_the_static_part() {
        let c = GPTConfig::from_depth(6, 64, 64, 1024, 8192, "L").unwrap();
        let none = estimate_train_step(&c, 4, 1024, Recompute::None);
        let blocks = estimate_train_step(&c, 4, 1024, Recompute::Blocks);
        let all = estimate_train_step(&c, 4, 1024, Recompute::All);
        let sub = estimate_train_step(&c, 4, 1024, Recompute::Sublayers);
        assert!(sub.total < all.total && sub.recomputed < all.recomputed);
        assert_eq!(
            (none.params, none.optimizer, none.grads),
            (blocks.params, blocks.optimizer, blocks.grads)
        );
        assert!(blocks.total < none.total && all.total < blocks.total);
        assert_eq!(none.recomputed, 0);
        // Activations scale with tokens; the static part does not.
        let half = estimate_train_step(&c, 2, 1024, Recompute::None);
        assert_eq!(half.activations * 2, none.activations);
        assert_eq!(half.params, none.params);
    }
}
