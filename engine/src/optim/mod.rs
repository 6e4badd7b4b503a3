//! MuonAdamW (SPEC.md §6): AdamW for embeddings, the unembedding and scalars; Muon (Polar
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

use crate::autograd::Grads;
use crate::error::{EngineError, Result};
use crate::param::ParamStore;
use crate::tensor::Tensor;

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

/// Optimizer state of one parameter.
#[derive(Clone, Debug, PartialEq)]
enum State {
    /// First and second moments, shaped like the parameter.
    Adam { m: Vec<f32>, v: Vec<f32> },
    /// Momentum (rows, cols) and the factored second moment: (rows) if rows >= cols, else (cols).
    Muon { momentum: Vec<f32>, second: Vec<f32> },
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
                    GroupKind::AdamW { .. } => State::Adam { m: vec![0.0; n], v: vec![0.0; n] },
                    GroupKind::Muon { .. } => {
                        let (rows, cols) = matrix_dims(name, t.shape())?;
                        let second = vec![0.0; if rows >= cols { rows } else { cols }];
                        State::Muon { momentum: vec![0.0; n], second }
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
    /// zero-filled `.grad` would.
    pub fn step(&mut self, params: &ParamStore, grads: &Grads) -> Result<()> {
        self.step_with(params, |p, _| grads.get(p).map(|g| g.to_vec()))
    }

    /// `step` with gradients from a function of (parameter, name), e.g. loaded from a file.
    pub fn step_with(
        &mut self,
        params: &ParamStore,
        grad_of: impl Fn(&Tensor, &str) -> Option<Vec<f32>>,
    ) -> Result<()> {
        let t = self.step + 1;
        for g in &self.groups {
            for name in &g.params {
                let p = params.get(name)?;
                let grad = grad_of(p, name).unwrap_or_else(|| vec![0.0; p.numel()]);
                if grad.len() != p.numel() {
                    return Err(invalid(format!(
                        "gradient of `{name}` has {} values, expected {}",
                        grad.len(),
                        p.numel()
                    )));
                }
                let state = self
                    .state
                    .get_mut(name)
                    .ok_or_else(|| EngineError::MissingParam { name: name.clone() })?;
                match (&g.kind, state) {
                    (&GroupKind::AdamW { betas, eps }, State::Adam { m, v }) => {
                        let hp = AdamWHyper { lr: g.lr, betas, eps, weight_decay: g.weight_decay };
                        p.with_data_mut(|d| adamw_update(d, &grad, m, v, hp, t))?;
                    }
                    (
                        &GroupKind::Muon { momentum, beta2, ns_steps },
                        State::Muon { momentum: mb, second },
                    ) => {
                        let (rows, cols) = matrix_dims(name, p.shape())?;
                        let hp = MuonHyper {
                            lr: g.lr,
                            momentum,
                            beta2,
                            ns_steps,
                            weight_decay: g.weight_decay,
                        };
                        p.with_data_mut(|d| muon_update(d, &grad, mb, second, rows, cols, hp))?;
                    }
                    _ => {
                        return Err(invalid(format!("state of `{name}` does not match its group")));
                    }
                }
            }
        }
        self.step = t;
        Ok(())
    }

    /// Every state buffer by name (`<param>.exp_avg`, `.exp_avg_sq`, `.momentum_buffer`,
    /// `.second_momentum_buffer`) plus the step count, for checkpoints.
    pub fn state_dict(&self) -> (u64, BTreeMap<String, Vec<f32>>) {
        let mut out = BTreeMap::new();
        for (name, s) in &self.state {
            match s {
                State::Adam { m, v } => {
                    out.insert(format!("{name}.exp_avg"), m.clone());
                    out.insert(format!("{name}.exp_avg_sq"), v.clone());
                }
                State::Muon { momentum, second } => {
                    out.insert(format!("{name}.momentum_buffer"), momentum.clone());
                    out.insert(format!("{name}.second_momentum_buffer"), second.clone());
                }
            }
        }
        (self.step, out)
    }

    /// Restore what `state_dict` saved; every buffer must be present with its length.
    pub fn load_state_dict(&mut self, step: u64, bufs: &BTreeMap<String, Vec<f32>>) -> Result<()> {
        for (name, s) in &mut self.state {
            let parts: [(&str, &mut Vec<f32>); 2] = match s {
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
                if src.len() != dst.len() {
                    return Err(invalid(format!(
                        "optimizer state `{key}` has {} values, expected {}",
                        src.len(),
                        dst.len()
                    )));
                }
                dst.copy_from_slice(src);
            }
        }
        self.step = step;
        Ok(())
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
