//! The portable `Lanes` and `BlockGemm`: plain loops the compiler vectorises for the build target.
use super::{BlockGemm, Lanes, TILE};

#[derive(Clone, Copy, Debug)]
pub struct Portable;

impl Lanes for Portable {
    /// 8 independent accumulators, so the loop vectorises without reassociation licence.
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k];
            }
        }
        let s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
        s + tail
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
    }

    #[inline(always)]
    fn gemm_nt_4(
        self,
        out: &mut [f32],
        a: [&[f32]; TILE],
        b: &[f32],
        stride: usize,
        n: usize,
        d: usize,
    ) {
        for j in 0..n {
            let bj = &b[j * stride..][..d];
            for (r, ar) in a.iter().enumerate() {
                out[r * n + j] = self.dot(&ar[..d], bj);
            }
        }
    }

    #[inline(always)]
    fn gemm_nn_4(self, out: &mut [f32], p: &[f32], b: &[f32], stride: usize, n: usize, d: usize) {
        for j in 0..n {
            let bj = &b[j * stride..][..d];
            for r in 0..TILE {
                self.axpy(&mut out[r * d..(r + 1) * d], p[r * n + j], bj);
            }
        }
    }
}

impl BlockGemm for Portable {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }

    #[inline(always)]
    unsafe fn gemm(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) {
        // Row by row, saxpy over B rows: the inner loop is contiguous and vectorises.
        // SAFETY: the caller guarantees the bounds and exclusivity (see the trait).
        unsafe {
            for i in 0..m {
                let ci = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
                if !accumulate {
                    ci.fill(0.0);
                }
                for p in 0..k {
                    let av = *a.add(i * a_rs + p * a_cs);
                    let bp = std::slice::from_raw_parts(b.add(p * ldb), n);
                    ci.iter_mut().zip(bp).for_each(|(c, &b)| *c += av * b);
                }
            }
        }
    }
}
