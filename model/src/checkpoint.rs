//! Checkpoints as safetensors with nanochat's parameter names, so a nanochat state dict exported
//! to safetensors loads as-is and ours load in PyTorch.
//!
//! - model file: every parameter (f32; a bf16 model's matrices as BF16), with `__metadata__`
//!   {"config": GPTConfig JSON, "meta": free-form training metadata JSON};
//! - optimizer file: every state buffer (1-D f32, named `<param>.<buffer>`), with the step count
//!   in the metadata.
//!
//! Files are written atomically (temp file in the same directory, fsync, rename, fsync of the
//! directory), so a crash leaves either the old checkpoint or the new one, never half of one.
//! Loading refuses truncated, corrupt or mismatched files with an error naming the problem.
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use femtochat_engine::{MuonAdamW, ParamStore, Tensor};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::config::GPTConfig;
use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::weights::WeightDtype;

/// What a model file holds besides the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMeta {
    pub config: GPTConfig,
    /// Free-form training metadata (step, losses, options...).
    pub meta: serde_json::Value,
    /// The dtype most of the file's elements are stored in ("F32", "BF16", "F16"), whatever
    /// dtype they were loaded as: a caller converting says so.
    pub stored_dtype: String,
}

fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Write `path` atomically with `write` (for files streamed rather than built in memory): a
/// temporary file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| ck_err(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let io = |e: std::io::Error| ck_err(path, format!("writing: {e}"));
    let written = File::create(&tmp).and_then(|mut f| {
        write(&mut f)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    fs::rename(&tmp, path).map_err(io)?;
    // Persist the rename itself; not every platform lets a directory be opened for this.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A named tensor to write: shape, dtype, little-endian bytes.
type Raw = (String, Vec<usize>, Dtype, Vec<u8>);

/// Serialise named tensors with string metadata.
fn serialize(tensors: &[Raw], meta: HashMap<String, String>, path: &Path) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, shape, dtype, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| ck_err(path, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| ck_err(path, e.to_string()))?;
    Ok(canonical_header(bytes))
}

/// The header with its JSON keys sorted. safetensors writes the metadata map in `HashMap`
/// order, which differs from process to process, so the same weights would not give the same
/// bytes (a determinism requirement, docs/research.md). Same length: the header is only
/// reordered, then padded with spaces as safetensors pads it.
fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    else {
        return bytes;
    };
    let end = 8 + n as usize;
    let Some(header) = bytes.get(8..end) else { return bytes };
    // serde_json's map is a BTreeMap (no preserve_order feature): printing sorts the keys.
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(header) else { return bytes };
    let sorted = v.to_string().into_bytes();
    if sorted.len() <= n as usize {
        bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
        bytes[8 + sorted.len()..end].fill(b' ');
    }
    bytes
}

/// Save the model's parameters, config and metadata to `path`, each tensor in the dtype the
/// model holds it (a bf16 model's matrices as BF16, so the file is about half the size).
pub fn save_model(path: &Path, gpt: &Gpt, meta: &serde_json::Value) -> Result<()> {
    let mut tensors = Vec::new();
    for (n, shape) in crate::gpt::param_shapes(gpt.config()) {
        if let Some(bits) = gpt.bf16_matrix(&n) {
            let bytes = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((n, shape, Dtype::BF16, bytes));
            continue;
        }
        // A failed GPU read is an error here, never NaNs written over a good checkpoint.
        let data = gpt
            .params()
            .get(&n)
            .and_then(|t| t.try_to_vec())
            .map_err(|e| ck_err(path, format!("reading parameter `{n}`: {e}")))?;
        tensors.push((n, shape, Dtype::F32, f32_bytes(&data)));
    }
    let config = serde_json::to_string(gpt.config()).map_err(|e| ck_err(path, e.to_string()))?;
    let info =
        HashMap::from([("config".to_string(), config), ("meta".to_string(), meta.to_string())]);
    write_atomic(path, &serialize(&tensors, info, path)?)
}

/// Read a safetensors file, telling a truncated file from a corrupt one.
fn read_checked(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).map_err(|e| ck_err(path, format!("reading: {e}")))?;
    if bytes.len() < 8 {
        return Err(ModelError::Truncated {
            path: path.to_path_buf(),
            expected: 8,
            got: bytes.len(),
        });
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
    let header_end = 8u64.saturating_add(n);
    if header_end > bytes.len() as u64 {
        // A header length past the end is either a cut file or garbage; a sane length says cut.
        return Err(if n < 100 << 20 {
            ModelError::Truncated {
                path: path.to_path_buf(),
                expected: header_end,
                got: bytes.len(),
            }
        } else {
            ck_err(path, format!("header length {n} is not plausible: not a safetensors file"))
        });
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..header_end as usize])
        .map_err(|e| ck_err(path, format!("header is not valid JSON: {e}")))?;
    let data_end = header
        .as_object()
        .map(|o| {
            o.values().filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0)
        })
        .ok_or_else(|| ck_err(path, "header is not a JSON object"))?;
    let expected = header_end.saturating_add(data_end);
    if expected > bytes.len() as u64 {
        return Err(ModelError::Truncated { path: path.to_path_buf(), expected, got: bytes.len() });
    }
    Ok(bytes)
}

/// Named tensors as (shape, f32 data).
type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensors of a safetensors file as f32 (bf16/f16 are widened, other dtypes refused), with
/// its metadata.
fn read_f32_tensors(path: &Path) -> Result<(F32Tensors, HashMap<String, String>)> {
    read_tensors(path).map(|(t, info, _)| (t, info))
}

/// `read_f32_tensors` and the dtype most elements are stored in.
fn read_tensors(path: &Path) -> Result<(F32Tensors, HashMap<String, String>, String)> {
    let bytes = read_checked(path)?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| ck_err(path, e.to_string()))?;
    let info = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ck_err(path, e.to_string()))?;
    let mut out = BTreeMap::new();
    // Elements per dtype: the file "stores" the dtype most of its elements have (a bf16
    // model keeps its small gates and scalars f32).
    let mut numel_by_dtype: BTreeMap<String, usize> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let numel = view.shape().iter().product::<usize>();
        *numel_by_dtype.entry(format!("{:?}", view.dtype())).or_default() += numel;
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => {
                raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Dtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        out.insert(name, (view.shape().to_vec(), data));
    }
    let stored = numel_by_dtype
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| d)
        .unwrap_or_else(|| "F32".into());
    Ok((out, info, stored))
}

/// Load a model file written by `save_model`, as f32 (BF16/F16 tensors are widened; ModelMeta's
/// `stored_dtype` tells).
pub fn load_model(path: &Path) -> Result<(Gpt, ModelMeta)> {
    let (tensors, info, stored_dtype) = read_tensors(path)?;
    let config_json = info.get("config").ok_or_else(|| {
        ck_err(path, "no `config` in the metadata; use load_state_dict with a config")
    })?;
    let config: GPTConfig =
        serde_json::from_str(config_json).map_err(|e| ck_err(path, format!("config: {e}")))?;
    let meta = match info.get("meta") {
        Some(m) => serde_json::from_str(m).map_err(|e| ck_err(path, format!("meta: {e}")))?,
        None => serde_json::Value::Null,
    };
    let gpt = build(config.clone(), tensors)?;
    Ok((gpt, ModelMeta { config, meta, stored_dtype }))
}

/// Load a bare state dict (e.g. nanochat's, exported to safetensors; names may carry a
/// `_orig_mod.` prefix from torch.compile) for a known config.
pub fn load_state_dict(path: &Path, config: GPTConfig) -> Result<Gpt> {
    let (tensors, _) = read_f32_tensors(path)?;
    let tensors = tensors
        .into_iter()
        .map(|(n, v)| (n.strip_prefix("_orig_mod.").map(str::to_string).unwrap_or(n), v))
        .collect();
    build(config, tensors)
}

fn build(config: GPTConfig, tensors: F32Tensors) -> Result<Gpt> {
    let mut params = ParamStore::new();
    for (name, (shape, data)) in tensors {
        params.insert(name, Tensor::param(data, &shape)?);
    }
    Gpt::from_params(config, params)
}

/// Save the optimizer's state to `path`.
pub fn save_optimizer(path: &Path, opt: &MuonAdamW) -> Result<()> {
    let (step, bufs) = opt.state_dict()?;
    let tensors: Vec<_> =
        bufs.iter().map(|(n, v)| (n.clone(), vec![v.len()], Dtype::F32, f32_bytes(v))).collect();
    let info = HashMap::from([("step".to_string(), step.to_string())]);
    write_atomic(path, &serialize(&tensors, info, path)?)
}

/// Restore into `opt` (built for the same parameters) what `save_optimizer` wrote.
pub fn load_optimizer(path: &Path, opt: &mut MuonAdamW) -> Result<()> {
    let (tensors, info) = read_f32_tensors(path)?;
    let step = info
        .get("step")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ck_err(path, "no valid `step` in the metadata"))?;
    let bufs = tensors.into_iter().map(|(n, (_, v))| (n, v)).collect();
    opt.load_state_dict(step, &bufs).map_err(|e| ck_err(path, e.to_string()))
}

/// `RUN_DIR/latest.json`: the newest complete checkpoint of a training run.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Latest {
    pub step: usize,
    /// Checkpoint directory, relative to the run directory.
    pub dir: String,
}

/// The newest checkpoint of a run directory, if any: (its directory, its step).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(PathBuf, usize)>> {
    let path = run_dir.join("latest.json");
    if !path.exists() {
        return Ok(None);
    }
    let bytes = fs::read(&path).map_err(|e| ck_err(&path, format!("reading: {e}")))?;
    let latest: Latest =
        serde_json::from_slice(&bytes).map_err(|e| ck_err(&path, e.to_string()))?;
    Ok(Some((run_dir.join(latest.dir), latest.step)))
}

/// Load the newest model of a run directory written by `train` and its tokenizer
/// (`RUN_DIR/tokenizer/`, or `tokenizer_dir` when given). A nanochat directory (its base dir,
/// a `<source>_checkpoints` dir or one model tag in it) is recognised and imported in memory.
/// The weights load as f32 (a BF16 file is widened exactly).
pub fn load_run(
    run_dir: &Path,
    tokenizer_dir: Option<&Path>,
) -> Result<(Gpt, crate::tokenizer::Tokenizer)> {
    load_run_stored(run_dir, tokenizer_dir).map(|(gpt, tok, _)| (gpt, tok))
}

/// `load_run` with the weight matrices held as `dtype`, and a note for the user when that is
/// not the dtype the file stores (a conversion: rounding to bf16, or widening to f32).
pub fn load_run_as(
    run_dir: &Path,
    tokenizer_dir: Option<&Path>,
    dtype: WeightDtype,
) -> Result<(Gpt, crate::tokenizer::Tokenizer, Option<String>)> {
    let (gpt, tok, stored) = load_run_stored(run_dir, tokenizer_dir)?;
    let want = match dtype {
        WeightDtype::F32 => "F32",
        WeightDtype::Bf16 => "BF16",
    };
    let note = match stored {
        Some(s) if s == want => None,
        Some(s) => Some(format!(
            "{}: the checkpoint stores {s} weights; converted to {dtype}",
            run_dir.display()
        )),
        None if dtype != WeightDtype::F32 => {
            Some(format!("{}: weights converted to {dtype}", run_dir.display()))
        }
        None => None,
    };
    Ok((gpt.into_weight_dtype(dtype)?, tok, note))
}

/// `load_run` and the dtype the model file stores (None for a nanochat directory).
fn load_run_stored(
    run_dir: &Path,
    tokenizer_dir: Option<&Path>,
) -> Result<(Gpt, crate::tokenizer::Tokenizer, Option<String>)> {
    if !run_dir.join("latest.json").exists() && crate::nanochat::is_nanochat_dir(run_dir) {
        let (gpt, tok) = crate::nanochat::load_for_serving(run_dir, tokenizer_dir)?;
        return Ok((gpt, tok, None));
    }
    let (dir, _) = latest_checkpoint(run_dir)?.ok_or_else(|| {
        ck_err(
            run_dir,
            "no latest.json: not a run directory written by `train` (nor a nanochat directory), or no checkpoint yet",
        )
    })?;
    let (gpt, meta) = load_model(&dir.join("model.safetensors"))?;
    let tok_dir = tokenizer_dir.map(Path::to_path_buf).unwrap_or_else(|| run_dir.join("tokenizer"));
    let tok = crate::tokenizer::Tokenizer::load(&tok_dir)?;
    check_vocab(run_dir, &tok_dir, &tok, &gpt)?;
    Ok((gpt, tok, Some(meta.stored_dtype)))
}

/// The tokenizer and the model must agree on the vocabulary.
pub(crate) fn check_vocab(
    run_dir: &Path,
    tok_dir: &Path,
    tok: &crate::tokenizer::Tokenizer,
    gpt: &Gpt,
) -> Result<()> {
    if tok.vocab_size() != gpt.config().vocab_size {
        return Err(ck_err(
            run_dir,
            format!(
                "the tokenizer in {} has {} tokens but the model expects {}",
                tok_dir.display(),
                tok.vocab_size(),
                gpt.config().vocab_size
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each save builds its metadata map afresh (a new hash seed, so possibly another order):
    /// the bytes must not depend on it.
    #[test]
    fn the_same_model_saves_to_the_same_bytes() {
        let config = GPTConfig {
            sequence_len: 8,
            vocab_size: 16,
            n_layer: 1,
            n_head: 2,
            n_kv_head: 2,
            n_embd: 32,
            window_pattern: "L".into(),
        };
        let gpt = Gpt::init(config, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let meta = serde_json::json!({ "step": 3, "b": 1, "a": 2 });
        let files: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let p = dir.path().join(format!("m{i}.safetensors"));
                save_model(&p, &gpt, &meta).unwrap();
                fs::read(&p).unwrap()
            })
            .collect();
        assert!(files.iter().all(|f| *f == files[0]));
        let (loaded, m) = load_model(&dir.path().join("m0.safetensors")).unwrap();
        assert_eq!(m.meta, meta);
        assert_eq!(loaded.params().numel(), gpt.params().numel());
    }
}
