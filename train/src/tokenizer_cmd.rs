//! `train tokenizer` and `train tokenizer-eval`.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use femtochat_model::tokenizer::{ChunkCounter, Tokenizer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::docs;

#[derive(clap::Args)]
pub struct Args {
    /// Training text: .txt (documents separated by blank lines), .jsonl / .jsonl.gz with a `text`
    /// field, or directories of those.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Vocabulary size, the 9 special tokens included (nanochat: 32768).
    #[arg(long, default_value_t = 32768)]
    vocab_size: usize,
    /// Stop reading after this many characters (the document crossing the limit is kept whole).
    #[arg(long, default_value_t = 10_000_000_000)]
    max_chars: u64,
    /// Cut every document to its first N characters.
    #[arg(long, default_value_t = 10_000)]
    doc_cap: usize,
    /// Output directory: writes tokenizer.tiktoken and tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

pub fn main(args: Args) -> Result<()> {
    if args.vocab_size < 265 {
        bail!("--vocab-size must be at least 265 (256 bytes + 9 special tokens)");
    }
    let files = docs::expand(&args.input)?;
    let t0 = Instant::now();
    let bar = ProgressBar::new(args.max_chars.min(u64::MAX / 2));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} reading {msg} {human_pos} chars [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut counter = ChunkCounter::new()?;
    let (mut chars, mut n_docs) = (0u64, 0usize);
    let mut batch = Vec::new();
    for doc in docs::documents(&files) {
        let doc = doc?;
        let cut: String = doc.chars().take(args.doc_cap).collect();
        chars += cut.chars().count() as u64;
        n_docs += 1;
        batch.push(cut);
        if batch.len() == 256 {
            counter.add(&batch)?;
            batch.clear();
            bar.set_position(chars);
            bar.set_message(format!("{n_docs} docs"));
        }
        if chars >= args.max_chars {
            break;
        }
    }
    counter.add(&batch)?;
    bar.finish_and_clear();
    if n_docs == 0 {
        bail!("no documents in {:?}", args.input);
    }
    eprintln!(
        "{n_docs} documents, {chars} chars, {} distinct chunks; training...",
        counter.distinct()
    );
    let tok = counter.train(args.vocab_size)?;
    tok.save(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({} tokens) in {secs:.1}s",
        args.out.join("tokenizer.tiktoken").display(),
        tok.vocab_size()
    );
    println!(
        "{}",
        serde_json::json!({ "vocab_size": tok.vocab_size(), "docs": n_docs, "chars": chars, "seconds": secs,
                            "out": args.out })
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Directory with tokenizer.tiktoken and tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Text files to measure (same formats as `train tokenizer`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print JSON lines only.
    #[arg(long)]
    json: bool,
}

/// Compression ratio: bytes of text per token.
pub fn eval(args: EvalArgs) -> Result<()> {
    let tok = Tokenizer::load(&args.tokenizer)?;
    for file in docs::expand(&args.files)? {
        let (mut bytes, mut tokens) = (0usize, 0usize);
        let docs: Vec<String> =
            docs::documents(std::slice::from_ref(&file)).collect::<Result<_>>()?;
        for ids in tok.encode_batch(&docs) {
            tokens += ids.len();
        }
        bytes += docs.iter().map(String::len).sum::<usize>();
        let ratio = bytes as f64 / tokens.max(1) as f64;
        let line = serde_json::json!({"file": file, "bytes": bytes, "tokens": tokens, "bytes_per_token": ratio});
        if args.json {
            println!("{line}");
        } else {
            println!(
                "{:<50} {bytes:>12} bytes {tokens:>10} tokens {ratio:>6.3} bytes/token",
                file.display()
            );
        }
    }
    Ok(())
}
