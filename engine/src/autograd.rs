//! Reverse-mode autograd over the recorded graph, and the no-grad mode.
//!
//! `backward` collects the graph by an iterative DFS (no recursion, so depth is unbounded), then
//! walks it newest node first (reverse creation order: consumers before their inputs). Each
//! node's gradient is taken out of the store when the node is processed (so intermediate
//! gradients are freed as early as possible) and its op's backward accumulates (`+=`) into its
//! inputs' gradients. Only trainable leaves keep theirs. A checkpointed segment (checkpoint.rs)
//! is recomputed and walked in place when the walk reaches it.
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use femtochat_kernels::gpu::{self as gk, GpuBuffer};

use crate::Device;
use crate::checkpoint::Segment;
use crate::device::record;
use crate::error::{EngineError, Result};
use crate::op::Op;
use crate::pool::{alloc_zeroed, recycle};
use crate::tensor::{Storage, Tensor, TensorId};

thread_local! {
    static NO_GRAD_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// While alive, ops on this thread record nothing (inference); nests.
#[must_use = "no-grad mode ends when the guard is dropped"]
pub struct NoGradGuard(());

/// Enter no-grad mode until the returned guard drops: `let _g = no_grad();`
pub fn no_grad() -> NoGradGuard {
    NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
    NoGradGuard(())
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

pub fn is_grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Grad mode on this thread until the guard drops, even inside `no_grad` (a recomputed segment
/// records its graph whatever mode the caller of `backward` is in).
pub(crate) fn enable_grad() -> EnableGradGuard {
    EnableGradGuard(NO_GRAD_DEPTH.with(|d| d.replace(0)))
}

pub(crate) struct EnableGradGuard(usize);

impl Drop for EnableGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(self.0));
    }
}

/// Whether an op on these inputs should be recorded.
pub(crate) fn should_record(inputs: &[&Tensor]) -> bool {
    is_grad_enabled() && inputs.iter().any(|t| t.requires_grad())
}

/// Gradient buffers during a backward pass, keyed by tensor id; each lives on its tensor's
/// device (host vectors on CPU graphs, GPU buffers on GPU graphs).
pub(crate) struct GradStore {
    bufs: HashMap<TensorId, Storage>,
    /// The trainable leaves met so far, whose gradients `backward` returns.
    leaves: HashMap<TensorId, Tensor>,
}

impl GradStore {
    /// The host gradient buffer of `t`, zero-filled on first use; `None` when `t` needs no
    /// gradient.
    pub(crate) fn slot(&mut self, t: &Tensor) -> Option<&mut [f32]> {
        if !t.requires_grad() {
            return None;
        }
        let s = self.bufs.entry(t.id()).or_insert_with(|| Storage::Cpu(alloc_zeroed(t.numel())));
        match s {
            Storage::Cpu(v) => Some(v),
            Storage::Gpu(_) => {
                debug_assert!(false, "host gradient slot for a GPU tensor");
                None
            }
        }
    }

    /// The GPU gradient buffer of `t`, zero-filled on first use; `None` when `t` needs no
    /// gradient.
    pub(crate) fn slot_gpu(&mut self, t: &Tensor) -> Result<Option<&GpuBuffer>> {
        if !t.requires_grad() {
            return Ok(None);
        }
        let s = match self.bufs.entry(t.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Storage::Gpu(record(|bt| bt.zeros(t.numel()))?))
            }
        };
        s.gpu_buf().map(Some)
    }

    /// Take `t`'s host buffer out (zeros if absent), for a kernel that writes several gradients
    /// at once; hand it back with `put`.
    pub(crate) fn take(&mut self, t: &Tensor) -> Vec<f32> {
        match self.bufs.remove(&t.id()) {
            Some(mut s) => s.take_host(),
            None => alloc_zeroed(t.numel()),
        }
    }

    /// The GPU mirror of `take`.
    pub(crate) fn take_gpu(&mut self, t: &Tensor) -> Result<GpuBuffer> {
        match self.bufs.remove(&t.id()) {
            Some(Storage::Gpu(b)) => Ok(b),
            _ => record(|bt| bt.zeros(t.numel())),
        }
    }

    /// Add a whole gradient for `t`, moved in when `t` has none yet (so pass-through rules like
    /// reshape cost no copy); also returns a buffer from `take`, adding to any gradient that
    /// arrived meanwhile (the same tensor passed twice to one op).
    pub(crate) fn put(&mut self, t: &Tensor, buf: Vec<f32>) {
        if !t.requires_grad() {
            recycle(buf);
            return;
        }
        match self.bufs.get_mut(&t.id()) {
            Some(Storage::Cpu(g)) => {
                g.iter_mut().zip(&buf).for_each(|(g, &b)| *g += b);
                recycle(buf);
            }
            _ => {
                self.bufs.insert(t.id(), Storage::Cpu(buf));
            }
        }
    }

    /// The GPU mirror of `put`.
    pub(crate) fn put_gpu(&mut self, t: &Tensor, buf: GpuBuffer) -> Result<()> {
        if !t.requires_grad() {
            return Ok(());
        }
        match self.bufs.get(&t.id()) {
            Some(Storage::Gpu(g)) => record(|bt| gk::elementwise::scale_backward(bt, g, &buf, 1.0)),
            _ => {
                self.bufs.insert(t.id(), Storage::Gpu(buf));
                Ok(())
            }
        }
    }
}

/// Gradients of the trainable leaves reached by a backward pass.
#[derive(Default, Debug)]
pub struct Grads {
    map: HashMap<TensorId, Tensor>,
}

impl Grads {
    /// d loss / d `t`, shaped like `t`; `None` if `t` is not a trainable leaf of the graph.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (leaf id, gradient) pairs, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (TensorId, &Tensor)> {
        self.map.iter().map(|(id, g)| (*id, g))
    }

    /// Add another pass's gradients into these (gradient accumulation over micro-batches). A
    /// failure (a lost GPU, a gradient of the wrong kind) is an error in every build: silently
    /// skipping a micro-batch would train on the wrong gradient.
    pub fn accumulate(&mut self, other: Grads) -> Result<()> {
        for (id, g) in other.map {
            match self.map.get(&id) {
                // Gradients are leaves this store owns, so they are updated in place.
                Some(mine) if mine.shape() == g.shape() && mine.device() == Device::Gpu => {
                    let (m, s) = (mine.storage(), g.storage());
                    let (m, s) = (m.gpu_buf()?, s.gpu_buf()?);
                    record(|bt| gk::elementwise::scale_backward(bt, m, s, 1.0))?;
                }
                Some(mine) if mine.shape() == g.shape() => {
                    let src = g.try_to_vec()?;
                    mine.with_data_mut(|m| {
                        m.iter_mut().zip(src.iter()).for_each(|(a, &b)| *a += b)
                    })?;
                }
                Some(mine) => {
                    return Err(EngineError::Invalid {
                        op: "accumulate",
                        msg: format!(
                            "gradient shapes differ: {:?} vs {:?}",
                            mine.shape(),
                            g.shape()
                        ),
                    });
                }
                None => {
                    self.map.insert(id, g);
                }
            }
        }
        Ok(())
    }
}

impl Tensor {
    /// Back-propagate from this single-element tensor (d self / d self = 1); returns the
    /// gradients of every trainable leaf it depends on. The graph (and every activation it
    /// saved) lives as long as `self`: drop the loss after this to free them.
    pub fn backward(&self) -> Result<Grads> {
        if self.numel() != 1 {
            return Err(EngineError::NotScalar { op: "backward", shape: self.shape().to_vec() });
        }
        if !self.requires_grad() {
            return Err(EngineError::Invalid {
                op: "backward",
                msg: "the loss does not depend on any trainable tensor (or was built in \
                      no-grad mode)"
                    .into(),
            });
        }
        let order = backward_order(self, &HashSet::new(), None)?;
        let mut store = GradStore { bufs: HashMap::new(), leaves: HashMap::new() };
        let seed = match self.device() {
            Device::Cpu => Storage::Cpu(vec![1.0]),
            Device::Gpu => Storage::Gpu(record(|bt| bt.upload(&[1.0f32]))?),
        };
        store.bufs.insert(self.id(), seed);
        walk(&order, &mut store)?;
        if self.is_leaf() {
            store.leaves.insert(self.id(), self.clone());
        }
        let mut map = HashMap::new();
        for (id, buf) in store.bufs {
            if let Some(leaf) = store.leaves.get(&id) {
                map.insert(id, Tensor::from_storage(buf, leaf.shape().to_vec(), None));
            }
        }
        Ok(Grads { map })
    }
}

/// Run the backward rule of every node of `order` (consumers first) that has a gradient.
fn walk(order: &[Tensor], store: &mut GradStore) -> Result<()> {
    for t in order {
        let Some(op) = t.op() else { continue };
        let Some(dout) = store.bufs.remove(&t.id()) else { continue };
        for inp in op.inputs() {
            if inp.is_leaf() && inp.requires_grad() {
                store.leaves.entry(inp.id()).or_insert_with(|| inp.clone());
            }
        }
        match (op, dout) {
            (Op::Checkpoint(seg), dout) => recompute_backward(t, seg, dout, store)?,
            (_, Storage::Gpu(dout)) => op.backward_gpu(t, dout, store)?,
            (_, mut host) => {
                if let Some(spent) = op.backward(t, host.take_host(), store) {
                    recycle(spent);
                }
            }
        }
    }
    Ok(())
}

/// The backward of a checkpointed segment: run its forward again, recording this time, then
/// back-propagate `dout` through the fresh graph down to the segment's inputs, whose gradients
/// land in `store` for the outer walk (and the gradients of parameters used inside the segment
/// land there too). The fresh graph is dropped when this returns, so only one segment's
/// activations are alive at a time.
fn recompute_backward(
    out: &Tensor,
    seg: &Segment,
    dout: Storage,
    store: &mut GradStore,
) -> Result<()> {
    let first_new = TensorId::peek_next();
    let y = {
        let _g = enable_grad();
        (seg.f)(&seg.inputs)?
    };
    if y.shape() != out.shape() || y.device() != out.device() {
        return Err(EngineError::Invalid {
            op: "checkpoint",
            msg: format!(
                "the recomputed segment returned shape {:?} on {}, the forward {:?} on {}",
                y.shape(),
                y.device(),
                out.shape(),
                out.device()
            ),
        });
    }
    if !y.requires_grad() {
        return Ok(()); // nothing inside depends on a trainable tensor
    }
    let stop: HashSet<TensorId> = seg.inputs.iter().map(Tensor::id).collect();
    if y.is_leaf() || stop.contains(&y.id()) {
        // The segment returned a parameter or one of its inputs unchanged.
        if y.is_leaf() {
            store.leaves.entry(y.id()).or_insert_with(|| y.clone());
        }
        return match dout {
            Storage::Gpu(d) => store.put_gpu(&y, d),
            mut host => {
                store.put(&y, host.take_host());
                Ok(())
            }
        };
    }
    let order = backward_order(&y, &stop, Some(first_new))?;
    store.bufs.insert(y.id(), dout);
    walk(&order, store)
}

/// The tracked nodes reachable from `root` without passing through `stop`, in the order the
/// backward visits them: newest first. Every op result is created after its inputs, so reverse
/// creation order is a valid order; and being a property of the forward alone, it is the same
/// whether or not parts of the graph are recomputed, which keeps the gradient accumulations
/// (and so the bits) identical. With `first_new`, every node must be at least that new (a
/// recomputed segment that reaches an older tracked tensor not passed as an input is an error:
/// its gradient would be consumed too early).
fn backward_order(
    root: &Tensor,
    stop: &HashSet<TensorId>,
    first_new: Option<TensorId>,
) -> Result<Vec<Tensor>> {
    let mut order = Vec::new();
    let mut seen: HashSet<TensorId> = HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(t) = stack.pop() {
        if t.is_leaf() || stop.contains(&t.id()) || !seen.insert(t.id()) {
            continue;
        }
        if first_new.is_some_and(|f| t.id() < f) {
            return Err(EngineError::Invalid {
                op: "checkpoint",
                msg: "a checkpointed segment uses a tracked tensor that was not passed to it \
                      as an input (pass every non-parameter tensor it reads in `inputs`)"
                    .into(),
            });
        }
        if let Some(op) = t.op() {
            stack.extend(op.inputs().into_iter().cloned());
        }
        order.push(t);
    }
    order.sort_unstable_by_key(|t| std::cmp::Reverse(t.id()));
    Ok(order)
}
