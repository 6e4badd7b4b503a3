//! Reference CPU attention, forward and backward, at nanochat head shapes (B = 1, H = 4 query
//! heads over Hkv = 4 kv heads, full causal window). Throughput is the causal FLOP count:
//! forward 4 D per (query, key) pair (q.k and p v), backward counted as 2x forward.
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use femtochat_kernels::cpu::attention::{AttnShape, attention_backward, attention_forward};

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
        for &t in &[256usize, 512, 1024] {
            let s = AttnShape { b: 1, tq: t, tk: t, h: 4, hkv: 4, d, window: usize::MAX, pos0: 0 };
            let (nq, nk) = (t * s.h * d, t * s.hkv * d);
            let (q, k, v) = (filled(nq, 1), filled(nk, 2), filled(nk, 3));
            let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; t * s.h]);
            let pairs = (t * (t + 1) / 2 * s.h) as u64;
            group.throughput(Throughput::Elements(pairs * 4 * d as u64));
            let id = format!("D{d}/T{t}");
            group.bench_function(BenchmarkId::new("forward", &id), |bch| {
                bch.iter(|| attention_forward(&mut out, &mut lse, &q, &k, &v, s))
            });
            let dout = filled(nq, 4);
            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            group.throughput(Throughput::Elements(pairs * 8 * d as u64));
            group.bench_function(BenchmarkId::new("backward", &id), |bch| {
                bch.iter(|| {
                    attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, s)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
