//! CORE over a bundle: each task's rows loaded, selected and scored (`core.rs`), accuracies
//! centered, their mean reported with the tasks that had no data named.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_model::Gpt;
use femtochat_model::tokenizer::Tokenizer;
use serde_json::{Value, json};

use super::bundle::Bundle;
use super::core::{centered, evaluate_rows, select_rows};
use crate::tasks::read_jsonl;

#[derive(Clone, Debug, Default)]
pub struct CoreOptions {
    /// At most this many rows per task (after nanochat's shuffle).
    pub max_per_task: Option<usize>,
    /// Only these labels (empty: every task of the bundle).
    pub tasks: Vec<String>,
    /// A progress bar per task on stderr.
    pub show_progress: bool,
    /// Under MPI, each rank scores its share of every task's rows and the counts are summed
    /// (`train eval`); off for the training-time evaluator, which rank 0 runs alone.
    pub split: bool,
}

#[derive(Clone, Debug)]
pub struct CoreTaskResult {
    pub task: String,
    pub accuracy: f64,
    pub centered: f64,
    pub n: usize,
}

#[derive(Clone, Debug)]
pub struct CoreReport {
    pub tasks: Vec<CoreTaskResult>,
    /// Mean centered accuracy over `tasks`.
    pub core: f64,
    /// Tasks of the bundle whose data file is absent.
    pub missing: Vec<String>,
}

impl CoreReport {
    /// One JSON line per task, then the summary.
    pub fn lines(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .tasks
            .iter()
            .map(|t| json!({ "task": t.task, "accuracy": t.accuracy, "centered": t.centered, "n": t.n }))
            .collect();
        out.push(json!({ "core": self.core, "tasks": self.tasks.len(), "missing": self.missing }));
        out
    }
}

pub fn run(gpt: &Gpt, tok: &Tokenizer, bundle: &Bundle, opts: &CoreOptions) -> Result<CoreReport> {
    for want in &opts.tasks {
        if !bundle.tasks.iter().any(|t| &t.label == want) {
            bail!("no task {want:?} in {}/core.yaml", bundle.dir.display());
        }
    }
    let mut results = Vec::new();
    let mut missing = Vec::new();
    for task in &bundle.tasks {
        if !opts.tasks.is_empty() && !opts.tasks.contains(&task.label) {
            continue;
        }
        let Some(file) = bundle.data_file(task) else {
            missing.push(task.label.clone());
            continue;
        };
        let rows = select_rows(read_jsonl(&file)?, opts.max_per_task);
        if rows.is_empty() {
            bail!("{}: no rows", file.display());
        }
        let range = if opts.split { crate::dist::share(rows.len()) } else { 0..rows.len() };
        if opts.split {
            crate::dist::say_share(&task.label, &range, rows.len());
        }
        let bar = opts.show_progress.then(|| super::bar(range.len(), &task.label));
        let correct = evaluate_rows(gpt, tok, task, &rows, range, |k| {
            if let Some(b) = &bar {
                b.inc(k as u64);
            }
        })
        .with_context(|| format!("CORE task {}", task.label))?;
        if let Some(b) = bar {
            b.finish();
        }
        let mut solved = [correct.iter().filter(|&&c| c).count() as f64];
        if opts.split {
            crate::dist::sum_counts(&mut solved)?;
        }
        let accuracy = solved[0] / rows.len() as f64;
        results.push(CoreTaskResult {
            task: task.label.clone(),
            accuracy,
            centered: centered(accuracy, task.random_baseline),
            n: rows.len(),
        });
    }
    if results.is_empty() {
        bail!("no CORE task had data in {}", bundle.dir.display());
    }
    let core = results.iter().map(|r| r.centered).sum::<f64>() / results.len() as f64;
    Ok(CoreReport { tasks: results, core, missing })
}

/// CORE as a training-time evaluator (`train base --core-every`): logs `core` to metrics.jsonl
/// and appends the per-task lines to RUN_DIR/eval/core.jsonl.
pub struct CoreEvaluator {
    tok: Arc<Tokenizer>,
    bundle: Bundle,
    opts: CoreOptions,
    run_dir: PathBuf,
}

impl CoreEvaluator {
    pub fn new(
        tok: Arc<Tokenizer>,
        bundle: Bundle,
        max_per_task: usize,
        run_dir: PathBuf,
    ) -> CoreEvaluator {
        let opts = CoreOptions {
            max_per_task: Some(max_per_task),
            tasks: Vec::new(),
            show_progress: false,
            split: false,
        };
        CoreEvaluator { tok, bundle, opts, run_dir }
    }
}

impl crate::trainer::Evaluator for CoreEvaluator {
    fn evaluate(&mut self, step: usize, gpt: &Gpt) -> Result<Vec<(String, f64)>> {
        let report = run(gpt, &self.tok, &self.bundle, &self.opts)?;
        super::append(&self.run_dir, "core", step, &report.lines())?;
        Ok(vec![("core".into(), report.core)])
    }
}
