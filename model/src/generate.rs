//! Autoregressive generation with a KV cache: `generate` for one sequence (prefill the prompt,
//! then decode one token at a time until a stop token, `max_new` tokens, or the caller says
//! stop), and `generate_batch` for many prompts decoded together with the calculator tool active
//! (chat evaluation, RL rollouts).
use femtochat_engine::Ids;

use crate::decode::Decoder;
use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::kv_cache::KvCache;
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::tool::ToolState;

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
    let first = gpt.forward_cached_last(&prompt_ids, &mut cache)?.try_to_vec()?; // (1, V)
    let mut dec = Decoder::new();
    let mut last: &[f32] = &first;
    let mut out = Vec::new();
    loop {
        if out.len() >= max_new || cache.position(0) >= capacity {
            return Ok((out, Finish::Length));
        }
        let tok = sampler.sample(last, &out)?;
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
        last = gpt.decode_step(&[tok], &mut cache, &mut dec)?;
    }
}

/// Replies to many prompts, as nanochat's `Engine.generate_batch` gives them one at a time: each
/// row samples until `<|assistant_end|>` or `<|bos|>` (not returned), `max_new` tokens, or a full
/// context, with the calculator forcing its answers into the stream. Prompts are prefilled one
/// by one and decoded together, `max_rows` at a time; row `i` samples with seed `seed + i`.
pub fn generate_batch(
    gpt: &Gpt,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    max_new: usize,
    max_rows: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let stop = [tok.special("<|assistant_end|>")?, tok.bos()];
    let v = gpt.config().vocab_size;
    let mut out = vec![Vec::new(); prompts.len()];
    for group in (0..prompts.len()).collect::<Vec<_>>().chunks(max_rows.max(1)) {
        let longest = group.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
        let capacity = (longest + max_new).min(gpt.max_positions());
        let mut cache = KvCache::new(gpt.config(), capacity);
        let mut dec = Decoder::new();
        // Per active row: its prompt index, sampler, tool state, last logits.
        let mut rows = Vec::new();
        for &i in group {
            let p = &prompts[i];
            if p.is_empty() || p.len() >= capacity {
                return Err(ModelError::ContextFull { pos: 0, len: p.len(), capacity });
            }
            let mut one = KvCache::with_rows(gpt.config(), 1, capacity);
            let logits = gpt.forward_cached(&Ids::new(p.clone(), &[1, p.len()])?, &mut one)?;
            cache.absorb(one)?;
            let last = logits.data()[(p.len() - 1) * v..].to_vec();
            rows.push((
                i,
                Sampler::new(params.clone(), seed + i as u64)?,
                ToolState::new(tok)?,
                last,
            ));
        }
        while !rows.is_empty() {
            let mut next = Vec::with_capacity(rows.len());
            let mut done = Vec::new();
            for (r, (i, sampler, tool, last)) in rows.iter_mut().enumerate() {
                let sampled = if tool.has_forced() { 0 } else { sampler.sample(last, &out[*i])? };
                let t = tool.next(sampled, tok);
                next.push(t);
                if stop.contains(&t) {
                    done.push(r);
                    continue;
                }
                out[*i].push(t);
                if out[*i].len() >= max_new || cache.position(r) + 1 > capacity {
                    done.push(r);
                }
            }
            for &r in done.iter().rev() {
                rows.remove(r);
                next.remove(r);
                cache.take_row(r)?;
            }
            if rows.is_empty() {
                break;
            }
            gpt.decode_step(&next, &mut cache, &mut dec)?;
            for (r, row) in rows.iter_mut().enumerate() {
                row.3.copy_from_slice(dec.logits(r, v));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GPTConfig;
    use crate::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN, parse_tiktoken};

    /// Greedy rows decoded together give what each prompt gives alone.
    #[test]
    fn batched_greedy_equals_one_at_a_time() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
        let text = std::fs::read_to_string(p).unwrap();
        let tok =
            Tokenizer::new(parse_tiktoken(&text).unwrap(), &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap();
        let config = GPTConfig {
            sequence_len: 64,
            vocab_size: tok.vocab_size(),
            n_layer: 2,
            n_head: 2,
            n_kv_head: 2,
            n_embd: 32,
            window_pattern: "L".into(),
        };
        let gpt = Gpt::init(config, 5).unwrap();
        let mut rng = crate::rng::Rng::new(1);
        for (name, t) in gpt.params().iter() {
            let s = if name == "lm_head.weight" { 200.0 } else { 1.0 };
            t.with_data_mut(|d| d.iter_mut().for_each(|x| *x = (*x + 0.05 * rng.normal()) * s))
                .unwrap();
        }
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let prompts: Vec<Vec<u32>> = ["Once upon", "The king said that", "A"]
            .iter()
            .map(|s| std::iter::once(tok.bos()).chain(tok.encode(s)).collect())
            .collect();
        let together = generate_batch(&gpt, &tok, &prompts, &greedy, 12, 3, 0).unwrap();
        let stop = [tok.special("<|assistant_end|>").unwrap(), tok.bos()];
        for (p, got) in prompts.iter().zip(&together) {
            let mut s = Sampler::new(greedy.clone(), 0).unwrap();
            let (mut alone, finish) = generate(&gpt, p, &mut s, 12, &stop, |_| true).unwrap();
            if finish == Finish::Stop {
                alone.pop();
            }
            assert_eq!(got, &alone);
        }
    }
}
