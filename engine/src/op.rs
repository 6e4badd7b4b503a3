//! Every differentiable op: the closed `Op` enum (what a result remembers) and each op's forward
//! (a `Tensor` method that validates shapes and calls a kernel). The backward rules are in
//! `op_backward.rs` (host) and `op_gpu.rs` (GPU).
use std::sync::Arc;

use femtochat_kernels::cpu::attention::AttnShape;
use femtochat_kernels::cpu::elementwise::{self as ew, Broadcast};
use femtochat_kernels::cpu::flash_attention::{FlashBlocks, flash_attention_forward};
use femtochat_kernels::cpu::matmul::{MatmulShape, matmul};
use femtochat_kernels::cpu::slice::{BlockView, copy_block};
use femtochat_kernels::cpu::{embedding, reduce, rmsnorm, rope, softmax};

use crate::Device;
use crate::autograd::should_record;
use crate::error::{EngineError, Result};
use crate::op_gpu::{self as g, GpuTables};
use crate::pool::alloc_uninit;
use crate::tensor::{Ids, Storage, Tensor, checked_numel};
use femtochat_kernels::gpu::{self as gk, Batch, GpuBuffer, GpuError};

type GpuResult = std::result::Result<(), GpuError>;

pub use femtochat_kernels::cpu::rmsnorm::RMSNORM_EPS;
pub use femtochat_kernels::cpu::softmax::IGNORE_INDEX;

/// How `cross_entropy` reduces per-token losses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over non-ignored targets: shape (). NaN when every target is ignored (as PyTorch).
    Mean,
    /// Per-token losses, 0 at ignored targets: shape (N).
    None,
}

/// Precomputed RoPE cos/sin tables (T_max, D/2); build once per model, share by clone.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub(crate) cos: Arc<Vec<f32>>,
    pub(crate) sin: Arc<Vec<f32>>,
    pub(crate) t_max: usize,
    pub(crate) head_dim: usize,
    /// The tables uploaded to the GPU on first use there.
    pub(crate) gpu: GpuTables,
}

impl RopeTable {
    /// nanochat uses base 100000.
    pub fn new(t_max: usize, head_dim: usize, base: f32) -> Result<RopeTable> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(EngineError::Invalid {
                op: "RopeTable::new",
                msg: format!("head_dim must be even and positive, got {head_dim}"),
            });
        }
        let n = t_max.checked_mul(head_dim / 2).ok_or_else(|| EngineError::Invalid {
            op: "RopeTable::new",
            msg: format!("table of {t_max} positions is too large"),
        })?;
        let (mut cos, mut sin) = (vec![0.0; n], vec![0.0; n]);
        rope::rope_tables(&mut cos, &mut sin, t_max, head_dim, base);
        Ok(RopeTable {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            t_max,
            head_dim,
            gpu: GpuTables::default(),
        })
    }

    pub fn max_len(&self) -> usize {
        self.t_max
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// What an op result remembers for backward: its inputs and any saved buffers.
pub(crate) enum Op {
    Add(Tensor, Tensor),            // a, b broadcast -> out
    Sub(Tensor, Tensor),            // a, b broadcast -> out
    Mul(Tensor, Tensor),            // a, b broadcast -> out
    Scale(Tensor, f32),             // x (..) -> (..)
    Linear(Tensor, Tensor),         // x (.., K), w (N, K) -> (.., N)
    Relu2(Tensor),                  // x (..) -> (..)
    Sigmoid(Tensor),                // x (..) -> (..); backward reads the output
    Tanh(Tensor),                   // x (..) -> (..); backward reads the output
    Softcap(Tensor, f32),           // x (..) -> (..); backward reads the output
    Softmax(Tensor),                // x (.., V) -> (.., V); backward reads the output
    LogSoftmax(Tensor),             // x (.., V) -> (.., V); backward reads the output
    RmsNorm(Tensor, Storage),       // x (.., C) -> (.., C), saves rstd (rows)
    Rope(Tensor, RopeTable, usize), // x (B, T, H, D) at positions pos0.. -> (B, T, H, D)
    Narrow(Tensor, usize, usize),   // x (.., n, ..), dim, start -> (.., len, ..)
    Cat(Vec<Tensor>, usize),        // xs (.., n_i, ..) along dim -> (.., sum n_i, ..)
    Reshape(Tensor),                // x (..) -> same numel
    Embedding(Tensor, Ids),         // w (V, C), ids (..) -> (.., C)
    // q (B, Tq, H, D), k, v (B, Tk, Hkv, D) -> (B, Tq, H, D); saves lse (B, Tq, H)
    Attention { q: Tensor, k: Tensor, v: Tensor, lse: Storage, s: AttnShape },
    // logits (N, V) -> () (Mean, over `mean_count` targets) or (N); saves lse (N)
    CrossEntropy { logits: Tensor, targets: Vec<i32>, lse: Storage, mean_count: Option<usize> },
    Sum(Tensor),           // x (..) -> ()
    Mean(Tensor),          // x (..) -> ()
    SumDim(Tensor, usize), // x (.., n, ..) -> (.., [1,] ..)
    // inputs -> f(inputs); the backward recomputes f (checkpoint.rs)
    Checkpoint(Box<crate::checkpoint::Segment>),
}

/// Sizes around a dim: (outer, n, inner).
pub(crate) fn split_at_dim(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (shape[..dim].iter().product(), shape[dim], shape[dim + 1..].iter().product())
}

fn norm_dim(op: &'static str, dim: isize, rank: usize) -> Result<usize> {
    let d = if dim < 0 { dim + rank as isize } else { dim };
    if d < 0 || d as usize >= rank {
        return Err(EngineError::BadDim { op, dim, rank });
    }
    Ok(d as usize)
}

fn last_dim(op: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    let Some(&c) = t.shape().last() else {
        return Err(EngineError::BadRank { op, expected: 1, shape: t.shape().to_vec() });
    };
    Ok((t.numel() / c.max(1), c))
}

/// Run `kernel(out, x)` (or `gpu(batch, out, x)` on the GPU) into a fresh buffer shaped like `x`;
/// record `op` if tracked.
fn unary(
    x: &Tensor,
    kernel: impl FnOnce(&mut [f32], &[f32]),
    gpu: impl FnOnce(&mut Batch, &GpuBuffer, &GpuBuffer) -> GpuResult,
    op: impl FnOnce() -> Op,
) -> Result<Tensor> {
    let op = should_record(&[x]).then(op);
    if x.device() == Device::Gpu {
        let out = g::map(x, x.numel(), gpu)?;
        return Ok(Tensor::from_gpu(out, x.shape().to_vec(), op));
    }
    let mut out = alloc_uninit(x.numel());
    kernel(&mut out, &x.data());
    Ok(Tensor::from_op(out, x.shape().to_vec(), op))
}

/// The one device of an op's inputs, or the mismatch.
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts.first().map(|t| t.device()).unwrap_or_default();
    match ts.iter().find(|t| t.device() != d) {
        Some(t) => Err(EngineError::DeviceMismatch { op, lhs: d, rhs: t.device() }),
        None => Ok(d),
    }
}

impl Tensor {
    /// A broadcasting binary op: `cpu`/`gpu` write `out = a op b`.
    fn binary(
        &self,
        other: &Tensor,
        name: &'static str,
        cpu: fn(&mut [f32], &[f32], &[f32], &Broadcast, bool),
        gpu: g::BinaryKernel,
        op: impl FnOnce() -> Op,
    ) -> Result<Tensor> {
        let bc = Broadcast::new(self.shape(), other.shape()).ok_or_else(|| {
            EngineError::ShapeMismatch {
                op: name,
                lhs: self.shape().to_vec(),
                rhs: other.shape().to_vec(),
            }
        })?;
        let op = should_record(&[self, other]).then(op);
        if same_device(name, &[self, other])? == Device::Gpu {
            let out = g::binary(self, other, &bc, gpu)?;
            return Ok(Tensor::from_gpu(out, bc.out_shape, op));
        }
        let mut out = alloc_uninit(bc.numel());
        cpu(&mut out, &self.data(), &other.data(), &bc, false);
        Ok(Tensor::from_op(out, bc.out_shape, op))
    }

    /// self + other, numpy broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        let op = || Op::Add(self.clone(), other.clone());
        self.binary(other, "add", ew::add_forward, gk::elementwise::add_forward, op)
    }

    /// self - other, numpy broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        let op = || Op::Sub(self.clone(), other.clone());
        self.binary(other, "sub", ew::sub_forward, gk::elementwise::sub_forward, op)
    }

    /// self * other, numpy broadcasting (e.g. (1) * (B, T, C), or (B, T, H, 1) * (B, T, H, D)).
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        let op = || Op::Mul(self.clone(), other.clone());
        self.binary(other, "mul", ew::mul_forward, gk::elementwise::mul_forward, op)
    }

    /// s * self
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        unary(
            self,
            |o, x| ew::scale_forward(o, x, s),
            |bt, o, x| gk::elementwise::scale_forward(bt, o, x, s),
            || Op::Scale(self.clone(), s),
        )
    }

    /// relu(self)^2
    pub fn relu2(&self) -> Result<Tensor> {
        unary(self, ew::relu2_forward, gk::elementwise::relu2_forward, || Op::Relu2(self.clone()))
    }

    pub fn sigmoid(&self) -> Result<Tensor> {
        let op = || Op::Sigmoid(self.clone());
        unary(self, ew::sigmoid_forward, gk::elementwise::sigmoid_forward, op)
    }

    pub fn tanh(&self) -> Result<Tensor> {
        unary(self, ew::tanh_forward, gk::elementwise::tanh_forward, || Op::Tanh(self.clone()))
    }

    /// c * tanh(self / c)
    pub fn softcap(&self, c: f32) -> Result<Tensor> {
        unary(
            self,
            |o, x| ew::softcap_forward(o, x, c),
            |bt, o, x| gk::elementwise::softcap_forward(bt, o, x, c),
            || Op::Softcap(self.clone(), c),
        )
    }

    /// Softmax over the last dim.
    pub fn softmax(&self) -> Result<Tensor> {
        let (n, v) = last_dim("softmax", self)?;
        unary(
            self,
            |o, x| softmax::softmax_forward(o, x, n, v),
            |bt, o, x| gk::softmax::softmax_forward(bt, o, x, n, v),
            || Op::Softmax(self.clone()),
        )
    }

    /// Log-softmax over the last dim.
    pub fn log_softmax(&self) -> Result<Tensor> {
        let (n, v) = last_dim("log_softmax", self)?;
        unary(
            self,
            |o, x| softmax::log_softmax_forward(o, x, n, v),
            |bt, o, x| gk::softmax::log_softmax_forward(bt, o, x, n, v),
            || Op::LogSoftmax(self.clone()),
        )
    }

    /// x (.., K) W^T with w (N, K) -> (.., N), no bias.
    pub fn linear(&self, w: &Tensor) -> Result<Tensor> {
        let (m, k) = last_dim("linear", self)?;
        if w.rank() != 2 || w.shape()[1] != k {
            return Err(EngineError::ShapeMismatch {
                op: "linear",
                lhs: self.shape().to_vec(),
                rhs: w.shape().to_vec(),
            });
        }
        let n = w.shape()[0];
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = n;
        let op = should_record(&[self, w]).then(|| Op::Linear(self.clone(), w.clone()));
        let ms = MatmulShape::new(m, k, n, false, true);
        if same_device("linear", &[self, w])? == Device::Gpu {
            return Ok(Tensor::from_gpu(g::matmul(self, w, ms)?, shape, op));
        }
        let mut out = alloc_uninit(m * n);
        if k == 0 {
            out.fill(0.0); // an empty sum; don't rely on the matmul kernel to write it
        }
        matmul(&mut out, &self.data(), &w.data(), ms, false);
        Ok(Tensor::from_op(out, shape, op))
    }

    /// RMSNorm over the last dim, no weight: x / sqrt(mean(x^2) + eps).
    pub fn rmsnorm(&self, eps: f32) -> Result<Tensor> {
        let (n, c) = last_dim("rmsnorm", self)?;
        if self.device() == Device::Gpu {
            let (out, rstd) = g::rmsnorm(self, n, c, eps)?;
            let op = should_record(&[self]).then(|| Op::RmsNorm(self.clone(), Storage::Gpu(rstd)));
            return Ok(Tensor::from_gpu(out, self.shape().to_vec(), op));
        }
        let (mut out, mut rstd) = (alloc_uninit(n * c), alloc_uninit(n));
        rmsnorm::rmsnorm_forward(&mut out, &mut rstd, &self.data(), n, c, eps);
        let op = should_record(&[self]).then(|| Op::RmsNorm(self.clone(), Storage::Cpu(rstd)));
        Ok(Tensor::from_op(out, self.shape().to_vec(), op))
    }

    /// RoPE on x (B, T, H, D) at absolute positions pos0..pos0+T.
    pub fn rope(&self, table: &RopeTable, pos0: usize) -> Result<Tensor> {
        let s = self.shape();
        if s.len() != 4 {
            return Err(EngineError::BadRank { op: "rope", expected: 4, shape: s.to_vec() });
        }
        if s[3] != table.head_dim {
            return Err(EngineError::Invalid {
                op: "rope",
                msg: format!("head dim {} but the table was built for {}", s[3], table.head_dim),
            });
        }
        if pos0.saturating_add(s[1]) > table.t_max {
            return Err(EngineError::OutOfBounds {
                op: "rope",
                start: pos0,
                end: pos0.saturating_add(s[1]),
                size: table.t_max,
            });
        }
        let rs = rope::RopeShape { b: s[0], t: s[1], h: s[2], d: s[3], pos0 };
        let op = should_record(&[self]).then(|| Op::Rope(self.clone(), table.clone(), pos0));
        if self.device() == Device::Gpu {
            return Ok(Tensor::from_gpu(g::rope(self, table, rs)?, s.to_vec(), op));
        }
        let mut out = alloc_uninit(self.numel());
        rope::rope_forward(&mut out, &self.data(), &table.cos, &table.sin, rs);
        Ok(Tensor::from_op(out, s.to_vec(), op))
    }

    /// x.narrow(dim, start, len): indices start..start+len of `dim` (negative dims count from
    /// the end), e.g. x[..., :24] = narrow(-1, 0, 24), x[:, 1:] = narrow(1, 1, T - 1).
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = norm_dim("narrow", dim, self.rank())?;
        let size = self.shape()[d];
        let end = start.saturating_add(len);
        if end > size {
            return Err(EngineError::OutOfBounds { op: "narrow", start, end, size });
        }
        if start == 0 && len == size {
            // The whole dim (e.g. logits[..., :V] when V is already a multiple of 64): no copy.
            return self.reshape(self.shape());
        }
        let (outer, n, inner) = split_at_dim(self.shape(), d);
        let mut shape = self.shape().to_vec();
        shape[d] = len;
        let (dv, sv) = (BlockView { n: len, off: 0 }, BlockView { n, off: start });
        let op = should_record(&[self]).then(|| Op::Narrow(self.clone(), d, start));
        if self.device() == Device::Gpu {
            let out = g::map(self, outer * len * inner, |bt, o, x| {
                gk::slice::copy_block(bt, o, dv, x, sv, outer, len, inner, false)
            })?;
            return Ok(Tensor::from_gpu(out, shape, op));
        }
        let mut out = alloc_uninit(outer * len * inner);
        copy_block(&mut out, dv, &self.data(), sv, outer, len, inner, false);
        Ok(Tensor::from_op(out, shape, op))
    }

    /// Element `index` of `dim`, with that dim removed (resid_lambdas[i] -> shape ()).
    pub fn select(&self, dim: isize, index: usize) -> Result<Tensor> {
        let d = norm_dim("select", dim, self.rank())?;
        let mut shape = self.shape().to_vec();
        shape.remove(d);
        self.narrow(dim, index, 1)?.reshape(&shape)
    }

    /// Concatenate along `dim`; all other dims must match.
    pub fn cat(xs: &[Tensor], dim: isize) -> Result<Tensor> {
        let Some(first) = xs.first() else {
            return Err(EngineError::Invalid {
                op: "cat",
                msg: "no tensors to concatenate".into(),
            });
        };
        let d = norm_dim("cat", dim, first.rank())?;
        let mut shape = first.shape().to_vec();
        shape[d] = 0;
        for x in xs {
            let same = x.rank() == first.rank()
                && x.shape()
                    .iter()
                    .zip(first.shape())
                    .enumerate()
                    .all(|(i, (a, b))| i == d || a == b);
            if !same {
                return Err(EngineError::ShapeMismatch {
                    op: "cat",
                    lhs: first.shape().to_vec(),
                    rhs: x.shape().to_vec(),
                });
            }
            shape[d] += x.shape()[d];
        }
        let (outer, total, inner) = split_at_dim(&shape, d);
        let refs: Vec<&Tensor> = xs.iter().collect();
        let op = should_record(&refs).then(|| Op::Cat(xs.to_vec(), d));
        if same_device("cat", &refs)? == Device::Gpu {
            let out = g::alloc(outer * total * inner)?;
            let mut off = 0;
            for x in xs {
                let n = x.shape()[d];
                let (dv, sv) = (BlockView { n: total, off }, BlockView { n, off: 0 });
                let xs = x.storage();
                let xb = xs.gpu_buf()?;
                crate::device::record(|bt| {
                    gk::slice::copy_block(bt, &out, dv, xb, sv, outer, n, inner, false)
                })?;
                off += n;
            }
            return Ok(Tensor::from_gpu(out, shape, op));
        }
        let mut out = alloc_uninit(outer * total * inner);
        let mut off = 0;
        for x in xs {
            let n = x.shape()[d];
            let (dv, sv) = (BlockView { n: total, off }, BlockView { n, off: 0 });
            copy_block(&mut out, dv, &x.data(), sv, outer, n, inner, false);
            off += n;
        }
        Ok(Tensor::from_op(out, shape, op))
    }

    /// Same elements under a new shape (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if checked_numel(shape) != Some(self.numel()) {
            return Err(EngineError::ShapeMismatch {
                op: "reshape",
                lhs: self.shape().to_vec(),
                rhs: shape.to_vec(),
            });
        }
        let op = should_record(&[self]).then(|| Op::Reshape(self.clone()));
        Ok(self.view_as(shape.to_vec(), op))
    }

    /// Rows of `weight` (V, C) gathered by `ids` (..) -> (.., C).
    pub fn embedding(weight: &Tensor, ids: &Ids) -> Result<Tensor> {
        if weight.rank() != 2 {
            return Err(EngineError::BadRank {
                op: "embedding",
                expected: 2,
                shape: weight.shape().to_vec(),
            });
        }
        let (v, c) = (weight.shape()[0], weight.shape()[1]);
        if let Some((pos, &id)) = ids.data().iter().enumerate().find(|(_, id)| **id as usize >= v) {
            return Err(EngineError::IdOutOfRange {
                op: "embedding",
                id: id as i64,
                pos,
                bound: v,
            });
        }
        let mut shape = ids.shape().to_vec();
        shape.push(c);
        let op = should_record(&[weight]).then(|| Op::Embedding(weight.clone(), ids.clone()));
        if weight.device() == Device::Gpu {
            let out = g::map(weight, ids.len() * c, |bt, o, w| {
                let ids = bt.upload(ids.data())?;
                gk::embedding::embedding_forward(bt, o, w, &ids, c)
            })?;
            return Ok(Tensor::from_gpu(out, shape, op));
        }
        let mut out = alloc_uninit(ids.len() * c);
        embedding::embedding_forward(&mut out, &weight.data(), ids.data(), c);
        Ok(Tensor::from_op(out, shape, op))
    }

    /// Causal attention, q (B, Tq, H, D), k, v (B, Tk, Hkv, D) -> (B, Tq, H, D). Query row i is
    /// at absolute position pos0 + i and sees keys j <= pos0 + i within `window` (use
    /// `usize::MAX` for full causal); Tk >= pos0 + Tq. GQA: query head h reads kv head
    /// h / (H / Hkv). Scale 1/sqrt(D).
    ///
    /// For KV-cache decoding, keep the caches as constant (B, T_max, Hkv, D) tensors, write new
    /// rows with `with_data_mut`, and pass them whole: keys past pos0 + Tq are never read, so
    /// nothing is copied per token.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: usize,
        pos0: usize,
    ) -> Result<Tensor> {
        let (qs, ks) = (q.shape(), k.shape());
        for t in [q, k, v] {
            if t.rank() != 4 {
                return Err(EngineError::BadRank {
                    op: "attention",
                    expected: 4,
                    shape: t.shape().to_vec(),
                });
            }
        }
        let mismatch =
            || EngineError::ShapeMismatch { op: "attention", lhs: qs.to_vec(), rhs: ks.to_vec() };
        if ks != v.shape() || ks[0] != qs[0] || ks[3] != qs[3] || ks[2] == 0 {
            return Err(mismatch());
        }
        if !qs[2].is_multiple_of(ks[2]) {
            return Err(EngineError::Invalid {
                op: "attention",
                msg: format!("{} query heads are not a multiple of {} kv heads", qs[2], ks[2]),
            });
        }
        if ks[1] < pos0.saturating_add(qs[1]) {
            return Err(EngineError::Invalid {
                op: "attention",
                msg: format!("{} keys but queries end at position {pos0} + {}", ks[1], qs[1]),
            });
        }
        let s = AttnShape {
            b: qs[0],
            tq: qs[1],
            tk: ks[1],
            h: qs[2],
            hkv: ks[2],
            d: qs[3],
            window,
            pos0,
        };
        let (out, lse) = if same_device("attention", &[q, k, v])? == Device::Gpu {
            let (out, lse) = g::attention(q, k, v, s)?;
            (Storage::Gpu(out), Storage::Gpu(lse))
        } else {
            let mut out = alloc_uninit(q.numel());
            let mut lse = alloc_uninit(s.b * s.tq * s.h);
            // Tiled flash attention (split-K when Tq is small); `attention::attention_forward` is
            // the reference it is tested against.
            let (qd, kd, vd) = (q.data(), k.data(), v.data());
            let bl = FlashBlocks::forward(s.d);
            flash_attention_forward(&mut out, &mut lse, &qd, &kd, &vd, s, bl);
            (Storage::Cpu(out), Storage::Cpu(lse))
        };
        let op = should_record(&[q, k, v]).then(|| Op::Attention {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            lse,
            s,
        });
        Ok(Tensor::from_storage(out, qs.to_vec(), op))
    }

    /// Cross-entropy of logits (N, V) against targets (N) in 0..V or `IGNORE_INDEX`.
    pub fn cross_entropy(&self, targets: &[i32], reduction: Reduction) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(EngineError::BadRank {
                op: "cross_entropy",
                expected: 2,
                shape: self.shape().to_vec(),
            });
        }
        let (n, v) = (self.shape()[0], self.shape()[1]);
        if targets.len() != n {
            return Err(EngineError::ShapeMismatch {
                op: "cross_entropy",
                lhs: self.shape().to_vec(),
                rhs: vec![targets.len()],
            });
        }
        let bad = targets
            .iter()
            .enumerate()
            .find(|(_, t)| **t != IGNORE_INDEX && (**t < 0 || **t as usize >= v));
        if let Some((pos, &t)) = bad {
            return Err(EngineError::IdOutOfRange {
                op: "cross_entropy",
                id: t as i64,
                pos,
                bound: v,
            });
        }
        let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let mean_count = (reduction == Reduction::Mean).then_some(count);
        let shape = if mean_count.is_some() { vec![] } else { vec![n] };
        let (out, lse) = if self.device() == Device::Gpu {
            let (out, lse) = g::cross_entropy(self, targets, n, v, mean_count)?;
            (Storage::Gpu(out), Storage::Gpu(lse))
        } else {
            let (mut losses, mut lse) = (alloc_uninit(n), alloc_uninit(n));
            softmax::cross_entropy_forward(&mut losses, &mut lse, &self.data(), targets, n, v);
            let out = match mean_count {
                None => losses,
                Some(count) => vec![(reduce::sum_all(&losses) / count as f64) as f32],
            };
            (Storage::Cpu(out), Storage::Cpu(lse))
        };
        let op = should_record(&[self]).then(|| Op::CrossEntropy {
            logits: self.clone(),
            targets: targets.to_vec(),
            lse,
            mean_count,
        });
        Ok(Tensor::from_storage(out, shape, op))
    }

    /// Sum of all elements -> shape ().
    pub fn sum(&self) -> Result<Tensor> {
        let op = should_record(&[self]).then(|| Op::Sum(self.clone()));
        if self.device() == Device::Gpu {
            let out = g::map(self, 1, |bt, o, x| gk::reduce::sum_all(bt, o, x, 1.0, false))?;
            return Ok(Tensor::from_gpu(out, vec![], op));
        }
        Ok(Tensor::from_op(vec![reduce::sum_all(&self.data()) as f32], vec![], op))
    }

    /// Mean of all elements -> shape ().
    pub fn mean(&self) -> Result<Tensor> {
        let op = should_record(&[self]).then(|| Op::Mean(self.clone()));
        let n = self.numel();
        if self.device() == Device::Gpu {
            let alpha = 1.0 / n as f32;
            let out = g::map(self, 1, |bt, o, x| gk::reduce::sum_all(bt, o, x, alpha, false))?;
            return Ok(Tensor::from_gpu(out, vec![], op));
        }
        let out = vec![(reduce::sum_all(&self.data()) / n as f64) as f32];
        Ok(Tensor::from_op(out, vec![], op))
    }

    /// Sum over `dim`, kept as size 1 when `keepdim`.
    pub fn sum_dim(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = norm_dim("sum_dim", dim, self.rank())?;
        let (outer, n, inner) = split_at_dim(self.shape(), d);
        let mut shape = self.shape().to_vec();
        if keepdim {
            shape[d] = 1;
        } else {
            shape.remove(d);
        }
        let op = should_record(&[self]).then(|| Op::SumDim(self.clone(), d));
        if self.device() == Device::Gpu {
            let out = g::map(self, outer * inner, |bt, o, x| {
                gk::reduce::sum_dim_forward(bt, o, x, outer, n, inner)
            })?;
            return Ok(Tensor::from_gpu(out, shape, op));
        }
        let mut out = alloc_uninit(outer * inner);
        reduce::sum_dim_forward(&mut out, &self.data(), outer, n, inner);
        Ok(Tensor::from_op(out, shape, op))
    }

    /// Mean over `dim`, kept as size 1 when `keepdim`.
    pub fn mean_dim(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = norm_dim("mean_dim", dim, self.rank())?;
        let n = self.shape()[d];
        self.sum_dim(dim, keepdim)?.scale(1.0 / n as f32)
    }
}
