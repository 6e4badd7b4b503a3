//! `train batches`: write the exact token rows `train base` trains and validates on, so an
//! external reference (benches/train_vs_pytorch.py) trains on the same data.
//!
//! DIR/train.u32: (micro_batches, B, T + 1) little-endian u32 rows from the best-fit loader;
//! DIR/val.u32: (val_rows, T + 1); DIR/token_bytes.u32: (V) UTF-8 length of every token (0 for
//! specials); DIR/meta.json: the sizes.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_model::checkpoint::write_atomic;
use femtochat_model::tokenizer::Tokenizer;

use crate::base::default_data;
use crate::docs;
use crate::loader::{BestFitLoader, ValSet};
use crate::trainer::BatchSource;

#[derive(clap::Args)]
pub struct Args {
    /// Tokenizer directory (as `train base --tokenizer`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Data files or directories (default: the bundled corpus; the last file is validation).
    #[arg(long)]
    data: Vec<PathBuf>,
    #[arg(long, default_value_t = 32)]
    device_batch_size: usize,
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Training micro-batches to write (steps x gradient accumulation of the run to mirror).
    #[arg(long)]
    micro_batches: usize,
    /// Validation tokens (as `train base --eval-tokens`).
    #[arg(long, default_value_t = 1 << 16)]
    eval_tokens: usize,
    #[arg(long)]
    out: PathBuf,
}

fn u32_bytes(xs: impl Iterator<Item = u32>) -> Vec<u8> {
    xs.flat_map(u32::to_le_bytes).collect()
}

pub fn main(a: Args) -> Result<()> {
    if a.device_batch_size == 0 || a.max_seq_len == 0 || a.micro_batches == 0 {
        bail!("--device-batch-size, --max-seq-len and --micro-batches must be positive");
    }
    let tok = Arc::new(
        Tokenizer::load(&a.tokenizer)
            .with_context(|| format!("loading tokenizer {}", a.tokenizer.display()))?,
    );
    let data = if a.data.is_empty() { vec![default_data()?] } else { a.data.clone() };
    let mut files = docs::expand(&data)?;
    if files.len() < 2 {
        bail!("need at least two data files (the last is the validation split)");
    }
    let val_files = vec![files.pop().context("files is not empty")?];
    let (b, t) = (a.device_batch_size, a.max_seq_len);
    let mut loader = BestFitLoader::new(files, tok.clone(), b, t, true)?;
    let mut train = Vec::with_capacity(a.micro_batches * b * (t + 1));
    for _ in 0..a.micro_batches {
        let batch = loader.next_batch()?;
        // Rows of T + 1 back from (inputs, targets): row = inputs[r] ++ [last target].
        for r in 0..b {
            train.extend_from_slice(&batch.inputs[r * t..(r + 1) * t]);
            train.push(batch.targets[(r + 1) * t - 1] as u32);
        }
    }
    let val = ValSet::new(val_files, tok.clone(), t, b, a.eval_tokens)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_atomic(&a.out.join("train.u32"), &u32_bytes(train.into_iter()))?;
    write_atomic(&a.out.join("val.u32"), &u32_bytes(val.rows().iter().flatten().copied()))?;
    write_atomic(&a.out.join("token_bytes.u32"), &u32_bytes(val.token_bytes().iter().copied()))?;
    let meta = serde_json::json!({
        "batch": b, "seq_len": t, "micro_batches": a.micro_batches,
        "val_rows": val.rows().len(), "vocab_size": tok.vocab_size(),
    });
    write_atomic(&a.out.join("meta.json"), serde_json::to_string_pretty(&meta)?.as_bytes())?;
    println!("{meta}");
    Ok(())
}
