//! nanochat's tokenizer files: `tokenizer.pkl` (a pickled tiktoken.Encoding: name, pat_str,
//! mergeable_ranks, special_tokens) and `token_bytes.pt` (int32 UTF-8 byte length of every token,
//! 0 for specials, for bits-per-byte).
use std::path::Path;

use rustc_hash::FxHashMap as HashMap;

use super::pickle::{self, Allow, Key, Pickler, Value};
use super::torch_zip::{self, Data};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

fn tok_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

/// Read nanochat's `tokenizer.pkl` (a pickled tiktoken.Encoding) without Python.
pub fn load_pkl(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| tok_err(path, format!("reading: {e}")))?;
    let root = pickle::unpickle(&bytes, Allow::Tiktoken).map_err(|e| ModelError::Pickle {
        path: path.to_path_buf(),
        entry: "pickle".into(),
        offset: e.offset,
        msg: e.msg,
    })?;
    let state = match &root {
        Value::Object(o) => match &o.state {
            Some(Value::Dict(m)) => m.clone(),
            Some(Value::Str(name)) => {
                return Err(tok_err(
                    path,
                    format!(
                        "pickles tiktoken's registered encoding `{name}` by name, not its ranks"
                    ),
                ));
            }
            _ => return Err(tok_err(path, "the tiktoken.Encoding has no state dict")),
        },
        other => {
            return Err(tok_err(
                path,
                format!("holds a {}, not a tiktoken.Encoding", other.kind()),
            ));
        }
    };
    let field =
        |k: &str| state.get(k).ok_or_else(|| tok_err(path, format!("the Encoding has no `{k}`")));
    let pattern =
        field("pat_str")?.as_str().ok_or_else(|| tok_err(path, "`pat_str` is not a string"))?;
    let ranks_map = field("mergeable_ranks")?
        .as_dict()
        .ok_or_else(|| tok_err(path, "`mergeable_ranks` is not a dict"))?;
    let mut ranks = HashMap::default();
    for (k, v) in &ranks_map.items {
        let (Key::Bytes(b), Some(r)) = (k, v.as_int()) else {
            return Err(tok_err(path, "`mergeable_ranks` is not bytes -> int"));
        };
        let r = u32::try_from(r).map_err(|_| tok_err(path, format!("rank {r} out of range")))?;
        ranks.insert(b.to_vec(), r);
    }
    let mut specials = Vec::new();
    for (k, v) in &field("special_tokens")?
        .as_dict()
        .ok_or_else(|| tok_err(path, "`special_tokens` is not a dict"))?
        .items
    {
        let (Key::Str(name), Some(id)) = (k, v.as_int()) else {
            return Err(tok_err(path, "`special_tokens` is not str -> int"));
        };
        let id = u32::try_from(id)
            .map_err(|_| tok_err(path, format!("special id {id} out of range")))?;
        specials.push((name.to_string(), id));
    }
    Tokenizer::from_parts(ranks, specials, pattern).map_err(|e| tok_err(path, e.to_string()))
}

/// Every token's byte length as nanochat's tok_train computes it (0 for special tokens).
pub fn token_byte_lengths(tok: &Tokenizer) -> Vec<i32> {
    tok.byte_lengths().into_iter().map(|n| n as i32).collect()
}

/// Check nanochat's `token_bytes.pt` against the tokenizer: files from two different
/// tokenizers would give wrong bits-per-byte.
pub fn check_token_bytes(path: &Path, tok: &Tokenizer) -> Result<()> {
    let (mut pt, root) = torch_zip::open(path)?;
    let t = root
        .as_tensor()
        .ok_or_else(|| tok_err(path, format!("holds a {}, not a tensor", root.kind())))?;
    let got = pt.i64s(t, "token_bytes")?;
    let want = token_byte_lengths(tok);
    if got.len() != want.len() {
        return Err(tok_err(
            path,
            format!("has {} entries, the tokenizer {} tokens", got.len(), want.len()),
        ));
    }
    if let Some(id) = (0..want.len()).find(|&i| got[i] != want[i] as i64) {
        return Err(tok_err(
            path,
            format!("token {id} has {} bytes here but {} in tokenizer.pkl", got[id], want[id]),
        ));
    }
    Ok(())
}

/// Write `dir/tokenizer.pkl` and `dir/token_bytes.pt` as nanochat's tok_train does.
pub fn save(tok: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| tok_err(dir, format!("creating: {e}")))?;
    let (ranks, specials) = tok.parts();
    let ranks = ranks
        .iter()
        .enumerate()
        .map(|(id, b)| (Key::Bytes(std::rc::Rc::from(*b)), Value::Int(id as i64)))
        .collect();
    let specials = specials
        .iter()
        .map(|&(n, id)| (Key::Str(std::rc::Rc::from(n)), Value::Int(id as i64)))
        .collect();
    let state = pickle::dict(vec![
        ("name", pickle::str("rustbpe")),
        ("pat_str", pickle::str(tok.pattern())),
        ("mergeable_ranks", pickle::dict_keyed(ranks)),
        ("special_tokens", pickle::dict_keyed(specials)),
    ]);
    // Bytes need protocol 3.
    let mut p = Pickler::new(3);
    p.tiktoken_encoding(&state);
    crate::checkpoint::write_atomic(&dir.join("tokenizer.pkl"), &p.finish())?;
    let lengths = token_byte_lengths(tok);
    torch_zip::write(&dir.join("token_bytes.pt"), |w| {
        let t = w.tensor(&[lengths.len()], Data::I32(&lengths))?;
        let mut p = Pickler::new(2);
        p.tensor(&t);
        Ok(p.finish())
    })
}
