//! criterion: f32 matmul at 1024^3 and the transformer shapes of a d12-like layer
//! (4096 tokens, C = 768, 4C = 3072) in the three layouts training uses.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use femtochat::kernels::cpu::matmul::{MatmulShape, matmul};

fn bench(c: &mut Criterion) {
    let cases = [
        ("1024^3 NN", MatmulShape::new(1024, 1024, 1024, false, false)),
        ("fwd x·W^T 4096x768x3072 NT", MatmulShape::new(4096, 768, 3072, false, true)),
        ("bwd dX=dY·W 4096x3072x768 NN", MatmulShape::new(4096, 3072, 768, false, false)),
        ("bwd dW=dY^T·X 3072x4096x768 TN", MatmulShape::new(3072, 4096, 768, true, false)),
    ];
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    for (name, s) in cases {
        let a: Vec<f32> = (0..s.m * s.k).map(|i| (i % 17) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..s.k * s.n).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut out = vec![0.0f32; s.m * s.n];
        // Elements = FLOPs, so criterion's "elem/s" reads as FLOP/s.
        g.throughput(Throughput::Elements(s.flops() as u64));
        g.bench_function(name, |bench| bench.iter(|| matmul(&mut out, &a, &b, s, false)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
