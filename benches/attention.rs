//! CPU attention, forward and backward, reference vs flash, at nanochat head shapes (B = 1,
//! H = 4 query heads over Hkv = 4 kv heads, full causal window). Throughput is the causal FLOP
//! count: forward 4 D per attended (query, key) pair (q.k and p v); backward counted as 2.5x
//! forward (the FlashAttention-2 convention, 5 tile matmuls against 2), whatever a kernel
//! recomputes, as in `kernel-bench attention`.
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use femtochat_kernels::cpu::attention::{AttnShape, attention_backward, attention_forward};
use femtochat_kernels::cpu::flash_attention::{
    FlashBlocks, flash_attention_backward, flash_attention_forward,
};

fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5
        })
        .collect()
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for &d in &[64usize, 128] {
        let (fwd_bl, bwd_bl) = (FlashBlocks::forward(d), FlashBlocks::backward(d));
        for &t in &[256usize, 512, 1024, 2048] {
            let s = AttnShape { b: 1, tq: t, tk: t, h: 4, hkv: 4, d, window: usize::MAX, pos0: 0 };
            let (nq, nk) = (t * s.h * d, t * s.hkv * d);
            let (q, k, v) = (filled(nq, 1), filled(nk, 2), filled(nk, 3));
            let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; t * s.h]);
            let pairs = (t * (t + 1) / 2 * s.h) as u64;
            let fwd_flops = pairs * 4 * d as u64;
            let id = format!("D{d}/T{t}");
            group.throughput(Throughput::Elements(fwd_flops));
            group.bench_function(BenchmarkId::new("reference_forward", &id), |bch| {
                bch.iter(|| attention_forward(&mut out, &mut lse, &q, &k, &v, s))
            });
            group.bench_function(BenchmarkId::new("flash_forward", &id), |bch| {
                bch.iter(|| flash_attention_forward(&mut out, &mut lse, &q, &k, &v, s, fwd_bl))
            });
            let dout = filled(nq, 4);
            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            group.throughput(Throughput::Elements(fwd_flops * 5 / 2));
            group.bench_function(BenchmarkId::new("reference_backward", &id), |bch| {
                bch.iter(|| {
                    attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, s)
                })
            });
            group.bench_function(BenchmarkId::new("flash_backward", &id), |bch| {
                bch.iter(|| {
                    let (o, l) = (&out, &lse);
                    flash_attention_backward(
                        &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, o, l, s, bwd_bl,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
