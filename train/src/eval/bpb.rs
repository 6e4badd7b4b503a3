//! Validation bits per byte of a checkpoint (SPEC.md §8), on the rows `train base` validates on.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use femtochat_model::Gpt;
use femtochat_model::tokenizer::Tokenizer;

use crate::loader::ValSet;
use crate::trainer::Validator;

/// Bits per byte over up to `tokens` tokens of `files` (rows of the model's context, packed as
/// `train base` packs its validation split); returns (bpb, tokens evaluated).
pub fn run(
    gpt: &Gpt,
    tok: Arc<Tokenizer>,
    files: Vec<PathBuf>,
    tokens: usize,
    batch: usize,
) -> Result<(f64, usize)> {
    let mut val = ValSet::new(files, tok, gpt.config().sequence_len, batch, tokens)?;
    let bpb = val.val_bpb(gpt)?;
    Ok((bpb, val.tokens()))
}
