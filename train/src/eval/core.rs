//! The DCLM CORE metric as nanochat's core_eval.py computes it.
//!
//! Per task: rows shuffled by `random.Random(1337)` and cut to `--max-per-task`; for row `idx`
//! the few-shot examples are `random.Random(1234 + idx).sample(other rows, k)`; prompts are
//! rendered as nanochat's Jinja templates render them, tokenized with BOS, and scored:
//! multiple choice and schema by the lowest mean loss over each option's scoring span (after the
//! choices' common prefix / before the contexts' common suffix), language modeling by an exact
//! greedy match of the continuation. Accuracy is centered by the task's random baseline; CORE
//! is the mean centered accuracy.
//!
//! Speed: the sequences of many rows go through the model together (sorted by length, packed
//! to a token budget), and the lm head runs only at the positions that are scored.
use anyhow::{Context, Result, bail};
use femtochat_engine::{Ids, no_grad};
use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::{Gpt, KvCache};
use serde_json::Value;

use super::bundle::{CoreTask, TaskType};
use crate::pyrandom::PyRandom;
use crate::tasks::humaneval::py_strip;

/// Tokens per forward pass (rows x padded length) when scoring.
pub const BATCH_TOKENS: usize = 8192;

/// One scored sequence: its tokens and the span [start, end) whose tokens are scored.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub end: usize,
}

/// A row of a task, as the templates read it.
fn field<'a>(row: &'a Value, key: &str) -> Result<&'a Value> {
    row.get(key).with_context(|| format!("row without `{key}`"))
}

/// Jinja's `{{ value }}`: strings as they are, other values as Python's str() would print them.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

fn index<'a>(list: &'a Value, key: &str, i: &Value) -> Result<&'a Value> {
    let i = i.as_u64().with_context(|| format!("`gold` must be an index into `{key}`"))?;
    list.get(i as usize).with_context(|| format!("`gold` {i} is past the end of `{key}`"))
}

/// The prompts of one row: one per choice (multiple choice), one per context option (schema),
/// or [without, with] the continuation (language modeling).
pub fn render(task: &CoreTask, row: &Value, fewshot: &[&Value]) -> Result<Vec<String>> {
    let d = &task.continuation_delimiter;
    let mut shots = String::new();
    for ex in fewshot {
        match task.task_type {
            TaskType::MultipleChoice => {
                let gold = index(field(ex, "choices")?, "choices", field(ex, "gold")?)?;
                shots += &format!("{}{d}{}\n\n", show(field(ex, "query")?), show(gold));
            }
            TaskType::Schema => {
                let ctx =
                    index(field(ex, "context_options")?, "context_options", field(ex, "gold")?)?;
                shots += &format!("{}{d}{}\n\n", show(ctx), show(field(ex, "continuation")?));
            }
            TaskType::LanguageModeling => {
                let ctx = show(field(ex, "context")?);
                shots += &format!("{}{d}{}\n\n", py_strip(&ctx), show(field(ex, "continuation")?));
            }
        }
    }
    let list = |key: &str| -> Result<Vec<String>> {
        let v = field(row, key)?.as_array().with_context(|| format!("`{key}` must be a list"))?;
        Ok(v.iter().map(show).collect())
    };
    Ok(match task.task_type {
        TaskType::MultipleChoice => {
            let query = show(field(row, "query")?);
            list("choices")?.iter().map(|c| format!("{shots}{query}{d}{c}")).collect()
        }
        TaskType::Schema => {
            let cont = show(field(row, "continuation")?);
            list("context_options")?.iter().map(|c| format!("{shots}{c}{d}{cont}")).collect()
        }
        TaskType::LanguageModeling => {
            let ctx = show(field(row, "context")?);
            let without = format!("{shots}{}{d}", py_strip(&ctx));
            let with = format!("{without}{}", show(field(row, "continuation")?));
            vec![py_strip(&without).to_string(), with]
        }
    })
}

/// Length of the common prefix (`from_end` false) or suffix of token sequences.
pub fn common_length(seqs: &[Vec<u32>], from_end: bool) -> usize {
    let min = seqs.iter().map(Vec::len).min().unwrap_or(0);
    let at = |s: &Vec<u32>, i: usize| if from_end { s[s.len() - 1 - i] } else { s[i] };
    (0..min).find(|&i| seqs.iter().any(|s| at(s, i) != at(&seqs[0], i))).unwrap_or(min)
}

/// Tokenize the prompts with BOS and find each one's scoring span; then crop from the left to
/// `max_len` tokens, as nanochat does for models with a length limit.
pub fn spans(
    task_type: TaskType,
    tok: &Tokenizer,
    prompts: &[String],
    max_len: usize,
) -> Result<Vec<Scored>> {
    let bos = tok.bos();
    let tokens: Vec<Vec<u32>> =
        prompts.iter().map(|p| std::iter::once(bos).chain(tok.encode(p)).collect()).collect();
    let mut out: Vec<Scored> = match task_type {
        TaskType::MultipleChoice => {
            let start = common_length(&tokens, false);
            tokens.into_iter().map(|t| Scored { start, end: t.len(), tokens: t }).collect()
        }
        TaskType::Schema => {
            let suffix = common_length(&tokens, true);
            tokens
                .into_iter()
                .map(|t| Scored { start: t.len() - suffix, end: t.len(), tokens: t })
                .collect()
        }
        TaskType::LanguageModeling => {
            let [without, with] = <[Vec<u32>; 2]>::try_from(tokens)
                .map_err(|_| anyhow::anyhow!("a language-modeling row renders two prompts"))?;
            if without.len() >= with.len() || with[..without.len()] != without[..] {
                bail!(
                    "the prompt without the continuation does not tokenize to a prefix of the prompt with it"
                );
            }
            vec![Scored { start: without.len(), end: with.len(), tokens: with }]
        }
    };
    for s in &mut out {
        if s.tokens.len() > max_len {
            let crop = s.tokens.len() - max_len;
            if s.start <= crop {
                bail!(
                    "cropping {crop} tokens to the model's {max_len} would cut into the scored span"
                );
            }
            s.tokens.drain(..crop);
            s.start -= crop;
            s.end -= crop;
        }
    }
    Ok(out)
}

/// What the model says about one scored span: the mean loss over its tokens, and whether the
/// greedy prediction equals every one of them.
#[derive(Clone, Copy, Debug)]
pub struct SpanResult {
    pub mean_loss: f64,
    pub greedy_match: bool,
}

/// Score many spans: the trunk over batches of similar-length sequences (padded with BOS, which
/// causal attention never lets earlier positions see), the lm head at the scored positions only.
pub fn score(gpt: &Gpt, pad: u32, seqs: &[Scored], batch_tokens: usize) -> Result<Vec<SpanResult>> {
    let _g = no_grad();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].tokens.len()));
    let mut out = vec![SpanResult { mean_loss: f64::NAN, greedy_match: false }; seqs.len()];
    let mut k = 0;
    while k < order.len() {
        let t = seqs[order[k]].tokens.len();
        let rows = (batch_tokens / t.max(1)).clamp(1, order.len() - k);
        let batch = &order[k..k + rows];
        k += rows;
        let mut ids = Vec::with_capacity(rows * t);
        let mut positions = Vec::new();
        for (b, &i) in batch.iter().enumerate() {
            let s = &seqs[i];
            ids.extend_from_slice(&s.tokens);
            ids.extend(std::iter::repeat_n(pad, t - s.tokens.len()));
            // Position p predicts token p + 1: the span's tokens are predicted at start-1..end-1.
            positions.extend((s.start.max(1) - 1..s.end - 1).map(|p| (b * t + p) as u32));
        }
        let logits = gpt.logits_at(&Ids::new(ids, &[rows, t])?, &positions)?; // (P, V)
        let v = logits.shape()[1];
        let data = logits.to_vec();
        let mut row0 = 0;
        for &i in batch {
            let s = &seqs[i];
            let n = s.end - s.start.max(1);
            let mut total = 0.0f64;
            let mut all = true;
            for j in 0..n {
                let z = &data[(row0 + j) * v..(row0 + j + 1) * v];
                let target = s.tokens[s.start.max(1) + j] as usize;
                total += cross_entropy(z, target);
                all &= femtochat_model::sampler::argmax(z) as usize == target;
            }
            row0 += n;
            out[i] = SpanResult { mean_loss: total / n as f64, greedy_match: all };
        }
    }
    Ok(out)
}

/// Score the sequences of one row (the choices of a multiple-choice question, the contexts of a
/// schema question) through their common prefix once: the prefix (the few-shot examples and the
/// question) is prefilled into a KV cache, each sequence continues from its own copy of it, and
/// the prefix's last logits serve every sequence. Same numbers as `score` up to rounding, with
/// the prefix computed once instead of once per choice.
pub fn score_shared(gpt: &Gpt, pad: u32, seqs: &[Scored]) -> Result<Vec<SpanResult>> {
    let _g = no_grad();
    let tokens: Vec<Vec<u32>> = seqs.iter().map(|s| s.tokens.clone()).collect();
    let min_start = seqs.iter().map(|s| s.start).min().unwrap_or(0);
    let p = common_length(&tokens, false).min(min_start);
    if p == 0 || seqs.len() < 2 {
        // Cropped sequences need not share even their first token.
        return score(gpt, pad, seqs, BATCH_TOKENS);
    }
    let rest = seqs.iter().map(|s| s.end.saturating_sub(1 + p)).max().unwrap_or(0);
    let capacity = p + rest.max(1);
    let mut base = KvCache::with_rows(gpt.config(), 1, capacity);
    let prefix = Ids::new(tokens[0][..p].to_vec(), &[1, p])?;
    let last = gpt.forward_cached_at(&prefix, &mut base, &[(p - 1) as u32])?.to_vec(); // (V)
    let v = last.len();
    let mut after = Vec::new();
    if rest > 0 {
        let mut cache = base.fork_row(0, seqs.len())?;
        let (mut ids, mut positions) = (Vec::with_capacity(seqs.len() * rest), Vec::new());
        for (b, s) in seqs.iter().enumerate() {
            let mine = &s.tokens[p..s.end.saturating_sub(1).max(p)];
            ids.extend_from_slice(mine);
            ids.extend(std::iter::repeat_n(pad, rest - mine.len()));
            positions
                .extend((s.start.max(p + 1) - 1..s.end - 1).map(|q| (b * rest + q - p) as u32));
        }
        after = gpt
            .forward_cached_at(&Ids::new(ids, &[seqs.len(), rest])?, &mut cache, &positions)?
            .to_vec();
    }
    let mut row = 0;
    let mut out = Vec::with_capacity(seqs.len());
    for s in seqs {
        let (mut total, mut all, mut n) = (0.0f64, true, 0usize);
        for q in s.start - 1..s.end - 1 {
            let z = if q == p - 1 {
                &last[..]
            } else {
                row += 1;
                &after[(row - 1) * v..row * v]
            };
            let target = s.tokens[q + 1] as usize;
            total += cross_entropy(z, target);
            all &= femtochat_model::sampler::argmax(z) as usize == target;
            n += 1;
        }
        out.push(SpanResult { mean_loss: total / n as f64, greedy_match: all });
    }
    Ok(out)
}

/// -log softmax(z)[target], accumulated in f64.
fn cross_entropy(z: &[f32], target: usize) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = z.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - z[target] as f64
}

/// Python's `lst.index(min(lst))`: the first value no later value is strictly below (a NaN
/// first stays the minimum, as in Python).
pub fn argmin_like_python(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate().skip(1) {
        if x < xs[best] {
            best = i;
        }
    }
    best
}

/// The rows a task evaluates: all of them shuffled by `random.Random(1337)`, then the first
/// `max_per_task` (None: all).
pub fn select_rows(mut rows: Vec<Value>, max_per_task: Option<usize>) -> Vec<Value> {
    PyRandom::new(1337).shuffle(&mut rows);
    if let Some(n) = max_per_task {
        rows.truncate(n);
    }
    rows
}

/// Few-shot rows of row `idx`: `random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)`.
pub fn fewshot_indices(idx: usize, n: usize, k: usize) -> Result<Vec<usize>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let picks = PyRandom::new(1234 + idx as i64)
        .sample_indices(n.saturating_sub(1), k)
        .with_context(|| format!("{k} few-shot examples need more than {n} rows"))?;
    Ok(picks.into_iter().map(|p| if p >= idx { p + 1 } else { p }).collect())
}

/// Whether each row of `range` is answered correctly (few-shot examples are drawn from all of
/// `rows`, as in one process, so a range gives the same answers as the whole).
pub fn evaluate_rows(
    gpt: &Gpt,
    tok: &Tokenizer,
    task: &CoreTask,
    rows: &[Value],
    range: std::ops::Range<usize>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<bool>> {
    let max_len = gpt.max_positions();
    // Rows are rendered and scored in chunks so the progress bar moves and memory stays flat.
    const CHUNK: usize = 64;
    let mut correct = Vec::with_capacity(range.len());
    for c0 in range.clone().step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(range.end);
        let mut seqs = Vec::new();
        let mut owner = Vec::new(); // (row, number of sequences)
        for idx in c0..c1 {
            let shots: Vec<&Value> = fewshot_indices(idx, rows.len(), task.num_fewshot)?
                .into_iter()
                .map(|i| &rows[i])
                .collect();
            let ctx = || format!("task {} row {idx}", task.label);
            let prompts = render(task, &rows[idx], &shots).with_context(ctx)?;
            let s = spans(task.task_type, tok, &prompts, max_len).with_context(ctx)?;
            owner.push((idx, s.len()));
            seqs.extend(s);
        }
        let results = match task.task_type {
            TaskType::LanguageModeling => score(gpt, tok.bos(), &seqs, BATCH_TOKENS)?,
            _ => {
                let mut r = Vec::with_capacity(seqs.len());
                let mut k = 0;
                for &(_, n) in &owner {
                    r.extend(score_shared(gpt, tok.bos(), &seqs[k..k + n])?);
                    k += n;
                }
                r
            }
        };
        let mut r = 0;
        for (idx, n) in owner {
            let mine = &results[r..r + n];
            r += n;
            let ok = match task.task_type {
                TaskType::LanguageModeling => mine[0].greedy_match,
                _ => {
                    let losses: Vec<f64> = mine.iter().map(|x| x.mean_loss).collect();
                    let gold =
                        field(&rows[idx], "gold")?.as_u64().context("`gold` must be an index")?;
                    argmin_like_python(&losses) as u64 == gold
                }
            };
            correct.push(ok);
        }
        progress(c1 - c0);
    }
    Ok(correct)
}

/// Centered accuracy: 0 at the random baseline (in percent), 1 at perfect.
pub fn centered(accuracy: f64, random_baseline: f64) -> f64 {
    (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)
}
