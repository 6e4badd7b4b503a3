//! nanochat's `setup_optimizer`: which parameters go to which MuonAdamW group, with what
//! learning rates (docs/reference.md §6).
use femtochat_engine::{GroupKind, ParamGroup};

use crate::config::GPTConfig;
use crate::gpt::param_shapes;

/// Learning rates and weight decay of `setup_optimizer`; `Default` is its defaults (the base
/// training script passes its own).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerConfig {
    pub unembedding_lr: f32,
    pub embedding_lr: f32,
    pub matrix_lr: f32,
    pub scalar_lr: f32,
    /// Muon weight decay.
    pub weight_decay: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            unembedding_lr: 0.004,
            embedding_lr: 0.2,
            matrix_lr: 0.02,
            scalar_lr: 0.5,
            weight_decay: 0.0,
        }
    }
}

/// Muon's fixed hyper-parameters in nanochat (momentum is rescheduled during training).
const MUON_MOMENTUM: f32 = 0.95;
const MUON_BETA2: f32 = 0.9;
const MUON_NS_STEPS: usize = 5;
const ADAM_EPS: f32 = 1e-10;

/// The parameter groups of `setup_optimizer` for a model of this config.
pub fn param_groups(c: &GPTConfig, o: &OptimizerConfig) -> Vec<ParamGroup> {
    // AdamW learning rates scale as 1/sqrt(d_model), tuned at d_model = 768.
    let s = (c.n_embd as f32 / 768.0).powf(-0.5);
    let adam = |lr: f32, betas: (f32, f32), wd: f32, params: Vec<String>| ParamGroup {
        kind: GroupKind::AdamW { betas, eps: ADAM_EPS },
        lr,
        initial_lr: lr,
        weight_decay: wd,
        params,
    };
    let names: Vec<(String, Vec<usize>)> = param_shapes(c);
    let ve: Vec<String> = names
        .iter()
        .filter(|(n, _)| n.starts_with("value_embeds."))
        .map(|(n, _)| n.clone())
        .collect();
    let mut groups = vec![
        adam(o.unembedding_lr * s, (0.8, 0.96), 0.01, vec!["lm_head.weight".into()]),
        adam(o.embedding_lr * s, (0.8, 0.995), 0.001, vec!["transformer.wte.weight".into()]),
        adam(o.embedding_lr * s * 0.5, (0.8, 0.995), 0.01, ve),
        adam(o.scalar_lr * 0.01, (0.8, 0.95), 0.05, vec!["resid_lambdas".into()]),
        adam(o.scalar_lr, (0.96, 0.95), 0.0, vec!["x0_lambdas".into()]),
        adam(
            0.2,
            (0.8, 0.95),
            0.0,
            vec!["smear_lambda".into(), "backout_lambda".into(), "smear_gate.weight".into()],
        ),
    ];
    groups.retain(|g| !g.params.is_empty());
    // Muon: every matrix inside the blocks, one group per shape (nanochat stacks them).
    let mut by_shape: Vec<(Vec<usize>, Vec<String>)> = Vec::new();
    for (n, shape) in names.iter().filter(|(n, _)| n.starts_with("transformer.h.")) {
        match by_shape.iter_mut().find(|(s, _)| s == shape) {
            Some((_, members)) => members.push(n.clone()),
            None => by_shape.push((shape.clone(), vec![n.clone()])),
        }
    }
    for (_, members) in by_shape {
        groups.push(ParamGroup {
            kind: GroupKind::Muon {
                momentum: MUON_MOMENTUM,
                beta2: MUON_BETA2,
                ns_steps: MUON_NS_STEPS,
            },
            lr: o.matrix_lr,
            initial_lr: o.matrix_lr,
            weight_decay: o.weight_decay,
            params: members,
        });
    }
    groups
}
