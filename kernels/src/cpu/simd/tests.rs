use super::*;

#[test]
fn fast_exp_and_tanh_are_accurate() {
    let mut worst = (0.0f64, 0.0f64);
    for i in -200_000..=200_000 {
        let x = i as f32 * 4.3e-4; // [-86, 86]
        let (e, t) = (fast_exp(x) as f64, fast_tanh(x * 0.1) as f64);
        let (we, wt) = ((x as f64).exp(), (x as f64 * 0.1).tanh());
        let fused = fast_exp_by(x, f32::mul_add) as f64;
        worst.0 = worst.0.max(((e - we) / we).abs()).max(((fused - we) / we).abs());
        worst.1 = worst.1.max((t - wt).abs() / wt.abs().max(1.0));
    }
    assert!(worst.0 < 5e-7, "exp rel err {}", worst.0);
    assert!(worst.1 < 3e-7, "tanh err {}", worst.1);
    assert!(fast_exp(f32::NAN).is_nan());
    assert!(fast_exp(-1000.0) < 1e-37);
    assert_eq!(fast_tanh(50.0), 1.0);
    assert_eq!(fast_tanh(-50.0), -1.0);
}

#[test]
fn gemm_tiles_agree() {
    for (n, d, stride) in
        [(0usize, 8usize, 8usize), (1, 3, 5), (5, 17, 20), (8, 64, 64), (7, 40, 96)]
    {
        let a: Vec<Vec<f32>> = (0..TILE)
            .map(|r| (0..d).map(|c| ((r * 31 + c * 7) % 13) as f32 - 6.0).collect())
            .collect();
        let b: Vec<f32> =
            (0..n * stride + d).map(|i| ((i * 11) % 17) as f32 * 0.25 - 2.0).collect();
        let rows: [&[f32]; TILE] = std::array::from_fn(|r| a[r].as_slice());
        let mut want = vec![0.0; TILE * n];
        for r in 0..TILE {
            for j in 0..n {
                want[r * n + j] = (0..d).map(|c| a[r][c] * b[j * stride + c]).sum();
            }
        }
        let p: Vec<f32> = (0..TILE * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let mut want_nn = vec![1.0; TILE * d];
        for r in 0..TILE {
            for c in 0..d {
                want_nn[r * d + c] += (0..n).map(|j| p[r * n + j] * b[j * stride + c]).sum::<f32>();
            }
        }
        let mut got = vec![0.0; TILE * n];
        let mut got_nn = vec![1.0; TILE * d];
        Portable.gemm_nt_4(&mut got, rows, &b, stride, n, d);
        Portable.gemm_nn_4(&mut got_nn, &p, &b, stride, n, d);
        assert_eq!(got, want);
        assert_eq!(got_nn, want_nn);
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = Avx2Fma::new() {
            t.gemm_nt_4(&mut got, rows, &b, stride, n, d);
            let mut got_nn = vec![1.0; TILE * d];
            t.gemm_nn_4(&mut got_nn, &p, &b, stride, n, d);
            // Small integers: exact in any summation order.
            assert_eq!(got, want);
            assert_eq!(got_nn, want_nn);
        }
    }
}

/// `BlockGemm::gemm` of one implementation.
type GemmFn = unsafe fn(
    *mut f32,
    usize,
    *const f32,
    usize,
    usize,
    *const f32,
    usize,
    usize,
    usize,
    usize,
    bool,
);

#[test]
fn block_gemm_matches_naive() {
    // Shapes straddle both register tiles (8 x 32, 6 x 16) and their ragged edges; A is read
    // row-major and transposed; C and B rows are strided.
    let cases = [(1usize, 1usize, 1usize), (3, 5, 2), (8, 32, 64), (13, 37, 9), (64, 72, 64)];
    for (m, n, k) in cases {
        for transposed in [false, true] {
            let (a_rs, a_cs) = if transposed { (1, m + 1) } else { (k + 2, 1) };
            let a: Vec<f32> = (0..m * a_rs + k * a_cs + 1).map(|i| (i % 7) as f32 - 3.0).collect();
            let (ldb, ldc) = (n + 3, n + 5);
            let b: Vec<f32> = (0..k * ldb).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
            let c0: Vec<f32> = (0..m * ldc).map(|i| (i % 3) as f32).collect();
            for accumulate in [false, true] {
                let mut want = c0.clone();
                for i in 0..m {
                    for j in 0..n {
                        let dot: f32 =
                            (0..k).map(|p| a[i * a_rs + p * a_cs] * b[p * ldb + j]).sum();
                        let w = &mut want[i * ldc + j];
                        *w = if accumulate { *w + dot } else { dot };
                    }
                }
                let run = |f: GemmFn| {
                    let mut c = c0.clone();
                    // SAFETY: the buffers above cover every addressed element.
                    unsafe {
                        f(
                            c.as_mut_ptr(),
                            ldc,
                            a.as_ptr(),
                            a_rs,
                            a_cs,
                            b.as_ptr(),
                            ldb,
                            m,
                            n,
                            k,
                            accumulate,
                        )
                    };
                    c
                };
                // Small integers and halves: exact in any summation order.
                assert_eq!(run(Portable::gemm), want, "portable {m}x{n}x{k}");
                #[cfg(target_arch = "x86_64")]
                {
                    use crate::cpu::isa::Isa;
                    if Isa::Avx2.supported() {
                        assert_eq!(run(Avx2Fma::gemm), want, "avx2 {m}x{n}x{k}");
                    }
                    if Isa::Avx512.supported() {
                        assert_eq!(run(Avx512::gemm), want, "avx512 {m}x{n}x{k}");
                    }
                }
            }
        }
    }
}

#[test]
fn flavours_agree() {
    for n in [0usize, 1, 7, 8, 31, 32, 33, 64, 100, 128] {
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((Portable.dot(&a, &b) as f64 - want).abs() < 1e-4);
        let mut y1 = b.clone();
        Portable.axpy(&mut y1, 0.5, &a);
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = Avx2Fma::new() {
            assert!((t.dot(&a, &b) as f64 - want).abs() < 1e-4);
            let mut y2 = b.clone();
            t.axpy(&mut y2, 0.5, &a);
            for (p, q) in y1.iter().zip(&y2) {
                assert!((p - q).abs() < 1e-6);
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn markers_exist_only_where_the_cpu_has_their_features() {
    use crate::cpu::isa::Isa;
    assert_eq!(Avx2Fma::new().is_some(), Isa::Avx2.supported());
    assert_eq!(Avx512::new().is_some(), Isa::Avx512.supported());
    // The selected ISA gates the dispatch helpers; the hardware gates the markers.
    assert_eq!(avx2().is_some(), Isa::detect().has_avx2() && Isa::Avx2.supported());
}
