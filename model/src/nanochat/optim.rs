//! nanochat's optimizer state (`optim_<step>_rank<r>.pt`, torch's `optimizer.state_dict()` of
//! its MuonAdamW) to femtochat's named buffers and back.
//!
//! nanochat numbers parameters across its param groups in `setup_optimizer` order: AdamW groups
//! [lm_head], [wte], [value_embeds], [resid_lambdas], [x0_lambdas], [smear_gate, smear_lambda,
//! backout_lambda], then one Muon group per block-matrix shape (shapes sorted), members in block
//! order. AdamW keeps `step`, `exp_avg`, `exp_avg_sq` per parameter; a Muon group keeps its
//! state on its first parameter only, stacked: `momentum_buffer` (K, rows, cols) and
//! `second_momentum_buffer` (K, rows, 1) if rows >= cols else (K, 1, cols). femtochat keeps the
//! same numbers per parameter (`<name>.exp_avg`, `.exp_avg_sq`, `.momentum_buffer`,
//! `.second_momentum_buffer`) and one step count, so the mapping is exact.
//!
//! With R ranks (ZeRO-2 sharding), each rank file holds: AdamW parameters of 1024 elements or
//! more as a 1/R slice of dim 0 (rank order), smaller ones whole; Muon stacks in chunks of
//! ceil(K/R) (rank r owns members r*chunk..), zero-padded. They are put back together here.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use femtochat_engine::{GroupKind, ParamGroup};

use super::pickle::{self, Key, Map, Pickler, Value};
use super::torch_zip::{self, Data, PtFile};
use crate::config::GPTConfig;
use crate::error::{ModelError, Result};
use crate::gpt::param_shapes;

/// nanochat's AdamW shards parameters of at least this many elements across ranks.
const SHARD_MIN_NUMEL: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    AdamW,
    Muon,
}

/// One nanochat param group: its kind and members (name, shape) in order.
#[derive(Clone, Debug)]
pub struct Group {
    pub kind: Kind,
    pub params: Vec<(String, Vec<usize>)>,
}

/// nanochat's `setup_optimizer` groups for a model of this config.
pub fn groups(c: &GPTConfig) -> Vec<Group> {
    let shapes: BTreeMap<String, Vec<usize>> = param_shapes(c).into_iter().collect();
    let named = |names: Vec<String>| -> Vec<(String, Vec<usize>)> {
        names.into_iter().filter_map(|n| shapes.get(&n).map(|s| (n, s.clone()))).collect()
    };
    let adam = |names: Vec<String>| Group { kind: Kind::AdamW, params: named(names) };
    let ve = (0..c.n_layer)
        .filter(|&i| c.has_value_embed(i))
        .map(|i| format!("value_embeds.{i}.weight"));
    let mut out = vec![
        adam(vec!["lm_head.weight".into()]),
        adam(vec!["transformer.wte.weight".into()]),
        adam(ve.collect()),
        adam(vec!["resid_lambdas".into()]),
        adam(vec!["x0_lambdas".into()]),
        adam(vec!["smear_gate.weight".into(), "smear_lambda".into(), "backout_lambda".into()]),
    ];
    // `self.transformer.h.parameters()`: module registration order inside a block.
    let mut matrices = Vec::new();
    for i in 0..c.n_layer {
        for m in [
            "attn.c_q",
            "attn.c_k",
            "attn.c_v",
            "attn.c_proj",
            "attn.ve_gate",
            "mlp.c_fc",
            "mlp.c_proj",
        ] {
            matrices.push(format!("transformer.h.{i}.{m}.weight"));
        }
    }
    let matrices = named(matrices);
    let mut by_shape: Vec<Vec<usize>> = matrices.iter().map(|(_, s)| s.clone()).collect();
    by_shape.sort();
    by_shape.dedup();
    for shape in by_shape {
        let params = matrices.iter().filter(|(_, s)| *s == shape).cloned().collect();
        out.push(Group { kind: Kind::Muon, params });
    }
    out
}

/// A group's hyper-parameters as the file stores them (scheduled values at save time).
#[derive(Clone, Debug, PartialEq)]
pub struct Hyper {
    pub kind: Kind,
    pub params: Vec<String>,
    pub lr: f64,
    pub initial_lr: f64,
    pub weight_decay: f64,
}

/// An imported optimizer state, in femtochat's naming.
#[derive(Clone, Debug)]
pub struct Imported {
    pub step: u64,
    pub buffers: BTreeMap<String, Vec<f32>>,
    pub groups: Vec<Hyper>,
    pub ranks: usize,
}

fn opt_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

/// One rank's file: its archive, `state` and `param_groups`.
struct RankFile {
    pt: PtFile,
    state: std::rc::Rc<Map>,
    groups: Vec<Value>,
}

fn open_rank(path: &Path) -> Result<RankFile> {
    let (pt, root) = torch_zip::open(path)?;
    let root = root.as_dict().ok_or_else(|| opt_err(path, "is not an optimizer state dict"))?;
    let state = match root.get("state") {
        Some(Value::Dict(m)) => m.clone(),
        _ => return Err(opt_err(path, "has no `state` dict: not an optimizer state_dict()")),
    };
    let groups = root
        .get("param_groups")
        .and_then(Value::as_seq)
        .ok_or_else(|| opt_err(path, "has no `param_groups` list"))?
        .to_vec();
    Ok(RankFile { pt, state, groups })
}

/// A tensor `key` of parameter `id`'s state, as f32 with its shape; None if absent.
fn state_tensor(
    f: &mut RankFile,
    id: i64,
    key: &str,
    name: &str,
) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    let Some(entry) = f.state.get_int(id) else {
        return Ok(None);
    };
    let path = f.pt.path().to_path_buf();
    let entry = entry
        .as_dict()
        .ok_or_else(|| opt_err(&path, format!("state of `{name}` is not a dict")))?;
    let Some(v) = entry.get(key) else {
        return Err(opt_err(&path, format!("state of `{name}` has no `{key}`")));
    };
    let t =
        v.as_tensor().ok_or_else(|| opt_err(&path, format!("`{name}.{key}` is not a tensor")))?;
    Ok(Some(f.pt.f32s(t, &format!("{name}.{key}"))?))
}

/// Import the state of `optim_<step>_rank<r>.pt` files (all ranks, in rank order).
pub fn load(paths: &[PathBuf], c: &GPTConfig) -> Result<Imported> {
    let Some(first) = paths.first() else {
        return Err(opt_err(Path::new("."), "no optimizer files"));
    };
    let mut files = paths.iter().map(|p| open_rank(p)).collect::<Result<Vec<_>>>()?;
    let r = files.len();
    let expected = groups(c);
    if files[0].groups.len() != expected.len() {
        return Err(opt_err(
            first,
            format!(
                "has {} param groups; a nanochat model of this config has {}",
                files[0].groups.len(),
                expected.len()
            ),
        ));
    }
    let mut hyper = Vec::new();
    let mut ids: Vec<Vec<i64>> = Vec::new();
    for (gi, (g, want)) in files[0].groups.iter().zip(&expected).enumerate() {
        let g =
            g.as_dict().ok_or_else(|| opt_err(first, format!("param group {gi} is not a dict")))?;
        let num = |k: &str| g.get(k).and_then(Value::as_f64);
        let kind = match g.get("kind").and_then(Value::as_str) {
            Some("adamw") => Kind::AdamW,
            Some("muon") => Kind::Muon,
            k => return Err(opt_err(first, format!("param group {gi} has kind {k:?}"))),
        };
        let params: Vec<i64> = g
            .get("params")
            .and_then(Value::as_seq)
            .ok_or_else(|| opt_err(first, format!("param group {gi} has no `params` list")))?
            .iter()
            .map(|v| {
                v.as_int().ok_or_else(|| {
                    opt_err(first, format!("param group {gi}: a param id is not an int"))
                })
            })
            .collect::<Result<_>>()?;
        if kind != want.kind || params.len() != want.params.len() {
            return Err(opt_err(
                first,
                format!(
                    "param group {gi} is {kind:?} with {} params; for this model nanochat's group {gi} is {:?} with {} ({})",
                    params.len(),
                    want.kind,
                    want.params.len(),
                    want.params.first().map_or("", |p| p.0.as_str())
                ),
            ));
        }
        let lr =
            num("lr").ok_or_else(|| opt_err(first, format!("param group {gi} has no `lr`")))?;
        hyper.push(Hyper {
            kind,
            params: want.params.iter().map(|p| p.0.clone()).collect(),
            lr,
            initial_lr: num("initial_lr").unwrap_or(lr),
            weight_decay: num("weight_decay").unwrap_or(0.0),
        });
        ids.push(params);
    }
    let mut buffers = BTreeMap::new();
    let mut steps = BTreeMap::new();
    for ((g, ids), want) in hyper.iter().zip(&ids).zip(&expected) {
        match g.kind {
            Kind::AdamW => {
                for (&id, (name, shape)) in ids.iter().zip(&want.params) {
                    let numel: usize = shape.iter().product();
                    let sharded = r > 1 && numel >= SHARD_MIN_NUMEL;
                    let shards = if sharded { r } else { 1 };
                    for key in ["exp_avg", "exp_avg_sq"] {
                        let mut data = Vec::with_capacity(numel);
                        for f in files.iter_mut().take(shards) {
                            let Some((_, part)) = state_tensor(f, id, key, name)? else {
                                break;
                            };
                            data.extend(part);
                        }
                        if data.is_empty() {
                            data = vec![0.0; numel];
                        } else if data.len() != numel {
                            return Err(opt_err(
                                first,
                                format!(
                                    "`{name}.{key}` has {} values over {shards} rank(s), the parameter {numel}",
                                    data.len()
                                ),
                            ));
                        }
                        buffers.insert(format!("{name}.{key}"), data);
                    }
                    if let Some(s) = files[0]
                        .state
                        .get_int(id)
                        .and_then(Value::as_dict)
                        .and_then(|d| d.get("step"))
                    {
                        let s = s.as_f64().ok_or_else(|| {
                            opt_err(first, format!("`{name}` step is not a number"))
                        })?;
                        steps.insert(name.clone(), s as u64);
                    }
                }
            }
            Kind::Muon => {
                let k = want.params.len();
                let Some(&id) = ids.first() else { continue };
                let (rows, cols) = match want.params[0].1.as_slice() {
                    &[rows, cols] => (rows, cols),
                    other => {
                        return Err(opt_err(first, format!("Muon parameter of shape {other:?}")));
                    }
                };
                let chunk = k.div_ceil(r);
                let second_len = if rows >= cols { rows } else { cols };
                for (key, per) in
                    [("momentum_buffer", rows * cols), ("second_momentum_buffer", second_len)]
                {
                    let mut data = Vec::with_capacity(chunk * r * per);
                    let mut present = 0;
                    for f in files.iter_mut() {
                        if let Some((_, part)) = state_tensor(f, id, key, &want.params[0].0)? {
                            if part.len() != chunk * per {
                                return Err(opt_err(
                                    f.pt.path(),
                                    format!(
                                        "`{key}` of the Muon group of {} has {} values, expected {chunk} x {per}",
                                        want.params[0].0,
                                        part.len()
                                    ),
                                ));
                            }
                            present += 1;
                            data.extend(part);
                        }
                    }
                    if present == 0 {
                        data = vec![0.0; k * per];
                    } else if present != r {
                        return Err(opt_err(
                            first,
                            format!(
                                "`{key}` of the Muon group of {} is on {present} of {r} ranks",
                                want.params[0].0
                            ),
                        ));
                    }
                    for (j, (name, _)) in want.params.iter().enumerate() {
                        buffers
                            .insert(format!("{name}.{key}"), data[j * per..(j + 1) * per].to_vec());
                    }
                }
            }
        }
    }
    let mut distinct: Vec<u64> = steps.values().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    let step = match distinct.as_slice() {
        [] => 0,
        [s] => *s,
        _ => {
            return Err(opt_err(
                first,
                format!(
                    "AdamW step counts differ across parameters ({distinct:?}); femtochat keeps one step count"
                ),
            ));
        }
    };
    Ok(Imported { step, buffers, groups: hyper, ranks: r })
}

/// An f32 hyper-parameter as the decimal it was written as (0.8f32 -> 0.8, not 0.800000011920929).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// Write femtochat's optimizer state as nanochat's `optim_<step>_rank0.pt` (one rank). Group
/// hyper-parameters come from `femto` (the run's groups, matched by member names).
pub fn save(
    path: &Path,
    c: &GPTConfig,
    step: u64,
    buffers: &BTreeMap<String, Vec<f32>>,
    femto: &[ParamGroup],
) -> Result<()> {
    let get = |name: &str| -> Result<&Vec<f32>> {
        buffers.get(name).ok_or_else(|| opt_err(path, format!("optimizer state `{name}` missing")))
    };
    let groups = groups(c);
    // Check every buffer first: the writer below cannot report which one failed.
    for g in &groups {
        for (name, _) in &g.params {
            let keys: &[&str] = match g.kind {
                Kind::AdamW => &["exp_avg", "exp_avg_sq"],
                Kind::Muon => &["momentum_buffer", "second_momentum_buffer"],
            };
            for k in keys {
                get(&format!("{name}.{k}"))?;
            }
        }
    }
    let empty = Vec::new();
    let buf = |name: String| buffers.get(&name).unwrap_or(&empty);
    torch_zip::write(path, |w| {
        let mut state = Vec::new();
        let mut param_groups = Vec::new();
        let mut id = 0i64;
        for g in &groups {
            let first = g.params.first().map(|p| p.0.as_str()).unwrap_or_default();
            let fg = femto.iter().find(|fg| fg.params.iter().any(|p| p == first));
            let mut ids = Vec::new();
            for (j, (name, shape)) in g.params.iter().enumerate() {
                let entry = match g.kind {
                    Kind::AdamW => Some(pickle::dict(vec![
                        ("step", Value::Int(step as i64)),
                        (
                            "exp_avg",
                            Value::Tensor(
                                w.tensor(shape, Data::F32(buf(format!("{name}.exp_avg"))))?.into(),
                            ),
                        ),
                        (
                            "exp_avg_sq",
                            Value::Tensor(
                                w.tensor(shape, Data::F32(buf(format!("{name}.exp_avg_sq"))))?
                                    .into(),
                            ),
                        ),
                    ])),
                    Kind::Muon if j == 0 => {
                        let (k, rows, cols) = (g.params.len(), shape[0], shape[1]);
                        let stack = |key: &str| -> Vec<f32> {
                            g.params
                                .iter()
                                .flat_map(|(n, _)| buf(format!("{n}.{key}")).iter().copied())
                                .collect()
                        };
                        let second_shape = if rows >= cols { [k, rows, 1] } else { [k, 1, cols] };
                        Some(pickle::dict(vec![
                            (
                                "momentum_buffer",
                                Value::Tensor(
                                    w.tensor(
                                        &[k, rows, cols],
                                        Data::F32(&stack("momentum_buffer")),
                                    )?
                                    .into(),
                                ),
                            ),
                            (
                                "second_momentum_buffer",
                                Value::Tensor(
                                    w.tensor(
                                        &second_shape,
                                        Data::F32(&stack("second_momentum_buffer")),
                                    )?
                                    .into(),
                                ),
                            ),
                        ]))
                    }
                    Kind::Muon => None,
                };
                if let Some(e) = entry {
                    state.push((Key::Int(id), e));
                }
                ids.push(Value::Int(id));
                id += 1;
            }
            let (lr, initial_lr, wd) = fg.map_or((0.0, 0.0, 0.0), |f| {
                (decimal(f.lr), decimal(f.initial_lr), decimal(f.weight_decay))
            });
            let mut items = vec![
                ("kind", pickle::str(if g.kind == Kind::AdamW { "adamw" } else { "muon" })),
                ("lr", Value::Float(lr)),
            ];
            match fg.map(|f| &f.kind) {
                Some(GroupKind::AdamW { betas, eps }) => {
                    items.push((
                        "betas",
                        pickle::tuple(vec![
                            Value::Float(decimal(betas.0)),
                            Value::Float(decimal(betas.1)),
                        ]),
                    ));
                    items.push(("eps", Value::Float(decimal(*eps))));
                }
                Some(GroupKind::Muon { momentum, beta2, ns_steps }) => {
                    items.push(("momentum", Value::Float(decimal(*momentum))));
                    items.push(("ns_steps", Value::Int(*ns_steps as i64)));
                    items.push(("beta2", Value::Float(decimal(*beta2))));
                }
                None => {}
            }
            items.push(("weight_decay", Value::Float(wd)));
            items.push(("initial_lr", Value::Float(initial_lr)));
            items.push(("params", pickle::list(ids)));
            param_groups.push(pickle::dict(items));
        }
        let root = pickle::dict(vec![
            ("state", pickle::dict_keyed(state)),
            ("param_groups", pickle::list(param_groups)),
        ]);
        let mut p = Pickler::new(2);
        p.value(&root, &mut |p, t| p.tensor(t));
        Ok(p.finish())
    })
}
