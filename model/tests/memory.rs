//! The training-memory estimate (`memory::estimate_train_step`, what `train bench --dry-run`
//! prints) against the peak the engine's accounting measures over a real step, for each
//! recompute mode; and recomputation really lowering the measured peak.
use femtochat_engine::mem::{self, CountingAlloc};
use femtochat_engine::{Ids, MuonAdamW, Reduction, pool};
use femtochat_model::memory::estimate_train_step;
use femtochat_model::optim::{OptimizerConfig, param_groups};
use femtochat_model::rng::Rng;
use femtochat_model::{GPTConfig, Gpt, Recompute};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// How far the estimate may be from the measurement, relative. The estimate counts tensors;
/// the measurement also sees allocator rounding, the recycler holding buffers of sizes the
/// next allocation does not want, and bookkeeping (graph nodes, shapes, hash maps).
const MARGIN: f64 = 0.25;

/// Peak host bytes of the second of two training steps (the first fills the recycler), above
/// what was live before the model existed.
fn measured_peak(config: &GPTConfig, b: usize, t: usize, r: Recompute) -> usize {
    // Start from an empty recycler, so another configuration's buffers do not count.
    pool::set_pool_limit(0);
    let limit = std::env::var("POOL").ok().and_then(|v| v.parse().ok());
    pool::set_pool_limit(limit.unwrap_or(pool::DEFAULT_POOL_LIMIT));
    let base = mem::host_bytes();
    let mut gpt = Gpt::init(config.clone(), 0).unwrap();
    gpt.set_recompute(r);
    let mut opt =
        MuonAdamW::new(param_groups(config, &OptimizerConfig::default()), gpt.params()).unwrap();
    let mut rng = Rng::new(1);
    let v = config.vocab_size as u64;
    let mut peak = 0;
    for _ in 0..2 {
        let ids: Vec<u32> = (0..=b * t).map(|_| (rng.next_u64() % v) as u32).collect();
        let idx = Ids::new(ids[..b * t].to_vec(), &[b, t]).unwrap();
        let targets: Vec<i32> = ids[1..].iter().map(|&x| x as i32).collect();
        mem::reset_peaks();
        let loss = gpt.loss(&idx, &targets, Reduction::Mean).unwrap();
        let grads = loss.backward().unwrap();
        drop(loss);
        opt.step(gpt.params(), &grads).unwrap();
        drop(grads);
        peak = mem::host_peak_bytes() - base;
    }
    peak
}

#[test]
fn estimate_is_within_the_margin_of_the_measured_peak_and_recompute_lowers_it() {
    assert!(mem::host_counting());
    let config = GPTConfig::from_depth(4, 32, 32, 256, 2048, "L").unwrap();
    let (b, t) = (4, 256);
    let mut peaks = Vec::new();
    for r in [Recompute::None, Recompute::Blocks, Recompute::All, Recompute::Sublayers] {
        let got = measured_peak(&config, b, t, r) as f64;
        let est = estimate_train_step(&config, b, t, r).total as f64;
        let err = (est - got).abs() / got;
        eprintln!("--recompute {r}: measured {got:.0} B, estimated {est:.0} B ({err:.3})");
        assert!(err <= MARGIN, "--recompute {r}: estimate {est} vs measured {got} ({err:.3})");
        peaks.push(got);
    }
    assert!(peaks[1] < peaks[0] && peaks[2] < peaks[1] && peaks[3] < peaks[2], "{peaks:?}");
}
