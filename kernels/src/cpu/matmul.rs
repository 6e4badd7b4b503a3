//! Matrix multiplication: C (M, N) (=|+=) op(A) (M, K) · op(B) (K, N).
//!
//! Layouts are row-major. `trans_a` means A is stored as (K, M); `trans_b` means B is stored as
//! (N, K) (the `x W^T` of a linear layer). `accumulate` selects `C += A·B` over `C = A·B`.

/// Shape of one matmul problem, shared by the naive and fast kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulShape {
    pub fn new(m: usize, k: usize, n: usize, trans_a: bool, trans_b: bool) -> Self {
        Self { m, k, n, trans_a, trans_b }
    }

    /// Element (i, p) of op(A).
    #[inline]
    fn a_at(&self, a: &[f32], i: usize, p: usize) -> f32 {
        if self.trans_a { a[p * self.m + i] } else { a[i * self.k + p] }
    }

    /// Element (p, j) of op(B).
    #[inline]
    fn b_at(&self, b: &[f32], p: usize, j: usize) -> f32 {
        if self.trans_b { b[j * self.k + p] } else { b[p * self.n + j] }
    }

    /// FLOPs of one problem (a multiply-add counts 2).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// Reference triple loop, accumulated in f64. Test oracle for `matmul`.
pub fn matmul_naive(c: &mut [f32], a: &[f32], b: &[f32], s: MatmulShape, accumulate: bool) {
    debug_assert_eq!(a.len(), s.m * s.k);
    debug_assert_eq!(b.len(), s.k * s.n);
    debug_assert_eq!(c.len(), s.m * s.n);
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0.0f64;
            for p in 0..s.k {
                acc += s.a_at(a, i, p) as f64 * s.b_at(b, p, j) as f64;
            }
            let out = &mut c[i * s.n + j];
            *out = if accumulate { *out + acc as f32 } else { acc as f32 };
        }
    }
}

/// C (M, N) (=|+=) op(A) · op(B).
// The fast (packed, register-blocked, SIMD) kernel replaces this body; the signature is stable.
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], s: MatmulShape, accumulate: bool) {
    matmul_naive(c, a, b, s, accumulate)
}

/// `batch` independent problems laid out contiguously: A (batch, M, K), B (batch, K, N),
/// C (batch, M, N) (with the per-problem layouts of `s`).
pub fn matmul_batched(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    batch: usize,
    s: MatmulShape,
    accumulate: bool,
) {
    let (sa, sb, sc) = (s.m * s.k, s.k * s.n, s.m * s.n);
    debug_assert_eq!(a.len(), batch * sa);
    debug_assert_eq!(b.len(), batch * sb);
    debug_assert_eq!(c.len(), batch * sc);
    for i in 0..batch {
        matmul(
            &mut c[i * sc..(i + 1) * sc],
            &a[i * sa..(i + 1) * sa],
            &b[i * sb..(i + 1) * sb],
            s,
            accumulate,
        );
    }
}
