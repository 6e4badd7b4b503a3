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
//! On a GPU model `decode_step` runs `forward_cached` instead, so callers need one code path.
use femtochat_engine::{Device, Ids, RMSNORM_EPS, Tensor};
use femtochat_kernels::cpu::attention_decode::{DecodeAttnShape, attention_decode, dot};
use femtochat_kernels::cpu::matvec::{PAR_MACS, matvec_nt};
use femtochat_kernels::cpu::rope::rope_tables;
use femtochat_kernels::cpu::simd::{fast_exp, fast_tanh, vectorized};
use rayon::prelude::*;

use crate::config::{SMEAR_GATE_CHANNELS, VE_GATE_CHANNELS};
use crate::error::{ModelError, Result};
use crate::gpt::{Gpt, QK_SCALE, ROPE_BASE, SOFTCAP};
use crate::kv_cache::KvCache;

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

/// Parameter handles and rotary tables of the decode step, resolved once per model (looking
/// parameters up by name would format strings, i.e. allocate, every step).
pub(crate) struct DecodePlan {
    wte: Tensor,
    lm_head: Tensor,
    smear_gate: Tensor,
    scalars: Tensor, // resid_lambdas (L), x0_lambdas (L), smear_lambda, backout_lambda
    layers: Vec<LayerWeights>,
    /// cos, sin (positions, D/2), as `RopeTable` builds them.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

struct LayerWeights {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj: Tensor,
    fc: Tensor,
    mlp_proj: Tensor,
    /// value_embeds.i and attn.ve_gate, on layers that have them.
    ve: Option<(Tensor, Tensor)>,
}

impl DecodePlan {
    pub(crate) fn new(gpt: &Gpt) -> Result<DecodePlan> {
        let c = gpt.config();
        let p = |n: &str| -> Result<Tensor> { Ok(gpt.params().get(n)?.clone()) };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let l = |n: &str| p(&format!("transformer.h.{i}.{n}"));
            let ve = if c.has_value_embed(i) {
                Some((p(&format!("value_embeds.{i}.weight"))?, l("attn.ve_gate.weight")?))
            } else {
                None
            };
            layers.push(LayerWeights {
                q: l("attn.c_q.weight")?,
                k: l("attn.c_k.weight")?,
                v: l("attn.c_v.weight")?,
                proj: l("attn.c_proj.weight")?,
                fc: l("mlp.c_fc.weight")?,
                mlp_proj: l("mlp.c_proj.weight")?,
                ve,
            });
        }
        let mut scalars = p("resid_lambdas")?.to_vec();
        scalars.extend(p("x0_lambdas")?.to_vec());
        scalars.push(p("smear_lambda")?.item()?);
        scalars.push(p("backout_lambda")?.item()?);
        let (t_max, d) = (gpt.max_positions(), c.head_dim());
        let (mut cos, mut sin) = (vec![0.0; t_max * d / 2], vec![0.0; t_max * d / 2]);
        rope_tables(&mut cos, &mut sin, t_max, d, ROPE_BASE);
        Ok(DecodePlan {
            wte: p("transformer.wte.weight")?,
            lm_head: p("lm_head.weight")?,
            smear_gate: p("smear_gate.weight")?,
            scalars: Tensor::from_vec(scalars.clone(), &[scalars.len()])?,
            layers,
            cos,
            sin,
        })
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
    capacity: usize,
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

    fn ensure(&mut self, gpt: &Gpt, rows: usize, capacity: usize) {
        if rows <= self.rows && capacity <= self.capacity {
            return;
        }
        let c = gpt.config();
        let (b, ce, d) = (rows.max(self.rows), c.n_embd, c.head_dim());
        let cap = capacity.max(self.capacity);
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
            (&mut self.logits, b * c.vocab_size),
            (&mut self.scores, b * cap),
        ] {
            buf.resize(n, 0.0);
        }
        self.rows = b;
        self.capacity = cap;
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

/// out (B, N) = x (B, K) · W[..N] (N, K)^T.
fn linear(out: &mut [f32], x: &[f32], w: &[f32], b: usize, k: usize, n: usize) {
    matvec_nt(&mut out[..b * n], &x[..b * k], &w[..n * k], b, k, n);
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
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= v) {
            return Err(ModelError::TokenOutOfRange { id, vocab: v });
        }
        cache.check_room(1)?;
        dec.ensure(self, b, cache.capacity());
        if self.device() != Device::Cpu || !cache.on_host() {
            let ids = Ids::new(tokens.to_vec(), &[b, 1])?;
            let logits = self.forward_cached(&ids, cache)?.try_to_vec()?;
            dec.logits[..b * v].copy_from_slice(&logits);
            return Ok(&dec.logits[..b * v]);
        }
        let plan = self.decode_plan()?;
        let half = c.head_dim() / 2;
        if (0..b).any(|r| (cache.position(r) + 1) * half > plan.cos.len()) {
            return Err(ModelError::ContextFull {
                pos: cache.position(0),
                len: 1,
                capacity: self.max_positions(),
            });
        }
        let mut step = || vectorized(|| self.decode_cpu(plan, tokens, cache, dec));
        if rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none() {
            // Run the whole step on a pool thread: its kernels' parallel loops then start from
            // inside the pool (the other threads are still spinning from the last one) instead
            // of each handing work across threads and sleeping until it returns.
            rayon::scope(|_| step())?;
        } else {
            step()?;
        }
        cache.advance(1);
        Ok(&dec.logits[..b * v])
    }

    // Inlined into `decode_step`'s `vectorized` call, so its loops compile for AVX2 + FMA.
    #[inline(always)]
    fn decode_cpu(
        &self,
        plan: &DecodePlan,
        tokens: &[u32],
        cache: &mut KvCache,
        dec: &mut Decoder,
    ) -> Result<()> {
        let c = self.config();
        let b = tokens.len();
        let (ce, nl, d) = (c.n_embd, c.n_layer, c.head_dim());
        let (hd, kvd, half) = (c.n_head * d, c.n_kv_head * d, d / 2);
        let scalars = plan.scalars.data();
        let (rl, xl) = (&scalars[..nl], &scalars[nl..2 * nl]);
        let (smear_lambda, backout_lambda) = (scalars[2 * nl], scalars[2 * nl + 1]);

        // Embedding, norm, smear with the row's previous embedding (which this token replaces).
        {
            let wte = plan.wte.data();
            let sg = plan.smear_gate.data();
            for (r, &tok) in tokens.iter().enumerate() {
                let x = &mut dec.x[r * ce..(r + 1) * ce];
                x.copy_from_slice(&wte[tok as usize * ce..(tok as usize + 1) * ce]);
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
            linear(&mut dec.q, &dec.a, &lw.q.data(), b, ce, hd);
            linear(&mut dec.k, &dec.a, &lw.k.data(), b, ce, kvd);
            linear(&mut dec.v, &dec.a, &lw.v.data(), b, ce, kvd);
            if let Some((table, gate)) = &lw.ve {
                let (table, gate) = (table.data(), gate.data());
                for (r, &tok) in tokens.iter().enumerate() {
                    let a = &dec.a[r * ce..r * ce + VE_GATE_CHANNELS];
                    let ve = &table[tok as usize * kvd..(tok as usize + 1) * kvd];
                    let vr = &mut dec.v[r * kvd..(r + 1) * kvd];
                    for (hk, (vh, eh)) in vr.chunks_exact_mut(d).zip(ve.chunks_exact(d)).enumerate()
                    {
                        let gw = &gate[hk * VE_GATE_CHANNELS..(hk + 1) * VE_GATE_CHANNELS];
                        let g = 3.0 * sigmoid(dot(a, gw));
                        vh.iter_mut().zip(eh).for_each(|(x, &e)| *x += g * e);
                    }
                }
            }
            // Rope + QK norm, then the new key and value into each row's cache.
            for r in 0..b {
                let pos = cache.position(r);
                let (cs, sn) = (
                    &plan.cos[pos * half..(pos + 1) * half],
                    &plan.sin[pos * half..(pos + 1) * half],
                );
                rope_norm(&mut dec.q[r * hd..(r + 1) * hd], d, cs, sn);
                rope_norm(&mut dec.k[r * kvd..(r + 1) * kvd], d, cs, sn);
                let (kc, vc) = cache.layer_kv(i, r);
                for (buf, new) in [(kc, &dec.k), (vc, &dec.v)] {
                    buf.with_data_mut(|cb| {
                        cb[pos * kvd..(pos + 1) * kvd].copy_from_slice(&new[r * kvd..(r + 1) * kvd])
                    })?;
                }
            }
            self.attend(i, b, cache, dec)?;
            linear(&mut dec.t, &dec.y, &lw.proj.data(), b, hd, ce);
            add(&mut dec.x[..b * ce], &dec.t[..b * ce]);
            dec.a[..b * ce].copy_from_slice(&dec.x[..b * ce]);
            dec.a[..b * ce].chunks_exact_mut(ce).for_each(rmsnorm);
            linear(&mut dec.hid, &dec.a, &lw.fc.data(), b, ce, 4 * ce);
            dec.hid[..b * 4 * ce].iter_mut().for_each(|h| {
                let r = h.max(0.0);
                *h = r * r
            });
            linear(&mut dec.t, &dec.hid, &lw.mlp_proj.data(), b, 4 * ce, ce);
            add(&mut dec.x[..b * ce], &dec.t[..b * ce]);
            if i == nl / 2 {
                dec.xb[..b * ce].copy_from_slice(&dec.x[..b * ce]);
            }
        }
        for (x, xb) in dec.x[..b * ce].iter_mut().zip(&dec.xb[..b * ce]) {
            *x -= backout_lambda * xb;
        }
        dec.x[..b * ce].chunks_exact_mut(ce).for_each(rmsnorm);
        let v = c.vocab_size;
        linear(&mut dec.logits, &dec.x, &plan.lm_head.data(), b, ce, v);
        let inv = 1.0 / SOFTCAP;
        dec.logits[..b * v].iter_mut().for_each(|l| *l = SOFTCAP * fast_tanh(*l * inv));
        Ok(())
    }

    /// y[r] = attention of q[r] over row r's cache of layer `layer`, rows in parallel when the
    /// step reads enough keys to pay for the threads.
    fn attend(&self, layer: usize, b: usize, cache: &KvCache, dec: &mut Decoder) -> Result<()> {
        let c = self.config();
        let d = c.head_dim();
        let (hd, cap) = (c.n_head * d, dec.capacity);
        let window = self.windows()[layer];
        let shape = |r: usize| DecodeAttnShape {
            h: c.n_head,
            hkv: c.n_kv_head,
            d,
            window,
            pos: cache.position(r),
        };
        let q = &dec.q;
        let one = |r: usize, y: &mut [f32], scores: &mut [f32]| {
            let (kc, vc) = cache.layer_kv(layer, r);
            let (k, v) = (kc.data(), vc.data());
            attention_decode(y, &q[r * hd..(r + 1) * hd], &k, &v, shape(r), scores);
        };
        let work: usize = (0..b).map(|r| (cache.position(r) + 1).min(window) * hd * 2).sum();
        if b == 1 || work < PAR_MACS / 2 {
            let ys = dec.y[..b * hd].chunks_exact_mut(hd);
            let scores = dec.scores[..b * cap].chunks_exact_mut(cap);
            ys.zip(scores).enumerate().for_each(|(r, (y, s))| one(r, y, s));
        } else {
            let ys = dec.y[..b * hd].par_chunks_exact_mut(hd);
            let scores = dec.scores[..b * cap].par_chunks_exact_mut(cap);
            ys.zip(scores).enumerate().for_each(|(r, (y, s))| vectorized(|| one(r, y, s)));
        }
        Ok(())
    }
}

fn add(x: &mut [f32], t: &[f32]) {
    x.iter_mut().zip(t).for_each(|(x, &t)| *x += t);
}
