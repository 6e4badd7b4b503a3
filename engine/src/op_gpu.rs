//! The GPU side of every op: forwards that record WGSL kernels into the open batch, and
//! `Op::backward_gpu`, each rule the twin of its CPU rule in `op.rs` (same formulas, gradients
//! accumulated `+=` into GPU buffers of the `GradStore`). Shapes are validated in `op.rs`
//! before anything here runs.
use std::sync::{Arc, Mutex};

use femtochat_kernels::cpu::attention::AttnShape;
use femtochat_kernels::cpu::elementwise::Broadcast;
use femtochat_kernels::cpu::matmul::MatmulShape;
use femtochat_kernels::cpu::rope::RopeShape;
use femtochat_kernels::cpu::slice::BlockView;
use femtochat_kernels::gpu::{self as gk, Batch, GpuBuffer, GpuError};

use crate::autograd::GradStore;
use crate::device::{context, record};
use crate::error::Result;
use crate::op::{Op, RopeTable, split_at_dim};
use crate::tensor::Tensor;

type GpuResult = std::result::Result<(), GpuError>;

/// A broadcasting binary kernel: (batch, out, a, b, broadcast, accumulate).
pub(crate) type BinaryKernel =
    fn(&mut Batch, &GpuBuffer, &GpuBuffer, &GpuBuffer, &Broadcast, bool) -> GpuResult;

/// RoPE cos/sin tables on the GPU, uploaded on first use and shared by clones of the table.
type CosSin = Arc<(GpuBuffer, GpuBuffer)>;

#[derive(Clone, Default)]
pub(crate) struct GpuTables(Arc<Mutex<Option<CosSin>>>);

impl std::fmt::Debug for GpuTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuTables")
    }
}

impl GpuTables {
    fn get(&self, table: &RopeTable) -> Result<CosSin> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &*slot {
            return Ok(t.clone());
        }
        let t = Arc::new(record(|bt| Ok((bt.upload(&table.cos)?, bt.upload(&table.sin)?)))?);
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// A fresh GPU buffer of `n` elements (contents unspecified: kernels write it with `=`).
pub(crate) fn alloc(n: usize) -> Result<GpuBuffer> {
    Ok(context()?.alloc(n)?)
}

/// out (n) = kernel(x): a fresh buffer written by one recorded kernel reading `x`.
pub(crate) fn map(
    x: &Tensor,
    n: usize,
    kernel: impl FnOnce(&mut Batch, &GpuBuffer, &GpuBuffer) -> GpuResult,
) -> Result<GpuBuffer> {
    let out = alloc(n)?;
    let xs = x.storage();
    let xb = xs.gpu_buf()?;
    record(|bt| kernel(bt, &out, xb))?;
    Ok(out)
}

pub(crate) fn binary(a: &Tensor, b: &Tensor, bc: &Broadcast, k: BinaryKernel) -> Result<GpuBuffer> {
    let out = alloc(bc.numel())?;
    let (sa, sb) = (a.storage(), b.storage());
    let (ab, bb) = (sa.gpu_buf()?, sb.gpu_buf()?);
    record(|bt| k(bt, &out, ab, bb, bc, false))?;
    Ok(out)
}

/// x (M, K) . op(w) -> (M, N) per `ms`.
pub(crate) fn matmul(x: &Tensor, w: &Tensor, ms: MatmulShape) -> Result<GpuBuffer> {
    let (sx, sw) = (x.storage(), w.storage());
    let (xb, wb) = (sx.gpu_buf()?, sw.gpu_buf()?);
    record(|bt| {
        // An empty K is an empty sum: zeros, not whatever the pool held.
        let out =
            if ms.k == 0 { bt.zeros(ms.m * ms.n)? } else { bt.context().alloc(ms.m * ms.n)? };
        gk::matmul::matmul(bt, &out, xb, wb, ms, false)?;
        Ok(out)
    })
}

pub(crate) fn rmsnorm(x: &Tensor, n: usize, c: usize, eps: f32) -> Result<(GpuBuffer, GpuBuffer)> {
    let (out, rstd) = (alloc(n * c)?, alloc(n)?);
    let sx = x.storage();
    let xb = sx.gpu_buf()?;
    record(|bt| gk::rmsnorm::rmsnorm_forward(bt, &out, &rstd, xb, n, c, eps))?;
    Ok((out, rstd))
}

pub(crate) fn rope(x: &Tensor, table: &RopeTable, rs: RopeShape) -> Result<GpuBuffer> {
    let t = table.gpu.get(table)?;
    map(x, x.numel(), |bt, o, xb| gk::rope::rope_forward(bt, o, xb, &t.0, &t.1, rs))
}

pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let (out, lse) = (alloc(q.numel())?, alloc(s.b * s.tq * s.h)?);
    let (sq, sk, sv) = (q.storage(), k.storage(), v.storage());
    let (qb, kb, vb) = (sq.gpu_buf()?, sk.gpu_buf()?, sv.gpu_buf()?);
    record(|bt| gk::flash_attention::flash_forward(bt, &out, &lse, qb, kb, vb, s))?;
    Ok((out, lse))
}

/// Per-row losses (N), or their mean over `mean_count` targets (1); and the saved lse (N).
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &[i32],
    n: usize,
    v: usize,
    mean_count: Option<usize>,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let (losses, lse) = (alloc(n)?, alloc(n)?);
    let sl = logits.storage();
    let lb = sl.gpu_buf()?;
    record(|bt| {
        let t = bt.upload(targets)?;
        gk::softmax::cross_entropy_forward(bt, &losses, &lse, lb, &t, n, v)
    })?;
    let Some(count) = mean_count else { return Ok((losses, lse)) };
    // An all-ignored batch divides by zero: NaN, as PyTorch (and the CPU path).
    let mean = alloc(1)?;
    record(|bt| gk::reduce::sum_all(bt, &mean, &losses, 1.0 / count as f32, false))?;
    Ok((mean, lse))
}

impl Op {
    /// The GPU twin of `Op::backward`: accumulate d loss / d input for every input that
    /// requires grad, given `dout` (a GPU buffer shaped like `out`).
    pub(crate) fn backward_gpu(
        &self,
        out: &Tensor,
        dout: GpuBuffer,
        g: &mut GradStore,
    ) -> Result<()> {
        let oshape = out.shape();
        match self {
            Op::Add(a, b) | Op::Sub(a, b) => {
                let sign = if matches!(self, Op::Sub(..)) { -1.0 } else { 1.0 };
                if let Some(db) = g.slot_gpu(b)? {
                    let bs = b.shape().to_vec();
                    record(|bt| gk::reduce::sum_to_shape(bt, db, &bs, &dout, oshape, sign))?;
                }
                if a.numel() == dout.len() && a.requires_grad() {
                    return g.put_gpu(a, dout); // the residual-stream case: no copy
                } else if let Some(da) = g.slot_gpu(a)? {
                    let s = a.shape().to_vec();
                    record(|bt| gk::reduce::sum_to_shape(bt, da, &s, &dout, oshape, 1.0))?;
                }
            }
            Op::Mul(a, b) => {
                mul_grad(g, a, b, &dout, oshape)?;
                mul_grad(g, b, a, &dout, oshape)?;
            }
            Op::Scale(x, s) => {
                if let Some(dx) = g.slot_gpu(x)? {
                    record(|bt| gk::elementwise::scale_backward(bt, dx, &dout, *s))?;
                }
            }
            // y = x W^T: dx = dy W, dW = dy^T x
            Op::Linear(x, w) => {
                let (m, k) = (x.numel() / w.shape()[1].max(1), w.shape()[1]);
                let n = w.shape()[0];
                if let Some(dx) = g.slot_gpu(x)? {
                    let sw = w.storage();
                    let wb = sw.gpu_buf()?;
                    let ms = MatmulShape::new(m, n, k, false, false);
                    record(|bt| gk::matmul::matmul(bt, dx, &dout, wb, ms, true))?;
                }
                if let Some(dw) = g.slot_gpu(w)? {
                    let sx = x.storage();
                    let xb = sx.gpu_buf()?;
                    let ms = MatmulShape::new(n, m, k, true, false);
                    record(|bt| gk::matmul::matmul(bt, dw, &dout, xb, ms, true))?;
                }
            }
            Op::Relu2(x) => {
                if let Some(dx) = g.slot_gpu(x)? {
                    let sx = x.storage();
                    let xb = sx.gpu_buf()?;
                    record(|bt| gk::elementwise::relu2_backward(bt, dx, &dout, xb))?;
                }
            }
            Op::Sigmoid(x) | Op::Tanh(x) | Op::Softcap(x, _) => {
                if let Some(dx) = g.slot_gpu(x)? {
                    let so = out.storage();
                    let ob = so.gpu_buf()?;
                    record(|bt| match self {
                        Op::Sigmoid(_) => gk::elementwise::sigmoid_backward(bt, dx, &dout, ob),
                        Op::Tanh(_) => gk::elementwise::tanh_backward(bt, dx, &dout, ob),
                        Op::Softcap(_, c) => {
                            gk::elementwise::softcap_backward(bt, dx, &dout, ob, *c)
                        }
                        _ => Ok(()),
                    })?;
                }
            }
            Op::Softmax(x) | Op::LogSoftmax(x) => {
                let v = oshape.last().copied().unwrap_or(1).max(1);
                let n = dout.len() / v;
                if let Some(dx) = g.slot_gpu(x)? {
                    let so = out.storage();
                    let ob = so.gpu_buf()?;
                    record(|bt| match self {
                        Op::Softmax(_) => gk::softmax::softmax_backward(bt, dx, &dout, ob, n, v),
                        _ => gk::softmax::log_softmax_backward(bt, dx, &dout, ob, n, v),
                    })?;
                }
            }
            Op::RmsNorm(x, rstd) => {
                let c = oshape.last().copied().unwrap_or(1).max(1);
                if let Some(dx) = g.slot_gpu(x)? {
                    let sx = x.storage();
                    let (xb, rb) = (sx.gpu_buf()?, rstd.gpu_buf()?);
                    let n = dout.len() / c;
                    record(|bt| gk::rmsnorm::rmsnorm_backward(bt, dx, &dout, xb, rb, n, c))?;
                }
            }
            Op::Rope(x, table, pos0) => {
                let s = oshape;
                let rs = RopeShape { b: s[0], t: s[1], h: s[2], d: s[3], pos0: *pos0 };
                if let Some(dx) = g.slot_gpu(x)? {
                    let t = table.gpu.get(table)?;
                    record(|bt| gk::rope::rope_backward(bt, dx, &dout, &t.0, &t.1, rs))?;
                }
            }
            Op::Narrow(x, dim, start) => {
                let (outer, n, inner) = split_at_dim(x.shape(), *dim);
                let len = oshape[*dim];
                if let Some(dx) = g.slot_gpu(x)? {
                    let (dv, sv) = (BlockView { n, off: *start }, BlockView { n: len, off: 0 });
                    record(|bt| {
                        gk::slice::copy_block(bt, dx, dv, &dout, sv, outer, len, inner, true)
                    })?;
                }
            }
            Op::Cat(xs, dim) => {
                let (outer, total, inner) = split_at_dim(oshape, *dim);
                let mut off = 0;
                for x in xs {
                    let n = x.shape()[*dim];
                    if let Some(dx) = g.slot_gpu(x)? {
                        let (dv, sv) = (BlockView { n, off: 0 }, BlockView { n: total, off });
                        record(|bt| {
                            gk::slice::copy_block(bt, dx, dv, &dout, sv, outer, n, inner, true)
                        })?;
                    }
                    off += n;
                }
            }
            Op::Reshape(x) => return g.put_gpu(x, dout),
            Op::Embedding(w, ids) => {
                let c = w.shape()[1];
                if let Some(dw) = g.slot_gpu(w)? {
                    record(|bt| gk::embedding::embedding_backward(bt, dw, &dout, ids.data(), c))?;
                }
            }
            Op::Attention { q, k, v, lse, s } => {
                let (dq, dk, dv) = (g.take_gpu(q)?, g.take_gpu(k)?, g.take_gpu(v)?);
                {
                    let (sq, sk, sv, so) = (q.storage(), k.storage(), v.storage(), out.storage());
                    let (qb, kb, vb, ob) =
                        (sq.gpu_buf()?, sk.gpu_buf()?, sv.gpu_buf()?, so.gpu_buf()?);
                    let lb = lse.gpu_buf()?;
                    record(|bt| {
                        gk::flash_attention::flash_backward(
                            bt, &dq, &dk, &dv, &dout, qb, kb, vb, ob, lb, *s,
                        )
                    })?;
                }
                g.put_gpu(q, dq)?;
                g.put_gpu(k, dk)?;
                g.put_gpu(v, dv)?;
            }
            // d loss_i / d logits_i = softmax_i - onehot(t_i); Mean scales by 1/count
            Op::CrossEntropy { logits, targets, lse, mean_count } => {
                let (n, vocab) = (logits.shape()[0], logits.shape()[1]);
                if let Some(dl) = g.slot_gpu(logits)? {
                    let sl = logits.storage();
                    let (lb, lseb) = (sl.gpu_buf()?, lse.gpu_buf()?);
                    record(|bt| {
                        let t = bt.upload(targets)?;
                        let dlosses = match mean_count {
                            None => None,
                            // dout (1) / count, repeated over the N rows
                            Some(count) => {
                                let rep = bt.zeros(n)?;
                                gk::reduce::sum_dim_backward(bt, &rep, &dout, 1, n, 1)?;
                                let scaled = bt.context().alloc(n)?;
                                gk::elementwise::scale_forward(
                                    bt,
                                    &scaled,
                                    &rep,
                                    1.0 / *count as f32,
                                )?;
                                Some(scaled)
                            }
                        };
                        let dls = dlosses.as_ref().unwrap_or(&dout);
                        gk::softmax::cross_entropy_backward(bt, dl, dls, lb, lseb, &t, n, vocab)
                    })?;
                }
            }
            Op::Sum(x) | Op::Mean(x) => {
                let scale =
                    if matches!(self, Op::Mean(_)) { 1.0 / x.numel().max(1) as f32 } else { 1.0 };
                if let Some(dx) = g.slot_gpu(x)? {
                    let n = dx.len();
                    record(|bt| {
                        let s = bt.context().alloc(1)?;
                        gk::elementwise::scale_forward(bt, &s, &dout, scale)?;
                        gk::reduce::sum_dim_backward(bt, dx, &s, 1, n, 1)
                    })?;
                }
            }
            Op::SumDim(x, dim) => {
                let (outer, n, inner) = split_at_dim(x.shape(), *dim);
                if let Some(dx) = g.slot_gpu(x)? {
                    record(|bt| gk::reduce::sum_dim_backward(bt, dx, &dout, outer, n, inner))?;
                }
            }
            // The walk itself recomputes segments (autograd::recompute_backward).
            Op::Checkpoint(_) => debug_assert!(false, "checkpoint reached a backward rule"),
        }
        Ok(())
    }
}

/// da += sum_to_shape(dout * b) for a broadcasting product out = a * b.
fn mul_grad(
    g: &mut GradStore,
    a: &Tensor,
    b: &Tensor,
    dout: &GpuBuffer,
    oshape: &[usize],
) -> Result<()> {
    let Some(da) = g.slot_gpu(a)? else { return Ok(()) };
    let Some(bc) = Broadcast::new(oshape, b.shape()) else { return Ok(()) };
    let sb = b.storage();
    let bb = sb.gpu_buf()?;
    let ashape = a.shape().to_vec();
    record(|bt| {
        if ashape.iter().product::<usize>() == dout.len() {
            return gk::elementwise::mul_forward(bt, da, dout, bb, &bc, true);
        }
        let full = bt.context().alloc(dout.len())?;
        gk::elementwise::mul_forward(bt, &full, dout, bb, &bc, false)?;
        gk::reduce::sum_to_shape(bt, da, &ashape, &full, oshape, 1.0)
    })
}
