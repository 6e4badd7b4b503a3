//! `kernel-bench`: time femtochat's kernels and print one JSON line per case, so runs on
//! different machines, thread counts and commits compare directly.
//!
//! `kernel-bench matmul --m 1024 --k 1024 --n 1024 --threads 2`; lists sweep: `--m 512,1024`.
//! `kernel-bench attention --b 1 --h 4 --hkv 4 --t 2048 --d 64 --impl flash,reference`.
//! `kernel-bench matvec --m 1,8 --k 768 --n 3072 --dtype fp32,bf16` (the decode step's kernel).
//!
//! CPU lines name the instruction set they ran (`isa`): the best this CPU has, or the one
//! `FEMTOCHAT_ISA=avx512|avx2|portable|scalar` (or `matmul --isa`) forces; `checksum` (the sum
//! of the outputs' magnitudes, in f64) lets runs with different ISAs be compared for agreement.
//!
//! The counting global allocator (`femtochat_kernels::mem`) measures each op's peak extra memory:
//! the high-water mark of live heap bytes during the call, above what was live when it started
//! (inputs and outputs are allocated before).
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use femtochat_kernels::cpu::attention::{AttnShape, attention_backward, attention_forward};
use femtochat_kernels::cpu::flash_attention::{
    FlashBlocks, flash_attention_backward, flash_attention_forward,
};
use femtochat_kernels::cpu::isa::{self, Isa};
use femtochat_kernels::cpu::matmul::{MatmulShape, matmul_naive, matmul_with};
use femtochat_kernels::cpu::matvec::{Weight, matvec_nt_with};
use femtochat_kernels::gpu::flash_attention::{FlashKernel, FlashTiles};
use femtochat_kernels::mem::{self, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns the peak of live heap bytes during it above the live bytes before it.
fn peak_extra_bytes(f: impl FnOnce()) -> usize {
    let base = mem::host_bytes();
    mem::reset_peaks();
    f();
    mem::host_peak_bytes().saturating_sub(base)
}

#[derive(Parser)]
#[command(
    name = "kernel-bench",
    version,
    about = "Benchmark femtochat kernels; one JSON line per case",
    after_help = "Environment: FEMTOCHAT_ISA=avx512|avx2|portable|scalar forces the CPU \
                  instruction set of every kernel (refused when this CPU lacks it); each CPU \
                  line names the one used in \"isa\"."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// C (M, N) = op(A) (M, K) · op(B) (K, N), f32 on the CPU.
    Matmul(MatmulArgs),
    /// Causal (sliding-window) GQA attention, q (B, T, H, D), k, v (B, T, Hkv, D).
    Attention(AttentionArgs),
    /// out (M, N) = x (M, K) · W (N, K)^T for small M (the decode step's kernel), with f32 or
    /// bf16 weights; reports the weight bytes read per second.
    Matvec(MatvecArgs),
}

#[derive(clap::Args)]
struct MatvecArgs {
    /// Input rows (decode batch), comma-separated list to sweep.
    #[arg(long, value_delimiter = ',', required = true)]
    m: Vec<usize>,
    /// Inner dimension (list to sweep).
    #[arg(long, value_delimiter = ',', required = true)]
    k: Vec<usize>,
    /// Weight rows / output columns (list to sweep).
    #[arg(long, value_delimiter = ',', required = true)]
    n: Vec<usize>,
    /// Weight storage: fp32, bf16 (list to sweep).
    #[arg(long, value_delimiter = ',', default_value = "fp32")]
    dtype: Vec<String>,
    /// Timed repetitions; the median is reported.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Kernel ISA to force (as `matmul --isa`).
    #[arg(long)]
    isa: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Impl {
    /// Packed, register-blocked, SIMD, multi-threaded.
    Fast,
    /// The reference triple loop (slow: for small shapes).
    Naive,
}

#[derive(clap::Args)]
struct MatmulArgs {
    /// Rows of C (comma-separated list to sweep).
    #[arg(long, value_delimiter = ',', required = true)]
    m: Vec<usize>,
    /// Inner dimension (list to sweep).
    #[arg(long, value_delimiter = ',', required = true)]
    k: Vec<usize>,
    /// Columns of C (list to sweep).
    #[arg(long, value_delimiter = ',', required = true)]
    n: Vec<usize>,
    /// A is stored (K, M).
    #[arg(long)]
    trans_a: bool,
    /// B is stored (N, K), as in `x W^T`.
    #[arg(long)]
    trans_b: bool,
    /// Worker threads (default: all cores). List to sweep.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Timed repetitions; the median is reported.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    #[arg(long, value_enum, default_value_t = Impl::Fast)]
    r#impl: Impl,
    /// Micro-kernel to force: avx512, avx2, neon, portable or scalar (= portable); default:
    /// FEMTOCHAT_ISA, else the best this CPU runs.
    #[arg(long)]
    isa: Option<String>,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// GPU kernels to time (comma-separated): auto (what the engine picks for the shape), 64
    /// (64x64 tiles, 4x4 per thread), 128 (128x128, 8x8) or v4 (128x128, 8x8, vec4 loads and a
    /// prefetched K slice; needs the contiguous extents to be multiples of 4), optionally with
    /// its slice depth and workgroup buffers: v4-bk8, v4-bk32, v4-s2, v4-bk8-s2, ...
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    tiling: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = isa::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Matmul(args) => bench_matmul(args).map_err(anyhow::Error::msg),
        Command::Attention(args) => bench_attention(args),
        Command::Matvec(args) => bench_matvec(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn parse_isa(name: &str) -> Result<Isa, String> {
    Isa::parse(name).map_err(|e| format!("--isa: {e}"))
}

fn bench_matmul(args: MatmulArgs) -> Result<(), String> {
    if args.device == Device::Gpu {
        return bench_matmul_gpu(&args).map_err(|e| format!("{e:#}"));
    }
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    let isa = match &args.isa {
        Some(name) => parse_isa(name)?,
        None => Isa::detect(),
    };
    let threads = if args.threads.is_empty() {
        vec![rayon::current_num_threads()]
    } else {
        args.threads.clone()
    };
    for &t in &threads {
        if t == 0 {
            return Err("--threads must be at least 1".into());
        }
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(t).build().map_err(|e| e.to_string())?;
        for &m in &args.m {
            for &k in &args.k {
                for &n in &args.n {
                    let s = MatmulShape::new(m, k, n, args.trans_a, args.trans_b);
                    let elems = [m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)];
                    let [Some(na), Some(nb), Some(nc)] = elems else {
                        return Err(format!("shape {m}x{k}x{n} overflows"));
                    };
                    let a: Vec<f32> = (0..na).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
                    let b: Vec<f32> = (0..nb).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
                    let mut c = vec![0.0f32; nc];
                    let run = |c: &mut [f32]| match args.r#impl {
                        Impl::Fast => matmul_with(isa, c, &a, &b, s, false),
                        Impl::Naive => matmul_naive(c, &a, &b, s, false),
                    };
                    let mut times = pool.install(|| {
                        run(&mut c); // warm-up: page faults, caches, thread start
                        (0..args.reps)
                            .map(|_| {
                                let t0 = Instant::now();
                                run(&mut c);
                                t0.elapsed().as_secs_f64()
                            })
                            .collect::<Vec<_>>()
                    });
                    times.sort_by(f64::total_cmp);
                    let median = times[times.len() / 2];
                    let checksum: f64 = c.iter().map(|&x| x.abs() as f64).sum();
                    let line = serde_json::json!({
                        "op": "matmul", "device": "cpu", "m": m, "k": k, "n": n,
                        "trans_a": args.trans_a, "trans_b": args.trans_b, "threads": t,
                        "ms": median * 1e3, "gflops": s.flops() / median / 1e9,
                        "best_ms": times[0] * 1e3,
                        "impl": match args.r#impl { Impl::Fast => "fast", Impl::Naive => "naive" },
                        "isa": isa.name(), "checksum": checksum,
                    });
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}

fn bench_matvec(args: MatvecArgs) -> Result<()> {
    ensure!(args.reps > 0, "--reps must be at least 1");
    let isa = match &args.isa {
        Some(name) => parse_isa(name).map_err(anyhow::Error::msg)?,
        None => Isa::detect(),
    };
    for dtype in &args.dtype {
        ensure!(dtype == "fp32" || dtype == "bf16", "--dtype {dtype}: expected fp32 or bf16");
    }
    for &m in &args.m {
        for &k in &args.k {
            for &n in &args.n {
                let (Some(nx), Some(nw)) = (m.checked_mul(k), n.checked_mul(k)) else {
                    bail!("shape {m}x{k}x{n} overflows");
                };
                ensure!(m > 0 && k > 0 && n > 0, "--m, --k and --n must be positive");
                let (x, w) = (filled(nx, 1)?, filled(nw, 2)?);
                for dtype in &args.dtype {
                    let mut line = if dtype == "bf16" {
                        let wb: Vec<half::bf16> =
                            w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                        time_matvec(isa, &x, &wb, (m, k, n), args.reps)
                    } else {
                        time_matvec(isa, &x, &w, (m, k, n), args.reps)
                    };
                    line["dtype"] = dtype.as_str().into();
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}

/// One `matvec` case: median and best of `reps` calls after a warm-up.
fn time_matvec<W: Weight>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    (m, k, n): (usize, usize, usize),
    reps: usize,
) -> serde_json::Value {
    let mut out = vec![0.0f32; m * n];
    matvec_nt_with(isa, &mut out, x, w, m, k, n);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            matvec_nt_with(isa, &mut out, x, w, m, k, n);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let checksum: f64 = out.iter().map(|&v| v.abs() as f64).sum();
    serde_json::json!({
        "op": "matvec", "device": "cpu", "m": m, "k": k, "n": n,
        "threads": rayon::current_num_threads(), "ms": median * 1e3, "best_ms": times[0] * 1e3,
        "gflops": 2.0 * (m * k * n) as f64 / median / 1e9,
        "weight_gb_per_s": (n * k * W::BYTES) as f64 / median / 1e9,
        "isa": isa.name(), "checksum": checksum,
    })
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Gpu,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AttnImpl {
    /// Tiled flash attention (`cpu/flash_attention.rs`, `wgsl/flash_attention.wgsl`).
    Flash,
    /// GPU only: flash attention forced onto the one-thread-per-row kernels (what head dims
    /// other than multiples of 16 up to 128 get), the baseline of the tiled ones.
    FlashRows,
    /// The reference kernel (`cpu/attention.rs`): query tiles of 4 rows against all keys.
    Reference,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pass {
    /// Forward only.
    Fwd,
    /// Backward only (from a saved forward).
    Bwd,
    /// Forward then backward, timed together.
    Both,
}

/// Sequence lengths of `--sweep`.
const SWEEP_T: [usize; 5] = [512, 1024, 2048, 4096, 8192];

#[derive(clap::Args)]
struct AttentionArgs {
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Batch size.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    b: u32,
    /// Query heads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    h: u32,
    /// Key/value heads (divides H; default H).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    hkv: Option<u32>,
    /// Keys per batch element (comma-separated list to sweep).
    #[arg(long, value_delimiter = ',', default_value = "2048",
          value_parser = clap::value_parser!(u32).range(1..))]
    t: Vec<u32>,
    /// Query rows, the last TQ positions of the T keys (default T: training; 1: decode).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    tq: Option<u32>,
    /// Head dimension.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=256))]
    d: u32,
    /// Sliding window (max query-key distance); default: full causal.
    #[arg(long)]
    window: Option<usize>,
    /// Flash query rows per tile, for both passes (default: the engine's per-pass blocks,
    /// `FlashBlocks::forward(D)` and `FlashBlocks::backward(D)`). On the GPU: the tiled
    /// kernels' rows per workgroup, 16, 32 or 64 (default 64).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    block_r: Option<u32>,
    /// Flash key rows per tile, for both passes (default: as --block-r). On the GPU: the
    /// tiled kernels' tile width, 16, 32 or 64 (default 32).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    block_c: Option<u32>,
    /// Passes to time (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fwd")]
    pass: Vec<Pass>,
    /// Implementations to time (comma-separated).
    #[arg(long = "impl", value_enum, value_delimiter = ',', default_value = "flash")]
    imp: Vec<AttnImpl>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Run T = 512, 1024, 2048, 4096, 8192 (overrides --t) and print a table on stderr too.
    #[arg(long)]
    sweep: bool,
    /// Timed repetitions; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
}

/// One measured case, as printed.
struct AttnRow {
    imp: &'static str,
    pass: &'static str,
    t: usize,
    ms: f64,
    tflops: f64,
    extra: usize,
}

fn bench_attention(args: AttentionArgs) -> Result<()> {
    let (b, h, d) = (args.b as usize, args.h as usize, args.d as usize);
    let hkv = args.hkv.map_or(h, |x| x as usize);
    ensure!(h.is_multiple_of(hkv), "--h {h} is not a multiple of --hkv {hkv}");
    let window = args.window.unwrap_or(usize::MAX);
    // Blocks per pass: forced by --block-r / --block-c, else the engine's for this head dim.
    let blocks = |default: FlashBlocks| FlashBlocks {
        br: args.block_r.map_or(default.br, |x| x as usize),
        bc: args.block_c.map_or(default.bc, |x| x as usize),
    };
    let (fwd_bl, bwd_bl) = (blocks(FlashBlocks::forward(d)), blocks(FlashBlocks::backward(d)));
    // GPU kernels per --impl: forced tiles for the tiled kernels, else the engine's choice.
    let gpu_kernel = |imp: AttnImpl| match imp {
        AttnImpl::Flash if args.block_r.is_some() || args.block_c.is_some() => {
            let t = FlashTiles::default();
            FlashKernel::Tiled(FlashTiles {
                rows: args.block_r.map_or(t.rows, |x| x as usize),
                cols: args.block_c.map_or(t.cols, |x| x as usize),
            })
        }
        AttnImpl::Flash => FlashKernel::for_head_dim(d),
        _ => FlashKernel::Rows,
    };
    let ts: Vec<usize> =
        if args.sweep { SWEEP_T.to_vec() } else { args.t.iter().map(|&t| t as usize).collect() };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = args.threads {
        pool = pool.num_threads(n as usize);
    }
    let pool = pool.build().context("building the thread pool")?;
    let threads = pool.current_num_threads();
    let device_name = match args.device {
        Device::Cpu => "cpu".to_string(),
        Device::Gpu => {
            let ctx = femtochat_kernels::gpu::GpuContext::get()?;
            format!("gpu: {} ({:?})", ctx.info.name, ctx.info.backend)
        }
    };
    let mut rows = Vec::new();
    for &t in &ts {
        let tq = args.tq.map_or(t, |x| x as usize);
        ensure!(tq <= t, "--tq {tq} exceeds --t {t}");
        let s = AttnShape { b, tq, tk: t, h, hkv, d, window, pos0: t - tq };
        let sizes = [b.checked_mul(tq * h * d), b.checked_mul(t * hkv * d)];
        let [Some(nq), Some(nk)] = sizes else { bail!("shape overflows at T = {t}") };
        let (q, k, v) = (filled(nq, 1)?, filled(nk, 2)?, filled(nk, 3)?);
        let dout = filled(nq, 4)?;
        // Attended (query, key) pairs: 2 D FLOPs for q.k and 2 D for p v each.
        let pairs: usize = (0..tq).map(|i| (s.pos0 + i).min(window) + 1).sum();
        let fwd_flops = 4.0 * (b * h * d) as f64 * pairs as f64;
        for &imp in &args.imp {
            for &pass in &args.pass {
                let gpu = gpu_kernel(imp);
                let case =
                    AttnCase { s, fwd_bl, bwd_bl, gpu, imp, q: &q, k: &k, v: &v, dout: &dout };
                let (ms, best_ms, extra, checksum) = match args.device {
                    Device::Cpu => {
                        pool.install(|| time_attention(&case, pass, args.reps as usize))?
                    }
                    Device::Gpu => {
                        let (ms, best, extra) =
                            time_attention_gpu(&case, pass, args.reps as usize)?;
                        (ms, best, extra, None)
                    }
                };
                let isa = (args.device == Device::Cpu).then(|| Isa::detect().name());
                // FLOP convention (FlashAttention-2 paper): backward = 2.5x forward (5 matmuls
                // of the tile against 2), whatever a kernel recomputes.
                let flops = fwd_flops
                    * match pass {
                        Pass::Fwd => 1.0,
                        Pass::Bwd => 2.5,
                        Pass::Both => 3.5,
                    };
                // On the GPU both passes share the tiles: the tiled kernels' (rows, cols), or
                // the row-per-thread kernels' 64 rows against 2048-float tiles.
                let (fwd_blocks, bwd_blocks) = match (args.device, gpu) {
                    (Device::Cpu, _) => (fwd_bl, bwd_bl),
                    (Device::Gpu, FlashKernel::Tiled(t)) => {
                        let bl = FlashBlocks { br: t.rows, bc: t.cols };
                        (bl, bl)
                    }
                    (Device::Gpu, FlashKernel::Rows) => {
                        let bl = FlashBlocks { br: 64, bc: 2048 / d };
                        (bl, bl)
                    }
                };
                // br, bc: the forward's blocks; bwd_br, bwd_bc: the backward's (if timed).
                let bwd = (pass != Pass::Fwd).then_some(bwd_blocks);
                let (imp, pass) = (imp_name(imp), pass_name(pass));
                let tflops = flops / (ms * 1e-3) / 1e12;
                let line = serde_json::json!({
                    "kernel": "attention", "impl": imp, "device": device_name,
                    "b": b, "h": h, "hkv": hkv, "t": t, "tq": tq, "d": d,
                    "window": args.window, "br": fwd_blocks.br, "bc": fwd_blocks.bc,
                    "bwd_br": bwd.map(|b| b.br), "bwd_bc": bwd.map(|b| b.bc), "pass": pass,
                    "threads": threads, "ms": ms, "best_ms": best_ms, "tflops": tflops,
                    "peak_extra_bytes": extra, "isa": isa, "checksum": checksum,
                });
                println!("{line}");
                rows.push(AttnRow { imp, pass, t, ms, tflops, extra });
            }
        }
    }
    if args.sweep {
        eprintln!(
            "{:>6} {:>5} {:>10} {:>10} {:>8} {:>14}",
            "T", "pass", "impl", "ms", "TFLOP/s", "extra bytes"
        );
        for r in &rows {
            eprintln!(
                "{:>6} {:>5} {:>10} {:>10.3} {:>8.4} {:>14}",
                r.t, r.pass, r.imp, r.ms, r.tflops, r.extra
            );
        }
    }
    Ok(())
}

fn imp_name(imp: AttnImpl) -> &'static str {
    match imp {
        AttnImpl::Flash => "flash",
        AttnImpl::FlashRows => "flash-rows",
        AttnImpl::Reference => "reference",
    }
}

fn pass_name(pass: Pass) -> &'static str {
    match pass {
        Pass::Fwd => "fwd",
        Pass::Bwd => "bwd",
        Pass::Both => "both",
    }
}

/// n zeros, or an error (not an abort) when the allocator refuses a huge request.
fn zeros(n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).with_context(|| format!("allocating {n} floats"))?;
    v.resize(n, 0.0);
    Ok(v)
}

/// Deterministic values in [-1, 1).
fn filled(n: usize, seed: u32) -> Result<Vec<f32>> {
    let hash = |i: usize| (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
    let mut v = zeros(n)?;
    v.iter_mut().enumerate().for_each(|(i, x)| *x = hash(i) as f32 / (1u32 << 23) as f32 - 1.0);
    Ok(v)
}

struct AttnCase<'a> {
    s: AttnShape,
    fwd_bl: FlashBlocks,
    bwd_bl: FlashBlocks,
    gpu: FlashKernel,
    imp: AttnImpl,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dout: &'a [f32],
}

/// Median and best ms over `reps` timed calls after a warm-up, and the peak extra bytes of one
/// call.
/// CPU attention: median and best ms, peak extra bytes, and the checksum of what the timed
/// pass computes (out, or dq + dk + dv).
fn time_attention(c: &AttnCase, pass: Pass, reps: usize) -> Result<(f64, f64, usize, Option<f64>)> {
    let s = c.s;
    let (mut out, mut lse) = (zeros(c.q.len())?, zeros(s.b * s.tq * s.h)?);
    let (mut dq, mut dk, mut dv) = (zeros(c.q.len())?, zeros(c.k.len())?, zeros(c.k.len())?);
    let (q, k, v, dout) = (c.q, c.k, c.v, c.dout);
    ensure!(c.imp != AttnImpl::FlashRows, "--impl flash-rows is a GPU kernel (--device gpu)");
    let forward = |out: &mut [f32], lse: &mut [f32]| match c.imp {
        AttnImpl::Flash | AttnImpl::FlashRows => {
            flash_attention_forward(out, lse, q, k, v, s, c.fwd_bl)
        }
        AttnImpl::Reference => attention_forward(out, lse, q, k, v, s),
    };
    let backward =
        |dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], out: &[f32], lse: &[f32]| match c.imp {
            AttnImpl::Flash | AttnImpl::FlashRows => {
                flash_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, s, c.bwd_bl)
            }
            AttnImpl::Reference => attention_backward(dq, dk, dv, dout, q, k, v, out, lse, s),
        };
    if pass == Pass::Bwd {
        forward(&mut out, &mut lse); // the saved forward that backward reads
    }
    let mut run = || {
        if pass != Pass::Bwd {
            forward(&mut out, &mut lse);
        }
        if pass != Pass::Fwd {
            backward(&mut dq, &mut dk, &mut dv, &out, &lse);
        }
    };
    run(); // warm-up: page faults, caches, thread start
    let extra = peak_extra_bytes(&mut run);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            run();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let sum = |x: &[f32]| x.iter().map(|&v| v.abs() as f64).sum::<f64>();
    let checksum = if pass == Pass::Fwd { sum(&out) } else { sum(&dq) + sum(&dk) + sum(&dv) };
    Ok((times[times.len() / 2], times[0], extra, Some(checksum)))
}

/// GPU attention: the WGSL flash kernel or the straightforward one. `reps` launches go into one
/// submission (the reported ms is their mean, free of submission latency); best_ms is the fastest
/// single submit-and-wait. Extra bytes: the backward's delta buffer (B, Tq, H), nothing of T x T.
fn time_attention_gpu(c: &AttnCase, pass: Pass, reps: usize) -> Result<(f64, f64, usize)> {
    use femtochat_kernels::gpu::{
        Batch, GpuContext, attention as reference, flash_attention as flash,
    };
    let ctx = GpuContext::get()?;
    let s = c.s;
    let up = |x: &[f32]| ctx.upload(x);
    let (q, k, v, dout) = (up(c.q)?, up(c.k)?, up(c.v)?, up(c.dout)?);
    let (out, lse) = (ctx.zeros(c.q.len())?, ctx.zeros(s.b * s.tq * s.h)?);
    let (dq, dk, dv) = (ctx.zeros(c.q.len())?, ctx.zeros(c.k.len())?, ctx.zeros(c.k.len())?);
    let record = |bt: &mut Batch, fwd: bool, bwd: bool| -> Result<()> {
        if fwd {
            match c.imp {
                AttnImpl::Flash | AttnImpl::FlashRows => {
                    flash::flash_forward_with(bt, c.gpu, &out, &lse, &q, &k, &v, s)?
                }
                AttnImpl::Reference => reference::attention_forward(bt, &out, &lse, &q, &k, &v, s)?,
            }
        }
        if bwd {
            match c.imp {
                AttnImpl::Flash | AttnImpl::FlashRows => {
                    let bufs = [&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse];
                    flash::flash_backward_with(bt, c.gpu, bufs, s)?
                }
                AttnImpl::Reference => reference::attention_backward(
                    bt, &dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse, s,
                )?,
            }
        }
        Ok(())
    };
    let timed = |count: usize| -> Result<f64> {
        let t0 = Instant::now();
        let mut bt = ctx.batch();
        for _ in 0..count {
            record(&mut bt, pass != Pass::Bwd, pass != Pass::Fwd)?;
        }
        bt.submit();
        ctx.wait()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    // The saved forward that backward reads; also the warm-up (pipeline creation).
    let mut bt = ctx.batch();
    record(&mut bt, true, pass != Pass::Fwd)?;
    bt.submit();
    ctx.wait()?;
    let best = (0..reps.min(3)).map(|_| timed(1)).collect::<Result<Vec<_>>>()?;
    let best = best.into_iter().fold(f64::INFINITY, f64::min);
    let mean = timed(reps)? / reps as f64;
    let extra = if pass == Pass::Fwd { 0 } else { s.b * s.tq * s.h * 4 };
    Ok((mean, best, extra))
}

/// A `--tiling` value: auto (None), 64, 128, or v4[-bkN][-sN] (the vec4 kernel's slice depth
/// and workgroup buffers; default bk16, s1).
fn parse_tiling(t: &str) -> Result<Option<femtochat_kernels::gpu::matmul::MatmulTiling>> {
    use femtochat_kernels::gpu::matmul::{MatmulTiling, Vec4Slices};
    let bad = || anyhow::anyhow!("--tiling {t}: expected auto, 64, 128 or v4[-bkN][-sN]");
    match t {
        "auto" => return Ok(None),
        "64" => return Ok(Some(MatmulTiling::T64)),
        "128" => return Ok(Some(MatmulTiling::T128)),
        _ => {}
    }
    let mut parts = t.split('-');
    if parts.next() != Some("v4") {
        return Err(bad());
    }
    let mut v = Vec4Slices::default();
    for part in parts {
        if let Some(n) = part.strip_prefix("bk") {
            v.bk = n.parse().map_err(|_| bad())?;
        } else if let Some(n) = part.strip_prefix('s') {
            v.stages = n.parse().map_err(|_| bad())?;
        } else {
            return Err(bad());
        }
    }
    Ok(Some(MatmulTiling::V4(v)))
}

/// GPU matmul: `reps` launches recorded into one submission, timed to completion, so the
/// per-launch time excludes submission and readback latency (reported separately as a
/// single-launch round trip).
fn bench_matmul_gpu(args: &MatmulArgs) -> Result<()> {
    use femtochat_kernels::gpu::GpuContext;
    use femtochat_kernels::gpu::matmul::{MatmulTiling, matmul_batched_with};
    ensure!(args.reps > 0, "--reps must be at least 1");
    let tilings = args.tiling.iter().map(|t| parse_tiling(t)).collect::<Result<Vec<_>>>()?;
    let ctx = GpuContext::get()?;
    let device = format!("{} ({:?})", ctx.info.name, ctx.info.backend);
    for &m in &args.m {
        for &k in &args.k {
            for &n in &args.n {
                let s = MatmulShape::new(m, k, n, args.trans_a, args.trans_b);
                let elems = [m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)];
                let [Some(na), Some(nb), Some(nc)] = elems else {
                    bail!("shape {m}x{k}x{n} overflows");
                };
                let (a, b) = (filled(na, 1)?, filled(nb, 2)?);
                let (ga, gb, gc) = (ctx.upload(&a)?, ctx.upload(&b)?, ctx.zeros(nc)?);
                for &tiling in &tilings {
                    let tiling = tiling.unwrap_or(MatmulTiling::auto(1, &s));
                    if matches!(tiling, MatmulTiling::V4(_)) && !MatmulTiling::vec4_fits(&s) {
                        bail!("--tiling v4: {m}x{k}x{n} needs multiples of 4 (use 64 or 128)");
                    }
                    let launch = |count: usize| -> Result<f64> {
                        let t0 = Instant::now();
                        let mut bt = ctx.batch();
                        for _ in 0..count {
                            matmul_batched_with(&mut bt, tiling, &gc, &ga, &gb, 1, s, false)?;
                        }
                        bt.submit();
                        ctx.wait()?;
                        Ok(t0.elapsed().as_secs_f64())
                    };
                    launch(1)?; // warm-up: pipeline creation, first-touch allocation
                    let round_trip = launch(1)?;
                    let per = launch(args.reps)? / args.reps as f64;
                    let line = serde_json::json!({
                        "op": "matmul", "device": "gpu", "adapter": device, "m": m, "k": k,
                        "n": n, "trans_a": args.trans_a, "trans_b": args.trans_b,
                        "ms": per * 1e3, "gflops": s.flops() / per / 1e9,
                        "single_launch_ms": round_trip * 1e3, "reps": args.reps,
                        "impl": tiling.name(),
                    });
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}
