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
    /// field, .parquet with a `text` column, or directories of those.
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
    // A reader thread parses and cuts documents while the pool splits and counts the previous
    // batch: reading is sequential, counting parallel, so overlapping them hides the reading.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<String>>>(4);
    let (max_chars, doc_cap) = (args.max_chars, args.doc_cap);
    let reader = std::thread::spawn(move || -> (u64, usize) {
        let (mut chars, mut n_docs) = (0u64, 0usize);
        let mut batch = Vec::with_capacity(256);
        for doc in docs::documents(&files) {
            let mut doc = match doc {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return (chars, n_docs);
                }
            };
            if let Some((cut, _)) = doc.char_indices().nth(doc_cap) {
                doc.truncate(cut);
            }
            chars += doc.chars().count() as u64;
            n_docs += 1;
            batch.push(doc);
            let done = chars >= max_chars;
            if (batch.len() == 256 || done) && tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                break;
            }
            if done {
                break;
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch));
        }
        (chars, n_docs)
    });
    let mut counter = ChunkCounter::new()?;
    let mut seen = 0usize;
    for batch in rx {
        let batch = batch?;
        seen += batch.len();
        counter.add(&batch)?;
        bar.set_position(bar.position() + batch.iter().map(|d| d.len() as u64).sum::<u64>());
        bar.set_message(format!("{seen} docs"));
    }
    let (chars, n_docs) =
        reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
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
        let docs: Vec<String> =
            docs::documents(std::slice::from_ref(&file)).collect::<Result<_>>()?;
        let bytes: usize = docs.iter().map(String::len).sum();
        // Only encoding is timed (not reading the file), for throughput comparisons.
        let t0 = Instant::now();
        let tokens: usize = tok.encode_batch(&docs).iter().map(Vec::len).sum();
        let secs = t0.elapsed().as_secs_f64();
        let ratio = bytes as f64 / tokens.max(1) as f64;
        let mbps = bytes as f64 / 1e6 / secs.max(1e-9);
        let line = serde_json::json!({"file": file, "bytes": bytes, "tokens": tokens,
                                      "bytes_per_token": ratio, "seconds": secs, "mb_per_s": mbps});
        if args.json {
            println!("{line}");
        } else {
            println!(
                "{:<50} {bytes:>12} bytes {tokens:>10} tokens {ratio:>6.3} bytes/token {mbps:>8.2} MB/s",
                file.display()
            );
        }
    }
    Ok(())
}
