//! `serve`: talk to a trained model. This build has the terminal front ends (`serve chat`,
//! `serve generate`); the OpenAI-compatible HTTP API is the next step (issue 8).
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use femtochat_model::Gpt;
use femtochat_model::checkpoint::load_run;
use femtochat_model::generate::{Finish, generate};
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation, StreamDecoder, Tokenizer};

#[derive(Parser)]
#[command(name = "serve", version, about = "femtochat: chat with a trained model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Run directory written by `train` (its latest checkpoint is loaded).
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
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Makes sampling reproducible.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
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
}

impl Session {
    fn open(a: &ModelArgs) -> Result<Session> {
        if let Some(n) = a.threads {
            rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()?;
        }
        let (gpt, tok) = load_run(&a.checkpoint, a.tokenizer.as_deref())
            .with_context(|| format!("loading {}", a.checkpoint.display()))?;
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            ..Default::default()
        };
        Ok(Session { gpt, tok, sampler: Sampler::new(params, a.seed)?, max_tokens: a.max_tokens })
    }

    /// Generate after `prompt`, printing text as it completes; returns the text.
    fn stream(
        &mut self,
        prompt: &[u32],
        stop: &[u32],
        out: &mut impl Write,
    ) -> Result<(String, Finish)> {
        let room = self.gpt.max_positions().saturating_sub(prompt.len() + 1);
        if room == 0 {
            bail!("the conversation is longer than the model's context; /reset to start over");
        }
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
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
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
        let prompt = s.tok.render_prompt(&conv)?;
        eprint!("bot> ");
        match s.stream(&prompt, &stop, &mut stdout) {
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

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Chat(a) => chat(a),
        Command::Generate { model, prompt } => Session::open(&model).and_then(|mut s| {
            let mut ids = vec![s.tok.bos()];
            ids.extend(s.tok.encode(&prompt));
            print!("{prompt}");
            let bos = [s.tok.bos()];
            let (_, finish) = s.stream(&ids, &bos, &mut std::io::stdout())?;
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
