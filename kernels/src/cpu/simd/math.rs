//! Branch-free scalar math that vectorises inside the kernels' loops.

/// Sum in 8 lanes so it vectorises.
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    // lengths: any length is a valid input.
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// e^x to ~2 ulp, branch-free so loops over it vectorise (libm's `expf` is an opaque call).
/// Inputs are clamped to [-87.3, 88.3]: results below ~1e-38 come out as ~1e-38 instead of a
/// subnormal or 0, which is harmless in the max-shifted sums it serves; NaN stays NaN.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    fast_exp_by(x, |a, b, c| a * b + c)
}

/// `fast_exp` with a given multiply-add: `BlockGemm::mul_add` fuses it where the CPU has FMA,
/// which halves the instructions of the reduction and the polynomial.
#[inline(always)]
pub fn fast_exp_by(x: f32, mul_add: impl Fn(f32, f32, f32) -> f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so n * LN2_HI is exact for |n| < 2^9 (Cody-Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5 * 2^23 rounds to nearest without SSE4.1's roundps.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = mul_add(x, LOG2E, ROUND);
    let n = t - ROUND;
    let f = mul_add(n, -LN2_LO, mul_add(n, -LN2_HI, x)); // |f| <= ln2 / 2
    // Taylor to degree 7: truncation error f^8 / 8! < 6e-9 on that interval.
    let p = 1.0 / 5040.0;
    let p = mul_add(p, f, 1.0 / 720.0);
    let p = mul_add(p, f, 1.0 / 120.0);
    let p = mul_add(p, f, 1.0 / 24.0);
    let p = mul_add(p, f, 1.0 / 6.0);
    let p = mul_add(p, f, 0.5);
    let p = mul_add(p, f, 1.0);
    let p = mul_add(p, f, 1.0);
    // t's low mantissa bits hold n itself (t = 1.5 * 2^23 + n), which spares a saturating
    // float-to-int cast that would block vectorisation; wrapping ops keep it branch-free under
    // overflow checks too.
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    p * scale
}

/// tanh(x) to ~1e-7 absolute (and relative near 0), branch-free like `fast_exp`.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    // 1 - 2 / (e^2x + 1) cancels near 0, so small |x| takes the odd Taylor series (error
    // 62 x^9 / 2835 < 6e-9 relative below 0.2).
    let big = 1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0);
    let x2 = x * x;
    let small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))));
    if x.abs() < 0.2 { small } else { big }
}
