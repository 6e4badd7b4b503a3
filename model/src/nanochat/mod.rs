//! Interoperation with PyTorch nanochat's files, without Python: its directory layout
//! ($NANOCHAT_BASE_DIR), checkpoints (`model_<step>.pt`, `meta_<step>.json`,
//! `optim_<step>_rank<r>.pt`) and tokenizer (`tokenizer/tokenizer.pkl`, `token_bytes.pt`).
//!
//! ```text
//! NANOCHAT_DIR/
//!   tokenizer/{tokenizer.pkl, token_bytes.pt}
//!   base_checkpoints/<tag>/{model_<step>.pt, meta_<step>.json, optim_<step>_rank<r>.pt}
//!   chatsft_checkpoints/<tag>/...   chatrl_checkpoints/<tag>/...
//! ```
//! State-dict names are femtochat's parameter names; checkpoints written by a torch.compile'd
//! model carry an `_orig_mod.` prefix, which is stripped, and bf16/f16 tensors are widened to
//! f32, as nanochat's `build_model` does. Older checkpoints get nanochat's patches: a missing
//! `window_pattern` is "L", missing `resid_lambdas` are 1 and missing `x0_lambdas` 0.
pub mod optim;
pub mod pickle;
mod tokenizer;
pub mod torch_zip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use femtochat_engine::{ParamStore, Tensor};

pub use tokenizer::{
    check_token_bytes, load_pkl as load_tokenizer_pkl, save as save_tokenizer, token_byte_lengths,
};

use crate::config::GPTConfig;
use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::tokenizer::Tokenizer;

/// Which training stage's checkpoints: nanochat's `--source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Base,
    Sft,
    Rl,
}

impl Source {
    /// The directory under NANOCHAT_DIR holding this source's model tags.
    pub fn dir_name(self) -> &'static str {
        match self {
            Source::Base => "base_checkpoints",
            Source::Sft => "chatsft_checkpoints",
            Source::Rl => "chatrl_checkpoints",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Source::Base => "base",
            Source::Sft => "sft",
            Source::Rl => "rl",
        }
    }

    /// Order in which a source is picked when none is given: the chat models first, as
    /// nanochat's chat_cli (default `sft`), then RL, then the base model.
    pub const PREFERENCE: [Source; 3] = [Source::Sft, Source::Rl, Source::Base];
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Source, String> {
        match s {
            "base" => Ok(Source::Base),
            "sft" => Ok(Source::Sft),
            "rl" => Ok(Source::Rl),
            _ => Err(format!("unknown source `{s}` (base, sft or rl)")),
        }
    }
}

fn nc_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

/// One checkpoint in a nanochat directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// NANOCHAT_DIR (holds `tokenizer/`).
    pub root: PathBuf,
    pub source: Source,
    pub tag: String,
    pub step: u64,
    /// `root/<source dir>/<tag>`.
    pub dir: PathBuf,
}

impl Located {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(format!("model_{:06}.pt", self.step))
    }

    pub fn meta_path(&self) -> PathBuf {
        self.dir.join(format!("meta_{:06}.json", self.step))
    }

    /// `optim_<step>_rank<r>.pt` for r = 0, 1, ... while they exist.
    pub fn optimizer_paths(&self) -> Vec<PathBuf> {
        (0..)
            .map(|r| self.dir.join(format!("optim_{:06}_rank{r}.pt", self.step)))
            .take_while(|p| p.is_file())
            .collect()
    }
}

/// Whether `path` looks like a nanochat directory: NANOCHAT_DIR itself (a `tokenizer/tokenizer.pkl`
/// or a `*_checkpoints` directory), one `<source>_checkpoints` directory, or one model tag in it.
pub fn is_nanochat_dir(path: &Path) -> bool {
    split_path(path).is_some()
}

/// (root, source, tag) named by a path at any of the three levels.
fn split_path(path: &Path) -> Option<(PathBuf, Option<Source>, Option<String>)> {
    let source_of = |p: &Path| {
        let name = p.file_name()?.to_str()?;
        Source::PREFERENCE.into_iter().find(|s| s.dir_name() == name)
    };
    if !path.is_dir() {
        return None;
    }
    if path.join("tokenizer").join("tokenizer.pkl").is_file()
        || Source::PREFERENCE.iter().any(|s| path.join(s.dir_name()).is_dir())
    {
        return Some((path.to_path_buf(), None, None));
    }
    if let Some(s) = source_of(path) {
        return Some((path.parent()?.to_path_buf(), Some(s), None));
    }
    let parent = path.parent()?;
    let s = source_of(parent)?;
    let tag = path.file_name()?.to_str()?.to_string();
    Some((parent.parent()?.to_path_buf(), Some(s), Some(tag)))
}

/// Steps of the `model_<step>.pt` files in a tag directory.
fn steps(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("model_")?.strip_suffix(".pt")?.parse().ok()
        })
        .collect()
}

/// nanochat's `find_largest_model`: the `d<N>` tag with the largest N, else the most recently
/// modified tag directory.
fn largest_tag(dir: &Path) -> Result<String> {
    let entries = std::fs::read_dir(dir).map_err(|e| nc_err(dir, format!("reading: {e}")))?;
    let mut tags: Vec<(String, std::time::SystemTime)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.metadata().ok()?;
            meta.is_dir().then(|| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    meta.modified().ok().unwrap_or(std::time::UNIX_EPOCH),
                )
            })
        })
        .collect();
    // Python's re.match(r"d(\d+)") matches a prefix: "d20" and "d20-long" are depth 20.
    let depth = |t: &str| -> Option<u64> {
        let digits: String =
            t.strip_prefix('d')?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((t, _)) =
        tags.iter().filter_map(|(t, _)| Some((t, depth(t)?))).max_by_key(|(_, d)| *d)
    {
        return Ok(t.clone());
    }
    tags.into_iter()
        .max_by_key(|(_, m)| *m)
        .map(|(t, _)| t)
        .ok_or_else(|| nc_err(dir, "no model tags (subdirectories) here"))
}

/// Find a checkpoint: `source` (default: the first of sft, rl, base present), `tag` (default:
/// the largest, as nanochat's find_largest_model) and `step` (default: the last).
pub fn locate(
    path: &Path,
    source: Option<Source>,
    tag: Option<&str>,
    step: Option<u64>,
) -> Result<Located> {
    let (root, path_source, path_tag) =
        split_path(path).ok_or_else(|| nc_err(path, "not a nanochat directory: no tokenizer/tokenizer.pkl and no base_checkpoints, chatsft_checkpoints or chatrl_checkpoints"))?;
    let source = match source.or(path_source) {
        Some(s) => s,
        None => {
            Source::PREFERENCE.into_iter().find(|s| root.join(s.dir_name()).is_dir()).ok_or_else(
                || nc_err(&root, "no base_checkpoints, chatsft_checkpoints or chatrl_checkpoints"),
            )?
        }
    };
    let src_dir = root.join(source.dir_name());
    if !src_dir.is_dir() {
        return Err(nc_err(
            &src_dir,
            format!("no {} checkpoints (missing directory)", source.name()),
        ));
    }
    let tag = match tag.map(str::to_string).or(path_tag) {
        Some(t) => t,
        None => largest_tag(&src_dir)?,
    };
    let dir = src_dir.join(&tag);
    let all = steps(&dir);
    let step = match step {
        Some(s) if all.contains(&s) => s,
        Some(s) => return Err(nc_err(&dir, format!("no model_{s:06}.pt (steps here: {all:?})"))),
        None => *all.iter().max().ok_or_else(|| nc_err(&dir, "no model_<step>.pt checkpoints"))?,
    };
    Ok(Located { root, source, tag, step, dir })
}

/// `meta_<step>.json` with nanochat's config patch applied; returns (config, meta).
pub fn read_meta(loc: &Located) -> Result<(GPTConfig, serde_json::Value)> {
    let path = loc.meta_path();
    let bytes = std::fs::read(&path).map_err(|e| nc_err(&path, format!("reading: {e}")))?;
    let meta: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| nc_err(&path, format!("not JSON: {e}")))?;
    let mut cfg =
        meta.get("model_config").cloned().ok_or_else(|| nc_err(&path, "no `model_config`"))?;
    if let Some(obj) = cfg.as_object_mut() {
        // Old models were trained with full context (nanochat's _patch_missing_config_keys).
        obj.entry("window_pattern").or_insert_with(|| "L".into());
    }
    let config: GPTConfig =
        serde_json::from_value(cfg).map_err(|e| nc_err(&path, format!("model_config: {e}")))?;
    config.validate().map_err(|e| nc_err(&path, e.to_string()))?;
    Ok((config, meta))
}

/// A nanochat state dict (`model_<step>.pt`) as a model of `config`.
pub fn load_state_dict(path: &Path, config: GPTConfig) -> Result<Gpt> {
    let (mut pt, root) = torch_zip::open(path)?;
    let dict = root
        .as_dict()
        .ok_or_else(|| nc_err(path, format!("holds a {}, not a state dict", root.kind())))?;
    let mut tensors = BTreeMap::new();
    for (k, v) in &dict.items {
        let pickle::Key::Str(name) = k else {
            return Err(nc_err(path, "a state-dict key is not a string"));
        };
        let name = name.strip_prefix("_orig_mod.").unwrap_or(name).to_string();
        let t = v
            .as_tensor()
            .ok_or_else(|| nc_err(path, format!("`{name}` is a {}, not a tensor", v.kind())))?;
        if tensors.contains_key(&name) {
            return Err(nc_err(
                path,
                format!("`{name}` appears twice (with and without _orig_mod.)"),
            ));
        }
        let value = pt.f32s(t, &name)?;
        tensors.insert(name, value);
    }
    // nanochat's _patch_missing_keys for checkpoints older than these scalars.
    let n = config.n_layer;
    tensors.entry("resid_lambdas".into()).or_insert_with(|| (vec![n], vec![1.0; n]));
    tensors.entry("x0_lambdas".into()).or_insert_with(|| (vec![n], vec![0.0; n]));
    let mut params = ParamStore::new();
    for (name, (shape, data)) in tensors {
        params.insert(name, Tensor::param(data, &shape)?);
    }
    Gpt::from_params(config, params).map_err(|e| nc_err(path, e.to_string()))
}

/// Read nanochat's tokenizer directory (`tokenizer.pkl`, checked against `token_bytes.pt` when
/// that exists).
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let tok = load_tokenizer_pkl(&dir.join("tokenizer.pkl"))?;
    let tb = dir.join("token_bytes.pt");
    if tb.is_file() {
        check_token_bytes(&tb, &tok)?;
    }
    Ok(tok)
}

/// A located checkpoint's model, config-checked, and its metadata.
pub fn load_model(loc: &Located) -> Result<(Gpt, serde_json::Value)> {
    let (config, meta) = read_meta(loc)?;
    Ok((load_state_dict(&loc.model_path(), config)?, meta))
}

/// `serve --checkpoint NANOCHAT_DIR`: the model (default source, largest tag, last step) and
/// the tokenizer (`NANOCHAT_DIR/tokenizer`, or `tokenizer_dir`), imported in memory.
pub fn load_for_serving(path: &Path, tokenizer_dir: Option<&Path>) -> Result<(Gpt, Tokenizer)> {
    let loc = locate(path, None, None, None)?;
    let (gpt, _) = load_model(&loc)?;
    let tok_dir =
        tokenizer_dir.map(Path::to_path_buf).unwrap_or_else(|| loc.root.join("tokenizer"));
    let tok = if tok_dir.join("tokenizer.pkl").is_file() {
        load_tokenizer(&tok_dir)?
    } else if tok_dir.join("tokenizer.json").is_file() {
        Tokenizer::load(&tok_dir)?
    } else {
        return Err(nc_err(
            &tok_dir,
            "no tokenizer.pkl (nanochat) or tokenizer.json (femtochat) here",
        ));
    };
    crate::checkpoint::check_vocab(path, &tok_dir, &tok, &gpt)?;
    Ok((gpt, tok))
}

/// Write a model as nanochat's `model_<step>.pt` (f32 state dict, torch.save layout).
pub fn save_state_dict(path: &Path, gpt: &Gpt) -> Result<()> {
    torch_zip::write(path, |w| {
        let mut tensors = Vec::new();
        // One parameter on the host at a time.
        for (name, t) in gpt.params().iter() {
            let data = t.try_to_vec().map_err(std::io::Error::other)?;
            tensors.push((name.to_string(), w.tensor(t.shape(), torch_zip::Data::F32(&data))?));
        }
        let mut p = pickle::Pickler::new(2);
        p.ordered_dict(&mut |p| {
            for (name, t) in &tensors {
                p.str(name);
                p.tensor(t);
            }
        });
        Ok(p.finish())
    })
}
