//! `train`: the researcher's entry point — tokenizer, base pretraining, parity checks.
use std::process::ExitCode;

use std::collections::BTreeSet;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

mod base;
mod batches;
mod bench;
mod docs;
#[allow(dead_code)] // the evaluators land in the next commit
mod eval;
mod loader;
mod parity;
mod plot;
mod pyrandom;
mod recipe;
mod rundir;
mod tasks;
mod tokenizer_cmd;
mod trainer;

#[derive(Parser)]
#[command(name = "train", version, about = "femtochat: train and check nanochat models in Rust")]
struct Cli {
    /// Worker threads for every kernel (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a byte-level BPE tokenizer (rustbpe-compatible) and write DIR/tokenizer.tiktoken.
    Tokenizer(tokenizer_cmd::Args),
    /// Report a tokenizer's compression (bytes per token) on text files.
    TokenizerEval(tokenizer_cmd::EvalArgs),
    /// Pretrain a GPT from scratch (resumable; metrics in RUN_DIR/metrics.jsonl).
    Base(Box<base::Args>),
    /// Check the model and optimizer against PyTorch reference fixtures.
    ///
    /// Each FIXTURE is a `<case>.safetensors` with a `<case>.json` beside it (the format of
    /// nanochat's fixture exporter: config, inputs, logits, loss, gradients, the parameters after
    /// one MuonAdamW step, KV-cache decode logits). Prints the relative L2 error of every
    /// quantity and exits with status 1 if any is above its tolerance.
    Parity(parity::Args),
    /// Time full training steps (forward, backward, optimizer) on random tokens; one JSON line
    /// per step with ms, tokens/s, TFLOP/s and (with --peak-flops) MFU.
    Bench(bench::Args),
    /// Write the token rows `train base` would train and validate on (u32 files + meta.json),
    /// for training a reference implementation on exactly the same data.
    Batches(batches::Args),
}

/// Argument ids of the subcommand that the user gave on the command line (not defaults): a
/// resumed run refuses only the flags the user actually passed.
fn explicit_args(matches: &ArgMatches) -> BTreeSet<String> {
    let Some((_, sub)) = matches.subcommand() else { return BTreeSet::new() };
    sub.ids()
        .filter(|id| sub.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let explicit = explicit_args(&matches);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()
    {
        eprintln!("error: --threads: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Tokenizer(args) => tokenizer_cmd::main(args).map(|()| ExitCode::SUCCESS),
        Command::TokenizerEval(args) => tokenizer_cmd::eval(args).map(|()| ExitCode::SUCCESS),
        Command::Base(args) => base::main(*args, &explicit).map(|()| ExitCode::SUCCESS),
        Command::Parity(args) => parity::main(args),
        Command::Bench(args) => bench::main(args).map(|()| ExitCode::SUCCESS),
        Command::Batches(args) => batches::main(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
