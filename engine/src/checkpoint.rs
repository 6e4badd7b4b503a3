//! Activation checkpointing (recomputation), at the graph level: `Tensor::checkpoint(inputs, f)`
//! runs the segment `f` without recording, so none of its intermediate activations outlive it,
//! and records one node holding only the segment's inputs and `f` itself. The backward runs `f`
//! again, recording, and back-propagates through that fresh graph (autograd.rs,
//! `recompute_backward`); so at most one segment's activations are alive at a time.
//!
//! Any op sequence can be a segment. Ops that already recompute inside their own backward (flash
//! attention rebuilds its probabilities from the saved log-sum-exp) keep doing so.
//!
//! On the CPU the gradients are bit-identical to the run without checkpointing: the kernels are
//! deterministic, the recomputed forward equals the first, and the backward visits nodes in
//! reverse creation order in both runs, so every gradient receives the same contributions in
//! the same order.
use std::sync::Arc;

use crate::autograd::{is_grad_enabled, no_grad};
use crate::error::Result;
use crate::op::Op;
use crate::tensor::Tensor;

/// A segment's forward: the same function of the same inputs, run once per pass.
pub(crate) type SegmentFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// What a checkpointed result remembers: the segment's inputs and how to recompute it.
pub(crate) struct Segment {
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) f: SegmentFn,
}

impl Tensor {
    /// `f(inputs)`, keeping for the backward only `inputs` (and whatever `f` captures, such as
    /// parameters), not the activations inside `f`; the backward recomputes them.
    ///
    /// `f` must be a pure function of `inputs` and of the tensors it captures: every tracked
    /// (non-leaf) tensor it reads must come in through `inputs` (the backward reports an error
    /// otherwise). Outside grad mode this is just `f(inputs)`.
    pub fn checkpoint(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Result<Tensor> {
        if !is_grad_enabled() {
            return f(inputs);
        }
        let y = {
            let _g = no_grad();
            f(inputs)?
        };
        // Recorded even when no input requires grad: parameters captured by `f` may.
        let seg = Segment { inputs: inputs.to_vec(), f: Arc::new(f) };
        Ok(y.view_as(y.shape().to_vec(), Some(Op::Checkpoint(Box::new(seg)))))
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;
    use crate::error::Result;

    fn param(shape: &[usize], seed: f32) -> Tensor {
        let n = shape.iter().product::<usize>();
        let v = (0..n).map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.5).collect();
        Tensor::param(v, shape).unwrap()
    }

    /// A little residual network over (4, 8) rows: x -> x + relu2(x W1^T) W2^T, twice, reading a
    /// shared x0 in both blocks (as the GPT reads its x0), then a scalar loss.
    fn net(ckpt: bool, w: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let x0 = w[0].reshape(&[4, 8])?.tanh()?; // tracked, used by every block
        let mut x = x0.clone();
        for blk in 0..2 {
            let (w1, w2, lam) =
                (w[1 + 3 * blk].clone(), w[2 + 3 * blk].clone(), w[3 + 3 * blk].clone());
            let f = move |xs: &[Tensor]| -> Result<Tensor> {
                let h = xs[0].rmsnorm(1e-6)?.linear(&w1)?.relu2()?.linear(&w2)?;
                xs[0].add(&h)?.add(&lam.mul(&xs[1])?)
            };
            x = if ckpt { Tensor::checkpoint(&[x, x0.clone()], f)? } else { f(&[x, x0.clone()])? };
        }
        let loss = x.softcap(2.0)?.mul(&x)?.mean()?;
        Ok((loss, w.to_vec()))
    }

    fn weights() -> Vec<Tensor> {
        let mut w = vec![param(&[32], 0.1)];
        for b in 0..2 {
            w.push(param(&[16, 8], 1.0 + b as f32));
            w.push(param(&[8, 16], 2.0 + b as f32));
            w.push(param(&[1], 3.0 + b as f32));
        }
        w
    }

    fn bits(loss: &Tensor, w: &[Tensor]) -> Vec<Vec<u32>> {
        let g = loss.backward().unwrap();
        w.iter().map(|p| g.get(p).unwrap().to_vec().iter().map(|x| x.to_bits()).collect()).collect()
    }

    #[test]
    fn checkpointed_gradients_are_bit_identical() {
        let w = weights();
        let (plain, _) = net(false, &w).unwrap();
        let (ckpt, _) = net(true, &w).unwrap();
        assert_eq!(plain.item().unwrap().to_bits(), ckpt.item().unwrap().to_bits());
        assert_eq!(bits(&plain, &w), bits(&ckpt, &w));
    }

    #[test]
    fn nested_and_identity_segments_work() {
        let w = param(&[6], 0.5);
        let x = w.scale(2.0).unwrap();
        let plain = x.tanh().unwrap().mul(&x).unwrap().sum().unwrap();
        let y = Tensor::checkpoint(std::slice::from_ref(&x), |xs| {
            let inner = Tensor::checkpoint(&[xs[0].clone()], |ys| ys[0].tanh())?;
            let same = Tensor::checkpoint(&[xs[0].clone()], |ys| Ok(ys[0].clone()))?;
            inner.mul(&same)
        })
        .unwrap();
        let ckpt = y.sum().unwrap();
        assert_eq!(bits(&plain, std::slice::from_ref(&w)), bits(&ckpt, std::slice::from_ref(&w)));
    }

    #[test]
    fn a_segment_reading_an_unlisted_tracked_tensor_is_an_error() {
        let w = param(&[4], 0.2);
        let hidden = w.scale(3.0).unwrap(); // tracked, captured instead of passed
        let x = w.tanh().unwrap();
        let y = Tensor::checkpoint(&[x], move |xs| xs[0].mul(&hidden)).unwrap();
        let err = y.sum().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("not passed to it"), "{err}");
    }

    #[test]
    fn outside_grad_mode_a_segment_is_a_plain_call() {
        let w = param(&[4], 0.2);
        let _g = crate::no_grad();
        let y = Tensor::checkpoint(std::slice::from_ref(&w), |xs| xs[0].tanh()).unwrap();
        assert!(y.is_leaf() && !y.requires_grad());
    }
}
