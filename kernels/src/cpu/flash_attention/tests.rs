use super::*;
use crate::cpu::attention::tests::{finite_difference_mismatch, rand_vec};
use crate::cpu::attention::{attention_backward, attention_forward, attention_forward_naive};
use proptest::prelude::*;

/// ||a - b|| / ||b||, in f64.
fn rel_l2(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, y) in a.iter().zip(b) {
        num += (x as f64 - y).powi(2);
        den += y * y;
    }
    (num / den.max(1e-300)).sqrt()
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    v.extend([Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| checked(i) == i));
    v
}

struct Case {
    s: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn case(s: AttnShape, seed: u64) -> Case {
    let (nq, nk) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d);
    // Scaled like trained activations so softmaxes are neither flat nor one-hot.
    let q = rand_vec(nq, seed).iter().map(|x| 2.0 * x).collect();
    let (k, v, dout) = (rand_vec(nk, seed ^ 1), rand_vec(nk, seed ^ 2), rand_vec(nq, seed ^ 3));
    Case { s, q, k, v, dout }
}

/// Flash forward (tiled and split-K) and backward against the reference kernels: out and
/// lse within 1e-5, gradients within 1e-4 relative L2; the forward also against f64 when
/// that is cheap.
fn check(c: &Case, bl: FlashBlocks) {
    let s = c.s;
    let (nq, nk, nl) = (c.q.len(), c.k.len(), s.b * s.tq * s.h);
    let (mut want, mut want_lse) = (vec![0.0; nq], vec![0.0; nl]);
    attention_forward(&mut want, &mut want_lse, &c.q, &c.k, &c.v, s);
    let naive =
        (s.tq * s.tk * s.h * s.d < 1 << 20).then(|| attention_forward_naive(&c.q, &c.k, &c.v, s));
    let grads = |isa: Isa, out: &[f32], lse: &[f32], flash: bool| {
        let (mut dq, mut dk, mut dv) = (vec![0.5; nq], vec![0.5; nk], vec![0.5; nk]);
        let (q, k, v, d) = (&c.q, &c.k, &c.v, &c.dout);
        if flash {
            flash_backward_with(isa, &mut dq, &mut dk, &mut dv, d, q, k, v, out, lse, s, bl);
        } else {
            attention_backward(&mut dq, &mut dk, &mut dv, d, q, k, v, out, lse, s);
        }
        [dq, dk, dv]
    };
    let want_g = grads(Isa::Portable, &want, &want_lse, false);
    for isa in isas() {
        for decode in [false, true] {
            let (mut out, mut lse) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
            if decode {
                flash_decode_with(isa, &mut out, &mut lse, &c.q, &c.k, &c.v, s, bl);
            } else {
                flash_forward_with(isa, &mut out, &mut lse, &c.q, &c.k, &c.v, s, bl);
            }
            let tag = format!("{isa:?} decode {decode} {bl:?} {s:?}");
            let e = rel_l2(&out, want.iter().map(|&x| x as f64));
            assert!(e < 1e-5, "out vs reference {e:e}: {tag}");
            let e = rel_l2(&lse, want_lse.iter().map(|&x| x as f64));
            assert!(e < 1e-5, "lse vs reference {e:e}: {tag}");
            if let Some(naive) = &naive {
                let e = rel_l2(&out, naive.iter().copied());
                assert!(e < 1e-5, "out vs f64 {e:e}: {tag}");
            }
            if decode {
                continue;
            }
            let got = grads(isa, &out, &lse, true);
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want_g)) {
                let e = rel_l2(g, w.iter().map(|&x| x as f64));
                assert!(e < 1e-4, "{name} vs reference {e:e}: {tag}");
            }
        }
    }
}

fn shape(b: usize, t: usize, h: usize, hkv: usize, d: usize, window: usize) -> AttnShape {
    AttnShape { b, tq: t, tk: t, h, hkv, d, window, pos0: 0 }
}

const FULL: usize = usize::MAX;
const DEFAULT: FlashBlocks = FlashBlocks { br: 64, bc: 64 };

#[test]
fn training_shapes_match_reference() {
    // (T, H, Hkv, D, window, blocks): ragged T against every block shape, GQA 1/2/3,
    // head dims through both register tiles' ragged edges, windows 0 / narrow / >= T.
    let cases = [
        (1, 2, 1, 8, FULL, DEFAULT),
        (7, 3, 1, 8, FULL, FlashBlocks { br: 16, bc: 16 }),
        (65, 2, 2, 64, FULL, DEFAULT),
        (65, 4, 2, 72, 9, FlashBlocks { br: 17, bc: 9 }),
        (130, 3, 1, 64, 0, FlashBlocks { br: 32, bc: 64 }),
        (130, 6, 2, 128, 40, FlashBlocks { br: 16, bc: 16 }),
        (130, 2, 2, 256, 200, DEFAULT),
        (33, 3, 3, 37, 31, FlashBlocks { br: 17, bc: 9 }),
    ];
    for (n, &(t, h, hkv, d, w, bl)) in cases.iter().enumerate() {
        check(&case(shape(2, t, h, hkv, d, w), n as u64), bl);
    }
}

#[test]
fn cache_prefill_and_decode_match_reference() {
    // pos0 > 0 with extra unused keys past the last query; decode rows against several
    // split-K chunks, with and without a window.
    let cases = [
        (1, 700, 4, 2, 64, FULL),
        (1, 600, 3, 1, 72, 300),
        (3, 300, 2, 2, 128, FULL),
        (4, 530, 6, 2, 16, 5),
        (70, 90, 4, 4, 64, FULL),
        (70, 90, 6, 3, 32, 33),
    ];
    for (n, &(tq, pos0, h, hkv, d, window)) in cases.iter().enumerate() {
        let s = AttnShape { b: 2, tq, tk: pos0 + tq + 3, h, hkv, d, window, pos0 };
        check(&case(s, 100 + n as u64), FlashBlocks { br: 32, bc: 64 });
    }
}

#[test]
fn deterministic() {
    let c = case(shape(1, 200, 4, 2, 64, FULL), 7);
    let s = c.s;
    let run = || {
        let (mut out, mut lse) = (vec![0.0; c.q.len()], vec![0.0; s.tq * s.h]);
        flash_attention_forward(&mut out, &mut lse, &c.q, &c.k, &c.v, s, DEFAULT);
        let (mut dq, mut dk, mut dv) =
            (vec![0.0; c.q.len()], vec![0.0; c.k.len()], vec![0.0; c.k.len()]);
        let (q, k, v) = (&c.q, &c.k, &c.v);
        flash_attention_backward(
            &mut dq, &mut dk, &mut dv, &c.dout, q, k, v, &out, &lse, s, DEFAULT,
        );
        [out, lse, dq, dk, dv].map(|x| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
    };
    assert_eq!(run(), run());
}

fn shapes() -> impl Strategy<Value = (AttnShape, FlashBlocks)> {
    let dims = (1usize..3, 1usize..40, 1usize..4, 1usize..4, 1usize..20, 0usize..14, 0usize..9);
    (dims, 1usize..20, 1usize..20).prop_map(|((b, tq, hkv, group, d, window, pos0), br, bc)| {
        let window = if window == 13 { usize::MAX } else { window };
        let s = AttnShape { b, tq, tk: pos0 + tq + pos0 % 2, h: hkv * group, hkv, d, window, pos0 };
        (s, FlashBlocks { br, bc })
    })
}

proptest! {
    #[test]
    fn random_shapes_match_reference((s, bl) in shapes(), seed: u64) {
        check(&case(s, seed), bl);
    }

    #[test]
    fn backward_matches_finite_differences((s, bl) in shapes(), seed: u64) {
        // L = sum(out * w): dq, dk, dv at a few coordinates against f64 central differences
        // of the f64 reference forward (eps 1e-2, tolerance as in engine/src/gradcheck.rs).
        let c = case(s, seed);
        let (nq, nk) = (c.q.len(), c.k.len());
        let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; s.b * s.tq * s.h]);
        flash_attention_forward(&mut out, &mut lse, &c.q, &c.k, &c.v, s, bl);
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        let (q, k, v, w) = (&c.q, &c.k, &c.v, &c.dout);
        flash_attention_backward(&mut dq, &mut dk, &mut dv, w, q, k, v, &out, &lse, s, bl);
        let bad = finite_difference_mismatch(s, [q, k, v], w, [&dq, &dk, &dv], 2e-2);
        prop_assert!(bad.is_none(), "{} ({s:?} {bl:?})", bad.unwrap_or_default());
    }
}

/// The instruction set flash attention uses here: AVX-512 needs AVX2 + FMA too (the decode and
/// row-statistics loops use the AVX2 `Lanes`); NEON falls back to portable loops.
fn checked(isa: Isa) -> Isa {
    match kernels(isa) {
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512(..) => Isa::Avx512,
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2(_) => Isa::Avx2,
        Kernels::Portable => Isa::Portable,
    }
}
