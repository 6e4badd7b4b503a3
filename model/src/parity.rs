//! Parity with the PyTorch reference: load a fixture case (`<case>.safetensors` + `<case>.json`,
//! the format of `tests/fixtures/model/`, written by nanochat) and compare logits, loss, every gradient, the
//! parameters after one MuonAdamW step, and KV-cache decode logits. Used by the tests and by
//! `train parity`, so a new reference case needs no code.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use femtochat_engine::{Device, Ids, MuonAdamW, ParamStore, Reduction, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::config::GPTConfig;
use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::kv_cache::KvCache;
use crate::optim::{OptimizerConfig, param_groups};

/// Tolerances (relative L2 error) of the CPU backend, from the fixtures' README.
pub const TOL_OUTPUT: f64 = 1e-5;
pub const TOL_GRAD: f64 = 1e-4;
/// The GPU backend's tolerance for every quantity (its reductions sum in another order and its
/// exp/tanh are the driver's). Measured on lavapipe: at most 6.3e-6 on the model cases; the
/// bound leaves a margin of ~8x, so a real regression fails.
pub const TOL_GPU: f64 = 5e-5;
/// Tolerance of the multi-step optimizer updates (`update.<k>`), CPU and GPU: one step moves
/// a matrix by ~2%, so the update itself is compared, not the parameters.
pub const TOL_UPDATE: f64 = 1e-4;
pub const TOL_UPDATE_GPU: f64 = 1e-3;

/// One reference case.
pub struct Fixture {
    pub name: String,
    pub json: serde_json::Value,
    pub config: GPTConfig,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, Vec<i64>>,
}

fn fx_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Fixture { path: path.to_path_buf(), msg: msg.into() }
}

impl Fixture {
    /// Load `X.safetensors` and the `X.json` beside it.
    pub fn load(path: &Path) -> Result<Fixture> {
        let json_path: PathBuf = path.with_extension("json");
        let bytes = std::fs::read(path).map_err(|e| fx_err(path, format!("reading: {e}")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fx_err(path, e.to_string()))?;
        let (mut f32s, mut i64s) = (HashMap::new(), HashMap::new());
        for (n, v) in st.tensors() {
            match v.dtype() {
                Dtype::F32 => {
                    let d = v
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    f32s.insert(n, (v.shape().to_vec(), d.collect()));
                }
                Dtype::I64 => {
                    let d = v.data().chunks_exact(8).map(|b| {
                        i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                    });
                    i64s.insert(n, d.collect());
                }
                other => {
                    return Err(fx_err(
                        path,
                        format!("tensor `{n}` has unsupported dtype {other:?}"),
                    ));
                }
            }
        }
        let text =
            std::fs::read(&json_path).map_err(|e| fx_err(&json_path, format!("reading: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| fx_err(&json_path, e.to_string()))?;
        let config = serde_json::from_value(json["config"].clone())
            .map_err(|e| fx_err(&json_path, format!("config: {e}")))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Fixture { name, json, config, f32s, i64s })
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.json[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::Invalid(format!("fixture {}: `{key}` missing", self.name)))
    }

    pub fn f32(&self, name: &str) -> Result<&[f32]> {
        self.f32s.get(name).map(|(_, v)| v.as_slice()).ok_or_else(|| {
            ModelError::Invalid(format!("fixture {}: tensor `{name}` missing", self.name))
        })
    }

    /// Names of every tensor in the case.
    pub fn names(&self) -> Vec<String> {
        self.f32s.keys().chain(self.i64s.keys()).cloned().collect()
    }

    /// An integer tensor of the case (token ids).
    pub fn i64(&self, name: &str) -> Result<&[i64]> {
        self.i64s.get(name).map(Vec::as_slice).ok_or_else(|| {
            ModelError::Invalid(format!("fixture {}: tensor `{name}` missing", self.name))
        })
    }

    /// The model with the case's `param.*` weights, on `device`.
    pub fn model_on(&self, device: Device) -> Result<Gpt> {
        self.model()?.to_device(device)
    }

    /// The model with the case's `param.*` weights.
    pub fn model(&self) -> Result<Gpt> {
        self.model_with("param.")
    }

    /// The model with the weights stored under `prefix` (e.g. `step.2.`), on `device`.
    pub fn model_at(&self, prefix: &str, device: Device) -> Result<Gpt> {
        self.model_with(prefix)?.to_device(device)
    }

    fn model_with(&self, prefix: &str) -> Result<Gpt> {
        let mut params = ParamStore::new();
        for (n, (shape, data)) in &self.f32s {
            if let Some(name) = n.strip_prefix(prefix) {
                params.insert(name, Tensor::param(data.clone(), shape)?);
            }
        }
        Gpt::from_params(self.config.clone(), params)
    }
}

/// One compared quantity.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub what: String,
    pub rel_err: f64,
    pub tol: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.rel_err < self.tol
    }
}

/// ||a - b|| / ||b|| in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Gradient check with an absolute floor: where the reference gradient is ~0 (backout_lambda
/// when the backout layer is the last one, since RMSNorm is scale invariant), relative error is
/// noise, so an absolute error below 1e-8 passes.
fn grad_check(what: String, got: &[f32], want: &[f32], tol: f64) -> Check {
    let e = rel_err(got, want);
    let norm = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().sqrt();
    Check { what, rel_err: if e * norm < 1e-8 { 0.0 } else { e }, tol }
}

/// Every comparison of one case, in a stable order, on the CPU.
pub fn run(fx: &Fixture) -> Result<Vec<Check>> {
    run_on(fx, Device::Cpu)
}

/// lr · wd of the Muon group holding `name` (its effective LR: times sqrt(max(1, rows/cols))),
/// or None for an AdamW parameter.
fn muon_decay_step(opt: &MuonAdamW, name: &str, shape: &[usize], wd: f32) -> Option<f32> {
    let g = opt.groups().iter().find(|g| g.params.iter().any(|p| p == name))?;
    if !matches!(g.kind, femtochat_engine::GroupKind::Muon { .. }) || shape.len() != 2 {
        return None;
    }
    let aspect = (shape[0] as f32 / shape[1] as f32).max(1.0).sqrt();
    Some(g.lr * aspect * wd)
}

/// Cautious weight decay applies lr·wd·P only where the orthogonalised update X agrees in sign
/// with P. Where X rounds to ~0, the sign (and so the mask) is decided by rounding, and the two
/// implementations may differ there by exactly lr·wd·P, with one side's update ~0. Such elements
/// are set to the reference's value (they are counted and reported; more than one in a thousand
/// fails the check).
fn settle_mask_ties(update: &mut [f32], want: &[f32], before: &[f32], decay: f32) -> usize {
    let mut ties = 0;
    for ((u, &w), &p) in update.iter_mut().zip(want).zip(before) {
        let step = decay * p;
        let near = |a: f32, b: f32| (a - b).abs() <= 1e-3 * step.abs();
        let tie =
            step != 0.0 && ((near(*u, -step) && near(w, 0.0)) || (near(*u, 0.0) && near(w, -step)));
        if tie && (*u - w).abs() > 1e-6 * step.abs() {
            *u = w;
            ties += 1;
        }
    }
    ties
}

/// A case with several optimizer steps (`steps` in its JSON, like `optim_steps`)?
pub fn is_multi_step(fx: &Fixture) -> bool {
    fx.json["steps"].is_array()
}

/// The multi-step optimizer case: for each step k, the loss and every gradient of our model at
/// our parameters (`loss.<k>`, `grad.<k>.*`), then one MuonAdamW step with base_train's LRs and
/// the step's schedule (LR multiplier, Muon momentum and weight decay from the JSON), fed the
/// reference gradients so that errors do not compound, compared as the update
/// (`update.<k>.*`) and as the parameters (`step.<k>.*`). Every tensor of the case is used: a
/// tensor no comparison read is reported as a failed check.
pub fn run_optim_steps(fx: &Fixture, device: Device) -> Result<Vec<Check>> {
    let (tol_grad, tol_update) = match device {
        Device::Cpu => (TOL_GRAD, TOL_UPDATE),
        Device::Gpu => (TOL_GPU, TOL_UPDATE_GPU),
    };
    let bad = |m: String| ModelError::Invalid(format!("fixture {}: {m}", fx.name));
    let steps = fx.json["steps"].as_array().ok_or_else(|| bad("no `steps`".into()))?;
    let wd0 = fx.json["muon_weight_decay"]
        .as_f64()
        .ok_or_else(|| bad("no `muon_weight_decay`".into()))?;
    let (b, t) = (fx.usize("batch")?, fx.usize("T")?);
    let mut used: std::collections::HashSet<String> =
        fx.names().into_iter().filter(|n| n.starts_with("param.")).collect();
    let gpt = fx.model_on(device)?;
    let config = OptimizerConfig {
        unembedding_lr: 0.008,
        embedding_lr: 0.3,
        matrix_lr: 0.02,
        scalar_lr: 0.5,
        weight_decay: wd0 as f32,
    };
    let mut opt = MuonAdamW::new(param_groups(&fx.config, &config), gpt.params())?;
    let mut checks = Vec::new();
    for st in steps {
        let k = st["step"].as_u64().ok_or_else(|| bad("a step has no `step`".into()))?;
        let num = |key: &str| st[key].as_f64().ok_or_else(|| bad(format!("step {k}: no `{key}`")));
        let (lrm, momentum, wd) =
            (num("lr_mult")?, num("muon_momentum")?, num("muon_weight_decay")?);
        let key = |what: &str| format!("{what}.{k}");
        let idx = Ids::from_i64(fx.i64(&key("input.idx"))?, &[b, t])?;
        let targets: Vec<i32> = fx.i64(&key("input.targets"))?.iter().map(|&x| x as i32).collect();
        used.extend([key("input.idx"), key("input.targets")]);
        // The loss and gradients at the reference's parameters before this step, so that the
        // small differences of our own steps do not feed into them.
        let at_ref = if k == 1 {
            fx.model_on(device)?
        } else {
            fx.model_at(&format!("step.{}.", k - 1), device)?
        };
        let loss = at_ref.loss(&idx, &targets, Reduction::Mean)?;
        checks.push(Check {
            what: key("loss"),
            rel_err: rel_err(&loss.try_to_vec()?, fx.f32(&key("loss"))?),
            tol: tol_grad,
        });
        used.insert(key("loss"));
        let grads = loss.backward()?;
        for (name, p) in at_ref.params().iter() {
            let got = match grads.get(p) {
                Some(g) => g.try_to_vec()?,
                None => vec![0.0; p.numel()],
            };
            let g_key = format!("grad.{k}.{name}");
            checks.push(grad_check(g_key.clone(), &got, fx.f32(&g_key)?, tol_grad));
            used.insert(g_key);
        }
        drop(grads);
        let mut before = HashMap::new();
        for (name, p) in gpt.params().iter() {
            before.insert(name.to_string(), p.try_to_vec()?);
        }
        for g in opt.groups_mut() {
            g.lr = g.initial_lr * lrm as f32;
            if let femtochat_engine::GroupKind::Muon { momentum: m, .. } = &mut g.kind {
                *m = momentum as f32;
                g.weight_decay = wd as f32;
            }
        }
        opt.step_with(gpt.params(), |_, n| {
            fx.f32(&format!("grad.{k}.{n}")).ok().map(<[f32]>::to_vec)
        })?;
        for (name, p) in gpt.params().iter() {
            let after = p.try_to_vec()?;
            let mut update: Vec<f32> =
                after.iter().zip(&before[name]).map(|(a, b)| a - b).collect();
            let (u_key, s_key) = (format!("update.{k}.{name}"), format!("step.{k}.{name}"));
            let want = fx.f32(&u_key)?;
            let mut what = u_key.clone();
            if let Some(decay) = muon_decay_step(&opt, name, p.shape(), wd as f32) {
                let ties = settle_mask_ties(&mut update, want, &before[name], decay);
                if ties > 0 {
                    what = format!("{u_key} ({ties} cautious-mask ties)");
                }
                if ties > update.len() / 1000 + 1 {
                    checks.push(Check {
                        what: format!("{u_key}: {ties} mask ties"),
                        rel_err: f64::INFINITY,
                        tol: 0.0,
                    });
                }
            }
            checks.push(Check { what, rel_err: rel_err(&update, want), tol: tol_update });
            checks.push(Check {
                what: s_key.clone(),
                rel_err: rel_err(&after, fx.f32(&s_key)?),
                tol: tol_grad,
            });
            used.extend([u_key, s_key]);
        }
    }
    let mut unused: Vec<String> = fx.names().into_iter().filter(|n| !used.contains(n)).collect();
    unused.sort();
    for n in unused {
        checks.push(Check {
            what: format!("unchecked tensor {n}"),
            rel_err: f64::INFINITY,
            tol: 0.0,
        });
    }
    Ok(checks)
}

/// Every comparison of one case with the model on `device` (GPU tolerance `TOL_GPU`).
pub fn run_on(fx: &Fixture, device: Device) -> Result<Vec<Check>> {
    let (tol_out, tol_grad) = match device {
        Device::Cpu => (TOL_OUTPUT, TOL_GRAD),
        Device::Gpu => (TOL_GPU, TOL_GPU),
    };
    let mut checks = Vec::new();
    let gpt = fx.model_on(device)?;
    let (b, t) = (fx.usize("batch")?, fx.usize("T")?);
    let idx = Ids::from_i64(fx.i64("input.idx")?, &[b, t])?;
    let targets: Vec<i32> = fx.i64("input.targets")?.iter().map(|&x| x as i32).collect();

    // Derived config quantities.
    if let Some(ws) = fx.json["window_sizes"].as_array() {
        let want: Vec<f32> = ws.iter().filter_map(|w| w[0].as_f64()).map(|w| w as f32).collect();
        let got: Vec<f32> = fx.config.window_sizes().iter().map(|&w| w as f32).collect();
        checks.push(Check {
            what: "window_sizes".into(),
            rel_err: rel_err(&got, &want),
            tol: 1e-12,
        });
    }

    let logits = gpt.forward(&idx)?;
    checks.push(Check {
        what: "logits".into(),
        rel_err: rel_err(&logits.try_to_vec()?, fx.f32("output.logits")?),
        tol: tol_out,
    });
    let loss = gpt.loss(&idx, &targets, Reduction::Mean)?;
    checks.push(Check {
        what: "loss".into(),
        rel_err: rel_err(&loss.try_to_vec()?, fx.f32("output.loss")?),
        tol: tol_out,
    });
    let grads = loss.backward()?;
    for (name, p) in gpt.params().iter() {
        let got = match grads.get(p) {
            Some(g) => g.try_to_vec()?,
            None => vec![0.0; p.numel()],
        };
        let want = fx.f32(&format!("grad.{name}"))?;
        checks.push(grad_check(format!("grad.{name}"), &got, want, tol_grad));
    }

    // One optimizer step from param.* with the reference gradients, so this checks the optimizer
    // alone.
    let fresh = fx.model_on(device)?;
    let mut opt =
        MuonAdamW::new(param_groups(&fx.config, &OptimizerConfig::default()), fresh.params())?;
    opt.step_with(fresh.params(), |_, n| fx.f32(&format!("grad.{n}")).ok().map(<[f32]>::to_vec))?;
    for (name, p) in fresh.params().iter() {
        let e = rel_err(&p.try_to_vec()?, fx.f32(&format!("step1.{name}"))?);
        checks.push(Check { what: format!("step1.{name}"), rel_err: e, tol: tol_grad });
    }

    // KV cache: prefill P tokens, then decode; row k of decode.logits predicts token P + k.
    if let Ok(tokens) = fx.i64("decode.tokens") {
        let tokens: Vec<u32> = tokens.iter().map(|&x| x as u32).collect();
        let (p, d, v) = (fx.usize("prefill")?, fx.usize("decode")?, fx.config.vocab_size);
        if p == 0 || p + d > tokens.len() + 1 {
            return Err(ModelError::Invalid(format!(
                "fixture {}: bad prefill/decode sizes",
                fx.name
            )));
        }
        let mut cache = KvCache::with_rows(&fx.config, 1, p + d);
        let pre = gpt.forward_cached(&Ids::new(tokens[..p].to_vec(), &[1, p])?, &mut cache)?;
        let mut got = pre.try_to_vec()?[(p - 1) * v..].to_vec();
        for k in 1..d {
            let step = Ids::new(vec![tokens[p + k - 1]], &[1, 1])?;
            got.extend(gpt.forward_cached(&step, &mut cache)?.try_to_vec()?);
        }
        checks.push(Check {
            what: "decode.logits".into(),
            rel_err: rel_err(&got, fx.f32("decode.logits")?),
            tol: tol_out,
        });
        let n = p + d - 1;
        let full = gpt.forward(&Ids::new(tokens[..n].to_vec(), &[1, n])?)?.try_to_vec()?;
        checks.push(Check {
            what: "decode.full_logits".into(),
            rel_err: rel_err(&full[(p - 1) * v..], fx.f32("decode.full_logits")?),
            tol: tol_out,
        });
    }
    // Every tensor of the case is one of the kinds compared above.
    let known = ["param.", "grad.", "step1.", "decode."];
    let exact = ["input.idx", "input.targets", "output.logits", "output.loss"];
    let mut unknown: Vec<String> = fx
        .names()
        .into_iter()
        .filter(|n| !exact.contains(&n.as_str()) && !known.iter().any(|k| n.starts_with(k)))
        .collect();
    unknown.sort();
    for n in unknown {
        checks.push(Check {
            what: format!("unchecked tensor {n}"),
            rel_err: f64::INFINITY,
            tol: 0.0,
        });
    }
    Ok(checks)
}
