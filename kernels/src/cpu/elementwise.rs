//! Elementwise ops: unary maps (scale, relu², sigmoid, tanh, softcap) and broadcasting binary ops
//! (add, sub, mul), each forward beside its backward.
//!
//! Parallelised over fixed chunks of the output (`CHUNK` elements, or whole output rows for the
//! broadcasting kernels): every task writes a disjoint range, so there are no races.
//! Forward kernels write `out =` (binary kernels optionally `+=`, see `accumulate`); backward
//! kernels accumulate `dinp +=`, so the caller zero-fills a gradient before its first use.
use rayon::prelude::*;

use super::simd::{fast_exp, fast_tanh, vectorized};

/// Elements per rayon task; a buffer shorter than this is processed on the calling thread.
pub const CHUNK: usize = 1 << 14;

/// out = f(inp)
fn map_unary(out: &mut [f32], inp: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    assert_eq!(out.len(), inp.len());
    let run =
        |o: &mut [f32], x: &[f32]| vectorized(|| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)));
    if out.len() <= CHUNK {
        run(out, inp);
    } else {
        out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| run(o, x));
    }
}

/// dinp += f(dout, x), where x is the saved forward input or output.
fn acc_binary(dinp: &mut [f32], dout: &[f32], x: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    assert_eq!(dinp.len(), dout.len());
    assert_eq!(dinp.len(), x.len());
    let run = |d: &mut [f32], g: &[f32], x: &[f32]| {
        vectorized(|| d.iter_mut().zip(g).zip(x).for_each(|((d, &g), &x)| *d += f(g, x)))
    };
    if dinp.len() <= CHUNK {
        run(dinp, dout, x);
    } else {
        dinp.par_chunks_mut(CHUNK)
            .zip(dout.par_chunks(CHUNK))
            .zip(x.par_chunks(CHUNK))
            .for_each(|((d, g), x)| run(d, g, x));
    }
}

/// out = s * inp
pub fn scale_forward(out: &mut [f32], inp: &[f32], s: f32) {
    map_unary(out, inp, |x| s * x);
}

// d (s x) = s
/// dinp += s * dout
pub fn scale_backward(dinp: &mut [f32], dout: &[f32], s: f32) {
    assert_eq!(dinp.len(), dout.len());
    let run = |d: &mut [f32], g: &[f32]| d.iter_mut().zip(g).for_each(|(d, &g)| *d += s * g);
    if dinp.len() <= CHUNK {
        run(dinp, dout);
    } else {
        dinp.par_chunks_mut(CHUNK).zip(dout.par_chunks(CHUNK)).for_each(|(d, g)| run(d, g));
    }
}

/// out = relu(inp)^2
pub fn relu2_forward(out: &mut [f32], inp: &[f32]) {
    map_unary(out, inp, |x| {
        let r = x.max(0.0);
        r * r
    });
}

// d relu(x)^2 = 2 relu(x)
/// dinp += dout * 2 relu(inp)
pub fn relu2_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32]) {
    acc_binary(dinp, dout, inp, |g, x| g * 2.0 * x.max(0.0));
}

/// out = 1 / (1 + e^-inp)
pub fn sigmoid_forward(out: &mut [f32], inp: &[f32]) {
    map_unary(out, inp, sigmoid);
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    // fast_exp clamps its argument, so this neither overflows nor divides by inf.
    1.0 / (1.0 + fast_exp(-x))
}

// d sigmoid = sigmoid (1 - sigmoid)
/// dinp += dout * out (1 - out), from the saved forward output.
pub fn sigmoid_backward(dinp: &mut [f32], dout: &[f32], out: &[f32]) {
    acc_binary(dinp, dout, out, |g, y| g * y * (1.0 - y));
}

/// out = tanh(inp)
pub fn tanh_forward(out: &mut [f32], inp: &[f32]) {
    map_unary(out, inp, fast_tanh);
}

// d tanh = 1 - tanh^2
/// dinp += dout * (1 - out^2), from the saved forward output.
pub fn tanh_backward(dinp: &mut [f32], dout: &[f32], out: &[f32]) {
    acc_binary(dinp, dout, out, |g, y| g * (1.0 - y * y));
}

/// out = c tanh(inp / c)
pub fn softcap_forward(out: &mut [f32], inp: &[f32], c: f32) {
    let inv_c = 1.0 / c;
    map_unary(out, inp, |x| c * fast_tanh(x * inv_c));
}

// d c tanh(x/c) = 1 - tanh(x/c)^2 = 1 - (y/c)^2
/// dinp += dout * (1 - (out/c)^2), from the saved forward output.
pub fn softcap_backward(dinp: &mut [f32], dout: &[f32], out: &[f32], c: f32) {
    let inv_c = 1.0 / c;
    acc_binary(dinp, dout, out, |g, y| {
        let t = y * inv_c;
        g * (1.0 - t * t)
    });
}

/// Two shapes broadcast against each other (numpy rules), collapsed to the fewest dims: adjacent
/// dims merge when both operands are contiguous (or both broadcast) across them. Strides are in
/// elements; a stride of 0 repeats an operand along that dim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broadcast {
    /// The broadcast result shape (uncollapsed).
    pub out_shape: Vec<usize>,
    dims: Vec<usize>,
    stride_a: Vec<usize>,
    stride_b: Vec<usize>,
}

impl Broadcast {
    /// `None` when the shapes do not broadcast.
    pub fn new(a: &[usize], b: &[usize]) -> Option<Self> {
        let rank = a.len().max(b.len());
        let pad = |s: &[usize]| {
            let mut p = vec![1; rank - s.len()];
            p.extend_from_slice(s);
            p
        };
        let (a, b) = (pad(a), pad(b));
        let mut out_shape = Vec::with_capacity(rank);
        for (&x, &y) in a.iter().zip(&b) {
            out_shape.push(match (x, y) {
                _ if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => return None,
            });
        }
        let contiguous = |s: &[usize]| {
            let mut st = vec![0; rank];
            let mut acc = 1;
            for d in (0..rank).rev() {
                st[d] = if s[d] == 1 { 0 } else { acc };
                acc *= s[d];
            }
            st
        };
        let (sa, sb) = (contiguous(&a), contiguous(&b));
        let (mut dims, mut stride_a, mut stride_b) = (Vec::new(), Vec::new(), Vec::new());
        for d in 0..rank {
            let n = out_shape[d];
            if n == 1 {
                continue;
            }
            if let Some(&last) = dims.last() {
                let i = dims.len() - 1;
                // dim d-1 (collapsed `last`) followed by d is one dim for an operand when its
                // outer stride equals its inner stride times the inner extent.
                if stride_a[i] == sa[d] * n && stride_b[i] == sb[d] * n {
                    dims[i] = last * n;
                    stride_a[i] = sa[d];
                    stride_b[i] = sb[d];
                    continue;
                }
            }
            dims.push(n);
            stride_a.push(sa[d]);
            stride_b.push(sb[d]);
        }
        if dims.is_empty() {
            dims.push(1);
            stride_a.push(0);
            stride_b.push(0);
        }
        Some(Self { out_shape, dims, stride_a, stride_b })
    }

    /// The collapsed dims and a's strides in them (0 where a is broadcast).
    pub fn dims_and_stride_a(&self) -> (&[usize], &[usize]) {
        (&self.dims, &self.stride_a)
    }

    /// The collapsed dims with a's and b's strides in them (for the GPU launcher).
    pub fn collapsed(&self) -> (&[usize], &[usize], &[usize]) {
        (&self.dims, &self.stride_a, &self.stride_b)
    }

    /// Elements of a and of b (each the product of its shape) when the output is not empty.
    pub fn operand_lens(&self) -> (usize, usize) {
        let len = |st: &[usize]| -> usize {
            let mut n = 1;
            for (&d, &s) in self.dims.iter().zip(st) {
                if s > 0 {
                    n *= d;
                }
            }
            n
        };
        (len(&self.stride_a), len(&self.stride_b))
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Offsets into a and b of the first element of collapsed row `row` (all dims but the last).
    #[inline]
    fn row_offsets(&self, mut row: usize) -> (usize, usize) {
        let (mut oa, mut ob) = (0, 0);
        for d in (0..self.dims.len() - 1).rev() {
            let i = row % self.dims[d];
            row /= self.dims[d];
            oa += i * self.stride_a[d];
            ob += i * self.stride_b[d];
        }
        (oa, ob)
    }
}

/// out (=|+=) f(a, b) with broadcasting; out has `bc.out_shape`.
fn binary(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    bc: &Broadcast,
    accumulate: bool,
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    assert_eq!(out.len(), bc.numel());
    if out.is_empty() {
        return;
    }
    let (na, nb) = bc.operand_lens();
    assert!(
        a.len() == na && b.len() == nb,
        "broadcast: operands of {} and {} floats, not {na} and {nb}",
        a.len(),
        b.len()
    );
    let inner = *bc.dims.last().unwrap_or(&1);
    let (ia, ib) = (*bc.stride_a.last().unwrap_or(&0), *bc.stride_b.last().unwrap_or(&0));
    // The innermost collapsed dim is contiguous or broadcast for each operand; specialising on
    // that keeps the hot loop a plain zip the compiler vectorises.
    let row = |r: usize, o: &mut [f32]| {
        let (oa, ob) = bc.row_offsets(r);
        macro_rules! apply {
            ($val:expr) => {
                if accumulate {
                    for (k, o) in o.iter_mut().enumerate() {
                        *o += $val(k);
                    }
                } else {
                    for (k, o) in o.iter_mut().enumerate() {
                        *o = $val(k);
                    }
                }
            };
        }
        match (ia, ib) {
            (1, 1) => {
                let (a, b) = (&a[oa..oa + inner], &b[ob..ob + inner]);
                apply!(|k: usize| f(a[k], b[k]))
            }
            (1, _) => {
                let (a, y) = (&a[oa..oa + inner], b[ob]);
                apply!(|k: usize| f(a[k], y))
            }
            (_, 1) => {
                let (x, b) = (a[oa], &b[ob..ob + inner]);
                apply!(|k: usize| f(x, b[k]))
            }
            _ => {
                let v = f(a[oa], b[ob]);
                apply!(|_k: usize| v)
            }
        }
    };
    let rows_per_task = (CHUNK / inner.max(1)).max(1);
    if out.len() <= CHUNK {
        out.chunks_mut(inner).enumerate().for_each(|(r, o)| row(r, o));
    } else {
        out.par_chunks_mut(inner * rows_per_task).enumerate().for_each(|(t, block)| {
            vectorized(|| {
                for (i, o) in block.chunks_mut(inner).enumerate() {
                    row(t * rows_per_task + i, o);
                }
            })
        });
    }
}

/// out (=|+=) a + b, broadcasting.
pub fn add_forward(out: &mut [f32], a: &[f32], b: &[f32], bc: &Broadcast, accumulate: bool) {
    binary(out, a, b, bc, accumulate, |x, y| x + y);
}

/// out (=|+=) a - b, broadcasting.
pub fn sub_forward(out: &mut [f32], a: &[f32], b: &[f32], bc: &Broadcast, accumulate: bool) {
    binary(out, a, b, bc, accumulate, |x, y| x - y);
}

/// out (=|+=) a * b, broadcasting. Also the backward of mul: d(a*b)/da = b, so
/// `mul_forward(da_full, dout, b, ..., true)` accumulates dout * b at the output shape.
pub fn mul_forward(out: &mut [f32], a: &[f32], b: &[f32], bc: &Broadcast, accumulate: bool) {
    binary(out, a, b, bc, accumulate, |x, y| x * y);
}

/// Reference for `mul_forward`: index arithmetic on the uncollapsed shapes. Returns the output
/// shape; panics if the shapes do not broadcast (test oracle only).
pub fn mul_naive(
    out: &mut [f32],
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
) -> Vec<usize> {
    let bc = Broadcast::new(a_shape, b_shape).expect("shapes broadcast");
    let n: usize = bc.out_shape.iter().product();
    assert!(out.len() == n && a.len() == a_shape.iter().product::<usize>());
    assert_eq!(b.len(), b_shape.iter().product::<usize>());
    let rank = bc.out_shape.len();
    let pad = |s: &[usize]| {
        let mut p = vec![1; rank - s.len()];
        p.extend_from_slice(s);
        p
    };
    let (pa, pb) = (pad(a_shape), pad(b_shape));
    for (flat, o) in out.iter_mut().enumerate().take(n) {
        let (mut rem, mut ia, mut ib, mut sa, mut sb) = (flat, 0, 0, 1, 1);
        for d in (0..rank).rev() {
            let i = rem % bc.out_shape[d];
            rem /= bc.out_shape[d];
            ia += if pa[d] == 1 { 0 } else { i * sa };
            ib += if pb[d] == 1 { 0 } else { i * sb };
            sa *= pa[d];
            sb *= pb[d];
        }
        *o = a[ia] * b[ib];
    }
    bc.out_shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        // Each dim of b is either a's or 1; a sometimes has extra leading dims.
        prop::collection::vec((1usize..6, any::<bool>(), any::<bool>()), 0..5).prop_map(|v| {
            let a: Vec<usize> = v.iter().map(|&(n, ba, _)| if ba { 1 } else { n }).collect();
            let b: Vec<usize> = v.iter().map(|&(n, _, bb)| if bb { 1 } else { n }).collect();
            let drop = v.len() / 2;
            (a, b[drop..].to_vec())
        })
    }

    proptest! {
        #[test]
        fn mul_matches_naive((sa, sb) in shapes(), seed in 0u32..1000) {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a: Vec<f32> = (0..na).map(|i| ((i as u32 * 7 + seed) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..nb).map(|i| ((i as u32 * 5 + seed) % 11) as f32 - 5.0).collect();
            let bc = Broadcast::new(&sa, &sb).unwrap();
            let n = bc.numel();
            let mut fast = vec![0.0; n];
            mul_forward(&mut fast, &a, &b, &bc, false);
            let mut naive = vec![0.0; n];
            let shape = mul_naive(&mut naive, &a, &sa, &b, &sb);
            prop_assert_eq!(shape.iter().product::<usize>(), n);
            prop_assert_eq!(fast, naive);
        }
    }

    #[test]
    fn broadcast_collapses_gate_shape() {
        // (B,T,Hkv,1) * (B,T,Hkv,D): one row per (b,t,h), b repeated along D.
        let bc = Broadcast::new(&[2, 3, 4, 1], &[2, 3, 4, 8]).unwrap();
        assert_eq!(bc.dims, vec![24, 8]);
        assert_eq!(bc.stride_a, vec![1, 0]);
        assert_eq!(bc.stride_b, vec![8, 1]);
        assert!(Broadcast::new(&[2, 3], &[3, 2]).is_none());
    }

    #[test]
    fn unary_large_parallel_path() {
        let n = CHUNK * 3 + 17;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 1e-3).collect();
        let mut y = vec![0.0; n];
        sigmoid_forward(&mut y, &x);
        for (&x, &y) in x.iter().zip(&y) {
            assert!((y - 1.0 / (1.0 + (-x).exp())).abs() < 1e-6);
        }
        let mut d = vec![1.0; n];
        relu2_backward(&mut d, &y, &x);
        assert_eq!(d[0], 1.0);
        assert!((d[n - 1] - (1.0 + y[n - 1] * 2.0 * x[n - 1])).abs() < 1e-6);
    }
}
