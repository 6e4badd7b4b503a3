//! `serve`: talk to a trained model. `serve --checkpoint RUN_DIR` starts the OpenAI-compatible
//! HTTP API and web chat; `serve chat` and `serve generate` are the terminal front ends.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use femtochat_engine::Device;
use femtochat_model::checkpoint::load_run_as;
use femtochat_model::generate::{Finish, generate};
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation, StreamDecoder, Tokenizer};
use femtochat_model::{Gpt, ModelError, WeightDtype};
use femtochat_serve::cache::CacheConfig;
use femtochat_serve::http::AppState;
use femtochat_serve::scheduler::{Engine, EngineConfig};
use femtochat_serve::server::{HttpConfig, MAX_BODY_BYTES, start};

/// With no subcommand, `serve` is the HTTP server.
#[derive(Parser)]
#[command(
    name = "serve",
    version,
    about = "femtochat: serve a trained model over HTTP (OpenAI API + web chat), or chat in the terminal",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    http: HttpArgs,
}

#[derive(clap::Args)]
struct HttpArgs {
    /// Run directory written by `train` (its latest checkpoint is loaded), or a PyTorch nanochat
    /// directory ($NANOCHAT_BASE_DIR, a <source>_checkpoints dir or a tag dir: its sft, else rl,
    /// else base model, largest tag, last step; imported in memory).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Tokenizer directory (default: RUN_DIR/tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Most sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    max_batch: usize,
    /// Most requests waiting for a free row; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Tokens per sequence, prompt + reply (default: the model's sequence_len).
    #[arg(long, value_parser = at_least_one)]
    context: Option<usize>,
    /// Seconds a client has to send a request's head (line and headers); then 408 and close.
    #[arg(long, default_value = "10", value_parser = positive_seconds)]
    request_timeout: Duration,
    /// Seconds a client has to send a request's body once the head is in; then 408 and close.
    #[arg(long, default_value = "30", value_parser = positive_seconds)]
    body_timeout: Duration,
    /// Seconds an idle connection stays open between requests (0 = close after each response).
    #[arg(long, default_value = "15", value_parser = seconds)]
    keep_alive: Duration,
    /// Most open connections; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    max_connections: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Run the model on cpu or gpu (WGSL kernels through wgpu).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Storage of the weight matrices: fp32, or bf16 (CPU only; half the memory, faster
    /// decoding; products and sums stay f32). A checkpoint in the other dtype is converted.
    #[arg(long, default_value = "fp32")]
    dtype: WeightDtype,
    /// HTTP worker threads (default: one per core).
    #[arg(long, visible_alias = "workers", default_value_t = 0)]
    http_workers: usize,
    /// Model id in the API (default: the run directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Response cache entries (0 = off).
    #[arg(long, default_value_t = 1024)]
    cache_entries: usize,
    /// Response cache size in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Seconds a cached response stays valid.
    #[arg(long, default_value_t = 600)]
    cache_ttl: u64,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Run directory written by `train`, or a PyTorch nanochat directory (as for `serve`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Tokenizer directory (default: RUN_DIR/tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Most new tokens per reply.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    max_tokens: usize,
    /// Tokens per conversation, prompt + reply (default: the model's sequence_len).
    #[arg(long, value_parser = at_least_one)]
    context: Option<usize>,
    /// Makes sampling reproducible.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Run the model on cpu or gpu (WGSL kernels through wgpu).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Storage of the weight matrices: fp32, or bf16 (CPU only; half the memory).
    #[arg(long, default_value = "fp32")]
    dtype: WeightDtype,
}

#[derive(Subcommand)]
enum Command {
    /// Interactive chat in the terminal, streaming replies (/reset starts over, /quit or EOF ends).
    Chat(ModelArgs),
    /// Complete one prompt (raw text, no chat format) and stream it to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
    },
}

struct Session {
    gpt: Gpt,
    tok: Tokenizer,
    sampler: Sampler,
    max_tokens: usize,
    /// Most tokens of prompt + reply.
    context: usize,
}

impl Session {
    fn open(a: &ModelArgs) -> Result<Session> {
        if let Some(n) = a.threads {
            rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()?;
        }
        let (gpt, tok) = load(&a.checkpoint, a.tokenizer.as_deref(), a.device, a.dtype)
            .with_context(|| format!("loading {}", a.checkpoint.display()))?;
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            ..Default::default()
        };
        // Like the HTTP engine: the trained context unless told otherwise, never past the
        // rotary tables.
        let context = a.context.unwrap_or(gpt.config().sequence_len).min(gpt.max_positions());
        let sampler = Sampler::new(params, a.seed)?;
        Ok(Session { gpt, tok, sampler, max_tokens: a.max_tokens, context })
    }

    /// Room for the reply after `prompt`, or a one-line error naming the sizes (never the text).
    fn room(&self, prompt: &[u32], what: &str, fix: &str) -> Result<usize> {
        match self.context.checked_sub(prompt.len()) {
            Some(room) if room > 0 => Ok(room),
            _ => bail!(
                "{what} is {} tokens and the context holds {} (prompt + reply); {fix}",
                prompt.len(),
                self.context
            ),
        }
    }

    /// Generate up to `room` tokens after `prompt`, printing text as it completes; returns the
    /// text.
    fn stream(
        &mut self,
        prompt: &[u32],
        room: usize,
        stop: &[u32],
        out: &mut impl Write,
    ) -> Result<(String, Finish)> {
        let mut dec = StreamDecoder::default();
        let mut text = String::new();
        let mut failed = None;
        let tok = &self.tok;
        let (_, finish) = generate(
            &self.gpt,
            prompt,
            &mut self.sampler,
            self.max_tokens.min(room),
            stop,
            |id| {
                if stop.contains(&id) {
                    return true;
                }
                match dec.push(tok, id).map_err(anyhow::Error::from).and_then(|s| {
                    out.write_all(s.as_bytes())?;
                    out.flush()?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        text.push_str(&s);
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        let rest = dec.finish();
        write!(out, "{rest}")?;
        text.push_str(&rest);
        Ok((text, finish))
    }
}

fn chat(a: ModelArgs) -> Result<()> {
    let mut s = Session::open(&a)?;
    let stop = [s.tok.special("<|assistant_end|>")?, s.tok.bos()];
    let mut conv = Conversation { messages: Vec::new() };
    eprintln!("chatting with {} (/reset to start over, /quit to leave)", a.checkpoint.display());
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("\nyou> ");
        let mut raw = Vec::new();
        if stdin.lock().read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        let line = match String::from_utf8(raw) {
            Ok(l) => l,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                eprintln!("error: that line is not valid UTF-8 (byte {at}); nothing was sent");
                continue;
            }
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                conv.messages.clear();
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        conv.messages
            .push(ChatMessage { role: "user".into(), content: Content::Text(line.to_string()) });
        let checked = s.tok.render_prompt(&conv).map_err(anyhow::Error::from).and_then(|p| {
            let room = s.room(&p, "the conversation", "/reset to start over")?;
            Ok((p, room))
        });
        let (prompt, room) = match checked {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e:#}");
                conv.messages.pop();
                continue;
            }
        };
        eprint!("bot> ");
        match s.stream(&prompt, room, &stop, &mut stdout) {
            Ok((reply, _)) => {
                println!();
                conv.messages
                    .push(ChatMessage { role: "assistant".into(), content: Content::Text(reply) });
            }
            Err(e) => {
                eprintln!("\nerror: {e:#}");
                conv.messages.pop();
            }
        }
    }
    Ok(())
}

/// The run's model on `device` with `dtype` weights, saying so when that converts the file's.
fn load(
    run: &Path,
    tok_dir: Option<&Path>,
    device: Device,
    dtype: WeightDtype,
) -> femtochat_model::Result<(Gpt, Tokenizer)> {
    if dtype != WeightDtype::F32 && device != Device::Cpu {
        return Err(ModelError::Invalid(format!(
            "--dtype {dtype} runs on the CPU only (use --device cpu, or --dtype fp32 on the GPU)"
        )));
    }
    let (gpt, tok, note) = load_run_as(run, tok_dir, dtype)?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    Ok((gpt.to_device(device)?, tok))
}

fn http(a: HttpArgs) -> Result<()> {
    let Some(run) = a.checkpoint.clone() else {
        bail!(
            "`serve` needs --checkpoint RUN_DIR (or a subcommand: `serve chat`, `serve generate`)"
        );
    };
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()?;
    }
    let model_name = match &a.model_name {
        Some(n) => n.clone(),
        None => run_name(&run),
    };
    let (tok_dir, run_dir) = (a.tokenizer.clone(), run.clone());
    let config = EngineConfig {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        context: a.context,
        ..Default::default()
    };
    let (device, dtype) = (a.device, a.dtype);
    let load = move || load(&run_dir, tok_dir.as_deref(), device, dtype);
    let engine = Engine::spawn(config, Box::new(load))?;
    // Fail at startup (not on the first request) when the run or tokenizer is unusable.
    let info = engine.wait_ready().with_context(|| format!("loading {}", run.display()))?;
    eprintln!(
        "model {model_name}: vocab {}, context {} tokens, batch {}, queue {}",
        info.vocab_size, info.context, a.max_batch, a.max_queue
    );
    let cache = CacheConfig {
        max_entries: a.cache_entries,
        max_bytes: a.cache_mib << 20,
        ttl: Duration::from_secs(a.cache_ttl),
    };
    let state = Arc::new(AppState::new(engine, model_name, cache));
    let http = HttpConfig {
        host: a.host.clone(),
        port: a.port,
        workers: a.http_workers,
        request_timeout: a.request_timeout,
        body_timeout: a.body_timeout,
        keep_alive: a.keep_alive,
        max_connections: a.max_connections,
        max_body_bytes: MAX_BODY_BYTES,
    };
    let server =
        start(state, &http).with_context(|| format!("listening on {}:{}", a.host, a.port))?;
    eprintln!("serving on http://{} (web chat at /, API at /v1)", server.addr);
    server.join()?;
    Ok(())
}

/// A count of at least 1 (`--max-tokens 0` would ask for nothing, `--context 0` fit nothing).
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Seconds (fractions allowed), zero or more.
fn seconds(s: &str) -> std::result::Result<Duration, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(x).map_err(|_| "must be a number of seconds, 0 or more".into())
}

/// Seconds above zero (a zero timeout would mean none).
fn positive_seconds(s: &str) -> std::result::Result<Duration, String> {
    match seconds(s)? {
        d if d.is_zero() => Err("must be above 0".into()),
        d => Ok(d),
    }
}

/// The run directory's own name (`runs/d12` -> `d12`).
fn run_name(run: &Path) -> String {
    let abs = std::fs::canonicalize(run).unwrap_or_else(|_| run.to_path_buf());
    abs.file_name().map_or_else(|| "femtochat".into(), |n| n.to_string_lossy().into_owned())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = femtochat_engine::cpu_isa::check_env() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        None => http(cli.http),
        Some(Command::Chat(a)) => chat(a),
        Some(Command::Generate { model, prompt }) => Session::open(&model).and_then(|mut s| {
            let mut ids = vec![s.tok.bos()];
            ids.extend(s.tok.encode(&prompt));
            let room = s.room(&ids, "the prompt", "shorten it or raise --context")?;
            print!("{prompt}");
            let bos = [s.tok.bos()];
            let (_, finish) = s.stream(&ids, room, &bos, &mut std::io::stdout())?;
            println!();
            eprintln!("(finish: {finish:?})");
            Ok(())
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
