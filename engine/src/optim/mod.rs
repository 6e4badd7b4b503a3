//! MuonAdamW (docs/reference.md §6): AdamW for embeddings, the unembedding and scalars; Muon (Polar
//! Express orthogonalisation + NorMuon second moment + cautious weight decay) for the matrices
//! inside the transformer blocks. One `step` updates every group.
//!
//! The update math lives in `adamw.rs` and `muon.rs` as functions over `f32` slices; this file
//! holds the groups, the per-parameter state and the glue to named engine tensors.
mod adamw;
mod muon;

use std::collections::BTreeMap;

pub use adamw::{AdamWHyper, adamw_update};
pub use muon::{MuonHyper, POLAR_EXPRESS_COEFFS, muon_update, polar_express};

use femtochat_kernels::gpu::{self as gk, GpuBuffer};

use crate::Device;
use crate::autograd::Grads;
use crate::device::record;
use crate::error::{EngineError, Result};
use crate::param::ParamStore;
use crate::tensor::{Storage, Tensor};

/// Which update a group applies, with its fixed hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupKind {
    AdamW { betas: (f32, f32), eps: f32 },
    Muon { momentum: f32, beta2: f32, ns_steps: usize },
}

/// A parameter group. `lr`, `weight_decay` and (Muon) `momentum` are set by the schedules
/// every step; `initial_lr` is what the LR multiplier scales.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    pub kind: GroupKind,
    pub lr: f32,
    pub initial_lr: f32,
    pub weight_decay: f32,
    pub params: Vec<String>,
}

/// Optimizer state of one parameter, on its parameter's device (moved there at the first step
/// after a load or a device change).
#[derive(Debug)]
enum State {
    /// First and second moments, shaped like the parameter.
    Adam { m: Storage, v: Storage },
    /// Momentum (rows, cols) and the factored second moment: (rows) if rows >= cols, else (cols).
    Muon { momentum: Storage, second: Storage },
}

/// A gradient as a step receives it.
enum GradIn {
    Host(Vec<f32>),
    Tensor(Tensor),
    Zero,
}

/// `s` on the host, downloading it if it lives on the GPU.
fn host(s: &mut Storage) -> Result<&mut Vec<f32>> {
    if let Storage::Gpu(b) = s {
        crate::device::sync();
        *s = Storage::Cpu(b.to_vec()?);
    }
    match s {
        Storage::Cpu(v) => Ok(v),
        Storage::Gpu(_) => Err(EngineError::Gpu("optimizer state stayed on the GPU".into())),
    }
}

/// `s` on the GPU, uploading it if it lives on the host.
fn gpu(s: &mut Storage) -> Result<&GpuBuffer> {
    if let Storage::Cpu(v) = s {
        let b = record(|bt| bt.upload(v))?;
        *s = Storage::Gpu(b);
    }
    s.gpu_buf()
}

pub struct MuonAdamW {
    groups: Vec<ParamGroup>,
    state: BTreeMap<String, State>,
    /// Steps taken so far (AdamW bias correction uses step + 1 during a step).
    step: u64,
}

impl MuonAdamW {
    /// Build the optimizer; every named parameter must exist in `params`, appear in one group
    /// only, and (Muon) be a matrix.
    pub fn new(groups: Vec<ParamGroup>, params: &ParamStore) -> Result<MuonAdamW> {
        let mut state = BTreeMap::new();
        for g in &groups {
            for name in &g.params {
                let t = params.get(name)?;
                let n = t.numel();
                let s = match g.kind {
                    GroupKind::AdamW { .. } => {
                        State::Adam { m: Storage::Cpu(vec![0.0; n]), v: Storage::Cpu(vec![0.0; n]) }
                    }
                    GroupKind::Muon { .. } => {
                        let (rows, cols) = matrix_dims(name, t.shape())?;
                        let second = vec![0.0; if rows >= cols { rows } else { cols }];
                        State::Muon {
                            momentum: Storage::Cpu(vec![0.0; n]),
                            second: Storage::Cpu(second),
                        }
                    }
                };
                if state.insert(name.clone(), s).is_some() {
                    return Err(invalid(format!("parameter `{name}` is in two groups")));
                }
            }
        }
        Ok(MuonAdamW { groups, state, step: 0 })
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    pub fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of every parameter from its gradient. A parameter without a gradient (not
    /// reached by the loss) is treated as having a zero gradient, as a fused PyTorch step on a
    /// zero-filled `.grad` would. GPU parameters are updated by WGSL kernels, with no readback.
    pub fn step(&mut self, params: &ParamStore, grads: &Grads) -> Result<()> {
        self.step_inner(params, |p, _| match grads.get(p) {
            Some(g) => GradIn::Tensor(g.clone()),
            None => GradIn::Zero,
        })
    }

    /// `step` with gradients from a function of (parameter, name), e.g. loaded from a file.
    pub fn step_with(
        &mut self,
        params: &ParamStore,
        grad_of: impl Fn(&Tensor, &str) -> Option<Vec<f32>>,
    ) -> Result<()> {
        self.step_inner(params, |p, n| grad_of(p, n).map(GradIn::Host).unwrap_or(GradIn::Zero))
    }

    fn step_inner(
        &mut self,
        params: &ParamStore,
        grad_of: impl Fn(&Tensor, &str) -> GradIn,
    ) -> Result<()> {
        let t = self.step + 1;
        for g in &self.groups {
            for name in &g.params {
                let p = params.get(name)?;
                let grad = grad_of(p, name);
                let glen = match &grad {
                    GradIn::Host(v) => v.len(),
                    GradIn::Tensor(t) => t.numel(),
                    GradIn::Zero => p.numel(),
                };
                if glen != p.numel() {
                    return Err(invalid(format!(
                        "gradient of `{name}` has {glen} values, expected {}",
                        p.numel()
                    )));
                }
                let state = self
                    .state
                    .get_mut(name)
                    .ok_or_else(|| EngineError::MissingParam { name: name.clone() })?;
                match p.device() {
                    Device::Cpu => update_host(g, name, p, grad, state, t)?,
                    Device::Gpu => update_gpu(g, name, p, grad, state, t)?,
                }
            }
        }
        self.step = t;
        Ok(())
    }

    /// Every state buffer by name (`<param>.exp_avg`, `.exp_avg_sq`, `.momentum_buffer`,
    /// `.second_momentum_buffer`) plus the step count, for checkpoints.
    pub fn state_dict(&self) -> Result<(u64, BTreeMap<String, Vec<f32>>)> {
        let mut out = BTreeMap::new();
        for (name, s) in &self.state {
            match s {
                State::Adam { m, v } => {
                    out.insert(format!("{name}.exp_avg"), m.to_host()?);
                    out.insert(format!("{name}.exp_avg_sq"), v.to_host()?);
                }
                State::Muon { momentum, second } => {
                    out.insert(format!("{name}.momentum_buffer"), momentum.to_host()?);
                    out.insert(format!("{name}.second_momentum_buffer"), second.to_host()?);
                }
            }
        }
        Ok((self.step, out))
    }

    /// Restore what `state_dict` saved; every buffer must be present with its length.
    pub fn load_state_dict(&mut self, step: u64, bufs: &BTreeMap<String, Vec<f32>>) -> Result<()> {
        for (name, s) in &mut self.state {
            let parts: [(&str, &mut Storage); 2] = match s {
                State::Adam { m, v } => [("exp_avg", m), ("exp_avg_sq", v)],
                State::Muon { momentum, second } => {
                    [("momentum_buffer", momentum), ("second_momentum_buffer", second)]
                }
            };
            for (suffix, dst) in parts {
                let key = format!("{name}.{suffix}");
                let src = bufs
                    .get(&key)
                    .ok_or_else(|| invalid(format!("optimizer state `{key}` missing")))?;
                let want = match dst {
                    Storage::Cpu(v) => v.len(),
                    Storage::Gpu(b) => b.len(),
                };
                if src.len() != want {
                    return Err(invalid(format!(
                        "optimizer state `{key}` has {} values, expected {want}",
                        src.len(),
                    )));
                }
                // Loaded on the host; the next step moves it to its parameter's device.
                *dst = Storage::Cpu(src.clone());
            }
        }
        self.step = step;
        Ok(())
    }
}

/// One parameter's update on the host.
fn update_host(
    g: &ParamGroup,
    name: &str,
    p: &Tensor,
    grad: GradIn,
    state: &mut State,
    t: u64,
) -> Result<()> {
    let grad = match grad {
        GradIn::Host(v) => v,
        GradIn::Tensor(t) => t.try_to_vec()?,
        GradIn::Zero => vec![0.0; p.numel()],
    };
    match (&g.kind, state) {
        (&GroupKind::AdamW { betas, eps }, State::Adam { m, v }) => {
            let hp = AdamWHyper { lr: g.lr, betas, eps, weight_decay: g.weight_decay };
            let (m, v) = (host(m)?, host(v)?);
            p.with_data_mut(|d| adamw_update(d, &grad, m, v, hp, t))?;
        }
        (&GroupKind::Muon { momentum, beta2, ns_steps }, State::Muon { momentum: mb, second }) => {
            let (rows, cols) = matrix_dims(name, p.shape())?;
            let hp =
                MuonHyper { lr: g.lr, momentum, beta2, ns_steps, weight_decay: g.weight_decay };
            let (mb, second) = (host(mb)?, host(second)?);
            p.with_data_mut(|d| muon_update(d, &grad, mb, second, rows, cols, hp))?;
        }
        _ => return Err(invalid(format!("state of `{name}` does not match its group"))),
    }
    Ok(())
}

/// One parameter's update by the WGSL kernels (`kernels/src/wgsl/optim.wgsl`).
fn update_gpu(
    g: &ParamGroup,
    name: &str,
    p: &Tensor,
    grad: GradIn,
    state: &mut State,
    t: u64,
) -> Result<()> {
    let grad = match grad {
        GradIn::Tensor(t) if t.device() == Device::Gpu => t,
        GradIn::Tensor(t) => t.to_device(Device::Gpu)?,
        GradIn::Host(v) => Tensor::from_vec(v, p.shape())?.to_device(Device::Gpu)?,
        GradIn::Zero => Tensor::zeros(p.shape()).to_device(Device::Gpu)?,
    };
    let (ps, gs) = (p.storage(), grad.storage());
    let (pb, gb) = (ps.gpu_buf()?, gs.gpu_buf()?);
    match (&g.kind, state) {
        (&GroupKind::AdamW { betas, eps }, State::Adam { m, v }) => {
            let hp = gk::optim::AdamW { lr: g.lr, betas, eps, weight_decay: g.weight_decay };
            gpu(m)?;
            gpu(v)?;
            let (m, v) = (m.gpu_buf()?, v.gpu_buf()?);
            record(|bt| gk::optim::adamw_step(bt, pb, gb, m, v, hp, t))
        }
        (&GroupKind::Muon { momentum, beta2, ns_steps }, State::Muon { momentum: mb, second }) => {
            let (rows, cols) = matrix_dims(name, p.shape())?;
            let hp = gk::optim::Muon {
                lr: g.lr,
                momentum,
                beta2,
                ns_steps,
                weight_decay: g.weight_decay,
            };
            gpu(mb)?;
            gpu(second)?;
            let (mb, second) = (mb.gpu_buf()?, second.gpu_buf()?);
            record(|bt| {
                gk::optim::muon_step(bt, pb, gb, mb, second, rows, cols, hp, &POLAR_EXPRESS_COEFFS)
            })
        }
        _ => Err(invalid(format!("state of `{name}` does not match its group"))),
    }
}

fn matrix_dims(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [rows, cols] => Ok((*rows, *cols)),
        _ => Err(invalid(format!("Muon parameter `{name}` must be a matrix, got {shape:?}"))),
    }
}

fn invalid(msg: String) -> EngineError {
    EngineError::Invalid { op: "MuonAdamW", msg }
}
