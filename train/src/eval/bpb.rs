//! Validation bits per byte of a checkpoint (docs/reference.md §8), on the rows `train base` validates on.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::core_tests::{fixture_tokenizer, tiny_gpt};

    /// With a zero lm head every token costs ln V nats, so bits per byte is known exactly from
    /// the rows: (counted targets x ln V) / (ln 2 x their bytes).
    #[test]
    fn a_uniform_model_scores_log2_v_per_token_over_bytes() {
        let tok = Arc::new(fixture_tokenizer());
        let gpt = tiny_gpt(tok.vocab_size(), 64);
        gpt.params().get("lm_head.weight").unwrap().with_data_mut(|d| d.fill(0.0)).unwrap();
        let files = vec![crate::base::default_data().unwrap().join("val.jsonl.gz")];
        let (bpb, tokens) = run(&gpt, tok.clone(), files.clone(), 1024, 4).unwrap();
        assert_eq!(tokens, 1024);
        let val = ValSet::new(files, tok.clone(), 64, 4, 1024).unwrap();
        let (mut n, mut bytes) = (0u64, 0u64);
        for row in val.rows() {
            for &t in &row[1..] {
                let b = val.token_bytes()[t as usize] as u64;
                n += (b > 0) as u64;
                bytes += b;
            }
        }
        let want =
            n as f64 * (tok.vocab_size() as f64).ln() / (std::f64::consts::LN_2 * bytes as f64);
        assert!((bpb - want).abs() < 1e-4 * want, "{bpb} vs {want}");
    }
}
