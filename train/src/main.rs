//! `train`: the researcher's entry point — tokenizer, base pretraining, evaluation, parity checks.
use std::process::ExitCode;

use std::collections::BTreeSet;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use femtochat_engine::{AdapterChoice, select_adapter};

mod base;
mod batches;
mod bench;
mod bench_infer;
mod chat_data;
mod dist;
mod docs;
mod eval;
mod interop;
mod loader;
mod micro;
mod packing;
mod parity;
mod plot;
mod pyrandom;
mod recipe;
mod report;
mod rl;
mod rundir;
mod sft;
mod sweep;
mod sweep_report;
mod tasks;
mod tokenizer_cmd;
mod trainer;

#[derive(Parser)]
#[command(name = "train", version, about = "femtochat: train and check nanochat models in Rust")]
struct Cli {
    /// Worker threads for every kernel (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// MiB of freed tensor buffers the engine keeps for reuse (default 4096). Reuse saves the
    /// page faults of fresh memory every step; the kept buffers count in the process's memory,
    /// so a tight memory budget lowers this (0 turns reuse off).
    #[arg(long, global = true)]
    pool_mib: Option<usize>,
    /// GPU adapter for `--device gpu`, by index among the machine's adapters (default: wgpu's
    /// high-performance one; under mpirun/srun, the rank's local rank modulo the adapters, so each
    /// rank of a multi-GPU machine gets its own). FEMTOCHAT_GPU_INDEX does the same.
    #[arg(long, global = true)]
    gpu_index: Option<usize>,
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
    /// Supervised fine-tuning: turn a base run into a chat model (nanochat's chat_sft).
    ///
    /// Conversations (the mixture bundled in data/sft/ by default) are packed best-fit with
    /// BOS padding, so none is cut; only the assistant's tokens are learned. Batch geometry and
    /// LRs come from the base run unless given; every LR x 0.8, warmdown over the last half,
    /// optimizer warm-started from the base checkpoint, one epoch unless --num-iterations.
    /// Writes the same run directory as `train base`: `serve --checkpoint OUT` chats with it.
    Sft(Box<sft::Args>),
    /// Mid-training (nanochat's earlier mid_train): the same conversations packed like
    /// pretraining (best fit with cropping) and learned on every token, LRs x 1, warmdown over
    /// the last 20%. Same flags and run directory as `train sft`.
    Mid(Box<sft::Args>),
    /// Reinforcement learning on GSM8K (nanochat's chat_rl): sample completions with the
    /// calculator, reward correct answers, policy gradient with a per-question baseline.
    ///
    /// Each step samples --num-samples completions for each of --examples-per-step training
    /// problems; advantage = reward - the question's mean reward; the loss is the token-level
    /// policy gradient over the sampled tokens only (tool outputs excluded). Fresh optimizer,
    /// LRs x 0.05 ramping linearly to 0 over one epoch; pass@k on GSM8K test every
    /// --eval-every steps. Same run directory as every stage: `serve --checkpoint OUT`.
    Rl(Box<rl::Args>),
    /// The report card of a pipeline (nanochat's report.md): machine, commit, tokenizer
    /// compression, each stage's command, time, tokens, throughput, MFU and scores, plots, and
    /// a metric x stage summary. Writes OUT/report.md, OUT/report.json and OUT/*.svg.
    ///
    /// Example: train report runs/tok runs/base runs/sft runs/rl --out runs/report
    Report(report::Args),
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
    /// Time inference on the CPU (nanochat's infer_bench): per decode batch size, time to first
    /// token, prefill tok/s, decode step latency and tok/s, bytes read per step and MBU. A table
    /// on stderr, one JSON line per batch size on stdout.
    BenchInfer(bench_infer::Args),
    /// Write the token rows `train base` would train and validate on (u32 files + meta.json),
    /// for training a reference implementation on exactly the same data.
    Batches(batches::Args),
    /// Train a character-level bigram or mini-GPT on the scalar (f64, micrograd-style) or the
    /// tensor engine: the same model and initial numbers on both; optional sampling.
    Micro(Box<micro::Args>),
    /// Run every combination of a grid of `train micro` or `train base` options (each in its own
    /// directory, resumable, optionally over several seeds) and rank them: OUT/summary.csv,
    /// summary.jsonl, summary.md (mean ± std over seeds), loss.svg, val.svg.
    ///
    /// Example: train --threads 1 sweep --grid 'tie_lm_head=true,false input_rmsnorm=true,false'
    /// --steps 300 --seeds 3 --jobs 2 --out results/tie-norm -- micro --model mini-gpt
    Sweep(sweep::Args),
    /// Import a PyTorch nanochat checkpoint (model_<step>.pt, meta, tokenizer.pkl, optionally
    /// the optimizer state) into a new run directory, without Python.
    ///
    /// NANOCHAT_DIR is nanochat's base directory ($NANOCHAT_BASE_DIR, default
    /// ~/.cache/nanochat), one of its <source>_checkpoints directories, or a tag directory. The
    /// run directory works with `serve`, `train base --resume` and every stage that reads runs;
    /// RUN_DIR/imported.json records where it came from.
    ImportNanochat(interop::ImportArgs),
    /// Export a run's latest checkpoint into nanochat's layout (tokenizer/tokenizer.pkl,
    /// token_bytes.pt, <source>_checkpoints/<tag>/model_<step>.pt, meta_<step>.json,
    /// optim_<step>_rank0.pt) for nanochat's chat_cli, chat_eval, base_eval and chat_sft.
    ExportNanochat(interop::ExportArgs),
    /// Score a checkpoint as nanochat does: CORE (base models), bits per byte, chat tasks and
    /// ChatCORE (chat models). JSON lines on stdout and in RUN_DIR/eval/.
    Eval(eval::Args),
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

/// Counts every heap byte, for the peak memory that `bench`, `base` and `sft` report.
#[global_allocator]
static ALLOC: femtochat_engine::mem::CountingAlloc = femtochat_engine::mem::CountingAlloc;

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
    if let Some(mib) = cli.pool_mib {
        femtochat_engine::set_pool_limit(mib << 20);
    }
    if let Err(e) = femtochat_engine::cpu_isa::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let adapter = match (cli.gpu_index, dist::local_rank()) {
        (Some(i), _) => Some(AdapterChoice::Index(i)),
        (None, Some(r)) if std::env::var_os("FEMTOCHAT_GPU_INDEX").is_none() => {
            Some(AdapterChoice::LocalRank(r))
        }
        _ => None,
    };
    if let Some(choice) = adapter
        && let Err(e) = select_adapter(choice)
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // One rank of an MPI job when launched by mpirun/srun (feature `mpi`); MPI is finalised
    // when `_mpi` drops, after the command.
    let _mpi = match dist::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Tokenizer(args) => tokenizer_cmd::main(args).map(|()| ExitCode::SUCCESS),
        Command::TokenizerEval(args) => tokenizer_cmd::eval(args).map(|()| ExitCode::SUCCESS),
        Command::Base(args) => base::main(*args, &explicit).map(|()| ExitCode::SUCCESS),
        Command::Sft(args) => {
            sft::main(*args, sft::Stage::Sft, &explicit).map(|()| ExitCode::SUCCESS)
        }
        Command::Mid(args) => {
            sft::main(*args, sft::Stage::Mid, &explicit).map(|()| ExitCode::SUCCESS)
        }
        Command::Rl(args) => rl::main(*args, &explicit).map(|()| ExitCode::SUCCESS),
        Command::Report(args) => report::main(args).map(|()| ExitCode::SUCCESS),
        Command::Parity(args) => parity::main(args),
        Command::Bench(args) => bench::main(args).map(|()| ExitCode::SUCCESS),
        Command::BenchInfer(args) => bench_infer::main(args).map(|()| ExitCode::SUCCESS),
        Command::Batches(args) => batches::main(args).map(|()| ExitCode::SUCCESS),
        Command::Micro(args) => micro::main(*args).map(|()| ExitCode::SUCCESS),
        Command::Sweep(args) => sweep::main(args, cli.threads).map(|()| ExitCode::SUCCESS),
        Command::ImportNanochat(args) => interop::import_main(args).map(|()| ExitCode::SUCCESS),
        Command::ExportNanochat(args) => interop::export_main(args).map(|()| ExitCode::SUCCESS),
        Command::Eval(args) => eval::main(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) if dist::world().size() > 1 => {
            // The other ranks may wait in a collective this rank will never join: stop them.
            let w = dist::world();
            eprintln!("error (rank {} of {}): {e:#}", w.rank(), w.size());
            w.abort(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
