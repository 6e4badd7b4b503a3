//! Each op's backward rule on the host (`Op::backward`), and the graph edges (`Op::inputs`).
//! The GPU rules are in `op_gpu.rs`; the forwards and the `Op` enum in `op.rs`.
//!
//! Backward rules accumulate into their inputs' gradient buffers (`GradStore::slot`, zero-filled
//! on first use), so an input used twice simply receives two contributions.
use femtochat_kernels::cpu::elementwise::{self as ew, Broadcast};
use femtochat_kernels::cpu::flash_attention::{FlashBlocks, flash_attention_backward};
use femtochat_kernels::cpu::matmul::{MatmulShape, matmul};
use femtochat_kernels::cpu::slice::{BlockView, copy_block};
use femtochat_kernels::cpu::{embedding, reduce, rmsnorm, rope, softmax};

use crate::autograd::GradStore;
use crate::op::{Op, split_at_dim};
use crate::pool::{alloc_uninit, recycle};
use crate::tensor::Tensor;

impl Op {
    pub(crate) fn inputs(&self) -> Vec<&Tensor> {
        match self {
            Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Linear(a, b) => vec![a, b],
            Op::Scale(x, _)
            | Op::Relu2(x)
            | Op::Sigmoid(x)
            | Op::Tanh(x)
            | Op::Softcap(x, _)
            | Op::Softmax(x)
            | Op::LogSoftmax(x)
            | Op::RmsNorm(x, _)
            | Op::Rope(x, _, _)
            | Op::Narrow(x, _, _)
            | Op::Reshape(x)
            | Op::Embedding(x, _)
            | Op::Sum(x)
            | Op::Mean(x)
            | Op::SumDim(x, _) => vec![x],
            Op::CrossEntropy { logits, .. } => vec![logits],
            Op::Cat(xs, _) => xs.iter().collect(),
            Op::Attention { q, k, v, .. } => vec![q, k, v],
            Op::Checkpoint(seg) => seg.inputs.iter().collect(),
        }
    }

    /// The inputs, by value (for the iterative drop of a graph).
    pub(crate) fn into_inputs(self) -> Vec<Tensor> {
        match self {
            Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Linear(a, b) => vec![a, b],
            Op::Scale(x, _)
            | Op::Relu2(x)
            | Op::Sigmoid(x)
            | Op::Tanh(x)
            | Op::Softcap(x, _)
            | Op::Softmax(x)
            | Op::LogSoftmax(x)
            | Op::RmsNorm(x, _)
            | Op::Rope(x, _, _)
            | Op::Narrow(x, _, _)
            | Op::Reshape(x)
            | Op::Embedding(x, _)
            | Op::Sum(x)
            | Op::Mean(x)
            | Op::SumDim(x, _) => vec![x],
            Op::CrossEntropy { logits, .. } => vec![logits],
            Op::Cat(xs, _) => xs,
            Op::Attention { q, k, v, .. } => vec![q, k, v],
            Op::Checkpoint(seg) => seg.inputs,
        }
    }

    /// Accumulate d loss / d input for every input that requires grad, given
    /// `dout` = d loss / d `out` (shaped like `out`).
    /// Returns `dout` when the rule did not keep it, for recycling.
    pub(crate) fn backward(
        &self,
        out: &Tensor,
        dout: Vec<f32>,
        g: &mut GradStore,
    ) -> Option<Vec<f32>> {
        let oshape = out.shape();
        match self {
            // d(a ± b) = da ± db, summed over broadcast dims
            Op::Add(a, b) | Op::Sub(a, b) => {
                let sign = if matches!(self, Op::Sub(..)) { -1.0 } else { 1.0 };
                if let Some(db) = g.slot(b) {
                    reduce::sum_to_shape(db, b.shape(), &dout, oshape, sign);
                }
                if a.numel() == dout.len() && a.requires_grad() {
                    g.put(a, dout); // the residual-stream case: no copy
                    return None;
                } else if let Some(da) = g.slot(a) {
                    reduce::sum_to_shape(da, a.shape(), &dout, oshape, 1.0);
                }
            }
            // d(a b) = b da + a db, summed over broadcast dims
            Op::Mul(a, b) => {
                mul_grad(g, a, b, &dout, oshape);
                mul_grad(g, b, a, &dout, oshape);
            }
            // d(s x) = s dx
            Op::Scale(x, s) => {
                if let Some(dx) = g.slot(x) {
                    ew::scale_backward(dx, &dout, *s);
                }
            }
            // y = x W^T: dx = dy W, dW = dy^T x
            Op::Linear(x, w) => {
                let (m, k) = (x.numel() / w.shape()[1].max(1), w.shape()[1]);
                let n = w.shape()[0];
                if let Some(dx) = g.slot(x) {
                    matmul(dx, &dout, &w.data(), MatmulShape::new(m, n, k, false, false), true);
                }
                if let Some(dw) = g.slot(w) {
                    matmul(dw, &dout, &x.data(), MatmulShape::new(n, m, k, true, false), true);
                }
            }
            // d relu(x)^2 = 2 relu(x)
            Op::Relu2(x) => {
                if let Some(dx) = g.slot(x) {
                    ew::relu2_backward(dx, &dout, &x.data());
                }
            }
            // d sigmoid = y (1 - y)
            Op::Sigmoid(x) => {
                if let Some(dx) = g.slot(x) {
                    ew::sigmoid_backward(dx, &dout, &out.data());
                }
            }
            // d tanh = 1 - y^2
            Op::Tanh(x) => {
                if let Some(dx) = g.slot(x) {
                    ew::tanh_backward(dx, &dout, &out.data());
                }
            }
            // d c tanh(x/c) = 1 - (y/c)^2
            Op::Softcap(x, c) => {
                if let Some(dx) = g.slot(x) {
                    ew::softcap_backward(dx, &dout, &out.data(), *c);
                }
            }
            // d softmax: dx = y (dy - sum(dy y))
            Op::Softmax(x) => {
                let v = oshape.last().copied().unwrap_or(1).max(1);
                if let Some(dx) = g.slot(x) {
                    softmax::softmax_backward(dx, &dout, &out.data(), dout.len() / v, v);
                }
            }
            // d log_softmax: dx = dy - exp(y) sum(dy)
            Op::LogSoftmax(x) => {
                let v = oshape.last().copied().unwrap_or(1).max(1);
                if let Some(dx) = g.slot(x) {
                    softmax::log_softmax_backward(dx, &dout, &out.data(), dout.len() / v, v);
                }
            }
            // dx = r (dy - x r^2 mean(dy x))
            Op::RmsNorm(x, rstd) => {
                let c = oshape.last().copied().unwrap_or(1).max(1);
                if let Some(dx) = g.slot(x) {
                    rmsnorm::rmsnorm_backward(dx, &dout, &x.data(), rstd.host(), dout.len() / c, c);
                }
            }
            // rotation is orthogonal: dx = R^T dy
            Op::Rope(x, table, pos0) => {
                let s = oshape;
                let rs = rope::RopeShape { b: s[0], t: s[1], h: s[2], d: s[3], pos0: *pos0 };
                if let Some(dx) = g.slot(x) {
                    rope::rope_backward(dx, &dout, &table.cos, &table.sin, rs);
                }
            }
            // dx[.., start..start+len, ..] += dy
            Op::Narrow(x, dim, start) => {
                let (outer, n, inner) = split_at_dim(x.shape(), *dim);
                let len = oshape[*dim];
                if let Some(dx) = g.slot(x) {
                    let (dv, sv) = (BlockView { n, off: *start }, BlockView { n: len, off: 0 });
                    copy_block(dx, dv, &dout, sv, outer, len, inner, true);
                }
            }
            // each input gets its block of dy back
            Op::Cat(xs, dim) => {
                let (outer, total, inner) = split_at_dim(oshape, *dim);
                let mut off = 0;
                for x in xs {
                    let n = x.shape()[*dim];
                    if let Some(dx) = g.slot(x) {
                        let (dv, sv) = (BlockView { n, off: 0 }, BlockView { n: total, off });
                        copy_block(dx, dv, &dout, sv, outer, n, inner, true);
                    }
                    off += n;
                }
            }
            // same elements, same order
            Op::Reshape(x) if x.requires_grad() => {
                g.put(x, dout);
                return None;
            }
            Op::Reshape(_) => {}
            // dW[id] += dy at every position holding id
            Op::Embedding(w, ids) => {
                let c = w.shape()[1];
                if let Some(dw) = g.slot(w) {
                    embedding::embedding_backward(dw, &dout, ids.data(), c);
                }
            }
            // see flash_attention_backward in the kernel (recomputes P from lse)
            Op::Attention { q, k, v, lse, s } => {
                let (mut dq, mut dk, mut dv) = (g.take(q), g.take(k), g.take(v));
                let (qd, kd, vd, od) = (q.data(), k.data(), v.data(), out.data());
                let bl = FlashBlocks::backward(s.d);
                flash_attention_backward(
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &dout,
                    &qd,
                    &kd,
                    &vd,
                    &od,
                    lse.host(),
                    *s,
                    bl,
                );
                g.put(q, dq);
                g.put(k, dk);
                g.put(v, dv);
            }
            // d loss_i / d logits_i = softmax_i - onehot(t_i); Mean scales by 1/count
            Op::CrossEntropy { logits, targets, lse, mean_count } => {
                let (n, vocab) = (logits.shape()[0], logits.shape()[1]);
                let dlosses = match mean_count {
                    Some(count) => vec![dout[0] / *count as f32; n],
                    None => dout.to_vec(),
                };
                if let Some(dl) = g.slot(logits) {
                    softmax::cross_entropy_backward(
                        dl,
                        &dlosses,
                        &logits.data(),
                        lse.host(),
                        targets,
                        n,
                        vocab,
                    );
                }
            }
            // d sum = 1 everywhere; d mean = 1/n
            Op::Sum(x) | Op::Mean(x) => {
                let n = x.numel().max(1) as f32;
                let v = if matches!(self, Op::Mean(_)) { dout[0] / n } else { dout[0] };
                if let Some(dx) = g.slot(x) {
                    // d(sum) is dout broadcast from shape ().
                    reduce::sum_dim_backward(dx, &[v], 1, dx.len(), 1);
                }
            }
            // dy repeated along the summed dim
            Op::SumDim(x, dim) => {
                let (outer, n, inner) = split_at_dim(x.shape(), *dim);
                if let Some(dx) = g.slot(x) {
                    reduce::sum_dim_backward(dx, &dout, outer, n, inner);
                }
            }
            // The walk itself recomputes segments (autograd::recompute_backward).
            Op::Checkpoint(_) => debug_assert!(false, "checkpoint reached a backward rule"),
        }
        Some(dout)
    }
}

/// da += sum_to_shape(dout * b) for a broadcasting product out = a * b.
fn mul_grad(g: &mut GradStore, a: &Tensor, b: &Tensor, dout: &[f32], oshape: &[usize]) {
    let Some(da) = g.slot(a) else { return };
    if da.len() == 1 && b.numel() == dout.len() {
        // A scalar parameter times a full tensor (resid_lambdas[i] * x): one fused dot.
        da[0] += reduce::dot_all(dout, &b.data()) as f32;
        return;
    }
    let Some(bc) = Broadcast::new(oshape, b.shape()) else { return };
    if a.numel() == dout.len() {
        ew::mul_forward(da, dout, &b.data(), &bc, true);
    } else {
        let mut full = alloc_uninit(dout.len());
        ew::mul_forward(&mut full, dout, &b.data(), &bc, false);
        reduce::sum_to_shape(da, a.shape(), &full, oshape, 1.0);
        recycle(full);
    }
}
