//! `train eval`: score a checkpoint as nanochat's evaluators do.
//!
//! - `core`: the DCLM CORE metric over an eval bundle (default: the 20 tasks in
//!   data/eval/core/), as nanochat's base_eval (`core.rs`);
//! - `bpb`: validation bits per byte (`bpb.rs`);
//! - `chat`: ARC / MMLU (categorical), GSM8K / HumanEval / SpellingBee (generative) and
//!   ChatCORE, as nanochat's chat_eval (`chat.rs`, tasks in `crate::tasks`).
//!
//! Every command prints one JSON line per task and a summary line on stdout, appends the same
//! lines (with the checkpoint's step) to `RUN_DIR/eval/<command>.jsonl`, and shows a progress
//! bar per task on stderr.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};
use femtochat_engine::Device;
use femtochat_model::Gpt;
use femtochat_model::checkpoint::{latest_checkpoint, load_run};
use femtochat_model::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

pub mod bpb;
pub mod bundle;
pub mod chat;
pub mod core;
pub mod core_run;
pub mod execution;

use crate::tasks::{self, Task};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

/// What every evaluation loads.
#[derive(ClapArgs)]
struct Model {
    /// Run directory written by `train` (its newest checkpoint and its tokenizer/).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Tokenizer directory (default: RUN_DIR/tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// cpu (every core) or gpu.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

#[derive(Subcommand)]
enum Command {
    /// The CORE metric (DCLM; nanochat's base_eval): centered accuracy per task and their mean.
    ///
    /// Rows are subsampled and few-shot examples drawn exactly as nanochat does, so
    /// --max-per-task N evaluates the same examples. The bundled data has 20 of the 22 CORE
    /// tasks (squad and coqa are missing: the summary names them and CORE is their mean over
    /// the tasks present).
    Core {
        #[command(flatten)]
        model: Model,
        /// An eval bundle in nanochat's eval_bundle/ layout (default: data/eval/core).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Evaluate at most N rows per task (nanochat's --max-per-task).
        #[arg(long)]
        max_per_task: Option<usize>,
        /// Only these task labels (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
    },
    /// Validation bits per byte.
    Bpb {
        #[command(flatten)]
        model: Model,
        /// Text files (default: the validation split of the bundled corpus, data/val.jsonl.gz).
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// Tokens to evaluate.
        #[arg(long, default_value_t = 1 << 20)]
        tokens: usize,
        /// Rows per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
    /// nanochat's chat evaluation: per-task accuracy and ChatCORE.
    Chat {
        #[command(flatten)]
        model: Model,
        /// Tasks (comma-separated): arc-easy, arc-challenge, mmlu, gsm8k, humaneval, spellingbee.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "arc-easy,arc-challenge,mmlu,gsm8k,humaneval,spellingbee"
        )]
        tasks: Vec<String>,
        /// Evaluate only the first N problems of each task.
        #[arg(long)]
        max_problems: Option<usize>,
        /// Folder of the task files (default: data/eval/chat).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens a generated completion may have.
        #[arg(long, default_value_t = 512)]
        max_new_tokens: usize,
        /// Prompts per forward (categorical) and rows decoded together (generative).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
}

impl Model {
    fn load(&self) -> Result<(Gpt, Tokenizer, usize)> {
        self.device.ensure_available().with_context(|| format!("--device {}", self.device))?;
        let (gpt, tok) = load_run(&self.checkpoint, self.tokenizer.as_deref())
            .with_context(|| format!("loading {}", self.checkpoint.display()))?;
        let step = latest_checkpoint(&self.checkpoint)?.map_or(0, |(_, s)| s);
        Ok((gpt.to_device(self.device)?, tok, step))
    }
}

/// A progress bar on stderr for one task.
pub fn bar(len: usize, name: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>28} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_string());
    bar
}

/// Print `lines` on stdout and append them, each with `"step"`, to `RUN_DIR/eval/<kind>.jsonl`.
pub fn emit(run_dir: &Path, kind: &str, step: usize, lines: &[Value]) -> Result<()> {
    for line in lines {
        println!("{line}");
    }
    append(run_dir, kind, step, lines)
}

/// Append `lines`, each with `"step"`, to `RUN_DIR/eval/<kind>.jsonl`.
pub fn append(run_dir: &Path, kind: &str, step: usize, lines: &[Value]) -> Result<()> {
    let dir = run_dir.join("eval");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{kind}.jsonl"));
    let mut text = String::new();
    for line in lines {
        let mut l = line.clone();
        if let Some(o) = l.as_object_mut() {
            o.insert("step".into(), json!(step));
        }
        text += &format!("{l}\n");
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // One write per evaluation, so concurrent appends do not interleave lines.
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The chat tasks named on the command line, loaded from `dir`.
pub fn load_chat_tasks(names: &[String], dir: &Path) -> Result<Vec<Arc<dyn Task>>> {
    use crate::tasks::spelling::{Split, load_words};
    let mut out: Vec<Arc<dyn Task>> = Vec::new();
    for name in names {
        let t: Arc<dyn Task> = match name.as_str() {
            "arc-easy" => {
                Arc::new(tasks::Ai2Arc::load(&dir.join("arc/ARC-Easy-test.jsonl.gz"), name)?)
            }
            "arc-challenge" => {
                Arc::new(tasks::Ai2Arc::load(&dir.join("arc/ARC-Challenge-test.jsonl.gz"), name)?)
            }
            "mmlu" => Arc::new(tasks::Mmlu::load(&dir.join("mmlu/mmlu_test.jsonl.gz"))?),
            "gsm8k" => Arc::new(tasks::Gsm8k::load(&dir.join("gsm8k/test.jsonl.gz"))?),
            "humaneval" => {
                Arc::new(tasks::HumanEval::load(&dir.join("humaneval/HumanEval.jsonl.gz"))?)
            }
            "spellingbee" => Arc::new(tasks::SpellingBee::new(
                load_words(&dir.join("words_alpha.txt.gz"))?,
                256,
                Split::Test,
            )),
            other => bail!(
                "unknown chat task {other:?} (arc-easy, arc-challenge, mmlu, gsm8k, humaneval, spellingbee)"
            ),
        };
        out.push(t);
    }
    Ok(out)
}

pub fn main(args: Args) -> Result<()> {
    match args.command {
        Command::Core { model, bundle, max_per_task, tasks } => {
            let (gpt, tok, step) = model.load()?;
            let dir = match bundle {
                Some(d) => d,
                None => tasks::bundled("data/eval/core")?,
            };
            let bundle = bundle::Bundle::load(&dir)?;
            let lead = crate::dist::is_lead();
            let opts =
                core_run::CoreOptions { max_per_task, tasks, show_progress: lead, split: true };
            let report = core_run::run(&gpt, &tok, &bundle, &opts)?;
            if !lead {
                return Ok(());
            }
            emit(&model.checkpoint, "core", step, &report.lines())
        }
        Command::Bpb { model, data, tokens, batch } => {
            let (gpt, tok, step) = model.load()?;
            let files = if data.is_empty() {
                vec![crate::base::default_data()?.join("val.jsonl.gz")]
            } else {
                crate::docs::expand(&data)?
            };
            // Not split over MPI ranks: every rank computes the same number, rank 0 reports it.
            let (bpb, n) = bpb::run(&gpt, Arc::new(tok), files, tokens, batch)?;
            if !crate::dist::is_lead() {
                return Ok(());
            }
            emit(&model.checkpoint, "bpb", step, &[json!({ "bpb": bpb, "tokens": n })])
        }
        Command::Chat { model, tasks, max_problems, data, max_new_tokens, batch_size } => {
            let (gpt, tok, step) = model.load()?;
            let dir = match data {
                Some(d) => d,
                None => tasks::chat_data_dir()?,
            };
            let tasks = load_chat_tasks(&tasks, &dir)?;
            let opts = chat::ChatOptions {
                max_problems,
                batch_size,
                gen_rows: batch_size,
                max_new_tokens,
                split: true,
                ..Default::default()
            };
            let lead = crate::dist::is_lead();
            let mut current: Option<(String, ProgressBar)> = None;
            let report = chat::run(&gpt, &tok, &tasks, &opts, |name, done, total| {
                if !lead {
                    return;
                }
                if current.as_ref().is_none_or(|(n, _)| n != name) {
                    if let Some((_, b)) = current.take() {
                        b.finish();
                    }
                    current = Some((name.to_string(), bar(total, name)));
                }
                if let Some((_, b)) = &current {
                    b.set_position(done as u64);
                }
            })?;
            if let Some((_, b)) = current {
                b.finish();
            }
            if !lead {
                return Ok(());
            }
            emit(&model.checkpoint, "chat", step, &report.lines())
        }
    }
}

#[cfg(test)]
mod core_tests;

#[cfg(test)]
mod chat_tests;
