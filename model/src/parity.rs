//! Parity with the PyTorch reference: load a fixture case (`<case>.safetensors` + `<case>.json`,
//! the format of `shared/fixtures/model/`) and compare logits, loss, every gradient, the
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
/// exp/tanh are the driver's).
pub const TOL_GPU: f64 = 1e-3;

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

    fn i64(&self, name: &str) -> Result<&[i64]> {
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
        let mut params = ParamStore::new();
        for (n, (shape, data)) in &self.f32s {
            if let Some(name) = n.strip_prefix("param.") {
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
    Ok(checks)
}
