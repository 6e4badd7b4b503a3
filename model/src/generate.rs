//! Autoregressive generation for one sequence with a KV cache: prefill the prompt, then decode
//! one token at a time until a stop token, `max_new` tokens, or the caller says stop.
use femtochat_engine::Ids;

use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::kv_cache::KvCache;
use crate::sampler::Sampler;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was sampled (it is the last token returned).
    Stop,
    /// `max_new` tokens were generated, or the context is full.
    Length,
    /// `on_token` returned false.
    Cancelled,
}

/// Generate after `prompt`; `on_token` sees each new token as it is sampled (return false to
/// stop). Returns the new tokens and why generation ended.
pub fn generate(
    gpt: &Gpt,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_new: usize,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, Finish)> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("generation needs a non-empty prompt".into()));
    }
    let capacity = (prompt.len() + max_new).min(gpt.max_positions());
    if prompt.len() >= capacity && max_new > 0 {
        return Err(ModelError::ContextFull { pos: 0, len: prompt.len(), capacity });
    }
    let mut cache = KvCache::with_rows(gpt.config(), 1, capacity);
    let prompt_ids = Ids::new(prompt.to_vec(), &[1, prompt.len()])?;
    let mut last = gpt.forward_cached_last(&prompt_ids, &mut cache)?.try_to_vec()?; // (1, V)
    let mut out = Vec::new();
    loop {
        if out.len() >= max_new || cache.position(0) >= capacity {
            return Ok((out, Finish::Length));
        }
        let tok = sampler.sample(&last, &out)?;
        out.push(tok);
        if !on_token(tok) {
            return Ok((out, Finish::Cancelled));
        }
        if stop.contains(&tok) {
            return Ok((out, Finish::Stop));
        }
        if out.len() >= max_new {
            return Ok((out, Finish::Length));
        }
        last = gpt.forward_cached(&Ids::new(vec![tok], &[1, 1])?, &mut cache)?.try_to_vec()?;
    }
}
