//! The nanochat GPT (docs/reference.md §3) on engine ops: one forward for training and scoring, one
//! cached forward for prefill and batched one-token decode. Both share the per-layer code, so the
//! two paths cannot drift apart; the fixtures check that they agree.
use std::sync::Arc;

use femtochat_engine::{
    Device, EngineError, Ids, ParamStore, RMSNORM_EPS, Reduction, RopeTable, Tensor,
    is_grad_enabled, no_grad,
};

use crate::config::{GPTConfig, SMEAR_GATE_CHANNELS as SMEAR_CHANNELS, VE_GATE_CHANNELS};
use crate::decode::{DecodeCell, DecodePlan};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::recompute::Recompute;
use crate::rng::Rng;
use crate::weights::{BF16_ENGINE, WeightDtype};

/// RoPE base of nanochat.
pub(crate) const ROPE_BASE: f32 = 100_000.0;
/// nanochat precomputes rotary tables for 10x the training context, so generation may run past it.
const ROPE_LEN_FACTOR: usize = 10;
/// Logits are soft-capped to (-15, 15).
pub(crate) const SOFTCAP: f32 = 15.0;
/// Logits the loss computes at once, in floats (1 GiB). Past it the rows go through the lm head
/// and the cross-entropy in chunks: a d12 batch of 8 x 2048 rows x 65536 logits is exactly 4 GiB,
/// one byte over the largest storage buffer a Vulkan GPU binds (2^32 - 1 bytes on NVIDIA).
const LOSS_CHUNK_FLOATS: usize = 1 << 28;
/// QK-norm output scale.
pub(crate) const QK_SCALE: f32 = 1.2;

/// Names and shapes of every parameter, in nanochat's state-dict naming (docs/reference.md §2).
pub fn param_shapes(c: &GPTConfig) -> Vec<(String, Vec<usize>)> {
    let (ce, d, vp) = (c.n_embd, c.head_dim(), c.padded_vocab_size());
    let (hd, kvd) = (c.n_head * d, c.n_kv_head * d);
    let mut out = vec![("transformer.wte.weight".to_string(), vec![vp, ce])];
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        out.push((format!("{p}.attn.c_q.weight"), vec![hd, ce]));
        out.push((format!("{p}.attn.c_k.weight"), vec![kvd, ce]));
        out.push((format!("{p}.attn.c_v.weight"), vec![kvd, ce]));
        out.push((format!("{p}.attn.c_proj.weight"), vec![ce, hd]));
        out.push((format!("{p}.mlp.c_fc.weight"), vec![4 * ce, ce]));
        out.push((format!("{p}.mlp.c_proj.weight"), vec![ce, 4 * ce]));
        if c.has_value_embed(i) {
            out.push((format!("{p}.attn.ve_gate.weight"), vec![c.n_kv_head, VE_GATE_CHANNELS]));
            out.push((format!("value_embeds.{i}.weight"), vec![vp, kvd]));
        }
    }
    out.push(("lm_head.weight".to_string(), vec![vp, ce]));
    out.push(("resid_lambdas".to_string(), vec![c.n_layer]));
    out.push(("x0_lambdas".to_string(), vec![c.n_layer]));
    out.push(("smear_gate.weight".to_string(), vec![1, SMEAR_CHANNELS]));
    out.push(("smear_lambda".to_string(), vec![1]));
    out.push(("backout_lambda".to_string(), vec![1]));
    out
}

/// The model: config, named parameters and the derived tables it runs with. A clone shares the
/// parameters.
#[derive(Clone)]
pub struct Gpt {
    config: GPTConfig,
    params: ParamStore,
    rope: RopeTable,
    windows: Vec<usize>,
    /// What the training forward recomputes in the backward (not part of the model itself).
    recompute: Recompute,
    /// The fast decode step's weight handles and tables, built on its first use.
    decode: DecodeCell,
    /// A plan that owns the weight matrices (bf16 inference weights, `weights.rs`): then the
    /// parameter store holds only the small parameters. Shared by clones.
    owned_plan: Option<Arc<DecodePlan>>,
}

impl std::fmt::Debug for Gpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt")
            .field("config", &self.config)
            .field("params", &self.params.numel())
            .finish_non_exhaustive()
    }
}

/// What attention reads in one forward: the whole sequence (training), or per-row KV caches.
enum AttnMode<'a> {
    Full,
    Cached(&'a mut KvCache),
}

impl Gpt {
    /// Wrap named parameters, checking that exactly the expected names and shapes are present.
    pub fn from_params(config: GPTConfig, params: ParamStore) -> Result<Gpt> {
        config.validate()?;
        let expected = param_shapes(&config);
        for (name, shape) in &expected {
            let t =
                params.get(name).map_err(|_| ModelError::MissingParam { name: name.clone() })?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::ParamShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: t.shape().to_vec(),
                });
            }
        }
        if let Some(extra) = params.names().find(|n| !expected.iter().any(|(e, _)| e == n)) {
            return Err(ModelError::UnexpectedParam { name: extra.to_string() });
        }
        let rope =
            RopeTable::new(config.sequence_len * ROPE_LEN_FACTOR, config.head_dim(), ROPE_BASE)?;
        let windows = config.window_sizes();
        Ok(Gpt {
            config,
            params,
            rope,
            windows,
            recompute: Recompute::None,
            decode: DecodeCell::default(),
            owned_plan: None,
        })
    }

    /// A freshly initialised model (docs/reference.md §4), reproducible from `seed`.
    pub fn init(config: GPTConfig, seed: u64) -> Result<Gpt> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let n = config.n_layer;
        let s = 3f32.sqrt() / (config.n_embd as f32).sqrt();
        let mut params = ParamStore::new();
        for (name, shape) in param_shapes(&config) {
            let numel: usize = shape.iter().product();
            let mut fill = |f: &mut dyn FnMut(&mut Rng) -> f32| -> Vec<f32> {
                (0..numel).map(|_| f(&mut rng)).collect()
            };
            let data = match name.as_str() {
                "transformer.wte.weight" => fill(&mut |r| 0.8 * r.normal()),
                "lm_head.weight" => fill(&mut |r| 0.001 * r.normal()),
                "resid_lambdas" => {
                    (0..n).map(|i| 1.15 - 0.10 * i as f32 / (n - 1).max(1) as f32).collect()
                }
                "x0_lambdas" => {
                    (0..n).map(|i| 0.20 - 0.15 * i as f32 / (n - 1).max(1) as f32).collect()
                }
                "smear_gate.weight" => fill(&mut |r| r.uniform(0.0, 0.02)),
                "smear_lambda" => vec![0.0],
                "backout_lambda" => vec![0.2],
                n if n.starts_with("value_embeds.") => fill(&mut |r| r.uniform(-s, s)),
                n if n.ends_with("attn.ve_gate.weight") => fill(&mut |r| r.uniform(0.0, 0.02)),
                n if n.ends_with("c_proj.weight") => vec![0.0; numel],
                n if n.ends_with("mlp.c_fc.weight") => fill(&mut |r| r.uniform(-0.4 * s, 0.4 * s)),
                // c_q, c_k, c_v
                _ => fill(&mut |r| r.uniform(-s, s)),
            };
            params.insert(name, Tensor::param(data, &shape)?);
        }
        Gpt::from_params(config, params)
    }

    pub fn config(&self) -> &GPTConfig {
        &self.config
    }

    /// Checkpoint parts of the training forward (see `Recompute`); gradients are unchanged (on
    /// the CPU bit for bit), only memory and time differ.
    pub fn set_recompute(&mut self, r: Recompute) {
        self.recompute = r;
    }

    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// This model with every parameter on `device` (the rotary tables follow on first use).
    pub fn to_device(&self, device: Device) -> Result<Gpt> {
        if self.owned_plan.is_some() {
            // A bf16 model lives on the CPU: staying there is a no-op, leaving it an error.
            return match device {
                Device::Cpu => Ok(self.clone()),
                _ => self.engine_only().map(|_| self.clone()),
            };
        }
        device.ensure_available()?;
        let mut g = Gpt::from_params(self.config.clone(), self.params.to_device(device)?)?;
        g.recompute = self.recompute;
        Ok(g)
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.params.iter().next().map(|(_, t)| t.device()).unwrap_or_default()
    }

    /// Longest position the rotary tables cover (a KV cache may not grow past it).
    pub fn max_positions(&self) -> usize {
        self.rope.max_len()
    }

    /// Attention window of every layer.
    pub(crate) fn windows(&self) -> &[usize] {
        &self.windows
    }

    /// The decode step's plan: the owned one, or one over the f32 parameters built on first use.
    pub(crate) fn decode_plan(&self) -> Result<&DecodePlan> {
        if let Some(p) = &self.owned_plan {
            return Ok(p);
        }
        if let Some(p) = self.decode.0.get() {
            return Ok(p);
        }
        let plan = DecodePlan::new(self, WeightDtype::F32)?;
        Ok(self.decode.0.get_or_init(|| plan))
    }

    /// The plan holding this model's weight matrices, when it is a bf16 model.
    pub(crate) fn owned_plan(&self) -> Option<&DecodePlan> {
        self.owned_plan.as_deref()
    }

    /// This model with `params` (the small ones) and the matrices in `plan`.
    pub(crate) fn with_owned_plan(&self, params: ParamStore, plan: Arc<DecodePlan>) -> Gpt {
        Gpt { params, owned_plan: Some(plan), decode: DecodeCell::default(), ..self.clone() }
    }

    /// An error for a path that needs the weights as f32 engine tensors.
    pub(crate) fn engine_only(&self) -> Result<()> {
        match self.owned_plan {
            Some(_) => Err(ModelError::Invalid(BF16_ENGINE.into())),
            None => Ok(()),
        }
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.engine_only()?;
        Ok(self.params.get(name)?)
    }

    /// Logits (B, T, V) for token ids (B, T).
    pub fn forward(&self, idx: &Ids) -> Result<Tensor> {
        self.all_logits(&self.trunk(idx, AttnMode::Full)?)
    }

    /// Cross-entropy of the next-token predictions against `targets` (B*T, -1 ignored): a scalar
    /// for `Reduction::Mean`, per-token losses (B*T) for `Reduction::None` (bits per byte).
    pub fn loss(&self, idx: &Ids, targets: &[i32], reduction: Reduction) -> Result<Tensor> {
        self.loss_in_chunks(idx, targets, reduction, self.loss_chunk_rows(idx.len()))
    }

    /// The rows per lm-head chunk `loss` uses for `rows` tokens: at most `LOSS_CHUNK_FLOATS`
    /// logits; with a recomputed head (`Recompute::All`), equal chunks of at most about one
    /// block's activations (32 C floats per token; half that for `Sublayers`) of logits, so
    /// rebuilding a chunk in the backward does not set the peak. (Chunking sums the loss per chunk: the same gradients up
    /// to rounding.)
    pub fn loss_chunk_rows(&self, rows: usize) -> usize {
        loss_chunk_rows(&self.config, self.recompute, rows)
    }

    /// `loss`, with the lm head and the cross-entropy run on at most `chunk_rows` of the B*T
    /// rows at a time, so no logits buffer exceeds chunk_rows x V. The mean is the sum of the
    /// chunks' losses over the count of non-ignored targets (NaN when there are none, as one
    /// chunk's mean).
    pub fn loss_in_chunks(
        &self,
        idx: &Ids,
        targets: &[i32],
        reduction: Reduction,
        chunk_rows: usize,
    ) -> Result<Tensor> {
        let x = self.trunk(idx, AttnMode::Full)?; // (B, T, C)
        let (b, t, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        if targets.len() != b * t {
            return Err(ModelError::Invalid(format!(
                "{} targets for {b}x{t} inputs",
                targets.len()
            )));
        }
        let x = x.reshape(&[b * t, c])?;
        let rows = b * t;
        let chunk = chunk_rows.max(1);
        let recompute_head = self.recompute.head() && is_grad_enabled();
        // head + loss of rows of x, as a checkpointed segment (keeping only those (n, C) rows;
        // the (n, V) logits are rebuilt in the backward) or not.
        let head_loss = |x: Tensor, targets: &[i32], reduction: Reduction| -> Result<Tensor> {
            if !recompute_head {
                return Ok(self.head(&x)?.cross_entropy(targets, reduction)?);
            }
            let (me, targets) = (self.clone(), targets.to_vec());
            Ok(Tensor::checkpoint(&[x], move |xs| {
                me.head(&xs[0]).map_err(into_engine)?.cross_entropy(&targets, reduction)
            })?)
        };
        if rows <= chunk {
            return head_loss(x, targets, reduction);
        }
        let mut parts = Vec::with_capacity(rows.div_ceil(chunk));
        for r0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - r0);
            parts.push(head_loss(x.narrow(0, r0, n)?, &targets[r0..r0 + n], Reduction::None)?);
        }
        let losses = Tensor::cat(&parts, 0)?; // (B*T)
        Ok(match reduction {
            Reduction::None => losses,
            Reduction::Mean => {
                let counted = targets.iter().filter(|&&y| y >= 0).count();
                losses.sum()?.scale(1.0 / counted as f32)?
            }
        })
    }

    /// Logits (P, V) at the flat positions `b * T + t` of token ids (B, T): the trunk over every
    /// position, the lm head only where asked. Scoring a few positions of long prompts (CORE)
    /// skips most of the lm head, a large share of a forward at a big vocabulary. No graph is
    /// recorded.
    pub fn logits_at(&self, idx: &Ids, positions: &[u32]) -> Result<Tensor> {
        let _g = no_grad();
        let x = self.trunk(idx, AttnMode::Full)?; // (B, T, C)
        self.head_at(&x, positions)
    }

    /// `forward_cached` with the lm head only at the flat positions `b * T + t` of `idx`:
    /// logits (P, V).
    pub fn forward_cached_at(
        &self,
        idx: &Ids,
        cache: &mut KvCache,
        positions: &[u32],
    ) -> Result<Tensor> {
        let _g = no_grad();
        let x = self.trunk_cached(idx, cache)?;
        self.head_at(&x, positions)
    }

    /// Logits (P, V) of the hidden states (B, T, C) at flat positions.
    fn head_at(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let (b, t, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        if positions.is_empty() {
            return Ok(Tensor::zeros(&[0, self.config.vocab_size]));
        }
        let rows = Ids::new(positions.to_vec(), &[positions.len()])?;
        let x = Tensor::embedding(&x.reshape(&[b * t, c])?, &rows)?; // (P, C)
        self.head(&x)
    }

    /// Append `idx` (B, T) to the B rows of `cache` (each at its own position) and return the
    /// logits (B, T, V) of the new positions. T = 1 is a batched decode step; B = 1 with a long T
    /// is a prefill. No graph is recorded.
    pub fn forward_cached(&self, idx: &Ids, cache: &mut KvCache) -> Result<Tensor> {
        if self.owned_plan.is_some() {
            return self.extend(idx, cache, false);
        }
        let _g = no_grad();
        self.all_logits(&self.trunk_cached(idx, cache)?)
    }

    /// `forward_cached` with the lm head on the last new position of each row only: logits
    /// (B, V), equal to the last position of `forward_cached`'s. What a prefill needs to sample
    /// the first token, without (B, T, V) logits (gigabytes for a long prompt and a large vocab).
    pub fn forward_cached_last(&self, idx: &Ids, cache: &mut KvCache) -> Result<Tensor> {
        if self.owned_plan.is_some() {
            return self.extend(idx, cache, true);
        }
        let _g = no_grad();
        let x = self.trunk_cached(idx, cache)?; // (B, T, C)
        let (b, t, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        self.head(&x.narrow(1, t - 1, 1)?.reshape(&[b, c])?) // (B, V)
    }

    /// The trunk over a KV cache: appends `idx` (B, T) to the rows, returns (B, T, C).
    fn trunk_cached(&self, idx: &Ids, cache: &mut KvCache) -> Result<Tensor> {
        let &[b, t] = idx.shape() else {
            return Err(ModelError::Invalid(format!(
                "token ids must be (B, T), got {:?}",
                idx.shape()
            )));
        };
        if b != cache.rows() {
            return Err(ModelError::Invalid(format!(
                "{b} rows of tokens for {} cache rows",
                cache.rows()
            )));
        }
        cache.check_room(t)?;
        let x = self.trunk(idx, AttnMode::Cached(cache))?;
        cache.advance(t);
        Ok(x)
    }

    /// The lm head on every position of the trunk's output (B, T, C): logits (B, T, V).
    fn all_logits(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        Ok(self.head(x)?.reshape(&[b, t, self.config.vocab_size])?)
    }

    /// Logits (.., V) of normed final hidden states (.., C): the lm head, cut to the true vocab,
    /// softcapped.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let logits = x.linear(self.p("lm_head.weight")?)?; // (.., Vp)
        Ok(logits.narrow(-1, 0, self.config.vocab_size)?.softcap(SOFTCAP)?)
    }

    /// Embeddings, smear, the layers, backout and the final norm: (B, T, C).
    fn trunk(&self, idx: &Ids, mut mode: AttnMode) -> Result<Tensor> {
        let c = &self.config;
        if idx.shape().len() != 2 || idx.is_empty() {
            return Err(ModelError::Invalid(format!(
                "token ids must be (B, T), got {:?}",
                idx.shape()
            )));
        }
        if let Some(&id) = idx.data().iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab: c.vocab_size });
        }
        let norm = |x: &Tensor| x.rmsnorm(RMSNORM_EPS);

        let x = norm(&Tensor::embedding(self.p("transformer.wte.weight")?, idx)?)?; // (B, T, C)
        let mut x = self.smear(&x, &mut mode)?;
        let x0 = x.clone();
        let mut backout = None;
        let cut = c.n_layer / 2;
        let segments = match mode {
            AttnMode::Full if is_grad_enabled() => self.recompute.segments(c.n_layer, cut),
            _ => Vec::new(),
        };
        if segments.is_empty() {
            for i in 0..c.n_layer {
                x = self.block(i, &x, &x0, idx, &mut mode)?;
                if i == cut {
                    backout = Some(x.clone());
                }
            }
        } else {
            // One shared copy of the model for the segments' closures (they outlive this call).
            let me = Arc::new(self.clone());
            for (start, end) in segments {
                if self.recompute.sublayers() {
                    // Single-block segments, each split into its two halves.
                    let (m, idx) = (me.clone(), idx.clone());
                    x = Tensor::checkpoint(&[x, x0.clone()], move |xs| {
                        m.attn_half(start, &xs[0], &xs[1], &idx, &mut AttnMode::Full)
                            .map_err(into_engine)
                    })?;
                    let m = me.clone();
                    x = Tensor::checkpoint(&[x], move |xs| {
                        m.mlp_half(start, &xs[0]).map_err(into_engine)
                    })?;
                    if start == cut {
                        backout = Some(x.clone());
                    }
                    continue;
                }
                let (me, idx) = (me.clone(), idx.clone());
                x = Tensor::checkpoint(&[x, x0.clone()], move |xs| {
                    let mut x = xs[0].clone();
                    for i in start..end {
                        x = me
                            .block(i, &x, &xs[1], &idx, &mut AttnMode::Full)
                            .map_err(into_engine)?;
                    }
                    Ok(x)
                })?;
                if (start..end).contains(&cut) {
                    backout = Some(x.clone());
                }
            }
        }
        // n_layer >= 1 is validated, so the backout layer exists.
        let xb = backout.ok_or_else(|| ModelError::Config("n_layer must be >= 1".into()))?;
        x = x.sub(&self.p("backout_lambda")?.mul(&xb)?)?;
        Ok(norm(&x)?)
    }

    /// x[:, t] += smear_lambda * sigmoid(x[:, t, :24] . smear_gate) * x[:, t-1], from the
    /// pre-smear x. With a cache, position 0 of a row smears with the row's previous embedding.
    fn smear(&self, x: &Tensor, mode: &mut AttnMode) -> Result<Tensor> {
        let (b, t, ce) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let gate_of = |cur: &Tensor| -> Result<Tensor> {
            let g = cur.narrow(-1, 0, SMEAR_CHANNELS)?.linear(self.p("smear_gate.weight")?)?;
            Ok(g.sigmoid()?.mul(self.p("smear_lambda")?)?) // (B, T', 1)
        };
        match mode {
            AttnMode::Full => {
                if t == 1 {
                    return Ok(x.clone());
                }
                let cur = x.narrow(1, 1, t - 1)?;
                let prev = x.narrow(1, 0, t - 1)?;
                let smeared = cur.add(&gate_of(&cur)?.mul(&prev)?)?;
                Ok(Tensor::cat(&[x.narrow(1, 0, 1)?, smeared], 1)?)
            }
            AttnMode::Cached(cache) => {
                // prev (B, T, C): the cached embedding (zeros at a row's first position, which
                // leaves it unchanged) followed by this chunk's own embeddings shifted by one.
                let first = Tensor::from_vec(cache.prev_embeddings(ce), &[b, 1, ce])?
                    .to_device(x.device())?;
                let prev =
                    if t == 1 { first } else { Tensor::cat(&[first, x.narrow(1, 0, t - 1)?], 1)? };
                let last = x.narrow(1, t - 1, 1)?.try_to_vec()?;
                cache.set_prev_embeddings(&last, ce);
                Ok(x.add(&gate_of(x)?.mul(&prev)?)?)
            }
        }
    }

    /// One transformer layer: x = lambdas mix; x += attn(norm(x)); x += mlp(norm(x)).
    fn block(
        &self,
        i: usize,
        x: &Tensor,
        x0: &Tensor,
        idx: &Ids,
        mode: &mut AttnMode,
    ) -> Result<Tensor> {
        self.mlp_half(i, &self.attn_half(i, x, x0, idx, mode)?)
    }

    /// The first half of layer i: x = lambdas mix; x += attn(norm(x)).
    fn attn_half(
        &self,
        i: usize,
        x: &Tensor,
        x0: &Tensor,
        idx: &Ids,
        mode: &mut AttnMode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let (h, hkv, d) = (c.n_head, c.n_kv_head, c.head_dim());
        let l = |n: &str| self.p(&format!("transformer.h.{i}.{n}"));
        let norm = |x: &Tensor| x.rmsnorm(RMSNORM_EPS);

        let rl = self.p("resid_lambdas")?.narrow(0, i, 1)?;
        let xl = self.p("x0_lambdas")?.narrow(0, i, 1)?;
        let x = rl.mul(x)?.add(&xl.mul(x0)?)?;
        let a = norm(&x)?;
        let q = a.linear(l("attn.c_q.weight")?)?.reshape(&[b, t, h, d])?;
        let k = a.linear(l("attn.c_k.weight")?)?.reshape(&[b, t, hkv, d])?;
        let mut v = a.linear(l("attn.c_v.weight")?)?.reshape(&[b, t, hkv, d])?;
        if c.has_value_embed(i) {
            let ve = Tensor::embedding(self.p(&format!("value_embeds.{i}.weight"))?, idx)?;
            let ve = ve.reshape(&[b, t, hkv, d])?;
            // The gate reads the attention input norm(x), not x: only that matches the reference
            // fixtures (docs/reference.md §3).
            let g = a.narrow(-1, 0, VE_GATE_CHANNELS)?.linear(l("attn.ve_gate.weight")?)?;
            let g = g.sigmoid()?.scale(3.0)?.reshape(&[b, t, hkv, 1])?;
            v = v.add(&g.mul(&ve)?)?;
        }
        let y = match mode {
            AttnMode::Full => {
                let q = norm(&q.rope(&self.rope, 0)?)?.scale(QK_SCALE)?;
                let k = norm(&k.rope(&self.rope, 0)?)?.scale(QK_SCALE)?;
                Tensor::attention(&q, &k, &v, self.windows[i], 0)?
            }
            AttnMode::Cached(cache) => {
                // Rows sit at different positions, so rope and attention go row by row; the
                // matmuls around them stay batched.
                let mut ys = Vec::with_capacity(b);
                for r in 0..b {
                    let pos = cache.position(r);
                    let qr = norm(&q.narrow(0, r, 1)?.rope(&self.rope, pos)?)?.scale(QK_SCALE)?;
                    let kr = norm(&k.narrow(0, r, 1)?.rope(&self.rope, pos)?)?.scale(QK_SCALE)?;
                    let (kc, vc) = cache.write(i, r, &kr, &v.narrow(0, r, 1)?)?;
                    ys.push(Tensor::attention(&qr, &kc, &vc, self.windows[i], pos)?);
                }
                if b == 1 {
                    ys.pop().unwrap_or_else(|| unreachable!())
                } else {
                    Tensor::cat(&ys, 0)?
                }
            }
        };
        let y = y.reshape(&[b, t, h * d])?.linear(l("attn.c_proj.weight")?)?;
        Ok(x.add(&y)?)
    }

    /// The second half of layer i: x += mlp(norm(x)).
    fn mlp_half(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let l = |n: &str| self.p(&format!("transformer.h.{i}.{n}"));
        let m = x.rmsnorm(RMSNORM_EPS)?.linear(l("mlp.c_fc.weight")?)?.relu2()?;
        Ok(x.add(&m.linear(l("mlp.c_proj.weight")?)?)?)
    }
}

/// `Gpt::loss_chunk_rows` of a configuration (also what the memory estimate assumes).
pub fn loss_chunk_rows(c: &GPTConfig, r: Recompute, rows: usize) -> usize {
    let vp = c.padded_vocab_size();
    let cap = (LOSS_CHUNK_FLOATS / vp).max(1);
    if !r.head() {
        return cap;
    }
    // About one recomputed segment's activations per token: a block's (~32 C), half a block's
    // under `Sublayers`.
    let seg = if r.sublayers() { 16 } else { 32 };
    let target = (rows.saturating_mul(seg * c.n_embd) / (3 * vp)).max(64).min(cap);
    // Equal chunks: the engine's recycler reuses buffers by exact length, so a smaller last
    // chunk would hold a second set of logits buffers.
    rows.div_ceil(rows.div_ceil(target).max(1)).max(1)
}

/// A model error raised inside a checkpointed segment, as the engine error the segment returns.
fn into_engine(e: ModelError) -> EngineError {
    match e {
        ModelError::Engine(e) => e,
        other => EngineError::Invalid { op: "checkpointed segment", msg: other.to_string() },
    }
}
