//! A randomly initialised run directory (the layout `train` writes: `latest.json`,
//! `step_000000/model.safetensors`, `tokenizer/`) for tests, the load test and demos, so they
//! need no trained checkpoint.
use std::path::Path;

use femtochat_model::checkpoint::{Latest, save_model, write_atomic};
use femtochat_model::rng::Rng;
use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::{GPTConfig, Gpt};

use crate::error::{Result, ServeError};

/// A 2-layer, 64-wide GPT for `vocab_size` tokens and `context` positions.
pub fn tiny_config(vocab_size: usize, context: usize) -> GPTConfig {
    GPTConfig {
        sequence_len: context,
        vocab_size,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 2,
        n_embd: 64,
        window_pattern: "L".into(),
    }
}

/// A model from `seed` whose every weight is perturbed (fresh init zeroes the output
/// projections, which would make attention invisible) and whose logits are spread out (fresh
/// logits are nearly flat, so greedy ties would hinge on rounding).
pub fn tiny_model(config: GPTConfig, seed: u64) -> Result<Gpt> {
    let gpt = Gpt::init(config, seed)?;
    let mut rng = Rng::new(seed ^ 0x5eed);
    for (name, t) in gpt.params().iter() {
        let scale = if name == "lm_head.weight" { 300.0 } else { 1.0 };
        t.with_data_mut(|d| {
            for x in d.iter_mut() {
                *x = (*x + 0.02 * rng.normal()) * scale;
            }
        })
        .map_err(femtochat_model::ModelError::from)?;
    }
    Ok(gpt)
}

/// Write `gpt` and `tok` as a run directory at `dir`.
pub fn write_run(dir: &Path, gpt: &Gpt, tok: &Tokenizer) -> Result<()> {
    let step = dir.join("step_000000");
    std::fs::create_dir_all(&step)?;
    save_model(&step.join("model.safetensors"), gpt, &serde_json::json!({"step": 0}))?;
    tok.save(&dir.join("tokenizer"))?;
    let latest = serde_json::to_vec(&Latest { step: 0, dir: "step_000000".into() })
        .map_err(|e| ServeError::Engine(e.to_string()))?;
    write_atomic(&dir.join("latest.json"), &latest)?;
    Ok(())
}
