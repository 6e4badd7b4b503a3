//! `train sft` and `train mid`: fine-tune a base run on conversations, as nanochat's
//! `chat_sft.py` (and its earlier `mid_train.py`) do, on the shared trainer and run layout.
//!
//! SFT: conversations packed best-fit with BOS padding (none is ever cut across rows), only the
//! assistant's tokens learned (the rendering's mask; tool outputs are not); the batch geometry
//! and the learning rates inherited from the base run unless given, every LR times
//! `--init-lr-frac` (0.8), no warmup, a linear warmdown over the last half to 0, Muon momentum
//! 0.85 -> 0.95 over 300 steps, no weight decay; the optimizer warm-started from the base
//! checkpoint; one epoch unless `--num-iterations`.
//!
//! mid: the same mixture packed as pretraining packs documents (best fit, cropping), every token
//! learned, the LRs at 1x, the warmdown over the last 20%.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Device, MuonAdamW};
use femtochat_model::Recompute;
use femtochat_model::checkpoint::load_model;
use femtochat_model::tokenizer::Tokenizer;

use crate::base::{check_fits, fraction, learning_rate};
use crate::chat_data::{self, ConvLoader, ConvValSet, Packing, Source};
use crate::loader::Prefetch;
use crate::rundir::{self, ResumeInputs, RunRecord};
use crate::tasks::{Task, TaskMixture};
use crate::trainer::{self, Cadence, LrSchedule, Settings, Trainer};

/// Micro-batches rendered and packed ahead of the model.
const PREFETCH_BATCHES: usize = 4;

/// Which chat stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Sft,
    Mid,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Mid => "mid",
        }
    }
    fn packing(self) -> Packing {
        match self {
            Stage::Sft => Packing::SFT,
            Stage::Mid => Packing::MID,
        }
    }
    fn init_lr_frac(self) -> f64 {
        match self {
            Stage::Sft => 0.8,
            Stage::Mid => 1.0,
        }
    }
    fn warmdown_ratio(self) -> f64 {
        match self {
            Stage::Sft => 0.5,
            Stage::Mid => 0.2,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The run to fine-tune (base, mid or imported): its latest checkpoint, tokenizer and
    /// settings.
    #[arg(long)]
    base: PathBuf,
    /// Run directory (same layout as `train base`; `serve --checkpoint` loads it).
    #[arg(long)]
    out: PathBuf,
    /// Training data, repeatable: PATH[:EPOCHS] (conversations as JSONL/JSONL.gz/parquet with
    /// `messages`, multiple-choice {question, choices, answer}, or GSM8K {question, answer}
    /// rows), spellingbee=N or simplespelling=N. Default: the mixture bundled in data/sft/.
    #[arg(long, num_args = 1..)]
    data: Vec<Source>,
    /// Validation conversations (default: data/sft/oasst1_en_validation.jsonl.gz, held out).
    #[arg(long, num_args = 1..)]
    val: Vec<Source>,
    /// Epochs of the multiple-choice rows in the default mixture (nanochat: 3).
    #[arg(long, default_value_t = 3)]
    mmlu_epochs: usize,
    /// Epochs of GSM8K train in the default mixture (nanochat: 4).
    #[arg(long, default_value_t = 4)]
    gsm8k_epochs: usize,
    #[command(flatten)]
    run: rundir::RunFlags,
    /// Skip conversations that are malformed (roles out of order, empty content, unknown role),
    /// counting them, instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,

    /// Optimizer steps (default: one epoch of the mixture).
    #[arg(long)]
    num_iterations: Option<usize>,
    /// Sequences per forward pass (default: the base run's).
    #[arg(long)]
    device_batch_size: Option<usize>,
    /// Tokens per optimizer step (default: the base run's).
    #[arg(long)]
    total_batch_size: Option<usize>,
    /// AdamW LR of the token embedding (default: the base run's flag, before its batch scaling).
    #[arg(long, value_parser = learning_rate)]
    embedding_lr: Option<f32>,
    /// AdamW LR of the lm_head (default: the base run's flag).
    #[arg(long, value_parser = learning_rate)]
    unembedding_lr: Option<f32>,
    /// Muon LR of the block matrices (default: the base run's flag).
    #[arg(long, value_parser = learning_rate)]
    matrix_lr: Option<f32>,
    /// AdamW LR of the per-layer scalars (default: 0.5, setup_optimizer's).
    #[arg(long, value_parser = learning_rate)]
    scalar_lr: Option<f32>,
    /// Every LR times this at the start (sft: 0.8, mid: 1.0).
    #[arg(long, value_parser = fraction)]
    init_lr_frac: Option<f64>,
    /// Fraction of the run spent warming up.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    warmup_ratio: f64,
    /// Fraction of the run spent in the final linear warmdown (sft: 0.5, mid: 0.2).
    #[arg(long, value_parser = fraction)]
    warmdown_ratio: Option<f64>,
    /// LR multiplier at the end of the warmdown.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    final_lr_frac: f64,
    /// Warm-start the optimizer state (momentum buffers) from the base checkpoint.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    load_optimizer: bool,

    /// Evaluate validation bits per byte every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    eval_every: usize,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = 32768)]
    eval_tokens: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    save_every: usize,
    /// Run the chat evaluation (ChatCORE over ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval,
    /// SpellingBee) every N steps and at the end, as nanochat's SFT does (0: never; nanochat:
    /// 200, slow on a CPU).
    #[arg(long, default_value_t = 0)]
    chatcore_every: usize,
    /// Problems per task for --chatcore-every (nanochat: 24 for generative tasks).
    #[arg(long, default_value_t = 24)]
    chatcore_max_problems: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Peak FLOP/s of the device, for the MFU in the progress bar.
    #[arg(long)]
    peak_flops: Option<f64>,
    /// cpu or gpu.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Activation checkpointing, as `train base --recompute`: none, blocks, every-K, all or
    /// sublayers.
    #[arg(long, default_value = "none")]
    recompute: Recompute,
    /// Write the first N micro-batches this run would train on to OUT_FILE as little-endian
    /// i32 (per micro-batch: inputs, then targets, each B x T) and exit without training;
    /// for comparing the packing with another implementation (benches/sft_vs_nanochat.py).
    #[arg(long, num_args = 2, value_names = ["N", "OUT_FILE"])]
    dump_batches: Vec<String>,
}

/// The base run a chat stage starts from.
struct Base {
    dir: PathBuf,
    ckpt: PathBuf,
    state: trainer::CheckpointState,
    /// The base run's flags (its run.json), for LR inheritance.
    flags: BTreeMap<String, String>,
}

fn open_base(dir: &Path) -> Result<Base> {
    let (ckpt, _) = trainer::latest_in(dir)?.with_context(|| {
        format!(
            "--base {}: no checkpoint (no latest.json); train a base model first",
            dir.display()
        )
    })?;
    let state = trainer::read_state(&ckpt)?;
    let flags = rundir::read_run_file::<RunRecord>(dir)?.map(|r| r.flags).unwrap_or_default();
    Ok(Base { dir: dir.to_path_buf(), ckpt, state, flags })
}

/// The stage's fixed flags, resolved against the base run (what run.json records).
fn resolve(a: &Args, stage: Stage, base: &Base) -> Result<BTreeMap<String, String>> {
    let inherited = |name: &str, fallback: f32| -> f32 {
        base.flags.get(name).and_then(|v| v.parse().ok()).unwrap_or(fallback)
    };
    let s = &base.state.settings;
    let dbs = a.device_batch_size.unwrap_or(s.device_batch_size);
    let total = a.total_batch_size.unwrap_or(s.tokens_per_step());
    let sources = |v: &[Source]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_string(), v);
    };
    put("base", base.dir.display().to_string());
    put("data", if a.data.is_empty() { "default".into() } else { sources(&a.data) });
    put("val", if a.val.is_empty() { "default".into() } else { sources(&a.val) });
    put("mmlu_epochs", a.mmlu_epochs.to_string());
    put("gsm8k_epochs", a.gsm8k_epochs.to_string());
    put("device_batch_size", dbs.to_string());
    put("total_batch_size", total.to_string());
    // nanochat's fallbacks when the base run did not record its LRs.
    put(
        "embedding_lr",
        a.embedding_lr.unwrap_or_else(|| inherited("embedding_lr", 0.3)).to_string(),
    );
    put(
        "unembedding_lr",
        a.unembedding_lr.unwrap_or_else(|| inherited("unembedding_lr", 0.004)).to_string(),
    );
    put("matrix_lr", a.matrix_lr.unwrap_or_else(|| inherited("matrix_lr", 0.02)).to_string());
    put("scalar_lr", a.scalar_lr.unwrap_or(0.5).to_string());
    put("init_lr_frac", a.init_lr_frac.unwrap_or(stage.init_lr_frac()).to_string());
    put("warmup_ratio", a.warmup_ratio.to_string());
    put("warmdown_ratio", a.warmdown_ratio.unwrap_or(stage.warmdown_ratio()).to_string());
    put("final_lr_frac", a.final_lr_frac.to_string());
    put("load_optimizer", a.load_optimizer.to_string());
    put("seed", a.seed.to_string());
    Ok(f)
}

fn num<T: std::str::FromStr>(flags: &BTreeMap<String, String>, k: &str) -> Result<T> {
    flags
        .get(k)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("flag {k} is missing or invalid"))
}

fn settings(
    a: &Args,
    stage: Stage,
    base: &Base,
    f: &BTreeMap<String, String>,
    data: &dyn Task,
    tok: &Tokenizer,
) -> Result<Settings> {
    let model = base.state.settings.model.clone();
    let (dbs, total): (usize, usize) = (num(f, "device_batch_size")?, num(f, "total_batch_size")?);
    let micro = dbs * model.sequence_len;
    if micro == 0 || total == 0 || !total.is_multiple_of(micro) {
        bail!(
            "the total batch of {total} tokens is not a positive multiple of the device batch \
             ({dbs}) x the model's context ({}) = {micro}; give --total-batch-size or \
             --device-batch-size",
            model.sequence_len
        );
    }
    let grad_accum = total / micro;
    let num_iterations = match a.num_iterations {
        Some(0) => bail!("--num-iterations must be positive"),
        Some(n) => n,
        None => {
            eprintln!("counting the steps of one epoch of {} conversations...", data.len());
            chat_data::epoch_steps(data, tok, dbs, model.sequence_len, stage.packing(), grad_accum)?
        }
    };
    Ok(Settings {
        model,
        device_batch_size: dbs,
        grad_accum_steps: grad_accum,
        num_iterations,
        warmup_steps: 0,
        warmdown_ratio: num(f, "warmdown_ratio")?,
        final_lr_frac: num(f, "final_lr_frac")?,
        unembedding_lr: num(f, "unembedding_lr")?,
        embedding_lr: num(f, "embedding_lr")?,
        matrix_lr: num(f, "matrix_lr")?,
        scalar_lr: num(f, "scalar_lr")?,
        // Base training decays the Muon weight decay to 0; SFT continues without it.
        weight_decay: 0.0,
        lr_schedule: LrSchedule::Chat { warmup_ratio: num(f, "warmup_ratio")? },
        lr_scale: num::<f64>(f, "init_lr_frac")? as f32,
        eval_every: a.eval_every,
        save_every: a.save_every,
        sample_every: 0,
        seed: a.seed,
    })
}

fn sources(a: &Args) -> Result<(Vec<Source>, Vec<Source>)> {
    let train = if a.data.is_empty() {
        chat_data::default_sources(a.mmlu_epochs, a.gsm8k_epochs)?
    } else {
        a.data.clone()
    };
    let val = if a.val.is_empty() { chat_data::default_val_sources()? } else { a.val.clone() };
    Ok((train, val))
}

fn mixture(sources: &[Source], skip_bad: bool) -> Result<Arc<dyn Task>> {
    let (tasks, skipped) = chat_data::tasks(sources, skip_bad)?;
    if skipped > 0 {
        eprintln!("skipped {skipped} malformed conversations (--skip-bad)");
    }
    Ok(Arc::new(TaskMixture::new(tasks)))
}

pub fn main(a: Args, stage: Stage, explicit: &BTreeSet<String>) -> Result<()> {
    a.device.ensure_available().with_context(|| format!("--device {}", a.device))?;
    let (train_sources, val_sources) = sources(&a)?;
    let (files, val_files) =
        (chat_data::source_files(&train_sources), chat_data::source_files(&val_sources));
    let packing = stage.packing();
    let (mut trainer, tok, mut loader, _lock) = if a.run.resume {
        // Over several ranks, rank 0 alone locks and checks the run directory.
        let (lock, record) = if crate::dist::is_lead() {
            let (lock, record) = rundir::begin_resume(&a.out)?;
            (Some(lock), record)
        } else {
            (None, None)
        };
        let tok = Arc::new(
            Tokenizer::load(&a.out.join("tokenizer"))
                .with_context(|| format!("loading {}", a.out.join("tokenizer").display()))?,
        );
        if let Some(r) = &record {
            let flags: BTreeMap<String, String> = explicit_flags(&a, explicit);
            let now = ResumeInputs {
                explicit,
                flags: &flags,
                data: &files,
                val: &val_files,
                tokenizer: None,
                force: a.run.force,
            };
            rundir::check_resume(&a.out, r, &now)?;
        }
        let data = mixture(&train_sources, a.skip_bad)?;
        let (ckpt, step) = Trainer::latest(&a.out)?.context("no checkpoint")?;
        eprintln!("resuming from {} (step {step})", ckpt.display());
        let saved = trainer::read_state(&ckpt)?.settings;
        let mut loader = prefetch(&data, &tok, &saved, packing)?;
        let mut trainer =
            Trainer::resume(&a.out, &mut loader, record.as_ref().map(|r| r.run_id.as_str()))?;
        trainer.apply_resume_flags(
            explicit,
            a.num_iterations,
            Cadence { eval_every: a.eval_every, save_every: a.save_every, sample_every: 0 },
        )?;
        (trainer, tok, loader, lock)
    } else {
        let base = open_base(&a.base)?;
        let tok = Arc::new(Tokenizer::load(&a.base.join("tokenizer")).with_context(|| {
            format!("loading the base run's tokenizer {}", a.base.join("tokenizer").display())
        })?);
        let data = mixture(&train_sources, a.skip_bad)?;
        let flags = resolve(&a, stage, &base)?;
        let s = settings(&a, stage, &base, &flags, data.as_ref(), &tok)?;
        check_fits(&s.model, s.device_batch_size, a.device)?;
        if let [n, path] = a.dump_batches.as_slice() {
            let n: usize = n.parse().context("--dump-batches N must be a number")?;
            return dump_batches(&data, &tok, &s, packing, n, Path::new(path));
        }
        let model_path = base.ckpt.join("model.safetensors");
        let (gpt, meta) = load_model(&model_path)?;
        if meta.config != s.model {
            bail!("{} holds a model of another config than its state.json", model_path.display());
        }
        if gpt.config().vocab_size != tok.vocab_size() {
            bail!(
                "the base model's vocab ({}) differs from its tokenizer's ({})",
                gpt.config().vocab_size,
                tok.vocab_size()
            );
        }
        let mut opt = MuonAdamW::new(s.param_groups(), gpt.params())?;
        let opt_path = base.ckpt.join("optimizer.safetensors");
        if a.load_optimizer {
            // One process's optimizer.safetensors, or the shards of a run over several ranks.
            if crate::dist::optim::load_any(&base.ckpt, &mut opt)? {
                eprintln!(
                    "warm-started the optimizer from {} (momentum buffers; LRs reset)",
                    base.ckpt.display()
                );
            } else {
                eprintln!(
                    "warning: {} is missing: starting with a fresh optimizer",
                    opt_path.display()
                );
            }
        }
        // Check the validation data before touching the output directory.
        ConvValSet::new(
            mixture(&val_sources, a.skip_bad)?,
            tok.clone(),
            s.device_batch_size,
            s.model.sequence_len,
            packing,
            s.model.sequence_len,
        )?;
        // Over several ranks, rank 0 sets up the run directory; the others learn its run id.
        let (lock, run_id) = if crate::dist::is_lead() {
            let lock = rundir::begin_new(&a.out, a.run.overwrite)?;
            tok.save(&a.out.join("tokenizer"))?;
            let details = serde_json::json!({
                "base": { "dir": base.dir, "checkpoint": base.ckpt, "step": base.state.step, "run_id": base.state.run_id, "config": s.model },
                "mixture": train_sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "conversations": data.len(),
            });
            let record = RunRecord::new(
                &a.out,
                stage.name(),
                flags,
                &files,
                &val_files,
                a.eval_tokens,
                details,
            )?;
            rundir::write_run_file(&a.out, &record)?;
            (Some(lock), record.run_id)
        } else {
            (None, String::new())
        };
        let run_id = crate::dist::broadcast_string(run_id)?;
        eprintln!(
            "{}: {} conversations from {} sources; {} steps of {} tokens (device batch {} x {}, {} accumulation steps); LRs x {}",
            stage.name(),
            data.len(),
            train_sources.len(),
            s.num_iterations,
            s.tokens_per_step(),
            s.device_batch_size,
            s.model.sequence_len,
            s.grad_accum_steps,
            s.lr_scale
        );
        let loader = prefetch(&data, &tok, &s, packing)?;
        let trainer = Trainer::start(s, gpt, opt, &a.out, &run_id)?;
        (trainer, tok, loader, lock)
    };
    if trainer.step() >= trainer.settings.num_iterations {
        eprintln!(
            "{} is complete at step {}; nothing to do (extend it with --num-iterations)",
            a.out.display(),
            trainer.step()
        );
        return Ok(());
    }
    let s = trainer.settings.clone();
    let eval_tokens = rundir::read_run_file::<RunRecord>(&a.out)?
        .and_then(|r| r.eval_tokens)
        .filter(|_| !explicit.contains("eval_tokens"))
        .unwrap_or(a.eval_tokens);
    let mut val = ConvValSet::new(
        mixture(&val_sources, a.skip_bad)?,
        tok.clone(),
        s.device_batch_size,
        s.model.sequence_len,
        packing,
        eval_tokens,
    )?;
    trainer = trainer.with_device(a.device)?;
    trainer.gpt.set_recompute(a.recompute);
    if a.chatcore_every > 0 {
        let names: Vec<String> =
            ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spellingbee"]
                .map(String::from)
                .to_vec();
        let tasks = crate::eval::load_chat_tasks(&names, &crate::tasks::chat_data_dir()?)?;
        let opts = crate::eval::chat::ChatOptions {
            max_problems: Some(a.chatcore_max_problems),
            batch_size: s.device_batch_size,
            gen_rows: s.device_batch_size,
            ..Default::default()
        };
        let evaluator = crate::eval::chat::ChatEvaluator {
            tok: tok.clone(),
            tasks,
            opts,
            run_dir: a.out.clone(),
        };
        trainer.set_evaluator(a.chatcore_every, Box::new(evaluator));
    }
    eprintln!("device: {}; validation {} tokens", a.device.describe(), val.tokens());
    let mut share = crate::dist::Strided::of_world(&mut loader);
    trainer::train_with_progress(&mut trainer, &mut share, Some(&mut val), None, a.peak_flops)?;
    Ok(())
}

/// The fixed flags the user gave on this command line, as strings (for the resume check).
fn explicit_flags(a: &Args, explicit: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let sources = |v: &[Source]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    let mut put = |k: &str, v: Option<String>| {
        if explicit.contains(k)
            && let Some(v) = v
        {
            f.insert(k.to_string(), v);
        }
    };
    put("base", Some(a.base.display().to_string()));
    put("data", Some(sources(&a.data)));
    put("val", Some(sources(&a.val)));
    put("mmlu_epochs", Some(a.mmlu_epochs.to_string()));
    put("gsm8k_epochs", Some(a.gsm8k_epochs.to_string()));
    put("device_batch_size", a.device_batch_size.map(|v| v.to_string()));
    put("total_batch_size", a.total_batch_size.map(|v| v.to_string()));
    put("embedding_lr", a.embedding_lr.map(|v| v.to_string()));
    put("unembedding_lr", a.unembedding_lr.map(|v| v.to_string()));
    put("matrix_lr", a.matrix_lr.map(|v| v.to_string()));
    put("scalar_lr", a.scalar_lr.map(|v| v.to_string()));
    put("init_lr_frac", a.init_lr_frac.map(|v| v.to_string()));
    put("warmup_ratio", Some(a.warmup_ratio.to_string()));
    put("warmdown_ratio", a.warmdown_ratio.map(|v| v.to_string()));
    put("final_lr_frac", Some(a.final_lr_frac.to_string()));
    put("load_optimizer", Some(a.load_optimizer.to_string()));
    put("seed", Some(a.seed.to_string()));
    f
}

fn dump_batches(
    data: &Arc<dyn Task>,
    tok: &Arc<Tokenizer>,
    s: &Settings,
    packing: Packing,
    n: usize,
    path: &Path,
) -> Result<()> {
    use crate::trainer::BatchSource;
    let mut loader = ConvLoader::new(
        data.clone(),
        tok.clone(),
        s.device_batch_size,
        s.model.sequence_len,
        packing,
    )?;
    let mut bytes = Vec::new();
    for _ in 0..n {
        let b = loader.next_batch()?;
        bytes.extend(b.inputs.iter().flat_map(|&x| (x as i32).to_le_bytes()));
        bytes.extend(b.targets.iter().flat_map(|&x| x.to_le_bytes()));
    }
    femtochat_model::checkpoint::write_atomic(path, &bytes)?;
    eprintln!(
        "wrote {n} micro-batches of {} x {} to {}",
        s.device_batch_size,
        s.model.sequence_len,
        path.display()
    );
    Ok(())
}

fn prefetch(
    data: &Arc<dyn Task>,
    tok: &Arc<Tokenizer>,
    s: &Settings,
    packing: Packing,
) -> Result<Prefetch<ConvLoader>> {
    let loader = ConvLoader::new(
        data.clone(),
        tok.clone(),
        s.device_batch_size,
        s.model.sequence_len,
        packing,
    )?;
    Prefetch::new(loader, PREFETCH_BATCHES)
}
