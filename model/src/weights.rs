//! Inference weights in bf16: the matrices the CPU decode and prefill read, kept as bf16 (half
//! the bytes of f32) and widened to f32 inside the kernels, so every product and sum stays f32.
//!
//! A bf16 model (`Gpt::with_weight_dtype(WeightDtype::Bf16)`) holds its matrices (embeddings,
//! attention and MLP projections, value embeddings, lm head) only in its decode plan; the f32
//! tensors are dropped, so the model takes about half the memory. The small parameters (gates,
//! per-layer scalars) stay f32 tensors. Such a model runs `decode_step`, `extend`,
//! `forward_cached` and `forward_cached_last` on the CPU; the engine paths (training, scoring,
//! the GPU) refuse it with an error saying so.
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use femtochat_engine::{Device, ParamStore, Tensor};
use femtochat_kernels::cpu::matvec::matvec_nt;
use half::bf16;

use crate::decode::DecodePlan;
use crate::error::{ModelError, Result};
use crate::gpt::{Gpt, param_shapes};

/// Storage type of a model's weight matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "fp32",
            WeightDtype::Bf16 => "bf16",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 => 2,
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fp32" | "f32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            _ => Err(format!("unknown dtype `{s}`: expected fp32 or bf16")),
        }
    }
}

/// The message of every engine path a bf16 model cannot take.
pub(crate) const BF16_ENGINE: &str = "this model holds bf16 inference weights, which run only in \
    the CPU decode/prefill path (serve, bench-infer, generation); load it as fp32 for training, \
    scoring or the GPU";

/// A weight matrix (rows, K) of the decode plan: the f32 parameter, read in place, or a bf16
/// copy that owns the weights.
pub(crate) enum Mat {
    F32(Tensor),
    Bf16(Vec<bf16>),
}

impl Mat {
    pub(crate) fn new(t: &Tensor, dtype: WeightDtype) -> Mat {
        match dtype {
            WeightDtype::F32 => Mat::F32(t.clone()),
            // Round to nearest even, as torch's `.to(torch.bfloat16)`.
            WeightDtype::Bf16 => Mat::Bf16(t.data().iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    /// out (B, N) = x (B, K) · W[..N]^T.
    pub(crate) fn linear(&self, out: &mut [f32], x: &[f32], b: usize, k: usize, n: usize) {
        let (out, x) = (&mut out[..b * n], &x[..b * k]);
        match self {
            Mat::F32(t) => matvec_nt(out, x, &t.data()[..n * k], b, k, n),
            Mat::Bf16(w) => matvec_nt(out, x, &w[..n * k], b, k, n),
        }
    }

    /// Elements of the matrix.
    pub(crate) fn len(&self) -> usize {
        match self {
            Mat::F32(t) => t.numel(),
            Mat::Bf16(w) => w.len(),
        }
    }

    /// out = row `i` of a matrix with rows of out.len() elements.
    pub(crate) fn copy_row(&self, i: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Mat::F32(t) => out.copy_from_slice(&t.data()[i * n..(i + 1) * n]),
            Mat::Bf16(w) => {
                out.iter_mut().zip(&w[i * n..(i + 1) * n]).for_each(|(o, v)| *o = v.to_f32())
            }
        }
    }

    /// out += g * (row `i` of a matrix with rows of `len` elements)[off..off + out.len()].
    pub(crate) fn add_row(&self, i: usize, len: usize, off: usize, g: f32, out: &mut [f32]) {
        let at = i * len + off..i * len + off + out.len();
        match self {
            Mat::F32(t) => out.iter_mut().zip(&t.data()[at]).for_each(|(o, &e)| *o += g * e),
            Mat::Bf16(w) => out.iter_mut().zip(&w[at]).for_each(|(o, e)| *o += g * e.to_f32()),
        }
    }

    /// The weights as f32 (a copy).
    fn to_f32(&self) -> Vec<f32> {
        match self {
            Mat::F32(t) => t.to_vec(),
            Mat::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

impl Gpt {
    /// Storage type of this model's weight matrices.
    pub fn weight_dtype(&self) -> WeightDtype {
        self.owned_plan().map(|p| p.dtype()).unwrap_or_default()
    }

    /// Number of parameters (all of them, whatever their storage).
    pub fn num_params(&self) -> usize {
        param_shapes(self.config()).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Bytes the weights take in memory: matrices at their dtype, the rest f32.
    pub fn weight_bytes(&self) -> usize {
        let small = self.params().numel() * 4;
        match self.owned_plan() {
            Some(p) => small + p.matrix_numel() * p.dtype().bytes(),
            None => small,
        }
    }

    /// The bf16 values of parameter `name`, when this model holds it as bf16.
    pub fn bf16_matrix(&self, name: &str) -> Option<&[bf16]> {
        match self.owned_plan()?.matrix(name)? {
            Mat::Bf16(w) => Some(w),
            Mat::F32(_) => None,
        }
    }

    /// Bytes per element of parameter `name` as this model stores it.
    pub fn param_elem_bytes(&self, name: &str) -> usize {
        match self.owned_plan() {
            Some(p) if p.holds(name) => p.dtype().bytes(),
            _ => 4,
        }
    }

    /// `with_weight_dtype`, consuming this model: its f32 matrices are freed (the engine's
    /// buffer recycler, which would keep them, is emptied), so a converted model really holds
    /// half the memory.
    pub fn into_weight_dtype(self, dtype: WeightDtype) -> Result<Gpt> {
        if self.weight_dtype() == dtype {
            return Ok(self);
        }
        let out = self.with_weight_dtype(dtype)?;
        drop(self);
        femtochat_engine::trim_pool();
        Ok(out)
    }

    /// This model with its weight matrices stored as `dtype`. To bf16: the matrices are rounded
    /// (to nearest even) into the decode plan and the f32 tensors dropped (a CPU model only);
    /// back to f32: they are widened into parameters again (exactly the bf16 values).
    pub fn with_weight_dtype(&self, dtype: WeightDtype) -> Result<Gpt> {
        match (self.weight_dtype(), dtype) {
            (a, b) if a == b => Ok(self.clone()),
            (WeightDtype::F32, WeightDtype::Bf16) => {
                if self.device() != Device::Cpu {
                    return Err(ModelError::Invalid(
                        "bf16 weights run on the CPU only: convert a CPU model".into(),
                    ));
                }
                let plan = DecodePlan::new(self, WeightDtype::Bf16)?;
                let mut small = ParamStore::new();
                for (name, t) in self.params().iter() {
                    if !plan.holds(name) {
                        small.insert(name.to_string(), t.clone());
                    }
                }
                Ok(self.with_owned_plan(small, Arc::new(plan)))
            }
            _ => {
                let plan = self.owned_plan().ok_or_else(|| {
                    ModelError::Invalid("no bf16 weights to widen (engine bug)".into())
                })?;
                let shapes = param_shapes(self.config());
                let mut params = ParamStore::new();
                for (name, shape) in &shapes {
                    let data = match plan.matrix(name) {
                        Some(m) => m.to_f32(),
                        None => self.params().get(name)?.to_vec(),
                    };
                    params.insert(name.clone(), Tensor::param(data, shape)?);
                }
                Gpt::from_params(self.config().clone(), params)
            }
        }
    }
}
