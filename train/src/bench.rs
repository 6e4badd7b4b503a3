//! `train bench`: time full training steps (forward, backward, MuonAdamW) of a model of the given
//! shape on random tokens, one JSON line per step, so CPU and GPU throughput (and MFU) compare
//! directly with nanochat's base_train on the same configuration. Each line carries the step's
//! peak memory (host heap and GPU buffers, from `femtochat_engine::mem`); `--dry-run` prints the
//! estimated peak (`femtochat_model::memory`) without running anything.
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Device, Ids, MuonAdamW, Reduction, cpu_isa, gpu_dispatch_count, mem, sync};
use femtochat_model::memory::estimate_train_step;
use femtochat_model::optim::{OptimizerConfig, param_groups};
use femtochat_model::rng::Rng;
use femtochat_model::{GPTConfig, Gpt, Recompute};

#[derive(clap::Args)]
pub struct Args {
    /// Transformer depth (nanochat's d12 is --depth 12).
    #[arg(long, default_value_t = 4)]
    depth: usize,
    #[arg(long, default_value_t = 64)]
    aspect_ratio: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Sliding-window pattern (L = full context, S = a quarter).
    #[arg(long, default_value = "L")]
    window_pattern: String,
    #[arg(long, default_value_t = 4)]
    device_batch_size: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// cpu or gpu.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Peak FLOP/s of the device, for the MFU column (e.g. 989e12 for an H100's bf16 dense,
    /// 67e12 for its fp32).
    #[arg(long)]
    peak_flops: Option<f64>,
    /// Activation checkpointing: none, blocks, every-K, all or sublayers (see `train base --help`).
    #[arg(long, default_value = "none")]
    recompute: Recompute,
    /// Print the estimated peak memory of one step of this configuration (one JSON line, by
    /// kind) and exit without allocating the model.
    #[arg(long)]
    dry_run: bool,
}

pub fn main(a: Args) -> Result<()> {
    if a.steps == 0 || a.device_batch_size == 0 {
        bail!("--steps and --device-batch-size must be positive");
    }
    let config = GPTConfig::from_depth(
        a.depth,
        a.aspect_ratio,
        a.head_dim,
        a.max_seq_len,
        a.vocab_size,
        &a.window_pattern,
    )?;
    let (b, t) = (a.device_batch_size, a.max_seq_len);
    let estimate = estimate_train_step(&config, b, t, a.recompute);
    if a.dry_run {
        let line = serde_json::json!({
            "bench": "train_step_estimate", "depth": a.depth, "n_embd": config.n_embd,
            "seq_len": t, "batch": b, "vocab_size": a.vocab_size,
            "recompute": a.recompute.to_string(), "estimate": estimate,
        });
        println!("{line}");
        return Ok(());
    }
    a.device.ensure_available().with_context(|| format!("--device {}", a.device))?;
    let mut gpt = Gpt::init(config.clone(), 0)?.to_device(a.device)?;
    gpt.set_recompute(a.recompute);
    let mut opt = MuonAdamW::new(param_groups(&config, &OptimizerConfig::default()), gpt.params())?;
    let mut rng = Rng::new(1);
    let tokens_per_step = b * t;
    let flops_per_step = config.flops_per_token() * tokens_per_step as f64;
    let adapter = a.device.describe();
    for step in 0..=a.steps {
        let ids: Vec<u32> =
            (0..=b * t).map(|_| (rng.next_u64() % a.vocab_size as u64) as u32).collect();
        let idx = Ids::new(ids[..b * t].to_vec(), &[b, t])?;
        let targets: Vec<i32> = ids[1..].iter().map(|&x| x as i32).collect();
        let gpu = a.device == Device::Gpu;
        let dispatches0 = if gpu { gpu_dispatch_count() } else { 0 };
        mem::reset_peaks();
        let t0 = Instant::now();
        let loss = gpt.loss(&idx, &targets, Reduction::Mean)?;
        let grads = loss.backward()?;
        // Free the graph (every activation) before the update, as the trainer does.
        let loss = loss.detach();
        opt.step(gpt.params(), &grads)?;
        // On the GPU this is the host's recording time (batches are submitted as they fill, so
        // the device runs meanwhile): near `ms`, the step is bound by launching, not by kernels.
        let host_secs = t0.elapsed().as_secs_f64();
        sync();
        // Reading the loss waits for the whole step (forward, backward, update) to finish.
        let loss = loss.item()?;
        let secs = t0.elapsed().as_secs_f64();
        if step == 0 {
            continue; // warm-up: pipelines, pools, first-touch memory
        }
        let mut line = serde_json::json!({
            "bench": "train_step", "device": a.device.to_string(), "adapter": adapter,
            "depth": a.depth, "n_embd": config.n_embd, "seq_len": t, "batch": b,
            "vocab_size": a.vocab_size, "params": gpt.params().numel(), "step": step,
            "ms": secs * 1e3, "tok_per_s": tokens_per_step as f64 / secs,
            "tflops": flops_per_step / secs / 1e12, "loss": loss,
            "recompute": a.recompute.to_string(),
            "peak_host_bytes": mem::host_counting().then(mem::host_peak_bytes),
            "peak_gpu_bytes": mem::gpu_peak_bytes(), "estimated_peak_bytes": estimate.total,
        });
        if let Some(peak) = a.peak_flops {
            line["mfu"] = serde_json::json!(flops_per_step / secs / peak);
        }
        if !gpu {
            line["isa"] = serde_json::json!(cpu_isa::Isa::detect().name());
        }
        if gpu {
            line["host_ms"] = serde_json::json!(host_secs * 1e3);
            line["gpu_dispatches"] = serde_json::json!(gpu_dispatch_count() - dispatches0);
        }
        println!("{line}");
    }
    Ok(())
}
