//! `train base`: pretraining from one dial (`--depth`), as nanochat's base_train.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_engine::Device;
use femtochat_model::generate::generate;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::{GPTConfig, Recompute};

use crate::docs;
use crate::loader::{BestFitLoader, Prefetch, ValSet};
use crate::recipe::{Recipe, RecipeInput};
use crate::rundir::{self, ResumeInputs, RunLock, RunRecord};
use crate::trainer::{self, BatchSource, Cadence, LrSchedule, Settings, Trainer};

/// Micro-batches the loader thread prepares ahead of the model.
const PREFETCH_BATCHES: usize = 4;

/// Prompts sampled during training to watch the model learn.
const SAMPLE_PROMPTS: [&str; 3] = ["The meaning of life is", "Once upon a time", "The king said"];

#[derive(clap::Args)]
pub struct Args {
    /// Run directory: metrics.jsonl, checkpoints, loss.svg, a copy of the tokenizer. A new run
    /// refuses a directory that already holds one (see --resume, --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer directory (from `train tokenizer`). With --resume, defaults to the run's copy.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Training data: files or directories (.txt, .jsonl, .jsonl.gz, .parquet); the last file is the
    /// validation split unless --val is given. Default: the corpus bundled in data/.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Validation files (default: the last data file).
    #[arg(long, num_args = 1..)]
    val: Vec<PathBuf>,
    #[command(flatten)]
    run: rundir::RunFlags,
    /// Skip records that are not documents (invalid JSON, no `text`), counting them, instead of
    /// stopping at the first one.
    #[arg(long)]
    skip_bad: bool,

    /// Number of layers: the one dial; width and heads follow.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim.
    #[arg(long, default_value_t = 64)]
    aspect_ratio: usize,
    /// Attention head dimension (nanochat: 128; 64 suits CPU-sized models).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Context length (nanochat: 2048; 256 suits CPU-sized models).
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    /// Attention window pattern tiled over layers (L = full, S = quarter context; nanochat: SSSL).
    #[arg(long, default_value = "L")]
    window_pattern: String,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Tokens per optimizer step, a multiple of device_batch_size * max_seq_len. Default:
    /// nanochat's scaling rule, 2^round(log2(2^19 * (D / D_d12)^0.383)) for D training tokens.
    #[arg(long)]
    total_batch_size: Option<usize>,
    /// Optimizer steps (default: from --target-flops, else from --target-param-data-ratio).
    #[arg(long)]
    num_iterations: Option<usize>,
    /// Training FLOPs to spend: steps = round(FLOPs / (FLOPs per token * batch)).
    #[arg(long, value_parser = positive_f64)]
    target_flops: Option<f64>,
    /// Training tokens per scaling parameter when neither --num-iterations nor --target-flops
    /// is given (nanochat: 12).
    #[arg(long, default_value_t = 12.0, value_parser = positive_f64)]
    target_param_data_ratio: f64,

    /// AdamW LR of the lm_head before the batch-size scaling (nanochat's base_train: 0.008).
    #[arg(long, default_value_t = 0.008, value_parser = learning_rate)]
    unembedding_lr: f32,
    /// AdamW LR of the token embedding before the batch-size scaling (base_train: 0.3).
    #[arg(long, default_value_t = 0.3, value_parser = learning_rate)]
    embedding_lr: f32,
    /// Muon LR of the block matrices before the batch-size scaling (base_train: 0.02).
    #[arg(long, default_value_t = 0.02, value_parser = learning_rate)]
    matrix_lr: f32,
    /// AdamW LR of the per-layer scalars before the batch-size scaling (base_train: 0.5).
    #[arg(long, default_value_t = 0.5, value_parser = learning_rate)]
    scalar_lr: f32,
    /// Muon cautious weight decay at d12 (base_train: 0.28); scaled by sqrt(B/B_ref) * D_ref/D,
    /// then cosine-decayed to 0 over the run.
    #[arg(long, default_value_t = 0.28, value_parser = learning_rate)]
    weight_decay: f32,
    #[arg(long, default_value_t = 40)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.65, value_parser = fraction)]
    warmdown_ratio: f64,
    #[arg(long, default_value_t = 0.05, value_parser = fraction)]
    final_lr_frac: f64,

    /// Evaluate validation bits per byte every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = 32768)]
    eval_tokens: usize,
    /// Evaluate CORE every N steps and at the end (0: never), as nanochat's
    /// --core-metric-every; results also go to RUN_DIR/eval/core.jsonl.
    #[arg(long, default_value_t = 0)]
    core_every: usize,
    /// Rows per CORE task for --core-every (nanochat: 500).
    #[arg(long, default_value_t = 500)]
    core_max_per_task: usize,
    /// Print samples every N steps (0: never).
    #[arg(long, default_value_t = 200)]
    sample_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    save_every: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Peak FLOP/s of the device, for the MFU shown in the progress bar (e.g. 67e12 for an
    /// H100's fp32; default: the TFLOP/s alone).
    #[arg(long)]
    peak_flops: Option<f64>,
    /// cpu (rayon + SIMD) or gpu (WGSL kernels through wgpu).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Activation checkpointing: none; blocks (keep one input per block, recompute each block
    /// in the backward); every-K (one input per K blocks); all (blocks, and the lm head + loss);
    /// sublayers (all, with each block's attention and MLP halves as separate segments).
    /// Gradients are unchanged (bit for bit on the CPU); memory drops, steps take longer.
    #[arg(long, default_value = "none")]
    recompute: Recompute,
}

/// A learning rate or weight decay: finite and not negative.
pub fn learning_rate(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s} must be a finite number >= 0"));
    }
    Ok(v)
}

/// A fraction of the run in [0, 1].
pub fn fraction(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} must be between 0 and 1"));
    }
    Ok(v)
}

fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{s} must be a finite number > 0"));
    }
    Ok(v)
}

/// The corpus bundled with the repository (data/ at the workspace root).
pub fn default_data() -> Result<PathBuf> {
    let candidates = [PathBuf::from("data"), Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")];
    candidates
        .into_iter()
        .find(|p| p.join("README.md").exists())
        .context("no --data given and the bundled corpus (data/) was not found; run from the repository root")
}

/// Flags a resumed run must not change: they define the model, its batches or its optimizer.
/// (`arg id`, value as given), for `run.json` and the comparison on resume.
fn fixed_flags(a: &Args) -> BTreeMap<String, String> {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "auto".into());
    [
        ("depth", a.depth.to_string()),
        ("aspect_ratio", a.aspect_ratio.to_string()),
        ("head_dim", a.head_dim.to_string()),
        ("max_seq_len", a.max_seq_len.to_string()),
        ("window_pattern", a.window_pattern.clone()),
        ("device_batch_size", a.device_batch_size.to_string()),
        ("total_batch_size", opt(a.total_batch_size.map(|v| v.to_string()))),
        ("target_flops", opt(a.target_flops.map(|v| v.to_string()))),
        ("target_param_data_ratio", a.target_param_data_ratio.to_string()),
        ("unembedding_lr", a.unembedding_lr.to_string()),
        ("embedding_lr", a.embedding_lr.to_string()),
        ("matrix_lr", a.matrix_lr.to_string()),
        ("scalar_lr", a.scalar_lr.to_string()),
        ("weight_decay", a.weight_decay.to_string()),
        ("warmup_steps", a.warmup_steps.to_string()),
        ("warmdown_ratio", a.warmdown_ratio.to_string()),
        ("final_lr_frac", a.final_lr_frac.to_string()),
        ("seed", a.seed.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn recipe_input(a: &Args, vocab_size: usize) -> Result<RecipeInput> {
    let model = GPTConfig::from_depth(
        a.depth,
        a.aspect_ratio,
        a.head_dim,
        a.max_seq_len,
        vocab_size,
        &a.window_pattern,
    )?;
    Ok(RecipeInput {
        model,
        aspect_ratio: a.aspect_ratio,
        head_dim: a.head_dim,
        target_param_data_ratio: a.target_param_data_ratio,
        total_batch_size: a.total_batch_size,
        num_iterations: a.num_iterations,
        target_flops: a.target_flops,
        embedding_lr: a.embedding_lr,
        unembedding_lr: a.unembedding_lr,
        matrix_lr: a.matrix_lr,
        scalar_lr: a.scalar_lr,
        weight_decay: a.weight_decay,
    })
}

fn settings(a: &Args, input: &RecipeInput, r: &Recipe) -> Result<Settings> {
    let micro = a.device_batch_size * a.max_seq_len;
    if micro == 0 {
        bail!("--device-batch-size and --max-seq-len must be positive");
    }
    if !r.total_batch_size.is_multiple_of(micro) {
        bail!(
            "the total batch of {} tokens{} is not a multiple of --device-batch-size x \
             --max-seq-len = {micro}; give --total-batch-size (a multiple of {micro}) or another \
             --device-batch-size",
            r.total_batch_size,
            if r.batch_auto { " (from the scaling rule)" } else { "" }
        );
    }
    Ok(Settings {
        model: input.model.clone(),
        device_batch_size: a.device_batch_size,
        grad_accum_steps: r.total_batch_size / micro,
        num_iterations: r.num_iterations,
        warmup_steps: a.warmup_steps,
        warmdown_ratio: a.warmdown_ratio,
        final_lr_frac: a.final_lr_frac,
        unembedding_lr: r.unembedding_lr,
        embedding_lr: r.embedding_lr,
        matrix_lr: r.matrix_lr,
        scalar_lr: r.scalar_lr,
        weight_decay: r.weight_decay,
        lr_schedule: LrSchedule::Base,
        lr_scale: 1.0,
        eval_every: a.eval_every,
        save_every: a.save_every,
        sample_every: a.sample_every,
        seed: a.seed,
    })
}

/// Bytes a training step holds on the CPU, estimated from the shapes: parameters, gradients
/// and two optimizer buffers; per token and layer the activations the backward keeps; the
/// logits with their softmax and gradient. Used to refuse absurd sizes before allocating.
pub fn estimate_step_bytes(c: &GPTConfig, device_batch: usize) -> f64 {
    let params = (c.scaling_params()
        + c.padded_vocab_size() * c.n_embd
        + (0..c.n_layer).filter(|&i| c.has_value_embed(i)).count()
            * c.padded_vocab_size()
            * c.n_kv_head
            * c.head_dim()) as f64;
    let tokens = (device_batch * c.sequence_len) as f64;
    // ~20 C-wide tensors per layer (norms, q/k/v, attention out, residuals) and 3 of 4C (MLP).
    let activations = tokens * c.n_layer as f64 * (20.0 + 12.0) * c.n_embd as f64;
    let logits = tokens * c.padded_vocab_size() as f64 * 3.0;
    4.0 * (4.0 * params + activations + logits)
}

/// Memory this machine can still give, if the platform says.
pub fn available_memory() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Refuse a model that cannot fit before allocating it.
pub fn check_fits(c: &GPTConfig, device_batch: usize, device: Device) -> Result<()> {
    let need = estimate_step_bytes(c, device_batch);
    if device == Device::Cpu
        && let Some(have) = available_memory()
        && need > have
    {
        bail!(
            "this model needs about {:.1} GiB for a training step (depth {}, width {}, context {}, \
             {} sequences per micro-batch) but the machine has {:.1} GiB available; lower \
             --depth, --max-seq-len or --device-batch-size",
            need / (1u64 << 30) as f64,
            c.n_layer,
            c.n_embd,
            c.sequence_len,
            device_batch,
            have / (1u64 << 30) as f64
        );
    }
    Ok(())
}

pub fn main(a: Args, explicit: &BTreeSet<String>) -> Result<()> {
    a.device.ensure_available().with_context(|| format!("--device {}", a.device))?;
    let data = if a.data.is_empty() { vec![default_data()?] } else { a.data.clone() };
    let mut files = docs::expand(&data)?;
    let val_files = if a.val.is_empty() {
        if files.len() < 2 {
            bail!("need at least two data files (the last is the validation split), or --val");
        }
        vec![files.pop().context("files is not empty")?]
    } else {
        docs::expand(&a.val)?
    };

    let prepared = if a.run.resume {
        resume(&a, explicit, &files, &val_files)?
    } else {
        start(&a, &files, &val_files)?
    };
    let Prepared { mut trainer, mut loader, mut val, tok, _lock } = prepared;
    if trainer.step() >= trainer.settings.num_iterations {
        eprintln!(
            "{} is complete at step {} of {}; nothing to do (extend it with --num-iterations)",
            a.out.display(),
            trainer.step(),
            trainer.settings.num_iterations
        );
        return Ok(());
    }
    trainer = trainer.with_device(a.device)?;
    trainer.gpt.set_recompute(a.recompute);
    eprintln!("device: {}", a.device.describe());
    let s = trainer.settings.clone();
    eprintln!(
        "model: depth {} dim {} heads {} ({} params); {} steps of {} tokens; validation {} tokens",
        s.model.n_layer,
        s.model.n_embd,
        s.model.n_head,
        trainer.gpt.params().numel(),
        s.num_iterations,
        s.tokens_per_step(),
        val.tokens()
    );

    if a.core_every > 0 {
        let bundle = crate::eval::bundle::Bundle::load(&crate::tasks::bundled("data/eval/core")?)?;
        trainer.set_evaluator(
            a.core_every,
            Box::new(crate::eval::core_run::CoreEvaluator::new(
                tok.clone(),
                bundle,
                a.core_max_per_task,
                a.out.clone(),
            )),
        );
    }
    let sample_tok = tok.clone();
    let mut sample = move |gpt: &femtochat_model::Gpt| -> Result<Vec<String>> {
        let mut out = Vec::new();
        for p in SAMPLE_PROMPTS {
            let mut prompt = vec![sample_tok.bos()];
            prompt.extend(sample_tok.encode(p));
            let mut greedy =
                Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, 0)?;
            let (ids, _) = generate(gpt, &prompt, &mut greedy, 24, &[sample_tok.bos()], |_| true)?;
            out.push(format!("{p}{}", sample_tok.decode(&ids)?));
        }
        Ok(out)
    };
    trainer::train_with_progress(
        &mut trainer,
        &mut crate::dist::Strided::of_world(&mut loader),
        Some(&mut val),
        Some(&mut sample),
        a.peak_flops,
    )?;
    let skipped = loader.state()["skipped"].as_u64().unwrap_or(0);
    if skipped > 0 {
        eprintln!("skipped {skipped} bad records (--skip-bad)");
    }
    Ok(())
}

/// A run ready to train: the trainer, its data, its tokenizer, and the run directory's lock.
struct Prepared {
    trainer: Trainer,
    loader: Prefetch,
    val: ValSet,
    tok: Arc<Tokenizer>,
    /// Held by rank 0, which alone writes the run directory.
    _lock: Option<RunLock>,
}

fn load_tokenizer(dir: &Path) -> Result<Arc<Tokenizer>> {
    Ok(Arc::new(
        Tokenizer::load(dir).with_context(|| format!("loading tokenizer {}", dir.display()))?,
    ))
}

fn loader(a: &Args, files: &[PathBuf], tok: &Arc<Tokenizer>, s: &Settings) -> Result<Prefetch> {
    let inner = BestFitLoader::new(
        files.to_vec(),
        tok.clone(),
        s.device_batch_size,
        s.model.sequence_len,
        true,
    )?
    .skip_bad(a.skip_bad);
    Prefetch::new(inner, PREFETCH_BATCHES)
}

fn val_set(
    a: &Args,
    files: &[PathBuf],
    tok: &Arc<Tokenizer>,
    s: &Settings,
    eval_tokens: usize,
) -> Result<ValSet> {
    ValSet::new_skipping(
        files.to_vec(),
        tok.clone(),
        s.model.sequence_len,
        s.device_batch_size,
        eval_tokens,
        a.skip_bad,
    )
}

fn start(a: &Args, files: &[PathBuf], val_files: &[PathBuf]) -> Result<Prepared> {
    let tok_dir = a.tokenizer.as_ref().context("--tokenizer DIR is required for a new run")?;
    let tok = load_tokenizer(tok_dir)?;
    let input = recipe_input(a, tok.vocab_size())?;
    check_fits(&input.model, a.device_batch_size, a.device)?;
    let recipe = Recipe::derive(&input)?;
    let s = settings(a, &input, &recipe)?;
    // Everything that can fail on the inputs fails here, before the run directory is touched.
    let loader = loader(a, files, &tok, &s)?;
    let val = val_set(a, val_files, &tok, &s, a.eval_tokens)?;
    // Over several ranks, rank 0 sets up the run directory and the others learn its run id.
    let (lock, run_id) = if crate::dist::is_lead() {
        let lock = rundir::begin_new(&a.out, a.run.overwrite)?;
        for line in recipe.describe(&input, s.device_batch_size * s.model.sequence_len) {
            eprintln!("{line}");
        }
        tok.save(&a.out.join("tokenizer"))?;
        let record = RunRecord::new(
            &a.out,
            "base",
            fixed_flags(a),
            files,
            val_files,
            a.eval_tokens,
            serde_json::json!({ "recipe": recipe }),
        )?;
        rundir::write_run_file(&a.out, &record)?;
        (Some(lock), record.run_id)
    } else {
        (None, String::new())
    };
    let run_id = crate::dist::broadcast_string(run_id)?;
    let trainer = Trainer::new(s, &a.out, &run_id)?;
    Ok(Prepared { trainer, loader, val, tok, _lock: lock })
}

fn resume(
    a: &Args,
    explicit: &BTreeSet<String>,
    files: &[PathBuf],
    val_files: &[PathBuf],
) -> Result<Prepared> {
    // Rank 0 holds the lock and checks the flags; the other ranks only read the checkpoint.
    let (lock, record) = if crate::dist::is_lead() {
        let (lock, record) = rundir::begin_resume(&a.out)?;
        (Some(lock), record)
    } else {
        (None, None)
    };
    let tok_dir = a.out.join("tokenizer");
    let tok = load_tokenizer(&tok_dir)?;
    if let Some(r) = &record {
        let flags = fixed_flags(a);
        let now = ResumeInputs {
            explicit,
            flags: &flags,
            data: files,
            val: val_files,
            tokenizer: a.tokenizer.as_deref(),
            force: a.run.force,
        };
        rundir::check_resume(&a.out, r, &now)?;
    }
    let (ckpt, step) = Trainer::latest(&a.out)?.context("no checkpoint")?;
    eprintln!("resuming from {} (step {step})", ckpt.display());
    let saved = trainer::read_state(&ckpt)?.settings;
    if saved.model.vocab_size != tok.vocab_size() {
        bail!(
            "the checkpoint's vocab size {} differs from the tokenizer's {} ({})",
            saved.model.vocab_size,
            tok.vocab_size(),
            tok_dir.display()
        );
    }
    let mut loader = loader(a, files, &tok, &saved)?;
    // The run's own validation size, unless this command sets another.
    let eval_tokens = match &record {
        Some(r) if !explicit.contains("eval_tokens") => r.eval_tokens.unwrap_or(a.eval_tokens),
        _ => a.eval_tokens,
    };
    let val = val_set(a, val_files, &tok, &saved, eval_tokens)?;
    let run_id = record.as_ref().map(|r| r.run_id.as_str());
    let mut trainer = Trainer::resume(&a.out, &mut loader, run_id)?;
    trainer.apply_resume_flags(
        explicit,
        a.num_iterations,
        Cadence {
            eval_every: a.eval_every,
            save_every: a.save_every,
            sample_every: a.sample_every,
        },
    )?;
    Ok(Prepared { trainer, loader, val, tok, _lock: lock })
}
