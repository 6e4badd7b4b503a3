//! `train`: the researcher's entry point — tokenizer, base pretraining, evaluation, parity.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod parity;
mod trainer;

#[derive(Parser)]
#[command(name = "train", version, about = "femtochat: train and check nanochat models in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the model and optimizer against PyTorch reference fixtures.
    ///
    /// Each FIXTURE is a `<case>.safetensors` with a `<case>.json` beside it (the format of
    /// nanochat's fixture exporter: config, inputs, logits, loss, gradients, the parameters after
    /// one MuonAdamW step, KV-cache decode logits). Prints the relative L2 error of every
    /// quantity and exits with status 1 if any is above its tolerance.
    Parity(parity::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Parity(args) => parity::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
