//! `kernel-bench`: time femtochat's kernels and print one JSON line per case, so runs on
//! different machines, thread counts and commits compare directly.
//!
//! `kernel-bench matmul --m 1024 --k 1024 --n 1024 --threads 2`; lists sweep: `--m 512,1024`.
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use femtochat_kernels::cpu::matmul::{Isa, MatmulShape, matmul_naive, matmul_with};

#[derive(Parser)]
#[command(
    name = "kernel-bench",
    version,
    about = "Benchmark femtochat kernels; one JSON line per case"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// C (M, N) = op(A) (M, K) · op(B) (K, N), f32 on the CPU or the GPU.
    Matmul(MatmulArgs),
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Device {
    /// rayon + SIMD kernels.
    Cpu,
    /// The WGSL kernel through wgpu (Vulkan, Metal, DX12).
    Gpu,
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
    /// Micro-kernel to force: avx512, avx2, neon, portable (default: the best this CPU runs).
    #[arg(long)]
    isa: Option<String>,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Matmul(args) => bench_matmul(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_isa(name: &str) -> Result<Isa, String> {
    let isa = match name {
        "avx512" => Isa::Avx512,
        "avx2" => Isa::Avx2,
        "neon" => Isa::Neon,
        "portable" => Isa::Portable,
        _ => return Err(format!("unknown --isa {name:?} (avx512, avx2, neon, portable)")),
    };
    if !isa.supported() {
        return Err(format!("this CPU cannot run --isa {name}"));
    }
    Ok(isa)
}

fn bench_matmul(args: MatmulArgs) -> Result<(), String> {
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if args.device == Device::Gpu {
        return bench_matmul_gpu(&args);
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
                    let line = serde_json::json!({
                        "op": "matmul", "device": "cpu", "m": m, "k": k, "n": n,
                        "trans_a": args.trans_a, "trans_b": args.trans_b, "threads": t,
                        "ms": median * 1e3, "gflops": s.flops() / median / 1e9,
                        "best_ms": times[0] * 1e3,
                        "impl": match args.r#impl { Impl::Fast => "fast", Impl::Naive => "naive" },
                        "isa": isa.name(),
                    });
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}

/// GPU matmul: `reps` launches recorded into one submission, timed to completion, so the
/// per-launch time excludes submission and readback latency (reported separately as a
/// single-launch round trip).
fn bench_matmul_gpu(args: &MatmulArgs) -> Result<(), String> {
    use femtochat_kernels::gpu::{GpuContext, matmul::matmul};
    let ctx = GpuContext::get().map_err(|e| e.to_string())?;
    let device = format!("{} ({:?})", ctx.info.name, ctx.info.backend);
    for &m in &args.m {
        for &k in &args.k {
            for &n in &args.n {
                let s = MatmulShape::new(m, k, n, args.trans_a, args.trans_b);
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
                let e = |e: femtochat_kernels::gpu::GpuError| e.to_string();
                let (ga, gb, gc) = (
                    ctx.upload(&a).map_err(e)?,
                    ctx.upload(&b).map_err(e)?,
                    ctx.zeros(m * n).map_err(e)?,
                );
                let launch = |count: usize| -> Result<f64, String> {
                    let t0 = Instant::now();
                    let mut bt = ctx.batch();
                    for _ in 0..count {
                        matmul(&mut bt, &gc, &ga, &gb, s, false).map_err(e)?;
                    }
                    bt.submit();
                    ctx.wait().map_err(e)?;
                    Ok(t0.elapsed().as_secs_f64())
                };
                launch(1)?; // warm-up: pipeline creation, first-touch allocation
                let round_trip = launch(1)?;
                let total = launch(args.reps)?;
                let per = total / args.reps as f64;
                let line = serde_json::json!({
                    "op": "matmul", "device": "gpu", "adapter": device, "m": m, "k": k, "n": n,
                    "trans_a": args.trans_a, "trans_b": args.trans_b,
                    "ms": per * 1e3, "gflops": s.flops() / per / 1e9,
                    "single_launch_ms": round_trip * 1e3, "reps": args.reps,
                    "impl": "wgsl_tiled_64x64_4x4",
                });
                println!("{line}");
            }
        }
    }
    Ok(())
}
