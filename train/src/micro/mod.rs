//! `train micro`: character-level bigram and mini-GPT baselines on either engine, the same model
//! and the same numbers on both (`--mode scalar|tensor`), with sampling.
//!
//! Run directory: `metrics.jsonl` (`{"step","loss","lr","dt_ms","tok_per_s"}` per step and
//! `{"step","val_loss","val_bpb"}` per evaluation), `loss.svg`, `model.json` (config and every
//! parameter), `summary.json` (also printed as the last stdout line). Randomness comes from three
//! streams of `--seed`: "init" (weights), "data" (training windows), "sample" (generation).
mod data;
mod model;
mod scalar_impl;
mod tensor_impl;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_engine::Device;
use femtochat_model::checkpoint::write_atomic;
use femtochat_model::rng::Rng;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use data::CharData;
pub use model::{AdamW, Kind, MicroConfig, MicroModel};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The scalar f64 autograd engine (engine::scalar), one node per number.
    Scalar,
    /// The tensor engine (CPU kernels or WGSL on the GPU).
    Tensor,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "mini-gpt")]
    model: Kind,
    #[arg(long, value_enum, default_value = "scalar")]
    mode: Mode,
    /// Run directory: metrics.jsonl, loss.svg, model.json, summary.json.
    #[arg(long)]
    out: PathBuf,
    /// Text files or directories (.txt, .jsonl, .jsonl.gz, .parquet), read as characters.
    /// Default: the bundled tinyshakespeare (data/shakespeare.jsonl.gz).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The last fraction of the characters is the validation split.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Optimizer steps (0: only report the initial loss).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Context length (characters).
    #[arg(long, default_value_t = 8)]
    block_size: usize,
    #[arg(long, default_value_t = 16)]
    n_embd: usize,
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Use the token embedding as the LM head (fewer parameters); `--tie-lm-head=false` unties.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    tie_lm_head: bool,
    /// RMS-normalise the input embeddings (token + position) before the first block.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    input_rmsnorm: bool,
    /// Peak AdamW learning rate, decayed linearly to 0 over the run.
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.99)]
    beta2: f64,
    /// Standard deviation of the mini-GPT's initial weights.
    #[arg(long, default_value_t = 0.08)]
    init_std: f32,
    /// Evaluate on the validation windows every N steps (0: only at the start and the end).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Validation windows per evaluation (evenly spaced over the split).
    #[arg(long, default_value_t = 64)]
    eval_windows: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu or gpu (tensor mode only).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// After training, continue this text (it must fit the context and use corpus characters).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Sampling temperature, > 0.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
}

fn default_data() -> Result<Vec<PathBuf>> {
    Ok(vec![crate::base::default_data()?.join("shakespeare.jsonl.gz")])
}

pub fn main(a: Args) -> Result<()> {
    if a.temperature.is_nan() || a.temperature <= 0.0 {
        bail!("--temperature must be > 0 (got {}); these models only sample", a.temperature);
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if a.mode == Mode::Scalar && a.device != Device::Cpu {
        bail!("--mode scalar runs on the CPU only; use --mode tensor for --device {}", a.device);
    }
    let files = if a.data.is_empty() { default_data()? } else { a.data.clone() };
    let corpus = CharData::load(&files, a.val_fraction)?;
    corpus.check_windows(a.block_size)?;
    let cfg = MicroConfig {
        kind: a.model,
        vocab_size: corpus.vocab_size(),
        block_size: a.block_size,
        n_embd: a.n_embd,
        n_head: a.n_head,
        depth: a.depth,
        tie_lm_head: a.tie_lm_head,
        input_rmsnorm: a.input_rmsnorm,
        init_std: a.init_std,
    };
    cfg.validate()?;
    let prompt = match &a.prompt {
        Some(p) => Some(check_prompt(&corpus, p, cfg.block_size)?),
        None => None,
    };
    let init = cfg.init(&mut Rng::stream(a.seed, "init"));
    let adamw = AdamW { betas: (a.beta1, a.beta2), eps: 1e-8, weight_decay: a.weight_decay };
    let mut m: Box<dyn MicroModel> = match a.mode {
        Mode::Scalar => Box::new(scalar_impl::ScalarModel::new(cfg.clone(), &init, adamw)?),
        Mode::Tensor => {
            a.device.ensure_available().with_context(|| format!("--device {}", a.device))?;
            Box::new(tensor_impl::TensorModel::new(cfg.clone(), &init, adamw, a.device)?)
        }
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (engine, device, adapter) = m.engine();
    eprintln!(
        "{:?} on the {engine} engine ({adapter}): {} parameters, vocab {}, context {}",
        cfg.kind,
        cfg.num_params(),
        cfg.vocab_size,
        cfg.block_size
    );

    let val = corpus.val_windows(cfg.block_size, a.eval_windows);
    let val_bytes: usize = val.iter().map(|w| corpus.bytes(&w[1..])).sum();
    let val_tokens = (val.len() * cfg.block_size) as f64;
    let evaluate = |m: &mut dyn MicroModel| -> Result<(f64, f64)> {
        let nats = m.loss_sum(&val)?;
        Ok((nats / val_tokens, nats / (std::f64::consts::LN_2 * val_bytes as f64)))
    };

    let mut metrics = String::new();
    let mut data_rng = Rng::stream(a.seed, "data");
    let tokens_per_step = a.batch_size * cfg.block_size;
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut train_seconds = 0.0;
    let mut last = (f64::NAN, f64::NAN);
    let mut final_loss = f64::NAN;
    for it in 0..=a.steps {
        if it == 0 || it == a.steps || (a.eval_every > 0 && it.is_multiple_of(a.eval_every)) {
            let (val_loss, val_bpb) = evaluate(m.as_mut())?;
            metrics +=
                &format!("{}\n", json!({ "step": it, "val_loss": val_loss, "val_bpb": val_bpb }));
            last = (val_loss, val_bpb);
        }
        if it == a.steps {
            break;
        }
        let windows = corpus.batch(&mut data_rng, a.batch_size, cfg.block_size);
        let lr = a.lr * (1.0 - it as f64 / a.steps as f64);
        let t0 = Instant::now();
        let loss = m.train_step(&windows, lr)?;
        let dt = t0.elapsed().as_secs_f64();
        train_seconds += dt;
        if !loss.is_finite() {
            bail!("non-finite loss ({loss}) at step {it}");
        }
        final_loss = loss;
        let tps = tokens_per_step as f64 / dt.max(1e-9);
        metrics += &format!(
            "{}\n",
            json!({ "step": it, "loss": loss, "lr": lr, "dt_ms": dt * 1e3, "tok_per_s": tps })
        );
        bar.set_position(it as u64 + 1);
        bar.set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
    }
    bar.finish_and_clear();
    if a.steps == 0 {
        // The loss of the first training batch, untrained: ln V for a uniform model.
        let windows = corpus.batch(&mut data_rng, a.batch_size, cfg.block_size);
        final_loss = m.loss_sum(&windows)? / tokens_per_step as f64;
        metrics += &format!("{}\n", json!({ "step": 0, "loss": final_loss }));
    }
    write_atomic(&a.out.join("metrics.jsonl"), metrics.as_bytes())?;
    crate::plot::loss_curve(&a.out)?;
    let params = m.params()?;
    let checkpoint = json!({ "config": cfg, "params": params });
    write_atomic(&a.out.join("model.json"), serde_json::to_string(&checkpoint)?.as_bytes())?;

    let sample = match prompt {
        Some(ids) => {
            let mut rng = Rng::stream(a.seed, "sample");
            let out = generate(
                m.as_mut(),
                ids,
                cfg.block_size,
                a.max_new_tokens,
                a.temperature,
                &mut rng,
            )?;
            Some(corpus.decode(&out))
        }
        None => None,
    };
    if let Some(s) = &sample {
        eprintln!("{s}");
    }
    let tokens = a.steps * tokens_per_step;
    let summary = json!({
        "model": cfg.kind, "engine": engine, "device": device, "adapter": adapter,
        "params": cfg.num_params(), "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
        "n_embd": cfg.n_embd, "n_head": cfg.n_head, "depth": cfg.depth,
        "tie_lm_head": cfg.tie_lm_head, "input_rmsnorm": cfg.input_rmsnorm,
        "steps": a.steps, "batch_size": a.batch_size, "tokens": tokens,
        "seconds": start.elapsed().as_secs_f64(),
        "tok_per_s": if train_seconds > 0.0 { tokens as f64 / train_seconds } else { 0.0 },
        "final_loss": final_loss, "val_loss": last.0, "val_bpb": last.1, "seed": a.seed,
        "sample": sample,
    });
    write_atomic(&a.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    eprintln!(
        "done: {} steps, final loss {final_loss:.4}, val loss {:.4} ({:.4} bpb); run in {}",
        a.steps,
        last.0,
        last.1,
        a.out.display()
    );
    println!("{summary}");
    Ok(())
}

fn check_prompt(corpus: &CharData, prompt: &str, block: usize) -> Result<Vec<u32>> {
    let ids = corpus.encode(prompt)?;
    if ids.is_empty() {
        bail!("--prompt is empty: give at least one character to continue");
    }
    if ids.len() > block {
        bail!(
            "--prompt is {} characters, longer than the model's context of {block} (--block-size)",
            ids.len()
        );
    }
    Ok(ids)
}

/// The prompt followed by `n` sampled ids, each from softmax(logits / temperature) of the last
/// `block` ids.
fn generate(
    m: &mut dyn MicroModel,
    mut ids: Vec<u32>,
    block: usize,
    n: usize,
    temperature: f64,
    rng: &mut Rng,
) -> Result<Vec<u32>> {
    for _ in 0..n {
        let ctx = &ids[ids.len().saturating_sub(block)..];
        let logits = m.next_logits(ctx)?;
        let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|l| ((l - mx) / temperature).exp()).collect();
        let mut u = rng.next_f64() * w.iter().sum::<f64>();
        let mut next = w.len() - 1;
        for (i, wi) in w.iter().enumerate() {
            if u < *wi {
                next = i;
                break;
            }
            u -= wi;
        }
        ids.push(next as u32);
    }
    Ok(ids)
}
