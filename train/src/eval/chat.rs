//! nanochat's chat evaluation (scripts/chat_eval.py) over `tasks::Task`s.
//!
//! Categorical tasks (ARC, MMLU): prompts batched and padded with BOS; the answer is the argmax
//! of the logits at the last prompt position restricted to the example's answer letters.
//! Generative tasks (GSM8K, HumanEval, SpellingBee): a completion is generated (greedy by
//! default, the calculator active), decoded, and checked by the task. ChatCORE is the mean
//! centered accuracy (baseline 0.25 for the 4-choice tasks, 0 for generative ones).
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_engine::Ids;
use femtochat_model::Gpt;
use femtochat_model::generate::generate_batch;
use femtochat_model::sampler::SamplingParams;
use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::tokenizer::{Conversation, DEFAULT_MAX_TOKENS};
use serde::Serialize;

use crate::tasks::{EvalKind, Task};

/// How to run the chat evaluation.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// Evaluate only the first N problems of each task (None: all).
    pub max_problems: Option<usize>,
    /// Prompts per forward pass for categorical tasks (nanochat: 8).
    pub batch_size: usize,
    /// Rows decoded together for generative tasks.
    pub gen_rows: usize,
    /// Tokens a completion may have (nanochat: 512).
    pub max_new_tokens: usize,
    /// Sampling of completions (nanochat: temperature 0, top-k 50).
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Under MPI, each rank evaluates its share of every task's problems and the counts are
    /// summed (`train eval chat`); the result equals one process's for greedy decoding (the
    /// default). Off for the training-time evaluator, which rank 0 runs alone.
    pub split: bool,
}

impl Default for ChatOptions {
    fn default() -> ChatOptions {
        ChatOptions {
            max_problems: None,
            batch_size: 8,
            gen_rows: 8,
            max_new_tokens: 512,
            sampling: SamplingParams { temperature: 0.0, top_k: Some(50), ..Default::default() },
            seed: 42,
            split: false,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub accuracy: f64,
    pub n: usize,
    #[serde(skip)]
    pub centered: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatReport {
    pub tasks: Vec<TaskResult>,
    /// Mean centered accuracy over `tasks`.
    pub chatcore: f64,
}

impl ChatReport {
    /// One JSON line per task and the ChatCORE line, as `train eval chat` prints them.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let mut lines: Vec<serde_json::Value> = self
            .tasks
            .iter()
            .map(|r| serde_json::json!({ "task": r.task, "accuracy": r.accuracy, "n": r.n }))
            .collect();
        let names: Vec<&str> = self.tasks.iter().map(|r| r.task.as_str()).collect();
        lines.push(serde_json::json!({ "chatcore": self.chatcore, "tasks": names }));
        lines
    }
}

/// ChatCORE as a training-time evaluator (`train sft --chatcore-every`): logs `chatcore` (and
/// each task's accuracy) to metrics.jsonl and appends the lines to RUN_DIR/eval/chat.jsonl.
pub struct ChatEvaluator {
    pub tok: Arc<Tokenizer>,
    pub tasks: Vec<Arc<dyn Task>>,
    pub opts: ChatOptions,
    pub run_dir: std::path::PathBuf,
}

impl crate::trainer::Evaluator for ChatEvaluator {
    fn evaluate(&mut self, step: usize, gpt: &Gpt) -> Result<Vec<(String, f64)>> {
        let report = run(gpt, &self.tok, &self.tasks, &self.opts, |_, _, _| {})?;
        super::append(&self.run_dir, "chat", step, &report.lines())?;
        let mut out = vec![("chatcore".to_string(), report.chatcore)];
        out.extend(report.tasks.iter().map(|r| (format!("chat/{}", r.task), r.accuracy)));
        Ok(out)
    }
}

/// nanochat's random-guess baseline of a task.
pub fn baseline(kind: EvalKind) -> f64 {
    match kind {
        EvalKind::Categorical => 0.25,
        EvalKind::Generative => 0.0,
    }
}

/// Evaluate `gpt` on each task; `progress(task, done, total)` is called as problems finish.
pub fn run(
    gpt: &Gpt,
    tok: &Tokenizer,
    tasks: &[Arc<dyn Task>],
    opts: &ChatOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<ChatReport> {
    if tasks.is_empty() {
        bail!("no chat tasks to evaluate");
    }
    let mut results = Vec::new();
    for task in tasks {
        let n = opts.max_problems.map_or(task.len(), |m| m.min(task.len()));
        if n == 0 {
            bail!("task {} has no problems to evaluate", task.name());
        }
        let range = if opts.split { crate::dist::share(n) } else { 0..n };
        if opts.split {
            crate::dist::say_share(task.name(), &range, n);
        }
        let mine = range.len();
        let mut report = |done| progress(task.name(), done, mine);
        let passed = match task.kind() {
            EvalKind::Categorical => {
                categorical(gpt, tok, task.as_ref(), range, opts.batch_size, &mut report)?
            }
            EvalKind::Generative => generative(gpt, tok, task.as_ref(), range, opts, &mut report)?,
        };
        let mut solved = [passed as f64];
        if opts.split {
            crate::dist::sum_counts(&mut solved)?;
        }
        let accuracy = solved[0] / n as f64;
        let b = baseline(task.kind());
        results.push(TaskResult {
            task: task.name().to_string(),
            accuracy,
            n,
            centered: (accuracy - b) / (1.0 - b),
        });
    }
    let chatcore = results.iter().map(|r| r.centered).sum::<f64>() / results.len() as f64;
    Ok(ChatReport { tasks: results, chatcore })
}

/// nanochat's `render_for_completion`: the conversation without its last (assistant) message,
/// rendered and cut to 2048 tokens like any rendering there, then `<|assistant_start|>`.
pub fn prompt_ids(tok: &Tokenizer, conv: &Conversation) -> Result<Vec<u32>> {
    let mut c = conv.clone();
    match c.messages.pop() {
        Some(m) if m.role == "assistant" => {}
        _ => bail!("the last message of a task's conversation must be the assistant's"),
    }
    let (mut ids, _) = tok.render_conversation(&c, DEFAULT_MAX_TOKENS)?;
    ids.push(tok.special("<|assistant_start|>")?);
    Ok(ids)
}

/// Problems of `range` solved, scored by the letter with the largest logit.
fn categorical(
    gpt: &Gpt,
    tok: &Tokenizer,
    task: &dyn Task,
    range: Range<usize>,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<usize> {
    let bos = tok.bos();
    let mut passed = 0;
    for i0 in range.clone().step_by(batch.max(1)) {
        let i1 = (i0 + batch.max(1)).min(range.end);
        let prompts = (i0..i1)
            .map(|i| prompt_ids(tok, &task.conversation(i)?))
            .collect::<Result<Vec<_>>>()?;
        let t = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(prompts.len() * t);
        let mut positions = Vec::new();
        for (b, p) in prompts.iter().enumerate() {
            ids.extend_from_slice(p);
            ids.extend(std::iter::repeat_n(bos, t - p.len()));
            positions.push((b * t + p.len() - 1) as u32);
        }
        let logits = gpt.logits_at(&Ids::new(ids, &[prompts.len(), t])?, &positions)?.to_vec();
        let v = gpt.config().vocab_size;
        for (b, i) in (i0..i1).enumerate() {
            let letters = task.letters(i);
            let z = &logits[b * v..(b + 1) * v];
            let mut best: Option<(usize, f32)> = None;
            for (k, letter) in letters.iter().enumerate() {
                let id = match tok.encode(letter).as_slice() {
                    [id] => *id as usize,
                    other => bail!("answer letter {letter:?} is {} tokens, not one", other.len()),
                };
                // torch's argmax keeps the first of equal values.
                if best.is_none_or(|(_, v)| z[id] > v) {
                    best = Some((k, z[id]));
                }
            }
            let (k, _) =
                best.with_context(|| format!("{} #{i} has no answer letters", task.name()))?;
            passed += task.evaluate(i, &letters[k])? as usize;
        }
        progress(i1 - range.start);
    }
    Ok(passed)
}

/// Problems of `range` solved, each by one generated completion.
fn generative(
    gpt: &Gpt,
    tok: &Tokenizer,
    task: &dyn Task,
    range: Range<usize>,
    opts: &ChatOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<usize> {
    let mut passed = 0;
    let rows = opts.gen_rows.max(1);
    for i0 in range.clone().step_by(rows) {
        let i1 = (i0 + rows).min(range.end);
        let prompts = (i0..i1)
            .map(|i| prompt_ids(tok, &task.conversation(i)?))
            .collect::<Result<Vec<_>>>()?;
        let outs = generate_batch(
            gpt,
            tok,
            &prompts,
            &opts.sampling,
            opts.max_new_tokens,
            rows,
            opts.seed + i0 as u64,
        )?;
        for (i, ids) in (i0..i1).zip(outs) {
            let completion = tok.decode(&ids)?;
            passed += task.evaluate(i, &completion)? as usize;
        }
        progress(i1 - range.start);
    }
    Ok(passed)
}
