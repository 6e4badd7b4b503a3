//! The fast decode step: one new token for each of B sequences over their KV-cache rows, on
//! the CPU, without the tensor engine.
//!
//! Why a second implementation of the trunk: a decode step through engine ops allocates every
//! intermediate (dozens of tensors per layer), re-packs each weight matrix for the BLIS matmul,
//! and wakes threads for products that take microseconds — overhead that made batch-1 decoding
//! slower than PyTorch's. Here every buffer lives in a `Decoder` sized once (it grows only when
//! a step has more rows or a longer cache than any before), the weights are read in place by
//! the skinny `matvec` kernels, and attention is `attention_decode` per row and layer. The
//! arithmetic follows `Gpt::forward_cached` op for op (docs/reference.md §3); the tests check
//! logits against it and greedy generations token for token.
//!
//! The same step runs a prefill (`Gpt::extend`): its rows are then (sequence, position) slots,
//! several per sequence, whose keys and values all enter the cache before attention reads it, so
//! each slot attends causally to the ones before it. Weight matrices are f32 parameters read in
//! place or bf16 copies (`weights.rs`).
//!
//! On a GPU model `decode_step` runs `forward_cached` instead, so callers need one code path.
use femtochat_engine::{Device, Ids, RMSNORM_EPS, Tensor};
use femtochat_kernels::cpu::attention_decode::{DecodeAttnShape, attention_decode, dot};
use femtochat_kernels::cpu::matvec::PAR_MACS;
use femtochat_kernels::cpu::rope::rope_tables;
use femtochat_kernels::cpu::simd::{fast_exp, fast_tanh, vectorized};
use rayon::prelude::*;

use crate::config::{SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS};
use crate::error::{ModelError, Result};
use crate::gpt::{Gpt, QK_SCALE, ROPE_BASE, SOFTCAP};
use crate::kv_cache::KvCache;
use crate::weights::{Mat, WeightDtype};

/// Slots (sequence positions) a prefill runs at once: bounds its scratch buffers (about
/// 30 C + cache floats per slot) whatever the prompt length.
const PREFILL_SLOTS: usize = 256;

/// Name of the instruction set the decode step's matmul kernels run on this CPU.
pub fn decode_isa() -> &'static str {
    femtochat_kernels::cpu::matvec::isa().name()
}

/// The model's decode plan, built on first use. A clone of the model starts without one: the
/// plan holds handles to the original's parameters, which a clone may replace.
#[derive(Default)]
pub(crate) struct DecodeCell(pub(crate) std::sync::OnceLock<DecodePlan>);

impl Clone for DecodeCell {
    fn clone(&self) -> Self {
        DecodeCell::default()
    }
}

/// Weight matrices, parameter handles and rotary tables of the decode step, resolved once per
/// model (looking parameters up by name would format strings, i.e. allocate, every step).
pub(crate) struct DecodePlan {
    dtype: WeightDtype,
    wte: Mat,
    lm_head: Mat,
    smear_gate: Tensor,
    scalars: Tensor, // resid_lambdas (L), x0_lambdas (L), smear_lambda, backout_lambda
    layers: Vec<LayerWeights>,
    /// cos, sin (positions, D/2), as `RopeTable` builds them.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Parameter name of each matrix above, in `matrices()` order (for conversions).
    names: Vec<String>,
}

struct LayerWeights {
    q: Mat,
    k: Mat,
    v: Mat,
    proj: Mat,
    fc: Mat,
    mlp_proj: Mat,
    /// value_embeds.i and attn.ve_gate, on layers that have them.
    ve: Option<(Mat, Tensor)>,
}

impl DecodePlan {
    pub(crate) fn new(gpt: &Gpt, dtype: WeightDtype) -> Result<DecodePlan> {
        let c = gpt.config();
        let p = |n: &str| -> Result<Tensor> { Ok(gpt.params().get(n)?.clone()) };
        let mut names = Vec::new();
        let mut mat = |n: String| -> Result<Mat> {
            let m = Mat::new(&p(&n)?, dtype);
            names.push(n);
            Ok(m)
        };
        let wte = mat("transformer.wte.weight".into())?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let l = |n: &str| format!("transformer.h.{i}.{n}");
            let ve = if c.has_value_embed(i) {
                Some((mat(format!("value_embeds.{i}.weight"))?, p(&l("attn.ve_gate.weight"))?))
            } else {
                None
            };
            layers.push(LayerWeights {
                q: mat(l("attn.c_q.weight"))?,
                k: mat(l("attn.c_k.weight"))?,
                v: mat(l("attn.c_v.weight"))?,
                proj: mat(l("attn.c_proj.weight"))?,
                fc: mat(l("mlp.c_fc.weight"))?,
                mlp_proj: mat(l("mlp.c_proj.weight"))?,
                ve,
            });
        }
        let lm_head = mat("lm_head.weight".into())?;
        let mut scalars = p("resid_lambdas")?.to_vec();
        scalars.extend(p("x0_lambdas")?.to_vec());
        scalars.push(p("smear_lambda")?.item()?);
        scalars.push(p("backout_lambda")?.item()?);
        let (t_max, d) = (gpt.max_positions(), c.head_dim());
        let (mut cos, mut sin) = (vec![0.0; t_max * d / 2], vec![0.0; t_max * d / 2]);
        rope_tables(&mut cos, &mut sin, t_max, d, ROPE_BASE);
        Ok(DecodePlan {
            dtype,
            wte,
            lm_head,
            smear_gate: p("smear_gate.weight")?,
            scalars: Tensor::from_vec(scalars.clone(), &[scalars.len()])?,
            layers,
            cos,
            sin,
            names,
        })
    }

    pub(crate) fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// Whether the parameter `name` is one of the plan's matrices.
    pub(crate) fn holds(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Elements of all the plan's matrices.
    pub(crate) fn matrix_numel(&self) -> usize {
        self.matrices().iter().map(|m| m.len()).sum()
    }

    /// The matrix holding parameter `name`.
    pub(crate) fn matrix(&self, name: &str) -> Option<&Mat> {
        let i = self.names.iter().position(|n| n == name)?;
        self.matrices().get(i).copied()
    }

    /// Every matrix, in the order `new` made them (the order of `names`).
    fn matrices(&self) -> Vec<&Mat> {
        let mut all = vec![&self.wte];
        for l in &self.layers {
            if let Some((ve, _)) = &l.ve {
                all.push(ve);
            }
            all.extend([&l.q, &l.k, &l.v, &l.proj, &l.fc, &l.mlp_proj]);
        }
        all.push(&self.lm_head);
        all
    }
}

/// Scratch buffers of the decode step, reused from step to step.
#[derive(Default)]
pub struct Decoder {
    rows: usize,
    x: Vec<f32>,      // (B, C) residual stream
    x0: Vec<f32>,     // (B, C)
    xb: Vec<f32>,     // (B, C) backout copy
    a: Vec<f32>,      // (B, C) normed input of a sublayer
    t: Vec<f32>,      // (B, C) sublayer output
    q: Vec<f32>,      // (B, H * D)
    k: Vec<f32>,      // (B, Hkv * D)
    v: Vec<f32>,      // (B, Hkv * D)
    y: Vec<f32>,      // (B, H * D) attention output
    hid: Vec<f32>,    // (B, 4C)
    logits: Vec<f32>, // (B, V)
    scores: Vec<f32>, // (B, capacity)
    /// (cache row, position) of each of the B rows of this step.
    slots: Vec<(usize, usize)>,
    capacity: usize,
    /// Rows of logits the buffer holds.
    logit_rows: usize,
    /// Times a buffer was (re)sized: steps after the first of a given size add none.
    grows: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// How many times the buffers were resized so far (tests check that steady-state steps
    /// allocate nothing).
    pub fn grows(&self) -> usize {
        self.grows
    }

    /// Logits (V) of row `r` of the last step.
    pub fn logits(&self, r: usize, vocab: usize) -> &[f32] {
        &self.logits[r * vocab..(r + 1) * vocab]
    }

    fn ensure(&mut self, gpt: &Gpt, rows: usize, logit_rows: usize, capacity: usize) {
        if rows <= self.rows && capacity <= self.capacity && logit_rows <= self.logit_rows {
            return;
        }
        let c = gpt.config();
        let (b, ce, d) = (rows.max(self.rows), c.n_embd, c.head_dim());
        let (cap, lr) = (capacity.max(self.capacity), logit_rows.max(self.logit_rows));
        for (buf, n) in [
            (&mut self.x, b * ce),
            (&mut self.x0, b * ce),
            (&mut self.xb, b * ce),
            (&mut self.a, b * ce),
            (&mut self.t, b * ce),
            (&mut self.q, b * c.n_head * d),
            (&mut self.k, b * c.n_kv_head * d),
            (&mut self.v, b * c.n_kv_head * d),
            (&mut self.y, b * c.n_head * d),
            (&mut self.hid, b * 4 * ce),
            (&mut self.logits, lr * c.vocab_size),
            (&mut self.scores, b * cap),
        ] {
            buf.resize(n, 0.0);
        }
        self.slots.reserve(b.saturating_sub(self.slots.len()));
        self.rows = b;
        self.capacity = cap;
        self.logit_rows = lr;
        self.grows += 1;
    }
}

/// x / sqrt(mean(x^2) + eps), in place.
#[inline(always)]
fn rmsnorm(x: &mut [f32]) {
    let ss = dot(x, x);
    let s = 1.0 / (ss / x.len() as f32 + RMSNORM_EPS).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// Rotate each head of `x` (heads x D) to position `pos` (nanochat's half-split convention),
/// then RMS-normalise it and scale by QK_SCALE: what the cached forward does to q and k.
#[inline(always)]
fn rope_norm(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        let (x1, x2) = head.split_at_mut(half);
        for j in 0..half {
            let (a, b) = (x1[j], x2[j]);
            x1[j] = a * cos[j] + b * sin[j];
            x2[j] = -a * sin[j] + b * cos[j];
        }
        rmsnorm(head);
        head.iter_mut().for_each(|v| *v *= QK_SCALE);
    }
}

/// Which new positions a step computes logits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Logits {
    /// Every slot (a decode step; `extend` for `forward_cached`).
    All,
    /// The last slot of each sequence (a prefill).
    Last,
}

impl Gpt {
    /// One decode step: append `tokens[r]` to row r of `cache` (each row at its own position)
    /// and return the next-token logits (B, V) flattened, living in `dec` until its next step.
    /// Equal to `forward_cached` on (B, 1) ids up to float rounding; it allocates nothing once
    /// `dec` has seen a step with as many rows and as long a cache.
    pub fn decode_step<'a>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        dec: &'a mut Decoder,
    ) -> Result<&'a [f32]> {
        let c = self.config();
        let (b, v) = (tokens.len(), c.vocab_size);
        if b != cache.rows() || b == 0 {
            return Err(ModelError::Invalid(format!(
                "{b} tokens for {} cache rows (need one per row)",
                cache.rows()
            )));
        }
        self.check_tokens(tokens)?;
        cache.check_room(1)?;
        dec.ensure(self, b, b, cache.capacity());
        if self.device() != Device::Cpu || !cache.on_host() {
            self.engine_only()?;
            let ids = Ids::new(tokens.to_vec(), &[b, 1])?;
            let logits = self.forward_cached(&ids, cache)?.try_to_vec()?;
            dec.logits[..b * v].copy_from_slice(&logits);
            return Ok(&dec.logits[..b * v]);
        }
        dec.slots.clear();
        dec.slots.extend((0..b).map(|r| (r, cache.position(r))));
        self.step_cpu(tokens, cache, dec, Logits::All)?;
        cache.advance(1);
        Ok(&dec.logits[..b * v])
    }

    /// Append `idx` (B, T) to the B rows of `cache` and return the logits of the new positions,
    /// (B, T, V), or (B, V) for the last position of each row with `last_only`: what
    /// `forward_cached` / `forward_cached_last` return, computed by the decode step's kernels
    /// (T positions at a time, up to `PREFILL_SLOTS` slots) instead of engine ops. The path of
    /// bf16 models; on an f32 model equal to the engine's up to float rounding (tested).
    pub fn extend(&self, idx: &Ids, cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        let &[b, t] = idx.shape() else {
            return Err(ModelError::Invalid(format!(
                "token ids must be (B, T), got {:?}",
                idx.shape()
            )));
        };
        if b != cache.rows() || b == 0 || t == 0 {
            return Err(ModelError::Invalid(format!(
                "{b}x{t} tokens for {} cache rows (need one row of at least one token per cache row)",
                cache.rows()
            )));
        }
        if self.device() != Device::Cpu || !cache.on_host() {
            return Err(ModelError::Invalid(
                "the decode-kernel forward runs on the CPU, with a host KV cache".into(),
            ));
        }
        let tokens = idx.data();
        self.check_tokens(tokens)?;
        cache.check_room(t)?;
        let v = self.config().vocab_size;
        let mut out = vec![0.0f32; if last_only { b * v } else { b * t * v }];
        let mut dec = Decoder::new();
        let chunk = (PREFILL_SLOTS / b).max(1);
        let mut ids = Vec::with_capacity(b * chunk.min(t));
        for t0 in (0..t).step_by(chunk) {
            let n = chunk.min(t - t0);
            let last_chunk = t0 + n == t;
            ids.clear();
            dec.slots.clear();
            for r in 0..b {
                ids.extend_from_slice(&tokens[r * t + t0..r * t + t0 + n]);
                dec.slots.extend((0..n).map(|j| (r, cache.position(r) + j)));
            }
            let which = if last_only { Logits::Last } else { Logits::All };
            dec.ensure(self, b * n, if last_only { b } else { b * n }, cache.capacity());
            self.step_cpu(&ids, cache, &mut dec, which)?;
            cache.advance(n);
            if last_only {
                // Earlier chunks only fill the cache; their logits are not wanted.
                if last_chunk {
                    out.copy_from_slice(&dec.logits[..b * v]);
                }
            } else {
                for r in 0..b {
                    let src = &dec.logits[r * n * v..(r + 1) * n * v];
                    out[(r * t + t0) * v..(r * t + t0 + n) * v].copy_from_slice(src);
                }
            }
        }
        let shape: &[usize] = if last_only { &[b, v] } else { &[b, t, v] };
        Ok(Tensor::from_vec(out, shape)?)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let v = self.config().vocab_size;
        match tokens.iter().find(|&&id| id as usize >= v) {
            Some(&id) => Err(ModelError::TokenOutOfRange { id, vocab: v }),
            None => Ok(()),
        }
    }

    /// Run the step over `dec.slots` (one per token) with every kernel compiled for the CPU's
    /// vector ISA, on a pool thread when there are several.
    fn step_cpu(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        dec: &mut Decoder,
        which: Logits,
    ) -> Result<()> {
        let plan = self.decode_plan()?;
        let half = self.config().head_dim() / 2;
        if let Some(&(r, pos)) =
            dec.slots.iter().find(|&&(_, pos)| (pos + 1) * half > plan.cos.len())
        {
            return Err(ModelError::ContextFull {
                pos: cache.position(r),
                len: pos + 1 - cache.position(r),
                capacity: self.max_positions(),
            });
        }
        let mut step = || vectorized(|| self.decode_cpu(plan, tokens, cache, dec, which));
        if rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none() {
            // Run the whole step on a pool thread: its kernels' parallel loops then start from
            // inside the pool (the other threads are still spinning from the last one) instead
            // of each handing work across threads and sleeping until it returns.
            rayon::scope(|_| step())
        } else {
            step()
        }
    }

    // Inlined into `step_cpu`'s `vectorized` call, so its loops compile for AVX2 + FMA.
    #[inline(always)]
    fn decode_cpu(
        &self,
        plan: &DecodePlan,
        tokens: &[u32],
        cache: &mut KvCache,
        dec: &mut Decoder,
        which: Logits,
    ) -> Result<()> {
        let c = self.config();
        let b = tokens.len();
        let (ce, nl, d) = (c.n_embd, c.n_layer, c.head_dim());
        let (hd, kvd, half) = (c.n_head * d, c.n_kv_head * d, d / 2);
        let scalars = plan.scalars.data();
        let (rl, xl) = (&scalars[..nl], &scalars[nl..2 * nl]);
        let (smear_lambda, backout_lambda) = (scalars[2 * nl], scalars[2 * nl + 1]);

        // Embedding, norm, smear with the sequence's previous embedding (which this token
        // replaces). Slots of one sequence come in position order, so a prefill chains them.
        {
            let sg = plan.smear_gate.data();
            for (s, &tok) in tokens.iter().enumerate() {
                let r = dec.slots[s].0;
                let x = &mut dec.x[s * ce..(s + 1) * ce];
                plan.wte.copy_row(tok as usize, x);
                rmsnorm(x);
                let g = smear_lambda * sigmoid(dot(&x[..SMEAR_GATE_CHANNELS], &sg));
                for (xv, pv) in x.iter_mut().zip(cache.prev_mut(r)) {
                    let old = *pv;
                    *pv = *xv;
                    *xv += g * old;
                }
            }
        }
        dec.x0[..b * ce].copy_from_slice(&dec.x[..b * ce]);

        for (i, lw) in plan.layers.iter().enumerate() {
            for (x, x0) in dec.x[..b * ce].iter_mut().zip(&dec.x0[..b * ce]) {
                *x = rl[i] * *x + xl[i] * x0;
            }
            dec.a[..b * ce].copy_from_slice(&dec.x[..b * ce]);
            dec.a[..b * ce].chunks_exact_mut(ce).for_each(rmsnorm);
            lw.q.linear(&mut dec.q, &dec.a, b, ce, hd);
            lw.k.linear(&mut dec.k, &dec.a, b, ce, kvd);
            lw.v.linear(&mut dec.v, &dec.a, b, ce, kvd);
            if let Some((table, gate)) = &lw.ve {
                let gate = gate.data();
                for (s, &tok) in tokens.iter().enumerate() {
                    let a = &dec.a[s * ce..s * ce + VE_GATE_CHANNELS];
                    let vr = &mut dec.v[s * kvd..(s + 1) * kvd];
                    for (hk, vh) in vr.chunks_exact_mut(d).enumerate() {
                        let gw = &gate[hk * VE_GATE_CHANNELS..(hk + 1) * VE_GATE_CHANNELS];
                        let g = 3.0 * sigmoid(dot(a, gw));
                        table.add_row(tok as usize, kvd, hk * d, g, vh);
                    }
                }
            }
            // Rope + QK norm, then every slot's new key and value into its sequence's cache
            // (all before attention reads them).
            for s in 0..b {
                let (r, pos) = dec.slots[s];
                let (cs, sn) = (
                    &plan.cos[pos * half..(pos + 1) * half],
                    &plan.sin[pos * half..(pos + 1) * half],
                );
                rope_norm(&mut dec.q[s * hd..(s + 1) * hd], d, cs, sn);
                rope_norm(&mut dec.k[s * kvd..(s + 1) * kvd], d, cs, sn);
                let (kc, vc) = cache.layer_kv(i, r);
                for (buf, new) in [(kc, &dec.k), (vc, &dec.v)] {
                    buf.with_data_mut(|cb| {
                        cb[pos * kvd..(pos + 1) * kvd].copy_from_slice(&new[s * kvd..(s + 1) * kvd])
                    })?;
                }
            }
            self.attend(i, b, cache, dec)?;
            lw.proj.linear(&mut dec.t, &dec.y, b, hd, ce);
            add(&mut dec.x[..b * ce], &dec.t[..b * ce]);
            dec.a[..b * ce].copy_from_slice(&dec.x[..b * ce]);
            dec.a[..b * ce].chunks_exact_mut(ce).for_each(rmsnorm);
            lw.fc.linear(&mut dec.hid, &dec.a, b, ce, 4 * ce);
            dec.hid[..b * 4 * ce].iter_mut().for_each(|h| {
                let r = h.max(0.0);
                *h = r * r
            });
            lw.mlp_proj.linear(&mut dec.t, &dec.hid, b, 4 * ce, ce);
            add(&mut dec.x[..b * ce], &dec.t[..b * ce]);
            if i == nl / 2 {
                dec.xb[..b * ce].copy_from_slice(&dec.x[..b * ce]);
            }
        }
        for (x, xb) in dec.x[..b * ce].iter_mut().zip(&dec.xb[..b * ce]) {
            *x -= backout_lambda * xb;
        }
        // The rows that get logits, gathered into `a`: all, or each sequence's last slot.
        let mut rows = 0;
        for s in 0..b {
            let last = s + 1 == b || dec.slots[s + 1].0 != dec.slots[s].0;
            if which == Logits::All || last {
                let (dst, src) = (rows * ce, s * ce);
                dec.a[dst..dst + ce].copy_from_slice(&dec.x[src..src + ce]);
                rows += 1;
            }
        }
        dec.a[..rows * ce].chunks_exact_mut(ce).for_each(rmsnorm);
        let v = c.vocab_size;
        plan.lm_head.linear(&mut dec.logits, &dec.a, rows, ce, v);
        let inv = 1.0 / SOFTCAP;
        dec.logits[..rows * v].iter_mut().for_each(|l| *l = SOFTCAP * fast_tanh(*l * inv));
        Ok(())
    }

    /// y[s] = attention of q[s] over its sequence's cache of layer `layer` up to the slot's
    /// position, slots in parallel when the step reads enough keys to pay for the threads.
    fn attend(&self, layer: usize, b: usize, cache: &KvCache, dec: &mut Decoder) -> Result<()> {
        let c = self.config();
        let d = c.head_dim();
        let (hd, cap) = (c.n_head * d, dec.capacity);
        let window = self.windows()[layer];
        let slots = &dec.slots;
        let shape = |s: usize| DecodeAttnShape {
            h: c.n_head,
            hkv: c.n_kv_head,
            d,
            window,
            pos: slots[s].1,
        };
        let q = &dec.q;
        let one = |s: usize, y: &mut [f32], scores: &mut [f32]| {
            let (kc, vc) = cache.layer_kv(layer, slots[s].0);
            let (k, v) = (kc.data(), vc.data());
            attention_decode(y, &q[s * hd..(s + 1) * hd], &k, &v, shape(s), scores);
        };
        let work: usize = slots[..b].iter().map(|&(_, pos)| (pos + 1).min(window) * hd * 2).sum();
        if b == 1 || work < PAR_MACS / 2 {
            let ys = dec.y[..b * hd].chunks_exact_mut(hd);
            let scores = dec.scores[..b * cap].chunks_exact_mut(cap);
            ys.zip(scores).enumerate().for_each(|(s, (y, sc))| one(s, y, sc));
        } else {
            let ys = dec.y[..b * hd].par_chunks_exact_mut(hd);
            let scores = dec.scores[..b * cap].par_chunks_exact_mut(cap);
            ys.zip(scores).enumerate().for_each(|(s, (y, sc))| vectorized(|| one(s, y, sc)));
        }
        Ok(())
    }
}

fn add(x: &mut [f32], t: &[f32]) {
    x.iter_mut().zip(t).for_each(|(x, &t)| *x += t);
}
