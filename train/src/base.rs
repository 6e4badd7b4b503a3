//! `train base`: pretraining from one dial (`--depth`), as nanochat's base_train.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_engine::Device;
use femtochat_model::GPTConfig;
use femtochat_model::generate::generate;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

use crate::docs;
use crate::loader::{BestFitLoader, Prefetch, ValSet};
use crate::trainer::{Settings, Trainer};

/// Micro-batches the loader thread prepares ahead of the model.
const PREFETCH_BATCHES: usize = 4;

/// Prompts sampled during training to watch the model learn.
const SAMPLE_PROMPTS: [&str; 3] = ["The meaning of life is", "Once upon a time", "The king said"];

#[derive(clap::Args)]
pub struct Args {
    /// Run directory: metrics.jsonl, checkpoints, loss.svg, a copy of the tokenizer.
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer directory (from `train tokenizer`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Training data: files or directories (.txt, .jsonl, .jsonl.gz, .parquet); the last file is the
    /// validation split unless --val is given. Default: the corpus bundled in data/.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Validation files (default: the last data file).
    #[arg(long, num_args = 1..)]
    val: Vec<PathBuf>,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,

    /// Number of layers: the one dial; width and heads follow.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// model_dim = depth * aspect_ratio, rounded up to a multiple of head_dim.
    #[arg(long, default_value_t = 64)]
    aspect_ratio: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    /// Attention window pattern tiled over layers (L = full, S = quarter context).
    #[arg(long, default_value = "L")]
    window_pattern: String,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    device_batch_size: usize,
    /// Tokens per optimizer step (a multiple of device_batch_size * max_seq_len; default: one
    /// micro-batch).
    #[arg(long)]
    total_batch_size: Option<usize>,
    /// Optimizer steps (default: from --target-param-data-ratio).
    #[arg(long)]
    num_iterations: Option<usize>,
    /// Training tokens per scaling parameter when --num-iterations is not given (nanochat: 12).
    #[arg(long, default_value_t = 12.0)]
    target_param_data_ratio: f64,

    #[arg(long, default_value_t = 0.004)]
    unembedding_lr: f32,
    #[arg(long, default_value_t = 0.2)]
    embedding_lr: f32,
    #[arg(long, default_value_t = 0.02)]
    matrix_lr: f32,
    #[arg(long, default_value_t = 0.5)]
    scalar_lr: f32,
    /// Muon weight decay (cosine-decayed to 0).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 40)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.65)]
    warmdown_ratio: f64,
    #[arg(long, default_value_t = 0.05)]
    final_lr_frac: f64,

    /// Evaluate validation bits per byte every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = 32768)]
    eval_tokens: usize,
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
    /// cpu (rayon + SIMD) or gpu (WGSL kernels through wgpu: Vulkan, Metal or DX12).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// The corpus bundled with the repository (data/ at the workspace root).
pub fn default_data() -> Result<PathBuf> {
    let candidates = [PathBuf::from("data"), Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")];
    candidates
        .into_iter()
        .find(|p| p.join("README.md").exists())
        .context("no --data given and the bundled corpus (data/) was not found; run from the repository root")
}

fn settings(a: &Args, vocab_size: usize) -> Result<Settings> {
    let model = GPTConfig::from_depth(
        a.depth,
        a.aspect_ratio,
        a.head_dim,
        a.max_seq_len,
        vocab_size,
        &a.window_pattern,
    )?;
    let micro = a.device_batch_size * a.max_seq_len;
    if micro == 0 {
        bail!("--device-batch-size and --max-seq-len must be positive");
    }
    let total = a.total_batch_size.unwrap_or(micro);
    if total == 0 || !total.is_multiple_of(micro) {
        bail!(
            "--total-batch-size {total} is not a multiple of --device-batch-size x --max-seq-len = {micro}"
        );
    }
    let num_iterations = match a.num_iterations {
        Some(n) => n,
        None => ((a.target_param_data_ratio * model.scaling_params() as f64) / total as f64).ceil()
            as usize,
    };
    if num_iterations == 0 {
        bail!("--num-iterations must be positive");
    }
    Ok(Settings {
        model,
        device_batch_size: a.device_batch_size,
        grad_accum_steps: total / micro,
        num_iterations,
        warmup_steps: a.warmup_steps,
        warmdown_ratio: a.warmdown_ratio,
        final_lr_frac: a.final_lr_frac,
        unembedding_lr: a.unembedding_lr,
        embedding_lr: a.embedding_lr,
        matrix_lr: a.matrix_lr,
        scalar_lr: a.scalar_lr,
        weight_decay: a.weight_decay,
        eval_every: a.eval_every,
        save_every: a.save_every,
        sample_every: a.sample_every,
        seed: a.seed,
    })
}

pub fn main(a: Args) -> Result<()> {
    a.device.ensure_available().with_context(|| format!("--device {}", a.device))?;
    let tok = Arc::new(
        Tokenizer::load(&a.tokenizer)
            .with_context(|| format!("loading tokenizer {}", a.tokenizer.display()))?,
    );
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

    let mut loader;
    let mut trainer = if a.resume {
        let s = Trainer::latest(&a.out)?
            .with_context(|| format!("--resume: {} has no checkpoint", a.out.display()))?;
        eprintln!("resuming from {} (step {})", s.0.display(), s.1);
        // The loader's shape comes from the checkpoint's settings.
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.0.join("state.json"))?)?;
        let saved: Settings = serde_json::from_value(state["settings"].clone())?;
        if saved.model.vocab_size != tok.vocab_size() {
            bail!(
                "the checkpoint's vocab size {} differs from the tokenizer's {}",
                saved.model.vocab_size,
                tok.vocab_size()
            );
        }
        loader = Prefetch::new(
            BestFitLoader::new(
                files,
                tok.clone(),
                saved.device_batch_size,
                saved.model.sequence_len,
                true,
            )?,
            PREFETCH_BATCHES,
        )?;
        Trainer::resume(&a.out, &mut loader)?.with_device(a.device)?
    } else {
        let s = settings(&a, tok.vocab_size())?;
        loader = Prefetch::new(
            BestFitLoader::new(
                files,
                tok.clone(),
                s.device_batch_size,
                s.model.sequence_len,
                true,
            )?,
            PREFETCH_BATCHES,
        )?;
        Trainer::new(s, &a.out)?.with_device(a.device)?
    };
    eprintln!("device: {}", a.device.describe());
    tok.save(&a.out.join("tokenizer"))?;
    let s = trainer.settings.clone();
    let mut val = ValSet::new(
        val_files,
        tok.clone(),
        s.model.sequence_len,
        s.device_batch_size,
        a.eval_tokens,
    )?;
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

    let bar = ProgressBar::new(s.num_iterations as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step() as u64);
    let flops = s.model.flops_per_token();
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
    let summary =
        trainer.train(&mut loader, Some(&mut val), Some(&mut sample), |step, loss, tps| {
            bar.set_position(step as u64 + 1);
            let mfu = a
                .peak_flops
                .map_or(String::new(), |p| format!(" | MFU {:.1}%", 100.0 * flops * tps / p));
            bar.set_message(format!(
                "loss {loss:.4} | {tps:.0} tok/s | {:.2} TFLOP/s{mfu}",
                flops * tps / 1e12
            ));
        })?;
    bar.finish();
    crate::plot::loss_curve(&a.out)?;
    eprintln!(
        "done: {} steps, final loss {:.4}, val bpb {}, {} tokens in {:.1}s ({:.0} tok/s); run in {}",
        summary.steps,
        summary.final_loss,
        summary.val_bpb.map_or("-".into(), |b| format!("{b:.4}")),
        summary.tokens,
        summary.seconds,
        summary.tok_per_s,
        a.out.display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
