//! `train bench-infer`: inference speed of a checkpoint (or of a random model of a given shape)
//! on the CPU, nanochat's `scripts/infer_bench.py` twin. Per batch size B: one prompt prefilled
//! once (batch 1) and its cache forked to B rows, as nanochat's `Engine.generate` does, then
//! greedy decode steps for all rows together through `Gpt::decode_step`. Reports time to first
//! token, prefill tok/s, decode step latency and tok/s, the weight and KV bytes one step reads
//! and the bandwidth that implies (MBU against `--peak-bandwidth` or a measured memcpy).
//!
//! `--dtype bf16` runs the same steps with bf16 weight matrices (half the bytes per step); the
//! summary reports the weights' bytes and the process's peak heap during the measurement.
//!
//! The prompt is deterministic token ids (id i = (1 + 7919 i) mod V), so another implementation
//! (benches/infer_vs_pytorch.py) can run exactly the same tokens.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Ids, mem};
use femtochat_model::checkpoint::load_run_as;
use femtochat_model::decode::decode_isa;
use femtochat_model::gpt::param_shapes;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::{Decoder, GPTConfig, Gpt, KvCache, WeightDtype};

#[derive(clap::Args)]
pub struct Args {
    /// Run directory written by `train` (or a nanochat directory); without it, a randomly
    /// initialised model of the shape given by --depth etc.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Storage of the weight matrices: fp32, or bf16 (widened to f32 in the kernels: half the
    /// weight bytes per step and in memory).
    #[arg(long, default_value = "fp32")]
    dtype: WeightDtype,
    /// Decode batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    batch_sizes: Vec<usize>,
    /// Prompt length (prefilled once, then shared by every row).
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Decode steps per measurement (each generates one token per row).
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Measurements per batch size; the fastest is reported (timings on a shared machine are
    /// noisy upwards only).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Peak memory bandwidth in bytes/s for MBU (default: a measured single-thread memcpy).
    #[arg(long)]
    peak_bandwidth: Option<f64>,
    /// Random model: transformer depth.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Random model: width per layer of depth.
    #[arg(long, default_value_t = 64)]
    aspect_ratio: usize,
    /// Random model: head dim.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Random model: context.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Random model: vocabulary.
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Random model: sliding-window pattern (L = full context, S = a quarter).
    #[arg(long, default_value = "L")]
    window_pattern: String,
}

/// One timed generation.
struct Sample {
    prefill_s: f64,
    ttft_s: f64,
    decode_s: f64,
    tokens: Vec<u32>,
}

pub fn main(a: Args) -> Result<()> {
    if a.batch_sizes.is_empty() || a.batch_sizes.contains(&0) {
        bail!("--batch-sizes must be positive");
    }
    if a.prompt_tokens == 0 || a.decode_tokens == 0 || a.rounds == 0 {
        bail!("--prompt-tokens, --decode-tokens and --rounds must be positive");
    }
    let gpt = match &a.checkpoint {
        Some(dir) => {
            let (gpt, _, note) = load_run_as(dir, None, a.dtype)
                .with_context(|| format!("loading {}", dir.display()))?;
            if let Some(note) = note {
                eprintln!("note: {note}");
            }
            gpt
        }
        None => {
            let c = GPTConfig::from_depth(
                a.depth,
                a.aspect_ratio,
                a.head_dim,
                a.max_seq_len,
                a.vocab_size,
                &a.window_pattern,
            )?;
            Gpt::init(c, 0)?.into_weight_dtype(a.dtype)?
        }
    };
    let loaded_bytes = mem::host_counting().then(mem::host_bytes);
    let c = gpt.config().clone();
    let need = a.prompt_tokens + a.decode_tokens;
    if need > gpt.max_positions() {
        bail!(
            "--prompt-tokens + --decode-tokens = {need} exceeds the model's {} positions",
            gpt.max_positions()
        );
    }
    let prompt: Vec<u32> =
        (0..a.prompt_tokens).map(|i| ((1 + 7919 * i) % c.vocab_size) as u32).collect();
    let (isa, threads) = (decode_isa(), rayon::current_num_threads());
    let (peak, peak_src) = match a.peak_bandwidth {
        Some(b) if b > 0.0 => (b, "given"),
        Some(_) => bail!("--peak-bandwidth must be positive"),
        None => (memcpy_bandwidth(), "memcpy"),
    };
    eprintln!(
        "model: depth {} dim {} heads {}/{} vocab {} | {} weights {:.1} MB | isa {isa} | threads {threads} | peak {:.1} GB/s ({peak_src})",
        c.n_layer,
        c.n_embd,
        c.n_head,
        c.n_kv_head,
        c.vocab_size,
        a.dtype,
        gpt.weight_bytes() as f64 / 1e6,
        peak / 1e9
    );
    eprintln!(
        "{:>6} {:>7} {:>5} {:>9} {:>12} {:>9} {:>10} {:>8} {:>6}",
        "batch", "prompt", "gen", "ttft_ms", "prefill_t/s", "step_ms", "tok/s", "GB/s", "MBU"
    );
    // Untimed warm-up: the decode step's tables, the thread pool, first-touch memory.
    run_once(&gpt, &prompt, 1, 2.min(a.decode_tokens))?;
    mem::reset_peaks();
    let mut results = Vec::new();
    for &b in &a.batch_sizes {
        let mut best: Option<Sample> = None;
        for _ in 0..a.rounds {
            let s = run_once(&gpt, &prompt, b, a.decode_tokens)?;
            best = Some(match best {
                Some(o) => Sample {
                    prefill_s: o.prefill_s.min(s.prefill_s),
                    ttft_s: o.ttft_s.min(s.ttft_s),
                    decode_s: o.decode_s.min(s.decode_s),
                    tokens: s.tokens,
                },
                None => s,
            });
        }
        let Some(s) = best else { continue };
        let steps = a.decode_tokens as f64;
        let step_s = s.decode_s / steps;
        let bytes = step_bytes(&gpt, b, a.prompt_tokens, a.decode_tokens);
        let bw = bytes / step_s;
        let line = serde_json::json!({
            "bench": "infer", "isa": isa, "threads": threads, "dtype": a.dtype.name(), "batch": b,
            "prompt_len": a.prompt_tokens, "gen_len": a.decode_tokens,
            "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
            "ttft_ms": s.ttft_s * 1e3,
            "prefill_tok_per_s": a.prompt_tokens as f64 / s.prefill_s,
            "ms_per_token": step_s * 1e3,
            "tok_per_s": b as f64 * steps / s.decode_s,
            "bytes_per_step": bytes, "gb_per_s": bw / 1e9,
            "peak_gb_per_s": peak / 1e9, "peak_source": peak_src, "mbu": bw / peak,
            "tokens": s.tokens,
        });
        eprintln!(
            "{b:>6} {:>7} {:>5} {:>9.2} {:>12.0} {:>9.3} {:>10.0} {:>8.2} {:>6.2}",
            a.prompt_tokens,
            a.decode_tokens,
            s.ttft_s * 1e3,
            a.prompt_tokens as f64 / s.prefill_s,
            step_s * 1e3,
            b as f64 * steps / s.decode_s,
            bw / 1e9,
            bw / peak
        );
        println!("{line}");
        results.push(line);
    }
    // The whole run as one document on the last line (the lines above stream as they finish).
    let summary = serde_json::json!({
        "bench": "infer_summary", "isa": isa, "threads": threads, "dtype": a.dtype.name(),
        "weight_bytes": gpt.weight_bytes(), "host_bytes_loaded": loaded_bytes,
        "peak_host_bytes": mem::host_counting().then(mem::host_peak_bytes),
        "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
        "vocab_size": c.vocab_size, "prompt_len": a.prompt_tokens, "gen_len": a.decode_tokens,
        "rounds": a.rounds, "peak_gb_per_s": peak / 1e9, "peak_source": peak_src,
        "results": results,
    });
    println!("{summary}");
    Ok(())
}

/// Prefill `prompt` once, fork it to `b` rows, decode `g` greedy steps. Returns the timings and
/// row 0's generated tokens (the first from the prefill, then one per step but the last).
fn run_once(gpt: &Gpt, prompt: &[u32], b: usize, g: usize) -> Result<Sample> {
    let c = gpt.config();
    let (p, v) = (prompt.len(), c.vocab_size);
    let mut sampler = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, 0)?;
    let t0 = Instant::now();
    let mut cache = KvCache::with_rows(c, 1, p + g);
    let logits = gpt.forward_cached_last(&Ids::new(prompt.to_vec(), &[1, p])?, &mut cache)?;
    let logits = logits.try_to_vec()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    if b > 1 {
        let more = cache.fork_row(0, b - 1)?;
        cache.absorb(more)?;
    }
    let first = sampler.sample(&logits, &[])?;
    let ttft_s = t0.elapsed().as_secs_f64();
    let mut next = vec![first; b];
    let mut tokens = Vec::with_capacity(g);
    let mut dec = Decoder::new();
    let t1 = Instant::now();
    for _ in 0..g {
        tokens.push(next[0]);
        let logits = gpt.decode_step(&next, &mut cache, &mut dec)?;
        for (r, n) in next.iter_mut().enumerate() {
            *n = sampler.sample(&logits[r * v..(r + 1) * v], &[])?;
        }
    }
    Ok(Sample { prefill_s, ttft_s, decode_s: t1.elapsed().as_secs_f64(), tokens })
}

/// Bytes one decode step reads, averaged over the steps: every weight matrix once at its
/// stored width (the token and value embeddings only at the B looked-up rows) plus each row's
/// attended keys and values (f32).
fn step_bytes(gpt: &Gpt, b: usize, prompt: usize, g: usize) -> f64 {
    let c = gpt.config();
    let kvd = c.n_kv_head * c.head_dim();
    let mut weights = 0.0;
    for (name, shape) in param_shapes(c) {
        let numel: usize = shape.iter().product();
        let per = gpt.param_elem_bytes(&name) as f64;
        weights += per
            * if name == "transformer.wte.weight" {
                (b * c.n_embd) as f64
            } else if name.starts_with("value_embeds.") {
                (b * kvd) as f64
            } else {
                numel as f64
            };
    }
    let windows = c.window_sizes();
    let mut kv = 0.0;
    for pos in prompt..prompt + g {
        for &w in &windows {
            kv += ((pos + 1).min(w.saturating_add(1)) * kvd * 2) as f64;
        }
    }
    weights + b as f64 * kv / g as f64 * 4.0
}

/// Best of five single-thread copies of 64 MiB: bytes read + written per second.
fn memcpy_bandwidth() -> f64 {
    let n = 16 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (2 * n * 4) as f64 / best
}
